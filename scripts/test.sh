#!/usr/bin/env bash
# Every test longlink has: formatting, lints, unit tests, and the integration tests that run
# the real binary (and the bench client) on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
