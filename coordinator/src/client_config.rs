//! The client config file: everything a client needs to reach a cluster,
//! in one file that one environment variable (`RINGLEADER_CONFIG`) names.
//!
//! ```toml
//! coordinators = ["127.0.0.1:7400"]
//! tls_dir = "certs/client"      # relative paths are relative to this file
//! token_file = "admin.token"
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ringleader_security::{Role, TlsDir, Token, Transport};
use serde::{Deserialize, Serialize};

use crate::cli::ClientArgs;
use crate::client::{split_addresses, Connection};
use crate::error::{Error, Result};

/// Largest config or token file read.
const MAX_FILE_BYTES: u64 = 64 << 10;

/// Where clients look when nothing says otherwise.
pub const DEFAULT_COORDINATOR: &str = "127.0.0.1:7400";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    #[serde(default)]
    pub coordinators: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

impl ClientConfig {
    /// Reads `path`; relative paths inside are made relative to its
    /// directory. Errors name the file, and the line for bad TOML.
    pub fn load(path: &Path) -> Result<Self> {
        let text = read_bounded(path, "client config")?;
        Self::parse(&text, path)
    }

    /// A config file's text, read from `origin`: what [`load`](Self::load)
    /// does after reading (relative paths are made relative to `origin`'s
    /// directory; errors name `origin`, and the line for bad TOML). Also the
    /// fuzz target's entry point.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        // The position and the parser's message, never the source line: a
        // misplaced token must not end up on a terminal or in a log.
        let mut config: ClientConfig = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let before = &text.as_bytes()[..span.start.min(text.len())];
                    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
                    let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
                    format!(":{line}:{column}")
                })
                .unwrap_or_default();
            Error::InvalidArgument(format!(
                "{}{at}: {}",
                origin.display(),
                e.message().trim_end()
            ))
        })?;
        let base = origin.parent().unwrap_or(Path::new("."));
        for file in [&mut config.tls_dir, &mut config.token_file]
            .into_iter()
            .flatten()
        {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        Ok(config)
    }

    /// Writes the config (owner-readable only: it points at a token).
    pub fn write(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let text = toml::to_string(self).expect("config serialises");
        let failed = |e: std::io::Error| Error::InvalidArgument(format!("{}: {e}", path.display()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(failed)?;
        file.write_all(
            format!(
                "# A Ringleader client config: export RINGLEADER_CONFIG={}\n{text}",
                path.display()
            )
            .as_bytes(),
        )
        .map_err(failed)
    }
}

fn read_bounded(path: &Path, what: &str) -> Result<String> {
    use std::io::Read;
    let failed =
        |e: std::io::Error| Error::InvalidArgument(format!("{what} {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(failed)?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(failed)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{what} {}: larger than {MAX_FILE_BYTES} bytes",
            path.display()
        )));
    }
    Ok(text)
}

/// Reads a token file (one token, surrounding blanks ignored).
pub fn read_token_file(path: &Path) -> Result<Token> {
    let text = read_bounded(path, "token file")?;
    Token::parse(&text)
        .map_err(|e| Error::InvalidArgument(format!("token file {}: {e}", path.display())))
}

/// Flags first, then the config file, then defaults.
pub fn resolve(args: &ClientArgs) -> Result<Connection> {
    let config = match &args.config {
        Some(path) => ClientConfig::load(path)?,
        None => ClientConfig::default(),
    };
    let insecure = args.insecure || config.insecure;
    let coordinators = [&args.coordinator, &config.coordinators]
        .into_iter()
        .map(|list| split_addresses(list))
        .find(|list| !list.is_empty())
        .unwrap_or_else(|| vec![DEFAULT_COORDINATOR.to_string()]);
    let transport = if insecure {
        Transport::Insecure
    } else {
        let Some(dir) = args.tls_dir.as_ref().or(config.tls_dir.as_ref()) else {
            return Err(Error::InvalidArgument(
                "TLS is on by default: pass --config FILE (`ringleader local` prints one), or \
                 --tls-dir DIR with a client certificate (`ringleader certs init` makes one), or \
                 --insecure for a cluster started with --insecure"
                    .into(),
            ));
        };
        let dir = TlsDir::load_for(dir, Role::Client)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Transport::Tls(Arc::new(dir))
    };
    let token = match (&args.token, &args.token_file, &config.token_file) {
        (Some(text), _, _) => Some(
            Token::parse(text)
                .map_err(|e| Error::InvalidArgument(format!("--token / RINGLEADER_TOKEN: {e}")))?,
        ),
        (None, Some(path), _) | (None, None, Some(path)) => Some(read_token_file(path)?),
        (None, None, None) => None,
    };
    Ok(Connection {
        coordinators,
        transport,
        token: if insecure { None } else { token },
        timeout: args.timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_resolves_relative_paths() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("client.toml");
        let config = ClientConfig {
            coordinators: vec!["127.0.0.1:1".into()],
            tls_dir: Some("certs/client".into()),
            token_file: Some("admin.token".into()),
            insecure: false,
        };
        config.write(&path).unwrap();
        let loaded = ClientConfig::load(&path).unwrap();
        assert_eq!(loaded.coordinators, config.coordinators);
        assert_eq!(loaded.tls_dir, Some(temp.path().join("certs/client")));
        assert_eq!(loaded.token_file, Some(temp.path().join("admin.token")));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_file_and_line() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("client.toml");
        let token = "rlt_0123456789ab_".to_string() + &"f".repeat(64);
        std::fs::write(&path, format!("coordinators = []\ntoken = \"{token}\"\n")).unwrap();
        let error = ClientConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("client.toml:2:1"), "{error}");
        assert!(error.contains("unknown field `token`"), "{error}");
        // The line itself is not quoted: a token put there stays private.
        assert!(!error.contains("ffff"), "{error}");
    }

    #[test]
    fn parse_resolves_against_the_origin_and_names_it() {
        let origin = Path::new("/etc/ringleader/client.toml");
        let config = ClientConfig::parse(
            "coordinators = [\"10.0.0.1:7400\"]\ntls_dir = \"certs\"\ntoken_file = \"/abs/admin.token\"\n",
            origin,
        )
        .unwrap();
        assert_eq!(config.coordinators, ["10.0.0.1:7400"]);
        assert_eq!(config.tls_dir, Some("/etc/ringleader/certs".into()));
        assert_eq!(config.token_file, Some("/abs/admin.token".into()));
        assert!(!config.insecure);

        let error = ClientConfig::parse("insecure = true\ninsecure = 1\n", origin)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("/etc/ringleader/client.toml:2:1: "),
            "{error}"
        );
    }
}
