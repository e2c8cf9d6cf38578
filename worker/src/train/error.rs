//! What can go wrong while training, named so the agent (and the person
//! reading the trial's error) can tell a bad dataset from a lost peer.

use std::fmt;
use std::path::PathBuf;

use crate::collective::TensorCollectiveError;

/// Where in a file a bad value sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// 1-based line of a text file.
    Line(usize),
    /// 0-based example of a binary array.
    Example(usize),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Line(line) => write!(f, "line {line}"),
            Position::Example(index) => write!(f, "example {index}"),
        }
    }
}

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
    #[error("{}: not an IDX file (magic bytes {magic:02x?})", path.display())]
    IdxMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{}: truncated IDX file: its header promises {expected} bytes, it holds {actual}", path.display())]
    IdxTruncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{}: {position}: label {value} is outside 0..{classes}", path.display())]
    LabelOutOfRange {
        path: PathBuf,
        position: Position,
        value: i64,
        classes: u32,
    },
    #[error("{}: line {line}: expected {expected} columns, got {got}", path.display())]
    CsvColumns {
        path: PathBuf,
        line: usize,
        expected: usize,
        got: usize,
    },
    #[error("{}: line {line}, column {column}: {value:?} is not a number", path.display())]
    CsvNotNumeric {
        path: PathBuf,
        line: usize,
        column: usize,
        value: String,
    },
    /// A `.npy` or safetensors file we cannot use, and why.
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
