//! `longlink-bench unicast`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::kids::{collect, open, reset};
use crate::util::{cpu_us, gateway_pid, metric, payload, round2, round3, Hist, KeepAlive};
use crate::{Common, Kind};

#[allow(clippy::too_many_arguments)]
pub(crate) fn unicast(
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
