//! The receiving side of rings: the `Collective` gRPC service every worker
//! serves on its peer address.
//!
//! A [`crate::Ring`] registers its generation here before it dials its
//! successor; its predecessor's stream is then routed into that ring. A
//! stream for an older generation than the newest registered is rejected
//! before any frame is read.
//!
//! Streams from anyone: a stream whose ring is not registered yet waits (up
//! to the accept timeout) without being read, so whatever its sender pushes
//! meanwhile sits in HTTP/2 buffers. Two limits keep that bounded: at most
//! [`ServiceLimits::max_waiting_streams`] streams wait at once (more are
//! refused at once with `RESOURCE_EXHAUSTED`), and each can buffer at most
//! the server's HTTP/2 stream window ([`crate::RingOptions::stream_window`],
//! set by [`crate::ring::server_builder`]). A stream whose ring is already
//! registered is claimed at once and never counts against the limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ringleader_proto::collective::collective_server::Collective;
use ringleader_proto::collective::{RingClosed, RingFrame};
use tokio::sync::{mpsc, oneshot, Notify};
use tonic::{Request, Response, Status, Streaming};

use crate::error::CollectiveError;

/// Frames (or the reason the stream ended) from a ring's predecessor.
pub type Inbound = mpsc::Receiver<Result<RingFrame, Status>>;

struct Waiting {
    predecessor: usize,
    frames: mpsc::Sender<Result<RingFrame, Status>>,
    /// Told when the predecessor's stream has arrived.
    attached: oneshot::Sender<()>,
}

/// A registered ring's side of the service: its predecessor's frames, and a
/// signal that fires once that predecessor's stream has been accepted.
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
    /// defaults) and the given accept timeout.
    pub fn new(accept_timeout: Duration) -> Self {
        Self::with_limits(ServiceLimits {
            accept_timeout,
            ..ServiceLimits::for_rings(&crate::RingOptions::default())
        })
    }

    /// A service for rings built with `options`.
    pub fn for_rings(options: &crate::RingOptions) -> Self {
        Self::with_limits(ServiceLimits::for_rings(options))
    }

    pub fn with_limits(limits: ServiceLimits) -> Self {
        Self {
            registry: Arc::default(),
            registered: Arc::new(Notify::new()),
            waiting: Arc::default(),
            limits,
        }
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

    /// Expects one stream from `predecessor` for `generation`.
    pub fn register(
        &self,
        generation: u64,
        predecessor: usize,
        depth: usize,
    ) -> Result<Registration, CollectiveError> {
        let (tx, rx) = mpsc::channel(depth.max(1));
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
                    frames: tx,
                    attached: attached_tx,
                },
            );
        }
        self.registered.notify_waiters();
        Ok(Registration {
            inbound: rx,
            attached: attached_rx,
        })
    }

    /// Claims the registration for `generation`, waiting for it briefly
    /// (holding one of the limited waiting slots) if it is not there yet.
    async fn claim(
        &self,
        generation: u64,
        sender: usize,
    ) -> Result<mpsc::Sender<Result<RingFrame, Status>>, Status> {
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
                if let Some(waiting) = registry.waiting.remove(&generation) {
                    if waiting.predecessor != sender {
                        let expected = waiting.predecessor;
                        registry.waiting.insert(generation, waiting);
                        return Err(Status::invalid_argument(format!(
                            "rank {sender} is not this rank's predecessor (rank {expected}) in generation {generation}"
                        )));
                    }
                    let _ = waiting.attached.send(());
                    return Ok(waiting.frames);
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

fn metadata_number(request: &Request<Streaming<RingFrame>>, key: &str) -> Result<u64, Status> {
    request
        .metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Status::invalid_argument(format!("missing or bad {key} metadata")))
}

#[tonic::async_trait]
impl Collective for CollectiveService {
    async fn ring(
        &self,
        request: Request<Streaming<RingFrame>>,
    ) -> Result<Response<RingClosed>, Status> {
        let generation = metadata_number(&request, ringleader_proto::GENERATION_METADATA_KEY)?;
        let sender = metadata_number(&request, ringleader_proto::RANK_METADATA_KEY)? as usize;
        let frames = self.claim(generation, sender).await?;
        let mut stream = request.into_inner();
        loop {
            match stream.message().await {
                Ok(Some(frame)) => {
                    if frame.generation != generation {
                        let error = CollectiveError::StaleGeneration {
                            got: frame.generation,
                            current: generation,
                        };
                        let _ = frames.send(Err(error.clone_status())).await;
                        return Err(error.into());
                    }
                    if frames.send(Ok(frame)).await.is_err() {
                        return Err(Status::aborted("the receiving ring was closed"));
                    }
                }
                Ok(None) => {
                    let _ = frames
                        .send(Err(Status::unavailable(format!(
                            "rank {sender} closed its stream"
                        ))))
                        .await;
                    return Ok(Response::new(RingClosed {}));
                }
                Err(status) => {
                    let _ = frames.send(Err(status.clone())).await;
                    return Err(status);
                }
            }
        }
    }
}

impl CollectiveError {
    fn clone_status(&self) -> Status {
        Status::failed_precondition(self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{collective_server, server_builder};
    use crate::RingOptions;
    use ringleader_proto::collective::collective_client::CollectiveClient;
    use tokio::time::Instant;

    async fn serve(service: CollectiveService, options: &RingOptions) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            server_builder(options)
                .add_service(collective_server(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        address
    }

    /// Opens a stream for `generation` from rank `rank` (on its own
    /// connection) that sends `frames` and then stays open until the
    /// returned sender is dropped; returns the call's answer as a task.
    async fn open(
        address: &str,
        generation: u64,
        rank: u64,
        frames: Vec<RingFrame>,
    ) -> (
        mpsc::Sender<RingFrame>,
        tokio::task::JoinHandle<Result<(), Status>>,
    ) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
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
        request
            .metadata_mut()
            .insert(ringleader_proto::GENERATION_METADATA_KEY, generation.into());
        request
            .metadata_mut()
            .insert(ringleader_proto::RANK_METADATA_KEY, rank.into());
        let call = tokio::spawn(async move { client.ring(request).await.map(|_| ()) });
        (tx, call)
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

    #[tokio::test]
    async fn waiting_streams_are_limited_and_registered_rings_still_get_theirs() {
        let options = options();
        let service = CollectiveService::for_rings(&options);
        let address = serve(service.clone(), &options).await;

        // Two strangers wait (for generations nobody has built)…
        let (a, _a_call) = open(&address, 10, 1, vec![]).await;
        let (_b, _b_call) = open(&address, 11, 1, vec![]).await;
        wait_until("two streams waiting", || service.waiting_streams() == 2).await;
        // …a third is refused at once, naming the limit.
        let (_c, c_call) = open(&address, 12, 1, vec![]).await;
        let status = tokio::time::timeout(Duration::from_secs(5), c_call)
            .await
            .expect("refused at once")
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("limit: 2 streams"), "{status:?}");

        // A ring registered here still gets its predecessor's stream while
        // the waiting slots are full: it never waits, so needs no slot.
        let mut registration = service.register(20, 3, 4).unwrap();
        let frame = RingFrame {
            generation: 20,
            sequence: 1,
            ..Default::default()
        };
        let (_d, _d_call) = open(&address, 20, 3, vec![frame]).await;
        let got = tokio::time::timeout(Duration::from_secs(5), registration.inbound.recv())
            .await
            .expect("the frame arrives")
            .unwrap()
            .unwrap();
        assert_eq!(got.sequence, 1);

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
        let mut registration = service.register(1, 1, 4).unwrap();
        let frame = RingFrame {
            generation: 1,
            sequence: 1,
            payload: vec![0u8; 8192].into(),
            ..Default::default()
        };
        let (_tx, call) = open(&address, 1, 1, vec![frame]).await;
        let status = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        // The ring is told and never sees the frame as data.
        let delivered = registration.inbound.recv().await.unwrap();
        assert!(delivered.is_err());
    }
}
