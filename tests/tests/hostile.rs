//! What a careless or hostile client, worker or data set sends must never
//! break the cluster: each absurd input gets a clear error, the cluster
//! goes on serving the next normal sweep, a diverged trial stays readable
//! across a failover, unreadable records are named and set aside, workers
//! are held to what they were given, and a sweep of 10,000 trials reads
//! back. Real etcd, coordinators and workers as processes.

use std::collections::BTreeMap;
use std::time::Duration;

use ringleader_coordinator::client::LeaderClient;
use ringleader_coordinator::sweep::client::{self as sweeps};
use ringleader_coordinator::sweep::records::{trial_key, TrialRecord};
use ringleader_coordinator::sweep::{SweepKind, SweepState, TrialState};
use ringleader_proto::coordinator::{
    coordinator_message, worker_message, AttemptOutcome, AttemptRef, CancelSweepRequest,
    ClusterStatusRequest, CoordinatorMessage, EpochReport, GetSweepRequest, Heartbeat,
    ListSweepsRequest, Register, SubmitKind, SubmitRequest, TrialFinished, WorkerMessage,
};
use ringleader_security::Role;
use ringleader_tests::sweeps::{client, must_finish_sweep, must_submit, write_spec, BraninSweep};
use ringleader_tests::{wait_until, TestCluster};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// A quick synthetic sweep that must complete.
fn normal_sweep(max_trials: u32) -> String {
    BraninSweep {
        searcher: "random",
        max_trials,
        workers_per_trial: 1,
        max_concurrent: 2,
        max_epochs: 1,
        max_failures: 0,
        epoch_ms: 0,
    }
    .spec()
}

async fn leader_client(cluster: &TestCluster) -> LeaderClient {
    ringleader_coordinator::client::find_leader(&cluster.connection(Duration::from_secs(5)))
        .await
        .expect("a leader answers")
        .1
}

fn submit_request(spec: String) -> SubmitRequest {
    SubmitRequest {
        kind: SubmitKind::Sweep as i32,
        spec,
        origin: "raw.toml".into(),
    }
}

/// Asserts `result` is a refusal with `code` whose message contains
/// `needle`.
fn must_refuse<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the request must be refused");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(needle),
        "{:?} does not say {needle:?}",
        status.message()
    );
}

/// The CLI's submit of `text` fails with an error containing `needle`.
async fn must_reject_spec(cluster: &TestCluster, name: &str, text: &str, needle: &str) {
    let path = write_spec(cluster, name, text);
    let error = sweeps::submit(&client(cluster), SweepKind::Sweep, &path)
        .await
        .expect_err("the spec must be rejected");
    assert!(
        error.to_string().contains(needle),
        "{name}: {error} does not say {needle:?}"
    );
}

/// Opens an attach stream and sends `register`; returns the leader's
/// first answer and the sender for more messages.
async fn attach(
    cluster: &TestCluster,
    register: Register,
) -> (
    Result<tonic::Streaming<CoordinatorMessage>, tonic::Status>,
    mpsc::Sender<WorkerMessage>,
) {
    let (tx, rx) = mpsc::channel(16);
    tx.send(WorkerMessage {
        kind: Some(worker_message::Kind::Register(register)),
    })
    .await
    .unwrap();
    // A hostile worker: it holds a real worker certificate.
    let worker = cluster.connection_as(Role::Worker, Duration::from_secs(5));
    let answer = ringleader_coordinator::client::find_leader(&worker)
        .await
        .expect("a leader answers")
        .1
        .attach(ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    (answer, tx)
}

fn registration(id: &str, host: &str) -> Register {
    Register {
        worker_id: id.into(),
        host: host.into(),
        peer_address: "127.0.0.1:9".into(),
        ..Register::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_inputs_get_clear_errors_and_the_cluster_serves_the_next_sweep() {
    let cluster = TestCluster::must_start_formed(1, 2).await;
    let sweep = normal_sweep(4);

    // Specs: each refused with the setting and the limit named.
    let huge = format!("{sweep}\n# {}\n", "x".repeat(2 << 20));
    must_reject_spec(&cluster, "huge.toml", &huge, "at most 262144").await;
    let grid = sweep
        .replace(
            "searcher = \"random\"",
            "searcher = \"grid\"\ngrid_points = 4000000000",
        )
        .replace("max_trials = 4\n", "");
    must_reject_spec(
        &cluster,
        "grid.toml",
        &grid,
        "sweep.grid_points: must be between 2 and 10000",
    )
    .await;
    let wide_grid = grid.replace("grid_points = 4000000000", "grid_points = 10000");
    must_reject_spec(
        &cluster,
        "wide.toml",
        &wide_grid,
        "the grid has 100000000 combinations",
    )
    .await;
    let many = sweep.replace("max_trials = 4", "max_trials = 1000000000");
    must_reject_spec(
        &cluster,
        "many.toml",
        &many,
        "sweep.max_trials: at most 999999",
    )
    .await;

    // The same, sent raw (no client-side check): the leader refuses them.
    let mut leader = leader_client(&cluster).await;
    must_refuse(
        leader.submit(submit_request("x".repeat(600 << 10))).await,
        Code::InvalidArgument,
        "at most 262144",
    );
    must_refuse(
        leader.submit(submit_request("x".repeat(2 << 20))).await,
        Code::OutOfRange,
        "message length too large",
    );
    let over_cluster_limit = sweep.replace("max_trials = 4", "max_trials = 200000");
    must_refuse(
        leader.submit(submit_request(over_cluster_limit)).await,
        Code::InvalidArgument,
        "--max-trials-per-sweep",
    );
    must_refuse(
        leader.submit(submit_request(grid)).await,
        Code::InvalidArgument,
        "grid_points",
    );
    // A spec that is not UTF-8 is the sender's error, not the server's.
    must_refuse(
        raw_submit(&cluster, b"name = \"\xff\xfe\"").await,
        Code::InvalidArgument,
        "UTF-8",
    );

    // Unknown ids are NOT_FOUND for every call.
    must_refuse(
        leader
            .cancel_sweep(CancelSweepRequest {
                sweep_id: "sweep-404".into(),
            })
            .await,
        Code::NotFound,
        "no sweep or job sweep-404",
    );
    must_refuse(
        leader
            .get_sweep(GetSweepRequest {
                sweep_id: "sweep-404".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "no sweep or job sweep-404",
    );

    // Registrations: oversized ids and hosts are refused at the door.
    let (answer, _tx) = attach(&cluster, registration(&"w".repeat(100_000), "h")).await;
    must_refuse(
        answer,
        Code::InvalidArgument,
        "worker_id is 100000 bytes; at most 128",
    );
    let (answer, _tx) = attach(&cluster, registration("w-big-host", &"h".repeat(300_000))).await;
    must_refuse(
        answer,
        Code::InvalidArgument,
        "host is 300000 bytes; at most 255",
    );
    let (answer, _tx) = attach(&cluster, registration(&"w".repeat(1_800_000), "h")).await;
    must_refuse(answer, Code::OutOfRange, "message length too large");

    // And the cluster goes on: status answers, a normal sweep completes.
    let status = leader
        .cluster_status(ClusterStatusRequest {})
        .await
        .expect("status answers")
        .into_inner();
    assert_eq!(status.workers.len(), 2, "{:?}", status.workers);
    let id = must_submit(&cluster, "normal.toml", &sweep).await;
    let view = must_finish_sweep(&client(&cluster), &id, Duration::from_secs(60)).await;
    assert_eq!(view.record.state, SweepState::Completed);
    assert_eq!(view.trials.len(), 4);

    // A finished sweep cannot be cancelled: FAILED_PRECONDITION, not NOT_FOUND.
    must_refuse(
        leader
            .cancel_sweep(CancelSweepRequest {
                sweep_id: id.clone(),
            })
            .await,
        Code::FailedPrecondition,
        "already finished",
    );
    // Listing omits the spec texts unless asked.
    let list = leader
        .list_sweeps(ListSweepsRequest {
            include_spec: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.sweep_json.iter().all(|s| s.contains(r#""spec":"""#)));
    let list = leader
        .list_sweeps(ListSweepsRequest { include_spec: true })
        .await
        .unwrap()
        .into_inner();
    assert!(list.sweep_json.iter().all(|s| s.contains("branin")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_full_of_running_sweeps_refuses_more_until_one_ends() {
    let args = vec!["--max-running-sweeps".to_string(), "1".to_string()];
    let mut cluster = TestCluster::start_with(1, 1, args).await;
    cluster.must_form(Duration::from_secs(60)).await;
    let slow = BraninSweep {
        searcher: "random",
        max_trials: 1,
        workers_per_trial: 1,
        max_concurrent: 1,
        max_epochs: 100,
        max_failures: 0,
        epoch_ms: 1000,
    }
    .spec();
    let first = must_submit(&cluster, "slow.toml", &slow).await;
    let mut leader = leader_client(&cluster).await;
    must_refuse(
        leader.submit(submit_request(normal_sweep(1))).await,
        Code::ResourceExhausted,
        "--max-running-sweeps",
    );
    sweeps::cancel(&client(&cluster), &first)
        .await
        .expect("cancel");
    let next = must_submit(&cluster, "next.toml", &normal_sweep(1)).await;
    let view = must_finish_sweep(&client(&cluster), &next, Duration::from_secs(60)).await;
    assert_eq!(view.record.state, SweepState::Completed);
}

/// Submits a spec whose bytes need not be UTF-8, through the generated
/// client's path with a message type of our own.
async fn raw_submit(cluster: &TestCluster, spec: &[u8]) -> Result<(), tonic::Status> {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawSubmit {
        #[prost(int32, tag = "1")]
        kind: i32,
        #[prost(bytes = "vec", tag = "2")]
        spec: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Empty {}
    let address = leader_address(cluster).await;
    let connection = cluster.connection(Duration::from_secs(5));
    let channel = connection
        .transport
        .endpoint(&address, ringleader_security::Role::Coordinator)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = "/ringleader.coordinator.v1.Coordinator/Submit"
        .parse()
        .unwrap();
    let codec = tonic_prost::ProstCodec::<RawSubmit, Empty>::default();
    let request = RawSubmit {
        kind: SubmitKind::Sweep as i32,
        spec: spec.to_vec(),
    };
    let mut request = tonic::Request::new(request);
    let token = connection.token.expect("test clusters have an admin token");
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.reveal()).parse().unwrap(),
    );
    grpc.unary(request, path, codec).await.map(|_| ())
}

async fn leader_address(cluster: &TestCluster) -> String {
    cluster
        .cluster
        .status(Duration::from_secs(5))
        .await
        .expect("status")
        .leader_address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_worker_ids_and_foreign_reports_are_refused() {
    let cluster = TestCluster::must_start_formed(1, 2).await;

    // A second process claiming a live worker's id is refused; the real
    // worker stays registered and idle.
    let (answer, _tx) = attach(&cluster, registration("worker-0", "impostor")).await;
    must_refuse(answer, Code::AlreadyExists, "worker id worker-0 is taken");
    let status = leader_client(&cluster)
        .await
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let worker0 = status
        .workers
        .iter()
        .find(|w| w.worker_id == "worker-0")
        .unwrap();
    assert_ne!(worker0.host, "impostor");

    // A slow one-trial sweep; an intruder (registered under its own id)
    // reports metrics for the running attempt and says it failed.
    let slow = BraninSweep {
        searcher: "random",
        max_trials: 1,
        workers_per_trial: 1,
        max_concurrent: 1,
        max_epochs: 3,
        max_failures: 0,
        epoch_ms: 700,
    }
    .spec();
    let id = must_submit(&cluster, "slow.toml", &slow).await;
    let args = client(&cluster);
    let attempt = wait_until("the trial to run", Duration::from_secs(30), || async {
        let view = sweeps::get(&args, &id).await.map_err(|e| e.to_string())?;
        let trial = view.trials.first().ok_or("no trial yet")?;
        let live = trial.live_attempt().ok_or("not running yet")?;
        Ok(AttemptRef {
            sweep_id: id.clone(),
            trial: trial.number,
            attempt: live.number,
        })
    })
    .await;
    let (answer, intruder) = attach(&cluster, registration("intruder", "elsewhere")).await;
    let mut inbound = answer.expect("the intruder may register under its own id");
    let registered = inbound.message().await.unwrap().unwrap();
    assert!(matches!(
        registered.kind,
        Some(coordinator_message::Kind::Registered(_))
    ));
    for kind in [
        worker_message::Kind::Epoch(EpochReport {
            attempt: Some(attempt.clone()),
            epoch: 3,
            metrics: [("objective".to_string(), -1e9)].into(),
            checkpoint: String::new(),
        }),
        worker_message::Kind::Finished(TrialFinished {
            attempt: Some(attempt.clone()),
            outcome: AttemptOutcome::Failed as i32,
            epochs_done: 0,
            checkpoint: String::new(),
            error: "forged".into(),
            lineage: None,
        }),
        worker_message::Kind::Heartbeat(Heartbeat { sequence: 1 }),
    ] {
        intruder
            .send(WorkerMessage { kind: Some(kind) })
            .await
            .unwrap();
    }
    // The heartbeat's answer shows the reports before it were handled.
    loop {
        let message = inbound
            .message()
            .await
            .unwrap()
            .expect("the stream stays open");
        if matches!(
            message.kind,
            Some(coordinator_message::Kind::HeartbeatAck(_))
        ) {
            break;
        }
    }
    let view = must_finish_sweep(&args, &id, Duration::from_secs(60)).await;
    let trial = &view.trials[0];
    assert_eq!(trial.state, TrialState::Completed, "{:?}", trial.error);
    assert_eq!(trial.attempts.len(), 1, "the forged failure was applied");
    assert!(
        trial.objective.unwrap() > 0.0,
        "the forged objective was applied: {:?}",
        trial.objective
    );
    assert!(trial.attempts[0].workers.iter().all(|w| w != "intruder"));
    drop(intruder);

    // With the whole cluster gone, --watch gives up after the time given.
    let args = client(&cluster);
    let mut cluster = cluster;
    cluster.cluster.shutdown(Duration::from_secs(5));
    let started = std::time::Instant::now();
    let Err(error) = sweeps::watch(
        &args,
        &id,
        Duration::from_millis(100),
        Duration::from_secs(2),
    )
    .await
    else {
        panic!("watch returned a view with nothing answering");
    };
    assert!(error.to_string().contains("--give-up-after"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

/// A tiny, separable two-class CSV: trains in a blink, and an absurd
/// learning rate makes its loss NaN or infinite within an epoch.
fn write_csv(cluster: &TestCluster) -> std::path::PathBuf {
    let mut text = String::from("a,b,label\n");
    for i in 0..64 {
        let x = i as f64 / 64.0;
        let label = usize::from(x > 0.5);
        text.push_str(&format!("{x},{},{label}\n", 1.0 - x));
    }
    let path = cluster.dir().join("tiny.csv");
    std::fs::write(&path, text).unwrap();
    path
}

fn diverging_sweep(csv: &std::path::Path) -> String {
    format!(
        r#"
[sweep]
name = "wide-lr"
searcher = "grid"
workers_per_trial = 1
max_epochs = 3
objective = {{ metric = "train_loss", mode = "min" }}

[sweep.params]
"optimizer.lr" = {{ kind = "choice", values = [0.05, 1e30, 3e38] }}

[job]
name = "csv"
batch_size = 16

[job.dataset]
format = "csv"
classes = 2
train = {{ files = ["{csv}"] }}

[job.model]
kind = "mlp"
hidden = [8]

[job.optimizer]
kind = "sgd"
"#,
        csv = csv.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverging_sweep_stays_readable_across_a_failover() {
    let mut cluster = TestCluster::must_start_formed(2, 2).await;
    let csv = write_csv(&cluster);
    let id = must_submit(&cluster, "wide-lr.toml", &diverging_sweep(&csv)).await;
    let args = client(&cluster);
    let view = must_finish_sweep(&args, &id, Duration::from_secs(120)).await;
    assert_eq!(view.record.state, SweepState::Completed);
    // A grid over one choice: trial n runs the n-th value.
    let by_lr: BTreeMap<&str, &TrialRecord> = ["0.05", "1e30", "3e38"]
        .into_iter()
        .zip(&view.trials)
        .collect();
    let sane = by_lr["0.05"];
    assert_eq!(sane.state, TrialState::Completed, "{:?}", sane.error);
    for lr in ["1e30", "3e38"] {
        let trial = by_lr[lr];
        assert_eq!(trial.state, TrialState::Diverged, "lr {lr}: {trial:?}");
        let error = trial.error.as_deref().unwrap_or_default();
        assert!(
            error.starts_with("diverged: loss is") && error.contains("at epoch"),
            "lr {lr}: {error}"
        );
        assert_eq!(trial.attempts.len(), 1, "a divergence is not retried");
        let last = trial
            .metrics
            .last()
            .expect("the diverged epoch is recorded");
        assert!(!last.metrics["train_loss"].is_finite(), "{last:?}");
    }
    // The leaderboard ranks the diverged trials last, and the sweep's best
    // is the sane one.
    let table = sweeps::results_table(&view);
    let ranks: Vec<&str> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    assert_eq!(ranks, ["completed", "diverged", "diverged"], "{table}");
    assert_eq!(view.best().map(|t| t.number), Some(sane.number));
    let csv_out = sweeps::results_csv(&view);
    assert!(
        csv_out.contains("NaN") || csv_out.contains("inf"),
        "{csv_out}"
    );

    // Stored as written: the raw record holds the non-finite loss as a
    // string, and a new leader reads every record back.
    let diverged = by_lr["1e30"];
    let raw = cluster.etcdctl(&[
        "get",
        "--print-value-only",
        &trial_key(&id, diverged.number),
    ]);
    let raw = String::from_utf8_lossy(&raw.stdout);
    assert!(
        raw.contains(r#""NaN""#) || raw.contains(r#"Infinity""#),
        "{raw}"
    );
    let old = cluster.kill_leader().await;
    cluster
        .must_fail_over(&old, 2, Duration::from_secs(60))
        .await;
    let after = sweeps::get(&args, &id)
        .await
        .expect("readable after the failover");
    assert_eq!(
        serde_json::to_string(&after.trials).unwrap(),
        serde_json::to_string(&view.trials).unwrap()
    );
    // A single job with an absurd learning rate: job status reads it.
    let job = diverging_sweep(&csv);
    let job = job[job.find("[job]").unwrap()..]
        .replace("[job]\n", "")
        .replace("[job.", "[")
        .replace("kind = \"sgd\"", "kind = \"sgd\"\nlr = 1e30")
        .replace("batch_size = 16", "batch_size = 16\nepochs = 2");
    let path = write_spec(&cluster, "job.toml", &job);
    let job_id = sweeps::submit(&args, SweepKind::Job, &path).await.unwrap();
    let job_view = must_finish_sweep(&args, &job_id, Duration::from_secs(60)).await;
    assert_eq!(job_view.trials[0].state, TrialState::Diverged);
    assert!(sweeps::status_text(&job_view).contains("diverged: loss is"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_records_are_named_and_set_aside() {
    let mut cluster = TestCluster::must_start_formed(2, 1).await;
    let args = client(&cluster);
    let finished = must_submit(&cluster, "a.toml", &normal_sweep(3)).await;
    must_finish_sweep(&args, &finished, Duration::from_secs(60)).await;
    let put = |key: &str, value: &str| {
        let out = cluster.etcdctl(&["put", key, value]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A finished sweep's trial as an older release stored a NaN loss
    // (`null`), another trial overwritten with garbage, a sweep record
    // that is not JSON, and a running sweep with a garbage trial.
    let raw = cluster.etcdctl(&["get", "--print-value-only", &trial_key(&finished, 0)]);
    let mut legacy: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    legacy["metrics"][0]["metrics"]["objective"] = serde_json::Value::Null;
    put(&trial_key(&finished, 0), &legacy.to_string());
    put(&trial_key(&finished, 1), "{\"sweep\": garbage");
    put("/ringleader/sweeps/sweep-900", "not json at all");
    let mut running: serde_json::Value = serde_json::from_slice(
        &cluster
            .etcdctl(&[
                "get",
                "--print-value-only",
                &format!("/ringleader/sweeps/{finished}"),
            ])
            .stdout,
    )
    .unwrap();
    running["id"] = "sweep-901".into();
    running["seq"] = 901.into();
    running["state"] = "running".into();
    running["finished_unix_ms"] = serde_json::Value::Null;
    put("/ringleader/sweeps/sweep-901", &running.to_string());
    put(&trial_key("sweep-901", 0), "[1, 2");
    // And a running sweep whose stored spec no longer parses.
    running["id"] = "sweep-902".into();
    running["seq"] = 902.into();
    running["spec"] = "[sweep\nname =".into();
    put("/ringleader/sweeps/sweep-902", &running.to_string());

    // A new leader loads everything else and serves.
    let old = cluster.kill_leader().await;
    cluster
        .must_fail_over(&old, 1, Duration::from_secs(60))
        .await;
    let mut leader = leader_client(&cluster).await;
    let list = leader
        .list_sweeps(ListSweepsRequest::default())
        .await
        .expect("the list is served")
        .into_inner();
    let unreadable = list.unreadable.join("\n");
    for key in [
        "/ringleader/sweeps/sweep-900".to_string(),
        trial_key("sweep-901", 0),
    ] {
        assert!(
            unreadable.contains(&key),
            "{key} is not named in: {unreadable}"
        );
    }
    assert!(
        !unreadable.contains("not json at all"),
        "contents are quoted: {unreadable}"
    );
    let page = leader
        .get_sweep(GetSweepRequest {
            sweep_id: finished.clone(),
            ..Default::default()
        })
        .await
        .expect("the damaged sweep is still served")
        .into_inner();
    assert_eq!(page.trial_json.len(), 2, "the two readable trials");
    assert!(
        page.trial_json[0].contains(r#""objective":"NaN""#),
        "{}",
        page.trial_json[0]
    );
    assert_eq!(page.unreadable.len(), 1, "{:?}", page.unreadable);
    assert!(page.unreadable[0].contains(&trial_key(&finished, 1)));
    let Err(error) = sweeps::get(&args, "sweep-901").await else {
        panic!("a sweep with an unreadable trial read back whole");
    };
    assert!(
        error.to_string().contains(&trial_key("sweep-901", 0)),
        "{error}"
    );
    // Neither running sweep can be taken over: each is marked failed in
    // etcd with the reason, naming the key, so a watcher stops waiting
    // and the next leader loads it as finished.
    for (id, problem) in [
        ("sweep-901", trial_key("sweep-901", 0)),
        (
            "sweep-902",
            "/ringleader/sweeps/sweep-902: its spec no longer parses".into(),
        ),
    ] {
        let key = format!("/ringleader/sweeps/{id}");
        let record = wait_until(
            &format!("{id} marked failed"),
            Duration::from_secs(30),
            || async {
                let raw = cluster.etcdctl(&["get", "--print-value-only", &key]);
                let record: serde_json::Value =
                    serde_json::from_slice(&raw.stdout).map_err(|e| e.to_string())?;
                match record["state"].as_str() {
                    Some("failed") => Ok(record),
                    other => Err(format!("state {other:?}")),
                }
            },
        )
        .await;
        let failure = record["failure"].as_str().unwrap_or_default();
        assert!(failure.contains(&problem), "{id}: {failure}");
    }
    // The leader after that loads both as finished: sweep-902 reads back
    // whole, failed, with the reason.
    let index = cluster
        .cluster
        .coordinators()
        .iter()
        .position(|m| m.address == old)
        .unwrap();
    cluster
        .cluster
        .restart_coordinator(index)
        .expect("coordinator restarts");
    let second = cluster.kill_leader().await;
    cluster
        .must_fail_over(&second, 1, Duration::from_secs(60))
        .await;
    let view = sweeps::get(&args, "sweep-902").await.unwrap();
    assert_eq!(view.record.state, SweepState::Failed);
    let shown = sweeps::status_text(&view);
    assert!(
        shown.contains("cannot be taken over: stored sweep /ringleader/sweeps/sweep-902: its spec no longer parses"),
        "{shown}"
    );
    // The next normal sweep runs.
    let next = must_submit(&cluster, "b.toml", &normal_sweep(2)).await;
    let view = must_finish_sweep(&args, &next, Duration::from_secs(60)).await;
    assert_eq!(view.record.state, SweepState::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_of_ten_thousand_trials_reads_back() {
    let cluster = TestCluster::must_start_formed(1, 4).await;
    let sweep = BraninSweep {
        searcher: "random",
        max_trials: 10_000,
        workers_per_trial: 1,
        max_concurrent: 4,
        max_epochs: 1,
        max_failures: 0,
        epoch_ms: 0,
    }
    .spec();
    let id = must_submit(&cluster, "big.toml", &sweep).await;
    let args = client(&cluster);
    let view = must_finish_sweep(&args, &id, Duration::from_secs(600)).await;
    assert_eq!(view.record.state, SweepState::Completed);
    let numbers: Vec<u64> = view.trials.iter().map(|t| t.number).collect();
    assert_eq!(numbers, (0..10_000).collect::<Vec<u64>>());
    assert!(view.trials.iter().all(|t| t.state == TrialState::Completed));
    // Paged: no page is over the limit, and pages join up.
    let mut leader = leader_client(&cluster).await;
    let page = leader
        .get_sweep(GetSweepRequest {
            sweep_id: id.clone(),
            trials_from: 0,
            trials_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.trial_json.len(), 1_000);
    assert!(page.more_trials);
    assert_eq!(page.next_trials_from, 1_000);
    assert_eq!(sweeps::results_table(&view).lines().count(), 10_001);
}

/// A stand-in leadership term over a key we create ourselves, so a state
/// writer can be driven directly against a real etcd.
async fn writer_term(
    etcd: &ringleader_coordinator::etcd::Etcd,
) -> ringleader_coordinator::election::LeaderTerm {
    let key = b"/ringleader-test/leader".to_vec();
    let put = etcd
        .client()
        .put(key.clone(), "me", None)
        .await
        .expect("put the fence key");
    let revision = put.header().expect("a header").revision();
    ringleader_coordinator::election::LeaderTerm {
        key,
        create_revision: revision,
        lease: 0,
        token: tokio_util::sync::CancellationToken::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_writer_fails_one_refused_change_and_gives_up_on_an_outage() {
    use ringleader_coordinator::store::{FencedStore, NotStored, StateWriter};
    let dir = tempfile::tempdir().unwrap();
    let mut server = ringleader_coordinator::local::EtcdServer::start(dir.path(), None).unwrap();
    server.wait_ready(Duration::from_secs(20)).await.unwrap();
    let endpoints = vec![server.client_url.clone()];
    let etcd =
        ringleader_coordinator::etcd::Etcd::connect(&endpoints, Duration::from_millis(500), None)
            .await
            .unwrap();
    let term = writer_term(&etcd).await;
    let writer = StateWriter::spawn_with_retry_bound(
        FencedStore::new(etcd.clone(), &term),
        term.token.clone(),
        Duration::from_secs(2),
    );
    // Queued together, so they share a commit: the 1.8 MB value (over
    // etcd's 1.5 MiB request limit) must not sink the other two.
    let small = |key: &str| vec![(format!("/ringleader-test/{key}"), "\"ok\"".to_string())];
    let first = writer.enqueue(small("a"));
    let huge = writer.enqueue(vec![(
        "/ringleader-test/huge".to_string(),
        "x".repeat(1_800_000),
    )]);
    let last = writer.enqueue(small("b"));
    assert_eq!(first.await.unwrap(), Ok(()));
    let refused = huge.await.unwrap().expect_err("etcd refuses 1.8 MB");
    assert!(matches!(refused, NotStored::Refused(_)), "{refused:?}");
    // Final for a client: retrying the same change would be refused again.
    assert_eq!(
        tonic::Status::from(refused.clone()).code(),
        tonic::Code::ResourceExhausted
    );
    let refused = refused.to_string();
    assert!(refused.contains("request is too large"), "{refused}");
    assert!(
        !refused.contains("127.0.0.1"),
        "etcd's address reached the caller: {refused}"
    );
    assert_eq!(last.await.unwrap(), Ok(()));
    for (key, present) in [("a", true), ("huge", false), ("b", true)] {
        let got = etcd
            .client()
            .get(format!("/ringleader-test/{key}"), None)
            .await
            .unwrap();
        assert_eq!(got.kvs().len(), usize::from(present), "{key}");
    }
    // The writer moved on: the next change lands.
    assert_eq!(writer.enqueue(small("c")).await.unwrap(), Ok(()));

    // etcd frozen: the change fails after the bound and the term is given
    // up, instead of the writer retrying forever.
    server
        .process()
        .freeze(Duration::from_secs(10))
        .expect("etcd stops");
    let started = std::time::Instant::now();
    let outage = writer.enqueue(small("d")).await.unwrap();
    server.process().signal(libc::SIGCONT);
    let reason = outage.expect_err("nothing answers while etcd is stopped");
    assert!(matches!(reason, NotStored::TermEnded(_)), "{reason:?}");
    assert_eq!(
        tonic::Status::from(reason.clone()).code(),
        tonic::Code::Unavailable
    );
    let reason = reason.to_string();
    assert!(
        reason.contains("did not take the write within 2s"),
        "{reason}"
    );
    assert!(term.token.is_cancelled(), "the term is given up");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // Later changes are refused (or dropped with the stopped writer).
    assert!(!matches!(writer.enqueue(small("e")).await, Ok(Ok(()))));
}
