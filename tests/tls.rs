//! TLS on the TCP transport and the client HTTP listener, against the real binary, with
//! rustls as the client (Python `ssl` + `websockets` for wss://: tests/clients.rs): HELLO,
//! pushes and pings over TLS; clear text and stalled handshakes refused cleanly while a
//! bystander goes on; at a live upgrade TLS clients are told to reconnect, and the new
//! process serves the certificate it re-read.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use longlink::codec;
use longlink::proto::{method, Frame};
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

fn key_file(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS client trusting the test CA, connected (handshake done) to `addr` as `localhost`.
fn tls_connect(addr: &str) -> Tls {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(tls_files().2).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(T)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s
}

fn send(s: &mut Tls, f: &Frame) {
    let mut b = vec![];
    codec::encode_tcp(f, &mut b).unwrap();
    s.write_all(&b).unwrap();
    s.flush().unwrap();
}

/// The next frame, or None at the end of the stream.
fn recv(s: &mut Tls, buf: &mut Vec<u8>) -> Option<Frame> {
    loop {
        if let Some((body, used)) = codec::decode_tcp(buf, 65535).unwrap() {
            let f = Frame::decode(body).unwrap();
            buf.drain(..used);
            return Some(f);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("TLS read: {e}"),
        }
    }
}

fn hello(s: &mut Tls, device: &str) -> String {
    let h = Frame::control(
        method::HELLO,
        1,
        &[
            ("app_id", "demo"),
            ("device_id", device),
            ("token", "demo-token"),
        ],
    );
    send(s, &h);
    let r = recv(s, &mut vec![]).expect("HELLO answer");
    assert_eq!((r.method, r.seqid), (method::HELLO, 1), "{r:?}");
    r.header("conn_id").unwrap().to_string()
}

fn tls_gateway(toml: &str) -> Gateway {
    Gateway::spawn_tls(Some(&config(toml)), &[])
}

/// Whether the server closes a plain connection within `T` (EOF or reset; a TLS alert
/// first is fine). Returns the bytes it sent before closing.
fn closed_by_server(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(T)).unwrap();
    let mut got = vec![];
    let mut b = [0u8; 512];
    loop {
        match s.read(&mut b) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("not closed: {e}"),
        }
    }
}

#[test]
fn the_tcp_transport_over_tls_carries_hello_pushes_and_pings() {
    let g = tls_gateway("[limits]\nhandshake_timeout_ms = 600\n");
    let tt = g.addr("tcp_tls");
    let mut c = tls_connect(&tt);
    let id = hello(&mut c, "t1");
    assert!(id.starts_with("n1:"));
    let (st, v) = g.api("POST", "/v1/push/device/demo/t1", b"over tls");
    assert_eq!((st, &v["delivered"]), (200, &serde_json::json!(1)), "{v}");
    let mut buf = vec![];
    let p = recv(&mut c, &mut buf).unwrap();
    assert_eq!((p.method, &p.payload[..]), (method::PUSH, &b"over tls"[..]));
    // A push bigger than a TLS record (16 KiB), by conn id.
    let big = vec![b'z'; 50_000];
    let (_, v) = g.api("POST", &format!("/v1/push/conn/{id}"), &big);
    assert_eq!(v["delivered"], 1, "{v}");
    assert_eq!(recv(&mut c, &mut buf).unwrap().payload.len(), big.len());
    send(&mut c, &Frame::control(method::PING, 7, &[]));
    let pong = recv(&mut c, &mut buf).unwrap();
    assert_eq!((pong.method, pong.seqid), (method::PONG, 7));
    // The clear TCP listener is unaffected, and /v1/online sees both transports' devices.
    let (_clear, _) = g.hello("plain", None);
    let m = g.metrics();
    assert_eq!(m["longlink_connections{transport=\"tcp\"}"], 2.0);
}

#[test]
fn clear_text_and_stalled_handshakes_are_refused_cleanly_while_others_go_on() {
    let g = tls_gateway("[limits]\nhandshake_timeout_ms = 600\n");
    let (tt, https) = (g.addr("tcp_tls"), g.addr("https"));
    let mut bystander = tls_connect(&tt);
    hello(&mut bystander, "calm");
    // A TCP client speaking clear text (a HELLO frame) to the TLS port: an alert, then the
    // end; a browser-style clear HTTP request to the https port: the same.
    let mut plain = TcpStream::connect(&tt).unwrap();
    let mut b = vec![];
    let h = Frame::control(method::HELLO, 1, &[("app_id", "demo"), ("device_id", "x")]);
    codec::encode_tcp(&h, &mut b).unwrap();
    plain.write_all(&b).unwrap();
    let got = closed_by_server(plain);
    assert!(
        got.is_empty() || got[0] == 0x15,
        "an alert record or nothing: {got:?}"
    );
    let mut plain = TcpStream::connect(&https).unwrap();
    plain
        .write_all(b"GET /ws?app_id=demo&device_id=y&token=t HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    closed_by_server(plain);
    g.wait_until("both counted", |g| {
        g.metric("longlink_tls_errors_total") == 2.0
    });
    // Half a ClientHello, then silence: closed at the handshake timeout.
    let mut half = TcpStream::connect(&tt).unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let t0 = Instant::now();
    closed_by_server(half);
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        g.metric("longlink_connections_closed_total{reason=\"handshake_timeout\"}"),
        1.0
    );
    // The bystander noticed nothing.
    send(&mut bystander, &Frame::control(method::PING, 3, &[]));
    let pong = recv(&mut bystander, &mut vec![]).unwrap();
    assert_eq!((pong.method, pong.seqid), (method::PONG, 3));
}

#[test]
fn at_an_upgrade_tls_clients_reconnect_to_the_new_process_and_its_reread_certificate() {
    // Certificates named by the config file, relative to it.
    let toml =
        "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n[listen]\ntcp_tls = \"127.0.0.1:0\"\n";
    let dir = temp_dir("tls-upgrade");
    let cfg = dir.0.join("longlink.toml");
    std::fs::write(&cfg, config(toml)).unwrap();
    std::fs::copy(key_file("tls_cert.pem"), dir.0.join("cert.pem")).unwrap();
    std::fs::copy(key_file("tls_key.pem"), dir.0.join("key.pem")).unwrap();
    let cfg_arg = cfg.display().to_string();
    let mut g = Gateway::spawn(None, &["--config", &cfg_arg]);
    let tt = g.addr("tcp_tls");
    let served = |s: &Tls| s.conn.peer_certificates().unwrap()[0].to_vec();
    let first = CertificateDer::from_pem_file(key_file("tls_cert.pem")).unwrap();
    let second = CertificateDer::from_pem_file(key_file("tls_cert2.pem")).unwrap();
    let mut c = tls_connect(&tt);
    assert_eq!(served(&c), first.to_vec());
    hello(&mut c, "moving");
    // A clear TCP client crosses the upgrade as always.
    let (mut clear, clear_id) = g.hello("stays", None);
    // A renewed certificate is installed; `systemctl reload`.
    std::fs::copy(key_file("tls_cert2.pem"), dir.0.join("cert.pem")).unwrap();
    let line = g.upgrade();
    assert_eq!(line["tcp_tls"], tt.as_str(), "the same TLS address");
    // The TLS client is told to come back (REDIRECT, reason restart), then closed.
    let mut buf = vec![];
    let r = recv(&mut c, &mut buf).expect("a REDIRECT before the close");
    assert_eq!(
        (r.method, r.header("reason")),
        (method::REDIRECT, Some("restart"))
    );
    assert!(recv(&mut c, &mut buf).is_none());
    // It comes back to the same address: the new process, with the new certificate.
    let mut again = tls_connect(&tt);
    assert_eq!(served(&again), second.to_vec());
    hello(&mut again, "moving");
    let (_, v) = g.api("POST", "/v1/push/device/demo/moving", b"found");
    assert_eq!(v["delivered"], 1, "{v}");
    assert_eq!(&recv(&mut again, &mut buf).unwrap().payload[..], b"found");
    let (_, v) = g.api("POST", &format!("/v1/push/conn/{clear_id}"), b"still");
    assert_eq!(v["delivered"], 1, "{v}");
    assert_eq!(&clear.recv().payload[..], b"still");
}

#[test]
fn a_burst_of_handshakes_is_spread_over_turns_and_all_complete() {
    // More handshakes at once than steps may be on the workers (two per worker): the rest
    // wait their turn, oldest first, and every one completes with a HELLO answered.
    let g = tls_gateway("");
    let tt = g.addr("tcp_tls");
    let clients: Vec<_> = (0..80)
        .map(|i| {
            let tt = tt.clone();
            std::thread::spawn(move || {
                let mut c = tls_connect(&tt);
                hello(&mut c, &format!("burst-{i}"));
                c
            })
        })
        .collect();
    // Meanwhile the API is answered: handshake steps take at most two worker-queue slots
    // per worker, never the queue API requests and auth share.
    for _ in 0..20 {
        let (st, v) = g.api("POST", "/v1/push/device/demo/nobody", b"x");
        assert_eq!(st, 200, "{v}");
    }
    let held: Vec<Tls> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(held.len(), 80);
    let m = g.metrics();
    assert_eq!(m["longlink_connections{transport=\"tcp\"}"], 80.0);
    assert_eq!(m["longlink_tls_errors_total"], 0.0);
    assert_eq!(m["longlink_worker_busy_total"], 0.0);
}

#[test]
fn a_drain_never_sends_a_tls_client_to_a_clear_endpoint() {
    let toml = "[drain]\nredirect_tcp = \"10.0.0.9:7100\"\nredirect_tcp_tls = \"10.0.0.9:7443\"\nrate = 100\n";
    let g = tls_gateway(toml);
    let mut secure = tls_connect(&g.addr("tcp_tls"));
    hello(&mut secure, "secure");
    let (mut clear, _) = g.hello("clear", None);
    let (st, _) = g.api("POST", "/v1/drain", b"");
    assert_eq!(st, 200);
    let r = recv(&mut secure, &mut vec![]).expect("a REDIRECT");
    assert_eq!(
        (r.method, r.header("endpoint")),
        (method::REDIRECT, Some("10.0.0.9:7443"))
    );
    let r = clear.recv();
    assert_eq!(
        (r.method, r.header("endpoint")),
        (method::REDIRECT, Some("10.0.0.9:7100"))
    );
    // With no TLS endpoint configured, a TLS client gets none (its usual address), never
    // the clear one.
    let g = tls_gateway("[drain]\nredirect_tcp = \"10.0.0.9:7100\"\nrate = 100\n");
    let mut secure = tls_connect(&g.addr("tcp_tls"));
    hello(&mut secure, "secure");
    g.api("POST", "/v1/drain", b"");
    let r = recv(&mut secure, &mut vec![]).expect("a REDIRECT");
    assert_eq!((r.method, r.header("endpoint")), (method::REDIRECT, None));
}

#[test]
fn a_tls_client_over_a_limit_is_closed_before_any_handshake_crypto() {
    let g = tls_gateway("[limits]\nmax_connections_per_ip = 2\n");
    let tt = g.addr("tcp_tls");
    let mut a = tls_connect(&tt);
    hello(&mut a, "a");
    let mut b = tls_connect(&tt);
    hello(&mut b, "b");
    // The third from this address: closed at accept, its ClientHello never answered.
    let mut third = TcpStream::connect(&tt).unwrap();
    third
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00])
        .unwrap();
    let got = closed_by_server(third);
    assert!(got.is_empty(), "no handshake answer: {got:?}");
    g.wait_until("the refusal counted", |g| {
        g.metric("longlink_admission_refused_total{reason=\"per_ip\"}") == 1.0
    });
    assert_eq!(g.metric("longlink_tls_errors_total"), 0.0);
    // The admitted ones go on.
    send(&mut a, &Frame::control(method::PING, 5, &[]));
    assert_eq!(recv(&mut a, &mut vec![]).unwrap().method, method::PONG);
}

#[test]
fn a_tls_client_that_stops_reading_gets_everything_once_it_reads_again() {
    // More than the socket buffers hold: the gateway's writes block, rustls keeps what it
    // encrypted until the socket takes it (writability), the rest waits in the output.
    let g = tls_gateway("[limits]\nmax_output_bytes = 33554432\n");
    let mut c = tls_connect(&g.addr("tcp_tls"));
    let id = hello(&mut c, "sleepy");
    let n = 240;
    for i in 0..n {
        let mut body = format!("{i:05}").into_bytes();
        body.resize(50_000, b'.');
        let (_, v) = g.api("POST", &format!("/v1/push/conn/{id}"), &body);
        assert_eq!(v["delivered"], 1, "{v}");
    }
    // 12 MB queued; now read it all, in order.
    let mut buf = vec![];
    for i in 0..n {
        let p = recv(&mut c, &mut buf).expect("every push");
        assert_eq!(&p.payload[..5], format!("{i:05}").as_bytes());
        assert_eq!(p.payload.len(), 50_000);
    }
}
