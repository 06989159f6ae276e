//! The live upgrade (docs/OPERATIONS.md, "Live upgrade"): `kill -HUP` starts the binary
//! again and hands it every listener and connection with its state. Real processes, real
//! sockets; the clients never reconnect.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use longlink::proto::{method, Frame};
use prost::Message;
use serde_json::json;

const APP: &str = "[[apps]]\nid = \"demo\"\ntokens = [\"demo-token\"]\n";

fn toml(extra: &str) -> String {
    format!("node_id = \"n1\"\n{extra}\n{APP}")
}

/// What a pinging client saw.
#[derive(Debug, Default)]
struct Seen {
    pongs: usize,
    max_gap: Duration,
    /// Push payloads, in arrival order.
    pushes: Vec<String>,
    closed: bool,
}

/// A client on its own thread, PINGing every 10 ms until stopped.
struct Pinger {
    stop: Arc<AtomicBool>,
    h: JoinHandle<Seen>,
}

impl Pinger {
    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.h.join().unwrap()
    }
}

/// Tracks PONG gaps and pushes from frames as they come.
fn note(seen: &mut Seen, last: &mut Instant, f: &Frame) {
    if f.method == method::PONG {
        seen.pongs += 1;
        seen.max_gap = seen.max_gap.max(last.elapsed());
        *last = Instant::now();
    } else if f.method == method::PUSH {
        seen.pushes
            .push(String::from_utf8_lossy(&f.payload).into_owned());
    } else if f.method == method::BYE || f.method == method::REDIRECT {
        seen.closed = true;
    }
}

fn tcp_pinger(mut c: Client) -> Pinger {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let mut seen = Seen::default();
        let mut last = Instant::now();
        let mut next = Instant::now();
        let mut seq = 100;
        while !s.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                seq += 1;
                c.send(&Frame::control(method::PING, seq, &[]));
                next += Duration::from_millis(10);
            }
            match c.try_recv(Duration::from_millis(2)) {
                Ok(Some(f)) => note(&mut seen, &mut last, &f),
                Ok(None) => {}
                Err(()) => {
                    seen.closed = true;
                    break;
                }
            }
        }
        // What is still on its way.
        while let Ok(Some(f)) = c.try_recv(Duration::from_millis(200)) {
            note(&mut seen, &mut last, &f);
        }
        seen
    });
    Pinger { stop, h }
}

fn ws_pinger(mut w: Ws) -> Pinger {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let mut seen = Seen::default();
        let mut last = Instant::now();
        let mut next = Instant::now();
        let mut seq = 100;
        let take = |seen: &mut Seen, last: &mut Instant, m: WsFrame| {
            if m.opcode == 8 {
                seen.closed = true;
            } else if m.opcode == 2 {
                note(seen, last, &Frame::decode(&m.payload[..]).unwrap());
            }
        };
        while !s.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                seq += 1;
                let ping = Frame::control(method::PING, seq, &[]).encode_to_vec();
                w.send(true, 2, &ping);
                next += Duration::from_millis(10);
            }
            match w.try_recv(Duration::from_millis(2)) {
                Ok(Some(m)) => take(&mut seen, &mut last, m),
                Ok(None) => {}
                Err(()) => {
                    seen.closed = true;
                    break;
                }
            }
        }
        while let Ok(Some(m)) = w.try_recv(Duration::from_millis(200)) {
            take(&mut seen, &mut last, m);
        }
        seen
    });
    Pinger { stop, h }
}

fn push(g: &Gateway, conn: &str, payload: &str) -> serde_json::Value {
    let (st, v) = g.api("POST", &format!("/v1/push/conn/{conn}"), payload.as_bytes());
    assert_eq!(st, 200, "{v}");
    v
}

fn pbbp2_hello(w: &mut Ws) -> String {
    let hello = Frame::decode(&w.recv().payload[..]).unwrap();
    assert_eq!(hello.method, method::HELLO);
    hello.header("conn_id").unwrap().to_string()
}

/// Descriptors of a process: number, target, and whether it is close-on-exec.
fn fds(pid: u32) -> Vec<(u32, String, bool)> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut v = vec![];
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue; // closed meanwhile
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        let target = std::fs::read_link(format!(
            "/proc/{pid}/fd/{}",
            e.file_name().to_str().unwrap()
        ))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
        let n = e.file_name().to_str().unwrap().parse().unwrap();
        v.push((n, target, flags & libc::O_CLOEXEC as u32 != 0));
    }
    v
}

#[test]
fn clients_of_every_kind_cross_an_upgrade_without_noticing() {
    let mut g = Gateway::spawn(Some(&toml("")), &["--http", "127.0.0.1:0"]);
    let old = g.pid;
    // A TCP client and a pbbp2 WebSocket client PINGing every 10 ms; a raw WebSocket
    // client; a long-poll waiter; an API client on one keep-alive connection.
    let (tcp, tcp_id) = g.hello("t", None);
    let path = "/ws?app_id=demo&device_id=p&token=demo-token";
    let mut pb = Ws::connect(&g.http, path, &[("Sec-WebSocket-Protocol", "pbbp2")]).unwrap();
    let pb_id = pbbp2_hello(&mut pb);
    let raw_path = "/ws?app_id=demo&device_id=r&token=demo-token";
    let mut raw = Ws::connect(&g.http, raw_path, &[]).unwrap();
    let mut api = KeepAlive::connect(&g.api);
    api.send("GET", "/healthz", &[], b"");
    assert_eq!(api.answer().json()["pid"], old);
    let raw_id = {
        // The raw client's id, from the device's only connection.
        let (st, v) = g.api("GET", "/v1/online/device/demo/r", b"");
        assert_eq!(st, 200, "{v}");
        v["connections"][0]["conn_id"].as_str().unwrap().to_string()
    };
    let poll = {
        let http = g.http.clone();
        std::thread::spawn(move || {
            let mut k = KeepAlive::connect(&http);
            k.send("GET", "/poll/status?key=qr&timeout=20", &[], b"");
            let a = k.answer();
            // The same connection asks again after its answer.
            k.send("GET", "/poll/status?key=qr&timeout=0.2", &[], b"");
            (a.status, a.text(), k.answer().status)
        })
    };
    let tcp = tcp_pinger(tcp);
    let pb = ws_pinger(pb);
    std::thread::sleep(Duration::from_millis(200));
    // Pushes at a steady pace to the TCP client while the upgrade happens: each answered
    // push arrives exactly once.
    let pushing = Arc::new(AtomicBool::new(true));
    let pusher = {
        let (api_addr, id, on) = (g.api.clone(), tcp_id.clone(), pushing.clone());
        std::thread::spawn(move || {
            let mut k = KeepAlive::connect(&api_addr);
            let mut sent = vec![];
            let mut i = 0;
            while on.load(Ordering::Relaxed) {
                let p = format!("during-{i}");
                k.send("POST", &format!("/v1/push/conn/{id}"), &[], p.as_bytes());
                let a = k.answer();
                assert_eq!(a.status, 200, "{}", a.text());
                assert_eq!(a.json()["delivered"], 1, "{}", a.text());
                sent.push(p);
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(100));

    // Descriptors the gateway was started with (stdio, and whatever the test process let
    // it inherit) are passed on by any exec; every other one must be close-on-exec.
    let inherited =
        |pid| -> Vec<u32> { fds(pid).into_iter().filter(|f| !f.2).map(|f| f.0).collect() };
    let before = inherited(old);
    let v = g.upgrade();
    assert_eq!(v["tcp"].as_str(), Some(g.tcp.as_str()), "same listeners");
    std::thread::sleep(Duration::from_millis(200));
    pushing.store(false, Ordering::Relaxed);
    let sent = pusher.join().unwrap();
    assert!(sent.len() > 10, "{}", sent.len());

    // The API client's connection goes on, answered by the new process.
    api.send("GET", "/healthz", &[], b"");
    assert_eq!(api.answer().json()["pid"], g.pid);
    // Pushes to the old ids reach every client.
    assert_eq!(push(&g, &tcp_id, "after-tcp")["delivered"], 1);
    assert_eq!(push(&g, &pb_id, "after-pb")["delivered"], 1);
    assert_eq!(push(&g, &raw_id, "after-raw")["delivered"], 1);
    let m = raw.recv();
    assert_eq!((m.opcode, m.payload.as_slice()), (2, &b"after-raw"[..]));
    // The long-poll waiter is answered by the new process; its connection asks again.
    let (st, _) = g.api("POST", "/v1/status/qr", b"scanned");
    assert_eq!(st, 200);
    let (st, text, again) = poll.join().unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (st, &v["data"], again),
        (200, &json!("scanned"), 200),
        "{text}"
    );

    std::thread::sleep(Duration::from_millis(100));
    let tcp = tcp.finish();
    let pb = pb.finish();
    for (name, s) in [("tcp", &tcp), ("pbbp2", &pb)] {
        assert!(!s.closed, "{name}: closed");
        assert!(s.pongs > 30, "{name}: {s:?}");
        assert!(
            s.max_gap < Duration::from_millis(250),
            "{name}: largest PONG gap {:?}",
            s.max_gap
        );
    }
    let mut want = sent.clone();
    want.push("after-tcp".into());
    assert_eq!(tcp.pushes, want, "every push once, in order");
    assert_eq!(pb.pushes, vec!["after-pb".to_string()]);

    // The old process is gone; every descriptor of the new one is close-on-exec.
    assert_eq!(g.wait_exit(Duration::from_secs(10)), Some(0));
    let after = inherited(g.pid);
    assert_eq!(before, after, "not CLOEXEC: {:?}", fds(g.pid));
    assert!(fds(g.pid).len() > 8, "sockets, epoll, ...");
    // TCP, pbbp2, raw, the long-poll, two API connections.
    assert_eq!(g.metric("longlink_upgrade_connections_taken"), 6.0);
}

#[test]
fn unacked_pushes_rooms_and_a_half_sent_frame_survive_the_upgrade() {
    let limits = "[limits]\nack_timeout_ms = 300\nmax_retries = 10\n";
    let mut g = Gateway::spawn(Some(&toml(limits)), &[]);
    let (mut c, id) = g.hello("d1", Some("u1"));
    let (st, _) = g.api(
        "POST",
        "/v1/rooms/demo/lobby/members",
        br#"{"device_ids":["d1"]}"#,
    );
    assert_eq!(st, 200);
    let (st, _) = g.api("PUT", &format!("/v1/session/{id}"), br#"{"k":"v"}"#);
    assert_eq!(st, 200);
    // An ack=1 push whose API call waits for the ACK across the upgrade.
    let waiting = {
        let (api, id) = (g.api.clone(), id.clone());
        std::thread::spawn(move || {
            let path = format!("/v1/push/conn/{id}?ack=1&wait_ms=8000");
            api_call(&api, "POST", &path, b"tracked", &[])
        })
    };
    let first = c.recv();
    assert_eq!(first.payload, &b"tracked"[..]);
    let seq = first.seqid;
    // Half of a PING frame before the upgrade, the rest after.
    let mut ping = vec![];
    longlink::codec::encode_tcp(&Frame::control(method::PING, 77, &[]), &mut ping).unwrap();
    let (a, b) = ping.split_at(ping.len() / 2);
    c.s.write_all(a).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    g.upgrade();
    c.s.write_all(b).unwrap();
    // The new process retransmits with the same seqid (not ACKed yet), and answers the
    // PING whole.
    let mut pong = false;
    let mut again = None;
    let end = Instant::now() + Duration::from_secs(5);
    while (!pong || again.is_none()) && Instant::now() < end {
        let f = c.recv();
        match f.method {
            m if m == method::PONG => {
                assert_eq!(f.seqid, 77);
                pong = true;
            }
            m if m == method::PUSH => {
                assert_eq!((f.seqid, &f.payload[..]), (seq, &b"tracked"[..]));
                // The same push id from the new process.
                assert_eq!(f.header("push_id"), first.header("push_id"));
                assert!(first.header("push_id").is_some());
                again = Some(f);
            }
            _ => panic!("unexpected {f:?}"),
        }
    }
    assert!(pong && again.is_some(), "pong {pong}, retransmit {again:?}");
    c.send(&Frame::control(method::ACK, seq, &[]));
    let (st, v) = waiting.join().unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!((&v["acked"], &v["pending"]), (&json!(1), &json!(0)), "{v}");
    assert!(
        c.drain_with_ping(78).is_empty(),
        "nothing after the ACK: no further retransmit"
    );
    // The room and the user survive.
    let (st, v) = g.api("POST", "/v1/push/room/demo/lobby", b"to-room");
    assert_eq!((st, &v["delivered"]), (200, &json!(1)), "{v}");
    assert_eq!(c.recv().payload, &b"to-room"[..]);
    let (st, v) = g.api("POST", "/v1/push/user/demo/u1", b"to-user");
    assert_eq!((st, &v["delivered"]), (200, &json!(1)), "{v}");
    assert_eq!(c.recv().payload, &b"to-user"[..]);
    assert_eq!(g.metric("longlink_acked_pushes_total"), 1.0);
    // Session data survives.
    let (_, v) = g.api("GET", "/v1/online/device/demo/d1", b"");
    assert_eq!(v["connections"][0]["session"], json!({"k": "v"}), "{v}");
}

#[test]
fn a_broken_config_or_a_binary_that_exits_leaves_the_old_process_serving() {
    // The gateway runs from a copy of the binary, so the test can replace it.
    let dir = temp_dir("bin");
    let exe = dir.0.join("longlink");
    std::fs::copy(env!("CARGO_BIN_EXE_longlink"), &exe).unwrap();
    let cfg = dir.0.join("longlink.toml");
    std::fs::write(&cfg, toml("")).unwrap();
    let mut child = std::process::Command::new(&exe)
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--tcp", "127.0.0.1:0", "--api", "127.0.0.1:0", "--http", ""])
        .args(["--log-level", "warn"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let (tcp, api, pid) = (
        v["tcp"].as_str().unwrap().to_string(),
        v["api"].as_str().unwrap().to_string(),
        v["pid"].as_u64().unwrap() as u32,
    );
    let mut c = Client::connect(&tcp);
    let id = c.hello("demo", "d", "demo-token", None);
    let failed = |n: f64| {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let (_, text) = http_raw(&api, "GET", "/metrics", b"", &[]);
            let text = String::from_utf8(text).unwrap();
            if text.contains(&format!("longlink_upgrades_failed_total {n}")) {
                return;
            }
            assert!(Instant::now() < end, "no failed upgrade counted");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let hup = || {
        // SAFETY: signalling the process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    };
    let serving = |c: &mut Client, n: u64| {
        assert!(c.drain_with_ping(n).is_empty());
        let (st, v) = api_call(&api, "GET", "/healthz", b"", &[]);
        assert_eq!((st, &v["pid"]), (200, &json!(pid)));
        let path = format!("/v1/push/conn/{id}");
        let (st, v) = api_call(&api, "POST", &path, format!("p{n}").as_bytes(), &[]);
        assert_eq!((st, &v["delivered"]), (200, &json!(1)), "{v}");
        assert_eq!(c.recv().payload, format!("p{n}").as_bytes());
    };

    // 1. A config that does not load: the new process exits; the old one goes on.
    std::fs::write(&cfg, "this is [not toml").unwrap();
    hup();
    failed(1.0);
    serving(&mut c, 1);

    // 2. A binary that exits at once.
    std::fs::write(&cfg, toml("")).unwrap();
    std::fs::remove_file(&exe).unwrap();
    std::fs::write(&exe, "#!/bin/sh\nexit 3\n").unwrap();
    let mut p = std::fs::metadata(&exe).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
    std::fs::set_permissions(&exe, p).unwrap();
    hup();
    failed(2.0);
    serving(&mut c, 2);

    // 3. A binary that hangs (never says it is ready): given up after 10 s.
    std::fs::remove_file(&exe).unwrap();
    std::fs::write(&exe, "#!/bin/sh\nexec sleep 60\n").unwrap();
    let mut p = std::fs::metadata(&exe).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
    std::fs::set_permissions(&exe, p).unwrap();
    hup();
    std::thread::sleep(Duration::from_millis(500));
    serving(&mut c, 3); // serving while it waits
    failed(3.0);
    serving(&mut c, 4);

    // 4. The real binary again: the upgrade goes through.
    std::fs::remove_file(&exe).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_longlink"), &exe).unwrap();
    hup();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(c.drain_with_ping(9).is_empty());
    let (_, v) = api_call(&api, "GET", "/healthz", b"", &[]);
    let new = v["pid"].as_u64().unwrap() as u32;
    assert_ne!(new, pid);
    // SAFETY: the process the upgrade started.
    unsafe { libc::kill(new as i32, libc::SIGKILL) };
}

#[test]
fn five_thousand_pushes_across_two_chained_upgrades_arrive_once_each() {
    let mut g = Gateway::spawn(Some(&toml("")), &[]);
    let (c, id) = g.hello("d", None);
    let fds_before = fds(g.pid).len();
    let rx = tcp_pinger(c);
    let pusher = {
        let (api, id) = (g.api.clone(), id.clone());
        std::thread::spawn(move || {
            let mut k = KeepAlive::connect(&api);
            let start = Instant::now();
            for i in 0..5000u32 {
                // Steady: 5,000 over about 3 s.
                let due = start + Duration::from_micros(600 * u64::from(i));
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                k.send(
                    "POST",
                    &format!("/v1/push/conn/{id}"),
                    &[],
                    i.to_string().as_bytes(),
                );
                let a = k.answer();
                assert_eq!((a.status, &a.json()["delivered"]), (200, &json!(1)), "{i}");
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    g.upgrade();
    std::thread::sleep(Duration::from_millis(700));
    g.upgrade();
    pusher.join().unwrap();
    let seen = rx.finish();
    assert!(!seen.closed);
    let want: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
    assert_eq!(seen.pushes.len(), 5000);
    assert_eq!(seen.pushes, want, "all delivered, none doubled, in order");
    // No descriptor leaks from one generation to the next.
    let after = fds(g.pid).len();
    assert!(
        after <= fds_before + 2,
        "descriptors: {fds_before} before, {after} two upgrades later"
    );
}

#[test]
fn systemd_hears_the_new_main_pid_then_ready() {
    let dir = temp_dir("notify-up");
    let sock = dir.0.join("notify");
    let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut g = Gateway::spawn_env(
        Some(&toml("")),
        &[],
        &[("NOTIFY_SOCKET", sock.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = rx.recv(&mut buf).unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).to_string();
    assert_eq!(first, format!("MAINPID={}\nREADY=1\n", g.pid));
    g.upgrade();
    let n = rx.recv(&mut buf).unwrap();
    let second = String::from_utf8_lossy(&buf[..n]).to_string();
    assert_eq!(second, format!("MAINPID={}\nREADY=1\n", g.pid));
}

#[test]
fn a_config_change_takes_effect_and_half_sent_messages_cross_the_upgrade() {
    let app = |tokens: &str, more: &str| {
        format!(
            "node_id = \"n1\"\n[[apps]]\nid = \"demo\"\ntokens = [{tokens}]\ndefault_service = 1\n[[apps.services]]\nid = 1\nurl = \"builtin:echo\"\n{more}"
        )
    };
    let mut g = Gateway::spawn(Some(&app("\"demo-token\"", "")), &["--http", "127.0.0.1:0"]);
    let raw_path = "/ws?app_id=demo&device_id=r&token=demo-token";
    let mut raw = Ws::connect(&g.http, raw_path, &[]).unwrap();
    raw.text("whole");
    assert_eq!(raw.recv().text(), "whole");
    let path = "/ws?app_id=demo&device_id=p&token=demo-token";
    let mut pb = Ws::connect(&g.http, path, &[("Sec-WebSocket-Protocol", "pbbp2")]).unwrap();
    pbbp2_hello(&mut pb);
    // The first fragment of a raw message, and half of a pbbp2 PING's WebSocket frame.
    raw.send(false, 1, b"hel");
    let ping = Ws::frame_bytes(
        true,
        2,
        &Frame::control(method::PING, 9, &[]).encode_to_vec(),
    );
    let (a, b) = ping.split_at(ping.len() / 2);
    pb.send_raw(a);
    // And the first fragment of a compressed message (permessage-deflate, RSV1).
    let ext = ("Sec-WebSocket-Extensions", "permessage-deflate");
    let mut zip = Ws::connect(
        &g.http,
        "/ws?app_id=demo&device_id=z&token=demo-token",
        &[ext],
    )
    .unwrap();
    let text = "compressed on both sides of the upgrade ".repeat(50);
    let z = {
        use flate2::{Compress, Compression, FlushCompress};
        let mut c = Compress::new(Compression::default(), false);
        let mut z = Vec::with_capacity(text.len());
        c.compress_vec(text.as_bytes(), &mut z, FlushCompress::Sync)
            .unwrap();
        z.truncate(z.len() - 4);
        z
    };
    let mut first = Ws::frame_bytes(false, 1, &z[..z.len() / 2]);
    first[0] |= 0x40;
    zip.send_raw(&first);
    std::thread::sleep(Duration::from_millis(50));
    // A new token for the app and a second app: `systemctl reload` re-reads the config.
    let cfg = g.dir.as_ref().unwrap().0.join("longlink.toml");
    let other = "[[apps]]\nid = \"other\"\ntokens = [\"o-token\"]\n";
    std::fs::write(&cfg, app("\"demo-token\", \"new-token\"", other)).unwrap();
    g.upgrade();
    raw.send(true, 0, b"lo");
    let m = raw.recv();
    assert_eq!(
        (m.opcode, m.text()),
        (1, "hello"),
        "the message decoded whole"
    );
    pb.send_raw(b);
    let pong = Frame::decode(&pb.recv().payload[..]).unwrap();
    assert_eq!((pong.method, pong.seqid), (method::PONG, 9));
    // The compressed message inflates whole in the new process, whose echo is compressed.
    zip.send(true, 0, &z[z.len() / 2..]);
    let m = zip.recv();
    assert!(m.rsv1 && m.opcode == 1);
    let mut d = flate2::Decompress::new(false);
    let mut back = Vec::with_capacity(text.len() + 16);
    let mut input = m.payload.clone();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    d.decompress_vec(&input, &mut back, flate2::FlushDecompress::Sync)
        .unwrap();
    assert!(
        back == text.as_bytes(),
        "the compressed message crossed the upgrade"
    );
    // The new config admits what the old one did not.
    let mut c = g.connect();
    c.hello("demo", "n", "new-token", None);
    let mut c2 = g.connect();
    c2.hello("other", "o", "o-token", None);
    assert!(c.drain_with_ping(1).is_empty());
}

#[test]
fn a_state_refused_after_the_handover_began_leaves_everything_with_the_old_process() {
    // The TCP listener on a unix socket: its file must survive a failed upgrade.
    let dir = temp_dir("unix-up");
    let path = dir.0.join("gw.sock");
    let notify = dir.0.join("notify");
    let rx = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let tcp = format!("unix:{}", path.display());
    let mut g = Gateway::spawn_env(
        Some(&toml("")),
        &["--tcp", &tcp],
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    );
    let old = g.pid;
    let mut buf = [0u8; 256];
    rx.recv(&mut buf).unwrap();
    let connect = || {
        let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s
    };
    let mut c = connect();
    let mut hello = vec![];
    let h = Frame::control(
        method::HELLO,
        1,
        &[
            ("app_id", "demo"),
            ("device_id", "u"),
            ("token", "demo-token"),
        ],
    );
    longlink::codec::encode_tcp(&h, &mut hello).unwrap();
    c.write_all(&hello).unwrap();
    // One frame at a time: the test sends nothing that is answered by two.
    let read_frame = |c: &mut std::os::unix::net::UnixStream| -> Frame {
        use std::io::Read;
        let mut buf = vec![];
        loop {
            if let Some((body, _)) = longlink::codec::decode_tcp(&buf, 65535).unwrap() {
                return Frame::decode(body).unwrap();
            }
            let mut b = [0u8; 1];
            assert_eq!(c.read(&mut b).unwrap(), 1, "closed");
            buf.push(b[0]);
        }
    };
    let id = read_frame(&mut c).header("conn_id").unwrap().to_string();
    // Half a PING before the failed upgrade: the old process reads the rest after it.
    let mut ping = vec![];
    longlink::codec::encode_tcp(&Frame::control(method::PING, 5, &[]), &mut ping).unwrap();
    let (a, b) = ping.split_at(3);
    c.write_all(a).unwrap();

    // The new process gets the state and refuses it (node_id cannot change live).
    let cfg = g.dir.as_ref().unwrap().0.join("longlink.toml");
    std::fs::write(&cfg, toml("").replace("\"n1\"", "\"n2\"")).unwrap();
    g.signal(libc::SIGHUP);
    // systemd hears that the old process is the main one again.
    let n = rx.recv(&mut buf).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        format!("MAINPID={old}\nREADY=1\n")
    );
    g.wait_until("the failure counted", |g| {
        g.metric("longlink_upgrades_failed_total") == 1.0
    });
    assert!(path.exists(), "the socket file is still there");
    c.write_all(b).unwrap();
    assert_eq!(read_frame(&mut c).method, method::PONG);
    let (st, v) = g.api("POST", &format!("/v1/push/conn/{id}"), b"still");
    assert_eq!((st, &v["delivered"]), (200, &json!(1)), "{v}");
    assert_eq!(read_frame(&mut c).payload, &b"still"[..]);
    let (_, v) = g.api("GET", "/healthz", b"");
    assert_eq!(v["pid"], old);
    let mut c2 = connect();
    c2.write_all(&hello).unwrap();
    assert_eq!(read_frame(&mut c2).method, method::HELLO);

    // Fixed: the upgrade goes through, and the socket file goes on serving.
    std::fs::write(&cfg, toml("")).unwrap();
    g.upgrade();
    assert!(path.exists());
    c.write_all(&ping).unwrap();
    assert_eq!(read_frame(&mut c).method, method::PONG);
    let mut c3 = connect();
    c3.write_all(&hello).unwrap();
    assert_eq!(read_frame(&mut c3).method, method::HELLO);
    assert_eq!(g.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        path.exists(),
        "the old process left the file to the new one"
    );
}

#[test]
fn a_second_hup_during_an_upgrade_is_ignored_and_a_later_one_upgrades_again() {
    let mut g = Gateway::spawn(Some(&toml("")), &[]);
    let (mut c, id) = g.hello("d", None);
    let old = g.pid;
    g.signal(libc::SIGHUP);
    g.signal(libc::SIGHUP); // while the first is under way
    let line = g.lines.recv_timeout(Duration::from_secs(15)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["upgraded_from"], old);
    g.pid = v["pid"].as_u64().unwrap() as u32;
    assert!(
        g.lines.recv_timeout(Duration::from_millis(1000)).is_err(),
        "a second upgrade happened"
    );
    assert_eq!(g.metric("longlink_upgrades_failed_total"), 0.0);
    assert!(c.drain_with_ping(1).is_empty());
    g.upgrade();
    let (_, v) = g.api("POST", &format!("/v1/push/conn/{id}"), b"x");
    assert_eq!(v["delivered"], 1);
    assert_eq!(c.recv().payload, &b"x"[..]);
}

#[test]
fn an_upgrade_while_broadcasts_are_delivered_in_slices_hands_every_copy_over_once() {
    // Small slices: each broadcast to 600 clients takes ten turns, so one is always
    // part-way when the old process goes quiet (it must finish it, not give up).
    let mut g = Gateway::spawn(Some(&toml("[runtime]\npush_writes_per_turn = 64\n")), &[]);
    longlink::server::raise_nofile(); // 600 clients here
    let mut clients: Vec<Client> = (0..600)
        .map(|i| g.hello(&format!("b{i}"), None).0)
        .collect();
    let on = Arc::new(AtomicBool::new(true));
    let broadcaster = {
        let (api, on) = (g.api.clone(), on.clone());
        std::thread::spawn(move || {
            let mut k = KeepAlive::connect(&api);
            let mut sent = 0u32;
            while on.load(Ordering::Relaxed) {
                k.send(
                    "POST",
                    "/v1/push/broadcast/demo",
                    &[],
                    sent.to_string().as_bytes(),
                );
                let a = k.answer();
                assert_eq!(
                    (a.status, &a.json()["delivered"]),
                    (200, &json!(600)),
                    "{}",
                    a.text()
                );
                sent += 1;
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    g.upgrade();
    std::thread::sleep(Duration::from_millis(200));
    on.store(false, Ordering::Relaxed);
    let sent = broadcaster.join().unwrap();
    assert!(sent > 5, "{sent} broadcasts");
    let want: Vec<String> = (0..sent).map(|i| i.to_string()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let mut got = vec![];
        while got.len() < want.len() {
            let f = c.recv();
            assert_eq!(f.method, method::PUSH, "client {i}: {f:?}");
            got.push(String::from_utf8_lossy(&f.payload).into_owned());
        }
        assert_eq!(got, want, "client {i}: every broadcast once, in order");
        assert!(c.drain_with_ping(1).is_empty(), "client {i}: nothing more");
    }
}
