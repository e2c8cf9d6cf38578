//! A whole cluster as local processes: a private etcd, M coordinators and
//! N workers on free loopback ports, everything under one directory.
//!
//! Used by `ringleader local` (the zero-configuration default) and by the
//! integration tests, which reach into it to kill and restart members.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ringleader_proto::coordinator::{ClusterStatusRequest, ClusterStatusResponse, WorkerState};

use std::sync::Arc;

use ringleader_security::{certs, tls, Role, TlsDir, Transport};

use crate::client::{self, Connection};
use crate::client_config::{self, ClientConfig};
use crate::error::{Error, Result};
use crate::etcd::Etcd;
use crate::process::{free_loopback_address, free_port, sibling_binary, ManagedChild};

/// A single-member etcd with its data under a directory we own.
pub struct EtcdServer {
    pub client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    /// etcd's own certificate (client and peer TLS), when secure.
    server_tls: Option<PathBuf>,
    /// What a client of this etcd presents, when secure.
    client_tls: Option<TlsDir>,
    child: ManagedChild,
}

impl EtcdServer {
    /// Starts etcd (from `PATH`, or `RINGLEADER_ETCD_BIN`) under `dir`;
    /// with `certs` (as `certs init` wrote them), clients and the peer
    /// port need TLS and a certificate from etcd's own CA.
    pub fn start(dir: &Path, certs: Option<&Path>) -> Result<Self> {
        let scheme = if certs.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{}", free_port()?);
        let peer_url = format!("{scheme}://127.0.0.1:{}", free_port()?);
        let data_dir = dir.join("etcd-data");
        let log = dir.join("etcd.log");
        let server_tls = certs.map(|c| c.join(certs::ETCD_SERVER_DIR));
        let client_tls = match certs {
            Some(c) => Some(TlsDir::load(&c.join(certs::ETCD_CLIENT_DIR)).map_err(security_error)?),
            None => None,
        };
        let child = Self::spawn(
            &client_url,
            &peer_url,
            &data_dir,
            &log,
            "new",
            server_tls.as_deref(),
        )?;
        Ok(Self {
            client_url,
            peer_url,
            data_dir,
            log,
            server_tls,
            client_tls,
            child,
        })
    }

    /// The client certificate this etcd takes, when it runs with TLS.
    pub fn client_tls(&self) -> Option<&TlsDir> {
        self.client_tls.as_ref()
    }

    fn spawn(
        client_url: &str,
        peer_url: &str,
        data_dir: &Path,
        log: &Path,
        state: &str,
        tls: Option<&Path>,
    ) -> Result<ManagedChild> {
        let bin = std::env::var("RINGLEADER_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let mut command = Command::new(bin);
        if let Some(tls) = tls {
            let file = |name: &str| tls.join(name).display().to_string();
            command
                .arg("--client-cert-auth")
                .arg(format!("--trusted-ca-file={}", file(tls::CA_FILE)))
                .arg(format!("--cert-file={}", file(tls::CERT_FILE)))
                .arg(format!("--key-file={}", file(tls::KEY_FILE)))
                .arg("--peer-client-cert-auth")
                .arg(format!("--peer-trusted-ca-file={}", file(tls::CA_FILE)))
                .arg(format!("--peer-cert-file={}", file(tls::CERT_FILE)))
                .arg(format!("--peer-key-file={}", file(tls::KEY_FILE)));
        }
        command
            .arg("--name=ringleader-local")
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=ringleader-local={peer_url}"))
            .arg(format!("--initial-cluster-state={state}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            // etcd's default of fsync-heavy snapshots every 100k writes is
            // fine; keep the heartbeat/election defaults of a real member.
            ;
        ManagedChild::spawn("etcd", command, log)
    }

    /// Waits until etcd answers, or fails with its log tail.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.exit_status() {
                return Err(Error::Process {
                    what: "etcd".into(),
                    reason: format!(
                        "exited with {status} before answering; is etcd installed (scripts/setup.sh)? log:\n{}",
                        self.child.log_tail(20)
                    ),
                });
            }
            if Etcd::connect(
                std::slice::from_ref(&self.client_url),
                Duration::from_millis(500),
                self.client_tls.as_ref(),
            )
            .await
            .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Process {
                    what: "etcd".into(),
                    reason: format!(
                        "not answering after {timeout:?}; log:\n{}",
                        self.child.log_tail(20)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The etcd process, to kill, freeze (SIGSTOP) or inspect.
    pub fn process(&mut self) -> &mut ManagedChild {
        &mut self.child
    }

    /// Restarts etcd on the same ports and data directory (after a kill).
    pub fn restart(&mut self) -> Result<()> {
        self.child.kill();
        self.child = Self::spawn(
            &self.client_url,
            &self.peer_url,
            &self.data_dir,
            &self.log,
            "existing",
            self.server_tls.as_deref(),
        )?;
        Ok(())
    }
}

/// How to lay out a local cluster.
#[derive(Clone, Debug)]
pub struct LocalClusterOptions {
    pub workers: usize,
    pub coordinators: usize,
    /// Use this etcd instead of starting a private one.
    pub etcd: Option<Vec<String>>,
    pub lease_ttl: Duration,
    /// Passed to every worker (`auto`, `cpu`, `cuda:N`).
    pub device: String,
    /// Holds etcd's data and every process's log.
    pub dir: PathBuf,
    /// Extra arguments for every `ringleader serve`.
    pub coordinator_args: Vec<String>,
    /// Where `ringleader` and `ringleader-worker` are; default: beside the
    /// running executable (or `RINGLEADER_BIN` / `RINGLEADER_WORKER_BIN`).
    pub bin_dir: Option<PathBuf>,
    /// Mutual TLS and tokens everywhere (the default); `false` runs every
    /// process with `--insecure`.
    pub secure: bool,
    /// Where workers may read data (`--data-root`); empty: their default.
    pub data_roots: Vec<PathBuf>,
    /// The first coordinator's dashboard address; the others' (and all of
    /// them when `None`) are free ports on 127.0.0.1.
    pub dashboard_listen: Option<SocketAddr>,
}

/// Where a local cluster keeps its certificates and its client config.
const CERTS_DIR: &str = "certs";
const CLIENT_CONFIG: &str = "client.toml";

/// A running local cluster; every process is stopped when it is dropped.
pub struct LocalCluster {
    options: LocalClusterOptions,
    pub etcd: Option<EtcdServer>,
    etcd_endpoints: Vec<String>,
    coordinator_bin: PathBuf,
    worker_bin: PathBuf,
    coordinators: Vec<Member>,
    workers: Vec<Member>,
    /// `certs init` output, when secure.
    certs: Option<PathBuf>,
    /// How the admin reaches the cluster (loaded once; the coordinators
    /// are filled in per call, as they may change).
    admin: Connection,
}

/// One coordinator or worker of a local cluster.
pub struct Member {
    /// Coordinator: its gRPC address. Worker: its id.
    pub id: String,
    pub address: String,
    pub process: ManagedChild,
    /// Coordinator: where its dashboard listens.
    pub dashboard: Option<SocketAddr>,
    /// Where its Prometheus `/metrics` listens.
    pub metrics: SocketAddr,
}

/// A free port on 127.0.0.1, as an address to listen on.
fn free_loopback_socket() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

impl LocalCluster {
    /// Starts etcd (unless given), the coordinators and the workers. Returns
    /// once every process is started; see [`LocalCluster::wait_ready`].
    pub async fn start(options: LocalClusterOptions) -> Result<Self> {
        std::fs::create_dir_all(&options.dir).map_err(|e| Error::Process {
            what: "creating the cluster directory".into(),
            reason: format!("{}: {e}", options.dir.display()),
        })?;
        let (coordinator_bin, worker_bin) = match &options.bin_dir {
            Some(dir) => (dir.join("ringleader"), dir.join("ringleader-worker")),
            None => (
                sibling_binary("ringleader", "RINGLEADER_BIN")?,
                sibling_binary("ringleader-worker", "RINGLEADER_WORKER_BIN")?,
            ),
        };
        let certs = if options.secure {
            let certs = options.dir.join(CERTS_DIR);
            if !certs::initialized(&certs) {
                certs::init(&certs, &certs::InitOptions { hosts: Vec::new() })
                    .map_err(security_error)?;
            }
            Some(certs)
        } else {
            None
        };
        let (etcd, etcd_endpoints) = match &options.etcd {
            Some(endpoints) => (None, endpoints.clone()),
            None => {
                let mut server = EtcdServer::start(&options.dir, certs.as_deref())?;
                server.wait_ready(Duration::from_secs(20)).await?;
                let url = server.client_url.clone();
                (Some(server), vec![url])
            }
        };
        let admin = admin_connection(certs.as_deref())?;
        let mut cluster = Self {
            options,
            etcd,
            etcd_endpoints,
            coordinator_bin,
            worker_bin,
            coordinators: Vec::new(),
            workers: Vec::new(),
            certs,
            admin,
        };
        for _ in 0..cluster.options.coordinators {
            cluster.add_coordinator()?;
        }
        for _ in 0..cluster.options.workers {
            cluster.add_worker()?;
        }
        cluster
            .client_config()
            .write(&cluster.client_config_path())?;
        Ok(cluster)
    }

    /// The certificates of a secure cluster (`certs init` layout).
    pub fn certs(&self) -> Option<&Path> {
        self.certs.as_deref()
    }

    /// What a client needs to talk to this cluster as its admin.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            coordinators: self.coordinator_addresses(),
            tls_dir: self.certs.as_ref().map(|c| c.join(Role::Client.as_str())),
            token_file: self.certs.as_ref().map(|c| c.join(certs::ADMIN_TOKEN_FILE)),
            insecure: self.certs.is_none(),
        }
    }

    /// The first coordinator's dashboard, with the admin's token in the
    /// fragment (which browsers never send; the page keeps it for the
    /// session and clears it from the address bar).
    pub fn dashboard_url(&self) -> Option<String> {
        let address = self.coordinators.first()?.dashboard?;
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        let fragment = self
            .admin
            .token
            .as_ref()
            .map(|t| format!("#token={}", t.reveal()))
            .unwrap_or_default();
        Some(format!("{scheme}://{address}/{fragment}"))
    }

    /// The CA that signed the dashboard's certificate (secure clusters).
    pub fn ca_certificate_path(&self) -> PathBuf {
        self.certs
            .as_deref()
            .unwrap_or(&self.options.dir)
            .join("ca")
            .join(tls::CA_FILE)
    }

    /// The client config file, written when the cluster starts (with the
    /// coordinators it started with).
    pub fn client_config_path(&self) -> PathBuf {
        self.options.dir.join(CLIENT_CONFIG)
    }

    /// A connection to this cluster as its admin.
    pub fn connection(&self, timeout: Duration) -> Connection {
        Connection {
            coordinators: self.coordinator_addresses(),
            timeout,
            ..self.admin.clone()
        }
    }

    /// `--tls-dir` of a component, or `--insecure`.
    fn security_args(&self, role: Role) -> Vec<String> {
        match &self.certs {
            Some(certs) => vec![format!("--tls-dir={}", certs.join(role.as_str()).display())],
            None => vec!["--insecure".into()],
        }
    }

    pub fn etcd_endpoints(&self) -> &[String] {
        &self.etcd_endpoints
    }

    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    /// Starts one more coordinator on a fresh port.
    pub fn add_coordinator(&mut self) -> Result<&mut Member> {
        let address = free_loopback_address()?;
        let dashboard = match self.options.dashboard_listen {
            Some(listen) if self.coordinators.is_empty() => listen,
            _ => free_loopback_socket()?,
        };
        let metrics = free_loopback_socket()?;
        let process =
            self.spawn_coordinator(&address, Some(dashboard), metrics, self.coordinators.len())?;
        self.coordinators.push(Member {
            id: address.clone(),
            address,
            process,
            dashboard: Some(dashboard),
            metrics,
        });
        Ok(self.coordinators.last_mut().expect("just pushed"))
    }

    /// Starts coordinator `index` again on its old address (after a kill),
    /// so workers configured with that address can still reach it.
    pub fn restart_coordinator(&mut self, index: usize) -> Result<()> {
        let member = &self.coordinators[index];
        let (address, dashboard, metrics) =
            (member.address.clone(), member.dashboard, member.metrics);
        self.coordinators[index].process.kill();
        self.coordinators[index].process =
            self.spawn_coordinator(&address, dashboard, metrics, index)?;
        Ok(())
    }

    fn spawn_coordinator(
        &self,
        address: &str,
        dashboard: Option<SocketAddr>,
        metrics: SocketAddr,
        index: usize,
    ) -> Result<ManagedChild> {
        let mut command = Command::new(&self.coordinator_bin);
        command
            .arg("serve")
            .arg(format!("--listen={address}"))
            .arg(format!("--advertise={address}"))
            .arg(format!(
                "--dashboard-listen={}",
                dashboard.map_or_else(|| "off".to_string(), |a| a.to_string())
            ))
            .arg(format!("--metrics-listen={metrics}"))
            .arg(format!("--etcd={}", self.etcd_endpoints.join(",")))
            .arg(format!("--lease-ttl={}s", self.options.lease_ttl.as_secs()))
            .arg(format!(
                "--checkpoint-dir={}",
                self.checkpoint_root().display()
            ))
            .args(self.security_args(Role::Coordinator))
            .args(&self.options.coordinator_args);
        if let Some(certs) = &self.certs {
            if self.etcd.is_some() {
                command.arg(format!(
                    "--etcd-tls-dir={}",
                    certs.join(certs::ETCD_CLIENT_DIR).display()
                ));
            }
            command.arg(format!(
                "--admin-token-file={}",
                certs.join(certs::ADMIN_TOKEN_FILE).display()
            ));
        }
        let log = self.options.dir.join(format!("coordinator-{index}.log"));
        ManagedChild::spawn(format!("coordinator {address}"), command, &log)
    }

    /// Starts one more worker on a fresh peer port.
    pub fn add_worker(&mut self) -> Result<&mut Member> {
        self.add_worker_with(&[])
    }

    /// [`LocalCluster::add_worker`] with extra `ringleader-worker`
    /// arguments for this worker alone (say, `--gpus=2` to test placement).
    pub fn add_worker_with(&mut self, extra_args: &[&str]) -> Result<&mut Member> {
        let index = self.workers.len();
        let id = format!("worker-{index}");
        let address = free_loopback_address()?;
        let metrics = free_loopback_socket()?;
        let process = self.spawn_worker(&id, &address, metrics, extra_args)?;
        self.workers.push(Member {
            id,
            address,
            process,
            dashboard: None,
            metrics,
        });
        Ok(self.workers.last_mut().expect("just pushed"))
    }

    /// Starts worker `index` again with its old id and peer address (after
    /// a kill or a shutdown), as a machine coming back would (without the
    /// extra arguments of [`LocalCluster::add_worker_with`]).
    pub fn restart_worker(&mut self, index: usize) -> Result<()> {
        let worker = &self.workers[index];
        let (id, address, metrics) = (worker.id.clone(), worker.address.clone(), worker.metrics);
        self.workers[index].process.kill();
        self.workers[index].process = self.spawn_worker(&id, &address, metrics, &[])?;
        Ok(())
    }

    fn spawn_worker(
        &self,
        id: &str,
        address: &str,
        metrics: SocketAddr,
        extra_args: &[&str],
    ) -> Result<ManagedChild> {
        let mut command = Command::new(&self.worker_bin);
        command
            .arg(format!("--id={id}"))
            .arg(format!("--metrics-listen={metrics}"))
            .arg(format!(
                "--coordinator={}",
                self.coordinator_addresses().join(",")
            ))
            .arg(format!("--listen={address}"))
            .arg(format!("--advertise={address}"))
            .arg(format!("--device={}", self.options.device))
            .arg(format!("--threads={}", self.threads_per_worker()))
            .arg(format!(
                "--checkpoint-root={}",
                self.checkpoint_root().display()
            ))
            .args(self.security_args(Role::Worker));
        for root in &self.options.data_roots {
            command.arg(format!("--data-root={}", root.display()));
        }
        command.args(extra_args);
        let log = self.options.dir.join(format!("{id}.log"));
        ManagedChild::spawn(id.to_string(), command, &log)
    }

    /// Where trials checkpoint: shared by every member.
    pub fn checkpoint_root(&self) -> PathBuf {
        self.options.dir.join("checkpoints")
    }

    /// The machine's cores split between the workers (at least one each),
    /// so local workers do not oversubscribe the CPU.
    fn threads_per_worker(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / self.options.workers.max(1)).max(1)
    }

    pub fn coordinator_addresses(&self) -> Vec<String> {
        self.coordinators
            .iter()
            .map(|m| m.address.clone())
            .collect()
    }

    pub fn coordinators(&mut self) -> &mut [Member] {
        &mut self.coordinators
    }

    pub fn workers(&mut self) -> &mut [Member] {
        &mut self.workers
    }

    /// The leader's status, once there is a leader and every running worker
    /// is registered and idle with it.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<ClusterStatusResponse> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(dead) = self.first_dead_member() {
                return Err(dead);
            }
            let last = match self.status(Duration::from_secs(1)).await {
                Ok(status) => {
                    let expected: Vec<String> = self
                        .workers
                        .iter_mut()
                        .filter_map(|w| w.process.is_running().then(|| w.id.clone()))
                        .collect();
                    let ready = expected.iter().all(|id| {
                        status
                            .workers
                            .iter()
                            .any(|w| &w.worker_id == id && w.state == WorkerState::Idle as i32)
                    });
                    if ready {
                        return Ok(status);
                    }
                    format!(
                        "{} of {} workers registered",
                        status.workers.len(),
                        expected.len()
                    )
                }
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(Error::Process {
                    what: "local cluster".into(),
                    reason: format!("not ready after {timeout:?}: {last}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Cluster status from the current leader.
    pub async fn status(&self, timeout: Duration) -> Result<ClusterStatusResponse> {
        let (_, mut leader) = client::find_leader(&self.connection(timeout)).await?;
        let response =
            tokio::time::timeout(timeout, leader.cluster_status(ClusterStatusRequest {}))
                .await
                .map_err(|_| Error::Unreachable {
                    address: "leader".into(),
                    reason: "no status within the deadline".into(),
                })?
                .map_err(|s| client::status_error("status", s))?;
        Ok(response.into_inner())
    }

    /// The first member (etcd included) that has exited, as an error that
    /// quotes its log.
    pub fn first_dead_member(&mut self) -> Option<Error> {
        if let Some(etcd) = &mut self.etcd {
            if let Some(status) = etcd.process().crashed() {
                return Some(dead_member_error(etcd.process(), status));
            }
        }
        for member in self.coordinators.iter_mut().chain(self.workers.iter_mut()) {
            if let Some(status) = member.process.crashed() {
                return Some(dead_member_error(&member.process, status));
            }
        }
        None
    }

    /// Stops workers, then coordinators, then etcd, each with SIGTERM and a
    /// grace period.
    pub fn shutdown(&mut self, grace: Duration) {
        for member in self.workers.iter_mut().chain(self.coordinators.iter_mut()) {
            member.process.signal(libc::SIGTERM);
        }
        for member in self.workers.iter_mut().chain(self.coordinators.iter_mut()) {
            member.process.terminate(grace);
        }
        if let Some(etcd) = &mut self.etcd {
            etcd.process().terminate(grace);
        }
    }
}

fn dead_member_error(process: &ManagedChild, status: std::process::ExitStatus) -> Error {
    Error::Process {
        what: process.name().to_string(),
        reason: format!(
            "exited unexpectedly ({status}); last lines of {}:\n{}",
            process.log_path().display(),
            process.log_tail(15)
        ),
    }
}

/// The admin's transport and token from `certs init`'s output (none:
/// insecure); the coordinators are left for [`LocalCluster::connection`].
fn admin_connection(certs: Option<&Path>) -> Result<Connection> {
    let (transport, token) = match certs {
        Some(certs) => (
            Transport::Tls(Arc::new(
                TlsDir::load_for(&certs.join(Role::Client.as_str()), Role::Client)
                    .map_err(security_error)?,
            )),
            Some(client_config::read_token_file(
                &certs.join(certs::ADMIN_TOKEN_FILE),
            )?),
        ),
        None => (Transport::Insecure, None),
    };
    Ok(Connection {
        coordinators: Vec::new(),
        transport,
        token,
        timeout: Duration::from_secs(5),
    })
}

fn security_error(error: ringleader_security::SecurityError) -> Error {
    Error::InvalidArgument(error.to_string())
}
