//! Policy fixtures: inputs with the verdict or masked output expected of them.
//!
//! A fixture file (TOML, or JSON where a value must be SQL NULL) has optional
//! `[defaults]` for the grant (agent, target, task, access, time) and a list of cases.
//! Each case gives one input (`authorize`, `check` or `mask`), optional `given`
//! overrides of the defaults, and what to `expect`:
//!
//! ```toml
//! [defaults]
//! target = { name = "prod-db", kind = "postgres", labels = { env = "prod" } }
//! access = "read"
//!
//! [[case]]
//! name = "an UPDATE under a read grant is denied"
//! check.sql = { text = "UPDATE users SET name = 'x'", kind = "update", tables-written = ["users"] }
//! expect = { verdict = "deny", reason-contains = "read-only" }
//! ```
//!
//! An SSH command line is given as the agent would send it
//! (`check.ssh-exec = "ls -la; rm -rf /"`) and parsed by the gateway's own shell
//! parser, so a fixture sees exactly the action the SSH gateway would ask about.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::labels;
use super::module::LoadedModule;
use super::scope::Kind;
use super::set::PolicySet;
use super::types::{
    Access, Action, Agent, Body, Column, Constraints, GrantContext, GrantRequest, HttpRequest,
    KubeRequest, Payload, RequestBody, Rows, SftpOp, SftpRequest, SqlFunction, SqlKind,
    SqlStatement, Target, Verdict, Volatility,
};
use super::verdict::Outcome;

/// How long one fixture case may take in all (each module call also has its own).
const CASE_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FixtureFile {
    #[serde(default)]
    defaults: Given,
    #[serde(rename = "case")]
    cases: Vec<Case>,
}

/// The grant a case runs under; every field has a default.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Given {
    agent: Option<Principal>,
    target: Option<TargetSpec>,
    task: Option<String>,
    access: Option<AccessName>,
    now_unix_ms: Option<u64>,
    grant_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Principal {
    id: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct TargetSpec {
    name: String,
    kind: Kind,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum AccessName {
    Read,
    Write,
    Admin,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    given: Given,
    authorize: Option<AuthorizeSpec>,
    check: Option<ActionSpec>,
    mask: Option<PayloadSpec>,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct AuthorizeSpec {
    ttl_seconds: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ActionSpec {
    Sql(SqlSpec),
    SshExec(String),
    SshShell,
    SshSubsystem(String),
    Sftp(SftpSpec),
    Http(HttpSpec),
    Kube(KubeSpec),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SqlSpec {
    text: String,
    kind: SqlKindName,
    #[serde(default)]
    tables_read: Vec<String>,
    #[serde(default)]
    tables_written: Vec<String>,
    #[serde(default)]
    functions: Vec<FunctionSpec>,
    #[serde(default)]
    locks_rows: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SftpSpec {
    op: SftpOpName,
    path: String,
    target_path: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum SftpOpName {
    OpenRead,
    OpenWrite,
    ReadDir,
    Stat,
    Setstat,
    Remove,
    Rename,
    Mkdir,
    Rmdir,
    Readlink,
    Symlink,
    Realpath,
}

impl From<SftpOpName> for SftpOp {
    fn from(op: SftpOpName) -> Self {
        match op {
            SftpOpName::OpenRead => SftpOp::OpenRead,
            SftpOpName::OpenWrite => SftpOp::OpenWrite,
            SftpOpName::ReadDir => SftpOp::ReadDir,
            SftpOpName::Stat => SftpOp::Stat,
            SftpOpName::Setstat => SftpOp::Setstat,
            SftpOpName::Remove => SftpOp::Remove,
            SftpOpName::Rename => SftpOp::Rename,
            SftpOpName::Mkdir => SftpOp::Mkdir,
            SftpOpName::Rmdir => SftpOp::Rmdir,
            SftpOpName::Readlink => SftpOp::Readlink,
            SftpOpName::Symlink => SftpOp::Symlink,
            SftpOpName::Realpath => SftpOp::Realpath,
        }
    }
}

/// A function a fixture's statement calls: a bare name is what the host gives a
/// function its catalog does not have (volatile, not built in); a table says more, e.g.
/// `{ name = "lower", volatility = "immutable", builtin = true }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FunctionSpec {
    Name(String),
    Resolved(ResolvedFunction),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ResolvedFunction {
    name: String,
    #[serde(default)]
    schemas: Vec<String>,
    volatility: VolatilityName,
    #[serde(default)]
    builtin: bool,
    #[serde(default)]
    runs_sql_text: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum VolatilityName {
    Immutable,
    Stable,
    Volatile,
}

impl FunctionSpec {
    fn to_function(&self) -> SqlFunction {
        match self {
            FunctionSpec::Name(name) => SqlFunction {
                name: name.clone(),
                schemas: vec![],
                volatility: Volatility::Volatile,
                builtin: false,
                runs_sql_text: false,
            },
            FunctionSpec::Resolved(f) => SqlFunction {
                name: f.name.clone(),
                schemas: f.schemas.clone(),
                volatility: match f.volatility {
                    VolatilityName::Immutable => Volatility::Immutable,
                    VolatilityName::Stable => Volatility::Stable,
                    VolatilityName::Volatile => Volatility::Volatile,
                },
                builtin: f.builtin,
                runs_sql_text: f.runs_sql_text,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum SqlKindName {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    CopyTo,
    CopyFrom,
    Ddl,
    Transaction,
    Set,
    Show,
    Call,
    DoBlock,
    Explain,
    Other,
    Listen,
    Notify,
    TwoPhase,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct HttpSpec {
    method: String,
    path: String,
    #[serde(default)]
    query: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// The body as policy sees it: absent (none), a text, or `body-not-inspected = true`.
    body: Option<String>,
    #[serde(default)]
    body_not_inspected: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct KubeSpec {
    verb: String,
    #[serde(default)]
    api_group: String,
    resource_type: String,
    subresource: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    tty: bool,
    #[serde(default)]
    ports: Vec<u16>,
    #[serde(default)]
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum PayloadSpec {
    Rows(RowsSpec),
    Body(BodySpec),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RowsSpec {
    columns: Vec<ColumnSpec>,
    values: Vec<Vec<Option<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ColumnSpec {
    name: String,
    type_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BodySpec {
    content_type: String,
    text: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Expect {
    verdict: Option<VerdictName>,
    reason_contains: Option<String>,
    hint_contains: Option<String>,
    max_ttl_seconds: Option<u32>,
    read_only: Option<bool>,
    masked_columns: Option<Vec<u32>>,
    rows: Option<Vec<Vec<Option<String>>>>,
    body: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum VerdictName {
    Allow,
    Deny,
    Review,
    Abstain,
}

/// What fixtures run against: one module on its own (its scope ignored), or a whole
/// bundle's set, combined as the gateway combines it.
pub enum Subject<'a> {
    Module(&'a LoadedModule),
    Set(&'a Arc<PolicySet>),
}

/// One case's result: `failure` says what differed.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub file: String,
    pub name: String,
    pub failure: Option<String>,
}

/// A verdict normalized across a single module and a combined set.
#[derive(Debug)]
struct Observed {
    verdict: VerdictName,
    reason: String,
    hint: Option<String>,
    constraints: Option<Constraints>,
}

impl From<Verdict> for Observed {
    fn from(verdict: Verdict) -> Self {
        let (verdict, reason, hint, constraints) = match verdict {
            Verdict::Allow(c) => (VerdictName::Allow, String::new(), None, Some(c)),
            Verdict::Deny(d) => (VerdictName::Deny, d.reason, d.hint, None),
            Verdict::Review(r) => (VerdictName::Review, r, None, None),
            Verdict::Abstain => (VerdictName::Abstain, String::new(), None, None),
        };
        Observed {
            verdict,
            reason,
            hint,
            constraints,
        }
    }
}

impl From<Outcome> for Observed {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Allow(c) => Verdict::Allow(c).into(),
            Outcome::Deny { reason, hint, .. } => Observed {
                verdict: VerdictName::Deny,
                reason,
                hint,
                constraints: None,
            },
            Outcome::Review { reason, .. } => Verdict::Review(reason).into(),
        }
    }
}

/// Parses fixture file `name` (TOML, or JSON if the name ends in `.json`).
fn parse(name: &str, bytes: &[u8]) -> Result<FixtureFile, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    let file: FixtureFile = if name.ends_with(".json") {
        serde_json::from_str(text).map_err(|e| e.to_string())?
    } else {
        toml::from_str(text).map_err(|e| e.to_string())?
    };
    for case in &file.cases {
        let inputs = [
            case.authorize.is_some(),
            case.check.is_some(),
            case.mask.is_some(),
        ];
        if inputs.iter().filter(|&&x| x).count() != 1 {
            return Err(format!(
                "case `{}` must give exactly one of authorize, check, mask",
                case.name
            ));
        }
    }
    Ok(file)
}

/// Runs every case of fixture file `name` against `subject`. A file that does not parse
/// is an error; a case that does not match is a [`CaseResult`] with a failure.
pub fn run(subject: &Subject, name: &str, bytes: &[u8]) -> Result<Vec<CaseResult>, String> {
    let file = parse(name, bytes)?;
    Ok(file
        .cases
        .iter()
        .map(|case| CaseResult {
            file: name.to_string(),
            name: case.name.clone(),
            failure: run_case(subject, &file.defaults, case).err(),
        })
        .collect())
}

fn run_case(subject: &Subject, defaults: &Given, case: &Case) -> Result<(), String> {
    // Each module call keeps its own deadline; a case is not bounded as a whole.
    let deadline = Instant::now() + CASE_DEADLINE;
    let given = merge(defaults, &case.given);
    if let Some(spec) = &case.authorize {
        let request = GrantRequest {
            agent: given.agent(),
            target: given.target(),
            task: given.task(),
            access: given.access(),
            ttl_seconds: spec.ttl_seconds,
            now_unix_ms: given.now(),
        };
        let observed: Observed = match subject {
            Subject::Module(m) => m
                .authorize(&request, deadline)
                .map_or_else(fault_observed, Into::into),
            Subject::Set(s) => s.authorize(&request, deadline).outcome.into(),
        };
        return compare_verdict(&case.expect, &observed);
    }
    let context = given.context();
    if let Some(spec) = &case.check {
        let action = spec.to_action();
        let observed: Observed = match subject {
            Subject::Module(m) => m
                .check(&context, &action, deadline)
                .map_or_else(fault_observed, Into::into),
            Subject::Set(s) => s.check(&context, &action, deadline).outcome.into(),
        };
        return compare_verdict(&case.expect, &observed);
    }
    let Some(spec) = &case.mask else {
        unreachable!("parse checks each case has one input")
    };
    match spec {
        PayloadSpec::Rows(rows) => {
            let rows = Rows {
                columns: rows
                    .columns
                    .iter()
                    .map(|c| Column {
                        name: c.name.clone(),
                        type_name: c.type_name.clone(),
                    })
                    .collect(),
                values: rows.values.clone(),
            };
            let (masked_columns, out) = mask_rows(subject, &context, rows, deadline)?;
            if let Some(expected) = &case.expect.masked_columns
                && masked_columns.as_ref() != Some(expected)
            {
                return Err(format!(
                    "expected masked columns {expected:?}, got {masked_columns:?}"
                ));
            }
            match &case.expect.rows {
                Some(expected) if *expected != out.values => {
                    Err(format!("expected rows {expected:?}, got {:?}", out.values))
                }
                _ => Ok(()),
            }
        }
        PayloadSpec::Body(body) => {
            let body = Body {
                content_type: body.content_type.clone(),
                text: body.text.clone(),
            };
            let out = match subject {
                Subject::Module(m) => match m.mask(&context, &Payload::Body(body), deadline) {
                    Ok(Payload::Body(b)) => b,
                    Ok(Payload::Rows(_)) => unreachable!("mask output shape is checked"),
                    Err(fault) => return Err(format!("mask failed: {fault}")),
                },
                Subject::Set(s) => s
                    .mask_body(&context, body, deadline)
                    .map_err(|e| e.to_string())?,
            };
            match &case.expect.body {
                Some(expected) if *expected != out.text => {
                    Err(format!("expected body {expected:?}, got {:?}", out.text))
                }
                _ => Ok(()),
            }
        }
    }
}

/// Masks rows as the gateway does: ask which columns, mask only if any were named.
/// Returns the columns the module named (for a single module) and the rows.
fn mask_rows(
    subject: &Subject,
    context: &GrantContext,
    rows: Rows,
    deadline: Instant,
) -> Result<(Option<Vec<u32>>, Rows), String> {
    match subject {
        Subject::Module(m) => {
            let columns = m
                .mask_columns(context, &rows.columns, deadline)
                .map_err(|f| format!("mask-columns failed: {f}"))?;
            if columns.is_empty() {
                return Ok((Some(columns), rows));
            }
            match m.mask(context, &Payload::Rows(rows), deadline) {
                Ok(Payload::Rows(out)) => Ok((Some(columns), out)),
                Ok(Payload::Body(_)) => unreachable!("mask output shape is checked"),
                Err(fault) => Err(format!("mask failed: {fault}")),
            }
        }
        Subject::Set(s) => {
            let plan = s
                .mask_plan(context, &rows.columns, deadline)
                .map_err(|e| e.to_string())?;
            if plan.is_empty() {
                return Ok((None, rows));
            }
            let out = plan
                .mask_rows(context, rows, deadline)
                .map_err(|e| e.to_string())?;
            Ok((None, out))
        }
    }
}

fn fault_observed(fault: super::module::Fault) -> Observed {
    Observed {
        verdict: VerdictName::Deny,
        reason: fault.to_string(),
        hint: None,
        constraints: None,
    }
}

fn compare_verdict(expect: &Expect, observed: &Observed) -> Result<(), String> {
    let describe = || {
        let mut s = format!("{:?}", observed.verdict).to_lowercase();
        if !observed.reason.is_empty() {
            s += &format!(" ({})", observed.reason);
        }
        s
    };
    if let Some(verdict) = expect.verdict
        && verdict != observed.verdict
    {
        return Err(format!(
            "expected {}, got {}",
            format!("{verdict:?}").to_lowercase(),
            describe()
        ));
    }
    if let Some(part) = &expect.reason_contains
        && !observed.reason.contains(part.as_str())
    {
        return Err(format!(
            "expected a reason containing {part:?}, got {}",
            describe()
        ));
    }
    if let Some(part) = &expect.hint_contains
        && !observed
            .hint
            .as_deref()
            .unwrap_or("")
            .contains(part.as_str())
    {
        return Err(format!(
            "expected a hint containing {part:?}, got {:?}",
            observed.hint
        ));
    }
    let constraints = observed.constraints.unwrap_or(Constraints {
        max_ttl_seconds: None,
        read_only: false,
    });
    if let Some(ttl) = expect.max_ttl_seconds
        && constraints.max_ttl_seconds != Some(ttl)
    {
        return Err(format!(
            "expected max-ttl-seconds {ttl}, got {:?}",
            constraints.max_ttl_seconds
        ));
    }
    if let Some(read_only) = expect.read_only
        && constraints.read_only != read_only
    {
        return Err(format!(
            "expected read-only {read_only}, got {}",
            constraints.read_only
        ));
    }
    Ok(())
}

fn merge(defaults: &Given, over: &Given) -> Given {
    Given {
        agent: over.agent.clone().or_else(|| defaults.agent.clone()),
        target: over.target.clone().or_else(|| defaults.target.clone()),
        task: over.task.clone().or_else(|| defaults.task.clone()),
        access: over.access.or(defaults.access),
        now_unix_ms: over.now_unix_ms.or(defaults.now_unix_ms),
        grant_id: over.grant_id.clone().or_else(|| defaults.grant_id.clone()),
    }
}

impl Given {
    fn agent(&self) -> Agent {
        self.agent.as_ref().map_or_else(
            || Agent {
                id: "fixture-agent".into(),
                labels: Vec::new(),
            },
            |a| Agent {
                id: a.id.clone(),
                labels: labels(&a.labels),
            },
        )
    }

    fn target(&self) -> Target {
        self.target.as_ref().map_or_else(
            || Target {
                name: "fixture-target".into(),
                kind: Kind::Postgres.into(),
                labels: Vec::new(),
            },
            |t| Target {
                name: t.name.clone(),
                kind: t.kind.into(),
                labels: labels(&t.labels),
            },
        )
    }

    fn task(&self) -> String {
        self.task.clone().unwrap_or_else(|| "fixture task".into())
    }

    fn access(&self) -> Access {
        match self.access.unwrap_or(AccessName::Read) {
            AccessName::Read => Access::Read,
            AccessName::Write => Access::Write,
            AccessName::Admin => Access::Admin,
        }
    }

    fn now(&self) -> u64 {
        self.now_unix_ms.unwrap_or(1_700_000_000_000)
    }

    fn context(&self) -> GrantContext {
        GrantContext {
            grant_id: self
                .grant_id
                .clone()
                .unwrap_or_else(|| "fixture-grant".into()),
            agent: self.agent(),
            target: self.target(),
            task: self.task(),
            access: self.access(),
            now_unix_ms: self.now(),
        }
    }
}

impl ActionSpec {
    fn to_action(&self) -> Action {
        match self {
            ActionSpec::Sql(sql) => Action::Sql(SqlStatement {
                text: sql.text.clone(),
                kind: sql.kind.into(),
                tables_read: sql.tables_read.clone(),
                tables_written: sql.tables_written.clone(),
                functions: sql
                    .functions
                    .iter()
                    .map(FunctionSpec::to_function)
                    .collect(),
                locks_rows: sql.locks_rows,
            }),
            ActionSpec::SshExec(line) => {
                Action::SshExec(crate::proxy::ssh::command::parse(line.as_bytes()))
            }
            ActionSpec::SshShell => Action::SshShell,
            ActionSpec::SshSubsystem(name) => Action::SshSubsystem(name.clone()),
            ActionSpec::Sftp(sftp) => Action::Sftp(SftpRequest {
                op: sftp.op.into(),
                path: sftp.path.clone(),
                target_path: sftp.target_path.clone(),
            }),
            ActionSpec::Http(http) => Action::Http(HttpRequest {
                method: http.method.clone(),
                path: http.path.clone(),
                query: http.query.clone(),
                headers: labels(&http.headers),
                body: match (&http.body, http.body_not_inspected) {
                    (_, true) => RequestBody::NotInspected,
                    (Some(text), false) => RequestBody::Text(text.clone()),
                    (None, false) => RequestBody::None,
                },
            }),
            ActionSpec::Kube(kube) => Action::Kube(KubeRequest {
                verb: kube.verb.clone(),
                api_group: kube.api_group.clone(),
                resource_type: kube.resource_type.clone(),
                subresource: kube.subresource.clone(),
                namespace: kube.namespace.clone(),
                name: kube.name.clone(),
                api_version: kube.api_version.clone(),
                command: kube.command.clone(),
                tty: kube.tty,
                ports: kube.ports.clone(),
                path: kube.path.clone(),
            }),
        }
    }
}

impl From<SqlKindName> for SqlKind {
    fn from(kind: SqlKindName) -> Self {
        match kind {
            SqlKindName::Select => SqlKind::Select,
            SqlKindName::Insert => SqlKind::Insert,
            SqlKindName::Update => SqlKind::Update,
            SqlKindName::Delete => SqlKind::Delete,
            SqlKindName::Merge => SqlKind::Merge,
            SqlKindName::CopyTo => SqlKind::CopyTo,
            SqlKindName::CopyFrom => SqlKind::CopyFrom,
            SqlKindName::Ddl => SqlKind::Ddl,
            SqlKindName::Transaction => SqlKind::Transaction,
            SqlKindName::Set => SqlKind::Set,
            SqlKindName::Show => SqlKind::Show,
            SqlKindName::Call => SqlKind::Call,
            SqlKindName::DoBlock => SqlKind::DoBlock,
            SqlKindName::Explain => SqlKind::Explain,
            SqlKindName::Other => SqlKind::Other,
            SqlKindName::Listen => SqlKind::Listen,
            SqlKindName::Notify => SqlKind::Notify,
            SqlKindName::TwoPhase => SqlKind::TwoPhase,
        }
    }
}

/// Expands fixture paths: files as they are, directories to their `.toml` and `.json`
/// files, sorted so results (and bundle manifests) are the same on every machine.
pub fn expand_paths(entries: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in entries {
        if path.is_dir() {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(path)? {
                let file = entry?.path();
                if file.extension().is_some_and(|e| e == "toml" || e == "json") {
                    found.push(file);
                }
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}
