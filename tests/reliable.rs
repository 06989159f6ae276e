//! `ack=1` pushes (docs/PROTOCOL.md, "Reliable pushes"): retransmitted until the client ACKs them, given up and
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

fn push_id(f: &Frame) -> String {
    f.header("push_id")
        .unwrap_or_else(|| panic!("no push_id on {f:?}"))
        .to_string()
}

#[test]
fn a_reliable_push_keeps_its_push_id_through_retransmits_and_only_reliable_ones_have_one() {
    let gw = gw();
    let (mut c, _) = gw.hello("ids", None);
    gw.api("POST", "/v1/push/device/demo/ids", b"plain");
    let plain = c.recv();
    assert_eq!(&plain.payload[..], b"plain");
    assert_eq!(plain.header("push_id"), None);
    gw.api("POST", "/v1/push/device/demo/ids?ack=1", b"r1");
    let sent = c.recv();
    let again = c.recv(); // not ACKed: retransmitted after ack_timeout_ms
    assert_eq!((sent.seqid, &again.payload[..]), (again.seqid, &b"r1"[..]));
    assert_eq!(push_id(&sent), push_id(&again));
    c.send(&Frame::control(method::ACK, sent.seqid, &[]));
    // A batch's reliable items get one id each, in order; its others none.
    let batch = br#"[{"to":"device","app":"demo","device_id":"ids","payload":"b1","ack":1},
        {"to":"device","app":"demo","device_id":"ids","payload":"b2"},
        {"to":"device","app":"demo","device_id":"ids","payload":"b3","ack":1}]"#;
    let (status, v) = gw.api("POST", "/v1/push/batch", batch);
    assert_eq!(status, 200, "{v}");
    let b: Vec<Frame> = (0..3).map(|_| c.recv()).collect();
    assert_eq!(b[1].header("push_id"), None);
    let (b1, b3) = (push_id(&b[0]), push_id(&b[2]));
    assert!(push_id(&sent) < b1 && b1 < b3, "{b1} {b3}");
    // Room for the header is kept: the biggest push that fits is refused as ack=1, and
    // one PUSH_ID_RESERVE (64) bytes smaller goes.
    let fits = |n: usize, q: &str| {
        let path = format!("/v1/push/device/demo/nobody{q}");
        gw.api("POST", &path, &vec![b'x'; n]).0 != 413
    };
    let biggest = (65_000..65_535)
        .rev()
        .find(|&n| fits(n, ""))
        .expect("a size that fits");
    assert!(!fits(biggest + 1, ""));
    assert!(!fits(biggest, "?ack=1"));
    assert!(fits(biggest - 64, "?ack=1"));
    assert!(!fits(biggest - 63, "?ack=1"));
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
    let first: Vec<Frame> = (0..3).map(|_| c1.recv()).collect();
    let got: Vec<_> = first.iter().map(|f| &f.payload[..]).collect();
    assert_eq!(got, vec![&b"p1"[..], b"p2", b"p3"]);
    // Each reliable push names itself (`push_id`): distinct pushes, distinct ids.
    let ids: Vec<String> = first.iter().map(push_id).collect();
    assert!(ids[0] < ids[1] && ids[1] < ids[2], "{ids:?}");
    assert!(ids[0].ends_with(".n1"), "{ids:?}");
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
    // ...under the ids they had: what a client de-duplicates redeliveries by.
    assert_eq!(replayed.iter().map(push_id).collect::<Vec<_>>(), ids);
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

/// An API call on its own thread (the answer may wait for a client's ACK); returns the
/// answer and how long it took.
fn api_later(
    gw: &Gateway,
    path: &str,
    body: &'static [u8],
) -> std::thread::JoinHandle<((u16, serde_json::Value), Duration)> {
    let (addr, path) = (gw.api.clone(), path.to_string());
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = api_call(&addr, "POST", &path, body, &[]);
        (r, t0.elapsed())
    })
}

#[test]
fn wait_ms_answers_when_the_client_acks() {
    let gw = gw();
    let (mut c, id) = gw.hello("waiter", None);
    let call = api_later(
        &gw,
        &format!("/v1/push/conn/{id}?ack=1&wait_ms=5000"),
        b"w1",
    );
    let f = c.recv();
    assert_eq!(&f.payload[..], b"w1");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!call.is_finished(), "answered before the ACK");
    c.send(&Frame::control(method::ACK, f.seqid, &[]));
    let ((st, v), took) = call.join().unwrap();
    assert_eq!(st, 200);
    assert_eq!(
        (
            &v["delivered"],
            &v["acked"],
            &v["undelivered"],
            &v["pending"]
        ),
        (&1.into(), &1.into(), &0.into(), &0.into()),
        "{v}"
    );
    assert!(took >= Duration::from_millis(300), "{took:?}");
    // Without wait_ms the answer does not wait and carries no ACK fields.
    let (_, v) = gw.api("POST", &format!("/v1/push/conn/{id}?ack=1"), b"w2");
    assert_eq!(v["delivered"], 1);
    assert!(v.get("acked").is_none(), "{v}");
}

#[test]
fn wait_ms_reports_pending_when_it_runs_out_and_undelivered_when_given_up() {
    let gw = gw();
    let (mut c, id) = gw.hello("silent", None);
    // Nobody ACKs: at 250 ms the answer says pending (the push itself goes on).
    let call = api_later(&gw, &format!("/v1/push/conn/{id}?ack=1&wait_ms=250"), b"s1");
    let ((st, v), took) = call.join().unwrap();
    assert_eq!(st, 200);
    assert_eq!((&v["acked"], &v["pending"]), (&0.into(), &1.into()), "{v}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(c.recv().seqid, 1);
    // ttl_ms 300 < the retries' 2.25 s: given up at its TTL, inside the wait.
    let call = api_later(
        &gw,
        &format!("/v1/push/conn/{id}?ack=1&ttl_ms=300&wait_ms=5000"),
        b"s2",
    );
    let ((_, v), took) = call.join().unwrap();
    assert_eq!(
        (&v["acked"], &v["undelivered"], &v["pending"]),
        (&0.into(), &1.into(), &0.into()),
        "{v}"
    );
    assert!(
        took < Duration::from_secs(2),
        "not given up at its TTL: {took:?}"
    );
    // Bad values are refused.
    for q in [
        "wait_ms=-1",
        "wait_ms=x",
        "wait_ms=300001",
        "ttl_ms=86400001",
    ] {
        let (st, v) = gw.api("POST", &format!("/v1/push/conn/{id}?ack=1&{q}"), b"x");
        assert_eq!(st, 400, "{q}: {v}");
    }
}

#[test]
fn a_waiting_batch_reports_each_push_and_survives_a_reconnect() {
    let gw = Gateway::spawn(
        Some(&config(
            "[limits]\nack_timeout_ms = 2000\nreconnect_grace_ms = 5000\n",
        )),
        &["--http", "127.0.0.1:0"],
    );
    // Device "two" holds a TCP and a pbbp2 WebSocket connection; "hop" will reconnect.
    let (mut t, _) = gw.hello("two", None);
    let mut ws = Ws::connect(
        &gw.http,
        "/ws?app_id=demo&device_id=two&token=demo-token",
        &[("Sec-WebSocket-Protocol", "pbbp2")],
    )
    .unwrap();
    let _ = ws.recv(); // HELLO
    let (mut hop, _) = gw.hello("hop", None);
    let body: &'static [u8] = br#"[
        {"to":"device","app":"demo","device_id":"two","payload":"b1","ack":1},
        {"to":"device","app":"demo","device_id":"hop","payload":"b2","ack":1},
        {"to":"device","app":"demo","device_id":"nobody","payload":"b3","ack":1},
        {"to":"device","app":"demo","device_id":"two","payload":"b4"}
    ]"#;
    let call = api_later(&gw, "/v1/push/batch?wait_ms=5000", body);
    // "two" ACKs on both transports.
    let f = t.recv();
    assert_eq!(&f.payload[..], b"b1");
    t.send(&Frame::control(method::ACK, f.seqid, &[]));
    let f = Frame::decode(&ws.recv().payload[..]).unwrap();
    assert_eq!(&f.payload[..], b"b1");
    ws.send(
        true,
        2,
        &Frame::control(method::ACK, f.seqid, &[]).encode_to_vec(),
    );
    // "hop" drops without ACKing, comes back, gets b2 again and ACKs it there.
    assert_eq!(&hop.recv().payload[..], b"b2");
    drop(hop);
    gw.wait_until("hop offline", |g| {
        g.api("GET", "/v1/online/device/demo/hop", b"").1["online"] == false
    });
    assert!(!call.is_finished(), "answered with b2 unacknowledged");
    let (mut hop2, _) = gw.hello("hop", None);
    let f = hop2.recv();
    assert_eq!(&f.payload[..], b"b2");
    hop2.send(&Frame::control(method::ACK, f.seqid, &[]));
    let ((st, v), _) = call.join().unwrap();
    assert_eq!(st, 200);
    let r = &v["results"];
    // Two copies went to "two", one per connection; the first ACK settles the device (the
    // other copy stops being tracked, so the second ACK finds nothing).
    assert_eq!(
        (&r[0]["delivered"], &r[0]["acked"], &r[0]["pending"]),
        (&2.into(), &1.into(), &0.into()),
        "{v}"
    );
    assert_eq!(
        (&r[1]["acked"], &r[1]["pending"]),
        (&1.into(), &0.into()),
        "{v}"
    );
    assert_eq!(r[2]["offline"], serde_json::json!(["nobody"]), "{v}");
    assert_eq!(
        (&r[3]["delivered"], &r[3]["acked"]),
        (&2.into(), &0.into()),
        "{v}"
    );
    assert_eq!(v["delivered"], 5);
}

#[test]
fn a_busy_reliable_connection_keeps_one_retransmit_timer() {
    let gw = gw();
    let (mut c, id) = gw.hello("steady", None);
    // One keep-alive API connection for pushes and metrics, so that API connections add no
    // timers of their own.
    let mut api = KeepAlive::connect(&gw.api);
    let mut call = |method: &str, path: &str| -> String {
        api.send(method, path, &[], b"s");
        api.answer().text()
    };
    let wheel = |call: &mut dyn FnMut(&str, &str) -> String| -> f64 {
        let m = call("GET", "/metrics");
        m.lines()
            .find_map(|l| l.strip_prefix("longlink_timer_wheel_entries "))
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = wheel(&mut call);
    // Each push is ACKed before the next, so the connection's queue empties 300 times; the
    // wheel must not gain an entry each time.
    for i in 1..=300 {
        call("POST", &format!("/v1/push/conn/{id}?ack=1"));
        let f = c.recv();
        assert_eq!(f.seqid, i);
        c.send(&Frame::control(method::ACK, f.seqid, &[]));
    }
    // The last ACK is processed before this PING's PONG.
    assert!(c.drain_with_ping(1000).is_empty());
    let after = wheel(&mut call);
    assert!(after <= before + 1.0, "timer entries {before} -> {after}");
    assert_eq!(gw.metric("longlink_acked_pushes_total"), 300.0);
}

#[test]
fn a_waiting_answer_on_a_keep_alive_connection_keeps_the_pipelined_requests_behind_it() {
    use std::io::Write;
    let gw = gw();
    let (mut c, id) = gw.hello("pipe", None);
    let mut api = KeepAlive::connect(&gw.api);
    // A waiting push; once it is out, two more requests behind it (they wait unread in the
    // socket while the first is answered).
    api.send(
        "POST",
        &format!("/v1/push/conn/{id}?ack=1&wait_ms=5000"),
        &[],
        b"p1",
    );
    let f = c.recv();
    assert_eq!(&f.payload[..], b"p1");
    let more = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n\
         POST /v1/push/conn/{id} HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\np2"
    );
    api.s.write_all(more.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Nothing behind the waiting request has run yet (answers stay in order).
    // (p1's own retransmit may be among what arrived.)
    let early = c.drain_with_ping(50);
    assert!(
        early.iter().all(|f| &f.payload[..] == b"p1"),
        "p2 overtook the waiting push: {early:?}"
    );
    c.send(&Frame::control(method::ACK, f.seqid, &[]));
    let answers: Vec<Answer> = (0..3).map(|_| api.answer()).collect();
    assert_eq!(answers[0].status, 200);
    let v = answers[0].json();
    assert_eq!(v["acked"], 1, "{v}");
    assert!(
        answers[1].text().contains("\"ok\""),
        "{}",
        answers[1].text()
    );
    assert_eq!(answers[2].status, 200);
    assert_eq!(&c.recv().payload[..], b"p2");
}

#[test]
fn a_new_push_is_retransmitted_on_its_own_schedule_behind_a_backed_off_one() {
    let gw = gw(); // first retransmit after 150 ms, then 300, 600
    let (mut c, id) = gw.hello("sched", None);
    gw.api("POST", &format!("/v1/push/conn/{id}?ack=1"), b"A");
    for _ in 0..3 {
        assert_eq!(&c.recv().payload[..], b"A"); // t = 0, 150, 450 ms
    }
    // A's next retransmit is 600 ms away; B's first is due 150 ms after it is sent.
    let sent = Instant::now();
    gw.api("POST", &format!("/v1/push/conn/{id}?ack=1"), b"B");
    assert_eq!(&c.recv().payload[..], b"B");
    let again = c.recv();
    assert_eq!(
        &again.payload[..],
        b"B",
        "B's retransmit waited for A's backed-off one"
    );
    assert!(
        sent.elapsed() < Duration::from_millis(450),
        "{:?}",
        sent.elapsed()
    );
}

#[test]
fn an_api_client_that_does_not_read_its_answers_is_paused_not_dropped() {
    use std::io::Write;
    let gw = Gateway::with_config(&config("[limits]\nmax_output_bytes = 16384\n"));
    let mut api = KeepAlive::connect(&gw.api);
    let rss0 = gw.rss();
    // 2,000 pipelined metrics requests (~25 MB of answers), none read for a while: the gateway
    // stops taking requests while the unread answers pass the bound, so its memory does not
    // follow the answers; then everything is answered.
    let one = "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n";
    api.s.write_all(one.repeat(2000).as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let grew = gw.rss().saturating_sub(rss0);
    assert!(
        grew < 4 << 20,
        "RSS grew {grew} bytes with unread API answers"
    );
    for _ in 0..2000 {
        let a = api.answer();
        assert!(a.status == 200 && a.text().contains("longlink_"));
    }
}

#[test]
fn an_api_client_paused_for_unread_answers_is_not_read_meanwhile() {
    // Paused, it goes on sending: that input must wait in the kernel (TCP's window closes
    // on it), not pile up in the gateway, which does not bound the API's input otherwise.
    use std::io::{ErrorKind, Write};
    let gw = Gateway::with_config(&config("[limits]\nmax_output_bytes = 16384\n"));
    // A narrow receive window: the answers back up in the gateway, not in the kernel.
    let mut s = narrow_stream(&gw.api);
    s.set_nonblocking(true).unwrap();
    let chunk = "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n".repeat(1000);
    let end = std::time::Instant::now() + Duration::from_millis(1500);
    let mut sent = 0usize;
    while std::time::Instant::now() < end {
        match s.write(chunk.as_bytes()) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("the gateway dropped the client: {e}"),
        }
    }
    let held = gw.metric("longlink_input_held_bytes");
    assert!(
        held < 256.0 * 1024.0,
        "{held} bytes of input held after {sent} sent"
    );
}

#[test]
fn every_tracked_copy_ends_exactly_once_through_drops_reconnects_and_expiry() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let gw = Gateway::with_config(&config(
        "[limits]\nack_timeout_ms = 100\nmax_retries = 3\nreconnect_grace_ms = 400\n",
    ));
    const DEVICES: u64 = 8;
    let stop = Arc::new(AtomicBool::new(false));
    // Each device: connects, ACKs most pushes, sometimes drops its connection and comes back
    // within the grace window or after it; once `stop` is set it stays and ACKs everything.
    let devices: Vec<_> = (0..DEVICES)
        .map(|d| {
            let (tcp, stop) = (gw.tcp.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = Lcg(d + 1);
                loop {
                    let mut c = Client::connect(&tcp);
                    c.hello("demo", &format!("soak{d}"), "demo-token", None);
                    loop {
                        let calm = stop.load(Ordering::Relaxed);
                        match c.try_recv(Duration::from_millis(50)) {
                            Ok(Some(f)) if f.method == method::PUSH => {
                                if calm || rng.next(10) < 7 {
                                    c.send(&Frame::control(method::ACK, f.seqid, &[]));
                                }
                            }
                            Ok(Some(_)) => {}
                            // Quiet after the pushes stopped: wait out the retransmit timers
                            // once more (everything is ACKed, so nothing may come).
                            Ok(None) if calm => {
                                if c.try_recv(Duration::from_millis(600)) == Ok(None) {
                                    return;
                                }
                            }
                            Ok(None) => {}
                            Err(()) => panic!("gateway closed soak{d}"),
                        }
                        if !calm && rng.next(20) == 0 {
                            break; // drop the connection
                        }
                    }
                    drop(c); // gone: back within the grace window (400 ms) or not
                    std::thread::sleep(Duration::from_millis(rng.next(700)));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // Pushes, some with a TTL, some answered after their outcome.
    let mut rng = Lcg(99);
    let mut tracked = 0u64;
    let mut waits = vec![];
    for k in 0..600 {
        let d = rng.next(DEVICES);
        let ttl = if rng.next(5) == 0 { "&ttl_ms=150" } else { "" };
        let path = format!("/v1/push/device/demo/soak{d}?ack=1{ttl}");
        if rng.next(10) == 0 {
            waits.push(api_later(&gw, &format!("{path}&wait_ms=400"), b"w"));
            continue;
        }
        let (st, v) = gw.api("POST", &path, format!("p{k}").as_bytes());
        assert_eq!(st, 200, "{v}");
        tracked += v["delivered"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
    for w in waits {
        let ((st, v), _) = w.join().unwrap();
        assert_eq!(st, 200, "{v}");
        let d = v["delivered"].as_u64().unwrap();
        let (a, u, p) = (
            v["acked"].as_u64().unwrap(),
            v["undelivered"].as_u64().unwrap(),
            v["pending"].as_u64().unwrap(),
        );
        assert_eq!(a + u + p, d, "a waiting answer does not add up: {v}");
        tracked += d;
    }
    stop.store(true, Ordering::Relaxed);
    for d in devices {
        d.join().unwrap();
    }
    // Every copy sent for an ACK ended exactly once: ACKed, or given up (retries, TTL, grace).
    let mut last = (0.0, 0.0);
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let m = gw.metrics();
        last = (
            m["longlink_acked_pushes_total"],
            m["longlink_undelivered_pushes_total"],
        );
        if last.0 + last.1 >= tracked as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        last.0 + last.1,
        tracked as f64,
        "acked {} + undelivered {} != {tracked} tracked copies",
        last.0,
        last.1
    );
    assert!(
        last.0 > 0.0 && last.1 > 0.0,
        "{last:?}: the soak did not exercise both ends"
    );
    let m = gw.metrics();
    eprintln!(
        "soak: {tracked} tracked, {} acked, {} undelivered, {} replayed, {} retransmits",
        last.0, last.1, m["longlink_replayed_pushes_total"], m["longlink_retransmits_total"]
    );
    assert!(m["longlink_replayed_pushes_total"] > 0.0);
}

#[test]
fn a_closing_connections_unacked_pushes_go_to_the_devices_other_connection_at_once() {
    // A long grace window and no retransmits in the test's time: only the handover can
    // deliver the pushes in time. At most 2 unacknowledged pushes per connection.
    let gw = Gateway::with_config(&config(
        "[limits]\nack_timeout_ms = 20000\nmax_unacked = 2\nreconnect_grace_ms = 30000\n",
    ));
    let (mut a, id_a) = gw.hello("two-conns", None);
    let (mut b, id_b) = gw.hello("two-conns", None);
    // b has one unacknowledged push of its own; a has two.
    gw.api("POST", &format!("/v1/push/conn/{id_b}?ack=1"), b"b0");
    let b0 = b.recv();
    for p in ["p1", "p2"] {
        gw.api("POST", &format!("/v1/push/conn/{id_a}?ack=1"), p.as_bytes());
    }
    assert_eq!(&a.recv().payload[..], b"p1");
    assert_eq!(&a.recv().payload[..], b"p2");
    drop(a); // gone with p1 and p2 unacknowledged; the device is still online on b
             // b has room for one more (max_unacked 2): p1 comes now, in order...
    let p1 = b
        .recv_within(Duration::from_secs(2))
        .expect("p1 handed over");
    assert_eq!(&p1.payload[..], b"p1");
    assert_eq!(
        b.try_recv(Duration::from_millis(300)),
        Ok(None),
        "more than max_unacked outstanding"
    );
    // ...and p2 as soon as an ACK makes room.
    b.send(&Frame::control(method::ACK, b0.seqid, &[]));
    let p2 = b.recv();
    assert_eq!(&p2.payload[..], b"p2");
    b.send(&Frame::control(method::ACK, p1.seqid, &[]));
    b.send(&Frame::control(method::ACK, p2.seqid, &[]));
    gw.wait_until("all acked", |g| {
        g.metric("longlink_acked_pushes_total") == 3.0
    });
    let m = gw.metrics();
    assert_eq!(
        (
            m["longlink_replayed_pushes_total"],
            m["longlink_undelivered_pushes_total"]
        ),
        (2.0, 0.0)
    );
    // Nothing is parked (a reconnect would replay nothing).
    let (mut c, _) = gw.hello("two-conns", None);
    assert!(c.drain_with_ping(5).is_empty());
}

#[test]
fn a_push_acknowledged_on_one_of_a_devices_connections_is_not_sent_again_by_another() {
    let gw = Gateway::with_config(&config(
        "[limits]\nack_timeout_ms = 20000\nreconnect_grace_ms = 30000\n",
    ));
    let (mut a, _) = gw.hello("phone", None); // the dying wifi connection
    let (mut b, _) = gw.hello("phone", None); // the new LTE one
                                              // A device push reaches both; the app waits for the outcome.
    let api = gw.api.clone();
    let waiting = std::thread::spawn(move || {
        api_call(
            &api,
            "POST",
            "/v1/push/device/demo/phone?ack=1&wait_ms=5000",
            b"once",
            &[],
        )
    });
    assert_eq!(&a.recv().payload[..], b"once");
    let copy = b.recv();
    assert_eq!(&copy.payload[..], b"once");
    // b ACKs: the device has it; a's copy is not needed any more, and the answer need not
    // wait for it.
    let start = Instant::now();
    b.send(&Frame::control(method::ACK, copy.seqid, &[]));
    let (_, v) = waiting.join().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        (
            &v["delivered"],
            &v["acked"],
            &v["undelivered"],
            &v["pending"]
        ),
        (
            &serde_json::json!(2),
            &serde_json::json!(1),
            &serde_json::json!(0),
            &serde_json::json!(0)
        ),
        "{v}"
    );
    // a goes without ACKing: b must not get the push a second time.
    drop(a);
    gw.wait_until("a gone", |g| {
        g.api("GET", "/v1/online/device/demo/phone", b"").1["connections"]
            .as_array()
            .map(Vec::len)
            == Some(1)
    });
    assert!(
        b.drain_with_ping(9).is_empty(),
        "the acknowledged push came again"
    );
    // Nor is anything left parked for the device's next connection.
    drop(b);
    let (mut c, _) = gw.hello("phone", None);
    assert!(c.drain_with_ping(10).is_empty(), "replayed after its ACK");
    let m = gw.metrics();
    assert_eq!(m["longlink_redundant_copies_total"], 1.0);
    assert_eq!(m["longlink_undelivered_pushes_total"], 0.0);
}

#[test]
fn a_replay_fits_the_new_connections_output_bound_and_its_unacked_limit() {
    // 40 parked pushes of 1 KiB are 40 KiB; the new connection may hold 16 KiB of output
    // and 24 unacknowledged pushes at a time: it gets them all, in order, as it reads and
    // ACKs, and is not closed as a slow consumer.
    let gw = Gateway::with_config(&config(
        "[limits]\nack_timeout_ms = 20000\nmax_unacked = 24\nmax_output_bytes = 16384\nreconnect_grace_ms = 30000\n",
    ));
    let payload = |i: usize| format!("{i:04}{}", "x".repeat(1020));
    let mut conns = vec![];
    for _ in 0..2 {
        conns.push(gw.hello("bulk", None));
    }
    // 20 per connection, each to one connection by id (read as they come, so no backlog).
    for (k, (c, id)) in conns.iter_mut().enumerate() {
        for j in 0..20 {
            let i = k * 20 + j;
            let (_, v) = gw.api(
                "POST",
                &format!("/v1/push/conn/{id}?ack=1"),
                payload(i).as_bytes(),
            );
            assert_eq!(v["delivered"], 1, "{v}");
            assert_eq!(c.recv().payload.len(), 1024);
        }
    }
    drop(conns); // both go, none ACKed: 40 parked, in push order
    gw.wait_until("all gone", |g| {
        g.api("GET", "/v1/online/device/demo/bulk", b"").1["online"] == false
    });
    let (mut c, _) = gw.hello("bulk", None);
    let mut got = vec![];
    while got.len() < 40 {
        let f = c
            .recv_within(Duration::from_secs(5))
            .expect("closed as a slow consumer");
        got.push(String::from_utf8_lossy(&f.payload[..4]).to_string());
        c.send(&Frame::control(method::ACK, f.seqid, &[]));
    }
    let want: Vec<String> = (0..40).map(|i| format!("{i:04}")).collect();
    assert_eq!(got, want);
    let m = gw.metrics();
    assert_eq!(
        m["longlink_connections_closed_total{reason=\"slow_consumer\"}"],
        0.0
    );
    // 40 to the new connection, plus what the first to close handed the other on its way.
    assert!(m["longlink_replayed_pushes_total"] >= 40.0);
    gw.wait_until("all acked", |g| {
        g.metric("longlink_acked_pushes_total") == 40.0
    });
    assert_eq!(gw.metric("longlink_undelivered_pushes_total"), 0.0);
}

#[test]
fn handed_over_pushes_keep_their_order_through_a_second_connection_and_without_grace() {
    let gw = Gateway::with_config(&config(
        "[limits]\nack_timeout_ms = 20000\nreconnect_grace_ms = 30000\n",
    ));
    let (mut a, id_a) = gw.hello("order", None);
    let (mut b, id_b) = gw.hello("order", None);
    gw.api("POST", &format!("/v1/push/conn/{id_a}?ack=1"), b"old");
    gw.api("POST", &format!("/v1/push/conn/{id_b}?ack=1"), b"new");
    assert_eq!(&a.recv().payload[..], b"old");
    assert_eq!(&b.recv().payload[..], b"new");
    drop(a); // "old" goes to b, after b's own newer one
    assert_eq!(&b.recv().payload[..], b"old");
    drop(b); // both wait for the device, in push order
    gw.wait_until("offline", |g| {
        g.api("GET", "/v1/online/device/demo/order", b"").1["online"] == false
    });
    let (mut c, _) = gw.hello("order", None);
    assert_eq!(&c.recv().payload[..], b"old");
    assert_eq!(&c.recv().payload[..], b"new");

    // With no grace window, a handover to a live connection still happens.
    let gw = Gateway::with_config(&config(
        "[limits]\nack_timeout_ms = 20000\nreconnect_grace_ms = 0\n",
    ));
    let (mut a, id_a) = gw.hello("nograce", None);
    let (mut b, _) = gw.hello("nograce", None);
    gw.api("POST", &format!("/v1/push/conn/{id_a}?ack=1"), b"keep");
    assert_eq!(&a.recv().payload[..], b"keep");
    drop(a);
    assert_eq!(
        &b.recv().payload[..],
        b"keep",
        "not handed over without a grace window"
    );
    assert_eq!(gw.metric("longlink_undelivered_pushes_total"), 0.0);
}

#[test]
fn a_push_two_connections_never_acknowledge_is_given_up_once() {
    // max_retries = 0: each copy gives up at its first ACK timeout. The device did not get
    // the push: that is one failure, reported once, not one per connection.
    let gw = Gateway::with_config(&config(
        "[limits]\nack_timeout_ms = 150\nmax_retries = 0\nreconnect_grace_ms = 30000\n",
    ));
    let (mut a, _) = gw.hello("deaf", None);
    let (mut b, _) = gw.hello("deaf", None);
    let (_, v) = gw.api(
        "POST",
        "/v1/push/device/demo/deaf?ack=1&wait_ms=3000",
        b"unheard",
    );
    assert_eq!(&a.recv().payload[..], b"unheard");
    assert_eq!(&b.recv().payload[..], b"unheard");
    assert_eq!(
        (
            &v["delivered"],
            &v["acked"],
            &v["undelivered"],
            &v["pending"]
        ),
        (
            &serde_json::json!(2),
            &serde_json::json!(0),
            &serde_json::json!(1),
            &serde_json::json!(0)
        ),
        "{v}"
    );
    let m = gw.metrics();
    assert_eq!(m["longlink_undelivered_pushes_total"], 1.0);
    assert_eq!(m["longlink_redundant_copies_total"], 1.0);
}
