// Test harness: the real longlink binary (LONGLINK_BIN, default target/release/longlink)
// on loopback, a TCP proxy that can cut or freeze a client's link, and a small HTTP server
// for backends. Every process and socket a test makes is closed by `cleanup()`.

import { spawn } from 'node:child_process';
import { createServer, connect } from 'node:net';
import http from 'node:http';
import tls from 'node:tls';
import { mkdtempSync, writeFileSync, rmSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const BIN = process.env.LONGLINK_BIN || join(root, 'target', 'release', 'longlink');

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Waits until `f()` is truthy (polled), or fails with `what` after `ms`. */
export async function until(what, f, ms = 10000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** The next `name` event of `emitter` (a Longlink), or a failure after `ms`. */
export function next(client, name, ms = 10000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => { client.off(name, h); reject(new Error(`no ${name} event in ${ms} ms`)); }, ms);
    const h = (v) => { clearTimeout(t); client.off(name, h); resolve(v); };
    client.on(name, h);
  });
}

const cleanups = [];
export function onCleanup(f) { cleanups.push(f); }
export async function cleanup() {
  while (cleanups.length) {
    try { await cleanups.pop()(); } catch { /* best effort */ }
  }
}

/**
 * Starts the gateway with `toml` (null: dev mode — app "demo", any token, service 1 echo)
 * and its HTTP listener on a free port; resolves with its addresses from the `listening`
 * line.
 */
export async function gateway(toml = null, args = []) {
  const dir = mkdtempSync(join(tmpdir(), 'longlink-js-'));
  const argv = ['serve', '--tcp', '127.0.0.1:0', '--api', '127.0.0.1:0', '--http', '127.0.0.1:0',
    '--log-level', 'warn', ...args];
  if (toml !== null) {
    writeFileSync(join(dir, 'longlink.toml'), toml);
    argv.push('--config', join(dir, 'longlink.toml'));
  }
  const proc = spawn(BIN, argv, { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = createInterface({ input: proc.stdout });
  const first = await new Promise((resolve, reject) => {
    const t = setTimeout(() => { proc.kill('SIGKILL'); reject(new Error('no listening line in 10 s')); }, 10000);
    proc.once('error', reject);
    proc.once('exit', (c) => reject(new Error(`longlink exited (${c}) before listening`)));
    lines.once('line', (l) => { clearTimeout(t); resolve(l); });
  });
  lines.on('line', () => {}); // keep reading: a full pipe would stall the gateway
  const v = JSON.parse(first);
  if (v.event !== 'listening') throw new Error(`unexpected first line ${first}`);
  const gw = {
    pid: v.pid, http: v.http, api: v.api, tcp: v.tcp, proc,
    ws: `ws://${v.http}/ws`,
    async call(method, path, body) {
      const res = await fetch(`http://${v.api}${path}`, { method, body, signal: AbortSignal.timeout(15000) });
      const text = await res.text();
      let data;
      try { data = JSON.parse(text); } catch { data = text; }
      return { status: res.status, data };
    },
    async metric(name) {
      const { data } = await gw.call('GET', '/metrics');
      const line = data.split('\n').find((l) => l.startsWith(`${name} `));
      return line ? Number(line.split(' ')[1]) : undefined;
    },
    async stop() {
      if (proc.exitCode === null) {
        proc.kill('SIGTERM');
        await new Promise((r) => { proc.once('exit', r); setTimeout(r, 5000); });
        if (proc.exitCode === null) proc.kill('SIGKILL');
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
  onCleanup(() => gw.stop());
  return gw;
}

/** A config: node n1, app demo (token demo-token) with an echo service 1, plus `extra`. */
export function config(extra = '', app = '') {
  return `node_id = "n1"\n${extra}\n[[apps]]\nid = "demo"\ntokens = ["demo-token"]\n` +
    `default_service = 1\n${app}\n[[apps.services]]\nid = 1\nurl = "builtin:echo"\n`;
}

/**
 * A TCP proxy in front of `target` (host:port). `mode` decides what happens to each link:
 * 'pass' forwards both ways; 'cut-on-upstream' forwards the client's first chunk (the
 * upgrade request) and everything downstream, then cuts both sockets when the client sends
 * anything more (its ACK never reaches the gateway); 'freeze' stops forwarding both ways but
 * keeps the sockets open (a dead link); 'refuse' closes each new link at once.
 */
export async function proxy(target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  const links = new Set();
  const p = {
    mode: 'pass', accepted: [], links,
    cutAll() { for (const l of links) l.cut(); },
    freezeAll() { for (const l of links) l.frozen = true; },
  };
  const server = createServer((client) => {
    p.accepted.push(Date.now());
    if (p.mode === 'refuse') { client.destroy(); return; }
    const upstream = connect(port, host);
    const link = {
      mode: p.mode, frozen: p.mode === 'freeze', head: '', upgraded: false,
      cut() { client.destroy(); upstream.destroy(); links.delete(link); },
    };
    links.add(link);
    client.on('data', (b) => {
      if (link.mode === 'cut-on-upstream') {
        if (link.upgraded) { link.cut(); return; }
        link.head += b.toString('latin1');
        link.upgraded = link.head.includes('\r\n\r\n'); // the request's end
      }
      if (!link.frozen) upstream.write(b);
    });
    upstream.on('data', (b) => { if (!link.frozen) client.write(b); });
    const end = () => link.cut();
    client.on('error', end); upstream.on('error', end);
    client.on('close', end); upstream.on('close', end);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  p.addr = `127.0.0.1:${server.address().port}`;
  p.ws = `ws://${p.addr}/ws`;
  p.close = () => new Promise((r) => { p.cutAll(); server.close(() => r()); });
  onCleanup(p.close);
  return p;
}

/**
 * A TLS-terminating balancer on a free loopback port, in front of `target` (host:port, a
 * gateway's clear HTTP listener): `wss` is what clients dial; `target` may be changed to
 * route new connections elsewhere. Its certificate is the test CA's (tests/keys): Node
 * trusts it with NODE_EXTRA_CA_CERTS=tests/keys/tls_ca.pem, set at Node's start.
 */
export async function tlsProxy(target) {
  const keys = fileURLToPath(new URL('../../../tests/keys/', import.meta.url));
  const p = { target, accepted: 0 };
  const server = tls.createServer({
    key: readFileSync(join(keys, 'tls_key.pem')),
    cert: readFileSync(join(keys, 'tls_cert.pem')),
  }, (client) => {
    p.accepted++;
    const at = p.target.lastIndexOf(':');
    const upstream = connect(Number(p.target.slice(at + 1)), p.target.slice(0, at));
    client.pipe(upstream);
    upstream.pipe(client);
    const end = () => { client.destroy(); upstream.destroy(); };
    client.on('error', end); upstream.on('error', end);
    client.on('close', end); upstream.on('close', end);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  // (The certificate names 127.0.0.1 as well as localhost.)
  p.wss = `wss://127.0.0.1:${server.address().port}/ws`;
  onCleanup(() => new Promise((r) => server.close(() => r())));
  return p;
}

/** An HTTP server on a free loopback port; `handler(req, body, res)`. */
export async function httpServer(handler) {
  const server = http.createServer((req, res) => {
    const parts = [];
    req.on('data', (c) => parts.push(c));
    req.on('end', () => handler(req, Buffer.concat(parts), res));
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const addr = `127.0.0.1:${server.address().port}`;
  onCleanup(() => new Promise((r) => { server.closeAllConnections?.(); server.close(() => r()); }));
  return { addr, server };
}
