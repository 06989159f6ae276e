//! The TCP transport and the core, against the real binary on loopback.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use longlink::proto::{method, Frame};
use prost::Message;

fn code(f: &Frame) -> &str {
    f.header("code").unwrap_or("")
}

#[test]
fn hello_split_into_single_bytes_is_handled() {
    let gw = Gateway::dev();
    let mut c = gw.connect();
    let mut wire = vec![];
    let hello = Frame::control(
        method::HELLO,
        41,
        &[("app_id", "demo"), ("device_id", "trickle"), ("token", "x")],
    );
    longlink::codec::encode_tcp(&hello, &mut wire).unwrap();
    for b in &wire {
        c.s.write_all(std::slice::from_ref(b)).unwrap();
        // Separate segments: nodelay is on, and a pause lets each one be read on its own.
        std::thread::sleep(Duration::from_millis(2));
    }
    let f = c.recv();
    assert_eq!((f.method, f.seqid), (method::HELLO, 41));
    assert!(f.header("conn_id").unwrap().starts_with("n1:"));
    assert_eq!(f.header("heartbeat_s"), Some("25"));
    assert_eq!(f.header("max_frame_bytes"), Some("65535"));
    // And a PING split the same way.
    let mut ping = vec![];
    longlink::codec::encode_tcp(&Frame::control(method::PING, 42, &[]), &mut ping).unwrap();
    for b in &ping {
        c.s.write_all(std::slice::from_ref(b)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let f = c.recv();
    assert_eq!((f.method, f.seqid), (method::PONG, 42));
}

/// The gateway reads a connection's first bytes right after accept, before it registers the
/// socket with epoll, and skips the read after an answered HELLO when nothing came since.
/// Each way a client's bytes can fall around those points is answered, and nothing waits
/// for an event that never comes.
#[test]
fn first_bytes_before_or_after_accept_and_a_fin_right_behind_the_hello() {
    let gw = Gateway::dev();
    let hello = |device: &str| {
        let mut w = vec![];
        let f = Frame::control(
            method::HELLO,
            5,
            &[("app_id", "demo"), ("device_id", device), ("token", "x")],
        );
        longlink::codec::encode_tcp(&f, &mut w).unwrap();
        w
    };
    // Silent at accept (registered with nothing read), speaking later.
    let mut late = gw.connect();
    std::thread::sleep(Duration::from_millis(200));
    late.send_raw(&hello("late"));
    assert_eq!(late.recv().method, method::HELLO);
    std::thread::sleep(Duration::from_millis(100)); // resumed, nothing read since
    late.send(&Frame::control(method::PING, 6, &[]));
    let f = late.recv();
    assert_eq!((f.method, f.seqid), (method::PONG, 6));
    // Half a HELLO at accept, the rest once registered.
    let mut split = gw.connect();
    let w = hello("split");
    split.send_raw(&w[..5]);
    std::thread::sleep(Duration::from_millis(100));
    split.send_raw(&w[5..]);
    assert_eq!(split.recv().method, method::HELLO);
    // A HELLO and the FIN right behind it: answered, then closed on the server's side too
    // (the FIN, already there when the socket was registered, brings its event).
    let before = gw.metric("longlink_connections{transport=\"tcp\"}");
    let mut fin = gw.connect();
    fin.send_raw(&hello("fin"));
    fin.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(fin.recv().method, method::HELLO);
    // EOF, not a timeout: the server closed it (its read timeout is far off).
    assert_eq!(fin.try_recv(Duration::from_secs(5)), Err(()));
    gw.wait_until("the half-closed connection counted closed", |g| {
        g.metric("longlink_connections{transport=\"tcp\"}") <= before
    });
    // The others are untouched.
    late.send(&Frame::control(method::PING, 7, &[]));
    assert_eq!(late.recv().seqid, 7);
}

#[test]
fn a_hundred_frames_in_one_write_are_each_answered_in_order() {
    let gw = Gateway::dev();
    // HELLO and 100 PINGs in one write: the PINGs wait while the HELLO is with a worker.
    let mut c = gw.connect();
    let mut wire = vec![];
    let hello = Frame::control(
        method::HELLO,
        1,
        &[("app_id", "demo"), ("device_id", "burst")],
    );
    longlink::codec::encode_tcp(&hello, &mut wire).unwrap();
    for i in 0..100u64 {
        longlink::codec::encode_tcp(&Frame::control(method::PING, 1000 + i, &[]), &mut wire)
            .unwrap();
    }
    c.send_raw(&wire);
    assert_eq!(c.recv().method, method::HELLO);
    for i in 0..100u64 {
        let f = c.recv();
        assert_eq!((f.method, f.seqid), (method::PONG, 1000 + i));
    }
    // And 100 more after the handshake, in one write.
    let mut wire = vec![];
    for i in 0..100u64 {
        longlink::codec::encode_tcp(&Frame::control(method::PING, 5000 + i, &[]), &mut wire)
            .unwrap();
    }
    c.send_raw(&wire);
    for i in 0..100u64 {
        let f = c.recv();
        assert_eq!((f.method, f.seqid), (method::PONG, 5000 + i));
    }
    assert_eq!(
        gw.metric("longlink_frames_in_total{transport=\"tcp\"}"),
        201.0
    );
}

#[test]
fn a_device_push_reaches_all_its_connections_and_no_one_else() {
    let gw = Gateway::dev();
    let (mut a1, _) = gw.hello("phone", Some("alice"));
    let (mut a2, _) = gw.hello("phone", Some("alice"));
    let (mut b, _) = gw.hello("tablet", Some("bob"));
    let (st, v) = gw.api(
        "POST",
        "/v1/push/device/demo/phone?payload_type=text",
        b"ring",
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["delivered"], 2);
    for c in [&mut a1, &mut a2] {
        let f = c.recv();
        assert_eq!(
            (f.service, f.method, &f.payload[..], f.payload_type.as_str()),
            (0, method::PUSH, &b"ring"[..], "text")
        );
        assert_eq!(f.seqid, 1, "first downstream seqid");
    }
    assert!(
        b.drain_with_ping(7).is_empty(),
        "another device got the push"
    );

    // By user, and downstream seqids keep increasing per connection.
    let (_, v) = gw.api("POST", "/v1/push/user/demo/alice", b"u");
    assert_eq!(v["delivered"], 2);
    assert_eq!(a1.recv().seqid, 2);
    // Broadcast to the app.
    let (_, v) = gw.api("POST", "/v1/push/broadcast/demo", b"all");
    assert_eq!(v["delivered"], 3);
    for c in [&mut a1, &mut b] {
        let f = c.recv();
        assert_eq!(&f.payload[..], b"all");
    }
    // Offline device and user are named.
    let (_, v) = gw.api("POST", "/v1/push/device/demo/nobody", b"x");
    assert_eq!(
        v,
        serde_json::json!({"delivered":0,"offline":["nobody"],"dropped":[]})
    );
    let (_, v) = gw.api("POST", "/v1/push/user/demo/ghost", b"x");
    assert_eq!(v["offline"], serde_json::json!(["ghost"]));
}

#[test]
fn a_push_to_a_stale_conn_id_reaches_nobody() {
    let gw = Gateway::dev();
    let (mut old, old_id) = gw.hello("d-old", None);
    old.send(&Frame::control(method::BYE, 2, &[("reason", "done")]));
    assert!(old.frames_until_eof(T).is_empty());
    // An orderly close: the gateway waits for this side's FIN before its slot is free.
    drop(old);
    gw.wait_until("old connection gone", |g| {
        g.metric("longlink_connections{transport=\"tcp\"}") == 0.0
    });
    // The freed slot goes to the next connection, with a new generation.
    let (mut new, new_id) = gw.hello("d-new", None);
    let (o, n): (Vec<&str>, Vec<&str>) = (old_id.split(':').collect(), new_id.split(':').collect());
    assert_eq!(o[1], n[1], "slot reused ({old_id} → {new_id})");
    assert_ne!(o[2], n[2], "generation bumped");

    let (st, v) = gw.api(
        "POST",
        &format!("/v1/push/conn/{old_id}"),
        b"for the old tenant",
    );
    assert_eq!(st, 200);
    assert_eq!(
        v,
        serde_json::json!({"delivered":0,"offline":[old_id],"dropped":[]})
    );
    assert!(
        new.drain_with_ping(3).is_empty(),
        "the slot's new tenant got a stale push"
    );
    // The live id works.
    let (_, v) = gw.api("POST", &format!("/v1/push/conn/{new_id}"), b"hi");
    assert_eq!(v["delivered"], 1);
    assert_eq!(&new.recv().payload[..], b"hi");
    // A conn id of another node is not ours.
    let other = format!("n9:{}:{}", n[1], n[2]);
    let (_, v) = gw.api("POST", &format!("/v1/push/conn/{other}"), b"x");
    assert_eq!(v["delivered"], 0);
}

#[test]
fn silent_connections_time_out_and_pinging_ones_stay() {
    let gw = Gateway::with_config(&config(
        "[limits]\nread_timeout_ms = 400\nping_interval_ms = 150\n",
    ));
    let (mut silent, _) = gw.hello("silent", None);
    let (mut pinger, _) = gw.hello("pinger", None);
    let start = Instant::now();
    let mut seq = 10;
    // Ping every 100 ms for 1.2 s: three read timeouts' worth.
    while start.elapsed() < Duration::from_millis(1200) {
        seq += 1;
        pinger.send(&Frame::control(method::PING, seq, &[]));
        assert_eq!(pinger.recv().seqid, seq);
        std::thread::sleep(Duration::from_millis(100));
    }
    // The silent one was closed (EOF), not before the timeout.
    assert!(silent
        .frames_until_eof(Duration::from_millis(100))
        .is_empty());
    assert_eq!(
        gw.metric("longlink_connections_closed_total{reason=\"read_timeout\"}"),
        1.0
    );
    let (_, v) = gw.api("GET", "/v1/online/device/demo/pinger", b"");
    assert_eq!(v["online"], true);
    let (_, v) = gw.api("GET", "/v1/online/device/demo/silent", b"");
    assert_eq!(v["online"], false);
}

#[test]
fn a_connection_without_hello_is_closed_after_the_handshake_timeout() {
    let gw = Gateway::with_config(&config("[limits]\nhandshake_timeout_ms = 300\n"));
    let start = Instant::now();
    let mut c = gw.connect();
    assert!(c.frames_until_eof(T).is_empty());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(290),
        "closed too early: {took:?}"
    );
    assert_eq!(
        gw.metric("longlink_connections_closed_total{reason=\"handshake_timeout\"}"),
        1.0
    );
    // A HELLO on time is unaffected, well past the handshake timeout.
    let (mut ok, _) = gw.hello("prompt", None);
    std::thread::sleep(Duration::from_millis(500));
    assert!(ok.drain_with_ping(1).is_empty());
}

#[test]
fn bad_frames_get_errors_are_counted_and_disturb_no_one() {
    let mut gw = Gateway::with_config(&config("[limits]\nmax_frame_bytes = 1024\n"));
    let (mut bystander, bystander_id) = gw.hello("bystander", None);

    // Garbage protobuf: ERROR 400, the connection stays usable.
    let (mut c, _) = gw.hello("garbage", None);
    c.send_raw(&[0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]);
    let f = c.recv();
    assert_eq!((f.method, code(&f)), (method::ERROR, "400"), "{f:?}");
    // Unknown control method: ERROR 405 with the frame's seqid.
    c.send(&Frame::control(99, 77, &[]));
    let f = c.recv();
    assert_eq!((f.method, f.seqid, code(&f)), (method::ERROR, 77, "405"));
    // An upstream frame with no backend: ERROR 404.
    c.send(&Frame {
        seqid: 78,
        service: 3,
        method: 1,
        ..Default::default()
    });
    let f = c.recv();
    assert_eq!((f.method, f.seqid, code(&f)), (method::ERROR, 78, "404"));
    assert!(c.drain_with_ping(79).is_empty());

    // Oversize length: ERROR 413 then an orderly close.
    let (mut big, _) = gw.hello("big", None);
    big.send_raw(&[0x08, 0x00]); // 2048 > 1024
    big.send_raw(&[0u8; 100]);
    let frames = big.frames_until_eof(T);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!((frames[0].method, code(&frames[0])), (method::ERROR, "413"));

    // Zero-length frame: ERROR then close.
    let (mut zero, _) = gw.hello("zero", None);
    zero.send_raw(&[0, 0]);
    let frames = zero.frames_until_eof(T);
    assert_eq!(code(&frames[0]), "400");

    // First frame not a HELLO: ERROR 409 then close.
    let mut rude = gw.connect();
    rude.send(&Frame::control(method::PING, 5, &[]));
    let frames = rude.frames_until_eof(T);
    assert_eq!((frames.len(), code(&frames[0])), (1, "409"));

    // A flood of protocol errors is cut off.
    let (mut flood, _) = gw.hello("flood", None);
    for i in 0..50 {
        flood.send(&Frame::control(99, i, &[]));
    }
    let frames = flood.frames_until_eof(T);
    assert!(frames.len() < 50 && frames.iter().all(|f| f.method == method::ERROR));

    // Counted.
    let m = gw.metrics();
    assert_eq!(m["longlink_bad_frames_total{kind=\"decode\"}"], 1.0);
    assert_eq!(m["longlink_bad_frames_total{kind=\"too_large\"}"], 1.0);
    assert_eq!(m["longlink_bad_frames_total{kind=\"empty\"}"], 1.0);
    assert_eq!(m["longlink_bad_frames_total{kind=\"hello_required\"}"], 1.0);
    assert_eq!(
        m["longlink_bad_frames_total{kind=\"unknown_service\"}"],
        1.0
    );
    assert!(m["longlink_bad_frames_total{kind=\"unknown_method\"}"] >= 10.0);
    assert!(m["longlink_connections_closed_total{reason=\"protocol_error\"}"] >= 4.0);

    // The bystander never noticed, and the process is up.
    assert!(bystander.drain_with_ping(1).is_empty());
    let (_, v) = gw.api(
        "POST",
        &format!("/v1/push/conn/{bystander_id}"),
        b"still here",
    );
    assert_eq!(v["delivered"], 1);
    assert_eq!(&bystander.recv().payload[..], b"still here");
    assert!(gw.alive());
}

#[test]
fn static_tokens_admit_and_reject() {
    let gw = Gateway::with_config(&config(""));
    let mut c = gw.connect();
    c.send(&Frame::control(
        method::HELLO,
        9,
        &[("app_id", "demo"), ("device_id", "d"), ("token", "wrong")],
    ));
    let frames = c.frames_until_eof(T);
    assert_eq!(
        (frames.len(), frames[0].seqid, code(&frames[0])),
        (1, 9, "401")
    );
    let mut c = gw.connect();
    c.send(&Frame::control(
        method::HELLO,
        1,
        &[
            ("app_id", "other"),
            ("device_id", "d"),
            ("token", "demo-token"),
        ],
    ));
    assert_eq!(code(&c.frames_until_eof(T)[0]), "403");
    let mut c = gw.connect();
    c.send(&Frame::control(
        method::HELLO,
        1,
        &[("app_id", "demo"), ("token", "demo-token")],
    ));
    assert_eq!(
        code(&c.frames_until_eof(T)[0]),
        "400",
        "device_id is required"
    );
    let (_, _) = gw.hello("good", None);
    let m = gw.metrics();
    assert_eq!(m["longlink_hello_rejected_total"], 3.0);
    assert_eq!(m["longlink_hello_ok_total"], 1.0);
}

#[test]
fn bad_api_input_gets_4xx_json_and_nothing_half_applied() {
    let gw = Gateway::with_config(&config("[api]\nmax_body_bytes = 2048\n"));
    let (mut c, id) = gw.hello("d1", None);
    let cases: &[(&str, &str, &[u8], u16, &str)] = &[
        (
            "POST",
            "/v1/push/conn/not-an-id",
            b"x",
            400,
            "malformed conn_id",
        ),
        ("POST", "/v1/push/conn/n1:1", b"x", 400, "malformed conn_id"),
        ("POST", "/v1/push/device/nope/d1", b"x", 404, "unknown app"),
        ("POST", "/v1/push/broadcast/nope", b"x", 404, "unknown app"),
        (
            "POST",
            "/v1/push/device/demo/d1?service=-1",
            b"x",
            400,
            "service",
        ),
        (
            "POST",
            "/v1/push/device/demo/d1?method=abc",
            b"x",
            400,
            "method",
        ),
        (
            "POST",
            "/v1/push/device/demo/d1?method=6",
            b"x",
            400,
            "service 0 carries only method 8",
        ),
        (
            "POST",
            "/v1/push/batch",
            br#"[{"to":"device","app":"demo","device_id":"d1","payload":"x","method":5}]"#,
            400,
            "service 0 carries only method 8",
        ),
        ("POST", "/v1/push/device/demo/%zz", b"x", 400, "percent"),
        ("GET", "/v1/push/device/demo/d1", b"", 405, "POST"),
        ("POST", "/v1/push/planet/demo/d1", b"x", 404, "target kind"),
        ("GET", "/v1/nothing", b"", 404, "no such path"),
        ("POST", "/v1/push/batch", b"not json", 400, "JSON"),
        (
            "POST",
            "/v1/push/batch",
            br#"[{"to":"device","device_id":"d1"}]"#,
            400,
            "\"app\" is required",
        ),
        ("POST", "/v1/push/batch", b"[]", 400, "empty"),
        ("GET", "/v1/online/device/nope/d1", b"", 404, "unknown app"),
        ("POST", "/v1/kick/conn/zzz", b"", 400, "malformed"),
        // A typo is not a fire-and-forget push that looks like it worked.
        (
            "POST",
            "/v1/push/device/demo/d1?acks=1",
            b"x",
            400,
            "unknown query parameter \"acks\"",
        ),
        ("POST", "/v1/push/batch?wait=5", b"[]", 400, "\"wait\""),
        (
            "POST",
            "/v1/kick/device/demo/d1?why=x",
            b"",
            400,
            "takes reason",
        ),
    ];
    for (m, path, body, want, needle) in cases {
        let (st, v) = gw.api(m, path, body);
        assert_eq!(st, *want, "{m} {path}: {v}");
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{m} {path}: no error field: {v}"));
        assert!(msg.contains(needle), "{m} {path}: {msg:?} lacks {needle:?}");
    }
    // Oversize body: refused from its Content-Length, before it is read.
    let (st, v) = gw.api("POST", "/v1/push/device/demo/d1", &vec![b'a'; 4096]);
    assert_eq!(st, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("exceeds"));
    // A batch with one bad item applies none of its good ones.
    let batch = format!(
        r#"[{{"to":"conn","conn_id":"{id}","payload":"one"}},{{"to":"device","app":"demo","device_id":"d1","payload":"two"}},{{"to":"device","app":"nope","device_id":"d1","payload":"three"}}]"#
    );
    let (st, v) = gw.api("POST", "/v1/push/batch", batch.as_bytes());
    assert_eq!(st, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("item 2"), "{v}");
    assert!(
        c.drain_with_ping(1).is_empty(),
        "a rejected batch delivered something"
    );
    let m = gw.metrics();
    assert_eq!(m["longlink_pushes_total{outcome=\"delivered\"}"], 0.0);
    assert!(m["longlink_api_requests_total{status=\"4xx\"}"] >= 16.0);
    // The same batch made whole is applied whole, with one result per item; a fourth item
    // spells its target kind and app with JSON escapes (read into copies, not borrowed).
    let good = batch.replace("\"nope\"", "\"demo\"").replace(
        "]",
        r#",{"to":"d\u0065vice","app":"de\u006do","device_id":"d1","payload":"four"}]"#,
    );
    let (st, v) = gw.api("POST", "/v1/push/batch", good.as_bytes());
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["delivered"], 4);
    assert_eq!(v["results"].as_array().unwrap().len(), 4);
    let got: Vec<_> = (0..4).map(|_| c.recv().payload).collect();
    assert_eq!(got, vec![&b"one"[..], b"two", b"three", b"four"]);
}

#[test]
fn the_api_bearer_token_is_enforced() {
    let gw = Gateway::with_config(&config("[api]\ntoken = \"s3cret\"\n"));
    let (st, _) = gw.api("POST", "/v1/push/broadcast/demo", b"x");
    assert_eq!(st, 401);
    let (st, _) = api_call(
        &gw.api,
        "POST",
        "/v1/push/broadcast/demo",
        b"x",
        &[("Authorization", "Bearer nope")],
    );
    assert_eq!(st, 401);
    let (st, v) = api_call(
        &gw.api,
        "POST",
        "/v1/push/broadcast/demo",
        b"x",
        &[("Authorization", "Bearer s3cret")],
    );
    assert_eq!((st, &v["delivered"]), (200, &serde_json::json!(0)));
    let (st, _) = gw.api("GET", "/healthz", b"");
    assert_eq!(st, 200, "health checks need no token");
}

/// `connected_at` is when the connection came, also after the gateway sat idle (the
/// reactor reads the wall clock once a turn: after its wait, not before it).
#[test]
fn connected_at_is_the_connects_time_after_an_idle_spell() {
    let gw = Gateway::dev();
    let ms = longlink::types::unix_ms;
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = ms();
    let (_c, id) = gw.hello("idle1", None);
    let t1 = ms();
    let (_, v) = gw.api("GET", "/v1/online/device/demo/idle1", b"");
    let conns = v["connections"].as_array().unwrap();
    let c = conns.iter().find(|c| c["conn_id"] == id.as_str()).unwrap();
    let at = c["connected_at"].as_u64().unwrap();
    assert!(
        t0 <= at + 2 && at <= t1 + 2,
        "connected_at {at} not within {t0}..{t1}"
    );
}

#[test]
fn online_query_and_kick() {
    let gw = Gateway::dev();
    let (mut c1, id1) = gw.hello("k1", Some("carol"));
    let (mut c2, _) = gw.hello("k2", Some("carol"));
    let (_, v) = gw.api("GET", "/v1/online/user/demo/carol", b"");
    assert_eq!(v["online"], true);
    let conns = v["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 2);
    let first = conns
        .iter()
        .find(|c| c["conn_id"] == id1.as_str())
        .expect("conn listed");
    assert_eq!(
        (
            first["transport"].as_str(),
            first["device_id"].as_str(),
            first["node"].as_str()
        ),
        (Some("tcp"), Some("k1"), Some("n1"))
    );
    assert!(first["connected_at"].as_u64().unwrap() > 1_600_000_000_000);

    let (_, v) = gw.api("POST", "/v1/kick/device/demo/k1?reason=banned", b"");
    assert_eq!(v["kicked"], 1);
    let frames = c1.frames_until_eof(T);
    assert_eq!(frames.len(), 1);
    assert_eq!(
        (frames[0].method, frames[0].header("reason")),
        (method::BYE, Some("banned"))
    );
    // `?reason=` with nothing: the default, not an empty reason.
    let (_, v) = gw.api("POST", "/v1/kick/user/demo/carol?reason=", b"");
    assert_eq!(v["kicked"], 1);
    assert_eq!(c2.frames_until_eof(T)[0].header("reason"), Some("kicked"));
    let (_, v) = gw.api("GET", "/v1/online/user/demo/carol", b"");
    assert_eq!(v, serde_json::json!({"online": false, "connections": []}));
    let (_, v) = gw.api("POST", &format!("/v1/kick/conn/{id1}"), b"");
    assert_eq!(v["kicked"], 0, "a stale id kicks no one");
    assert_eq!(
        gw.metric("longlink_connections_closed_total{reason=\"kicked\"}"),
        2.0
    );
}

#[test]
fn a_slow_consumer_is_closed_at_its_output_bound() {
    let gw = Gateway::with_config(&config("[limits]\nmax_output_bytes = 65536\n"));
    let (slow, id) = gw.hello("slow", None);
    let (mut fine, _) = gw.hello("fine", None);
    // Shrink the reader's window so the backlog builds in the gateway, not in the kernel.
    let sock = socket2::SockRef::from(&slow.s);
    sock.set_recv_buffer_size(4096).unwrap();
    let payload = vec![b'z'; 30_000];
    let rss0 = gw.rss();
    let mut dropped = false;
    for _ in 0..2000 {
        let (st, v) = gw.api("POST", &format!("/v1/push/conn/{id}"), &payload);
        assert_eq!(st, 200);
        if v["dropped"].as_array().unwrap().len() == 1 {
            dropped = true;
            break;
        }
        if v["offline"].as_array().unwrap().len() == 1 {
            break;
        }
    }
    assert!(dropped, "the slow consumer was never cut off");
    // Memory stayed near the bound (64 KiB of backlog), though far more was pushed at it.
    let grew = gw.rss().saturating_sub(rss0);
    assert!(
        grew < 8 << 20,
        "RSS grew by {grew} bytes for a 64 KiB output bound"
    );
    assert_eq!(
        gw.metric("longlink_connections_closed_total{reason=\"slow_consumer\"}"),
        1.0
    );
    assert_eq!(gw.metric("longlink_pushes_total{outcome=\"dropped\"}"), 1.0);
    assert!(fine.drain_with_ping(1).is_empty());
    drop(slow);
}

#[test]
fn sigterm_says_bye_and_exits_zero() {
    let mut gw = Gateway::dev();
    let (mut a, _) = gw.hello("s1", None);
    let (mut b, _) = gw.hello("s2", None);
    gw.signal(libc::SIGTERM);
    for c in [&mut a, &mut b] {
        let frames = c.frames_until_eof(T);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(
            (frames[0].method, frames[0].header("reason")),
            (method::BYE, Some("shutdown"))
        );
    }
    assert_eq!(gw.wait_exit(T), Some(0));
}

#[test]
fn unix_socket_listeners_work() {
    let dir = temp_dir("unix");
    let tcp = format!("unix:{}", dir.0.join("tcp.sock").display());
    let api = dir.0.join("api.sock");
    let gw = Gateway::spawn(
        None,
        &["--tcp", &tcp, "--api", &format!("unix:{}", api.display())],
    );
    assert_eq!(gw.tcp, tcp);
    let mut s = std::os::unix::net::UnixStream::connect(dir.0.join("tcp.sock")).unwrap();
    let mut wire = vec![];
    longlink::codec::encode_tcp(
        &Frame::control(method::HELLO, 1, &[("app_id", "demo"), ("device_id", "u1")]),
        &mut wire,
    )
    .unwrap();
    s.write_all(&wire).unwrap();
    let mut a = std::os::unix::net::UnixStream::connect(&api).unwrap();
    // Wait for HELLO's reply before pushing.
    s.set_read_timeout(Some(T)).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap();
    assert!(n > 2);
    a.write_all(b"POST /v1/push/device/demo/u1 HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc").unwrap();
    let mut resp = String::new();
    std::io::Read::read_to_string(&mut a, &mut resp).unwrap();
    assert!(resp.contains("\"delivered\":1"), "{resp}");
    let n = std::io::Read::read(&mut s, &mut buf).unwrap();
    assert!(buf[..n].ends_with(b"abc"));
}

#[test]
fn api_keep_alive_pipelining_and_expect_continue() {
    use std::io::Read;
    let gw = Gateway::dev();
    let (mut c, _) = gw.hello("ka", None);
    let mut s = std::net::TcpStream::connect(&gw.api).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    // Three pipelined requests in one write: three answers, in order, on one connection.
    let mut reqs = String::new();
    for p in ["one", "two", "three"] {
        reqs.push_str(&format!(
            "POST /v1/push/device/demo/ka HTTP/1.1\r\nContent-Length: {}\r\n\r\n{p}",
            p.len()
        ));
    }
    s.write_all(reqs.as_bytes()).unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while got.matches("\"delivered\":1").count() < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    for p in [&b"one"[..], b"two", b"three"] {
        assert_eq!(&c.recv().payload[..], p);
    }
    // Expect: 100-continue gets its interim answer before the body is sent.
    s.write_all(b"POST /v1/push/device/demo/ka HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n").unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(std::str::from_utf8(&buf[..n])
        .unwrap()
        .starts_with("HTTP/1.1 100 Continue"));
    s.write_all(b"four").unwrap();
    assert_eq!(&c.recv().payload[..], b"four");
}

#[test]
fn check_config_names_every_error_with_its_line() {
    let dir = temp_dir("cfg");
    let bad = dir.0.join("bad.toml");
    std::fs::write(&bad, "node_id = \"n1\"\n[listen]\ntcp = \"nonsense\"\n[limits]\nread_timeout_ms = -5\nspeed = 11\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    for needle in [
        ":3: listen.tcp",
        ":5: read_timeout_ms = -5 is out of range",
        ":6: unknown key \"limits.speed\"",
        "3 error(s)",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/longlink.example.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
        .args(["check-config", sample])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // serve refuses a bad config with the same messages.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_cli_client_prints_pushes() {
    let gw = Gateway::dev();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
        .args([
            "client", "--tcp", &gw.tcp, "--device", "cli", "--ack", "--count", "1",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    gw.wait_until("client online", |g| {
        g.api("GET", "/v1/online/device/demo/cli", b"").1["online"] == true
    });
    let (_, v) = gw.api("POST", "/v1/push/device/demo/cli", b"hello cli");
    assert_eq!(v["delivered"], 1);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["name"], "HELLO");
    assert_eq!(lines[1]["name"], "PUSH");
    assert_eq!(lines[1]["payload"], "hello cli");
    assert!(out.status.success());
    // Refused (a bad token, an unknown app): exit 1, saying why, so a script can tell.
    let strict = Gateway::with_config(&config(""));
    for (app, token, why) in [("demo", "bad", "401"), ("nope", "demo-token", "403")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
            .args(["client", "--tcp", &strict.tcp, "--device", "r"])
            .args(["--app", app, "--token", token])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{app}: {err}");
        assert!(
            err.contains("refused by the gateway") && err.contains(why),
            "{err}"
        );
    }
}

#[test]
fn an_app_can_drop_pushes_for_a_slow_consumer_instead_of_closing_it() {
    let toml = config("[limits]\nmax_output_bytes = 65536\n").replace(
        "default_service = 1\n",
        "default_service = 1\nslow_consumer = \"drop\"\n",
    );
    let gw = Gateway::with_config(&toml);
    let (mut slow, id) = gw.hello("slowdrop", None);
    socket2::SockRef::from(&slow.s)
        .set_recv_buffer_size(4096)
        .unwrap();
    let rss0 = gw.rss();
    let payload = vec![b'q'; 30_000];
    let (mut delivered, mut dropped) = (0, 0);
    for _ in 0..600 {
        let (_, v) = gw.api("POST", &format!("/v1/push/conn/{id}"), &payload);
        delivered += v["delivered"].as_u64().unwrap();
        dropped += v["dropped"].as_array().unwrap().len();
        assert!(
            v["offline"].as_array().unwrap().is_empty(),
            "the slow consumer was closed: {v}"
        );
    }
    assert!(
        dropped > 300 && delivered > 0,
        "delivered {delivered}, dropped {dropped}"
    );
    let grew = gw.rss().saturating_sub(rss0);
    assert!(
        grew < 8 << 20,
        "RSS grew by {grew} bytes for a 64 KiB output bound"
    );
    // Still connected, and what was queued flows once it reads (draining the megabytes that
    // sit in kernel buffers through a 4 KiB window would take minutes; one frame shows it).
    let (_, v) = gw.api("GET", &format!("/v1/online/conn/{id}"), b"");
    assert_eq!(v["online"], true, "{v}");
    let f = slow.recv();
    assert_eq!((f.method, f.payload.len()), (method::PUSH, 30_000));
    assert_eq!(
        gw.metric("longlink_connections_closed_total{reason=\"slow_consumer\"}"),
        0.0
    );
}

#[test]
fn a_conn_id_from_before_a_restart_reaches_nobody_after_it() {
    let gw = Gateway::dev();
    let (_old_client, old) = gw.hello("before", None);
    drop(_old_client);
    drop(gw); // the process is killed
    let gw = Gateway::dev();
    let (mut c, new) = gw.hello("after", None);
    // The new process's first connection takes the same slot; its id must differ.
    let (o, n) = (
        longlink::types::ConnId::parse(&old).expect("NODE:INDEX:GEN"),
        longlink::types::ConnId::parse(&new).expect("NODE:INDEX:GEN"),
    );
    assert_eq!(
        (o.node.as_str(), o.idx),
        (n.node.as_str(), n.idx),
        "same slot"
    );
    assert_ne!(old, new);
    let (_, v) = gw.api("POST", &format!("/v1/push/conn/{old}"), b"stale");
    assert_eq!(v["delivered"], 0, "{v}");
    assert_eq!(v["offline"][0], old.as_str());
    assert!(
        c.drain_with_ping(1).is_empty(),
        "the new tenant got a push for the old id"
    );
    let (_, v) = gw.api("POST", &format!("/v1/push/conn/{new}"), b"fresh");
    assert_eq!(v["delivered"], 1);
    assert_eq!(&c.recv().payload[..], b"fresh");
}

/// Runs `longlink serve ARGS` expecting it to refuse to start: returns its stderr.
fn refused_start(args: &[&str]) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
        .arg("serve")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + T;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            panic!("a gateway that should have refused to start is running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "printed a listening line");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn a_unix_socket_in_use_is_refused_a_stale_one_replaced_and_a_foreign_one_kept() {
    let dir = temp_dir("unix-own");
    let path = dir.0.join("api.sock");
    let api = format!("unix:{}", path.display());
    let gw = Gateway::spawn(None, &["--api", &api]);
    // A second gateway on the same live socket refuses to start...
    let err = refused_start(&["--tcp", "127.0.0.1:0", "--http", "", "--api", &api]);
    assert!(err.contains("in use"), "{err}");
    // ...and the first one's API is still reachable there.
    let healthz = || {
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    };
    assert!(healthz().contains(&format!("\"pid\":{}", gw.pid)));
    drop(gw);
    // A stale socket file (nobody listening) is replaced.
    let stale = dir.0.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let stale_api = format!("unix:{}", stale.display());
    let mut gw = Gateway::spawn(None, &["--api", &stale_api]);
    // A socket file the gateway no longer owns (replaced by someone else) is left alone
    // when it exits.
    std::fs::remove_file(&stale).unwrap();
    let _theirs = std::os::unix::net::UnixListener::bind(&stale).unwrap();
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(T), Some(0));
    assert!(
        stale.exists(),
        "the gateway deleted a socket file it did not own"
    );
}

#[test]
fn a_listener_that_cannot_bind_is_reported_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = refused_start(&["--tcp", &addr, "--http", "", "--api", "127.0.0.1:0"]);
    assert_eq!(err.matches("cannot listen on").count(), 1, "{err}");
    assert!(err.contains(&addr), "{err}");
}

#[test]
fn an_api_request_trickled_a_byte_at_a_time_is_cut_off() {
    let gw = Gateway::with_config(&config("[api]\nrequest_timeout_ms = 600\n"));
    let mut s = std::net::TcpStream::connect(&gw.api).unwrap();
    s.set_nodelay(true).unwrap();
    let start = Instant::now();
    let head = b"POST /v1/push/broadcast/demo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nslow";
    let mut answer = String::new();
    for b in head {
        if s.write_all(std::slice::from_ref(b)).is_err() {
            break; // closed under us
        }
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    s.set_read_timeout(Some(T)).unwrap();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(gw.metric("longlink_api_request_timeouts_total"), 1.0);
    // A keep-alive client that sends whole requests, slowly apart, is not cut off.
    let mut k = KeepAlive::connect(&gw.api);
    for _ in 0..3 {
        k.send("GET", "/healthz", &[], b"");
        assert_eq!(k.answer().status, 200);
        std::thread::sleep(Duration::from_millis(400));
    }
}

#[test]
fn clients_using_up_the_open_files_leave_the_api_its_descriptors() {
    use std::os::unix::process::CommandExt;
    // A gateway allowed 400 open files: bare connects (no HELLO) past what it can hold must
    // be refused at accept, while the API still answers at once.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"));
    cmd.args([
        "serve",
        "--tcp",
        "127.0.0.1:0",
        "--http",
        "",
        "--api",
        "127.0.0.1:0",
    ])
    .args(["--log-level", "error"])
    .stdout(std::process::Stdio::piped());
    // SAFETY: setrlimit in the child between fork and exec (async-signal-safe).
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: 400,
                rlim_max: 400,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let (tcp, api) = (
        v["tcp"].as_str().unwrap().to_string(),
        v["api"].as_str().unwrap().to_string(),
    );
    let mut held = vec![];
    for _ in 0..500 {
        held.push(std::net::TcpStream::connect(&tcp).unwrap());
    }
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..20 {
        let start = Instant::now();
        let (st, v) = api_call(&api, "GET", "/healthz", b"", &[]);
        assert_eq!(st, 200, "{v}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
    let (_, m) = http_raw(&api, "GET", "/metrics", b"", &[]);
    let m = String::from_utf8(m).unwrap();
    let refused: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("longlink_connections_closed_total{reason=\"overloaded\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused >= 200.0, "refused {refused}");
    drop(held);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn after_a_flood_the_connection_table_shrinks_and_no_conn_id_repeats() {
    // 1,200 connections, then all but the first go: within a trim period (10 s) the table
    // gives back its vacant tail. Connections made afterwards land in the freed slots and
    // beyond the cut again, and none of them gets an id an earlier tenant had: a push to an
    // old id reaches nobody.
    let gw = Gateway::dev();
    let (mut keep, _) = gw.hello("keeper", None);
    let mut old = std::collections::HashSet::new();
    let mut flood = vec![];
    for i in 0..1200 {
        let (c, id) = gw.hello(&format!("flood-{i}"), None);
        old.insert(id);
        flood.push(c);
    }
    assert!(gw.metric("longlink_connection_slots") >= 1201.0);
    drop(flood);
    let end = Instant::now() + Duration::from_secs(25);
    while gw.metric("longlink_connection_slots") >= 100.0 {
        assert!(Instant::now() < end, "the table was not cut back");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut again = vec![];
    for i in 0..1300 {
        let (c, id) = gw.hello(&format!("again-{i}"), None);
        assert!(!old.contains(&id), "{id} handed out twice");
        again.push((c, id));
    }
    let last_old = old
        .iter()
        .max_by_key(|id| id.split(':').nth(1).unwrap().parse::<u32>().unwrap());
    let (st, v) = gw.api(
        "POST",
        &format!("/v1/push/conn/{}", last_old.unwrap()),
        b"stale",
    );
    assert_eq!(st, 200);
    assert_eq!(v["delivered"], 0, "{v}");
    assert!(keep.drain_with_ping(5).is_empty());
    for (c, _) in again.iter_mut().rev().take(20) {
        assert!(
            c.drain_with_ping(6).is_empty(),
            "a new tenant got a stale push"
        );
    }
}

#[test]
fn a_request_pipelined_behind_a_503_is_answered_too() {
    // One worker and the smallest queue, kept full by big batches: a keep-alive request
    // refused "busy" on the reactor must not strand the request behind it in the buffer.
    let toml = config("[runtime]\nworkers = 1\nworker_queue = 16\n");
    let gw = Gateway::spawn(Some(&toml), &[]);
    // Each near the 4 MiB body limit: seconds of parsing for the one worker in all.
    let item = format!(
        r#"{{"to":"device","app":"demo","device_id":"nobody","payload":"{}"}},"#,
        "x".repeat(300)
    );
    let mut body = String::from("[");
    for _ in 0..10_000 {
        body.push_str(&item);
    }
    body.pop();
    body.push(']');
    let batch = format!(
        "POST /v1/push/batch HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // All but the last byte of each first, then the last bytes together: the requests
    // become whole in one burst, faster than the worker takes them.
    let (most, last) = batch.as_bytes().split_at(batch.len() - 1);
    let mut fillers = vec![];
    for _ in 0..24 {
        let mut f = std::net::TcpStream::connect(&gw.api).unwrap();
        f.write_all(most).unwrap();
        fillers.push(f);
    }
    let mut s = std::net::TcpStream::connect(&gw.api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Time for the gateway to read what the kernel still buffers of them.
    std::thread::sleep(Duration::from_millis(300));
    for f in fillers.iter_mut() {
        f.write_all(last).unwrap();
    }
    // (No /metrics meanwhile: it too waits for the worker, so it would be refused.)
    s.write_all(
        b"GET /v1/online/device/demo/x HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let (got, statuses) =
        answers_until_close(&mut s, "both answers, then the close: not a read timeout");
    assert_eq!(statuses.len(), 2, "{got}");
    assert_eq!(statuses[0], "503", "{got}");
    assert!(matches!(statuses[1].as_str(), "503" | "200"), "{got}");
    drop(fillers);
    gw.wait_until("the queue drained", |g| {
        http_raw(&g.api, "GET", "/healthz", b"", &[]).0 == 200
    });
    assert!(gw.metric("longlink_worker_busy_total") >= 2.0);
}

#[test]
fn a_bye_in_the_same_write_as_frames_before_it_lets_their_answers_out_first() {
    // HELLO, PING and BYE in one write: the HELLO's answer and the PONG go, then the close
    // (a BYE is an orderly close, not one that drops what was queued before it).
    let gw = Gateway::dev();
    let mut c = gw.connect();
    let mut bytes = vec![];
    for f in [
        Frame::control(
            method::HELLO,
            1,
            &[("app_id", "demo"), ("device_id", "bye1"), ("token", "x")],
        ),
        Frame::control(method::PING, 2, &[]),
        Frame::control(method::BYE, 3, &[]),
    ] {
        let b = f.encode_to_vec();
        bytes.extend_from_slice(&(b.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&b);
    }
    let start = Instant::now();
    c.send_raw(&bytes);
    let got = c.frames_until_eof(T);
    assert!(start.elapsed() < Duration::from_secs(2), "no close");
    let seen: Vec<(i32, u64)> = got.iter().map(|f| (f.method, f.seqid)).collect();
    assert_eq!(seen, [(method::HELLO, 1), (method::PONG, 2)], "{got:?}");
    assert_eq!(
        gw.metric("longlink_connections_closed_total{reason=\"bye\"}"),
        1.0
    );
}
