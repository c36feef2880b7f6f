//! Least privilege on the gateway's own files.
//!
//! Policy code, precompiled artifacts and (later) the record decide what an agent may do.
//! If another user or a group could write them, they could widen access or plant native
//! code, so the gateway refuses to use them, and it creates its own with 0700/0600.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a path is not safe for the gateway to trust.
#[derive(Debug, thiserror::Error)]
pub enum PermError {
    #[error("{path}: owned by uid {owner}, but the gateway runs as uid {me}; refusing to use it")]
    WrongOwner { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "{path}: mode {mode:04o} lets a group or other users write it; refusing to use it (chmod go-w)"
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "{path}: mode {mode:04o} lets others read these secrets; refusing to use it (chmod 600)"
    )]
    Readable { path: PathBuf, mode: u32 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PermError + '_ {
    move |source| PermError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `path` is owned by the gateway's user and not writable by group or others.
/// Symbolic links are followed and the target is checked.
pub fn check_private(path: &Path) -> Result<(), PermError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(PermError::WrongOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(PermError::Writable {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Checks that a file holding secrets is the gateway user's and readable by no one else.
pub fn check_secret(path: &Path) -> Result<(), PermError> {
    check_private(path)?;
    let mode = fs::metadata(path).map_err(io_err(path))?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PermError::Readable {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Checks `root` and everything below it with [`check_private`].
pub fn check_private_tree(root: &Path) -> Result<(), PermError> {
    check_private(root)?;
    if fs::metadata(root).map_err(io_err(root))?.is_dir() {
        for entry in fs::read_dir(root).map_err(io_err(root))? {
            let entry = entry.map_err(io_err(root))?;
            check_private_tree(&entry.path())?;
        }
    }
    Ok(())
}

/// Creates `path` (and missing parents) with mode 0700, then checks it is private.
pub fn create_private_dir(path: &Path) -> Result<(), PermError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err(path))?;
    check_private(path)
}

/// Writes `bytes` to `path` with mode 0600, atomically: a temporary file in the same
/// directory is written, synced and renamed over `path`.
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> Result<(), PermError> {
    write_atomic(path, bytes, true)
}

/// [`write_private_atomic`] without the fsyncs: for a file rewritten on every commit
/// whose being a little behind after a power loss is harmless.
pub fn write_private_atomic_unsynced(path: &Path, bytes: &[u8]) -> Result<(), PermError> {
    write_atomic(path, bytes, false)
}

fn write_atomic(path: &Path, bytes: &[u8], sync: bool) -> Result<(), PermError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        random_suffix()
    ));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        if sync {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if sync {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// A short random string for temporary names, so concurrent writers never collide.
pub fn random_suffix() -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).expect("the OS random number generator is unavailable");
    hex::encode(bytes)
}
