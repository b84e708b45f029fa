#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the default (fast) suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest -q "$@"
