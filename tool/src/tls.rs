//! `lockctl`'s TLS settings (`--ca`, `--cert`, `--key`), read once at start-up, and the
//! one function every command uses to reach a server, so no command can forget them.

use std::sync::OnceLock;

use lockd_client::TlsOptions;
use tonic::transport::Endpoint;

use crate::cli::Cli;

static TLS: OnceLock<Option<TlsOptions>> = OnceLock::new();

/// Reads the PEM files named on the command line (or in LOCKD_CA / LOCKD_CERT /
/// LOCKD_KEY). Without `--ca`, lockctl talks plaintext.
pub fn init(cli: &Cli) -> anyhow::Result<()> {
    let tls = match (&cli.ca, &cli.cert, &cli.key) {
        (None, None, None) => None,
        (None, _, _) => anyhow::bail!(
            "--cert/--key need --ca (LOCKD_CA): the CA that issued the servers' certificates"
        ),
        (Some(ca), Some(cert), Some(key)) => Some(TlsOptions::from_files(
            ca,
            Some((cert.as_path(), key.as_path())),
        )?),
        (Some(ca), None, None) => Some(TlsOptions::from_files(ca, None)?),
        (Some(_), _, _) => anyhow::bail!("--cert and --key (LOCKD_CERT, LOCKD_KEY) go together"),
    };
    // init runs once, before any command; a second call would keep the first setting.
    let _ = TLS.set(tls);
    Ok(())
}

/// The TLS settings in force; `None` = plaintext.
pub fn options() -> Option<TlsOptions> {
    TLS.get().cloned().flatten()
}

/// An endpoint for the server at `addr`, with TLS if lockctl was given `--ca`.
pub fn endpoint(addr: &str) -> Result<Endpoint, String> {
    lockd_client::endpoint(addr, TLS.get().and_then(Option::as_ref)).map_err(|e| e.to_string())
}

/// `error` with a hint when it looks like a plaintext client talking to a TLS server
/// (the server's TLS record reads as a malformed HTTP/2 frame).
pub fn explain(error: String) -> String {
    let plaintext_to_tls =
        error.contains("frame with invalid size") || error.contains("h2 protocol error");
    if plaintext_to_tls && options().is_none() {
        format!("{error} (does the cluster use TLS? then pass --ca, --cert and --key)")
    } else {
        error
    }
}
