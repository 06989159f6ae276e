//! The client HTTP listener (DESIGN.md §3): `GET /ws` upgrades (auth from the query string,
//! then `websocket.rs` takes over), and HTTP long-poll on status keys (`GET /poll/status`),
//! with CORS. Status values are set through the internal API (`POST /v1/status/{key}`).

use std::collections::HashMap;

use bytes::Bytes;

use super::*;
use crate::api::{check_status_key, Query};

/// Long-poll status keys. Entries live in a slab so their TTL timers can name them by
/// `{index, generation}` on the same wheel as everything else.
#[derive(Default)]
pub(super) struct StatusStore {
    entries: Slab<Entry>,
    keys: HashMap<Arc<str>, (u32, u32)>,
}

struct Entry {
    key: Arc<str>,
    value: Option<Bytes>,
    expires: u64,
    waiters: Vec<Ref>,
}

const MAX_REQUEST_BODY: usize = 64 * 1024;
const DEFAULT_POLL_TIMEOUT_S: f64 = 30.0;

impl StatusStore {
    fn find(&self, key: &str) -> Option<(u32, u32)> {
        self.keys.get(key).copied()
    }

    fn entry_mut(&mut self, key: &str) -> Option<&mut Entry> {
        let (i, g) = self.find(key)?;
        self.entries.get_mut(i, g)
    }

    /// The entry for `key`, created empty if missing.
    fn get_or_create(&mut self, key: &str, metrics: &Metrics) -> (u32, u32) {
        if let Some(ig) = self.find(key) {
            return ig;
        }
        let k: Arc<str> = key.into();
        let ig = self.entries.insert(Entry {
            key: k.clone(),
            value: None,
            expires: 0,
            waiters: vec![],
        });
        self.keys.insert(k, ig);
        metrics.status_keys.fetch_add(1, Relaxed);
        ig
    }

    /// Drops an entry that holds nothing any more.
    fn prune(&mut self, i: u32, g: u32, metrics: &Metrics) {
        let empty = self
            .entries
            .get(i, g)
            .is_some_and(|e| e.value.is_none() && e.waiters.is_empty());
        if empty {
            if let Some(e) = self.entries.remove(i, g) {
                self.keys.remove(&e.key);
                metrics.status_keys.fetch_sub(1, Relaxed);
            }
        }
    }
}

fn success_body(value: &[u8]) -> serde_json::Value {
    // A JSON value is passed through as JSON; anything else as a string.
    let data = serde_json::from_slice::<serde_json::Value>(value)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(value).into_owned()));
    json!({"code": 0, "msg": "success", "data": data})
}

impl Reactor {
    pub(super) fn process_http(&mut self, idx: u32, gen: u32, data: &[u8]) -> (usize, Flow) {
        let Some(c) = self.conns.get(idx, gen) else {
            return (data.len(), Flow::Close);
        };
        if c.state != State::Hello {
            return (0, Flow::Pause);
        }
        let limits = http::Limits {
            max_head: http::DEFAULT_MAX_HEAD,
            max_body: MAX_REQUEST_BODY,
        };
        match http::parse_request(data, &limits) {
            Ok(Parsed::Incomplete { .. }) => (0, Flow::Continue),
            Ok(Parsed::Complete(req, used)) => (used, self.http_request(idx, gen, &req)),
            Err(e) => {
                self.http_reply(
                    idx,
                    gen,
                    e.status(),
                    &http::error(e.status(), &e.to_string(), false),
                );
                self.close_after_flush(idx, gen, CloseReason::ProtocolError);
                (data.len(), Flow::Close)
            }
        }
    }

    fn http_request(&mut self, idx: u32, gen: u32, req: &http::Request<'_>) -> Flow {
        let (path, query) = req.target.split_once('?').unwrap_or((req.target, ""));
        match (req.method, path) {
            (_, "/ws") => self.ws_upgrade(idx, gen, req, query),
            ("GET", "/poll/status") => self.poll_status(idx, gen, req, query),
            ("OPTIONS", "/poll/status") => {
                let extra = self.cors(req.header("origin")).map_or(String::new(), |o| {
                    let asked = req.header("access-control-request-headers").and_then(|h| std::str::from_utf8(h).ok()).unwrap_or("Content-Type");
                    format!(
                        "{}Access-Control-Allow-Methods: GET, OPTIONS\r\nAccess-Control-Allow-Headers: {asked}\r\nAccess-Control-Max-Age: 600\r\n",
                        cors_lines(&o)
                    )
                });
                let resp = http::response_with(204, "text/plain", &extra, b"", req.keep_alive);
                self.http_done(idx, gen, 204, &resp, req.keep_alive)
            }
            (_, "/poll/status") => {
                self.http_refuse(idx, gen, 405, "use GET (or OPTIONS)", req.keep_alive)
            }
            _ => self.http_refuse(
                idx,
                gen,
                404,
                &format!("no such path {path}"),
                req.keep_alive,
            ),
        }
    }

    pub(super) fn http_reply(&mut self, idx: u32, gen: u32, status: u16, bytes: &[u8]) {
        self.metrics.http_status(status);
        self.send_bytes(idx, gen, bytes);
    }

    /// Answers a request; keep-alive waits for the next one, else closes after the answer.
    fn http_done(
        &mut self,
        idx: u32,
        gen: u32,
        status: u16,
        bytes: &[u8],
        keep_alive: bool,
    ) -> Flow {
        self.http_reply(idx, gen, status, bytes);
        if keep_alive {
            self.arm_handshake(idx, gen);
            Flow::Continue
        } else {
            self.close_after_flush(idx, gen, CloseReason::Peer);
            Flow::Close
        }
    }

    fn http_refuse(
        &mut self,
        idx: u32,
        gen: u32,
        status: u16,
        msg: &str,
        keep_alive: bool,
    ) -> Flow {
        self.http_done(
            idx,
            gen,
            status,
            &http::error(status, msg, keep_alive),
            keep_alive,
        )
    }

    // ---- WebSocket upgrade ------------------------------------------------------------

    fn ws_upgrade(&mut self, idx: u32, gen: u32, req: &http::Request<'_>, query: &str) -> Flow {
        let u = match ws::check_upgrade(req.method, &req.headers) {
            Ok(u) => u,
            Err((status, msg)) => {
                let extra = if status == 426 {
                    "Sec-WebSocket-Version: 13\r\n"
                } else {
                    ""
                };
                let body = serde_json::to_vec(&json!({ "error": msg })).unwrap_or_default();
                let resp = http::response_with(status, "application/json", extra, &body, false);
                return self.http_done(idx, gen, status, &resp, false);
            }
        };
        let allowed = &self.cfg.http.allowed_origins;
        if !allowed.is_empty() {
            let origin = req
                .header("origin")
                .and_then(|o| std::str::from_utf8(o).ok());
            if !origin.is_some_and(|o| allowed.iter().any(|a| a == o)) {
                return self.http_refuse(idx, gen, 403, "origin not allowed", false);
            }
        }
        let q = match Query::parse(query) {
            Ok(q) => q,
            Err((status, msg)) => return self.http_refuse(idx, gen, status, &msg, false),
        };
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return Flow::Close;
        };
        let remote = match &c.sock {
            Sock::Tcp(s) => s.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
            Sock::Unix(_) => "unix".into(),
        };
        if self.start_auth(Ref { idx, gen }, 0, Creds::from_query(&q), remote, Some(u)) {
            Flow::Pause
        } else {
            self.http_refuse(idx, gen, 503, "busy, try again", false)
        }
    }

    // ---- long-poll --------------------------------------------------------------------

    /// The `Access-Control-Allow-Origin` value for a request's Origin, if CORS allows it.
    fn cors(&self, origin: Option<&[u8]>) -> Option<String> {
        let list = &self.cfg.http.cors_origins;
        if list.iter().any(|o| o == "*") {
            return Some("*".into());
        }
        let o = std::str::from_utf8(origin?).ok()?;
        list.iter().any(|x| x == o).then(|| o.to_string())
    }

    fn poll_status(&mut self, idx: u32, gen: u32, req: &http::Request<'_>, query: &str) -> Flow {
        let ka = req.keep_alive;
        let cors = self.cors(req.header("origin"));
        let parsed = Query::parse(query).and_then(|q| {
            let key = q.get("key").unwrap_or("").to_string();
            check_status_key(&key)?;
            let timeout_s = match q.get("timeout") {
                None => DEFAULT_POLL_TIMEOUT_S,
                Some(t) => t
                    .parse::<f64>()
                    .ok()
                    .filter(|t| t.is_finite() && *t >= 0.0)
                    .ok_or((400, format!("timeout must be seconds >= 0, not {t:?}")))?,
            };
            Ok((key, timeout_s))
        });
        let (key, timeout_s) = match parsed {
            Ok(v) => v,
            Err((status, msg)) => return self.http_refuse(idx, gen, status, &msg, ka),
        };
        let timeout_ms = ((timeout_s * 1000.0) as u64).min(self.cfg.http.poll_max_timeout_ms);
        // A value set before the poll arrived is answered at once.
        let now = self.now;
        if let Some(v) = self
            .status
            .entry_mut(&key)
            .and_then(|e| e.value.clone().filter(|_| e.expires > now))
        {
            inc(&self.metrics.poll_released);
            return self.poll_answer(idx, gen, &success_body(&v), cors.as_deref(), ka);
        }
        if timeout_ms == 0 {
            inc(&self.metrics.poll_timeouts);
            return self.poll_answer(
                idx,
                gen,
                &json!({"code": -1, "msg": "timeout"}),
                cors.as_deref(),
                ka,
            );
        }
        let (i, g) = self.status.get_or_create(&key, &self.metrics);
        if let Some(e) = self.status.entries.get_mut(i, g) {
            e.waiters.push(Ref { idx, gen });
        }
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return Flow::Close;
        };
        // While waiting, `device` names the key and `user` the CORS origin to answer with.
        c.state = State::Waiting;
        c.device = Some(key.as_str().into());
        c.user = cors.map(|o| o.as_str().into());
        if ka {
            c.ws |= wsflag::KEEP_ALIVE;
        } else {
            c.ws &= !wsflag::KEEP_ALIVE;
        }
        self.metrics.poll_waiters.fetch_add(1, Relaxed);
        self.wheel.insert(
            now + timeout_ms,
            TimerKey {
                idx,
                gen,
                kind: TimerKind::PollTimeout,
            },
        );
        Flow::Pause
    }

    fn poll_answer(
        &mut self,
        idx: u32,
        gen: u32,
        body: &serde_json::Value,
        cors: Option<&str>,
        ka: bool,
    ) -> Flow {
        let extra = cors.map(cors_lines).unwrap_or_default();
        let mut b = serde_json::to_vec(body).unwrap_or_default();
        b.push(b'\n');
        let resp = http::response_with(200, "application/json", &extra, &b, ka);
        self.http_done(idx, gen, 200, &resp, ka)
    }

    /// Ends a wait: answer, then serve the connection's next request (or close).
    fn finish_wait(&mut self, idx: u32, gen: u32, body: &serde_json::Value) {
        self.poll_left(idx, gen);
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        c.state = State::Hello;
        c.device = None;
        let cors = c.user.take();
        let ka = c.ws & wsflag::KEEP_ALIVE != 0;
        if self.poll_answer(idx, gen, body, cors.as_deref(), ka) == Flow::Continue {
            self.resume(idx, gen);
        }
    }

    /// Removes a waiting connection from its key's waiters (closed, answered or timed out):
    /// a waiter that disconnects is released at once.
    pub(super) fn poll_left(&mut self, idx: u32, gen: u32) {
        let Some(c) = self.conns.get(idx, gen) else {
            return;
        };
        if c.state != State::Waiting || c.role != Role::Http {
            return;
        }
        let Some(key) = c.device.clone() else {
            return;
        };
        self.metrics.poll_waiters.fetch_sub(1, Relaxed);
        if let Some((i, g)) = self.status.find(&key) {
            if let Some(e) = self.status.entries.get_mut(i, g) {
                e.waiters.retain(|r| *r != Ref { idx, gen });
            }
            self.status.prune(i, g, &self.metrics);
        }
    }

    pub(super) fn poll_timed_out(&mut self, idx: u32, gen: u32) {
        inc(&self.metrics.poll_timeouts);
        self.finish_wait(idx, gen, &json!({"code": -1, "msg": "timeout"}));
    }

    /// `POST /v1/status/{key}`: keep the value for `ttl_ms` and answer every waiter.
    pub(super) fn set_status(&mut self, key: String, value: Bytes, ttl_ms: u64) -> usize {
        let (i, g) = self.status.get_or_create(&key, &self.metrics);
        let now = self.now;
        let Some(e) = self.status.entries.get_mut(i, g) else {
            return 0;
        };
        e.value = Some(value.clone());
        e.expires = now + ttl_ms;
        let waiters = std::mem::take(&mut e.waiters);
        self.wheel.insert(
            now + ttl_ms,
            TimerKey {
                idx: i,
                gen: g,
                kind: TimerKind::StatusExpire,
            },
        );
        let body = success_body(&value);
        let mut released = 0;
        for w in waiters {
            if self
                .conns
                .get(w.idx, w.gen)
                .is_some_and(|c| c.state == State::Waiting)
            {
                released += 1;
                inc(&self.metrics.poll_released);
                self.finish_wait(w.idx, w.gen, &body);
            }
        }
        released
    }

    pub(super) fn status_expired(&mut self, k: TimerKey) {
        let now = self.now;
        let Some(e) = self.status.entries.get_mut(k.idx, k.gen) else {
            return;
        };
        if e.expires > now {
            return; // set again since; its own timer will come
        }
        e.value = None;
        self.status.prune(k.idx, k.gen, &self.metrics);
    }
}

fn cors_lines(origin: &str) -> String {
    if origin == "*" {
        "Access-Control-Allow-Origin: *\r\n".into()
    } else {
        format!("Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n")
    }
}
