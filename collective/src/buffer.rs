//! What an operation reduces in place, and how its chunks leave without a
//! copy.
//!
//! A [`RingBuffer`] owns (or keeps alive) the memory it reduces: a `Vec`,
//! or a tensor's storage. A chunk it sends is a [`Bytes`] whose owner is a
//! lease on the buffer ([`Bytes::from_owner`]), so HTTP/2 writes the
//! buffer's own memory to the socket (or hands it to TLS) and the buffer
//! cannot be freed while it does, whatever happens to the operation.
//!
//! The ring writes a region again only after everything sent from it has
//! been released ([`Target::writable`]). In a ring that never waits in
//! practice: a region comes back (reduced further or final) only after the
//! successor has received what was sent from it, so HTTP/2 has written and
//! dropped it. The wait is still there, bounded by the ring's timeout, so
//! a write can never race a send. An operation returns once all its sends
//! are released; until then [`RingBuffer::as_mut_slice`] says `None`.
//!
//! Plain slices (`&mut [T]`) are targets too: their chunks are copied into
//! fresh [`Bytes`] as before, for callers that do not own their memory.

use std::collections::HashMap;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::element::Element;

/// Memory a ring reduces in place and sends from without copying.
pub struct RingBuffer<T: Element> {
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    ptr: NonNull<T>,
    len: usize,
    /// Keeps the memory alive (the `Vec`, the tensor); never used otherwise.
    _owner: Mutex<Box<dyn Send>>,
    /// Leases in flight, by the first element of their region.
    leases: Mutex<HashMap<usize, usize>>,
    released: Notify,
}

// SAFETY: `ptr` points into memory `_owner` keeps alive for as long as
// `Shared` lives; it is read through leases (shared, immutable regions) and
// written only by the operation holding `&mut RingBuffer`, never in a
// region with a lease (see `Target::writable`). `T: Element` is `Pod`.
unsafe impl<T: Element> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Element> Sync for Shared<T> {}

impl<T: Element> Shared<T> {
    fn leases(&self) -> MutexGuard<'_, HashMap<usize, usize>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Element> RingBuffer<T> {
    pub fn from_vec(mut data: Vec<T>) -> Self {
        let (ptr, len) = (data.as_mut_ptr(), data.len());
        // SAFETY: the Vec's heap memory does not move when the Vec does,
        // and the Vec is kept alive by the buffer.
        unsafe { Self::from_raw_parts(ptr, len, data) }
    }

    /// A buffer over `len` elements at `ptr`, kept alive by `owner`.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` elements (or
    /// dangling with `len == 0`), aligned, for as long as `owner` lives,
    /// and nothing else may read or write that memory while the buffer or
    /// any chunk sent from it lives.
    pub unsafe fn from_raw_parts(ptr: *mut T, len: usize, owner: impl Send + 'static) -> Self {
        Self {
            shared: Arc::new(Shared {
                ptr: NonNull::new(ptr).unwrap_or(NonNull::dangling()),
                len,
                _owner: Mutex::new(Box::new(owner)),
                leases: Mutex::default(),
                released: Notify::new(),
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.shared.len
    }

    pub fn is_empty(&self) -> bool {
        self.shared.len == 0
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: see `Shared`; writes need `&mut self`.
        unsafe { std::slice::from_raw_parts(self.shared.ptr.as_ptr(), self.shared.len) }
    }

    /// The elements, unless chunks sent from them are still in flight
    /// (after an operation that failed or was cancelled).
    pub fn as_mut_slice(&mut self) -> Option<&mut [T]> {
        // Every lease holds a reference: one left means none in flight.
        (Arc::strong_count(&self.shared) == 1).then(|| {
            // SAFETY: no lease, and `&mut self` excludes every other use.
            unsafe { std::slice::from_raw_parts_mut(self.shared.ptr.as_ptr(), self.shared.len) }
        })
    }
}

/// A sent region of a [`RingBuffer`], as the owner of its [`Bytes`].
struct Lease<T: Element> {
    shared: Arc<Shared<T>>,
    range: Range<usize>,
}

impl<T: Element> AsRef<[u8]> for Lease<T> {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the range is inside the buffer, which `shared` keeps
        // alive, and is not written while this lease lives.
        let elements = unsafe {
            std::slice::from_raw_parts(
                self.shared.ptr.as_ptr().add(self.range.start),
                self.range.len(),
            )
        };
        bytemuck::cast_slice(elements)
    }
}

impl<T: Element> Drop for Lease<T> {
    fn drop(&mut self) {
        let mut leases = self.shared.leases();
        if let Some(count) = leases.get_mut(&self.range.start) {
            *count -= 1;
            if *count == 0 {
                leases.remove(&self.range.start);
            }
        }
        drop(leases);
        self.shared.released.notify_waiters();
    }
}

/// A region of a lease-tracked target was still in flight after the
/// timeout: the successor never took what was sent from it.
#[derive(Debug)]
pub(crate) struct StillInFlight {
    pub waited: Duration,
}

/// What an operation reduces into and sends from. The ring sends and
/// writes whole chunks, the same chunk grid for both.
pub(crate) trait Target<T: Element> {
    fn len(&self) -> usize;
    /// The bytes of `range`, to send.
    fn send(&self, range: Range<usize>) -> Bytes;
    /// `range` for writing, once nothing sent from it is in flight.
    async fn writable(
        &mut self,
        range: Range<usize>,
        timeout: Duration,
    ) -> Result<&mut [T], StillInFlight>;
    /// Waits until nothing sent from the target is in flight.
    async fn settle(&self, timeout: Duration) -> Result<(), StillInFlight>;
}

impl<T: Element> Target<T> for [T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }

    fn send(&self, range: Range<usize>) -> Bytes {
        Bytes::copy_from_slice(bytemuck::cast_slice(&self[range]))
    }

    async fn writable(
        &mut self,
        range: Range<usize>,
        _timeout: Duration,
    ) -> Result<&mut [T], StillInFlight> {
        Ok(&mut self[range])
    }

    async fn settle(&self, _timeout: Duration) -> Result<(), StillInFlight> {
        Ok(())
    }
}

impl<T: Element> RingBuffer<T> {
    /// Waits until `in_flight` says nothing is, or the timeout passes.
    async fn wait_until(
        &self,
        timeout: Duration,
        in_flight: impl Fn(&HashMap<usize, usize>) -> bool,
    ) -> Result<(), StillInFlight> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let released = self.shared.released.notified();
            if !in_flight(&self.shared.leases()) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(StillInFlight { waited: timeout });
            }
        }
    }
}

impl<T: Element> Target<T> for RingBuffer<T> {
    fn len(&self) -> usize {
        self.shared.len
    }

    fn send(&self, range: Range<usize>) -> Bytes {
        assert!(range.end <= self.shared.len, "a chunk inside the buffer");
        *self.shared.leases().entry(range.start).or_default() += 1;
        Bytes::from_owner(Lease {
            shared: self.shared.clone(),
            range,
        })
    }

    async fn writable(
        &mut self,
        range: Range<usize>,
        timeout: Duration,
    ) -> Result<&mut [T], StillInFlight> {
        assert!(range.end <= self.shared.len, "a chunk inside the buffer");
        let start = range.start;
        self.wait_until(timeout, |leases| leases.contains_key(&start))
            .await?;
        // SAFETY: in bounds; no lease on this chunk (chunks never overlap:
        // one grid for sends and writes); `&mut self` excludes other writers.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(self.shared.ptr.as_ptr().add(range.start), range.len())
        })
    }

    async fn settle(&self, timeout: Duration) -> Result<(), StillInFlight> {
        self.wait_until(timeout, |leases| !leases.is_empty()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_region_is_writable_only_once_what_was_sent_from_it_is_released() {
        let mut buffer = RingBuffer::from_vec(vec![1.0f32, 2.0, 3.0, 4.0]);
        let sent = buffer.send(0..2);
        assert_eq!(sent.as_ref(), bytemuck::cast_slice::<f32, u8>(&[1.0, 2.0]));
        assert!(buffer.as_mut_slice().is_none(), "a chunk is in flight");
        // Another chunk is free to write meanwhile.
        buffer.writable(2..4, Duration::from_secs(1)).await.unwrap()[0] = 9.0;
        let waited = buffer.writable(0..2, Duration::from_secs(1)).await;
        assert!(matches!(waited, Err(StillInFlight { .. })));
        let slice = sent.slice(4..);
        drop(sent);
        assert!(
            buffer.settle(Duration::from_secs(1)).await.is_err(),
            "a slice still holds it"
        );
        drop(slice);
        buffer.settle(Duration::from_secs(1)).await.unwrap();
        buffer.writable(0..2, Duration::from_secs(1)).await.unwrap()[1] = 7.0;
        assert_eq!(buffer.as_mut_slice().unwrap(), &[1.0, 7.0, 9.0, 4.0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_keeps_the_memory_alive_after_the_buffer_is_gone() {
        let buffer = RingBuffer::from_vec((0..1000u32).map(|i| i as f32).collect());
        let sent = buffer.send(10..12);
        drop(buffer);
        assert_eq!(
            sent.as_ref(),
            bytemuck::cast_slice::<f32, u8>(&[10.0, 11.0])
        );
    }
}
