//! What every listener does when `accept` fails.

use std::time::Duration;

/// How long a listener pauses after a failed accept.
const PAUSE: Duration = Duration::from_millis(100);

/// Waits out a failed accept (most often: the process has used up its open files). It
/// says so, then pauses, so a listener that cannot accept neither spins nor fills the
/// log while it cannot, and goes on serving once it can.
pub async fn pause_after(listener: &str, error: &std::io::Error) {
    tracing::warn!(error = %error, "{listener}: accept failed; pausing");
    tokio::time::sleep(PAUSE).await;
}
