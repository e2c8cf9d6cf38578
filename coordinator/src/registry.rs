//! The leader's view of its workers: a pure state machine fed with
//! registrations, heartbeats, disconnects and the current time.
//!
//! Membership is soft state: workers re-register with every new leader, so
//! nothing here is written to etcd.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ringleader_proto::coordinator::{Register, WorkerInfo, WorkerState};

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
    pub fn register(&mut self, registration: Register, now: Instant) -> ConnectionId {
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
            },
        );
        connection
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
                state: e.state as i32,
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
            resources: None,
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
        let c = r.register(reg("w1"), t0);
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
        let old = r.register(reg("w1"), t0);
        let new = r.register(reg("w1"), t0);
        assert!(!r.disconnected("w1", old));
        assert_eq!(state(&r, "w1", t0), WorkerState::Idle);
        assert!(r.disconnected("w1", new));
        assert_eq!(state(&r, "w1", t0), WorkerState::Lost);
    }

    #[test]
    fn snapshot_lists_workers_in_id_order() {
        let t0 = Instant::now();
        let mut r = WorkerRegistry::new(Duration::from_secs(5));
        r.register(reg("b"), t0);
        r.register(reg("a"), t0);
        let ids: Vec<_> = r.snapshot(t0).into_iter().map(|w| w.worker_id).collect();
        assert_eq!(ids, ["a", "b"]);
    }
}
