//! Users' bearer tokens and roles.
//!
//! A token reads `rlt_<id>_<secret>`: the id (12 hex digits) names it in
//! listings and revocations, the secret (64 hex digits, 256 random bits) is
//! shown once at creation and only its SHA-256 is stored. With that much
//! entropy a fast hash is enough: there is nothing to guess from.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::SecurityError;

const PREFIX: &str = "rlt_";
const ID_HEX: usize = 12;
const SECRET_HEX: usize = 64;

/// What a user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserRole {
    /// Read everything, change nothing.
    Viewer,
    /// Submit; see and cancel their own sweeps and jobs.
    User,
    /// Everything, including tokens and everyone's sweeps.
    Admin,
}

impl UserRole {
    pub fn as_str(self) -> &'static str {
        match self {
            UserRole::Viewer => "viewer",
            UserRole::User => "user",
            UserRole::Admin => "admin",
        }
    }
}

impl fmt::Display for UserRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UserRole {
    type Err = SecurityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "viewer" => Ok(UserRole::Viewer),
            "user" => Ok(UserRole::User),
            "admin" => Ok(UserRole::Admin),
            other => Err(SecurityError::InvalidArgument(format!(
                "unknown role {other:?} (expected admin, user or viewer)"
            ))),
        }
    }
}

/// A bearer token as the user holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({PREFIX}{}_…)", self.id)
    }
}

impl Token {
    /// A fresh random token.
    pub fn generate() -> Self {
        let mut id = [0u8; ID_HEX / 2];
        let mut secret = [0u8; SECRET_HEX / 2];
        // ThreadRng: a CSPRNG seeded (and periodically reseeded) from the OS.
        let mut rng = rand::rng();
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        Self {
            id: hex(&id),
            secret: hex(&secret),
        }
    }

    /// Parses `rlt_<id>_<secret>`; the error never quotes the text (it may
    /// be someone's secret, mistyped).
    pub fn parse(text: &str) -> Result<Self, SecurityError> {
        let malformed = || {
            SecurityError::InvalidArgument(format!(
                "malformed token: expected {PREFIX}<{ID_HEX} hex digits>_<{SECRET_HEX} hex digits>"
            ))
        };
        let rest = text.trim().strip_prefix(PREFIX).ok_or_else(malformed)?;
        let (id, secret) = rest.split_once('_').ok_or_else(malformed)?;
        let is_hex = |s: &str, n: usize| {
            s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !is_hex(id, ID_HEX) || !is_hex(secret, SECRET_HEX) {
            return Err(malformed());
        }
        Ok(Self {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }

    /// The whole token, to hand to its user once.
    pub fn reveal(&self) -> String {
        format!("{PREFIX}{}_{}", self.id, self.secret)
    }

    /// What is stored: SHA-256 of the secret, hex.
    pub fn secret_hash(&self) -> String {
        hex(&Sha256::digest(self.secret.as_bytes()))
    }

    /// Whether this token's secret hashes to `stored`, compared in
    /// constant time.
    pub fn matches(&self, stored_hash: &str) -> bool {
        let ours = self.secret_hash();
        ours.len() == stored_hash.len()
            && ours
                .bytes()
                .zip(stored_hash.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_matches_only_its_hash() {
        let token = Token::generate();
        let parsed = Token::parse(&token.reveal()).unwrap();
        assert_eq!(parsed, token);
        assert!(parsed.matches(&token.secret_hash()));
        let other = Token::generate();
        assert!(!other.matches(&token.secret_hash()));
        assert_ne!(token.id, other.id);
    }

    #[test]
    fn malformed_tokens_are_refused_without_quoting_them() {
        let secret_looking = "rlt_0123456789ab_notasecretbutlonglonglong";
        for text in ["", "rlt_", "abc", secret_looking, "rlt_0123456789AB_00"] {
            let error = Token::parse(text).unwrap_err().to_string();
            assert!(error.starts_with("malformed token"), "{error}");
            assert!(!error.contains("notasecret"), "{error}");
        }
    }

    #[test]
    fn roles_parse_and_order_by_power() {
        assert_eq!("admin".parse::<UserRole>().unwrap(), UserRole::Admin);
        assert!("root".parse::<UserRole>().is_err());
        assert!(UserRole::Viewer < UserRole::User && UserRole::User < UserRole::Admin);
    }
}
