//! TCP transport framing (docs/PROTOCOL.md, "TCP transport"): `[u16 big-endian length][Frame bytes]`.
//!
//! Pure functions over byte slices: no sockets, clocks or logs, so they are unit-tested byte by
//! byte and fuzzed. Incomplete input is `Ok(None)` and consumes nothing.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use prost::Message;
use thiserror::Error;

use crate::proto::Frame;

/// Bytes of the length prefix.
pub const PREFIX: usize = 2;
/// The largest frame the u16 prefix can describe.
pub const MAX_TCP_FRAME: usize = u16::MAX as usize;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("zero-length frame")]
    Empty,
}

/// Cuts one frame off the front of `buf`. Returns the frame's bytes and how many bytes of
/// `buf` it used. The length is bounded before anything is buffered for it.
pub fn decode_tcp(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, FrameError> {
    if buf.len() < PREFIX {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { size: len, max });
    }
    if buf.len() < PREFIX + len {
        return Ok(None);
    }
    Ok(Some((&buf[PREFIX..PREFIX + len], PREFIX + len)))
}

/// Appends a whole frame, length-prefixed, to `out`; a frame the u16 prefix cannot
/// describe is refused and nothing is written (a cut length would desynchronise the stream).
pub fn encode_tcp(frame: &Frame, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = frame.encoded_len();
    if len > MAX_TCP_FRAME {
        return Err(FrameError::TooLarge {
            size: len,
            max: MAX_TCP_FRAME,
        });
    }
    out.extend_from_slice(&(len as u16).to_be_bytes());
    frame.encode(out).expect("Vec grows");
    Ok(())
}

/// The HELLO answer on the TCP transport, written straight into `out` (length prefix, then
/// the Frame): `seqid`, method HELLO, the `conn_id` header, then `tail`, the headers every
/// answer shares, encoded once (`encoded_headers`). Byte for byte what encoding the Frame
/// gives (a test checks), without building one: a connect pays no allocation for it.
pub fn encode_hello_tcp(seqid: u64, conn_id: &str, tail: &[u8], out: &mut Vec<u8>) {
    use prost::encoding::{encode_varint, encoded_len_varint};
    let id = conn_id.len() as u64;
    // Header { key = 1: "conn_id", value = 2: conn_id }
    let header = 2 + 7 + 1 + encoded_len_varint(id) + conn_id.len();
    let body = if seqid != 0 {
        1 + encoded_len_varint(seqid)
    } else {
        0
    } + 1
        + encoded_len_varint(crate::proto::method::HELLO as u64)
        + 1
        + encoded_len_varint(header as u64)
        + header
        + tail.len();
    debug_assert!(body <= MAX_TCP_FRAME);
    out.reserve(PREFIX + body);
    out.extend_from_slice(&(body as u16).to_be_bytes());
    if seqid != 0 {
        out.push(0x08); // field 1, varint
        encode_varint(seqid, out);
    }
    out.push(0x20); // field 4, varint
    encode_varint(crate::proto::method::HELLO as u64, out);
    out.push(0x2a); // field 5, length-delimited
    encode_varint(header as u64, out);
    out.extend_from_slice(&[0x0a, 7]);
    out.extend_from_slice(b"conn_id");
    out.push(0x12);
    encode_varint(id, out);
    out.extend_from_slice(conn_id.as_bytes());
    out.extend_from_slice(tail);
}

/// A HELLO read without decoding it into a Frame (no allocation): the connect path's
/// first frame. None for anything else, or anything this reader does not take exactly as
/// prost would (an unknown field, a wrong wire type, bad UTF-8, a cut): the caller then
/// decodes the Frame as usual, with its errors. Scalar fields repeated: the last wins, as
/// in prost. Of the headers it keeps only the credentials' (the first of each name, as
/// `Frame::header` finds them); a HELLO's other headers mean nothing to the gateway.
#[derive(Debug, PartialEq, Eq)]
pub struct HelloView<'a> {
    pub seqid: u64,
    creds: [Option<&'a str>; 4],
}

/// Where a credential header's value is kept in a `HelloView`.
fn cred_slot(key: &str) -> Option<usize> {
    match key {
        "app_id" => Some(0),
        "device_id" => Some(1),
        "token" => Some(2),
        "user_id" => Some(3),
        _ => None,
    }
}

impl<'a> HelloView<'a> {
    pub fn parse(body: &'a [u8]) -> Option<HelloView<'a>> {
        let mut v = HelloView {
            seqid: 0,
            creds: [None; 4],
        };
        let (mut service, mut method) = (0u64, 0u64);
        let mut b = body;
        while !b.is_empty() {
            let key = varint(&mut b)?;
            match (key >> 3, key & 7) {
                (1, 0) => v.seqid = varint(&mut b)?,
                (2, 0) => {
                    varint(&mut b)?;
                }
                (3, 0) => service = varint(&mut b)?,
                (4, 0) => method = varint(&mut b)?,
                (5, 2) => {
                    let h = bytes(&mut b)?;
                    let (k, value) = match canonical_header(h) {
                        Some(kv) => kv,
                        None => header(h)?,
                    };
                    if let Some(i) = cred_slot(k) {
                        v.creds[i].get_or_insert(value);
                    }
                }
                _ => return None,
            }
        }
        // (prost reads int32 from a varint's low 32 bits.)
        let hello = crate::proto::method::HELLO as u32;
        (service as u32 == 0 && method as u32 == hello).then_some(v)
    }

    /// The first header named `key`, as `Frame::header`, for the credentials' names
    /// (`app_id`, `device_id`, `token`, `user_id`); None for any other.
    pub fn header(&self, key: &str) -> Option<&'a str> {
        self.creds[cred_slot(key)?]
    }
}

/// A protobuf varint (at most 10 bytes), taken from the front of `b`. A HELLO's are nearly
/// all one byte (tags, lengths): that case inline, the rest out of line.
#[inline]
fn varint(b: &mut &[u8]) -> Option<u64> {
    match b.first() {
        Some(&byte) if byte < 0x80 => {
            *b = &b[1..];
            Some(u64::from(byte))
        }
        _ => varint_long(b),
    }
}

#[inline(never)]
fn varint_long(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let byte = *b.get(i)?;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            if i == 9 && byte > 1 {
                return None; // past 64 bits: prost refuses it
            }
            *b = &b[i + 1..];
            return Some(v);
        }
    }
    None
}

/// The offset of the first top-level field numbered `from` or more in an encoded message
/// (its end when there is none); None if it does not parse.
fn first_field_from(msg: &[u8], from: u64) -> Option<usize> {
    let mut b = msg;
    while !b.is_empty() {
        let at = msg.len() - b.len();
        let key = varint(&mut b)?;
        if key >> 3 >= from {
            return Some(at);
        }
        match key & 7 {
            0 => {
                varint(&mut b)?;
            }
            1 => b = b.get(8..)?,
            2 => {
                bytes(&mut b)?;
            }
            5 => b = b.get(4..)?,
            _ => return None,
        }
    }
    Some(msg.len())
}

/// A length-delimited field's bytes, taken from the front of `b`.
fn bytes<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = usize::try_from(varint(b)?).ok()?;
    let (h, rest) = (b.get(..n)?, b.get(n..)?);
    *b = rest;
    Some(h)
}

/// A Header message as every encoder writes it (key, then value, each once, each shorter
/// than 128 bytes): read without the general loop — the connect path reads three of
/// them. None for any other shape, which `header` then reads (or refuses) as prost would.
#[inline]
fn canonical_header(h: &[u8]) -> Option<(&str, &str)> {
    let [0x0a, kl, rest @ ..] = h else {
        return None;
    };
    let kl = usize::from(*kl);
    if kl >= 0x80 || rest.len() < kl + 2 {
        return None;
    }
    let (k, rest) = rest.split_at(kl);
    let [0x12, vl, v @ ..] = rest else {
        return None;
    };
    if *vl >= 0x80 || v.len() != usize::from(*vl) {
        return None;
    }
    Some((utf8(k)?, utf8(v)?))
}

/// A Header message: key (1) and value (2), strings; the last of each wins, as in prost.
fn header(mut b: &[u8]) -> Option<(&str, &str)> {
    let (mut k, mut v) = ("", "");
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let s = match (key >> 3, key & 7) {
            (1 | 2, 2) => utf8(bytes(&mut b)?)?,
            _ => return None,
        };
        if key >> 3 == 1 {
            k = s;
        } else {
            v = s;
        }
    }
    Some((k, v))
}

/// A string field's text, as prost takes it (valid UTF-8). Short ASCII, what ids and tokens
/// nearly always are, is checked by the cheaper test.
#[inline]
fn utf8(b: &[u8]) -> Option<&str> {
    if b.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(b) })
    } else {
        std::str::from_utf8(b).ok()
    }
}

/// `headers` encoded as a Frame's field 5 entries, and nothing else (see
/// `encode_hello_tcp`).
pub fn encoded_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    Frame::control(0, 0, headers).encode_to_vec()
}

/// A frame encoded once and shared by every recipient: the Frame with `seqid` left at 0, so
/// its field 1 is absent. Each connection prepends its own length prefix and `seqid` field
/// (see [`Shared::write_tcp`]); as field 1 sorts first, the result is byte-identical to
/// encoding the whole frame per connection, at the cost of a few bytes' copy.
#[derive(Clone, Debug)]
pub struct Shared {
    body: Bytes,
    /// The payload alone, for raw WebSocket clients.
    payload: Bytes,
    /// Raw WebSocket: send as a text message (payload_type text/json and valid UTF-8).
    text: bool,
    /// permessage-deflate: the body (pbbp2) and the payload (raw), each with a full and a
    /// small window, compressed on first use and shared by every compressed recipient (None:
    /// it does not shrink).
    packed: Arc<[OnceLock<Option<Bytes>>; 4]>,
}

/// Worst-case bytes a connection adds in front of a shared body: prefix, tag, 10-byte varint.
pub const SHARED_OVERHEAD: usize = PREFIX + 1 + 10;

/// Room an `ack=1` push keeps for the `push_id` header the reactor adds once the push's
/// order is drawn (`<16 hex digits>.<node id of at most 32 bytes>`, 49 bytes): the header
/// entry is at most 2 + (2 + 7) + (2 + 49) = 62 bytes.
pub const PUSH_ID_RESERVE: usize = 64;

impl Shared {
    /// Encodes `frame` without its seqid.
    pub fn new(f: &Frame) -> Shared {
        let textual = matches!(f.payload_type.as_str(), "text" | "json");
        // Field 1 (seqid) comes first on the wire: encoded as it is and cut off, rather
        // than encoding a clone (each header's two strings copied for every push).
        let mut body = f.encode_to_vec();
        if f.seqid != 0 {
            debug_assert_eq!(body[0], 0x08, "field 1, varint, first");
            body.drain(..1 + prost::encoding::encoded_len_varint(f.seqid));
        }
        let body = Bytes::from(body);
        // The payload is the last field on the wire (tag 8): raw WebSocket clients get that
        // tail of the body, so a push holds its payload once, not twice.
        let n = f.payload.len();
        let payload = if body.ends_with(&f.payload) {
            body.slice(body.len() - n..)
        } else {
            f.payload.clone()
        };
        Shared {
            text: textual && std::str::from_utf8(&payload).is_ok(),
            body,
            payload,
            packed: Arc::default(),
        }
    }

    /// The frame back (seqid 0), for reports about it; not for the hot path.
    pub fn frame(&self) -> Frame {
        Frame::decode(&self.body[..]).unwrap_or_default()
    }

    /// The encoded frame without its seqid (what a durable record keeps).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// A body kept elsewhere (a durable record) back as a frame to send; None if it does
    /// not decode.
    pub fn from_body(body: &[u8]) -> Option<Shared> {
        Frame::decode(body).ok().map(|f| Shared::new(&f))
    }

    /// This push with one more header (`push_id` on a reliable push: see
    /// [`PUSH_ID_RESERVE`]); the payload stays the body's tail. Once per push, not per copy.
    ///
    /// The header is spliced in where prost puts it — after fields 1-5, before 6-8 — so the
    /// body is byte for byte the encoding of the frame with that header added, for one copy
    /// of the body and no decode (ack=1 pushes take this path one by one).
    pub fn add_header(&mut self, key: &str, value: &str) {
        let old = &self.body[..];
        let Some(at) = first_field_from(old, 6) else {
            // Not our own encoding (never: bodies are made by `new`). Sent as it is rather
            // than rebuilt from a decode that could only give an empty frame.
            debug_assert!(false, "a shared body that does not parse");
            return;
        };
        // Header { key = 1, value = 2 }, as prost writes it (an empty string is left out),
        // written in place: no Header and its two strings per push.
        use prost::encoding::{encode_varint, encoded_len_varint};
        let field_len = |s: &str| match s.len() {
            0 => 0,
            n => 1 + encoded_len_varint(n as u64) + n,
        };
        let entry = field_len(key) + field_len(value);
        let mut body = Vec::with_capacity(old.len() + entry + 11);
        body.extend_from_slice(&old[..at]);
        body.push(0x2a); // field 5, length-delimited
        encode_varint(entry as u64, &mut body);
        for (tag, s) in [(0x0a, key), (0x12, value)] {
            if !s.is_empty() {
                body.push(tag);
                encode_varint(s.len() as u64, &mut body);
                body.extend_from_slice(s.as_bytes());
            }
        }
        body.extend_from_slice(&old[at..]);
        let body = Bytes::from(body);
        let n = self.payload.len();
        // The payload stays the tail when it was (the fields after the splice are kept).
        if n <= old.len() && self.payload.as_ptr() == old[old.len() - n..].as_ptr() {
            self.payload = body.slice(body.len() - n..);
        }
        self.body = body;
        // Compressed copies were of the old body. Held by this push alone, the slots are
        // emptied and kept (an allocation fewer per `ack=1` push); else the clones keep
        // theirs and this one starts afresh.
        match Arc::get_mut(&mut self.packed) {
            Some(slots) => slots.iter_mut().for_each(|s| {
                s.take();
            }),
            None => self.packed = Arc::default(),
        }
    }

    /// Encoded length without the per-connection part.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// Appends `[len][field 1 = seqid][shared body]` to `out`. The caller has checked that
    /// `body_len() + SHARED_OVERHEAD` fits in a frame.
    pub fn write_tcp(&self, seqid: u64, out: &mut Vec<u8>) {
        let body = self.head(seqid, Framing::Tcp, out);
        out.extend_from_slice(body);
    }

    /// WebSocket `pbbp2`: one binary message holding the whole Frame.
    pub fn write_ws_pbbp2(&self, seqid: u64, out: &mut Vec<u8>) {
        let body = self.head(seqid, Framing::WsPbbp2, out);
        out.extend_from_slice(body);
    }

    /// WebSocket raw mode: the payload alone, as text when it is textual and UTF-8.
    pub fn write_ws_raw(&self, out: &mut Vec<u8>) {
        let body = self.head(0, Framing::WsRaw, out);
        out.extend_from_slice(body);
    }

    /// Appends a connection's own part of the frame (its length prefix or WebSocket header,
    /// and its seqid field) and returns the shared part that follows it on the wire, so that
    /// a queue can reference that part instead of copying it.
    pub fn head(&self, seqid: u64, framing: Framing, out: &mut Vec<u8>) -> &Bytes {
        let (seq, n) = seq_field(seqid);
        match framing {
            Framing::Tcp => {
                let len = n + self.body.len();
                debug_assert!(len <= MAX_TCP_FRAME);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            Framing::WsPbbp2 => {
                crate::ws::encode_header(out, true, crate::ws::op::BINARY, n + self.body.len());
            }
            Framing::WsRaw => {
                let opcode = if self.text {
                    crate::ws::op::TEXT
                } else {
                    crate::ws::op::BINARY
                };
                crate::ws::encode_header(out, true, opcode, self.payload.len());
                return &self.payload;
            }
        }
        out.extend_from_slice(&seq[..n]);
        &self.body
    }
}

impl Shared {
    /// [`Shared::head`] for a WebSocket connection with permessage-deflate: a message of at
    /// least `min` bytes that shrinks goes compressed (RSV1), its compressed form made once
    /// for every recipient. pbbp2 puts the connection's seqid field in front as a stored
    /// block of its own (`deflate::stored_block`); the shared part refers to nothing before
    /// itself, so the two inflate as one message.
    pub fn head_deflate(
        &self,
        seqid: u64,
        framing: Framing,
        small_window: bool,
        min: usize,
        out: &mut Vec<u8>,
    ) -> Bytes {
        let raw = framing == Framing::WsRaw;
        let src = if raw { &self.payload } else { &self.body };
        let packed = if framing == Framing::Tcp || src.len() < min {
            None
        } else {
            let slot = usize::from(raw) * 2 + usize::from(small_window);
            self.packed[slot]
                .get_or_init(|| {
                    let mut z = Vec::new();
                    crate::deflate::pack(src, small_window, &mut z).then(|| Bytes::from(z))
                })
                .as_ref()
        };
        let Some(z) = packed else {
            return self.head(seqid, framing, out).clone();
        };
        let opcode = if raw && self.text {
            crate::ws::op::TEXT
        } else {
            crate::ws::op::BINARY
        };
        let (seq, n) = if raw { ([0; 11], 0) } else { seq_field(seqid) };
        let own = if n > 0 {
            crate::deflate::STORED_OVERHEAD + n
        } else {
            0
        };
        crate::deflate::sent();
        crate::ws::encode_header_rsv1(out, true, true, opcode, own + z.len());
        if n > 0 {
            crate::deflate::stored_block(&seq[..n], out);
        }
        z.clone()
    }
}

/// How a connection carries a shared frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Length-prefixed Frame, with the connection's seqid.
    Tcp,
    /// One binary WebSocket message holding the Frame, with the connection's seqid.
    WsPbbp2,
    /// The payload alone in one WebSocket message.
    WsRaw,
}

/// Field 1 (`seqid`) encoded: tag and varint; nothing for 0, which protobuf omits.
fn seq_field(seqid: u64) -> ([u8; 11], usize) {
    let mut b = [0u8; 11];
    if seqid == 0 {
        return (b, 0);
    }
    b[0] = 0x08; // field 1, varint
    let n = 1 + put_varint(seqid, &mut b[1..]);
    (b, n)
}

fn put_varint(mut v: u64, out: &mut [u8]) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        out[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    out[i] = v as u8;
    i + 1
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_hello_read_in_place_agrees_with_prost_or_steps_aside() {
        use crate::proto::method;
        let hello = Frame::control(
            method::HELLO,
            7,
            &[
                ("app_id", "demo"),
                ("device_id", "d1"),
                ("token", "t"),
                ("app_id", "second"),
            ],
        );
        let b = hello.encode_to_vec();
        let v = HelloView::parse(&b).expect("a HELLO");
        assert_eq!(v.seqid, 7);
        assert_eq!(v.header("app_id"), hello.header("app_id"));
        assert_eq!(v.header("device_id"), Some("d1"));
        assert_eq!(v.header("user_id"), None);
        assert_eq!(v.header("token"), Some("t"));
        // Only the credentials are kept; any number of other headers is read past.
        let mut many = hello.clone();
        for i in 0..20 {
            many.headers.push(crate::proto::Header {
                key: format!("h{i}"),
                value: "v".into(),
            });
        }
        many.headers.push(crate::proto::Header {
            key: "user_id".into(),
            value: "u9".into(),
        });
        let mb = many.encode_to_vec();
        let mv = HelloView::parse(&mb).expect("a HELLO with many headers");
        assert_eq!(mv.header("user_id"), Some("u9"));
        assert_eq!(mv.header("h3"), None);
        assert_eq!(mv.header("app_id"), Some("demo"));
        // A Header message with its fields repeated (the last of each wins, as in prost),
        // and names repeated across headers (the first wins, as `Frame::header`).
        let body = std::fs::read("fuzz/seeds/tcp_frame/hello_repeats").unwrap();
        let (body, _) = decode_tcp(&body[1..], 65535).unwrap().unwrap();
        let f = Frame::decode(body).unwrap();
        let v = HelloView::parse(body).expect("a HELLO");
        for k in ["app_id", "device_id", "token", "user_id"] {
            assert_eq!(v.header(k), f.header(k), "{k}");
        }
        assert_eq!(v.header("device_id"), Some("d2"));
        assert_eq!(v.header("user_id"), Some("u"));
        // Shapes the canonical header reader leaves to the general one: a value of 128
        // bytes or more (a two-byte length), and the value before the key.
        let long_dev = "d".repeat(200);
        let f = Frame::control(method::HELLO, 1, &[("device_id", &long_dev)]);
        let fb = f.encode_to_vec();
        let v = HelloView::parse(&fb).expect("a HELLO with a long device id");
        assert_eq!(v.header("device_id"), Some(&long_dev[..]));
        let mut h = vec![0x12, 2, b'v', b'1', 0x0a, 9];
        h.extend_from_slice(b"device_id");
        let mut body = vec![0x20, 1, 0x2a, h.len() as u8];
        body.extend_from_slice(&h);
        let f = Frame::decode(&body[..]).unwrap();
        assert_eq!(f.header("device_id"), Some("v1"));
        let v = HelloView::parse(&body).expect("a HELLO, value first");
        assert_eq!(v.header("device_id"), Some("v1"));
        // Not a HELLO, or not plain: None (the Frame way decides).
        let ping = Frame::control(method::PING, 1, &[]).encode_to_vec();
        assert_eq!(HelloView::parse(&ping), None);
        let mut other = hello.clone();
        other.service = 1;
        assert_eq!(HelloView::parse(&other.encode_to_vec()), None);
        let mut payload = hello.clone();
        payload.payload = b"x".to_vec().into();
        assert_eq!(HelloView::parse(&payload.encode_to_vec()), None);
        assert_eq!(HelloView::parse(&b[..b.len() - 1]), None);
        let mut bad = b.clone();
        let at = bad.iter().position(|&c| c == b'd').unwrap();
        bad[at] = 0xff; // not UTF-8
        assert_eq!(HelloView::parse(&bad), None);
        assert!(Frame::decode(&bad[..]).is_err());
        // method 1 written as a 10-byte varint (high bits set): prost reads its low 32 bits.
        let long = [
            0x20, 0x81, 0x80, 0x80, 0x80, 0x90, 0x80, 0x80, 0x80, 0x80, 0x01,
        ];
        let f = Frame::decode(&long[..]).unwrap();
        let v = HelloView::parse(&long);
        assert_eq!(v.is_some(), f.method == method::HELLO && f.service == 0);
    }

    #[test]
    fn the_hello_answer_written_directly_is_the_frame_encoded() {
        let tail_h = [
            ("heartbeat_s", "30"),
            ("heartbeat_ms", "30000"),
            ("node_id", "n1"),
        ];
        let tail = encoded_headers(&tail_h);
        for (seqid, id) in [
            (1u64, "n1:5:1"),
            (0, "n1:70000:3"),
            (u64::MAX, &"x".repeat(200)[..]),
        ] {
            let mut headers = vec![("conn_id", id)];
            headers.extend_from_slice(&tail_h);
            let f = Frame::control(crate::proto::method::HELLO, seqid, &headers);
            let mut want = vec![];
            encode_tcp(&f, &mut want).unwrap();
            let mut got = b"kept".to_vec();
            encode_hello_tcp(seqid, id, &tail, &mut got);
            assert_eq!(&got[..4], b"kept");
            assert_eq!(&got[4..], &want[..], "seqid {seqid}");
        }
    }
    use super::*;
    use crate::proto::{method, Header};

    #[test]
    fn a_header_spliced_in_gives_the_bytes_prost_gives_and_keeps_the_payload_the_tail() {
        let h = |k: &str, v: &str| Header {
            key: k.into(),
            value: v.into(),
        };
        let frames = [
            Frame::default(),
            Frame {
                method: method::PUSH,
                payload: Bytes::from_static(b"hi"),
                ..Default::default()
            },
            Frame {
                logid: 1 << 40,
                service: 3,
                method: 7,
                headers: vec![h("a", "b"), h("", "")],
                payload_encoding: "gzip".into(),
                payload_type: "json".into(),
                payload: Bytes::from(vec![7u8; 70_000]),
                ..Default::default()
            },
            Frame {
                service: -1, // a ten-byte varint
                payload_type: "text".into(),
                ..Default::default()
            },
        ];
        let long = "x".repeat(200); // a two-byte length
        let headers = [
            ("push_id", "00000000000000ff.n1"),
            ("k", ""),
            ("", "v"),
            ("", ""),
            ("long", long.as_str()),
            (long.as_str(), "v"),
        ];
        for f in frames {
            // The shared body is prost's encoding with seqid 0, whatever the frame's seqid.
            assert_eq!(&Shared::new(&f).body()[..], &f.encode_to_vec()[..]);
            for seqid in [1, 300, u64::MAX] {
                let s = Frame { seqid, ..f.clone() };
                assert_eq!(
                    &Shared::new(&s).body()[..],
                    &f.encode_to_vec()[..],
                    "{seqid}"
                );
            }
            for (k, v) in headers {
                let mut got = Shared::new(&f);
                got.add_header(k, v);
                let mut g = f.clone();
                g.headers.push(h(k, v));
                assert_eq!(&got.body()[..], &g.encode_to_vec()[..], "{k:?}={v:?} {f:?}");
                let want = Shared::new(&g);
                assert_eq!(got.payload, f.payload);
                assert_eq!(got.text, want.text);
                if !f.payload.is_empty() {
                    // The payload is the body's tail, not a copy.
                    let b = got.body();
                    assert_eq!(
                        got.payload.as_ptr(),
                        b[b.len() - got.payload.len()..].as_ptr()
                    );
                }
                assert_eq!(Frame::decode(&got.body()[..]).unwrap(), g);
            }
            // A compressed copy made of the old body is not the new one's: a clone keeps
            // its own, and the push alone starts with none, in the slots it had.
            let mut orig = Shared::new(&f);
            let mut scratch = Vec::new();
            let _ = orig.head_deflate(1, Framing::WsPbbp2, false, 0, &mut scratch);
            let clone = orig.clone();
            orig.add_header("push_id", "00000000000000ff.n1");
            assert!(!Arc::ptr_eq(&clone.packed, &orig.packed));
            assert!(orig.packed.iter().all(|c| c.get().is_none()));
            assert!(clone.packed.iter().any(|c| c.get().is_some()));
            let mut alone = clone;
            let before = Arc::as_ptr(&alone.packed);
            alone.add_header("push_id", "00000000000000ff.n1");
            assert_eq!(Arc::as_ptr(&alone.packed), before);
            assert!(alone.packed.iter().all(|c| c.get().is_none()));
            assert_eq!(alone.body(), orig.body());
        }
        assert_eq!(first_field_from(&[0x08, 1, 0x0b], 6), None); // wire type 3
        assert_eq!(first_field_from(&[0x08], 6), None); // truncated
    }

    fn framed(f: &Frame) -> Vec<u8> {
        let mut v = Vec::new();
        encode_tcp(f, &mut v).unwrap();
        v
    }

    #[test]
    fn byte_by_byte_is_incomplete_until_the_last_byte() {
        let f = Frame::control(method::HELLO, 7, &[("app_id", "demo"), ("device_id", "d1")]);
        let wire = framed(&f);
        for cut in 0..wire.len() {
            assert_eq!(decode_tcp(&wire[..cut], 65535), Ok(None), "cut {cut}");
        }
        let (body, used) = decode_tcp(&wire, 65535).unwrap().unwrap();
        assert_eq!(used, wire.len());
        assert_eq!(Frame::decode(body).unwrap(), f);
    }

    #[test]
    fn many_frames_in_one_buffer() {
        let mut wire = Vec::new();
        for i in 0..100u64 {
            encode_tcp(&Frame::control(method::PING, i, &[]), &mut wire).unwrap();
        }
        wire.extend_from_slice(&[0x00]); // half a prefix of a next frame
        let mut at = 0;
        let mut seen = 0u64;
        while let Some((body, used)) = decode_tcp(&wire[at..], 65535).unwrap() {
            assert_eq!(Frame::decode(body).unwrap().seqid, seen);
            seen += 1;
            at += used;
        }
        assert_eq!(seen, 100);
        assert_eq!(wire.len() - at, 1);
    }

    #[test]
    fn oversize_and_empty_are_rejected_at_the_prefix() {
        // exactly the limit is fine (and incomplete here)
        assert_eq!(decode_tcp(&[0x10, 0x00], 4096), Ok(None));
        assert_eq!(
            decode_tcp(&[0x10, 0x01], 4096),
            Err(FrameError::TooLarge {
                size: 4097,
                max: 4096
            })
        );
        assert_eq!(
            decode_tcp(&[0x00, 0x00, 0x01], 4096),
            Err(FrameError::Empty)
        );
    }

    #[test]
    fn a_frame_too_big_for_the_prefix_is_refused_whole() {
        let mut f = Frame::control(method::PUSH, 1, &[]);
        f.payload = Bytes::from(vec![b'x'; 70_000]);
        let mut out = b"before".to_vec();
        assert!(matches!(
            encode_tcp(&f, &mut out),
            Err(FrameError::TooLarge { max: 65_535, .. })
        ));
        assert_eq!(out, b"before", "nothing written");
        f.payload = Bytes::from(vec![b'x'; 65_535 - 16]);
        assert!(f.encoded_len() <= MAX_TCP_FRAME);
        encode_tcp(&f, &mut out).unwrap();
        let (body, _) = decode_tcp(&out[6..], MAX_TCP_FRAME).unwrap().unwrap();
        assert_eq!(Frame::decode(body).unwrap(), f);
    }

    #[test]
    fn shared_body_matches_whole_encoding() {
        let f = Frame {
            seqid: 0,
            logid: 99,
            service: 0,
            method: method::PUSH,
            headers: vec![Header {
                key: "k".into(),
                value: "v".into(),
            }],
            payload_encoding: String::new(),
            payload_type: "text".into(),
            payload: Bytes::from_static(b"hello world"),
        };
        let shared = Shared::new(&f);
        for seq in [0u64, 1, 127, 128, 300, 1 << 40, u64::MAX] {
            let mut whole = f.clone();
            whole.seqid = seq;
            let mut a = Vec::new();
            shared.write_tcp(seq, &mut a);
            assert_eq!(a, framed(&whole), "seqid {seq}");
        }
    }

    /// A server frame's payload and RSV1 (test helper; server frames are unmasked).
    fn ws_payload(wire: &[u8]) -> (bool, u8, &[u8]) {
        let len = (wire[1] & 0x7f) as usize;
        let (len, at) = match len {
            126 => (u16::from_be_bytes([wire[2], wire[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(wire[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n, 2),
        };
        assert_eq!(wire.len(), at + len);
        (wire[0] & 0x40 != 0, wire[0] & 0x0f, &wire[at..])
    }

    #[test]
    fn a_compressed_push_is_made_once_and_inflates_to_each_connection_s_frame() {
        let mut f = Frame::control(method::PUSH, 0, &[("room", "r1")]);
        f.payload_type = "text".into();
        f.payload = Bytes::from("the same words again and again, ".repeat(40));
        let shared = Shared::new(&f);
        let copy = shared.clone();
        let mut firsts = vec![];
        for (s, seq) in [(&shared, 0u64), (&copy, 5), (&shared, 1 << 40)] {
            let mut wire = Vec::new();
            let body = s.head_deflate(seq, Framing::WsPbbp2, false, 256, &mut wire);
            firsts.push(body.as_ptr());
            wire.extend_from_slice(&body);
            let (rsv1, opcode, z) = ws_payload(&wire);
            assert!(rsv1 && opcode == crate::ws::op::BINARY);
            assert!(z.len() < f.payload.len() / 4, "{}", z.len());
            let mut msg = vec![];
            crate::deflate::unpack(z, 1 << 20, &mut msg).unwrap();
            let mut whole = f.clone();
            whole.seqid = seq;
            assert_eq!(Frame::decode(&msg[..]).unwrap(), whole);
        }
        // One compressed body, shared by the clones.
        assert!(firsts.iter().all(|p| *p == firsts[0]));
        // Raw mode: the payload alone, as text.
        let mut wire = Vec::new();
        let body = shared.head_deflate(9, Framing::WsRaw, true, 256, &mut wire);
        wire.extend_from_slice(&body);
        let (rsv1, opcode, z) = ws_payload(&wire);
        assert!(rsv1 && opcode == crate::ws::op::TEXT);
        let mut msg = vec![];
        crate::deflate::unpack(z, 1 << 20, &mut msg).unwrap();
        assert_eq!(msg, f.payload);
        // Under the threshold: as without compression.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let body = shared.head_deflate(3, Framing::WsPbbp2, false, 1 << 20, &mut a);
        a.extend_from_slice(&body);
        shared.write_ws_pbbp2(3, &mut b);
        assert_eq!(a, b);
    }
}
