//! `longlink client`: a small blocking TCP client for walkthroughs, operators and debugging.
//! It says HELLO, prints every frame it receives as one JSON line, heartbeats, and can ACK.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use prost::Message;
use serde_json::json;

use crate::codec;
use crate::proto::{method, Frame};

pub struct Options {
    pub addr: String,
    pub app: String,
    pub device: String,
    pub token: String,
    pub user: Option<String>,
    /// ACK every push (service 0 PUSH frames and backend frames).
    pub ack: bool,
    /// Heartbeat interval; 0 = the one the gateway announces.
    pub ping_ms: u64,
    /// Exit after this many pushes (0 = never).
    pub count: u64,
    /// Exit after this long (0 = never).
    pub duration_ms: u64,
}

enum Stream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Stream {
    fn connect(addr: &str) -> io::Result<Stream> {
        if let Some(p) = addr.strip_prefix("unix:") {
            Ok(Stream::Unix(std::os::unix::net::UnixStream::connect(p)?))
        } else {
            let s = std::net::TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            Ok(Stream::Tcp(s))
        }
    }
    fn set_read_timeout(&self, d: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(Some(d)),
            Stream::Unix(s) => s.set_read_timeout(Some(d)),
        }
    }
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(b),
            Stream::Unix(s) => s.write_all(b),
        }
    }
}

fn send(s: &mut Stream, f: &Frame) -> io::Result<()> {
    let mut b = Vec::new();
    codec::encode_tcp(f, &mut b).map_err(io::Error::other)?;
    s.write_all(&b)
}

/// One frame as a JSON line: payload as text when it is UTF-8, else base64.
pub fn frame_json(f: &Frame) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = f
        .headers
        .iter()
        .map(|h| (h.key.clone(), h.value.clone().into()))
        .collect();
    let mut v = json!({
        "seqid": f.seqid,
        "service": f.service,
        "method": f.method,
        "headers": headers,
    });
    let o = v.as_object_mut().unwrap();
    if f.service == 0 {
        o.insert("name".into(), method::name(f.method).into());
    }
    if f.logid != 0 {
        o.insert("logid".into(), f.logid.into());
    }
    if !f.payload_type.is_empty() {
        o.insert("payload_type".into(), f.payload_type.clone().into());
    }
    if !f.payload.is_empty() {
        crate::types::insert_payload(o, &f.payload);
    }
    v
}

/// REDIRECTs followed in a row (no HELLO answer between them) before the client gives up.
const MAX_REDIRECTS: u64 = 5;

pub fn run(o: Options) -> Result<(), String> {
    let mut s = Stream::connect(&o.addr).map_err(|e| format!("connect {}: {e}", o.addr))?;
    let mut headers = vec![
        ("app_id", o.app.as_str()),
        ("device_id", o.device.as_str()),
        ("token", o.token.as_str()),
    ];
    if let Some(u) = &o.user {
        headers.push(("user_id", u.as_str()));
    }
    headers.push((
        "client_version",
        concat!("longlink-client/", env!("CARGO_PKG_VERSION")),
    ));
    let hello = Frame::control(method::HELLO, 1, &headers);
    send(&mut s, &hello).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut ping_every = Duration::from_millis(if o.ping_ms > 0 { o.ping_ms } else { 25_000 });
    let mut next_ping = Instant::now() + ping_every;
    let mut seq = 1u64;
    let mut pushes = 0u64;
    // REDIRECTs followed since the last HELLO answer (a loop of them ends the client).
    let mut redirects = 0u64;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    let stdout = io::stdout();
    loop {
        let now = Instant::now();
        if o.duration_ms > 0 && now >= start + Duration::from_millis(o.duration_ms) {
            return Ok(());
        }
        if now >= next_ping {
            seq += 1;
            send(&mut s, &Frame::control(method::PING, seq, &[])).map_err(|e| e.to_string())?;
            next_ping = now + ping_every;
        }
        let wait = next_ping
            .saturating_duration_since(now)
            .max(Duration::from_millis(1))
            .min(Duration::from_millis(200));
        s.set_read_timeout(wait).map_err(|e| e.to_string())?;
        match s.read(&mut chunk) {
            Ok(0) => {
                eprintln!("connection closed by the gateway");
                return Ok(());
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(format!("read: {e}")),
        }
        let mut at = 0;
        let mut moved = None;
        while let Some((body, used)) =
            codec::decode_tcp(&buf[at..], codec::MAX_TCP_FRAME).map_err(|e| e.to_string())?
        {
            at += used;
            let f = Frame::decode(body).map_err(|e| format!("bad frame from gateway: {e}"))?;
            let _ = writeln!(stdout.lock(), "{}", frame_json(&f));
            if f.service == 0 && f.method == method::REDIRECT {
                // The gateway moves us (a drain): to its endpoint, else the usual address.
                let to = f.header("endpoint").filter(|e| !e.is_empty());
                moved = Some(to.unwrap_or(&o.addr).to_string());
                break;
            }
            if f.service == 0 && f.method == method::HELLO {
                redirects = 0; // admitted where it was sent
            }
            if f.service == 0 && f.method == method::HELLO && o.ping_ms == 0 {
                if let Some(ms) = f.header("heartbeat_ms").and_then(|v| v.parse::<u64>().ok()) {
                    ping_every = Duration::from_millis(ms.max(1));
                    next_ping = Instant::now() + ping_every;
                }
            }
            let is_push = f.service != 0 || f.method == method::PUSH;
            if is_push {
                pushes += 1;
                if o.ack {
                    send(&mut s, &Frame::control(method::ACK, f.seqid, &[]))
                        .map_err(|e| e.to_string())?;
                }
                if o.count > 0 && pushes >= o.count {
                    return Ok(());
                }
            }
        }
        buf.drain(..at);
        if let Some(to) = moved {
            redirects += 1;
            if redirects > MAX_REDIRECTS {
                return Err(format!("more than {MAX_REDIRECTS} redirects in a row"));
            }
            eprintln!("redirected to {to}");
            // A short pause (the gateway moves many clients), then the endpoint, else the
            // usual address.
            std::thread::sleep(Duration::from_millis(50 * redirects));
            s = match Stream::connect(&to) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("connect {to}: {e}; back to {}", o.addr);
                    Stream::connect(&o.addr).map_err(|e| format!("connect {}: {e}", o.addr))?
                }
            };
            send(&mut s, &hello).map_err(|e| e.to_string())?;
            buf.clear();
            next_ping = Instant::now() + ping_every;
        }
    }
}
