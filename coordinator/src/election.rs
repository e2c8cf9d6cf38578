//! Leader election through etcd's election API.
//!
//! ```text
//!   grant lease (TTL) ──▶ keep-alive loop (every TTL/2, answer within TTL/3)
//!         │                         │ missed / expired
//!         ▼                         ▼
//!   campaign(ringleader/leader, advertise) ───────────────▶ lease lost ─┐
//!         │ elected                                                      │
//!         ▼                                                              │
//!   first keep-alive after the win ──▶ Role::Leader(term)                │
//!         │                                                              │
//!         ▼  lease lost, or our key deleted (watched from its create rev)│
//!   term token cancelled ──▶ Role::Candidate ──▶ revoke lease ◀──────────┘
//!         │
//!         └──▶ campaign again with a fresh lease
//! ```
//!
//! Leader duties hang off [`LeaderTerm::token`]: the moment the term ends the
//! token is cancelled and every leader-only task stops. Writes are fenced
//! separately (see [`crate::store`]), so a leader that has not yet noticed its
//! loss still cannot change etcd.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, LeaderKey, LeaseKeepAliveStream, LeaseKeeper, WatchOptions};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::etcd::Etcd;

/// The etcd election every coordinator campaigns on.
pub const ELECTION_NAME: &str = "ringleader/leader";

/// One uninterrupted stretch of leadership.
#[derive(Clone, Debug)]
pub struct LeaderTerm {
    /// Our key in the election (`ringleader/leader/<lease hex>`).
    pub key: Vec<u8>,
    /// Create revision of `key`: the fence every leader write compares on.
    pub create_revision: i64,
    pub lease: i64,
    /// Cancelled the moment this term ends.
    pub token: CancellationToken,
}

/// What this coordinator is right now.
#[derive(Clone, Debug, Default)]
pub enum Role {
    #[default]
    Candidate,
    Leader(LeaderTerm),
}

impl Role {
    pub fn term(&self) -> Option<&LeaderTerm> {
        match self {
            Role::Leader(term) => Some(term),
            Role::Candidate => None,
        }
    }
}

/// A coordinator's candidacy: campaigns, holds and gives up leadership.
pub struct Election {
    etcd: Etcd,
    advertise: String,
    ttl: Duration,
    role: watch::Sender<Role>,
}

impl Election {
    pub fn new(etcd: Etcd, advertise: String, ttl: Duration) -> Result<Self> {
        if ttl < Duration::from_secs(1) {
            return Err(Error::InvalidArgument(format!(
                "lease TTL must be at least 1s (etcd leases count whole seconds), got {ttl:?}"
            )));
        }
        Ok(Self {
            etcd,
            advertise,
            ttl,
            role: watch::Sender::new(Role::Candidate),
        })
    }

    /// Follows this coordinator's role.
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Campaigns until `shutdown` is cancelled, then resigns so that a
    /// standby takes over at once instead of waiting for the lease to expire.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.one_term(&shutdown).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(error) => {
                    warn!(%error, retry_in = ?backoff, "election round failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(self.ttl);
                }
            }
        }
    }

    /// One lease: campaign, lead while it lasts, step down.
    async fn one_term(&self, shutdown: &CancellationToken) -> Result<()> {
        let ttl_secs = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = self
            .etcd
            .call("grant a lease", |mut c| async move {
                c.lease_grant(ttl_secs, None).await
            })
            .await?
            .id();
        let (keeper, stream) = self
            .etcd
            .call("start lease keep-alive", |mut c| async move {
                c.lease_keep_alive(lease).await
            })
            .await?;
        let lease_lost = shutdown.child_token();
        let _stop_keepalive = lease_lost.clone().drop_guard();
        let (alive_tx, mut alive_rx) = watch::channel(0u64);
        let ping = Arc::new(Notify::new());
        tokio::spawn(keep_alive_loop(
            keeper,
            stream,
            self.ttl,
            lease_lost.clone(),
            alive_tx,
            ping.clone(),
        ));

        let mut client = self.etcd.client();
        let campaign = tokio::select! {
            r = client.campaign(ELECTION_NAME, self.advertise.clone(), lease) => r,
            _ = lease_lost.cancelled() => {
                self.revoke(lease).await;
                return Ok(());
            }
        };
        let leader_key = match campaign {
            Ok(mut response) => response.take_leader(),
            Err(error) => {
                self.revoke(lease).await;
                return Err(Error::Etcd {
                    endpoints: self.etcd.endpoints().to_string(),
                    error,
                });
            }
        };
        let Some(leader_key) = leader_key else {
            self.revoke(lease).await;
            return Err(Error::InvalidArgument(
                "etcd campaign returned no leader key".into(),
            ));
        };

        // Announce only once a keep-alive sent after the win succeeded: the
        // lease is then known to outlive the announcement by about one TTL.
        let seen = *alive_rx.borrow();
        ping.notify_one();
        let confirmed = tokio::time::timeout(self.ttl, async {
            alive_rx.wait_for(|n| *n > seen).await.is_ok()
        })
        .await;
        if confirmed != Ok(true) {
            warn!("won the election but could not confirm the lease; campaigning again");
            self.resign(&leader_key, lease).await;
            return Ok(());
        }

        let term = LeaderTerm {
            key: leader_key.key().to_vec(),
            create_revision: leader_key.rev(),
            lease,
            token: lease_lost.child_token(),
        };
        info!(
            advertise = %self.advertise,
            lease = format!("{lease:x}"),
            create_revision = term.create_revision,
            "became leader"
        );
        self.role.send_replace(Role::Leader(term.clone()));

        let reason = tokio::select! {
            _ = lease_lost.cancelled() => if shutdown.is_cancelled() { "shutting down" } else { "lease lost" },
            r = self.key_deleted(&term) => r,
            // The leader's duties gave the term up (its state writes kept
            // failing): step down so that a leader reloads from etcd.
            _ = term.token.cancelled() => "the term's state writes failed",
        };
        term.token.cancel();
        self.role.send_replace(Role::Candidate);
        warn!(reason, "stepped down");
        self.resign(&leader_key, lease).await;
        Ok(())
    }

    /// Resolves when our election key is deleted (or its watch breaks).
    async fn key_deleted(&self, term: &LeaderTerm) -> &'static str {
        let mut client = self.etcd.client();
        let options = WatchOptions::new().with_start_revision(term.create_revision);
        let mut events = match client.watch(term.key.clone(), Some(options)).await {
            Ok(stream) => stream,
            Err(error) => {
                warn!(%error, "cannot watch our leader key");
                return "cannot watch the leader key";
            }
        };
        loop {
            match events.message().await {
                Ok(Some(response)) => {
                    if response
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                    {
                        return "leader key deleted";
                    }
                }
                Ok(None) => return "leader key watch ended",
                Err(error) => {
                    debug!(%error, "leader key watch failed");
                    return "leader key watch failed";
                }
            }
        }
    }

    /// Best effort: give up the key and the lease so a standby need not wait
    /// for the TTL. Bounded by the etcd deadline.
    async fn resign(&self, leader_key: &LeaderKey, lease: i64) {
        let key = leader_key.clone();
        let options = etcd_client::ResignOptions::new().with_leader(key);
        if let Err(error) = self
            .etcd
            .call(
                "resign",
                |mut c| async move { c.resign(Some(options)).await },
            )
            .await
        {
            debug!(%error, "resign failed (the lease will expire instead)");
        }
        self.revoke(lease).await;
    }

    async fn revoke(&self, lease: i64) {
        if let Err(error) = self
            .etcd
            .call("revoke the lease", |mut c| async move {
                c.lease_revoke(lease).await
            })
            .await
        {
            debug!(%error, "lease revoke failed (it will expire instead)");
        }
    }
}

/// Keeps `lease` alive: one ping every TTL/2 (or on `ping`), each answered
/// within TTL/3, or the lease counts as lost and `lost` is cancelled.
///
/// The interval sets how long a dead leader's lease lingers (between TTL/2
/// and TTL after the crash): pinging more often would slow failover. Loss is
/// noticed at the latest TTL/2 + TTL/3 after the last renewal, before the
/// lease can expire at TTL.
async fn keep_alive_loop(
    mut keeper: LeaseKeeper,
    mut stream: LeaseKeepAliveStream,
    ttl: Duration,
    lost: CancellationToken,
    alive: watch::Sender<u64>,
    ping: Arc<Notify>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ttl / 2) => {}
            _ = ping.notified() => {}
            _ = lost.cancelled() => return,
        }
        let answered = tokio::time::timeout(ttl / 3, async {
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        match answered {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {
                alive.send_modify(|n| *n += 1);
            }
            Ok(Ok(Some(_))) => {
                warn!("lease expired");
                break;
            }
            Ok(Ok(None)) => {
                warn!("lease keep-alive stream closed");
                break;
            }
            Ok(Err(error)) => {
                warn!(%error, "lease keep-alive failed");
                break;
            }
            Err(_) => {
                warn!(deadline = ?(ttl / 3), "lease keep-alive unanswered");
                break;
            }
        }
    }
    lost.cancel();
}

/// One coordinator standing in the election, as etcd lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub address: String,
    pub lease: i64,
    pub create_revision: i64,
}

/// Every coordinator currently campaigning, oldest first: the first one is
/// the leader (etcd's election orders candidates by create revision).
pub async fn candidates(etcd: &Etcd) -> Result<Vec<Candidate>> {
    let prefix = format!("{ELECTION_NAME}/");
    let response = etcd
        .call("list election candidates", |mut c| async move {
            c.get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                .await
        })
        .await?;
    let mut list: Vec<Candidate> = response
        .kvs()
        .iter()
        .map(|kv| Candidate {
            address: String::from_utf8_lossy(kv.value()).into_owned(),
            lease: kv.lease(),
            create_revision: kv.create_revision(),
        })
        .collect();
    list.sort_by_key(|c| c.create_revision);
    Ok(list)
}

/// The elected leader's address, straight from etcd.
pub async fn current_leader(etcd: &Etcd) -> Result<Option<String>> {
    Ok(candidates(etcd)
        .await?
        .into_iter()
        .next()
        .map(|c| c.address))
}
