//! Fitted data preparation: CSV columns that need statistics or
//! categories from the training examples (`dataset.csv`), and the record
//! of everything fitted that rank 0 writes as `preparation.json` into the
//! trial's checkpoint directory (the export ships it with the model).
//!
//! ```text
//!  read (dataset::csv): numbers; NaN where a cell is missing; a category
//!        as its code in the column's vocabulary (shared by all splits)
//!  fit   (training examples only, after any validation hold-out):
//!        fill value per column (mean / median / constant; the most
//!        frequent category), categories seen in training (sorted)
//!  apply (every split): fill; one-hot over the training categories; a
//!        category never seen in training encodes as all zeros
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ringleader_spec::prepare::{
    Column, CsvPreparation, Missing, MAX_CATEGORIES, MAX_CATEGORY_BYTES,
};
use serde::Serialize;
use tch::Tensor;

use super::dataset::Split;
use super::error::{unreadable, Found, TrainError};

/// File name of the fitted preparation in a checkpoint directory.
pub const PREPARATION_FILE: &str = "preparation.json";

/// What a CSV file's columns hold, fixed by the first training file read
/// and checked against every other file, with the categories met so far.
#[derive(Debug)]
pub struct CsvColumns {
    policy: CsvPreparation,
    /// The first file's header, when it has one.
    names: Option<Vec<String>>,
    /// CSV columns per record.
    width: usize,
    label: usize,
    /// Per feature column (every CSV column but the label, in order).
    features: Vec<FeatureColumn>,
}

#[derive(Debug)]
struct FeatureColumn {
    /// 0-based CSV column.
    column: usize,
    /// `Some` for a categorical column.
    vocabulary: Option<Vocabulary>,
}

/// The categories of one column in all splits, by code (order of first
/// appearance); bounded by [`MAX_CATEGORIES`].
#[derive(Debug, Default)]
struct Vocabulary {
    names: Vec<String>,
    codes: HashMap<String, u32>,
}

/// What a feature cell becomes when read.
pub enum Cell {
    Number,
    /// A categorical column: its code, interned.
    Category,
}

impl CsvColumns {
    /// Columns laid out as in the first file of the training split:
    /// `header` its names (if it has a header), `width` its columns,
    /// `label` the label column. `path` names the file in errors.
    pub fn new(
        policy: &CsvPreparation,
        path: &Path,
        header: Option<Vec<String>>,
        width: usize,
        label: usize,
    ) -> Result<Self, TrainError> {
        let categorical = resolve(policy, path, header.as_deref(), width, label)?;
        let features = (0..width)
            .filter(|&c| c != label)
            .map(|column| FeatureColumn {
                column,
                vocabulary: categorical.contains(&column).then(Vocabulary::default),
            })
            .collect();
        Ok(Self {
            policy: policy.clone(),
            names: header,
            width,
            label,
            features,
        })
    }

    /// Checks that another file (`path`, with `header` and `width`
    /// columns) is laid out as the first.
    pub fn check(
        &self,
        path: &Path,
        header: Option<&[String]>,
        width: usize,
        label: usize,
    ) -> Result<(), TrainError> {
        let categorical = resolve(&self.policy, path, header, width, label)?;
        let ours: Vec<usize> = self
            .features
            .iter()
            .filter(|f| f.vocabulary.is_some())
            .map(|f| f.column)
            .collect();
        if width != self.width || label != self.label || categorical != ours {
            return Err(TrainError::DatasetSpec(format!(
                "{}: {width} columns, label column {}, categorical columns {categorical:?}; \
                 the first training file has {}, {} and {ours:?}",
                path.display(),
                label + 1,
                self.width,
                self.label + 1
            )));
        }
        Ok(())
    }

    /// Whether the `index`th feature column is categorical.
    pub fn kind(&self, index: usize) -> Cell {
        match self.features.get(index).and_then(|f| f.vocabulary.as_ref()) {
            Some(_) => Cell::Category,
            None => Cell::Number,
        }
    }

    /// Whether a missing cell is an error rather than a placeholder.
    pub fn missing_is_error(&self) -> bool {
        self.policy.missing == Missing::Error
    }

    /// The code of the category `cell` in the `index`th feature column,
    /// interned if new; what the cell held instead when it cannot be one.
    pub fn code(&mut self, index: usize, cell: &[u8]) -> Result<f32, Found> {
        let vocabulary = self
            .features
            .get_mut(index)
            .and_then(|f| f.vocabulary.as_mut())
            .ok_or(Found::Text { bytes: cell.len() })?;
        let text = std::str::from_utf8(cell).map_err(|_| Found::NotUtf8 { bytes: cell.len() })?;
        if text.len() > MAX_CATEGORY_BYTES {
            return Err(Found::LongCategory { bytes: text.len() });
        }
        if let Some(&code) = vocabulary.codes.get(text) {
            return Ok(code as f32);
        }
        if vocabulary.names.len() >= MAX_CATEGORIES {
            return Err(Found::TooManyCategories);
        }
        let code = vocabulary.names.len() as u32;
        vocabulary.names.push(text.to_string());
        vocabulary.codes.insert(text.to_string(), code);
        Ok(code as f32)
    }

    /// Fits fill values and categories on `train` (features as read: one
    /// column per feature column, NaN where missing, codes for
    /// categories). Call it with the examples the model trains on.
    pub fn fit(&self, train: &Split) -> Result<CsvFit, TrainError> {
        let rows = train.len();
        let values = Vec::<f32>::try_from(train.features.f_contiguous()?.f_view([-1])?)?;
        let width = self.features.len();
        let mut columns = Vec::with_capacity(width);
        for (j, feature) in self.features.iter().enumerate() {
            let present: Vec<f32> = (0..rows)
                .map(|i| values[i * width + j])
                .filter(|x| !x.is_nan())
                .collect();
            let name = self
                .names
                .as_ref()
                .and_then(|n| n.get(feature.column))
                .cloned();
            let column = feature.column;
            let none_present = |what: &str| {
                TrainError::DatasetSpec(format!(
                    "dataset.csv.missing: column {} has no value in the {rows} training \
                     examples to take {what} from",
                    column + 1
                ))
            };
            columns.push(match &feature.vocabulary {
                Some(vocabulary) => {
                    let mut counts = vec![0u64; vocabulary.names.len()];
                    for &code in &present {
                        counts[code as usize] += 1;
                    }
                    let mut seen: Vec<usize> =
                        (0..counts.len()).filter(|&c| counts[c] > 0).collect();
                    seen.sort_by(|&a, &b| vocabulary.names[a].cmp(&vocabulary.names[b]));
                    // The most frequent; of equals, the first in sorted order.
                    let fill = seen
                        .iter()
                        .copied()
                        .rev()
                        .max_by_key(|&c| counts[c])
                        .ok_or_else(|| none_present("a most frequent category"))?;
                    let mut position = vec![None; vocabulary.names.len()];
                    for (p, &code) in seen.iter().enumerate() {
                        position[code] = Some(p);
                    }
                    FittedColumn::Categorical {
                        column,
                        name,
                        categories: seen.iter().map(|&c| vocabulary.names[c].clone()).collect(),
                        fill: vocabulary.names[fill].clone(),
                        fill_position: position[fill].unwrap_or(0),
                        position,
                    }
                }
                None => {
                    let fill = match self.policy.missing {
                        Missing::Error => None,
                        Missing::Constant => self.policy.fill_value,
                        Missing::Mean if present.is_empty() => return Err(none_present("a mean")),
                        Missing::Mean => Some(
                            present.iter().map(|&x| f64::from(x)).sum::<f64>()
                                / present.len() as f64,
                        ),
                        Missing::Median => {
                            let mut sorted = present.clone();
                            sorted.sort_by(f32::total_cmp);
                            let middle = sorted.get((sorted.len().max(1) - 1) / 2);
                            Some(f64::from(*middle.ok_or_else(|| none_present("a median"))?))
                        }
                    };
                    FittedColumn::Numeric { column, name, fill }
                }
            });
        }
        Ok(CsvFit {
            missing: self.policy.missing,
            unseen_category: "zeros",
            columns,
        })
    }
}

/// The categorical columns `policy` names, as 0-based CSV columns, sorted.
fn resolve(
    policy: &CsvPreparation,
    path: &Path,
    header: Option<&[String]>,
    width: usize,
    label: usize,
) -> Result<Vec<usize>, TrainError> {
    let mut columns = Vec::new();
    for column in &policy.categorical {
        let index = column.resolve(header, width).ok_or_else(|| {
            let place = match (column, header) {
                (Column::Name(_), None) => "; it has no header line to find names in".to_string(),
                _ => String::new(),
            };
            TrainError::DatasetSpec(format!(
                "dataset.csv.categorical: no column {column} in {} ({width} columns){place}",
                path.display()
            ))
        })?;
        if index == label {
            return Err(TrainError::DatasetSpec(format!(
                "dataset.csv.categorical: column {column} of {} is the label column",
                path.display()
            )));
        }
        columns.push(index);
    }
    columns.sort_unstable();
    columns.dedup();
    Ok(columns)
}

/// The preparation fitted on the training examples of a CSV dataset, as
/// written in `preparation.json` under `"csv"`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CsvFit {
    pub missing: Missing,
    /// What a category never seen in training becomes: `"zeros"`, an
    /// all-zero one-hot encoding.
    pub unseen_category: &'static str,
    /// Per feature column, in CSV order: what its cells become.
    pub columns: Vec<FittedColumn>,
}

/// One CSV column's fitted preparation.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum FittedColumn {
    /// One feature; a missing cell becomes `fill` (`None`: an error).
    Numeric {
        /// 0-based CSV column.
        column: usize,
        name: Option<String>,
        fill: Option<f64>,
    },
    /// One feature per training category, in `categories`' order; a
    /// missing cell becomes `fill`, the most frequent training category.
    Categorical {
        column: usize,
        name: Option<String>,
        categories: Vec<String>,
        fill: String,
        /// Per vocabulary code, its place in `categories` (`None`: never
        /// in training).
        #[serde(skip)]
        position: Vec<Option<usize>>,
        #[serde(skip)]
        fill_position: usize,
    },
}

impl FittedColumn {
    fn width(&self) -> usize {
        match self {
            FittedColumn::Numeric { .. } => 1,
            FittedColumn::Categorical { categories, .. } => categories.len(),
        }
    }
}

impl CsvFit {
    /// Features per example once encoded.
    pub fn width(&self) -> usize {
        self.columns.iter().map(FittedColumn::width).sum()
    }

    /// Encodes `split` (read as [`CsvColumns::fit`] expects) in place;
    /// returns how many of its cells held a category never seen in
    /// training, per CSV column (1-based), for a warning.
    pub fn apply(&self, split: &mut Split) -> Result<Vec<(usize, u64)>, TrainError> {
        let rows = split.len();
        let values = Vec::<f32>::try_from(split.features.f_contiguous()?.f_view([-1])?)?;
        let (width, encoded) = (self.columns.len(), self.width());
        let mut out = vec![0f32; rows * encoded];
        let mut unseen = vec![0u64; width];
        for i in 0..rows {
            let row = &mut out[i * encoded..(i + 1) * encoded];
            let mut offset = 0;
            for (j, column) in self.columns.iter().enumerate() {
                let x = values[i * width + j];
                match column {
                    FittedColumn::Numeric { fill, .. } => {
                        row[offset] = if x.is_nan() {
                            fill.unwrap_or(f64::NAN) as f32
                        } else {
                            x
                        };
                    }
                    FittedColumn::Categorical {
                        position,
                        fill_position,
                        ..
                    } => {
                        let place = if x.is_nan() {
                            Some(*fill_position)
                        } else {
                            position.get(x as usize).copied().flatten()
                        };
                        match place {
                            Some(p) => row[offset + p] = 1.0,
                            None => unseen[j] += 1,
                        }
                    }
                }
                offset += column.width();
            }
        }
        split.features = Tensor::from_slice(&out).f_view([rows as i64, encoded as i64])?;
        Ok(self
            .columns
            .iter()
            .zip(unseen)
            .filter(|(_, n)| *n > 0)
            .map(|(column, n)| match column {
                FittedColumn::Numeric { column, .. } | FittedColumn::Categorical { column, .. } => {
                    (column + 1, n)
                }
            })
            .collect())
    }
}

/// Everything fitted on the training examples that a model's input goes
/// through, in order: the CSV encoding, then `(x − shift) / scale`.
/// Written by rank 0 as `preparation.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Preparation {
    /// Present for CSV datasets with `dataset.csv`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csv: Option<CsvFit>,
    /// Present unless `dataset.normalize` is `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalize: Option<Normalization>,
}

/// `x' = (x − shift) / scale`, element by element over an example's
/// features (flattened, C order); one value each when it is the same for
/// every feature (`fixed`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Normalization {
    /// `fixed`, `standard` or `minmax`.
    pub kind: &'static str,
    pub shift: Vec<f32>,
    pub scale: Vec<f32>,
}

/// Writes `preparation` as `dir/preparation.json` (atomically).
pub fn save(dir: &Path, preparation: &Preparation) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(dir).map_err(unreadable(dir))?;
    let path = dir.join(PREPARATION_FILE);
    let json = serde_json::to_vec_pretty(preparation).expect("a preparation serialises");
    super::checkpoint::write_atomic(&path, super::checkpoint::Durability::Synced, |tmp| {
        std::fs::write(tmp, &json).map_err(unreadable(tmp))
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

    fn split(rows: &[[f32; 2]]) -> Split {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Split {
            features: Tensor::from_slice(&flat).view([rows.len() as i64, 2]),
            labels: Tensor::zeros([rows.len() as i64], (Kind::Int64, tch::Device::Cpu)),
        }
    }

    /// Column 0 numeric, column 1 categorical, column 2 the label; the
    /// categories "red", "blue", "green" interned in that order.
    fn columns(missing: Missing) -> CsvColumns {
        let policy = CsvPreparation {
            missing,
            fill_value: (missing == Missing::Constant).then_some(-1.0),
            categorical: vec![Column::Name("colour".into())],
        };
        let header = ["size", "colour", "label"].map(String::from).to_vec();
        let mut columns = CsvColumns::new(&policy, Path::new("t.csv"), Some(header), 3, 2).unwrap();
        for colour in ["red", "blue", "green"] {
            columns.code(1, colour.as_bytes()).unwrap();
        }
        columns
    }

    #[test]
    fn fill_values_and_categories_come_from_the_examples_fitted_on() {
        let nan = f32::NAN;
        // red 0, blue 1, green 2; green never in training.
        let train = split(&[[1.0, 0.0], [4.0, 1.0], [nan, 1.0], [10.0, nan]]);
        let median = columns(Missing::Median).fit(&train).unwrap();
        let mean = columns(Missing::Mean).fit(&train).unwrap();
        let constant = columns(Missing::Constant).fit(&train).unwrap();
        let fill = |fit: &CsvFit| match &fit.columns[0] {
            FittedColumn::Numeric { fill, .. } => *fill,
            other => panic!("{other:?}"),
        };
        assert_eq!(fill(&median), Some(4.0));
        assert_eq!(fill(&mean), Some(5.0));
        assert_eq!(fill(&constant), Some(-1.0));
        let FittedColumn::Categorical {
            categories,
            fill,
            name,
            ..
        } = &median.columns[1]
        else {
            panic!()
        };
        assert_eq!(categories, &["blue", "red"], "sorted, training only");
        assert_eq!(fill, "blue", "the most frequent");
        assert_eq!(name.as_deref(), Some("colour"));
        assert_eq!(median.width(), 3);

        let mut test = split(&[[nan, 2.0], [7.0, 0.0], [2.0, nan]]);
        let unseen = median.apply(&mut test).unwrap();
        assert_eq!(unseen, [(2, 1)], "one unseen category in CSV column 2");
        let encoded = Vec::<f32>::try_from(test.features.view([-1])).unwrap();
        #[rustfmt::skip]
        assert_eq!(encoded, [
            4.0, 0.0, 0.0, // median; green: all zeros
            7.0, 0.0, 1.0, // red
            2.0, 1.0, 0.0, // missing: blue
        ]);
        let json = serde_json::to_value(&median).unwrap();
        assert_eq!(json["columns"][1]["kind"], "categorical");
        assert_eq!(json["columns"][1]["categories"][1], "red");
        assert_eq!(json["unseen_category"], "zeros");
        assert!(json["columns"][1].get("position").is_none());
    }

    #[test]
    fn a_column_without_training_values_cannot_be_filled() {
        let nan = f32::NAN;
        let train = split(&[[nan, 0.0], [nan, 1.0]]);
        let error = columns(Missing::Mean).fit(&train).unwrap_err().to_string();
        assert!(
            error.contains("dataset.csv.missing: column 1 has no value"),
            "{error}"
        );
    }

    #[test]
    fn categories_are_bounded_in_length_and_number() {
        let mut columns = columns(Missing::Error);
        let long = vec![b'x'; MAX_CATEGORY_BYTES + 1];
        assert_eq!(
            columns.code(1, &long),
            Err(Found::LongCategory { bytes: long.len() })
        );
        assert_eq!(columns.code(1, b"red"), Ok(0.0));
        for i in 3..MAX_CATEGORIES {
            columns.code(1, format!("c{i}").as_bytes()).unwrap();
        }
        assert_eq!(columns.code(1, b"one more"), Err(Found::TooManyCategories));
        assert_eq!(columns.code(1, b"blue"), Ok(1.0), "known ones still read");
    }
}
