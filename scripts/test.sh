#!/usr/bin/env bash
# Every test longlink has: formatting, lints, unit tests, the integration tests that run the
# real binary (with real third-party clients and the bench client) on loopback, and the
# Autobahn|Testsuite WebSocket conformance run. Installs missing test tools first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
scripts/conformance.sh
