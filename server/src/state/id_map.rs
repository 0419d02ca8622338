//! `IdMap`: the records of locks, resources and LVBs by id, and each session's waiting
//! requests by request id, in id order, in shared chunks so that a copy of the whole
//! map costs one pointer per chunk.
//!
//! Why chunks: a snapshot is encoded off the Raft thread from a copy of the table
//! (`State::freeze`). With plain vectors that copy cost about twice the encoding
//! itself (`snapshot_cost`); with chunks behind `Arc`s it costs one reference count
//! per `CHUNK_LEN` records, and the Raft thread copies a chunk only the first time it
//! changes one while a snapshot still holds it (`Arc::make_mut`), as a copy-on-write
//! B-tree does (LMDB, Btrfs) but one level deep.

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::sync::Arc;

/// Records per chunk: a chunk of resources is ≈ 18 KB, so the first change to a chunk
/// after a freeze copies ≈ 18 KB, and the chunk index costs 16 bytes per 256 records.
const CHUNK_LEN: usize = 256;

/// Tombstones tolerated before a compaction, whatever the number of records.
const MIN_TOMBSTONES: usize = 64;

/// Records by id. Ids are issued in log order by the commands that created them
/// (`State::id_base`; LVBs: their resource's; waiting requests: request ids, which a session raises), so a new
/// id is nearly always above every id in the map: an insert is a push onto the last
/// chunk, a lookup two binary searches, and iteration is in id order (which keeps
/// snapshots and event order deterministic). An id below the largest goes into its
/// chunk, which splits when full.
///
/// A removed record leaves a tombstone until the tombstones outnumber the records;
/// then the map is rebuilt densely (amortized O(1) per removal). Trailing tombstones
/// go at once (a lock taken and released at the top costs nothing). About the
/// record's own size per entry, where a BTreeMap costs nearly twice that.
#[derive(Debug)]
pub(super) struct IdMap<T> {
    /// Non-empty chunks, sorted by id and disjoint.
    chunks: Vec<Chunk<T>>,
    /// Entries that are not tombstones.
    live: usize,
    /// Entries, tombstones included.
    slots: usize,
}

#[derive(Debug)]
struct Chunk<T> {
    /// The id of `entries[0]`, kept beside the pointer so that the search over
    /// chunks reads one contiguous array.
    first: u64,
    /// Sorted by id, ids unique, never empty; `None` is a tombstone.
    entries: Arc<Vec<(u64, Option<T>)>>,
}

impl<T> Clone for Chunk<T> {
    fn clone(&self) -> Self {
        Chunk {
            first: self.first,
            entries: Arc::clone(&self.entries),
        }
    }
}

/// Shares every chunk: O(number of chunks), whatever the records cost to copy.
impl<T> Clone for IdMap<T> {
    fn clone(&self) -> Self {
        IdMap {
            chunks: self.chunks.clone(),
            live: self.live,
            slots: self.slots,
        }
    }
}

impl<T> Default for IdMap<T> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            live: 0,
            slots: 0,
        }
    }
}

/// Makes room for one more entry without growing past one chunk's worth, where
/// `Vec`'s doubling would leave a copied (exactly sized) chunk up to half empty.
fn reserve_one<E>(entries: &mut Vec<E>) {
    if entries.len() == entries.capacity() {
        entries.reserve_exact(CHUNK_LEN.max(entries.len() + 1) - entries.len());
    }
}

fn new_chunk<T>(first: (u64, Option<T>)) -> Chunk<T> {
    let mut entries = Vec::with_capacity(CHUNK_LEN);
    let id = first.0;
    entries.push(first);
    Chunk {
        first: id,
        entries: Arc::new(entries),
    }
}

impl<T> IdMap<T> {
    /// The chunk that holds `id` if any does: the last one starting at or below it.
    fn chunk_of(&self, id: u64) -> Option<usize> {
        self.chunks
            .partition_point(|c| c.first <= id)
            .checked_sub(1)
    }

    /// (chunk, entry) of `id`, tombstone or not.
    fn position(&self, id: u64) -> Option<(usize, usize)> {
        let c = self.chunk_of(id)?;
        let e = self
            .chunks
            .get(c)?
            .entries
            .binary_search_by_key(&id, |&(id, _)| id)
            .ok()?;
        Some((c, e))
    }

    /// The slot of `id`, tombstone or not.
    fn slot(&self, id: u64) -> Option<&Option<T>> {
        let (c, e) = self.position(id)?;
        self.chunks.get(c)?.entries.get(e).map(|(_, v)| v)
    }

    pub(super) fn len(&self) -> usize {
        self.live
    }

    pub(super) fn get(&self, id: &u64) -> Option<&T> {
        self.slot(*id)?.as_ref()
    }

    pub(super) fn contains_key(&self, id: &u64) -> bool {
        self.get(id).is_some()
    }

    /// Records in id order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&u64, &T)> {
        self.chunks
            .iter()
            .flat_map(|c| c.entries.iter())
            .filter_map(|(id, v)| v.as_ref().map(|v| (id, v)))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &T> {
        self.iter().map(|(_, v)| v)
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &u64> {
        self.iter().map(|(k, _)| k)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.live == 0
    }

    #[cfg(test)]
    pub(super) fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// How many of this map's chunks `other` shares (tests of copy-on-write).
    #[cfg(test)]
    pub(super) fn shared_chunks(&self, other: &IdMap<T>) -> usize {
        self.chunks
            .iter()
            .filter(|c| {
                other
                    .chunks
                    .iter()
                    .any(|o| Arc::ptr_eq(&c.entries, &o.entries))
            })
            .count()
    }
}

impl<T: Clone> IdMap<T> {
    /// Appends an id above every id in the map.
    fn push(&mut self, entry: (u64, Option<T>)) {
        match self.chunks.last_mut() {
            Some(last) if last.entries.len() < CHUNK_LEN => {
                let entries = Arc::make_mut(&mut last.entries);
                reserve_one(entries);
                entries.push(entry);
            }
            _ => self.chunks.push(new_chunk(entry)),
        }
        self.slots += 1;
    }

    /// The entries of chunk `c`, copied first if a frozen copy shares them.
    fn entries_mut(&mut self, c: usize) -> Option<&mut Vec<(u64, Option<T>)>> {
        let chunk = self.chunks.get_mut(c)?;
        Some(Arc::make_mut(&mut chunk.entries))
    }

    /// The slot of the live record `id`, its chunk copied first if shared (a miss or
    /// a tombstone is not worth a copy).
    fn live_slot_mut(&mut self, id: u64) -> Option<&mut Option<T>> {
        self.slot(id)?.as_ref()?;
        let (c, e) = self.position(id)?;
        self.entries_mut(c)?.get_mut(e).map(|(_, v)| v)
    }

    pub(super) fn get_mut(&mut self, id: &u64) -> Option<&mut T> {
        self.live_slot_mut(*id)?.as_mut()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut T)> {
        self.chunks
            .iter_mut()
            .flat_map(|c| Arc::make_mut(&mut c.entries).iter_mut())
            .filter_map(|(id, v)| v.as_mut().map(|v| (&*id, v)))
    }

    /// Inserts or replaces; returns the record it replaced.
    pub(super) fn insert(&mut self, id: u64, value: T) -> Option<T> {
        let last = self.chunks.last().and_then(|c| c.entries.last());
        if last.is_none_or(|&(last, _)| last < id) {
            self.push((id, Some(value)));
            self.live += 1;
            return None;
        }
        // Below the largest id: into the chunk that covers it, or the first chunk
        // (there is one, since the map has a largest id).
        let c = self.chunk_of(id).unwrap_or(0);
        let Some(entries) = self.entries_mut(c) else {
            self.push((id, Some(value)));
            self.live += 1;
            return None;
        };
        let previous = match entries.binary_search_by_key(&id, |&(id, _)| id) {
            Ok(e) => entries.get_mut(e).and_then(|(_, v)| v.replace(value)),
            Err(e) => {
                reserve_one(entries);
                entries.insert(e, (id, Some(value)));
                self.slots += 1;
                self.split_if_full(c);
                None
            }
        };
        if previous.is_none() {
            self.live += 1;
        }
        previous
    }

    /// Halves chunk `c` once it outgrows `CHUNK_LEN`, into two buffers of one chunk's
    /// worth, and keeps its `first` current.
    fn split_if_full(&mut self, c: usize) {
        let Some(entries) = self.entries_mut(c) else {
            return;
        };
        let Some(&(first, _)) = entries.first() else {
            return;
        };
        let tail = (entries.len() > CHUNK_LEN).then(|| {
            let mut tail = Vec::with_capacity(CHUNK_LEN);
            tail.extend(entries.drain(entries.len() / 2..));
            entries.shrink_to(CHUNK_LEN);
            tail
        });
        if let Some(chunk) = self.chunks.get_mut(c) {
            chunk.first = first;
        }
        if let Some((first, tail)) = tail.and_then(|t| Some((t.first()?.0, t))) {
            let chunk = Chunk {
                first,
                entries: Arc::new(tail),
            };
            self.chunks.insert(c + 1, chunk);
        }
    }

    pub(super) fn remove(&mut self, id: &u64) -> Option<T> {
        let removed = self.live_slot_mut(*id)?.take();
        // `live` counts the live slots, and this one was (see `check_shape`).
        self.live = self.live.saturating_sub(1);
        self.drop_trailing_tombstones();
        if self.slots.saturating_sub(self.live) > MIN_TOMBSTONES.max(self.live) {
            self.compact();
        }
        removed
    }

    fn drop_trailing_tombstones(&mut self) {
        while let Some(last) = self.chunks.last_mut() {
            if last.entries.last().is_some_and(|(_, v)| v.is_some()) {
                return;
            }
            let entries = Arc::make_mut(&mut last.entries);
            while entries.last().is_some_and(|(_, v)| v.is_none()) {
                entries.pop();
                self.slots = self.slots.saturating_sub(1);
            }
            if entries.is_empty() {
                self.chunks.pop();
            }
        }
    }

    /// Rebuilds the map densely, in new chunks (a frozen copy keeps the old ones); a
    /// map that emptied (a mass logout) frees its chunks (the driver's heap trim,
    /// `raft_node::trim`, then returns them to the system).
    fn compact(&mut self) {
        let old = std::mem::take(&mut self.chunks);
        self.slots = 0;
        for chunk in old {
            match Arc::try_unwrap(chunk.entries) {
                Ok(entries) => {
                    for (id, value) in entries {
                        if value.is_some() {
                            self.push((id, value));
                        }
                    }
                }
                Err(shared) => {
                    for (id, value) in shared.iter() {
                        if let Some(value) = value {
                            self.push((*id, Some(value.clone())));
                        }
                    }
                }
            }
        }
        self.chunks.shrink_to_fit();
    }
}

/// As a map in id order: the bytes a BTreeMap of the same records would give.
impl<T: Serialize> Serialize for IdMap<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.live))?;
        for (id, value) in self.iter() {
            map.serialize_entry(id, value)?;
        }
        map.end()
    }
}

/// Refuses ids that are not strictly increasing (a BTreeMap would have sorted or
/// merged them; a snapshot this table wrote never has them).
impl<'de, T: Deserialize<'de> + Clone> Deserialize<'de> for IdMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdMapVisitor<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de> + Clone> Visitor<'de> for IdMapVisitor<T> {
            type Value = IdMap<T>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("records by strictly increasing id")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IdMap<T>, A::Error> {
                let mut out = IdMap::default();
                let mut last = None;
                while let Some((id, value)) = map.next_entry::<u64, T>()? {
                    if last.is_some_and(|last| last >= id) {
                        return Err(serde::de::Error::custom(format!(
                            "record id {id} is not above the one before it"
                        )));
                    }
                    last = Some(id);
                    out.push((id, Some(value)));
                    out.live += 1;
                }
                Ok(out)
            }
        }

        d.deserialize_map(IdMapVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn ids(map: &IdMap<u32>) -> Vec<u64> {
        map.iter().map(|(&id, _)| id).collect()
    }

    /// The structure's own rules: chunks non-empty, sorted, disjoint, no larger than
    /// `CHUNK_LEN`, `first` current, counts right, no trailing tombstone.
    fn check_shape(map: &IdMap<u32>) {
        let mut previous = None;
        let (mut live, mut slots) = (0, 0);
        for chunk in &map.chunks {
            assert!(!chunk.entries.is_empty() && chunk.entries.capacity() <= CHUNK_LEN);
            assert_eq!(chunk.first, chunk.entries[0].0);
            for (id, v) in chunk.entries.iter() {
                assert!(previous.is_none_or(|p| p < *id), "ids out of order");
                previous = Some(*id);
                live += usize::from(v.is_some());
                slots += 1;
            }
        }
        assert_eq!((map.live, map.slots), (live, slots));
        let last = map.chunks.last().and_then(|c| c.entries.last());
        assert!(
            last.is_none_or(|(_, v)| v.is_some()),
            "a trailing tombstone"
        );
    }

    #[test]
    fn finds_replaces_and_removes_by_id_in_id_order() {
        let mut map = IdMap::default();
        for id in [3, 5, 9] {
            assert_eq!(map.insert(id, id as u32), None);
        }
        assert_eq!(
            map.insert(4, 40),
            None,
            "an id below the largest still goes in"
        );
        assert_eq!(map.insert(5, 50), Some(5));
        assert_eq!(ids(&map), [3, 4, 5, 9]);
        assert_eq!(map.get(&5), Some(&50));
        assert_eq!(map.remove(&4), Some(40));
        assert_eq!(map.remove(&4), None);
        assert_eq!(map.get(&4), None);
        assert!(!map.contains_key(&4));
        assert_eq!(map.insert(4, 41), None, "a tombstone comes back to life");
        assert_eq!((map.len(), ids(&map)), (4, vec![3, 4, 5, 9]));
        assert_eq!(map.insert(1, 10), None, "below the first id");
        assert_eq!(ids(&map), [1, 3, 4, 5, 9]);
        check_shape(&map);
    }

    #[test]
    fn tombstones_are_compacted_and_trailing_ones_dropped() {
        let mut map = IdMap::default();
        for id in 1..=1_000 {
            map.insert(id, 0);
        }
        for id in 1..=900 {
            map.remove(&id);
        }
        assert_eq!(map.len(), 100);
        assert!(map.slots < 2 * 100 + MIN_TOMBSTONES);
        check_shape(&map);
        for id in (901..=1_000).rev() {
            map.remove(&id);
        }
        assert_eq!((map.len(), map.slots, map.chunks.len()), (0, 0, 0));
        assert!(map.chunks.capacity() <= 4);
        map.insert(7, 1);
        assert_eq!(ids(&map), [7]);
    }

    /// The rule a snapshot off the Raft thread relies on: a copy does not change,
    /// whatever the original goes through afterwards, and shares its chunks until then.
    #[test]
    fn a_copy_is_frozen_while_the_original_changes() {
        let mut map = IdMap::default();
        for id in 1..=3 * CHUNK_LEN as u64 {
            map.insert(id, id as u32);
        }
        let frozen = map.clone();
        let before: Vec<(u64, u32)> = frozen.iter().map(|(&k, &v)| (k, v)).collect();
        assert!(Arc::ptr_eq(
            &map.chunks[1].entries,
            &frozen.chunks[1].entries
        ));
        *map.get_mut(&5).unwrap() = 500;
        map.remove(&(CHUNK_LEN as u64 + 1));
        map.insert(10_000, 1);
        map.insert(CHUNK_LEN as u64 / 2, 7);
        for id in 1..=100 {
            map.remove(&id);
        }
        assert!(
            Arc::ptr_eq(&map.chunks[2].entries, &frozen.chunks[2].entries),
            "an untouched chunk is still shared"
        );
        assert!(!Arc::ptr_eq(
            &map.chunks[0].entries,
            &frozen.chunks[0].entries
        ));
        // Enough removals for a compaction, which rebuilds every chunk.
        for id in 1..=2 * CHUNK_LEN as u64 {
            map.remove(&id);
        }
        let after: Vec<(u64, u32)> = frozen.iter().map(|(&k, &v)| (k, v)).collect();
        assert_eq!(before, after);
        check_shape(&map);
        check_shape(&frozen);
    }

    #[test]
    fn round_trips_as_a_map_and_refuses_unordered_ids() {
        let mut map = IdMap::default();
        map.insert(2, 20u32);
        map.insert(8, 80);
        map.insert(9, 90);
        map.remove(&8);
        let bytes = postcard::to_allocvec(&map).unwrap();
        let same: BTreeMap<u64, u32> = [(2, 20), (9, 90)].into();
        assert_eq!(bytes, postcard::to_allocvec(&same).unwrap());
        let back: IdMap<u32> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(ids(&back), [2, 9]);

        for unordered in [vec![(9u64, 1u32), (2, 1)], vec![(2, 1), (2, 1)]] {
            let mut bytes = vec![unordered.len() as u8];
            for (id, v) in unordered {
                bytes.extend(postcard::to_allocvec(&(id, v)).unwrap());
            }
            assert!(postcard::from_bytes::<IdMap<u32>>(&bytes).is_err());
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32),
        Remove(u64),
        Set(u64, u32),
        Freeze,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Mostly ids near the top, as the table makes them; some anywhere.
        let id = prop_oneof![3 => 0..2_000u64, 1 => 0..u64::MAX];
        prop_oneof![
            4 => (id.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            3 => id.clone().prop_map(Op::Remove),
            1 => (id, any::<u32>()).prop_map(|(k, v)| Op::Set(k, v)),
            1 => Just(Op::Freeze),
        ]
    }

    proptest! {
        /// Against a BTreeMap: the same answers to every operation, the structure's
        /// rules after each, and every frozen copy equal to the map when it was taken.
        #[test]
        fn behaves_as_a_btreemap(ops in proptest::collection::vec(op(), 1..3_000)) {
            let mut map = IdMap::default();
            let mut model = BTreeMap::new();
            let mut frozen = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(map.insert(k, v), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(map.remove(&k), model.remove(&k)),
                    Op::Set(k, v) => {
                        let ours = map.get_mut(&k).map(|x| std::mem::replace(x, v));
                        let theirs = model.get_mut(&k).map(|x| std::mem::replace(x, v));
                        prop_assert_eq!(ours, theirs);
                    }
                    Op::Freeze => frozen.push((map.clone(), model.clone())),
                }
                prop_assert_eq!(map.len(), model.len());
                check_shape(&map);
            }
            let all: Vec<_> = map.iter().map(|(&k, &v)| (k, v)).collect();
            prop_assert_eq!(all, model.into_iter().collect::<Vec<_>>());
            for (copy, then) in frozen {
                let all: Vec<_> = copy.iter().map(|(&k, &v)| (k, v)).collect();
                prop_assert_eq!(all, then.into_iter().collect::<Vec<_>>());
            }
        }
    }
}
