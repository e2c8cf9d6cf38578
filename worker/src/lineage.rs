//! Lineage: what a trained model came from. Every attempt reports the
//! SHA-256 of each file its job reads (data splits and a TorchScript
//! module), the digest of the job spec it ran, this binary's version and
//! git commit, the seed, and when training started and ended
//! (docs/MODELS.md).
//!
//! Hashing a data set is paid once per worker process: digests are cached
//! by path, size and modification time, so the trials of a sweep that all
//! read the same files do not hash them again.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use ringleader_client::limits::{MAX_LINEAGE_FILES, MAX_LINEAGE_PATHS_BYTES};
use ringleader_proto::coordinator::{FileDigest, Lineage};
use ringleader_spec::job::ModelSpec;
use ringleader_spec::JobSpec;
use sha2::{Digest, Sha256};

use crate::confine::PathRoots;

/// This binary's version (Cargo.toml) and the git commit it was built
/// from (build.rs; "unknown" when built outside a git checkout).
pub const WORKER_VERSION: &str = env!("CARGO_PKG_VERSION");
pub const WORKER_COMMIT: &str = env!("RINGLEADER_GIT_COMMIT");

/// What identifies a file's contents without reading it again.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FileKey {
    path: PathBuf,
    bytes: u64,
    modified: SystemTime,
}

/// Digests computed by this process, by [`FileKey`].
static DIGESTS: Mutex<Option<HashMap<FileKey, String>>> = Mutex::new(None);

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The size and SHA-256 of the file at `path`, from the cache when the
/// file's path, size and modification time are unchanged.
pub fn file_digest(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let metadata = file.metadata()?;
    let key = FileKey {
        path: path.to_path_buf(),
        bytes: metadata.len(),
        modified: metadata.modified()?,
    };
    let cache = || DIGESTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(digest) = cache().as_ref().and_then(|c| c.get(&key)) {
        return Ok((key.bytes, digest.clone()));
    }
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    let digest = hex(&hasher.finalize());
    cache()
        .get_or_insert_with(HashMap::new)
        .insert(key.clone(), digest.clone());
    Ok((key.bytes, digest))
}

/// Every file `spec` reads, with the field that names it, in spec order:
/// each split's files (train, validation, test), then a TorchScript module.
pub fn job_files(spec: &JobSpec) -> Vec<(String, &Path)> {
    let dataset = &spec.dataset;
    let splits = [
        ("train", Some(&dataset.train)),
        ("validation", dataset.validation.as_ref()),
        ("test", dataset.test.as_ref()),
    ];
    let mut files = Vec::new();
    for (name, split) in splits {
        let Some(split) = split else { continue };
        for (key, path) in [
            ("images", &split.images),
            ("features", &split.features),
            ("labels", &split.labels),
        ] {
            if let Some(path) = path {
                files.push((format!("dataset.{name}.{key}"), path.as_path()));
            }
        }
        for (i, path) in split.files.iter().enumerate() {
            files.push((format!("dataset.{name}.files[{i}]"), path.as_path()));
        }
    }
    if let ModelSpec::Torchscript { path } = &spec.model {
        files.push(("model.path".into(), path.as_path()));
    }
    files
}

/// The digests of the files `spec` reads, within the limits on what a
/// lineage may list (the rest are counted). A file outside `roots` is
/// never opened, and one that cannot be read is left out: training fails
/// on either and says why.
pub fn digests(spec: &JobSpec, roots: &PathRoots) -> (Vec<FileDigest>, u32) {
    let mut listed = Vec::new();
    let mut left_out = 0u32;
    let mut path_bytes = 0;
    for (field, path) in job_files(spec) {
        let Ok(resolved) = roots.resolve(&field, path) else {
            continue;
        };
        let Ok((bytes, sha256)) = file_digest(&resolved) else {
            continue;
        };
        let path = path.display().to_string();
        if listed.len() == MAX_LINEAGE_FILES || path_bytes + path.len() > MAX_LINEAGE_PATHS_BYTES {
            left_out += 1;
            continue;
        }
        path_bytes += path.len();
        listed.push(FileDigest {
            path,
            bytes,
            sha256,
        });
    }
    (listed, left_out)
}

/// An attempt's lineage: `job_json` is the spec as assigned, `digests`
/// what [`digests`] found.
pub fn report(
    seed: u64,
    job_json: &str,
    (files, files_left_out): (Vec<FileDigest>, u32),
    started_unix_ms: u64,
    ended_unix_ms: u64,
) -> Lineage {
    Lineage {
        files,
        files_left_out,
        spec_sha256: sha256_hex(job_json.as_bytes()),
        worker_version: WORKER_VERSION.into(),
        worker_commit: WORKER_COMMIT.into(),
        seed,
        started_unix_ms,
        ended_unix_ms,
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confine::{Confinement, RootKind};

    #[test]
    fn digests_are_sha256_and_cached_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.csv");
        std::fs::write(&path, b"abc").unwrap();
        let (bytes, digest) = file_digest(&path).unwrap();
        assert_eq!(bytes, 3);
        // FIPS 180-2's example: SHA-256("abc").
        assert_eq!(
            digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Same path, size and time: served from the cache, so a change that
        // keeps all three is not seen (what the cache key promises).
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, b"abd").unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(modified)
            .unwrap();
        assert_eq!(file_digest(&path).unwrap().1, digest);
        // A new size is a new key: hashed again.
        std::fs::write(&path, b"abcd").unwrap();
        assert_eq!(
            file_digest(&path).unwrap().1,
            "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
        );
    }

    #[test]
    fn a_jobs_files_outside_the_data_roots_are_not_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("in");
        std::fs::create_dir(&inside).unwrap();
        std::fs::write(inside.join("train.csv"), b"1,0\n").unwrap();
        let outside = dir.path().join("secret.csv");
        std::fs::write(&outside, b"x").unwrap();
        let toml = format!(
            "name = \"j\"\nepochs = 1\n[model]\nkind = \"mlp\"\nhidden = [4]\n\
             [dataset]\nformat = \"csv\"\nclasses = 2\n\
             train = {{ files = [\"{}\", \"{}\"] }}\n",
            inside.join("train.csv").display(),
            outside.display()
        );
        let spec = JobSpec::parse(&toml, "job.toml").unwrap();
        assert_eq!(job_files(&spec)[1].0, "dataset.train.files[1]");
        let roots = Confinement::new([&inside], [dir.path()]).unwrap().data;
        assert_eq!(roots.kind(), RootKind::Data);
        let (files, left_out) = digests(&spec, &roots);
        assert_eq!(left_out, 0);
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!(files[0].sha256, sha256_hex(b"1,0\n"));
    }
}
