//! The record against a real fjall store: durable appends, verification, and each
//! kind of tampering named.

use std::time::Duration;

use super::*;
use crate::keys::SecretKey;

fn options(dir: &std::path::Path) -> RecordOptions {
    RecordOptions {
        checkpoint_every: 10,
        checkpoint_interval: Duration::from_secs(3600),
        ..RecordOptions::new(dir.join("store"))
    }
}

fn event(n: u64) -> AuditEvent {
    AuditEvent::new(EventKind::AgentAdded)
        .agent("agent-1")
        .detail(serde_json::json!({ "n": n }))
}

/// Writes `n` entries and closes the record; returns the public key.
fn fill(dir: &std::path::Path, n: u64) -> crate::keys::PublicKey {
    let key = SecretKey::generate();
    let public = key.public().clone();
    let record = Record::open(options(dir), key).unwrap();
    for i in 0..n {
        let receipt = record.write(Write::event(event(i))).unwrap();
        assert_eq!(
            receipt,
            Receipt {
                first_seq: i,
                count: 1
            }
        );
    }
    record.close();
    public
}

fn verify_store(
    dir: &std::path::Path,
    key: &crate::keys::PublicKey,
) -> Result<VerifyReport, VerifyError> {
    let spaces = Spaces::open(&dir.join("store")).unwrap();
    let lines = export_lines(&spaces, 0).unwrap();
    let leaf = |seq: u64| {
        use tlog_tiles::HashReader;
        spaces
            .read_hashes(&[tlog_tiles::stored_hash_index(0, seq)])
            .ok()
            .map(|h| h[0].0)
    };
    verify_log(&lines, &leaf, key, "airlock")
}

#[test]
fn a_valid_log_verifies_with_its_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let key = fill(dir.path(), 25);
    let report = verify_store(dir.path(), &key).unwrap();
    assert_eq!(report.entries, 25);
    // One every 10 entries, and one for the tail when the writer closed.
    assert_eq!(report.checkpoints, 3);
}

#[test]
fn one_changed_byte_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = fill(dir.path(), 20);
    {
        let spaces = Spaces::open(&dir.path().join("store")).unwrap();
        let mut bytes = spaces
            .audit
            .get(7u64.to_be_bytes())
            .unwrap()
            .unwrap()
            .to_vec();
        let at = bytes.iter().position(|&b| b == b'7').unwrap();
        bytes[at] = b'8';
        spaces.audit.insert(7u64.to_be_bytes(), bytes).unwrap();
        spaces.db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let err = verify_store(dir.path(), &key).unwrap_err();
    assert!(matches!(err, VerifyError::Entry { seq: 7, .. }), "{err}");
    assert!(
        err.to_string().starts_with("entry 7: was modified"),
        "{err}"
    );
}

#[test]
fn a_deleted_entry_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = fill(dir.path(), 20);
    {
        let spaces = Spaces::open(&dir.path().join("store")).unwrap();
        spaces.audit.remove(12u64.to_be_bytes()).unwrap();
        spaces.db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let err = verify_store(dir.path(), &key).unwrap_err();
    assert_eq!(
        err,
        VerifyError::Entry {
            seq: 12,
            reason: "is missing (the log jumps from entry 11 to entry 13)".into()
        }
    );
}

#[test]
fn a_rewritten_history_fails_against_a_checkpoint_kept_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let key = fill(dir.path(), 10);
    let saved = {
        let spaces = Spaces::open(&dir.path().join("store")).unwrap();
        spaces.latest_checkpoint().unwrap().unwrap()
    };
    let report = verify_store(dir.path(), &key).unwrap();
    let consistency = verify_against(&report, &saved, &key, "airlock").unwrap();
    assert_eq!(consistency.old.size, 10);

    // Someone holding the gateway's key rebuilds a different log from scratch: its own
    // checkpoints verify, but it is not an extension of the saved one.
    let other = tempfile::tempdir().unwrap();
    let record = Record::open(options(other.path()), SecretKey::generate()).unwrap();
    for i in 100..115 {
        record.write(Write::event(event(i))).unwrap();
    }
    record.close();
    let spaces = Spaces::open(&other.path().join("store")).unwrap();
    let lines: Vec<ExportLine> = export_lines(&spaces, 0)
        .unwrap()
        .into_iter()
        .filter(|l| matches!(l, ExportLine::Entry { .. }))
        .collect();
    let rebuilt = verify_log(&lines, &|_| None, &key, "airlock").unwrap();
    let err = verify_against(&rebuilt, &saved, &key, "airlock").unwrap_err();
    assert!(err.to_string().contains("history was rewritten"), "{err}");
}

#[test]
fn concurrent_writers_share_batches_and_the_chain_holds() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let public = key.public().clone();
    let record = Record::open(options(dir.path()), key).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let record = record.clone();
            std::thread::spawn(move || {
                for i in 0..250 {
                    record
                        .write(Write::event(event(t * 1000 + i)).put(
                            Space::Meta,
                            format!("k{t}-{i}"),
                            b"v".to_vec(),
                        ))
                        .unwrap();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert_eq!(
        record.spaces().meta.get("k3-249").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    record.close();
    assert_eq!(verify_store(dir.path(), &public).unwrap().entries, 1000);
}

#[test]
fn an_export_verifies_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let key = fill(dir.path(), 12);
    let spaces = Spaces::open(&dir.path().join("store")).unwrap();
    let text: Vec<u8> = export_lines(&spaces, 0)
        .unwrap()
        .iter()
        .flat_map(|l| {
            let mut line = l.to_line();
            line.push(b'\n');
            line
        })
        .collect();
    let lines = parse_export(&text).unwrap();
    assert_eq!(
        verify_log(&lines, &|_| None, &key, "airlock")
            .unwrap()
            .entries,
        12
    );
}

/// A byte flipped anywhere in the journal: either fjall still opens the store (the
/// flip is in its last batch, a torn tail) or the damage is located at or before the
/// flipped byte, and a store cut there opens holding exactly the entries named as
/// readable. The store itself is never changed by looking.
#[test]
fn a_flipped_journal_byte_is_located_at_or_before_it() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 40);
    let store = dir.path().join("store");
    let journal = store.join("0.jnl");
    let original = std::fs::read(&journal).unwrap();
    let end = original.iter().rposition(|&b| b != 0).unwrap();
    let mut located = 0;
    for flip in (16..end).step_by(end / 9) {
        let mut damaged = original.clone();
        damaged[flip] ^= 0x20;
        std::fs::write(&journal, &damaged).unwrap();
        match Spaces::open_copy(&store) {
            Ok(_) => {}
            Err(RecordError::Damaged(damage)) => {
                located += 1;
                assert!(damage.offset <= flip as u64, "{damage} (flipped {flip})");
                assert_eq!(damage.acknowledged, Some(40));
                let cut = tempfile::tempdir().unwrap();
                let copy = cut.path().join("store");
                let keep = cut.path().join("kept");
                super::store::copy_tree(&store, &copy).unwrap();
                cut_journal(&copy, &damage, &keep).unwrap();
                assert_eq!(
                    Spaces::open(&copy).unwrap().audit_len().unwrap(),
                    damage.readable_entries
                );
            }
            Err(e) => panic!("flipped {flip}: {e}"),
        }
        assert_eq!(
            std::fs::read(&journal).unwrap(),
            damaged,
            "looking changed it"
        );
    }
    std::fs::write(&journal, &original).unwrap();
    assert!(located >= 5, "only {located} flips were located");
}

/// A signed checkpoint lost with the journal's last batch (fjall drops a damaged last
/// batch as a torn tail) is named against the mark, like a lost entry.
#[test]
fn a_lost_checkpoint_is_a_shortfall() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 25);
    let store = dir.path().join("store");
    let mark = read_mark(&store).unwrap().unwrap();
    assert_eq!(
        mark.checkpointed, 25,
        "the closing checkpoint is acknowledged"
    );
    let spaces = Spaces::open(&store).unwrap();
    assert_eq!(check_mark(&spaces, Some(&mark)), Ok(()));
    spaces.checkpoints.remove(25u64.to_be_bytes()).unwrap();
    assert_eq!(
        check_mark(&spaces, Some(&mark)),
        Err(Shortfall::CheckpointMissing {
            found: 20,
            acknowledged: 25
        })
    );
}
