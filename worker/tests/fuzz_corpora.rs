//! Replays the data set readers' fuzz inputs on stable: every file under
//! `fuzz/{seeds,corpus,regressions}/dataset_{idx,csv,npy,safetensors}/`
//! goes through `dataset::decode` for its format, as the fuzz targets run
//! it. Here rather than in `tests/` because decoding links libtorch, which
//! this crate's test binaries find (worker/build.rs sets their rpath).

use std::path::Path;

use ringleader_spec::job::DatasetFormat;
use ringleader_worker::train::dataset::decode;

const TARGETS: [(&str, DatasetFormat); 4] = [
    ("dataset_idx", DatasetFormat::Idx),
    ("dataset_csv", DatasetFormat::Csv),
    ("dataset_npy", DatasetFormat::Npy),
    ("dataset_safetensors", DatasetFormat::Safetensors),
];

#[test]
fn every_dataset_fuzz_input_decodes_without_panicking() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut failures = Vec::new();
    let mut count = 0;
    for (target, format) in TARGETS {
        for kind in ["seeds", "corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
                continue;
            };
            let mut paths: Vec<_> = entries
                .map(|e| e.expect("a corpus directory lists").path())
                .filter(|p| p.is_file())
                .collect();
            paths.sort();
            for path in paths {
                let bytes = std::fs::read(&path).expect("a corpus file reads");
                count += 1;
                let outcome = std::panic::catch_unwind(|| {
                    if let Err(error) = decode(format, &bytes) {
                        let _ = error.to_string();
                    }
                });
                if outcome.is_err() {
                    failures.push(path.display().to_string());
                }
            }
        }
    }
    assert!(failures.is_empty(), "these inputs panicked: {failures:#?}");
    eprintln!("{count} fuzz inputs decoded");
}
