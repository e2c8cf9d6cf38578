//! Who is calling the coordinator, and what they may do.
//!
//! ```text
//!   TLS handshake: a certificate from the cluster CA (else no connection)
//!        │
//!        ├─ Attach ─────────── worker certificate
//!        ├─ WhoIsLeader ────── any Ringleader certificate
//!        └─ everything else ── client (or relaying coordinator) certificate
//!                              + bearer token
//!                                 │ admin bootstrap token (--admin-token-file)
//!                                 │ or a stored token (hash compared, not revoked)
//!                                 ▼
//!                              Caller { user, role } ── owners and roles decide
//! ```
//!
//! With `--insecure` there is neither: every caller is the anonymous admin.

use std::collections::HashMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use ringleader_security::{Role, Token, Transport, UserRole};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

/// Stored tokens live under this prefix, one record per token id.
pub const TOKENS_PREFIX: &str = "/ringleader/tokens/";

/// Longest token name accepted.
pub const MAX_TOKEN_NAME_BYTES: usize = 64;

/// Most tokens (revoked ones included) a cluster keeps.
pub const MAX_TOKENS: usize = 10_000;

/// Name of the user behind the bootstrap admin token.
pub const BOOTSTRAP_ADMIN: &str = "admin";

/// Name of every caller of an insecure cluster.
pub const ANONYMOUS: &str = "anonymous";

pub fn token_key(id: &str) -> String {
    format!("{TOKENS_PREFIX}{id}")
}

/// A token as etcd holds it: never the secret, only its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: UserRole,
    /// Hex SHA-256 of the token's secret.
    pub secret_sha256: String,
    pub created_unix_ms: u64,
    pub created_by: String,
    #[serde(default)]
    pub revoked_unix_ms: Option<u64>,
}

/// What clients see of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: UserRole,
    pub created_unix_ms: u64,
    pub created_by: String,
    #[serde(default)]
    pub revoked_unix_ms: Option<u64>,
}

impl From<&TokenRecord> for TokenInfo {
    fn from(record: &TokenRecord) -> Self {
        Self {
            id: record.id.clone(),
            name: record.name.clone(),
            role: record.role,
            created_unix_ms: record.created_unix_ms,
            created_by: record.created_by.clone(),
            revoked_unix_ms: record.revoked_unix_ms,
        }
    }
}

/// An authenticated user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub user: String,
    pub role: UserRole,
}

impl Caller {
    /// Whether this caller may see or change something `owner` submitted.
    pub fn may_read(&self, owner: &str) -> bool {
        self.role >= UserRole::Admin || self.role == UserRole::Viewer || self.user == owner
    }

    /// Whether this caller may cancel something `owner` submitted.
    pub fn may_change(&self, owner: &str) -> bool {
        self.role == UserRole::Admin || (self.role == UserRole::User && self.user == owner)
    }

    /// PERMISSION_DENIED unless the caller's role is at least `needed`.
    #[allow(clippy::result_large_err)]
    pub fn require(&self, needed: UserRole, action: &str) -> Result<(), Status> {
        if self.role >= needed {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{action} needs the {needed} role; {} is a {}",
            self.user, self.role
        )))
    }
}

/// The coordinator's gatekeeper: the transport's peer checks plus tokens.
pub struct Authenticator {
    transport: Transport,
    /// The bootstrap admin's token id and secret hash.
    bootstrap_admin: Option<(String, String)>,
    /// Stored tokens by id; the leader loads them at the start of its term
    /// and keeps them current as it changes them.
    tokens: RwLock<HashMap<String, TokenRecord>>,
}

impl Authenticator {
    pub fn new(transport: Transport, bootstrap_admin: Option<Token>) -> Self {
        Self {
            transport,
            bootstrap_admin: bootstrap_admin.map(|t| (t.id.clone(), t.secret_hash())),
            tokens: RwLock::new(HashMap::new()),
        }
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn tokens(&self) -> RwLockReadGuard<'_, HashMap<String, TokenRecord>> {
        self.tokens.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn tokens_mut(&self) -> RwLockWriteGuard<'_, HashMap<String, TokenRecord>> {
        self.tokens.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the known tokens (at the start of a term).
    pub fn load_tokens(&self, records: Vec<TokenRecord>) {
        *self.tokens_mut() = records.into_iter().map(|r| (r.id.clone(), r)).collect();
    }

    /// The caller must hold a worker certificate.
    #[allow(clippy::result_large_err)]
    pub fn worker<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.transport.check_peer(request, Role::Worker)
    }

    /// The caller must hold any certificate of ours (any role).
    #[allow(clippy::result_large_err)]
    pub fn component<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if !self.transport.is_tls() || !Role::of_caller(request)?.is_empty() {
            return Ok(());
        }
        // A certificate of our CA that names no role: say what is needed.
        Role::Client.check_caller(request)
    }

    /// The user behind a client call: a client certificate and a valid
    /// token.
    #[allow(clippy::result_large_err)]
    pub fn user<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        if !self.transport.is_tls() {
            return Ok(Caller {
                user: ANONYMOUS.into(),
                role: UserRole::Admin,
            });
        }
        // A coordinator's own certificate may relay a user's token: its
        // dashboard asks on behalf of the browser that holds it.
        if self
            .transport
            .check_peer(request, Role::Coordinator)
            .is_err()
        {
            self.transport.check_peer(request, Role::Client)?;
        }
        self.caller(&bearer_token(request.metadata())?)
    }

    /// Who holds `token`: the bootstrap admin, or a stored token that is
    /// not revoked.
    #[allow(clippy::result_large_err)]
    fn caller(&self, token: &Token) -> Result<Caller, Status> {
        if let Some((id, hash)) = &self.bootstrap_admin {
            if *id == token.id && token.matches(hash) {
                return Ok(Caller {
                    user: BOOTSTRAP_ADMIN.into(),
                    role: UserRole::Admin,
                });
            }
        }
        let tokens = self.tokens();
        match tokens.get(&token.id) {
            Some(record) if token.matches(&record.secret_sha256) => match record.revoked_unix_ms {
                None => Ok(Caller {
                    user: record.name.clone(),
                    role: record.role,
                }),
                Some(_) => Err(Status::unauthenticated(format!(
                    "token {} has been revoked",
                    token.id
                ))),
            },
            _ => Err(Status::unauthenticated(format!(
                "unknown token {} (not issued by this cluster, or mistyped)",
                token.id
            ))),
        }
    }
}

/// The token of an `authorization: Bearer …` header.
#[allow(clippy::result_large_err)]
fn bearer_token(metadata: &MetadataMap) -> Result<Token, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Err(Status::unauthenticated(
            "no token: pass --token, RINGLEADER_TOKEN, --token-file or a --config that names one \
             (`ringleader token create` makes one; `ringleader local` prints a config)",
        ));
    };
    let text = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated("the authorization metadata must read \"Bearer <token>\"")
        })?;
    Token::parse(text).map_err(|e| Status::unauthenticated(e.to_string()))
}

/// Checks a new token's name.
#[allow(clippy::result_large_err)]
pub fn validate_token_name(name: &str) -> Result<(), Status> {
    let name_ok = !name.is_empty()
        && name.len() <= MAX_TOKEN_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if name_ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "token name: 1 to {MAX_TOKEN_NAME_BYTES} characters of letters, digits, '-', '_', '.' and '@'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(user: &str, role: UserRole) -> Caller {
        Caller {
            user: user.into(),
            role,
        }
    }

    #[test]
    fn owners_and_roles_decide_reads_and_changes() {
        let alice = caller("alice", UserRole::User);
        assert!(alice.may_read("alice") && alice.may_change("alice"));
        assert!(!alice.may_read("bob") && !alice.may_change("bob"));
        let viewer = caller("vera", UserRole::Viewer);
        assert!(viewer.may_read("bob") && !viewer.may_change("vera"));
        let admin = caller("root", UserRole::Admin);
        assert!(admin.may_read("bob") && admin.may_change("bob"));
        assert!(viewer.require(UserRole::User, "submit").is_err());
        assert!(alice.require(UserRole::User, "submit").is_ok());
    }

    #[test]
    fn stored_tokens_authenticate_until_revoked() {
        let admin = Token::generate();
        let auth = Authenticator::new(Transport::Insecure, Some(admin.clone()));
        let token = Token::generate();
        let mut record = TokenRecord {
            id: token.id.clone(),
            name: "alice".into(),
            role: UserRole::User,
            secret_sha256: token.secret_hash(),
            created_unix_ms: 1,
            created_by: "admin".into(),
            revoked_unix_ms: None,
        };
        auth.load_tokens(vec![record.clone()]);
        assert_eq!(
            auth.caller(&token).unwrap(),
            caller("alice", UserRole::User)
        );
        assert_eq!(
            auth.caller(&admin).unwrap(),
            caller(BOOTSTRAP_ADMIN, UserRole::Admin)
        );
        // The right id with another secret is as unknown as a stranger's.
        let forged = Token::parse(&format!("rlt_{}_{}", token.id, "0".repeat(64))).unwrap();
        for stranger in [forged, Token::generate()] {
            let status = auth.caller(&stranger).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(status.message().contains("unknown token"), "{status:?}");
        }
        record.revoked_unix_ms = Some(2);
        auth.load_tokens(vec![record]);
        let status = auth.caller(&token).unwrap_err();
        assert!(status.message().contains("revoked"), "{status:?}");

        let mut metadata = MetadataMap::new();
        metadata.insert(
            "authorization",
            format!("Bearer {}", token.reveal()).parse().unwrap(),
        );
        assert_eq!(bearer_token(&metadata).unwrap(), token);
        assert!(bearer_token(&MetadataMap::new()).is_err());
    }

    #[test]
    fn token_names_are_bounded_plain_text() {
        assert!(validate_token_name("alice@lab-1").is_ok());
        assert!(validate_token_name("").is_err());
        assert!(validate_token_name("a b").is_err());
        assert!(validate_token_name(&"x".repeat(65)).is_err());
    }
}
