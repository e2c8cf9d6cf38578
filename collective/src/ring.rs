//! The ring communicator.
//!
//! All-reduce over `n` ranks splits the buffer into `n` segments and runs
//! `2(n-1)` steps; every segment is further cut into chunks, and a chunk is
//! forwarded as soon as it has been reduced, so sending, receiving and adding
//! overlap. Example, `n = 3`, segments A B C, `x_r` = rank r's input:
//!
//! ```text
//!              reduce-scatter                       all-gather
//!  step    0            1               2 (=n-1)          3
//!  r0   send A0 ─┐   send C0+C1+… ┐   send A* (owner)    forward C*
//!  r1   send B1  └▶  recv A0⊕A1 ─┐│   send B*… etc.
//!  r2   send C2      ...         └┴▶ r2 owns A* = A0⊕A1⊕A2
//!
//!  rank r sends segment (r - s) and receives (r - s - 1) at reduce-scatter
//!  step s; after n-1 steps it owns the full result of segment r+1, which
//!  then travels once around the ring, unchanged, in n-1 all-gather steps.
//! ```
//!
//! Determinism: segment `j` is reduced in one fixed order — `x_j`, then
//! `⊕ x_{j+1}`, … — at one place each hop, and the finished segment is
//! copied (not recomputed) to every rank, so all ranks end bit-identical.
//!
//! Transport: one long-lived client stream to the successor per ring
//! generation; frames carry (generation, sequence, step, chunk) plus the
//! operation's shape, checked on arrival. Every wait is bounded by the
//! timeout; any failure poisons the ring and closes its streams, so the
//! neighbours fail at once instead of waiting out their own timeouts.

use std::time::Duration;

use bytes::Bytes;
use ringleader_proto::collective::{DType, OpKind, ReduceOp};
use ringleader_security::{Role, Transport};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::auth::{RingSecret, RING_PROOF_METADATA_KEY};
use crate::buffer::{RingBuffer, StillInFlight, Target};
use crate::element::{copy_parts, reduce_parts, Element};
use crate::error::{CollectiveError, Result};
use crate::frame::{chunk_elements, FrameCheck, OpHeader};
use crate::link::{open_stream, Inbound, Links, Outbound};
use crate::plan::{all_gather_step, chunks, reduce_scatter_step, ring_sub, segment};
use crate::service::{CollectiveService, InboundLink, STRIPE_METADATA_KEY};
use crate::wire::{HeadWriter, InFrame, OutFrame};

/// A tonic server tuned for ring traffic (windows, frame size), bounded
/// against strangers (stream window, streams per connection, header size)
/// and serving `options.transport` (with TLS: our worker certificate, and
/// client certificates from our CA required), to which the caller adds
/// the [`CollectiveService`] and any other services.
///
/// The stream window is what one stream can make this process buffer
/// before anything reads it, so a stream still waiting for its ring holds
/// at most that much (see [`crate::service`]).
pub fn server_builder(options: &RingOptions) -> Result<tonic::transport::Server> {
    let builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(options.stream_window)
        .initial_connection_window_size(options.connection_window)
        .max_frame_size(options.frame_bytes)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES);
    options
        .transport
        .server(builder)
        .map_err(|e| CollectiveError::Transport(e.to_string()))
}

/// Connections accepted on `listener`, with `TCP_NODELAY` set: tonic's
/// `tcp_nodelay` applies only to listeners it binds itself, and without it
/// the accepting side's small frames (window updates, answers) wait out the
/// peer's delayed ACK (40 ms on Linux).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// HTTP/2 streams one connection may have open at once on a collective
/// port. A ring uses one stream per connection; more are refused by HTTP/2
/// itself (REFUSED_STREAM).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// Largest header block (gRPC metadata) accepted on a collective port; a
/// ring stream's is well under 1 KiB.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;

/// Who is in the ring, as the coordinator hands it out.
#[derive(Clone, Debug)]
pub struct RingPlan {
    pub generation: u64,
    pub rank: usize,
    /// Peer (collective service) addresses in rank order.
    pub peers: Vec<String>,
    /// The successor's Unix socket when it runs on this machine (see
    /// [`crate::local`]); `None` to dial its TCP address in `peers`.
    pub successor_socket: Option<std::path::PathBuf>,
    /// The attempt's secret, the same at every rank (`Assignment.ring_secret`
    /// through [`RingSecret::new`]); proves to each successor that this
    /// rank was assigned to the ring (see [`crate::auth`]).
    pub secret: RingSecret,
}

/// Tuning and failure bounds.
#[derive(Clone, Debug)]
pub struct RingOptions {
    /// Longest wait for any frame or send; a dead peer is an error after it.
    /// Also how long an inbound stream may wait for its ring.
    pub timeout: Duration,
    /// Chunk size in bytes (pipelining granularity). Also sets the largest
    /// gRPC message accepted ([`RingOptions::max_message_bytes`]) and the
    /// largest all-gather payload; every rank of a ring must use the same.
    pub chunk_bytes: usize,
    /// Frames buffered per direction.
    pub queue_depth: usize,
    /// HTTP/2 stream window this process grants each inbound stream: what
    /// one stream can make it buffer before the stream is read, whether or
    /// not a ring claims it.
    pub stream_window: u32,
    /// HTTP/2 connection window (all streams of one connection together).
    pub connection_window: u32,
    /// Largest HTTP/2 frame we accept (hyper's default is 16 KiB); see
    /// [`frame_bytes_for`].
    pub frame_bytes: u32,
    /// Connections (each with one stream) per ring link; frames take them
    /// in turn. Every rank of a ring must use the same.
    pub stripes: usize,
    /// Most inbound streams waiting for their ring at once (see
    /// [`crate::service::ServiceLimits::max_waiting_streams`]).
    pub max_waiting_streams: usize,
    /// How ring streams travel: mutual TLS with worker certificates (what a
    /// worker uses), or [`Transport::Insecure`] — the default here, for
    /// tests and trusted networks — where frames are neither encrypted nor
    /// integrity-protected and only the ring proof keeps strangers out.
    /// Dialling, the server ([`server_builder`]) and the service's caller
    /// check ([`CollectiveService::for_rings`]) all follow it.
    pub transport: Transport,
}

impl RingOptions {
    /// Largest payload of one frame: a chunk (at least one f64 element).
    pub fn max_payload_bytes(&self) -> usize {
        self.chunk_bytes.max(8)
    }

    /// Largest gRPC message sent or accepted on a ring stream: a chunk plus
    /// the frame header ([`crate::frame::FRAME_OVERHEAD_BYTES`]).
    pub fn max_message_bytes(&self) -> usize {
        self.max_payload_bytes()
            .saturating_add(crate::frame::FRAME_OVERHEAD_BYTES)
    }
}

/// The HTTP/2 frame limit for chunks of `chunk_bytes`: a chunk's payload
/// (its own DATA frame, the head travels in another) plus 4 KiB, so that
/// the frame limit never cuts a chunk into a full frame and a few stray
/// bytes (flow control may still send it in pieces, as the window opens).
/// Within HTTP/2's bounds (16 KiB to 16 MiB − 1).
pub fn frame_bytes_for(chunk_bytes: usize) -> u32 {
    let wanted = chunk_bytes.saturating_add(4096);
    wanted.clamp(1 << 14, (1 << 24) - 1) as u32
}

/// Default [`RingOptions::stream_window`]: 1 MiB (the connection window is
/// twice that).
///
/// This is what any stream, claimed or not, can make a worker buffer, so it
/// bounds what strangers cost: with 32 streams pushing at a worker's port,
/// the old 16 MiB window grew it by ~690 MiB, 1 MiB by ~30 MiB. HTTP/2 (h2
/// under hyper) has no per-stream window that could be raised only once a
/// ring claims the stream, and hyper's adaptive (BDP) window, which grows
/// only on connections whose data is read, made small all-reduces 40–80×
/// slower on loopback. All-reduce bandwidth with 1 MiB is the same as with
/// 16 MiB within noise (`ringleader-ring --mode bench`, 1 MiB chunks);
/// windows of 2–3 MiB stall (5× slower, reproducibly), so measure before
/// changing it.
pub const DEFAULT_STREAM_WINDOW: u32 = 1 << 20;

impl Default for RingOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            chunk_bytes: 1 << 20,
            queue_depth: 8,
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: 2 * DEFAULT_STREAM_WINDOW,
            frame_bytes: frame_bytes_for(1 << 20),
            max_waiting_streams: crate::service::DEFAULT_MAX_WAITING_STREAMS,
            transport: Transport::Insecure,
            stripes: 1,
        }
    }
}

/// Where this rank sits in the ring, plus the options: what every
/// operation's driver needs.
#[derive(Clone, Copy)]
struct Place<'a> {
    rank: usize,
    world: usize,
    successor: usize,
    predecessor: usize,
    options: &'a RingOptions,
}

impl<'a> Place<'a> {
    fn new(rank: usize, world: usize, options: &'a RingOptions) -> Self {
        Self {
            rank,
            world,
            successor: (rank + 1) % world,
            predecessor: ring_sub(rank, 1, world),
            options,
        }
    }

    fn chunk_elements<T>(&self) -> usize {
        chunk_elements(self.options.chunk_bytes, std::mem::size_of::<T>())
    }

    /// What this rank expects of the frames of operation `header`.
    fn check(&self, header: &OpHeader) -> FrameCheck {
        FrameCheck {
            header: *header,
            rank: self.rank,
            world: self.world,
            chunk_bytes: self.options.chunk_bytes,
            max_gather_bytes: self.options.max_payload_bytes(),
        }
    }
}

/// One rank's handle on a ring generation.
pub struct Ring {
    generation: u64,
    rank: usize,
    world: usize,
    sequence: u64,
    options: RingOptions,
    /// `None` for a world of one, or once the ring has failed.
    links: Option<Links>,
    failed: bool,
    heads: HeadWriter,
}

impl Ring {
    /// Registers with the local collective service, then dials the successor
    /// (retrying until the timeout, as peers start at different moments).
    pub async fn connect(
        service: &CollectiveService,
        plan: RingPlan,
        options: RingOptions,
    ) -> Result<Self> {
        let world = plan.peers.len();
        if world == 0 || plan.rank >= world {
            return Err(CollectiveError::InvalidPlan(format!(
                "rank {} in a ring of {world}",
                plan.rank
            )));
        }
        let mut ring = Self {
            generation: plan.generation,
            rank: plan.rank,
            world,
            sequence: 0,
            options,
            links: None,
            failed: false,
            heads: HeadWriter::default(),
        };
        if world == 1 {
            return Ok(ring);
        }
        let predecessor = ring_sub(plan.rank, 1, world);
        let successor = (plan.rank + 1) % world;
        let stripes = ring.options.stripes.max(1);
        let registration = service.register(
            InboundLink {
                generation: plan.generation,
                rank: plan.rank,
                predecessor,
                secret: plan.secret.clone(),
                stripes,
            },
            ring.options.queue_depth,
        )?;
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(
            ringleader_proto::GENERATION_METADATA_KEY,
            plan.generation.into(),
        );
        metadata.insert(
            ringleader_proto::RANK_METADATA_KEY,
            (plan.rank as u64).into(),
        );
        let proof = plan.secret.proof(plan.generation, plan.rank, successor);
        metadata.insert(
            RING_PROOF_METADATA_KEY,
            proof
                .parse()
                .unwrap_or_else(|_| unreachable!("a proof is hex digits")),
        );
        // One connection, and one stream on it, per stripe.
        let mut outbound = Vec::with_capacity(stripes);
        let mut calls = Vec::with_capacity(stripes);
        for stripe in 0..stripes {
            let channel = dial_successor(&plan, successor, &ring.options).await?;
            let mut metadata = metadata.clone();
            metadata.insert(STRIPE_METADATA_KEY, (stripe as u64).into());
            let (frames, call) = open_stream(channel, metadata, ring.options.queue_depth);
            outbound.push(frames);
            calls.push(call);
        }
        // Every rank opened its outgoing streams before waiting here, so
        // once our predecessor's are in, every link of the ring exists and a
        // rank that dies later is noticed as a broken stream, not silence.
        // A successor that refuses a stream (wrong secret, stale
        // generation, not a worker certificate) ends that call meanwhile:
        // that is reported at once, with its reason.
        let inbound = registration.inbound;
        let waited = ring.options.timeout;
        let did_not_arrive = || CollectiveError::Connect {
            rank: predecessor,
            address: plan.peers[predecessor].clone(),
            reason: format!("its stream did not arrive within {waited:?}"),
        };
        tokio::select! {
            attached = tokio::time::timeout(waited, registration.attached) => {
                if !matches!(attached, Ok(Ok(()))) {
                    return Err(did_not_arrive());
                }
            }
            (answer, _, _) = futures::future::select_all(calls.iter_mut()) => {
                let reason = match answer {
                    Ok(Err(status)) => format!(
                        "it refused our stream ({:?}): {}",
                        status.code(),
                        status.message()
                    ),
                    Ok(Ok(())) => "it ended our stream before the ring formed".into(),
                    Err(join) => join.to_string(),
                };
                return Err(CollectiveError::Connect {
                    rank: successor,
                    address: plan.peers[successor].clone(),
                    reason,
                });
            }
        }
        ring.links = Some(Links {
            outbound: Outbound::new(outbound),
            inbound,
            carriers: calls,
        });
        Ok(ring)
    }

    /// A ring of `world` ranks in this process over in-memory links (see
    /// [`crate::link::memory_ring`]) whose bytes are cut every `cut` bytes:
    /// the algorithms exactly as over the network, without a network.
    pub fn in_memory(generation: u64, world: usize, cut: usize, options: RingOptions) -> Vec<Ring> {
        let links =
            crate::link::memory_ring(world, options.queue_depth, cut, options.max_message_bytes());
        links
            .into_iter()
            .enumerate()
            .map(|(rank, links)| Ring {
                generation,
                rank,
                world,
                sequence: 0,
                options: options.clone(),
                links: (world > 1).then_some(links),
                failed: false,
                heads: HeadWriter::default(),
            })
            .collect()
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Reduces `data` in place across all ranks. Chunks are copied on
    /// their way out; [`Ring::all_reduce_buffer`] sends without copying.
    pub async fn all_reduce<T: Element>(&mut self, data: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_target(data, op).await
    }

    /// Reduces `buffer` in place across all ranks, sending its chunks
    /// straight from its memory (see [`crate::buffer`]).
    pub async fn all_reduce_buffer<T: Element>(
        &mut self,
        buffer: &mut RingBuffer<T>,
        op: ReduceOp,
    ) -> Result<()> {
        self.all_reduce_target(buffer, op).await
    }

    async fn all_reduce_target<T: Element, D: Target<T> + ?Sized>(
        &mut self,
        data: &mut D,
        op: ReduceOp,
    ) -> Result<()> {
        let header = self.begin(OpKind::AllReduce, T::DTYPE, op, data.len() as u64, 0)?;
        let place = Place::new(self.rank, self.world, &self.options);
        let Some(links) = self.links.as_mut() else {
            return Ok(()); // world of one: already reduced (x / 1 == x)
        };
        let started = std::time::Instant::now();
        let result = all_reduce_ring(links, &mut self.heads, header, data, op, place).await;
        if result.is_ok() {
            let bytes = (data.len() * std::mem::size_of::<T>()) as u64;
            crate::stats::record_all_reduce(bytes, self.world, started.elapsed());
        }
        // On failure the links go first, so that nothing holds our frames.
        let result = self.finish(result);
        // Whatever happened, nothing sent from `data` may outlive the call.
        let successor = (self.rank + 1) % self.world;
        let settled = data
            .settle(self.options.timeout)
            .await
            .map_err(|e| still_in_flight(e, successor));
        self.finish(result.and(settled))
    }

    /// Copies `root`'s `data` into every rank's `data`.
    pub async fn broadcast<T: Element>(&mut self, data: &mut [T], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(CollectiveError::InvalidPlan(format!(
                "broadcast root {root} in a ring of {}",
                self.world
            )));
        }
        let header = self.begin(
            OpKind::Broadcast,
            T::DTYPE,
            ReduceOp::Unspecified,
            data.len() as u64,
            root as u32,
        )?;
        let place = Place::new(self.rank, self.world, &self.options);
        let Some(links) = self.links.as_mut() else {
            return Ok(());
        };
        let result = broadcast_ring(links, &mut self.heads, header, data, root, place).await;
        self.finish(result)
    }

    /// Every rank's `payload`, indexed by rank. For small payloads: each
    /// travels as one frame, so at most [`RingOptions::chunk_bytes`] each.
    pub async fn all_gather(&mut self, payload: Bytes) -> Result<Vec<Bytes>> {
        if payload.len() > self.options.max_payload_bytes() {
            return Err(CollectiveError::InvalidPlan(format!(
                "all-gather payload of {} bytes is over the ring's chunk size of {} bytes",
                payload.len(),
                self.options.max_payload_bytes()
            )));
        }
        let header = self.begin(OpKind::AllGather, DType::Bytes, ReduceOp::Unspecified, 0, 0)?;
        let place = Place::new(self.rank, self.world, &self.options);
        let Some(links) = self.links.as_mut() else {
            return Ok(vec![payload]);
        };
        let result = all_gather_ring(links, &mut self.heads, header, payload, place).await;
        self.finish(result)
    }

    /// Returns once every rank has called it.
    pub async fn barrier(&mut self) -> Result<()> {
        self.all_gather(Bytes::new()).await.map(|_| ())
    }

    fn begin(
        &mut self,
        kind: OpKind,
        dtype: DType,
        reduce: ReduceOp,
        elements: u64,
        root: u32,
    ) -> Result<OpHeader> {
        if self.failed {
            return Err(CollectiveError::Poisoned {
                generation: self.generation,
            });
        }
        self.sequence += 1;
        Ok(OpHeader {
            generation: self.generation,
            sequence: self.sequence,
            kind,
            dtype,
            reduce,
            elements,
            root,
        })
    }

    /// Ends the ring gracefully: our stream to the successor is closed after
    /// its last frame and we wait (bounded) until the successor has read it
    /// all and our predecessor has closed its stream too. Without this, a
    /// rank that exits right after its last operation can cut off frames its
    /// neighbour still needs.
    pub async fn close(mut self) -> Result<()> {
        let Some(links) = self.links.take() else {
            return Ok(());
        };
        let Links {
            outbound,
            mut inbound,
            carriers,
        } = links;
        drop(outbound);
        let timeout = self.options.timeout;
        let successor = (self.rank + 1) % self.world;
        let predecessor = ring_sub(self.rank, 1, self.world);
        for call in carriers {
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(status))) => {
                    return Err(CollectiveError::PeerLost {
                        rank: successor,
                        reason: status.message().to_string(),
                    })
                }
                Ok(Err(join)) => {
                    return Err(CollectiveError::PeerLost {
                        rank: successor,
                        reason: join.to_string(),
                    })
                }
                Err(_) => {
                    return Err(CollectiveError::Timeout {
                        rank: successor,
                        waited: timeout,
                        step: 0,
                        chunk: 0,
                    })
                }
            }
        }
        // Each of the predecessor's streams ends with an error status
        // ("closed its stream") or by the channel closing; a data frame now
        // is a bug.
        match tokio::time::timeout(timeout, inbound.recv_ends()).await {
            Ok(None) => Ok(()),
            Ok(Some(frame)) => Err(CollectiveError::Mismatch {
                rank: predecessor,
                field: "operation count",
                ours: format!("{} operations", self.sequence),
                theirs: format!("a frame of operation {}", frame.head.sequence),
            }),
            Err(_) => Err(CollectiveError::Timeout {
                rank: predecessor,
                waited: timeout,
                step: 0,
                chunk: 0,
            }),
        }
    }

    /// On failure, close both streams so the neighbours fail fast too. The
    /// outgoing stream ends gracefully (frames already queued still go out,
    /// so a neighbour sees the real cause, e.g. a length mismatch); dropping
    /// the inbound side makes the predecessor's stream fail.
    fn finish<T>(&mut self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.failed = true;
            self.links = None;
        }
        result
    }
}

/// A new connection to the successor: over its Unix socket when it is on
/// this machine (TCP if that fails), else to its TCP address.
async fn dial_successor(
    plan: &RingPlan,
    successor: usize,
    options: &RingOptions,
) -> Result<Channel> {
    let Some(path) = &plan.successor_socket else {
        return dial(&plan.peers[successor], successor, options).await;
    };
    match crate::local::dial(path, options).await {
        Ok(channel) => {
            tracing::info!(socket = %path.display(), successor, "ring link to the successor over its Unix socket");
            Ok(channel)
        }
        Err(reason) => {
            tracing::warn!(socket = %path.display(), %reason, "cannot reach the ring successor's Unix socket; using TCP");
            dial(&plan.peers[successor], successor, options).await
        }
    }
}

/// A channel to rank `rank` at `address`, over `options.transport` (with
/// TLS: verifying it as a worker and presenting our certificate).
async fn dial(address: &str, rank: usize, options: &RingOptions) -> Result<Channel> {
    let connect_error = |reason: String| CollectiveError::Connect {
        rank,
        address: address.to_string(),
        reason,
    };
    let endpoint = options
        .transport
        .endpoint(address, Role::Worker)
        .map_err(|e| connect_error(e.to_string()))?
        .tcp_nodelay(true);
    let endpoint = tune(endpoint, options);
    let deadline = tokio::time::Instant::now() + options.timeout;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(connect_error(format!(
        "not reachable within {:?}: {last}",
        options.timeout
    )))
}

/// A ring link's HTTP/2 settings, whatever it runs over: windows, frame
/// size, keep-alive (so a dead peer is noticed), connect timeout.
pub(crate) fn tune(
    endpoint: tonic::transport::Endpoint,
    options: &RingOptions,
) -> tonic::transport::Endpoint {
    endpoint
        .connect_timeout(options.timeout)
        .initial_stream_window_size(options.stream_window)
        .initial_connection_window_size(options.connection_window)
        .max_frame_size(options.frame_bytes)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(options.timeout)
        .keep_alive_while_idle(true)
}

fn still_in_flight(error: StillInFlight, successor: usize) -> CollectiveError {
    CollectiveError::PeerLost {
        rank: successor,
        reason: format!("what we sent it was still unread after {:?}", error.waited),
    }
}

/// `range` of `data` for writing, once nothing sent from it is in flight.
async fn writable<'d, T: Element, D: Target<T> + ?Sized>(
    data: &'d mut D,
    range: std::ops::Range<usize>,
    place: &Place<'_>,
) -> Result<&'d mut [T]> {
    data.writable(range, place.options.timeout)
        .await
        .map_err(|e| still_in_flight(e, place.successor))
}

/// Sends frames from `initial`, then from `forward`, until `forward` closes.
async fn send_all(
    links_out: &mut Outbound,
    initial: Vec<OutFrame>,
    mut forward: mpsc::UnboundedReceiver<OutFrame>,
    successor: usize,
    timeout: Duration,
) -> Result<()> {
    let mut send = async |frame: OutFrame| {
        let (step, chunk) = (frame.step, frame.chunk);
        match tokio::time::timeout(timeout, links_out.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CollectiveError::PeerLost {
                rank: successor,
                reason: "the stream to it closed".into(),
            }),
            Err(_) => Err(CollectiveError::Timeout {
                rank: successor,
                waited: timeout,
                step,
                chunk,
            }),
        }
    };
    for frame in initial {
        send(frame).await?;
    }
    while let Some(frame) = forward.recv().await {
        send(frame).await?;
    }
    Ok(())
}

/// Waits for the next frame and checks it is the one expected (see
/// [`FrameCheck::validate`]) before anyone reads its payload.
async fn receive(
    inbound: &mut Inbound,
    expected: &OpHeader,
    place: &Place<'_>,
    step: usize,
    chunk: usize,
) -> Result<InFrame> {
    let predecessor = place.predecessor;
    let timeout = place.options.timeout;
    let frame = match tokio::time::timeout(timeout, inbound.recv()).await {
        Err(_) => {
            return Err(CollectiveError::Timeout {
                rank: predecessor,
                waited: timeout,
                step: step as u32,
                chunk: chunk as u32,
            })
        }
        Ok(None) => {
            return Err(CollectiveError::PeerLost {
                rank: predecessor,
                reason: "its stream ended".into(),
            })
        }
        Ok(Some(Err(error))) => return Err(error),
        Ok(Some(Ok(frame))) => frame,
    };
    place
        .check(expected)
        .validate(&frame.head, frame.payload.len(), Some((step, chunk)))?;
    Ok(frame)
}

async fn all_reduce_ring<T: Element, D: Target<T> + ?Sized>(
    links: &mut Links,
    heads: &mut HeadWriter,
    header: OpHeader,
    data: &mut D,
    op: ReduceOp,
    place: Place<'_>,
) -> Result<()> {
    let Place {
        rank,
        world,
        successor,
        options,
        ..
    } = place;
    let chunk_elements = place.chunk_elements::<T>();
    let len = data.len();
    let initial: Vec<OutFrame> = chunks(segment(len, world, rank), chunk_elements)
        .into_iter()
        .enumerate()
        .map(|(i, c)| heads.frame(&header.head(0, i), data.send(c).into()))
        .collect();
    let (forward, forwarded) = mpsc::unbounded_channel();
    let sender = send_all(
        &mut links.outbound,
        initial,
        forwarded,
        successor,
        options.timeout,
    );
    let inbound = &mut links.inbound;
    let receiver = async move {
        for step in 0..world - 1 {
            let (_, received) = reduce_scatter_step(rank, world, step);
            for (i, c) in chunks(segment(len, world, received), chunk_elements)
                .into_iter()
                .enumerate()
            {
                let frame = receive(inbound, &header, &place, step, i).await?;
                let part = writable(data, c.clone(), &place).await?;
                reduce_parts(part, frame.payload.parts(), op);
                if step == world - 2 && op == ReduceOp::Avg {
                    for x in part.iter_mut() {
                        *x = x.divide(world);
                    }
                }
                drop(frame);
                // The reduced chunk moves on: next reduce-scatter step, or
                // (after the last one) the first all-gather step.
                let next = heads.frame(&header.head(step + 1, i), data.send(c).into());
                let _ = forward.send(next);
            }
        }
        for s in 0..world - 1 {
            let step = world - 1 + s;
            let (_, received) = all_gather_step(rank, world, s);
            for (i, c) in chunks(segment(len, world, received), chunk_elements)
                .into_iter()
                .enumerate()
            {
                let frame = receive(inbound, &header, &place, step, i).await?;
                copy_parts(writable(data, c, &place).await?, frame.payload.parts());
                if s < world - 2 {
                    // Forwarded as received, without a copy.
                    let next = heads.frame(&header.head(step + 1, i), frame.payload);
                    let _ = forward.send(next);
                }
            }
        }
        Ok(())
    };
    tokio::try_join!(sender, receiver).map(|_| ())
}

async fn broadcast_ring<T: Element>(
    links: &mut Links,
    heads: &mut HeadWriter,
    header: OpHeader,
    data: &mut [T],
    root: usize,
    place: Place<'_>,
) -> Result<()> {
    let Place {
        rank,
        successor,
        options,
        ..
    } = place;
    let chunk_elements = place.chunk_elements::<T>();
    let pieces = chunks(0..data.len(), chunk_elements);
    let (forward, forwarded) = mpsc::unbounded_channel();
    if rank == root {
        let initial = pieces
            .iter()
            .enumerate()
            .map(|(i, c)| heads.frame(&header.head(0, i), data.send(c.clone()).into()))
            .collect();
        drop(forward);
        return send_all(
            &mut links.outbound,
            initial,
            forwarded,
            successor,
            options.timeout,
        )
        .await;
    }
    let sender = send_all(
        &mut links.outbound,
        Vec::new(),
        forwarded,
        successor,
        options.timeout,
    );
    let inbound = &mut links.inbound;
    let receiver = async move {
        for (i, c) in pieces.into_iter().enumerate() {
            let frame = receive(inbound, &header, &place, 0, i).await?;
            copy_parts(&mut data[c], frame.payload.parts());
            if successor != root {
                let _ = forward.send(heads.frame(&header.head(0, i), frame.payload));
            }
        }
        Ok(())
    };
    tokio::try_join!(sender, receiver).map(|_| ())
}

async fn all_gather_ring(
    links: &mut Links,
    heads: &mut HeadWriter,
    header: OpHeader,
    payload: Bytes,
    place: Place<'_>,
) -> Result<Vec<Bytes>> {
    let Place {
        rank,
        world,
        successor,
        options,
        ..
    } = place;
    let mut gathered = vec![Bytes::new(); world];
    gathered[rank] = payload.clone();
    let (forward, forwarded) = mpsc::unbounded_channel();
    let sender = send_all(
        &mut links.outbound,
        vec![heads.frame(&header.head(0, 0), payload.into())],
        forwarded,
        successor,
        options.timeout,
    );
    let inbound = &mut links.inbound;
    let slots = &mut gathered;
    let receiver = async move {
        for step in 0..world - 1 {
            let frame = receive(inbound, &header, &place, step, 0).await?;
            slots[ring_sub(rank, step + 1, world)] = frame.payload.to_bytes();
            if step < world - 2 {
                let _ = forward.send(heads.frame(&header.head(step + 1, 0), frame.payload));
            }
        }
        Ok(())
    };
    tokio::try_join!(sender, receiver)?;
    Ok(gathered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Rings of `world` ranks in this process, each rank served by its own
    /// collective service on a loopback port, over `transport`, with
    /// `secrets[rank]`.
    async fn connect_ring(transport: Transport, secrets: Vec<RingSecret>) -> Vec<Result<Ring>> {
        let options = RingOptions {
            timeout: Duration::from_secs(10),
            chunk_bytes: 1 << 12,
            transport,
            ..RingOptions::default()
        };
        let mut services = Vec::new();
        let mut peers = Vec::new();
        for _ in &secrets {
            let service = CollectiveService::for_rings(&options);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            peers.push(listener.local_addr().unwrap().to_string());
            tokio::spawn(
                server_builder(&options)
                    .unwrap()
                    .add_service(service.clone())
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            services.push(service);
        }
        let connects = secrets.into_iter().enumerate().map(|(rank, secret)| {
            let plan = RingPlan {
                generation: 1,
                rank,
                peers: peers.clone(),
                successor_socket: None,
                secret,
            };
            let (service, options) = (services[rank].clone(), options.clone());
            tokio::spawn(async move { Ring::connect(&service, plan, options).await })
        });
        let mut rings = Vec::new();
        for connect in connects.collect::<Vec<_>>() {
            rings.push(connect.await.unwrap());
        }
        rings
    }

    async fn sum_over(rings: Vec<Ring>) -> Vec<Vec<f32>> {
        let tasks = rings.into_iter().map(|mut ring| {
            tokio::spawn(async move {
                let mut data: Vec<f32> = (0..10_000).map(|i| (ring.rank() * i) as f32).collect();
                ring.all_reduce(&mut data, ReduceOp::Sum).await.unwrap();
                ring.close().await.unwrap();
                data
            })
        });
        let mut out = Vec::new();
        for task in tasks.collect::<Vec<_>>() {
            out.push(task.await.unwrap());
        }
        out
    }

    fn memory_options(chunk_bytes: usize) -> RingOptions {
        RingOptions {
            timeout: Duration::from_secs(5),
            chunk_bytes,
            ..RingOptions::default()
        }
    }

    /// What rank `rank` contributes: fractional values of both signs, so
    /// the order of additions shows in the bits.
    fn contribution(rank: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7 + rank * 13) % 17) as f32 * 0.37 - 2.9 / (rank + 1) as f32)
            .collect()
    }

    /// Runs `op` on every ring at once; each result, by rank.
    async fn on_every_rank<R: Send + 'static, F>(rings: Vec<Ring>, op: F) -> Vec<R>
    where
        F: Fn(Ring) -> tokio::task::JoinHandle<R>,
    {
        let tasks: Vec<_> = rings.into_iter().map(op).collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn in_memory_rings_give_every_rank_the_same_bits_however_frames_are_cut() {
        for (world, len, chunk_bytes, cut, zero_copy) in [
            (2, 10_007, 4096, 7, true),
            (3, 10_007, 4096, 4093, false),
            (4, 1000, 64, 3, true),
            (5, 3, 4096, 1 << 20, true),
            (1, 10, 4096, 5, true),
            (3, 0, 4096, 5, false),
        ] {
            let rings = Ring::in_memory(1, world, cut, memory_options(chunk_bytes));
            let results = on_every_rank(rings, move |mut ring| {
                tokio::spawn(async move {
                    let mine = contribution(ring.rank(), len);
                    let out = if zero_copy {
                        let mut buffer = RingBuffer::from_vec(mine);
                        ring.all_reduce_buffer(&mut buffer, ReduceOp::Avg)
                            .await
                            .unwrap();
                        buffer.as_mut_slice().expect("nothing in flight").to_vec()
                    } else {
                        let mut data = mine;
                        ring.all_reduce(&mut data, ReduceOp::Avg).await.unwrap();
                        data
                    };
                    ring.close().await.unwrap();
                    out
                })
            })
            .await;
            let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let case = format!("world {world}, {len} elements, cut every {cut} bytes");
            for result in &results[1..] {
                assert_eq!(bits(result), bits(&results[0]), "{case}");
            }
            for (i, x) in results[0].iter().enumerate() {
                let exact: f64 = (0..world).map(|r| f64::from(contribution(r, len)[i])).sum();
                assert!(
                    (f64::from(*x) - exact / world as f64).abs() < 1e-5,
                    "{case}: {i}"
                );
            }
        }
    }

    #[tokio::test]
    async fn in_memory_broadcast_and_all_gather_reach_every_rank() {
        let rings = Ring::in_memory(1, 3, 5, memory_options(64));
        let results = on_every_rank(rings, |mut ring| {
            tokio::spawn(async move {
                let mut data = if ring.rank() == 1 {
                    contribution(1, 100)
                } else {
                    vec![0.0; 100]
                };
                ring.broadcast(&mut data, 1).await.unwrap();
                let gathered = ring
                    .all_gather(Bytes::from(format!("rank {}", ring.rank())))
                    .await
                    .unwrap();
                ring.close().await.unwrap();
                (data, gathered)
            })
        })
        .await;
        for (data, gathered) in results {
            assert_eq!(data, contribution(1, 100));
            let names: Vec<&[u8]> = gathered.iter().map(|b| b.as_ref()).collect();
            assert_eq!(names, [&b"rank 0"[..], b"rank 1", b"rank 2"]);
        }
    }

    #[tokio::test]
    async fn ranks_that_disagree_on_the_length_get_a_mismatch_not_corrupted_data() {
        let rings = Ring::in_memory(1, 3, 100, memory_options(4096));
        let errors = on_every_rank(rings, |mut ring| {
            tokio::spawn(async move {
                let len = if ring.rank() == 1 { 999 } else { 1000 };
                let mut buffer = RingBuffer::from_vec(contribution(ring.rank(), len));
                ring.all_reduce_buffer(&mut buffer, ReduceOp::Sum)
                    .await
                    .unwrap_err()
            })
        })
        .await;
        // Rank 1's successor and rank 1 itself see the other length.
        for rank in [1, 2] {
            let error = &errors[rank];
            assert!(
                matches!(
                    error,
                    CollectiveError::Mismatch {
                        field: "length (elements)",
                        ..
                    }
                ),
                "rank {rank}: {error}"
            );
        }
    }

    #[tokio::test]
    async fn frames_of_another_generation_are_refused_as_stale() {
        let mut rings = Ring::in_memory(7, 2, 100, memory_options(4096));
        rings[1].generation = 6;
        let errors = on_every_rank(rings, |mut ring| {
            tokio::spawn(async move {
                let mut data = contribution(ring.rank(), 100);
                ring.all_reduce(&mut data, ReduceOp::Sum).await.unwrap_err()
            })
        })
        .await;
        assert!(
            matches!(
                errors[0],
                CollectiveError::StaleGeneration { got: 6, current: 7 }
            ),
            "{}",
            errors[0]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_peer_is_an_error_at_once_and_a_silent_one_after_the_timeout() {
        // Rank 2 dies before the operation: its neighbours hear at once.
        let mut rings = Ring::in_memory(1, 3, 100, memory_options(4096));
        drop(rings.pop());
        let started = tokio::time::Instant::now();
        let errors = on_every_rank(rings, |mut ring| {
            tokio::spawn(async move {
                let mut data = contribution(ring.rank(), 1000);
                ring.all_reduce(&mut data, ReduceOp::Sum).await.unwrap_err()
            })
        })
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "no timeout waited"
        );
        assert!(
            matches!(errors[0], CollectiveError::PeerLost { rank: 2, .. }),
            "{}",
            errors[0]
        );
        // Rank 1 stays alive but never takes part: the others wait out the
        // timeout, then name it.
        let rings = Ring::in_memory(1, 3, 100, memory_options(4096));
        let started = tokio::time::Instant::now();
        let errors = on_every_rank(rings, |mut ring| {
            tokio::spawn(async move {
                if ring.rank() == 1 {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return None;
                }
                let mut data = contribution(ring.rank(), 1000);
                Some(ring.all_reduce(&mut data, ReduceOp::Sum).await.unwrap_err())
            })
        })
        .await;
        assert!(started.elapsed() >= Duration::from_secs(5));
        assert!(
            matches!(errors[2], Some(CollectiveError::Timeout { rank: 1, .. })),
            "{:?}",
            errors[2]
        );
    }

    #[tokio::test]
    async fn a_ring_over_mutual_tls_reduces() {
        let dir = tempfile::tempdir().unwrap();
        let written = ringleader_security::certs::init(
            dir.path(),
            &ringleader_security::certs::InitOptions { hosts: vec![] },
        )
        .unwrap();
        let tls =
            ringleader_security::TlsDir::load_for(&written.tls_dir(Role::Worker), Role::Worker)
                .unwrap();
        let secret = RingSecret::generate();
        let rings = connect_ring(Transport::Tls(Arc::new(tls)), vec![secret; 3]).await;
        let rings: Vec<Ring> = rings.into_iter().map(|r| r.unwrap()).collect();
        let expected: Vec<f32> = (0..10_000).map(|i| (3 * i) as f32).collect();
        for data in sum_over(rings).await {
            assert_eq!(data, expected);
        }
    }

    #[tokio::test]
    async fn a_rank_with_another_secret_is_refused_at_once_naming_the_proof() {
        let secret = RingSecret::generate();
        let started = tokio::time::Instant::now();
        let rings = connect_ring(
            Transport::Insecure,
            vec![secret.clone(), RingSecret::generate()],
        )
        .await;
        // Each rank's successor refuses its stream: both fail well before
        // the 10 s timeout, saying why.
        assert!(started.elapsed() < Duration::from_secs(5));
        for ring in rings {
            let error = ring.err().expect("refused").to_string();
            assert!(
                error.contains("Unauthenticated") && error.contains("ring proof"),
                "{error}"
            );
            assert!(!error.contains(&secret.to_hex()), "{error}");
        }
    }
}
