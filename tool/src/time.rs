//! Times as operators read them: RFC 3339 (UTC) with an age, e.g.
//! `2026-11-30T16:02:26Z (3m 2s ago)`. `--json` keeps the raw milliseconds instead.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `at_ms` (ms since the epoch) as RFC 3339 with its age relative to `now_ms`; `-` for 0.
pub fn when(at_ms: u64, now_ms: u64) -> String {
    if at_ms == 0 {
        return "-".to_string();
    }
    let at = UNIX_EPOCH + Duration::from_millis(at_ms);
    let stamp = humantime::format_rfc3339_seconds(at);
    if at_ms > now_ms {
        // The server's clock is ahead of ours.
        format!("{stamp} (in {})", age(at_ms - now_ms))
    } else {
        format!("{stamp} ({} ago)", age(now_ms - at_ms))
    }
}

/// A duration in ms as `2h 5m`, `3m 2s`, `1.5s` or `420ms`: two units at most.
pub fn age(ms: u64) -> String {
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    if ms < 10_000 {
        return format!("{}.{}s", ms / 1_000, (ms % 1_000) / 100);
    }
    // humantime gives every unit ("1h 2m 3s 4ms"); keep the two largest.
    let secs = Duration::from_secs(ms / 1_000);
    let full = humantime::format_duration(secs).to_string();
    full.split(' ').take(2).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_rfc3339_with_an_age() {
        let at = 1_764_518_546_000; // 2025-11-30T16:02:26Z
        assert_eq!(when(at, at + 182_000), "2025-11-30T16:02:26Z (3m 2s ago)");
        assert_eq!(when(at, at - 1_500), "2025-11-30T16:02:26Z (in 1.5s)");
        assert_eq!(when(0, at), "-");
    }

    #[test]
    fn ages_keep_two_units() {
        assert_eq!(age(420), "420ms");
        assert_eq!(age(1_549), "1.5s");
        assert_eq!(age(57_382), "57s");
        assert_eq!(age(7_503_000), "2h 5m");
        assert_eq!(age(90_061_000), "1day 1h");
    }
}
