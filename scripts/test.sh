#!/usr/bin/env bash
# Run the whole test suite (after scripts/install.sh --test). Starts dockerd for the docker
# provider's tests when Docker is installed; those tests skip with a reason otherwise.
# pytest's exit code 5 ("no tests collected") is a failure here, never a silent pass.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if command -v dockerd >/dev/null && [ "${WTBOX_TEST_DOCKER:-1}" = 1 ]; then
    if bash scripts/start_dockerd.sh; then
        # cold build ~80-140 s (debootstrap), then cached by recipe hash; the docker tests skip if it fails
        bash scripts/build_images.sh >/dev/null || echo "test.sh: docker images not built; docker tests will skip." >&2
    else
        echo "test.sh: dockerd did not start; docker tests will skip." >&2
    fi
fi
export TESTCONTAINERS_RYUK_DISABLED=true
# A tmp dir of this run's own: pytest's default (/tmp/pytest-of-USER/pytest-N) keeps only the
# three newest and deletes older ones, even one a concurrent session is still using.
basetemp=$(mktemp -d /tmp/wtbox-tests.XXXXXX)
.venv/bin/python -m pytest -q --basetemp="$basetemp" "$@"
rc=$?
rm -rf --one-file-system "$basetemp"  # never into a mount a failed test left
if [ "$rc" = 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure." >&2
    exit 1
fi
exit "$rc"
