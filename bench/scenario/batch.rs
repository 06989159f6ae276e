//! `longlink-bench batch`: one big API call while others need the reactor. `--conns`
//! clients are bound to a room; one `POST /v1/push/batch` carries `--items` room pushes of
//! `--size` bytes to it (the "3,000 broadcasts to 1,000 reading clients"); meanwhile
//! a bystander outside the room PINGs every 10 ms and the gateway's RSS is sampled every
//! 10 ms. Reports the bystander's PONG latency while the batch runs, the gateway's peak RSS,
//! the batch's answer time, and that every copy arrived.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use longlink::proto::{method, Frame};

use crate::kids::{collect, open, reset};
use crate::util::{cpu_us, gateway_pid, round2, rss, Hist, KeepAlive};
use crate::wire::Wire;
use crate::{Common, Kind};

pub(crate) fn batch(c: &Common, conns: usize, items: usize, size: usize) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let rss_empty = rss(pid)?;
    let (mut kids, _, _) = open(c, Kind::Tcp, conns, pid)?;
    let room = format!("batch-{}", std::process::id());
    let ids: Vec<String> = kids
        .iter()
        .flat_map(|k| (0..k.conns).map(move |j| format!("{}{j}", k.prefix)))
        .collect();
    let mut ka = KeepAlive::new(&c.api)?;
    for chunk in ids.chunks(10_000) {
        ka.post(
            &format!("/v1/rooms/{}/{room}/members", c.app),
            json!({ "device_ids": chunk }).to_string().as_bytes(),
        )?;
    }
    reset(&mut kids)?;
    let payload = "p".repeat(size);
    let item = json!({"to": "room", "app": c.app, "room": room, "payload": payload}).to_string();
    let body = format!("[{}]", vec![item; items].join(","));

    // The bystander and the RSS sampler run until the batch is answered and delivered.
    let done = Arc::new(AtomicBool::new(false));
    let mut bystander = Wire::tcp(c, &format!("bystander-{}", std::process::id()))
        .map_err(|e| format!("bystander: {e}"))?;
    let d = done.clone();
    let pinger = std::thread::spawn(move || ping_until(&mut bystander, &d));
    let d = done.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0u64;
        while !d.load(Ordering::Relaxed) {
            peak = peak.max(rss(pid).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(10));
        }
        peak
    });
    let rss0 = rss(pid)?;
    let cpu0 = cpu_us(pid)?;
    let t0 = Instant::now();
    let answer = ka.post("/v1/push/batch", body.as_bytes());
    let answered = t0.elapsed().as_secs_f64();
    let cmds: Vec<String> = kids
        .iter()
        .map(|k| format!("wait {}", k.conns * items))
        .collect();
    let collected = collect(&mut kids, &cmds);
    let delivered_s = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let pongs = pinger.join().map_err(|_| "pinger panicked")??;
    let peak = sampler.join().map_err(|_| "sampler panicked")?;
    let answer: serde_json::Value =
        serde_json::from_slice(&answer?).map_err(|e| format!("batch answer: {e}"))?;
    let (received, _, _, _) = collected?;
    let cpu = (cpu_us(pid)? - cpu0) as f64;
    let expected = (conns * items) as u64;
    let v = json!({
        "scenario": "batch", "conns": conns, "items": items, "payload": size,
        "expected": expected, "received": received, "lost": expected.saturating_sub(received),
        "answer_delivered": answer["delivered"], "answer_s": round2(answered), "delivered_s": round2(delivered_s),
        "bystander_pongs": pongs.count(), "bystander_p50_us": pongs.quantile(0.5), "bystander_p99_us": pongs.quantile(0.99),
        "bystander_max_us": pongs.max,
        "rss_empty_kib": rss_empty / 1024, "rss_before_kib": rss0 / 1024, "rss_peak_kib": peak / 1024,
        "rss_after_kib": rss(pid)? / 1024,
        "server_cpu_us_per_copy": round2(cpu / received.max(1) as f64),
    });
    println!("{v}");
    println!(
        "\n  batch  {items} room pushes × {conns} members, {size}-byte payloads, in one API call"
    );
    println!("  delivered          {received:>10} of {expected}");
    println!("  answered after     {answered:>10.2} s (all delivered after {delivered_s:.2} s)");
    println!(
        "  bystander PONG     p50 {} / p99 {} / max {} µs ({} pings)",
        pongs.quantile(0.5),
        pongs.quantile(0.99),
        pongs.max,
        pongs.count()
    );
    println!(
        "  gateway RSS        {} KiB before, {} KiB peak",
        rss0 / 1024,
        peak / 1024
    );
    Ok(())
}

/// The bystander (a TCP client outside the batch's room) PINGs every 10 ms until `done`;
/// returns its PONG latencies.
fn ping_until(w: &mut Wire, done: &AtomicBool) -> Result<Hist, String> {
    w.s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut h = Hist::default();
    let mut seq = 100;
    while !done.load(Ordering::Relaxed) {
        seq += 1;
        let t = Instant::now();
        w.send(&Frame::control(method::PING, seq, &[]))
            .map_err(|e| format!("bystander: {e}"))?;
        loop {
            match w.next().map_err(|e| format!("bystander: {e}"))? {
                Some(f) if f.method == method::PONG && f.seqid == seq => break,
                Some(_) => {}
                None => return Err("bystander: no PONG within 30 s".into()),
            }
        }
        h.record(t.elapsed().as_micros() as u64);
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(h)
}
