//! longlink-bench: drives a running gateway over real sockets (docs/BENCHMARKS.md).
//!
//! One process can hold at most ~20,000 files here, so the load comes from several child
//! processes (this same binary, `child` subcommand), each from its own 127.0.0.x source
//! address. The parent coordinates them over stdin/stdout lines, and reads the gateway's CPU
//! time (`/proc/PID/stat`) and RSS (`/proc/PID/statm`) before and after each scenario, so the
//! results do not depend on how fast the load generator is.
//!
//! `--transport ws` speaks raw-mode WebSocket (`GET /ws`, no subprotocol), so the same bench
//! measures other WebSocket servers that echo and accept pushes the same way.
//!
//! Layout: `main.rs` (the command line), `util.rs` (HTTP to the API, /proc readers, the
//! latency histogram), `kids.rs` (the parent's side of the child processes), `child.rs` (the
//! child's event loop holding the connections), `scenario/` (one file per scenario).

use clap::{Parser, Subcommand, ValueEnum};

mod child;
mod kids;
mod scenario;
mod util;
mod wire;

use child::child;
use scenario::{
    backend::backend, batch::batch, chaos::chaos, churn::churn, connect::connect, echo::bare_echo,
    echo::echo, echo::echo_floor, fanout::fanout, longpoll::longpoll, rooms::room_memory,
    unicast::unicast, upgrade::upgrade,
};

#[derive(Parser)]
#[command(
    name = "longlink-bench",
    about = "Load generator and benchmark for longlink"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Kind {
    /// The TCP transport: length-prefixed Frames, HELLO first.
    Tcp,
    /// Raw-mode WebSocket on the client HTTP listener.
    Ws,
    /// The same with permessage-deflate offered (and compressed messages inflated).
    WsDeflate,
    /// Raw-mode WebSocket over TLS (wss://) on the `--https` listener.
    Wss,
    /// The TCP transport over TLS on the `--tcp-tls` listener.
    TcpTls,
    /// HTTP long-poll waiters (`GET /poll/status`).
    Poll,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Ws => "ws",
            Kind::WsDeflate => "ws-deflate",
            Kind::Wss => "wss",
            Kind::TcpTls => "tcp-tls",
            Kind::Poll => "poll",
        }
    }
}

#[derive(clap::Args, Clone)]
pub(crate) struct Common {
    /// Gateway client TCP address.
    #[arg(long, default_value = "127.0.0.1:7100")]
    tcp: String,
    /// Gateway client HTTP address (WebSocket, long-poll).
    #[arg(long, default_value = "127.0.0.1:7101")]
    http: String,
    /// Gateway client TCP-over-TLS address (`--transport tcp-tls`).
    #[arg(long, default_value = "127.0.0.1:7443")]
    tcp_tls: String,
    /// Gateway client HTTPS address (`--transport wss`).
    #[arg(long, default_value = "127.0.0.1:7444")]
    https: String,
    /// The CA the TLS transports trust (the server is named `localhost`).
    #[arg(long, default_value = "tests/keys/tls_ca.pem")]
    tls_ca: String,
    /// Gateway internal API address (for pushes, /healthz's pid).
    #[arg(long, default_value = "127.0.0.1:7180")]
    api: String,
    /// Internal API whose /metrics count the clients' side (ACKs): the node holding the
    /// clients when pushes go through another node's API (default: --api).
    #[arg(long)]
    metrics_api: Option<String>,
    /// Gateway PID for CPU/RSS readings (default: from /healthz).
    #[arg(long)]
    pid: Option<u32>,
    #[arg(long, default_value = "demo")]
    app: String,
    #[arg(long, default_value = "bench")]
    token: String,
    /// Load-generating processes.
    #[arg(long, default_value_t = 4)]
    procs: usize,
    /// First source address; process i uses this + i (127.0.0.2, 127.0.0.3, ...).
    #[arg(long, default_value = "127.0.0.2")]
    source: std::net::Ipv4Addr,
    /// Handshakes in flight per process.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// N idle connections: connect rate, server CPU per connection, RSS per connection.
    Connect {
        #[command(flatten)]
        c: Common,
        #[arg(long, value_enum, default_value = "tcp")]
        transport: Kind,
        #[arg(long, default_value_t = 19_000)]
        conns: usize,
        /// Idle time before RSS is read.
        #[arg(long, default_value_t = 2_000)]
        settle_ms: u64,
        /// Connect `--conns` this many times (all closed in between, each round from fresh
        /// 127.0.0.x sources) and report CPU per connection over all of them: 10 ms CPU
        /// ticks are 0.5 µs per connection at 19,000, so one round is coarse.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Also measure the machine's floor in the same run: a `bare-echo` of this binary
        /// on a free loopback port, connected to as many times in each round as the
        /// gateway, the order alternating; reports the ratio (TCP only).
        #[arg(long)]
        floor: bool,
    },
    /// Broadcast to N subscribers: delivered msg/s, latency, server CPU per delivered message.
    Fanout {
        #[command(flatten)]
        c: Common,
        #[arg(long, value_enum, default_value = "tcp")]
        transport: Kind,
        #[arg(long, default_value_t = 10_000)]
        subs: usize,
        /// Broadcasts to send.
        #[arg(long, default_value_t = 200)]
        messages: usize,
        /// Payload bytes (a send timestamp, padded).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// API connections sending broadcasts concurrently (each one request at a time).
        #[arg(long, default_value_t = 16)]
        window: usize,
        /// Broadcasts per second in all; 0 = as fast as the window allows.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Push to this room (every subscriber bound to it first) instead of broadcasting.
        #[arg(long)]
        room: Option<String>,
    },
    /// Client → service → client round trips (TCP: frames for --service; WebSocket: raw
    /// messages to the app's default service). `upstream` is another name for it.
    #[command(alias = "upstream")]
    Echo {
        #[command(flatten)]
        c: Common,
        #[arg(long, value_enum, default_value = "tcp")]
        transport: Kind,
        #[arg(long, default_value_t = 100)]
        conns: usize,
        /// Round trips per connection, one outstanding at a time.
        #[arg(long, default_value_t = 2_000)]
        rounds: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Service id (TCP frames): 1 = builtin:echo in dev mode; an HTTP service (e.g. one
        /// pointing at `longlink-bench backend`) makes this the upstream scenario.
        #[arg(long, default_value_t = 1)]
        service: i32,
        /// Also measure the machine's floor in the same run: a `bare-echo` of this binary on
        /// a free loopback port, driven by as many TCP connections with the same messages,
        /// passes alternating with the gateway's; reports the ratio.
        #[arg(long)]
        floor: bool,
        /// With `--floor`: passes of `--rounds` round trips on each server, the order
        /// alternating, so that the machine's drift falls on both alike.
        #[arg(long, default_value_t = 4)]
        passes: usize,
    },
    /// Unicast pushes through the batch endpoint to N TCP clients that ACK every push:
    /// acknowledged pushes/s, push latency (API send → client), batch answer latency, server
    /// CPU per push.
    Unicast {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// Pushes in all; push k goes to device k mod conns.
        #[arg(long, default_value_t = 1_000_000)]
        pushes: usize,
        /// Pushes per batch request.
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        /// API connections sending batches concurrently (each one request at a time).
        #[arg(long, default_value_t = 4)]
        window: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// `wait_ms` on each batch: its answer comes once all its pushes are ACKed, so the
        /// batch latency is end-to-end.
        #[arg(long, default_value_t = 0)]
        wait_ms: u64,
        /// Plain pushes (no `ack=1`), for comparison.
        #[arg(long)]
        no_ack: bool,
    },
    /// Memory of room membership: binds `members` device ids (offline devices: membership is
    /// by device) to each of `rooms` rooms, reads the gateway's RSS, unbinds them all.
    Rooms {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 100_000)]
        members: usize,
        #[arg(long, default_value_t = 1)]
        rooms: usize,
    },
    /// The kernel's floor for `echo`: a bare single-threaded edge-triggered echo server (one
    /// read, one write of the same bytes back, nothing else), which the TCP `echo` scenario
    /// can drive with `--tcp` and `--pid` (HELLO is echoed too, which the client accepts).
    /// Runs until killed.
    BareEcho {
        #[arg(long, default_value = "127.0.0.1:7300")]
        listen: String,
        /// Read a connection's first bytes right after accept, before registering it (as
        /// the gateway does): the floor with that design.
        #[arg(long)]
        read_at_accept: bool,
        /// TCP_DEFER_ACCEPT on the listener (the kernel hands a connection over once its
        /// first bytes are in): whether that moves the floor.
        #[arg(long)]
        defer_accept: bool,
        /// Start this many idle threads beside the echo loop, sharing its descriptor table
        /// as a gateway's workers do: what being multi-threaded costs each syscall.
        #[arg(long, default_value_t = 0)]
        idle_threads: usize,
        /// Accept up to this many connections (at most 64), then read each, answer each,
        /// register each (0: one connection at a time): whether batching moves the floor.
        #[arg(long, default_value_t = 0)]
        phased: usize,
    },
    /// A minimal HTTP backend for the upstream scenario: answers every POST with the
    /// request's `payload` (JSON envelope in, `{"payload": ...}` out); keep-alive, a thread
    /// per connection. Runs until killed.
    Backend {
        #[arg(long, default_value = "127.0.0.1:7200")]
        listen: String,
    },
    /// One big API call while others need the reactor: a batch of room pushes to N
    /// clients, a bystander pinging alongside, the gateway's peak RSS.
    Batch {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 1_000)]
        conns: usize,
        #[arg(long, default_value_t = 3_000)]
        items: usize,
        #[arg(long, default_value_t = 200)]
        size: usize,
    },
    /// Live upgrade: idle and pinging connections across `kill -HUP` of the gateway
    /// (dev mode): handoff time, largest PONG gap, RSS old and new, connections lost.
    Upgrade {
        #[command(flatten)]
        c: Common,
        /// The idle connections' transport (the pinging ones are clear TCP); wss and
        /// tcp-tls cross as TLS 1.3 state.
        #[arg(long, value_enum, default_value = "tcp")]
        transport: Kind,
        #[arg(long, default_value_t = 19_000)]
        conns: usize,
        #[arg(long, default_value_t = 100)]
        pinging: usize,
    },
    /// Memory under connect/close churn: cycles of N connects and closes, RSS after each.
    Churn {
        #[command(flatten)]
        c: Common,
        #[arg(long, value_enum, default_value = "tcp")]
        transport: Kind,
        #[arg(long, default_value_t = 5_000)]
        conns: usize,
        #[arg(long, default_value_t = 60)]
        cycles: usize,
    },
    /// Well-behaved clients (TCP and pbbp2 WebSocket: pinging, ACKing `ack=1` pushes) among
    /// abusers of every kind while backends send large batches; against a gateway started
    /// with bench/chaos.toml. Exits non-zero unless every push arrived once, every abuse was
    /// counted and memory came back.
    Chaos {
        #[command(flatten)]
        c: Common,
        /// Well-behaved clients, half on each transport.
        #[arg(long, default_value_t = 100)]
        good: usize,
        /// Seconds of abuse.
        #[arg(long, default_value_t = 30)]
        secs: u64,
        /// Seconds of every abuser before the start reading (0: none), so that the memory
        /// any first minute leaves for good is not counted against the abuse.
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        /// Bare connects per flood: more than the gateway's `max_connections` (1,000 in
        /// bench/chaos.toml).
        #[arg(long, default_value_t = 1_200)]
        flood: usize,
        /// `kill -HUP` the gateway this many seconds into the abuse (a live upgrade under
        /// fire): every check still holds, counters adding both processes' shares.
        #[arg(long)]
        upgrade_at: Option<u64>,
        /// The gateway has TLS listeners (`--tcp-tls`, `--https`): abuse them too (stalled
        /// handshakes, clear text, forged records).
        #[arg(long)]
        tls: bool,
    },
    /// N long-poll waiters, each released by its own status set through the API.
    Longpoll {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 10_000)]
        waiters: usize,
        /// API connections setting keys concurrently.
        #[arg(long, default_value_t = 16)]
        window: usize,
    },
    /// Internal: one load-generating process (driven by the parent over stdin/stdout).
    #[command(hide = true)]
    Child {
        #[arg(long, value_enum)]
        kind: Kind,
        #[arg(long)]
        addr: String,
        #[arg(long)]
        source: std::net::Ipv4Addr,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        concurrency: usize,
        #[arg(long)]
        app: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        prefix: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Connect {
            c,
            transport,
            conns,
            settle_ms,
            rounds,
            floor,
        } => connect(&c, transport, conns, settle_ms, rounds, floor),
        Cmd::Fanout {
            c,
            transport,
            subs,
            messages,
            size,
            window,
            rate,
            room,
        } => fanout(
            &c,
            transport,
            subs,
            messages,
            size,
            window,
            rate,
            room.as_deref(),
        ),
        Cmd::Echo {
            c,
            transport,
            conns,
            rounds,
            size,
            service,
            floor,
            passes,
        } => {
            if floor {
                echo_floor(&c, transport, conns, rounds, size, service, passes)
            } else {
                echo(&c, transport, conns, rounds, size, service)
            }
        }
        Cmd::Unicast {
            c,
            conns,
            pushes,
            batch,
            window,
            size,
            wait_ms,
            no_ack,
        } => unicast(&c, conns, pushes, batch, window, size, wait_ms, !no_ack),
        Cmd::Rooms { c, members, rooms } => room_memory(&c, members, rooms),
        Cmd::BareEcho {
            listen,
            read_at_accept,
            defer_accept,
            idle_threads,
            phased,
        } => bare_echo(&listen, read_at_accept, defer_accept, idle_threads, phased),
        Cmd::Backend { listen } => backend(&listen),
        Cmd::Longpoll { c, waiters, window } => longpoll(&c, waiters, window),
        Cmd::Batch {
            c,
            conns,
            items,
            size,
        } => batch(&c, conns, items, size),
        Cmd::Chaos {
            c,
            good,
            secs,
            warmup,
            flood,
            upgrade_at,
            tls,
        } => chaos(&c, good, secs, warmup, flood, upgrade_at, tls),
        Cmd::Churn {
            c,
            transport,
            conns,
            cycles,
        } => churn(&c, transport, conns, cycles),
        Cmd::Upgrade {
            c,
            transport,
            conns,
            pinging,
        } => upgrade(&c, transport, conns, pinging),
        Cmd::Child {
            kind,
            addr,
            source,
            conns,
            concurrency,
            app,
            token,
            prefix,
        } => child(
            kind,
            &addr,
            source,
            conns,
            concurrency,
            &app,
            &token,
            &prefix,
        ),
    };
    if let Err(e) = r {
        eprintln!("longlink-bench: {e}");
        std::process::exit(1);
    }
}
