//! Fenced writes: the only way the leader changes etcd.
//!
//! Every write is a transaction guarded by "my election key still exists with
//! the create revision I won with". A coordinator that lost its lease (even
//! one paused long enough not to notice) fails that compare, so its write is
//! rejected by etcd itself rather than by a check in our process.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::election::LeaderTerm;
use crate::error::{Error, Result};
use crate::etcd::Etcd;

/// Root of all durable Ringleader state in etcd.
pub const STATE_PREFIX: &str = "/ringleader/";

/// The leadership counter: bumped by every new leader (fenced), so each
/// term has a number that later protocols can stamp on their messages.
pub const TERM_KEY: &str = "/ringleader/cluster/term";

/// Writes to etcd on behalf of one leadership term.
#[derive(Clone)]
pub struct FencedStore {
    etcd: Etcd,
    fence_key: Vec<u8>,
    create_revision: i64,
}

impl FencedStore {
    pub fn new(etcd: Etcd, term: &LeaderTerm) -> Self {
        Self {
            etcd,
            fence_key: term.key.clone(),
            create_revision: term.create_revision,
        }
    }

    /// Applies `ops` atomically if, and only if, this term is still current
    /// and every extra `conditions` holds. `Ok(false)` means a condition
    /// other than the fence failed.
    pub async fn txn_if(&self, conditions: Vec<Compare>, ops: Vec<TxnOp>) -> Result<bool> {
        let fence = Compare::create_revision(
            self.fence_key.clone(),
            CompareOp::Equal,
            self.create_revision,
        );
        let fence_key = self.fence_key.clone();
        let revision = self.create_revision;
        // On failure, read the fence key back so we can tell whether the fence
        // or one of the caller's conditions failed.
        let check = TxnOp::get(fence_key.clone(), None);
        let mut all = vec![fence];
        all.extend(conditions);
        let txn = Txn::new().when(all).and_then(ops).or_else(vec![check]);
        let response: TxnResponse = self
            .etcd
            .call("write (fenced)", |mut c| async move { c.txn(txn).await })
            .await?;
        if response.succeeded() {
            return Ok(true);
        }
        let fence_holds = response.op_responses().into_iter().any(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => {
                get.kvs().iter().any(|kv| kv.create_revision() == revision)
            }
            _ => false,
        });
        if fence_holds {
            Ok(false)
        } else {
            Err(Error::FencedOut {
                key: String::from_utf8_lossy(&fence_key).into_owned(),
                revision,
            })
        }
    }

    /// Puts one key, fenced.
    pub async fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Result<()> {
        self.txn_if(vec![], vec![TxnOp::put(key, value, None)])
            .await
            .map(|_| ())
    }

    /// Starts a new leadership term: increments [`TERM_KEY`] with a
    /// compare-and-swap (fenced) and returns the new number.
    pub async fn begin_term(&self) -> Result<u64> {
        loop {
            let current = self
                .etcd
                .call("read the term", |mut c| async move {
                    c.get(TERM_KEY, None).await
                })
                .await?;
            let (term, mod_revision) = match current.kvs().first() {
                Some(kv) => {
                    let text = String::from_utf8_lossy(kv.value());
                    let term = text.trim().parse::<u64>().map_err(|_| {
                        Error::InvalidArgument(format!("{TERM_KEY} holds {text:?}, not a number"))
                    })?;
                    (term, kv.mod_revision())
                }
                None => (0, 0),
            };
            let next = term + 1;
            let unchanged = Compare::mod_revision(TERM_KEY, CompareOp::Equal, mod_revision);
            let put = TxnOp::put(TERM_KEY, next.to_string(), None);
            if self.txn_if(vec![unchanged], vec![put]).await? {
                return Ok(next);
            }
        }
    }
}

/// Most operations etcd accepts in one transaction (its `--max-txn-ops`
/// default is 128).
const MAX_TXN_OPS: usize = 128;

struct QueuedWrites {
    puts: Vec<(String, String)>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Group commit for the leader's state: writes queued from anywhere are
/// committed in queue order, many per fenced transaction, so throughput
/// does not stop at one etcd round trip per change. While etcd is down the
/// writes wait (and retry); a fenced-out term fails them all.
#[derive(Clone)]
pub struct StateWriter {
    queue: mpsc::UnboundedSender<QueuedWrites>,
}

impl StateWriter {
    /// Starts the writer for one term; it stops when `term` is cancelled.
    pub fn spawn(store: FencedStore, term: CancellationToken) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(commit_loop(store, term, rx));
        Self { queue }
    }

    /// Queues `puts` (key, JSON); the receiver answers once they are
    /// durable, or with why they never will be.
    pub fn enqueue(&self, puts: Vec<(String, String)>) -> oneshot::Receiver<Result<(), String>> {
        let (done, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(rejected)) = self.queue.send(QueuedWrites { puts, done })
        {
            let _ = rejected
                .done
                .send(Err("this coordinator's term has ended".into()));
        }
        answer
    }

    /// Answers once every write queued before this call is durable (writes
    /// commit in queue order).
    pub fn flushed(&self) -> oneshot::Receiver<Result<(), String>> {
        self.enqueue(Vec::new())
    }
}

async fn commit_loop(
    store: FencedStore,
    term: CancellationToken,
    mut queue: mpsc::UnboundedReceiver<QueuedWrites>,
) {
    loop {
        let first = tokio::select! {
            _ = term.cancelled() => return,
            next = queue.recv() => match next { Some(w) => w, None => return },
        };
        let mut batch = vec![first];
        while let Ok(more) = queue.try_recv() {
            batch.push(more);
        }
        // Last write wins per key; the order of first appearance is kept.
        let mut order: Vec<String> = Vec::new();
        let mut latest: std::collections::HashMap<String, String> = Default::default();
        for (key, value) in batch.iter().flat_map(|w| w.puts.iter()) {
            if latest.insert(key.clone(), value.clone()).is_none() {
                order.push(key.clone());
            }
        }
        let mut result = Ok(());
        for keys in order.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = keys
                .iter()
                .map(|k| TxnOp::put(k.as_str(), latest[k].as_str(), None))
                .collect();
            if let Err(reason) = commit_with_retry(&store, &term, ops).await {
                result = Err(reason);
                break;
            }
        }
        for w in batch {
            let _ = w.done.send(result.clone());
        }
        if result.is_err() {
            return;
        }
    }
}

/// Retries transient failures (etcd down) until the term ends.
async fn commit_with_retry(
    store: &FencedStore,
    term: &CancellationToken,
    ops: Vec<TxnOp>,
) -> Result<(), String> {
    let mut delay = Duration::from_millis(100);
    loop {
        match store.txn_if(vec![], ops.clone()).await {
            Ok(_) => return Ok(()),
            Err(error @ Error::FencedOut { .. }) => return Err(error.to_string()),
            Err(error) => {
                warn!(%error, retry_in = ?delay, "state write failed; retrying");
                tokio::select! {
                    _ = term.cancelled() => return Err("this coordinator's term has ended".into()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
