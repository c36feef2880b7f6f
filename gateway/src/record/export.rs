//! `airlock audit export` format: JSON Lines. An audit entry is its exact stored bytes
//! on one line (so an export can be verified on its own); a checkpoint is a line
//! `{"checkpoint": "<signed note>"}`.

use serde::{Deserialize, Serialize};

use super::RecordError;
use super::entry::seq_key;
use super::store::Spaces;

/// One line of an export.
#[derive(Debug, Clone, PartialEq)]
pub enum ExportLine {
    Entry { seq: u64, bytes: Vec<u8> },
    Checkpoint(Vec<u8>),
}

#[derive(Serialize, Deserialize)]
struct CheckpointLine {
    checkpoint: String,
}

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

impl ExportLine {
    pub fn to_line(&self) -> Vec<u8> {
        match self {
            ExportLine::Entry { bytes, .. } => bytes.clone(),
            ExportLine::Checkpoint(note) => serde_json::to_vec(&CheckpointLine {
                checkpoint: String::from_utf8_lossy(note).into_owned(),
            })
            .expect("a checkpoint line serializes"),
        }
    }
}

/// Every entry from `since` on, then every checkpoint, read from the store.
pub fn export_lines(spaces: &Spaces, since: u64) -> Result<Vec<ExportLine>, RecordError> {
    let mut lines = Vec::new();
    for kv in spaces.audit.range(seq_key(since)..) {
        let (key, value) = kv.into_inner()?;
        let seq = u64::from_be_bytes(
            key.as_ref()
                .try_into()
                .map_err(|_| RecordError::Store("audit key is not 8 bytes".into()))?,
        );
        lines.push(ExportLine::Entry {
            seq,
            bytes: value.to_vec(),
        });
    }
    for kv in spaces.checkpoints.iter() {
        lines.push(ExportLine::Checkpoint(kv.value()?.to_vec()));
    }
    Ok(lines)
}

/// Parses an export, keeping each entry's exact bytes.
pub fn parse_export(text: &[u8]) -> Result<Vec<ExportLine>, String> {
    text.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(n, line)| {
            if let Ok(cp) = serde_json::from_slice::<CheckpointLine>(line) {
                return Ok(ExportLine::Checkpoint(cp.checkpoint.into_bytes()));
            }
            serde_json::from_slice::<SeqOnly>(line)
                .map(|e| ExportLine::Entry {
                    seq: e.seq,
                    bytes: line.to_vec(),
                })
                .map_err(|e| format!("line {}: neither an entry nor a checkpoint: {e}", n + 1))
        })
        .collect()
}
