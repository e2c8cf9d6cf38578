use std::path::PathBuf;

/// What can go wrong loading, checking or making security material.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    BadMaterial { path: PathBuf, reason: String },
    #[error("making certificates: {0}")]
    Generate(String),
    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T, E = SecurityError> = std::result::Result<T, E>;

impl SecurityError {
    pub(crate) fn file(path: &std::path::Path, error: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.to_path_buf(),
            reason: error.to_string(),
        }
    }
}

impl From<rcgen::Error> for SecurityError {
    fn from(error: rcgen::Error) -> Self {
        Self::Generate(error.to_string())
    }
}
