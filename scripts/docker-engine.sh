#!/usr/bin/env bash
# Start (or find) a private Docker Engine for scaleq's tests and dev work, and print how to reach it.
#
#   eval "$(scripts/docker-engine.sh [STATE_DIR] | tail -n1)"    # start if needed; exports DOCKER_HOST
#   scripts/docker-engine.sh --stop [STATE_DIR]                   # stop the dockerd this script started
#
# STATE_DIR defaults to $PWD/.tmp/docker. Idempotent: a daemon already answering on the state dir's socket is
# reused. The last line on stdout is always `export DOCKER_HOST=unix://…`; everything else goes to stderr.
#
# Unix socket paths are limited to ~107 bytes, and dockerd/containerd put sockets under the exec root, so the
# sockets, exec root and pidfile live in a "run dir": STATE_DIR/run itself when the path is short, otherwise a
# symlink STATE_DIR/run -> /tmp/scaleq-dockerd-<hash of STATE_DIR> (deterministic, so repeated calls find the
# same daemon). Images and containers live in STATE_DIR/data.
set -euo pipefail

IMAGE=scaleq-test/busybox:latest
IMAGE_REV=1 # bump when the image recipe below changes, so existing engines rebuild it
APPLETS="sh echo sleep cat ls env true false mkdir rm cp mv head tail wc id hostname ps date yes dd grep sed
  tr touch test [ printf kill pwd seq stat chmod find xargs cut sort uniq md5sum sha256sum readlink uname"

log() { echo "docker-engine: $*" >&2; }
die() { log "error: $*"; exit 1; }

stop=false
if [[ "${1:-}" == "--stop" ]]; then stop=true; shift; fi
[[ $# -le 1 ]] || die "usage: $0 [--stop] [STATE_DIR]"
state=${1:-$PWD/.tmp/docker}
mkdir -p "$state"
state=$(cd "$state" && pwd -P)
exec 9>"$state/.lock"  # one invocation at a time per state dir (parallel test runners)
flock 9

# The run dir: short enough for containerd's sockets (exec-root/containerd/containerd-debug.sock and friends).
if (( ${#state} <= 60 )); then
  run=$state/run
  mkdir -p "$run"
else
  run=$state/run
  short=/tmp/scaleq-dockerd-$(printf %s "$state" | sha256sum | cut -c1-16)
  mkdir -p "$short"
  if [[ ! -L "$run" || "$(readlink "$run")" != "$short" ]]; then
    rm -rf "$run"
    ln -s "$short" "$run"
  fi
  run=$short
fi
sock=$run/docker.sock
pidfile=$run/dockerd.pid
export DOCKER_HOST=unix://$sock

ping() { curl -sf --max-time 2 --unix-socket "$sock" http://d/_ping 2>/dev/null | grep -q OK; }
# A live process by pid file (a zombie is not: here nobody may reap a daemon whose parent is gone).
alive_pid() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
alive() { alive_pid "$(cat "$1" 2>/dev/null)"; }
stop_pid() {  # TERM, up to 30 s, then KILL
  local pid
  pid=$(cat "$1")
  log "stopping $2 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do alive "$1" || return 0; sleep 0.2; done
  log "$2 did not stop in 30 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

# What a crashed dockerd leaves behind: its containerd, or that containerd's stale pidfile (a new dockerd then
# times out waiting for containerd: seen after `kill -9`), and mounts under the state dir.
leftovers() {
  if alive "$run/exec/containerd/containerd.pid"; then stop_pid "$run/exec/containerd/containerd.pid" containerd; fi
  rm -f "$run/exec/containerd/containerd.pid"
  awk -v p="$state/" 'index($2, p) == 1 {print $2}' /proc/mounts 2>/dev/null | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  rm -f "$pidfile" "$sock"
}

if $stop; then
  if alive "$pidfile"; then stop_pid "$pidfile" dockerd; else log "no dockerd running for $state"; fi
  leftovers
  exit 0
fi

# (a) the engine and busybox (for the test image), from Debian.
static_busybox() { [[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1; }  # ldd fails on static
if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null || ! static_busybox \
   || ! command -v curl >/dev/null; then
  log "installing docker.io, busybox-static and curl"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >&2
  apt-get install -y --no-install-recommends docker.io busybox-static curl >&2
fi

# (b) the daemon, unless one already answers on this socket.
if ping; then
  log "dockerd already running on $sock"
else
  if alive "$pidfile"; then
    daemon=$(cat "$pidfile")
    log "dockerd (pid $daemon) is running but does not answer yet; waiting"
  else
    leftovers
    mkdir -p "$state/data" "$run/exec"
    log "starting dockerd (state in $state)"
    # setsid + nohup: the daemon outlives this script and the shell that called it.
    setsid nohup dockerd --host="unix://$sock" --data-root="$state/data" --exec-root="$run/exec" \
      --pidfile="$pidfile" --bridge=none --iptables=false --ip6tables=false \
      >"$state/dockerd.log" 2>&1 </dev/null 9>&- &
    daemon=$!
  fi
  for _ in $(seq 1 300); do  # up to 60 s; usually ~0.5 s
    ping && break
    alive_pid "$daemon" || { tail -n 20 "$state/dockerd.log" >&2; die "dockerd exited; see $state/dockerd.log"; }
    sleep 0.2
  done
  ping || { tail -n 20 "$state/dockerd.log" >&2; die "dockerd did not answer within 60 s"; }
  log "dockerd up (pid $(cat "$pidfile"))"
fi

# (c) the test image, built from the host's static busybox (there is no registry to pull from).
have_rev=$(docker image inspect -f '{{ index .Config.Labels "scaleq.test-image-rev" }}' "$IMAGE" 2>/dev/null || true)
if [[ "$have_rev" != "$IMAGE_REV" ]]; then
  static_busybox || die "/bin/busybox is not statically linked; apt-get install busybox-static"
  log "building $IMAGE"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root"/{bin,tmp,etc,proc,sys,dev,root}
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for a in $APPLETS; do ln -sf busybox "$root/bin/$a"; done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
  echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >>"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
  tar -C "$root" -c . | docker import --change "LABEL scaleq.test-image-rev=$IMAGE_REV" \
    --change 'ENV PATH=/bin' - "$IMAGE" >&2
fi

echo "export DOCKER_HOST=unix://$sock"
