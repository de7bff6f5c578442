#!/usr/bin/env bash
# The shared tier's cost, on loopback: what a hit served from Redis (the
# key fresh to this instance) adds over a hit from this instance's memory,
# and how long a purge on one instance takes to reach another's memory.
#
#   cargo build --release && benches/shared.sh     # needs redis-server, python3, curl
#
# Env: KEYS (default 300) distinct objects of SIZE bytes (default 1024).
# Two instances (A fills, B is measured) on 127.0.0.1:18501/18502, admin
# 18511/18512, an origin on 18500, redis-server on a Unix socket; all
# stopped at exit. Latencies are curl's time_total for one keep-alive-less
# GET each (so they include a TCP connect); compare the two columns, not
# the absolute numbers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
keys=${KEYS:-300}
size=${SIZE:-1024}
bin=${LARDER_BIN:-target/release/larder}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/www"
head -c "$size" /dev/zero | tr '\0' 'x' >"$work/www/object"
for i in $(seq 1 "$keys"); do ln -s object "$work/www/o$i"; done
# Old files: python's http.server sends Last-Modified, and a day-old file
# is fresh for hours by the heuristic.
touch -h -d '1 day ago' "$work/www"/*

redis-server --port 0 --unixsocket "$work/redis.sock" --save '' --appendonly no --dir "$work" >/dev/null 2>&1 &
pids+=($!)
(cd "$work/www" && exec python3 -m http.server 18500 --bind 127.0.0.1 >/dev/null 2>&1) &
pids+=($!)
for n in 1 2; do
    cat >"$work/larder$n.yml" <<EOF
listen: 127.0.0.1:1850$n
log: { level: warn }
admin: { listen: 127.0.0.1:1851$n, token: bench-token }
shared: { url: 'redis+unix://$work/redis.sock', namespace: bench }
upstreams:
  origin: { servers: ["http://127.0.0.1:18500"] }
routes:
  - match: { path_prefix: / }
    upstream: origin
    cache: { enabled: true }
EOF
    "$bin" -c "$work/larder$n.yml" >"$work/larder$n.log" 2>&1 &
    pids+=($!)
done
for port in 18500 18501 18502; do
    for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/object" && break; sleep 0.1; done
done

get() { curl -s -o /dev/null -H 'Host: bench.test' -w '%{time_total}\n' "http://127.0.0.1:$1$2"; }
status() { curl -s -o /dev/null -D - -H 'Host: bench.test' "http://127.0.0.1:$1$2" | tr -d '\r' | grep -i '^cache-status' || true; }
quantiles() { sort -n | awk '{v[NR]=$1} END {printf "p50 %.3f ms  p99 %.3f ms  (n=%d)\n", v[int(NR*0.5)+1]*1000, v[int(NR*0.99)+1]*1000, NR}'; }

echo "== filling $keys objects of $size bytes through A"
for i in $(seq 1 "$keys"); do get 18501 "/o$i" >/dev/null; done
sleep 0.5   # the writes to Redis go behind the responses
echo "== B: first request per object (a hit from Redis)"
status 18502 /o1
for i in $(seq 2 "$keys"); do get 18502 "/o$i"; done | quantiles
echo "== B: second request per object (a hit from its memory)"
status 18502 /o1
for i in $(seq 2 "$keys"); do get 18502 "/o$i"; done | quantiles

echo "== purge on A, then B's copy (time until B no longer answers from its memory)"
for round in $(seq 1 20); do
    path="/o$round"
    get 18502 "$path" >/dev/null
    start=$(date +%s%N)
    curl -s -o /dev/null -H 'Authorization: Bearer bench-token' -X POST \
        -d "{\"url\": \"http://bench.test$path\"}" http://127.0.0.1:18511/purge
    while status 18502 "$path" | grep -q 'hit; ttl=[0-9-]*$'; do :; done
    echo "$(( ($(date +%s%N) - start) / 1000 ))e-6"
done | quantiles
echo "(each includes the purge request itself and one curl per poll)"
