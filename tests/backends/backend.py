#!/usr/bin/env python3
"""A real HTTP backend for longlink's backend tests (tests/backends.rs): auth callback,
upstream services and events, recording everything it receives.

    python3 tests/backends/backend.py        # prints {"port": N} on its first line

POST /auth     token "good" → 200 {"user_id": "u-<device>", "session": {"tier": "gold"}};
               "deny" → 403; "boom" → 500; "slow" → sleeps 2 s then admits;
               "notjson" → 200 with a body that is not JSON; "bigsession" → 200 with a
               session of 100 keys; else → 401
POST /svc      JSON envelope in; payload "fail" → 500; "sleep" → sleeps 2 s; "big:N" →
               200 text/plain, N bytes; else →
               200 {"payload": "echo:<payload>", "payload_type": "text"}
POST /svc-pb   application/x-protobuf in → 200 text/plain "pb:<bytes received>"
POST /events   records the event (after ?delay_ms=N); the first ?fail=N events (per process) get 503
POST /undelivered  records the report of a given-up push
GET  /log      {"auth": [...], "svc": [...], "events": [...], "undelivered": [...]}: every
               request received
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

LOG = {"auth": [], "svc": [], "events": [], "undelivered": []}
LOCK = threading.Lock()
FAILED_EVENTS = [0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as longlink's pooled client expects

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", ctype="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/log"):
            with LOCK:
                return self.reply(200, LOG)
        self.reply(404, {"error": "no such path"})

    def do_POST(self):
        url = urlparse(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if url.path == "/auth":
            req = json.loads(body)
            with LOCK:
                LOG["auth"].append(req)
            token = req.get("token")
            if token == "slow":
                time.sleep(2)
                token = "good"
            if token == "good":
                return self.reply(200, {"user_id": "u-" + req["device_id"], "session": {"tier": "gold"}})
            if token == "deny":
                return self.reply(403, {"error": "denied"})
            if token == "boom":
                return self.reply(500, {"error": "boom"})
            if token == "notjson":
                return self.reply(200, b"welcome!", "text/plain")
            if token == "bigsession":
                return self.reply(200, {"user_id": "u", "session": {"k%d" % i: "v" for i in range(100)}})
            return self.reply(401, {"error": "bad token"})
        if url.path == "/svc":
            req = json.loads(body)
            req["received_at"] = time.time()
            with LOCK:
                LOG["svc"].append(req)
            payload = req.get("payload", "")
            if payload == "fail":
                return self.reply(500, {"error": "failed"})
            if payload == "sleep":
                time.sleep(2)
            if payload.startswith("big:"):
                return self.reply(200, b"x" * int(payload[4:]), "text/plain")
            return self.reply(200, {"payload": "echo:" + payload, "payload_type": "text"})
        if url.path == "/svc-pb":
            with LOCK:
                LOG["svc"].append({"protobuf_bytes": len(body), "conn_id": self.headers.get("X-Longlink-Conn-Id"),
                                   "session": self.headers.get("X-Longlink-Session")})
            return self.reply(200, b"pb:%d" % len(body), "text/plain")
        if url.path == "/events":
            fail = int(parse_qs(url.query).get("fail", ["0"])[0])
            # A slow webhook: each event takes this long to be taken.
            time.sleep(int(parse_qs(url.query).get("delay_ms", ["0"])[0]) / 1000)
            with LOCK:
                if FAILED_EVENTS[0] < fail:
                    FAILED_EVENTS[0] += 1
                    LOG["events"].append({"rejected": json.loads(body)})
                    return self.reply(503, {"error": "try again"})
                LOG["events"].append(json.loads(body))
            return self.reply(200, {"ok": True})
        if url.path == "/undelivered":
            with LOCK:
                LOG["undelivered"].append(json.loads(body))
            return self.reply(200, {"ok": True})
        self.reply(404, {"error": "no such path"})


def main():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    print(json.dumps({"port": srv.server_address[1]}), flush=True)
    # Exit when the test harness closes our stdin (it always outlives us otherwise).
    threading.Thread(target=lambda: (sys.stdin.read(), srv.shutdown()), daemon=True).start()
    srv.serve_forever()


if __name__ == "__main__":
    main()
