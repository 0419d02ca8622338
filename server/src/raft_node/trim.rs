//! Giving the heap back after the lock table shrank: the table's large maps live in
//! 12–18 KB chunks (`IdMap`), which glibc's allocator keeps for reuse when they are
//! freed instead of returning them to the system (only the top of its heap shrinks
//! by itself), so after a mass logout of a million locks the server's RSS would stay
//! at its peak. `malloc_trim(0)` returns every whole free page, wherever it is.
//!
//! It runs on a short-lived thread of its own, once the locks held and waiting
//! fall below half their high-water mark (from at least `MIN_HIGH_WATER`), and once
//! more after a snapshot written meanwhile drops its frozen copy of the old table.

use tracing::debug;

/// Tables smaller than this are not worth a trim: a few MB at most.
const MIN_HIGH_WATER: usize = 65_536;

#[derive(Default)]
pub(super) struct HeapTrim {
    /// Largest table size (locks held and waiting) since the last trim.
    high_water: usize,
    /// A trim ran while a snapshot held a frozen copy: run again when it is written.
    after_snapshot: bool,
}

impl HeapTrim {
    /// Called with the table's size after each Ready; `snapshot_in_flight` tells
    /// whether a frozen copy may be holding the memory just freed. True if it trimmed.
    pub(super) fn table_size(&mut self, locks: usize, snapshot_in_flight: bool) -> bool {
        self.high_water = self.high_water.max(locks);
        let shrank = self.high_water >= MIN_HIGH_WATER && locks < self.high_water / 2;
        if shrank {
            debug!(
                from = self.high_water,
                to = locks,
                "lock table shrank: trimming the heap"
            );
            self.high_water = locks;
            self.after_snapshot = snapshot_in_flight;
            trim();
        }
        shrank
    }

    /// A snapshot's frozen copy has been dropped. True if it trimmed.
    pub(super) fn snapshot_written(&mut self) -> bool {
        let again = std::mem::take(&mut self.after_snapshot);
        if again {
            trim();
        }
        again
    }
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // A trim walks the heap holding the allocator's lock; off the Raft thread it
        // delays only allocations that race with it. If the thread cannot start, the
        // memory merely stays with the process.
        let _ = std::thread::Builder::new()
            .name("heap-trim".into())
            .spawn(|| {
                // SAFETY: malloc_trim takes no pointers and only returns free pages.
                unsafe { libc::malloc_trim(0) };
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_a_large_table_halves_and_again_after_a_snapshot_then() {
        let mut heap = HeapTrim::default();
        assert!(!heap.table_size(MIN_HIGH_WATER - 1, false));
        assert!(!heap.table_size(0, false), "too small to be worth it");
        assert!(!heap.table_size(100_000, false));
        assert!(!heap.table_size(50_000, false), "not below half");
        assert!(heap.table_size(49_999, true));
        assert!(
            !heap.table_size(30_000, false),
            "from the new high-water mark"
        );
        assert!(
            heap.snapshot_written(),
            "the frozen copy held the old table"
        );
        assert!(!heap.snapshot_written());
        assert!(!heap.table_size(1_000_000, false));
        assert!(heap.table_size(0, false), "a mass logout");
        assert!(!heap.snapshot_written(), "no snapshot was in flight");
    }
}
