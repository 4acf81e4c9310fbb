#!/usr/bin/env bash
# Run the gates, then the test suite (after scripts/install.sh --test).
#   bash scripts/test.sh                  everything: gates, the parallel pass, the serial pass
#   bash scripts/test.sh -m "not slow"    the fast subset (well under a minute)
#   bash scripts/test.sh tests/system -k procfs    any pytest arguments
# Gates first, in seconds: ruff, import-linter (the layer contracts), mypy; the first that fails
# stops the run with its findings. Then the suite in two passes: every test not marked `serial`
# on pytest-xdist workers (WTBOX_TEST_WORKERS, default: the CPU count, at least 2), then the
# `serial` ones (CPU fairness, latency and ratio measurements) alone, so no other test's load
# skews them. Both exit codes count; pytest's exit code 5 ("no tests collected") is a failure for
# the whole suite, and for a selection when neither pass ran a test: never a silent pass.
# Starts dockerd for the docker provider's tests when Docker is installed; those tests skip with
# a reason otherwise.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

gate() {  # quiet when it passes; its findings and one sentence when it does not
    local name=$1 out
    shift
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        echo "test.sh: the $name gate failed (its findings are above); no test was run." >&2
        exit 1
    fi
}
if [ "${WTBOX_TEST_GATES:-1}" = 1 ]; then
    gate ruff .venv/bin/ruff check --quiet worktreebox tests scripts
    gate import-linter .venv/bin/lint-imports --no-cache
    gate mypy .venv/bin/mypy --no-error-summary
    echo "test.sh: gates passed (ruff, import-linter, mypy)." >&2
fi

if command -v dockerd >/dev/null && [ "${WTBOX_TEST_DOCKER:-1}" = 1 ]; then
    if bash scripts/start_dockerd.sh; then
        # cold build ~80-140 s (debootstrap), then cached by recipe hash; the docker tests skip if it fails
        bash scripts/build_images.sh >/dev/null || echo "test.sh: docker images not built; docker tests will skip." >&2
    else
        echo "test.sh: dockerd did not start; docker tests will skip." >&2
    fi
fi
export TESTCONTAINERS_RYUK_DISABLED=true
workers=${WTBOX_TEST_WORKERS:-$(nproc)}
[ "$workers" -ge 2 ] 2>/dev/null || workers=2
# A tmp dir of this run's own: pytest's default (/tmp/pytest-of-USER/pytest-N) keeps only the
# three newest and deletes older ones, even one a concurrent session is still using.
basetemp=$(mktemp -d /tmp/wtbox-tests.XXXXXX)
# --dist loadfile: a module's tests stay on one worker, in order (some share a port range or a
# cgroup key between them, as they always did); different modules run side by side.
.venv/bin/python -m pytest -q --basetemp="$basetemp/parallel" --wtbox-pass=parallel -n "$workers" --dist loadfile "$@"
parallel=$?
.venv/bin/python -m pytest -q --basetemp="$basetemp/serial" --wtbox-pass=serial "$@"
serial=$?
rm -rf --one-file-system "$basetemp"  # never into a mount a failed test left

if [ "$parallel" = 5 ] && [ "$serial" = 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure." >&2
    exit 1
fi
if [ "$#" = 0 ] && { [ "$parallel" = 5 ] || [ "$serial" = 5 ]; }; then
    echo "test.sh: the whole suite ran no test in one of its passes (parallel $parallel, serial $serial); that is a failure." >&2
    exit 1
fi
for rc in "$parallel" "$serial"; do
    if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then
        echo "test.sh: failed (parallel pass: exit $parallel, serial pass: exit $serial)." >&2
        exit "$rc"
    fi
done
exit 0
