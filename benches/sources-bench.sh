#!/usr/bin/env bash
# Sources under load: the bench's /static/{1k,16k,256k}.bin are served from
# file sources (routes `source:`), while 1,000 more file sources refresh every
# second. Compares with nginx/varnish hits and the ceiling in the same run.
#   cargo build --release && benches/sources-bench.sh          (extra env goes to run.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
template=$(mktemp --suffix=.yml.in)
trap 'rm -f "$template"' EXIT
{
  echo 'listen: 127.0.0.1:${TARGET_PORT}'
  echo 'log: { level: warn }'
  echo 'routes:'
  for size in 1k 16k 256k; do
    echo "  - { match: { path_prefix: /static/$size.bin }, source: static-$size }"
  done
  echo 'sources:'
  for size in 1k 16k 256k; do
    echo "  static-$size: { rule: '@every 1s', file: { path: '@RUN@/www/static/$size.bin' }, content_type: application/octet-stream }"
  done
  for i in $(seq 1 "${BACKGROUND_SOURCES:-1000}"); do
    echo "  background-$i: { rule: '* * * * * *', file: { path: '@RUN@/www/static/16k.bin' } }"
  done
} > "$template"
LARDER_BIN="${LARDER_BIN:-target/release/larder}" LARDER_CONFIG="$template" MEM_N="${MEM_N:-0}" \
  exec "$(pwd)/../shared/bench/run.sh"
