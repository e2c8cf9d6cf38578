//! Answers shared between browsers.
//!
//! One fetch at a time per key: browsers that ask while it runs wait for
//! it and share its answer, which is then reused while the caller deems it
//! fresh (refusals for [`REFUSAL_FRESH_FOR`]). Twenty tabs polling the same
//! page thus cost the leader one call, not twenty, even when their polls
//! arrive together.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::sync::Mutex as AsyncMutex;

/// Why an answer is a refusal: the HTTP status and message to send.
pub type Refusal = (StatusCode, String);

/// How long a refusal is reused (an unreachable leader is not asked again
/// by every waiting browser in turn).
pub const REFUSAL_FRESH_FOR: Duration = Duration::from_secs(1);

type Slot<T> = Arc<AsyncMutex<Option<(Instant, Result<T, Refusal>)>>>;

pub struct Memo<T> {
    slots: Mutex<HashMap<String, Slot<T>>>,
    capacity: usize,
}

impl<T: Clone> Memo<T> {
    /// Keeps at most about `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// The answer for `key`: the kept one if `fresh(answer, age)` says so,
    /// else what `fetch` returns (fetched once for all who wait).
    pub async fn get<F, Fut>(
        &self,
        key: &str,
        fresh: impl Fn(&T, Duration) -> bool,
        fetch: F,
    ) -> Result<T, Refusal>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Refusal>>,
    {
        let slot = self.slot(key);
        let mut held = slot.lock().await;
        if let Some((at, answer)) = &*held {
            let age = at.elapsed();
            let reuse = match answer {
                Ok(value) => fresh(value, age),
                Err(_) => age < REFUSAL_FRESH_FOR,
            };
            if reuse {
                return answer.clone();
            }
        }
        let answer = fetch().await;
        *held = Some((Instant::now(), answer.clone()));
        answer
    }

    fn slot(&self, key: &str) -> Slot<T> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if !slots.contains_key(key) && slots.len() >= self.capacity {
            // Forget what nobody is fetching right now.
            slots.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        slots.entry(key.to_string()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_askers_share_one_fetch_until_it_goes_stale() {
        let memo = Arc::new(Memo::<u32>::new(8));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let ask = |memo: Arc<Memo<u32>>,
                   fetches: Arc<AtomicUsize>,
                   mut gate: tokio::sync::watch::Receiver<bool>| async move {
            memo.get(
                "k",
                |_, age| age < Duration::from_secs(60),
                || async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    gate.wait_for(|open| *open).await.unwrap();
                    Ok(7)
                },
            )
            .await
        };
        let askers: Vec<_> = (0..10)
            .map(|_| tokio::spawn(ask(memo.clone(), fetches.clone(), gate.clone())))
            .collect();
        release.send(true).unwrap();
        for asker in askers {
            assert_eq!(asker.await.unwrap(), Ok(7));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // Not fresh any more: fetched again.
        let again = memo.get("k", |_, _| false, || async { Ok(8) }).await;
        assert_eq!(again, Ok(8));
    }

    #[tokio::test]
    async fn refusals_are_kept_briefly_and_keys_are_bounded() {
        let memo = Memo::<u32>::new(2);
        let refused = memo
            .get(
                "a",
                |_, _| true,
                || async { Err((StatusCode::NOT_FOUND, "no".into())) },
            )
            .await;
        assert_eq!(refused.unwrap_err().0, StatusCode::NOT_FOUND);
        let reused = memo.get("a", |_, _| true, || async { Ok(1) }).await;
        assert!(reused.is_err(), "a fresh refusal is reused");
        for key in ["b", "c", "d"] {
            memo.get(key, |_, _| true, || async { Ok(1) })
                .await
                .unwrap();
        }
        assert!(memo.slots.lock().unwrap().len() <= 2);
    }
}
