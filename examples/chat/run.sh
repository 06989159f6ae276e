#!/usr/bin/env bash
# One command: the chat's app backend (node backend.mjs) on http://127.0.0.1:8090 against a
# dev-mode gateway on this machine (start it first: `cargo run --release`). Open the page in
# two tabs (?name=alice, ?name=bob) and talk. Ctrl-C stops the backend.
set -euo pipefail
cd "$(dirname "$0")"
api=${API:-127.0.0.1:7180}
if ! curl -fsS "http://$api/healthz" >/dev/null; then
  echo "no gateway answers on $api: start one with 'cargo run --release' first" >&2
  exit 1
fi
echo "open http://127.0.0.1:${PORT:-8090}/?room=lobby&name=alice (and another tab as bob)"
exec node backend.mjs --port "${PORT:-8090}" --api "$api"
