// Shared by the Node client tests (ws_node.mjs, browser.mjs): arguments, checks, the
// internal API, and the check runner that prints PASS/FAIL and "N passed, M failed".

export class CheckFailed extends Error {}
export function check(cond, msg) { if (!cond) throw new CheckFailed(msg); }
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * `--http HOST:PORT --api HOST:PORT [--timeout SECONDS]` plus `extra` flags
 * ({'--chromium': 'chromium'} stores --chromium's value as out.chromium).
 */
export function parseArgs(argv, script, defaults = {}, extra = {}) {
  const out = { timeout: 30, ...defaults };
  const more = Object.keys(extra).map((f) => ` [${f} VALUE]`).join('');
  const usage = (msg) => {
    if (msg) console.error(msg);
    console.error(`usage: node ${script} --http HOST:PORT --api HOST:PORT [--timeout SECONDS]${more}`);
    process.exit(2);
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => { if (i + 1 >= argv.length) usage(`${a} needs a value`); return argv[++i]; };
    if (a === '--http') out.http = val();
    else if (a === '--api') out.api = val();
    else if (a === '--timeout') out.timeout = Number(val());
    else if (extra[a]) out[extra[a]] = val();
    else if (a === '-h' || a === '--help') usage();
    else usage(`unknown argument ${a}`);
  }
  if (!out.http || !out.api) usage('--http and --api are required');
  return out;
}

/** One request to the gateway's internal API; the answer's JSON (or text) as `data`. */
export async function api(method, url, body, headers = {}) {
  const res = await fetch(url, { method, body, headers, signal: AbortSignal.timeout(10000) });
  const text = await res.text();
  let data;
  try { data = JSON.parse(text); } catch { data = text; }
  return { status: res.status, data };
}

/** Runs [name, fn(ctx)] checks in order; returns [passed, failed]. */
export async function runChecks(checks, ctx) {
  let passed = 0, failed = 0;
  for (const [name, fn] of checks) {
    const t0 = performance.now();
    try {
      await fn(ctx);
      passed++;
      console.log(`PASS ${name} (${Math.round(performance.now() - t0)} ms)`);
    } catch (e) {
      failed++;
      console.log(`FAIL ${name}: ${e instanceof CheckFailed ? e.message : (e.stack || e)}`);
    }
  }
  return [passed, failed];
}

/**
 * Launch options for Debian's Chromium, headless, as root in CI: without the
 * background-networking flags it dials Google's hosts, which this closed network refuses.
 */
export function chromiumOptions(executablePath, env = process.env) {
  return {
    executablePath,
    headless: true,
    timeout: 30000,
    env,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  };
}

/**
 * The whole run of a browser script: launches Chromium (`args.chromium`), runs `setup()`
 * (e.g. a page server; its result is the checks' context), the checks, then `teardown()`;
 * prints "N passed, M failed" and exits 0 only when all passed, 2 past `args.timeout`.
 */
export async function runInBrowser(args, checks, { setup = async () => ({}), teardown = async () => {} } = {}) {
  const { chromium } = await import('playwright-core');
  const timer = setTimeout(() => {
    console.log(`FAIL: overall timeout of ${args.timeout}s exceeded`);
    process.exit(2);
  }, args.timeout * 1000);
  let passed = 0, failed = 0, browser;
  try {
    const ctx = await setup();
    browser = await chromium.launch(chromiumOptions(args.chromium));
    [passed, failed] = await runChecks(checks, { ...ctx, browser });
  } catch (e) {
    failed++;
    console.log(`FAIL setup: ${e.stack || e}`);
  } finally {
    if (browser) await browser.close().catch(() => {});
    await teardown().catch(() => {});
  }
  console.log(`${passed} passed, ${failed} failed`);
  clearTimeout(timer);
  process.exit(failed ? 1 : 0);
}

/**
 * Serves fixed pages on a free loopback port, for a browser script: `pages` maps a path to
 * [content-type, body], and '*' answers every other path. Resolves with { origin, close }.
 */
export async function servePages(pages) {
  const { createServer } = await import('node:http');
  const server = createServer((req, res) => {
    const [type, body] = pages[req.url.split('?')[0]] || pages['*'];
    res.writeHead(200, { 'content-type': type, 'cache-control': 'no-store' });
    res.end(body);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return { origin: `http://127.0.0.1:${server.address().port}`, close: () => server.close() };
}
