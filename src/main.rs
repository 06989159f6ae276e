use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use longlink::config::{Config, ListenAddr};

#[derive(Parser)]
#[command(name = "longlink", version, about = "A long-connection gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway (the default). With no --config: built-in dev defaults.
    Serve(ServeArgs),
    /// Validate a config file; every error is named with its line.
    CheckConfig { file: PathBuf },
    /// Connect (TCP, or WebSocket pbbp2 with --ws), say HELLO, print every frame received
    /// as a JSON line. Exits 1 if the gateway refuses it (or closes before admitting it).
    Client(ClientArgs),
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Client TCP listener (host:port, unix:/path, "" to disable).
    #[arg(long)]
    tcp: Option<String>,
    /// Client HTTP/WebSocket listener.
    #[arg(long)]
    http: Option<String>,
    /// Internal API listener.
    #[arg(long)]
    api: Option<String>,
    /// Client TCP listener over TLS (needs --tls-cert and --tls-key, or [tls]).
    #[arg(long)]
    tcp_tls: Option<String>,
    /// Client HTTP/WebSocket listener over TLS (wss://).
    #[arg(long)]
    https: Option<String>,
    /// PEM certificate chain for the TLS listeners (`[tls] cert`).
    #[arg(long)]
    tls_cert: Option<String>,
    /// PEM private key for the TLS listeners (`[tls] key`).
    #[arg(long)]
    tls_key: Option<String>,
    /// This node's id, the first part of its connection ids (`node_id`).
    #[arg(long)]
    node_id: Option<String>,
    /// Redis URL for a multi-node gateway (`[cluster] redis`).
    #[arg(long)]
    redis: Option<String>,
    /// Share the client ports with other nodes on this host (`[listen] reuse_port`).
    #[arg(long)]
    reuse_port: bool,
    /// error, warn, info, debug or trace.
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Gateway TCP address (host:port or unix:/path).
    #[arg(long, default_value = "127.0.0.1:7100")]
    tcp: String,
    /// Speak WebSocket pbbp2 to this endpoint instead of TCP (ws://host:port/ws).
    #[arg(long, conflicts_with = "tcp")]
    ws: Option<String>,
    #[arg(long, default_value = "demo")]
    app: String,
    #[arg(long)]
    device: String,
    #[arg(long, default_value = "")]
    token: String,
    #[arg(long)]
    user: Option<String>,
    /// ACK every push received.
    #[arg(long)]
    ack: bool,
    /// PING interval in ms (default: the heartbeat the gateway announces).
    #[arg(long, default_value_t = 0)]
    ping_ms: u64,
    /// Exit after receiving this many pushes.
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Exit after this many milliseconds.
    #[arg(long, default_value_t = 0)]
    duration_ms: u64,
}

fn main() -> ExitCode {
    longlink::upgrade::remember_origin();
    let cli = Cli::parse();
    match cli.cmd.unwrap_or(Cmd::Serve(ServeArgs::default())) {
        Cmd::Serve(a) => serve(a),
        Cmd::CheckConfig { file } => match Config::load(&file).and_then(|mut c| {
            // What `serve` would refuse too (flags aside).
            longlink::server::api_exposure(&c).map_err(|e| vec![e])?;
            c.load_tls(config_dir(&file)).map_err(|e| vec![e])?;
            Ok(c)
        }) {
            Ok(c) => {
                for w in c.warnings() {
                    eprintln!("{}: warning: {w}", file.display());
                }
                println!(
                    "{}: ok ({} app(s), node {})",
                    file.display(),
                    c.apps.len(),
                    c.node_id
                );
                ExitCode::SUCCESS
            }
            Err(errs) => {
                for e in &errs {
                    eprintln!("{e}");
                }
                eprintln!("{}: {} error(s)", file.display(), errs.len());
                ExitCode::FAILURE
            }
        },
        Cmd::Client(a) => {
            longlink::logging::init("warn");
            let o = longlink::client::Options {
                addr: a.ws.unwrap_or(a.tcp),
                app: a.app,
                device: a.device,
                token: a.token,
                user: a.user,
                ack: a.ack,
                ping_ms: a.ping_ms,
                count: a.count,
                duration_ms: a.duration_ms,
            };
            match longlink::client::run(o) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("longlink client: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The directory a config file's relative paths start from.
fn config_dir(file: &std::path::Path) -> &std::path::Path {
    file.parent().unwrap_or(std::path::Path::new("."))
}

fn serve(a: ServeArgs) -> ExitCode {
    // Started by a live upgrade: the channel to the old process (before any thread starts).
    let upgrade = match longlink::upgrade::Channel::inherited() {
        Some(Ok(ch)) => Some(ch),
        Some(Err(e)) => {
            eprintln!("longlink: {}: {e}", longlink::upgrade::FD_ENV);
            return ExitCode::FAILURE;
        }
        None => None,
    };
    // glibc raises its mmap threshold each time a mapped chunk is freed (up to 32 MiB), after
    // which a burst's big buffers (a slow consumer's backlog, a large API body) come from the
    // heap and, freed, leave it fragmented: RSS stayed 3x up after a hostile minute. A fixed
    // threshold keeps them mapped, so freeing them gives the memory back.
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let mut cfg = match &a.config {
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(errs) => {
                for e in errs {
                    eprintln!("{e}");
                }
                return ExitCode::from(2);
            }
        },
        None => Config::dev(),
    };
    let mut bad = vec![];
    for (flag, val, slot) in [
        ("--tcp", &a.tcp, &mut cfg.listen.tcp),
        ("--http", &a.http, &mut cfg.listen.http),
        ("--api", &a.api, &mut cfg.listen.api),
        ("--tcp-tls", &a.tcp_tls, &mut cfg.listen.tcp_tls),
        ("--https", &a.https, &mut cfg.listen.https),
    ] {
        if let Some(v) = val {
            match ListenAddr::parse(v) {
                Ok(addr) => *slot = addr,
                Err(e) => bad.push(format!("{flag}: {e}")),
            }
        }
    }
    if let Some(n) = a.node_id {
        if longlink::types::valid_node_id(&n) {
            cfg.node_id = n;
        } else {
            bad.push("--node-id must be 1-32 of [A-Za-z0-9_-]".into());
        }
    }
    if let Some(l) = a.log_level {
        if longlink::logging::parse_level(&l).is_some() {
            cfg.runtime.log_level = l;
        } else {
            bad.push(format!(
                "--log-level {l:?} is not one of error, warn, info, debug, trace"
            ));
        }
    }
    if a.reuse_port {
        cfg.listen.reuse_port = true;
    }
    // Paths on the command line are the caller's (made absolute); in the file, the file's.
    for (val, slot) in [
        (&a.tls_cert, &mut cfg.tls.cert),
        (&a.tls_key, &mut cfg.tls.key),
    ] {
        if let Some(v) = val {
            *slot = std::path::absolute(v)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| v.clone());
        }
    }
    let base = a
        .config
        .as_deref()
        .map_or(std::path::Path::new("."), config_dir);
    if let Err(e) = cfg.load_tls(base) {
        bad.push(e);
    }
    if let Some(r) = a.redis {
        match longlink::config::check_redis_url(&r) {
            Ok(()) => cfg.cluster.redis = r,
            Err(e) => bad.push(format!("--redis: {e}")),
        }
    }
    // (A config error, so exit 2 as the others, not 1 as a failure while serving.)
    if let Err(e) = longlink::server::api_exposure(&cfg) {
        bad.push(e);
    }
    if !bad.is_empty() {
        for e in bad {
            eprintln!("longlink: {e}");
        }
        return ExitCode::from(2);
    }
    longlink::logging::init(&cfg.runtime.log_level);
    match longlink::server::serve(cfg, upgrade) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, on stderr (the log goes there too).
            eprintln!("longlink: {e}");
            ExitCode::FAILURE
        }
    }
}
