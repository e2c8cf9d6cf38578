//! `ringleader-ring`: one rank of a standalone ring, as a process. Used by
//! the integration tests (correctness across processes, failures) and by
//! scripts/bench/allreduce.sh. Prints one JSON object per line.
//!
//! Secure by default, like a worker: the ring runs over mutual TLS with a
//! worker certificate (`--tls-dir`, e.g. `ringleader certs init --dir D`
//! then `D/worker`), or without encryption only when asked (`--insecure`);
//! either way every rank proves the ring secret from `--ring-secret-file`
//! (the same hex at every rank, e.g. `openssl rand -hex 32`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use half::{bf16, f16};
use ringleader_collective::plan::segment;
use ringleader_collective::ring;
use ringleader_collective::{
    CollectiveService, Element, LocalSocket, ReduceOp, Ring, RingBuffer, RingOptions, RingPlan,
    RingSecret, Transport,
};
use ringleader_security::{Role, TlsDir};
use serde_json::json;
use tokio::net::TcpListener;

/// Ring chunks are large, short-lived buffers: glibc serves them with fresh
/// mmaps (page faults, zeroing) every time; mimalloc reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// Every dtype × op × length, checked against a local reference.
    Check,
    /// Time all-reduce of f32 buffers of the given sizes.
    Bench,
    /// All-reduce a large buffer in a loop until something fails.
    Loop,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    mode: Mode,
    #[arg(long)]
    rank: usize,
    /// Peer addresses in rank order; ours is `peers[rank]`.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    #[arg(long, default_value_t = 1)]
    generation: u64,
    /// Collective timeout in seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    #[arg(long, default_value_t = 1 << 20)]
    chunk_bytes: usize,
    /// HTTP/2 stream window in bytes (default: RingOptions' default); the
    /// connection window is twice this.
    #[arg(long, env = "RINGLEADER_COLLECTIVE_STREAM_WINDOW")]
    stream_window: Option<u32>,

    /// Largest HTTP/2 frame accepted (default: the chunk size plus 4 KiB,
    /// see `ring::frame_bytes_for`).
    #[arg(long)]
    frame_bytes: Option<u32>,

    /// Connections per ring link (frames take them in turn).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    stripes: u64,
    /// Most inbound streams waiting for their ring at once.
    #[arg(long, env = "RINGLEADER_COLLECTIVE_MAX_WAITING_STREAMS", default_value_t = ringleader_collective::service::DEFAULT_MAX_WAITING_STREAMS)]
    max_waiting_streams: usize,
    /// check: also all-reduce this many f32 elements (0 = skip).
    #[arg(long, default_value_t = 0)]
    big: usize,
    /// check: pretend to hold this many elements in the first case (to
    /// provoke a length mismatch).
    #[arg(long)]
    wrong_length: Option<usize>,
    /// bench: buffer sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    sizes: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    /// loop: elements per all-reduce.
    #[arg(long, default_value_t = 1 << 22)]
    elements: usize,
    /// Worker TLS directory (ca.crt, tls.crt, tls.key; the certificate must
    /// name the worker role): the ring runs over mutual TLS.
    #[arg(long, env = "RINGLEADER_TLS_DIR", conflicts_with = "insecure")]
    tls_dir: Option<PathBuf>,
    /// Run the ring without TLS (trusted networks only): frames are neither
    /// encrypted nor integrity-protected; the ring secret still decides who
    /// may join.
    #[arg(long, env = "RINGLEADER_INSECURE")]
    insecure: bool,
    /// File holding the ring secret as hex (at least 16 bytes; the same at
    /// every rank).
    #[arg(long, env = "RINGLEADER_RING_SECRET_FILE")]
    ring_secret_file: Option<PathBuf>,

    /// Also serve a Unix socket at DIR/rank-<rank>.sock and dial the
    /// successor's there (co-located ranks; DIR should be private).
    #[arg(long)]
    unix_socket_dir: Option<PathBuf>,
}

/// Largest secret file read (a secret is at most 1 KiB, 2 KiB in hex).
const MAX_SECRET_FILE_BYTES: u64 = 4096;

fn transport(args: &Args) -> Result<Transport> {
    match (&args.tls_dir, args.insecure) {
        (Some(dir), _) => {
            let tls = TlsDir::load_for(dir, Role::Worker)
                .with_context(|| format!("--tls-dir {}", dir.display()))?;
            Ok(Transport::Tls(Arc::new(tls)))
        }
        (None, true) => {
            tracing::warn!(
                "--insecure: the ring runs WITHOUT TLS: frames are neither encrypted nor \
                 integrity-protected (anyone on the path can read and alter them); only the \
                 ring secret keeps strangers from joining"
            );
            Ok(Transport::Insecure)
        }
        (None, false) => bail!(
            "no TLS directory: pass --tls-dir DIR (or RINGLEADER_TLS_DIR), a worker TLS \
             directory with ca.crt, tls.crt and tls.key (`ringleader certs init --dir D` \
             writes one in D/worker), or --insecure to run the ring without encryption on a \
             trusted network"
        ),
    }
}

fn ring_secret(path: Option<&Path>) -> Result<RingSecret> {
    use std::io::Read;
    let Some(path) = path else {
        bail!(
            "no ring secret: pass --ring-secret-file FILE (or RINGLEADER_RING_SECRET_FILE), \
             a file holding the same hex secret at every rank (e.g. `openssl rand -hex 32`)"
        );
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE_BYTES + 1).read_to_string(&mut text))
        .with_context(|| format!("--ring-secret-file {}", path.display()))?;
    if text.len() as u64 > MAX_SECRET_FILE_BYTES {
        bail!(
            "--ring-secret-file {}: larger than {MAX_SECRET_FILE_BYTES} bytes",
            path.display()
        );
    }
    RingSecret::from_hex(&text).with_context(|| format!("--ring-secret-file {}", path.display()))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let transport = transport(&args)?;
    let secret = ring_secret(args.ring_secret_file.as_deref())?;
    let listen: SocketAddr = args
        .peers
        .get(args.rank)
        .context("rank outside --peers")?
        .parse()
        .context("peer address must be ip:port")?;
    let options = RingOptions {
        timeout: Duration::from_secs_f64(args.timeout),
        chunk_bytes: args.chunk_bytes,
        max_waiting_streams: args.max_waiting_streams,
        transport,
        ..RingOptions::default()
    };
    let options = match args.stream_window {
        Some(window) => RingOptions {
            stream_window: window,
            connection_window: window.saturating_mul(2),
            ..options
        },
        None => options,
    };
    let options = RingOptions {
        frame_bytes: args
            .frame_bytes
            .unwrap_or(ring::frame_bytes_for(args.chunk_bytes)),
        stripes: args.stripes as usize,
        ..options
    };
    let service = CollectiveService::for_rings(&options);
    let listener = TcpListener::bind(listen).await?;
    let stop_serving = tokio_util::sync::CancellationToken::new();
    let server = ring::server_builder(&options)?
        .add_service(service.clone())
        .serve_with_incoming_shutdown(
            ring::incoming(listener),
            stop_serving.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);
    let socket_of = |rank: usize| {
        let dir = args.unix_socket_dir.as_ref()?;
        Some(dir.join(format!("rank-{rank}.sock")))
    };
    let local_server = match socket_of(args.rank) {
        Some(path) => {
            let mut socket = LocalSocket::bind_at(&path)?;
            let (service, options, stop) = (service.clone(), options.clone(), stop_serving.clone());
            Some(tokio::spawn(async move {
                socket
                    .serve(&service, &options, stop.cancelled_owned())
                    .await
            }))
        }
        None => None,
    };
    let successor_socket = socket_of((args.rank + 1) % args.peers.len());
    if let Some(path) = &successor_socket {
        // Ranks start together here (a worker binds before it registers):
        // give the successor until the timeout to bind.
        let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
        while !path.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let plan = RingPlan {
        successor_socket,
        generation: args.generation,
        rank: args.rank,
        peers: args.peers.clone(),
        secret,
    };
    let mut ring = Ring::connect(&service, plan, options).await?;
    match args.mode {
        Mode::Check => check(&mut ring, &args).await?,
        Mode::Bench => bench(&mut ring, &args).await?,
        Mode::Loop => run_loop(&mut ring, &args).await?,
    }
    // Let the last frames drain before the process (and its server) ends:
    // close the ring, then shut the server down gracefully so the answer to
    // our predecessor's stream is written before we exit.
    let timeout = Duration::from_secs_f64(args.timeout);
    ring.close().await?;
    stop_serving.cancel();
    tokio::time::timeout(timeout, server)
        .await
        .context("the peer server did not stop in time")???;
    if let Some(server) = local_server {
        tokio::time::timeout(timeout, server)
            .await
            .context("the Unix socket's server did not stop in time")???;
    }
    Ok(())
}

/// Rank `rank`'s deterministic input: fractional values of both signs, so
/// the reduction order matters for the bits.
fn input(rank: usize, i: usize) -> f64 {
    let x = (rank as u64 * 7919 + i as u64 * 104_729 + 17) % 2003;
    x as f64 / 16.0 - 60.3
}

trait FromF64: Element {
    fn from_f64(x: f64) -> Self;
}
impl FromF64 for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}
impl FromF64 for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
}
impl FromF64 for f16 {
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
}
impl FromF64 for bf16 {
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
}

fn inputs<T: FromF64>(rank: usize, len: usize) -> Vec<T> {
    (0..len).map(|i| T::from_f64(input(rank, i))).collect()
}

/// What the ring must produce: segment j reduced in ring order from rank j.
fn reference<T: FromF64>(world: usize, len: usize, op: ReduceOp) -> Vec<T> {
    let all: Vec<Vec<T>> = (0..world).map(|r| inputs(r, len)).collect();
    let mut out = vec![T::from_f64(0.0); len];
    for j in 0..world {
        for i in segment(len, world, j) {
            let mut acc = all[j][i];
            for k in 1..world {
                acc = T::combine(acc, all[(j + k) % world][i], op);
            }
            out[i] = if op == ReduceOp::Avg && world > 1 {
                acc.divide(world)
            } else {
                acc
            };
        }
    }
    out
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

async fn check_case<T: FromF64>(
    ring: &mut Ring,
    op: ReduceOp,
    len: usize,
    claimed: usize,
) -> Result<()> {
    let mut buffer = RingBuffer::from_vec(inputs::<T>(ring.rank(), claimed));
    let result = ring.all_reduce_buffer(&mut buffer, op).await;
    let data = buffer.as_slice();
    let case = format!("{:?}/{}/{len}", T::DTYPE, op.as_str_name());
    match result {
        Ok(()) => {
            let expected = reference::<T>(ring.world(), len, op);
            let ok =
                bytemuck::cast_slice::<T, u8>(data) == bytemuck::cast_slice::<T, u8>(&expected);
            println!(
                "{}",
                json!({"case": case, "ok": ok, "hash": fnv(bytemuck::cast_slice(data))})
            );
            Ok(())
        }
        Err(error) => {
            println!("{}", json!({"case": case, "error": error.to_string()}));
            Err(error.into())
        }
    }
}

async fn check(ring: &mut Ring, args: &Args) -> Result<()> {
    let world = ring.world();
    let mut first = true;
    for len in [0, 1, world - 1, 10_007] {
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
            let claimed = match args.wrong_length {
                Some(wrong) if first => wrong,
                _ => len,
            };
            first = false;
            check_case::<f32>(ring, op, len, claimed).await?;
            check_case::<f64>(ring, op, len, len).await?;
            check_case::<f16>(ring, op, len, len).await?;
            check_case::<bf16>(ring, op, len, len).await?;
        }
    }
    if args.big > 0 {
        check_case::<f32>(ring, ReduceOp::Sum, args.big, args.big).await?;
    }
    for root in 0..world {
        let mut data: Vec<f64> = if ring.rank() == root {
            inputs(root, 1000)
        } else {
            vec![0.0; 1000]
        };
        ring.broadcast(&mut data, root).await?;
        let ok = data == inputs::<f64>(root, 1000);
        println!("{}", json!({"case": format!("broadcast/{root}"), "ok": ok}));
    }
    let mine = Bytes::from(format!("rank-{}", ring.rank()));
    let gathered = ring.all_gather(mine).await?;
    let ok = gathered
        .iter()
        .enumerate()
        .all(|(r, b)| b == format!("rank-{r}").as_bytes());
    println!("{}", json!({"case": "all_gather", "ok": ok}));
    Ok(())
}

async fn bench(ring: &mut Ring, args: &Args) -> Result<()> {
    for &size in &args.sizes {
        let mut data = RingBuffer::from_vec(vec![1.0f32; size / 4]);
        ring.all_reduce_buffer(&mut data, ReduceOp::Sum).await?; // warm-up
        let mut times = Vec::with_capacity(args.iterations);
        for _ in 0..args.iterations {
            ring.barrier().await?;
            let start = Instant::now();
            ring.all_reduce_buffer(&mut data, ReduceOp::Sum).await?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        if ring.rank() == 0 {
            println!(
                "{}",
                json!({"bytes": size, "median_s": median, "world": ring.world()})
            );
        }
    }
    Ok(())
}

async fn run_loop(ring: &mut Ring, args: &Args) -> Result<()> {
    let mut data = RingBuffer::from_vec(vec![1.0f32; args.elements]);
    let mut last_ok = Instant::now();
    let mut rounds = 0u64;
    loop {
        match ring.all_reduce_buffer(&mut data, ReduceOp::Avg).await {
            Ok(()) => {
                rounds += 1;
                last_ok = Instant::now();
                if rounds == 1 {
                    println!("{}", json!({"event": "running"}));
                }
            }
            Err(error) => {
                println!(
                    "{}",
                    json!({"event": "error", "error": error.to_string(), "after_s": last_ok.elapsed().as_secs_f64(), "rounds": rounds})
                );
                bail!("{error}");
            }
        }
    }
}
