//! The server's tracing setup, with a filter that can be changed while it runs
//! (`lockctl log-level`, gulm_tool's setverb). Owns nothing else.

use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Logs to stderr (colours only on a terminal), filtered by RUST_LOG (default `info`).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
