//! permessage-deflate (RFC 7692): whole messages compressed and inflated (the offer is
//! answered by `negotiate_deflate` in the WebSocket codec). Pure functions over bytes (the compressor and
//! inflater are scratch state kept per thread, reset for every message); the reactor owns
//! the connections.
//!
//! One design choice shapes all of it: the gateway keeps no compression context across
//! messages, in either direction. It answers every offer with `server_no_context_takeover`
//! (so one compressed copy of a broadcast serves every compressed client, like today's shared
//! frames) and `client_no_context_takeover` (RFC 7692 §7.1.1.2 lets a server ask this of any
//! client; the client must comply), so the reactor inflates every connection's messages with
//! one shared inflater. An idle compressed connection holds nothing more than a clear one: two
//! flag bits. The cost is a lower ratio for what clients send, which is the small direction.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// What a compressed message's payload leaves out: the end of a sync flush (§7.2.1).
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// An empty final stored block (BFINAL 1, BTYPE 00, LEN 0): fed after the tail to check that
/// the message ended on a block boundary.
const END: [u8; 5] = [1, 0, 0, 0xff, 0xff];

/// Compressions run, and compressed messages sent, in this process (`/metrics`). Counted
/// here, where they happen: the encoders run inside the reactor's output closures.
pub static PACKS: AtomicU64 = AtomicU64::new(0);
pub static SENT: AtomicU64 = AtomicU64::new(0);

/// Counts a compressed message queued.
pub fn sent() {
    SENT.fetch_add(1, Relaxed);
}

/// Why a compressed message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the message limit (answered 1009; nothing past the limit is kept).
    TooBig,
    /// Not a deflate stream.
    Corrupt,
}

/// Zlib's level 1: the gateway compresses on its one reactor thread, where speed matters
/// more than the last percent of ratio.
const LEVEL: u32 = 1;

struct Scratch {
    /// Compressors for a full (15-bit) and a small (9-bit) window, made on first use.
    pack: [Option<Compress>; 2],
    unpack: Option<Decompress>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch { pack: [None, None], unpack: None })
    };
}

/// Appends `data` compressed as one message's payload (a fresh context, the sync-flush end
/// left out) to `out` and returns true; returns false with `out` unchanged when that would
/// not be smaller than `data` (the message then goes uncompressed).
pub fn pack(data: &[u8], small_window: bool, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    // The reactor must outlive a fault in the codec: a panic costs this message its
    // compression (and the compressor, made again), never the process.
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pack_in(data, small_window, out)
    }));
    if let Ok(true) = done {
        return true;
    }
    if done.is_err() {
        SCRATCH.with(|s| s.borrow_mut().pack[usize::from(small_window)] = None);
    }
    out.truncate(start);
    false
}

fn pack_in(data: &[u8], small_window: bool, out: &mut Vec<u8>) -> bool {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let c = s.pack[usize::from(small_window)].get_or_insert_with(|| {
            let bits = if small_window { 9 } else { 15 };
            Compress::new_with_window_bits(Compression::new(LEVEL), false, bits)
        });
        c.reset();
        PACKS.fetch_add(1, Relaxed);
        let start = out.len();
        // zlib's bound for stored blocks plus the flush: one call always completes.
        let bound = data.len() + (data.len() >> 12) + (data.len() >> 14) + 64;
        out.reserve(bound);
        let done = c.compress_vec(data, out, FlushCompress::Sync);
        let whole = done.is_ok() && c.total_in() == data.len() as u64 && out.ends_with(&TAIL);
        if whole && out.len() - start - TAIL.len() < data.len() {
            out.truncate(out.len() - TAIL.len());
            return true;
        }
        out.truncate(start);
        false
    })
}

/// Inflates one message's payload (`data`, without the sync-flush end) onto `out`, at most
/// `max` bytes: past that it stops at once (a deflate bomb costs `max` bytes, no more).
pub fn unpack(data: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), InflateError> {
    let start = out.len();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unpack_in(data, max, out))) {
        Ok(r) => r,
        Err(_) => {
            SCRATCH.with(|s| s.borrow_mut().unpack = None);
            out.truncate(start);
            Err(InflateError::Corrupt)
        }
    }
}

fn unpack_in(data: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), InflateError> {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let d = s
            .unpack
            .get_or_insert_with(|| Decompress::new_with_window_bits(false, 15));
        d.reset(false);
        let start = out.len();
        if data.is_empty() {
            // Not a deflate stream (a sender's empty message is the flush's 0x00), but
            // nothing to inflate either: taken as the empty message, as zlib's stream
            // readers in other clients and servers do.
            return Ok(());
        }
        if inflate(d, data, start + max, out)? {
            // A final block ended the stream: nothing may follow it.
            if d.total_in() != data.len() as u64 {
                return Err(InflateError::Corrupt);
            }
            return Ok(());
        }
        // A sender's sync flush ends on a block boundary: the tail completes it as an
        // empty stored block, after which an empty final block ends the stream with
        // nothing more. A message cut inside a block reads those bytes as part of the
        // block instead, and is refused here rather than delivered short or padded.
        // A sender that left the tail on (§7.2.1 says to take it off) is taken too: a
        // payload that stops on a block boundary never ends in 0xff (the flush's header
        // bits and padding are zeros), so those four bytes are the tail.
        if !data.ends_with(&TAIL) && inflate(d, &TAIL, start + max, out)? {
            return Err(InflateError::Corrupt);
        }
        let (in0, out0) = (d.total_in(), out.len());
        if !inflate(d, &END, start + max, out)?
            || out.len() != out0
            || d.total_in() - in0 != END.len() as u64
        {
            return Err(InflateError::Corrupt);
        }
        Ok(())
    })
}

/// Feeds `input` whole; true once the stream ended (a final block).
fn inflate(
    d: &mut Decompress,
    input: &[u8],
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<bool, InflateError> {
    let mut at = 0;
    loop {
        // One byte of room past the limit tells a message that reaches it from one past it.
        let want = (limit + 1).saturating_sub(out.len()).min(64 * 1024);
        if want == 0 {
            return Err(InflateError::TooBig);
        }
        out.reserve_exact(want);
        let (in0, out0) = (d.total_in(), out.len());
        let spare = out.capacity() - out.len();
        let st = d
            .decompress_vec(&input[at..], out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Corrupt)?;
        if out.len() > limit {
            return Err(InflateError::TooBig);
        }
        at += (d.total_in() - in0) as usize;
        let produced = out.len() - out0;
        if st == Status::StreamEnd {
            return Ok(true);
        }
        // Done with this input once it is all in and the output had room to spare (no
        // output is left inside the inflater).
        if at == input.len() && produced < spare {
            return Ok(false);
        }
        if produced == 0 && at < input.len() && d.total_in() == in0 {
            return Err(InflateError::Corrupt);
        }
    }
}

/// Appends a non-final stored block holding `bytes` (at most 65,535): a connection's own
/// bytes in front of a shared compressed body (the body refers to nothing before itself, so
/// the two join into one valid message).
pub fn stored_block(bytes: &[u8], out: &mut Vec<u8>) {
    let n = bytes.len() as u16;
    // BFINAL 0, BTYPE 00, the rest of the byte padding; then LEN and its complement.
    out.push(0);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&(!n).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Bytes [`stored_block`] adds in front of its content.
pub const STORED_OVERHEAD: usize = 5;

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` pseudo-random bytes (xorshift from `seed`).
    fn noise(mut x: u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn text(n: usize) -> Vec<u8> {
        let words = [
            "gateway",
            "push",
            "room",
            "device",
            "ack",
            "{\"k\":1}",
            "seqid",
        ];
        let mut v = vec![];
        let mut i = 7usize;
        while v.len() < n {
            i = i.wrapping_mul(31).wrapping_add(17);
            v.extend_from_slice(words[i % words.len()].as_bytes());
            v.push(b' ');
        }
        v.truncate(n);
        v
    }

    #[test]
    fn round_trips_and_refuses_what_does_not_shrink() {
        for n in [0usize, 10, 300, 5000, 200_000] {
            let data = text(n);
            for small in [false, true] {
                let mut z = vec![9];
                if pack(&data, small, &mut z) {
                    assert!(z.len() - 1 < data.len());
                    let mut back = vec![];
                    unpack(&z[1..], n, &mut back).unwrap();
                    assert_eq!(back, data, "{n} {small}");
                } else {
                    assert_eq!(z, [9], "{n}");
                    assert!(n < 20, "{n} bytes of text did not shrink");
                }
            }
        }
        // Random bytes do not shrink: sent as they are.
        let noise = noise(1, 4096);
        let mut z = vec![];
        assert!(!pack(&noise, false, &mut z));
        assert!(z.is_empty());
        // Every length of half-compressible data, both windows (zlib-rs 0.6 panicked here
        // on incompressible input: the backend is zlib, and `pack` would survive it).
        let mixed: Vec<u8> = noise.iter().zip(text(4096)).map(|(a, b)| a & b).collect();
        for len in (1..60_000).step_by(331) {
            let data: Vec<u8> = mixed
                .iter()
                .cycle()
                .skip(len % 977)
                .take(len)
                .copied()
                .collect();
            for small in [false, true] {
                let mut z = vec![];
                if pack(&data, small, &mut z) {
                    let mut back = vec![];
                    unpack(&z, len, &mut back).unwrap();
                    assert!(back == data, "{len}");
                }
            }
        }
    }

    /// The longest back-reference distance in a raw deflate stream, found by a small
    /// independent decoder (RFC 1951 §3.2), or None if the stream is malformed.
    fn longest_distance(z: &[u8]) -> Option<usize> {
        struct Bits<'a>(&'a [u8], usize);
        impl Bits<'_> {
            fn get(&mut self, n: usize) -> Option<usize> {
                let mut v = 0;
                for i in 0..n {
                    let byte = *self.0.get(self.1 / 8)?;
                    v |= usize::from((byte >> (self.1 % 8)) & 1) << i;
                    self.1 += 1;
                }
                Some(v)
            }
        }
        // Canonical Huffman code from code lengths: (length, symbol) by code.
        fn table(lens: &[usize]) -> Vec<(usize, usize, usize)> {
            let mut codes = vec![];
            let mut code = 0;
            for len in 1..=15 {
                for (sym, _) in lens.iter().enumerate().filter(|(_, &l)| l == len) {
                    codes.push((len, code, sym));
                    code += 1;
                }
                code <<= 1;
            }
            codes
        }
        fn sym(b: &mut Bits, t: &[(usize, usize, usize)]) -> Option<usize> {
            let (mut code, mut len) = (0, 0);
            loop {
                code = (code << 1) | b.get(1)?;
                len += 1;
                if let Some(&(_, _, s)) = t.iter().find(|&&(l, c, _)| l == len && c == code) {
                    return Some(s);
                }
                if len > 15 {
                    return None;
                }
            }
        }
        const LBASE: [usize; 29] = [
            3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99,
            115, 131, 163, 195, 227, 258,
        ];
        const LEXTRA: [usize; 29] = [
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
        ];
        let mut b = Bits(z, 0);
        let mut longest = 0;
        while b.1 / 8 < z.len() {
            let last = b.get(1)?;
            match b.get(2)? {
                0 => {
                    b.1 = b.1.div_ceil(8) * 8;
                    // The end: a sync flush's empty stored block, cut after its header.
                    let Some(n) = b.get(16) else {
                        break;
                    };
                    b.get(16)?;
                    b.1 += 8 * n;
                }
                t @ (1 | 2) => {
                    let (lit, dist) = if t == 1 {
                        let mut l = vec![8; 144];
                        l.extend([9; 112]);
                        l.extend([7; 24]);
                        l.extend([8; 8]);
                        (table(&l), table(&[5; 30]))
                    } else {
                        let (hlit, hdist, hclen) = (b.get(5)? + 257, b.get(5)? + 1, b.get(4)? + 4);
                        const ORDER: [usize; 19] = [
                            16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
                        ];
                        let mut cl = [0; 19];
                        for &o in &ORDER[..hclen] {
                            cl[o] = b.get(3)?;
                        }
                        let ct = table(&cl);
                        let mut lens = vec![];
                        while lens.len() < hlit + hdist {
                            match sym(&mut b, &ct)? {
                                s @ 0..=15 => lens.push(s),
                                16 => {
                                    let p = *lens.last()?;
                                    lens.extend(std::iter::repeat_n(p, 3 + b.get(2)?));
                                }
                                17 => lens.extend(std::iter::repeat_n(0, 3 + b.get(3)?)),
                                _ => lens.extend(std::iter::repeat_n(0, 11 + b.get(7)?)),
                            }
                        }
                        (table(&lens[..hlit]), table(&lens[hlit..]))
                    };
                    loop {
                        let s = sym(&mut b, &lit)?;
                        if s < 256 {
                            continue;
                        }
                        if s == 256 {
                            break;
                        }
                        b.get(*LEXTRA.get(s - 257)?)?;
                        let _ = LBASE[s - 257];
                        let d = sym(&mut b, &dist)?;
                        let extra = if d < 4 { 0 } else { d / 2 - 1 };
                        let base = if d < 4 {
                            d + 1
                        } else {
                            (1 << (extra + 1)) + 1 + (d % 2) * (1 << extra)
                        };
                        longest = longest.max(base + b.get(extra)?);
                    }
                }
                _ => return None,
            }
            if last == 1 {
                break;
            }
        }
        Some(longest)
    }

    #[test]
    fn a_small_window_reaches_no_further_than_the_client_allows() {
        // Noise repeating 600 bytes apart: its only matches are 600 bytes back, past a
        // small window.
        let mut unit = noise(7, 300);
        // ... and a run that a small window compresses too.
        unit.extend(b"ab".repeat(150));
        let data: Vec<u8> = unit.iter().cycle().take(12_000).copied().collect();
        let mut small = vec![];
        assert!(pack(&data, true, &mut small));
        let mut big = vec![];
        assert!(pack(&data, false, &mut big));
        // The oracle sees the full window's distances of 600 bytes and more; the small window stays
        // within 256 bytes (what a client asking for 8 bits allows).
        assert!(longest_distance(&big).is_some_and(|d| d >= 600));
        assert!(longest_distance(&small).is_some_and(|d| d <= 256));
        let mut back = vec![];
        unpack(&small, 20_000, &mut back).unwrap();
        assert!(back == data);
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let zeros = vec![0u8; 10 << 20];
        let mut z = vec![];
        assert!(pack(&zeros, false, &mut z));
        assert!(z.len() < 200 * 1024, "{}", z.len());
        let mut out = vec![];
        assert_eq!(unpack(&z, 1 << 20, &mut out), Err(InflateError::TooBig));
        assert!(out.capacity() <= (1 << 20) + 64 * 1024 + 1);
        // Exactly at the limit is fine; one byte past is not.
        let mut z = vec![];
        assert!(pack(&zeros[..1000], false, &mut z));
        assert_eq!(unpack(&z, 1000, &mut vec![]), Ok(()));
        assert_eq!(unpack(&z, 999, &mut vec![]), Err(InflateError::TooBig));
        assert_eq!(
            unpack(b"\xff\xff\xff\xff", 100, &mut vec![]),
            Err(InflateError::Corrupt)
        );
    }

    #[test]
    fn a_stored_prefix_joins_a_shared_body() {
        let body = text(2000);
        let mut shared = vec![];
        assert!(pack(&body, false, &mut shared));
        for prefix in [&b""[..], b"\x08\x01", b"\x08\xff\xff\xff\xff\x0f"] {
            let mut msg = vec![];
            stored_block(prefix, &mut msg);
            assert_eq!(msg.len(), STORED_OVERHEAD + prefix.len());
            msg.extend_from_slice(&shared);
            let mut back = vec![];
            unpack(&msg, 1 << 20, &mut back).unwrap();
            assert_eq!(&back[..prefix.len()], prefix);
            assert_eq!(&back[prefix.len()..], &body[..]);
        }
    }

    #[test]
    fn a_message_cut_short_is_refused() {
        // A stored block whose LEN promises more than the message holds: before, the tail
        // was read as its content and the message delivered short and padded. (A sender's
        // message ends with the header bits of its sync flush's empty block: the 0.)
        let mut msg = vec![];
        stored_block(&text(300), &mut msg);
        msg.push(0);
        let mut back = vec![];
        unpack(&msg, 1 << 20, &mut back).unwrap();
        assert_eq!(back, text(300));
        // Without its last byte the stream stops inside a block header.
        assert!(unpack(&msg[..msg.len() - 1], 1 << 20, &mut vec![]).is_err());
        // Cut at 1, the header alone is what a sender makes of an empty message.
        assert_eq!(unpack(&msg[..1], 1 << 20, &mut vec![]), Ok(()));
        let mut taken = vec![];
        for cut in 2..msg.len() {
            let mut back = vec![];
            match unpack(&msg[..cut], 1 << 20, &mut back) {
                Err(e) => assert_eq!(e, InflateError::Corrupt),
                // The one cut whose missing content the tail fills exactly is a valid
                // stream (one holding those four bytes), not told apart from a cut.
                Ok(()) => taken.push((cut, back.ends_with(&TAIL))),
            }
        }
        assert_eq!(taken, [(msg.len() - 5, true)]);
        // A sender that left the tail on; one that sent nothing at all.
        msg.extend_from_slice(&TAIL);
        let mut back = vec![];
        unpack(&msg, 1 << 20, &mut back).unwrap();
        assert_eq!(back, text(300));
        let mut z = vec![];
        assert!(pack(&text(3000), false, &mut z));
        z.extend_from_slice(&TAIL);
        let mut back = vec![];
        unpack(&z, 1 << 20, &mut back).unwrap();
        assert_eq!(back, text(3000));
        assert_eq!(unpack(&[], 10, &mut vec![]), Ok(()));
        // Compressed blocks cut anywhere: never taken as the whole message.
        let data = text(3000);
        let mut z = vec![];
        assert!(pack(&data, false, &mut z));
        let mut taken = 0;
        for cut in 0..z.len() {
            let mut back = vec![];
            if unpack(&z[..cut], 1 << 20, &mut back).is_ok() {
                assert_ne!(back, data, "cut at {cut}");
                taken += 1;
            }
        }
        assert!(taken <= 2, "{taken} of {} cuts were taken", z.len());
    }

    #[test]
    fn a_final_block_ends_the_message() {
        // A client may end with BFINAL set (a whole deflate stream): the tail is not needed.
        let data = text(500);
        let mut c = Compress::new(Compression::new(6), false);
        let mut z = Vec::with_capacity(1000);
        c.compress_vec(&data, &mut z, FlushCompress::Finish)
            .unwrap();
        let mut back = vec![];
        unpack(&z, 1000, &mut back).unwrap();
        assert_eq!(back, data);
        // ... and bytes after it are refused.
        z.extend_from_slice(b"\x01\x02");
        assert_eq!(unpack(&z, 1000, &mut vec![]), Err(InflateError::Corrupt));
    }
}
