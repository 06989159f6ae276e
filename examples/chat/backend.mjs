#!/usr/bin/env node
// The chat example's app backend (Node, no dependencies): serves the page and the client
// module, and is what the page talks to besides the gateway. It puts a device in a room
// (POST /v1/rooms/...), and posts each message to the room (POST /v1/push/room/..., ack=1
// so that a member whose connection drops mid-message still gets it once). The gateway
// carries the pushes to every member's open connections.
//
//   node examples/chat/backend.mjs [--port 8090] [--api 127.0.0.1:7180]
//   LONGLINK_TOKEN=...   the internal API's token, if it has one
//
// Endpoints the page uses: GET / (the page), GET /longlink.js, POST /join {room, device,
// name, announce}, POST /say {room, device, name, text}, GET /endpoints (the gateway's
// /v1/endpoints, for the client to pick its node).

import http from 'node:http';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const opt = { port: 8090, api: '127.0.0.1:7180' };
for (let i = 2; i < process.argv.length; i += 2) {
  const k = process.argv[i].replace(/^--/, '');
  if (!(k in opt) || i + 1 >= process.argv.length) {
    console.error('usage: backend.mjs [--port N] [--api HOST:PORT]');
    process.exit(2);
  }
  opt[k] = k === 'port' ? Number(process.argv[i + 1]) : process.argv[i + 1];
}
const page = readFileSync(join(here, 'index.html'));
const client = readFileSync(join(here, '..', '..', 'clients', 'js', 'longlink.js'));
const auth = process.env.LONGLINK_TOKEN ? { authorization: `Bearer ${process.env.LONGLINK_TOKEN}` } : {};
const ID = /^[A-Za-z0-9_.-]{1,64}$/;

async function gateway(method, path, body) {
  const res = await fetch(`http://${opt.api}${path}`, {
    method, headers: { 'content-type': 'application/json', ...auth },
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    signal: AbortSignal.timeout(5000),
  });
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new Error(`gateway ${path}: HTTP ${res.status} ${JSON.stringify(data)}`);
  return data;
}

function reply(res, status, type, body) {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(body);
}

const server = http.createServer(async (req, res) => {
  try {
    const parts = [];
    for await (const c of req) parts.push(c);
    const url = new URL(req.url, 'http://x');
    if (req.method === 'GET' && url.pathname === '/') {
      return reply(res, 200, 'text/html; charset=utf-8', page);
    }
    if (req.method === 'GET' && url.pathname === '/longlink.js') {
      return reply(res, 200, 'text/javascript', client);
    }
    if (req.method === 'GET' && url.pathname === '/endpoints') {
      return reply(res, 200, 'application/json', JSON.stringify(await gateway('GET', '/v1/endpoints?transport=ws')));
    }
    if (req.method === 'POST' && (url.pathname === '/join' || url.pathname === '/say')) {
      let m;
      try {
        m = JSON.parse(Buffer.concat(parts).toString() || '{}');
      } catch {
        return reply(res, 400, 'application/json', '{"error":"the body is not JSON"}');
      }
      const name = String(m.name || '').slice(0, 32).trim();
      if (!ID.test(m.room || '') || !ID.test(m.device || '') || !name) {
        return reply(res, 400, 'application/json', '{"error":"room, device (1-64 of A-Za-z0-9_.-) and name are required"}');
      }
      const room = encodeURIComponent(m.room);
      let event;
      if (url.pathname === '/join') {
        await gateway('POST', `/v1/rooms/demo/${room}/members`, { device_ids: [m.device] });
        // A page joins again on every reconnect (rooms live in the gateway's memory, so a
        // restarted gateway has forgotten them); only the first join is announced.
        if (m.announce === false) return reply(res, 200, 'application/json', '{"joined":true}');
        event = { kind: 'join', name };
      } else {
        const text = String(m.text || '').slice(0, 2000);
        if (!text) return reply(res, 400, 'application/json', '{"error":"empty message"}');
        event = { kind: 'say', name, text };
      }
      const out = await gateway('POST', `/v1/push/room/demo/${room}?ack=1&payload_type=json`,
        { ...event, at: Date.now() });
      return reply(res, 200, 'application/json', JSON.stringify({ delivered: out.delivered }));
    }
    reply(res, 404, 'application/json', '{"error":"not found"}');
  } catch (e) {
    if (!res.headersSent) reply(res, 502, 'application/json', JSON.stringify({ error: String(e.message || e) }));
  }
});
server.listen(opt.port, '127.0.0.1', () => {
  console.log(JSON.stringify({ event: 'listening', url: `http://127.0.0.1:${server.address().port}/` }));
});
