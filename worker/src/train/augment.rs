//! Image augmentation of training batches (`dataset.augment`), on the
//! device the batch is on:
//!
//! ```text
//!  crop: zero-pad every side by p ─▶ take an H×W window at a random
//!        (dy, dx) in [0, 2p]² per image (dy = dx = p: the image as it was)
//!  flip: mirror left to right, each image with probability ½
//! ```
//!
//! The draws come from a generator keyed on the epoch's seed for this rank
//! ([`super::epoch_seed`]) and consumed batch by batch in training order,
//! so a resumed epoch replays them exactly and no two epochs agree.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringleader_spec::prepare::Augment;
use tch::{Kind, Tensor};

use super::error::TrainError;

/// One epoch's augmentation on one rank.
pub struct Augmenter {
    augment: Augment,
    rng: ChaCha8Rng,
}

/// Checks that examples of shape `example` (without `N`) are images:
/// `C×H×W` or `H×W`.
pub fn check_images(example: &[i64]) -> Result<(), TrainError> {
    if matches!(example.len(), 2 | 3) {
        return Ok(());
    }
    Err(TrainError::DatasetSpec(format!(
        "dataset.augment: needs image examples (C×H×W or H×W), these have shape {example:?}"
    )))
}

impl Augmenter {
    /// `seed`: the epoch's seed for this rank.
    pub fn new(augment: Augment, seed: u64) -> Self {
        Self {
            augment,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// `batch` (`[B, C, H, W]` or `[B, H, W]`) cropped and flipped as the
    /// job asks, with this epoch's next draws.
    pub fn apply(&mut self, batch: &Tensor) -> Result<Tensor, TrainError> {
        let size = batch.size();
        let images = match size.len() {
            4 => batch.shallow_clone(),
            3 => batch.f_unsqueeze(1)?,
            _ => return Err(check_images(&size[1..]).unwrap_err()),
        };
        let (n, height, width) = (size[0], size[size.len() - 2], size[size.len() - 1]);
        let device = batch.device();
        let mut images = images;
        let padding = i64::from(self.augment.crop_padding);
        if padding > 0 {
            let span = 2 * padding + 1;
            let offsets: Vec<i64> = (0..2 * n).map(|_| self.rng.random_range(0..span)).collect();
            let padded = images.f_constant_pad_nd([padding, padding, padding, padding])?;
            let offsets = Tensor::from_slice(&offsets)
                .f_view([n, 2])?
                .f_to_device(device)?;
            let window = |length: i64, which: i64| -> Result<Tensor, TrainError> {
                let start = offsets.f_select(1, which)?.f_unsqueeze(1)?;
                let steps = Tensor::f_arange(length, (Kind::Int64, device))?.f_unsqueeze(0)?;
                Ok(start.f_add(&steps)?)
            };
            let channels = padded.size()[1];
            // Rows then columns: gather along H, then along W.
            let rows = window(height, 0)?
                .f_view([n, 1, height, 1])?
                .f_expand([n, channels, height, width + 2 * padding], false)?;
            let columns = window(width, 1)?
                .f_view([n, 1, 1, width])?
                .f_expand([n, channels, height, width], false)?;
            images = padded
                .f_gather(2, &rows, false)?
                .f_gather(3, &columns, false)?;
        }
        if self.augment.horizontal_flip {
            let flips: Vec<bool> = (0..n).map(|_| self.rng.random_bool(0.5)).collect();
            let mask = Tensor::from_slice(&flips)
                .f_view([n, 1, 1, 1])?
                .f_to_device(device)?;
            images = images.f_flip([3])?.f_where_self(&mask, &images)?;
        }
        Ok(if size.len() == 3 {
            images.f_squeeze_dim(1)?
        } else {
            images
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two 1×3×3 images holding 1..=9 and 11..=19.
    fn images() -> Tensor {
        let values: Vec<f32> = (1..=9).chain(11..=19).map(|v| v as f32).collect();
        Tensor::from_slice(&values).view([2, 1, 3, 3])
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.reshape([-1])).unwrap()
    }

    #[test]
    fn a_flip_mirrors_rows_and_a_crop_shifts_in_zeros() {
        let flip = Augment {
            crop_padding: 0,
            horizontal_flip: true,
        };
        let x = images();
        let mut flips_seen = [false; 2];
        for seed in 0..16 {
            let out = Augmenter::new(flip, seed).apply(&x).unwrap();
            for (i, seen) in flips_seen.iter_mut().enumerate() {
                let (image, mirrored) = (x.get(i as i64), x.get(i as i64).flip([2]));
                let got = out.get(i as i64);
                assert!(
                    got.equal(&image) || got.equal(&mirrored),
                    "{seed}: flip or not"
                );
                *seen |= got.equal(&mirrored);
            }
        }
        assert_eq!(flips_seen, [true, true], "some images are flipped");

        let crop = Augment {
            crop_padding: 1,
            horizontal_flip: false,
        };
        let mut shifts = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let out = Augmenter::new(crop, seed).apply(&x).unwrap();
            assert_eq!(out.size(), [2, 1, 3, 3]);
            for i in 0..2 {
                // Every window of the zero-padded image is a shift of it.
                let image = values(&x.get(i));
                let got = values(&out.get(i));
                let shift = (-1..=1)
                    .flat_map(|dy| (-1..=1).map(move |dx| (dy, dx)))
                    .find(|&(dy, dx)| {
                        (0..9).all(|p| {
                            let (r, c) = (p / 3 + dy, p % 3 + dx);
                            let expected = if (0..3).contains(&r) && (0..3).contains(&c) {
                                image[(r * 3 + c) as usize]
                            } else {
                                0.0
                            };
                            got[p as usize] == expected
                        })
                    });
                shifts.insert(shift.expect("a window of the padded image"));
            }
        }
        assert_eq!(shifts.len(), 9, "every offset in [-1, 1]² occurs");
    }

    #[test]
    fn draws_replay_for_a_seed_and_differ_across_seeds() {
        let both = Augment {
            crop_padding: 4,
            horizontal_flip: true,
        };
        let x = Tensor::randn([32, 8, 8], (Kind::Float, tch::Device::Cpu));
        let run = |seed| {
            let mut augmenter = Augmenter::new(both, seed);
            // Two batches: the second continues the first's draws.
            [augmenter.apply(&x).unwrap(), augmenter.apply(&x).unwrap()]
        };
        let (a, b, c) = (run(1), run(1), run(2));
        assert_eq!(a[0].size(), [32, 8, 8], "H×W images keep their shape");
        assert!(
            a[0].equal(&b[0]) && a[1].equal(&b[1]),
            "same seed, same images"
        );
        assert!(!a[0].equal(&a[1]), "the next batch draws anew");
        assert!(!a[0].equal(&c[0]), "another epoch's seed, other images");
        assert!(check_images(&[12])
            .unwrap_err()
            .to_string()
            .contains("dataset.augment"));
    }
}
