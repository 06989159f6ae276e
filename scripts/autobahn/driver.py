# -*- coding: utf-8 -*-
"""Run Autobahn|Testsuite's fuzzingclient once, with a deadline (Python 2.7, in the venv
that scripts/autobahn/setup.sh builds; the suite itself is unmodified).

    python driver.py URL OUTDIR DEADLINE_S CASES EXCLUDE

CASES and EXCLUDE are comma-separated case patterns ("*", "9.*", "12.*,13.*").
Writes into OUTDIR:
  spec.json   the spec run (wstest -m fuzzingclient -s spec.json would run the same)
  run.json    {"url", "suite", "selected": [case ids], "deadline_s", "deadline_hit"}
  reports/    the suite's own index.json, index.html and a report per case

wstest writes its reports only after the last case, so a plain `timeout wstest` loses
everything. Here the reports are written once, whichever comes first: the last case, the
deadline, or SIGTERM/SIGINT (Twisted stops the reactor; the shutdown hook writes them).
Exit status: 0 when every selected case has a result, 3 when the run stopped early (the
reports then hold the cases completed so far).
"""
from __future__ import print_function

import json
import os
import sys

from autobahntestsuite import choosereactor  # noqa: F401  (installs epoll, as wstest does)
from twisted.internet import reactor

import autobahn
import autobahntestsuite
from autobahntestsuite import fuzzing

AGENT = "longlink"  # the name the reports use for the server under test


class Factory(fuzzing.FuzzingClientFactory):
    """The suite's fuzzing client, with createReports made idempotent."""

    reported = False

    def createReports(self, *args, **kwargs):
        if not self.reported:
            self.reported = True
            fuzzing.FuzzingClientFactory.createReports(self, *args, **kwargs)


def patterns(s):
    return [p.strip() for p in s.split(",") if p.strip()]


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    url, outdir, deadline, cases, exclude = sys.argv[1:]
    deadline = float(deadline)
    os.chdir(outdir)
    spec = {
        "outdir": "reports",
        "options": {"failByDrop": False},  # the suite's own default for fuzzingclient
        "servers": [{"agent": AGENT, "url": url}],
        "cases": patterns(cases) or ["*"],
        "exclude-cases": patterns(exclude),
    }
    with open("spec.json", "w") as f:
        json.dump(spec, f, indent=2)

    factory = Factory(spec)  # connects as soon as the reactor runs
    run = {
        "url": url,
        "suite": "autobahntestsuite %s / autobahn %s" % (autobahntestsuite.version, autobahn.version),
        "selected": factory.specCases,
        "deadline_s": deadline,
        "deadline_hit": False,
    }

    def completed():
        return len(factory.agents.get(AGENT, {}))

    def save_run():
        with open("run.json", "w") as f:
            json.dump(run, f, indent=2)

    def on_deadline():
        run["deadline_hit"] = True
        save_run()
        print("DEADLINE %gs: %d of %d cases completed; writing their reports"
              % (deadline, completed(), len(factory.specCases)))
        factory.createReports()
        reactor.stop()

    save_run()
    reactor.callLater(deadline, on_deadline)
    reactor.addSystemEventTrigger("before", "shutdown", factory.createReports)
    reactor.run()
    sys.stdout.flush()
    sys.exit(0 if completed() == len(factory.specCases) else 3)


if __name__ == "__main__":
    main()
