//! WebSocket connections on the reactor (RFC 6455): frames cut with the pure decoder in
//! `crate::ws`, messages assembled and validated, control frames answered, the close
//! handshake, messages routed (pbbp2: one Frame per binary message; raw: the app's default
//! service), and server pings for idle connections.

use std::sync::atomic::Ordering::Relaxed;

use super::conn::{write_ws_message, wsflag, State};
use super::tcp::hello_reply;
use super::{Flow, Reactor, Role};
use crate::metrics::{inc, BadFrame, CloseReason, Transport};
use crate::proto::Frame;
use crate::timer::{TimerKey, TimerKind};
use crate::types::Ref;
use crate::ws;

/// Bytes a connection may inflate in one go before it yields to the others.
const INFLATE_PER_TURN: usize = 256 * 1024;

/// A fragmented message being received.
pub(super) struct Fragmented {
    pub(super) opcode: u8,
    /// permessage-deflate: compressed (RSV1 on its first frame); inflated whole at the end,
    /// its UTF-8 checked then.
    pub(super) compressed: bool,
    pub(super) buf: Vec<u8>,
    pub(super) utf8: ws::Utf8State,
}

impl Fragmented {
    /// Bytes it holds (counted in the input held across connections).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// The largest message a connection may send, all fragments together (inflated, when
/// compressed). A pbbp2 message is one Frame, so it is also held to the frame limit that a
/// Frame has on TCP.
pub(super) fn message_limit(l: &crate::config::Limits, ws_flags: u8) -> usize {
    if ws_flags & wsflag::PBBP2 != 0 {
        l.max_message_bytes.min(l.max_frame_bytes)
    } else {
        l.max_message_bytes
    }
}

impl Reactor {
    pub(super) fn process_ws(&mut self, idx: u32, gen: u32, data: &[u8]) -> (usize, Flow) {
        let mut at = 0;
        self.inflated_now = 0;
        loop {
            // Compressed input multiplies into work (1 KiB can inflate to a whole message):
            // past a budget the connection yields its turn and goes on in the next one, so
            // that one client cannot hold the reactor for long.
            if self.inflated_now >= INFLATE_PER_TURN {
                self.resume_later.push(Ref { idx, gen });
                return (at, Flow::Pause);
            }
            let Some(c) = self.conns.get_mut(idx, gen) else {
                return (data.len(), Flow::Close);
            };
            if c.state != State::Open {
                return (at, Flow::Pause);
            }
            let deflate = c.ws & wsflag::DEFLATE != 0;
            let max = message_limit(&self.cfg.limits, c.ws);
            let h = match ws::decode_header(&data[at..], max, deflate) {
                Ok(None) => return (at, Flow::Continue),
                Ok(Some(h)) => h,
                Err(e) => {
                    let kind = match e {
                        ws::WsError::TooLarge { .. } => BadFrame::WsTooLarge,
                        _ => BadFrame::WsProtocol,
                    };
                    self.metrics.bad_frame(kind);
                    self.ws_fail(idx, gen, e.close_code(), &e.to_string());
                    return (data.len(), Flow::Close);
                }
            };
            // The message limit covers all fragments together; check it from the header,
            // before the payload is buffered (RFC 6455 §10.4).
            if h.opcode == ws::op::CONTINUATION {
                let so_far = c.frag().map_or(0, |f| f.buf.len());
                if so_far + h.payload_len > max {
                    self.metrics.bad_frame(BadFrame::WsTooLarge);
                    let msg = format!("message over {max} bytes");
                    self.ws_fail(idx, gen, ws::status::TOO_BIG, &msg);
                    return (data.len(), Flow::Close);
                }
            }
            if data.len() - at < h.frame_len() {
                return (at, Flow::Continue);
            }
            c.ws &= !wsflag::PING_OUT;
            let payload = &data[at + h.header_len..at + h.frame_len()];
            at += h.frame_len();
            match self.ws_frame(idx, gen, h, payload) {
                Flow::Continue => {}
                other => return (at, other),
            }
        }
    }

    fn ws_frame(&mut self, idx: u32, gen: u32, h: ws::Header, masked: &[u8]) -> Flow {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return Flow::Close;
        };
        match h.opcode {
            ws::op::PING => {
                // A ping flood is a message flood (each would be answered).
                if self.over_message_rate(idx, gen) {
                    return Flow::Close;
                }
                let mut p = Vec::with_capacity(masked.len());
                ws::unmask_into(masked, h.mask, &mut p);
                self.send_ws(idx, gen, ws::op::PONG, &p);
                Flow::Continue
            }
            ws::op::PONG => Flow::Continue,
            ws::op::CLOSE => {
                let mut p = Vec::with_capacity(masked.len());
                ws::unmask_into(masked, h.mask, &mut p);
                match ws::check_close(&p) {
                    Ok(code) => {
                        // Echo the code (§5.5.1), then close once our close frame is out.
                        if c.ws & wsflag::CLOSE_SENT == 0 {
                            c.ws |= wsflag::CLOSE_SENT;
                            let reply = if p.is_empty() {
                                vec![]
                            } else {
                                code.to_be_bytes().to_vec()
                            };
                            self.send_ws(idx, gen, ws::op::CLOSE, &reply);
                        }
                        self.close_after_flush(idx, gen, CloseReason::Bye);
                    }
                    Err(code) => {
                        let kind = if code == ws::status::INVALID_PAYLOAD {
                            BadFrame::WsUtf8
                        } else {
                            BadFrame::WsProtocol
                        };
                        self.metrics.bad_frame(kind);
                        self.ws_fail(idx, gen, code, "bad close frame");
                    }
                }
                Flow::Close
            }
            ws::op::TEXT | ws::op::BINARY => {
                if c.frag().is_some() {
                    self.metrics.bad_frame(BadFrame::WsProtocol);
                    self.ws_fail(
                        idx,
                        gen,
                        ws::status::PROTOCOL_ERROR,
                        "new message inside a fragmented one",
                    );
                    return Flow::Close;
                }
                if h.fin && h.rsv1 {
                    let mut z = std::mem::take(&mut self.msg);
                    z.clear();
                    ws::unmask_into(masked, h.mask, &mut z);
                    let flow = self.ws_inflated(idx, gen, h.opcode, &z);
                    if z.capacity() <= 64 * 1024 {
                        self.msg = z;
                    }
                    return flow;
                }
                if h.fin {
                    let mut msg = std::mem::take(&mut self.msg);
                    msg.clear();
                    ws::unmask_into(masked, h.mask, &mut msg);
                    let flow = if h.opcode == ws::op::TEXT && std::str::from_utf8(&msg).is_err() {
                        self.bad_utf8(idx, gen)
                    } else {
                        self.ws_message(idx, gen, h.opcode, &msg)
                    };
                    // Keep the buffer for the next message unless a big one inflated it.
                    if msg.capacity() <= 64 * 1024 {
                        self.msg = msg;
                    }
                    return flow;
                }
                let mut f = Box::new(Fragmented {
                    opcode: h.opcode,
                    compressed: h.rsv1,
                    buf: Vec::with_capacity(masked.len()),
                    utf8: ws::Utf8State::default(),
                });
                ws::unmask_into(masked, h.mask, &mut f.buf);
                if f.opcode == ws::op::TEXT && !f.compressed && !f.utf8.feed(&f.buf, false) {
                    return self.bad_utf8(idx, gen);
                }
                self.input_held += f.capacity();
                c.set_frag(f);
                if self.input_held > self.cfg.limits.max_input_bytes {
                    self.over_input(idx, gen);
                    return Flow::Close;
                }
                Flow::Continue
            }
            _ => {
                // CONTINUATION (the decoder admits no other opcode).
                let Some(mut f) = c.take_frag() else {
                    self.metrics.bad_frame(BadFrame::WsProtocol);
                    self.ws_fail(
                        idx,
                        gen,
                        ws::status::PROTOCOL_ERROR,
                        "continuation without a message",
                    );
                    return Flow::Close;
                };
                // Counted as it was; the count follows it from here (or it goes).
                self.input_held -= f.capacity();
                ws::unmask_into(masked, h.mask, &mut f.buf);
                // Fail fast: invalid UTF-8 is refused at the fragment that shows it.
                if f.opcode == ws::op::TEXT && !f.compressed && !f.utf8.feed(&f.buf, h.fin) {
                    return self.bad_utf8(idx, gen);
                }
                if h.fin && f.compressed {
                    self.ws_inflated(idx, gen, f.opcode, &f.buf)
                } else if h.fin {
                    self.ws_message(idx, gen, f.opcode, &f.buf)
                } else {
                    self.input_held += f.capacity();
                    c.set_frag(f);
                    if self.input_held > self.cfg.limits.max_input_bytes {
                        self.over_input(idx, gen);
                        return Flow::Close;
                    }
                    Flow::Continue
                }
            }
        }
    }

    /// A whole compressed message: inflated (bounded by `max_message_bytes`: a deflate bomb
    /// is refused with 1009 once it reaches the limit), checked, then handled as any other.
    fn ws_inflated(&mut self, idx: u32, gen: u32, opcode: u8, z: &[u8]) -> Flow {
        let flags = self.conns.get(idx, gen).map_or(0, |c| c.ws);
        let max = message_limit(&self.cfg.limits, flags);
        let mut msg = std::mem::take(&mut self.inflated);
        msg.clear();
        let flow = match crate::deflate::unpack(z, max, &mut msg) {
            Err(crate::deflate::InflateError::TooBig) => {
                self.metrics.bad_frame(BadFrame::WsTooLarge);
                let why = format!("message inflates past {max} bytes");
                self.ws_fail(idx, gen, ws::status::TOO_BIG, &why);
                Flow::Close
            }
            Err(crate::deflate::InflateError::Corrupt) => {
                self.metrics.bad_frame(BadFrame::WsDeflate);
                let why = "compressed data that does not inflate";
                self.ws_fail(idx, gen, ws::status::INVALID_PAYLOAD, why);
                Flow::Close
            }
            Ok(()) => {
                inc(&self.metrics.ws_inflated);
                self.inflated_now += msg.len();
                if opcode == ws::op::TEXT && std::str::from_utf8(&msg).is_err() {
                    self.bad_utf8(idx, gen)
                } else {
                    self.ws_message(idx, gen, opcode, &msg)
                }
            }
        };
        // Kept for the next message unless a big one inflated it.
        if msg.capacity() <= 64 * 1024 {
            self.inflated = msg;
        }
        flow
    }

    fn bad_utf8(&mut self, idx: u32, gen: u32) -> Flow {
        self.metrics.bad_frame(BadFrame::WsUtf8);
        self.ws_fail(idx, gen, ws::status::INVALID_PAYLOAD, "text is not UTF-8");
        Flow::Close
    }

    /// Over `max_messages_per_s`: closed with 1008 (policy, §7.4.1) and the reason; true.
    fn over_message_rate(&mut self, idx: u32, gen: u32) -> bool {
        if self.message_ok(idx) {
            return false;
        }
        let why = "rate limited: max_messages_per_s";
        self.ws_close(idx, gen, ws::status::POLICY, why);
        self.close_after_flush(idx, gen, CloseReason::RateLimited);
        true
    }

    /// A whole message from the client.
    fn ws_message(&mut self, idx: u32, gen: u32, opcode: u8, msg: &[u8]) -> Flow {
        inc(&self.metrics.frames_in[Transport::Ws as usize]);
        if self.over_message_rate(idx, gen) {
            return Flow::Close;
        }
        let Some(c) = self.conns.get(idx, gen) else {
            return Flow::Close;
        };
        if c.ws & wsflag::PBBP2 != 0 {
            if opcode != ws::op::BINARY {
                self.metrics.bad_frame(BadFrame::WsProtocol);
                // 1003: a data type this endpoint does not accept (§7.4.1).
                self.ws_fail(idx, gen, 1003, "pbbp2 carries one Frame per binary message");
                return Flow::Close;
            }
            return self.on_frame(idx, gen, msg);
        }
        // Raw mode: the message goes to the app's default service.
        let app_idx = c.app as usize;
        let app = &self.cfg.apps[app_idx];
        match app.service(app.default_service) {
            Some(s) if s.is_echo() => {
                inc(&self.metrics.upstream_frames);
                self.send_ws(idx, gen, opcode, msg);
                Flow::Continue
            }
            Some(s) => {
                let f = Frame {
                    service: s.id,
                    payload_type: if opcode == ws::op::TEXT {
                        "text".into()
                    } else {
                        String::new()
                    },
                    payload: bytes::Bytes::copy_from_slice(msg),
                    ..Default::default()
                };
                self.upstream(idx, gen, app_idx, f)
            }
            None => {
                self.metrics.bad_frame(BadFrame::UnknownService);
                Flow::Continue
            }
        }
    }

    /// Queues one unfragmented server frame (a data message compressed when it qualifies).
    pub(super) fn send_ws(&mut self, idx: u32, gen: u32, opcode: u8, payload: &[u8]) {
        let data = !ws::op::is_control(opcode);
        let min = self.cfg.http.deflate_min_bytes;
        self.queue(idx, gen, data, |_, mode, out| {
            write_ws_message(&mut out.buf, opcode, payload, mode, min)
        });
    }

    /// Queues our close frame, once.
    pub(super) fn ws_close(&mut self, idx: u32, gen: u32, code: u16, reason: &str) {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        if c.ws & wsflag::CLOSE_SENT != 0 {
            return;
        }
        c.ws |= wsflag::CLOSE_SENT;
        self.send_ws(idx, gen, ws::op::CLOSE, &ws::close_payload(code, reason));
    }

    /// Fails the connection (§7.1.7): a close frame with the code, then close.
    pub(super) fn ws_fail(&mut self, idx: u32, gen: u32, code: u16, reason: &str) {
        self.ws_close(idx, gen, code, reason);
        self.close_after_flush(idx, gen, CloseReason::ProtocolError);
    }

    /// The upgrade was admitted: answer 101, and in pbbp2 mode send HELLO first.
    pub(super) fn upgraded(&mut self, r: Ref, u: ws::Upgrade, conn_id: &str) {
        let Some(c) = self.conns.get_mut(r.idx, r.gen) else {
            return;
        };
        c.role = Role::Client(Transport::Ws);
        if u.pbbp2 {
            c.ws |= wsflag::PBBP2;
        }
        if let Some(d) = u.deflate {
            c.ws |= wsflag::DEFLATE;
            if d.small_window() {
                c.ws |= wsflag::DEFLATE_SMALL;
            }
            inc(&self.metrics.ws_deflate_connections);
        }
        let t = Transport::Ws as usize;
        inc(&self.metrics.accepted[t]);
        self.metrics.connections[t].fetch_add(1, Relaxed);
        inc(&self.metrics.ws_upgrades);
        self.metrics.http_status(101);
        let proto = if u.pbbp2 {
            "Sec-WebSocket-Protocol: pbbp2\r\n"
        } else {
            ""
        };
        let ext = match u.deflate {
            Some(d) => format!("Sec-WebSocket-Extensions: {}\r\n", d.response()),
            None => String::new(),
        };
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{proto}{ext}\r\n",
            u.accept
        );
        self.send_bytes(r.idx, r.gen, resp.as_bytes());
        if u.pbbp2 {
            let hello = hello_reply(&self.cfg, 0, conn_id);
            self.send_frame(r.idx, r.gen, &hello);
        }
        let k = TimerKey {
            idx: r.idx,
            gen: r.gen,
            kind: TimerKind::Read,
        };
        self.wheel
            .insert(self.now + self.cfg.limits.ping_interval_ms, k);
    }

    /// The read timer of a WebSocket connection fired (the Frontier model: no ticker per
    /// connection). Idle for `ping_interval`: ping once and re-arm; still silent at the read
    /// timeout (at least a fifth of an interval after the ping): close.
    pub(super) fn ws_idle(&mut self, k: TimerKey) {
        let Some(c) = self.conns.get_mut(k.idx, k.gen) else {
            return;
        };
        let iv = self.cfg.limits.ping_interval_ms;
        let dead_after = self.cfg.limits.read_timeout_ms.max(iv + iv / 5);
        let last = c.last_read;
        let idle = self.now.saturating_sub(last);
        if idle >= dead_after {
            self.close_notifying(k.idx, k.gen, CloseReason::ReadTimeout);
        } else if idle >= iv {
            if c.ws & wsflag::PING_OUT == 0 {
                c.ws |= wsflag::PING_OUT;
                inc(&self.metrics.ws_pings_sent);
                self.send_ws(k.idx, k.gen, ws::op::PING, b"");
            }
            self.wheel.insert(last + dead_after, k);
        } else {
            self.wheel.insert(last + iv, k);
        }
    }
}
