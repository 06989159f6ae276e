//! `longlink-bench echo`.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;

use crate::kids::{collect, open, reset, Kid};
use crate::scenario::connect::Bare;
use crate::util::{cpu_us, gateway_pid, round2, round3, Hist};
use crate::{Common, Kind};

pub(crate) fn echo(
    c: &Common,
    kind: Kind,
    conns: usize,
    rounds: usize,
    size: usize,
    service: i32,
) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let (mut kids, _, _) = open(c, kind, conns, pid)?;
    let cmd = format!("echo {rounds} {size} {service}");
    let (received, hist, secs, cpu) = round_trips(&mut kids, pid, &cmd)?;
    let expected = (conns * rounds) as u64;
    let rts = received as f64 / secs;
    let v = json!({
        "scenario": "echo", "transport": kind.name(), "service": service, "conns": conns, "rounds": rounds, "payload": size,
        "expected": expected, "round_trips": received, "round_trips_per_s": rts.round(),
        "p50_us": hist.quantile(0.5), "p99_us": hist.quantile(0.99), "p999_us": hist.quantile(0.999), "max_us": hist.max,
        "server_cpu_us_per_round_trip": round3(cpu / received.max(1) as f64),
    });
    println!("{v}");
    println!("\n  echo ({})  {conns} connections × {rounds} round trips, {size}-byte messages, service {service}", kind.name());
    println!("  round trips        {received:>10} of {expected}");
    println!("  throughput         {:>10.0} round trips/s", rts);
    println!(
        "  latency p50/p99/p999 {} / {} / {} µs",
        hist.quantile(0.5),
        hist.quantile(0.99),
        hist.quantile(0.999)
    );
    println!(
        "  server CPU         {:>10.3} µs per round trip",
        cpu / received.max(1) as f64
    );
    Ok(())
}

/// `echo --floor`: the gateway and a `bare-echo` of our own (one read and one write a
/// message, nothing else) driven by the same client, passes alternating; the gateway's CPU
/// per round trip against the floor's. The floor speaks TCP only, so with `--transport ws`
/// its connections are TCP: the kernel's work per message is the same, the framing is not.
pub(crate) fn echo_floor(
    c: &Common,
    kind: Kind,
    conns: usize,
    rounds: usize,
    size: usize,
    service: i32,
    passes: usize,
) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let bare = Bare::start()?;
    let (mut gw, _, _) = open(c, kind, conns, pid)?;
    let mut fc = c.clone();
    fc.tcp = bare.addr.clone();
    // Sources of their own, past the gateway's children's.
    fc.source = std::net::Ipv4Addr::from(u32::from(c.source) + c.procs as u32);
    let (mut fl, _, _) = open(&fc, Kind::Tcp, conns, bare.pid())?;
    let cmd = format!("echo {rounds} {size} {service}");
    let expected = (conns * rounds) as u64;
    let run = |kids: &mut Vec<Kid>, pid: u32| -> Result<(f64, f64, Hist), String> {
        let (received, hist, secs, cpu) = round_trips(kids, pid, &cmd)?;
        if received != expected {
            return Err(format!("{received} of {expected} round trips came back"));
        }
        Ok((cpu / received as f64, received as f64 / secs, hist))
    };
    let (mut cpus, mut floors, mut rates, mut floor_rates) = (vec![], vec![], vec![], vec![]);
    let mut hist = Hist::default();
    for pass in 0..passes.max(1) {
        let gateway_first = pass % 2 == 0;
        for gateway in [gateway_first, !gateway_first] {
            if gateway {
                let (cpu, rate, h) = run(&mut gw, pid)?;
                cpus.push(cpu);
                rates.push(rate);
                hist.merge(&h.to_json());
            } else {
                let (cpu, rate, _) = run(&mut fl, bare.pid())?;
                floors.push(cpu);
                floor_rates.push(rate);
            }
        }
    }
    drop(gw);
    drop(fl);
    // Equal passes: the mean per round trip is the total CPU over all of them.
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (g, f) = (mean(&cpus), mean(&floors));
    let mut ratios: Vec<f64> = cpus.iter().zip(&floors).map(|(g, f)| g / f).collect();
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = (ratios[(n - 1) / 2] + ratios[n / 2]) / 2.0;
    let v = json!({
        "scenario": "echo", "transport": kind.name(), "service": service, "conns": conns,
        "rounds": rounds, "payload": size, "passes": cpus.len(),
        "round_trips_per_s": mean(&rates).round(), "floor_round_trips_per_s": mean(&floor_rates).round(),
        "p50_us": hist.quantile(0.5), "p99_us": hist.quantile(0.99), "p999_us": hist.quantile(0.999),
        "pass_cpu_us_per_round_trip": cpus.iter().map(|&x| round3(x)).collect::<Vec<_>>(),
        "floor_pass_cpu_us_per_round_trip": floors.iter().map(|&x| round3(x)).collect::<Vec<_>>(),
        "server_cpu_us_per_round_trip": round3(g), "floor_cpu_us_per_round_trip": round3(f),
        "ratio": round2(g / f), "median_pass_ratio": round2(median),
    });
    println!("{v}");
    println!(
        "\n  echo ({}) against the floor  {conns} connections × {rounds} round trips × {} passes, {size}-byte messages",
        kind.name(),
        cpus.len()
    );
    println!(
        "  throughput         {:>10.0} round trips/s (floor {:.0})",
        mean(&rates),
        mean(&floor_rates)
    );
    println!("  server CPU         {g:>10.3} µs per round trip");
    println!("  bare-echo CPU      {f:>10.3} µs per round trip (the floor, same passes)");
    println!(
        "  ratio              {:>10.2}x the floor (median of passes {median:.2}x)",
        g / f
    );
    for (i, (g, f)) in cpus.iter().zip(&floors).enumerate() {
        println!(
            "    pass {:<3} gateway {g:>6.3} µs  floor {f:>6.3} µs  {:.2}x",
            i + 1,
            g / f
        );
    }
    Ok(())
}

/// One run of `cmd` (an "echo ...") on every child, counters reset first: round trips back,
/// their latencies, seconds taken and the server's (`pid`) CPU µs meanwhile.
fn round_trips(kids: &mut [Kid], pid: u32, cmd: &str) -> Result<(u64, Hist, f64, f64), String> {
    reset(kids)?;
    let cpu0 = cpu_us(pid)?;
    let t0 = Instant::now();
    let cmds = vec![cmd.to_string(); kids.len()];
    let (received, hist, _, _) = collect(kids, &cmds)?;
    let secs = t0.elapsed().as_secs_f64();
    Ok((received, hist, secs, (cpu_us(pid)? - cpu0) as f64))
}

pub(crate) fn bare_echo(
    listen: &str,
    read_at_accept: bool,
    defer: bool,
    idle_threads: usize,
    phased: usize,
) -> Result<(), String> {
    for _ in 0..idle_threads {
        std::thread::spawn(|| loop {
            std::thread::park();
        });
    }
    let addr: SocketAddr = listen.parse().map_err(|e| format!("{listen}: {e}"))?;
    // Bound as the gateway binds: a 4,096-deep backlog (mio's default of 1,024 overflowed
    // under the connect scenario's 1,024 handshakes in flight, and SYNs dropped then cut
    // the rate), TCP_NODELAY once on the listener (accepted sockets inherit it).
    let mut l = {
        let err = |e: std::io::Error| e.to_string();
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .map_err(err)?;
        s.set_reuse_address(true).map_err(err)?;
        s.set_nonblocking(true).map_err(err)?;
        s.set_nodelay(true).map_err(err)?;
        if defer {
            use std::os::fd::AsRawFd;
            let secs: libc::c_int = 1;
            // SAFETY: an int option on a socket this function owns.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_DEFER_ACCEPT,
                    (&secs as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(err(std::io::Error::last_os_error()));
            }
        }
        s.bind(&addr.into()).map_err(err)?;
        s.listen(4096).map_err(err)?;
        mio::net::TcpListener::from_std(s.into())
    };
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    poll.registry()
        .register(&mut l, Token(usize::MAX), Interest::READABLE)
        .map_err(|e| e.to_string())?;
    println!(
        "{}",
        // The bound address (port 0 asks the kernel for one: `connect --floor` does).
        json!({"event": "listening", "addr": l.local_addr().map_err(|e| e.to_string())?.to_string(), "pid": std::process::id()})
    );
    let mut conns: Vec<Option<MioStream>> = vec![];
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        poll.poll(&mut events, None).map_err(|e| e.to_string())?;
        for ev in events.iter() {
            if ev.token() == Token(usize::MAX) && phased > 0 {
                // Each step for a batch of connections in turn (accepts, reads, writes,
                // registrations): the kernel's code for each stays hot across the batch.
                let phased = phased.min(64); // each connection's bytes get 1 KiB or more
                loop {
                    let mut batch = Vec::with_capacity(phased);
                    while batch.len() < phased {
                        match l.accept() {
                            Ok((s, _)) => batch.push((s, 0usize)),
                            Err(_) => break,
                        }
                    }
                    let full = batch.len() == phased;
                    // Each connection's bytes in a slice of its own until they are echoed.
                    let each = buf.len() / phased;
                    for (i, (s, n)) in batch.iter_mut().enumerate() {
                        *n = s.read(&mut buf[i * each..(i + 1) * each]).unwrap_or(0);
                    }
                    for (i, (s, n)) in batch.iter_mut().enumerate() {
                        if *n > 0 {
                            let _ = s.write_all(&buf[i * each..i * each + *n]);
                        }
                    }
                    for (mut s, _) in batch {
                        let t = Token(conns.len());
                        poll.registry()
                            .register(&mut s, t, Interest::READABLE)
                            .map_err(|e| e.to_string())?;
                        conns.push(Some(s));
                    }
                    if !full {
                        break;
                    }
                }
                continue;
            }
            if ev.token() == Token(usize::MAX) {
                while let Ok((mut s, _)) = l.accept() {
                    if read_at_accept {
                        // The client spoke first (its HELLO is here): answer before the
                        // socket joins the epoll set, which then has nothing to report.
                        match s.read(&mut buf) {
                            Ok(0) => continue,
                            Ok(n) => {
                                let _ = s.write_all(&buf[..n]);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => continue,
                        }
                    }
                    let t = Token(conns.len());
                    poll.registry()
                        .register(&mut s, t, Interest::READABLE)
                        .map_err(|e| e.to_string())?;
                    conns.push(Some(s));
                }
                continue;
            }
            let Some(s) = conns[ev.token().0].as_mut() else {
                continue;
            };
            // Same reading rule as the gateway: a short read means drained (edge-triggered).
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        conns[ev.token().0] = None;
                        break;
                    }
                    Ok(n) => {
                        let _ = s.write_all(&buf[..n]);
                        if n < buf.len() {
                            break;
                        }
                    }
                }
            }
        }
    }
}
