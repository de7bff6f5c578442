#!/usr/bin/env bash
# The shared tier's cost, on loopback: what a hit served from Redis (the
# key fresh to this instance) adds over a hit from this instance's memory,
# how many origin requests two instances make for the same objects, and
# how long a purge on one instance takes to reach another's memory.
#
#   cargo build --release && benches/shared.sh     # needs redis-server, python3, curl, wrk
#
# Env: KEYS (default 300) distinct objects of SIZE bytes (default 1024).
# Three instances on 127.0.0.1:18501-18503 (admin 18511-18513): A fills,
# B is measured, C keeps nothing in memory (`max_object_size` below the
# objects), so every request it answers is a hit from Redis. An origin on
# 18500, redis-server on a Unix socket; all stopped at exit.
# The keep-alive latencies come from wrk (one connection, DURATION
# seconds, default 5); the per-object ones are curl's time_total for one
# keep-alive-less GET each (so they include a TCP connect). Compare
# columns of one run, not absolute numbers.
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
(cd "$work/www" && exec python3 -m http.server 18500 --bind 127.0.0.1 >/dev/null 2>"$work/origin.log") &
pids+=($!)
for n in 1 2 3; do
    local_cap=""
    if [ "$n" = 3 ]; then local_cap="cache: { max_object_size: $((size / 2)) }"; fi
    cat >"$work/larder$n.yml" <<EOF
listen: 127.0.0.1:1850$n
log: { level: warn }
admin: { listen: 127.0.0.1:1851$n, token: bench-token }
$local_cap
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
for port in 18500 18501 18502 18503; do
    for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/object" && break; sleep 0.1; done
done

get() { curl -s -o /dev/null -H 'Host: bench.test' -w '%{time_total}\n' "http://127.0.0.1:$1$2"; }
status() { curl -s -o /dev/null -D - -H 'Host: bench.test' "http://127.0.0.1:$1$2" | tr -d '\r' | grep -i '^cache-status' || true; }
quantiles() { sort -n | awk '{v[NR]=$1} END {printf "p50 %.3f ms  p99 %.3f ms  (n=%d)\n", v[int(NR*0.5)+1]*1000, v[int(NR*0.99)+1]*1000, NR}'; }

origin_requests() { grep -c '"GET /o[0-9]' "$work/origin.log" || true; }
duration=${DURATION:-5}
wrk_latency() {
    wrk -t1 -c1 -d"${duration}s" --latency -H 'Host: bench.test' "http://127.0.0.1:$1$2" |
        awk '/Requests\/sec/ {rps=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} END {printf "p50 %s  p99 %s  %s req/s\n", p50, p99, rps}'
}

echo "== filling $keys objects of $size bytes through A"
for i in $(seq 1 "$keys"); do get 18501 "/o$i" >/dev/null; done
sleep 0.5   # the writes to Redis go behind the responses

echo "== keep-alive, one connection: a hit from memory (A) vs a hit from Redis (C)"
status 18501 /o1
echo "A, memory: $(wrk_latency 18501 /o1)"
status 18503 /o1
echo "C, Redis:  $(wrk_latency 18503 /o1)"

echo "== B: first request per object (a hit from Redis)"
status 18502 /o1
for i in $(seq 2 "$keys"); do get 18502 "/o$i"; done | quantiles
echo "== B: second request per object (a hit from its memory)"
status 18502 /o1
for i in $(seq 2 "$keys"); do get 18502 "/o$i"; done | quantiles
echo "origin requests for $keys objects served by A, B and C: $(origin_requests)"

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

echo "== Redis frozen (SIGSTOP) under load on C, whose every request asks Redis"
redis_pid=${pids[0]}
kill -STOP "$redis_pid"
wrk -t1 -c10 -d"${duration}s" --latency -H 'Host: bench.test' "http://127.0.0.1:18503/o1" |
    awk '/Requests\/sec/ {rps=$2} /^ +99%/ {p99=$2} /^ +Latency +[0-9]/ {max=$4} /Non-2xx/ {bad=$5} END {printf "p99 %s  max %s  %s req/s  non-2xx: %d\n", p99, max, rps, bad}'
kill -CONT "$redis_pid"
echo "(the first calls wait out read_timeout, 50 ms; then the circuit opens and requests skip Redis)"
