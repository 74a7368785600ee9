#!/usr/bin/env bash
# Fuzz fcgispawn.protocol with atheris for a bounded time: bash fuzz/run.sh [SECONDS] (default 60).
# Not run by CI. Installs atheris into the venv when it is missing. The corpus lives in a
# temporary directory (seeded with valid streams) unless FUZZ_CORPUS names one to keep.
# -rss_limit_mb turns unbounded memory growth into a crash, so "memory bounded" is checked too.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FCGISPAWN_VENV:-.venv}
SECS=${1:-60}
case "$SECS" in ''|*[!0-9]*) echo "run.sh: SECONDS must be a whole number, not '$SECS'" >&2; exit 2;; esac

if [ ! -x "$VENV/bin/python" ]; then bash scripts/setup.sh; fi
if ! "$VENV/bin/python" -c 'import atheris' 2>/dev/null; then
  echo "run.sh: installing atheris into $VENV"
  "$VENV/bin/pip" install -q atheris
fi

corpus=${FUZZ_CORPUS:-}
if [ -z "$corpus" ]; then
  corpus=$(mktemp -d /tmp/fcgispawn-fuzz.XXXXXX)
  trap 'rm -rf "$corpus"' EXIT
fi
"$VENV/bin/python" fuzz/fuzz_protocol.py --seed "$corpus"
"$VENV/bin/python" fuzz/fuzz_protocol.py -max_total_time="$SECS" -rss_limit_mb=512 \
  -max_len=70000 -timeout=10 "$corpus"
