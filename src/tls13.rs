//! Our own TLS 1.3 record layer (RFC 8446 §5) for connections whose handshake rustls has
//! finished. Why not leave the records to rustls: its state (several KiB, buffers included)
//! lives in this process, so a live upgrade could not hand a TLS connection over, and an idle
//! connection would keep paying for it. Here a connection's whole TLS state is the two
//! traffic secrets with their keys and record counters — a few hundred bytes that an idle
//! connection keeps and a live upgrade sends to the new process.
//!
//! Covers what a server sees after the handshake: application data, alerts (close_notify),
//! and KeyUpdate both ways (§4.6.3), including the update the peer requests and the one we
//! make ourselves before a key wears out. Any other post-handshake message is refused: a
//! server has no NewSessionTicket to receive and asks no post-handshake authentication.
//!
//! Pure over byte slices (the reactor does the I/O); AEAD and HKDF from ring, the crypto
//! rustls uses here. The traffic secrets come from rustls through `Capture`, a key log.

use ring::{aead, hkdf};
use std::cell::RefCell;

pub const HEADER: usize = 5;
/// Most plaintext in one record (§5.1).
pub const MAX_PLAIN: usize = 16384;
/// Most ciphertext in one record (§5.2).
pub const MAX_CIPHER: usize = MAX_PLAIN + 256;
/// A whole record at its largest: a read buffer must hold one.
pub const MAX_RECORD: usize = HEADER + MAX_CIPHER;
const TAG: usize = 16;

const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APP_DATA: u8 = 23;
const KEY_UPDATE: u8 = 24;

/// Records sealed under one key before we update it ourselves: well inside AES-GCM's
/// confidentiality limit (2^24.5 full records, §5.5), and rarely reached at all.
const TX_UPDATE_AT: u64 = 1 << 23;

/// Alert descriptions (§6).
pub mod alert {
    pub const CLOSE_NOTIFY: u8 = 0;
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    pub const BAD_RECORD_MAC: u8 = 20;
    pub const RECORD_OVERFLOW: u8 = 22;
    pub const ILLEGAL_PARAMETER: u8 = 47;
    pub const DECODE_ERROR: u8 = 50;
    pub const USER_CANCELED: u8 = 90;
}

/// The TLS 1.3 cipher suites (rustls's, all three), by their IANA ids.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    pub fn from_id(id: u16) -> Option<Suite> {
        match id {
            0x1301 => Some(Suite::Aes128Gcm),
            0x1302 => Some(Suite::Aes256Gcm),
            0x1303 => Some(Suite::Chacha20Poly1305),
            _ => None,
        }
    }

    pub fn id(self) -> u16 {
        match self {
            Suite::Aes128Gcm => 0x1301,
            Suite::Aes256Gcm => 0x1302,
            Suite::Chacha20Poly1305 => 0x1303,
        }
    }

    fn aead(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Suite::Aes256Gcm => hkdf::HKDF_SHA384,
            _ => hkdf::HKDF_SHA256,
        }
    }

    fn key_len(self) -> usize {
        match self {
            Suite::Aes128Gcm => 16,
            _ => 32,
        }
    }

    /// The traffic secret's length: the suite's hash.
    pub fn secret_len(self) -> usize {
        match self {
            Suite::Aes256Gcm => 48,
            _ => 32,
        }
    }
}

/// Why the records were refused, and the alert to send before closing (None: the peer
/// sent a fatal alert; nothing is said back, §6.2).
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub alert: Option<u8>,
    pub why: &'static str,
}

fn refuse(alert: u8, why: &'static str) -> Refused {
    Refused {
        alert: Some(alert),
        why,
    }
}

/// What `Keys::open` found in a buffer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// Bytes of whole records taken from the front of the buffer; a partial record after
    /// them waits for the rest.
    pub used: usize,
    /// Application data, moved to the front of the buffer.
    pub plain: usize,
    /// The peer's close_notify came: the end (records after it are ignored).
    pub closed: bool,
    /// The peer updated its keys and asks us to update ours (`seal_key_update`).
    pub update_requested: bool,
}

/// One direction: its traffic secret, the key and IV derived from it, the record counter.
/// Keys are kept raw and expanded per batch of records, so an idle connection holds bytes,
/// not key schedules.
#[derive(Clone)]
struct Dir {
    secret: [u8; 48],
    key: [u8; 32],
    iv: [u8; 12],
    seq: u64,
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label with an empty context (§7.1).
fn expand_label(suite: Suite, secret: &[u8], label: &[u8], out: &mut [u8]) {
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [6 + label.len() as u8];
    let info: [&[u8]; 5] = [&len, &label_len, b"tls13 ", label, &[0]];
    hkdf::Prk::new_less_safe(suite.hkdf(), secret)
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF output within bounds");
}

impl Dir {
    fn new(suite: Suite, secret: &[u8], seq: u64) -> Dir {
        let mut d = Dir {
            secret: [0; 48],
            key: [0; 32],
            iv: [0; 12],
            seq,
        };
        d.secret[..secret.len()].copy_from_slice(secret);
        d.derive(suite);
        d
    }

    /// Secret, key and IV end to end (`SavedKeys`).
    fn saved(&self, suite: Suite) -> Vec<u8> {
        let (n, k) = (suite.secret_len(), suite.key_len());
        [&self.secret[..n], &self.key[..k], &self.iv[..]].concat()
    }

    fn load(suite: Suite, b: &[u8], seq: u64) -> Result<Dir, String> {
        let (n, k) = (suite.secret_len(), suite.key_len());
        if b.len() != n + k + 12 {
            return Err(format!("{} bytes of keys, not {}", b.len(), n + k + 12));
        }
        let mut d = Dir {
            secret: [0; 48],
            key: [0; 32],
            iv: [0; 12],
            seq,
        };
        d.secret[..n].copy_from_slice(&b[..n]);
        d.key[..k].copy_from_slice(&b[n..n + k]);
        d.iv.copy_from_slice(&b[n + k..]);
        Ok(d)
    }

    fn derive(&mut self, suite: Suite) {
        let s = self.secret;
        let s = &s[..suite.secret_len()];
        expand_label(suite, s, b"key", &mut self.key[..suite.key_len()]);
        expand_label(suite, s, b"iv", &mut self.iv);
    }

    /// The next generation of traffic secret (§7.2), its counter from zero.
    fn update(&mut self, suite: Suite) {
        let old = self.secret;
        let n = suite.secret_len();
        expand_label(suite, &old[..n], b"traffic upd", &mut self.secret[..n]);
        self.derive(suite);
        self.seq = 0;
    }

    fn aead_key(&self, suite: Suite) -> aead::LessSafeKey {
        let k = aead::UnboundKey::new(suite.aead(), &self.key[..suite.key_len()])
            .expect("key length fits the suite");
        aead::LessSafeKey::new(k)
    }

    /// The per-record nonce (§5.3).
    fn nonce(&self) -> aead::Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        aead::Nonce::assume_unique_for_key(n)
    }
}

/// A connection's record protection, both ways.
pub struct Keys {
    suite: Suite,
    rx: Dir,
    tx: Dir,
    /// Nothing sealed since our last KeyUpdate: a peer's further requests are answered by
    /// it (§4.6.3: one update for several received while silent), so a peer that floods
    /// requests and reads nothing cannot grow what waits to be sent.
    updated: bool,
    /// Records in a row that carried no data (empty, or a KeyUpdate): past
    /// `MAX_EMPTY_RUN` the peer is only making us work, and is refused.
    empty_run: u8,
}

/// Records without data accepted in a row (rustls's own limit for empty fragments).
const MAX_EMPTY_RUN: u8 = 32;

/// Whether `b` starts with a whole record, by its header's length.
pub fn whole_record(b: &[u8]) -> bool {
    b.len() >= HEADER && b.len() - HEADER >= u16::from_be_bytes([b[3], b[4]]) as usize
}

/// How much of `b` (what a client sent during its handshake) rustls may be given before its
/// next step: whole records, at most `cap` bytes of them, and at most one protected record
/// (`sealed`: one already went since the last step). A TLS 1.3 client's second flight is
/// [change_cipher_spec +] Finished, one protected record (no client certificate is asked
/// for), so the step that ends the handshake has seen nothing after the Finished: the
/// client's data and post-handshake messages (a KeyUpdate) are left whole to our records,
/// and rustls has nothing of them to lose at the switch. Returns the length and the new
/// `sealed`. A header no TLS peer would send (not a TLS content type, not version 3.x,
/// longer than any record) makes all of `b` go: rustls refuses it at once, with its alert.
pub fn handshake_feed(b: &[u8], cap: usize, mut sealed: bool) -> (usize, bool) {
    let mut pos = 0;
    while pos < b.len() && !sealed {
        let h = &b[pos..];
        if !(20..=24).contains(&h[0]) || h.get(1).is_some_and(|&v| v != 3) {
            return (b.len(), sealed);
        }
        if h.len() < HEADER {
            break;
        }
        let len = u16::from_be_bytes([h[3], h[4]]) as usize;
        if len > MAX_PLAIN + 2048 {
            return (b.len(), sealed);
        }
        if h.len() - HEADER < len || pos + HEADER + len > cap {
            break;
        }
        pos += HEADER + len;
        // A protected record too short to hold a Finished (whose verify data alone is 32
        // bytes) is not counted: rustls drops such records (rejected early data) in bulk,
        // not one step each.
        sealed = h[0] == APP_DATA && len >= MIN_FINISHED;
    }
    (pos, sealed)
}

/// The shortest protected record a Finished fits in: message header 4, verify data 32
/// (SHA-256), content type 1, tag 16.
const MIN_FINISHED: usize = 4 + 32 + 1 + TAG;

/// Keys as saved for another process: the suite, then for each direction its traffic secret,
/// key and IV end to end, and its record counter. The key and IV are kept, not derived
/// again: a live upgrade loads tens of thousands of these, and HKDF for each cost ~100 ms
/// at 19,000.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedKeys {
    pub suite: u16,
    pub rx: Vec<u8>,
    pub rx_seq: u64,
    pub tx: Vec<u8>,
    pub tx_seq: u64,
}

impl Keys {
    /// `rx`: the peer's traffic secret (the client's, on a server) and the number of
    /// records already received under it; `tx` ours.
    pub fn new(suite: Suite, rx: (&[u8], u64), tx: (&[u8], u64)) -> Result<Keys, String> {
        let n = suite.secret_len();
        if rx.0.len() != n || tx.0.len() != n {
            return Err(format!("traffic secrets of {n} bytes expected"));
        }
        Ok(Keys {
            suite,
            rx: Dir::new(suite, rx.0, rx.1),
            tx: Dir::new(suite, tx.0, tx.1),
            updated: false,
            empty_run: 0,
        })
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// Whether the keys and IVs derived here are the ones rustls used (a check at the
    /// switch from rustls: the secrets come from its key log, the keys from its state).
    pub fn agrees(&self, ex: &rustls::ExtractedSecrets) -> bool {
        use rustls::ConnectionTrafficSecrets as C;
        let k = self.suite.key_len();
        let same = |d: &Dir, s: &C| match s {
            C::Aes128Gcm { key, iv }
            | C::Aes256Gcm { key, iv }
            | C::Chacha20Poly1305 { key, iv } => {
                d.key[..k] == *key.as_ref() && d.iv == *iv.as_ref()
            }
            _ => false,
        };
        same(&self.rx, &ex.rx.1) && same(&self.tx, &ex.tx.1)
    }

    pub fn save(&self) -> SavedKeys {
        SavedKeys {
            suite: self.suite.id(),
            rx: self.rx.saved(self.suite),
            rx_seq: self.rx.seq,
            tx: self.tx.saved(self.suite),
            tx_seq: self.tx.seq,
        }
    }

    pub fn load(s: &SavedKeys) -> Result<Keys, String> {
        let suite = Suite::from_id(s.suite).ok_or_else(|| format!("suite {:#x}", s.suite))?;
        Ok(Keys {
            suite,
            rx: Dir::load(suite, &s.rx, s.rx_seq)?,
            tx: Dir::load(suite, &s.tx, s.tx_seq)?,
            updated: false,
            empty_run: 0,
        })
    }

    /// Opens the whole records at the front of `buf` in place: their application data is
    /// moved to the front (`plain` bytes), a KeyUpdate is applied as it comes, a
    /// close_notify ends the reading. Err: the alert to send, then close.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Opened, Refused> {
        let mut o = Opened::default();
        let mut pos = 0;
        // Expanded once per call (and again after a KeyUpdate), not per record.
        let mut key: Option<aead::LessSafeKey> = None;
        while buf.len() - pos >= HEADER {
            let hdr: [u8; HEADER] = buf[pos..pos + HEADER].try_into().expect("5 bytes");
            let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
            // After the handshake, every record is protected application_data (§5.1); a
            // change_cipher_spec is allowed only before the peer's Finished.
            if hdr[0] != APP_DATA {
                return Err(refuse(
                    alert::UNEXPECTED_MESSAGE,
                    "a record that is not protected data",
                ));
            }
            if len > MAX_CIPHER {
                return Err(refuse(
                    alert::RECORD_OVERFLOW,
                    "a record over 2^14+256 bytes",
                ));
            }
            if buf.len() - pos < HEADER + len {
                break; // partial: the rest comes later
            }
            if len <= TAG {
                return Err(refuse(
                    alert::BAD_RECORD_MAC,
                    "a record shorter than its tag",
                ));
            }
            if self.rx.seq == u64::MAX {
                return Err(refuse(
                    alert::UNEXPECTED_MESSAGE,
                    "record counter exhausted",
                ));
            }
            let k = key.get_or_insert_with(|| self.rx.aead_key(self.suite));
            let body = pos + HEADER;
            let nonce = self.rx.nonce();
            let inner = k
                .open_in_place(nonce, aead::Aad::from(hdr), &mut buf[body..body + len])
                .map_err(|_| refuse(alert::BAD_RECORD_MAC, "a record failed authentication"))?;
            // The content type is the last byte that is not padding (§5.4).
            let Some(t) = inner.iter().rposition(|&b| b != 0) else {
                return Err(refuse(
                    alert::UNEXPECTED_MESSAGE,
                    "a record with no content type",
                ));
            };
            let ctype = inner[t];
            self.rx.seq += 1;
            pos += HEADER + len;
            o.used = pos;
            if t > MAX_PLAIN {
                return Err(refuse(alert::RECORD_OVERFLOW, "plaintext over 2^14 bytes"));
            }
            if ctype == APP_DATA && t > 0 {
                self.empty_run = 0;
            } else {
                self.empty_run += 1;
                if self.empty_run > MAX_EMPTY_RUN {
                    return Err(refuse(
                        alert::UNEXPECTED_MESSAGE,
                        "too many records in a row without data",
                    ));
                }
            }
            match ctype {
                APP_DATA => {
                    buf.copy_within(body..body + t, o.plain);
                    o.plain += t;
                }
                ALERT => {
                    if t != 2 {
                        return Err(refuse(alert::DECODE_ERROR, "an alert of the wrong size"));
                    }
                    if buf[body + 1] == alert::CLOSE_NOTIFY {
                        o.closed = true;
                        return Ok(o);
                    }
                    if buf[body + 1] == alert::USER_CANCELED {
                        // A closure alert, not an error (§6.1): the close_notify that
                        // should follow it ends the stream. A flood of them is bounded
                        // as any run of records without data.
                        continue;
                    }
                    return Err(Refused {
                        alert: None,
                        why: "the peer sent an alert",
                    });
                }
                HANDSHAKE => {
                    // A KeyUpdate, whole and last in its record (§5.1: a message before a
                    // key change must end at a record boundary). Anything else is not a
                    // client's to send now.
                    let m = &buf[body..body + t];
                    if m.len() != 5 || m[0] != KEY_UPDATE || m[1..4] != [0, 0, 1] {
                        return Err(refuse(
                            alert::UNEXPECTED_MESSAGE,
                            "a handshake message other than KeyUpdate",
                        ));
                    }
                    let requested = match m[4] {
                        0 => false,
                        1 => true,
                        _ => {
                            return Err(refuse(
                                alert::ILLEGAL_PARAMETER,
                                "a KeyUpdate with a bad request value",
                            ))
                        }
                    };
                    self.rx.update(self.suite);
                    key = None;
                    o.update_requested |= requested;
                }
                _ => {
                    return Err(refuse(
                        alert::UNEXPECTED_MESSAGE,
                        "a record of an unknown content type",
                    ))
                }
            }
        }
        Ok(o)
    }

    /// Seals plaintext from `bufs`, at most `max` bytes of it, in records of at most
    /// `MAX_PLAIN`, onto `out`; returns the plaintext taken.
    pub fn seal<'a>(
        &mut self,
        bufs: impl IntoIterator<Item = &'a [u8]>,
        max: usize,
        out: &mut Vec<u8>,
    ) -> usize {
        let mut key: Option<aead::LessSafeKey> = None;
        let mut taken = 0;
        let mut start: Option<usize> = None; // the record being filled
        for mut b in bufs {
            while !b.is_empty() && taken < max {
                let s = match start {
                    Some(s) => s,
                    None => {
                        if self.tx.seq >= TX_UPDATE_AT {
                            self.seal_key_update(false, out);
                            key = None;
                        }
                        let s = out.len();
                        out.extend_from_slice(&[0; HEADER]);
                        start = Some(s);
                        s
                    }
                };
                let room = (MAX_PLAIN - (out.len() - s - HEADER)).min(max - taken);
                let n = room.min(b.len());
                out.extend_from_slice(&b[..n]);
                b = &b[n..];
                taken += n;
                if out.len() - s - HEADER == MAX_PLAIN {
                    let k = key.get_or_insert_with(|| self.tx.aead_key(self.suite));
                    Self::finish(&mut self.tx, k, APP_DATA, out, s);
                    start = None;
                }
            }
        }
        if let Some(s) = start {
            let k = key.get_or_insert_with(|| self.tx.aead_key(self.suite));
            Self::finish(&mut self.tx, k, APP_DATA, out, s);
        }
        if taken > 0 {
            self.updated = false;
        }
        taken
    }

    /// Seals a record of any content type (`content` as it is): alerts, KeyUpdates, and
    /// the tests' and fuzzer's hand-made records.
    pub fn seal_raw(&mut self, ctype: u8, content: &[u8], out: &mut Vec<u8>) {
        let s = out.len();
        out.extend_from_slice(&[0; HEADER]);
        out.extend_from_slice(content);
        let k = self.tx.aead_key(self.suite);
        Self::finish(&mut self.tx, &k, ctype, out, s);
        self.updated = false;
    }

    /// An alert: close_notify (a warning) or the fatal one that precedes a close.
    pub fn seal_alert(&mut self, desc: u8, out: &mut Vec<u8>) {
        let level = if desc == alert::CLOSE_NOTIFY { 1 } else { 2 };
        self.seal_raw(ALERT, &[level, desc], out);
    }

    /// Our KeyUpdate (under the old key), then our key updated: before a key wears out, or
    /// (`requested` false then) by tests playing the peer.
    pub fn seal_key_update(&mut self, requested: bool, out: &mut Vec<u8>) {
        self.seal_raw(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, requested as u8], out);
        self.tx.update(self.suite);
        self.updated = true;
    }

    /// The answer to a peer's request to update our key: a KeyUpdate, unless ours since
    /// the last record we sealed already is one.
    pub fn answer_update(&mut self, out: &mut Vec<u8>) {
        if !self.updated {
            self.seal_key_update(false, out);
        }
    }

    /// Ends the record begun at `s` in `out` (header placeholder, then content): type byte,
    /// header, seal in place, tag.
    fn finish(tx: &mut Dir, k: &aead::LessSafeKey, ctype: u8, out: &mut Vec<u8>, s: usize) {
        // (`updated` is cleared by the callers that seal anything but a KeyUpdate.)
        out.push(ctype);
        let len = (out.len() - s - HEADER + TAG) as u16;
        let hdr = [APP_DATA, 3, 3, (len >> 8) as u8, len as u8];
        out[s..s + HEADER].copy_from_slice(&hdr);
        let tag = k
            .seal_in_place_separate_tag(tx.nonce(), aead::Aad::from(hdr), &mut out[s + HEADER..])
            .expect("a record within AEAD limits");
        out.extend_from_slice(tag.as_ref());
        tx.seq += 1;
    }
}

/// The application traffic secrets rustls derives, caught from its key log. rustls logs
/// them in the handshake step that derives them, on the thread that runs it; the step's
/// caller takes them right after (`Capture::take`), so no connection sees another's.
#[derive(Debug, Default, Clone)]
pub struct Secrets {
    pub client: Vec<u8>,
    pub server: Vec<u8>,
}

thread_local! {
    static CAUGHT: RefCell<Option<Secrets>> = const { RefCell::new(None) };
}

/// A rustls key log that keeps the first application traffic secrets for `take`.
#[derive(Debug)]
pub struct Capture;

impl Capture {
    /// Forgets anything caught (before a step).
    pub fn clear() {
        CAUGHT.with(|c| c.borrow_mut().take());
    }

    /// What the last step caught, if it derived the application secrets.
    pub fn take() -> Option<Secrets> {
        CAUGHT.with(|c| c.borrow_mut().take())
    }
}

impl rustls::KeyLog for Capture {
    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        CAUGHT.with(|c| {
            let mut c = c.borrow_mut();
            let s = c.get_or_insert_with(Secrets::default);
            match label {
                "CLIENT_TRAFFIC_SECRET_0" => s.client = secret.to_vec(),
                "SERVER_TRAFFIC_SECRET_0" => s.server = secret.to_vec(),
                _ => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(suite: Suite) -> (Keys, Keys) {
        let n = suite.secret_len();
        let (c, s) = (vec![7u8; n], vec![9u8; n]);
        // A server's rx is the client's tx.
        let server = Keys::new(suite, (&c, 0), (&s, 0)).unwrap();
        let client = Keys::new(suite, (&s, 0), (&c, 0)).unwrap();
        (client, server)
    }

    const ALL: [Suite; 3] = [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305];

    #[test]
    fn sealed_records_open_in_place_across_sizes_and_suites() {
        for suite in ALL {
            let (mut client, mut server) = pair(suite);
            let msg: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
            let mut wire = vec![];
            let taken = client.seal([&msg[..10], &msg[10..]], usize::MAX, &mut wire);
            assert_eq!(taken, msg.len());
            // 40,000 bytes: three records, the first two full.
            assert_eq!(wire.len(), msg.len() + 3 * (HEADER + 1 + TAG));
            let mut buf = wire.clone();
            let o = server.open(&mut buf).unwrap();
            assert_eq!((o.used, o.plain), (wire.len(), msg.len()));
            assert_eq!(&buf[..o.plain], &msg[..]);
        }
    }

    #[test]
    fn a_partial_record_waits_and_max_bounds_what_is_taken() {
        let (mut client, mut server) = pair(Suite::Aes128Gcm);
        let mut wire = vec![];
        assert_eq!(client.seal([&b"hello"[..], b" world"], 8, &mut wire), 8);
        client.seal([&b"next"[..]], usize::MAX, &mut wire);
        let first = HEADER + 8 + 1 + TAG;
        let mut buf = wire[..first + 3].to_vec();
        let o = server.open(&mut buf).unwrap();
        assert_eq!((o.used, o.plain), (first, 8));
        assert_eq!(&buf[..8], b"hello wo");
        let mut rest = wire[first..].to_vec();
        let o = server.open(&mut rest).unwrap();
        assert_eq!(&rest[..o.plain], b"next");
    }

    #[test]
    fn user_canceled_is_a_closure_alert_not_an_error() {
        let (mut client, mut server) = pair(Suite::Aes128Gcm);
        let mut wire = vec![];
        client.seal_alert(alert::USER_CANCELED, &mut wire);
        client.seal([&b"still"[..]], usize::MAX, &mut wire);
        client.seal_alert(alert::CLOSE_NOTIFY, &mut wire);
        let mut buf = wire.clone();
        let o = server.open(&mut buf).unwrap();
        assert_eq!(&buf[..o.plain], b"still");
        assert!(o.closed);
        // Any other alert from the peer ends it as an error, with nothing said back.
        let (mut client, mut server) = pair(Suite::Aes128Gcm);
        let mut wire = vec![];
        client.seal_alert(alert::DECODE_ERROR, &mut wire);
        assert_eq!(server.open(&mut wire).unwrap_err().alert, None);
    }

    #[test]
    fn tampering_reordering_and_wrong_types_are_refused() {
        let (mut client, mut server) = pair(Suite::Chacha20Poly1305);
        let mut a = vec![];
        client.seal([&b"one"[..]], usize::MAX, &mut a);
        let mut b = vec![];
        client.seal([&b"two"[..]], usize::MAX, &mut b);
        // Out of order: the counter does not match.
        let mut x = b.clone();
        assert_eq!(
            server.open(&mut x).unwrap_err().alert,
            Some(alert::BAD_RECORD_MAC)
        );
        let (_, mut server) = pair(Suite::Chacha20Poly1305);
        let mut x = a.clone();
        x[HEADER + 1] ^= 1;
        assert_eq!(
            server.open(&mut x).unwrap_err().alert,
            Some(alert::BAD_RECORD_MAC)
        );
        let (_, mut server) = pair(Suite::Chacha20Poly1305);
        let mut x = a.clone();
        x[0] = 22; // a clear handshake record after the handshake
        assert_eq!(
            server.open(&mut x).unwrap_err().alert,
            Some(alert::UNEXPECTED_MESSAGE)
        );
        let mut x = vec![23, 3, 3, 0x48, 0x01];
        assert_eq!(
            server.open(&mut x).unwrap_err().alert,
            Some(alert::RECORD_OVERFLOW)
        );
        let mut x = vec![23, 3, 3, 0, 4, 1, 2, 3, 4];
        assert_eq!(
            server.open(&mut x).unwrap_err().alert,
            Some(alert::BAD_RECORD_MAC)
        );
        // Unknown inner type, all-padding content, a NewSessionTicket from a client.
        for (t, c) in [(99u8, &b"x"[..]), (0, &b""[..]), (22, &[4, 0, 0, 1, 0][..])] {
            let (mut client, mut server) = pair(Suite::Aes128Gcm);
            let mut x = vec![];
            client.seal_raw(t, c, &mut x);
            assert_eq!(
                server.open(&mut x).unwrap_err().alert,
                Some(alert::UNEXPECTED_MESSAGE)
            );
        }
    }

    #[test]
    fn padding_is_stripped_and_empty_data_records_pass() {
        let (mut client, mut server) = pair(Suite::Aes256Gcm);
        let mut x = vec![];
        client.seal_raw(APP_DATA, b"", &mut x);
        let mut padded = b"abc".to_vec();
        padded.push(APP_DATA);
        padded.extend([0; 100]);
        client.seal_raw(0, &padded, &mut x); // type 0 + our content: the padding form
        let o = server.open(&mut x).unwrap();
        assert_eq!(&x[..o.plain], b"abc");
    }

    #[test]
    fn key_updates_both_ways_keep_the_stream_going() {
        for suite in ALL {
            let (mut client, mut server) = pair(suite);
            let mut wire = vec![];
            client.seal([&b"before"[..]], usize::MAX, &mut wire);
            client.seal_key_update(true, &mut wire);
            client.seal([&b"after"[..]], usize::MAX, &mut wire);
            let o = server.open(&mut wire).unwrap();
            assert!(o.update_requested);
            assert_eq!(&wire[..o.plain], b"beforeafter");
            // The answer: our KeyUpdate, then data under the new key.
            let mut back = vec![];
            server.seal_key_update(false, &mut back);
            server.seal([&b"hi"[..]], usize::MAX, &mut back);
            let o = client.open(&mut back).unwrap();
            assert!(!o.update_requested);
            assert_eq!(&back[..o.plain], b"hi");
            // Saved and loaded mid-stream, in a fresh pair of hands.
            let mut server = Keys::load(&server.save()).unwrap();
            let mut x = vec![];
            server.seal([&b"later"[..]], usize::MAX, &mut x);
            let o = client.open(&mut x).unwrap();
            assert_eq!(&x[..o.plain], b"later");
        }
    }

    #[test]
    fn requests_while_we_are_silent_get_one_update() {
        let (mut client, mut server) = pair(Suite::Aes128Gcm);
        let mut wire = vec![];
        for _ in 0..20 {
            client.seal_key_update(true, &mut wire);
        }
        let mut back = vec![];
        let o = server.open(&mut wire).unwrap();
        assert!(o.update_requested);
        server.answer_update(&mut back);
        let one = back.len();
        let mut more = vec![];
        client.seal_key_update(true, &mut more);
        server.open(&mut more).unwrap();
        server.answer_update(&mut back);
        assert_eq!(back.len(), one, "still silent: no second update");
        server.seal([&b"data"[..]], usize::MAX, &mut back);
        let mut again = vec![];
        client.seal_key_update(true, &mut again);
        server.open(&mut again).unwrap();
        server.answer_update(&mut back);
        let o = client.open(&mut back).unwrap();
        assert_eq!(&back[..o.plain], b"data");
        assert_eq!(client.rx.seq, 0, "the second update came after the data");
    }

    #[test]
    fn records_without_data_in_a_row_are_bounded() {
        let (mut client, mut server) = pair(Suite::Aes128Gcm);
        let mut x = vec![];
        for _ in 0..MAX_EMPTY_RUN {
            client.seal_raw(APP_DATA, b"", &mut x);
        }
        client.seal([&b"d"[..]], usize::MAX, &mut x);
        for _ in 0..MAX_EMPTY_RUN {
            client.seal_key_update(false, &mut x);
        }
        let o = server.open(&mut x).unwrap();
        assert_eq!(&x[..o.plain], b"d");
        let mut y = vec![];
        client.seal_raw(APP_DATA, b"", &mut y);
        let e = server.open(&mut y).unwrap_err();
        assert_eq!(e.alert, Some(alert::UNEXPECTED_MESSAGE));
    }

    #[test]
    fn the_handshake_feed_stops_after_one_protected_record() {
        let rec = |t: u8, n: usize| {
            let mut r = vec![t, 3, 3, (n >> 8) as u8, n as u8];
            r.resize(HEADER + n, 0);
            r
        };
        let flight = [rec(20, 1), rec(23, 60), rec(23, 70), rec(23, 80)].concat();
        assert_eq!(handshake_feed(&flight, usize::MAX, false), (6 + 65, true));
        assert_eq!(handshake_feed(&flight[71..], usize::MAX, true), (0, true));
        // Protected records too short for a Finished go in bulk.
        let junk = [
            rec(23, 0),
            rec(23, 17),
            rec(23, 52),
            rec(23, 53),
            rec(23, 0),
        ]
        .concat();
        assert_eq!(
            handshake_feed(&junk, usize::MAX, false),
            (5 + 22 + 57 + 58, true)
        );
        // Clear handshake records all go; a partial one waits; the cap is kept.
        let hello = [rec(22, 100), rec(22, 100), rec(22, 50)].concat();
        assert_eq!(handshake_feed(&hello, usize::MAX, false), (265, false));
        assert_eq!(
            handshake_feed(&hello[..250], usize::MAX, false),
            (210, false)
        );
        assert_eq!(handshake_feed(&hello, 250, false), (210, false));
        // Garbage goes whole (rustls refuses it).
        assert_eq!(handshake_feed(b"GET / HTTP/1.1", 10, false), (14, false));
        assert_eq!(
            handshake_feed(&[22, 3, 3, 0xff, 0xff], 10, false),
            (5, false)
        );
        assert_eq!(handshake_feed(&[22, 3, 3], 10, false), (0, false));
    }

    #[test]
    fn whole_record_reads_the_header() {
        assert!(!whole_record(&[23, 3, 3, 0]));
        assert!(!whole_record(&[23, 3, 3, 0, 2, 1]));
        assert!(whole_record(&[23, 3, 3, 0, 2, 1, 2]));
        assert!(whole_record(&[23, 3, 3, 0, 0]));
    }

    #[test]
    fn our_own_key_update_comes_before_a_key_wears_out() {
        let (mut client, mut server) = pair(Suite::Aes128Gcm);
        server.tx.seq = TX_UPDATE_AT;
        client.rx.seq = TX_UPDATE_AT;
        let mut x = vec![];
        server.seal([&b"x"[..]], usize::MAX, &mut x);
        assert_eq!(server.tx.seq, 1);
        let o = client.open(&mut x).unwrap();
        assert_eq!(&x[..o.plain], b"x");
        assert_eq!(client.rx.seq, 1);
    }

    #[test]
    fn close_notify_ends_and_other_alerts_refuse_silently() {
        let (mut client, mut server) = pair(Suite::Aes128Gcm);
        let mut x = vec![];
        client.seal([&b"bye"[..]], usize::MAX, &mut x);
        client.seal_alert(alert::CLOSE_NOTIFY, &mut x);
        client.seal([&b"ignored"[..]], usize::MAX, &mut x);
        let o = server.open(&mut x).unwrap();
        assert!(o.closed);
        assert_eq!(&x[..o.plain], b"bye");
        let (mut client, mut server) = pair(Suite::Aes128Gcm);
        let mut x = vec![];
        client.seal_alert(alert::DECODE_ERROR, &mut x);
        assert_eq!(server.open(&mut x).unwrap_err().alert, None);
    }

    /// Against rustls itself: a real handshake in memory, the server side switched to
    /// these records (secrets from the key log, counters from rustls), then data, key
    /// updates the client starts, and close_notify, read by rustls's client.
    #[test]
    fn a_rustls_client_talks_to_our_records_after_the_handshake() {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        use std::io::{Read, Write};
        use std::sync::Arc;
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/");
        let certs: Vec<_> = CertificateDer::pem_file_iter(format!("{dir}tls_cert.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(format!("{dir}tls_key.pem")).unwrap();
        let ca = CertificateDer::from_pem_file(format!("{dir}tls_ca.pem")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        for suite in rustls::crypto::ring::ALL_CIPHER_SUITES
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS13)
        {
            let mut p = (*provider).clone();
            p.cipher_suites = vec![*suite];
            let p = Arc::new(p);
            let mut sc = rustls::ServerConfig::builder_with_provider(p.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs.clone(), key.clone_key())
                .unwrap();
            sc.key_log = Arc::new(Capture);
            sc.enable_secret_extraction = true;
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.clone()).unwrap();
            let cc = rustls::ClientConfig::builder_with_provider(p)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let (sc, cc) = (Arc::new(sc), Arc::new(cc));
            // Second time round, the client updates its keys (asking for ours) in the flight
            // that carries its Finished: rustls stops at the Finished, our records get it.
            for update_in_flight in [false, true] {
                let mut server = rustls::ServerConnection::new(sc.clone()).unwrap();
                let name = "localhost".try_into().unwrap();
                let mut client = rustls::ClientConnection::new(cc.clone(), name).unwrap();
                Capture::clear();
                let mut secrets = None;
                // The client's first data goes with its Finished, and (second time round) a
                // KeyUpdate asking for ours. rustls is fed as the gateway feeds it: whole
                // records, one protected record per step, so it stops at the Finished and the
                // rest is ours to open.
                client.writer().write_all(b"early").unwrap();
                let mut updated = false;
                let mut pending = vec![];
                while server.is_handshaking() {
                    client.write_tls(&mut pending).unwrap();
                    let (n, _) = handshake_feed(&pending, usize::MAX, false);
                    server.read_tls(&mut &pending[..n]).unwrap();
                    pending.drain(..n);
                    server.process_new_packets().unwrap();
                    secrets = secrets.or_else(Capture::take);
                    let mut w = vec![];
                    while server.wants_write() {
                        server.write_tls(&mut w).unwrap();
                    }
                    client.read_tls(&mut &w[..]).unwrap();
                    client.process_new_packets().unwrap();
                    if update_in_flight && !client.is_handshaking() && !updated {
                        client.refresh_traffic_keys().unwrap();
                        updated = true;
                    }
                }
                client.write_tls(&mut pending).unwrap();
                assert!(!pending.is_empty(), "data after the Finished is left to us");
                let mut early = [0u8; 16];
                assert!(
                    matches!(server.reader().read(&mut early), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                );
                let id = u16::from(server.negotiated_cipher_suite().unwrap().suite());
                let ex = server.dangerous_extract_secrets().unwrap();
                let secrets = secrets.expect("the key log caught the secrets");
                let ours = Suite::from_id(id).unwrap();
                let mut keys =
                    Keys::new(ours, (&secrets.client, ex.rx.0), (&secrets.server, ex.tx.0))
                        .unwrap();
                assert!(keys.agrees(&ex));
                let o = keys.open(&mut pending).unwrap();
                assert_eq!(&pending[..o.plain], b"early");
                assert_eq!(o.update_requested, update_in_flight);
                let mut answer = vec![];
                if o.update_requested {
                    keys.answer_update(&mut answer);
                }
                client.read_tls(&mut &answer[..]).unwrap();
                client.process_new_packets().unwrap();

                // Ours to rustls, large.
                let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
                let mut wire = vec![];
                keys.seal([&big[..]], usize::MAX, &mut wire);
                let mut got = vec![];
                let mut r = &wire[..];
                while !r.is_empty() {
                    client.read_tls(&mut r).unwrap();
                    client.process_new_packets().unwrap();
                    let mut b = vec![0; 200_000];
                    while let Ok(n) = client.reader().read(&mut b) {
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&b[..n]);
                    }
                }
                assert_eq!(got, big);

                // The client updates its keys and asks for ours; data after it both ways.
                client.writer().write_all(b"one").unwrap();
                client.refresh_traffic_keys().unwrap();
                client.writer().write_all(b"two").unwrap();
                let mut w = vec![];
                while client.wants_write() {
                    client.write_tls(&mut w).unwrap();
                }
                let o = keys.open(&mut w).unwrap();
                assert_eq!(&w[..o.plain], b"onetwo");
                assert!(o.update_requested, "rustls asks the peer to update too");
                let mut back = vec![];
                keys.seal_key_update(false, &mut back);
                keys.seal([&b"three"[..]], usize::MAX, &mut back);
                keys.seal_alert(alert::CLOSE_NOTIFY, &mut back);
                client.read_tls(&mut &back[..]).unwrap();
                let st = client.process_new_packets().unwrap();
                assert!(st.peer_has_closed());
                let mut b = vec![];
                client.reader().read_to_end(&mut b).unwrap();
                assert_eq!(b, b"three");
            }
        }
    }
}
