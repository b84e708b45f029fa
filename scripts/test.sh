#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the default (fast) suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
# Without arguments (as CI runs it): the linter first (settings in pyproject.toml), so a finding fails the run.
if [ $# -eq 0 ]; then
    python -m ruff check utils tests
fi
python -m pytest -q "$@"
# Without arguments (as CI runs it): the float comparisons once more under torch's portable kernels. torch picks
# its float32 kernels per instruction set (ATEN_CPU_CAPABILITY), so a tolerance that holds on this CPU's kernels
# must also hold on another's; "default" differs from the native set on every avx2 or avx512 machine.
if [ $# -eq 0 ]; then
    ATEN_CPU_CAPABILITY=default python -m pytest -q -m numerics
fi
