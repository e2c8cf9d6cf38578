//! A whole cluster as local processes: a private etcd, M coordinators and
//! N workers on free loopback ports, everything under one directory.
//!
//! Used by `ringleader local` (the zero-configuration default) and by the
//! integration tests, which reach into it to kill and restart members.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ringleader_proto::coordinator::{ClusterStatusRequest, ClusterStatusResponse, WorkerState};

use crate::client;
use crate::error::{Error, Result};
use crate::etcd::Etcd;
use crate::process::{free_loopback_address, free_port, sibling_binary, ManagedChild};

/// A single-member etcd with its data under a directory we own.
pub struct EtcdServer {
    pub client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: ManagedChild,
}

impl EtcdServer {
    /// Starts etcd (from `PATH`, or `RINGLEADER_ETCD_BIN`) under `dir`.
    pub fn start(dir: &Path) -> Result<Self> {
        let client_url = format!("http://127.0.0.1:{}", free_port()?);
        let peer_url = format!("http://127.0.0.1:{}", free_port()?);
        let data_dir = dir.join("etcd-data");
        let log = dir.join("etcd.log");
        let child = Self::spawn(&client_url, &peer_url, &data_dir, &log, "new")?;
        Ok(Self {
            client_url,
            peer_url,
            data_dir,
            log,
            child,
        })
    }

    fn spawn(
        client_url: &str,
        peer_url: &str,
        data_dir: &Path,
        log: &Path,
        state: &str,
    ) -> Result<ManagedChild> {
        let bin = std::env::var("RINGLEADER_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let mut command = Command::new(bin);
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
}

/// A running local cluster; every process is stopped when it is dropped.
pub struct LocalCluster {
    options: LocalClusterOptions,
    pub etcd: Option<EtcdServer>,
    etcd_endpoints: Vec<String>,
    coordinator_bin: PathBuf,
    worker_bin: PathBuf,
    coordinators: Vec<Member>,
    workers: Vec<Member>,
}

/// One coordinator or worker of a local cluster.
pub struct Member {
    /// Coordinator: its gRPC address. Worker: its id.
    pub id: String,
    pub address: String,
    pub process: ManagedChild,
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
        let (etcd, etcd_endpoints) = match &options.etcd {
            Some(endpoints) => (None, endpoints.clone()),
            None => {
                let mut server = EtcdServer::start(&options.dir)?;
                server.wait_ready(Duration::from_secs(20)).await?;
                let url = server.client_url.clone();
                (Some(server), vec![url])
            }
        };
        let mut cluster = Self {
            options,
            etcd,
            etcd_endpoints,
            coordinator_bin,
            worker_bin,
            coordinators: Vec::new(),
            workers: Vec::new(),
        };
        for _ in 0..cluster.options.coordinators {
            cluster.add_coordinator()?;
        }
        for _ in 0..cluster.options.workers {
            cluster.add_worker()?;
        }
        Ok(cluster)
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
        let process = self.spawn_coordinator(&address, self.coordinators.len())?;
        self.coordinators.push(Member {
            id: address.clone(),
            address,
            process,
        });
        Ok(self.coordinators.last_mut().expect("just pushed"))
    }

    /// Starts coordinator `index` again on its old address (after a kill),
    /// so workers configured with that address can still reach it.
    pub fn restart_coordinator(&mut self, index: usize) -> Result<()> {
        let address = self.coordinators[index].address.clone();
        self.coordinators[index].process.kill();
        self.coordinators[index].process = self.spawn_coordinator(&address, index)?;
        Ok(())
    }

    fn spawn_coordinator(&self, address: &str, index: usize) -> Result<ManagedChild> {
        let mut command = Command::new(&self.coordinator_bin);
        command
            .arg("serve")
            .arg(format!("--listen={address}"))
            .arg(format!("--advertise={address}"))
            .arg(format!("--etcd={}", self.etcd_endpoints.join(",")))
            .arg(format!("--lease-ttl={}s", self.options.lease_ttl.as_secs()))
            .arg(format!(
                "--checkpoint-dir={}",
                self.options.dir.join("checkpoints").display()
            ))
            .args(&self.options.coordinator_args);
        let log = self.options.dir.join(format!("coordinator-{index}.log"));
        ManagedChild::spawn(format!("coordinator {address}"), command, &log)
    }

    /// Starts one more worker on a fresh peer port.
    pub fn add_worker(&mut self) -> Result<&mut Member> {
        let index = self.workers.len();
        let id = format!("worker-{index}");
        let address = free_loopback_address()?;
        let process = self.spawn_worker(&id, &address)?;
        self.workers.push(Member {
            id,
            address,
            process,
        });
        Ok(self.workers.last_mut().expect("just pushed"))
    }

    /// Starts worker `index` again with its old id and peer address (after
    /// a kill or a shutdown), as a machine coming back would.
    pub fn restart_worker(&mut self, index: usize) -> Result<()> {
        let (id, address) = (
            self.workers[index].id.clone(),
            self.workers[index].address.clone(),
        );
        self.workers[index].process.kill();
        self.workers[index].process = self.spawn_worker(&id, &address)?;
        Ok(())
    }

    fn spawn_worker(&self, id: &str, address: &str) -> Result<ManagedChild> {
        let mut command = Command::new(&self.worker_bin);
        command
            .arg(format!("--id={id}"))
            .arg(format!(
                "--coordinator={}",
                self.coordinator_addresses().join(",")
            ))
            .arg(format!("--listen={address}"))
            .arg(format!("--advertise={address}"))
            .arg(format!("--device={}", self.options.device))
            .arg(format!("--threads={}", self.threads_per_worker()));
        let log = self.options.dir.join(format!("{id}.log"));
        ManagedChild::spawn(id.to_string(), command, &log)
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
        let (_, mut leader) = client::find_leader(&self.coordinator_addresses(), timeout).await?;
        let response =
            tokio::time::timeout(timeout, leader.cluster_status(ClusterStatusRequest {}))
                .await
                .map_err(|_| Error::Unreachable {
                    address: "leader".into(),
                    reason: "no status within the deadline".into(),
                })?
                .map_err(|s| Error::Unreachable {
                    address: "leader".into(),
                    reason: s.message().to_string(),
                })?;
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
