//! The dashboard, its JSON API and `/metrics`, seen from outside a real
//! secure cluster: an ASHA sweep and a two-worker training job run, then
//! the API must agree with `sweep results --format json`, bad requests get
//! clear 4xx answers, the metrics parse and count what happened, and
//! headless Chromium renders every view with its rows and plotted points
//! (screenshots under target/dashboard-screenshots/).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use ringleader_coordinator::sweep::client::{self as sweeps, results_json, SweepView};
use ringleader_coordinator::sweep::records::wire_name;
use ringleader_coordinator::sweep::{SweepKind, SweepState, TrialState};
use ringleader_tests::sweeps::{client, must_finish_sweep, must_submit, write_spec, BraninSweep};
use ringleader_tests::web::{
    count_attribute, get, parse_openmetrics, plot_points, render, request, sample, Sample,
};
use ringleader_tests::{must_create_token, TestCluster};

const FINISH: Duration = Duration::from_secs(120);
const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// Two ranks, two epochs, a validation split: curves with real values.
fn tiny_job() -> String {
    format!(
        r#"
name = "dashboard-mlp"
workers = 2
epochs = 2
batch_size = 50
seed = 5

[dataset]
format = "idx"
classes = 10
normalize = {{ kind = "fixed", mean = 0.2860, std = 0.3530 }}
limit_train = 600
limit_test = 200
validation_fraction = 0.2

[dataset.train]
images = "{FASHION}/train-images-idx3-ubyte.gz"
labels = "{FASHION}/train-labels-idx1-ubyte.gz"

[dataset.test]
images = "{FASHION}/t10k-images-idx3-ubyte.gz"
labels = "{FASHION}/t10k-labels-idx1-ubyte.gz"

[model]
kind = "mlp"
hidden = [32]

[optimizer]
kind = "sgd"
lr = 0.05
"#
    )
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

async fn metrics_of(address: SocketAddr) -> Vec<Sample> {
    let answer = get(address, None, "/metrics", None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    parse_openmetrics(&answer.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_api_and_metrics_show_what_the_cluster_did() {
    let mut cluster = TestCluster::start(2, 2).await;
    cluster.must_form(Duration::from_secs(60)).await;
    let admin = client(&cluster);
    let sweep_spec = BraninSweep::instant_asha(12).spec();
    let sweep_id = must_submit(&cluster, "sweep.toml", &sweep_spec).await;
    let sweep = must_finish_sweep(&admin, &sweep_id, FINISH).await;
    let job_file = write_spec(&cluster, "job.toml", &tiny_job());
    let job_id = sweeps::submit(&admin, SweepKind::Job, &job_file)
        .await
        .expect("job submitted");
    let job = must_finish_sweep(&admin, &job_id, FINISH).await;
    assert_eq!(job.record.state, SweepState::Completed, "{:?}", job.trials);
    assert!(sweep.trials.iter().any(|t| t.state == TrialState::Stopped));

    let ca = cluster.cluster.ca_certificate_path();
    let token = cluster
        .cluster
        .connection(Duration::from_secs(5))
        .token
        .expect("a secure cluster's admin token");
    let token = token.reveal().to_string();
    let dashboards: Vec<SocketAddr> = cluster
        .cluster
        .coordinators()
        .iter()
        .map(|m| m.dashboard.expect("every coordinator serves a dashboard"))
        .collect();

    // Leader's and standby's dashboards give the numbers the CLI gives.
    let results = results_json(&sweep);
    for &dashboard in &dashboards {
        let answer = get(
            dashboard,
            Some(&ca),
            &format!("/api/v1/sweeps/{sweep_id}"),
            Some(&token),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let api = answer.json();
        for key in ["sweep", "final_estimate", "leaderboard"] {
            assert_eq!(api[key], results[key], "{key} differs from the CLI's");
        }
        assert_eq!(api["trials"].as_array().unwrap().len(), sweep.trials.len());
    }
    let dashboard = dashboards[0];
    let api = |path: String| {
        let (ca, token) = (ca.clone(), token.clone());
        async move { get(dashboard, Some(&ca), &path, Some(&token)).await }
    };
    let trial = api(format!("/api/v1/sweeps/{job_id}/trials/0")).await;
    assert_eq!(trial.status, 200);
    assert_eq!(trial.json(), serde_json::to_value(&job.trials[0]).unwrap());
    let curves = api(format!("/api/v1/sweeps/{job_id}/curves?metric=val_loss")).await;
    assert_eq!(
        curves.json()["trials"][0]["epochs"],
        serde_json::json!([1, 2])
    );
    let listed = api("/api/v1/sweeps".into()).await.json();
    let summary = &listed["sweeps"][0]["summary"];
    assert_eq!(listed["sweeps"][0]["id"], sweep_id.as_str());
    assert_eq!(summary["best_trial"], sweep.best().unwrap().number);
    let cluster_view = api("/api/v1/cluster".into()).await.json();
    assert_eq!(cluster_view["workers"].as_array().unwrap().len(), 2);

    bad_requests_get_clear_answers(dashboard, &ca, &token, &sweep_id).await;

    // Owners and roles: another user sees none of the admin's work.
    let bob = must_create_token(&cluster, "bob", "user");
    let bobs = get(dashboard, Some(&ca), "/api/v1/sweeps", Some(&bob.reveal())).await;
    assert_eq!(bobs.json()["sweeps"], serde_json::json!([]));
    let refused = get(
        dashboard,
        Some(&ca),
        &format!("/api/v1/sweeps/{sweep_id}"),
        Some(&bob.reveal()),
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.body);

    metrics_count_what_happened(&mut cluster, &[&sweep, &job]).await;

    the_browser_renders_every_view(dashboard, &token, &sweep, &job);
}

async fn bad_requests_get_clear_answers(
    dashboard: SocketAddr,
    ca: &std::path::Path,
    token: &str,
    sweep_id: &str,
) {
    let cases = [
        (
            get(dashboard, Some(ca), "/api/v1/sweeps/sweep-999", Some(token)).await,
            404,
        ),
        (
            get(dashboard, Some(ca), "/api/v1/sweeps?%%%&&==", Some(token)).await,
            400,
        ),
        (
            get(
                dashboard,
                Some(ca),
                &format!("/api/v1/sweeps/{sweep_id}/trials/x"),
                Some(token),
            )
            .await,
            400,
        ),
        (
            get(dashboard, Some(ca), "/api/v1/nothing", Some(token)).await,
            404,
        ),
        (get(dashboard, Some(ca), "/api/v1/sweeps", None).await, 401),
        (
            get(dashboard, Some(ca), "/api/v1/sweeps", Some("rlt_forged")).await,
            401,
        ),
        (
            request(
                dashboard,
                Some(ca),
                "POST /api/v1/sweeps HTTP/1.1\r\nContent-Length: 0",
            )
            .await,
            405,
        ),
    ];
    for (got, status) in cases {
        assert_eq!(got.status, status, "{}", got.body);
        assert!(
            got.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{status}: {}",
            got.body
        );
    }
    // A browser without a token is told how to sign in, not CLI flags.
    let unsigned = get(dashboard, Some(ca), "/api/v1/cluster", None).await;
    assert_eq!(unsigned.status, 401);
    assert!(
        unsigned.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("sign in"),
        "{}",
        unsigned.body
    );
    // A head far over the limit: refused, and the server goes on.
    let huge = format!(
        "GET /api/v1/sweeps HTTP/1.1\r\nX-Padding: {}",
        "a".repeat(200_000)
    );
    let got = request(dashboard, Some(ca), &huge).await;
    assert_eq!(got.status, 431, "{}", got.body);
    // Plain HTTP on the HTTPS port gets no page, and the server goes on.
    let mut plain = tokio::net::TcpStream::connect(dashboard).await.unwrap();
    plain
        .write_all(b"GET /api/v1/sweeps HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut reply)).await;
    assert!(!reply.starts_with(b"HTTP/1.1 200"), "plaintext was served");
    assert_eq!(
        get(dashboard, Some(ca), "/api/v1/sweeps", Some(token))
            .await
            .status,
        200
    );
}

async fn metrics_count_what_happened(cluster: &mut TestCluster, views: &[&SweepView]) {
    let leader = cluster
        .cluster
        .status(Duration::from_secs(5))
        .await
        .unwrap()
        .leader_address;
    let mut leaders = 0.0;
    for member in cluster.cluster.coordinators().iter() {
        let samples = metrics_of(member.metrics).await;
        let is_leader = sample(&samples, "ringleader_is_leader", &[]).unwrap();
        leaders += is_leader;
        assert_eq!(is_leader == 1.0, member.address == leader);
        if member.address != leader {
            continue;
        }
        let mut trials_by_state = std::collections::BTreeMap::<String, f64>::new();
        let mut attempts = 0usize;
        for view in views {
            for t in &view.trials {
                *trials_by_state.entry(wire_name(t.state)).or_default() += 1.0;
                attempts += t.attempts.len();
            }
        }
        for (state, count) in &trials_by_state {
            assert_eq!(
                sample(&samples, "ringleader_trials", &[("state", state)]),
                Some(*count),
                "trials {state}"
            );
        }
        let attempts_total: f64 = samples
            .iter()
            .filter(|s| s.name == "ringleader_attempts")
            .map(|s| s.value)
            .sum();
        assert_eq!(attempts_total, attempts as f64);
        assert_eq!(
            sample(&samples, "ringleader_sweeps", &[("state", "completed")]),
            Some(views.len() as f64)
        );
        assert_eq!(
            sample(&samples, "ringleader_workers", &[("state", "idle")]),
            Some(2.0)
        );
        assert_eq!(
            sample(&samples, "ringleader_scheduler_queued_trials", &[]),
            Some(0.0)
        );
        assert!(sample(&samples, "ringleader_etcd_commit_seconds_count", &[]).unwrap() > 0.0);
        assert_eq!(
            sample(&samples, "ringleader_leader_terms_won_total", &[]),
            Some(1.0)
        );
    }
    assert_eq!(leaders, 1.0, "exactly one coordinator says it leads");

    // Every epoch any rank trained, counted once per rank.
    let trained: f64 = views
        .iter()
        .flat_map(|v| v.trials.iter())
        .map(|t| (t.metrics.len() * t.attempts.last().map_or(0, |a| a.workers.len())) as f64)
        .sum();
    let mut epochs = 0.0;
    for member in cluster.cluster.workers().iter() {
        let samples = metrics_of(member.metrics).await;
        epochs += sample(&samples, "ringleader_worker_epochs_total", &[]).unwrap();
        // Both ranks of the job all-reduced gradients over the ring.
        assert!(sample(&samples, "ringleader_worker_all_reduces_total", &[]).unwrap() > 0.0);
        assert!(
            sample(
                &samples,
                "ringleader_worker_all_reduce_bus_bytes_total",
                &[]
            )
            .unwrap()
                > 0.0
        );
        let age = sample(&samples, "ringleader_worker_heartbeat_age_seconds", &[]).unwrap();
        assert!((0.0..10.0).contains(&age), "heartbeat age {age}");
    }
    assert_eq!(epochs, trained);
}

fn the_browser_renders_every_view(
    dashboard: SocketAddr,
    token: &str,
    sweep: &SweepView,
    job: &SweepView,
) {
    let shots = screenshots();
    let url = |view: &str| format!("https://{dashboard}/#token={token}&{view}");

    let overview = render(&url("/"), &shots.join("overview.png"));
    assert_eq!(
        count_attribute(&overview, "data-ready", Some("true")),
        1,
        "{overview}"
    );
    assert_eq!(count_attribute(&overview, "data-worker", None), 2);
    for id in [&sweep.record.id, &job.record.id] {
        assert_eq!(
            count_attribute(&overview, "data-sweep", Some(id)),
            1,
            "{id}"
        );
    }
    assert!(!overview.contains(token), "the token stays out of the page");

    let page = render(
        &url(&format!("/sweeps/{}", sweep.record.id)),
        &shots.join("sweep.png"),
    );
    assert_eq!(
        count_attribute(&page, "data-ready", Some("true")),
        1,
        "{page}"
    );
    assert_eq!(
        count_attribute(&page, "data-trial", None),
        sweep.trials.len()
    );
    let finished = sweep
        .trials
        .iter()
        .filter(|t| t.objective.is_some_and(f64::is_finite))
        .count();
    assert_eq!(plot_points(&page, "history"), finished);
    let epochs: usize = sweep.trials.iter().map(|t| t.metrics.len()).sum();
    assert_eq!(plot_points(&page, "curves"), epochs);
    assert!(plot_points(&page, "parallel") > 0);
    assert!(plot_points(&page, "importance") > 0);

    let trial = render(
        &url(&format!("/sweeps/{}/trials/0", job.record.id)),
        &shots.join("trial.png"),
    );
    assert_eq!(
        count_attribute(&trial, "data-ready", Some("true")),
        1,
        "{trial}"
    );
    assert_eq!(count_attribute(&trial, "data-epoch", None), 2);
    assert_eq!(count_attribute(&trial, "data-attempt", None), 1);
    // train, val and test loss at two epochs each.
    assert_eq!(plot_points(&trial, "trial-loss"), 6);
    assert!(plot_points(&trial, "trial-throughput") > 0);

    let signed_out = render(&format!("https://{dashboard}/"), &shots.join("token.png"));
    assert_eq!(
        count_attribute(&signed_out, "data-view", Some("token")),
        1,
        "{signed_out}"
    );
}
