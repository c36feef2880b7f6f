//! What a session keeps of the extended protocol between messages: prepared
//! statements, portals, and whether the rest of a batch is dropped after an error.

use std::sync::Arc;

use super::classify::Statement;
use super::wire::Field;

/// What to do with client messages after an error in an extended-protocol batch: drop
/// them up to Sync, as PostgreSQL does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Discard {
    No,
    /// The gateway refused: it answers the Sync itself.
    Local,
    /// The upstream failed and skips to Sync too: the Sync goes upstream.
    Upstream,
}

/// A statement prepared through this gateway: its classification (`None` for an empty
/// query, which runs nothing).
pub(super) struct Prepared {
    pub(super) statement: Option<Statement>,
}

/// A result's columns, or `None` for a statement that returns no rows.
pub(super) type RowShape = Option<Arc<Vec<Field>>>;

/// A portal bound through this gateway: its statement, and its parameters for the
/// record.
#[derive(Clone)]
pub(super) struct Portal {
    pub(super) prepared: Arc<Prepared>,
    pub(super) params: serde_json::Value,
}
