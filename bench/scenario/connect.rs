//! `longlink-bench connect`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::kids::open;
use crate::util::{gateway_pid, round2, rss};
use crate::{Common, Kind};

pub(crate) fn connect(
    c: &Common,
    kind: Kind,
    conns: usize,
    settle_ms: u64,
    rounds: usize,
    floor: bool,
) -> Result<(), String> {
    if floor && kind != Kind::Tcp {
        return Err("--floor measures the TCP transport (bare-echo speaks TCP only)".into());
    }
    let pid = gateway_pid(c)?;
    // The floor: a bare-echo of our own, on a port the kernel picks, killed when done.
    let bare = if floor { Some(Bare::start()?) } else { None };
    let rss0 = rss(pid)?;
    let fds0 = fds(pid)?;
    let bare_fds0 = bare.as_ref().map(|b| fds(b.pid())).transpose()?;
    let mut opens = 0usize;
    let mut next = |target: &str, tpid: u32| {
        // Fresh source addresses for each set (from --source on), so that the client
        // side's TIME_WAIT sockets never run its ports short.
        let mut cc = c.clone();
        cc.source =
            std::net::Ipv4Addr::from(u32::from(c.source) + ((opens * c.procs) % 240) as u32);
        opens += 1;
        cc.tcp = target.to_string();
        open(&cc, kind, conns, tpid)
    };
    let (mut rates, mut cpus, mut floors) = (vec![], vec![], vec![]);
    let (mut rss1, mut per) = (0, 0.0);
    for round in 0..rounds.max(1) {
        // Interleaved, the order alternating, so that the machine's drift (this VM's
        // speed wanders by a third over minutes) falls on both alike.
        let gateway_first = round % 2 == 0;
        for gw in [gateway_first, !gateway_first] {
            if !gw {
                let Some(b) = &bare else { continue };
                settle(b.pid(), bare_fds0.unwrap_or(0), round)?;
                let (kids, _, cpu) = next(&b.addr, b.pid())?;
                drop(kids);
                floors.push(cpu);
                continue;
            }
            // Every connection of the last round closed on the server's side too (its
            // descriptors are back), so each round starts from the same state.
            settle(pid, fds0, round)?;
            let (kids, rate, cpu) = next(&c.tcp, pid)?;
            if round == 0 {
                std::thread::sleep(Duration::from_millis(settle_ms));
                rss1 = rss(pid)?;
                per = (rss1 as f64 - rss0 as f64) / conns as f64;
            }
            drop(kids);
            rates.push(rate);
            cpus.push(cpu);
        }
    }
    // Equal rounds: the mean per connection is the total CPU over all connections.
    let cpu_per_conn = cpus.iter().sum::<f64>() / cpus.len() as f64;
    let rate = rates.iter().sum::<f64>() / rates.len() as f64;
    let mut v = json!({
        "scenario": "connect", "transport": kind.name(), "conns": conns, "procs": c.procs,
        "rounds": cpus.len(), "round_cpu_us_per_conn": cpus.iter().map(|&x| round2(x)).collect::<Vec<_>>(),
        "rate_per_s": rate.round(), "server_cpu_us_per_conn": round2(cpu_per_conn),
        "rss_empty_kib": rss0 / 1024, "rss_kib": rss1 / 1024, "rss_per_conn_bytes": per.round(),
    });
    let ratio = (!floors.is_empty()).then(|| {
        let floor_per_conn = floors.iter().sum::<f64>() / floors.len() as f64;
        let mut ratios: Vec<f64> = cpus.iter().zip(&floors).map(|(g, f)| g / f).collect();
        ratios.sort_by(f64::total_cmp);
        let n = ratios.len();
        let median = (ratios[(n - 1) / 2] + ratios[n / 2]) / 2.0;
        v["floor_round_cpu_us_per_conn"] =
            json!(floors.iter().map(|&x| round2(x)).collect::<Vec<_>>());
        v["floor_cpu_us_per_conn"] = json!(round2(floor_per_conn));
        v["ratio"] = json!(round2(cpu_per_conn / floor_per_conn));
        v["median_round_ratio"] = json!(round2(median));
        (floor_per_conn, median)
    });
    println!("{v}");
    println!(
        "\n  connect ({})  {conns} connections from {} processes, {} round(s)",
        kind.name(),
        c.procs,
        cpus.len()
    );
    println!(
        "  rate               {:>10.0} handshake-completed connections/s",
        rate
    );
    println!(
        "  server CPU         {:>10.2} µs per connection",
        cpu_per_conn
    );
    if let Some((f, median)) = ratio {
        println!("  bare-echo CPU      {f:>10.2} µs per connection (the floor, same rounds; plain bare-echo: reading at accept costs it the same)");
        println!(
            "  ratio              {:>10.2}x the floor (median of rounds {median:.2}x)",
            cpu_per_conn / f
        );
        for (i, (g, f)) in cpus.iter().zip(&floors).enumerate() {
            println!(
                "    round {:<3} gateway {g:>6.2} µs  floor {f:>6.2} µs  {:.2}x",
                i + 1,
                g / f
            );
        }
    }
    println!("  (RSS from the first round)");
    println!("  RSS empty          {:>10} KiB", rss0 / 1024);
    println!("  RSS at {conns:<6}      {:>10} KiB", rss1 / 1024);
    println!("  RSS per connection {:>10.0} bytes", per);
    Ok(())
}

/// Waits until the server holds no more descriptors than at the start (+ a few).
fn settle(pid: u32, fds0: usize, round: usize) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(30);
    while fds(pid)? > fds0 + 8 {
        if Instant::now() > end {
            return Err(format!(
                "round {}: the server still holds the last round's connections",
                round + 1
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Descriptors the process holds.
fn fds(pid: u32) -> Result<usize, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))
}

/// A `bare-echo` child (this binary), killed on drop.
pub(crate) struct Bare {
    child: Child,
    pub(crate) addr: String,
}

impl Bare {
    pub(crate) fn start() -> Result<Bare, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = Command::new(exe)
            .args(["bare-echo", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn bare-echo: {e}"))?;
        // Owned from here: killed on any error below.
        let mut b = Bare {
            child,
            addr: String::new(),
        };
        let mut line = String::new();
        let out = b.child.stdout.take().ok_or("no stdout")?;
        // Its one line, the listening address; the pipe is closed after it (bare-echo
        // prints nothing more, so it never writes to the closed pipe).
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("bare-echo said {line:?}: {e}"))?;
        b.addr = v["addr"].as_str().ok_or("bare-echo: no addr")?.to_string();
        Ok(b)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
