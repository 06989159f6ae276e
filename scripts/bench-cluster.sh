#!/usr/bin/env bash
# Cluster benchmarks (docs/BENCHMARKS.md, "Cluster"): one redis-server and several release
# gateways in dev mode on loopback, everything on this machine. Prints one JSON line per
# measurement with the bench client's result and, read from /proc around it, the CPU time
# of each process (nodes and Redis), Redis commands and Redis memory. Stops everything it
# started, by PID.
#
#   scripts/bench-cluster.sh [unicast|broadcast|connect|scale|all]
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
cargo build --release --bins -q
bin=target/release
B="$bin/longlink-bench"
RPORT=7379
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap cleanup EXIT

rcli() { redis-cli -p "$RPORT" "$@"; }
start_redis() {
  redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir /tmp \
    >/dev/null 2>&1 &
  pids+=($!)
  redis_pid=$!
  for _ in $(seq 50); do rcli ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "redis-server did not start" >&2
  exit 1
}
# start_node ID API_PORT [serve flags...]: sets node_pid
start_node() {
  local id=$1 api=$2 out
  shift 2
  out=$(mktemp)
  "$bin/longlink" serve --node-id "$id" --api "127.0.0.1:$api" --http "" --log-level warn \
    --redis "redis://127.0.0.1:$RPORT" "$@" >"$out" &
  pids+=($!)
  node_pid=$!
  for _ in $(seq 50); do [ -s "$out" ] && break; sleep 0.1; done
  rm -f "$out"
}
# start_alone API_PORT [serve flags...]: a node with no Redis
start_alone() {
  local api=$1 out
  shift
  out=$(mktemp)
  "$bin/longlink" serve --api "127.0.0.1:$api" --http "" --log-level warn "$@" >"$out" &
  pids+=($!)
  node_pid=$!
  for _ in $(seq 50); do [ -s "$out" ] && break; sleep 0.1; done
  rm -f "$out"
}
# wait_nodes API_PORT N: until that node sees N live nodes
wait_nodes() {
  for _ in $(seq 100); do
    curl -s "127.0.0.1:$1/healthz" | grep -q "\"nodes\":$2" && return
    sleep 0.1
  done
  echo "the cluster did not form" >&2
  exit 1
}
cpu() { awk '{print ($14 + $15) * 10000}' "/proc/$1/stat"; } # µs at 100 Hz
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
rstat() { rcli info "$1" | tr -d '\r' | awk -F: -v k="$2" '$1 == k {print $2}'; }

# measure LABEL "PID..." -- BENCH ARGS: runs the bench client, prints its result with the
# CPU of each listed process and the Redis commands it took.
measure() {
  local label=$1 plist=$2
  shift 3
  local before=() p
  for p in $plist; do before+=("$(cpu "$p")"); done
  local cmds0
  cmds0=$(rstat stats total_commands_processed)
  local res
  res=$("$B" "$@" | grep '^{' | tail -1)
  local cpus="" i=0
  for p in $plist; do
    cpus+="${cpus:+,}\"$p\":$(( $(cpu "$p") - ${before[$i]} ))"
    i=$((i + 1))
  done
  local cmds=$(( $(rstat stats total_commands_processed) - cmds0 ))
  echo "{\"what\":\"$label\",\"cpu_us\":{$cpus},\"redis_pid\":$redis_pid,\"redis_commands\":$cmds,\"r\":$res}"
}

if [[ $what == unicast || $what == all ]]; then
  # ack=1 with the cluster off: the single node as before (no durable records).
  start_redis
  start_alone 7183 --tcp 127.0.0.1:7110
  measure "unicast alone ack" "$node_pid $redis_pid" -- unicast --tcp 127.0.0.1:7110 \
    --api 127.0.0.1:7183 --pid "$node_pid" --conns 1000 --pushes 300000 --batch 1000 --window 4
  cleanup
  start_redis
  start_node nA 7181 --tcp 127.0.0.1:7110
  a=$node_pid
  start_node nB 7182 --tcp 127.0.0.1:7120
  b=$node_pid
  wait_nodes 7181 2
  wait_nodes 7182 2
  for ack in no-ack ack; do
    flag=()
    [[ $ack == no-ack ]] && flag=(--no-ack)
    # Single-node figure first (API and clients on B), then across (API on A, clients on B).
    # With ack=1 every push is also a durable record in Redis (written, then removed).
    measure "unicast B->B $ack" "$a $b $redis_pid" -- unicast --tcp 127.0.0.1:7120 \
      --api 127.0.0.1:7182 --pid "$b" --conns 1000 --pushes 300000 --batch 1000 --window 4 \
      "${flag[@]}"
    measure "unicast A->B $ack" "$a $b $redis_pid" -- unicast --tcp 127.0.0.1:7120 \
      --api 127.0.0.1:7181 --metrics-api 127.0.0.1:7182 --pid "$b" --conns 1000 --pushes 300000 --batch 1000 --window 4 \
      "${flag[@]}"
  done
  cleanup
fi

if [[ $what == broadcast || $what == all ]]; then
  # Alone: the single-node figure.
  start_redis
  start_alone 7183 --tcp 127.0.0.1:7130
  measure "broadcast alone" "$node_pid $redis_pid" -- fanout --tcp 127.0.0.1:7130 \
    --api 127.0.0.1:7183 --pid "$node_pid" --subs 10000 --messages 300 --size 64 --window 16
  cleanup
  # Two nodes, every subscriber on B, pushes through A: what crossing Redis costs, with
  # the same work per process as alone.
  start_redis
  start_node nA 7181 --tcp 127.0.0.1:7131
  a=$node_pid
  start_node nB 7182 --tcp 127.0.0.1:7132
  b=$node_pid
  wait_nodes 7181 2
  measure "broadcast A->B" "$a $b $redis_pid" -- fanout --tcp 127.0.0.1:7132 \
    --api 127.0.0.1:7181 --pid "$b" --subs 10000 --messages 300 --size 64 --window 16
  cleanup
  # Two nodes sharing the port (the kernel spreads the subscribers), pushes through A.
  start_redis
  start_node nA 7181 --tcp 127.0.0.1:7130 --reuse-port
  a=$node_pid
  start_node nB 7182 --tcp 127.0.0.1:7130 --reuse-port
  b=$node_pid
  wait_nodes 7181 2
  measure "broadcast 2 nodes" "$a $b $redis_pid" -- fanout --tcp 127.0.0.1:7130 \
    --api 127.0.0.1:7181 --pid "$a" --subs 10000 --messages 300 --size 64 --window 16
  cleanup
  # The floor of that split on this machine: two nodes sharing the port with no Redis
  # between them, each broadcast posted to both APIs. Same subscribers, same deliveries.
  start_redis
  start_alone 7183 --tcp 127.0.0.1:7130 --reuse-port
  a=$node_pid
  start_alone 7184 --tcp 127.0.0.1:7130 --reuse-port
  b=$node_pid
  measure "broadcast 2 alone" "$a $b $redis_pid" -- fanout --tcp 127.0.0.1:7130 \
    --api 127.0.0.1:7183,127.0.0.1:7184 --pid "$a" --subs 10000 --messages 300 --size 64 \
    --window 16
  cleanup
fi

if [[ $what == connect || $what == all ]]; then
  start_redis
  start_node nA 7181 --tcp 127.0.0.1:7110
  a=$node_pid
  wait_nodes 7181 1
  mem0=$(rstat memory used_memory)
  # Redis memory with every connection registered: sampled while the bench holds them.
  ( peak=0
    while kill -0 "$a" 2>/dev/null; do
      m=$(rstat memory used_memory 2>/dev/null || echo 0)
      [ "${m:-0}" -gt "$peak" ] && peak=$m && echo "$peak" >/tmp/ll-redis-peak
      sleep 0.2
    done ) &
  sampler=$!
  measure "connect cluster" "$a $redis_pid" -- connect --tcp 127.0.0.1:7110 \
    --api 127.0.0.1:7181 --pid "$a" --conns 19000 --procs 4
  peak=$(cat /tmp/ll-redis-peak)
  echo "{\"what\":\"redis memory per registered connection\",\"bytes\":$(( (peak - mem0) / 19000 )),\"used_memory_before\":$mem0,\"peak\":$peak}"
  cleanup
  kill "$sampler" 2>/dev/null || true
  rm -f /tmp/ll-redis-peak
fi

if [[ $what == scale || $what == all ]]; then
  # Five nodes sharing the client port, 95,000 subscribers from five processes on
  # 127.0.0.2-6, one Redis; a broadcast to all of them through node 1.
  start_redis
  nodes=()
  for i in 1 2 3 4 5; do
    start_node "n$i" $((7190 + i)) --tcp 127.0.0.1:7140 --reuse-port
    nodes+=("$node_pid")
  done
  wait_nodes 7191 5
  mem0=$(rstat memory used_memory)
  sleep 2
  c0=$(rstat stats total_commands_processed)
  sleep 10
  idle=$(( $(rstat stats total_commands_processed) - c0 ))
  echo "{\"what\":\"scale idle cluster\",\"nodes\":5,\"redis_commands_per_s\":$(( idle / 10 ))}"
  # Per-node readings while the subscribers are connected: the sample with the most.
  ( best=0
    while true; do
      line="{" total=0
      for i in 1 2 3 4 5; do
        n=$(curl -s "127.0.0.1:$((7190 + i))/metrics" | awk '/^longlink_connections\{transport="tcp"\}/ {print $2}')
        total=$(( total + ${n:-0} ))
        line+="\"n$i\":{\"conns\":${n:-0},\"rss_kib\":$(rss_kib "${nodes[$((i - 1))]}")},"
      done
      if [ "$total" -ge "$best" ]; then
        best=$total
        echo "${line}\"redis_used_memory\":$(rstat memory used_memory)}" >/tmp/ll-scale-sample
      fi
      sleep 0.5
    done ) &
  sampler=$!
  # Idle first: 95,000 connections held for the connect bench's settle, each node sampled.
  measure "scale connect 95k" "${nodes[*]} $redis_pid" -- connect --tcp 127.0.0.1:7140 \
    --api 127.0.0.1:7191 --pid "${nodes[0]}" --conns 95000 --procs 5 --settle-ms 4000
  echo "{\"what\":\"scale sample, idle\",\"redis_used_memory_before\":$mem0,\"s\":$(cat /tmp/ll-scale-sample)}"
  echo '{}' >/tmp/ll-scale-sample
  sleep 3
  measure "scale broadcast 95k" "${nodes[*]} $redis_pid" -- fanout --tcp 127.0.0.1:7140 \
    --api 127.0.0.1:7191 --pid "${nodes[0]}" --subs 95000 --procs 5 --messages 20 --size 64 \
    --window 1
  kill "$sampler" 2>/dev/null || true
  echo "{\"what\":\"scale sample during the broadcast\",\"redis_used_memory_before\":$mem0,\"s\":$(cat /tmp/ll-scale-sample)}"
  rm -f /tmp/ll-scale-sample
  cleanup
fi
