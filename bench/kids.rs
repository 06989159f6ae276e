//! The parent's side of the load: child processes (this binary's `child` subcommand), each
//! holding its share of the connections from its own source address, driven over stdin and
//! stdout lines.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::util::{cpu_us, Hist};
use crate::{Common, Kind};

pub(crate) struct Kid {
    pub(crate) child: Child,
    pub(crate) stdin: ChildStdin,
    pub(crate) lines: mpsc::Receiver<String>,
    pub(crate) prefix: String,
    pub(crate) conns: usize,
}

impl Kid {
    pub(crate) fn spawn(c: &Common, kind: Kind, i: usize, conns: usize) -> Result<Kid, String> {
        let ip = u32::from(c.source) + i as u32;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let addr = match kind {
            Kind::Tcp => &c.tcp,
            Kind::TcpTls => &c.tcp_tls,
            Kind::Wss => &c.https,
            _ => &c.http,
        };
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
            .env("LONGLINK_BENCH_CA", &c.tls_ca)
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

    pub(crate) fn say(&mut self, cmd: &str) -> Result<(), String> {
        writeln!(self.stdin, "{cmd}").map_err(|e| format!("child gone: {e}"))
    }

    /// The next line that starts with `want` (progress lines are skipped).
    pub(crate) fn expect(
        &mut self,
        want: &str,
        within: Duration,
    ) -> Result<serde_json::Value, String> {
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

pub(crate) fn spread(total: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

/// Starts the children and has them connect; returns them with the connect phase's numbers
/// (rate per second, gateway CPU µs per connection).
pub(crate) fn open(
    c: &Common,
    kind: Kind,
    total: usize,
    pid: u32,
) -> Result<(Vec<Kid>, f64, f64), String> {
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
pub(crate) fn collect(kids: &mut [Kid], cmds: &[String]) -> Result<(u64, Hist, u64, u64), String> {
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

pub(crate) fn reset(kids: &mut [Kid]) -> Result<(), String> {
    for k in kids.iter_mut() {
        k.say("reset")?;
    }
    for k in kids.iter_mut() {
        k.expect("reset", Duration::from_secs(10))?;
    }
    Ok(())
}
