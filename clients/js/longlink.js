// longlink JavaScript client: one ES module, no build step, no dependencies. Runs unchanged
// in browsers and in Node >= 18 (Node 22+ has a global WebSocket; older ones pass one in,
// e.g. `new Longlink({ WebSocket: (await import('ws')).default, ... })`).
//
// The Frame codec is written out here (about a hundred lines) rather than taken from a
// protobuf library: the Frame is eight fields that never change shape, and protobuf.js or
// google-protobuf would add 50-250 KB, a build step or a .proto parsed at run time, and a
// dependency every page must load. It is tested against the gateway's own (prost) encoding.
//
// Wire contract: docs/PROTOCOL.md in the longlink repository.

/** Control methods (`service` 0). */
export const Method = Object.freeze({
  HELLO: 1, PING: 2, PONG: 3, ACK: 4, BYE: 5, REDIRECT: 6, ERROR: 7, PUSH: 8,
});

const enc = new TextEncoder();
const dec = new TextDecoder();
const TWO32 = 2 ** 32;

// ---------------------------------------------------------------- Frame codec (protobuf)

function writeVarint(out, v) {
  if (typeof v === 'bigint') {
    v = BigInt.asUintN(64, v);
    while (v > 0x7fn) {
      out.push(Number(v & 0x7fn) | 0x80);
      v >>= 7n;
    }
    out.push(Number(v));
    return;
  }
  if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`varint out of range: ${v}`);
  while (v > 0x7f) {
    out.push((v % 128) | 0x80);
    v = Math.floor(v / 128);
  }
  out.push(v);
}

function writeInt32(out, v) {
  if (!Number.isInteger(v) || v < -(2 ** 31) || v >= 2 ** 31) {
    throw new RangeError(`int32 out of range: ${v}`);
  }
  // A negative int32 is sent sign-extended to 64 bits (ten bytes), as protobuf requires.
  writeVarint(out, v < 0 ? BigInt(v) : v);
}

function writeBytes(out, field, bytes) {
  writeVarint(out, (field << 3) | 2);
  writeVarint(out, bytes.length);
  for (let i = 0; i < bytes.length; i++) out.push(bytes[i]);
}

/**
 * Encodes a Frame. Fields: seqid, logid (numbers or bigints), service, method (int32),
 * headers ({key: value} or [[key, value], ...]), payloadEncoding, payloadType, payload
 * (Uint8Array, ArrayBuffer or string, sent as UTF-8). Default values are left out.
 */
export function encodeFrame(f) {
  const out = [];
  if (f.seqid) { out.push(0x08); writeVarint(out, f.seqid); }
  if (f.logid) { out.push(0x10); writeVarint(out, f.logid); }
  if (f.service) { out.push(0x18); writeInt32(out, f.service); }
  if (f.method) { out.push(0x20); writeInt32(out, f.method); }
  const headers = Array.isArray(f.headers) ? f.headers : Object.entries(f.headers || {});
  for (const [k, v] of headers) {
    const h = [];
    const kb = enc.encode(String(k));
    const vb = enc.encode(String(v));
    if (kb.length) writeBytes(h, 1, kb);
    if (vb.length) writeBytes(h, 2, vb);
    writeBytes(out, 5, h);
  }
  if (f.payloadEncoding) writeBytes(out, 6, enc.encode(f.payloadEncoding));
  if (f.payloadType) writeBytes(out, 7, enc.encode(f.payloadType));
  const p = toBytes(f.payload);
  if (p.length) writeBytes(out, 8, p);
  return Uint8Array.from(out);
}

function toBytes(p) {
  if (p == null) return new Uint8Array(0);
  if (typeof p === 'string') return enc.encode(p);
  if (p instanceof Uint8Array) return p;
  if (p instanceof ArrayBuffer) return new Uint8Array(p);
  if (ArrayBuffer.isView(p)) return new Uint8Array(p.buffer, p.byteOffset, p.byteLength);
  throw new TypeError('payload must be a string, Uint8Array or ArrayBuffer');
}

class Reader {
  constructor(buf) { this.buf = buf; this.i = 0; }
  varint() {
    // Exact as a number up to 2^53; a bigint past that (a logid may use all 64 bits).
    let lo = 0, mul = 1, big = null;
    for (let n = 0; n < 10; n++) {
      if (this.i >= this.buf.length) throw new Error('truncated varint');
      const b = this.buf[this.i++];
      if (big === null && n < 7) {
        lo += (b & 0x7f) * mul;
        mul *= 128;
      } else {
        if (big === null) big = BigInt(lo);
        big |= BigInt(b & 0x7f) << BigInt(7 * n);
      }
      if (b < 0x80) {
        if (big === null) return lo;
        big = BigInt.asUintN(64, big);
        return big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
      }
    }
    throw new Error('varint longer than 10 bytes');
  }
  bytes() {
    const n = this.varint();
    if (typeof n !== 'number' || this.i + n > this.buf.length) throw new Error('truncated field');
    const b = this.buf.subarray(this.i, this.i + n);
    this.i += n;
    return b;
  }
  skip(wire) {
    if (wire === 0) this.varint();
    else if (wire === 1) this.advance(8);
    else if (wire === 2) this.bytes();
    else if (wire === 5) this.advance(4);
    else throw new Error(`unsupported wire type ${wire}`);
  }
  advance(n) {
    if (this.i + n > this.buf.length) throw new Error('truncated field');
    this.i += n;
  }
}

function int32(v) {
  // The low 32 bits, signed (a negative int32 comes sign-extended to 64 bits).
  if (typeof v === 'bigint') return Number(BigInt.asIntN(32, v));
  return (v % TWO32) | 0;
}

/**
 * Decodes a Frame from a Uint8Array or ArrayBuffer. Throws on malformed input. Unknown
 * fields are skipped, repeated scalars take the last value, as protobuf says.
 * `headers` is a list of [key, value] in wire order; `header(name)` reads the first.
 */
export function decodeFrame(data) {
  const r = new Reader(toBytes(data));
  const f = {
    seqid: 0, logid: 0, service: 0, method: 0, headers: [],
    payloadEncoding: '', payloadType: '', payload: new Uint8Array(0),
  };
  while (r.i < r.buf.length) {
    const key = r.varint();
    if (typeof key !== 'number') throw new Error('bad field key');
    const field = Math.floor(key / 8), wire = key & 7;
    if (field === 0) throw new Error('field number 0');
    const want = field <= 4 ? 0 : field <= 8 ? 2 : -1;
    if (want !== wire) { r.skip(wire); continue; }
    switch (field) {
      case 1: f.seqid = r.varint(); break;
      case 2: f.logid = r.varint(); break;
      case 3: f.service = int32(r.varint()); break;
      case 4: f.method = int32(r.varint()); break;
      case 5: f.headers.push(decodeHeader(r.bytes())); break;
      case 6: f.payloadEncoding = dec.decode(r.bytes()); break;
      case 7: f.payloadType = dec.decode(r.bytes()); break;
      case 8: f.payload = r.bytes().slice(); break;
      default: r.skip(wire);
    }
  }
  return f;
}

function decodeHeader(buf) {
  const r = new Reader(buf);
  let k = '', v = '';
  while (r.i < r.buf.length) {
    const key = r.varint();
    if (typeof key !== 'number') throw new Error('bad field key');
    const field = Math.floor(key / 8), wire = key & 7;
    if (wire === 2 && field === 1) k = dec.decode(r.bytes());
    else if (wire === 2 && field === 2) v = dec.decode(r.bytes());
    else r.skip(wire);
  }
  return [k, v];
}

/** The first header named `name`, or undefined. */
export function header(frame, name) {
  const h = frame.headers.find(([k]) => k === name);
  return h ? h[1] : undefined;
}

// ---------------------------------------------------------------- helpers

/** An ERROR frame from the gateway (or a local failure), with its code. */
export class LonglinkError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'LonglinkError';
    this.code = code;
  }
}

/** A request refused locally: its Frame is past the gateway's limit. */
function tooBig(size, max) {
  return new LonglinkError(413, `request is ${size} bytes, over the gateway's ${max}`);
}

/**
 * Full-jitter exponential backoff: the wait before reconnect attempt `n` (0 = the first
 * after a drop) is uniform in [0, min(max, min * 2^n)], so clients dropped together come
 * back spread over the whole window instead of in waves.
 */
export function backoffDelay(n, { min = 500, max = 20000 } = {}, random = Math.random) {
  return random() * Math.min(max, min * 2 ** Math.min(n, 30));
}

/** One received push, as the `push` event gives it. */
class Push {
  constructor(frame, data) {
    this.frame = frame;
    this.seqid = frame ? frame.seqid : 0;
    this.service = frame ? frame.service : 0;
    this.method = frame ? frame.method : Method.PUSH;
    this.payloadType = frame ? frame.payloadType : (typeof data === 'string' ? 'text' : '');
    this.pushId = frame ? header(frame, 'push_id') : undefined;
    this.payload = frame ? frame.payload : toBytes(data);
  }
  header(name) { return this.frame ? header(this.frame, name) : undefined; }
  text() { return dec.decode(this.payload); }
  json() { return JSON.parse(this.text()); }
}

/** A bounded set of recently seen ids, oldest forgotten first. */
class Recent {
  constructor(limit) { this.limit = limit; this.set = new Set(); }
  has(id) { return this.set.has(id); }
  delete(id) { this.set.delete(id); }
  add(id) {
    this.set.add(id);
    if (this.set.size > this.limit) this.set.delete(this.set.values().next().value);
  }
}

// ---------------------------------------------------------------- the client

/**
 * Closes a WebSocket whatever it is doing. WebSocket.close() throws on codes other than
 * 1000 and 3000-4999 and on reasons over 123 bytes; then it closes with no code, so the
 * socket never lingers with its handlers gone.
 */
function shut(ws, code, reason) {
  try {
    ws.close(code, reason);
  } catch {
    try { ws.close(); } catch { /* closed already */ }
  }
}

const CLOSED = 'closed', CONNECTING = 'connecting', OPEN = 'open';
/** The gateway's default `[limits] max_frame_bytes`: a Frame (a pbbp2 message) past it
 * closes the link. */
const MAX_FRAME = 65535;
/** REDIRECTs followed in a row, without a link that stayed up, before they wait a backoff. */
const MAX_REDIRECTS = 5;

/**
 * A connection to longlink over WebSocket that stays connected: reconnects with backoff,
 * follows REDIRECT, notices a dead link, ACKs reliable pushes and hands each to the app
 * once. Events (`on(name, fn)`): `connected`, `disconnected`, `push`, `error`.
 */
export class Longlink {
  /**
   * @param {object} o see longlink.d.ts (`LonglinkOptions`)
   */
  constructor(o) {
    if (!o || !o.app || !o.device) throw new TypeError('app and device are required');
    if (!o.url && !o.endpoints) throw new TypeError('url or endpoints is required');
    this.opts = {
      mode: 'pbbp2',
      token: '',
      backoff: {},
      requestTimeout: 10000,
      pongTimeout: 5000,
      connectTimeout: 10000,
      maxFrameBytes: MAX_FRAME,
      stableAfter: 5000,
      dedupWindow: 4096,
      reconnect: true,
      ...o,
    };
    this.opts.backoff = { min: 500, max: 20000, ...(o.backoff || {}) };
    // (`maxFrameBytes: undefined` or nonsense would turn the local check off.)
    const max = Number(this.opts.maxFrameBytes);
    this.opts.maxFrameBytes = max > 0 ? max : MAX_FRAME;
    this.gen = 0;
    if (!['pbbp2', 'raw'].includes(this.opts.mode)) throw new TypeError('mode is pbbp2 or raw');
    this.WS = o.WebSocket || globalThis.WebSocket;
    if (!this.WS) throw new TypeError('no WebSocket here: pass one (options.WebSocket)');
    this.random = o.random || Math.random;
    this.handlers = new Map();
    this.state = CLOSED;
    this.ws = null;
    this.attempt = 0;          // reconnect attempts since a link last stayed up
    this.redirects = 0;        // REDIRECTs followed since then
    this.stableTimer = null;
    this.redirect = null;      // the endpoint a REDIRECT named, for the next dial
    this.wanted = false;       // connect() called and close() not
    this.dialing = false;      // looking up where to dial
    this.retryTimer = null;
    this.deadTimer = null;
    this.pingTimer = null;
    this.seen = new Recent(this.opts.dedupWindow);
    this.calls = new Map();    // seqid -> pending request (sent on this connection)
    this.late = new Recent(256); // requests given up on this connection, whose answer may come
    this.queue = [];           // requests waiting for a connection
    this.nextSeq = 1;
    this.connId = null;
    this.nodeId = null;
    this.url = null;
    this.stats = { connects: 0, pushes: 0, duplicates: 0, acks: 0, redirects: 0 };
  }

  on(name, fn) {
    if (!this.handlers.has(name)) this.handlers.set(name, new Set());
    this.handlers.get(name).add(fn);
    return this;
  }

  off(name, fn) {
    this.handlers.get(name)?.delete(fn);
    return this;
  }

  emit(name, arg) {
    for (const fn of [...(this.handlers.get(name) || [])]) {
      try {
        fn(arg);
      } catch (e) {
        // A handler's exception is the app's: report it, never break the connection.
        if (name !== 'error') this.emit('error', e);
      }
    }
  }

  /** Starts connecting (and staying connected). */
  connect() {
    if (this.wanted) return this;
    this.wanted = true;
    this.dial();
    return this;
  }

  /** Closes for good: no reconnect; waiting requests fail. */
  close(code = 1000, reason = '') {
    this.wanted = false;
    this.gen++;
    this.redirect = null;
    clearTimeout(this.retryTimer);
    clearTimeout(this.stableTimer);
    this.retryTimer = null;
    const ws = this.ws;
    if (ws) {
      this.dropped(code, reason || 'closed by the app', false);
      shut(ws, code, reason);
    }
    this.failQueue(new LonglinkError(0, 'client closed'));
    this.state = CLOSED;
  }

  get connected() { return this.state === OPEN; }

  // Where to dial: a REDIRECT's endpoint first, then the app backend's pick
  // (`endpoints`), then `url`.
  async target() {
    if (this.redirect) {
      // Once: if that node fails, the next dial goes back to the usual way.
      const r = this.redirect;
      this.redirect = null;
      return r;
    }
    const e = this.opts.endpoints;
    if (e) {
      try {
        if (typeof e === 'function') {
          const u = await e();
          if (u) return u;
        } else {
          const res = await fetch(e, { cache: 'no-store', signal: AbortSignal.timeout(5000) });
          const body = await res.json();
          const pick = (body.endpoints || []).find((n) => n.ws);
          if (pick) return pick.ws;
        }
      } catch (err) {
        this.emit('error', new LonglinkError(0, `endpoints: ${err.message || err}`));
      }
    }
    if (this.opts.url) return this.opts.url;
    throw new LonglinkError(0, 'no endpoint to dial');
  }

  async dial() {
    this.retryTimer = null;
    if (!this.wanted || this.ws || this.dialing) return;
    // close() moves the generation on: a dial it overtook stops at its next step, whatever
    // connect() started since.
    const gen = this.gen;
    this.state = CONNECTING;
    const o = this.opts;
    let base;
    // A token may be a function (sync or async), asked at every dial: a short-lived token
    // (a JWT) is fetched fresh rather than refused when it has expired. It gets
    // connectTimeout, as the rest of the dial.
    let token = o.token || '';
    let step = 'no endpoint';
    this.dialing = true;
    try {
      base = await this.target();
      if (typeof token === 'function') {
        step = 'no token';
        let timer;
        const late = new Promise((_, reject) => {
          timer = setTimeout(() => reject(new LonglinkError(0, 'token: no answer within connectTimeout')),
            o.connectTimeout);
        });
        try {
          token = (await Promise.race([Promise.resolve().then(() => o.token()), late])) || '';
        } finally {
          clearTimeout(timer);
        }
      }
    } catch (e) {
      if (gen !== this.gen) return;
      this.emit('error', e);
      this.schedule(1006, step);
      return;
    } finally {
      this.dialing = false;
    }
    if (gen !== this.gen || !this.wanted || this.ws) return;
    const q = new URLSearchParams({ app_id: o.app, device_id: o.device, token });
    if (o.user) q.set('user_id', o.user);
    const url = base + (base.includes('?') ? '&' : '?') + q;
    let ws;
    try {
      ws = o.mode === 'pbbp2' ? new this.WS(url, 'pbbp2') : new this.WS(url);
    } catch (e) {
      this.emit('error', e);
      this.schedule(1006, 'bad url');
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.url = base;
    this.nextSeq = 1;
    this.late = new Recent(256);
    this.byeReason = null;
    this.redirectTo = undefined;
    // The handshake (and, pbbp2, the gateway's HELLO) must come within connectTimeout.
    this.armDead(o.connectTimeout, 'connect timeout');
    let opened = false;
    ws.onopen = () => {
      opened = true;
      if (this.ws === ws && o.mode === 'raw') this.opened(null);
    };
    ws.onmessage = (ev) => { if (this.ws === ws) this.message(ev.data); };
    ws.onerror = (ev) => {
      // A refused dial: browsers say nothing of why (a 401 looks like any failure), but
      // Node's `ws` does ("Unexpected server response: 401"); the app hears it.
      if (!opened && ev && typeof ev.message === 'string' && /server response/i.test(ev.message)) {
        this.emit('error', new LonglinkError(0, ev.message));
      }
      // Browsers follow with close (and its code); some WebSocket implementations (Node
      // 20's) fire only error when the dial fails. So: a dial that failed is over now, an
      // open socket gets a moment for its close.
      setTimeout(() => { if (this.ws === ws) this.dropped(1006, 'connection failed', true); },
        opened ? 1000 : 0);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      // Raw mode has no BYE: a kick is close 1008 with its reason.
      // (Not the gateway's own 1008s: over the message rate, or a message never finished;
      // those reconnect as any drop.)
      if (o.mode === 'raw' && ev.code === 1008 && !this.byeReason &&
          !/^(rate limited|a frame was begun)/.test(ev.reason || '')) {
        this.byeReason = ev.reason || 'kicked';
      }
      // Raw mode has no REDIRECT either: a draining gateway names the next one in its
      // close 1012 (`draining; endpoint=URL`), followed as a REDIRECT is.
      const to = o.mode === 'raw' && ev.code === 1012 && /^draining; endpoint=(\S+)$/.exec(ev.reason || '');
      if (to) {
        this.stats.redirects++;
        this.redirectTo = this.wsUrl(to[1]);
      }
      this.dropped(ev.code, ev.reason || this.byeReason || '', true);
    };
  }

  // The connection is usable: HELLO seen (pbbp2) or open (raw).
  opened(hello) {
    clearTimeout(this.deadTimer);
    this.state = OPEN;
    this.stats.connects++;
    this.redirect = null;
    // The backoff starts again only once a link has stayed up a while: a gateway that
    // admits and drops at once must not get its clients back every half second.
    clearTimeout(this.stableTimer);
    const ws = this.ws;
    this.stableTimer = setTimeout(() => {
      if (this.ws === ws) this.attempt = this.redirects = 0;
    }, this.opts.stableAfter);
    this.connId = hello ? header(hello, 'conn_id') : null;
    this.nodeId = hello ? header(hello, 'node_id') : null;
    if (hello) {
      // Dead-link detection: browsers never show WebSocket pings, so the client PINGs when
      // it has heard nothing for the gateway's heartbeat and gives the link up when nothing
      // comes `pongTimeout` after that (either side may have gone away silently).
      this.heartbeat = Number(header(hello, 'heartbeat_ms')) || 25000;
      // The gateway's own limit when it says it (older gateways do not): kept for the
      // next requests, and for the reconnects after this one.
      const max = Number(header(hello, 'max_frame_bytes'));
      this.maxFrame = max > 0 ? Math.min(max, this.opts.maxFrameBytes) : this.opts.maxFrameBytes;
      this.heard();
    }
    this.emit('connected', { connId: this.connId, nodeId: this.nodeId, url: this.url });
    const q = this.queue;
    this.queue = [];
    for (const call of q) {
      // Made before this gateway said its limit: one past it fails alone, as it would have
      // in request().
      if (call.size > this.frameLimit()) this.settle(call, tooBig(call.size, this.frameLimit()), null);
      else this.transmit(call);
    }
  }

  /** The largest Frame the gateway takes: what its last HELLO said, else the option. */
  frameLimit() {
    return this.maxFrame ?? this.opts.maxFrameBytes;
  }

  heard() {
    clearTimeout(this.pingTimer);
    clearTimeout(this.deadTimer);
    this.deadTimer = null;
    const ws = this.ws;
    this.pingTimer = setTimeout(() => {
      if (this.ws !== ws) return;
      this.sendFrame({ seqid: this.seq(), method: Method.PING });
      this.armDead(this.opts.pongTimeout);
    }, this.heartbeat);
  }

  armDead(ms, why = 'dead link: no answer from the gateway') {
    clearTimeout(this.deadTimer);
    const ws = this.ws;
    this.deadTimer = setTimeout(() => {
      if (this.ws !== ws) return;
      this.dropped(4000, why, true);
      shut(ws, 4000, 'dead link');
    }, ms);
  }

  seq() { return this.nextSeq++; }

  sendFrame(f) {
    try {
      this.ws.send(encodeFrame(f));
      return true;
    } catch (e) {
      this.emit('error', e);
      return false;
    }
  }

  message(data) {
    if (this.opts.mode === 'raw') {
      // Raw mode: each message is a push's payload (text or binary), and nothing else.
      this.stats.pushes++;
      this.emit('push', new Push(null, typeof data === 'string' ? data : new Uint8Array(data)));
      return;
    }
    if (typeof data === 'string') return; // the gateway sends pbbp2 as binary only
    let f;
    try {
      f = decodeFrame(new Uint8Array(data));
    } catch (e) {
      this.emit('error', new LonglinkError(0, `undecodable frame: ${e.message}`));
      return;
    }
    if (this.state === OPEN) this.heard();
    // A reliable push names itself; a service's answer never does. (Plain pushes with a
    // service of their own share the seqid space with answers: see README.)
    if (header(f, 'push_id') !== undefined) {
      this.pushed(f);
      return;
    }
    if (f.service === 0) {
      this.control(f);
      return;
    }
    const call = this.calls.get(f.seqid);
    if (call && call.service === f.service && call.method === f.method) {
      this.settle(call, null, f); // a service's answer: same seqid, service and method
      return;
    }
    const key = `${f.seqid}/${f.service}/${f.method}`;
    if (this.late.has(key)) {
      this.late.delete(key); // the answer its caller gave up on; once
      return;
    }
    this.pushed(f);
  }

  control(f) {
    switch (f.method) {
      case Method.HELLO:
        this.opened(f);
        break;
      case Method.PING:
        this.sendFrame({ seqid: f.seqid, method: Method.PONG });
        break;
      case Method.PONG:
        break;
      case Method.PUSH:
        this.pushed(f);
        break;
      case Method.ACK: {
        const call = this.calls.get(f.seqid);
        if (call) {
          call.acked = true;
          if (!call.answer) this.settle(call, null, null);
        }
        break;
      }
      case Method.ERROR: {
        const err = new LonglinkError(Number(header(f, 'code')) || 0, header(f, 'message') || 'error');
        const call = f.seqid ? this.calls.get(f.seqid) : null;
        if (call) this.settle(call, err, null);
        else this.emit('error', err);
        break;
      }
      case Method.BYE:
        this.byeReason = header(f, 'reason') || 'bye';
        break;
      case Method.REDIRECT: {
        // Dial the named endpoint (or the usual one) now; the gateway closes this one.
        const to = header(f, 'endpoint');
        this.stats.redirects++;
        this.redirectTo = to ? this.wsUrl(to) : null;
        const ws = this.ws;
        this.dropped(1012, `redirect: ${header(f, 'reason') || ''}`, true);
        shut(ws, 1000, 'redirected');
        break;
      }
      default:
        // Not a control verb: a push sent with service 0 and a method of the app's own.
        if (f.method > Method.PUSH || f.method < 0) this.pushed(f);
        break;
    }
  }

  // REDIRECT endpoints are `ws://host:port/ws` for WebSocket clients; a bare host:port
  // keeps this connection's scheme and path. A clear `ws://` endpoint named to a `wss://`
  // link (a gateway behind a TLS-terminating balancer names its own address) is not
  // followed: null, the usual address is dialled instead.
  wsUrl(endpoint) {
    const cur = new URL(this.url);
    if (/^ws:\/\//.test(endpoint) && cur.protocol === 'wss:') return null;
    if (/^wss?:\/\//.test(endpoint)) return endpoint;
    return `${cur.protocol}//${endpoint}${cur.pathname}`;
  }

  pushed(f) {
    const p = new Push(f, null);
    // Every push is ACKed, as the protocol asks: the gateway tracks the reliable ones (and
    // ignores the rest), including any that came without an id (from an older node).
    if (f.seqid) {
      this.sendFrame({ seqid: f.seqid, method: Method.ACK });
      this.stats.acks++;
    }
    if (p.pushId !== undefined) {
      // Reliable (ack=1): to the app only the first time — it comes again under a new
      // seqid when the ACK was lost with a connection.
      if (this.seen.has(p.pushId)) {
        this.stats.duplicates++;
        return;
      }
      this.seen.add(p.pushId);
    }
    this.stats.pushes++;
    this.emit('push', p);
  }

  // The connection went (or is given up): tidy up, tell the app, plan the next dial.
  dropped(code, reason, mayReconnect) {
    const ws = this.ws;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = null;
    // Not null: closing a socket still connecting makes Node's `ws` emit an error, which
    // with no listener at all throws and ends the process.
    ws.onerror = () => {};
    this.ws = null;
    clearTimeout(this.pingTimer);
    clearTimeout(this.deadTimer);
    clearTimeout(this.stableTimer);
    const wasOpen = this.state === OPEN;
    this.state = CLOSED;
    // Requests already sent may or may not have reached their service: they fail, and the
    // app decides. Those still queued wait for the next connection.
    const lost = new LonglinkError(0, `disconnected: ${reason || code}`);
    for (const call of [...this.calls.values()]) this.settle(call, lost, null);
    // A REDIRECT is followed at once (with a little jitter), but not round and round: past
    // MAX_REDIRECTS without a link that stayed up, it waits its backoff like any drop.
    const redirected = this.redirectTo !== undefined && this.redirects++ < MAX_REDIRECTS;
    if (redirected) this.redirect = this.redirectTo;
    // A kick (BYE with a reason other than a restart) means "go away": no reconnect unless
    // the app asked for it.
    const kicked = this.byeReason && !['shutdown', 'restart', 'draining'].includes(this.byeReason);
    const again = mayReconnect && this.wanted && this.opts.reconnect &&
      (!kicked || this.opts.reconnectOnKick === true);
    let delay = null;
    if (again) {
      if (redirected) {
        delay = this.random() * Math.min(100, this.opts.backoff.min);
      } else {
        delay = backoffDelay(this.attempt++, this.opts.backoff, this.random);
      }
    } else {
      this.wanted = this.wanted && mayReconnect && again;
      this.failQueue(new LonglinkError(0, `disconnected: ${reason || code}`));
    }
    this.emit('disconnected', { code, reason, willReconnect: again, delay, wasOpen });
    if (again) this.retryTimer = setTimeout(() => this.dial(), delay);
  }

  schedule(code, reason) {
    this.state = CLOSED;
    const delay = backoffDelay(this.attempt++, this.opts.backoff, this.random);
    this.emit('disconnected', { code, reason, willReconnect: this.wanted, delay, wasOpen: false });
    if (this.wanted) this.retryTimer = setTimeout(() => this.dial(), delay);
  }

  failQueue(err) {
    const q = this.queue;
    this.queue = [];
    for (const call of q) this.settle(call, err, null);
  }

  /**
   * Sends an upstream frame to the app's service `service` (> 0) and resolves with the
   * service's answer (a Frame with the same seqid), or, with `{answer: false}`, once the
   * gateway ACKs it (the service took it). Rejects with a LonglinkError on ERROR, a lost
   * connection or the timeout. Made while disconnected, it waits for the connection.
   */
  request(service, method, payload, opt = {}) {
    if (this.opts.mode !== 'pbbp2') {
      return Promise.reject(new LonglinkError(0, 'request() needs pbbp2 mode; raw mode has send()'));
    }
    if (!(service > 0)) return Promise.reject(new RangeError('service must be > 0'));
    const frame = {
      logid: opt.logid || 0, service, method: method | 0, headers: opt.headers,
      payloadType: opt.payloadType || (typeof payload === 'string' ? 'text' : ''),
      payload,
    };
    // Checked now, not when sent (maybe later, from the connect): bad input or a Frame past
    // the gateway's limit fails this call alone, at once. (The largest seqid adds 11 bytes.)
    let size;
    try {
      size = encodeFrame({ ...frame, seqid: 1 }).length + 10;
    } catch (e) {
      return Promise.reject(e);
    }
    // Connected: the gateway's limit. Not connected: the option's; the limit of the gateway
    // it reaches is checked when its HELLO comes (`opened`), which may be another gateway.
    const max = this.state === OPEN ? this.frameLimit() : this.opts.maxFrameBytes;
    if (size > max) return Promise.reject(tooBig(size, max));
    return new Promise((resolve, reject) => {
      const call = {
        service, method: method | 0, resolve, reject, acked: false,
        answer: opt.answer !== false,
        frame, size,
      };
      call.timer = setTimeout(() => this.settle(call, new LonglinkError(504, 'request timed out'), null),
        opt.timeout ?? this.opts.requestTimeout);
      if (this.state === OPEN) this.transmit(call);
      else this.queue.push(call); // sent once connected, if before its timeout
    });
  }

  transmit(call) {
    call.seqid = this.seq();
    this.calls.set(call.seqid, call);
    try {
      // (Checked in request(): the gateway closes the whole link over a Frame past its
      // limit, with every other call in flight.)
      this.ws.send(encodeFrame({ ...call.frame, seqid: call.seqid }));
    } catch (e) {
      this.emit('error', e);
      this.settle(call, new LonglinkError(0, 'send failed'), null);
    }
  }

  settle(call, err, frame) {
    if (call.done) return;
    call.done = true;
    clearTimeout(call.timer);
    if (call.seqid !== undefined && this.calls.get(call.seqid) === call) {
      this.calls.delete(call.seqid);
      // Failed while on its way (a timeout): an answer may still come, and is not a push.
      if (err) this.late.add(`${call.seqid}/${call.service}/${call.method}`);
    }
    const i = this.queue.indexOf(call);
    if (i >= 0) this.queue.splice(i, 1);
    if (err) call.reject(err);
    else call.resolve(frame ? new Push(frame, null) : { acked: true });
  }

  /** Raw mode: one message to the app's default service (string = text, else binary). */
  send(data) {
    if (this.opts.mode !== 'raw') throw new LonglinkError(0, 'send() is for raw mode; pbbp2 has request()');
    if (this.state !== OPEN) throw new LonglinkError(0, 'not connected');
    this.ws.send(typeof data === 'string' ? data : toBytes(data));
  }
}

/**
 * Long-polls a status key on the gateway's client listener (scan-to-login): resolves with
 * `{data, version}` once the key has a value (newer than `since`, when given), or null when
 * the poll's `timeout` (seconds) runs out first.
 */
export async function pollStatus(base, key, { timeout = 30, since, signal } = {}) {
  const u = new URL('/poll/status', base);
  u.searchParams.set('key', key);
  u.searchParams.set('timeout', String(timeout));
  if (since !== undefined && since !== null) u.searchParams.set('since', String(since));
  const res = await fetch(u, { cache: 'no-store', signal });
  if (!res.ok) throw new LonglinkError(res.status, `poll: HTTP ${res.status}`);
  const body = await res.json();
  if (body.code !== 0) return null;
  return { data: body.data, version: body.version };
}

/**
 * Follows a status key through its states: calls `onValue(data, version)` for each new
 * value, in order, none twice, until `onValue` returns true or `signal` aborts. Network
 * errors are retried after `retryMs`.
 */
export async function followStatus(base, key, onValue, { signal, timeout = 30, retryMs = 2000 } = {}) {
  let since;
  while (!signal?.aborted) {
    let got;
    try {
      got = await pollStatus(base, key, { timeout, since, signal });
    } catch (e) {
      if (signal?.aborted) return;
      await new Promise((r) => setTimeout(r, retryMs));
      continue;
    }
    if (!got) continue;
    since = got.version;
    if (onValue(got.data, got.version) === true) return;
  }
}
