//! `longlink-bench upgrade`: N idle connections plus pinging ones, then `kill -HUP` of the
//! gateway while they run (issue 13's "Performance"). Reports the handoff time (the signal
//! to the first answer of the new process on a fresh API connection), the largest gap
//! between PONGs any pinging client saw, the RSS before (old process) and after (new
//! process), and the connections lost: after the upgrade every idle connection makes an
//! echo round trip through the new process, so one that was dropped or wedged is missed.
//!
//! Against a gateway in dev mode (`longlink` with no arguments: app `demo`, `builtin:echo`).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use longlink::proto::{method, Frame};

use crate::kids::{collect, open, reset};
use crate::util::{gateway_pid, http, rss};
use crate::wire::Wire;
use crate::{Common, Kind};

/// A client PINGing every 10 ms until told to stop: returns the largest PONG gap, PONGs
/// seen, and whether its connection ended.
fn pinger(
    c: &Common,
    i: usize,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<(Duration, u64, bool)>, String> {
    let mut w = Wire::tcp(c, &format!("pinger-{i}"))?;
    w.s.set_read_timeout(Some(Duration::from_millis(5)))
        .map_err(|e| e.to_string())?;
    Ok(std::thread::spawn(move || {
        let (mut gap, mut pongs, mut last) = (Duration::ZERO, 0u64, Instant::now());
        let mut next = Instant::now();
        let mut seq = 0u64;
        while !stop.load(Relaxed) {
            if Instant::now() >= next {
                seq += 1;
                if w.send(&Frame::control(method::PING, seq, &[])).is_err() {
                    return (gap, pongs, true);
                }
                next += Duration::from_millis(10);
            }
            match w.next() {
                Ok(Some(f)) if f.method == method::PONG => {
                    pongs += 1;
                    gap = gap.max(last.elapsed());
                    last = Instant::now();
                }
                Ok(Some(f)) if f.method == method::BYE || f.method == method::REDIRECT => {
                    return (gap, pongs, true);
                }
                Ok(_) => {}
                Err(_) => return (gap, pongs, true),
            }
        }
        (gap, pongs, false)
    }))
}

pub(crate) fn upgrade(c: &Common, kind: Kind, idle: usize, pinging: usize) -> Result<(), String> {
    let old = gateway_pid(c)?;
    let (mut kids, _, _) = open(c, kind, idle, old)?;
    let stop = Arc::new(AtomicBool::new(false));
    let pingers = (0..pinging)
        .map(|i| pinger(c, i, stop.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    std::thread::sleep(Duration::from_millis(1_000));
    let rss_before = rss(old)?;

    // SAFETY: kill on a pid; the gateway's (from /healthz or --pid).
    let t0 = Instant::now();
    if unsafe { libc::kill(old as i32, libc::SIGHUP) } != 0 {
        return Err(format!(
            "kill -HUP {old}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // Fresh connections queue in the listener's backlog while the old process is quiet:
    // the first answer from another pid is the new process serving.
    let new = loop {
        if t0.elapsed() > Duration::from_secs(15) {
            return Err("no answer from a new process within 15 s".into());
        }
        if let Ok((200, body)) = http(&c.api, "GET", "/healthz", b"") {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            match v["pid"].as_u64() {
                Some(p) if p as u32 != old => break p as u32,
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let handoff = t0.elapsed();
    std::thread::sleep(Duration::from_millis(1_000));
    stop.store(true, Relaxed);
    let (mut gap, mut pongs, mut closed) = (Duration::ZERO, 0, 0);
    for p in pingers {
        let (g, n, dead) = p.join().map_err(|_| "a pinger panicked")?;
        gap = gap.max(g);
        pongs += n;
        closed += usize::from(dead);
    }
    // Every idle connection: one echo round trip through the new process.
    reset(&mut kids)?;
    let cmds = vec!["echo 1 32 1".to_string(); kids.len()];
    let (echoed, _, _, _) = collect(&mut kids, &cmds)?;
    let lost = idle as u64 - echoed.min(idle as u64) + closed as u64;
    let rss_after = rss(new)?;
    drop(kids);
    let v = json!({
        "scenario": "upgrade", "transport": format!("{kind:?}"), "idle": idle, "pinging": pinging, "old_pid": old, "new_pid": new,
        "handoff_ms": handoff.as_secs_f64() * 1000.0, "max_pong_gap_ms": gap.as_secs_f64() * 1000.0,
        "pongs": pongs, "rss_before_kib": rss_before / 1024, "rss_after_kib": rss_after / 1024,
        "lost": lost,
    });
    println!("{v}");
    println!(
        "\n  upgrade  {idle} idle ({kind:?}) + {pinging} pinging TCP connections, kill -HUP {old}"
    );
    println!(
        "  handoff (HUP → new pid answers)  {:>8.1} ms",
        handoff.as_secs_f64() * 1000.0
    );
    println!(
        "  largest PONG gap                 {:>8.1} ms",
        gap.as_secs_f64() * 1000.0
    );
    println!(
        "  RSS old → new                    {:>8} → {} KiB",
        rss_before / 1024,
        rss_after / 1024
    );
    println!("  connections lost                 {lost:>8}");
    if lost > 0 {
        return Err(format!("{lost} connections lost"));
    }
    Ok(())
}
