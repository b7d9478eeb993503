#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian/Ubuntu machine, then run lint,
# types and the test suite. This is the README's test command; .ci/run calls it.
#
#   bash scripts/test.sh [extra pytest args]
#
# Debian packages are installed with apt-get when missing (root, or sudo when present):
# vmtouch and util-linux (fincore) as outside witnesses of residency, fio and fuse3/s3fs
# for the benchmark smoke test and FUSE tests, prometheus for promtool.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
APT_PACKAGES=(vmtouch util-linux fio fuse3 s3fs prometheus time)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "== installing Debian packages: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "== installing preloader with its dev extra"
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[dev,bench]'

echo "== ruff"
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
echo "== mypy --strict"
"$PYTHON" -m mypy
echo "== pytest"
set +e
"$PYTHON" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"
