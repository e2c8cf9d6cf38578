//! Ring collectives across separate processes (`ringleader-ring`), plus
//! failure cases: a killed rank, a stale generation, a length mismatch,
//! strangers flooding a collective port, and outsiders trying to join a
//! ring (plaintext, another CA, the wrong role, no ring secret).
//!
//! Rings run as in production: mutual TLS with worker certificates from
//! `ringleader certs init`, and a ring secret every rank proves; a few run
//! with ring encryption off (`--insecure`), where only the proof guards.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringleader_collective::auth::RING_PROOF_METADATA_KEY;
use ringleader_collective::{CollectiveService, InboundLink, RingOptions, RingSecret};
use ringleader_coordinator::process::free_loopback_address;
use ringleader_proto::collective::collective_client::CollectiveClient;
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
    fn start(world: usize, common: &[String], per_rank: impl Fn(usize) -> Vec<String>) -> Self {
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
        common: &[String],
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

/// What the ranks of a test ring share: a worker TLS directory from
/// `ringleader certs init` (or `--insecure`: ring encryption off) and a
/// ring secret file. Also certificates of the other roles and of a second,
/// unrelated CA, for outsiders. Removed on drop.
struct Security {
    dir: tempfile::TempDir,
    tls: bool,
}

impl Security {
    /// Mutual TLS on the ring (the default a worker runs with).
    fn tls() -> Self {
        Self::new(true)
    }

    /// Ring encryption off: plaintext streams, the ring proof still guards.
    fn encryption_off() -> Self {
        Self::new(false)
    }

    fn new(tls: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for ca in ["certs", "other-ca"] {
            must_init_certs(&dir.path().join(ca));
        }
        let security = Self { dir, tls };
        write_secret(&security.secret_file(), &RingSecret::generate());
        security
    }

    /// `ringleader certs init`'s directory of our CA.
    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// The directory of a certificate of `role` from our CA.
    fn role_dir(&self, role: &str) -> PathBuf {
        self.certs().join(role)
    }

    /// A worker certificate issued by a CA the ring does not trust.
    fn other_ca_worker_dir(&self) -> PathBuf {
        self.dir.path().join("other-ca").join("worker")
    }

    fn secret_file(&self) -> PathBuf {
        self.dir.path().join("ring.secret")
    }

    fn secret(&self) -> RingSecret {
        RingSecret::from_hex(&std::fs::read_to_string(self.secret_file()).unwrap()).unwrap()
    }

    /// A file holding another secret than the ring's.
    fn other_secret_file(&self) -> PathBuf {
        let path = self.dir.path().join("other.secret");
        write_secret(&path, &RingSecret::generate());
        path
    }

    /// Transport and secret flags for `ringleader-ring`.
    fn args(&self) -> Vec<String> {
        let transport = if self.tls {
            format!("--tls-dir={}", self.role_dir("worker").display())
        } else {
            "--insecure".to_string()
        };
        vec![
            transport,
            format!("--ring-secret-file={}", self.secret_file().display()),
        ]
    }

    /// [`Security::args`] followed by `more`.
    fn with(&self, more: &[&str]) -> Vec<String> {
        let mut args = self.args();
        args.extend(more.iter().map(|a| a.to_string()));
        args
    }

    /// How an in-process client reaches the ring's ports as a worker of
    /// this cluster would.
    fn worker_client(&self) -> Client {
        if self.tls {
            Client::Tls {
                ca: self.role_dir("worker"),
                identity: self.role_dir("worker"),
            }
        } else {
            Client::Plaintext
        }
    }
}

/// Runs `ringleader certs init --dir DIR`.
fn must_init_certs(dir: &Path) {
    let out = Command::new(bin_dir().join("ringleader"))
        .args(["certs", "init", "--dir"])
        .arg(dir)
        .output()
        .expect("ringleader runs");
    assert!(
        out.status.success(),
        "ringleader certs init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_secret(path: &Path, secret: &RingSecret) {
    std::fs::write(path, format!("{}\n", secret.to_hex())).unwrap();
}

/// How an in-process client connects to a collective port: our own tonic
/// client, as an outsider would write it.
#[derive(Clone, Debug)]
enum Client {
    Plaintext,
    /// Verifies the server as a worker against `ca`/ca.crt and presents
    /// `identity`/{tls.crt,tls.key}.
    Tls {
        ca: PathBuf,
        identity: PathBuf,
    },
}

impl Client {
    async fn connect(&self, address: &str) -> Result<tonic::transport::Channel, tonic::Status> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let unavailable = |e: tonic::transport::Error| {
            tonic::Status::unavailable(format!(
                "connect: {e} ({:?})",
                std::error::Error::source(&e)
            ))
        };
        let endpoint = match self {
            Client::Plaintext => Endpoint::from_shared(format!("http://{address}")).unwrap(),
            Client::Tls { ca, identity } => {
                let read = |path: PathBuf| std::fs::read_to_string(path).unwrap();
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read(ca.join("ca.crt"))))
                    .identity(Identity::from_pem(
                        read(identity.join("tls.crt")),
                        read(identity.join("tls.key")),
                    ))
                    .domain_name("worker.ringleader.internal");
                Endpoint::from_shared(format!("https://{address}"))
                    .unwrap()
                    .tls_config(tls)
                    .unwrap()
            }
        };
        endpoint
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(unavailable)
    }
}

/// A stream's claim: generation, sender rank, and the proof (if any).
struct Claim {
    generation: u64,
    rank: u64,
    proof: Option<String>,
}

impl Claim {
    /// Rank `rank` of generation 1 proving `secret` to its successor in a
    /// ring of `world`.
    fn proven(rank: u64, world: u64, secret: &RingSecret) -> Self {
        Self {
            generation: 1,
            rank,
            proof: Some(secret.proof(1, rank as usize, ((rank + 1) % world) as usize)),
        }
    }
}

/// Opens a ring stream at `address` as `client` making `claim`, sends
/// `frames` and keeps the stream open; returns the call's answer, or
/// panics if there is none within 10 s (a stream let in would be kept
/// open by the ring, never answered).
async fn must_be_refused(
    client: &Client,
    address: &str,
    claim: Claim,
    frames: Vec<RingFrame>,
) -> tonic::Status {
    let channel = match client.connect(address).await {
        Ok(channel) => channel,
        Err(status) => return status,
    };
    let mut client = CollectiveClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for frame in frames {
        tx.send(frame).await.unwrap();
    }
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let metadata = request.metadata_mut();
    metadata.insert(
        ringleader_proto::GENERATION_METADATA_KEY,
        claim.generation.into(),
    );
    metadata.insert(ringleader_proto::RANK_METADATA_KEY, claim.rank.into());
    if let Some(proof) = claim.proof {
        metadata.insert(RING_PROOF_METADATA_KEY, proof.parse().unwrap());
    }
    let answer = tokio::time::timeout(Duration::from_secs(10), client.ring(request))
        .await
        .expect("an outsider's stream was not refused within 10 s");
    drop(tx);
    answer.expect_err("an outsider's stream was accepted")
}

/// The connection failed (TLS handshake, or HTTP/2 over a TLS port): what
/// refusals below the gRPC service look like to a tonic client, whose code
/// depends on when hyper notices (never one of the service's own codes).
fn refused_by_the_connection(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    )
}

/// A frame that would poison the sum if a ring ever took it as data.
fn poison() -> RingFrame {
    RingFrame {
        generation: 1,
        sequence: 1,
        payload: vec![0xff; 64].into(),
        ..Default::default()
    }
}

/// Every rank of `ranks` succeeded and every check case was right.
fn must_all_pass(ranks: RingProcesses, what: &str) {
    for (rank, (ok, lines, stderr)) in ranks.wait(Duration::from_secs(120)).iter().enumerate() {
        assert!(ok, "{what}: rank {rank} failed: {stderr}");
        assert!(!lines.is_empty(), "{what}: rank {rank} checked nothing");
        assert!(
            lines.iter().all(|l| l["ok"] == true),
            "{what}: rank {rank}: {lines:?}"
        );
    }
}

#[test]
fn all_reduce_matches_the_reference_bit_for_bit_in_worlds_one_to_six() {
    let _serial = serial();
    let tls = Security::tls();
    let encryption_off = Security::encryption_off();
    // Over mutual TLS in worlds 1 to 6; with ring encryption off in world 3;
    // over Unix sockets (ranks on one machine) in world 4; each link striped
    // over 3 connections in world 3 (TCP) and 2 (Unix sockets).
    let worlds = (1..=6usize).map(|w| (w, &tls, false, 1)).chain([
        (3, &encryption_off, false, 1),
        (4, &tls, true, 1),
        (3, &tls, false, 3),
        (2, &tls, true, 3),
    ]);
    for (world, security, unix, stripes) in worlds {
        // One world also reduces a 50M-element buffer (200 MB per rank).
        let big = if world == 3 && security.tls && stripes == 1 {
            "--big=50000000"
        } else {
            "--big=0"
        };
        let sockets = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--mode=check".to_string(),
            big.to_string(),
            format!("--stripes={stripes}"),
        ];
        if unix {
            args.push(format!("--unix-socket-dir={}", sockets.path().display()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ranks = RingProcesses::start(world, &security.with(&args), |_| vec![]);
        let results = ranks.wait(Duration::from_secs(300));
        if unix {
            for (rank, (_, _, stderr)) in results.iter().enumerate() {
                assert!(
                    stderr.contains("over its Unix socket") && !stderr.contains("using TCP"),
                    "world {world} rank {rank} did not use the Unix socket: {stderr}"
                );
            }
        }
        let expected_cases = 4 * 4 * 4 + usize::from(big != "--big=0") + world + 1;
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
    let security = Security::tls();
    let mut ranks = RingProcesses::start(
        4,
        &security.with(&[
            "--mode=loop",
            "--elements=2000000",
            &format!("--timeout={timeout_s}"),
        ]),
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
    let security = Security::tls();
    let ranks = RingProcesses::start(2, &security.with(&["--mode=check"]), |rank| {
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
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    address
}

/// Opens a stream from rank 1 to rank 2 for `generation`, proven with
/// `secret`, sending `frames`; returns how it was refused.
async fn open_stream(
    address: &str,
    generation: u64,
    secret: &RingSecret,
    frames: Vec<RingFrame>,
) -> tonic::Status {
    let mut client = CollectiveClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let mut request = tonic::Request::new(tokio_stream::iter(frames));
    let metadata = request.metadata_mut();
    metadata.insert(ringleader_proto::GENERATION_METADATA_KEY, generation.into());
    metadata.insert(ringleader_proto::RANK_METADATA_KEY, 1u64.into());
    let proof = secret.proof(generation, 1, 2);
    metadata.insert(RING_PROOF_METADATA_KEY, proof.parse().unwrap());
    client.ring(request).await.expect_err("must be rejected")
}

fn link(generation: u64, secret: &RingSecret) -> InboundLink {
    InboundLink {
        generation,
        rank: 2,
        predecessor: 1,
        secret: secret.clone(),
        stripes: 1,
    }
}

#[tokio::test]
async fn stale_generation_traffic_is_rejected() {
    let service = CollectiveService::new(RingOptions::default().timeout);
    let secret = RingSecret::generate();
    let mut inbound = service.register(link(5, &secret), 4).unwrap().inbound;
    let address = serve(service.clone()).await;

    // A whole stream from an older ring: refused before any frame is read.
    let status = open_stream(&address, 3, &secret, vec![]).await;
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
    let status = open_stream(&address, 5, &secret, vec![frame]).await;
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
    assert!(service.register(link(4, &secret), 4).is_err());
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

/// One stranger: its own connection (as `client`: a worker certificate
/// of the cluster on a TLS port), one stream for a generation nobody built
/// with a well-formed proof (so that it may wait for its ring), pushing
/// `payload`-byte frames for as long as it is let. Counts the bytes it
/// managed to hand to the transport and records the answer.
async fn stranger(
    client: Client,
    address: String,
    payload: usize,
    pushed: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), tonic::Status> {
    use std::sync::atomic::Ordering;
    let channel = client.connect(&address).await?;
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
    let metadata = request.metadata_mut();
    metadata.insert(ringleader_proto::GENERATION_METADATA_KEY, 99u64.into());
    metadata.insert(ringleader_proto::RANK_METADATA_KEY, 1u64.into());
    let proof = RingSecret::generate().proof(99, 1, 0);
    metadata.insert(RING_PROOF_METADATA_KEY, proof.parse().unwrap());
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

/// Opens 32 streams as `client` on the collective port at `address`
/// (process `pid`),
/// for a generation with no ring so none is ever claimed, each pushing as
/// much as flow control lets it; asserts the process's resident memory grew
/// by less than [`GROWTH_LIMIT_BYTES`] and that all but 8 streams were
/// refused at once, naming the limit. The strangers stay until the flood
/// is dropped.
async fn must_bound_a_flood_of_strangers(pid: u32, address: &str, client: &Client) -> Flood {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;
    let before = rss_bytes(pid);
    let pushed = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let refusals = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let tasks: Vec<_> = (0..STRANGERS)
        .map(|_| {
            let (client, address, pushed, refused, refusals) = (
                client.clone(),
                address.to_string(),
                pushed.clone(),
                refused.clone(),
                refusals.clone(),
            );
            tokio::spawn(async move {
                let result = stranger(client, address, 256 << 10, pushed).await;
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
    let security = Security::tls();
    let args = security.with(&["--mode=check", "--timeout=60"]);
    let mut rank0 = RingProcesses::start_ranks(&peers, 0..1, &args, |_| vec![]);
    let pid = rank0.children[0].id();
    let address = peers[0].clone();
    wait_until("rank 0 listens", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&address).is_ok()
    })
    .await;
    let flood = must_bound_a_flood_of_strangers(pid, &address, &security.worker_client()).await;

    // The strangers go away; the real ring still forms and works.
    drop(flood);
    let rank1 = RingProcesses::start_ranks(&peers, 1..2, &args, |_| vec![]);
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
/// coordinator to reach, so it only serves its port), by strangers holding
/// a worker certificate of the cluster: its memory stays bounded with the
/// worker's default flags.
#[test]
fn strangers_flooding_a_workers_peer_port_leave_its_memory_bounded() {
    let _serial = serial();
    multi_thread_runtime()
        .block_on(strangers_flooding_a_workers_peer_port_leave_its_memory_bounded_async());
}

async fn strangers_flooding_a_workers_peer_port_leave_its_memory_bounded_async() {
    let listen = free_loopback_address().unwrap();
    let nowhere = free_loopback_address().unwrap();
    let security = Security::tls();
    let worker = Command::new(bin_dir().join("ringleader-worker"))
        .arg(format!("--listen={listen}"))
        .arg(format!("--coordinator={nowhere}"))
        .arg("--device=cpu")
        .arg("--metrics-listen=off")
        .env("RINGLEADER_TLS_DIR", security.role_dir("worker"))
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
    let flood = must_bound_a_flood_of_strangers(pid, &listen, &security.worker_client()).await;
    assert!(
        worker.children[0].try_wait().unwrap().is_none(),
        "the worker died during the flood"
    );
    drop(flood);
}

/// Rank 0 of a two-rank ring alone, serving its port and waiting for its
/// predecessor (rank 1); the returned peers list is the ring's.
async fn must_start_rank_zero_alone(security: &Security) -> (RingProcesses, Vec<String>) {
    let peers: Vec<String> = (0..2).map(|_| free_loopback_address().unwrap()).collect();
    let args = security.with(&["--mode=check", "--timeout=60"]);
    let rank0 = RingProcesses::start_ranks(&peers, 0..1, &args, |_| vec![]);
    let address = peers[0].clone();
    wait_until("rank 0 listens", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&address).is_ok()
    })
    .await;
    (rank0, peers)
}

/// Starts rank 1 next to `rank0` and checks that the ring computes the
/// right results: nothing an outsider sent before got into it.
fn must_form_and_compute_right(security: &Security, mut rank0: RingProcesses, peers: &[String]) {
    let args = security.with(&["--mode=check", "--timeout=60"]);
    let rank1 = RingProcesses::start_ranks(peers, 1..2, &args, |_| vec![]);
    let ranks = RingProcesses {
        children: rank0
            .children
            .drain(..)
            .chain(rank1.children_moved())
            .collect(),
    };
    must_all_pass(ranks, "the real ring after the outsiders");
}

/// Outsiders knock on a TLS ring port — in plaintext, with a worker
/// certificate from another CA, with a client's and a coordinator's
/// certificate from our CA (all four even holding the right ring proof),
/// and with a worker certificate of the cluster but no secret — and are all
/// refused; the real ring then forms and computes the right sums.
#[test]
fn outsiders_cannot_join_a_tls_ring() {
    let _serial = serial();
    multi_thread_runtime().block_on(outsiders_cannot_join_a_tls_ring_async());
}

async fn outsiders_cannot_join_a_tls_ring_async() {
    let security = Security::tls();
    let secret = security.secret();
    let (rank0, peers) = must_start_rank_zero_alone(&security).await;
    let address = &peers[0];

    // Plaintext to a TLS port: no gRPC call gets through.
    let status = must_be_refused(
        &Client::Plaintext,
        address,
        Claim::proven(1, 2, &secret),
        vec![poison()],
    )
    .await;
    eprintln!("plaintext: {status:?}");
    assert!(refused_by_the_connection(&status), "plaintext: {status:?}");

    // A worker certificate our CA did not issue (the client trusts our CA,
    // so it is the server that refuses it).
    let other_ca = Client::Tls {
        ca: security.role_dir("worker"),
        identity: security.other_ca_worker_dir(),
    };
    let status = must_be_refused(
        &other_ca,
        address,
        Claim::proven(1, 2, &secret),
        vec![poison()],
    )
    .await;
    eprintln!("another CA: {status:?}");
    assert!(refused_by_the_connection(&status), "another CA: {status:?}");

    // Certificates of our CA, but not a worker's: PERMISSION_DENIED.
    for role in ["client", "coordinator"] {
        let client = Client::Tls {
            ca: security.role_dir("worker"),
            identity: security.role_dir(role),
        };
        let status = must_be_refused(
            &client,
            address,
            Claim::proven(1, 2, &secret),
            vec![poison()],
        )
        .await;
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{role}: {status:?}"
        );
        assert!(
            status.message().contains("needs a worker certificate"),
            "{role}: {status:?}"
        );
    }

    // A worker of the cluster that knows the generation but not the
    // secret: UNAUTHENTICATED, with or without a guessed proof.
    let worker = security.worker_client();
    for claim in [
        Claim::proven(1, 2, &RingSecret::generate()),
        Claim {
            generation: 1,
            rank: 1,
            proof: None,
        },
    ] {
        let status = must_be_refused(&worker, address, claim, vec![poison()]).await;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("ring proof"), "{status:?}");
        assert!(!status.message().contains(&secret.to_hex()), "{status:?}");
    }

    tokio::task::block_in_place(|| must_form_and_compute_right(&security, rank0, &peers));
}

/// With ring encryption off (`--insecure` on the ring only) anyone can
/// connect, but without the secret nobody joins: refused with
/// UNAUTHENTICATED, and the real ring forms and computes right afterwards.
#[test]
fn outsiders_cannot_join_a_ring_with_encryption_off() {
    let _serial = serial();
    multi_thread_runtime().block_on(outsiders_cannot_join_a_ring_with_encryption_off_async());
}

async fn outsiders_cannot_join_a_ring_with_encryption_off_async() {
    let security = Security::encryption_off();
    let secret = security.secret();
    let (rank0, peers) = must_start_rank_zero_alone(&security).await;
    let address = &peers[0];
    let wrong_secret = Claim::proven(1, 2, &RingSecret::generate());
    let no_proof = Claim {
        generation: 1,
        rank: 1,
        proof: None,
    };
    // A proof of the right secret for another link is no good either.
    let other_link = Claim {
        generation: 1,
        rank: 1,
        proof: Some(secret.proof(1, 1, 2)),
    };
    for (claim, problem) in [
        (wrong_secret, "is wrong"),
        (no_proof, "is missing"),
        (other_link, "is wrong"),
    ] {
        let status = must_be_refused(&Client::Plaintext, address, claim, vec![poison()]).await;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(
            status
                .message()
                .contains(&format!("rank 1's ring proof for generation 1 {problem}")),
            "{status:?}"
        );
    }
    tokio::task::block_in_place(|| must_form_and_compute_right(&security, rank0, &peers));
}

/// A rank given another secret than its ring's (a stale or forged
/// assignment) cannot join: its successor refuses its stream, and it
/// refuses its predecessor's. The rank whose successor is already up is
/// refused at once, naming the proof, and leaves; the other then finds no
/// successor.
#[test]
fn a_rank_with_the_wrong_secret_is_refused() {
    let _serial = serial();
    let security = Security::tls();
    let other = security.other_secret_file();
    let ring_secret = security.secret_file();
    // The transport flag only; each rank gets its own secret file.
    let common = vec![
        security.args()[0].clone(),
        "--mode=check".into(),
        "--timeout=5".into(),
    ];
    let ranks = RingProcesses::start(2, &common, |rank| {
        let file = if rank == 1 { &other } else { &ring_secret };
        vec![format!("--ring-secret-file={}", file.display())]
    });
    let mut named = 0;
    for (rank, (ok, lines, stderr)) in ranks.wait(Duration::from_secs(60)).iter().enumerate() {
        assert!(!ok, "rank {rank} joined with the wrong secret: {lines:?}");
        assert!(lines.is_empty(), "rank {rank} computed: {lines:?}");
        if stderr.contains("refused our stream (Unauthenticated)") {
            assert!(stderr.contains("ring proof"), "rank {rank}: {stderr}");
            named += 1;
        } else {
            assert!(
                stderr.contains("cannot reach rank"),
                "rank {rank}: {stderr}"
            );
        }
    }
    assert!(named >= 1, "no rank was refused for its proof");
}

/// `ringleader-ring` is secure by default: without `--tls-dir` or
/// `--insecure`, or without a ring secret, it does not start, and says
/// what to pass.
#[test]
fn ringleader_ring_refuses_to_start_without_tls_or_a_secret() {
    let security = Security::tls();
    let peers = format!(
        "--peers={},{}",
        free_loopback_address().unwrap(),
        free_loopback_address().unwrap()
    );
    let run = |args: &[String]| {
        let out = Command::new(bin_dir().join("ringleader-ring"))
            .args(["--mode=check", "--rank=0", &peers])
            .args(args)
            .env_remove("RINGLEADER_TLS_DIR")
            .env_remove("RINGLEADER_INSECURE")
            .env_remove("RINGLEADER_RING_SECRET_FILE")
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with {args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let secret = format!("--ring-secret-file={}", security.secret_file().display());
    let stderr = run(std::slice::from_ref(&secret));
    assert!(
        stderr.contains("--tls-dir") && stderr.contains("--insecure"),
        "{stderr}"
    );
    let stderr = run(&["--insecure".to_string()]);
    assert!(stderr.contains("--ring-secret-file"), "{stderr}");
    // A short secret is refused naming the rule.
    let short = security.dir.path().join("short.secret");
    std::fs::write(&short, "00112233").unwrap();
    let stderr = run(&[
        "--insecure".to_string(),
        format!("--ring-secret-file={}", short.display()),
    ]);
    assert!(stderr.contains("at least 16 bytes"), "{stderr}");
    // A client certificate is not a worker's.
    let stderr = run(&[
        format!("--tls-dir={}", security.role_dir("client").display()),
        secret,
    ]);
    assert!(stderr.contains("not for a worker"), "{stderr}");
}
