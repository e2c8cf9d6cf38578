//! Replaying fuzz inputs on stable: every file under
//! `fuzz/seeds/<target>/`, `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` goes through its target's check. Included
//! as a module by the replay tests (`tests/tests/fuzz_corpora.rs`); std
//! only.
//!
//! Every input runs, even after one fails; [`replay`] then panics naming
//! each file with its panic message. An input that runs longer than
//! [`INPUT_TIMEOUT`] counts as a hang. An input that aborts the process (an
//! allocation failure) cannot be caught: with `RINGLEADER_FUZZ_REPLAY_TRACE`
//! set, each file is named on stderr before it runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Far longer than any input takes: the corpora are small inputs that each
/// run in milliseconds.
pub const INPUT_TIMEOUT: Duration = Duration::from_secs(30);

/// A target: its name (its directories' name) and its check.
pub type Target = (&'static str, fn(&[u8]));

/// Where each target's inputs live, under `fuzz/`.
pub const KINDS: &[&str] = &["seeds", "corpus", "regressions"];

/// The files directly in `dir`, sorted; none if it does not exist.
pub fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a corpus directory lists").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on `data` on its own thread: the panic message, or a hang
/// after [`INPUT_TIMEOUT`].
pub fn run(check: fn(&[u8]), data: Vec<u8>) -> Result<(), String> {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(|| check(&data)).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".into())
        });
        let _ = done.send(outcome);
    });
    match result.recv_timeout(INPUT_TIMEOUT) {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("hang: still running after {INPUT_TIMEOUT:?}")),
    }
}

/// Replays every input of every target in `targets` from `fuzz_dir`;
/// panics listing every input that failed. Each target must have inputs.
pub fn replay(fuzz_dir: &Path, targets: &[Target]) {
    let trace = std::env::var_os("RINGLEADER_FUZZ_REPLAY_TRACE").is_some();
    let mut failures = Vec::new();
    for (target, check) in targets {
        let started = Instant::now();
        let mut count = 0;
        for kind in KINDS {
            for path in inputs(&fuzz_dir.join(kind).join(target)) {
                if trace {
                    // Straight to the file descriptor, past the test
                    // harness's capture, so an abort still shows the file.
                    let _ = writeln!(std::io::stderr(), "replaying {}", path.display());
                }
                let data = std::fs::read(&path).expect("a corpus file reads");
                count += 1;
                if let Err(message) = run(*check, data) {
                    failures.push(format!("{}: {message}", path.display()));
                }
            }
        }
        println!("{target}: {count} inputs in {:.2?}", started.elapsed());
        assert!(
            count > 0,
            "fuzz target {target} has no inputs under {}",
            fuzz_dir.display()
        );
    }
    assert!(
        failures.is_empty(),
        "{} fuzz inputs fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The names of the targets under `fuzz/fuzz_targets/`.
pub fn target_names(fuzz_dir: &Path) -> Vec<String> {
    inputs(&fuzz_dir.join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect()
}
