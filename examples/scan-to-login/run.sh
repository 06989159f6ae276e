#!/usr/bin/env bash
# One command: serves the login page on http://127.0.0.1:8080 (python3's http.server)
# against a dev-mode gateway on this machine (start it first: `cargo run --release`).
# Open the page, then run the phone.sh line it shows. Ctrl-C stops the page server.
set -euo pipefail
cd "$(dirname "$0")"
port=${PORT:-8080}
gw=${GW:-127.0.0.1:7101}
if ! curl -fsS "http://${API:-127.0.0.1:7180}/healthz" >/dev/null; then
  echo "no gateway answers on ${API:-127.0.0.1:7180}: start one with 'cargo run --release' first" >&2
  exit 1
fi
echo "open http://127.0.0.1:$port/?gw=$gw"
exec python3 -m http.server "$port" --bind 127.0.0.1
