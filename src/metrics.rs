//! Every metric, declared once. Counters are relaxed atomics written from any thread; the
//! reactor publishes its gauges once per loop turn. `/metrics` renders Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Client transports, the `transport` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Transport {
    Tcp = 0,
    Ws,
}
pub const TRANSPORTS: [&str; 2] = ["tcp", "ws"];

/// Why a connection was closed, the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CloseReason {
    Peer = 0,
    Bye,
    HandshakeTimeout,
    ReadTimeout,
    ProtocolError,
    AuthRejected,
    SlowConsumer,
    Kicked,
    Busy,
    Shutdown,
    IoError,
    Overloaded,
    /// Moved away by a drain (REDIRECT, or close 1012).
    Drained,
    /// Over `max_messages_per_s`.
    RateLimited,
}
pub const CLOSE_REASONS: [&str; 14] = [
    "peer",
    "bye",
    "handshake_timeout",
    "read_timeout",
    "protocol_error",
    "auth_rejected",
    "slow_consumer",
    "kicked",
    "busy",
    "shutdown",
    "io_error",
    "overloaded",
    "drained",
    "rate_limited",
];

/// Why a client connection was refused, the `reason` label of
/// `longlink_admission_refused_total` (`reactor::admission::Refusal`).
pub const ADMISSION_REFUSALS: [&str; 4] = ["node", "per_ip", "ip_rate", "app"];

/// Bad input from clients, the `kind` label of `longlink_bad_frames_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadFrame {
    TooLarge = 0,
    Empty,
    Decode,
    UnknownMethod,
    HelloRequired,
    UnknownService,
    /// WebSocket protocol violations (reserved bits/opcodes, masking, control frames, close).
    WsProtocol,
    /// WebSocket text or close reason that is not UTF-8.
    WsUtf8,
    /// WebSocket message over `max_message_bytes`.
    WsTooLarge,
    /// More input than a connection may hold in its state (e.g. pipelined behind a
    /// parked long-poll), or than all connections together may hold (`max_input_bytes`).
    Flood,
    /// A frame or message begun and not whole within `frame_timeout_ms`.
    Incomplete,
    /// A permessage-deflate message that does not inflate.
    WsDeflate,
}
pub const BAD_FRAMES: [&str; 12] = [
    "too_large",
    "empty",
    "decode",
    "unknown_method",
    "hello_required",
    "unknown_service",
    "ws_protocol",
    "ws_utf8",
    "ws_too_large",
    "flood",
    "incomplete",
    "ws_deflate",
];

/// Outcome of one push target, the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    Delivered = 0,
    Offline,
    Dropped,
}
pub const PUSH_OUTCOMES: [&str; 3] = ["delivered", "offline", "dropped"];

pub const API_STATUS_CLASSES: [&str; 4] = ["2xx", "4xx", "5xx", "other"];

#[derive(Default)]
pub struct Metrics {
    /// The node's state, for `/healthz` and the gauges: draining (clients being moved
    /// away), shutting down; and the connection limit in force (after the open-files cap).
    pub draining: AtomicU64,
    pub shutting_down: AtomicU64,
    pub max_connections: AtomicU64,
    /// Unix seconds at the process's start (a live upgrade's new process starts anew).
    pub started_s: AtomicU64,
    pub connections: [AtomicU64; TRANSPORTS.len()],
    pub accepted: [AtomicU64; TRANSPORTS.len()],
    pub closed: [AtomicU64; CLOSE_REASONS.len()],
    pub frames_in: [AtomicU64; TRANSPORTS.len()],
    pub frames_out: [AtomicU64; TRANSPORTS.len()],
    pub bytes_in: [AtomicU64; TRANSPORTS.len()],
    pub bytes_out: [AtomicU64; TRANSPORTS.len()],
    pub bad_frames: [AtomicU64; BAD_FRAMES.len()],
    pub pushes: [AtomicU64; PUSH_OUTCOMES.len()],
    pub hello_ok: AtomicU64,
    pub hello_rejected: AtomicU64,
    pub accept_errors: AtomicU64,
    pub api_connections: AtomicU64,
    /// Requests on the client HTTP listener by status class (upgrades are 101: "other").
    pub http_requests: [AtomicU64; API_STATUS_CLASSES.len()],
    /// Connections accepted on the client HTTP listener (before any upgrade).
    pub http_accepted: AtomicU64,
    pub ws_upgrades: AtomicU64,
    /// TLS connections closed for a failed or broken handshake or record (clear text on a
    /// TLS port included).
    pub tls_errors: AtomicU64,
    /// TLS connections closed by a live upgrade (their state cannot be handed over).
    pub tls_upgrade_closed: AtomicU64,
    /// WebSocket upgrades that negotiated permessage-deflate.
    pub ws_deflate_connections: AtomicU64,
    /// Compressed WebSocket messages received and inflated.
    pub ws_inflated: AtomicU64,
    /// Live upgrades that failed (this process went on serving).
    pub upgrades_failed: AtomicU64,
    /// Internal API connections refused by `[api] allow_from`.
    pub api_refused: AtomicU64,
    /// Client connections refused at accept or admission, by `reactor::admission::REFUSALS`.
    pub admission_refused: [AtomicU64; ADMISSION_REFUSALS.len()],
    /// Connections this process took over from the one it upgraded.
    pub upgrade_taken: AtomicU64,
    pub ws_pings_sent: AtomicU64,
    pub poll_waiters: AtomicU64,
    pub poll_released: AtomicU64,
    pub poll_timeouts: AtomicU64,
    pub status_keys: AtomicU64,
    /// Status sets refused because the store was full.
    pub status_refused: AtomicU64,
    pub upstream_frames: AtomicU64,
    pub api_requests: [AtomicU64; API_STATUS_CLASSES.len()],
    pub worker_busy: AtomicU64,
    /// API requests not whole within `[api] request_timeout_ms` (answered 408, closed).
    pub api_request_timeouts: AtomicU64,
    pub worker_jobs: AtomicU64,
    pub timer_entries: AtomicU64,
    /// Slots in the connection table (its high-water mark until cut back).
    pub conn_slots: AtomicU64,
    /// Input held across connections (partial frames, reassembly, pipelined requests).
    pub input_held: AtomicU64,
    /// Memory held for output across connections: own bytes and shared-body records.
    pub output_held: AtomicU64,
    /// Output queued across connections and not yet written, in wire bytes.
    pub output_queued: AtomicU64,
    /// Bytes of spare output buffers pooled for reuse.
    pub pool_bytes: AtomicU64,
    pub reactor_loops: AtomicU64,
    /// Times freed memory was given back to the system after connections went.
    pub memory_trims: AtomicU64,
    /// Times the timer wheel dropped the entries of things gone.
    pub wheel_compactions: AtomicU64,
    // ---- cluster (docs/CLUSTER.md) ----
    /// 1 when this node runs in cluster mode (with Redis): `redis_up` means something.
    pub cluster_enabled: AtomicU64,
    pub redis_up: AtomicU64,
    pub redis_errors: AtomicU64,
    pub redis_commands: AtomicU64,
    pub redis_pipelines: AtomicU64,
    pub redis_pipeline_depth: AtomicU64,
    pub redis_latency_us: AtomicU64,
    pub redis_dropped: AtomicU64,
    pub routes_written: AtomicU64,
    pub cluster_nodes: AtomicU64,
    pub cluster_messages_in: AtomicU64,
    pub cluster_bad_messages: AtomicU64,
    pub cluster_node_id_conflicts: AtomicU64,
    pub pubsub_lag_ms: AtomicU64,
    pub rpc_sent: AtomicU64,
    pub rpc_unreached: AtomicU64,
    pub rpc_served: AtomicU64,
    pub unknown_node: AtomicU64,
    pub cluster_late: AtomicU64,
    pub routes_stale: AtomicU64,
    /// Durable `ack=1` records (cluster): written, pushes answered not durable, records
    /// taken from Redis by a device's new connection, copies handed to another node, left
    /// in Redis at shutdown, removals lost while Redis was away past their bound.
    pub durable_written: AtomicU64,
    pub durable_failed: AtomicU64,
    pub durable_recovered: AtomicU64,
    pub durable_taken: AtomicU64,
    pub durable_left: AtomicU64,
    pub durable_dropped: AtomicU64,
    pub durable_adopted: AtomicU64,
    /// Copies not sent again (or not reported) because their push was ACKed or given up on
    /// another node; copies sent on unchecked (too many checks outstanding).
    pub durable_elsewhere: AtomicU64,
    /// Rooms read from Redis (at start, and again after being cut off or a failover).
    pub cluster_room_loads: AtomicU64,
    pub durable_unchecked: AtomicU64,

    /// Connections per app, `apps[i]` for config app `i` (all transports).
    pub app_connections: Vec<AtomicU64>,
    /// One per backend lane (auth, events, each HTTP service), see `Config::backend_lanes`.
    pub backends: Vec<BackendStats>,
    /// Time a worker spends on one job (auth, an API request, a TLS step), from its start
    /// to its answer: waiting in the queue is `worker_queue_depth`'s part.
    pub worker_job: Histogram,
    pub events_sent: AtomicU64,
    pub events_failed: AtomicU64,
    pub events_dropped: AtomicU64,
    pub upstream_dedup: AtomicU64,
    /// Frames for a client that its transport cannot carry (answered with ERROR instead).
    pub frames_too_large_out: AtomicU64,
    /// Failed epoll registrations of a socket (the connection is closed).
    pub register_errors: AtomicU64,
    /// `ack=1` pushes: acknowledged, retransmitted, given up.
    pub acked: AtomicU64,
    pub retransmits: AtomicU64,
    pub undelivered: AtomicU64,
    /// Parked pushes handed to a device's new connection.
    pub replayed: AtomicU64,
    /// Copies of an `ack=1` push not needed any more: the device acknowledged (or holds) the
    /// push on another connection.
    pub redundant_copies: AtomicU64,
    pub undelivered_reports_sent: AtomicU64,
    pub undelivered_reports_failed: AtomicU64,
    pub undelivered_reports_dropped: AtomicU64,
}

/// Upper bounds (seconds) of the latency histograms: backend calls and worker jobs.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        inc(&self.counts[i]);
        add(&self.sum_us, d.as_micros() as u64);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Observations per bucket (not cumulative; the last is past the largest bound): the
    /// admin page takes two of these apart for the latency of a recent window.
    pub fn bucket_counts(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Relaxed)).collect()
    }

    /// Its series in Prometheus text: `_bucket` (cumulative), `_sum`, `_count`; `labels`
    /// ("" or `k="v",...`) go on each.
    fn render(&self, o: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut acc = 0;
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            acc += self.counts[i].load(Relaxed);
            let _ = writeln!(o, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {acc}");
        }
        acc += self.counts[LATENCY_BUCKETS.len()].load(Relaxed);
        let _ = writeln!(o, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {acc}");
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(o, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(o, "{name}_count{} {acc}", braces(labels));
    }

    /// The upper bound of the bucket the `q` quantile falls in, in seconds (as Prometheus's
    /// `histogram_quantile` would bound it); None with no observation, +inf past the last.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let want = (q * n as f64).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, c) in self.counts.iter().enumerate() {
            acc += c.load(Relaxed);
            if acc >= want {
                return Some(LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }
}

/// Calls to one backend lane.
#[derive(Default)]
pub struct BackendStats {
    pub app: String,
    pub target: String,
    pub latency: Histogram,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    /// Calls refused because the lane was saturated.
    pub busy: AtomicU64,
    /// Answers that were not what the contract asks for (refused, not used).
    pub bad_answers: AtomicU64,
    /// Calls that panicked on the lane's thread (caught; the lane goes on).
    pub panics: AtomicU64,
    /// The log of failed calls: when the next line may be written (unix ms), and how many
    /// failed since the last one.
    log_at: AtomicU64,
    unlogged: AtomicU64,
}

impl BackendStats {
    /// A failed call, for the log (the metrics count each on their own): at most one line
    /// every 10 s per backend, with how many failed since the line before, so that a
    /// backend that is down is seen in the log without flooding it.
    pub fn failed(&self, why: impl FnOnce() -> String) {
        self.unlogged.fetch_add(1, Relaxed);
        // (A monotonic clock: a wall clock stepped back would silence the log that long.)
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64;
        let at = self.log_at.load(Relaxed);
        if now >= at
            && self
                .log_at
                .compare_exchange(at, now + 10_000, Relaxed, Relaxed)
                .is_ok()
        {
            let n = self.unlogged.swap(0, Relaxed);
            log::warn!(
                "app {}: {} call failed: {} ({n} failed since the last report)",
                self.app,
                self.target,
                why()
            );
        }
    }
}

#[inline]
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

impl Metrics {
    pub fn new(cfg: &crate::config::Config) -> Metrics {
        Metrics {
            max_connections: AtomicU64::new(cfg.limits.max_connections as u64),
            started_s: AtomicU64::new(crate::types::unix_ms() / 1000),
            app_connections: cfg.apps.iter().map(|_| AtomicU64::new(0)).collect(),
            backends: cfg
                .backend_lanes()
                .into_iter()
                .map(|(app, target)| BackendStats {
                    app,
                    target,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Client connections open now, all transports.
    pub fn client_connections(&self) -> u64 {
        self.connections.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn close(&self, r: CloseReason) {
        inc(&self.closed[r as usize]);
    }

    pub fn bad_frame(&self, b: BadFrame) {
        inc(&self.bad_frames[b as usize]);
    }

    pub fn push(&self, o: PushOutcome, n: u64) {
        add(&self.pushes[o as usize], n);
    }

    pub fn api_status(&self, status: u16) {
        inc(&self.api_requests[status_class(status)]);
    }

    pub fn http_status(&self, status: u16) {
        inc(&self.http_requests[status_class(status)]);
    }

    /// The numbers the admin page and scripts read (`GET /v1/stats`): gauges as they are,
    /// counters since the start (a reader takes rates between two reads).
    pub fn stats(&self, app_ids: &[String], queue_depth: usize) -> serde_json::Value {
        use serde_json::json;
        let g = |c: &AtomicU64| c.load(Relaxed);
        let by = |names: &[&str], v: &[AtomicU64]| -> serde_json::Map<String, serde_json::Value> {
            names
                .iter()
                .zip(v)
                .map(|(n, c)| ((*n).to_string(), json!(g(c))))
                .collect()
        };
        let ms = |s: Option<f64>| {
            s.map(|s| {
                if s.is_finite() {
                    json!(s * 1000.0)
                } else {
                    json!("inf")
                }
            })
        };
        let backends: Vec<_> = self
            .backends
            .iter()
            .map(|b| {
                json!({
                    "app": b.app, "target": b.target,
                    "calls": b.latency.count(),
                    "seconds_total": g(&b.latency.sum_us) as f64 / 1e6,
                    "p50_ms": ms(b.latency.quantile(0.5)),
                    "p99_ms": ms(b.latency.quantile(0.99)),
                    "buckets": b.latency.bucket_counts(),
                    "errors": g(&b.errors), "timeouts": g(&b.timeouts), "busy": g(&b.busy),
                })
            })
            .collect();
        let apps: serde_json::Map<String, serde_json::Value> = app_ids
            .iter()
            .zip(&self.app_connections)
            .map(|(a, c)| (a.clone(), json!(g(c))))
            .collect();
        let mut connections = by(&TRANSPORTS, &self.connections);
        connections.insert("long_poll".into(), json!(g(&self.poll_waiters)));
        json!({
            "unix_ms": crate::types::unix_ms(),
            "connections": connections,
            "apps": apps,
            "accepted": by(&TRANSPORTS, &self.accepted),
            "closed": by(&CLOSE_REASONS, &self.closed),
            "refused": by(&ADMISSION_REFUSALS, &self.admission_refused),
            "pushes": by(&PUSH_OUTCOMES, &self.pushes),
            "acked": g(&self.acked),
            "retransmits": g(&self.retransmits),
            "undelivered": g(&self.undelivered),
            "frames_in": by(&TRANSPORTS, &self.frames_in),
            "frames_out": by(&TRANSPORTS, &self.frames_out),
            "upstream_frames": g(&self.upstream_frames),
            "workers": {
                "queue_depth": queue_depth, "jobs": g(&self.worker_jobs), "busy": g(&self.worker_busy),
                "p50_ms": ms(self.worker_job.quantile(0.5)), "p99_ms": ms(self.worker_job.quantile(0.99)),
                "buckets": self.worker_job.bucket_counts(),
            },
            // The bounds of `buckets` (the last bucket is past the largest): latency over
            // any window is the difference of two reads.
            "latency_buckets_ms": LATENCY_BUCKETS.iter().map(|b| b * 1000.0).collect::<Vec<_>>(),
            "backends": backends,
            "memory": {"resident": rss_bytes(), "heap_in_use": heap_bytes().0, "output_queued": g(&self.output_queued)},
            "redis_up": g(&self.redis_up) == 1,
            "cluster_enabled": g(&self.cluster_enabled) == 1,
        })
    }

    /// Prometheus text exposition. `app_ids` names the `app` label; `queue_depth` is read from
    /// the worker channel by the caller.
    pub fn render(&self, app_ids: &[String], queue_depth: usize) -> String {
        let mut o = String::with_capacity(4096);
        let g = |c: &AtomicU64| c.load(Relaxed);
        head(
            &mut o,
            "longlink_build_info",
            "gauge",
            "The running binary's version (1): which one a node runs after a live upgrade.",
        );
        let _ = writeln!(
            o,
            "longlink_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        single(
            &mut o,
            "longlink_start_time_seconds",
            "gauge",
            "When this process started (unix seconds; a live upgrade starts a new one).",
            g(&self.started_s),
        );
        single(
            &mut o,
            "longlink_draining",
            "gauge",
            "1 while the node moves its clients away (a drain): it takes no new ones.",
            g(&self.draining),
        );
        single(
            &mut o,
            "longlink_shutting_down",
            "gauge",
            "1 once the node is shutting down.",
            g(&self.shutting_down),
        );
        single(
            &mut o,
            "longlink_max_connections",
            "gauge",
            "Client connections this node takes at most (the open-files limit applied).",
            g(&self.max_connections),
        );
        family(
            &mut o,
            "longlink_connections",
            "gauge",
            "Open client connections.",
            "transport",
            &TRANSPORTS,
            &self.connections,
        );
        {
            head(
                &mut o,
                "longlink_app_connections",
                "gauge",
                "Open client connections per app.",
            );
            for (id, c) in app_ids.iter().zip(&self.app_connections) {
                let _ = writeln!(o, "longlink_app_connections{{app=\"{id}\"}} {}", g(c));
            }
        }
        family(
            &mut o,
            "longlink_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            "transport",
            &TRANSPORTS,
            &self.accepted,
        );
        family(
            &mut o,
            "longlink_connections_closed_total",
            "counter",
            "Connections on the client listeners (TCP and HTTP) closed, by reason.",
            "reason",
            &CLOSE_REASONS,
            &self.closed,
        );
        family(
            &mut o,
            "longlink_frames_in_total",
            "counter",
            "Frames received from clients.",
            "transport",
            &TRANSPORTS,
            &self.frames_in,
        );
        family(
            &mut o,
            "longlink_frames_out_total",
            "counter",
            "Frames queued to clients.",
            "transport",
            &TRANSPORTS,
            &self.frames_out,
        );
        family(
            &mut o,
            "longlink_bytes_in_total",
            "counter",
            "Bytes read from clients.",
            "transport",
            &TRANSPORTS,
            &self.bytes_in,
        );
        family(
            &mut o,
            "longlink_bytes_out_total",
            "counter",
            "Bytes written to clients.",
            "transport",
            &TRANSPORTS,
            &self.bytes_out,
        );
        family(
            &mut o,
            "longlink_bad_frames_total",
            "counter",
            "Bad input from clients, by kind.",
            "kind",
            &BAD_FRAMES,
            &self.bad_frames,
        );
        family(
            &mut o,
            "longlink_pushes_total",
            "counter",
            "Push targets (connections, or addressees found offline) by outcome.",
            "outcome",
            &PUSH_OUTCOMES,
            &self.pushes,
        );
        single(
            &mut o,
            "longlink_hello_ok_total",
            "counter",
            "HELLOs admitted.",
            g(&self.hello_ok),
        );
        single(
            &mut o,
            "longlink_hello_rejected_total",
            "counter",
            "HELLOs rejected.",
            g(&self.hello_rejected),
        );
        single(
            &mut o,
            "longlink_accept_errors_total",
            "counter",
            "accept() failures (EMFILE and the like).",
            g(&self.accept_errors),
        );
        single(
            &mut o,
            "longlink_api_connections",
            "gauge",
            "Open internal API connections.",
            g(&self.api_connections),
        );
        family(
            &mut o,
            "longlink_api_requests_total",
            "counter",
            "Internal API requests by status class.",
            "status",
            &API_STATUS_CLASSES,
            &self.api_requests,
        );
        family(
            &mut o,
            "longlink_http_requests_total",
            "counter",
            "Requests on the client HTTP listener by status class (101 upgrades count as other).",
            "status",
            &API_STATUS_CLASSES,
            &self.http_requests,
        );
        single(
            &mut o,
            "longlink_http_connections_accepted_total",
            "counter",
            "Connections accepted on the client HTTP listener (before any upgrade).",
            g(&self.http_accepted),
        );
        single(
            &mut o,
            "longlink_ws_upgrades_total",
            "counter",
            "WebSocket upgrades completed.",
            g(&self.ws_upgrades),
        );
        single(
            &mut o,
            "longlink_tls_errors_total",
            "counter",
            "TLS connections closed for a handshake or record error (clear text to a TLS port included).",
            g(&self.tls_errors),
        );
        single(
            &mut o,
            "longlink_tls_upgrade_closed_total",
            "counter",
            "TLS connections told to reconnect at a live upgrade (TLS state is not handed over).",
            g(&self.tls_upgrade_closed),
        );
        single(
            &mut o,
            "longlink_ws_deflate_connections_total",
            "counter",
            "WebSocket upgrades that negotiated permessage-deflate.",
            g(&self.ws_deflate_connections),
        );
        single(
            &mut o,
            "longlink_ws_inflated_total",
            "counter",
            "Compressed WebSocket messages received and inflated.",
            g(&self.ws_inflated),
        );
        single(
            &mut o,
            "longlink_ws_compressed_sent_total",
            "counter",
            "WebSocket messages sent compressed (permessage-deflate).",
            crate::deflate::SENT.load(Relaxed),
        );
        single(
            &mut o,
            "longlink_ws_compressions_total",
            "counter",
            "Compressions run (a broadcast to many compressed clients is compressed once).",
            crate::deflate::PACKS.load(Relaxed),
        );
        family(
            &mut o,
            "longlink_admission_refused_total",
            "counter",
            "Client connections refused at accept or admission: node, per_ip, ip_rate (connect rate), app.",
            "reason",
            &ADMISSION_REFUSALS,
            &self.admission_refused,
        );
        single(
            &mut o,
            "longlink_api_connections_refused_total",
            "counter",
            "Internal API connections refused because their address is not in [api] allow_from.",
            g(&self.api_refused),
        );
        single(
            &mut o,
            "longlink_upgrades_failed_total",
            "counter",
            "Live upgrades given up (the new process failed or said nothing; this one went on).",
            g(&self.upgrades_failed),
        );
        single(
            &mut o,
            "longlink_upgrade_connections_taken",
            "gauge",
            "Connections (clients and API) this process took over at its live upgrade.",
            g(&self.upgrade_taken),
        );
        single(
            &mut o,
            "longlink_ws_pings_sent_total",
            "counter",
            "Server pings sent to idle WebSocket connections.",
            g(&self.ws_pings_sent),
        );
        single(
            &mut o,
            "longlink_poll_waiters",
            "gauge",
            "Long-poll requests waiting for a status key.",
            g(&self.poll_waiters),
        );
        single(
            &mut o,
            "longlink_poll_released_total",
            "counter",
            "Long-poll requests answered with a value.",
            g(&self.poll_released),
        );
        single(
            &mut o,
            "longlink_poll_timeouts_total",
            "counter",
            "Long-poll requests that timed out.",
            g(&self.poll_timeouts),
        );
        single(
            &mut o,
            "longlink_status_keys",
            "gauge",
            "Long-poll status keys held (values or waiters).",
            g(&self.status_keys),
        );
        single(
            &mut o,
            "longlink_api_request_timeouts_total",
            "counter",
            "API requests not whole within request_timeout_ms (408, then closed).",
            g(&self.api_request_timeouts),
        );
        single(
            &mut o,
            "longlink_status_refused_total",
            "counter",
            "Status sets refused (507) because the store held max_status_values or max_status_bytes.",
            g(&self.status_refused),
        );
        single(
            &mut o,
            "longlink_upstream_frames_total",
            "counter",
            "Client messages routed to a service.",
            g(&self.upstream_frames),
        );
        self.render_latencies(&mut o);
        single(
            &mut o,
            "longlink_worker_jobs_total",
            "counter",
            "Jobs handed to the worker pool.",
            g(&self.worker_jobs),
        );
        single(
            &mut o,
            "longlink_worker_busy_total",
            "counter",
            "Jobs refused because the worker queue was full.",
            g(&self.worker_busy),
        );
        single(
            &mut o,
            "longlink_worker_queue_depth",
            "gauge",
            "Jobs waiting for a worker.",
            queue_depth as u64,
        );
        single(
            &mut o,
            "longlink_timer_wheel_entries",
            "gauge",
            "Entries in the timer wheel.",
            g(&self.timer_entries),
        );
        single(
            &mut o,
            "longlink_connection_slots",
            "gauge",
            "Slots in the connection table, occupied or not (its vacant tail is cut back after a flood).",
            g(&self.conn_slots),
        );
        single(
            &mut o,
            "longlink_input_held_bytes",
            "gauge",
            "Input held across connections: partial frames, messages being reassembled, pipelined requests.",
            g(&self.input_held),
        );
        single(
            &mut o,
            "longlink_timer_wheel_compactions_total",
            "counter",
            "Times the timer wheel dropped the entries of closed connections (under churn).",
            g(&self.wheel_compactions),
        );
        single(
            &mut o,
            "longlink_memory_trims_total",
            "counter",
            "Times freed memory was given back to the system (after many connections went, or once calm with freed pages resident).",
            g(&self.memory_trims),
        );
        single(
            &mut o,
            "longlink_output_held_bytes",
            "gauge",
            "Memory held for output across connections: each one's own bytes and 40 B per queued shared body (a body is held once however many queue it).",
            g(&self.output_held),
        );
        single(
            &mut o,
            "longlink_output_queued_bytes",
            "gauge",
            "Output queued across connections and not yet written, in bytes on the wire.",
            g(&self.output_queued),
        );
        single(
            &mut o,
            "longlink_resident_memory_bytes",
            "gauge",
            "Resident memory of the process (RSS), read at the scrape.",
            rss_bytes(),
        );
        single(
            &mut o,
            "longlink_output_pool_bytes",
            "gauge",
            "Spare output buffers kept for reuse (bounded: 4,096 buffers of at most 4 KiB, 1 MiB).",
            g(&self.pool_bytes),
        );
        single(
            &mut o,
            "longlink_cluster_enabled",
            "gauge",
            "1 when this node runs in cluster mode (with Redis); alerts on longlink_redis_up need it.",
            g(&self.cluster_enabled),
        );
        single(
            &mut o,
            "longlink_redis_up",
            "gauge",
            "1 while this node's Redis answers (cluster mode).",
            g(&self.redis_up),
        );
        single(
            &mut o,
            "longlink_redis_errors_total",
            "counter",
            "Redis failures (connect, command or reply), each followed by a reconnect.",
            g(&self.redis_errors),
        );
        single(
            &mut o,
            "longlink_redis_commands_total",
            "counter",
            "Redis commands sent (route writes, messages to other nodes, heartbeats).",
            g(&self.redis_commands),
        );
        single(
            &mut o,
            "longlink_redis_pipelines_total",
            "counter",
            "Round trips to Redis (each a pipeline of commands).",
            g(&self.redis_pipelines),
        );
        single(
            &mut o,
            "longlink_redis_pipeline_depth",
            "gauge",
            "Commands in the last pipeline.",
            g(&self.redis_pipeline_depth),
        );
        single(
            &mut o,
            "longlink_redis_latency_microseconds_total",
            "counter",
            "Time spent in Redis round trips; divided by longlink_redis_pipelines_total, the mean latency.",
            g(&self.redis_latency_us),
        );
        single(
            &mut o,
            "longlink_redis_dropped_total",
            "counter",
            "Route writes or node messages not queued for Redis (its queue was full).",
            g(&self.redis_dropped),
        );
        single(
            &mut o,
            "longlink_routes_written_total",
            "counter",
            "Route registry writes (HSET/HDEL) sent to Redis.",
            g(&self.routes_written),
        );
        single(
            &mut o,
            "longlink_cluster_nodes",
            "gauge",
            "Live nodes of the cluster, this one included, as of the last heartbeat.",
            g(&self.cluster_nodes),
        );
        single(
            &mut o,
            "longlink_cluster_messages_in_total",
            "counter",
            "Node messages received on this node's channel.",
            g(&self.cluster_messages_in),
        );
        single(
            &mut o,
            "longlink_cluster_bad_messages_total",
            "counter",
            "Malformed node messages or Redis entries, skipped.",
            g(&self.cluster_bad_messages),
        );
        single(
            &mut o,
            "longlink_cluster_node_id_conflicts_total",
            "counter",
            "Heartbeats that found this node's entry written by another process under the same node_id.",
            g(&self.cluster_node_id_conflicts),
        );
        single(
            &mut o,
            "longlink_pubsub_lag_ms",
            "gauge",
            "Publish-to-receipt time of the last node message (sender's clock to ours).",
            g(&self.pubsub_lag_ms),
        );
        single(
            &mut o,
            "longlink_cluster_requests_total",
            "counter",
            "API requests sent to other nodes for their part.",
            g(&self.rpc_sent),
        );
        single(
            &mut o,
            "longlink_cluster_unreached_total",
            "counter",
            "Other nodes' parts that did not come back within rpc_timeout_ms.",
            g(&self.rpc_unreached),
        );
        single(
            &mut o,
            "longlink_cluster_served_total",
            "counter",
            "Other nodes' requests run here.",
            g(&self.rpc_served),
        );
        single(
            &mut o,
            "longlink_routes_stale_total",
            "counter",
            "Route entries found stale on reading (their node dead, or written under an older route epoch) and removed.",
            g(&self.routes_stale),
        );
        for (name, help, v) in [
            ("longlink_durable_written_total", "Durable ack=1 records written to Redis (cluster).", &self.durable_written),
            ("longlink_durable_failed_total", "Tracked ack=1 copies answered durable:false (Redis away or refusing): held in memory only.", &self.durable_failed),
            ("longlink_durable_recovered_total", "Unacknowledged pushes a device's new connection took from Redis (left by another node, or by a node that died).", &self.durable_recovered),
            ("longlink_durable_taken_total", "Copies this node stopped holding because another node took its device's pushes.", &self.durable_taken),
            ("longlink_durable_left_total", "Unacknowledged pushes left in Redis at shutdown for the device's next connection on another node.", &self.durable_left),
            ("longlink_durable_dropped_total", "Durable record removals lost while Redis was away (past their bound).", &self.durable_dropped),
            ("longlink_cluster_room_loads_total", "Times this node read every room from Redis (at start; again after it was cut off, or Redis lost writes).", &self.cluster_room_loads),
            ("longlink_durable_elsewhere_total", "Copies of a push dropped unsent (not retransmitted, not reported) because it was ACKed or given up on another node.", &self.durable_elsewhere),
            ("longlink_durable_unchecked_total", "Copies retransmitted or given up without checking their record (too many checks outstanding).", &self.durable_unchecked),
            ("longlink_durable_adopted_total", "Unacknowledged pushes adopted from a dead node (or this node's previous run): delivered if their device comes back, else reported here.", &self.durable_adopted),
        ] {
            single(&mut o, name, "counter", help, g(v));
        }
        single(
            &mut o,
            "longlink_cluster_late_total",
            "counter",
            "Other nodes' requests that arrived after their sender had answered without them: dropped, not run.",
            g(&self.cluster_late),
        );
        single(
            &mut o,
            "longlink_cluster_unknown_node_total",
            "counter",
            "Conn ids naming a node that is not live (answered offline).",
            g(&self.unknown_node),
        );
        let (in_use, free) = heap_bytes();
        single(
            &mut o,
            "longlink_heap_in_use_bytes",
            "gauge",
            "Heap bytes allocated and in use (glibc mallinfo2), to tell a leak from fragmentation.",
            in_use,
        );
        single(
            &mut o,
            "longlink_heap_free_bytes",
            "gauge",
            "Heap bytes free inside the allocator but not returned to the system.",
            free,
        );
        single(
            &mut o,
            "longlink_reactor_loops_total",
            "counter",
            "Reactor loop turns.",
            g(&self.reactor_loops),
        );
        o
    }
}

impl Metrics {
    fn render_latencies(&self, o: &mut String) {
        head(
            o,
            "longlink_worker_job_seconds",
            "histogram",
            "Time a worker spends on one job (auth, API request, TLS step), queue wait excluded.",
        );
        self.worker_job.render(o, "longlink_worker_job_seconds", "");
        head(
            o,
            "longlink_backend_request_seconds",
            "histogram",
            "Backend call latency by app and target (auth, events, service:N).",
        );
        for b in &self.backends {
            let l = format!("app=\"{}\",target=\"{}\"", b.app, b.target);
            b.latency.render(o, "longlink_backend_request_seconds", &l);
        }
        for (name, help, get) in [
            (
                "longlink_backend_errors_total",
                "Backend calls that failed (unreachable, 5xx, bad answer).",
                (|b: &BackendStats| b.errors.load(Relaxed)) as fn(&BackendStats) -> u64,
            ),
            (
                "longlink_backend_timeouts_total",
                "Backend calls that timed out.",
                |b| b.timeouts.load(Relaxed),
            ),
            (
                "longlink_backend_busy_total",
                "Backend calls refused because the lane was saturated.",
                |b| b.busy.load(Relaxed),
            ),
            (
                "longlink_backend_bad_answers_total",
                "Backend answers refused: a 2xx whose body is not the contract's (e.g. auth not JSON, a session over its limits).",
                |b| b.bad_answers.load(Relaxed),
            ),
            (
                "longlink_backend_panics_total",
                "Backend calls that panicked (caught, answered as errors).",
                |b| b.panics.load(Relaxed),
            ),
        ] {
            head(o, name, "counter", help);
            for b in &self.backends {
                let _ = writeln!(
                    o,
                    "{name}{{app=\"{}\",target=\"{}\"}} {}",
                    b.app,
                    b.target,
                    get(b)
                );
            }
        }
        single(
            o,
            "longlink_events_sent_total",
            "counter",
            "Online/offline events delivered to events_url.",
            self.events_sent.load(Relaxed),
        );
        single(
            o,
            "longlink_events_failed_total",
            "counter",
            "Events given up after every retry.",
            self.events_failed.load(Relaxed),
        );
        single(
            o,
            "longlink_events_dropped_total",
            "counter",
            "Events dropped because the events queue was full.",
            self.events_dropped.load(Relaxed),
        );
        single(
            o,
            "longlink_upstream_dedup_total",
            "counter",
            "Retransmitted upstream frames not sent to the backend again.",
            self.upstream_dedup.load(Relaxed),
        );
        single(
            o,
            "longlink_frames_too_large_out_total",
            "counter",
            "Frames for a client that its transport cannot carry; the client got an ERROR instead.",
            self.frames_too_large_out.load(Relaxed),
        );
        single(
            o,
            "longlink_poll_register_errors_total",
            "counter",
            "Failed epoll registrations of a socket; the connection was closed.",
            self.register_errors.load(Relaxed),
        );
        single(
            o,
            "longlink_acked_pushes_total",
            "counter",
            "ack=1 pushes acknowledged by their client.",
            self.acked.load(Relaxed),
        );
        single(
            o,
            "longlink_retransmits_total",
            "counter",
            "ack=1 pushes sent again for want of an ACK.",
            self.retransmits.load(Relaxed),
        );
        single(
            o,
            "longlink_undelivered_pushes_total",
            "counter",
            "ack=1 pushes given up: retries exhausted or the connection gone.",
            self.undelivered.load(Relaxed),
        );
        single(
            o,
            "longlink_replayed_pushes_total",
            "counter",
            "Unacknowledged pushes handed to a device's next connection.",
            self.replayed.load(Relaxed),
        );
        single(
            o,
            "longlink_redundant_copies_total",
            "counter",
            "Copies of an ack=1 push dropped because the device acknowledged (or holds) it on another connection.",
            self.redundant_copies.load(Relaxed),
        );
        single(
            o,
            "longlink_undelivered_reports_sent_total",
            "counter",
            "Given-up pushes posted to undelivered_url.",
            self.undelivered_reports_sent.load(Relaxed),
        );
        single(
            o,
            "longlink_undelivered_reports_failed_total",
            "counter",
            "Undelivered reports given up after every retry.",
            self.undelivered_reports_failed.load(Relaxed),
        );
        single(
            o,
            "longlink_undelivered_reports_dropped_total",
            "counter",
            "Undelivered reports dropped because their queue was full.",
            self.undelivered_reports_dropped.load(Relaxed),
        );
    }
}

fn status_class(status: u16) -> usize {
    match status {
        200..=299 => 0,
        400..=499 => 1,
        500..=599 => 2,
        _ => 3,
    }
}

fn head(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn single(o: &mut String, name: &str, kind: &str, help: &str, v: u64) {
    head(o, name, kind, help);
    let _ = writeln!(o, "{name} {v}");
}

fn family(
    o: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    names: &[&str],
    vals: &[AtomicU64],
) {
    head(o, name, kind, help);
    for (n, v) in names.iter().zip(vals) {
        let _ = writeln!(o, "{name}{{{label}=\"{n}\"}} {}", v.load(Relaxed));
    }
}

/// The allocator's own count of bytes in use and bytes free-but-held, so an operator can
/// tell a leak (in use grows) from fragmentation (RSS grows, in use does not).
pub fn heap_bytes() -> (u64, u64) {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    ((m.uordblks + m.hblkhd) as u64, m.fordblks as u64)
}

/// This process's resident set size and its anonymous part (resident minus shared, which
/// is file-backed and shmem), from /proc/self/statm (0 if unreadable).
pub fn rss_and_anon_bytes() -> (u64, u64) {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let mut f = statm
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0));
    let (resident, shared) = (f.nth(1).unwrap_or(0), f.next().unwrap_or(0));
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    (resident * page, resident.saturating_sub(shared) * page)
}

/// This process's resident set size, from /proc/self/statm (0 if unreadable).
pub fn rss_bytes() -> u64 {
    rss_and_anon_bytes().0
}
