#!/usr/bin/env bash
# Make sure Debian's PostgreSQL server binaries are installed (the tests start their own throw-away clusters
# with initdb/pg_ctl; nothing is started here). Prints the bin directory.
set -euo pipefail
find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }
bin=$(find_bin)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  echo "postgres.sh: installing postgresql" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
  bin=$(find_bin)
fi
[ -x "$bin/initdb" ] || { echo "postgres.sh: initdb not found after install" >&2; exit 1; }
id postgres >/dev/null 2>&1 || { echo "postgres.sh: no postgres system user" >&2; exit 1; }
echo "$bin"
