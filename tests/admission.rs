//! Admission limits (issue 14): per source address (connections, connect rate), per app,
//! per node, and per connection (messages a second). Each offender is refused in its
//! transport's words and counted; everyone else goes on. Real binary, real sockets from
//! several 127.0.0.x addresses.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use longlink::proto::{method, Frame};

fn toml(limits: &str, app: &str) -> String {
    format!(
        "node_id = \"n1\"\n[limits]\n{limits}\n[[apps]]\nid = \"demo\"\ntokens = [\"demo-token\"]\n{app}\n[[apps]]\nid = \"other\"\ntokens = [\"o-token\"]\n"
    )
}

/// A TCP connection from `source` (a loopback address of its own).
fn from(source: &str, addr: &str) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{source}:0").parse().unwrap();
    s.bind(&src.into()).unwrap();
    let to: SocketAddr = addr.parse().unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// HELLO from `source`: Ok(conn id), or Err(the ERROR frame's code) once the gateway closed.
fn hello_from(
    g: &Gateway,
    source: &str,
    app: &str,
    device: &str,
) -> Result<(Client, String), String> {
    let mut c = Client::on(from(source, &g.tcp));
    let token = if app == "demo" {
        "demo-token"
    } else {
        "o-token"
    };
    c.send(&Frame::control(
        method::HELLO,
        1,
        &[("app_id", app), ("device_id", device), ("token", token)],
    ));
    let f = c.recv_within(T).ok_or("closed with no answer")?;
    if f.method == method::HELLO {
        return Ok((c, f.header("conn_id").unwrap().to_string()));
    }
    assert_eq!(f.method, method::ERROR, "{f:?}");
    assert!(c.recv_within(T).is_none(), "closed after the ERROR");
    Err(f.header("code").unwrap_or("").to_string())
}

#[test]
fn an_address_is_held_to_its_connections_and_others_are_not() {
    let g = Gateway::spawn(
        Some(&toml("max_connections_per_ip = 2", "")),
        &["--http", "127.0.0.1:0"],
    );
    let (_a, _) = hello_from(&g, "127.0.0.2", "demo", "a").unwrap();
    let (mut b, _) = hello_from(&g, "127.0.0.2", "demo", "b").unwrap();
    // The third from that address: ERROR 429, closed — at accept, before any HELLO.
    assert_eq!(
        hello_from(&g, "127.0.0.2", "demo", "c").err().as_deref(),
        Some("429")
    );
    // On the HTTP listener too (a WebSocket upgrade or a long-poll): 429 before anything.
    let ws = Ws::upgrade(
        from("127.0.0.2", &g.http),
        &g.http,
        "/ws?app_id=demo&device_id=w&token=demo-token",
        &[],
    );
    let (st, text) = ws.err().unwrap();
    assert_eq!(st, 429);
    // (With cors_origins = ["*"], the default, a page may read why.)
    assert!(
        text.contains("Access-Control-Allow-Origin: *\r\n"),
        "{text}"
    );
    // Another address is not affected, nor are the two already in.
    let (_c, _) = hello_from(&g, "127.0.0.3", "demo", "c").unwrap();
    assert!(b.drain_with_ping(1).is_empty());
    assert_eq!(
        g.metric("longlink_admission_refused_total{reason=\"per_ip\"}"),
        2.0
    );
    // One goes: room for one more.
    drop(_a);
    g.wait_until("the address's count went down", |g| {
        g.metric("longlink_connections{transport=\"tcp\"}") == 2.0
    });
    hello_from(&g, "127.0.0.2", "demo", "d").unwrap();
}

#[test]
fn an_address_connecting_too_fast_is_refused_then_let_in_again() {
    let g = Gateway::spawn(
        Some(&toml(
            "connect_rate_per_ip = 1\nconnect_burst_per_ip = 3",
            "",
        )),
        &[],
    );
    let mut held = vec![];
    for i in 0..3 {
        held.push(hello_from(&g, "127.0.0.4", "demo", &format!("r{i}")).unwrap());
    }
    assert_eq!(
        hello_from(&g, "127.0.0.4", "demo", "r3").err().as_deref(),
        Some("429")
    );
    hello_from(&g, "127.0.0.5", "demo", "elsewhere").unwrap();
    assert_eq!(
        g.metric("longlink_admission_refused_total{reason=\"ip_rate\"}"),
        1.0
    );
    // One a second: a token within a second.
    std::thread::sleep(Duration::from_millis(1100));
    hello_from(&g, "127.0.0.4", "demo", "r4").unwrap();
}

#[test]
fn an_app_and_the_node_are_held_to_their_max_connections() {
    let g = Gateway::spawn(
        Some(&toml("max_connections = 4", "max_connections = 2")),
        &["--http", "127.0.0.1:0"],
    );
    let (_a, _) = g.hello("a", None);
    let (_b, _) = g.hello("b", None);
    // The app is full: ERROR 503 at its HELLO; a WebSocket gets 503 before the upgrade.
    assert_eq!(
        hello_from(&g, "127.0.0.1", "demo", "c").err().as_deref(),
        Some("503")
    );
    let ws = Ws::connect(&g.http, "/ws?app_id=demo&device_id=w&token=demo-token", &[]);
    assert_eq!(ws.err().map(|e| e.0), Some(503));
    assert_eq!(
        g.metric("longlink_admission_refused_total{reason=\"app\"}"),
        2.0
    );
    // Another app is not.
    let (_o1, _) = hello_from(&g, "127.0.0.1", "other", "o1").unwrap();
    let (_o2, _) = hello_from(&g, "127.0.0.1", "other", "o2").unwrap();
    // The node is full (4): ERROR 503 at accept.
    assert_eq!(
        hello_from(&g, "127.0.0.1", "other", "o3").err().as_deref(),
        Some("503")
    );
    assert_eq!(
        g.metric("longlink_admission_refused_total{reason=\"node\"}"),
        1.0
    );
}

#[test]
fn a_connection_over_its_message_rate_is_closed_and_a_bystander_is_not() {
    let g = Gateway::spawn(
        Some(&toml("max_messages_per_s = 20\nmessage_burst = 40", "")),
        &["--http", "127.0.0.1:0"],
    );
    let (mut calm, _) = g.hello("calm", None);
    let (mut flood, _) = g.hello("flood", None);
    // A burst within the bucket is fine.
    for i in 0..30 {
        flood.send(&Frame::control(method::PING, 1000 + i, &[]));
    }
    for _ in 0..30 {
        assert_eq!(flood.recv().method, method::PONG);
    }
    // Sustained: closed with ERROR 429 and a reason.
    let mut wire = vec![];
    for i in 0..200 {
        longlink::codec::encode_tcp(&Frame::control(method::PING, 2000 + i, &[]), &mut wire)
            .unwrap();
    }
    flood.send_raw(&wire);
    let frames = flood.frames_until_eof(T);
    let err = frames
        .iter()
        .find(|f| f.method == method::ERROR)
        .expect("an ERROR");
    assert_eq!(err.header("code"), Some("429"));
    // WebSocket: close 1008.
    let mut w = Ws::connect(
        &g.http,
        "/ws?app_id=demo&device_id=wflood&token=demo-token",
        &[],
    )
    .unwrap();
    for _ in 0..200 {
        w.text("x");
    }
    let close = loop {
        let m = w.recv();
        if m.opcode == 8 {
            break m;
        }
    };
    assert_eq!(close.close().0, 1008);
    // The calm one pinging at its pace is untouched.
    for i in 0..5 {
        assert!(calm.drain_with_ping(i).is_empty());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        g.metric("longlink_connections_closed_total{reason=\"rate_limited\"}"),
        2.0
    );
}
