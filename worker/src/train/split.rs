//! Holding out validation examples from the training split, stratified by
//! label and seeded, so every rank that holds the same examples holds out
//! the same ones (no communication needed).
//!
//! ```text
//!  labels   [0 1 0 2 1 0 2 1 0 1]      classes 0: 4, 1: 4, 2: 2
//!  shuffle each class (seed, stream):  0: [8 0 5 2]  1: [4 9 1 7]  2: [6 3]
//!  fraction 0.3 → round(10·0.3) = 3 held out, shared by largest remainder:
//!      quotas 1.2, 1.2, 0.6 → 1, 1, 1  → validation [8 4 6]
//!  folds k = 3 → deal the classes one after another round-robin:
//!      8→0 0→1 5→2 2→0 | 4→1 9→2 1→0 7→1 | 6→2 3→0
//!      fold 0 = [8 2 1 3], fold 1 = [0 4 7], fold 2 = [5 9 6]
//! ```
//!
//! Each class's share of the validation set is its share of the training
//! split (up to rounding), and the folds' sizes differ by at most one.
//! Both index lists come back ascending, so the training order the shard
//! plan permutes does not depend on the shuffle here.
//!
//! Under file sharding a rank holds only its own files; it holds out the
//! fraction (or fold) of *its own* examples, seeded by the job seed and the
//! files it holds ([`stream_of_files`]). The validation set is then the
//! union of the ranks' parts, each stratified, and every rank evaluates its
//! own part.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use ringleader_spec::job::FoldSpec;

/// How much of the training split becomes validation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Holdout {
    /// This fraction, in (0, 1).
    Fraction(f64),
    /// Fold `index` of `count`.
    Fold(FoldSpec),
}

/// Positions in the training split, each list ascending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub train: Vec<i64>,
    pub validation: Vec<i64>,
}

/// Why the examples cannot be divided as asked; names the job field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SplitError {
    #[error(
        "dataset.validation_fraction: {fraction} of {examples} training examples holds out \
         {held_out}; both the training and the validation part need at least one example"
    )]
    EmptyPart {
        fraction: String,
        examples: usize,
        held_out: usize,
    },
    #[error(
        "dataset.folds.count: {count} folds of {examples} training examples{place}: a fold \
         would be empty"
    )]
    TooManyFolds {
        count: u32,
        examples: usize,
        /// Where the examples are counted (empty: the whole split).
        place: String,
    },
    #[error("training label {label} at position {position} is outside 0..{classes}")]
    BadLabel {
        label: i64,
        position: usize,
        classes: u32,
    },
}

/// Divides examples labelled `labels` (each in `0..classes`) into training
/// and validation positions. `stream` tells apart ranks that hold
/// different examples (0 when every rank holds them all); `place` says
/// where they are counted, for errors.
pub fn partition(
    labels: &[i64],
    classes: u32,
    holdout: Holdout,
    seed: u64,
    stream: u64,
    place: &str,
) -> Result<Partition, SplitError> {
    let by_class = shuffled_classes(labels, classes, seed, stream)?;
    let n = labels.len();
    let mut validation: Vec<i64> = match holdout {
        Holdout::Fraction(fraction) => {
            let target = (n as f64 * fraction).round() as usize;
            if target == 0 || target >= n {
                return Err(SplitError::EmptyPart {
                    fraction: fraction.to_string(),
                    examples: n,
                    held_out: target.min(n),
                });
            }
            let sizes: Vec<usize> = by_class.iter().map(Vec::len).collect();
            quotas(&sizes, target)
                .into_iter()
                .zip(&by_class)
                .flat_map(|(take, members)| members[..take].iter().copied())
                .collect()
        }
        Holdout::Fold(FoldSpec { count, index }) => {
            if count as usize > n {
                return Err(SplitError::TooManyFolds {
                    count,
                    examples: n,
                    place: place.to_string(),
                });
            }
            by_class
                .iter()
                .flatten()
                .enumerate()
                .filter(|(dealt, _)| dealt % count as usize == index as usize)
                .map(|(_, &position)| position)
                .collect()
        }
    };
    validation.sort_unstable();
    let mut held = vec![false; n];
    for &position in &validation {
        held[position as usize] = true;
    }
    let train = (0..n as i64).filter(|&p| !held[p as usize]).collect();
    Ok(Partition { train, validation })
}

/// Positions of each class, each list shuffled by one generator keyed on
/// (seed, stream).
fn shuffled_classes(
    labels: &[i64],
    classes: u32,
    seed: u64,
    stream: u64,
) -> Result<Vec<Vec<i64>>, SplitError> {
    let mut by_class = vec![Vec::new(); classes as usize];
    for (position, &label) in labels.iter().enumerate() {
        let members = usize::try_from(label)
            .ok()
            .and_then(|class| by_class.get_mut(class))
            .ok_or(SplitError::BadLabel {
                label,
                position,
                classes,
            })?;
        members.push(position as i64);
    }
    let mut key = [0u8; 32];
    // The third word keeps these streams apart from the shard plan's.
    for (chunk, word) in
        key.chunks_exact_mut(8)
            .zip([seed, stream, u64::from_le_bytes(*b"validate")])
    {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    let mut rng = ChaCha8Rng::from_seed(key);
    for members in &mut by_class {
        members.shuffle(&mut rng);
    }
    Ok(by_class)
}

/// `target` split among classes of `sizes` in proportion to them: each
/// gets the floor of its exact quota, and the examples left over go to the
/// largest remainders (the lower class first on a tie). Never more than a
/// class holds, and the quotas add up to `target`.
fn quotas(sizes: &[usize], target: usize) -> Vec<usize> {
    let total: usize = sizes.iter().sum();
    // Exact in integers: quota_c = sizes[c]·target / total.
    let exact: Vec<(usize, usize)> = sizes
        .iter()
        .map(|&size| ((size * target) / total, (size * target) % total))
        .collect();
    let mut taken: Vec<usize> = exact.iter().map(|&(whole, _)| whole).collect();
    let left = target - taken.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&c| std::cmp::Reverse(exact[c].1));
    for &class in order.iter().take(left) {
        taken[class] += 1;
    }
    taken
}

/// The stream a rank that holds only `files` (indices into the split's
/// `files`, ascending) splits its examples with: the same files give the
/// same held-out examples, whichever rank holds them. (SplitMix64 over
/// the indices; 0 is reserved for "every rank holds everything".)
pub fn stream_of_files(files: &[usize]) -> u64 {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let hash = files.iter().fold(0x9e37_79b9_7f4a_7c15_u64, |h, &f| {
        mix(h ^ f as u64).wrapping_add(0x9e37_79b9_7f4a_7c15)
    });
    hash.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `per_class[c]` examples of class c, interleaved.
    fn labels(per_class: &[usize]) -> Vec<i64> {
        let mut left = per_class.to_vec();
        let mut labels = Vec::new();
        while left.iter().any(|&n| n > 0) {
            for (class, n) in left.iter_mut().enumerate() {
                if *n > 0 {
                    labels.push(class as i64);
                    *n -= 1;
                }
            }
        }
        labels
    }

    fn count_of(labels: &[i64], positions: &[i64], class: i64) -> usize {
        positions
            .iter()
            .filter(|&&p| labels[p as usize] == class)
            .count()
    }

    #[test]
    fn a_fraction_is_stratified_disjoint_and_replays_from_the_seed() {
        let labels = labels(&[500, 300, 200]);
        let split = partition(&labels, 3, Holdout::Fraction(0.1), 7, 0, "").unwrap();
        assert_eq!(split.validation.len(), 100);
        assert_eq!(split.train.len(), 900);
        for (class, expected) in [(0, 50), (1, 30), (2, 20)] {
            assert_eq!(count_of(&labels, &split.validation, class), expected);
        }
        let mut all: Vec<i64> = split
            .train
            .iter()
            .chain(&split.validation)
            .copied()
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>(), "a partition");
        assert!(split.validation.windows(2).all(|w| w[0] < w[1]));
        assert!(split.train.windows(2).all(|w| w[0] < w[1]));
        let again = partition(&labels, 3, Holdout::Fraction(0.1), 7, 0, "").unwrap();
        assert_eq!(again, split, "same seed, same split (on every rank)");
        let other = partition(&labels, 3, Holdout::Fraction(0.1), 8, 0, "").unwrap();
        assert_ne!(other.validation, split.validation, "another seed");
        let stream = partition(&labels, 3, Holdout::Fraction(0.1), 7, 5, "").unwrap();
        assert_ne!(stream.validation, split.validation, "another stream");
    }

    #[test]
    fn quotas_follow_the_largest_remainders_and_add_up() {
        // 10 of 4 + 4 + 2 at 0.3: exact 1.2, 1.2, 0.6.
        assert_eq!(quotas(&[4, 4, 2], 3), [1, 1, 1]);
        // Exact 0.5, 0.5, 1: the tie goes to the lower class.
        assert_eq!(quotas(&[1, 1, 2], 2), [1, 0, 1]);
        assert_eq!(quotas(&[3, 0, 7], 5), [2, 0, 3]);
        for (sizes, target) in [(vec![1, 1, 1, 1, 1, 1, 1], 3), (vec![9, 1], 9)] {
            let q = quotas(&sizes, target);
            assert_eq!(q.iter().sum::<usize>(), target);
            assert!(q.iter().zip(&sizes).all(|(q, s)| q <= s));
        }
    }

    #[test]
    fn folds_partition_the_examples_stratified_and_evenly() {
        let labels = labels(&[7, 5, 3]);
        let count = 4;
        let folds: Vec<Partition> = (0..count)
            .map(|index| {
                partition(
                    &labels,
                    3,
                    Holdout::Fold(FoldSpec { count, index }),
                    3,
                    0,
                    "",
                )
                .unwrap()
            })
            .collect();
        let mut seen: Vec<i64> = folds.iter().flat_map(|f| f.validation.clone()).collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..15).collect::<Vec<_>>(),
            "each example in one fold"
        );
        let sizes: Vec<usize> = folds.iter().map(|f| f.validation.len()).collect();
        assert_eq!(sizes, [4, 4, 4, 3]);
        for fold in &folds {
            assert_eq!(fold.train.len() + fold.validation.len(), 15);
            // 7 of class 0 over 4 folds: 1 or 2 in each.
            assert!((1..=2).contains(&count_of(&labels, &fold.validation, 0)));
        }
    }

    #[test]
    fn impossible_holdouts_name_the_field() {
        let labels = labels(&[2, 1]);
        let err = partition(&labels, 2, Holdout::Fraction(0.1), 0, 0, "").unwrap_err();
        assert_eq!(
            err.to_string(),
            "dataset.validation_fraction: 0.1 of 3 training examples holds out 0; both the \
             training and the validation part need at least one example"
        );
        let err = partition(&labels, 2, Holdout::Fraction(0.9), 0, 0, "").unwrap_err();
        assert!(err.to_string().contains("holds out 3;"), "{err}");
        let folds = Holdout::Fold(FoldSpec { count: 4, index: 0 });
        let err = partition(&labels, 2, folds, 0, 0, " on rank 1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "dataset.folds.count: 4 folds of 3 training examples on rank 1: a fold would be empty"
        );
        let err = partition(&[0, 5], 2, Holdout::Fraction(0.5), 0, 0, "").unwrap_err();
        assert!(matches!(
            err,
            SplitError::BadLabel {
                label: 5,
                position: 1,
                ..
            }
        ));
    }

    #[test]
    fn file_streams_depend_on_the_files_only() {
        assert_eq!(stream_of_files(&[0, 3]), stream_of_files(&[0, 3]));
        assert_ne!(stream_of_files(&[0, 3]), stream_of_files(&[1, 2]));
        assert_ne!(stream_of_files(&[]), 0);
    }
}
