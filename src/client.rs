//! `longlink client`: a small blocking client for walkthroughs, operators and debugging,
//! over TCP (or a unix socket) or WebSocket pbbp2 (`ws://`). It says HELLO, prints every
//! frame it receives as one JSON line, heartbeats, follows REDIRECT, and can ACK.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use base64::Engine as _;

use prost::Message;
use serde_json::json;

use crate::codec;
use crate::proto::{method, Frame};

pub struct Options {
    /// `host:port`, `unix:/path`, or `ws://host:port/path` for WebSocket pbbp2.
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

/// The gateway link: TCP frames (`[u16 len][Frame]`), or WebSocket pbbp2 (a `ws://` address).
struct Link {
    s: Stream,
    ws: bool,
    /// WebSocket: the message being reassembled from fragments, and whether one is open.
    msg: Vec<u8>,
    fragmented: bool,
}

/// What came in, as far as the client cares.
enum Got {
    Frame(Frame),
    /// A WebSocket close: its code and reason.
    Closed(u16, String),
}

impl Link {
    /// Connects to a TCP address (`host:port`, `unix:/path`) or upgrades a WebSocket
    /// (`ws://host:port/path`, the credentials in the query as a browser sends them).
    /// Bytes that came behind the upgrade answer are put in `buf`.
    fn connect(addr: &str, o: &Options, buf: &mut Vec<u8>) -> Result<Link, String> {
        if addr.starts_with("wss://") {
            return Err(
                "wss:// is not supported by this client: use ws://, or TCP with --tcp".into(),
            );
        }
        let Some(rest) = addr.strip_prefix("ws://") else {
            let s = Stream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
            return Ok(Link {
                s,
                ws: false,
                msg: vec![],
                fragmented: false,
            });
        };
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/ws" } else { path };
        // ws://host/... means port 80; an IPv6 literal is [addr]:port.
        let dial = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.ends_with(']'))
        {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        let mut s = Stream::connect(&dial).map_err(|e| format!("connect {dial}: {e}"))?;
        let mut q = format!(
            "app_id={}&device_id={}&token={}",
            query_escape(&o.app),
            query_escape(&o.device),
            query_escape(&o.token)
        );
        if let Some(u) = &o.user {
            q += &format!("&user_id={}", query_escape(u));
        }
        let key = base64::engine::general_purpose::STANDARD.encode(random_bytes::<16>());
        let sep = if path.contains('?') { '&' } else { '?' };
        let req = format!(
            "GET {path}{sep}{q} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: pbbp2\r\nUser-Agent: longlink-client/{}\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        s.set_read_timeout(Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 << 10 {
                return Err("the upgrade answer's head is over 16 KiB".into());
            }
            match s.read(&mut chunk) {
                Ok(0) => return Err("the gateway closed during the upgrade".into()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("upgrade: {e}")),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        check_upgrade_answer(&head, &key)?;
        buf.drain(..end);
        Ok(Link {
            s,
            ws: true,
            msg: vec![],
            fragmented: false,
        })
    }

    fn send(&mut self, f: &Frame) -> io::Result<()> {
        let mut b = Vec::new();
        if self.ws {
            crate::ws::encode_client_frame(
                &mut b,
                true,
                crate::ws::op::BINARY,
                random_bytes::<4>(),
                &f.encode_to_vec(),
            );
        } else {
            codec::encode_tcp(f, &mut b).map_err(io::Error::other)?;
        }
        self.s.write_all(&b)
    }

    /// The next whole frame (or close) at the front of `buf`, if one is whole, and the
    /// bytes taken (WebSocket pings before it are answered here and taken too).
    fn next(&mut self, buf: &[u8]) -> Result<(Option<Got>, usize), String> {
        if !self.ws {
            let Some((body, used)) =
                codec::decode_tcp(buf, codec::MAX_TCP_FRAME).map_err(|e| e.to_string())?
            else {
                return Ok((None, 0));
            };
            let f = Frame::decode(body).map_err(|e| format!("bad frame from gateway: {e}"))?;
            return Ok((Some(Got::Frame(f)), used));
        }
        use crate::ws::op;
        let mut at = 0;
        loop {
            let Some(w) = crate::ws::decode_server_frame(&buf[at..], MAX_WS_MESSAGE, false)
                .map_err(|e| format!("bad WebSocket frame from gateway: {e}"))?
            else {
                return Ok((None, at));
            };
            let payload = &buf[at + w.payload.start..at + w.payload.end];
            at += w.len;
            match w.opcode {
                op::PING => {
                    let mut b = Vec::new();
                    crate::ws::encode_client_frame(&mut b, true, op::PONG, random_bytes(), payload);
                    self.s.write_all(&b).map_err(|e| e.to_string())?;
                }
                op::PONG => {}
                op::CLOSE => {
                    let code = payload
                        .get(..2)
                        .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[]));
                    // Answer it, as §5.5.1 asks, then the caller stops.
                    let mut b = Vec::new();
                    let echo = payload.get(..2).unwrap_or(&[]);
                    crate::ws::encode_client_frame(&mut b, true, op::CLOSE, random_bytes(), echo);
                    let _ = self.s.write_all(&b);
                    return Ok((Some(Got::Closed(code, reason.into_owned())), at));
                }
                op::TEXT => return Err("a text message on pbbp2".into()),
                _ => {
                    // §5.4: a message's first frame is BINARY, the rest CONTINUATION.
                    if (w.opcode == op::CONTINUATION) != self.fragmented {
                        return Err("a WebSocket frame out of its message's order".into());
                    }
                    self.fragmented = !w.fin;
                    if self.msg.len() + payload.len() > MAX_WS_MESSAGE {
                        return Err("a message over 16 MiB".into());
                    }
                    self.msg.extend_from_slice(payload);
                    if w.fin {
                        let f = Frame::decode(&self.msg[..])
                            .map_err(|e| format!("bad frame from gateway: {e}"))?;
                        self.msg.clear();
                        return Ok((Some(Got::Frame(f)), at));
                    }
                }
            }
        }
    }
}

/// The biggest WebSocket message the client takes (the gateway's own default is 1 MiB).
const MAX_WS_MESSAGE: usize = 16 << 20;

/// The upgrade answer must be 101 with our key's accept and the pbbp2 subprotocol; any
/// other answer is the gateway's refusal (401 bad token, 403 unknown app, 429, 503, ...).
fn check_upgrade_answer(head: &str, key: &str) -> Result<(), String> {
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    if status.split(' ').nth(1) != Some("101") {
        return Err(format!("the gateway refused the upgrade: {status}"));
    }
    let mut accept = None;
    let mut protocol = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("sec-websocket-accept") {
                accept = Some(v.trim());
            } else if k.eq_ignore_ascii_case("sec-websocket-protocol") {
                protocol = Some(v.trim());
            }
        }
    }
    if accept != Some(crate::ws::accept_key(key).as_str()) {
        return Err("the upgrade answer has a wrong Sec-WebSocket-Accept".into());
    }
    if protocol != Some("pbbp2") {
        return Err(format!("the gateway did not agree to pbbp2 ({protocol:?})"));
    }
    Ok(())
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
fn query_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// Unpredictable bytes for WebSocket keys and masks (§5.3 asks masks to be).
fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source");
    b
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
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    // TCP says HELLO first; over WebSocket the credentials went with the upgrade and the
    // gateway says HELLO.
    let dial = |to: &str, buf: &mut Vec<u8>| -> Result<Link, String> {
        let mut l = Link::connect(to, &o, buf)?;
        if !l.ws {
            l.send(&hello).map_err(|e| e.to_string())?;
        }
        Ok(l)
    };
    let mut s = dial(&o.addr, &mut buf)?;
    let start = Instant::now();
    let mut ping_every = Duration::from_millis(if o.ping_ms > 0 { o.ping_ms } else { 25_000 });
    let mut next_ping = Instant::now() + ping_every;
    let mut seq = 1u64;
    let mut pushes = 0u64;
    // REDIRECTs followed since the last HELLO answer (a loop of them ends the client).
    let mut redirects = 0u64;
    let mut chunk = vec![0u8; 1 << 16];
    let stdout = io::stdout();
    // Admitted on this link (its HELLO answer came); else, the ERROR that refused it. A
    // link that ends before it was admitted is a failure (exit 1), so scripts can tell.
    let mut admitted = false;
    let mut refusal: Option<String> = None;
    let refused = |why: &Option<String>| match why {
        Some(w) => format!("refused by the gateway: {w}"),
        None => "the gateway closed before admitting the client".to_string(),
    };
    loop {
        let mut at = 0;
        let mut moved = None;
        loop {
            let (got, used) = s.next(&buf[at..])?;
            at += used;
            let Some(got) = got else { break };
            let f = match got {
                Got::Frame(f) => f,
                Got::Closed(code, reason) => {
                    if !admitted {
                        return Err(refused(&refusal));
                    }
                    eprintln!("connection closed by the gateway: {code} {reason}");
                    return Ok(());
                }
            };
            let _ = writeln!(stdout.lock(), "{}", frame_json(&f));
            if f.service == 0 && f.method == method::ERROR && !admitted {
                let code = f.header("code").unwrap_or("");
                refusal = Some(format!("{code} {}", f.header("message").unwrap_or("")));
            }
            if f.service == 0 && f.method == method::REDIRECT {
                // The gateway moves us (a drain): to its endpoint, else the usual address.
                let to = f.header("endpoint").filter(|e| !e.is_empty());
                moved = Some(to.unwrap_or(&o.addr).to_string());
                break;
            }
            if f.service == 0 && f.method == method::HELLO {
                redirects = 0; // admitted where it was sent
                admitted = true;
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
                    s.send(&Frame::control(method::ACK, f.seqid, &[]))
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
            buf.clear();
            s = match dial(&to, &mut buf) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}; back to {}", o.addr);
                    buf.clear();
                    dial(&o.addr, &mut buf)?
                }
            };
            next_ping = Instant::now() + ping_every;
            (admitted, refusal) = (false, None);
            continue;
        }
        let now = Instant::now();
        if o.duration_ms > 0 && now >= start + Duration::from_millis(o.duration_ms) {
            if !admitted {
                return Err("not admitted within --duration-ms".into());
            }
            return Ok(());
        }
        if now >= next_ping {
            seq += 1;
            s.send(&Frame::control(method::PING, seq, &[]))
                .map_err(|e| e.to_string())?;
            next_ping = now + ping_every;
        }
        let wait = next_ping
            .saturating_duration_since(now)
            .max(Duration::from_millis(1))
            .min(Duration::from_millis(200));
        s.s.set_read_timeout(wait).map_err(|e| e.to_string())?;
        match s.s.read(&mut chunk) {
            Ok(0) => {
                if !admitted {
                    return Err(refused(&refusal));
                }
                eprintln!("connection closed by the gateway");
                return Ok(());
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_escaped_and_upgrade_answers_checked() {
        assert_eq!(query_escape("a b&c=d/é~"), "a%20b%26c%3Dd%2F%C3%A9~");
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
                  Sec-WebSocket-Protocol: pbbp2\r\n\r\n";
        assert_eq!(check_upgrade_answer(ok, key), Ok(()));
        assert!(check_upgrade_answer(&ok.replace("s3pP", "x3pP"), key).is_err());
        assert!(check_upgrade_answer(&ok.replace("pbbp2", "other"), key).is_err());
        let refused = "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            check_upgrade_answer(refused, key),
            Err("the gateway refused the upgrade: HTTP/1.1 401 Unauthorized".into())
        );
    }
}
