#!/usr/bin/env bash
# Creates .venv and installs the package with its test extra. Installs torch only when it is missing:
# a machine that has torch (Colab, a CUDA box) keeps its own build; elsewhere TORCH_SPEC is installed
# (default torch==2.13.0, which pip resolves to a CPU build from local wheels where they exist).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv --system-site-packages .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install --quiet -e ".[test]"
