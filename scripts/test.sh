#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian/Ubuntu machine, then run lint,
# types, the documentation build and the test suite. This is the README's test command;
# .ci/run calls it.
#
#   bash scripts/test.sh [extra pytest args]
#   bash scripts/test.sh --setup-only      # install, then stop (tests/packaging/test_quickstart.py)
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
#
# Run as root on a machine with DAMON proactive reclaim (a kdamond in
# /sys/kernel/mm/damon/admin/kdamonds/*/state is "on"), the tests pause every running
# kdamond for the length of the pytest run, because it pages out freshly cached files and
# the residency assertions test preloader, not the reclaimer. pytest's header names the
# kdamonds it paused; they are turned back on when pytest ends, and again by this script
# after pytest however it ended (failure, Ctrl-C, SIGTERM, a killed pytest).
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

echo "== installing preloader with its dev, bench and docs extras into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[dev,bench,docs]'
if ((setup_only)); then
    echo "== set up; the checks run with $PYTHON"
    exit 0
fi

echo "== ruff"
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
echo "== mypy --strict"
"$PYTHON" -m mypy
echo "== lint-imports (the layer contract in pyproject.toml)"
"$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')/lint-imports"
echo "== mkdocs build --strict"
# Into a temporary folder: the site is built to prove it builds (no dead link, no anchor
# missing, every page in the navigation), never committed.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
NO_MKDOCS_2_WARNING=1 "$PYTHON" -m mkdocs build --strict --quiet --site-dir "$scratch/site"
echo "== pytest"
# pytest writes its JUnit report only when the session ends as it should: a test that
# makes the process exit early (os._exit in code under test) leaves none, whatever the
# exit status said.
damon_running=()
for state in /sys/kernel/mm/damon/admin/kdamonds/*/state; do
    [ -w "$state" ] && [ "$(cat "$state" 2>/dev/null)" = on ] && damon_running+=("$state")
done
restore_damon() {
    local state
    for state in ${damon_running[@]+"${damon_running[@]}"}; do
        if [ "$(cat "$state" 2>/dev/null)" != on ]; then
            echo on >"$state" || echo "could not turn $state back on" >&2
        fi
    done
}
trap 'restore_damon; rm -rf "$scratch"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
set +e
"$PYTHON" -m pytest --junitxml="$scratch/pytest.xml" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
if [ "$rc" -eq 0 ] && [ ! -s "$scratch/pytest.xml" ]; then
    echo "pytest exited 0 without finishing its session (no report): a failure here" >&2
    exit 1
fi
exit "$rc"
