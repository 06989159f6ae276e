#!/usr/bin/env python3
"""Summarise an Autobahn|Testsuite run made by driver.py (Python 3).

    summarize.py OUTDIR --failing       print OUTDIR's failed case ids, comma-separated
    summarize.py OUTDIR [--elapsed S]   write OUTDIR/summary.json; print a table per
                                        category, then one line starting with AUTOBAHN

Reads OUTDIR/run.json (the cases selected), OUTDIR/reports/index.json (the suite's results)
and, if present, OUTDIR/recheck/ (the failed cases run again, alone, by conformance.sh).

Every selected case lands in one bucket, from the suite's verdicts:
  passed, non_strict, informational, unimplemented: "behavior" OK, NON-STRICT,
      INFORMATIONAL, UNIMPLEMENTED, and a closing handshake ("behaviorClose") that is OK or
      INFORMATIONAL (not asked of UNIMPLEMENTED cases);
  failed:  anything else (FAILED, WRONG CODE, UNCLEAN, NO_CLOSE, or a failed close);
  not_run: selected but missing from the report (deadline, crash, refused connection).
The table counts the first run. A failed case that does not fail its re-check is a flake:
listed, not counted against the run. Exit 0 only with no confirmed failure and nothing not
run; 1 otherwise; 2 when there is no report or no case ran at all.
"""
import json
import os
import sys
import time

NAMES = {"1": "Framing", "2": "Pings/Pongs", "3": "Reserved bits", "4": "Opcodes",
         "5": "Fragmentation", "6": "UTF-8 handling", "7": "Close handling", "8": "Misc",
         "9": "Limits/performance", "10": "Misc", "12": "Compression (payloads)",
         "13": "Compression (parameters)"}
BUCKETS = ["passed", "non_strict", "informational", "unimplemented", "failed", "not_run"]
BY_BEHAVIOR = {"OK": "passed", "NON-STRICT": "non_strict", "INFORMATIONAL": "informational",
               "UNIMPLEMENTED": "unimplemented"}


def case_key(case):
    return tuple(int(p) for p in case.split("."))


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def load(rundir):
    """run.json (or {}), the selected case ids, and {case: result} (None: no report)."""
    run = read_json(os.path.join(rundir, "run.json")) or {}
    index = read_json(os.path.join(rundir, "reports", "index.json"))
    results = None if index is None else next(iter(index.values()), {})
    selected = set(run.get("selected", [])) | set(results or {})
    return run, sorted(selected, key=case_key), results


def bucket(result):
    if result is None:
        return "not_run"
    b = BY_BEHAVIOR.get(result.get("behavior"), "failed")
    if b != "unimplemented" and result.get("behaviorClose") not in ("OK", "INFORMATIONAL"):
        return "failed"
    return b


def short(ids, limit=16):
    more = len(ids) - limit
    return " ".join(ids[:limit]) + (" ... (+%d more)" % more if more > 0 else "")


def main(argv):
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    outdir = argv[0]
    run, selected, results = load(outdir)
    verdict_of = {c: bucket((results or {}).get(c)) for c in selected}
    failed = [c for c in selected if verdict_of[c] == "failed"]
    if "--failing" in argv:
        print(",".join(failed))
        return 0
    elapsed = float(argv[argv.index("--elapsed") + 1]) if "--elapsed" in argv else None

    # Re-check: a failed case counts only if it fails (or does not run) again.
    recheck = None
    confirmed = failed
    if os.path.isdir(os.path.join(outdir, "recheck")):
        _, _, again = load(os.path.join(outdir, "recheck"))
        second = {c: bucket((again or {}).get(c)) for c in failed}
        confirmed = [c for c in failed if second[c] in ("failed", "not_run")]
        recheck = {"cases": second, "flaky": [c for c in failed if c not in confirmed],
                   "confirmed": confirmed}

    totals = dict.fromkeys(BUCKETS, 0)
    by_category = {}
    for c in selected:
        cat = c.split(".")[0]
        row = by_category.setdefault(cat, dict(name=NAMES.get(cat, "?"), cases=0,
                                               **dict.fromkeys(BUCKETS, 0)))
        row["cases"] += 1
        row[verdict_of[c]] += 1
        totals[verdict_of[c]] += 1
    lists = {b: [c for c in selected if verdict_of[c] == b] for b in BUCKETS if b != "passed"}

    if results is None:
        verdict, status = "ERROR (no report)", 2
    elif not selected or totals["not_run"] == len(selected):
        verdict, status = "ERROR (no case ran)", 2
    elif confirmed or totals["not_run"]:
        verdict, status = "FAIL", 1
    else:
        verdict, status = "PASS", 0
    if status < 2 and recheck and recheck["flaky"]:
        verdict += " (%d flaky)" % len(recheck["flaky"])

    summary = {
        "suite": run.get("suite", "autobahntestsuite"),
        "target": run.get("url"),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": elapsed,
        "deadline_s": run.get("deadline_s"),
        "deadline_hit": run.get("deadline_hit", False),
        "verdict": verdict,
        "exit": status,
        "cases": len(selected),
        "totals": totals,
        "by_category": by_category,
        "not_passed": lists,
        "recheck": recheck,
        "failed_confirmed": confirmed,
        "report": "reports/index.html",
    }
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")

    cols = ["cases"] + BUCKETS
    heads = ["cases", "passed", "non-strict", "informational", "unimplemented", "failed",
             "not-run"]
    fmt = "%-26s" + "".join(" %" + str(len(h)) + "s" for h in heads)
    print(fmt % tuple(["category"] + heads))
    for cat, row in sorted(by_category.items(), key=lambda kv: int(kv[0])):
        print(fmt % tuple(["%-3s%s" % (cat, row["name"])] + [row[k] for k in cols]))
    print(fmt % tuple(["total", len(selected)] + [totals[b] for b in BUCKETS]))
    for b in BUCKETS[1:]:
        if lists[b]:
            print("%s: %s" % (b.replace("_", "-"), short(lists[b])))
    if recheck:
        print("re-check (failed cases run again, alone): flaky %s; confirmed %s"
              % (short(recheck["flaky"]) or "none", short(confirmed) or "none"))
    elif failed:
        print("not re-checked: every failure counts")
    if summary["deadline_hit"]:
        print("deadline of %gs hit: the cases not reached count as not-run" % run["deadline_s"])

    extra = ""
    if recheck:
        extra = ", re-check: %d flaky, %d confirmed" % (len(recheck["flaky"]), len(confirmed))
    took = "" if elapsed is None else " | %.1f s" % elapsed
    print("AUTOBAHN %s %s: %d cases: %d passed, %d non-strict, %d informational, "
          "%d unimplemented, %d failed, %d not-run%s%s"
          % (verdict, run.get("url", outdir), len(selected), totals["passed"],
             totals["non_strict"], totals["informational"], totals["unimplemented"],
             totals["failed"], totals["not_run"], extra, took))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
