//! Drain (docs/OPERATIONS.md): `POST /v1/drain` and SIGUSR1 move every client away and the
//! node exits 0; systemd's `NOTIFY_SOCKET` hears `READY=1`; the bundled client follows a
//! REDIRECT. Real processes and sockets.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use longlink::proto::{method, Frame};
use prost::Message;
use serde_json::json;

const APP: &str = "[[apps]]\nid = \"demo\"\ntokens = [\"demo-token\"]\n";

/// A REDIRECT (then the end of the connection), with its endpoint header.
fn redirected(c: &mut Client) -> Option<String> {
    let frames = c.frames_until_eof(T);
    let r = frames
        .iter()
        .find(|f| f.method == method::REDIRECT)
        .unwrap_or_else(|| panic!("no REDIRECT in {frames:?}"));
    r.header("endpoint").map(str::to_string)
}

#[test]
fn a_drain_moves_every_client_away_then_the_node_exits() {
    let toml = format!(
        "node_id = \"n1\"\n[drain]\nredirect_tcp = \"10.0.0.9:7100\"\nredirect_ws = \"ws://10.0.0.9:7101/ws\"\nrate = 100\n{APP}"
    );
    let mut g = Gateway::spawn(Some(&toml), &["--http", "127.0.0.1:0"]);
    let (mut tcp, _) = g.hello("t", None);
    let path = "/ws?app_id=demo&device_id=p&token=demo-token";
    let mut pb = Ws::connect(&g.http, path, &[("Sec-WebSocket-Protocol", "pbbp2")]).unwrap();
    let hello = Frame::decode(&pb.recv().payload[..]).unwrap();
    assert_eq!(hello.method, method::HELLO);
    let raw_path = "/ws?app_id=demo&device_id=r&token=demo-token";
    let mut raw = Ws::connect(&g.http, raw_path, &[]).unwrap();
    // A long-poll on a keep-alive connection (it would ask again on it).
    let poll = {
        let http = g.http.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let mut k = KeepAlive::connect(&http);
            k.send("GET", "/poll/status?key=k&timeout=20", &[], b"");
            let a = k.answer();
            (a.status, t.elapsed(), k.try_answer(Duration::from_secs(5)))
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let (st, v) = g.api("POST", "/v1/drain?deadline_ms=10000", b"");
    assert_eq!(st, 200, "{v}");
    // (The long-poll waiter counts as a client too.)
    let n = (&v["draining"], &v["connections"]);
    assert_eq!(n, (&json!(true), &json!(4)), "{v}");
    // It leaves the endpoints and takes no new connection; its stats say it drains.
    assert_eq!(g.api("GET", "/v1/endpoints", b"").1["endpoints"], json!([]));
    assert_eq!(g.api("GET", "/v1/stats", b"").1["state"], "draining");
    // TCP and pbbp2 clients are sent where [drain] says, raw WebSocket is closed 1012
    // with the endpoint in the reason, the long-poll is answered.
    assert_eq!(redirected(&mut tcp).as_deref(), Some("10.0.0.9:7100"));
    let f = Frame::decode(&pb.recv().payload[..]).unwrap();
    assert_eq!(f.method, method::REDIRECT);
    assert_eq!(f.header("endpoint"), Some("ws://10.0.0.9:7101/ws"));
    assert_eq!(pb.recv().close().0, 1012);
    assert_eq!(
        raw.recv().close(),
        (1012, "draining; endpoint=ws://10.0.0.9:7101/ws".into())
    );
    let (st, took, after) = poll.join().unwrap();
    assert_eq!(st, 200);
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(after.is_err(), "its connection stayed open");
    assert!(
        std::net::TcpStream::connect(&g.tcp).is_err(),
        "still accepting"
    );
    // Empty: it exits 0, well before its deadline.
    assert_eq!(g.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn sigterm_answers_long_poll_waiters_as_at_their_timeout() {
    let mut g = Gateway::spawn(None, &["--http", "127.0.0.1:0"]);
    let poll = {
        let http = g.http.clone();
        std::thread::spawn(move || {
            let mut k = KeepAlive::connect(&http);
            k.send("GET", "/poll/status?key=k&timeout=20", &[], b"");
            // A second poll pipelined behind it: not taken on a connection that is ending.
            k.send("GET", "/poll/status?key=k2&timeout=20", &[], b"");
            let a = k.answer();
            assert!(a.head.contains("Connection: close\r\n"), "{}", a.head);
            (a.status, a.body, k.try_answer(Duration::from_secs(5)))
        })
    };
    let end = Instant::now() + T;
    while g.metric("longlink_poll_waiters") < 1.0 {
        assert!(Instant::now() < end, "no waiter");
        std::thread::sleep(Duration::from_millis(10));
    }
    g.signal(libc::SIGTERM);
    let (st, body, after) = poll.join().unwrap();
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v, json!({"code": -1, "msg": "timeout"}));
    assert!(after.is_err(), "its connection stayed open");
    assert_eq!(g.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn healthz_and_the_gauges_say_a_node_is_draining() {
    let toml = format!("node_id = \"n1\"\n[drain]\nrate = 1\n{APP}");
    let mut g = Gateway::spawn(Some(&toml), &[]);
    let (st, h) = g.api("GET", "/healthz", b"");
    assert_eq!((st, &h["status"]), (200, &json!("ok")), "{h}");
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    let info = format!(
        "longlink_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(g.metric(&info), 1.0);
    assert_eq!(g.metric("longlink_draining"), 0.0);
    assert!(g.metric("longlink_max_connections") > 0.0);
    // Three clients at one a second: draining for a while.
    let _c: Vec<_> = (0..3).map(|i| g.hello(&format!("d{i}"), None)).collect();
    let (st, _) = g.api("POST", "/v1/drain", b"");
    assert_eq!(st, 200);
    let (st, h) = g.api("GET", "/healthz", b"");
    assert_eq!((st, &h["status"]), (503, &json!("draining")), "{h}");
    assert_eq!(g.metric("longlink_draining"), 1.0);
    g.signal(libc::SIGTERM);
    assert_eq!(g.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn sigusr1_drains_too() {
    let mut g = Gateway::dev();
    let (mut c, _) = g.hello("d", None);
    g.signal(libc::SIGUSR1);
    // Alone, no [drain] endpoints: a REDIRECT without one (dial the usual address again).
    assert_eq!(redirected(&mut c), None);
    assert_eq!(g.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn systemd_hears_ready_with_the_main_pid() {
    let dir = temp_dir("notify");
    let path = dir.0.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let g = Gateway::spawn_env(None, &[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification");
    let msg = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(msg.contains(&format!("MAINPID={}", g.pid)), "{msg}");
}

#[test]
fn the_bundled_client_follows_a_redirect_to_another_gateway() {
    client_follows_a_redirect(false);
}

#[test]
fn the_bundled_client_follows_a_redirect_over_websocket() {
    client_follows_a_redirect(true);
}

/// `longlink client` on gateway a (TCP, or WebSocket pbbp2), a drained: it must move to b,
/// where a push reaches it.
fn client_follows_a_redirect(ws: bool) {
    let http = ["--http", "127.0.0.1:0"];
    let b = Gateway::spawn(None, &http);
    let to = if ws {
        format!("redirect_ws = \"ws://{}/ws\"", b.http)
    } else {
        format!("redirect_tcp = \"{}\"", b.tcp)
    };
    let toml = format!("node_id = \"n1\"\n[drain]\n{to}\n{APP}");
    let mut a = Gateway::spawn(Some(&toml), &http);
    let (flag, addr) = if ws {
        ("--ws", format!("ws://{}/ws", a.http))
    } else {
        ("--tcp", a.tcp.clone())
    };
    let mut client = Command::new(env!("CARGO_BIN_EXE_longlink"))
        .args(["client", flag, &addr, "--device", "moving"])
        .args([
            "--token",
            "demo-token",
            "--count",
            "1",
            "--duration-ms",
            "20000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("HELLO"), "{line}");
    a.api("POST", "/v1/drain", b"");
    assert_eq!(a.wait_exit(Duration::from_secs(5)), Some(0));
    // On gateway b now: a push there reaches it.
    b.wait_until("the client on b", |b| {
        b.api("GET", "/v1/online/device/demo/moving", b"").1["online"] == true
    });
    let transport =
        b.api("GET", "/v1/online/device/demo/moving", b"").1["connections"][0]["transport"].clone();
    assert_eq!(transport, if ws { "ws" } else { "tcp" });
    let (_, v) = b.api("POST", "/v1/push/device/demo/moving", b"after-redirect");
    assert_eq!(v["delivered"], 1, "{v}");
    let mut rest = String::new();
    while !rest.contains("after-redirect") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "client output ended: {rest}"
        );
        rest.push_str(&line);
    }
    assert!(rest.contains("REDIRECT"), "{rest}");
    let _ = client.wait();
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/longlink.service"
    ))
    .unwrap();
    for k in [
        "Type=notify",
        "NotifyAccess=all",
        "LimitNOFILE=",
        "KillMode=mixed",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(k), "{k}");
    }
    // As installed, but with the binary this test built.
    let unit = unit.replace("/usr/local/bin/longlink", env!("CARGO_BIN_EXE_longlink"));
    let dir = temp_dir("unit");
    let path = dir.0.join("longlink.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (scripts/deps.sh installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
}
