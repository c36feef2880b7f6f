//! Offline verification of the audit log: the hash chain, the stored tree leaves, and
//! every signed checkpoint; and consistency with a checkpoint kept elsewhere.

use tlog_tiles::Hash;

use super::entry::{AuditEntry, GENESIS, entry_hash};
use super::export::ExportLine;
use super::tree::{MemHashes, TreeHead, append, open_checkpoint};
use crate::keys::PublicKey;

/// Where the log failed to verify. `seq` names the first entry that does not verify.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    #[error("entry {seq}: {reason}")]
    Entry { seq: u64, reason: String },
    #[error("checkpoint at size {size}: {reason}")]
    Checkpoint { size: u64, reason: String },
    #[error("{0}")]
    Other(String),
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub entries: u64,
    pub checkpoints: u64,
    pub head: TreeHead,
    /// The log's tree hashes, rebuilt from the entries.
    hashes: std::sync::Arc<MemHashes>,
}

/// Verifies a log: `lines` in order (entries by seq, checkpoints anywhere), and, when
/// verifying a store, `stored_leaf(seq)` gives the leaf hash written with each entry
/// so an edited entry is named exactly. Checkpoints must be signed by `key` for
/// `origin`.
pub fn verify_log(
    lines: &[ExportLine],
    stored_leaf: &dyn Fn(u64) -> Option<[u8; 32]>,
    key: &PublicKey,
    origin: &str,
) -> Result<VerifyReport, VerifyError> {
    let mut mem = MemHashes::default();
    let mut expected = 0u64;
    let mut prev = GENESIS;
    let mut checkpoints = Vec::new();
    for line in lines {
        let (seq, bytes) = match line {
            ExportLine::Checkpoint(note) => {
                checkpoints.push(note);
                continue;
            }
            ExportLine::Entry { seq, bytes } => (*seq, bytes),
        };
        if seq != expected {
            let reason = if seq > expected {
                format!(
                    "is missing (the log jumps from entry {} to entry {seq})",
                    expected.wrapping_sub(1)
                )
            } else {
                format!("appears again out of order (after entry {})", expected - 1)
            };
            return Err(VerifyError::Entry {
                seq: expected.min(seq),
                reason,
            });
        }
        let leaf = tlog_tiles::record_hash(bytes).0;
        if let Some(stored) = stored_leaf(seq)
            && stored != leaf
        {
            return Err(VerifyError::Entry {
                seq,
                reason: "was modified: its bytes no longer match the tree leaf written with it"
                    .into(),
            });
        }
        let entry: AuditEntry = serde_json::from_slice(bytes).map_err(|e| VerifyError::Entry {
            seq,
            reason: format!("is not a valid audit entry: {e}"),
        })?;
        if entry.seq != seq {
            return Err(VerifyError::Entry {
                seq,
                reason: format!("is stored at {seq} but says it is entry {}", entry.seq),
            });
        }
        if entry.prev != hex::encode(prev) {
            return Err(match seq {
                0 => VerifyError::Entry {
                    seq,
                    reason: "the first entry does not start the chain".into(),
                },
                _ => VerifyError::Entry {
                    seq: seq - 1,
                    reason: format!(
                        "was modified: entry {seq} links to {} but entry {} hashes to {}",
                        entry.prev,
                        seq - 1,
                        hex::encode(prev)
                    ),
                },
            });
        }
        let hashes = append(seq, bytes, &mem).map_err(|e| VerifyError::Other(e.to_string()))?;
        mem.hashes.extend(hashes);
        prev = entry_hash(bytes);
        expected += 1;
    }
    let size = expected;
    for note in &checkpoints {
        let head = open_checkpoint(note, key, origin).map_err(|e| VerifyError::Checkpoint {
            size: 0,
            reason: e.to_string(),
        })?;
        if head.size > size {
            return Err(VerifyError::Checkpoint {
                size: head.size,
                reason: format!(
                    "the log has only {size} entries: entries {size}..{} were removed",
                    head.size - 1
                ),
            });
        }
        let root = tlog_tiles::tree_hash(head.size, &mem)
            .map_err(|e| VerifyError::Other(e.to_string()))?;
        if root.0 != head.root {
            return Err(VerifyError::Checkpoint {
                size: head.size,
                reason: "the entries no longer hash to the signed root: history was rewritten"
                    .into(),
            });
        }
    }
    let root = tlog_tiles::tree_hash(size, &mem).map_err(|e| VerifyError::Other(e.to_string()))?;
    Ok(VerifyReport {
        entries: size,
        checkpoints: checkpoints.len() as u64,
        head: TreeHead { size, root: root.0 },
        hashes: std::sync::Arc::new(mem),
    })
}

/// The log extends a checkpoint kept elsewhere.
#[derive(Debug, Clone, PartialEq)]
pub struct Consistency {
    pub old: TreeHead,
    pub new: TreeHead,
    /// Hashes in the RFC 6962 consistency proof from `old` to `new`.
    pub proof_len: usize,
}

/// Proves the verified log is an append-only extension of `checkpoint` (a signed note
/// saved outside the gateway).
pub fn verify_against(
    report: &VerifyReport,
    checkpoint: &[u8],
    key: &PublicKey,
    origin: &str,
) -> Result<Consistency, VerifyError> {
    let old = open_checkpoint(checkpoint, key, origin).map_err(|e| VerifyError::Checkpoint {
        size: 0,
        reason: e.to_string(),
    })?;
    let new = report.head.clone();
    if old.size > new.size {
        return Err(VerifyError::Checkpoint {
            size: old.size,
            reason: format!(
                "the saved checkpoint covers {} entries but the log has only {}: the log was truncated",
                old.size, new.size
            ),
        });
    }
    let proof = tlog_tiles::prove_tree(new.size, old.size, &*report.hashes)
        .map_err(|e| VerifyError::Other(e.to_string()))?;
    tlog_tiles::check_tree(&proof, new.size, Hash(new.root), old.size, Hash(old.root)).map_err(
        |_| VerifyError::Checkpoint {
            size: old.size,
            reason: "the log is not an extension of the saved checkpoint: history was rewritten"
                .into(),
        },
    )?;
    Ok(Consistency {
        old,
        new,
        proof_len: proof.len(),
    })
}
