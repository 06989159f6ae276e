//! A connection's pending output: bytes of its own (frame heads, answers, small frames) and
//! shared bodies placed between them. A push's encoding is made once and referenced by every
//! recipient's queue, so a queued delivery costs its head and one segment record, not a copy
//! of the body; a flush hands the kernel both with one `writev`.
//!
//! Pure bookkeeping over byte slices: no sockets, so it is unit-tested against the byte
//! stream a plain copy would give.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::Bytes;

/// Bodies shorter than this are copied: a segment record (and an iovec at flush) costs more
/// than copying a few dozen bytes, while from here on sharing saves memory per queued
/// delivery (40 bytes of record against the body).
pub(super) const SHARE_MIN: usize = 128;

/// Segments kept in a pooled `Output`; a queue that grew past it is freed, not pooled.
const POOLED_SEGS: usize = 64;

/// How many slices one flush hands to `writev` (well under `IOV_MAX`).
pub(super) const IOVECS: usize = 64;

/// A shared body, to be written before `buf[at..]`. Offsets are u32 like the backlog they
/// index (bounded by twice `max_output_bytes` ≤ 2 GiB), keeping a record at 40 bytes.
struct Seg {
    at: u32,
    /// Bytes of `body` already written.
    done: u32,
    body: Bytes,
}

/// Bytes each queued shared body costs the connection (counted in `output_held`).
pub(super) const SEG_COST: usize = std::mem::size_of::<Seg>();

#[derive(Default)]
pub(super) struct Output {
    /// The connection's own bytes; segments sit between them at their offsets.
    pub buf: Vec<u8>,
    /// Written so far of `buf`. Every segment left has `at >= pos`.
    pos: usize,
    segs: VecDeque<Seg>,
    /// Unwritten bytes of `segs`.
    seg_bytes: usize,
}

impl Output {
    /// Bytes still to go on the wire.
    pub fn backlog(&self) -> usize {
        self.buf.len() - self.pos + self.seg_bytes
    }

    /// Memory this queue holds for its connection: its own unwritten bytes and a record per
    /// shared body (the bodies themselves are held once, by whoever references them).
    pub fn held(&self) -> usize {
        self.buf.len() - self.pos + self.segs.len() * SEG_COST
    }

    /// Heap bytes kept by an emptied queue (for the pool's bound).
    pub fn capacity(&self) -> usize {
        std::mem::size_of::<Output>() + self.buf.capacity() + self.segs.capacity() * SEG_COST
    }

    /// Appends `body` after everything queued: referenced when it is big enough to be worth
    /// it, copied otherwise.
    pub fn append(&mut self, body: &Bytes) {
        if body.len() < SHARE_MIN {
            self.buf.extend_from_slice(body);
            return;
        }
        self.seg_bytes += body.len();
        self.segs.push_back(Seg {
            at: self.buf.len() as u32,
            done: 0,
            body: body.clone(),
        });
    }

    /// The unwritten bytes when all are the connection's own (no shared body queued, as
    /// for a HELLO answer, a PONG, an echo): written as they are, with no iovec array to
    /// fill (64 of them, set each time, were a twentieth of a connect's user-space work).
    pub fn own_only(&self) -> Option<&[u8]> {
        self.segs.is_empty().then(|| &self.buf[self.pos..])
    }

    /// Fills `v` with the next unwritten bytes in wire order; returns how many slices.
    pub fn slices<'a>(&'a self, v: &mut [IoSlice<'a>]) -> usize {
        let mut k = 0;
        let mut p = self.pos;
        for s in &self.segs {
            if k + 2 > v.len() {
                return k;
            }
            let at = s.at as usize;
            if at > p {
                v[k] = IoSlice::new(&self.buf[p..at]);
                k += 1;
            }
            v[k] = IoSlice::new(&s.body[s.done as usize..]);
            k += 1;
            p = at;
        }
        if k < v.len() && p < self.buf.len() {
            v[k] = IoSlice::new(&self.buf[p..]);
            k += 1;
        }
        k
    }

    /// Every unwritten byte in wire order, as one copy (for the live upgrade).
    pub fn unwritten(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.backlog());
        let mut p = self.pos;
        for s in &self.segs {
            let at = s.at as usize;
            if at > p {
                v.extend_from_slice(&self.buf[p..at]);
            }
            v.extend_from_slice(&s.body[s.done as usize..]);
            p = at;
        }
        v.extend_from_slice(&self.buf[p..]);
        v
    }

    /// `n` bytes went out: moves past them, releasing finished segments, and drops the
    /// written front of `buf` when it is most of it (a consumer that keeps up but never quite
    /// drains must not grow the buffer past its backlog).
    pub fn advance(&mut self, mut n: usize) {
        debug_assert!(n <= self.backlog());
        while n > 0 {
            let next = self.segs.front().map_or(self.buf.len(), |s| s.at as usize);
            if next > self.pos {
                let t = (next - self.pos).min(n);
                self.pos += t;
                n -= t;
                continue;
            }
            let Some(s) = self.segs.front_mut() else {
                break; // more than was queued: cannot happen (the kernel took what we gave)
            };
            let left = s.body.len() - s.done as usize;
            let t = left.min(n);
            s.done += t as u32;
            self.seg_bytes -= t;
            n -= t;
            if t == left {
                self.segs.pop_front();
            }
        }
        if self.pos > 64 * 1024 && self.pos * 2 > self.buf.len() && self.backlog() > 0 {
            self.buf.drain(..self.pos);
            let cut = self.pos as u32;
            for s in &mut self.segs {
                s.at -= cut;
            }
            self.pos = 0;
        }
    }

    /// Empties the queue for reuse; false when it grew too big to be worth keeping.
    pub fn reset(&mut self, max_buf: usize) -> bool {
        if self.buf.capacity() > max_buf {
            return false;
        }
        if self.segs.capacity() > POOLED_SEGS {
            self.segs = VecDeque::new();
        }
        self.buf.clear();
        self.segs.clear();
        self.pos = 0;
        self.seg_bytes = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::{Bytes, IoSlice, Output, IOVECS, POOLED_SEGS, SEG_COST, SHARE_MIN};

    /// What the slices say, concatenated (and, with no shared body queued, the same as
    /// what the flush's flat path writes).
    fn pending(o: &Output) -> Vec<u8> {
        let mut v = [IoSlice::new(&[]); IOVECS];
        let k = o.slices(&mut v);
        let p: Vec<u8> = v[..k].iter().flat_map(|s| s.iter().copied()).collect();
        if let Some(own) = o.own_only() {
            assert_eq!(own, &p[..]);
        }
        p
    }

    /// A deterministic generator, so a failing case can be replayed.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n.max(1)
        }
    }

    #[test]
    fn written_bytes_are_the_stream_a_copy_would_give() {
        for seed in 0..200u64 {
            let mut r = Lcg(seed);
            let mut o = Output::default();
            let (mut want, mut got) = (Vec::new(), Vec::new());
            let mut tag = 0u8;
            for _ in 0..300 {
                match r.next(4) {
                    0 => {
                        // an own write (a head, an answer)
                        let n = r.next(20);
                        tag = tag.wrapping_add(1);
                        o.buf.extend(std::iter::repeat_n(tag, n));
                        want.extend(std::iter::repeat_n(tag, n));
                    }
                    1 => {
                        // a body, shared or copied by its size
                        let n = r.next(3 * SHARE_MIN);
                        tag = tag.wrapping_add(1);
                        let b = Bytes::from(vec![tag; n]);
                        o.append(&b);
                        want.extend_from_slice(&b);
                    }
                    _ => {
                        // a partial write: the kernel takes some of the first slices
                        let p = pending(&o);
                        assert!(want.ends_with(&p) || p.is_empty(), "seed {seed}");
                        assert!(p.len() <= o.backlog());
                        let n = r.next(p.len() + 1);
                        got.extend_from_slice(&p[..n]);
                        o.advance(n);
                    }
                }
                assert_eq!(got.len() + o.backlog(), want.len(), "seed {seed}");
                // What a live upgrade hands over is exactly what is left to write.
                assert_eq!(o.unwritten(), want[got.len()..], "seed {seed}");
            }
            while o.backlog() > 0 {
                let p = pending(&o);
                assert!(!p.is_empty());
                got.extend_from_slice(&p);
                o.advance(p.len());
            }
            assert_eq!(got, want, "seed {seed}");
            assert_eq!(o.held(), 0);
        }
    }

    #[test]
    fn a_shared_body_is_referenced_not_copied() {
        let body = Bytes::from(vec![7u8; 4096]);
        let mut o = Output::default();
        for _ in 0..100 {
            o.buf.extend_from_slice(b"head");
            o.append(&body);
        }
        assert_eq!(o.backlog(), 100 * (4 + 4096));
        assert_eq!(
            o.held(),
            100 * (4 + SEG_COST),
            "a record per delivery, no copy"
        );
        assert!(o.buf.len() == 400);
        // A small body is copied.
        o.append(&Bytes::from_static(b"tiny"));
        assert_eq!(o.buf.len(), 404);
    }

    #[test]
    fn a_long_queue_is_written_in_bounded_slices() {
        let body = Bytes::from(vec![1u8; 200]);
        let mut o = Output::default();
        for _ in 0..1000 {
            o.buf.push(0);
            o.append(&body);
        }
        let mut v = [IoSlice::new(&[]); IOVECS];
        assert_eq!(o.slices(&mut v), IOVECS);
        let mut total = 0;
        while o.backlog() > 0 {
            let n = pending(&o).len();
            o.advance(n);
            total += n;
        }
        assert_eq!(total, 1000 * 201);
    }

    #[test]
    fn the_written_front_is_dropped_and_offsets_follow() {
        let body = Bytes::from(vec![9u8; 1000]);
        let mut o = Output::default();
        o.buf.extend(std::iter::repeat_n(1u8, 100_000));
        o.append(&body);
        o.buf.extend_from_slice(b"tail");
        o.advance(90_000);
        assert_eq!(o.buf.len(), 10_004, "compacted");
        let p = pending(&o);
        assert_eq!(p.len(), 10_000 + 1000 + 4);
        assert!(p[..10_000].iter().all(|&b| b == 1));
        assert!(p[10_000..11_000].iter().all(|&b| b == 9));
        assert_eq!(&p[11_000..], b"tail");
    }

    #[test]
    fn a_big_queue_is_not_pooled() {
        let mut o = Output::default();
        o.buf.reserve(100_000);
        assert!(!o.reset(4096));
        let mut o = Output::default();
        for _ in 0..1000 {
            o.append(&Bytes::from(vec![0u8; 200]));
        }
        assert!(o.reset(4096));
        assert!(o.segs.capacity() <= POOLED_SEGS);
        assert_eq!(o.backlog(), 0);
    }
}
