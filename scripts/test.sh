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
# Without arguments: two pytest workers (pytest-xdist), one test file each at a time (--dist loadfile: a file's
# module fixtures are built once, and its fixed ports are used by one worker). Every test runs torch on one thread
# (tests/conftest.py), so two workers fill two cores; alone, one pytest process left the second core to the
# subprocesses and waits. TIER3_TEST_WORKERS changes the count.
PARALLEL=()
if [ $# -eq 0 ]; then
    PARALLEL=(-n "${TIER3_TEST_WORKERS:-2}" --dist loadfile -p no:benchmark)
fi
python -m pytest -q "${PARALLEL[@]}" "$@"
# Without arguments (as CI runs it): the float comparisons once more under torch's portable kernels. torch picks
# its float32 kernels per instruction set (ATEN_CPU_CAPABILITY), so a tolerance that holds on this CPU's kernels
# must also hold on another's; "default" differs from the native set on every avx2 or avx512 machine.
if [ $# -eq 0 ]; then
    ATEN_CPU_CAPABILITY=default python -m pytest -q "${PARALLEL[@]}" -m numerics
fi
