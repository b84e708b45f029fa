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
# The PostgreSQL search test starts a throw-away server: make sure its binaries are there (Debian's package,
# as root with apt-get; elsewhere the test is skipped and says why).
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
            || echo "setup_env.sh: could not install PostgreSQL; its search test will be skipped." >&2
    else
        echo "setup_env.sh: PostgreSQL (initdb) not found; its search test will be skipped." >&2
    fi
fi
