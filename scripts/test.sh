#!/usr/bin/env bash
# Set up .venv from the repo's own files and run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k certify`).
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv || exit 1
# torch is pinned in the `train` extra (a CPU wheel of torch 2.13.0); never unpinned.
.venv/bin/pip install -q --disable-pip-version-check -e ".[train,dev]" || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$rc"
