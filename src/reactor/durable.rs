//! Reliable pushes across nodes (docs/CLUSTER.md, "Reliable pushes"). In cluster mode every
//! tracked `ack=1` copy is also a record in its device's hash in Redis (`cluster::durable`),
//! written with the turn's other writes before the API answers, removed when it is ACKed,
//! given up, or delivered untracked. A device's connection admitted on any node first reads
//! that hash: what it finds goes to it first, in push order (its new `ack=1` pushes wait
//! parked meanwhile), and the node that held those pushes is told to stop (`NodeTake`).
//! Records are written by the node that holds the push (the record names it), so a node
//! that dies leaves them for the device's next connection on another node.

use std::collections::HashMap;
use std::sync::Arc;

use super::conn::wsflag;
use super::reliable::{DeviceKey, GiveUp, Owner, Pending, PushId};
use super::Reactor;
use crate::cluster::durable;
use crate::cluster::link::{DurOp, ToLink};
use crate::codec::Shared;
use crate::metrics::{add, inc};
use crate::types::{unix_ms, Ref};

/// Durable removals kept while Redis is away, written when it is back; past this they are
/// dropped (counted): such a record lingers until its hash expires, and a device that comes
/// back on another node before that may get an acknowledged push again.
const UNSENT_MAX: usize = 1 << 20;

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
    /// for them are answered when it says they are done (`durable_written`).
    pub(super) fn flush_durable(&mut self) {
        let life_ms = self.durable_life_ms();
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        // Reads go after the turn's route writes (flushed just before): a push that finds
        // the new route comes after the read, and waits parked for it.
        let reads = std::mem::take(&mut cl.recover);
        let mut failed_reads = vec![];
        for m in reads {
            let conn = match &m {
                ToLink::Recover { conn, .. } => *conn,
                _ => continue,
            };
            if !cl.link.send(m, &self.metrics) {
                failed_reads.push(conn);
            }
        }
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
            if cl.link.send(m, &self.metrics) {
                add(&self.metrics.durable_written, adds);
            } else {
                failed = Some(token);
                self.more_done = true; // answers now, flushed next turn
            }
        }
        for conn in failed_reads {
            self.durable_recovered(conn, None);
        }
        if let Some(token) = failed {
            self.durable_written(token, false);
        }
    }

    /// The link wrote (or could not write) the records of token `token` and every earlier
    /// one: requests that waited for them are answered if nothing else holds them.
    pub(super) fn durable_written(&mut self, token: u64, ok: bool) {
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
            r.durable_wait = false;
            if !ok {
                for res in &mut r.results {
                    if res.durable == Some(true) {
                        res.durable = Some(false);
                        add(&self.metrics.durable_failed, res.tracked);
                    }
                }
            }
            let done = !r.delivering && (r.expires == 0 || r.left == 0 || r.expires <= now);
            if done {
                self.answer_wait(idx, gen);
            }
        }
    }

    /// A device's connection was admitted: in cluster mode its durable records are read
    /// (`durable_recovered`), and its `ack=1` pushes wait until they are in.
    pub(super) fn recover(&mut self, r: Ref) {
        if !self.durable_kept() {
            return;
        }
        let Some(c) = self.conns.get_mut(r.idx, r.gen) else {
            return;
        };
        let (Some(device), Some(cl)) = (c.device.clone(), self.cluster.as_mut()) else {
            return;
        };
        c.ws |= wsflag::RECOVERING;
        let app = cl.app_id(c.app);
        cl.recover.push(ToLink::Recover {
            conn: pack(r),
            app,
            device,
        });
    }

    /// A device's records read for connection `conn` (None: the read failed — it goes on
    /// with what this node holds): those this node does not hold already are parked for
    /// it, in push order, ahead of anything pushed since; their holders are told to stop;
    /// the records now name this node. Then the device's parked pushes go to it.
    pub(super) fn durable_recovered(&mut self, conn: u64, records: Option<Vec<(String, Vec<u8>)>>) {
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
        // Nodes that offered this device's pushes: they are told to let go of every one
        // read (they may hold copies of records that name another node).
        let offerers = match self.cluster.as_mut() {
            Some(cl) if !reread => cl.offerers.remove(&conn).unwrap_or_default(),
            _ => vec![],
        };
        let key = (app, device.clone());
        let owner = Owner {
            app,
            device: Some(device.clone()),
            user: user.clone(),
            conn: Some(r),
        };
        let (now, unix_now) = (self.now, unix_ms());
        let mut found = vec![];
        let mut holders: HashMap<String, Vec<String>> = HashMap::new();
        let mut expired = vec![];
        for (field, value) in records.unwrap_or_default() {
            let parsed = durable::parse_field(&field).zip(durable::decode(&value));
            let Some(((order, origin), rec)) = parsed else {
                inc(&self.metrics.cluster_bad_messages);
                continue;
            };
            let Some(frame) = Shared::from_body(rec.body) else {
                inc(&self.metrics.cluster_bad_messages);
                continue;
            };
            let origin = self.origins.intern(origin);
            let p = Pending {
                frame,
                order,
                origin,
                expires: match rec.expires_ms {
                    0 => u64::MAX,
                    e => now + e.saturating_sub(unix_now),
                },
                wait: None,
            };
            if rec.holder != self.cfg.node_id {
                holders
                    .entry(rec.holder.to_string())
                    .or_default()
                    .push(field.clone());
            }
            for o in offerers.iter().filter(|o| **o != rec.holder) {
                holders.entry(o.clone()).or_default().push(field.clone());
            }
            if self.holds(&key, p.id()) {
                continue; // this node has it (parked, or on another connection of the device)
            }
            if rec.expires_ms != 0 && rec.expires_ms <= unix_now {
                expired.push(p);
            } else {
                found.push((field, p));
            }
        }
        for p in expired {
            self.give_up(&owner, &p, 0, GiveUp::Expired);
        }
        let deadlines: Vec<u64> = found
            .iter()
            .map(|(_, p)| self.unix_deadline_of(p.expires, now, unix_now))
            .collect();
        if let Some(cl) = self.cluster.as_mut() {
            let view = cl.link.view.clone();
            for (node, ids) in holders {
                if view.is_live(&node) {
                    let msg = crate::cluster::take(
                        &self.cfg.node_id,
                        unix_now,
                        cl.app_id(app).as_ref(),
                        &device,
                        ids,
                        false,
                    );
                    cl.link.send(
                        ToLink::Send {
                            node,
                            request: None,
                            msg,
                        },
                        &self.metrics,
                    );
                }
            }
            // The records name this node now (the link writes its own id as the holder).
            for ((field, p), exp) in found.iter().zip(deadlines) {
                cl.durable.push(DurOp {
                    app: cl.app_id(app),
                    device: device.clone(),
                    field: field.clone(),
                    add: Some((exp, p.frame.body().clone())),
                    renew: true,
                });
            }
        }
        if !found.is_empty() {
            add(&self.metrics.durable_recovered, found.len() as u64);
            self.park(key, user, found.into_iter().map(|(_, p)| p));
        }
        if reread {
            self.recover(r); // what this read found waits parked for the next one
        } else {
            self.replay_parked(r);
        }
    }

    fn unix_deadline_of(&self, at: u64, now: u64, unix_now: u64) -> u64 {
        if at == u64::MAX {
            0
        } else {
            unix_now + at.saturating_sub(now)
        }
    }

    /// Whether this node holds push `id` of `key`'s device: parked, or on one of its
    /// connections.
    fn holds(&self, key: &(u16, Arc<str>), id: PushId) -> bool {
        if self.parked_has(key, id) {
            return true;
        }
        self.registry
            .device(key.0 as usize, &key.1)
            .iter()
            .filter_map(|&i| self.conns.by_index(i))
            .filter_map(|(c, _)| c.extra.as_ref())
            .any(|e| e.acks.unacked.iter().any(|u| u.push.id() == id))
    }

    /// Another node took `device`'s pushes `ids` (its new connection is there): this node
    /// stops holding its copies of them — parked, or on a connection of the device that is
    /// still here — without reporting them (they go on there). A request here that waits
    /// for them counts them `pending`.
    pub(super) fn taken(
        &mut self,
        from: &str,
        app: &str,
        device: &str,
        ids: &[String],
        offer: bool,
    ) {
        let Some(a) = self.cfg.app_index(app) else {
            inc(&self.metrics.cluster_bad_messages);
            return;
        };
        if offer {
            // Another node parked pushes of this device: a connection of it here reads the
            // device's records and takes them (one that can ACK, if there is one).
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
            if let Some(cl) = self.cluster.as_mut() {
                cl.offerers
                    .entry(pack(r))
                    .or_default()
                    .push(from.to_string());
            }
            match self.conns.get_mut(r.idx, r.gen) {
                // A read in flight may have been served before the offerer wrote: again.
                Some(c) if c.ws & wsflag::RECOVERING != 0 => c.ws |= wsflag::REREAD,
                _ => self.recover(r),
            }
            return;
        }
        let ids: Vec<PushId> = ids
            .iter()
            .filter_map(|f| durable::parse_field(f))
            .filter_map(|(order, origin)| Some((order, self.origins.get(origin)?)))
            .collect();
        if ids.is_empty() {
            return;
        }
        let key: (u16, Arc<str>) = (a as u16, device.into());
        let mut n = self.unpark(&key, &ids);
        let conns: Vec<u32> = self.registry.device(a, device).to_vec();
        for i in conns {
            let Some(e) = self
                .conns
                .by_index_mut(i)
                .and_then(|(c, _)| c.extra.as_mut())
            else {
                continue;
            };
            let before = e.acks.unacked.len();
            e.acks.unacked.retain(|u| !ids.contains(&u.push.id()));
            n += before - e.acks.unacked.len();
        }
        add(&self.metrics.durable_taken, n as u64);
    }

    /// Pushes of `key`'s device were parked here (its connection went) with no other
    /// connection of it here: its routes are read, and each other live node that has it is
    /// offered them (`taken` with `offer`) — the device may already be back there.
    pub(super) fn offer_elsewhere(&mut self, key: &DeviceKey) {
        if !self.durable_kept() {
            return;
        }
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let id = cl.offer_lookup(key.clone());
        let ask = ToLink::Lookup {
            id,
            app: cl.app_id(key.0),
            name: key.1.to_string(),
            user: false,
        };
        if !cl.link.send(ask, &self.metrics) {
            cl.offer_of(id);
        }
    }

    /// The routes of a device whose pushes were parked here: the live nodes they name are
    /// offered them.
    pub(super) fn offer_read(&mut self, id: u64, fields: Option<Vec<(String, String)>>) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let (Some(key), Some(fields)) = (cl.offer_of(id), fields) else {
            return;
        };
        let live = cl.link.view.nodes();
        let (nodes, _) = crate::cluster::route_nodes(&fields, &live, &self.cfg.node_id);
        let app = cl.app_id(key.0);
        for node in nodes {
            let msg =
                crate::cluster::take(&self.cfg.node_id, unix_ms(), &app, &key.1, vec![], true);
            cl.link.send(
                ToLink::Send {
                    node,
                    request: None,
                    msg,
                },
                &self.metrics,
            );
        }
    }

    /// Redis is back: removals kept meanwhile are written, and every push held here is
    /// written again (durable again; a Redis that restarted empty has them back).
    pub(super) fn durable_resync(&mut self) {
        let (now, unix_now) = (self.now, unix_ms());
        let mut adds: Vec<(DeviceKey, PushId, u64, bytes::Bytes)> = vec![];
        for idx in 0..self.conns.slots() as u32 {
            let Some((c, _)) = self.conns.by_index(idx) else {
                continue;
            };
            let (Some(d), Some(e)) = (c.device.as_ref(), c.extra.as_ref()) else {
                continue;
            };
            for u in &e.acks.unacked {
                let exp = self.unix_deadline_of(u.push.expires, now, unix_now);
                adds.push((
                    (c.app, d.clone()),
                    u.push.id(),
                    exp,
                    u.push.frame.body().clone(),
                ));
            }
        }
        for (key, p) in self.parked_all() {
            let exp = self.unix_deadline_of(p.expires, now, unix_now);
            adds.push((key, p.id(), exp, p.frame.body().clone()));
        }
        let fields: Vec<String> = adds.iter().map(|a| self.durable_field(a.1)).collect();
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let unsent = std::mem::take(&mut cl.unsent);
        if !unsent.is_empty() || !adds.is_empty() {
            log::info!(
                "cluster: writing {} durable pushes and {} removals",
                adds.len(),
                unsent.len()
            );
        }
        cl.durable.extend(unsent);
        for ((key, _, exp, body), field) in adds.into_iter().zip(fields) {
            cl.durable.push(DurOp {
                app: cl.app_id(key.0),
                device: key.1,
                field,
                add: Some((exp, body)),
                renew: true,
            });
        }
    }
}
