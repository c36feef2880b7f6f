//! The audit log as a Merkle tree (RFC 6962, via `tlog_tiles`) and its signed
//! checkpoints (C2SP tlog-checkpoint in a C2SP signed note).
//!
//! The writer stores each entry's tree hashes as it appends, so the root at any size
//! and consistency proofs between sizes need only `log n` reads. An auditor who kept an
//! earlier checkpoint can check that the log only grew since: the gateway holds its own
//! signing key, so only a checkpoint kept elsewhere can show history was not rewritten.

use std::collections::HashMap;

use signed_note::{Note, VerifierList};
use tlog_tiles::{Checkpoint, Hash, HashReader};

use crate::keys::{PublicKey, SecretKey};

/// Why a checkpoint could not be made or checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint is not a signed note: {0}")]
    NotANote(String),
    #[error("checkpoint signature does not verify with the gateway's key: {0}")]
    Signature(String),
    #[error("checkpoint text is malformed: {0}")]
    Malformed(String),
    #[error("checkpoint is for log `{found}`, this log is `{expected}`")]
    WrongOrigin { expected: String, found: String },
}

/// A verified checkpoint: the log's size and root hash at some point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeHead {
    pub size: u64,
    pub root: [u8; 32],
}

/// Signs the tree head as a C2SP checkpoint note.
pub fn sign_checkpoint(
    key: &SecretKey,
    origin: &str,
    head: &TreeHead,
) -> Result<Vec<u8>, CheckpointError> {
    let checkpoint = Checkpoint::new(origin, head.size, Hash(head.root), "")
        .map_err(|e| CheckpointError::Malformed(e.to_string()))?;
    let signer = key
        .note_signer(origin)
        .map_err(|e| CheckpointError::Malformed(e.to_string()))?;
    let mut note = Note::new(&checkpoint.to_bytes(), &[])
        .map_err(|e| CheckpointError::NotANote(e.to_string()))?;
    note.add_sigs(&[&signer])
        .map_err(|e| CheckpointError::NotANote(e.to_string()))?;
    Ok(note.to_bytes())
}

/// Checks a checkpoint note's signature with the gateway's public key and returns the
/// tree head it commits to.
pub fn open_checkpoint(
    note: &[u8],
    key: &PublicKey,
    origin: &str,
) -> Result<TreeHead, CheckpointError> {
    let note = Note::from_bytes(note).map_err(|e| CheckpointError::NotANote(e.to_string()))?;
    let verifier = key
        .note_verifier(origin)
        .map_err(|e| CheckpointError::Signature(e.to_string()))?;
    note.verify(&VerifierList::new(vec![Box::new(verifier)]))
        .map_err(|e| CheckpointError::Signature(e.to_string()))?;
    let checkpoint = Checkpoint::from_bytes(note.text())
        .map_err(|e| CheckpointError::Malformed(e.to_string()))?;
    if checkpoint.origin() != origin {
        return Err(CheckpointError::WrongOrigin {
            expected: origin.to_string(),
            found: checkpoint.origin().to_string(),
        });
    }
    Ok(TreeHead {
        size: checkpoint.size(),
        root: checkpoint.hash().0,
    })
}

/// The origin line of a checkpoint note, read without checking anything.
pub fn checkpoint_origin(note: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(note).ok()?;
    text.lines().next().map(str::to_string)
}

/// Stored tree hashes kept in memory: the verifier rebuilds the tree from entries
/// with this, and the writer stages a batch's hashes in it before they are committed.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct MemHashes {
    pub(crate) hashes: HashMap<u64, Hash>,
}

impl HashReader for MemHashes {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|i| {
                self.hashes
                    .get(i)
                    .copied()
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)
            })
            .collect()
    }
}

/// Reads staged hashes first, then `base`.
pub(crate) struct Overlay<'a, R: HashReader> {
    pub(crate) staged: &'a MemHashes,
    pub(crate) base: &'a R,
}

impl<R: HashReader> HashReader for Overlay<'_, R> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|i| match self.staged.hashes.get(i) {
                Some(h) => Ok(*h),
                None => self.base.read_hashes(&[*i]).map(|v| v[0]),
            })
            .collect()
    }
}

/// Appends record `n` with the given bytes: returns the (index, hash) pairs to store.
pub(crate) fn append<R: HashReader>(
    n: u64,
    bytes: &[u8],
    reader: &R,
) -> Result<Vec<(u64, Hash)>, tlog_tiles::Error> {
    let hashes = tlog_tiles::stored_hashes(n, bytes, reader)?;
    let first = tlog_tiles::stored_hash_index(0, n);
    Ok(hashes
        .into_iter()
        .enumerate()
        .map(|(i, h)| (first + i as u64, h))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_sign_and_verify() {
        let key = SecretKey::generate();
        let head = TreeHead {
            size: 7,
            root: [9; 32],
        };
        let note = sign_checkpoint(&key, "airlock.test/log", &head).unwrap();
        assert_eq!(
            open_checkpoint(&note, key.public(), "airlock.test/log").unwrap(),
            head
        );
        let other = SecretKey::generate();
        assert!(open_checkpoint(&note, other.public(), "airlock.test/log").is_err());
        let mut forged = note.clone();
        forged[20] ^= 1;
        assert!(open_checkpoint(&forged, key.public(), "airlock.test/log").is_err());
    }

    #[test]
    fn consistency_proofs_check() {
        let mut mem = MemHashes::default();
        let mut roots = Vec::new();
        for n in 0..20u64 {
            let staged = append(n, format!("entry {n}").as_bytes(), &mem).unwrap();
            mem.hashes.extend(staged);
            roots.push(tlog_tiles::tree_hash(n + 1, &mem).unwrap());
        }
        let proof = tlog_tiles::prove_tree(20, 7, &mem).unwrap();
        tlog_tiles::check_tree(&proof, 20, roots[19], 7, roots[6]).unwrap();
        assert!(tlog_tiles::check_tree(&proof, 20, roots[19], 7, roots[5]).is_err());
    }
}
