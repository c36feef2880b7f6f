//! Reading a channel on a task of its own.
//!
//! russh hands a channel's messages over through a bounded queue, and its session loop
//! waits while that queue is full: and with it, the window adjusts that writes in the
//! other direction wait for. A relay that stops reading one side while it waits to write
//! to the other can stall both for good (an `scp` download through the SFTP relay did).
//! So each side is read here, into a queue bounded by bytes rather than by messages: a
//! write that waits never stops a read, and a peer that floods is held at the bound.

use std::sync::Arc;

use russh::{ChannelMsg, ChannelReadHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Data read from one side and not yet relayed, at most.
const BUFFERED_BYTES: u32 = 8 << 20;

/// The messages of one side of a channel, read ahead.
pub(super) struct Inbox {
    rx: mpsc::UnboundedReceiver<(ChannelMsg, OwnedSemaphorePermit)>,
}

impl Inbox {
    /// Reads `read` on a task of its own until the channel or this inbox goes.
    pub(super) fn read(mut read: ChannelReadHalf) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(BUFFERED_BYTES as usize));
        tokio::spawn(async move {
            while let Some(msg) = read.wait().await {
                let bytes = match &msg {
                    ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => data.len(),
                    _ => 0,
                };
                let bytes = u32::try_from(bytes)
                    .unwrap_or(u32::MAX)
                    .clamp(1, BUFFERED_BYTES);
                let Ok(permit) = budget.clone().acquire_many_owned(bytes).await else {
                    break;
                };
                if tx.send((msg, permit)).is_err() {
                    break;
                }
            }
        });
        Inbox { rx }
    }

    /// The next message; `None` once the channel is gone.
    pub(super) async fn recv(&mut self) -> Option<ChannelMsg> {
        self.rx.recv().await.map(|(msg, _taken)| msg)
    }
}
