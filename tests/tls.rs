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
    tls_connect_with(addr, rustls::DEFAULT_VERSIONS)
}

/// The same, speaking only the given TLS versions.
fn tls_connect_with(addr: &str, versions: &[&'static rustls::SupportedProtocolVersion]) -> Tls {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(T)).unwrap();
    let mut s = rustls::StreamOwned::new(client(versions), tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s
}

/// A client connection (not yet connected) trusting the test CA, for `localhost`.
fn client(versions: &[&'static rustls::SupportedProtocolVersion]) -> rustls::ClientConnection {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(tls_files().2).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // (The tests read the client's record counters at the end: did the server update?)
    cfg.enable_secret_extraction = true;
    let name = ServerName::try_from("localhost").unwrap();
    rustls::ClientConnection::new(Arc::new(cfg), name).unwrap()
}

/// Pushes `n` numbered 50 KB payloads to connection `id` (more than socket buffers hold).
fn push_numbered(g: &Gateway, id: &str, n: usize) {
    for i in 0..n {
        let mut body = format!("{i:05}").into_bytes();
        body.resize(50_000, b'.');
        let (_, v) = g.api("POST", &format!("/v1/push/conn/{id}"), &body);
        assert_eq!(v["delivered"], 1, "{v}");
    }
}

/// Reads the `n` pushes of `push_numbered`, in order.
fn read_numbered(c: &mut Tls, buf: &mut Vec<u8>, n: usize) {
    for i in 0..n {
        let p = recv(c, buf).expect("every push");
        assert_eq!(&p.payload[..5], format!("{i:05}").as_bytes());
        assert_eq!(p.payload.len(), 50_000);
    }
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

/// Reads to the end: true for a clean one (the server's close_notify came first), false
/// for a bare EOF (rustls says UnexpectedEof: a truncation, to a client that checks).
fn ends_with_close_notify(s: &mut Tls) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return false,
            Err(e) => panic!("TLS read: {e}"),
        }
    }
}

#[test]
fn the_server_sends_close_notify_when_the_client_closes_first_or_goes_silent() {
    let g = tls_gateway("[limits]\nread_timeout_ms = 400\n");
    let tt = g.addr("tcp_tls");
    let versions: [&[&'static rustls::SupportedProtocolVersion]; 2] =
        [&[&rustls::version::TLS13], &[&rustls::version::TLS12]];
    for v in versions {
        // The client's close_notify, nothing owed to it: ours comes back before the close.
        let mut c = tls_connect_with(&tt, v);
        hello(&mut c, "cn");
        c.conn.send_close_notify();
        c.flush().unwrap();
        assert!(ends_with_close_notify(&mut c), "{v:?}: bare EOF after ours");
        // Silent past the read timeout: closed by the server, cleanly.
        let mut c = tls_connect_with(&tt, v);
        hello(&mut c, "quiet");
        assert!(
            ends_with_close_notify(&mut c),
            "{v:?}: bare EOF at the timeout"
        );
    }
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

/// Updates the client's keys (asking the server to update its own), then a PING: its
/// PONG comes back under the server's new keys.
fn key_update_then_ping(c: &mut Tls, seqid: u64) {
    c.conn.refresh_traffic_keys().unwrap();
    send(c, &Frame::control(method::PING, seqid, &[]));
    let r = recv(c, &mut vec![]).expect("PONG");
    assert_eq!((r.method, r.seqid), (method::PONG, seqid), "{r:?}");
}

#[test]
fn tls_13_connections_cross_live_upgrades_with_key_updates_and_tls_12_ones_reconnect() {
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
    assert_eq!(
        c.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(served(&c), first.to_vec());
    let conn_id = hello(&mut c, "moving");
    key_update_then_ping(&mut c, 2);
    let mut old = tls_connect_with(&tt, &[&rustls::version::TLS12]);
    hello(&mut old, "old");
    // A clear TCP client crosses the upgrade as always.
    let (mut clear, clear_id) = g.hello("stays", None);
    // A renewed certificate is installed; `systemctl reload`.
    std::fs::copy(key_file("tls_cert2.pem"), dir.0.join("cert.pem")).unwrap();
    let line = g.upgrade();
    assert_eq!(line["tcp_tls"], tt.as_str(), "the same TLS address");
    let mut buf = vec![];
    // The TLS 1.3 connection is the new process's now: same connection, same id, keys and
    // counters carried on, pushes and key updates both ways.
    let (_, v) = g.api("POST", &format!("/v1/push/conn/{conn_id}"), b"crossed");
    assert_eq!(v["delivered"], 1, "{v}");
    assert_eq!(&recv(&mut c, &mut buf).unwrap().payload[..], b"crossed");
    key_update_then_ping(&mut c, 3);
    // TLS 1.2 (its state is rustls's, in the old process): told to come back, closed.
    let mut obuf = vec![];
    let r = recv(&mut old, &mut obuf).expect("a REDIRECT before the close");
    assert_eq!(
        (r.method, r.header("reason")),
        (method::REDIRECT, Some("restart"))
    );
    assert!(recv(&mut old, &mut obuf).is_none());
    // A new connection gets the re-read certificate.
    let mut again = tls_connect(&tt);
    assert_eq!(served(&again), second.to_vec());
    hello(&mut again, "again");
    // Across a second upgrade, after the key update: the state crosses again; a large
    // push (several records) arrives whole.
    g.upgrade();
    let big = vec![b'z'; 60_000];
    let (_, v) = g.api("POST", "/v1/push/device/demo/moving", &big);
    assert_eq!(v["delivered"], 1, "{v}");
    assert_eq!(recv(&mut c, &mut buf).unwrap().payload, big);
    key_update_then_ping(&mut c, 4);
    // The server answered each update the client asked for: the client reads under a key
    // the server updated after the last request (one record since: the last PONG), not
    // under its first key (dozens of records since).
    let ex = c.conn.dangerous_extract_secrets().unwrap();
    assert_eq!(ex.rx.0, 1, "records read since the server's last KeyUpdate");
    let (_, v) = g.api("POST", "/v1/push/device/demo/again", b"too");
    assert_eq!(v["delivered"], 1, "{v}");
    assert_eq!(&recv(&mut again, &mut vec![]).unwrap().payload[..], b"too");
    let (_, v) = g.api("POST", &format!("/v1/push/conn/{clear_id}"), b"still");
    assert_eq!(v["delivered"], 1, "{v}");
    assert_eq!(&clear.recv().payload[..], b"still");
    let m = g.metrics();
    assert_eq!(m["longlink_tls_errors_total"], 0.0);
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

/// A raw-mode WebSocket client over TLS (`wss`, no subprotocol), upgraded.
fn wss_raw(addr: &str, device: &str) -> (Tls, Vec<u8>) {
    let mut s = tls_connect(addr);
    let req = format!("GET /ws?app_id=demo&device_id={device}&token=demo-token HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut got = vec![];
    let end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed during the upgrade");
        got.extend_from_slice(&chunk[..n]);
    };
    assert!(got.starts_with(b"HTTP/1.1 101"), "{got:?}");
    let rest = got.split_off(end);
    (s, rest)
}

/// The close frame's code and reason a raw WebSocket client is sent (server frames are
/// unmasked; a close payload is at most 125 bytes).
fn ws_close_of(s: &mut Tls, mut got: Vec<u8>) -> (u16, String) {
    loop {
        if got.len() >= 2 && got.len() >= 2 + usize::from(got[1]) {
            assert_eq!(got[0], 0x88, "{got:?}");
            let p = &got[2..2 + usize::from(got[1])];
            return (
                u16::from_be_bytes([p[0], p[1]]),
                String::from_utf8(p[2..].to_vec()).unwrap(),
            );
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed with no close frame: {got:?}");
        got.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn a_drain_never_sends_a_tls_client_to_a_clear_endpoint() {
    let toml = "[drain]\nredirect_tcp = \"10.0.0.9:7100\"\nredirect_tcp_tls = \"10.0.0.9:7443\"\nredirect_ws = \"ws://10.0.0.9:7101/ws\"\nredirect_wss = \"wss://10.0.0.9:7444/ws\"\nrate = 100\n";
    let g = tls_gateway(toml);
    let mut secure = tls_connect(&g.addr("tcp_tls"));
    hello(&mut secure, "secure");
    let (mut clear, _) = g.hello("clear", None);
    let (mut wss, early) = wss_raw(&g.addr("https"), "raw-secure");
    let (st, _) = g.api("POST", "/v1/drain", b"");
    assert_eq!(st, 200);
    // A raw wss client has no REDIRECT: its close names the TLS endpoint.
    assert_eq!(
        ws_close_of(&mut wss, early),
        (1012, "draining; endpoint=wss://10.0.0.9:7444/ws".into())
    );
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
    let g = tls_gateway(
        "[drain]\nredirect_tcp = \"10.0.0.9:7100\"\nredirect_ws = \"ws://10.0.0.9:7101/ws\"\nrate = 100\n",
    );
    let mut secure = tls_connect(&g.addr("tcp_tls"));
    hello(&mut secure, "secure");
    let (mut wss, early) = wss_raw(&g.addr("https"), "raw-secure");
    g.api("POST", "/v1/drain", b"");
    let r = recv(&mut secure, &mut vec![]).expect("a REDIRECT");
    assert_eq!((r.method, r.header("endpoint")), (method::REDIRECT, None));
    assert_eq!(ws_close_of(&mut wss, early), (1012, "draining".into()));
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
    // More than the socket buffers hold: the gateway's writes block, the TLS layer keeps
    // the records it sealed until the socket takes them (writability), the rest waits in
    // the output.
    let g = tls_gateway("[limits]\nmax_output_bytes = 33554432\n");
    let mut c = tls_connect(&g.addr("tcp_tls"));
    let id = hello(&mut c, "sleepy");
    push_numbered(&g, &id, 240);
    // 12 MB queued; now read it all, in order.
    read_numbered(&mut c, &mut vec![], 240);
}

/// OpenSSL's own client (`openssl s_client`, TLS 1.3) on one kept-alive https connection:
/// a poll answered; its key update (`K`: it asks ours too), answered by ours, then a poll; a
/// live upgrade; another key update answered and a poll, by the new process on the same
/// connection.
#[test]
fn openssl_s_client_updates_keys_before_and_after_a_live_upgrade() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut g = tls_gateway("");
    let https = g.addr("https");
    for k in ["ka", "kb", "kc"] {
        let (st, v) = g.api(
            "POST",
            &format!("/v1/status/{k}"),
            format!("\"v-{k}\"").as_bytes(),
        );
        assert_eq!(st, 200, "{v}");
    }
    let ca = tls_files().2;
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &https, "-tls1_3", "-CAfile", &ca])
        .args([
            "-servername",
            "localhost",
            "-verify_return_error",
            "-crlf",
            "-msg",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl (scripts/deps.sh installs it)");
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for out in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
    }
    let mut seen = vec![];
    let mut wait_for = |what: &str| {
        let end = Instant::now() + T;
        while !seen.iter().any(|l: &String| l.contains(what)) {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => seen.push(l),
                Err(_) => panic!(
                    "no {what:?} from s_client; it printed:\n{}",
                    seen.join("\n")
                ),
            }
        }
        seen.clear();
    };
    // Each a read of its own: s_client takes a command only at the start of what it reads.
    let mut say = |s: &str| {
        stdin.write_all(s.as_bytes()).unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(200));
    };
    let poll =
        |k: &str| format!("GET /poll/status?key={k}&timeout=0 HTTP/1.1\nHost: localhost\n\n");
    wait_for("Verify return code: 0");
    say(&poll("ka"));
    wait_for("v-ka");
    // `-msg` shows each handshake message: ours sent (>>>), then the server's answer
    // received (<<<).
    say("K\n");
    wait_for(">>> TLS 1.3, Handshake [length 0005], KeyUpdate");
    wait_for("<<< TLS 1.3, Handshake [length 0005], KeyUpdate");
    say(&poll("kb"));
    wait_for("v-kb");
    g.upgrade();
    say("K\n");
    wait_for(">>> TLS 1.3, Handshake [length 0005], KeyUpdate");
    wait_for("<<< TLS 1.3, Handshake [length 0005], KeyUpdate");
    say(&poll("kc"));
    wait_for("v-kc");
    say("Q\n");
    let _ = child.wait();
    assert_eq!(g.metrics()["longlink_tls_errors_total"], 0.0);
}

/// What the client's rustls would put on the wire for `f`: sealed records, not sent.
fn sealed(c: &mut Tls, f: &Frame) -> Vec<u8> {
    let mut b = vec![];
    codec::encode_tcp(f, &mut b).unwrap();
    c.conn.writer().write_all(&b).unwrap();
    let mut wire = vec![];
    while c.conn.wants_write() {
        c.conn.write_tls(&mut wire).unwrap();
    }
    wire
}

#[test]
fn records_dribbled_a_byte_at_a_time_and_forged_ones_are_handled_apart() {
    let g = tls_gateway("");
    let tt = g.addr("tcp_tls");
    let mut c = tls_connect(&tt);
    hello(&mut c, "dribble");
    // A PING with a 30 KB payload: two records, sent a byte (then a few) at a time, each
    // read apart by the gateway.
    let mut ping = Frame::control(method::PING, 7, &[]);
    ping.payload = vec![b'p'; 30_000].into();
    let wire = sealed(&mut c, &ping);
    for (i, chunk) in wire.chunks(1).take(64).enumerate() {
        c.sock.write_all(chunk).unwrap();
        if i % 8 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    for chunk in wire[64..].chunks(997) {
        c.sock.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = recv(&mut c, &mut vec![]).expect("PONG");
    assert_eq!((r.method, r.seqid), (method::PONG, 7), "{r:?}");
    // A bystander, and a client whose record is forged (one bit of its ciphertext
    // flipped): that one gets an alert and a close, counted; the bystander goes on.
    let mut by = tls_connect(&tt);
    hello(&mut by, "bystander");
    let mut forged = tls_connect(&tt);
    hello(&mut forged, "forger");
    let mut wire = sealed(&mut forged, &Frame::control(method::PING, 8, &[]));
    wire[10] ^= 1;
    forged.sock.write_all(&wire).unwrap();
    let mut buf = vec![];
    let mut chunk = [0u8; 1024];
    let end = Instant::now() + T;
    loop {
        match forged.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                // rustls reports the gateway's alert.
                assert!(e.to_string().contains("BadRecordMac"), "{e}");
                break;
            }
        }
        assert!(Instant::now() < end, "not closed");
    }
    assert!(buf.is_empty(), "nothing but the alert: {buf:?}");
    send(&mut by, &Frame::control(method::PING, 9, &[]));
    let r = recv(&mut by, &mut vec![]).expect("the bystander's PONG");
    assert_eq!((r.method, r.seqid), (method::PONG, 9));
    assert_eq!(g.metrics()["longlink_tls_errors_total"], 1.0);
}

#[test]
fn a_record_cut_by_the_upgrade_and_output_the_socket_had_not_taken_cross_whole() {
    let mut g = tls_gateway("[limits]\nmax_output_bytes = 33554432\n");
    let mut c = tls_connect(&g.addr("tcp_tls"));
    let id = hello(&mut c, "cut");
    // 12 MB of pushes the client does not read yet, more than the socket buffers hold:
    // sealed records wait in the gateway (some in its TLS layer, the rest as output) when
    // the upgrade comes.
    push_numbered(&g, &id, 240);
    // Half a record of a PING before the upgrade, the rest after it.
    let wire = sealed(&mut c, &Frame::control(method::PING, 5, &[]));
    let half = wire.len() / 2;
    c.sock.write_all(&wire[..half]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    g.upgrade();
    c.sock.write_all(&wire[half..]).unwrap();
    let mut buf = vec![];
    read_numbered(&mut c, &mut buf, 240);
    let r = recv(&mut c, &mut buf).expect("PONG");
    assert_eq!((r.method, r.seqid), (method::PONG, 5), "{r:?}");
    assert_eq!(g.metrics()["longlink_tls_errors_total"], 0.0);
}

#[test]
fn data_that_comes_with_the_clients_finished_is_all_read() {
    // A client that writes before its handshake ends sends its Finished and ~25 KB of
    // records in one burst: rustls takes the Finished alone (one protected record per
    // step), the records after it are ours, none lost at the switch.
    let g = tls_gateway("");
    let mut conn = client(rustls::DEFAULT_VERSIONS);
    let mut early = vec![];
    let hello = Frame::control(
        method::HELLO,
        1,
        &[
            ("app_id", "demo"),
            ("device_id", "eager"),
            ("token", "demo-token"),
        ],
    );
    codec::encode_tcp(&hello, &mut early).unwrap();
    for seqid in 2..4 {
        let mut ping = Frame::control(method::PING, seqid, &[]);
        ping.payload = vec![b'e'; 12_000].into();
        codec::encode_tcp(&ping, &mut early).unwrap();
    }
    conn.writer().write_all(&early).unwrap();
    let tcp = TcpStream::connect(g.addr("tcp_tls")).unwrap();
    tcp.set_read_timeout(Some(T)).unwrap();
    let mut c = rustls::StreamOwned::new(conn, tcp);
    let mut buf = vec![];
    let r = recv(&mut c, &mut buf).expect("HELLO answer");
    assert_eq!((r.method, r.seqid), (method::HELLO, 1), "{r:?}");
    for seqid in 2..4 {
        let r = recv(&mut c, &mut buf).expect("PONG");
        assert_eq!((r.method, r.seqid), (method::PONG, seqid), "{r:?}");
    }
    assert_eq!(g.metrics()["longlink_tls_errors_total"], 0.0);
}

#[test]
fn a_handshake_stuffed_with_protected_records_is_cut_off_after_a_few_steps() {
    // A ClientHello announcing early data makes the server skip protected records it
    // cannot open (rejected early data). Each record long enough to be a Finished costs a
    // handshake step on a worker; a client sending hundreds of them gets at most 16 steps,
    // then an alert and a close, counted. A bystander goes on.
    let g = tls_gateway("");
    let tt = g.addr("tcp_tls");
    let mut conn = client(&[&rustls::version::TLS13]);
    let mut ch = vec![];
    conn.write_tls(&mut ch).unwrap();
    // Record header 5, handshake header 4, version 2, random 32, then three length-prefixed
    // fields (session id: 1 byte of length, suites: 2, compression: 1), then extensions.
    let mut p = 5 + 4 + 2 + 32;
    p += 1 + ch[p] as usize;
    p += 2 + u16::from_be_bytes([ch[p], ch[p + 1]]) as usize;
    p += 1 + ch[p] as usize;
    let ext_len = u16::from_be_bytes([ch[p], ch[p + 1]]) + 4;
    ch[p..p + 2].copy_from_slice(&ext_len.to_be_bytes());
    ch.extend_from_slice(&[0, 42, 0, 0]); // early_data, empty
    let rec_len = u16::from_be_bytes([ch[3], ch[4]]) + 4;
    ch[3..5].copy_from_slice(&rec_len.to_be_bytes());
    let hs_len = u32::from_be_bytes([0, ch[6], ch[7], ch[8]]) + 4;
    ch[6..9].copy_from_slice(&hs_len.to_be_bytes()[1..]);
    let mut by = tls_connect(&tt);
    hello(&mut by, "bystander");
    let jobs = g.metrics()["longlink_worker_jobs_total"];
    let mut s = TcpStream::connect(&tt).unwrap();
    s.write_all(&ch).unwrap();
    let junk: Vec<u8> = (0..300)
        .flat_map(|_| [&[23u8, 3, 3, 0, 60][..], &[0xab; 60][..]].concat())
        .collect();
    s.write_all(&junk).unwrap();
    closed_by_server(s);
    let m = g.metrics();
    let steps = m["longlink_worker_jobs_total"] - jobs;
    assert!(
        (15.0..=20.0).contains(&steps),
        "{steps} worker jobs: the step cap (16) is what closed it"
    );
    assert_eq!(m["longlink_tls_errors_total"], 1.0);
    send(&mut by, &Frame::control(method::PING, 5, &[]));
    let r = recv(&mut by, &mut vec![]).expect("the bystander's PONG");
    assert_eq!((r.method, r.seqid), (method::PONG, 5));
}
