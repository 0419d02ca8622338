//! Output: one JSON line per workload on stdout as it finishes, and a closing table.

use std::io::Write;

use serde_json::Value;

/// One workload's outcome: its JSON line and its row in the table.
pub struct Outcome {
    pub json: Value,
    pub row: Row,
}

/// A row of the closing table.
pub struct Row {
    pub workload: String,
    pub pairs_per_s: Option<f64>,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub p999_us: Option<u64>,
    /// Server CPU per pair, all servers summed, microseconds.
    pub server_cpu_us_per_pair: Option<f64>,
    pub note: String,
}

impl Outcome {
    /// Prints the JSON line at once (so a long run keeps what it finished).
    pub fn emit(&self) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", self.json);
        let _ = out.flush();
    }
}

/// Prints the closing table.
pub fn table(rows: &[Row]) {
    let fmt_opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<4} {:>10} {:>9} {:>9} {:>9} {:>12}  notes",
        "", "pairs/s", "p50 µs", "p99 µs", "p999 µs", "cpu µs/pair"
    );
    let fmt_f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
    for r in rows {
        let _ = writeln!(
            out,
            "{:<4} {:>10} {:>9} {:>9} {:>9} {:>12}  {}",
            r.workload,
            fmt_f(r.pairs_per_s),
            fmt_opt(r.p50_us),
            fmt_opt(r.p99_us),
            fmt_opt(r.p999_us),
            fmt_f(r.server_cpu_us_per_pair),
            r.note
        );
    }
    let _ = out.flush();
}

/// Rounds to one decimal for JSON.
pub fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// A per-server list of optional numbers as JSON (null where unknown).
pub fn opt_list<T: Into<Value> + Copy>(v: &[Option<T>]) -> Value {
    Value::Array(
        v.iter()
            .map(|x| x.map_or(Value::Null, Into::into))
            .collect(),
    )
}

/// CPU percentages as a short text: `cpu servers 85%/40%/38% bench 30% others 3% host
/// 97% of 2 cores` (servers, bench and others in % of one core, host in % of all cores).
pub fn cpu_note(cpu: &super::load::CpuUse) -> String {
    if cpu.servers.iter().all(Option::is_none) && cpu.bench.is_none() {
        return String::new();
    }
    let servers: Vec<String> = cpu
        .servers
        .iter()
        .map(|c| c.map_or_else(|| "?".to_string(), |c| format!("{c:.0}%")))
        .collect();
    let pct = |c: Option<f64>| c.map_or_else(|| "?".to_string(), |c| format!("{c:.0}%"));
    format!(
        "cpu servers {} bench {} others {} host {} of {} cores",
        servers.join("/"),
        pct(cpu.bench),
        pct(cpu.others),
        pct(cpu.host),
        super::cluster::cores()
    )
}
