//! Confined paths: a job spec comes from any client, yet names files the
//! worker opens (data sets, TorchScript modules) and a directory it writes
//! (checkpoints). The worker reads only under its data roots
//! (`--data-root`) and writes only under its checkpoint root
//! (`--checkpoint-root`); anything else is refused.
//!
//! A refusal must not tell the client whether the path exists (a worker
//! often runs as root, and "no such file" vs "outside the roots" would
//! probe its disk). So a path is resolved without ever touching anything
//! outside the roots:
//!
//! ```text
//!   path ──▶ absolute (cwd), `.`/`..` folded lexically
//!        ──▶ not under a root?            refused   (no file system access)
//!        ──▶ walk it component by component from `/`, like the kernel:
//!              each step must stay under a root or on the way to one
//!              (an ancestor of a root), else refused before it is looked at;
//!              a symlink is read and its target walked the same way;
//!              a component that is missing counts as a directory (what
//!              creating it would make; opening it fails as usual)
//!        ──▶ the end is under a root?     the resolved path, to open
//!                                         else refused
//! ```
//!
//! Everything the walk looks at lies under a root or on the way to one, so
//! whether a path is refused depends on nothing outside them: an existing
//! file outside, a missing one, a symlink escaping a root and a `..` escape
//! all get the same message. Callers open the returned path (free of
//! symlinks when it was checked) and name the path as the user gave it in
//! any error.
//!
//! Roots are trusted configuration: a root that is itself a symlink is
//! followed. They should be writable only by the worker's user (someone
//! who can replace a directory under a root by a symlink between the check
//! and the open can redirect that open).

use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

/// What a set of roots guards; it words the refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootKind {
    /// Read: data sets and TorchScript modules (`--data-root`).
    Data,
    /// Written: checkpoints (`--checkpoint-root`).
    Checkpoint,
}

impl RootKind {
    fn describe(self, several: bool) -> &'static str {
        match (self, several) {
            (RootKind::Data, true) => "data roots",
            (RootKind::Data, false) => "data root",
            (RootKind::Checkpoint, true) => "checkpoint roots",
            (RootKind::Checkpoint, false) => "checkpoint root",
        }
    }

    fn rule(self) -> &'static str {
        match self {
            RootKind::Data => {
                "a worker reads data sets and TorchScript modules only under its --data-root"
            }
            RootKind::Checkpoint => "a worker writes checkpoints only under its --checkpoint-root",
        }
    }
}

/// The directories one kind of access is confined to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRoots {
    kind: RootKind,
    /// Absolute and lexically normal (no `.`, `..` or trailing slash).
    roots: Vec<PathBuf>,
}

/// Where a worker may read and write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confinement {
    pub data: PathRoots,
    pub checkpoints: PathRoots,
}

impl Confinement {
    /// Data under `data`, checkpoints under `checkpoints`.
    pub fn new(
        data: impl IntoIterator<Item = impl AsRef<Path>>,
        checkpoints: impl IntoIterator<Item = impl AsRef<Path>>,
    ) -> io::Result<Self> {
        Ok(Self {
            data: PathRoots::new(RootKind::Data, data)?,
            checkpoints: PathRoots::new(RootKind::Checkpoint, checkpoints)?,
        })
    }
}

/// `--data-root` and `--checkpoint-root`, shared by the worker and
/// `ringleader-export` (which reads checkpoints under the same rules).
#[derive(Clone, Debug, clap::Args)]
pub struct RootArgs {
    /// Directories jobs may read data sets and TorchScript modules from
    /// (repeat the flag, or comma-separate in the env var). Any other path
    /// a job names is refused.
    #[arg(
        long = "data-root",
        env = "RINGLEADER_DATA_ROOTS",
        value_delimiter = ',',
        default_values = ["/usr/share/datasets", "/var/tmp/ringleader"]
    )]
    pub data_roots: Vec<PathBuf>,

    /// The directory checkpoints may be written (and read) under; a trial
    /// whose checkpoint directory lies elsewhere fails. Default: the
    /// coordinator's default --checkpoint-dir, <tmp>/ringleader-checkpoints.
    #[arg(long, env = "RINGLEADER_CHECKPOINT_ROOT")]
    pub checkpoint_root: Option<PathBuf>,
}

impl RootArgs {
    pub fn confinement(&self) -> io::Result<Confinement> {
        let checkpoint_root = self
            .checkpoint_root
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("ringleader-checkpoints"));
        Confinement::new(&self.data_roots, [&checkpoint_root]).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot make --data-root and --checkpoint-root absolute: {e}"),
            )
        })
    }
}

/// A path that is not under the roots, or that cannot be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// Refused: the same for a path that exists and one that does not.
    #[error(
        "{field} {path:?} is not under this worker's {} ({}): {}",
        kind.describe(roots.len() != 1),
        list(roots),
        kind.rule()
    )]
    Outside {
        /// The job field that named it (`dataset.train.images`).
        field: String,
        /// As the user gave it.
        path: PathBuf,
        kind: RootKind,
        roots: Vec<PathBuf>,
    },
    /// Under a root, but its symlinks cannot be followed (a loop, an
    /// unreadable link). Worded as any other file that cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    Unresolvable { path: PathBuf, source: io::Error },
}

fn list(roots: &[PathBuf]) -> String {
    if roots.is_empty() {
        return "none configured".into();
    }
    roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Symlinks followed in one resolution before giving up (Linux's limit).
const MAX_SYMLINKS: usize = 40;

impl PathRoots {
    /// `roots`, made absolute against the current directory (relative
    /// ones) and folded lexically (`/data/./x/../y/` is `/data/y`).
    pub fn new(
        kind: RootKind,
        roots: impl IntoIterator<Item = impl AsRef<Path>>,
    ) -> io::Result<Self> {
        let roots = roots
            .into_iter()
            .map(|root| absolute(root.as_ref()))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self { kind, roots })
    }

    /// No roots: every path is refused.
    pub fn none(kind: RootKind) -> Self {
        Self {
            kind,
            roots: Vec::new(),
        }
    }

    pub fn kind(&self) -> RootKind {
        self.kind
    }

    /// The roots, absolute and lexically normal.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// `path` (named by the job's `field`) resolved, if it lies under a
    /// root: the path to open or create. It need not exist (opening it then
    /// fails as usual). Otherwise [`ConfineError::Outside`], whether or not
    /// the path exists.
    pub fn resolve(&self, field: &str, path: &Path) -> Result<PathBuf, ConfineError> {
        let outside = || ConfineError::Outside {
            field: field.to_string(),
            path: path.to_path_buf(),
            kind: self.kind,
            roots: self.roots.clone(),
        };
        let Ok(absolute) = absolute(path) else {
            return Err(outside());
        };
        // Both the roots as configured and as they resolve now: a root may
        // be a symlink, or appear after the worker started.
        let mut roots = self.roots.clone();
        for root in &self.roots {
            if let Ok(Walked::To(resolved)) = walk(root, &|_| true) {
                if !roots.contains(&resolved) {
                    roots.push(resolved);
                }
            }
        }
        let under = |p: &Path| roots.iter().any(|root| p.starts_with(root));
        // Lexically outside (`/etc/x`, `root/../../etc/x`): refused before
        // the file system is asked anything.
        if !under(&absolute) {
            return Err(outside());
        }
        let on_the_way = |p: &Path| {
            roots
                .iter()
                .any(|root| p.starts_with(root) || root.starts_with(p))
        };
        match walk(&with_dots(path)?, &on_the_way) {
            Ok(Walked::To(resolved)) if under(&resolved) => Ok(resolved),
            Ok(_) => Err(outside()),
            Err(source) => Err(ConfineError::Unresolvable {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// `path` made absolute against the current directory, `..` and `.`
/// untouched (they are walked, not folded: `link/..` is not `.`).
fn with_dots(path: &Path) -> Result<PathBuf, ConfineError> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .map_err(|source| ConfineError::Unresolvable {
            path: path.to_path_buf(),
            source,
        })
}

/// `path` made absolute against the current directory and folded
/// lexically: `.` dropped, `..` removes the component before it (never
/// above `/`).
fn absolute(path: &Path) -> io::Result<PathBuf> {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut folded = PathBuf::new();
    for component in joined.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => folded.push(component.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                folded.pop();
            }
            Component::Normal(name) => folded.push(name),
        }
    }
    Ok(folded)
}

#[derive(Debug, PartialEq)]
enum Walked {
    /// Where the path leads, free of symlinks (of any that exist now).
    To(PathBuf),
    /// A step left what `allowed` accepts (before it was looked at).
    Left,
}

/// Resolves absolute `path` as the kernel would, one component at a time,
/// looking only at places `allowed` accepts (`allowed` must accept the
/// parent of anything it accepts). A component that cannot be looked at
/// (missing, no permission) is taken for a directory: the path resolves as
/// it would once the missing directories were created (`missing/..` is
/// where it started), and opening it fails as usual.
fn walk(path: &Path, allowed: &dyn Fn(&Path) -> bool) -> io::Result<Walked> {
    // Components still to walk, the next one last.
    let mut pending: Vec<OsString> = Vec::new();
    let mut state = PathBuf::new();
    push_components(path, &mut state, &mut pending);
    let mut followed = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            state.pop();
            continue;
        }
        state.push(&name);
        if !allowed(&state) {
            return Ok(Walked::Left);
        }
        let symlink = std::fs::symlink_metadata(&state).is_ok_and(|m| m.file_type().is_symlink());
        if symlink {
            followed += 1;
            if followed > MAX_SYMLINKS {
                return Err(io::Error::other("too many levels of symbolic links"));
            }
            let target = std::fs::read_link(&state)?;
            state.pop();
            push_components(&target, &mut state, &mut pending);
        }
    }
    Ok(Walked::To(state))
}

/// Queues `path`'s components on `pending` (first one last); an absolute
/// `path` restarts `state` at its root.
fn push_components(path: &Path, state: &mut PathBuf, pending: &mut Vec<OsString>) {
    let mut names = Vec::new();
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => {
                *state = PathBuf::new();
                state.push(component.as_os_str());
                // Anything queued before a restart belongs to the target.
                names.clear();
            }
            Component::CurDir => {}
            Component::ParentDir => names.push(OsString::from("..")),
            Component::Normal(name) => names.push(name.to_os_string()),
        }
    }
    pending.extend(names.into_iter().rev());
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    struct Tree {
        _temp: tempfile::TempDir,
        /// Canonical, so expected paths compare equal.
        base: PathBuf,
    }

    /// `base/root/inside.csv`, `base/outside/secret.csv`.
    fn tree() -> Tree {
        let temp = tempfile::tempdir().unwrap();
        let base = temp.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("root/sub")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("root/inside.csv"), "1,0\n").unwrap();
        std::fs::write(base.join("outside/secret.csv"), "1,0\n").unwrap();
        Tree { _temp: temp, base }
    }

    fn data<P: AsRef<Path>>(roots: impl IntoIterator<Item = P>) -> PathRoots {
        PathRoots::new(RootKind::Data, roots).unwrap()
    }

    fn refusal(roots: &PathRoots, path: &Path) -> String {
        match roots.resolve("dataset.train.images", path) {
            Err(error @ ConfineError::Outside { .. }) => error.to_string(),
            other => panic!("{} must be refused, got {other:?}", path.display()),
        }
    }

    /// The message for `path`, with the path itself blanked out: what
    /// differs between two refusals besides the path named.
    fn shape(roots: &PathRoots, path: &Path) -> String {
        refusal(roots, path).replace(&format!("{path:?}"), "<path>")
    }

    #[test]
    fn a_path_inside_a_root_resolves_to_itself() {
        let t = tree();
        let roots = data([t.base.join("root")]);
        let inside = t.base.join("root/inside.csv");
        assert_eq!(roots.resolve("f", &inside).unwrap(), inside);
        assert_eq!(
            roots
                .resolve("f", &t.base.join("root/./sub/../inside.csv"))
                .unwrap(),
            inside
        );
        // Missing under a root: allowed, opening it fails as usual.
        let missing = t.base.join("root/missing/file.csv");
        assert_eq!(roots.resolve("f", &missing).unwrap(), missing);
        // A missing directory is taken for one that would be created.
        assert_eq!(
            roots
                .resolve("f", &t.base.join("root/missing/../sub/x"))
                .unwrap(),
            t.base.join("root/sub/x")
        );
    }

    #[test]
    fn a_path_outside_every_root_is_refused_naming_field_path_and_roots() {
        let t = tree();
        let roots = data([t.base.join("root"), t.base.join("other")]);
        let secret = t.base.join("outside/secret.csv");
        let message = refusal(&roots, &secret);
        assert_eq!(
            message,
            format!(
                "dataset.train.images {secret:?} is not under this worker's data roots ({}, {}): \
                 a worker reads data sets and TorchScript modules only under its --data-root",
                t.base.join("root").display(),
                t.base.join("other").display()
            )
        );
        // A sibling whose name starts with the root's is not under it.
        refusal(&roots, &t.base.join("rootless/x.csv"));
        let checkpoints = PathRoots::new(RootKind::Checkpoint, [t.base.join("root")]).unwrap();
        let error = checkpoints
            .resolve("checkpoint.dir", &t.base.join("outside"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("is not under this worker's checkpoint root (")
                && error.ends_with("only under its --checkpoint-root"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_path_outside_is_refused_like_an_existing_one() {
        let t = tree();
        let roots = data([t.base.join("root")]);
        let existing = t.base.join("outside/secret.csv");
        let missing = t.base.join("outside/no-such.csv");
        let missing_dir = t.base.join("no-such-dir/x.csv");
        let expected = shape(&roots, &existing);
        assert_eq!(shape(&roots, &missing), expected);
        assert_eq!(shape(&roots, &missing_dir), expected);
        assert_eq!(shape(&roots, Path::new("/etc/passwd")), expected);
    }

    #[test]
    fn dot_dot_cannot_escape_a_root() {
        let t = tree();
        let roots = data([t.base.join("root")]);
        let expected = shape(&roots, &t.base.join("outside/secret.csv"));
        for escape in [
            "root/../outside/secret.csv",
            "root/sub/../../outside/secret.csv",
            "root/missing/../../outside/secret.csv",
            "root/../outside/no-such.csv",
            "root/../../../../../../../../etc/passwd",
        ] {
            assert_eq!(shape(&roots, &t.base.join(escape)), expected, "{escape}");
        }
    }

    #[test]
    fn a_symlink_out_of_a_root_is_refused_whether_its_target_exists_or_not() {
        let t = tree();
        let root = t.base.join("root");
        symlink(t.base.join("outside"), root.join("escape")).unwrap();
        symlink(t.base.join("outside/secret.csv"), root.join("secret.csv")).unwrap();
        symlink(
            t.base.join("outside/no-such.csv"),
            root.join("dangling.csv"),
        )
        .unwrap();
        symlink("../../outside", root.join("sub/relative")).unwrap();
        let roots = data([&root]);
        let expected = shape(&roots, &t.base.join("outside/secret.csv"));
        for link in [
            "escape/secret.csv",
            "escape/no-such.csv",
            "escape/no-such-dir/x.csv",
            "secret.csv",
            "dangling.csv",
            "sub/relative/secret.csv",
            "sub/relative/no-such.csv",
            // `..` after a symlink leaves from where the link led.
            "escape/../root/inside.csv",
        ] {
            assert_eq!(shape(&roots, &root.join(link)), expected, "{link}");
        }
    }

    #[test]
    fn a_symlink_within_the_roots_is_followed() {
        let t = tree();
        let root = t.base.join("root");
        symlink("sub", root.join("alias")).unwrap();
        symlink(root.join("inside.csv"), root.join("sub/link.csv")).unwrap();
        let roots = data([&root]);
        assert_eq!(
            roots.resolve("f", &root.join("alias/link.csv")).unwrap(),
            root.join("inside.csv")
        );
        // A root that is a symlink is followed (it is configuration).
        symlink(&root, t.base.join("root-link")).unwrap();
        let linked = data([t.base.join("root-link")]);
        assert_eq!(
            linked
                .resolve("f", &t.base.join("root-link/inside.csv"))
                .unwrap(),
            root.join("inside.csv")
        );
        // A symlink loop is an error about the path, not a refusal.
        symlink("loop-b", root.join("loop-a")).unwrap();
        symlink("loop-a", root.join("loop-b")).unwrap();
        assert!(matches!(
            roots.resolve("f", &root.join("loop-a/x")),
            Err(ConfineError::Unresolvable { .. })
        ));
    }

    #[test]
    fn roots_with_a_trailing_slash_or_relative_are_normalised() {
        let t = tree();
        let root = t.base.join("root");
        let slashed = data([PathBuf::from(format!("{}/", root.display()))]);
        assert_eq!(slashed.roots(), std::slice::from_ref(&root));
        assert_eq!(
            slashed.resolve("f", &root.join("inside.csv")).unwrap(),
            root.join("inside.csv")
        );
        let dotted = data([root.join("sub/..")]);
        assert_eq!(dotted.roots(), std::slice::from_ref(&root));
        // Relative roots are relative to the worker's directory.
        let cwd = std::env::current_dir().unwrap();
        let relative = data([PathBuf::from("some/relative/dir/")]);
        assert_eq!(relative.roots(), [cwd.join("some/relative/dir")]);
        assert!(relative
            .resolve("f", Path::new("some/relative/dir/x.csv"))
            .is_ok());
        refusal(&relative, Path::new("some/relative/x.csv"));
    }

    #[test]
    fn a_root_that_does_not_exist_yet_still_confines() {
        let t = tree();
        let root = t.base.join("later/checkpoints");
        let roots = PathRoots::new(RootKind::Checkpoint, [&root]).unwrap();
        let dir = root.join("sweep/trial-000001");
        assert_eq!(roots.resolve("checkpoint.dir", &dir).unwrap(), dir);
        let refused = roots.resolve("checkpoint.dir", &t.base.join("later/elsewhere"));
        assert!(matches!(refused, Err(ConfineError::Outside { .. })));
    }

    #[test]
    fn no_roots_refuse_everything() {
        let t = tree();
        let roots = PathRoots::none(RootKind::Data);
        let message = refusal(&roots, &t.base.join("root/inside.csv"));
        assert!(
            message.contains("data roots (none configured)"),
            "{message}"
        );
    }
}
