# Sourced by the bin/ scripts: make sure .venv exists and has the project installed.
# Usage: ensure_venv [EXTRAS]   e.g. ensure_venv dev,llamacpp
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MODELPOOL_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

# Whether an install stamp (its extras in its name, its packaging hash inside) covers $1.
_covers() {
    local stamp="$1" wanted="$2" hash="$3" have extra
    [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ] || return 1
    have=",${stamp##*/.modelpool-install},"
    have="${have/,-/,}"
    for extra in ${wanted//,/ }; do
        case "$have" in *",$extra,"*) ;; *) return 1 ;; esac
    done
}

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
    for stamp in "$VENV"/.modelpool-install*; do
        if [ -e "$stamp" ] && _covers "$stamp" "$extras" "$hash"; then
            return 0
        fi
    done
    case "$extras" in *llamacpp*)
        echo "llama-cpp-python compiles llama.cpp on its first install (5-6 minutes on 2 cores)" >&2 ;;
    esac
    echo "installing modelpool${extras:+[$extras]} into $VENV" >&2
    (cd "$ROOT" && "$PY" -m pip install --quiet -e ".${extras:+[$extras]}" >&2)
    rm -f "$VENV"/.modelpool-install*
    echo "$hash" > "$VENV/.modelpool-install${extras:+-$extras}"
}
