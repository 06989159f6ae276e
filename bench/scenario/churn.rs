//! `longlink-bench churn`: memory under connect/close churn. `--cycles` times, `--conns`
//! clients connect (and say HELLO), then all close; once the gateway has seen every close,
//! its RSS is read. Memory must level off: after the last cycle within 10% of after the
//! first. Each cycle connects from fresh 127.0.0.x source addresses, so the load generator's
//! TIME_WAIT sockets never run its ports short.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::kids::open;
use crate::util::{gateway_pid, metric, rss};
use crate::{Common, Kind};

pub(crate) fn churn(c: &Common, kind: Kind, conns: usize, cycles: usize) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let rss0 = rss(pid)?;
    let name = format!("longlink_connections{{transport=\"{}\"}}", kind.name());
    let mut after = vec![];
    let t0 = Instant::now();
    for cycle in 0..cycles {
        let mut cc = c.clone();
        // Source addresses 127.0.0.2 .. 127.0.0.241, `procs` per cycle, round and round.
        let base = 2 + ((cycle * c.procs) % 240) as u32;
        cc.source =
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(127, 0, 0, 0)) + base);
        let (kids, _, _) = open(&cc, kind, conns, pid)?;
        drop(kids);
        let end = Instant::now() + Duration::from_secs(30);
        while metric(c, &name)? > 0.0 {
            if Instant::now() > end {
                return Err(format!("cycle {cycle}: connections did not all close"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        after.push(rss(pid)?);
        if cycle % 10 == 9 {
            eprintln!(
                "churn: {} cycles, {} connections, RSS {} KiB",
                cycle + 1,
                (cycle + 1) * conns,
                after[cycle] / 1024
            );
        }
    }
    let (first, last) = (after[0], *after.last().expect("cycles > 0"));
    let peak = after.iter().copied().max().unwrap_or(0);
    let v = json!({
        "scenario": "churn", "transport": kind.name(), "conns": conns, "cycles": cycles,
        "connections_total": conns * cycles, "secs": (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "rss_empty_kib": rss0 / 1024, "rss_after_first_kib": first / 1024,
        "rss_after_last_kib": last / 1024, "rss_peak_between_kib": peak / 1024,
        "last_over_first": ((last as f64 / first as f64) * 1000.0).round() / 1000.0,
    });
    println!("{v}");
    println!(
        "\n  churn ({})  {cycles} cycles of {conns} connects and closes",
        kind.name()
    );
    println!("  RSS after the first cycle {:>8} KiB", first / 1024);
    println!(
        "  RSS after the last        {:>8} KiB ({:.1}% of the first)",
        last / 1024,
        last as f64 / first as f64 * 100.0
    );
    Ok(())
}
