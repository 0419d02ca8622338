//! BRIEF §4.2: lock safety under faults, proved from a history. Real servers and
//! client processes under a seeded fault schedule (see `lockd_tests::nemesis::run`);
//! the checker (`lockd_tests::nemesis::checker`, unit-tested on hand-made histories)
//! must find no violation — and must find one when the servers run with the
//! deliberately broken `LOCKD_UNSAFE_RELEASE_ON_EXPIRE` switch.
//!
//! Server-from-server partitions are NOT injected by these tests (they would need
//! network namespaces, i.e. root); see the README's "Safety testing" section.

use lockd_tests::nemesis::history::now_us;
use lockd_tests::nemesis::run::{run, Options};
use std::time::Duration;

/// The CI schedule: a fixed seed and one random seed, each printed so a failure can
/// be replayed (the schedule's choices follow the seed; process timing does not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_schedule_keeps_every_safety_rule() {
    let random_seed = now_us() ^ u64::from(std::process::id());
    for seed in [42, random_seed] {
        let opts = Options::new(seed, Duration::from_secs(25));
        println!("== nemesis (kill -9, SIGSTOP servers and clients, client partitions, client kills, full restarts; NO server partitions): seed {seed}, {:?} of faults", opts.duration);
        let outcome = run(opts).await.expect("the nemesis run itself failed");
        println!("{}", outcome.report);
        let r = &outcome.report;
        assert!(
            r.violations.is_empty(),
            "seed {seed}: safety violated; history kept in {}",
            outcome.history_dir.display()
        );
        // A run that checked nothing proves nothing.
        assert!(r.final_table_read, "the final lock table was not read");
        assert!(r.ok > 50, "too few grants to mean anything: {}", r.ok);
        assert!(r.checks[0] > 0 && r.checks[1] > 0, "no pairs checked");
        assert!(r.faults.values().sum::<u64>() >= 5, "too few faults");
    }
}

/// The checker must catch a lock manager that releases an expired node's locks at
/// expiry instead of after fencing. Client pauses dominate the schedule, since a
/// paused holder whose locks go to someone else is what the broken switch produces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_release_at_expiry() {
    let seed = 7;
    let mut opts = Options::new(seed, Duration::from_secs(20));
    opts.unsafe_release_on_expire = true;
    opts.client_stop_weight = 20;
    println!("== nemesis with LOCKD_UNSAFE_RELEASE_ON_EXPIRE=1 (broken on purpose): seed {seed}");
    let outcome = run(opts).await.expect("the nemesis run itself failed");
    println!("{}", outcome.report);
    assert!(
        !outcome.report.violations.is_empty(),
        "the checker found no violation although the servers released locks at expiry"
    );
    assert!(
        outcome
            .report
            .violations
            .iter()
            .any(|v| v.rule.starts_with('1') || v.rule.starts_with('4')),
        "expected an exclusion or fence-first violation"
    );
}
