#!/usr/bin/env bash
# Benchmarks of fcgispawn against its peers (see bench/README.md). On a fresh Debian 12 machine,
# as root:
#
#   bash bench/run.sh [hello] [--duration S] [--repetitions R] [--peers a,b,..] [--label L] ...
#   bash bench/run.sh large [--size-mb N] [--repetitions R] ...
#   bash bench/run.sh supervisor [--kills N] ...
#   bash bench/run.sh all            # the three, default options
#
# It installs what the peers need first: the Debian packages (nginx-light, wrk, spawn-fcgi,
# libfcgi-dev, gcc, ...) through scripts/setup.sh, then flup 1.0.3 and uWSGI into the project's
# venv, which is made with Debian's /usr/bin/python3: every Python peer runs on that one
# interpreter (uWSGI embeds the matching libpython3.11), so like is compared with like.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

VENV=${FCGISPAWN_VENV:-.venv}
PY="$VENV/bin/python"
if ! "$PY" -c 'import flup' 2>/dev/null || [ ! -x "$VENV/bin/uwsgi" ] \
   || [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("flup"))')" != "1.0.3" ]; then
  echo "bench: installing flup==1.0.3 and uwsgi into $VENV (uwsgi compiles, ~1 min)"
  "$VENV/bin/pip" install -q 'flup==1.0.3' uwsgi
fi

echo "bench: interpreter for every Python peer: $(readlink -f "$PY") ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
echo "bench: uWSGI embeds: $(ldd "$VENV/bin/uwsgi" | awk '/libpython/ {print $3}')"

mode=hello
case "${1:-}" in
  hello|large|supervisor|all) mode=$1; shift ;;
esac

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Workers import fcgispawn at every start: with PYTHONDONTWRITEBYTECODE set (some shells and CI
# set it) and no .pyc, each start would compile the package from source and distort start-up
# and replacement figures. Compile once up front.
"$PY" -m compileall -q fcgispawn bench >/dev/null
case "$mode" in
  hello) exec "$PY" -m bench.bench "$@" ;;
  large) exec "$PY" -m bench.large "$@" ;;
  supervisor) exec "$PY" -m bench.supervisor "$@" ;;
  all)
    "$PY" -m bench.bench "$@"
    "$PY" -m bench.large
    "$PY" -m bench.supervisor
    ;;
esac
