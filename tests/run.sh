#!/usr/bin/env bash
# The test command: installs what is missing (./install.sh), then lint, types and every test
# (unit without root; netns and fat-tree tests need root, which this script requires).
# Extra arguments go to pytest, e.g. `tests/run.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
./install.sh
. .venv/bin/activate
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
[ $rc -eq 5 ] && echo "tests/run.sh: pytest collected no tests" >&2
exit $rc
