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
use crate::types::{check_id, check_session, insert_payload, unix_ms, Admit, Creds};

pub type Task = Box<dyn FnOnce(&ureq::Agent) + Send>;

/// A bounded queue of backend calls and the threads that make them.
pub struct Lane {
    tx: Sender<Task>,
    pub stats: usize,
}

impl Lane {
    fn start(
        name: &str,
        threads: usize,
        timeout: Duration,
        stats: usize,
        metrics: &Arc<Metrics>,
    ) -> Lane {
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
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("ll-{name}-{i}"))
                .spawn(move || {
                    while let Ok(task) = rx.recv() {
                        // A panicking call must not take the lane's thread with it (calls
                        // catch their own panics to answer; this is the backstop).
                        let run = std::panic::AssertUnwindSafe(|| task(&agent));
                        if std::panic::catch_unwind(run).is_err() {
                            metrics.backends[stats].panics.fetch_add(1, Relaxed);
                        }
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

/// One app's reports of one kind (online/offline events, or pushes given up), waiting for
/// the thread that posts them in the order they happened. Bounded: when full, a new report
/// is refused (the caller counts it). At a live upgrade the waiting reports cross with the
/// rest of the state, and the new process posts nothing until the old one, which finishes
/// only the report it is posting, has exited: a backend sees one process's reports, then
/// the other's, in order.
pub struct Reports {
    q: std::sync::Mutex<ReportQ>,
    cv: std::sync::Condvar,
}

#[derive(Default)]
struct ReportQ {
    items: std::collections::VecDeque<serde_json::Value>,
    /// Handed over (old process): nothing more is taken from `items`.
    paused: bool,
    /// Not yet ours to post (new process, until the old one has gone).
    held: bool,
    /// Shutdown: post what is queued (unless paused), then end.
    ending: bool,
}

impl Reports {
    fn new(held: bool) -> Reports {
        Reports {
            q: std::sync::Mutex::new(ReportQ {
                held,
                ..ReportQ::default()
            }),
            cv: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReportQ> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a report; false (dropped) when `EVENTS_QUEUE` of them wait already. Never
    /// blocks for longer than the posting thread's pop.
    pub fn push(&self, v: serde_json::Value) -> bool {
        let mut q = self.lock();
        if q.items.len() >= EVENTS_QUEUE {
            return false;
        }
        q.items.push_back(v);
        drop(q);
        self.cv.notify_one();
        true
    }

    /// The next report to post, or None once the thread should end.
    fn next(&self) -> Option<serde_json::Value> {
        let mut q = self.lock();
        loop {
            if q.ending && (q.paused || q.items.is_empty()) {
                return None;
            }
            // (A shutdown while held posts anyway: order matters less than loss.)
            if !q.paused && (!q.held || q.ending) {
                if let Some(v) = q.items.pop_front() {
                    return Some(v);
                }
            }
            q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A live upgrade (old process): stops the posting after the report under way, and
    /// takes what waits, for the new process.
    fn take(&self) -> Vec<serde_json::Value> {
        let mut q = self.lock();
        q.paused = true;
        q.items.drain(..).collect()
    }

    /// The upgrade failed after `take`: the reports go back in front, and on.
    fn give_back(&self, v: Vec<serde_json::Value>) {
        self.put_first(v);
        self.set(|q| q.paused = false);
    }

    /// A live upgrade (new process): the old process's reports, before any of this one's.
    /// All are kept, past the bound if need be: they were acknowledged there.
    fn put_first(&self, v: Vec<serde_json::Value>) {
        let mut q = self.lock();
        for r in v.into_iter().rev() {
            q.items.push_front(r);
        }
    }

    fn set(&self, f: impl FnOnce(&mut ReportQ)) {
        f(&mut self.lock());
        self.cv.notify_all();
    }
}

/// Reports waiting in the old process at a live upgrade: (app id, `undelivered` or not,
/// the reports in order).
pub type HandedReports = Vec<(String, bool, Vec<serde_json::Value>)>;

pub struct AppBackends {
    pub auth: Option<Lane>,
    pub events: Option<Arc<Reports>>,
    /// Reports of `ack=1` pushes given up (the late-failure webhook), on their own thread.
    pub undelivered: Option<Arc<Reports>>,
    pub services: Vec<(i32, Lane)>,
}

pub struct Backends {
    pub apps: Vec<AppBackends>,
    /// Taken by `finish`.
    events_threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// Sockets the backend lanes may hold open at once (each lane thread keeps one keep-alive
/// connection; each events thread one): what the open-files reserve leaves them.
pub fn max_sockets(cfg: &Config) -> usize {
    cfg.apps
        .iter()
        .map(|a| {
            usize::from(!a.auth_url.is_empty()) * AUTH_THREADS
                + usize::from(!a.events_url.is_empty())
                + usize::from(!a.undelivered_url.is_empty())
                + a.services
                    .iter()
                    .filter(|s| !s.is_echo())
                    .map(|s| s.max_inflight)
                    .sum::<usize>()
        })
        .sum()
}

/// Auth calls in flight per app before HELLOs are answered "busy".
const AUTH_THREADS: usize = 32;
/// Events waiting per app before new ones are dropped (and counted).
const EVENTS_QUEUE: usize = 65_536;

impl Backends {
    /// `held`: a live upgrade's new process, whose reports wait for `release`.
    pub fn start(cfg: &Config, metrics: &Arc<Metrics>, held: bool) -> Backends {
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
                        metrics,
                    )
                });
                let events = (!a.events_url.is_empty()).then(|| {
                    let (tx, handle) =
                        start_events(a, &a.events_url, "events", metrics.clone(), next(), held);
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
                        held,
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
                                metrics,
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
            events_threads: std::sync::Mutex::new(threads),
        }
    }

    /// At shutdown: lets the events threads post what is queued (the offline events of the
    /// connections just closed, reports of pushes given up) for at most `within`, then
    /// returns. Whoever else still holds the backends, the threads are told to end.
    pub fn finish(&self, within: Duration) -> bool {
        let end = Instant::now() + within;
        for r in self.reports() {
            r.set(|q| q.ending = true);
        }
        let threads = std::mem::take(
            &mut *self
                .events_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        while threads.iter().any(|h| !h.is_finished()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = threads.iter().filter(|h| !h.is_finished()).count();
        if left > 0 {
            log::warn!("{left} events thread(s) still posting at exit; their queue is lost");
        }
        left == 0
    }

    /// Waits (at most `within`) until this process posts its own reports: a new process
    /// upgraded again before its old one had gone keeps the next one waiting as long.
    pub fn wait_released(&self, within: Duration) {
        let end = Instant::now() + within;
        while self.reports().any(|r| r.lock().held) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn reports(&self) -> impl Iterator<Item = &Arc<Reports>> {
        self.apps
            .iter()
            .flat_map(|a| [&a.events, &a.undelivered])
            .flatten()
    }

    /// A live upgrade (old process): every app's waiting reports, taken for the new
    /// process; each thread stops after the report it is posting.
    pub fn take_reports(&self, apps: &[String]) -> HandedReports {
        let mut out = vec![];
        for (a, id) in self.apps.iter().zip(apps) {
            for (r, undelivered) in [(&a.events, false), (&a.undelivered, true)] {
                if let Some(r) = r {
                    out.push((id.clone(), undelivered, r.take()));
                }
            }
        }
        out
    }

    /// The upgrade failed: the taken reports go back, and posting goes on.
    pub fn give_back_reports(&self, apps: &[String], handed: HandedReports) {
        for (id, undelivered, v) in handed {
            if let Some(r) = self.queue(apps, &id, undelivered) {
                r.give_back(v);
            }
        }
    }

    /// A live upgrade (new process): the old process's reports go first. An app this
    /// config no longer has, or no longer reports for, drops its reports (logged).
    pub fn put_reports_first(&self, apps: &[String], handed: HandedReports) {
        for (id, undelivered, v) in handed {
            match self.queue(apps, &id, undelivered) {
                Some(r) => r.put_first(v),
                None if v.is_empty() => {}
                None => log::warn!(
                    "upgrade: {} report(s) for app {id:?} dropped: it no longer has that webhook",
                    v.len()
                ),
            }
        }
    }

    /// The old process has gone (or given up its reports): this one posts its own.
    pub fn release(&self) {
        for r in self.reports() {
            r.set(|q| q.held = false);
        }
    }

    /// Whether any app posts reports.
    pub fn reports_any(&self) -> bool {
        self.reports().next().is_some()
    }

    fn queue(&self, apps: &[String], id: &str, undelivered: bool) -> Option<&Arc<Reports>> {
        let a = &self.apps[apps.iter().position(|x| x == id)?];
        if undelivered {
            a.undelivered.as_ref()
        } else {
            a.events.as_ref()
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

/// Runs one backend call on a lane so that a panic in it is still an answer: counted on the
/// lane's statistics, logged, and turned into a backend error (else the client would wait
/// for its handshake timeout, or its upstream queue would stall for good).
pub fn guarded<T>(
    stats: &BackendStats,
    what: &str,
    call: impl FnOnce() -> Result<T, (u16, String)>,
) -> Result<T, (u16, String)> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|_| {
        stats.panics.fetch_add(1, Relaxed);
        log::error!("a call to the {what} panicked (app {})", stats.app);
        Err((
            code::BACKEND_ERROR,
            format!("internal error calling the {what}"),
        ))
    })
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
                stats.failed(|| format!("{} answered {}", loggable(url), reply.status));
            }
            Ok(reply)
        }
        Err(ureq::Error::Timeout(_)) => {
            stats.timeouts.fetch_add(1, Relaxed);
            stats.failed(|| format!("{} timed out", loggable(url)));
            Err(CallError::Timeout)
        }
        Err(e) => {
            stats.errors.fetch_add(1, Relaxed);
            stats.failed(|| format!("{}: {e}", loggable(url)));
            Err(CallError::Failed(e.to_string()))
        }
    }
}

/// A backend's URL as the log shows it: no user:password and no query, which may carry
/// credentials.
fn loggable(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    format!("{scheme}://{host}/{path}")
}

/// A 4xx from a backend that should not give one (a wrong path, a wrong method): the
/// call failed, and is counted and logged as such (`post` does it for 5xx).
fn refused_call(stats: &BackendStats, url: &str, status: u16) {
    if status < 500 {
        stats.errors.fetch_add(1, Relaxed);
        stats.failed(|| format!("{} answered {status}", loggable(url)));
    }
}

#[cfg(test)]
mod log_tests {
    #[test]
    fn a_logged_url_keeps_no_credentials() {
        assert_eq!(
            super::loggable("https://u:p@auth.example:8443/check?key=s3cret#x"),
            "https://auth.example:8443/check"
        );
        assert_eq!(super::loggable("http://127.0.0.1:9"), "http://127.0.0.1:9/");
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
        Ok(r) if r.status == 200 => admission(&r.body, app_idx, c).map_err(|msg| {
            // Counted as a failed call, and why.
            stats.errors.fetch_add(1, Relaxed);
            stats.bad_answers.fetch_add(1, Relaxed);
            log::warn!("app {}: auth backend answer refused: {msg}", app.id);
            (
                code::BACKEND_ERROR,
                format!("auth backend answer refused: {msg}"),
            )
        }),
        Ok(r) if r.status == 401 || r.status == 403 => {
            Err((r.status, "rejected by the auth backend".into()))
        }
        Ok(r) => {
            refused_call(stats, &app.auth_url, r.status);
            Err((
                code::BACKEND_ERROR,
                format!("auth backend answered {}", r.status),
            ))
        }
        Err(CallError::Timeout) => Err((code::BACKEND_TIMEOUT, "auth backend timed out".into())),
        // (Why goes to the log, not to the client: an address and an OS error are ours.)
        Err(CallError::Failed(_)) => Err((code::BACKEND_ERROR, "auth backend unreachable".into())),
    }
}

/// The auth backend's 200 answer: a JSON object with optional `user_id` (a string) and
/// `session` (an object of values, kept as strings, within the session limits). Anything
/// else is refused: a backend that answers 200 with the wrong body must not admit anyone.
pub fn admission(body: &[u8], app: usize, c: &Creds) -> Result<Admit, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let o = v.as_object().ok_or("body is not a JSON object")?;
    let user = match o.get("user_id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(u)) if u.is_empty() => None,
        Some(serde_json::Value::String(u)) => Some(u.clone()),
        Some(_) => return Err("user_id is not a string".into()),
    }
    .or_else(|| c.user_id.clone());
    if let Some(u) = &user {
        check_id("user", u).map_err(|(_, m)| m)?;
    }
    let session: Vec<(String, String)> = match o.get("session") {
        None | Some(serde_json::Value::Null) => vec![],
        Some(serde_json::Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                (k.clone(), v)
            })
            .collect(),
        Some(_) => return Err("session is not a JSON object".into()),
    };
    check_session(&session)?;
    Ok(Admit {
        app,
        device: c.device_id.as_str().into(),
        user: user.map(Into::into),
        session,
        dev_tag: 0,
    })
}

/// A thread posting one kind of report (`what`: events or undelivered) for an app, in order,
/// with retries.
fn start_events(
    a: &App,
    url: &str,
    what: &'static str,
    metrics: Arc<Metrics>,
    stats: usize,
    held: bool,
) -> (Arc<Reports>, std::thread::JoinHandle<()>) {
    let tx = Arc::new(Reports::new(held));
    let rx = tx.clone();
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
            while let Some(ev) = rx.next() {
                let body = serde_json::to_vec(&ev).unwrap_or_default();
                let send = || {
                    for attempt in 0..tries {
                        if attempt > 0 {
                            std::thread::sleep(Duration::from_millis(100 << (attempt - 1).min(6)));
                        }
                        if let Ok(r) = post(&agent, &url, "application/json", &[], &body, s) {
                            if (200..300).contains(&r.status) {
                                return Ok(true);
                            }
                            if r.status < 500 {
                                refused_call(s, &url, r.status);
                            }
                        }
                    }
                    Ok(false)
                };
                // A panic loses this event (counted), not the thread and every later one.
                let delivered = guarded(s, what, send).unwrap_or(false);
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

    pub fn event(&self, kind: &str) -> serde_json::Value {
        json!({
            "event": kind, "conn_id": self.conn_id, "app_id": self.app_id, "device_id": self.device_id,
            "user_id": self.user_id, "session": self.session_json(), "transport": self.transport, "at_ms": unix_ms(),
        })
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
        Ok(r) => {
            refused_call(stats, &svc.url, r.status);
            Err((
                code::BACKEND_ERROR,
                format!("service {} answered {}", f.service, r.status),
            ))
        }
        Err(CallError::Timeout) => Err((
            code::BACKEND_TIMEOUT,
            format!("service {} timed out", f.service),
        )),
        Err(CallError::Failed(_)) => Err((
            code::BACKEND_ERROR,
            format!("service {} unreachable", f.service),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_call_is_counted_and_the_lane_goes_on() {
        let mut cfg = Config::dev();
        cfg.apps[0].services[0].url = "http://127.0.0.1:1/svc".into();
        let metrics = Arc::new(Metrics::new(&cfg));
        let lane = Lane::start("t", 1, Duration::from_secs(1), 0, &metrics);
        // A call that panics inside `guarded` answers as an error; one that panics past it
        // is caught by the lane. Both are counted, and the thread serves the next call.
        let (tx, rx) = crossbeam_channel::unbounded();
        let t = tx.clone();
        let m = metrics.clone();
        assert!(lane.try_run(Box::new(move |_| {
            let r: Result<(), _> = guarded(&m.backends[0], "service", || panic!("inside"));
            t.send(r.map_err(|e| e.0)).unwrap();
        })));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Err(code::BACKEND_ERROR)
        );
        assert!(lane.try_run(Box::new(|_| panic!("outside"))));
        let t = tx.clone();
        // The lane's queue holds one call while its thread works: retry until it takes it.
        let mut next: Option<Task> = Some(Box::new(move |_| t.send(Ok(())).unwrap()));
        let end = Instant::now() + Duration::from_secs(5);
        while let Some(task) = next.take() {
            if let Err(e) = lane.tx.try_send(task) {
                assert!(Instant::now() < end, "the lane stopped taking calls");
                next = Some(e.into_inner());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(()));
        assert_eq!(metrics.backends[0].panics.load(Relaxed), 2);
    }

    #[test]
    fn auth_answers_are_checked_against_the_contract() {
        let c = Creds {
            app_id: "a".into(),
            device_id: "d".into(),
            token: "t".into(),
            user_id: Some("from-hello".into()),
        };
        let ok = admission(
            br#"{"user_id":"u1","session":{"tier":"gold","n":3}}"#,
            0,
            &c,
        )
        .unwrap();
        assert_eq!(ok.user.as_deref(), Some("u1"));
        assert_eq!(
            ok.session,
            vec![
                ("n".to_string(), "3".to_string()),
                ("tier".into(), "gold".into())
            ]
        );
        let keep = admission(b"{}", 0, &c).unwrap();
        assert_eq!(
            keep.user.as_deref(),
            Some("from-hello"),
            "no user_id: the client's"
        );
        for bad in [
            &b"welcome"[..],
            b"[1,2]",
            b"null",
            br#"{"user_id":7}"#,
            br#"{"user_id":"a\u0001b"}"#,
            br#"{"session":"gold"}"#,
        ] {
            assert!(
                admission(bad, 0, &c).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let big: serde_json::Map<_, _> = (0..65)
            .map(|i| (format!("k{i}"), serde_json::Value::from("v")))
            .collect();
        let body = serde_json::to_vec(&json!({ "session": big })).unwrap();
        assert!(admission(&body, 0, &c).is_err(), "over the session limits");
    }
}
