#!/usr/bin/env bash
# Stop the modelpool stack: drain every model worker, stop supervisord, wait for every process.
# Extra arguments go to `modelpool down` (e.g. --run-dir DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MODELPOOL_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/modelpool" ]; then
    echo "modelpool is not installed in $VENV (nothing to stop)"; exit 0
fi
cd "$ROOT"
exec "$VENV/bin/modelpool" down "$@"
