//! Drain (docs/OPERATIONS.md): `POST /v1/drain[?deadline_ms=N]` or SIGUSR1. The node stops
//! accepting, leaves `/v1/endpoints` (its heartbeat says it drains), and moves its clients
//! away at `[drain] rate` per second: a TCP or pbbp2 client gets `REDIRECT` with header
//! `endpoint` (the least-loaded other live node's address for its transport, else
//! `[drain] redirect_tcp` / `redirect_ws`), a raw WebSocket client a close 1012 naming the
//! same endpoint in its reason, a long-poll waiter its answer as at a timeout. Their
//! connections close; with a cluster, their unacknowledged pushes stay in Redis for their
//! next connection (at exit, as at a shutdown). When no client is left, or at the deadline,
//! the node shuts down as on SIGTERM and exits 0.

use serde_json::json;

use super::conn::{wsflag, State};
use super::{Reactor, Role};
use crate::metrics::{CloseReason, Transport};
use crate::proto::{method, Frame};
use crate::ws;

/// Each drain step moves a share of `[drain] rate`; steps are this far apart.
const STEP_MS: u64 = 10;
/// Clients one step moves at most (however high the rate, a turn stays short).
const STEP_MAX: u64 = 2_000;

pub(super) struct Draining {
    /// When the node exits with whoever is left.
    deadline: u64,
    /// The next step.
    pub next_at: u64,
    /// Where the last step stopped among the connection slots.
    cursor: u32,
    /// Moves earned (× 1000) at `rate` since the last step, and when that was.
    credit: u64,
    last: u64,
}

impl Reactor {
    pub(super) fn draining(&self) -> bool {
        self.drain.is_some()
    }

    /// Starts draining (again: a new deadline). Returns the API answer's body.
    pub(super) fn start_drain(&mut self, deadline_ms: Option<u64>) -> serde_json::Value {
        let ms = deadline_ms.unwrap_or(self.cfg.drain.deadline_ms);
        if self.shutdown_at.is_some() {
            return json!({"draining": false, "error": "shutting down"});
        }
        if self.drain.is_none() {
            let rate = self.cfg.drain.rate;
            log::info!(
                "draining: moving {} clients away, {rate} per second, within {ms} ms",
                self.client_conns
            );
            let can = rate.saturating_mul(ms) / 1000;
            if self.client_conns as u64 > can {
                log::warn!(
                    "draining: at {rate}/s only ~{can} of {} clients move before the deadline; \
                     the rest get a shutdown BYE (raise [drain] rate or deadline_ms)",
                    self.client_conns
                );
            }
            self.stop_accepting(false);
            self.view.set_draining();
            self.metrics
                .draining
                .store(1, std::sync::atomic::Ordering::Relaxed);
        }
        let deadline = self.now + ms;
        // (The first step comes a step later: the answer to the call that started it goes
        // out first, even when there is nobody to move and the node shuts down at once.)
        self.drain = Some(Draining {
            deadline,
            next_at: self.now + STEP_MS,
            cursor: 0,
            credit: 0,
            last: self.now,
        });
        json!({"draining": true, "connections": self.client_conns, "deadline_ms": ms})
    }

    /// A drain step, when one is due: the next share of clients moved away; the end of the
    /// drain when none is left or its deadline has passed.
    pub(super) fn drain_step(&mut self) {
        let Some(d) = self.drain.as_ref() else {
            return;
        };
        if self.now < d.next_at {
            return;
        }
        if self.client_conns == 0 || self.now >= d.deadline {
            log::info!(
                "drained ({} clients left): shutting down",
                self.client_conns
            );
            self.drain = None;
            self.begin_shutdown();
            return;
        }
        let rate = self.cfg.drain.rate;
        let earned = rate.saturating_mul(self.now.saturating_sub(d.last));
        // (At most a second's worth is saved up.)
        let credit = (d.credit + earned).min(rate.saturating_mul(1000).max(1000));
        let budget = (credit / 1000).min(STEP_MAX);
        let credit = credit - budget * 1000;
        let budget = budget as usize;
        let targets = self.redirect_endpoints();
        let slots = self.conns.slots() as u32;
        let mut cursor = d.cursor;
        let mut moved = 0;
        let mut seen = 0;
        while moved < budget && seen < slots {
            let idx = cursor % slots.max(1);
            cursor = cursor.wrapping_add(1);
            seen += 1;
            let Some((c, gen)) = self.conns.by_index(idx) else {
                continue;
            };
            match (c.role, c.state) {
                (Role::Http, State::Waiting) => {
                    // Its answer, and the end of its (keep-alive) connection.
                    self.poll_end(idx, gen, CloseReason::Drained);
                    moved += 1;
                    continue;
                }
                (Role::Http, State::Hello) if c.inbuf.is_empty() => {
                    // An idle keep-alive connection of the client HTTP listener.
                    self.close_after_flush(idx, gen, CloseReason::Drained);
                    continue;
                }
                (_, State::Open) => {}
                _ => continue,
            }
            match c.role {
                Role::Client(t) => {
                    // Spread over the other nodes, least loaded first. A TLS client is
                    // never sent to a clear endpoint: [drain] redirect_tcp_tls /
                    // redirect_wss, or none (it dials its usual, TLS, address again).
                    let (tcp, ws) = &targets[moved % targets.len()];
                    let d = &self.cfg.drain;
                    let to = match (c.sock.is_tls(), t) {
                        (true, Transport::Tcp) => &d.redirect_tcp_tls,
                        (true, _) => &d.redirect_wss,
                        (false, Transport::Tcp) => tcp,
                        (false, _) => ws,
                    }
                    .clone();
                    if t == Transport::Ws && c.ws & wsflag::PBBP2 == 0 {
                        // Raw mode has no REDIRECT: the endpoint rides in the close's reason.
                        let reason = raw_drain_reason(&to);
                        self.ws_close(idx, gen, ws::status::SERVICE_RESTART, &reason);
                    } else {
                        let mut h = vec![("reason", "draining")];
                        if !to.is_empty() {
                            h.push(("endpoint", to.as_str()));
                        }
                        self.send_frame(idx, gen, &Frame::control(method::REDIRECT, 0, &h));
                        if t == Transport::Ws {
                            self.ws_close(idx, gen, ws::status::SERVICE_RESTART, "draining");
                        }
                    }
                    self.close_after_flush(idx, gen, CloseReason::Drained);
                }
                _ => continue,
            }
            moved += 1;
        }
        if let Some(d) = self.drain.as_mut() {
            d.cursor = cursor;
            d.credit = credit;
            d.last = self.now;
            d.next_at = self.now + STEP_MS;
        }
    }

    /// Where drained clients go, (tcp, ws) each: the other live nodes that are not
    /// draining (the cluster's view), least loaded first; else `[drain] redirect_tcp` /
    /// `redirect_ws`. Never empty.
    fn redirect_endpoints(&self) -> Vec<(String, String)> {
        let mut nodes: Vec<_> = self
            .view
            .nodes()
            .into_iter()
            .filter(|n| n.node_id != self.cfg.node_id && !n.draining)
            .collect();
        nodes.sort_by(|a, b| a.load.total_cmp(&b.load));
        let d = &self.cfg.drain;
        let or = |s: &String, dflt: &String| {
            if s.is_empty() {
                dflt.clone()
            } else {
                s.clone()
            }
        };
        let mut v: Vec<_> = nodes
            .iter()
            .map(|n| (or(&n.tcp, &d.redirect_tcp), or(&n.ws, &d.redirect_ws)))
            .collect();
        if v.is_empty() {
            v.push((d.redirect_tcp.clone(), d.redirect_ws.clone()));
        }
        v
    }
}

/// A raw WebSocket client's close reason at a drain: `draining; endpoint=URL`, or
/// `draining` when no endpoint is known or it would not fit the 123 bytes a close reason
/// may hold (cut, it would name a wrong address).
fn raw_drain_reason(to: &str) -> std::borrow::Cow<'static, str> {
    const HEAD: &str = "draining; endpoint=";
    if to.is_empty() || HEAD.len() + to.len() > 123 {
        "draining".into()
    } else {
        format!("{HEAD}{to}").into()
    }
}

#[cfg(test)]
mod tests {
    use super::raw_drain_reason;

    #[test]
    fn a_raw_clients_drain_reason_names_the_endpoint_when_it_fits() {
        assert_eq!(raw_drain_reason(""), "draining");
        assert_eq!(
            raw_drain_reason("ws://10.0.0.2:7101/ws"),
            "draining; endpoint=ws://10.0.0.2:7101/ws"
        );
        let fits = format!("ws://{}/ws", "h".repeat(123 - 19 - 8));
        assert_eq!(raw_drain_reason(&fits).len(), 123);
        assert_eq!(raw_drain_reason(&format!("{fits}x")), "draining");
    }
}
