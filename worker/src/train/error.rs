//! What can go wrong while training, named so the agent (and the person
//! reading the trial's error) can tell a bad dataset from a lost peer.

use std::fmt;
use std::path::PathBuf;

use ringleader_spec::prepare::{MAX_CATEGORIES, MAX_CATEGORY_BYTES};

use crate::collective::TensorCollectiveError;
use crate::confine::ConfineError;

/// Where in a file a bad value sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// A CSV cell: 1-based line (where its record starts) and column.
    Cell { line: usize, column: usize },
    /// 0-based example of a binary array.
    Example(usize),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Cell { line, column } => write!(f, "{line}:{column}"),
            // Shown after `path:`, as `path: example 3`.
            Position::Example(index) => write!(f, " example {index}"),
        }
    }
}

/// What a CSV column holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsvRole {
    Feature,
    Label,
    /// A column `dataset.csv.categorical` names.
    Category,
}

impl CsvRole {
    fn expected(self) -> &'static str {
        match self {
            CsvRole::Feature => "a number",
            CsvRole::Label => "an integer label",
            CsvRole::Category => "a category",
        }
    }
}

impl fmt::Display for CsvRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CsvRole::Feature => "feature",
            CsvRole::Label => "label",
            CsvRole::Category => "categorical",
        })
    }
}

/// What a CSV cell held instead of what was expected, described without
/// quoting it: a dataset path may point at a file that is not a data set
/// (and not the user's to read out through error messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Text that is not a number, `bytes` long.
    Text {
        bytes: usize,
    },
    Empty,
    /// Bytes that are not UTF-8.
    NotUtf8 {
        bytes: usize,
    },
    /// A label with a fraction or an exponent.
    NotInteger,
    /// A whole-number label beyond `i64`.
    IntegerOutOfRange,
    /// A feature that is NaN, infinite, or beyond `f32`'s range.
    NotFinite,
    /// A missing-value marker (`NA`, `N/A`, `NaN`, `null`) where
    /// `dataset.csv.missing` is `error`.
    Missing,
    /// A category longer than `MAX_CATEGORY_BYTES`.
    LongCategory {
        bytes: usize,
    },
    /// A new category in a column that already holds `MAX_CATEGORIES`.
    TooManyCategories,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Text { bytes } => write!(f, "text of {bytes} bytes"),
            Found::Empty => write!(f, "an empty cell"),
            Found::NotUtf8 { bytes } => write!(f, "{bytes} bytes that are not UTF-8 text"),
            Found::NotInteger => write!(f, "a number that is not an integer"),
            Found::IntegerOutOfRange => write!(f, "an integer out of range"),
            Found::NotFinite => write!(f, "a number that is not finite as f32"),
            Found::Missing => write!(f, "a missing value (see dataset.csv.missing)"),
            Found::LongCategory { bytes } => write!(
                f,
                "text of {bytes} bytes (a category may have {MAX_CATEGORY_BYTES})"
            ),
            Found::TooManyCategories => write!(
                f,
                "a new category beyond the {MAX_CATEGORIES} a column may hold"
            ),
        }
    }
}

/// Errors about a dataset name the file, the place (line and column, or
/// example, or header key) and what was expected; they never quote the
/// file's bytes.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid segment: {0}")]
    InvalidSegment(String),
    #[error("dataset spec: {0}")]
    DatasetSpec(String),
    #[error("{}: cannot read: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: expected an IDX file of unsigned bytes (magic 00 00 08 and a dimension count above 0), found other bytes", path.display())]
    IdxMagic { path: PathBuf },
    #[error("{}: truncated IDX file: its header promises {expected} bytes, it holds {actual}", path.display())]
    IdxTruncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// A label outside `0..classes`: `negative` or `classes` or more (the
    /// value itself is not repeated).
    #[error(
        "{}:{position}: expected a label in 0..{classes}, found {}",
        path.display(),
        if *negative { "a negative one".to_string() } else { format!("one of {classes} or more") }
    )]
    LabelOutOfRange {
        path: PathBuf,
        position: Position,
        classes: u32,
        negative: bool,
    },
    #[error("{}:{line}: expected {expected} columns, found {found}", path.display())]
    CsvColumns {
        path: PathBuf,
        line: usize,
        expected: usize,
        found: usize,
    },
    #[error(
        "{}:{line}:{column}: expected {} in column {column} ({role}), found {found}",
        path.display(),
        role.expected()
    )]
    CsvCell {
        path: PathBuf,
        line: usize,
        column: usize,
        role: CsvRole,
        found: Found,
    },
    /// A `.npy`, safetensors or IDX array we cannot use, and why (naming
    /// the header key or tensor that is wrong, never quoting the header).
    #[error("{}: {what}", path.display())]
    Array { path: PathBuf, what: String },
    #[error("{}: features and labels disagree: {features} examples vs {labels} labels", path.display())]
    LengthMismatch {
        path: PathBuf,
        features: usize,
        labels: usize,
    },
    #[error("model: {0}")]
    Model(String),
    #[error("{}: cannot load the TorchScript module: {source}", path.display())]
    TorchScript {
        path: PathBuf,
        source: tch::TchError,
    },
    #[error("{}: checkpoint: {what}", path.display())]
    Checkpoint { path: PathBuf, what: String },
    /// A path outside the worker's roots (or one under them whose
    /// symlinks cannot be followed).
    #[error(transparent)]
    Confined(#[from] ConfineError),
    #[error("ring: {0}")]
    Ring(#[from] TensorCollectiveError),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl From<ringleader_collective::CollectiveError> for TrainError {
    fn from(error: ringleader_collective::CollectiveError) -> Self {
        TrainError::Ring(error.into())
    }
}

/// Maps an I/O error to [`TrainError::Unreadable`] for `path`.
pub(crate) fn unreadable(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Unreadable {
        path: path.to_path_buf(),
        source,
    }
}
