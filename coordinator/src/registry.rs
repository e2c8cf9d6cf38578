//! The leader's view of its workers: a pure state machine fed with
//! registrations, heartbeats, disconnects and the current time.
//!
//! Membership is soft state: workers re-register with every new leader, so
//! nothing here is written to etcd.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ringleader_proto::coordinator::{
    AttemptRef, CoordinatorMessage, Register, WorkerInfo, WorkerState,
};
use tokio::sync::mpsc;

/// The leader's half of a worker's attach stream.
pub type Outbound = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

/// Identifies one attach stream, so a stale stream closing cannot mark a
/// worker lost after it has re-registered on a new stream.
pub type ConnectionId = u64;

#[derive(Debug)]
struct Entry {
    registration: Register,
    state: WorkerState,
    connection: ConnectionId,
    last_heartbeat: Instant,
    registered_at: SystemTime,
    outbound: Option<Outbound>,
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

/// Workers known to this leader.
#[derive(Debug)]
pub struct WorkerRegistry {
    workers: BTreeMap<String, Entry>,
    lost_after: Duration,
    next_connection: ConnectionId,
}

impl WorkerRegistry {
    /// `lost_after`: silence after which a worker counts as lost.
    pub fn new(lost_after: Duration) -> Self {
        Self {
            workers: BTreeMap::new(),
            lost_after,
            next_connection: 1,
        }
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
        self.workers.insert(
            registration.worker_id.clone(),
            Entry {
                registration,
                state: WorkerState::Idle,
                connection,
                last_heartbeat: now,
                registered_at: SystemTime::now(),
                outbound: None,
                running: None,
                draining: false,
            },
        );
        Ok(connection)
    }

    /// Whether `connection` is the worker's current attach stream (a
    /// superseded stream must not speak for the worker any more).
    pub fn is_current(&self, worker_id: &str, connection: ConnectionId) -> bool {
        self.workers
            .get(worker_id)
            .is_some_and(|e| e.connection == connection)
    }

    /// Where to send this connection's assignments.
    pub fn set_outbound(&mut self, worker_id: &str, connection: ConnectionId, outbound: Outbound) {
        if let Some(entry) = self.current(worker_id, connection) {
            entry.outbound = Some(outbound);
        }
    }

    pub fn outbound(&self, worker_id: &str) -> Option<Outbound> {
        self.workers.get(worker_id).and_then(|e| e.outbound.clone())
    }

    /// Connected workers with nothing to run, in id order, with the
    /// number of GPUs each has (detected, or declared with `--gpus`).
    pub fn idle(&self) -> Vec<(String, usize)> {
        self.workers
            .iter()
            .filter(|(_, e)| {
                e.state == WorkerState::Idle
                    && e.running.is_none()
                    && e.outbound.is_some()
                    && !e.draining
            })
            .map(|(id, e)| {
                let gpus = e
                    .registration
                    .resources
                    .as_ref()
                    .map_or(0, |r| r.gpus.len());
                (id.clone(), gpus)
            })
            .collect()
    }

    /// Workers that are not lost.
    pub fn alive(&self) -> usize {
        self.workers
            .values()
            .filter(|e| e.state != WorkerState::Lost)
            .count()
    }

    pub fn assign(&mut self, worker_id: &str, attempt: AttemptRef) {
        if let Some(entry) = self.workers.get_mut(worker_id) {
            entry.running = Some(attempt);
        }
    }

    /// The worker is leaving (graceful shutdown): no new work until it
    /// registers again.
    pub fn drain(&mut self, worker_id: &str) {
        if let Some(entry) = self.workers.get_mut(worker_id) {
            entry.draining = true;
        }
    }

    /// Frees the worker if it runs `attempt`; returns whether it did.
    pub fn release(&mut self, worker_id: &str, attempt: &AttemptRef) -> bool {
        match self.workers.get_mut(worker_id) {
            Some(entry) if entry.running.as_ref() == Some(attempt) => {
                entry.running = None;
                true
            }
            _ => false,
        }
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
        if let Some(entry) = self.current(worker_id, connection) {
            entry.last_heartbeat = now;
            if entry.state == WorkerState::Lost {
                entry.state = WorkerState::Idle;
            }
        }
    }

    /// The worker's stream ended: it is lost unless it already re-attached.
    pub fn disconnected(&mut self, worker_id: &str, connection: ConnectionId) -> bool {
        match self.current(worker_id, connection) {
            Some(entry) if entry.state != WorkerState::Lost => {
                entry.state = WorkerState::Lost;
                entry.outbound = None;
                true
            }
            _ => false,
        }
    }

    /// Marks workers silent for longer than `lost_after`; returns their ids.
    pub fn sweep(&mut self, now: Instant) -> Vec<String> {
        let mut lost = Vec::new();
        for (id, entry) in &mut self.workers {
            if entry.state != WorkerState::Lost
                && now.saturating_duration_since(entry.last_heartbeat) > self.lost_after
            {
                entry.state = WorkerState::Lost;
                lost.push(id.clone());
            }
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
                registered_at_unix_ms: e
                    .registered_at
                    .duration_since(UNIX_EPOCH)
                    .map(millis)
                    .unwrap_or_default(),
            })
            .collect()
    }

    fn current(&mut self, worker_id: &str, connection: ConnectionId) -> Option<&mut Entry> {
        self.workers
            .get_mut(worker_id)
            .filter(|e| e.connection == connection)
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
        let c = r.register(reg("w1"), t0).unwrap();
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
        let old = r.register(reg("w1"), t0).unwrap();
        assert!(r.disconnected("w1", old));
        let new = r.register(reg("w1"), t0).unwrap();
        assert!(!r.disconnected("w1", old));
        assert_eq!(state(&r, "w1", t0), WorkerState::Idle);
        assert!(r.disconnected("w1", new));
        assert_eq!(state(&r, "w1", t0), WorkerState::Lost);
    }

    #[test]
    fn snapshot_lists_workers_in_id_order() {
        let t0 = Instant::now();
        let mut r = WorkerRegistry::new(Duration::from_secs(5));
        r.register(reg("b"), t0).unwrap();
        r.register(reg("a"), t0).unwrap();
        let ids: Vec<_> = r.snapshot(t0).into_iter().map(|w| w.worker_id).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn a_live_workers_id_is_refused_until_that_worker_is_gone() {
        let t0 = Instant::now();
        let mut r = WorkerRegistry::new(Duration::from_secs(5));
        let first = r.register(reg("w1"), t0).unwrap();
        let refused = r.register(reg("w1"), t0).unwrap_err();
        assert_eq!(refused.worker_id, "w1");
        assert!(
            r.is_current("w1", first),
            "the live worker keeps its stream"
        );
        // Silent past the timeout: the id is free, the old stream is not current.
        assert_eq!(r.sweep(t0 + Duration::from_secs(6)), ["w1"]);
        let second = r.register(reg("w1"), t0 + Duration::from_secs(6)).unwrap();
        assert!(!r.is_current("w1", first));
        assert!(r.is_current("w1", second));
        // The stale stream's heartbeat does not revive anything.
        r.heartbeat("w1", first, t0 + Duration::from_secs(7));
        assert!(r.register(reg("w1"), t0).is_err(), "second is alive");
    }
}
