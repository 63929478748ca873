#!/usr/bin/env bash
# Start the modelpool stack (supervisord, the control plane on :8050, warmup models) and return
# once the control plane is healthy. Creates .venv on first use. Extra arguments go to
# `modelpool up` (e.g. --config-dir DIR --run-dir DIR). Stop it with bin/stop_stack.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv
cd "$ROOT"
"$VENV/bin/modelpool" up "$@"
