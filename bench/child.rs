//! The child process: one mio event loop holding its share of the connections (TCP, raw
//! WebSocket or long-poll), opening them at a bounded concurrency, timing what arrives, and
//! answering the parent's commands.

use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};
use prost::Message;
use serde_json::json;

use longlink::codec;
use longlink::proto::{method, Frame};

use crate::util::{http_message, now_ns, payload, sent_at, Hist};
use crate::Kind;

#[derive(PartialEq)]
pub(crate) enum St {
    Connecting,
    /// Handshake sent (HELLO, upgrade request), answer awaited.
    Hello,
    Ready,
    Dead,
}

pub(crate) struct Conn {
    s: MioStream,
    /// TLS kinds: the client side of rustls.
    tls: Option<Box<rustls::ClientConnection>>,
    st: St,
    buf: Vec<u8>,
    /// Echo round trips left to send.
    rounds: usize,
}

impl Conn {
    /// Writes `b` whole or not at all as far as the caller knows (TLS: into rustls, sent
    /// as the socket takes it); false on failure.
    fn send(&mut self, b: &[u8]) -> bool {
        match &mut self.tls {
            None => self.s.write(b).map(|w| w == b.len()).unwrap_or(false),
            Some(t) => {
                if t.writer().write_all(b).is_err() {
                    return false;
                }
                self.flush_tls()
            }
        }
    }

    fn flush_tls(&mut self) -> bool {
        let Some(t) = &mut self.tls else { return true };
        while t.wants_write() {
            match t.write_tls(&mut self.s) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        true
    }

    /// Plaintext into `buf` (TLS: records read, the handshake answered); Ok(0) at the end.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::ErrorKind;
        let Conn { s, tls, .. } = self;
        let Some(t) = tls else {
            return s.read(buf);
        };
        loop {
            match t.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if t.read_tls(s)? == 0 {
                return Ok(0);
            }
            t.process_new_packets().map_err(std::io::Error::other)?;
            while t.wants_write() {
                match t.write_tls(s) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// The rustls client config of the TLS kinds: trusts the CA in `LONGLINK_BENCH_CA` (the
/// parent's `--tls-ca`), names the server `localhost`.
pub(crate) fn tls_config() -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let ca = std::env::var("LONGLINK_BENCH_CA").unwrap_or_else(|_| "tests/keys/tls_ca.pem".into());
    let mut roots = rustls::RootCertStore::empty();
    for c in
        rustls::pki_types::CertificateDer::pem_file_iter(&ca).map_err(|e| format!("{ca}: {e}"))?
    {
        roots
            .add(c.map_err(|e| format!("{ca}: {e}"))?)
            .map_err(|e| e.to_string())?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}

/// A masked client WebSocket frame (the mask is fixed: the bench does not need secrecy).
pub(crate) fn ws_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    longlink::ws::encode_client_frame(out, true, opcode, [0x12, 0x34, 0x56, 0x78], payload);
}

/// One server WebSocket frame from the front of `buf`: (opcode, payload range, used). None
/// until it is whole, or if it is not a frame a server may send (the gateway's decoder for
/// clients, `ws::decode_server_frame`; RSV1 allowed for the compressed transport).
pub(crate) fn ws_next(buf: &[u8]) -> Option<(u8, std::ops::Range<usize>, usize)> {
    let f = longlink::ws::decode_server_frame(buf, usize::MAX >> 1, true).ok()??;
    Some((f.opcode, f.payload, f.len))
}

/// What one child process holds and counts.
pub(crate) struct Load {
    kind: Kind,
    hist: Hist,
    received: u64,
    first_ns: u64,
    last_ns: u64,
    last_progress: Instant,
    echo_size: usize,
    service: i32,
    /// ACK every push that has a seqid (the unicast scenario).
    ack: bool,
}

impl Load {
    pub(crate) fn record(&mut self, sent: u64, now: u64) {
        self.received += 1;
        self.last_progress = Instant::now();
        if self.first_ns == 0 {
            self.first_ns = now;
        }
        self.last_ns = now;
        self.hist.record(now.saturating_sub(sent) / 1000);
    }

    /// The next echo message for a connection.
    pub(crate) fn echo_msg(&self, seq: u64) -> Vec<u8> {
        let mut out = vec![];
        match self.kind {
            Kind::Tcp | Kind::TcpTls => {
                let f = Frame {
                    seqid: seq,
                    service: self.service,
                    method: 1,
                    payload: payload(self.echo_size).into(),
                    ..Default::default()
                };
                codec::encode_tcp(&f, &mut out).unwrap();
            }
            _ => ws_frame(0x1, &payload(self.echo_size), &mut out),
        }
        out
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn child(
    kind: Kind,
    addr: &str,
    source: std::net::Ipv4Addr,
    n: usize,
    concurrency: usize,
    app: &str,
    token: &str,
    prefix: &str,
) -> Result<(), String> {
    let target: SocketAddr = addr.parse().map_err(|e| format!("--addr {addr}: {e}"))?;
    let (tx, cmds) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in std::io::stdin().lock().lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
        let _ = tx.send("quit".into());
    });
    let out = |s: String| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    };
    out("spawned {}".into());

    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let tls_cfg = if matches!(kind, Kind::Wss | Kind::TcpTls) {
        Some(tls_config()?)
    } else {
        None
    };
    let mut events = Events::with_capacity(4096);
    let mut conns: Vec<Conn> = Vec::with_capacity(n);
    let mut scratch = vec![0u8; 1 << 16];
    let mut inflated = Vec::new();
    let (mut ok, mut failed, mut pending) = (0usize, 0usize, 0usize);
    let mut connecting = false;
    let mut load = Load {
        kind,
        hist: Hist::default(),
        received: 0,
        first_ns: 0,
        last_ns: 0,
        last_progress: Instant::now(),
        echo_size: 64,
        service: 1,
        ack: false,
    };
    let mut wait_for: Option<(u64, Instant)> = None;
    let mut last_ping = Instant::now();
    let mut ping_seq = 1u64;

    loop {
        while let Ok(cmd) = cmds.try_recv() {
            let mut parts = cmd.split_whitespace();
            match parts.next() {
                Some("connect") => connecting = true,
                Some("ack") => load.ack = parts.next() == Some("1"),
                Some("reset") => {
                    load.hist = Hist::default();
                    (load.received, load.first_ns, load.last_ns) = (0, 0, 0);
                    out("reset {}".into());
                }
                Some("wait") => {
                    let want: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    wait_for = Some((want, Instant::now()));
                }
                Some("echo") => {
                    let rounds: usize = parts.next().and_then(|v| v.parse().ok()).unwrap_or(1);
                    load.echo_size = parts.next().and_then(|v| v.parse().ok()).unwrap_or(64);
                    load.service = parts.next().and_then(|v| v.parse().ok()).unwrap_or(1);
                    let mut started = 0u64;
                    for c in conns.iter_mut().filter(|c| c.st == St::Ready) {
                        c.rounds = rounds - 1;
                        let _ = c.send(&load.echo_msg(1));
                        started += 1;
                    }
                    wait_for = Some((started * rounds as u64, Instant::now()));
                }
                Some("quit") | None => return Ok(()),
                Some(other) => out(format!("error unknown command {other}")),
            }
        }
        while connecting && conns.len() < n && pending < concurrency {
            let i = conns.len();
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .map_err(|e| e.to_string())?;
            sock.set_nonblocking(true).map_err(|e| e.to_string())?;
            sock.set_nodelay(true).map_err(|e| e.to_string())?;
            // Let connect() pick the port by the whole 4-tuple; bind(ip:0) alone would reserve
            // a port per socket and search past TIME_WAIT ones, slowing repeated runs.
            let one: libc::c_int = 1;
            // SAFETY: setsockopt on our own socket with a correctly sized int.
            unsafe {
                use std::os::fd::AsRawFd;
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    4,
                );
            }
            sock.bind(&SocketAddr::new(source.into(), 0).into())
                .map_err(|e| format!("bind {source}: {e}"))?;
            match sock.connect(&target.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(format!("connect: {e}")),
            }
            let mut s = MioStream::from_std(sock.into());
            poll.registry()
                .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)
                .map_err(|e| e.to_string())?;
            let tls = match &tls_cfg {
                Some(cfg) => {
                    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                    let t = rustls::ClientConnection::new(cfg.clone(), name)
                        .map_err(|e| e.to_string())?;
                    Some(Box::new(t))
                }
                None => None,
            };
            conns.push(Conn {
                s,
                tls,
                st: St::Connecting,
                buf: Vec::new(),
                rounds: 0,
            });
            pending += 1;
        }
        if connecting && ok + failed == n {
            connecting = false;
            out(format!("connected {}", json!({"ok": ok, "failed": failed})));
        }
        if let Some((want, since)) = wait_for {
            let stalled = load.last_progress.elapsed() > Duration::from_secs(3)
                && since.elapsed() > Duration::from_secs(3);
            if load.received >= want || stalled {
                wait_for = None;
                let s = json!({"received": load.received, "first_ns": load.first_ns, "last_ns": load.last_ns, "hist": load.hist.to_json()});
                out(format!("stats {s}"));
            }
        }
        // Keep idle connections alive past the gateway's read timeout (WebSocket: the
        // gateway pings and the pong below answers).
        let tcp = matches!(kind, Kind::Tcp | Kind::TcpTls);
        if tcp && !connecting && last_ping.elapsed() > Duration::from_secs(10) {
            last_ping = Instant::now();
            ping_seq += 1;
            let mut b = vec![];
            codec::encode_tcp(&Frame::control(method::PING, ping_seq, &[]), &mut b).unwrap();
            for c in conns.iter_mut().filter(|c| c.st == St::Ready) {
                let _ = c.send(&b);
            }
        }
        poll.poll(&mut events, Some(Duration::from_millis(5)))
            .map_err(|e| e.to_string())?;
        for ev in events.iter() {
            let i = ev.token().0;
            let c = &mut conns[i];
            if c.st == St::Connecting && (ev.is_writable() || ev.is_error()) {
                if ev.is_error() || c.s.peer_addr().is_err() {
                    c.st = St::Dead;
                    failed += 1;
                    pending -= 1;
                    continue;
                }
                let device = format!("{prefix}{i}");
                let b = match kind {
                    Kind::Tcp | Kind::TcpTls => {
                        let mut b = vec![];
                        let hello = Frame::control(method::HELLO, 1, &[("app_id", app), ("device_id", &device), ("token", token)]);
                        codec::encode_tcp(&hello, &mut b).unwrap();
                        b
                    }
                    Kind::Ws | Kind::WsDeflate | Kind::Wss => {
                        let ext = if kind == Kind::WsDeflate {
                            "Sec-WebSocket-Extensions: permessage-deflate\r\n"
                        } else {
                            ""
                        };
                        format!(
                            "GET /ws?app_id={app}&device_id={device}&token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
                        )
                        .into_bytes()
                    }
                    Kind::Poll => format!("GET /poll/status?key={device}&timeout=120 HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes(),
                };
                if c.send(&b) {
                    // Writable interest is no longer needed.
                    let _ = poll
                        .registry()
                        .reregister(&mut c.s, Token(i), Interest::READABLE);
                    if kind == Kind::Poll {
                        // A waiter is "connected" once its request is out; the parent waits
                        // for the gateway's waiter gauge.
                        c.st = St::Ready;
                        ok += 1;
                        pending -= 1;
                    } else {
                        c.st = St::Hello;
                    }
                } else {
                    c.st = St::Dead;
                    failed += 1;
                    pending -= 1;
                }
            }
            if !(ev.is_readable() || ev.is_read_closed())
                || c.st == St::Dead
                || c.st == St::Connecting
            {
                continue;
            }
            loop {
                match c.recv(&mut scratch) {
                    Ok(0) => {
                        if c.st == St::Hello {
                            failed += 1;
                            pending -= 1;
                        }
                        c.st = St::Dead;
                        break;
                    }
                    Ok(k) => {
                        c.buf.extend_from_slice(&scratch[..k]);
                        let now = now_ns();
                        let mut reply: Vec<u8> = vec![];
                        let mut at = 0;
                        match kind {
                            Kind::Tcp | Kind::TcpTls => {
                                while let Ok(Some((body, used))) =
                                    codec::decode_tcp(&c.buf[at..], codec::MAX_TCP_FRAME)
                                {
                                    at += used;
                                    let Ok(f) = Frame::decode(body) else { continue };
                                    if f.service == 0
                                        && f.method == method::HELLO
                                        && c.st == St::Hello
                                    {
                                        c.st = St::Ready;
                                        ok += 1;
                                        pending -= 1;
                                    } else if f.service != 0 || f.method == method::PUSH {
                                        // An answer from the service (its ACK is skipped) or a push.
                                        load.record(sent_at(&f.payload).unwrap_or(now), now);
                                        if f.service != 0 && c.rounds > 0 {
                                            c.rounds -= 1;
                                            reply.extend(load.echo_msg(f.seqid + 1));
                                        }
                                        if load.ack && f.method == method::PUSH && f.seqid != 0 {
                                            let a = Frame::control(method::ACK, f.seqid, &[]);
                                            codec::encode_tcp(&a, &mut reply).unwrap();
                                        }
                                    } else if f.method == method::ERROR {
                                        out(format!("error gateway said {:?}", f.headers));
                                    }
                                }
                            }
                            Kind::Ws | Kind::WsDeflate | Kind::Wss => {
                                if c.st == St::Hello {
                                    let Some(end) = c.buf.windows(4).position(|w| w == b"\r\n\r\n")
                                    else {
                                        continue;
                                    };
                                    if !c.buf.starts_with(b"HTTP/1.1 101") {
                                        out(format!(
                                            "error upgrade refused: {}",
                                            String::from_utf8_lossy(&c.buf[..end])
                                        ));
                                        failed += 1;
                                        pending -= 1;
                                        c.st = St::Dead;
                                        break;
                                    }
                                    c.st = St::Ready;
                                    ok += 1;
                                    pending -= 1;
                                    at = end + 4;
                                }
                                while let Some((op, range, used)) = ws_next(&c.buf[at..]) {
                                    let mut p = &c.buf[at + range.start..at + range.end];
                                    // A compressed message (RSV1): inflated, as a client does.
                                    if c.buf[at] & 0x40 != 0 {
                                        inflated.clear();
                                        if longlink::deflate::unpack(p, 1 << 24, &mut inflated)
                                            .is_err()
                                        {
                                            out("error a compressed message did not inflate".into());
                                        }
                                        p = &inflated;
                                    }
                                    match op {
                                        0x1 | 0x2 => {
                                            load.record(sent_at(p).unwrap_or(now), now);
                                            if c.rounds > 0 {
                                                c.rounds -= 1;
                                                reply.extend(load.echo_msg(0));
                                            }
                                        }
                                        0x9 => ws_frame(0xA, p, &mut reply),
                                        _ => {}
                                    }
                                    at += used;
                                }
                            }
                            Kind::Poll => {
                                // One answer per waiter: the body's data is the set's send time.
                                if let Some((end, len)) = http_message(&c.buf) {
                                    let body: serde_json::Value =
                                        serde_json::from_slice(&c.buf[end + 4..end + 4 + len])
                                            .unwrap_or_default();
                                    let sent = body["data"].as_u64().or_else(|| {
                                        body["data"].as_str().and_then(|s| sent_at(s.as_bytes()))
                                    });
                                    if body["code"] == 0 {
                                        load.record(sent.unwrap_or(now), now);
                                    }
                                    at = end + 4 + len;
                                }
                            }
                        }
                        c.buf.drain(..at);
                        if !reply.is_empty() {
                            let _ = c.send(&reply);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        if c.st == St::Hello {
                            failed += 1;
                            pending -= 1;
                        }
                        c.st = St::Dead;
                        break;
                    }
                }
            }
        }
    }
}
