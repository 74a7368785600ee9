#!/usr/bin/env bash
# The main job, end to end: spawn the example WSGI app (examples/hello.py) as 2 supervised
# workers on a UNIX socket, exactly as an init script would call spawn-fcgi, ask it through a
# real FastCGI client (cgi-fcgi, from libfcgi), then stop it through its pid file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${FCGISPAWN_VENV:-.venv}

DIR=$(mktemp -d /tmp/fcgispawn-demo.XXXXXX)
SOCK=$DIR/hello.sock
PIDFILE=$DIR/fcgispawn.pid
cleanup() {
  if [ -s "$PIDFILE" ]; then kill -TERM "$(cat "$PIDFILE")" 2>/dev/null || true; fi
  for _ in $(seq 50); do [ -e "$SOCK" ] || break; sleep 0.1; done
  rm -rf "$DIR"
}
trap cleanup EXIT

echo "\$ fcgispawn -s $SOCK -P $PIDFILE -F 2 -d examples --wsgi hello:app"
"$VENV/bin/fcgispawn" -s "$SOCK" -P "$PIDFILE" -F 2 -d examples --wsgi hello:app
echo
echo "\$ REQUEST_METHOD=GET SCRIPT_NAME=/ QUERY_STRING=name=Debian cgi-fcgi -bind -connect $SOCK"
env -i REQUEST_METHOD=GET SCRIPT_NAME=/ PATH_INFO= QUERY_STRING=name=Debian \
  SERVER_NAME=localhost SERVER_PORT=80 SERVER_PROTOCOL=HTTP/1.1 \
  cgi-fcgi -bind -connect "$SOCK"
echo
echo "\$ kill -TERM \$(cat $PIDFILE)   # graceful stop: workers finish, socket removed"
kill -TERM "$(cat "$PIDFILE")"
for _ in $(seq 100); do [ -e "$SOCK" ] || break; sleep 0.1; done
if [ -e "$SOCK" ]; then echo "demo: socket still there after stop" >&2; exit 1; fi
echo "stopped; $SOCK removed"
