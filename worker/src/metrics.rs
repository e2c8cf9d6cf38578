//! The worker's Prometheus metrics (docs/METRICS.md), one set per process.
//!
//! Training runs on its own thread deep below the agent, so the metrics
//! are process-wide: whoever measures something records it here, and the
//! `/metrics` server reads it when scraped. The ring's totals come from
//! [`ringleader_collective::stats`].

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use ringleader_client::metrics::encode_registry;
use ringleader_collective::stats::all_reduce_totals;

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

pub struct WorkerMetrics {
    registry: Registry,
    samples_per_second: FloatGauge,
    step_seconds: FloatGauge,
    epoch_seconds: Histogram,
    epochs: Counter,
    checkpoint_seconds: Histogram,
    all_reduces: Counter,
    all_reduce_bus_bytes: Counter,
    all_reduce_seconds: FloatCounter,
    heartbeat_age_seconds: FloatGauge,
    last_heard: Mutex<Option<Instant>>,
}

static METRICS: LazyLock<WorkerMetrics> = LazyLock::new(WorkerMetrics::new);

/// This process's metrics.
pub fn worker() -> &'static WorkerMetrics {
    &METRICS
}

impl WorkerMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("ringleader_worker");
        let metrics = Self {
            registry: Registry::default(),
            samples_per_second: FloatGauge::default(),
            step_seconds: FloatGauge::default(),
            // 0.1 s to ~30 min.
            epoch_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 15)),
            epochs: Counter::default(),
            // 1 ms to ~30 s.
            checkpoint_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            all_reduces: Counter::default(),
            all_reduce_bus_bytes: Counter::default(),
            all_reduce_seconds: FloatCounter::default(),
            heartbeat_age_seconds: FloatGauge::default(),
            last_heard: Mutex::new(None),
        };
        let r = &mut registry;
        r.register(
            "samples_per_second",
            "Training samples per second over the last epoch (all ranks)",
            metrics.samples_per_second.clone(),
        );
        r.register(
            "step_seconds",
            "Mean time of one optimizer step over the last epoch",
            metrics.step_seconds.clone(),
        );
        r.register(
            "epoch_seconds",
            "Time of each epoch, evaluation included",
            metrics.epoch_seconds.clone(),
        );
        r.register(
            "epochs",
            "Epochs this worker trained",
            metrics.epochs.clone(),
        );
        r.register(
            "checkpoint_seconds",
            "Time to write each checkpoint (rank 0)",
            metrics.checkpoint_seconds.clone(),
        );
        r.register(
            "all_reduces",
            "Ring all-reduces taken part in",
            metrics.all_reduces.clone(),
        );
        r.register("all_reduce_bus_bytes", "Bus bytes of those all-reduces (2(n-1)/n of each buffer): divide by all_reduce_seconds for the bus bandwidth", metrics.all_reduce_bus_bytes.clone());
        r.register(
            "all_reduce_seconds",
            "Time spent in all-reduces: training waiting on the ring",
            metrics.all_reduce_seconds.clone(),
        );
        r.register(
            "heartbeat_age_seconds",
            "Time since the leader was last heard from (-1 before the first time)",
            metrics.heartbeat_age_seconds.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// An epoch's metrics as reported to the leader; `global_batch` is the
    /// samples one optimizer step takes across all ranks.
    pub fn epoch_done(&self, metrics: &BTreeMap<String, f64>, global_batch: f64) {
        self.epochs.inc();
        if let Some(&rate) = metrics.get("samples_per_sec").filter(|r| r.is_finite()) {
            self.samples_per_second.set(rate);
            if rate > 0.0 {
                self.step_seconds.set(global_batch / rate);
            }
        }
        if let Some(&seconds) = metrics.get("epoch_seconds").filter(|s| s.is_finite()) {
            self.epoch_seconds.observe(seconds);
        }
    }

    pub fn checkpoint_written(&self, took: Duration) {
        self.checkpoint_seconds.observe(took.as_secs_f64());
    }

    pub fn heard_from_leader(&self) {
        *self.last_heard.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// The metrics as OpenMetrics text, the ring's totals brought up to date.
    pub fn render(&self) -> String {
        let ring = all_reduce_totals();
        self.all_reduces
            .inc_by(ring.operations.saturating_sub(self.all_reduces.get()));
        self.all_reduce_bus_bytes.inc_by(
            ring.bus_bytes
                .saturating_sub(self.all_reduce_bus_bytes.get()),
        );
        let seconds = ring.time.as_secs_f64() - self.all_reduce_seconds.get();
        if seconds > 0.0 {
            self.all_reduce_seconds.inc_by(seconds);
        }
        let age = self
            .last_heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(-1.0, |at| at.elapsed().as_secs_f64());
        self.heartbeat_age_seconds.set(age);
        encode_registry(&self.registry)
    }
}
