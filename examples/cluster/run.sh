#!/usr/bin/env bash
# Two Larder instances sharing one cache through Redis, on loopback:
# a miss on one becomes a hit on the other, a purge on one reaches both,
# and a source is fetched once per tick for both.
#
#   cargo build --release && examples/cluster/run.sh
#
# Needs redis-server and python3. Starts redis-server on a Unix socket, an
# origin (python3 -m http.server on this directory, whose responses carry
# Last-Modified and so are cacheable by heuristic) and the two instances on
# ports 18401 and 18402 (admin 18411, 18412); stops them all at exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bin=${LARDER_BIN:-../../target/release/larder}
dir=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT

redis-server --port 0 --unixsocket "$dir/redis.sock" --save '' --appendonly no --dir "$dir" >"$dir/redis.log" 2>&1 &
pids+=($!)
python3 -m http.server 18400 --bind 127.0.0.1 >"$dir/origin.log" 2>&1 &
pids+=($!)
for n in 1 2; do
    sed -e "s|@PORT@|1840$n|" -e "s|@ADMIN_PORT@|1841$n|" -e "s|@DIR@|$dir|" -e "s|@ORIGIN_PORT@|18400|" \
        larder.yml.in >"$dir/larder$n.yml"
    "$bin" -c "$dir/larder$n.yml" >"$dir/larder$n.log" 2>&1 &
    pids+=($!)
done
for port in 18400 18401 18402; do
    for _ in $(seq 1 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
done

status() { curl -s -o /dev/null -D - -H 'Host: example.test' "http://127.0.0.1:$1/run.sh" | grep -i '^cache-status' || true; }
echo "first instance, first request (a miss, filled from the origin):"; status 18401
sleep 0.2   # the write to Redis goes behind the response
echo "second instance (a hit from the shared tier, no origin request):"; status 18402
echo "second instance again (a local hit):";                          status 18402
echo "purge on the first instance:"
curl -s -H 'Authorization: Bearer example-token' -X POST \
    -d '{"url": "http://example.test/run.sh"}' http://127.0.0.1:18411/purge; echo
echo "first instance after the purge (from the origin again):";       status 18401
sleep 0.2   # the purge reaches the second instance by pub/sub
echo "second instance after the purge (its own copy is gone: it takes the first instance's new one from Redis):"; status 18402
echo
echo "a source on '*/5 * * * * *', after 12 s: who fetched it, and how often the origin was asked"
sleep 12
for admin in 18411 18412; do
    curl -s -H 'Authorization: Bearer example-token' "http://127.0.0.1:$admin/sources" |
        python3 -c 'import json,sys; s=json.load(sys.stdin); r=s["sources"][0]; print("  instance", s["instance"] + ": value fetched by", r["fetched_by"] + ", etag", r["etag"])'
done
echo "  origin requests for it: $(grep -c 'GET /larder.yml.in' "$dir/origin.log") (one per tick for both instances)"
echo
echo "Instances on :18401 and :18402 (admin :18411, :18412, token example-token)."
echo "Logs in $dir. Press Enter to stop."
read -r _
