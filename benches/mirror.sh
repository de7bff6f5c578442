#!/usr/bin/env bash
# What a mirrored source costs, on loopback: serving it against serving a
# file source with the very same bytes (wrk, keep-alive), how long a put
# in etcd takes to reach a client waiting for the next change (over PUTS
# puts), and the CPU Larder uses while nothing changes.
#
#   cargo build --release && benches/mirror.sh      # needs etcd, python3, wrk
#
# Env: KEYS (default 40) keys of VALUE_SIZE bytes (default 16) below the
# prefix, which makes a value of about 1 KiB; PUTS (default 1000);
# CONNS (default 50) and DURATION (seconds, default 5) for wrk; IDLE
# (seconds, default 10) for the idle CPU reading. etcd on 127.0.0.1:18600,
# Larder on 18601; both stopped at exit. Compare columns of one run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
keys=${KEYS:-40}
value_size=${VALUE_SIZE:-16}
puts=${PUTS:-1000}
conns=${CONNS:-50}
duration=${DURATION:-5}
idle=${IDLE:-10}
bin=${LARDER_BIN:-target/release/larder}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

etcd --name bench --data-dir "$work/etcd" --logger zap --log-level error \
    --listen-client-urls http://127.0.0.1:18600 --advertise-client-urls http://127.0.0.1:18600 \
    --listen-peer-urls http://127.0.0.1:18602 --initial-advertise-peer-urls http://127.0.0.1:18602 \
    --initial-cluster bench=http://127.0.0.1:18602 >/dev/null 2>&1 &
pids+=($!)

# etcd's JSON gateway: keys and values are base64.
python3 - "$keys" "$value_size" "$work/same-bytes" <<'EOF'
import base64, json, sys, time, urllib.request
keys, size, same = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def put(key, value):
    body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                       "value": base64.b64encode(value.encode()).decode()}).encode()
    urllib.request.urlopen("http://127.0.0.1:18600/v3/kv/put", body, timeout=5).read()
for attempt in range(100):
    try:
        put("/probe", "x"); break
    except OSError:
        time.sleep(0.1)
values = {f"key{i:04}": "v" * size for i in range(keys)}
for key, value in values.items():
    put("/bench/" + key, value)
# The mirror's value, byte for byte, for the file source to serve.
with open(same, "w") as f:
    f.write(json.dumps(values, separators=(",", ":"), sort_keys=True))
EOF

cat >"$work/larder.yml" <<EOF
listen: 127.0.0.1:18601
log: { level: warn }
routes:
  - match: { path_prefix: /mirror }
    source: mirror
  - match: { path_prefix: /file }
    source: file
sources:
  mirror:
    etcd: { endpoints: ['127.0.0.1:18600'], prefix: /bench/ }
  file:
    rule: '@every 1h'
    file: { path: '$work/same-bytes' }
EOF
"$bin" -c "$work/larder.yml" >"$work/larder.log" 2>&1 &
larder=$!
pids+=($larder)
for _ in $(seq 1 100); do
    cmp -s <(curl -s http://127.0.0.1:18601/mirror) "$work/same-bytes" && break
    sleep 0.1
done
cmp <(curl -s http://127.0.0.1:18601/mirror) <(curl -s http://127.0.0.1:18601/file) ||
    { echo "the two sources do not serve the same bytes" >&2; exit 1; }
echo "value: $(wc -c <"$work/same-bytes") bytes, $keys keys"
echo
echo "== serving, wrk -t1 -c$conns -d${duration}s (keep-alive)"
printf '%-8s %10s %10s %10s\n' source req/s p50 p99
for path in mirror file; do
    out=$(wrk -t1 -c"$conns" -d"${duration}s" --latency "http://127.0.0.1:18601/$path")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    printf '%-8s %10s %10s %10s\n' "$path" "$rps" "$p50" "$p99"
done
echo
echo "== change to visible: $puts puts, each answered to a client waiting on the previous version"
python3 - "$puts" <<'EOF'
import base64, json, sys, threading, time, urllib.request
puts = int(sys.argv[1])
def put(key, value):
    body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                       "value": base64.b64encode(value.encode()).decode()}).encode()
    urllib.request.urlopen("http://127.0.0.1:18600/v3/kv/put", body, timeout=5).read()
def etag():
    with urllib.request.urlopen("http://127.0.0.1:18601/mirror/key0000", timeout=5) as r:
        return r.headers["ETag"].strip('"')
latencies = []
version = etag()
for i in range(puts):
    answered = {}
    def wait():
        url = f"http://127.0.0.1:18601/mirror/key0000?version={version}&wait=10s"
        with urllib.request.urlopen(url, timeout=15) as r:
            answered["at"] = time.perf_counter()
            answered["etag"] = r.headers["ETag"].strip('"')
    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.002)  # let the waiter's request reach Larder (a bench, not a test)
    start = time.perf_counter()
    put("/bench/key0000", f"change {i}")
    waiter.join()
    latencies.append((answered["at"] - start) * 1000)
    version = answered["etag"]
latencies.sort()
pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
print(f"put -> waiting client answered: p50 {pick(0.50):.2f} ms, p99 {pick(0.99):.2f} ms, max {latencies[-1]:.2f} ms")
print("(includes the put's own round trip through etcd's JSON gateway and python's HTTP client)")
EOF
echo
echo "== CPU while nothing changes (${idle}s)"
ticks() { awk '{print $14 + $15}' "/proc/$larder/stat"; }
before=$(ticks)
sleep "$idle"
after=$(ticks)
hz=$(getconf CLK_TCK)
python3 -c "print(f'larder used {($after - $before) * 1000 / $hz / $idle:.2f} ms of CPU per second')"
