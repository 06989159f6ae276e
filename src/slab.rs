//! The connection table: a slab with a free list and a generation per slot. A connection is
//! named by `{index, generation}`; anything that names an old generation (a push to a stale
//! id, a timer, a worker's reply) misses, and is never applied to the slot's new tenant.

pub struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
}

struct Entry<T> {
    gen: u32,
    val: Option<T>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `v` and returns its `(index, generation)`. Freed slots are reused last-in
    /// first-out, so the table stays dense.
    pub fn insert(&mut self, v: T) -> (u32, u32) {
        self.len += 1;
        if let Some(i) = self.free.pop() {
            let e = &mut self.entries[i as usize];
            debug_assert!(e.val.is_none());
            e.val = Some(v);
            (i, e.gen)
        } else {
            let i = self.entries.len() as u32;
            self.entries.push(Entry {
                gen: 1,
                val: Some(v),
            });
            (i, 1)
        }
    }

    pub fn get(&self, idx: u32, gen: u32) -> Option<&T> {
        match self.entries.get(idx as usize) {
            Some(e) if e.gen == gen => e.val.as_ref(),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, idx: u32, gen: u32) -> Option<&mut T> {
        match self.entries.get_mut(idx as usize) {
            Some(e) if e.gen == gen => e.val.as_mut(),
            _ => None,
        }
    }

    /// The current tenant of a slot, whatever its generation.
    pub fn by_index(&self, idx: u32) -> Option<(&T, u32)> {
        let e = self.entries.get(idx as usize)?;
        e.val.as_ref().map(|v| (v, e.gen))
    }

    pub fn by_index_mut(&mut self, idx: u32) -> Option<(&mut T, u32)> {
        let e = self.entries.get_mut(idx as usize)?;
        let gen = e.gen;
        e.val.as_mut().map(|v| (v, gen))
    }

    /// Empties the slot and bumps its generation so old ids go stale.
    pub fn remove(&mut self, idx: u32, gen: u32) -> Option<T> {
        let e = self.entries.get_mut(idx as usize)?;
        if e.gen != gen {
            return None;
        }
        let v = e.val.take()?;
        // Generation 0 is never handed out, so a zeroed id can never match.
        e.gen = e.gen.wrapping_add(1).max(1);
        self.free.push(idx);
        self.len -= 1;
        Some(v)
    }

    /// Every live `(index, generation)`.
    pub fn keys(&self) -> Vec<(u32, u32)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.val.is_some())
            .map(|(i, e)| (i as u32, e.gen))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_generation_misses_the_new_tenant() {
        let mut s = Slab::default();
        let (i, g) = s.insert("first");
        assert_eq!(s.remove(i, g), Some("first"));
        let (i2, g2) = s.insert("second");
        assert_eq!(i2, i, "slot reused");
        assert_ne!(g2, g);
        assert_eq!(s.get(i, g), None);
        assert_eq!(s.remove(i, g), None);
        assert_eq!(s.get(i2, g2), Some(&"second"));
        assert_eq!(s.len(), 1);
    }
}
