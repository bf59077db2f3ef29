#!/usr/bin/env bash
# Make sure a Prometheus server binary is installed, for scaleq's signal tests (Debian's `prometheus` package).
#
#   scripts/prometheus.sh
#
# Idempotent: does nothing when `prometheus` is already on PATH. It starts nothing: each test starts its own
# Prometheus process with its own configuration (the scrape targets differ per test) and stops it afterwards.
# Debian's package starts no service here (no systemd); it also installs promtool.
set -euo pipefail

log() { echo "prometheus: $*" >&2; }

if command -v prometheus >/dev/null; then
  log "$(prometheus --version 2>&1 | head -n1)"
  exit 0
fi

log "installing Debian's prometheus package"
export DEBIAN_FRONTEND=noninteractive
apt-get update >&2
apt-get install -y --no-install-recommends prometheus >&2
command -v prometheus >/dev/null || { log "error: prometheus is still not on PATH after apt-get install"; exit 1; }
log "$(prometheus --version 2>&1 | head -n1)"
