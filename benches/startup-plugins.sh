#!/usr/bin/env bash
# Startup time with N precompiled plugins: milliseconds from exec to the admin
# /health answering. N distinct copies of add_headers.wasm (a custom section
# makes each hash differ) are compiled on the first start and loaded from the
# artifact cache on the next ones.
#   cargo build --release && cargo build --release --manifest-path plugins/Cargo.toml --target wasm32-wasip2
#   benches/startup-plugins.sh            (N=10 RUNS=5 by default)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n="${N:-10}" runs="${RUNS:-5}" bin="${LARDER_BIN:-target/release/larder}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work" "$n" <<'PY'
import sys
work, n = sys.argv[1], int(sys.argv[2])
src = open("plugins/target/wasm32-wasip2/release/add_headers.wasm", "rb").read()
def leb(v):
    out = b""
    while True:
        byte, v = v & 0x7F, v >> 7
        out += bytes([byte | (0x80 if v else 0)])
        if not v:
            return out
for i in range(1, n + 1):
    name, data = b"larder-bench", b"copy-%d" % i
    payload = leb(len(name)) + name + data
    open(f"{work}/p{i}.wasm", "wb").write(src + b"\x00" + leb(len(payload)) + payload)
PY
{
  echo "listen: 127.0.0.1:18198"
  echo "log: { level: warn }"
  echo "admin: { listen: 127.0.0.1:18199, token: bench }"
  echo "plugins:"
  for i in $(seq 1 "$n"); do echo "  p$i: { path: $work/p$i.wasm, config: { set: 'x-p$i: $i' } }"; done
} > "$work/larder.yml"
start_once() {
  local t0 pid
  t0=$(date +%s%N)
  "$bin" -c "$work/larder.yml" > "$work/larder.log" 2>&1 &
  pid=$!
  until curl -sf -o /dev/null http://127.0.0.1:18199/health; do sleep 0.005; done
  echo "$(( ($(date +%s%N) - t0) / 1000000 )) ms"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
echo "first start (compiles $n plugins unless cached): $(start_once)"
for _ in $(seq 1 "$runs"); do echo "precompiled: $(start_once)"; done
