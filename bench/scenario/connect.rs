//! `longlink-bench connect`.

use std::time::Duration;

use serde_json::json;

use crate::kids::open;
use crate::util::{gateway_pid, round2, rss};
use crate::{Common, Kind};

pub(crate) fn connect(c: &Common, kind: Kind, conns: usize, settle_ms: u64) -> Result<(), String> {
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
