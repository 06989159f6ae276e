//! The connection table: a slab with a free list and a generation per slot. A connection is
//! named by `{index, generation}`; anything that names an old generation (a push to a stale
//! id, a timer, a worker's reply) misses, and is never applied to the slot's new tenant.

/// Asks the CPU to fetch the cache lines `r` lies on ahead of their use (a hint: nothing
/// waits for it).
#[inline(always)]
pub fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = (r as *const T).cast::<i8>();
        let first = p as usize;
        let last = first + std::mem::size_of::<T>().max(1) - 1;
        // Each line once, from the first byte's to the last's.
        for line in (first & !63..=last & !63).step_by(64) {
            let at = p.wrapping_add(line.wrapping_sub(first));
            // SAFETY: a prefetch reads nothing the program sees and never faults; every
            // address is on a line `r` lies on.
            unsafe { std::arch::x86_64::_mm_prefetch(at, std::arch::x86_64::_MM_HINT_T0) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

/// Entries at their value's own alignment (the default).
#[derive(Clone, Copy)]
pub struct Packed;

/// Entries 64-byte aligned (malloc aligns to 16 only): the connection table's, so that a
/// 128-byte entry lies on exactly two cache lines instead of three. Only there: aligned
/// above 16, a table that grows is copied rather than remapped, and smaller values would
/// be padded out to a line.
#[derive(Clone, Copy)]
#[repr(align(64))]
pub struct Line;

pub struct Slab<T, A = Packed> {
    entries: Vec<Entry<T, A>>,
    free: Vec<u32>,
    len: usize,
    /// The generation a slot appended from now on starts at: above every generation a
    /// slot cut off by `shrink` handed out, so an id can never come back.
    first_gen: u32,
}

struct Entry<T, A> {
    /// No bytes: the entry's alignment (`Packed` or `Line`).
    _align: [A; 0],
    gen: u32,
    val: Option<T>,
}

/// The bytes one value of `T` takes in a slab aligned `A` (for size checks).
pub fn entry_size<T, A>() -> usize {
    std::mem::size_of::<Entry<T, A>>()
}

impl<T, A> Default for Slab<T, A> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
            first_gen: 1,
        }
    }
}

impl<T, A> Slab<T, A> {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Slots in the table, occupied or not.
    pub fn slots(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `v` and returns its `(index, generation)`. Freed slots are reused last-in
    /// first-out, so the table stays dense.
    pub fn insert(&mut self, v: T) -> (u32, u32) {
        self.len += 1;
        if let Some(i) = self.free.pop() {
            // The next tenant's slot, fetched now: its lines are cold (a slot is reused
            // last-in first-out, but the kernel's work between two connects evicts them),
            // and the syscalls before the next insert leave the fetch time to land.
            if let Some(&next) = self.free.last() {
                self.prefetch(next);
            }
            let e = &mut self.entries[i as usize];
            debug_assert!(e.val.is_none());
            e.val = Some(v);
            (i, e.gen)
        } else {
            let i = self.entries.len() as u32;
            let gen = self.first_gen;
            self.entries.push(Entry {
                _align: [],
                gen,
                val: Some(v),
            });
            (i, gen)
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

    /// Starts fetching slot `idx`'s lines, ahead of a use (see [`prefetch`]).
    pub fn prefetch(&self, idx: u32) {
        if let Some(e) = self.entries.get(idx as usize) {
            prefetch(e);
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

    /// Gives back the room of a table far larger than what it holds (after a flood of
    /// connections has gone): the vacant slots at the end are cut off and the free list is
    /// reordered so that new tenants fill the lowest slots first, letting the next shrink
    /// cut more. A cut-off slot's generation is remembered in `first_gen`. Returns the
    /// slots cut off. O(slots); call it rarely.
    pub fn shrink(&mut self) -> usize {
        if self.entries.len() <= 1024 || self.entries.len() < 2 * self.len {
            return 0;
        }
        let keep = self
            .entries
            .iter()
            .rposition(|e| e.val.is_some())
            .map_or(0, |i| i + 1);
        let cut = self.entries.len() - keep;
        if cut == 0 {
            // A live tenant in the last slot: nothing to cut, and no reordering either (it
            // is O(slots log slots) on the reactor).
            return 0;
        }
        for e in &self.entries[keep..] {
            self.first_gen = self.first_gen.max(e.gen);
        }
        self.entries.truncate(keep);
        self.entries.shrink_to(keep * 5 / 4);
        self.free.retain(|&i| (i as usize) < keep);
        // Popped from the end: the lowest index first.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        self.free.shrink_to(self.free.len() * 5 / 4);
        cut
    }

    /// The table's layout without its values, for the live upgrade (`reactor::handoff`):
    /// every slot's generation, the free list in order, and `first_gen`.
    pub fn shape(&self) -> (Vec<u32>, Vec<u32>, u32) {
        let gens = self.entries.iter().map(|e| e.gen).collect();
        (gens, self.free.clone(), self.first_gen)
    }

    /// A table with `shape`'s layout holding `vals` at their slots, so that every id named
    /// before names the same value after, and every stale one stays stale. Errors when the
    /// parts do not fit together (a value outside the table or on a free slot, a slot
    /// twice, a vacant slot missing from the free list).
    pub fn from_shape(
        (gens, free, first_gen): (Vec<u32>, Vec<u32>, u32),
        vals: Vec<(u32, T)>,
    ) -> Result<Slab<T, A>, String> {
        let mut entries: Vec<Entry<T, A>> = gens
            .into_iter()
            .map(|gen| Entry {
                _align: [],
                gen,
                val: None,
            })
            .collect();
        let len = vals.len();
        for (i, v) in vals {
            let e = entries
                .get_mut(i as usize)
                .ok_or_else(|| format!("slot {i} outside the table"))?;
            if e.val.is_some() {
                return Err(format!("slot {i} twice"));
            }
            e.val = Some(v);
        }
        let mut seen = vec![false; entries.len()];
        for &i in &free {
            match entries.get(i as usize) {
                Some(e) if e.val.is_none() && !seen[i as usize] => seen[i as usize] = true,
                _ => return Err(format!("free slot {i} is not a vacant slot of the table")),
            }
        }
        if free.len() + len != entries.len() {
            return Err("a vacant slot is missing from the free list".into());
        }
        Ok(Slab {
            entries,
            free,
            len,
            first_gen,
        })
    }

    /// Every value held, in slot order.
    pub fn iter_vals(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().filter_map(|e| e.val.as_ref())
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
        let mut s: Slab<_> = Slab::default();
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

    #[test]
    fn shrink_gives_back_a_floods_room_and_never_repeats_an_id() {
        let mut s: Slab<_> = Slab::default();
        let ids: Vec<_> = (0..5000).map(|i| s.insert(i)).collect();
        // The flood goes but for a few, one of them high up.
        for &(i, g) in &ids {
            if i % 1000 != 0 && i != 2500 {
                s.remove(i, g);
            }
        }
        assert_eq!(s.len(), 6);
        assert_eq!(s.shrink(), 5000 - 4001);
        assert!(s.entries.capacity() <= 4001 * 5 / 4);
        for &(i, g) in &ids {
            // The survivors are still found; every gone id stays gone.
            let alive = i % 1000 == 0 || i == 2500;
            assert_eq!(s.get(i, g).is_some(), alive, "{i}:{g}");
        }
        // New tenants fill the lowest slots first, and a slot past the cut comes back with
        // a generation none of its earlier tenants had.
        let (i, _) = s.insert(9);
        assert_eq!(i, 1);
        let seen: std::collections::HashSet<_> = ids.iter().copied().collect();
        for _ in 0..6000 {
            let id = s.insert(0);
            assert!(!seen.contains(&id), "id {id:?} handed out twice");
        }
        // Too full to shrink: nothing happens.
        assert_eq!(s.shrink(), 0);
    }

    #[test]
    fn a_table_rebuilt_from_its_shape_names_the_same_values_and_no_stale_id() {
        let mut s: Slab<_> = Slab::default();
        let ids: Vec<_> = (0..10).map(|i| s.insert(i)).collect();
        for &(i, g) in &ids[2..6] {
            s.remove(i, g);
        }
        let vals = ids
            .iter()
            .filter_map(|&(i, g)| s.get(i, g).map(|v| (i, *v)))
            .collect();
        let mut t: Slab<_> = Slab::from_shape(s.shape(), vals).unwrap();
        for &(i, g) in &ids {
            assert_eq!(t.get(i, g), s.get(i, g));
        }
        // The next tenants take the same slots with the same generations in both.
        for _ in 0..6 {
            assert_eq!(t.insert(0), s.insert(0));
        }
        // Parts that do not fit are refused.
        let (gens, free, first) = s.shape();
        assert!(Slab::<i32>::from_shape((gens.clone(), free.clone(), first), vec![]).is_err());
        assert!(
            Slab::<i32>::from_shape((gens.clone(), vec![], first), vec![(0, 1), (0, 2)]).is_err()
        );
        assert!(Slab::<i32>::from_shape((vec![1], vec![0], 1), vec![(0, 1)]).is_err());
        assert!(Slab::<i32>::from_shape((vec![1], vec![], 1), vec![(3, 1)]).is_err());
    }
}
