//! The live upgrade, the reactor's side (docs/OPERATIONS.md, "Live upgrade"; the process
//! side is `crate::upgrade`). On SIGHUP the reactor starts the new binary and goes on
//! serving while it loads. When the new process says it is ready, the reactor goes quiet:
//! it reads no socket and starts nothing, lets the work in flight finish (workers' and
//! backends' answers, deliveries under way), then saves every table with its slots and
//! generations — connections, rooms, status values, parked pushes, push requests waiting
//! for ACKs, the timer wheel — and hands it over with every descriptor. Ids stay valid
//! because the tables keep their slots and generations and the node its boot epoch.
//!
//! Times are milliseconds since the reactor's start. The clock is CLOCK_MONOTONIC, which both
//! processes share: the new reactor takes the old one's start, so every deadline, read time
//! and retransmit schedule stands as it was.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use serde::{Deserialize, Serialize};

use super::conn::{flag, wsflag, Conn, Extra, InBuf, State};
use super::longpoll::{Entry as StatusEntry, Waiter};
use super::output::Output;
use super::reliable::{Acks, Pending, Unacked, WaitRef};
use super::upstream::Calls;
use super::websocket::Fragmented;
use super::{Reactor, Role, CONN_BASE, WAKER};
use crate::codec::Shared;
use crate::metrics::{inc, CloseReason, Transport};
use crate::net::{Listener, Sock};
use crate::proto::{method, Frame};
use crate::slab::Slab;
use crate::timer::{TimerKey, TimerKind, Wheel};
use crate::types::{PushResult, Ref};
use crate::upgrade::{Channel, PATIENCE, READY, REFUSED, TAKEN};
use crate::ws;

/// The poll token of the channel to the new process.
pub(super) const UPGRADE: Token = Token(CONN_BASE - 1);

/// Bumped when the saved state's meaning changes: a new binary refuses another version's
/// state (and the old process goes on serving), never misreads it. 2: permessage-deflate
/// (ws flag bits 64/128, `FRAG_COMPRESSED`); a version-1 state, which has none, is read
/// too (an upgrade from the binary before it). 3: TLS 1.3 connections cross with their
/// record state (`SavedConn::tls`); an older binary must not read them as clear TCP.
const VERSION: u32 = 3;
/// 4: the state carries webhook reports (`Saved::reports`). Written only when it does, so
/// that a binary reading 3 refuses it (and this process posts them on) rather than drop
/// them unread; one without reports stays 3 for it.
const VERSION_REPORTS: u32 = 4;
const READS: [u32; 4] = [1, 2, 3, 4];

/// How long the quiet step may wait for work in flight before the upgrade is given up.
const QUIESCE_MS: u64 = 2_000;

/// How `run` ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Stopped,
    /// Another process serves every connection now: exit without touching them.
    HandedOver,
}

/// An upgrade under way in the old process.
pub(super) struct Upgrade {
    ch: Channel,
    child: std::process::Child,
    /// Reactor time by which the new process must have taken over.
    deadline: u64,
    since: Instant,
}

/// Bytes as base64 in the JSON.
#[derive(Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct B64(#[serde(with = "b64")] pub Vec<u8>);

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// A slab's layout and values.
#[derive(Serialize, Deserialize)]
pub struct SavedSlab<T> {
    gens: Vec<u32>,
    free: Vec<u32>,
    first_gen: u32,
    vals: Vec<(u32, T)>,
}

impl<T> SavedSlab<T> {
    pub(super) fn of<U, A>(s: &Slab<U, A>, mut f: impl FnMut(&U) -> T) -> SavedSlab<T> {
        let (gens, free, first_gen) = s.shape();
        let vals = s
            .keys()
            .into_iter()
            .map(|(i, g)| (i, f(s.get(i, g).expect("live"))))
            .collect();
        SavedSlab {
            gens,
            free,
            first_gen,
            vals,
        }
    }

    pub(super) fn restore<U, A>(
        self,
        what: &str,
        mut f: impl FnMut(u32, T) -> Result<U, String>,
    ) -> Result<Slab<U, A>, String> {
        let vals = self
            .vals
            .into_iter()
            .map(|(i, v)| Ok((i, f(i, v)?)))
            .collect::<Result<Vec<_>, String>>()?;
        Slab::from_shape((self.gens, self.free, self.first_gen), vals)
            .map_err(|e| format!("{what}: {e}"))
    }
}

/// Everything the reactor hands over.
#[derive(Serialize, Deserialize)]
pub struct Saved {
    version: u32,
    pid: u32,
    node: String,
    epoch: u64,
    /// CLOCK_MONOTONIC nanoseconds at the old reactor's start.
    start_ns: u64,
    pushes: u64,
    /// App ids in the old config's order (indexes below are into this list).
    apps: Vec<String>,
    origins: Vec<String>,
    listeners: Vec<SavedListener>,
    conns: SavedSlab<SavedConn>,
    rooms: Vec<(u16, String, Vec<String>)>,
    status: SavedStatus,
    parked: SavedSlab<SavedParked>,
    requests: SavedSlab<SavedRequest>,
    timers: Vec<(u64, u32, u32, TimerKind)>,
    over: Vec<(u32, u32, u64)>,
    slow: Vec<Ref>,
    /// Cluster mode: the node's route epoch, its channel's marker, the API calls waiting
    /// for other nodes' parts and other nodes' requests waiting here.
    cluster: Option<super::cluster::SavedCluster>,
    /// The backends' reports not yet posted (online/offline events, pushes given up):
    /// posted by the new process, after the one this process was posting.
    #[serde(default)]
    reports: crate::backend::HandedReports,
}

#[derive(Serialize, Deserialize)]
pub struct SavedListener {
    fd: usize,
    role: Role,
    /// A TLS listener (its certificates are the new process's to read).
    #[serde(default)]
    tls: bool,
    /// A unix listener's path and socket file (device, inode).
    unix: Option<(std::path::PathBuf, (u64, u64))>,
}

/// In a saved fragment's opcode: the message is compressed (where RSV1 sits on the wire).
const FRAG_COMPRESSED: u8 = 0x40;

#[derive(Serialize, Deserialize)]
pub struct SavedConn {
    fd: usize,
    unix: bool,
    role: Role,
    state: State,
    flags: u8,
    errors: u8,
    close_reason: CloseReason,
    app: u16,
    /// Unused since the registry's app index became a bitmap (written 0, read and ignored):
    /// kept so that processes of either build can hand over to each other.
    #[serde(default)]
    app_pos: u32,
    inbuf: B64,
    out: B64,
    last_read: u64,
    deadline: u64,
    seq: u64,
    connected_at: u64,
    device: Option<String>,
    user: Option<String>,
    ws: u8,
    /// A fragmented WebSocket message: opcode (with `FRAG_COMPRESSED` for a compressed
    /// one), bytes so far, bytes validated as UTF-8.
    frag: Option<(u8, B64, usize)>,
    extra: Option<SavedExtra>,
    /// A TLS 1.3 connection on our record layer: its keys, counters and buffered records.
    #[serde(default)]
    tls: Option<SavedTls>,
}

#[derive(Serialize, Deserialize)]
pub struct SavedTls {
    suite: u16,
    /// Each way: traffic secret, key and IV end to end (`crate::tls13::SavedKeys`).
    rx_keys: B64,
    rx_seq: u64,
    tx_keys: B64,
    tx_seq: u64,
    /// The start of a record not all received; records sealed and not sent; plaintext
    /// rustls decrypted before the switch, not read yet.
    rx: B64,
    tx: B64,
    plain: B64,
    closed: bool,
}

impl SavedTls {
    fn of(t: crate::net::TlsState) -> SavedTls {
        SavedTls {
            suite: t.keys.suite,
            rx_keys: B64(t.keys.rx),
            rx_seq: t.keys.rx_seq,
            tx_keys: B64(t.keys.tx),
            tx_seq: t.keys.tx_seq,
            rx: B64(t.rx),
            tx: B64(t.tx),
            plain: B64(t.plain),
            closed: t.closed,
        }
    }

    /// The keys alone, for the check before anything is built.
    fn keys(&self) -> crate::tls13::SavedKeys {
        crate::tls13::SavedKeys {
            suite: self.suite,
            rx: self.rx_keys.0.clone(),
            rx_seq: self.rx_seq,
            tx: self.tx_keys.0.clone(),
            tx_seq: self.tx_seq,
        }
    }

    fn state(self) -> crate::net::TlsState {
        crate::net::TlsState {
            keys: self.keys(),
            rx: self.rx.0,
            tx: self.tx.0,
            plain: self.plain.0,
            closed: self.closed,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct SavedExtra {
    session: Vec<(String, String)>,
    calls_pending: Vec<B64>,
    calls_recent: Vec<u64>,
    calls_next: usize,
    unacked: Vec<(u64, u32, u64, SavedPending)>,
    rt_at: u64,
    durable_until: u64,
}

#[derive(Serialize, Deserialize)]
pub struct SavedPending {
    body: B64,
    order: u64,
    origin: u16,
    claim: u32,
    waiter: Option<u16>,
    expires: u64,
    wait: Option<(u32, u32, u32)>,
}

#[derive(Serialize, Deserialize)]
pub struct SavedStatus {
    entries: SavedSlab<SavedEntry>,
    waiting: Vec<(u32, SavedWaiter)>,
    version: u64,
    values: usize,
    bytes: usize,
}

#[derive(Serialize, Deserialize)]
pub struct SavedEntry {
    key: String,
    value: Option<B64>,
    version: u64,
    expires: u64,
    waiters: Vec<Ref>,
}

#[derive(Serialize, Deserialize)]
pub struct SavedWaiter {
    gen: u32,
    entry: (u32, u32),
    cors: Option<String>,
    keep_alive: bool,
    since: u64,
}

#[derive(Serialize, Deserialize)]
pub struct SavedParked {
    app: u16,
    device: String,
    user: Option<String>,
    pushes: Vec<SavedPending>,
    expires: u64,
}

#[derive(Serialize, Deserialize)]
pub struct SavedRequest {
    api: Option<Ref>,
    keep_alive: bool,
    batch: bool,
    results: Vec<PushResult>,
    left: u64,
    expires: u64,
}

fn save_pending(p: &Pending) -> SavedPending {
    SavedPending {
        body: B64(p.frame.body().to_vec()),
        order: p.order,
        origin: p.origin,
        claim: p.claim,
        waiter: p.waiter,
        expires: p.expires,
        wait: p.wait.as_ref().map(|w| (w.idx, w.gen, w.item)),
    }
}

fn load_pending(p: SavedPending) -> Result<Pending, String> {
    Ok(Pending {
        frame: Shared::from_body(&p.body.0).ok_or("a kept push does not decode")?,
        order: p.order,
        origin: p.origin,
        claim: p.claim,
        waiter: p.waiter,
        expires: p.expires,
        wait: p.wait.map(|(idx, gen, item)| WaitRef { idx, gen, item }),
    })
}

/// CLOCK_MONOTONIC now, in nanoseconds (what `Instant` reads on Linux).
fn mono_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime fills the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The saved state's listeners, rebuilt from their descriptors (taken out of `fds`), with
/// their roles; the old process's pid.
pub fn listeners(
    saved: &Saved,
    fds: &mut [Option<OwnedFd>],
) -> Result<Vec<(Listener, Role, bool)>, String> {
    saved
        .listeners
        .iter()
        .map(|l| {
            let fd = take(fds, l.fd)?;
            Ok((Listener::from_fd(fd, l.unix.clone()), l.role, l.tls))
        })
        .collect()
}

fn take(fds: &mut [Option<OwnedFd>], i: usize) -> Result<OwnedFd, String> {
    fds.get_mut(i)
        .and_then(Option::take)
        .ok_or_else(|| format!("descriptor {i} missing or named twice"))
}

impl Reactor {
    /// TLS 1.3 connections cross with their record state (`SavedTls`). The others cannot:
    /// a TLS 1.2 connection or a handshake under way has its state in rustls, in this
    /// process. Each of those is told to come back, the way a drain does it (REDIRECT
    /// without an endpoint: the client dials its usual address, where the new process
    /// listens; raw WebSocket: close 1012; a long-poll: its answer), and closed. Clients
    /// reconnect within their backoff; nothing acknowledged is lost (unACKed pushes wait in
    /// the grace window, handed over with the device's state).
    fn close_tls_for_upgrade(&mut self) {
        let tls: Vec<(u32, u32)> = self
            .conns
            .keys()
            .into_iter()
            .filter(|&(i, g)| {
                self.conns
                    .get(i, g)
                    .is_some_and(|c| c.sock.tls_stays_behind())
            })
            .collect();
        for &(idx, gen) in &tls {
            let Some(c) = self.conns.get(idx, gen) else {
                continue;
            };
            match (c.role, c.state) {
                (Role::Http, State::Waiting) => self.poll_timed_out(idx, gen),
                (Role::Client(Transport::Ws), State::Open) if c.ws & wsflag::PBBP2 == 0 => {
                    self.ws_close(idx, gen, ws::status::SERVICE_RESTART, "restart");
                }
                (Role::Client(t), State::Open) => {
                    let h = [("reason", "restart")];
                    self.send_frame(idx, gen, &Frame::control(method::REDIRECT, 0, &h));
                    if t == Transport::Ws {
                        self.ws_close(idx, gen, ws::status::SERVICE_RESTART, "restart");
                    }
                }
                _ => {}
            }
            // Out now, as far as the socket takes it (best effort: the process goes away).
            self.flush(idx, gen);
            if let Some(c) = self.conns.get_mut(idx, gen) {
                c.sock.shutdown_write();
            }
            self.close_now(idx, gen, CloseReason::Drained);
        }
        if !tls.is_empty() {
            crate::metrics::add(&self.metrics.tls_upgrade_closed, tls.len() as u64);
            log::info!(
                "upgrade: {} TLS connection(s) told to reconnect (TLS 1.2 or mid-handshake: state not handed over)",
                tls.len()
            );
        }
    }
}

impl Saved {
    pub fn decode(blob: &[u8]) -> Result<Saved, String> {
        let s: Saved = serde_json::from_slice(blob).map_err(|e| format!("state: {e}"))?;
        if !READS.contains(&s.version) {
            return Err(format!(
                "state version {} (this binary reads {VERSION})",
                s.version
            ));
        }
        Ok(s)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Checks what does not need the reactor: every descriptor index names one of the `nfds`
    /// received, once; every table's layout holds together; app and origin numbers are in
    /// range; kept pushes decode. Pure (fuzzed: fuzz/fuzz_targets/handoff_state.rs).
    pub fn check(&self, nfds: usize) -> Result<(), String> {
        let mut used = vec![false; nfds];
        let fds = self
            .listeners
            .iter()
            .map(|l| l.fd)
            .chain(self.conns.vals.iter().map(|(_, c)| c.fd));
        for fd in fds {
            match used.get_mut(fd) {
                Some(u) if !*u => *u = true,
                _ => return Err(format!("descriptor {fd} missing or named twice")),
            }
        }
        fn shape<T>(what: &str, s: &SavedSlab<T>) -> Result<(), String> {
            let vals = s.vals.iter().map(|(i, _)| (*i, ())).collect();
            Slab::<(), crate::slab::Packed>::from_shape(
                (s.gens.clone(), s.free.clone(), s.first_gen),
                vals,
            )
            .map(drop)
            .map_err(|e| format!("{what}: {e}"))
        }
        shape("connections", &self.conns)?;
        shape("status values", &self.status.entries)?;
        shape("parked pushes", &self.parked)?;
        shape("push requests", &self.requests)?;
        if self.origins.first() != Some(&self.node) {
            return Err("origin 0 is not this node".into());
        }
        let apps = self.apps.len();
        let app_ok = |a: u16| usize::from(a) < apps;
        let pending_ok = |p: &SavedPending| {
            usize::from(p.origin) < self.origins.len() && Shared::from_body(&p.body.0).is_some()
        };
        for (_, c) in &self.conns.vals {
            if (c.flags & flag::REGISTERED != 0 || c.device.is_some()) && !app_ok(c.app) {
                return Err(format!("app {} out of range", c.app));
            }
            if c.frag
                .as_ref()
                .is_some_and(|(_, b, valid)| *valid > b.0.len())
            {
                return Err("a fragment's validated length is past its bytes".into());
            }
            if c.frag.as_ref().is_some_and(|(op, _, _)| {
                let op = op & !FRAG_COMPRESSED;
                op != crate::ws::op::TEXT && op != crate::ws::op::BINARY
            }) {
                return Err("a fragmented message that is neither text nor binary".into());
            }
            if let Some(t) = &c.tls {
                if c.unix {
                    return Err("TLS on a unix socket".into());
                }
                if t.rx.0.len() > 2 * crate::tls13::MAX_RECORD {
                    return Err("a TLS connection's partial record is too long".into());
                }
                crate::tls13::Keys::load(&t.keys())
                    .map_err(|e| format!("a TLS connection's keys: {e}"))?;
            }
            if let Some(e) = &c.extra {
                if e.calls_recent.len() != super::upstream::RECENT
                    || e.calls_next >= e.calls_recent.len()
                {
                    return Err("recent call seqids: wrong size".into());
                }
                if !e.unacked.iter().all(|u| pending_ok(&u.3)) {
                    return Err("an unacknowledged push does not decode".into());
                }
            }
        }
        for (_, p) in &self.parked.vals {
            if !app_ok(p.app) || !p.pushes.iter().all(pending_ok) {
                return Err("a parked push is out of range or does not decode".into());
            }
        }
        if self.rooms.iter().any(|(a, _, _)| !app_ok(*a)) {
            return Err("a room's app out of range".into());
        }
        Ok(())
    }

    pub fn connections(&self) -> usize {
        self.conns.vals.len()
    }

    /// Cluster mode: the route epoch the node's routes are written under.
    pub fn routes_epoch(&self) -> Option<u64> {
        self.cluster.as_ref().map(|c| c.routes_epoch())
    }
}

impl Reactor {
    /// SIGHUP: starts the binary now at this process's path; it takes over once it is up.
    pub(super) fn start_upgrade(&mut self) {
        let refuse = if self.upgrade.is_some() {
            Some("an upgrade is already under way")
        } else if self.shutdown_at.is_some() {
            Some("shutting down")
        } else if self.drain.is_some() {
            Some("draining")
        } else if self
            .cluster
            .as_ref()
            .is_some_and(|c| !c.link.view.up() || !c.link.view.hearing())
        {
            Some("Redis is away: the node's channel cannot be handed over; try again once it is back")
        } else {
            None
        };
        if let Some(why) = refuse {
            log::warn!("SIGHUP: no upgrade: {why}");
            return;
        }
        let (ch, child) = match crate::upgrade::spawn() {
            Ok(p) => p,
            Err(e) => {
                inc(&self.metrics.upgrades_failed);
                log::error!("SIGHUP: upgrade: cannot start the new binary: {e}");
                return;
            }
        };
        let registered = ch.set_nonblocking(true).and_then(|_| {
            self.poll.registry().register(
                &mut SourceFd(&ch.as_raw_fd()),
                UPGRADE,
                Interest::READABLE,
            )
        });
        log::info!(
            "SIGHUP: upgrading: new process {} started; {} connections to hand over",
            child.id(),
            self.conns.len()
        );
        self.upgrade = Some(Upgrade {
            ch,
            child,
            deadline: self.now + PATIENCE.as_millis() as u64,
            since: Instant::now(),
        });
        if let Err(e) = registered {
            self.upgrade_failed(&format!("epoll: {e}"));
        }
    }

    /// When the upgrade under way must be over (for the poll's timeout).
    pub(super) fn upgrade_deadline(&self) -> Option<u64> {
        self.upgrade.as_ref().map(|u| u.deadline)
    }

    /// Gives up an upgrade whose new process has said nothing in time.
    pub(super) fn upgrade_timer(&mut self) {
        if self
            .upgrade
            .as_ref()
            .is_some_and(|u| self.now >= u.deadline)
        {
            self.upgrade_failed("the new process did not get ready within 10 s");
        }
    }

    /// The new process spoke (or went away). True when it has taken everything over.
    pub(super) fn on_upgrade(&mut self) -> bool {
        let Some(u) = &self.upgrade else {
            return false;
        };
        let (mut data, mut fds) = (vec![], vec![]);
        let why = match u.ch.recv(&mut data, &mut fds) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Ok(Some(READY)) if self.shutdown_at.is_some() || self.drain.is_some() => {
                "a shutdown or drain began meanwhile".into()
            }
            Ok(Some(READY)) => match self.hand_over() {
                Ok(()) => return true,
                Err(why) => why,
            },
            Ok(Some(REFUSED)) => format!("it refused: {}", String::from_utf8_lossy(&data)),
            Ok(None) => "the new process exited before it was ready (see its log above)".into(),
            Ok(Some(k)) => format!("unexpected packet {k}"),
            Err(e) => format!("{e}"),
        };
        self.upgrade_failed(&why);
        false
    }

    /// Goes quiet, saves everything and sends it; Ok once the new process has taken over.
    fn hand_over(&mut self) -> Result<(), String> {
        let t0 = Instant::now();
        self.close_tls_for_upgrade();
        self.quiescing = true;
        // Cluster mode: the marker splits the node's channel between the two processes.
        self.handover_begin()?;
        self.quiesce()?;
        if self.shutdown_at.is_some() || self.drain.is_some() {
            // (An API call answered while quiet may have begun one.)
            return Err("a shutdown or drain began meanwhile".into());
        }
        if self.conns.iter_vals().any(|c| c.sock.tls_stays_behind()) {
            // (Not expected: the first pass closed every one, a step out on a worker
            // included, and none is accepted while quiet.)
            self.close_tls_for_upgrade();
            self.quiesce()?;
        }
        if self.conns.iter_vals().any(|c| c.sock.tls_stays_behind()) {
            return Err("a TLS connection that cannot cross is still open".into());
        }
        let waited = t0.elapsed();
        let (mut saved, fds) = self.save();
        // The reports' threads stop after the one they are posting; what waits goes over
        // (and comes back if the upgrade fails: `upgrade_failed`).
        saved.reports = self.backends.take_reports(&saved.apps);
        if saved.reports.iter().any(|(_, _, v)| !v.is_empty()) {
            saved.version = VERSION_REPORTS;
        }
        let blob = serde_json::to_vec(&saved);
        let handed = std::mem::take(&mut saved.reports);
        self.reports_out = Some((saved.apps.clone(), handed));
        let blob = blob.map_err(|e| format!("state: {e}"))?;
        let u = self.upgrade.as_ref().expect("under way");
        // Whatever is left of the patience, but the new process gets some seconds to take
        // the state in, whatever time the quiet step used.
        let left = PATIENCE
            .saturating_sub(u.since.elapsed())
            .max(Duration::from_secs(5));
        let sent =
            u.ch.set_nonblocking(false)
                .and_then(|_| u.ch.set_timeout(left))
                .and_then(|_| u.ch.send_state(&fds, &blob));
        sent.map_err(|e| format!("sending the state: {e}"))?;
        let (mut data, mut none) = (vec![], vec![]);
        match u.ch.recv(&mut data, &mut none) {
            Ok(Some(TAKEN)) => {
                // A stop or drain signal that came meanwhile was for this process's
                // clients: this process stays and acts on it.
                let got = self.read_signals();
                self.held_signals.extend(got);
                if self.held_signals.iter().any(|&s| s != libc::SIGHUP as u32) {
                    return Err("a signal came during the upgrade".into());
                }
                let u = self.upgrade.as_ref().expect("under way");
                // Until this, the new process touches no socket: had this process given up
                // (and stopped it) first, nothing would have been read twice or lost.
                u.ch.send(crate::upgrade::GO, &[], &[])
                    .map_err(|e| format!("the new process went away before it could go: {e}"))?;
                let u = self.upgrade.as_ref().expect("under way");
                log::info!(
                    "upgrade: pid {} serves {} connections now (quiet for {} ms, {} KiB of state, {} ms in all); exiting",
                    u.child.id(),
                    saved.connections(),
                    waited.as_millis(),
                    blob.len() / 1024,
                    t0.elapsed().as_millis()
                );
                // The listeners' socket files are the new process's now.
                for (l, _) in self.listeners.iter_mut().filter_map(Option::take) {
                    l.hand_off();
                }
                self.handover_end(true);
                // What the last turns queued for other nodes goes before this exits.
                self.flush_link(Duration::from_secs(2));
                Ok(())
            }
            Ok(Some(REFUSED)) => Err(format!(
                "the new process refused the state: {}",
                String::from_utf8_lossy(&data)
            )),
            Ok(None) => Err("the new process exited before it took over".into()),
            Ok(Some(k)) => Err(format!("unexpected packet {k}")),
            Err(e) => Err(format!("no answer from the new process: {e}")),
        }
    }

    /// Lets the work in flight finish, reading no socket and starting nothing new.
    fn quiesce(&mut self) -> Result<(), String> {
        let until = self.clock() + QUIESCE_MS;
        let mut events = Events::with_capacity(256);
        loop {
            self.now = self.clock();
            // Each pass is a turn: the delivery budget starts again.
            (self.turn_copies, self.turn_writes) = (0, 0);
            self.drain_done();
            self.drain_cluster();
            self.run_push_jobs();
            self.flush_dirty();
            self.flush_routes();
            self.flush_durable();
            let delivering = self.pushing() || self.more_done || !self.local_done.is_empty();
            if let Some(why) = self.handover_broken() {
                return Err(why.into());
            }
            if self.in_flight == 0 && !delivering && self.handover_still() {
                return Ok(());
            }
            if self.now >= until {
                let owed = self
                    .handover_owed()
                    .map_or(String::new(), |w| format!("; the cluster link owes {w}"));
                return Err(format!(
                    "{} calls to workers and backends still unanswered after {QUIESCE_MS} ms{owed}",
                    self.in_flight
                ));
            }
            let wait = if delivering { 0 } else { 5 };
            let _ = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(wait)));
            // Other events are dropped: the new process registers every socket anew (and
            // is told at once of what is ready), and a resumed one reads them all again
            // (`upgrade_failed` clears `drained` for that).
            for ev in events.iter() {
                match ev.token() {
                    WAKER => self.wake.clear(),
                    super::SIGNAL => {
                        let got = self.read_signals();
                        self.held_signals.extend(got);
                    }
                    _ => {}
                }
            }
        }
    }

    /// The reports taken for a new process that did not take over: back to their queues.
    fn give_back_reports(&mut self) {
        if let Some((apps, handed)) = self.reports_out.take() {
            self.backends.give_back_reports(&apps, handed);
        }
    }

    /// Handed over: the channel to the new process, kept open by the caller until this
    /// process's last report is posted (the new process posts none before it closes).
    pub fn keep_upgrade_channel(&mut self) -> Option<Channel> {
        self.upgrade.take().map(|u| u.ch)
    }

    /// The upgrade failed: the new process is stopped and this one goes on as before.
    pub(super) fn upgrade_failed(&mut self, why: &str) {
        let Some(mut u) = self.upgrade.take() else {
            self.give_back_reports();
            return;
        };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&u.ch.as_raw_fd()));
        let _ = u.child.kill();
        let _ = u.child.wait();
        // (Only now: the new process, gone, can post none of them.)
        self.give_back_reports();
        // The hand-over can have held the turn for seconds; what this turn accepts again
        // (`accept_again`) is stamped with the time it comes in.
        self.read_clocks();
        inc(&self.metrics.upgrades_failed);
        self.handover_end(false);
        log::error!(
            "upgrade failed, pid {} goes on serving: {why}",
            std::process::id()
        );
        if std::mem::take(&mut self.quiescing) {
            // Everything is read and written again; systemd hears this is the main process
            // again (the new one may have said otherwise).
            for (idx, gen) in self.conns.keys() {
                self.resume_later.push(Ref { idx, gen });
                let c = self.conns.get_mut(idx, gen).expect("live");
                // Quiescing dropped its events (edges the kernel will not repeat): what
                // `drained` knew is stale, so the resume reads.
                c.drained = false;
                if c.owes_output() && c.flags & flag::DIRTY == 0 {
                    c.flags |= flag::DIRTY;
                    self.dirty.push(Ref { idx, gen });
                }
            }
            self.accept_again.extend(0..self.listeners.len());
            crate::upgrade::notify_systemd();
            // (A SIGHUP held meanwhile was for the upgrade that just failed.)
            for signo in std::mem::take(&mut self.held_signals) {
                if signo != libc::SIGHUP as u32 {
                    self.signal(signo);
                }
            }
        }
    }

    /// Everything to hand over, and the descriptors the state's `fd` fields index.
    fn save(&mut self) -> (Saved, Vec<RawFd>) {
        let mut fds = vec![];
        let listeners = self
            .listeners
            .iter()
            .flatten()
            .map(|(l, role)| {
                fds.push(l.raw_fd());
                SavedListener {
                    fd: fds.len() - 1,
                    role: *role,
                    tls: l.is_tls(),
                    unix: l.unix_file(),
                }
            })
            .collect();
        let conns = SavedSlab::of(&self.conns, |c| {
            fds.push(c.sock.raw_fd());
            save_conn(c, fds.len() - 1)
        });
        let rooms = (0..self.cfg.apps.len())
            .flat_map(|a| {
                self.registry
                    .rooms_of(a)
                    .into_iter()
                    .map(move |(room, devs)| (a as u16, room, devs))
            })
            .collect();
        let st = &self.status;
        let status = SavedStatus {
            entries: SavedSlab::of(&st.entries, |e| SavedEntry {
                key: e.key.to_string(),
                value: e.value.as_ref().map(|v| B64(v.to_vec())),
                version: e.version,
                expires: e.expires,
                waiters: e.waiters.clone(),
            }),
            waiting: st
                .waiting
                .iter()
                .map(|(&slot, w)| {
                    let sw = SavedWaiter {
                        gen: w.gen,
                        entry: w.entry,
                        cors: w.cors.as_deref().map(Into::into),
                        keep_alive: w.keep_alive,
                        since: w.since,
                    };
                    (slot, sw)
                })
                .collect(),
            version: st.version,
            values: st.values,
            bytes: st.bytes,
        };
        let parked = SavedSlab::of(&self.parked.entries, |p| SavedParked {
            app: p.key.0,
            device: p.key.1.to_string(),
            user: p.user.as_deref().map(Into::into),
            pushes: p.pushes.iter().map(save_pending).collect(),
            expires: p.expires,
        });
        let requests = SavedSlab::of(&self.requests, |r| SavedRequest {
            api: r.api,
            keep_alive: r.keep_alive,
            batch: r.batch,
            results: r.results.clone(),
            left: r.left,
            expires: r.expires,
        });
        let timers = self
            .wheel
            .entries()
            .into_iter()
            .filter(|(_, k)| self.timer_live(k))
            .map(|(at, k)| (at, k.idx, k.gen, k.kind))
            .collect();
        let start_ns = mono_ns() - self.start.elapsed().as_nanos() as u64;
        let saved = Saved {
            version: VERSION,
            pid: std::process::id(),
            node: self.ids.node.clone(),
            epoch: self.ids.epoch,
            start_ns,
            pushes: self.pushes,
            apps: self.cfg.apps.iter().map(|a| a.id.clone()).collect(),
            origins: self.origins.names.iter().map(|n| n.to_string()).collect(),
            listeners,
            conns,
            rooms,
            status,
            parked,
            requests,
            timers,
            over: self.over.iter().map(|(&i, &(g, t))| (i, g, t)).collect(),
            slow: self.slow.clone(),
            cluster: self.cluster.as_ref().map(|c| c.save()),
            reports: vec![],
        };
        (saved, fds)
    }

    /// Whether a wheel entry names something still there (`compact_wheel`'s test).
    pub(super) fn timer_live(&self, k: &TimerKey) -> bool {
        match k.kind {
            TimerKind::StatusExpire => self.status.holds(k.idx, k.gen),
            TimerKind::GraceExpire => self.parked.holds(k.idx, k.gen),
            TimerKind::WaitExpire => self.requests.get(k.idx, k.gen).is_some(),
            TimerKind::RpcExpire => self
                .cluster
                .as_ref()
                .is_some_and(|c| c.gathers(k.idx, k.gen)),
            _ => self.conns.get(k.idx, k.gen).is_some(),
        }
    }

    /// The new process: takes over the old one's state (its listeners are in already).
    /// Nothing is read or written here; the first turn of `run` resumes every connection.
    /// An error leaves nothing registered that the old process would miss: it goes on.
    pub fn restore(&mut self, s: Saved, fds: Vec<Option<OwnedFd>>) -> Result<(), String> {
        s.check(fds.len())?;
        if s.cluster.is_some() != self.cluster.is_some() {
            return Err(
                "cluster mode is on in one config and off in the other: restart to change it"
                    .into(),
            );
        }
        let mut fds = fds;
        if s.node != self.cfg.node_id {
            return Err(format!(
                "node_id changed from {:?} to {:?}: a live upgrade keeps the node's connection ids; restart to change it",
                s.node, self.cfg.node_id
            ));
        }
        // The old process's reports go before any of this one's (posted once it is gone).
        let mut s = s;
        let ids: Vec<String> = self.cfg.apps.iter().map(|a| a.id.clone()).collect();
        self.backends
            .put_reports_first(&ids, std::mem::take(&mut s.reports));
        // Apps by id: the new config may have reordered them. One that holds anything must
        // still be there.
        let mut app_map = vec![None; s.apps.len()];
        for (i, id) in s.apps.iter().enumerate() {
            app_map[i] = self
                .cfg
                .apps
                .iter()
                .position(|a| &a.id == id)
                .map(|p| p as u16);
        }
        let app = |i: u16| -> Result<u16, String> {
            app_map
                .get(usize::from(i))
                .copied()
                .flatten()
                .ok_or_else(|| match s.apps.get(usize::from(i)) {
                    Some(id) => {
                        format!("app {id:?} has connections or pushes and is not in the new config")
                    }
                    None => format!("app {i} out of range"),
                })
        };
        // The clock: the old start on the shared monotonic clock.
        let age = mono_ns().saturating_sub(s.start_ns);
        self.start = Instant::now()
            .checked_sub(Duration::from_nanos(age))
            .ok_or("the old start is before this clock's origin")?;
        self.now = self.clock();
        self.ids = super::Ids::new(&s.node, s.epoch);
        // Never back: an older build's counter started at 0, and push ids must not repeat.
        self.pushes = self.pushes.max(s.pushes);
        let mut origins = s.origins.iter();
        if origins.next() != Some(&s.node) {
            return Err("origin 0 is not this node".into());
        }
        for o in origins {
            self.origins.intern(o);
        }

        let mut conns = s.conns.restore("connections", |_, mut c| {
            let fd = take(&mut fds, c.fd)?;
            let sock = match c.tls.take() {
                Some(t) if !c.unix => Sock::tls_from_fd(fd, t.state())?,
                Some(_) => return Err("TLS on a unix socket".into()),
                None => Sock::from_fd(fd, c.unix),
            };
            load_conn(sock, c, &app)
        })?;
        // Register everything; undo on failure (the old process would resume).
        let keys = conns.keys();
        for (n, &(idx, gen)) in keys.iter().enumerate() {
            let c = conns.get_mut(idx, gen).expect("live");
            let token = Token(idx as usize + CONN_BASE);
            if let Err(e) = self
                .poll
                .registry()
                .register(&mut c.sock, token, Interest::READABLE)
            {
                for &(i, g) in &keys[..n] {
                    let c = conns.get_mut(i, g).expect("live");
                    let _ = self.poll.registry().deregister(&mut c.sock);
                }
                return Err(format!("epoll register: {e}"));
            }
        }
        // Registry, counts and gauges as `add_conn` and admission keep them.
        let mut registered: Vec<(u16, u32, u32)> = vec![];
        for &(idx, gen) in &keys {
            let c = conns.get_mut(idx, gen).expect("live");
            match c.role {
                Role::Client(t) => {
                    self.client_conns += 1;
                    // A WebSocket connection was accepted on the HTTP listener.
                    inc(match t {
                        Transport::Tcp => &self.metrics.accepted[t as usize],
                        Transport::Ws => &self.metrics.http_accepted,
                    });
                    self.metrics.connections[t as usize].fetch_add(1, Relaxed);
                }
                Role::Http => {
                    self.client_conns += 1;
                    inc(&self.metrics.http_accepted);
                }
                Role::Api => {
                    self.metrics.api_connections.fetch_add(1, Relaxed);
                }
            }
            self.input_held += c.inbuf.capacity() + c.frag().map_or(0, |f| f.capacity());
            if let Some(o) = &c.out {
                self.output_held.held += o.held();
                self.output_held.queued += o.backlog();
            }
            // Output, or TLS records sealed and not yet sent: written from the first turn.
            if c.out.is_some() || c.sock.tls_pending() {
                c.flags |= flag::DIRTY;
                self.dirty.push(Ref { idx, gen });
            }
            if c.flags & flag::REGISTERED != 0 {
                registered.push((c.app, idx, gen));
            }
            if c.role != Role::Api {
                if let Some(ip) = c.sock.peer_ip() {
                    self.admission.held(&self.cfg.limits, idx, ip, self.now);
                }
            }
            self.resume_later.push(Ref { idx, gen });
        }
        for (a, idx, gen) in registered {
            let c = conns.get_mut(idx, gen).expect("live");
            let Some(device) = c.device.clone() else {
                return Err(format!("connection {idx} is registered with no device"));
            };
            c.dev_tag = self
                .registry
                .add(usize::from(a), idx, &device, 0, c.user.as_ref());
            self.metrics.app_connections[usize::from(a)].fetch_add(1, Relaxed);
        }
        self.conns = conns;
        for (a, room, devices) in s.rooms {
            self.registry
                .room_add(usize::from(app(a)?), &room, &devices);
        }

        let st = s.status;
        self.status.entries = st.entries.restore("status values", |_, e| {
            Ok(StatusEntry {
                key: e.key.into(),
                value: e.value.map(|v| v.0.into()),
                version: e.version,
                expires: e.expires,
                waiters: e.waiters,
            })
        })?;
        self.status.keys = self
            .status
            .entries
            .keys()
            .into_iter()
            .map(|(i, g)| {
                (
                    self.status.entries.get(i, g).expect("live").key.clone(),
                    (i, g),
                )
            })
            .collect();
        self.status.waiting = st
            .waiting
            .into_iter()
            .map(|(slot, w)| {
                let w = Waiter {
                    gen: w.gen,
                    entry: w.entry,
                    cors: w.cors.map(Into::into),
                    keep_alive: w.keep_alive,
                    since: w.since,
                };
                (slot, w)
            })
            .collect();
        self.status.version = st.version;
        self.status.values = st.values;
        self.status.bytes = st.bytes;
        self.metrics
            .status_keys
            .store(self.status.keys.len() as u64, Relaxed);
        self.metrics
            .poll_waiters
            .store(self.status.waiting.len() as u64, Relaxed);

        self.parked.entries = s.parked.restore("parked pushes", |_, p| {
            Ok(super::reliable::ParkedDevice {
                key: (app(p.app)?, p.device.into()),
                user: p.user.map(Into::into),
                pushes: p
                    .pushes
                    .into_iter()
                    .map(load_pending)
                    .collect::<Result<VecDeque<_>, _>>()?,
                expires: p.expires,
            })
        })?;
        self.parked.index = self
            .parked
            .entries
            .keys()
            .into_iter()
            .map(|(i, g)| {
                (
                    self.parked.entries.get(i, g).expect("live").key.clone(),
                    (i, g),
                )
            })
            .collect();
        self.requests = s.requests.restore("push requests", |_, r| {
            Ok(super::delivery::PushRequest {
                api: r.api,
                keep_alive: r.keep_alive,
                batch: r.batch,
                results: r.results,
                left: r.left,
                expires: r.expires,
                delivering: false,
                durable_wait: false,
                durable_token: 0,
            })
        })?;
        self.wheel = Wheel::new(self.now);
        for (at, idx, gen, kind) in s.timers {
            self.wheel.insert(at, TimerKey { idx, gen, kind });
        }
        self.wheel_live = self.wheel.len();
        self.over = s.over.into_iter().map(|(i, g, t)| (i, (g, t))).collect();
        if let (Some(sc), Some(cl)) = (s.cluster, self.cluster.as_mut()) {
            // The old process's messages end at its marker; 5 s at most.
            cl.restore(sc, self.now + 5_000)?;
        }
        self.slow = s.slow;
        self.accept_again.extend(0..self.listeners.len());
        self.restored = true;
        let left: Vec<usize> = fds
            .iter()
            .enumerate()
            .filter(|(_, f)| f.is_some())
            .map(|(i, _)| i)
            .collect();
        if !left.is_empty() {
            log::warn!(
                "upgrade: {} descriptors handed over but not named",
                left.len()
            );
        }
        Ok(())
    }
}

fn save_conn(c: &Conn, fd: usize) -> SavedConn {
    SavedConn {
        fd,
        unix: c.sock.is_unix(),
        role: c.role,
        state: c.state,
        // Re-derived in the new process: on no list yet, no write interest registered.
        flags: c.flags & !(flag::DIRTY | flag::WRITABLE),
        errors: c.errors,
        close_reason: c.close_reason,
        app: c.app,
        app_pos: 0,
        inbuf: B64(c.inbuf.as_slice().to_vec()),
        out: B64(c.out.as_ref().map_or_else(Vec::new, |o| o.unwritten())),
        last_read: c.last_read,
        deadline: c.deadline,
        seq: c.seq,
        connected_at: c.connected_at,
        device: c.device.as_deref().map(Into::into),
        user: c.user.as_deref().map(Into::into),
        ws: c.ws,
        frag: c.frag().map(|f| {
            let compressed = if f.compressed { FRAG_COMPRESSED } else { 0 };
            (f.opcode | compressed, B64(f.buf.clone()), f.utf8.valid)
        }),
        tls: c.sock.tls_state().map(SavedTls::of),
        extra: c.extra.as_ref().map(|e| SavedExtra {
            session: e.session.clone(),
            calls_pending: e
                .calls
                .pending
                .iter()
                .map(|f| B64(prost::Message::encode_to_vec(f)))
                .collect(),
            calls_recent: e.calls.recent.to_vec(),
            calls_next: e.calls.next,
            unacked: e
                .acks
                .unacked
                .iter()
                .map(|u| (u.seq, u.tries, u.due, save_pending(&u.push)))
                .collect(),
            rt_at: e.acks.rt_at,
            durable_until: e.acks.durable_until,
        }),
    }
}

fn load_conn(
    sock: Sock,
    c: SavedConn,
    app: &impl Fn(u16) -> Result<u16, String>,
) -> Result<Conn, String> {
    if c.state == State::Authing {
        return Err("a connection is still being admitted".into());
    }
    let extra = match c.extra {
        None => None,
        Some(e) => {
            let mut calls = Calls::default();
            for f in e.calls_pending {
                let f: Frame =
                    prost::Message::decode(&f.0[..]).map_err(|e| format!("a queued call: {e}"))?;
                calls.pending_bytes += f.payload.len() + 64; // as `upstream` counts it
                calls.pending.push_back(f);
            }
            if e.calls_recent.len() != calls.recent.len() || e.calls_next >= calls.recent.len() {
                return Err("recent call seqids: wrong size".into());
            }
            calls.recent.copy_from_slice(&e.calls_recent);
            calls.next = e.calls_next;
            let unacked = e
                .unacked
                .into_iter()
                .map(|(seq, tries, due, p)| {
                    Ok(Unacked {
                        seq,
                        tries,
                        due,
                        push: load_pending(p)?,
                    })
                })
                .collect::<Result<VecDeque<_>, String>>()?;
            Some(Box::new(Extra {
                session: e.session,
                calls,
                acks: Acks {
                    unacked,
                    rt_at: e.rt_at,
                    durable_until: e.durable_until,
                },
                frag: None, // set below, from the saved connection's own field
            }))
        }
    };
    let out = (!c.out.0.is_empty()).then(|| {
        let mut o = Box::<Output>::default();
        o.buf = c.out.0;
        o
    });
    let frag = c.frag.map(|(opcode, buf, valid)| {
        Box::new(Fragmented {
            opcode: opcode & !FRAG_COMPRESSED,
            compressed: opcode & FRAG_COMPRESSED != 0,
            buf: buf.0,
            utf8: crate::ws::Utf8State { valid },
        })
    });
    let registered = c.flags & flag::REGISTERED != 0;
    let mut conn = Conn {
        sock,
        role: c.role,
        state: c.state,
        flags: c.flags,
        drained: false, // the new process reads what came meanwhile
        errors: c.errors,
        close_reason: c.close_reason,
        app: if registered || c.device.is_some() {
            app(c.app)?
        } else {
            c.app
        },
        dev_tag: 0, // the registry's, set as the connection is registered again
        inbuf: InBuf::from_vec(c.inbuf.0),
        out,
        last_read: c.last_read,
        deadline: c.deadline,
        hs_armed: false, // this process's wheel: entries are put on it anew
        seq: c.seq,
        connected_at: c.connected_at,
        device: c.device.map(Into::into),
        user: c.user.map(Into::into),
        ws: c.ws,
        extra,
    };
    if let Some(f) = frag {
        conn.set_frag(f);
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::Saved;

    /// A small state with one connection (also the fuzz target's seed).
    const SEED: &str = include_str!("../../fuzz/seeds/handoff_state/one_conn.json");

    #[test]
    fn a_state_is_checked_before_anything_is_built_from_it() {
        let s = Saved::decode(SEED.as_bytes()).unwrap();
        s.check(3).unwrap();
        assert_eq!((s.pid(), s.connections()), (100, 1));
        // Too few descriptors for what it names.
        assert!(s.check(2).is_err());
        let bad = |from: &str, to: &str| {
            let t = SEED.replacen(from, to, 1);
            assert_ne!(t, SEED, "{from} not in the seed");
            Saved::decode(t.as_bytes()).and_then(|s| s.check(3))
        };
        // The seed is version 1 (before permessage-deflate), read as it is; a version this
        // binary does not know is refused, not misread.
        assert!(bad("\"version\": 1", "\"version\": 2").is_ok());
        assert!(bad("\"version\": 1", "\"version\": 3").is_ok());
        assert!(bad("\"version\": 1", "\"version\": 4").is_ok());
        assert!(bad("\"version\": 1", "\"version\": 5").is_err());
        // A TLS connection's record state: checked (suite, secret lengths, the partial
        // record, a unix socket) before anything is built.
        let tls = |suite: u16, secret: &str, rx: &str| {
            format!(
                "\"tls\": {{\"suite\": {suite}, \"rx_keys\": \"{secret}\", \"rx_seq\": 3, \"tx_keys\": \"{secret}\", \"tx_seq\": 2, \"rx\": \"{rx}\", \"tx\": \"\", \"plain\": \"\", \"closed\": false}}, \"extra\""
            )
        };
        // 60 bytes: an AES-128-GCM suite's secret (32), key (16) and IV (12).
        let b32 =
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(bad("\"extra\"", &tls(0x1301, b32, "")).is_ok());
        assert!(
            bad("\"extra\"", &tls(0x1302, b32, "")).is_err(),
            "92 bytes of keys"
        );
        assert!(
            bad("\"extra\"", &tls(0x1304, b32, "")).is_err(),
            "no such suite"
        );
        let long = "A".repeat(4 * 12000);
        assert!(bad("\"extra\"", &tls(0x1301, b32, &long)).is_err());
        // A descriptor named twice; a slot on the free list and taken; an app out of range.
        assert!(bad("\"fd\": 2", "\"fd\": 1").is_err());
        assert!(bad("\"free\": [0]", "\"free\": [1]").is_err());
        assert!(bad("\"app\": 0", "\"app\": 3").is_err());
        assert!(bad("\"origins\": [\"n1\"]", "\"origins\": [\"n2\"]").is_err());
        assert!(bad("\"calls_next\": 0", "\"calls_next\": 32").is_err());
        assert!(Saved::decode(b"{}").is_err());
    }
}
