#!/usr/bin/env bash
# The release binary, statically linked (glibc static on the gnu target).
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target "$target" --bin longlink
bin="target/$target/release/longlink"
file "$bin" 2>/dev/null || true
ldd "$bin" 2>&1 | grep -q "not a dynamic executable\|statically linked" && echo "static: $bin"
