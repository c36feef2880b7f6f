//! The single writer: group commit, hash chain, tree hashes, checkpoints.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fjall::PersistMode;
use tokio::sync::oneshot;

use super::EventKind;
use super::entry::{AuditEvent, GENESIS, NewEntry, SCHEMA_VERSION, entry_hash, seq_key};
use super::store::{Space, Spaces};
use super::tree::{MemHashes, Overlay, TreeHead, append, sign_checkpoint};
use super::witness::Witness;
use super::{RecordError, head};
use crate::keys::SecretKey;

/// How the record is kept.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    pub path: PathBuf,
    /// The log's name in its checkpoints, e.g. `airlock.example.com/prod`.
    pub origin: String,
    /// Sign a checkpoint after this many new entries…
    pub checkpoint_every: u64,
    /// …or after this long with new entries, whichever comes first.
    pub checkpoint_interval: Duration,
    /// Most writes folded into one batch.
    pub max_batch: usize,
    /// How long a batch stays open for more writes after its first. Zero commits at
    /// once (latency first); a few milliseconds trade that latency for fewer fsyncs.
    pub commit_window: Duration,
    /// Open a store that falls short of its high-water mark, recording why as a
    /// `record.loss-accepted` entry (`airlock audit accept-loss`). Without it such a
    /// store is refused.
    pub accept_loss: Option<AcceptLoss>,
    /// Where each signed checkpoint is also handed, outside the gateway's data
    /// directory: a gateway that re-signs a rewritten history is caught by
    /// `audit verify --witness`.
    pub witnesses: Vec<Arc<dyn Witness>>,
}

impl RecordOptions {
    pub fn new(path: PathBuf) -> Self {
        RecordOptions {
            path,
            origin: "airlock".to_string(),
            checkpoint_every: 10_000,
            checkpoint_interval: Duration::from_secs(10),
            max_batch: 4096,
            commit_window: Duration::ZERO,
            accept_loss: None,
            witnesses: Vec::new(),
        }
    }
}

/// An operator's acceptance of a store that lost entries it had acknowledged.
#[derive(Debug, Clone)]
pub struct AcceptLoss {
    /// Why, in the operator's words, and who.
    pub reason: String,
    /// Where a damaged journal was cut to make the store readable, and where the store
    /// as it was is kept.
    pub cut: Option<(super::Damage, PathBuf)>,
}

/// One atomic write: state changes and the audit entries that explain them, committed
/// together or not at all.
#[derive(Debug, Default)]
pub struct Write {
    pub puts: Vec<(Space, Vec<u8>, Vec<u8>)>,
    pub deletes: Vec<(Space, Vec<u8>)>,
    pub events: Vec<AuditEvent>,
}

impl Write {
    pub fn event(event: AuditEvent) -> Self {
        Write {
            events: vec![event],
            ..Write::default()
        }
    }

    pub fn put(mut self, space: Space, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        self.puts.push((space, key.into(), value.into()));
        self
    }

    pub fn delete(mut self, space: Space, key: impl Into<Vec<u8>>) -> Self {
        self.deletes.push((space, key.into()));
        self
    }

    pub fn and(mut self, event: AuditEvent) -> Self {
        self.events.push(event);
        self
    }
}

/// Proof that a write is durable: the audit sequence numbers it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub first_seq: u64,
    pub count: u64,
}

struct Request {
    write: Write,
    reply: oneshot::Sender<Result<Receipt, RecordError>>,
}

/// Why the record is not ready, once it is not.
struct Health {
    poisoned: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Turns `true` when the record fails, for those who must stop at once.
    failed: tokio::sync::watch::Sender<bool>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            poisoned: AtomicBool::new(false),
            reason: Mutex::new(None),
            failed: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Health {
    fn poisoned_reason(&self) -> Option<String> {
        self.poisoned
            .load(Ordering::Acquire)
            .then(|| self.reason.lock().unwrap().clone().unwrap_or_default())
    }
}

/// The record handle: cheap to clone, shared by every part of the gateway.
#[derive(Clone)]
pub struct Record {
    spaces: Arc<Spaces>,
    tx: SyncSender<Option<Request>>,
    health: Arc<Health>,
    writer: Arc<WriterThread>,
}

struct WriterThread(Mutex<Option<JoinHandle<()>>>);

impl Record {
    /// Opens the store and starts the writer thread. `key` signs checkpoints.
    pub fn open(options: RecordOptions, key: SecretKey) -> Result<Self, RecordError> {
        let mark = head::read_mark(&options.path).map_err(RecordError::Store)?;
        let spaces = Arc::new(
            Spaces::open(&options.path).map_err(|e| super::damage::named(&options.path, e))?,
        );
        let shortfall = head::check(&spaces, mark.as_ref()).err();
        let loss = match (shortfall, &options.accept_loss) {
            (Some(shortfall), None) => return Err(RecordError::Shortened(shortfall)),
            (None, None) => None,
            // Nothing acknowledged was lost and nothing was cut: nothing to record.
            (None, Some(accepted)) if accepted.cut.is_none() => None,
            (shortfall, Some(accepted)) => Some(
                AuditEvent::new(EventKind::RecordLossAccepted).detail(serde_json::json!({
                    "shortfall": shortfall.map(|s| s.to_string()),
                    "acknowledged": mark,
                    "found_entries": spaces.audit_len()?,
                    "reason": accepted.reason,
                    "cut": accepted.cut.as_ref().map(|(damage, kept_at)| serde_json::json!({
                        "journal": damage.journal,
                        "offset": damage.offset,
                        "readable_entries": damage.readable_entries,
                        "kept_at": kept_at,
                    })),
                })),
            ),
        };
        let next_seq = spaces.audit_len()?;
        let head = match next_seq {
            0 => GENESIS,
            n => {
                let bytes = spaces
                    .audit
                    .get(seq_key(n - 1))?
                    .ok_or_else(|| RecordError::Store("last audit entry vanished".into()))?;
                entry_hash(&bytes)
            }
        };
        let last_checkpoint = spaces.checkpointed()?;
        let (tx, rx) = sync_channel(options.max_batch * 4);
        let health = Arc::new(Health::default());
        let mut writer = Writer {
            spaces: spaces.clone(),
            health: health.clone(),
            key,
            next_seq,
            head,
            last_checkpoint,
            last_checkpoint_at: Instant::now(),
            marked: spaces.meta.get(head::MARKED)?.is_some(),
            options,
        };
        let thread = std::thread::Builder::new()
            .name("airlock-record-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| RecordError::Store(format!("cannot start the writer thread: {e}")))?;
        let record = Record {
            spaces,
            tx,
            health,
            writer: Arc::new(WriterThread(Mutex::new(Some(thread)))),
        };
        if let Some(loss) = loss {
            // The first entry committed: before anything else is written.
            record.write_queued(Write::event(loss))?;
        }
        Ok(record)
    }

    pub fn spaces(&self) -> &Spaces {
        &self.spaces
    }

    /// `Err(reason)` once a write or fsync has failed.
    pub fn ready(&self) -> Result<(), RecordError> {
        match self.health.poisoned_reason() {
            Some(reason) => Err(RecordError::NotReady(reason)),
            None => Ok(()),
        }
    }

    fn submit(
        &self,
        write: Write,
    ) -> Result<oneshot::Receiver<Result<Receipt, RecordError>>, RecordError> {
        self.ready()?;
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Some(Request { write, reply })) {
            Ok(()) => Ok(rx),
            // The queue is full: wait for room rather than drop a write.
            Err(TrySendError::Full(request)) => {
                self.tx.send(request).map_err(|_| RecordError::Closed)?;
                Ok(rx)
            }
            Err(TrySendError::Disconnected(_)) => Err(RecordError::Closed),
        }
    }

    /// Writes and waits until the write is durable. Do not call from async code.
    pub fn write(&self, write: Write) -> Result<Receipt, RecordError> {
        self.submit(write)?
            .blocking_recv()
            .map_err(|_| RecordError::Closed)?
    }

    /// Writes and resolves when the write is durable.
    pub async fn write_async(&self, write: Write) -> Result<Receipt, RecordError> {
        self.submit(write)?.await.map_err(|_| RecordError::Closed)?
    }

    /// Queues a write without waiting for it to be durable. Writes are committed in
    /// the order they are queued, each within the writer's next group commit; if one
    /// fails the record is poisoned and [`Record::failure`] resolves.
    pub fn write_queued(&self, write: Write) -> Result<(), RecordError> {
        self.submit(write).map(drop)
    }

    /// Resolves with the reason once a write or fsync has failed. It holds no handle
    /// to the writer, so waiting on it does not keep the record open.
    pub fn failure(&self) -> impl Future<Output = String> + Send + 'static {
        let health = self.health.clone();
        let mut failed = health.failed.subscribe();
        async move {
            let _ = failed.wait_for(|failed| *failed).await;
            health.poisoned_reason().unwrap_or_default()
        }
    }

    /// Stops the writer after it has committed everything already submitted; later
    /// writes, through any clone, fail with [`RecordError::Closed`].
    pub fn close(self) {
        let Record { tx, writer, .. } = self;
        let _ = tx.send(None);
        drop(tx);
        if let Some(thread) = writer.0.lock().unwrap().take() {
            let _ = thread.join();
        }
    }
}

struct Writer {
    spaces: Arc<Spaces>,
    health: Arc<Health>,
    key: SecretKey,
    next_seq: u64,
    head: [u8; 32],
    last_checkpoint: u64,
    last_checkpoint_at: Instant,
    options: RecordOptions,
    /// The store says it has a mark beside it (`head::MARKED`).
    marked: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Writer {
    /// Commits what arrives until the channel closes or a stop (`None`) arrives.
    fn run(&mut self, rx: Receiver<Option<Request>>) {
        loop {
            let first = match rx.recv_timeout(self.options.checkpoint_interval) {
                Ok(Some(request)) => request,
                Err(RecvTimeoutError::Timeout) => {
                    self.checkpoint_if_due(true);
                    continue;
                }
                Ok(None) | Err(RecvTimeoutError::Disconnected) => {
                    self.checkpoint_if_due(true);
                    return;
                }
            };
            let mut batch = vec![first];
            let mut stop = false;
            if !self.options.commit_window.is_zero() {
                // Sleep through the window rather than wake for each write: senders do
                // not wake a writer that is not waiting on the channel.
                std::thread::sleep(self.options.commit_window);
            }
            while batch.len() < self.options.max_batch {
                match rx.try_recv() {
                    Ok(Some(request)) => batch.push(request),
                    Ok(None) => {
                        stop = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.commit(batch);
            self.checkpoint_if_due(stop);
            if stop {
                return;
            }
        }
    }

    fn poison(&self, reason: String) {
        tracing::error!(error = %reason, "record write failed; refusing every action from now on");
        *self.health.reason.lock().unwrap() = Some(reason);
        self.health.poisoned.store(true, Ordering::Release);
        self.health.failed.send_replace(true);
    }

    /// Commits a batch as one fjall batch and one fsync, then answers every caller.
    fn commit(&mut self, batch: Vec<Request>) {
        if let Some(reason) = self.health.poisoned_reason() {
            for request in batch {
                let _ = request
                    .reply
                    .send(Err(RecordError::NotReady(reason.clone())));
            }
            return;
        }
        let mut fjall_batch = self.spaces.db.batch();
        if !self.marked {
            // From now on this store has a mark beside it; a missing one is a loss.
            fjall_batch.insert(&self.spaces.meta, head::MARKED, b"1".as_slice());
        }
        let mut staged = MemHashes::default();
        let (mut seq, mut head) = (self.next_seq, self.head);
        let time_ms = now_ms();
        let mut receipts = Vec::with_capacity(batch.len());
        let mut failure = None;
        'build: for request in &batch {
            let write = &request.write;
            for (space, key, value) in &write.puts {
                fjall_batch.insert(self.spaces.space(*space), key.clone(), value.clone());
            }
            for (space, key) in &write.deletes {
                fjall_batch.remove(self.spaces.space(*space), key.clone());
            }
            let first_seq = seq;
            for event in &write.events {
                let prev = hex::encode(head);
                let entry = NewEntry {
                    seq,
                    time_ms,
                    prev: &prev,
                    schema: SCHEMA_VERSION,
                    event,
                };
                let bytes = serde_json::to_vec(&entry).expect("an audit entry serializes");
                let hashes = append(
                    seq,
                    &bytes,
                    &Overlay {
                        staged: &staged,
                        base: &*self.spaces,
                    },
                );
                match hashes {
                    Ok(hashes) => {
                        for (index, hash) in hashes {
                            fjall_batch.insert(&self.spaces.tree, index.to_be_bytes(), hash.0);
                            staged.hashes.insert(index, hash);
                        }
                    }
                    Err(e) => {
                        failure = Some(format!("tree hashes for entry {seq}: {e}"));
                        break 'build;
                    }
                }
                head = entry_hash(&bytes);
                fjall_batch.insert(&self.spaces.audit, seq_key(seq), bytes);
                seq += 1;
            }
            receipts.push(Receipt {
                first_seq,
                count: seq - first_seq,
            });
        }
        let result = match failure {
            Some(reason) => Err(reason),
            None => fjall_batch
                .commit()
                .and_then(|()| self.spaces.db.persist(PersistMode::SyncAll))
                .map_err(|e| e.to_string()),
        };
        match result {
            Ok(()) => {
                self.marked = true;
                self.next_seq = seq;
                self.head = head;
                // Before anyone hears of the commit: the mark never lags an answer.
                self.write_mark();
                for (request, receipt) in batch.into_iter().zip(receipts) {
                    let _ = request.reply.send(Ok(receipt));
                }
            }
            Err(reason) => {
                self.poison(reason.clone());
                for request in batch {
                    let _ = request
                        .reply
                        .send(Err(RecordError::NotReady(reason.clone())));
                }
            }
        }
    }

    /// Signs a checkpoint when enough entries or enough time have passed.
    fn checkpoint_if_due(&mut self, idle: bool) {
        let size = self.next_seq;
        if size == self.last_checkpoint || self.health.poisoned.load(Ordering::Acquire) {
            return;
        }
        let due = size - self.last_checkpoint >= self.options.checkpoint_every
            || self.last_checkpoint_at.elapsed() >= self.options.checkpoint_interval
            || idle;
        if !due {
            return;
        }
        let result = tlog_tiles::tree_hash(size, &*self.spaces)
            .map_err(|e| e.to_string())
            .and_then(|root| {
                sign_checkpoint(
                    &self.key,
                    &self.options.origin,
                    &TreeHead { size, root: root.0 },
                )
                .map_err(|e| e.to_string())
            })
            .and_then(|note| {
                self.spaces
                    .checkpoints
                    .insert(size.to_be_bytes(), note.clone())
                    .and_then(|()| self.spaces.db.persist(PersistMode::SyncAll))
                    .map_err(|e| e.to_string())?;
                let line = super::ExportLine::Checkpoint(note).to_line();
                for witness in &self.options.witnesses {
                    witness.witness(&line);
                }
                Ok(())
            });
        match result {
            Ok(()) => {
                self.last_checkpoint = size;
                self.last_checkpoint_at = Instant::now();
                // A signed checkpoint lost with a damaged last batch is a loss too.
                self.write_mark();
            }
            Err(reason) => self.poison(format!("checkpoint at size {size}: {reason}")),
        }
    }

    /// Rewrites the high-water mark with what is now durable.
    fn write_mark(&self) {
        let mark = head::HeadMark {
            entries: self.next_seq,
            head: hex::encode(self.head),
            checkpointed: self.last_checkpoint,
        };
        if let Err(e) = head::write_mark(&self.options.path, &mark) {
            tracing::warn!(error = %e, "cannot update the record's high-water mark");
        }
    }
}
