#!/usr/bin/env bash
# Build the scaleq worker image (the image the docker provider runs workers from), locally: there is no registry.
#
#   scripts/worker-image.sh [--image NAME] [--force]      # default NAME: scaleq/worker:latest
#
# Needs a Docker Engine (DOCKER_HOST exported by the caller; scripts/docker-engine.sh starts a private one) and root
# for the one-off base image. Idempotent and cheap when nothing changed: the image carries a label with a hash of
# src/, pyproject.toml, docker/worker.Dockerfile and this script, and is rebuilt only when that hash changes.
#
#   1. base image scaleq-test/python:bookworm (once): debootstrap of Debian bookworm with python3 and python3-venv
#      from this machine's apt mirror, imported into the engine (~40 s; apt-get installs debootstrap if missing);
#   2. a wheelhouse built on the host: scaleq's dependencies (cached in .tmp/worker-image/ per pyproject.toml) and
#      the scaleq wheel of the current source (built from a copy, so the work tree stays clean);
#   3. docker build of docker/worker.Dockerfile with no network: pip installs from the wheelhouse into /opt/scaleq.
#
# Progress goes to stderr; the only line on stdout is the image name.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

IMAGE=scaleq/worker:latest
BASE=scaleq-test/python:bookworm
BASE_REV=1 # bump when the base recipe below changes, so existing engines rebuild it
force=false
while [[ $# -gt 0 ]]; do
  case $1 in
    --image) IMAGE=${2:?--image needs a name}; shift 2 ;;
    --force) force=true; shift ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) echo "usage: $0 [--image NAME] [--force]" >&2; exit 2 ;;
  esac
done

started=$(date +%s.%N)
log() { echo "worker-image: $*" >&2; }
die() { log "error: $*"; exit 1; }
elapsed() { awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

command -v docker >/dev/null || die "no docker CLI: run scripts/docker-engine.sh (it installs docker.io and starts an engine)"
docker version >/dev/null 2>&1 || die "cannot reach a Docker Engine at DOCKER_HOST=${DOCKER_HOST:-(unset: the default socket)}: \
start one with eval \"\$(scripts/docker-engine.sh | tail -n1)\" and run this again"

cache=$root/.tmp/worker-image
mkdir -p "$cache"
exec 9>"$cache/.lock" # one build at a time (parallel test runners)
flock 9

# What the image is built from; a change to any of it means a rebuild.
source_hash=$(
  {
    find src -type f ! -name '*.pyc' ! -path '*/__pycache__/*' ! -path '*.egg-info/*' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum
    sha256sum pyproject.toml docker/worker.Dockerfile scripts/worker-image.sh
  } | sha256sum | cut -c1-16
)
label() { docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }
if ! $force && [[ "$(label "$IMAGE" scaleq.source-hash)" == "$source_hash" ]]; then
  log "$IMAGE is up to date (source $source_hash)"
  echo "$IMAGE"
  exit 0
fi
log "building $IMAGE (source $source_hash)"

work=$(mktemp -d /tmp/scaleq-worker-image.XXXXXX)
trap 'rm -rf "$work"' EXIT

# 1. The base image.
if [[ "$(label "$BASE" scaleq.base-rev)" != "$BASE_REV" ]]; then
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y --no-install-recommends debootstrap >&2
  fi
  # The machine's own Debian mirror (deb822 or one-line sources), else the public one.
  mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
  [[ -n "$mirror" ]] || mirror=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [[ -n "$mirror" ]] || mirror=http://deb.debian.org/debian
  log "debootstrap bookworm from $mirror (about 40 s; log in $work/debootstrap.log)"
  t0=$(date +%s)
  if ! debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/rootfs" "$mirror" \
      >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    die "debootstrap failed (see above)"
  fi
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' \
    --change "LABEL scaleq.base-rev=$BASE_REV" - "$BASE" >/dev/null
  rm -rf "$work/rootfs"
  log "base image $BASE made in $(($(date +%s) - t0)) s"
else
  log "base image $BASE present"
fi

# 2. The wheelhouse, built from a copy of the source (pip/setuptools write build/ and *.egg-info next to it).
if [[ -x .venv/bin/pip ]]; then pip=(.venv/bin/pip); else pip=(python3 -m pip); fi
"${pip[@]}" --version >/dev/null 2>&1 || die "no pip: run scripts/setup first, or apt-get install python3-pip"
mkdir -p "$work/src"
tar -c --exclude='__pycache__' --exclude='*.egg-info' --exclude='*.pyc' pyproject.toml README.md src | tar -x -C "$work/src"
deps=$cache/deps-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f "$deps/.complete" ]]; then
  log "building the dependency wheels (cached in $deps)"
  rm -rf "$cache"/deps-*
  "${pip[@]}" wheel --quiet --disable-pip-version-check -w "$deps" "$work/src" >&2
  rm -f "$deps"/scaleq-*.whl
  touch "$deps/.complete"
fi
mkdir -p "$work/context/wheels/scaleq" "$work/context/wheels/deps"
"${pip[@]}" wheel --quiet --disable-pip-version-check --no-deps -w "$work/context/wheels/scaleq" "$work/src" >&2
cp "$deps"/*.whl "$work/context/wheels/deps/"
cp docker/worker.Dockerfile "$work/context/Dockerfile"

# 3. The image (the legacy builder: BuildKit is not part of Debian's engine; no network inside the build).
log "docker build"
if ! DOCKER_BUILDKIT=0 docker build --network=none --build-arg "SOURCE_HASH=$source_hash" -t "$IMAGE" \
    "$work/context" >"$work/build.log" 2>&1; then
  tail -n 30 "$work/build.log" >&2
  die "docker build failed (see above)"
fi
# the previous build of this image, now untagged
docker image prune -f --filter label=scaleq.image=worker >/dev/null 2>&1 || true
log "built $IMAGE in $(elapsed) s"
echo "$IMAGE"
