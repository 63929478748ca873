#!/usr/bin/env bash
# Start the modelpool stack (supervisord, the control plane on :8050, warmup models) and return
# once the control plane is healthy. On first use: creates .venv, installs modelpool with
# llama-cpp-python (which compiles llama.cpp: 5-6 minutes on 2 cores, once), and writes the
# demo model to data/. Extra arguments go to `modelpool up` (e.g. --run-dir DIR --config-dir DIR).
# The live config is the run dir's config/ (run/config/, created from the shipped config/ on
# first use) unless --config-dir says otherwise: running the stack writes no tracked file.
# Stop it with bin/stop_stack.sh (with the same --run-dir, if one was given).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv llamacpp
cd "$ROOT"
"$VENV/bin/modelpool" make-demo-model "$ROOT/data/demo-llama.gguf"
"$VENV/bin/modelpool" up "$@"
