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
/// Largest module.
pub(crate) const MODULE_LIMIT: u64 = 64 << 20;
/// Largest fixture file.
pub(crate) const FIXTURE_LIMIT: u64 = 16 << 20;

/// Why a bundle file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("is a symbolic link; a bundle holds regular files only")]
    Link,
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
}
