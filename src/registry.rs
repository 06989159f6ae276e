//! The local registry (docs/ARCHITECTURE.md): per app, device → connections, user → connections,
//! and every connection of the app (for broadcasts). Owned by the reactor, so no locks; kept
//! current on admit and close. Values are slab indexes: the registry is updated in the same
//! turn a connection closes, so an index here always names a live, admitted connection.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

/// Most devices hold one connection; keep that case allocation-free.
#[derive(Debug)]
enum Conns {
    One(u32),
    Many(Vec<u32>),
}

impl Conns {
    fn as_slice(&self) -> &[u32] {
        match self {
            Conns::One(i) => std::slice::from_ref(i),
            Conns::Many(v) => v,
        }
    }

    fn add(&mut self, idx: u32) {
        match self {
            Conns::One(i) => *self = Conns::Many(vec![*i, idx]),
            Conns::Many(v) => v.push(idx),
        }
    }

    /// Removes `idx`; true when nothing is left.
    fn remove(&mut self, idx: u32) -> bool {
        match self {
            Conns::One(i) => *i == idx,
            Conns::Many(v) => {
                v.retain(|&x| x != idx);
                match v.as_slice() {
                    [] => true,
                    &[only] => {
                        *self = Conns::One(only);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

/// An id (device or user) → its connections. Open addressing with linear probing, and
/// deletion by backward shift (no tombstones). Each slot's tag (32 bits of the key's hash,
/// never 0) sits in an array of its own, so a probe reads 16 tags a cache line and the keys
/// only on a tag match.
///
/// Not std's map, for one reason: a connect's insert misses the cache twice (the tag's line
/// and the slot's: the kernel's socket work between two connects evicts them), and only a
/// map of our own says where a key's slot is before the insert, so that the reactor can
/// fetch both lines while it checks the HELLO (`prefetch`). Keys are hashed with SipHash
/// under a random key (std's `RandomState`): clients choose them.
#[derive(Default)]
struct IdMap {
    tags: Vec<u32>,
    slots: Vec<Slot>,
    len: usize,
    hasher: RandomState,
}

struct Slot {
    key: Option<Arc<str>>,
    conns: Conns,
}

const EMPTY: Slot = Slot {
    key: None,
    conns: Conns::One(0),
};

impl IdMap {
    /// The key's tag: 32 bits of its hash, 0 kept for an empty slot. A connection keeps its
    /// device's (`Conn::dev_tag`), so that its close does not hash the id again.
    fn tag(&self, key: &str) -> u32 {
        use std::hash::Hasher;
        // The bytes in one write: `str`'s `Hash` adds a second, a terminator that only
        // keys made of several strings need.
        let mut h = self.hasher.build_hasher();
        h.write(key.as_bytes());
        h.finish() as u32 | 1
    }

    /// Where a tag's probe starts (bit 0 is always set: the bits above it).
    fn home(&self, tag: u32) -> usize {
        (tag >> 1) as usize & (self.tags.len() - 1)
    }

    fn find(&self, tag: u32, key: &str) -> Option<usize> {
        self.probe(tag, key).ok()
    }

    /// `Ok`: the slot holding `key`; `Err`: the empty slot that ends its run, where it would
    /// go (None before the table has any slot).
    fn probe(&self, tag: u32, key: &str) -> Result<usize, Option<usize>> {
        if self.tags.is_empty() {
            return Err(None);
        }
        let mask = self.tags.len() - 1;
        let mut i = self.home(tag);
        // Ends: a quarter of the slots at least are empty.
        loop {
            match self.tags[i] {
                0 => return Err(Some(i)),
                // The same `Arc` as the slot's (a connection's own id): equal, no compare.
                t if t == tag
                    && self.slots[i]
                        .key
                        .as_deref()
                        .is_some_and(|k| std::ptr::eq(k, key) || k == key) =>
                {
                    return Ok(i)
                }
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn get(&self, key: &str) -> Option<&Conns> {
        self.find(self.tag(key), key).map(|i| &self.slots[i].conns)
    }

    fn get_key_value(&self, key: &str) -> Option<(&Arc<str>, &Conns)> {
        let i = self.find(self.tag(key), key)?;
        let s = &self.slots[i];
        s.key.as_ref().map(|k| (k, &s.conns))
    }

    /// Starts fetching the lines an `add` of `key` will most likely touch (its tag's and
    /// its slot's), so that they arrive while the caller does other work. Returns the tag
    /// (for the `add`).
    fn prefetch(&self, key: &str) -> u32 {
        let tag = self.tag(key);
        if !self.tags.is_empty() {
            let i = self.home(tag);
            crate::slab::prefetch(&self.tags[i]);
            crate::slab::prefetch(&self.slots[i]);
        }
        tag
    }

    /// Adds connection `idx` to `key`'s (`tag`: `key`'s, or 0 to hash it here). Returns
    /// the tag.
    fn add(&mut self, key: &Arc<str>, tag: u32, idx: u32) -> u32 {
        let tag = if tag == 0 { self.tag(key) } else { tag };
        debug_assert_eq!(tag, self.tag(key), "a tag kept for another key or map");
        let free = match self.probe(tag, key) {
            Ok(i) => {
                self.slots[i].conns.add(idx); // rare: one device, two links
                return tag;
            }
            Err(free) => free,
        };
        // At most three quarters full: linear probing's misses stay short (8.5 slots on
        // average at the limit, a cache line of tags or two). Grown, the key's place is
        // looked for again; else it is the empty slot the probe ended on.
        let i = match free {
            Some(i) if (self.len + 1) * 4 <= self.tags.len() * 3 => i,
            _ => {
                self.grow();
                self.empty_from(self.home(tag))
            }
        };
        self.tags[i] = tag;
        self.slots[i] = Slot {
            key: Some(key.clone()),
            conns: Conns::One(idx),
        };
        self.len += 1;
        tag
    }

    fn grow(&mut self) {
        let cap = (self.tags.len() * 2).max(16);
        let tags = std::mem::replace(&mut self.tags, vec![0; cap]);
        let slots = std::mem::replace(&mut self.slots, (0..cap).map(|_| EMPTY).collect());
        for (tag, slot) in tags.into_iter().zip(slots) {
            if tag != 0 {
                let i = self.empty_from(self.home(tag));
                self.tags[i] = tag;
                self.slots[i] = slot;
            }
        }
    }

    /// The first empty slot from `i` on.
    fn empty_from(&self, mut i: usize) -> usize {
        let mask = self.tags.len() - 1;
        while self.tags[i] != 0 {
            i = (i + 1) & mask;
        }
        i
    }

    /// Removes connection `idx` from `key`'s (`tag`: `key`'s, or 0 to hash it here); the
    /// key goes with its last connection.
    fn remove(&mut self, key: &str, tag: u32, idx: u32) {
        let kept = tag != 0;
        let tag = if kept { tag } else { self.tag(key) };
        debug_assert_eq!(tag, self.tag(key), "a tag kept for another key or map");
        // A kept tag that misses would leave the key naming a dead slot, whose next tenant
        // would get the key's pushes: never expected (the debug check), but a miss is
        // looked for again with the key's own tag (nothing is added on the usual path).
        let found = match self.find(tag, key) {
            None if kept => Some(self.tag(key))
                .filter(|&own| own != tag)
                .and_then(|own| self.find(own, key)),
            found => found,
        };
        let Some(mut hole) = found else {
            return;
        };
        if !self.slots[hole].conns.remove(idx) {
            return; // others of the key remain
        }
        // Backward shift: each later slot of the run whose home is not in (hole, j] moves
        // into the hole, so every key stays reachable from its home without tombstones.
        let mask = self.tags.len() - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let tag = self.tags[j];
            if tag == 0 {
                break;
            }
            let home = self.home(tag);
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.tags.swap(hole, j);
                self.slots.swap(hole, j);
                hole = j;
            }
        }
        self.tags[hole] = 0;
        self.slots[hole] = EMPTY;
        self.len -= 1;
    }
}

/// A set of slab indexes, as a bitmap. An app's connections: a connect sets a bit and a
/// close clears one, in a few kilobytes that stay in cache (19,000 connections: 2.4 KB),
/// where a list with O(1) removal had a close write the moved connection's position into
/// that connection's entry — a cache miss on a third connection's line. A broadcast walks
/// it in slab order, which is memory order. Its size follows the highest slab index the
/// app has used: one bit per connection slot.
#[derive(Default)]
struct IdxSet {
    words: Vec<u64>,
    len: usize,
}

impl IdxSet {
    fn insert(&mut self, idx: u32) {
        let (w, bit) = (idx as usize / 64, 1u64 << (idx % 64));
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        if self.words[w] & bit == 0 {
            self.words[w] |= bit;
            self.len += 1;
        }
    }

    fn remove(&mut self, idx: u32) {
        let (w, bit) = (idx as usize / 64, 1u64 << (idx % 64));
        if let Some(word) = self.words.get_mut(w) {
            if *word & bit != 0 {
                *word &= !bit;
                self.len -= 1;
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                Some((w * 64) as u32 + b)
            })
        })
    }
}

#[derive(Default)]
pub struct AppIndex {
    devices: IdMap,
    users: IdMap,
    /// Every admitted connection of the app (for broadcasts).
    all: IdxSet,
    /// Rooms (session binding): bound devices and, kept current on connect and disconnect,
    /// the local connections of those devices (the inverted index a room push walks).
    rooms: HashMap<Arc<str>, Room>,
    /// Device → the rooms it is bound to (most devices: a few).
    device_rooms: HashMap<Arc<str>, Vec<Arc<str>>>,
    /// Rooms with at least one local connection (what `top_rooms` looks at: on a cluster
    /// every node holds every room's members, most of them with nobody here).
    live_rooms: HashSet<Arc<str>>,
}

#[derive(Default)]
pub struct Room {
    pub members: HashSet<Arc<str>>,
    /// The members' local connections, walked by a room push. A vector in join order (close
    /// to slab order) rather than a hash set: the walk reads connections in memory order,
    /// which measured ~8x faster per recipient at 10,000 members.
    conns: Vec<u32>,
    /// Connection → its position in `conns`, for O(1) removal.
    pos: HashMap<u32, u32>,
}

impl Room {
    pub fn conns(&self) -> &[u32] {
        &self.conns
    }

    /// True when it is the room's first local connection.
    fn join(&mut self, idx: u32) -> bool {
        if let std::collections::hash_map::Entry::Vacant(e) = self.pos.entry(idx) {
            e.insert(self.conns.len() as u32);
            self.conns.push(idx);
            return self.conns.len() == 1;
        }
        false
    }

    /// True when it was the room's last local connection.
    fn leave(&mut self, idx: u32) -> bool {
        if let Some(p) = self.pos.remove(&idx) {
            self.conns.swap_remove(p as usize);
            if let Some(&moved) = self.conns.get(p as usize) {
                self.pos.insert(moved, p);
            }
            return self.conns.is_empty();
        }
        false
    }
}

pub struct Registry {
    apps: Vec<AppIndex>,
}

impl Registry {
    pub fn new(apps: usize) -> Registry {
        Registry {
            apps: (0..apps).map(|_| AppIndex::default()).collect(),
        }
    }

    /// Registers an admitted connection. `dev_tag`: the device's tag from `prefetch`, or 0.
    /// Returns the device's tag, for `remove`.
    pub fn add(
        &mut self,
        app: usize,
        idx: u32,
        device: &Arc<str>,
        dev_tag: u32,
        user: Option<&Arc<str>>,
    ) -> u32 {
        let a = &mut self.apps[app];
        let dev_tag = a.devices.add(device, dev_tag, idx);
        if let Some(u) = user {
            a.users.add(u, 0, idx);
        }
        a.all.insert(idx);
        if let Some(rooms) = a.device_rooms.get(device) {
            for r in rooms {
                if let Some(room) = a.rooms.get_mut(r) {
                    if room.join(idx) {
                        a.live_rooms.insert(r.clone());
                    }
                }
            }
        }
        dev_tag
    }

    /// Unregisters a connection (`dev_tag`: what `add` returned, or 0).
    pub fn remove(&mut self, app: usize, idx: u32, device: &str, dev_tag: u32, user: Option<&str>) {
        let a = &mut self.apps[app];
        a.devices.remove(device, dev_tag, idx);
        if let Some(u) = user {
            a.users.remove(u, 0, idx);
        }
        if let Some(rooms) = a.device_rooms.get(device) {
            for r in rooms {
                if let Some(room) = a.rooms.get_mut(r) {
                    if room.leave(idx) {
                        a.live_rooms.remove(r);
                    }
                }
            }
        }
        a.all.remove(idx);
    }

    /// Starts fetching what `add` will touch for this device and user, ahead of it (see
    /// `IdMap`): the reactor calls it when a HELLO names them. Returns the device's tag,
    /// for `add`.
    pub fn prefetch(&self, app: usize, device: &str, user: Option<&str>) -> u32 {
        let a = &self.apps[app];
        if let Some(u) = user {
            a.users.prefetch(u);
        }
        a.devices.prefetch(device)
    }

    pub fn device(&self, app: usize, device: &str) -> &[u32] {
        self.apps[app]
            .devices
            .get(device)
            .map_or(&[], |c| c.as_slice())
    }

    pub fn user(&self, app: usize, user: &str) -> &[u32] {
        self.apps[app].users.get(user).map_or(&[], |c| c.as_slice())
    }

    /// Every admitted connection of `app`, in slab order.
    pub fn app(&self, app: usize) -> impl Iterator<Item = u32> + '_ {
        self.apps[app].all.iter()
    }

    /// How many connections `app` has admitted here.
    pub fn app_len(&self, app: usize) -> usize {
        self.apps[app].all.len
    }

    pub fn room(&self, app: usize, room: &str) -> Option<&Room> {
        self.apps[app].rooms.get(room)
    }

    /// The `n` rooms with the most local connections (then members), across apps: (app,
    /// room, member devices, local connections). Only rooms with a local connection are
    /// looked at (at most one per connection here and room of its device), one pass, `n`
    /// kept.
    pub fn top_rooms(&self, n: usize) -> Vec<(usize, String, usize, usize)> {
        let mut top: Vec<(usize, usize, usize, &str)> = Vec::with_capacity(n + 1);
        for (app, a) in self.apps.iter().enumerate() {
            for name in &a.live_rooms {
                let Some(r) = a.rooms.get(name) else {
                    continue;
                };
                let key = (r.conns.len(), r.members.len());
                if top.len() == n && top.last().is_some_and(|l| (l.0, l.1) >= key) {
                    continue;
                }
                let at = top.partition_point(|t| (t.0, t.1) >= key);
                top.insert(at, (key.0, key.1, app, name));
                top.truncate(n);
            }
        }
        top.into_iter()
            .map(|(online, members, app, name)| (app, name.to_string(), members, online))
            .collect()
    }

    /// Every room of app `app` with its member devices.
    pub fn rooms_of(&self, app: usize) -> Vec<(String, Vec<String>)> {
        self.apps[app]
            .rooms
            .iter()
            .map(|(name, r)| {
                (
                    name.to_string(),
                    r.members.iter().map(|m| m.to_string()).collect(),
                )
            })
            .collect()
    }

    /// Binds devices to a room; their connections join at once. Returns how many were new.
    pub fn room_add(&mut self, app: usize, room: &str, devices: &[String]) -> usize {
        let a = &mut self.apps[app];
        let key: Arc<str> = match a.rooms.get_key_value(room) {
            Some((k, _)) => k.clone(),
            None => room.into(),
        };
        let mut added = 0;
        for d in devices {
            // Share the device id with the device index when the device is online.
            let dev: Arc<str> = a
                .devices
                .get_key_value(d.as_str())
                .map_or_else(|| d.as_str().into(), |(k, _)| k.clone());
            let r = a.rooms.entry(key.clone()).or_default();
            if !r.members.insert(dev.clone()) {
                continue;
            }
            added += 1;
            if let Some(c) = a.devices.get(&dev) {
                for &i in c.as_slice() {
                    if r.join(i) {
                        a.live_rooms.insert(key.clone());
                    }
                }
            }
            a.device_rooms.entry(dev).or_default().push(key.clone());
        }
        added
    }

    /// Unbinds devices; a room left with no member is dropped. Returns how many were removed.
    pub fn room_remove(&mut self, app: usize, room: &str, devices: &[String]) -> usize {
        let a = &mut self.apps[app];
        let Some(r) = a.rooms.get_mut(room) else {
            return 0;
        };
        let mut removed = 0;
        for d in devices {
            if !r.members.remove(d.as_str()) {
                continue;
            }
            removed += 1;
            if let Some(c) = a.devices.get(d.as_str()) {
                for i in c.as_slice() {
                    if r.leave(*i) {
                        a.live_rooms.remove(room);
                    }
                }
            }
            if let Some(list) = a.device_rooms.get_mut(d.as_str()) {
                list.retain(|x| &**x != room);
                if list.is_empty() {
                    a.device_rooms.remove(d.as_str());
                }
            }
        }
        if r.members.is_empty() {
            a.rooms.remove(room);
            a.live_rooms.remove(room);
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id index against std's map, through many adds and removes in random order:
    /// ~300 keys in a 512-slot table, so runs form, slots shift back on removal (across the
    /// table's end too), and every key's connections are checked along the way.
    #[test]
    fn the_id_index_agrees_with_a_plain_map() {
        let mut m = IdMap::default();
        let mut model: HashMap<String, Vec<u32>> = HashMap::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        m.prefetch("nothing yet"); // an empty table: nothing to fetch, no panic
        let keys: Vec<Arc<str>> = (0..300).map(|i| format!("dev-{i}").into()).collect();
        let mut idx = 0u32;
        for step in 0..20_000 {
            let k = &keys[next(keys.len() as u64) as usize];
            let held = model.get(&**k).map_or(0, |v| v.len());
            // Grow to a few hundred keys, then churn around that (removes as likely as adds).
            if held == 0 || (next(3) == 0 && held < 3) {
                idx += 1;
                // The tag from the prefetch, or none (hashed in the add): both ways.
                let tag = m.prefetch(k);
                let kept = m.add(k, if idx.is_multiple_of(2) { tag } else { 0 }, idx);
                assert_eq!(kept, tag);
                model.entry(k.to_string()).or_default().push(idx);
            } else {
                let v = model.get_mut(&**k).unwrap();
                let gone = v.remove(next(v.len() as u64) as usize);
                if v.is_empty() {
                    model.remove(&**k);
                }
                // Its own `Arc` (compared by address) or another with the same text.
                if gone.is_multiple_of(2) {
                    m.remove(k, m.tag(k), gone);
                } else {
                    let copy: String = k.to_string();
                    m.remove(&copy, 0, gone);
                }
            }
            if step % 97 == 0 || step > 19_900 {
                assert_eq!(m.len, model.len(), "step {step}");
                for key in &keys {
                    let got = m.get(key).map_or(&[][..], |c| c.as_slice());
                    let want = model.get(&**key).map_or(&[][..], |v| &v[..]);
                    assert_eq!(got, want, "step {step}, key {key}");
                }
            }
        }
        // Removing what is not there changes nothing.
        m.remove("absent", 0, 1);
        let (k, _) = model
            .iter()
            .next()
            .map(|(k, v)| (k.clone(), v.clone()))
            .unwrap();
        m.remove(&k, 0, u32::MAX);
        assert_eq!(m.len, model.len());
        assert!(m.get_key_value(&k).is_some_and(|(key, _)| **key == *k));
    }

    #[test]
    fn add_remove_keeps_every_index_current() {
        let mut r = Registry::new(1);
        let d1: Arc<str> = "d1".into();
        let d2: Arc<str> = "d2".into();
        let u: Arc<str> = "u".into();
        let app = |r: &Registry| r.app(0).collect::<Vec<_>>();
        let t1 = r.add(0, 130, &d1, 0, Some(&u));
        assert_eq!(r.add(0, 11, &d1, t1, None), t1);
        let t2 = r.add(0, 64, &d2, 0, Some(&u));
        assert_eq!(r.device(0, "d1"), &[130, 11]);
        assert_eq!(r.user(0, "u"), &[130, 64]);
        // In slab order, across words of the bitmap.
        assert_eq!((app(&r), r.app_len(0)), (vec![11, 64, 130], 3));
        r.remove(0, 130, "d1", t1, Some("u"));
        assert_eq!((app(&r), r.app_len(0)), (vec![11, 64], 2));
        assert_eq!(r.device(0, "d1"), &[11]);
        assert_eq!(r.user(0, "u"), &[64]);
        r.remove(0, 11, "d1", 0, None);
        r.remove(0, 64, "d2", t2, Some("u"));
        assert!(r.device(0, "d1").is_empty() && r.user(0, "u").is_empty());
        assert_eq!((app(&r), r.app_len(0)), (vec![], 0));
    }

    #[test]
    fn an_app_s_connections_agree_with_a_plain_set() {
        let mut s = IdxSet::default();
        let mut model = std::collections::BTreeSet::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let idx = (x % 1000) as u32;
            if x & (1 << 40) == 0 {
                s.insert(idx);
                model.insert(idx);
            } else {
                s.remove(idx);
                model.remove(&idx);
            }
            assert_eq!(s.len, model.len());
        }
        assert!(s.iter().eq(model.iter().copied()));
    }

    #[test]
    fn top_rooms_are_the_most_connected_across_apps() {
        let mut r = Registry::new(2);
        for (i, d) in ["a", "b", "c", "d"].iter().enumerate() {
            let d: Arc<str> = (*d).into();
            r.add(0, i as u32, &d, 0, None);
        }
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        r.room_add(0, "two", &ids(&["a", "b", "zz"]));
        r.room_add(0, "three", &ids(&["a", "b", "c"]));
        r.room_add(0, "none", &ids(&["x", "y", "z", "w"]));
        r.room_add(1, "one", &ids(&["d"]));
        r.room_add(0, "one", &ids(&["d", "q"]));
        let top = r.top_rooms(3);
        let names: Vec<(usize, &str, usize, usize)> = top
            .iter()
            .map(|(a, n, m, o)| (*a, n.as_str(), *m, *o))
            .collect();
        assert_eq!(
            names,
            [(0, "three", 3, 3), (0, "two", 3, 2), (0, "one", 2, 1)]
        );
        // Rooms with nobody here ("none", app 1's "one") are not listed.
        assert_eq!(r.top_rooms(10).len(), 3);
        assert!(r.top_rooms(0).is_empty());
        // The last local connection of a room leaves: it goes from the list; back, it returns.
        r.room_remove(0, "one", &ids(&["d"]));
        assert_eq!(r.top_rooms(10).len(), 2);
        r.room_add(0, "one", &ids(&["d"]));
        assert_eq!(r.top_rooms(10).len(), 3);
        r.add(0, 9, &"c".into(), 0, None);
        assert_eq!(
            r.top_rooms(1)[0].3,
            4,
            "a second connection of c joins three"
        );
        // Connections coming and going (not membership): a member of "none" connects, and
        // the room is listed; it leaves again, and the room is not.
        let listed = |r: &Registry| r.top_rooms(10).iter().any(|t| t.1 == "none");
        let x: Arc<str> = "x".into();
        r.add(0, 20, &x, 0, None);
        assert!(listed(&r), "a member's connection makes the room live");
        r.remove(0, 20, "x", 0, None);
        assert!(!listed(&r), "its last connection going makes it not");
        r.remove(0, 9, "c", 0, None);
        assert_eq!(r.top_rooms(1)[0].3, 3);
    }

    #[test]
    fn rooms_follow_their_members_connections() {
        let mut r = Registry::new(1);
        let (d1, d2): (Arc<str>, Arc<str>) = ("d1".into(), "d2".into());
        r.add(0, 1, &d1, 0, None);
        assert_eq!(
            r.room_add(0, "room", &["d1".into(), "d2".into(), "d1".into()]),
            2
        );
        let conns = |r: &Registry| {
            let mut v: Vec<u32> = r
                .room(0, "room")
                .map(|x| x.conns().to_vec())
                .unwrap_or_default();
            v.sort();
            v
        };
        assert_eq!(
            conns(&r),
            vec![1],
            "online member's connection joins at once"
        );
        r.add(0, 2, &d2, 0, None);
        assert_eq!(conns(&r), vec![1, 2], "a member connecting later joins");
        r.remove(0, 1, "d1", 0, None);
        assert_eq!(conns(&r), vec![2], "a disconnect leaves");
        assert_eq!(r.room_remove(0, "room", &["d2".into()]), 1);
        assert_eq!(
            conns(&r),
            Vec::<u32>::new(),
            "leaving the room stops delivery"
        );
        assert_eq!(r.room_remove(0, "room", &["d1".into()]), 1);
        assert!(r.room(0, "room").is_none(), "an empty room is dropped");
    }
}
