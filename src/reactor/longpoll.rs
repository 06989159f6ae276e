//! HTTP long-poll on status keys (docs/PROTOCOL.md, "Long-poll"): `GET /poll/status` waits
//! until a backend sets the key through the internal API (`POST /v1/status/{key}`) or the
//! poll's timeout passes; a value set first is kept for its TTL and answered at once. CORS
//! for browsers.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;

use super::conn::State;
use super::{Flow, Reactor, Role};
use crate::http;
use crate::metrics::{inc, Metrics};
use crate::slab::Slab;
use crate::timer::{TimerKey, TimerKind};
use crate::types::{check_status_key, unix_ms, Query, Ref};

const DEFAULT_POLL_TIMEOUT_S: f64 = 30.0;

/// Long-poll status keys and the connections waiting on them. Entries live in a slab so
/// their TTL timers can name them by `{index, generation}` on the same wheel as everything
/// else.
#[derive(Default)]
pub(super) struct StatusStore {
    pub(super) entries: Slab<Entry>,
    pub(super) keys: HashMap<Arc<str>, (u32, u32)>,
    /// Connection slot → what it waits for (a slot holds at most one waiter).
    pub(super) waiting: HashMap<u32, Waiter>,
    /// The last version given to a set: versions grow across keys, restarts (a set's
    /// version is at least the wall clock in ms) and a key's expiry, so `since` never misses
    /// a newer value.
    pub(super) version: u64,
    /// Values held, and their bytes (bounded by `[http] max_status_values` / `_bytes`).
    pub(super) values: usize,
    pub(super) bytes: usize,
}

pub(super) struct Entry {
    pub(super) key: Arc<str>,
    pub(super) value: Option<Bytes>,
    pub(super) version: u64,
    pub(super) expires: u64,
    pub(super) waiters: Vec<Ref>,
}

/// A parked poll: the key's entry, and how to answer it.
pub(super) struct Waiter {
    pub(super) gen: u32,
    pub(super) entry: (u32, u32),
    /// The `Access-Control-Allow-Origin` value to answer with, if CORS allows the origin.
    pub(super) cors: Option<Arc<str>>,
    pub(super) keep_alive: bool,
    /// Released only by a value with a newer version (`since`; 0 = any).
    pub(super) since: u64,
}

impl StatusStore {
    /// Gives back the room of a store far larger than what it holds now (after a burst of
    /// values has expired).
    pub fn shrink(&mut self) {
        self.entries.shrink();
        for cap in [self.keys.capacity(), self.waiting.capacity()] {
            if cap > 1024 && cap > 4 * self.keys.len().max(self.waiting.len()) {
                self.keys.shrink_to_fit();
                self.waiting.shrink_to_fit();
                break;
            }
        }
    }

    /// Every value held: key, value, and when it expires (reactor clock).
    pub fn values(&self) -> Vec<(Arc<str>, Bytes, u64)> {
        let mut v = Vec::with_capacity(self.values);
        for (i, g) in self.keys.values() {
            if let Some(e) = self.entries.get(*i, *g) {
                if let Some(b) = &e.value {
                    v.push((e.key.clone(), b.clone(), e.expires));
                }
            }
        }
        v
    }

    /// Keys that polls wait on, at most `max` of them.
    pub fn waited_keys(&self, max: usize) -> Vec<Arc<str>> {
        let mut v = std::collections::HashSet::new();
        for w in self.waiting.values() {
            if v.len() >= max {
                break;
            }
            if let Some(e) = self.entries.get(w.entry.0, w.entry.1) {
                v.insert(e.key.clone());
            }
        }
        v.into_iter().collect()
    }

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
            version: 0,
            expires: 0,
            waiters: vec![],
        });
        self.keys.insert(k, ig);
        metrics.status_keys.fetch_add(1, Relaxed);
        ig
    }

    /// Whether a status entry is still there (for the wheel's compaction).
    pub fn holds(&self, i: u32, g: u32) -> bool {
        self.entries.get(i, g).is_some()
    }

    /// Forgets an entry's value (expired), keeping the totals.
    fn clear_value(&mut self, i: u32, g: u32) {
        if let Some(v) = self.entries.get_mut(i, g).and_then(|e| e.value.take()) {
            self.values -= 1;
            self.bytes -= v.len();
        }
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

    /// Takes a connection's waiter out of the store (answered, timed out or gone).
    fn leave(&mut self, r: Ref, metrics: &Metrics) -> Option<Waiter> {
        if self.waiting.get(&r.idx).is_none_or(|w| w.gen != r.gen) {
            return None;
        }
        let w = self.waiting.remove(&r.idx)?;
        let (i, g) = w.entry;
        if let Some(e) = self.entries.get_mut(i, g) {
            e.waiters.retain(|x| *x != r);
        }
        self.prune(i, g, metrics);
        Some(w)
    }
}

fn success_body(value: &[u8], version: u64) -> serde_json::Value {
    // A JSON value is passed through as JSON; anything else as a string.
    let data = serde_json::from_slice::<serde_json::Value>(value)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(value).into_owned()));
    json!({"code": 0, "msg": "success", "data": data, "version": version})
}

/// The CORS header lines for an allowed origin. A listed origin may send credentials
/// (`fetch(url, {credentials: "include"})`: cookies), which browsers allow only with an
/// explicit origin, never with `*`; the answer is a status value, which that origin may
/// read anyway, so cookies add nothing it could not see.
pub(super) fn cors_lines(origin: &str) -> String {
    if origin == "*" {
        "Access-Control-Allow-Origin: *\r\n".into()
    } else {
        format!(
            "Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Allow-Credentials: true\r\nVary: Origin\r\n"
        )
    }
}

impl Reactor {
    /// The `Access-Control-Allow-Origin` value for a request's Origin, if CORS allows it.
    pub(super) fn cors(&self, origin: Option<&[u8]>) -> Option<String> {
        let list = &self.cfg.http.cors_origins;
        if list.iter().any(|o| o == "*") {
            return Some("*".into());
        }
        let o = std::str::from_utf8(origin?).ok()?;
        list.iter().any(|x| x == o).then(|| o.to_string())
    }

    /// Header lines for every `/poll/status` answer, errors included: CORS for an allowed
    /// origin; `Vary: Origin` whenever the answer depends on it (a listed origin gets
    /// CORS headers, another none), so that no cache serves one variant to the other; and
    /// no caching at all (a status answer is of its moment).
    pub(super) fn poll_headers(&self, allowed: Option<&str>) -> String {
        let mut extra = allowed.map(cors_lines).unwrap_or_default();
        let list = &self.cfg.http.cors_origins;
        let varies = !list.is_empty() && !list.iter().any(|o| o == "*");
        if allowed.is_none() && varies {
            extra.push_str("Vary: Origin\r\n");
        }
        extra.push_str("Cache-Control: no-store\r\n");
        extra
    }

    pub(super) fn poll_status(
        &mut self,
        idx: u32,
        gen: u32,
        req: &http::Request<'_>,
        query: &str,
    ) -> Flow {
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
                    .ok_or_else(|| (400, format!("timeout must be seconds >= 0, not {t:?}")))?,
            };
            let since = q.int("since", 0, i64::MAX)?.unwrap_or(0) as u64;
            Ok((key, timeout_s, since))
        });
        let (key, timeout_s, since) = match parsed {
            Ok(v) => v,
            Err((status, msg)) => {
                let extra = self.poll_headers(cors.as_deref());
                let resp = http::error_with(status, &msg, &extra, ka);
                return self.http_done(idx, gen, status, &resp, ka);
            }
        };
        let timeout_ms = ((timeout_s * 1000.0) as u64).min(self.cfg.http.poll_max_timeout_ms);
        // A value set before the poll arrived (and newer than `since`) is answered at once.
        let now = self.now;
        if let Some((v, version)) = self.status.entry_mut(&key).and_then(|e| {
            let current = e.expires > now && e.version > since;
            e.value.clone().filter(|_| current).map(|v| (v, e.version))
        }) {
            inc(&self.metrics.poll_released);
            let body = success_body(&v, version);
            return self.poll_answer(idx, gen, &body, cors.as_deref(), ka);
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
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return Flow::Close;
        };
        c.state = State::Waiting;
        let entry = self.status.get_or_create(&key, &self.metrics);
        if let Some(e) = self.status.entries.get_mut(entry.0, entry.1) {
            e.waiters.push(Ref { idx, gen });
        }
        self.status.waiting.insert(
            idx,
            Waiter {
                gen,
                entry,
                cors: cors.map(|o| o.as_str().into()),
                keep_alive: ka,
                since,
            },
        );
        self.metrics.poll_waiters.fetch_add(1, Relaxed);
        self.arm(idx, gen, TimerKind::PollTimeout, now + timeout_ms);
        // Cluster: it may have been set through a node while this one was not there.
        self.status_wanted(&key);
        // Reading goes on while it waits: a close that came with the request is seen now.
        Flow::Continue
    }

    fn poll_answer(
        &mut self,
        idx: u32,
        gen: u32,
        body: &serde_json::Value,
        cors: Option<&str>,
        ka: bool,
    ) -> Flow {
        let resp = http::json_with(200, body, &self.poll_headers(cors), ka);
        self.http_done(idx, gen, 200, &resp, ka)
    }

    /// Ends a wait: answer, then serve the connection's next request (or close).
    fn finish_wait(&mut self, idx: u32, gen: u32, body: &serde_json::Value) {
        let Some(w) = self.status.leave(Ref { idx, gen }, &self.metrics) else {
            return;
        };
        self.metrics.poll_waiters.fetch_sub(1, Relaxed);
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        c.state = State::Hello;
        if self.poll_answer(idx, gen, body, w.cors.as_deref(), w.keep_alive) == Flow::Continue {
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
        if self.status.leave(Ref { idx, gen }, &self.metrics).is_some() {
            self.metrics.poll_waiters.fetch_sub(1, Relaxed);
        }
    }

    /// A waiter whose connection ends now (shutdown, drain): its answer as at a timeout,
    /// then the close, counted as `reason`. Not kept alive: a request pipelined behind
    /// the poll would be taken and could wait again on a connection that is closing.
    pub(super) fn poll_end(&mut self, idx: u32, gen: u32, reason: crate::metrics::CloseReason) {
        let Some(w) = self.status.leave(Ref { idx, gen }, &self.metrics) else {
            return;
        };
        self.metrics.poll_waiters.fetch_sub(1, Relaxed);
        inc(&self.metrics.poll_timeouts);
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        c.state = State::Hello;
        let extra = self.poll_headers(w.cors.as_deref());
        let resp = http::json_with(200, &json!({"code": -1, "msg": "timeout"}), &extra, false);
        self.http_reply(idx, gen, 200, &resp);
        self.close_after_flush(idx, gen, reason);
    }

    pub(super) fn poll_timed_out(&mut self, idx: u32, gen: u32) {
        inc(&self.metrics.poll_timeouts);
        self.finish_wait(idx, gen, &json!({"code": -1, "msg": "timeout"}));
    }

    /// Whether `key` holds a value that has not expired.
    pub(super) fn status_current(&mut self, key: &str) -> bool {
        let now = self.now;
        self.status
            .entry_mut(key)
            .is_some_and(|e| e.value.is_some() && e.expires > now)
    }

    /// `POST /v1/status/{key}`: keep the value for `ttl_ms` under a new version and answer
    /// every waiter. Returns how many were released, and the version; or Err when the store
    /// is full (`[http] max_status_values` / `max_status_bytes`), and nothing changes.
    pub(super) fn set_status(
        &mut self,
        key: String,
        value: Bytes,
        ttl_ms: u64,
    ) -> Result<(usize, u64), String> {
        let held = self
            .status
            .entry_mut(&key)
            .and_then(|e| e.value.as_ref())
            .map(Bytes::len);
        let (values, bytes) = (
            self.status.values + usize::from(held.is_none()),
            self.status.bytes - held.unwrap_or(0) + value.len(),
        );
        let h = &self.cfg.http;
        if values > h.max_status_values || bytes > h.max_status_bytes {
            inc(&self.metrics.status_refused);
            return Err(format!(
                "the status store is full ({} values, {} bytes held; max_status_values {}, max_status_bytes {})",
                self.status.values, self.status.bytes, h.max_status_values, h.max_status_bytes
            ));
        }
        let (i, g) = self.status.get_or_create(&key, &self.metrics);
        let now = self.now;
        let version = (self.status.version + 1).max(unix_ms());
        self.status.version = version;
        (self.status.values, self.status.bytes) = (values, bytes);
        let Some(e) = self.status.entries.get_mut(i, g) else {
            return Ok((0, version));
        };
        e.value = Some(value.clone());
        e.version = version;
        e.expires = now + ttl_ms;
        let waiters = e.waiters.clone();
        self.wheel.insert(
            now + ttl_ms,
            TimerKey {
                idx: i,
                gen: g,
                kind: TimerKind::StatusExpire,
            },
        );
        let body = success_body(&value, version);
        let mut released = 0;
        for w in waiters {
            let waits = self
                .conns
                .get(w.idx, w.gen)
                .is_some_and(|c| c.state == State::Waiting);
            let newer = self
                .status
                .waiting
                .get(&w.idx)
                .is_some_and(|x| x.gen == w.gen && x.since < version);
            if waits && newer {
                released += 1;
                inc(&self.metrics.poll_released);
                self.finish_wait(w.idx, w.gen, &body);
            }
        }
        Ok((released, version))
    }

    pub(super) fn status_expired(&mut self, k: TimerKey) {
        let now = self.now;
        let Some(e) = self.status.entries.get_mut(k.idx, k.gen) else {
            return;
        };
        if e.expires > now {
            return; // set again since; its own timer will come
        }
        self.status.clear_value(k.idx, k.gen);
        self.status.prune(k.idx, k.gen, &self.metrics);
    }
}
