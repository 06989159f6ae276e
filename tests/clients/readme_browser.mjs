#!/usr/bin/env node
// README.md's "Use it from a browser in five minutes", as a newcomer follows it: the page
// its heredoc writes, next to clients/js/longlink.js, served and opened in Chromium; then
// its curl pushes (the plain one and the ack=1 one) and its kick.
//
//   node tests/clients/readme_browser.mjs --http HOST:PORT --api HOST:PORT [--chromium PATH]
//
// The gateway must be in dev mode. The page's ws://127.0.0.1:7101 is pointed at --http.
// Prints PASS/FAIL and "N passed, M failed"; exit 0 only when all pass.

import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { check, parseArgs, api, runInBrowser, servePages } from './common.mjs';

const args = parseArgs(process.argv.slice(2), 'readme_browser.mjs', { chromium: '/usr/bin/chromium' }, { '--chromium': 'chromium' });
const root = join(dirname(fileURLToPath(import.meta.url)), '../..');
const readme = readFileSync(join(root, 'README.md'), 'utf8');
const section = readme.slice(readme.indexOf('## Use it from a browser in five minutes'));
const heredoc = /cat > index\.html <<'HTML'\n([\s\S]*?)\nHTML\n/.exec(section);
// The curl lines of the section, in order, pointed at this gateway's API.
const curls = [...section.slice(0, section.indexOf('\n## ', 5)).matchAll(/^curl (.*?)(?:\s+#.*)?$/gm)].map((m) => m[1]);

function curlToRequest(line) {
  const method = /-X (\w+)/.exec(line)?.[1] || (/-d /.test(line) ? 'POST' : 'GET');
  const body = /-d '([^']*)'/.exec(line)?.[1];
  const url = /'?(http:\/\/127\.0\.0\.1:7180[^' ]*)'?\s*$/.exec(line)[1].replace('127.0.0.1:7180', args.api);
  return { method, body, url };
}

let site;
const CHECKS = [
  ['the README\'s page gets its pushes, ACKs the reliable one, and stays down after a kick', async ({ browser, origin }) => {
    check(heredoc, 'README has no index.html heredoc in its browser section');
    check(curls.length === 3, `expected 3 curl lines in the section, found ${JSON.stringify(curls)}`);
    const page = await browser.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    try {
      await page.goto(`${origin}/`, { timeout: 10000 });
      const log = () => page.textContent('#log');
      await page.waitForFunction(() => document.getElementById('log').textContent.includes('connected as '), null, { timeout: 10000 });
      const [plain, reliable, kick] = curls.map(curlToRequest);
      const r1 = await api(plain.method, plain.url, plain.body);
      check(r1.data.delivered === 1, `first curl: ${JSON.stringify(r1.data)}`);
      await page.waitForFunction(() => document.getElementById('log').textContent.includes('push: hello, tab'), null, { timeout: 10000 });
      const r2 = await api(reliable.method, reliable.url, reliable.body);
      check(r2.data.acked === 1, `the ack=1 curl: ${JSON.stringify(r2.data)}`);
      await page.waitForFunction(() => document.getElementById('log').textContent.includes('push: exactly once'), null, { timeout: 10000 });
      const answer = await page.evaluate(async () => (await window.ll.request(1, 1, 'hi')).text());
      check(answer === 'hi', `the console line answered ${JSON.stringify(answer)}`);
      const r3 = await api(kick.method, kick.url, kick.body);
      check(r3.data.kicked === 1, `the kick: ${JSON.stringify(r3.data)}`);
      await page.waitForFunction(() => document.getElementById('log').textContent.includes('down ('), null, { timeout: 10000 });
      await new Promise((r) => setTimeout(r, 1500)); // past any backoff: it must not come back
      const text = await log();
      check(text.split('connected as ').length === 2, `the page reconnected after a kick:\n${text}`);
      check(errors.length === 0, `page errors: ${errors.join('; ')}`);
    } finally {
      await page.close();
    }
  }],
];

await runInBrowser(args, CHECKS, {
  setup: async () => {
    const html = (heredoc ? heredoc[1] : '').replace('ws://127.0.0.1:7101/ws', `ws://${args.http}/ws`);
    site = await servePages({
      '/longlink.js': ['text/javascript', readFileSync(join(root, 'clients/js/longlink.js'))],
      '*': ['text/html; charset=utf-8', html],
    });
    return { origin: site.origin };
  },
  teardown: async () => { if (site) site.close(); },
});
