//! Test harness: real etcd, coordinators and workers as processes on free
//! loopback ports, in a private temp directory, all killed on drop (also
//! when a test panics; their logs are printed then).
//!
//! Binaries come from `RINGLEADER_BIN_DIR` (scripts/test.sh sets it to
//! target/release), else from the target directory this test was built in.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use std::sync::Arc;

use ringleader_coordinator::client::Connection;
use ringleader_coordinator::local::{EtcdServer, LocalCluster, LocalClusterOptions};
use ringleader_proto::coordinator::{ClusterStatusResponse, WhoIsLeaderRequest, WorkerState};
use ringleader_security::{Role, TlsDir, Token, Transport};

pub mod chaos;
pub mod sweeps;
pub mod web;

/// Default election lease for test clusters (the product default).
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// Directory holding `ringleader` and `ringleader-worker`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RINGLEADER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test-exe> → target/<profile>
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf();
    assert!(
        dir.join("ringleader").is_file() && dir.join("ringleader-worker").is_file(),
        "binaries not found in {}: run `cargo build --workspace` (same profile) first, or set RINGLEADER_BIN_DIR",
        dir.display()
    );
    dir
}

/// `ringleader` or `ringleader-worker` with arguments.
pub fn command(binary: &str) -> Command {
    Command::new(bin_dir().join(binary))
}

/// `etcdctl` (v3 API) for `endpoints`, with the client certificate in
/// `tls` (an etcd-client TLS directory) when etcd runs with TLS.
fn etcdctl_command(endpoints: &[String], tls: Option<&Path>) -> Command {
    let mut command = Command::new("etcdctl");
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")));
    if let Some(dir) = tls {
        command
            .arg(format!("--cacert={}", dir.join("ca.crt").display()))
            .arg(format!("--cert={}", dir.join("tls.crt").display()))
            .arg(format!("--key={}", dir.join("tls.key").display()));
    }
    command
}

/// Runs `etcdctl` (v3 API) against a plaintext etcd at `endpoints`: a
/// client we did not write. [`TestCluster::etcdctl`] for a cluster's etcd.
pub fn etcdctl(endpoints: &[String], args: &[&str]) -> Output {
    etcdctl_with(endpoints, None, args)
}

fn etcdctl_with(endpoints: &[String], tls: Option<&Path>, args: &[&str]) -> Output {
    etcdctl_command(endpoints, tls)
        .arg("--command-timeout=5s")
        .args(args)
        .output()
        .expect("etcdctl runs (scripts/setup.sh installs etcd-client)")
}

/// The leader value of `election` as `etcdctl elect -l` (observe mode)
/// first reports it, or "" after 10 s. etcdctl keeps observing, so it is
/// killed once it has answered.
fn etcdctl_observe_leader(endpoints: &[String], tls: Option<&Path>, election: &str) -> String {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = etcdctl_command(endpoints, tls)
        .args(["elect", "-l", election])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl runs (scripts/setup.sh installs etcd-client)");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    // Output is the leader's key on one line, then its value.
    std::thread::spawn(move || {
        let value = BufReader::new(stdout).lines().nth(1).and_then(|l| l.ok());
        let _ = tx.send(value.unwrap_or_default());
    });
    let value = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    value
}

/// Polls `probe` until it returns `Some`, or panics after `timeout` with
/// `what` and the last observation.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A local cluster for one test.
pub struct TestCluster {
    pub cluster: LocalCluster,
    dir: tempfile::TempDir,
}

impl TestCluster {
    /// Private etcd, `coordinators` coordinators and `workers` CPU workers.
    pub async fn start(coordinators: usize, workers: usize) -> Self {
        Self::start_with(coordinators, workers, Vec::new()).await
    }

    /// [`TestCluster::start`] with extra `ringleader serve` arguments.
    pub async fn start_with(
        coordinators: usize,
        workers: usize,
        coordinator_args: Vec<String>,
    ) -> Self {
        Self::start_secured(coordinators, workers, coordinator_args, true).await
    }

    /// [`TestCluster::start_with`], secure (mutual TLS, tokens: what the
    /// README runs) or with every process `--insecure` (`secure: false`,
    /// for benchmarks that measure what security costs).
    pub async fn start_secured(
        coordinators: usize,
        workers: usize,
        coordinator_args: Vec<String>,
        secure: bool,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ringleader-test-")
            .tempdir()
            .expect("temp dir");
        let options = LocalClusterOptions {
            workers,
            coordinators,
            etcd: None,
            lease_ttl: LEASE_TTL,
            device: "cpu".into(),
            dir: dir.path().to_path_buf(),
            coordinator_args,
            bin_dir: Some(bin_dir()),
            secure,
            // Tests write their data into their own directory.
            data_roots: vec![
                dir.path().to_path_buf(),
                PathBuf::from("/usr/share/datasets"),
                PathBuf::from("/var/tmp/ringleader"),
            ],
            dashboard_listen: None,
        };
        let cluster = LocalCluster::start(options).await.expect("cluster starts");
        Self { cluster, dir }
    }

    /// The test's private directory (logs, etcd data, checkpoints).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.cluster.etcd_endpoints().to_vec()
    }

    /// The etcd-client TLS directory of this cluster's etcd.
    fn etcd_tls(&self) -> Option<&Path> {
        self.cluster
            .etcd
            .as_ref()
            .and_then(|e| e.client_tls())
            .map(|t| t.dir.as_path())
    }

    /// Runs `etcdctl` against this cluster's etcd, with its client
    /// certificate.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        etcdctl_with(&self.etcd_endpoints(), self.etcd_tls(), args)
    }

    /// `etcdctl elect -l` on this cluster's etcd: the leader value of
    /// `election`, or "" after 10 s.
    pub fn etcdctl_observe_leader(&self, election: &str) -> String {
        etcdctl_observe_leader(&self.etcd_endpoints(), self.etcd_tls(), election)
    }

    /// A connection with the certificate of `role` and no token (a
    /// worker, or a client that has not said who it is).
    pub fn connection_as(&self, role: Role, timeout: Duration) -> Connection {
        let certs = self.cluster.certs().expect("test clusters are secure");
        let dir = TlsDir::load_for(&certs.join(role.as_str()), role).expect("role certificate");
        Connection {
            transport: Transport::Tls(Arc::new(dir)),
            token: None,
            ..self.connection(timeout)
        }
    }

    /// A connection to the cluster as its admin.
    pub fn connection(&self, timeout: Duration) -> Connection {
        self.cluster.connection(timeout)
    }

    /// [`TestCluster::start`], then waits (up to a minute) for it to form.
    pub async fn must_start_formed(coordinators: usize, workers: usize) -> Self {
        let mut cluster = Self::start(coordinators, workers).await;
        cluster.must_form(Duration::from_secs(60)).await;
        cluster
    }

    /// Waits for a leader with every live worker registered and idle.
    pub async fn must_form(&mut self, timeout: Duration) -> ClusterStatusResponse {
        match self.cluster.wait_ready(timeout).await {
            Ok(status) => status,
            Err(error) => panic!("cluster did not form: {error}"),
        }
    }

    /// The private etcd (to freeze, kill or restart).
    pub fn etcd(&mut self) -> &mut EtcdServer {
        self.cluster
            .etcd
            .as_mut()
            .expect("test clusters run a private etcd")
    }

    /// Restarts etcd from its data directory and waits until it answers.
    pub async fn must_restart_etcd(&mut self) {
        let etcd = self.etcd();
        etcd.restart().expect("etcd restarts");
        etcd.wait_ready(Duration::from_secs(20))
            .await
            .expect("etcd answers after a restart");
    }

    /// Index of worker `id` among the cluster's workers.
    pub fn worker_index(&mut self, id: &str) -> usize {
        self.cluster
            .workers()
            .iter()
            .position(|w| w.id == id)
            .unwrap_or_else(|| panic!("no worker {id}"))
    }

    /// Starts worker `id` again with the same id and peer address.
    pub fn restart_worker(&mut self, id: &str) {
        let index = self.worker_index(id);
        self.cluster.restart_worker(index).expect("worker restarts");
    }

    /// Which coordinators claim to lead right now: each is asked
    /// `WhoIsLeader` with a short deadline (a leader answers from memory at
    /// once; one that does not answer in time is not leading).
    pub async fn claimed_leaders(&self) -> Vec<String> {
        let mut leaders = Vec::new();
        for address in self.cluster.coordinator_addresses() {
            let deadline = Duration::from_millis(500);
            let connection = self.connection(deadline);
            let Ok(mut client) =
                ringleader_coordinator::client::connect(&connection, &address).await
            else {
                continue;
            };
            let answer =
                tokio::time::timeout(deadline, client.who_is_leader(WhoIsLeaderRequest {})).await;
            if let Ok(Ok(response)) = answer {
                if response.into_inner().is_leader {
                    leaders.push(address);
                }
            }
        }
        leaders
    }

    /// SIGKILLs the current leader; returns its address.
    pub async fn kill_leader(&mut self) -> String {
        let status = self.must_form(Duration::from_secs(30)).await;
        let leader = status.leader_address;
        let member = self
            .cluster
            .coordinators()
            .iter_mut()
            .find(|m| m.address == leader)
            .expect("the leader is one of our coordinators");
        member.process.kill();
        leader
    }

    /// Waits until a coordinator other than `old` leads and has all
    /// `workers` registered and idle; returns its status.
    pub async fn must_fail_over(
        &self,
        old: &str,
        workers: usize,
        timeout: Duration,
    ) -> ClusterStatusResponse {
        wait_until(
            "a new leader with every worker re-registered",
            timeout,
            || async {
                let status = self
                    .cluster
                    .status(Duration::from_millis(500))
                    .await
                    .map_err(|e| e.to_string())?;
                let idle = idle_workers(&status);
                if status.leader_address != old && idle == workers {
                    Ok(status)
                } else {
                    Err(format!(
                        "leader {} with {idle} idle workers",
                        status.leader_address
                    ))
                }
            },
        )
        .await
    }
}

/// How many of the cluster's workers are registered and idle.
pub fn idle_workers(status: &ClusterStatusResponse) -> usize {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Idle as i32)
        .count()
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- logs of the failed test's cluster ({}) ---",
                self.dir.path().display()
            );
            if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "log") {
                        let text = std::fs::read_to_string(&path).unwrap_or_default();
                        let lines: Vec<&str> = text.lines().collect();
                        eprintln!("== {} ==", path.display());
                        for line in &lines[lines.len().saturating_sub(30)..] {
                            eprintln!("{line}");
                        }
                    }
                }
            }
        }
        self.cluster.shutdown(Duration::from_secs(5));
    }
}

/// `ringleader token create` as the cluster's admin; returns the token.
pub fn must_create_token(cluster: &TestCluster, name: &str, role: &str) -> Token {
    let out = command("ringleader")
        .env("RINGLEADER_CONFIG", cluster.cluster.client_config_path())
        .args(["token", "create", "--name", name, "--role", role])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Token::parse(&String::from_utf8_lossy(&out.stdout)).expect("token create prints the token")
}
