//! The TCP transport's frames (docs/PROTOCOL.md, "TCP"): length-prefixed Frames cut with
//! the pure decoder, HELLO first, then control verbs on the reactor and everything else to
//! a backend service. pbbp2 WebSocket messages come here too, one Frame each.

use prost::Message;

use super::conn::State;
use super::{Flow, Reactor};
use crate::codec::{self, FrameError};
use crate::config::Config;
use crate::metrics::{inc, BadFrame, CloseReason, Transport};
use crate::proto::{code, method, Frame};
use crate::types::{CredsRef, Ref};

impl Reactor {
    pub(super) fn process_tcp(&mut self, idx: u32, gen: u32, data: &[u8]) -> (usize, Flow) {
        let max = self.cfg.limits.max_frame_bytes;
        let mut at = 0;
        loop {
            match codec::decode_tcp(&data[at..], max) {
                Ok(None) => return (at, Flow::Continue),
                Ok(Some((body, used))) => {
                    at += used;
                    inc(&self.metrics.frames_in[Transport::Tcp as usize]);
                    if !self.message_ok(idx) {
                        let msg = "too many messages: over [limits] max_messages_per_s";
                        self.fail(idx, gen, 0, 429, msg, CloseReason::RateLimited);
                        return (data.len(), Flow::Close);
                    }
                    match self.on_frame(idx, gen, body) {
                        Flow::Continue => {}
                        other => return (at, other),
                    }
                }
                Err(e) => {
                    let (kind, code) = match e {
                        FrameError::TooLarge { .. } => (BadFrame::TooLarge, code::FRAME_TOO_LARGE),
                        FrameError::Empty => (BadFrame::Empty, code::BAD_FRAME),
                    };
                    self.metrics.bad_frame(kind);
                    // The stream cannot be resynchronised after a bad prefix.
                    self.fail(
                        idx,
                        gen,
                        0,
                        code,
                        &e.to_string(),
                        CloseReason::ProtocolError,
                    );
                    return (data.len(), Flow::Close);
                }
            }
        }
    }

    pub(super) fn on_frame(&mut self, idx: u32, gen: u32, body: &[u8]) -> Flow {
        // The first frame, a HELLO, read in place (no Frame; the credentials borrowed from
        // it); anything else, or anything odd, is decoded as a Frame below.
        let hello = self
            .conns
            .get(idx, gen)
            .is_some_and(|c| c.state == State::Hello);
        if let Some(v) = hello
            .then(|| crate::codec::HelloView::parse(body))
            .flatten()
        {
            return self.hello(idx, gen, v.seqid, CredsRef::from_lookup(|k| v.header(k)));
        }
        let f = match Frame::decode(body) {
            Ok(f) => f,
            Err(e) => {
                self.metrics.bad_frame(BadFrame::Decode);
                return self.protocol_error(
                    idx,
                    gen,
                    0,
                    code::BAD_FRAME,
                    &format!("undecodable frame: {e}"),
                );
            }
        };
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return Flow::Close;
        };
        match c.state {
            State::Hello => {
                if f.service != 0 || f.method != method::HELLO {
                    self.metrics.bad_frame(BadFrame::HelloRequired);
                    self.fail(
                        idx,
                        gen,
                        f.seqid,
                        code::HELLO_REQUIRED,
                        "HELLO must be the first frame",
                        CloseReason::ProtocolError,
                    );
                    return Flow::Close;
                }
                self.hello(idx, gen, f.seqid, CredsRef::from_lookup(|k| f.header(k)))
            }
            State::Open => {
                if f.service != 0 {
                    let app = c.app as usize;
                    return self.upstream(idx, gen, app, f);
                }
                match f.method {
                    method::PING => {
                        self.send_frame(
                            idx,
                            gen,
                            &Frame {
                                seqid: f.seqid,
                                method: method::PONG,
                                ..Default::default()
                            },
                        );
                        Flow::Continue
                    }
                    method::PONG => Flow::Continue,
                    method::ACK => {
                        self.on_ack(idx, gen, f.seqid);
                        Flow::Continue
                    }
                    method::BYE => {
                        // Orderly, as any close: what was queued before it (the HELLO's
                        // answer, a PONG, a 101) still goes; over pbbp2 a Close frame too.
                        let ws = (self.conns.get(idx, gen))
                            .is_some_and(|c| c.role == super::Role::Client(Transport::Ws));
                        if ws {
                            self.ws_close(idx, gen, crate::ws::status::NORMAL, "");
                        }
                        self.close_after_flush(idx, gen, CloseReason::Bye);
                        Flow::Close
                    }
                    method::HELLO => self.protocol_error(
                        idx,
                        gen,
                        f.seqid,
                        code::HELLO_REQUIRED,
                        "HELLO was already accepted",
                    ),
                    m => {
                        self.metrics.bad_frame(BadFrame::UnknownMethod);
                        self.protocol_error(
                            idx,
                            gen,
                            f.seqid,
                            code::UNKNOWN_METHOD,
                            &format!("unknown control method {m}"),
                        )
                    }
                }
            }
            State::Authing | State::Closing | State::Waiting => Flow::Pause,
        }
    }
}

/// The gateway's HELLO: the connection id and heartbeat parameters.
impl Reactor {
    /// A HELLO: its credentials to be checked (`start_auth`); reading pauses meanwhile.
    fn hello(&mut self, idx: u32, gen: u32, seqid: u64, creds: CredsRef<'_>) -> Flow {
        if self.start_auth(Ref { idx, gen }, seqid, creds, None) {
            Flow::Pause
        } else {
            self.fail(
                idx,
                gen,
                seqid,
                code::BUSY,
                "busy, try again",
                CloseReason::Busy,
            );
            Flow::Close
        }
    }
}

/// The HELLO answer of a pbbp2 WebSocket connection (a TCP one's is encoded in place,
/// `codec::encode_hello_tcp`).
pub(super) fn hello_reply(cfg: &Config, seqid: u64, conn_id: &str) -> Frame {
    let tail = hello_tail(cfg, true);
    let mut headers = vec![("conn_id", conn_id)];
    headers.extend(tail.iter().map(|(k, v)| (*k, v.as_str())));
    Frame::control(method::HELLO, seqid, &headers)
}

/// The HELLO answer's headers after `conn_id`: the same for every connection of a process
/// and transport (encoded once for the TCP transport: `codec::encode_hello_tcp`).
/// `max_frame_bytes` is the largest Frame the gateway takes from this client: over pbbp2
/// a message is one Frame, also held to `max_message_bytes`. A client that checks its
/// requests against it fails one that is too big alone, where sending it would have closed
/// the connection (ERROR then close on TCP, 1009 over WebSocket) and every call on it.
pub(super) fn hello_tail(cfg: &Config, pbbp2: bool) -> [(&'static str, String); 5] {
    let l = &cfg.limits;
    let max_frame = if pbbp2 {
        super::websocket::message_limit(l, super::conn::wsflag::PBBP2)
    } else {
        l.max_frame_bytes
    };
    [
        (
            "heartbeat_s",
            l.ping_interval_ms.div_ceil(1000).max(1).to_string(),
        ),
        ("heartbeat_ms", l.ping_interval_ms.to_string()),
        ("read_timeout_ms", l.read_timeout_ms.to_string()),
        ("node_id", cfg.node_id.clone()),
        ("max_frame_bytes", max_frame.to_string()),
    ]
}

pub(super) fn error_frame(seqid: u64, code: u16, msg: &str) -> Frame {
    Frame::control(
        method::ERROR,
        seqid,
        &[("code", &code.to_string()), ("message", msg)],
    )
}
