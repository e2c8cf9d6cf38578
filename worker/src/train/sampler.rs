//! Which training examples a rank sees in an epoch.
//!
//! TODO(shard plan): replace with `ringleader_spec::shard` once it lands;
//! this is a private stand-in with the same (DistributedSampler) semantics.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The example indices of `rank` for `epoch`, in order: a permutation of
/// `0..n` from ChaCha8 seeded by `seed` on stream `epoch` (identity when not
/// shuffling), cut to `⌊n/world⌋·world` (`drop_last`) or padded by wrapping
/// to `⌈n/world⌉·world`; rank `r` takes positions r, r+world, …
pub(crate) fn rank_indices(
    n: usize,
    world: usize,
    rank: usize,
    seed: u64,
    epoch: u64,
    shuffle: bool,
    drop_last: bool,
) -> Vec<i64> {
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<i64> = (0..n as i64).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        order.shuffle(&mut rng);
    }
    let total = rank_len(n, world, drop_last) * world;
    (rank..total).step_by(world).map(|p| order[p % n]).collect()
}

/// How many examples each rank gets per epoch.
pub(crate) fn rank_len(n: usize, world: usize, drop_last: bool) -> usize {
    if drop_last {
        n / world
    } else {
        n.div_ceil(world)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_partition_the_epoch_and_pad_by_wrapping() {
        let all: Vec<Vec<i64>> = (0..3)
            .map(|r| rank_indices(10, 3, r, 7, 1, true, false))
            .collect();
        assert!(all.iter().all(|r| r.len() == 4));
        let mut seen: Vec<i64> = all.concat();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(rank_indices(10, 3, 2, 0, 0, false, true), [2, 5, 8]);
        assert_eq!(rank_indices(10, 3, 1, 0, 0, false, false), [1, 4, 7, 0]);
        assert_ne!(
            rank_indices(100, 1, 0, 7, 1, true, true),
            rank_indices(100, 1, 0, 7, 2, true, true)
        );
    }
}
