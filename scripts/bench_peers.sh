#!/usr/bin/env bash
# `make bench-peers`: a venv per Redis-based peer (their redis clients conflict), a local
# redis-server (installed with apt-get when missing), then bench/peers.py.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "bench-peers: installing redis-server (apt-get)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
    # Debian's package starts a system-wide server on 6379; the benchmark starts its own.
fi

for peer in arq saq taskiq celery; do
    venv=".venv-peers/$peer"
    stamp="$venv/.installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        [ -x "$venv/bin/python" ] || .venv/bin/python -m venv "$venv"
        reqs=$(.venv/bin/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench-$peer']))")
        echo "bench-peers: installing $reqs into $venv"
        # shellcheck disable=SC2086
        "$venv/bin/python" -m pip install --quiet $reqs \
            2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
        touch "$stamp"
    fi
done

exec .venv/bin/python -m bench.peers
