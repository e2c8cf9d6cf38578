//! Datasets: each split is read into one `f32` features tensor (`N`
//! first) and one `i64` labels tensor. The datasets Ringleader trains on fit
//! in memory, and a preloaded tensor makes a batch one `index_select`.
//! Under file sharding a rank reads only the files dealt to it
//! ([`Files::Only`]); normalisation statistics are then combined across the
//! ranks ([`statistics`], [`normalize`]).
//!
//! Any file may be gzip-compressed (recognised by its magic bytes 1f 8b).
//!
//! Every file is opened through the worker's data roots ([`PathRoots`]):
//! one outside them is refused before it is opened, and errors name the
//! path as the job gave it.

use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};

use ringleader_collective::ReduceOp;
use ringleader_spec::job::{DatasetFormat, DatasetSpec, Normalize, SplitSpec};
use ringleader_spec::prepare::{is_missing, Column, CsvPreparation};
use tch::{Kind, Tensor};

use super::error::{unreadable, CsvRole, Found, Position, TrainError};
use super::prepare::{Cell, CsvColumns, Normalization, Preparation};
use crate::confine::PathRoots;

/// One split, resident in memory.
#[derive(Debug)]
pub struct Split {
    /// `[N, …]`, `f32`, normalised.
    pub features: Tensor,
    /// `[N]`, `i64`, each in `0..classes`.
    pub labels: Tensor,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `limit` examples (0: all).
    fn limit(self, limit: u64) -> Self {
        let n = self.len() as i64;
        if limit == 0 || limit as i64 >= n {
            return self;
        }
        Split {
            features: self.features.narrow(0, 0, limit as i64),
            labels: self.labels.narrow(0, 0, limit as i64),
        }
    }
}

#[derive(Debug)]
pub struct Dataset {
    pub train: Split,
    /// Held out of `train` or read from `dataset.validation` (the `split`
    /// module); [`load`] leaves it empty.
    pub validation: Option<Split>,
    pub test: Option<Split>,
    /// CSV read for `dataset.csv`: cells as read (NaN where missing,
    /// category codes), waiting for [`prepare_csv`]; `None` otherwise.
    pub columns: Option<CsvColumns>,
    /// What was fitted on the training examples so far.
    pub preparation: Preparation,
}

/// Which of a split's `files` a rank reads.
#[derive(Clone, Copy, Debug)]
pub enum Files<'a> {
    All,
    /// Only these indices into the split's `files` (file sharding).
    Only(&'a [usize]),
}

/// Reads the training split and the test split, each whole or only the
/// files given, and applies the limits. Not normalised: see [`normalize`].
/// Only files under `roots` are read; any other is refused
/// ([`TrainError::Confined`]).
pub fn load(
    spec: &DatasetSpec,
    roots: &PathRoots,
    train_files: Files,
    test_files: Files,
) -> Result<Dataset, TrainError> {
    let mut columns = None;
    let train = load_split(
        spec,
        roots,
        "dataset.train",
        &spec.train,
        train_files,
        &mut columns,
    )?
    .limit(spec.limit_train);
    let test = match &spec.test {
        Some(split) => Some(
            load_split(spec, roots, "dataset.test", split, test_files, &mut columns)?
                .limit(spec.limit_test),
        ),
        None => None,
    };
    if let Some(test) = &test {
        let (a, b) = (&train.features.size()[1..], &test.features.size()[1..]);
        if a != b {
            return Err(TrainError::DatasetSpec(format!(
                "test examples have shape {b:?}, training examples {a:?}"
            )));
        }
    }
    Ok(Dataset {
        train,
        validation: None,
        test,
        columns,
        preparation: Preparation::default(),
    })
}

/// Fits `dataset.csv`'s fill values and categories on `data.train` (the
/// examples the model trains on: call it after any validation hold-out)
/// and encodes every split with them; records the fit in
/// `data.preparation`. Nothing to do for other datasets, or twice.
pub fn prepare_csv(data: &mut Dataset) -> Result<(), TrainError> {
    let Some(columns) = data.columns.take() else {
        return Ok(());
    };
    let fit = columns.fit(&data.train)?;
    for (name, split) in [
        ("train", Some(&mut data.train)),
        ("validation", data.validation.as_mut()),
        ("test", data.test.as_mut()),
    ] {
        let Some(split) = split else { continue };
        for (column, examples) in fit.apply(split)? {
            tracing::warn!(
                split = name,
                column,
                examples,
                "categories never seen in training: encoded as all zeros"
            );
        }
    }
    data.preparation.csv = Some(fit);
    Ok(())
}

/// Reads the separate validation split (`dataset.validation`), whole or
/// only the files given; `None` when the job has none.
pub fn load_validation(
    spec: &DatasetSpec,
    roots: &PathRoots,
    files: Files,
    data: &mut Dataset,
) -> Result<Option<Split>, TrainError> {
    let Some(split) = &spec.validation else {
        return Ok(None);
    };
    let validation = load_split(
        spec,
        roots,
        "dataset.validation",
        split,
        files,
        &mut data.columns,
    )?;
    let (a, b) = (
        &data.train.features.size()[1..],
        &validation.features.size()[1..],
    );
    if a != b {
        return Err(TrainError::DatasetSpec(format!(
            "validation examples have shape {b:?}, training examples {a:?}"
        )));
    }
    Ok(Some(validation))
}

/// `name`: the split's place in the job (`dataset.train`), for errors.
/// `columns`: with `dataset.csv`, the CSV layout and categories so far
/// (set by the first file read).
fn load_split(
    spec: &DatasetSpec,
    roots: &PathRoots,
    name: &str,
    split: &SplitSpec,
    files: Files,
    columns: &mut Option<CsvColumns>,
) -> Result<Split, TrainError> {
    let classes = spec.classes;
    let read = |key: &str, path: &Path| read(roots, &format!("{name}.{key}"), path);
    let single_file = |format: &str| match files {
        Files::All => Ok(()),
        Files::Only(_) => Err(TrainError::DatasetSpec(format!(
            "file sharding needs a split given as `files` (csv or safetensors), not {format}"
        ))),
    };
    match spec.format {
        DatasetFormat::Idx => {
            single_file("idx")?;
            let images = required(&split.images, "idx", "images")?;
            let labels = required(&split.labels, "idx", "labels")?;
            let features = idx_features(images, &read("images", images)?)?;
            let labels = idx_labels(labels, &read("labels", labels)?, classes)?;
            paired(images, features, labels)
        }
        DatasetFormat::Npy => {
            single_file("npy")?;
            let features_path = required(&split.features, "npy", "features")?;
            let labels_path = required(&split.labels, "npy", "labels")?;
            let bytes = read("features", features_path)?;
            let features = npy(features_path, &bytes)?.features(features_path)?;
            let bytes = read("labels", labels_path)?;
            let labels = npy(labels_path, &bytes)?.labels(labels_path, classes)?;
            paired(features_path, features, labels)
        }
        DatasetFormat::Safetensors => concat(&split.files, files, "safetensors", |i, path| {
            safetensors_split(path, &read(&format!("files[{i}]"), path)?, split, classes)
        }),
        DatasetFormat::Csv => concat(&split.files, files, "csv", |i, path| {
            let bytes = read(&format!("files[{i}]"), path)?;
            match &spec.csv {
                Some(policy) => csv(path, &bytes, split, classes, Some((policy, &mut *columns))),
                None => csv(path, &bytes, split, classes, None),
            }
        }),
    }
}

fn required<'a>(
    path: &'a Option<PathBuf>,
    format: &str,
    key: &str,
) -> Result<&'a Path, TrainError> {
    path.as_deref()
        .ok_or_else(|| TrainError::DatasetSpec(format!("a split in {format} format needs `{key}`")))
}

/// Loads the chosen files of a split and concatenates them in order;
/// `load` gets each file's index in `files` and its path.
fn concat(
    files: &[PathBuf],
    chosen: Files,
    format: &str,
    mut load: impl FnMut(usize, &Path) -> Result<Split, TrainError>,
) -> Result<Split, TrainError> {
    if files.is_empty() {
        return Err(TrainError::DatasetSpec(format!(
            "a split in {format} format needs `files`"
        )));
    }
    let paths: Vec<(usize, &PathBuf)> = match chosen {
        Files::All => files.iter().enumerate().collect(),
        Files::Only(indices) => indices
            .iter()
            .filter_map(|&i| Some((i, files.get(i)?)))
            .collect(),
    };
    if paths.is_empty() {
        return Err(TrainError::DatasetSpec(format!(
            "no {format} file was chosen to read"
        )));
    }
    let parts = paths
        .into_iter()
        .map(|(i, path)| load(i, path))
        .collect::<Result<Vec<_>, _>>()?;
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().expect("one part"));
    }
    let features: Vec<&Tensor> = parts.iter().map(|p| &p.features).collect();
    let labels: Vec<&Tensor> = parts.iter().map(|p| &p.labels).collect();
    Ok(Split {
        features: Tensor::f_cat(&features, 0)?,
        labels: Tensor::f_cat(&labels, 0)?,
    })
}

fn paired(path: &Path, features: Tensor, labels: Vec<i64>) -> Result<Split, TrainError> {
    let n = features.size()[0] as usize;
    if n != labels.len() {
        return Err(TrainError::LengthMismatch {
            path: path.to_path_buf(),
            features: n,
            labels: labels.len(),
        });
    }
    Ok(Split {
        features,
        labels: Tensor::from_slice(&labels),
    })
}

/// The bytes of the file the job's `field` names, gunzipped when they start
/// with gzip's magic; refused unless it lies under `roots`. Errors name
/// `path` as the job gave it.
fn read(roots: &PathRoots, field: &str, path: &Path) -> Result<Vec<u8>, TrainError> {
    let resolved = roots.resolve(field, path)?;
    let bytes = std::fs::read(resolved).map_err(unreadable(path))?;
    Ok(gunzip(path, Cow::Owned(bytes))?.into_owned())
}

/// `bytes`, gunzipped when they start with gzip's magic.
fn gunzip<'a>(path: &Path, bytes: Cow<'a, [u8]>) -> Result<Cow<'a, [u8]>, TrainError> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut plain = Vec::with_capacity(bytes.len().saturating_mul(4));
    flate2::read::MultiGzDecoder::new(&*bytes)
        .read_to_end(&mut plain)
        .map_err(unreadable(path))?;
    Ok(Cow::Owned(plain))
}

/// What [`decode`] calls its input in errors.
const DECODE_ORIGIN: &str = "<input>";

/// Runs the reader for `format` on in-memory `bytes` (gzip or not) and
/// returns how many values it decoded: examples for CSV and safetensors
/// (tensors `features` and `labels`), elements for IDX and `.npy` (one
/// array: integer arrays are read as labels, the rest as features). CSV
/// uses the default split: every column a feature but the last, the
/// label; labels may be any non-negative `u32`. Never panics; for fuzzing
/// the readers.
pub fn decode(format: DatasetFormat, bytes: &[u8]) -> Result<usize, TrainError> {
    let path = Path::new(DECODE_ORIGIN);
    let bytes = gunzip(path, Cow::Borrowed(bytes))?;
    let classes = u32::MAX;
    let split = SplitSpec {
        label_column: -1,
        features_key: "features".into(),
        labels_key: "labels".into(),
        ..SplitSpec::default()
    };
    match format {
        DatasetFormat::Idx => Ok(idx_features(path, &bytes)?.numel()),
        DatasetFormat::Npy => {
            let array = npy(path, &bytes)?;
            match array.dtype {
                Dtype::U8 | Dtype::F32 | Dtype::F64 => Ok(array.features(path)?.numel()),
                _ => Ok(array.labels(path, classes)?.len()),
            }
        }
        DatasetFormat::Safetensors => Ok(safetensors_split(path, &bytes, &split, classes)?.len()),
        DatasetFormat::Csv => Ok(csv(path, &bytes, &split, classes, None)?.len()),
    }
}

fn check_label(
    path: &Path,
    position: Position,
    value: i64,
    classes: u32,
) -> Result<i64, TrainError> {
    if (0..i64::from(classes)).contains(&value) {
        Ok(value)
    } else {
        Err(TrainError::LabelOutOfRange {
            path: path.to_path_buf(),
            position,
            classes,
            negative: value < 0,
        })
    }
}

// ---------------------------------------------------------------- arrays

/// Element types of `.npy`, safetensors and IDX arrays we accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dtype {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 => 1,
            Dtype::I16 | Dtype::U16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    /// A little-endian element as `i64` (`None` for floats). `u64` beyond
    /// `i64::MAX` saturates: it is out of any label range anyway.
    fn integer(self, bytes: &[u8]) -> Option<i64> {
        let array = |n| -> Option<[u8; 8]> {
            let mut out = [0; 8];
            out[..n].copy_from_slice(bytes.get(..n)?);
            Some(out)
        };
        Some(match self {
            Dtype::U8 => i64::from(*bytes.first()?),
            Dtype::I8 => i64::from(*bytes.first()? as i8),
            Dtype::I16 => i64::from(i16::from_le_bytes([*bytes.first()?, *bytes.get(1)?])),
            Dtype::U16 => i64::from(u16::from_le_bytes([*bytes.first()?, *bytes.get(1)?])),
            Dtype::I32 => i64::from(u32::from_le_bytes(array(4)?[..4].try_into().ok()?) as i32),
            Dtype::U32 => i64::from(u32::from_le_bytes(array(4)?[..4].try_into().ok()?)),
            Dtype::I64 => i64::from_le_bytes(array(8)?),
            Dtype::U64 => i64::try_from(u64::from_le_bytes(array(8)?)).unwrap_or(i64::MAX),
            Dtype::F32 | Dtype::F64 => return None,
        })
    }
}

/// A little-endian, C-order array borrowed from a file's bytes.
struct Array<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl<'a> Array<'a> {
    /// Checks `shape` against the bytes actually there before anything is
    /// allocated: the shape comes from the file and may claim anything.
    fn new(
        path: &Path,
        dtype: Dtype,
        shape: Vec<usize>,
        data: &'a [u8],
    ) -> Result<Self, TrainError> {
        if shape.is_empty() {
            return Err(array_error(path, "a scalar is not a dataset".into()));
        }
        let expected = shape
            .iter()
            .try_fold(dtype.size(), |bytes, &d| bytes.checked_mul(d));
        if expected != Some(data.len()) {
            return Err(array_error(
                path,
                format!(
                    "shape {shape:?} of {dtype:?} needs {} bytes, the file holds {}",
                    expected.map_or("more than 2^64".to_string(), |e| e.to_string()),
                    data.len()
                ),
            ));
        }
        // An empty array could claim any other dimension (and a model
        // sized from it would try to allocate that).
        if data.is_empty() {
            return Err(array_error(
                path,
                format!("holds no examples (shape {shape:?})"),
            ));
        }
        Ok(Self { dtype, shape, data })
    }

    /// Features as `f32`; bytes are scaled to [0, 1].
    fn features(&self, path: &Path) -> Result<Tensor, TrainError> {
        let size = self
            .shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|_| array_error(path, format!("shape {:?} is too large", self.shape)))?;
        let kind = match self.dtype {
            Dtype::U8 => Kind::Uint8,
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            other => {
                return Err(array_error(
                    path,
                    format!("features must be f32, f64 or u8, not {other:?}"),
                ))
            }
        };
        // `data` holds exactly the bytes `size` needs (checked in `new`).
        let tensor = Tensor::f_from_data_size(self.data, &size, kind)?.f_to_kind(Kind::Float)?;
        Ok(if kind == Kind::Uint8 {
            tensor.f_div_scalar(255.0)?
        } else {
            tensor
        })
    }

    /// Labels as `i64`, each checked against `classes`.
    fn labels(&self, path: &Path, classes: u32) -> Result<Vec<i64>, TrainError> {
        if self.shape.len() != 1 {
            return Err(array_error(
                path,
                format!(
                    "labels must be one-dimensional, not of shape {:?}",
                    self.shape
                ),
            ));
        }
        if matches!(self.dtype, Dtype::F32 | Dtype::F64) {
            return Err(array_error(
                path,
                format!("labels must be integers, not {:?}", self.dtype),
            ));
        }
        self.data
            .chunks_exact(self.dtype.size())
            .enumerate()
            .map(|(i, bytes)| {
                let value = self.dtype.integer(bytes).unwrap_or(i64::MAX);
                check_label(path, Position::Example(i), value, classes)
            })
            .collect()
    }
}

fn array_error(path: &Path, what: String) -> TrainError {
    TrainError::Array {
        path: path.to_path_buf(),
        what,
    }
}

// ---------------------------------------------------------------- IDX

/// An IDX file's dimensions and payload: magic `00 00 08 <ndims>` (unsigned
/// bytes), then `ndims` big-endian u32 sizes, then the data. The sizes are
/// checked against the file's length before anything is allocated.
fn idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, usize), TrainError> {
    let ndims = match bytes {
        [0, 0, 0x08, ndims, ..] if *ndims > 0 => usize::from(*ndims),
        _ => {
            return Err(TrainError::IdxMagic {
                path: path.to_path_buf(),
            })
        }
    };
    let header = 4 + 4 * ndims;
    let truncated = |expected: Option<usize>| TrainError::IdxTruncated {
        path: path.to_path_buf(),
        expected: expected.map_or(u64::MAX, |e| e as u64),
        actual: bytes.len() as u64,
    };
    let dims: Vec<usize> = bytes
        .get(4..header)
        .ok_or_else(|| truncated(Some(header)))?
        .chunks_exact(4)
        .map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .and_then(|n| n.checked_add(header));
    if expected != Some(bytes.len()) {
        return Err(truncated(expected));
    }
    Ok((dims, header))
}

/// Images as `[N, 1, H, W]` (a 3-D file) or `[N, …]`, scaled to [0, 1].
fn idx_features(path: &Path, bytes: &[u8]) -> Result<Tensor, TrainError> {
    let (mut dims, header) = idx(path, bytes)?;
    if dims.len() == 3 {
        dims.insert(1, 1);
    }
    Array::new(
        path,
        Dtype::U8,
        dims,
        bytes.get(header..).unwrap_or_default(),
    )?
    .features(path)
}

fn idx_labels(path: &Path, bytes: &[u8], classes: u32) -> Result<Vec<i64>, TrainError> {
    let (dims, header) = idx(path, bytes)?;
    Array::new(
        path,
        Dtype::U8,
        dims,
        bytes.get(header..).unwrap_or_default(),
    )?
    .labels(path, classes)
}

// ---------------------------------------------------------------- npy
//
// Hand-written rather than a crate's: npyz 0.9 allocates the header length
// the file claims (up to 4 GiB) before reading it, multiplies the shape
// without overflow checks (a panic where overflow checks are on, as in fuzz
// builds), and its errors quote the header; ndarray-npy needs ndarray and
// parses the header through the same Python-literal crate. The format is
// small: magic, version, header length, a Python dict literal, the data.

/// Parses a `.npy` file (format versions 1–3): `\x93NUMPY`, version, header
/// length, then a Python dict literal with `descr`, `fortran_order`, `shape`.
fn npy<'a>(path: &Path, bytes: &'a [u8]) -> Result<Array<'a>, TrainError> {
    let bad = |what: String| array_error(path, format!("not a usable .npy file: {what}"));
    let (length, start) = match bytes {
        [0x93, b'N', b'U', b'M', b'P', b'Y', 1, _, a, b, ..] => {
            (usize::from(u16::from_le_bytes([*a, *b])), 10usize)
        }
        [0x93, b'N', b'U', b'M', b'P', b'Y', 2 | 3, _, a, b, c, d, ..] => {
            (u32::from_le_bytes([*a, *b, *c, *d]) as usize, 12)
        }
        [0x93, b'N', b'U', b'M', b'P', b'Y', ..] => {
            return Err(bad("expected format version 1, 2 or 3".into()))
        }
        _ => return Err(bad("expected the magic \\x93NUMPY at byte 0".into())),
    };
    // Borrowed, never allocated: a header length past the end is an error.
    let header = start
        .checked_add(length)
        .and_then(|end| bytes.get(start..end))
        .ok_or_else(|| {
            bad(format!(
                "the header claims {length} bytes, the file holds {} after byte {start}",
                bytes.len().saturating_sub(start)
            ))
        })?;
    let header = NpyHeader::parse(header).map_err(bad)?;
    if header.fortran_order {
        return Err(bad(
            "header key 'fortran_order': Fortran order is not supported \
             (save with np.ascontiguousarray)"
                .into(),
        ));
    }
    Array::new(
        path,
        header.dtype,
        header.shape,
        bytes.get(start + length..).unwrap_or_default(),
    )
}

/// The three keys of a `.npy` header.
#[derive(Debug, PartialEq)]
struct NpyHeader {
    dtype: Dtype,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A value in a `.npy` header dict.
#[derive(Debug, PartialEq)]
enum PyValue<'h> {
    Str(&'h str),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// The header's bytes, read left to right.
struct HeaderText<'h> {
    text: &'h [u8],
    at: usize,
}

impl<'h> HeaderText<'h> {
    fn skip_space(&mut self) {
        while self.text.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    /// Consumes `byte` (after white space) if it is next.
    fn eat(&mut self, byte: u8) -> bool {
        self.skip_space();
        let found = self.text.get(self.at) == Some(&byte);
        if found {
            self.at += 1;
        }
        found
    }

    fn expect(&mut self, byte: u8, what: &str) -> Result<(), String> {
        if self.eat(byte) {
            Ok(())
        } else {
            Err(self.error(what))
        }
    }

    /// Where parsing stopped, without quoting what is there.
    fn error(&self, what: &str) -> String {
        format!("header: expected {what} at byte {} of the header", self.at)
    }

    /// A quoted string (no escapes: none of the values we read has one).
    fn string(&mut self) -> Option<&'h str> {
        self.skip_space();
        let quote = *self
            .text
            .get(self.at)
            .filter(|&&q| q == b'\'' || q == b'"')?;
        let rest = self.text.get(self.at + 1..)?;
        let end = rest.iter().position(|&b| b == quote)?;
        let text = std::str::from_utf8(&rest[..end]).ok()?;
        self.at += end + 2;
        Some(text)
    }

    fn word(&mut self) -> &'h [u8] {
        self.skip_space();
        let start = self.at;
        while self
            .text
            .get(self.at)
            .is_some_and(u8::is_ascii_alphanumeric)
        {
            self.at += 1;
        }
        &self.text[start..self.at]
    }

    fn value(&mut self, key: &str) -> Result<PyValue<'h>, String> {
        let wrong = |what: &str| format!("header key '{key}': expected {what}");
        self.skip_space();
        match self.text.get(self.at) {
            Some(b'\'' | b'"') => self
                .string()
                .map(PyValue::Str)
                .ok_or_else(|| wrong("a closed string")),
            Some(b'(') => {
                self.at += 1;
                let mut dims = Vec::new();
                loop {
                    if self.eat(b')') {
                        return Ok(PyValue::Tuple(dims));
                    }
                    let digits = self.word();
                    let dim = std::str::from_utf8(digits)
                        .ok()
                        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|d| d.parse::<usize>().ok())
                        .ok_or_else(|| wrong("a tuple of sizes (non-negative integers)"))?;
                    dims.push(dim);
                    if !self.eat(b',') {
                        self.expect(b')', &wrong("',' or ')' in the shape"))?;
                        return Ok(PyValue::Tuple(dims));
                    }
                }
            }
            _ => match self.word() {
                b"True" => Ok(PyValue::Bool(true)),
                b"False" => Ok(PyValue::Bool(false)),
                _ => Err(wrong("a string, True, False or a tuple")),
            },
        }
    }
}

impl NpyHeader {
    /// Parses the dict literal; errors name the key or the byte offset in
    /// the header where it went wrong, never the header's text.
    fn parse(text: &[u8]) -> Result<Self, String> {
        let mut header = HeaderText { text, at: 0 };
        header.expect(b'{', "'{' (a Python dict literal)")?;
        let (mut descr, mut fortran_order, mut shape) = (None, None, None);
        while !header.eat(b'}') {
            header.skip_space();
            let key_at = header.at;
            let key = header
                .string()
                .ok_or_else(|| header.error("a quoted key or '}'"))?;
            let (slot, name) = match key {
                "descr" => (&mut descr, "descr"),
                "fortran_order" => (&mut fortran_order, "fortran_order"),
                "shape" => (&mut shape, "shape"),
                _ => {
                    return Err(format!(
                        "header: the key at byte {key_at} of the header is not one of \
                         'descr', 'fortran_order' and 'shape'"
                    ))
                }
            };
            header.expect(b':', &format!("':' after key '{name}'"))?;
            let value = header.value(name)?;
            if slot.replace(value).is_some() {
                return Err(format!("header key '{name}' appears twice"));
            }
            if !header.eat(b',') {
                header.expect(b'}', "',' or '}'")?;
                break;
            }
        }
        header.skip_space();
        if header.at != text.len() {
            return Err(header.error("only white space after the dict"));
        }
        let missing = |key: &str| format!("header key '{key}' is missing");
        let dtype = match descr.ok_or_else(|| missing("descr"))? {
            PyValue::Str(descr) => npy_dtype(descr).ok_or_else(|| {
                "header key 'descr': expected a little-endian integer type, '<f4' or '<f8'"
                    .to_string()
            })?,
            _ => return Err("header key 'descr': expected a type string such as '<f4'".into()),
        };
        let fortran_order = match fortran_order.ok_or_else(|| missing("fortran_order"))? {
            PyValue::Bool(b) => b,
            _ => return Err("header key 'fortran_order': expected True or False".into()),
        };
        let shape = match shape.ok_or_else(|| missing("shape"))? {
            PyValue::Tuple(shape) => shape,
            _ => return Err("header key 'shape': expected a tuple of sizes".into()),
        };
        Ok(NpyHeader {
            dtype,
            fortran_order,
            shape,
        })
    }
}

/// Our element type for a `.npy` `descr`: little-endian (or byte-sized)
/// integers, `f4` and `f8`.
fn npy_dtype(descr: &str) -> Option<Dtype> {
    let (order, code) = descr.split_at_checked(1)?;
    if !matches!(order, "<" | "|" | "=") {
        return None;
    }
    Some(match code {
        "u1" => Dtype::U8,
        "i1" => Dtype::I8,
        "i2" => Dtype::I16,
        "u2" => Dtype::U16,
        "i4" => Dtype::I32,
        "u4" => Dtype::U32,
        "i8" => Dtype::I64,
        "u8" => Dtype::U64,
        "f4" => Dtype::F32,
        "f8" => Dtype::F64,
        _ => return None,
    })
}

// ---------------------------------------------------------------- safetensors

fn safetensors_split(
    path: &Path,
    bytes: &[u8],
    split: &SplitSpec,
    classes: u32,
) -> Result<Split, TrainError> {
    // The crate checks the header length against the bytes before reading
    // it, and the tensors' sizes against their offsets.
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        array_error(
            path,
            format!("not a usable safetensors file: {}", safetensors_error(&e)),
        )
    })?;
    let features = safetensor(path, &file, &split.features_key)?.features(path)?;
    let labels = safetensor(path, &file, &split.labels_key)?.labels(path, classes)?;
    paired(path, features, labels)
}

/// The crate's error in our words: its own messages may quote the header
/// (JSON errors, tensor names).
fn safetensors_error(error: &safetensors::SafeTensorError) -> &'static str {
    use safetensors::SafeTensorError as E;
    match error {
        E::HeaderTooSmall => "expected an 8-byte header length at byte 0",
        E::HeaderTooLarge => "the header length is over the 100 MB the format allows",
        E::InvalidHeaderLength => "the header length runs past the end of the file",
        E::InvalidHeader(_) => "the header is not UTF-8 text",
        E::InvalidHeaderStart | E::InvalidHeaderDeserialization(_) | E::JsonError(_) => {
            "the header is not a JSON object of tensors (dtype, shape, data_offsets)"
        }
        E::InvalidOffset(_) => "a tensor's data_offsets do not follow the previous tensor's",
        E::TensorInvalidInfo | E::InvalidTensorView(..) | E::MisalignedSlice => {
            "a tensor's shape and dtype disagree with its data_offsets"
        }
        E::ValidationOverflow => "a tensor's shape is too large",
        E::MetadataIncompleteBuffer => "the tensors do not cover the data exactly",
        E::TensorNotFound(_) => "a tensor is missing",
        _ => "the file is not valid",
    }
}

fn safetensor<'a>(
    path: &Path,
    file: &'a safetensors::SafeTensors<'a>,
    key: &str,
) -> Result<Array<'a>, TrainError> {
    use safetensors::Dtype as S;
    // `key` comes from the job spec; the names in the file are not repeated.
    let view = file.tensor(key).map_err(|_| {
        array_error(
            path,
            format!(
                "no tensor named {key:?} (the file holds {} tensors)",
                file.len()
            ),
        )
    })?;
    let dtype = match view.dtype() {
        S::U8 => Dtype::U8,
        S::I8 => Dtype::I8,
        S::I16 => Dtype::I16,
        S::U16 => Dtype::U16,
        S::I32 => Dtype::I32,
        S::U32 => Dtype::U32,
        S::I64 => Dtype::I64,
        S::U64 => Dtype::U64,
        S::F32 => Dtype::F32,
        S::F64 => Dtype::F64,
        other => {
            return Err(array_error(
                path,
                format!("tensor {key:?} has unsupported dtype {other:?}"),
            ))
        }
    };
    Array::new(path, dtype, view.shape().to_vec(), view.data())
}

// ---------------------------------------------------------------- CSV

/// Numeric CSV (the `csv` crate; cells trimmed, `"` quoting, blank lines
/// skipped): every column a feature except `label_column`. A header is
/// recognised when the split says so or, unset, when the first record has
/// a cell that is not a number. A missing cell (see
/// [`ringleader_spec::prepare::MISSING_MARKERS`]) is an error.
///
/// `prepared`: the job's `dataset.csv` and the layout so far. Then
/// categorical columns are read as category codes, and, unless missing
/// cells are errors, a missing cell is read as NaN (see
/// [`prepare_csv`]); a header is also recognised when a categorical
/// column is named (and otherwise only by the cells of the other columns).
fn csv(
    path: &Path,
    bytes: &[u8],
    split: &SplitSpec,
    classes: u32,
    mut prepared: Option<(&CsvPreparation, &mut Option<CsvColumns>)>,
) -> Result<Split, TrainError> {
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(::csv::Trim::All)
        .from_reader(bytes);
    let mut record = ::csv::ByteRecord::new();
    let mut layout: Option<(usize, usize)> = None; // (columns, label column)
    let mut header: Option<Vec<String>> = None;
    let mut features = Vec::new();
    let mut labels = Vec::new();
    let mut first = true;
    loop {
        let more = reader.read_byte_record(&mut record).map_err(|e| {
            let line = e.position().map_or(0, |p| p.line() as usize);
            array_error(path, format!("line {line}: cannot read CSV"))
        })?;
        if !more {
            break;
        }
        let line = record.position().map_or(0, |p| p.line() as usize);
        // A line of white space is one empty cell: skip it as blank.
        if record.len() == 1 && record[0].is_empty() {
            continue;
        }
        if std::mem::take(&mut first) && is_header(&record, split, prepared.as_ref().map(|p| p.0)) {
            header = Some(
                record
                    .iter()
                    .map(|cell| String::from_utf8_lossy(cell).into_owned())
                    .collect(),
            );
            continue;
        }
        let (columns, label_column) = match layout {
            Some(layout) => layout,
            None => {
                let width = record.len();
                let label = label_column(path, split, width)?;
                if let Some((policy, columns)) = &mut prepared {
                    match columns {
                        Some(columns) => columns.check(path, header.as_deref(), width, label)?,
                        None => {
                            **columns =
                                Some(CsvColumns::new(policy, path, header.take(), width, label)?)
                        }
                    }
                }
                *layout.insert((width, label))
            }
        };
        if record.len() != columns {
            return Err(TrainError::CsvColumns {
                path: path.to_path_buf(),
                line,
                expected: columns,
                found: record.len(),
            });
        }
        for (index, cell) in record.iter().enumerate() {
            let column = index + 1;
            let bad = |role, found| TrainError::CsvCell {
                path: path.to_path_buf(),
                line,
                column,
                role,
                found,
            };
            if index == label_column {
                let value = label(cell).map_err(|found| bad(CsvRole::Label, found))?;
                let position = Position::Cell { line, column };
                labels.push(check_label(path, position, value, classes)?);
                continue;
            }
            let feature = if index < label_column {
                index
            } else {
                index - 1
            };
            let fitting = prepared.as_mut().and_then(|(_, columns)| columns.as_mut());
            let role = match fitting.as_ref().map(|columns| columns.kind(feature)) {
                Some(Cell::Category) => CsvRole::Category,
                _ => CsvRole::Feature,
            };
            let value = if is_missing(cell) {
                match &fitting {
                    Some(columns) if !columns.missing_is_error() => f32::NAN,
                    _ if cell.is_empty() => return Err(bad(role, Found::Empty)),
                    _ => return Err(bad(role, Found::Missing)),
                }
            } else {
                match (role, fitting) {
                    (CsvRole::Category, Some(columns)) => columns.code(feature, cell),
                    _ => number::<f32>(cell).and_then(|x| {
                        if x.is_finite() {
                            Ok(x)
                        } else {
                            Err(Found::NotFinite)
                        }
                    }),
                }
                .map_err(|found| bad(role, found))?
            };
            features.push(value);
        }
    }
    let width = layout.map_or(0, |(columns, _)| columns as i64 - 1);
    let features = Tensor::from_slice(&features).f_view([labels.len() as i64, width])?;
    paired(path, features, labels)
}

/// Whether a file's first record is a header: as the split says, else
/// when a categorical column is named, else when a cell (outside the
/// categorical columns) is neither a number nor a missing value.
fn is_header(
    record: &::csv::ByteRecord,
    split: &SplitSpec,
    prepared: Option<&CsvPreparation>,
) -> bool {
    if let Some(header) = split.header {
        return header;
    }
    let categorical: Vec<usize> = match prepared {
        None => Vec::new(),
        Some(policy)
            if policy
                .categorical
                .iter()
                .any(|c| matches!(c, Column::Name(_))) =>
        {
            return true
        }
        Some(policy) => policy
            .categorical
            .iter()
            .filter_map(|c| c.resolve(None, record.len()))
            .collect(),
    };
    record.iter().enumerate().any(|(index, cell)| {
        !categorical.contains(&index)
            && number::<f64>(cell).is_err()
            && !(prepared.is_some() && is_missing(cell))
    })
}

/// The label column's index among `columns`.
fn label_column(path: &Path, split: &SplitSpec, columns: usize) -> Result<usize, TrainError> {
    let index = if split.label_column < 0 {
        (columns as i64).checked_add(split.label_column)
    } else {
        Some(split.label_column)
    };
    index
        .and_then(|c| usize::try_from(c).ok())
        .filter(|&c| c < columns)
        .ok_or_else(|| {
            TrainError::DatasetSpec(format!(
                "label_column {} does not exist in {} ({columns} columns)",
                split.label_column,
                path.display()
            ))
        })
}

/// A cell as a number, or what it holds instead.
fn number<T: std::str::FromStr>(cell: &[u8]) -> Result<T, Found> {
    let text = std::str::from_utf8(cell).map_err(|_| Found::NotUtf8 { bytes: cell.len() })?;
    if text.is_empty() {
        return Err(Found::Empty);
    }
    text.parse::<T>()
        .map_err(|_| Found::Text { bytes: cell.len() })
}

/// A cell as an integer label, or what it holds instead.
fn label(cell: &[u8]) -> Result<i64, Found> {
    number::<i64>(cell).map_err(|found| match (found, number::<f64>(cell)) {
        (Found::Text { .. }, Ok(x)) if x.is_finite() && x.fract() == 0.0 => {
            Found::IntegerOutOfRange
        }
        (Found::Text { .. }, Ok(_)) => Found::NotInteger,
        (found, _) => found,
    })
}

// ---------------------------------------------------------------- normalisation

/// What `standard` or `minmax` normalisation needs from the training split,
/// per feature, as one `f64` tensor: ranks that hold different parts of the
/// split combine theirs with one all-reduce of the returned op. `None` when
/// the normalisation needs no statistics.
///
/// standard: `[Σx, Σx², n]` (summed); minmax: `[max, −min]` (maximum).
pub fn statistics(
    kind: &Normalize,
    train: &Split,
) -> Result<Option<(Tensor, ReduceOp)>, TrainError> {
    let x = train.features.f_flatten(1, -1)?;
    let double = |t: Tensor| t.f_to_kind(Kind::Double);
    Ok(match kind {
        Normalize::None | Normalize::Fixed { .. } => None,
        Normalize::Standard => {
            // In f64, a block of rows at a time: no f64 copy of the split.
            let features = x.size()[1];
            let mut sum = Tensor::zeros([features], (Kind::Double, x.device()));
            let mut sum_of_squares = sum.zeros_like();
            for block in x.f_split(STATISTICS_BLOCK_ROWS, 0)? {
                let block = double(block)?;
                let _ = sum.f_add_(&block.f_sum_dim_intlist(0, false, Kind::Double)?)?;
                let _ = sum_of_squares.f_add_(&block.f_square()?.f_sum_dim_intlist(
                    0,
                    false,
                    Kind::Double,
                )?)?;
            }
            let count = Tensor::from_slice(&[train.len() as f64]).f_to_device(x.device())?;
            Some((
                Tensor::f_cat(&[sum, sum_of_squares, count], 0)?,
                ReduceOp::Sum,
            ))
        }
        Normalize::MinMax => {
            let extremes = [
                double(x.f_amax(0, false)?)?,
                double(x.f_amin(0, false)?.f_neg()?)?,
            ];
            Some((Tensor::f_cat(&extremes, 0)?, ReduceOp::Max))
        }
    })
}

/// Rows per block when summing the training split in f64.
const STATISTICS_BLOCK_ROWS: i64 = 4096;

/// `(x - shift) / scale` on every split, with shift and scale from the spec
/// or from the training split's `statistics` (see [`statistics`]);
/// recorded in `dataset.preparation`.
pub fn normalize(
    kind: &Normalize,
    statistics: Option<&Tensor>,
    dataset: &mut Dataset,
) -> Result<(), TrainError> {
    let example = &dataset.train.features.size()[1..];
    let features: i64 = example.iter().product();
    let per_feature = |t: Tensor| -> Result<Tensor, TrainError> {
        let mut shape = vec![1];
        shape.extend_from_slice(example);
        Ok(t.f_to_kind(Kind::Float)?.f_view(shape.as_slice())?)
    };
    let needed = || TrainError::DatasetSpec("normalisation statistics are missing".into());
    let (shift, scale) = match kind {
        Normalize::None => return Ok(()),
        Normalize::Fixed { mean, std } => (Tensor::from(*mean as f32), Tensor::from(*std as f32)),
        Normalize::Standard => {
            let stats = statistics.ok_or_else(needed)?;
            let count = stats.f_narrow(0, 2 * features, 1)?;
            let mean = stats.f_narrow(0, 0, features)? / &count;
            let variance = (stats.f_narrow(0, features, features)? / &count - mean.f_square()?)
                .f_clamp_min(0.0)?;
            let std = variance.f_sqrt()?.f_clamp_min(1e-12)?;
            (per_feature(mean)?, per_feature(std)?)
        }
        Normalize::MinMax => {
            let stats = statistics.ok_or_else(needed)?;
            let max = stats.f_narrow(0, 0, features)?;
            let min = stats.f_narrow(0, features, features)?.f_neg()?;
            let range = (max - &min).f_clamp_min(1e-12)?;
            (per_feature(min)?, per_feature(range)?)
        }
    };
    for split in std::iter::once(&mut dataset.train)
        .chain(dataset.validation.as_mut())
        .chain(dataset.test.as_mut())
    {
        split.features = (&split.features - &shift) / &scale;
    }
    let values = |t: &Tensor| Vec::<f32>::try_from(t.f_contiguous()?.f_view([-1])?);
    dataset.preparation.normalize = Some(Normalization {
        kind: match kind {
            Normalize::None | Normalize::Fixed { .. } => "fixed",
            Normalize::Standard => "standard",
            Normalize::MinMax => "minmax",
        },
        shift: values(&shift)?,
        scale: values(&scale)?,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_of_parts_combine_into_those_of_the_whole() {
        let features = Tensor::randn([40, 2, 3], (Kind::Float, tch::Device::Cpu)) * 3.0 + 1.0;
        let part = |start: i64, len: i64| Split {
            features: features.narrow(0, start, len),
            labels: Tensor::zeros([len], (Kind::Int64, tch::Device::Cpu)),
        };
        for kind in [Normalize::Standard, Normalize::MinMax] {
            let (whole, op) = statistics(&kind, &part(0, 40)).unwrap().unwrap();
            let (a, _) = statistics(&kind, &part(0, 25)).unwrap().unwrap();
            let (b, _) = statistics(&kind, &part(25, 15)).unwrap().unwrap();
            let combined = match op {
                ReduceOp::Sum => &a + &b,
                ReduceOp::Max => a.maximum(&b),
                other => panic!("{other:?}"),
            };
            assert!(combined.allclose(&whole, 1e-9, 1e-9, false), "{kind:?}");
            let mut dataset = Dataset {
                train: part(0, 40),
                validation: None,
                test: None,
                columns: None,
                preparation: Preparation::default(),
            };
            normalize(&kind, Some(&combined), &mut dataset).unwrap();
            let x = &dataset.train.features;
            let (low, high) = (x.amin(0, false), x.amax(0, false));
            match kind {
                Normalize::Standard => {
                    let (std, mean) = x.std_mean_dim(0, false, false);
                    assert!(mean.abs().max().double_value(&[]) < 1e-5);
                    assert!((std - 1.0).abs().max().double_value(&[]) < 1e-4);
                }
                _ => {
                    assert!(low.abs().max().double_value(&[]) < 1e-6);
                    assert!((high - 1.0).abs().max().double_value(&[]) < 1e-6);
                }
            }
        }
    }

    #[test]
    fn npy_headers_parse_as_numpy_writes_them_and_errors_name_the_key() {
        let parse = |text: &str| NpyHeader::parse(text.as_bytes());
        let numpy = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }          \n";
        assert_eq!(
            parse(numpy),
            Ok(NpyHeader {
                dtype: Dtype::F32,
                fortran_order: false,
                shape: vec![3, 2]
            })
        );
        let other = r#"{"shape": (7,), "fortran_order": True, "descr": "|u1"}"#;
        assert_eq!(
            parse(other),
            Ok(NpyHeader {
                dtype: Dtype::U8,
                fortran_order: true,
                shape: vec![7]
            })
        );
        assert_eq!(
            parse("{'descr': '<i8', 'fortran_order': False, 'shape': ()}").map(|h| h.shape),
            Ok(vec![])
        );
        for (text, expected) in [
            ("{'descr': '>f4', 'fortran_order': False, 'shape': (3,)}", "header key 'descr': expected a little-endian"),
            ("{'descr': 'SECRET', 'fortran_order': False, 'shape': (3,)}", "header key 'descr'"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (SECRET,)}", "header key 'shape': expected a tuple of sizes"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (-3,)}", "header key 'shape'"),
            ("{'descr': '<f4', 'fortran_order': 0, 'shape': (3,)}", "header key 'fortran_order'"),
            ("{'descr': '<f4', 'fortran_order': False}", "header key 'shape' is missing"),
            ("{'descr': '<f4', 'descr': '<f4'}", "header key 'descr' appears twice"),
            ("{'SECRET': 1}", "header: the key at byte 1 of the header is not one of 'descr', 'fortran_order' and 'shape'"),
            ("SECRET", "header: expected '{' (a Python dict literal) at byte 0"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (3,)} SECRET", "only white space after the dict"),
            ("{'descr': '<f4", "header key 'descr': expected a closed string"),
            ("{'descr': '<f4', 'shape': (99999999999999999999999,)}", "header key 'shape'"),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
            assert!(!error.contains("SECRET"), "{error}");
        }
    }

    #[test]
    fn csv_cells_are_described_not_quoted() {
        assert_eq!(number::<f32>(b"1.5"), Ok(1.5));
        assert_eq!(number::<f32>(b"SECRET"), Err(Found::Text { bytes: 6 }));
        assert_eq!(number::<f32>(b""), Err(Found::Empty));
        assert_eq!(number::<f32>(b"\xff\xfe"), Err(Found::NotUtf8 { bytes: 2 }));
        assert_eq!(label(b"2"), Ok(2));
        assert_eq!(label(b"2.5"), Err(Found::NotInteger));
        assert_eq!(label(b"1e30"), Err(Found::IntegerOutOfRange));
        assert_eq!(label(b"nan"), Err(Found::NotInteger));
        assert_eq!(label(b"two"), Err(Found::Text { bytes: 3 }));
    }

    #[test]
    fn integer_elements_decode_little_endian() {
        assert_eq!(Dtype::I8.integer(&[0xff]), Some(-1));
        assert_eq!(Dtype::I16.integer(&[0xfe, 0xff]), Some(-2));
        assert_eq!(Dtype::U16.integer(&[0xfe, 0xff]), Some(65534));
        assert_eq!(
            Dtype::I32.integer(&[1, 0, 0, 0x80]),
            Some(i64::from(i32::MIN) + 1)
        );
        assert_eq!(Dtype::U32.integer(&[0xff; 4]), Some(i64::from(u32::MAX)));
        assert_eq!(Dtype::I64.integer(&[0xff; 8]), Some(-1));
        assert_eq!(Dtype::U64.integer(&[0xff; 8]), Some(i64::MAX));
        assert_eq!(Dtype::I32.integer(&[1, 2]), None);
        assert_eq!(Dtype::F32.integer(&[0; 4]), None);
    }

    #[test]
    fn a_short_idx_file_is_truncated_and_a_text_file_has_bad_magic() {
        let path = Path::new("x.idx");
        let bytes = [0, 0, 8, 1, 0, 0, 0, 5, 1, 2];
        assert!(matches!(
            idx(path, &bytes),
            Err(TrainError::IdxTruncated {
                expected: 13,
                actual: 10,
                ..
            })
        ));
        assert!(matches!(
            idx(path, b"hello"),
            Err(TrainError::IdxMagic { .. })
        ));
        // 2^32-1 cubed overflows: an error, not a wrapped size.
        let mut huge = vec![0, 0, 8, 3];
        huge.extend([0xff; 12]);
        assert!(matches!(
            idx(path, &huge),
            Err(TrainError::IdxTruncated {
                expected: u64::MAX,
                ..
            })
        ));
    }
}
