//! Checking ring frames before their payload is used.
//!
//! Everything in a [`RingFrame`] comes from the network, so a receiver checks
//! it against what it expects *before* touching the payload: the operation's
//! shape (generation, sequence, kind, dtype, reduce op, length, root), that
//! the (step, chunk) position exists in this operation's schedule, that it is
//! the position the receiver is waiting for, and that the payload holds
//! exactly the elements the schedule puts there. A frame that fails any check
//! is a typed [`CollectiveError`], never a panic and never corrupted data.
//!
//! The checks are pure (no I/O): [`validate_frame_bytes`] decodes arbitrary
//! bytes and validates them against a fixed expectation, for fuzzing.

use std::ops::Range;

use ringleader_proto::collective::{DType, OpKind, ReduceOp};

use crate::error::CollectiveError;
use crate::plan::{all_gather_step, reduce_scatter_step, ring_sub, segment};
use crate::wire::{decode_message, FrameHead, InFrame, GRPC_PREFIX_BYTES};

/// Encoded size of a `RingFrame` without its payload, with margin (see
/// [`crate::wire::MAX_HEAD_BYTES`]).
pub const FRAME_OVERHEAD_BYTES: usize = crate::wire::MAX_HEAD_BYTES;

/// The shape of one operation, stamped on each of its frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpHeader {
    pub generation: u64,
    pub sequence: u64,
    pub kind: OpKind,
    pub dtype: DType,
    pub reduce: ReduceOp,
    pub elements: u64,
    pub root: u32,
}

impl OpHeader {
    /// The head of this operation's frame at (`step`, `chunk`).
    pub fn head(&self, step: usize, chunk: usize) -> FrameHead {
        FrameHead {
            generation: self.generation,
            sequence: self.sequence,
            step: step as u32,
            chunk: chunk as u32,
            kind: self.kind as i32,
            dtype: self.dtype as i32,
            reduce: self.reduce as i32,
            elements: self.elements,
            root: self.root,
        }
    }
}

/// What a receiving rank expects of the frames of the operation under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameCheck {
    pub header: OpHeader,
    /// The receiving rank and the ring's size.
    pub rank: usize,
    pub world: usize,
    /// Chunk size of the ring (see [`crate::RingOptions::chunk_bytes`]).
    pub chunk_bytes: usize,
    /// Largest payload of an all-gather frame (its payload is opaque bytes
    /// of any length up to this).
    pub max_gather_bytes: usize,
}

/// Bytes per element of `dtype`; `None` for a dtype a ring cannot carry.
pub fn dtype_size(dtype: DType) -> Option<usize> {
    match dtype {
        DType::F32 => Some(4),
        DType::F64 => Some(8),
        DType::F16 | DType::Bf16 => Some(2),
        DType::Bytes => Some(1),
        DType::Unspecified => None,
    }
}

/// Elements per chunk for elements of `size` bytes: the chunk size rounded
/// down to whole elements, at least one.
pub fn chunk_elements(chunk_bytes: usize, size: usize) -> usize {
    (chunk_bytes / size.max(1)).max(1)
}

/// Chunk `index` of `range` cut into pieces of `chunk_elements` (see
/// [`crate::plan::chunks`]: an empty range has one empty chunk), or `None`
/// when there is no such chunk. Computed without allocating.
pub fn chunk_range(
    range: Range<usize>,
    chunk_elements: usize,
    index: usize,
) -> Option<Range<usize>> {
    let per = chunk_elements.max(1);
    if range.is_empty() {
        return (index == 0).then_some(range.start..range.start);
    }
    let start = range.start.checked_add(index.checked_mul(per)?)?;
    if start >= range.end {
        return None;
    }
    Some(start..start.saturating_add(per).min(range.end))
}

fn op_name(kind: i32) -> String {
    OpKind::try_from(kind)
        .map(|k| k.as_str_name().to_string())
        .unwrap_or_else(|_| kind.to_string())
}

fn dtype_name(dtype: i32) -> String {
    DType::try_from(dtype)
        .map(|k| k.as_str_name().to_string())
        .unwrap_or_else(|_| dtype.to_string())
}

fn reduce_name(op: i32) -> String {
    ReduceOp::try_from(op)
        .map(|k| k.as_str_name().to_string())
        .unwrap_or_else(|_| op.to_string())
}

impl FrameCheck {
    /// The rank whose frames this rank receives.
    pub fn predecessor(&self) -> usize {
        ring_sub(self.rank, 1, self.world.max(1))
    }

    fn bad(&self, reason: String) -> CollectiveError {
        CollectiveError::BadFrame {
            rank: self.predecessor(),
            reason,
        }
    }

    /// Number of steps in which this rank receives frames.
    pub fn receiving_steps(&self) -> usize {
        let hops = self.world.saturating_sub(1);
        match self.header.kind {
            OpKind::AllReduce => 2 * hops,
            OpKind::Broadcast => {
                usize::from(hops > 0 && self.rank as u64 != u64::from(self.header.root))
            }
            OpKind::AllGather => hops,
            OpKind::Unspecified => 0,
        }
    }

    /// The element range a frame at (`step`, `chunk`) carries, and bytes per
    /// element; an error naming the position if the schedule has no such
    /// frame for this rank. For an all-gather the range is empty and the
    /// payload is opaque.
    pub fn position(
        &self,
        step: u32,
        chunk: u32,
    ) -> Result<(Range<usize>, usize), CollectiveError> {
        let steps = self.receiving_steps();
        let (step, chunk) = (step as usize, chunk as usize);
        if step >= steps {
            return Err(self.bad(format!(
                "step {step} is outside the operation ({steps} receiving steps at rank {} of {})",
                self.rank, self.world
            )));
        }
        let size = dtype_size(self.header.dtype)
            .ok_or_else(|| self.bad("unspecified dtype".to_string()))?;
        let elements = usize::try_from(self.header.elements).map_err(|_| {
            self.bad(format!(
                "{} elements do not fit in memory",
                self.header.elements
            ))
        })?;
        let world = self.world;
        let segment_range = match self.header.kind {
            OpKind::AllReduce if step < world - 1 => segment(
                elements,
                world,
                reduce_scatter_step(self.rank, world, step).1,
            ),
            OpKind::AllReduce => segment(
                elements,
                world,
                all_gather_step(self.rank, world, step - (world - 1)).1,
            ),
            OpKind::Broadcast => 0..elements,
            OpKind::AllGather => {
                if chunk != 0 {
                    return Err(self.bad(format!(
                        "chunk {chunk} of an all-gather step (it has one chunk)"
                    )));
                }
                return Ok((0..0, 1));
            }
            // receiving_steps() is 0, so unreachable; still an error, not a panic.
            OpKind::Unspecified => return Err(self.bad("unspecified operation".to_string())),
        };
        let per = chunk_elements(self.chunk_bytes, size);
        let len = segment_range.len();
        chunk_range(segment_range, per, chunk)
            .map(|r| (r, size))
            .ok_or_else(|| {
                self.bad(format!(
                    "chunk {chunk} of step {step} does not exist (the segment has {len} elements in chunks of {per})"
                ))
            })
    }

    /// Checks `frame` (a head and its payload's length) against this
    /// operation. `at` is the (step, chunk) the receiver is waiting for, or
    /// `None` to accept any position the schedule has. On success returns
    /// the element range the payload fills (empty for an all-gather).
    pub fn validate(
        &self,
        frame: &FrameHead,
        payload_len: usize,
        at: Option<(usize, usize)>,
    ) -> Result<Range<usize>, CollectiveError> {
        let expected = &self.header;
        let rank = self.predecessor();
        let mismatch =
            |field: &'static str, ours: String, theirs: String| CollectiveError::Mismatch {
                rank,
                field,
                ours,
                theirs,
            };
        if frame.generation != expected.generation {
            return Err(CollectiveError::StaleGeneration {
                got: frame.generation,
                current: expected.generation,
            });
        }
        if frame.kind != expected.kind as i32 {
            return Err(mismatch(
                "operation",
                op_name(expected.kind as i32),
                op_name(frame.kind),
            ));
        }
        if frame.dtype != expected.dtype as i32 {
            return Err(mismatch(
                "dtype",
                dtype_name(expected.dtype as i32),
                dtype_name(frame.dtype),
            ));
        }
        if frame.reduce != expected.reduce as i32 {
            return Err(mismatch(
                "reduce op",
                reduce_name(expected.reduce as i32),
                reduce_name(frame.reduce),
            ));
        }
        if frame.elements != expected.elements {
            return Err(mismatch(
                "length (elements)",
                expected.elements.to_string(),
                frame.elements.to_string(),
            ));
        }
        if frame.root != expected.root {
            return Err(mismatch(
                "root",
                expected.root.to_string(),
                frame.root.to_string(),
            ));
        }
        if frame.sequence != expected.sequence {
            return Err(mismatch(
                "operation sequence",
                expected.sequence.to_string(),
                frame.sequence.to_string(),
            ));
        }
        let (range, size) = self.position(frame.step, frame.chunk)?;
        if let Some((step, chunk)) = at {
            if (frame.step as usize, frame.chunk as usize) != (step, chunk) {
                return Err(mismatch(
                    "step/chunk",
                    format!("{step}/{chunk}"),
                    format!("{}/{}", frame.step, frame.chunk),
                ));
            }
        }
        let got = payload_len;
        if expected.kind == OpKind::AllGather {
            if got > self.max_gather_bytes {
                return Err(self.bad(format!(
                    "all-gather payload of {got} bytes is over the limit of {} bytes",
                    self.max_gather_bytes
                )));
            }
            return Ok(range);
        }
        let want = range.len() * size;
        if got != want {
            return Err(self.bad(format!(
                "payload of {got} bytes at step {} chunk {}; expected {want} bytes ({} {} elements)",
                frame.step,
                frame.chunk,
                range.len(),
                dtype_name(expected.dtype as i32),
            )));
        }
        Ok(range)
    }

    /// Largest encoded frame of this operation: its biggest payload plus
    /// [`FRAME_OVERHEAD_BYTES`].
    pub fn max_frame_bytes(&self) -> usize {
        let payload = match self.header.kind {
            OpKind::AllGather => self.max_gather_bytes,
            _ => self.chunk_bytes,
        };
        payload.saturating_add(FRAME_OVERHEAD_BYTES)
    }
}

/// Decodes `bytes`, one protobuf-encoded `RingFrame`, with the ring's own
/// decoder ([`crate::wire::FrameDecoder`]) and validates it against
/// `check`, accepting any (step, chunk) position the schedule has. Input
/// longer than the largest frame of the operation is refused before
/// decoding.
pub fn validate_frame_bytes_against(
    bytes: &[u8],
    check: &FrameCheck,
) -> Result<InFrame, CollectiveError> {
    let bad = |reason: String| CollectiveError::BadFrame {
        rank: check.predecessor(),
        reason,
    };
    let limit = check.max_frame_bytes();
    if bytes.len() > limit {
        return Err(bad(format!(
            "{} bytes is over the frame limit of {limit} bytes",
            bytes.len()
        )));
    }
    let mut message = Vec::with_capacity(GRPC_PREFIX_BYTES + bytes.len());
    message.push(0);
    message.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    message.extend_from_slice(bytes);
    let frame =
        decode_message(&message, limit).map_err(|e| bad(format!("undecodable frame: {e}")))?;
    check.validate(&frame.head, frame.payload.len(), None)?;
    Ok(frame)
}

/// The fixed expectation [`validate_frame_bytes`] checks against: rank 1 of
/// a ring of 4, generation 7, operation 3, an f32 sum all-reduce of 10,007
/// elements in 4 KiB chunks (so segments of 2,502 or 2,501 elements cut
/// into chunks of 1,024).
pub const FUZZ_CHECK: FrameCheck = FrameCheck {
    header: OpHeader {
        generation: 7,
        sequence: 3,
        kind: OpKind::AllReduce,
        dtype: DType::F32,
        reduce: ReduceOp::Sum,
        elements: 10_007,
        root: 0,
    },
    rank: 1,
    world: 4,
    chunk_bytes: 4096,
    max_gather_bytes: 4096,
};

/// Decodes arbitrary `bytes` as a [`RingFrame`] and validates it against
/// [`FUZZ_CHECK`]. Never panics; for fuzzers.
pub fn validate_frame_bytes(bytes: &[u8]) -> Result<(), CollectiveError> {
    validate_frame_bytes_against(bytes, &FUZZ_CHECK).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::chunks;
    use prost::Message;
    use ringleader_proto::collective::RingFrame;

    /// A frame at (`step`, `chunk`) with `payload` bytes.
    struct At(FrameHead, usize);

    fn frame_at(check: &FrameCheck, step: usize, chunk: usize, payload: usize) -> At {
        At(check.header.head(step, chunk), payload)
    }

    impl FrameCheck {
        fn check(
            &self,
            frame: &At,
            at: Option<(usize, usize)>,
        ) -> Result<Range<usize>, CollectiveError> {
            self.validate(&frame.0, frame.1, at)
        }
    }

    fn encode(frame: &At) -> Vec<u8> {
        let h = frame.0;
        RingFrame {
            generation: h.generation,
            sequence: h.sequence,
            step: h.step,
            chunk: h.chunk,
            kind: h.kind,
            dtype: h.dtype,
            reduce: h.reduce,
            elements: h.elements,
            root: h.root,
            payload: vec![0u8; frame.1].into(),
        }
        .encode_to_vec()
    }

    #[test]
    fn chunk_range_agrees_with_the_plan() {
        for (range, per) in [(0..10, 4), (3..3, 4), (5..6, 1), (7..100, 7), (0..1, 100)] {
            let all = chunks(range.clone(), per);
            for (i, c) in all.iter().enumerate() {
                assert_eq!(chunk_range(range.clone(), per, i).as_ref(), Some(c));
            }
            assert_eq!(chunk_range(range.clone(), per, all.len()), None);
            assert_eq!(chunk_range(range.clone(), per, usize::MAX), None);
        }
    }

    #[test]
    fn every_frame_the_schedule_sends_is_valid_and_nothing_else() {
        let check = FUZZ_CHECK;
        let per = chunk_elements(check.chunk_bytes, 4);
        let mut seen = 0;
        for step in 0..check.receiving_steps() {
            for chunk in 0..4 {
                match check.position(step as u32, chunk as u32) {
                    Ok((range, 4)) => {
                        seen += 1;
                        let frame = frame_at(&check, step, chunk, range.len() * 4);
                        assert_eq!(check.check(&frame, Some((step, chunk))).unwrap(), range);
                        let bytes = encode(&frame);
                        validate_frame_bytes(&bytes).unwrap();
                        // One element short or long is refused.
                        let short = frame_at(&check, step, chunk, range.len() * 4 - 1);
                        assert!(matches!(
                            check.check(&short, None),
                            Err(CollectiveError::BadFrame { rank: 0, .. })
                        ));
                        let long = frame_at(&check, step, chunk, range.len() * 4 + 4);
                        assert!(check.check(&long, None).is_err());
                    }
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(e) => assert!(chunk >= 3, "{e}"),
                }
            }
        }
        // 6 steps, each segment of ~2502 elements in 3 chunks of ≤ 1024.
        assert_eq!((seen, per), (18, 1024));
    }

    #[test]
    fn out_of_range_positions_and_wrong_shapes_are_clear_errors() {
        let check = FUZZ_CHECK;
        let err = check
            .check(&frame_at(&check, 6, 0, 4096), None)
            .unwrap_err();
        assert!(err.to_string().contains("step 6 is outside"), "{err}");
        let err = check
            .check(&frame_at(&check, 0, 9, 4096), None)
            .unwrap_err();
        assert!(err.to_string().contains("chunk 9 of step 0"), "{err}");
        let err = check
            .check(&frame_at(&check, 0, 1, 4096), Some((0, 0)))
            .unwrap_err();
        assert!(err.to_string().contains("step/chunk"), "{err}");
        let mut frame = frame_at(&check, 0, 0, 4096);
        frame.0.elements = u64::MAX;
        let err = check.check(&frame, None).unwrap_err();
        assert!(err.to_string().contains("length (elements)"), "{err}");
        frame.0.elements = check.header.elements;
        frame.0.dtype = 99;
        let err = check.check(&frame, None).unwrap_err();
        assert!(err.to_string().contains("disagrees on dtype"), "{err}");
        frame.0.dtype = DType::F32 as i32;
        frame.0.generation = 6;
        assert!(matches!(
            check.check(&frame, None),
            Err(CollectiveError::StaleGeneration { got: 6, current: 7 })
        ));
    }

    #[test]
    fn arbitrary_bytes_are_errors_not_panics() {
        assert!(validate_frame_bytes(&[]).is_err()); // a default frame: generation 0
        assert!(validate_frame_bytes(&[0xff; 64]).is_err());
        assert!(validate_frame_bytes(&[0x52, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        let huge = vec![0u8; FUZZ_CHECK.max_frame_bytes() + 1];
        let err = validate_frame_bytes(&huge).unwrap_err();
        assert!(err.to_string().contains("over the frame limit"), "{err}");
        // A pseudo-random sweep of short inputs.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len % 97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = validate_frame_bytes(&bytes);
        }
    }

    #[test]
    fn other_operations_have_their_own_ranges() {
        let broadcast = FrameCheck {
            header: OpHeader {
                kind: OpKind::Broadcast,
                reduce: ReduceOp::Unspecified,
                dtype: DType::F64,
                elements: 1000,
                root: 2,
                ..FUZZ_CHECK.header
            },
            ..FUZZ_CHECK
        };
        assert_eq!(broadcast.receiving_steps(), 1);
        assert_eq!(broadcast.position(0, 1).unwrap(), (512..1000, 8));
        assert!(broadcast.position(0, 2).is_err());
        let root = FrameCheck {
            rank: 2,
            ..broadcast
        };
        assert!(root.position(0, 0).is_err(), "the root receives nothing");

        let gather = FrameCheck {
            header: OpHeader {
                kind: OpKind::AllGather,
                reduce: ReduceOp::Unspecified,
                dtype: DType::Bytes,
                elements: 0,
                ..FUZZ_CHECK.header
            },
            max_gather_bytes: 16,
            ..FUZZ_CHECK
        };
        assert!(gather.check(&frame_at(&gather, 2, 0, 16), None).is_ok());
        assert!(gather.check(&frame_at(&gather, 2, 1, 0), None).is_err());
        assert!(gather.check(&frame_at(&gather, 0, 0, 17), None).is_err());
        let single = FrameCheck {
            world: 1,
            rank: 0,
            ..FUZZ_CHECK
        };
        assert!(single.check(&frame_at(&single, 0, 0, 0), None).is_err());
    }
}
