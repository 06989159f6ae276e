//! `ack=1` pushes (docs/PROTOCOL.md, "Reliable pushes"): kept per connection until the client ACKs their seqid,
//! retransmitted from the timer wheel (first after `ack_timeout_ms`, doubling), given up and
//! reported after `max_retries`, at their `ttl_ms`, or when their device stays away past the
//! reconnect grace window. One wheel entry per connection with pushes waiting. Raw WebSocket
//! has no ACKs, so there such pushes are not tracked.
//!
//! "Reported" means: counted; told to the API caller that waits for the outcome (`wait_ms`);
//! otherwise — a late failure nobody is waiting for — posted to the app's `undelivered_url`.

use std::collections::{HashMap, VecDeque};

use base64::Engine as _;

use serde_json::json;

use super::conn::{flag, write_push, wsflag, Conn, State};
use super::Reactor;
use super::Role;
use crate::codec::{Shared, SHARED_OVERHEAD};
use crate::http;
use crate::metrics::{add, inc, Transport};
use crate::slab::Slab;
use crate::timer::{TimerKey, TimerKind, Wheel};
use crate::types::{unix_ms, PushResult, Ref};
use std::sync::Arc;

/// Where a tracked push's outcome goes: an API answer waiting (`waits` slab entry) and the
/// push's place in the request.
#[derive(Clone, Copy, Debug)]
pub(super) struct WaitRef {
    pub idx: u32,
    pub gen: u32,
    pub item: u32,
}

/// A tracked push: what it is and where its outcome goes, wherever it waits (on a
/// connection, or parked between connections).
pub(super) struct Pending {
    pub frame: Shared,
    /// The push's place among all pushes (its copies share it): parked pushes from several
    /// connections of a device are merged back in this order. Drawn by the node the API
    /// call came to (`origin`), so the copies other nodes send share it too.
    pub order: u64,
    /// That node (`Origins`; 0 = this one).
    pub origin: u16,
    /// Cluster mode: the claim this node holds it at (`cluster::durable::Record::claim`).
    pub claim: u32,
    /// Cluster mode: the node where a request waits for its outcome, when that is another
    /// node (this node took the push over from it): told the outcome (`NodeSettled`).
    pub waiter: Option<u16>,
    /// Given up at this time (`ttl_ms`); `u64::MAX` = no limit.
    pub expires: u64,
    pub wait: Option<WaitRef>,
}

impl Pending {
    pub fn id(&self) -> PushId {
        (self.order, self.origin)
    }

    /// Taken over again here at `claim`, from a record naming `waiter` (another node where
    /// a request waits for the outcome): that node is told the outcome from now on, and a
    /// wait here on this copy (another part of the same request) is handed to `waits` to
    /// stop counting it.
    pub fn take_claim(&mut self, claim: u32, waiter: Option<u16>, waits: &mut Vec<WaitRef>) {
        self.claim = claim;
        if let Some(n) = waiter {
            self.waiter = Some(n);
            waits.extend(self.wait.take());
        }
    }
}

/// A device: its app and id.
pub(super) type DeviceKey = (u16, Arc<str>);

/// A push's identity across nodes: its order and its origin node.
pub(super) type PushId = (u64, u16);

/// Node ids pushes came from, as small numbers for `Pending::origin`: 0 is this node.
pub(super) struct Origins {
    pub(super) names: Vec<Arc<str>>,
    pub(super) index: HashMap<Arc<str>, u16>,
}

impl Origins {
    pub fn new(own: &str) -> Origins {
        let own: Arc<str> = own.into();
        Origins {
            index: HashMap::from([(own.clone(), 0)]),
            names: vec![own],
        }
    }

    pub fn get(&self, name: &str) -> Option<u16> {
        self.index.get(name).copied()
    }

    /// Node ids are few (a cluster's nodes over its life); past 65,535 the last number is
    /// reused, which at worst makes two pushes' ids alike — never this node's.
    pub fn intern(&mut self, name: &str) -> u16 {
        if let Some(i) = self.get(name) {
            return i;
        }
        let name: Arc<str> = name.into();
        if self.names.len() <= usize::from(u16::MAX) {
            self.names.push(name.clone());
        } else {
            let last = self.names.pop().expect("full");
            self.index.remove(&last);
            self.names.push(name.clone());
        }
        let i = (self.names.len() - 1) as u16;
        self.index.insert(name, i);
        i
    }

    pub fn name(&self, i: u16) -> &Arc<str> {
        &self.names[usize::from(i).min(self.names.len() - 1)]
    }
}

/// A connection's `ack=1` pushes waiting for their ACK (in `Conn::extra`).
#[derive(Default)]
pub(super) struct Acks {
    /// Oldest first.
    pub unacked: VecDeque<Unacked>,
    /// When the connection's retransmit timer is due (0 = none armed). Entries for other
    /// times left in the wheel are stale and ignored when they fire.
    pub rt_at: u64,
    /// Cluster mode: until when the device's durable hash is known to live (its expiry is
    /// renewed, to twice a record's life, only once this passes — not with every push).
    pub durable_until: u64,
}

/// A push sent to a connection and waiting there for its ACK.
pub(super) struct Unacked {
    pub seq: u64,
    pub tries: u32,
    pub due: u64,
    pub push: Pending,
}

/// Empties a connection's queue of pushes waiting for an ACK; with who they were for.
fn take_unacked(c: &mut Conn, r: Ref) -> (Owner, Vec<Unacked>) {
    let list = c
        .extra
        .as_mut()
        .map(|e| e.acks.unacked.drain(..).collect())
        .unwrap_or_default();
    (Owner::of(c, r), list)
}

pub(super) enum Outcome {
    Acked,
    Undelivered,
    /// No longer tracked: handed to a connection that cannot ACK (raw WebSocket), or a copy
    /// the device does not need (it acknowledged the push on another connection).
    Untracked,
}

/// Why a push was given up (the webhook's `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GiveUp {
    /// `max_retries` retransmits and still no ACK.
    NoAck,
    /// Its `ttl_ms` passed.
    Expired,
    /// Its device did not come back within the reconnect grace window.
    Offline,
    /// Its connection closed and there is no grace window (or no device to wait for).
    Closed,
    /// The gateway shut down with it unacknowledged.
    Shutdown,
}

impl GiveUp {
    fn as_str(self) -> &'static str {
        match self {
            GiveUp::NoAck => "no_ack",
            GiveUp::Expired => "expired",
            GiveUp::Offline => "offline",
            GiveUp::Closed => "closed",
            GiveUp::Shutdown => "shutdown",
        }
    }
}

/// Who a given-up push was for.
#[derive(Clone)]
pub(super) struct Owner {
    pub app: u16,
    pub device: Option<Arc<str>>,
    pub user: Option<Arc<str>>,
    pub conn: Option<Ref>,
}

impl Owner {
    fn of(c: &Conn, r: Ref) -> Owner {
        Owner {
            app: c.app,
            device: c.device.clone(),
            user: c.user.clone(),
            conn: Some(r),
        }
    }
}

/// Queues an `ack=1` push just sent to `c` (seqid `seq`) for its ACK. The connection's one
/// retransmit timer is armed for it unless it is already armed no later (a busy connection
/// adds no wheel entries; one whose timer sits at an older push's backed-off retry gets an
/// earlier entry, so the new push's first retransmit and TTL are on time).
pub(super) fn track(c: &mut Conn, r: Ref, seq: u64, p: Pending, due: u64, wheel: &mut Wheel) {
    let e = &mut c.extra().acks;
    let at = due.min(p.expires);
    if e.rt_at == 0 || at < e.rt_at {
        e.rt_at = at;
        wheel.insert(
            at,
            TimerKey {
                idx: r.idx,
                gen: r.gen,
                kind: TimerKind::Retransmit,
            },
        );
    }
    e.unacked.push_back(Unacked {
        seq,
        tries: 0,
        due,
        push: p,
    });
}

impl Reactor {
    /// The client acknowledged downstream seqid `seq`.
    pub(super) fn on_ack(&mut self, idx: u32, gen: u32, seq: u64) {
        let Some(e) = self
            .conns
            .get_mut(idx, gen)
            .and_then(|c| c.extra.as_mut())
            .map(|e| &mut e.acks)
        else {
            return;
        };
        // ACKs mostly come in order: the front is checked first.
        let Some(pos) = e.unacked.iter().position(|u| u.seq == seq) else {
            return;
        };
        let u = e.unacked.remove(pos).expect("found");
        inc(&self.metrics.acked);
        if let Some(w) = u.push.wait {
            self.settle(w, Outcome::Acked);
        }
        let device = self
            .conns
            .get(idx, gen)
            .and_then(|c| Some((c.app, c.device.clone()?)));
        self.durable_settled(device.as_ref(), &u.push, true, vec![]);
        self.durable_done(device, u.push.id());
        self.drop_other_copies(Ref { idx, gen }, u.push.id());
        // Room again: parked pushes of the device that did not fit come next.
        if self.parked.any() {
            self.replay_parked(Ref { idx, gen });
        }
    }

    /// Parked pushes of `key` for which `drop(id, claim)` holds, taken out (another node
    /// sends them now).
    pub(super) fn unpark_if(
        &mut self,
        key: &DeviceKey,
        drop: &dyn Fn(PushId, u32) -> bool,
    ) -> Vec<Pending> {
        let Some(&(i, g)) = self.parked.index.get(key) else {
            return vec![];
        };
        let Some(p) = self.parked.entries.get_mut(i, g) else {
            return vec![];
        };
        let (out, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut p.pushes)
            .into_iter()
            .partition(|x| drop(x.id(), x.claim));
        p.pushes = keep.into();
        if p.pushes.is_empty() {
            self.parked.entries.remove(i, g);
            self.parked.index.remove(key);
        }
        out
    }

    /// Every parked push, with its device.
    pub(super) fn parked_all(&self) -> Vec<((u16, Arc<str>), &Pending)> {
        let mut v = vec![];
        for (i, g) in self.parked.entries.keys() {
            if let Some(p) = self.parked.entries.get(i, g) {
                v.extend(p.pushes.iter().map(|x| (p.key.clone(), x)));
            }
        }
        v
    }

    /// Calls `f` with the queue of unacknowledged pushes of each connection of `key`'s
    /// device here.
    pub(super) fn each_unacked(
        &mut self,
        key: &DeviceKey,
        mut f: impl FnMut(&mut VecDeque<Unacked>),
    ) {
        let conns: Vec<u32> = self.registry.device(key.0 as usize, &key.1).to_vec();
        for i in conns {
            if let Some(e) = self
                .conns
                .by_index_mut(i)
                .and_then(|(c, _)| c.extra.as_mut())
            {
                f(&mut e.acks.unacked);
            }
        }
    }

    /// The pushes parked for `key`, if any.
    pub(super) fn parked_mut(&mut self, key: &DeviceKey) -> Option<&mut VecDeque<Pending>> {
        let &(i, g) = self.parked.index.get(key)?;
        self.parked.entries.get_mut(i, g).map(|p| &mut p.pushes)
    }

    /// The device acknowledged a push on connection `r`: the copies of it that its other
    /// connections hold (a device, user, room or broadcast push reaches each of them), or
    /// that wait parked for it, are not needed any more, and are not handed over later.
    fn drop_other_copies(&mut self, r: Ref, id: PushId) {
        let Some(c) = self.conns.get(r.idx, r.gen) else {
            return;
        };
        let Some(device) = c.device.clone() else {
            return;
        };
        let app = c.app;
        let others = self.registry.device(app as usize, &device);
        let mut dropped = vec![];
        if others.len() > 1 {
            for &i in others {
                if i == r.idx {
                    continue;
                }
                let Some(e) = self
                    .conns
                    .by_index_mut(i)
                    .and_then(|(c, _)| c.extra.as_mut())
                else {
                    continue;
                };
                let q = &mut e.acks.unacked;
                while let Some(p) = q.iter().position(|u| u.push.id() == id) {
                    dropped.push(q.remove(p).expect("found").push);
                }
            }
        }
        if let Some(&(i, g)) = self.parked.index.get(&(app, device)) {
            if let Some(p) = self.parked.entries.get_mut(i, g) {
                while let Some(at) = p.pushes.iter().position(|x| x.id() == id) {
                    dropped.push(p.pushes.remove(at).expect("found"));
                }
            }
        }
        for p in dropped {
            self.redundant(p);
        }
    }

    /// Whether another copy of push `order` is still on its way to the device of connection
    /// `r` (held by another of its connections, or parked for it).
    fn copy_elsewhere(&self, r: Ref, id: PushId) -> bool {
        let Some(c) = self.conns.get(r.idx, r.gen) else {
            return false;
        };
        let Some(device) = c.device.as_deref() else {
            return false;
        };
        let others = self.registry.device(c.app as usize, device);
        let held = others.len() > 1
            && others.iter().filter(|&&i| i != r.idx).any(|&i| {
                self.conns
                    .by_index(i)
                    .and_then(|(c, _)| c.extra.as_ref())
                    .is_some_and(|e| e.acks.unacked.iter().any(|u| u.push.id() == id))
            });
        held || (self.parked.any()
            && self
                .parked
                .index
                .get(&(c.app, c.device.clone().expect("checked")))
                .and_then(|&(i, g)| self.parked.entries.get(i, g))
                .is_some_and(|p| p.pushes.iter().any(|x| x.id() == id)))
    }

    /// A copy the device does not need (it has, or is being sent, the same push on another
    /// connection): it stops being tracked, and no longer counts in a waiting answer.
    pub(super) fn redundant(&mut self, p: Pending) {
        inc(&self.metrics.redundant_copies);
        if let Some(w) = p.wait {
            self.settle(w, Outcome::Untracked);
        }
    }

    /// The retransmit timer: give up what has expired or had its retries, send again what is
    /// due (same seqid), re-arm at the next due time.
    pub(super) fn retransmit(&mut self, k: TimerKey) {
        let (now, timeout, max) = (
            self.now,
            self.cfg.limits.ack_timeout_ms,
            self.cfg.limits.max_retries,
        );
        let Some(c) = self.conns.get_mut(k.idx, k.gen) else {
            return;
        };
        let Some(e) = c.extra.as_mut().map(|e| &mut e.acks) else {
            return;
        };
        if e.rt_at == 0 || now < e.rt_at {
            return; // stale: superseded by an earlier entry, which re-armed it
        }
        e.rt_at = 0;
        if c.state != State::Open {
            return; // closing: its pushes are parked or given up when it goes
        }
        let mut resend: Vec<(u64, Shared, PushId, u32)> = vec![];
        let mut gave_up: Vec<(Unacked, GiveUp)> = vec![];
        let mut i = 0;
        while i < e.unacked.len() {
            let u = &mut e.unacked[i];
            let why = if u.push.expires <= now {
                Some(GiveUp::Expired)
            } else if u.due > now {
                None
            } else if u64::from(u.tries) >= max {
                Some(GiveUp::NoAck)
            } else {
                u.tries += 1;
                u.due = now + (timeout << u.tries.min(16));
                resend.push((u.seq, u.push.frame.clone(), u.push.id(), u.push.claim));
                None
            };
            match why {
                Some(w) => gave_up.push((e.unacked.remove(i).expect("in range"), w)),
                None => i += 1,
            }
        }
        let next = e.unacked.iter().map(|u| u.due.min(u.push.expires)).min();
        if let Some(at) = next {
            e.rt_at = at;
            self.wheel.insert(at, k);
        }
        let r = Ref {
            idx: k.idx,
            gen: k.gen,
        };
        // Before the resends: queueing them may close the connection (slow consumer).
        let owner = Owner::of(c, r);
        let mut ending = vec![];
        for (u, why) in gave_up {
            if self.copy_elsewhere(r, u.push.id()) {
                // The device still gets it on another connection: this copy is not a failure.
                self.redundant(u.push);
            } else {
                ending.push((u.push, u.tries, why));
            }
        }
        // Cluster: other nodes may hold copies of the same pushes (the device is connected
        // there too): what is sent again or given up is checked against the records first.
        let resend = self.check_copies(r, &owner, resend, ending);
        self.send_again(r, resend.into_iter().map(|(seq, f, _, _)| (seq, f)));
    }

    /// Sends pushes again to connection `r` (their seqids kept), counted; then, since
    /// given-up or settled copies made room, the device's parked pushes come next.
    pub(super) fn send_again(&mut self, r: Ref, resend: impl IntoIterator<Item = (u64, Shared)>) {
        let mut n = 0;
        let min = self.cfg.http.deflate_min_bytes;
        for (seq, f) in resend {
            n += 1;
            self.queue(r.idx, r.gen, true, |role, mode, out| {
                write_push(&f, seq, role, mode, min, out)
            });
        }
        add(&self.metrics.retransmits, n);
        if self.parked.any() {
            self.replay_parked(r);
        }
    }

    /// One tracked push failed for good: counted, then told to the API request waiting for it,
    /// or (nobody waiting any more) to the app's `undelivered_url`.
    pub(super) fn give_up(&mut self, who: &Owner, p: &Pending, tries: u32, why: GiveUp) {
        if why == GiveUp::Shutdown && self.durable_kept() {
            // Kept in Redis: the device's next connection, on any node, gets it.
            inc(&self.metrics.durable_left);
            return;
        }
        let device = who.device.clone().map(|d| (who.app, d));
        inc(&self.metrics.undelivered);
        let hooked = self.backends.apps[who.app as usize].undelivered.is_some();
        // (Built now only for the node that waits for it; else only if it is posted here.)
        let event =
            (hooked && p.waiter.is_some()).then(|| self.undelivered_event(who, p, tries, why));
        let report = event
            .as_ref()
            .map(|ev| serde_json::to_vec(ev).unwrap_or_default())
            .unwrap_or_default();
        // Taken over from a node where a request waits for it: that node counts it, and
        // reports it unless the request takes it (as here, below).
        let told = self.durable_settled(device.as_ref(), p, false, report);
        self.durable_done(device, p.id());
        if told {
            return;
        }
        if let Some(w) = p.wait {
            if self.settle(w, Outcome::Undelivered) {
                return;
            }
        }
        if hooked {
            let ev = event.unwrap_or_else(|| self.undelivered_event(who, p, tries, why));
            self.post_undelivered(who.app as usize, ev);
        }
    }

    /// Posts an `undelivered` event to app `app`'s `undelivered_url`.
    pub(super) fn post_undelivered(&mut self, app: usize, ev: serde_json::Value) {
        let Some(tx) = &self.backends.apps[app].undelivered else {
            return;
        };
        if !tx.push(ev) {
            inc(&self.metrics.undelivered_reports_dropped);
        }
    }

    /// The `undelivered` event of push `p` given up for `who`.
    fn undelivered_event(
        &self,
        who: &Owner,
        p: &Pending,
        tries: u32,
        why: GiveUp,
    ) -> serde_json::Value {
        let f = p.frame.frame();
        json!({
            "event": "undelivered",
            "reason": why.as_str(),
            "app_id": self.cfg.apps[who.app as usize].id,
            "device_id": who.device.as_deref(),
            "user_id": who.user.as_deref(),
            "conn_id": who.conn.map(|r| self.ids.format(r)),
            "logid": f.logid,
            "service": f.service,
            "method": f.method,
            "payload_type": f.payload_type,
            "payload_base64": base64::engine::general_purpose::STANDARD.encode(&f.payload),
            "retransmits": tries,
            "at_ms": unix_ms(),
        })
    }

    /// A tracked push of a waiting API request has its outcome. Returns false when the
    /// request no longer waits (answered already at its `wait_ms`).
    pub(super) fn settle(&mut self, w: WaitRef, o: Outcome) -> bool {
        let Some(req) = self.requests.get_mut(w.idx, w.gen) else {
            return false;
        };
        let r = &mut req.results[w.item as usize];
        match o {
            Outcome::Acked => r.acked += 1,
            Outcome::Undelivered => r.undelivered += 1,
            Outcome::Untracked => r.tracked -= 1,
        }
        req.left -= 1;
        if req.left == 0 && !req.delivering && !req.durable_wait {
            self.answer_wait(w.idx, w.gen);
        }
        true
    }

    /// A `wait_ms` timer fired: answer the request if this was its deadline (one still
    /// delivering is answered when its last push is out).
    pub(super) fn wait_expired(&mut self, k: TimerKey) {
        let now = self.now;
        if self
            .requests
            .get(k.idx, k.gen)
            .is_some_and(|r| r.expires <= now && !r.delivering && !r.durable_wait)
        {
            self.answer_wait(k.idx, k.gen);
        }
    }

    /// Sends a waiting API request its answer (all settled, its `wait_ms` passed, or
    /// shutdown).
    pub(super) fn answer_wait(&mut self, idx: u32, gen: u32) {
        let Some(r) = self.requests.remove(idx, gen) else {
            return;
        };
        let Some(api) = r.api else {
            return;
        };
        let body = push_answer(&r.results, r.batch);
        self.metrics.api_status(200);
        let bytes = http::response(200, "application/json", &body, r.keep_alive);
        self.api_answer(api, r.keep_alive, &bytes, true);
    }

    /// At shutdown: every request gets its answer now — one still delivering with what went
    /// out so far — with what is still open reported `pending`.
    pub(super) fn answer_all_waits(&mut self) {
        self.stop_push_jobs();
        for (idx, gen) in self.requests.keys() {
            self.answer_wait(idx, gen);
        }
    }

    /// At exit: what is still unacknowledged, on a connection or parked, is given up.
    pub(super) fn give_up_all(&mut self) {
        for (idx, gen) in self.conns.keys() {
            let Some(c) = self.conns.get_mut(idx, gen) else {
                continue;
            };
            let (owner, list) = take_unacked(c, Ref { idx, gen });
            for u in list {
                self.give_up(&owner, &u.push, u.tries, GiveUp::Shutdown);
            }
        }
        for (idx, gen) in self.parked.entries.keys() {
            let p = self.parked.entries.remove(idx, gen).expect("listed");
            self.parked.index.remove(&p.key);
            self.give_up_parked(p, GiveUp::Shutdown);
        }
        // Copies waiting for their records' check to be given up: now, as shutdown.
        for (owner, p, tries) in self.checks_pending() {
            self.give_up(&owner, &p, tries, GiveUp::Shutdown);
        }
    }

    /// Copies held by no connection given up, once checked (`check_copies`).
    fn give_up_checked(&mut self, owner: &Owner, ending: Vec<(Pending, u32, GiveUp)>) {
        let none = Ref {
            idx: u32::MAX,
            gen: 0,
        };
        self.check_copies(none, owner, vec![], ending);
    }

    fn give_up_parked(&mut self, p: ParkedDevice, why: GiveUp) {
        let owner = Owner {
            app: p.key.0,
            device: Some(p.key.1.clone()),
            user: p.user.clone(),
            conn: None,
        };
        if why == GiveUp::Shutdown {
            for x in p.pushes {
                self.give_up(&owner, &x, 0, why);
            }
            return;
        }
        let ending = p.pushes.into_iter().map(|x| (x, 0, why)).collect();
        self.give_up_checked(&owner, ending);
    }
}

/// The answer body to a push request: one result, or a batch's total and list.
pub(super) fn push_answer(results: &[PushResult], batch: bool) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::with_capacity(64 + results.len() * 48);
    if batch {
        let delivered: u64 = results.iter().map(|r| r.delivered).sum();
        let _ = write!(out, "{{\"delivered\":{delivered},\"results\":[");
        for (i, r) in results.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            r.write_json(&mut out);
        }
        out.extend_from_slice(b"]}");
    } else {
        results[0].write_json(&mut out);
    }
    out.push(b'\n');
    out
}

/// Unacknowledged pushes of devices whose connection went, waiting (the reconnect grace
/// window) for one of the device's connections to take them. In a slab so grace timers can
/// name entries.
#[derive(Default)]
pub(super) struct Parked {
    pub(super) entries: Slab<ParkedDevice>,
    pub(super) index: HashMap<(u16, Arc<str>), (u32, u32)>,
}

impl Parked {
    /// Whether a parked entry is still there (for the wheel's compaction).
    pub fn holds(&self, i: u32, g: u32) -> bool {
        self.entries.get(i, g).is_some()
    }

    /// Whether any device has pushes parked (a cheap test before looking one up).
    pub fn any(&self) -> bool {
        !self.index.is_empty()
    }
}

pub(super) struct ParkedDevice {
    pub(super) key: (u16, Arc<str>),
    pub(super) user: Option<Arc<str>>,
    /// In the order they were first pushed (`Pending::order`).
    pub(super) pushes: VecDeque<Pending>,
    pub(super) expires: u64,
}

/// Whether a connection can ACK (TCP and pbbp2; raw WebSocket cannot).
pub(super) fn can_ack(c: &Conn) -> bool {
    c.role == Role::Client(Transport::Tcp) || c.ws & wsflag::PBBP2 != 0
}

impl Reactor {
    /// A connection left the registry (closing, or gone): its unacknowledged pushes go to
    /// another open connection of the device now, if it has one (as many as that one has
    /// room for; the rest follow as it makes room), else wait for the device to come back
    /// within the grace window. With no grace window (or no device) what is not handed over
    /// is given up at once. They leave at once, not when the socket finally closes, so a
    /// copy is only ever on a registered connection or parked.
    pub(super) fn park_unacked(&mut self, r: Ref) {
        let Some(c) = self.conns.get_mut(r.idx, r.gen) else {
            return;
        };
        if c.extra.as_ref().is_none_or(|e| e.acks.unacked.is_empty()) {
            // Most connections: nothing waits. One that went while its device's records
            // were read may leave pushes parked for it here (held until the read): the
            // device may be back on another node already.
            if c.ws & wsflag::RECOVERING != 0 && self.parked.any() {
                if let Some(d) = c.device.clone() {
                    let key = (c.app, d);
                    if self.parked.index.contains_key(&key) && self.handover_target(&key).is_none()
                    {
                        self.offer_elsewhere(&key);
                    }
                }
            }
            return;
        }
        let (owner, list) = take_unacked(c, r);
        let grace = self.cfg.limits.reconnect_grace_ms;
        // At shutdown every connection is going: nobody to hand them to, nothing to wait for.
        // (Draining, a connection goes to another node: with a cluster its pushes stay in
        // Redis for it there, as at a shutdown.)
        let why = if self.shutdown_at.is_some() || self.draining() {
            GiveUp::Shutdown
        } else {
            GiveUp::Closed
        };
        let Some(device) = owner.device.clone().filter(|_| why != GiveUp::Shutdown) else {
            for u in list {
                self.give_up(&owner, &u.push, u.tries, why);
            }
            return;
        };
        let key = (owner.app, device);
        let target = self.handover_target(&key);
        if target.is_none() && grace == 0 {
            let ending = list
                .into_iter()
                .map(|u| (u.push, u.tries, GiveUp::Closed))
                .collect();
            self.give_up_checked(&owner, ending);
            return;
        }
        self.park(
            key.clone(),
            owner.user.clone(),
            list.into_iter().map(|u| u.push),
        );
        match target {
            Some(t) => self.replay_parked(t),
            // The device may be back on another node already: it is offered them there.
            None => self.offer_elsewhere(&key),
        }
        if grace == 0 {
            // What the other connection had no room for: nobody waits for it.
            if let Some((i, g)) = self.parked.index.remove(&key) {
                if let Some(p) = self.parked.entries.remove(i, g) {
                    self.give_up_parked(p, GiveUp::Closed);
                }
            }
        }
    }

    /// The open connection of a device to hand its pushes to: one that can ACK if there is
    /// one.
    pub(super) fn handover_target(&self, key: &(u16, Arc<str>)) -> Option<Ref> {
        let open = |i: &u32| {
            self.conns
                .by_index(*i)
                .filter(|(c, _)| c.state == State::Open && c.flags & flag::REGISTERED != 0)
                .map(|(c, gen)| (can_ack(c), Ref { idx: *i, gen }))
        };
        let others = self.registry.device(key.0 as usize, &key.1);
        let mut fallback = None;
        for (acks, r) in others.iter().filter_map(open) {
            if acks {
                return Some(r);
            }
            fallback = fallback.or(Some(r));
        }
        fallback
    }

    /// Parks pushes for a device (merged with any it already has, in push order) and
    /// (re)starts its grace window.
    pub(super) fn park(
        &mut self,
        key: (u16, Arc<str>),
        user: Option<Arc<str>>,
        pushes: impl Iterator<Item = Pending>,
    ) {
        let grace = self.cfg.limits.reconnect_grace_ms;
        let (i, g) = match self.parked.index.get(&key) {
            Some(&ig) => ig,
            None => {
                let ig = self.parked.entries.insert(ParkedDevice {
                    key: key.clone(),
                    user,
                    pushes: VecDeque::new(),
                    expires: 0,
                });
                self.parked.index.insert(key, ig);
                ig
            }
        };
        let p = self.parked.entries.get_mut(i, g).expect("just found");
        p.pushes.extend(pushes);
        // In push order, whatever order a connection held them in (one that took handed-over
        // pushes after its own newer ones, or one that took part of the parked ones and
        // went). A stable sort keeps a push's copies in their order.
        p.pushes.make_contiguous().sort_by_key(|x| x.order);
        p.expires = self.now + grace;
        self.wheel.insert(
            p.expires,
            TimerKey {
                idx: i,
                gen: g,
                kind: TimerKind::GraceExpire,
            },
        );
    }

    /// The grace window of a parked device ran out: what no connection of the device took
    /// is undelivered.
    pub(super) fn grace_expired(&mut self, k: TimerKey) {
        let now = self.now;
        if self
            .parked
            .entries
            .get(k.idx, k.gen)
            .is_some_and(|p| p.expires <= now)
        {
            let p = self.parked.entries.remove(k.idx, k.gen).expect("checked");
            self.parked.index.remove(&p.key);
            self.give_up_parked(p, GiveUp::Offline);
        }
    }

    /// Hands a device's parked pushes to one of its connections (the next one after a
    /// reconnect, another live one after a close): first, in order, as `ack=1` pushes of
    /// that connection (new seqids), before anything pushed from now on — as many as it
    /// has room for under `max_unacked`; the rest stay parked and follow its ACKs. Expired
    /// ones are given up.
    pub(super) fn replay_parked(&mut self, r: Ref) {
        let Some(c) = self.conns.get(r.idx, r.gen) else {
            return;
        };
        if c.state != State::Open || c.flags & flag::REGISTERED == 0 {
            return;
        }
        if c.ws & wsflag::RECOVERING != 0 {
            return; // its device's pushes kept in Redis come first (`durable_recovered`)
        }
        if !self.parked.any() {
            return; // nothing parked: no id to hash (every admitted connection comes here)
        }
        let Some(device) = c.device.clone() else {
            return;
        };
        let Some(&(i, g)) = self.parked.index.get(&(c.app, device)) else {
            return;
        };
        let owner = Owner::of(c, r);
        let (max, max_out) = (
            self.cfg.limits.max_unacked,
            self.cfg.limits.max_output_bytes,
        );
        while let Some(next) = self.parked.entries.get(i, g).and_then(|p| p.pushes.front()) {
            // Stops while the connection is full (`max_unacked`) or its output backlog has no
            // room for the next one (its ACKs and drained output resume it), or when it went.
            let Some(c) = self.conns.get(r.idx, r.gen) else {
                break;
            };
            let held = c.extra.as_ref().map(|e| &e.acks.unacked);
            if can_ack(c) && held.is_some_and(|u| u.len() >= max) {
                break;
            }
            let size = next.frame.body_len() + SHARED_OVERHEAD;
            if c.backlog() > 0 && c.backlog() + size > max_out {
                if let Some(c) = self.conns.get_mut(r.idx, r.gen) {
                    c.flags |= flag::REPLAY_ON_DRAIN;
                }
                break;
            }
            // The connection already has its own copy of this push (a device push reached
            // both connections): the handed-over copy is not sent twice.
            let dup = held.is_some_and(|u| u.iter().any(|u| u.push.id() == next.id()));
            let x = self
                .parked
                .entries
                .get_mut(i, g)
                .and_then(|p| p.pushes.pop_front());
            let Some(x) = x else { break };
            if dup {
                self.redundant(x);
            } else if x.expires <= self.now {
                self.give_up(&owner, &x, 0, GiveUp::Expired);
            } else {
                self.send_tracked(r, x);
            }
        }
        if self
            .parked
            .entries
            .get(i, g)
            .is_some_and(|p| p.pushes.is_empty())
        {
            let p = self.parked.entries.remove(i, g).expect("checked");
            self.parked.index.remove(&p.key);
        }
    }

    /// Sends one parked `ack=1` push to a connection and tracks it (the push path does the
    /// same inline, with its borrows split for fan-out).
    fn send_tracked(&mut self, r: Ref, p: Pending) {
        let (now, ack_timeout) = (self.now, self.cfg.limits.ack_timeout_ms);
        let Some(c) = self.conns.get_mut(r.idx, r.gen) else {
            return;
        };
        let tracked = can_ack(c);
        c.seq += 1;
        let seq = c.seq;
        let f = p.frame.clone();
        inc(&self.metrics.replayed);
        if tracked {
            track(c, r, seq, p, now + ack_timeout, &mut self.wheel);
        } else {
            // The device came back as a raw WebSocket client, which cannot ACK: the push is
            // delivered untracked, so it no longer counts as waiting (nor is it kept).
            let device = c.device.clone().map(|d| (c.app, d));
            if let Some(w) = p.wait {
                self.settle(w, Outcome::Untracked);
            }
            self.durable_done(device, p.id());
        }
        let min = self.cfg.http.deflate_min_bytes;
        self.queue(r.idx, r.gen, true, |role, mode, out| {
            write_push(&f, seq, role, mode, min, out)
        });
    }
}
