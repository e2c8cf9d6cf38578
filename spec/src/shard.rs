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
//! its share. [`FileShards`] maps those global indices onto a dataset split
//! over several files, so a worker opens only [`FileShards::files_needed`].
//!
//! **File level** ([`ShardPlan::file_level`]), for datasets of many files
//! (at least one per rank): each epoch the file order is permuted and files
//! are dealt to ranks round-robin, so a rank reads only about files/world
//! files. Ranks then get the same number of examples: cut to the smallest
//! share (drop_last) or padded to the largest by wrapping around their own
//! list.

use std::ops::Range;

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
    #[error("file-level sharding needs at least one non-empty file per rank: {files} files for {world} ranks")]
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

    /// This rank's example indices for `epoch` when whole files are dealt
    /// to ranks (see the module docs). Empty files are not dealt.
    pub fn file_level(&self, files: &FileShards, epoch: u64) -> Result<Vec<u64>, ShardError> {
        let world = self.world.max(1) as usize;
        let mut order: Vec<usize> = (0..files.files())
            .filter(|&f| !files.range(f).is_empty())
            .collect();
        if order.len() < world {
            return Err(ShardError::TooFewFiles {
                files: order.len(),
                world: self.world,
            });
        }
        if self.shuffle {
            order.shuffle(&mut rng(self.seed, epoch, 0));
        }
        let share = |rank: usize| order.iter().skip(rank).step_by(world);
        let count = |rank: usize| share(rank).map(|&f| files.range(f).end - files.range(f).start);
        let counts = (0..world).map(|r| count(r).sum::<u64>());
        let target = if self.drop_last {
            counts.min()
        } else {
            counts.max()
        }
        .unwrap_or(0);
        let mut mine: Vec<u64> = share(self.rank as usize)
            .flat_map(|&f| files.range(f))
            .collect();
        if self.shuffle {
            // Every rank shuffles only its own share; the stream is per rank.
            mine.shuffle(&mut rng(self.seed, epoch, 1 + u64::from(self.rank)));
        }
        let own = mine.len() as u64;
        Ok((0..target).map(|i| mine[(i % own) as usize]).collect())
    }
}

/// A generator keyed on (seed, epoch, stream): the same triple always
/// gives the same order, on every rank and after a restart.
fn rng(seed: u64, epoch: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (chunk, word) in key.chunks_exact_mut(8).zip([seed, epoch, stream]) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// A dataset stored as consecutive files: global index `i` lives in the
/// file whose range holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileShards {
    /// `starts[f]` is the global index of file f's first example; the last
    /// entry is the total.
    starts: Vec<u64>,
}

impl FileShards {
    pub fn new(file_lengths: Vec<u64>) -> Self {
        let mut starts = Vec::with_capacity(file_lengths.len() + 1);
        let mut total = 0;
        starts.push(0);
        for len in file_lengths {
            total += len;
            starts.push(total);
        }
        Self { starts }
    }

    pub fn files(&self) -> usize {
        self.starts.len() - 1
    }

    /// Examples in all files.
    pub fn examples(&self) -> u64 {
        self.starts[self.files()]
    }

    /// Global indices of file `file`'s examples.
    pub fn range(&self, file: usize) -> Range<u64> {
        self.starts[file]..self.starts[file + 1]
    }

    /// (file, index within that file) of global index `index`, or `None`
    /// past the end.
    pub fn locate(&self, index: u64) -> Option<(usize, u64)> {
        if index >= self.examples() {
            return None;
        }
        // The last start at or below `index`; empty files share a start, and
        // partition_point skips past them.
        let file = self.starts.partition_point(|&s| s <= index) - 1;
        Some((file, index - self.starts[file]))
    }

    /// The files holding `indices`, ascending: the only ones a worker opens.
    pub fn files_needed(&self, indices: &[u64]) -> Vec<usize> {
        let mut needed: Vec<usize> = indices
            .iter()
            .filter_map(|&i| self.locate(i).map(|(file, _)| file))
            .collect();
        needed.sort_unstable();
        needed.dedup();
        needed
    }
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
    fn file_shards_map_global_indices_to_files() {
        let files = FileShards::new(vec![3, 0, 4, 2]);
        assert_eq!(files.examples(), 9);
        assert_eq!(files.locate(0), Some((0, 0)));
        assert_eq!(
            files.locate(3),
            Some((2, 0)),
            "the empty file holds nothing"
        );
        assert_eq!(files.locate(8), Some((3, 1)));
        assert_eq!(files.locate(9), None);
        assert_eq!(files.files_needed(&[8, 1, 4, 7]), [0, 2, 3]);
    }

    #[test]
    fn file_level_deals_whole_files_in_equal_counts() {
        let lengths = vec![10, 12, 9, 11, 10, 8, 0];
        let files = FileShards::new(lengths);
        for drop_last in [true, false] {
            let ranks: Vec<Vec<u64>> = (0..3)
                .map(|r| plan(60, 3, r, drop_last).file_level(&files, 1).unwrap())
                .collect();
            let len = ranks[0].len();
            assert!(ranks.iter().all(|r| r.len() == len), "equal counts");
            for rank in &ranks {
                // Two files each: 6 non-empty files, 3 ranks.
                assert_eq!(files.files_needed(rank).len(), 2);
            }
            let needed: Vec<usize> = ranks.iter().flat_map(|r| files.files_needed(r)).collect();
            let distinct: BTreeSet<usize> = needed.iter().copied().collect();
            assert_eq!(distinct.len(), needed.len(), "no file is read by two ranks");
            if drop_last {
                let seen: BTreeSet<u64> = ranks.iter().flatten().copied().collect();
                assert_eq!(seen.len(), 3 * len, "disjoint");
            }
        }
        let again = plan(60, 3, 1, true).file_level(&files, 1).unwrap();
        assert_eq!(again, plan(60, 3, 1, true).file_level(&files, 1).unwrap());
        assert_ne!(again, plan(60, 3, 1, true).file_level(&files, 2).unwrap());
        assert_eq!(
            plan(60, 7, 0, true).file_level(&files, 0),
            Err(ShardError::TooFewFiles { files: 6, world: 7 })
        );
    }
}
