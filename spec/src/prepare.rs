//! Data preparation a job asks for, and the pure decisions behind it:
//! how CSV cells become features (`dataset.csv`: missing cells,
//! categorical columns), class imbalance (`dataset.class_weights`,
//! `dataset.sampler`) and image augmentation (`dataset.augment`).
//!
//! ```text
//!  CSV cells ──read──▶ numbers, NaN where a cell is missing, category codes
//!            ──fit on the training examples only──▶ fill values, categories
//!            ──apply to every split──▶ features (one-hot for categories)
//!  training labels ──balanced_weights──▶ loss weights n / (k · count_c)
//!  training labels, (seed, epoch) ──balanced_order──▶ a class-balanced draw
//! ```
//!
//! The worker does the reading and the tensor work; what is decided here
//! (which cells count as missing, the weights, the draw) is pure and the
//! same on every rank.

use rand::Rng;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::FieldError;
use crate::job::{DatasetFormat, DatasetSpec};

/// Most categories one categorical column may hold (in all splits
/// together): a one-hot encoding is that wide, and every category is kept
/// in memory and in `preparation.json`.
pub const MAX_CATEGORIES: usize = 1024;

/// Longest category, in bytes.
pub const MAX_CATEGORY_BYTES: usize = 256;

/// Largest `augment.crop_padding`, in pixels.
pub const MAX_CROP_PADDING: u32 = 64;

/// What counts as a missing CSV cell, compared ignoring ASCII case after
/// trimming: the empty cell, `NA`, `N/A`, `NaN` and `null` (what pandas
/// writes for a missing value, and R's `NA`).
pub const MISSING_MARKERS: [&str; 5] = ["", "na", "n/a", "nan", "null"];

/// Whether a (trimmed) CSV cell stands for a missing value.
pub fn is_missing(cell: &[u8]) -> bool {
    MISSING_MARKERS
        .iter()
        .any(|marker| cell.eq_ignore_ascii_case(marker.as_bytes()))
}

/// `[dataset.csv]`: how CSV cells become features.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvPreparation {
    /// What a missing cell (see [`MISSING_MARKERS`]) becomes.
    #[serde(default)]
    pub missing: Missing,
    /// The number `missing = "constant"` fills in.
    #[serde(default)]
    pub fill_value: Option<f64>,
    /// Columns that hold categories rather than numbers, by 0-based index
    /// (negative counts from the end, as `label_column`) or by header
    /// name; each is one-hot encoded over the categories of the training
    /// examples.
    #[serde(default)]
    pub categorical: Vec<Column>,
}

impl CsvPreparation {
    /// Whether features need fitting on the training examples before use
    /// (statistics or categories), rather than being read as they are.
    pub fn needs_fitting(&self) -> bool {
        !self.categorical.is_empty() || matches!(self.missing, Missing::Mean | Missing::Median)
    }
}

/// The policy for missing cells. Statistics come from the training
/// examples only (after any validation hold-out); a missing cell of a
/// categorical column takes the column's most frequent training category
/// under any policy but `error`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Missing {
    /// A missing cell is an error naming the file, line and column.
    #[default]
    Error,
    /// The column's mean over the training examples.
    Mean,
    /// The column's median over the training examples (the lower middle
    /// value for an even count).
    Median,
    /// `fill_value`.
    Constant,
}

/// A CSV column, by 0-based index (negative from the end) or header name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Column {
    Index(i64),
    Name(String),
}

impl Column {
    /// The column's 0-based index among `columns`, given the header's
    /// names when the file has one; `None` when there is no such column.
    pub fn resolve(&self, header: Option<&[String]>, columns: usize) -> Option<usize> {
        match self {
            Column::Index(index) if *index < 0 => (columns as i64)
                .checked_add(*index)
                .and_then(|i| usize::try_from(i).ok()),
            Column::Index(index) => usize::try_from(*index).ok().filter(|&i| i < columns),
            Column::Name(name) => header?.iter().position(|h| h == name),
        }
    }
}

impl std::fmt::Display for Column {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Column::Index(index) => write!(f, "{index}"),
            Column::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// `dataset.class_weights`: how much each class's examples weigh in the
/// training loss.
#[derive(Clone, Debug, PartialEq)]
pub enum ClassWeights {
    /// scikit-learn's `"balanced"`: `n / (k · count_c)` over the training
    /// examples (`k`: the classes present), see [`balanced_weights`].
    Balanced,
    /// One weight per class, in class order.
    Explicit(Vec<f64>),
}

impl Serialize for ClassWeights {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ClassWeights::Balanced => serializer.serialize_str("balanced"),
            ClassWeights::Explicit(weights) => weights.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for ClassWeights {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Weights;
        impl<'de> Visitor<'de> for Weights {
            type Value = ClassWeights;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"balanced\" or a list of one weight per class")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<ClassWeights, E> {
                match value {
                    "balanced" => Ok(ClassWeights::Balanced),
                    _ => Err(E::invalid_value(de::Unexpected::Str(value), &self)),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ClassWeights, A::Error> {
                let mut weights = Vec::new();
                while let Some(weight) = seq.next_element::<f64>()? {
                    weights.push(weight);
                }
                Ok(ClassWeights::Explicit(weights))
            }
        }
        deserializer.deserialize_any(Weights)
    }
}

/// `dataset.sampler`: the order of the training examples in an epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampler {
    /// Every example once per epoch (shuffled when `dataset.shuffle`).
    #[default]
    Uniform,
    /// As many draws as examples, each class equally likely
    /// ([`balanced_order`]); ranks take their shares of one draw.
    Balanced,
}

/// `[dataset.augment]`: random changes to training images, drawn anew
/// every epoch. Each is off unless set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Pad each image with this many zero pixels on every side, then crop
    /// a random window of the original size (0: no crop).
    #[serde(default)]
    pub crop_padding: u32,
    /// Mirror each image left to right with probability ½.
    #[serde(default)]
    pub horizontal_flip: bool,
}

impl Augment {
    /// Whether it changes anything.
    pub fn is_active(&self) -> bool {
        self.crop_padding > 0 || self.horizontal_flip
    }
}

/// scikit-learn's balanced class weights from per-class example counts:
/// `n / (k · count_c)`, `k` being the number of classes with examples; a
/// class without examples gets 0 (it contributes no loss anyway).
pub fn balanced_weights(counts: &[u64]) -> Vec<f64> {
    let n: u64 = counts.iter().sum();
    let present = counts.iter().filter(|&&c| c > 0).count() as f64;
    counts
        .iter()
        .map(|&c| {
            if c == 0 {
                0.0
            } else {
                n as f64 / (present * c as f64)
            }
        })
        .collect()
}

/// A class-balanced draw of `labels.len()` example indices for `epoch`:
/// each draw picks a class with examples uniformly, then one of its
/// examples uniformly (with replacement): PyTorch's
/// `WeightedRandomSampler` with weights `1 / count_c`. Keyed on (seed,
/// epoch), so every rank draws the same sequence and a resumed run replays
/// it.
pub fn balanced_order(labels: &[i64], classes: u32, seed: u64, epoch: u64) -> Vec<u64> {
    let mut members: Vec<Vec<u64>> = vec![Vec::new(); classes as usize];
    for (i, &label) in labels.iter().enumerate() {
        if let Some(class) = usize::try_from(label).ok().and_then(|c| members.get_mut(c)) {
            class.push(i as u64);
        }
    }
    members.retain(|m| !m.is_empty());
    if members.is_empty() {
        return Vec::new();
    }
    let mut rng = crate::shard::rng(seed, epoch, u64::from(u32::MAX) + 1);
    (0..labels.len())
        .map(|_| {
            let class = &members[rng.random_range(0..members.len())];
            class[rng.random_range(0..class.len())]
        })
        .collect()
}

/// Checks `dataset.csv`, `dataset.class_weights`, `dataset.sampler` and
/// `dataset.augment` against the rest of the dataset.
pub fn validate(dataset: &DatasetSpec, workers: u32) -> Result<(), FieldError> {
    let sharded = dataset.file_sharded(workers);
    let whole_split_needed = |key: &str, what: &str| {
        FieldError::new(
            &["dataset", key],
            format!(
                "{what} needs every worker to read the whole training split, but its files \
                 are dealt to the workers; set dataset.sharding = \"examples\""
            ),
        )
    };
    if let Some(csv) = &dataset.csv {
        if dataset.format != DatasetFormat::Csv {
            return Err(FieldError::new(
                &["dataset", "csv"],
                format!("applies to format csv only, not {:?}", dataset.format),
            ));
        }
        match (csv.missing, csv.fill_value) {
            (Missing::Constant, None) => {
                return Err(FieldError::new(
                    &["dataset", "csv", "fill_value"],
                    "required with missing = \"constant\"",
                ))
            }
            (Missing::Constant, Some(value)) if !value.is_finite() => {
                return Err(FieldError::new(
                    &["dataset", "csv", "fill_value"],
                    format!("must be a finite number, got {value}"),
                ))
            }
            (Missing::Constant, Some(_)) | (_, None) => {}
            (other, Some(_)) => {
                return Err(FieldError::new(
                    &["dataset", "csv", "fill_value"],
                    format!("is used only with missing = \"constant\", not {other:?}"),
                ))
            }
        }
        for (i, column) in csv.categorical.iter().enumerate() {
            if csv.categorical[..i].contains(column) {
                return Err(FieldError::new(
                    &["dataset", "csv", "categorical"],
                    format!("lists column {column} twice"),
                ));
            }
        }
        if sharded && csv.needs_fitting() {
            return Err(whole_split_needed(
                "csv",
                "fitting categories or fill values",
            ));
        }
    }
    if let Some(ClassWeights::Explicit(weights)) = &dataset.class_weights {
        if weights.len() != dataset.classes as usize {
            return Err(FieldError::new(
                &["dataset", "class_weights"],
                format!(
                    "lists {} weights for {} classes (dataset.classes)",
                    weights.len(),
                    dataset.classes
                ),
            ));
        }
        if let Some(bad) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
            return Err(FieldError::new(
                &["dataset", "class_weights"],
                format!("weights must be finite and 0 or more, got {bad}"),
            ));
        }
        if weights.iter().all(|&w| w == 0.0) {
            return Err(FieldError::new(
                &["dataset", "class_weights"],
                "at least one weight must be above 0",
            ));
        }
    }
    if dataset.sampler == Sampler::Balanced && sharded {
        return Err(whole_split_needed("sampler", "the balanced sampler"));
    }
    if let Some(augment) = &dataset.augment {
        if dataset.format == DatasetFormat::Csv {
            return Err(FieldError::new(
                &["dataset", "augment"],
                "needs image examples (C×H×W or H×W); CSV examples are flat features",
            ));
        }
        if augment.crop_padding > MAX_CROP_PADDING {
            return Err(FieldError::new(
                &["dataset", "augment", "crop_padding"],
                format!(
                    "must be at most {MAX_CROP_PADDING}, got {}",
                    augment.crop_padding
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_markers_ignore_case() {
        for cell in ["", "NA", "na", "N/A", "NaN", "nan", "NULL", "null"] {
            assert!(is_missing(cell.as_bytes()), "{cell}");
        }
        for cell in ["0", "none", "inf", "-", "NAN1"] {
            assert!(!is_missing(cell.as_bytes()), "{cell}");
        }
    }

    #[test]
    fn columns_resolve_by_index_from_either_end_or_by_header_name() {
        let header = ["a".to_string(), "colour".into(), "label".into()];
        assert_eq!(Column::Index(1).resolve(None, 3), Some(1));
        assert_eq!(Column::Index(-2).resolve(None, 3), Some(1));
        assert_eq!(Column::Index(3).resolve(None, 3), None);
        assert_eq!(Column::Index(-4).resolve(None, 3), None);
        let name = Column::Name("colour".into());
        assert_eq!(name.resolve(Some(&header), 3), Some(1));
        assert_eq!(name.resolve(None, 3), None, "no header, no names");
        assert_eq!(Column::Name("x".into()).resolve(Some(&header), 3), None);
    }

    #[test]
    fn balanced_weights_are_n_over_k_times_count() {
        // 95/5: sklearn's compute_class_weight("balanced") gives
        // 100 / (2·95) and 100 / (2·5).
        let weights = balanced_weights(&[95, 5]);
        assert!((weights[0] - 100.0 / 190.0).abs() < 1e-12);
        assert!((weights[1] - 10.0).abs() < 1e-12);
        // A class without examples neither counts in k nor gets a weight.
        assert_eq!(balanced_weights(&[2, 0, 6]), [2.0, 0.0, 8.0 / 12.0]);
    }

    #[test]
    fn balanced_order_draws_classes_equally_and_replays_per_epoch() {
        let labels: Vec<i64> = (0..1000).map(|i| i64::from(i % 20 == 0)).collect();
        let order = balanced_order(&labels, 2, 7, 1);
        assert_eq!(order.len(), labels.len());
        let minority = order.iter().filter(|&&i| labels[i as usize] == 1).count();
        // 50 of 1000 examples, drawn about half the time.
        assert!((400..600).contains(&minority), "{minority}");
        assert_eq!(order, balanced_order(&labels, 2, 7, 1), "same seed, epoch");
        assert_ne!(order, balanced_order(&labels, 2, 7, 2), "another epoch");
        assert_ne!(order, balanced_order(&labels, 2, 8, 1), "another seed");
        assert!(balanced_order(&[], 2, 7, 1).is_empty());
    }

    const CSV_JOB: &str = r#"name = "tabular"
workers = 2
epochs = 1

[dataset]
format = "csv"
classes = 2
train = { files = ["a.csv", "b.csv"] }

[model]
kind = "mlp"
"#;

    /// The error for CSV_JOB with `extra` added to `[dataset]`.
    fn error(extra: &str) -> String {
        let text = CSV_JOB.replacen("classes = 2\n", &format!("classes = 2\n{extra}\n"), 1);
        crate::JobSpec::parse(&text, "job.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn bad_preparation_names_the_field_and_line() {
        let good =
            "sharding = \"examples\"\nclass_weights = \"balanced\"\nsampler = \"balanced\"\n\
                    csv = { missing = \"median\", categorical = [0, \"colour\"] }";
        let text = CSV_JOB.replacen("classes = 2\n", &format!("classes = 2\n{good}\n"), 1);
        let job = crate::JobSpec::parse(&text, "job.toml").unwrap();
        assert_eq!(job.dataset.sampler, Sampler::Balanced);
        for (extra, expected) in [
            (
                "class_weights = [1.0]",
                "job.toml:8:1: dataset.class_weights: lists 1 weights for 2 classes",
            ),
            (
                "class_weights = [1.0, -1]",
                "job.toml:8:1: dataset.class_weights: weights must be finite",
            ),
            (
                "class_weights = \"even\"",
                "job.toml:8:17: dataset.class_weights: invalid value",
            ),
            (
                "csv = { missing = \"constant\" }",
                "dataset.csv.fill_value: required with missing = \"constant\"",
            ),
            (
                "csv = { missing = \"mean\", fill_value = 1 }",
                "dataset.csv.fill_value: is used only with",
            ),
            (
                "csv = { categorical = [1, 1] }",
                "dataset.csv.categorical: lists column 1 twice",
            ),
            (
                "csv = { missing = \"mean\" }",
                "job.toml:8:1: dataset.csv: fitting categories or fill values needs every worker",
            ),
            (
                "sampler = \"balanced\"",
                "job.toml:8:1: dataset.sampler: the balanced sampler needs every worker",
            ),
            (
                "augment = { horizontal_flip = true }",
                "job.toml:8:1: dataset.augment: needs image examples",
            ),
            (
                "sampler = \"random\"",
                "job.toml:8:11: dataset.sampler: unknown variant `random`",
            ),
        ] {
            let message = error(extra);
            assert!(message.contains(expected), "{extra}: {message}");
        }
    }

    #[test]
    fn class_weights_read_balanced_or_a_list() {
        #[derive(Deserialize)]
        struct T {
            w: ClassWeights,
        }
        let parse = |text: &str| toml::from_str::<T>(text).map(|t| t.w);
        assert_eq!(parse("w = \"balanced\"").unwrap(), ClassWeights::Balanced);
        assert_eq!(
            parse("w = [1, 2.5]").unwrap(),
            ClassWeights::Explicit(vec![1.0, 2.5])
        );
        let error = parse("w = \"even\"").unwrap_err().to_string();
        assert!(error.contains("\"balanced\" or a list"), "{error}");
    }
}
