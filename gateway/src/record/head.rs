//! The high-water mark: how much of the log this gateway has acknowledged, kept in a
//! file beside the store (`DATA/store.head`), outside the journal.
//!
//! fjall treats a damaged journal batch as a torn tail and truncates it when the store
//! is opened, and a hash chain cannot show that its own tail is gone. The mark can: it
//! is rewritten after every commit, before any caller hears the commit, so a store
//! shorter than its mark, or with another entry at the mark, lost acknowledged
//! entries. It is written without fsync: after a power loss it may lag the store (which
//! was fsynced first), never lead it, so it never raises a false alarm.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::entry::{entry_hash, seq_key};
use super::store::Spaces;
use crate::fsperm;

/// What the gateway had acknowledged: the log's length, its last entry's hash, and
/// its newest signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadMark {
    /// Entries acknowledged (the next sequence number).
    pub entries: u64,
    /// Hex sha256 of entry `entries - 1`.
    pub head: String,
    /// The tree size of the newest signed checkpoint acknowledged (0: none).
    #[serde(default)]
    pub checkpointed: u64,
}

/// How a store falls short of its mark.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Shortfall {
    #[error(
        "the store holds {found} entries but this gateway acknowledged {acknowledged}: entries {found} to {} are missing",
        .acknowledged - 1
    )]
    Missing { found: u64, acknowledged: u64 },
    #[error("entry {seq} is not the entry this gateway acknowledged there (its hash differs)")]
    Differs { seq: u64 },
    #[error(
        "the high-water mark (store.head) is missing, though this store has had one: what the gateway acknowledged cannot be checked"
    )]
    MarkMissing,
    #[error(
        "the newest signed checkpoint is for {found} entries but this gateway signed one for {acknowledged}: a checkpoint is missing"
    )]
    CheckpointMissing { found: u64, acknowledged: u64 },
}

/// The key in the store's `meta` space that says the store has a mark beside it, so a
/// deleted mark is noticed rather than taken for a store from before marks.
pub(crate) const MARKED: &[u8] = b"head-mark";

/// Where the mark of the store at `store` is kept.
fn mark_path(store: &Path) -> PathBuf {
    store.with_extension("head")
}

/// The mark, if one has been written. A mark that cannot be read is an error: the
/// store cannot be vouched for.
pub fn read_mark(store: &Path) -> Result<Option<HeadMark>, String> {
    let path = mark_path(store);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Rewrites the mark atomically (a reader sees the old mark or the new one).
pub(crate) fn write_mark(store: &Path, mark: &HeadMark) -> Result<(), String> {
    let json = serde_json::to_vec(mark).expect("a mark serializes");
    fsperm::write_private_atomic_unsynced(&mark_path(store), &json).map_err(|e| e.to_string())
}

/// Checks `spaces` against its mark (`None`: no mark file): every acknowledged entry is
/// there, the last one is the one acknowledged, and a store that has had a mark has it.
pub fn check(spaces: &Spaces, mark: Option<&HeadMark>) -> Result<(), Shortfall> {
    let Some(mark) = mark else {
        return match spaces.meta.get(MARKED) {
            Ok(Some(_)) => Err(Shortfall::MarkMissing),
            _ => Ok(()),
        };
    };
    let found = spaces.audit_len().unwrap_or(0);
    if found < mark.entries {
        return Err(Shortfall::Missing {
            found,
            acknowledged: mark.entries,
        });
    }
    let checkpointed = spaces.checkpointed().unwrap_or(0);
    if checkpointed < mark.checkpointed {
        return Err(Shortfall::CheckpointMissing {
            found: checkpointed,
            acknowledged: mark.checkpointed,
        });
    }
    if mark.entries == 0 {
        return Ok(());
    }
    let seq = mark.entries - 1;
    let same = spaces
        .audit
        .get(seq_key(seq))
        .ok()
        .flatten()
        .is_some_and(|bytes| hex::encode(entry_hash(&bytes)) == mark.head);
    if same {
        Ok(())
    } else {
        Err(Shortfall::Differs { seq })
    }
}
