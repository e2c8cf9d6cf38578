//! Datasets: each split is read into one `f32` features tensor (`N`
//! first) and one `i64` labels tensor. The datasets Ringleader trains on fit
//! in memory, and a preloaded tensor makes a batch one `index_select`.
//! Under file sharding a rank reads only the files dealt to it
//! ([`Files::Only`]); normalisation statistics are then combined across the
//! ranks ([`statistics`], [`normalize`]).
//!
//! Any file may be gzip-compressed (recognised by its magic bytes 1f 8b).

use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};

use ringleader_collective::ReduceOp;
use ringleader_spec::job::{DatasetFormat, DatasetSpec, Normalize, SplitSpec};
use tch::{Kind, Tensor};

use super::error::{unreadable, Position, TrainError};

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
    pub test: Option<Split>,
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
pub fn load(
    spec: &DatasetSpec,
    train_files: Files,
    test_files: Files,
) -> Result<Dataset, TrainError> {
    let train = load_split(spec, &spec.train, train_files)?.limit(spec.limit_train);
    let test = match &spec.test {
        Some(split) => Some(load_split(spec, split, test_files)?.limit(spec.limit_test)),
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
    Ok(Dataset { train, test })
}

fn load_split(spec: &DatasetSpec, split: &SplitSpec, files: Files) -> Result<Split, TrainError> {
    let classes = spec.classes;
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
            let features = idx_features(images, &read(images)?)?;
            let labels = idx_labels(labels, &read(labels)?, classes)?;
            paired(images, features, labels)
        }
        DatasetFormat::Npy => {
            single_file("npy")?;
            let features_path = required(&split.features, "npy", "features")?;
            let labels_path = required(&split.labels, "npy", "labels")?;
            let bytes = read(features_path)?;
            let features = npy(features_path, &bytes)?.features(features_path)?;
            let bytes = read(labels_path)?;
            let labels = npy(labels_path, &bytes)?.labels(labels_path, classes)?;
            paired(features_path, features, labels)
        }
        DatasetFormat::Safetensors => concat(&split.files, files, "safetensors", |path| {
            safetensors_split(path, &read(path)?, split, classes)
        }),
        DatasetFormat::Csv => concat(&split.files, files, "csv", |path| {
            csv(path, &read(path)?, split, classes)
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

/// Loads the chosen files of a split and concatenates them in order.
fn concat(
    files: &[PathBuf],
    chosen: Files,
    format: &str,
    load: impl Fn(&Path) -> Result<Split, TrainError>,
) -> Result<Split, TrainError> {
    if files.is_empty() {
        return Err(TrainError::DatasetSpec(format!(
            "a split in {format} format needs `files`"
        )));
    }
    let paths: Vec<&PathBuf> = match chosen {
        Files::All => files.iter().collect(),
        Files::Only(indices) => indices.iter().filter_map(|&i| files.get(i)).collect(),
    };
    if paths.is_empty() {
        return Err(TrainError::DatasetSpec(format!(
            "no {format} file was chosen to read"
        )));
    }
    let parts = paths
        .into_iter()
        .map(|path| load(path))
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

/// The file's bytes, gunzipped when they start with gzip's magic.
fn read(path: &Path) -> Result<Vec<u8>, TrainError> {
    let bytes = std::fs::read(path).map_err(unreadable(path))?;
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
        DatasetFormat::Csv => Ok(csv(path, &bytes, &split, classes)?.len()),
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
            value,
            classes,
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
}

/// A little-endian, C-order array borrowed from a file's bytes.
struct Array<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl<'a> Array<'a> {
    fn new(
        path: &Path,
        dtype: Dtype,
        shape: Vec<usize>,
        data: &'a [u8],
    ) -> Result<Self, TrainError> {
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
        if shape.is_empty() {
            return Err(array_error(path, "a scalar is not a dataset".into()));
        }
        Ok(Self { dtype, shape, data })
    }

    /// Features as `f32`; bytes are scaled to [0, 1].
    fn features(&self, path: &Path) -> Result<Tensor, TrainError> {
        let size: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
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
        let tensor = Tensor::f_from_data_size(self.data, &size, kind)?.f_to_kind(Kind::Float)?;
        Ok(if kind == Kind::Uint8 {
            tensor / 255.0
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
        let decode: fn(&[u8]) -> i64 = match self.dtype {
            Dtype::U8 => |b| i64::from(b[0]),
            Dtype::I8 => |b| i64::from(b[0] as i8),
            Dtype::I16 => |b| i64::from(i16::from_le_bytes([b[0], b[1]])),
            Dtype::U16 => |b| i64::from(u16::from_le_bytes([b[0], b[1]])),
            Dtype::I32 => |b| i64::from(i32::from_le_bytes(b.try_into().expect("4 bytes"))),
            Dtype::U32 => |b| i64::from(u32::from_le_bytes(b.try_into().expect("4 bytes"))),
            Dtype::I64 => |b| i64::from_le_bytes(b.try_into().expect("8 bytes")),
            // Beyond i64::MAX is out of range anyway; saturate so the error shows it.
            Dtype::U64 => |b| {
                i64::try_from(u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .unwrap_or(i64::MAX)
            },
            other => {
                return Err(array_error(
                    path,
                    format!("labels must be integers, not {other:?}"),
                ))
            }
        };
        self.data
            .chunks_exact(self.dtype.size())
            .enumerate()
            .map(|(i, bytes)| check_label(path, Position::Example(i), decode(bytes), classes))
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
/// bytes), then `ndims` big-endian u32 sizes, then the data.
fn idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, usize), TrainError> {
    let magic: [u8; 4] = match bytes.get(..4) {
        Some(m) => m.try_into().expect("4 bytes"),
        None => {
            let mut m = [0; 4];
            m[..bytes.len()].copy_from_slice(bytes);
            m
        }
    };
    if bytes.len() < 4 || magic[..3] != [0, 0, 0x08] || magic[3] == 0 {
        return Err(TrainError::IdxMagic {
            path: path.to_path_buf(),
            magic,
        });
    }
    let header = 4 + 4 * usize::from(magic[3]);
    let truncated = |expected: usize| TrainError::IdxTruncated {
        path: path.to_path_buf(),
        expected: expected as u64,
        actual: bytes.len() as u64,
    };
    let dims: Vec<usize> = bytes
        .get(4..header)
        .ok_or_else(|| truncated(header))?
        .chunks_exact(4)
        .map(|d| u32::from_be_bytes(d.try_into().expect("4 bytes")) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .and_then(|n| n.checked_add(header))
        .unwrap_or(usize::MAX);
    if bytes.len() != expected {
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
    Array::new(path, Dtype::U8, dims, &bytes[header..])?.features(path)
}

fn idx_labels(path: &Path, bytes: &[u8], classes: u32) -> Result<Vec<i64>, TrainError> {
    let (dims, header) = idx(path, bytes)?;
    Array::new(path, Dtype::U8, dims, &bytes[header..])?.labels(path, classes)
}

// ---------------------------------------------------------------- npy

/// Parses a `.npy` file (format versions 1–3): `\x93NUMPY`, version, header
/// length, then a Python dict literal with `descr`, `fortran_order`, `shape`.
fn npy<'a>(path: &Path, bytes: &'a [u8]) -> Result<Array<'a>, TrainError> {
    let bad = |what: &str| array_error(path, format!("not a usable .npy file: {what}"));
    if !bytes.starts_with(b"\x93NUMPY") || bytes.len() < 10 {
        return Err(bad("no \\x93NUMPY magic"));
    }
    let (length, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize,
            12,
        ),
        _ => return Err(bad("unknown format version")),
    };
    let header = bytes
        .get(start..start + length)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    let descr = header_value(header, "descr").ok_or_else(|| bad("no descr"))?;
    if header_value(header, "fortran_order") != Some("False") {
        return Err(bad(
            "Fortran order is not supported (save with np.ascontiguousarray)",
        ));
    }
    let shape = header_value(header, "shape")
        .ok_or_else(|| bad("no shape"))?
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse::<usize>().map_err(|_| bad("bad shape")))
        .collect::<Result<Vec<_>, _>>()?;
    let dtype = match descr.trim_start_matches(['<', '|', '=']) {
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
        _ => {
            return Err(array_error(
                path,
                format!("unsupported dtype {descr:?} (use little-endian ints, f4 or f8)"),
            ))
        }
    };
    Array::new(path, dtype, shape, &bytes[start + length..])
}

/// The raw text of `key`'s value in a `.npy` header dict: a quoted string,
/// a tuple, or a bare word.
fn header_value<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    let rest = &header[header.find(&format!("'{key}'"))? + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let end = match rest.chars().next()? {
        '\'' => return rest[1..].split('\'').next(),
        '(' => rest.find(')')? + 1,
        _ => rest.find([',', '}'])?,
    };
    Some(rest[..end].trim())
}

// ---------------------------------------------------------------- safetensors

fn safetensors_split(
    path: &Path,
    bytes: &[u8],
    split: &SplitSpec,
    classes: u32,
) -> Result<Split, TrainError> {
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| TrainError::Array {
        path: path.to_path_buf(),
        what: format!("not a safetensors file: {e}"),
    })?;
    let features = safetensor(path, &file, &split.features_key)?.features(path)?;
    let labels = safetensor(path, &file, &split.labels_key)?.labels(path, classes)?;
    paired(path, features, labels)
}

fn safetensor<'a>(
    path: &Path,
    file: &'a safetensors::SafeTensors<'a>,
    key: &str,
) -> Result<Array<'a>, TrainError> {
    use safetensors::Dtype as S;
    let view = file.tensor(key).map_err(|_| {
        array_error(
            path,
            format!("no tensor named {key:?} (it holds {:?})", file.names()),
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

/// Numeric CSV: every column a feature except `label_column`. A header is
/// recognised when the split says so or, unset, when the first line has a
/// cell that is not a number.
fn csv(path: &Path, bytes: &[u8], split: &SplitSpec, classes: u32) -> Result<Split, TrainError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| array_error(path, format!("not UTF-8 text: {e}")))?;
    let mut columns = None;
    let mut features = Vec::new();
    let mut labels = Vec::new();
    let mut first = true;
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if std::mem::take(&mut first)
            && split
                .header
                .unwrap_or_else(|| cells.iter().any(|c| c.parse::<f64>().is_err()))
        {
            continue;
        }
        let expected = *columns.get_or_insert(cells.len());
        if cells.len() != expected {
            return Err(TrainError::CsvColumns {
                path: path.to_path_buf(),
                line: line_no,
                expected,
                got: cells.len(),
            });
        }
        let label_column = usize::try_from(if split.label_column < 0 {
            expected as i64 + split.label_column
        } else {
            split.label_column
        })
        .ok()
        .filter(|&c| c < expected)
        .ok_or_else(|| {
            TrainError::DatasetSpec(format!(
                "label_column {} does not exist in {} ({expected} columns)",
                split.label_column,
                path.display()
            ))
        })?;
        for (column, cell) in cells.iter().enumerate() {
            let not_numeric = || TrainError::CsvNotNumeric {
                path: path.to_path_buf(),
                line: line_no,
                column: column + 1,
                value: cell.to_string(),
            };
            if column == label_column {
                let value = cell.parse::<i64>().map_err(|_| not_numeric())?;
                labels.push(check_label(path, Position::Line(line_no), value, classes)?);
            } else {
                features.push(cell.parse::<f32>().map_err(|_| not_numeric())?);
            }
        }
    }
    let width = columns.map_or(0, |c| c as i64 - 1);
    let features = Tensor::from_slice(&features).f_view([labels.len() as i64, width])?;
    paired(path, features, labels)
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

/// `(x - shift) / scale` on both splits, with shift and scale from the spec
/// or from the training split's `statistics` (see [`statistics`]).
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
    for split in std::iter::once(&mut dataset.train).chain(dataset.test.as_mut()) {
        split.features = (&split.features - &shift) / &scale;
    }
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
                test: None,
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
    fn npy_header_values_are_found() {
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }";
        assert_eq!(header_value(header, "descr"), Some("<f4"));
        assert_eq!(header_value(header, "fortran_order"), Some("False"));
        assert_eq!(header_value(header, "shape"), Some("(3, 2)"));
        assert_eq!(header_value(header, "nope"), None);
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
    }
}
