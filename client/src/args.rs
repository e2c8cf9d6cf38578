//! Flags every Ringleader binary shares: how it secures its ports, and
//! how durations and optional addresses are written.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 3s, 500ms, 1m)"))
}

/// How a server secures its ports: mutual TLS from a TLS directory, or
/// nothing, only when asked for by name.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Directory with ca.crt, tls.crt and tls.key (`ringleader certs init`
    /// makes one per component; a Kubernetes TLS Secret mounts as one).
    #[arg(long, env = "RINGLEADER_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,

    /// Run without TLS and without authentication: anyone who can reach the
    /// ports can do anything. Logs a warning at every start.
    #[arg(long, env = "RINGLEADER_INSECURE", conflicts_with = "tls_dir")]
    pub insecure: bool,
}

impl TlsArgs {
    /// The transport for a component of `role`; `--insecure` logs its
    /// warning here, at every start.
    pub fn transport(
        &self,
        role: ringleader_security::Role,
    ) -> crate::Result<ringleader_security::Transport> {
        use ringleader_security::{TlsDir, Transport};
        if self.insecure {
            tracing::warn!("{}", ringleader_security::tls::INSECURE_WARNING);
            return Ok(Transport::Insecure);
        }
        let Some(dir) = &self.tls_dir else {
            return Err(crate::ClientError::InvalidArgument(format!(
                "TLS is on by default: pass --tls-dir DIR (ca.crt, tls.crt, tls.key of a {role} \
                 certificate; `ringleader certs init` makes them), or --insecure to run without \
                 TLS and authentication"
            )));
        };
        let dir = TlsDir::load_for(dir, role)
            .map_err(|e| crate::ClientError::InvalidArgument(e.to_string()))?;
        Ok(Transport::Tls(std::sync::Arc::new(dir)))
    }
}

/// An address to listen on, or none (`off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalAddress(pub Option<SocketAddr>);

/// Parses an address to listen on, or `off`.
pub fn parse_optional_address(text: &str) -> Result<OptionalAddress, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(OptionalAddress(None));
    }
    text.parse()
        .map(|a| OptionalAddress(Some(a)))
        .map_err(|e| format!("{text:?} is not an address (host:port) or \"off\": {e}"))
}
