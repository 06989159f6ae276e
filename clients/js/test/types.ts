// Compiled (not run) by tests/js_client.rs with `tsc --noEmit --strict`: the declarations in
// longlink.d.ts describe the module as an app uses it, and reject misuse.
import { Longlink, LonglinkError, Method, encodeFrame, decodeFrame, header, followStatus, pollStatus } from '../longlink.js';

const ll = new Longlink({ url: 'ws://127.0.0.1:7101/ws', app: 'demo', device: 'd1', token: 't', backoff: { min: 100 } });
ll.on('connected', (e) => { const id: string | null = e.connId; void id; });
ll.on('disconnected', (e) => { const again: boolean = e.willReconnect; const d: number | null = e.delay; void again; void d; });
ll.on('push', (p) => { const t: string = p.text(); const id: string | undefined = p.pushId; void t; void id; });
ll.on('error', (e) => { if (e instanceof LonglinkError) { const c: number = e.code; void c; } });
ll.connect();
async function use(): Promise<void> {
  const a = await ll.request(1, 3, 'hi', { timeout: 1000, headers: { k: 'v' } });
  if ('payload' in a) { const b: Uint8Array = a.payload; void b; }
  const f = decodeFrame(encodeFrame({ seqid: 1, method: Method.PING, headers: [['a', 'b']] }));
  const h: string | undefined = header(f, 'a');
  void h;
  const v = await pollStatus('http://127.0.0.1:7101', 'k', { timeout: 5 });
  if (v) { const n: number = v.version; void n; }
  await followStatus('http://127.0.0.1:7101', 'k', (data) => data === 'done');
}
void use;
// @ts-expect-error: app and device are required
new Longlink({ url: 'ws://x' });
// @ts-expect-error: mode is pbbp2 or raw
new Longlink({ url: 'ws://x', app: 'a', device: 'd', mode: 'json' });
// @ts-expect-error: no such event
ll.on('message', () => {});
