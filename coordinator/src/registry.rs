//! The leader's view of its workers: a pure state machine fed with
//! registrations, heartbeats, disconnects and the current time. It holds
//! no channel and reads no clock: messages are addressed by worker id and
//! connection, and the effect runner delivers them.
//!
//! Membership is soft state: workers re-register with every new leader, so
//! nothing here is written to etcd.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ringleader_proto::coordinator::{AttemptRef, Register, WorkerInfo, WorkerState};

/// Identifies one attach stream, so a stale stream closing cannot mark a
/// worker lost after it has re-registered on a new stream.
pub type ConnectionId = u64;

#[derive(Debug)]
struct Entry {
    registration: Register,
    state: WorkerState,
    connection: ConnectionId,
    last_heartbeat: Instant,
    registered_unix_ms: u64,
    /// Its attach stream is open (messages can reach it).
    attached: bool,
    /// The attempt the worker runs for us.
    running: Option<AttemptRef>,
    /// The worker is shutting down: it gets no new work.
    draining: bool,
}

/// A registration for an id whose worker is still alive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker id {worker_id} is taken by a live worker on host {host}; an id is free again once its worker disconnects or misses heartbeats")]
pub struct DuplicateWorker {
    pub worker_id: String,
    pub host: String,
}

impl Entry {
    fn is_idle(&self) -> bool {
        self.state == WorkerState::Idle && self.running.is_none() && self.attached && !self.draining
    }

    fn gpus(&self) -> usize {
        self.registration
            .resources
            .as_ref()
            .map_or(0, |r| r.gpus.len())
    }
}

/// Where a message for a worker goes: its id and the attach stream it was
/// decided for (a message for a superseded stream is not delivered).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    pub worker: String,
    pub connection: ConnectionId,
}

/// Workers known to this leader.
#[derive(Debug)]
pub struct WorkerRegistry {
    workers: BTreeMap<String, Entry>,
    lost_after: Duration,
    next_connection: ConnectionId,
    /// Ids of idle workers (see [`WorkerRegistry::idle`]), kept as entries
    /// change so that placement does not walk every worker per event.
    idle: BTreeSet<String>,
    /// Workers that are not lost.
    alive: usize,
}

impl WorkerRegistry {
    /// `lost_after`: silence after which a worker counts as lost.
    pub fn new(lost_after: Duration) -> Self {
        Self {
            workers: BTreeMap::new(),
            lost_after,
            next_connection: 1,
            idle: BTreeSet::new(),
            alive: 0,
        }
    }

    /// Runs `change` on a worker's entry and keeps the indexes in step.
    fn change<T>(&mut self, worker_id: &str, change: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        let entry = self.workers.get_mut(worker_id)?;
        let was_alive = entry.state != WorkerState::Lost;
        let value = change(entry);
        let alive = entry.state != WorkerState::Lost;
        let idle = entry.is_idle();
        self.alive = self.alive + usize::from(alive) - usize::from(was_alive);
        if idle {
            self.idle.insert(worker_id.to_string());
        } else {
            self.idle.remove(worker_id);
        }
        Some(value)
    }

    /// Records a (re-)registration and returns the id of its connection.
    /// An id whose worker is alive (connected and heartbeating) is
    /// refused: a second process with the same id, by mistake or not,
    /// cannot push the real worker out. The real one always gets back in:
    /// once its old stream ends, or falls silent for `lost_after`, the id
    /// is free again.
    pub fn register(
        &mut self,
        registration: Register,
        now: Instant,
        now_unix_ms: u64,
    ) -> Result<ConnectionId, DuplicateWorker> {
        if let Some(existing) = self.workers.get(&registration.worker_id) {
            if existing.state != WorkerState::Lost {
                return Err(DuplicateWorker {
                    worker_id: registration.worker_id,
                    host: existing.registration.host.clone(),
                });
            }
        }
        let connection = self.next_connection;
        self.next_connection += 1;
        let id = registration.worker_id.clone();
        // A lost entry being replaced counts as not alive; the new one is.
        let replaced = self.workers.insert(
            id.clone(),
            Entry {
                registration,
                state: WorkerState::Lost,
                connection,
                last_heartbeat: now,
                registered_unix_ms: now_unix_ms,
                attached: true,
                running: None,
                draining: false,
            },
        );
        debug_assert!(replaced.is_none_or(|e| e.state == WorkerState::Lost));
        self.change(&id, |e| e.state = WorkerState::Idle);
        Ok(connection)
    }

    /// Whether `connection` is the worker's current attach stream (a
    /// superseded stream must not speak for the worker any more).
    pub fn is_current(&self, worker_id: &str, connection: ConnectionId) -> bool {
        self.workers
            .get(worker_id)
            .is_some_and(|e| e.connection == connection)
    }

    /// Where a message to the worker goes, while its stream is open.
    pub fn address(&self, worker_id: &str) -> Option<Address> {
        self.workers
            .get(worker_id)
            .filter(|e| e.attached)
            .map(|e| Address {
                worker: worker_id.to_string(),
                connection: e.connection,
            })
    }

    /// Connected workers with nothing to run, in id order.
    pub fn idle(&self) -> impl Iterator<Item = &str> {
        self.idle.iter().map(String::as_str)
    }

    /// How many GPUs the worker has (detected, or declared with `--gpus`).
    pub fn gpus(&self, worker_id: &str) -> usize {
        self.workers.get(worker_id).map_or(0, Entry::gpus)
    }

    /// Workers that are not lost.
    pub fn alive(&self) -> usize {
        self.alive
    }

    pub fn assign(&mut self, worker_id: &str, attempt: AttemptRef) {
        self.change(worker_id, |e| e.running = Some(attempt));
    }

    /// The worker is leaving (graceful shutdown): no new work until it
    /// registers again.
    pub fn drain(&mut self, worker_id: &str) {
        self.change(worker_id, |e| e.draining = true);
    }

    /// Frees the worker if it runs `attempt`; returns whether it did.
    pub fn release(&mut self, worker_id: &str, attempt: &AttemptRef) -> bool {
        self.change(worker_id, |e| {
            let runs_it = e.running.as_ref() == Some(attempt);
            if runs_it {
                e.running = None;
            }
            runs_it
        })
        .unwrap_or(false)
    }

    /// What `worker_id` registered (its peer addresses among it).
    pub fn registration(&self, worker_id: &str) -> Option<&Register> {
        self.workers.get(worker_id).map(|e| &e.registration)
    }

    /// The attempt `worker_id` runs, if any.
    pub fn running(&self, worker_id: &str) -> Option<&AttemptRef> {
        self.workers.get(worker_id).and_then(|e| e.running.as_ref())
    }

    /// Whether the worker is registered and not lost.
    pub fn is_alive(&self, worker_id: &str) -> bool {
        self.workers
            .get(worker_id)
            .is_some_and(|e| e.state != WorkerState::Lost)
    }

    /// A heartbeat on `connection`; ignored if that connection is stale.
    pub fn heartbeat(&mut self, worker_id: &str, connection: ConnectionId, now: Instant) {
        if self.is_current(worker_id, connection) {
            self.change(worker_id, |e| {
                e.last_heartbeat = now;
                if e.state == WorkerState::Lost {
                    e.state = WorkerState::Idle;
                }
            });
        }
    }

    /// The worker's stream ended: it is lost unless it already re-attached.
    pub fn disconnected(&mut self, worker_id: &str, connection: ConnectionId) -> bool {
        if !self.is_current(worker_id, connection) {
            return false;
        }
        self.change(worker_id, |e| {
            e.attached = false;
            let was_alive = e.state != WorkerState::Lost;
            e.state = WorkerState::Lost;
            was_alive
        })
        .unwrap_or(false)
    }

    /// Marks workers silent for longer than `lost_after`; returns their ids.
    pub fn sweep(&mut self, now: Instant) -> Vec<String> {
        let lost: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, e)| {
                e.state != WorkerState::Lost
                    && now.saturating_duration_since(e.last_heartbeat) > self.lost_after
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &lost {
            self.change(id, |e| e.state = WorkerState::Lost);
        }
        lost
    }

    /// Workers in id order, for status.
    pub fn snapshot(&self, now: Instant) -> Vec<WorkerInfo> {
        self.workers
            .iter()
            .map(|(id, e)| WorkerInfo {
                worker_id: id.clone(),
                host: e.registration.host.clone(),
                peer_address: e.registration.peer_address.clone(),
                resources: e.registration.resources.clone(),
                state: match (&e.running, e.state) {
                    (Some(_), WorkerState::Idle) => WorkerState::Busy as i32,
                    (_, state) => state as i32,
                },
                running: e.running.clone(),
                last_heartbeat_ms_ago: millis(now.saturating_duration_since(e.last_heartbeat)),
                registered_at_unix_ms: e.registered_unix_ms,
            })
            .collect()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str) -> Register {
        Register {
            worker_id: id.into(),
            host: "h".into(),
            peer_address: "127.0.0.1:1".into(),
            ..Register::default()
        }
    }

    fn state(r: &WorkerRegistry, id: &str, now: Instant) -> WorkerState {
        let info = r.snapshot(now).into_iter().find(|w| w.worker_id == id);
        WorkerState::try_from(info.map(|w| w.state).unwrap_or_default()).unwrap_or_default()
    }

    #[test]
    fn silent_worker_is_lost_after_the_timeout_and_revives_on_heartbeat() {
        let t0 = Instant::now();
        let mut r = WorkerRegistry::new(Duration::from_secs(5));
        let c = r.register(reg("w1"), t0, 0).unwrap();
        assert!(r.sweep(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(
            r.sweep(t0 + Duration::from_millis(5001)),
            vec!["w1".to_string()]
        );
        assert_eq!(state(&r, "w1", t0), WorkerState::Lost);
        r.heartbeat("w1", c, t0 + Duration::from_secs(6));
        assert_eq!(state(&r, "w1", t0), WorkerState::Idle);
    }

    #[test]
    fn stale_connection_cannot_mark_a_reattached_worker_lost() {
        let t0 = Instant::now();
        let mut r = WorkerRegistry::new(Duration::from_secs(5));
        let old = r.register(reg("w1"), t0, 0).unwrap();
        assert!(r.disconnected("w1", old));
        let new = r.register(reg("w1"), t0, 0).unwrap();
        assert!(!r.disconnected("w1", old));
        assert_eq!(state(&r, "w1", t0), WorkerState::Idle);
        assert!(r.disconnected("w1", new));
        assert_eq!(state(&r, "w1", t0), WorkerState::Lost);
    }

    #[test]
    fn snapshot_lists_workers_in_id_order() {
        let t0 = Instant::now();
        let mut r = WorkerRegistry::new(Duration::from_secs(5));
        r.register(reg("b"), t0, 0).unwrap();
        r.register(reg("a"), t0, 0).unwrap();
        let ids: Vec<_> = r.snapshot(t0).into_iter().map(|w| w.worker_id).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn a_live_workers_id_is_refused_until_that_worker_is_gone() {
        let t0 = Instant::now();
        let mut r = WorkerRegistry::new(Duration::from_secs(5));
        let first = r.register(reg("w1"), t0, 0).unwrap();
        let refused = r.register(reg("w1"), t0, 0).unwrap_err();
        assert_eq!(refused.worker_id, "w1");
        assert!(
            r.is_current("w1", first),
            "the live worker keeps its stream"
        );
        // Silent past the timeout: the id is free, the old stream is not current.
        assert_eq!(r.sweep(t0 + Duration::from_secs(6)), ["w1"]);
        let second = r
            .register(reg("w1"), t0 + Duration::from_secs(6), 0)
            .unwrap();
        assert!(!r.is_current("w1", first));
        assert!(r.is_current("w1", second));
        // The stale stream's heartbeat does not revive anything.
        r.heartbeat("w1", first, t0 + Duration::from_secs(7));
        assert!(r.register(reg("w1"), t0, 0).is_err(), "second is alive");
    }
}
