//! The wire message (proto/frame.proto, compiled by build.rs) and its control verbs.

include!(concat!(env!("OUT_DIR"), "/longlink.rs"));

/// Control methods (`service = 0`), docs/PROTOCOL.md "Frame".
pub mod method {
    pub const HELLO: i32 = 1;
    pub const PING: i32 = 2;
    pub const PONG: i32 = 3;
    pub const ACK: i32 = 4;
    pub const BYE: i32 = 5;
    pub const REDIRECT: i32 = 6;
    pub const ERROR: i32 = 7;
    pub const PUSH: i32 = 8;

    pub fn name(m: i32) -> &'static str {
        match m {
            HELLO => "HELLO",
            PING => "PING",
            PONG => "PONG",
            ACK => "ACK",
            BYE => "BYE",
            REDIRECT => "REDIRECT",
            ERROR => "ERROR",
            PUSH => "PUSH",
            _ => "?",
        }
    }
}

/// ERROR frame codes (header `code`), documented in docs/PROTOCOL.md.
pub mod code {
    pub const BAD_FRAME: u16 = 400;
    pub const UNAUTHORIZED: u16 = 401;
    pub const UNKNOWN_APP: u16 = 403;
    pub const UNKNOWN_SERVICE: u16 = 404;
    pub const UNKNOWN_METHOD: u16 = 405;
    pub const INCOMPLETE: u16 = 408;
    pub const HELLO_REQUIRED: u16 = 409;
    pub const FRAME_TOO_LARGE: u16 = 413;
    pub const BACKEND_ERROR: u16 = 502;
    pub const BUSY: u16 = 503;
    pub const BACKEND_TIMEOUT: u16 = 504;
}

impl Frame {
    /// A control frame with the given method and headers.
    pub fn control(method: i32, seqid: u64, headers: &[(&str, &str)]) -> Frame {
        Frame {
            seqid,
            method,
            headers: headers
                .iter()
                .map(|(k, v)| Header {
                    key: (*k).to_string(),
                    value: (*v).to_string(),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// The first header with this key.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.as_str())
    }
}
