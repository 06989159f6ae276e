//! The client HTTP listener (docs/PROTOCOL.md, "WebSocket" and "Long-poll"): requests are
//! framed with the pure parser and routed — `GET /ws` upgrades (auth from the query string,
//! then `websocket.rs` takes over) and `/poll/status` long-polls (`longpoll.rs`).

use serde_json::json;

use super::conn::State;
use super::longpoll::cors_lines;
use super::{Flow, Reactor};
use crate::http::{self, Parsed};
use crate::metrics::{BadFrame, CloseReason};
use crate::types::{CredsRef, Query, Ref};
use crate::ws;

/// Largest request body on the client HTTP listener (its requests carry none that matter).
const MAX_REQUEST_BODY: usize = 64 * 1024;

impl Reactor {
    pub(super) fn process_http(&mut self, idx: u32, gen: u32, data: &[u8]) -> (usize, Flow) {
        let Some(c) = self.conns.get(idx, gen) else {
            return (data.len(), Flow::Close);
        };
        if c.state == State::Waiting {
            // A parked long-poll keeps reading, so a close that came with (or after) its
            // request is seen and the waiter released; a request pipelined behind it waits
            // in the buffer, up to one request's worth (more is not a browser: closed).
            if data.len() > http::DEFAULT_MAX_HEAD + MAX_REQUEST_BODY {
                self.metrics.bad_frame(BadFrame::Flood);
                self.close_now(idx, gen, CloseReason::ProtocolError);
                return (data.len(), Flow::Close);
            }
            return (0, Flow::Continue);
        }
        if c.state != State::Hello {
            return (0, Flow::Pause);
        }
        let limits = http::Limits {
            max_head: http::DEFAULT_MAX_HEAD,
            max_body: MAX_REQUEST_BODY,
        };
        match http::parse_request(data, &limits) {
            Ok(Parsed::Incomplete { .. }) => (0, Flow::Continue),
            Ok(Parsed::Complete(req, used)) => (used, self.http_request(idx, gen, &req)),
            Err(e) => {
                self.http_reply(
                    idx,
                    gen,
                    e.status(),
                    &http::error(e.status(), &e.to_string(), false),
                );
                self.close_after_flush(idx, gen, CloseReason::ProtocolError);
                (data.len(), Flow::Close)
            }
        }
    }

    fn http_request(&mut self, idx: u32, gen: u32, req: &http::Request<'_>) -> Flow {
        let (path, query) = req.target.split_once('?').unwrap_or((req.target, ""));
        match (req.method, path) {
            (_, "/ws") => self.ws_upgrade(idx, gen, req, query),
            ("GET", "/poll/status") => self.poll_status(idx, gen, req, query),
            ("OPTIONS", "/poll/status") => {
                let vary = self.poll_headers(None);
                let extra = self.cors(req.header("origin")).map_or(vary, |o| {
                    let asked = req.header("access-control-request-headers").and_then(|h| std::str::from_utf8(h).ok()).unwrap_or("Content-Type");
                    format!(
                        "{}Access-Control-Allow-Methods: GET, OPTIONS\r\nAccess-Control-Allow-Headers: {asked}\r\nAccess-Control-Max-Age: 600\r\n",
                        cors_lines(&o)
                    )
                });
                let resp = http::response_with(204, "text/plain", &extra, b"", req.keep_alive);
                self.http_done(idx, gen, 204, &resp, req.keep_alive)
            }
            (_, "/poll/status") => {
                let cors = self.cors(req.header("origin"));
                let extra = self.poll_headers(cors.as_deref()) + "Allow: GET, OPTIONS\r\n";
                let mut resp =
                    http::error_with(405, "use GET (or OPTIONS)", &extra, req.keep_alive);
                if req.method == "HEAD" {
                    http::head_only(&mut resp);
                }
                self.http_done(idx, gen, 405, &resp, req.keep_alive)
            }
            _ => self.http_refuse(
                idx,
                gen,
                404,
                &format!("no such path {path}"),
                req.keep_alive,
            ),
        }
    }

    pub(super) fn http_reply(&mut self, idx: u32, gen: u32, status: u16, bytes: &[u8]) {
        self.metrics.http_status(status);
        self.send_bytes(idx, gen, bytes);
    }

    /// Answers a request; keep-alive waits for the next one, else closes after the answer.
    pub(super) fn http_done(
        &mut self,
        idx: u32,
        gen: u32,
        status: u16,
        bytes: &[u8],
        keep_alive: bool,
    ) -> Flow {
        self.http_reply(idx, gen, status, bytes);
        if keep_alive {
            self.arm_handshake(idx, gen);
            Flow::Continue
        } else {
            self.close_after_flush(idx, gen, CloseReason::Peer);
            Flow::Close
        }
    }

    pub(super) fn http_refuse(
        &mut self,
        idx: u32,
        gen: u32,
        status: u16,
        msg: &str,
        keep_alive: bool,
    ) -> Flow {
        self.http_done(
            idx,
            gen,
            status,
            &http::error(status, msg, keep_alive),
            keep_alive,
        )
    }

    // ---- WebSocket upgrade ------------------------------------------------------------

    fn ws_upgrade(&mut self, idx: u32, gen: u32, req: &http::Request<'_>, query: &str) -> Flow {
        let deflate = self.cfg.http.permessage_deflate;
        let u = match ws::check_upgrade(req.method, req.version, &req.headers, deflate) {
            Ok(u) => u,
            Err((status, msg)) => {
                let extra = if status == 426 {
                    "Sec-WebSocket-Version: 13\r\n"
                } else {
                    ""
                };
                let body = serde_json::to_vec(&json!({ "error": msg })).unwrap_or_default();
                let resp = http::response_with(status, "application/json", extra, &body, false);
                return self.http_done(idx, gen, status, &resp, false);
            }
        };
        let allowed = &self.cfg.http.allowed_origins;
        if !allowed.is_empty() {
            let origin = req
                .header("origin")
                .and_then(|o| std::str::from_utf8(o).ok());
            if !origin.is_some_and(|o| allowed.iter().any(|a| a == o)) {
                return self.http_refuse(idx, gen, 403, "origin not allowed", false);
            }
        }
        let q = match Query::parse(query) {
            Ok(q) => q,
            Err((status, msg)) => return self.http_refuse(idx, gen, status, &msg, false),
        };
        if self.conns.get(idx, gen).is_none() {
            return Flow::Close;
        }
        if self.start_auth(
            Ref { idx, gen },
            0,
            CredsRef::from_lookup(|k| q.get(k)),
            Some(u),
        ) {
            Flow::Pause
        } else {
            self.http_refuse(idx, gen, 503, "busy, try again", false)
        }
    }
}
