#!/usr/bin/env bash
# Runs target/release/larder on a bench template (first argument) rendered
# for the generic target's port, for ../shared/bench/run.sh's TARGET_CMD.
set -euo pipefail
template="$1"
rendered="$(mktemp --suffix=.yml)"
sed -e "s/\${TARGET_PORT}/$TARGET_PORT/g; s/\${ORIGIN_PORT}/$ORIGIN_PORT/g" "$template" > "$rendered"
exec "${LARDER:-target/release/larder}" -c "$rendered"
