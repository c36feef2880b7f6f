//! `airlock audit …`: verify, checkpoint, export, tail, schema. They read the store directly
//! when the gateway is stopped, and ask the running gateway for an export otherwise;
//! verification always happens here, in the operator's process.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use airlock::api::admin::{AdminRequest, call, export_from};
use airlock::keys::PublicKey;
use airlock::record::{
    AcceptLoss, AuditEntry, ExportLine, Record, RecordError, RecordOptions, Shortfall, Spaces,
    StoreCopy, check_mark, cut_journal, export_lines, parse_export, read_mark, verify_against,
    verify_log,
};

use super::Context;

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the hash chain, the tree leaves and every signed checkpoint; name the
    /// first entry that does not verify.
    Verify {
        /// Also prove the log extends this checkpoint (one you saved elsewhere).
        #[arg(long, value_name = "CHECKPOINT")]
        against: Option<PathBuf>,
        /// Verify an export (JSON Lines) instead of the gateway's store.
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
        /// The gateway's public key (default: DATA/gateway-signing.key.pub).
        #[arg(long, value_name = "PUBKEY")]
        key: Option<String>,
        /// Also prove the log extends every checkpoint in this witness file
        /// (`record.witness`).
        #[arg(long, value_name = "FILE")]
        witness: Option<PathBuf>,
    },
    /// Print the latest signed checkpoint, to keep outside the gateway.
    Checkpoint,
    /// Write entries (and checkpoints) as JSON Lines.
    Export {
        /// A sequence number, or an RFC 3339 time.
        #[arg(long, default_value = "0")]
        since: String,
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl"])]
        format: String,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Print the last entries.
    Tail {
        #[arg(short = 'n', default_value = "20")]
        n: usize,
        /// Then keep printing new entries as the running gateway records them.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Print the published JSON Schema (2020-12) every exported entry follows: each
    /// kind's fields, documented. An entry's `schema` field names its version.
    Schema,
    /// Accept that the stopped gateway's store lost entries it had acknowledged (as
    /// `verify` and `serve` report), so the gateway can serve again. The acceptance,
    /// with the reason and what was lost, becomes the next entry of the log.
    AcceptLoss {
        /// Why: recorded with the loss.
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
}

/// The log's lines and, when read from the store, each entry's stored tree leaf and
/// how the store falls short of what the gateway acknowledged, if it does.
struct Source {
    lines: Vec<ExportLine>,
    leaves: Option<StoreCopy>,
    shortfall: Option<Shortfall>,
}

/// A stopped gateway's store is read from a private copy, never opened in place (see
/// `Spaces::open_copy`); a running gateway is asked for an export.
fn source(context: &Context) -> anyhow::Result<Source> {
    let data = context.data_dir()?;
    let store = data.store_dir();
    match Spaces::open_copy(&store) {
        Ok(copy) => {
            let mark = read_mark(&store).map_err(anyhow::Error::msg)?;
            Ok(Source {
                lines: export_lines(&copy.spaces, 0)?,
                shortfall: check_mark(&copy.spaces, mark.as_ref()).err(),
                leaves: Some(copy),
            })
        }
        Err(RecordError::Locked { .. }) => {
            let result = call(
                &data.admin_socket(),
                &AdminRequest::AuditExport { since: 0 },
            )?;
            Ok(Source {
                lines: export_from(&result).map_err(anyhow::Error::msg)?,
                leaves: None,
                shortfall: None,
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn entries(lines: &[ExportLine]) -> impl Iterator<Item = (u64, &Vec<u8>)> {
    lines.iter().filter_map(|l| match l {
        ExportLine::Entry { seq, bytes } => Some((*seq, bytes)),
        ExportLine::Checkpoint(_) => None,
    })
}

/// Prints entries from `next` on as the running gateway records them, once a second,
/// until interrupted or the gateway stops.
fn follow_entries(context: &Context, mut next: u64) -> anyhow::Result<()> {
    let socket = context.data_dir()?.admin_socket();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let result = call(&socket, &AdminRequest::AuditExport { since: next })
            .context("the gateway stopped")?;
        let lines = export_from(&result).map_err(anyhow::Error::msg)?;
        let mut out = std::io::stdout().lock();
        for (seq, bytes) in entries(&lines) {
            if seq >= next {
                out.write_all(bytes)?;
                out.write_all(b"\n")?;
                next = seq + 1;
            }
        }
        out.flush()?;
    }
}

pub(crate) fn run(context: &Context, command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify {
            against,
            export,
            key,
            witness,
        } => {
            let config = context.config()?;
            let origin = &config.gateway.name;
            let key = match key {
                Some(k) => PublicKey::from_arg(&k)?,
                None => {
                    let path = context.data_dir()?.signing_key().with_extension("key.pub");
                    PublicKey::from_arg(path.to_str().unwrap_or_default())
                        .with_context(|| "the gateway's public key (pass --key)")?
                }
            };
            let source = match export {
                Some(file) => Source {
                    lines: parse_export(
                        &std::fs::read(&file).with_context(|| file.display().to_string())?,
                    )
                    .map_err(anyhow::Error::msg)?,
                    leaves: None,
                    shortfall: None,
                },
                None => source(context)?,
            };
            if let Some(shortfall) = &source.shortfall {
                println!("audit log does NOT verify: {shortfall} (the gateway's store.head)");
                return Ok(ExitCode::FAILURE);
            }
            let leaf = |seq: u64| {
                use tlog_tiles::HashReader;
                source
                    .leaves
                    .as_ref()?
                    .spaces
                    .read_hashes(&[tlog_tiles::stored_hash_index(0, seq)])
                    .ok()
                    .map(|h| h[0].0)
            };
            let report = match verify_log(&source.lines, &leaf, &key, origin) {
                Ok(report) => report,
                Err(e) => {
                    println!("audit log does NOT verify: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            println!(
                "ok: {} entries and {} signed checkpoints verify; head {} {}",
                report.entries,
                report.checkpoints,
                report.head.size,
                hex::encode(report.head.root)
            );
            if let Some(file) = witness {
                let bytes = std::fs::read(&file).with_context(|| file.display().to_string())?;
                let notes: Vec<Vec<u8>> = parse_export(&bytes)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| file.display().to_string())?
                    .into_iter()
                    .filter_map(|line| match line {
                        ExportLine::Checkpoint(note) => Some(note),
                        ExportLine::Entry { .. } => None,
                    })
                    .collect();
                for (i, note) in notes.iter().enumerate() {
                    if let Err(e) = verify_against(&report, note, &key, origin) {
                        println!(
                            "NOT consistent with witnessed checkpoint {} of {} in {}: {e}",
                            i + 1,
                            notes.len(),
                            file.display()
                        );
                        return Ok(ExitCode::FAILURE);
                    }
                }
                println!(
                    "consistent with all {} checkpoints witnessed in {}",
                    notes.len(),
                    file.display()
                );
            }
            if let Some(file) = against {
                let note = std::fs::read(&file).with_context(|| file.display().to_string())?;
                match verify_against(&report, &note, &key, origin) {
                    Ok(c) => println!(
                        "consistent: the log ({} entries) extends the saved checkpoint ({} entries); the consistency proof ({} hashes) checks",
                        c.new.size, c.old.size, c.proof_len
                    ),
                    Err(e) => {
                        println!("NOT consistent with {}: {e}", file.display());
                        return Ok(ExitCode::FAILURE);
                    }
                }
            }
        }
        AuditCommand::Schema => print!("{}", airlock::record::SCHEMA),
        AuditCommand::Checkpoint => {
            let data = context.data_dir()?;
            let note = match Spaces::open_copy(&data.store_dir()) {
                Ok(copy) => copy
                    .spaces
                    .latest_checkpoint()?
                    .map(|n| String::from_utf8_lossy(&n).into_owned())
                    .context("no checkpoint has been signed yet")?,
                Err(RecordError::Locked { .. }) => {
                    call(&data.admin_socket(), &AdminRequest::AuditCheckpoint)?
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                }
                Err(e) => return Err(e.into()),
            };
            print!("{note}");
        }
        AuditCommand::Export {
            since,
            format: _,
            out,
        } => {
            let source = source(context)?;
            let since_seq = since.parse::<u64>().ok();
            let since_ms = match since_seq {
                Some(_) => 0,
                None => humantime::parse_rfc3339_weak(&since)
                    .with_context(|| {
                        format!("--since {since}: a sequence number or an RFC 3339 time")
                    })?
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_millis() as u64,
            };
            let mut output: Box<dyn std::io::Write> = match &out {
                Some(file) => Box::new(
                    std::fs::File::create(file).with_context(|| file.display().to_string())?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            for line in &source.lines {
                let keep = match line {
                    ExportLine::Checkpoint(_) => true,
                    ExportLine::Entry { seq, bytes } => match since_seq {
                        Some(s) => *seq >= s,
                        None => serde_json::from_slice::<AuditEntry>(bytes)
                            .is_ok_and(|e| e.time_ms >= since_ms),
                    },
                };
                if keep {
                    output.write_all(&line.to_line())?;
                    output.write_all(b"\n")?;
                }
            }
        }
        AuditCommand::AcceptLoss { reason } => {
            let reason = reason.trim();
            anyhow::ensure!(
                !reason.is_empty() && !reason.chars().any(char::is_control),
                "--reason must say, in one line, why the loss is accepted"
            );
            let config = context.config()?;
            let data = context.data_dir()?;
            let store = data.store_dir();
            // A damaged journal is cut where the damage starts (fjall cannot read past
            // it), after the store as it was is kept beside it.
            let cut = match Spaces::open_copy(&store) {
                Err(RecordError::Damaged(damage)) => {
                    let kept = data.root().join(format!(
                        "store.damaged-{}",
                        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    ));
                    cut_journal(&store, &damage, &kept)
                        .with_context(|| format!("cutting the journal: {damage}"))?;
                    println!(
                        "cut: {damage}; the store as it was is kept at {}",
                        kept.display()
                    );
                    Some((damage, kept))
                }
                Err(RecordError::Locked { .. }) => anyhow::bail!(
                    "stop the gateway first: a running gateway's store holds everything it acknowledged"
                ),
                _ => None,
            };
            // Opened in place, not copied: accepting the loss writes to this store.
            let shortfall = {
                let spaces = Spaces::open(&store)?;
                let mark = read_mark(&store).map_err(anyhow::Error::msg)?;
                check_mark(&spaces, mark.as_ref()).err()
            };
            if shortfall.is_none() && cut.is_none() {
                println!("nothing to accept: the store holds everything this gateway acknowledged");
                return Ok(ExitCode::SUCCESS);
            }
            let operator = format!("uid:{}", rustix::process::getuid().as_raw());
            let key = airlock::keys::SecretKey::read(&data.signing_key())?;
            let record = Record::open(
                RecordOptions {
                    origin: config.gateway.name.clone(),
                    accept_loss: Some(AcceptLoss {
                        reason: format!("{reason} (accepted by {operator})"),
                        cut,
                    }),
                    ..RecordOptions::new(store)
                },
                key,
            )?;
            record.close();
            match shortfall {
                Some(shortfall) => {
                    println!("accepted and recorded: {shortfall}; the gateway can start again")
                }
                None => println!(
                    "accepted and recorded: the journal was cut, no acknowledged entry was lost; the gateway can start again"
                ),
            }
        }
        AuditCommand::Tail { n, follow } => {
            let source = source(context)?;
            let all: Vec<_> = entries(&source.lines).collect();
            for (_, bytes) in &all[all.len().saturating_sub(n)..] {
                println!("{}", String::from_utf8_lossy(bytes));
            }
            if follow {
                anyhow::ensure!(
                    source.leaves.is_none(),
                    "nothing to follow: the gateway is not running"
                );
                let next = all.last().map_or(0, |(seq, _)| seq + 1);
                follow_entries(context, next)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
