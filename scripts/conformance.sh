#!/usr/bin/env bash
# Autobahn|Testsuite (the field's WebSocket conformance suite, unmodified, from PyPI) against
# longlink's raw WebSocket mode routed to builtin:echo. Cases 1-10; compression (12-13) is out
# of scope. Exit 0 only with zero FAILED cases. Usage: scripts/conformance.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
shared="$repo/../shared/conformance"
out=${1:-target/autobahn}
bin=${LONGLINK_BIN:-target/release/longlink}
[ -n "${LONGLINK_BIN:-}" ] || cargo build --release -q --bin longlink   # a no-op when fresh
bash "$shared/setup.sh" >/dev/null
line=$(mktemp)
"$bin" serve --config tests/conformance/longlink.toml --http 127.0.0.1:0 >"$line" &
gw=$!
trap 'kill -TERM $gw 2>/dev/null; wait $gw 2>/dev/null; rm -f "$line"' EXIT
for _ in $(seq 100); do [ -s "$line" ] && break; sleep 0.05; done
http=$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$line")
[ -n "$http" ] || { echo "gateway did not start" >&2; exit 2; }
EXCLUDE_CASES='12.*,13.*' bash "$shared/run.sh" "ws://$http/ws?app_id=demo&device_id=autobahn&token=x" "$out"
