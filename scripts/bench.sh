#!/usr/bin/env bash
# Runs the benchmarks recorded in docs/BENCHMARKS.md against release gateways in dev mode on
# loopback (a fresh one per connect run, so each memory reading starts from an empty
# process), stopping each gateway it started.
# Usage: scripts/bench.sh [connect|fanout|echo|longpoll|upstream|unicast|rooms|batch|churn|chaos|all]
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
cargo build --release --bins -q
bin=target/release
gw=
start_gateway() {   # extra arguments go to `longlink serve`
  local out
  out=$(mktemp)
  "$bin/longlink" serve --tcp 127.0.0.1:7100 --http 127.0.0.1:7101 --api 127.0.0.1:7180 --log-level warn "$@" >"$out" &
  gw=$!
  for _ in $(seq 50); do [ -s "$out" ] && break; sleep 0.1; done
  echo "gateway: $(cat "$out")"
  rm -f "$out"
}
stop_gateway() {
  [ -n "$gw" ] && kill -TERM "$gw" 2>/dev/null && wait "$gw" 2>/dev/null || true
  gw=
}
backend=
trap 'stop_gateway; [ -n "$backend" ] && kill "$backend" 2>/dev/null' EXIT

if [[ $what == connect || $what == all ]]; then
  # Each run from its own source addresses: the previous run's client-side TIME_WAIT
  # sockets would otherwise slow the load generator's port selection, not the gateway.
  for transport in tcp ws; do
    for src in 127.0.0.2 127.0.0.10 127.0.0.18; do
      [ "$transport" = ws ] && src=${src%.*}.$(( ${src##*.} + 40 ))
      start_gateway
      "$bin/longlink-bench" connect --transport "$transport" --conns 19000 --procs 4 --source "$src"
      stop_gateway
    done
  done
fi
if [[ $what == fanout || $what == all ]]; then
  start_gateway
  for transport in tcp ws; do
    for w in 1 4 16; do
      "$bin/longlink-bench" fanout --transport "$transport" --subs 10000 --messages 300 --size 64 --window "$w"
    done
    "$bin/longlink-bench" fanout --transport "$transport" --subs 10000 --messages 300 --size 64 --window 4 --rate 20
  done
  for w in 1 16; do
    "$bin/longlink-bench" fanout --subs 10000 --messages 300 --size 64 --window "$w" --room "live-$w"
  done
  stop_gateway
fi
if [[ $what == echo || $what == all ]]; then
  start_gateway
  for transport in tcp ws; do
    for procs in 1 4; do
      "$bin/longlink-bench" echo --transport "$transport" --conns 100 --rounds 5000 --size 64 --procs "$procs"
    done
  done
  stop_gateway
  # Against the kernel's floor in the same run: the same client drives a bare read-and-
  # write-back echo server of the bench's own, passes alternating with the gateway's.
  for transport in tcp ws; do
    start_gateway
    "$bin/longlink-bench" echo --transport "$transport" --conns 100 --rounds 5000 --size 64 --procs 1 --floor --passes 4
    stop_gateway
  done
fi
if [[ $what == longpoll || $what == all ]]; then
  start_gateway
  "$bin/longlink-bench" longpoll --waiters 10000 --window 16
  stop_gateway
fi
if [[ $what == unicast || $what == all ]]; then
  # ack=1 pushes through the batch endpoint to clients that ACK each one.
  start_gateway
  for conns in 1000 10000; do
    "$bin/longlink-bench" unicast --conns "$conns" --pushes 1000000 --batch 1000 --window 4
  done
  "$bin/longlink-bench" unicast --conns 1000 --pushes 1000000 --batch 1000 --window 4 --wait-ms 10000
  "$bin/longlink-bench" unicast --conns 1000 --pushes 1000000 --batch 1000 --window 4 --no-ack
  stop_gateway
fi
if [[ $what == rooms || $what == all ]]; then
  start_gateway   # fresh: the first reading is from an empty process
  "$bin/longlink-bench" rooms --members 100000
  "$bin/longlink-bench" rooms --members 100000
  stop_gateway
fi
if [[ $what == upstream || $what == all ]]; then
  # Service 1 = builtin:echo, service 2 = the bundled backend (bench/upstream.toml).
  "$bin/longlink-bench" backend --listen 127.0.0.1:7200 2>/dev/null &
  backend=$!
  start_gateway --config bench/upstream.toml
  for _ in 1 2; do
    "$bin/longlink-bench" upstream --conns 1000 --procs 2 --service 1 --rounds 300
  done
  "$bin/longlink-bench" upstream --conns 1000 --procs 2 --service 2 --rounds 30
  "$bin/longlink-bench" upstream --conns 50 --procs 1 --service 2 --rounds 400
  stop_gateway
  kill "$backend"
  backend=
fi
if [[ $what == batch || $what == all ]]; then
  # One 3,000-item batch to 1,000 room members, a bystander pinging alongside.
  start_gateway
  "$bin/longlink-bench" batch --conns 1000 --items 3000 --size 200
  "$bin/longlink-bench" batch --conns 1000 --items 10000 --size 200
  stop_gateway
fi
if [[ $what == churn || $what == all ]]; then
  # 300,000 connects and closes in cycles of 5,000; RSS after each cycle.
  start_gateway
  "$bin/longlink-bench" churn --conns 5000 --cycles 60
  stop_gateway
fi
if [[ $what == chaos || $what == all ]]; then
  # Well-behaved clients among abusers of every kind, 60 s, with the short limits of
  # bench/chaos.toml; exits non-zero (and so does this script) unless everything holds.
  start_gateway --config bench/chaos.toml
  "$bin/longlink-bench" chaos --good 100 --secs 60 --warmup 10 --tls
  stop_gateway
fi
