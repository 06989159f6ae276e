//! Admission limits (docs/PROTOCOL.md, "Limits"): per source address, connections held and
//! a connect-rate token bucket; per connection, inbound messages per second (bursts
//! allowed). Each is off unless configured, and then its table costs nothing. Refusals are
//! answered in the transport's words (TCP: ERROR then close; the HTTP listener: 429 before
//! any upgrade) and counted; a connection over its message rate is closed with a reason.

use std::collections::HashMap;
use std::net::IpAddr;

use super::{Reactor, Role};
use crate::config::Limits;
use crate::metrics::inc;

/// A token bucket: `rate` tokens a second up to `burst`; a take spends one.
#[derive(Clone, Copy, Debug)]
pub(super) struct Bucket {
    tokens: f32,
    /// Reactor ms of the last refill.
    at: u64,
}

impl Bucket {
    pub fn full(burst: f32, now: u64) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    /// Refills for the time since the last take, then spends one token if there is one.
    pub fn take(&mut self, now: u64, rate: f32, burst: f32) -> bool {
        let dt = now.saturating_sub(self.at) as f32 / 1000.0;
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether it would be full by now (an address with nothing open can be forgotten).
    fn refilled(&self, now: u64, rate: f32, burst: f32) -> bool {
        self.tokens + now.saturating_sub(self.at) as f32 / 1000.0 * rate >= burst
    }
}

struct PerIp {
    conns: u32,
    bucket: Bucket,
}

/// Why a connection was refused (the `reason` label of
/// `longlink_admission_refused_total`, `metrics::ADMISSION_REFUSALS` in this order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The node holds `max_connections`.
    Node = 0,
    /// Its address holds `max_connections_per_ip`.
    PerIp,
    /// Its address connects faster than `connect_rate_per_ip`.
    IpRate,
    /// Its app holds its `max_connections`.
    App,
}

impl Refusal {
    fn message(self) -> &'static str {
        match self {
            Refusal::Node => "the gateway is at max_connections",
            Refusal::PerIp => "too many connections from this address (max_connections_per_ip)",
            Refusal::IpRate => "connecting too fast from this address (connect_rate_per_ip)",
            Refusal::App => "the app is at its max_connections",
        }
    }
}

#[derive(Default)]
pub(super) struct Admission {
    per_ip: HashMap<IpAddr, PerIp>,
    /// Connection slot → its address (only while per-address limits are on).
    ip_of: HashMap<u32, IpAddr>,
    /// Connection slot → its message bucket (only while `max_messages_per_s` is on).
    msgs: HashMap<u32, Bucket>,
}

/// An address as the limits count it: IPv4 (a mapped one too) alone; IPv6 by its /64, the
/// block one host is given (one address each would let it spread its connections).
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Addresses tracked at most; past it new addresses are let in untracked (an attacker with
/// that many addresses is not held by per-address limits anyway) until a sweep makes room.
const MAX_ADDRESSES: usize = 1 << 20;

fn per_ip_on(l: &Limits) -> bool {
    l.max_connections_per_ip > 0 || l.connect_rate_per_ip > 0
}

fn connect_burst(l: &Limits) -> f32 {
    l.connect_burst_per_ip.max(1) as f32
}

fn message_burst(l: &Limits) -> f32 {
    l.message_burst.max(1) as f32
}

impl Admission {
    /// A connection from `ip` wants in: refused, or let in (then `joined`).
    fn check(&mut self, l: &Limits, ip: IpAddr, now: u64) -> Result<(), Refusal> {
        if self.per_ip.len() >= MAX_ADDRESSES && !self.per_ip.contains_key(&ip) {
            return Ok(());
        }
        let e = self.per_ip.entry(ip).or_insert_with(|| PerIp {
            conns: 0,
            bucket: Bucket::full(connect_burst(l), now),
        });
        if l.max_connections_per_ip > 0 && e.conns as usize >= l.max_connections_per_ip {
            return Err(Refusal::PerIp);
        }
        if l.connect_rate_per_ip > 0
            && !e
                .bucket
                .take(now, l.connect_rate_per_ip as f32, connect_burst(l))
        {
            return Err(Refusal::IpRate);
        }
        Ok(())
    }

    /// A connection handed over by a live upgrade, counted against its address.
    pub fn held(&mut self, l: &Limits, slot: u32, ip: IpAddr, now: u64) {
        let ip = key(ip);
        if per_ip_on(l) {
            self.per_ip.entry(ip).or_insert_with(|| PerIp {
                conns: 0,
                bucket: Bucket::full(connect_burst(l), now),
            });
            self.joined(slot, ip);
        }
    }

    fn joined(&mut self, slot: u32, ip: IpAddr) {
        if let Some(e) = self.per_ip.get_mut(&ip) {
            e.conns += 1;
            self.ip_of.insert(slot, ip);
        }
    }

    /// A connection went: its address's count and its message bucket.
    pub fn left(&mut self, slot: u32) {
        // Empty while a limit is off: skip the hash (every close comes here).
        if !self.msgs.is_empty() {
            self.msgs.remove(&slot);
        }
        if self.ip_of.is_empty() {
            return;
        }
        if let Some(ip) = self.ip_of.remove(&slot) {
            if let Some(e) = self.per_ip.get_mut(&ip) {
                e.conns = e.conns.saturating_sub(1);
            }
        }
    }

    /// Forgets addresses with nothing open whose bucket has refilled (every few seconds:
    /// the table holds the addresses seen within a burst's refill, at most).
    pub fn sweep(&mut self, l: &Limits, now: u64) {
        let rate = l.connect_rate_per_ip.max(1) as f32;
        let burst = connect_burst(l);
        self.per_ip
            .retain(|_, e| e.conns > 0 || !e.bucket.refilled(now, rate, burst));
        self.per_ip.shrink_to(self.per_ip.len() * 2);
    }

    #[cfg(test)]
    pub fn addresses(&self) -> usize {
        self.per_ip.len()
    }
}

impl Reactor {
    /// A client connection is accepted from `peer` (as accept gave it): Ok, or why not.
    pub(super) fn admit_peer(
        &mut self,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Option<IpAddr>, Refusal> {
        if self.client_conns >= self.cfg.limits.max_connections {
            return Err(Refusal::Node);
        }
        if !per_ip_on(&self.cfg.limits) {
            return Ok(None);
        }
        // A unix socket's peer is local: one address for all (a local proxy's limits are
        // its own business), so no per-address limits.
        let Some(a) = peer else {
            return Ok(None);
        };
        let ip = key(a.ip());
        self.admission
            .check(&self.cfg.limits, ip, self.now)
            .map(|()| Some(ip))
    }

    /// The connection in `slot` came from `ip` (counted against its address).
    pub(super) fn admitted_peer(&mut self, slot: u32, ip: Option<IpAddr>) {
        if let Some(ip) = ip {
            self.admission.joined(slot, ip);
        }
    }

    /// A refused connection: told why in its transport's words (one write into the fresh
    /// socket's empty buffer), counted, closed. Counted accepted and closed (overloaded),
    /// so that accepted = closed + open still holds.
    pub(super) fn refuse_client(&mut self, sock: crate::net::Sock, role: Role, why: Refusal) {
        inc(&self.metrics.admission_refused[why as usize]);
        match role {
            Role::Client(t) => inc(&self.metrics.accepted[t as usize]),
            _ => inc(&self.metrics.http_accepted),
        }
        self.metrics.close(crate::metrics::CloseReason::Overloaded);
        let status = if why == Refusal::Node { 503 } else { 429 };
        let bytes = match role {
            Role::Client(_) => {
                let f = super::tcp::error_frame(0, status, why.message());
                let mut b = vec![];
                let _ = crate::codec::encode_tcp(&f, &mut b);
                b
            }
            // Refused before its request is read, so its Origin is not known: with
            // `cors_origins = ["*"]` (the default) a page may read why all the same.
            _ if self.cfg.http.cors_origins.iter().any(|o| o == "*") => {
                let extra = "Access-Control-Allow-Origin: *\r\n";
                crate::http::error_with(status, why.message(), extra, false)
            }
            _ => crate::http::error(status, why.message(), false),
        };
        sock.refuse(&bytes);
    }

    /// Whether a client connection may send one more message now (`max_messages_per_s`).
    pub(super) fn message_ok(&mut self, idx: u32) -> bool {
        let l = &self.cfg.limits;
        if l.max_messages_per_s == 0 {
            return true;
        }
        let (rate, burst) = (l.max_messages_per_s as f32, message_burst(l));
        let now = self.now;
        self.admission
            .msgs
            .entry(idx)
            .or_insert_with(|| Bucket::full(burst, now))
            .take(now, rate, burst)
    }
}

#[cfg(test)]
mod tests {
    use super::{Admission, Bucket, Refusal};
    use crate::config::Config;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = Bucket::full(5.0, 0);
        assert_eq!((0..10).filter(|_| b.take(0, 2.0, 5.0)).count(), 5);
        // Half a second at 2/s: one more.
        assert!(b.take(500, 2.0, 5.0));
        assert!(!b.take(500, 2.0, 5.0));
        // Never past the burst however long it waited.
        assert_eq!((0..10).filter(|_| b.take(100_000, 2.0, 5.0)).count(), 5);
    }

    #[test]
    fn an_address_is_held_to_its_connections_and_its_rate() {
        let mut l = Config::dev().limits;
        l.max_connections_per_ip = 2;
        l.connect_rate_per_ip = 10;
        l.connect_burst_per_ip = 3;
        let mut a = Admission::default();
        let ip = "10.0.0.1".parse().unwrap();
        let other = "10.0.0.2".parse().unwrap();
        a.check(&l, ip, 0).unwrap();
        a.joined(1, ip);
        a.check(&l, ip, 0).unwrap();
        a.joined(2, ip);
        assert_eq!(a.check(&l, ip, 0), Err(Refusal::PerIp));
        a.check(&l, other, 0).unwrap();
        a.left(1);
        // Room again: the burst's third token; then the rate says no until a token comes.
        a.check(&l, ip, 0).unwrap();
        assert_eq!(a.check(&l, ip, 0), Err(Refusal::IpRate));
        a.check(&l, ip, 100).unwrap();
        // Gone and refilled: forgotten by a sweep; the one still open stays.
        a.left(2);
        a.sweep(&l, 10_000);
        assert_eq!(a.addresses(), 0);
    }
}
