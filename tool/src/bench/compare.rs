//! The side-by-side comparison of issue #17: the disk's floor (an fdatasync probe) and
//! the etcd and ZooKeeper reference lines that `shared/bench/etcd-workloads.sh` and
//! `zk-workloads.sh` print, with lockd's ratio to the better reference.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use super::load::new_histogram;
use super::report::Row;

/// One reference line, e.g. `W1 system=etcd workers=64 resources=64 pairs_per_s=1301
/// acquire_p50_us=1804 acquire_p99_us=9000 acquire_p999_us=20000`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// `w1`, `w2` or `w3` (lower case, as lockd-bench names its rows).
    pub workload: String,
    pub system: String,
    pub pairs_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl Reference {
    /// Parses one line; `None` for anything else the scripts print (build output, …).
    pub fn parse(line: &str) -> Option<Reference> {
        let mut words = line.split_whitespace();
        let workload = words.next()?.to_ascii_lowercase();
        if !matches!(workload.as_str(), "w1" | "w2" | "w3") {
            return None;
        }
        let (mut system, mut rate, mut p50, mut p99) = (None, None, None, None);
        for w in words {
            match w.split_once('=')? {
                ("system", v) => system = Some(v.to_string()),
                ("pairs_per_s", v) => rate = v.parse().ok(),
                ("acquire_p50_us", v) => p50 = v.parse().ok(),
                ("acquire_p99_us", v) => p99 = v.parse().ok(),
                _ => {}
            }
        }
        Some(Reference {
            workload,
            system: system?,
            pairs_per_s: rate?,
            p50_us: p50?,
            p99_us: p99?,
        })
    }

    /// Every reference line of a file. A file without one is an error: the script
    /// that should have written it failed.
    pub fn read_file(path: &Path) -> anyhow::Result<Vec<Reference>> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the reference file {}", path.display()))?;
        let refs: Vec<Reference> = text.lines().filter_map(Reference::parse).collect();
        anyhow::ensure!(
            !refs.is_empty(),
            "{} holds no reference line (expected `W1 system=etcd … pairs_per_s=… \
             acquire_p50_us=… acquire_p99_us=…` as shared/bench/*-workloads.sh print)",
            path.display()
        );
        Ok(refs)
    }
}

/// The disk's floor: fdatasync latency of appends the size of a batch of lock entries.
#[derive(Debug, Clone, Copy)]
pub struct FsyncProbe {
    pub p50_us: u64,
    pub p99_us: u64,
}

/// Appends `count` blocks of `bytes` to a new file in `dir`, fdatasync after each
/// (`File::sync_data`), and removes the file. Run before the workloads, on the disk
/// the servers write to.
pub fn probe_fdatasync(dir: &Path, count: usize, bytes: usize) -> anyhow::Result<FsyncProbe> {
    let path = dir.join(format!(".lockd-bench-fsync-probe.{}", std::process::id()));
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let block = vec![0x5a_u8; bytes];
    let mut hist = new_histogram();
    let result = (0..count).try_for_each(|_| {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        hist.saturating_record(t.elapsed().as_micros() as u64);
        Ok::<_, std::io::Error>(())
    });
    drop(file);
    let _ = std::fs::remove_file(&path);
    result.with_context(|| format!("fdatasync probe in {} failed", dir.display()))?;
    Ok(FsyncProbe {
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
    })
}

/// What issue #17 asks of one workload, given the references and the disk's floor.
fn goal(workload: &str, best_rate: Option<f64>, fsync: Option<FsyncProbe>) -> String {
    match workload {
        "w1" | "w2" => best_rate.map_or_else(String::new, |b| {
            format!("goal ≥ {:.0} pairs/s (10× the better reference)", b * 10.0)
        }),
        "w3" => fsync.map_or_else(
            || "goal p99 < 2000 µs".to_string(),
            |f| {
                format!(
                    "goal p50 ≤ {} µs (2 × fdatasync p50 + 100), p99 < 2000 µs",
                    2 * f.p50_us + 100
                )
            },
        ),
        _ => String::new(),
    }
}

/// Prints the comparison: per workload each reference, then lockd with its ratio to the
/// better reference (throughput: lockd ÷ best; latency: best ÷ lockd, so > 1 is better).
pub fn table(rows: &[Row], refs: &[Reference], fsync: Option<FsyncProbe>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out);
    match fsync {
        Some(f) => {
            let _ = writeln!(
                out,
                "comparison; fdatasync of a 2.3 KB append on the data disk: p50 {} µs, p99 {} µs",
                f.p50_us, f.p99_us
            );
        }
        None => {
            let _ = writeln!(out, "comparison");
        }
    }
    if refs.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "{:<4} {:<6} {:>10} {:>9} {:>9} {:>10} {:>10}  goal",
        "", "system", "pairs/s", "p50 µs", "p99 µs", "×pairs/s", "×p50"
    );
    for row in rows {
        let mine: Vec<&Reference> = refs.iter().filter(|r| r.workload == row.workload).collect();
        if mine.is_empty() {
            continue;
        }
        for r in &mine {
            let _ = writeln!(
                out,
                "{:<4} {:<6} {:>10.0} {:>9} {:>9}",
                row.workload, r.system, r.pairs_per_s, r.p50_us, r.p99_us
            );
        }
        let best_rate = mine.iter().map(|r| r.pairs_per_s).reduce(f64::max);
        let best_p50 = mine.iter().map(|r| r.p50_us).min();
        let ratio = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.1}×"));
        let rate_ratio = row
            .pairs_per_s
            .zip(best_rate)
            .map(|(l, b)| l / b.max(f64::MIN_POSITIVE));
        let p50_ratio = row
            .p50_us
            .zip(best_p50)
            .map(|(l, b)| b as f64 / l.max(1) as f64);
        let fmt_u = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        let _ = writeln!(
            out,
            "{:<4} {:<6} {:>10} {:>9} {:>9} {:>10} {:>10}  {}",
            row.workload,
            "lockd",
            row.pairs_per_s
                .map_or_else(|| "-".to_string(), |v| format!("{v:.0}")),
            fmt_u(row.p50_us),
            fmt_u(row.p99_us),
            ratio(rate_ratio),
            ratio(p50_ratio),
            goal(&row.workload, best_rate, fsync)
        );
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_lines_parse_and_other_lines_are_skipped() {
        let r = Reference::parse(
            "W2 system=zk workers=64 resources=8 pairs_per_s=393 acquire_p50_us=120000 \
             acquire_p99_us=400000 acquire_p999_us=900000",
        )
        .unwrap();
        assert_eq!(r.workload, "w2");
        assert_eq!(r.system, "zk");
        assert_eq!(r.pairs_per_s, 393.0);
        assert_eq!((r.p50_us, r.p99_us), (120000, 400000));
        assert_eq!(Reference::parse("   Compiling etcd-lockbench v0.1.0"), None);
        assert_eq!(Reference::parse("W1 system=etcd pairs_per_s=12"), None);
        assert_eq!(
            Reference::parse("W4 system=etcd pairs_per_s=1 acquire_p50_us=1 acquire_p99_us=1"),
            None
        );
    }

    #[test]
    fn a_reference_file_without_lines_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd.txt");
        std::fs::write(&path, "etcd-cluster.sh: cannot start\n").unwrap();
        let e = Reference::read_file(&path).unwrap_err().to_string();
        assert!(e.contains("holds no reference line"), "{e}");
    }

    #[test]
    fn the_fdatasync_probe_measures_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = probe_fdatasync(dir.path(), 20, 2300).unwrap();
        assert!(p.p50_us > 0 && p.p50_us <= p.p99_us, "{p:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
