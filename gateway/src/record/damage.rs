//! Where a store's journal stops verifying. fjall refuses to open a store whose
//! journal holds a write batch that fails its checksum before the last one, and says
//! only `ChecksumMismatch`; it tolerates a damaged or cut *last* batch (a torn tail).
//! So a store cut just before the damage opens, one cut after the next batch does
//! not: on private copies of the stopped store, cut at offsets found by bisection,
//! this finds the first batch that does not verify and how many entries come before
//! it, without parsing fjall's journal format and without touching the store.

use std::path::Path;

use super::store::{CopyDir, Spaces, copy_tree};
use super::{RecordError, head};
use crate::fsperm;

/// The first damaged write batch of a store's journal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Damage {
    /// The journal file, relative to the store.
    pub journal: String,
    /// Where in it the first batch that does not verify starts.
    pub offset: u64,
    /// Entries readable before it: entries from this sequence number on are lost.
    pub readable_entries: u64,
    /// Entries the gateway acknowledged (its high-water mark), if the mark is readable.
    pub acknowledged: Option<u64>,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the store's journal {} is damaged from byte {} on (a write batch that does not verify); ",
            self.journal, self.offset
        )?;
        match self.acknowledged {
            Some(acknowledged) if acknowledged <= self.readable_entries => write!(
                f,
                "the {acknowledged} entries this gateway acknowledged are before it (what is past it is a later write: a checkpoint or state)"
            ),
            Some(acknowledged) => write!(
                f,
                "entries {} to {} of the {acknowledged} this gateway acknowledged cannot be read",
                self.readable_entries,
                acknowledged - 1
            ),
            None => write!(
                f,
                "entries from {} on cannot be read",
                self.readable_entries
            ),
        }
    }
}

/// The journal files of the store at `path`, oldest first, with their lengths.
fn journals(path: &Path) -> std::io::Result<Vec<(u64, String, u64)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_suffix(".jnl")
            .and_then(|n| n.parse::<u64>().ok())
            && entry.file_type()?.is_file()
        {
            found.push((n, name, entry.metadata()?.len()));
        }
    }
    found.sort();
    Ok(found)
}

/// What a store holds, as far as the record writes it: every batch the writer
/// commits adds an audit entry or a checkpoint, so this changes with every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    entries: u64,
    checkpointed: u64,
}

/// Opens a private copy of the store at `path` with journal `k` cut to `len` bytes
/// and every later journal gone: what it holds, or `None` if fjall still refuses its
/// journal.
fn held_if_cut(
    path: &Path,
    journals: &[(u64, String, u64)],
    k: usize,
    len: u64,
) -> Result<Option<Held>, RecordError> {
    let copy = std::env::temp_dir().join(format!("airlock-store-{}", fsperm::random_suffix()));
    let _guard = CopyDir(copy.clone());
    let store_error = |e: std::io::Error| RecordError::Store(format!("copying the store: {e}"));
    copy_tree(path, &copy).map_err(store_error)?;
    for (_, name, _) in &journals[k + 1..] {
        std::fs::remove_file(copy.join(name)).map_err(store_error)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(copy.join(&journals[k].1))
        .and_then(|f| f.set_len(len))
        .map_err(store_error)?;
    match Spaces::open(&copy) {
        Ok(spaces) => Ok(Some(Held {
            entries: spaces.audit_len()?,
            checkpointed: spaces.checkpointed()?,
        })),
        Err(RecordError::JournalUnreadable(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Locates the first damaged batch of the stopped store at `path`; `None` if no cut
/// makes the store open (the damage is not in a journal).
pub(crate) fn locate(path: &Path) -> Result<Option<Damage>, RecordError> {
    let journals =
        journals(path).map_err(|e| RecordError::Store(format!("reading the store: {e}")))?;
    let mut damaged = None;
    for (k, (_, _, len)) in journals.iter().enumerate() {
        if held_if_cut(path, &journals, k, *len)?.is_none() {
            damaged = Some(k);
            break;
        }
    }
    let Some(k) = damaged else { return Ok(None) };
    let Some(at_start) = held_if_cut(path, &journals, k, 0)? else {
        return Ok(None);
    };
    // The longest cut that opens: it ends inside the batch after the damaged one, and
    // fjall drops the damaged batch with that torn tail.
    let (mut good, mut bad, mut held) = (0, journals[k].2, at_start);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        match held_if_cut(path, &journals, k, mid)? {
            Some(h) => (good, held) = (mid, h),
            None => bad = mid,
        }
    }
    // The shortest cut that holds as much: where the damaged batch starts.
    let (mut short, mut long) = (0, good);
    if at_start == held {
        long = 0;
    }
    while long - short > 1 {
        let mid = short + (long - short) / 2;
        if held_if_cut(path, &journals, k, mid)? == Some(held) {
            long = mid;
        } else {
            short = mid;
        }
    }
    Ok(Some(Damage {
        journal: journals[k].1.clone(),
        offset: long,
        readable_entries: held.entries,
        acknowledged: head::read_mark(path).ok().flatten().map(|m| m.entries),
    }))
}

/// `error`, named by where the damage is when it is fjall refusing the journal of the
/// stopped store at `path`.
pub(crate) fn named(path: &Path, error: RecordError) -> RecordError {
    match error {
        RecordError::JournalUnreadable(cause) => match locate(path) {
            Ok(Some(damage)) => RecordError::Damaged(damage),
            Ok(None) => RecordError::JournalUnreadable(cause),
            Err(e) => e,
        },
        e => e,
    }
}

/// Cuts the stopped store at `path` where `damage` starts, after copying the whole
/// store, as it was, to `keep` (0700) for investigation. What is cut is lost: accept
/// it with [`RecordOptions::accept_loss`](super::RecordOptions::accept_loss), which
/// records it.
pub fn cut_journal(path: &Path, damage: &Damage, keep: &Path) -> std::io::Result<()> {
    copy_tree(path, keep)?;
    let journals = journals(path)?;
    let k = journals
        .iter()
        .position(|(_, name, _)| *name == damage.journal)
        .ok_or_else(|| std::io::Error::other(format!("journal {} is gone", damage.journal)))?;
    for (_, name, _) in &journals[k + 1..] {
        std::fs::remove_file(path.join(name))?;
    }
    let journal = std::fs::OpenOptions::new()
        .write(true)
        .open(path.join(&damage.journal))?;
    journal.set_len(damage.offset)?;
    journal.sync_all()
}
