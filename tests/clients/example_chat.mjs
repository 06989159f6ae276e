#!/usr/bin/env node
// The chat example (examples/chat) end to end, headless: its backend (backend.mjs) in front
// of a dev-mode gateway, its page in two Chromium tabs (alice and bob) on the JS client.
// Each must see the other join, and a message sent in one must appear in both.
//
//   node tests/clients/example_chat.mjs --http HOST:PORT --api HOST:PORT [--chromium PATH]
//
// Prints PASS/FAIL and "N passed, M failed"; exit 0 only when all pass.

import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { check, parseArgs, runInBrowser } from './common.mjs';

const args = parseArgs(process.argv.slice(2), 'example_chat.mjs', { chromium: '/usr/bin/chromium' }, { '--chromium': 'chromium' });
const backendJs = join(dirname(fileURLToPath(import.meta.url)), '../../examples/chat/backend.mjs');
let backend;

const lines = (page) => page.evaluate(() => [...document.querySelectorAll('#log li')].map((li) => li.textContent));

async function open(browser, origin, name, room) {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(`${origin}/?room=${room}&name=${name}`, { timeout: 10000 });
  await page.waitForFunction(() => document.getElementById('state').textContent === 'connected', null, { timeout: 10000 });
  return { page, errors };
}

const CHECKS = [
  ['two tabs join a room and see each other\'s messages', async ({ browser, origin }) => {
    const room = `room-${process.pid}`;
    const alice = await open(browser, origin, 'alice', room);
    try {
      // Alice sees her own join; then bob's.
      await alice.page.waitForFunction(() => document.getElementById('log').textContent.includes('alice joined'), null, { timeout: 10000 });
      const bob = await open(browser, origin, 'bob', room);
      try {
        await alice.page.waitForFunction(() => document.getElementById('log').textContent.includes('bob joined'), null, { timeout: 10000 });
        await alice.page.fill('#text', 'hi bob');
        await alice.page.press('#text', 'Enter');
        for (const who of [alice, bob]) {
          await who.page.waitForFunction(() => [...document.querySelectorAll('#log li')].some((li) => li.textContent === 'alice: hi bob'),
            null, { timeout: 10000 });
        }
        await bob.page.fill('#text', 'hello alice');
        await bob.page.click('#say button');
        await alice.page.waitForFunction(() => [...document.querySelectorAll('#log li')].some((li) => li.textContent === 'bob: hello alice'),
          null, { timeout: 10000 });
        const a = await lines(alice.page);
        check(a.filter((l) => l === 'alice: hi bob').length === 1, `alice's log: ${JSON.stringify(a)}`);
        const b = await lines(bob.page);
        check(!b.includes('alice joined'), `bob joined after alice and cannot have seen her join: ${JSON.stringify(b)}`);
        check(alice.errors.length + bob.errors.length === 0, `page errors: ${[...alice.errors, ...bob.errors].join('; ')}`);
      } finally {
        await bob.page.close();
      }
    } finally {
      await alice.page.close();
    }
  }],
];

await runInBrowser(args, CHECKS, {
  setup: async () => {
    backend = spawn(process.execPath, [backendJs, '--port', '0', '--api', args.api], { stdio: ['ignore', 'pipe', 'inherit'] });
    const first = await new Promise((resolve, reject) => {
      backend.once('exit', (c) => reject(new Error(`backend.mjs exited (${c})`)));
      createInterface({ input: backend.stdout }).once('line', resolve);
    });
    const url = JSON.parse(first).url;
    return { origin: url.replace(/\/$/, '') };
  },
  teardown: async () => { if (backend) backend.kill(); },
});
