//! Witnesses: places outside the gateway's data directory that each signed checkpoint
//! is also handed to, so a gateway that re-signs a rewritten history (its own stored
//! checkpoints rewritten too) is caught by `airlock audit verify --witness`.
//!
//! A witness gets a checkpoint as one export line, `{"checkpoint": "<signed note>"}`:
//! a file of such lines, however it was collected, is what `verify --witness` reads.

use std::path::{Path, PathBuf};

mod http;

pub use http::{HttpWitness, WitnessError, WitnessUrl};

/// Somewhere each signed checkpoint is also kept.
pub trait Witness: Send + Sync + std::fmt::Debug {
    /// Hands over one checkpoint line. Called on the record's writer thread, so it must
    /// not wait on anything slower than a local file. A witness that cannot keep it
    /// says so in the log; the record goes on (the next checkpoint covers this one).
    fn witness(&self, line: &[u8]);
}

/// Appends each checkpoint to a file, durably (`[record] witness`).
#[derive(Debug)]
pub struct FileWitness {
    path: PathBuf,
}

impl FileWitness {
    pub fn new(path: &Path) -> Self {
        FileWitness {
            path: path.to_path_buf(),
        }
    }

    fn append(&self, line: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)?;
        file.write_all(&[line, b"\n"].concat())?;
        file.sync_data()
    }
}

impl Witness for FileWitness {
    fn witness(&self, line: &[u8]) {
        if let Err(e) = self.append(line) {
            tracing::error!(witness = %self.path.display(), error = %e, "cannot append a checkpoint to the witness file");
        }
    }
}
