#!/usr/bin/env node
// Third-party client test: the real Node `ws` package against longlink.
//
//   node tests/clients/ws_node.mjs --http HOST:PORT --api HOST:PORT [--timeout SECONDS]
//
// --http is the gateway's client listener, --api its internal API; the gateway runs in
// dev mode (app "demo" admits any token, service 1 is builtin:echo). Each check prints
// PASS/FAIL; the last line is "N passed, M failed". Exit 0 only when all pass.
// Needs `npm ci` in tests/clients (scripts/deps.sh does it).

import WebSocket from 'ws';
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { CheckFailed, check, parseArgs, api, runChecks, sleep } from './common.mjs';

const RECV_TIMEOUT_MS = 5000;
const HELLO = 1, PING = 2, PONG = 3, BYE = 5, PUSH = 8;

// ---------------------------------------------------------------- protobuf (Frame only)
function varint(v) {
  let n = BigInt(v);
  if (n < 0n) n += 1n << 64n;
  const out = [];
  do {
    let b = Number(n & 0x7fn);
    n >>= 7n;
    if (n) b |= 0x80;
    out.push(b);
  } while (n);
  return Buffer.from(out);
}
function readVarint(buf, i) {
  let v = 0n, shift = 0n;
  for (;;) {
    if (i >= buf.length) throw new Error('truncated varint');
    const b = buf[i++];
    v |= BigInt(b & 0x7f) << shift;
    if (!(b & 0x80)) return [v, i];
    shift += 7n;
    if (shift >= 70n) throw new Error('varint too long');
  }
}
const key = (field, wt) => varint((field << 3) | wt);
const ld = (field, data) => Buffer.concat([key(field, 2), varint(data.length), Buffer.from(data)]);

export function encodeFrame({ seqid = 0, logid = 0, service = 0, method = 0, headers = [],
  payloadEncoding = '', payloadType = '', payload = Buffer.alloc(0) } = {}) {
  const parts = [];
  if (seqid) parts.push(key(1, 0), varint(seqid));
  if (logid) parts.push(key(2, 0), varint(logid));
  if (service) parts.push(key(3, 0), varint(service));
  if (method) parts.push(key(4, 0), varint(method));
  for (const [k, v] of headers) {
    const h = [];
    if (k) h.push(ld(1, Buffer.from(k)));
    if (v) h.push(ld(2, Buffer.from(v)));
    parts.push(ld(5, Buffer.concat(h)));
  }
  if (payloadEncoding) parts.push(ld(6, Buffer.from(payloadEncoding)));
  if (payloadType) parts.push(ld(7, Buffer.from(payloadType)));
  if (payload.length) parts.push(ld(8, Buffer.from(payload)));
  return Buffer.concat(parts);
}
function* fields(buf) {
  let i = 0;
  while (i < buf.length) {
    let k; [k, i] = readVarint(buf, i);
    const field = Number(k >> 3n), wt = Number(k & 7n);
    let v;
    if (wt === 0) [v, i] = readVarint(buf, i);
    else if (wt === 1) { v = buf.subarray(i, i + 8); i += 8; }
    else if (wt === 2) {
      let n; [n, i] = readVarint(buf, i); n = Number(n);
      if (i + n > buf.length) throw new Error('truncated length-delimited field');
      v = buf.subarray(i, i + n); i += n;
    } else if (wt === 5) { v = buf.subarray(i, i + 4); i += 4; }
    else throw new Error(`unsupported wire type ${wt}`);
    yield [field, wt, v];
  }
}
const int32 = (v) => Number(BigInt.asIntN(32, v));
export function decodeFrame(buf) {
  const f = { seqid: 0, logid: 0, service: 0, method: 0, headers: [], payloadEncoding: '', payloadType: '', payload: Buffer.alloc(0) };
  for (const [field, wt, v] of fields(buf)) {
    if (field === 1 && wt === 0) f.seqid = Number(v);
    else if (field === 2 && wt === 0) f.logid = v;
    else if (field === 3 && wt === 0) f.service = int32(v);
    else if (field === 4 && wt === 0) f.method = int32(v);
    else if (field === 5 && wt === 2) {
      let hk = '', hv = '';
      for (const [hf, hwt, x] of fields(v)) {
        if (hf === 1 && hwt === 2) hk = x.toString('utf8');
        else if (hf === 2 && hwt === 2) hv = x.toString('utf8');
      }
      f.headers.push([hk, hv]);
    } else if (field === 6 && wt === 2) f.payloadEncoding = v.toString('utf8');
    else if (field === 7 && wt === 2) f.payloadType = v.toString('utf8');
    else if (field === 8 && wt === 2) f.payload = Buffer.from(v);
  }
  return f;
}
const header = (f, k) => (f.headers.find(([hk]) => hk === k) || [])[1];
const show = (f) => JSON.stringify({ ...f, logid: String(f.logid), payload: f.payload.toString('hex') });

function selftestCodec() {
  const d = decodeFrame(encodeFrame({ seqid: 300, service: 1, method: -3, headers: [['a', 'b']], payloadType: 'text', payload: Buffer.from([0, 255]) }));
  if (d.seqid !== 300 || d.service !== 1 || d.method !== -3 || header(d, 'a') !== 'b' || d.payloadType !== 'text' || d.payload.toString('hex') !== '00ff')
    throw new Error(`codec self-test failed: ${show(d)}`);
}

// ---------------------------------------------------------------- helpers

/** A ws client whose messages and close are awaited in order. */
class Client {
  constructor(url, protocols, opts) {
    this.ws = new WebSocket(url, protocols, opts);
    this.queue = [];   // {kind:'message', data, isBinary} | {kind:'close', code, reason}
    this.waiters = [];
    this.ws.on('message', (data, isBinary) => this._put({ kind: 'message', data, isBinary }));
    this.ws.on('close', (code, reason) => this._put({ kind: 'close', code, reason: reason.toString('utf8') }));
    this.ws.on('error', (err) => { this.error = err; });
    this.opened = new Promise((resolve, reject) => {
      this.ws.once('open', resolve);
      this.ws.once('error', reject);
      this.ws.once('unexpected-response', (req, res) => reject(Object.assign(new Error(`unexpected response ${res.statusCode}`), { statusCode: res.statusCode })));
    });
  }
  _put(ev) {
    const w = this.waiters.shift();
    if (w) w(ev); else this.queue.push(ev);
  }
  async open() {
    await withTimeout(this.opened, RECV_TIMEOUT_MS, 'the WebSocket to open');
    return this;
  }
  next(what) {
    const ev = this.queue.shift();
    if (ev) return Promise.resolve(ev);
    return withTimeout(new Promise((resolve) => this.waiters.push(resolve)), RECV_TIMEOUT_MS, what);
  }
  async message(what) {
    const ev = await this.next(what);
    check(ev.kind === 'message', `${what}: expected a message, got close ${ev.code} ${JSON.stringify(ev.reason)}`);
    return ev;
  }
  close() { try { this.ws.terminate(); } catch { /* already gone */ } }
}

function withTimeout(p, ms, what) {
  let t;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise((_, reject) => { t = setTimeout(() => reject(new CheckFailed(`timed out after ${ms} ms waiting for ${what}`)), ms); }),
  ]);
}

// ---------------------------------------------------------------- checks
function makeCtx(args) {
  const run = `node-${process.pid}-${Date.now() % 100000000}`;
  const e = encodeURIComponent;
  return {
    run,
    device: (name) => `${run}-${name}`,
    wsUrl: (dev, app = 'demo') => `ws://${args.http}/ws?app_id=${e(app)}&device_id=${e(dev)}&token=anything`,
    async push(dev, payload, payloadType) {
      let url = `http://${args.api}/v1/push/device/demo/${e(dev)}`;
      if (payloadType !== undefined) url += `?payload_type=${e(payloadType)}`;
      const r = await api('POST', url, payload, { 'content-type': 'application/octet-stream' });
      check(r.status === 200 && r.data.delivered === 1, `push to ${dev}: expected 200 delivered=1, got ${r.status} ${JSON.stringify(r.data)}`);
    },
    async kick(dev, reason) {
      const r = await api('POST', `http://${args.api}/v1/kick/device/demo/${e(dev)}?reason=${e(reason)}`, '');
      check(r.status === 200 && r.data.kicked === 1, `kick ${dev}: expected 200 kicked=1, got ${r.status} ${JSON.stringify(r.data)}`);
    },
  };
}

async function tRawEchoAndPush(c) {
  const dev = c.device('raw');
  const cl = await new Client(c.wsUrl(dev)).open();
  try {
    check(cl.ws.protocol === '', `raw mode: expected no subprotocol, got ${JSON.stringify(cl.ws.protocol)}`);
    cl.ws.send('hello from node');
    let m = await cl.message('text echo');
    check(!m.isBinary && m.data.toString('utf8') === 'hello from node',
      `text echo: expected text 'hello from node', got ${m.isBinary ? 'binary' : 'text'} ${JSON.stringify(m.data.toString())}`);

    await c.push(dev, 'hello node push', 'text');
    m = await cl.message('text push');
    check(!m.isBinary, `text push: expected a TEXT message, got binary ${m.data.toString('hex')}`);
    check(m.data.toString('utf8') === 'hello node push', `text push: expected 'hello node push', got ${JSON.stringify(m.data.toString())}`);
  } finally { cl.close(); }
}

async function tCompression(c) {
  // permessage-deflate as ws offers it by default: negotiated without context takeover; a
  // big message compressed both ways (ws compresses what it sends from 1 KiB up).
  const dev = c.device('zip');
  const cl = await new Client(c.wsUrl(dev)).open();
  try {
    const ext = cl.ws.extensions;
    // ws names the extensions it accepted (the parameters are checked in tests/deflate.rs).
    check(ext === 'permessage-deflate', `expected permessage-deflate, got ${JSON.stringify(ext)}`);
    const big = 'node sends it compressed; '.repeat(300);
    cl.ws.send(big);
    let m = await cl.message('big echo');
    check(!m.isBinary && m.data.toString('utf8') === big, 'big echo differs');
    await c.push(dev, big, 'text');
    m = await cl.message('big push');
    check(!m.isBinary && m.data.toString('utf8') === big, 'big push differs');
  } finally { cl.close(); }
}

async function tTls(c, https, ca) {
  // wss:// with the test CA trusted: pbbp2 HELLO and a push, and a compressed raw echo.
  const port = https.split(':').pop();
  const e = encodeURIComponent;
  const url = (dev) => `wss://localhost:${port}/ws?app_id=demo&device_id=${e(dev)}&token=t`;
  const opts = { ca: readFileSync(ca) };
  const pb = await new Client(url(c.device('tls-pb')), ['pbbp2'], opts).open();
  const raw = await new Client(url(c.device('tls-raw')), undefined, opts).open();
  try {
    const hello = decodeFrame((await pb.message('HELLO over wss')).data);
    check(hello.method === HELLO, `HELLO over wss: ${show(hello)}`);
    await c.push(c.device('tls-pb'), 'over wss');
    const p = decodeFrame((await pb.message('push over wss')).data);
    check(p.method === PUSH && p.payload.toString() === 'over wss', `push over wss: ${show(p)}`);
    const big = 'node over tls, compressed; '.repeat(300);
    raw.ws.send(big);
    const m = await raw.message('big echo over wss');
    check(m.data.toString('utf8') === big, 'big echo over wss differs');
    check(raw.ws.extensions === 'permessage-deflate', `extensions over wss: ${raw.ws.extensions}`);
  } finally { pb.close(); raw.close(); }
}

async function tPbbp2(c) {
  const dev = c.device('pb');
  const cl = await new Client(c.wsUrl(dev), ['pbbp2']).open();
  try {
    check(cl.ws.protocol === 'pbbp2', `pbbp2: expected ws.protocol 'pbbp2', got ${JSON.stringify(cl.ws.protocol)}`);
    const m = await cl.message('HELLO');
    check(m.isBinary, 'HELLO: expected a binary message');
    const hello = decodeFrame(m.data);
    check(hello.service === 0 && hello.method === HELLO, `first frame: expected HELLO, got ${show(hello)}`);
    const connId = header(hello, 'conn_id');
    check(typeof connId === 'string' && connId.split(':').length === 3, `HELLO: expected conn_id NODE:INDEX:GEN, got ${show(hello)}`);

    cl.ws.send(encodeFrame({ seqid: 99, method: PING }));
    const pong = decodeFrame((await cl.message('PONG')).data);
    check(pong.method === PONG && pong.seqid === 99, `PING 99: expected PONG seqid 99, got ${show(pong)}`);
  } finally { cl.close(); }
}

async function tKick(c) {
  const dev = c.device('kick');
  const cl = await new Client(c.wsUrl(dev)).open();
  try {
    cl.ws.send('before kick');
    await cl.message('echo before kick');
    await c.kick(dev, 'bye');
    const ev = await cl.next('close after kick');
    check(ev.kind === 'close', `kick: expected a close event, got a message ${JSON.stringify(String(ev.data))}`);
    check(ev.code === 1008, `kick: expected close code 1008, got ${ev.code}`);
    check(ev.reason === 'bye', `kick: expected close reason 'bye', got ${JSON.stringify(ev.reason)}`);
  } finally { cl.close(); }
}

async function tUnknownApp(c) {
  const cl = new Client(c.wsUrl(c.device('nope'), 'nope'));
  try {
    await cl.open();
  } catch (e) {
    check(e.statusCode === 403, `unknown app: expected HTTP 403, got ${e.statusCode ?? e.message}`);
    return;
  } finally { cl.close(); }
  throw new CheckFailed('unknown app: expected the handshake to be rejected, but it was accepted');
}

// Both modes across a live upgrade (kill -HUP of `pid`): the library's pings answered, the
// connections never closed, PONGs every 10 ms with no gap of 250 ms, pushes after it. With
// `https`: the same over wss:// (TLS 1.3), the TLS state carried to the new process.
async function tUpgrade(c, pid, https, ca) {
  let url = (dev) => c.wsUrl(dev);
  let opts;
  if (https) {
    const port = https.split(':').pop();
    url = (dev) => c.wsUrl(dev).replace(`ws://${args.http}`, `wss://localhost:${port}`);
    opts = { ca: readFileSync(ca) };
  }
  const raw = await new Client(url(c.device('up-raw')), undefined, opts).open();
  const pb = await new Client(url(c.device('up-pb')), ['pbbp2'], opts).open();
  try {
    if (https) {
      const v = raw.ws._socket.getProtocol();
      check(v === 'TLSv1.3', `TLS version ${v}`);
    }
    check(decodeFrame((await pb.message('HELLO')).data).method === HELLO, 'HELLO');
    let libPongs = 0;
    raw.ws.on('pong', () => { libPongs++; });
    const libPing = setInterval(() => raw.ws.ping(), 20);
    let seq = 1000, pongs = 0, gap = 0, last = performance.now(), stop = false;
    const pinger = (async () => {
      while (!stop) {
        seq++;
        pb.ws.send(encodeFrame({ seqid: seq, method: PING }));
        const f = decodeFrame((await pb.message('PONG')).data);
        check(f.method === PONG && f.seqid === seq, `expected PONG ${seq}, got ${show(f)}`);
        const now = performance.now();
        gap = Math.max(gap, now - last);
        last = now;
        pongs++;
        await sleep(10);
      }
    })();
    await sleep(300);
    process.kill(pid, 'SIGHUP');
    const t0 = performance.now();
    let now = pid;
    while (now === pid) {
      check(performance.now() - t0 < 15000, 'no new process 15 s after SIGHUP');
      await sleep(10);
      const r = await api('GET', `http://${c.api}/healthz`);
      if (r.status === 200) now = r.data.pid;
    }
    console.log(`NEWPID ${now}`);
    await sleep(300);
    stop = true;
    await pinger;
    clearInterval(libPing);
    check(pongs > 20, `only ${pongs} PONGs`);
    check(gap < 250, `largest PONG gap ${Math.round(gap)} ms`);
    check(libPongs > 10, `only ${libPongs} WebSocket pongs`);
    await c.push(c.device('up-raw'), 'after the upgrade', 'text');
    const m = await raw.message('push after the upgrade');
    check(m.data.toString('utf8') === 'after the upgrade', `raw push: got ${m.data}`);
    raw.ws.send('still here');
    check((await raw.message('echo')).data.toString('utf8') === 'still here', 'raw echo after the upgrade');
    check(raw.ws.readyState === WebSocket.OPEN && pb.ws.readyState === WebSocket.OPEN, 'a connection closed');
  } finally { raw.close(); pb.close(); }
}

const CHECKS = [
  ['raw mode: text echo, text push', tRawEchoAndPush],
  ['pbbp2: negotiated, HELLO with conn_id, PING/PONG', tPbbp2],
  ["raw mode kick: close 1008 'bye'", tKick],
  ['unknown app: HTTP 403', tUnknownApp],
  ['permessage-deflate: negotiated, big messages both ways', tCompression],
];

// ---------------------------------------------------------------- main
const args = parseArgs(process.argv.slice(2), 'ws_node.mjs', {}, { '--upgrade-pid': 'upgradePid', '--https': 'https', '--ca': 'ca' });
const globalTimer = setTimeout(() => {
  console.log(`FAIL: overall timeout of ${args.timeout}s exceeded`);
  process.exit(2);
}, args.timeout * 1000);

selftestCodec();
const require = createRequire(import.meta.url);
const c = makeCtx(args);
console.log(`ws ${require('ws/package.json').version}; node ${process.version}; gateway http=${args.http} api=${args.api}; run ${c.run}`);
c.api = args.api;
let checks = args.upgradePid
  ? [['both modes across a live upgrade (kill -HUP)', (cx) => tUpgrade(cx, Number(args.upgradePid), args.https, args.ca)]]
  : CHECKS;
if (args.https && !args.upgradePid) checks = [['wss:// with the test CA: pbbp2 and raw, compressed', (cx) => tTls(cx, args.https, args.ca)]];
const [passed, failed] = await runChecks(checks, c);
console.log(`${passed} passed, ${failed} failed`);
clearTimeout(globalTimer);
process.exit(failed ? 1 : 0);
