//! The kinds of audit entries. Each is documented, field by field, by the published
//! schema (`gateway/schema/audit-v1.schema.json`, printed by `airlock audit schema`),
//! and a test holds the two to the same list: a kind the code writes is a kind an
//! auditor can look up.

macro_rules! kinds {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// What an audit entry records.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventKind {
            $($(#[$doc])* $variant,)*
        }

        impl EventKind {
            /// Every kind, in the schema's order.
            pub const ALL: &[EventKind] = &[$(EventKind::$variant,)*];

            /// The name stored in an entry's `kind` field.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(EventKind::$variant => $name,)*
                }
            }
        }
    };
}

kinds! {
    /// The gateway started serving (after closing sessions a crash left open).
    GatewayStarted = "gateway.started",
    /// The gateway stopped on a signal.
    GatewayStopped = "gateway.stopped",
    /// An operator accepted a store that fell short of its high-water mark.
    RecordLossAccepted = "record.loss-accepted",
    /// A policy bundle started deciding.
    PolicyActivated = "policy.activated",
    /// An installed bundle did not load; the active one stays.
    PolicyRefused = "policy.refused",
    /// The active bundle's validity ended: every decision is denied.
    PolicyExpired = "policy.expired",
    /// The policy directory became writable by others: every decision is denied.
    PolicyUnsafe = "policy.unsafe",
    AgentAdded = "agent.added",
    AgentRevoked = "agent.revoked",
    TargetAdded = "target.added",
    TargetRemoved = "target.removed",
    /// A refused agent API call.
    ApiRefused = "api.refused",
    GrantRequested = "grant.requested",
    /// Policy's decision on a request, with every module's vote.
    GrantDecided = "grant.decided",
    GrantApproved = "grant.approved",
    GrantCollected = "grant.collected",
    GrantDenied = "grant.denied",
    GrantRevoked = "grant.revoked",
    GrantExpired = "grant.expired",
    GrantEnded = "grant.ended",
    /// A refused login at a proxy.
    SessionRefused = "session.refused",
    SessionOpened = "session.opened",
    SessionClosed = "session.closed",
    /// A grant's end reached the upstream session.
    SessionUpstreamEnded = "session.upstream-ended",
    /// One statement and its verdict.
    SqlStatement = "sql.statement",
    /// What one statement's results were, and what was masked.
    SqlResult = "sql.result",
    /// The upstream answered a read with a write's command tag.
    SqlMismatch = "sql.mismatch",
    /// A pinned session setting changed mid-session.
    SqlPinBroken = "sql.pin-broken",
    /// One SSH channel request (exec, shell, subsystem, env, forwarding…) and its
    /// verdict.
    SshRequest = "ssh.request",
    /// How an SSH channel's command or shell ended, and the bytes it moved.
    SshResult = "ssh.result",
    /// A chunk of an SSH channel's terminal stream, as asciicast v2 events.
    SshCast = "ssh.cast",
    /// One SFTP operation, on the path the upstream resolved, and its verdict.
    SftpOperation = "sftp.operation",
    /// What moved through one SFTP handle, once it closed.
    SftpTransfer = "sftp.transfer",
    /// One HTTP request to an HTTP or Kubernetes target and its verdict.
    HttpRequest = "http.request",
    /// How an allowed HTTP request ended: status, bytes, masking.
    HttpResult = "http.result",
    /// A chunk of a Kubernetes exec or attach stream, as asciicast v2 events.
    KubeCast = "kube.cast",
}

#[cfg(test)]
mod tests {
    use super::EventKind;
    use crate::record::SCHEMA;

    #[test]
    fn the_published_schema_documents_exactly_the_kinds_the_gateway_writes() {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
        jsonschema::draft202012::new(&schema).expect("the schema is a valid 2020-12 schema");
        let listed: Vec<&str> = schema["properties"]["kind"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        let written: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(listed, written);
        for kind in written {
            assert!(
                schema["$defs"][kind]["properties"]["detail"].is_object()
                    || schema["$defs"][kind]["properties"]["detail"] == false,
                "{kind} has no definition"
            );
        }
    }

    #[test]
    fn the_schema_refuses_what_a_kind_does_not_say() {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
        let validator = jsonschema::draft202012::new(&schema).unwrap();
        let entry = |kind: &str, detail: serde_json::Value| {
            serde_json::json!({
                "seq": 7, "time_ms": 1, "prev": "0".repeat(64), "schema": 1,
                "kind": kind, "agent": "claude", "target": "prod-db", "grant": "g_0123456789abcdef",
                "detail": detail,
            })
        };
        let good = serde_json::json!({ "task": "t", "access": "read", "ttl_seconds": 60 });
        assert!(validator.is_valid(&entry("grant.requested", good.clone())));
        let mut debug_text = good.clone();
        debug_text["access"] = "Access::Read".into();
        let mut extra = good.clone();
        extra["secret"] = "s".into();
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("task");
        for bad in [
            entry("grant.requested", debug_text),
            entry("grant.requested", extra),
            entry("grant.requested", missing),
            entry("grant.unheard-of", good.clone()),
            entry("grant.collected", good),
        ] {
            assert!(!validator.is_valid(&bad), "{bad}");
        }
    }
}
