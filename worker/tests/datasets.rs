//! Dataset readers on hostile files: errors name the file and the place
//! and never quote the file; any bytes decode to a result, never a panic;
//! files outside the data roots are refused without saying whether they
//! exist. (No training here: `dataset::load` and `dataset::decode`
//! directly.)

use std::io::Write;
use std::path::{Path, PathBuf};

use ringleader_spec::job::{DatasetFormat, DatasetSpec};
use ringleader_worker::confine::{PathRoots, RootKind};
use ringleader_worker::train::dataset::{decode, load, Files};
use ringleader_worker::train::TrainError;
use serde_json::{json, Value};

mod common;
use common::npy_with_header;

/// What must never appear in an error.
const SECRET: &str = "SECRET-d41d8cd98f";

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Data roots over the temp dirs the tests write their files to.
fn temp_roots() -> PathRoots {
    PathRoots::new(RootKind::Data, [std::env::temp_dir()]).unwrap()
}

/// The error loading `dataset` gives; it must not contain [`SECRET`].
fn must_fail_without_secret(dataset: Value) -> String {
    let spec: DatasetSpec = serde_json::from_value(dataset).expect("a dataset spec");
    let message = load(&spec, &temp_roots(), Files::All, Files::All)
        .expect_err("loading must fail")
        .to_string();
    assert!(!message.contains(SECRET), "quotes the file: {message}");
    assert!(!message.contains("SECRET"), "quotes the file: {message}");
    message
}

fn csv(path: &Path) -> Value {
    json!({"format": "csv", "classes": 3, "train": {"files": [path]}})
}

#[test]
fn csv_errors_name_file_line_and_column_and_describe_the_cell() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    for (name, text, expected) in [
        (
            "feature.csv",
            format!("x,y,label\n1,2,0\n3,{SECRET},1\n"),
            format!("feature.csv:3:2: expected a number in column 2 (feature), found text of {} bytes", SECRET.len()),
        ),
        (
            "first.csv",
            format!("{SECRET},1,0\n3,4,1\n"),
            // Not a number: the first line is taken for a header, line 2 is fine.
            String::new(),
        ),
        (
            "label.csv",
            format!("1,2,0\n3,4,{SECRET}\n"),
            format!("label.csv:2:3: expected an integer label in column 3 (label), found text of {} bytes", SECRET.len()),
        ),
        (
            "fraction.csv",
            "1,2,0\n3,4,1.5\n".to_string(),
            "fraction.csv:2:3: expected an integer label in column 3 (label), found a number that is not an integer".to_string(),
        ),
        (
            "range.csv",
            "1,2,0\n3,4,7\n".to_string(),
            "range.csv:2:3: expected a label in 0..3, found one of 3 or more".to_string(),
        ),
        (
            "negative.csv",
            "1,2,0\n3,4,-1\n".to_string(),
            "negative.csv:2:3: expected a label in 0..3, found a negative one".to_string(),
        ),
        (
            "empty.csv",
            "1,2,0\n3,,1\n".to_string(),
            "empty.csv:2:2: expected a number in column 2 (feature), found an empty cell".to_string(),
        ),
        (
            "nan.csv",
            "1,2,0\n3,nan,1\n".to_string(),
            "nan.csv:2:2: expected a number in column 2 (feature), found a missing value (see dataset.csv.missing)".to_string(),
        ),
        (
            "inf.csv",
            "1,2,0\n3,-inf,1\n".to_string(),
            "inf.csv:2:2: expected a number in column 2 (feature), found a number that is not finite as f32".to_string(),
        ),
        (
            "columns.csv",
            format!("x,y,label\n1,2,0\n3,{SECRET}\n"),
            "columns.csv:3: expected 3 columns, found 2".to_string(),
        ),
        (
            "quoted.csv",
            format!("1,2,0\n\"3\",\"{SECRET}, more\",1\n"),
            format!("quoted.csv:2:2: expected a number in column 2 (feature), found text of {} bytes", SECRET.len() + 6),
        ),
    ] {
        let path = write(dir, name, text.as_bytes());
        let spec: DatasetSpec = serde_json::from_value(csv(&path)).unwrap();
        if expected.is_empty() {
            let data = load(&spec, &temp_roots(), Files::All, Files::All).expect("a header line");
            assert_eq!(data.train.len(), 1);
            continue;
        }
        let message = must_fail_without_secret(csv(&path));
        assert!(message.starts_with(&path.display().to_string()), "{message}");
        assert!(message.ends_with(&expected), "{message}\nexpected …{expected}");
    }

    // The issue's case: /etc/shadow read as CSV (with a header forced, so
    // line 1 is data); gzipped, and with bytes that are not UTF-8.
    let shadow = format!("root:{SECRET}:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n");
    let path = write(dir, "shadow", &gzip(shadow.as_bytes()));
    let message = must_fail_without_secret(
        json!({"format": "csv", "classes": 3, "train": {"files": [path], "header": false, "label_column": 0}}),
    );
    assert!(
        message.ends_with(&format!(
            "shadow:1:1: expected an integer label in column 1 (label), found text of {} bytes",
            shadow.lines().next().unwrap().len()
        )),
        "{message}"
    );
    let mut binary = b"1,2,0\n3,".to_vec();
    binary.extend([0xff, 0xfe, 0x00]);
    binary.extend(format!("{SECRET},1\n").as_bytes());
    let path = write(dir, "binary.csv", &binary);
    let message = must_fail_without_secret(csv(&path));
    assert!(
        message.ends_with(&format!(
            "binary.csv:2:2: expected a number in column 2 (feature), found {} bytes that are not UTF-8 text",
            3 + SECRET.len()
        )),
        "{message}"
    );
}

#[test]
fn npy_errors_name_the_header_key_not_its_text() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let labels = write(
        dir,
        "labels.npy",
        &npy_with_header(
            "{'descr': '|u1', 'fortran_order': False, 'shape': (2,), }",
            &[0, 1],
        ),
    );
    let features = [0u8; 8];
    for (header, expected) in [
        (
            format!("{{'descr': '{SECRET}', 'fortran_order': False, 'shape': (2, 1), }}"),
            "not a usable .npy file: header key 'descr': expected a little-endian integer type, '<f4' or '<f8'",
        ),
        (
            format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({SECRET},), }}"),
            "not a usable .npy file: header key 'shape': expected a tuple of sizes (non-negative integers)",
        ),
        (
            format!("{{'{SECRET}': '<f4', 'fortran_order': False, 'shape': (2, 1), }}"),
            "not a usable .npy file: header: the key at byte 1 of the header is not one of 'descr', 'fortran_order' and 'shape'",
        ),
        (
            format!("{{'descr': '<f4', 'fortran_order': {SECRET}, 'shape': (2, 1), }}"),
            "not a usable .npy file: header key 'fortran_order': expected a string, True, False or a tuple",
        ),
        (
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 1), }".to_string(),
            "not a usable .npy file: header key 'fortran_order': Fortran order is not supported",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 1), }".to_string(),
            "shape [3, 1] of F32 needs 12 bytes, the file holds 8",
        ),
    ] {
        let path = write(dir, "features.npy", &npy_with_header(&header, &features));
        let message = must_fail_without_secret(json!({
            "format": "npy", "classes": 2,
            "train": {"features": path, "labels": labels},
        }));
        assert!(
            message.starts_with(&format!("{}: {expected}", path.display())),
            "{message}\nexpected {expected}"
        );
    }
    let path = write(dir, "text.npy", format!("{SECRET}\n").as_bytes());
    let message = must_fail_without_secret(json!({
        "format": "npy", "classes": 2, "train": {"features": path, "labels": labels},
    }));
    assert!(
        message
            .ends_with("text.npy: not a usable .npy file: expected the magic \\x93NUMPY at byte 0"),
        "{message}"
    );
}

/// A safetensors file: its 8-byte header length, `header`, `data`.
fn safetensors_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}

#[test]
fn safetensors_errors_name_the_problem_not_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let data = [0u8; 10];
    let good_labels = r#""labels":{"dtype":"U8","shape":[2],"data_offsets":[8,10]}"#;
    for (header, expected) in [
        (
            format!(r#"{{"features":{{"dtype":"{SECRET}","shape":[2,1],"data_offsets":[0,8]}},{good_labels}}}"#),
            "not a usable safetensors file: the header is not a JSON object of tensors (dtype, shape, data_offsets)",
        ),
        (
            format!(r#"{{"{SECRET}":{{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]}},{good_labels}}}"#),
            "no tensor named \"features\" (the file holds 2 tensors)",
        ),
        (
            format!(r#"{{"{SECRET}":{{"dtype":"F32","shape":[2,1],"data_offsets":[4,8]}},{good_labels}}}"#),
            "not a usable safetensors file: a tensor's data_offsets do not follow the previous tensor's",
        ),
        (
            format!(r#"{{"features":{{"dtype":"F32","shape":[3,1],"data_offsets":[0,8]}},{good_labels}}} {SECRET}"#),
            "not a usable safetensors file: the header is not a JSON object of tensors (dtype, shape, data_offsets)",
        ),
        (
            format!(r#"{{"features":{{"dtype":"F32","shape":[3,1],"data_offsets":[0,8]}},{good_labels},"__metadata__":{{"k":"{SECRET}"}}}}"#),
            "not a usable safetensors file: a tensor's shape and dtype disagree with its data_offsets",
        ),
    ] {
        let path = write(dir, "data.safetensors", &safetensors_with_header(&header, &data));
        let message = must_fail_without_secret(json!({
            "format": "safetensors", "classes": 2, "train": {"files": [path]},
        }));
        assert!(
            message.starts_with(&format!("{}: {expected}", path.display())),
            "{message}\nexpected {expected}"
        );
    }
    let path = write(
        dir,
        "text.safetensors",
        format!("{SECRET} and more text").as_bytes(),
    );
    let message = must_fail_without_secret(json!({
        "format": "safetensors", "classes": 2, "train": {"files": [path]},
    }));
    assert!(
        message.ends_with("text.safetensors: not a usable safetensors file: the header length is over the 100 MB the format allows"),
        "{message}"
    );
}

#[test]
fn idx_errors_name_the_file_and_example() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0, 0, 2];
    images.extend([7; 16]);
    let images = write(dir, "images.idx", &images);
    let idx = |images: &Path, labels: &Path| json!({"format": "idx", "classes": 10, "train": {"images": images, "labels": labels}});

    let text = write(dir, "text.idx", &gzip(SECRET.as_bytes()));
    let message = must_fail_without_secret(idx(&text, &images));
    assert!(
        message.ends_with(
            "text.idx: expected an IDX file of unsigned bytes (magic 00 00 08 and a dimension count above 0), found other bytes"
        ),
        "{message}"
    );
    // The secret's bytes read as labels: out of range, not repeated.
    let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 4, 1, 2];
    labels.extend(&SECRET.as_bytes()[..2]);
    let labels = write(dir, "labels.idx", &labels);
    let message = must_fail_without_secret(idx(&images, &labels));
    assert!(
        message
            .ends_with("labels.idx: example 2: expected a label in 0..10, found one of 10 or more"),
        "{message}"
    );
}

/// Every prefix and many seeded mutations of a valid file of each format
/// decode to Ok or Err, never a panic. The seed is printed on failure.
#[test]
fn decode_survives_truncated_and_mutated_files() {
    let npy = npy_with_header(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
        &[0u8; 24],
    );
    let mut idx = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
    idx.extend([9; 8]);
    let safetensors = safetensors_with_header(
        r#"{"features":{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]},"labels":{"dtype":"U8","shape":[2],"data_offsets":[8,10]}}"#,
        &[0; 10],
    );
    let csv = b"a,b,label\n1,2.5,0\n\"3\",4e2,1\n".to_vec();
    let cases = [
        (DatasetFormat::Npy, npy, 6),
        (DatasetFormat::Idx, idx, 8),
        (DatasetFormat::Safetensors, safetensors, 2),
        (DatasetFormat::Csv, csv, 2),
    ];
    for (format, valid, count) in cases {
        assert_eq!(decode(format, &valid).unwrap(), count, "{format:?}");
        assert_eq!(
            decode(format, &gzip(&valid)).unwrap(),
            count,
            "{format:?} gzipped"
        );
        for end in 0..valid.len() {
            let _ = decode(format, &valid[..end]);
            let _ = decode(format, &gzip(&valid[..end])[..]);
        }
        let seed = 0x9e37_79b9_7f4a_7c15_u64 ^ format as u64;
        let mut state = seed;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..3000 {
            let mut bytes = valid.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                match next() % 4 {
                    0 => bytes[at] = next() as u8,
                    1 => bytes[at] ^= 1 << (next() % 8),
                    2 => bytes.insert(at, [b',', b'\n', b'(', b'9', 0xff][next() as usize % 5]),
                    _ => {
                        bytes.remove(at);
                        if bytes.is_empty() {
                            bytes.push(0);
                        }
                    }
                }
            }
            let result = std::panic::catch_unwind(|| decode(format, &bytes));
            assert!(
                result.is_ok(),
                "{format:?} panicked on mutation round {round} (seed {seed:#x}): {bytes:?}"
            );
        }
    }
}

/// The error loading `dataset` under `roots` gives, which must be a
/// refusal.
fn must_refuse(roots: &PathRoots, dataset: Value) -> String {
    let spec: DatasetSpec = serde_json::from_value(dataset).expect("a dataset spec");
    match load(&spec, roots, Files::All, Files::All) {
        Err(error @ TrainError::Confined(_)) => error.to_string(),
        other => panic!("must be refused: {other:?}"),
    }
}

#[test]
fn a_dataset_outside_the_roots_is_refused_alike_whether_it_exists_or_not() {
    let temp = tempfile::tempdir().unwrap();
    let base = temp.path().canonicalize().unwrap();
    let (root, outside) = (base.join("root"), base.join("outside"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let inside = write(&root, "inside.csv", b"1,0\n2,1\n");
    let existing = write(
        &outside,
        "data.csv",
        format!("1,0\n{SECRET},1\n").as_bytes(),
    );
    let missing = outside.join("missing.csv");
    std::os::unix::fs::symlink(&existing, root.join("escape.csv")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("escape-dir")).unwrap();
    let roots = PathRoots::new(RootKind::Data, [&root]).unwrap();

    // Under the root: read, and a missing file is the usual error.
    let spec: DatasetSpec = serde_json::from_value(csv(&inside)).unwrap();
    assert_eq!(
        load(&spec, &roots, Files::All, Files::All)
            .unwrap()
            .train
            .len(),
        2
    );
    let absent = root.join("absent.csv");
    let spec: DatasetSpec = serde_json::from_value(csv(&absent)).unwrap();
    let message = load(&spec, &roots, Files::All, Files::All)
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with(&format!("{}: cannot read", absent.display())),
        "{message}"
    );

    // Outside: the field, the path as given and the roots; the same words
    // for a file that exists, one that does not, a symlink out of the root
    // and a `..` out of it.
    let refusal = must_refuse(&roots, csv(&existing));
    assert_eq!(
        refusal,
        format!(
            "dataset.train.files[0] {existing:?} is not under this worker's data root ({}): \
             a worker reads data sets and TorchScript modules only under its --data-root",
            root.display()
        )
    );
    assert!(!refusal.contains("SECRET"), "{refusal}");
    let blank = |message: String, path: &Path| message.replace(&format!("{path:?}"), "<path>");
    let expected = blank(refusal, &existing);
    for path in [
        missing.clone(),
        root.join("escape.csv"),
        root.join("escape-dir/data.csv"),
        root.join("escape-dir/missing.csv"),
        root.join("../outside/data.csv"),
        root.join("../outside/missing.csv"),
    ] {
        assert_eq!(
            blank(must_refuse(&roots, csv(&path)), &path),
            expected,
            "{}",
            path.display()
        );
    }

    // Every format, every file key: the field named is the one that is out.
    for (dataset, field, path) in [
        (
            json!({"format": "idx", "classes": 3, "train": {"images": missing, "labels": inside}}),
            "dataset.train.images",
            &missing,
        ),
        (
            json!({"format": "npy", "classes": 3, "train": {"features": existing, "labels": inside}}),
            "dataset.train.features",
            &existing,
        ),
        (
            json!({"format": "safetensors", "classes": 3, "train": {"files": [existing]}}),
            "dataset.train.files[0]",
            &existing,
        ),
        (
            json!({"format": "csv", "classes": 3, "train": {"files": [inside, inside, missing]}}),
            "dataset.train.files[2]",
            &missing,
        ),
        (
            json!({"format": "csv", "classes": 3, "train": {"files": [inside]},
                   "test": {"files": [missing]}}),
            "dataset.test.files[0]",
            &missing,
        ),
    ] {
        let message = must_refuse(&roots, dataset);
        assert!(
            message.starts_with(&format!("{field} {path:?} is not under")),
            "{message}"
        );
    }
    let sharded = serde_json::from_value::<DatasetSpec>(json!({"format": "csv", "classes": 3,
        "train": {"files": [inside, existing]}}))
    .unwrap();
    assert!(
        load(&sharded, &roots, Files::Only(&[0]), Files::All).is_ok(),
        "a rank reads only its files"
    );
    let message = load(&sharded, &roots, Files::Only(&[1]), Files::All)
        .unwrap_err()
        .to_string();
    assert!(message.starts_with("dataset.train.files[1] "), "{message}");
}
