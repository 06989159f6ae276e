//! The internal API (docs/PROTOCOL.md, "Internal API"), worker side: routing, auth, validation, JSON parsing and
//! frame encoding. A request becomes either a finished response or a [`Command`] that the
//! reactor applies to its connection table and registry (which only it owns). Everything is
//! validated here first, so a command that reaches the reactor is whole: nothing is
//! half-applied.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use crate::cluster::View;
use crate::codec::{Shared, SHARED_OVERHEAD};
use crate::config::Config;
use crate::http;
use crate::metrics::Metrics;
use crate::proto::{method, Frame};
use crate::types::{
    check_id, check_status_key, percent_decode, reject, ConnId, Query, Reject, MAX_SESSION_KEYS,
    MAX_SESSION_KEY_BYTES, MAX_STATUS_VALUE,
};

/// Most items one batch may carry.
pub const MAX_BATCH: usize = 10_000;
/// An owned request, handed from the reactor to a worker.
#[derive(Debug)]
pub struct ApiRequest {
    pub method: String,
    pub target: String,
    pub keep_alive: bool,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    /// Another node's batch, split (`NodeRequest.items`): the place in the whole batch of
    /// each push the body carries. Empty: the body is the whole batch.
    pub items: Vec<u32>,
}

impl ApiRequest {
    pub fn from_parsed(r: &http::Request<'_>) -> ApiRequest {
        ApiRequest {
            method: r.method.to_string(),
            target: r.target.to_string(),
            keep_alive: r.keep_alive,
            authorization: r.authorization.map(str::to_string),
            content_type: r.content_type.map(str::to_string),
            body: r.body.to_vec(),
            items: vec![],
        }
    }
}

#[derive(Clone, Debug)]
pub enum Target {
    Conn(ConnId),
    Device(usize, String),
    User(usize, String),
    Broadcast(usize),
    Room(usize, String),
}

#[derive(Clone, Debug)]
pub struct Push {
    pub target: Target,
    pub frame: Shared,
    /// Reliable: kept and retransmitted until the client ACKs it (TCP and pbbp2).
    pub ack: bool,
    /// `ack=1`: given up (reported undelivered) when not ACKed within this many ms; 0 = no
    /// limit beyond the retries and the reconnect grace window.
    pub ttl_ms: u64,
    /// Its place in its batch (0 alone): with the request's first place in push order, its
    /// own, the same on every node.
    pub index: u32,
}

#[derive(Debug)]
pub enum Command {
    /// `batch`: answer with one result per push.
    /// `wait_ms` > 0: answer once every `ack=1` copy is ACKed or given up, or when
    /// `wait_ms` passes (what is still open is then reported `pending`).
    Push {
        pushes: Vec<Push>,
        batch: bool,
        wait_ms: u64,
    },
    Online(Target),
    Kick {
        target: Target,
        reason: String,
    },
    /// Binds (`add`) or unbinds devices to a room.
    RoomMembers {
        app: usize,
        room: String,
        devices: Vec<String>,
        add: bool,
    },
    /// Members are listed in id order, `limit` at a time, after the id `after`.
    RoomInfo {
        app: usize,
        room: String,
        limit: usize,
        after: Option<String>,
    },
    /// Session data of a connection: each key set, or removed when None.
    SetSession {
        conn: ConnId,
        set: Vec<(String, Option<String>)>,
    },
    /// Long-poll status: set `key`, answer its waiters, keep the value for `ttl_ms`.
    SetStatus {
        key: String,
        value: Bytes,
        ttl_ms: u64,
    },
    /// This node drains: stops accepting, moves its clients away, exits (docs/OPERATIONS.md).
    /// Only this node: another node's drain is asked of that node.
    Drain {
        deadline_ms: Option<u64>,
    },
    /// `GET /v1/stats`: `base` (what the metrics and the cluster view say) with the top
    /// rooms added, which only the reactor knows.
    Stats {
        base: serde_json::Value,
    },
}

/// The admin page (`GET /admin`): one self-contained file, no CDN (hosts may have no
/// internet). It reads `GET /v1/stats`.
const ADMIN_PAGE: &str = include_str!("admin.html");

#[derive(Debug)]
pub enum ApiOut {
    Response(Vec<u8>),
    Command(Command),
}

pub struct Api {
    pub cfg: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub app_ids: Vec<String>,
    /// The cluster as this node sees it (alone: this node only).
    pub view: Arc<View>,
}

/// Most endpoints `/v1/endpoints` lists.
pub const MAX_ENDPOINTS: usize = 8;

impl Api {
    pub fn new(cfg: Arc<Config>, metrics: Arc<Metrics>, view: Arc<View>) -> Api {
        let app_ids = cfg.apps.iter().map(|a| a.id.clone()).collect();
        Api {
            cfg,
            metrics,
            app_ids,
            view,
        }
    }

    /// Handles one request. `queue_depth` is reported by /metrics.
    pub fn handle(&self, req: &ApiRequest, queue_depth: usize) -> ApiOut {
        let ka = req.keep_alive;
        if req.method == "HEAD" {
            // As GET, with no body (RFC 9110 §9.3.2): for the answers made here (/healthz,
            // /metrics, /admin); a query the reactor answers is refused.
            let get = ApiRequest {
                method: "GET".into(),
                target: req.target.clone(),
                keep_alive: ka,
                authorization: req.authorization.clone(),
                content_type: None,
                body: vec![],
                items: vec![],
            };
            let mut b = match self.route(&get, queue_depth) {
                Ok(ApiOut::Response(b)) => b,
                Ok(ApiOut::Command(_)) => self.error(
                    405,
                    "HEAD is answered for /healthz, /metrics and /admin; use GET",
                    "GET",
                    ka,
                ),
                Err((status, msg)) => self.error(status, &msg, allowed(&msg), ka),
            };
            http::head_only(&mut b);
            return ApiOut::Response(b);
        }
        match self.route(req, queue_depth) {
            Ok(out) => out,
            Err((status, msg)) => ApiOut::Response(self.error(status, &msg, allowed(&msg), ka)),
        }
    }

    /// An error answer, counted; a 405 says which method is (`Allow`), a 401 which scheme
    /// (`WWW-Authenticate`), as RFC 9110 asks.
    fn error(&self, status: u16, msg: &str, allow: &str, ka: bool) -> Vec<u8> {
        self.metrics.api_status(status);
        let extra = match status {
            405 => format!("Allow: {allow}\r\n"),
            401 => "WWW-Authenticate: Bearer\r\n".into(),
            _ => String::new(),
        };
        http::error_with(status, msg, &extra, ka)
    }

    /// What `/healthz` and `/v1/stats` say of this node: `ok`, `draining` (moving its
    /// clients away) or `shutting_down`.
    fn node_state(&self) -> &'static str {
        use std::sync::atomic::Ordering::Relaxed;
        if self.metrics.shutting_down.load(Relaxed) != 0 {
            "shutting_down"
        } else if self.metrics.draining.load(Relaxed) != 0 {
            "draining"
        } else {
            "ok"
        }
    }

    /// The cluster's nodes as their heartbeats said, but this node's own entry draining
    /// from the moment it starts to, not from its next heartbeat round.
    fn nodes_now(&self) -> Vec<crate::cluster::NodeInfo> {
        let mut nodes = self.view.nodes();
        if self.view.me().draining {
            for n in nodes.iter_mut().filter(|n| n.node_id == self.view.node_id) {
                n.draining = true;
            }
        }
        nodes
    }

    /// Live nodes, least loaded first, at most [`MAX_ENDPOINTS`], that have a listener for
    /// `transport` ("" = any). Alone (or before the first heartbeat): this node. A draining
    /// node is left out (this one too, at once: `nodes_now`).
    fn endpoints(&self, transport: &str) -> Vec<crate::cluster::NodeInfo> {
        let mut nodes = self.nodes_now();
        if nodes.is_empty() {
            let mut me = self.view.me();
            me.connections = self.metrics.client_connections();
            me.load = me.connections as f64 / self.cfg.limits.max_connections.max(1) as f64;
            nodes.push(me);
        }
        nodes.retain(|n| {
            !n.draining
                && match transport {
                    "tcp" => !n.tcp.is_empty(),
                    "ws" => !n.ws.is_empty(),
                    _ => true,
                }
        });
        nodes.sort_by(|a, b| {
            a.load
                .total_cmp(&b.load)
                .then(a.connections.cmp(&b.connections))
                .then_with(|| a.node_id.cmp(&b.node_id))
        });
        nodes.truncate(MAX_ENDPOINTS);
        nodes
    }

    fn route(&self, req: &ApiRequest, queue_depth: usize) -> Result<ApiOut, Reject> {
        let (path, query) = match req.target.split_once('?') {
            Some((p, q)) => (p, q),
            None => (req.target.as_str(), ""),
        };
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let m = req.method.as_str();
        let ka = req.keep_alive;
        if segs == ["healthz"] {
            expect_method(m, "GET")?;
            // A node moving its clients away, or stopping, takes no new ones: 503, so that
            // a load balancer checking this stops sending it clients.
            let state = self.node_state();
            let st = if state == "ok" { 200 } else { 503 };
            self.metrics.api_status(st);
            let mut body = json!({
                "status": state, "node_id": self.cfg.node_id, "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
            });
            if self.view.enabled {
                // This node serves its own connections either way; the cluster part says
                // whether the rest of the gateway is reachable through Redis.
                let up = self.view.up();
                let o = body.as_object_mut().expect("an object");
                o.insert("cluster".into(), json!(if up { "ok" } else { "degraded" }));
                o.insert("nodes".into(), json!(self.view.nodes().len()));
                o.insert(
                    "pubsub_lag_ms".into(),
                    json!(self
                        .metrics
                        .pubsub_lag_ms
                        .load(std::sync::atomic::Ordering::Relaxed)),
                );
            }
            return Ok(ApiOut::Response(http::json(st, &body, ka)));
        }
        if segs == ["admin"] {
            // The page holds no data: everything it shows comes from `/v1/stats`, which
            // needs the token. So it is served to anyone (a reload, a bookmark), and asks
            // for the token itself (`?token=` once, then kept for its tab) — a browser
            // cannot put a header on the request that opens a page.
            expect_method(m, "GET")?;
            self.metrics.api_status(200);
            // Not cached, and its URL (which may hold the token) not sent on as a referrer;
            // its script and style are its own.
            return Ok(ApiOut::Response(http::response_with(
                200,
                "text/html; charset=utf-8",
                "Cache-Control: no-store\r\nReferrer-Policy: no-referrer\r\n\
                 Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; \
                 style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
                 frame-ancestors 'none'\r\n",
                ADMIN_PAGE.as_bytes(),
                ka,
            )));
        }
        self.check_token(req)?;
        let seg = |i: usize| -> Result<String, Reject> {
            let raw = segs.get(i).copied().unwrap_or("");
            let s = percent_decode(raw, false)
                .ok_or_else(|| (400, format!("bad percent-encoding in {raw:?}")))?;
            if s.is_empty() {
                return reject(400, "empty path segment");
            }
            Ok(s)
        };
        match segs.as_slice() {
            ["v1", "endpoints"] => {
                expect_method(m, "GET")?;
                let q = Query::parse(query)?;
                q.only(&["transport", "app"])?;
                let transport = q.get("transport").unwrap_or("");
                if !matches!(transport, "" | "tcp" | "ws") {
                    return reject(400, "transport must be tcp or ws");
                }
                if let Some(a) = q.get("app") {
                    self.app(a)?;
                }
                let body = json!({ "endpoints": self.endpoints(transport) });
                self.metrics.api_status(200);
                Ok(ApiOut::Response(http::json(200, &body, ka)))
            }
            ["v1", "drain"] => {
                expect_method(m, "POST")?;
                let q = Query::parse(query)?;
                q.only(&["deadline_ms"])?;
                let deadline_ms = q.int("deadline_ms", 1, 86_400_000)?.map(|v| v as u64);
                Ok(ApiOut::Command(Command::Drain { deadline_ms }))
            }
            ["v1", "stats"] => {
                expect_method(m, "GET")?;
                let mut base = self.metrics.stats(&self.app_ids, queue_depth);
                let o = base.as_object_mut().expect("an object");
                o.insert("node_id".into(), json!(self.cfg.node_id));
                o.insert("pid".into(), json!(std::process::id()));
                o.insert(
                    "max_connections".into(),
                    json!(self.cfg.limits.max_connections),
                );
                o.insert("state".into(), json!(self.node_state()));
                if self.view.enabled {
                    o.insert(
                        "cluster".into(),
                        json!({"ok": self.view.up(), "nodes": self.nodes_now()}),
                    );
                }
                Ok(ApiOut::Command(Command::Stats { base }))
            }
            ["metrics"] => {
                expect_method(m, "GET")?;
                self.metrics.api_status(200);
                let text = self.metrics.render(&self.app_ids, queue_depth);
                Ok(ApiOut::Response(http::response(
                    200,
                    "text/plain; version=0.0.4",
                    text.as_bytes(),
                    ka,
                )))
            }
            ["v1", "rooms", _, _, "members"] => {
                let add = match m {
                    "POST" => true,
                    "DELETE" => false,
                    _ => {
                        return reject(
                            405,
                            format!("method {m} not allowed here; use POST, DELETE"),
                        )
                    }
                };
                let app = self.app(&seg(2)?)?;
                let room = seg(3)?;
                check_id("room", &room)?;
                let body: RoomBody = serde_json::from_slice(&req.body)
                    .map_err(|e| (400, format!("body must be {{\"device_ids\": [...]}}: {e}")))?;
                if body.device_ids.is_empty() || body.device_ids.len() > MAX_BATCH {
                    return reject(400, format!("device_ids must hold 1-{MAX_BATCH} ids"));
                }
                for d in &body.device_ids {
                    check_id("device", d)?;
                }
                Ok(ApiOut::Command(Command::RoomMembers {
                    app,
                    room,
                    devices: body.device_ids,
                    add,
                }))
            }
            ["v1", "rooms", _, _] => {
                expect_method(m, "GET")?;
                let app = self.app(&seg(2)?)?;
                let room = seg(3)?;
                check_id("room", &room)?;
                let q = Query::parse(query)?;
                q.only(&["limit", "after"])?;
                let limit = q.int("limit", 1, 10_000)?.unwrap_or(1_000) as usize;
                let after = q.get("after").map(str::to_string);
                Ok(ApiOut::Command(Command::RoomInfo {
                    app,
                    room,
                    limit,
                    after,
                }))
            }
            ["v1", "session", _] => {
                expect_method(m, "PUT")?;
                let conn = parse_conn_id(&seg(2)?)?;
                let v: serde_json::Value = serde_json::from_slice(&req.body)
                    .map_err(|e| (400, format!("session body is not JSON: {e}")))?;
                let obj = v
                    .as_object()
                    .ok_or_else(|| (400, "session body must be a JSON object".to_string()))?;
                if obj.len() > MAX_SESSION_KEYS {
                    return reject(
                        413,
                        format!("a session holds at most {MAX_SESSION_KEYS} keys"),
                    );
                }
                let mut set = Vec::with_capacity(obj.len());
                for (k, v) in obj {
                    if k.is_empty() || k.len() > MAX_SESSION_KEY_BYTES {
                        return reject(
                            400,
                            format!("session keys are 1-{MAX_SESSION_KEY_BYTES} bytes"),
                        );
                    }
                    let val = match v {
                        serde_json::Value::Null => None,
                        serde_json::Value::String(s) => Some(s.clone()),
                        other => Some(other.to_string()),
                    };
                    set.push((k.clone(), val));
                }
                Ok(ApiOut::Command(Command::SetSession { conn, set }))
            }
            ["v1", "status", _] => {
                expect_method(m, "POST")?;
                let key = seg(2)?;
                check_status_key(&key)?;
                if req.body.len() > MAX_STATUS_VALUE {
                    return reject(413, format!("status value over {MAX_STATUS_VALUE} bytes"));
                }
                let q = Query::parse(query)?;
                q.only(&["ttl_ms"])?;
                let ttl_ms = q
                    .int("ttl_ms", 1, 86_400_000)?
                    .map_or(self.cfg.http.status_ttl_ms, |t| t as u64);
                Ok(ApiOut::Command(Command::SetStatus {
                    key,
                    value: Bytes::from(req.body.clone()),
                    ttl_ms,
                }))
            }
            ["v1", "push", "batch"] => {
                expect_method(m, "POST")?;
                let q = Query::parse(query)?;
                q.only(&["wait_ms"])?;
                let wait_ms = wait_ms(&q)?;
                let pushes = self.batch(&req.body, &req.items)?;
                Ok(ApiOut::Command(Command::Push {
                    pushes,
                    batch: true,
                    wait_ms,
                }))
            }
            ["v1", "push", kind, ..] => {
                expect_method(m, "POST")?;
                let target = self.target(kind, &segs[3..], seg, 3)?;
                let q = Query::parse(query)?;
                q.only(&[
                    "ack",
                    "ttl_ms",
                    "wait_ms",
                    "service",
                    "method",
                    "logid",
                    "payload_type",
                ])?;
                let ack = q.int("ack", 0, 1)? == Some(1);
                let ttl_ms = q.int("ttl_ms", 0, MAX_TTL_MS)?.unwrap_or(0) as u64;
                let wait_ms = wait_ms(&q)?;
                let frame = self.frame(
                    &q,
                    Bytes::from(req.body.clone()),
                    req.content_type.as_deref(),
                    ack,
                )?;
                Ok(ApiOut::Command(Command::Push {
                    pushes: vec![Push {
                        target,
                        frame,
                        ack,
                        ttl_ms,
                        index: 0,
                    }],
                    batch: false,
                    wait_ms,
                }))
            }
            ["v1", "online", kind, ..] => {
                expect_method(m, "GET")?;
                let target = self.target(kind, &segs[3..], seg, 3)?;
                if matches!(target, Target::Broadcast(_)) {
                    return reject(404, format!("no such path {path}"));
                }
                Ok(ApiOut::Command(Command::Online(target)))
            }
            ["v1", "kick", kind, ..] => {
                expect_method(m, "POST")?;
                let target = self.target(kind, &segs[3..], seg, 3)?;
                if matches!(target, Target::Broadcast(_)) {
                    return reject(404, format!("no such path {path}"));
                }
                let q = Query::parse(query)?;
                q.only(&["reason"])?;
                // (`?reason=` with nothing is no reason: the default, not an empty one.)
                let reason = q
                    .get("reason")
                    .filter(|r| !r.is_empty())
                    .unwrap_or("kicked");
                let reason = reason.to_string();
                if reason.len() > 256 {
                    return reject(400, "reason is longer than 256 bytes");
                }
                Ok(ApiOut::Command(Command::Kick { target, reason }))
            }
            _ => reject(404, format!("no such path {path}")),
        }
    }

    fn check_token(&self, req: &ApiRequest) -> Result<(), Reject> {
        let want = &self.cfg.api.token;
        if want.is_empty() {
            return Ok(());
        }
        let got = req.authorization.as_deref().and_then(bearer).unwrap_or("");
        if constant_time_eq(got.as_bytes(), want.as_bytes()) {
            Ok(())
        } else {
            reject(401, "missing or wrong bearer token")
        }
    }

    fn app(&self, id: &str) -> Result<usize, Reject> {
        self.cfg
            .app_index(id)
            .ok_or_else(|| (404, format!("unknown app {id:?}")))
    }

    /// `conn/{id}`, `device/{app}/{id}`, `user/{app}/{id}`, `broadcast/{app}`.
    fn target(
        &self,
        kind: &str,
        rest: &[&str],
        seg: impl Fn(usize) -> Result<String, Reject>,
        base: usize,
    ) -> Result<Target, Reject> {
        let want = match kind {
            "conn" | "broadcast" => 1,
            "device" | "user" | "room" => 2,
            _ => {
                return reject(
                    404,
                    format!("unknown target kind {kind:?} (conn, device, user, room, broadcast)"),
                )
            }
        };
        if rest.len() != want {
            return reject(404, format!("{kind} takes {want} path segment(s)"));
        }
        match kind {
            "conn" => Ok(Target::Conn(parse_conn_id(&seg(base)?)?)),
            "broadcast" => Ok(Target::Broadcast(self.app(&seg(base)?)?)),
            _ => {
                let app = self.app(&seg(base)?)?;
                let id = seg(base + 1)?;
                check_id(kind, &id)?;
                Ok(match kind {
                    "device" => Target::Device(app, id),
                    "user" => Target::User(app, id),
                    _ => Target::Room(app, id),
                })
            }
        }
    }

    /// Builds the shared push frame from query parameters and the payload.
    fn frame(
        &self,
        q: &Query,
        payload: Bytes,
        content_type: Option<&str>,
        ack: bool,
    ) -> Result<Shared, Reject> {
        let service = q.int("service", 0, i32::MAX as i64)?.unwrap_or(0) as i32;
        let method = push_method(service, q.int("method", 0, i32::MAX as i64)?)?;
        let logid = q.int("logid", 0, i64::MAX)?.unwrap_or(0) as u64;
        let payload_type = match q.get("payload_type") {
            Some(t) if t.len() <= 64 => t.to_string(),
            Some(_) => return reject(400, "payload_type is longer than 64 bytes"),
            None => infer_payload_type(content_type).to_string(),
        };
        self.encode(
            Frame {
                seqid: 0,
                logid,
                service,
                method,
                headers: vec![],
                payload_encoding: String::new(),
                payload_type,
                payload,
            },
            ack,
        )
    }

    /// Encodes a push, refused when it would not fit in a frame — an `ack=1` push with room
    /// for its `push_id` header.
    fn encode(&self, f: Frame, ack: bool) -> Result<Shared, Reject> {
        let shared = Shared::new(&f);
        let reserve = if ack {
            crate::codec::PUSH_ID_RESERVE
        } else {
            0
        };
        let limit = self
            .cfg
            .limits
            .max_frame_bytes
            .min(crate::codec::MAX_TCP_FRAME);
        if shared.body_len() + reserve + SHARED_OVERHEAD - crate::codec::PREFIX > limit {
            return reject(
                413,
                format!(
                    "payload of {} bytes does not fit in a frame (max_frame_bytes {limit})",
                    f.payload.len()
                ),
            );
        }
        Ok(shared)
    }

    fn batch(&self, body: &[u8], places: &[u32]) -> Result<Vec<Push>, Reject> {
        let items: Vec<BatchItem> = serde_json::from_slice(body)
            .map_err(|e| (400, format!("batch body is not a JSON list of pushes: {e}")))?;
        if items.is_empty() {
            return reject(400, "empty batch");
        }
        if items.len() > MAX_BATCH {
            return reject(
                413,
                format!("batch of {} pushes exceeds {MAX_BATCH}", items.len()),
            );
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, it) in items.into_iter().enumerate() {
            let mut p = self
                .batch_item(it)
                .map_err(|(s, m)| (s, format!("item {i}: {m}")))?;
            p.index = i as u32;
            out.push(p);
        }
        if !places.is_empty() {
            if places.len() != out.len() {
                return reject(400, "a split batch's places do not match its items");
            }
            for (p, &at) in out.iter_mut().zip(places) {
                p.index = at;
            }
        }
        Ok(out)
    }

    fn batch_item(&self, it: BatchItem<'_>) -> Result<Push, Reject> {
        // The message only when it is needed: a batch checks thousands of items.
        fn need<T>(v: Option<T>, name: &str) -> Result<T, Reject> {
            v.ok_or_else(|| (400, format!("\"{name}\" is required")))
        }
        let target = match &*it.to {
            "conn" => Target::Conn(parse_conn_id(&need(it.conn_id, "conn_id")?)?),
            "device" => {
                let id = need(it.device_id, "device_id")?;
                check_id("device", &id)?;
                Target::Device(self.app(&need(it.app, "app")?)?, id)
            }
            "user" => {
                let id = need(it.user_id, "user_id")?;
                check_id("user", &id)?;
                Target::User(self.app(&need(it.app, "app")?)?, id)
            }
            "broadcast" => Target::Broadcast(self.app(&need(it.app, "app")?)?),
            "room" => {
                let id = need(it.room, "room")?;
                check_id("room", &id)?;
                Target::Room(self.app(&need(it.app, "app")?)?, id)
            }
            other => {
                return reject(
                    400,
                    format!("\"to\" must be conn, device, user, room or broadcast, not {other:?}"),
                )
            }
        };
        let payload = match (it.payload, it.payload_base64) {
            (Some(p), None) => Bytes::from(p),
            (None, Some(b)) => Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| (400, format!("payload_base64: {e}")))?,
            ),
            (None, None) => Bytes::new(),
            (Some(_), Some(_)) => return reject(400, "give payload or payload_base64, not both"),
        };
        if it.ack.is_some_and(|a| a > 1) {
            return reject(400, "ack must be 0 or 1");
        }
        if it.ttl_ms.is_some_and(|t| t > MAX_TTL_MS as u64) {
            return reject(400, format!("ttl_ms must be at most {MAX_TTL_MS}"));
        }
        // The ranges a single push's query allows, so that both ways in take the same pushes.
        fn in_range(name: &str, v: Option<i64>, max: i64) -> Result<Option<i64>, Reject> {
            match v {
                Some(n) if !(0..=max).contains(&n) => reject(
                    400,
                    format!("{name} must be an integer in 0..={max}, not {n}"),
                ),
                v => Ok(v),
            }
        }
        let service = in_range("service", it.service.map(i64::from), i32::MAX.into())?;
        let service = service.unwrap_or(0) as i32;
        let method = push_method(
            service,
            in_range("method", it.method.map(i64::from), i32::MAX.into())?,
        )?;
        let logid = match it.logid {
            Some(l) if l > i64::MAX as u64 => {
                return reject(
                    400,
                    format!("logid must be an integer in 0..={}, not {l}", i64::MAX),
                )
            }
            l => l.unwrap_or(0),
        };
        let frame = self.encode(
            Frame {
                seqid: 0,
                logid,
                service,
                method,
                headers: vec![],
                payload_encoding: String::new(),
                payload_type: it.payload_type.unwrap_or_default(),
                payload,
            },
            it.ack == Some(1),
        )?;
        Ok(Push {
            target,
            frame,
            ack: it.ack == Some(1),
            ttl_ms: it.ttl_ms.unwrap_or(0),
            index: 0,
        })
    }
}

/// One push of a batch. `to` and `app` are only looked at, so they borrow from the body
/// (a copy only when they hold an escape): two allocations fewer per push.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem<'a> {
    #[serde(borrow)]
    to: Cow<'a, str>,
    conn_id: Option<String>,
    // (serde borrows a bare `Cow<str>` only, not one inside an `Option`: hence the
    // helper; `default` keeps a missing "app" None.)
    #[serde(borrow, default, deserialize_with = "borrowed_opt")]
    app: Option<Cow<'a, str>>,
    device_id: Option<String>,
    user_id: Option<String>,
    room: Option<String>,
    payload: Option<String>,
    payload_base64: Option<String>,
    #[serde(default)]
    service: Option<i32>,
    method: Option<i32>,
    payload_type: Option<String>,
    logid: Option<u64>,
    ack: Option<u8>,
    ttl_ms: Option<u64>,
}

/// An optional string that borrows from the input when it holds no escape.
fn borrowed_opt<'de: 'a, 'a, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Cow<'a, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'a>>::deserialize(d)?.map(|b| b.0))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomBody {
    device_ids: Vec<String>,
}

/// A push's method: PUSH by default on service 0, which carries nothing else — a control
/// verb there (a BYE, a REDIRECT, an ACK) would be taken by clients as the gateway's own.
fn push_method(service: i32, m: Option<i64>) -> Result<i32, Reject> {
    match (service, m) {
        (0, None) => Ok(method::PUSH),
        (0, Some(m)) if m == i64::from(method::PUSH) => Ok(method::PUSH),
        (0, Some(m)) => reject(
            400,
            format!(
                "service 0 carries only method {} (PUSH), not {m}: give a service above 0 for methods of your own",
                method::PUSH
            ),
        ),
        (_, m) => Ok(m.unwrap_or(0) as i32),
    }
}

fn expect_method(got: &str, want: &str) -> Result<(), Reject> {
    if got == want {
        Ok(())
    } else {
        reject(405, format!("method {got} not allowed here; use {want}"))
    }
}

/// The method a 405's message names (`expect_method`'s "...; use GET"), for `Allow`.
fn allowed(msg: &str) -> &str {
    msg.rsplit_once("; use ").map_or("GET", |(_, m)| m)
}

fn parse_conn_id(s: &str) -> Result<ConnId, Reject> {
    ConnId::parse(s).ok_or_else(|| (400, format!("malformed conn_id {s:?}: want NODE:INDEX:GEN")))
}

fn infer_payload_type(ct: Option<&str>) -> &'static str {
    let ct = ct.unwrap_or("").split(';').next().unwrap_or("").trim();
    match ct {
        "application/json" => "json",
        "application/x-protobuf" | "application/protobuf" => "pb",
        t if t.starts_with("text/") => "text",
        _ => "",
    }
}

/// Equal, in time that does not depend on where they differ (the token's length is not
/// secret: a length mismatch answers at once).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 7235), spaces around the token ignored.
fn bearer(v: &str) -> Option<&str> {
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The longest a push may live (`ttl_ms`) or an API answer may wait (`wait_ms`).
pub const MAX_TTL_MS: i64 = 86_400_000;
pub const MAX_WAIT_MS: i64 = 300_000;

fn wait_ms(q: &Query) -> Result<u64, Reject> {
    Ok(q.int("wait_ms", 0, MAX_WAIT_MS)?.unwrap_or(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_item_borrows_its_target_kind_and_app_unless_escaped() {
        let it: BatchItem = serde_json::from_slice(br#"{"to":"device","app":"demo"}"#).unwrap();
        assert!(matches!(it.to, Cow::Borrowed("device")));
        assert!(matches!(it.app, Some(Cow::Borrowed("demo"))));
        let it: BatchItem =
            serde_json::from_slice(br#"{"to":"d\u0065vice","app":"de\u006do"}"#).unwrap();
        assert!(matches!(&it.to, Cow::Owned(s) if s == "device"));
        assert!(matches!(&it.app, Some(Cow::Owned(s)) if s == "demo"));
        for absent in [
            &br#"{"to":"broadcast"}"#[..],
            br#"{"to":"broadcast","app":null}"#,
        ] {
            let it: BatchItem = serde_json::from_slice(absent).unwrap();
            assert!(it.app.is_none());
        }
        for bad in [
            &br#"{"to":"device","app":7}"#[..],
            br#"{"to":"device","nope":1}"#,
        ] {
            assert!(serde_json::from_slice::<BatchItem>(bad).is_err());
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_exact() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    fn api() -> Api {
        let cfg = Arc::new(Config::dev());
        let m = Arc::new(Metrics::new(&cfg));
        let view = Arc::new(View::new(&cfg.node_id, false));
        Api::new(cfg, m, view)
    }

    fn req(method: &str, target: &str, body: &[u8]) -> ApiRequest {
        ApiRequest {
            method: method.into(),
            target: target.into(),
            keep_alive: true,
            authorization: None,
            content_type: None,
            body: body.to_vec(),
            items: vec![],
        }
    }

    fn status(out: &ApiOut) -> u16 {
        match out {
            ApiOut::Response(b) => std::str::from_utf8(&b[9..12]).unwrap().parse().unwrap(),
            ApiOut::Command(_) => 0,
        }
    }

    #[test]
    fn routes_and_rejections() {
        let a = api();
        assert!(matches!(
            a.handle(&req("POST", "/v1/push/device/demo/d1", b"x"), 0),
            ApiOut::Command(_)
        ));
        assert_eq!(
            status(&a.handle(&req("POST", "/v1/push/device/nope/d1", b"x"), 0)),
            404
        );
        assert_eq!(
            status(&a.handle(&req("POST", "/v1/push/conn/garbage", b"x"), 0)),
            400
        );
        assert_eq!(
            status(&a.handle(&req("GET", "/v1/push/conn/n1:1:1", b"x"), 0)),
            405
        );
        assert_eq!(
            status(&a.handle(&req("POST", "/v1/push/device/demo/d1?service=x", b""), 0)),
            400
        );
        assert_eq!(
            status(&a.handle(
                &req("POST", "/v1/push/device/demo/d1", &vec![0u8; 70_000]),
                0
            )),
            413
        );
        assert_eq!(status(&a.handle(&req("GET", "/nowhere", b""), 0)), 404);
        assert_eq!(status(&a.handle(&req("GET", "/healthz", b""), 0)), 200);
    }

    #[test]
    fn a_bad_batch_item_rejects_the_whole_batch() {
        let a = api();
        let good = br#"[{"to":"device","app":"demo","device_id":"d1","payload":"a"},{"to":"broadcast","app":"demo","payload_base64":"AAE="}]"#;
        match a.handle(&req("POST", "/v1/push/batch", good), 0) {
            ApiOut::Command(Command::Push {
                pushes,
                batch: true,
                wait_ms: 0,
            }) => assert_eq!(pushes.len(), 2),
            other => panic!("{other:?}"),
        }
        let bad = br#"[{"to":"device","app":"demo","device_id":"d1"},{"to":"device","app":"nope","device_id":"d1"}]"#;
        match a.handle(&req("POST", "/v1/push/batch", bad), 0) {
            ApiOut::Response(b) => {
                let s = String::from_utf8(b).unwrap();
                assert!(s.starts_with("HTTP/1.1 404"), "{s}");
                assert!(s.contains("item 1: unknown app"), "{s}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            status(&a.handle(&req("POST", "/v1/push/batch", b"{nope"), 0)),
            400
        );
    }

    #[test]
    fn a_batch_item_takes_the_ranges_a_single_push_takes() {
        let a = api();
        let item = |extra: &str| {
            format!(r#"[{{"to":"device","app":"demo","device_id":"d1","service":3{extra}}}]"#)
        };
        for (extra, single) in [
            (r#","method":-5"#, "method=-5"),
            (
                r#","logid":9223372036854775808"#,
                "logid=9223372036854775808",
            ),
        ] {
            let body = item(extra);
            assert_eq!(
                status(&a.handle(&req("POST", "/v1/push/batch", body.as_bytes()), 0)),
                400,
                "{body}"
            );
            let path = format!("/v1/push/device/demo/d1?service=3&{single}");
            assert_eq!(
                status(&a.handle(&req("POST", &path, b""), 0)),
                400,
                "{path}"
            );
        }
        let body = r#"[{"to":"device","app":"demo","device_id":"d1","service":-1}]"#;
        assert_eq!(
            status(&a.handle(&req("POST", "/v1/push/batch", body.as_bytes()), 0)),
            400
        );
        let edge = item(r#","method":2147483647,"logid":9223372036854775807"#);
        assert!(matches!(
            a.handle(&req("POST", "/v1/push/batch", edge.as_bytes()), 0),
            ApiOut::Command(Command::Push { .. })
        ));
    }
}
