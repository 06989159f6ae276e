//! The reactor: one thread, one `mio::Poll`, every socket (DESIGN.md §1). It accepts, reads
//! into one scratch buffer, cuts frames with the pure decoders, answers heartbeats, hands
//! HELLOs and API requests to the worker pool, applies the workers' results, and owns every
//! write. See docs/LIFECYCLE.md for the connection state machine.
//!
//! One loop turn: poll (timeout = nearest timer) → handle events → retry deferred reads and
//! accepts → apply worker results → fire timers → flush every connection written to this
//! turn. Output is only appended during the turn and written once at its end, so many
//! messages for one connection leave in one write.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use prost::Message;
use serde_json::json;

use crate::api::{ApiOut, ApiRequest, Command, Push, PushResult, Target};
use crate::codec::{self, FrameError, Shared};
use crate::config::Config;
use crate::http::{self, Parsed};
use crate::metrics::{inc, BadFrame, CloseReason, Metrics, PushOutcome, Transport, TRANSPORTS};
use crate::net::{Listener, Sock};
use crate::proto::{code, method, Frame};
use crate::registry::Registry;
use crate::slab::Slab;
use crate::timer::{TimerKey, TimerKind, Wheel};
use crate::worker::{Admit, Creds, Done, Job, Ref, Wake};
use crate::ws;

mod clienthttp;
mod reliable;
mod upstream;
mod websocket;

pub const WAKER: Token = Token(0);
const SIGNAL: Token = Token(1);
const LISTENER_BASE: usize = 2;
const CONN_BASE: usize = 16;

/// Bytes read from one connection per event before others get a turn.
const READ_BUDGET: usize = 256 * 1024;
const SCRATCH: usize = 64 * 1024;
const ACCEPT_BATCH: usize = 256;
const DONE_BATCH: usize = 4096;
/// Protocol errors a connection may make before it is closed.
const MAX_PROTOCOL_ERRORS: u8 = 8;
/// How long a closing connection may take to drain its output and see the peer's FIN.
const LINGER_MS: u64 = 2_000;
/// How long shutdown waits for BYEs to drain.
const SHUTDOWN_GRACE_MS: u64 = 3_000;
const ACCEPT_RETRY_MS: u64 = 100;
/// Spare output buffers kept for reuse, and the largest one kept.
const POOL_MAX: usize = 4096;
const POOL_BUF_MAX: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client(Transport),
    Api,
    /// The client HTTP listener before an upgrade, or serving long-polls.
    Http,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Pause,
    Close,
}

mod flag {
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
}

/// `Conn::ws` bits: WebSocket mode and state, and the long-poll's keep-alive.
mod wsflag {
    /// Subprotocol `pbbp2`: one Frame per binary message; otherwise raw mode.
    pub const PBBP2: u8 = 1;
    /// A server ping is out and unanswered.
    pub const PING_OUT: u8 = 2;
    /// Our close frame has been queued.
    pub const CLOSE_SENT: u8 = 4;
    /// Long-poll: the request was keep-alive.
    pub const KEEP_ALIVE: u8 = 8;
}

struct Conn {
    sock: Sock,
    role: Role,
    state: State,
    flags: u8,
    errors: u8,
    close_reason: CloseReason,
    app: u16,
    app_pos: u32,
    /// Only a partial frame's leftover; empty (unallocated) while idle.
    inbuf: Vec<u8>,
    /// Pending output, from the reactor's buffer pool; unallocated while idle.
    out: Vec<u8>,
    out_pos: usize,
    last_read: u64,
    /// Last downstream seqid.
    seq: u64,
    connected_at: u64,
    /// Device id; for a long-poll waiter, the status key it waits on.
    device: Option<Arc<str>>,
    /// User id; for a long-poll waiter, the CORS origin to answer with.
    user: Option<Arc<str>>,
    ws: u8,
    /// WebSocket: a fragmented message being received (boxed: most connections never have one).
    frag: Option<Box<websocket::Fragmented>>,
    /// Session data and upstream state, allocated on first use.
    ext: Option<Box<upstream::Ext>>,
}

pub struct Reactor {
    poll: Poll,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    conns: Slab<Conn>,
    registry: Registry,
    wheel: Wheel,
    listeners: Vec<Option<(Listener, Role)>>,
    jobs: Sender<Job>,
    done: Receiver<Done>,
    wake: Arc<Wake>,
    signal: Option<OwnedFd>,
    scratch: Vec<u8>,
    dirty: Vec<Ref>,
    again: Vec<Ref>,
    accept_again: Vec<usize>,
    accept_retry_at: Option<u64>,
    pool: Vec<Vec<u8>>,
    fired: Vec<TimerKey>,
    start: Instant,
    now: u64,
    client_conns: usize,
    shutdown_at: Option<u64>,
    more_done: bool,
    status: clienthttp::StatusStore,
    /// Reused buffer for an unmasked WebSocket message.
    msg: Vec<u8>,
    backends: Arc<crate::backend::Backends>,
    /// Backend lanes answer on the workers' channel.
    done_tx: Sender<Done>,
    /// Gone devices' unacknowledged pushes, in their reconnect grace window.
    parked: reliable::Parked,
    /// API push requests waiting for their pushes' ACKs (`wait_ms`).
    waits: Slab<reliable::Waiter>,
    /// Slow consumers found by a push request, closed when the request is done.
    slow: Vec<Ref>,
    /// API connections to resume at the top of the next turn (an answer that left from deep
    /// inside another connection's input processing, or a backlog that drained).
    resume_later: Vec<Ref>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A shared push as a connection's transport frames it: TCP, pbbp2 (both with the
/// connection's seqid) or raw WebSocket (the payload alone).
fn write_push(f: &Shared, seq: u64, role: Role, mode: u8, out: &mut Vec<u8>) {
    match role {
        Role::Client(Transport::Ws) if mode & wsflag::PBBP2 != 0 => f.write_ws_pbbp2(seq, out),
        Role::Client(Transport::Ws) => f.write_ws_raw(out),
        _ => f.write_tcp(seq, out),
    }
}

/// Appends to a connection's output (taking a pooled buffer if it has none) and puts it on
/// the dirty list. Returns the backlog in bytes.
fn enqueue(
    c: &mut Conn,
    r: Ref,
    pool: &mut Vec<Vec<u8>>,
    dirty: &mut Vec<Ref>,
    write: impl FnOnce(&mut Vec<u8>),
) -> usize {
    if c.out.capacity() == 0 {
        c.out = pool.pop().unwrap_or_default();
    }
    write(&mut c.out);
    if c.flags & flag::DIRTY == 0 {
        c.flags |= flag::DIRTY;
        dirty.push(r);
    }
    c.out.len() - c.out_pos
}

impl Reactor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        poll: Poll,
        cfg: Arc<Config>,
        metrics: Arc<Metrics>,
        listeners: Vec<(Listener, Role)>,
        jobs: Sender<Job>,
        done: Receiver<Done>,
        wake: Arc<Wake>,
        signal: Option<OwnedFd>,
        backends: Arc<crate::backend::Backends>,
        done_tx: Sender<Done>,
    ) -> io::Result<Reactor> {
        let apps = cfg.apps.len();
        let mut r = Reactor {
            poll,
            metrics,
            conns: Slab::default(),
            registry: Registry::new(apps),
            wheel: Wheel::new(0),
            listeners: vec![],
            jobs,
            done,
            wake,
            signal,
            scratch: vec![0; SCRATCH],
            dirty: vec![],
            again: vec![],
            accept_again: vec![],
            accept_retry_at: None,
            pool: vec![],
            fired: vec![],
            start: Instant::now(),
            now: 0,
            client_conns: 0,
            shutdown_at: None,
            more_done: false,
            status: clienthttp::StatusStore::default(),
            msg: Vec::new(),
            backends,
            done_tx,
            parked: reliable::Parked::default(),
            waits: Slab::default(),
            slow: vec![],
            resume_later: vec![],
            cfg,
        };
        for (i, (mut l, role)) in listeners.into_iter().enumerate() {
            assert!(LISTENER_BASE + i < CONN_BASE, "too many listeners");
            r.poll
                .registry()
                .register(&mut l, Token(LISTENER_BASE + i), Interest::READABLE)?;
            r.listeners.push(Some((l, role)));
        }
        if let Some(fd) = &r.signal {
            r.poll.registry().register(
                &mut SourceFd(&fd.as_raw_fd()),
                SIGNAL,
                Interest::READABLE,
            )?;
        }
        Ok(r)
    }

    fn clock(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Runs until shutdown has drained (or its grace period ran out).
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            self.now = self.clock();
            let busy = !self.again.is_empty()
                || !self.accept_again.is_empty()
                || !self.resume_later.is_empty()
                || self.more_done;
            let mut timeout = if busy {
                Some(0)
            } else {
                self.wheel.next_timeout_ms(self.now)
            };
            for at in [self.accept_retry_at, self.shutdown_at]
                .into_iter()
                .flatten()
            {
                let d = at.saturating_sub(self.now);
                timeout = Some(timeout.map_or(d, |t| t.min(d)));
            }
            match self
                .poll
                .poll(&mut events, timeout.map(Duration::from_millis))
            {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.now = self.clock();
            for ev in events.iter() {
                match ev.token() {
                    WAKER => self.wake.clear(),
                    SIGNAL => self.on_signal(),
                    Token(t) if t >= CONN_BASE => {
                        let idx = (t - CONN_BASE) as u32;
                        let Some((_, gen)) = self.conns.by_index(idx) else {
                            continue;
                        };
                        if ev.is_writable() {
                            self.flush(idx, gen);
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            let to_eof = ev.is_read_closed() || ev.is_error();
                            self.read_ready(idx, gen, to_eof);
                        }
                    }
                    Token(t) => self.accept(t - LISTENER_BASE),
                }
            }
            for r in std::mem::take(&mut self.again) {
                self.on_readable(r.idx, r.gen);
            }
            for r in std::mem::take(&mut self.resume_later) {
                self.resume(r.idx, r.gen);
            }
            if self.accept_retry_at.is_some_and(|t| self.now >= t) {
                self.accept_retry_at = None;
                self.accept_again.extend(0..self.listeners.len());
            }
            for li in std::mem::take(&mut self.accept_again) {
                self.accept(li);
            }
            self.drain_done();
            self.fire_timers();
            self.flush_dirty();
            self.metrics
                .timer_entries
                .store(self.wheel.len() as u64, Relaxed);
            inc(&self.metrics.reactor_loops);
            if let Some(at) = self.shutdown_at {
                if self.conns.is_empty() || self.now >= at {
                    log::info!("shutdown complete ({} connections left)", self.conns.len());
                    // Offline events for connections still open go out too, and every push
                    // still unacknowledged is reported.
                    for (idx, gen) in self.conns.keys() {
                        self.unregister(idx, gen);
                    }
                    self.give_up_all();
                    return Ok(());
                }
            }
        }
    }

    // ---- accept ----------------------------------------------------------------------

    fn accept(&mut self, li: usize) {
        for _ in 0..ACCEPT_BATCH {
            let Some(Some((l, role))) = self.listeners.get(li) else {
                return;
            };
            let role = *role;
            match l.accept() {
                Ok((sock, _)) => self.add_conn(sock, role),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // EMFILE and friends: the connection stays in the backlog; try again soon
                    // rather than spinning.
                    inc(&self.metrics.accept_errors);
                    log::warn!("accept on {}: {e}", l.local());
                    self.accept_retry_at = Some(self.now + ACCEPT_RETRY_MS);
                    return;
                }
            }
        }
        // Edge-triggered: more may be waiting; come back next turn.
        self.accept_again.push(li);
    }

    fn add_conn(&mut self, sock: Sock, role: Role) {
        if role != Role::Api && self.client_conns >= self.cfg.limits.max_connections {
            self.metrics.close(CloseReason::Overloaded);
            return; // dropping the socket closes it
        }
        let (idx, gen) = self.conns.insert(Conn {
            sock,
            role,
            state: if role == Role::Api {
                State::Open
            } else {
                State::Hello
            },
            flags: 0,
            errors: 0,
            close_reason: CloseReason::Peer,
            app: 0,
            app_pos: 0,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            last_read: self.now,
            seq: 0,
            connected_at: unix_ms(),
            device: None,
            user: None,
            ws: 0,
            frag: None,
            ext: None,
        });
        let c = self.conns.get_mut(idx, gen).expect("just inserted");
        let token = Token(idx as usize + CONN_BASE);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut c.sock, token, Interest::READABLE)
        {
            log::warn!("register: {e}");
            self.conns.remove(idx, gen);
            return;
        }
        match role {
            Role::Client(t) => {
                self.client_conns += 1;
                inc(&self.metrics.accepted[t as usize]);
                self.metrics.connections[t as usize].fetch_add(1, Relaxed);
                let k = TimerKey {
                    idx,
                    gen,
                    kind: TimerKind::Handshake,
                };
                self.wheel
                    .insert(self.now + self.cfg.limits.handshake_timeout_ms, k);
            }
            Role::Api => {
                self.metrics.api_connections.fetch_add(1, Relaxed);
                let k = TimerKey {
                    idx,
                    gen,
                    kind: TimerKind::Read,
                };
                self.wheel
                    .insert(self.now + self.cfg.api.idle_timeout_ms, k);
            }
            Role::Http => {
                // The request (upgrade or poll) must arrive within the handshake timeout, so
                // a slowloris trickle is closed.
                self.client_conns += 1;
                inc(&self.metrics.http_accepted);
                self.arm_handshake(idx, gen);
            }
        }
    }

    fn arm_handshake(&mut self, idx: u32, gen: u32) {
        let k = TimerKey {
            idx,
            gen,
            kind: TimerKind::Handshake,
        };
        self.wheel
            .insert(self.now + self.cfg.limits.handshake_timeout_ms, k);
    }

    // ---- input -----------------------------------------------------------------------

    /// Reads until the socket is drained (or the budget is spent).
    fn on_readable(&mut self, idx: u32, gen: u32) {
        self.read_ready(idx, gen, true);
    }

    /// `to_eof`: keep reading until EAGAIN or EOF. Otherwise a short read ends the loop: with
    /// edge-triggered epoll it means the receive queue is empty, and later data brings a new
    /// edge, so the extra read() that would only return EAGAIN is saved (one syscall per
    /// event). A FIN that came with the data is flagged on the event (EPOLLRDHUP): `to_eof`.
    fn read_ready(&mut self, idx: u32, gen: u32, to_eof: bool) {
        if self.scratch.is_empty() {
            // Re-entered while another connection's bytes are being processed (the buffer is
            // lent out): a read into it would look like EOF. Read at the top of the next turn.
            self.again.push(Ref { idx, gen });
            return;
        }
        let mut budget = READ_BUDGET;
        loop {
            let Some(c) = self.conns.get_mut(idx, gen) else {
                return;
            };
            if c.state == State::Authing || c.flags & flag::BUSY != 0 {
                return; // paused; `resume` reads when the worker answers
            }
            let linger = c.flags & flag::LINGER != 0;
            if c.state == State::Closing && !linger {
                return;
            }
            match c.sock.read(&mut self.scratch) {
                Ok(0) => {
                    let reason = if c.state == State::Closing {
                        c.close_reason
                    } else {
                        CloseReason::Peer
                    };
                    self.close_now(idx, gen, reason);
                    return;
                }
                Ok(n) => {
                    if linger {
                        continue; // discarding until the peer's FIN
                    }
                    c.last_read = self.now;
                    if let Role::Client(t) = c.role {
                        self.metrics.bytes_in[t as usize].fetch_add(n as u64, Relaxed);
                    }
                    if !self.ingest(idx, gen, n) {
                        return;
                    }
                    if n < SCRATCH && !to_eof {
                        return;
                    }
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        self.again.push(Ref { idx, gen });
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    let reason = if linger {
                        c.close_reason
                    } else {
                        CloseReason::IoError
                    };
                    self.close_now(idx, gen, reason);
                    return;
                }
            }
        }
    }

    /// Processes `n` new bytes in the scratch buffer; keeps only an unfinished frame's bytes.
    /// Returns whether reading should go on.
    fn ingest(&mut self, idx: u32, gen: u32, n: usize) -> bool {
        let scratch = std::mem::take(&mut self.scratch);
        let c = self.conns.get_mut(idx, gen).expect("caller checked");
        let mut inbuf = std::mem::take(&mut c.inbuf);
        let role = c.role;
        let flow = if inbuf.is_empty() {
            let (used, flow) = self.process(idx, gen, role, &scratch[..n]);
            if used < n && flow != Flow::Close {
                inbuf.extend_from_slice(&scratch[used..n]);
            }
            flow
        } else {
            inbuf.extend_from_slice(&scratch[..n]);
            let (used, flow) = self.process(idx, gen, role, &inbuf);
            inbuf.drain(..used);
            flow
        };
        self.scratch = scratch;
        self.put_back_inbuf(idx, gen, inbuf);
        flow == Flow::Continue
    }

    fn put_back_inbuf(&mut self, idx: u32, gen: u32, mut inbuf: Vec<u8>) {
        if let Some(c) = self.conns.get_mut(idx, gen) {
            if inbuf.is_empty() {
                inbuf = Vec::new(); // idle connections hold no input buffer
            } else if inbuf.capacity() > 4 * inbuf.len() && inbuf.capacity() > 4096 {
                inbuf.shrink_to_fit();
            }
            c.inbuf = inbuf;
        }
    }

    /// Picks up input that waited while a worker had the connection's HELLO or API request.
    fn resume(&mut self, idx: u32, gen: u32) {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        if !c.inbuf.is_empty() {
            let inbuf = std::mem::take(&mut c.inbuf);
            let role = c.role;
            let (used, flow) = self.process(idx, gen, role, &inbuf);
            self.put_back_inbuf(idx, gen, inbuf[used..].to_vec());
            if flow != Flow::Continue {
                return;
            }
        }
        self.on_readable(idx, gen);
    }

    fn process(&mut self, idx: u32, gen: u32, role: Role, data: &[u8]) -> (usize, Flow) {
        match role {
            Role::Client(Transport::Tcp) => self.process_tcp(idx, gen, data),
            Role::Client(Transport::Ws) => self.process_ws(idx, gen, data),
            Role::Api => self.process_api(idx, gen, data),
            Role::Http => self.process_http(idx, gen, data),
        }
    }

    fn process_tcp(&mut self, idx: u32, gen: u32, data: &[u8]) -> (usize, Flow) {
        let max = self.cfg.limits.max_frame_bytes;
        let mut at = 0;
        loop {
            match codec::decode_tcp(&data[at..], max) {
                Ok(None) => return (at, Flow::Continue),
                Ok(Some((body, used))) => {
                    at += used;
                    inc(&self.metrics.frames_in[Transport::Tcp as usize]);
                    match self.on_frame(idx, gen, body) {
                        Flow::Continue => {}
                        other => return (at, other),
                    }
                }
                Err(e) => {
                    let (kind, code) = match e {
                        FrameError::TooLarge { .. } => (BadFrame::TooLarge, code::FRAME_TOO_LARGE),
                        FrameError::Empty => (BadFrame::Empty, code::BAD_FRAME),
                    };
                    self.metrics.bad_frame(kind);
                    // The stream cannot be resynchronised after a bad prefix.
                    self.fail(
                        idx,
                        gen,
                        0,
                        code,
                        &e.to_string(),
                        CloseReason::ProtocolError,
                    );
                    return (data.len(), Flow::Close);
                }
            }
        }
    }

    fn on_frame(&mut self, idx: u32, gen: u32, body: &[u8]) -> Flow {
        let f = match Frame::decode(body) {
            Ok(f) => f,
            Err(e) => {
                self.metrics.bad_frame(BadFrame::Decode);
                return self.protocol_error(
                    idx,
                    gen,
                    0,
                    code::BAD_FRAME,
                    &format!("undecodable frame: {e}"),
                );
            }
        };
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return Flow::Close;
        };
        match c.state {
            State::Hello => {
                if f.service != 0 || f.method != method::HELLO {
                    self.metrics.bad_frame(BadFrame::HelloRequired);
                    self.fail(
                        idx,
                        gen,
                        f.seqid,
                        code::HELLO_REQUIRED,
                        "HELLO must be the first frame",
                        CloseReason::ProtocolError,
                    );
                    return Flow::Close;
                }
                let remote = match &c.sock {
                    Sock::Tcp(s) => s.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
                    Sock::Unix(_) => "unix".into(),
                };
                let creds = Creds::from_hello(&f);
                if self.start_auth(Ref { idx, gen }, f.seqid, creds, remote, None) {
                    Flow::Pause
                } else {
                    self.fail(
                        idx,
                        gen,
                        f.seqid,
                        code::BUSY,
                        "busy, try again",
                        CloseReason::Busy,
                    );
                    Flow::Close
                }
            }
            State::Open => {
                if f.service != 0 {
                    let app = c.app as usize;
                    return self.upstream(idx, gen, app, f);
                }
                match f.method {
                    method::PING => {
                        self.send_frame(
                            idx,
                            gen,
                            &Frame {
                                seqid: f.seqid,
                                method: method::PONG,
                                ..Default::default()
                            },
                        );
                        Flow::Continue
                    }
                    method::PONG => Flow::Continue,
                    method::ACK => {
                        self.on_ack(idx, gen, f.seqid);
                        Flow::Continue
                    }
                    method::BYE => {
                        self.close_now(idx, gen, CloseReason::Bye);
                        Flow::Close
                    }
                    method::HELLO => self.protocol_error(
                        idx,
                        gen,
                        f.seqid,
                        code::HELLO_REQUIRED,
                        "HELLO was already accepted",
                    ),
                    m => {
                        self.metrics.bad_frame(BadFrame::UnknownMethod);
                        self.protocol_error(
                            idx,
                            gen,
                            f.seqid,
                            code::UNKNOWN_METHOD,
                            &format!("unknown control method {m}"),
                        )
                    }
                }
            }
            State::Authing | State::Closing | State::Waiting => Flow::Pause,
        }
    }

    /// A client frame for a backend service (`service > 0`). `builtin:echo` answers with the
    /// frame itself (same seqid, service, method, payload); HTTP backends come with the
    /// backends issue.
    fn process_api(&mut self, idx: u32, gen: u32, data: &[u8]) -> (usize, Flow) {
        let limits = http::Limits {
            max_head: http::DEFAULT_MAX_HEAD,
            max_body: self.cfg.api.max_body_bytes,
        };
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return (0, Flow::Close);
        };
        if c.flags & flag::BUSY != 0 || c.state != State::Open {
            return (0, Flow::Pause);
        }
        // A client that pipelines requests without reading the answers: stop taking requests
        // until its output drains (the answers are not bounded like pushes, so bound here).
        if c.out.len() - c.out_pos > self.cfg.limits.max_output_bytes {
            c.flags |= flag::API_FULL;
            return (0, Flow::Pause);
        }
        match http::parse_request(data, &limits) {
            Ok(Parsed::Incomplete { expect_continue }) => {
                if expect_continue && c.flags & flag::CONTINUE_SENT == 0 {
                    c.flags |= flag::CONTINUE_SENT;
                    self.send_bytes(idx, gen, b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                (0, Flow::Continue)
            }
            Ok(Parsed::Complete(req, used)) => {
                c.flags &= !flag::CONTINUE_SENT;
                let job = Job::Api {
                    conn: Ref { idx, gen },
                    req: ApiRequest::from_parsed(&req),
                };
                match self.jobs.try_send(job) {
                    Ok(()) => {
                        inc(&self.metrics.worker_jobs);
                        c.flags |= flag::BUSY;
                        (used, Flow::Pause)
                    }
                    Err(_) => {
                        inc(&self.metrics.worker_busy);
                        self.metrics.api_status(503);
                        let ka = req.keep_alive;
                        self.send_bytes(idx, gen, &http::error(503, "busy: worker queue full", ka));
                        if !ka {
                            self.close_after_flush(idx, gen, CloseReason::Peer);
                            return (data.len(), Flow::Close);
                        }
                        (used, Flow::Continue)
                    }
                }
            }
            Err(e) => {
                self.metrics.api_status(e.status());
                self.send_bytes(idx, gen, &http::error(e.status(), &e.to_string(), false));
                self.close_after_flush(idx, gen, CloseReason::ProtocolError);
                (data.len(), Flow::Close)
            }
        }
    }

    // ---- output ----------------------------------------------------------------------

    /// Appends to a connection's output with `write` (given the connection's role and mode
    /// bits) and closes it as a slow consumer when its backlog passes `max_output_bytes`.
    /// `frame`: count it in `frames_out`.
    fn queue(
        &mut self,
        idx: u32,
        gen: u32,
        frame: bool,
        write: impl FnOnce(Role, u8, &mut Vec<u8>),
    ) {
        let Reactor {
            conns,
            pool,
            dirty,
            metrics,
            ..
        } = self;
        let Some(c) = conns.get_mut(idx, gen) else {
            return;
        };
        if let (true, Role::Client(t)) = (frame, c.role) {
            inc(&metrics.frames_out[t as usize]);
        }
        let (role, mode) = (c.role, c.ws);
        let backlog = enqueue(c, Ref { idx, gen }, pool, dirty, |out| {
            write(role, mode, out)
        });
        // An API connection gets one answer at a time (bounded by its request): the bound is
        // for clients that do not read their pushes.
        if backlog > self.cfg.limits.max_output_bytes && role != Role::Api {
            self.close_now(idx, gen, CloseReason::SlowConsumer);
        }
    }

    fn send_frame(&mut self, idx: u32, gen: u32, f: &Frame) {
        self.queue(idx, gen, true, |role, mode, out| match role {
            Role::Client(Transport::Ws) if mode & wsflag::PBBP2 != 0 => {
                ws::encode_header(out, true, ws::op::BINARY, f.encoded_len());
                f.encode(out).expect("Vec grows");
            }
            // Raw mode has no control frames: only payloads travel.
            Role::Client(Transport::Ws) => {
                if f.service != 0 || f.method == method::PUSH {
                    codec::Shared::new(f).write_ws_raw(out);
                }
            }
            _ => codec::encode_tcp(f, out),
        });
    }

    fn send_bytes(&mut self, idx: u32, gen: u32, b: &[u8]) {
        self.queue(idx, gen, false, |_, _, out| out.extend_from_slice(b));
    }

    /// Says goodbye the transport's way and closes after the output drains: BYE on TCP;
    /// BYE then a close frame on pbbp2; a close frame in raw mode.
    fn goodbye(&mut self, idx: u32, gen: u32, reason: &str, ws_code: u16, why: CloseReason) {
        let Some(c) = self.conns.get(idx, gen) else {
            return;
        };
        let (role, raw) = (c.role, c.ws & wsflag::PBBP2 == 0);
        if !(role == Role::Client(Transport::Ws) && raw) {
            let bye = Frame::control(method::BYE, 0, &[("reason", reason)]);
            self.send_frame(idx, gen, &bye);
        }
        if role == Role::Client(Transport::Ws) {
            self.ws_close(idx, gen, ws_code, reason);
        }
        self.close_after_flush(idx, gen, why);
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for r in dirty.drain(..) {
            self.flush(r.idx, r.gen);
        }
        if self.dirty.is_empty() {
            self.dirty = dirty; // keep the allocation
        }
    }

    /// Writes pending output directly; registers WRITABLE only for a leftover.
    fn flush(&mut self, idx: u32, gen: u32) {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        c.flags &= !flag::DIRTY;
        while c.out_pos < c.out.len() {
            match c.sock.write(&c.out[c.out_pos..]) {
                Ok(n) if n > 0 => {
                    c.out_pos += n;
                    if let Role::Client(t) = c.role {
                        self.metrics.bytes_out[t as usize].fetch_add(n as u64, Relaxed);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if c.flags & flag::WRITABLE == 0 {
                        c.flags |= flag::WRITABLE;
                        let token = Token(idx as usize + CONN_BASE);
                        let _ = self.poll.registry().reregister(
                            &mut c.sock,
                            token,
                            Interest::READABLE | Interest::WRITABLE,
                        );
                    }
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => {
                    self.close_now(idx, gen, CloseReason::IoError);
                    return;
                }
            }
        }
        // Drained: give the buffer back so an idle connection holds none.
        let mut buf = std::mem::take(&mut c.out);
        c.out_pos = 0;
        if buf.capacity() > 0 && buf.capacity() <= POOL_BUF_MAX && self.pool.len() < POOL_MAX {
            buf.clear();
            self.pool.push(buf);
        }
        if c.flags & flag::WRITABLE != 0 {
            c.flags &= !flag::WRITABLE;
            let token = Token(idx as usize + CONN_BASE);
            let _ = self
                .poll
                .registry()
                .reregister(&mut c.sock, token, Interest::READABLE);
        }
        if c.flags & flag::API_FULL != 0 {
            c.flags &= !flag::API_FULL;
            self.resume_later.push(Ref { idx, gen });
        }
        if c.state == State::Closing && c.flags & flag::LINGER == 0 {
            // Shut our side, then read until the peer's FIN, so the close is orderly and the
            // peer sees everything we sent (closing with unread input would send a reset).
            c.sock.shutdown_write();
            c.flags |= flag::LINGER;
            self.on_readable(idx, gen);
        }
    }

    // ---- close -----------------------------------------------------------------------

    /// ERROR (same seqid as the offending frame) and count it; close after too many.
    fn protocol_error(&mut self, idx: u32, gen: u32, seqid: u64, code: u16, msg: &str) -> Flow {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return Flow::Close;
        };
        c.errors = c.errors.saturating_add(1);
        if c.errors > MAX_PROTOCOL_ERRORS {
            self.fail(
                idx,
                gen,
                seqid,
                code,
                "too many protocol errors",
                CloseReason::ProtocolError,
            );
            return Flow::Close;
        }
        self.send_frame(idx, gen, &error_frame(seqid, code, msg));
        Flow::Continue
    }

    /// ERROR, then an orderly close.
    fn fail(&mut self, idx: u32, gen: u32, seqid: u64, code: u16, msg: &str, reason: CloseReason) {
        self.send_frame(idx, gen, &error_frame(seqid, code, msg));
        self.close_after_flush(idx, gen, reason);
    }

    /// Stops input and pushes, flushes what is queued, then closes (or after LINGER_MS).
    fn close_after_flush(&mut self, idx: u32, gen: u32, reason: CloseReason) {
        self.unregister(idx, gen);
        let Reactor {
            conns,
            pool,
            dirty,
            wheel,
            now,
            metrics,
            ..
        } = self;
        let Some(c) = conns.get_mut(idx, gen) else {
            return;
        };
        if c.state == State::Closing {
            return;
        }
        c.state = State::Closing;
        c.close_reason = reason;
        if c.role != Role::Api {
            // Counted when decided: a lingering close may wait on the peer for a while.
            metrics.close(reason);
        }
        enqueue(c, Ref { idx, gen }, pool, dirty, |_| {});
        wheel.insert(
            *now + LINGER_MS,
            TimerKey {
                idx,
                gen,
                kind: TimerKind::Linger,
            },
        );
    }

    fn unregister(&mut self, idx: u32, gen: u32) {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        if c.flags & flag::REGISTERED == 0 {
            return;
        }
        c.flags &= !flag::REGISTERED;
        let (app, pos) = (c.app as usize, c.app_pos);
        if let Role::Client(t) = c.role {
            self.event(Ref { idx, gen }, app, t, "offline");
        }
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        let device = c
            .device
            .clone()
            .expect("registered connections have a device");
        let user = c.user.clone();
        if let Some(moved) = self
            .registry
            .remove(app, idx, pos, &device, user.as_deref())
        {
            if let Some((m, _)) = self.conns.by_index_mut(moved) {
                m.app_pos = pos;
            }
        }
        self.metrics.app_connections[app].fetch_sub(1, Relaxed);
    }

    fn close_now(&mut self, idx: u32, gen: u32, reason: CloseReason) {
        self.unregister(idx, gen);
        self.poll_left(idx, gen);
        let Some(mut c) = self.conns.remove(idx, gen) else {
            return;
        };
        self.park_unacked(&mut c, Ref { idx, gen });
        let _ = self.poll.registry().deregister(&mut c.sock);
        match c.role {
            Role::Client(t) => {
                self.client_conns -= 1;
                self.metrics.connections[t as usize].fetch_sub(1, Relaxed);
                if c.state != State::Closing {
                    self.metrics.close(reason); // else counted by close_after_flush
                }
            }
            Role::Api => {
                self.metrics.api_connections.fetch_sub(1, Relaxed);
            }
            Role::Http => {
                self.client_conns -= 1;
                if c.state != State::Closing {
                    self.metrics.close(reason);
                }
            }
        }
        log::trace!("closed {idx}:{gen}: {reason:?}");
        // Dropping `c` closes the socket.
    }

    // ---- timers ----------------------------------------------------------------------

    fn fire_timers(&mut self) {
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(self.now, &mut fired);
        for k in fired.drain(..) {
            if k.kind == TimerKind::StatusExpire {
                self.status_expired(k);
                continue;
            }
            if k.kind == TimerKind::GraceExpire {
                self.grace_expired(k);
                continue;
            }
            if k.kind == TimerKind::WaitExpire {
                self.answer_wait(k.idx, k.gen);
                continue;
            }
            let Some(c) = self.conns.get(k.idx, k.gen) else {
                continue;
            };
            match k.kind {
                TimerKind::StatusExpire => {}
                TimerKind::Retransmit => self.retransmit(k),
                TimerKind::GraceExpire | TimerKind::WaitExpire => {}
                TimerKind::PollTimeout => {
                    if c.state == State::Waiting {
                        self.poll_timed_out(k.idx, k.gen);
                    }
                }
                TimerKind::Handshake => {
                    if matches!(c.state, State::Hello | State::Authing) {
                        self.close_now(k.idx, k.gen, CloseReason::HandshakeTimeout);
                    }
                }
                TimerKind::Read => {
                    if c.state != State::Open {
                        continue;
                    }
                    if c.role == Role::Client(Transport::Ws) {
                        self.ws_idle(k);
                        continue;
                    }
                    let limit = match c.role {
                        Role::Api => self.cfg.api.idle_timeout_ms,
                        _ => self.cfg.limits.read_timeout_ms,
                    };
                    let deadline = if c.flags & flag::BUSY != 0 {
                        self.now + limit
                    } else {
                        c.last_read + limit
                    };
                    if self.now >= deadline {
                        self.close_now(k.idx, k.gen, CloseReason::ReadTimeout);
                    } else {
                        // Lazy re-arm: reads only stamp `last_read`; the wheel is touched once
                        // per timeout period.
                        self.wheel.insert(deadline, k);
                    }
                }
                TimerKind::Linger => {
                    if c.state == State::Closing {
                        let reason = c.close_reason;
                        self.close_now(k.idx, k.gen, reason);
                    }
                }
            }
        }
        self.fired = fired;
    }

    // ---- worker results --------------------------------------------------------------

    fn drain_done(&mut self) {
        self.more_done = false;
        for _ in 0..DONE_BATCH {
            match self.done.try_recv() {
                Ok(Done::Auth {
                    conn,
                    seqid,
                    upgrade,
                    result,
                }) => match result {
                    Ok(admit) => self.admit(conn, seqid, admit, upgrade),
                    Err((code, msg)) => {
                        let Some(c) = self.conns.get(conn.idx, conn.gen) else {
                            continue;
                        };
                        if c.state != State::Authing {
                            continue;
                        }
                        inc(&self.metrics.hello_rejected);
                        if c.role == Role::Http {
                            // Refused before the upgrade: a plain HTTP answer (401, 403, 400).
                            self.http_reply(
                                conn.idx,
                                conn.gen,
                                code,
                                &http::error(code, &msg, false),
                            );
                            self.close_after_flush(conn.idx, conn.gen, CloseReason::AuthRejected);
                        } else {
                            self.fail(
                                conn.idx,
                                conn.gen,
                                seqid,
                                code,
                                &msg,
                                CloseReason::AuthRejected,
                            );
                        }
                    }
                },
                Ok(Done::Api {
                    conn,
                    keep_alive,
                    out,
                }) => self.api_done(conn, keep_alive, out),
                Ok(Done::Upstream {
                    conn,
                    frame,
                    result,
                }) => self.upstream_done(conn, frame, result),
                Err(_) => return,
            }
        }
        self.more_done = true;
    }

    fn admit(&mut self, r: Ref, seqid: u64, a: Admit, upgrade: Option<ws::Upgrade>) {
        let Some(c) = self.conns.get_mut(r.idx, r.gen) else {
            return;
        };
        if c.state != State::Authing {
            return;
        }
        let device: Arc<str> = a.device.into();
        let user: Option<Arc<str>> = a.user.map(Into::into);
        c.app_pos = self.registry.add(a.app, r.idx, &device, user.as_ref());
        if !a.session.is_empty() {
            c.ext.get_or_insert_with(Default::default).session = a.session;
        }
        c.app = a.app as u16;
        c.device = Some(device);
        c.user = user;
        c.state = State::Open;
        c.flags |= flag::REGISTERED;
        c.last_read = self.now;
        self.metrics.app_connections[a.app].fetch_add(1, Relaxed);
        inc(&self.metrics.hello_ok);
        let conn_id = format!("{}:{}:{}", self.cfg.node_id, r.idx, r.gen);
        let transport = if upgrade.is_some() {
            Transport::Ws
        } else {
            Transport::Tcp
        };
        self.event(r, a.app, transport, "online");
        if let Some(u) = upgrade {
            self.upgraded(r, u, &conn_id);
            self.replay_parked(r);
            self.resume(r.idx, r.gen);
            return;
        }
        let reply = hello_reply(&self.cfg, seqid, &conn_id);
        self.send_frame(r.idx, r.gen, &reply);
        // A reconnecting device's unacknowledged pushes go first, before anything new.
        self.replay_parked(r);
        let k = TimerKey {
            idx: r.idx,
            gen: r.gen,
            kind: TimerKind::Read,
        };
        self.wheel
            .insert(self.now + self.cfg.limits.read_timeout_ms, k);
        self.resume(r.idx, r.gen);
    }

    fn api_done(&mut self, r: Ref, keep_alive: bool, out: ApiOut) {
        // The API client may have left; a command is still applied (a push is not undone by
        // the caller hanging up), only the answer is dropped.
        let here = self.conns.get(r.idx, r.gen).is_some();
        let bytes = match out {
            ApiOut::Response(b) => b,
            ApiOut::Command(cmd) => {
                match self.execute(cmd, keep_alive, here.then_some(r)) {
                    Some(b) => b,
                    None => return, // waits for ACKs; `answer_wait` answers
                }
            }
        };
        self.api_answer(r, keep_alive, &bytes, false);
    }

    /// Sends an API answer and lets the connection's next request in (or closes it).
    /// `later`: resume its input at the top of the next turn, not now — the caller may be
    /// inside another connection's input processing, which holds the read buffer.
    fn api_answer(&mut self, r: Ref, keep_alive: bool, bytes: &[u8], later: bool) {
        self.send_bytes(r.idx, r.gen, bytes); // a no-op if the client left
        let Some(c) = self.conns.get_mut(r.idx, r.gen) else {
            return;
        };
        c.flags &= !flag::BUSY;
        c.last_read = self.now;
        if keep_alive && self.shutdown_at.is_none() {
            if later {
                self.resume_later.push(r);
            } else {
                self.resume(r.idx, r.gen);
            }
        } else {
            self.close_after_flush(r.idx, r.gen, CloseReason::Peer);
        }
    }

    // ---- commands from the API -------------------------------------------------------

    /// Applies a command; returns its answer, or None when the answer waits (`wait_ms`).
    fn execute(&mut self, cmd: Command, ka: bool, api: Option<Ref>) -> Option<Vec<u8>> {
        let (status, body) = match cmd {
            Command::Push {
                pushes,
                batch,
                wait_ms,
            } => {
                let body = self.run_push(&pushes, batch, wait_ms, api.map(|r| (r, ka)))?;
                self.metrics.api_status(200);
                return Some(http::response(200, "application/json", &body, ka));
            }
            Command::Online(t) => {
                let refs = self.resolve(&t);
                let list: Vec<_> = refs.iter().filter_map(|r| self.describe(*r)).collect();
                (
                    200,
                    json!({"online": !list.is_empty(), "connections": list}),
                )
            }
            Command::Kick { target, reason } => {
                let refs = self.resolve(&target);
                for r in &refs {
                    self.goodbye(
                        r.idx,
                        r.gen,
                        &reason,
                        ws::status::POLICY,
                        CloseReason::Kicked,
                    );
                }
                (200, json!({"kicked": refs.len()}))
            }
            Command::RoomMembers {
                app,
                room,
                devices,
                add,
            } => {
                let n = if add {
                    self.registry.room_add(app, &room, &devices)
                } else {
                    self.registry.room_remove(app, &room, &devices)
                };
                let members = self
                    .registry
                    .room(app, &room)
                    .map_or(0, |r| r.members.len());
                let key = if add { "added" } else { "removed" };
                (200, json!({ "room": room, key: n, "members": members }))
            }
            Command::RoomInfo {
                app,
                room,
                limit,
                after,
            } => match self.registry.room(app, &room) {
                Some(r) => {
                    // A page of members in id order: large rooms are listed `limit` at a time.
                    let mut page: Vec<&str> = r
                        .members
                        .iter()
                        .map(|m| &**m)
                        .filter(|m| after.as_deref().is_none_or(|a| *m > a))
                        .collect();
                    let more = page.len() > limit;
                    if more {
                        page.select_nth_unstable(limit);
                        page.truncate(limit);
                    }
                    page.sort_unstable();
                    let next = more.then(|| page.last().copied()).flatten();
                    (
                        200,
                        json!({"room": room, "members": page, "member_count": r.members.len(), "online": r.conns().len(), "next": next}),
                    )
                }
                None => (
                    200,
                    json!({"room": room, "members": [], "member_count": 0, "online": 0, "next": null}),
                ),
            },
            Command::SetSession { conn, set } => match self.set_session(&conn, set) {
                Ok(updated) => (200, json!({"updated": updated})),
                Err(e) => (413, json!({"error": e})),
            },
            Command::SetStatus { key, value, ttl_ms } => {
                let released = self.set_status(key, value, ttl_ms);
                (200, json!({"released": released}))
            }
        };
        self.metrics.api_status(status);
        Some(http::json(status, &body, ka))
    }

    /// The admitted connections a target names (conn ids are checked against the
    /// generation: a stale id names nobody).
    fn resolve(&self, t: &Target) -> Vec<Ref> {
        let slice: &[u32] = match t {
            Target::Conn(id) => {
                if id.node == self.cfg.node_id
                    && self
                        .conns
                        .get(id.idx, id.gen)
                        .is_some_and(|c| c.flags & flag::REGISTERED != 0)
                {
                    return vec![Ref {
                        idx: id.idx,
                        gen: id.gen,
                    }];
                }
                return vec![];
            }
            Target::Device(app, d) => self.registry.device(*app, d),
            Target::User(app, u) => self.registry.user(*app, u),
            Target::Broadcast(app) => self.registry.app(*app),
            Target::Room(app, r) => self.registry.room(*app, r).map_or(&[], |x| x.conns()),
        };
        slice
            .iter()
            .filter_map(|&i| self.conns.by_index(i).map(|(_, gen)| Ref { idx: i, gen }))
            .collect()
    }

    fn describe(&self, r: Ref) -> Option<serde_json::Value> {
        let c = self.conns.get(r.idx, r.gen)?;
        let transport = match c.role {
            Role::Client(t) => TRANSPORTS[t as usize],
            Role::Api | Role::Http => return None,
        };
        Some(json!({
            "conn_id": format!("{}:{}:{}", self.cfg.node_id, r.idx, r.gen),
            "node": self.cfg.node_id,
            "transport": transport,
            "app_id": self.cfg.apps[c.app as usize].id,
            "device_id": c.device.as_deref(),
            "user_id": c.user.as_deref(),
            "connected_at": c.connected_at,
            "session": upstream::session_json(c),
        }))
    }

    /// Delivers one push: the frame is encoded once and each recipient gets its own seqid in
    /// front of the shared bytes.
    fn push(&mut self, p: &Push, wait: Option<reliable::WaitRef>) -> PushResult {
        let mut res = PushResult::default();
        let cfg = self.cfg.clone();
        let node = &cfg.node_id;
        let max_out = cfg.limits.max_output_bytes;
        let (now, ack_timeout, max_unacked) =
            (self.now, cfg.limits.ack_timeout_ms, cfg.limits.max_unacked);
        let expires = if p.ttl_ms > 0 {
            now + p.ttl_ms
        } else {
            u64::MAX
        };
        let Reactor {
            conns,
            registry,
            pool,
            dirty,
            metrics,
            wheel,
            ..
        } = self;
        let mut slow: Vec<Ref> = vec![];
        let conn_live = match &p.target {
            Target::Conn(id) => {
                id.node == *node
                    && conns
                        .get(id.idx, id.gen)
                        .is_some_and(|c| c.flags & flag::REGISTERED != 0)
            }
            _ => false,
        };
        let mut deliver = |i: u32, res: &mut PushResult| {
            let Some((c, gen)) = conns.by_index_mut(i) else {
                return;
            };
            let f: &Shared = &p.frame;
            // A push that would pass the output bound is not queued (nor tracked) and is
            // reported dropped; the connection is closed as a slow consumer, or, for an app
            // that drops rather than closes, stays.
            if c.out.len() - c.out_pos + f.body_len() + codec::SHARED_OVERHEAD > max_out {
                if !cfg.apps[c.app as usize].drop_when_slow {
                    slow.push(Ref { idx: i, gen });
                }
                res.dropped.push(format!("{node}:{i}:{gen}"));
                return;
            }
            let (role, pbbp2) = (c.role, c.ws & wsflag::PBBP2 != 0);
            // ack=1 is tracked where the client can ACK: TCP and pbbp2 (not raw WebSocket).
            let track = p.ack && (role == Role::Client(Transport::Tcp) || pbbp2);
            if track
                && c.ext
                    .as_ref()
                    .is_some_and(|e| e.unacked.len() >= max_unacked)
            {
                res.dropped.push(format!("{node}:{i}:{gen}"));
                return;
            }
            c.seq += 1;
            let seq = c.seq;
            if track {
                let pending = reliable::Pending {
                    frame: f.clone(),
                    expires,
                    wait,
                };
                reliable::track(
                    c,
                    Ref { idx: i, gen },
                    seq,
                    pending,
                    now + ack_timeout,
                    wheel,
                );
                res.tracked += 1;
            }
            if let Role::Client(t) = role {
                inc(&metrics.frames_out[t as usize]);
            }
            let mode = c.ws;
            enqueue(c, Ref { idx: i, gen }, pool, dirty, |out| {
                write_push(f, seq, role, mode, out)
            });
            res.delivered += 1;
        };
        match &p.target {
            Target::Conn(id) => {
                if conn_live {
                    deliver(id.idx, &mut res);
                } else {
                    res.offline.push(id.to_string());
                }
            }
            Target::Device(app, d) => {
                let list = registry.device(*app, d);
                if list.is_empty() {
                    res.offline.push(d.clone());
                }
                list.iter().for_each(|&i| deliver(i, &mut res));
            }
            Target::User(app, u) => {
                let list = registry.user(*app, u);
                if list.is_empty() {
                    res.offline.push(u.clone());
                }
                list.iter().for_each(|&i| deliver(i, &mut res));
            }
            Target::Broadcast(app) => registry
                .app(*app)
                .iter()
                .for_each(|&i| deliver(i, &mut res)),
            // Encoded once (the Shared frame); each online member's connection gets it.
            Target::Room(app, r) => match registry.room(*app, r) {
                Some(room) if !room.conns().is_empty() => {
                    room.conns().iter().for_each(|&i| deliver(i, &mut res))
                }
                _ => res.offline.push(r.clone()),
            },
        }
        metrics.push(PushOutcome::Delivered, res.delivered);
        metrics.push(PushOutcome::Offline, res.offline.len() as u64);
        metrics.push(PushOutcome::Dropped, res.dropped.len() as u64);
        // Closed by the caller once every push of the request is out (closing may settle
        // tracked pushes of a waiting request, whose results must be in place first).
        self.slow.extend(slow);
        res
    }

    // ---- shutdown --------------------------------------------------------------------

    fn on_signal(&mut self) {
        let Some(fd) = &self.signal else { return };
        let mut info = [0u8; 128]; // struct signalfd_siginfo
        let mut got = false;
        // SAFETY: reading into a buffer of the size signalfd writes.
        while unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) }
            == info.len() as isize
        {
            got = true;
        }
        if !got {
            return;
        }
        if self.shutdown_at.is_some() {
            log::warn!("second signal: exiting now");
            self.shutdown_at = Some(self.now);
            return;
        }
        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
        log::info!(
            "signal {signo}: saying BYE to {} clients and shutting down",
            self.client_conns
        );
        self.shutdown_at = Some(self.now + SHUTDOWN_GRACE_MS);
        self.answer_all_waits();
        for slot in self.listeners.iter_mut() {
            if let Some((mut l, _)) = slot.take() {
                let _ = self.poll.registry().deregister(&mut l);
            }
        }
        for (idx, gen) in self.conns.keys() {
            let Some(c) = self.conns.get(idx, gen) else {
                continue;
            };
            match (c.role, c.state) {
                (Role::Client(_), State::Open) => {
                    self.goodbye(
                        idx,
                        gen,
                        "shutdown",
                        ws::status::GOING_AWAY,
                        CloseReason::Shutdown,
                    );
                }
                (Role::Api, _) if c.flags & flag::BUSY != 0 => {} // answered, then closed below
                (_, State::Closing) => {}
                _ => self.close_now(idx, gen, CloseReason::Shutdown),
            }
        }
    }
}

/// The gateway's HELLO: the connection id and heartbeat parameters.
fn hello_reply(cfg: &Config, seqid: u64, conn_id: &str) -> Frame {
    let l = &cfg.limits;
    let hb_s = l.ping_interval_ms.div_ceil(1000).max(1).to_string();
    let hb_ms = l.ping_interval_ms.to_string();
    let rt_ms = l.read_timeout_ms.to_string();
    Frame::control(
        method::HELLO,
        seqid,
        &[
            ("conn_id", conn_id),
            ("heartbeat_s", &hb_s),
            ("heartbeat_ms", &hb_ms),
            ("read_timeout_ms", &rt_ms),
            ("node_id", &cfg.node_id),
        ],
    )
}

fn error_frame(seqid: u64, code: u16, msg: &str) -> Frame {
    Frame::control(
        method::ERROR,
        seqid,
        &[("code", &code.to_string()), ("message", msg)],
    )
}
