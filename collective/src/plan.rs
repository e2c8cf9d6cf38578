//! The ring schedule as pure arithmetic: who sends which segment at which
//! step, and how segments are cut into chunks.

use std::ops::Range;

/// Element range of segment `index` when `elements` are split over `world`
/// ranks: sizes differ by at most one, larger segments first.
pub fn segment(elements: usize, world: usize, index: usize) -> Range<usize> {
    let base = elements / world;
    let extra = elements % world;
    let start = index * base + index.min(extra);
    let len = base + usize::from(index < extra);
    start..start + len
}

/// Chunks of `range`, each at most `chunk_elements` long. Always at least one
/// (possibly empty) chunk, so every step carries a frame and ranks that
/// disagree on the length find out instead of waiting.
pub fn chunks(range: Range<usize>, chunk_elements: usize) -> Vec<Range<usize>> {
    let chunk = chunk_elements.max(1);
    if range.is_empty() {
        #[allow(clippy::single_range_in_vec_init)] // one empty chunk, on purpose
        return vec![range.start..range.start];
    }
    (range.start..range.end)
        .step_by(chunk)
        .map(|start| start..(start + chunk).min(range.end))
        .collect()
}

/// `(a - b) mod n` for ranks and segment indices.
pub fn ring_sub(a: usize, b: usize, n: usize) -> usize {
    (a + n - b % n) % n
}

/// Reduce-scatter step `step` at `rank`: (segment sent, segment received).
/// Segment `j`'s partial sum starts at rank `j` and travels forward, so
/// after `world - 1` steps rank `r` holds the full result of segment `r + 1`.
pub fn reduce_scatter_step(rank: usize, world: usize, step: usize) -> (usize, usize) {
    (ring_sub(rank, step, world), ring_sub(rank, step + 1, world))
}

/// All-gather step `step` at `rank`: (segment sent, segment received).
pub fn all_gather_step(rank: usize, world: usize, step: usize) -> (usize, usize) {
    (ring_sub(rank + 1, step, world), ring_sub(rank, step, world))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_everything_once() {
        for elements in [0, 1, 5, 7, 100, 10007] {
            for world in 1..=6 {
                let mut next = 0;
                for i in 0..world {
                    let s = segment(elements, world, i);
                    assert_eq!(s.start, next);
                    next = s.end;
                }
                assert_eq!(next, elements);
            }
        }
    }

    #[test]
    fn chunks_split_and_never_vanish() {
        assert_eq!(chunks(0..10, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(chunks(3..3, 4).len(), 1);
        assert!(chunks(3..3, 4)[0].is_empty());
    }

    #[test]
    fn schedule_passes_each_segment_around_the_ring() {
        // What rank r sends at step s is what rank r+1 receives at step s.
        for world in 1usize..=6 {
            for step in 0..world.saturating_sub(1) {
                for rank in 0..world {
                    let next = (rank + 1) % world;
                    assert_eq!(
                        reduce_scatter_step(rank, world, step).0,
                        reduce_scatter_step(next, world, step).1
                    );
                    assert_eq!(
                        all_gather_step(rank, world, step).0,
                        all_gather_step(next, world, step).1
                    );
                }
            }
            // After reduce-scatter rank r owns segment r+1, which it sends first in all-gather.
            for rank in 0..world {
                assert_eq!(all_gather_step(rank, world, 0).0, (rank + 1) % world);
            }
        }
    }
}
