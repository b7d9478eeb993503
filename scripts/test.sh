#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian/Ubuntu machine, then run lint,
# types and the test suite. This is the README's test command; .ci/run calls it.
#
#   bash scripts/test.sh [extra pytest args]
#   bash scripts/test.sh --setup-only      # install, then stop (tests/test_quickstart.py)
#
# Debian packages are installed with apt-get when missing (root, or sudo when present):
# vmtouch and util-linux (fincore) as outside witnesses of residency, fio and fuse3/s3fs
# for the benchmark smoke test and FUSE tests, prometheus for promtool and the dashboard
# test, python3-venv for the virtual environment, podman, runc and debootstrap to build
# and run the container image on a local Debian base (tests/test_image.py).
#
# Python packages go into a virtual environment: .venv in the checkout (git-ignored),
# made from $PYTHON (default python3) and reused when it works, because Debian's and
# Ubuntu's own python3 refuse `pip install` (PEP 668, "externally-managed-environment").
# When $PYTHON already runs in a virtual environment, that one is used instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
APT_PACKAGES=(vmtouch util-linux fio fuse3 s3fs prometheus time python3-venv podman runc debootstrap)
setup_only=0
if [ "${1:-}" = "--setup-only" ]; then
    setup_only=1
    shift
fi

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

if ! "$PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
        echo "== creating .venv with $("$PYTHON" -c 'import sys; print(sys.executable)')"
        "$PYTHON" -m venv .venv
    fi
    PYTHON=.venv/bin/python
fi

echo "== installing preloader with its dev extra into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
if ((setup_only)); then
    echo "== set up; the checks run with $PYTHON"
    exit 0
fi

echo "== ruff"
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
echo "== mypy --strict"
"$PYTHON" -m mypy
echo "== pytest"
# pytest writes its JUnit report only when the session ends as it should: a test that
# makes the process exit early (os._exit in code under test) leaves none, whatever the
# exit status said.
report_dir=$(mktemp -d)
trap 'rm -rf "$report_dir"' EXIT
set +e
"$PYTHON" -m pytest --junitxml="$report_dir/pytest.xml" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
if [ "$rc" -eq 0 ] && [ ! -s "$report_dir/pytest.xml" ]; then
    echo "pytest exited 0 without finishing its session (no report): a failure here" >&2
    exit 1
fi
exit "$rc"
