//! The server's tracing setup, with a filter that can be changed while it runs
//! (`lockctl log-level`, gulm_tool's setverb). Owns nothing else.

use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Logs to stderr (colours only on a terminal), filtered by RUST_LOG (default `info`).
pub fn init() {
    let filter = EnvFilter::try_new(start_filter()).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// Replaces the log filter; a malformed filter is refused and changes nothing.
pub fn set_filter(directives: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(directives)
        .map_err(|e| format!("invalid log filter `{directives}`: {e}"))?;
    let handle = FILTER
        .get()
        .ok_or_else(|| "logging is not initialised in this process".to_string())?;
    handle
        .reload(filter)
        .map_err(|e| format!("cannot change the log filter: {e}"))?;
    tracing::warn!(filter = directives, "log filter changed");
    Ok(())
}

/// The filter a process starts with: RUST_LOG if set (and valid), else `info`.
fn start_filter() -> String {
    match std::env::var("RUST_LOG") {
        Ok(f) if EnvFilter::try_new(&f).is_ok() => f,
        _ => "info".to_string(),
    }
}

/// The filter a server should use with `config`'s `[log] filter`: RUST_LOG wins at
/// start-up (so a unit's Environment= can override the file for one run); on SIGHUP
/// the file's filter is applied, and without one the start-up filter comes back
/// (undoing `lockctl log-level`).
pub fn configured_filter(config_filter: Option<&str>, at_start: bool) -> String {
    match (
        config_filter,
        at_start && std::env::var_os("RUST_LOG").is_some(),
    ) {
        (Some(f), false) => f.to_string(),
        _ => start_filter(),
    }
}
