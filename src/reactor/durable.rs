//! Reliable pushes across nodes (docs/CLUSTER.md, "Reliable pushes"). In cluster mode every
//! tracked `ack=1` copy is also a record in its device's hash in Redis (`cluster::durable`),
//! written with the turn's other writes before the API answers, removed when it is ACKed,
//! given up, or delivered untracked. A device's connection admitted on any node first reads
//! that hash: what it finds goes to it first, in push order (its new `ack=1` pushes wait
//! parked meanwhile), and the node that held those pushes is told to stop (`NodeTake`).
//! Records are written by the node that holds the push (the record names it), so a node
//! that dies leaves them for the device's next connection on another node. The read also
//! takes the records over (`durable::RECOVER`: holder and claim rewritten in the same
//! step); a node's copies carry the claim they were taken at, so a `NodeTake` that arrives
//! late — after this node took the push back — leaves the newer copy alone.

use std::collections::HashMap;
use std::sync::Arc;

use super::conn::wsflag;
use super::reliable::{DeviceKey, GiveUp, Outcome, Owner, Pending, PushId};
use super::Reactor;
use crate::cluster::durable;
use crate::cluster::link::{DurOp, DurRec, ToLink};
use crate::codec::Shared;
use crate::metrics::{add, inc};
use crate::types::{unix_ms, Ref};

/// Durable removals kept while Redis is away, written when it is back; past this they are
/// dropped (counted): such a record lingers until its hash expires, and a device that comes
/// back on another node before that may get an acknowledged push again.
const UNSENT_MAX: usize = 1 << 20;
/// The id of an adoption's read (`durable_recovered`) has this bit; a connection's never.
const ADOPT: u64 = 1 << 63;
/// Waits kept for pushes handed to other nodes (`Cluster::handed`), at most.
const HANDED_MAX: usize = 1 << 16;

fn pack(r: Ref) -> u64 {
    u64::from(r.idx) << 32 | u64::from(r.gen)
}

fn unpack(v: u64) -> Ref {
    Ref {
        idx: (v >> 32) as u32,
        gen: v as u32,
    }
}

impl Reactor {
    /// How long a device's hash lives past its last write: a record's longest life (every
    /// retransmit's backoff, then the reconnect grace window).
    pub(super) fn durable_life_ms(&self) -> u64 {
        let l = &self.cfg.limits;
        let tries = l.max_retries.min(20) + 1;
        let retries = l.ack_timeout_ms.saturating_mul((1u64 << tries) - 1);
        retries
            .saturating_add(l.reconnect_grace_ms)
            .clamp(1000, 7 * 86_400_000)
    }

    /// Whether records can be written now (cluster mode, Redis up).
    pub(super) fn durable_kept(&self) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| c.link.view.writable())
    }

    /// A record's field for push `id`.
    pub(super) fn durable_field(&self, id: PushId) -> String {
        durable::field(id.0, self.origins.name(id.1))
    }

    /// Push `id` of `device` is done here for good (ACKed, given up, delivered untracked):
    /// its record goes.
    pub(super) fn durable_done(&mut self, device: Option<(u16, Arc<str>)>, id: PushId) {
        let Some((app, device)) = device else {
            return;
        };
        if self.cluster.is_none() {
            return;
        }
        let field = self.durable_field(id);
        let writable = self.durable_kept();
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let op = DurOp {
            app: cl.app_id(app),
            device,
            field,
            add: None,
            renew: false,
        };
        if writable {
            cl.durable.push(op);
        } else if cl.unsent.len() < UNSENT_MAX {
            cl.unsent.push(op);
        } else {
            inc(&self.metrics.durable_dropped);
        }
    }

    /// End of a turn: its record writes go to the link as one item; the requests that wait
    /// for them are answered when it says they are done (`durable_written`). Reads and offer
    /// lookups go after them (and after the turn's route writes, flushed just before): a
    /// read sees what this node wrote, and a node offered pushes finds their records.
    pub(super) fn flush_durable(&mut self) {
        let life_ms = self.durable_life_ms();
        let now = self.now;
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if !cl.adopt_again.is_empty() && now >= cl.adopt_retry_at {
            // Adoption reads that could not be made: tried again, once a second at most.
            cl.adopt_retry_at = now + 1000;
            self.adopt_again();
        }
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let mut failed = None;
        if !cl.durable.is_empty() {
            let ops = std::mem::take(&mut cl.durable);
            let adds = ops.iter().filter(|o| o.add.is_some()).count() as u64;
            let token = cl.durable_token;
            cl.durable_token += 1;
            // Renewed to twice a record's life, once a record's life has passed since the
            // last renewal (`Acks::durable_until`): every record then outlives its own life.
            let m = ToLink::Durable {
                ops,
                life_ms: 2 * life_ms,
                token,
            };
            match cl.link.send_or_keep(m, &self.metrics) {
                Ok(()) => add(&self.metrics.durable_written, adds),
                Err(m) => {
                    // Removals are kept for later (a record left behind could be sent
                    // again after its ACK); the writes' requests hear they failed.
                    if let ToLink::Durable { ops, .. } = m {
                        let dels = ops.into_iter().filter(|o| o.add.is_none());
                        for op in dels {
                            if cl.unsent.len() < UNSENT_MAX {
                                cl.unsent.push(op);
                            } else {
                                inc(&self.metrics.durable_dropped);
                            }
                        }
                    }
                    failed = Some(token);
                }
            }
        }
        let mut failed_reads = vec![];
        for m in std::mem::take(&mut cl.recover) {
            match cl.link.send_or_keep(m, &self.metrics) {
                Ok(()) => {}
                Err(ToLink::Recover { conn, .. }) => failed_reads.push(conn),
                Err(ToLink::Lookup { id, .. }) => {
                    cl.offer_of(id); // an offer that could not go: nobody is offered
                }
                Err(_) => {}
            }
        }
        if failed.is_some() || !failed_reads.is_empty() {
            self.more_done = true; // answers and replays now, flushed next turn
        }
        for conn in failed_reads {
            self.durable_recovered(conn, None);
        }
        if let Some(token) = failed {
            self.durable_written(token, false);
        }
    }

    /// The link wrote (or could not write) the records of token `token` and every earlier
    /// one: requests that waited for them (their last token) are answered if nothing else
    /// holds them.
    pub(super) fn durable_written(&mut self, token: u64, ok: bool) {
        if !ok {
            self.hold_off_checks();
        }
        loop {
            let Some(cl) = self.cluster.as_mut() else {
                return;
            };
            match cl.durable_waiting.front() {
                Some(&(t, _, _)) if t <= token => {}
                _ => return,
            }
            let (_, idx, gen) = cl.durable_waiting.pop_front().expect("checked");
            let now = self.now;
            let Some(r) = self.requests.get_mut(idx, gen) else {
                continue;
            };
            if !ok {
                for res in &mut r.results {
                    if res.durable == Some(true) {
                        res.durable = Some(false);
                        add(&self.metrics.durable_failed, res.tracked);
                    }
                }
            }
            if r.durable_token > token {
                continue; // a later turn wrote more of it: that token answers
            }
            r.durable_wait = false;
            let done = !r.delivering && (r.expires == 0 || r.left == 0 || r.expires <= now);
            if done {
                self.answer_wait(idx, gen);
            }
        }
    }

    /// A device's connection was admitted (or another node offered its pushes): in cluster
    /// mode its durable records are read and taken over (`durable_recovered`), and its
    /// `ack=1` pushes wait until they are in. False when no read could start.
    pub(super) fn recover(&mut self, r: Ref) -> bool {
        if !self.durable_kept() {
            return false;
        }
        let Some(c) = self.conns.get_mut(r.idx, r.gen) else {
            return false;
        };
        let (Some(device), Some(cl)) = (c.device.clone(), self.cluster.as_mut()) else {
            return false;
        };
        c.ws |= wsflag::RECOVERING;
        let app = cl.app_id(c.app);
        cl.recover.push(ToLink::Recover {
            conn: pack(r),
            app,
            device,
            only: None,
        });
        true
    }

    /// A device's records, read and taken over for connection `conn` (None: the read
    /// failed — it goes on with what this node holds), or for an adoption (`ADOPT`). Those
    /// this node does not hold are parked for it, in push order, with what waited since;
    /// those it holds take the new claim; the nodes that held them (and nodes that offered
    /// them) are told to let go. Then the device's parked pushes go to it.
    pub(super) fn durable_recovered(&mut self, conn: u64, records: Option<Vec<(String, Vec<u8>)>>) {
        if conn & ADOPT != 0 {
            self.adopted(conn, records);
            return;
        }
        let r = unpack(conn);
        let Some(c) = self.conns.get_mut(r.idx, r.gen) else {
            if let Some(cl) = self.cluster.as_mut() {
                cl.offerers.remove(&conn);
            }
            return; // gone: its records stay for the device's next connection
        };
        let reread = c.ws & wsflag::REREAD != 0;
        c.ws &= !(wsflag::RECOVERING | wsflag::REREAD);
        let (Some(device), app, user) = (c.device.clone(), c.app, c.user.clone()) else {
            return;
        };
        let owner = Owner {
            app,
            device: Some(device),
            user,
            conn: Some(r),
        };
        let offerers = match self.cluster.as_mut() {
            Some(cl) if !reread => cl.offerers.remove(&conn).unwrap_or_default(),
            _ => vec![],
        };
        let found = self.take_records(&owner, records.unwrap_or_default(), &offerers);
        add(&self.metrics.durable_recovered, found as u64);
        // Read again (an offer came during this read), or start sending.
        if !(reread && self.recover(r)) {
            self.replay_parked(r);
        }
    }

    /// Records read and taken over for `owner`'s device: parks those this node does not
    /// hold (returns how many), gives up the expired, tells their previous holders (and
    /// `offerers`) to let go.
    fn take_records(
        &mut self,
        owner: &Owner,
        records: Vec<(String, Vec<u8>)>,
        offerers: &[String],
    ) -> usize {
        let Some(device) = owner.device.clone() else {
            return 0;
        };
        let key = (owner.app, device);
        let (now, unix_now) = (self.now, unix_ms());
        let mut found = vec![];
        // Node → (field, claim) to let go of.
        let mut tell: HashMap<String, Vec<(String, u32)>> = HashMap::new();
        let mut expired = vec![];
        let mut rewrite = vec![];
        let app_id: Arc<str> = match self.cluster.as_ref() {
            Some(cl) => cl.app_id(key.0),
            None => return 0,
        };
        for (field, value) in records {
            let parsed = durable::parse_field(&field).zip(durable::decode(&value));
            let Some(((order, origin), rec)) = parsed else {
                inc(&self.metrics.cluster_bad_messages);
                continue;
            };
            let Some(frame) = Shared::from_body(rec.body) else {
                inc(&self.metrics.cluster_bad_messages);
                continue;
            };
            let claim = rec.claim.wrapping_add(1);
            let nodes = std::iter::once(rec.holder).chain(offerers.iter().map(String::as_str));
            for n in nodes.filter(|n| *n != self.cfg.node_id) {
                let list = tell.entry(n.to_string()).or_default();
                if !list.iter().any(|(f, _)| *f == field) {
                    list.push((field.clone(), claim));
                }
            }
            let origin = self.origins.intern(origin);
            // Who waits for its outcome: another node (told when it is done here), or this
            // one (a push it handed over and now takes back: its wait is found again).
            let (mut wait, mut waiter) = (None, None);
            if rec.waiter == self.cfg.node_id {
                wait = self
                    .cluster
                    .as_mut()
                    .and_then(|c| c.handed.remove(&(order, origin)));
            } else if !rec.waiter.is_empty() {
                waiter = Some(self.origins.intern(rec.waiter));
            }
            let mut p = Pending {
                frame,
                order,
                origin,
                claim,
                waiter,
                expires: match rec.expires_ms {
                    0 => u64::MAX,
                    e => now.saturating_add(e.saturating_sub(unix_now)),
                },
                wait: None,
            };
            // The copies held here report to that node only if it is live and hears from
            // this read that its copy was taken (then its wait moved to `handed`): else it
            // still counts its own copy, and a wait here on this one keeps counting it.
            let told = waiter.filter(|&n| {
                let name = self.origins.name(n);
                let live = self
                    .cluster
                    .as_ref()
                    .is_some_and(|c| c.link.view.is_live(name));
                live && (**name == *rec.holder || offerers.iter().any(|o| **o == **name))
            });
            if let Some(kept_wait) = self.hold_claim(&key, p.id(), claim, told) {
                if let (Some(cl), Some(w)) = (self.cluster.as_mut(), wait) {
                    cl.handed.insert(p.id(), w); // (its copy here has its wait already)
                }
                // This node has it (parked, or on a connection of the device). When the read
                // took it from another node, a copy this node took meanwhile (sent here by
                // the node the API call came to, which had not seen the device move yet)
                // had its record written at the old claim behind the read, landing after
                // its takeover: the copy would be taken for settled elsewhere at its first
                // check. Written again at the new claim, after it on this node's link.
                // (A record this node held already had no write of its behind the read:
                // turns flush their writes before their reads.)
                if rec.holder != self.cfg.node_id {
                    let waiter = match (told, kept_wait) {
                        (Some(_), _) | (None, false) => rec.waiter,
                        (None, true) => self.cfg.node_id.as_str(),
                    };
                    rewrite.push(DurOp {
                        app: Arc::clone(&app_id),
                        device: key.1.clone(),
                        field,
                        add: Some(DurRec {
                            expires: rec.expires_ms,
                            claim,
                            waiter: (!waiter.is_empty()).then(|| waiter.into()),
                            body: p.frame.body().clone(),
                        }),
                        // (Its hash may have gone meanwhile: written back, it expires.)
                        renew: true,
                    });
                }
                continue;
            }
            p.wait = wait;
            if rec.expires_ms != 0 && rec.expires_ms <= unix_now {
                expired.push(p);
            } else {
                found.push(p);
            }
        }
        let rewrote = !rewrite.is_empty() && self.durable_kept();
        if rewrote {
            if let Some(cl) = self.cluster.as_mut() {
                cl.durable.extend(rewrite);
            }
        }
        for p in expired {
            self.give_up(owner, &p, 0, GiveUp::Expired);
        }
        for (node, ids) in tell {
            self.send_take(node, &key, ids, false);
        }
        let n = found.len();
        if n > 0 || rewrote {
            let life_ms = 2 * self.durable_life_ms();
            if let Some(cl) = self.cluster.as_mut() {
                // They are this node's now: in its index, adopted in turn if it dies.
                let index = ToLink::Index {
                    app: cl.app_id(key.0),
                    device: key.1.clone(),
                    life_ms,
                };
                cl.link.send(index, &self.metrics);
            }
            if n > 0 {
                self.park(key, owner.user.clone(), found.into_iter());
            }
        }
        n
    }

    /// A dead node's devices (`Orphans`; or this node's own from its previous run): each
    /// device's records held by `node` are read and taken over (`adopted`).
    pub(super) fn adopt(&mut self, node: String, devices: Vec<(String, String)>) {
        self.adopt_again();
        for (app, device) in devices {
            let Some(a) = self.cfg.app_index(&app) else {
                inc(&self.metrics.cluster_bad_messages);
                continue;
            };
            self.adopt_one(node.clone(), (a as u16, device.as_str().into()));
        }
    }

    fn adopt_one(&mut self, node: String, key: DeviceKey) {
        let writable = self.durable_kept();
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if !writable {
            if cl.adopt_again.len() < UNSENT_MAX {
                cl.adopt_again.push((node, key));
            } else {
                inc(&self.metrics.durable_dropped);
            }
            return;
        }
        let (app, device) = (cl.app_id(key.0), key.1.clone());
        let (i, g) = cl.adopting.insert((node.clone(), key));
        cl.recover.push(ToLink::Recover {
            conn: ADOPT | pack(Ref { idx: i, gen: g }),
            app,
            device,
            only: Some(node),
        });
    }

    /// Redis is back: adoptions whose read could not be made are made now.
    pub(super) fn adopt_again(&mut self) {
        let again = self
            .cluster
            .as_mut()
            .map(|c| std::mem::take(&mut c.adopt_again))
            .unwrap_or_default();
        for (node, key) in again {
            self.adopt_one(node, key);
        }
    }

    /// An adopted device's records: parked here for the reconnect grace window (from now),
    /// handed to a connection of the device here if there is one, else offered to the
    /// nodes that have it; reported undelivered here if it does not come back.
    fn adopted(&mut self, id: u64, records: Option<Vec<(String, Vec<u8>)>>) {
        let r = unpack(id & !ADOPT);
        let Some((node, key)) = self
            .cluster
            .as_mut()
            .and_then(|c| c.adopting.remove(r.idx, r.gen))
        else {
            return;
        };
        let Some(records) = records else {
            // Not read (Redis away, or the link's queue full): again when Redis is back,
            // or with the next adoption.
            if let Some(cl) = self.cluster.as_mut() {
                if cl.adopt_again.len() < UNSENT_MAX {
                    cl.adopt_again.push((node, key));
                } else {
                    inc(&self.metrics.durable_dropped);
                }
            }
            return;
        };
        let owner = Owner {
            app: key.0,
            device: Some(key.1.clone()),
            user: None,
            conn: None,
        };
        let found = self.take_records(&owner, records, &[]);
        if found == 0 {
            return;
        }
        add(&self.metrics.durable_adopted, found as u64);
        match self.handover_target(&key) {
            Some(t) => self.replay_parked(t),
            None => self.offer_elsewhere(&key),
        }
    }

    /// Tells `node` to let go of `key`'s pushes `ids` (with the claims this node took them
    /// at), or (`offer`) that this node holds pushes of the device for it.
    fn send_take(&mut self, node: String, key: &DeviceKey, ids: Vec<(String, u32)>, offer: bool) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let (ids, claims) = ids.into_iter().unzip();
        let app = cl.app_id(key.0);
        let msg = crate::cluster::take(
            &self.cfg.node_id,
            unix_ms(),
            &app,
            &key.1,
            ids,
            claims,
            offer,
        );
        self.tell(node, msg);
    }

    /// Sends node message `msg` to `node` (no answer expected); a node that is not live
    /// has nothing to be told.
    fn tell(&mut self, node: String, msg: Vec<u8>) {
        if let Some(cl) = self.cluster.as_mut().filter(|c| c.link.view.is_live(&node)) {
            let m = ToLink::Send {
                node,
                request: None,
                msg,
            };
            cl.link.send(m, &self.metrics);
        }
    }

    /// Whether this node holds push `id` of `key`'s device (parked, or on one of its
    /// connections): then whether a copy of it still has a wait here. Its copies take
    /// claim `claim`, and `waiter`, another node that waits for the outcome and now hands
    /// its wait over: the outcome goes there. A wait here on such a copy is another part of
    /// the same request for the same delivery: it stops counting it (untracked), so the
    /// request counts the push once.
    fn hold_claim(
        &mut self,
        key: &DeviceKey,
        id: PushId,
        claim: u32,
        waiter: Option<u16>,
    ) -> Option<bool> {
        let (mut waits, mut kept, mut held) = (vec![], false, false);
        let mut take = |p: &mut Pending| {
            p.take_claim(claim, waiter, &mut waits);
            kept |= p.wait.is_some();
            held = true;
        };
        if let Some(q) = self.parked_mut(key) {
            q.iter_mut().filter(|p| p.id() == id).for_each(&mut take);
        }
        self.each_unacked(key, |q| {
            for u in q.iter_mut().filter(|u| u.push.id() == id) {
                take(&mut u.push);
            }
        });
        for w in waits {
            self.settle(w, Outcome::Untracked);
        }
        held.then_some(kept)
    }

    /// A message from node `from` about `device`'s pushes. `offer`: it parked some (their
    /// connection there went) and the device is here — a connection of it reads and takes
    /// them. Otherwise it took pushes `ids` over (claims `claims`): this node stops holding
    /// its copies of them taken at a lower claim — parked, or on a connection of the device
    /// still here — without reporting them (they go on there). A request here that waits
    /// for them counts them `pending`.
    pub(super) fn taken(
        &mut self,
        from: &str,
        app: &str,
        device: &str,
        ids: &[String],
        claims: &[u32],
        offer: bool,
    ) {
        let Some(a) = self.cfg.app_index(app) else {
            inc(&self.metrics.cluster_bad_messages);
            return;
        };
        if offer {
            self.offered(from, a, device);
            return;
        }
        let ids: Vec<(PushId, u32)> = ids
            .iter()
            .zip(claims.iter().copied().chain(std::iter::repeat(u32::MAX)))
            .filter_map(|(f, claim)| {
                let (order, origin) = durable::parse_field(f)?;
                Some(((order, self.origins.get(origin)?), claim))
            })
            .collect();
        if ids.is_empty() {
            return;
        }
        // A copy taken at a lower claim than the taker's (older: claims only go up).
        let stale = |id: PushId, claim: u32| {
            ids.iter()
                .any(|&(x, c)| x == id && (c.wrapping_sub(claim) as i32) > 0)
        };
        let key: DeviceKey = (a as u16, device.into());
        let mut gone = self.unpark_if(&key, &stale);
        self.each_unacked(&key, |q| {
            let (out, keep): (Vec<_>, Vec<_>) = std::mem::take(q)
                .into_iter()
                .partition(|u| stale(u.push.id(), u.push.claim));
            *q = keep.into();
            gone.extend(out.into_iter().map(|u| u.push));
        });
        add(&self.metrics.durable_taken, gone.len() as u64);
        // Their waits here are kept for the taker's word (`settled_here`).
        let now = self.now;
        let requests = &self.requests;
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        for p in gone {
            let Some(w) = p.wait else {
                continue;
            };
            if cl.handed.len() >= HANDED_MAX && now >= cl.handed_purged + 1000 {
                // Full: forget those whose request is answered (once a second at most).
                cl.handed_purged = now;
                cl.handed
                    .retain(|_, w| requests.get(w.idx, w.gen).is_some_and(|r| r.expires > now));
            }
            if cl.handed.len() >= HANDED_MAX {
                continue; // still full: that request counts it pending
            }
            cl.handed.insert(p.id(), w);
        }
    }

    /// A push done on another node (`done`: ACKed, else given up) that this node had taken
    /// over from `p.waiter`, where a request waits for it: that node is told.
    /// Returns whether it was told (a live node): then a give-up's `report` (the
    /// `undelivered` event) is its to post, unless its waiting request takes the outcome.
    pub(super) fn durable_settled(
        &mut self,
        device: Option<&DeviceKey>,
        p: &Pending,
        acked: bool,
        report: Vec<u8>,
    ) -> bool {
        let (Some(n), Some(key)) = (p.waiter, device) else {
            return false;
        };
        let field = self.durable_field(p.id());
        let node = self.origins.name(n).to_string();
        let Some(cl) = self.cluster.as_ref() else {
            return false;
        };
        if !cl.link.view.is_live(&node) {
            return false;
        }
        let app = cl.app_id(key.0);
        let msg = crate::cluster::settled(
            &self.cfg.node_id,
            unix_ms(),
            &app,
            &key.1,
            vec![field],
            acked,
            report,
        );
        self.tell(node, msg);
        true
    }

    /// Another node is done with pushes `ids` of `device` that it took over from this node:
    /// the requests here waiting for them count them.
    pub(super) fn settled_here(
        &mut self,
        app: &str,
        device: &str,
        ids: &[String],
        acked: bool,
        report: &[u8],
    ) {
        let _ = device;
        let mut taken = false;
        for f in ids {
            let Some((order, origin)) = durable::parse_field(f) else {
                continue;
            };
            let Some(origin) = self.origins.get(origin) else {
                continue;
            };
            let w = self
                .cluster
                .as_mut()
                .and_then(|c| c.handed.remove(&(order, origin)));
            if let Some(w) = w {
                let o = if acked {
                    Outcome::Acked
                } else {
                    Outcome::Undelivered
                };
                taken |= self.settle(w, o);
            }
        }
        // A give-up no request here took (it had its answer already): reported here, once.
        if !acked && !taken && !report.is_empty() {
            match (self.cfg.app_index(app), serde_json::from_slice(report)) {
                (Some(a), Ok(ev)) => self.post_undelivered(a, ev),
                _ => inc(&self.metrics.cluster_bad_messages),
            }
        }
    }

    /// Node `from` parked pushes of app `a`'s `device`: a connection of it here (one that
    /// can ACK, if there is one) reads its records again — after the read in flight, if
    /// there is one (served before `from` wrote, it may not have them).
    fn offered(&mut self, from: &str, a: usize, device: &str) {
        let conns: Vec<u32> = self.registry.device(a, device).to_vec();
        let pick = conns
            .iter()
            .filter_map(|&i| {
                self.conns
                    .by_index(i)
                    .map(|(c, gen)| (c, Ref { idx: i, gen }))
            })
            .filter(|(c, _)| c.state == super::conn::State::Open)
            .max_by_key(|(c, _)| super::reliable::can_ack(c))
            .map(|(_, r)| r);
        let Some(r) = pick else {
            return;
        };
        let started = match self.conns.get_mut(r.idx, r.gen) {
            Some(c) if c.ws & wsflag::RECOVERING != 0 => {
                c.ws |= wsflag::REREAD;
                true
            }
            _ => self.recover(r),
        };
        if let (true, Some(cl)) = (started, self.cluster.as_mut()) {
            let list = cl.offerers.entry(pack(r)).or_default();
            if !list.iter().any(|n| n == from) {
                list.push(from.to_string());
            }
        }
    }

    /// A connection leaves: nothing more is read for it.
    pub(super) fn durable_closed(&mut self, r: Ref) {
        if let Some(cl) = self.cluster.as_mut() {
            if !cl.offerers.is_empty() {
                cl.offerers.remove(&pack(r));
            }
        }
    }

    /// Pushes of `key`'s device were parked here (its connection went) with no other
    /// connection of it here: its routes are read (after this turn's record writes), and
    /// each other live node that has it is offered them — the device may be back there.
    pub(super) fn offer_elsewhere(&mut self, key: &DeviceKey) {
        if !self.durable_kept() {
            return;
        }
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let id = cl.offer_lookup(key.clone());
        cl.recover.push(ToLink::Lookup {
            id,
            app: cl.app_id(key.0),
            name: key.1.to_string(),
            user: false,
        });
    }

    /// The routes of a device whose pushes were parked here: the live nodes they name are
    /// offered them (None: the read failed, or never went).
    pub(super) fn offer_read(&mut self, id: u64, fields: Option<Vec<(String, String)>>) {
        let (at, young) = self.route_age();
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let (Some(key), Some(fields)) = (cl.offer_of(id), fields) else {
            return;
        };
        let live = cl.link.view.nodes();
        let (nodes, _) = crate::cluster::route_nodes(&fields, &live, &self.cfg.node_id, at, young);
        for node in nodes {
            self.send_take(node, &key, vec![], true);
        }
    }

    /// Redis is back: removals kept meanwhile are written, and every push held here is
    /// written again (durable again; a Redis that restarted empty has them back).
    pub(super) fn durable_resync(&mut self) -> usize {
        let (now, unix_now) = (self.now, unix_ms());
        let own = self.origins.name(0).clone();
        let rec = |p: &Pending| DurRec {
            expires: if p.expires == u64::MAX {
                0
            } else {
                unix_now.saturating_add(p.expires.saturating_sub(now))
            },
            claim: p.claim,
            waiter: match (p.wait, p.waiter) {
                (Some(_), _) => Some(own.clone()),
                (None, Some(n)) => Some(self.origins.name(n).clone()),
                (None, None) => None,
            },
            body: p.frame.body().clone(),
        };
        let mut adds: Vec<(DeviceKey, String, DurRec)> = vec![];
        for idx in 0..self.conns.slots() as u32 {
            let Some((c, _)) = self.conns.by_index(idx) else {
                continue;
            };
            let (Some(d), Some(e)) = (c.device.as_ref(), c.extra.as_ref()) else {
                continue;
            };
            for u in &e.acks.unacked {
                let p = &u.push;
                adds.push(((c.app, d.clone()), self.durable_field(p.id()), rec(p)));
            }
        }
        for (key, p) in self.parked_all() {
            adds.push((key, self.durable_field(p.id()), rec(p)));
        }
        let Some(cl) = self.cluster.as_mut() else {
            return 0;
        };
        let written = adds.len();
        let unsent = std::mem::take(&mut cl.unsent);
        if !unsent.is_empty() || !adds.is_empty() {
            log::info!(
                "cluster: writing {} durable pushes and {} removals",
                adds.len(),
                unsent.len()
            );
        }
        cl.durable.extend(unsent);
        for (key, field, rec) in adds {
            cl.durable.push(DurOp {
                app: cl.app_id(key.0),
                device: key.1,
                field,
                add: Some(rec),
                renew: true,
            });
        }
        written
    }

    // ---- copies on several nodes ---------------------------------------------------------

    /// Copies of `owner`'s device pushes about to be sent again (`resend`: seqid, frame,
    /// push) or given up (`ending`). Alone, or with Redis away, they go now: the resends are
    /// given back and the give-ups made. In a cluster, another node may hold copies of the
    /// same pushes (the device is connected there too, or its pushes were parked there):
    /// the records are asked first — a resend only if the record is still there (not ACKed
    /// or given up elsewhere), a give-up reported only by the node whose removal takes the
    /// record — and `checked` finishes the job. Returns the resends to send now.
    pub(super) fn check_copies(
        &mut self,
        r: Ref,
        owner: &Owner,
        resend: Vec<(u64, Shared, PushId, u32)>,
        ending: Vec<(Pending, u32, GiveUp)>,
    ) -> Vec<(u64, Shared, PushId, u32)> {
        if resend.is_empty() && ending.is_empty() {
            return resend;
        }
        // (Shutting down: nothing more goes to Redis to be waited for.)
        let checked = owner.device.is_some() && self.durable_kept() && self.shutdown_at.is_none();
        let now = self.now;
        let held_off = self
            .cluster
            .as_ref()
            .is_some_and(|cl| cl.checks.len() >= CHECKS_MAX || now < cl.unchecked_until);
        if !checked || held_off {
            if checked {
                inc(&self.metrics.durable_unchecked);
            }
            for (p, tries, why) in ending {
                self.give_up(owner, &p, tries, why);
            }
            return resend;
        }
        let mut fields = Vec::with_capacity(resend.len() + ending.len());
        let mut items = Vec::with_capacity(fields.capacity());
        for (seq, _, id, claim) in resend {
            fields.push((self.durable_field(id), false, claim));
            items.push(CheckItem::Resend { seq, id });
        }
        for (push, tries, why) in ending {
            fields.push((self.durable_field(push.id()), true, push.claim));
            items.push(CheckItem::GiveUp { push, tries, why });
        }
        let (Some(cl), Some(device)) = (self.cluster.as_mut(), owner.device.clone()) else {
            return vec![]; // (not reached: `checked`)
        };
        let app = cl.app_id(owner.app);
        let (i, g) = cl.checks.insert(Check {
            conn: r,
            owner: owner.clone(),
            items,
        });
        let m = ToLink::Check {
            id: u64::from(i) << 32 | u64::from(g),
            app,
            device,
            fields,
        };
        if let Err(ToLink::Check { id, .. }) = cl.link.send_or_keep(m, &self.metrics) {
            self.checked(id, None);
        }
        vec![]
    }

    /// Some records may be missing (a write failed, or Redis lost them): until they would
    /// have expired, copies are not checked against them (`check_copies` would take them
    /// for settled elsewhere).
    pub(super) fn hold_off_checks(&mut self) {
        let until = self.now + 2 * self.durable_life_ms();
        if let Some(cl) = self.cluster.as_mut() {
            cl.unchecked_until = cl.unchecked_until.max(until);
        }
    }

    /// The copies waiting for a check to be given up, taken out (at shutdown).
    pub(super) fn checks_pending(&mut self) -> Vec<(Owner, Pending, u32)> {
        let Some(cl) = self.cluster.as_mut() else {
            return vec![];
        };
        let mut out = vec![];
        for (i, g) in cl.checks.keys() {
            let Some(ch) = cl.checks.remove(i, g) else {
                continue;
            };
            for item in ch.items {
                if let CheckItem::GiveUp { push, tries, .. } = item {
                    out.push((ch.owner.clone(), push, tries));
                }
            }
        }
        out
    }

    /// A check's answer (`check_copies`; None: it failed — everything goes on as if alone).
    pub(super) fn checked(&mut self, id: u64, found: Option<Vec<bool>>) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let Some(ch) = cl.checks.remove((id >> 32) as u32, id as u32) else {
            return;
        };
        let r = ch.conn;
        let found = found.unwrap_or_default();
        let mut resend = vec![];
        for (i, item) in ch.items.into_iter().enumerate() {
            let there = found.get(i).copied().unwrap_or(true);
            match item {
                CheckItem::Resend { seq, id } => {
                    let Some(e) = self
                        .conns
                        .get_mut(r.idx, r.gen)
                        .filter(|c| c.state == super::conn::State::Open)
                        .and_then(|c| c.extra.as_mut())
                    else {
                        continue; // gone meanwhile: parked or given up with the rest
                    };
                    let q = &mut e.acks.unacked;
                    let Some(at) = q.iter().position(|u| u.seq == seq && u.push.id() == id) else {
                        continue; // ACKed or taken meanwhile
                    };
                    if there {
                        resend.push((seq, q[at].push.frame.clone()));
                    } else {
                        // ACKed (or given up) on another node: never sent again.
                        let u = q.remove(at).expect("found");
                        inc(&self.metrics.durable_elsewhere);
                        self.redundant(u.push);
                    }
                }
                CheckItem::GiveUp { push, tries, why } => {
                    if there {
                        self.give_up(&ch.owner, &push, tries, why);
                    } else {
                        inc(&self.metrics.durable_elsewhere);
                        self.redundant(push);
                    }
                }
            }
        }
        self.send_again(r, resend);
    }
}

/// Checks outstanding at most; past it, copies go on unchecked (counted).
const CHECKS_MAX: usize = 65_536;

/// Copies of one device's pushes waiting for their records' check (`check_copies`).
pub(super) struct Check {
    /// The connection holding the resends (`u32::MAX`: none, parked copies).
    conn: Ref,
    owner: Owner,
    items: Vec<CheckItem>,
}

enum CheckItem {
    Resend {
        seq: u64,
        id: PushId,
    },
    GiveUp {
        push: Pending,
        tries: u32,
        why: GiveUp,
    },
}
