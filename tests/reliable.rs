//! `ack=1` pushes (DESIGN.md §6): retransmitted until the client ACKs them, given up and
//! counted after max_retries. Against the real binary.

mod common;

use std::time::{Duration, Instant};

use common::*;
use longlink::proto::{method, Frame};
use prost::Message;

fn gw() -> Gateway {
    Gateway::spawn(
        Some(&config(
            "[limits]\nack_timeout_ms = 150\nmax_retries = 3\nreconnect_grace_ms = 300\n",
        )),
        &["--http", "127.0.0.1:0"],
    )
}

#[test]
fn an_unacknowledged_push_is_retransmitted_max_retries_times_then_reported() {
    let gw = gw();
    let (mut c, id) = gw.hello("noack", None);
    let (_, v) = gw.api("POST", &format!("/v1/push/conn/{id}?ack=1"), b"important");
    assert_eq!(v["delivered"], 1);
    // The original and 3 retransmits (150, 300, 600 ms apart), all with the same seqid.
    let start = Instant::now();
    let copies: Vec<Frame> = (0..4).map(|_| c.recv()).collect();
    assert!(
        copies
            .iter()
            .all(|f| f.seqid == 1 && &f.payload[..] == b"important"),
        "{copies:?}"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "retransmits came too fast: {:?}",
        start.elapsed()
    );
    gw.wait_until("given up", |g| {
        g.metric("longlink_undelivered_pushes_total") == 1.0
    });
    assert!(
        c.drain_with_ping(77).is_empty(),
        "sent again after max_retries"
    );
    assert_eq!(gw.metric("longlink_retransmits_total"), 3.0);
    // Non-ack pushes are not tracked.
    gw.api("POST", &format!("/v1/push/conn/{id}"), b"plain");
    assert_eq!(&c.recv().payload[..], b"plain");
    std::thread::sleep(Duration::from_millis(400));
    assert!(c.drain_with_ping(78).is_empty());
}

#[test]
fn an_ack_after_the_first_retransmit_stops_further_ones() {
    let gw = gw();
    let (mut c, id) = gw.hello("lateack", None);
    gw.api("POST", &format!("/v1/push/conn/{id}?ack=1"), b"m");
    let first = c.recv();
    let again = c.recv();
    assert_eq!((first.seqid, again.seqid), (1, 1));
    c.send(&Frame::control(method::ACK, 1, &[]));
    gw.wait_until("acked", |g| g.metric("longlink_acked_pushes_total") == 1.0);
    std::thread::sleep(Duration::from_millis(800)); // past the next two retransmit times
    assert!(
        c.drain_with_ping(5).is_empty(),
        "retransmitted after its ACK"
    );
    assert_eq!(gw.metric("longlink_undelivered_pushes_total"), 0.0);
    assert_eq!(gw.metric("longlink_retransmits_total"), 1.0);
}

#[test]
fn pbbp2_websocket_acks_and_batches_and_lost_connections() {
    let gw = gw();
    let mut ws = Ws::connect(
        &gw.http,
        "/ws?app_id=demo&device_id=wsack&token=demo-token",
        &[("Sec-WebSocket-Protocol", "pbbp2")],
    )
    .unwrap();
    let hello = Frame::decode(&ws.recv().payload[..]).unwrap();
    let id = hello.header("conn_id").unwrap().to_string();
    let batch = format!(r#"[{{"to":"conn","conn_id":"{id}","payload":"b1","ack":1}}]"#);
    let (st, v) = gw.api("POST", "/v1/push/batch", batch.as_bytes());
    assert_eq!((st, &v["delivered"]), (200, &serde_json::json!(1)), "{v}");
    let f = Frame::decode(&ws.recv().payload[..]).unwrap();
    assert_eq!((f.seqid, &f.payload[..]), (1, &b"b1"[..]));
    ws.send(
        true,
        2,
        &Frame::control(method::ACK, 1, &[]).encode_to_vec(),
    );
    gw.wait_until("acked over pbbp2", |g| {
        g.metric("longlink_acked_pushes_total") == 1.0
    });

    // A connection that goes with pushes unacknowledged and does not come back within the
    // grace window (300 ms here): they are counted undelivered.
    let (c, id2) = gw.hello("leaver", None);
    gw.api("POST", &format!("/v1/push/conn/{id2}?ack=1"), b"x");
    gw.api("POST", &format!("/v1/push/conn/{id2}?ack=1"), b"y");
    drop(c);
    gw.wait_until("lost pushes counted", |g| {
        g.metric("longlink_undelivered_pushes_total") == 2.0
    });
    let (st, _) = gw.api("POST", &format!("/v1/push/conn/{id}?ack=2"), b"z");
    assert_eq!(st, 400);
}

#[test]
fn a_device_that_reconnects_within_the_grace_window_gets_its_unacked_pushes_first() {
    let gw = Gateway::with_config(&config(
        "[limits]\nack_timeout_ms = 400\nmax_retries = 5\nreconnect_grace_ms = 5000\n",
    ));
    let (mut c1, _) = gw.hello("flaky", None);
    for p in ["p1", "p2", "p3"] {
        let (_, v) = gw.api("POST", "/v1/push/device/demo/flaky?ack=1", p.as_bytes());
        assert_eq!(v["delivered"], 1);
    }
    let got: Vec<_> = (0..3).map(|_| c1.recv().payload).collect();
    assert_eq!(got, vec![&b"p1"[..], b"p2", b"p3"]);
    drop(c1); // gone without ACKing any
    gw.wait_until("flaky offline", |g| {
        g.api("GET", "/v1/online/device/demo/flaky", b"").1["online"] == false
    });

    let (mut c2, id2) = gw.hello("flaky", None);
    // Exactly those three, first, in order (the new connection's seqids)...
    let replayed: Vec<Frame> = (0..3).map(|_| c2.recv()).collect();
    let payloads: Vec<&[u8]> = replayed.iter().map(|f| &f.payload[..]).collect();
    assert_eq!(payloads, vec![&b"p1"[..], b"p2", b"p3"]);
    assert_eq!(
        replayed.iter().map(|f| f.seqid).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // ...then new ones.
    gw.api("POST", &format!("/v1/push/conn/{id2}?ack=1"), b"p4");
    let p4 = c2.recv();
    assert_eq!((&p4.payload[..], p4.seqid), (&b"p4"[..], 4));
    for seq in 1..=4 {
        c2.send(&Frame::control(method::ACK, seq, &[]));
    }
    gw.wait_until("all acked", |g| {
        g.metric("longlink_acked_pushes_total") == 4.0
    });
    std::thread::sleep(Duration::from_millis(1000)); // past two retransmit times
    assert!(
        c2.drain_with_ping(9).is_empty(),
        "something was sent twice after its ACK"
    );
    let m = gw.metrics();
    assert_eq!(
        (
            m["longlink_replayed_pushes_total"],
            m["longlink_undelivered_pushes_total"]
        ),
        (3.0, 0.0)
    );
}

#[test]
fn after_the_grace_window_parked_pushes_are_reported_and_not_replayed() {
    let gw = Gateway::with_config(&config(
        "[limits]\nack_timeout_ms = 5000\nreconnect_grace_ms = 300\n",
    ));
    let (mut c, id) = gw.hello("late", None);
    gw.api("POST", &format!("/v1/push/conn/{id}?ack=1"), b"a");
    gw.api("POST", &format!("/v1/push/conn/{id}?ack=1"), b"b");
    assert_eq!(&c.recv().payload[..], b"a");
    drop(c);
    gw.wait_until("reported after the window", |g| {
        g.metric("longlink_undelivered_pushes_total") == 2.0
    });
    let (mut back, _) = gw.hello("late", None);
    assert!(
        back.drain_with_ping(3).is_empty(),
        "replayed after the window"
    );
    assert_eq!(gw.metric("longlink_replayed_pushes_total"), 0.0);
}
