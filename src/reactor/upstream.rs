//! Backends on the reactor's side (docs/PROTOCOL.md, "Backends"): where a connecting client's auth goes
//! (the app's auth callback lane, or static tokens on the workers), online/offline events,
//! session data, and upstream frames to HTTP services — in order per connection, one call
//! in flight per connection, retransmissions recognised by seqid and not sent twice.

use std::collections::VecDeque;

use super::conn::{flag, Conn, State};
use super::tcp::error_frame;
use super::{Flow, Reactor, Role};
use crate::backend::{self, Context, UpReply};
use crate::metrics::{inc, BadFrame, Transport, TRANSPORTS};
use crate::proto::{code, method, Frame};
use crate::types::{check_session, ConnId, CredsRef, Ref};
use crate::worker::{Done, Job};
use crate::ws;

/// Upstream frames a connection may queue behind the one in flight before "busy".
const MAX_PENDING: usize = 64;
/// ...and bytes (a dead backend must not let clients pin memory in queued frames).
const MAX_PENDING_BYTES: usize = 256 * 1024;
/// Recent upstream seqids remembered per connection for dedup.
pub(super) const RECENT: usize = 32;

/// A connection's calls to backend services: one in flight at a time (so they reach the
/// backend in order), the frames queued behind it, and recent seqids for dedup.
#[derive(Default)]
pub(super) struct Calls {
    pub(super) busy: bool,
    pub(super) inflight: u64,
    pub(super) pending: VecDeque<Frame>,
    pub(super) pending_bytes: usize,
    pub(super) recent: [u64; RECENT],
    pub(super) next: usize,
}

impl Calls {
    /// Already answered, in flight or queued (seqid 0 is never deduplicated).
    fn seen(&self, seq: u64) -> bool {
        seq != 0
            && ((self.busy && self.inflight == seq)
                || self.pending.iter().any(|p| p.seqid == seq)
                || self.recent.contains(&seq))
    }

    fn record(&mut self, seq: u64) {
        if seq != 0 {
            self.recent[self.next] = seq;
            self.next = (self.next + 1) % RECENT;
        }
    }
}

pub(super) fn session_json(c: &Conn) -> serde_json::Value {
    let s = c.extra.as_ref().map_or(&[][..], |e| &e.session[..]);
    serde_json::Value::Object(
        s.iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect(),
    )
}

impl Reactor {
    /// Sends a connecting client's credentials to be checked: to the app's auth callback lane
    /// when it has one, else to the workers (static tokens). False: saturated ("busy").
    pub(super) fn start_auth(
        &mut self,
        r: Ref,
        seqid: u64,
        creds: CredsRef<'_>,
        upgrade: Option<ws::Upgrade>,
    ) -> bool {
        let app = self.cfg.app_index(creds.app_id);
        // The peer's address for a backend or a worker (a syscall: asked only for them).
        let remote = |conns: &crate::slab::Slab<Conn, crate::slab::Line>| {
            conns
                .get(r.idx, r.gen)
                .map(|c| c.sock.remote())
                .unwrap_or_default()
        };
        let lane = app.and_then(|a| self.backends.apps[a].auth.as_ref().map(|l| (a, l)));
        let ok = match lane {
            Some((a, lane)) => {
                let (cfg, metrics, tx, wake) = (
                    self.cfg.clone(),
                    self.metrics.clone(),
                    self.done_tx.clone(),
                    self.wake.clone(),
                );
                let stats = lane.stats;
                let remote = remote(&self.conns);
                let transport = if upgrade.is_some() { "ws" } else { "tcp" };
                let creds = creds.owned();
                let task: backend::Task = Box::new(move |agent| {
                    let s = &metrics.backends[stats];
                    let result = backend::guarded(s, "auth backend", || {
                        backend::auth(agent, &cfg.apps[a], a, &creds, &remote, transport, s)
                    });
                    if tx
                        .send(Done::Auth {
                            conn: r,
                            seqid,
                            upgrade,
                            result,
                        })
                        .is_ok()
                    {
                        wake.wake();
                    }
                });
                let ok = lane.try_run(task);
                self.in_flight += usize::from(ok);
                if !ok {
                    inc(&self.metrics.backends[stats].busy);
                }
                ok
            }
            // JWT: signature checks (RSA, ECDSA) are CPU work for the workers.
            None if app.is_some_and(|a| self.cfg.apps[a].jwt.is_some()) => {
                let ok = self
                    .jobs
                    .try_send(Job::Auth {
                        conn: r,
                        seqid,
                        creds: creds.owned(),
                        remote: remote(&self.conns),
                        upgrade,
                    })
                    .is_ok();
                self.in_flight += usize::from(ok);
                inc(if ok {
                    &self.metrics.worker_jobs
                } else {
                    &self.metrics.worker_busy
                });
                ok
            }
            None => {
                // Static tokens: a lookup and a compare, done here — a round trip through
                // a worker (a channel each way and a wake) cost more than the check. The
                // answer is applied with the workers' answers this turn, as theirs would be.
                // The device index's lines for this device are fetched meanwhile.
                let tag = app.map(|a| self.registry.prefetch(a, creds.device_id, creds.user_id));
                let mut result = match self.conns.get(r.idx, r.gen) {
                    Some(c) => crate::worker::auth(&self.cfg, &creds, &crate::net::Peer(&c.sock)),
                    None => crate::worker::auth(&self.cfg, &creds, &""),
                };
                // Its hash reused by the admit (one SipHash fewer per connect), for the
                // device it was taken for.
                if let (Ok(a), Some(tag)) = (&mut result, tag) {
                    if Some(a.app) == app && *a.device == *creds.device_id {
                        a.dev_tag = tag;
                    }
                }
                self.local_done.push(Done::Auth {
                    conn: r,
                    seqid,
                    upgrade,
                    result,
                });
                true
            }
        };
        if ok {
            if let Some(c) = self.conns.get_mut(r.idx, r.gen) {
                c.state = State::Authing;
            }
        }
        ok
    }

    fn context(&self, r: Ref, t: Transport) -> Option<Context> {
        let c = self.conns.get(r.idx, r.gen)?;
        Some(Context {
            conn_id: self.ids.format(r),
            app_id: self.cfg.apps[c.app as usize].id.clone(),
            device_id: c.device.as_deref().unwrap_or("").to_string(),
            user_id: c.user.as_deref().map(str::to_string),
            session: c
                .extra
                .as_ref()
                .map(|e| e.session.clone())
                .unwrap_or_default(),
            transport: TRANSPORTS[t as usize],
        })
    }

    /// Queues an online/offline event for the app's events thread (never blocks; a full
    /// queue drops the event and counts it).
    pub(super) fn event(&self, r: Ref, app: usize, t: Transport, kind: &str) {
        let Some(tx) = &self.backends.apps[app].events else {
            return;
        };
        let Some(ctx) = self.context(r, t) else {
            return;
        };
        if !tx.push(ctx.event(kind)) {
            inc(&self.metrics.events_dropped);
        }
    }

    /// A client frame for a backend service (`service > 0`, or a raw WebSocket message for
    /// the app's default service).
    pub(super) fn upstream(&mut self, idx: u32, gen: u32, app: usize, f: Frame) -> Flow {
        let Some(svc) = self.cfg.apps[app].service(f.service) else {
            self.metrics.bad_frame(BadFrame::UnknownService);
            let msg = format!("no backend service {} for this app", f.service);
            return self.protocol_error(idx, gen, f.seqid, code::UNKNOWN_SERVICE, &msg);
        };
        if svc.is_echo() {
            inc(&self.metrics.upstream_frames);
            self.send_frame(idx, gen, &f);
            return Flow::Continue;
        }
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return Flow::Close;
        };
        let ext = &mut c.extra().calls;
        if ext.seen(f.seqid) {
            // A retransmission: the backend has it (or will); answered ones get their ACK again.
            inc(&self.metrics.upstream_dedup);
            if ext.recent.contains(&f.seqid) {
                self.send_frame(idx, gen, &Frame::control(method::ACK, f.seqid, &[]));
            }
            return Flow::Continue;
        }
        if ext.busy || !ext.pending.is_empty() {
            // One call in flight per connection keeps its requests in order at the backend.
            let size = f.payload.len() + 64;
            if ext.pending.len() >= MAX_PENDING || ext.pending_bytes + size > MAX_PENDING_BYTES {
                self.send_frame(
                    idx,
                    gen,
                    &error_frame(f.seqid, code::BUSY, "busy: too many requests waiting"),
                );
            } else {
                ext.pending_bytes += size;
                ext.pending.push_back(f);
            }
            return Flow::Continue;
        }
        self.dispatch_upstream(idx, gen, app, f);
        Flow::Continue
    }

    /// Hands a frame to its service's lane. False: it was answered with ERROR instead (lane
    /// saturated or nowhere to send it), and the caller may send the next one.
    fn dispatch_upstream(&mut self, idx: u32, gen: u32, app: usize, f: Frame) -> bool {
        let r = Ref { idx, gen };
        let (seq, svc_id) = (f.seqid, f.service);
        let lane = self.backends.service(app, svc_id).map(|l| l.stats);
        let svc = self.cfg.apps[app].service(f.service).cloned();
        let t = match self.conns.get(idx, gen).map(|c| c.role) {
            Some(Role::Client(t)) => t,
            _ => return false,
        };
        let (Some(stats), Some(svc), Some(ctx)) = (lane, svc, self.context(r, t)) else {
            self.send_frame(
                idx,
                gen,
                &error_frame(seq, code::UNKNOWN_SERVICE, "no such service"),
            );
            return false;
        };
        let (metrics, tx, wake) = (
            self.metrics.clone(),
            self.done_tx.clone(),
            self.wake.clone(),
        );
        let task: backend::Task = Box::new(move |agent| {
            let s = &metrics.backends[stats];
            let result =
                backend::guarded(s, "service", || backend::upstream(agent, &svc, &ctx, &f, s));
            if tx
                .send(Done::Upstream {
                    conn: r,
                    frame: f,
                    result,
                })
                .is_ok()
            {
                wake.wake();
            }
        });
        let lane = self.backends.service(app, svc_id).expect("checked above");
        if lane.try_run(task) {
            self.in_flight += 1;
            inc(&self.metrics.upstream_frames);
            if let Some(e) = self.conns.get_mut(idx, gen).and_then(|c| c.extra.as_mut()) {
                e.calls.busy = true;
                e.calls.inflight = seq;
            }
            true
        } else {
            inc(&self.metrics.backends[stats].busy);
            self.send_frame(
                idx,
                gen,
                &error_frame(seq, code::BUSY, "busy: the service is saturated"),
            );
            false
        }
    }

    /// A service answered: ACK and the answer (same seqid), or ERROR; then the connection's
    /// next queued frame goes (frames a full lane refuses are answered "busy" in order).
    pub(super) fn upstream_done(
        &mut self,
        r: Ref,
        f: Frame,
        result: Result<UpReply, (u16, String)>,
    ) {
        let Some(c) = self.conns.get_mut(r.idx, r.gen) else {
            return;
        };
        let live = c.flags & flag::REGISTERED != 0 && c.state == State::Open;
        let Some(ext) = c.extra.as_mut().map(|e| &mut e.calls) else {
            return;
        };
        ext.busy = false;
        if !live {
            // Closing (kicked, failed, shutting down): its offline event is out; no more calls.
            ext.pending.clear();
            ext.pending_bytes = 0;
            return;
        }
        match result {
            Ok(reply) => {
                // Only a delivered frame counts as seen: a retry after an error goes again.
                ext.record(f.seqid);
                self.send_frame(r.idx, r.gen, &Frame::control(method::ACK, f.seqid, &[]));
                if !reply.payload.is_empty() {
                    let answer = Frame {
                        seqid: f.seqid,
                        logid: f.logid,
                        service: f.service,
                        method: f.method,
                        payload_type: reply.payload_type,
                        payload: reply.payload.into(),
                        ..Default::default()
                    };
                    self.send_frame(r.idx, r.gen, &answer);
                }
            }
            Err((code, msg)) => self.send_frame(r.idx, r.gen, &error_frame(f.seqid, code, &msg)),
        }
        self.next_call(r);
    }

    /// Sends the connection's next queued call, if it has one and none is in flight. Not
    /// while quiet for a live upgrade: the queue is handed over and the new process starts it.
    pub(super) fn next_call(&mut self, r: Ref) {
        if self.quiescing {
            return;
        }
        let Some(c) = self.conns.get(r.idx, r.gen) else {
            return;
        };
        let app = c.app as usize;
        let live = c.flags & flag::REGISTERED != 0 && c.state == State::Open;
        if !live || c.extra.as_ref().is_none_or(|e| e.calls.busy) {
            return;
        }
        loop {
            let Some(ext) = self
                .conns
                .get_mut(r.idx, r.gen)
                .and_then(|c| c.extra.as_mut())
                .map(|e| &mut e.calls)
            else {
                return;
            };
            let Some(next) = ext.pending.pop_front() else {
                return;
            };
            ext.pending_bytes = ext.pending_bytes.saturating_sub(next.payload.len() + 64);
            if self.dispatch_upstream(r.idx, r.gen, app, next) {
                return;
            }
        }
    }

    /// `PUT /v1/session/{conn_id}`: sets (or, for null, removes) each key, all or nothing.
    /// Ok(false): no such connection; Err: the result would exceed the session limits.
    pub(super) fn set_session(
        &mut self,
        id: &ConnId,
        set: Vec<(String, Option<String>)>,
    ) -> Result<bool, String> {
        let Some(c) = self
            .admitted(id)
            .and_then(|r| self.conns.get_mut(r.idx, r.gen))
        else {
            return Ok(false);
        };
        let old = c.extra.as_ref().map_or(&[][..], |e| &e.session[..]);
        let changed: std::collections::HashSet<&str> =
            set.iter().map(|(k, _)| k.as_str()).collect();
        let mut new: Vec<(String, String)> = old
            .iter()
            .filter(|(k, _)| !changed.contains(k.as_str()))
            .cloned()
            .collect();
        new.extend(set.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        check_session(&new)?;
        c.extra().session = new;
        Ok(true)
    }
}
