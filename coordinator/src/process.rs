//! Child processes that never outlive their owner.
//!
//! A [`ManagedChild`] is killed when dropped (also while unwinding from a
//! panic), and asks the kernel to SIGKILL it should the spawning thread die
//! first (`PR_SET_PDEATHSIG`), so neither tests nor `ringleader local` leave
//! orphans behind.

use rand::Rng;
use std::collections::BTreeSet;
use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A port that was free on 127.0.0.1 a moment ago, for a child process to
/// listen on.
///
/// Picked outside the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`): a port the kernel hands out for
/// `bind(0)` can, before the child binds it, become the local end of some
/// outgoing connection (a worker dialling its coordinator took another
/// worker's peer port this way in CI). Ports outside that range are never
/// chosen by the kernel, and one process never hands out the same port twice.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let candidates = ports_outside_ephemeral_range();
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::rng();
    for _ in 0..256 {
        let port = rng.random_range(candidates.clone());
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    Err(Error::Process {
        what: "finding a free loopback port".into(),
        reason: format!("256 random ports in {candidates:?} were all taken"),
    })
}

/// The larger stretch of unprivileged ports that the kernel never picks for
/// `bind(0)` or outgoing connections.
fn ports_outside_ephemeral_range() -> RangeInclusive<u16> {
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((bounds.next()??, bounds.next()??))
        })
        .unwrap_or((32768, 60999));
    let below = 1024..=low.saturating_sub(1);
    let above = high.saturating_add(1)..=u16::MAX;
    if below.len() >= above.len() {
        below
    } else {
        above
    }
}

/// `127.0.0.1:<free port>`.
pub fn free_loopback_address() -> Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

/// A child process with its output in a log file; killed on drop.
pub struct ManagedChild {
    name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
    /// Set when we stopped it, so its exit is not reported as a crash.
    stopped_on_purpose: bool,
}

impl ManagedChild {
    /// Spawns `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: impl Into<String>, mut command: Command, log: &Path) -> Result<Self> {
        let name = name.into();
        let err = |reason: String| Error::Process {
            what: format!("starting {name}"),
            reason,
        };
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| err(format!("cannot open log {}: {e}", log.display())))?;
        let err_out = out.try_clone().map_err(|e| err(e.to_string()))?;
        command.stdin(Stdio::null()).stdout(out).stderr(err_out);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let program = command.get_program().to_string_lossy().into_owned();
        let child = command
            .spawn()
            .map_err(|e| err(format!("cannot run {program}: {e}")))?;
        Ok(Self {
            name,
            child,
            log: log.to_path_buf(),
            exited: None,
            stopped_on_purpose: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process has ended (reaping it).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// The exit status if the process ended without us stopping it.
    pub fn crashed(&mut self) -> Option<ExitStatus> {
        self.exit_status().filter(|_| !self.stopped_on_purpose)
    }

    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`) unless the process has ended.
    pub fn signal(&mut self, signal: i32) {
        if self.is_running() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: plain syscall on a pid we spawned and have not reaped.
                unsafe {
                    libc::kill(pid, signal);
                }
            }
        }
    }

    /// SIGSTOP, returning once every thread of the process is stopped.
    ///
    /// `kill` only queues the signal: a thread running on another CPU (or a
    /// descheduled virtual CPU) goes on for a moment, long enough for a
    /// frozen etcd to answer one more request. The kernel's per-thread state
    /// (`T` in `/proc/PID/task/*/stat`) says when the stop has happened.
    pub fn freeze(&mut self, within: Duration) -> Result<()> {
        self.signal(libc::SIGSTOP);
        let tasks = PathBuf::from(format!("/proc/{}/task", self.pid()));
        let deadline = Instant::now() + within;
        loop {
            if all_threads_stopped(&tasks) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Process {
                    what: format!("freezing {}", self.name),
                    reason: format!("not every thread stopped within {within:?} of SIGSTOP"),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.stopped_on_purpose = true;
        if self.is_running() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        self.stopped_on_purpose = true;
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// The last `lines` lines of the log, for error reports.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Whether every thread listed under `/proc/PID/task` is stopped (state
/// `T`, or `t` when traced). A process that has gone counts as not stopped.
fn all_threads_stopped(tasks: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(tasks) else {
        return false;
    };
    let mut seen = 0;
    for entry in entries.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // `pid (comm) S ...`: comm may hold spaces and parentheses, so the
        // state is the first field after the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if !matches!(state, Some("T" | "t")) {
            return false;
        }
        seen += 1;
    }
    seen > 0
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        // Resume a stopped process first, or SIGKILL would leave it for later.
        self.signal(libc::SIGCONT);
        self.kill();
    }
}

/// A binary installed beside the running executable (how `cargo build`
/// and the container images lay them out), unless `env_override` names one.
pub fn sibling_binary(name: &str, env_override: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_override) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| Error::Process {
        what: format!("locating {name}"),
        reason: e.to_string(),
    })?;
    let candidate = exe.with_file_name(name);
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(Error::Process {
            what: format!("locating {name}"),
            reason: format!(
                "{} does not exist; build the workspace (cargo build --release) or set {env_override}",
                candidate.display()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_outside_the_ephemeral_range_and_never_repeat() {
        let range = ports_outside_ephemeral_range();
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        assert!(ports.iter().all(|port| range.contains(port)), "{ports:?}");
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        // Each is still bindable: the check released it.
        TcpListener::bind((Ipv4Addr::LOCALHOST, ports[0])).unwrap();
    }
}
