# Sourced by scripts/test and scripts/run: creates or refreshes the local virtual
# environment in .venv and installs the project into it. Set NN_HANDLER_VENV to use
# another location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NN_HANDLER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.nn_handler-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    # Install the CPU build of torch first when none is there: a bare torch requirement
    # would otherwise pull a multi-GB CUDA build on a CPU-only machine.
    if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] installing torch==2.13.0" >&2
        "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    fi
    echo "[setup] installing nn-handler and its dependencies" >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
