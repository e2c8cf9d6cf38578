//! An rpath to libtorch's directory, so the fuzz binaries (which link the
//! worker's data set readers, hence libtorch) run without LD_LIBRARY_PATH.
//! The same as worker/build.rs does for the worker's binaries.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
