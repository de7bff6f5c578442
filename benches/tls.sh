#!/usr/bin/env bash
# Cache hits over HTTPS: Larder terminating TLS against nginx terminating TLS
# with proxy_cache, side by side in one run, on loopback.
#
#   cargo build --release && bash benches/tls.sh
#
# The origin is ../shared/bench's nginx (static 1k/16k objects, max-age
# 3600). Both proxies get a self-signed P-256 certificate (made here with
# openssl), TLS 1.2 and 1.3, and cache in memory (nginx: page cache).
# Pinned like ../shared/bench's `pinned` mode: origin and proxies on CPU 0,
# wrk (keep-alive HTTP/1.1 over TLS, -t1) on CPU 1. Runs alternate between
# the two proxies REPEAT times per size so host drift hits both alike; the
# table gives the mean req/s, p50 and p99 (wrk's done hook, exact) and the
# Larder/nginx ratio.
#
# Knobs: SIZES ("1k 16k"), CONNS (50), DURATION (4), REPEAT (3),
# LARDER_BIN (target/release/larder), PROXY_CPUS (0), LOAD_CPUS (1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BENCH_DIR="$(cd ../shared/bench && pwd)"
SIZES="${SIZES:-1k 16k}"
CONNS="${CONNS:-50}"
DURATION="${DURATION:-4}"
REPEAT="${REPEAT:-3}"
LARDER_BIN="${LARDER_BIN:-target/release/larder}"
PIN="taskset -c ${PROXY_CPUS:-0}"
LOADPIN="taskset -c ${LOAD_CPUS:-1}"
ORIGIN_PORT=18180
NGINX_PORT=18190
LARDER_PORT=18193
LARDER_PLAIN_PORT=18194
RUN="$(mktemp -d /tmp/larder-tls-bench.XXXXXX)"
mkdir -p "$RUN/www/static" "$RUN/logs" "$RUN/tmp" "$RUN/raw"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

for bin in nginx wrk openssl curl taskset; do
  command -v "$bin" >/dev/null || { echo "missing $bin (apt-get install nginx wrk openssl curl)" >&2; exit 1; }
done
[[ -x "$LARDER_BIN" ]] || { echo "no $LARDER_BIN: cargo build --release first" >&2; exit 1; }

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  exit 1
}

head -c 1024 /dev/urandom > "$RUN/www/static/1k.bin"
head -c 16384 /dev/urandom > "$RUN/www/static/16k.bin"
head -c 262144 /dev/urandom > "$RUN/www/static/256k.bin"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$RUN/key.pem" -out "$RUN/cert.pem" 2>/dev/null

render() { sed -e "s#@RUN@#$RUN#g; s#@WORKERS@#1#g; s#@ORIGIN_PORT@#$ORIGIN_PORT#g; s#@SLOW_PORT@#18181#g; s#@NGINX_PORT@#$NGINX_PORT#g" "$1" > "$2"; }

render "$BENCH_DIR/conf/origin-nginx.conf.in" "$RUN/origin.conf"
$PIN nginx -e "$RUN/logs/origin.err" -c "$RUN/origin.conf" -g 'daemon off;' > "$RUN/logs/origin.out" 2>&1 &
PIDS+=($!)

# nginx's caching peer from ../shared/bench, listening with TLS instead.
render "$BENCH_DIR/conf/nginx-cache.conf.in" "$RUN/nginx-tls.conf"
sed -i -e "s#listen 127.0.0.1:$NGINX_PORT backlog=4096;#listen 127.0.0.1:$NGINX_PORT ssl backlog=4096;\n        ssl_certificate $RUN/cert.pem;\n        ssl_certificate_key $RUN/key.pem;\n        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_session_cache shared:SSL:10m;#" "$RUN/nginx-tls.conf"
grep -q "ssl_certificate " "$RUN/nginx-tls.conf" || { echo "could not add TLS to nginx's config" >&2; exit 1; }
$PIN nginx -e "$RUN/logs/nginx.err" -c "$RUN/nginx-tls.conf" -g 'daemon off;' > "$RUN/logs/nginx.out" 2>&1 &
PIDS+=($!)

cat > "$RUN/larder.yml" <<EOF
listen: 127.0.0.1:$LARDER_PLAIN_PORT
tls:
  listen: 127.0.0.1:$LARDER_PORT
  certificates:
    - cert: $RUN/cert.pem
      key: $RUN/key.pem
log: { level: warn }
cache:
  max_size: 1GiB
  max_object_size: 8MiB
upstreams:
  origin:
    servers: ["http://127.0.0.1:$ORIGIN_PORT"]
routes:
  - match: { path_prefix: / }
    upstream: origin
    cache: { enabled: true }
EOF
$PIN "$LARDER_BIN" -c "$RUN/larder.yml" > "$RUN/logs/larder.out" 2>&1 &
PIDS+=($!)

for port in $ORIGIN_PORT $NGINX_PORT $LARDER_PORT; do wait_port "$port"; done

echo "# Cache hits over TLS: Larder vs nginx proxy_cache"
echo
echo "$(date -u +%FT%TZ), $(nginx -v 2>&1), wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'), $(openssl version)"
echo "larder: $LARDER_BIN ($(sha256sum "$LARDER_BIN" | cut -c1-12)); pinned: proxies on CPU ${PROXY_CPUS:-0}, wrk -t1 -c$CONNS -d${DURATION}s on CPU ${LOAD_CPUS:-1}; repeats: $REPEAT"
echo
echo "| size | proxy | req/s (mean) | range | p50 ms | p99 ms | errors | larder/nginx |"
echo "|---|---|---:|---|---:|---:|---:|---:|"
for size in $SIZES; do
  url_of() { echo "https://127.0.0.1:$1/static/$size.bin"; }
  for port in $NGINX_PORT $LARDER_PORT; do
    # Warm: fill the cache, check it is a hit, and let the connections settle.
    curl -sk -o /dev/null "$(url_of "$port")"
    curl -sk -o /dev/null "$(url_of "$port")"
    $LOADPIN wrk -t1 -c"$CONNS" -d1s "$(url_of "$port")" > /dev/null 2>&1
  done
  for rep in $(seq 1 "$REPEAT"); do
    order="nginx larder"
    (( rep % 2 == 0 )) && order="larder nginx"
    for name in $order; do
      port=$NGINX_PORT
      [[ $name == larder ]] && port=$LARDER_PORT
      $LOADPIN wrk -t1 -c"$CONNS" -d"${DURATION}s" --timeout 5s -s "$BENCH_DIR/tools/report.lua" \
        "$(url_of "$port")" > "$RUN/raw/$name-$size-$rep.txt" 2>&1
    done
  done
  declare -A mean=()
  for name in nginx larder; do
    read -r rps lo hi p50 p99 errors < <(
      grep -h '^BENCH' "$RUN"/raw/"$name-$size"-*.txt | awk '
        { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
          rps = v["requests"] / (v["duration_us"] / 1e6)
          sum += rps; n++; if (n == 1 || rps < lo) lo = rps; if (rps > hi) hi = rps
          p50 += v["p50_us"]; p99 += v["p99_us"]
          err += v["err_connect"] + v["err_read"] + v["err_write"] + v["err_status"] + v["err_timeout"] }
        END { printf "%.0f %.0f %.0f %.2f %.2f %d\n", sum / n, lo, hi, p50 / n / 1000, p99 / n / 1000, err }')
    mean[$name]=$rps
    ratio=""
    [[ $name == larder ]] && ratio=$(awk -v a="$rps" -v b="${mean[nginx]}" 'BEGIN { printf "%.2fx", a / b }')
    echo "| $size | $name | $rps | $lo–$hi | $p50 | $p99 | $errors | $ratio |"
  done
done
echo
echo "raw wrk output: $RUN/raw"
