//! The dataset shard plan: which examples each rank trains on in an epoch.
//!
//! **Example level** ([`ShardPlan::indices`]) has PyTorch's
//! DistributedSampler semantics, so a run is reproducible and a resumed run
//! sees the same order:
//!
//! ```text
//!  permutation of 0..n from (seed, epoch)     [7 2 9 0 4 1 8 3 6 5]   n = 10
//!  drop_last: cut to ⌊n/world⌋·world          [7 2 9 0 4 1 8 3 6]     world = 3
//!  else: pad to ⌈n/world⌉·world by wrapping   [7 2 9 0 4 1 8 3 6 5 7 2]
//!  rank r takes positions r, r+world, …       rank 1: [2 4 3 5]
//! ```
//!
//! Every rank computes the whole permutation (8 bytes an example) and keeps
//! its share; every rank reads every file of the split.
//!
//! **File level** ([`FileDeal`] and [`ShardPlan::own_indices`]), for a split
//! of many files (at least one per rank): the files are dealt to ranks once
//! for the whole job, from the seed, so a rank opens only its own files
//! (about files/world of them) and keeps them for every epoch. Each epoch a
//! rank trains on a permutation of its own examples, from (seed, epoch,
//! rank), cut to the smallest rank's count (drop_last) or padded to the
//! largest by wrapping around: every rank takes the same number of steps.
//! Together the ranks' batches still form one global batch per step drawn
//! from the whole dataset.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// One rank's view of the sampling of a dataset of `examples` examples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    pub examples: u64,
    pub world: u32,
    pub rank: u32,
    pub seed: u64,
    pub shuffle: bool,
    pub drop_last: bool,
}

/// Why a file-level plan cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardError {
    #[error(
        "file-level sharding needs at least one file per rank: {files} files for {world} ranks"
    )]
    TooFewFiles { files: usize, world: u32 },
}

impl ShardPlan {
    /// Examples each of `world` ranks gets per epoch.
    pub fn per_rank(examples: u64, world: u32, drop_last: bool) -> u64 {
        let world = u64::from(world.max(1));
        if drop_last {
            examples / world
        } else {
            examples.div_ceil(world)
        }
    }

    /// This rank's example indices for `epoch`, in training order.
    pub fn indices(&self, epoch: u64) -> Vec<u64> {
        let mut order: Vec<u64> = (0..self.examples).collect();
        if self.shuffle {
            order.shuffle(&mut rng(self.seed, epoch, 0));
        }
        let world = u64::from(self.world.max(1));
        let total = Self::per_rank(self.examples, self.world, self.drop_last) * world;
        (u64::from(self.rank)..total)
            .step_by(world as usize)
            .map(|position| order[(position % self.examples) as usize])
            .collect()
    }

    /// File level: the order in `epoch` of this rank's own examples
    /// (`examples` counts only those), cut or padded by wrapping around to
    /// `equal`, the count every rank trains on: the smallest rank's own
    /// count with drop_last, else the largest.
    pub fn own_indices(&self, epoch: u64, equal: u64) -> Vec<u64> {
        let mut own: Vec<u64> = (0..self.examples).collect();
        if self.shuffle {
            // A stream per rank: ranks shuffle different example sets.
            own.shuffle(&mut rng(self.seed, epoch, 1 + u64::from(self.rank)));
        }
        if own.is_empty() {
            return own;
        }
        (0..equal)
            .map(|i| own[(i % self.examples) as usize])
            .collect()
    }
}

/// File level: which of a split's files each rank reads, for the whole job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDeal {
    /// `order[i]` goes to rank `i % world`.
    order: Vec<usize>,
    world: usize,
}

impl FileDeal {
    /// Deals `files` files to `world` ranks round-robin, after a seeded
    /// shuffle of the file order (unless `shuffle` is off).
    pub fn new(files: usize, world: u32, seed: u64, shuffle: bool) -> Result<Self, ShardError> {
        let world = world.max(1);
        if files < world as usize {
            return Err(ShardError::TooFewFiles { files, world });
        }
        let mut order: Vec<usize> = (0..files).collect();
        if shuffle {
            // Not keyed on an epoch: the deal holds for every epoch.
            order.shuffle(&mut rng(seed, u64::MAX, 0));
        }
        Ok(Self {
            order,
            world: world as usize,
        })
    }

    /// The files `rank` reads, ascending.
    pub fn files_of(&self, rank: u32) -> Vec<usize> {
        let mut mine: Vec<usize> = self
            .order
            .iter()
            .skip(rank as usize)
            .step_by(self.world)
            .copied()
            .collect();
        mine.sort_unstable();
        mine
    }
}

/// A generator keyed on (seed, epoch, stream): the same triple always
/// gives the same order, on every rank and after a restart.
pub(crate) fn rng(seed: u64, epoch: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (chunk, word) in key.chunks_exact_mut(8).zip([seed, epoch, stream]) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn plan(examples: u64, world: u32, rank: u32, drop_last: bool) -> ShardPlan {
        ShardPlan {
            examples,
            world,
            rank,
            seed: 42,
            shuffle: true,
            drop_last,
        }
    }

    fn all_ranks(examples: u64, world: u32, drop_last: bool, epoch: u64) -> Vec<Vec<u64>> {
        (0..world)
            .map(|r| plan(examples, world, r, drop_last).indices(epoch))
            .collect()
    }

    #[test]
    fn ranks_are_disjoint_equal_and_cover_the_truncated_permutation() {
        let ranks = all_ranks(103, 4, true, 0);
        assert!(ranks.iter().all(|r| r.len() == 25));
        assert_eq!(ShardPlan::per_rank(103, 4, true), 25);
        let seen: BTreeSet<u64> = ranks.iter().flatten().copied().collect();
        assert_eq!(seen.len(), 100, "disjoint");
        assert!(seen.iter().all(|&i| i < 103));
        // Interleaving the ranks gives back the permutation's first 100.
        let whole = plan(103, 1, 0, true).indices(0);
        let interleaved: Vec<u64> = (0..25)
            .flat_map(|i| ranks.iter().map(move |r| r[i]))
            .collect();
        assert_eq!(interleaved, whole[..100]);
    }

    #[test]
    fn padding_wraps_around_to_the_start_of_the_permutation() {
        let ranks = all_ranks(10, 4, false, 3);
        assert!(ranks.iter().all(|r| r.len() == 3));
        assert_eq!(ShardPlan::per_rank(10, 4, false), 3);
        let whole = plan(10, 1, 0, false).indices(3);
        // Positions 10 and 11 repeat positions 0 and 1, on ranks 2 and 3.
        assert_eq!(ranks[2][2], whole[0]);
        assert_eq!(ranks[3][2], whole[1]);
        let seen: BTreeSet<u64> = ranks.iter().flatten().copied().collect();
        assert_eq!(seen.len(), 10, "every example is used");
    }

    #[test]
    fn order_replays_from_seed_and_epoch() {
        let whole = |seed, epoch| {
            ShardPlan {
                seed,
                ..plan(1000, 1, 0, true)
            }
            .indices(epoch)
        };
        assert_eq!(whole(42, 5), whole(42, 5));
        assert_ne!(whole(42, 5), whole(42, 6));
        assert_ne!(whole(42, 5), whole(43, 5));
        let mut sorted = whole(42, 5);
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..1000).collect::<Vec<_>>(),
            "world 1 is a permutation"
        );
        let unshuffled = ShardPlan {
            shuffle: false,
            ..plan(5, 1, 0, true)
        };
        assert_eq!(unshuffled.indices(9), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn files_are_dealt_once_disjointly_and_evenly() {
        let deal = FileDeal::new(7, 3, 42, true).unwrap();
        let ranks: Vec<Vec<usize>> = (0..3).map(|r| deal.files_of(r)).collect();
        let sizes: Vec<usize> = ranks.iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 7);
        assert!(sizes.iter().all(|&n| n == 2 || n == 3), "{sizes:?}");
        let all: BTreeSet<usize> = ranks.iter().flatten().copied().collect();
        assert_eq!(all, (0..7).collect(), "every file, each read by one rank");
        assert_eq!(deal, FileDeal::new(7, 3, 42, true).unwrap(), "seeded");
        assert_ne!(deal, FileDeal::new(7, 3, 43, true).unwrap());
        let plain = FileDeal::new(4, 2, 42, false).unwrap();
        assert_eq!(
            (plain.files_of(0), plain.files_of(1)),
            (vec![0, 2], vec![1, 3])
        );
        assert_eq!(
            FileDeal::new(2, 3, 0, true),
            Err(ShardError::TooFewFiles { files: 2, world: 3 })
        );
    }

    #[test]
    fn own_indices_permute_a_ranks_examples_to_the_agreed_count() {
        let rank = |r, examples| ShardPlan {
            examples,
            ..plan(0, 2, r, true)
        };
        let cut = rank(0, 10).own_indices(1, 8);
        assert_eq!(cut.len(), 8);
        assert_eq!(cut.iter().collect::<BTreeSet<_>>().len(), 8, "no repeats");
        assert!(cut.iter().all(|&i| i < 10));
        let padded = rank(1, 6).own_indices(1, 10);
        assert_eq!(padded[6..], padded[..4], "wraps around its own order");
        assert_eq!(padded[..6].iter().collect::<BTreeSet<_>>().len(), 6);
        assert_eq!(cut, rank(0, 10).own_indices(1, 8), "replays");
        assert_ne!(cut, rank(0, 10).own_indices(2, 8), "a new order per epoch");
        assert_ne!(
            rank(0, 10).own_indices(1, 10),
            rank(1, 10).own_indices(1, 10)
        );
        assert!(rank(0, 0).own_indices(1, 4).is_empty());
    }
}
