//! Shared helpers: readings of the gateway process (/proc), HTTP to its API (one-shot and
//! keep-alive), payloads stamped with their send time, and the latency histogram.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::Common;

/// CPU time of a process (all its threads, exited ones included), in microseconds: from
/// its CPU clock, in nanoseconds, else utime + stime from /proc/PID/stat in 10 ms ticks
/// (3% of a 19,000-connection round's CPU: too coarse to compare with a floor).
pub(crate) fn cpu_us(pid: u32) -> Result<u64, String> {
    let mut id: libc::clockid_t = 0;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both write only into the locals they are given.
    if unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut id) } == 0
        && unsafe { libc::clock_gettime(id, &mut ts) } == 0
    {
        return Ok(ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000);
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // The command name may hold spaces; fields after the closing paren are fixed.
    let rest = &s[s.rfind(')').ok_or("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().map_err(|e| e.to_string())?
        + f[12].parse::<u64>().map_err(|e| e.to_string())?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(ticks * 1_000_000 / hz.max(1))
}

/// Resident set size in bytes.
pub(crate) fn rss(pid: u32) -> Result<u64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .map_err(|e| format!("/proc/{pid}/statm: {e}"))?;
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .ok_or("bad statm")?
        .parse()
        .map_err(|e: std::num::ParseIntError| e.to_string())?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    Ok(pages * page)
}

pub(crate) fn gateway_pid(c: &Common) -> Result<u32, String> {
    if let Some(p) = c.pid {
        return Ok(p);
    }
    let api = c.api.split(',').next().unwrap_or_default();
    let (status, body) = http(api, "GET", "/healthz", b"")?;
    if status != 200 {
        return Err(format!("/healthz answered {status}"));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    v["pid"]
        .as_u64()
        .map(|p| p as u32)
        .ok_or_else(|| "no pid in /healthz".into())
}

/// One metric from the gateway's /metrics.
pub(crate) fn metric(c: &Common, name: &str) -> Result<f64, String> {
    metrics(c.metrics_api.as_deref().unwrap_or(&c.api))?
        .get(name)
        .copied()
        .ok_or_else(|| format!("no metric {name}"))
}

/// Every sample of the gateway's /metrics, by its name with labels.
pub(crate) fn metrics(api: &str) -> Result<std::collections::HashMap<String, f64>, String> {
    let (_, body) = http(api, "GET", "/metrics", b"")?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect())
}

/// One request on a fresh connection.
pub(crate) fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let req = format!("{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    s.write_all(body).map_err(|e| e.to_string())?;
    let mut resp = vec![];
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let status = std::str::from_utf8(resp.get(9..12).unwrap_or(b"000"))
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |p| p + 4);
    Ok((status, resp[split..].to_vec()))
}

/// A whole HTTP/1.1 message at the front of `buf`: (head length without its blank line,
/// Content-Length). None until the head and the body have both arrived.
pub(crate) fn http_message(buf: &[u8]) -> Option<(usize, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    (buf.len() >= end + 4 + len).then_some((end, len))
}

/// A keep-alive API connection that sends one request at a time.
pub(crate) struct KeepAlive {
    s: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    pub(crate) fn new(addr: &str) -> Result<KeepAlive, String> {
        let s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(KeepAlive {
            s,
            buf: Vec::with_capacity(4096),
        })
    }

    pub(crate) fn post(&mut self, path: &str, body: &[u8]) -> Result<Vec<u8>, String> {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.s.write_all(&req).map_err(|e| e.to_string())?;
        loop {
            if let Some((end, len)) = http_message(&self.buf) {
                if !self.buf.starts_with(b"HTTP/1.1 200") {
                    return Err(format!(
                        "API answered: {}",
                        String::from_utf8_lossy(&self.buf)
                    ));
                }
                let body = self.buf[end + 4..end + 4 + len].to_vec();
                self.buf.drain(..end + 4 + len);
                return Ok(body);
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("API closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// POSTs to every path over `window` keep-alive connections; each body is the send time.
pub(crate) fn post_all(api: &str, window: usize, paths: Vec<String>) -> Result<(), String> {
    let paths = Arc::new(std::sync::Mutex::new(paths));
    let mut ts = vec![];
    for _ in 0..window.max(1) {
        let (api, paths) = (api.to_string(), paths.clone());
        ts.push(std::thread::spawn(move || -> Result<(), String> {
            let mut ka = KeepAlive::new(&api)?;
            loop {
                let Some(path) = paths.lock().unwrap().pop() else {
                    return Ok(());
                };
                ka.post(&path, &payload(20))?;
            }
        }));
    }
    for t in ts {
        t.join().map_err(|_| "sender panicked")??;
    }
    Ok(())
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A payload of `size` bytes starting with the send time in decimal nanoseconds (text, so the
/// same payload works over raw WebSocket).
/// A send timestamp, padded with chat-like words to `size` bytes (so that compression, where
/// negotiated, sees text of a realistic kind, not one repeated byte). No quotes or
/// backslashes: the batch scenario puts payloads in JSON strings as they are.
pub(crate) fn payload(size: usize) -> Vec<u8> {
    let mut p = format!("{:020}", now_ns()).into_bytes();
    let mut i = 0u32;
    while p.len() < size {
        i = i.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let words = ["hello", "room", "wave", "live", "score", "42", "gg", "nice"];
        p.extend_from_slice(
            format!(
                " (u{}: {} {})",
                i % 997,
                words[(i >> 8) as usize % 8],
                words[(i >> 12) as usize % 8]
            )
            .as_bytes(),
        );
    }
    p.truncate(size.max(20));
    p
}

pub(crate) fn sent_at(p: &[u8]) -> Option<u64> {
    std::str::from_utf8(p.get(..20)?).ok()?.parse().ok()
}

/// Log-linear latency histogram in µs: 16 sub-buckets per power of two (≤ 6.25% error).
pub(crate) struct Hist {
    pub(crate) counts: Vec<u64>,
    pub(crate) max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; 64 * 16],
            max: 0,
        }
    }
}

impl Hist {
    pub(crate) fn bucket(v: u64) -> usize {
        if v < 16 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros() as usize; // ≥ 4
        let sub = ((v >> (e - 4)) & 15) as usize;
        (e - 3) * 16 + sub
    }

    pub(crate) fn lower(b: usize) -> u64 {
        if b < 16 {
            return b as u64;
        }
        let e = b / 16 + 3;
        let sub = (b % 16) as u64;
        (1 << e) | (sub << (e - 4))
    }

    pub(crate) fn record(&mut self, v: u64) {
        self.counts[Self::bucket(v)] += 1;
        self.max = self.max.max(v);
    }

    /// Values recorded.
    pub(crate) fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub(crate) fn quantile(&self, q: f64) -> u64 {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * q).ceil() as u64;
        let mut acc = 0;
        for (b, &n) in self.counts.iter().enumerate() {
            acc += n;
            if acc >= want {
                return Self::lower(b);
            }
        }
        self.max
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        let sparse: Vec<[u64; 2]> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(b, &n)| [b as u64, n])
            .collect();
        json!({"buckets": sparse, "max": self.max})
    }

    pub(crate) fn merge(&mut self, v: &serde_json::Value) {
        for pair in v["buckets"].as_array().into_iter().flatten() {
            let (b, n) = (
                pair[0].as_u64().unwrap_or(0) as usize,
                pair[1].as_u64().unwrap_or(0),
            );
            if b < self.counts.len() {
                self.counts[b] += n;
            }
        }
        self.max = self.max.max(v["max"].as_u64().unwrap_or(0));
    }
}

#[cfg(test)]
mod tests {
    use super::Hist;

    #[test]
    pub(crate) fn histogram_quantiles_are_close() {
        let mut h = Hist::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        for (q, want) in [(0.5, 5000.0), (0.99, 9900.0), (0.999, 9990.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.07, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.max, 10_000);
    }
}
