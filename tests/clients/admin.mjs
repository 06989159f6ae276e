#!/usr/bin/env node
// The admin page (GET /admin) in a real browser (Debian's Chromium, driven by
// playwright-core): opened with the API token in its query, it must show the live
// connection counts the caller created, and be kept as a screenshot.
//
//   node tests/clients/admin.mjs --http HOST:PORT --api HOST:PORT --token T
//        --tcp N --ws N --room NAME --shot PATH [--timeout SECONDS] [--chromium PATH]
//
// Each check prints PASS/FAIL; the last line is "N passed, M failed". Exit 0 only when all
// pass. Needs `npm ci` in tests/clients and /usr/bin/chromium (scripts/deps.sh does both).

import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { CheckFailed, check, parseArgs, api, runInBrowser } from './common.mjs';

const args = parseArgs(process.argv.slice(2), 'admin.mjs', { chromium: '/usr/bin/chromium' }, {
  '--chromium': 'chromium', '--token': 'token', '--tcp': 'tcp', '--ws': 'ws', '--room': 'room', '--shot': 'shot',
});
const want = { tcp: Number(args.tcp), ws: Number(args.ws) };
const base = `http://${args.api}`;

async function text(page, id) {
  return page.evaluate((i) => document.getElementById(i)?.textContent, id);
}

const CHECKS = [
  ['with a wrong token the page shows nothing and asks for the token', async ({ browser }) => {
    const s = await api('GET', `${base}/v1/stats`);
    check(s.status === 401, `GET /v1/stats without a token: expected 401, got ${s.status}`);
    const page = await browser.newPage();
    try {
      await page.goto(`${base}/admin?token=${encodeURIComponent(args.token + 'x')}`, { timeout: 10000 });
      await page.waitForFunction(() => getComputedStyle(document.getElementById('login')).display !== 'none',
        null, { timeout: 10000, polling: 100 });
      const total = await text(page, 'conn-total');
      check(total === '…', `with a wrong token the page showed ${total}`);
    } finally {
      await page.close();
    }
  }],
  ['the page shows the live counts, the top room and a chart', async ({ browser }) => {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    try {
      const errors = [];
      page.on('pageerror', (e) => errors.push(String(e)));
      page.on('requestfailed', (r) => errors.push(`request failed: ${r.url()}`));
      page.on('console', (m) => { if (m.type() === 'error') errors.push(`console: ${m.text()}`); });
      await page.goto(`${base}/admin?token=${encodeURIComponent(args.token)}`, { timeout: 10000 });
      const total = String(want.tcp + want.ws);
      try {
        // Two polls at least: the rates and the chart need a previous read.
        await page.waitForFunction(([t, tcp, ws]) =>
          document.getElementById('conn-total').textContent === t &&
          document.getElementById('conn-tcp').textContent === tcp &&
          document.getElementById('conn-ws').textContent === ws &&
          Number(document.body.dataset.polls || 0) >= 2,
        [total, String(want.tcp), String(want.ws)], { timeout: 10000, polling: 100 });
      } catch {
        const seen = await page.evaluate(() => ({
          total: document.getElementById('conn-total').textContent,
          error: document.getElementById('error').textContent,
          polls: document.body.dataset.polls,
        }));
        throw new CheckFailed(`the page never showed ${total} connections: ${JSON.stringify(seen)}; ${errors.join('; ')}`);
      }
      check(errors.length === 0, `page errors: ${errors.join('; ')}`);
      check(!page.url().includes('token='), `the token stays in the address bar: ${page.url()}`);
      // A reload (no token in the URL now) goes on from the tab's copy.
      await page.reload({ timeout: 10000 });
      await page.waitForFunction((t) => document.getElementById('conn-total').textContent === t &&
        Number(document.body.dataset.polls || 0) >= 2, total, { timeout: 10000, polling: 100 });
      const rooms = await page.evaluate(() => [...document.querySelectorAll('#rooms tr')].map((tr) => tr.textContent));
      check(rooms.some((r) => r.includes(args.room)), `top rooms do not list ${args.room}: ${JSON.stringify(rooms)}`);
      const apps = await page.evaluate(() => [...document.querySelectorAll('#apps tr')].map((tr) => [...tr.children].map((td) => td.textContent)));
      check(apps.some(([a, n]) => a === 'demo' && n === total), `connections by app: ${JSON.stringify(apps)}`);
      const wl = await text(page, 'worker-latency');
      check(/^\S+ (µs|ms) \/ \S+ (µs|ms)$/.test(wl), `worker latency shown as ${JSON.stringify(wl)}`);
      const node = await text(page, 'node');
      check(node === 'n1', `node id shown: ${node}`);
      // The chart drew the connections line (its blue, #2f6fde), not only its grid.
      const inked = await page.evaluate(() => {
        const c = document.getElementById('chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) {
          if (Math.abs(d[i] - 0x2f) < 24 && Math.abs(d[i + 1] - 0x6f) < 24 && Math.abs(d[i + 2] - 0xde) < 24 && d[i + 3] > 128) n++;
        }
        return n;
      });
      check(inked > 20, `the live chart has no connections line (${inked} pixels of its colour)`);
      mkdirSync(dirname(args.shot), { recursive: true });
      await page.screenshot({ path: args.shot, fullPage: true });
      console.log(`SHOT ${args.shot}`);
    } finally {
      await page.close();
    }
  }],
];

await runInBrowser(args, CHECKS);
