#!/usr/bin/env python3
"""Third-party client test: the real Python `websockets` library against longlink.

Usage:
    python3 tests/clients/ws_python.py --http HOST:PORT --api HOST:PORT

--http is the gateway's client listener (WebSocket + long-poll), --api its internal
API. The gateway must run in dev mode (app "demo" admits any token, service 1 is
builtin:echo). Every check prints PASS/FAIL; the last line is "N passed, M failed".
Exit 0 only when all checks pass. The whole run is bounded by --timeout seconds.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import websockets
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

RECV_TIMEOUT = 5.0

# Control methods (service 0), docs/PROTOCOL.md
HELLO, PING, PONG, ACK, BYE, REDIRECT, ERROR, PUSH = 1, 2, 3, 4, 5, 6, 7, 8


# --------------------------------------------------------------------------
# A tiny hand-rolled protobuf codec for longlink.Frame (proto/frame.proto)
# --------------------------------------------------------------------------

def _varint(v: int) -> bytes:
    if v < 0:  # negative int32/int64: two's complement over 64 bits (10 bytes)
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, i: int):
    shift = 0
    v = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            return v, i
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _ld(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def encode_frame(seqid=0, logid=0, service=0, method=0, headers=(), payload_encoding="",
                 payload_type="", payload=b"") -> bytes:
    out = bytearray()
    if seqid:
        out += _key(1, 0) + _varint(seqid)
    if logid:
        out += _key(2, 0) + _varint(logid)
    if service:
        out += _key(3, 0) + _varint(service)
    if method:
        out += _key(4, 0) + _varint(method)
    for k, v in headers:
        h = bytearray()
        if k:
            h += _ld(1, k.encode())
        if v:
            h += _ld(2, v.encode())
        out += _ld(5, bytes(h))
    if payload_encoding:
        out += _ld(6, payload_encoding.encode())
    if payload_type:
        out += _ld(7, payload_type.encode())
    if payload:
        out += _ld(8, bytes(payload))
    return bytes(out)


def _fields(buf: bytes):
    """Yield (field, wire_type, value) for every field; skips nothing, raises on garbage."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _read_varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated length-delimited field")
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        yield field, wt, v


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def decode_frame(buf: bytes) -> dict:
    f = {"seqid": 0, "logid": 0, "service": 0, "method": 0, "headers": [],
         "payload_encoding": "", "payload_type": "", "payload": b""}
    for field, wt, v in _fields(buf):
        if field == 1 and wt == 0:
            f["seqid"] = v
        elif field == 2 and wt == 0:
            f["logid"] = v
        elif field == 3 and wt == 0:
            f["service"] = _int32(v)
        elif field == 4 and wt == 0:
            f["method"] = _int32(v)
        elif field == 5 and wt == 2:
            k = val = ""
            for hf, hwt, hv in _fields(v):
                if hf == 1 and hwt == 2:
                    k = hv.decode()
                elif hf == 2 and hwt == 2:
                    val = hv.decode()
            f["headers"].append((k, val))
        elif field == 6 and wt == 2:
            f["payload_encoding"] = v.decode()
        elif field == 7 and wt == 2:
            f["payload_type"] = v.decode()
        elif field == 8 and wt == 2:
            f["payload"] = bytes(v)
    return f


def header(frame: dict, key: str):
    for k, v in frame["headers"]:
        if k == key:
            return v
    return None


def _selftest_codec():
    fr = encode_frame(seqid=300, logid=1 << 40, service=1, method=-3,
                      headers=[("a", "b"), ("conn_id", "n1:0:2")], payload_type="text",
                      payload=b"\x00\xffhi")
    d = decode_frame(fr)
    assert d["seqid"] == 300 and d["logid"] == 1 << 40 and d["service"] == 1, d
    assert d["method"] == -3 and d["headers"] == [("a", "b"), ("conn_id", "n1:0:2")], d
    assert d["payload_type"] == "text" and d["payload"] == b"\x00\xffhi", d
    assert decode_frame(b"")["seqid"] == 0


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

class CheckFailed(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def _http(method, url, body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def api(method, url, body=None, headers=None):
    status, raw = await asyncio.to_thread(_http, method, url, body, headers)
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = raw
    return status, data


async def recv(ws, what):
    try:
        return await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
    except asyncio.TimeoutError:
        raise CheckFailed(f"timed out after {RECV_TIMEOUT}s waiting for {what}")


def q(s):
    return urllib.parse.quote(s, safe="")


class Ctx:
    def __init__(self, http, api_addr):
        self.http = http
        self.api = api_addr
        self.run = f"py-{os.getpid()}-{int(time.time() * 1000) % 100000000}"

    def device(self, name):
        return f"{self.run}-{name}"

    def ws_url(self, device, app="demo", user=None):
        u = f"ws://{self.http}/ws?app_id={q(app)}&device_id={q(device)}&token=anything"
        if user:
            u += f"&user_id={q(user)}"
        return u

    async def push(self, device, payload: bytes, payload_type=None, content_type=None):
        url = f"http://{self.api}/v1/push/device/demo/{q(device)}"
        if payload_type is not None:
            url += f"?payload_type={q(payload_type)}"
        # Set Content-Type explicitly: the gateway derives payload_type from it when the
        # query has none (urllib would otherwise send application/x-www-form-urlencoded).
        hdrs = {"Content-Type": content_type or "application/octet-stream"}
        status, data = await api("POST", url, payload, hdrs)
        check(status == 200, f"push to {device}: HTTP {status} {data!r}")
        check(isinstance(data, dict) and data.get("delivered") == 1,
              f"push to {device}: expected delivered=1, got {data!r}")
        return data

    async def metric(self, name):
        status, raw = await asyncio.to_thread(_http, "GET", f"http://{self.api}/metrics")
        check(status == 200, f"/metrics: HTTP {status}")
        for line in raw.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise CheckFailed(f"no metric {name}")

    async def kick(self, device, reason):
        url = f"http://{self.api}/v1/kick/device/demo/{q(device)}?reason={q(reason)}"
        status, data = await api("POST", url, b"")
        check(status == 200, f"kick {device}: HTTP {status} {data!r}")
        check(isinstance(data, dict) and data.get("kicked") == 1,
              f"kick {device}: expected kicked=1, got {data!r}")


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------

async def t_raw_echo_and_push(c: Ctx):
    dev = c.device("raw")
    async with connect(c.ws_url(dev, user="alice"), open_timeout=RECV_TIMEOUT) as ws:
        check(ws.subprotocol is None, f"raw mode: expected no subprotocol, got {ws.subprotocol!r}")

        await ws.send("hello longlink")
        m = await recv(ws, "text echo")
        check(m == "hello longlink", f"text echo: expected str 'hello longlink', got {m!r}")

        blob = bytes([0, 1, 2, 0xFE, 0xFF]) + b"binary"
        await ws.send(blob)
        m = await recv(ws, "binary echo")
        check(isinstance(m, bytes), f"binary echo: expected bytes, got {type(m).__name__} {m!r}")
        check(m == blob, f"binary echo: expected {blob!r}, got {m!r}")

        # Online query: registered as a WebSocket connection.
        status, data = await api("GET", f"http://{c.api}/v1/online/device/demo/{q(dev)}")
        check(status == 200, f"online query: HTTP {status} {data!r}")
        check(data.get("online") is True, f"online query: expected online=true, got {data!r}")
        conns = data.get("connections") or []
        check(len(conns) == 1, f"online query: expected 1 connection, got {conns!r}")
        check(conns[0].get("transport") == "ws",
              f"online query: expected transport 'ws', got {conns[0]!r}")
        check(conns[0].get("device_id") == dev and conns[0].get("user_id") == "alice",
              f"online query: expected device_id={dev} user_id=alice, got {conns[0]!r}")

        # Text push → one TEXT message (str) carrying only the payload.
        await c.push(dev, "héllo push".encode(), payload_type="text")
        m = await recv(ws, "text push")
        check(isinstance(m, str), f"text push: expected str, got {type(m).__name__} {m!r}")
        check(m == "héllo push", f"text push: expected 'héllo push', got {m!r}")

        # Non-UTF-8 push without payload_type → one BINARY message (bytes).
        raw = b"\xff\xfe\x00\x80push"
        await c.push(dev, raw)
        m = await recv(ws, "binary push")
        check(isinstance(m, bytes), f"binary push: expected bytes, got {type(m).__name__} {m!r}")
        check(m == raw, f"binary push: expected {raw!r}, got {m!r}")

        # JSON push (payload_type=json, UTF-8) → TEXT message too.
        await c.push(dev, b'{"k":1}', payload_type="json")
        m = await recv(ws, "json push")
        check(m == '{"k":1}', f"json push: expected str '{{\"k\":1}}', got {m!r}")


async def t_pbbp2(c: Ctx):
    dev = c.device("pb")
    async with connect(c.ws_url(dev), subprotocols=["pbbp2"], open_timeout=RECV_TIMEOUT) as ws:
        check(ws.subprotocol == "pbbp2", f"pbbp2: expected negotiated subprotocol 'pbbp2', got {ws.subprotocol!r}")

        m = await recv(ws, "HELLO")
        check(isinstance(m, bytes), f"HELLO: expected a binary message, got {type(m).__name__} {m!r}")
        hello = decode_frame(m)
        check(hello["service"] == 0 and hello["method"] == HELLO,
              f"first frame: expected HELLO (service 0 method 1), got {hello!r}")
        conn_id = header(hello, "conn_id")
        check(conn_id and conn_id.count(":") == 2, f"HELLO: expected conn_id NODE:INDEX:GEN, got {hello['headers']!r}")
        for k in ("heartbeat_s", "heartbeat_ms", "read_timeout_ms", "node_id"):
            check(header(hello, k), f"HELLO: missing header {k}: {hello['headers']!r}")

        # PING → PONG with the same seqid.
        await ws.send(encode_frame(seqid=4242, service=0, method=PING))
        pong = decode_frame(await recv(ws, "PONG"))
        check(pong["service"] == 0 and pong["method"] == PONG and pong["seqid"] == 4242,
              f"PING seqid 4242: expected PONG seqid 4242, got {pong!r}")

        # service 1 (builtin:echo) → the same frame back.
        payload = b"\x00\x01echo\xff"
        await ws.send(encode_frame(seqid=7, service=1, method=33, payload_type="pb", payload=payload))
        echo = decode_frame(await recv(ws, "service-1 echo"))
        check((echo["seqid"], echo["service"], echo["method"], echo["payload"]) == (7, 1, 33, payload),
              f"service-1 echo: expected seqid 7 service 1 method 33 payload {payload!r}, got {echo!r}")

        # Pushes: PUSH frames with per-connection seqid 1, 2, ...
        await c.push(dev, b"pb-push-1", payload_type="text")
        p = decode_frame(await recv(ws, "PUSH 1"))
        check(p["service"] == 0 and p["method"] == PUSH, f"push: expected PUSH frame, got {p!r}")
        check(p["seqid"] == 1, f"first push: expected seqid 1, got {p['seqid']} ({p!r})")
        check(p["payload"] == b"pb-push-1", f"first push: expected payload b'pb-push-1', got {p['payload']!r}")
        check(p["payload_type"] == "text", f"first push: expected payload_type 'text', got {p['payload_type']!r}")

        await c.push(dev, b"\xff\x00")
        p = decode_frame(await recv(ws, "PUSH 2"))
        check(p["method"] == PUSH and p["seqid"] == 2 and p["payload"] == b"\xff\x00",
              f"second push: expected PUSH seqid 2 payload b'\\xff\\x00', got {p!r}")

        # Kick in pbbp2 mode: BYE (reason) then close 1008.
        await c.kick(dev, "bye")
        bye = decode_frame(await recv(ws, "BYE"))
        check(bye["service"] == 0 and bye["method"] == BYE and header(bye, "reason") == "bye",
              f"kick: expected BYE frame with reason=bye, got {bye!r}")
        try:
            m = await recv(ws, "close after BYE")
            raise CheckFailed(f"kick: expected the connection to close after BYE, got message {m!r}")
        except ConnectionClosed as e:
            check(e.rcvd is not None and e.rcvd.code == 1008 and e.rcvd.reason == "bye",
                  f"kick (pbbp2): expected close 1008 'bye', got rcvd={e.rcvd!r}")


async def t_compression(c: Ctx):
    """permessage-deflate, as the library offers it by default: negotiated without context
    takeover; big messages compressed both ways in raw and pbbp2 mode, small ones not."""
    dev, pb_dev = c.device("zip"), c.device("zip-pb")
    sent0 = await c.metric("longlink_ws_compressed_sent_total")
    in0 = await c.metric("longlink_ws_inflated_total")
    async with connect(c.ws_url(dev)) as ws, connect(c.ws_url(pb_dev), subprotocols=["pbbp2"]) as pb:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        check(ext.startswith("permessage-deflate") and "client_no_context_takeover" in ext,
              f"expected permessage-deflate, got {ext!r}")
        big = "longlink compresses what is big enough; " * 300
        await ws.send(big)
        check(await recv(ws, "big echo") == big, "big echo differs")
        await c.push(dev, big.encode(), payload_type="text")
        check(await recv(ws, "big push") == big, "big push differs")
        await ws.send("small")
        check(await recv(ws, "small echo") == "small", "small echo differs")
        decode_frame(await recv(pb, "HELLO"))
        await c.push(pb_dev, big.encode())
        f = decode_frame(await recv(pb, "pbbp2 big push"))
        check(f["method"] == PUSH and f["seqid"] == 1 and f["payload"] == big.encode(),
              f"pbbp2 big push: got seqid {f['seqid']}, {len(f['payload'])} bytes")
    sent = await c.metric("longlink_ws_compressed_sent_total") - sent0
    inflated = await c.metric("longlink_ws_inflated_total") - in0
    check(sent == 3, f"expected 3 messages sent compressed, got {sent}")
    check(inflated >= 1, f"expected the big message to arrive compressed, got {inflated}")


async def t_tls(c: Ctx, https: str, tcp_tls: str, ca: str):
    """Over TLS, with the standard library's ssl trusting the test CA: wss:// (compressed
    too), a push, an https long-poll released by a status set, and the TCP transport's
    HELLO and a push on a TLS socket."""
    import socket
    import ssl
    ctx = ssl.create_default_context(cafile=ca)
    port = https.rsplit(":", 1)[1]
    dev = c.device("tls")
    url = f"wss://localhost:{port}/ws?app_id=demo&device_id={q(dev)}&token=anything"
    async with connect(url, ssl=ctx) as ws:
        check(ws.response.headers.get("Sec-WebSocket-Extensions", "").startswith("permessage-deflate"),
              "permessage-deflate over TLS")
        big = "encrypted and compressed " * 500
        await ws.send(big)
        check(await recv(ws, "wss echo") == big, "wss echo differs")
        await c.push(dev, b"pushed over wss", payload_type="text")
        check(await recv(ws, "wss push") == "pushed over wss", "wss push differs")
    key = f"{c.run}-scan"

    def poll():
        r = urllib.request.urlopen(f"https://localhost:{port}/poll/status?key={key}&timeout=10",
                                   context=ctx, timeout=15)
        return r.status, json.loads(r.read())

    task = asyncio.create_task(asyncio.to_thread(poll))
    await asyncio.sleep(0.3)
    status, data = await api("POST", f"http://{c.api}/v1/status/{key}", b'{"user":"u1"}')
    check(status == 200 and data.get("released") == 1, f"status set: {status} {data!r}")
    st, got = await task
    check(st == 200 and got.get("data") == {"user": "u1"}, f"https poll: {st} {got!r}")
    # The TCP transport: length-prefixed Frames on a TLS socket.
    host, tport = tcp_tls.rsplit(":", 1)
    tdev = c.device("tls-tcp")

    def tcp():
        with socket.create_connection((host, int(tport)), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as s:
            hello = encode_frame(seqid=1, method=HELLO, headers=[("app_id", "demo"), ("device_id", tdev), ("token", "t")])
            s.sendall(len(hello).to_bytes(2, "big") + hello)
            frames, buf = [], b""
            while len(frames) < 2:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                    n = int.from_bytes(buf[:2], "big")
                    frames.append(decode_frame(buf[2:2 + n]))
                    buf = buf[2 + n:]
                    if len(frames) == 1:
                        _http("POST", f"http://{c.api}/v1/push/device/demo/{q(tdev)}", b"tcp over tls",
                              {"Content-Type": "application/octet-stream"})
            return frames

    frames = await asyncio.to_thread(tcp)
    check(len(frames) == 2 and frames[0]["method"] == HELLO, f"TLS TCP HELLO: {frames!r}")
    check(frames[1]["method"] == PUSH and frames[1]["payload"] == b"tcp over tls", f"TLS TCP push: {frames!r}")


async def t_kick_raw(c: Ctx):
    dev = c.device("kick")
    async with connect(c.ws_url(dev), open_timeout=RECV_TIMEOUT) as ws:
        await ws.send("ping")
        check(await recv(ws, "echo before kick") == "ping", "echo before kick")
        await c.kick(dev, "bye")
        try:
            m = await recv(ws, "close after kick")
            raise CheckFailed(f"kick: expected ConnectionClosed, got message {m!r}")
        except ConnectionClosed as e:
            check(e.rcvd is not None, f"kick: connection closed without a close frame ({e!r})")
            check(e.rcvd.code == 1008, f"kick: expected close code 1008, got {e.rcvd.code}")
            check(e.rcvd.reason == "bye", f"kick: expected close reason 'bye', got {e.rcvd.reason!r}")


async def t_unknown_app(c: Ctx):
    url = c.ws_url(c.device("nope"), app="nope")
    try:
        async with connect(url, open_timeout=RECV_TIMEOUT):
            pass
    except InvalidStatus as e:
        check(e.response.status_code == 403,
              f"unknown app: expected HTTP 403, got {e.response.status_code}")
        return
    raise CheckFailed("unknown app: expected the handshake to be rejected, but it was accepted")


async def t_upgrade(c: Ctx, pid: int, https: str = "", ca: str = ""):
    """Both modes across a live upgrade (kill -HUP): the library's own keepalive pings
    (every 50 ms, 0.5 s to answer) never go unanswered, the connections never close, and
    pushes to them reach them from the new process. With `https`: the same over wss://
    (the ssl module, TLS 1.3), the TLS state carried to the new process."""
    raw_dev, pb_dev = c.device("up-raw"), c.device("up-pb")
    opts = dict(open_timeout=RECV_TIMEOUT, ping_interval=0.05, ping_timeout=0.5)
    url = c.ws_url
    if https:
        import ssl
        opts["ssl"] = ssl.create_default_context(cafile=ca)
        port = https.rsplit(":", 1)[1]
        url = lambda d: c.ws_url(d).replace(f"ws://{c.http}", f"wss://localhost:{port}", 1)  # noqa: E731
    async with connect(url(raw_dev), **opts) as raw, \
            connect(url(pb_dev), subprotocols=["pbbp2"], **opts) as pb:
        if https:
            v = raw.transport.get_extra_info("ssl_object").version()
            check(v == "TLSv1.3", f"TLS version {v}")
        hello = decode_frame(await recv(pb, "HELLO"))
        check(hello["method"] == HELLO, f"expected HELLO, got {hello!r}")
        # Application PINGs on pbbp2 throughout, each answered.
        pongs, gap, stop = [], [0.0], [False]

        # Stopped by a flag, not cancelled: a cancel between a PING and its PONG would
        # leave the PONG queued for the push read below.
        async def pinger():
            seq, last = 1000, time.monotonic()
            while not stop[0]:
                seq += 1
                await pb.send(encode_frame(seqid=seq, service=0, method=PING))
                f = decode_frame(await recv(pb, "PONG"))
                check(f["method"] == PONG and f["seqid"] == seq, f"expected PONG {seq}, got {f!r}")
                now = time.monotonic()
                gap[0] = max(gap[0], now - last)
                last = now
                pongs.append(seq)
                await asyncio.sleep(0.01)

        task = asyncio.create_task(pinger())
        await asyncio.sleep(0.3)
        status, before = await api("GET", f"http://{c.api}/healthz")
        check(before.get("pid") == pid, f"/healthz before: {before!r}")
        os.kill(pid, signal.SIGHUP)
        t0 = time.monotonic()
        new = pid
        while new == pid:
            check(time.monotonic() - t0 < 15, "no new process 15 s after SIGHUP")
            await asyncio.sleep(0.01)
            status, h = await api("GET", f"http://{c.api}/healthz")
            new = h.get("pid") if status == 200 else pid
        print(f"NEWPID {new}", flush=True)
        await asyncio.sleep(0.3)
        stop[0] = True
        await task
        check(len(pongs) > 20, f"only {len(pongs)} PONGs")
        check(gap[0] < 0.25, f"largest PONG gap {gap[0] * 1000:.0f} ms")
        await c.push(raw_dev, b"after the upgrade", payload_type="text")
        m = await recv(raw, "push after the upgrade")
        check(m == "after the upgrade", f"raw push: got {m!r}")
        await c.push(pb_dev, b"pb after")
        f = decode_frame(await recv(pb, "pbbp2 push after the upgrade"))
        check(f["method"] == PUSH and f["payload"] == b"pb after", f"pbbp2 push: got {f!r}")
        # Still the same connections: echo in raw mode, and open.
        await raw.send("still here")
        check(await recv(raw, "echo") == "still here", "raw echo after the upgrade")
        # Compression negotiated before the upgrade goes on in the new process (its
        # counters start at zero).
        big = "compressed across the upgrade " * 200
        await raw.send(big)
        check(await recv(raw, "big echo") == big, "big echo after the upgrade differs")
        await c.push(pb_dev, big.encode())
        f = decode_frame(await recv(pb, "big pbbp2 push after the upgrade"))
        check(f["payload"] == big.encode(), "big pbbp2 push after the upgrade differs")
        sent = await c.metric("longlink_ws_compressed_sent_total")
        check(sent == 2, f"expected 2 compressed messages from the new process, got {sent}")
        check(raw.state.name == "OPEN" and pb.state.name == "OPEN", "a connection closed")


CHECKS = [
    ("raw mode: text/binary echo, online query, text/binary/json push", t_raw_echo_and_push),
    ("pbbp2: subprotocol, HELLO, PING/PONG, service-1 echo, PUSH seqids, kick BYE", t_pbbp2),
    ("raw mode kick: close 1008 'bye'", t_kick_raw),
    ("permessage-deflate: negotiated, big messages compressed both ways", t_compression),
    ("unknown app: HTTP 403 before upgrade", t_unknown_app),
]


async def main(args) -> int:
    _selftest_codec()
    c = Ctx(args.http, args.api)
    print(f"websockets {websockets.__version__}; gateway http={c.http} api={c.api}; run {c.run}")
    passed = failed = 0
    checks = CHECKS
    if args.upgrade_pid:
        checks = [("both modes across a live upgrade (kill -HUP)",
                   lambda c: t_upgrade(c, args.upgrade_pid))]
    if args.https and args.upgrade_pid:
        checks = [("both modes over wss:// across a live upgrade (kill -HUP)",
                   lambda c: t_upgrade(c, args.upgrade_pid, args.https, args.ca))]
    elif args.https:
        checks = [("TLS: wss://, https long-poll, the TCP transport (ssl module)",
                   lambda c: t_tls(c, args.https, args.tcp_tls, args.ca))]
    for name, fn in checks:
        t0 = time.monotonic()
        try:
            await fn(c)
        except Exception as e:  # noqa: BLE001 - report any failure, go on with the next check
            failed += 1
            kind = "" if isinstance(e, CheckFailed) else f"{type(e).__name__}: "
            print(f"FAIL {name}: {kind}{e}")
        else:
            passed += 1
            print(f"PASS {name} ({(time.monotonic() - t0) * 1000:.0f} ms)")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--http", required=True, help="gateway client listener HOST:PORT")
    ap.add_argument("--api", required=True, help="gateway internal API HOST:PORT")
    ap.add_argument("--timeout", type=float, default=30.0, help="overall time limit in seconds")
    ap.add_argument("--https", default="", help="only: the TLS checks against this HTTPS listener")
    ap.add_argument("--tcp-tls", default="", help="the TCP-over-TLS listener (with --https)")
    ap.add_argument("--ca", default="", help="the CA file the TLS checks trust (with --https)")
    ap.add_argument("--upgrade-pid", type=int, default=0,
                    help="only: clients across a live upgrade of this gateway pid (SIGHUP)")
    a = ap.parse_args()

    # Hard overall limit, independent of the event loop (a cancellation swallowed inside a
    # library must not let the run go on): print and leave at once.
    def _overall_timeout():
        print(f"FAIL: overall timeout of {a.timeout}s exceeded", flush=True)
        os._exit(2)

    watchdog = threading.Timer(a.timeout, _overall_timeout)
    watchdog.daemon = True
    watchdog.start()
    rc = asyncio.run(main(a))
    watchdog.cancel()
    sys.stdout.flush()
    sys.exit(rc)
