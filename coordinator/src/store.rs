//! Fenced writes: the only way the leader changes etcd.
//!
//! Every write is a transaction guarded by "my election key still exists with
//! the create revision I won with". A coordinator that lost its lease (even
//! one paused long enough not to notice) fails that compare, so its write is
//! rejected by etcd itself rather than by a check in our process.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnResponse};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::election::LeaderTerm;
use crate::error::{Error, Result};
use crate::etcd::Etcd;
use crate::limits::{ETCD_MAX_RESPONSE_BYTES, ETCD_PAGE_KEYS, MAX_TRIALS};
use crate::sweep::records::{trial_key, TrialRecord, TRIALS_PREFIX};

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
    /// Where each transaction's time goes (`ringleader_etcd_commit_seconds`).
    commit_seconds: Option<Histogram>,
}

impl FencedStore {
    pub fn new(etcd: Etcd, term: &LeaderTerm) -> Self {
        Self {
            etcd,
            fence_key: term.key.clone(),
            create_revision: term.create_revision,
            commit_seconds: None,
        }
    }

    /// Records the time of every transaction in `histogram`.
    pub fn timed(self, histogram: Histogram) -> Self {
        Self {
            commit_seconds: Some(histogram),
            ..self
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
        let started = std::time::Instant::now();
        let response: TxnResponse = self
            .etcd
            .call("write (fenced)", |mut c| async move { c.txn(txn).await })
            .await?;
        if let Some(histogram) = &self.commit_seconds {
            histogram.observe(started.elapsed().as_secs_f64());
        }
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

/// How long a write etcd keeps failing transiently (unreachable, timing
/// out) is retried before the writer gives up and the term ends. The
/// election lease (a few seconds) normally ends it much sooner.
pub const TRANSIENT_RETRY_BOUND: Duration = Duration::from_secs(30);

struct QueuedWrites {
    puts: Vec<(String, String)>,
    done: oneshot::Sender<Durable>,
}

/// Why a state change was not stored, as a caller must act on it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotStored {
    /// etcd refused this change itself (too large, too many operations):
    /// sending it again cannot help. The writer has moved on.
    #[error("etcd refused the change: {0}")]
    Refused(String),
    /// This coordinator's term ended first (fenced out, etcd unreachable
    /// past the retry bound, or stepped down): a new leader reloads from
    /// etcd, and the change may be made again there.
    #[error("the leadership term ended before the change was stored: {0}")]
    TermEnded(String),
    /// This coordinator leads but has not loaded its stored state yet.
    #[error("the leader is still loading its state")]
    Loading,
}

impl From<NotStored> for tonic::Status {
    fn from(error: NotStored) -> Self {
        let message = format!("the change could not be stored: {error}");
        match error {
            // Final: a client that retried would be refused again.
            NotStored::Refused(_) => tonic::Status::resource_exhausted(message),
            NotStored::TermEnded(_) | NotStored::Loading => tonic::Status::unavailable(message),
        }
    }
}

/// What a queued change's receiver answers.
pub type Durable = Result<(), NotStored>;

/// The answer of a receiver whose writer went away without answering.
pub fn durable_or_ended(answer: Result<Durable, oneshot::error::RecvError>) -> Durable {
    answer.unwrap_or_else(|_| Err(NotStored::TermEnded("the state writer stopped".into())))
}

/// Group commit for the leader's state: writes queued from anywhere are
/// committed in queue order, many per fenced transaction, so throughput
/// does not stop at one etcd round trip per change.
///
/// Failures are told apart: a write etcd will never accept (too large,
/// too many operations) fails that one queued change, with etcd's reason,
/// and the writer moves on; a transient failure (etcd down or slow) is
/// retried with backoff for [`TRANSIENT_RETRY_BOUND`], after which every
/// waiting change fails and the term is given up (its token cancelled, so
/// the election steps down and a leader reloads from etcd); a fenced-out
/// term fails them all.
#[derive(Clone)]
pub struct StateWriter {
    queue: mpsc::UnboundedSender<QueuedWrites>,
}

impl StateWriter {
    /// Starts the writer for one term; it stops when `term` is cancelled.
    pub fn spawn(store: FencedStore, term: CancellationToken) -> Self {
        Self::spawn_with_retry_bound(store, term, TRANSIENT_RETRY_BOUND)
    }

    /// [`StateWriter::spawn`] with another bound on transient retries.
    pub fn spawn_with_retry_bound(
        store: FencedStore,
        term: CancellationToken,
        retry_bound: Duration,
    ) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(commit_loop(store, term, retry_bound, rx));
        Self { queue }
    }

    /// Queues `puts` (key, JSON); the receiver answers once they are
    /// durable, or with why they never will be.
    pub fn enqueue(&self, puts: Vec<(String, String)>) -> oneshot::Receiver<Durable> {
        let (done, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(rejected)) = self.queue.send(QueuedWrites { puts, done })
        {
            let _ = rejected.done.send(Err(NotStored::TermEnded(
                "this coordinator's term has ended".into(),
            )));
        }
        answer
    }

    /// Answers once every write queued before this call is durable (writes
    /// commit in queue order).
    pub fn flushed(&self) -> oneshot::Receiver<Durable> {
        self.enqueue(Vec::new())
    }
}

async fn commit_loop(
    store: FencedStore,
    term: CancellationToken,
    retry_bound: Duration,
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
        let puts: Vec<&(String, String)> = batch.iter().flat_map(|w| w.puts.iter()).collect();
        match commit_puts(&store, &term, retry_bound, &puts).await {
            Ok(()) => answer(batch, Ok(())),
            Err(ended @ NotStored::TermEnded(_)) => {
                error!(reason = %ended, "state writes failed; giving up this leadership term");
                term.cancel();
                answer(batch, Err(ended));
                return;
            }
            // One change etcd will never take must not sink the others
            // committed with it: commit them one by one, in queue order.
            Err(refused) if batch.len() == 1 => {
                warn!(reason = %refused, "a state change was not stored");
                answer(batch, Err(refused));
            }
            Err(_) => {
                for change in batch {
                    let puts: Vec<&(String, String)> = change.puts.iter().collect();
                    match commit_puts(&store, &term, retry_bound, &puts).await {
                        Ok(()) => answer(vec![change], Ok(())),
                        Err(ended @ NotStored::TermEnded(_)) => {
                            error!(reason = %ended, "state writes failed; giving up this leadership term");
                            term.cancel();
                            answer(vec![change], Err(ended));
                            return;
                        }
                        Err(refused) => {
                            warn!(reason = %refused, "a state change was not stored");
                            answer(vec![change], Err(refused));
                        }
                    }
                }
            }
        }
    }
}

fn answer(changes: Vec<QueuedWrites>, result: Durable) {
    for change in changes {
        let _ = change.done.send(result.clone());
    }
}

/// Commits `puts` in as few fenced transactions as etcd allows; last write
/// wins per key, in the order of first appearance.
async fn commit_puts(
    store: &FencedStore,
    term: &CancellationToken,
    retry_bound: Duration,
    puts: &[&(String, String)],
) -> Durable {
    let mut order: Vec<&str> = Vec::new();
    let mut latest: std::collections::HashMap<&str, &str> = Default::default();
    for (key, value) in puts.iter().map(|kv| (kv.0.as_str(), kv.1.as_str())) {
        if latest.insert(key, value).is_none() {
            order.push(key);
        }
    }
    for keys in order.chunks(MAX_TXN_OPS) {
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::put(*k, latest[k], None))
            .collect();
        commit_with_retry(store, term, retry_bound, ops).await?;
    }
    Ok(())
}

/// What went wrong, without etcd's address (these reasons reach clients;
/// the full error is logged).
fn cause(error: &Error) -> String {
    match error {
        Error::Etcd {
            error: etcd_client::Error::GRpcStatus(status),
            ..
        } => status.message().to_string(),
        Error::Etcd { .. } => "etcd answered with an error".into(),
        Error::EtcdTimeout { timeout, .. } => format!("no answer within {timeout:?}"),
        other => other.to_string(),
    }
}

/// Whether etcd refused the request itself (too large, too many
/// operations, bad argument), as opposed to not answering.
fn is_permanent(error: &Error) -> bool {
    use tonic::Code;
    match error {
        Error::Etcd {
            error: etcd_client::Error::GRpcStatus(status),
            ..
        } => matches!(
            status.code(),
            Code::InvalidArgument
                | Code::ResourceExhausted
                | Code::OutOfRange
                | Code::PermissionDenied
                | Code::Unauthenticated
        ),
        Error::Etcd {
            error: etcd_client::Error::InvalidArgs(_),
            ..
        } => true,
        _ => false,
    }
}

/// Retries transient failures with capped backoff, for at most
/// `retry_bound`.
async fn commit_with_retry(
    store: &FencedStore,
    term: &CancellationToken,
    retry_bound: Duration,
    ops: Vec<TxnOp>,
) -> Durable {
    let give_up_at = tokio::time::Instant::now() + retry_bound;
    let mut delay = Duration::from_millis(100);
    loop {
        match store.txn_if(vec![], ops.clone()).await {
            Ok(_) => return Ok(()),
            Err(error @ Error::FencedOut { .. }) => {
                return Err(NotStored::TermEnded(error.to_string()))
            }
            Err(error) if is_permanent(&error) => {
                warn!(%error, "etcd refused a state write");
                return Err(NotStored::Refused(cause(&error)));
            }
            Err(error) => {
                if tokio::time::Instant::now() + delay > give_up_at {
                    warn!(%error, "etcd did not take a state write in time");
                    return Err(NotStored::TermEnded(format!(
                        "etcd did not take the write within {retry_bound:?}: {}",
                        cause(&error)
                    )));
                }
                warn!(%error, retry_in = ?delay, "state write failed; retrying");
                tokio::select! {
                    _ = term.cancelled() => return Err(NotStored::TermEnded("this coordinator's term has ended".into())),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// A stored record that could not be decoded: named by its key, set aside,
/// and reported, so one bad record never keeps the rest from loading.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Unreadable {
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stored record {} is not valid: {}",
            self.key, self.reason
        )
    }
}

/// The records under a prefix that decoded, and the keys of those that
/// did not.
pub struct Loaded<T> {
    pub records: Vec<T>,
    pub unreadable: Vec<Unreadable>,
    /// The read stopped at a limit before the end of the range.
    pub more: bool,
}

/// The end of the key range holding every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// How much of a sweep's trials to read.
#[derive(Clone, Copy, Debug)]
pub struct ReadLimit {
    pub records: usize,
    /// Stop after the window that brings the values read past this.
    pub bytes: usize,
}

impl ReadLimit {
    pub const ALL: ReadLimit = ReadLimit {
        records: usize::MAX,
        bytes: usize::MAX,
    };
}

/// Range reads of one consistent snapshot: the first read fixes the
/// revision, later ones read at it, however many requests a load takes.
struct Snapshot<'a> {
    etcd: &'a Etcd,
    revision: i64,
    /// Bytes of values read so far.
    bytes: usize,
}

impl<'a> Snapshot<'a> {
    fn new(etcd: &'a Etcd) -> Self {
        Self {
            etcd,
            revision: 0,
            bytes: 0,
        }
    }

    /// Reads `[key, end)`, at most `limit` keys when given.
    async fn get(
        &mut self,
        key: Vec<u8>,
        end: Vec<u8>,
        limit: Option<i64>,
    ) -> Result<etcd_client::GetResponse> {
        let mut options = etcd_client::GetOptions::new()
            .with_range(end)
            .with_revision(self.revision);
        if let Some(limit) = limit {
            options = options.with_limit(limit);
        }
        let response = self
            .etcd
            .call("read stored state", |c| async move {
                c.kv_client()
                    .max_decoding_message_size(ETCD_MAX_RESPONSE_BYTES)
                    .get(key, Some(options))
                    .await
            })
            .await?;
        if self.revision == 0 {
            self.revision = response.header().map_or(0, |h| h.revision());
        }
        Ok(response)
    }

    /// [`Snapshot::get`], decoding every value into `loaded`.
    async fn load<T: serde::de::DeserializeOwned>(
        &mut self,
        key: Vec<u8>,
        end: Vec<u8>,
        limit: Option<i64>,
        loaded: &mut Loaded<T>,
    ) -> Result<etcd_client::GetResponse> {
        let response = self.get(key, end, limit).await?;
        for kv in response.kvs() {
            self.bytes = self.bytes.saturating_add(kv.value().len());
            decode_into(loaded, kv);
        }
        Ok(response)
    }
}

/// Every JSON record under `prefix`, in key order, read in pages of
/// [`ETCD_PAGE_KEYS`] at one revision. A record that does not decode is
/// set aside in [`Loaded::unreadable`]. (For small prefixes — the sweeps:
/// each page costs etcd 3.4 the rest of the range; see [`load_trials`].)
pub async fn load_prefix<T: serde::de::DeserializeOwned>(
    etcd: &Etcd,
    prefix: &str,
) -> Result<Loaded<T>> {
    let end = prefix_end(prefix.as_bytes());
    let mut start = prefix.as_bytes().to_vec();
    let mut snapshot = Snapshot::new(etcd);
    let mut loaded = Loaded {
        records: Vec::new(),
        unreadable: Vec::new(),
        more: false,
    };
    loop {
        let response = snapshot
            .load(start, end.clone(), Some(ETCD_PAGE_KEYS), &mut loaded)
            .await?;
        match response.kvs().last() {
            Some(last) if response.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return Ok(loaded),
        }
    }
}

/// A sweep's trial records numbered `from` and up, in order, up to
/// `limit`. Trial keys are zero-padded numbers, so each etcd request reads
/// a window of [`ETCD_PAGE_KEYS`] numbers, `[trial n, trial n+64)`, rather
/// than "the next 64 keys of the rest of the range": etcd 3.4 walks a
/// limited range's whole index before cutting it, which made reading a
/// 100,000-trial sweep page by page quadratic (a minute instead of
/// seconds). Unreadable records are set aside by key.
pub async fn load_trials(
    etcd: &Etcd,
    sweep: &str,
    from: u64,
    limit: ReadLimit,
) -> Result<Loaded<TrialRecord>> {
    let prefix = format!("{TRIALS_PREFIX}{sweep}/");
    let end_of_sweep = prefix_end(prefix.as_bytes());
    let mut next = from;
    let mut snapshot = Snapshot::new(etcd);
    let mut loaded: Loaded<TrialRecord> = Loaded {
        records: Vec::new(),
        unreadable: Vec::new(),
        more: false,
    };
    while next <= MAX_TRIALS {
        let left = limit
            .records
            .saturating_sub(loaded.records.len() + loaded.unreadable.len());
        if left == 0 || snapshot.bytes >= limit.bytes {
            loaded.more = true;
            break;
        }
        let window_end = next + (ETCD_PAGE_KEYS as u64).min(left as u64);
        let end = if window_end > MAX_TRIALS {
            end_of_sweep.clone()
        } else {
            trial_key(sweep, window_end).into_bytes()
        };
        let key = trial_key(sweep, next).into_bytes();
        let window = snapshot.load(key, end, None, &mut loaded).await?;
        if !window.kvs().is_empty() {
            next = window_end;
            continue;
        }
        // An empty window: the end, or a gap. One look past it (cheap at
        // the end, where nothing is left to walk) tells which.
        let key = trial_key(sweep, window_end).into_bytes();
        let after = snapshot.get(key, end_of_sweep.clone(), Some(1)).await?;
        let Some(kv) = after.kvs().first() else {
            break;
        };
        match std::str::from_utf8(&kv.key()[prefix.len()..])
            .ok()
            .and_then(|n| n.parse::<u64>().ok())
        {
            Some(number) if number >= window_end => next = number,
            // Not a trial number (keys that are not digits sort last):
            // named, and the read ends there.
            _ => {
                decode_into(&mut loaded, kv);
                break;
            }
        }
    }
    loaded.records.sort_by_key(|t| t.number);
    Ok(loaded)
}

fn decode_into<T: serde::de::DeserializeOwned>(loaded: &mut Loaded<T>, kv: &etcd_client::KeyValue) {
    match serde_json::from_slice(kv.value()) {
        Ok(record) => loaded.records.push(record),
        Err(e) => loaded.unreadable.push(Unreadable {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    fn status(code: tonic::Code) -> Error {
        Error::Etcd {
            endpoints: "127.0.0.1:2379".into(),
            error: etcd_client::Error::GRpcStatus(tonic::Status::new(code, "x")),
        }
    }

    #[test]
    fn refusals_are_permanent_and_outages_transient() {
        assert!(is_permanent(&status(tonic::Code::InvalidArgument)));
        assert!(is_permanent(&status(tonic::Code::ResourceExhausted)));
        assert!(!is_permanent(&status(tonic::Code::Unavailable)));
        assert!(!is_permanent(&status(tonic::Code::DeadlineExceeded)));
        assert!(!is_permanent(&Error::EtcdTimeout {
            endpoints: "127.0.0.1:2379".into(),
            what: "write",
            timeout: Duration::from_secs(1),
        }));
    }
}
