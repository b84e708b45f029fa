#!/usr/bin/env bash
# The main job: set up .venv if needed, then fine-tune a tiny GPT-2 on offline Wikipedia text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m utils.demo "$@"
