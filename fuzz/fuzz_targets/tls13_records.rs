//! Our TLS 1.3 record layer: a script of what a client seals (data, key updates asked for
//! or not, hand-made records, alerts), tampered with or not (bits flipped, raw bytes
//! slipped in), then opened by the server in pieces of any size as the reactor reads them.
//! Never a panic; untampered, every byte of data arrives in order, whatever the split,
//! and the server's answers to key updates open at the client.
#![no_main]
use libfuzzer_sys::fuzz_target;
use longlink::tls13::{Keys, Suite, MAX_RECORD};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let suite = [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305][ctl as usize % 3];
    let n = suite.secret_len();
    let (c, s) = ([1u8; 48], [2u8; 48]);
    let mut client = Keys::new(suite, (&s[..n], 0), (&c[..n], 0)).unwrap();
    let mut server = Keys::new(suite, (&c[..n], 0), (&s[..n], 0)).unwrap();
    let (mut wire, mut sent, mut tampered) = (vec![], vec![], false);
    // Records without data in a row: past 32 the server refuses them (a flood).
    let mut empty_run = 0;
    let mut i = 0;
    while i + 2 <= rest.len() {
        let (op, len) = (rest[i], rest[i + 1] as usize);
        i += 2;
        let body = &rest[i..(i + len).min(rest.len())];
        i += body.len();
        match op % 6 {
            0 => {
                let max = if op & 0x80 != 0 { len / 2 } else { usize::MAX };
                let took = client.seal([body], max, &mut wire);
                sent.extend_from_slice(&body[..took]);
                if took > 0 {
                    empty_run = 0;
                }
            }
            1 => {
                client.seal_key_update(op & 8 != 0, &mut wire);
                empty_run += 1;
                tampered |= empty_run > 32;
            }
            2 => {
                let (t, content) = body.split_first().unwrap_or((&23, &[]));
                client.seal_raw(*t, content, &mut wire);
                tampered = true;
            }
            3 if !wire.is_empty() => {
                let k = (len * 131 + op as usize) % wire.len();
                wire[k] ^= body.first().copied().unwrap_or(1) | 1;
                tampered = true;
            }
            4 => {
                wire.extend_from_slice(body);
                tampered = true;
            }
            5 => {
                client.seal_alert(op >> 4, &mut wire);
                tampered = true;
            }
            _ => {}
        }
    }
    // Read as the reactor does: what came so far, a partial record carried to the next.
    let step = (ctl as usize >> 2) * 37 + 1;
    let (mut got, mut carry, mut back) = (vec![], vec![], vec![]);
    let mut failed = false;
    for piece in wire.chunks(step) {
        carry.extend_from_slice(piece);
        match server.open(&mut carry) {
            Ok(o) => {
                assert!(o.plain <= o.used && o.used <= carry.len());
                got.extend_from_slice(&carry[..o.plain]);
                carry.drain(..o.used);
                assert!(carry.len() < MAX_RECORD, "a partial record is never longer than one");
                if o.update_requested {
                    server.answer_update(&mut back);
                }
                if o.closed {
                    break;
                }
            }
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    if !tampered {
        assert!(!failed, "untampered records refused");
        assert_eq!(got, sent);
        assert!(carry.is_empty());
        // Our answers, then data under our new keys, open at the client.
        server.seal([&b"answer"[..]], usize::MAX, &mut back);
        let o = client.open(&mut back).unwrap();
        assert_eq!(&back[..o.plain], b"answer");
    }
});
