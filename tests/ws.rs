//! WebSocket (RFC 6455) and long-poll on the client HTTP listener, against the real binary,
//! with a hand-rolled client that can send exactly the frames a server must refuse. Real
//! third-party clients (Python websockets, Node ws, Chromium) are in tests/clients.rs.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use longlink::proto::{method, Frame};
use prost::Message;

const RAW: &str = "/ws?app_id=demo&device_id=w1&token=x";

fn frame_of(f: &WsFrame) -> Frame {
    assert_eq!(f.opcode, 2, "pbbp2 frames are binary messages");
    Frame::decode(&f.payload[..]).expect("a Frame")
}

#[test]
fn raw_mode_echoes_and_receives_pushes() {
    let gw = gateway_http(None);
    let mut ws = Ws::connect(&gw.http, RAW, &[]).unwrap();
    ws.text("hello");
    let f = ws.recv();
    assert_eq!((f.opcode, f.text()), (1, "hello"));
    ws.send(true, 2, &[0, 1, 2, 255]);
    let f = ws.recv();
    assert_eq!((f.opcode, &f.payload[..]), (2, &[0u8, 1, 2, 255][..]));
    // A text push arrives as a text message holding only the payload; bytes as binary.
    let (_, v) = gw.api(
        "POST",
        "/v1/push/device/demo/w1?payload_type=text",
        b"pushed",
    );
    assert_eq!(v["delivered"], 1);
    let f = ws.recv();
    assert_eq!((f.opcode, f.text()), (1, "pushed"));
    let (_, v) = gw.api("POST", "/v1/push/device/demo/w1", &[0xff, 0xfe]);
    assert_eq!(v["delivered"], 1);
    assert_eq!(ws.recv().opcode, 2);
    let m = gw.metrics();
    assert_eq!(m["longlink_connections{transport=\"ws\"}"], 1.0);
    assert_eq!(m["longlink_ws_upgrades_total"], 1.0);
    assert_eq!(m["longlink_frames_in_total{transport=\"ws\"}"], 2.0);
}

#[test]
fn pbbp2_sends_hello_first_and_carries_frames() {
    let gw = gateway_http(None);
    let mut ws = Ws::connect(&gw.http, RAW, &[("Sec-WebSocket-Protocol", "chat, pbbp2")]).unwrap();
    let hello = frame_of(&ws.recv());
    assert_eq!((hello.service, hello.method), (0, method::HELLO));
    let id = hello.header("conn_id").unwrap().to_string();
    assert!(id.starts_with("n1:"));
    // PING → PONG with the same seqid.
    let ping = Frame::control(method::PING, 77, &[]);
    ws.send(true, 2, &ping.encode_to_vec());
    let pong = frame_of(&ws.recv());
    assert_eq!((pong.method, pong.seqid), (method::PONG, 77));
    // An upstream frame for service 1 (builtin:echo in dev mode) comes back as it went.
    let up = Frame {
        seqid: 5,
        service: 1,
        method: 42,
        payload: bytes::Bytes::from_static(b"up"),
        ..Default::default()
    };
    ws.send(true, 2, &up.encode_to_vec());
    assert_eq!(frame_of(&ws.recv()), up);
    // Pushes are Frames with per-connection increasing seqids.
    for i in 1..=2u64 {
        let (_, v) = gw.api(
            "POST",
            &format!("/v1/push/conn/{id}?payload_type=json"),
            b"{\"n\":1}",
        );
        assert_eq!(v["delivered"], 1);
        let p = frame_of(&ws.recv());
        assert_eq!(
            (p.method, p.seqid, p.payload_type.as_str(), &p.payload[..]),
            (method::PUSH, i, "json", &b"{\"n\":1}"[..])
        );
    }
    // Text messages are not pbbp2: 1003.
    ws.text("not a frame");
    ws.expect_close(1003);
}

#[test]
fn the_hello_answer_announces_the_frame_limit_of_its_transport() {
    // A client that checks its requests against the announced limit fails one that is too
    // big alone; sent, it would close the connection and every call on it.
    let gw = Gateway::spawn(
        Some(&config(
            "[limits]\nmax_frame_bytes = 4096\nmax_message_bytes = 2048\n",
        )),
        &["--http", "127.0.0.1:0"],
    );
    let mut tcp = gw.connect();
    tcp.send(&Frame::control(
        method::HELLO,
        1,
        &[
            ("app_id", "demo"),
            ("device_id", "t1"),
            ("token", "demo-token"),
        ],
    ));
    let hello = tcp.recv();
    assert_eq!(hello.method, method::HELLO);
    assert_eq!(hello.header("max_frame_bytes"), Some("4096"));
    // Over pbbp2 a message is one Frame: the smaller of the two limits.
    let path = "/ws?app_id=demo&device_id=w1&token=demo-token";
    let mut ws = Ws::connect(&gw.http, path, &[("Sec-WebSocket-Protocol", "pbbp2")]).unwrap();
    let hello = frame_of(&ws.recv());
    assert_eq!(hello.method, method::HELLO);
    assert_eq!(hello.header("max_frame_bytes"), Some("2048"));
    // And it is the limit: a Frame of exactly 2048 bytes is taken, one more is not (1009).
    let up = |total: usize| {
        let mut f = Frame {
            seqid: 5,
            service: 1,
            method: 42,
            ..Default::default()
        };
        let n = total - f.encoded_len() - 3; // the payload's tag and two-byte length
        f.payload = bytes::Bytes::from(vec![b'u'; n]);
        assert_eq!(f.encoded_len(), total);
        f
    };
    let fits = up(2048);
    ws.send(true, 2, &fits.encode_to_vec());
    assert_eq!(frame_of(&ws.recv()), fits);
    ws.send(true, 2, &up(2049).encode_to_vec());
    ws.expect_close(1009);
}

#[test]
fn a_pbbp2_message_is_held_to_the_frame_limit() {
    // A pbbp2 message is one Frame, so it gets the limit a Frame has on TCP; raw mode keeps
    // the (larger) message limit.
    let gw = Gateway::spawn(
        Some(&config("[limits]\nmax_frame_bytes = 1024\n")),
        &["--http", "127.0.0.1:0"],
    );
    let path = "/ws?app_id=demo&device_id=w1&token=demo-token";
    let pb = || {
        let mut ws = Ws::connect(&gw.http, path, &[("Sec-WebSocket-Protocol", "pbbp2")]).unwrap();
        frame_of(&ws.recv());
        ws
    };
    let up = |n: usize| Frame {
        seqid: 5,
        service: 1,
        method: 42,
        payload: bytes::Bytes::from(vec![b'u'; n]),
        ..Default::default()
    };
    let mut ws = pb();
    let fits = up(1000);
    assert!(fits.encode_to_vec().len() <= 1024);
    ws.send(true, 2, &fits.encode_to_vec());
    assert_eq!(frame_of(&ws.recv()), fits);
    // Over it, judged from the header (whole or across fragments): 1009.
    let over = up(1100).encode_to_vec();
    ws.send(true, 2, &over);
    ws.expect_close(1009);
    let mut ws = pb();
    ws.send(false, 2, &over[..600]);
    ws.send(true, 0, &over[600..]);
    ws.expect_close(1009);
    // Raw mode: the same bytes are one message, echoed.
    let mut raw = Ws::connect(&gw.http, path, &[]).unwrap();
    raw.send(true, 2, &over);
    assert_eq!(raw.recv().payload, over);
    assert_eq!(
        gw.metrics()["longlink_bad_frames_total{kind=\"ws_too_large\"}"],
        2.0
    );
}

#[test]
fn one_device_on_tcp_and_websocket_at_once() {
    let gw = gateway_http(None);
    let (mut tcp, _) = gw.hello("both", Some("u-both"));
    let mut ws = Ws::connect(
        &gw.http,
        "/ws?app_id=demo&device_id=both&user_id=u-both&token=x",
        &[],
    )
    .unwrap();
    let (_, v) = gw.api("GET", "/v1/online/device/demo/both", b"");
    let transports: Vec<&str> = v["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["transport"].as_str().unwrap())
        .collect();
    assert_eq!(transports.len(), 2);
    assert!(
        transports.contains(&"tcp") && transports.contains(&"ws"),
        "{v}"
    );
    let (_, v) = gw.api(
        "POST",
        "/v1/push/user/demo/u-both?payload_type=text",
        b"to both",
    );
    assert_eq!(v["delivered"], 2);
    assert_eq!(&tcp.recv().payload[..], b"to both");
    assert_eq!(ws.recv().text(), "to both");
    // Kick closes the WebSocket with 1008 and the reason, the TCP one with BYE.
    let (_, v) = gw.api("POST", "/v1/kick/device/demo/both?reason=policy", b"");
    assert_eq!(v["kicked"], 2);
    assert_eq!(ws.expect_close(1008), "policy");
    assert_eq!(tcp.frames_until_eof(T)[0].header("reason"), Some("policy"));
}

#[test]
fn fragmentation_with_control_frames_between_fragments() {
    let gw = gateway_http(None);
    let mut ws = Ws::connect(&gw.http, RAW, &[]).unwrap();
    // "κόσμε" split inside a multi-byte character, a ping between the fragments.
    let word = "κόσμε".as_bytes();
    ws.send(false, 1, &word[..3]);
    ws.send(true, 9, b"mid");
    ws.send(false, 0, &word[3..7]);
    ws.send(true, 0, &word[7..]);
    let pong = ws.recv();
    assert_eq!((pong.opcode, &pong.payload[..]), (10, &b"mid"[..]));
    let echo = ws.recv();
    assert_eq!((echo.opcode, echo.text()), (1, "κόσμε"));
}

#[test]
fn protocol_errors_close_with_the_right_codes() {
    let gw = Gateway::spawn(
        Some(&config("[limits]\nmax_message_bytes = 1024\n")),
        &["--http", "127.0.0.1:0"],
    );
    let path = "/ws?app_id=demo&device_id=bad&token=demo-token";
    let connect = || Ws::connect(&gw.http, path, &[]).unwrap();
    let mut bystander = Ws::connect(
        &gw.http,
        "/ws?app_id=demo&device_id=calm&token=demo-token",
        &[],
    )
    .unwrap();

    // Unmasked client frame: 1002 (§5.1).
    let mut ws = connect();
    ws.send_raw(&[0x81, 0x02, b'h', b'i']);
    ws.expect_close(1002);
    // Reserved bits: 1002.
    let mut ws = connect();
    let mut f = Ws::frame_bytes(true, 1, b"x");
    f[0] |= 0x40;
    ws.send_raw(&f);
    ws.expect_close(1002);
    // Reserved opcode: 1002.
    let mut ws = connect();
    ws.send(true, 3, b"");
    ws.expect_close(1002);
    // Ping payload over 125: 1002.
    let mut ws = connect();
    ws.send(true, 9, &[0u8; 126]);
    ws.expect_close(1002);
    // Continuation with nothing to continue: 1002.
    let mut ws = connect();
    ws.send(true, 0, b"x");
    ws.expect_close(1002);
    // A new message inside a fragmented one: 1002.
    let mut ws = connect();
    ws.send(false, 1, b"a");
    ws.send(true, 1, b"b");
    ws.expect_close(1002);
    // Invalid UTF-8: 1007; and across fragments it fails at the fragment that shows it,
    // before the message ends.
    let mut ws = connect();
    ws.send(true, 1, b"ok\xff");
    ws.expect_close(1007);
    let mut ws = connect();
    ws.send(false, 1, b"fine so far");
    ws.send(false, 0, b"\xc0\xaf");
    ws.expect_close(1007);
    // Too big, judged from the header: the payload is never sent.
    let mut ws = connect();
    let mut head = vec![0x82, 0x80 | 126];
    head.extend_from_slice(&2000u16.to_be_bytes());
    head.extend_from_slice(&[1, 2, 3, 4]);
    ws.send_raw(&head);
    ws.expect_close(1009);
    // Too big across fragments.
    let mut ws = connect();
    ws.send(false, 2, &[0u8; 1000]);
    ws.send(true, 0, &[0u8; 100]);
    ws.expect_close(1009);
    // A close frame with a code that must not be sent: 1002; with a bad reason: 1007.
    let mut ws = connect();
    ws.send(true, 8, &1005u16.to_be_bytes());
    ws.expect_close(1002);
    let mut ws = connect();
    let mut p = 1000u16.to_be_bytes().to_vec();
    p.push(0xff);
    ws.send(true, 8, &p);
    ws.expect_close(1007);
    // A clean close is echoed.
    let mut ws = connect();
    ws.send(true, 8, &1000u16.to_be_bytes());
    ws.expect_close(1000);

    let m = gw.metrics();
    assert!(
        m["longlink_bad_frames_total{kind=\"ws_protocol\"}"] >= 6.0,
        "{m:?}"
    );
    assert_eq!(m["longlink_bad_frames_total{kind=\"ws_utf8\"}"], 3.0);
    assert_eq!(m["longlink_bad_frames_total{kind=\"ws_too_large\"}"], 2.0);
    // Nobody else noticed.
    bystander.text("still fine");
    assert_eq!(bystander.recv().text(), "still fine");
}

#[test]
fn idle_websockets_are_pinged_and_silent_ones_closed() {
    let gw = Gateway::spawn(
        Some(&config(
            "[limits]\nping_interval_ms = 200\nread_timeout_ms = 500\n",
        )),
        &["--http", "127.0.0.1:0"],
    );
    let path = |d: &str| format!("/ws?app_id=demo&device_id={d}&token=demo-token");
    let mut alive = Ws::connect(&gw.http, &path("alive"), &[]).unwrap();
    let mut silent = Ws::connect(&gw.http, &path("silent"), &[]).unwrap();
    let start = Instant::now();
    // The live one answers every ping and is still open well past the read timeout.
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        let f = alive.recv();
        assert_eq!(f.opcode, 9, "only pings arrive on an idle connection");
        pings += 1;
        alive.send(true, 10, &f.payload);
    }
    assert!(pings >= 3, "{pings} pings in 1.5 s");
    // The silent one got its ping and was then closed.
    let f = silent.recv();
    assert_eq!(f.opcode, 9);
    assert!(
        silent.recv_within(T).is_none(),
        "silent connection still open"
    );
    let m = gw.metrics();
    assert_eq!(
        m["longlink_connections_closed_total{reason=\"read_timeout\"}"],
        1.0
    );
    assert!(m["longlink_ws_pings_sent_total"] >= 4.0);
    alive.text("x");
    loop {
        let f = alive.recv();
        if f.opcode == 9 {
            alive.send(true, 10, &f.payload); // a ping may cross our message
            continue;
        }
        assert_eq!(f.text(), "x");
        break;
    }
}

#[test]
fn refused_upgrades_get_http_errors_before_any_upgrade() {
    let toml = config("[http]\nallowed_origins = [\"https://good.example\"]\n");
    let gw = Gateway::spawn(Some(&toml), &["--http", "127.0.0.1:0"]);
    let good = [("Origin", "https://good.example")];
    let err =
        |path: &str, h: &[(&str, &str)]| Ws::connect(&gw.http, path, h).err().expect("refused");
    assert_eq!(err("/ws?app_id=demo&device_id=d&token=wrong", &good).0, 401);
    assert_eq!(
        err("/ws?app_id=nope&device_id=d&token=demo-token", &good).0,
        403
    );
    assert_eq!(err("/ws?app_id=demo&token=demo-token", &good).0, 400);
    let (st, body) = err(
        "/ws?app_id=demo&device_id=d&token=demo-token",
        &[("Origin", "https://evil.example")],
    );
    assert_eq!(st, 403);
    assert!(body.contains("origin"), "{body}");
    assert!(Ws::connect(
        &gw.http,
        "/ws?app_id=demo&device_id=d&token=demo-token",
        &good
    )
    .is_ok());
    assert_eq!(gw.metric("longlink_hello_rejected_total"), 3.0);
    // Every HTTP-listener connection is accepted once and closed once (one upgrade is open).
    gw.wait_until("refusals closed", |g| {
        let m = g.metrics();
        m["longlink_http_connections_accepted_total"] == 5.0
            && m["longlink_connections_closed_total{reason=\"auth_rejected\"}"] == 3.0
    });

    // Not an upgrade at all, a wrong version, and garbage.
    let (st, _) = http_raw(
        &gw.http,
        "GET",
        "/ws?app_id=demo&device_id=d&token=demo-token",
        b"",
        &[],
    );
    assert_eq!(st, 400);
    let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 426") && resp.contains("Sec-WebSocket-Version: 13"),
        "{resp}"
    );
    let (st, _) = http_raw(&gw.http, "GET", "/nothing", b"", &[]);
    assert_eq!(st, 404);
    let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

#[test]
fn a_trickled_handshake_is_closed_by_the_handshake_timeout() {
    let gw = Gateway::spawn(
        Some(&config("[limits]\nhandshake_timeout_ms = 400\n")),
        &["--http", "127.0.0.1:0"],
    );
    let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
    let start = Instant::now();
    let req =
        b"GET /ws?app_id=demo&device_id=slow&token=demo-token HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    s.write_all(req).unwrap();
    // One byte every 50 ms, never finishing the head.
    let mut closed = false;
    while start.elapsed() < Duration::from_secs(3) {
        if s.write_all(b"a").is_err() {
            closed = true;
            break;
        }
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "a trickling client was never closed");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(390) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    assert_eq!(
        gw.metric("longlink_connections_closed_total{reason=\"handshake_timeout\"}"),
        1.0
    );
}

#[test]
fn long_poll_waits_is_released_by_a_set_and_times_out() {
    let gw = gateway_http(None);
    // A waiter is released by the set, with the value as JSON.
    let http = gw.http.clone();
    let waiter = std::thread::spawn(move || {
        http_raw(
            &http,
            "GET",
            "/poll/status?key=qr-1&timeout=10",
            b"",
            &[("Origin", "https://page.example")],
        )
    });
    gw.wait_until("the poll is waiting", |g| {
        g.metric("longlink_poll_waiters") == 1.0
    });
    let (st, v) = gw.api("POST", "/v1/status/qr-1", br#"{"user":"alice"}"#);
    assert_eq!((st, &v["released"]), (200, &serde_json::json!(1)));
    let (st, body) = waiter.join().unwrap();
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (&v["code"], &v["msg"], &v["data"]),
        (
            &serde_json::json!(0),
            &serde_json::json!("success"),
            &serde_json::json!({"user": "alice"})
        )
    );
    assert!(v["version"].as_u64().is_some(), "{v}");
    // A value set first is kept and answered at once; a non-JSON value comes as a string.
    gw.api("POST", "/v1/status/qr-2", b"plain words");
    let start = Instant::now();
    let (_, v) = api_call(
        &gw.http,
        "GET",
        "/poll/status?key=qr-2&timeout=10",
        b"",
        &[],
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(v["data"], "plain words");
    // Nothing set: a timeout answer after the timeout.
    let start = Instant::now();
    let (st, v) = api_call(
        &gw.http,
        "GET",
        "/poll/status?key=never&timeout=0.3",
        b"",
        &[],
    );
    assert_eq!(
        (st, v),
        (200, serde_json::json!({"code":-1,"msg":"timeout"}))
    );
    assert!(start.elapsed() >= Duration::from_millis(290));
    // Bad requests.
    let (st, _) = api_call(&gw.http, "GET", "/poll/status?timeout=1", b"", &[]);
    assert_eq!(st, 400);
    let (st, _) = api_call(&gw.http, "GET", "/poll/status?key=k&timeout=soon", b"", &[]);
    assert_eq!(st, 400);
    let (st, _) = api_call(&gw.http, "POST", "/poll/status?key=k", b"", &[]);
    assert_eq!(st, 405);
    let m = gw.metrics();
    assert_eq!(
        (
            m["longlink_poll_released_total"],
            m["longlink_poll_timeouts_total"],
            m["longlink_poll_waiters"]
        ),
        (2.0, 1.0, 0.0)
    );
}

#[test]
fn long_poll_keep_alive_and_status_ttl() {
    let gw = gateway_http(None);
    gw.api("POST", "/v1/status/short?ttl_ms=200", b"1");
    // Two polls on one keep-alive connection.
    let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"GET /poll/status?key=short&timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(std::str::from_utf8(&buf[..n])
        .unwrap()
        .contains("\"data\":1"));
    std::thread::sleep(Duration::from_millis(300)); // past the value's TTL
    s.write_all(b"GET /poll/status?key=short&timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(
        std::str::from_utf8(&buf[..n])
            .unwrap()
            .contains("\"code\":-1"),
        "expired value still served"
    );
    gw.wait_until("expired key dropped", |g| {
        g.metric("longlink_status_keys") == 0.0
    });
}

#[test]
fn requests_pipelined_behind_ones_answered_at_once_are_all_answered() {
    // Each of these is answered in the turn it is read (a poll with nothing to wait for,
    // a 404, a preflight): the one behind it, in the same write, must be answered then too.
    let gw = gateway_http(None);
    gw.api("POST", "/v1/status/ready", b"1");
    let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(
        b"GET /poll/status?key=ready&timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /nope HTTP/1.1\r\nHost: x\r\n\r\n\
          OPTIONS /poll/status HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /poll/status?key=none&timeout=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let (got, statuses) =
        answers_until_close(&mut s, "four answers, then the close: not a read timeout");
    assert_eq!(statuses, ["200", "404", "204", "200"], "{got}");
    assert!(got.contains("\"data\":1"), "{got}");
    assert!(got.contains("\"code\":-1"), "{got}");
}

#[test]
fn a_thousand_pipelined_requests_hold_one_timer_entry_not_a_thousand() {
    // Each keep-alive answer re-arms the wait for the next request; answered in one turn,
    // they all have the same deadline, and the wheel must hold it once.
    let gw = gateway_http(None);
    let before = gw.metric("longlink_timer_wheel_entries");
    let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut reqs = "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
    reqs.push_str("GET /nope HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n");
    s.write_all(reqs.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while got.windows(13).filter(|w| w == b"HTTP/1.1 404 ").count() < 1001 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
    }
    let after = gw.metric("longlink_timer_wheel_entries");
    assert!(
        after - before < 50.0,
        "{before} wheel entries before, {after} after"
    );
}

#[test]
fn a_waiter_that_disconnects_is_released_at_once() {
    let gw = gateway_http(None);
    let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
    s.write_all(b"GET /poll/status?key=gone&timeout=60 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    gw.wait_until("waiting", |g| {
        g.metric("longlink_poll_waiters") == 1.0 && g.metric("longlink_status_keys") == 1.0
    });
    drop(s);
    gw.wait_until("released", |g| {
        g.metric("longlink_poll_waiters") == 0.0 && g.metric("longlink_status_keys") == 0.0
    });
    let (_, v) = gw.api("POST", "/v1/status/gone", b"late");
    assert_eq!(v["released"], 0);
}

#[test]
fn cors_for_listed_origins_and_preflight() {
    let toml = config("[http]\ncors_origins = [\"https://a.example\"]\n");
    let gw = Gateway::spawn(Some(&toml), &["--http", "127.0.0.1:0"]);
    gw.api("POST", "/v1/status/c1", b"v");
    // One request on its own connection: the whole answer.
    let raw = |req: &str| {
        let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    };
    let get_q = |query: &str, origin: &str| {
        raw(&format!(
            "GET /poll/status?{query} HTTP/1.1\r\nOrigin: {origin}\r\nConnection: close\r\n\r\n"
        ))
    };
    let get = |origin: &str| get_q("key=c1&timeout=0", origin);
    let ok = get("https://a.example");
    assert!(
        ok.contains("Access-Control-Allow-Origin: https://a.example\r\n")
            && ok.contains("Vary: Origin")
            && ok.contains("Access-Control-Allow-Credentials: true\r\n")
            && ok.contains("Cache-Control: no-store\r\n"),
        "{ok}"
    );
    // Another origin gets no CORS, but is told the answer varies by origin (a cache must
    // not give this variant to the listed one).
    let other = get("https://b.example");
    assert!(!other.contains("Access-Control-Allow-Origin"), "{other}");
    assert!(other.contains("Vary: Origin\r\n"), "{other}");
    // Errors carry CORS too: a page can read why it was refused.
    let bad = get_q("key=&timeout=0", "https://a.example");
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    assert!(
        bad.contains("Access-Control-Allow-Origin: https://a.example\r\n"),
        "{bad}"
    );
    let r = raw("POST /poll/status?key=c1 HTTP/1.1\r\nOrigin: https://a.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    assert!(
        r.contains("Access-Control-Allow-Origin: https://a.example"),
        "{r}"
    );
    let r = raw("OPTIONS /poll/status?key=c1 HTTP/1.1\r\nOrigin: https://a.example\r\nAccess-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: x-trace\r\nConnection: close\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    for h in [
        "Access-Control-Allow-Origin: https://a.example",
        "Access-Control-Allow-Methods: GET, OPTIONS",
        "Access-Control-Allow-Headers: x-trace",
        "Access-Control-Allow-Credentials: true",
    ] {
        assert!(r.contains(h), "{h} missing: {r}");
    }
    // With "*" (the default) there are no credentials: browsers refuse them with "*".
    let gw = gateway_http(None);
    gw.api("POST", "/v1/status/c2", b"v");
    let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
    s.write_all(b"GET /poll/status?key=c2&timeout=0 HTTP/1.1\r\nOrigin: https://x.example\r\nConnection: close\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    assert!(r.contains("Access-Control-Allow-Origin: *\r\n"), "{r}");
    assert!(!r.contains("Credentials"), "{r}");
}

#[test]
fn status_api_validates() {
    let gw = gateway_http(None);
    let (st, _) = gw.api("POST", "/v1/status/k?ttl_ms=0", b"v");
    assert_eq!(st, 400);
    let (st, _) = gw.api("POST", "/v1/status/k", &vec![b'x'; 70_000]);
    assert_eq!(st, 413);
    let (st, _) = gw.api("GET", "/v1/status/k", b"");
    assert_eq!(st, 405);
    assert_eq!(
        gw.metric("longlink_status_keys"),
        0.0,
        "nothing half-applied"
    );
}

#[test]
fn polls_in_a_row_on_one_keep_alive_connection_each_wait_their_own_time() {
    let gw = gateway_http(None);
    let mut k = KeepAlive::connect(&gw.http);
    // 1. Released by a set before its 2 s timeout.
    k.send("GET", "/poll/status?key=k1&timeout=2", &[], b"");
    gw.wait_until("k1 waits", |g| g.metric("longlink_poll_waiters") == 1.0);
    gw.api("POST", "/v1/status/k1", b"one");
    assert_eq!(k.answer().json()["data"], "one");
    // 2. On the same connection, a longer poll: k1's timer (due at 2 s) must not answer it.
    k.send("GET", "/poll/status?key=k2&timeout=10", &[], b"");
    let early = k.try_answer(Duration::from_millis(2500)).expect("open");
    assert!(
        early.is_none(),
        "answered by an old timer: {}",
        early.unwrap().text()
    );
    gw.api("POST", "/v1/status/k2", b"two");
    assert_eq!(k.answer().json()["data"], "two");
    // 3. A poll that nobody answers waits its own timeout, then says so.
    let start = Instant::now();
    k.send("GET", "/poll/status?key=k3&timeout=1", &[], b"");
    assert_eq!(k.answer().json()["code"], -1);
    assert!(
        start.elapsed() >= Duration::from_millis(990),
        "{:?}",
        start.elapsed()
    );
    // 4. And the connection still serves the next poll.
    gw.api("POST", "/v1/status/k4", b"four");
    k.send("GET", "/poll/status?key=k4&timeout=5", &[], b"");
    assert_eq!(k.answer().json()["data"], "four");
}

#[test]
fn a_keep_alive_http_connection_gets_a_full_handshake_timeout_after_each_answer() {
    let toml = config("[limits]\nhandshake_timeout_ms = 1000\n");
    let gw = Gateway::spawn(Some(&toml), &["--http", "127.0.0.1:0"]);
    let mut k = KeepAlive::connect(&gw.http);
    std::thread::sleep(Duration::from_millis(700));
    k.send("GET", "/poll/status?key=h&timeout=0", &[], b"");
    assert_eq!(k.answer().status, 200);
    // 1.3 s after connecting: the first deadline (1.0 s) has passed, the one re-armed by
    // the answer (1.7 s) has not, so the connection is still served.
    std::thread::sleep(Duration::from_millis(600));
    k.send("GET", "/poll/status?key=h&timeout=0", &[], b"");
    assert_eq!(
        k.answer().status,
        200,
        "closed by the first request's deadline"
    );
    // Idle past the re-armed deadline: closed.
    assert!(
        k.try_answer(Duration::from_secs(3)).is_err(),
        "an idle keep-alive connection stayed open"
    );
}

#[test]
fn status_versions_let_a_page_follow_a_key_through_its_states() {
    let gw = gateway_http(None);
    let (_, v) = gw.api("POST", "/v1/status/login-1", b"\"waiting\"");
    let v1 = v["version"].as_u64().expect("a version");
    // Without `since`, a value set before the poll is answered at once, with its version.
    let (_, a) = api_call(
        &gw.http,
        "GET",
        "/poll/status?key=login-1&timeout=5",
        b"",
        &[],
    );
    assert_eq!(
        (&a["data"], a["version"].as_u64()),
        (&serde_json::json!("waiting"), Some(v1))
    );
    // With `since` = the version seen, the poll waits for a newer value.
    let mut k = KeepAlive::connect(&gw.http);
    k.send(
        "GET",
        &format!("/poll/status?key=login-1&since={v1}&timeout=5"),
        &[],
        b"",
    );
    assert!(k
        .try_answer(Duration::from_millis(300))
        .expect("open")
        .is_none());
    let (_, v) = gw.api("POST", "/v1/status/login-1", b"\"scanned\"");
    assert_eq!(v["released"], 1);
    let v2 = v["version"].as_u64().unwrap();
    assert!(v2 > v1);
    let a = k.answer().json();
    assert_eq!(
        (&a["data"], a["version"].as_u64()),
        (&serde_json::json!("scanned"), Some(v2))
    );
    // The next state, on the same connection.
    k.send(
        "GET",
        &format!("/poll/status?key=login-1&since={v2}&timeout=5"),
        &[],
        b"",
    );
    assert!(k
        .try_answer(Duration::from_millis(300))
        .expect("open")
        .is_none());
    let (_, v) = gw.api("POST", "/v1/status/login-1", b"\"confirmed\"");
    let v3 = v["version"].as_u64().unwrap();
    assert_eq!(k.answer().json()["data"], "confirmed");
    // A page that missed a state gets the newest at once.
    let (_, a) = api_call(
        &gw.http,
        "GET",
        &format!("/poll/status?key=login-1&since={v1}&timeout=5"),
        b"",
        &[],
    );
    assert_eq!(
        (&a["data"], a["version"].as_u64()),
        (&serde_json::json!("confirmed"), Some(v3))
    );
    // A version from the future is not newer than itself: the poll waits.
    let mut k2 = KeepAlive::connect(&gw.http);
    k2.send(
        "GET",
        &format!("/poll/status?key=login-1&since={}&timeout=0.5", v3 + 1),
        &[],
        b"",
    );
    assert_eq!(
        k2.answer().json()["code"],
        -1,
        "answered with an older value"
    );
    // Versions only grow, also for a key set anew after it expired.
    gw.api("POST", "/v1/status/brief?ttl_ms=50", b"x");
    std::thread::sleep(Duration::from_millis(150));
    let (_, v) = gw.api("POST", "/v1/status/brief", b"y");
    assert!(v["version"].as_u64().unwrap() > v3);
    let (st, _) = api_call(
        &gw.http,
        "GET",
        "/poll/status?key=login-1&since=soon",
        b"",
        &[],
    );
    assert_eq!(st, 400);
}

#[test]
fn a_poll_whose_client_closes_with_its_request_is_released() {
    let gw = gateway_http(None);
    // The request and the FIN (or a reset) arrive together: the waiter must not stay
    // parked (holding its fd and key) until its timeout.
    for i in 0..60 {
        let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
        let req = format!("GET /poll/status?key=gone-{i}&timeout=60 HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        if i % 2 == 0 {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        } else {
            // SO_LINGER 0: the close sends a reset.
            let l = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt on our own socket with a correctly sized struct.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&l as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as u32,
                )
            };
        }
        drop(s);
    }
    gw.wait_until("every waiter released", |g| {
        g.metric("longlink_poll_waiters") == 0.0 && g.metric("longlink_status_keys") == 0.0
    });
    // A client that keeps sending behind its parked poll is cut off, not buffered.
    let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
    s.write_all(b"GET /poll/status?key=flood&timeout=60 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    gw.wait_until("waiting", |g| g.metric("longlink_poll_waiters") == 1.0);
    let junk = vec![b'x'; 64 * 1024];
    for _ in 0..4 {
        if s.write_all(&junk).is_err() {
            break;
        }
    }
    gw.wait_until("the flooder closed", |g| {
        g.metric("longlink_poll_waiters") == 0.0
            && g.metric("longlink_bad_frames_total{kind=\"flood\"}") == 1.0
    });
}

#[test]
fn the_status_store_is_bounded_by_count_and_bytes() {
    let toml = config("[http]\nmax_status_values = 3\nmax_status_bytes = 4096\n");
    let gw = Gateway::spawn(Some(&toml), &["--http", "127.0.0.1:0"]);
    for k in ["a", "b", "c"] {
        let (st, _) = gw.api("POST", &format!("/v1/status/{k}?ttl_ms=400"), b"v");
        assert_eq!(st, 200);
    }
    // A fourth value: refused, counted, nothing changed; replacing a held one is fine.
    let (st, v) = gw.api("POST", "/v1/status/d", b"v");
    assert_eq!(st, 507, "{v}");
    assert!(v["error"].as_str().unwrap().contains("full"), "{v}");
    let (st, _) = gw.api("POST", "/v1/status/a?ttl_ms=400", b"again");
    assert_eq!(st, 200);
    let (_, a) = api_call(&gw.http, "GET", "/poll/status?key=d&timeout=0", b"", &[]);
    assert_eq!(a["code"], -1, "the refused value was kept: {a}");
    // Bytes: one value of 3 KiB fits (replacing a), another does not.
    let (st, _) = gw.api("POST", "/v1/status/a?ttl_ms=400", &[b'x'; 3072]);
    assert_eq!(st, 200);
    let (st, _) = gw.api("POST", "/v1/status/b?ttl_ms=400", &[b'y'; 2048]);
    assert_eq!(st, 507);
    assert_eq!(gw.metric("longlink_status_refused_total"), 2.0);
    // Once they expire there is room again.
    std::thread::sleep(Duration::from_millis(600));
    let (st, _) = gw.api("POST", "/v1/status/d", &[b'z'; 4000]);
    assert_eq!(st, 200);
}

#[test]
fn the_cli_client_speaks_websocket_pbbp2() {
    let gw = gateway_http(Some(&config("")));
    let cli = |device: &str, token: &str, extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
            .args(["client", "--ws", &format!("ws://{}/ws", gw.http)])
            .args(["--device", device, "--token", token])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Heartbeats every 50 ms answered with PONGs; an ack=1 push ACKed (with its push_id).
    let child = cli(
        "cliws",
        "demo-token",
        &["--ack", "--count", "2", "--ping-ms", "50"],
    );
    gw.wait_until("client online", |g| {
        g.api("GET", "/v1/online/device/demo/cliws", b"").1["online"] == true
    });
    let on = gw.api("GET", "/v1/online/device/demo/cliws", b"").1;
    assert_eq!(on["connections"][0]["transport"], "ws");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (_, v) = gw.api("POST", "/v1/push/device/demo/cliws", b"hello ws cli");
    assert_eq!(v["delivered"], 1);
    let (_, v) = gw.api(
        "POST",
        "/v1/push/device/demo/cliws?ack=1&wait_ms=5000",
        b"reliable",
    );
    assert_eq!(v["acked"], 1, "{v}");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = lines.iter().filter_map(|l| l["name"].as_str()).collect();
    assert_eq!(names[0], "HELLO");
    assert!(
        names.iter().filter(|n| **n == "PONG").count() >= 2,
        "{names:?}"
    );
    let pushes: Vec<_> = lines.iter().filter(|l| l["name"] == "PUSH").collect();
    assert_eq!(pushes[0]["payload"], "hello ws cli");
    assert_eq!(pushes[1]["payload"], "reliable");
    assert!(pushes[1]["headers"]["push_id"].is_string(), "{}", pushes[1]);
    // A refused upgrade is an error that says why.
    let out = cli("cliws2", "wrong", &["--count", "1"])
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the upgrade: HTTP/1.1 401"), "{err}");
}

#[test]
fn a_pbbp2_bye_right_behind_the_upgrade_gets_the_101_its_pong_and_a_close() {
    // The upgrade, a PING and a BYE in one write: the 101, the PONG, a Close 1000, then the
    // end; nothing queued before the BYE is dropped.
    let gw = gateway_http(None);
    let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut bytes = b"GET /ws?app_id=demo&device_id=bye2&token=x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: pbbp2\r\n\r\n".to_vec();
    for f in [
        Frame::control(method::PING, 2, &[]),
        Frame::control(method::BYE, 3, &[]),
    ] {
        bytes.extend(Ws::frame_bytes(true, 2, &f.encode_to_vec()));
    }
    s.write_all(&bytes).unwrap();
    let mut got = vec![];
    s.read_to_end(&mut got)
        .expect("the close: not a read timeout");
    let head = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an answer")
        + 4;
    assert!(got.starts_with(b"HTTP/1.1 101"), "{got:?}");
    // Binary messages (the gateway's HELLO, then the PONG), then the Close (1000, no
    // reason): server frames, unmasked, each under 64 KiB.
    let mut frames = &got[head..];
    let mut seen = vec![];
    while frames.first() == Some(&0x82) {
        let (n, at) = match frames[1] {
            126 => (usize::from(u16::from_be_bytes([frames[2], frames[3]])), 4),
            n => (usize::from(n), 2),
        };
        let f = Frame::decode(&frames[at..at + n]).unwrap();
        seen.push((f.method, f.seqid));
        frames = &frames[at + n..];
    }
    assert_eq!(seen, [(method::HELLO, 0), (method::PONG, 2)]);
    assert_eq!(frames, [0x88, 0x02, 0x03, 0xe8]);
}

#[test]
fn an_upgrade_without_host_or_over_http_1_0_is_refused() {
    // RFC 6455 4.2.1: an HTTP/1.1 GET with a Host header, else 400.
    let gw = gateway_http(None);
    for (version, host) in [("HTTP/1.1", ""), ("HTTP/1.0", "Host: x\r\n")] {
        let mut s = std::net::TcpStream::connect(&gw.http).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        write!(
            s,
            "GET /ws?app_id=demo&device_id=h&token=x {version}\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        assert!(got.starts_with("HTTP/1.1 400"), "{version} {host:?}: {got}");
    }
}

#[test]
fn pbbp2_closed_for_too_many_bad_frames_gets_a_close_frame_after_its_error() {
    // RFC 6455 7.1.7: the WebSocket's own Close (1002 here) follows the last ERROR.
    let gw = gateway_http(None);
    let mut w = Ws::connect(
        &gw.http,
        "/ws?app_id=demo&device_id=bad9&token=x",
        &[("Sec-WebSocket-Protocol", "pbbp2")],
    )
    .unwrap();
    for _ in 0..9 {
        w.send(true, 2, b"\xff\xff\xff");
    }
    let mut last = None;
    while let Some(f) = w.recv_within(T) {
        last = Some((f.opcode, f.payload.clone()));
        if f.opcode == 8 {
            assert_eq!(f.close().0, 1002, "{:?}", f.close());
            break;
        }
    }
    assert_eq!(last.map(|l| l.0), Some(8), "no Close frame before the end");
}
