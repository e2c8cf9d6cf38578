//! The seam between the ring's algorithms and the network.
//!
//! A rank's [`Links`] are its outgoing frames to its successor, its
//! incoming frames from its predecessor and the task that carries the
//! outgoing ones. [`crate::Ring::connect`] builds them over gRPC (this
//! module's [`open_stream`] and [`crate::service`]); [`memory_ring`]
//! builds a whole ring's in one process, cutting every frame's bytes at
//! arbitrary points and decoding them with the same [`FrameDecoder`] the
//! service uses, so the algorithms' error paths (mismatch, stale
//! generation, lost peer, timeout) get fast unit tests.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use smallvec::SmallVec;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::Status;

use crate::error::CollectiveError;
use crate::wire::{FrameDecoder, InFrame, OutFrame};

/// Frames from the predecessor, or why its stream ended, over one or
/// more streams (stripes): frame k of the link travels on stripe k mod n.
pub struct Inbound {
    stripes: Vec<mpsc::Receiver<Result<InFrame, CollectiveError>>>,
    next: usize,
}

impl Inbound {
    pub fn new(stripes: Vec<mpsc::Receiver<Result<InFrame, CollectiveError>>>) -> Self {
        assert!(!stripes.is_empty(), "a link has at least one stream");
        Self { stripes, next: 0 }
    }

    /// The link's next frame, from the stripe it was sent on. Cancel-safe:
    /// a receive that did not complete does not move the link on.
    pub async fn recv(&mut self) -> Option<Result<InFrame, CollectiveError>> {
        let stripe = self.next % self.stripes.len();
        let got = self.stripes[stripe].recv().await;
        if matches!(got, Some(Ok(_))) {
            self.next += 1;
        }
        got
    }

    /// After the last frame: every stripe's end, or the first thing that
    /// is not one (a frame, which the caller reports).
    pub async fn recv_ends(&mut self) -> Option<InFrame> {
        for stripe in &mut self.stripes {
            if let Some(Ok(frame)) = stripe.recv().await {
                return Some(frame);
            }
        }
        None
    }
}

/// Frames to the successor, over one or more streams (see [`Inbound`]).
pub struct Outbound {
    stripes: Vec<mpsc::Sender<OutFrame>>,
    next: usize,
}

impl Outbound {
    pub fn new(stripes: Vec<mpsc::Sender<OutFrame>>) -> Self {
        assert!(!stripes.is_empty(), "a link has at least one stream");
        Self { stripes, next: 0 }
    }

    /// Queues `frame` on the next stripe; an error once that stream closed.
    pub async fn send(&mut self, frame: OutFrame) -> Result<(), OutFrame> {
        let stripe = self.next % self.stripes.len();
        self.stripes[stripe].send(frame).await.map_err(|e| e.0)?;
        self.next += 1;
        Ok(())
    }
}

/// A rank's two links.
pub struct Links {
    pub outbound: Outbound,
    pub inbound: Inbound,
    /// Carry `outbound`'s frames, one per stripe; each ends once its
    /// frames are all delivered (or with the reason they could not be).
    pub carriers: Vec<JoinHandle<Result<(), Status>>>,
}

/// gRPC path of the `Collective.Ring` method.
pub const RING_PATH: &str = "/ringleader.collective.v1.Collective/Ring";

/// The body of a ring stream: each frame's head, then its payload's
/// parts, each as an HTTP/2 DATA frame of its own, as they are.
struct OutboundBody {
    frames: mpsc::Receiver<OutFrame>,
    queued: SmallVec<[Bytes; 4]>,
}

impl http_body::Body for OutboundBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if !self.queued.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(self.queued.remove(0)))));
        }
        match ready!(self.frames.poll_recv(cx)) {
            Some(frame) => {
                self.queued.extend(frame.payload.parts().iter().cloned());
                Poll::Ready(Some(Ok(Frame::data(frame.head))))
            }
            None => Poll::Ready(None),
        }
    }
}

/// Opens the ring stream on `channel` with `metadata` (generation, rank,
/// proof) and returns the sender of its frames and the task that runs the
/// call: it ends when the successor answers, which it does once our stream
/// has ended (or at once, refusing it, with the status saying why).
pub fn open_stream(
    channel: Channel,
    metadata: tonic::metadata::MetadataMap,
    depth: usize,
) -> (mpsc::Sender<OutFrame>, JoinHandle<Result<(), Status>>) {
    let (outbound, frames) = mpsc::channel(depth.max(1));
    let body = OutboundBody {
        frames,
        queued: SmallVec::new(),
    };
    let call = tokio::spawn(async move {
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(RING_PATH)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(tonic::body::Body::new(body))
            .map_err(|e| Status::internal(e.to_string()))?;
        request.headers_mut().extend(metadata.into_headers());
        let mut channel = channel;
        std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut channel, cx))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let response = tower_service::Service::call(&mut channel, request)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        grpc_outcome(response).await
    });
    (outbound, call)
}

/// The status a gRPC response ends with: in its headers (trailers-only)
/// or its trailers, after its (ignored, empty) message.
async fn grpc_outcome(response: http::Response<tonic::body::Body>) -> Result<(), Status> {
    use http_body_util::BodyExt;
    if let Some(status) = Status::from_header_map(response.headers()) {
        return ok_or(status);
    }
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(trailers) = frame.trailers_ref() {
            if let Some(status) = Status::from_header_map(trailers) {
                return ok_or(status);
            }
        }
    }
    Err(Status::internal(
        "the ring stream's answer ended without a grpc-status",
    ))
}

fn ok_or(status: Status) -> Result<(), Status> {
    match status.code() {
        tonic::Code::Ok => Ok(()),
        _ => Err(status),
    }
}

/// Links for every rank of a ring of `world` in this process: rank r's
/// frames reach rank r + 1 through a pump that concatenates them and cuts
/// the bytes every `cut` bytes (as HTTP/2 DATA frames would) before
/// decoding them again with `max_message_bytes` as the limit. Dropping a
/// rank's links ends its neighbours' streams, as a dead process would.
pub fn memory_ring(world: usize, depth: usize, cut: usize, max_message_bytes: usize) -> Vec<Links> {
    let mut outbounds = Vec::with_capacity(world);
    let mut inbounds: Vec<Option<Inbound>> = Vec::with_capacity(world);
    let mut carriers = Vec::with_capacity(world);
    let mut pumps = Vec::with_capacity(world);
    for _ in 0..world {
        let (outbound, frames) = mpsc::channel::<OutFrame>(depth.max(1));
        let (delivered, inbound) = mpsc::channel(depth.max(1));
        outbounds.push(outbound);
        inbounds.push(None);
        pumps.push((frames, delivered, inbound));
    }
    // Rank r's outgoing frames become rank r + 1's inbound ones.
    for (rank, (frames, delivered, inbound)) in pumps.into_iter().enumerate() {
        inbounds[(rank + 1) % world] = Some(Inbound::new(vec![inbound]));
        carriers.push(tokio::spawn(pump(
            frames,
            delivered,
            rank,
            cut.max(1),
            max_message_bytes,
        )));
    }
    outbounds
        .into_iter()
        .zip(inbounds)
        .zip(carriers)
        .map(|((outbound, inbound), carrier)| Links {
            outbound: Outbound::new(vec![outbound]),
            inbound: inbound.expect("every rank has a predecessor"),
            carriers: vec![carrier],
        })
        .collect()
}

async fn pump(
    mut frames: mpsc::Receiver<OutFrame>,
    delivered: mpsc::Sender<Result<InFrame, CollectiveError>>,
    sender: usize,
    cut: usize,
    max_message_bytes: usize,
) -> Result<(), Status> {
    let mut decoder = FrameDecoder::new(max_message_bytes);
    let lost = |reason: &str| CollectiveError::PeerLost {
        rank: sender,
        reason: reason.into(),
    };
    while let Some(frame) = frames.recv().await {
        let mut wire = BytesMut::from(&frame.head[..]);
        for part in frame.payload.parts() {
            wire.extend_from_slice(part);
        }
        drop(frame);
        let mut wire = wire.freeze();
        while !wire.is_empty() {
            let mut piece = wire.split_to(cut.min(wire.len()));
            loop {
                match decoder.next(&mut piece) {
                    Ok(Some(frame)) => {
                        if delivered.send(Ok(frame)).await.is_err() {
                            return Err(lost("the receiving ring was closed").into());
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        let reason = error.to_string();
                        let _ = delivered
                            .send(Err(CollectiveError::BadFrame {
                                rank: sender,
                                reason,
                            }))
                            .await;
                        return Err(error.into());
                    }
                }
            }
        }
    }
    // The sender closed its stream, or dropped it.
    let _ = delivered
        .send(Err(lost(&format!("rank {sender} closed its stream"))))
        .await;
    Ok(())
}
