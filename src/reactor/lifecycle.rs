//! A connection's life after accept, driven by the reactor: admission (the worker's or auth
//! backend's answer), the timer wheel's deadlines, worker results, and shutdown on a signal.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;

use super::conn::{flag, State};
use super::{Reactor, Role, DONE_BATCH, SHUTDOWN_GRACE_MS};
use crate::http;
use crate::metrics::{inc, CloseReason, Transport};
use crate::timer::{TimerKey, TimerKind};
use crate::types::{Admit, Ref};
use crate::worker::Done;
use crate::ws;

impl Reactor {
    // ---- timers ----------------------------------------------------------------------

    pub(super) fn fire_timers(&mut self) {
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(self.now, &mut fired);
        for k in fired.drain(..) {
            if k.kind == TimerKind::StatusExpire {
                self.status_expired(k);
                continue;
            }
            if k.kind == TimerKind::GraceExpire {
                self.grace_expired(k);
                continue;
            }
            if k.kind == TimerKind::SlowCheck {
                self.slow_check(k);
                continue;
            }
            if k.kind == TimerKind::WaitExpire {
                self.wait_expired(k);
                continue;
            }
            if k.kind == TimerKind::RpcExpire {
                self.rpc_expired(k);
                continue;
            }
            let Some(c) = self.conns.get(k.idx, k.gen) else {
                continue;
            };
            let stale = self.now < c.deadline;
            match k.kind {
                TimerKind::StatusExpire => {}
                TimerKind::Retransmit => self.retransmit(k),
                TimerKind::GraceExpire
                | TimerKind::WaitExpire
                | TimerKind::SlowCheck
                | TimerKind::RpcExpire => {}
                TimerKind::PollTimeout => {
                    if c.state == State::Waiting && !stale {
                        self.poll_timed_out(k.idx, k.gen);
                    }
                }
                TimerKind::Handshake if c.role == Role::Api => {
                    // An API request begun and not whole by its deadline: 408, then close.
                    let waiting = c.state == State::Open && c.flags & flag::BUSY == 0;
                    if c.flags & flag::API_FULL != 0 && c.deadline != 0 && !stale {
                        // Reading is paused on our side (its answers are unread): the
                        // request's time starts again once it resumes.
                        let at = self.now + self.cfg.api.request_timeout_ms;
                        self.arm(k.idx, k.gen, TimerKind::Handshake, at);
                    } else if c.deadline != 0 && !stale && waiting {
                        inc(&self.metrics.api_request_timeouts);
                        self.metrics.api_status(408);
                        let body =
                            http::error(408, "the request did not arrive whole in time", false);
                        self.send_bytes(k.idx, k.gen, &body);
                        self.close_after_flush(k.idx, k.gen, CloseReason::ReadTimeout);
                    }
                }
                TimerKind::Handshake => {
                    if matches!(c.state, State::Hello | State::Authing) && !stale {
                        self.close_now(k.idx, k.gen, CloseReason::HandshakeTimeout);
                    }
                }
                TimerKind::Read => {
                    if c.state != State::Open {
                        continue;
                    }
                    if c.role == Role::Client(Transport::Ws) {
                        self.ws_idle(k);
                        continue;
                    }
                    let limit = match c.role {
                        Role::Api => self.cfg.api.idle_timeout_ms,
                        _ => self.cfg.limits.read_timeout_ms,
                    };
                    let deadline = if c.flags & flag::BUSY != 0 {
                        self.now + limit
                    } else {
                        c.last_read + limit
                    };
                    if self.now >= deadline {
                        self.close_notifying(k.idx, k.gen, CloseReason::ReadTimeout);
                    } else {
                        // Lazy re-arm: reads only stamp `last_read`; the wheel is touched once
                        // per timeout period.
                        self.wheel.insert(deadline, k);
                    }
                }
                TimerKind::Partial => self.partial_due(k),
                TimerKind::Linger => {
                    if c.state == State::Closing && !stale {
                        let reason = c.close_reason;
                        self.close_now(k.idx, k.gen, reason);
                    }
                }
            }
        }
        self.fired = fired;
    }

    // ---- worker results --------------------------------------------------------------

    pub(super) fn drain_done(&mut self) {
        self.more_done = false;
        // Taken out and drained (its allocation kept for the next turn's answers: one
        // per connect, which used to grow a fresh vector every turn).
        let mut kept = std::mem::take(&mut self.local_done);
        let mut local = kept.drain(..);
        let mut spent = true;
        for _ in 0..DONE_BATCH {
            // The reactor's own answers first (made earlier), then the workers'.
            let done = match local.next() {
                Some(d) => Ok(d),
                None => {
                    let d = self.done.try_recv();
                    if d.is_ok() {
                        // Every job sent answers once (the live upgrade waits for them all).
                        self.in_flight = self.in_flight.saturating_sub(1);
                    }
                    d
                }
            };
            match done {
                Ok(Done::Auth {
                    conn,
                    seqid,
                    upgrade,
                    result,
                }) => self.auth_done(conn, seqid, upgrade, result),
                Ok(Done::Api {
                    conn,
                    keep_alive,
                    out,
                    fwd,
                }) => self.api_done(conn, keep_alive, out, fwd),
                Ok(Done::Upstream {
                    conn,
                    frame,
                    result,
                }) => self.upstream_done(conn, frame, result),
                Ok(Done::TlsStep { conn, tls, result }) => self.tls_stepped(conn, tls, result),
                Err(_) => {
                    spent = false; // nothing more to apply
                    break;
                }
            }
        }
        // The batch is spent: the reactor's answers not applied yet go first next time.
        let mut rest: Vec<Done> = local.collect();
        if !rest.is_empty() {
            rest.append(&mut self.local_done);
            self.local_done = rest;
        } else if self.local_done.is_empty() && kept.capacity() <= 256 {
            self.local_done = kept;
        }
        self.more_done = spent;
    }

    /// A HELLO's (or an upgrade's) auth answered: admitted, or refused with the answer its
    /// transport expects.
    pub(super) fn auth_done(
        &mut self,
        conn: Ref,
        seqid: u64,
        upgrade: Option<ws::Upgrade>,
        result: Result<Admit, (u16, String)>,
    ) {
        let (code, msg) = match result {
            Ok(admit) => return self.admit(conn, seqid, admit, upgrade),
            Err(e) => e,
        };
        let Some(c) = self.conns.get(conn.idx, conn.gen) else {
            return;
        };
        if c.state != State::Authing {
            return;
        }
        inc(&self.metrics.hello_rejected);
        if c.role == Role::Http {
            // Refused before the upgrade: a plain HTTP answer (401, 403, 400).
            self.http_reply(conn.idx, conn.gen, code, &http::error(code, &msg, false));
            self.close_after_flush(conn.idx, conn.gen, CloseReason::AuthRejected);
        } else {
            self.fail(
                conn.idx,
                conn.gen,
                seqid,
                code,
                &msg,
                CloseReason::AuthRejected,
            );
        }
    }

    pub(super) fn admit(&mut self, r: Ref, seqid: u64, a: Admit, upgrade: Option<ws::Upgrade>) {
        let Some(c) = self.conns.get_mut(r.idx, r.gen) else {
            return;
        };
        if c.state != State::Authing {
            return;
        }
        let max = self.cfg.apps[a.app].max_connections;
        if max > 0 && self.registry.app_len(a.app) >= max {
            let why = super::admission::Refusal::App;
            inc(&self.metrics.admission_refused[why as usize]);
            let msg = "the app is at its max_connections";
            if c.role == Role::Http {
                // Before the WebSocket upgrade: a plain HTTP answer.
                self.http_reply(r.idx, r.gen, 503, &http::error(503, msg, false));
                self.close_after_flush(r.idx, r.gen, CloseReason::Overloaded);
            } else {
                self.fail(r.idx, r.gen, seqid, 503, msg, CloseReason::Overloaded);
            }
            return;
        }
        let (device, user) = (a.device, a.user);
        c.dev_tag = self
            .registry
            .add(a.app, r.idx, &device, a.dev_tag, user.as_ref());
        if !a.session.is_empty() {
            c.extra().session = a.session;
        }
        c.app = a.app as u16;
        c.device = Some(device);
        c.user = user;
        c.state = State::Open;
        c.deadline = 0; // the handshake's; from now on a partial frame's (`partial_deadline`)
        c.hs_armed = false;
        c.flags |= flag::REGISTERED;
        c.last_read = self.now;
        self.route(r, true);
        self.recover(r);
        self.metrics.app_connections[a.app].fetch_add(1, Relaxed);
        inc(&self.metrics.hello_ok);
        // Written into a buffer the reactor keeps (no allocation per connect).
        let mut conn_id = std::mem::take(&mut self.id_text);
        conn_id.clear();
        self.ids.write(r, &mut conn_id);
        let transport = if upgrade.is_some() {
            Transport::Ws
        } else {
            Transport::Tcp
        };
        self.event(r, a.app, transport, "online");
        if let Some(u) = upgrade {
            self.upgraded(r, u, &conn_id);
            self.id_text = conn_id;
            self.replay_parked(r);
            self.resume(r.idx, r.gen);
            return;
        }
        self.send_hello(r, seqid, &conn_id);
        self.id_text = conn_id;
        // A reconnecting device's unacknowledged pushes go first, before anything new.
        self.replay_parked(r);
        let k = TimerKey {
            idx: r.idx,
            gen: r.gen,
            kind: TimerKind::Read,
        };
        self.wheel
            .insert(self.now + self.cfg.limits.read_timeout_ms, k);
        self.resume(r.idx, r.gen);
    }

    // ---- shutdown --------------------------------------------------------------------

    pub(super) fn on_signal(&mut self) {
        // Each, in order (several may be read at once).
        for signo in self.read_signals() {
            self.signal(signo);
        }
    }

    /// The signals waiting on the signalfd, in order.
    pub(super) fn read_signals(&self) -> Vec<u32> {
        let mut got = vec![];
        let Some(fd) = &self.signal else { return got };
        let mut info = [0u8; 128]; // struct signalfd_siginfo
                                   // SAFETY: reading into a buffer of the size signalfd writes.
        while unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) }
            == info.len() as isize
        {
            got.push(u32::from_ne_bytes([info[0], info[1], info[2], info[3]]));
        }
        got
    }

    pub(super) fn signal(&mut self, signo: u32) {
        if signo == libc::SIGUSR1 as u32 {
            self.start_drain(None);
            return;
        }
        if signo == libc::SIGHUP as u32 {
            self.start_upgrade();
            return;
        }
        if self.shutdown_at.is_some() {
            log::warn!("second signal: exiting now");
            self.shutdown_at = Some(self.now);
            return;
        }
        log::info!(
            "signal {signo}: saying BYE to {} clients and shutting down",
            self.client_conns
        );
        self.begin_shutdown();
    }

    /// No more connections are taken: the listeners are closed — but the internal API's
    /// when `api` is false (a drain still answers the backends).
    pub(super) fn stop_accepting(&mut self, api: bool) {
        for slot in self.listeners.iter_mut() {
            if slot
                .as_ref()
                .is_some_and(|(_, role)| api || *role != Role::Api)
            {
                if let Some((mut l, _)) = slot.take() {
                    let _ = self.poll.registry().deregister(&mut l);
                }
            }
        }
    }

    /// Shuts down: BYE to every client, exit once they are gone or the grace has passed.
    pub(super) fn begin_shutdown(&mut self) {
        self.drain = None;
        self.metrics
            .draining
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .shutting_down
            .store(1, std::sync::atomic::Ordering::Relaxed);
        self.shutdown_at = Some(self.now + SHUTDOWN_GRACE_MS);
        self.answer_all_waits();
        self.stop_accepting(true);
        for (idx, gen) in self.conns.keys() {
            let Some(c) = self.conns.get(idx, gen) else {
                continue;
            };
            match (c.role, c.state) {
                (Role::Client(_), State::Open) => {
                    self.goodbye(
                        idx,
                        gen,
                        "shutdown",
                        ws::status::GOING_AWAY,
                        CloseReason::Shutdown,
                    );
                }
                (Role::Api, _) if c.flags & flag::BUSY != 0 => {} // answered, then closed below
                (Role::Http, State::Waiting) => {
                    // A long-poll gets its answer as at its timeout (as a drain gives it),
                    // not a bare close that a page's fetch takes for a network error.
                    self.poll_end(idx, gen, CloseReason::Shutdown);
                }
                (_, State::Closing) => {}
                _ => self.close_now(idx, gen, CloseReason::Shutdown),
            }
        }
    }
}
