//! Measures the lock table's memory per held lock (BRIEF §4.1 W4) with a counting
//! global allocator: builds a table of N EX locks, one per resource, through
//! `State::apply` of real commands, then takes it apart one component at a time and
//! reports what each freed. Ignored by default (it applies a million commands):
//!
//! ```sh
//! cargo test --release -p lockd-server memory_per_held_lock -- --ignored --nocapture --test-threads=1
//! ```
//! `LOCKD_MEMORY_LOCKS` sets N (default 1,000,000).

use super::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts live heap bytes of the whole test binary; a wrapper around `System`.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is `System.dealloc`'s.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is `System.realloc`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// Live bytes gained since `before`, signed: the counter is process-wide, so another
/// test running at the same time can free more than this one allocated. Run the
/// measurement alone (`--test-threads=1`) for exact figures.
fn grown_since(before: usize) -> isize {
    live().wrapping_sub(before) as isize
}

/// This process's resident set (0 where /proc is missing).
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// W4's table: 16 sessions, one lockspace, `n` EX locks each on its own resource
/// with a 20-byte name.
fn w4_table(n: u64) -> State {
    let mut state = State::new();
    let mut index = 0;
    let mut apply = |state: &mut State, cmd| {
        index += 1;
        let (reply, _) = state.apply(index, 1_000, cmd);
        assert!(!matches!(reply, Reply::Failed(_)), "{reply:?}");
        reply
    };
    let sessions: Vec<SessionId> = (1..=16)
        .map(|k| {
            match apply(
                &mut state,
                Command::Login {
                    node: format!("node{k}"),
                    nonce: 1,
                },
            ) {
                Reply::LoggedIn { session } => session,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    for &session in &sessions {
        apply(
            &mut state,
            Command::OpenLockspace {
                session,
                request_id: 1,
                name: "fs1".into(),
                lvb_len_bytes: 0,
                recovery: RecoveryMode::Auto,
            },
        );
    }
    for i in 0..n {
        let session = sessions[(i % 16) as usize];
        let request_id = 2 + i / 16;
        apply(
            &mut state,
            Command::Lock {
                session,
                request_id,
                ack_below: request_id,
                lockspace: "fs1".into(),
                resource: format!("inode-{i:014}").into_bytes(),
                mode: Mode::Ex,
                flags: Flags::default(),
                timeout_ms: 0,
            },
        );
    }
    state
}

#[test]
#[ignore = "applies a million commands; run with --ignored --nocapture"]
fn memory_per_held_lock() {
    let n: u64 = std::env::var("LOCKD_MEMORY_LOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let (before, rss_before) = (live(), rss_bytes());
    let state = w4_table(n);
    let total = grown_since(before);
    let rss = rss_bytes().saturating_sub(rss_before);
    assert_eq!(state.held_lock_count() as u64, n);
    let per_lock = |bytes: isize| bytes as f64 / n as f64;
    println!("{n} held EX locks, one per resource, 20-byte names, 16 sessions");
    println!("  table total     {:7.1} B/lock", per_lock(total));
    println!(
        "  process RSS     {:7.1} B/lock (growth while building)",
        per_lock(rss as isize)
    );

    let snapshot = state.encode();
    println!(
        "  snapshot        {:7.1} B/lock (transient)",
        per_lock(snapshot.len() as isize)
    );
    drop(snapshot);
    for (component, bytes) in state.memory_breakdown() {
        println!("  {component:<15} {:7.1} B/lock", per_lock(bytes));
    }
}

impl State {
    /// Takes the table apart, one component at a time, returning what each freed.
    fn memory_breakdown(mut self) -> Vec<(&'static str, isize)> {
        let mut parts = Vec::new();
        let mut freed = |name, drop_it: &mut dyn FnMut()| {
            let before = live();
            drop_it();
            parts.push((name, -grown_since(before)));
        };
        freed("name index", &mut || {
            drop(std::mem::take(&mut self.idx.resource_ids))
        });
        freed("lock records", &mut || {
            drop(std::mem::take(&mut self.core.locks))
        });
        freed("res. heap names", &mut || {
            for r in self.core.resources.iter_mut().map(|(_, r)| r) {
                drop(std::mem::replace(
                    &mut r.name,
                    super::model::Name::from(&b"r"[..]),
                ));
            }
        });
        freed("res. >1 holders", &mut || {
            for r in self.core.resources.iter_mut().map(|(_, r)| r) {
                drop(std::mem::take(&mut r.holders));
            }
        });
        freed("res. records", &mut || {
            drop(std::mem::take(&mut self.core.resources))
        });
        freed("the rest", &mut || drop(std::mem::take(&mut self)));
        parts
    }
}
