#!/usr/bin/env bash
# Start a modelpool node on this host: a supervisord that a control plane on another host drives
# over authenticated XML-RPC (supervisor_twiddler) to run model workers here. Returns once the
# node answers. Creates .venv on first use (with llama-cpp-python, for llamacpp models).
#
#   bin/run_node.sh --name gpu-a --listen 10.0.0.5:9001 [--run-dir DIR] [--password-file FILE]
#
# --listen is this host's own address (never 0.0.0.0): the XML-RPC server listens there alone.
# --run-dir defaults to node-run/ in the project; --password-file to <run dir>/password, which is
# created (mode 600, a random password) if it does not exist. Copy that password to the control
# plane's host and name it in the nodes: entry's password_file. Stop the node with
#   .venv/bin/modelpool node down --run-dir DIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv llamacpp
cd "$ROOT"
run_dir="$ROOT/node-run"
password_file=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --run-dir) run_dir="$2"; shift 2 ;;
        --password-file) password_file="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
password_file="${password_file:-$run_dir/password}"
if [ ! -e "$password_file" ]; then
    mkdir -p "$(dirname "$password_file")"
    (umask 077 && "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))' > "$password_file")
    echo "bin/run_node.sh: wrote a new password to $password_file (copy it to the control plane's host)" >&2
fi
"$VENV/bin/modelpool" make-demo-model "$ROOT/data/demo-llama.gguf"
"$VENV/bin/modelpool" fetch-model || echo "bin/run_node.sh: SmolLM2 is not available here (offline?)" >&2
exec "$VENV/bin/modelpool" node up --run-dir "$run_dir" --password-file "$password_file" "${args[@]}"
