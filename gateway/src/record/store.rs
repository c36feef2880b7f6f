//! The fjall database and its keyspaces.

use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use tlog_tiles::{Hash, HashReader};

use super::RecordError;
use crate::fsperm;

/// The state keyspaces callers write through the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    Agents,
    Targets,
    Grants,
    Sessions,
    Meta,
}

/// The open database and every keyspace.
pub struct Spaces {
    pub(crate) db: Database,
    pub agents: Keyspace,
    pub targets: Keyspace,
    pub grants: Keyspace,
    pub sessions: Keyspace,
    pub meta: Keyspace,
    /// seq (u64 big-endian) → entry bytes.
    pub audit: Keyspace,
    /// stored hash index (u64 big-endian) → 32-byte tree hash.
    pub tree: Keyspace,
    /// tree size (u64 big-endian) → signed checkpoint note.
    pub checkpoints: Keyspace,
}

impl Spaces {
    /// Opens (creating with 0700 if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, RecordError> {
        fsperm::create_private_dir(path).map_err(|e| RecordError::Store(e.to_string()))?;
        fsperm::check_private_tree(path).map_err(|e| RecordError::Store(e.to_string()))?;
        let db = Database::builder(path).open().map_err(|e| match e {
            fjall::Error::Locked => RecordError::Locked {
                path: path.display().to_string(),
            },
            fjall::Error::JournalRecovery(e) => RecordError::JournalUnreadable(format!("{e:?}")),
            e => RecordError::Store(e.to_string()),
        })?;
        let open = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        Ok(Spaces {
            agents: open("agents")?,
            targets: open("targets")?,
            grants: open("grants")?,
            sessions: open("sessions")?,
            meta: open("meta")?,
            audit: open("audit")?,
            tree: open("tree")?,
            checkpoints: open("checkpoints")?,
            db,
        })
    }

    /// Opens a private copy of the stopped store at `path`, leaving the store itself
    /// byte for byte as it was: opening a fjall store recovers its journal, and
    /// recovery cuts a damaged tail, so a reader that opened the store in place would
    /// destroy the evidence it was asked to check. The copy is removed when the
    /// returned value is dropped. `Locked` if a gateway has the store open.
    pub fn open_copy(path: &Path) -> Result<StoreCopy, RecordError> {
        let locked = RecordError::Locked {
            path: path.display().to_string(),
        };
        match std::fs::File::open(path.join("lock")) {
            Ok(lock) => match lock.try_lock() {
                Ok(()) => drop(lock),
                Err(std::fs::TryLockError::WouldBlock) => return Err(locked),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(RecordError::Store(e.to_string()));
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RecordError::Store(e.to_string())),
        }
        let copy = std::env::temp_dir().join(format!("airlock-store-{}", fsperm::random_suffix()));
        let guard = CopyDir(copy.clone());
        copy_tree(path, &copy)
            .map_err(|e| RecordError::Store(format!("copying the store: {e}")))?;
        // A damaged journal is named by where the damage is, not by fjall's word.
        let spaces = Spaces::open(&copy).map_err(|e| super::damage::named(path, e))?;
        Ok(StoreCopy {
            spaces,
            _dir: guard,
        })
    }

    pub fn space(&self, space: Space) -> &Keyspace {
        match space {
            Space::Agents => &self.agents,
            Space::Targets => &self.targets,
            Space::Grants => &self.grants,
            Space::Sessions => &self.sessions,
            Space::Meta => &self.meta,
        }
    }

    /// The number of entries in the audit log (its last seq + 1).
    pub fn audit_len(&self) -> Result<u64, RecordError> {
        Ok(last_key(&self.audit, "audit")?.map_or(0, |seq| seq + 1))
    }

    /// The tree size of the newest signed checkpoint; 0 if none was signed.
    pub fn checkpointed(&self) -> Result<u64, RecordError> {
        Ok(last_key(&self.checkpoints, "checkpoint")?.unwrap_or(0))
    }

    /// The newest signed checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<Vec<u8>>, RecordError> {
        match self.checkpoints.last_key_value() {
            None => Ok(None),
            Some(kv) => Ok(Some(kv.value().map_err(RecordError::from)?.to_vec())),
        }
    }
}

/// The last key of a keyspace keyed by big-endian u64 (`what` names it in the error).
fn last_key(space: &Keyspace, what: &str) -> Result<Option<u64>, RecordError> {
    let Some(kv) = space.last_key_value() else {
        return Ok(None);
    };
    let key = kv.key().map_err(RecordError::from)?;
    let key: [u8; 8] = key
        .as_ref()
        .try_into()
        .map_err(|_| RecordError::Store(format!("{what} key is not 8 bytes")))?;
    Ok(Some(u64::from_be_bytes(key)))
}

impl HashReader for Spaces {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|i| {
                let value = self
                    .tree
                    .get(i.to_be_bytes())
                    .ok()
                    .flatten()
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)?;
                let bytes: [u8; 32] = value
                    .as_ref()
                    .try_into()
                    .map_err(|_| tlog_tiles::Error::MalformedHash)?;
                Ok(Hash(bytes))
            })
            .collect()
    }
}

/// A store opened from a private copy (see [`Spaces::open_copy`]).
pub struct StoreCopy {
    pub spaces: Spaces,
    _dir: CopyDir,
}

/// Removes the copy when dropped (after the store in it is closed).
pub(super) struct CopyDir(pub(super) std::path::PathBuf);

impl Drop for CopyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the regular files and directories under `from` into `to` (created 0700,
/// files 0600); links and special files are not part of a store and are skipped.
pub(super) fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    fsperm::create_private_dir(to).map_err(std::io::Error::other)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            let mut source = std::fs::File::open(entry.path())?;
            let mut sink = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&target)?;
            std::io::copy(&mut source, &mut sink)?;
        }
    }
    Ok(())
}
