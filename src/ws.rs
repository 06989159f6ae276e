//! WebSocket (RFC 6455), server side: upgrade validation and the frame codec. Pure functions
//! over bytes and explicit limits; the reactor owns the sockets and the per-connection state.

use base64::Engine;
use sha1::{Digest, Sha1};
use thiserror::Error;

/// RFC 6455 §1.3: the GUID appended to the client's key.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
pub const SUBPROTOCOL_PBBP2: &str = "pbbp2";

pub mod op {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;

    pub fn is_control(op: u8) -> bool {
        op & 0x8 != 0
    }
}

/// Close status codes (RFC 6455 §7.4.1).
pub mod status {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    /// Service restart: the server goes away for now (a drain).
    pub const SERVICE_RESTART: u16 = 1012;
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WsError {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("a compressed continuation or control frame")]
    CompressedNotFirst,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("client frames must be masked")]
    Unmasked,
    #[error("server frames must not be masked")]
    Masked,
    #[error("control frames must not be fragmented")]
    FragmentedControl,
    #[error("control frame payload of {0} bytes (max 125)")]
    ControlTooLong(u64),
    #[error("payload of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: u64, max: u64 },
}

impl WsError {
    /// The close code this error is answered with.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::TooLarge { .. } => status::TOO_BIG,
            _ => status::PROTOCOL_ERROR,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1: with permessage-deflate, the message (of which this is the first frame) is
    /// compressed.
    pub rsv1: bool,
    pub opcode: u8,
    pub mask: [u8; 4],
    pub header_len: usize,
    pub payload_len: usize,
}

impl Header {
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Parses a client frame header from the front of `buf`. `Ok(None)`: more bytes needed.
/// Every rule that can be checked from the header is checked here, before any payload is
/// buffered (RFC 6455 §5.2, §5.5): reserved bits and opcodes, masking, control frame size
/// and fragmentation, and `max_payload`. `deflate`: permessage-deflate was negotiated, so
/// RSV1 may mark a message's first frame (RFC 7692 §6), and no other.
pub fn decode_header(
    buf: &[u8],
    max_payload: usize,
    deflate: bool,
) -> Result<Option<Header>, WsError> {
    // §5.1: a server MUST close on an unmasked client frame.
    let Some(p) = decode_prefix(buf, deflate, true)? else {
        return Ok(None);
    };
    if !op::is_control(p.opcode) && p.len > max_payload as u64 {
        return Err(WsError::TooLarge {
            size: p.len,
            max: max_payload as u64,
        });
    }
    let at = p.at;
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    Ok(Some(Header {
        fin: p.fin,
        rsv1: p.rsv1,
        opcode: p.opcode,
        mask,
        header_len: at + 4,
        payload_len: p.len as usize,
    }))
}

/// The part of a frame header both directions share: the first two bytes and the length.
struct Prefix {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    len: u64,
    /// Where the mask key (client frames) or the payload (server frames) starts.
    at: usize,
}

/// The rules both directions share (RFC 6455 §5.2, §5.5, RFC 7692 §6), checked in this
/// order: reserved bits (RSV1 only with `deflate`, and only on a data message's first
/// frame), known opcodes, the mask bit (`masked`: set on client frames, clear on server
/// ones), the length, control frames whole and at most 125 bytes. `Ok(None)`: more bytes
/// needed.
fn decode_prefix(buf: &[u8], deflate: bool, masked: bool) -> Result<Option<Prefix>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let rsv1 = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 || (rsv1 && !deflate) {
        return Err(WsError::ReservedBits);
    }
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
    if rsv1 && !matches!(opcode, op::TEXT | op::BINARY) {
        return Err(WsError::CompressedNotFirst);
    }
    if !matches!(
        opcode,
        op::CONTINUATION | op::TEXT | op::BINARY | op::CLOSE | op::PING | op::PONG
    ) {
        return Err(WsError::ReservedOpcode(opcode));
    }
    match (b1 & 0x80 != 0, masked) {
        (false, true) => return Err(WsError::Unmasked),
        (true, false) => return Err(WsError::Masked),
        _ => {}
    }
    let (len, at) = match b1 & 0x7f {
        126 if buf.len() < 4 => return Ok(None),
        126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() < 10 => return Ok(None),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if op::is_control(opcode) {
        if !fin {
            return Err(WsError::FragmentedControl);
        }
        if len > 125 {
            return Err(WsError::ControlTooLong(len));
        }
    }
    Ok(Some(Prefix {
        fin,
        rsv1,
        opcode,
        len,
        at,
    }))
}

/// Appends `src` unmasked with `mask` to `out`.
pub fn unmask_into(src: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(src);
    let dst = &mut out[start..];
    // Word at a time where possible; the tail byte by byte.
    let m = u32::from_ne_bytes(mask);
    let mut chunks = dst.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ m;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Bytes of a server frame header for a payload of `len`.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Appends an unmasked (server) frame header.
pub fn encode_header(out: &mut Vec<u8>, fin: bool, opcode: u8, len: usize) {
    encode_header_rsv1(out, fin, false, opcode, len)
}

/// Appends an unmasked (server) frame header, RSV1 set for a compressed message.
pub fn encode_header_rsv1(out: &mut Vec<u8>, fin: bool, rsv1: bool, opcode: u8, len: usize) {
    let b0 = if fin { 0x80 } else { 0 } | if rsv1 { 0x40 } else { 0 } | opcode;
    match len {
        0..=125 => out.extend_from_slice(&[b0, len as u8]),
        126..=65535 => {
            out.extend_from_slice(&[b0, 126]);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.extend_from_slice(&[b0, 127]);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Appends a masked client frame: what a client sends (the tests and the bench use it;
/// the server never sends one).
pub fn encode_client_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    payload: &[u8],
) {
    let start = out.len();
    encode_header(out, fin, opcode, payload.len());
    out[start + 1] |= 0x80;
    out.extend_from_slice(&mask);
    let at = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[at..].iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// One server frame from the front of `buf`, as a client reads it (`longlink client`, the
/// bench): `Ok(None)` until it is whole. Server frames are unmasked (§5.1) and carry no
/// RSV bits, but for RSV1 on a message's first frame when permessage-deflate was agreed
/// (`deflate`; the bench's compressed transport, RFC 7692 §6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFrame {
    pub fin: bool,
    /// The message is compressed.
    pub rsv1: bool,
    pub opcode: u8,
    /// Where the payload is in `buf`.
    pub payload: std::ops::Range<usize>,
    /// Bytes the whole frame takes.
    pub len: usize,
}

/// Parses a whole server frame from the front of `buf` (the clients' side: the bench, the
/// CLI client). `Ok(None)`: more bytes needed.
pub fn decode_server_frame(
    buf: &[u8],
    max_payload: usize,
    deflate: bool,
) -> Result<Option<ServerFrame>, WsError> {
    let Some(p) = decode_prefix(buf, deflate, false)? else {
        return Ok(None);
    };
    if p.len > max_payload as u64 {
        return Err(WsError::TooLarge {
            size: p.len,
            max: max_payload as u64,
        });
    }
    let end = p.at + p.len as usize; // len <= max_payload: no overflow
    Ok((buf.len() >= end).then_some(ServerFrame {
        fin: p.fin,
        rsv1: p.rsv1,
        opcode: p.opcode,
        payload: p.at..end,
        len: end,
    }))
}

/// Appends a whole unfragmented server frame.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    encode_header(out, true, opcode, payload.len());
    out.extend_from_slice(payload);
}

/// A close frame's payload: code and a reason cut to fit in 125 bytes on a char boundary.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(&reason.as_bytes()[..end]);
    p
}

/// Validates a received close frame's payload (§5.5.1, §7.4). Returns the code to echo, or
/// the code to fail the connection with.
pub fn check_close(payload: &[u8]) -> Result<u16, u16> {
    match payload.len() {
        0 => Ok(status::NORMAL),
        1 => Err(status::PROTOCOL_ERROR),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            // 1004-1006 and 1015 must not be sent; 1016-2999 are reserved. (1012-1014 are
            // IANA's: service restart, try again later, bad gateway.)
            let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !allowed {
                return Err(status::PROTOCOL_ERROR);
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(status::INVALID_PAYLOAD);
            }
            Ok(code)
        }
    }
}

/// Incremental UTF-8 validation of a text message arriving in fragments: fails as soon as the
/// bytes so far cannot begin valid UTF-8, and accepts an incomplete sequence at the end of a
/// non-final fragment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Utf8State {
    /// Bytes of the message validated so far (a trailing incomplete sequence excluded).
    pub valid: usize,
}

impl Utf8State {
    /// `msg` is the whole message so far. Returns false when it is invalid.
    pub fn feed(&mut self, msg: &[u8], fin: bool) -> bool {
        match std::str::from_utf8(&msg[self.valid..]) {
            Ok(_) => {
                self.valid = msg.len();
                true
            }
            Err(e) => {
                if e.error_len().is_some() || fin {
                    return false;
                }
                self.valid += e.valid_up_to();
                true
            }
        }
    }
}

/// `Sec-WebSocket-Accept` for a client key (§4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// What a valid upgrade request asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    pub accept: String,
    /// The client offered `pbbp2`; otherwise raw mode.
    pub pbbp2: bool,
    /// permessage-deflate, when offered acceptably and enabled.
    pub deflate: Option<Agreed>,
}

/// A refused upgrade: HTTP status and reason.
pub type Refusal = (u16, &'static str);

/// Validates an upgrade request's headers (§4.2.1). `headers` are (name, value) pairs.
/// `deflate`: permessage-deflate is enabled (an offer is then considered).
pub fn check_upgrade(
    method: &str,
    version: u8,
    headers: &[(&str, &[u8])],
    deflate: bool,
) -> Result<Upgrade, Refusal> {
    if method != "GET" {
        return Err((405, "WebSocket upgrades use GET"));
    }
    // RFC 6455 4.2.1: an HTTP/1.1 (or later) GET with a Host header, else 400.
    if version < 1 {
        return Err((400, "WebSocket upgrades need HTTP/1.1"));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    };
    let has_token = |name: &str, tok: &[u8]| {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .any(|(_, v)| {
                v.split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(tok))
            })
    };
    if get("host").is_none() {
        return Err((400, "missing Host"));
    }
    if !has_token("upgrade", b"websocket") {
        return Err((400, "missing Upgrade: websocket"));
    }
    if !has_token("connection", b"upgrade") {
        return Err((400, "missing Connection: Upgrade"));
    }
    if get("sec-websocket-version").map(|v| v.trim_ascii()) != Some(b"13") {
        return Err((426, "unsupported Sec-WebSocket-Version (13 only)"));
    }
    let key = get("sec-websocket-key")
        .and_then(|k| std::str::from_utf8(k).ok())
        .map(str::trim)
        .ok_or((400, "missing Sec-WebSocket-Key"))?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if k.len() == 16 => {}
        _ => return Err((400, "Sec-WebSocket-Key must be 16 bytes in base64")),
    }
    let offers = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, v)| *v);
    Ok(Upgrade {
        accept: accept_key(key),
        pbbp2: has_token("sec-websocket-protocol", SUBPROTOCOL_PBBP2.as_bytes()),
        deflate: if deflate {
            negotiate_deflate(offers)
        } else {
            None
        },
    })
}

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const DEFLATE: &str = "permessage-deflate";

/// An accepted permessage-deflate offer (RFC 7692; the compression itself is the deflate module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// The client limited our window (`server_max_window_bits`, 8 to 15): the value it asked,
    /// repeated in the answer. We then compress with a 512-byte window, whose longest
    /// distance is 250 bytes (zlib keeps 262 bytes of lookahead), within any window the
    /// client may ask, 8 bits included.
    pub server_bits: Option<u8>,
}

impl Agreed {
    /// Compressing within a small window (any `server_max_window_bits` below 15).
    pub fn small_window(&self) -> bool {
        self.server_bits.is_some_and(|b| b < 15)
    }

    /// The `Sec-WebSocket-Extensions` value of the answer.
    pub fn response(&self) -> String {
        let mut s = format!("{DEFLATE}; server_no_context_takeover; client_no_context_takeover");
        if let Some(b) = self.server_bits {
            s.push_str(&format!("; server_max_window_bits={b}"));
        }
        s
    }
}

/// Picks the first acceptable `permessage-deflate` offer among the values of every
/// `Sec-WebSocket-Extensions` header (§5: an offer with an unknown or repeated parameter, or
/// a bad value, is declined, and the next one is considered). None: no compression.
pub fn negotiate_deflate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<Agreed> {
    for v in values {
        let Ok(v) = std::str::from_utf8(v) else {
            continue;
        };
        for offer in v.split(',') {
            if let Some(a) = accept_deflate(offer) {
                return Some(a);
            }
        }
    }
    None
}

/// One offer: `permessage-deflate; param[=value]; ...`.
fn accept_deflate(offer: &str) -> Option<Agreed> {
    let mut parts = offer.split(';');
    if !parts.next()?.trim().eq_ignore_ascii_case(DEFLATE) {
        return None;
    }
    let mut seen = [false; 4];
    let mut a = Agreed { server_bits: None };
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (p.trim(), None),
        };
        let i = match name {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return None,
        };
        if std::mem::replace(&mut seen[i], true) {
            return None;
        }
        match (i, value) {
            (0 | 1, None) => {}
            (2, Some(v)) => a.server_bits = Some(window_bits(v)?),
            // Any window the client uses is inflated (ours is 15 bits); the value is checked.
            (3, None) => {}
            (3, Some(v)) => {
                window_bits(v)?;
            }
            _ => return None,
        }
    }
    Some(a)
}

/// A quoted-string value without its quotes (§7.1.2.1 allows `"10"`).
fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(v),
    }
}

/// 8 to 15, digits only, no leading zero (§7.1.2.1).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_decode_whole_or_wait_and_refuse_what_a_server_must_not_send() {
        for n in [0usize, 1, 125, 126, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let mut b = Vec::new();
            encode_frame(&mut b, op::BINARY, &payload);
            b.extend_from_slice(b"next");
            let f = decode_server_frame(&b, 1 << 20, false).unwrap().unwrap();
            assert_eq!((f.fin, f.opcode), (true, op::BINARY));
            assert_eq!(&b[f.payload.clone()], &payload[..]);
            assert_eq!(f.len, b.len() - 4);
            // Every proper prefix: more bytes needed, never an error or a wrong frame.
            for cut in [0, 1, f.len / 2, f.len - 1] {
                assert_eq!(
                    decode_server_frame(&b[..cut], 1 << 20, false),
                    Ok(None),
                    "{n} {cut}"
                );
            }
        }
        let mut frag = Vec::new();
        encode_header(&mut frag, false, op::TEXT, 2);
        frag.extend_from_slice(b"hi");
        let f = decode_server_frame(&frag, 10, false).unwrap().unwrap();
        assert_eq!((f.fin, f.opcode, f.payload), (false, op::TEXT, 2..4));
        let err = |b: &[u8]| decode_server_frame(b, 1000, false).unwrap_err();
        assert_eq!(err(&[0x82 | 0x40, 0]), WsError::ReservedBits);
        // With permessage-deflate: RSV1 marks a compressed message's first frame, only.
        let z = decode_server_frame(&[0xc2, 1, 9], 10, true)
            .unwrap()
            .unwrap();
        assert_eq!((z.rsv1, z.opcode, z.payload), (true, op::BINARY, 2..3));
        let zerr = |b: &[u8]| decode_server_frame(b, 1000, true).unwrap_err();
        assert_eq!(zerr(&[0xc9, 0]), WsError::CompressedNotFirst);
        assert_eq!(zerr(&[0xc0, 0]), WsError::CompressedNotFirst);
        assert_eq!(zerr(&[0xa2, 0]), WsError::ReservedBits);
        assert_eq!(err(&[0x83, 0]), WsError::ReservedOpcode(3));
        assert_eq!(err(&[0x82, 0x81, 1, 2, 3, 4, 0]), WsError::Masked);
        assert_eq!(err(&[0x09, 0]), WsError::FragmentedControl);
        assert_eq!(err(&[0x89, 126, 0, 126]), WsError::ControlTooLong(126));
        // A 64-bit length is refused from the header, before anything is buffered.
        let huge = [0x82, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(err(&huge), WsError::TooLarge { .. }));
    }

    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = vec![];
        encode_client_frame(&mut v, fin, opcode, mask, payload);
        v
    }

    fn neg(v: &str) -> Option<Agreed> {
        negotiate_deflate([v.as_bytes()])
    }

    #[test]
    fn offers() {
        let plain = Some(Agreed { server_bits: None });
        assert_eq!(neg("permessage-deflate"), plain);
        assert_eq!(neg("permessage-deflate; client_max_window_bits"), plain);
        assert_eq!(
            neg("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
            plain
        );
        assert_eq!(
            neg("permessage-deflate; server_max_window_bits=10; client_max_window_bits=\"12\""),
            Some(Agreed {
                server_bits: Some(10)
            })
        );
        // Declined: unknown, repeated, missing or bad values; the next offer is taken.
        for bad in [
            "permessage-deflate; foo",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; client_max_window_bits=x",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert_eq!(neg(bad), None, "{bad}");
        }
        assert_eq!(
            neg("foo, permessage-deflate; server_max_window_bits=8; bar, permessage-deflate; server_max_window_bits=9"),
            Some(Agreed { server_bits: Some(9) })
        );
        assert_eq!(
            negotiate_deflate([&b"x"[..], &b"\xff"[..], &b"permessage-deflate"[..]]),
            plain
        );
        let a = Agreed {
            server_bits: Some(8),
        };
        assert!(a.small_window());
        assert_eq!(
            a.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=8"
        );
    }

    #[test]
    fn rfc_example_accept_key() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_byte_by_byte_and_every_length_form() {
        for len in [0usize, 5, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let wire = client_frame(true, op::BINARY, &payload, [1, 2, 3, 4]);
            let h = decode_header(&wire, 1 << 20, false).unwrap().unwrap();
            assert_eq!(
                (h.fin, h.opcode, h.payload_len, h.frame_len()),
                (true, op::BINARY, len, wire.len())
            );
            let mut out = vec![];
            unmask_into(&wire[h.header_len..], h.mask, &mut out);
            assert_eq!(out, payload);
            if len < 200 {
                for cut in 0..h.header_len {
                    assert_eq!(
                        decode_header(&wire[..cut], 1 << 20, false),
                        Ok(None),
                        "len {len} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn header_rules() {
        let ok = client_frame(true, op::TEXT, b"hi", [0; 4]);
        let mut rsv = ok.clone();
        rsv[0] |= 0x40;
        assert_eq!(decode_header(&rsv, 100, false), Err(WsError::ReservedBits));
        // With permessage-deflate, RSV1 marks a message's first frame, and only that.
        assert!(decode_header(&rsv, 100, true).unwrap().unwrap().rsv1);
        let mut rsv2 = ok.clone();
        rsv2[0] |= 0x20;
        assert_eq!(decode_header(&rsv2, 100, true), Err(WsError::ReservedBits));
        for first in [op::CONTINUATION, op::PING, op::CLOSE] {
            let mut f = client_frame(true, first, b"", [0; 4]);
            f[0] |= 0x40;
            assert_eq!(
                decode_header(&f, 100, true),
                Err(WsError::CompressedNotFirst)
            );
        }
        let mut bad_op = ok.clone();
        bad_op[0] = 0x83;
        assert_eq!(
            decode_header(&bad_op, 100, false),
            Err(WsError::ReservedOpcode(3))
        );
        let mut unmasked = ok.clone();
        unmasked[1] &= 0x7f;
        assert_eq!(decode_header(&unmasked, 100, false), Err(WsError::Unmasked));
        let frag_ping = client_frame(false, op::PING, b"", [0; 4]);
        assert_eq!(
            decode_header(&frag_ping, 100, false),
            Err(WsError::FragmentedControl)
        );
        let big_ping = client_frame(true, op::PING, &[0; 126], [0; 4]);
        assert_eq!(
            decode_header(&big_ping, 1000, false),
            Err(WsError::ControlTooLong(126))
        );
        // The size limit is enforced from the first 10 bytes, whatever follows.
        let huge = [0x82, 0xff, 0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(
            decode_header(&huge, 1 << 20, false),
            Err(WsError::TooLarge {
                size: 1 << 32,
                max: 1 << 20
            })
        );
    }

    #[test]
    fn close_payloads() {
        assert_eq!(check_close(b""), Ok(1000));
        assert_eq!(check_close(b"\x03"), Err(1002));
        assert_eq!(check_close(b"\x03\xe8bye"), Ok(1000));
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(check_close(&bad.to_be_bytes()), Err(1002), "{bad}");
        }
        for registered in [1012u16, 1013, 1014, 3000, 4999] {
            assert_eq!(check_close(&registered.to_be_bytes()), Ok(registered));
        }
        assert_eq!(check_close(b"\x03\xe8\xff"), Err(1007));
        let long = "é".repeat(100);
        assert!(close_payload(1000, &long).len() <= 125);
        assert!(std::str::from_utf8(&close_payload(1000, &long)[2..]).is_ok());
    }

    #[test]
    fn utf8_across_fragments() {
        let s = "κόσμε".as_bytes();
        let mut st = Utf8State::default();
        // Split inside a multi-byte sequence: fine until the message ends.
        assert!(st.feed(&s[..3], false));
        assert!(st.feed(s, true));
        // An impossible byte fails at once, not at the end.
        let mut st = Utf8State::default();
        assert!(!st.feed(b"ab\xff", false));
        // A truncated sequence at the end of the message fails.
        let mut st = Utf8State::default();
        assert!(!st.feed(&s[..3], true));
    }

    #[test]
    fn upgrade_requests() {
        let base: Vec<(&str, &[u8])> = vec![
            ("Host", b"x"),
            ("Upgrade", b"websocket"),
            ("Connection", b"keep-alive, Upgrade"),
            ("Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", b"13"),
        ];
        let u = check_upgrade("GET", 1, &base, true).unwrap();
        assert_eq!(
            u,
            Upgrade {
                accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into(),
                pbbp2: false,
                deflate: None,
            }
        );
        // An offer is taken when enabled, from any of several headers.
        let mut d = base.clone();
        d.push(("Sec-WebSocket-Extensions", b"x-foo"));
        d.push((
            "sec-websocket-extensions",
            b"permessage-deflate; client_max_window_bits",
        ));
        assert!(check_upgrade("GET", 1, &d, true).unwrap().deflate.is_some());
        assert_eq!(check_upgrade("GET", 1, &d, false).unwrap().deflate, None);
        let mut p = base.clone();
        p.push(("Sec-WebSocket-Protocol", b"chat, pbbp2"));
        assert!(check_upgrade("GET", 1, &p, true).unwrap().pbbp2);
        let mut v = base.clone();
        v[4] = ("Sec-WebSocket-Version", b"8");
        assert_eq!(check_upgrade("GET", 1, &v, true).unwrap_err().0, 426);
        let mut k = base.clone();
        k[3] = ("Sec-WebSocket-Key", b"short");
        assert_eq!(check_upgrade("GET", 1, &k, true).unwrap_err().0, 400);
        assert_eq!(check_upgrade("POST", 1, &base, true).unwrap_err().0, 405);
        assert_eq!(
            check_upgrade("GET", 1, &base[..2], true).unwrap_err().0,
            400
        );
        // RFC 6455 4.2.1: HTTP/1.1 or later, and a Host header.
        assert_eq!(check_upgrade("GET", 0, &base, true).unwrap_err().0, 400);
        assert_eq!(
            check_upgrade("GET", 1, &base[1..], true).unwrap_err().0,
            400
        );
    }
}
