//! Element types a ring can reduce, and how each reduces.

use bytemuck::Pod;
use half::{bf16, f16};
use ringleader_proto::collective::{DType, ReduceOp};

/// A reducible element. `combine(acc, local)` is applied in ring order, so
/// the same inputs always give the same bits.
pub trait Element: Pod + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    const DTYPE: DType;
    fn combine(acc: Self, local: Self, op: ReduceOp) -> Self;
    /// `self / world`, for `Avg` (applied once, by the segment's owner).
    fn divide(self, world: usize) -> Self;
}

macro_rules! float_element {
    ($t:ty, $dtype:expr, $acc:ty, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            #[inline]
            fn combine(acc: Self, local: Self, op: ReduceOp) -> Self {
                let (a, b) = ($to(acc), $to(local));
                $from(match op {
                    ReduceOp::Max => a.max(b),
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Sum | ReduceOp::Avg | ReduceOp::Unspecified => a + b,
                })
            }
            #[inline]
            fn divide(self, world: usize) -> Self {
                $from($to(self) / world as $acc)
            }
        }
    };
}

float_element!(f32, DType::F32, f32, |x: f32| x, |x: f32| x);
float_element!(f64, DType::F64, f64, |x: f64| x, |x: f64| x);
// Half types accumulate through f32 and round once per hop.
float_element!(f16, DType::F16, f32, f16::to_f32, f16::from_f32);
float_element!(bf16, DType::Bf16, f32, bf16::to_f32, bf16::from_f32);

/// `acc ⊕= local` element-wise, with `received` read from a possibly
/// unaligned network buffer; the result lands in `local`.
pub fn reduce_into<T: Element>(local: &mut [T], received: &[u8], op: ReduceOp) {
    debug_assert_eq!(received.len(), std::mem::size_of_val(local));
    // The op is fixed per call: match once so each loop is a tight,
    // vectorisable kernel.
    match op {
        ReduceOp::Max => combine_all(local, received, |a, b| T::combine(a, b, ReduceOp::Max)),
        ReduceOp::Min => combine_all(local, received, |a, b| T::combine(a, b, ReduceOp::Min)),
        ReduceOp::Sum | ReduceOp::Avg | ReduceOp::Unspecified => {
            combine_all(local, received, |a, b| T::combine(a, b, ReduceOp::Sum))
        }
    }
}

#[inline(always)]
fn combine_all<T: Element>(local: &mut [T], received: &[u8], f: impl Fn(T, T) -> T) {
    match bytemuck::try_cast_slice::<u8, T>(received) {
        Ok(aligned) => {
            for (dst, acc) in local.iter_mut().zip(aligned) {
                *dst = f(*acc, *dst);
            }
        }
        Err(_) => {
            let size = std::mem::size_of::<T>();
            for (dst, src) in local.iter_mut().zip(received.chunks_exact(size)) {
                *dst = f(bytemuck::pod_read_unaligned(src), *dst);
            }
        }
    }
}

/// Overwrites `local` with `received` (all-gather, broadcast).
pub fn copy_into<T: Element>(local: &mut [T], received: &[u8]) {
    bytemuck::cast_slice_mut::<T, u8>(local).copy_from_slice(received);
}

/// [`reduce_into`] from a payload in parts (the DATA frames it arrived
/// in), which may cut an element in two: that one element is put together
/// in a small local buffer, everything else is read where it lies.
pub fn reduce_parts<T: Element>(local: &mut [T], parts: &[bytes::Bytes], op: ReduceOp) {
    let size = std::mem::size_of::<T>();
    let mut at = 0; // elements of `local` done
    let mut straddling = [0u8; 16];
    let mut pending = 0; // bytes of a cut element gathered so far
    for part in parts {
        let mut bytes = &part[..];
        if pending > 0 {
            let take = (size - pending).min(bytes.len());
            straddling[pending..pending + take].copy_from_slice(&bytes[..take]);
            pending += take;
            bytes = &bytes[take..];
            if pending < size {
                continue;
            }
            reduce_into(&mut local[at..at + 1], &straddling[..size], op);
            at += 1;
        }
        let whole = bytes.len() / size;
        reduce_into(&mut local[at..at + whole], &bytes[..whole * size], op);
        at += whole;
        let rest = &bytes[whole * size..];
        straddling[..rest.len()].copy_from_slice(rest);
        pending = rest.len();
    }
    debug_assert_eq!((at, pending), (local.len(), 0));
}

/// [`copy_into`] from a payload in parts.
pub fn copy_parts<T: Element>(local: &mut [T], parts: &[bytes::Bytes]) {
    let mut out = bytemuck::cast_slice_mut::<T, u8>(local);
    for part in parts {
        let (head, tail) = out.split_at_mut(part.len());
        head.copy_from_slice(part);
        out = tail;
    }
    debug_assert!(out.is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_reduce_as_expected() {
        let mut local = [1.0f32, 5.0, -2.0];
        let received: Vec<u8> = bytemuck::cast_slice(&[3.0f32, 4.0, -7.0]).to_vec();
        reduce_into(&mut local, &received, ReduceOp::Max);
        assert_eq!(local, [3.0, 5.0, -2.0]);
        reduce_into(&mut local, &received, ReduceOp::Sum);
        assert_eq!(local, [6.0, 9.0, -9.0]);
        reduce_into(&mut local, &received, ReduceOp::Min);
        assert_eq!(local, [3.0, 4.0, -9.0]);
        assert_eq!(6.0f64.divide(4), 1.5);
        assert_eq!(bf16::from_f32(3.0).divide(2), bf16::from_f32(1.5));
    }

    #[test]
    fn unaligned_input_is_read_correctly() {
        let mut raw = [0u8; 1 + 8];
        raw[1..].copy_from_slice(bytemuck::cast_slice(&[1.5f32, 2.5]));
        let mut local = [f16::from_f32(1.0), f16::from_f32(1.0)];
        let received: Vec<u8> =
            bytemuck::cast_slice(&[f16::from_f32(0.5), f16::from_f32(2.0)]).to_vec();
        reduce_into(&mut local, &received, ReduceOp::Sum);
        assert_eq!(local, [f16::from_f32(1.5), f16::from_f32(3.0)]);
        let mut f = [0.0f32; 2];
        reduce_into(&mut f, &raw[1..], ReduceOp::Sum);
        assert_eq!(f, [1.5, 2.5]);
    }

    #[test]
    fn payloads_cut_anywhere_reduce_and_copy_like_whole_ones() {
        let local: Vec<f64> = (0..37).map(|i| i as f64 * 0.5).collect();
        let incoming: Vec<f64> = (0..37).map(|i| 100.0 - i as f64).collect();
        let bytes = bytes::Bytes::copy_from_slice(bytemuck::cast_slice(&incoming));
        let mut whole = local.clone();
        reduce_into(&mut whole, &bytes, ReduceOp::Sum);
        for cuts in [vec![1], vec![3, 5, 100], vec![7, 8, 9, 10, 200], vec![295]] {
            let mut parts = Vec::new();
            let mut start = 0;
            for cut in cuts.iter().copied().chain([bytes.len()]) {
                let end = cut.min(bytes.len()).max(start);
                parts.push(bytes.slice(start..end));
                start = end;
            }
            let mut reduced = local.clone();
            reduce_parts(&mut reduced, &parts, ReduceOp::Sum);
            assert_eq!(reduced, whole, "cuts {cuts:?}");
            let mut copied = local.clone();
            copy_parts(&mut copied, &parts);
            assert_eq!(copied, incoming, "cuts {cuts:?}");
        }
    }
}
