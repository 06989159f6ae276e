//! Socket I/O on the reactor: accepting, reading into the scratch buffer and handing bytes to
//! the role's processor, appending and flushing output, and closing.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;

use mio::{Interest, Token};

use super::conn::{enqueue, flag, write_push, wsflag, Conn, InBuf, State};
use super::output::{self, Output};
use super::tcp::error_frame;
use super::{
    Flow, Reactor, Role, ACCEPT_BATCH, ACCEPT_RETRY_MS, CONN_BASE, LINGER_MS, MAX_PROTOCOL_ERRORS,
    READ_BUDGET, SCRATCH,
};
use crate::codec;
use crate::metrics::{inc, BadFrame, CloseReason, Transport};
use crate::net::Sock;
use crate::proto::{code, method, Frame};
use crate::timer::{TimerKey, TimerKind};
use crate::types::Ref;
use crate::worker::{Done, Job};
use crate::ws;
use prost::Message;

impl Reactor {
    // ---- accept ----------------------------------------------------------------------

    pub(super) fn accept(&mut self, li: usize) {
        for _ in 0..ACCEPT_BATCH {
            let Some(Some((l, role))) = self.listeners.get(li) else {
                return;
            };
            let role = *role;
            match l.accept() {
                Ok((sock, peer)) if role == Role::Api && !self.api_may(peer) => {
                    self.refuse_api(sock, peer)
                }
                Ok((sock, _)) if role == Role::Api => {
                    self.add_conn(sock, role, None);
                }
                Ok((sock, peer)) => match self.admit_peer(peer) {
                    Ok(ip) => {
                        self.add_conn(sock, role, ip);
                    }
                    Err(why) => self.refuse_client(sock, role, why),
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // EMFILE and friends: the connection stays in the backlog; try again soon
                    // rather than spinning. Logged at most once a second (counted always).
                    inc(&self.metrics.accept_errors);
                    self.accept_errors_unlogged += 1;
                    if self.now >= self.accept_log_after {
                        log::warn!(
                            "accept on {}: {e} ({} accept error(s) since the last report)",
                            l.local(),
                            self.accept_errors_unlogged
                        );
                        self.accept_log_after = self.now + 1000;
                        self.accept_errors_unlogged = 0;
                    }
                    self.accept_retry_at = Some(self.now + ACCEPT_RETRY_MS);
                    return;
                }
            }
        }
        // Edge-triggered: more may be waiting; come back next turn.
        self.accept_again.push(li);
    }

    /// `[api] allow_from`: whether the internal API takes a connection from `peer` (its
    /// address as accept gave it; a unix socket's peer, None, is local and always taken).
    fn api_may(&self, peer: Option<std::net::SocketAddr>) -> bool {
        let allow = &self.cfg.api.allow_from;
        match peer {
            Some(a) if !allow.is_empty() => allow.iter().any(|r| r.contains(a.ip())),
            _ => true,
        }
    }

    /// A peer `allow_from` leaves out: 403 (one write into the fresh socket's empty
    /// buffer) and closed, counted.
    fn refuse_api(&mut self, sock: Sock, peer: Option<std::net::SocketAddr>) {
        inc(&self.metrics.api_refused);
        self.metrics.api_status(403);
        sock.refuse(&crate::http::error(
            403,
            "this address may not use the internal API ([api] allow_from)",
            false,
        ));
        match peer {
            Some(p) => log::debug!("internal API: refused {p} (allow_from)"),
            None => log::debug!("internal API: refused a unix-socket peer (allow_from)"),
        }
    }

    /// Takes an accepted connection in (`ip`: counted against its address); its slot, or
    /// None when it is gone already (it could not be registered, or its first bytes
    /// closed it).
    ///
    /// Every client transport speaks first, and its first bytes (the HELLO, the HTTP
    /// request) have nearly always arrived by the time accept takes the connection: they
    /// are read here, before the socket joins the epoll set. Registered after, it brings no
    /// readiness event for bytes already taken, so each connect saves an event's delivery
    /// and its turn; bytes that come between the read and the registration are reported
    /// by the registration itself (epoll checks readiness as it adds). A TLS connection
    /// waits for its event (its handshake steps run on the workers).
    pub(super) fn add_conn(&mut self, sock: Sock, role: Role, ip: Option<IpAddr>) -> Option<u32> {
        let early = role != Role::Api && !sock.is_tls();
        let (idx, gen) = self.conns.insert(Conn {
            sock,
            role,
            state: if role == Role::Api {
                State::Open
            } else {
                State::Hello
            },
            flags: 0,
            drained: false,
            errors: 0,
            close_reason: CloseReason::Peer,
            app: 0,
            dev_tag: 0,
            inbuf: InBuf::default(),
            out: None,
            last_read: self.now,
            deadline: 0,
            hs_armed: false,
            seq: 0,
            connected_at: self.unix_now,
            device: None,
            user: None,
            ws: 0,
            extra: None,
        });
        match role {
            Role::Client(t) => {
                self.client_conns += 1;
                inc(&self.metrics.accepted[t as usize]);
                self.metrics.connections[t as usize].fetch_add(1, Relaxed);
                if !early {
                    self.arm_handshake(idx, gen);
                }
            }
            Role::Api => {
                self.metrics.api_connections.fetch_add(1, Relaxed);
                let k = TimerKey {
                    idx,
                    gen,
                    kind: TimerKind::Read,
                };
                self.wheel
                    .insert(self.now + self.cfg.api.idle_timeout_ms, k);
            }
            Role::Http => {
                // The request (upgrade or poll) must arrive within the handshake timeout, so
                // a slowloris trickle is closed.
                self.client_conns += 1;
                inc(&self.metrics.http_accepted);
                if !early {
                    self.arm_handshake(idx, gen);
                }
            }
        }
        self.admitted_peer(idx, ip);
        if early {
            // Nothing is written before the registration: output goes out after it
            // (`answer_now` below, or the turn's end).
            self.read_ready(idx, gen, false);
        }
        let c = self.conns.get_mut(idx, gen)?;
        let token = Token(idx as usize + CONN_BASE);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut c.sock, token, Interest::READABLE)
        {
            inc(&self.metrics.register_errors);
            log::warn!("epoll register: {e}");
            self.close_now(idx, gen, CloseReason::IoError);
            return None;
        }
        if early {
            self.answer_now(Ref { idx, gen });
        }
        self.conns.get(idx, gen).map(|_| idx)
    }

    /// A connection whose first bytes were read at accept, once registered: the reactor's
    /// own auth answer (static tokens, dev mode) is applied and its output written now,
    /// while the connection's state is still in cache. Left to the turn's end, it waited
    /// behind the rest of the accept batch (up to 256 connections' syscalls), and each step
    /// of the connect fetched the same state from memory again. Then the handshake's
    /// deadline, only for a connection still waiting (for the rest of its HELLO or request,
    /// or for an auth backend or a worker): one admitted here needs no timer (a wheel entry
    /// fewer to insert, and to find stale when it falls due).
    fn answer_now(&mut self, r: Ref) {
        if matches!(self.local_done.last(), Some(Done::Auth { conn, .. }) if *conn == r) {
            if let Some(Done::Auth {
                conn,
                seqid,
                upgrade,
                result,
            }) = self.local_done.pop()
            {
                self.auth_done(conn, seqid, upgrade, result);
            }
        }
        if self.dirty.last() == Some(&r) {
            self.dirty.pop();
            self.flush(r.idx, r.gen);
        }
        // (`deadline` 0: nothing armed it meanwhile, as a keep-alive HTTP answer does.)
        if self
            .conns
            .get(r.idx, r.gen)
            .is_some_and(|c| c.deadline == 0 && matches!(c.state, State::Hello | State::Authing))
        {
            self.arm_handshake(r.idx, r.gen);
        }
    }

    /// The connection's first request (HELLO, upgrade, poll; or a keep-alive HTTP
    /// connection's next one) must arrive within the handshake timeout.
    pub(super) fn arm_handshake(&mut self, idx: u32, gen: u32) {
        let at = self.now + self.cfg.limits.handshake_timeout_ms;
        self.arm(idx, gen, TimerKind::Handshake, at);
    }

    /// Arms the timer of the connection's current state (handshake, poll timeout, linger)
    /// for `at`; entries armed for earlier deadlines are stale from now on.
    pub(super) fn arm(&mut self, idx: u32, gen: u32, kind: TimerKind, at: u64) {
        if let Some(c) = self.conns.get_mut(idx, gen) {
            // A pipelining client answered a thousand times in a turn would otherwise put a
            // thousand equal entries on the wheel, each held for the timeout.
            let again = kind == TimerKind::Handshake && c.hs_armed && c.deadline == at;
            c.deadline = at;
            c.hs_armed = kind == TimerKind::Handshake;
            if !again {
                self.wheel.insert(at, TimerKey { idx, gen, kind });
            }
        }
    }

    // ---- input -----------------------------------------------------------------------

    /// Reads until the socket is drained (or the budget is spent).
    pub(super) fn on_readable(&mut self, idx: u32, gen: u32) {
        self.read_ready(idx, gen, true);
    }

    /// `to_eof`: keep reading until EAGAIN or EOF. Otherwise a short read ends the loop: with
    /// edge-triggered epoll it means the receive queue is empty, and later data brings a new
    /// edge, so the extra read() that would only return EAGAIN is saved (one syscall per
    /// event). A FIN that came with the data is flagged on the event (EPOLLRDHUP): `to_eof`.
    pub(super) fn read_ready(&mut self, idx: u32, gen: u32, to_eof: bool) {
        // An edge (or a read asked for): what `resume` knew of the receive queue is stale.
        match self.conns.get_mut(idx, gen) {
            Some(c) => c.drained = false,
            None => return,
        }
        if self.quiescing {
            return; // a live upgrade: the new process (or this one, resumed) reads it
        }
        if self.scratch.is_empty() {
            // Re-entered while another connection's bytes are being processed (the buffer is
            // lent out): a read into it would look like EOF. Read at the top of the next turn.
            self.again.push(Ref { idx, gen });
            return;
        }
        if self
            .conns
            .get(idx, gen)
            .is_some_and(|c| c.sock.tls_handshaking())
        {
            self.tls_handshake(idx, gen);
            return;
        }
        let mut budget = READ_BUDGET;
        loop {
            let Some(c) = self.conns.get_mut(idx, gen) else {
                return;
            };
            if c.state == State::Authing || c.flags & flag::BUSY != 0 {
                return; // paused; `resume` reads when the worker answers
            }
            if c.flags & flag::API_FULL != 0 {
                // Paused for its unread answers, and exempt from `max_input_bytes`: what it
                // sends meanwhile waits in the kernel (its window closes), not in `inbuf`.
                return;
            }
            // TLS: rustls reads the socket in record-sized pieces and may hold decrypted
            // bytes, so a short read says nothing about the socket: read to EAGAIN.
            let to_eof = to_eof || c.sock.is_tls();
            let linger = c.flags & flag::LINGER != 0;
            if c.state == State::Closing && !linger {
                return;
            }
            match c.sock.read(&mut self.scratch) {
                Ok(0) => {
                    // The peer's FIN. What is queued for it still goes (a half-closed peer
                    // reads on: a HELLO with the FIN right behind it gets its answer, even
                    // when the answer was queued in the same turn as this read), then the
                    // close, as any orderly one.
                    if c.state != State::Closing && c.owes_output() {
                        self.close_after_flush(idx, gen, CloseReason::Peer);
                        return;
                    }
                    if c.state == State::Closing {
                        // Lingering: our close (and close_notify) went out before.
                        let reason = c.close_reason;
                        self.close_now(idx, gen, reason);
                    } else {
                        self.close_notifying(idx, gen, CloseReason::Peer);
                    }
                    return;
                }
                Ok(n) => {
                    if linger {
                        continue; // discarding until the peer's FIN
                    }
                    c.last_read = self.now;
                    if let Role::Client(t) = c.role {
                        self.metrics.bytes_in[t as usize].fetch_add(n as u64, Relaxed);
                    }
                    if !self.ingest(idx, gen, n) {
                        // Paused (a HELLO with its auth, say) after a short read: the
                        // queue was empty, so `resume` skips the read that would find
                        // nothing; new bytes bring an edge, which clears this.
                        if n < SCRATCH && !to_eof {
                            if let Some(c) = self.conns.get_mut(idx, gen) {
                                c.drained = true;
                            }
                        }
                        return;
                    }
                    if n < SCRATCH && !to_eof {
                        return;
                    }
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        self.again.push(Ref { idx, gen });
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // TLS: handshake records the socket would not take yet go out with
                    // the turn's writes (and writability, if need be).
                    if c.sock.tls_pending() && c.flags & flag::DIRTY == 0 {
                        c.flags |= flag::DIRTY;
                        self.dirty.push(Ref { idx, gen });
                    }
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let reason = if linger {
                        c.close_reason
                    } else {
                        let tls = c.sock.is_tls();
                        self.read_error(&e, tls)
                    };
                    self.close_now(idx, gen, reason);
                    return;
                }
            }
        }
    }

    /// Why a read error closes a connection. On TLS, InvalidData is rustls refusing what the
    /// peer sent (clear text on a TLS port, broken records, a handshake message past its
    /// buffer): its alert went out; counted.
    fn read_error(&self, e: &std::io::Error, tls: bool) -> CloseReason {
        if tls && e.kind() == ErrorKind::InvalidData {
            inc(&self.metrics.tls_errors);
            CloseReason::ProtocolError
        } else {
            CloseReason::IoError
        }
    }

    /// A TLS connection in its handshake is readable: its bytes go into rustls here (no
    /// crypto), and the step that processes them (key exchange, signature: ~100-150 µs) runs
    /// on a worker, so that a burst of connects costs the others nothing on this thread. At
    /// most `tls_cap` steps are out at once (a connect flood must not fill the queue auth
    /// and the API share); the others wait, oldest first, for one to come back. A step never
    /// runs here.
    fn tls_handshake(&mut self, idx: u32, gen: u32) {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        if c.state == State::Closing {
            // A drain or shutdown while it shook hands: nothing to say over TLS yet.
            self.close_now(idx, gen, CloseReason::Drained);
            return;
        }
        if self.tls_steps >= self.tls_cap {
            // Its bytes stay in the socket until its turn (rustls's buffers stay small).
            if c.sock.tls_wait(true) {
                self.tls_waiting.push_back(Ref { idx, gen });
            }
            return;
        }
        match c.sock.tls_feed() {
            Ok(0) => {
                self.close_now(idx, gen, CloseReason::Peer);
                return;
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => {
                let reason = self.read_error(&e, true);
                self.close_now(idx, gen, reason);
                return;
            }
        }
        if !c.sock.tls_fed() {
            return;
        }
        let conn = Ref { idx, gen };
        let tls = c.sock.take_tls().expect("handshaking");
        match self.jobs.try_send(Job::TlsStep { conn, tls }) {
            Ok(()) => {
                inc(&self.metrics.worker_jobs);
                self.in_flight += 1;
                self.tls_steps += 1;
            }
            Err(e) => {
                // The queue is full of other work: wait for a step (or the next one) to
                // come back; nothing retries in a loop meanwhile.
                inc(&self.metrics.worker_busy);
                if let Job::TlsStep { tls, .. } = e.into_inner() {
                    if let Some(c) = self.conns.get_mut(idx, gen) {
                        // Not stepped: it goes back as it was, the bytes given to it still
                        // counted for its step.
                        let _ = c.sock.put_tls(tls, false);
                        if c.sock.tls_wait(true) {
                            self.tls_waiting.push_back(conn);
                        }
                    }
                }
                if self.tls_steps == 0 {
                    // No step out to bring it back: try again after a short while.
                    self.accept_retry_at.get_or_insert(self.now + 10);
                }
            }
        }
    }

    /// Starts the waiting handshake steps there is room for, oldest first.
    pub(super) fn tls_next(&mut self) {
        while self.tls_steps < self.tls_cap {
            let Some(r) = self.tls_waiting.pop_front() else {
                return;
            };
            match self.conns.get_mut(r.idx, r.gen) {
                Some(c) => c.sock.tls_wait(false),
                None => continue,
            };
            let before = self.tls_waiting.len();
            self.read_ready(r.idx, r.gen, true);
            if self.tls_waiting.len() > before {
                return; // the queue is full again: it went back to the end of the line
            }
        }
    }

    /// A handshake step came back from a worker: the state goes back into the connection,
    /// its answer (the server's flight, or an alert) out, and reading goes on (the client
    /// may have sent more meanwhile, its first frame included).
    pub(super) fn tls_stepped(
        &mut self,
        conn: Ref,
        tls: Box<crate::net::Shake>,
        result: Result<(), String>,
    ) {
        let (idx, gen) = (conn.idx, conn.gen);
        self.tls_steps = self.tls_steps.saturating_sub(1);
        self.tls_next();
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return; // closed meanwhile (e.g. the handshake timeout): the state is dropped
        };
        // A TLS 1.3 handshake that has ended moves to our record layer here.
        let stepped = result.is_ok();
        let result = result.and(c.sock.put_tls(tls, stepped));
        let sent = c.sock.send_pending();
        if let Err(why) = result {
            log::debug!("TLS handshake failed: {why}");
            inc(&self.metrics.tls_errors);
            self.close_now(idx, gen, CloseReason::ProtocolError);
            return;
        }
        if !c.sock.tls_handshaking() {
            self.tls_shaken += 1;
        }
        match sent {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                if c.flags & flag::DIRTY == 0 {
                    c.flags |= flag::DIRTY;
                    self.dirty.push(conn);
                }
            }
            Err(_) => {
                self.close_now(idx, gen, CloseReason::IoError);
                return;
            }
        }
        self.read_ready(idx, gen, true);
    }

    /// Processes `n` new bytes in the scratch buffer; keeps only an unfinished frame's bytes.
    /// Returns whether reading should go on.
    pub(super) fn ingest(&mut self, idx: u32, gen: u32, n: usize) -> bool {
        let scratch = std::mem::take(&mut self.scratch);
        let c = self.conns.get_mut(idx, gen).expect("caller checked");
        let mut inbuf = c.inbuf.take();
        let taken = inbuf.capacity();
        let role = c.role;
        let (used, flow) = if inbuf.is_empty() {
            let (used, flow) = self.process_all(idx, gen, role, &scratch[..n]);
            if used < n && flow != Flow::Close {
                inbuf.extend_from_slice(&scratch[used..n]);
            }
            (used, flow)
        } else {
            inbuf.extend_from_slice(&scratch[..n]);
            let (used, flow) = self.process_all(idx, gen, role, &inbuf);
            inbuf.drain(..used);
            (used, flow)
        };
        self.scratch = scratch;
        self.put_back_inbuf(idx, gen, inbuf, taken, used > 0) && flow == Flow::Continue
    }

    /// Gives a connection back its leftover input (`taken`: the capacity it had when taken
    /// out; `progress`: whole frames were taken from it), keeping the count of input held
    /// across connections. A client connection whose input would pass `max_input_bytes` is
    /// closed; false then (or when it is gone).
    pub(super) fn put_back_inbuf(
        &mut self,
        idx: u32,
        gen: u32,
        mut inbuf: Vec<u8>,
        taken: usize,
        progress: bool,
    ) -> bool {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            self.input_held -= taken; // it dies with its connection
            return false;
        };
        if inbuf.is_empty() {
            inbuf = Vec::new(); // idle connections hold no input buffer
        } else if inbuf.capacity() > 4 * inbuf.len() && inbuf.capacity() > 4096 {
            inbuf.shrink_to_fit();
        }
        let now = inbuf.capacity();
        self.input_held = self.input_held - taken + now;
        c.inbuf.set(inbuf);
        // The API's requests are bounded on their own (max_body_bytes, one at a time,
        // request_timeout_ms): hoarding clients must not get the API's calls cut.
        let api = c.role == Role::Api;
        if now > taken && self.input_held > self.cfg.limits.max_input_bytes && !api {
            self.over_input(idx, gen);
            return false;
        }
        self.partial_deadline(idx, gen, progress);
        true
    }

    /// Input held across connections passed `max_input_bytes` as this connection's grew:
    /// it is closed (counted), so many slow half-sent frames cannot pin memory together.
    pub(super) fn over_input(&mut self, idx: u32, gen: u32) {
        self.metrics.bad_frame(BadFrame::Flood);
        log::warn!(
            "input held across connections over max_input_bytes ({}): closing {idx}:{gen}",
            self.cfg.limits.max_input_bytes
        );
        self.close_now(idx, gen, CloseReason::Overloaded);
    }

    /// A frame or message begun and not whole within `frame_timeout_ms`: ERROR 408 then
    /// close on TCP and pbbp2, close 1008 in raw WebSocket; counted.
    pub(super) fn incomplete(&mut self, idx: u32, gen: u32) {
        self.metrics.bad_frame(BadFrame::Incomplete);
        let Some(c) = self.conns.get(idx, gen) else {
            return;
        };
        let msg = "a frame was begun and not completed within frame_timeout_ms";
        if c.role == Role::Client(Transport::Ws) && c.ws & wsflag::PBBP2 == 0 {
            // Raw mode has no ERROR frame: the WebSocket's close alone.
            self.ws_close(idx, gen, ws::status::POLICY, msg);
            self.close_after_flush(idx, gen, CloseReason::ReadTimeout);
        } else {
            // TCP and pbbp2: ERROR 408, then the close (`fail` adds pbbp2's Close 1008).
            self.fail(idx, gen, 0, code::INCOMPLETE, msg, CloseReason::ReadTimeout);
        }
    }

    /// A client's frame, or WebSocket message, once begun, must be whole within
    /// `frame_timeout_ms` however its bytes trickle (each byte resets the read timeout, not
    /// this). The deadline runs from the start of the frame left unfinished (`progress`:
    /// earlier frames were completed) or of the fragmented message in progress (control
    /// frames and fragments in between do not move it). One timer entry per connection at
    /// a time: it re-arms itself lazily when the deadline has moved.
    pub(super) fn partial_deadline(&mut self, idx: u32, gen: u32, progress: bool) {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        if c.state != State::Open || !matches!(c.role, Role::Client(_)) {
            return;
        }
        c.hs_armed = false; // `deadline` is a partial frame's from here
        if c.inbuf.is_empty() && c.frag().is_none() {
            c.deadline = 0;
            return;
        }
        if c.deadline == 0 || (progress && c.frag().is_none()) {
            c.deadline = self.now + self.cfg.limits.frame_timeout_ms;
        }
        if c.ws & wsflag::PARTIAL_TIMER == 0 {
            c.ws |= wsflag::PARTIAL_TIMER;
            let k = TimerKey {
                idx,
                gen,
                kind: TimerKind::Partial,
            };
            self.wheel.insert(c.deadline, k);
        }
    }

    /// The partial-frame timer fired: cut the connection off if its deadline is here, or
    /// come back at the deadline if it has moved since (lazy re-arm, one entry).
    pub(super) fn partial_due(&mut self, k: TimerKey) {
        let Some(c) = self.conns.get_mut(k.idx, k.gen) else {
            return;
        };
        c.ws &= !wsflag::PARTIAL_TIMER;
        let partial = !c.inbuf.is_empty() || c.frag().is_some();
        if c.state != State::Open || c.deadline == 0 || !partial {
            return;
        }
        if self.now >= c.deadline {
            self.incomplete(k.idx, k.gen);
        } else {
            c.ws |= wsflag::PARTIAL_TIMER;
            self.wheel.insert(c.deadline, k);
        }
    }

    /// Picks up input that waited while a worker had the connection's HELLO or API request.
    pub(super) fn resume(&mut self, idx: u32, gen: u32) {
        if self.quiescing {
            return; // resumed after the live upgrade, in whichever process
        }
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        if !c.inbuf.is_empty() {
            let inbuf = c.inbuf.take();
            let role = c.role;
            let (used, flow) = self.process_all(idx, gen, role, &inbuf);
            let rest = inbuf[used..].to_vec();
            let kept = self.put_back_inbuf(idx, gen, rest, inbuf.capacity(), used > 0);
            if !kept || flow != Flow::Continue {
                return;
            }
        }
        if let Some(c) = self.conns.get_mut(idx, gen) {
            if std::mem::take(&mut c.drained) {
                return; // nothing came since the short read that paused it
            }
        }
        self.on_readable(idx, gen);
    }

    /// [`Reactor::process`] until the input runs out or a step stops. Client frames are all
    /// taken in one call; an HTTP request is one a call, and one answered at once (a 503, a
    /// 404, a poll with its value ready) leaves the connection ready for the next: a request
    /// pipelined behind it must be served now, not when more bytes happen to arrive.
    pub(super) fn process_all(
        &mut self,
        idx: u32,
        gen: u32,
        role: Role,
        data: &[u8],
    ) -> (usize, Flow) {
        let (mut at, mut flow) = self.process(idx, gen, role, data);
        while flow == Flow::Continue && at > 0 && at < data.len() {
            // Read again: a request can change what the connection is (`GET /ws`).
            let Some(role) = self.conns.get(idx, gen).map(|c| c.role) else {
                return (data.len(), Flow::Close);
            };
            if !matches!(role, Role::Api | Role::Http) {
                break;
            }
            let (used, next) = self.process(idx, gen, role, &data[at..]);
            (at, flow) = (at + used, next);
            if used == 0 {
                break; // the rest is not whole yet, or the connection paused
            }
        }
        (at, flow)
    }

    pub(super) fn process(&mut self, idx: u32, gen: u32, role: Role, data: &[u8]) -> (usize, Flow) {
        match role {
            Role::Client(Transport::Tcp) => self.process_tcp(idx, gen, data),
            Role::Client(Transport::Ws) => self.process_ws(idx, gen, data),
            Role::Api => self.process_api(idx, gen, data),
            Role::Http => self.process_http(idx, gen, data),
        }
    }

    // ---- output ----------------------------------------------------------------------

    /// Appends to a connection's output with `write` (given the connection's role and mode
    /// bits) and closes it as a slow consumer when its backlog passes `max_output_bytes`.
    /// `frame`: count it in `frames_out`.
    pub(super) fn queue(
        &mut self,
        idx: u32,
        gen: u32,
        frame: bool,
        write: impl FnOnce(Role, u8, &mut Output),
    ) {
        let Reactor {
            conns,
            pool,
            dirty,
            metrics,
            output_held,
            ..
        } = self;
        let Some(c) = conns.get_mut(idx, gen) else {
            return;
        };
        if let (true, Role::Client(t)) = (frame, c.role) {
            inc(&metrics.frames_out[t as usize]);
        }
        let (role, mode) = (c.role, c.ws);
        let backlog = enqueue(c, Ref { idx, gen }, pool, dirty, output_held, |out| {
            write(role, mode, out)
        });
        // An API connection gets one answer at a time (bounded by its request): the bound is
        // for clients that do not read their pushes.
        if role != Role::Api {
            self.over_bound(idx, gen, backlog);
        }
    }

    /// A connection's output is `backlog` bytes. Over `max_output_bytes` it has
    /// `slow_consumer_grace_ms` to come back under (a burst it reads through is not a slow
    /// consumer); over twice the bound, or over it while output across connections is past
    /// `max_output_total`, it is a slow consumer now. Returns whether it is still open.
    pub(super) fn over_bound(&mut self, idx: u32, gen: u32, backlog: usize) -> bool {
        let l = &self.cfg.limits;
        if backlog <= l.max_output_bytes {
            return true;
        }
        let grace = l.slow_consumer_grace_ms;
        if backlog > 2 * l.max_output_bytes
            || self.output_held.queued > l.max_output_total
            || grace == 0
        {
            self.close_now(idx, gen, CloseReason::SlowConsumer);
            return false;
        }
        self.start_grace(idx, gen);
        true
    }

    /// A connection went over its output bound: its grace starts (unless it has one).
    pub(super) fn start_grace(&mut self, idx: u32, gen: u32) {
        let grace = self.cfg.limits.slow_consumer_grace_ms;
        if self.over.get(&idx).is_none_or(|&(g, _)| g != gen) {
            self.over.insert(idx, (gen, self.now));
            let k = TimerKey {
                idx,
                gen,
                kind: TimerKind::SlowCheck,
            };
            self.wheel.insert(self.now + grace, k);
        }
    }

    /// A slow-consumer check came due: still over the bound since its grace began: closed.
    pub(super) fn slow_check(&mut self, k: TimerKey) {
        let Some(&(gen, since)) = self.over.get(&k.idx) else {
            return;
        };
        if gen != k.gen {
            return;
        }
        let Some(c) = self.conns.get(k.idx, k.gen) else {
            self.over.remove(&k.idx);
            return;
        };
        if c.backlog() <= self.cfg.limits.max_output_bytes {
            self.over.remove(&k.idx);
        } else if self.now >= since + self.cfg.limits.slow_consumer_grace_ms {
            self.close_now(k.idx, k.gen, CloseReason::SlowConsumer);
        }
    }

    /// Queues a frame the connection's way. One that it cannot take — over a TCP frame's u16
    /// length, or more on the wire than its output has room for under `max_output_bytes`
    /// (which would close it as a slow consumer) — is not sent: the client gets an ERROR with
    /// its seqid instead, and it is counted.
    pub(super) fn send_frame(&mut self, idx: u32, gen: u32, f: &Frame) {
        let Some(c) = self.conns.get(idx, gen) else {
            return;
        };
        let (role, raw, backlog) = (c.role, c.ws & wsflag::PBBP2 == 0, c.backlog());
        let ws = role == Role::Client(Transport::Ws);
        let len = if ws && raw {
            f.payload.len()
        } else {
            f.encoded_len()
        };
        // A frame bigger than the output bound alone can never be taken; otherwise it must
        // fit, with what is queued ahead of it (an upstream answer follows its ACK), under
        // twice the bound, the most a connection may hold during its slow-consumer grace.
        let max_out = self.cfg.limits.max_output_bytes;
        let wire = if ws {
            ws::header_len(len) + len
        } else {
            codec::PREFIX + len
        };
        let room = (2 * max_out).saturating_sub(backlog).min(max_out);
        let too_big = wire > room || (!ws && len > codec::MAX_TCP_FRAME);
        if too_big {
            inc(&self.metrics.frames_too_large_out);
            log::debug!("{idx}:{gen}: a frame of {len} bytes does not fit its transport");
            // Raw WebSocket has no control frames to say so; the message is dropped.
            if !(ws && raw) {
                let max = if ws {
                    room
                } else {
                    codec::MAX_TCP_FRAME.min(room.saturating_sub(codec::PREFIX))
                };
                let msg =
                    format!("a frame of {len} bytes does not fit this transport (room for {max})");
                // Small and ours: queued as it is (checking it too could recurse).
                let e = error_frame(f.seqid, code::FRAME_TOO_LARGE, &msg);
                self.queue_frame(idx, gen, &e);
            }
            return;
        }
        self.queue_frame(idx, gen, f);
    }

    /// The HELLO answer. On the TCP transport it is written straight into the output (no
    /// Frame built, encoded and dropped: the connect path's largest user-space cost); the
    /// WebSocket ways take `send_frame`.
    pub(super) fn send_hello(&mut self, r: Ref, seqid: u64, conn_id: &str) {
        let Some(c) = self.conns.get(r.idx, r.gen) else {
            return;
        };
        if c.role != Role::Client(Transport::Tcp) {
            let reply = super::tcp::hello_reply(&self.cfg, seqid, conn_id);
            self.send_frame(r.idx, r.gen, &reply);
            return;
        }
        let tail = std::mem::take(&mut self.hello_tail);
        self.queue(r.idx, r.gen, true, |_, _, out| {
            codec::encode_hello_tcp(seqid, conn_id, &tail, &mut out.buf)
        });
        self.hello_tail = tail;
    }

    /// Queues a frame the connection's way, unchecked (`send_frame` checks).
    fn queue_frame(&mut self, idx: u32, gen: u32, f: &Frame) {
        let min = self.cfg.http.deflate_min_bytes;
        self.queue(idx, gen, true, |role, mode, out| {
            match role {
                // Big enough to compress (what goes out, the payload alone in raw mode, is
                // no longer than the whole Frame): compressed the way pushes are; rare
                // enough (big answers and errors) to be encoded through a shared frame.
                // Smaller ones (PONGs, HELLO) take the plain path below, as before.
                Role::Client(Transport::Ws)
                    if mode & wsflag::DEFLATE != 0 && f.encoded_len() >= min =>
                {
                    let pbbp2 = mode & wsflag::PBBP2 != 0;
                    if pbbp2 || f.service != 0 || f.method == method::PUSH {
                        let mut whole = f.clone();
                        let seq = std::mem::take(&mut whole.seqid);
                        let shared = codec::Shared::new(&whole);
                        write_push(&shared, seq, role, mode, min, out);
                    }
                    return;
                }
                _ => {}
            }
            let out = &mut out.buf;
            match role {
                Role::Client(Transport::Ws) if mode & wsflag::PBBP2 != 0 => {
                    ws::encode_header(out, true, ws::op::BINARY, f.encoded_len());
                    f.encode(out).expect("Vec grows");
                }
                // Raw mode has no control frames: only payloads travel.
                Role::Client(Transport::Ws) => {
                    if f.service != 0 || f.method == method::PUSH {
                        codec::Shared::new(f).write_ws_raw(out);
                    }
                }
                _ => {
                    let fits = codec::encode_tcp(f, out);
                    debug_assert!(fits.is_ok(), "checked above");
                }
            }
        });
    }

    pub(super) fn send_bytes(&mut self, idx: u32, gen: u32, b: &[u8]) {
        self.queue(idx, gen, false, |_, _, out| out.buf.extend_from_slice(b));
    }

    /// Says goodbye the transport's way and closes after the output drains: BYE on TCP;
    /// BYE then a close frame on pbbp2; a close frame in raw mode.
    pub(super) fn goodbye(
        &mut self,
        idx: u32,
        gen: u32,
        reason: &str,
        ws_code: u16,
        why: CloseReason,
    ) {
        let Some(c) = self.conns.get(idx, gen) else {
            return;
        };
        let (role, raw) = (c.role, c.ws & wsflag::PBBP2 == 0);
        if !(role == Role::Client(Transport::Ws) && raw) {
            let bye = Frame::control(method::BYE, 0, &[("reason", reason)]);
            self.send_frame(idx, gen, &bye);
        }
        if role == Role::Client(Transport::Ws) {
            self.ws_close(idx, gen, ws_code, reason);
        }
        self.close_after_flush(idx, gen, why);
    }

    pub(super) fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for r in dirty.drain(..) {
            self.flush(r.idx, r.gen);
        }
        if self.dirty.is_empty() {
            self.dirty = dirty; // keep the allocation
        }
    }

    /// Writes pending output directly; registers WRITABLE only for a leftover.
    pub(super) fn flush(&mut self, idx: u32, gen: u32) {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        c.flags &= !flag::DIRTY;
        // TLS records sealed before (the socket would not take them) go first.
        match c.sock.send_pending() {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {
                self.dirty.push(Ref { idx, gen }); // again at the end of the turn
                c.flags |= flag::DIRTY;
                return;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if c.flags & flag::WRITABLE == 0 {
                    c.flags |= flag::WRITABLE;
                    self.interest(idx, gen, Interest::READABLE | Interest::WRITABLE);
                }
                return;
            }
            Err(_) => {
                self.close_now(idx, gen, CloseReason::IoError);
                return;
            }
        }
        while let Some(out) = c.out.as_mut().filter(|o| o.backlog() > 0) {
            // Own bytes alone in one write; with shared bodies, all in wire order in one writev.
            let wrote = match out.own_only() {
                Some(own) => c.sock.write(own),
                None => {
                    let mut iov = [IoSlice::new(&[]); output::IOVECS];
                    let k = out.slices(&mut iov);
                    if k == 1 {
                        c.sock.write(&iov[0])
                    } else {
                        c.sock.write_vectored(&iov[..k])
                    }
                }
            };
            match wrote {
                Ok(n) if n > 0 => {
                    let before = out.held();
                    out.advance(n);
                    self.output_held.held -= before - out.held();
                    self.output_held.queued -= n;
                    if let Role::Client(t) = c.role {
                        self.metrics.bytes_out[t as usize].fetch_add(n as u64, Relaxed);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let back_under = out.backlog() <= self.cfg.limits.max_output_bytes;
                    if c.flags & flag::WRITABLE == 0 {
                        c.flags |= flag::WRITABLE;
                        self.interest(idx, gen, Interest::READABLE | Interest::WRITABLE);
                    }
                    if back_under {
                        self.over.remove(&idx); // back under the bound: a new burst, a new grace
                    }
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => {
                    self.close_now(idx, gen, CloseReason::IoError);
                    return;
                }
            }
        }
        // Drained: give the queue back so an idle connection holds none.
        if !self.over.is_empty() {
            self.over.remove(&idx);
        }
        if let Some(out) = c.out.take() {
            self.pool.give(out);
        }
        if c.sock.tls_pending() {
            // Taken into TLS records, not all on the socket yet: wait for writability.
            if c.flags & flag::WRITABLE == 0 {
                c.flags |= flag::WRITABLE;
                self.interest(idx, gen, Interest::READABLE | Interest::WRITABLE);
            }
            return;
        }
        if c.flags & flag::WRITABLE != 0 {
            c.flags &= !flag::WRITABLE;
            if !self.interest(idx, gen, Interest::READABLE) {
                return;
            }
        }
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        if c.flags & flag::API_FULL != 0 {
            c.flags &= !flag::API_FULL;
            self.resume_later.push(Ref { idx, gen });
        }
        // Drained: parked pushes of the device that waited for output room come next.
        if c.flags & flag::REPLAY_ON_DRAIN != 0 {
            c.flags &= !flag::REPLAY_ON_DRAIN;
            self.replay_parked(Ref { idx, gen });
        }
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        if c.state == State::Closing && c.flags & flag::LINGER == 0 {
            // Shut our side, then read until the peer's FIN, so the close is orderly and the
            // peer sees everything we sent (closing with unread input would send a reset).
            c.sock.shutdown_write();
            c.flags |= flag::LINGER;
            self.on_readable(idx, gen);
        }
    }

    /// Changes what epoll reports for a connection. Should that fail, the connection could
    /// hang unnoticed (never told it is writable): it is closed, counted and logged. Returns
    /// whether the connection is still there.
    fn interest(&mut self, idx: u32, gen: u32, interest: Interest) -> bool {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return false;
        };
        let token = Token(idx as usize + CONN_BASE);
        match self
            .poll
            .registry()
            .reregister(&mut c.sock, token, interest)
        {
            Ok(()) => true,
            Err(e) => {
                inc(&self.metrics.register_errors);
                log::warn!("epoll interest of {idx}:{gen}: {e}; closing it");
                self.close_now(idx, gen, CloseReason::IoError);
                false
            }
        }
    }

    // ---- close -----------------------------------------------------------------------

    /// ERROR (same seqid as the offending frame) and count it; close after too many.
    pub(super) fn protocol_error(
        &mut self,
        idx: u32,
        gen: u32,
        seqid: u64,
        code: u16,
        msg: &str,
    ) -> Flow {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return Flow::Close;
        };
        c.errors = c.errors.saturating_add(1);
        if c.errors > MAX_PROTOCOL_ERRORS {
            self.fail(
                idx,
                gen,
                seqid,
                code,
                "too many protocol errors",
                CloseReason::ProtocolError,
            );
            return Flow::Close;
        }
        self.send_frame(idx, gen, &error_frame(seqid, code, msg));
        Flow::Continue
    }

    /// ERROR, then an orderly close.
    pub(super) fn fail(
        &mut self,
        idx: u32,
        gen: u32,
        seqid: u64,
        code: u16,
        msg: &str,
        reason: CloseReason,
    ) {
        self.send_frame(idx, gen, &error_frame(seqid, code, msg));
        // pbbp2: the WebSocket's own close follows the ERROR (RFC 6455 7.1.7).
        if (self.conns.get(idx, gen)).is_some_and(|c| c.role == Role::Client(Transport::Ws)) {
            let status = match reason {
                CloseReason::ProtocolError => ws::status::PROTOCOL_ERROR,
                _ => ws::status::POLICY,
            };
            self.ws_close(idx, gen, status, msg);
        }
        self.close_after_flush(idx, gen, reason);
    }

    /// Stops input and pushes, flushes what is queued, then closes (or after LINGER_MS).
    pub(super) fn close_after_flush(&mut self, idx: u32, gen: u32, reason: CloseReason) {
        self.unregister(idx, gen);
        let Reactor {
            conns,
            pool,
            dirty,
            metrics,
            output_held,
            ..
        } = self;
        let Some(c) = conns.get_mut(idx, gen) else {
            return;
        };
        if c.state == State::Closing {
            return;
        }
        c.state = State::Closing;
        c.close_reason = reason;
        if c.role != Role::Api {
            // Counted when decided: a lingering close may wait on the peer for a while.
            metrics.close(reason);
        }
        enqueue(c, Ref { idx, gen }, pool, dirty, output_held, |_| {});
        self.arm(idx, gen, TimerKind::Linger, self.now + LINGER_MS);
    }

    pub(super) fn unregister(&mut self, idx: u32, gen: u32) {
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        if c.flags & flag::REGISTERED == 0 {
            return;
        }
        self.route(Ref { idx, gen }, false);
        self.durable_closed(Ref { idx, gen });
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        c.flags &= !flag::REGISTERED;
        let app = c.app as usize;
        if let Role::Client(t) = c.role {
            self.event(Ref { idx, gen }, app, t, "offline");
        }
        let Some(c) = self.conns.get_mut(idx, gen) else {
            return;
        };
        let device = c
            .device
            .clone()
            .expect("registered connections have a device");
        let user = c.user.clone();
        let dev_tag = c.dev_tag;
        self.registry
            .remove(app, idx, &device, dev_tag, user.as_deref());
        self.metrics.app_connections[app].fetch_sub(1, Relaxed);
        // Its unacknowledged pushes go to the device's other connections, or wait for it.
        self.park_unacked(Ref { idx, gen });
    }

    /// Closes a connection with nothing owed to it, where no error alert has gone out: a
    /// TLS peer first gets our close_notify (RFC 8446 §6.1; best effort, one write into the
    /// socket), so that a client checking for truncation sees a clean end.
    pub(super) fn close_notifying(&mut self, idx: u32, gen: u32, reason: CloseReason) {
        if let Some(c) = self.conns.get_mut(idx, gen) {
            if c.sock.is_tls() {
                c.sock.shutdown_write();
            }
        }
        self.close_now(idx, gen, reason);
    }

    pub(super) fn close_now(&mut self, idx: u32, gen: u32, reason: CloseReason) {
        self.unregister(idx, gen);
        self.poll_left(idx, gen);
        let Some(mut c) = self.conns.remove(idx, gen) else {
            return;
        };
        if let Some(out) = c.out.take() {
            self.output_held.held -= out.held();
            self.output_held.queued -= out.backlog();
            self.pool.give(out);
        }
        if !self.over.is_empty() {
            self.over.remove(&idx);
        }
        // Its input (a leftover taken out for processing is counted where it is put back).
        self.input_held -= c.inbuf.capacity() + c.frag().map_or(0, |f| f.capacity());
        // No epoll_ctl(DEL): closing the descriptor (below, as `c` drops) takes it out of
        // the epoll set when nothing else holds it, and a syscall per connection is saved.
        // Only a live upgrade shares descriptors: the old process's copies live until it
        // exits, a few ms after the new one took over. A connection the new one closes in
        // that window may bring an event or two for its slot, which a read that finds
        // nothing answers.
        if c.role != Role::Api {
            self.admission.left(idx);
        }
        match c.role {
            Role::Client(t) => {
                self.client_conns -= 1;
                self.metrics.connections[t as usize].fetch_sub(1, Relaxed);
                if c.state != State::Closing {
                    self.metrics.close(reason); // else counted by close_after_flush
                }
            }
            Role::Api => {
                self.metrics.api_connections.fetch_sub(1, Relaxed);
            }
            Role::Http => {
                self.client_conns -= 1;
                if c.state != State::Closing {
                    self.metrics.close(reason);
                }
            }
        }
        log::trace!("closed {idx}:{gen}: {reason:?}");
        // Dropping `c` closes the socket.
    }
}
