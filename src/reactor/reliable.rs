//! `ack=1` pushes (DESIGN.md §6): kept per connection until the client ACKs their seqid,
//! retransmitted from the timer wheel (first after `ack_timeout_ms`, doubling), given up and
//! counted after `max_retries`. One wheel entry per connection with pushes waiting, at the
//! earliest retransmit. Raw WebSocket has no ACKs, so there such pushes are not tracked.

use std::collections::HashMap;

use super::*;
use crate::metrics::add;

/// Queues an `ack=1` push just sent to `c` (seqid `seq`) for its ACK, arming the
/// connection's retransmit timer when it is the first one waiting.
pub(super) fn track(c: &mut Conn, r: Ref, seq: u64, frame: &Shared, due: u64, wheel: &mut Wheel) {
    let e = c.ext.get_or_insert_with(Default::default);
    if e.unacked.is_empty() {
        wheel.insert(
            due,
            TimerKey {
                idx: r.idx,
                gen: r.gen,
                kind: TimerKind::Retransmit,
            },
        );
    }
    e.unacked.push_back(Unacked {
        seq,
        frame: frame.clone(),
        tries: 0,
        due,
    });
}

/// A push waiting for its ACK.
pub(super) struct Unacked {
    pub seq: u64,
    pub frame: Shared,
    pub tries: u32,
    pub due: u64,
}

impl Reactor {
    /// The client acknowledged downstream seqid `seq`.
    pub(super) fn on_ack(&mut self, idx: u32, gen: u32, seq: u64) {
        let Some(e) = self.conns.get_mut(idx, gen).and_then(|c| c.ext.as_mut()) else {
            return;
        };
        if let Some(pos) = e.unacked.iter().position(|u| u.seq == seq) {
            e.unacked.remove(pos);
            inc(&self.metrics.acked);
        }
    }

    /// The retransmit timer: send again what is due (same seqid), give up what has had its
    /// retries, re-arm at the next due time.
    pub(super) fn retransmit(&mut self, k: TimerKey) {
        let (now, timeout, max) = (
            self.now,
            self.cfg.limits.ack_timeout_ms,
            self.cfg.limits.max_retries,
        );
        let Some(c) = self.conns.get_mut(k.idx, k.gen) else {
            return;
        };
        if c.state != State::Open {
            return;
        }
        let Some(e) = c.ext.as_mut() else {
            return;
        };
        let mut resend: Vec<(u64, Shared)> = vec![];
        let mut gave_up = 0;
        e.unacked.retain_mut(|u| {
            if u.due > now {
                return true;
            }
            if u64::from(u.tries) >= max {
                gave_up += 1;
                return false;
            }
            u.tries += 1;
            u.due = now + (timeout << u.tries.min(16));
            resend.push((u.seq, u.frame.clone()));
            true
        });
        let next = e.unacked.iter().map(|u| u.due).min();
        add(&self.metrics.undelivered, gave_up);
        add(&self.metrics.retransmits, resend.len() as u64);
        for (seq, f) in resend {
            self.queue(k.idx, k.gen, true, |role, mode, out| {
                write_push(&f, seq, role, mode, out)
            });
        }
        if let Some(at) = next {
            self.wheel.insert(at, k);
        }
    }
}

/// Unacknowledged pushes of devices whose connection went, waiting (the reconnect grace
/// window) for the device's next connection. In a slab so grace timers can name entries.
#[derive(Default)]
pub(super) struct Parked {
    entries: Slab<ParkedDevice>,
    index: HashMap<(u16, Arc<str>), (u32, u32)>,
}

struct ParkedDevice {
    key: (u16, Arc<str>),
    /// In the order they were first sent.
    pushes: Vec<Shared>,
    expires: u64,
}

impl Reactor {
    /// A connection is gone: its unacknowledged pushes wait for the device to come back,
    /// or, with no grace window (or no device), are counted undelivered at once.
    pub(super) fn park_unacked(&mut self, c: &mut Conn) {
        let Some(e) = c.ext.as_mut() else {
            return;
        };
        if e.unacked.is_empty() {
            return;
        }
        let grace = self.cfg.limits.reconnect_grace_ms;
        let Some(device) = c.device.clone().filter(|_| grace > 0) else {
            add(&self.metrics.undelivered, e.unacked.len() as u64);
            e.unacked.clear();
            return;
        };
        let key = (c.app, device);
        let (i, g) = match self.parked.index.get(&key) {
            Some(&ig) => ig,
            None => {
                let ig = self.parked.entries.insert(ParkedDevice {
                    key: key.clone(),
                    pushes: vec![],
                    expires: 0,
                });
                self.parked.index.insert(key, ig);
                ig
            }
        };
        let p = self.parked.entries.get_mut(i, g).expect("just found");
        p.pushes.extend(e.unacked.drain(..).map(|u| u.frame));
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

    /// The grace window of a parked device ran out: its pushes are undelivered.
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
            add(&self.metrics.undelivered, p.pushes.len() as u64);
        }
    }

    /// A device came back: its parked pushes go first, in order, as `ack=1` pushes of the new
    /// connection (new seqids), before anything pushed from now on.
    pub(super) fn replay_parked(&mut self, r: Ref) {
        let Some(c) = self.conns.get(r.idx, r.gen) else {
            return;
        };
        let Some(device) = c.device.clone() else {
            return;
        };
        let Some((i, g)) = self.parked.index.remove(&(c.app, device)) else {
            return;
        };
        let Some(p) = self.parked.entries.remove(i, g) else {
            return;
        };
        for f in p.pushes {
            self.send_tracked(r, &f);
        }
    }

    /// Sends one `ack=1` push to a connection and tracks it (the push path does the same
    /// inline, with its borrows split for fan-out).
    fn send_tracked(&mut self, r: Ref, f: &Shared) {
        let (now, ack_timeout) = (self.now, self.cfg.limits.ack_timeout_ms);
        let Some(c) = self.conns.get_mut(r.idx, r.gen) else {
            return;
        };
        let tracked = c.role == Role::Client(Transport::Tcp) || c.ws & wsflag::PBBP2 != 0;
        c.seq += 1;
        let seq = c.seq;
        if tracked {
            track(c, r, seq, f, now + ack_timeout, &mut self.wheel);
        }
        inc(&self.metrics.replayed);
        self.queue(r.idx, r.gen, true, |role, mode, out| {
            write_push(f, seq, role, mode, out)
        });
    }
}
