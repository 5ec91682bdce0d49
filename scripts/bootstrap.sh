#!/usr/bin/env bash
# Create .venv with a Python >= 3.12 and install the project into it.
#
# Why a script: fastworker needs Python >= 3.12, and the first `python3` on PATH is often
# older (or a pyenv shim that refuses to run). Every candidate is *run* and its version
# checked, so a shim that fails is skipped rather than trusted.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.installed"

is_good() {
    # A candidate is good when it runs, is >= 3.12 and can build a venv.
    "$1" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 12) else 1)' \
        >/dev/null 2>&1
}

find_python() {
    local c
    local candidates=()
    [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
    candidates+=(python3.13 python3.12 python3.14 python3 python)
    if command -v pyenv >/dev/null 2>&1; then
        local root
        root="$(pyenv root 2>/dev/null || true)"
        if [ -n "$root" ] && [ -d "$root/versions" ]; then
            # Newest first; version directories like 3.13.0, 3.12.1.
            while IFS= read -r c; do candidates+=("$c"); done < <(
                ls -d "$root"/versions/3.* 2>/dev/null | sort -t. -k2,2nr -k3,3nr |
                    sed 's|$|/bin/python3|'
            )
        fi
    fi
    for c in /usr/local/bin/python3.13 /usr/local/bin/python3.12 /usr/bin/python3.13 \
        /usr/bin/python3.12; do
        candidates+=("$c")
    done
    for c in "${candidates[@]}"; do
        if is_good "$c"; then
            command -v "$c" 2>/dev/null || echo "$c"
            return 0
        fi
    done
    return 1
}

if [ -x "$VENV/bin/python" ] && is_good "$VENV/bin/python"; then
    :
else
    rm -rf "$VENV"
    if ! PY="$(find_python)"; then
        cat >&2 <<'MSG'
error: no Python >= 3.12 found (fastworker needs it).
Tried $PYTHON, python3.13, python3.12, python3.14, python3, python and pyenv's versions.
Install one, for example:
  - Debian/Ubuntu: apt-get install python3.12 python3.12-venv
  - pyenv:         pyenv install 3.12
  - or set PYTHON=/path/to/python3.12 and run this again.
MSG
        exit 1
    fi
    echo "bootstrap: creating $VENV with $PY ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV"
fi

# Reinstall only when the project's metadata changed since the last install.
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    # Some machines list local index folders that do not exist; pip warns once per package.
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    touch "$STAMP"
fi

# The PostgreSQL store's tests start a throwaway server with the machine's initdb/pg_ctl.
# Install it when it is missing and we may (root with apt); otherwise those tests skip.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing PostgreSQL (for the PostgreSQL store's tests)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) \
            >/dev/null 2>&1 || echo "bootstrap: could not install PostgreSQL; its tests will skip" >&2
        # Debian's package may start a cluster of its own: the tests never use it.
        if command -v pg_ctlcluster >/dev/null 2>&1; then
            for conf in /etc/postgresql/*/main; do
                [ -d "$conf" ] || continue
                version="$(basename "$(dirname "$conf")")"
                pg_ctlcluster "$version" main stop >/dev/null 2>&1 || true
            done
        fi
    else
        echo "bootstrap: PostgreSQL (initdb) not found; the PostgreSQL store's tests will skip" >&2
    fi
fi
