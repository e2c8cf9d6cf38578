//! Link-time fixes for libtorch that `tch` leaves to the final binary:
//!
//! * an rpath to libtorch's directory, so the binaries run without
//!   LD_LIBRARY_PATH;
//! * `libtorch_cuda.so` forced into DT_NEEDED. Rust links with
//!   `--as-needed`, and nothing references libtorch_cuda's symbols directly
//!   (CUDA kernels register themselves from its static initialisers), so it
//!   would be dropped and `tch::Cuda::is_available()` would be false even on
//!   a GPU machine.

use std::path::Path;

fn main() {
    git_commit();
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report libtorch's directory; no rpath set");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// The commit the worker is built from, for every trial's lineage
/// (`RINGLEADER_GIT_COMMIT`; "unknown" outside a git checkout). Rebuilt
/// when HEAD moves.
fn git_commit() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=RINGLEADER_GIT_COMMIT={commit}");
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        // HEAD's log gains a line on every commit, checkout and reset.
        println!("cargo:rerun-if-changed={dir}/logs/HEAD");
        println!("cargo:rerun-if-changed={dir}/HEAD");
    }
}
