//! Foundation: a cluster forms, fails over, fences deposed leaders and
//! rejects bad input — all with real etcd and real processes.

use std::time::{Duration, Instant};

use ringleader_coordinator::client;
use ringleader_coordinator::election::{Election, Role, ELECTION_NAME};
use ringleader_coordinator::etcd::Etcd;
use ringleader_coordinator::local::EtcdServer;
use ringleader_coordinator::process::{free_loopback_address, ManagedChild};
use ringleader_coordinator::store::FencedStore;
use ringleader_coordinator::Error;
use ringleader_proto::coordinator::{WhoIsLeaderRequest, WorkerState};
use ringleader_tests::{command, etcdctl, wait_until, TestCluster, LEASE_TTL};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_of_two_coordinators_and_three_workers_forms_with_one_leader() {
    let mut cluster = TestCluster::start(2, 3).await;
    let status = cluster.must_form(Duration::from_secs(60)).await;

    // Every coordinator agrees on one leader, and exactly one claims it.
    let mut claims = 0;
    for address in cluster.cluster.coordinator_addresses() {
        let mut c = client::connect(&cluster.connection(Duration::from_secs(2)), &address)
            .await
            .unwrap();
        let answer = c
            .who_is_leader(WhoIsLeaderRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            answer.leader_address, status.leader_address,
            "{address} names another leader"
        );
        claims += usize::from(answer.is_leader);
    }
    assert_eq!(claims, 1, "exactly one coordinator must claim leadership");
    assert_eq!(status.coordinators.len(), 2);
    assert_eq!(status.coordinators.iter().filter(|c| c.leader).count(), 1);

    let ids: Vec<_> = status
        .workers
        .iter()
        .map(|w| w.worker_id.as_str())
        .collect();
    assert_eq!(ids, ["worker-0", "worker-1", "worker-2"]);
    for worker in &status.workers {
        assert_eq!(worker.state, WorkerState::Idle as i32);
        let resources = worker.resources.clone().unwrap();
        assert_eq!(resources.device, "cpu");
        assert!(resources.cpu_cores >= 1);
        assert!(!worker.peer_address.is_empty());
    }

    // etcdctl, a client we did not write, reads the same leader.
    let observed = cluster.etcdctl_observe_leader(ELECTION_NAME);
    assert_eq!(observed, status.leader_address);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_is_replaced_and_workers_reregister_within_two_ttls() {
    let mut cluster = TestCluster::must_start_formed(2, 3).await;
    let old = cluster.kill_leader().await;
    let killed_at = Instant::now();
    let bound = LEASE_TTL * 2 + Duration::from_secs(1);
    let status = cluster.must_fail_over(&old, 3, bound).await;
    eprintln!("failover took {:?}", killed_at.elapsed());
    assert_ne!(status.leader_address, old);
    // The dead coordinator's candidacy is gone from the election.
    assert_eq!(status.coordinators.len(), 1);
}

/// Runs an in-process candidate until it leads; returns its term.
async fn must_lead(
    etcd: &Etcd,
    advertise: &str,
    shutdown: &CancellationToken,
) -> (Role, tokio::sync::watch::Receiver<Role>) {
    let election = Election::new(etcd.clone(), advertise.into(), LEASE_TTL).unwrap();
    let mut role = election.subscribe();
    tokio::spawn(election.run(shutdown.clone()));
    let term = tokio::time::timeout(
        Duration::from_secs(20),
        role.wait_for(|r| r.term().is_some()),
    )
    .await
    .expect("elected in time")
    .unwrap()
    .clone();
    (term, role)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposed_leaders_fenced_write_is_rejected_by_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = EtcdServer::start(dir.path(), None).unwrap();
    server.wait_ready(Duration::from_secs(20)).await.unwrap();
    let endpoints = vec![server.client_url.clone()];
    let etcd = Etcd::connect(&endpoints, Duration::from_secs(2), None)
        .await
        .unwrap();
    let shutdown_a = CancellationToken::new();
    let (role_a, mut watch_a) = must_lead(&etcd, "leader-a", &shutdown_a).await;
    let term_a = role_a.term().unwrap().clone();
    let store_a = FencedStore::new(etcd.clone(), &term_a);
    store_a
        .put("/ringleader/test/owner", "a")
        .await
        .expect("the leader may write");

    // Depose A behind its back: revoke its lease with etcdctl, as if it had
    // been paused past its TTL. B then wins.
    let out = etcdctl(
        &endpoints,
        &["lease", "revoke", &format!("{:x}", term_a.lease)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shutdown_b = CancellationToken::new();
    let (role_b, _) = must_lead(&etcd, "leader-b", &shutdown_b).await;
    let store_b = FencedStore::new(etcd.clone(), role_b.term().unwrap());

    // A's old store still believes in its term: etcd refuses the write.
    match store_a.put("/ringleader/test/owner", "a-stale").await {
        Err(Error::FencedOut { revision, .. }) => assert_eq!(revision, term_a.create_revision),
        other => panic!("deposed write must be fenced out, got {other:?}"),
    }
    store_b
        .put("/ringleader/test/owner", "b")
        .await
        .expect("the new leader may write");
    let out = etcdctl(
        &endpoints,
        &["get", "--print-value-only", "/ringleader/test/owner"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "b");

    // A noticed too: its term token is cancelled and it is a candidate.
    assert!(
        term_a.token.is_cancelled() || {
            tokio::time::timeout(Duration::from_secs(5), term_a.token.cancelled())
                .await
                .is_ok()
        }
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        watch_a.wait_for(|r| r.term().map(|t| t.create_revision) != Some(term_a.create_revision)),
    )
    .await;
    assert_ne!(
        watch_a.borrow().term().map(|t| t.create_revision),
        Some(term_a.create_revision)
    );
    shutdown_a.cancel();
    shutdown_b.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_unreachable_etcd_exits_nonzero_within_ten_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let dead_etcd = format!("http://{}", free_loopback_address().unwrap());
    let listen = free_loopback_address().unwrap();
    let mut cmd = command("ringleader");
    cmd.args([
        "serve",
        "--insecure",
        &format!("--listen={listen}"),
        &format!("--etcd={dead_etcd}"),
    ]);
    let log = dir.path().join("serve.log");
    let mut child = ManagedChild::spawn("serve", cmd, &log).unwrap();
    let started = Instant::now();
    let status = wait_until("serve to exit", Duration::from_secs(10), || {
        let exited = child.exit_status();
        async move { exited.ok_or_else(|| "still running".to_string()) }
    })
    .await;
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("etcd") && text.contains(&dead_etcd),
        "unclear message: {text}"
    );
    eprintln!("exited after {:?}: {text}", started.elapsed());
}

#[test]
fn invalid_flags_are_rejected_by_clap() {
    for (binary, args, needle) in [
        (
            "ringleader",
            vec!["serve", "--etcd=http://x:1", "--lease-ttl=soon"],
            "--lease-ttl",
        ),
        (
            "ringleader",
            vec!["serve", "--listen=not-an-address", "--etcd=x"],
            "--listen",
        ),
        ("ringleader", vec!["serve"], "--etcd"),
        ("ringleader", vec!["launch"], "launch"),
        (
            "ringleader-worker",
            vec!["--coordinator=a:1", "--device=gpu"],
            "--device",
        ),
    ] {
        let out = command(binary).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{binary} {args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{binary} {args:?} should name {needle}: {stderr}"
        );
    }
}

#[test]
fn status_against_a_dead_address_errors_clearly() {
    let dead = free_loopback_address().unwrap();
    let started = Instant::now();
    let out = command("ringleader")
        .args([
            "status",
            "--insecure",
            &format!("--coordinator={dead}"),
            "--timeout=2s",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&dead) && stderr.contains("unreachable"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn local_runs_a_command_against_the_cluster_and_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = command("ringleader")
        .args(["local", "--workers=2", "--coordinators=2"])
        .arg(format!("--dir={}", dir.path().display()))
        .args(["--", "ringleader", "status", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json_start = stdout.find("\n{").expect("status JSON in the output");
    let status: serde_json::Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    assert_eq!(status["workers"].as_array().unwrap().len(), 2);
    assert_eq!(status["coordinators"].as_array().unwrap().len(), 2);
    // Every child was stopped: nothing listens on the leader's port.
    let leader = status["leader"].as_str().unwrap();
    assert!(
        std::net::TcpStream::connect(leader).is_err(),
        "leader {leader} still up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_dies_is_reported() {
    let mut cluster = TestCluster::must_start_formed(1, 2).await;
    assert!(cluster.cluster.first_dead_member().is_none());
    // Killed behind the launcher's back (not through ManagedChild::kill).
    let worker = &mut cluster.cluster.workers()[1];
    worker.process.signal(libc::SIGKILL);
    let report = wait_until("the death to be noticed", Duration::from_secs(5), || {
        let dead = cluster.cluster.first_dead_member();
        async move { dead.ok_or_else(|| "not yet".to_string()) }
    })
    .await;
    assert!(report.to_string().contains("worker-1"), "{report}");
}
