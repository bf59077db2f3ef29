#!/usr/bin/env bash
# Make sure the validators the tests run on generated boot files are installed: cloud-init's schema check
# (`cloud-init schema --config-file F`, Debian's cloud-init package) for the GCP workers' user-data, and
# `systemd-analyze verify` (Debian's systemd package) for their systemd unit.
#
#   scripts/validators.sh
#
# Idempotent: does nothing when both commands are there. Neither needs a running init system: the tests run
# `systemd-analyze verify --root=<temp dir> --man=no --generators=no` on a unit in a throwaway root.
set -euo pipefail

log() { echo "validators: $*" >&2; }

missing=()
command -v cloud-init >/dev/null || missing+=(cloud-init)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian's ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >&2
  apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
for cmd in cloud-init systemd-analyze; do
  command -v "$cmd" >/dev/null || { log "error: $cmd is still missing after apt-get install"; exit 1; }
done
log "$(cloud-init --version 2>&1 | head -n1); $(systemd-analyze --version | head -n1)"
