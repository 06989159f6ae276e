//! Pushes from the internal API, delivered in slices: no single request — a batch of
//! thousands of broadcasts, a room of a million members — holds the reactor for more than
//! a slice. A request's pushes go out in order; each push's recipients are taken when its
//! turn comes (a snapshot, checked against the slab as it is walked). A loop turn makes at
//! most `[runtime] push_writes_per_turn` (4,096) connections newly dirty (each costs a
//! `write()` at the end of the turn, the dear part) and queues at most [`COPIES_PER_WRITE`] copies per connection it
//! made dirty (queueing is cheap, but a turn must stay short), and never more than
//! [`SLICE`]; between turns the reactor serves I/O and timers and flushes what was queued.
//! When a request reaches the new-writes bound it yields and the next request goes on over
//! the connections already dirty, so requests in progress advance in step over the same
//! window of connections and each connection still gets their copies in one write. Small requests (most) finish in the
//! turn they arrive and are answered at once; others are answered when their last push is
//! out (or, with `wait_ms`, when their tracked copies settle, as before).

use std::collections::{HashSet, VecDeque};

use super::conn::{enqueue, flag, write_push, wsflag};
use super::reliable::{self, push_answer, WaitRef};
use super::{Reactor, Role};
use crate::api::{Push, Target};
use crate::cluster::durable;
use crate::cluster::link::{DurOp, DurRec};
use crate::codec::{self, Shared};
use crate::http;
use crate::metrics::{inc, CloseReason, PushOutcome, Transport};
use crate::timer::{TimerKey, TimerKind};
use crate::types::{PushResult, Ref};
use std::sync::Arc;

/// Copies a turn may queue per connection its pushes made dirty (at least 64 connections'
/// worth): with 1,000 clients a turn queues 16,000 copies, with 10,000 it queues 65,536.
pub(super) const COPIES_PER_WRITE: usize = 16;
/// Copies queued per loop turn at most, across all requests in progress (~0.25 µs each).
pub(super) const SLICE: usize = 65_536;
/// Copies a request just in may always queue in its first turn, however busy the turn is,
/// so a push to one device is not held behind someone's batch.
const FIRST_GRANT: usize = 64;

/// An API push request in progress: its results so far and what waits on them. In a slab,
/// so tracked copies can name it (`WaitRef`) until it is answered.
pub(super) struct PushRequest {
    /// The API connection to answer (None: the caller left; the pushes still go).
    pub api: Option<Ref>,
    pub keep_alive: bool,
    pub batch: bool,
    pub results: Vec<PushResult>,
    /// Tracked copies not yet ACKed or given up (counted only when the request waits).
    pub left: u64,
    /// `wait_ms`: the answer waits for its tracked copies until this time; 0 = no waiting.
    pub expires: u64,
    /// Still delivering: not answered before its last push is out.
    pub delivering: bool,
    /// Cluster mode: its tracked copies' records are on their way to Redis; answered once
    /// they are written (`durable_written`).
    pub durable_wait: bool,
    /// ... the token of its last turn's records (`durable_written`).
    pub durable_token: u64,
}

impl PushRequest {
    fn waits(&self) -> bool {
        self.expires != 0
    }
}

/// The delivery side of a request in progress.
pub(super) struct PushJob {
    /// The request's slab entry.
    req: (u32, u32),
    pushes: Vec<Push>,
    /// The push being delivered, its place in push order, its recipients and how far.
    next: usize,
    order: u64,
    list: Vec<Ref>,
    pos: usize,
    started: bool,
    siblings: Siblings,
    /// When the request came (a push's `ttl_ms` counts from then).
    since: u64,
    /// Its first push's place in push order (the others follow), and the node that drew it.
    base: u64,
    origin: u16,
}

impl Reactor {
    /// Starts a push request: delivers what fits in this turn (at least a first grant) and
    /// returns its answer if it is done, or None when it goes on in later turns or waits for
    /// ACKs (then it is answered from there).
    pub(super) fn start_push(
        &mut self,
        pushes: Vec<Push>,
        batch: bool,
        wait_ms: u64,
        api: Option<(Ref, bool)>,
        id: reliable::PushId,
    ) -> Option<Vec<u8>> {
        let n = pushes.len();
        let waits = api.is_some() && wait_ms > 0;
        let req = self.requests.insert(PushRequest {
            api: api.map(|a| a.0),
            keep_alive: api.is_some_and(|a| a.1),
            batch,
            results: (0..n)
                .map(|_| PushResult {
                    waited: waits,
                    ..Default::default()
                })
                .collect(),
            left: 0,
            expires: if waits { self.now + wait_ms } else { 0 },
            delivering: true,
            durable_wait: false,
            durable_token: 0,
        });
        if waits {
            let (idx, gen) = req;
            let k = TimerKey {
                idx,
                gen,
                kind: TimerKind::WaitExpire,
            };
            self.wheel.insert(self.now + wait_ms, k);
        }
        let mut job = PushJob {
            req,
            pushes,
            next: 0,
            order: 0,
            list: vec![],
            pos: 0,
            started: false,
            siblings: Siblings::default(),
            since: self.now,
            base: id.0,
            origin: id.1,
        };
        // Behind requests already in progress it takes its first grant now whatever the
        // turn's budget (then its turn in the round, so a stream of new big requests cannot
        // starve older ones); alone, it goes as far as the turn's budget.
        let force = if self.push_jobs.is_empty() || self.turn_copies >= 2 * SLICE {
            0 // (a flood of new requests in one turn waits for the next)
        } else {
            FIRST_GRANT
        };
        self.run_job(&mut job, force);
        if job.next < job.pushes.len() {
            self.push_jobs.push_back(job);
            return None;
        }
        self.finish_push(req).map(|(_, _, body)| body)
    }

    /// Once per loop turn: the requests in progress get this turn's slice, shared round
    /// robin, so a small request behind a big one finishes in a turn or two.
    pub(super) fn run_push_jobs(&mut self) {
        // Each request once per turn, in order: the first sets this turn's window of new
        // writes and the others go on over it, so requests in step stay in step (their
        // copies leave together). One that could not move this turn goes first next turn,
        // so none starves behind another.
        let mut starved = VecDeque::new();
        for _ in 0..self.push_jobs.len() {
            let Some(mut job) = self.push_jobs.pop_front() else {
                break;
            };
            let before = (job.next, job.pos);
            self.run_job(&mut job, 0);
            if job.next < job.pushes.len() {
                if (job.next, job.pos) == before {
                    starved.push_back(job);
                } else {
                    self.push_jobs.push_back(job);
                }
            } else if let Some((Some(api), ka, body)) = self.finish_push(job.req) {
                self.metrics.api_status(200);
                let bytes = http::response(200, "application/json", &body, ka);
                self.api_answer(api, ka, &bytes, true);
            }
        }
        while let Some(job) = starved.pop_back() {
            self.push_jobs.push_front(job);
        }
    }

    /// A broadcast or room push starting while another to the same app or room is on its
    /// way walks its list from where that one is (the order of recipients is free): the two
    /// advance over the same window of connections and their copies leave in one write
    /// per connection — how a live room's many concurrent pushes stay cheap.
    fn fall_in_step(&self, t: &Target, list: &mut [Ref]) {
        let same = |o: &Target| match (t, o) {
            (Target::Broadcast(a), Target::Broadcast(b)) => a == b,
            (Target::Room(a, x), Target::Room(b, y)) => a == b && x == y,
            _ => false,
        };
        if list.len() < 1024 || !matches!(t, Target::Broadcast(_) | Target::Room(..)) {
            return; // small: one turn anyway
        }
        let ahead = self.push_jobs.iter().find_map(|j| {
            let p = j.pushes.get(j.next)?;
            (j.started && same(&p.target)).then(|| j.list.get(j.pos).map(|r| r.idx))?
        });
        if let Some(idx) = ahead {
            if let Some(at) = list.iter().position(|r| r.idx == idx) {
                list.rotate_left(at);
            }
        }
    }

    /// Whether requests are still being delivered (the loop does not sleep then).
    pub(super) fn pushing(&self) -> bool {
        !self.push_jobs.is_empty()
    }

    /// Delivers a request's pushes, in order, until the turn's budget stops it (`force`
    /// copies may pass the budget). Results are in the request when it returns (an ACK
    /// between turns may settle what this one tracked), and slow consumers found are closed.
    fn run_job(&mut self, job: &mut PushJob, mut force: usize) {
        let waits = self
            .requests
            .get(job.req.0, job.req.1)
            .is_some_and(|r| r.waits());
        while job.next < job.pushes.len() {
            let item = job.next;
            let mut res = PushResult::default();
            if !job.started {
                job.started = true;
                job.order = if job.base == 0 {
                    // Alone: each push's place is taken as it starts (a later request's
                    // push may go before this one's next).
                    self.pushes += 1;
                    self.pushes
                } else {
                    job.base.wrapping_add(u64::from(job.pushes[item].index))
                };
                if job.pushes[item].ack {
                    // Its id for the client, the same on every copy and redelivery: a
                    // client that lost its connection before its ACK got through sees the
                    // push again under a new seqid and drops it by this (docs/PROTOCOL.md).
                    // The name its cluster record has too.
                    // Written into the reactor's scratch string (no allocation per push).
                    let mut id = std::mem::take(&mut self.id_text);
                    id.clear();
                    let origin = self.origins.name(job.origin);
                    crate::cluster::durable::write_field(&mut id, job.order, origin);
                    job.pushes[item].frame.add_header("push_id", &id);
                    self.id_text = id;
                }
                job.pos = 0;
                let mut list = std::mem::take(&mut job.list);
                self.resolve_into(&job.pushes[item].target, &mut list);
                self.fall_in_step(&job.pushes[item].target, &mut list);
                job.list = list;
                if job.list.is_empty() {
                    match &job.pushes[item].target {
                        Target::Broadcast(_) => {}
                        Target::Conn(id) => res.offline.push(id.to_string()),
                        Target::Device(_, x) | Target::User(_, x) | Target::Room(_, x) => {
                            res.offline.push(x.clone())
                        }
                    }
                }
            }
            let end = job.list.len();
            let wait = waits.then_some(WaitRef {
                idx: job.req.0,
                gen: job.req.1,
                item: item as u32,
            });
            let list = std::mem::take(&mut job.list);
            let mut siblings = std::mem::take(&mut job.siblings);
            let records = self.cluster.as_ref().map(|c| c.durable.len());
            job.pos = self.deliver(
                &job.pushes[item],
                (job.order, job.origin),
                job.since,
                wait,
                &list[..end],
                job.pos,
                &mut siblings,
                &mut res,
                &mut force,
            );
            job.list = list;
            job.siblings = siblings;
            let yielded = job.pos < end; // the turn's budget is used up
            if job.pos == job.list.len() {
                job.next += 1;
                job.started = false;
                job.siblings = Siblings::default();
            }
            self.metrics.push(PushOutcome::Delivered, res.delivered);
            self.metrics
                .push(PushOutcome::Offline, res.offline.len() as u64);
            self.metrics
                .push(PushOutcome::Dropped, res.dropped.len() as u64);
            if let (Some(before), Some(cl)) = (records, self.cluster.as_mut()) {
                if res.tracked > 0 {
                    // Durable once its records are written (answered then), or not at all.
                    let wrote = cl.durable.len() > before;
                    res.durable = Some(wrote);
                    if !wrote {
                        crate::metrics::add(&self.metrics.durable_failed, res.tracked);
                    }
                    let r = self.requests.get_mut(job.req.0, job.req.1);
                    let token = cl.durable_token;
                    if let Some(r) =
                        r.filter(|r| wrote && !(r.durable_wait && r.durable_token == token))
                    {
                        // Answered once its last turn's records are written.
                        r.durable_wait = true;
                        r.durable_token = token;
                        cl.durable_waiting.push_back((token, job.req.0, job.req.1));
                    }
                }
            }
            if let Some(r) = self.requests.get_mut(job.req.0, job.req.1) {
                if r.waits() {
                    r.left += res.tracked;
                }
                if res.durable.is_some() {
                    let d = &mut r.results[item].durable;
                    *d = Some(d.unwrap_or(true) && res.durable == Some(true));
                }
                let into = &mut r.results[item];
                into.delivered += res.delivered;
                into.tracked += res.tracked;
                into.offline.append(&mut res.offline);
                into.dropped.append(&mut res.dropped);
            }
            if yielded {
                break;
            }
        }
        // Closing may settle tracked copies of this request: its results are in place.
        for r in std::mem::take(&mut self.slow) {
            self.close_now(r.idx, r.gen, CloseReason::SlowConsumer);
        }
    }

    /// A request's last push is out. When its answer is due now (no waiting, nothing left to
    /// wait for, or its `wait_ms` already passed) the request is done: returns whom to
    /// answer, keep-alive, and the body. Else it waits for its tracked copies, and `settle`
    /// or the `wait_ms` timer answers it.
    fn finish_push(&mut self, req: (u32, u32)) -> Option<(Option<Ref>, bool, Vec<u8>)> {
        let now = self.now;
        let r = self.requests.get_mut(req.0, req.1)?;
        r.delivering = false;
        if r.durable_wait || (r.waits() && r.left > 0 && now < r.expires) {
            return None;
        }
        let r = self.requests.remove(req.0, req.1)?;
        Some((r.api, r.keep_alive, push_answer(&r.results, r.batch)))
    }

    /// Queues push `p` to each connection of `list` still there and admitted, stopping
    /// where the turn's budget ends (new writes, or copies per write); `force` copies may
    /// go past it. An `ack=1` push reaches all of a device's connections in the same step
    /// (`ahead` remembers the ones reached out of list order), so an ACK on one of them
    /// finds the others' copies to drop, and a hand-over between them finds its duplicate:
    /// the device never gets the push again after acknowledging it. Returns how many of
    /// `list` it went through.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        p: &Push,
        (order, origin): reliable::PushId,
        since: u64,
        wait: Option<WaitRef>,
        list: &[Ref],
        from: usize,
        siblings: &mut Siblings,
        res: &mut PushResult,
        force: &mut usize,
    ) -> usize {
        let cfg = self.cfg.clone();
        let life_ms = self.durable_life_ms();
        let max_out = cfg.limits.max_output_bytes;
        let (now, ack_timeout, max_unacked) =
            (self.now, cfg.limits.ack_timeout_ms, cfg.limits.max_unacked);
        // ttl_ms counts from the request, not from the slice that reaches a connection.
        let expires = if p.ttl_ms > 0 {
            since + p.ttl_ms
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
            ids,
            slow,
            turn_copies,
            turn_writes,
            output_held,
            cluster,
            origins,
            ..
        } = self;
        // Cluster mode: each tracked copy is also a record in its device's hash in Redis.
        let durable = cluster
            .as_deref_mut()
            .filter(|c| p.ack && c.link.view.writable())
            .map(|c| {
                let unix_now = crate::types::unix_ms();
                let field = durable::field(order, origins.name(origin));
                let exp = if expires == u64::MAX {
                    0
                } else {
                    unix_now + expires.saturating_sub(now)
                };
                (c, field, exp, origins.name(0).clone())
            });
        let mut durable = durable;
        // Copies for connections whose device's records are being read: parked, so they
        // go after what the read finds.
        let mut held: Vec<(reliable::DeviceKey, Option<Arc<str>>, reliable::Pending)> = vec![];
        let grace = cfg.limits.slow_consumer_grace_ms;
        // Connections a turn may newly dirty (~4 µs of write() each at its end).
        let new_writes = cfg.runtime.push_writes_per_turn;
        let mut overs: Vec<Ref> = vec![];
        let f: &Shared = &p.frame;
        // One copy to one connection (checked against the budget by the caller). Returns
        // the device when a tracked copy went (its other connections are due now).
        let mut one = |c: &mut super::conn::Conn, r: Ref, res: &mut PushResult| {
            // Past the output bound: for an app that drops rather than closes, the push is
            // dropped (reported) and the connection stays. Otherwise it is queued while the
            // connection has its grace (up to twice the bound, while output across
            // connections is within max_output_total) — past that it is not queued (nor
            // tracked), reported dropped, and the connection is closed as a slow consumer.
            let would = c.backlog() + f.body_len() + codec::SHARED_OVERHEAD;
            if would > max_out {
                let app_drops = cfg.apps[c.app as usize].drop_when_slow;
                let pressed = output_held.queued > cfg.limits.max_output_total;
                if app_drops || would > 2 * max_out || pressed || grace == 0 {
                    if !app_drops {
                        slow.push(r);
                    }
                    res.dropped.push(ids.format(r));
                    return None;
                }
                overs.push(r);
            }
            let (role, pbbp2) = (c.role, c.ws & wsflag::PBBP2 != 0);
            // ack=1 is tracked where the client can ACK: TCP and pbbp2 (not raw WebSocket).
            let track = p.ack && (role == Role::Client(Transport::Tcp) || pbbp2);
            if track
                && c.extra
                    .as_ref()
                    .is_some_and(|e| e.acks.unacked.len() >= max_unacked)
            {
                res.dropped.push(ids.format(r));
                return None;
            }
            if track {
                if let (Some((cl, field, exp, own)), Some(d)) = (durable.as_mut(), c.device.clone())
                {
                    let acks = &mut c.extra().acks;
                    let renew = now >= acks.durable_until;
                    if renew {
                        acks.durable_until = now + life_ms;
                    }
                    cl.durable.push(DurOp {
                        app: cl.app_id(c.app),
                        device: d,
                        field: field.clone(),
                        add: Some(DurRec {
                            expires: *exp,
                            claim: 0,
                            // A request here waits for its outcome: whoever takes the push
                            // over tells this node (`NodeSettled`).
                            waiter: wait.map(|_| own.clone()),
                            body: f.body().clone(),
                        }),
                        renew,
                    });
                }
            }
            let pending = || reliable::Pending {
                frame: f.clone(),
                order,
                origin,
                claim: 0,
                waiter: None,
                expires,
                wait,
            };
            if track && c.ws & wsflag::RECOVERING != 0 {
                if let Some(d) = &c.device {
                    held.push(((c.app, d.clone()), c.user.clone(), pending()));
                    res.tracked += 1;
                    res.delivered += 1;
                    return None;
                }
            }
            c.seq += 1;
            let seq = c.seq;
            if track {
                reliable::track(c, r, seq, pending(), now + ack_timeout, wheel);
                res.tracked += 1;
            }
            if let Role::Client(t) = role {
                inc(&metrics.frames_out[t as usize]);
            }
            let mode = c.ws;
            enqueue(c, r, pool, dirty, output_held, |out| {
                write_push(f, seq, role, mode, cfg.http.deflate_min_bytes, out)
            });
            res.delivered += 1;
            if p.ack {
                c.device.clone().map(|d| (c.app, d))
            } else {
                None
            }
        };
        let mut stopped = list.len();
        for (at, &r) in list.iter().enumerate().skip(from) {
            if !siblings.ahead.is_empty() && siblings.ahead.remove(&r.idx) {
                continue; // reached with its device already
            }
            // Gone, or closing, since the list was taken: skipped.
            let Some(c) = conns
                .get_mut(r.idx, r.gen)
                .filter(|c| c.flags & flag::REGISTERED != 0)
            else {
                continue;
            };
            if *force > 0 {
                *force -= 1;
            } else {
                let writes = *turn_writes + usize::from(c.flags & flag::DIRTY == 0);
                let copies = SLICE.min(COPIES_PER_WRITE * writes.max(64));
                if writes > new_writes || *turn_copies >= copies {
                    stopped = at;
                    break;
                }
            }
            *turn_writes += usize::from(c.flags & flag::DIRTY == 0);
            *turn_copies += 1;
            let Some((app, device)) = one(c, r, res) else {
                continue;
            };
            // The device's other connections further down this push's list get theirs now,
            // whatever the budget (the list skips them when it gets there). Only devices
            // with more than one connection pay for the lookup.
            let others = registry.device(app as usize, &device);
            if others.len() > 1 {
                let index = siblings.index.get_or_insert_with(|| {
                    list.iter().enumerate().map(|(i, x)| (x.idx, i)).collect()
                });
                for &o in others {
                    if index.get(&o).is_none_or(|&i| i <= at) {
                        continue; // itself, done already, or not a recipient of this push
                    }
                    let Some((c, gen)) = conns.by_index_mut(o) else {
                        continue;
                    };
                    if c.flags & flag::REGISTERED == 0 || list[index[&o]].gen != gen {
                        continue;
                    }
                    *turn_writes += usize::from(c.flags & flag::DIRTY == 0);
                    *turn_copies += 1;
                    one(c, Ref { idx: o, gen }, res);
                    siblings.ahead.insert(o);
                }
            }
        }
        self.grace_over(&overs);
        for (key, user, p) in held {
            self.park(key, user, std::iter::once(p));
        }
        stopped
    }
}

/// For an `ack=1` push in progress: the connections reached ahead of their place in the
/// list (with a sibling of their device), and the list's positions by slot (built on the
/// first device met with more than one connection).
#[derive(Default)]
pub(super) struct Siblings {
    ahead: HashSet<u32>,
    index: Option<std::collections::HashMap<u32, usize>>,
}

impl Reactor {
    /// Connections a slice took over their output bound start their grace (closing is
    /// left to the slice's end, after its results are in: `self.slow`).
    fn grace_over(&mut self, overs: &[Ref]) {
        for r in overs {
            self.start_grace(r.idx, r.gen);
        }
    }

    /// At shutdown: requests still delivering stop where they are.
    pub(super) fn stop_push_jobs(&mut self) {
        for job in std::mem::take(&mut self.push_jobs) {
            if let Some(r) = self.requests.get_mut(job.req.0, job.req.1) {
                r.delivering = false;
            }
        }
    }
}

/// The requests in progress, oldest first.
pub(super) type PushJobs = VecDeque<PushJob>;
