#!/usr/bin/env node
// The JavaScript client (clients/js/longlink.js) in a real browser (Debian's Chromium,
// driven by playwright-core): a page imports the module as it is, connects over pbbp2,
// receives a push (and an ack=1 push it ACKs), and gets an answer to an upstream request.
//
//   node tests/clients/js_client.mjs --http HOST:PORT --api HOST:PORT [--chromium PATH]
//
// The gateway must be in dev mode (app "demo", service 1 = builtin:echo). Prints PASS/FAIL
// and "N passed, M failed"; exit 0 only when all pass.

import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { check, parseArgs, api, runInBrowser, servePages } from './common.mjs';

const args = parseArgs(process.argv.slice(2), 'js_client.mjs', { chromium: '/usr/bin/chromium' }, { '--chromium': 'chromium' });
const module = join(dirname(fileURLToPath(import.meta.url)), '../../clients/js/longlink.js');
const device = `browser-${process.pid}`;

// The page: the module imported by URL, events written into the DOM for the test to read.
const PAGE = `<!doctype html><meta charset="utf-8"><title>longlink client</title>
<pre id="log"></pre>
<script type="module">
import { Longlink } from '/longlink.js';
const log = (s) => { document.getElementById('log').textContent += s + '\\n'; };
const q = new URLSearchParams(location.search);
const ll = new Longlink({ url: 'ws://' + q.get('gw') + '/ws', app: 'demo', device: q.get('device'), token: 't' });
ll.on('connected', (c) => { document.body.dataset.conn = c.connId; log('connected ' + c.connId); });
ll.on('push', (p) => log('push ' + p.text() + (p.pushId ? ' reliable' : '')));
ll.on('error', (e) => log('error ' + e.message));
window.ll = ll;
ll.connect();
</script>`;

let site;
const CHECKS = [
  ['a page using the client connects, receives pushes and a request\'s answer', async ({ browser, origin }) => {
    const page = await browser.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    try {
      await page.goto(`${origin}/?gw=${encodeURIComponent(args.http)}&device=${device}`, { timeout: 10000 });
      await page.waitForFunction(() => document.body.dataset.conn, null, { timeout: 10000 });
      const conn = await page.evaluate(() => document.body.dataset.conn);
      const base = `http://${args.api}`;
      const r = await api('POST', `${base}/v1/push/device/demo/${device}?payload_type=text`, 'to the page');
      check(r.data.delivered === 1, `push: ${JSON.stringify(r.data)}`);
      await page.waitForFunction(() => document.getElementById('log').textContent.includes('push to the page\n'),
        null, { timeout: 10000 });
      // ack=1: answered once the page's client has ACKed it.
      const a = await api('POST', `${base}/v1/push/conn/${conn}?ack=1&wait_ms=5000&payload_type=text`, 'acked');
      check(a.data.acked === 1, `ack=1 push: ${JSON.stringify(a.data)}`);
      await page.waitForFunction(() => document.getElementById('log').textContent.includes('push acked reliable'),
        null, { timeout: 10000 });
      const answer = await page.evaluate(async () => (await window.ll.request(1, 3, 'echo from chromium')).text());
      check(answer === 'echo from chromium', `request answered ${JSON.stringify(answer)}`);
      const logText = await page.textContent('#log');
      check(!logText.includes('error'), `page log: ${logText}`);
      check(errors.length === 0, `page errors: ${errors.join('; ')}`);
    } finally {
      await page.close();
    }
  }],
];

await runInBrowser(args, CHECKS, {
  setup: async () => {
    site = await servePages({
      '/longlink.js': ['text/javascript', readFileSync(module)],
      '*': ['text/html; charset=utf-8', PAGE],
    });
    return { origin: site.origin };
  },
  teardown: async () => { if (site) site.close(); },
});
