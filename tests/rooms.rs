//! Rooms (session binding, docs/PROTOCOL.md "Rooms"): members bound by device, a room push reaching
//! exactly the members' connections, presence, against the real binary.

mod common;

use common::*;
use serde_json::json;

fn members(gw: &Gateway, method: &str, room: &str, ids: &[&str]) -> serde_json::Value {
    let body = json!({ "device_ids": ids }).to_string();
    let (st, v) = gw.api(
        method,
        &format!("/v1/rooms/demo/{room}/members"),
        body.as_bytes(),
    );
    assert_eq!(st, 200, "{v}");
    v
}

#[test]
fn a_room_push_reaches_exactly_its_members_connections() {
    let gw = gateway_http(None);
    // m1 online before binding; m2 on TCP and WebSocket; m3 connects after binding; x is no member.
    let (mut m1, _) = gw.hello("m1", None);
    let (mut m2_tcp, _) = gw.hello("m2", None);
    let mut m2_ws = Ws::connect(&gw.http, "/ws?app_id=demo&device_id=m2&token=x", &[]).unwrap();
    let (mut x, _) = gw.hello("x", None);
    let v = members(&gw, "POST", "live", &["m1", "m2", "m3"]);
    assert_eq!(
        (v["added"].as_u64(), v["members"].as_u64()),
        (Some(3), Some(3))
    );
    let (mut m3, _) = gw.hello("m3", None);

    let (st, v) = gw.api(
        "POST",
        "/v1/push/room/demo/live?payload_type=text",
        b"to the room",
    );
    assert_eq!((st, &v["delivered"]), (200, &json!(4)), "{v}");
    for c in [&mut m1, &mut m2_tcp, &mut m3] {
        assert_eq!(&c.recv().payload[..], b"to the room");
    }
    assert_eq!(m2_ws.recv().text(), "to the room");
    assert!(
        x.drain_with_ping(1).is_empty(),
        "a non-member got the room push"
    );

    // Presence.
    let (_, v) = gw.api("GET", "/v1/rooms/demo/live", b"");
    assert_eq!(
        v,
        json!({"room": "live", "members": ["m1", "m2", "m3"], "member_count": 3, "online": 4, "next": null})
    );

    // Leaving stops delivery; a disconnect leaves the online count.
    let v = members(&gw, "DELETE", "live", &["m1"]);
    assert_eq!(
        (v["removed"].as_u64(), v["members"].as_u64()),
        (Some(1), Some(2))
    );
    drop(m3);
    gw.wait_until("m3 gone", |g| {
        g.api("GET", "/v1/rooms/demo/live", b"").1["online"] == 2
    });
    let (_, v) = gw.api(
        "POST",
        "/v1/push/room/demo/live?payload_type=text",
        b"second",
    );
    assert_eq!(v["delivered"], 2);
    assert_eq!(&m2_tcp.recv().payload[..], b"second");
    assert_eq!(m2_ws.recv().text(), "second");
    assert!(
        m1.drain_with_ping(2).is_empty(),
        "a member who left still gets room pushes"
    );

    // In a batch too; a room with nobody online is reported offline.
    let batch = json!([{"to": "room", "app": "demo", "room": "live", "payload": "b"}, {"to": "room", "app": "demo", "room": "empty", "payload": "b"}]);
    let (st, v) = gw.api("POST", "/v1/push/batch", batch.to_string().as_bytes());
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (
            v["results"][0]["delivered"].as_u64(),
            &v["results"][1]["offline"]
        ),
        (Some(2), &json!(["empty"]))
    );
    assert_eq!(&m2_tcp.recv().payload[..], b"b");
}

#[test]
fn a_device_in_many_rooms_and_bad_room_input() {
    let gw = Gateway::dev();
    let (mut d, _) = gw.hello("multi", None);
    for r in ["r1", "r2", "r3"] {
        members(&gw, "POST", r, &["multi"]);
    }
    for r in ["r1", "r2", "r3"] {
        let (_, v) = gw.api("POST", &format!("/v1/push/room/demo/{r}"), r.as_bytes());
        assert_eq!(v["delivered"], 1);
        assert_eq!(&d.recv().payload[..], r.as_bytes());
    }
    let cases: &[(&str, &str, &[u8], u16)] = &[
        (
            "POST",
            "/v1/rooms/nope/r1/members",
            br#"{"device_ids":["a"]}"#,
            404,
        ),
        ("POST", "/v1/rooms/demo/r1/members", b"not json", 400),
        (
            "POST",
            "/v1/rooms/demo/r1/members",
            br#"{"device_ids":[]}"#,
            400,
        ),
        (
            "POST",
            "/v1/rooms/demo/r1/members",
            br#"{"devices":["a"]}"#,
            400,
        ),
        (
            "PUT",
            "/v1/rooms/demo/r1/members",
            br#"{"device_ids":["a"]}"#,
            405,
        ),
        ("POST", "/v1/rooms/demo/r1", b"", 405),
        ("POST", "/v1/push/room/nope/r1", b"x", 404),
    ];
    for (m, path, body, want) in cases {
        let (st, v) = gw.api(m, path, body);
        assert_eq!(st, *want, "{m} {path}: {v}");
        assert!(v["error"].is_string(), "{m} {path}: {v}");
    }
    let (_, v) = gw.api("GET", "/v1/rooms/demo/r1", b"");
    assert_eq!(v["member_count"], 1, "nothing half-applied: {v}");
}

#[test]
fn a_large_room_is_listed_in_pages() {
    let gw = Gateway::dev();
    // 12,000 members with 100-byte ids: one page of 10,000 is a 1 MB+ answer, more than a
    // client connection's output bound (which does not apply to API answers).
    let ids: Vec<String> = (0..12_000).map(|i| format!("{i:0>100}")).collect();
    for chunk in ids.chunks(6_000) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        members(&gw, "POST", "big", &refs);
    }
    let mut seen: Vec<String> = vec![];
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let q = if after.is_empty() {
            "limit=10000".to_string()
        } else {
            format!("limit=10000&after={after}")
        };
        let (st, v) = gw.api("GET", &format!("/v1/rooms/demo/big?{q}"), b"");
        assert_eq!(st, 200);
        assert_eq!(v["member_count"], 12_000);
        pages += 1;
        seen.extend(
            v["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap().to_string()),
        );
        match v["next"].as_str() {
            Some(n) => after = n.to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 2);
    assert_eq!(seen, ids, "every member once, in id order");
    // The default page is 1,000.
    let (_, v) = gw.api("GET", "/v1/rooms/demo/big", b"");
    assert_eq!(v["members"].as_array().unwrap().len(), 1_000);
    assert_eq!(v["next"].as_str(), Some(ids[999].as_str()));
    let (st, _) = gw.api("GET", "/v1/rooms/demo/big?limit=10001", b"");
    assert_eq!(st, 400);
}
