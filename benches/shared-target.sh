#!/usr/bin/env bash
# Larder with a shared tier, as ../shared/bench's generic target: starts a
# redis-server of its own on a Unix socket, then becomes Larder (the harness
# stops both by their process group). Compares local hits with `shared:`
# against the plain `larder` row of the same run:
#
#   LARDER_BIN=target/release/larder TARGET_NAME=larder-shared TARGET_PORT=18095 \
#   TARGET_CMD='benches/shared-target.sh' ../shared/bench/run.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=$(mktemp -d)
redis-server --port 0 --unixsocket "$dir/redis.sock" --save '' --appendonly no --dir "$dir" >/dev/null 2>&1 &
for _ in $(seq 1 100); do [ -S "$dir/redis.sock" ] && break; sleep 0.05; done
cat >"$dir/larder.yml" <<YML
listen: 127.0.0.1:${TARGET_PORT}
log: { level: warn }
cache:
  max_size: 1GiB
  max_object_size: 8MiB
shared: { url: 'redis+unix://$dir/redis.sock', namespace: bench }
upstreams:
  origin:
    servers: ["http://127.0.0.1:${ORIGIN_PORT}"]
routes:
  - match: { path_prefix: / }
    upstream: origin
    cache: { enabled: true }
YML
exec "${LARDER_BIN:-target/release/larder}" -c "$dir/larder.yml"
