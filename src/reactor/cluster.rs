//! The reactor's side of the cluster (docs/CLUSTER.md). Everything here is non-blocking:
//! Redis is behind the link's threads, reached with `try_send`, heard from over a channel.
//!
//! - Routes: each connection admitted or gone is one route write, collected over a turn and
//!   handed to the link as one pipeline; all of them again when Redis comes back.
//! - An API command that concerns other nodes (a push, an online query, a kick, a session
//!   update, rooms, status) is also sent, as the request itself, to each live node it may
//!   concern — a conn id's own node only, otherwise every live node, once per node whatever
//!   the number of recipients. Each runs it for its own connections and answers; this node
//!   runs it too, then adds the parts up (`cluster::merge`). Nodes that do not answer within
//!   `rpc_timeout_ms` are named in `unreached`.
//! - Another node's request runs here like an API request whose connection is a pseudo-ref
//!   (`REMOTE_BASE` and up), so its answer — even one that waits for ACKs — comes back
//!   through `api_answer` and is published to that node.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::conn::flag;
use super::Reactor;
use crate::api::{ApiRequest, Command, Target};
use crate::cluster::link::{FromLink, Link, Load, RouteOp, ToLink};
use crate::cluster::{self, merge, split_response};
use crate::metrics::{add, inc};
use crate::proto::{node_msg, NodeMsg, NodeRequest};
use crate::slab::Slab;
use crate::timer::{TimerKey, TimerKind};
use crate::types::{unix_ms, ConnId, Ref};
use crate::worker::Job;

/// Pseudo-refs of other nodes' requests start here, far above any connection's slot.
pub(super) const REMOTE_BASE: u32 = 1 << 31;
/// Route reads for an offer (`offer_elsewhere`) have this bit in their id; a gather's id
/// (slot << 32 | generation) never does.
const OFFER_BIT: u64 = 1 << 63;
/// Node messages taken from the link per turn (the rest wait for the next turn).
const MESSAGES_PER_TURN: usize = 1024;
/// Routes per message to the link when all of them are written again.
const RESYNC_CHUNK: usize = 4096;
/// Status values read again at a rejoin, at most (those polls here wait for).
const STATUS_READS_MAX: usize = 10_000;

pub(super) struct Cluster {
    pub link: Link,
    /// Route writes of this turn.
    routes: Vec<RouteOp>,
    /// API calls waiting for other nodes' parts; a part's id is its slot and generation.
    gathers: Slab<Gather>,
    /// The gather an API connection's next answer is this node's part of.
    gather_of: HashMap<Ref, (u32, u32)>,
    /// Other nodes' requests running here: who asked, their id, and a push's order.
    remote: Slab<(String, u64, u64)>,
    /// The epoch this node's routes are written under (in its heartbeat): a new one makes
    /// every route it wrote before stale at once.
    routes_epoch: u64,
    /// Route writes were dropped (Redis away): a new epoch when it is back.
    lost: bool,
    /// Room loads asked of the link and not yet done, what they read so far, and the
    /// membership changes made here since the first of them asked (replayed over what was
    /// read: it may be older than they are).
    /// (One mark per load: the log's length when it was asked.)
    marks: std::collections::VecDeque<usize>,
    loaded: Vec<(usize, String, Option<Vec<String>>)>,
    room_log: Vec<(usize, String, Vec<String>, bool)>,
    /// `room_log` overflowed: the rooms are read again after this load.
    log_full: bool,
    /// Loads out when Redis lost what it kept: their reads do not count.
    void_loads: usize,
    /// Room and status writes that could not go (Redis away, a full queue): written in order
    /// when they can (later ones queue behind them), and their bytes.
    /// (With when each was kept: a status value's TTL runs meanwhile.)
    unkept: std::collections::VecDeque<(ToLink, u64)>,
    unkept_bytes: usize,
    /// A rooms load waits for `unkept` to be written first (read before, it would miss them).
    load_wanted: bool,
    /// What is to be written or read again at the end of this drain (`rejoin`).
    again: Again,
    /// Durable record writes of this turn (`durable`), and the token they go under.
    pub durable: Vec<crate::cluster::link::DurOp>,
    pub durable_token: u64,
    /// Requests whose answer waits for their records: (token, request slot, generation),
    /// oldest first.
    pub durable_waiting: std::collections::VecDeque<(u64, u32, u32)>,
    /// Record removals made while Redis was away, written when it is back.
    pub unsent: Vec<crate::cluster::link::DurOp>,
    /// Durable reads of connections admitted this turn (sent after the route writes).
    pub recover: Vec<ToLink>,
    /// App ids, shared by the records' writes.
    apps: Vec<std::sync::Arc<str>>,
    /// Devices whose routes are being read for an offer.
    offers: Slab<super::reliable::DeviceKey>,
    /// Connections reading their device's records for other nodes' offers: those nodes.
    pub offerers: HashMap<u64, Vec<String>>,
    /// Pushes another node took over while a request here waited for them: told their
    /// outcome (`NodeSettled`), or taken back, they count there.
    pub handed: HashMap<super::reliable::PushId, super::reliable::WaitRef>,
    /// Devices whose records are being adopted from a dead node.
    pub adopting: Slab<(String, super::reliable::DeviceKey)>,
    /// Adoptions whose read could not be made (Redis away): tried again when it is back.
    pub adopt_again: Vec<(String, super::reliable::DeviceKey)>,
    /// When `handed` was last purged (at most once a second).
    pub handed_purged: u64,
    /// When `adopt_again` is next tried.
    pub adopt_retry_at: u64,
    /// Copies waiting for their records' check before they are sent again or given up.
    pub checks: Slab<super::durable::Check>,
    /// Until then copies are not checked (a record write failed: some may be missing).
    pub unchecked_until: u64,
    /// A live upgrade under way in this (old) process: its marker and barrier.
    handover: Option<Handover>,
    /// A process started by a live upgrade: node messages up to the old process's marker
    /// (token) were the old one's; skipped until it comes (or until the reactor time given).
    skip_until: Option<(u64, u64)>,
    /// ... and its link's first `Up` finds Redis as the old process left it.
    handed_up: bool,
}

/// The old process's side of a live upgrade in cluster mode (`reactor::handoff`).
struct Handover {
    marker: u64,
    /// The marker came back on the channel: later messages are the new process's.
    seen: bool,
    /// A barrier sent to the link, and whether it came back.
    barrier: Option<(u64, bool)>,
    /// Messages after the marker: the new process's — unless the upgrade fails, and this
    /// process runs them after all (at most `AFTER_MAX`: past it, the upgrade fails).
    after: Vec<NodeMsg>,
    /// Why the handover cannot go on (the subscription broke before the marker came).
    broken: Option<&'static str>,
}

/// Messages kept after the marker while the old process is quiet, at most.
const AFTER_MAX: usize = 65_536;

/// What a live upgrade hands over of the cluster part (`reactor::handoff::Saved`).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SavedCluster {
    routes_epoch: u64,
    lost: bool,
    unchecked_until: u64,
    marker: u64,
    gathers: super::handoff::SavedSlab<Gather>,
    gather_of: Vec<(Ref, (u32, u32))>,
    remote: super::handoff::SavedSlab<(String, u64, u64)>,
    /// Push id → the waiting request's slot, generation and item.
    handed: Vec<(super::reliable::PushId, [u32; 3])>,
}

impl SavedCluster {
    pub fn routes_epoch(&self) -> u64 {
        self.routes_epoch
    }
}

/// What a node that was cut off, or whose Redis lost writes, does again.
#[derive(Default)]
struct Again {
    /// A new route epoch (writes were lost: removals must not leave routes that count).
    epoch: bool,
    routes: bool,
    durable: bool,
    /// Rooms and status values this node knows, written again.
    kept: bool,
    /// Rooms read again (and status values that polls here wait for).
    rooms: bool,
}

/// Room membership changes logged during a load, at most; past it, the load is followed by
/// another.
const ROOM_LOG_MAX: usize = 65_536;
/// Bytes of room and status writes kept while they cannot go, at most (more are dropped,
/// counted in `longlink_redis_dropped_total`).
const UNKEPT_BYTES: usize = 16 << 20;

#[derive(serde::Serialize, serde::Deserialize)]
struct Gather {
    api: Ref,
    ka: bool,
    /// This node's part, once it is there.
    local: Option<(u16, Value)>,
    /// Nodes whose part has not come.
    waiting: Vec<String>,
    parts: Vec<(u16, Value)>,
    unreached: Vec<String>,
    /// A command for one connection of another node: that node's part is the answer (this
    /// node's, which could only say "not here", stands only if that node was unreached).
    owner_only: bool,
    /// Waiting for the routes of its device or user before the request goes out (never
    /// when handed over: the upgrade waits for the link's replies).
    #[serde(skip)]
    pending: Option<Pending>,
    /// A split batch: the places in the batch of the items each node got (node "" for the
    /// nodes not named), and how many items the batch has (`cluster::place_results`).
    places: Vec<(String, Vec<u32>)>,
    items: usize,
}

struct Pending {
    msg: Vec<u8>,
    app: usize,
    name: String,
    user: bool,
}

impl Cluster {
    /// Whether gather `idx`/`gen` is waiting (its timer is live).
    pub fn gathers(&self, idx: u32, gen: u32) -> bool {
        self.gathers.get(idx, gen).is_some()
    }

    pub fn gathering(&self) -> usize {
        self.gathers.len()
    }

    /// Notes a device whose routes are read for an offer; returns the read's id.
    pub fn offer_lookup(&mut self, key: super::reliable::DeviceKey) -> u64 {
        let (i, g) = self.offers.insert(key);
        OFFER_BIT | gather_id(i, g)
    }

    /// The device of an offer's route read (taken out).
    pub fn offer_of(&mut self, id: u64) -> Option<super::reliable::DeviceKey> {
        let (i, g) = gather_ref(id & !OFFER_BIT);
        self.offers.remove(i, g)
    }

    /// App `i`'s id.
    pub fn app_id(&self, i: u16) -> std::sync::Arc<str> {
        self.apps[usize::from(i)].clone()
    }

    pub fn new(link: Link, apps: Vec<std::sync::Arc<str>>) -> Cluster {
        // Drawn before the link started (its first heartbeat announces it).
        let routes_epoch = link.view.routes_epoch();
        Cluster {
            routes_epoch,
            lost: false,
            marks: Default::default(),
            loaded: vec![],
            room_log: vec![],
            log_full: false,
            void_loads: 0,
            unkept: Default::default(),
            unkept_bytes: 0,
            load_wanted: false,
            again: Again::default(),
            link,
            routes: vec![],
            gathers: Slab::default(),
            gather_of: HashMap::new(),
            remote: Slab::default(),
            durable: vec![],
            durable_token: 0,
            durable_waiting: Default::default(),
            unsent: vec![],
            recover: vec![],
            apps,
            offers: Slab::default(),
            offerers: HashMap::new(),
            handed: HashMap::new(),
            adopting: Slab::default(),
            adopt_again: vec![],
            handed_purged: 0,
            adopt_retry_at: 0,
            checks: Slab::default(),
            unchecked_until: 0,
            handover: None,
            skip_until: None,
            handed_up: false,
        }
    }

    /// Why the link is not idle for a live upgrade, if it is not: replies still owed to this
    /// process, or writes kept for when Redis is back.
    fn busy(&self) -> Option<&'static str> {
        let owed = [
            (!self.routes.is_empty(), "route writes"),
            (
                !self.durable.is_empty() || !self.durable_waiting.is_empty(),
                "durable writes",
            ),
            (!self.recover.is_empty(), "durable reads"),
            (!self.checks.is_empty(), "record checks"),
            (
                !self.offers.is_empty() || !self.offerers.is_empty(),
                "offers",
            ),
            (!self.adopting.is_empty(), "adoptions"),
            (!self.marks.is_empty() || self.load_wanted, "room loads"),
            (
                self.gathers.iter_vals().any(|g| g.pending.is_some()),
                "route reads",
            ),
            (
                !self.unkept.is_empty() || !self.unsent.is_empty(),
                "writes kept while Redis was away",
            ),
            (
                !self.adopt_again.is_empty(),
                "adoptions kept while Redis was away",
            ),
        ];
        owed.into_iter().find(|(b, _)| *b).map(|(_, what)| what)
    }

    pub fn save(&self) -> SavedCluster {
        SavedCluster {
            routes_epoch: self.routes_epoch,
            // (Route writes the link dropped count as lost too.)
            lost: self.lost || self.link.view.routes_lost(),
            unchecked_until: self.unchecked_until,
            marker: self.handover.as_ref().map_or(0, |h| h.marker),
            gathers: super::handoff::SavedSlab::of(&self.gathers, |g| Gather {
                api: g.api,
                ka: g.ka,
                local: g.local.clone(),
                waiting: g.waiting.clone(),
                parts: g.parts.clone(),
                unreached: g.unreached.clone(),
                owner_only: g.owner_only,
                pending: None,
                places: g.places.clone(),
                items: g.items,
            }),
            gather_of: self.gather_of.iter().map(|(r, g)| (*r, *g)).collect(),
            remote: super::handoff::SavedSlab::of(&self.remote, |r| r.clone()),
            handed: self
                .handed
                .iter()
                .map(|(id, w)| (*id, [w.idx, w.gen, w.item]))
                .collect(),
        }
    }

    /// The new process: takes the old one's cluster part; node messages are skipped until
    /// its marker (for at most `until`, reactor time).
    pub fn restore(&mut self, s: SavedCluster, until: u64) -> Result<(), String> {
        self.routes_epoch = s.routes_epoch;
        self.link.view.set_routes_epoch(s.routes_epoch);
        self.lost = s.lost;
        self.unchecked_until = s.unchecked_until;
        self.handed_up = true;
        self.gathers = s.gathers.restore("gathers", |_, g| Ok(g))?;
        self.gather_of = s.gather_of.into_iter().collect();
        self.remote = s.remote.restore("remote requests", |_, r| Ok(r))?;
        self.handed = s
            .handed
            .into_iter()
            .map(|(id, [idx, gen, item])| (id, super::reliable::WaitRef { idx, gen, item }))
            .collect();
        self.skip_until = Some((s.marker, until));
        Ok(())
    }
}

/// A gather's id in node messages: its slot and generation.
fn gather_id(idx: u32, gen: u32) -> u64 {
    u64::from(idx) << 32 | u64::from(gen)
}

fn gather_ref(id: u64) -> (u32, u32) {
    ((id >> 32) as u32, id as u32)
}

impl Reactor {
    /// Connection `r`'s route (none before it has a device).
    fn route_op(&self, r: Ref, add: bool, epoch: u64) -> Option<RouteOp> {
        let c = self.conns.get(r.idx, r.gen)?;
        Some(RouteOp {
            add,
            app: self.cfg.apps[c.app as usize].id.as_str().into(),
            device: c.device.clone()?,
            user: c.user.clone(),
            conn: self.ids.format(r),
            epoch,
        })
    }

    /// A connection was admitted (`add`) or went: its route is written with this turn's.
    pub(super) fn route(&mut self, r: Ref, add: bool) {
        let Some(epoch) = self.cluster.as_ref().map(|c| c.routes_epoch) else {
            return;
        };
        let op = self.route_op(r, add, epoch);
        if let (Some(cl), Some(op)) = (self.cluster.as_mut(), op) {
            cl.routes.push(op);
        }
    }

    /// End of a turn: the turn's route writes go to the link as one pipeline.
    pub(super) fn flush_routes(&mut self) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if cl.routes.is_empty() {
            return;
        }
        if !cl.link.view.writable() {
            // Written again, all of them, when Redis is back, under a new epoch: removals
            // lost meanwhile must not leave routes that count.
            cl.routes.clear();
            cl.lost = true;
            return;
        }
        let ops = std::mem::take(&mut cl.routes);
        cl.link.send(ToLink::Routes(ops), &self.metrics);
    }

    /// What the link said since the last turn: Redis back (write every route again), node
    /// messages (requests to run, answers to add up).
    pub(super) fn drain_cluster(&mut self) {
        for _ in 0..MESSAGES_PER_TURN {
            let Some(cl) = self.cluster.as_mut() else {
                return;
            };
            let m = match cl.link.rx.try_recv() {
                Ok(m) => m,
                Err(_) => {
                    self.rejoin();
                    return;
                }
            };
            match m {
                FromLink::Up if std::mem::take(&mut cl.handed_up) => {
                    // The first connection of a process that took the node over: Redis holds
                    // what the old process wrote under this epoch (it waited for its writes),
                    // so only writes it lost are made again.
                    let a = &mut cl.again;
                    a.epoch |= std::mem::take(&mut cl.lost) | cl.link.view.take_routes_lost();
                    if a.epoch {
                        (a.routes, a.durable, a.rooms) = (true, true, true);
                    }
                }
                FromLink::Up => {
                    // Route writes lost here (`flush_routes`) or in the link: a new epoch
                    // makes whatever they would have changed stale. Rooms are read (a node
                    // that starts learns those bound before it came; one that was cut off,
                    // the changes it missed).
                    // An epoch minted longer ago than a reader's allowance: its routes may
                    // have been removed as a dead node's while Redis was away (or before
                    // this node could hear), so they go under a new one.
                    let minted = cl.routes_epoch >> 10;
                    let old = unix_ms().saturating_sub(minted) > self.cfg.cluster.node_ttl_ms;
                    let a = &mut cl.again;
                    a.epoch |= std::mem::take(&mut cl.lost) | cl.link.view.take_routes_lost();
                    a.epoch |= old;
                    a.routes = true;
                    a.durable = true;
                    a.rooms = true;
                    self.adopt_again();
                }
                FromLink::Emptied => {
                    // Loads out now may read what Redis has lost: they count as failed.
                    cl.void_loads = cl.marks.len();
                    cl.again = Again {
                        epoch: true,
                        routes: true,
                        durable: true,
                        kept: true,
                        rooms: true,
                    }
                }
                FromLink::Rejoined { routes } => {
                    if let Some(h) = cl.handover.as_mut().filter(|h| !h.seen) {
                        // The marker may have gone by while this process was not hearing.
                        h.broken = Some("the subscription broke before the marker came back");
                    }
                    if cl.skip_until.take().is_some() {
                        // Subscribed again before the old process's marker came: it may
                        // have been missed; messages count from here (rooms are read again).
                        log::warn!(
                            "upgrade: the subscription broke before the old process's marker"
                        );
                    }
                    cl.again.rooms = true;
                    cl.again.epoch |= routes;
                    cl.again.routes |= routes;
                }
                FromLink::Unsent(m) => self.unkept(m),
                FromLink::Written { token, ok } => self.durable_written(token, ok),
                FromLink::Checked { id, found } => self.checked(id, found),
                FromLink::Orphans { node, devices } => self.adopt(node, devices),
                FromLink::Records { conn, records } => self.durable_recovered(conn, records),
                FromLink::Msg(m) => {
                    if let Some(m) = self.keep_message(m) {
                        self.node_message(m)
                    }
                }
                FromLink::Unheard { node, id } => self.gather_unheard(id, &node),
                FromLink::Looked { id, fields } if id & OFFER_BIT != 0 => {
                    self.offer_read(id, fields)
                }
                FromLink::Looked { id, fields } => self.routes_read(id, fields),
                FromLink::Status { key, value } => self.status_read(key, value),
                FromLink::Rooms(rooms, load) => self.rooms_read(rooms, load),
                FromLink::Barrier(t) => self.barrier_back(t),
            }
        }
        self.rejoin();
        self.more_done = true; // more may be waiting: come back without sleeping
    }

    /// A live upgrade splits this node's channel at the old process's marker: the old one
    /// handles what comes before it, the new one what comes after. False: not this
    /// process's message (or the marker itself).
    fn keep_message(&mut self, m: NodeMsg) -> Option<NodeMsg> {
        let Some(cl) = self.cluster.as_mut() else {
            return Some(m);
        };
        let marker = match &m.body {
            Some(node_msg::Body::Marker(k)) if m.from == self.cfg.node_id => Some(k.token),
            _ => None,
        };
        if let Some((token, until)) = cl.skip_until {
            if marker == Some(token) {
                cl.skip_until = None;
                log::info!("upgrade: the old process's share of the node channel ends here");
                return None;
            }
            if self.now < until {
                return None;
            }
            cl.skip_until = None;
            log::warn!("upgrade: no marker from the old process in 5 s: taking every message");
        }
        if let Some(h) = cl.handover.as_mut() {
            if marker == Some(h.marker) {
                h.seen = true;
                return None;
            }
            if h.seen {
                h.after.push(m); // the new process's, unless the upgrade fails
                if h.after.len() > AFTER_MAX {
                    h.broken = Some("too many node messages came while quiet");
                }
                return None;
            }
        }
        // (A marker of an upgrade given up, or of another process: nobody's.)
        marker.is_none().then_some(m)
    }

    /// A live upgrade begins (the old process): the marker goes on this node's channel,
    /// where the new process listens already. Err: the cluster cannot be handed over now.
    pub(super) fn handover_begin(&mut self) -> Result<(), String> {
        let Some(cl) = self.cluster.as_mut() else {
            return Ok(());
        };
        if !cl.link.view.up() || !cl.link.view.hearing() {
            return Err("Redis is away: the node's channel cannot be handed over".into());
        }
        if let Some(what) = cl.busy().filter(|w| w.contains("Redis was away")) {
            return Err(format!("{what} are not written yet"));
        }
        let token = super::boot_epoch() | 1;
        let msg = cluster::marker(&self.cfg.node_id, token, unix_ms());
        let send = ToLink::Send {
            node: self.cfg.node_id.clone(),
            request: None,
            msg,
        };
        if !cl.link.send(send, &self.metrics) {
            return Err("the link's queue is full".into());
        }
        cl.handover = Some(Handover {
            marker: token,
            seen: false,
            barrier: None,
            after: vec![],
            broken: None,
        });
        Ok(())
    }

    /// Whether the cluster part is still: the marker came back, and a barrier sent after
    /// everything else was still came back with nothing owed. Sends the barrier when due.
    pub(super) fn handover_still(&mut self) -> bool {
        let Some(cl) = self.cluster.as_mut() else {
            return true;
        };
        let Some(h) = cl.handover.as_mut() else {
            return false;
        };
        if !h.seen {
            return false;
        }
        match h.barrier {
            None => {
                let t = super::boot_epoch();
                if cl.link.send(ToLink::Barrier(t), &self.metrics) {
                    h.barrier = Some((t, false));
                } // else: tried again next pass
                false
            }
            Some((_, false)) => false,
            Some((_, true)) => {
                h.barrier = None; // another round if something is still owed
                cl.busy().is_none()
            }
        }
    }

    /// Why the handover cannot go on, if it cannot.
    pub(super) fn handover_broken(&self) -> Option<&'static str> {
        self.cluster.as_ref()?.handover.as_ref()?.broken
    }

    /// The old process, handed over: waits (at most `within`) until its link has sent
    /// everything queued — answers and messages to other nodes the last turns made.
    pub(super) fn flush_link(&mut self, within: std::time::Duration) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let t = super::boot_epoch();
        if !cl.link.send(ToLink::Barrier(t), &self.metrics) {
            return;
        }
        let end = std::time::Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            match cl.link.rx.recv_timeout(left) {
                Ok(FromLink::Barrier(b)) if b == t => return,
                Ok(_) => {} // replies to this process: it is leaving
                Err(_) => {
                    log::warn!("upgrade: the old link did not flush in {within:?}");
                    return;
                }
            }
        }
    }

    /// What the cluster part still waits for, if anything (for the failure message).
    pub(super) fn handover_owed(&self) -> Option<&'static str> {
        let cl = self.cluster.as_ref()?;
        if cl.handover.as_ref().is_some_and(|h| !h.seen) {
            return Some("the marker's return on the node channel");
        }
        cl.busy()
    }

    /// A live upgrade ended: `taken` — the node is the new process's now (this link must
    /// not remove its entry when it ends); otherwise this process goes on, taking every
    /// message again.
    pub(super) fn handover_end(&mut self, taken: bool) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let after = cl.handover.take().map(|h| h.after).unwrap_or_default();
        if taken {
            cl.link.detach();
            return;
        }
        // Given up: what came after the marker is this process's after all.
        for m in after {
            self.node_message(m);
        }
    }

    fn barrier_back(&mut self, t: u64) {
        if let Some(h) = self.cluster.as_mut().and_then(|c| c.handover.as_mut()) {
            if h.barrier == Some((t, false)) {
                h.barrier = Some((t, true));
            }
        }
    }

    /// Writes and reads again what `again` says, once per drain however many reasons came.
    fn rejoin(&mut self) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let a = std::mem::take(&mut cl.again);
        if a.epoch {
            cl.routes_epoch = cluster::next_routes_epoch(cl.routes_epoch, unix_ms());
            cl.link.view.set_routes_epoch(cl.routes_epoch);
            // This turn's pending adds go after the rewrite: under the new epoch too, or
            // they would overwrite it with a stale one.
            let epoch = cl.routes_epoch;
            cl.routes.iter_mut().for_each(|op| op.epoch = epoch);
        }
        if a.routes {
            self.resync_routes();
        }
        if a.durable && self.durable_resync() > 0 {
            // (Their records were missing a while: never written, or lost by Redis.)
            self.hold_off_checks();
        }
        if a.kept {
            self.rewrite_kept();
        }
        if a.rooms {
            self.reload_rooms();
        }
    }

    /// For `cluster::route_nodes`: when the node table was read, and how young an entry of
    /// a node absent from it must be to be kept (the table may be a heartbeat late). A
    /// table older than two heartbeats (the link is stalled) removes none.
    pub(super) fn route_age(&self) -> (u64, u64) {
        let c = &self.cfg.cluster;
        let at = self
            .cluster
            .as_ref()
            .map_or(0, |cl| cl.link.view.nodes_at());
        let young = if unix_ms().saturating_sub(at) > 2 * c.heartbeat_ms {
            u64::MAX / 2
        } else {
            c.node_ttl_ms + c.heartbeat_ms
        };
        (at, young)
    }

    /// A room or status write that could not go: kept for Redis's return (bounded).
    pub(super) fn unkept(&mut self, m: ToLink) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let b = m.bytes();
        if cl.unkept_bytes + b <= UNKEPT_BYTES {
            cl.unkept_bytes += b;
            cl.unkept.push_back((m, self.now));
        } else {
            inc(&self.metrics.redis_dropped);
        }
    }

    /// A room or status write to keep in Redis: after those still waiting, in order.
    fn keep_in_redis(&mut self, m: ToLink) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if !cl.link.view.writable() || !cl.unkept.is_empty() {
            return self.unkept(m);
        }
        if let Err(m) = cl.link.send_or_keep(m, &self.metrics) {
            self.unkept(m);
        }
    }

    /// End of a turn: room and status writes kept meanwhile go, in order, as far as the
    /// link takes them; then a rooms load that waited for them.
    pub(super) fn flush_unkept(&mut self) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if !cl.link.view.writable() {
            return;
        }
        while let Some((mut m, at)) = cl.unkept.pop_front() {
            let b = m.bytes();
            if let ToLink::StatusSet { ttl_ms, .. } = &mut m {
                // What is left of its TTL. (None left, it is still written, expiring at
                // once: it must replace an older value Redis may hold for the key.)
                *ttl_ms = ttl_ms.saturating_sub(self.now.saturating_sub(at)).max(1);
            }
            match cl.link.send_or_keep(m, &self.metrics) {
                Ok(()) => cl.unkept_bytes -= b,
                Err(m) => {
                    cl.unkept.push_front((m, self.now)); // (its TTL counted to now)
                    return;
                }
            }
        }
        if std::mem::take(&mut cl.load_wanted) {
            let apps = self.cfg.apps.iter().map(|a| a.id.as_str().into()).collect();
            if cl.link.send(ToLink::RoomsLoad { apps }, &self.metrics) {
                cl.marks.push_back(cl.room_log.len());
            } else {
                cl.load_wanted = true; // the next turn, then
            }
        }
    }

    /// Reads the rooms kept in Redis (once the writes kept meanwhile are written), and asks
    /// Redis for the status values that polls here wait for (set elsewhere meanwhile?).
    fn reload_rooms(&mut self) {
        let waited = self.status.waited_keys(STATUS_READS_MAX);
        if let Some(cl) = self.cluster.as_mut() {
            cl.load_wanted = true;
        }
        self.flush_unkept();
        for key in waited {
            if self.status_current(&key) {
                continue;
            }
            self.status_wanted(&key);
        }
    }

    /// A chunk of rooms read, or a load done: what was read replaces this node's
    /// membership (rooms gone from Redis leave; a room that could not be read stays as it
    /// is), then the changes made here since the load was asked are made again over it.
    fn rooms_read(&mut self, rooms: Vec<(String, String, Option<Vec<String>>)>, load: Load) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        for (app, room, devices) in rooms {
            if let Some(a) = self.cfg.app_index(&app) {
                cl.loaded.push((a, room, devices));
            }
        }
        let n = match load {
            Load::More => return,
            Load::Done(n) | Load::Failed(n) => n,
        };
        let void = n.min(cl.void_loads);
        cl.void_loads -= void;
        let load = if void > 0 { Load::Failed(n) } else { load };
        // The loads this answers (one read served them all): the changes logged since the
        // first of them was asked may be newer than the read.
        let start = cl
            .marks
            .front()
            .copied()
            .unwrap_or(0)
            .min(cl.room_log.len());
        for _ in 0..n {
            cl.marks.pop_front();
        }
        let loaded = std::mem::take(&mut cl.loaded);
        let log = cl.room_log[start..].to_vec();
        if cl.marks.is_empty() {
            cl.room_log.clear();
            if std::mem::take(&mut cl.log_full) {
                cl.again.rooms = true;
            }
        }
        if matches!(load, Load::Failed(_)) {
            // Read again at the next `Up` or rejoin (Redis away, or refusing the index).
            log::warn!("cluster: the rooms could not be read from redis");
            return;
        }
        inc(&self.metrics.cluster_room_loads);
        type Want<'a> = HashMap<&'a str, Option<(&'a [String], HashSet<&'a str>)>>;
        let mut want: Vec<Want> = vec![HashMap::new(); self.cfg.apps.len()];
        for (a, room, devices) in &loaded {
            let read = devices
                .as_deref()
                .map(|d| (d, d.iter().map(String::as_str).collect::<HashSet<_>>()));
            want[*a].insert(room.as_str(), read);
        }
        for (a, want) in want.iter().enumerate() {
            for (room, members) in self.registry.rooms_of(a) {
                let gone: Vec<String> = match want.get(room.as_str()) {
                    Some(None) => continue, // could not be read: as it is
                    Some(Some((_, keep))) => members
                        .into_iter()
                        .filter(|m| !keep.contains(m.as_str()))
                        .collect(),
                    None => members, // not in Redis
                };
                if !gone.is_empty() {
                    self.registry.room_remove(a, &room, &gone);
                }
            }
            for (room, read) in want {
                if let Some((devices, _)) = read {
                    self.registry.room_add(a, room, devices);
                }
            }
        }
        for (a, room, devices, add) in &log {
            if *add {
                self.registry.room_add(*a, room, devices);
            } else {
                self.registry.room_remove(*a, room, devices);
            }
        }
        log::info!("cluster: rooms read from redis ({} rooms)", loaded.len());
    }

    /// A membership change made here: logged while a load is out (`rooms_read`).
    pub(super) fn room_changed(&mut self, app: usize, room: &str, devices: &[String], add: bool) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if cl.marks.is_empty() {
            return; // no load out: a load asked later reads it (written before it)
        }
        if cl.room_log.len() < ROOM_LOG_MAX {
            cl.room_log
                .push((app, room.to_string(), devices.to_vec(), add));
        } else {
            cl.log_full = true;
        }
    }

    /// Redis lost what it kept: the rooms and status values this node knows are written
    /// again (every node does: the union of their memberships is what Redis had, or more).
    fn rewrite_kept(&mut self) {
        let now = self.now;
        let values = self.status.values();
        if self.cluster.is_none() {
            return;
        }
        // What does not fit in the link's queue waits, in order (`keep_in_redis`), up to
        // its bound; past that it is dropped (counted in `longlink_redis_dropped_total`).
        let mut sets = vec![];
        for (a, app) in self.cfg.apps.iter().enumerate() {
            let id: std::sync::Arc<str> = app.id.as_str().into();
            for (room, members) in self.registry.rooms_of(a) {
                for chunk in members.chunks(RESYNC_CHUNK) {
                    sets.push(ToLink::RoomSet {
                        app: id.clone(),
                        room: room.clone(),
                        devices: chunk.to_vec(),
                        add: true,
                    });
                }
            }
        }
        for (key, value, expires) in values.into_iter().filter(|v| v.2 > now) {
            sets.push(ToLink::StatusSet {
                key: key.to_string(),
                value,
                ttl_ms: expires - now,
            });
        }
        let total = sets.len();
        let dropped = self
            .metrics
            .redis_dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        for m in sets {
            self.keep_in_redis(m);
        }
        let lost = self
            .metrics
            .redis_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            - dropped;
        log::info!("cluster: writing {total} room chunks and status values again ({lost} dropped)");
    }

    fn resync_routes(&mut self) {
        let epoch = self.cluster.as_ref().map_or(0, |c| c.routes_epoch);
        let mut ops = vec![];
        for idx in 0..self.conns.slots() as u32 {
            let Some((c, gen)) = self.conns.by_index(idx) else {
                continue;
            };
            if c.flags & flag::REGISTERED != 0 {
                ops.extend(self.route_op(Ref { idx, gen }, true, epoch));
            }
        }
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        // (This turn's pending writes still go after these: removals among them matter.)
        log::info!("cluster: writing {} local routes", ops.len());
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(RESYNC_CHUNK));
            cl.link.send(ToLink::Routes(ops), &self.metrics);
            ops = rest;
        }
    }

    fn node_message(&mut self, m: NodeMsg) {
        match m.body {
            Some(node_msg::Body::Request(req)) => {
                self.remote_request(m.from, m.id, m.deadline_ms, req)
            }
            Some(node_msg::Body::Answer(a)) => {
                let body = serde_json::from_slice::<Value>(&a.body).unwrap_or_else(|_| {
                    inc(&self.metrics.cluster_bad_messages);
                    serde_json::json!({})
                });
                self.gather_part(m.id, &m.from, a.status as u16, body);
            }
            Some(node_msg::Body::Settled(t)) => {
                self.settled_here(&t.app, &t.device, &t.ids, t.acked, &t.report)
            }
            Some(node_msg::Body::Take(t)) => {
                self.taken(&m.from, &t.app, &t.device, &t.ids, &t.claims, t.offer)
            }
            // A live upgrade's marker (`handoff`) is taken out before this.
            Some(node_msg::Body::Marker(_)) | None => {} // `decode` lets no None through
        }
    }

    // ---- this node's API calls, with the other nodes' parts -----------------------------

    /// Called for an API command before it runs here: sends it to the other nodes it may
    /// concern and starts gathering their parts (this node's part is caught in
    /// `api_answer`). Nothing to do alone, or for a command only this node can answer.
    pub(super) fn fan_out_command(
        &mut self,
        r: Ref,
        ka: bool,
        cmd: &Command,
        fwd: cluster::Forward,
    ) {
        if matches!(cmd, Command::Drain { .. } | Command::Stats { .. }) {
            return; // this node's own (stats: each node is asked for its own)
        }
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let view = cl.link.view.clone();
        // Kept in Redis too: for nodes that start later or were cut off (they read the
        // rooms), and nodes without the status value (a poll there reads it). Redis away:
        // written when it is back.
        let keep = match cmd {
            Command::RoomMembers {
                app,
                room,
                devices,
                add,
            } => Some(ToLink::RoomSet {
                app: self.cfg.apps[*app].id.as_str().into(),
                room: room.clone(),
                devices: devices.clone(),
                add: *add,
            }),
            Command::SetStatus { key, value, ttl_ms } => Some(ToLink::StatusSet {
                key: key.clone(),
                value: value.clone(),
                ttl_ms: *ttl_ms,
            }),
            _ => None,
        };
        if let Some(m) = keep {
            self.keep_in_redis(m);
        }
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let own = |id: &ConnId| id.node == self.cfg.node_id;
        // A conn id names its node: that node alone. A device or a user: the nodes its
        // routes name. Anything else: every live node.
        let one = match cmd {
            Command::Push {
                pushes,
                batch: false,
                ..
            } if pushes.len() == 1 => Some(&pushes[0].target),
            Command::Kick { target, .. } | Command::Online(target) => Some(target),
            _ => None,
        };
        let conn = match (cmd, one) {
            (Command::SetSession { conn, .. }, _) => Some(conn),
            (_, Some(Target::Conn(id))) => Some(id),
            _ => None,
        };
        let lookup = match one {
            Some(Target::Device(app, d)) => Some((*app, d.clone(), false)),
            Some(Target::User(app, u)) => Some((*app, u.clone(), true)),
            _ => None,
        };
        let nodes: Vec<String> = match conn {
            Some(id) if own(id) => return,
            Some(id) if view.is_live(&id.node) => vec![id.node.clone()],
            Some(_) => {
                // A node that is not live (dead, or never was): its connections are offline.
                inc(&self.metrics.unknown_node);
                return;
            }
            None => view.others(),
        };
        if nodes.is_empty() {
            return;
        }
        let (send, unreached) = if view.up() {
            (nodes, vec![])
        } else {
            (vec![], nodes) // Redis is down: nobody else can be asked
        };
        let lookup = lookup.filter(|_| !send.is_empty());
        // A push that waits for ACKs is answered after its `wait_ms`: the other nodes' parts
        // come as late.
        let wait = match cmd {
            Command::Push { wait_ms, .. } => *wait_ms,
            _ => 0,
        };
        let mut patience = self.cfg.cluster.rpc_timeout_ms + wait;
        let (idx, gen) = cl.gathers.insert(Gather {
            api: r,
            ka,
            local: None,
            waiting: vec![],
            parts: vec![],
            unreached,
            owner_only: conn.is_some(),
            pending: None,
            places: vec![],
            items: match cmd {
                Command::Push { pushes, .. } => pushes.len(),
                _ => 0,
            },
        });
        let id = gather_id(idx, gen);
        // A lookup first gets one more rpc_timeout_ms; the request's deadline is the same
        // as this node's patience, so a node it reaches later drops it.
        if lookup.is_some() {
            patience += self.cfg.cluster.rpc_timeout_ms;
        }
        let now = unix_ms();
        // The same bytes for every node (a split batch: one for each node it names, one for
        // the others, if they have anything to run).
        let encode = |req| cluster::request(&self.cfg.node_id, id, now, now + patience, req);
        let mut places = vec![];
        let mut named = vec![];
        for (node, req) in fwd.named {
            places.push((node.clone(), req.items.clone()));
            named.push((node, encode(req)));
        }
        if let Some(req) = &fwd.all {
            if !req.items.is_empty() {
                places.push((String::new(), req.items.clone()));
            }
        }
        let msg = fwd.all.map(encode);
        cl.gather_of.insert(r, (idx, gen));
        let k = TimerKey {
            idx,
            gen,
            kind: TimerKind::RpcExpire,
        };
        match lookup {
            Some((app, name, user)) => {
                // Its routes first: the request goes to the nodes they name (`routes_read`).
                let ask = ToLink::Lookup {
                    id,
                    app: self.cfg.apps[app].id.as_str().into(),
                    name: name.clone(),
                    user,
                };
                if let Some(g) = cl.gathers.get_mut(idx, gen) {
                    g.pending = Some(Pending {
                        msg: msg.unwrap_or_default(), // (one push: never split)
                        app,
                        name,
                        user,
                    });
                }
                if !cl.link.send(ask, &self.metrics) {
                    self.routes_read(id, None);
                }
                self.wheel.insert(self.now + patience, k);
            }
            None => {
                let to: Vec<(String, Vec<u8>)> = send
                    .into_iter()
                    .filter_map(|node| {
                        let m = match named.iter().position(|n| n.0 == node) {
                            Some(i) => named.swap_remove(i).1,
                            None => msg.clone()?,
                        };
                        Some((node, m))
                    })
                    .collect();
                if let Some(g) = cl.gathers.get_mut(idx, gen) {
                    g.places = places;
                }
                if !to.is_empty() {
                    self.send_requests(idx, gen, to);
                    self.wheel.insert(self.now + patience, k);
                } else {
                    self.gather_done(idx, gen);
                }
            }
        }
    }

    /// Sends request `msg` of gather `idx`/`gen` to `nodes`; they are awaited.
    fn send_request(&mut self, idx: u32, gen: u32, msg: Vec<u8>, nodes: Vec<String>) {
        let to = nodes.into_iter().map(|n| (n, msg.clone())).collect();
        self.send_requests(idx, gen, to);
    }

    /// Sends each node its request of gather `idx`/`gen`; they are awaited.
    fn send_requests(&mut self, idx: u32, gen: u32, to: Vec<(String, Vec<u8>)>) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let id = gather_id(idx, gen);
        let mut waiting = vec![];
        let mut failed = vec![];
        for (node, msg) in to {
            let send = ToLink::Send {
                node: node.clone(),
                request: Some(id),
                msg,
            };
            if cl.link.send(send, &self.metrics) {
                waiting.push(node);
            } else {
                failed.push(node);
            }
        }
        add(&self.metrics.rpc_sent, waiting.len() as u64);
        if let Some(g) = cl.gathers.get_mut(idx, gen) {
            g.waiting = waiting;
            g.unreached.extend(failed);
        }
    }

    /// A device's or user's routes were read (None: the read failed): the request goes to
    /// the live nodes they name — all live nodes when they could not be read — and entries
    /// that no longer count are removed.
    fn routes_read(&mut self, id: u64, fields: Option<Vec<(String, String)>>) {
        let (idx, gen) = gather_ref(id);
        let (at, young) = self.route_age();
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let Some(p) = cl.gathers.get_mut(idx, gen).and_then(|g| g.pending.take()) else {
            return;
        };
        let view = cl.link.view.clone();
        let live = view.nodes();
        let nodes = match fields {
            Some(fields) => {
                let (nodes, stale) =
                    cluster::route_nodes(&fields, &live, &self.cfg.node_id, at, young);
                if !stale.is_empty() {
                    // Only the hash that was read: the sibling (the user's hash of a
                    // device's route, or the reverse) is cleaned when it is read.
                    add(&self.metrics.routes_stale, stale.len() as u64);
                    let unroute = ToLink::Unroute {
                        app: self.cfg.apps[p.app].id.as_str().into(),
                        name: p.name.clone(),
                        user: p.user,
                        entries: stale,
                    };
                    cl.link.send(unroute, &self.metrics);
                }
                nodes
            }
            None => view.others(),
        };
        self.send_request(idx, gen, p.msg, nodes);
        self.gather_done(idx, gen);
    }

    /// A poll here found no value for `key`: it is asked of Redis (a value set through a node
    /// while this one was not there), and the poll waits meanwhile as usual.
    pub(super) fn status_wanted(&mut self, key: &str) {
        let Some(cl) = self.cluster.as_ref() else {
            return;
        };
        if cl.link.view.writable() {
            let get = ToLink::StatusGet {
                key: key.to_string(),
            };
            cl.link.send(get, &self.metrics);
        }
    }

    /// Redis's answer for a status value missing here: kept here for what is left of its
    /// TTL (releasing the polls waiting for it), unless one was set here meanwhile.
    fn status_read(&mut self, key: String, value: Option<(Vec<u8>, u64)>) {
        let Some((value, ttl_ms)) = value else {
            return;
        };
        if self.status_current(&key) {
            return;
        }
        let _ = self.set_status(key, value.into(), ttl_ms);
    }

    /// An API answer about to go to connection `r`: if it is this node's part of a gathered
    /// call, it is kept (true) and the call answered once every part is in.
    pub(super) fn gather_local(&mut self, r: Ref, bytes: &[u8]) -> bool {
        let Some(cl) = self.cluster.as_mut() else {
            return false;
        };
        let Some((idx, gen)) = cl.gather_of.remove(&r) else {
            return false;
        };
        let Some(g) = cl.gathers.get_mut(idx, gen) else {
            return false;
        };
        let part = match split_response(bytes) {
            Some((s, b)) => (s, serde_json::from_slice(b).unwrap_or(Value::Null)),
            None => (500, Value::Null),
        };
        g.local = Some(part);
        self.gather_done(idx, gen);
        true
    }

    fn gather_part(&mut self, id: u64, from: &str, status: u16, body: Value) {
        let (idx, gen) = gather_ref(id);
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let Some(g) = cl.gathers.get_mut(idx, gen) else {
            return; // too late: already answered without it
        };
        let Some(i) = g.waiting.iter().position(|n| n == from) else {
            return;
        };
        g.waiting.swap_remove(i);
        if status >= 500 {
            // Busy, or failed there: its part did not happen.
            g.unreached.push(from.to_string());
            inc(&self.metrics.rpc_unreached);
        } else {
            let mut body = body;
            let places = g.places.iter().find(|p| p.0 == from);
            if let Some((_, places)) = places.or_else(|| g.places.iter().find(|p| p.0.is_empty())) {
                cluster::place_results(&mut body, places, g.items);
            }
            g.parts.push((status, body));
        }
        self.gather_done(idx, gen);
    }

    /// A request of ours reached nobody on `node`'s channel: unreached now, not at the
    /// timeout — as a node that answered it could not do its part.
    fn gather_unheard(&mut self, id: u64, node: &str) {
        self.gather_part(id, node, 503, Value::Null);
    }

    /// `rpc_timeout_ms` passed: the nodes still silent are unreached.
    pub(super) fn rpc_expired(&mut self, k: TimerKey) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let Some(g) = cl.gathers.get_mut(k.idx, k.gen) else {
            return;
        };
        add(&self.metrics.rpc_unreached, g.waiting.len() as u64);
        let late = std::mem::take(&mut g.waiting);
        g.unreached.extend(late);
        if g.pending.take().is_some() {
            // Its routes never came back: whoever might hold the device is unreached.
            g.unreached.extend(cl.link.view.others());
        }
        self.gather_done(k.idx, k.gen);
    }

    /// Answers a gathered call once this node's part is in and no other is awaited.
    fn gather_done(&mut self, idx: u32, gen: u32) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let ready = cl
            .gathers
            .get(idx, gen)
            .is_some_and(|g| g.local.is_some() && g.waiting.is_empty() && g.pending.is_none());
        if !ready {
            return;
        }
        let Some(g) = cl.gathers.remove(idx, gen) else {
            return;
        };
        let mut parts = Vec::with_capacity(g.parts.len() + 1);
        if !g.owner_only || g.parts.is_empty() {
            parts.extend(g.local);
        }
        parts.extend(g.parts);
        let mut unreached = g.unreached;
        unreached.sort();
        let (status, v) = merge(parts, &unreached);
        let bytes = crate::http::json(status, &v, g.ka);
        self.api_answer(g.api, g.ka, &bytes, true);
    }

    // ---- other nodes' requests, run here ------------------------------------------------

    fn remote_request(&mut self, from: String, id: u64, deadline_ms: u64, req: NodeRequest) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if unix_ms() > deadline_ms {
            // Its sender answered without us (e.g. it sat in a queue while Redis was away):
            // run now, a push would arrive after a reply that says it did not.
            inc(&self.metrics.cluster_late);
            return;
        }
        let (idx, gen) = cl.remote.insert((from, id, req.order));
        let r = Ref {
            idx: REMOTE_BASE + idx,
            gen,
        };
        inc(&self.metrics.rpc_served);
        let job = Job::Api {
            conn: r,
            req: ApiRequest {
                method: req.method,
                target: req.target,
                keep_alive: true,
                authorization: (!req.authorization.is_empty()).then_some(req.authorization),
                content_type: (!req.content_type.is_empty()).then_some(req.content_type),
                body: req.body.to_vec(),
                items: req.items,
            },
        };
        if self.jobs.try_send(job).is_err() {
            inc(&self.metrics.worker_busy);
            let b = crate::http::error(503, "busy: worker queue full", true);
            self.remote_answer(r, &b);
        } else {
            self.in_flight += 1;
            inc(&self.metrics.worker_jobs);
        }
    }

    /// Another node's request running as `r`: its sender and the push order it drew.
    pub(super) fn remote_origin(&self, r: Ref) -> Option<(String, u64)> {
        if r.idx < REMOTE_BASE {
            return None;
        }
        let cl = self.cluster.as_ref()?;
        let (from, _, order) = cl.remote.get(r.idx - REMOTE_BASE, r.gen)?;
        Some((from.clone(), *order))
    }

    /// Another node's request is answered: the answer goes back on its channel.
    pub(super) fn remote_answer(&mut self, r: Ref, bytes: &[u8]) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let Some((from, id, _)) = cl.remote.remove(r.idx - REMOTE_BASE, r.gen) else {
            return;
        };
        let (status, body) = split_response(bytes).unwrap_or((500, b"{}"));
        let msg = cluster::answer(&self.cfg.node_id, id, unix_ms(), status, body.to_vec());
        if cl.link.view.up() {
            cl.link.send(
                ToLink::Send {
                    node: from,
                    request: None,
                    msg,
                },
                &self.metrics,
            );
        }
    }
}
