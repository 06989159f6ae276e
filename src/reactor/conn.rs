//! A connection's state: the slab entry the reactor keeps per socket (docs/LIFECYCLE.md),
//! its flag bits, the boxed state only some connections need, and the one place output is
//! appended.

use std::sync::Arc;

use super::output::Output;
use super::reliable::Acks;
use super::upstream::Calls;
use super::websocket::Fragmented;
use super::Role;
use crate::codec::{Framing, Shared};
use crate::metrics::{CloseReason, Transport};
use crate::net::Sock;
use crate::types::Ref;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum State {
    /// Waiting for HELLO.
    Hello,
    /// HELLO is with a worker; input is paused.
    Authing,
    Open,
    /// Draining output before close; input is ignored until the write side is shut.
    Closing,
    /// Long-poll: parked on a status key until it is set or the poll times out.
    Waiting,
}

pub(super) mod flag {
    /// In the dirty list: flush at the end of this turn.
    pub const DIRTY: u8 = 1;
    /// WRITABLE interest registered (a partial write is pending).
    pub const WRITABLE: u8 = 2;
    /// API: a request is with a worker; the next one waits (responses stay in order).
    pub const BUSY: u8 = 4;
    /// API: `100 Continue` sent for the request being received.
    pub const CONTINUE_SENT: u8 = 8;
    /// Output drained and write side shut: reading only to see the peer's FIN.
    pub const LINGER: u8 = 16;
    /// In the registry.
    pub const REGISTERED: u8 = 32;
    /// API: input paused until its unread answers drain.
    pub const API_FULL: u8 = 64;
    /// Parked pushes of the device wait for this connection's output to drain.
    pub const REPLAY_ON_DRAIN: u8 = 128;
}

/// `Conn::ws` bits: WebSocket mode and state (and one bit any client connection uses).
pub(super) mod wsflag {
    /// Subprotocol `pbbp2`: one Frame per binary message; otherwise raw mode.
    pub const PBBP2: u8 = 1;
    /// A server ping is out and unanswered.
    pub const PING_OUT: u8 = 2;
    /// Our close frame has been queued.
    pub const CLOSE_SENT: u8 = 4;
    /// Any client connection: a `Partial` timer entry is on the wheel (one at a time).
    pub const PARTIAL_TIMER: u8 = 8;
    /// Any client connection: its device's durable pushes are being read from Redis; its
    /// `ack=1` pushes wait (parked) until they are in, so they go in order.
    pub const RECOVERING: u8 = 16;
    /// ... and read them again when that read is in (another node offered pushes it may
    /// have written after this read was served).
    pub const REREAD: u8 = 32;
    /// permessage-deflate negotiated (no context kept either way: see `crate::deflate`).
    pub const DEFLATE: u8 = 64;
    /// ... and the client limited our window: compressed with the small one.
    pub const DEFLATE_SMALL: u8 = 128;
}

pub(super) struct Conn {
    pub sock: Sock,
    pub role: Role,
    pub state: State,
    pub flags: u8,
    /// The last read was short (the receive queue was empty then: edge-triggered) and no
    /// readable edge has come since, so `resume` need not read again to find nothing.
    /// Cleared by every readable event handled, and by a failed live upgrade (quiescing
    /// drops events); never set for TLS (rustls reads in pieces).
    pub drained: bool,
    pub errors: u8,
    pub close_reason: CloseReason,
    pub app: u16,
    /// An admitted client's device's tag in the app's device index (`Registry::add`): its
    /// close leaves the index without hashing the id again.
    pub dev_tag: u32,
    /// Only a partial frame's leftover; none while idle.
    pub inbuf: InBuf,
    /// Pending output, from the reactor's pool; none while idle (one pointer, not a buffer
    /// and its position, in every connection's entry).
    pub out: Option<Box<Output>>,
    pub last_read: u64,
    /// When the timer of the connection's current state is due: the handshake (or a
    /// keep-alive HTTP connection's next request), a long-poll's timeout, or the linger of a
    /// close. Those wheel entries act only at this deadline; an older one that fires (armed
    /// for an earlier request on the same connection) is stale.
    pub deadline: u64,
    /// A `Handshake` entry is on the wheel for exactly `deadline`: arming the same again
    /// (every keep-alive request answered in one turn has the same deadline) adds none.
    pub hs_armed: bool,
    /// Last downstream seqid.
    pub seq: u64,
    pub connected_at: u64,
    /// An admitted client's device id.
    pub device: Option<Arc<str>>,
    /// An admitted client's user id, if it has one.
    pub user: Option<Arc<str>>,
    /// `wsflag` bits.
    pub ws: u8,
    /// State only some connections need, allocated on first use.
    pub extra: Option<Box<Extra>>,
}

/// What a connection holds only sometimes, boxed so that one that holds none of it (most
/// idle connections) pays one pointer.
#[derive(Default)]
pub(super) struct Extra {
    /// Session data (from the auth backend or `PUT /v1/session`), carried to backends.
    pub session: Vec<(String, String)>,
    /// Calls to backend services: the one in flight, those queued behind it, recent seqids.
    pub calls: Calls,
    /// `ack=1` pushes sent and waiting for their ACK.
    pub acks: Acks,
    /// WebSocket: a fragmented message being received.
    pub frag: Option<Box<Fragmented>>,
}

/// A connection's leftover input (an unfinished frame's bytes): a vector behind one
/// pointer, and none at all while empty. Most connections hold none between whole frames,
/// and with it (and a fragmented message's parts in `Extra`) a slab entry fits two cache
/// lines instead of three: each connect, event and push to the connection reads one line
/// fewer.
#[derive(Default)]
// The box is the point: one pointer in the entry instead of a vector's three words.
#[allow(clippy::box_collection)]
pub(super) struct InBuf(Option<Box<Vec<u8>>>);

impl InBuf {
    pub fn from_vec(v: Vec<u8>) -> InBuf {
        let mut b = InBuf::default();
        b.set(v);
        b
    }

    pub fn is_empty(&self) -> bool {
        !matches!(&self.0, Some(v) if !v.is_empty())
    }

    /// Bytes it holds room for (counted in the input held across connections).
    pub fn capacity(&self) -> usize {
        self.0.as_ref().map_or(0, |v| v.capacity())
    }

    pub fn as_slice(&self) -> &[u8] {
        self.0.as_ref().map_or(&[][..], |v| &v[..])
    }

    /// The bytes, taken out (the box stays for `set` to refill).
    pub fn take(&mut self) -> Vec<u8> {
        self.0
            .as_mut()
            .map_or_else(Vec::new, |b| std::mem::take(&mut **b))
    }

    /// Holds `v`; an unallocated `v` frees the box.
    pub fn set(&mut self, v: Vec<u8>) {
        if v.capacity() == 0 {
            self.0 = None;
            return;
        }
        match &mut self.0 {
            Some(b) => **b = v,
            None => self.0 = Some(Box::new(v)),
        }
    }
}

impl Conn {
    /// Output queued and not yet written, in bytes.
    pub fn backlog(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.backlog())
    }

    /// Whether anything is still to be written to the peer: queued output, or TLS records
    /// sealed and not yet sent.
    pub fn owes_output(&self) -> bool {
        self.backlog() > 0 || self.sock.tls_pending()
    }

    /// The boxed extra state, allocated on first use.
    pub fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Default::default)
    }

    /// WebSocket: the fragmented message being received, if any.
    pub fn frag(&self) -> Option<&Fragmented> {
        self.extra.as_ref()?.frag.as_deref()
    }

    pub fn take_frag(&mut self) -> Option<Box<Fragmented>> {
        self.extra.as_mut()?.frag.take()
    }

    pub fn set_frag(&mut self, f: Box<Fragmented>) {
        self.extra().frag = Some(f);
    }
}

/// A shared push as a connection's transport frames it: TCP, pbbp2 (both with the
/// connection's seqid) or raw WebSocket (the payload alone). The connection's own head is
/// copied; the body is referenced (or copied when small, see [`Output::append`]).
/// With permessage-deflate (`mode`), a push of at least `deflate_min` bytes goes compressed,
/// compressed once for all its recipients.
pub(super) fn write_push(
    f: &Shared,
    seq: u64,
    role: Role,
    mode: u8,
    deflate_min: usize,
    out: &mut Output,
) {
    let framing = match role {
        Role::Client(Transport::Ws) if mode & wsflag::PBBP2 != 0 => Framing::WsPbbp2,
        Role::Client(Transport::Ws) => Framing::WsRaw,
        _ => Framing::Tcp,
    };
    if framing != Framing::Tcp && mode & wsflag::DEFLATE != 0 {
        let small = mode & wsflag::DEFLATE_SMALL != 0;
        let body = f.head_deflate(seq, framing, small, deflate_min, &mut out.buf);
        out.append(&body);
        return;
    }
    let body = f.head(seq, framing, &mut out.buf);
    out.append(body);
}

/// Appends one whole unfragmented WebSocket data message, compressed when the connection
/// negotiated permessage-deflate (`mode`), it is at least `deflate_min` bytes and it
/// shrinks; control frames never are (RFC 7692 §6.1).
pub(super) fn write_ws_message(
    out: &mut Vec<u8>,
    opcode: u8,
    payload: &[u8],
    mode: u8,
    deflate_min: usize,
) {
    let data = !crate::ws::op::is_control(opcode);
    if data && mode & wsflag::DEFLATE != 0 && payload.len() >= deflate_min {
        let small = mode & wsflag::DEFLATE_SMALL != 0;
        // The header goes in front once the compressed length is known: compress after
        // a gap for the longest header, then close it up.
        let start = out.len();
        out.resize(start + 10, 0);
        if crate::deflate::pack(payload, small, out) {
            let len = out.len() - start - 10;
            let mut head = Vec::with_capacity(10);
            crate::ws::encode_header_rsv1(&mut head, true, true, opcode, len);
            let at = start + 10 - head.len();
            out[at..start + 10].copy_from_slice(&head);
            out.drain(start..at);
            crate::deflate::sent();
            return;
        }
        out.truncate(start);
    }
    crate::ws::encode_frame(out, opcode, payload);
}

/// Spare output queues, kept for reuse so that a connection written to takes one instead of
/// allocating — bounded in count and in bytes, so a burst's buffers go back to the system.
#[derive(Default)]
pub(super) struct BufPool {
    // Boxed: a queue moves between the pool and a connection's entry without reallocating.
    #[allow(clippy::vec_box)]
    bufs: Vec<Box<Output>>,
    bytes: usize,
}

impl BufPool {
    /// Spare buffers kept at most, their bytes, and the largest one kept. Kept small: the
    /// pool saves an allocation per write burst, which matters for the many small frames of
    /// fan-out, not for the rare big answer. Larger bounds let big buffers (a `/metrics`
    /// answer, a batch's slice) sink into the pool one by one and RSS creep under churn.
    const MAX: usize = 4096;
    const MAX_BYTES: usize = 1 << 20;
    const MAX_BUF: usize = 4 * 1024;

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn take(&mut self) -> Box<Output> {
        match self.bufs.pop() {
            Some(b) => {
                self.bytes -= b.capacity();
                b
            }
            None => Box::default(),
        }
    }

    /// Keeps a queue for reuse, emptied, if it is small and there is room for it.
    pub fn give(&mut self, mut b: Box<Output>) {
        if self.bufs.len() < Self::MAX && b.reset(Self::MAX_BUF) {
            let cap = b.capacity();
            if self.bytes + cap <= Self::MAX_BYTES {
                self.bytes += cap;
                self.bufs.push(b);
            }
        }
    }
}

/// Output across connections: memory held for it (own bytes and shared-body records) and
/// bytes queued for the wire (what `max_output_total` bounds: a body queued for one
/// connection only is held for it alone, which the records do not show).
#[derive(Default)]
pub(super) struct OutTotals {
    pub held: usize,
    pub queued: usize,
}

/// Appends to a connection's output (taking a pooled queue if it has none) and puts it on
/// the dirty list; `totals` counts output across connections. Returns the backlog in
/// bytes.
pub(super) fn enqueue(
    c: &mut Conn,
    r: Ref,
    pool: &mut BufPool,
    dirty: &mut Vec<Ref>,
    totals: &mut OutTotals,
    write: impl FnOnce(&mut Output),
) -> usize {
    let out = c.out.get_or_insert_with(|| pool.take());
    let (held, queued) = (out.held(), out.backlog());
    write(out);
    totals.held += out.held() - held;
    totals.queued += out.backlog() - queued;
    if c.flags & flag::DIRTY == 0 {
        c.flags |= flag::DIRTY;
        dirty.push(r);
    }
    c.backlog()
}

#[cfg(test)]
mod tests {
    use super::{BufPool, Conn, Output, Sock};

    fn with_buf(cap: usize) -> Box<Output> {
        let mut o = Box::<Output>::default();
        o.buf.reserve_exact(cap);
        o
    }

    #[test]
    fn the_buffer_pool_keeps_only_small_buffers_within_its_bytes() {
        let mut p = BufPool::default();
        p.give(with_buf(16 * 1024));
        assert_eq!(
            p.take().buf.capacity(),
            0,
            "a big buffer is freed, not pooled"
        );
        for _ in 0..1000 {
            p.give(with_buf(4096));
        }
        assert!(p.bytes <= BufPool::MAX_BYTES);
        assert_eq!(p.bufs.len(), BufPool::MAX_BYTES / with_buf(4096).capacity());
        assert_eq!(p.take().buf.capacity(), 4096);
    }

    #[test]
    fn a_connection_entry_fits_two_cache_lines() {
        // Every idle connection pays this (docs/BENCHMARKS.md: RSS per idle connection), and
        // every connect, event and push reads it. The slab entry is the generation (4 bytes)
        // and the connection, 64-byte aligned: within 128 bytes it lies on two cache lines.
        // The socket is 16 bytes in a release build (mio adds a field to it in debug builds,
        // so it is counted at its release size here).
        let own = std::mem::size_of::<Conn>() - std::mem::size_of::<Sock>();
        assert!(
            own + 16 + 4 <= 128,
            "a connection holds {own} bytes besides its socket"
        );
        // (A value of the release connection's size, 120 bytes, with a niche for `Option`
        // as its enums give it, takes 128 in the slab.)
        assert_eq!(
            crate::slab::entry_size::<(std::num::NonZeroU64, [u64; 14]), crate::slab::Line>(),
            128
        );
    }
}
#[cfg(test)]
mod layout_tests {
    use super::InBuf;

    #[test]
    fn leftover_input_holds_nothing_while_empty() {
        let mut b = InBuf::default();
        assert!(b.is_empty() && b.capacity() == 0 && b.as_slice().is_empty());
        b.set(b"abc".to_vec());
        assert!(!b.is_empty());
        assert_eq!(b.as_slice(), b"abc");
        let v = b.take();
        assert_eq!(v, b"abc");
        assert!(b.is_empty(), "taken out");
        b.set(Vec::new());
        assert_eq!(b.capacity(), 0, "an unallocated vector frees the box");
        assert!(b.0.is_none());
        let mut v = Vec::with_capacity(100);
        v.extend_from_slice(b"x");
        let b = InBuf::from_vec(v);
        assert!(b.capacity() >= 100 && b.as_slice() == b"x");
    }
}
