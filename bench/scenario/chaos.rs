//! `longlink-bench chaos`: well-behaved clients and abusers of every kind at once, while
//! backends send large batches (issue 10's "Must show"). Run it against a gateway started
//! with `bench/chaos.toml` (short deadlines and small bounds, so every abuse meets its limit
//! within seconds).
//!
//! Well-behaved: `--good` clients, half TCP and half pbbp2 WebSocket, each PINGing every
//! 100 ms, ACKing every `ack=1` push and counting every push it gets. Backends: unicast
//! `ack=1` batches to them with `wait_ms` (every item must come back acked), and broadcast
//! batches of 500 to their app. Abusers, for `--secs`: WebSocket messages begun and never
//! finished, TCP frames begun and trickled, bare connects past `max_connections`, an API
//! request head trickled, a WebSocket upgrade head trickled, clients that never read while
//! a backend pushes to them, status values set past the store's bound, garbage of every
//! kind the decoders refuse, and connect/close storms on both transports.
//!
//! Pass: every `ack=1` push delivered and ACKed, none lost or doubled, every broadcast item
//! received by every well-behaved client; no well-behaved client closed; the API answered
//! throughout (a fresh connection every 200 ms); the gateway alive; every abuse counted in
//! `/metrics`; RSS within 10% of its start once the abusers are gone. Anything else exits
//! non-zero with the reasons.

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use longlink::codec;
use longlink::proto::{method, Frame};

use crate::child::ws_frame;
use crate::util::{gateway_pid, http_message, metrics, rss, Hist, KeepAlive};
use crate::wire::{upgrade, Wire};
use crate::Common;

/// Broadcast items per batch, and their payload size.
const BCAST_ITEMS: usize = 500;
const BCAST_SIZE: usize = 200;
/// Unicast `ack=1` items per batch.
const ACK_ITEMS: usize = 200;

/// What must go up in `/metrics` while the abusers run, and which abuser causes it.
const COUNTED: &[(&str, &str)] = &[
    (
        "longlink_bad_frames_total{kind=\"ws_deflate\"}",
        "compressed WebSocket messages that do not inflate",
    ),
    (
        "longlink_bad_frames_total{kind=\"incomplete\"}",
        "frames and messages begun and never finished",
    ),
    (
        "longlink_connections_closed_total{reason=\"overloaded\"}",
        "bare connects past max_connections",
    ),
    (
        "longlink_connections_closed_total{reason=\"handshake_timeout\"}",
        "bare connects and trickled upgrade heads",
    ),
    (
        "longlink_api_request_timeouts_total",
        "an API request head trickled",
    ),
    (
        "longlink_connections_closed_total{reason=\"slow_consumer\"}",
        "clients that never read",
    ),
    (
        "longlink_status_refused_total",
        "status values past the store's bound",
    ),
    (
        "longlink_bad_frames_total{kind=\"too_large\"}",
        "a TCP frame over max_frame_bytes",
    ),
    (
        "longlink_bad_frames_total{kind=\"decode\"}",
        "a frame that is not protobuf",
    ),
    (
        "longlink_bad_frames_total{kind=\"empty\"}",
        "an empty TCP frame",
    ),
    (
        "longlink_bad_frames_total{kind=\"hello_required\"}",
        "a frame before HELLO",
    ),
    (
        "longlink_bad_frames_total{kind=\"unknown_service\"}",
        "a frame to a service that does not exist",
    ),
    (
        "longlink_bad_frames_total{kind=\"unknown_method\"}",
        "a control frame with an unknown method",
    ),
    (
        "longlink_bad_frames_total{kind=\"ws_utf8\"}",
        "WebSocket text that is not UTF-8",
    ),
    (
        "longlink_bad_frames_total{kind=\"ws_protocol\"}",
        "an unmasked WebSocket frame",
    ),
    (
        "longlink_bad_frames_total{kind=\"ws_too_large\"}",
        "a WebSocket message over max_message_bytes",
    ),
    (
        "longlink_connections_closed_total{reason=\"peer\"}",
        "connect/close storms",
    ),
];

/// With `--tls`, also these.
const TLS_COUNTED: &[(&str, &str)] = &[(
    "longlink_tls_errors_total",
    "clear text to the TLS ports, and records that do not decrypt",
)];

#[derive(Default)]
struct Shared {
    /// Set when the abusers are to stop; `done` when the well-behaved clients are.
    stop_abuse: AtomicBool,
    stop_backends: AtomicBool,
    done: AtomicBool,
    /// Broadcast batches answered (each item reached every well-behaved client).
    bcast_batches: AtomicU64,
    /// `ack=1` pushes sent, and those the answers reported acked.
    ack_sent: AtomicU64,
    ack_acked: AtomicU64,
    next_id: AtomicU64,
    /// Fresh API connections that got their answer, and those that did not.
    api_ok: AtomicU64,
    /// Bare connects per flood (more than the gateway's `max_connections`).
    flood: usize,
    /// The gateway has TLS listeners (`--tls`): the TLS abusers run too.
    tls: bool,
    failures: Mutex<Vec<String>>,
    /// Abuse attempts by kind (how much abuse there was, for the report).
    abuse: Mutex<HashMap<&'static str, u64>>,
}

impl Shared {
    fn fail(&self, what: String) {
        let mut f = self.failures.lock().unwrap();
        if f.len() < 50 {
            f.push(what);
        }
    }

    fn count(&self, kind: &'static str) {
        *self.abuse.lock().unwrap().entry(kind).or_default() += 1;
    }

    fn abusing(&self) -> bool {
        !self.stop_abuse.load(Relaxed)
    }
}

pub(crate) fn chaos(
    c: &Common,
    good: usize,
    secs: u64,
    warmup: u64,
    flood: usize,
    upgrade_at: Option<u64>,
    tls: bool,
) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    // After a live upgrade the gateway is another process: readings follow it.
    let live = || gateway_pid(c).unwrap_or(pid);
    // The flood alone holds 1,200 sockets.
    longlink::server::raise_nofile();
    let sh = Arc::new(Shared {
        flood,
        tls,
        ..Default::default()
    });
    let good = good.max(2);
    let t0 = Instant::now();

    // The well-behaved clients, half of them on each transport.
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
    let mut goods = vec![];
    let mut devices = vec![];
    for i in 0..good {
        let ws = i % 2 == 1;
        let device = format!("good-{}-{i}", if ws { "ws" } else { "tcp" });
        devices.push(device.clone());
        let (c, sh, tx) = (c.clone(), sh.clone(), ready_tx.clone());
        goods.push(std::thread::spawn(move || {
            good_client(&c, ws, &device, &sh, &tx)
        }));
    }
    for _ in 0..good {
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "well-behaved clients did not all connect")??;
    }
    let devices = Arc::new(devices);

    // Warm up: one of each kind of batch, so the start reading includes what steady
    // traffic holds anyway.
    let mut ka = KeepAlive::new(&c.api)?;
    broadcast_batch(&mut ka, c, &sh)?;
    ack_batch(&mut ka, c, &devices, &sh)?;
    // And a round of every abuser: what any first minute leaves for good (code paths run
    // for the first time, tables at their high-water mark, the allocator's fragments) is
    // then in the start reading, and the end reading shows what the abuse itself held.
    let rss_cold = rss(pid)?;
    if warmup > 0 {
        run_abusers(c, &sh, warmup);
        let m = settle(c, good, 15, || Ok(true))?;
        if open_conns(&m) as usize != good {
            return Err(format!(
                "after the warm-up, {} client connections open; {good} expected",
                open_conns(&m)
            ));
        }
        // The gateway trims once its size has held still for a few seconds.
        std::thread::sleep(Duration::from_secs(5));
    }
    let m0 = metrics(&c.api)?;
    let rss_start = rss(pid)?;
    let anon_start = status_bytes(pid, "RssAnon:");

    // Backends.
    let mut backends: Vec<JoinHandle<()>> = vec![];
    for _ in 0..2 {
        let devices = devices.clone();
        backends.push(backend(c, &sh, "ack=1", 20, move |ka, c, sh| {
            ack_batch(ka, c, &devices, sh)
        }));
    }
    backends.push(backend(c, &sh, "broadcast", 1000, broadcast_batch));
    {
        // The API must answer a fresh connection throughout, fd flood or not.
        let (c, sh) = (c.clone(), sh.clone());
        backends.push(std::thread::spawn(move || {
            while !sh.stop_backends.load(Relaxed) {
                match one_shot(&c.api, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 3) {
                    Ok(a) if a.starts_with(b"HTTP/1.1 200") => {
                        sh.api_ok.fetch_add(1, Relaxed);
                    }
                    Ok(a) => sh.fail(format!(
                        "/healthz answered {:?}",
                        String::from_utf8_lossy(&a[..a.len().min(40)])
                    )),
                    Err(e) => sh.fail(format!("/healthz on a fresh connection: {e}")),
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }));
    }

    // A live upgrade in the middle of it all (`--upgrade-at`): the counters of the old
    // process are read just before, as the new one's start from zero.
    let upgrader = upgrade_at.map(|at| {
        let c = c.clone();
        std::thread::spawn(move || -> Result<(HashMap<String, f64>, f64), String> {
            std::thread::sleep(Duration::from_secs(at));
            let before = metrics(&c.api)?;
            let t = Instant::now();
            // SAFETY: kill on the gateway's pid.
            unsafe { libc::kill(pid as i32, libc::SIGHUP) };
            while gateway_pid(&c).unwrap_or(pid) == pid {
                if t.elapsed() > Duration::from_secs(15) {
                    return Err("no new process 15 s after SIGHUP".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok((before, t.elapsed().as_secs_f64() * 1000.0))
        })
    });

    // Abusers.
    run_abusers(c, &sh, secs);
    let upgraded = match upgrader {
        Some(h) => Some(h.join().map_err(|_| "the upgrader panicked")??),
        None => None,
    };
    let abuse_s = t0.elapsed().as_secs_f64();
    // A few more seconds of backend traffic with the abusers gone, then the backends stop.
    std::thread::sleep(Duration::from_secs(2));
    sh.stop_backends.store(true, Relaxed);
    for b in backends {
        let _ = b.join();
    }
    let m1 = metrics(&c.api)?;

    // Wait for the abusers' connections to be gone (only the well-behaved left), and for the
    // memory to come back.
    let m_end = settle(c, good, 20, || {
        Ok(rss(live())? as f64 <= rss_start as f64 * 1.10)
    })?;
    let rss_end = rss(live())?;
    let left = open_conns(&m_end);
    if left as usize != good {
        sh.fail(format!(
            "{left} client connections open after the abusers left; {good} expected"
        ));
    }

    // Every well-behaved client: all it was sent arrived, once.
    sh.done.store(true, Relaxed);
    let expected_bcast = sh.bcast_batches.load(Relaxed) * BCAST_ITEMS as u64;
    let mut pongs = Hist::default();
    let (mut got_acked, mut doubled, mut resent, mut closed) = (0u64, 0u64, 0u64, 0u64);
    for (i, g) in goods.into_iter().enumerate() {
        let r = g.join().map_err(|_| "a well-behaved client panicked")??;
        got_acked += r.ids.len() as u64;
        doubled += r.doubled;
        resent += r.resent;
        for (b, n) in r.pongs.counts.iter().enumerate() {
            pongs.counts[b] += n;
        }
        pongs.max = pongs.max.max(r.pongs.max);
        if let Some(why) = r.closed {
            closed += 1;
            sh.fail(format!("well-behaved client {i} was closed: {why}"));
        }
        if r.bcast != expected_bcast {
            sh.fail(format!(
                "well-behaved client {i} got {} broadcast items of {expected_bcast}",
                r.bcast
            ));
        }
    }
    let sent = sh.ack_sent.load(Relaxed);
    let acked = sh.ack_acked.load(Relaxed);
    if acked != sent {
        sh.fail(format!("{sent} ack=1 pushes sent, {acked} answered acked"));
    }
    if got_acked != sent {
        sh.fail(format!(
            "{sent} ack=1 pushes sent, {got_acked} distinct ones received"
        ));
    }
    if doubled > 0 {
        sh.fail(format!("{doubled} ack=1 pushes delivered twice"));
    }

    // Every abuse counted.
    let mut counted = serde_json::Map::new();
    let tls_counted = if sh.tls { TLS_COUNTED } else { &[] };
    for (name, what) in COUNTED.iter().chain(tls_counted) {
        let get = |m: &HashMap<String, f64>| m.get(*name).copied().unwrap_or(0.0);
        let d = match &upgraded {
            // The old process's share, then the new one's from zero.
            Some((before, _)) => get(before) - get(&m0) + get(&m1),
            None => get(&m1) - get(&m0),
        };
        counted.insert((*name).to_string(), json!(d));
        if d <= 0.0 {
            sh.fail(format!("{what}: {name} did not go up"));
        }
    }
    // Alive, and the same process (or, upgraded, the new one).
    match crate::util::http(&c.api, "GET", "/healthz", b"") {
        Ok((200, body)) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let same = v["pid"].as_u64() == Some(pid as u64);
            if same == upgraded.is_some() {
                sh.fail(format!("the gateway's pid: {v} (it was {pid})"));
            }
        }
        other => sh.fail(format!("the gateway is not answering /healthz: {other:?}")),
    }
    if (rss_end as f64) > rss_start as f64 * 1.10 {
        sh.fail(format!(
            "RSS {} KiB once the abusers were gone, {} KiB at the start (over 110%)",
            rss_end / 1024,
            rss_start / 1024
        ));
    }

    let failures = sh.failures.lock().unwrap().clone();
    let abuse: serde_json::Map<String, serde_json::Value> = sh
        .abuse
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| ((*k).to_string(), json!(v)))
        .collect();
    let v = json!({
        "scenario": "chaos", "good": good, "secs": secs, "abuse_s": (abuse_s * 10.0).round() / 10.0,
        "ack_sent": sent, "ack_acked": acked, "ack_received": got_acked, "ack_doubled": doubled,
        "ack_resent_same_seqid": resent,
        "broadcast_items_each": expected_bcast, "good_closed": closed,
        "api_fresh_ok": sh.api_ok.load(Relaxed),
        "pong_p50_us": pongs.quantile(0.5), "pong_p99_us": pongs.quantile(0.99),
        "pong_max_us": pongs.max, "pongs": pongs.count(),
        "rss_cold_kib": rss_cold / 1024, "rss_start_kib": rss_start / 1024, "rss_end_kib": rss_end / 1024,
        "warmup_s": warmup,
        "rss_peak_kib": peak_rss(live()) / 1024,
        "rss_anon_start_kib": anon_start / 1024, "rss_anon_end_kib": status_bytes(live(), "RssAnon:") / 1024,
        "upgrade_handoff_ms": upgraded.as_ref().map(|u| u.1.round()),
        "memory_start": memory(&m0), "memory_end": memory(&m_end),
        "abuse": abuse, "counted": counted, "failures": failures,
        "pass": failures.is_empty(),
    });
    println!("{v}");
    println!("\n  chaos  {good} well-behaved clients, {secs} s of abuse");
    println!(
        "  ack=1 pushes       {sent} sent, {acked} acked, {got_acked} received, {doubled} doubled"
    );
    println!("  broadcast items    {expected_bcast} to each well-behaved client");
    println!(
        "  PONG               p50 {} / p99 {} / max {} µs ({} pings)",
        pongs.quantile(0.5),
        pongs.quantile(0.99),
        pongs.max,
        pongs.count()
    );
    println!(
        "  gateway RSS        {} KiB cold, {} KiB at the start (after {warmup} s of warm-up abuse), {} KiB once the abusers were gone",
        rss_cold / 1024,
        rss_start / 1024,
        rss_end / 1024
    );
    for f in &failures {
        println!("  FAIL  {f}");
    }
    if failures.is_empty() {
        println!("  pass");
        Ok(())
    } else {
        Err(format!("{} failures", failures.len()))
    }
}

/// Runs every abuser for `secs`, then stops them and waits for them.
fn run_abusers(c: &Common, sh: &Arc<Shared>, secs: u64) {
    type Abuser = fn(&Common, &Shared) -> Result<(), String>;
    let kinds: &[(Abuser, usize)] = &[
        (ws_unfinished, 5),
        (tcp_partial, 5),
        (bare_flood, 1),
        (api_slowloris, 2),
        (http_trickle, 2),
        (slow_consumer, 3),
        (slow_pusher, 1),
        (status_spam, 1),
        (garbage, 2),
        (storm, 2),
        (deflate_abuse, 1),
    ];
    let tls: &[(Abuser, usize)] = &[(tls_stall, 2), (tls_cleartext, 1), (tls_forged, 1)];
    let kinds: Vec<(Abuser, usize)> = kinds
        .iter()
        .chain(if sh.tls { tls } else { &[] })
        .copied()
        .collect();
    sh.stop_abuse.store(false, Relaxed);
    let mut abusers: Vec<JoinHandle<()>> = vec![];
    for &(f, n) in &kinds {
        for _ in 0..n {
            let (c, sh) = (c.clone(), sh.clone());
            abusers.push(std::thread::spawn(move || {
                if let Err(e) = f(&c, &sh) {
                    sh.fail(format!("abuser: {e}"));
                }
            }));
        }
    }
    std::thread::sleep(Duration::from_secs(secs));
    sh.stop_abuse.store(true, Relaxed);
    for a in abusers {
        let _ = a.join();
    }
}

/// Waits until only the well-behaved clients are connected and `also` holds, or `secs`
/// pass; returns the last /metrics reading.
fn settle(
    c: &Common,
    good: usize,
    secs: u64,
    mut also: impl FnMut() -> Result<bool, String>,
) -> Result<HashMap<String, f64>, String> {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let m = metrics(&c.api)?;
        if (open_conns(&m) as usize == good && also()?) || Instant::now() > end {
            return Ok(m);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A backend thread: `step` (one batch on its own keep-alive API connection) every
/// `pause_ms` until the backends stop; an error is a failure of the run.
fn backend(
    c: &Common,
    sh: &Arc<Shared>,
    what: &'static str,
    pause_ms: u64,
    mut step: impl FnMut(&mut KeepAlive, &Common, &Shared) -> Result<(), String> + Send + 'static,
) -> JoinHandle<()> {
    let (c, sh) = (c.clone(), sh.clone());
    std::thread::spawn(move || {
        let mut run = || -> Result<(), String> {
            let mut ka = KeepAlive::new(&c.api)?;
            while !sh.stop_backends.load(Relaxed) {
                step(&mut ka, &c, &sh)?;
                std::thread::sleep(Duration::from_millis(pause_ms));
            }
            Ok(())
        };
        if let Err(e) = run() {
            sh.fail(format!("{what} backend: {e}"));
        }
    })
}

/// Connections open on the client listeners, HTTP ones (upgrade heads, long-polls) too:
/// accepted TCP + accepted HTTP = closed + open (docs/PROTOCOL.md, "Health and metrics").
fn open_conns(m: &HashMap<String, f64>) -> f64 {
    let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
    let closed: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("longlink_connections_closed_total{"))
        .map(|(_, v)| *v)
        .sum();
    get("longlink_connections_accepted_total{transport=\"tcp\"}")
        + get("longlink_http_connections_accepted_total")
        - closed
}

/// The gateway's peak RSS so far.
fn peak_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

/// A size from /proc/PID/status (`VmHWM:`, `RssAnon:`, `RssFile:`), in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |k| k * 1024)
}

/// The gateway's own memory gauges, to tell what holds RSS.
fn memory(m: &HashMap<String, f64>) -> serde_json::Value {
    let names = [
        "longlink_heap_in_use_bytes",
        "longlink_heap_free_bytes",
        "longlink_output_pool_bytes",
        "longlink_input_held_bytes",
        "longlink_output_held_bytes",
        "longlink_output_queued_bytes",
        "longlink_timer_wheel_entries",
    ];
    names
        .iter()
        .map(|n| {
            let short = n.trim_start_matches("longlink_");
            (short.to_string(), json!(m.get(*n).copied().unwrap_or(0.0)))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn broadcast_batch(ka: &mut KeepAlive, c: &Common, sh: &Shared) -> Result<(), String> {
    let mut p = "b".to_string();
    p.extend(std::iter::repeat_n('.', BCAST_SIZE - 1));
    let item = json!({"to": "broadcast", "app": c.app, "payload": p}).to_string();
    let body = format!("[{}]", vec![item; BCAST_ITEMS].join(","));
    ka.post("/v1/push/batch", body.as_bytes())?;
    sh.bcast_batches.fetch_add(1, Relaxed);
    Ok(())
}

/// One batch of `ack=1` pushes to the well-behaved devices, waiting for their ACKs: every
/// item must come back delivered to one connection and acked.
fn ack_batch(
    ka: &mut KeepAlive,
    c: &Common,
    devices: &[String],
    sh: &Shared,
) -> Result<(), String> {
    let items: Vec<String> = (0..ACK_ITEMS)
        .map(|_| {
            let id = sh.next_id.fetch_add(1, Relaxed);
            let dev = &devices[id as usize % devices.len()];
            json!({"to": "device", "app": c.app, "device_id": dev, "payload": format!("a{id}"), "ack": 1})
                .to_string()
        })
        .collect();
    let body = format!("[{}]", items.join(","));
    sh.ack_sent.fetch_add(ACK_ITEMS as u64, Relaxed);
    let answer = ka.post("/v1/push/batch?wait_ms=10000", body.as_bytes())?;
    let v: serde_json::Value =
        serde_json::from_slice(&answer).map_err(|e| format!("batch answer: {e}"))?;
    let results = v["results"].as_array().ok_or("no results")?;
    for (i, r) in results.iter().enumerate() {
        if r["acked"] == 1 && r["delivered"] == 1 {
            sh.ack_acked.fetch_add(1, Relaxed);
        } else {
            sh.fail(format!("ack=1 item {i}: {r}"));
        }
    }
    Ok(())
}

/// A request on a fresh connection, with a deadline for the whole answer.
fn one_shot(addr: &str, req: &str, secs: u64) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(secs)))
        .map_err(|e| e.to_string())?;
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = vec![];
    let mut chunk = [0u8; 4096];
    loop {
        if http_message(&buf).is_some() {
            return Ok(buf);
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed before the answer".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

struct GoodReport {
    /// Distinct `ack=1` push ids received.
    ids: HashSet<u64>,
    /// An id received again under another seqid (delivered twice).
    doubled: u64,
    /// An id received again under the same seqid (a retransmit the client dedups).
    resent: u64,
    bcast: u64,
    pongs: Hist,
    closed: Option<String>,
}

fn good_client(
    c: &Common,
    ws: bool,
    device: &str,
    sh: &Shared,
    ready: &crossbeam_channel::Sender<Result<(), String>>,
) -> Result<GoodReport, String> {
    let w = if ws {
        Wire::ws(c, device, true)
    } else {
        Wire::tcp(c, device)
    };
    let mut w = match w {
        Ok(w) => {
            let _ = ready.send(Ok(()));
            w
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{device}: {e}")));
            return Err(e);
        }
    };
    w.s.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let mut r = GoodReport {
        ids: HashSet::new(),
        doubled: 0,
        resent: 0,
        bcast: 0,
        pongs: Hist::default(),
        closed: None,
    };
    let mut seqids: HashMap<u64, u64> = HashMap::new();
    let mut ping: Option<(u64, Instant)> = None;
    let mut last_ping = Instant::now();
    let mut seq = 1_000_000u64;
    while !sh.done.load(Relaxed) {
        if ping.is_none() && last_ping.elapsed() >= Duration::from_millis(100) {
            seq += 1;
            last_ping = Instant::now();
            if let Err(e) = w.send(&Frame::control(method::PING, seq, &[])) {
                r.closed = Some(format!("PING: {e}"));
                break;
            }
            ping = Some((seq, last_ping));
        }
        if let Some((_, at)) = ping {
            if at.elapsed() > Duration::from_secs(5) {
                r.closed = Some("no PONG within 5 s".into());
                break;
            }
        }
        let f = match w.next() {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                r.closed = Some(e);
                break;
            }
        };
        match f.method {
            method::PONG => {
                if let Some((s, at)) = ping {
                    if f.seqid == s {
                        r.pongs.record(at.elapsed().as_micros() as u64);
                        ping = None;
                    }
                }
            }
            method::PUSH if f.payload.first() == Some(&b'a') => {
                let id: u64 = std::str::from_utf8(&f.payload[1..])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or("a push with a bad id")?;
                match seqids.insert(id, f.seqid) {
                    Some(s) if s == f.seqid => r.resent += 1,
                    Some(_) => r.doubled += 1,
                    None => {
                        r.ids.insert(id);
                    }
                }
                if let Err(e) = w.send(&Frame::control(method::ACK, f.seqid, &[])) {
                    r.closed = Some(format!("ACK: {e}"));
                    break;
                }
            }
            method::PUSH if f.payload.first() == Some(&b'b') => r.bcast += 1,
            method::ERROR | method::BYE => {
                r.closed = Some(format!("{}: {:?}", method::name(f.method), f.headers));
                break;
            }
            _ => {}
        }
    }
    Ok(r)
}

/// Reads until the gateway closes the connection (Ok) or `secs` pass (Err).
fn until_closed(s: &mut TcpStream, secs: u64) -> Result<(), String> {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut chunk = [0u8; 65536];
    while Instant::now() < end {
        match s.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Ok(()),
        }
    }
    Err(format!("not closed within {secs} s"))
}

/// Sends `bytes` one at a time every `every` until the gateway closes the connection.
fn trickle(s: &mut TcpStream, bytes: &[u8], every: Duration, sh: &Shared) -> bool {
    let _ = s.set_read_timeout(Some(every));
    let mut chunk = [0u8; 4096];
    for b in bytes.iter().cycle() {
        if !sh.abusing() {
            return false;
        }
        if s.write_all(&[*b]).is_err() {
            return true;
        }
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// A fragmented WebSocket message of 100 KB begun and never finished, pings now and then.
fn ws_unfinished(c: &Common, sh: &Shared) -> Result<(), String> {
    let mut n = 0;
    while sh.abusing() {
        n += 1;
        let Ok(mut w) = Wire::ws(c, &format!("abuse-frag-{n}"), false) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        sh.count("ws_unfinished");
        let mut out = vec![];
        longlink::ws::encode_client_frame(&mut out, false, 1, [1, 2, 3, 4], &[b'x'; 100_000]);
        if w.s.write_all(&out).is_err() {
            continue;
        }
        let mut ping = vec![];
        ws_frame(9, b"still here", &mut ping);
        trickle_frames(&mut w.s, &ping, sh);
    }
    Ok(())
}

/// Writes `frame` every 300 ms until the gateway closes the connection or abuse stops.
fn trickle_frames(s: &mut TcpStream, frame: &[u8], sh: &Shared) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
    let mut chunk = [0u8; 65536];
    while sh.abusing() {
        if s.write_all(frame).is_err() {
            return;
        }
        match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// HELLO, then 10,000 bytes of a 16,000-byte frame, then a byte every 300 ms.
fn tcp_partial(c: &Common, sh: &Shared) -> Result<(), String> {
    let mut n = 0;
    while sh.abusing() {
        n += 1;
        let Ok(mut w) = Wire::tcp(c, &format!("abuse-partial-{n}")) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        sh.count("tcp_partial");
        let mut begun = 16_000u16.to_be_bytes().to_vec();
        begun.extend_from_slice(&[0u8; 10_000]);
        if w.s.write_all(&begun).is_err() {
            continue;
        }
        trickle(&mut w.s, &[0], Duration::from_millis(300), sh);
    }
    Ok(())
}

/// Twice during the run: bare connects (no HELLO) past `max_connections`, held until the
/// gateway closes them.
fn bare_flood(c: &Common, sh: &Shared) -> Result<(), String> {
    for round in 0..2 {
        std::thread::sleep(Duration::from_secs(2 + round * 3));
        if !sh.abusing() {
            break;
        }
        let mut held = vec![];
        for _ in 0..sh.flood {
            match TcpStream::connect(&c.tcp) {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
        sh.count("bare_connects");
        for s in &mut held {
            let _ = until_closed(s, 10);
        }
    }
    Ok(())
}

/// An API request head, one byte every 100 ms.
fn api_slowloris(c: &Common, sh: &Shared) -> Result<(), String> {
    let head = b"POST /v1/push/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]";
    while sh.abusing() {
        let Ok(mut s) = TcpStream::connect(&c.api) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        sh.count("api_slowloris");
        trickle(&mut s, head, Duration::from_millis(100), sh);
    }
    Ok(())
}

/// A WebSocket upgrade head on the client listener, one byte every 100 ms.
fn http_trickle(c: &Common, sh: &Shared) -> Result<(), String> {
    let mut n = 0;
    while sh.abusing() {
        n += 1;
        let Ok(mut s) = TcpStream::connect(&c.http) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        sh.count("http_trickle");
        let head = upgrade(c, &format!("abuse-trickle-{n}"), false);
        trickle(&mut s, head.as_bytes(), Duration::from_millis(100), sh);
    }
    Ok(())
}

/// A client that says HELLO and never reads again (`slow_pusher` fills its output).
fn slow_consumer(c: &Common, sh: &Shared) -> Result<(), String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Three of them in each round, named as slow_pusher expects.
    let slot = NEXT.fetch_add(1, Relaxed) % 3;
    while sh.abusing() {
        let Ok(w) = Wire::tcp(c, &format!("abuse-slow-{slot}")) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        sh.count("slow_consumer");
        // Never read; wait until a write shows the gateway has closed it (or 8 s).
        let end = Instant::now() + Duration::from_secs(8);
        let mut s = w.s;
        while sh.abusing() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(200));
            let ping = Frame::control(method::PING, 1, &[]);
            let mut out = vec![];
            let _ = codec::encode_tcp(&ping, &mut out);
            if s.write_all(&out).is_err() {
                break;
            }
        }
    }
    Ok(())
}

/// A careless backend: 16,000-byte pushes to the clients that never read, 40 per device
/// every 300 ms.
fn slow_pusher(c: &Common, sh: &Shared) -> Result<(), String> {
    let mut ka = KeepAlive::new(&c.api)?;
    let p = "s".repeat(16_000);
    while sh.abusing() {
        let items: Vec<String> = (0..3)
            .flat_map(|d| {
                let item = json!({"to": "device", "app": c.app, "device_id": format!("abuse-slow-{d}"), "payload": p})
                    .to_string();
                std::iter::repeat_n(item, 40)
            })
            .collect();
        ka.post(
            "/v1/push/batch",
            format!("[{}]", items.join(",")).as_bytes(),
        )?;
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

/// Status values with a short TTL, set faster than they expire, past the store's bound (50
/// values in bench/chaos.toml: ten sets a second would do).
fn status_spam(c: &Common, sh: &Shared) -> Result<(), String> {
    let value = vec![b'v'; 4096];
    let mut n = 0u64;
    while sh.abusing() {
        n += 1;
        let Ok((status, _)) = crate::util::http(
            &c.api,
            "POST",
            &format!("/v1/status/spam-{n}?ttl_ms=5000"),
            &value,
        ) else {
            // The API must answer; the /healthz probe reports it if it does not.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        sh.count(if status == 507 {
            "status_refused"
        } else {
            "status_set"
        });
        std::thread::sleep(Duration::from_millis(3));
    }
    Ok(())
}

/// Each kind of bad input the decoders refuse, on its own connection.
fn garbage(c: &Common, sh: &Shared) -> Result<(), String> {
    let frame = |f: &Frame| {
        let mut out = vec![];
        codec::encode_tcp(f, &mut out).expect("small frame");
        out
    };
    let unknown_service = frame(&Frame {
        service: 99,
        method: 1,
        seqid: 7,
        ..Default::default()
    });
    let unknown_method = frame(&Frame::control(99, 8, &[]));
    let ping = frame(&Frame::control(method::PING, 9, &[]));
    let mut unmasked = vec![];
    longlink::ws::encode_frame(&mut unmasked, 1, b"unmasked");
    let mut bad_utf8 = vec![];
    ws_frame(1, &[0xc3, 0x28, 0xa0, 0xa1], &mut bad_utf8);
    // A header declaring a 1,000,000-byte binary message, and a first chunk of it.
    let mut too_big = vec![0x82, 0xff];
    too_big.extend_from_slice(&1_000_000u64.to_be_bytes());
    too_big.extend_from_slice(&[1, 2, 3, 4]);
    too_big.extend_from_slice(&[0u8; 1000]);
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&'static str, bool, bool, Vec<u8>)> = vec![
        // (kind, over WebSocket, HELLO first, bytes)
        ("too_large", false, true, vec![0xff, 0xff, 0, 0, 0]),
        (
            "decode",
            false,
            true,
            vec![0, 5, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        ("empty", false, true, vec![0, 0]),
        ("hello_required", false, false, ping),
        ("unknown_service", false, true, unknown_service),
        ("unknown_method", false, true, unknown_method),
        ("ws_utf8", true, false, bad_utf8),
        ("ws_protocol", true, false, unmasked),
        ("ws_too_large", true, false, too_big),
    ];
    let mut n = 0;
    while sh.abusing() {
        for (kind, ws, hello, bytes) in &cases {
            n += 1;
            let device = format!("abuse-garbage-{n}");
            let w = if *ws {
                Wire::ws(c, &device, false)
            } else if *hello {
                Wire::tcp(c, &device)
            } else {
                TcpStream::connect(&c.tcp)
                    .map(|s| Wire {
                        s,
                        ws: false,
                        buf: vec![],
                    })
                    .map_err(|e| e.to_string())
            };
            let Ok(mut w) = w else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            sh.count(kind);
            if w.s.write_all(bytes).is_ok() {
                // Some only get an ERROR and stay open: give it a moment, then go.
                let _ = until_closed(&mut w.s, 1);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Connect, HELLO (or upgrade), close at once; over and over, on both transports.
fn storm(c: &Common, sh: &Shared) -> Result<(), String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    while sh.abusing() {
        let n = NEXT.fetch_add(1, Relaxed);
        let device = format!("abuse-storm-{n}");
        let ok = if n.is_multiple_of(2) {
            Wire::tcp(c, &device).is_ok()
        } else {
            Wire::ws(c, &device, n % 4 == 1).is_ok()
        };
        sh.count(if ok { "storm" } else { "storm_refused" });
        if !ok {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// A raw WebSocket with permessage-deflate negotiated, on a plain socket.
fn ws_deflate(c: &Common, device: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(&c.http).map_err(|e| e.to_string())?;
    let req = format!(
        "GET /ws?app_id={}&device_id={device}&token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        c.app, c.token
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut head = vec![];
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return Err("no upgrade answer".into()),
        }
    }
    let head = String::from_utf8_lossy(&head);
    if !head.starts_with("HTTP/1.1 101") || !head.contains("permessage-deflate") {
        return Err(format!("no compressed upgrade: {head}"));
    }
    Ok(s)
}

/// permessage-deflate abuse, alternately: a bomb (~1 KiB that inflates to 16 MiB, past
/// `max_message_bytes`: 1009) and compressed data that does not inflate (1007).
fn deflate_abuse(c: &Common, sh: &Shared) -> Result<(), String> {
    use flate2::{Compress, Compression, FlushCompress};
    let zeros = vec![0u8; 16 << 20];
    let mut z = Vec::with_capacity(64 * 1024);
    let mut deflate = Compress::new(Compression::best(), false);
    deflate
        .compress_vec(&zeros, &mut z, FlushCompress::Sync)
        .map_err(|e| e.to_string())?;
    z.truncate(z.len() - 4);
    let mut n = 0u64;
    while sh.abusing() {
        n += 1;
        let Ok(mut s) = ws_deflate(c, &format!("abuse-deflate-{n}")) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let body: &[u8] = if n.is_multiple_of(2) {
            &z
        } else {
            b"\xff\xfe\xfd\xfc not deflate"
        };
        sh.count(if n.is_multiple_of(2) {
            "deflate_bomb"
        } else {
            "deflate_corrupt"
        });
        let mut f = vec![];
        longlink::ws::encode_client_frame(&mut f, true, 2, [9, 8, 7, 6], body);
        f[0] |= 0x40; // RSV1: compressed
        if s.write_all(&f).is_ok() {
            until_closed(&mut s, 10)?;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Half a TLS ClientHello, then silence, on either TLS port: the handshake timeout.
fn tls_stall(c: &Common, sh: &Shared) -> Result<(), String> {
    let mut n = 0u64;
    while sh.abusing() {
        n += 1;
        let addr = if n.is_multiple_of(2) {
            &c.tcp_tls
        } else {
            &c.https
        };
        let Ok(mut s) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        sh.count("tls_stall");
        if s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
            .is_ok()
        {
            until_closed(&mut s, 15)?;
        }
    }
    Ok(())
}

/// Clear text to the TLS ports: a HELLO frame to tcp_tls, an upgrade request to https.
fn tls_cleartext(c: &Common, sh: &Shared) -> Result<(), String> {
    let mut hello = vec![];
    let h = Frame::control(
        method::HELLO,
        1,
        &[("app_id", &c.app), ("device_id", "clear")],
    );
    codec::encode_tcp(&h, &mut hello).expect("small frame");
    let upgrade = b"GET /ws?app_id=demo&device_id=clear&token=x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let mut n = 0u64;
    while sh.abusing() {
        n += 1;
        let (addr, bytes): (&str, &[u8]) = if n.is_multiple_of(2) {
            (&c.tcp_tls, &hello)
        } else {
            (&c.https, upgrade)
        };
        let Ok(mut s) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        sh.count("tls_cleartext");
        if s.write_all(bytes).is_ok() {
            until_closed(&mut s, 10)?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A full TLS handshake, then an application-data record that does not decrypt (a forged
/// record; TLS 1.3 has no renegotiation, and a 1.2 ClientHello after the handshake would be
/// such a record too): the gateway's alert, then the end.
fn tls_forged(c: &Common, sh: &Shared) -> Result<(), String> {
    let cfg = crate::child::tls_config()?;
    let mut n = 0u64;
    while sh.abusing() {
        n += 1;
        let Ok(tcp) = TcpStream::connect(&c.tcp_tls) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| e.to_string())?;
        let mut t = rustls::StreamOwned::new(conn, tcp);
        let mut ok = true;
        while ok && t.conn.is_handshaking() {
            ok = t.conn.complete_io(&mut t.sock).is_ok();
        }
        if !ok {
            continue;
        }
        sh.count("tls_forged");
        let mut rec = vec![0x17, 0x03, 0x03, 0x00, 0x30];
        rec.extend((0..0x30u8).map(|i| i.wrapping_mul(37) ^ n as u8));
        if t.sock.write_all(&rec).is_ok() {
            until_closed(&mut t.sock, 10)?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
