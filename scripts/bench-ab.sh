#!/usr/bin/env bash
# Before/after: the connect, fan-out, echo, unicast and batch benchmarks against the
# gateway built at BASE (a commit) and at the working tree, in the same run, interleaved
# (base, new, base, new), with the same bench client (the working tree's), plus the
# bare-echo floor. Each gateway runs in dev mode on loopback and is stopped by its PID.
#
#   scripts/bench-ab.sh BASE [ROUNDS]        e.g. scripts/bench-ab.sh d3568b5 2
#
# Prints one JSON line per measurement, tagged {"v": "base|new|bare", "what": ...}, then a
# table of the medians. Takes ~4 minutes per round on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: scripts/bench-ab.sh BASE_COMMIT [ROUNDS]}
rounds=${2:-2}
work=$(mktemp -d)
gw=
cleanup() {
  [ -n "$gw" ] && kill -TERM "$gw" 2>/dev/null && wait "$gw" 2>/dev/null || true
  git worktree remove --force "$work/src" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release -q --bins
cp target/release/longlink "$work/longlink-new"
cp target/release/longlink-bench "$work/bench"
git worktree add -q "$work/src" "$base"
(cd "$work/src" && CARGO_TARGET_DIR="$work/target" cargo build --release -q --bin longlink)
cp "$work/target/release/longlink" "$work/longlink-base"
B="$work/bench"
results="$work/results.jsonl"

start() {
  local out
  out=$(mktemp)
  "$work/longlink-$1" serve --tcp 127.0.0.1:7100 --http 127.0.0.1:7101 --api 127.0.0.1:7180 \
    --log-level error >"$out" 2>/dev/null &
  gw=$!
  for _ in $(seq 50); do [ -s "$out" ] && break; sleep 0.1; done
  rm -f "$out"
}
stop() { kill -TERM "$gw" 2>/dev/null; wait "$gw" 2>/dev/null || true; gw=; }
# Tags each JSON line of the bench and appends it to the results (and shows it).
tag() { while read -r l; do case "$l" in "{"*) echo "{\"v\":\"$1\",\"what\":\"$2\",\"r\":$l}" | tee -a "$results";; esac; done; }

src=2
for _ in $(seq "$rounds"); do
  for v in base new; do
    for t in tcp ws; do
      start "$v"
      "$B" connect --transport "$t" --conns 19000 --procs 4 --source "127.0.0.$src" 2>/dev/null | tag "$v" "connect $t"
      src=$((src + 8))
      stop
    done
    start "$v"
    for t in tcp ws; do
      for w in 1 16; do
        "$B" fanout --transport "$t" --subs 10000 --messages 300 --size 64 --window "$w" 2>/dev/null | tag "$v" "fanout $t w$w"
      done
    done
    stop
    start "$v"
    for t in tcp ws; do
      "$B" echo --transport "$t" --conns 100 --rounds 5000 --size 64 --procs 1 2>/dev/null | tag "$v" "echo $t"
    done
    "$B" unicast --conns 1000 --pushes 300000 --batch 1000 --window 4 2>/dev/null | tag "$v" "unicast ack"
    "$B" batch --conns 1000 --items 3000 --size 200 2>/dev/null | tag "$v" "batch 3000x1000"
    stop
  done
done
"$B" bare-echo --listen 127.0.0.1:7300 >/dev/null 2>&1 &
bare=$!
sleep 0.3
for _ in $(seq "$rounds"); do
  "$B" echo --tcp 127.0.0.1:7300 --pid "$bare" --transport tcp --conns 100 --rounds 5000 --size 64 --procs 1 2>/dev/null | tag bare "echo tcp"
done
kill "$bare"

python3 - "$results" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    r = d["r"]
    if d["what"].startswith("connect"):
        val = {"RSS B/conn": r["rss_per_conn_bytes"], "conn/s": r["rate_per_s"], "CPU us/conn": r["server_cpu_us_per_conn"]}
    elif d["what"].startswith("fanout"):
        val = {"CPU us/msg": r["server_cpu_us_per_msg"], "msg/s": r["msgs_per_s"]}
    elif d["what"].startswith("unicast"):
        val = {"acked/s": r["acked_per_s"], "p99 us": r["p99_us"]}
    elif d["what"].startswith("batch"):
        val = {"bystander PONG p99 us": r["bystander_p99_us"], "peak RSS KiB": r["rss_peak_kib"], "answer s": r["answer_s"]}
    else:
        val = {"CPU us/rt": r["server_cpu_us_per_round_trip"], "rt/s": r["round_trips_per_s"]}
    rows.setdefault((d["what"], d["v"]), []).append(val)
print("\n| scenario | version | " + " | ".join(["median 1", "median 2", "median 3"]) + " |")
print("|---|---|---|---|---|")
for (what, v), vals in sorted(rows.items()):
    keys = list(vals[0])
    cells = [f"{k} {statistics.median(x[k] for x in vals):g}" for k in keys]
    cells += [""] * (3 - len(cells))
    print(f"| {what} | {v} | " + " | ".join(cells) + " |")
EOF
