#!/usr/bin/env node
// The scan-to-login example (examples/scan-to-login) end to end, headless: its page in
// Chromium long-polls the gateway, its phone.sh sets the code's states, and the page must
// show them in order: scanned, then logged in.
//
//   node tests/clients/example_scan.mjs --http HOST:PORT --api HOST:PORT [--chromium PATH]
//
// Prints PASS/FAIL and "N passed, M failed"; exit 0 only when all pass.

import { readFileSync } from 'node:fs';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { check, parseArgs, api, sleep, runInBrowser, servePages } from './common.mjs';

const args = parseArgs(process.argv.slice(2), 'example_scan.mjs', { chromium: '/usr/bin/chromium' }, { '--chromium': 'chromium' });
const dir = join(dirname(fileURLToPath(import.meta.url)), '../../examples/scan-to-login');
let site;

const CHECKS = [
  ['the page follows the code through scanned to logged in', async ({ browser, origin }) => {
    const page = await browser.newPage();
    try {
      const key = `qr-test-${process.pid}`;
      await page.goto(`${origin}/?gw=${encodeURIComponent(args.http)}&key=${key}`, { timeout: 10000 });
      check(await page.textContent('#key') === key, 'the page shows its code');
      // Its poll is waiting on the gateway before the phone says anything.
      for (let i = 0; ; i++) {
        const m = await api('GET', `http://${args.api}/metrics`);
        if (/^longlink_poll_waiters 1$/m.test(m.data)) break;
        check(i < 100, 'the page never started polling');
        await sleep(50);
      }
      const phone = new Promise((resolve, reject) => execFile(join(dir, 'phone.sh'), [key, args.api, 'alice'],
        { env: { ...process.env, PHONE_PAUSE: '1' } },
        (err, stdout, stderr) => err ? reject(new Error(`phone.sh: ${err.message} ${stderr}`)) : resolve(stdout)));
      const seen = [];
      const t0 = Date.now();
      while (Date.now() - t0 < 10000) {
        const s = await page.textContent('#state');
        if (seen[seen.length - 1] !== s) seen.push(s);
        if (s.startsWith('logged in')) break;
        await sleep(25);
      }
      const out = await phone;
      check(/"released":1/.test(out), `phone.sh released the page's poll: ${out}`);
      check(seen.some((s) => s.startsWith('scanned')), `the page never showed scanned: ${JSON.stringify(seen)}`);
      check(seen[seen.length - 1] === 'logged in as alice', `the page ended at ${JSON.stringify(seen)}`);
      check(seen.indexOf(seen.find((s) => s.startsWith('scanned'))) < seen.length - 1, `order: ${JSON.stringify(seen)}`);
    } finally {
      await page.close();
    }
  }],
];

// At least a minute, whatever --timeout says: the page waits on 30 s polls.
args.timeout = Math.max(args.timeout, 60);
await runInBrowser(args, CHECKS, {
  setup: async () => {
    site = await servePages({ '*': ['text/html; charset=utf-8', readFileSync(join(dir, 'index.html'))] });
    return { origin: site.origin };
  },
  teardown: async () => { if (site) site.close(); },
});
