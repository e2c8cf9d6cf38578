//! Secure by default, tried as a stranger would: real certificates, real
//! etcd, coordinators and workers as processes. Plaintext and foreign
//! certificates are refused on every port, certificates' roles decide which
//! calls a component may make, tokens and owners decide what a user may
//! do (and survive a failover), and data outside the workers' roots is
//! refused without telling whether it exists.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ringleader_coordinator::client::{self, Connection};
use ringleader_coordinator::etcd::Etcd;
use ringleader_coordinator::sweep::client as sweeps;
use ringleader_coordinator::sweep::{SweepKind, SweepState, TrialState};
use ringleader_proto::coordinator::{
    worker_message, CancelSweepRequest, CreateTokenRequest, GetSweepRequest, ListSweepsRequest,
    Register, RevokeTokenRequest, WorkerMessage,
};
use ringleader_security::certs::{self, InitOptions};
use ringleader_security::{Role, TlsDir, Token, Transport};
use ringleader_tests::sweeps::{must_finish_sweep, write_spec, BraninSweep};
use ringleader_tests::{command, must_create_token, wait_until, TestCluster};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const TIMEOUT: Duration = Duration::from_secs(5);

fn tls(dir: &Path, role: Role) -> Transport {
    Transport::Tls(Arc::new(
        TlsDir::load_for(dir, role).expect("TLS directory"),
    ))
}

/// A sweep that keeps running for a while (so there is something to
/// cancel), on one worker.
fn slow_sweep() -> String {
    BraninSweep {
        searcher: "random",
        max_trials: 20,
        workers_per_trial: 1,
        max_concurrent: 1,
        max_epochs: 3,
        max_failures: 0,
        epoch_ms: 2000,
    }
    .spec()
}

/// `status` of a failed call, or a panic naming what succeeded.
fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>) -> tonic::Status {
    match result {
        Ok(value) => panic!("{what} should have been refused, got {value:?}"),
        Err(status) => status,
    }
}

fn must_be(what: &str, status: &tonic::Status, code: Code, needle: &str) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(
        status.message().contains(needle),
        "{what}: {:?} should mention {needle:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_foreign_certificates_are_refused_on_every_port() {
    let mut cluster = TestCluster::must_start_formed(1, 1).await;
    let certs = cluster
        .cluster
        .certs()
        .expect("secure by default")
        .to_path_buf();
    let admin = cluster.connection(TIMEOUT);

    // The API: plaintext gRPC gets no answer from any coordinator.
    let plaintext = Connection {
        transport: Transport::Insecure,
        ..admin.clone()
    };
    let error = client::find_leader(&plaintext).await.unwrap_err();
    assert!(
        matches!(error, ringleader_client::ClientError::Unreachable { .. }),
        "{error}"
    );

    // A client certificate from another CA, presented with our CA to check
    // the server: the coordinator refuses the handshake.
    let foreign = tempfile::tempdir().unwrap();
    certs::init(foreign.path(), &InitOptions { hosts: vec![] }).unwrap();
    let mixed = foreign.path().join("mixed-client");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(certs.join("client/ca.crt"), mixed.join("ca.crt")).unwrap();
    for file in ["tls.crt", "tls.key"] {
        std::fs::copy(foreign.path().join("client").join(file), mixed.join(file)).unwrap();
    }
    let foreign_client = Connection {
        transport: tls(&mixed, Role::Client),
        ..admin.clone()
    };
    let error = client::find_leader(&foreign_client).await.unwrap_err();
    assert!(
        matches!(error, ringleader_client::ClientError::Unreachable { .. }),
        "{error}"
    );
    // And a client that trusts only the other CA will not talk to ours.
    let wrong_ca = Connection {
        transport: tls(&foreign.path().join("client"), Role::Client),
        ..admin.clone()
    };
    let error = client::find_leader(&wrong_ca)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("certificate"), "{error}");

    // The ring port: plaintext and foreign certificates get no stream
    // (tests/tests/collective.rs covers proofs and roles on rings).
    let worker_address = cluster.cluster.workers()[0].address.clone();
    for transport in [Transport::Insecure, tls(&mixed, Role::Client)] {
        let endpoint = transport
            .endpoint(&worker_address, Role::Worker)
            .unwrap()
            .connect_timeout(TIMEOUT);
        let connected = tokio::time::timeout(TIMEOUT, async {
            let channel = endpoint.connect().await?;
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .map_err(|s| Box::new(s) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .await;
        assert!(
            !matches!(connected, Ok(Ok(()))),
            "the ring port answered a {} caller",
            if transport.is_tls() {
                "foreign-certificate"
            } else {
                "plaintext"
            }
        );
    }

    // etcd: plaintext, and a certificate of the cluster CA (which every
    // worker and client holds), are refused; only the coordinators' etcd
    // client certificate opens it.
    let endpoints = cluster.etcd_endpoints();
    let plain: Vec<String> = endpoints
        .iter()
        .map(|e| e.replace("https://", "http://"))
        .collect();
    assert!(Etcd::connect(&plain, TIMEOUT, None).await.is_err());
    let worker_dir = TlsDir::load(&certs.join("worker")).unwrap();
    assert!(Etcd::connect(&endpoints, TIMEOUT, Some(&worker_dir))
        .await
        .is_err());
    let etcd_client = TlsDir::load(&certs.join(certs::ETCD_CLIENT_DIR)).unwrap();
    Etcd::connect(&endpoints, TIMEOUT, Some(&etcd_client))
        .await
        .expect("the coordinators' etcd certificate opens etcd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificates_role_decides_which_calls_it_may_make() {
    let cluster = TestCluster::must_start_formed(1, 1).await;
    let admin = cluster.connection(TIMEOUT);

    // A worker's certificate, even with the admin's token, cannot call
    // client APIs.
    let worker = Connection {
        token: admin.token.clone(),
        ..cluster.connection_as(Role::Worker, TIMEOUT)
    };
    let (_, mut as_worker) = client::find_leader(&worker).await.unwrap();
    let status = refused(
        "ListSweeps with a worker certificate",
        as_worker.list_sweeps(ListSweepsRequest::default()).await,
    );
    must_be(
        "worker lists",
        &status,
        Code::PermissionDenied,
        "needs a client certificate",
    );

    // A client (the admin, even) cannot attach as a worker.
    let (_, mut as_client) = client::find_leader(&admin).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WorkerMessage {
        kind: Some(worker_message::Kind::Register(Register {
            worker_id: "impostor".into(),
            host: "h".into(),
            peer_address: "127.0.0.1:1".into(),
            ..Register::default()
        })),
    })
    .await
    .unwrap();
    let status = refused(
        "Attach with a client certificate",
        as_client.attach(ReceiverStream::new(rx)).await.map(|_| ()),
    );
    must_be(
        "client attaches",
        &status,
        Code::PermissionDenied,
        "needs a worker certificate",
    );
    let workers = cluster.cluster.status(TIMEOUT).await.unwrap().workers;
    assert!(workers.iter().all(|w| w.worker_id != "impostor"));
}

fn as_user(cluster: &TestCluster, token: &Token) -> Connection {
    Connection {
        token: Some(token.clone()),
        ..cluster.connection(TIMEOUT)
    }
}

async fn listed(connection: &Connection) -> Result<Vec<String>, tonic::Status> {
    let (_, mut leader) = client::find_leader(connection).await.unwrap();
    let sweeps = leader
        .list_sweeps(ListSweepsRequest::default())
        .await?
        .into_inner()
        .sweep_json;
    Ok(sweeps
        .iter()
        .map(|json| {
            let value: serde_json::Value = serde_json::from_str(json).unwrap();
            value["id"].as_str().unwrap().to_string()
        })
        .collect())
}

async fn cancel(connection: &Connection, id: &str) -> Result<(), tonic::Status> {
    let (_, mut leader) = client::find_leader(connection).await.unwrap();
    leader
        .cancel_sweep(CancelSweepRequest {
            sweep_id: id.into(),
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_owners_decide_what_users_may_do() {
    let mut cluster = TestCluster::must_start_formed(2, 1).await;
    let alice = must_create_token(&cluster, "alice", "user");
    let bob = must_create_token(&cluster, "bob", "user");
    let vera = must_create_token(&cluster, "vera", "viewer");
    let spec = write_spec(&cluster, "slow.toml", &slow_sweep());

    // No token, a malformed one, and one this cluster never issued.
    let nobody = Connection {
        token: None,
        ..cluster.connection(TIMEOUT)
    };
    let status = refused("no token", listed(&nobody).await);
    must_be("no token", &status, Code::Unauthenticated, "no token");
    let status = refused(
        "unknown token",
        listed(&as_user(&cluster, &Token::generate())).await,
    );
    must_be(
        "unknown token",
        &status,
        Code::Unauthenticated,
        "unknown token",
    );

    // Alice submits; the record names her.
    let id = sweeps::submit(&as_user(&cluster, &alice), SweepKind::Sweep, &spec)
        .await
        .unwrap();
    let view = sweeps::get(&as_user(&cluster, &alice), &id).await.unwrap();
    assert_eq!(view.record.owner, "alice");

    // Bob neither sees nor cancels it; the viewer sees it and changes
    // nothing; nobody but an admin manages tokens.
    assert!(!listed(&as_user(&cluster, &bob))
        .await
        .unwrap()
        .contains(&id));
    let (_, mut bobs) = client::find_leader(&as_user(&cluster, &bob)).await.unwrap();
    let status = refused(
        "bob reads alice's sweep",
        bobs.get_sweep(GetSweepRequest {
            sweep_id: id.clone(),
            ..GetSweepRequest::default()
        })
        .await,
    );
    must_be(
        "bob reads",
        &status,
        Code::PermissionDenied,
        "belongs to another user",
    );
    let status = refused(
        "bob cancels alice's sweep",
        cancel(&as_user(&cluster, &bob), &id).await,
    );
    must_be(
        "bob cancels",
        &status,
        Code::PermissionDenied,
        "belongs to another user",
    );
    assert!(listed(&as_user(&cluster, &vera))
        .await
        .unwrap()
        .contains(&id));
    let error = sweeps::submit(&as_user(&cluster, &vera), SweepKind::Sweep, &spec)
        .await
        .unwrap_err();
    assert!(
        matches!(error, ringleader_coordinator::Error::PermissionDenied(_)),
        "{error}"
    );
    let status = refused(
        "the viewer cancels",
        cancel(&as_user(&cluster, &vera), &id).await,
    );
    must_be(
        "viewer cancels",
        &status,
        Code::PermissionDenied,
        "needs the user role",
    );
    let (_, mut alices) = client::find_leader(&as_user(&cluster, &alice))
        .await
        .unwrap();
    let status = refused(
        "a user creates a token",
        alices
            .create_token(CreateTokenRequest {
                name: "mallory".into(),
                role: "admin".into(),
            })
            .await,
    );
    must_be(
        "user creates token",
        &status,
        Code::PermissionDenied,
        "needs the admin role",
    );

    // Revoked: refused at once.
    let (_, mut admin) = client::find_leader(&cluster.connection(TIMEOUT))
        .await
        .unwrap();
    admin
        .revoke_token(RevokeTokenRequest { id: bob.id.clone() })
        .await
        .unwrap();
    let status = refused("a revoked token", listed(&as_user(&cluster, &bob)).await);
    must_be("revoked", &status, Code::Unauthenticated, "revoked");

    // Tokens and owners live in etcd: after a failover alice still owns
    // her sweep and bob is still revoked.
    let old = cluster
        .cluster
        .status(TIMEOUT)
        .await
        .unwrap()
        .leader_address;
    cluster
        .cluster
        .coordinators()
        .iter_mut()
        .find(|m| m.address == old)
        .expect("the leader is ours")
        .process
        .kill();
    let view = wait_until(
        "a new leader serving alice",
        Duration::from_secs(60),
        || async {
            let status = cluster
                .cluster
                .status(TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            if status.leader_address == old {
                return Err("the old leader".into());
            }
            sweeps::get(&as_user(&cluster, &alice), &id)
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await;
    assert_eq!(view.record.owner, "alice");
    let status = refused(
        "a revoked token after failover",
        listed(&as_user(&cluster, &bob)).await,
    );
    must_be(
        "revoked after failover",
        &status,
        Code::Unauthenticated,
        "revoked",
    );

    // Alice cancels her own.
    cancel(&as_user(&cluster, &alice), &id).await.unwrap();
    let view = must_finish_sweep(&as_user(&cluster, &alice), &id, Duration::from_secs(30)).await;
    assert_eq!(view.record.state, SweepState::Cancelled);

    // `token list` shows names and roles, never secrets.
    let out = command("ringleader")
        .env("RINGLEADER_CONFIG", cluster.cluster.client_config_path())
        .args(["token", "list"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("alice") && text.contains("viewer"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("bob") && l.contains("revoked")),
        "{text}"
    );
    for token in [&alice, &bob, &vera] {
        let secret = token.reveal();
        assert!(!text.contains(&secret[secret.len() - 16..]), "{text}");
    }

    // Every change left an audit line naming who made it.
    let logs: String = (0..2)
        .map(|i| {
            std::fs::read_to_string(cluster.dir().join(format!("coordinator-{i}.log")))
                .unwrap_or_default()
        })
        .collect();
    for (user, action) in [
        ("alice", "submit"),
        ("alice", "cancel"),
        ("admin", "token create"),
        ("admin", "token revoke"),
    ] {
        assert!(
            logs.lines().any(|l| l.contains("ringleader::audit")
                && l.contains(&format!("user={user}"))
                && l.contains(action)),
            "no audit line for {user} {action}"
        );
    }
}

/// A one-worker IDX job whose training images are `images`.
fn job_reading(images: &str) -> String {
    format!(
        r#"
name = "confined"
workers = 1
epochs = 1
batch_size = 64

[dataset]
format = "idx"
classes = 10

[dataset.train]
images = "{images}"
labels = "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"

[model]
kind = "mlp"
hidden = [8]

[optimizer]
kind = "sgd"
lr = 0.1
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_outside_the_roots_is_refused_without_saying_whether_it_exists() {
    let cluster = TestCluster::must_start_formed(1, 1).await;
    let admin = cluster.connection(TIMEOUT);
    let mut errors = Vec::new();
    for path in ["/etc/passwd", "/etc/ringleader-no-such-file"] {
        let spec = write_spec(&cluster, "job.toml", &job_reading(path));
        let id = sweeps::submit(&admin, SweepKind::Job, &spec).await.unwrap();
        let view = must_finish_sweep(&admin, &id, Duration::from_secs(60)).await;
        assert_eq!(view.record.state, SweepState::Failed, "{path}");
        let trial = &view.trials[0];
        assert_eq!(trial.state, TrialState::Failed);
        let error = trial.error.clone().unwrap_or_default();
        assert!(error.contains("data root"), "{path}: {error}");
        errors.push(error.replace(path, "<path>"));
    }
    assert_eq!(
        errors[0], errors[1],
        "the errors tell existing from missing files"
    );
}

#[test]
fn security_is_off_only_when_asked_and_then_loudly() {
    // No TLS material and no --insecure: refused, naming both ways out.
    let out = command("ringleader")
        .args(["serve", "--etcd=http://127.0.0.1:1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--tls-dir") && stderr.contains("--insecure"),
        "{stderr}"
    );
    let out = command("ringleader-worker")
        .args(["--coordinator=127.0.0.1:1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--tls-dir"), "{stderr}");

    // --insecure starts, with the warning (here etcd is unreachable, so
    // serve exits right after).
    let out = command("ringleader")
        .args([
            "serve",
            "--insecure",
            "--etcd=http://127.0.0.1:1",
            "--etcd-timeout=1s",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WITHOUT TLS or authentication"), "{stderr}");
}

/// The certificates `certs init` writes are the ones components accept
/// for their roles, and it never overwrites a CA.
#[test]
fn certs_init_writes_a_tls_directory_per_role() {
    let dir = tempfile::tempdir().unwrap();
    let target: PathBuf = dir.path().join("certs");
    let out = command("ringleader")
        .args(["certs", "init", "--dir"])
        .arg(&target)
        .args(["--host", "coordinator.example"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for role in Role::ALL {
        TlsDir::load_for(&target.join(role.as_str()), role).unwrap();
    }
    let again = command("ringleader")
        .args(["certs", "init", "--dir"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
}
