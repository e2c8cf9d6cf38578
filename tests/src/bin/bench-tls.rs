//! What TLS and tokens cost the leader: two local clusters of 1
//! coordinator and 2 CPU workers, one secure (mutual TLS on every
//! connection, client → coordinator with a bearer token, worker →
//! coordinator, coordinator → etcd) and one with every process
//! `--insecure`, measured in the same run:
//!
//! ```text
//!   handshake  fresh connection + WhoIsLeader (find_leader)   client TLS handshake
//!   status     ClusterStatus on a connected client            client RPC + an etcd read
//!   get        GetSweep, 100 trials of a finished sweep       client RPC + an etcd range
//!   submit     Submit on a connected client                   client RPC + a fenced etcd commit
//!   trials/s   instant trials, 2 at a time                    worker reports + etcd commits
//! ```
//!
//! Both clusters stay up for the whole run and the measurements go in
//! rounds, the order of the two clusters swapping every round (ABBA), so
//! drift on a shared machine does not favour one. Run through
//! scripts/bench/tls.sh.

use std::time::{Duration, Instant};

use ringleader_coordinator::client::{find_leader, Connection, LeaderClient};
use ringleader_coordinator::sweep::client as sweeps;
use ringleader_coordinator::sweep::{SweepRecord, SweepState, TrialState};
use ringleader_proto::coordinator::{
    CancelSweepRequest, ClusterStatusRequest, GetSweepRequest, SubmitKind, SubmitRequest,
};
use ringleader_tests::sweeps::BraninSweep;
use ringleader_tests::{idle_workers, wait_until, TestCluster};

const WORKERS: usize = 2;
/// Samples each cluster gives per round.
const HANDSHAKES: usize = 10;
const STATUS_READS: usize = 25;
const SWEEP_READS: usize = 25;
const SUBMITS: usize = 13;
/// A call this slow waited out a delayed ACK rather than doing work.
const STALL: Duration = Duration::from_millis(20);
/// Trials read by each timed `GetSweep`.
const TRIALS_PER_READ: u32 = 100;

/// One of the two clusters and what was measured on it.
struct Side {
    name: &'static str,
    /// Held so the cluster lives as long as the side (dropping it stops it).
    _cluster: TestCluster,
    connection: Connection,
    leader: LeaderClient,
    /// A finished sweep of at least `TRIALS_PER_READ` trials, for `get`.
    finished: String,
    handshake: Vec<Duration>,
    status: Vec<Duration>,
    get: Vec<Duration>,
    submit: Vec<Duration>,
    /// (trials, leader-measured submit → finished) of each timed sweep.
    sweeps: Vec<(u32, Duration)>,
}

fn instant_sweep(trials: u32) -> String {
    BraninSweep {
        searcher: "random",
        max_trials: trials,
        workers_per_trial: 1,
        max_concurrent: WORKERS as u32,
        max_epochs: 1,
        max_failures: 0,
        epoch_ms: 0,
    }
    .spec()
}

fn submit_request(spec: &str) -> SubmitRequest {
    SubmitRequest {
        kind: SubmitKind::Sweep as i32,
        spec: spec.to_string(),
        origin: "bench-tls.toml".into(),
    }
}

impl Side {
    async fn start(name: &'static str, secure: bool) -> Self {
        let mut cluster = TestCluster::start_secured(1, WORKERS, Vec::new(), secure).await;
        cluster.must_form(Duration::from_secs(60)).await;
        let connection = cluster.connection(Duration::from_secs(5));
        let (_, leader) = find_leader(&connection).await.expect("a leader");
        let mut side = Self {
            name,
            _cluster: cluster,
            connection,
            leader,
            finished: String::new(),
            handshake: Vec::new(),
            status: Vec::new(),
            get: Vec::new(),
            submit: Vec::new(),
            sweeps: Vec::new(),
        };
        // Warm-up, not recorded: every path once, and the sweep that the
        // timed reads read back.
        side.finished = side.run_sweep(TRIALS_PER_READ).await.0;
        side.round(0).await;
        side.handshake.clear();
        side.status.clear();
        side.get.clear();
        side.submit.clear();
        side
    }

    /// One round's samples of every metric, and one sweep of `trials`.
    async fn round(&mut self, trials: u32) {
        for _ in 0..HANDSHAKES {
            let started = Instant::now();
            let (_, fresh) = find_leader(&self.connection).await.expect("a leader");
            self.handshake.push(started.elapsed());
            drop(fresh);
        }
        for _ in 0..STATUS_READS {
            let started = Instant::now();
            self.leader
                .cluster_status(ClusterStatusRequest {})
                .await
                .expect("status");
            self.status.push(started.elapsed());
        }
        for _ in 0..SWEEP_READS {
            let started = Instant::now();
            let page = self
                .leader
                .get_sweep(GetSweepRequest {
                    sweep_id: self.finished.clone(),
                    trials_from: 0,
                    trials_limit: TRIALS_PER_READ,
                })
                .await
                .expect("get")
                .into_inner();
            self.get.push(started.elapsed());
            assert_eq!(page.trial_json.len(), TRIALS_PER_READ as usize);
        }
        let spec = instant_sweep(1);
        for _ in 0..SUBMITS {
            let started = Instant::now();
            let id = self
                .leader
                .submit(submit_request(&spec))
                .await
                .expect("submit")
                .into_inner()
                .sweep_id;
            self.submit.push(started.elapsed());
            // Untimed: stop it (unless its one trial already ran) and
            // wait for both workers to be idle again, so no trial runs
            // while the next submit is timed.
            match self
                .leader
                .cancel_sweep(CancelSweepRequest { sweep_id: id })
                .await
            {
                Ok(_) => {}
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {}
                Err(status) => panic!("cancel: {status}"),
            }
            self.must_idle().await;
        }
        if trials > 0 {
            let (_, took) = self.run_sweep(trials).await;
            self.sweeps.push((trials, took));
        }
    }

    async fn must_idle(&mut self) {
        let leader = self.leader.clone();
        wait_until("both workers idle", Duration::from_secs(30), || {
            let mut leader = leader.clone();
            async move {
                let status = leader
                    .cluster_status(ClusterStatusRequest {})
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                (idle_workers(&status) == WORKERS)
                    .then_some(())
                    .ok_or_else(|| "not yet".to_string())
            }
        })
        .await;
    }

    /// Submits a sweep of `trials` instant trials and waits for it to
    /// complete; returns its id and the leader's submit → finished time
    /// (from the sweep record, so polling granularity does not count).
    async fn run_sweep(&mut self, trials: u32) -> (String, Duration) {
        let id = self
            .leader
            .submit(submit_request(&instant_sweep(trials)))
            .await
            .expect("submit")
            .into_inner()
            .sweep_id;
        // Poll the record only (one trial a page): cheap next to the run.
        let record: SweepRecord = loop {
            let page = self
                .leader
                .get_sweep(GetSweepRequest {
                    sweep_id: id.clone(),
                    trials_from: 0,
                    trials_limit: 1,
                })
                .await
                .expect("get")
                .into_inner();
            let record: SweepRecord =
                serde_json::from_str(&page.sweep_json).expect("a sweep record");
            if record.state.is_terminal() {
                break record;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(record.state, SweepState::Completed, "{id}");
        let view = sweeps::get(&self.connection, &id).await.expect("read back");
        assert_eq!(view.trials.len(), trials as usize, "{id}: every trial");
        assert!(
            view.trials.iter().all(|t| t.state == TrialState::Completed),
            "{id}: every trial completed"
        );
        let finished = record.finished_unix_ms.expect("a finished sweep");
        let took = Duration::from_millis(finished.saturating_sub(record.submitted_unix_ms));
        self.must_idle().await;
        (id, took)
    }

    fn trials_per_second(&self) -> f64 {
        let trials: u32 = self.sweeps.iter().map(|(n, _)| n).sum();
        let time: Duration = self.sweeps.iter().map(|(_, t)| *t).sum();
        f64::from(trials) / time.as_secs_f64()
    }

    fn round_rates(&self) -> Vec<f64> {
        self.sweeps
            .iter()
            .map(|(n, t)| f64::from(*n) / t.as_secs_f64())
            .collect()
    }
}

/// The `q`-quantile (nearest rank) of `times`, in milliseconds.
fn quantile_ms(times: &[Duration], q: f64) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

fn row(metric: &str, insecure: f64, secure: f64, unit: &str) {
    println!(
        "| {metric} | {insecure:.2} {unit} | {secure:.2} {unit} | {:.2}× |",
        secure / insecure
    );
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(6);
    let trials: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(150);
    let started = Instant::now();
    let mut insecure = Side::start("insecure", false).await;
    let mut secure = Side::start("secure", true).await;
    println!(
        "two clusters of 1 coordinator + {WORKERS} workers up and warm in {:.1} s; \
         {rounds} rounds of {HANDSHAKES} handshakes, {STATUS_READS} ClusterStatus, \
         {SWEEP_READS} GetSweep ({TRIALS_PER_READ} trials), {SUBMITS} submits and \
         {trials} instant trials per cluster",
        started.elapsed().as_secs_f64()
    );
    for round in 0..rounds {
        let order: [&mut Side; 2] = if round % 2 == 0 {
            [&mut insecure, &mut secure]
        } else {
            [&mut secure, &mut insecure]
        };
        let mut line = format!("round {}:", round + 1);
        for side in order {
            side.round(trials).await;
            let (n, t) = side.sweeps.last().copied().unwrap_or_default();
            line.push_str(&format!(
                " {} {:.0} trials/s;",
                side.name,
                f64::from(n) / t.as_secs_f64()
            ));
        }
        println!("{}", line.trim_end_matches(';'));
    }
    println!();
    println!("| metric | insecure | secure (TLS + token) | secure ÷ insecure |");
    println!("|---|---|---|---|");
    let get_label = format!("GetSweep, {TRIALS_PER_READ} finished trials");
    let latencies = [
        (
            "connect + WhoIsLeader",
            &insecure.handshake,
            &secure.handshake,
        ),
        ("ClusterStatus", &insecure.status, &secure.status),
        (&get_label, &insecure.get, &secure.get),
        ("Submit", &insecure.submit, &secure.submit),
    ];
    for (metric, a, b) in latencies {
        row(
            &format!("{metric}, median of {}", a.len()),
            quantile_ms(a, 0.5),
            quantile_ms(b, 0.5),
            "ms",
        );
        row(
            &format!("{metric}, p90"),
            quantile_ms(a, 0.9),
            quantile_ms(b, 0.9),
            "ms",
        );
    }
    let total: u32 = insecure.sweeps.iter().map(|(n, _)| n).sum();
    row(
        &format!("instant trials, {total} in {rounds} sweeps, 2 workers"),
        insecure.trials_per_second(),
        secure.trials_per_second(),
        "/s",
    );
    let spread = |side: &Side| {
        side.round_rates()
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Rounds pair the two clusters in time: the median of the per-round
    // ratios is the figure least moved by drift on a shared machine.
    let mut paired: Vec<f64> = secure
        .round_rates()
        .iter()
        .zip(insecure.round_rates())
        .map(|(s, i)| s / i)
        .collect();
    paired.sort_by(f64::total_cmp);
    println!();
    println!("trials/s by round: insecure {}", spread(&insecure));
    println!("                   secure   {}", spread(&secure));
    // Calls either answer in about a millisecond or wait out a delayed
    // ACK (≥ 40 ms on Linux); a median alone hides which is common.
    let stalled = |times: &[Duration]| {
        let slow = times.iter().filter(|t| **t >= STALL).count();
        format!("{slow}/{}", times.len())
    };
    println!(
        "calls of {} ms or more: connect + WhoIsLeader insecure {}, secure {}; \
         GetSweep insecure {}, secure {}; Submit insecure {}, secure {}",
        STALL.as_millis(),
        stalled(&insecure.handshake),
        stalled(&secure.handshake),
        stalled(&insecure.get),
        stalled(&secure.get),
        stalled(&insecure.submit),
        stalled(&secure.submit),
    );
    if let Some(median) = paired.get(paired.len() / 2) {
        println!("median of the per-round secure ÷ insecure trial rates: {median:.2}×");
    }
    println!("whole run: {:.1} s", started.elapsed().as_secs_f64());
}
