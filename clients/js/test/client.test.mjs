// The client against the real gateway binary on loopback (docs/PROTOCOL.md): pushes, ACKs
// and de-duplication across a lost connection, upstream requests, reconnects with backoff,
// REDIRECT, dead-link detection, /v1/endpoints, long-poll. Run:
//   LONGLINK_BIN=target/release/longlink node --experimental-websocket --test clients/js/test/
// (Node 22+: no flag; LONGLINK_WS_MODULE=<path to the ws package> adds a run on `ws`;
// NODE_EXTRA_CA_CERTS=tests/keys/tls_ca.pem lets Node trust the test CA, for wss://.)

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { Longlink, pollStatus, followStatus, LonglinkError, Method } from '../longlink.js';
import { gateway, config, proxy, tlsProxy, httpServer, cleanup, next, until, sleep, onCleanup } from './harness.mjs';

after(cleanup);

let n = 0;
const device = (tag) => `js-${tag}-${process.pid}-${++n}`;

function client(opts) {
  const c = new Longlink({ app: 'demo', token: 'demo-token', ...opts });
  onCleanup(() => c.close());
  return c;
}

const text = (p) => new TextDecoder().decode(p.payload);

test('pbbp2: HELLO, pushes of each kind, the connected event', async () => {
  const gw = await gateway();
  const dev = device('push');
  const c = client({ url: gw.ws, device: dev, user: 'u1' });
  const connected = next(c, 'connected');
  c.connect();
  const info = await connected;
  assert.match(info.connId, /^n1:\d+:\d+$|^[\w-]+:\d+:\d+$/);
  assert.equal(info.url, gw.ws);
  const got = next(c, 'push');
  const r = await gw.call('POST', `/v1/push/device/demo/${dev}?payload_type=text`, 'héllo');
  assert.equal(r.data.delivered, 1);
  const p = await got;
  assert.equal(p.text(), 'héllo');
  assert.equal(p.payloadType, 'text');
  assert.equal(p.method, Method.PUSH);
  assert.equal(p.pushId, undefined); // not ack=1: no id, no ACK
  // A push with a service and method of the app's own, and JSON.
  const second = next(c, 'push');
  await gw.call('POST', `/v1/push/user/demo/u1?service=5&method=9&payload_type=json`, '{"n":1}');
  const q = await second;
  assert.deepEqual([q.service, q.method, q.json()], [5, 9, { n: 1 }]);
  assert.equal(c.stats.acks, 2); // every push is ACKed (the gateway tracks only ack=1 ones)
});

test('raw mode: pushes as text and binary, send() to the default service', async () => {
  const gw = await gateway(config());
  const dev = device('raw');
  const c = client({ url: gw.ws, device: dev, mode: 'raw' });
  const connected = next(c, 'connected');
  c.connect();
  await connected;
  const got = next(c, 'push');
  await gw.call('POST', `/v1/push/device/demo/${dev}?payload_type=text`, 'plain');
  assert.equal(text(await got), 'plain');
  const echo = next(c, 'push');
  c.send('echo me'); // service 1 is builtin:echo
  assert.equal(text(await echo), 'echo me');
  await assert.rejects(c.request(1, 1, 'x'), LonglinkError);
});

test('ack=1: the ACK is lost with the connection; the redelivery reaches the app once', async () => {
  const gw = await gateway(config('[limits]\nack_timeout_ms = 20000\nreconnect_grace_ms = 10000\n'));
  const px = await proxy(gw.http);
  px.mode = 'cut-on-upstream'; // the first link dies as the client sends its ACK
  const dev = device('ack');
  const c = client({ url: px.ws, device: dev, backoff: { min: 50, max: 200 } });
  const pushes = [];
  c.on('push', (p) => pushes.push(p));
  const connected = next(c, 'connected');
  c.connect();
  await connected;
  px.mode = 'pass'; // links from now on go through
  const again = next(c, 'connected');
  // The gateway answers when the push is ACKed (or given up): only the redelivery's ACK
  // can get through.
  const outcome = gw.call('POST', `/v1/push/device/demo/${dev}?ack=1&wait_ms=15000`, 'once');
  await again;
  const r = await outcome;
  assert.equal(r.data.acked, 1, JSON.stringify(r.data));
  assert.equal(r.data.undelivered, 0);
  assert.equal(pushes.length, 1, 'the app saw the push twice');
  assert.equal(text(pushes[0]), 'once');
  assert.match(pushes[0].pushId, /^[0-9a-f]{16}\.n1$/);
  assert.equal(c.stats.duplicates, 1, 'the push was not redelivered: the test proved nothing');
  assert.equal(c.stats.connects, 2);
  assert.equal(await gw.metric('longlink_replayed_pushes_total'), 1);
  // A later push is new: it reaches the app.
  const later = next(c, 'push');
  const r2 = await gw.call('POST', `/v1/push/device/demo/${dev}?ack=1&wait_ms=5000`, 'twice');
  assert.equal(text(await later), 'twice');
  assert.equal(r2.data.acked, 1);
});

test('upstream: answers by seqid, ACK-only sends, ERRORs, queued while disconnected', async () => {
  const backend = await httpServer((req, body, res) => {
    const call = JSON.parse(body);
    if (call.method === 2) { res.writeHead(204); res.end(); return; } // no answer body
    if (call.method === 3) { res.writeHead(500); res.end('no'); return; }
    res.writeHead(200, { 'content-type': 'application/json' });
    setTimeout(() => res.end(JSON.stringify({ payload: call.payload.toUpperCase(), payload_type: 'text' })),
      call.payload === 'slow' ? 150 : 0);
  });
  const gw = await gateway(config('', `[[apps.services]]\nid = 2\nurl = "http://${backend.addr}/svc"\n`));
  const c = client({ url: gw.ws, device: device('up') });
  const early = c.request(1, 4, 'queued'); // before connect(): waits for the connection
  const connected = next(c, 'connected');
  c.connect();
  await connected;
  assert.equal((await early).text(), 'queued');
  // Several in flight at once: each resolves with its own answer.
  const answers = await Promise.all(['slow', 'a', 'b'].map((s) => c.request(2, 1, s)));
  assert.deepEqual(answers.map((a) => a.text()), ['SLOW', 'A', 'B']);
  assert.equal(answers[1].payloadType, 'text');
  assert.deepEqual(await c.request(2, 2, 'fire', { answer: false }), { acked: true });
  await assert.rejects(c.request(2, 3, 'x'), (e) => e instanceof LonglinkError && e.code === 502);
  await assert.rejects(c.request(9, 1, 'x'), (e) => e.code === 404);
  let pushes = 0;
  c.on('push', () => pushes++);
  await assert.rejects(c.request(2, 1, 'slow', { timeout: 20 }), (e) => e.code === 504);
  await sleep(400); // its answer comes after all, and is not taken for a push
  assert.equal(pushes, 0);
  assert.equal((await c.request(2, 1, 'after')).text(), 'AFTER');
});

test('reconnect: backoff delays within the full-jitter bounds, kept to when dialing', async () => {
  const gw = await gateway();
  const px = await proxy(gw.http);
  const backoff = { min: 100, max: 400 };
  const c = client({ url: px.ws, device: device('backoff'), backoff, stableAfter: 300 });
  const downs = [];
  c.on('disconnected', (d) => downs.push({ ...d, at: Date.now() }));
  const connected = next(c, 'connected');
  c.connect();
  await connected;
  px.mode = 'refuse';
  px.cutAll(); // the connection is killed; the next five dials are refused
  await until('five failed dials', () => px.accepted.length >= 6, 15000);
  px.mode = 'pass';
  const back = await next(c, 'connected', 10000);
  assert.ok(back.connId);
  assert.ok(downs.length >= 6, `${downs.length} disconnects`);
  for (let i = 0; i < 6; i++) {
    const d = downs[i];
    const cap = Math.min(backoff.max, backoff.min * 2 ** i);
    assert.equal(d.willReconnect, true);
    assert.ok(d.delay >= 0 && d.delay <= cap, `attempt ${i}: delay ${d.delay} over ${cap}`);
    // The next dial came when the delay said (timers fire late, never early).
    const dialed = px.accepted[i + 1] - d.at;
    assert.ok(dialed >= d.delay - 5 && dialed <= d.delay + 400, `attempt ${i}: dialed after ${dialed} ms, delay ${d.delay}`);
  }
  assert.equal(downs[0].wasOpen, true);
  // The count starts again once the link has stayed up (stableAfter), not at the HELLO.
  assert.ok(c.attempt >= 6, `attempt ${c.attempt}`);
  await until('the backoff reset', () => c.attempt === 0, 2000);
});

test('no reconnect storm: 40 clients dropped at once come back spread over the window', async () => {
  const gw = await gateway();
  const px = await proxy(gw.http);
  const cs = [];
  for (let i = 0; i < 40; i++) {
    const c = client({ url: px.ws, device: device('storm'), backoff: { min: 600, max: 5000 } });
    const connected = next(c, 'connected');
    c.connect();
    await connected;
    cs.push(c);
  }
  const before = px.accepted.length;
  const t0 = Date.now();
  const back = Promise.all(cs.map((c) => next(c, 'connected', 10000)));
  px.cutAll();
  await back;
  const redials = px.accepted.slice(before).map((t) => t - t0).sort((a, b) => a - b);
  assert.equal(redials.length, 40);
  assert.ok(redials[39] <= 600 + 800, `last redial after ${redials[39]} ms`);
  // Uniform over 600 ms: far from all at once (40 draws within 150 ms: p < 1e-20).
  assert.ok(redials[39] - redials[0] > 150, `redials within ${redials[39] - redials[0]} ms`);
  const firstHalf = redials.filter((t) => t < 300).length;
  assert.ok(firstHalf > 5 && firstHalf < 35, `${firstHalf} of 40 in the first half`);
});

/** After a while, `c` is still not connected and the gateway has no `dev` online. */
async function staysOff(c, gw, dev) {
  await sleep(250);
  assert.equal(c.connected, false);
  const r = await gw.call('GET', `/v1/online/device/demo/${dev}`);
  assert.equal(r.data.online, false);
}

test('a kick ends the connection for good (pbbp2: BYE; raw: close 1008) unless reconnectOnKick', async () => {
  const gw = await gateway();
  for (const mode of ['pbbp2', 'raw']) {
    const dev = device(`kick-${mode}`);
    const c = client({ url: gw.ws, device: dev, mode, backoff: { min: 20, max: 50 } });
    const connected = next(c, 'connected');
    c.connect();
    await connected;
    const down = next(c, 'disconnected');
    await gw.call('POST', `/v1/kick/device/demo/${dev}?reason=logout`);
    const d = await down;
    assert.equal(d.willReconnect, false, mode);
    assert.equal(d.reason, 'logout', mode);
    await staysOff(c, gw, dev);
  }
  const dev = device('kick');
  const c2 = client({ url: gw.ws, device: dev, backoff: { min: 20, max: 50 }, reconnectOnKick: true });
  c2.connect();
  await next(c2, 'connected');
  const back = next(c2, 'connected');
  await gw.call('POST', `/v1/kick/device/demo/${dev}`);
  await back;
});

test('a token function is asked at every dial', async () => {
  const gw = await gateway(config());
  const dev = device('tokfn');
  let asked = 0;
  const c = client({
    url: gw.ws, device: dev, backoff: { min: 20, max: 50 },
    token: async () => { asked++; return 'demo-token'; },
  });
  const connected = next(c, 'connected');
  c.connect();
  await connected;
  const again = next(c, 'connected');
  await gw.call('POST', `/v1/kick/device/demo/${dev}?reason=restart`);
  await again;
  assert.equal(asked, 2);
});

test('a request over the frame limit fails alone; the link and other calls go on', async () => {
  const gw = await gateway();
  const c = client({ url: gw.ws, device: device('big') });
  const connected = next(c, 'connected');
  c.connect();
  await connected;
  const other = c.request(1, 1, 'small');
  await assert.rejects(c.request(1, 1, new Uint8Array(70000)), (e) => e.code === 413);
  assert.equal((await other).text(), 'small');
  assert.equal(c.connected, true);
  // Checked when asked, not when sent: while disconnected too, and a payload that cannot
  // be encoded fails alone instead of throwing inside the connect.
  const d = client({ url: gw.ws, device: device('big2') });
  await assert.rejects(d.request(1, 1, new Uint8Array(70000)), (e) => e.code === 413);
  await assert.rejects(d.request(1, 1, { not: 'bytes' }));
  const queued = d.request(1, 1, 'queued');
  const up = next(d, 'connected');
  d.connect();
  await up;
  assert.equal((await queued).text(), 'queued');
});

test('the limit the gateway announces in its HELLO is the one requests are held to', async () => {
  const gw = await gateway(config('[limits]\nmax_frame_bytes = 2048\n'));
  // Made before the first connect, under the option's limit but past the gateway's: it
  // fails alone once the HELLO says the limit, and the small one goes through.
  const c = client({ url: gw.ws, device: device('limit') });
  const early = c.request(1, 1, new Uint8Array(3000));
  const small = c.request(1, 1, 'small');
  c.connect();
  await assert.rejects(early, (e) => e.code === 413 && /2048/.test(e.message));
  assert.equal((await small).text(), 'small');
  // Connected: past it fails at once, under it is answered, and the link stays up.
  await assert.rejects(c.request(1, 1, new Uint8Array(2100)), (e) => e.code === 413);
  assert.equal((await c.request(1, 1, new Uint8Array(1900))).payload.length, 1900);
  assert.equal(c.connected, true);
  // A lower option stays the limit; an option left undefined is the default, not no limit.
  const d = client({ url: gw.ws, device: device('limit2'), maxFrameBytes: 1000 });
  const up = next(d, 'connected');
  d.connect();
  await up;
  await assert.rejects(d.request(1, 1, new Uint8Array(1500)), (e) => e.code === 413 && /1000/.test(e.message));
  const u = client({ url: gw.ws, device: device('limit3'), maxFrameBytes: undefined });
  await assert.rejects(u.request(1, 1, new Uint8Array(70000)), (e) => e.code === 413 && /65535/.test(e.message));
});

test('the announced limit is the current gateway\'s: moved to one that takes more, it applies', async () => {
  const b = await gateway(config());
  const a = await gateway(config(`[limits]\nmax_frame_bytes = 2048\n[drain]\nredirect_ws = "${b.ws}"\n`));
  const c = client({ url: a.ws, device: device('limit4'), backoff: { min: 5000, max: 20000 } });
  const connected = next(c, 'connected');
  c.connect();
  await connected;
  await assert.rejects(c.request(1, 1, new Uint8Array(3000)), (e) => e.code === 413);
  const moved = next(c, 'connected', 5000);
  await a.call('POST', '/v1/drain');
  assert.equal((await moved).url, b.ws);
  assert.equal((await c.request(1, 1, new Uint8Array(3000))).payload.length, 3000);
});

test('close() while a token function is pending: nothing dials after it', async () => {
  const gw = await gateway(config());
  const dev = device('tokrace');
  let release;
  const c = client({ url: gw.ws, device: dev, token: () => new Promise((r) => { release = r; }) });
  c.connect();
  await until('the token asked', () => release !== undefined);
  c.close();
  release('demo-token');
  await staysOff(c, gw, dev);
});

test('REDIRECT at a drain: the client moves to the named node (pbbp2 and raw)', async () => {
  // pbbp2 hears a REDIRECT; raw mode the endpoint in the close 1012's reason.
  for (const mode of ['pbbp2', 'raw']) {
    const b = await gateway(config());
    const a = await gateway(config(`[drain]\nredirect_ws = "${b.ws}"\n`));
    const dev = device('redirect');
    const c = client({ url: a.ws, device: dev, mode, backoff: { min: 5000, max: 20000 } });
    const connected = next(c, 'connected');
    c.connect();
    assert.equal((await connected).url, a.ws);
    const moved = next(c, 'connected', 5000); // at once, not after the 5 s backoff
    const r = await a.call('POST', '/v1/drain');
    assert.equal(r.data.draining, true);
    assert.equal((await moved).url, b.ws, mode);
    assert.equal(c.stats.redirects, 1);
    const got = next(c, 'push');
    await b.call('POST', `/v1/push/device/demo/${dev}`, 'on b');
    assert.equal(text(await got), 'on b');
  }
});

test('a clear endpoint is not followed from a wss:// link (a TLS-terminating balancer in front)', async () => {
  assert.ok(process.env.NODE_EXTRA_CA_CERTS, 'set NODE_EXTRA_CA_CERTS=tests/keys/tls_ca.pem');
  // The gateway behind the balancer sees clear connections, so it names its drain target's
  // clear address; the client, on wss://, dials its usual (TLS) address instead, which the
  // balancer now routes to the other node.
  for (const mode of ['pbbp2', 'raw']) {
    const b = await gateway(config());
    const a = await gateway(config(`[drain]\nredirect_ws = "${b.ws}"\n`));
    const lb = await tlsProxy(a.http);
    const c = client({ url: lb.wss, device: device('tls-lb'), mode, backoff: { min: 5000, max: 20000 } });
    const connected = next(c, 'connected');
    c.connect();
    assert.equal((await connected).url, lb.wss);
    lb.target = b.http;
    const moved = next(c, 'connected', 5000); // at once, not after the 5 s backoff
    await a.call('POST', '/v1/drain');
    assert.equal((await moved).url, lb.wss, mode);
    assert.equal(lb.accepted, 2);
  }
});

test('dead link: a link that goes silent is given up and dialed again', async () => {
  const gw = await gateway(config('[limits]\nping_interval_ms = 300\nread_timeout_ms = 5000\n'));
  const px = await proxy(gw.http);
  const c = client({ url: px.ws, device: device('dead'), pongTimeout: 300, backoff: { min: 10, max: 20 } });
  const connected = next(c, 'connected');
  c.connect();
  await connected;
  await sleep(800); // heartbeats answered: still up
  assert.equal(c.connected, true);
  assert.equal(c.stats.connects, 1);
  const down = next(c, 'disconnected', 3000);
  const t0 = Date.now();
  px.freezeAll(); // nothing passes either way, and no FIN
  const d = await down;
  assert.equal(d.code, 4000);
  assert.equal(d.willReconnect, true);
  assert.ok(Date.now() - t0 < 300 + 300 + 1400, `noticed after ${Date.now() - t0} ms`);
  await next(c, 'connected');
});

test('endpoints: the app backend picks the node (/v1/endpoints)', async () => {
  const gw = await gateway();
  const app = await httpServer(async (req, body, res) => {
    const r = await fetch(`http://${gw.api}/v1/endpoints?transport=ws`);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(await r.text());
  });
  const c = client({ endpoints: `http://${app.addr}/longlink/endpoints`, device: device('ep') });
  const connected = next(c, 'connected');
  c.connect();
  assert.equal((await connected).url, gw.ws);
});

test('long-poll helper: pollStatus and followStatus through a key\'s states', async () => {
  const gw = await gateway();
  const base = `http://${gw.http}`;
  const key = device('qr');
  assert.equal(await pollStatus(base, key, { timeout: 1 }), null);
  const seen = [];
  const done = followStatus(base, key, (v) => { seen.push(v); return v.state === 'confirmed'; }, { timeout: 5 });
  await sleep(100);
  await gw.call('POST', `/v1/status/${key}`, '"scanned"');
  await until('scanned seen', () => seen.length === 1);
  await gw.call('POST', `/v1/status/${key}`, '{"state":"confirmed","user":"alice"}');
  await done;
  assert.deepEqual(seen, ['scanned', { state: 'confirmed', user: 'alice' }]);
  const got = await pollStatus(base, key, { timeout: 1 });
  assert.deepEqual(got.data, { state: 'confirmed', user: 'alice' });
  assert.ok(got.version > 0);
});

test('a REDIRECT to a node that is down is tried once, then the usual way', async () => {
  const down = await httpServer(() => {}); // a port nobody upgrades on: closed below
  const deadWs = `ws://${down.addr}/ws`;
  await new Promise((r) => { down.server.closeAllConnections?.(); down.server.close(r); });
  const a = await gateway(config(`[drain]\nredirect_ws = "${deadWs}"\n`));
  const b = await gateway(config());
  const dialed = [];
  // The app backend's pick: a first, then b (a is draining away).
  const c = client({
    device: device('redir-dead'), backoff: { min: 50, max: 100 },
    endpoints: () => { const u = dialed.length === 0 ? a.ws : b.ws; dialed.push(u); return u; },
  });
  const connected = next(c, 'connected');
  c.connect();
  assert.equal((await connected).url, a.ws);
  const moved = next(c, 'connected', 5000);
  await a.call('POST', '/v1/drain');
  assert.equal((await moved).url, b.ws);
  assert.deepEqual(dialed, [a.ws, b.ws]); // the dead redirect target was not asked again
});

test('a reliable push whose seqid and service match a pending request is a push, not its answer', async () => {
  const backend = await httpServer((req, body, res) => {
    const call = JSON.parse(body);
    res.writeHead(200, { 'content-type': 'application/json' });
    setTimeout(() => res.end(JSON.stringify({ payload: call.payload.toUpperCase() })), 300);
  });
  const gw = await gateway(config('', `[[apps.services]]\nid = 2\nurl = "http://${backend.addr}/svc"\n`));
  const dev = device('collide');
  const c = client({ url: gw.ws, device: dev });
  const connected = next(c, 'connected');
  c.connect();
  await connected;
  const answer = c.request(2, 1, 'slow'); // seqid 1 on this connection
  const got = next(c, 'push');
  // The connection's first push: seqid 1 too, same service and method.
  const r = gw.call('POST', `/v1/push/device/demo/${dev}?ack=1&wait_ms=5000&service=2&method=1`, 'a push');
  const p = await got;
  assert.deepEqual([p.seqid, p.service, p.method, text(p)], [1, 2, 1, 'a push']);
  assert.ok(p.pushId);
  assert.equal((await r).data.acked, 1);
  assert.equal((await answer).text(), 'SLOW');
});

test('Node with the ws package instead of a global WebSocket', { skip: !process.env.LONGLINK_WS_MODULE }, async () => {
  const { default: WebSocket } = await import(process.env.LONGLINK_WS_MODULE);
  const gw = await gateway();
  const dev = device('wspkg');
  const c = client({ url: gw.ws, device: dev, WebSocket });
  const connected = next(c, 'connected');
  c.connect();
  await connected;
  const got = next(c, 'push');
  await gw.call('POST', `/v1/push/device/demo/${dev}?ack=1`, 'via ws');
  const p = await got;
  assert.equal(text(p), 'via ws');
  assert.equal((await c.request(1, 1, 'echo')).text(), 'echo');
  // Closed while still dialing, or given up at connectTimeout against a listener that
  // never answers: `ws` emits an error on the socket then, which used to have no listener
  // left and ended the whole process.
  const early = client({ url: gw.ws, device: device('wsearly'), WebSocket });
  early.connect();
  await sleep(0);
  early.close();
  const net = await import('node:net');
  const mute = net.createServer(() => {});
  await new Promise((r) => mute.listen(0, '127.0.0.1', r));
  onCleanup(() => mute.close());
  const stuck = client({
    url: `ws://127.0.0.1:${mute.address().port}/ws`, device: device('wsmute'), WebSocket,
    connectTimeout: 300, backoff: { min: 20, max: 50 },
  });
  const gaveUp = next(stuck, 'disconnected');
  stuck.connect();
  const d = await gaveUp;
  assert.equal(d.willReconnect, true);
  await sleep(300);
  stuck.close();
  // A refused dial says why where the WebSocket tells it (Node's ws does; browsers do not).
  const strict = await gateway(config());
  const refused = client({ url: strict.ws, device: device('wsbad'), WebSocket, token: 'wrong', backoff: { min: 20, max: 50 } });
  const err = next(refused, 'error');
  refused.connect();
  assert.match(String((await err).message), /401/);
  refused.close();
});
