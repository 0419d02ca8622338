//! SIGHUP: reread the config file and apply what a running server can change — the
//! log filter (`[log] filter`). Everything else (servers, nodes, fence devices,
//! timings, TLS files) is read only at start-up; SIGHUP says so in its log line rather
//! than half-applying it. A config that no longer parses is reported and changes
//! nothing. Never stops the server.

use crate::config::Config;
use std::path::PathBuf;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, warn};

/// Installs the SIGHUP handler now (replacing the default action, which kills) and
/// serves it until the returned task is aborted.
pub fn on_sighup(config_path: PathBuf) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut hangups =
        signal(SignalKind::hangup()).map_err(|e| anyhow::anyhow!("cannot handle SIGHUP: {e}"))?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            reload(&config_path);
        }
    }))
}

/// One SIGHUP's work; logs what it did.
pub fn reload(config_path: &std::path::Path) {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            error!("SIGHUP: not reloaded, the config file is invalid (nothing changed): {e}");
            return;
        }
    };
    let filter = crate::logging::configured_filter(config.log.filter.as_deref(), false);
    match crate::logging::set_filter(&filter) {
        Ok(()) => warn!(
            config = %config_path.display(),
            filter = %filter,
            "SIGHUP: reloaded the log filter; servers, nodes, fencing, timings and TLS certificates are read only at start (restart the server to change them)"
        ),
        Err(e) => error!("SIGHUP: log filter not changed: {e}"),
    }
}
