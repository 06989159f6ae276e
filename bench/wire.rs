//! A client connection speaking Frames over TCP (HELLO first) or WebSocket (pbbp2, or raw
//! for abusers that only need the upgrade), with blocking reads under a read timeout: the
//! chaos scenario's clients and the batch scenario's bystander.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use prost::Message;

use longlink::codec;
use longlink::proto::{method, Frame};

use crate::child::{ws_frame, ws_next};
use crate::util::http_message;
use crate::Common;

/// A client connection speaking Frames over TCP or pbbp2 WebSocket.
pub(crate) struct Wire {
    pub(crate) s: TcpStream,
    pub(crate) ws: bool,
    pub(crate) buf: Vec<u8>,
}

impl Wire {
    pub(crate) fn tcp(c: &Common, device: &str) -> Result<Wire, String> {
        let s = TcpStream::connect(&c.tcp).map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut w = Wire {
            s,
            ws: false,
            buf: vec![],
        };
        let hello = Frame::control(
            method::HELLO,
            1,
            &[
                ("app_id", &c.app),
                ("device_id", device),
                ("token", &c.token),
            ],
        );
        w.send(&hello).map_err(|e| e.to_string())?;
        w.expect_hello()?;
        Ok(w)
    }

    pub(crate) fn ws(c: &Common, device: &str, pbbp2: bool) -> Result<Wire, String> {
        let mut s = TcpStream::connect(&c.http).map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.write_all(upgrade(c, device, pbbp2).as_bytes())
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut buf = vec![];
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some((head, _)) = http_message(&buf) {
                break head + 4;
            }
            match s.read(&mut chunk) {
                Ok(0) => return Err("closed during the upgrade".into()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("upgrade: {e}")),
            }
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            return Err(format!(
                "upgrade refused: {}",
                String::from_utf8_lossy(&buf[..end])
            ));
        }
        buf.drain(..end);
        let mut w = Wire { s, ws: true, buf };
        if pbbp2 {
            w.expect_hello()?;
        }
        Ok(w)
    }

    pub(crate) fn expect_hello(&mut self) -> Result<(), String> {
        self.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        match self.next()? {
            Some(f) if f.service == 0 && f.method == method::HELLO => Ok(()),
            other => Err(format!("HELLO answered {other:?}")),
        }
    }

    pub(crate) fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        let mut out = vec![];
        if self.ws {
            ws_frame(2, &f.encode_to_vec(), &mut out);
        } else {
            codec::encode_tcp(f, &mut out).map_err(std::io::Error::other)?;
        }
        self.s.write_all(&out)
    }

    /// The next frame, None when the read timeout passes first; Err when the connection
    /// ends or sends something that is not a frame.
    pub(crate) fn next(&mut self) -> Result<Option<Frame>, String> {
        loop {
            if self.ws {
                while let Some((op, r, used)) = ws_next(&self.buf) {
                    let body = self.buf[r].to_vec();
                    self.buf.drain(..used);
                    match op {
                        2 => {
                            return Frame::decode(&body[..])
                                .map(Some)
                                .map_err(|e| e.to_string())
                        }
                        9 => {
                            let mut out = vec![];
                            ws_frame(10, &body, &mut out);
                            self.s.write_all(&out).map_err(|e| e.to_string())?;
                        }
                        8 => {
                            return Err(format!(
                                "closed by the gateway: {}",
                                String::from_utf8_lossy(&body)
                            ))
                        }
                        _ => {}
                    }
                }
            } else if let Some((body, used)) =
                codec::decode_tcp(&self.buf, codec::MAX_TCP_FRAME).map_err(|e| e.to_string())?
            {
                let f = Frame::decode(body).map_err(|e| e.to_string())?;
                self.buf.drain(..used);
                return Ok(Some(f));
            }
            let mut chunk = [0u8; 16384];
            match self.s.read(&mut chunk) {
                Ok(0) => return Err("the gateway closed the connection".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

pub(crate) fn upgrade(c: &Common, device: &str, pbbp2: bool) -> String {
    format!(
        "GET /ws?app_id={}&device_id={device}&token={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{}\r\n",
        c.app,
        c.token,
        c.http,
        if pbbp2 { "Sec-WebSocket-Protocol: pbbp2\r\n" } else { "" }
    )
}
