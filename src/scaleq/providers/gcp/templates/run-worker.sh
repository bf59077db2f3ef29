#!/bin/bash
# Runs one scaleq worker container; started by scaleq-worker.service. The settings are the files cloud-init wrote
# in /etc/scaleq; the token and the worker id (the instance name) come from the metadata server. Job containers
# are kept away from the metadata server (the VM's credentials, this token).
set -euo pipefail
conf=/etc/scaleq
md() {
  curl -sf --retry 5 -H 'Metadata-Flavor: Google' \
    "http://metadata.google.internal/computeMetadata/v1/instance/$1"
}
image=$(cat "$conf/image")
port=$(cat "$conf/metrics-port")
mapfile -t args < "$conf/worker.args"
mapfile -t opts < "$conf/docker.opts"
# Container-Optimized OS drops inbound traffic: let health checks and scrapes reach /metrics
allow=(INPUT -p tcp --dport "$port" -j ACCEPT)
iptables -w -C "${allow[@]}" 2>/dev/null || iptables -w -A "${allow[@]}"
# jobs in containers may not reach the metadata server
block=(DOCKER-USER -d 169.254.169.254/32 -j DROP)
iptables -w -C "${block[@]}" 2>/dev/null || iptables -w -I "${block[@]}"
registry="${image%%/*}"
case "$registry" in *.pkg.dev|*gcr.io) docker-credential-gcr configure-docker --registries="$registry" ;; esac
worker_id=$(md name)
install -d -m 0700 /run/scaleq
(umask 077; printf 'SCALEQ_TOKEN=%s\n' "$(md attributes/scaleq-token)" > /run/scaleq/token.env)
docker rm -f scaleq-worker >/dev/null 2>&1 || true
exec docker run --rm --name scaleq-worker --network host "${opts[@]}" \
  --env-file "$conf/worker.env" --env-file /run/scaleq/token.env \
  "$image" scaleq "${args[@]}" --worker-id "$worker_id"
