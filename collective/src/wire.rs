//! The ring's wire format, written and read below tonic's codec so that
//! gradient bytes are never copied on their way through gRPC.
//!
//! A ring stream is an ordinary gRPC client stream of `RingFrame` messages
//! (proto/proto/collective.proto): each message is the 5-byte gRPC prefix
//! (no compression, big-endian length) and the protobuf encoding of a
//! `RingFrame`, fields in tag order with the payload (field 10) last — the
//! layout prost itself writes. Any gRPC client can speak it.
//!
//! What changes is who writes and reads the bytes:
//!
//! * **Send.** [`HeadWriter`] hand-encodes the prefix and fields 1–9 plus
//!   the payload's tag and length into a small reused buffer; the payload
//!   follows as its own [`Bytes`] (a lease on the sender's buffer, see
//!   [`crate::buffer`], or a received frame's parts when forwarding). Both go
//!   to HTTP/2 as they are: nothing is copied before the kernel (or TLS).
//! * **Receive.** [`FrameDecoder`] parses HTTP/2 DATA frames as they
//!   arrive: the small head is gathered (at most [`MAX_HEAD_BYTES`]), the
//!   payload is kept as slices of the DATA frames themselves
//!   ([`Payload`]), which the ring reduces or copies straight out of
//!   ([`crate::element::reduce_parts`]), elements straddling two DATA frames
//!   included.
//!
//! Everything here reads hostile bytes: lengths are checked against the
//! largest message before anything is kept, and nothing is allocated from
//! a length the peer chose.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use smallvec::SmallVec;

/// gRPC's length prefix: a compression flag and a big-endian u32 length.
pub const GRPC_PREFIX_BYTES: usize = 5;

/// Largest encoded `RingFrame` without its payload bytes: nine scalar fields
/// of at most 11 bytes each plus the payload's tag and length come to under
/// 120 bytes.
pub const MAX_HEAD_BYTES: usize = 128;

/// Protobuf key of `RingFrame.payload` (field 10, length-delimited).
const PAYLOAD_KEY: u64 = (10 << 3) | 2;

/// Why a ring stream's bytes are not frames.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message of {got} bytes is over the limit of {limit} bytes")]
    TooLarge { got: usize, limit: usize },
    #[error("{0}")]
    Malformed(String),
}

impl From<String> for WireError {
    fn from(reason: String) -> Self {
        WireError::Malformed(reason)
    }
}

impl From<WireError> for tonic::Status {
    /// As tonic's own codec answers: a message over the limit is
    /// `OUT_OF_RANGE`, anything else the sender's `INVALID_ARGUMENT`.
    fn from(error: WireError) -> Self {
        match error {
            WireError::TooLarge { .. } => tonic::Status::out_of_range(error.to_string()),
            WireError::Malformed(_) => tonic::Status::invalid_argument(error.to_string()),
        }
    }
}

/// Everything of a `RingFrame` but its payload: what the receiver checks
/// before it touches a payload byte (see [`crate::frame::FrameCheck`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameHead {
    pub generation: u64,
    pub sequence: u64,
    pub step: u32,
    pub chunk: u32,
    /// `OpKind`, `DType` and `ReduceOp` as on the wire (any i32 a peer sent).
    pub kind: i32,
    pub dtype: i32,
    pub reduce: i32,
    pub elements: u64,
    pub root: u32,
}

/// A frame's payload: slices of the HTTP/2 DATA frames it arrived in (or
/// the one buffer it was sent from), in order.
#[derive(Clone, Debug, Default)]
pub struct Payload {
    parts: SmallVec<[Bytes; 2]>,
    len: usize,
}

impl Payload {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.len += part.len();
            self.parts.push(part);
        }
    }

    /// The payload as one buffer: free when it arrived in one piece, a copy
    /// otherwise (all-gather payloads, which are small).
    pub fn to_bytes(&self) -> Bytes {
        match self.parts.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            parts => {
                let mut joined = BytesMut::with_capacity(self.len);
                for part in parts {
                    joined.extend_from_slice(part);
                }
                joined.freeze()
            }
        }
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Self {
        let mut payload = Payload::default();
        payload.push(bytes);
        payload
    }
}

/// A frame to send: its encoded head (gRPC prefix included) and payload.
#[derive(Clone, Debug)]
pub struct OutFrame {
    pub head: Bytes,
    pub payload: Payload,
    /// Where the frame sits, for error messages (a send that times out).
    pub step: u32,
    pub chunk: u32,
}

/// A received frame, its payload not yet checked (see
/// [`crate::frame::FrameCheck::validate`]).
#[derive(Clone, Debug)]
pub struct InFrame {
    pub head: FrameHead,
    pub payload: Payload,
}

/// Encodes frame heads into one reused buffer: a head is a slice of it,
/// and the buffer's memory is reclaimed once earlier heads have been sent.
#[derive(Default)]
pub struct HeadWriter {
    buffer: BytesMut,
}

impl HeadWriter {
    /// The frame `head` carrying `payload`, ready to send.
    pub fn frame(&mut self, head: &FrameHead, payload: Payload) -> OutFrame {
        if self.buffer.capacity() - self.buffer.len() < GRPC_PREFIX_BYTES + MAX_HEAD_BYTES {
            self.buffer
                .reserve(64 * (GRPC_PREFIX_BYTES + MAX_HEAD_BYTES));
        }
        head.encode(payload.len(), &mut self.buffer);
        OutFrame {
            head: self.buffer.split().freeze(),
            payload,
            step: head.step,
            chunk: head.chunk,
        }
    }
}

fn put_varint(out: &mut impl BufMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8(value as u8 | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

impl FrameHead {
    /// The fields as protobuf writes them (zero values omitted; an `i32`
    /// sign-extended to 64 bits), in tag order.
    fn fields(&self) -> [(u64, u64); 9] {
        [
            (1, self.generation),
            (2, self.sequence),
            (3, self.step.into()),
            (4, self.chunk.into()),
            (5, self.kind as i64 as u64),
            (6, self.dtype as i64 as u64),
            (7, self.reduce as i64 as u64),
            (8, self.elements),
            (9, self.root.into()),
        ]
    }

    /// Appends the gRPC prefix and the encoding of everything up to the
    /// payload bytes, for a payload of `payload_len` bytes.
    pub fn encode(&self, payload_len: usize, out: &mut BytesMut) {
        let fields = self.fields();
        let fields_len: usize = fields
            .iter()
            .filter(|(_, v)| *v != 0)
            .map(|(_, v)| 1 + varint_len(*v))
            .sum();
        let payload_field = 1 + varint_len(payload_len as u64) + payload_len;
        let message_len = fields_len + payload_field;
        out.put_u8(0);
        out.put_u32(u32::try_from(message_len).unwrap_or(u32::MAX));
        for (tag, value) in fields {
            if value != 0 {
                put_varint(out, tag << 3);
                put_varint(out, value);
            }
        }
        put_varint(out, PAYLOAD_KEY);
        put_varint(out, payload_len as u64);
    }

    /// Parses the head at the start of `bytes`, the first bytes of a message
    /// of `message_len` bytes. Returns the head, its length in bytes and the
    /// payload's length, or `Ok(None)` when `bytes` does not hold the whole
    /// head yet.
    fn decode(bytes: &[u8], message_len: usize) -> Result<Option<(Self, usize, usize)>, String> {
        let mut head = FrameHead::default();
        let mut at = 0;
        loop {
            if at == message_len {
                // No payload field: an empty payload (prost omits it).
                return Ok(Some((head, at, 0)));
            }
            let Some((key, used)) = read_varint(&bytes[at..])? else {
                return Ok(None);
            };
            let Some((value, value_used)) = read_varint(&bytes[at + used..])? else {
                return Ok(None);
            };
            at += used + value_used;
            if at > message_len {
                return Err(format!(
                    "a field runs past the end of its {message_len}-byte message"
                ));
            }
            let narrow = |field: &str| {
                u32::try_from(value).map_err(|_| format!("{field} {value} does not fit in 32 bits"))
            };
            match key {
                PAYLOAD_KEY => {
                    let rest = message_len - at;
                    if value != rest as u64 {
                        return Err(format!(
                            "payload of {value} bytes where the message leaves {rest} (the payload must be the last field)"
                        ));
                    }
                    return Ok(Some((head, at, rest)));
                }
                0x08 => head.generation = value,
                0x10 => head.sequence = value,
                0x18 => head.step = narrow("step")?,
                0x20 => head.chunk = narrow("chunk")?,
                // Enums are int32 on the wire; protobuf truncates.
                0x28 => head.kind = value as i32,
                0x30 => head.dtype = value as i32,
                0x38 => head.reduce = value as i32,
                0x40 => head.elements = value,
                0x48 => head.root = narrow("root")?,
                other => {
                    return Err(format!(
                        "unexpected field {} (wire type {}) in a ring frame",
                        other >> 3,
                        other & 7
                    ))
                }
            }
        }
    }
}

/// A varint at the start of `bytes`: its value and length, `None` if
/// `bytes` ends inside it.
fn read_varint(bytes: &[u8]) -> Result<Option<(u64, usize)>, String> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 10 {
        return Err("a varint longer than 10 bytes".into());
    }
    Ok(None)
}

enum State {
    /// Gathering the 5-byte gRPC prefix.
    Prefix {
        got: [u8; GRPC_PREFIX_BYTES],
        len: usize,
    },
    /// Gathering the head of a message of `message_len` bytes.
    Head { message_len: usize },
    /// Keeping `remaining` more payload bytes as they come.
    Body {
        head: FrameHead,
        payload: Payload,
        remaining: usize,
    },
}

/// Turns the DATA frames of a ring stream into [`InFrame`]s, keeping
/// payloads as slices of the DATA frames.
pub struct FrameDecoder {
    max_message_bytes: usize,
    state: State,
    head: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder refusing messages over `max_message_bytes`.
    pub fn new(max_message_bytes: usize) -> Self {
        Self {
            max_message_bytes,
            state: State::Prefix {
                got: [0; GRPC_PREFIX_BYTES],
                len: 0,
            },
            head: Vec::with_capacity(MAX_HEAD_BYTES),
        }
    }

    /// Consumes `data` until a frame is complete (returned) or `data` is
    /// empty (`Ok(None)`); call again with the rest.
    pub fn next(&mut self, data: &mut Bytes) -> Result<Option<InFrame>, WireError> {
        loop {
            match &mut self.state {
                State::Prefix { got, len } => {
                    if data.is_empty() {
                        return Ok(None);
                    }
                    let take = (GRPC_PREFIX_BYTES - *len).min(data.len());
                    got[*len..*len + take].copy_from_slice(&data[..take]);
                    data.advance(take);
                    *len += take;
                    if *len < GRPC_PREFIX_BYTES {
                        return Ok(None);
                    }
                    if got[0] != 0 {
                        return Err(WireError::Malformed(format!(
                            "compressed message (flag {}); ring streams are not compressed",
                            got[0]
                        )));
                    }
                    let message_len = u32::from_be_bytes([got[1], got[2], got[3], got[4]]) as usize;
                    if message_len > self.max_message_bytes {
                        return Err(WireError::TooLarge {
                            got: message_len,
                            limit: self.max_message_bytes,
                        });
                    }
                    self.head.clear();
                    self.state = State::Head { message_len };
                }
                State::Head { message_len } => {
                    let message_len = *message_len;
                    if self.head.is_empty() {
                        // The usual case: the whole head is in this DATA
                        // frame, and is read where it lies.
                        if let Some((head, head_len, payload_len)) =
                            FrameHead::decode(data, message_len)?
                        {
                            data.advance(head_len);
                            self.state = State::Body {
                                head,
                                payload: Payload::default(),
                                remaining: payload_len,
                            };
                            continue;
                        }
                    }
                    match FrameHead::decode(&self.head, message_len)? {
                        Some((head, head_len, payload_len)) => {
                            // Bytes gathered past the head are payload.
                            let mut payload = Payload::default();
                            payload.push(Bytes::copy_from_slice(&self.head[head_len..]));
                            let remaining = payload_len - payload.len();
                            self.state = State::Body {
                                head,
                                payload,
                                remaining,
                            };
                        }
                        None => {
                            if data.is_empty() {
                                return Ok(None);
                            }
                            if self.head.len() >= MAX_HEAD_BYTES.min(message_len) {
                                return Err(WireError::Malformed(format!(
                                    "a frame head over {MAX_HEAD_BYTES} bytes or past its message"
                                )));
                            }
                            // One byte at a time would do; take what can
                            // only be head (or the start of the payload).
                            let room = MAX_HEAD_BYTES.min(message_len) - self.head.len();
                            let take = room.min(data.len()).min(16);
                            self.head.extend_from_slice(&data[..take]);
                            data.advance(take);
                        }
                    }
                }
                State::Body {
                    payload, remaining, ..
                } => {
                    let take = (*remaining).min(data.len());
                    payload.push(data.split_to(take));
                    *remaining -= take;
                    if *remaining > 0 {
                        return Ok(None);
                    }
                    let State::Body { head, payload, .. } = std::mem::replace(
                        &mut self.state,
                        State::Prefix {
                            got: [0; GRPC_PREFIX_BYTES],
                            len: 0,
                        },
                    ) else {
                        unreachable!("in the body state")
                    };
                    return Ok(Some(InFrame { head, payload }));
                }
            }
        }
    }

    /// Checks the stream did not end inside a frame.
    pub fn finish(&self) -> Result<(), WireError> {
        match self.state {
            State::Prefix { len: 0, .. } => Ok(()),
            _ => Err(WireError::Malformed(
                "the stream ended inside a frame".into(),
            )),
        }
    }
}

/// Decodes one whole message (gRPC prefix included) from `bytes`, for
/// fuzzing and tests: the frame, or why it is not one.
pub fn decode_message(bytes: &[u8], max_message_bytes: usize) -> Result<InFrame, WireError> {
    let mut decoder = FrameDecoder::new(max_message_bytes);
    let mut data = Bytes::copy_from_slice(bytes);
    let frame = decoder
        .next(&mut data)?
        .ok_or_else(|| WireError::Malformed("the bytes end inside a frame".into()))?;
    if !data.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} bytes after the frame",
            data.len()
        )));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use ringleader_proto::collective::RingFrame;

    fn sample() -> FrameHead {
        FrameHead {
            generation: 7,
            sequence: 300,
            step: 2,
            chunk: 0,
            kind: 1,
            dtype: 1,
            reduce: 2,
            elements: 1 << 40,
            root: 0,
        }
    }

    fn encoded(head: &FrameHead, payload: &[u8]) -> Vec<u8> {
        let mut writer = HeadWriter::default();
        let frame = writer.frame(head, Bytes::copy_from_slice(payload).into());
        let mut bytes = frame.head.to_vec();
        for part in frame.payload.parts() {
            bytes.extend_from_slice(part);
        }
        bytes
    }

    #[test]
    fn what_we_write_is_what_prost_writes() {
        let payload: Vec<u8> = (0..=255).collect();
        let ours = encoded(&sample(), &payload);
        let head = sample();
        let theirs = RingFrame {
            generation: head.generation,
            sequence: head.sequence,
            step: head.step,
            chunk: head.chunk,
            kind: head.kind,
            dtype: head.dtype,
            reduce: head.reduce,
            elements: head.elements,
            root: head.root,
            payload: payload.clone().into(),
        }
        .encode_to_vec();
        assert_eq!(&ours[GRPC_PREFIX_BYTES..], &theirs[..]);
        assert_eq!(
            u32::from_be_bytes(ours[1..5].try_into().unwrap()) as usize,
            theirs.len()
        );
        // A negative enum (a hostile sender's) round-trips as protobuf says.
        let odd = FrameHead {
            kind: -3,
            ..sample()
        };
        let frame = decode_message(&encoded(&odd, b"x"), 1 << 20).unwrap();
        assert_eq!(frame.head, odd);
    }

    #[test]
    fn frames_split_anywhere_decode_to_the_same_frames() {
        let payloads: Vec<Vec<u8>> = vec![vec![], (0..1000).map(|i| i as u8).collect(), vec![9]];
        let mut stream = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            stream.extend(encoded(
                &FrameHead {
                    chunk: i as u32,
                    ..sample()
                },
                p,
            ));
        }
        for cut in [1, 2, 3, 5, 7, 64, 999, stream.len()] {
            let mut decoder = FrameDecoder::new(1 << 20);
            let mut got = Vec::new();
            for piece in stream.chunks(cut) {
                let mut data = Bytes::copy_from_slice(piece);
                while let Some(frame) = decoder.next(&mut data).unwrap() {
                    got.push(frame);
                }
                assert!(data.is_empty());
            }
            decoder.finish().unwrap();
            assert_eq!(got.len(), payloads.len(), "cut {cut}");
            for (i, frame) in got.iter().enumerate() {
                assert_eq!(frame.head.chunk, i as u32);
                assert_eq!(frame.payload.to_bytes().as_ref(), &payloads[i][..]);
            }
        }
    }

    #[test]
    fn hostile_streams_are_errors_naming_the_problem() {
        let too_big = {
            let mut b = vec![0u8];
            b.extend(((1u32 << 20) + 1).to_be_bytes());
            b
        };
        let err = decode_message(&too_big, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("over the limit"), "{err}");
        let err = decode_message(&[1, 0, 0, 0, 0], 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("compressed"), "{err}");
        // A payload that claims more than its message holds.
        let mut bytes = encoded(&sample(), b"abcd");
        let last = bytes.len() - 5;
        bytes[last] = 9;
        let err = decode_message(&bytes, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("last field"), "{err}");
        // An unknown field.
        let err = decode_message(&[0, 0, 0, 0, 2, 0x60, 1], 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unexpected field 12"), "{err}");
        // A stream cut inside a frame.
        let mut decoder = FrameDecoder::new(1 << 20);
        let whole = encoded(&sample(), b"abcd");
        let mut data = Bytes::copy_from_slice(&whole[..whole.len() - 1]);
        assert!(decoder.next(&mut data).unwrap().is_none());
        assert!(decoder.finish().is_err());
        // Endless varints and heads.
        let err = decode_message(
            &[
                0, 0, 0, 0, 20, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1,
            ],
            1 << 20,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("varint"), "{err}");
    }
}
