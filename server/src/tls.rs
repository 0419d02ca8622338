//! Optional mutual TLS: the `[tls]` files of one server, the tonic TLS settings built
//! from them, and the access rules that read a verified client certificate.
//!
//! With TLS on, every connection to a server must present a certificate issued by the
//! cluster CA (rustls checks that during the handshake, before any RPC). What a
//! certificate may then do is decided here, from its Subject:
//!
//! - the **Common Name** (CN) is the identity: a node may only `Login` under the name
//!   in its certificate's CN;
//! - each **Organizational Unit** (OU) is a role: `lockd-admin` may run the admin
//!   operations that change the cluster (Shutdown, ForceExpire, FenceAck, SetLogLevel,
//!   server add/remove); `lockd-server` may send Raft messages (PeerService).
//!
//! Calls that act for a session (Lock, Convert, Unlock, Cancel, Logout, OpenLockspace,
//! RecoveryDone, Heartbeat, Events) must come from the certificate whose CN is the
//! session's node. Every other RPC (Status, Locks, FenceHistory, CheckToken, health,
//! reflection) needs only a certificate the CA issued. With TLS off
//! ([`Access::Open`]) every rule here allows everything, as before TLS existed.
//!
//! Knows nothing of Raft or the lock table.

// `tonic::Status` is the error type of every gRPC handler (see service.rs).
#![allow(clippy::result_large_err)]

use crate::config::{ConfigError, TlsConfig};
use std::path::Path;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The OU that marks an operator's certificate.
pub const ADMIN_ROLE: &str = "lockd-admin";
/// The OU that marks a lock server's certificate (Raft traffic between servers).
pub const SERVER_ROLE: &str = "lockd-server";

/// The PEM files one server uses, read and checked at start-up.
#[derive(Clone)]
pub struct TlsFiles {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("TlsFiles").finish_non_exhaustive()
    }
}

fn invalid(key: &str, path: &Path, problem: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        problem: format!("{}: {problem}", path.display()),
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, path, format!("cannot read: {e}")))
}

/// The DER certificates in a PEM file; an error naming `key` if there are none or one
/// is malformed.
fn pem_certs(key: &str, path: &Path, pem: &[u8]) -> Result<Vec<Vec<u8>>, ConfigError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, path, format!("unparsable PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(key, path, "no PEM CERTIFICATE block in it"));
    }
    for der in &certs {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| invalid(key, path, format!("not a valid X.509 certificate: {e}")))?;
        if cert.version() != x509_parser::x509::X509Version::V3 {
            return Err(invalid(
                key,
                path,
                "an X.509 v1 certificate: TLS here accepts only v3 (`openssl x509 -req` \
                 makes v3 only when given extensions, e.g. -extfile)",
            ));
        }
    }
    Ok(certs.into_iter().map(|c| c.as_ref().to_vec()).collect())
}

impl TlsFiles {
    /// Reads and checks server `id`'s files: the CA and the certificate parse, the key
    /// is a PEM private key, and the certificate carries the server role (peers would
    /// refuse it otherwise). Errors name the `tls.*` key and the file.
    pub fn load(tls: &TlsConfig, id: u64) -> Result<TlsFiles, ConfigError> {
        let ca_path = tls.ca.clone();
        let cert_path = tls.cert_path(id);
        let key_path = tls.key_path(id);
        let ca_pem = read("tls.ca", &ca_path)?;
        pem_certs("tls.ca", &ca_path, &ca_pem)?;
        let cert_pem = read("tls.cert", &cert_path)?;
        let chain = pem_certs("tls.cert", &cert_path, &cert_pem)?;
        let identity =
            PeerIdentity::from_der(&chain[0]).map_err(|e| invalid("tls.cert", &cert_path, e))?;
        if !identity.has_role(SERVER_ROLE) {
            return Err(invalid(
                "tls.cert",
                &cert_path,
                format!(
                    "the certificate ({}) has no OU={SERVER_ROLE}, so the other servers \
                     would refuse its Raft traffic",
                    identity.describe()
                ),
            ));
        }
        let key_pem = read("tls.key", &key_path)?;
        match rustls_pemfile::private_key(&mut &key_pem[..]) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(invalid(
                    "tls.key",
                    &key_path,
                    "no PEM private key (PKCS#8, PKCS#1 or SEC1) in it",
                ))
            }
            Err(e) => {
                return Err(invalid(
                    "tls.key",
                    &key_path,
                    format!("unparsable PEM: {e}"),
                ))
            }
        }
        Ok(TlsFiles {
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// The listener's settings: this server's certificate, and a client certificate
    /// from the cluster CA required of every connection.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Settings for this server's own connections to other servers (Raft streams, a
    /// follower asking the leader's status): the server's certificate is its client
    /// identity, and the other server must present a certificate from the cluster CA
    /// valid for the address dialled (an IP address SAN, or a DNS name).
    pub fn client_config(&self, addr: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(self.identity())
            .domain_name(host_of(addr))
    }
}

/// The host part of `host:port`, without IPv6 brackets (what certificate names are
/// matched against).
pub fn host_of(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// The URL scheme for a server address: `https` when TLS is on.
pub fn url(addr: &str, tls: Option<&TlsFiles>) -> String {
    match tls {
        Some(_) => format!("https://{addr}"),
        None => format!("http://{addr}"),
    }
}

/// An endpoint for another server at `addr`, with TLS when `tls` is set.
pub fn endpoint(
    addr: &str,
    tls: Option<&TlsFiles>,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(url(addr, tls))?;
    match tls {
        Some(files) => endpoint.tls_config(files.client_config(addr)),
        None => Ok(endpoint),
    }
}

/// Who a verified client certificate says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The Subject's Common Name, if it has one.
    pub name: Option<String>,
    /// The Subject's Organizational Units.
    pub roles: Vec<String>,
}

impl PeerIdentity {
    /// Reads the Subject of a DER certificate. Signature and validity were checked by
    /// rustls in the handshake; this only reads names.
    pub fn from_der(der: &[u8]) -> Result<PeerIdentity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unparsable certificate: {e}"))?;
        let subject = cert.subject();
        let name = match subject.iter_common_name().next() {
            Some(cn) => Some(
                cn.as_str()
                    .map_err(|e| format!("the certificate's CN is not a string: {e}"))?
                    .to_string(),
            ),
            None => None,
        };
        let roles = subject
            .iter_organizational_unit()
            .filter_map(|ou| ou.as_str().ok().map(str::to_string))
            .collect();
        Ok(PeerIdentity { name, roles })
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// "CN=node1, OU=lockd-admin" for error messages.
    pub fn describe(&self) -> String {
        let mut parts = vec![match &self.name {
            Some(n) => format!("CN={n}"),
            None => "no CN".to_string(),
        }];
        parts.extend(self.roles.iter().map(|r| format!("OU={r}")));
        parts.join(", ")
    }
}

/// Whether RPCs are checked against the caller's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// TLS off: no identities, everything allowed (as before TLS existed).
    Open,
    /// Mutual TLS: the rules in this module's doc apply.
    MutualTls,
}

impl Access {
    pub fn of(tls: Option<&TlsFiles>) -> Access {
        match tls {
            Some(_) => Access::MutualTls,
            None => Access::Open,
        }
    }

    pub fn is_on(self) -> bool {
        self == Access::MutualTls
    }

    /// The caller's identity; `None` with TLS off. With TLS on, a request without a
    /// certificate is refused (the handshake already requires one; this fails closed
    /// should a connection ever arrive without one).
    pub fn identity<T>(self, request: &Request<T>) -> Result<Option<PeerIdentity>, Status> {
        if self == Access::Open {
            return Ok(None);
        }
        let certs = request.peer_certs().ok_or_else(|| {
            Status::unauthenticated("TLS is on and this connection presented no client certificate")
        })?;
        let leaf = certs.first().ok_or_else(|| {
            Status::unauthenticated("TLS is on and this connection presented no client certificate")
        })?;
        PeerIdentity::from_der(leaf.as_ref())
            .map(Some)
            .map_err(Status::unauthenticated)
    }

    fn require_role<T>(self, request: &Request<T>, role: &str, what: &str) -> Result<(), Status> {
        match self.identity(request)? {
            None => Ok(()),
            Some(id) if id.has_role(role) => Ok(()),
            Some(id) => Err(Status::permission_denied(format!(
                "{what} needs a certificate with OU={role}; this client's certificate is {}",
                id.describe()
            ))),
        }
    }

    /// The one check every admin operation that changes the cluster calls first
    /// (Shutdown, ForceExpire, FenceAck, SetLogLevel, server add/remove).
    pub fn require_admin<T>(self, request: &Request<T>) -> Result<(), Status> {
        self.require_role(request, ADMIN_ROLE, "this admin operation")
    }

    /// PeerService: only another lock server may inject Raft messages.
    pub fn require_server<T>(self, request: &Request<T>) -> Result<(), Status> {
        self.require_role(request, SERVER_ROLE, "Raft traffic")
    }

    /// Login: a certificate may only log in as the node named by its CN.
    pub fn require_node_name<T>(self, request: &Request<T>, node: &str) -> Result<(), Status> {
        match self.identity(request)? {
            None => Ok(()),
            Some(id) if id.name.as_deref() == Some(node) => Ok(()),
            Some(id) => Err(Status::permission_denied(format!(
                "this client's certificate ({}) may not log in as node `{node}`: a node \
                 logs in only under its certificate's CN",
                id.describe()
            ))),
        }
    }
}

impl Access {
    /// A request acting for `session`, which belongs to node `owner`: only that node's
    /// certificate (CN) may use it. `caller` is [`Access::identity`]'s answer.
    pub fn require_session_owner(
        caller: Option<&PeerIdentity>,
        session: u64,
        owner: &str,
    ) -> Result<(), Status> {
        match caller {
            None => Ok(()),
            Some(id) if id.name.as_deref() == Some(owner) => Ok(()),
            Some(id) => Err(Status::permission_denied(format!(
                "session {session} belongs to node `{owner}`; this client's certificate ({}) \
                 may act only for its own node's sessions",
                id.describe()
            ))),
        }
    }
}

/// Server `id`'s TLS files, if the config has a `[tls]` section.
pub fn load(config: &crate::config::Config, id: u64) -> Result<Option<TlsFiles>, ConfigError> {
    config
        .tls
        .as_ref()
        .map(|tls| TlsFiles::load(tls, id))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_der(cn: Option<&str>, ou: Option<&str>) -> Vec<u8> {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        if let Some(ou) = ou {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, ou);
        }
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn name_is_the_common_name_and_roles_are_organizational_units() {
        let id = PeerIdentity::from_der(&cert_der(Some("gfs1"), Some(ADMIN_ROLE))).unwrap();
        assert_eq!(id.name.as_deref(), Some("gfs1"));
        assert!(id.has_role(ADMIN_ROLE) && !id.has_role(SERVER_ROLE));
        assert_eq!(id.describe(), "CN=gfs1, OU=lockd-admin");
        let anonymous = PeerIdentity::from_der(&cert_der(None, None)).unwrap();
        assert_eq!(anonymous.name, None);
        assert_eq!(anonymous.describe(), "no CN");
        assert!(PeerIdentity::from_der(b"garbage").is_err());
    }

    #[test]
    fn with_tls_off_every_rule_allows_and_with_tls_on_no_certificate_is_refused() {
        let request = Request::new(());
        assert!(Access::Open.require_admin(&request).is_ok());
        assert!(Access::Open.require_server(&request).is_ok());
        assert!(Access::Open.require_node_name(&request, "any").is_ok());
        // A request that somehow carries no certificate fails closed.
        for outcome in [
            Access::MutualTls.require_admin(&request),
            Access::MutualTls.require_server(&request),
            Access::MutualTls.require_node_name(&request, "gfs1"),
        ] {
            assert_eq!(outcome.unwrap_err().code(), tonic::Code::Unauthenticated);
        }
    }

    #[test]
    fn hosts_are_taken_from_addresses_without_port_or_brackets() {
        assert_eq!(host_of("192.0.2.11:7100"), "192.0.2.11");
        assert_eq!(host_of("[::1]:7100"), "::1");
        assert_eq!(host_of("lock1:7100"), "lock1");
    }
}
