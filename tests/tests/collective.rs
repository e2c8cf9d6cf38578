//! Ring collectives across separate processes (`ringleader-ring`), plus
//! failure cases: a killed rank, a stale generation, a length mismatch.

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
        let children = (0..world)
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
