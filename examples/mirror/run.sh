#!/usr/bin/env bash
# An etcd prefix mirrored by Larder, on loopback: a put in etcd reaches a
# client that is waiting for the next change, a key reads alone, and a
# mirror keeps serving while etcd is down.
#
#   cargo build --release && examples/mirror/run.sh
#
# Needs etcd (Debian: etcd-server) and python3. Starts etcd on
# 127.0.0.1:18700 with a temporary data dir and Larder on 18701 (admin
# 18711, token example-token); stops both at exit. Puts go through
# etcd's JSON gateway, so etcdctl is not needed.
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

start_etcd() {
    etcd --name example --data-dir "$dir/etcd" --logger zap --log-level error \
        --listen-client-urls http://127.0.0.1:18700 --advertise-client-urls http://127.0.0.1:18700 \
        --listen-peer-urls http://127.0.0.1:18702 --initial-advertise-peer-urls http://127.0.0.1:18702 \
        --initial-cluster example=http://127.0.0.1:18702 >>"$dir/etcd.log" 2>&1 &
    etcd_pid=$!
    pids+=($etcd_pid)
}
put() {   # put KEY VALUE, through etcd's JSON gateway (keys and values in base64)
    local body
    body=$(python3 -c 'import base64,json,sys; print(json.dumps({"key": base64.b64encode(sys.argv[1].encode()).decode(), "value": base64.b64encode(sys.argv[2].encode()).decode()}))' "$1" "$2")
    for _ in $(seq 1 50); do
        curl -sf -o /dev/null -X POST -d "$body" http://127.0.0.1:18700/v3/kv/put && return
        sleep 0.1
    done
    echo "etcd did not answer" >&2; exit 1
}

start_etcd
put /flags/dark-mode on
put /flags/beta '{"pct": 5}'
cat >"$dir/larder.yml" <<YAML
listen: 127.0.0.1:18701
admin: { listen: 127.0.0.1:18711, token: example-token }
routes:
  - match: { path_prefix: /flags }
    source: flags
sources:
  flags:
    etcd: { endpoints: ['127.0.0.1:18700'], prefix: /flags/, decode: json }
YAML
"$bin" -c "$dir/larder.yml" >"$dir/larder.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do curl -sf -o /dev/null http://127.0.0.1:18701/flags && break; sleep 0.1; done

echo "the mirror (every key below /flags/, values parsed as JSON):"
curl -s -D "$dir/head" http://127.0.0.1:18701/flags; echo
etag=$(awk 'tolower($1) == "etag:" {print $2}' "$dir/head" | tr -d '\r"')
echo "its ETag is etcd's revision: $etag"
echo
echo "one key alone: $(curl -s http://127.0.0.1:18701/flags/beta)"
echo
echo "a client waits for the next change (curl '...?version=$etag&wait=60s'); a put answers it:"
curl -s "http://127.0.0.1:18701/flags?version=$etag&wait=60s" >"$dir/answer" &
waiter=$!
sleep 0.5
put /flags/dark-mode off
wait "$waiter"
echo "  $(cat "$dir/answer")"
echo
echo "etcd stopped: the last copy is still served"
kill "$etcd_pid"; wait "$etcd_pid" 2>/dev/null || true
sleep 0.5
echo "  $(curl -s -w ' (HTTP %{http_code})' http://127.0.0.1:18701/flags)"
echo "  state: $(curl -s -H 'Authorization: Bearer example-token' http://127.0.0.1:18711/sources |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["sources"][0]["mirror"]["state"])')"
etag=$(curl -s -o /dev/null -D - http://127.0.0.1:18701/flags | awk 'tolower($1) == "etag:" {print $2}' | tr -d '\r"')
start_etcd
put /flags/new yes
echo "etcd back and a new key put (a client waiting on $etag sees it once Larder reconnects):"
echo "  $(curl -s "http://127.0.0.1:18701/flags?version=$etag&wait=30s")"
echo
echo "Larder on :18701 (admin :18711, token example-token), etcd on :18700. Logs in $dir. Press Enter to stop."
read -r _
