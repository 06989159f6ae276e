//! The reactor: one thread, one `mio::Poll`, every socket (docs/ARCHITECTURE.md). It
//! accepts, reads into one scratch buffer, cuts frames with the pure decoders, answers
//! heartbeats, hands HELLOs and API requests to the worker pool, applies the workers'
//! results, and owns every write. See docs/LIFECYCLE.md for the connection state machine.
//!
//! One loop turn: poll (timeout = nearest timer) → handle events → retry deferred reads and
//! accepts → apply worker results → fire timers → flush every connection written to this
//! turn. Output is only appended during the turn and written once at its end, so many
//! messages for one connection leave in one write.
//!
//! By concern: `conn` (a connection's state), `io` (accept, read, write, close), `tcp` (the
//! TCP transport's frames), `websocket`, `clienthttp` (upgrades) and `longpoll`, `command`
//! (the internal API's commands and pushes), `upstream` (auth and backend services),
//! `reliable` (`ack=1` pushes), `lifecycle` (admission, timers, worker results, shutdown).

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::backend::Backends;
use crate::config::Config;
use crate::metrics::{inc, Metrics, Transport};
use crate::net::Listener;
use crate::registry::Registry;
use crate::slab::{Line, Slab};
use crate::timer::{TimerKey, TimerKind, Wheel};
use crate::types::{ConnId, Ref};
use crate::worker::{Done, Job, Wake};

mod admission;
mod clienthttp;
mod cluster;
mod command;
mod conn;
mod delivery;
mod drain;
mod durable;
mod handoff;
mod io;
mod lifecycle;
mod longpoll;
mod output;
mod reliable;
mod tcp;
mod upstream;
mod websocket;

use conn::Conn;
pub use handoff::{listeners as handed_listeners, Ended, Saved};

/// How this node names its connections: `NODE:INDEX:GEN` (docs/PROTOCOL.md, "Connection
/// ids"). GEN is the slot's generation with this process's boot epoch above its 32 bits, so
/// an id a backend kept from before a restart names nobody after it (the slot's counter
/// starts again at 1), while the slab itself keeps 32-bit generations.
pub(crate) struct Ids {
    node: String,
    epoch: u64,
}

/// Appends `n` in decimal, as `Display` would, without `fmt` (`itoa`, as the API's answers).
fn push_decimal(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// Bits of the boot epoch: with 32 bits of generation, ids stay below 2^53 (exact in a
/// JavaScript number).
const EPOCH_BITS: u32 = 21;

impl Ids {
    fn new(node: &str, epoch: u64) -> Ids {
        Ids {
            node: node.into(),
            epoch: epoch & ((1 << EPOCH_BITS) - 1),
        }
    }

    /// The id of a local connection.
    fn format(&self, r: Ref) -> String {
        let mut s = String::with_capacity(self.node.len() + 2 + 10 + 16);
        self.write(r, &mut s);
        s
    }

    /// The id of a local connection, appended to `out`: `node:idx:gen`, with the digits
    /// written here (`format!`'s machinery was a tenth of a connect's user-space work).
    fn write(&self, r: Ref, out: &mut String) {
        out.push_str(&self.node);
        out.push(':');
        push_decimal(out, u64::from(r.idx));
        out.push(':');
        push_decimal(out, self.epoch << 32 | u64::from(r.gen));
    }

    /// The slot and generation an id names, if it names a connection of this node and boot
    /// (live or not: the caller checks the generation against the slab).
    fn local(&self, id: &ConnId) -> Option<Ref> {
        if id.node != self.node || id.gen >> 32 != self.epoch {
            return None;
        }
        Some(Ref {
            idx: id.idx,
            gen: id.gen as u32,
        })
    }
}

/// A boot epoch: random (from the kernel), so that two boots of a node share it with odds
/// of 1 in 2^21 — and even then an old id only reaches a new tenant with the very same slot
/// and generation.
pub fn boot_epoch() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No getrandom: the clock's nanoseconds and the pid will do.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ (u64::from(std::process::id()) << 24);
    }
    u64::from_ne_bytes(b)
}

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
/// How often the reactor considers giving freed memory back to the system.
const TRIM_EVERY_MS: u64 = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    Client(Transport),
    Api,
    /// The client HTTP listener before an upgrade, or serving long-polls.
    Http,
}

/// What input processing tells the read loop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Pause,
    Close,
}

pub struct Reactor {
    poll: Poll,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    conns: Slab<Conn, Line>,
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
    /// Accept errors are logged at most once a second: when the next may be, and how many
    /// were not logged since the last.
    accept_log_after: u64,
    accept_errors_unlogged: u64,
    pool: conn::BufPool,
    /// When memory freed since is next considered for the system, and the connection count
    /// then (`trim`).
    trim_at: u64,
    trim_conns: usize,
    /// Wheel entries left by the last compaction (all live then).
    wheel_live: usize,
    fired: Vec<TimerKey>,
    start: Instant,
    now: u64,
    /// Wall-clock ms at the turn's start: a connection's `connected_at`, read once a turn
    /// rather than once a connection.
    unix_now: u64,
    client_conns: usize,
    shutdown_at: Option<u64>,
    more_done: bool,
    status: longpoll::StatusStore,
    /// Reused buffer for an unmasked WebSocket message.
    msg: Vec<u8>,
    /// Scratch for an inflated (permessage-deflate) message.
    inflated: Vec<u8>,
    /// Bytes inflated for the connection being processed (its turn's budget).
    inflated_now: usize,
    /// TLS handshake steps on the workers, at most `tls_cap` (two per worker: a connect
    /// flood must not fill the queue that auth and the API share); the connections whose
    /// step waits for one to come back, oldest first.
    tls_steps: usize,
    tls_cap: usize,
    tls_waiting: std::collections::VecDeque<Ref>,
    /// TLS handshakes finished since memory was last given back (`trim`).
    tls_shaken: usize,
    /// The HELLO answer's headers after `conn_id`, encoded (`codec::encode_hello_tcp`).
    hello_tail: Vec<u8>,
    backends: Arc<Backends>,
    ids: Ids,
    /// Backend lanes answer on the workers' channel.
    done_tx: Sender<Done>,
    /// Gone devices' unacknowledged pushes, in their reconnect grace window.
    parked: reliable::Parked,
    /// API push requests in progress: delivering, or waiting for their pushes' ACKs.
    requests: Slab<delivery::PushRequest>,
    /// Their delivery, in slices, oldest first.
    push_jobs: delivery::PushJobs,
    /// Copies queued for push requests this loop turn, and connections their pushes made
    /// dirty (the turn's budget: `delivery`).
    turn_copies: usize,
    turn_writes: usize,
    /// Pushes so far: each push's place in order (`reliable::Pending::order`).
    pushes: u64,
    /// Bytes of input held across connections (their leftovers and reassembly buffers, by
    /// capacity), bounded by `[limits] max_input_bytes`.
    input_held: usize,
    /// Output across connections: memory held and wire bytes queued (`[limits]
    /// max_output_total`).
    output_held: conn::OutTotals,
    /// Connections over their output bound, by slot: (generation, since when).
    over: std::collections::HashMap<u32, (u32, u64)>,
    /// Slow consumers found by a push request, closed when the request is done.
    slow: Vec<Ref>,
    /// API connections to resume at the top of the next turn (an answer that left from deep
    /// inside another connection's input processing, or a backlog that drained).
    resume_later: Vec<Ref>,
    /// Scratch text, kept for the next use: a connection id being written (`admit`), a
    /// push's `push_id` (`run_job`).
    id_text: String,
    /// Cluster mode: the link to Redis and the calls waiting for other nodes.
    cluster: Option<Box<cluster::Cluster>>,
    /// Nodes pushes came from (`reliable::Pending::origin`).
    origins: reliable::Origins,
    /// What this node says of itself (its endpoints, draining), shared with the API.
    view: Arc<crate::cluster::View>,
    /// Draining (`drain`).
    drain: Option<drain::Draining>,
    /// Jobs with workers and backend lanes whose answer has not come back.
    in_flight: usize,
    /// Answers made on the reactor itself (static-token auth), applied with the workers'.
    local_done: Vec<Done>,
    /// A live upgrade in progress (`handoff`).
    upgrade: Option<handoff::Upgrade>,
    /// The backends' reports taken for the new process (the old config's app ids beside
    /// them): given back if the upgrade fails.
    reports_out: Option<(Vec<String>, crate::backend::HandedReports)>,
    /// Per-address and per-connection admission limits (`admission`).
    admission: admission::Admission,
    /// Quiet for a live upgrade: no socket is read and nothing new is started.
    quiescing: bool,
    /// Signals read while quiet for an upgrade: any but SIGHUP fails it, and they are acted
    /// on once this process goes on.
    held_signals: Vec<u32>,
    /// Restored by a live upgrade: the first turn starts what the old process left queued.
    restored: bool,
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
        backends: Arc<Backends>,
        done_tx: Sender<Done>,
        link: Option<crate::cluster::link::Link>,
        view: Arc<crate::cluster::View>,
    ) -> std::io::Result<Reactor> {
        let apps = cfg.apps.len();
        let tls_cap = 2 * cfg.worker_threads().max(1);
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
            accept_log_after: 0,
            accept_errors_unlogged: 0,
            pool: Default::default(),
            trim_at: TRIM_EVERY_MS,
            trim_conns: 0,
            wheel_live: 0,
            fired: vec![],
            start: Instant::now(),
            now: 0,
            unix_now: crate::types::unix_ms(),
            client_conns: 0,
            shutdown_at: None,
            more_done: false,
            status: longpoll::StatusStore::default(),
            msg: Vec::new(),
            inflated: Vec::new(),
            inflated_now: 0,
            tls_steps: 0,
            tls_cap,
            tls_waiting: Default::default(),
            tls_shaken: 0,
            hello_tail: {
                let t = tcp::hello_tail(&cfg, false);
                let h: Vec<(&str, &str)> = t.iter().map(|(k, v)| (*k, v.as_str())).collect();
                crate::codec::encoded_headers(&h)
            },
            backends,
            ids: Ids::new(&cfg.node_id, boot_epoch()),
            done_tx,
            parked: reliable::Parked::default(),
            requests: Slab::default(),
            push_jobs: Default::default(),
            turn_copies: 0,
            turn_writes: 0,
            // From the clock, so push ids (`push_id` headers) do not repeat after a restart.
            pushes: crate::types::unix_ms() << 20,
            input_held: 0,
            output_held: Default::default(),
            over: Default::default(),
            slow: vec![],
            resume_later: vec![],
            id_text: String::new(),
            cluster: link.map(|l| {
                let apps = cfg.apps.iter().map(|a| a.id.as_str().into()).collect();
                Box::new(cluster::Cluster::new(l, apps))
            }),
            origins: reliable::Origins::new(&cfg.node_id),
            view,
            drain: None,
            in_flight: 0,
            local_done: vec![],
            upgrade: None,
            reports_out: None,
            admission: Default::default(),
            quiescing: false,
            held_signals: vec![],
            restored: false,
            cfg,
        };
        for (i, (mut l, role)) in listeners.into_iter().enumerate() {
            assert!(LISTENER_BASE + i < handoff::UPGRADE.0, "too many listeners");
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

    /// Every `TRIM_EVERY_MS`: when a tenth or more of the connections (at least 1,000) went
    /// since the last look, memory the allocator holds free goes back to the system (glibc
    /// keeps freed memory otherwise: a burst of connections would stay in RSS after it).
    fn trim(&mut self) {
        // Timer entries of closed connections stay on the wheel until their deadline; under
        // connect/close churn that is a read timeout's worth of closed connections. When
        // the wheel holds far more than live things need, the dead ones go (amortized: this
        // happens only after the wheel has doubled past its live size).
        let gathers = self.cluster.as_ref().map_or(0, |c| c.gathering());
        let live_timers = 4 * (self.conns.len() + self.requests.len()) + gathers + 4096;
        if self.wheel.len() > 2 * live_timers.max(self.wheel_live) {
            self.compact_wheel();
        }
        if self.now < self.trim_at {
            return;
        }
        self.trim_at = self.now + TRIM_EVERY_MS;
        self.admission.sweep(&self.cfg.limits, self.now);
        let live = self.conns.len();
        let gone = self.trim_conns.saturating_sub(live);
        // The connection table keeps its peak size (152 B a slot) unless cut back: after a
        // flood (up to max_connections) has gone, the vacant tail goes.
        let cut = self.conns.shrink();
        self.status.shrink();
        // A burst of TLS handshakes leaves their buffers (~10 KB each while in flight) free
        // in the allocator's heap among the connections that stayed: once the burst is
        // over, that goes back too.
        let shaken = self.tls_shaken >= 1000 && self.tls_steps == 0 && self.tls_waiting.is_empty();
        if cut > 0 || (gone >= 1000 && gone * 10 >= self.trim_conns) || shaken {
            self.tls_shaken = 0;
            self.give_back();
        }
        self.trim_conns = live;
    }

    /// Gives memory the allocator holds free back to the system, on a thread of its own (with
    /// a large heap it takes milliseconds the reactor does not have).
    fn give_back(&self) {
        inc(&self.metrics.memory_trims);
        let _ = std::thread::Builder::new()
            .name("ll-trim".into())
            // SAFETY: malloc_trim only releases free memory; any thread may call it.
            .spawn(|| unsafe {
                libc::malloc_trim(0);
            });
    }

    /// Drops the wheel's entries for things that are gone.
    fn compact_wheel(&mut self) {
        let Reactor {
            wheel,
            conns,
            status,
            parked,
            requests,
            cluster,
            ..
        } = self;
        wheel.retain(|k| match k.kind {
            TimerKind::StatusExpire => status.holds(k.idx, k.gen),
            TimerKind::GraceExpire => parked.holds(k.idx, k.gen),
            TimerKind::WaitExpire => requests.get(k.idx, k.gen).is_some(),
            TimerKind::RpcExpire => cluster.as_ref().is_some_and(|c| c.gathers(k.idx, k.gen)),
            _ => conns.get(k.idx, k.gen).is_some(),
        });
        inc(&self.metrics.wheel_compactions);
        self.wheel_live = self.wheel.len();
        // What the dead entries, and the connections behind them, held goes back too.
        self.give_back();
    }

    fn clock(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Reads both clocks: `now` and the wall clock that stamps what this turn accepts.
    fn read_clocks(&mut self) {
        self.now = self.clock();
        self.unix_now = crate::types::unix_ms();
    }

    /// Runs until shutdown has drained (or its grace period ran out).
    pub fn run(&mut self) -> std::io::Result<Ended> {
        let mut events = Events::with_capacity(1024);
        if std::mem::take(&mut self.restored) {
            // Calls queued behind one that finished while the old process was quiet.
            for (idx, gen) in self.conns.keys() {
                self.next_call(Ref { idx, gen });
            }
            // The node is this process's now: its command connection starts (heartbeats,
            // adoptions); answers to other nodes go out once it is up (at most 2 s).
            if let Some(cl) = self.cluster.as_mut() {
                cl.link.start_commands(true);
                let t = Instant::now();
                while !cl.link.view.up() && t.elapsed() < Duration::from_secs(2) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        loop {
            self.now = self.clock();
            let busy = !self.again.is_empty()
                || !self.local_done.is_empty()
                || !self.dirty.is_empty()
                || !self.accept_again.is_empty()
                || !self.resume_later.is_empty()
                || self.pushing()
                || self.more_done;
            let mut timeout = if busy {
                Some(0)
            } else {
                self.wheel.next_timeout_ms(self.now)
            };
            let drain_at = self.drain.as_ref().map(|d| d.next_at);
            let upgrade_at = self.upgrade_deadline();
            for at in [self.accept_retry_at, self.shutdown_at, drain_at, upgrade_at]
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
            // After the wait, which can be long: what this turn accepts is stamped now.
            self.read_clocks();
            (self.turn_copies, self.turn_writes) = (0, 0);
            // Connections' slab entries are fetched two events ahead: each is cold (the
            // kernel's work for the events before evicts it), and the syscalls of the
            // events in between leave the fetch time to land.
            let mut ahead = events.iter();
            let fetch_next = |ahead: &mut mio::event::Iter<'_>, conns: &Slab<Conn, Line>| {
                if let Some(Token(t)) = ahead.next().map(|e| e.token()) {
                    if t >= CONN_BASE {
                        conns.prefetch((t - CONN_BASE) as u32);
                    }
                }
            };
            fetch_next(&mut ahead, &self.conns);
            fetch_next(&mut ahead, &self.conns);
            for ev in events.iter() {
                fetch_next(&mut ahead, &self.conns);
                match ev.token() {
                    WAKER => self.wake.clear(),
                    SIGNAL => self.on_signal(),
                    handoff::UPGRADE => {
                        if self.on_upgrade() {
                            return Ok(Ended::HandedOver);
                        }
                    }
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
            self.upgrade_timer();
            for r in std::mem::take(&mut self.again) {
                self.on_readable(r.idx, r.gen);
            }
            for r in std::mem::take(&mut self.resume_later) {
                self.resume(r.idx, r.gen);
            }
            if self.accept_retry_at.is_some_and(|t| self.now >= t) {
                self.accept_retry_at = None;
                self.tls_next(); // handshakes the full worker queue turned away
                self.accept_again.extend(0..self.listeners.len());
            }
            for li in std::mem::take(&mut self.accept_again) {
                self.accept(li);
            }
            self.drain_done();
            self.drain_cluster();
            self.drain_step();
            self.run_push_jobs();
            self.fire_timers();
            self.flush_dirty();
            self.flush_routes();
            self.flush_unkept();
            self.flush_durable();
            self.metrics
                .input_held
                .store(self.input_held as u64, Relaxed);
            self.metrics
                .output_held
                .store(self.output_held.held as u64, Relaxed);
            self.metrics
                .output_queued
                .store(self.output_held.queued as u64, Relaxed);
            self.metrics
                .pool_bytes
                .store(self.pool.bytes() as u64, Relaxed);
            self.metrics
                .timer_entries
                .store(self.wheel.len() as u64, Relaxed);
            self.metrics
                .conn_slots
                .store(self.conns.slots() as u64, Relaxed);
            inc(&self.metrics.reactor_loops);
            self.trim();
            if let Some(at) = self.shutdown_at {
                if self.conns.is_empty() || self.now >= at {
                    log::info!("shutdown complete ({} connections left)", self.conns.len());
                    // Offline events for connections still open go out too, and every push
                    // still unacknowledged is reported.
                    for (idx, gen) in self.conns.keys() {
                        self.unregister(idx, gen);
                    }
                    self.give_up_all();
                    self.upgrade_failed("shutting down");
                    return Ok(Ended::Stopped);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Ids, EPOCH_BITS};
    use crate::types::{ConnId, Ref};

    #[test]
    fn ids_carry_the_boot_epoch_and_refuse_other_boots() {
        let ids = Ids::new("n1", 0x1234_5678);
        let r = Ref { idx: 7, gen: 3 };
        let text = ids.format(r);
        let id = ConnId::parse(&text).unwrap();
        assert_eq!(id.gen >> 32, 0x1234_5678 & ((1 << EPOCH_BITS) - 1));
        assert!(id.gen < 1 << 53, "exact in a JavaScript number: {text}");
        assert_eq!(ids.local(&id), Some(r));
        let before_restart = Ids::new("n1", 0x1234_5679);
        assert_eq!(before_restart.local(&id), None);
        assert_eq!(Ids::new("n2", 0x1234_5678).local(&id), None);
        let max = Ref {
            idx: 1,
            gen: u32::MAX,
        };
        assert_eq!(
            ids.local(&ConnId::parse(&ids.format(max)).unwrap()),
            Some(max)
        );
    }

    #[test]
    fn ids_are_written_as_format_would() {
        for (node, epoch, idx, gen) in [
            ("n1", 0, 0, 0),
            ("node-a", 1, 9, 10),
            ("x", (1 << EPOCH_BITS) - 1, u32::MAX, u32::MAX),
            ("", 12_345, 100_000, 99),
        ] {
            let ids = Ids::new(node, epoch);
            let r = Ref { idx, gen };
            let want = format!("{node}:{idx}:{}", ids.epoch << 32 | u64::from(gen));
            assert_eq!(ids.format(r), want);
            let mut s = String::from("kept:");
            ids.write(r, &mut s);
            assert_eq!(s, format!("kept:{want}"));
        }
        let mut s = String::new();
        super::push_decimal(&mut s, u64::MAX);
        assert_eq!(s, u64::MAX.to_string());
    }
}
