//! `longlink-bench fanout`.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::kids::{collect, open, reset, spread};
use crate::util::{cpu_us, gateway_pid, payload, round2, round3, KeepAlive};
use crate::{Common, Kind};

#[allow(clippy::too_many_arguments)]
pub(crate) fn fanout(
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
    // `--api a,b`: every broadcast goes to each listed API. With two nodes that share no
    // Redis this is the machine's floor for splitting subscribers over two processes.
    let apis: Vec<String> = c.api.split(',').map(str::to_string).collect();
    let (mut kids, _, _) = open(c, kind, subs, pid)?;
    if let Some(r) = room {
        // Bind every subscriber's device to the room, 10,000 ids per request.
        let ids: Vec<String> = kids
            .iter()
            .flat_map(|k| (0..k.conns).map(move |j| format!("{}{j}", k.prefix)))
            .collect();
        for api in &apis {
            let mut ka = KeepAlive::new(api)?;
            for chunk in ids.chunks(10_000) {
                ka.post(
                    &format!("/v1/rooms/{}/{r}/members", c.app),
                    json!({ "device_ids": chunk }).to_string().as_bytes(),
                )?;
            }
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
        let (apis, path) = (apis.clone(), path.clone());
        senders.push(std::thread::spawn(move || -> Result<(), String> {
            let mut kas = apis
                .iter()
                .map(|a| KeepAlive::new(a))
                .collect::<Result<Vec<_>, _>>()?;
            for i in 0..share {
                if rate > 0 {
                    // Pace globally: this sender's i-th message is due at its slot.
                    let due = t0 + Duration::from_secs_f64((i * w + s) as f64 / rate as f64);
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                for ka in &mut kas {
                    ka.post(&path, &payload(size))?;
                }
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
