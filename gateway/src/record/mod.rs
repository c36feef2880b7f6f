//! The record: the gateway's own store (fjall) of agents, targets, grants, sessions and
//! an append-only, hash-chained, Merkle-tree audit log with signed checkpoints.
//!
//! Every write goes through one writer thread, which batches concurrent writes into one
//! atomic fjall batch and one fsync (group commit) and answers each caller only when
//! its batch is durable. The async runtime never waits on fjall. If a write or an fsync
//! fails, the record is poisoned: every later write is refused, and the gateway reports
//! not-ready, because an action that cannot be recorded must not happen.

mod damage;
mod entry;
mod export;
mod head;
mod kind;
mod store;
mod tree;
mod verify;
mod witness;
mod writer;

#[cfg(test)]
mod tests;

pub use damage::{Damage, cut_journal};
pub use entry::{AuditEntry, AuditEvent, GENESIS, SCHEMA, SCHEMA_VERSION, entry_hash};
pub use export::{ExportLine, export_lines, parse_export};
pub use head::{HeadMark, Shortfall, check as check_mark, read_mark};
pub use kind::EventKind;
pub use store::{Space, Spaces, StoreCopy};
pub use tree::{CheckpointError, TreeHead, checkpoint_origin, open_checkpoint, sign_checkpoint};
pub use verify::{Consistency, VerifyError, VerifyReport, verify_against, verify_log};
pub use witness::{FileWitness, HttpWitness, Witness, WitnessError, WitnessUrl};
pub use writer::{AcceptLoss, Receipt, Record, RecordOptions, Write};

/// Why the record could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecordError {
    #[error("the record at {path} is in use by a running gateway")]
    Locked { path: String },
    #[error("record store error: {0}")]
    Store(String),
    /// fjall refused the store's journal (a batch that does not verify before its
    /// last); [`Damaged`](RecordError::Damaged) once located.
    #[error(
        "the store's journal cannot be read ({0}); keep a copy of the data directory for investigation"
    )]
    JournalUnreadable(String),
    #[error(
        "{0}. The store was not changed; keep a copy of the data directory for investigation. To cut the journal there and go on, run (gateway stopped): airlock audit accept-loss --reason TEXT (the damaged store is kept beside it, and the acceptance is recorded)"
    )]
    Damaged(Damage),
    #[error(
        "the record is shorter than this gateway acknowledged: {0}. Its store lost acknowledged entries (a damaged journal is cut back when opened); keep a copy of the data directory for investigation. To accept the loss and go on, run: airlock audit accept-loss --reason TEXT (the acceptance is itself recorded)"
    )]
    Shortened(Shortfall),
    #[error(
        "the record cannot be written ({0}); refusing every action until its store is writable again (checked every 5 s; the gateway then restarts in place, since after a failed write the store takes no write until it is reopened)"
    )]
    NotReady(String),
    #[error("the record is shutting down")]
    Closed,
    #[error(transparent)]
    Checkpoint(#[from] std::sync::Arc<CheckpointError>),
}

impl From<fjall::Error> for RecordError {
    fn from(e: fjall::Error) -> Self {
        RecordError::Store(e.to_string())
    }
}
