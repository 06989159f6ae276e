#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz / libFuzzer) of the pure decoders: TCP frames,
# WebSocket frames, HTTP requests (+ the upgrade check, query strings), and what backends
# and API callers send as text (an auth backend's answer, connection ids), and the state a
# live upgrade hands over, permessage-deflate (offers, inflating), and our TLS 1.3 records. Usage: scripts/fuzz.sh [SECONDS]
# (per target, default 20). The toolchain here is stable only; cargo-fuzz needs nightly
# flags (-Zsanitizer), which RUSTC_BOOTSTRAP=1 enables on the stable compiler.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for t in tcp_frame ws_frame http_request backend_answer node_msg handoff_state config_and_api ws_deflate tls13_records; do
  # Seeds kept in the repository (fuzz/seeds/<target>) start the corpus where a valid
  # input is too structured for the fuzzer to find alone.
  mkdir -p corpus/"$t"
  seeds=()
  [ -d seeds/"$t" ] && seeds=(seeds/"$t")
  cargo fuzz run -O "$t" corpus/"$t" "${seeds[@]}" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | grep -E "^Done|ERROR|SUMMARY" || true
  # libFuzzer leaves a crash-* file behind when it finds a failure.
  if ls artifacts/"$t"/crash-* >/dev/null 2>&1; then
    echo "fuzz: $t found a crash: $(ls artifacts/$t/crash-*)" >&2
    exit 1
  fi
done
echo "fuzz: no crashes (${secs}s per target)"
