//! Ringleader's security: who may talk to whom, and how they prove it.
//!
//! ```text
//!   client ──mTLS (client cert) + bearer token──▶ coordinator ──mTLS──▶ etcd
//!   worker ──mTLS (worker cert)─────────────────▶ coordinator     (own etcd CA)
//!   worker ──mTLS (worker cert) + ring proof────▶ worker
//! ```
//!
//! * [`tls`]: a component's TLS directory (`ca.crt`, `tls.crt`, `tls.key`,
//!   the layout of a Kubernetes TLS Secret), the tonic client and server
//!   configurations built from it, and [`tls::Transport`], which is either
//!   that or an explicit, loud `--insecure`.
//! * [`role`]: certificates name a component's role as a DNS name
//!   (`worker.ringleader.internal`); clients verify servers by that name and
//!   servers check the role of the certificate a caller presented.
//! * [`certs`]: `ringleader certs init`, a CA and every component's
//!   certificate.
//! * [`token`]: users' bearer tokens (`rlt_<id>_<secret>`), of which only a
//!   SHA-256 of the secret is ever stored, and their roles.

pub mod certs;
pub mod error;
pub mod role;
pub mod tls;
pub mod token;

pub use error::{Result, SecurityError};
pub use role::Role;
pub use tls::{TlsDir, Transport};
pub use token::{Token, UserRole};
