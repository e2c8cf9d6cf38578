//! The receiving side of rings: the `Collective` gRPC service every worker
//! serves on its peer address.
//!
//! A [`crate::Ring`] registers its generation here, with the ring's secret,
//! before it dials its successor; its predecessor's stream is then routed
//! into that ring. Before a stream is handed to a ring or a single frame of
//! it is read, the service checks, in this order:
//!
//! 1. the caller's certificate is a worker's
//!    ([`Transport::check_peer`]; a no-op when the ring runs without TLS);
//! 2. the stream carries a well-formed proof ([`crate::auth`]) — if not, it
//!    is refused at once with `UNAUTHENTICATED`;
//! 3. its generation is not older than the newest registered
//!    (`FAILED_PRECONDITION`);
//! 4. once the ring is registered: the proof was made with that ring's
//!    secret for this generation and link (`UNAUTHENTICATED`), and the
//!    sender is this rank's predecessor (`INVALID_ARGUMENT`).
//!
//! A refused stream leaves the registration in place, so a stranger can
//! neither take a ring's slot nor spoil it for the real predecessor.
//!
//! Streams that prove nothing yet: a stream whose ring is not registered
//! yet waits (up to the accept timeout) without being read, so whatever its
//! sender pushes meanwhile sits in HTTP/2 buffers; when the ring registers,
//! the stream must still prove itself against its secret. Two limits keep
//! that bounded: at most [`ServiceLimits::max_waiting_streams`] streams wait
//! at once (more are refused at once with `RESOURCE_EXHAUSTED`), and each
//! can buffer at most the server's HTTP/2 stream window
//! ([`crate::RingOptions::stream_window`], set by
//! [`crate::ring::server_builder`]). A stream whose ring is already
//! registered is checked at once and never counts against the limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use ringleader_security::{Role, Transport};
use tokio::sync::{mpsc, oneshot, Notify};
use tonic::codegen::{http, BoxFuture};
use tonic::{Request, Status};

use crate::auth::{parse_proof, ProofError, RingSecret, RING_PROOF_METADATA_KEY};
use crate::error::CollectiveError;
use crate::link::{Inbound, RING_PATH};
use crate::wire::{FrameDecoder, InFrame, WireError};

/// Which of a link's streams (connections) a stream is, from 0.
pub const STRIPE_METADATA_KEY: &str = "ringleader-stripe";

/// Where a claimed stream's frames go: the registered ring's inbound link.
type FrameSender = mpsc::Sender<Result<InFrame, CollectiveError>>;

struct Waiting {
    predecessor: usize,
    /// This ring's rank here (the receiver of the link).
    rank: usize,
    secret: RingSecret,
    /// Per stripe, until its stream claims it.
    frames: Vec<Option<FrameSender>>,
    /// Told when the predecessor's streams have all arrived.
    attached: oneshot::Sender<()>,
}

/// The streams a ring expects: `stripes` of them (one per connection,
/// see [`crate::RingOptions::stripes`]) from `predecessor` to `rank` (this
/// process's rank) in `generation`, proven with `secret`.
#[derive(Clone, Debug)]
pub struct InboundLink {
    pub generation: u64,
    pub rank: usize,
    pub predecessor: usize,
    pub secret: RingSecret,
    pub stripes: usize,
}

/// A registered ring's side of the service: its predecessor's frames, and a
/// signal that fires once all that predecessor's streams have been accepted.
pub struct Registration {
    pub inbound: Inbound,
    pub attached: oneshot::Receiver<()>,
}

#[derive(Default)]
struct Registry {
    newest: u64,
    waiting: HashMap<u64, Waiting>,
}

/// What a collective service accepts from the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceLimits {
    /// How long a stream may wait for its ring to be registered locally.
    pub accept_timeout: Duration,
    /// Most streams waiting for their ring at once, over all connections
    /// (default [`DEFAULT_MAX_WAITING_STREAMS`]). Each can make this
    /// process buffer up to one HTTP/2 stream window before it is claimed.
    pub max_waiting_streams: usize,
    /// Largest encoded frame decoded or sent (a chunk plus its header; see
    /// [`crate::RingOptions::max_message_bytes`]).
    pub max_message_bytes: usize,
}

/// Default [`ServiceLimits::max_waiting_streams`]: a worker normally has
/// one ring at a time, whose predecessor may connect before the ring is
/// registered here; 8 leaves room for rings being rebuilt in quick
/// succession.
pub const DEFAULT_MAX_WAITING_STREAMS: usize = 8;

impl ServiceLimits {
    /// The limits that fit rings built with `options`.
    pub fn for_rings(options: &crate::RingOptions) -> Self {
        Self {
            accept_timeout: options.timeout,
            max_waiting_streams: options.max_waiting_streams,
            max_message_bytes: options.max_message_bytes(),
        }
    }
}

/// Routes inbound ring streams to the rings of this process.
#[derive(Clone)]
pub struct CollectiveService {
    registry: Arc<Mutex<Registry>>,
    registered: Arc<Notify>,
    /// Streams now waiting for their ring (see [`ServiceLimits`]).
    waiting: Arc<AtomicUsize>,
    limits: ServiceLimits,
    /// Whose certificates the `Ring` call accepts (see
    /// [`Transport::check_peer`]); must match how the server was built.
    transport: Transport,
}

/// A stream's place among the waiting ones; freed when dropped (also when
/// the sender gives up and the handler is dropped mid-wait).
struct WaitSlot(Arc<AtomicUsize>);

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl CollectiveService {
    /// A service with default limits (those of [`crate::RingOptions`]'s
    /// defaults) and the given accept timeout, for a server without TLS
    /// (streams must still prove the ring secret).
    pub fn new(accept_timeout: Duration) -> Self {
        Self::with_limits(ServiceLimits {
            accept_timeout,
            ..ServiceLimits::for_rings(&crate::RingOptions::default())
        })
    }

    /// A service for rings built with `options`, checking callers'
    /// certificates as `options.transport` says. Serve it from
    /// [`crate::ring::server_builder`]`(options)` so that the server's TLS
    /// matches.
    pub fn for_rings(options: &crate::RingOptions) -> Self {
        Self::with_limits(ServiceLimits::for_rings(options))
            .with_transport(options.transport.clone())
    }

    /// A service with `limits`, for a server without TLS (see
    /// [`CollectiveService::with_transport`]).
    pub fn with_limits(limits: ServiceLimits) -> Self {
        Self {
            registry: Arc::default(),
            registered: Arc::new(Notify::new()),
            waiting: Arc::default(),
            limits,
            transport: Transport::Insecure,
        }
    }

    /// The same service, accepting only callers `transport` accepts: with
    /// TLS, callers presenting a worker certificate.
    pub fn with_transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    pub fn limits(&self) -> &ServiceLimits {
        &self.limits
    }

    /// Streams now waiting for their ring to be registered.
    pub fn waiting_streams(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    fn take_wait_slot(&self) -> Result<WaitSlot, Status> {
        let limit = self.limits.max_waiting_streams;
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .map(|_| WaitSlot(self.waiting.clone()))
            .map_err(|_| CollectiveError::TooManyWaitingStreams { limit }.into())
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Expects `link.stripes` streams for `link`: from its predecessor,
    /// proven with its secret.
    pub fn register(
        &self,
        link: InboundLink,
        depth: usize,
    ) -> Result<Registration, CollectiveError> {
        let InboundLink {
            generation,
            rank,
            predecessor,
            secret,
            stripes,
        } = link;
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..stripes.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(depth.max(1));
                (Some(tx), rx)
            })
            .unzip();
        let (attached_tx, attached_rx) = oneshot::channel();
        {
            let mut registry = self.registry();
            if generation < registry.newest {
                return Err(CollectiveError::StaleGeneration {
                    got: generation,
                    current: registry.newest,
                });
            }
            registry.newest = generation;
            // Older rings can no longer receive.
            registry.waiting.retain(|g, _| *g >= generation);
            registry.waiting.insert(
                generation,
                Waiting {
                    predecessor,
                    rank,
                    secret,
                    frames: senders,
                    attached: attached_tx,
                },
            );
        }
        self.registered.notify_waiters();
        Ok(Registration {
            inbound: Inbound::new(receivers),
            attached: attached_rx,
        })
    }

    /// Claims the registration for `generation`, waiting for it briefly
    /// (holding one of the limited waiting slots) if it is not there yet.
    /// `proof` must be well-formed to wait at all, and made with the
    /// registered ring's secret to claim it; a refused stream leaves the
    /// registration where it was.
    async fn claim(
        &self,
        generation: u64,
        sender: usize,
        stripe: usize,
        proof: Option<&str>,
    ) -> Result<FrameSender, Status> {
        let refuse = |problem: ProofError| -> Status {
            CollectiveError::BadProof {
                rank: sender,
                generation,
                problem,
            }
            .into()
        };
        // No proof, or not even the shape of one: nothing to wait for.
        match proof {
            None => return Err(refuse(ProofError::Missing)),
            Some(text) => {
                parse_proof(text).map_err(refuse)?;
            }
        }
        let deadline = tokio::time::Instant::now() + self.limits.accept_timeout;
        let mut slot = None;
        loop {
            let notified = self.registered.notified();
            {
                let mut registry = self.registry();
                if generation < registry.newest {
                    return Err(CollectiveError::StaleGeneration {
                        got: generation,
                        current: registry.newest,
                    }
                    .into());
                }
                if let Some(waiting) = registry.waiting.get(&generation) {
                    // The proof first: a stranger learns nothing about the
                    // ring (not even who the predecessor is).
                    waiting
                        .secret
                        .verify(generation, sender, waiting.rank, proof)
                        .map_err(refuse)?;
                    if waiting.predecessor != sender {
                        return Err(Status::invalid_argument(format!(
                            "rank {sender} is not this rank's predecessor (rank {}) in generation {generation}",
                            waiting.predecessor
                        )));
                    }
                    let Some(Some(frames)) = registry
                        .waiting
                        .get_mut(&generation)
                        .map(|waiting| waiting.frames.get_mut(stripe).and_then(Option::take))
                    else {
                        return Err(Status::failed_precondition(format!(
                            "stripe {stripe} of generation {generation} is connected already, or the ring has no such stripe"
                        )));
                    };
                    let all_in = registry
                        .waiting
                        .get(&generation)
                        .is_some_and(|waiting| waiting.frames.iter().all(Option::is_none));
                    if all_in {
                        if let Some(waiting) = registry.waiting.remove(&generation) {
                            let _ = waiting.attached.send(());
                        }
                    }
                    return Ok(frames);
                }
            }
            if slot.is_none() {
                slot = Some(self.take_wait_slot()?);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::failed_precondition(format!(
                    "no ring of generation {generation} here (already connected, or never built)"
                )));
            }
        }
    }
}

fn metadata_number<B>(request: &Request<B>, key: &str) -> Result<u64, Status> {
    request
        .metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Status::invalid_argument(format!("missing or bad {key} metadata")))
}

impl CollectiveService {
    /// One `Ring` call: who is calling first, then its frames, decoded
    /// from the HTTP/2 DATA frames as they come (see [`crate::wire`]) and
    /// handed to the ring until the stream ends.
    async fn serve_ring(&self, request: http::Request<tonic::body::Body>) -> Result<(), Status> {
        if request.uri().path() != RING_PATH {
            return Err(Status::unimplemented(format!(
                "no method {} here",
                request.uri().path()
            )));
        }
        let request = Request::from_http(request);
        // Who is calling, before anything else: with TLS, only workers.
        self.transport.check_peer(&request, Role::Worker)?;
        let generation = metadata_number(&request, ringleader_proto::GENERATION_METADATA_KEY)?;
        let sender = metadata_number(&request, ringleader_proto::RANK_METADATA_KEY)? as usize;
        // One stream per connection of a striped link; absent: stripe 0.
        let stripe = match request.metadata().get(STRIPE_METADATA_KEY) {
            Some(_) => metadata_number(&request, STRIPE_METADATA_KEY)? as usize,
            None => 0,
        };
        // A value that is not visible ASCII counts as malformed, not missing.
        let proof = request
            .metadata()
            .get(RING_PROOF_METADATA_KEY)
            .map(|value| value.to_str().unwrap_or("?"));
        let frames = self.claim(generation, sender, stripe, proof).await?;
        let mut body = request.into_inner();
        let mut decoder = FrameDecoder::new(self.limits.max_message_bytes);
        // Tells the ring why its stream ended, and answers the sender.
        let to_ring = &frames;
        let end = |error: CollectiveError, status: Status| async move {
            let _ = to_ring.send(Err(error)).await;
            Err(status)
        };
        // Bytes that are not frames: the ring and the sender both hear why.
        let undecodable = |error: WireError| {
            let reason = error.to_string();
            end(
                CollectiveError::BadFrame {
                    rank: sender,
                    reason,
                },
                error.into(),
            )
        };
        loop {
            let mut data = match body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue, // trailers
                },
                Some(Err(status)) => {
                    let lost = CollectiveError::PeerLost {
                        rank: sender,
                        reason: status.message().to_string(),
                    };
                    return end(lost, status).await;
                }
                None => break,
            };
            loop {
                let frame = match decoder.next(&mut data) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(error) => return undecodable(error).await,
                };
                if frame.head.generation != generation {
                    let stale = CollectiveError::StaleGeneration {
                        got: frame.head.generation,
                        current: generation,
                    };
                    let status = Status::failed_precondition(stale.to_string());
                    return end(stale, status).await;
                }
                if frames.send(Ok(frame)).await.is_err() {
                    return Err(Status::aborted("the receiving ring was closed"));
                }
            }
        }
        if let Err(error) = decoder.finish() {
            return undecodable(error).await;
        }
        let _ = frames
            .send(Err(CollectiveError::PeerLost {
                rank: sender,
                reason: format!("rank {sender} closed its stream"),
            }))
            .await;
        Ok(())
    }
}

/// The answer to a `Ring` call that ended well: one empty `RingClosed`
/// message, then `grpc-status: 0`.
fn ring_closed() -> http::Response<tonic::body::Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [
        Ok::<_, Status>(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The `Collective` gRPC service, served below tonic's codec: add it to a
/// server from [`crate::ring::server_builder`].
impl tonic::codegen::Service<http::Request<tonic::body::Body>> for CollectiveService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move {
            Ok(match service.serve_ring(request).await {
                Ok(()) => ring_closed(),
                Err(status) => status.into_http(),
            })
        })
    }
}

impl tonic::server::NamedService for CollectiveService {
    const NAME: &'static str = "ringleader.collective.v1.Collective";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::server_builder;
    use crate::RingOptions;
    use ringleader_proto::collective::collective_client::CollectiveClient;
    use ringleader_proto::collective::RingFrame;
    use tokio::time::Instant;

    async fn serve(service: CollectiveService, options: &RingOptions) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            server_builder(options)
                .unwrap()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        address
    }

    /// What a stream claims to be: generation, sender rank, proof.
    struct Claim {
        generation: u64,
        rank: u64,
        proof: Option<String>,
    }

    /// A claim from `rank` to its successor `rank + 1`, proven with `secret`.
    fn proven(generation: u64, rank: u64, secret: &RingSecret) -> Claim {
        Claim {
            generation,
            rank,
            proof: Some(secret.proof(generation, rank as usize, rank as usize + 1)),
        }
    }

    /// Opens a stream making `claim` (on its own connection, over
    /// `transport`) that sends `frames` and then stays open until the
    /// returned sender is dropped; returns the call's answer as a task.
    async fn open_over(
        transport: &Transport,
        address: &str,
        claim: Claim,
        frames: Vec<RingFrame>,
    ) -> (
        mpsc::Sender<RingFrame>,
        tokio::task::JoinHandle<Result<(), Status>>,
    ) {
        let channel = transport
            .endpoint(address, Role::Worker)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = CollectiveClient::new(channel)
            .max_encoding_message_size(usize::MAX)
            .max_decoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel(4);
        for frame in frames {
            tx.send(frame).await.unwrap();
        }
        let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let metadata = request.metadata_mut();
        metadata.insert(
            ringleader_proto::GENERATION_METADATA_KEY,
            claim.generation.into(),
        );
        metadata.insert(ringleader_proto::RANK_METADATA_KEY, claim.rank.into());
        if let Some(proof) = claim.proof {
            metadata.insert(RING_PROOF_METADATA_KEY, proof.parse().unwrap());
        }
        let call = tokio::spawn(async move { client.ring(request).await.map(|_| ()) });
        (tx, call)
    }

    async fn open(
        address: &str,
        claim: Claim,
        frames: Vec<RingFrame>,
    ) -> (
        mpsc::Sender<RingFrame>,
        tokio::task::JoinHandle<Result<(), Status>>,
    ) {
        open_over(&Transport::Insecure, address, claim, frames).await
    }

    async fn must_be_refused(
        call: tokio::task::JoinHandle<Result<(), Status>>,
        code: tonic::Code,
    ) -> Status {
        let status = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("answered at once")
            .unwrap()
            .expect_err("must be refused");
        assert_eq!(status.code(), code, "{status:?}");
        status
    }

    async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "{what}: not within 10s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn options() -> RingOptions {
        RingOptions {
            timeout: Duration::from_secs(30),
            max_waiting_streams: 2,
            chunk_bytes: 4096,
            ..RingOptions::default()
        }
    }

    fn link(generation: u64, rank: usize, secret: &RingSecret) -> InboundLink {
        InboundLink {
            generation,
            rank,
            predecessor: rank - 1,
            secret: secret.clone(),
            stripes: 1,
        }
    }

    fn frame(generation: u64, sequence: u64) -> RingFrame {
        RingFrame {
            generation,
            sequence,
            ..Default::default()
        }
    }

    /// The registered ring receives frame `sequence` within 5 s.
    async fn must_receive(registration: &mut Registration, sequence: u64) {
        let got = tokio::time::timeout(Duration::from_secs(5), registration.inbound.recv())
            .await
            .expect("the frame arrives")
            .unwrap()
            .unwrap();
        assert_eq!(got.head.sequence, sequence);
    }

    #[tokio::test]
    async fn waiting_streams_are_limited_and_registered_rings_still_get_theirs() {
        let options = options();
        let service = CollectiveService::for_rings(&options);
        let address = serve(service.clone(), &options).await;
        let secret = RingSecret::generate();

        // Two strangers wait (for generations nobody has built)…
        let (a, _a_call) = open(&address, proven(10, 1, &secret), vec![]).await;
        let (_b, _b_call) = open(&address, proven(11, 1, &secret), vec![]).await;
        wait_until("two streams waiting", || service.waiting_streams() == 2).await;
        // …a third is refused at once, naming the limit.
        let (_c, c_call) = open(&address, proven(12, 1, &secret), vec![]).await;
        let status = must_be_refused(c_call, tonic::Code::ResourceExhausted).await;
        assert!(status.message().contains("limit: 2 streams"), "{status:?}");

        // A ring registered here still gets its predecessor's stream while
        // the waiting slots are full: it never waits, so needs no slot.
        let mut registration = service.register(link(20, 4, &secret), 4).unwrap();
        let (_d, _d_call) = open(&address, proven(20, 3, &secret), vec![frame(20, 1)]).await;
        must_receive(&mut registration, 1).await;

        // A stranger that gives up frees its slot.
        drop(a);
        drop(_a_call);
        wait_until("the slot is freed", || service.waiting_streams() <= 1).await;
    }

    #[tokio::test]
    async fn frames_over_the_message_limit_are_refused() {
        let options = options();
        let service = CollectiveService::for_rings(&options);
        assert_eq!(
            service.limits().max_message_bytes,
            4096 + crate::frame::FRAME_OVERHEAD_BYTES
        );
        let address = serve(service.clone(), &options).await;
        let secret = RingSecret::generate();
        let mut registration = service.register(link(1, 2, &secret), 4).unwrap();
        let frame = RingFrame {
            generation: 1,
            sequence: 1,
            payload: vec![0u8; 8192].into(),
            ..Default::default()
        };
        let (_tx, call) = open(&address, proven(1, 1, &secret), vec![frame]).await;
        must_be_refused(call, tonic::Code::OutOfRange).await;
        // The ring is told and never sees the frame as data.
        let delivered = registration.inbound.recv().await.unwrap();
        assert!(delivered.is_err());
    }

    #[tokio::test]
    async fn streams_without_the_secret_are_refused_and_leave_the_ring_to_its_predecessor() {
        let options = options();
        let service = CollectiveService::for_rings(&options);
        let address = serve(service.clone(), &options).await;
        let secret = RingSecret::generate();
        let mut registration = service.register(link(7, 2, &secret), 4).unwrap();

        // No proof, a garbled one, and one made with another secret or for
        // another link: all refused before any frame is read, naming what
        // was wrong and nothing of the secret.
        let other = RingSecret::generate();
        let claims = [
            (None, "is missing"),
            (Some("xyz".to_string()), "is malformed"),
            (Some(other.proof(7, 1, 2)), "is wrong"),
            (Some(secret.proof(7, 1, 3)), "is wrong"),
            (Some(secret.proof(6, 1, 2)), "is wrong"),
        ];
        for (proof, problem) in claims {
            let claim = Claim {
                generation: 7,
                rank: 1,
                proof,
            };
            let (_tx, call) = open(&address, claim, vec![frame(7, 99)]).await;
            let status = must_be_refused(call, tonic::Code::Unauthenticated).await;
            let message = status.message();
            assert!(
                message.contains("rank 1's ring proof for generation 7")
                    && message.contains(problem),
                "{message}"
            );
            assert!(!message.contains(&secret.to_hex()), "{message}");
            assert!(!message.contains(&secret.proof(7, 1, 2)), "{message}");
        }
        // A stranger with no proof does not even learn who the predecessor is.
        let claim = Claim {
            generation: 7,
            rank: 0,
            proof: Some(other.proof(7, 0, 2)),
        };
        let (_tx, call) = open(&address, claim, vec![]).await;
        let status = must_be_refused(call, tonic::Code::Unauthenticated).await;
        assert!(!status.message().contains("predecessor"), "{status:?}");

        // The real predecessor still gets the ring, and only its frames
        // reach it.
        let (_real, _real_call) = open(&address, proven(7, 1, &secret), vec![frame(7, 1)]).await;
        must_receive(&mut registration, 1).await;
        assert_eq!(service.waiting_streams(), 0);
    }

    #[tokio::test]
    async fn streams_that_waited_must_still_prove_the_secret_once_the_ring_registers() {
        let options = options();
        let service = CollectiveService::for_rings(&options);
        let address = serve(service.clone(), &options).await;
        let secret = RingSecret::generate();

        // A stream with no proof is refused at once: it never takes a
        // waiting slot.
        let no_proof = Claim {
            generation: 3,
            rank: 1,
            proof: None,
        };
        let (_tx, call) = open(&address, no_proof, vec![]).await;
        must_be_refused(call, tonic::Code::Unauthenticated).await;
        assert_eq!(service.waiting_streams(), 0);

        // A stranger with a well-formed but wrong proof arrives before the
        // ring is registered: it waits, unread…
        let stranger = RingSecret::generate();
        let (_s, stranger_call) = open(&address, proven(3, 1, &stranger), vec![frame(3, 66)]).await;
        wait_until("the stranger waits", || service.waiting_streams() == 1).await;
        // …and once the ring registers, it is refused; the ring stays
        // registered for the real predecessor, which arrives later.
        let mut registration = service.register(link(3, 2, &secret), 4).unwrap();
        let status = must_be_refused(stranger_call, tonic::Code::Unauthenticated).await;
        assert!(status.message().contains("is wrong"), "{status:?}");
        let (_real, _real_call) = open(&address, proven(3, 1, &secret), vec![frame(3, 1)]).await;
        must_receive(&mut registration, 1).await;
        wait_until("no stream waits", || service.waiting_streams() == 0).await;
    }

    #[tokio::test]
    async fn a_real_predecessor_that_waited_gets_its_ring() {
        let options = options();
        let service = CollectiveService::for_rings(&options);
        let address = serve(service.clone(), &options).await;
        let secret = RingSecret::generate();
        let (_real, _real_call) = open(&address, proven(4, 0, &secret), vec![frame(4, 1)]).await;
        wait_until("the predecessor waits", || service.waiting_streams() == 1).await;
        let mut registration = service.register(link(4, 1, &secret), 4).unwrap();
        must_receive(&mut registration, 1).await;
        wait_until("the slot is freed", || service.waiting_streams() == 0).await;
    }

    /// Certificates for tests: `ringleader certs init` into a temp dir.
    fn certificates() -> (tempfile::TempDir, ringleader_security::certs::Written) {
        let dir = tempfile::tempdir().unwrap();
        let written = ringleader_security::certs::init(
            dir.path(),
            &ringleader_security::certs::InitOptions { hosts: vec![] },
        )
        .unwrap();
        (dir, written)
    }

    fn transport_for(written: &ringleader_security::certs::Written, role: Role) -> Transport {
        let dir = ringleader_security::TlsDir::load(&written.tls_dir(role)).unwrap();
        Transport::Tls(Arc::new(dir))
    }

    #[tokio::test]
    async fn over_tls_only_worker_certificates_may_open_a_ring_stream() {
        let (_dir, written) = certificates();
        let worker = transport_for(&written, Role::Worker);
        let options = RingOptions {
            transport: worker.clone(),
            ..options()
        };
        let service = CollectiveService::for_rings(&options);
        let address = serve(service.clone(), &options).await;
        let secret = RingSecret::generate();
        let mut registration = service.register(link(2, 1, &secret), 4).unwrap();

        // A client's and a coordinator's certificate, from the same CA,
        // even with the right proof: refused, naming the role.
        for role in [Role::Client, Role::Coordinator] {
            let (_tx, call) = open_over(
                &transport_for(&written, role),
                &address,
                proven(2, 0, &secret),
                vec![frame(2, 50)],
            )
            .await;
            let status = must_be_refused(call, tonic::Code::PermissionDenied).await;
            assert!(
                status.message().contains("needs a worker certificate"),
                "{status:?}"
            );
        }
        // A worker's certificate without the secret: refused too.
        let (_tx, call) = open_over(
            &worker,
            &address,
            proven(2, 0, &RingSecret::generate()),
            vec![],
        )
        .await;
        must_be_refused(call, tonic::Code::Unauthenticated).await;
        // The ring's own predecessor gets through.
        let (_real, _call) =
            open_over(&worker, &address, proven(2, 0, &secret), vec![frame(2, 1)]).await;
        must_receive(&mut registration, 1).await;
    }
}
