#!/usr/bin/env python3
"""What a durable `ack=1` record costs Redis (docs/BENCHMARKS.md, "Reliable unicast across
nodes"; docs/SCALING.md).

Starts its own redis-server on a free port (stopped at the end), then measures, with the
gateway's key and record shapes (a device hash `ll:rel:{demo:dN}`, field
`<order 16 hex>.<node>`, a ~110-byte record holding a 64-byte payload):

Per run: the calls the client sent per push, the commands Redis counted (a script's
redis.call()s count as commands: `total_commands_processed`), and Redis CPU per push.

  plain    a turn's writes as one HSET per device, its removals as one HDEL per device
           (what the gateway sends), for PUSHES pushes over DEVICES devices, TURN per turn
  plain4   the same with 4 pushes per device per turn (HSET/HDEL of 4 fields)
  script   one EVAL per turn doing the same HSETs and HDELs inside Lua
  journal  a layout the gateway does not use (docs/BENCHMARKS.md): one hash per node, a
           turn's records as one HSET of all their fields and its removals as one HDEL
  memory   used_memory before and after RECORDS records over DEVICES hashes, per record

Redis CPU is `used_cpu_user + used_cpu_sys` from INFO before and after each run, so it is
Redis's own cost, not the client's. Usage:

  python3 scripts/redis-durable-cost.py [--pushes 300000] [--devices 1000] [--turn 1000]
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, int):
            a = str(a).encode()
        elif isinstance(a, str):
            a = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.buf = b""
        self.sent = 0  # commands (calls) sent by this client

    def _line(self):
        while b"\r\n" not in self.buf:
            self.buf += self.s.recv(1 << 20)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            self.buf += self.s.recv(1 << 20)
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b":"):
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise RuntimeError("unexpected reply %r" % line)

    def pipeline(self, cmds):
        self.sent += len(cmds)
        self.s.sendall(b"".join(cmds))
        return [self.reply() for _ in cmds]

    def info(self, section):
        text = self.pipeline([resp("INFO", section)])[0].decode()
        return dict(l.split(":", 1) for l in text.splitlines() if ":" in l)


def cpu(c):
    i = c.info("cpu")
    return float(i["used_cpu_user"]) + float(i["used_cpu_sys"])


RECORD = b"\x02" + b"\x00" * 8 + b"\x00" * 4 + b"\x02n1" + b"\x00" + b"\x00" * 8 + b"p" * 64
# One EVAL per turn: ARGV = op, key index, field[, record] ... (as the gateway's script was).
SCRIPT = """
local i = 1
while i <= #ARGV do
  if ARGV[i] == 'a' then
    redis.call('HSET', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  else
    redis.call('HDEL', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2])
    i = i + 3
  end
end
return 1
"""


def field(n):
    return "%016x.n1" % n


def run_plain(c, pushes, devices, turn, per_device):
    """Writes then removes `pushes` records: per turn, `turn` pushes, `per_device` to each
    device touched (one HSET / HDEL each)."""
    n = 0
    dev = 0
    while n < pushes:
        writes, removes = [], []
        for _ in range(turn // per_device):
            key = "ll:rel:{demo:d%d}" % (dev % devices)
            dev += 1
            fs = [field(n + k) for k in range(per_device)]
            args = ["HSET", key]
            for f in fs:
                args += [f, RECORD]
            writes.append(resp(*args))
            removes.append(resp("HDEL", key, *fs))
            n += per_device
        c.pipeline(writes)
        c.pipeline(removes)
    return n


def run_script(c, pushes, devices, turn):
    n = 0
    dev = 0
    while n < pushes:
        keys, wargs, rargs = [], [], []
        for k in range(turn):
            keys.append("ll:rel:{demo:d%d}" % (dev % devices))
            dev += 1
            f = field(n)
            wargs += ["a", k + 1, f, RECORD]
            rargs += ["d", k + 1, f]
            n += 1
        c.pipeline([resp("EVAL", SCRIPT, len(keys), *keys, *wargs)])
        c.pipeline([resp("EVAL", SCRIPT, len(keys), *keys, *rargs)])
    return n


def run_journal(c, pushes, turn):
    n = 0
    while n < pushes:
        fields = ["demo\x1fd%d\x1f%s" % ((n + k) % 1000, field(n + k)) for k in range(turn)]
        args = ["HSET", "ll:rel:{n1}"]
        for f in fields:
            args += [f, RECORD]
        c.pipeline([resp(*args)])
        c.pipeline([resp("HDEL", "ll:rel:{n1}", *fields)])
        n += turn
    return n


def memory(c, records, devices):
    c.pipeline([resp("FLUSHALL")])
    before = int(c.info("memory")["used_memory"])
    cmds = []
    for n in range(records):
        cmds.append(resp("HSET", "ll:rel:{demo:d%d}" % (n % devices), field(n), RECORD))
        if len(cmds) == 1000:
            c.pipeline(cmds)
            cmds = []
    if cmds:
        c.pipeline(cmds)
    after = int(c.info("memory")["used_memory"])
    return (after - before) / records


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pushes", type=int, default=300_000)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--turn", type=int, default=1000)
    ap.add_argument("--records", type=int, default=100_000)
    a = ap.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("redis-server is missing (apt-get install redis-server)")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    d = tempfile.mkdtemp(prefix="ll-redis-cost-")
    srv = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", d],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 10
        while True:
            try:
                c = Conn(port)
                c.pipeline([resp("PING")])
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.05)
        print("redis-server %s, %d pushes over %d devices, %d per turn, record %d B"
              % (c.info("server")["redis_version"].strip(), a.pushes, a.devices, a.turn,
                 len(RECORD)))
        print("%-8s %12s %12s %14s %14s"
              % ("", "calls/push", "commands", "cmds/push", "Redis µs/push"))
        for name, go in [
            ("plain", lambda: run_plain(c, a.pushes, a.devices, a.turn, 1)),
            ("plain4", lambda: run_plain(c, a.pushes, a.devices, a.turn, 4)),
            ("script", lambda: run_script(c, a.pushes, a.devices, a.turn)),
            ("journal", lambda: run_journal(c, a.pushes, a.turn)),
        ]:
            c.pipeline([resp("FLUSHALL"), resp("CONFIG", "RESETSTAT")])
            t0 = cpu(c)
            sent0 = c.sent
            n = go()
            sent = c.sent - sent0
            used = cpu(c) - t0
            # Redis counts the commands a script runs, too (less the INFO cpu pair here).
            done = int(c.info("stats")["total_commands_processed"]) - 2
            print("%-8s %12.3f %12d %14.3f %14.2f"
                  % (name, sent / n, done, done / n, used / n * 1e6))
        print("memory   %.0f B per record (%d records over %d device hashes)"
              % (memory(c, a.records, a.devices), a.records, a.devices))
    finally:
        srv.terminate()
        srv.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
