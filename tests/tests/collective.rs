//! Ring collectives across separate processes (`ringleader-ring`), plus
//! failure cases: a killed rank, a stale generation, a length mismatch, and
//! strangers flooding a collective port.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringleader_collective::{CollectiveService, RingOptions};
use ringleader_coordinator::process::free_loopback_address;
use ringleader_proto::collective::collective_client::CollectiveClient;
use ringleader_proto::collective::collective_server::CollectiveServer;
use ringleader_proto::collective::RingFrame;
use ringleader_tests::bin_dir;
use serde_json::Value;

/// The process tests each start several CPU-hungry ranks; run them one at a
/// time so that none waits on a starved peer.
static ONE_RING_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_RING_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ranks of one ring as processes, killed on drop.
struct RingProcesses {
    children: Vec<Child>,
}

impl RingProcesses {
    fn start(world: usize, common: &[&str], per_rank: impl Fn(usize) -> Vec<String>) -> Self {
        let peers: Vec<String> = (0..world)
            .map(|_| free_loopback_address().unwrap())
            .collect();
        Self::start_ranks(&peers, 0..world, common, per_rank)
    }

    /// Starts only `ranks` of the ring on `peers` (the others can be started
    /// later with another call).
    fn start_ranks(
        peers: &[String],
        ranks: std::ops::Range<usize>,
        common: &[&str],
        per_rank: impl Fn(usize) -> Vec<String>,
    ) -> Self {
        let children = ranks
            .map(|rank| {
                Command::new(bin_dir().join("ringleader-ring"))
                    .arg(format!("--rank={rank}"))
                    .arg(format!("--peers={}", peers.join(",")))
                    .args(common)
                    .args(per_rank(rank))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("ringleader-ring runs")
            })
            .collect();
        Self { children }
    }

    /// Waits for every rank (panicking after `timeout`); returns each rank's
    /// success and its JSON lines.
    fn wait(mut self, timeout: Duration) -> Vec<(bool, Vec<Value>, String)> {
        let deadline = Instant::now() + timeout;
        let mut results = Vec::new();
        for child in self.children.drain(..) {
            let mut child = child;
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("a rank did not finish within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let out = child.wait_with_output().unwrap();
            let lines = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).expect("JSON line"))
                .collect();
            results.push((
                out.status.success(),
                lines,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        results
    }
}

impl RingProcesses {
    fn children_moved(mut self) -> Vec<Child> {
        std::mem::take(&mut self.children)
    }
}

impl Drop for RingProcesses {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn all_reduce_matches_the_reference_bit_for_bit_in_worlds_one_to_six() {
    let _serial = serial();
    for world in 1..=6usize {
        // One world also reduces a 50M-element buffer (200 MB per rank).
        let big = if world == 3 {
            "--big=50000000"
        } else {
            "--big=0"
        };
        let ranks = RingProcesses::start(world, &["--mode=check", big], |_| vec![]);
        let results = ranks.wait(Duration::from_secs(300));
        let expected_cases = 4 * 4 * 4 + usize::from(world == 3) + world + 1;
        let mut hashes: Option<Vec<Value>> = None;
        for (rank, (ok, lines, stderr)) in results.iter().enumerate() {
            assert!(ok, "world {world} rank {rank} failed: {stderr}");
            assert_eq!(
                lines.len(),
                expected_cases,
                "world {world} rank {rank}: {lines:?}"
            );
            for line in lines {
                assert_eq!(line["ok"], true, "world {world} rank {rank}: {line}");
            }
            let mine: Vec<Value> = lines.iter().map(|l| l["hash"].clone()).collect();
            match &hashes {
                None => hashes = Some(mine),
                Some(first) => assert_eq!(
                    first, &mine,
                    "world {world}: rank {rank} differs from rank 0"
                ),
            }
        }
    }
}

#[test]
fn a_killed_rank_makes_every_survivor_fail_within_the_timeout() {
    let _serial = serial();
    let timeout_s = 5.0;
    let mut ranks = RingProcesses::start(
        4,
        &[
            "--mode=loop",
            "--elements=2000000",
            &format!("--timeout={timeout_s}"),
        ],
        |_| vec![],
    );
    // Wait until rank 2 has completed at least one all-reduce.
    let victim = 2;
    let stdout = ranks.children[victim].stdout.take().unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut first).unwrap();
    assert!(first.contains("running"), "{first}");
    ranks.children[victim].kill().unwrap();
    let killed_at = Instant::now();
    let survivors: Vec<Child> = ranks
        .children
        .drain(..)
        .enumerate()
        .filter_map(|(rank, mut child)| {
            if rank == victim {
                let _ = child.wait();
                None
            } else {
                Some(child)
            }
        })
        .collect();
    let results = RingProcesses {
        children: survivors,
    }
    .wait(Duration::from_secs(30));
    let elapsed = killed_at.elapsed();
    assert!(
        elapsed < Duration::from_secs_f64(timeout_s * 2.0),
        "survivors took {elapsed:?} to fail"
    );
    for (ok, lines, stderr) in results {
        assert!(!ok, "a survivor succeeded after its peer died: {stderr}");
        let last = lines.last().expect("an error event");
        assert_eq!(last["event"], "error", "{last}");
        let error = last["error"].as_str().unwrap();
        assert!(error.contains("rank"), "the error names a rank: {error}");
    }
}

#[test]
fn ranks_that_disagree_on_length_get_a_clear_error() {
    let _serial = serial();
    let ranks = RingProcesses::start(2, &["--mode=check"], |rank| {
        if rank == 1 {
            vec!["--wrong-length=7".into()]
        } else {
            vec![]
        }
    });
    // Every rank fails; a rank that received the other's first frame names
    // the disagreement (the other may only see its peer leave).
    let mut named = 0;
    for (ok, lines, stderr) in ranks.wait(Duration::from_secs(30)) {
        assert!(!ok);
        let error = lines
            .last()
            .and_then(|l| l["error"].as_str())
            .unwrap_or(&stderr)
            .to_string();
        if error.contains("disagrees on length (elements)") {
            named += 1;
        } else {
            assert!(error.contains("lost"), "unclear error: {error}");
        }
    }
    assert!(named >= 1, "no rank reported the length mismatch");
}

async fn serve(service: CollectiveService) -> String {
    let address = free_loopback_address().unwrap();
    let listener = tokio::net::TcpListener::bind(&address).await.unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CollectiveServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    address
}

async fn open_stream(address: &str, generation: u64, frames: Vec<RingFrame>) -> tonic::Status {
    let mut client = CollectiveClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let mut request = tonic::Request::new(tokio_stream::iter(frames));
    request
        .metadata_mut()
        .insert(ringleader_proto::GENERATION_METADATA_KEY, generation.into());
    request
        .metadata_mut()
        .insert(ringleader_proto::RANK_METADATA_KEY, 1u64.into());
    client.ring(request).await.expect_err("must be rejected")
}

#[tokio::test]
async fn stale_generation_traffic_is_rejected() {
    let service = CollectiveService::new(RingOptions::default().timeout);
    let mut inbound = service.register(5, 1, 4).unwrap().inbound;
    let address = serve(service.clone()).await;

    // A whole stream from an older ring: refused before any frame is read.
    let status = open_stream(&address, 3, vec![]).await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("stale ring generation 3"),
        "{}",
        status.message()
    );

    // A frame stamped with an old generation on a current stream.
    let frame = RingFrame {
        generation: 4,
        sequence: 1,
        ..Default::default()
    };
    let status = open_stream(&address, 5, vec![frame]).await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("stale ring generation 4"),
        "{}",
        status.message()
    );
    // The ring was told, and never saw the frame as data.
    let delivered = inbound.recv().await.unwrap();
    assert!(delivered.is_err());

    // Registering an older ring after a newer one is refused too.
    assert!(service.register(4, 0, 4).is_err());
}

/// Resident memory of process `pid` in bytes (VmRSS).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// Polls `condition` every 20 ms until it holds; panics after `timeout`.
async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One stranger: its own connection, one stream for a generation nobody
/// built, pushing `payload`-byte frames for as long as it is let. Counts
/// the bytes it managed to hand to the transport and records the answer.
async fn stranger(
    address: String,
    payload: usize,
    pushed: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), tonic::Status> {
    use std::sync::atomic::Ordering;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = CollectiveClient::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    let frame = RingFrame {
        generation: 99,
        sequence: 1,
        payload: vec![7u8; payload].into(),
        ..Default::default()
    };
    let frames = tokio_stream::iter(std::iter::repeat_with(move || {
        pushed.fetch_add(payload as u64, Ordering::Relaxed);
        frame.clone()
    }));
    let mut request = tonic::Request::new(frames);
    request
        .metadata_mut()
        .insert(ringleader_proto::GENERATION_METADATA_KEY, 99u64.into());
    request
        .metadata_mut()
        .insert(ringleader_proto::RANK_METADATA_KEY, 1u64.into());
    client.ring(request).await.map(|_| ())
}

/// A runtime for the tests that hold [`serial`]'s lock outside it.
fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Strangers opening a flood of streams on one process's collective port.
struct Flood {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Flood {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

const STRANGERS: usize = 32;
/// The default waiting-stream limit (`--collective-max-waiting-streams`).
const WAITING_LIMIT: usize = 8;
/// Each of the 32 streams can push at most one 1 MiB stream window before
/// it is read, refused or reset: at most 32 MiB buffered, plus per-connection
/// state; 48 MiB leaves room for the allocator, while the old 16 MiB windows
/// with no waiting limit grew a process by ~690 MiB.
const GROWTH_LIMIT_BYTES: u64 = 48 << 20;

/// Opens 32 streams on the collective port at `address` (process `pid`),
/// for a generation with no ring so none is ever claimed, each pushing as
/// much as flow control lets it; asserts the process's resident memory grew
/// by less than [`GROWTH_LIMIT_BYTES`] and that all but 8 streams were
/// refused at once, naming the limit. The strangers stay until the flood
/// is dropped.
async fn must_bound_a_flood_of_strangers(pid: u32, address: &str) -> Flood {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;
    let before = rss_bytes(pid);
    let pushed = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let refusals = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let tasks: Vec<_> = (0..STRANGERS)
        .map(|_| {
            let (address, pushed, refused, refusals) = (
                address.to_string(),
                pushed.clone(),
                refused.clone(),
                refusals.clone(),
            );
            tokio::spawn(async move {
                let result = stranger(address, 256 << 10, pushed).await;
                if let Err(status) = result {
                    if status.code() == tonic::Code::ResourceExhausted {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    refusals.lock().unwrap().push(status.message().to_string());
                }
            })
        })
        .collect();
    let flood = Flood { tasks };
    // The strangers push until flow control stops them: wait until the
    // pushed total has not grown for a second.
    let mut last = (0, Instant::now());
    wait_until(
        "the strangers are stalled by flow control",
        Duration::from_secs(40),
        || {
            let now = pushed.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            }
            now > 0 && last.1.elapsed() > Duration::from_secs(1)
        },
    )
    .await;
    let mut peak = 0;
    for _ in 0..10 {
        peak = peak.max(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let growth = peak.saturating_sub(before);
    eprintln!(
        "rss before {} MiB, peak during {} MiB (growth {} MiB); strangers pushed {} MiB; {} refused",
        before >> 20,
        peak >> 20,
        growth >> 20,
        pushed.load(Ordering::Relaxed) >> 20,
        refused.load(Ordering::Relaxed),
    );
    assert!(
        growth < GROWTH_LIMIT_BYTES,
        "{STRANGERS} strangers grew process {pid} by {} MiB (limit {} MiB)",
        growth >> 20,
        GROWTH_LIMIT_BYTES >> 20
    );
    wait_until(
        "all strangers beyond the limit refused",
        Duration::from_secs(10),
        || refused.load(Ordering::Relaxed) == STRANGERS - WAITING_LIMIT,
    )
    .await;
    let messages = refusals.lock().unwrap().clone();
    assert!(
        messages
            .iter()
            .any(|m| m.contains(&format!("limit: {WAITING_LIMIT} streams"))),
        "refusals name the limit: {messages:?}"
    );
    flood
}

/// A rank's collective port flooded by strangers keeps its memory bounded,
/// and the real ring still forms and works afterwards.
#[test]
fn strangers_flooding_a_collective_port_leave_its_memory_bounded() {
    let _serial = serial();
    multi_thread_runtime()
        .block_on(strangers_flooding_a_collective_port_leave_its_memory_bounded_async());
}

async fn strangers_flooding_a_collective_port_leave_its_memory_bounded_async() {
    let peers: Vec<String> = (0..2).map(|_| free_loopback_address().unwrap()).collect();
    // Rank 0 alone: it registers generation 1 and keeps dialing rank 1,
    // serving its collective port meanwhile.
    let mut rank0 =
        RingProcesses::start_ranks(&peers, 0..1, &["--mode=check", "--timeout=60"], |_| vec![]);
    let pid = rank0.children[0].id();
    let address = peers[0].clone();
    wait_until("rank 0 listens", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&address).is_ok()
    })
    .await;
    let flood = must_bound_a_flood_of_strangers(pid, &address).await;

    // The strangers go away; the real ring still forms and works.
    drop(flood);
    let rank1 =
        RingProcesses::start_ranks(&peers, 1..2, &["--mode=check", "--timeout=60"], |_| vec![]);
    let ranks = RingProcesses {
        children: rank0
            .children
            .drain(..)
            .chain(rank1.children_moved())
            .collect(),
    };
    let results = ranks.wait(Duration::from_secs(120));
    for (rank, (ok, lines, stderr)) in results.iter().enumerate() {
        assert!(ok, "rank {rank} failed after the flood: {stderr}");
        assert!(
            lines.iter().all(|l| l["ok"] == true),
            "rank {rank}: {lines:?}"
        );
    }
}

/// The same flood against a real worker's peer port (the worker has no
/// coordinator to reach, so it only serves its port): its memory stays
/// bounded with the worker's default flags.
#[test]
fn strangers_flooding_a_workers_peer_port_leave_its_memory_bounded() {
    let _serial = serial();
    multi_thread_runtime()
        .block_on(strangers_flooding_a_workers_peer_port_leave_its_memory_bounded_async());
}

async fn strangers_flooding_a_workers_peer_port_leave_its_memory_bounded_async() {
    let listen = free_loopback_address().unwrap();
    let nowhere = free_loopback_address().unwrap();
    let worker = Command::new(bin_dir().join("ringleader-worker"))
        .arg(format!("--listen={listen}"))
        .arg(format!("--coordinator={nowhere}"))
        .arg("--device=cpu")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ringleader-worker runs");
    // Killed on drop, even if an assertion fails.
    let mut worker = RingProcesses {
        children: vec![worker],
    };
    let pid = worker.children[0].id();
    wait_until("the worker listens", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&listen).is_ok()
    })
    .await;
    let flood = must_bound_a_flood_of_strangers(pid, &listen).await;
    assert!(
        worker.children[0].try_wait().unwrap().is_none(),
        "the worker died during the flood"
    );
    drop(flood);
}
