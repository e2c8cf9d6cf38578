//! The receiving side of rings: the `Collective` gRPC service every worker
//! serves on its peer address.
//!
//! A [`crate::Ring`] registers its generation here before it dials its
//! successor; its predecessor's stream is then routed into that ring. A
//! stream for an older generation than the newest registered is rejected
//! before any frame is read.

use std::collections::HashMap;
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

/// Routes inbound ring streams to the rings of this process.
#[derive(Clone)]
pub struct CollectiveService {
    registry: Arc<Mutex<Registry>>,
    registered: Arc<Notify>,
    /// How long a stream may wait for its ring to be registered locally.
    accept_timeout: Duration,
}

impl CollectiveService {
    pub fn new(accept_timeout: Duration) -> Self {
        Self {
            registry: Arc::default(),
            registered: Arc::new(Notify::new()),
            accept_timeout,
        }
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

    /// Claims the registration for `generation`, waiting for it briefly.
    async fn claim(
        &self,
        generation: u64,
        sender: usize,
    ) -> Result<mpsc::Sender<Result<RingFrame, Status>>, Status> {
        let deadline = tokio::time::Instant::now() + self.accept_timeout;
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
