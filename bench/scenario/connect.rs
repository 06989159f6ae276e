//! `longlink-bench connect`.

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
) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let rss0 = rss(pid)?;
    let fds0 = fds(pid)?;
    let (kids, rate, cpu) = open(c, kind, conns, pid)?;
    std::thread::sleep(Duration::from_millis(settle_ms));
    let rss1 = rss(pid)?;
    let per = (rss1 as f64 - rss0 as f64) / conns as f64;
    drop(kids);
    let (mut rates, mut cpus) = (vec![rate], vec![cpu]);
    for round in 1..rounds.max(1) {
        // Every connection of the last round closed on the server's side too (its
        // descriptors are back), so each round starts from the same state.
        let end = Instant::now() + Duration::from_secs(30);
        while fds(pid)? > fds0 + 8 {
            if Instant::now() > end {
                return Err(format!(
                    "round {round}: the server still holds the last round's"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut cc = c.clone();
        // Fresh source addresses each round (127.0.0.2 ..), so that the client side's
        // TIME_WAIT sockets never run its ports short.
        let base = 2 + ((round * c.procs) % 240) as u32;
        cc.source = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::LOCALHOST) - 1 + base);
        let (kids, rate, cpu) = open(&cc, kind, conns, pid)?;
        drop(kids);
        rates.push(rate);
        cpus.push(cpu);
    }
    // Equal rounds: the mean per connection is the total CPU over all connections.
    let cpu_per_conn = cpus.iter().sum::<f64>() / cpus.len() as f64;
    let rate = rates.iter().sum::<f64>() / rates.len() as f64;
    let v = json!({
        "scenario": "connect", "transport": kind.name(), "conns": conns, "procs": c.procs,
        "rounds": cpus.len(), "round_cpu_us_per_conn": cpus.iter().map(|&x| round2(x)).collect::<Vec<_>>(),
        "rate_per_s": rate.round(), "server_cpu_us_per_conn": round2(cpu_per_conn),
        "rss_empty_kib": rss0 / 1024, "rss_kib": rss1 / 1024, "rss_per_conn_bytes": per.round(),
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
    println!("  (RSS from the first round)");
    println!("  RSS empty          {:>10} KiB", rss0 / 1024);
    println!("  RSS at {conns:<6}      {:>10} KiB", rss1 / 1024);
    println!("  RSS per connection {:>10.0} bytes", per);
    Ok(())
}

/// Descriptors the process holds.
fn fds(pid: u32) -> Result<usize, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))
}
