//! `ack=1` pushes (DESIGN.md §6): kept per connection until the client ACKs their seqid,
//! retransmitted from the timer wheel (first after `ack_timeout_ms`, doubling), given up and
//! counted after `max_retries`. One wheel entry per connection with pushes waiting, at the
//! earliest retransmit. Raw WebSocket has no ACKs, so there such pushes are not tracked.

use super::*;
use crate::metrics::add;

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
            self.queue(k.idx, k.gen, true, |role, mode, out| match role {
                Role::Client(Transport::Ws) if mode & wsflag::PBBP2 != 0 => {
                    f.write_ws_pbbp2(seq, out)
                }
                _ => f.write_tcp(seq, out),
            });
        }
        if let Some(at) = next {
            self.wheel.insert(at, k);
        }
    }

    /// A closing connection's unacknowledged pushes are undelivered.
    pub(super) fn unacked_lost(&self, c: &Conn) {
        if let Some(e) = c.ext.as_ref() {
            add(&self.metrics.undelivered, e.unacked.len() as u64);
        }
    }
}
