//! `longlink-bench longpoll`.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::kids::{collect, open, reset};
use crate::util::{cpu_us, gateway_pid, metric, post_all, round3, rss};
use crate::{Common, Kind};

pub(crate) fn longpoll(c: &Common, waiters: usize, window: usize) -> Result<(), String> {
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
