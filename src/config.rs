//! Configuration (docs/PROTOCOL.md, "Configuration"): a TOML file, flags that override it, and dev-mode defaults
//! when there is no file. Parsing walks the document by hand so that every error (unknown
//! key, wrong type, bad value) is collected and named with its line, not just the first.

use std::fmt;
use std::path::PathBuf;

use toml_edit::{ImDocument, Item, TableLike, Value};

use crate::types::{valid_app_id, valid_node_id};

pub const DEFAULT_NODE_ID: &str = "n1";
pub const DEFAULT_TCP: &str = "0.0.0.0:7100";
pub const DEFAULT_HTTP: &str = "0.0.0.0:7101";
pub const DEFAULT_API: &str = "127.0.0.1:7180";
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_READ_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_PING_INTERVAL_MS: u64 = 25_000;
pub const DEFAULT_MAX_FRAME_BYTES: usize = 65_535;
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1 << 20;
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;
pub const DEFAULT_STATUS_TTL_MS: u64 = 60_000;
pub const DEFAULT_POLL_MAX_TIMEOUT_MS: u64 = 120_000;
pub const DEFAULT_MAX_STATUS_VALUES: usize = 100_000;
pub const DEFAULT_FRAME_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_SLOW_CONSUMER_GRACE_MS: u64 = 3_000;
pub const DEFAULT_MAX_OUTPUT_TOTAL: usize = 1 << 30;
pub const DEFAULT_MAX_INPUT_BYTES: usize = 256 << 20;
pub const DEFAULT_MAX_STATUS_BYTES: usize = 64 << 20;
pub const DEFAULT_SERVICE_TIMEOUT_MS: u64 = 5_000;
pub const BUILTIN_ECHO: &str = "builtin:echo";
pub const DEFAULT_AUTH_TIMEOUT_MS: u64 = 3_000;
pub const DEFAULT_EVENTS_RETRIES: u64 = 3;
pub const DEFAULT_SERVICE_MAX_INFLIGHT: usize = 64;
/// 0: as many as the open-files limit allows, minus a reserve (`server::fd_reserve`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 0;
pub const DEFAULT_API_MAX_BODY_BYTES: usize = 4 << 20;
pub const DEFAULT_API_IDLE_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_API_REQUEST_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_WORKER_QUEUE: usize = 4096;
pub const DEFAULT_LOG_LEVEL: &str = "info";
pub const DEFAULT_PUSH_WRITES_PER_TURN: usize = 4096;
pub const DEV_APP: &str = "demo";
pub const DEFAULT_HEARTBEAT_MS: u64 = 1_000;
pub const DEFAULT_NODE_TTL_MS: u64 = 5_000;
pub const DEFAULT_RPC_TIMEOUT_MS: u64 = 1_000;
pub const DEFAULT_KEY_PREFIX: &str = "ll:";

/// Where a listener binds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    /// `host:port` or `unix:/path`; "" means disabled (`None`).
    pub fn parse(s: &str) -> Result<Option<ListenAddr>, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: listener needs a path".into());
            }
            return Ok(Some(ListenAddr::Unix(PathBuf::from(path))));
        }
        // Accept ":7100" as "0.0.0.0:7100", as many servers do, and "localhost:7100" as
        // 127.0.0.1 (no other name is looked up: a listener binds an address).
        let full = if s.starts_with(':') {
            format!("0.0.0.0{s}")
        } else if let Some(port) = s.strip_prefix("localhost:") {
            format!("127.0.0.1:{port}")
        } else {
            s.to_string()
        };
        full.parse().map(|a| Some(ListenAddr::Tcp(a))).map_err(|_| {
            format!("{s:?} is not ADDRESS:PORT (an IP address such as 127.0.0.1, 0.0.0.0 or [::], or localhost) or unix:/path")
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Listen {
    pub tcp: Option<ListenAddr>,
    pub http: Option<ListenAddr>,
    pub api: Option<ListenAddr>,
    /// The TCP transport and the client HTTP listener (wss://, https long-poll) over TLS.
    pub tcp_tls: Option<ListenAddr>,
    pub https: Option<ListenAddr>,
    /// SO_REUSEPORT on the client listeners: several nodes on one host share the ports.
    pub reuse_port: bool,
}

/// `[cluster]`: nodes sharing a Redis form one gateway (docs/CLUSTER.md). No `redis`: this
/// node runs alone.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// `redis://HOST:PORT[/DB]`, or `redis+cluster://HOST:PORT[,HOST:PORT...]`; "" = alone.
    pub redis: String,
    pub heartbeat_ms: u64,
    /// A node silent this long is dead.
    pub node_ttl_ms: u64,
    /// How long a request waits for another node's part before naming it `unreached`.
    pub rpc_timeout_ms: u64,
    /// What clients should dial for this node; "" = the bound address.
    pub advertise_tcp: String,
    pub advertise_ws: String,
    pub key_prefix: String,
}

/// `[tls]`: the certificate chain and key of the TLS listeners (PEM files; a relative path
/// is relative to the config file's directory). Read at start, and again at each reload.
#[derive(Clone, Debug, Default)]
pub struct Tls {
    pub cert: String,
    pub key: String,
    /// Made from the files by `Config::load_tls`.
    pub server: Option<std::sync::Arc<rustls::ServerConfig>>,
}

/// `[drain]`: how a draining node (`POST /v1/drain`, SIGUSR1) moves its clients away
/// (docs/OPERATIONS.md).
#[derive(Clone, Debug)]
pub struct Drain {
    /// Where TCP / WebSocket clients are sent when no other live node is known (alone, or
    /// every other node draining too): `host:port` and `ws://host:port/ws`. "" = a
    /// REDIRECT without an endpoint (the client dials its usual address again).
    pub redirect_tcp: String,
    pub redirect_ws: String,
    /// Where TLS clients are sent (`host:port`, `wss://host:port/ws`; never a clear
    /// endpoint): "" = a REDIRECT without an endpoint.
    pub redirect_tcp_tls: String,
    pub redirect_wss: String,
    /// Clients moved per second.
    pub rate: u64,
    /// A drain's longest run (the API's `deadline_ms` overrides it): then the node exits
    /// with whoever is left.
    pub deadline_ms: u64,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            redirect_tcp: String::new(),
            redirect_ws: String::new(),
            redirect_tcp_tls: String::new(),
            redirect_wss: String::new(),
            rate: 2_000,
            deadline_ms: 60_000,
        }
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            redis: String::new(),
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            node_ttl_ms: DEFAULT_NODE_TTL_MS,
            rpc_timeout_ms: DEFAULT_RPC_TIMEOUT_MS,
            advertise_tcp: String::new(),
            advertise_ws: String::new(),
            key_prefix: DEFAULT_KEY_PREFIX.into(),
        }
    }
}

impl Cluster {
    pub fn enabled(&self) -> bool {
        !self.redis.is_empty()
    }
}

/// Checks a Redis URL of either shape; the error names what is wrong.
pub fn check_redis_url(u: &str) -> Result<(), String> {
    let (scheme, rest) = u.split_once("://").ok_or_else(|| {
        format!("{u:?} is not redis://HOST:PORT or redis+cluster://HOST:PORT,...")
    })?;
    let hosts = rest.split('/').next().unwrap_or("");
    match scheme {
        "redis" | "redis+cluster" if !hosts.is_empty() => {}
        "redis" | "redis+cluster" => return Err(format!("{u:?} names no host")),
        _ => return Err(format!("{u:?}: the scheme must be redis or redis+cluster")),
    }
    for h in hosts.split(',') {
        let hp = h.rsplit('@').next().unwrap_or(h);
        if !hp.contains(':') {
            return Err(format!("{u:?}: {hp:?} is not HOST:PORT"));
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub handshake_timeout_ms: u64,
    pub read_timeout_ms: u64,
    pub ping_interval_ms: u64,
    pub max_frame_bytes: usize,
    pub max_output_bytes: usize,
    pub max_connections: usize,
    /// WebSocket: largest message (all fragments together), checked at each frame header.
    pub max_message_bytes: usize,
    /// `ack=1` pushes: first retransmit after this, doubling each time.
    pub ack_timeout_ms: u64,
    /// `ack=1` pushes: retransmits before the push is reported undelivered.
    pub max_retries: u64,
    /// `ack=1` pushes waiting for their ACK per connection; more are dropped (reported).
    pub max_unacked: usize,
    /// How long a gone device's unacknowledged pushes wait for it to reconnect (0 = not).
    pub reconnect_grace_ms: u64,
    /// A frame (TCP) or message (WebSocket) a client has begun must be whole within this.
    pub frame_timeout_ms: u64,
    /// A connection whose output stays over `max_output_bytes` this long is a slow consumer
    /// (a burst is let through; it may hold up to twice the bound meanwhile).
    pub slow_consumer_grace_ms: u64,
    /// Output queued across all connections: past it, the grace is off (a connection over
    /// its bound is a slow consumer at once).
    pub max_output_total: usize,
    /// Input held across all connections (partial frames, messages being reassembled,
    /// pipelined requests): a connection whose input would pass it is closed.
    pub max_input_bytes: usize,
    /// Client connections one source address may hold; 0 = no limit.
    pub max_connections_per_ip: usize,
    /// New connections a second from one source address (a token bucket of
    /// `connect_burst_per_ip`); 0 = no limit.
    pub connect_rate_per_ip: u64,
    pub connect_burst_per_ip: u64,
    /// Messages a second one client connection may send (a bucket of `message_burst`);
    /// 0 = no limit. Past it the connection is closed (`rate_limited`).
    pub max_messages_per_s: u64,
    pub message_burst: u64,
}

/// The client HTTP listener: WebSocket upgrades and long-poll.
#[derive(Clone, Debug)]
pub struct Http {
    /// Origins allowed to open a WebSocket; empty = any (clients other than browsers send none).
    pub allowed_origins: Vec<String>,
    /// Origins answered with CORS headers on long-poll; "*" = any.
    pub cors_origins: Vec<String>,
    /// How long a status value set before its poll arrives is kept.
    pub status_ttl_ms: u64,
    /// Upper bound for a poll's `timeout`.
    pub poll_max_timeout_ms: u64,
    /// Status values kept at once, and their bytes: a set past either is refused (507).
    pub max_status_values: usize,
    pub max_status_bytes: usize,
    /// WebSocket permessage-deflate (RFC 7692), when the client offers it.
    pub permessage_deflate: bool,
    /// Messages shorter than this go uncompressed (compressing them costs more than it saves).
    pub deflate_min_bytes: usize,
}

#[derive(Clone, Debug)]
pub struct Api {
    pub token: String,
    /// Listen off loopback with no token (the operator says the network is trusted).
    pub allow_open: bool,
    /// Peers the API accepts, when set (others get 403 and are closed).
    pub allow_from: Vec<crate::types::Cidr>,
    pub max_body_bytes: usize,
    pub idle_timeout_ms: u64,
    /// A request, once its first byte has arrived, must be whole within this (slowloris).
    pub request_timeout_ms: u64,
}

#[derive(Clone, Debug)]
pub struct Runtime {
    /// Worker threads; 0 = one per core (at least 2).
    pub workers: usize,
    pub worker_queue: usize,
    pub log_level: String,
    /// Connections a loop turn's API pushes may newly make to write (docs/ARCHITECTURE.md,
    /// "Pushes in slices"): the size of a slice.
    pub push_writes_per_turn: usize,
}

/// How upstream frames are POSTed to an HTTP service (docs/PROTOCOL.md, "Backends").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `application/json` envelope with the connection context and the payload.
    Json,
    /// `application/x-protobuf`: the Frame itself; context in `X-Longlink-*` headers.
    Protobuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub id: i32,
    pub url: String,
    pub timeout_ms: u64,
    /// Concurrency cap: calls in flight (and as many queued) before clients get "busy".
    pub max_inflight: usize,
    pub format: Format,
}

impl Service {
    pub fn is_echo(&self) -> bool {
        self.url == BUILTIN_ECHO
    }
}

/// JWT auth for an app (`[apps.jwt]`): HS256 with a shared secret, or RS256/ES256 with a
/// public key. `sub` becomes the user id; `exp` is required and, with `nbf`, checked with
/// `leeway_s`; `session_claim` (if set) names an object claim that becomes session data.
#[derive(Clone)]
pub struct Jwt {
    pub alg: jsonwebtoken::Algorithm,
    /// HS256: made from the secret at parse. RS256/ES256: read from `public_key` by
    /// `Config::load` (relative to the config file), so parsing reads no file.
    pub key: Option<std::sync::Arc<jsonwebtoken::DecodingKey>>,
    pub public_key: String,
    pub leeway_s: u64,
    pub session_claim: String,
    pub issuer: String,
    pub audience: String,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jwt({:?}, key hidden)", self.alg)
    }
}

#[derive(Clone, Debug)]
pub struct App {
    pub id: String,
    pub tokens: Vec<String>,
    /// Dev mode: any token is admitted.
    pub any_token: bool,
    /// Where raw WebSocket messages go (0 = nowhere).
    pub default_service: i32,
    pub services: Vec<Service>,
    /// Auth callback at connect; "" = static tokens.
    pub auth_url: String,
    pub auth_timeout_ms: u64,
    /// Online/offline events; "" = none.
    pub events_url: String,
    /// Tries per event (the first one included).
    pub events_retries: u64,
    /// `ack=1` pushes given up with nobody waiting for the answer; "" = none.
    pub undelivered_url: String,
    /// A connection whose backlog passes `max_output_bytes`: false = closed (default),
    /// true = it stays and the pushes that do not fit are dropped (and reported).
    pub drop_when_slow: bool,
    /// Client connections the app may hold on this node; 0 = no limit.
    pub max_connections: usize,
    /// `[apps.jwt]`: tokens are JWTs, verified with this key (instead of `tokens` or
    /// `auth_url`).
    pub jwt: Option<Jwt>,
}

impl App {
    pub fn service(&self, id: i32) -> Option<&Service> {
        self.services.iter().find(|s| s.id == id)
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: String,
    pub listen: Listen,
    pub limits: Limits,
    pub http: Http,
    pub api: Api,
    pub runtime: Runtime,
    pub cluster: Cluster,
    pub drain: Drain,
    pub tls: Tls,
    pub apps: Vec<App>,
    /// No config file: built-in defaults, app `demo` admits any token.
    pub dev_mode: bool,
}

/// A config error with the line it is on (1-based; 0 = not tied to a line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "line {}: {}", self.line, self.message)
        } else {
            write!(f, "{}", self.message)
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: DEFAULT_NODE_ID.into(),
            listen: Listen {
                tcp: ListenAddr::parse(DEFAULT_TCP).unwrap(),
                http: ListenAddr::parse(DEFAULT_HTTP).unwrap(),
                api: ListenAddr::parse(DEFAULT_API).unwrap(),
                tcp_tls: None,
                https: None,
                reuse_port: false,
            },
            limits: Limits {
                handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
                read_timeout_ms: DEFAULT_READ_TIMEOUT_MS,
                ping_interval_ms: DEFAULT_PING_INTERVAL_MS,
                max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
                max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
                max_connections: DEFAULT_MAX_CONNECTIONS,
                max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
                ack_timeout_ms: 2_000,
                max_retries: 5,
                max_unacked: 1_024,
                reconnect_grace_ms: 30_000,
                frame_timeout_ms: DEFAULT_FRAME_TIMEOUT_MS,
                slow_consumer_grace_ms: DEFAULT_SLOW_CONSUMER_GRACE_MS,
                max_output_total: DEFAULT_MAX_OUTPUT_TOTAL,
                max_input_bytes: DEFAULT_MAX_INPUT_BYTES,
                max_connections_per_ip: 0,
                connect_rate_per_ip: 0,
                connect_burst_per_ip: 20,
                max_messages_per_s: 0,
                message_burst: 200,
            },
            http: Http {
                allowed_origins: vec![],
                cors_origins: vec!["*".into()],
                status_ttl_ms: DEFAULT_STATUS_TTL_MS,
                poll_max_timeout_ms: DEFAULT_POLL_MAX_TIMEOUT_MS,
                max_status_values: DEFAULT_MAX_STATUS_VALUES,
                max_status_bytes: DEFAULT_MAX_STATUS_BYTES,
                permessage_deflate: true,
                deflate_min_bytes: 256,
            },
            api: Api {
                token: String::new(),
                allow_open: false,
                allow_from: vec![],
                max_body_bytes: DEFAULT_API_MAX_BODY_BYTES,
                idle_timeout_ms: DEFAULT_API_IDLE_TIMEOUT_MS,
                request_timeout_ms: DEFAULT_API_REQUEST_TIMEOUT_MS,
            },
            runtime: Runtime {
                workers: 0,
                worker_queue: DEFAULT_WORKER_QUEUE,
                log_level: DEFAULT_LOG_LEVEL.into(),
                push_writes_per_turn: DEFAULT_PUSH_WRITES_PER_TURN,
            },
            cluster: Cluster::default(),
            drain: Drain::default(),
            tls: Tls::default(),
            apps: vec![],
            dev_mode: false,
        }
    }
}

/// An app with every key at its default (what an `[[apps]]` table starts from).
impl Default for App {
    fn default() -> App {
        App {
            id: String::new(),
            tokens: vec![],
            any_token: false,
            default_service: 0,
            services: vec![],
            auth_url: String::new(),
            auth_timeout_ms: DEFAULT_AUTH_TIMEOUT_MS,
            events_url: String::new(),
            events_retries: DEFAULT_EVENTS_RETRIES,
            undelivered_url: String::new(),
            drop_when_slow: false,
            max_connections: 0,
            jwt: None,
        }
    }
}

impl Config {
    /// What this config allows but an operator most likely did not mean: said at start
    /// (warn) and by `check-config`, which still passes it.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = vec![];
        let l = &self.limits;
        let tcp = self.listen.tcp.is_some() || self.listen.tcp_tls.is_some();
        if tcp && l.read_timeout_ms <= l.ping_interval_ms {
            w.push(format!(
                "limits.read_timeout_ms ({}) is not longer than ping_interval_ms ({}), the heartbeat TCP clients are told: one that pings at it is closed for silence",
                l.read_timeout_ms, l.ping_interval_ms
            ));
        }
        if !self.dev_mode {
            if self.apps.is_empty() {
                w.push("no [[apps]]: every client is refused".into());
            }
            for a in &self.apps {
                if a.tokens.iter().any(|t| t == "demo-token") {
                    w.push(format!(
                        "app {:?} takes the sample token \"demo-token\": replace it before clients can reach this node",
                        a.id
                    ));
                }
                if !a.tokens.is_empty() && !a.auth_url.is_empty() {
                    w.push(format!(
                        "app {:?} has both tokens and auth_url: auth_url checks every client and the tokens are not used (remove them)",
                        a.id
                    ));
                }
                if a.tokens.is_empty() && a.auth_url.is_empty() && a.jwt.is_none() && !a.any_token {
                    w.push(format!(
                        "app {:?} has no tokens, auth_url or [apps.jwt]: it admits nobody",
                        a.id
                    ));
                }
            }
        }
        if let Some(ListenAddr::Tcp(a)) = &self.listen.api {
            if !a.ip().is_loopback() && self.api.token.is_empty() && self.api.allow_open {
                w.push(format!(
                    "the internal API listens on {a} with no token (api.allow_open): anyone who can reach it can push, kick and drain"
                ));
            }
        }
        let c = &self.cluster;
        let wild = |x: &Option<ListenAddr>| matches!(x, Some(ListenAddr::Tcp(a)) if a.ip().is_unspecified());
        let l = &self.listen;
        if c.enabled()
            && ((c.advertise_tcp.is_empty() && (wild(&l.tcp) || wild(&l.tcp_tls)))
                || (c.advertise_ws.is_empty() && (wild(&l.http) || wild(&l.https))))
        {
            w.push("cluster: a client listener is bound to a wildcard address and [cluster] advertise_tcp / advertise_ws are not set: other nodes' REDIRECTs and /v1/endpoints name a loopback address (127.0.0.1 or [::1]) for this node, which only this host can dial".into());
        }
        w
    }

    /// Built-in defaults with no file: dev mode.
    pub fn dev() -> Config {
        Config {
            apps: vec![App {
                id: DEV_APP.into(),
                tokens: vec![],
                any_token: true,
                // Raw WebSocket messages and service-1 frames are echoed, so conformance
                // suites and the bench run with no backend.
                default_service: 1,
                services: vec![Service {
                    id: 1,
                    url: BUILTIN_ECHO.into(),
                    timeout_ms: DEFAULT_SERVICE_TIMEOUT_MS,
                    max_inflight: DEFAULT_SERVICE_MAX_INFLIGHT,
                    format: Format::Json,
                }],
                ..App::default()
            }],
            dev_mode: true,
            ..Config::default()
        }
    }

    /// Parses a config file's text; every problem is returned, each with its line.
    pub fn parse(src: &str) -> Result<Config, Vec<ConfigError>> {
        let doc = ImDocument::parse(src).map_err(|e| {
            let line = e.span().map(|s| line_of(src, s.start)).unwrap_or(0);
            vec![ConfigError {
                line,
                message: e.message().trim().to_string(),
            }]
        })?;
        let mut p = Parser {
            src,
            errors: vec![],
        };
        let mut cfg = Config::default();
        let root = doc.as_table();
        for (key, item) in root.iter() {
            match key {
                "node_id" => {
                    if let Some(s) = p.string(root, key, item) {
                        if valid_node_id(&s) {
                            cfg.node_id = s;
                        } else {
                            p.err_key(root, key, "node_id must be 1-32 of [A-Za-z0-9_-]".into());
                        }
                    }
                }
                "listen" => p.section(root, key, item, |p, t| {
                    for (k, it) in t.iter() {
                        let slot = match k {
                            "reuse_port" => {
                                if let Some(b) = p.boolean(t, k, it) {
                                    cfg.listen.reuse_port = b;
                                }
                                continue;
                            }
                            "tcp" => &mut cfg.listen.tcp,
                            "http" => &mut cfg.listen.http,
                            "api" => &mut cfg.listen.api,
                            "tcp_tls" => &mut cfg.listen.tcp_tls,
                            "https" => &mut cfg.listen.https,
                            _ => {
                                p.unknown(t, "listen", k);
                                continue;
                            }
                        };
                        if let Some(s) = p.string(t, k, it) {
                            match ListenAddr::parse(&s) {
                                Ok(a) => *slot = a,
                                Err(e) => p.err_key(t, k, format!("listen.{k}: {e}")),
                            }
                        }
                    }
                }),
                "limits" => p.section(root, key, item, |p, t| {
                    for (k, it) in t.iter() {
                        let l = &mut cfg.limits;
                        match k {
                            "handshake_timeout_ms" => p.int(t, k, it, 1, 3_600_000, &mut l.handshake_timeout_ms),
                            "read_timeout_ms" => p.int(t, k, it, 1, 86_400_000, &mut l.read_timeout_ms),
                            "ping_interval_ms" => p.int(t, k, it, 1, 86_400_000, &mut l.ping_interval_ms),
                            "max_frame_bytes" => p.int(t, k, it, 16, 65_535, &mut l.max_frame_bytes),
                            "max_output_bytes" => p.int(t, k, it, 1024, 1 << 30, &mut l.max_output_bytes),
                            "max_connections" => p.int(t, k, it, 0, 100_000_000, &mut l.max_connections),
                            "max_message_bytes" => p.int(t, k, it, 16, 1 << 30, &mut l.max_message_bytes),
                            "ack_timeout_ms" => p.int(t, k, it, 1, 3_600_000, &mut l.ack_timeout_ms),
                            "max_retries" => p.int(t, k, it, 0, 100, &mut l.max_retries),
                            "max_unacked" => p.int(t, k, it, 1, 1 << 20, &mut l.max_unacked),
                            "reconnect_grace_ms" => p.int(t, k, it, 0, 86_400_000, &mut l.reconnect_grace_ms),
                            "frame_timeout_ms" => p.int(t, k, it, 1, 3_600_000, &mut l.frame_timeout_ms),
                            "slow_consumer_grace_ms" => p.int(t, k, it, 0, 600_000, &mut l.slow_consumer_grace_ms),
                            "max_output_total" => p.int(t, k, it, 1 << 20, 1 << 40, &mut l.max_output_total),
                            "max_input_bytes" => p.int(t, k, it, 1 << 16, 1 << 40, &mut l.max_input_bytes),
                            "max_connections_per_ip" => p.int(t, k, it, 0, 100_000_000, &mut l.max_connections_per_ip),
                            "connect_rate_per_ip" => p.int(t, k, it, 0, 10_000_000, &mut l.connect_rate_per_ip),
                            "connect_burst_per_ip" => p.int(t, k, it, 1, 10_000_000, &mut l.connect_burst_per_ip),
                            "max_messages_per_s" => p.int(t, k, it, 0, 10_000_000, &mut l.max_messages_per_s),
                            "message_burst" => p.int(t, k, it, 1, 10_000_000, &mut l.message_burst),
                            _ => p.unknown(t, "limits", k),
                        }
                    }
                }),
                "cluster" => p.section(root, key, item, |p, t| {
                    for (k, it) in t.iter() {
                        let c = &mut cfg.cluster;
                        match k {
                            "redis" => {
                                if let Some(s) = p.string(t, k, it) {
                                    // "" = alone, as with no [cluster] at all.
                                    let checked = if s.is_empty() { Ok(()) } else { check_redis_url(&s) };
                                    match checked {
                                        Ok(()) => c.redis = s,
                                        Err(e) => p.err_key(t, k, format!("cluster.redis: {e}")),
                                    }
                                }
                            }
                            "heartbeat_ms" => p.int(t, k, it, 10, 60_000, &mut c.heartbeat_ms),
                            "node_ttl_ms" => p.int(t, k, it, 100, 600_000, &mut c.node_ttl_ms),
                            "rpc_timeout_ms" => p.int(t, k, it, 10, 60_000, &mut c.rpc_timeout_ms),
                            "advertise_tcp" | "advertise_ws" | "key_prefix" => {
                                if let Some(s) = p.string(t, k, it) {
                                    match k {
                                        "advertise_tcp" => c.advertise_tcp = s,
                                        "advertise_ws" => c.advertise_ws = s,
                                        _ => c.key_prefix = s,
                                    }
                                }
                            }
                            _ => p.unknown(t, "cluster", k),
                        }
                    }
                }),
                "tls" => p.section(root, key, item, |p, t| {
                    for (k, it) in t.iter() {
                        match k {
                            "cert" | "key" => {
                                if let Some(v) = p.string(t, k, it) {
                                    if k == "cert" {
                                        cfg.tls.cert = v;
                                    } else {
                                        cfg.tls.key = v;
                                    }
                                }
                            }
                            _ => p.unknown(t, "tls", k),
                        }
                    }
                }),
                "drain" => p.section(root, key, item, |p, t| {
                    for (k, it) in t.iter() {
                        let d = &mut cfg.drain;
                        match k {
                            "redirect_tcp" | "redirect_ws" | "redirect_tcp_tls" | "redirect_wss" => {
                                if let Some(s) = p.string(t, k, it) {
                                    *match k {
                                        "redirect_tcp" => &mut d.redirect_tcp,
                                        "redirect_ws" => &mut d.redirect_ws,
                                        "redirect_tcp_tls" => &mut d.redirect_tcp_tls,
                                        _ => &mut d.redirect_wss,
                                    } = s;
                                }
                            }
                            "rate" => p.int(t, k, it, 1, 10_000_000, &mut d.rate),
                            "deadline_ms" => p.int(t, k, it, 1, 86_400_000, &mut d.deadline_ms),
                            _ => p.unknown(t, "drain", k),
                        }
                    }
                }),
                "api" => p.section(root, key, item, |p, t| {
                    for (k, it) in t.iter() {
                        match k {
                            "token" => {
                                if let Some(s) = p.string(t, k, it) {
                                    cfg.api.token = s;
                                }
                            }
                            "allow_open" => {
                                if let Some(b) = p.boolean(t, k, it) {
                                    cfg.api.allow_open = b;
                                }
                            }
                            "allow_from" => {
                                let mut list = vec![];
                                p.strings(t, k, it, &mut list);
                                cfg.api.allow_from.clear();
                                for s in list {
                                    match crate::types::Cidr::parse(&s) {
                                        Ok(r) => cfg.api.allow_from.push(r),
                                        Err(e) => p.err_key(t, k, format!("allow_from: {e}")),
                                    }
                                }
                            }
                            "max_body_bytes" => p.int(t, k, it, 1024, 1 << 30, &mut cfg.api.max_body_bytes),
                            "idle_timeout_ms" => p.int(t, k, it, 1, 86_400_000, &mut cfg.api.idle_timeout_ms),
                            "request_timeout_ms" => p.int(t, k, it, 1, 3_600_000, &mut cfg.api.request_timeout_ms),
                            _ => p.unknown(t, "api", k),
                        }
                    }
                }),
                "http" => p.section(root, key, item, |p, t| {
                    for (k, it) in t.iter() {
                        let h = &mut cfg.http;
                        match k {
                            "allowed_origins" => p.strings(t, k, it, &mut h.allowed_origins),
                            "cors_origins" => p.strings(t, k, it, &mut h.cors_origins),
                            "status_ttl_ms" => p.int(t, k, it, 1, 86_400_000, &mut h.status_ttl_ms),
                            "poll_max_timeout_ms" => p.int(t, k, it, 1, 3_600_000, &mut h.poll_max_timeout_ms),
                            "max_status_values" => p.int(t, k, it, 1, 100_000_000, &mut h.max_status_values),
                            "max_status_bytes" => p.int(t, k, it, 1024, 1 << 40, &mut h.max_status_bytes),
                            "permessage_deflate" => {
                                if let Some(b) = p.boolean(t, k, it) {
                                    h.permessage_deflate = b;
                                }
                            }
                            "deflate_min_bytes" => p.int(t, k, it, 0, 1 << 30, &mut h.deflate_min_bytes),
                            _ => p.unknown(t, "http", k),
                        }
                    }
                }),
                "runtime" => p.section(root, key, item, |p, t| {
                    for (k, it) in t.iter() {
                        match k {
                            "workers" => p.int(t, k, it, 0, 256, &mut cfg.runtime.workers),
                            "worker_queue" => p.int(t, k, it, 16, 1 << 24, &mut cfg.runtime.worker_queue),
                            "push_writes_per_turn" => p.int(t, k, it, 1, 1 << 20, &mut cfg.runtime.push_writes_per_turn),
                            "log_level" => {
                                if let Some(s) = p.string(t, k, it) {
                                    if crate::logging::parse_level(&s).is_some() {
                                        cfg.runtime.log_level = s;
                                    } else {
                                        p.err_key(t, k, format!("log_level {s:?} is not one of error, warn, info, debug, trace"));
                                    }
                                }
                            }
                            _ => p.unknown(t, "runtime", k),
                        }
                    }
                }),
                "apps" => p.apps(root, key, item, &mut cfg.apps),
                _ => p.unknown(root, "", key),
            }
        }
        let c = &cfg.cluster;
        if c.node_ttl_ms < 2 * c.heartbeat_ms {
            p.errors.push(ConfigError {
                line: 0,
                message: format!(
                    "cluster.node_ttl_ms ({}) must be at least twice heartbeat_ms ({}): one late heartbeat would declare the node dead",
                    c.node_ttl_ms, c.heartbeat_ms
                ),
            });
        }
        if p.errors.is_empty() {
            Ok(cfg)
        } else {
            p.errors.sort_by_key(|e| e.line);
            Err(p.errors)
        }
    }

    /// Reads and parses a file; errors are prefixed with its path.
    pub fn load(path: &std::path::Path) -> Result<Config, Vec<String>> {
        let src =
            std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        let mut cfg = Config::parse(&src).map_err(|errs| {
            errs.into_iter()
                .map(|e| match e.line {
                    // (A rule across keys, tied to no one line.)
                    0 => format!("{}: {}", path.display(), e.message),
                    n => format!("{}:{n}: {}", path.display(), e.message),
                })
                .collect::<Vec<_>>()
        })?;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        let errs = cfg.load_keys(dir);
        if !errs.is_empty() {
            let at = path.display();
            return Err(errs.into_iter().map(|e| format!("{at}: {e}")).collect());
        }
        Ok(cfg)
    }

    /// With a TLS listener: reads `[tls] cert` and `key` (relative to `dir`) and makes the
    /// TLS config (TLS 1.2 and 1.3, ring's algorithms, no client certificates).
    pub fn load_tls(&mut self, dir: &std::path::Path) -> Result<(), String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        if self.listen.tcp_tls.is_none() && self.listen.https.is_none() {
            return Ok(());
        }
        if self.tls.cert.is_empty() || self.tls.key.is_empty() {
            return Err("a TLS listener (tcp_tls, https) needs [tls] cert and key".into());
        }
        let (cert, key) = (dir.join(&self.tls.cert), dir.join(&self.tls.key));
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
            .and_then(|it| it.collect())
            .map_err(|e| format!("[tls] cert {}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "[tls] cert {}: no certificate in it",
                cert.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&key)
            .map_err(|e| format!("[tls] key {}: {e}", key.display()))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("[tls]: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("[tls] cert and key: {e}"))?;
        // After a TLS 1.3 handshake our own record layer takes over (crate::tls13): it
        // needs the traffic secrets (from the key log) and rustls's record counters.
        let mut server = server;
        server.key_log = std::sync::Arc::new(crate::tls13::Capture);
        server.enable_secret_extraction = true;
        self.tls.server = Some(std::sync::Arc::new(server));
        Ok(())
    }

    /// Reads the JWT public keys the apps name (a relative path is relative to `dir`, the
    /// config file's directory); the errors, if any.
    pub fn load_keys(&mut self, dir: &std::path::Path) -> Vec<String> {
        let mut errs = vec![];
        for a in &mut self.apps {
            let Some(j) = a.jwt.as_mut().filter(|j| j.key.is_none()) else {
                continue;
            };
            let p = dir.join(&j.public_key);
            let made = std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|pem| {
                    let k = if j.alg == jsonwebtoken::Algorithm::RS256 {
                        jsonwebtoken::DecodingKey::from_rsa_pem(&pem)
                    } else {
                        jsonwebtoken::DecodingKey::from_ec_pem(&pem)
                    };
                    k.map_err(|e| e.to_string())
                });
            match made {
                Ok(k) => j.key = Some(std::sync::Arc::new(k)),
                Err(e) => errs.push(format!(
                    "app {:?}: [apps.jwt] public_key {}: {e}",
                    a.id,
                    p.display()
                )),
            }
        }
        errs
    }

    pub fn app_index(&self, id: &str) -> Option<usize> {
        self.apps.iter().position(|a| a.id == id)
    }

    /// The backend lanes this config starts, labelled (app, purpose), in the order
    /// `Backends::start` numbers them: per app its auth callback, events, undelivered
    /// reports, then each HTTP service. Metrics keep one set of statistics per lane.
    pub fn backend_lanes(&self) -> Vec<(String, String)> {
        let mut v = vec![];
        for a in &self.apps {
            if !a.auth_url.is_empty() {
                v.push((a.id.clone(), "auth".into()));
            }
            if !a.events_url.is_empty() {
                v.push((a.id.clone(), "events".into()));
            }
            if !a.undelivered_url.is_empty() {
                v.push((a.id.clone(), "undelivered".into()));
            }
            for s in a.services.iter().filter(|s| !s.is_echo()) {
                v.push((a.id.clone(), format!("service:{}", s.id)));
            }
        }
        v
    }

    /// Worker threads to start.
    pub fn worker_threads(&self) -> usize {
        if self.runtime.workers > 0 {
            self.runtime.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .max(2)
        }
    }
}

fn line_of(src: &str, offset: usize) -> usize {
    src.as_bytes()[..offset.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

struct Parser<'a> {
    src: &'a str,
    errors: Vec<ConfigError>,
}

trait Bounded: Copy {
    fn from_i64(v: i64) -> Self;
}
impl Bounded for u64 {
    fn from_i64(v: i64) -> Self {
        v as u64
    }
}
impl Bounded for usize {
    fn from_i64(v: i64) -> Self {
        v as usize
    }
}

impl<'a> Parser<'a> {
    fn line_key(&self, t: &dyn TableLike, key: &str) -> usize {
        t.key(key)
            .and_then(|k| k.span())
            .or_else(|| t.get(key).and_then(|i| i.span()))
            .map(|s| line_of(self.src, s.start))
            .unwrap_or(0)
    }

    fn err_key(&mut self, t: &dyn TableLike, key: &str, message: String) {
        let line = self.line_key(t, key);
        self.errors.push(ConfigError { line, message });
    }

    fn unknown(&mut self, t: &dyn TableLike, section: &str, key: &str) {
        let full = if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        };
        self.err_key(t, key, format!("unknown key {full:?}"));
    }

    fn value<'i>(&mut self, t: &dyn TableLike, key: &str, item: &'i Item) -> Option<&'i Value> {
        match item.as_value() {
            Some(v) => Some(v),
            None => {
                self.err_key(t, key, format!("{key} must be a value, not a table"));
                None
            }
        }
    }

    fn boolean(&mut self, t: &dyn TableLike, key: &str, item: &Item) -> Option<bool> {
        let v = self.value(t, key, item)?;
        match v.as_bool() {
            Some(b) => Some(b),
            None => {
                self.err_key(
                    t,
                    key,
                    format!("{key} must be true or false, not {}", v.type_name()),
                );
                None
            }
        }
    }

    fn string(&mut self, t: &dyn TableLike, key: &str, item: &Item) -> Option<String> {
        let v = self.value(t, key, item)?;
        match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                self.err_key(
                    t,
                    key,
                    format!("{key} must be a string, not {}", v.type_name()),
                );
                None
            }
        }
    }

    fn int<T: Bounded>(
        &mut self,
        t: &dyn TableLike,
        key: &str,
        item: &Item,
        min: i64,
        max: i64,
        out: &mut T,
    ) {
        let Some(v) = self.value(t, key, item) else {
            return;
        };
        match v.as_integer() {
            Some(n) if n >= min && n <= max => *out = T::from_i64(n),
            Some(n) => self.err_key(t, key, format!("{key} = {n} is out of range {min}..={max}")),
            None => self.err_key(
                t,
                key,
                format!("{key} must be an integer, not {}", v.type_name()),
            ),
        }
    }

    /// Backends are plain HTTP (no TLS in this build): keep them on a private network.
    fn check_url(&mut self, t: &dyn TableLike, key: &str, u: &str) {
        let ok = u
            .strip_prefix("http://")
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
        if !ok {
            self.err_key(
                t,
                key,
                format!("{key} {u:?} must be http://host[:port]/path (https is not in this build)"),
            );
        }
    }

    fn strings(&mut self, t: &dyn TableLike, key: &str, item: &Item, out: &mut Vec<String>) {
        match item.as_array() {
            Some(arr) => {
                out.clear();
                for v in arr.iter() {
                    match v.as_str() {
                        Some(s) if !s.is_empty() => out.push(s.to_string()),
                        _ => self.err_key(
                            t,
                            key,
                            format!("{key} must be a list of non-empty strings"),
                        ),
                    }
                }
            }
            None => self.err_key(t, key, format!("{key} must be a list of strings")),
        }
    }

    /// `[apps.jwt]`: `alg` ("HS256", "RS256" or "ES256"), `secret` (HS256) or `public_key`
    /// (a PEM file, RS256/ES256), and optional `leeway_s`, `session_claim`, `issuer`,
    /// `audience`.
    fn jwt(&mut self, t: &dyn TableLike, key: &str, item: &Item) -> Option<Jwt> {
        let Some(j) = item.as_table_like() else {
            self.err_key(t, key, "jwt must be a table ([apps.jwt])".into());
            return None;
        };
        let (mut alg, mut secret, mut public_key) = (String::new(), String::new(), String::new());
        let mut out = Jwt {
            alg: jsonwebtoken::Algorithm::HS256,
            key: None,
            public_key: String::new(),
            leeway_s: 30,
            session_claim: String::new(),
            issuer: String::new(),
            audience: String::new(),
        };
        for (k, it) in j.iter() {
            let v = match k {
                "alg" => &mut alg,
                "secret" => &mut secret,
                "public_key" => &mut public_key,
                "session_claim" => &mut out.session_claim,
                "issuer" => &mut out.issuer,
                "audience" => &mut out.audience,
                "leeway_s" => {
                    self.int(j, k, it, 0, 3600, &mut out.leeway_s);
                    continue;
                }
                _ => {
                    self.unknown(j, "apps.jwt", k);
                    continue;
                }
            };
            if let Some(x) = self.string(j, k, it) {
                *v = x;
            }
        }
        use jsonwebtoken::{Algorithm, DecodingKey};
        let made = match alg.as_str() {
            // A guessable secret signs anyone in: at least 32 bytes (RFC 7518 §3.2 asks
            // for a key as long as the hash).
            "HS256" if secret.len() >= 32 && public_key.is_empty() => {
                out.alg = Algorithm::HS256;
                out.key = Some(std::sync::Arc::new(DecodingKey::from_secret(
                    secret.as_bytes(),
                )));
                Ok(())
            }
            "RS256" | "ES256" if !public_key.is_empty() && secret.is_empty() => {
                out.alg = if alg == "RS256" {
                    Algorithm::RS256
                } else {
                    Algorithm::ES256
                };
                out.public_key = public_key;
                Ok(())
            }
            "HS256" => {
                Err("HS256 takes a secret of at least 32 bytes (and no public_key)".to_string())
            }
            "RS256" | "ES256" => Err(format!("{alg} takes a public_key PEM file (and no secret)")),
            other => Err(format!("alg {other:?} is not HS256, RS256 or ES256")),
        };
        match made {
            Ok(()) => Some(out),
            Err(e) => {
                self.err_key(t, key, format!("jwt: {e}"));
                None
            }
        }
    }

    fn services(&mut self, t: &dyn TableLike, key: &str, item: &Item, out: &mut Vec<Service>) {
        let Some(arr) = item.as_array_of_tables() else {
            self.err_key(
                t,
                key,
                "services must be a list of tables ([[apps.services]])".into(),
            );
            return;
        };
        for st in arr.iter() {
            let st = st as &dyn TableLike;
            let mut svc = Service {
                id: 0,
                url: String::new(),
                timeout_ms: DEFAULT_SERVICE_TIMEOUT_MS,
                max_inflight: DEFAULT_SERVICE_MAX_INFLIGHT,
                format: Format::Json,
            };
            let mut id: u64 = 0;
            for (k, it) in st.iter() {
                match k {
                    "id" => self.int(st, k, it, 1, i32::MAX as i64, &mut id),
                    "url" => {
                        if let Some(u) = self.string(st, k, it) {
                            if u != BUILTIN_ECHO {
                                self.check_url(st, k, &u);
                            }
                            svc.url = u;
                        }
                    }
                    "timeout_ms" => self.int(st, k, it, 1, 3_600_000, &mut svc.timeout_ms),
                    "max_inflight" => self.int(st, k, it, 1, 4096, &mut svc.max_inflight),
                    "format" => match self.string(st, k, it).as_deref() {
                        Some("json") => svc.format = Format::Json,
                        Some("protobuf") => svc.format = Format::Protobuf,
                        Some(other) => {
                            self.err_key(st, k, format!("format {other:?} is not json or protobuf"))
                        }
                        None => {}
                    },
                    _ => self.unknown(st, "apps.services", k),
                }
            }
            svc.id = id as i32;
            let line = st
                .iter()
                .next()
                .and_then(|(k, _)| st.key(k).and_then(|k| k.span()))
                .map(|s| line_of(self.src, s.start))
                .unwrap_or(0);
            if id == 0 || svc.url.is_empty() {
                self.errors.push(ConfigError {
                    line,
                    message: "a [[apps.services]] entry needs id and url".into(),
                });
            } else if out.iter().any(|s| s.id == svc.id) {
                self.errors.push(ConfigError {
                    line,
                    message: format!("service id {id} is defined twice"),
                });
            }
            out.push(svc);
        }
    }

    fn section(
        &mut self,
        root: &dyn TableLike,
        key: &str,
        item: &Item,
        f: impl FnOnce(&mut Self, &dyn TableLike),
    ) {
        match item.as_table_like() {
            Some(t) => f(self, t),
            None => self.err_key(root, key, format!("{key} must be a table ([{key}])")),
        }
    }

    fn apps(&mut self, root: &dyn TableLike, key: &str, item: &Item, out: &mut Vec<App>) {
        let tables: Vec<&dyn TableLike> = match item {
            Item::ArrayOfTables(a) => a.iter().map(|t| t as &dyn TableLike).collect(),
            Item::Value(Value::Array(a)) => {
                let mut v = vec![];
                for x in a.iter() {
                    match x.as_inline_table() {
                        Some(t) => v.push(t as &dyn TableLike),
                        None => {
                            self.err_key(
                                root,
                                key,
                                "apps must be a list of tables ([[apps]])".into(),
                            );
                            return;
                        }
                    }
                }
                v
            }
            _ => {
                self.err_key(root, key, "apps must be a list of tables ([[apps]])".into());
                return;
            }
        };
        for t in tables {
            let mut app = App::default();
            let mut default_service: u64 = 0;
            for (k, it) in t.iter() {
                match k {
                    "id" => {
                        if let Some(s) = self.string(t, k, it) {
                            if !valid_app_id(&s) {
                                self.err_key(
                                    t,
                                    k,
                                    format!("app id {s:?} must be 1-64 of [A-Za-z0-9_.-]"),
                                );
                            } else if out.iter().any(|a| a.id == s) {
                                self.err_key(t, k, format!("app id {s:?} is defined twice"));
                            }
                            app.id = s;
                        }
                    }
                    "tokens" => match it.as_array() {
                        Some(arr) => {
                            for v in arr.iter() {
                                match v.as_str() {
                                    Some(s) if !s.is_empty() => app.tokens.push(s.to_string()),
                                    _ => self.err_key(
                                        t,
                                        k,
                                        "tokens must be non-empty strings".into(),
                                    ),
                                }
                            }
                        }
                        None => self.err_key(t, k, "tokens must be a list of strings".into()),
                    },
                    "default_service" => {
                        self.int(t, k, it, 0, i32::MAX as i64, &mut default_service)
                    }
                    "services" => self.services(t, k, it, &mut app.services),
                    "jwt" => app.jwt = self.jwt(t, k, it),
                    "auth_url" | "events_url" | "undelivered_url" => {
                        if let Some(u) = self.string(t, k, it) {
                            if !u.is_empty() {
                                self.check_url(t, k, &u);
                            }
                            match k {
                                "auth_url" => app.auth_url = u,
                                "events_url" => app.events_url = u,
                                _ => app.undelivered_url = u,
                            }
                        }
                    }
                    "auth_timeout_ms" => self.int(t, k, it, 1, 600_000, &mut app.auth_timeout_ms),
                    "events_retries" => self.int(t, k, it, 1, 100, &mut app.events_retries),
                    "max_connections" => {
                        self.int(t, k, it, 0, 100_000_000, &mut app.max_connections)
                    }
                    "slow_consumer" => match self.string(t, k, it).as_deref() {
                        Some("close") => app.drop_when_slow = false,
                        Some("drop") => app.drop_when_slow = true,
                        Some(other) => self.err_key(
                            t,
                            k,
                            format!("slow_consumer {other:?} is not close or drop"),
                        ),
                        None => {}
                    },
                    _ => self.unknown(t, "apps", k),
                }
            }
            // (tokens beside auth_url: a warning, not an error: the sample leads there, and a
            // config that ran must not fail at the next restart.)
            if app.jwt.is_some() && (!app.auth_url.is_empty() || !app.tokens.is_empty()) {
                self.err_key(
                    t,
                    "jwt",
                    "an app checks its clients one way: [apps.jwt], auth_url or tokens".into(),
                );
            }
            app.default_service = default_service as i32;
            if app.default_service != 0 && app.service(app.default_service).is_none() {
                self.err_key(
                    t,
                    "default_service",
                    format!("default_service {default_service} is not one of this app's services"),
                );
            }
            if app.id.is_empty() {
                let line = t
                    .iter()
                    .next()
                    .and_then(|(k, _)| t.key(k).and_then(|k| k.span()))
                    .map(|s| line_of(self.src, s.start))
                    .unwrap_or(0);
                self.errors.push(ConfigError {
                    line,
                    message: "an [[apps]] entry has no id".into(),
                });
            }
            out.push(app);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_parses() {
        let src = include_str!("../longlink.example.toml");
        let c = Config::parse(src).expect("sample parses");
        assert_eq!(c.node_id, "n1");
        assert_eq!(c.apps[0].id, "demo");
        assert_eq!(c.apps[0].tokens, vec!["demo-token".to_string()]);
        assert!(!c.dev_mode);
    }

    #[test]
    fn warnings_say_what_was_most_likely_not_meant() {
        let c = Config::parse(include_str!("../longlink.example.toml")).unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("demo-token"), "{w:?}");
        let src = "node_id = \"n1\"\n[listen]\napi = \"0.0.0.0:7180\"\n[api]\nallow_open = true\n[limits]\nread_timeout_ms = 1000\nping_interval_ms = 3000\n[cluster]\nredis = \"redis://127.0.0.1:6379\"\n[[apps]]\nid = \"a\"\n";
        let w = Config::parse(src).unwrap().warnings();
        for needle in [
            "read_timeout_ms",
            "admits nobody",
            "allow_open",
            "advertise_tcp",
        ] {
            assert!(w.iter().any(|x| x.contains(needle)), "{needle}: {w:?}");
        }
        assert!(Config::dev().warnings().is_empty());
        // Tokens beside auth_url: said, not refused (a config that ran must still start).
        let both = "node_id = \"n1\"\n[[apps]]\nid = \"a\"\ntokens = [\"t\"]\nauth_url = \"http://127.0.0.1:9/a\"\n";
        let w = Config::parse(both).unwrap().warnings();
        assert!(w.iter().any(|x| x.contains("tokens are not used")), "{w:?}");
    }

    #[test]
    fn the_readme_shows_the_sample_config_as_it_is() {
        let readme = include_str!("../README.md");
        let sample = include_str!("../longlink.example.toml");
        let body = &sample[sample.find("node_id").unwrap()..];
        assert!(
            readme.contains(&format!("```toml\n{body}```")),
            "README.md's config block differs from longlink.example.toml: copy it over"
        );
    }

    #[test]
    fn every_error_is_named_with_its_line() {
        let src = "node_id = \"n1\"\n[listen]\ntcp = \"nonsense\"\nbogus = 1\n[limits]\nread_timeout_ms = \"x\"\nmax_frame_bytes = 70000\n[[apps]]\nid = \"demo\"\ncolour = \"red\"\n";
        let errs = Config::parse(src).unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 4, 6, 7, 10], "{errs:?}");
        assert!(errs[1].message.contains("unknown key \"listen.bogus\""));
        assert!(errs[3].message.contains("out of range"));
    }

    #[test]
    fn syntax_error_has_a_line() {
        let errs = Config::parse("node_id = \"n1\"\n[listen\n").unwrap_err();
        assert_eq!(errs[0].line, 2, "{errs:?}");
    }

    #[test]
    fn the_cluster_section_is_checked() {
        let base = "node_id = \"n1\"\n[[apps]]\nid = \"a\"\ntokens = [\"t\"]\n";
        let c = Config::parse(&format!("{base}[cluster]\nredis = \"redis+cluster://h1:7000,h2:7000\"\nheartbeat_ms = 200\nnode_ttl_ms = 1000\n[listen]\nreuse_port = true\n")).unwrap();
        assert!(c.cluster.enabled() && c.listen.reuse_port);
        assert_eq!((c.cluster.heartbeat_ms, c.cluster.node_ttl_ms), (200, 1000));
        assert!(!Config::parse(&format!("{base}[cluster]\nredis = \"\"\n"))
            .unwrap()
            .cluster
            .enabled());
        for (bad, says) in [
            ("redis = \"http://x:1\"", "scheme"),
            ("redis = \"redis://\"", "no host"),
            ("redis = \"redis://hostonly\"", "HOST:PORT"),
            ("heartbeat_ms = 1000\nnode_ttl_ms = 1500", "twice"),
            ("colour = 1", "unknown key"),
        ] {
            let errs = Config::parse(&format!("{base}[cluster]\n{bad}\n")).unwrap_err();
            assert!(
                errs.iter().any(|e| e.message.contains(says)),
                "{bad}: {errs:?}"
            );
        }
        let errs = Config::parse(&format!("{base}[listen]\nreuse_port = 1\n")).unwrap_err();
        assert!(errs[0].message.contains("true or false"), "{errs:?}");
    }

    #[test]
    fn the_drain_section_is_checked() {
        let base = "node_id = \"n1\"\n[[apps]]\nid = \"a\"\ntokens = [\"t\"]\n";
        let c = Config::parse(&format!("{base}[drain]\nredirect_tcp = \"10.0.0.2:7100\"\nredirect_ws = \"ws://10.0.0.2:7101/ws\"\nrate = 50\ndeadline_ms = 1000\n")).unwrap();
        assert_eq!(c.drain.redirect_tcp, "10.0.0.2:7100");
        assert_eq!(c.drain.redirect_ws, "ws://10.0.0.2:7101/ws");
        assert_eq!((c.drain.rate, c.drain.deadline_ms), (50, 1000));
        let d = Config::parse(base).unwrap().drain;
        assert_eq!(
            (d.rate, d.deadline_ms, d.redirect_tcp.as_str()),
            (2000, 60_000, "")
        );
        for (bad, says) in [("rate = 0", "rate"), ("speed = 1", "unknown key")] {
            let errs = Config::parse(&format!("{base}[drain]\n{bad}\n")).unwrap_err();
            assert!(
                errs.iter().any(|e| e.message.contains(says)),
                "{bad}: {errs:?}"
            );
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(ListenAddr::parse("").unwrap(), None);
        assert_eq!(
            ListenAddr::parse("unix:/tmp/x.sock").unwrap(),
            Some(ListenAddr::Unix("/tmp/x.sock".into()))
        );
        assert_eq!(
            ListenAddr::parse(":7100").unwrap(),
            Some(ListenAddr::Tcp("0.0.0.0:7100".parse().unwrap()))
        );
        assert!(ListenAddr::parse("localhost").is_err());
        assert_eq!(
            ListenAddr::parse("localhost:7180").unwrap(),
            Some(ListenAddr::Tcp("127.0.0.1:7180".parse().unwrap()))
        );
        let e = ListenAddr::parse("gw.example:7180").unwrap_err();
        assert!(e.contains("IP address"), "{e}");
    }
}
