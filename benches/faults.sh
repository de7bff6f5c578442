#!/usr/bin/env bash
# Faults under load: a plugin-free route's latency before and while six
# routes with misbehaving plugins take ~900 concurrent connections, Larder's
# resident memory meanwhile, and the plugins' state afterwards.
#
#   cargo build --release && (cd plugins && cargo build --release)
#   benches/faults.sh                    # needs nginx (origin) and wrk
#
# Env: DURATION (s, default 15), CLEAN_CONNECTIONS (default 100),
# FAULT_CONNECTIONS per faulty route (default 150), PORT_BASE (default 18300).
# Everything listens on 127.0.0.1 and is stopped by PID at exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
duration=${DURATION:-15}
clean_connections=${CLEAN_CONNECTIONS:-100}
fault_connections=${FAULT_CONNECTIONS:-150}
base=${PORT_BASE:-18300}
origin_port=$base proxy_port=$((base + 1)) admin_port=$((base + 2))
bin=${LARDER_BIN:-target/release/larder}
wasm=plugins/target/wasm32-wasip2/release
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

chmod 755 "$work"
mkdir -p "$work/www" "$work/tmp"
head -c 1024 /dev/zero | tr '\0' x > "$work/www/1k.bin"
cat > "$work/nginx.conf" <<EOF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work/tmp;
  proxy_temp_path $work/tmp;
  fastcgi_temp_path $work/tmp;
  uwsgi_temp_path $work/tmp;
  scgi_temp_path $work/tmp;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$origin_port backlog=4096; root $work/www;
           location / { try_files /1k.bin =404; } }
}
EOF
nginx -c "$work/nginx.conf" -g 'daemon on;'

# CONTROL=1: the same six routes without plugins, for the same load's
# baseline (how much of the slowdown is the load itself).
route() { # path plugin
  if [ "${CONTROL:-0}" = 1 ]; then
    printf '  - { match: { path_prefix: /%s }, upstream: app }\n' "$1"
  else
    printf '  - { match: { path_prefix: /%s }, upstream: app, plugins: [%s] }\n' "$1" "$2"
  fi
}
plugin() { # name file extra
  printf '  %s: { path: %s/%s.wasm, %s }\n' "$1" "$wasm" "$2" "$3"
}
{
  echo "listen: 127.0.0.1:$proxy_port"
  echo "log: { level: error, access_log: false }"
  echo "admin: { listen: 127.0.0.1:$admin_port, token: bench }"
  echo "plugin_limits: { total_memory: 1GiB }"
  echo "upstreams:"
  echo "  app: { servers: [\"http://127.0.0.1:$origin_port\"] }"
  echo "routes:"
  route loop loop
  route eat eat
  route panic panic
  route sleep sleep
  route bomb bomb
  route status status
  echo "  - { match: { path_prefix: /clean }, upstream: app }"
  echo "plugins:"
  plugin loop spin_forever "limits: { timeout: 50ms }"
  plugin eat eat_memory "config: { mib: '64' }, limits: { memory: 32MiB }"
  plugin panic panic "config: { when: request }"
  plugin sleep misbehave "config: { do: sleep, ms: '300' }, limits: { timeout: 50ms, concurrency: 64, queue_timeout: 200ms }"
  plugin bomb misbehave "config: { do: header-bomb, when: response }"
  plugin status misbehave "config: { do: bad-status, when: response }"
} > "$work/larder.yml"

"$bin" -c "$work/larder.yml" > "$work/larder.log" 2>&1 &
larder=$!
pids+=("$larder")
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$proxy_port/clean" > /dev/null 2>&1 && break
  sleep 0.1
done

p99() { awk '/ 99%/ { print $2 }' "$1"; }
requests() { awk '/requests in/ { print $1 }' "$1"; }
non2xx() { awk '/Non-2xx/ { n = $5 } END { print n + 0 }' "$1"; }
rss_kib() { awk '/VmRSS/ { print $2 }' "/proc/$larder/status"; }

echo "== baseline: /clean alone, $clean_connections connections, ${duration}s"
wrk -t2 -c"$clean_connections" -d"${duration}s" --latency "http://127.0.0.1:$proxy_port/clean" > "$work/clean-before.txt"
echo "   requests $(requests "$work/clean-before.txt"), non-2xx $(non2xx "$work/clean-before.txt"), p99 $(p99 "$work/clean-before.txt"), RSS $(rss_kib) KiB"

echo "== faults: 6 routes x $fault_connections connections, /clean again meanwhile"
for path in ${ROUTES:-loop eat panic sleep bomb status}; do
  wrk -t1 -c"$fault_connections" -d"$((duration + 2))s" "http://127.0.0.1:$proxy_port/$path" > "$work/fault-$path.txt" &
  pids+=("$!")
done
( for _ in $(seq 1 $((duration + 2))); do rss_kib; sleep 1; done ) > "$work/rss.txt" &
pids+=("$!")
sleep 1
wrk -t2 -c"$clean_connections" -d"${duration}s" --latency "http://127.0.0.1:$proxy_port/clean" > "$work/clean-during.txt"
wait "${pids[@]:1}" 2>/dev/null || true
peak=$(sort -n "$work/rss.txt" | tail -1)
echo "   /clean: requests $(requests "$work/clean-during.txt"), non-2xx $(non2xx "$work/clean-during.txt"), p99 $(p99 "$work/clean-during.txt")"
for path in ${ROUTES:-loop eat panic sleep bomb status}; do
  echo "   /$path: requests $(requests "$work/fault-$path.txt"), non-2xx $(non2xx "$work/fault-$path.txt")"
done
echo "   Larder RSS peak ${peak} KiB (plugin_limits.total_memory 1GiB)"
if kill -0 "$larder" 2>/dev/null; then echo "   Larder is up"; else echo "   LARDER DIED"; exit 1; fi
echo "== plugins afterwards (GET /plugins)"
curl -fs -H 'authorization: Bearer bench' "http://127.0.0.1:$admin_port/plugins" |
  python3 -c 'import json,sys; d=json.load(sys.stdin); print("   memory_in_use", d["memory_in_use"]); [print("   %-7s invocations %-7d failures %-7d skipped %-7d capacity %-6d circuit_open %s last %s" % (n, p["invocations"], p["failures"], p["skipped"], p["capacity"], p["circuit_open"], p["last_failure_kind"])) for n,p in sorted(d["plugins"].items())]'
echo "== status codes seen by one request per route"
for path in clean loop eat panic sleep bomb status; do
  printf '   /%-7s %s\n' "$path" "$(curl -s -o /dev/null -w '%{http_code} retry-after=%header{retry-after}' "http://127.0.0.1:$proxy_port/$path")"
done
