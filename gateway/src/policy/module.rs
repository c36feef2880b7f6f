//! One loaded policy module: pre-instantiated once, a fresh instance per call, and every
//! way a call can go wrong turned into a [`Fault`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::ResourceLimiter;
use wasmtime::{Store, Trap};

use super::bindings::{Policy, PolicyPre, host};
use super::engine::PolicyEngine;
use super::scope::{Hook, Scope};
use super::types::{Action, Column, GrantContext, GrantRequest, Payload, Rows, Target, Verdict};

/// Longest reason or hint a module may return; a longer one is malformed output.
const MAX_REASON_BYTES: usize = 4096;
/// Log lines one call may write; more are dropped so a module cannot flood the log.
const MAX_LOG_LINES: u32 = 16;
/// Longest log line kept.
const MAX_LOG_BYTES: usize = 1024;

/// Why a call into a module did not produce a usable answer. Every fault is a deny.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Fault {
    #[error("ran past its {0:?} deadline")]
    Deadline(Duration),
    #[error("ran past the {0:?} deadline of the whole decision")]
    DecisionDeadline(Duration),
    #[error("exceeded its memory limit of {0} bytes")]
    Memory(usize),
    #[error("overflowed its stack")]
    StackOverflow,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned malformed output: {0}")]
    Malformed(String),
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
}

/// A compiled, pre-instantiated policy module and where it applies.
pub struct LoadedModule {
    engine: Arc<PolicyEngine>,
    name: Arc<str>,
    digest: Arc<str>,
    scope: Scope,
    pre: PolicyPre<GuestState>,
}

impl LoadedModule {
    pub(crate) fn new(
        engine: Arc<PolicyEngine>,
        name: Arc<str>,
        digest: Arc<str>,
        scope: Scope,
        pre: PolicyPre<GuestState>,
    ) -> Self {
        LoadedModule {
            engine,
            name,
            digest,
            scope,
            pre,
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Hex sha256 of the component's bytes, as the bundle manifest names it.
    pub fn digest(&self) -> &Arc<str> {
        &self.digest
    }

    /// Instantiates the module once under its call deadline, as every call will: a
    /// start function that traps or never returns would fail every decision.
    pub(crate) fn probe(&self) -> Result<(), Fault> {
        self.call(
            Instant::now() + self.engine.limits().deadline,
            |_, _| Ok(()),
        )
    }

    pub fn applies(&self, hook: Hook, target: &Target) -> bool {
        self.scope.applies(hook, target)
    }

    pub fn authorize(&self, request: &GrantRequest, deadline: Instant) -> Result<Verdict, Fault> {
        self.call(deadline, |policy, store| {
            policy.call_authorize(store, request)
        })
        .and_then(checked_verdict)
    }

    pub fn check(
        &self,
        context: &GrantContext,
        action: &Action,
        deadline: Instant,
    ) -> Result<Verdict, Fault> {
        self.call(deadline, |policy, store| {
            policy.call_check(store, context, action)
        })
        .and_then(checked_verdict)
    }

    /// The indices of `columns` this module masks.
    pub fn mask_columns(
        &self,
        context: &GrantContext,
        columns: &[Column],
        deadline: Instant,
    ) -> Result<Vec<u32>, Fault> {
        let indices = self.call(deadline, |policy, store| {
            policy.call_mask_columns(store, context, columns)
        })?;
        match indices.iter().find(|&&i| i as usize >= columns.len()) {
            Some(i) => Err(Fault::Malformed(format!(
                "mask-columns named column {i}, but there are {}",
                columns.len()
            ))),
            None => Ok(indices),
        }
    }

    /// Masks one payload; the result must keep the input's kind, columns and shape.
    pub fn mask(
        &self,
        context: &GrantContext,
        payload: &Payload,
        deadline: Instant,
    ) -> Result<Payload, Fault> {
        let masked = self.call(deadline, |policy, store| {
            policy.call_mask(store, context, payload)
        })?;
        same_shape(payload, &masked)?;
        Ok(masked)
    }

    fn call<R>(
        &self,
        deadline: Instant,
        f: impl FnOnce(&Policy, &mut Store<GuestState>) -> wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        let mut store = self.engine.new_store(&self.name, deadline)?;
        let policy = self.pre.instantiate(&mut store).map_err(|e| {
            self.fault(e, &store)
                .unwrap_or_else(|e| Fault::Instantiate(format!("{e:#}")))
        })?;
        f(&policy, &mut store).map_err(|e| {
            self.fault(e, &store)
                .unwrap_or_else(|e| Fault::Malformed(format!("{e:#}")))
        })
    }

    /// Names the cause of a failed call, or hands back an error that is not a guest
    /// fault so the caller can say which phase it came from.
    fn fault(
        &self,
        error: wasmtime::Error,
        store: &Store<GuestState>,
    ) -> Result<Fault, wasmtime::Error> {
        let limits = self.engine.limits();
        if store.data().memory.exceeded {
            return Ok(Fault::Memory(limits.memory_bytes));
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) if store.data().cut_by_decision => {
                Ok(Fault::DecisionDeadline(limits.decision_deadline))
            }
            Some(Trap::Interrupt) => Ok(Fault::Deadline(limits.deadline)),
            Some(Trap::StackOverflow) => Ok(Fault::StackOverflow),
            Some(Trap::UnreachableCodeReached) => Ok(Fault::Trap(
                "unreachable instruction (a panic or abort in the module)".into(),
            )),
            Some(trap) => Ok(Fault::Trap(trap.to_string())),
            None => Err(error),
        }
    }
}

fn checked_verdict(verdict: Verdict) -> Result<Verdict, Fault> {
    let check = |what: &str, text: &str| {
        if text.trim().is_empty() {
            Err(Fault::Malformed(format!("{what} with an empty reason")))
        } else if text.len() > MAX_REASON_BYTES {
            Err(Fault::Malformed(format!(
                "{what} reason of {} bytes (at most {MAX_REASON_BYTES})",
                text.len()
            )))
        } else {
            Ok(())
        }
    };
    match &verdict {
        Verdict::Deny(denial) => {
            check("deny", &denial.reason)?;
            if let Some(hint) = &denial.hint
                && hint.len() > MAX_REASON_BYTES
            {
                return Err(Fault::Malformed(format!(
                    "deny hint of {} bytes (at most {MAX_REASON_BYTES})",
                    hint.len()
                )));
            }
        }
        Verdict::Review(reason) => check("review", reason)?,
        Verdict::Allow(_) | Verdict::Abstain => {}
    }
    Ok(verdict)
}

fn same_shape(input: &Payload, output: &Payload) -> Result<(), Fault> {
    match (input, output) {
        (Payload::Rows(a), Payload::Rows(b)) => same_rows_shape(a, b),
        (Payload::Body(a), Payload::Body(b)) if a.content_type == b.content_type => Ok(()),
        (Payload::Body(_), Payload::Body(_)) => Err(Fault::Malformed(
            "mask changed the body's content type".into(),
        )),
        _ => Err(Fault::Malformed(
            "mask returned a different kind of payload".into(),
        )),
    }
}

fn same_rows_shape(input: &Rows, output: &Rows) -> Result<(), Fault> {
    if input.columns != output.columns {
        return Err(Fault::Malformed("mask changed the columns".into()));
    }
    if input.values.len() != output.values.len() {
        return Err(Fault::Malformed(format!(
            "mask returned {} rows for {}",
            output.values.len(),
            input.values.len()
        )));
    }
    match output
        .values
        .iter()
        .find(|row| row.len() != input.columns.len())
    {
        Some(row) => Err(Fault::Malformed(format!(
            "mask returned a row of {} values for {} columns",
            row.len(),
            input.columns.len()
        ))),
        None => Ok(()),
    }
}

/// What one instance owns for the length of one call.
pub(crate) struct GuestState {
    module: Arc<str>,
    pub(crate) memory: MemoryCap,
    log_lines: u32,
    /// The decision's deadline, not the call's own, is what an interrupt means.
    cut_by_decision: bool,
}

impl GuestState {
    pub(crate) fn new(module: Arc<str>, memory_bytes: usize, cut_by_decision: bool) -> Self {
        GuestState {
            module,
            memory: MemoryCap {
                limit: memory_bytes,
                exceeded: false,
            },
            log_lines: 0,
            cut_by_decision,
        }
    }
}

impl super::bindings::types::Host for GuestState {}

impl host::Host for GuestState {
    fn log(&mut self, message: String) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES {
            return;
        }
        let mut end = message.len().min(MAX_LOG_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        tracing::info!(module = %self.module, "policy: {}", &message[..end]);
    }
}

/// Refuses memory growth past the cap and remembers that it did, so the fault names
/// the memory limit rather than the allocation-failure trap that follows it.
pub(crate) struct MemoryCap {
    limit: usize,
    pub(crate) exceeded: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}
