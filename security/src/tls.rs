//! TLS material on disk and the tonic configurations made from it.
//!
//! A component's TLS directory holds `ca.crt` (the CA its peers' certificates
//! must chain to), `tls.crt` and `tls.key` (its own): the layout of a
//! Kubernetes TLS Secret from cert-manager, and what `ringleader certs init`
//! writes for each role.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use crate::error::{Result, SecurityError};
use crate::role::Role;

/// Largest PEM file we read (a certificate chain is a few KiB).
pub const MAX_PEM_BYTES: u64 = 256 << 10;

pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// One component's certificates, read from its TLS directory.
#[derive(Clone)]
pub struct TlsDir {
    pub dir: PathBuf,
    ca: String,
    cert: String,
    key: String,
    /// Roles `tls.crt` names.
    pub roles: Vec<Role>,
}

impl std::fmt::Debug for TlsDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TlsDir")
            .field("dir", &self.dir)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

impl TlsDir {
    /// Reads `ca.crt`, `tls.crt` and `tls.key` under `dir`, checking that
    /// each is PEM of the right kind.
    pub fn load(dir: &Path) -> Result<Self> {
        let ca = read_pem(&dir.join(CA_FILE), "CERTIFICATE")?;
        let cert_path = dir.join(CERT_FILE);
        let cert = read_pem(&cert_path, "CERTIFICATE")?;
        let key = read_pem(&dir.join(KEY_FILE), "PRIVATE KEY")?;
        let roles = leaf_der(&cert)
            .map(|der| Role::of_certificate(&der))
            .unwrap_or_default();
        Ok(Self {
            dir: dir.to_path_buf(),
            ca,
            cert,
            key,
            roles,
        })
    }

    /// [`TlsDir::load`], then checks that the certificate is for `role`.
    pub fn load_for(dir: &Path, role: Role) -> Result<Self> {
        let loaded = Self::load(dir)?;
        if !loaded.roles.contains(&role) {
            let named: Vec<&str> = loaded.roles.iter().map(|r| r.as_str()).collect();
            return Err(SecurityError::BadMaterial {
                path: dir.join(CERT_FILE),
                reason: format!(
                    "this certificate is not for a {role} (it names {}): a {role} needs one with the DNS name {}",
                    if named.is_empty() { "no role".to_string() } else { named.join(", ") },
                    role.server_name()
                ),
            });
        }
        Ok(loaded)
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(&self.ca)
    }

    /// Server side: our certificate, and client certificates required,
    /// chaining to our CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(self.ca())
    }

    /// Client side: verify the server as `server_role` against our CA and
    /// present our own certificate.
    pub fn client_config(&self, server_role: Role) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca())
            .identity(self.identity())
            .domain_name(server_role.server_name())
    }

    /// The dashboard's HTTPS: our certificate, no client certificate
    /// asked for (browsers carry none; the API asks for a bearer token).
    pub fn https_server_config(&self) -> Result<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |file: &str, reason: String| SecurityError::BadMaterial {
            path: self.dir.join(file),
            reason,
        };
        let chain = CertificateDer::pem_slice_iter(self.cert.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(CERT_FILE, e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes())
            .map_err(|e| bad(KEY_FILE, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(CERT_FILE, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| bad(KEY_FILE, e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Client side for servers that are not ours (etcd): verify the
    /// server by the host it is dialled at, present our certificate.
    pub fn client_config_by_host(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca())
            .identity(self.identity())
    }
}

fn read_pem(path: &Path, kind: &str) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| SecurityError::file(path, e))?;
    let mut text = String::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| SecurityError::file(path, e))?;
    if text.len() as u64 > MAX_PEM_BYTES {
        return Err(SecurityError::BadMaterial {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_PEM_BYTES} bytes"),
        });
    }
    // "PRIVATE KEY" also matches "EC PRIVATE KEY" and "RSA PRIVATE KEY".
    if !text.contains("-----BEGIN ") || !text.contains(&format!("{kind}-----")) {
        return Err(SecurityError::BadMaterial {
            path: path.to_path_buf(),
            reason: format!("not a PEM {}", kind.to_lowercase()),
        });
    }
    Ok(text)
}

/// DER of the first certificate in a PEM text.
fn leaf_der(pem: &str) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    Some(parsed.contents)
}

/// `address` (`host:port`, with or without a scheme) as an `https://` or
/// `http://` URI.
pub fn uri(address: &str, tls: bool) -> String {
    let bare = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    if tls {
        format!("https://{bare}")
    } else {
        format!("http://{bare}")
    }
}

/// How a component talks: mutual TLS (the default), or plaintext with no
/// authentication, only by explicit choice.
#[derive(Clone, Debug)]
pub enum Transport {
    Tls(Arc<TlsDir>),
    Insecure,
}

impl Transport {
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// `address` (`host:port`, with or without a scheme) as a URI of this
    /// transport's scheme.
    pub fn uri(&self, address: &str) -> String {
        uri(address, self.is_tls())
    }

    /// An endpoint for a server of `server_role` at `address`.
    pub fn endpoint(&self, address: &str, server_role: Role) -> Result<Endpoint> {
        let bad = |e: tonic::transport::Error| {
            SecurityError::InvalidArgument(format!("bad address {address:?}: {e}"))
        };
        let endpoint = Endpoint::from_shared(self.uri(address)).map_err(bad)?;
        match self {
            Transport::Tls(dir) => {
                endpoint
                    .tls_config(dir.client_config(server_role))
                    .map_err(|e| SecurityError::BadMaterial {
                        path: dir.dir.clone(),
                        reason: e.to_string(),
                    })
            }
            Transport::Insecure => Ok(endpoint),
        }
    }

    /// `builder` serving TLS that requires client certificates, or
    /// unchanged when insecure.
    pub fn server(&self, builder: Server) -> Result<Server> {
        match self {
            Transport::Tls(dir) => {
                builder
                    .tls_config(dir.server_config())
                    .map_err(|e| SecurityError::BadMaterial {
                        path: dir.dir.clone(),
                        reason: e.to_string(),
                    })
            }
            Transport::Insecure => Ok(builder),
        }
    }

    /// Checks the caller presented a certificate of `role`; anyone passes
    /// when insecure.
    #[allow(clippy::result_large_err)]
    pub fn check_peer<T>(&self, request: &Request<T>, role: Role) -> Result<(), Status> {
        match self {
            Transport::Tls(_) => role.check_caller(request),
            Transport::Insecure => Ok(()),
        }
    }
}

/// The warning every insecure start logs.
pub const INSECURE_WARNING: &str = "running WITHOUT TLS or authentication (--insecure): anyone who can reach these ports can submit, read and cancel work, join rings and feed them data. Use only on a trusted, private network";
