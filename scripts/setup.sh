#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine, as root: the Debian packages the demo and the
# test suite start for real, a venv made with Debian's python3 (world-readable, so Apache's
# www-data can run it under mod_fcgid), and the package itself in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  python3 python3-venv python3-dev gcc make pkg-config libsystemd-dev
  nginx-light lighttpd apache2 libapache2-mod-fcgid php-cgi haproxy
  libfcgi-bin libfcgi-dev spawn-fcgi systemd
  mandoc groff-base iproute2 procps curl wrk strace
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

VENV=${FCGISPAWN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  # pip's build chatter hides what matters; keep it in a log and show it only on failure.
  if ! "$VENV/bin/pip" install -q -e '.[test]' >"$VENV/pip-install.log" 2>&1; then
    cat "$VENV/pip-install.log" >&2
    echo "setup: pip install failed (log above)" >&2
    exit 1
  fi
  touch "$stamp"
fi
