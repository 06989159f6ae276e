//! The bottom layer: small types and rules every other module shares — connection references
//! and ids, the id rules (one validator), client credentials, push results, query strings.
//! It imports nothing of this crate, so anything may import it (docs/ARCHITECTURE.md,
//! "Layers").

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;

/// A refusal: an HTTP status (or the equal ERROR frame code) and a message.
pub type Reject = (u16, String);

pub fn reject<T>(status: u16, msg: impl Into<String>) -> Result<T, Reject> {
    Err((status, msg.into()))
}

/// A connection as named in messages between threads and in timers: slab index and
/// generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Ref {
    pub idx: u32,
    pub gen: u32,
}

/// A connection id, `NODE:INDEX:GEN` on the wire (docs/PROTOCOL.md, "Connection ids").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnId {
    pub node: String,
    pub idx: u32,
    pub gen: u64,
}

impl ConnId {
    pub fn parse(s: &str) -> Option<ConnId> {
        let mut it = s.rsplitn(3, ':');
        let gen = it.next()?.parse().ok()?;
        let idx = it.next()?.parse().ok()?;
        let node = it.next()?;
        if !valid_node_id(node) {
            return None;
        }
        Some(ConnId {
            node: node.to_string(),
            idx,
            gen,
        })
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.node, self.idx, self.gen)
    }
}

// ---- id rules --------------------------------------------------------------------------

/// Longest device, user or room id.
pub const MAX_ID_BYTES: usize = 128;
/// Longest long-poll status key, and value.
pub const MAX_STATUS_KEY: usize = 256;
pub const MAX_STATUS_VALUE: usize = 64 * 1024;
/// The status (and ERROR code) of a malformed id.
pub const BAD_REQUEST: u16 = 400;

/// Device, user and room ids (and status keys, with their own length): non-empty, bounded,
/// no control characters — they travel in URL paths, JSON and logs.
pub fn check_id(kind: &str, id: &str) -> Result<(), Reject> {
    check_text(kind, "id", id, MAX_ID_BYTES)
}

/// Status keys are chosen by backends (e.g. a login QR code's nonce).
pub fn check_status_key(key: &str) -> Result<(), Reject> {
    check_text("status", "key", key, MAX_STATUS_KEY)
}

fn check_text(kind: &str, what: &str, s: &str, max: usize) -> Result<(), Reject> {
    // Printable ASCII, as ids nearly always are, in one pass by the byte; other text (or
    // ASCII with a control character: C0, DEL) by the char, for C1 too.
    let printable = s.bytes().all(|b| (0x20..0x7f).contains(&b));
    let control = !printable && s.chars().any(char::is_control);
    if s.is_empty() || s.len() > max || control {
        return reject(
            BAD_REQUEST,
            format!("malformed {kind} {what}: 1-{max} bytes, no control characters"),
        );
    }
    Ok(())
}

/// Node ids appear in connection ids, metric labels and Redis keys: `[A-Za-z0-9_-]{1,32}`.
pub fn valid_node_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// App ids appear in URL paths and metric labels: `[A-Za-z0-9_.-]{1,64}`.
pub fn valid_app_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

// ---- session data ----------------------------------------------------------------------

/// Session data a connection may hold (from the auth backend or `PUT /v1/session`): keys,
/// bytes of keys and values together, and bytes of one key.
pub const MAX_SESSION_KEYS: usize = 64;
pub const MAX_SESSION_BYTES: usize = 16 * 1024;
pub const MAX_SESSION_KEY_BYTES: usize = 128;

/// The session limits, whoever sets the data.
pub fn check_session(s: &[(String, String)]) -> Result<(), String> {
    let bytes: usize = s.iter().map(|(k, v)| k.len() + v.len()).sum();
    if s.len() > MAX_SESSION_KEYS || bytes > MAX_SESSION_BYTES {
        return Err(format!(
            "a session holds at most {MAX_SESSION_KEYS} keys and {MAX_SESSION_BYTES} bytes"
        ));
    }
    if s.iter()
        .any(|(k, _)| k.is_empty() || k.len() > MAX_SESSION_KEY_BYTES)
    {
        return Err(format!("session keys are 1-{MAX_SESSION_KEY_BYTES} bytes"));
    }
    Ok(())
}

// ---- clients ---------------------------------------------------------------------------

/// Who a connecting client says it is: HELLO headers (TCP) or the query string (WebSocket).
#[derive(Debug, Default)]
pub struct Creds {
    pub app_id: String,
    pub device_id: String,
    pub token: String,
    pub user_id: Option<String>,
}

/// The same, borrowed from the HELLO (or the query string) it was read from: the static
/// token check on the reactor needs no copy of it (the connect path).
#[derive(Clone, Copy, Debug, Default)]
pub struct CredsRef<'a> {
    pub app_id: &'a str,
    pub device_id: &'a str,
    pub token: &'a str,
    pub user_id: Option<&'a str>,
}

impl<'a> CredsRef<'a> {
    /// From named values (`app_id`, `device_id`, `token`, `user_id`); an empty `user_id` is
    /// none.
    pub fn from_lookup(get: impl Fn(&str) -> Option<&'a str>) -> CredsRef<'a> {
        CredsRef {
            app_id: get("app_id").unwrap_or(""),
            device_id: get("device_id").unwrap_or(""),
            token: get("token").unwrap_or(""),
            user_id: get("user_id").filter(|u| !u.is_empty()),
        }
    }

    /// The id rules, before any token is looked at.
    pub fn check(&self) -> Result<(), Reject> {
        check_id("device", self.device_id)?;
        match self.user_id {
            Some(u) => check_id("user", u),
            None => Ok(()),
        }
    }

    /// A copy for a worker or a backend thread.
    pub fn owned(&self) -> Creds {
        Creds {
            app_id: self.app_id.into(),
            device_id: self.device_id.into(),
            token: self.token.into(),
            user_id: self.user_id.map(Into::into),
        }
    }
}

impl Creds {
    pub fn view(&self) -> CredsRef<'_> {
        CredsRef {
            app_id: &self.app_id,
            device_id: &self.device_id,
            token: &self.token,
            user_id: self.user_id.as_deref(),
        }
    }

    /// The id rules, before any token is looked at.
    pub fn check(&self) -> Result<(), Reject> {
        self.view().check()
    }
}

/// An admitted client, as auth (static tokens or the app's backend) hands it to the reactor.
#[derive(Debug)]
pub struct Admit {
    pub app: usize,
    /// Shared as the registry keeps them (made once, not a String copied again).
    pub device: Arc<str>,
    pub user: Option<Arc<str>>,
    /// Session key/values from the auth backend.
    pub session: Vec<(String, String)>,
    /// The device's tag in the app's device index, when the reactor has it already
    /// (`Registry::prefetch`); 0: hashed at the admit.
    pub dev_tag: u32,
}

// ---- pushes ----------------------------------------------------------------------------

/// The JSON answer to one push: `{"delivered":n,"offline":[...],"dropped":[...]}`.
#[derive(Clone, Default, Debug, serde::Serialize, serde::Deserialize)]
pub struct PushResult {
    pub delivered: u64,
    pub offline: Vec<String>,
    pub dropped: Vec<String>,
    /// Copies tracked for an ACK (`ack=1` over TCP or pbbp2).
    pub tracked: u64,
    /// With `wait_ms`: of the tracked copies, how many were ACKed, given up, or still open
    /// when the answer left.
    pub acked: u64,
    pub undelivered: u64,
    pub waited: bool,
    /// Cluster mode, tracked copies: whether they were written to Redis before the answer
    /// (false: Redis away, they are held in memory only).
    pub durable: Option<bool>,
}

impl PushResult {
    pub fn pending(&self) -> u64 {
        // Saturating: a count out of step must not answer 2^64 - 1 pending copies.
        self.tracked
            .saturating_sub(self.acked)
            .saturating_sub(self.undelivered)
    }

    /// Appends this result as a JSON object. Written directly (no `serde_json::Value`): a
    /// batch answer has one per item, and building values cost several allocations each.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        // By hand, with `itoa` for the numbers: `write!` was most of an item's answer.
        let mut n = itoa::Buffer::new();
        let mut field = |out: &mut Vec<u8>, name: &[u8], v: u64| {
            out.extend_from_slice(name);
            out.extend_from_slice(n.format(v).as_bytes());
        };
        field(out, b"{\"delivered\":", self.delivered);
        out.extend_from_slice(b",\"offline\":");
        ids_json(out, &self.offline);
        out.extend_from_slice(b",\"dropped\":");
        ids_json(out, &self.dropped);
        if self.waited {
            field(out, b",\"acked\":", self.acked);
            field(out, b",\"undelivered\":", self.undelivered);
            field(out, b",\"pending\":", self.pending());
        }
        match self.durable {
            Some(true) => out.extend_from_slice(b",\"durable\":true"),
            Some(false) => out.extend_from_slice(b",\"durable\":false"),
            None => {}
        }
        out.push(b'}');
    }
}

/// A JSON list of strings; the usual empty one without the serializer.
fn ids_json(out: &mut Vec<u8>, ids: &[String]) {
    if ids.is_empty() {
        out.extend_from_slice(b"[]");
    } else {
        let _ = serde_json::to_writer(&mut *out, ids);
    }
}

/// Puts a payload into a JSON object: `"payload"` when it is UTF-8, else `"payload_base64"`.
pub fn insert_payload(o: &mut serde_json::Map<String, serde_json::Value>, payload: &[u8]) {
    match std::str::from_utf8(payload) {
        Ok(s) => o.insert("payload".into(), s.into()),
        Err(_) => o.insert(
            "payload_base64".into(),
            base64::engine::general_purpose::STANDARD
                .encode(payload)
                .into(),
        ),
    };
}

// ---- query strings ---------------------------------------------------------------------

/// Decoded query parameters.
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(q: &str) -> Result<Query, Reject> {
        let mut v = vec![];
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, val) = pair.split_once('=').unwrap_or((pair, ""));
            let k = percent_decode(k, true)
                .ok_or_else(|| (400, format!("bad query parameter {k:?}")))?;
            let val =
                percent_decode(val, true).ok_or_else(|| (400, format!("bad value for {k:?}")))?;
            v.push((k, val));
        }
        Ok(Query(v))
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    /// Refuses a parameter the endpoint does not take: a typo (`acks=1`) would otherwise
    /// make another request than meant, answered as if it had worked.
    pub fn only(&self, known: &[&str]) -> Result<(), Reject> {
        match self.0.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some((k, _)) => reject(
                400,
                format!(
                    "unknown query parameter {k:?} (this endpoint takes {})",
                    known.join(", ")
                ),
            ),
        }
    }

    pub fn int(&self, k: &str, min: i64, max: i64) -> Result<Option<i64>, Reject> {
        match self.get(k) {
            None => Ok(None),
            Some(s) => match s.parse::<i64>() {
                Ok(n) if n >= min && n <= max => Ok(Some(n)),
                _ => reject(
                    400,
                    format!("{k} must be an integer in {min}..={max}, not {s:?}"),
                ),
            },
        }
    }
}

/// Decodes %XX escapes (and `+` as space in query values when `plus` is set).
pub fn percent_decode(s: &str, plus: bool) -> Option<String> {
    let b = s.as_bytes();
    // Most parameters and path segments hold nothing to decode (and are UTF-8 already).
    if !b.iter().any(|&c| c == b'%' || (plus && c == b'+')) {
        return Some(s.to_string());
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                // Two hex digits exactly: `from_str_radix` would also take a sign ("%+f").
                let digit = |c: u8| (c as char).to_digit(16);
                let (hi, lo) = (digit(*b.get(i + 1)?)?, digit(*b.get(i + 2)?)?);
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Wall-clock milliseconds since the Unix epoch (for events and reports, not for timers).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_ids_round_trip_and_reject_garbage() {
        let id = ConnId::parse("n1:231:23").unwrap();
        assert_eq!((id.node.as_str(), id.idx, id.gen), ("n1", 231, 23));
        assert_eq!(id.to_string(), "n1:231:23");
        for bad in [
            "",
            "n1",
            "n1:2",
            "n1:x:3",
            ":1:2",
            "n1:1:-2",
            "n 1:1:2",
            "n1:1:99999999999999999999",
        ] {
            assert!(ConnId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn one_id_rule_for_every_kind() {
        assert!(check_id("device", "d-1").is_ok());
        assert!(check_id("device", "").is_err());
        assert!(check_id("device", &"x".repeat(MAX_ID_BYTES)).is_ok());
        assert!(check_id("device", &"x".repeat(MAX_ID_BYTES + 1)).is_err());
        assert!(check_id("user", "a\nb").is_err());
        assert!(check_id("user", "a\u{7f}b").is_err(), "DEL");
        assert!(
            check_id("user", "é\u{85}").is_err(),
            "a C1 control in other text"
        );
        assert!(check_id("user", "é-ü").is_ok());
        assert!(check_status_key(&"k".repeat(MAX_STATUS_KEY)).is_ok());
        assert!(check_status_key(&"k".repeat(MAX_STATUS_KEY + 1)).is_err());
        let c = CredsRef::from_lookup(|k| match k {
            "device_id" => Some("d"),
            "user_id" => Some(""),
            _ => None,
        });
        assert_eq!(c.user_id, None, "an empty user_id is none");
        assert!(c.check().is_ok());
        let c = CredsRef::from_lookup(|k| (k == "user_id").then_some("u"));
        assert!(c.check().is_err(), "a device id is required");
    }

    #[test]
    fn push_results_are_written_as_json_with_escapes() {
        let mut r = PushResult {
            delivered: 2,
            offline: vec!["a\"b\\c\u{1}".into()],
            dropped: vec!["n1:1:2".into()],
            ..Default::default()
        };
        let mut out = vec![];
        r.write_json(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"delivered": 2, "offline": ["a\"b\\c\u{1}"], "dropped": ["n1:1:2"]})
        );
        (r.waited, r.tracked, r.acked, r.undelivered) = (true, 3, 1, 1);
        out.clear();
        r.write_json(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (&v["acked"], &v["undelivered"], &v["pending"]),
            (
                &serde_json::json!(1),
                &serde_json::json!(1),
                &serde_json::json!(1)
            )
        );
        let mut r = PushResult {
            delivered: u64::MAX,
            durable: Some(false),
            ..Default::default()
        };
        out.clear();
        r.write_json(&mut out);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            format!(
                "{{\"delivered\":{},\"offline\":[],\"dropped\":[],\"durable\":false}}",
                u64::MAX
            )
        );
        r.durable = Some(true);
        out.clear();
        r.write_json(&mut out);
        assert!(out.ends_with(b"\"dropped\":[],\"durable\":true}"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c", true).unwrap(), "a b c");
        assert_eq!(percent_decode("a+b", false).unwrap(), "a+b");
        assert_eq!(percent_decode("plain-d1", true).unwrap(), "plain-d1");
        assert_eq!(percent_decode("", true).unwrap(), "");
        assert_eq!(percent_decode("%41+", false).unwrap(), "A+");
        assert!(percent_decode("%4", false).is_none(), "cut");
        assert!(percent_decode("%zz", false).is_none());
        assert!(
            percent_decode("%+f", false).is_none(),
            "a sign is not a hex digit"
        );
        assert!(percent_decode("%-0", false).is_none());
        assert!(percent_decode("%f", false).is_none(), "cut after one digit");
        assert_eq!(percent_decode("%2F%2f%C3%A9", false).unwrap(), "//é");
        assert!(percent_decode("%ff", false).is_none(), "not UTF-8");
    }
}

// ---- address ranges --------------------------------------------------------------------

/// An address range, `10.0.0.0/8` or `fd00::/8` (a bare address is the one host): the
/// internal API's `[api] allow_from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let net: std::net::IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or address/prefix"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(n) if n <= max && digits(p.trim()) => n,
                _ => return Err(format!("{s:?}: the prefix must be 0-{max}")),
            },
        };
        // An IPv4-mapped range (`::ffff:10.0.0.0/104`) is the IPv4 range it maps.
        if let (std::net::IpAddr::V6(v6), true) = (net, prefix >= 96) {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return Ok(Cidr {
                    net: v4.into(),
                    prefix: prefix - 96,
                });
            }
        }
        Ok(Cidr { net, prefix })
    }

    /// Whether `ip` is in the range (an IPv4 address mapped into IPv6 counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(v) => u128::from(u32::from(v)) << 96,
                IpAddr::V6(v) => u128::from(v),
            }
        };
        if ip.is_ipv4() != self.net.is_ipv4() {
            return false;
        }
        let mask = if self.prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix))
        };
        bits(ip) & mask == bits(self.net) & mask
    }
}

#[cfg(test)]
mod cidr_tests {
    use super::Cidr;

    #[test]
    fn ranges_hold_what_they_say_and_nothing_else() {
        let ip = |s: &str| s.parse().unwrap();
        let r = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(r.contains(ip("10.255.1.2")));
        assert!(!r.contains(ip("11.0.0.1")));
        assert!(r.contains(ip("::ffff:10.1.2.3")), "v4-mapped");
        assert!(!r.contains(ip("::1")));
        let one = Cidr::parse("127.0.0.2").unwrap();
        assert!(one.contains(ip("127.0.0.2")) && !one.contains(ip("127.0.0.3")));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        let mapped = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert!(mapped.contains(ip("10.9.9.9")) && !mapped.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("10.0.0.0/+8").is_err());
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "nope",
            "10.0.0.0/x",
            "10.0.0/8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }
}
