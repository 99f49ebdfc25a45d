#!/usr/bin/env bash
# Installs the external tools that `make test` drives: promtool (from Debian's prometheus
# package, unpacked into .tools/ without installing the server) and systemd-analyze.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools/bin
apt_updated=0
apt_update() { [ "$apt_updated" = 1 ] || { apt-get update -qq >/dev/null; apt_updated=1; }; }
if ! [ -x .tools/bin/promtool ]; then
  work=$(mktemp -d)
  ( cd "$work" && { apt-get download prometheus >/dev/null 2>&1 || { apt_update; apt-get download prometheus >/dev/null; }; } )
  dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
  cp "$work/x/usr/bin/promtool" .tools/bin/promtool
  rm -rf "$work"
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
.tools/bin/promtool --version 2>&1 | head -1
systemd-analyze --version | head -1
