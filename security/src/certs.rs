//! `ringleader certs init`: a CA and every component's certificate.
//!
//! ```text
//!   DIR/ca/{ca.crt,ca.key}                 cluster CA (keep ca.key offline)
//!   DIR/coordinator/{ca.crt,tls.crt,tls.key}   coordinator.ringleader.internal + --host names
//!   DIR/worker/…                           worker.ringleader.internal
//!   DIR/client/…                           client.ringleader.internal
//!   DIR/etcd-ca/{ca.crt,ca.key}            a second CA, for etcd only
//!   DIR/etcd-server/…                      etcd's serving and peer certificate
//!   DIR/etcd-client/…                      the coordinators' etcd client certificate
//!   DIR/admin.token                        a bootstrap admin bearer token
//! ```
//!
//! etcd has a CA of its own so that a worker's or a client's key, which
//! the cluster CA signed, cannot open etcd: only coordinators hold a
//! certificate etcd trusts.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::error::{Result, SecurityError};
use crate::role::Role;
use crate::tls::{CA_FILE, CERT_FILE, KEY_FILE};
use crate::token::Token;

/// Directory names `init` writes (one per component certificate).
pub const ETCD_SERVER_DIR: &str = "etcd-server";
pub const ETCD_CLIENT_DIR: &str = "etcd-client";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// How long issued certificates are valid.
pub const CERT_VALIDITY_DAYS: i64 = 365;

/// What to put in the certificates.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Extra DNS names and IPs for the coordinator and etcd certificates
    /// (what clients and etcdctl dial), beyond localhost and 127.0.0.1.
    pub hosts: Vec<String>,
}

/// The files `init` wrote.
#[derive(Clone, Debug)]
pub struct Written {
    pub dir: PathBuf,
    pub admin_token: Token,
}

impl Written {
    /// The TLS directory of a component.
    pub fn tls_dir(&self, role: Role) -> PathBuf {
        self.dir.join(role.as_str())
    }
}

/// Whether `dir` already holds what `init` writes.
pub fn initialized(dir: &Path) -> bool {
    dir.join("ca").join(CA_FILE).exists()
}

/// Creates the CAs, the component certificates and an admin token under
/// `dir`. Refuses to overwrite an existing CA.
pub fn init(dir: &Path, options: &InitOptions) -> Result<Written> {
    if initialized(dir) {
        return Err(SecurityError::InvalidArgument(format!(
            "{} already holds a CA ({}); refusing to overwrite it",
            dir.display(),
            dir.join("ca").join(CA_FILE).display()
        )));
    }
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    for host in &options.hosts {
        if !hosts.contains(host) {
            hosts.push(host.clone());
        }
    }

    let cluster_ca = new_ca("Ringleader cluster CA")?;
    write_ca(&dir.join("ca"), &cluster_ca)?;
    for role in Role::ALL {
        let mut names = vec![role.server_name()];
        if role == Role::Coordinator {
            names.extend(hosts.iter().cloned());
        }
        issue(&dir.join(role.as_str()), &cluster_ca, role.as_str(), names)?;
    }

    let etcd_ca = new_ca("Ringleader etcd CA")?;
    write_ca(&dir.join("etcd-ca"), &etcd_ca)?;
    let mut etcd_names = vec!["etcd.ringleader.internal".to_string()];
    etcd_names.extend(hosts.iter().cloned());
    issue(&dir.join(ETCD_SERVER_DIR), &etcd_ca, "etcd", etcd_names)?;
    issue(
        &dir.join(ETCD_CLIENT_DIR),
        &etcd_ca,
        "ringleader-coordinator",
        vec![Role::Coordinator.server_name()],
    )?;

    let admin_token = Token::generate();
    write_file(
        &dir.join(ADMIN_TOKEN_FILE),
        format!("{}\n", admin_token.reveal()).as_bytes(),
        true,
    )?;
    Ok(Written {
        dir: dir.to_path_buf(),
        admin_token,
    })
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks a little behind ours.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

fn new_ca(name: &str) -> Result<Ca> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, 10 * CERT_VALIDITY_DAYS);
    let pem = params.self_signed(&key)?.pem();
    Ok(Ca { params, key, pem })
}

fn write_ca(dir: &Path, ca: &Ca) -> Result<()> {
    create_dir(dir)?;
    write_file(&dir.join(CA_FILE), ca.pem.as_bytes(), false)?;
    write_file(&dir.join("ca.key"), ca.key.serialize_pem().as_bytes(), true)
}

/// Issues a certificate for `names` (DNS names or IPs), usable both to
/// serve and to call (every component does both), into `dir`.
fn issue(dir: &Path, ca: &Ca, common_name: &str, names: Vec<String>) -> Result<()> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, CERT_VALIDITY_DAYS);
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer)?;
    create_dir(dir)?;
    write_file(&dir.join(CA_FILE), ca.pem.as_bytes(), false)?;
    write_file(&dir.join(CERT_FILE), cert.pem().as_bytes(), false)?;
    write_file(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), true)
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| SecurityError::file(dir, e))
}

/// Writes a new file; secrets are readable by their owner only.
fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 });
    let mut file = options
        .open(path)
        .map_err(|e| SecurityError::file(path, e))?;
    file.write_all(contents)
        .map_err(|e| SecurityError::file(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::TlsDir;

    #[test]
    fn init_writes_role_certificates_and_refuses_to_run_twice() {
        let temp = tempfile::tempdir().unwrap();
        let written = init(
            temp.path(),
            &InitOptions {
                hosts: vec!["coord.example".into(), "10.0.0.7".into()],
            },
        )
        .unwrap();
        for role in Role::ALL {
            let dir = TlsDir::load_for(&written.tls_dir(role), role).unwrap();
            assert_eq!(dir.roles, [role], "{role}");
        }
        // A worker's certificate is not a coordinator's.
        let error = TlsDir::load_for(&written.tls_dir(Role::Worker), Role::Coordinator)
            .unwrap_err()
            .to_string();
        assert!(error.contains("not for a coordinator"), "{error}");
        let key_mode = std::fs::metadata(written.tls_dir(Role::Worker).join(KEY_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
            0o600
        );
        let token = std::fs::read_to_string(temp.path().join(ADMIN_TOKEN_FILE)).unwrap();
        assert_eq!(Token::parse(&token).unwrap(), written.admin_token);
        let again = init(temp.path(), &InitOptions { hosts: vec![] }).unwrap_err();
        assert!(
            again.to_string().contains("refusing to overwrite"),
            "{again}"
        );
    }
}
