//! Backends (docs/PROTOCOL.md, "Backends") against a real HTTP backend process (tests/backends/backend.py)
//! and the real binary: auth callback, upstream routing with ACK/ERROR, dedup and order,
//! session data, events with retries, and isolation from a slow backend.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use longlink::proto::{method, Frame};
use prost::Message;

struct Backend {
    child: Child,
    port: u16,
}

impl Backend {
    fn start() -> Backend {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/backends/backend.py");
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("port line");
        Backend {
            child,
            port: v["port"].as_u64().unwrap() as u16,
        }
    }

    fn log(&self) -> serde_json::Value {
        api_call(&format!("127.0.0.1:{}", self.port), "GET", "/log", b"", &[]).1
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn toml(port: u16) -> String {
    format!(
        r#"node_id = "n1"
[limits]
read_timeout_ms = 30000
ack_timeout_ms = 150
max_retries = 1
reconnect_grace_ms = 400

[[apps]]
id = "a"
auth_url = "http://127.0.0.1:{port}/auth"
auth_timeout_ms = 800
events_url = "http://127.0.0.1:{port}/events?fail=2"
undelivered_url = "http://127.0.0.1:{port}/undelivered"
default_service = 2

[[apps.services]]
id = 2
url = "http://127.0.0.1:{port}/svc"
timeout_ms = 1000

[[apps.services]]
id = 4
url = "http://127.0.0.1:{port}/svc-pb"
format = "protobuf"

[[apps.services]]
id = 5
url = "http://127.0.0.1:{port}/svc"
timeout_ms = 3000
max_inflight = 1

[[apps]]
id = "b"
tokens = ["b-token"]

[[apps.services]]
id = 2
url = "http://127.0.0.1:{port}/svc"
"#
    )
}

fn start() -> (Backend, Gateway) {
    let b = Backend::start();
    let gw = Gateway::spawn(Some(&toml(b.port)), &["--http", "127.0.0.1:0"]);
    (b, gw)
}

fn hello(
    gw: &Gateway,
    app: &str,
    device: &str,
    token: &str,
) -> Result<(Client, String), Box<Frame>> {
    let mut c = gw.connect();
    c.send(&Frame::control(
        method::HELLO,
        1,
        &[("app_id", app), ("device_id", device), ("token", token)],
    ));
    let f = c.recv_within(T).expect("an answer to HELLO");
    if f.method == method::HELLO {
        Ok((c, f.header("conn_id").unwrap().to_string()))
    } else {
        Err(Box::new(f))
    }
}

fn up(seqid: u64, service: i32, payload: &str) -> Frame {
    Frame {
        seqid,
        service,
        method: 7,
        payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
        ..Default::default()
    }
}

fn code(f: &Frame) -> &str {
    f.header("code").unwrap_or("")
}

#[test]
fn auth_callback_admits_and_rejects_over_tcp_and_websocket() {
    let (b, gw) = start();
    let (_c, id) = hello(&gw, "a", "d1", "good").expect("admitted");
    let (_, v) = gw.api("GET", "/v1/online/device/a/d1", b"");
    let conn = &v["connections"][0];
    assert_eq!(
        (conn["conn_id"].as_str(), conn["user_id"].as_str()),
        (Some(id.as_str()), Some("u-d1")),
        "{v}"
    );
    assert_eq!(conn["session"], serde_json::json!({"tier": "gold"}));
    for (token, want) in [
        ("deny", "403"),
        ("nope", "401"),
        ("boom", "502"),
        ("slow", "504"),
    ] {
        let e = hello(&gw, "a", "d2", token)
            .err()
            .unwrap_or_else(|| panic!("{token} admitted"));
        assert_eq!((e.method, code(&e)), (method::ERROR, want), "token {token}");
    }
    let ws = |token: &str| {
        Ws::connect(
            &gw.http,
            &format!("/ws?app_id=a&device_id=w1&token={token}"),
            &[],
        )
    };
    assert!(ws("good").is_ok());
    for (token, want) in [("deny", 403), ("nope", 401), ("boom", 502)] {
        assert_eq!(ws(token).err().unwrap().0, want, "ws token {token}");
    }
    let log = b.log();
    let auths = log["auth"].as_array().unwrap();
    assert!(auths
        .iter()
        .any(|a| a["transport"] == "ws" && a["device_id"] == "w1"));
    assert!(
        auths.iter().all(|a| a["remote_addr"]
            .as_str()
            .is_some_and(|r| r.starts_with("127.0.0.1:"))),
        "{log}"
    );
    let m = gw.metrics();
    assert!(m["longlink_backend_timeouts_total{app=\"a\",target=\"auth\"}"] >= 1.0);
    assert!(m["longlink_backend_errors_total{app=\"a\",target=\"auth\"}"] >= 2.0);
}

#[test]
fn upstream_answers_acks_errors_and_dedups() {
    let (b, gw) = start();
    let (mut c, id) = hello(&gw, "a", "up1", "good").unwrap();
    c.send(&up(10, 2, "hi"));
    let ack = c.recv();
    assert_eq!((ack.method, ack.seqid), (method::ACK, 10));
    let ans = c.recv();
    assert_eq!(
        (
            ans.seqid,
            ans.service,
            ans.method,
            &ans.payload[..],
            ans.payload_type.as_str()
        ),
        (10, 2, 7, &b"echo:hi"[..], "text")
    );
    let log = b.log();
    let sent = log["svc"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (
            &sent["conn_id"],
            &sent["device_id"],
            &sent["user_id"],
            &sent["seqid"],
            &sent["method"],
            &sent["payload"]
        ),
        (
            &serde_json::json!(id),
            &serde_json::json!("up1"),
            &serde_json::json!("u-up1"),
            &serde_json::json!(10),
            &serde_json::json!(7),
            &serde_json::json!("hi")
        )
    );
    assert_eq!(sent["session"], serde_json::json!({"tier": "gold"}));

    // Unknown service, backend 500, backend timeout.
    c.send(&up(11, 9, "x"));
    let e = c.recv();
    assert_eq!((e.method, e.seqid, code(&e)), (method::ERROR, 11, "404"));
    c.send(&up(12, 2, "fail"));
    let e = c.recv();
    assert_eq!((e.method, e.seqid, code(&e)), (method::ERROR, 12, "502"));
    c.send(&up(13, 2, "sleep"));
    let e = c.recv();
    assert_eq!((e.method, e.seqid, code(&e)), (method::ERROR, 13, "504"));

    // A retransmission (in flight — both in one write — then after the answer) reaches the
    // backend once.
    let mut two = vec![];
    longlink::codec::encode_tcp(&up(20, 2, "dup"), &mut two).unwrap();
    longlink::codec::encode_tcp(&up(20, 2, "dup"), &mut two).unwrap();
    c.send_raw(&two);
    let got: Vec<_> = (0..2).map(|_| c.recv()).collect();
    assert_eq!(
        (got[0].method, got[1].seqid, &got[1].payload[..]),
        (method::ACK, 20, &b"echo:dup"[..])
    );
    c.send(&up(20, 2, "dup"));
    let again = c.recv();
    assert_eq!(
        (again.method, again.seqid),
        (method::ACK, 20),
        "an answered retransmission is ACKed again"
    );
    assert!(c.drain_with_ping(99).is_empty());
    let dups = b.log()["svc"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["payload"] == "dup")
        .count();
    assert_eq!(dups, 1);
    assert_eq!(gw.metric("longlink_upstream_dedup_total"), 2.0);

    // Session changes travel with later calls.
    let (st, v) = gw.api(
        "PUT",
        &format!("/v1/session/{id}"),
        br#"{"room":"r1","tier":null}"#,
    );
    assert_eq!((st, &v["updated"]), (200, &serde_json::json!(true)));
    c.send(&up(21, 2, "s"));
    c.recv();
    c.recv();
    let last = b.log()["svc"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["session"], serde_json::json!({"room": "r1"}));
    let (_, v) = gw.api("PUT", "/v1/session/n1:999:1", br#"{"k":"v"}"#);
    assert_eq!(v["updated"], false);
    let (st, _) = gw.api("PUT", &format!("/v1/session/{id}"), b"[1]");
    assert_eq!(st, 400);

    // The protobuf request format.
    c.send(&up(22, 4, "pb"));
    assert_eq!(c.recv().method, method::ACK);
    let ans = c.recv();
    assert!(ans.payload.starts_with(b"pb:"), "{ans:?}");
    let last = b.log()["svc"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["conn_id"], serde_json::json!(id));
}

#[test]
fn requests_from_one_connection_reach_the_backend_in_order() {
    let (b, gw) = start();
    let (mut c, _) = hello(&gw, "a", "ord", "good").unwrap();
    let mut wire = vec![];
    for i in 0..12u64 {
        longlink::codec::encode_tcp(&up(100 + i, 2, &format!("m{i}")), &mut wire).unwrap();
    }
    c.send_raw(&wire);
    let mut answers = vec![];
    while answers.len() < 12 {
        let f = c.recv();
        if f.method == 7 {
            answers.push(f.seqid);
        }
    }
    assert_eq!(answers, (100..112).collect::<Vec<_>>());
    let seen: Vec<u64> = b.log()["svc"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["seqid"].as_u64())
        .collect();
    assert_eq!(seen, (100..112).collect::<Vec<_>>());
}

#[test]
fn a_saturated_service_answers_busy_at_once() {
    let (_b, gw) = start();
    // Service 5 allows one call in flight and one queued.
    let mut conns: Vec<Client> = (0..3)
        .map(|i| hello(&gw, "a", &format!("busy{i}"), "good").unwrap().0)
        .collect();
    for c in conns.iter_mut() {
        c.send(&up(1, 5, "sleep"));
    }
    // One call runs and one waits; a later one is refused at once.
    let start = Instant::now();
    gw.wait_until("a busy answer", |g| {
        g.metric("longlink_backend_busy_total{app=\"a\",target=\"service:5\"}") >= 1.0
    });
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "busy took {:?}",
        start.elapsed()
    );
    let mut refused = vec![];
    for (i, c) in conns.iter_mut().enumerate().skip(1) {
        for f in c.drain_with_ping(50 + i as u64) {
            assert_eq!((f.method, code(&f)), (method::ERROR, "503"), "{f:?}");
            refused.push(i);
        }
    }
    // The first call may still sit in the lane's queue when both later ones arrive: then
    // both are refused. Either way nobody waits to be told.
    assert!(!refused.is_empty(), "no later caller was told busy");
    assert!(gw.metric("longlink_backend_busy_total{app=\"a\",target=\"service:5\"}") >= 1.0);
}

#[test]
fn events_arrive_in_order_with_retries() {
    let (b, gw) = start();
    let (c1, id1) = hello(&gw, "a", "ev1", "good").unwrap();
    drop(c1);
    gw.wait_until("ev1 offline", |g| {
        g.api("GET", "/v1/online/device/a/ev1", b"").1["online"] == false
    });
    let (c2, id2) = hello(&gw, "a", "ev2", "good").unwrap();
    drop(c2);
    let want = [
        ("online", &id1),
        ("offline", &id1),
        ("online", &id2),
        ("offline", &id2),
    ];
    let mut got = vec![];
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let log = b.log();
        got = log["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e.get("rejected").is_none())
            .map(|e| {
                (
                    e["event"].as_str().unwrap().to_string(),
                    e["conn_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        if got.len() >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(k, id)| (k.to_string(), id.to_string()))
        .collect();
    assert_eq!(got, want);
    let log = b.log();
    let first = &log["events"][2];
    assert_eq!(
        (&first["device_id"], &first["user_id"], &first["transport"]),
        (
            &serde_json::json!("ev1"),
            &serde_json::json!("u-ev1"),
            &serde_json::json!("tcp")
        )
    );
    assert_eq!(first["session"], serde_json::json!({"tier": "gold"}));
    assert!(first["at_ms"].as_u64().unwrap() > 1_600_000_000_000);
    // The backend refused the first two tries; the same event was retried and delivered.
    assert_eq!(
        log["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e.get("rejected").is_some())
            .count(),
        2
    );
    // Counted once the POST returns, just after the backend logged it.
    gw.wait_until("4 events counted", |g| {
        g.metric("longlink_events_sent_total") == 4.0
    });
    assert_eq!(gw.metric("longlink_events_failed_total"), 0.0);
}

#[test]
fn a_backend_that_sleeps_does_not_delay_pushes_pings_or_other_apps() {
    let (_b, gw) = start();
    let (mut slow, slow_id) = hello(&gw, "a", "slowpoke", "good").unwrap();
    let (mut other, _) = hello(&gw, "b", "bee", "b-token").unwrap();
    slow.send(&up(1, 2, "sleep")); // the backend holds this for 2 s
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    // A push to the waiting connection.
    let (_, v) = gw.api("POST", &format!("/v1/push/conn/{slow_id}"), b"pushed");
    assert_eq!(v["delivered"], 1);
    assert_eq!(&slow.recv().payload[..], b"pushed");
    // Its pings.
    slow.send(&Frame::control(method::PING, 5, &[]));
    let pong = slow.recv();
    assert_eq!((pong.method, pong.seqid), (method::PONG, 5));
    // Another app's upstream call.
    other.send(&up(9, 2, "quick"));
    assert_eq!(other.recv().method, method::ACK);
    assert_eq!(&other.recv().payload[..], b"echo:quick");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(900),
        "push + ping + other app's round trip took {took:?} behind a 2 s backend call"
    );
    // And the slow call is answered: with 504, as the service's timeout (1 s) is shorter
    // than the backend's sleep.
    let f = slow.recv_within(Duration::from_secs(5)).unwrap();
    assert_eq!((f.method, f.seqid, code(&f)), (method::ERROR, 1, "504"));
}

#[test]
fn raw_websocket_messages_go_to_the_default_http_service() {
    let (b, gw) = start();
    let mut ws = Ws::connect(&gw.http, "/ws?app_id=a&device_id=rawup&token=good", &[]).unwrap();
    ws.text("from the browser");
    let f = ws.recv();
    assert_eq!((f.opcode, f.text()), (1, "echo:from the browser"));
    let last = b.log()["svc"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (
            &last["transport"],
            &last["device_id"],
            &last["payload_type"]
        ),
        (
            &serde_json::json!("ws"),
            &serde_json::json!("rawup"),
            &serde_json::json!("text")
        )
    );
}

#[test]
fn check_config_validates_backend_keys() {
    let dir = temp_dir("bcfg");
    let p = dir.0.join("b.toml");
    std::fs::write(&p, "[[apps]]\nid = \"a\"\nauth_url = \"https://x/auth\"\n[[apps.services]]\nid = 2\nurl = \"ftp://x\"\nformat = \"xml\"\nmax_inflight = 0\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_longlink"))
        .arg("check-config")
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    for needle in [":3: auth_url", ":6: url", ":7: format", ":8: max_inflight"] {
        assert!(err.contains(needle), "{needle} missing:\n{err}");
    }
}

#[test]
fn a_retry_after_a_failed_call_reaches_the_backend_again() {
    let (b, gw) = start();
    let (mut c, _) = hello(&gw, "a", "retry", "good").unwrap();
    c.send(&up(31, 2, "fail"));
    let e = c.recv();
    assert_eq!((e.method, e.seqid, code(&e)), (method::ERROR, 31, "502"));
    // The client retries the same seqid: not a duplicate, since nothing was delivered.
    c.send(&up(31, 2, "fail"));
    let e = c.recv();
    assert_eq!((e.method, code(&e)), (method::ERROR, "502"));
    let fails = b.log()["svc"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["seqid"] == 31)
        .count();
    assert_eq!(fails, 2);
}

#[test]
fn sigterm_sends_the_offline_events_before_exiting() {
    let (b, mut gw) = start();
    let (_c, id) = hello(&gw, "a", "bye1", "good").unwrap();
    let _ws = Ws::connect(&gw.http, "/ws?app_id=a&device_id=bye2&token=good", &[]).unwrap();
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    let log = b.log();
    let offline: Vec<(String, String)> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "offline")
        .map(|e| {
            (
                e["device_id"].as_str().unwrap().to_string(),
                e["transport"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(offline.contains(&("bye1".into(), "tcp".into())), "{log}");
    assert!(offline.contains(&("bye2".into(), "ws".into())), "{log}");
    assert!(log["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["conn_id"] == id.as_str() && e["event"] == "online"));
}

#[test]
fn a_misconfigured_auth_backend_is_counted_and_clients_get_no_internal_detail() {
    // A wrong path (the backend answers 404) and a port nobody listens on.
    let b = Backend::start();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let cfg = format!(
        "node_id = \"n1\"\n[[apps]]\nid = \"p\"\nauth_url = \"http://127.0.0.1:{}/no-such-path\"\n[[apps]]\nid = \"d\"\nauth_url = \"http://127.0.0.1:{dead_port}/auth\"\n",
        b.port
    );
    let gw = Gateway::spawn(Some(&cfg), &[]);
    let e = hello(&gw, "p", "x", "t").err().expect("refused");
    assert_eq!(
        (code(&e), e.header("message")),
        ("502", Some("auth backend answered 404"))
    );
    let e = hello(&gw, "d", "x", "t").err().expect("refused");
    // (The OS error and the address go to the log, not to the client.)
    assert_eq!(
        (code(&e), e.header("message")),
        ("502", Some("auth backend unreachable"))
    );
    let m = gw.metrics();
    assert_eq!(
        m["longlink_backend_errors_total{app=\"p\",target=\"auth\"}"],
        1.0
    );
    assert_eq!(
        m["longlink_backend_errors_total{app=\"d\",target=\"auth\"}"],
        1.0
    );
}

#[test]
fn events_keep_their_order_across_a_live_upgrade() {
    // A slow webhook (120 ms an event): the old process still has online events waiting
    // when the new one takes over and closes the same connections. Before, the new process
    // posted their offline events at once, ahead of the old one's onlines.
    let b = Backend::start();
    let cfg = |node: &str| {
        format!(
            "node_id = \"{node}\"\n[[apps]]\nid = \"e\"\ntokens = [\"t\"]\nevents_url = \"http://127.0.0.1:{}/events?delay_ms=120\"\n",
            b.port
        )
    };
    let mut gw = Gateway::spawn(Some(&cfg("n1")), &[]);
    let n = 8;
    let clients: Vec<(Client, String)> = (0..n)
        .map(|i| hello(&gw, "e", &format!("d{i}"), "t").unwrap())
        .collect();
    // First an upgrade the new process refuses after the state (and the reports in it)
    // went over: they come back, and go on in order.
    let file = gw.dir.as_ref().unwrap().0.join("longlink.toml");
    std::fs::write(&file, cfg("n2")).unwrap();
    gw.signal(libc::SIGHUP);
    let end = Instant::now() + Duration::from_secs(15);
    while gw.metric("longlink_upgrades_failed_total") < 1.0 {
        assert!(Instant::now() < end, "the upgrade did not fail");
        std::thread::sleep(Duration::from_millis(20));
    }
    let posted = b.log()["events"].as_array().unwrap().len();
    assert!(
        posted < n,
        "{posted} of {n} posted already: the test is too slow to tell"
    );
    std::fs::write(&file, cfg("n1")).unwrap();
    gw.upgrade();
    let ids: Vec<String> = clients.iter().map(|(_, id)| id.clone()).collect();
    drop(clients);
    let end = Instant::now() + Duration::from_secs(15);
    let events = loop {
        let log = b.log();
        let ev = log["events"].as_array().unwrap().clone();
        if ev.len() >= 2 * n || Instant::now() > end {
            break ev;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let got: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["conn_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // Every online, then every offline (the old process's reports, then the new one's);
    // each once, none lost.
    let mut want: Vec<(String, String)> =
        ids.iter().map(|i| ("online".into(), i.clone())).collect();
    want.extend(ids.iter().map(|i| ("offline".into(), i.clone())));
    let (mut a, mut w) = (got[..n.min(got.len())].to_vec(), want[..n].to_vec());
    a.sort();
    w.sort();
    assert_eq!(a, w, "the first {n} are the onlines: {got:?}");
    assert_eq!(got.len(), 2 * n, "{got:?}");
    let mut rest = got[n..].to_vec();
    rest.sort();
    let mut offs = want[n..].to_vec();
    offs.sort();
    assert_eq!(rest, offs, "{got:?}");
}

/// The backend's undelivered reports once there are `n` of them, by device id.
fn undelivered(b: &Backend, n: usize) -> Vec<serde_json::Value> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let list = b.log()["undelivered"].as_array().unwrap().clone();
        if list.len() >= n || Instant::now() > end {
            return list;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn late_failures_are_posted_to_undelivered_url_with_their_reason() {
    let (b, gw) = start();
    // Retries run out (150 ms, then one retransmit 300 ms later).
    let (_c1, id1) = hello(&gw, "a", "ud1", "good").unwrap();
    gw.api(
        "POST",
        &format!("/v1/push/conn/{id1}?ack=1&logid=42&service=3&method=7"),
        b"r1",
    );
    // Its TTL passes first.
    let (_c2, _) = hello(&gw, "a", "ud2", "good").unwrap();
    gw.api("POST", "/v1/push/device/a/ud2?ack=1&ttl_ms=60", b"r2");
    // Its device goes and stays away past the grace window.
    let (c3, _) = hello(&gw, "a", "ud3", "good").unwrap();
    gw.api("POST", "/v1/push/user/a/u-ud3?ack=1", b"r3");
    drop(c3);
    // Given up inside a wait: the API answer says so and no report is posted.
    let (_c4, id4) = hello(&gw, "a", "ud4", "good").unwrap();
    let (_, v) = gw.api(
        "POST",
        &format!("/v1/push/conn/{id4}?ack=1&wait_ms=5000"),
        b"r4",
    );
    assert_eq!(v["undelivered"], 1, "{v}");
    // A plain push that is never ACKed is nobody's failure.
    gw.api("POST", &format!("/v1/push/conn/{id4}"), b"r5");

    let list = undelivered(&b, 3);
    let mut got: Vec<(String, String, String)> = list
        .iter()
        .map(|e| {
            assert_eq!(
                (e["event"].as_str(), e["app_id"].as_str()),
                (Some("undelivered"), Some("a"))
            );
            (
                e["device_id"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap().to_string(),
                e["payload_base64"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("ud1".into(), "no_ack".into(), "cjE=".into()),
            ("ud2".into(), "expired".into(), "cjI=".into()),
            ("ud3".into(), "offline".into(), "cjM=".into()),
        ]
    );
    let r1 = list.iter().find(|e| e["device_id"] == "ud1").unwrap();
    assert_eq!(
        (
            &r1["logid"],
            &r1["service"],
            &r1["method"],
            &r1["retransmits"],
            &r1["conn_id"]
        ),
        (
            &42.into(),
            &3.into(),
            &7.into(),
            &1.into(),
            &serde_json::json!(id1)
        ),
        "{r1}"
    );
    let r3 = list.iter().find(|e| e["device_id"] == "ud3").unwrap();
    assert_eq!(
        (&r3["user_id"], &r3["conn_id"]),
        (&"u-ud3".into(), &serde_json::Value::Null),
        "{r3}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        b.log()["undelivered"].as_array().unwrap().len(),
        3,
        "a report too many"
    );
    let m = gw.metrics();
    assert_eq!(
        (
            m["longlink_undelivered_pushes_total"],
            m["longlink_undelivered_reports_sent_total"]
        ),
        (4.0, 3.0)
    );
}

#[test]
fn pushes_unacknowledged_at_shutdown_are_reported() {
    let (b, mut gw) = start();
    let (_c, _) = hello(&gw, "a", "sd1", "good").unwrap();
    gw.api(
        "POST",
        "/v1/push/device/a/sd1?ack=1&ttl_ms=60000",
        b"last words",
    );
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    let list = b.log()["undelivered"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(
        (&list[0]["device_id"], &list[0]["reason"]),
        (&"sd1".into(), &"shutdown".into())
    );
}

#[test]
fn an_auth_answer_that_is_not_the_expected_json_refuses_the_client() {
    let (_b, gw) = start();
    // 200 with a body that is not JSON, or a session over the limits of PUT /v1/session:
    // a backend error, not an admission.
    for token in ["notjson", "bigsession"] {
        let e = hello(&gw, "a", "d-bad", token)
            .err()
            .unwrap_or_else(|| panic!("{token} admitted"));
        assert_eq!(
            (e.method, code(&e)),
            (method::ERROR, "502"),
            "token {token}"
        );
        let ws = Ws::connect(
            &gw.http,
            &format!("/ws?app_id=a&device_id=w-bad&token={token}"),
            &[],
        );
        assert_eq!(ws.err().map(|e| e.0), Some(502), "ws token {token}");
    }
    let (_, v) = gw.api("GET", "/v1/online/device/a/d-bad", b"");
    assert_eq!(v["online"], false, "{v}");
    let m = gw.metrics();
    assert_eq!(
        m["longlink_backend_bad_answers_total{app=\"a\",target=\"auth\"}"],
        4.0
    );
    // A well-formed answer still admits.
    assert!(hello(&gw, "a", "d-good", "good").is_ok());
}

#[test]
fn a_reply_too_big_for_the_transport_becomes_an_error_with_its_seqid() {
    let (_b, gw) = start();
    let (mut c, _) = hello(&gw, "a", "big-tcp", "good").unwrap();
    // 70,000 bytes cannot fit a TCP frame (u16 length): ACK, then ERROR 413 with the
    // frame's seqid, and the stream stays in step.
    c.send(&up(5, 2, "big:70000"));
    let ack = c.recv();
    assert_eq!((ack.method, ack.seqid), (method::ACK, 5));
    let e = c.recv();
    assert_eq!(
        (e.method, e.seqid, code(&e)),
        (method::ERROR, 5, "413"),
        "{e:?}"
    );
    assert!(
        e.header("message").unwrap().contains("does not fit"),
        "{e:?}"
    );
    // The connection is usable: a normal call and a PING.
    c.send(&up(6, 2, "hi"));
    assert_eq!(c.recv().method, method::ACK);
    assert_eq!(&c.recv().payload[..], b"echo:hi");
    assert!(c.drain_with_ping(7).is_empty());
    // The largest reply that fits goes through whole: 65,535 bytes of frame.
    c.send(&up(8, 2, &format!("big:{}", 65_535 - 16)));
    assert_eq!(c.recv().method, method::ACK);
    let f = c.recv();
    assert_eq!((f.seqid, f.payload.len()), (8, 65_535 - 16));
    assert!(f.encoded_len() <= 65_535);
    // pbbp2 carries a 70,000-byte reply (it fits a WebSocket message), but not one over the
    // message limit (max_message_bytes, 1 MiB by default).
    let mut ws = Ws::connect(
        &gw.http,
        "/ws?app_id=a&device_id=big-ws&token=good",
        &[("Sec-WebSocket-Protocol", "pbbp2")],
    )
    .unwrap();
    let decode = |f: WsFrame| Frame::decode(&f.payload[..]).unwrap();
    assert_eq!(decode(ws.recv()).method, method::HELLO);
    ws.send(true, 2, &up(9, 2, "big:70000").encode_to_vec());
    assert_eq!(decode(ws.recv()).method, method::ACK);
    assert_eq!(decode(ws.recv()).payload.len(), 70_000);
    ws.send(true, 2, &up(10, 2, "big:2000000").encode_to_vec());
    assert_eq!(decode(ws.recv()).method, method::ACK);
    let e = decode(ws.recv());
    assert_eq!((e.method, e.seqid, code(&e)), (method::ERROR, 10, "413"));
    let ping = Frame::control(method::PING, 11, &[]);
    ws.send(true, 2, &ping.encode_to_vec());
    assert_eq!(decode(ws.recv()).method, method::PONG);
    assert_eq!(gw.metric("longlink_frames_too_large_out_total"), 2.0);
}

#[test]
fn frames_are_bounded_by_the_output_bound_and_small_limits_do_not_starve_control_frames() {
    // A 16 KiB output bound: a 20 KB answer fits a TCP frame but could never be received
    // whole, so it is refused with ERROR 413 rather than closing the client. A tiny
    // WebSocket message limit (an inbound limit) does not stop the pbbp2 HELLO or ERRORs.
    let b = Backend::start();
    let toml = toml(b.port).replace(
        "[limits]\n",
        "[limits]\nmax_output_bytes = 16384\nmax_message_bytes = 16\n",
    );
    let gw = Gateway::spawn(Some(&toml), &["--http", "127.0.0.1:0"]);
    let (mut c, _) = hello(&gw, "a", "small-out", "good").unwrap();
    c.send(&up(3, 2, "big:20000"));
    assert_eq!(c.recv().method, method::ACK);
    let e = c.recv();
    assert_eq!(
        (e.method, e.seqid, code(&e)),
        (method::ERROR, 3, "413"),
        "{e:?}"
    );
    assert!(c.drain_with_ping(4).is_empty());
    let mut ws = Ws::connect(
        &gw.http,
        "/ws?app_id=a&device_id=small-ws&token=good",
        &[("Sec-WebSocket-Protocol", "pbbp2")],
    )
    .unwrap();
    let hello = Frame::decode(&ws.recv().payload[..]).unwrap();
    assert_eq!(hello.method, method::HELLO);
    assert_eq!(gw.metric("longlink_frames_too_large_out_total"), 1.0);
}

#[test]
fn an_answer_right_at_the_output_bound_is_delivered_or_refused_never_a_close() {
    // The ACK goes out just ahead of the answer: together they must fit, or the answer is
    // refused with ERROR 413; the client is never closed for it.
    let b = Backend::start();
    let toml = toml(b.port).replace("[limits]\n", "[limits]\nmax_output_bytes = 4096\n");
    let gw = Gateway::spawn(Some(&toml), &[]);
    let (mut c, _) = hello(&gw, "a", "edge", "good").unwrap();
    let mut seq = 10;
    for n in (4040..4100).step_by(2) {
        seq += 1;
        c.send(&up(seq, 2, &format!("big:{n}")));
        assert_eq!(c.recv().method, method::ACK, "size {n}");
        let f = c
            .recv_within(T)
            .unwrap_or_else(|| panic!("closed at an answer of {n} bytes"));
        assert_eq!(f.seqid, seq);
        assert!(
            f.payload.len() == n || (f.method == method::ERROR && code(&f) == "413"),
            "size {n}: {f:?}"
        );
    }
    assert_eq!(
        gw.metric("longlink_connections_closed_total{reason=\"slow_consumer\"}"),
        0.0
    );
}

#[test]
fn a_hello_held_by_a_slow_auth_backend_is_closed_by_the_handshake_timeout() {
    // The HELLO goes out with the connect, so the gateway nearly always reads it at
    // accept; the auth backend then holds it 2 s ("slow"), past the handshake timeout
    // and within auth_timeout_ms: the handshake timer, armed for a connection still
    // waiting on its backend, closes it. A connection admitted at once by static tokens
    // needs no such timer and stays.
    let b = Backend::start();
    let cfg = toml(b.port)
        .replace("auth_timeout_ms = 800", "auth_timeout_ms = 5000")
        .replace("[limits]\n", "[limits]\nhandshake_timeout_ms = 400\n");
    let gw = Gateway::spawn(Some(&cfg), &[]);
    let (mut prompt, _) = hello(&gw, "b", "prompt", "b-token").unwrap();
    let start = Instant::now();
    let mut c = gw.connect();
    c.send(&Frame::control(
        method::HELLO,
        1,
        &[("app_id", "a"), ("device_id", "held"), ("token", "slow")],
    ));
    assert!(c.frames_until_eof(Duration::from_secs(5)).is_empty());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(390) && took < Duration::from_millis(1900),
        "closed after {took:?}, not by the 400 ms handshake timeout"
    );
    assert_eq!(
        gw.metric("longlink_connections_closed_total{reason=\"handshake_timeout\"}"),
        1.0
    );
    prompt.send(&Frame::control(method::PING, 3, &[]));
    assert_eq!(prompt.recv().method, method::PONG);
}
