//! Prometheus metrics (OpenMetrics text at `/metrics`, docs/METRICS.md).
//!
//! Counts of trials, sweeps and workers are read off the leader's state
//! when scraped, so they always agree with what `sweep results` and
//! `cluster status` show; latencies and term changes are recorded as
//! they happen. Workers serve their own registry the same way
//! (`ringleader_client::metrics::serve_registry`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use ringleader_client::metrics::encode_registry;
use ringleader_proto::coordinator::WorkerState;

use crate::election::Role;
use crate::service::CoordinatorState;
use crate::sweep::records::{wire_name, SweepState, TrialState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// A coordinator's metrics.
pub struct CoordinatorMetrics {
    registry: Registry,
    trials: Family<StateLabel, Gauge>,
    attempts: Family<OutcomeLabel, Gauge>,
    sweeps: Family<StateLabel, Gauge>,
    workers: Family<StateLabel, Gauge>,
    queued_trials: Gauge,
    is_leader: Gauge,
    term_revision: Gauge,
    /// Terms this coordinator has won: summed over coordinators, one more
    /// than the failovers.
    pub terms_won: Counter,
    /// Time of each fenced etcd transaction the leader commits.
    pub etcd_commit_seconds: Histogram,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ringleader");
        let metrics = Self {
            trials: Family::default(),
            attempts: Family::default(),
            sweeps: Family::default(),
            workers: Family::default(),
            queued_trials: Gauge::default(),
            is_leader: Gauge::default(),
            term_revision: Gauge::default(),
            terms_won: Counter::default(),
            // 0.5 ms to ~4 s.
            etcd_commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            registry: Registry::default(),
        };
        registry.register(
            "trials",
            "Trials by state, over the sweeps the leader knows (finished sweeps as they ended)",
            metrics.trials.clone(),
        );
        registry.register(
            "attempts",
            "Attempts by outcome (\"running\" while live), as for trials",
            metrics.attempts.clone(),
        );
        registry.register("sweeps", "Sweeps and jobs by state", metrics.sweeps.clone());
        registry.register(
            "workers",
            "Registered workers by state",
            metrics.workers.clone(),
        );
        registry.register(
            "scheduler_queued_trials",
            "Trials of running sweeps waiting for workers",
            metrics.queued_trials.clone(),
        );
        registry.register(
            "is_leader",
            "1 while this coordinator leads",
            metrics.is_leader.clone(),
        );
        registry.register(
            "leader_term_revision",
            "etcd create revision of this coordinator's current term (0 when standby)",
            metrics.term_revision.clone(),
        );
        registry.register(
            "leader_terms_won",
            "Leadership terms this coordinator has won",
            metrics.terms_won.clone(),
        );
        registry.register(
            "etcd_commit_seconds",
            "Time of each fenced etcd transaction the leader commits",
            metrics.etcd_commit_seconds.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }
}

impl CoordinatorMetrics {
    /// Reads the state's counts into the gauges and encodes everything.
    pub fn render(&self, state: &CoordinatorState) -> String {
        let term = match &*state.role.borrow() {
            Role::Leader(term) => Some(term.create_revision),
            Role::Candidate => None,
        };
        self.is_leader.set(i64::from(term.is_some()));
        self.term_revision.set(term.unwrap_or(0));
        for family in [&self.trials, &self.sweeps, &self.workers] {
            family.clear();
        }
        self.attempts.clear();
        let (sweeps, workers) = {
            let scheduler = state.scheduler();
            let workers = scheduler.workers(std::time::Instant::now());
            (scheduler.list(), workers)
        };
        let mut queued = 0;
        for sweep in &sweeps {
            self.sweeps
                .get_or_create(&StateLabel {
                    state: wire_name(sweep.state),
                })
                .inc();
            let Some(summary) = &sweep.summary else {
                continue;
            };
            for (trial_state, count) in &summary.trials {
                let count = i64::try_from(*count).unwrap_or(i64::MAX);
                self.trials
                    .get_or_create(&StateLabel {
                        state: wire_name(trial_state),
                    })
                    .inc_by(count);
                if sweep.state == SweepState::Running && *trial_state == TrialState::Pending {
                    queued += count;
                }
            }
            for (outcome, count) in &summary.attempts {
                self.attempts
                    .get_or_create(&OutcomeLabel {
                        outcome: outcome.clone(),
                    })
                    .inc_by(i64::try_from(*count).unwrap_or(i64::MAX));
            }
        }
        self.queued_trials.set(queued);
        for worker in &workers {
            let state = match WorkerState::try_from(worker.state).unwrap_or_default() {
                WorkerState::Idle => "idle",
                WorkerState::Busy => "busy",
                WorkerState::Lost => "lost",
                WorkerState::Unspecified => "unknown",
            };
            self.workers
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .inc();
        }
        encode_registry(&self.registry)
    }
}
