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
/// deletion by backward shift (no tombstones). Each slot's tag (the key's hash, never 0)
/// sits in an array of its own, so a probe reads eight tags a cache line and the keys only
/// on a tag match.
///
/// Not std's map, for one reason: a connect's insert misses the cache twice (the tag's line
/// and the slot's: the kernel's socket work between two connects evicts them), and only a
/// map of our own says where a key's slot is before the insert, so that the reactor can
/// fetch both lines while it checks the HELLO (`prefetch`). Keys are hashed with SipHash
/// under a random key (std's `RandomState`): clients choose them.
#[derive(Default)]
struct IdMap {
    tags: Vec<u64>,
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
    /// The key's tag: its hash, 0 kept for an empty slot.
    fn tag(&self, key: &str) -> u64 {
        self.hasher.hash_one(key) | 1
    }

    /// Where a tag's probe starts (bit 0 is always set: the bits above it).
    fn home(&self, tag: u64) -> usize {
        (tag >> 1) as usize & (self.tags.len() - 1)
    }

    fn find(&self, tag: u64, key: &str) -> Option<usize> {
        self.probe(tag, key).ok()
    }

    /// `Ok`: the slot holding `key`; `Err`: the empty slot that ends its run, where it would
    /// go (None before the table has any slot).
    fn probe(&self, tag: u64, key: &str) -> Result<usize, Option<usize>> {
        if self.tags.is_empty() {
            return Err(None);
        }
        let mask = self.tags.len() - 1;
        let mut i = self.home(tag);
        // Ends: a quarter of the slots at least are empty.
        loop {
            match self.tags[i] {
                0 => return Err(Some(i)),
                t if t == tag && self.slots[i].key.as_deref() == Some(key) => return Ok(i),
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
    /// its slot's), so that they arrive while the caller does other work.
    fn prefetch(&self, key: &str) {
        if self.tags.is_empty() {
            return;
        }
        let i = self.home(self.tag(key));
        crate::slab::prefetch(&self.tags[i]);
        crate::slab::prefetch(&self.slots[i]);
    }

    /// Adds connection `idx` to `key`'s.
    fn add(&mut self, key: &Arc<str>, idx: u32) {
        let tag = self.tag(key);
        let free = match self.probe(tag, key) {
            Ok(i) => {
                self.slots[i].conns.add(idx); // rare: one device, two links
                return;
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

    /// Removes connection `idx` from `key`'s; the key goes with its last connection.
    fn remove(&mut self, key: &str, idx: u32) {
        let Some(mut hole) = self.find(self.tag(key), key) else {
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

#[derive(Default)]
pub struct AppIndex {
    devices: IdMap,
    users: IdMap,
    /// Every admitted connection of the app; a connection knows its position for O(1) removal.
    all: Vec<u32>,
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

    /// Registers an admitted connection; returns its position in the app's list.
    pub fn add(&mut self, app: usize, idx: u32, device: &Arc<str>, user: Option<&Arc<str>>) -> u32 {
        let a = &mut self.apps[app];
        a.devices.add(device, idx);
        if let Some(u) = user {
            a.users.add(u, idx);
        }
        a.all.push(idx);
        if let Some(rooms) = a.device_rooms.get(device) {
            for r in rooms {
                if let Some(room) = a.rooms.get_mut(r) {
                    if room.join(idx) {
                        a.live_rooms.insert(r.clone());
                    }
                }
            }
        }
        (a.all.len() - 1) as u32
    }

    /// Unregisters a connection at position `pos`. Returns the index of the connection that
    /// moved into `pos` (its caller must update that connection's position), if any.
    pub fn remove(
        &mut self,
        app: usize,
        idx: u32,
        pos: u32,
        device: &str,
        user: Option<&str>,
    ) -> Option<u32> {
        let a = &mut self.apps[app];
        a.devices.remove(device, idx);
        if let Some(u) = user {
            a.users.remove(u, idx);
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
        let pos = pos as usize;
        debug_assert_eq!(a.all.get(pos), Some(&idx));
        a.all.swap_remove(pos);
        a.all.get(pos).copied()
    }

    /// Starts fetching what `add` will touch for this device and user, ahead of it (see
    /// `IdMap`): the reactor calls it when a HELLO names them.
    pub fn prefetch(&self, app: usize, device: &str, user: Option<&str>) {
        let a = &self.apps[app];
        a.devices.prefetch(device);
        if let Some(u) = user {
            a.users.prefetch(u);
        }
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

    pub fn app(&self, app: usize) -> &[u32] {
        &self.apps[app].all
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
                m.prefetch(k);
                m.add(k, idx);
                model.entry(k.to_string()).or_default().push(idx);
            } else {
                let v = model.get_mut(&**k).unwrap();
                let gone = v.remove(next(v.len() as u64) as usize);
                if v.is_empty() {
                    model.remove(&**k);
                }
                m.remove(k, gone);
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
        m.remove("absent", 1);
        let (k, _) = model
            .iter()
            .next()
            .map(|(k, v)| (k.clone(), v.clone()))
            .unwrap();
        m.remove(&k, u32::MAX);
        assert_eq!(m.len, model.len());
        assert!(m.get_key_value(&k).is_some_and(|(key, _)| **key == *k));
    }

    #[test]
    fn add_remove_keeps_every_index_current() {
        let mut r = Registry::new(1);
        let d1: Arc<str> = "d1".into();
        let d2: Arc<str> = "d2".into();
        let u: Arc<str> = "u".into();
        let p0 = r.add(0, 10, &d1, Some(&u));
        let p1 = r.add(0, 11, &d1, None);
        let p2 = r.add(0, 12, &d2, Some(&u));
        assert_eq!(r.device(0, "d1"), &[10, 11]);
        assert_eq!(r.user(0, "u"), &[10, 12]);
        assert_eq!(r.app(0), &[10, 11, 12]);
        // Removing the first moves the last into its place.
        assert_eq!(r.remove(0, 10, p0, "d1", Some("u")), Some(12));
        assert_eq!(r.app(0), &[12, 11]);
        assert_eq!(r.device(0, "d1"), &[11]);
        assert_eq!(r.user(0, "u"), &[12]);
        assert_eq!(r.remove(0, 11, p1, "d1", None), None);
        let _ = p2;
        assert_eq!(r.remove(0, 12, 0, "d2", Some("u")), None);
        assert!(r.device(0, "d1").is_empty() && r.user(0, "u").is_empty() && r.app(0).is_empty());
    }

    #[test]
    fn top_rooms_are_the_most_connected_across_apps() {
        let mut r = Registry::new(2);
        for (i, d) in ["a", "b", "c", "d"].iter().enumerate() {
            let d: Arc<str> = (*d).into();
            r.add(0, i as u32, &d, None);
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
        let p = r.add(0, 9, &"c".into(), None);
        assert_eq!(
            r.top_rooms(1)[0].3,
            4,
            "a second connection of c joins three"
        );
        // Connections coming and going (not membership): a member of "none" connects, and
        // the room is listed; it leaves again, and the room is not.
        let listed = |r: &Registry| r.top_rooms(10).iter().any(|t| t.1 == "none");
        let x: Arc<str> = "x".into();
        let px = r.add(0, 20, &x, None);
        assert!(listed(&r), "a member's connection makes the room live");
        r.remove(0, 20, px, "x", None);
        assert!(!listed(&r), "its last connection going makes it not");
        r.remove(0, 9, p, "c", None);
        assert_eq!(r.top_rooms(1)[0].3, 3);
    }

    #[test]
    fn rooms_follow_their_members_connections() {
        let mut r = Registry::new(1);
        let (d1, d2): (Arc<str>, Arc<str>) = ("d1".into(), "d2".into());
        let p1 = r.add(0, 1, &d1, None);
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
        r.add(0, 2, &d2, None);
        assert_eq!(conns(&r), vec![1, 2], "a member connecting later joins");
        r.remove(0, 1, p1, "d1", None);
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
