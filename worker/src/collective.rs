//! Ring collectives on libtorch tensors.
//!
//! A CPU tensor that is contiguous is reduced in place, straight in its own
//! storage, and its chunks leave for the ring from that storage without a
//! copy ([`RingBuffer`]); anything else (CUDA, strided) goes through a
//! contiguous host staging copy that is written back afterwards.

use ringleader_collective::{CollectiveError, Element, ReduceOp, Ring, RingBuffer};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TensorCollectiveError {
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("tensors of kind {0:?} cannot be reduced (use f32, f64, f16 or bf16)")]
    UnsupportedKind(Kind),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// All-reduces `tensor` in place across the ring.
pub async fn all_reduce(
    ring: &mut Ring,
    tensor: &mut Tensor,
    op: ReduceOp,
) -> Result<(), TensorCollectiveError> {
    run(ring, tensor, TensorOp::AllReduce(op)).await
}

/// Copies `root`'s `tensor` into every rank's `tensor`.
pub async fn broadcast(
    ring: &mut Ring,
    tensor: &mut Tensor,
    root: usize,
) -> Result<(), TensorCollectiveError> {
    run(ring, tensor, TensorOp::Broadcast { root }).await
}

#[derive(Clone, Copy)]
enum TensorOp {
    AllReduce(ReduceOp),
    Broadcast { root: usize },
}

async fn run(
    ring: &mut Ring,
    tensor: &mut Tensor,
    op: TensorOp,
) -> Result<(), TensorCollectiveError> {
    match tensor.kind() {
        Kind::Float => run_as::<f32>(ring, tensor, op).await,
        Kind::Double => run_as::<f64>(ring, tensor, op).await,
        Kind::Half => run_as::<half::f16>(ring, tensor, op).await,
        Kind::BFloat16 => run_as::<half::bf16>(ring, tensor, op).await,
        other => Err(TensorCollectiveError::UnsupportedKind(other)),
    }
}

/// The host tensor to work on: `tensor` itself when it is a contiguous CPU
/// tensor, else a contiguous CPU copy (the staging buffer).
fn host_view(tensor: &Tensor) -> (Tensor, bool) {
    if tensor.device() == Device::Cpu && tensor.is_contiguous() {
        (tensor.shallow_clone(), false)
    } else {
        (tensor.to_device(Device::Cpu).contiguous(), true)
    }
}

/// The elements of a contiguous CPU tensor of element type `T`.
///
/// SAFETY: the caller holds the only handle through which the storage is
/// used for the duration (an exclusive borrow of the original tensor), the
/// tensor is contiguous, on the CPU, and of `T`'s kind.
unsafe fn elements_mut<T: Element>(host: &mut Tensor) -> &mut [T] {
    let numel = host.numel();
    if numel == 0 {
        return &mut [];
    }
    // SAFETY: upheld by the caller, see above.
    unsafe { std::slice::from_raw_parts_mut(host.data_ptr().cast::<T>(), numel) }
}

/// Keeps a tensor's storage alive while chunks sent from it are in flight.
struct KeepAlive {
    _storage: Tensor,
}

async fn run_as<T: Element>(
    ring: &mut Ring,
    tensor: &mut Tensor,
    op: TensorOp,
) -> Result<(), TensorCollectiveError> {
    let (mut host, staged) = host_view(tensor);
    match op {
        TensorOp::AllReduce(reduce) => {
            let numel = host.numel();
            let data = host.data_ptr().cast::<T>();
            // SAFETY: `host` is a contiguous CPU tensor of `T`'s kind with
            // `numel` elements, kept alive by the buffer (a shallow clone
            // shares the storage). Nothing else uses it meanwhile: `tensor`
            // is borrowed mutably for this whole call, and the ring returns
            // only once nothing sent from it is in flight — or with an
            // error, after which the attempt (and its tensors) is abandoned.
            let mut buffer = unsafe {
                RingBuffer::from_raw_parts(
                    data,
                    numel,
                    KeepAlive {
                        _storage: host.shallow_clone(),
                    },
                )
            };
            ring.all_reduce_buffer(&mut buffer, reduce).await?;
        }
        TensorOp::Broadcast { root } => {
            // SAFETY: `tensor` is borrowed mutably for this whole call and
            // `host` is either it (shallow) or a private contiguous CPU copy
            // of its kind.
            let data = unsafe { elements_mut::<T>(&mut host) };
            ring.broadcast(data, root).await?;
        }
    }
    if staged {
        tch::no_grad(|| tensor.f_copy_(&host))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringleader_collective::{CollectiveService, RingOptions, RingPlan};

    async fn serve(service: CollectiveService) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        address
    }

    async fn two_rings() -> (Ring, Ring) {
        let services = [
            CollectiveService::new(std::time::Duration::from_secs(5)),
            CollectiveService::new(std::time::Duration::from_secs(5)),
        ];
        let peers = vec![
            serve(services[0].clone()).await,
            serve(services[1].clone()).await,
        ];
        let secret = ringleader_collective::RingSecret::generate();
        let plan = |rank| RingPlan {
            successor_socket: None,
            generation: 1,
            rank,
            peers: peers.clone(),
            secret: secret.clone(),
        };
        let (a, b) = tokio::join!(
            Ring::connect(&services[0], plan(0), RingOptions::default()),
            Ring::connect(&services[1], plan(1), RingOptions::default()),
        );
        (a.unwrap(), b.unwrap())
    }

    #[tokio::test]
    async fn tensors_average_in_place_and_strided_ones_through_staging() {
        let (mut r0, mut r1) = two_rings().await;
        let mut a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let mut b = Tensor::from_slice(&[3.0f32, 4.0, 5.0, 6.0]).view([2, 2]);
        let (x, y) = tokio::join!(
            all_reduce(&mut r0, &mut a, ReduceOp::Avg),
            all_reduce(&mut r1, &mut b, ReduceOp::Avg)
        );
        x.unwrap();
        y.unwrap();
        let expected = Tensor::from_slice(&[2.0f32, 3.0, 4.0, 5.0]).view([2, 2]);
        assert!(a.equal(&expected) && b.equal(&expected));

        // A transposed (non-contiguous) bf16 tensor goes through staging.
        let mut a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
            .view([2, 2])
            .to_kind(Kind::BFloat16)
            .tr();
        let mut b = a.ones_like();
        let (x, y) = tokio::join!(
            all_reduce(&mut r0, &mut a, ReduceOp::Sum),
            all_reduce(&mut r1, &mut b, ReduceOp::Sum)
        );
        x.unwrap();
        y.unwrap();
        assert!(a.equal(&b));
        assert_eq!(
            Vec::<f32>::try_from(a.to_kind(Kind::Float).tr().reshape([-1])).unwrap(),
            [2.0, 3.0, 4.0, 5.0]
        );
    }

    #[tokio::test]
    async fn broadcast_copies_the_roots_tensor_and_ints_are_refused() {
        let (mut r0, mut r1) = two_rings().await;
        let mut a = Tensor::zeros([3], (Kind::Double, Device::Cpu));
        let mut b = Tensor::from_slice(&[7.0f64, 8.0, 9.0]);
        let (x, y) = tokio::join!(broadcast(&mut r0, &mut a, 1), broadcast(&mut r1, &mut b, 1));
        x.unwrap();
        y.unwrap();
        assert!(a.equal(&b));
        let mut ints = Tensor::from_slice(&[1i64]);
        assert!(matches!(
            all_reduce(&mut r0, &mut ints, ReduceOp::Sum).await,
            Err(TensorCollectiveError::UnsupportedKind(Kind::Int64))
        ));
    }
}
