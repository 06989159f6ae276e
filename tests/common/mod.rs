//! Test harness: the real `longlink` binary on loopback, a framed TCP client that reads in
//! loops with deadlines, and a minimal HTTP/1.1 client for the internal API.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use longlink::codec;
use longlink::proto::{method, Frame};
use prost::Message;

pub const T: Duration = Duration::from_secs(5);

pub struct Gateway {
    pub child: Child,
    pub tcp: String,
    pub api: String,
    pub http: String,
    /// The `listening` line (other listeners: `tcp_tls`, `https`).
    pub listening: serde_json::Value,
    pub pid: u32,
    /// Later lines of the process's stdout (a live upgrade's new `listening` line).
    pub lines: std::sync::mpsc::Receiver<String>,
    pub dir: Option<TempDir>,
}

pub struct TempDir(pub std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(tag: &str) -> TempDir {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("longlink-test-{}-{tag}-{n}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

impl Gateway {
    /// Dev mode (no config file), every listener on a free port.
    pub fn dev() -> Gateway {
        Gateway::spawn(None, &[])
    }

    /// With a config file (its [listen] section is overridden by free ports).
    pub fn with_config(toml: &str) -> Gateway {
        Gateway::spawn(Some(toml), &[])
    }

    pub fn spawn(toml: Option<&str>, extra: &[&str]) -> Gateway {
        Gateway::spawn_env(toml, extra, &[])
    }

    /// `spawn`, with environment variables set for the process.
    pub fn spawn_env(toml: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> Gateway {
        let dir = temp_dir("gw");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_longlink"));
        cmd.envs(env.iter().copied());
        cmd.arg("serve");
        if let Some(t) = toml {
            let p = dir.0.join("longlink.toml");
            std::fs::write(&p, t).unwrap();
            cmd.arg("--config").arg(p);
        }
        let has = |f: &str| extra.contains(&f);
        if !has("--tcp") {
            cmd.args(["--tcp", "127.0.0.1:0"]);
        }
        if !has("--api") {
            cmd.args(["--api", "127.0.0.1:0"]);
        }
        if !has("--http") {
            cmd.args(["--http", ""]);
        }
        cmd.args(["--log-level", "warn"]).args(extra);
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn longlink");
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).expect("listening line");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("bad listening line {line:?}: {e}"));
        assert_eq!(v["event"], "listening");
        Gateway {
            pid: v["pid"].as_u64().unwrap() as u32,
            tcp: v["tcp"].as_str().unwrap_or("").to_string(),
            api: v["api"].as_str().unwrap_or("").to_string(),
            http: v["http"].as_str().unwrap_or("").to_string(),
            listening: v,
            child,
            lines,
            dir: Some(dir),
        }
    }

    /// `spawn` with both TLS listeners on free ports (`tcp_tls`, `https` in `listening`),
    /// serving the test certificate (tests/keys).
    pub fn spawn_tls(toml: Option<&str>, extra: &[&str]) -> Gateway {
        let (cert, key, _) = tls_files();
        let mut args = vec![
            "--tcp-tls",
            "127.0.0.1:0",
            "--https",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ];
        args.extend_from_slice(extra);
        Gateway::spawn(toml, &args)
    }

    /// A listener's address from the `listening` line (`tcp_tls`, `https`).
    pub fn addr(&self, name: &str) -> String {
        self.listening[name].as_str().unwrap_or("").to_string()
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.tcp)
    }

    /// Connect and say HELLO to app demo as `device`; returns the client and its conn id.
    pub fn hello(&self, device: &str, user: Option<&str>) -> (Client, String) {
        let mut c = self.connect();
        let id = c.hello("demo", device, "demo-token", user);
        (c, id)
    }

    pub fn api(&self, method: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
        api_call(&self.api, method, path, body, &[])
    }

    pub fn metrics(&self) -> HashMap<String, f64> {
        let (status, text) = http_raw(&self.api, "GET", "/metrics", b"", &[]);
        assert_eq!(status, 200);
        String::from_utf8(text)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    pub fn metric(&self, key: &str) -> f64 {
        *self
            .metrics()
            .get(key)
            .unwrap_or_else(|| panic!("no metric {key}"))
    }

    /// Polls `f` until it holds or the deadline passes.
    pub fn wait_until(&self, what: &str, mut f: impl FnMut(&Gateway) -> bool) {
        let end = Instant::now() + T;
        while Instant::now() < end {
            if f(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("timed out waiting for {what}");
    }

    /// Resident memory of the gateway process, in bytes.
    pub fn rss(&self) -> u64 {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.pid)).unwrap();
        statm
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 4096
    }

    /// SIGHUP, then the new process's `listening` line: checks it names the old pid in
    /// `upgraded_from` and follows the new pid from then on.
    pub fn upgrade(&mut self) -> serde_json::Value {
        let old = self.pid;
        self.signal(libc::SIGHUP);
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(15))
            .expect("a listening line from the new process");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "listening", "{line}");
        assert_eq!(v["upgraded_from"], old, "{line}");
        self.pid = v["pid"].as_u64().unwrap() as u32;
        assert_ne!(self.pid, old);
        v
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid as i32, sig) };
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("gateway did not exit within {within:?}");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.pid != self.child.id() {
            // A process this one upgraded into (no longer our child).
            // SAFETY: a pid this test started (through the gateway).
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One read into `buf` with what is left until `end`: Ok(false) once `end` has passed,
/// `Err(())` on EOF or reset (the `try_*` readers' step).
fn read_before(s: &mut TcpStream, buf: &mut Vec<u8>, end: Instant) -> Result<bool, ()> {
    let left = end.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(false);
    }
    s.set_read_timeout(Some(left)).unwrap();
    let mut chunk = [0u8; 65536];
    match s.read(&mut chunk) {
        Ok(0) => Err(()),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(true),
        Err(_) => Err(()),
    }
}

/// Reads more bytes into `buf`; false on EOF or reset; panics once `end` passes.
fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, end: Instant, what: &str) -> bool {
    loop {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {what} in time");
        s.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 65536];
        match s.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return false,
            Err(e) => panic!("read: {e}"),
        }
    }
}

pub struct Client {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: &str) -> Client {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nodelay(true).unwrap();
        Client { s, buf: vec![] }
    }

    /// A client on a connection made some other way (e.g. [`narrow_stream`]).
    pub fn on(s: TcpStream) -> Client {
        s.set_nodelay(true).unwrap();
        Client { s, buf: vec![] }
    }

    pub fn send(&mut self, f: &Frame) {
        let mut b = vec![];
        codec::encode_tcp(f, &mut b).unwrap();
        self.s.write_all(&b).unwrap();
    }

    pub fn send_raw(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Next frame, None on EOF/reset; panics if nothing arrives within `within`.
    pub fn recv_within(&mut self, within: Duration) -> Option<Frame> {
        let end = Instant::now() + within;
        loop {
            if let Some((body, used)) = codec::decode_tcp(&self.buf, 65535).unwrap() {
                let f = Frame::decode(body).expect("gateway sent a bad frame");
                self.buf.drain(..used);
                return Some(f);
            }
            if !fill(&mut self.s, &mut self.buf, end, "a frame") {
                return None;
            }
        }
    }

    /// The next frame if one arrives within `within`: `Ok(None)` when none does, `Err(())`
    /// on EOF or reset.
    pub fn try_recv(&mut self, within: Duration) -> Result<Option<Frame>, ()> {
        let end = Instant::now() + within;
        loop {
            if let Some((body, used)) = codec::decode_tcp(&self.buf, 65535).unwrap() {
                let f = Frame::decode(body).expect("gateway sent a bad frame");
                self.buf.drain(..used);
                return Ok(Some(f));
            }
            if !read_before(&mut self.s, &mut self.buf, end)? {
                return Ok(None);
            }
        }
    }

    pub fn recv(&mut self) -> Frame {
        self.recv_within(T)
            .expect("connection closed while waiting for a frame")
    }

    /// Asserts the gateway closes this connection (EOF) within `within`, skipping nothing:
    /// any frame before the EOF is returned for inspection.
    pub fn frames_until_eof(&mut self, within: Duration) -> Vec<Frame> {
        let end = Instant::now() + within;
        let mut v = vec![];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.recv_within(left.max(Duration::from_millis(1))) {
                Some(f) => v.push(f),
                None => return v,
            }
        }
    }

    pub fn hello(&mut self, app: &str, device: &str, token: &str, user: Option<&str>) -> String {
        let mut h = vec![("app_id", app), ("device_id", device), ("token", token)];
        if let Some(u) = user {
            h.push(("user_id", u));
        }
        self.send(&Frame::control(method::HELLO, 1, &h));
        let f = self.recv();
        assert_eq!(
            (f.service, f.method),
            (0, method::HELLO),
            "expected HELLO, got {f:?}"
        );
        f.header("conn_id").expect("conn_id").to_string()
    }

    /// A PING/PONG round trip: everything the gateway queued before it has been read by the
    /// time the PONG arrives, so frames returned here are all that was pending.
    pub fn drain_with_ping(&mut self, seq: u64) -> Vec<Frame> {
        self.send(&Frame::control(method::PING, seq, &[]));
        let mut before = vec![];
        loop {
            let f = self.recv();
            if f.service == 0 && f.method == method::PONG && f.seqid == seq {
                return before;
            }
            before.push(f);
        }
    }
}

/// Runs a client script of tests/clients/ (`tool`: node, python3) against `gw` (`--http`,
/// `--api`, then `extra`): whether it passed, its stdout, its stderr.
pub fn run_client_raw(
    tool: &str,
    script: &str,
    gw: &Gateway,
    extra: &[&str],
) -> (bool, String, String) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");
    let out = Command::new(tool)
        .arg(format!("{dir}/{script}"))
        .args(["--http", &gw.http, "--api", &gw.api])
        .args(extra)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} ({e}); run scripts/deps.sh"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `run_client_raw`, asserting the script passed; its stdout.
pub fn run_client(tool: &str, script: &str, gw: &Gateway, extra: &[&str]) -> String {
    let (ok, so, se) = run_client_raw(tool, script, gw, extra);
    assert!(ok, "{script} failed; run scripts/deps.sh if a module is missing\n--- stdout\n{so}\n--- stderr\n{se}");
    so
}

/// A one-check `tests/clients` script (a page in Chromium) against a dev-mode gateway with
/// its HTTP listener: it must pass.
pub fn dev_script_passes(script: &str) {
    let gw = gateway_http(None);
    let so = run_client("node", script, &gw, &[]);
    assert!(so.contains("1 passed, 0 failed"), "{so}");
}

pub fn http_raw(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> (u16, Vec<u8>) {
    http_raw_within(addr, method, path, body, headers, T)
}

/// `http_raw`, waiting up to `timeout` for the answer (a request the server holds, such as a
/// push with `wait_ms`, needs its wait and then some).
pub fn http_raw_within(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
    timeout: Duration,
) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    // One write, no Nagle: a head and body in two small segments would wait on delayed ACKs.
    s.set_nodelay(true).unwrap();
    let mut all = req.into_bytes();
    all.extend_from_slice(body);
    s.write_all(&all).unwrap();
    let mut resp = vec![];
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp);
    let status: u16 = text.get(9..12).unwrap_or("0").parse().unwrap_or(0);
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(resp.len());
    (status, resp[split..].to_vec())
}

pub fn api_call(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    api_call_within(addr, method, path, body, headers, T)
}

/// `api_call`, waiting up to `timeout` for the answer.
pub fn api_call_within(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
    timeout: Duration,
) -> (u16, serde_json::Value) {
    let (status, body) = http_raw_within(addr, method, path, body, headers, timeout);
    let v = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{method} {path}: not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, v)
}

/// A connection to `addr` whose receive window is a few KB — a client that reads slowly or
/// not at all, so the gateway (not the kernel) holds what is sent to it. Segments are kept
/// small too: a window under one loopback segment (64 KB) would stall the peer on
/// silly-window avoidance once reading starts.
pub fn narrow_stream(addr: &str) -> TcpStream {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.set_mss(1400).unwrap();
    s.connect(&addr.into()).unwrap();
    s.into()
}

pub fn config(extra: &str) -> String {
    format!(
        "node_id = \"n1\"\n{extra}\n[[apps]]\nid = \"demo\"\ntokens = [\"demo-token\"]\ndefault_service = 1\n[[apps.services]]\nid = 1\nurl = \"builtin:echo\"\n"
    )
}

/// Dev mode with the client HTTP listener (WebSocket, long-poll) on a free port.
pub fn gateway_http(toml: Option<&str>) -> Gateway {
    Gateway::spawn(toml, &["--http", "127.0.0.1:0"])
}

/// A minimal WebSocket client that sends exactly the bytes a test asks for (masked frames,
/// or deliberately broken ones) and reads server frames with deadlines.
pub struct Ws {
    pub s: TcpStream,
    buf: Vec<u8>,
    /// The 101 answer's status line and headers.
    pub head: String,
}

pub struct WsFrame {
    pub fin: bool,
    /// RSV1: a permessage-deflate compressed message.
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl WsFrame {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.payload).expect("UTF-8")
    }
    /// For a close frame: (code, reason).
    pub fn close(&self) -> (u16, String) {
        assert_eq!(self.opcode, 8, "not a close frame");
        if self.payload.len() < 2 {
            return (1005, String::new());
        }
        (
            u16::from_be_bytes([self.payload[0], self.payload[1]]),
            String::from_utf8_lossy(&self.payload[2..]).into(),
        )
    }
}

impl Ws {
    /// Upgrades `GET {path}`; Err((status, body)) when the gateway refuses.
    pub fn connect(addr: &str, path: &str, headers: &[(&str, &str)]) -> Result<Ws, (u16, String)> {
        Ws::upgrade(TcpStream::connect(addr).unwrap(), addr, path, headers)
    }

    /// Upgrades `GET {path}` on a connection made some other way.
    pub fn upgrade(
        mut s: TcpStream,
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Ws, (u16, String)> {
        s.set_nodelay(true).unwrap();
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = vec![];
        let end = Instant::now() + T;
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            assert!(Instant::now() < end, "no handshake answer");
            s.set_read_timeout(Some(T)).unwrap();
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).unwrap();
            if n == 0 {
                return Err((0, "closed".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let status: u16 = head.get(9..12).unwrap_or("0").parse().unwrap_or(0);
        if status != 101 {
            // Read the rest of the body (the gateway closes after a refusal).
            let mut rest = buf[head_end..].to_vec();
            let _ = s.read_to_end(&mut rest);
            return Err((status, format!("{head}{}", String::from_utf8_lossy(&rest))));
        }
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{head}"
        );
        let rest = buf[head_end..].to_vec();
        let mut ws = Ws { s, buf: rest, head };
        ws.buf.shrink_to_fit();
        Ok(ws)
    }

    pub fn frame_bytes(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![];
        longlink::ws::encode_client_frame(&mut v, fin, opcode, [0x37, 0xfa, 0x21, 0x3d], payload);
        v
    }

    pub fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let b = Ws::frame_bytes(fin, opcode, payload);
        self.s.write_all(&b).unwrap();
    }

    pub fn text(&mut self, t: &str) {
        self.send(true, 1, t.as_bytes());
    }

    pub fn send_raw(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// A whole server frame from what was read, if there is one.
    fn take_frame(&mut self) -> Option<WsFrame> {
        if self.buf.len() < 2 {
            return None;
        }
        let (b0, b1) = (self.buf[0], self.buf[1]);
        assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
        let (len, at) = match b1 & 0x7f {
            126 if self.buf.len() >= 4 => {
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 if self.buf.len() >= 10 => (
                u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if self.buf.len() < at + len {
            return None;
        }
        let f = WsFrame {
            fin: b0 & 0x80 != 0,
            rsv1: b0 & 0x40 != 0,
            opcode: b0 & 0x0f,
            payload: self.buf[at..at + len].to_vec(),
        };
        self.buf.drain(..at + len);
        Some(f)
    }

    /// Next server frame; None on EOF/reset; panics after `within`.
    pub fn recv_within(&mut self, within: Duration) -> Option<WsFrame> {
        let end = Instant::now() + within;
        loop {
            if let Some(f) = self.take_frame() {
                return Some(f);
            }
            if !fill(&mut self.s, &mut self.buf, end, "a WebSocket frame") {
                return None;
            }
        }
    }

    /// The next frame if one arrives within `within`: `Ok(None)` when none does, `Err(())`
    /// on EOF or reset.
    pub fn try_recv(&mut self, within: Duration) -> Result<Option<WsFrame>, ()> {
        let end = Instant::now() + within;
        loop {
            if let Some(f) = self.take_frame() {
                return Ok(Some(f));
            }
            if !read_before(&mut self.s, &mut self.buf, end)? {
                return Ok(None);
            }
        }
    }

    pub fn recv(&mut self) -> WsFrame {
        self.recv_within(T)
            .expect("closed while waiting for a WebSocket frame")
    }

    /// Expects a close frame with `code`, then EOF.
    pub fn expect_close(&mut self, code: u16) -> String {
        let f = self.recv();
        let (got, reason) = f.close();
        assert_eq!(got, code, "close code (reason {reason:?})");
        assert!(self.recv_within(T).is_none(), "more after the close frame");
        reason
    }
}

/// One keep-alive HTTP/1.1 connection (a browser reusing its connection, an API client
/// pipelining): requests are written as given, answers read in order with deadlines.
pub struct KeepAlive {
    pub s: TcpStream,
    buf: Vec<u8>,
}

/// An HTTP answer: status, head (status line and headers) and body.
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

impl KeepAlive {
    pub fn connect(addr: &str) -> KeepAlive {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nodelay(true).unwrap();
        KeepAlive { s, buf: vec![] }
    }

    /// Writes one request (keep-alive; `Content-Length` added).
    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let mut all = req.into_bytes();
        all.extend_from_slice(body);
        self.s.write_all(&all).unwrap();
    }

    /// The next whole answer in the buffer, if there is one.
    fn parse(&mut self) -> Option<Answer> {
        let end = self.buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        if self.buf.len() < end + len {
            return None;
        }
        let body = self.buf[end..end + len].to_vec();
        self.buf.drain(..end + len);
        Some(Answer {
            status: head.get(9..12).unwrap_or("0").parse().unwrap_or(0),
            head,
            body,
        })
    }

    /// The next answer if one arrives within `within`; `Err(())` when the connection is
    /// closed first.
    pub fn try_answer(&mut self, within: Duration) -> Result<Option<Answer>, ()> {
        let end = Instant::now() + within;
        loop {
            if let Some(a) = self.parse() {
                return Ok(Some(a));
            }
            if !read_before(&mut self.s, &mut self.buf, end)? {
                return Ok(None);
            }
        }
    }

    /// The next answer; panics if none arrives within 10 s or the connection closes.
    pub fn answer(&mut self) -> Answer {
        self.try_answer(Duration::from_secs(10))
            .expect("the connection closed before its answer")
            .expect("no answer within 10 s")
    }
}

/// A small deterministic generator for soak tests' choices.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// The test TLS files (tests/keys/README.md): certificate chain, key, and the CA to trust.
pub fn tls_files() -> (String, String, String) {
    let k = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
    (
        format!("{k}/tls_cert.pem"),
        format!("{k}/tls_key.pem"),
        format!("{k}/tls_ca.pem"),
    )
}

/// Reads HTTP answers until the server closes; returns them and their status codes in
/// order (`what` names what was expected, for a read that times out instead).
pub fn answers_until_close(s: &mut TcpStream, what: &str) -> (String, Vec<String>) {
    let mut got = String::new();
    std::io::Read::read_to_string(s, &mut got).expect(what);
    let statuses = got
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| got[i + 9..i + 12].to_string())
        .collect();
    (got, statuses)
}
