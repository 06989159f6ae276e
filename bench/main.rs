//! longlink-bench: drives a running gateway over real sockets (DESIGN.md §9).
//!
//! One process can hold at most ~20,000 files here, so the load comes from several child
//! processes (this same binary, `child` subcommand), each from its own 127.0.0.x source
//! address. The parent coordinates them over stdin/stdout lines, and reads the gateway's CPU
//! time (`/proc/PID/stat`) and RSS (`/proc/PID/statm`) before and after each scenario, so the
//! results do not depend on how fast the load generator is.
//!
//! `--transport ws` speaks raw-mode WebSocket (`GET /ws`, no subprotocol), so the same bench
//! measures other WebSocket servers that echo and accept pushes the same way.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};
use prost::Message;
use serde_json::json;

use longlink::codec;
use longlink::proto::{method, Frame};

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
enum Kind {
    /// The TCP transport: length-prefixed Frames, HELLO first.
    Tcp,
    /// Raw-mode WebSocket on the client HTTP listener.
    Ws,
    /// HTTP long-poll waiters (`GET /poll/status`).
    Poll,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Ws => "ws",
            Kind::Poll => "poll",
        }
    }
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Gateway client TCP address.
    #[arg(long, default_value = "127.0.0.1:7100")]
    tcp: String,
    /// Gateway client HTTP address (WebSocket, long-poll).
    #[arg(long, default_value = "127.0.0.1:7101")]
    http: String,
    /// Gateway internal API address (for pushes, /healthz's pid).
    #[arg(long, default_value = "127.0.0.1:7180")]
    api: String,
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
    /// messages to the app's default service). `upstream` is the same scenario by its name
    /// in the backends issue.
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
    },
    /// A minimal HTTP backend for the upstream scenario: answers every POST with the
    /// request's `payload` (JSON envelope in, `{"payload": ...}` out); keep-alive, a thread
    /// per connection. Runs until killed.
    Backend {
        #[arg(long, default_value = "127.0.0.1:7200")]
        listen: String,
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
        } => connect(&c, transport, conns, settle_ms),
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
        } => echo(&c, transport, conns, rounds, size, service),
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
        Cmd::BareEcho { listen } => bare_echo(&listen),
        Cmd::Backend { listen } => backend(&listen),
        Cmd::Longpoll { c, waiters, window } => longpoll(&c, waiters, window),
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

// ---- gateway readings -------------------------------------------------------------------

/// utime + stime of a process, in microseconds.
fn cpu_us(pid: u32) -> Result<u64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // The command name may hold spaces; fields after the closing paren are fixed.
    let rest = &s[s.rfind(')').ok_or("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().map_err(|e| e.to_string())?
        + f[12].parse::<u64>().map_err(|e| e.to_string())?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(ticks * 1_000_000 / hz.max(1))
}

/// Resident set size in bytes.
fn rss(pid: u32) -> Result<u64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .map_err(|e| format!("/proc/{pid}/statm: {e}"))?;
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .ok_or("bad statm")?
        .parse()
        .map_err(|e: std::num::ParseIntError| e.to_string())?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    Ok(pages * page)
}

fn gateway_pid(c: &Common) -> Result<u32, String> {
    if let Some(p) = c.pid {
        return Ok(p);
    }
    let (status, body) = http(&c.api, "GET", "/healthz", b"")?;
    if status != 200 {
        return Err(format!("/healthz answered {status}"));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    v["pid"]
        .as_u64()
        .map(|p| p as u32)
        .ok_or_else(|| "no pid in /healthz".into())
}

/// One metric from the gateway's /metrics.
fn metric(c: &Common, name: &str) -> Result<f64, String> {
    let (_, body) = http(&c.api, "GET", "/metrics", b"")?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .ok_or_else(|| format!("no metric {name}"))
}

/// One request on a fresh connection.
fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let req = format!("{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    s.write_all(body).map_err(|e| e.to_string())?;
    let mut resp = vec![];
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let status = std::str::from_utf8(resp.get(9..12).unwrap_or(b"000"))
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |p| p + 4);
    Ok((status, resp[split..].to_vec()))
}

/// A whole HTTP/1.1 message at the front of `buf`: (head length without its blank line,
/// Content-Length). None until the head and the body have both arrived.
fn http_message(buf: &[u8]) -> Option<(usize, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    (buf.len() >= end + 4 + len).then_some((end, len))
}

/// A keep-alive API connection that sends one request at a time.
struct KeepAlive {
    s: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    fn new(addr: &str) -> Result<KeepAlive, String> {
        let s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(KeepAlive {
            s,
            buf: Vec::with_capacity(4096),
        })
    }

    fn post(&mut self, path: &str, body: &[u8]) -> Result<Vec<u8>, String> {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.s.write_all(&req).map_err(|e| e.to_string())?;
        loop {
            if let Some((end, len)) = http_message(&self.buf) {
                if !self.buf.starts_with(b"HTTP/1.1 200") {
                    return Err(format!(
                        "API answered: {}",
                        String::from_utf8_lossy(&self.buf)
                    ));
                }
                let body = self.buf[end + 4..end + 4 + len].to_vec();
                self.buf.drain(..end + 4 + len);
                return Ok(body);
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("API closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// POSTs to every path over `window` keep-alive connections; each body is the send time.
fn post_all(api: &str, window: usize, paths: Vec<String>) -> Result<(), String> {
    let paths = Arc::new(std::sync::Mutex::new(paths));
    let mut ts = vec![];
    for _ in 0..window.max(1) {
        let (api, paths) = (api.to_string(), paths.clone());
        ts.push(std::thread::spawn(move || -> Result<(), String> {
            let mut ka = KeepAlive::new(&api)?;
            loop {
                let Some(path) = paths.lock().unwrap().pop() else {
                    return Ok(());
                };
                ka.post(&path, &payload(20))?;
            }
        }));
    }
    for t in ts {
        t.join().map_err(|_| "sender panicked")??;
    }
    Ok(())
}

// ---- children --------------------------------------------------------------------------

struct Kid {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    prefix: String,
    conns: usize,
}

impl Kid {
    fn spawn(c: &Common, kind: Kind, i: usize, conns: usize) -> Result<Kid, String> {
        let ip = u32::from(c.source) + i as u32;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let addr = if kind == Kind::Tcp { &c.tcp } else { &c.http };
        let prefix = format!("b{}-{i}-", std::process::id());
        let mut child = Command::new(exe)
            .args([
                "child",
                "--kind",
                kind.name(),
                "--addr",
                addr,
                "--conns",
                &conns.to_string(),
            ])
            .args([
                "--concurrency",
                &c.concurrency.to_string(),
                "--source",
                &std::net::Ipv4Addr::from(ip).to_string(),
            ])
            .args(["--app", &c.app, "--token", &c.token, "--prefix", &prefix])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn child: {e}"))?;
        let stdin = child.stdin.take().unwrap();
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Kid {
            child,
            stdin,
            lines,
            prefix,
            conns,
        })
    }

    fn say(&mut self, cmd: &str) -> Result<(), String> {
        writeln!(self.stdin, "{cmd}").map_err(|e| format!("child gone: {e}"))
    }

    /// The next line that starts with `want` (progress lines are skipped).
    fn expect(&mut self, want: &str, within: Duration) -> Result<serde_json::Value, String> {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let l = self
                .lines
                .recv_timeout(left)
                .map_err(|_| format!("child: no {want:?} within {within:?}"))?;
            if let Some(rest) = l.strip_prefix(want) {
                return serde_json::from_str(rest.trim())
                    .map_err(|e| format!("child said {l:?}: {e}"));
            }
            if let Some(err) = l.strip_prefix("error ") {
                return Err(format!("child: {err}"));
            }
        }
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spread(total: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

/// Starts the children and has them connect; returns them with the connect phase's numbers
/// (rate per second, gateway CPU µs per connection).
fn open(c: &Common, kind: Kind, total: usize, pid: u32) -> Result<(Vec<Kid>, f64, f64), String> {
    let mut kids = vec![];
    for (i, n) in spread(total, c.procs).into_iter().enumerate() {
        kids.push(Kid::spawn(c, kind, i, n)?);
    }
    for k in kids.iter_mut() {
        k.expect("spawned", Duration::from_secs(10))?;
    }
    let cpu0 = cpu_us(pid)?;
    let t0 = Instant::now();
    for k in kids.iter_mut() {
        k.say("connect")?;
    }
    let mut done = 0usize;
    for k in kids.iter_mut() {
        let v = k.expect("connected", Duration::from_secs(120))?;
        done += v["ok"].as_u64().unwrap_or(0) as usize;
        let failed = v["failed"].as_u64().unwrap_or(0);
        if failed > 0 {
            return Err(format!("{failed} connections failed: {v}"));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_us(pid)? - cpu0) as f64;
    if done != total {
        return Err(format!("only {done} of {total} connected"));
    }
    eprintln!("connected {total} ({}) in {secs:.2} s", kind.name());
    Ok((kids, total as f64 / secs, cpu / total as f64))
}

/// Has every child report, after `cmd` (a "wait N" or "echo ..."), its stats line.
fn collect(kids: &mut [Kid], cmds: &[String]) -> Result<(u64, Hist, u64, u64), String> {
    for (k, cmd) in kids.iter_mut().zip(cmds) {
        k.say(cmd)?;
    }
    let (mut received, mut hist, mut first, mut last) = (0u64, Hist::default(), u64::MAX, 0u64);
    for k in kids.iter_mut() {
        let s = k.expect("stats", Duration::from_secs(300))?;
        received += s["received"].as_u64().unwrap_or(0);
        hist.merge(&s["hist"]);
        if let Some(f) = s["first_ns"].as_u64().filter(|&f| f > 0) {
            first = first.min(f);
        }
        last = last.max(s["last_ns"].as_u64().unwrap_or(0));
    }
    Ok((
        received,
        hist,
        if first == u64::MAX { 0 } else { first },
        last,
    ))
}

fn reset(kids: &mut [Kid]) -> Result<(), String> {
    for k in kids.iter_mut() {
        k.say("reset")?;
    }
    for k in kids.iter_mut() {
        k.expect("reset", Duration::from_secs(10))?;
    }
    Ok(())
}

fn connect(c: &Common, kind: Kind, conns: usize, settle_ms: u64) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let rss0 = rss(pid)?;
    let (kids, rate, cpu_per_conn) = open(c, kind, conns, pid)?;
    std::thread::sleep(Duration::from_millis(settle_ms));
    let rss1 = rss(pid)?;
    let per = (rss1 as f64 - rss0 as f64) / conns as f64;
    drop(kids);
    let v = json!({
        "scenario": "connect", "transport": kind.name(), "conns": conns, "procs": c.procs,
        "rate_per_s": rate.round(), "server_cpu_us_per_conn": round2(cpu_per_conn),
        "rss_empty_kib": rss0 / 1024, "rss_kib": rss1 / 1024, "rss_per_conn_bytes": per.round(),
    });
    println!("{v}");
    println!(
        "\n  connect ({})  {conns} connections from {} processes",
        kind.name(),
        c.procs
    );
    println!(
        "  rate               {:>10.0} handshake-completed connections/s",
        rate
    );
    println!(
        "  server CPU         {:>10.2} µs per connection",
        cpu_per_conn
    );
    println!("  RSS empty          {:>10} KiB", rss0 / 1024);
    println!("  RSS at {conns:<6}      {:>10} KiB", rss1 / 1024);
    println!("  RSS per connection {:>10.0} bytes", per);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn fanout(
    c: &Common,
    kind: Kind,
    subs: usize,
    messages: usize,
    size: usize,
    window: usize,
    rate: u64,
    room: Option<&str>,
) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let (mut kids, _, _) = open(c, kind, subs, pid)?;
    if let Some(r) = room {
        // Bind every subscriber's device to the room, 10,000 ids per request.
        let ids: Vec<String> = kids
            .iter()
            .flat_map(|k| (0..k.conns).map(move |j| format!("{}{j}", k.prefix)))
            .collect();
        let mut ka = KeepAlive::new(&c.api)?;
        for chunk in ids.chunks(10_000) {
            ka.post(
                &format!("/v1/rooms/{}/{r}/members", c.app),
                json!({ "device_ids": chunk }).to_string().as_bytes(),
            )?;
        }
    }
    reset(&mut kids)?;
    let cpu0 = cpu_us(pid)?;
    let t0 = Instant::now();
    let path = match room {
        Some(r) => format!("/v1/push/room/{}/{r}?payload_type=text", c.app),
        None => format!("/v1/push/broadcast/{}?payload_type=text", c.app),
    };
    let w = window.max(1);
    let mut senders = vec![];
    for (s, share) in spread(messages, w).into_iter().enumerate() {
        let (api, path) = (c.api.clone(), path.clone());
        senders.push(std::thread::spawn(move || -> Result<(), String> {
            let mut ka = KeepAlive::new(&api)?;
            for i in 0..share {
                if rate > 0 {
                    // Pace globally: this sender's i-th message is due at its slot.
                    let due = t0 + Duration::from_secs_f64((i * w + s) as f64 / rate as f64);
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                ka.post(&path, &payload(size))?;
            }
            Ok(())
        }));
    }
    for s in senders {
        s.join().map_err(|_| "sender panicked")??;
    }
    let send_secs = t0.elapsed().as_secs_f64();
    let cmds: Vec<String> = kids
        .iter()
        .map(|k| format!("wait {}", k.conns * messages))
        .collect();
    let (received, hist, first_ns, last_ns) = collect(&mut kids, &cmds)?;
    let cpu = (cpu_us(pid)? - cpu0) as f64;
    let expected = (subs * messages) as u64;
    let span = last_ns.saturating_sub(first_ns) as f64 / 1e9;
    let msgs_per_s = if span > 0.0 {
        received as f64 / span
    } else {
        0.0
    };
    let v = json!({
        "scenario": "fanout", "transport": kind.name(), "room": room, "subs": subs, "broadcasts": messages, "payload": size,
        "window": window, "rate": rate, "expected": expected, "delivered": received, "lost": expected.saturating_sub(received),
        "msgs_per_s": msgs_per_s.round(), "send_s": round2(send_secs),
        "p50_us": hist.quantile(0.5), "p99_us": hist.quantile(0.99), "p999_us": hist.quantile(0.999), "max_us": hist.max,
        "server_cpu_us_per_msg": round3(cpu / received.max(1) as f64),
    });
    println!("{v}");
    println!("\n  fanout ({})  {messages} broadcasts × {subs} subscribers, {size}-byte payloads, window {window}", kind.name());
    println!(
        "  delivered          {received:>10} of {expected} ({} lost)",
        expected.saturating_sub(received)
    );
    println!("  throughput         {:>10.0} msg/s", msgs_per_s);
    println!(
        "  latency p50/p99/p999 {} / {} / {} µs (max {})",
        hist.quantile(0.5),
        hist.quantile(0.99),
        hist.quantile(0.999),
        hist.max
    );
    println!(
        "  server CPU         {:>10.3} µs per delivered message",
        cpu / received.max(1) as f64
    );
    Ok(())
}

fn echo(
    c: &Common,
    kind: Kind,
    conns: usize,
    rounds: usize,
    size: usize,
    service: i32,
) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let (mut kids, _, _) = open(c, kind, conns, pid)?;
    reset(&mut kids)?;
    let cpu0 = cpu_us(pid)?;
    let t0 = Instant::now();
    let cmds: Vec<String> = kids
        .iter()
        .map(|_| format!("echo {rounds} {size} {service}"))
        .collect();
    let (received, hist, _, _) = collect(&mut kids, &cmds)?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_us(pid)? - cpu0) as f64;
    let expected = (conns * rounds) as u64;
    let rts = received as f64 / secs;
    let v = json!({
        "scenario": "echo", "transport": kind.name(), "service": service, "conns": conns, "rounds": rounds, "payload": size,
        "expected": expected, "round_trips": received, "round_trips_per_s": rts.round(),
        "p50_us": hist.quantile(0.5), "p99_us": hist.quantile(0.99), "p999_us": hist.quantile(0.999), "max_us": hist.max,
        "server_cpu_us_per_round_trip": round3(cpu / received.max(1) as f64),
    });
    println!("{v}");
    println!("\n  echo ({})  {conns} connections × {rounds} round trips, {size}-byte messages, service {service}", kind.name());
    println!("  round trips        {received:>10} of {expected}");
    println!("  throughput         {:>10.0} round trips/s", rts);
    println!(
        "  latency p50/p99/p999 {} / {} / {} µs",
        hist.quantile(0.5),
        hist.quantile(0.99),
        hist.quantile(0.999)
    );
    println!(
        "  server CPU         {:>10.3} µs per round trip",
        cpu / received.max(1) as f64
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn unicast(
    c: &Common,
    conns: usize,
    pushes: usize,
    batch: usize,
    window: usize,
    size: usize,
    wait_ms: u64,
    ack: bool,
) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let (mut kids, _, _) = open(c, Kind::Tcp, conns, pid)?;
    let ids: Arc<Vec<String>> = Arc::new(
        kids.iter()
            .flat_map(|k| (0..k.conns).map(move |j| format!("{}{j}", k.prefix)))
            .collect(),
    );
    for k in kids.iter_mut() {
        k.say(if ack { "ack 1" } else { "ack 0" })?;
    }
    reset(&mut kids)?;
    let acked0 = metric(c, "longlink_acked_pushes_total")?;
    let cpu0 = cpu_us(pid)?;
    let t0 = Instant::now();
    let batches = pushes.div_ceil(batch.max(1));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = vec![];
    for _ in 0..window.max(1) {
        let (api, app, ids, next) = (c.api.clone(), c.app.clone(), ids.clone(), next.clone());
        senders.push(std::thread::spawn(move || -> Result<Hist, String> {
            let mut ka = KeepAlive::new(&api)?;
            let mut hist = Hist::default();
            let path = if wait_ms > 0 {
                format!("/v1/push/batch?wait_ms={wait_ms}")
            } else {
                "/v1/push/batch".to_string()
            };
            let ack_field = if ack { ",\"ack\":1" } else { "" };
            let mut body = String::with_capacity(batch * 120);
            loop {
                let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if b >= batches {
                    return Ok(hist);
                }
                body.clear();
                body.push('[');
                for k in b * batch..((b + 1) * batch).min(pushes) {
                    if body.len() > 1 {
                        body.push(',');
                    }
                    let p = payload(size);
                    body.push_str(&format!(
                        "{{\"to\":\"device\",\"app\":\"{app}\",\"device_id\":\"{}\",\"payload\":\"{}\"{ack_field}}}",
                        ids[k % ids.len()],
                        std::str::from_utf8(&p).unwrap_or_default()
                    ));
                }
                body.push(']');
                let sent = Instant::now();
                let answer = ka.post(&path, body.as_bytes())?;
                hist.record(sent.elapsed().as_micros() as u64);
                if wait_ms > 0 && ack {
                    let v: serde_json::Value =
                        serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
                    let open: u64 = v["results"]
                        .as_array()
                        .map(|l| l.iter().map(|r| r["pending"].as_u64().unwrap_or(0)).sum())
                        .unwrap_or(0);
                    if open > 0 {
                        return Err(format!("a batch answered with {open} pushes pending"));
                    }
                }
            }
        }));
    }
    let mut batch_hist = Hist::default();
    for s in senders {
        let h = s.join().map_err(|_| "sender panicked")??;
        batch_hist.merge(&h.to_json());
    }
    let send_secs = t0.elapsed().as_secs_f64();
    // What each child's devices get: device g (in `ids` order) gets pushes/n, the first
    // pushes%n one more.
    let n = ids.len();
    let mut at = 0;
    let cmds: Vec<String> = kids
        .iter()
        .map(|k| {
            let want: usize = (at..at + k.conns)
                .map(|g| pushes / n + usize::from(g < pushes % n))
                .sum();
            at += k.conns;
            format!("wait {want}")
        })
        .collect();
    let (received, hist, first_ns, last_ns) = collect(&mut kids, &cmds)?;
    // Acknowledged: the gateway has processed every client's ACK.
    let want_acked = acked0 + if ack { pushes as f64 } else { 0.0 };
    let end = Instant::now() + Duration::from_secs(30);
    let mut acked = metric(c, "longlink_acked_pushes_total")?;
    while acked < want_acked && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(2));
        acked = metric(c, "longlink_acked_pushes_total")?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_us(pid)? - cpu0) as f64;
    let acked = (acked - acked0) as u64;
    let span = last_ns.saturating_sub(first_ns) as f64 / 1e9;
    let rate = if ack {
        acked as f64 / secs
    } else {
        received as f64 / span.max(1e-9)
    };
    let v = json!({
        "scenario": "unicast", "conns": conns, "pushes": pushes, "batch": batch, "window": window, "payload": size,
        "ack": ack, "wait_ms": wait_ms, "delivered": received, "lost": (pushes as u64).saturating_sub(received), "acked": acked,
        "acked_per_s": if ack { rate.round() } else { 0.0 }, "delivered_per_s": (received as f64 / span.max(1e-9)).round(),
        "send_s": round2(send_secs), "total_s": round2(secs),
        "p50_us": hist.quantile(0.5), "p99_us": hist.quantile(0.99), "p999_us": hist.quantile(0.999), "max_us": hist.max,
        "batch_p50_us": batch_hist.quantile(0.5), "batch_p99_us": batch_hist.quantile(0.99),
        "server_cpu_us_per_push": round3(cpu / pushes.max(1) as f64),
    });
    println!("{v}");
    println!(
        "\n  unicast  {pushes} pushes{} in batches of {batch} to {conns} devices, window {window}{}",
        if ack { " (ack=1)" } else { "" },
        if wait_ms > 0 { format!(", wait_ms {wait_ms}") } else { String::new() }
    );
    println!(
        "  delivered          {received:>10} of {pushes} ({} lost)",
        (pushes as u64).saturating_sub(received)
    );
    if ack {
        println!(
            "  acknowledged       {acked:>10} in {secs:.2} s: {rate:.0} acknowledged pushes/s"
        );
    } else {
        println!("  throughput         {rate:>10.0} pushes/s");
    }
    println!(
        "  push latency p50/p99/p999 {} / {} / {} µs (API send → client)",
        hist.quantile(0.5),
        hist.quantile(0.99),
        hist.quantile(0.999)
    );
    println!(
        "  batch answer p50/p99 {} / {} µs{}",
        batch_hist.quantile(0.5),
        batch_hist.quantile(0.99),
        if wait_ms > 0 {
            " (after every ACK)"
        } else {
            ""
        }
    );
    println!(
        "  server CPU         {:>10.3} µs per push",
        cpu / pushes.max(1) as f64
    );
    if ack && acked < pushes as u64 {
        return Err(format!("only {acked} of {pushes} pushes were acknowledged"));
    }
    Ok(())
}

fn room_memory(c: &Common, members: usize, rooms: usize) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let tag = format!("m{}-", std::process::id());
    let ids: Vec<String> = (0..members)
        .map(|i| format!("{tag}device-{i:08}"))
        .collect();
    let mut ka = KeepAlive::new(&c.api)?;
    let each = |ka: &mut KeepAlive, method: &str| -> Result<f64, String> {
        let t0 = Instant::now();
        for r in 0..rooms {
            for chunk in ids.chunks(10_000) {
                let path = format!("/v1/rooms/{}/{tag}room-{r}/members", c.app);
                let body = json!({ "device_ids": chunk }).to_string();
                if method == "POST" {
                    ka.post(&path, body.as_bytes())?;
                } else {
                    let (st, b) = http(&c.api, "DELETE", &path, body.as_bytes())?;
                    if st != 200 {
                        return Err(format!(
                            "DELETE {path}: {st} {}",
                            String::from_utf8_lossy(&b)
                        ));
                    }
                }
            }
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    let rss0 = rss(pid)?;
    let bind_s = each(&mut ka, "POST")?;
    let rss1 = rss(pid)?;
    let (st, b) = http(
        &c.api,
        "GET",
        &format!("/v1/rooms/{}/{tag}room-0", c.app),
        b"",
    )?;
    let info: serde_json::Value = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
    if st != 200 || info["member_count"].as_u64() != Some(members as u64) {
        return Err(format!(
            "room info: {st} member_count {}",
            info["member_count"]
        ));
    }
    let unbind_s = each(&mut ka, "DELETE")?;
    let rss2 = rss(pid)?;
    let per = (rss1 as f64 - rss0 as f64) / (members * rooms) as f64;
    let v = json!({
        "scenario": "rooms", "members": members, "rooms": rooms,
        "rss_before_kib": rss0 / 1024, "rss_bound_kib": rss1 / 1024, "rss_unbound_kib": rss2 / 1024,
        "rss_per_membership_bytes": per.round(),
        "bind_per_s": ((members * rooms) as f64 / bind_s).round(), "unbind_per_s": ((members * rooms) as f64 / unbind_s).round(),
    });
    println!("{v}");
    println!("\n  rooms  {members} members × {rooms} room(s)");
    println!("  RSS before         {:>10} KiB", rss0 / 1024);
    println!("  RSS bound          {:>10} KiB", rss1 / 1024);
    println!("  RSS per membership {per:>10.0} bytes");
    println!("  RSS after unbind   {:>10} KiB", rss2 / 1024);
    println!(
        "  bind / unbind      {:>10.0} / {:.0} memberships/s",
        (members * rooms) as f64 / bind_s,
        (members * rooms) as f64 / unbind_s
    );
    Ok(())
}

fn bare_echo(listen: &str) -> Result<(), String> {
    let addr: SocketAddr = listen.parse().map_err(|e| format!("{listen}: {e}"))?;
    let mut l = mio::net::TcpListener::bind(addr).map_err(|e| e.to_string())?;
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    poll.registry()
        .register(&mut l, Token(usize::MAX), Interest::READABLE)
        .map_err(|e| e.to_string())?;
    println!(
        "{}",
        json!({"event": "listening", "addr": listen, "pid": std::process::id()})
    );
    let mut conns: Vec<Option<MioStream>> = vec![];
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        poll.poll(&mut events, None).map_err(|e| e.to_string())?;
        for ev in events.iter() {
            if ev.token() == Token(usize::MAX) {
                while let Ok((mut s, _)) = l.accept() {
                    let _ = s.set_nodelay(true);
                    let t = Token(conns.len());
                    poll.registry()
                        .register(&mut s, t, Interest::READABLE)
                        .map_err(|e| e.to_string())?;
                    conns.push(Some(s));
                }
                continue;
            }
            let Some(s) = conns[ev.token().0].as_mut() else {
                continue;
            };
            // Same reading rule as the gateway: a short read means drained (edge-triggered).
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        conns[ev.token().0] = None;
                        break;
                    }
                    Ok(n) => {
                        let _ = s.write_all(&buf[..n]);
                        if n < buf.len() {
                            break;
                        }
                    }
                }
            }
        }
    }
}

fn longpoll(c: &Common, waiters: usize, window: usize) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let rss0 = rss(pid)?;
    let (mut kids, _, _) = open(c, Kind::Poll, waiters, pid)?;
    // Every request is parked before the sets begin.
    let end = Instant::now() + Duration::from_secs(60);
    while metric(c, "longlink_poll_waiters")? < waiters as f64 {
        if Instant::now() > end {
            return Err("the waiters never all arrived".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss1 = rss(pid)?;
    reset(&mut kids)?;
    let cpu0 = cpu_us(pid)?;
    let t0 = Instant::now();
    // The value is the set's send time: the waiter's latency is set → answer.
    let paths: Vec<String> = kids
        .iter()
        .flat_map(|k| (0..k.conns).map(move |j| format!("/v1/status/{}{j}", k.prefix)))
        .collect();
    let poster = {
        let api = c.api.clone();
        std::thread::spawn(move || post_all(&api, window, paths))
    };
    let cmds: Vec<String> = kids.iter().map(|k| format!("wait {}", k.conns)).collect();
    let (received, hist, _, _) = collect(&mut kids, &cmds)?;
    poster.join().map_err(|_| "poster panicked")??;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_us(pid)? - cpu0) as f64;
    let per = (rss1 as f64 - rss0 as f64) / waiters as f64;
    let v = json!({
        "scenario": "longpoll", "waiters": waiters, "window": window, "released": received,
        "lost": (waiters as u64).saturating_sub(received), "releases_per_s": (received as f64 / secs).round(),
        "p50_us": hist.quantile(0.5), "p99_us": hist.quantile(0.99), "p999_us": hist.quantile(0.999), "max_us": hist.max,
        "server_cpu_us_per_release": round3(cpu / received.max(1) as f64), "rss_per_waiter_bytes": per.round(),
    });
    println!("{v}");
    println!(
        "\n  longpoll  {waiters} waiters, each released by its own set ({window} API callers)"
    );
    println!("  released           {received:>10} of {waiters}");
    println!(
        "  throughput         {:>10.0} releases/s",
        received as f64 / secs
    );
    println!(
        "  latency p50/p99/p999 {} / {} / {} µs (set sent → answer read)",
        hist.quantile(0.5),
        hist.quantile(0.99),
        hist.quantile(0.999)
    );
    println!(
        "  server CPU         {:>10.3} µs per set + release",
        cpu / received.max(1) as f64
    );
    println!("  RSS per waiter     {:>10.0} bytes", per);
    Ok(())
}

/// `longlink-bench backend`: the bundled minimal upstream backend.
fn backend(listen: &str) -> Result<(), String> {
    let l = std::net::TcpListener::bind(listen).map_err(|e| format!("listen {listen}: {e}"))?;
    eprintln!(
        "backend listening on {}",
        l.local_addr().map_err(|e| e.to_string())?
    );
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = Vec::with_capacity(8192);
            let mut chunk = [0u8; 8192];
            loop {
                // One request: the head, then Content-Length bytes.
                let (end, len) = loop {
                    if let Some(m) = http_message(&buf) {
                        break m;
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let body: serde_json::Value =
                    serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap_or_default();
                let answer = serde_json::to_vec(
                    &json!({"payload": body["payload"], "payload_type": "text"}),
                )
                .unwrap_or_default();
                buf.drain(..end + 4 + len);
                let mut resp = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", answer.len()).into_bytes();
                resp.extend_from_slice(&answer);
                if s.write_all(&resp).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A payload of `size` bytes starting with the send time in decimal nanoseconds (text, so the
/// same payload works over raw WebSocket).
fn payload(size: usize) -> Vec<u8> {
    let mut p = format!("{:020}", now_ns()).into_bytes();
    p.resize(size.max(20), b'.');
    p
}

fn sent_at(p: &[u8]) -> Option<u64> {
    std::str::from_utf8(p.get(..20)?).ok()?.parse().ok()
}

/// Log-linear latency histogram in µs: 16 sub-buckets per power of two (≤ 6.25% error).
struct Hist {
    counts: Vec<u64>,
    max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; 64 * 16],
            max: 0,
        }
    }
}

impl Hist {
    fn bucket(v: u64) -> usize {
        if v < 16 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros() as usize; // ≥ 4
        let sub = ((v >> (e - 4)) & 15) as usize;
        (e - 3) * 16 + sub
    }

    fn lower(b: usize) -> u64 {
        if b < 16 {
            return b as u64;
        }
        let e = b / 16 + 3;
        let sub = (b % 16) as u64;
        (1 << e) | (sub << (e - 4))
    }

    fn record(&mut self, v: u64) {
        self.counts[Self::bucket(v)] += 1;
        self.max = self.max.max(v);
    }

    fn quantile(&self, q: f64) -> u64 {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * q).ceil() as u64;
        let mut acc = 0;
        for (b, &n) in self.counts.iter().enumerate() {
            acc += n;
            if acc >= want {
                return Self::lower(b);
            }
        }
        self.max
    }

    fn to_json(&self) -> serde_json::Value {
        let sparse: Vec<[u64; 2]> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(b, &n)| [b as u64, n])
            .collect();
        json!({"buckets": sparse, "max": self.max})
    }

    fn merge(&mut self, v: &serde_json::Value) {
        for pair in v["buckets"].as_array().into_iter().flatten() {
            let (b, n) = (
                pair[0].as_u64().unwrap_or(0) as usize,
                pair[1].as_u64().unwrap_or(0),
            );
            if b < self.counts.len() {
                self.counts[b] += n;
            }
        }
        self.max = self.max.max(v["max"].as_u64().unwrap_or(0));
    }
}

// ---- the child process ------------------------------------------------------------------

#[derive(PartialEq)]
enum St {
    Connecting,
    /// Handshake sent (HELLO, upgrade request), answer awaited.
    Hello,
    Ready,
    Dead,
}

struct Conn {
    s: MioStream,
    st: St,
    buf: Vec<u8>,
    /// Echo round trips left to send.
    rounds: usize,
}

/// A masked client WebSocket frame (the mask is fixed: the bench does not need secrecy).
fn ws_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    longlink::ws::encode_client_frame(out, true, opcode, [0x12, 0x34, 0x56, 0x78], payload);
}

/// One server WebSocket frame from the front of `buf`: (opcode, payload range, used).
fn ws_next(buf: &[u8]) -> Option<(u8, std::ops::Range<usize>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (buf.len() >= at + len).then(|| (buf[0] & 0x0f, at..at + len, at + len))
}

/// What one child process holds and counts.
struct Load {
    kind: Kind,
    hist: Hist,
    received: u64,
    first_ns: u64,
    last_ns: u64,
    last_progress: Instant,
    echo_size: usize,
    service: i32,
    /// ACK every push that has a seqid (the unicast scenario).
    ack: bool,
}

impl Load {
    fn record(&mut self, sent: u64, now: u64) {
        self.received += 1;
        self.last_progress = Instant::now();
        if self.first_ns == 0 {
            self.first_ns = now;
        }
        self.last_ns = now;
        self.hist.record(now.saturating_sub(sent) / 1000);
    }

    /// The next echo message for a connection.
    fn echo_msg(&self, seq: u64) -> Vec<u8> {
        let mut out = vec![];
        match self.kind {
            Kind::Tcp => {
                let f = Frame {
                    seqid: seq,
                    service: self.service,
                    method: 1,
                    payload: payload(self.echo_size).into(),
                    ..Default::default()
                };
                codec::encode_tcp(&f, &mut out);
            }
            _ => ws_frame(0x1, &payload(self.echo_size), &mut out),
        }
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn child(
    kind: Kind,
    addr: &str,
    source: std::net::Ipv4Addr,
    n: usize,
    concurrency: usize,
    app: &str,
    token: &str,
    prefix: &str,
) -> Result<(), String> {
    let target: SocketAddr = addr.parse().map_err(|e| format!("--addr {addr}: {e}"))?;
    let (tx, cmds) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in std::io::stdin().lock().lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
        let _ = tx.send("quit".into());
    });
    let out = |s: String| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    };
    out("spawned {}".into());

    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(4096);
    let mut conns: Vec<Conn> = Vec::with_capacity(n);
    let mut scratch = vec![0u8; 1 << 16];
    let (mut ok, mut failed, mut pending) = (0usize, 0usize, 0usize);
    let mut connecting = false;
    let mut load = Load {
        kind,
        hist: Hist::default(),
        received: 0,
        first_ns: 0,
        last_ns: 0,
        last_progress: Instant::now(),
        echo_size: 64,
        service: 1,
        ack: false,
    };
    let mut wait_for: Option<(u64, Instant)> = None;
    let mut last_ping = Instant::now();
    let mut ping_seq = 1u64;

    loop {
        while let Ok(cmd) = cmds.try_recv() {
            let mut parts = cmd.split_whitespace();
            match parts.next() {
                Some("connect") => connecting = true,
                Some("ack") => load.ack = parts.next() == Some("1"),
                Some("reset") => {
                    load.hist = Hist::default();
                    (load.received, load.first_ns, load.last_ns) = (0, 0, 0);
                    out("reset {}".into());
                }
                Some("wait") => {
                    let want: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    wait_for = Some((want, Instant::now()));
                }
                Some("echo") => {
                    let rounds: usize = parts.next().and_then(|v| v.parse().ok()).unwrap_or(1);
                    load.echo_size = parts.next().and_then(|v| v.parse().ok()).unwrap_or(64);
                    load.service = parts.next().and_then(|v| v.parse().ok()).unwrap_or(1);
                    let mut started = 0u64;
                    for c in conns.iter_mut().filter(|c| c.st == St::Ready) {
                        c.rounds = rounds - 1;
                        let _ = c.s.write(&load.echo_msg(1));
                        started += 1;
                    }
                    wait_for = Some((started * rounds as u64, Instant::now()));
                }
                Some("quit") | None => return Ok(()),
                Some(other) => out(format!("error unknown command {other}")),
            }
        }
        while connecting && conns.len() < n && pending < concurrency {
            let i = conns.len();
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .map_err(|e| e.to_string())?;
            sock.set_nonblocking(true).map_err(|e| e.to_string())?;
            sock.set_nodelay(true).map_err(|e| e.to_string())?;
            // Let connect() pick the port by the whole 4-tuple; bind(ip:0) alone would reserve
            // a port per socket and search past TIME_WAIT ones, slowing repeated runs.
            let one: libc::c_int = 1;
            // SAFETY: setsockopt on our own socket with a correctly sized int.
            unsafe {
                use std::os::fd::AsRawFd;
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    4,
                );
            }
            sock.bind(&SocketAddr::new(source.into(), 0).into())
                .map_err(|e| format!("bind {source}: {e}"))?;
            match sock.connect(&target.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(format!("connect: {e}")),
            }
            let mut s = MioStream::from_std(sock.into());
            poll.registry()
                .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)
                .map_err(|e| e.to_string())?;
            conns.push(Conn {
                s,
                st: St::Connecting,
                buf: Vec::new(),
                rounds: 0,
            });
            pending += 1;
        }
        if connecting && ok + failed == n {
            connecting = false;
            out(format!("connected {}", json!({"ok": ok, "failed": failed})));
        }
        if let Some((want, since)) = wait_for {
            let stalled = load.last_progress.elapsed() > Duration::from_secs(3)
                && since.elapsed() > Duration::from_secs(3);
            if load.received >= want || stalled {
                wait_for = None;
                let s = json!({"received": load.received, "first_ns": load.first_ns, "last_ns": load.last_ns, "hist": load.hist.to_json()});
                out(format!("stats {s}"));
            }
        }
        // Keep idle connections alive past the gateway's read timeout (WebSocket: the
        // gateway pings and the pong below answers).
        if kind == Kind::Tcp && !connecting && last_ping.elapsed() > Duration::from_secs(10) {
            last_ping = Instant::now();
            ping_seq += 1;
            let mut b = vec![];
            codec::encode_tcp(&Frame::control(method::PING, ping_seq, &[]), &mut b);
            for c in conns.iter_mut().filter(|c| c.st == St::Ready) {
                let _ = c.s.write(&b);
            }
        }
        poll.poll(&mut events, Some(Duration::from_millis(5)))
            .map_err(|e| e.to_string())?;
        for ev in events.iter() {
            let i = ev.token().0;
            let c = &mut conns[i];
            if c.st == St::Connecting && (ev.is_writable() || ev.is_error()) {
                if ev.is_error() || c.s.peer_addr().is_err() {
                    c.st = St::Dead;
                    failed += 1;
                    pending -= 1;
                    continue;
                }
                let device = format!("{prefix}{i}");
                let b = match kind {
                    Kind::Tcp => {
                        let mut b = vec![];
                        let hello = Frame::control(method::HELLO, 1, &[("app_id", app), ("device_id", &device), ("token", token)]);
                        codec::encode_tcp(&hello, &mut b);
                        b
                    }
                    Kind::Ws => format!(
                        "GET /ws?app_id={app}&device_id={device}&token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                    )
                    .into_bytes(),
                    Kind::Poll => format!("GET /poll/status?key={device}&timeout=120 HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes(),
                };
                if c.s.write(&b).map(|w| w == b.len()).unwrap_or(false) {
                    // Writable interest is no longer needed.
                    let _ = poll
                        .registry()
                        .reregister(&mut c.s, Token(i), Interest::READABLE);
                    if kind == Kind::Poll {
                        // A waiter is "connected" once its request is out; the parent waits
                        // for the gateway's waiter gauge.
                        c.st = St::Ready;
                        ok += 1;
                        pending -= 1;
                    } else {
                        c.st = St::Hello;
                    }
                } else {
                    c.st = St::Dead;
                    failed += 1;
                    pending -= 1;
                }
            }
            if !(ev.is_readable() || ev.is_read_closed())
                || c.st == St::Dead
                || c.st == St::Connecting
            {
                continue;
            }
            loop {
                match c.s.read(&mut scratch) {
                    Ok(0) => {
                        if c.st == St::Hello {
                            failed += 1;
                            pending -= 1;
                        }
                        c.st = St::Dead;
                        break;
                    }
                    Ok(k) => {
                        c.buf.extend_from_slice(&scratch[..k]);
                        let now = now_ns();
                        let mut reply: Vec<u8> = vec![];
                        let mut at = 0;
                        match kind {
                            Kind::Tcp => {
                                while let Ok(Some((body, used))) =
                                    codec::decode_tcp(&c.buf[at..], codec::MAX_TCP_FRAME)
                                {
                                    at += used;
                                    let Ok(f) = Frame::decode(body) else { continue };
                                    if f.service == 0
                                        && f.method == method::HELLO
                                        && c.st == St::Hello
                                    {
                                        c.st = St::Ready;
                                        ok += 1;
                                        pending -= 1;
                                    } else if f.service != 0 || f.method == method::PUSH {
                                        // An answer from the service (its ACK is skipped) or a push.
                                        load.record(sent_at(&f.payload).unwrap_or(now), now);
                                        if f.service != 0 && c.rounds > 0 {
                                            c.rounds -= 1;
                                            reply.extend(load.echo_msg(f.seqid + 1));
                                        }
                                        if load.ack && f.method == method::PUSH && f.seqid != 0 {
                                            let a = Frame::control(method::ACK, f.seqid, &[]);
                                            codec::encode_tcp(&a, &mut reply);
                                        }
                                    } else if f.method == method::ERROR {
                                        out(format!("error gateway said {:?}", f.headers));
                                    }
                                }
                            }
                            Kind::Ws => {
                                if c.st == St::Hello {
                                    let Some(end) = c.buf.windows(4).position(|w| w == b"\r\n\r\n")
                                    else {
                                        continue;
                                    };
                                    if !c.buf.starts_with(b"HTTP/1.1 101") {
                                        out(format!(
                                            "error upgrade refused: {}",
                                            String::from_utf8_lossy(&c.buf[..end])
                                        ));
                                        failed += 1;
                                        pending -= 1;
                                        c.st = St::Dead;
                                        break;
                                    }
                                    c.st = St::Ready;
                                    ok += 1;
                                    pending -= 1;
                                    at = end + 4;
                                }
                                while let Some((op, range, used)) = ws_next(&c.buf[at..]) {
                                    let p = &c.buf[at + range.start..at + range.end];
                                    match op {
                                        0x1 | 0x2 => {
                                            load.record(sent_at(p).unwrap_or(now), now);
                                            if c.rounds > 0 {
                                                c.rounds -= 1;
                                                reply.extend(load.echo_msg(0));
                                            }
                                        }
                                        0x9 => ws_frame(0xA, p, &mut reply),
                                        _ => {}
                                    }
                                    at += used;
                                }
                            }
                            Kind::Poll => {
                                // One answer per waiter: the body's data is the set's send time.
                                if let Some((end, len)) = http_message(&c.buf) {
                                    let body: serde_json::Value =
                                        serde_json::from_slice(&c.buf[end + 4..end + 4 + len])
                                            .unwrap_or_default();
                                    let sent = body["data"].as_u64().or_else(|| {
                                        body["data"].as_str().and_then(|s| sent_at(s.as_bytes()))
                                    });
                                    if body["code"] == 0 {
                                        load.record(sent.unwrap_or(now), now);
                                    }
                                    at = end + 4 + len;
                                }
                            }
                        }
                        c.buf.drain(..at);
                        if !reply.is_empty() {
                            let _ = c.s.write(&reply);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        if c.st == St::Hello {
                            failed += 1;
                            pending -= 1;
                        }
                        c.st = St::Dead;
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Hist;

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = Hist::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        for (q, want) in [(0.5, 5000.0), (0.99, 9900.0), (0.999, 9990.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.07, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.max, 10_000);
    }
}
