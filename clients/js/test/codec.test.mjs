// The Frame codec on its own: round trips, protobuf's edge cases, malformed input. Its
// agreement with the gateway's encoder (prost) is shown by client.test.mjs, where every
// frame crosses a real gateway both ways; `prostBytes` below pins one frame's exact bytes.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { encodeFrame, decodeFrame, header, backoffDelay, Method } from '../longlink.js';

test('a frame round-trips with every field set', () => {
  const f = {
    seqid: 300, logid: 2 ** 40 + 7, service: 3, method: 1234,
    headers: [['push_id', '0001.n1'], ['k', 'välue']],
    payloadEncoding: 'gzip', payloadType: 'json', payload: new Uint8Array([0, 255, 1]),
  };
  const g = decodeFrame(encodeFrame(f));
  assert.deepEqual(g, f);
  assert.equal(header(g, 'push_id'), '0001.n1');
  assert.equal(header(g, 'missing'), undefined);
});

test('the bytes are those prost writes (field order, varints, empty fields left out)', () => {
  // Frame{seqid: 1, method: PING} and Frame{seqid: 150, service: 2, method: 7,
  // headers: [{key: "a", value: "b"}], payload: "hi"} as prost encodes them.
  assert.deepEqual([...encodeFrame({ seqid: 1, method: Method.PING })], [0x08, 1, 0x20, 2]);
  const prostBytes = [0x08, 0x96, 0x01, 0x18, 2, 0x20, 7, 0x2a, 6, 0x0a, 1, 0x61, 0x12, 1, 0x62,
    0x42, 2, 0x68, 0x69];
  const f = { seqid: 150, service: 2, method: 7, headers: { a: 'b' }, payload: 'hi' };
  assert.deepEqual([...encodeFrame(f)], prostBytes);
  assert.equal(new TextDecoder().decode(decodeFrame(Uint8Array.from(prostBytes)).payload), 'hi');
});

test('64-bit and negative values', () => {
  const big = (1n << 63n) + 5n;
  assert.equal(decodeFrame(encodeFrame({ logid: big })).logid, big);
  assert.equal(decodeFrame(encodeFrame({ seqid: Number.MAX_SAFE_INTEGER })).seqid, Number.MAX_SAFE_INTEGER);
  const neg = encodeFrame({ service: -2, method: -(2 ** 31) });
  assert.equal(neg.length, 22); // each sign-extended to ten bytes, as protobuf says
  const g = decodeFrame(neg);
  assert.equal(g.service, -2);
  assert.equal(g.method, -(2 ** 31));
  assert.throws(() => encodeFrame({ service: 2 ** 31 }), RangeError);
  assert.throws(() => encodeFrame({ seqid: -1 }), RangeError);
});

test('unknown fields are skipped and a repeated scalar takes the last value', () => {
  const extra = [0x08, 5, 0x48, 9, 0x51, 1, 2, 3, 4, 5, 6, 7, 8, 0x5a, 2, 9, 9, 0x65, 1, 2, 3, 4, 0x08, 6];
  const f = decodeFrame(Uint8Array.from(extra));
  assert.equal(f.seqid, 6);
});

test('malformed input throws, never loops or reads past the end', () => {
  for (const bad of [[0x08], [0x42, 5, 1], [0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1],
    [0x00], [0x0b], [0x2a, 3, 0x0a, 9, 0x61]]) {
    assert.throws(() => decodeFrame(Uint8Array.from(bad)), Error, JSON.stringify(bad));
  }
  // Random bytes: each either decodes or throws an Error.
  let seed = 7;
  const rnd = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  for (let i = 0; i < 2000; i++) {
    const b = Uint8Array.from({ length: Math.floor(rnd() * 40) }, () => Math.floor(rnd() * 256));
    try { decodeFrame(b); } catch (e) { assert.ok(e instanceof Error); }
  }
});

test('backoff: full jitter within [0, min(max, min * 2^n)]', () => {
  const o = { min: 500, max: 20000 };
  assert.equal(backoffDelay(0, o, () => 0.5), 250);
  assert.equal(backoffDelay(3, o, () => 1), 4000);
  assert.equal(backoffDelay(10, o, () => 1), 20000);
  assert.equal(backoffDelay(1000, o, () => 1), 20000);
  assert.equal(backoffDelay(5, o, () => 0), 0);
  for (let n = 0; n < 12; n++) {
    const d = backoffDelay(n, o);
    assert.ok(d >= 0 && d <= Math.min(20000, 500 * 2 ** n), `${n}: ${d}`);
  }
});
