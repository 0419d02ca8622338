//! Optional mutual TLS towards the lock servers: the cluster CA to trust and this
//! client's certificate and key, and the one place that turns a server address into a
//! tonic endpoint (`http://` or `https://` with those settings).
//!
//! With TLS on, a server accepts only clients whose certificate its CA issued; a node
//! may log in only under its certificate's Common Name, and admin operations need a
//! certificate with `OU=lockd-admin` (see the server's `tls` module).

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, Result};

/// The PEM material of a TLS client: the CA that issued the servers' certificates and,
/// normally, this client's own certificate and key.
#[derive(Clone)]
pub struct TlsOptions {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("TlsOptions")
            .field("identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

fn check_certs(what: &str, pem: &[u8]) -> Result<()> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("{what}: unparsable PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{what}: no PEM CERTIFICATE block in it"
        )));
    }
    Ok(())
}

fn check_key(what: &str, pem: &[u8]) -> Result<()> {
    match rustls_pemfile::private_key(&mut &pem[..]) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(Error::Config(format!(
            "{what}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it"
        ))),
        Err(e) => Err(Error::Config(format!("{what}: unparsable PEM: {e}"))),
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("{what} {}: cannot read: {e}", path.display())))
}

impl TlsOptions {
    /// Trust servers whose certificates `ca_pem` issued; present no client certificate
    /// (a server with TLS on refuses such a client: use [`TlsOptions::identity`]).
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Result<TlsOptions> {
        let ca_pem = ca_pem.into();
        check_certs("CA certificate", &ca_pem)?;
        Ok(TlsOptions {
            ca_pem,
            identity: None,
        })
    }

    /// Present this certificate (chain) and private key to the servers.
    pub fn identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Result<TlsOptions> {
        let (cert_pem, key_pem) = (cert_pem.into(), key_pem.into());
        check_certs("client certificate", &cert_pem)?;
        check_key("client key", &key_pem)?;
        self.identity = Some((cert_pem, key_pem));
        Ok(self)
    }

    /// Reads the CA and, if given, the client certificate and key from PEM files.
    /// Errors name the file and the problem.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<TlsOptions> {
        let tls = TlsOptions::new(read("CA certificate", ca)?).map_err(|e| with_path(e, ca))?;
        match identity {
            None => Ok(tls),
            Some((cert, key)) => {
                let cert_pem = read("client certificate", cert)?;
                let key_pem = read("client key", key)?;
                check_certs("client certificate", &cert_pem).map_err(|e| with_path(e, cert))?;
                check_key("client key", &key_pem).map_err(|e| with_path(e, key))?;
                tls.identity(cert_pem, key_pem)
            }
        }
    }

    fn client_config(&self, addr: &str) -> ClientTlsConfig {
        // Certificates name hosts without IPv6 brackets or ports.
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(host);
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        config
    }
}

/// An error with its sources: tonic's "transport error" alone hides the cause.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn with_path(e: Error, path: &Path) -> Error {
    match e {
        Error::Config(m) => Error::Config(format!("{} ({m})", path.display())),
        other => other,
    }
}

/// A tonic endpoint for the server at `addr` (`host:port`): plaintext without `tls`,
/// mutual TLS with it. Connecting is up to the caller.
pub fn endpoint(addr: &str, tls: Option<&TlsOptions>) -> Result<Endpoint> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| Error::Config(format!("bad server address {addr:?}: {e}")))?;
    match tls {
        None => Ok(endpoint),
        Some(tls) => endpoint
            .tls_config(tls.client_config(addr))
            .map_err(|e| Error::Config(format!("TLS settings for {addr}: {}", chain(&e)))),
    }
}
