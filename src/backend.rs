//! Calls to an app's backends (docs/PROTOCOL.md, "Backends"): the auth callback, upstream services and
//! online/offline events. They run off the reactor *and* off the shared worker pool: each
//! purpose has its own lane (a bounded queue and its own threads with a pooled keep-alive
//! HTTP client), so a backend that hangs holds only its own lane's threads — pushes, pings,
//! the API and other apps' traffic go on. A full lane is answered "busy" at once.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use crossbeam_channel::{Receiver, Sender};
use serde_json::json;

use crate::config::{App, Config, Format, Service};
use crate::metrics::{BackendStats, Metrics};
use crate::proto::{code, Frame};
use crate::types::{check_id, insert_payload, unix_ms, Admit, Creds};

pub type Task = Box<dyn FnOnce(&ureq::Agent) + Send>;

/// A bounded queue of backend calls and the threads that make them.
pub struct Lane {
    tx: Sender<Task>,
    pub stats: usize,
}

impl Lane {
    fn start(name: &str, threads: usize, timeout: Duration, stats: usize) -> Lane {
        // As many may wait as run: past that the caller is told "busy".
        let (tx, rx) = crossbeam_channel::bounded::<Task>(threads);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_idle_connections(threads)
            .max_idle_connections_per_host(threads)
            .build()
            .into();
        for i in 0..threads {
            let (rx, agent): (Receiver<Task>, ureq::Agent) = (rx.clone(), agent.clone());
            std::thread::Builder::new()
                .name(format!("ll-{name}-{i}"))
                .spawn(move || {
                    while let Ok(task) = rx.recv() {
                        // A panicking call must not take the lane's thread with it.
                        let _ =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task(&agent)));
                    }
                })
                .expect("spawn backend thread");
        }
        Lane { tx, stats }
    }

    /// Queues a call; false when the lane is saturated.
    pub fn try_run(&self, t: Task) -> bool {
        self.tx.try_send(t).is_ok()
    }
}

/// One event, posted by the app's events thread in the order events happened.
pub struct Event(pub serde_json::Value);

pub struct AppBackends {
    pub auth: Option<Lane>,
    pub events: Option<Sender<Event>>,
    /// Reports of `ack=1` pushes given up (the late-failure webhook), on their own thread.
    pub undelivered: Option<Sender<Event>>,
    pub services: Vec<(i32, Lane)>,
}

pub struct Backends {
    pub apps: Vec<AppBackends>,
    events_threads: Vec<std::thread::JoinHandle<()>>,
}

/// Auth calls in flight per app before HELLOs are answered "busy".
const AUTH_THREADS: usize = 32;
/// Events waiting per app before new ones are dropped (and counted).
const EVENTS_QUEUE: usize = 65_536;

impl Backends {
    pub fn start(cfg: &Config, metrics: &Arc<Metrics>) -> Backends {
        let mut threads = vec![];
        let mut stat = 0;
        let mut next = || {
            stat += 1;
            stat - 1
        };
        let apps = cfg
            .apps
            .iter()
            .map(|a| {
                let auth = (!a.auth_url.is_empty()).then(|| {
                    Lane::start(
                        &format!("{}-auth", a.id),
                        AUTH_THREADS,
                        Duration::from_millis(a.auth_timeout_ms),
                        next(),
                    )
                });
                let events = (!a.events_url.is_empty()).then(|| {
                    let (tx, handle) =
                        start_events(a, &a.events_url, "events", metrics.clone(), next());
                    threads.push(handle);
                    tx
                });
                let undelivered = (!a.undelivered_url.is_empty()).then(|| {
                    let (tx, handle) = start_events(
                        a,
                        &a.undelivered_url,
                        "undelivered",
                        metrics.clone(),
                        next(),
                    );
                    threads.push(handle);
                    tx
                });
                let services = a
                    .services
                    .iter()
                    .filter(|s| !s.is_echo())
                    .map(|s| {
                        (
                            s.id,
                            Lane::start(
                                &format!("{}-svc{}", a.id, s.id),
                                s.max_inflight,
                                Duration::from_millis(s.timeout_ms),
                                next(),
                            ),
                        )
                    })
                    .collect();
                AppBackends {
                    auth,
                    events,
                    undelivered,
                    services,
                }
            })
            .collect();
        Backends {
            apps,
            events_threads: threads,
        }
    }

    /// At shutdown: lets the events threads post what is queued (the offline events of the
    /// connections just closed), for at most `within`.
    pub fn finish(mut self, within: Duration) {
        for a in &mut self.apps {
            // The threads end when their queue is drained and closed.
            a.events = None;
            a.undelivered = None;
        }
        let end = Instant::now() + within;
        while self.events_threads.iter().any(|h| !h.is_finished()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn service(&self, app: usize, id: i32) -> Option<&Lane> {
        self.apps[app]
            .services
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, l)| l)
    }
}

pub enum CallError {
    Timeout,
    Failed(String),
}

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// One POST; records latency and errors in `stats`.
pub fn post(
    agent: &ureq::Agent,
    url: &str,
    content_type: &str,
    headers: &[(&str, String)],
    body: &[u8],
    stats: &BackendStats,
) -> Result<Reply, CallError> {
    let start = Instant::now();
    let mut req = agent.post(url).header("Content-Type", content_type);
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let r = req.send(body).and_then(|mut resp| {
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp.body_mut().read_to_vec()?;
        Ok(Reply {
            status,
            content_type,
            body,
        })
    });
    stats.latency.observe(start.elapsed());
    match r {
        Ok(reply) => {
            if reply.status >= 500 {
                stats.errors.fetch_add(1, Relaxed);
            }
            Ok(reply)
        }
        Err(ureq::Error::Timeout(_)) => {
            stats.timeouts.fetch_add(1, Relaxed);
            Err(CallError::Timeout)
        }
        Err(e) => {
            stats.errors.fetch_add(1, Relaxed);
            Err(CallError::Failed(e.to_string()))
        }
    }
}

/// The auth callback: 200 admits (with `user_id` and `session` from the answer), 401/403
/// reject with that code, anything else rejects with 502 (backend error) or 504 (timeout).
pub fn auth(
    agent: &ureq::Agent,
    app: &App,
    app_idx: usize,
    c: &Creds,
    remote: &str,
    transport: &str,
    stats: &BackendStats,
) -> Result<Admit, (u16, String)> {
    c.check()?;
    let body = json!({
        "app_id": c.app_id, "device_id": c.device_id, "user_id": c.user_id, "token": c.token,
        "remote_addr": remote, "transport": transport,
    });
    let body = serde_json::to_vec(&body).unwrap_or_default();
    match post(agent, &app.auth_url, "application/json", &[], &body, stats) {
        Ok(r) if r.status == 200 => {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            let user = v["user_id"]
                .as_str()
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .or_else(|| c.user_id.clone());
            if user
                .as_deref()
                .is_some_and(|u| check_id("user", u).is_err())
            {
                return Err((
                    code::BACKEND_ERROR,
                    "auth backend returned a bad user_id".into(),
                ));
            }
            let session = v["session"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                v.as_str().map_or_else(|| v.to_string(), str::to_string),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(Admit {
                app: app_idx,
                device: c.device_id.clone(),
                user,
                session,
            })
        }
        Ok(r) if r.status == 401 || r.status == 403 => {
            Err((r.status, "rejected by the auth backend".into()))
        }
        Ok(r) => Err((
            code::BACKEND_ERROR,
            format!("auth backend answered {}", r.status),
        )),
        Err(CallError::Timeout) => Err((code::BACKEND_TIMEOUT, "auth backend timed out".into())),
        Err(CallError::Failed(e)) => Err((
            code::BACKEND_ERROR,
            format!("auth backend unreachable: {e}"),
        )),
    }
}

/// A thread posting one kind of report (`what`: events or undelivered) for an app, in order,
/// with retries.
fn start_events(
    a: &App,
    url: &str,
    what: &'static str,
    metrics: Arc<Metrics>,
    stats: usize,
) -> (Sender<Event>, std::thread::JoinHandle<()>) {
    let (tx, rx) = crossbeam_channel::bounded::<Event>(EVENTS_QUEUE);
    let (url, tries) = (url.to_string(), a.events_retries.max(1));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let handle = std::thread::Builder::new()
        .name(format!("ll-{}-{what}", a.id))
        .spawn(move || {
            let s = &metrics.backends[stats];
            // One thread per app: events leave in the order they happened, so a connection's
            // online always precedes its offline. Retries back off 100 ms, 200 ms, 400 ms...
            while let Ok(Event(ev)) = rx.recv() {
                let body = serde_json::to_vec(&ev).unwrap_or_default();
                let mut delivered = false;
                for attempt in 0..tries {
                    if attempt > 0 {
                        std::thread::sleep(Duration::from_millis(100 << (attempt - 1).min(6)));
                    }
                    if let Ok(r) = post(&agent, &url, "application/json", &[], &body, s) {
                        if (200..300).contains(&r.status) {
                            delivered = true;
                            break;
                        }
                        if r.status < 500 {
                            s.errors.fetch_add(1, Relaxed);
                        }
                    }
                }
                let c = match (what, delivered) {
                    ("events", true) => &metrics.events_sent,
                    ("events", false) => &metrics.events_failed,
                    (_, true) => &metrics.undelivered_reports_sent,
                    (_, false) => &metrics.undelivered_reports_failed,
                };
                c.fetch_add(1, Relaxed);
            }
        })
        .expect("spawn events thread");
    (tx, handle)
}

/// What a connection sends with every upstream call and event.
#[derive(Clone, Debug)]
pub struct Context {
    pub conn_id: String,
    pub app_id: String,
    pub device_id: String,
    pub user_id: Option<String>,
    pub session: Vec<(String, String)>,
    pub transport: &'static str,
}

impl Context {
    pub fn session_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.session
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect(),
        )
    }

    pub fn event(&self, kind: &str) -> Event {
        Event(json!({
            "event": kind, "conn_id": self.conn_id, "app_id": self.app_id, "device_id": self.device_id,
            "user_id": self.user_id, "session": self.session_json(), "transport": self.transport, "at_ms": unix_ms(),
        }))
    }
}

/// The answer to an upstream frame.
pub struct UpReply {
    pub payload: Vec<u8>,
    pub payload_type: String,
}

/// POSTs one upstream frame to an HTTP service (request format in docs/PROTOCOL.md).
pub fn upstream(
    agent: &ureq::Agent,
    svc: &Service,
    ctx: &Context,
    f: &Frame,
    stats: &BackendStats,
) -> Result<UpReply, (u16, String)> {
    let r = match svc.format {
        Format::Json => {
            let mut env = json!({
                "conn_id": ctx.conn_id, "app_id": ctx.app_id, "device_id": ctx.device_id, "user_id": ctx.user_id,
                "session": ctx.session_json(), "transport": ctx.transport, "logid": f.logid, "seqid": f.seqid,
                "service": f.service, "method": f.method, "payload_type": f.payload_type, "payload_encoding": f.payload_encoding,
                "headers": serde_json::Value::Object(f.headers.iter().map(|h| (h.key.clone(), h.value.clone().into())).collect()),
            });
            let o = env.as_object_mut().expect("object");
            insert_payload(o, &f.payload);
            post(
                agent,
                &svc.url,
                "application/json",
                &[],
                &serde_json::to_vec(&env).unwrap_or_default(),
                stats,
            )
        }
        Format::Protobuf => {
            let headers = [
                ("X-Longlink-Conn-Id", ctx.conn_id.clone()),
                ("X-Longlink-App-Id", ctx.app_id.clone()),
                ("X-Longlink-Device-Id", ctx.device_id.clone()),
                (
                    "X-Longlink-User-Id",
                    ctx.user_id.clone().unwrap_or_default(),
                ),
                ("X-Longlink-Session", ctx.session_json().to_string()),
            ];
            post(
                agent,
                &svc.url,
                "application/x-protobuf",
                &headers,
                &prost::Message::encode_to_vec(f),
                stats,
            )
        }
    };
    match r {
        Ok(r) if (200..300).contains(&r.status) => Ok(reply_of(r)),
        Ok(r) => Err((
            code::BACKEND_ERROR,
            format!("service {} answered {}", f.service, r.status),
        )),
        Err(CallError::Timeout) => Err((
            code::BACKEND_TIMEOUT,
            format!("service {} timed out", f.service),
        )),
        Err(CallError::Failed(e)) => Err((
            code::BACKEND_ERROR,
            format!("service {} unreachable: {e}", f.service),
        )),
    }
}

/// A service's answer: a protobuf Frame, a JSON envelope with `payload`/`payload_base64`,
/// or any other body as the payload itself.
fn reply_of(r: Reply) -> UpReply {
    let ct = r
        .content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if ct == "application/x-protobuf" {
        if let Ok(f) = <Frame as prost::Message>::decode(&r.body[..]) {
            return UpReply {
                payload: f.payload.to_vec(),
                payload_type: f.payload_type,
            };
        }
    }
    if ct == "application/json" {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) {
            let pt = v["payload_type"].as_str().unwrap_or("").to_string();
            if let Some(p) = v.get("payload").and_then(|p| p.as_str()) {
                return UpReply {
                    payload: p.as_bytes().to_vec(),
                    payload_type: if pt.is_empty() { "text".into() } else { pt },
                };
            }
            if let Some(b) = v.get("payload_base64").and_then(|p| p.as_str()) {
                if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b) {
                    return UpReply {
                        payload: bytes,
                        payload_type: pt,
                    };
                }
            }
        }
        return UpReply {
            payload: r.body,
            payload_type: "json".into(),
        };
    }
    let pt = if ct.starts_with("text/") { "text" } else { "" };
    UpReply {
        payload: r.body,
        payload_type: pt.into(),
    }
}
