//! `GET /v1/stats` (the JSON the admin page and scripts share) and `GET /admin` (the page,
//! in headless Chromium), against the real binary with an API token.

mod common;

use common::*;
use longlink::proto::method;

const TOKEN: &str = "s3cret-admin-token";

fn gateway() -> Gateway {
    let toml = config(&format!("[api]\ntoken = \"{TOKEN}\"\n"));
    Gateway::spawn(Some(&toml), &["--http", "127.0.0.1:0"])
}

fn authed(gw: &Gateway, method: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let bearer = format!("Bearer {TOKEN}");
    api_call(&gw.api, method, path, body, &[("Authorization", &bearer)])
}

/// `tcp` TCP clients and `ws` WebSocket clients of app demo, every device bound to room
/// `room`. The clients are returned to be kept open.
fn clients(gw: &Gateway, tcp: usize, ws: usize, room: &str) -> (Vec<Client>, Vec<Ws>) {
    let mut devices = vec![];
    let mut t = vec![];
    for i in 0..tcp {
        let mut c = gw.connect();
        let d = format!("tcp-{i}");
        c.hello("demo", &d, "demo-token", None);
        devices.push(d);
        t.push(c);
    }
    let mut w = vec![];
    for i in 0..ws {
        let d = format!("ws-{i}");
        let path = format!("/ws?app_id=demo&device_id={d}&token=demo-token");
        w.push(Ws::connect(&gw.http, &path, &[]).expect("upgrade"));
        devices.push(d);
    }
    let body = serde_json::json!({ "device_ids": devices }).to_string();
    let (s, _) = authed(
        gw,
        "POST",
        &format!("/v1/rooms/demo/{room}/members"),
        body.as_bytes(),
    );
    assert_eq!(s, 200);
    (t, w)
}

#[test]
fn stats_say_what_the_node_holds_and_need_the_token() {
    let gw = gateway();
    let (mut tcp, _ws) = clients(&gw, 3, 2, "lobby");
    let (s, _) = api_call(&gw.api, "GET", "/v1/stats", b"", &[]);
    assert_eq!(s, 401, "no token");
    let wrong = [("Authorization", "Bearer s3cret-admin-tokem")];
    assert_eq!(api_call(&gw.api, "GET", "/v1/stats", b"", &wrong).0, 401);
    // ?token= is for the page alone, not the API.
    let q = format!("/v1/stats?token={TOKEN}");
    assert_eq!(api_call(&gw.api, "GET", &q, b"", &[]).0, 401);
    // The page holds no data (it reads /v1/stats with the token): served to anyone, with
    // headers that keep it from caches, referrers and frames.
    let raw = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&gw.api).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let page = raw("/admin");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("<title>longlink admin</title>"));
    let head = &page[..page.find("\r\n\r\n").unwrap()];
    for h in [
        "Cache-Control: no-store",
        "Referrer-Policy: no-referrer",
        "Content-Security-Policy: default-src 'none';",
        "frame-ancestors 'none'",
    ] {
        assert!(head.contains(h), "no {h} in {head}");
    }
    let (s, v) = authed(&gw, "GET", "/v1/stats", b"");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["node_id"], "n1");
    assert_eq!(v["connections"]["tcp"], 3);
    assert_eq!(v["connections"]["ws"], 2);
    assert_eq!(v["connections"]["long_poll"], 0);
    assert_eq!(v["apps"]["demo"], 5);
    let top = &v["rooms"][0];
    assert_eq!(
        (&top["app"], &top["room"], &top["members"], &top["online"]),
        (
            &serde_json::json!("demo"),
            &serde_json::json!("lobby"),
            &serde_json::json!(5),
            &serde_json::json!(5)
        ),
        "{v}"
    );
    assert!(v["uptime_ms"].as_u64().is_some() && v["unix_ms"].as_u64().unwrap() > 0);
    // The API's requests run on the workers: the first /v1/stats was one.
    let (_, v) = authed(&gw, "GET", "/v1/stats", b"");
    let p50 = v["workers"]["p50_ms"]
        .as_f64()
        .expect("a worker p50 after API calls");
    assert!(
        p50 > 0.0 && p50 <= v["workers"]["p99_ms"].as_f64().unwrap(),
        "{v}"
    );
    // The buckets behind it, for windows of the caller's choosing: one per bound and one
    // past the last, adding up to the jobs counted; a later read has at least as many.
    let bounds = v["latency_buckets_ms"].as_array().unwrap();
    let counts = |v: &serde_json::Value| -> Vec<u64> {
        let b = v["workers"]["buckets"].as_array().unwrap();
        b.iter().map(|c| c.as_u64().unwrap()).collect()
    };
    let first = counts(&v);
    assert_eq!(first.len(), bounds.len() + 1);
    assert!(bounds[0].as_f64().unwrap() > 0.0);
    assert!(first.iter().sum::<u64>() >= 1, "{v}");
    let (_, later) = authed(&gw, "GET", "/v1/stats", b"");
    let second = counts(&later);
    assert!(first.iter().zip(&second).all(|(a, b)| a <= b));
    assert!(
        second.iter().sum::<u64>() > first.iter().sum::<u64>(),
        "{later}"
    );
    assert!(v["memory"]["resident"].as_u64().unwrap() > 1 << 20);
    assert_eq!(v["cluster_enabled"], false);
    assert!(
        v.get("cluster").is_none(),
        "no cluster section on a single node"
    );
    // Counters move with what happens: a push to a device, one to a device not here.
    let before = v["pushes"]["delivered"].as_u64().unwrap();
    let (s, _) = authed(&gw, "POST", "/v1/push/device/demo/tcp-0", b"hi");
    assert_eq!(s, 200);
    let (s, _) = authed(&gw, "POST", "/v1/push/device/demo/nobody", b"hi");
    assert_eq!(s, 200);
    assert_eq!(tcp[0].recv().method, method::PUSH);
    let (_, v) = authed(&gw, "GET", "/v1/stats", b"");
    assert_eq!(v["pushes"]["delivered"].as_u64().unwrap(), before + 1);
    assert_eq!(v["pushes"]["offline"].as_u64().unwrap(), 1);
    // A connection leaves: counted at once, and by its reason.
    drop(tcp.pop());
    gw.wait_until("the closed client counted", |g| {
        authed(g, "GET", "/v1/stats", b"").1["connections"]["tcp"] == 2
    });
    let (_, v) = authed(&gw, "GET", "/v1/stats", b"");
    assert_eq!(v["closed"]["peer"], 1, "{v}");
    assert_eq!(v["rooms"][0]["online"], 4);
}

#[test]
fn the_admin_page_in_chromium_shows_the_live_counts() {
    let gw = gateway();
    let (_tcp, _ws) = clients(&gw, 4, 3, "admin-room");
    // Kept as a CI artifact (target/artifacts/admin.png).
    let shot = concat!(env!("CARGO_MANIFEST_DIR"), "/target/artifacts/admin.png");
    let _ = std::fs::remove_file(shot);
    let so = run_client(
        "node",
        "admin.mjs",
        &gw,
        &[
            "--token",
            TOKEN,
            "--timeout",
            "60",
            "--tcp",
            "4",
            "--ws",
            "3",
            "--room",
            "admin-room",
            "--shot",
            shot,
        ],
    );
    assert!(so.contains("2 passed, 0 failed"), "{so}");
    let png = std::fs::read(shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        png.len()
    );
}
