//! Reading a bundle's files as what they claim to be: regular files, not links, FIFOs or
//! devices, and no larger than a bound checked before anything is read. The signature
//! covers bytes, not file types: a module swapped for a FIFO would otherwise hang an
//! install while it holds the lock, and one linked to `/dev/zero` would be read forever.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::OFlags;

/// Largest `manifest.toml`.
pub(crate) const MANIFEST_LIMIT: u64 = 1 << 20;
/// Largest `manifest.sig`.
pub(crate) const SIGNATURE_LIMIT: u64 = 64 << 10;
/// How large a bundle's modules and fixtures may be: checked before anything is read.
/// The gateway takes them from `[policy]` (`max-module-mib`, `max-fixture-mib`,
/// `max-bundle-mib`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimits {
    /// Largest module.
    pub module: u64,
    /// Largest fixture file.
    pub fixture: u64,
    /// Largest sum of a bundle's modules and fixtures: each file is bounded, and a
    /// manifest may not multiply them.
    pub bundle: u64,
}

impl Default for SizeLimits {
    fn default() -> Self {
        SizeLimits {
            module: 64 << 20,
            fixture: 16 << 20,
            bundle: 256 << 20,
        }
    }
}

/// Why a bundle file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("is a symbolic link, or lies under one; a bundle holds regular files only")]
    Link,
    #[error("is not a relative path inside the directory (no `/` at the start, no `..`)")]
    Outside,
    #[error("is a {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("is {size} bytes, over the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
}

/// Reads `path` if it is a regular file of at most `limit` bytes. Opens without
/// following a link and without blocking (a FIFO opens at once, then is refused).
pub(crate) fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == rustix::io::Errno::LOOP.raw_os_error() => ReadError::Link,
            _ => ReadError::Io(e),
        })?;
    read_open(file, limit)
}

/// Reads `relative` under `dir` like [`read_bounded`], following no link on the way:
/// every directory between is opened without following links, so neither the file nor
/// a directory it lies in can be a link out of `dir`.
pub(crate) fn read_in(dir: &Path, relative: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    read_open(open_in(dir, relative)?, limit)
}

/// The names in `relative` under `dir` (opened as [`read_in`] does), sorted; `None`
/// when it is not a directory.
pub(crate) fn list_in(dir: &Path, relative: &Path) -> Result<Option<Vec<String>>, ReadError> {
    let file = open_in(dir, relative)?;
    if !file.metadata()?.is_dir() {
        return Ok(None);
    }
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&file).map_err(std::io::Error::from)? {
        let name = entry.map_err(std::io::Error::from)?.file_name().to_owned();
        let name = name.into_string().map_err(|_| ReadError::Outside)?;
        if name != "." && name != ".." {
            names.push(name);
        }
    }
    names.sort();
    Ok(Some(names))
}

fn open_in(dir: &Path, relative: &Path) -> Result<File, ReadError> {
    use rustix::fs::{Mode, openat};
    let parts: Vec<&std::ffi::OsStr> = relative
        .components()
        .map(|c| match c {
            std::path::Component::Normal(part) => Ok(part),
            _ => Err(ReadError::Outside),
        })
        .collect::<Result<_, _>>()?;
    let Some((last, between)) = parts.split_last() else {
        return Err(ReadError::Outside);
    };
    let link = |e: rustix::io::Errno| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => ReadError::Link,
        e => ReadError::Io(e.into()),
    };
    let mut fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(std::io::Error::from)?;
    for part in between {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        fd = openat(&fd, *part, flags, Mode::empty()).map_err(link)?;
    }
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = openat(&fd, *last, flags, Mode::empty()).map_err(|e| match e {
        rustix::io::Errno::LOOP => ReadError::Link,
        e => ReadError::Io(e.into()),
    })?;
    Ok(File::from(fd))
}

fn read_open(file: File, limit: u64) -> Result<Vec<u8>, ReadError> {
    let metadata = file.metadata()?;
    let kind = metadata.file_type();
    if !kind.is_file() {
        return Err(ReadError::NotRegular(if kind.is_fifo() {
            "FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "device"
        } else if kind.is_socket() {
            "socket"
        } else if kind.is_dir() {
            "directory"
        } else {
            "special file"
        }));
    }
    let size = metadata.len();
    if size > limit {
        return Err(ReadError::TooLarge { size, limit });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // The size may grow while it is read: never past the limit.
    File::take(file, limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge {
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("module.wasm");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(read_bounded(&file, 10).unwrap(), b"0123456789");
        assert!(matches!(
            read_bounded(&file, 9),
            Err(ReadError::TooLarge { size: 10, limit: 9 })
        ));
        let link = dir.path().join("link.wasm");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(read_bounded(&link, 10), Err(ReadError::Link)));
        let fifo = dir.path().join("fifo.wasm");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(matches!(
            read_bounded(&fifo, 10),
            Err(ReadError::NotRegular("FIFO"))
        ));
        assert!(matches!(
            read_bounded(Path::new("/dev/zero"), 10),
            Err(ReadError::NotRegular("device"))
        ));
    }

    #[test]
    fn files_inside_are_read_through_no_link_and_never_outside() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"key").unwrap();
        std::fs::create_dir(dir.path().join("modules")).unwrap();
        std::fs::write(dir.path().join("modules/a.wasm"), b"wasm").unwrap();
        assert_eq!(
            read_in(dir.path(), Path::new("modules/a.wasm"), 10).unwrap(),
            b"wasm"
        );
        // A directory on the way that is a link is refused, wherever it points.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("linked")).unwrap();
        assert!(matches!(
            read_in(dir.path(), Path::new("linked/secret"), 10),
            Err(ReadError::Link)
        ));
        assert!(matches!(
            list_in(dir.path(), Path::new("linked")),
            Err(ReadError::Link)
        ));
        for path in ["../secret", "/etc/passwd", "", "modules/../modules/a.wasm"] {
            assert!(
                matches!(
                    read_in(dir.path(), Path::new(path), 10),
                    Err(ReadError::Outside)
                ),
                "{path}"
            );
        }
        assert_eq!(
            list_in(dir.path(), Path::new("modules")).unwrap(),
            Some(vec!["a.wasm".to_string()])
        );
        assert_eq!(
            list_in(dir.path(), Path::new("modules/a.wasm")).unwrap(),
            None
        );
    }
}
