//! HTTP/1.1 request framing for the internal API (httparse underneath), and response
//! writing. `parse_request` is a pure function over bytes: incomplete input consumes nothing.

use thiserror::Error;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_head: usize,
    pub max_body: usize,
}

pub const MAX_HEADERS: usize = 32;
pub const DEFAULT_MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("request head over {max} bytes")]
    HeadTooLarge { max: usize },
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("body of {size} bytes exceeds the limit of {max}")]
    BodyTooLarge { size: usize, max: usize },
    #[error("Transfer-Encoding is not supported; send Content-Length")]
    LengthRequired,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge { .. } | HttpError::TooManyHeaders => 431,
            HttpError::Malformed(_) => 400,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::LengthRequired => 411,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a str,
    pub target: &'a str,
    /// The minor version of HTTP/1.x: 0 or 1.
    pub version: u8,
    pub keep_alive: bool,
    pub authorization: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
    /// Every header, for the WebSocket handshake and CORS.
    pub headers: Vec<(&'a str, &'a [u8])>,
}

impl<'a> Request<'a> {
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// More bytes needed. `expect_continue`: the head is complete and the client waits for
    /// `100 Continue` before sending its body (curl does this for bodies over 1 KiB).
    Incomplete {
        expect_continue: bool,
    },
    Complete(Request<'a>, usize),
}

pub fn parse_request<'a>(buf: &'a [u8], limits: &Limits) -> Result<Parsed<'a>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > limits.max_head {
                return Err(HttpError::HeadTooLarge {
                    max: limits.max_head,
                });
            }
            return Ok(Parsed::Incomplete {
                expect_continue: false,
            });
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(httparse::Error::Version) => {
            return Err(HttpError::Malformed("unsupported HTTP version"))
        }
        Err(_) => return Err(HttpError::Malformed("bad request line or header")),
    };
    if head_len > limits.max_head {
        return Err(HttpError::HeadTooLarge {
            max: limits.max_head,
        });
    }
    let version = req.version.unwrap_or(1);
    let mut keep_alive = version >= 1;
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    let mut authorization = None;
    let mut content_type = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                // (httparse strips spaces and tabs around a value; `str::trim` would also
                // take Unicode spaces, which no proxy reads as part of a number.)
                .map(|s| s.trim_matches([' ', '\t']))
                // Digits only (RFC 9110): `parse` would take a sign, which a proxy in front
                // may read differently — the stuff of request smuggling.
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or(HttpError::Malformed("bad Content-Length"))?;
            if content_length.is_some_and(|c| c != v) {
                return Err(HttpError::Malformed("conflicting Content-Length headers"));
            }
            content_length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::LengthRequired);
        } else if name.eq_ignore_ascii_case("connection") {
            let v = h.value;
            if contains_token(v, b"close") {
                keep_alive = false;
            } else if contains_token(v, b"keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("authorization") {
            authorization = std::str::from_utf8(h.value).ok();
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type = std::str::from_utf8(h.value).ok();
        }
    }
    let len = content_length.unwrap_or(0);
    if len > limits.max_body {
        return Err(HttpError::BodyTooLarge {
            size: len,
            max: limits.max_body,
        });
    }
    if buf.len() < head_len + len {
        return Ok(Parsed::Incomplete { expect_continue });
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(HttpError::Malformed("bad request line"));
    };
    Ok(Parsed::Complete(
        Request {
            method,
            target,
            version,
            keep_alive,
            authorization,
            content_type,
            body: &buf[head_len..head_len + len],
            headers: req.headers.iter().map(|h| (h.name, h.value)).collect(),
        },
        head_len + len,
    ))
}

fn contains_token(v: &[u8], tok: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(tok))
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        101 => "Switching Protocols",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        _ => "",
    }
}

/// A whole response with Content-Length.
pub fn response(status: u16, content_type: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    response_with(status, content_type, "", body, keep_alive)
}

/// A whole response; `extra` is zero or more `Name: value\r\n` lines.
pub fn response_with(
    status: u16,
    content_type: &str,
    extra: &str,
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    // Piece by piece, not `format!`: every API answer comes through here.
    let mut n = itoa::Buffer::new();
    let mut out = Vec::with_capacity(160 + content_type.len() + extra.len() + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(n.format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    out.extend_from_slice(n.format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(extra.as_bytes());
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

pub fn json(status: u16, v: &serde_json::Value, keep_alive: bool) -> Vec<u8> {
    json_with(status, v, "", keep_alive)
}

/// The same, with `extra` header lines (each ending in CRLF).
pub fn json_with(status: u16, v: &serde_json::Value, extra: &str, keep_alive: bool) -> Vec<u8> {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    response_with(status, "application/json", extra, &body, keep_alive)
}

/// Cuts an answer to its head: what a HEAD request gets (RFC 9110 §9.3.2).
pub fn head_only(answer: &mut Vec<u8>) {
    if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
        answer.truncate(end + 4);
    }
}

/// `{"error": message}` with the given status.
pub fn error(status: u16, message: &str, keep_alive: bool) -> Vec<u8> {
    error_with(status, message, "", keep_alive)
}

/// The same, with `extra` header lines (each ending in CRLF).
pub fn error_with(status: u16, message: &str, extra: &str, keep_alive: bool) -> Vec<u8> {
    json_with(
        status,
        &serde_json::json!({ "error": message }),
        extra,
        keep_alive,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_head: 1024,
        max_body: 64,
    };

    #[test]
    fn a_response_has_the_bytes_format_gave_it() {
        let big = [b'x'; 1000];
        let cases: [(u16, &str, &str, &[u8], bool); 4] = [
            (200, "application/json", "", b"{}\n", true),
            (404, "text/plain", "X-A: b\r\nX-C: d\r\n", b"", false),
            (507, "text/html; charset=utf-8", "", &big, true),
            (299, "a/b", "", b"z", false), // no reason phrase known
        ];
        for (status, ct, extra, body, ka) in cases {
            let close = if ka { "" } else { "Connection: close\r\n" };
            let mut want = format!(
                "HTTP/1.1 {status} {}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n{extra}{close}\r\n",
                reason(status),
                body.len()
            )
            .into_bytes();
            want.extend_from_slice(body);
            assert_eq!(response_with(status, ct, extra, body, ka), want, "{status}");
        }
    }

    #[test]
    fn byte_by_byte_then_pipelined() {
        let one =
            b"POST /v1/push/conn/n1:1:1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        for cut in 0..one.len() {
            assert!(
                matches!(
                    parse_request(&one[..cut], &L),
                    Ok(Parsed::Incomplete { .. })
                ),
                "cut {cut}"
            );
        }
        let mut two = one.to_vec();
        two.extend_from_slice(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n");
        let Parsed::Complete(r, used) = parse_request(&two, &L).unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.method, r.target, r.body, r.keep_alive),
            ("POST", "/v1/push/conn/n1:1:1", &b"hello"[..], true)
        );
        let Parsed::Complete(r2, used2) = parse_request(&two[used..], &L).unwrap() else {
            panic!()
        };
        assert_eq!((r2.method, r2.keep_alive), ("GET", false));
        assert_eq!(used + used2, two.len());
    }

    #[test]
    fn limits_and_errors() {
        let big = b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n";
        assert_eq!(
            parse_request(big, &L),
            Err(HttpError::BodyTooLarge { size: 65, max: 64 })
        );
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_request(chunked, &L), Err(HttpError::LengthRequired));
        assert!(matches!(
            parse_request(b"GARBAGE\x01\r\n\r\n", &L),
            Err(HttpError::Malformed(_))
        ));
        let long = vec![b'a'; 2000];
        assert_eq!(
            parse_request(&long, &L),
            Err(HttpError::HeadTooLarge { max: 1024 })
        );
        let expect = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n";
        assert_eq!(
            parse_request(expect, &L),
            Ok(Parsed::Incomplete {
                expect_continue: true
            })
        );
        for bad in ["+3", "-1", "", "3,3", "0x3", "3 3", "3\u{a0}", "\u{3000}3"] {
            let req = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\nabc");
            assert!(
                matches!(
                    parse_request(req.as_bytes(), &L),
                    Err(HttpError::Malformed("bad Content-Length"))
                ),
                "{bad:?}"
            );
        }
        let conflict = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
        assert!(matches!(
            parse_request(conflict, &L),
            Err(HttpError::Malformed(_))
        ));
    }
}
