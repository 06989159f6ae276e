//! Durable `ack=1` pushes in Redis (docs/CLUSTER.md, "Reliable pushes"): one hash per
//! device, `ll:rel:{<app>:<device>}`, a field per unacknowledged push. Pure functions over
//! bytes (the records come back from Redis and are checked like any input).

/// Format version of a record (its first byte). Version 1 (an earlier build) had no
/// waiter; it is still read.
const VERSION: u8 = 2;

/// A push's id in its device's hash: its place in push order (drawn by the node the API call
/// came to) and that node. The 16 hex digits sort like the numbers.
pub fn field(order: u64, origin: &str) -> String {
    let mut s = String::with_capacity(17 + origin.len());
    write_field(&mut s, order, origin);
    s
}

/// `field`, appended to `out`. By hand: every `ack=1` push names itself with one, and
/// `format!`'s padded hex was ~7% of such a push's instructions through a batch.
pub fn write_field(out: &mut String, order: u64, origin: &str) {
    let mut hex = [0u8; 17];
    for (i, d) in hex[..16].iter_mut().enumerate() {
        *d = b"0123456789abcdef"[(order >> (60 - 4 * i)) as usize & 15];
    }
    hex[16] = b'.';
    // (Hex digits and a dot: always UTF-8.)
    out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    out.push_str(origin);
}

/// `field` back: (order, origin node); None if it is not one.
pub fn parse_field(f: &str) -> Option<(u64, &str)> {
    let (hex, origin) = f.split_at_checked(16)?;
    let origin = origin.strip_prefix('.')?;
    if origin.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((u64::from_str_radix(hex, 16).ok()?, origin))
}

/// A push as kept in Redis.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Given up at this time (unix ms, its `ttl_ms`); 0 = no limit.
    pub expires_ms: u64,
    /// How many times a node took the push over from another (`RECOVER`): a `NodeTake` for a
    /// lower claim than a node's own copy is stale and leaves that copy alone.
    pub claim: u32,
    /// The node that holds it now (sends and retransmits it).
    pub holder: &'a str,
    /// The node where an API request waits for its outcome (`wait_ms`); "" = none.
    pub waiter: &'a str,
    /// The encoded Frame without its seqid (`codec::Shared`'s body).
    pub body: &'a [u8],
}

/// `[version][expires_ms u64 BE][claim u32 BE][holder len u8][holder][waiter len u8][waiter]
/// [body]` (`RECOVER` rewrites the claim and the holder in place and keeps the rest: keep
/// the offsets in step).
pub fn encode(expires_ms: u64, claim: u32, holder: &str, waiter: &str, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(15 + holder.len() + waiter.len() + body.len());
    encode_into(&mut v, expires_ms, claim, holder, waiter, body);
    v
}

/// `encode`, appended to `v` (a buffer reused across records).
pub fn encode_into(
    v: &mut Vec<u8>,
    expires_ms: u64,
    claim: u32,
    holder: &str,
    waiter: &str,
    body: &[u8],
) {
    v.push(VERSION);
    v.extend_from_slice(&expires_ms.to_be_bytes());
    v.extend_from_slice(&claim.to_be_bytes());
    for s in [holder, waiter] {
        let s = &s.as_bytes()[..s.len().min(255)];
        v.push(s.len() as u8);
        v.extend_from_slice(s);
    }
    v.extend_from_slice(body);
}

pub fn decode(b: &[u8]) -> Option<Record<'_>> {
    let (&v, rest) = b.split_first()?;
    if v != VERSION && v != 1 {
        return None;
    }
    let (exp, rest) = rest.split_first_chunk::<8>()?;
    let (claim, rest) = rest.split_first_chunk::<4>()?;
    let (&n, rest) = rest.split_first()?;
    let (holder, rest) = rest.split_at_checked(n as usize)?;
    let (waiter, body) = if v == 1 {
        (&[][..], rest)
    } else {
        let (&n, rest) = rest.split_first()?;
        rest.split_at_checked(n as usize)?
    };
    Some(Record {
        expires_ms: u64::from_be_bytes(*exp),
        claim: u32::from_be_bytes(*claim),
        holder: std::str::from_utf8(holder).ok()?,
        waiter: std::str::from_utf8(waiter).ok()?,
        body,
    })
}

/// A device's records read and taken over in one step (so that no removal can fall between
/// the read and the takeover and bring a record back): every record's claim goes up by one
/// and its holder becomes `ARGV[1]`; the records are returned as they were before. With
/// `ARGV[2]` not empty, only the records whose holder is that node (a dead node's, adopted).
pub const RECOVER: &str = "local me, only, out = ARGV[1], ARGV[2], {} \
    local all = redis.call('HGETALL', KEYS[1]) \
    for i = 1, #all, 2 do \
      local v = all[i + 1] \
      local ok = #v >= 14 and (string.byte(v, 1) == 1 or string.byte(v, 1) == 2) \
      if ok and only ~= '' then \
        ok = string.sub(v, 15, 14 + string.byte(v, 14)) == only \
      end \
      if ok then \
        local claim = (struct.unpack('>I4', v, 10) + 1) % 4294967296 \
        local rest = string.sub(v, 15 + string.byte(v, 14)) \
        redis.call('HSET', KEYS[1], all[i], string.sub(v, 1, 9) .. \
          struct.pack('>I4', claim) .. string.char(#me) .. me .. rest) \
      end \
      if ok or only == '' then \
        out[#out + 1] = all[i] \
        out[#out + 1] = v \
      end \
    end \
    return out";

/// A device's member in a node's index (`Keys::durable_index`): app and device, the app's
/// length first (ids may hold any character).
pub fn index_member(app: &str, device: &str) -> String {
    format!("{}:{app}{device}", app.len())
}

/// `index_member` back.
pub fn parse_index_member(m: &str) -> Option<(&str, &str)> {
    let (n, rest) = m.split_once(':')?;
    let n: usize = n.parse().ok()?;
    let (app, device) = rest.split_at_checked(n)?;
    (!app.is_empty() && !device.is_empty()).then_some((app, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_sort_by_order() {
        let a = field(0x1234, "n1");
        assert_eq!(a, "0000000000001234.n1");
        assert_eq!(parse_field(&a), Some((0x1234, "n1")));
        assert!(field(9, "z") < field(10, "a"));
        for n in [0, 1, 0xf, 0x10, 0xfedc_ba98_7654_3210, u64::MAX] {
            assert_eq!(field(n, "o"), format!("{n:016x}.o"));
            let mut s = "kept:".to_string();
            write_field(&mut s, n, "o");
            assert_eq!(s, format!("kept:{n:016x}.o"));
        }
        assert_eq!(
            parse_field(&field(u64::MAX, "x.y")),
            Some((u64::MAX, "x.y"))
        );
        for bad in [
            "",
            "12",
            "000000000000123g.n1",
            "0000000000001234n1",
            "0000000000001234.",
        ] {
            assert_eq!(parse_field(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn index_members_round_trip() {
        let m = index_member("demo", "d:1");
        assert_eq!(parse_index_member(&m), Some(("demo", "d:1")));
        for bad in ["", "x", "4:dem", "9:demo", "0:demo", "4:demo"] {
            assert_eq!(parse_index_member(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn records_round_trip_and_refuse_garbage() {
        let r = encode(77, 3, "n2", "n1", b"\x12\x03abc");
        assert_eq!(
            decode(&r),
            Some(Record {
                expires_ms: 77,
                claim: 3,
                holder: "n2",
                waiter: "n1",
                body: b"\x12\x03abc"
            })
        );
        let empty = encode(0, 0, "", "", b"");
        let empty = decode(&empty).map(|r| (r.holder, r.waiter));
        assert_eq!(empty, Some(("", "")));
        assert_eq!(decode(b""), None);
        assert_eq!(decode(&[3; 14]), None);
        // Version 1: no waiter.
        let mut v1 = encode(5, 1, "n3", "", b"xy");
        v1[0] = 1;
        v1.remove(1 + 8 + 4 + 1 + 2); // the waiter's length byte
        let r1 = decode(&v1).unwrap();
        assert_eq!((r1.holder, r1.waiter, r1.body), ("n3", "", &b"xy"[..]));
        // Truncated anywhere before the body: refused, never a panic.
        for n in 0..r.len() - 5 {
            assert_eq!(decode(&r[..n]), None, "{n}");
        }
    }
}
