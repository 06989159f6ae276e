//! longlink-bench: drives a running gateway over real sockets (DESIGN.md §9).
//!
//! One process can hold at most ~20,000 files here, so the load comes from several child
//! processes (this same binary, `child` subcommand), each from its own 127.0.0.x source
//! address. The parent coordinates them over stdin/stdout lines, and reads the gateway's CPU
//! time (`/proc/PID/stat`) and RSS (`/proc/PID/statm`) before and after each scenario, so the
//! results do not depend on how fast the load generator is.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
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

#[derive(clap::Args, Clone)]
struct Common {
    /// Gateway client TCP address.
    #[arg(long, default_value = "127.0.0.1:7100")]
    tcp: String,
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
    },
    /// Internal: one load-generating process (driven by the parent over stdin/stdout).
    #[command(hide = true)]
    Child {
        #[arg(long)]
        tcp: String,
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
            conns,
            settle_ms,
        } => connect(&c, conns, settle_ms),
        Cmd::Fanout {
            c,
            subs,
            messages,
            size,
            window,
            rate,
        } => fanout(&c, subs, messages, size, window, rate),
        Cmd::Child {
            tcp,
            source,
            conns,
            concurrency,
            app,
            token,
            prefix,
        } => child(&tcp, source, conns, concurrency, &app, &token, &prefix),
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
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).map_err(|e| e.to_string())?;
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    if !head.starts_with("HTTP/1.1 200") {
                        return Err(format!(
                            "API answered: {}",
                            String::from_utf8_lossy(&self.buf)
                        ));
                    }
                    let body = self.buf[end + 4..end + 4 + len].to_vec();
                    self.buf.drain(..end + 4 + len);
                    return Ok(body);
                }
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

// ---- children --------------------------------------------------------------------------

struct Kid {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Kid {
    fn spawn(c: &Common, i: usize, conns: usize) -> Result<Kid, String> {
        let ip = u32::from(c.source) + i as u32;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args([
                "child",
                "--tcp",
                &c.tcp,
                "--conns",
                &conns.to_string(),
                "--concurrency",
                &c.concurrency.to_string(),
            ])
            .args([
                "--source",
                &std::net::Ipv4Addr::from(ip).to_string(),
                "--app",
                &c.app,
                "--token",
                &c.token,
            ])
            .args(["--prefix", &format!("b{}-{i}-", std::process::id())])
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

/// Starts the children and has them connect; returns them with the connect phase's numbers.
fn open(c: &Common, total: usize, pid: u32) -> Result<(Vec<Kid>, f64, f64), String> {
    let mut kids = vec![];
    for (i, n) in spread(total, c.procs).into_iter().enumerate() {
        kids.push(Kid::spawn(c, i, n)?);
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
    eprintln!("connected {total} in {secs:.2} s");
    Ok((kids, total as f64 / secs, cpu / total as f64))
}

fn connect(c: &Common, conns: usize, settle_ms: u64) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let rss0 = rss(pid)?;
    let (kids, rate, cpu_per_conn) = open(c, conns, pid)?;
    std::thread::sleep(Duration::from_millis(settle_ms));
    let rss1 = rss(pid)?;
    let per = (rss1 as f64 - rss0 as f64) / conns as f64;
    drop(kids);
    let v = json!({
        "scenario": "connect", "transport": "tcp", "conns": conns, "procs": c.procs,
        "rate_per_s": rate.round(), "server_cpu_us_per_conn": round2(cpu_per_conn),
        "rss_empty_kib": rss0 / 1024, "rss_kib": rss1 / 1024, "rss_per_conn_bytes": per.round(),
    });
    println!("{v}");
    println!(
        "\n  connect (tcp)  {conns} connections from {} processes",
        c.procs
    );
    println!(
        "  rate               {:>10.0} HELLO-completed connections/s",
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

fn fanout(
    c: &Common,
    subs: usize,
    messages: usize,
    size: usize,
    window: usize,
    rate: u64,
) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let (mut kids, _, _) = open(c, subs, pid)?;
    for k in kids.iter_mut() {
        k.say("reset")?;
    }
    for k in kids.iter_mut() {
        k.expect("reset", Duration::from_secs(10))?;
    }
    let cpu0 = cpu_us(pid)?;
    let t0 = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let path = format!("/v1/push/broadcast/{}?payload_type=text", c.app);
    let mut senders = vec![];
    for w in 0..window.max(1) {
        let (api, path, sent, failed) = (c.api.clone(), path.clone(), sent.clone(), failed.clone());
        let share = spread(messages, window.max(1))[w];
        senders.push(std::thread::spawn(move || -> Result<(), String> {
            let mut ka = KeepAlive::new(&api)?;
            for i in 0..share {
                if rate > 0 {
                    // Pace globally: this sender's i-th message is due at its slot in the schedule.
                    let slot = (i * window.max(1) + w) as f64 / rate as f64;
                    let due = t0 + Duration::from_secs_f64(slot);
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                let body = payload(size);
                if let Err(e) = ka.post(&path, &body) {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    for s in senders {
        s.join().map_err(|_| "sender panicked")??;
    }
    let send_secs = t0.elapsed().as_secs_f64();
    // Wait until every child has everything (or stops making progress).
    let expected_per_kid: Vec<u64> = spread(subs, c.procs)
        .iter()
        .map(|&n| (n * messages) as u64)
        .collect();
    let mut stats = vec![];
    for (k, &want) in kids.iter_mut().zip(&expected_per_kid) {
        k.say(&format!("wait {want}"))?;
    }
    for k in kids.iter_mut() {
        stats.push(k.expect("stats", Duration::from_secs(120))?);
    }
    let cpu = (cpu_us(pid)? - cpu0) as f64;
    let received: u64 = stats
        .iter()
        .map(|s| s["received"].as_u64().unwrap_or(0))
        .sum();
    let last_ns = stats
        .iter()
        .filter_map(|s| s["last_ns"].as_u64())
        .max()
        .unwrap_or(0);
    let first_ns = stats
        .iter()
        .filter_map(|s| s["first_ns"].as_u64())
        .min()
        .unwrap_or(0);
    let mut hist = Hist::default();
    for s in &stats {
        hist.merge(&s["hist"]);
    }
    let expected = (subs * messages) as u64;
    let span = (last_ns.saturating_sub(first_ns)) as f64 / 1e9;
    let msgs_per_s = if span > 0.0 {
        received as f64 / span
    } else {
        0.0
    };
    let v = json!({
        "scenario": "fanout", "transport": "tcp", "subs": subs, "broadcasts": messages, "payload": size,
        "window": window, "rate": rate, "expected": expected, "delivered": received, "lost": expected.saturating_sub(received),
        "msgs_per_s": msgs_per_s.round(), "send_s": round2(send_secs),
        "p50_us": hist.quantile(0.5), "p99_us": hist.quantile(0.99), "p999_us": hist.quantile(0.999), "max_us": hist.max,
        "server_cpu_us_per_msg": round3(cpu / received.max(1) as f64),
    });
    println!("{v}");
    println!("\n  fanout (tcp)  {messages} broadcasts × {subs} subscribers, {size}-byte payloads, window {window}");
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
    Hello,
    Ready,
    Dead,
}

struct Conn {
    s: MioStream,
    st: St,
    buf: Vec<u8>,
}

fn child(
    tcp: &str,
    source: std::net::Ipv4Addr,
    n: usize,
    concurrency: usize,
    app: &str,
    token: &str,
    prefix: &str,
) -> Result<(), String> {
    let target: SocketAddr = tcp.parse().map_err(|e| format!("--tcp {tcp}: {e}"))?;
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
    let mut hist = Hist::default();
    let (mut received, mut first_ns, mut last_ns) = (0u64, 0u64, 0u64);
    let mut wait_for: Option<(u64, Instant)> = None;
    let mut last_progress = Instant::now();
    let mut last_ping = Instant::now();
    let mut ping_seq = 1u64;

    loop {
        // Commands from the parent.
        while let Ok(cmd) = cmds.try_recv() {
            let mut parts = cmd.split_whitespace();
            match parts.next() {
                Some("connect") => connecting = true,
                Some("reset") => {
                    hist = Hist::default();
                    (received, first_ns, last_ns) = (0, 0, 0);
                    out("reset {}".into());
                }
                Some("wait") => {
                    let want: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    wait_for = Some((want, Instant::now()));
                }
                Some("quit") | None => return Ok(()),
                Some(other) => out(format!("error unknown command {other}")),
            }
        }
        // Open more connections, keeping `concurrency` handshakes in flight.
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
            });
            pending += 1;
        }
        if connecting && ok + failed == n {
            connecting = false;
            out(format!("connected {}", json!({"ok": ok, "failed": failed})));
        }
        if let Some((want, since)) = wait_for {
            let stalled = last_progress.elapsed() > Duration::from_secs(3)
                && since.elapsed() > Duration::from_secs(3);
            if received >= want || stalled {
                wait_for = None;
                out(format!(
                    "stats {}",
                    json!({"received": received, "first_ns": first_ns, "last_ns": last_ns, "hist": hist.to_json()})
                ));
            }
        }
        // Keep idle connections alive past the gateway's read timeout.
        if !connecting && last_ping.elapsed() > Duration::from_secs(10) {
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
                let mut b = vec![];
                let hello = Frame::control(
                    method::HELLO,
                    1,
                    &[("app_id", app), ("device_id", &device), ("token", token)],
                );
                codec::encode_tcp(&hello, &mut b);
                if c.s.write(&b).map(|w| w == b.len()).unwrap_or(false) {
                    c.st = St::Hello;
                    // Writable interest is no longer needed.
                    let _ = poll
                        .registry()
                        .reregister(&mut c.s, Token(i), Interest::READABLE);
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
                        let now = now_ns();
                        let data: &[u8] = if c.buf.is_empty() {
                            &scratch[..k]
                        } else {
                            c.buf.extend_from_slice(&scratch[..k]);
                            &c.buf
                        };
                        let mut at = 0;
                        let mut frames = vec![];
                        while let Ok(Some((body, used))) =
                            codec::decode_tcp(&data[at..], codec::MAX_TCP_FRAME)
                        {
                            at += used;
                            if let Ok(f) = Frame::decode(body) {
                                frames.push(f);
                            }
                        }
                        let rest = data[at..].to_vec();
                        c.buf = rest;
                        for f in frames {
                            if f.service == 0 && f.method == method::HELLO && c.st == St::Hello {
                                c.st = St::Ready;
                                ok += 1;
                                pending -= 1;
                            } else if f.service == 0 && f.method == method::PUSH {
                                received += 1;
                                last_progress = Instant::now();
                                if first_ns == 0 {
                                    first_ns = now;
                                }
                                last_ns = now;
                                let sent: u64 =
                                    std::str::from_utf8(f.payload.get(..20).unwrap_or(b""))
                                        .ok()
                                        .and_then(|s| s.parse().ok())
                                        .unwrap_or(now);
                                hist.record(now.saturating_sub(sent) / 1000);
                            } else if f.method == method::ERROR {
                                out(format!("error gateway said {:?}", f.headers));
                            }
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
