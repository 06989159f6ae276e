#!/usr/bin/env bash
# Autobahn|Testsuite (the field's WebSocket conformance suite, unmodified, from PyPI) against
# longlink's raw WebSocket mode routed to builtin:echo. Cases 1-13: 12 and 13 with
# permessage-deflate negotiated (the gateway's default). Usage: scripts/conformance.sh [OUTDIR]            (default OUTDIR: target/autobahn)
#
# Starts the gateway (LONGLINK_BIN, else builds target/release/longlink), installs the suite if
# needed (scripts/autobahn/setup.sh), runs it with a deadline, re-runs the failed cases once
# alone, prints a table per category and a last line starting with AUTOBAHN. Exit 0 only with
# no failure that repeats and no case left unrun. Writes OUTDIR/summary.json and the suite's
# OUTDIR/reports/index.html (a page per case). Docs: docs/CONFORMANCE.md.
#
# Knobs: AUTOBAHN_DEADLINE  seconds for one run of the suite (default 1800); the cases
#                           completed by then are reported, the rest count as not run
#        AUTOBAHN_CASES     case patterns to run (default '*')
#        AUTOBAHN_EXCLUDE   case patterns to leave out (default none)
#        AUTOBAHN_HOME, PYTHON27: see scripts/autobahn/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/autobahn}
bin=${LONGLINK_BIN:-target/release/longlink}
deadline=${AUTOBAHN_DEADLINE:-1800}
recheck_max=20   # more failures than this are not a timing hiccup: no re-check
[[ $deadline =~ ^[0-9]+$ ]] || { echo "AUTOBAHN_DEADLINE must be whole seconds" >&2; exit 2; }
[ -n "${LONGLINK_BIN:-}" ] || cargo build --release -q --bin longlink   # a no-op when fresh
py27=$(scripts/autobahn/setup.sh)
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "$out/reports" "$out/recheck" "$out/run.json" "$out/spec.json" "$out/summary.json"

line=$(mktemp)
"$bin" serve --config tests/conformance/longlink.toml --http 127.0.0.1:0 >"$line" &
gw=$!
trap 'kill -TERM $gw 2>/dev/null; wait $gw 2>/dev/null; rm -f "$line"' EXIT
for _ in $(seq 100); do [ -s "$line" ] && break; sleep 0.05; done
http=$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$line")
[ -n "$http" ] || { echo "gateway did not start" >&2; exit 2; }
url="ws://$http/ws?app_id=demo&device_id=autobahn&token=x"

# suite DIR CASES EXCLUDE: one run of the fuzzingclient (the driver's log: DIR/wstest.log).
# The driver keeps its own deadline; `timeout` is the backstop if it ever hangs.
suite() {
  mkdir -p "$1"
  echo "conformance: Autobahn|Testsuite -> $url (cases '$2', excluding '${3:-none}', deadline ${deadline}s)" >&2
  local rc=0
  timeout --foreground -k 10 $((deadline + 60)) "$py27" scripts/autobahn/driver.py "$url" "$1" "$deadline" "$2" "$3" \
    >"$1/wstest.log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || { echo "conformance: the run stopped early (status $rc):" >&2; tail -n 3 "$1/wstest.log" >&2; }
  return "$rc"
}

start=$(date +%s.%N)
if suite "$out" "${AUTOBAHN_CASES:-*}" "${AUTOBAHN_EXCLUDE:-}"; then
  failed=$(python3 scripts/autobahn/summarize.py "$out" --failing)
  n=$(tr ',' '\n' <<<"$failed" | grep -c . || true)
  if [ "$n" -gt 0 ] && [ "$n" -le "$recheck_max" ]; then
    echo "conformance: re-running the $n failed case(s) once, alone: $failed" >&2
    suite "$out/recheck" "$failed" '' || true
  fi
fi
elapsed=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$start" "$(date +%s.%N)")
python3 scripts/autobahn/summarize.py "$out" --elapsed "$elapsed"
