#!/usr/bin/env node
// Third-party client test: a real browser (Debian's Chromium, driven by playwright-core)
// against longlink, from pages on a DIFFERENT origin than the gateway.
//
//   node tests/clients/browser.mjs --http HOST:PORT --api HOST:PORT [--timeout SECONDS] [--chromium PATH]
//                                  [--page-port PORT]
//
// The script serves two pages itself (node:http on 127.0.0.1:0):
//   a.html — the browser's own WebSocket API to ws://HTTP/ws (raw mode): echo, a text push
//            (arrives as a string), a binary push (arrives as binary).
//   b.html — cross-origin fetch() long-polls on /poll/status: one that waits until the
//            backend sets the key, one for a key set before the fetch (answered at once),
//            and one with a non-simple header, so the browser sends a CORS preflight; then
//            polls in a row (the browser reuses its connection), each waiting its own
//            timeout or release, and the scan-to-login flow through three states with
//            `since` and `credentials: 'include'` (which needs the gateway to list the
//            pages' origin in [http] cors_origins: --page-port fixes their port).
// Each check prints PASS/FAIL; the last line is "N passed, M failed". Exit 0 only when all
// pass. Needs `npm ci` in tests/clients and /usr/bin/chromium (scripts/deps.sh does both).

import http from 'node:http';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createRequire } from 'node:module';
import { chromium } from 'playwright-core';
import { CheckFailed, check, sleep, parseArgs, api, runChecks } from './common.mjs';

const STEP_TIMEOUT_MS = 10000;

// ---------------------------------------------------------------- pages
// Both pages take the gateway address and names from their query string.
const PAGE_A = `<!doctype html>
<html><head><meta charset="utf-8"><title>longlink ws</title></head>
<body>
<p>state: <span id="state">connecting</span></p>
<ol id="msgs"></ol>
<script>
  const q = new URLSearchParams(location.search);
  window.wsState = 'connecting';
  window.msgs = [];   // {type: 'text'|'binary', data}
  const ws = new WebSocket('ws://' + q.get('gw') + '/ws?app_id=demo&device_id=' +
                           encodeURIComponent(q.get('dev')) + '&token=demo-token');
  ws.binaryType = 'arraybuffer';
  window.ws = ws;
  const setState = (s) => { window.wsState = s; document.getElementById('state').textContent = s; };
  ws.onopen = () => setState('open');
  ws.onerror = () => setState('error');
  ws.onclose = (e) => setState('closed ' + e.code + ' ' + e.reason);
  ws.onmessage = (e) => {
    const m = typeof e.data === 'string'
      ? { type: 'text', data: e.data }
      : { type: 'binary', data: Array.from(new Uint8Array(e.data)) };
    window.msgs.push(m);
    const li = document.createElement('li');
    li.textContent = m.type + ': ' + (m.type === 'text' ? m.data : m.data.join(','));
    document.getElementById('msgs').appendChild(li);
  };
</script>
</body></html>`;

const PAGE_B = `<!doctype html>
<html><head><meta charset="utf-8"><title>longlink poll</title></head>
<body>
<pre id="out"></pre>
<script>
  const q = new URLSearchParams(location.search);
  window.polls = {};   // name -> {started, done, ms, status, acao, body, error}
  // Long-poll the gateway across origins; the script calls this via page.evaluate.
  // opts: {since: version, credentials: 'include'}
  window.longPoll = async (name, key, timeoutS, extraHeaders, opts = {}) => {
    const rec = window.polls[name] = { started: false, done: false };
    let url = 'http://' + q.get('gw') + '/poll/status?key=' + encodeURIComponent(key) + '&timeout=' + timeoutS;
    if (opts.since !== undefined) url += '&since=' + opts.since;
    const t0 = performance.now();
    rec.started = true;   // set right before the request goes out
    try {
      const init = { headers: extraHeaders || {} };
      if (opts.credentials) init.credentials = opts.credentials;
      const r = await fetch(url, init);
      rec.status = r.status;
      rec.body = await r.json();
    } catch (e) {
      rec.error = String(e);   // e.g. "TypeError: Failed to fetch" when CORS is missing
    }
    rec.ms = performance.now() - t0;
    rec.done = true;
    const out = document.getElementById('out');
    out.textContent += name + ': ' + JSON.stringify(rec) + '\\n';
  };
</script>
</body></html>`;

function startStaticServer(port) {
  const server = http.createServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    const blank = '<!doctype html><title>blank</title>';
    const page = path === '/a.html' ? PAGE_A : path === '/b.html' ? PAGE_B : path === '/blank.html' ? blank : null;
    if (!page) { res.writeHead(404, { 'content-type': 'text/plain' }); res.end('not found'); return; }
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
    res.end(page);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port || 0, '127.0.0.1', () => resolve(server));
  });
}

// ---------------------------------------------------------------- helpers

/** Wait for fn() (in the page) to be truthy; fail with `what` and the page state. */
async function waitInPage(page, fn, arg, what, stateFn) {
  try {
    await page.waitForFunction(fn, arg, { timeout: STEP_TIMEOUT_MS, polling: 50 });
  } catch (e) {
    const state = stateFn ? await page.evaluate(stateFn).catch((x) => `<${x.message}>`) : '';
    throw new CheckFailed(`timed out after ${STEP_TIMEOUT_MS} ms waiting for ${what}${state ? `; page state: ${JSON.stringify(state)}` : ''}`);
  }
}

// ---------------------------------------------------------------- checks
async function tWebSocket(ctx) {
  const { args, browser, origin, run } = ctx;
  const dev = `browser-ws-${run}`;
  const page = await browser.newPage();
  try {
    const url = `${origin}/a.html?gw=${encodeURIComponent(args.http)}&dev=${encodeURIComponent(dev)}`;
    await page.goto(url, { timeout: STEP_TIMEOUT_MS });
    const pageState = () => ({ wsState: window.wsState, msgs: window.msgs });
    await waitInPage(page, () => window.wsState !== 'connecting', null, 'the WebSocket to open', pageState);
    const st = await page.evaluate(() => window.wsState);
    check(st === 'open', `WebSocket from ${origin}: expected state open, got ${JSON.stringify(st)}`);

    // The gateway sees it as a ws connection of device dev.
    const online = await api('GET', `http://${args.api}/v1/online/device/demo/${encodeURIComponent(dev)}`);
    check(online.status === 200 && online.data.online === true && online.data.connections?.[0]?.transport === 'ws',
      `online query: expected online ws connection, got ${online.status} ${JSON.stringify(online.data)}`);

    // Echo (builtin:echo, raw mode).
    await page.evaluate(() => window.ws.send('echo from the browser'));
    await waitInPage(page, () => window.msgs.length >= 1, null, 'the echo', pageState);
    let msgs = await page.evaluate(() => window.msgs);
    check(msgs[0].type === 'text' && msgs[0].data === 'echo from the browser',
      `echo: expected text 'echo from the browser', got ${JSON.stringify(msgs[0])}`);

    // Text push → a string message with just the payload.
    let r = await api('POST', `http://${args.api}/v1/push/device/demo/${encodeURIComponent(dev)}?payload_type=text`,
      'hello browser', { 'content-type': 'application/octet-stream' });
    check(r.status === 200 && r.data.delivered === 1, `text push: expected delivered=1, got ${r.status} ${JSON.stringify(r.data)}`);
    await waitInPage(page, () => window.msgs.length >= 2, null, "the text push 'hello browser'", pageState);
    msgs = await page.evaluate(() => window.msgs);
    check(msgs[1].type === 'text' && msgs[1].data === 'hello browser',
      `text push: expected text 'hello browser', got ${JSON.stringify(msgs[1])}`);
    const shown = await page.locator('#msgs li').nth(1).textContent();
    check(shown === 'text: hello browser', `text push: page shows ${JSON.stringify(shown)}`);

    // Binary push (not UTF-8, no payload_type) → a binary message.
    r = await api('POST', `http://${args.api}/v1/push/device/demo/${encodeURIComponent(dev)}`,
      Buffer.from([0xff, 0x00, 0x80, 0x41]), { 'content-type': 'application/octet-stream' });
    check(r.status === 200 && r.data.delivered === 1, `binary push: expected delivered=1, got ${r.status} ${JSON.stringify(r.data)}`);
    await waitInPage(page, () => window.msgs.length >= 3, null, 'the binary push', pageState);
    msgs = await page.evaluate(() => window.msgs);
    check(msgs[2].type === 'binary' && JSON.stringify(msgs[2].data) === '[255,0,128,65]',
      `binary push: expected binary [255,0,128,65], got ${JSON.stringify(msgs[2])}`);

    // Kick → the browser sees close 1008 "bye".
    r = await api('POST', `http://${args.api}/v1/kick/device/demo/${encodeURIComponent(dev)}?reason=bye`, '');
    check(r.status === 200 && r.data.kicked === 1, `kick: expected kicked=1, got ${r.status} ${JSON.stringify(r.data)}`);
    await waitInPage(page, () => window.wsState.startsWith('closed'), null, 'the close after kick', pageState);
    const closed = await page.evaluate(() => window.wsState);
    check(closed === 'closed 1008 bye', `kick: expected 'closed 1008 bye', got ${JSON.stringify(closed)}`);
  } finally {
    await page.close().catch(() => {});
  }
}

async function tLongPoll(ctx) {
  const { args, browser, origin, run } = ctx;
  const page = await browser.newPage();
  try {
    await page.goto(`${origin}/b.html?gw=${encodeURIComponent(args.http)}`, { timeout: STEP_TIMEOUT_MS });
    const pageState = () => window.polls;

    // 1. A poll that waits: started before the backend sets the key.
    const k1 = `browser-poll-${run}-wait`;
    await page.evaluate(([k]) => { window.longPoll('wait', k, 20); }, [k1]);
    await waitInPage(page, () => window.polls.wait?.started, null, 'the long-poll fetch to start', pageState);
    await sleep(500);   // let the request reach the gateway and park there
    let rec = await page.evaluate(() => window.polls.wait);
    check(!rec.done, `long-poll: expected the fetch to be waiting, but it finished: ${JSON.stringify(rec)}`);
    const set = await api('POST', `http://${args.api}/v1/status/${encodeURIComponent(k1)}`, '{"user":"alice"}',
      { 'content-type': 'application/json' });
    check(set.status === 200, `set status: HTTP ${set.status} ${JSON.stringify(set.data)}`);
    await waitInPage(page, () => window.polls.wait?.done, null, 'the long-poll answer', pageState);
    rec = await page.evaluate(() => window.polls.wait);
    check(!rec.error, `long-poll: cross-origin fetch failed (CORS?): ${rec.error}`);
    check(rec.status === 200 && rec.body?.code === 0 && rec.body?.data?.user === 'alice',
      `long-poll: expected 200 {code:0, data:{user:'alice'}}, got ${rec.status} ${JSON.stringify(rec.body)}`);
    check(set.data.released === 1, `set status: expected released=1 (the browser's poll was waiting), got ${JSON.stringify(set.data)}`);

    // 2. A key set BEFORE the fetch is kept and answered at once.
    const k2 = `browser-poll-${run}-early`;
    const pre = await api('POST', `http://${args.api}/v1/status/${encodeURIComponent(k2)}`, '{"user":"bob","n":2}',
      { 'content-type': 'application/json' });
    check(pre.status === 200 && pre.data.released === 0, `pre-set status: expected released=0, got ${pre.status} ${JSON.stringify(pre.data)}`);
    await page.evaluate(([k]) => window.longPoll('early', k, 20), [k2]);
    rec = await page.evaluate(() => window.polls.early);
    check(!rec.error, `early poll: cross-origin fetch failed (CORS?): ${rec.error}`);
    check(rec.status === 200 && rec.body?.code === 0 && rec.body?.data?.user === 'bob' && rec.body?.data?.n === 2,
      `early poll: expected {code:0, data:{user:'bob',n:2}}, got ${rec.status} ${JSON.stringify(rec.body)}`);
    check(rec.ms < 3000, `early poll: expected an immediate answer, took ${Math.round(rec.ms)} ms`);

    // 3. A non-simple request (Content-Type: application/json on GET) makes the browser
    //    send an OPTIONS preflight first; the poll must still succeed.
    const k3 = `browser-poll-${run}-preflight`;
    await api('POST', `http://${args.api}/v1/status/${encodeURIComponent(k3)}`, 'plain text value');
    await page.evaluate(([k]) => window.longPoll('preflight', k, 20, { 'Content-Type': 'application/json' }), [k3]);
    rec = await page.evaluate(() => window.polls.preflight);
    check(!rec.error, `preflighted poll: fetch failed (CORS preflight?): ${rec.error}`);
    check(rec.status === 200 && rec.body?.code === 0 && rec.body?.data === 'plain text value',
      `preflighted poll: expected {code:0, data:'plain text value'}, got ${rec.status} ${JSON.stringify(rec.body)}`);

    const shown = await page.locator('#out').textContent();
    check(shown.includes('"user":"alice"'), `page B does not show the result: ${JSON.stringify(shown)}`);
  } finally {
    await page.close().catch(() => {});
  }
}

async function tPollSequence(ctx) {
  const { args, browser, origin, run } = ctx;
  const page = await browser.newPage();
  const set = async (key, value) => {
    const r = await api('POST', `http://${args.api}/v1/status/${encodeURIComponent(key)}`, value,
      { 'content-type': 'application/json' });
    check(r.status === 200, `set ${key}: HTTP ${r.status} ${JSON.stringify(r.data)}`);
    return r.data;
  };
  const accepted = async () => {
    const r = await api('GET', `http://${args.api}/metrics`);
    const line = r.data.split('\n').find((l) => l.startsWith('longlink_http_connections_accepted_total '));
    return Number(line.split(' ')[1]);
  };
  try {
    await page.goto(`${origin}/b.html?gw=${encodeURIComponent(args.http)}`, { timeout: STEP_TIMEOUT_MS });
    const pageState = () => window.polls;
    const poll = async (name, key, timeoutS, opts) => {
      await page.evaluate(([n, k, t, o]) => { window.longPoll(n, k, t, {}, o); }, [name, key, timeoutS, opts]);
      await waitInPage(page, (n) => window.polls[n]?.started, name, `poll ${name} to start`, pageState);
    };
    const answer = async (name) => {
      await waitInPage(page, (n) => window.polls[n]?.done, name, `the answer to ${name}`, pageState);
      const rec = await page.evaluate((n) => window.polls[n], name);
      check(!rec.error, `${name}: fetch failed (CORS with credentials?): ${rec.error}`);
      return rec;
    };
    const conns0 = await accepted();

    // Polls in a row: released, then a longer one that an old timer must not end early,
    // then one that times out after its own timeout.
    const k = `browser-seq-${run}`;
    await poll('s1', k + '-1', 2, { credentials: 'include' });
    await sleep(300);
    await set(k + '-1', '"one"');
    let rec = await answer('s1');
    check(rec.body?.data === 'one', `s1: expected data 'one', got ${JSON.stringify(rec.body)}`);
    await poll('s2', k + '-2', 8, { credentials: 'include' });
    await sleep(2600);   // past the first poll's 2 s timeout
    rec = await page.evaluate(() => window.polls.s2);
    check(!rec.done, `s2: answered before its key was set (an old timer?): ${JSON.stringify(rec)}`);
    await set(k + '-2', '"two"');
    rec = await answer('s2');
    check(rec.body?.data === 'two', `s2: expected data 'two', got ${JSON.stringify(rec.body)}`);
    await poll('s3', k + '-3', 1, { credentials: 'include' });
    rec = await answer('s3');
    check(rec.body?.code === -1 && rec.ms >= 950,
      `s3: expected a timeout answer after 1 s, got ${JSON.stringify(rec.body)} after ${Math.round(rec.ms)} ms`);

    // Scan-to-login: waiting -> scanned -> confirmed, following the key's version.
    const login = `browser-login-${run}`;
    let v = (await set(login, '"waiting"')).version;
    await poll('l1', login, 10, { credentials: 'include' });
    rec = await answer('l1');
    check(rec.body?.data === 'waiting' && rec.body?.version === v,
      `l1: expected 'waiting' v${v}, got ${JSON.stringify(rec.body)}`);
    for (const [name, state] of [['l2', 'scanned'], ['l3', 'confirmed']]) {
      await poll(name, login, 10, { credentials: 'include', since: v });
      await sleep(400);
      rec = await page.evaluate((n) => window.polls[n], name);
      check(!rec.done, `${name}: answered with the old state: ${JSON.stringify(rec)}`);
      const s = await set(login, JSON.stringify(state));
      check(s.released === 1 && s.version > v, `${name}: set answered ${JSON.stringify(s)}`);
      rec = await answer(name);
      check(rec.body?.data === state && rec.body?.version === s.version,
        `${name}: expected '${state}' v${s.version}, got ${JSON.stringify(rec.body)}`);
      v = s.version;
    }
    const conns = (await accepted()) - conns0;
    console.log(`  (${conns} connection(s) to the gateway for 6 polls)`);
    check(conns < 6, `the browser opened a connection per poll (${conns}); keep-alive reuse was not exercised`);
  } finally {
    await page.close().catch(() => {});
  }
}

async function tWss(ctx) {
  // The browser's own WebSocket over TLS (wss://localhost), the test CA trusted through a
  // throw-away NSS db: open, echo of a long (compressed) message, a text push.
  const { browser, origin, run, args } = ctx;
  const page = await browser.newPage();
  try {
    const dev = `wss-${run}`;
    const port = args.https.split(':').pop();
    await page.goto(`${origin}/blank.html`, { timeout: STEP_TIMEOUT_MS });
    await page.evaluate(([port, dev]) => {
      window.got = [];
      window.wsState = 'connecting';
      const ws = new WebSocket(`wss://localhost:${port}/ws?app_id=demo&device_id=${encodeURIComponent(dev)}&token=t`);
      window.ws = ws;
      ws.onopen = () => { window.wsState = 'open'; };
      ws.onerror = () => { window.wsState = 'error'; };
      ws.onclose = (e) => { window.wsState = 'closed ' + e.code; };
      ws.onmessage = (e) => window.got.push(e.data);
    }, [port, dev]);
    await waitInPage(page, () => window.wsState !== 'connecting', null, 'the wss:// socket to open', () => window.wsState);
    check(await page.evaluate(() => window.wsState) === 'open', `wss state: ${await page.evaluate(() => window.wsState)}`);
    const ext = await page.evaluate(() => window.ws.extensions);
    check(ext.startsWith('permessage-deflate'), `extensions: ${ext}`);
    const long = 'over tls from a browser; '.repeat(200);
    await page.evaluate((m) => window.ws.send(m), long);
    await waitInPage(page, () => window.got.length >= 1, null, 'the echo', () => window.got.length);
    check(await page.evaluate(() => window.got[0]) === long, 'wss echo differs');
    const r = await api('POST', `http://${args.api}/v1/push/device/demo/${encodeURIComponent(dev)}?payload_type=text`, 'pushed to the browser over tls');
    check(r.status === 200 && r.data.delivered === 1, `push: ${r.status} ${JSON.stringify(r.data)}`);
    await waitInPage(page, () => window.got.length >= 2, null, 'the push', () => window.got.length);
    check(await page.evaluate(() => window.got[1]) === 'pushed to the browser over tls', 'wss push differs');
    if (args.upgradePid) {
      // kill -HUP: the same wss:// socket goes on with the new process (its TLS state
      // handed over): a push reaches it, an echo comes back, it never closed.
      const pid = Number(args.upgradePid);
      process.kill(pid, 'SIGHUP');
      const t0 = Date.now();
      let now = pid;
      while (now === pid) {
        check(Date.now() - t0 < 15000, 'no new process 15 s after SIGHUP');
        await new Promise((r) => setTimeout(r, 10));
        const h = await api('GET', `http://${args.api}/healthz`);
        if (h.status === 200) now = h.data.pid;
      }
      console.log(`NEWPID ${now}`);
      const r2 = await api('POST', `http://${args.api}/v1/push/device/demo/${encodeURIComponent(dev)}?payload_type=text`, 'after the upgrade');
      check(r2.status === 200 && r2.data.delivered === 1, `push after: ${r2.status} ${JSON.stringify(r2.data)}`);
      await waitInPage(page, () => window.got.length >= 3, null, 'the push after the upgrade', () => window.got.length);
      check(await page.evaluate(() => window.got[2]) === 'after the upgrade', 'push after the upgrade differs');
      await page.evaluate((m) => window.ws.send(m), long);
      await waitInPage(page, () => window.got.length >= 4, null, 'the echo after the upgrade', () => window.got.length);
      check(await page.evaluate(() => window.got[3]) === long, 'echo after the upgrade differs');
      check(await page.evaluate(() => window.wsState) === 'open', `wss state: ${await page.evaluate(() => window.wsState)}`);
    }
  } finally { await page.close(); }
}

/** A temporary HOME whose NSS db (what Chromium on Linux trusts) holds the CA in `ca`. */
function homeTrusting(ca) {
  const home = mkdtempSync(join(tmpdir(), 'longlink-chromium-'));
  const db = `sql:${join(home, '.pki', 'nssdb')}`;
  execFileSync('mkdir', ['-p', join(home, '.pki', 'nssdb')]);
  execFileSync('certutil', ['-d', db, '-N', '--empty-password']);
  execFileSync('certutil', ['-d', db, '-A', '-t', 'C,,', '-n', 'longlink test CA', '-i', ca]);
  return home;
}

const CHECKS = [
  ['browser WebSocket (cross-origin page): open, echo, text push, binary push, kick 1008', tWebSocket],
  ['browser fetch long-poll (cross-origin, CORS): waiting poll, pre-set key, preflight', tLongPoll],
  ['browser polls in a row on a reused connection, and a three-state login with since and credentials', tPollSequence],
];

// ---------------------------------------------------------------- main
const args = parseArgs(process.argv.slice(2), 'browser.mjs', { timeout: 90, chromium: '/usr/bin/chromium' },
  { '--chromium': 'chromium', '--page-port': 'pagePort', '--https': 'https', '--ca': 'ca', '--upgrade-pid': 'upgradePid' });
const require = createRequire(import.meta.url);
let server = null;
let browser = null;
let timedOut = false;

async function cleanup() {
  if (browser) { const b = browser; browser = null; await b.close().catch(() => {}); }
  if (server) { const s = server; server = null; s.closeAllConnections?.(); await new Promise((r) => s.close(() => r())); }
}

const globalTimer = setTimeout(async () => {
  timedOut = true;
  console.log(`FAIL: overall timeout of ${args.timeout}s exceeded`);
  const hard = setTimeout(() => process.exit(2), 5000);
  await cleanup();
  clearTimeout(hard);
  process.exit(2);
}, args.timeout * 1000);

let passed = 0, failed = 0;
try {
  const run = `${process.pid}-${Date.now() % 100000000}`;
  server = await startStaticServer(Number(args.pagePort || 0));
  const origin = `http://127.0.0.1:${server.address().port}`;
  const home = args.https ? homeTrusting(args.ca) : null;
  process.on('exit', () => { if (home) rmSync(home, { recursive: true, force: true }); });
  browser = await chromium.launch({
    executablePath: args.chromium,
    headless: true,
    timeout: 30000,
    env: home ? { ...process.env, HOME: home } : process.env,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  console.log(`playwright-core ${require('playwright-core/package.json').version}; chromium ${browser.version()}; ` +
    `pages at ${origin}; gateway http=${args.http} api=${args.api}; run ${run}`);
  const ctx = { args, browser, origin, run };
  const checks = args.https ? [['browser WebSocket over wss:// (test CA trusted): open, compressed echo, push', tWss]] : CHECKS;
  [passed, failed] = await runChecks(checks, ctx);
} catch (e) {
  failed++;
  console.log(`FAIL setup: ${e.stack || e}`);
} finally {
  await cleanup();
}
console.log(`${passed} passed, ${failed} failed`);
clearTimeout(globalTimer);
process.exit(timedOut ? 2 : failed ? 1 : 0);
