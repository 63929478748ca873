# Sourced by the bin/ scripts: make sure .venv exists and has the project installed.
# Usage: ensure_venv [EXTRAS]   e.g. ensure_venv dev
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MODELPOOL_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

ensure_venv() {
    local extras="${1:-}"
    if [ ! -x "$PY" ]; then
        echo "creating virtual environment in $VENV" >&2
        python3 -m venv "$VENV"
        "$PY" -m pip install --quiet --upgrade pip >&2
    fi
    # Reinstall only when the packaging files changed or the wanted extras are missing.
    local hash stamp
    hash="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    stamp="$VENV/.modelpool-install${extras:+-$extras}"
    if [ -z "$extras" ] && grep -qsx "$hash" "$VENV"/.modelpool-install*; then
        return 0
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$hash" ]; then
        echo "installing modelpool${extras:+[$extras]} into $VENV" >&2
        (cd "$ROOT" && "$PY" -m pip install --quiet -e ".${extras:+[$extras]}" >&2)
        echo "$hash" > "$stamp"
    fi
}
