//! Spec errors that name the file, the line and the field, and the
//! [`Document`] that finds them: a parsed TOML file that remembers where
//! every key was written.
//!
//! Two kinds of error meet here. Serde errors carry a byte span, which
//! [`Document::path_at`] turns into the dotted field path; semantic errors
//! ([`FieldError`]) carry a field path, which [`Document::locate`] turns into
//! the line where that field (or, when it was left out, its table) is
//! written.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A 1-based line and column (in characters) in a spec file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The position of byte `offset` in `text`.
    pub fn of(text: &str, offset: usize) -> Self {
        let before = &text[..floor_char_boundary(text, offset)];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Self {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Why a job or sweep spec was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The spec is longer than a cluster accepts.
    #[error("{origin}: the spec is {bytes} bytes; at most {limit} are accepted")]
    TooLarge {
        origin: String,
        bytes: usize,
        limit: usize,
    },
    /// The file is not valid TOML.
    #[error("{origin}:{at}: {message}")]
    Syntax {
        origin: String,
        at: Location,
        message: String,
    },
    /// A field has a wrong type or value. `at` is unknown only for values
    /// that came from no file (overrides applied to a stored job).
    #[error("{origin}{}: {field}: {message}", at.map(|at| format!(":{at}")).unwrap_or_default())]
    Invalid {
        origin: String,
        at: Option<Location>,
        field: FieldPath,
        message: String,
    },
}

impl SpecError {
    /// Where in the file the problem is, when known.
    pub fn location(&self) -> Option<Location> {
        match self {
            SpecError::Read { .. } | SpecError::TooLarge { .. } => None,
            SpecError::Syntax { at, .. } => Some(*at),
            SpecError::Invalid { at, .. } => *at,
        }
    }
}

/// A path of keys from the root of a document. Displays dotted, quoting keys
/// that themselves hold dots (`sweep.params."optimizer.lr"`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<String>);

impl FieldPath {
    /// Splits a dotted override path such as `optimizer.lr`.
    pub fn parse_dotted(path: &str) -> Self {
        Self(path.split('.').map(String::from).collect())
    }

    pub fn join(&self, key: impl Into<String>) -> Self {
        let mut keys = self.0.clone();
        keys.push(key.into());
        Self(keys)
    }

    /// `prefix` followed by this path.
    pub fn under(&self, prefix: &FieldPath) -> Self {
        Self(prefix.0.iter().chain(&self.0).cloned().collect())
    }

    pub fn starts_with(&self, prefix: &FieldPath) -> bool {
        self.0.starts_with(&prefix.0)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(top level)");
        }
        for (i, key) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            if key.contains('.') || key.is_empty() {
                write!(f, "\"{key}\"")?;
            } else {
                f.write_str(key)?;
            }
        }
        Ok(())
    }
}

/// A semantic error in one field, before it is placed in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: FieldPath,
    pub message: String,
}

impl FieldError {
    pub fn new(path: &[&str], message: impl Into<String>) -> Self {
        Self {
            path: FieldPath(path.iter().map(|k| k.to_string()).collect()),
            message: message.into(),
        }
    }

    /// The same error for a document nested under `prefix`.
    pub fn under(self, prefix: &FieldPath) -> Self {
        Self {
            path: self.path.under(prefix),
            message: self.message,
        }
    }

    /// This error with no file position (for values that come from no file).
    pub fn unplaced(self, origin: &str) -> SpecError {
        SpecError::Invalid {
            origin: origin.into(),
            at: None,
            field: self.path,
            message: self.message,
        }
    }
}

/// A parsed TOML file that remembers the span of every key and value.
pub struct Document<'a> {
    origin: &'a str,
    text: &'a str,
    root: Spanned<DeTable<'a>>,
}

impl<'a> Document<'a> {
    /// Parses `text`; `origin` (usually the file name) prefixes every error.
    pub fn parse(text: &'a str, origin: &'a str) -> Result<Self, SpecError> {
        let root = DeTable::parse(text).map_err(|e| SpecError::Syntax {
            origin: origin.into(),
            at: Location::of(text, e.span().map_or(0, |s| s.start)),
            message: e.message().trim_end().to_string(),
        })?;
        Ok(Self { origin, text, root })
    }

    /// Deserialises the whole document; a failure names the field whose
    /// value (or key) the error's span points at, and its position.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, SpecError> {
        self.deserialize_fields()
            .map_err(|(error, span)| SpecError::Invalid {
                origin: self.origin.into(),
                at: Some(span.map_or_else(
                    || self.locate(&error.path),
                    |s| Location::of(self.text, s.start),
                )),
                field: error.path,
                message: error.message,
            })
    }

    /// [`Document::deserialize`] before the error is placed in the file.
    pub(crate) fn deserialize_fields<T: DeserializeOwned>(
        &self,
    ) -> Result<T, (FieldError, Option<Range<usize>>)> {
        T::deserialize(toml::de::Deserializer::from(self.root.clone())).map_err(|e| {
            let message = e.message().trim_end().to_string();
            match (e.span(), missing_field(&message)) {
                // Point at the table that lacks the field, not at its span's
                // first key.
                (Some(span), Some(field)) => {
                    let path = self.table_at(&span).join(field);
                    (FieldError { path, message }, None)
                }
                // An error about a whole inline table (a search parameter's
                // domain, say) points at its key, as a missing field does,
                // not at its opening brace.
                (Some(span), None) => {
                    let path = self.path_at(&span);
                    let span = Some(span).filter(|span| !self.is_inline_table_at(&path, span));
                    (FieldError { path, message }, span)
                }
                (None, _) => (FieldError::new(&[], message), None),
            }
        })
    }

    /// Where `path` is written: its key, or, when the document leaves it
    /// out, the nearest enclosing table or key that is written (the top of
    /// the file when none is).
    pub fn locate(&self, path: &FieldPath) -> Location {
        let mut table = self.root.get_ref();
        let mut offset = 0;
        for key in &path.0 {
            let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref() == key) else {
                break;
            };
            offset = k.span().start;
            match v.get_ref() {
                DeValue::Table(inner) => table = inner,
                _ => break,
            }
        }
        Location::of(self.text, offset)
    }

    /// Places a field error in this file.
    pub fn error(&self, error: FieldError) -> SpecError {
        SpecError::Invalid {
            origin: self.origin.into(),
            at: Some(self.locate(&error.path)),
            field: error.path,
            message: error.message,
        }
    }

    /// The field a serde error at `span` is about: the innermost key or
    /// value whose span holds it. A table's span covers only its header, so
    /// every table is searched, not just those around `span`.
    fn path_at(&self, span: &Range<usize>) -> FieldPath {
        fn search(table: &DeTable<'_>, at: usize, path: &mut Vec<String>, best: &mut Vec<String>) {
            for (k, v) in table.iter() {
                path.push(k.get_ref().to_string());
                if (k.span().contains(&at) || v.span().contains(&at)) && path.len() > best.len() {
                    best.clone_from(path);
                }
                if let DeValue::Table(inner) = v.get_ref() {
                    search(inner, at, path, best);
                }
                path.pop();
            }
        }
        let mut best = Vec::new();
        search(self.root.get_ref(), span.start, &mut Vec::new(), &mut best);
        FieldPath(best)
    }

    /// Whether `path` holds an inline table (`{ … }`) that starts where
    /// `span` does.
    fn is_inline_table_at(&self, path: &FieldPath, span: &Range<usize>) -> bool {
        let mut table = self.root.get_ref();
        let mut keys = path.0.iter().peekable();
        while let Some(key) = keys.next() {
            let Some((_, value)) = table.iter().find(|(k, _)| k.get_ref() == key) else {
                return false;
            };
            let DeValue::Table(inner) = value.get_ref() else {
                return false;
            };
            if keys.peek().is_none() {
                let start = value.span().start;
                return start == span.start
                    && self.text.get(start..).is_some_and(|t| t.starts_with('{'));
            }
            table = inner;
        }
        false
    }

    /// The path of the table whose span is exactly `span` (the root when
    /// none is): where serde reports a missing field.
    fn table_at(&self, span: &Range<usize>) -> FieldPath {
        fn search(table: &DeTable<'_>, span: &Range<usize>, path: &mut Vec<String>) -> bool {
            for (k, v) in table.iter() {
                path.push(k.get_ref().to_string());
                if let DeValue::Table(inner) = v.get_ref() {
                    if v.span() == *span || search(inner, span, path) {
                        return true;
                    }
                }
                path.pop();
            }
            false
        }
        let mut path = Vec::new();
        search(self.root.get_ref(), span, &mut path);
        FieldPath(path)
    }
}

/// The field named by serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}
