//! The one deadline structure, owned by the reactor: a hashed timing wheel.
//!
//! Insert is O(1) (push to a slot). There is no explicit cancel: every entry carries the
//! connection's `{slot, generation}` and a kind, and the reactor re-checks it when it fires
//! (a closed connection's entries die with its generation; a read timeout whose connection
//! has since read re-arms itself at the new deadline). So an active connection costs no wheel
//! work per frame — only one re-arm per timeout period. The poll timeout is the distance to the
//! nearest non-empty slot, found with a bitmap.

/// Milliseconds per wheel tick: timeouts fire up to one tick late.
pub const TICK_MS: u64 = 4;
/// Slots in the wheel: 8192 × 4 ms ≈ 32.8 s, so a 30 s read timeout needs no extra round.
pub const SLOTS: usize = 8192;
const WORDS: usize = SLOTS / 64;
/// Entries a slot that still holds some keeps spare room for (more is freed). An emptied
/// slot frees everything: 8,192 slots each keeping even 32 entries' room would let the
/// wheel creep up to 6 MB under churn, as bursts land in ever new slots. Freeing costs at
/// most one allocation per slot per revolution.
const SLOT_KEEP: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TimerKind {
    /// HELLO must arrive and be admitted.
    Handshake,
    /// Client read timeout, or an API connection's idle timeout.
    Read,
    /// A closing connection's output did not drain in time.
    Linger,
    /// A long-poll's timeout.
    PollTimeout,
    /// A long-poll status value's TTL (idx/gen name the status entry, not a connection).
    StatusExpire,
    /// The earliest retransmit of a connection's unacknowledged `ack=1` pushes.
    Retransmit,
    /// A gone device's parked pushes run out of grace (idx/gen name the parked entry).
    GraceExpire,
    /// An API push request's `wait_ms` passed (idx/gen name the waiting request).
    WaitExpire,
    /// A client's frame or message begun and not yet whole (`frame_timeout_ms`).
    Partial,
    /// A connection's output went over its bound: still over at its grace's end?
    SlowCheck,
    /// An API call's parts from other nodes are due (idx/gen name the gather).
    RpcExpire,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerKey {
    pub idx: u32,
    pub gen: u32,
    pub kind: TimerKind,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    tick: u64,
    key: TimerKey,
}

pub struct Wheel {
    slots: Vec<Vec<Entry>>,
    bits: [u64; WORDS],
    /// The last tick processed.
    tick: u64,
    len: usize,
}

impl Default for Wheel {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Wheel {
    pub fn new(now_ms: u64) -> Wheel {
        Wheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            bits: [0; WORDS],
            tick: now_ms / TICK_MS,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every entry `keep` refuses (entries whose connection or entry is gone), and
    /// the room they held. Entries of closed connections otherwise stay until their
    /// deadline: under connect/close churn, a read timeout's worth of closed connections.
    pub fn retain(&mut self, mut keep: impl FnMut(&TimerKey) -> bool) {
        for (s, slot) in self.slots.iter_mut().enumerate() {
            if slot.is_empty() {
                continue;
            }
            let before = slot.len();
            slot.retain(|e| keep(&e.key));
            self.len -= before - slot.len();
            tidy(slot, &mut self.bits, s);
        }
    }

    /// Every entry with its deadline (the tick's end), for the live upgrade.
    pub fn entries(&self) -> Vec<(u64, TimerKey)> {
        self.slots
            .iter()
            .flatten()
            .map(|e| (e.tick * TICK_MS, e.key))
            .collect()
    }

    /// Bytes the slots hold allocated (entries and spare room), for memory accounting.
    pub fn footprint(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.capacity() * std::mem::size_of::<Entry>())
            .sum()
    }

    /// Schedules `key` at `deadline_ms` (rounded up to the next tick).
    pub fn insert(&mut self, deadline_ms: u64, key: TimerKey) {
        let tick = deadline_ms.div_ceil(TICK_MS).max(self.tick + 1);
        let s = (tick % SLOTS as u64) as usize;
        self.slots[s].push(Entry { tick, key });
        self.bits[s / 64] |= 1 << (s % 64);
        self.len += 1;
    }

    /// Moves every entry due at `now_ms` into `out`.
    pub fn advance(&mut self, now_ms: u64, out: &mut Vec<TimerKey>) {
        let now = now_ms / TICK_MS;
        if now <= self.tick {
            return;
        }
        // After a long stall every slot is visited once, not once per missed tick.
        let steps = (now - self.tick).min(SLOTS as u64);
        for i in 1..=steps {
            let t = if steps == SLOTS as u64 {
                now - SLOTS as u64 + i
            } else {
                self.tick + i
            };
            let s = (t % SLOTS as u64) as usize;
            if self.bits[s / 64] & (1 << (s % 64)) == 0 {
                continue;
            }
            let slot = &mut self.slots[s];
            let before = slot.len();
            slot.retain(|e| {
                if e.tick <= now {
                    out.push(e.key);
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
            tidy(slot, &mut self.bits, s);
        }
        self.tick = now;
    }

    /// Milliseconds from `now_ms` until the nearest non-empty slot, or None when empty.
    pub fn next_timeout_ms(&self, now_ms: u64) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let start = ((self.tick + 1) % SLOTS as u64) as usize;
        let mut dist = None;
        // Scan the bitmap from `start`, wrapping once.
        for w in 0..=WORDS {
            let word_idx = (start / 64 + w) % WORDS;
            let mut word = self.bits[word_idx];
            if w == 0 {
                word &= !0u64 << (start % 64);
            } else if w == WORDS {
                word &= !(!0u64 << (start % 64));
            }
            if word != 0 {
                let s = word_idx * 64 + word.trailing_zeros() as usize;
                let d = (s + SLOTS - start) % SLOTS;
                dist = Some(d as u64);
                break;
            }
        }
        let d = dist?;
        let due_ms = (self.tick + 1 + d) * TICK_MS;
        Some(due_ms.saturating_sub(now_ms))
    }
}

/// After entries left slot `s`: an emptied slot frees its room and leaves the bitmap; one
/// still holding a few gives back most of a burst's. Otherwise, as bursts (a mass connect)
/// land in different slots turn after turn, every slot ends up holding its largest one.
fn tidy(slot: &mut Vec<Entry>, bits: &mut [u64; WORDS], s: usize) {
    if slot.is_empty() {
        bits[s / 64] &= !(1 << (s % 64));
        *slot = Vec::new();
    } else if slot.capacity() > SLOT_KEEP && slot.len() * 4 < slot.capacity() {
        slot.shrink_to(slot.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(idx: u32) -> TimerKey {
        TimerKey {
            idx,
            gen: 1,
            kind: TimerKind::Read,
        }
    }

    #[test]
    fn fires_in_deadline_order_and_not_before() {
        let mut w = Wheel::new(1000);
        w.insert(1100, key(1));
        w.insert(1050, key(2));
        w.insert(1000 + 40_000, key(3)); // beyond one turn of the wheel
        let mut out = vec![];
        w.advance(1040, &mut out);
        assert!(out.is_empty());
        w.advance(1052, &mut out);
        assert_eq!(out, vec![key(2)]);
        out.clear();
        w.advance(1200, &mut out);
        assert_eq!(out, vec![key(1)]);
        out.clear();
        w.advance(1000 + 39_990, &mut out);
        assert!(out.is_empty(), "a far entry waits for its round");
        w.advance(1000 + 40_004, &mut out);
        assert_eq!(out, vec![key(3)]);
        assert!(w.is_empty());
    }

    #[test]
    fn next_timeout_tracks_the_nearest_entry() {
        let mut w = Wheel::new(0);
        assert_eq!(w.next_timeout_ms(0), None);
        w.insert(500, key(1));
        w.insert(200, key(2));
        let t = w.next_timeout_ms(0).unwrap();
        assert!((200..=200 + TICK_MS).contains(&t), "{t}");
        // Wrapping: an entry in a slot before the cursor.
        let mut w = Wheel::new(30_000);
        w.insert(30_000 + 5_000, key(3));
        let t = w.next_timeout_ms(30_000).unwrap();
        assert!((5_000..=5_000 + TICK_MS).contains(&t), "{t}");
    }

    #[test]
    fn bursts_in_ever_new_slots_do_not_pile_up_memory() {
        // 60 bursts of 5,000 entries, 20 to a slot (few enough that a slot keeping room
        // for 32 would keep it), each landing on slots the wheel has not used lately (the
        // wheel turns in 32.8 s): after they have all fired, the wheel holds nothing.
        let mut w = Wheel::new(0);
        let mut out = vec![];
        let mut now = 0;
        for burst in 0..60u64 {
            for i in 0..5_000u64 {
                w.insert(now + 10_000 + i / 5, key(i as u32));
            }
            now += 10_400 + burst * 537;
            w.advance(now, &mut out);
            out.clear();
        }
        now += 40_000;
        w.advance(now, &mut out);
        assert!(w.is_empty());
        assert_eq!(w.footprint(), 0, "bytes held after the bursts");
    }

    #[test]
    fn retain_drops_entries_and_their_room() {
        let mut w = Wheel::new(0);
        for i in 0..10_000u32 {
            w.insert(1_000 + u64::from(i % 500), key(i));
        }
        w.retain(|k| k.idx % 100 == 0);
        assert_eq!(w.len(), 100);
        let mut out = vec![];
        w.advance(10_000, &mut out);
        assert_eq!(out.len(), 100);
        assert!(out.iter().all(|k| k.idx % 100 == 0));
        assert!(w.is_empty());
    }

    #[test]
    fn a_long_stall_fires_everything_due() {
        let mut w = Wheel::new(0);
        for i in 0..100 {
            w.insert(i * 97, key(i as u32));
        }
        let mut out = vec![];
        w.advance(1_000_000, &mut out);
        assert_eq!(out.len(), 100);
        assert!(w.is_empty());
    }
}
