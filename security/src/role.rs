//! Component roles, carried by certificates as DNS names.
//!
//! A coordinator's certificate names `coordinator.ringleader.internal`, a
//! worker's `worker.ringleader.internal`, a client's
//! `client.ringleader.internal`. Callers verify a server by its role's name
//! (not by its IP, so pod IPs need not be in certificates), and servers read
//! the caller's role from the certificate it presented: one CA, and still a
//! worker's key cannot call client APIs nor a client's attach as a worker.

use std::fmt;

use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What a certificate allows its holder to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Coordinator,
    Worker,
    Client,
}

/// Suffix of every role name in certificates.
pub const ROLE_DOMAIN: &str = "ringleader.internal";

impl Role {
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Worker, Role::Client];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Client => "client",
        }
    }

    /// The DNS name a certificate of this role carries, and that callers
    /// verify a server of this role by.
    pub fn server_name(self) -> String {
        format!("{}.{ROLE_DOMAIN}", self.as_str())
    }

    /// Roles a DER certificate names (empty when it names none or does not
    /// parse).
    pub fn of_certificate(der: &[u8]) -> Vec<Role> {
        let Ok((_, certificate)) = X509Certificate::from_der(der) else {
            return Vec::new();
        };
        let Ok(Some(names)) = certificate.subject_alternative_name() else {
            return Vec::new();
        };
        Role::ALL
            .into_iter()
            .filter(|role| {
                let wanted = role.server_name();
                names.value.general_names.iter().any(
                    |name| matches!(name, GeneralName::DNSName(dns) if dns.eq_ignore_ascii_case(&wanted)),
                )
            })
            .collect()
    }

    /// Roles the certificate the caller of `request` presented names;
    /// UNAUTHENTICATED when it presented none.
    pub fn of_caller<T>(request: &Request<T>) -> Result<Vec<Role>, Status> {
        let Some(chain) = request.peer_certs() else {
            return Err(Status::unauthenticated(
                "no client certificate: this port takes mutual TLS only",
            ));
        };
        Ok(chain
            .first()
            .map(|leaf| Role::of_certificate(leaf.as_ref()))
            .unwrap_or_default())
    }

    /// Checks that the caller of `request` presented a certificate of this
    /// role. Only meaningful on a server that required client certificates
    /// (see [`crate::tls::Transport::check_peer`], which also handles
    /// `--insecure`).
    pub fn check_caller<T>(self, request: &Request<T>) -> Result<(), Status> {
        let roles = Role::of_caller(request)?;
        if roles.contains(&self) {
            return Ok(());
        }
        let presented = if roles.is_empty() {
            "a certificate with no Ringleader role".to_string()
        } else {
            let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            format!("a {} certificate", names.join("/"))
        };
        Err(Status::permission_denied(format!(
            "this call needs a {self} certificate; the caller presented {presented}"
        )))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
