//! The release worker binary links what a GPU node needs: Rust links with
//! `--as-needed`, which would drop `libtorch_cuda.so` (nothing references
//! its symbols; its kernels register from static initialisers) and leave
//! `tch::Cuda::is_available()` false. worker/build.rs force-links it and
//! embeds an rpath; this checks the result with binutils' `readelf`.
//!
//! The binary comes from `RINGLEADER_BIN_DIR`, else `$CARGO_TARGET_DIR/release`,
//! else `target/release` under the workspace root.

use std::path::PathBuf;
use std::process::Command;

fn release_worker() -> PathBuf {
    let dir = std::env::var_os("RINGLEADER_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("release")))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release"));
    let worker = dir.join("ringleader-worker");
    assert!(
        worker.is_file(),
        "{} is missing: run `cargo build --release -p ringleader-worker` first, or set RINGLEADER_BIN_DIR",
        worker.display()
    );
    worker
}

/// `readelf -d` of the worker: its dynamic section.
fn dynamic_section() -> String {
    let worker = release_worker();
    let out = Command::new("readelf")
        .arg("-d")
        .arg(&worker)
        .output()
        .expect("readelf runs (binutils)");
    assert!(
        out.status.success(),
        "readelf -d {} failed",
        worker.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_release_worker_needs_libtorch_cuda_and_finds_libtorch_by_rpath() {
    let dynamic = dynamic_section();
    let needed: Vec<&str> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(
        needed.iter().any(|l| l.contains("[libtorch_cuda.so]")),
        "libtorch_cuda.so is not in NEEDED, so CUDA would be unavailable: {needed:#?}"
    );
    assert!(
        dynamic
            .lines()
            .any(|l| (l.contains("(RUNPATH)") || l.contains("(RPATH)")) && l.contains("torch")),
        "no rpath to libtorch:\n{dynamic}"
    );
}
