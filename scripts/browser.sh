#!/usr/bin/env bash
# Make sure a headless browser is installed for the dashboard's end-to-end tests: Debian's `chromium` package.
#
#   scripts/browser.sh
#
# Idempotent: does nothing when /usr/bin/chromium is already there. Playwright's Python package (a dev dependency)
# drives this browser through `executable_path="/usr/bin/chromium"`; it never downloads a browser of its own (it
# could not here: nothing outside the package registries is reachable). Harmless stderr when chromium runs: dbus
# errors and a `[: ... unexpected operator` line from Debian's wrapper script.
set -euo pipefail

log() { echo "browser: $*" >&2; }

if [ -x /usr/bin/chromium ]; then
  log "$(/usr/bin/chromium --version 2>/dev/null | head -n1)"
  exit 0
fi

log "installing Debian's chromium package"
export DEBIAN_FRONTEND=noninteractive
apt-get update >&2
apt-get install -y --no-install-recommends chromium >&2
[ -x /usr/bin/chromium ] || { log "error: /usr/bin/chromium is still missing after apt-get install"; exit 1; }
log "$(/usr/bin/chromium --version 2>/dev/null | head -n1)"
