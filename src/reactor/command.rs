//! The internal API on the reactor's side: requests framed here go to a worker, which
//! validates them and sends back an answer or a [`Command`]; commands that touch connections
//! and the registry (pushes, online, kick, rooms, session, status) are applied here, where
//! the connection table lives.

use serde_json::json;

use super::cluster::REMOTE_BASE;
use super::conn::{flag, State};
use super::upstream::session_json;
use super::{Flow, Reactor, Role};
use crate::api::{ApiOut, ApiRequest, Command, Target};
use crate::http::{self, Parsed};
use crate::metrics::{inc, CloseReason, TRANSPORTS};
use crate::timer::TimerKind;
use crate::types::Ref;
use crate::worker::Job;
use crate::ws;

/// Rooms `GET /v1/stats` lists (the most local connections first).
const TOP_ROOMS: usize = 10;

impl Reactor {
    /// An API request is whole: it goes to a worker (one at a time per connection, so answers
    /// stay in order), or a full queue answers 503.
    pub(super) fn process_api(&mut self, idx: u32, gen: u32, data: &[u8]) -> (usize, Flow) {
        let limits = http::Limits {
            max_head: http::DEFAULT_MAX_HEAD,
            max_body: self.cfg.api.max_body_bytes,
        };
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return (0, Flow::Close);
        };
        if c.flags & flag::BUSY != 0 || c.state != State::Open {
            return (0, Flow::Pause);
        }
        // A client that pipelines requests without reading the answers: stop taking requests
        // until its output drains (the answers are not bounded like pushes, so bound here).
        if c.backlog() > self.cfg.limits.max_output_bytes {
            c.flags |= flag::API_FULL;
            return (0, Flow::Pause);
        }
        match http::parse_request(data, &limits) {
            Ok(Parsed::Incomplete { expect_continue }) => {
                // A request has begun: it must be whole in time, however its bytes trickle
                // (each byte resets the idle timer, not this).
                if !data.is_empty() && c.deadline == 0 {
                    let at = self.now + self.cfg.api.request_timeout_ms;
                    self.arm(idx, gen, TimerKind::Handshake, at);
                }
                let Some(c) = self.conns.get_mut(idx, gen) else {
                    return (0, Flow::Close);
                };
                if expect_continue && c.flags & flag::CONTINUE_SENT == 0 {
                    c.flags |= flag::CONTINUE_SENT;
                    self.send_bytes(idx, gen, b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                (0, Flow::Continue)
            }
            Ok(Parsed::Complete(req, used)) => {
                c.flags &= !flag::CONTINUE_SENT;
                c.deadline = 0;
                c.hs_armed = false;
                let job = Job::Api {
                    conn: Ref { idx, gen },
                    req: ApiRequest::from_parsed(&req),
                };
                match self.jobs.try_send(job) {
                    Ok(()) => {
                        inc(&self.metrics.worker_jobs);
                        self.in_flight += 1;
                        c.flags |= flag::BUSY;
                        (used, Flow::Pause)
                    }
                    Err(_) => {
                        inc(&self.metrics.worker_busy);
                        self.metrics.api_status(503);
                        let ka = req.keep_alive;
                        let mut b = http::error(503, "busy: worker queue full", ka);
                        if req.method == "HEAD" {
                            // No body after a HEAD's head: the next answer would be read
                            // from it.
                            http::head_only(&mut b);
                        }
                        self.send_bytes(idx, gen, &b);
                        if !ka {
                            self.close_after_flush(idx, gen, CloseReason::Peer);
                            return (data.len(), Flow::Close);
                        }
                        (used, Flow::Continue)
                    }
                }
            }
            Err(e) => {
                self.metrics.api_status(e.status());
                self.send_bytes(idx, gen, &http::error(e.status(), &e.to_string(), false));
                self.close_after_flush(idx, gen, CloseReason::ProtocolError);
                (data.len(), Flow::Close)
            }
        }
    }

    pub(super) fn api_done(
        &mut self,
        r: Ref,
        keep_alive: bool,
        out: ApiOut,
        fwd: Option<crate::cluster::Forward>,
    ) {
        // The API client may have left; a command is still applied (a push is not undone by
        // the caller hanging up), only the answer is dropped. Another node's request has no
        // connection here: its answer is published back.
        let remote = r.idx >= REMOTE_BASE;
        let here = remote || self.conns.get(r.idx, r.gen).is_some();
        let bytes = match out {
            ApiOut::Response(b) => b,
            ApiOut::Command(cmd) => {
                // A push's place in push order: drawn here, or by the node that sent it.
                let id = match &cmd {
                    Command::Push { pushes, .. } => self.push_id(r, pushes.len()),
                    _ => (0, 0),
                };
                // (A caller already gone gets no answer: nothing to gather.)
                if let (Some(mut fwd), false, true) = (fwd, remote, here) {
                    let named = fwd.named.iter_mut().map(|n| &mut n.1);
                    for req in fwd.all.iter_mut().chain(named) {
                        req.order = id.0;
                    }
                    self.fan_out_command(r, keep_alive, &cmd, fwd);
                }
                match self.execute(cmd, keep_alive, here.then_some(r), id) {
                    Some(b) => b,
                    None => return, // goes on in later turns, or waits for ACKs
                }
            }
        };
        self.api_answer(r, keep_alive, &bytes, false);
    }

    /// A push request's id: the order its sender drew (another node's request), or `n`
    /// places in push order drawn here — after every earlier one, and near the clock, so
    /// the orders drawn by different nodes sort by when their pushes came.
    fn push_id(&mut self, r: Ref, n: usize) -> super::reliable::PushId {
        if self.cluster.is_none() {
            return (0, 0); // alone: drawn per push as it starts (`run_job`)
        }
        if let Some((from, order)) = self.remote_origin(r) {
            if order != 0 {
                return (order, self.origins.intern(&from));
            }
        }
        let base = (self.pushes + 1).max(crate::types::unix_ms() << 20);
        self.pushes = base + n.max(1) as u64 - 1;
        (base, 0)
    }

    /// Sends an API answer and lets the connection's next request in (or closes it).
    /// `later`: resume its input at the top of the next turn, not now — the caller may be
    /// inside another connection's input processing, which holds the read buffer.
    pub(super) fn api_answer(&mut self, r: Ref, keep_alive: bool, bytes: &[u8], later: bool) {
        if r.idx >= REMOTE_BASE {
            self.remote_answer(r, bytes);
            return;
        }
        if self.gather_local(r, bytes) {
            return; // this node's part: the whole answer goes once the others' are in
        }
        self.send_bytes(r.idx, r.gen, bytes); // a no-op if the client left
        let Some(c) = self.conns.get_mut(r.idx, r.gen) else {
            return;
        };
        c.flags &= !flag::BUSY;
        c.last_read = self.now;
        if keep_alive && self.shutdown_at.is_none() {
            if later {
                self.resume_later.push(r);
            } else {
                self.resume(r.idx, r.gen);
            }
        } else {
            self.close_after_flush(r.idx, r.gen, CloseReason::Peer);
        }
    }

    // ---- commands from the API -------------------------------------------------------

    /// Applies a command; returns its answer, or None when the answer waits (`wait_ms`).
    pub(super) fn execute(
        &mut self,
        cmd: Command,
        ka: bool,
        api: Option<Ref>,
        id: super::reliable::PushId,
    ) -> Option<Vec<u8>> {
        let (status, body) = match cmd {
            Command::Push {
                pushes,
                batch,
                wait_ms,
            } => {
                let body = self.start_push(pushes, batch, wait_ms, api.map(|r| (r, ka)), id)?;
                self.metrics.api_status(200);
                return Some(http::response(200, "application/json", &body, ka));
            }
            Command::Online(t) => {
                let refs = self.resolve(&t);
                let list: Vec<_> = refs.iter().filter_map(|r| self.describe(*r)).collect();
                (
                    200,
                    json!({"online": !list.is_empty(), "connections": list}),
                )
            }
            Command::Kick { target, reason } => {
                let refs = self.resolve(&target);
                for r in &refs {
                    self.goodbye(
                        r.idx,
                        r.gen,
                        &reason,
                        ws::status::POLICY,
                        CloseReason::Kicked,
                    );
                }
                (200, json!({"kicked": refs.len()}))
            }
            Command::RoomMembers {
                app,
                room,
                devices,
                add,
            } => {
                self.room_changed(app, &room, &devices, add);
                let n = if add {
                    self.registry.room_add(app, &room, &devices)
                } else {
                    self.registry.room_remove(app, &room, &devices)
                };
                let members = self
                    .registry
                    .room(app, &room)
                    .map_or(0, |r| r.members.len());
                let key = if add { "added" } else { "removed" };
                (200, json!({ "room": room, key: n, "members": members }))
            }
            Command::RoomInfo {
                app,
                room,
                limit,
                after,
            } => match self.registry.room(app, &room) {
                Some(r) => {
                    // A page of members in id order: large rooms are listed `limit` at a time.
                    let mut page: Vec<&str> = r
                        .members
                        .iter()
                        .map(|m| &**m)
                        .filter(|m| after.as_deref().is_none_or(|a| *m > a))
                        .collect();
                    let more = page.len() > limit;
                    if more {
                        page.select_nth_unstable(limit);
                        page.truncate(limit);
                    }
                    page.sort_unstable();
                    let next = more.then(|| page.last().copied()).flatten();
                    (
                        200,
                        json!({"room": room, "members": page, "member_count": r.members.len(), "online": r.conns().len(), "next": next}),
                    )
                }
                None => (
                    200,
                    json!({"room": room, "members": [], "member_count": 0, "online": 0, "next": null}),
                ),
            },
            Command::SetSession { conn, set } => match self.set_session(&conn, set) {
                Ok(updated) => (200, json!({"updated": updated})),
                Err(e) => (413, json!({"error": e})),
            },
            Command::SetStatus { key, value, ttl_ms } => {
                match self.set_status(key, value, ttl_ms) {
                    Ok((released, version)) => {
                        (200, json!({"released": released, "version": version}))
                    }
                    // 507 Insufficient Storage: the caller may retry once values expire.
                    Err(e) => (507, json!({ "error": e })),
                }
            }
            Command::Drain { deadline_ms } => (200, self.start_drain(deadline_ms)),
            Command::Stats { mut base } => {
                let rooms: Vec<_> = self
                    .registry
                    .top_rooms(TOP_ROOMS)
                    .into_iter()
                    .map(|(app, room, members, online)| {
                        json!({"app": self.cfg.apps[app].id, "room": room, "members": members, "online": online})
                    })
                    .collect();
                if let Some(o) = base.as_object_mut() {
                    o.insert("rooms".into(), json!(rooms));
                    o.insert("uptime_ms".into(), json!(self.now));
                }
                (200, base)
            }
        };
        self.metrics.api_status(status);
        Some(http::json(status, &body, ka))
    }

    /// The admitted local connection a conn id names (a stale generation names nobody).
    pub(super) fn admitted(&self, id: &crate::types::ConnId) -> Option<Ref> {
        let r = self.ids.local(id)?;
        self.conns
            .get(r.idx, r.gen)
            .is_some_and(|c| c.flags & flag::REGISTERED != 0)
            .then_some(r)
    }

    /// The admitted connections a target names (conn ids are checked against the
    /// generation: a stale id names nobody).
    pub(super) fn resolve(&self, t: &Target) -> Vec<Ref> {
        let mut v = vec![];
        self.resolve_into(t, &mut v);
        v
    }

    /// `resolve` into a reused list (cleared first).
    pub(super) fn resolve_into(&self, t: &Target, out: &mut Vec<Ref>) {
        out.clear();
        let slice: &[u32] = match t {
            Target::Conn(id) => {
                out.extend(self.admitted(id));
                return;
            }
            Target::Device(app, d) => self.registry.device(*app, d),
            Target::User(app, u) => self.registry.user(*app, u),
            Target::Broadcast(app) => {
                let conns = &self.conns;
                let live = |i| conns.by_index(i).map(|(_, gen)| Ref { idx: i, gen });
                out.extend(self.registry.app(*app).filter_map(live));
                return;
            }
            Target::Room(app, r) => self.registry.room(*app, r).map_or(&[], |x| x.conns()),
        };
        out.extend(
            slice
                .iter()
                .filter_map(|&i| self.conns.by_index(i).map(|(_, gen)| Ref { idx: i, gen })),
        );
    }

    pub(super) fn describe(&self, r: Ref) -> Option<serde_json::Value> {
        let c = self.conns.get(r.idx, r.gen)?;
        let transport = match c.role {
            Role::Client(t) => TRANSPORTS[t as usize],
            Role::Api | Role::Http => return None,
        };
        Some(json!({
            "conn_id": self.ids.format(r),
            "node": self.cfg.node_id,
            "transport": transport,
            "app_id": self.cfg.apps[c.app as usize].id,
            "device_id": c.device.as_deref(),
            "user_id": c.user.as_deref(),
            "connected_at": c.connected_at,
            "session": session_json(c),
        }))
    }
}
