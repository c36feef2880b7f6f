//! SQL statements → policy actions, read off PostgreSQL's own parse tree (see
//! `parser`). A parser that disagreed with the server would be a policy bypass, so
//! nothing here guesses with string matching, and every node of the tree is visited:
//! a function called or a table read anywhere in a statement is seen.
//!
//! Fail closed: a statement kind this module does not know to be harmless is
//! classified as DDL, which every read-only policy denies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::catalog::Catalog;
use super::parser;
pub use super::parser::ParseError;
use crate::policy::DecisionPool;
use crate::policy::types::{SqlKind, SqlStatement};

/// A statement as the gateway decides it: what policies see of it (once its functions
/// are resolved in a target's catalog, [`Statement::action`]), and what the gateway
/// itself enforces whatever the policies say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub text: String,
    pub kind: SqlKind,
    pub tables_read: Vec<String>,
    pub tables_written: Vec<String>,
    /// Every function called, as written (schema-qualified when the statement did).
    pub functions: Vec<String>,
    /// Names after the first in a column reference or field selection (`c.f`,
    /// `(c).f`): PostgreSQL calls `f(c)` when no column `f` exists, so each is a call
    /// if the catalog has a one-argument function of that name.
    pub field_names: Vec<String>,
    /// FOR UPDATE/SHARE anywhere in it.
    pub locks_rows: bool,
    /// Run-time settings the statement changes (`SET`, `RESET`, `set_config`, `ALTER …
    /// SET`), lowercased; `all` for `RESET ALL`, `*` for a name known only when it
    /// runs.
    pub settings: Vec<String>,
    /// `BEGIN`/`START TRANSACTION`/`SET TRANSACTION`/`SET SESSION CHARACTERISTICS` with
    /// `READ WRITE`: lifts a read-only session's default.
    pub read_write: bool,
    /// Changes who may log in, or as what: creates, changes, renames, drops or grants
    /// a role (`ALTER ROLE … PASSWORD` among them), or changes the database's
    /// connection privileges, limit, name or defaults. It can change or lock out the
    /// credential the gateway holds.
    pub manages_logins: bool,
    /// SQL-level `PREPARE`, `DEALLOCATE` or `DISCARD`: it can create or drop prepared
    /// statements under names the gateway's Parse also uses.
    pub manages_prepared: bool,
    /// `DECLARE` or `CLOSE`: it creates or closes a cursor, which shares its name space
    /// with the portals the gateway's Bind made.
    pub manages_cursors: bool,
}

impl Statement {
    /// True if the statement changes nothing: no write kind, no table written, no SET.
    /// Such a statement may run while its record entry is being made durable, because
    /// its result is withheld unless the entry becomes durable.
    pub fn changes_nothing(&self) -> bool {
        matches!(
            self.kind,
            SqlKind::Select
                | SqlKind::Show
                | SqlKind::Explain
                | SqlKind::CopyTo
                | SqlKind::Transaction
        ) && self.tables_written.is_empty()
            && !self.locks_rows
    }

    /// True if running it may create or change functions or types (DDL, procedures, DO
    /// blocks): the target's catalog is read again afterwards.
    pub fn may_change_catalog(&self) -> bool {
        matches!(self.kind, SqlKind::Ddl | SqlKind::Call | SqlKind::DoBlock)
    }

    /// The action policies decide: this statement with its functions resolved in the
    /// target's catalog.
    pub fn action(&self, catalog: &Catalog) -> SqlStatement {
        SqlStatement {
            text: self.text.clone(),
            kind: self.kind,
            tables_read: self.tables_read.clone(),
            tables_written: self.tables_written.clone(),
            functions: self
                .functions
                .iter()
                .map(|f| catalog.function(f))
                .chain(
                    self.field_names
                        .iter()
                        .filter_map(|f| catalog.field_function(f)),
                )
                .collect(),
            locks_rows: self.locks_rows,
        }
    }
}

/// Parses `text` (one or more statements, as in a simple Query message) and classifies
/// each statement.
pub fn classify(text: &str) -> Result<Vec<Statement>, ParseError> {
    parser::with_tree(text, |tree| {
        let Some(raws) = tree.get("stmts").and_then(Value::as_array) else {
            return Vec::new();
        };
        raws.iter()
            .map(|raw| {
                // Locations are byte offsets into the text; an absent one is 0, an
                // absent length runs to the end.
                let start = raw
                    .get("stmt_location")
                    .and_then(Value::as_u64)
                    .unwrap_or(0) as usize;
                let end = match raw.get("stmt_len").and_then(Value::as_u64) {
                    Some(len) if len > 0 => start + len as usize,
                    _ => text.len(),
                };
                let piece = text.get(start..end).unwrap_or(text).trim();
                describe(piece, raw.get("stmt").unwrap_or(&Value::Null))
            })
            .collect()
    })
}

/// The node type and fields of a node object (`{"SelectStmt": {…}}`): one key, a type
/// name (capitalised, where field names are not).
fn node(value: &Value) -> Option<(&str, &Value)> {
    let object = value.as_object()?;
    if object.len() != 1 {
        return None;
    }
    object
        .iter()
        .next()
        .filter(|(k, _)| k.starts_with(|c: char| c.is_ascii_uppercase()))
        .map(|(k, v)| (k.as_str(), v))
}

fn str_field<'a>(fields: &'a Value, name: &str) -> &'a str {
    fields.get(name).and_then(Value::as_str).unwrap_or("")
}

fn flag(fields: &Value, name: &str) -> bool {
    fields.get(name).and_then(Value::as_bool).unwrap_or(false)
}

/// `schema.name` of a RangeVar's fields.
fn range_var(fields: &Value) -> String {
    qualified(
        str_field(fields, "schemaname"),
        str_field(fields, "relname"),
    )
}

/// The `String` nodes of a list, in order (other nodes, like `*` or `[1]`, skipped).
fn strings(list: Option<&Value>) -> Vec<String> {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|item| match node(item) {
            Some(("String", s)) => Some(str_field(s, "sval").to_string()),
            _ => None,
        })
        .collect()
}

/// The dotted name of a list of `String` nodes (a function's or an object's name).
fn dotted(list: Option<&Value>) -> String {
    strings(list).join(".")
}

/// The text of a string constant node, if it is one.
fn string_constant(value: &Value) -> Option<&str> {
    match node(value) {
        Some(("A_Const", c)) => c
            .get("sval")
            .and_then(|s| s.get("sval"))
            .and_then(Value::as_str),
        _ => None,
    }
}

/// `transaction_read_only` set to false among a statement's options (`READ WRITE`).
fn asks_read_write(options: Option<&Value>) -> bool {
    options.and_then(Value::as_array).is_some_and(|options| {
        options.iter().any(|option| match node(option) {
            Some(("DefElem", d)) if str_field(d, "defname") == "transaction_read_only" => {
                // Integer constants of 0 have no `ival` inside: libpg_query omits zeros.
                let value = d
                    .get("arg")
                    .and_then(|arg| arg.get("A_Const"))
                    .and_then(|c| c.get("ival"))
                    .map(|i| i.get("ival").and_then(Value::as_i64).unwrap_or(0));
                value != Some(1)
            }
            _ => false,
        })
    })
}

/// What a walk of one statement's whole tree finds.
#[derive(Default)]
struct Found {
    read: Vec<String>,
    written: Vec<String>,
    functions: Vec<String>,
    field_names: Vec<String>,
    settings: Vec<String>,
    read_write: bool,
    locks_rows: bool,
    manages_logins: bool,
}

impl Found {
    /// A `FuncCall`'s fields: the function's name, and for `set_config` the setting it
    /// changes (`*` when the name is not a constant).
    fn function_call(&mut self, fields: &Value) {
        let name = dotted(fields.get("funcname"));
        if name.rsplit('.').next() == Some("set_config") {
            let setting = fields
                .get("args")
                .and_then(|a| a.get(0))
                .and_then(string_constant);
            self.settings
                .push(setting.map_or_else(|| "*".into(), str::to_ascii_lowercase));
        }
        self.functions.push(name);
    }

    /// A `VariableSetStmt`'s fields: the setting it changes, or for `SET TRANSACTION` /
    /// `SET SESSION CHARACTERISTICS`, whether it asks for read-write.
    fn variable_set(&mut self, fields: &Value) {
        match str_field(fields, "kind") {
            "VAR_RESET_ALL" => self.settings.push("all".into()),
            "VAR_SET_MULTI" => self.read_write |= asks_read_write(fields.get("args")),
            _ => self
                .settings
                .push(str_field(fields, "name").to_ascii_lowercase()),
        }
    }
}

/// How a value in the tree relates to the statement that writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Other,
    /// The fields of an INSERT, UPDATE, DELETE or MERGE.
    Writer,
    /// The table an INSERT, UPDATE, DELETE or MERGE writes.
    Target,
}

/// Visits every node of a statement's tree, without recursion (the tree may be as deep
/// as the parser allows). Tables are written when they are the target of an INSERT,
/// UPDATE, DELETE or MERGE, or named by a DDL statement outside any query in it; every
/// other table is read.
fn walk(root: &Value, ddl: bool) -> Found {
    let mut found = Found::default();
    // (value, inside a SELECT, its role)
    let mut stack: Vec<(&Value, bool, Role)> = vec![(root, false, Role::Other)];
    while let Some((value, in_select, role)) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, in_select, Role::Other))),
            Value::Object(object) => match node(value) {
                Some((kind, fields)) => {
                    let mut in_select = in_select;
                    let mut role = Role::Other;
                    match kind {
                        "SelectStmt" => in_select = true,
                        "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                            role = Role::Writer
                        }
                        "FuncCall" => found.function_call(fields),
                        "LockingClause" => found.locks_rows = true,
                        "AlterRoleStmt"
                        | "AlterRoleSetStmt"
                        | "CreateRoleStmt"
                        | "DropRoleStmt"
                        | "GrantRoleStmt"
                        | "AlterDatabaseStmt"
                        | "AlterDatabaseSetStmt" => found.manages_logins = true,
                        "RenameStmt"
                            if matches!(
                                str_field(fields, "renameType"),
                                "OBJECT_ROLE" | "OBJECT_DATABASE"
                            ) =>
                        {
                            found.manages_logins = true
                        }
                        "GrantStmt" if str_field(fields, "objtype") == "OBJECT_DATABASE" => {
                            found.manages_logins = true
                        }
                        "ColumnRef" => found
                            .field_names
                            .extend(strings(fields.get("fields")).into_iter().skip(1)),
                        "A_Indirection" => {
                            found.field_names.extend(strings(fields.get("indirection")))
                        }
                        "VariableSetStmt" => found.variable_set(fields),
                        "TransactionStmt" => {
                            found.read_write |= asks_read_write(fields.get("options"))
                        }
                        "DropStmt" if drops_relations(str_field(fields, "removeType")) => {
                            let objects = fields.get("objects").and_then(Value::as_array);
                            for object in objects.into_iter().flatten() {
                                if let Some(("List", list)) = node(object) {
                                    found.written.push(dotted(list.get("items")));
                                }
                            }
                        }
                        _ => {}
                    }
                    stack.push((fields, in_select, role));
                }
                None => {
                    // The fields of a node, wrapped or not: a RangeVar's have `relname`.
                    if object.contains_key("relname") {
                        let name = range_var(value);
                        if role == Role::Target || (ddl && !in_select) {
                            found.written.push(name);
                        } else {
                            found.read.push(name);
                        }
                    }
                    for (key, child) in object {
                        let role = match key.as_str() {
                            "relation" if role == Role::Writer => Role::Target,
                            _ => Role::Other,
                        };
                        match key.as_str() {
                            // `ALTER ROLE|DATABASE|SYSTEM … SET` carries its SET unwrapped.
                            "setstmt" => found.variable_set(child),
                            // So does a CALL its function.
                            "funccall" => found.function_call(child),
                            _ => {}
                        }
                        stack.push((child, in_select, role));
                    }
                }
            },
            _ => {}
        }
    }
    for list in [
        &mut found.read,
        &mut found.written,
        &mut found.functions,
        &mut found.field_names,
        &mut found.settings,
    ] {
        list.sort();
        list.dedup();
    }
    found
}

/// DROP of something whose name is a table's (so a policy sees it written).
fn drops_relations(remove_type: &str) -> bool {
    matches!(
        remove_type,
        "OBJECT_TABLE"
            | "OBJECT_VIEW"
            | "OBJECT_MATVIEW"
            | "OBJECT_SEQUENCE"
            | "OBJECT_INDEX"
            | "OBJECT_FOREIGN_TABLE"
    )
}

/// A statement's action, from its top-level node and what a walk of its tree found.
fn describe(text: &str, stmt: &Value) -> Statement {
    let top = node(stmt);
    let kind = match top {
        None => SqlKind::Other,
        Some((name, fields)) => kind_of(name, fields),
    };
    let mut found = walk(stmt, kind == SqlKind::Ddl);
    let top_name = top.map(|(name, _)| name);
    let manages_prepared = matches!(
        top_name,
        Some("PrepareStmt" | "DeallocateStmt" | "DiscardStmt")
    );
    let manages_cursors = matches!(top_name, Some("DeclareCursorStmt" | "ClosePortalStmt"));
    match top {
        Some(("CopyStmt", copy)) => copy_tables(copy, &mut found),
        // Without ANALYZE the statement is only planned: what it would write is read.
        Some(("ExplainStmt", explain)) if !explain_analyzes(explain) => {
            let written = std::mem::take(&mut found.written);
            found.read.extend(written);
            found.read.sort();
            found.read.dedup();
        }
        _ => {}
    }
    Statement {
        text: text.to_string(),
        kind,
        tables_read: found.read,
        tables_written: found.written,
        functions: found.functions,
        field_names: found.field_names,
        locks_rows: found.locks_rows,
        settings: found.settings,
        read_write: found.read_write,
        manages_logins: found.manages_logins,
        manages_prepared,
        manages_cursors,
    }
}

fn explain_analyzes(explain: &Value) -> bool {
    explain
        .get("options")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|o| matches!(node(o), Some(("DefElem", d)) if str_field(d, "defname").eq_ignore_ascii_case("analyze")))
}

/// COPY's table is read (TO) or written (FROM); a server-side file or program is
/// something written (or read) outside the database: name it so policies see it.
fn copy_tables(copy: &Value, found: &mut Found) {
    let filename = str_field(copy, "filename");
    let outside = match (flag(copy, "is_program"), filename.is_empty()) {
        (true, _) => Some(format!("program:{filename}")),
        (false, false) => Some(format!("file:{filename}")),
        (false, true) => None,
    };
    let table = copy.get("relation").map(range_var);
    if let Some(table) = &table {
        found.read.retain(|t| t != table);
        found.written.retain(|t| t != table);
    }
    if flag(copy, "is_from") {
        found.written.extend(table);
        found.read.extend(outside);
    } else {
        found.read.extend(table);
        found.written.extend(outside);
    }
    for list in [&mut found.read, &mut found.written] {
        list.sort();
        list.dedup();
    }
}

fn kind_of(name: &str, fields: &Value) -> SqlKind {
    match name {
        "SelectStmt" if fields.get("intoClause").is_some() => SqlKind::Ddl,
        "SelectStmt" => SqlKind::Select,
        "InsertStmt" => SqlKind::Insert,
        "UpdateStmt" => SqlKind::Update,
        "DeleteStmt" => SqlKind::Delete,
        "MergeStmt" => SqlKind::Merge,
        "CopyStmt" if flag(fields, "is_from") => SqlKind::CopyFrom,
        "CopyStmt" => SqlKind::CopyTo,
        "ExplainStmt" => SqlKind::Explain,
        // The inner statement decides: `PREPARE p AS UPDATE …` is an update.
        "PrepareStmt" | "DeclareCursorStmt" => match fields.get("query").and_then(node) {
            Some((inner, inner_fields)) => kind_of(inner, inner_fields),
            None => SqlKind::Other,
        },
        "TransactionStmt" => match str_field(fields, "kind") {
            "TRANS_STMT_PREPARE"
            | "TRANS_STMT_COMMIT_PREPARED"
            | "TRANS_STMT_ROLLBACK_PREPARED" => SqlKind::TwoPhase,
            _ => SqlKind::Transaction,
        },
        "ListenStmt" | "UnlistenStmt" => SqlKind::Listen,
        "NotifyStmt" => SqlKind::Notify,
        "VariableSetStmt" => SqlKind::Set,
        "VariableShowStmt" => SqlKind::Show,
        "CallStmt" => SqlKind::Call,
        "DoStmt" => SqlKind::DoBlock,
        // Harmless to data: reading a prepared statement or cursor, session chatter.
        "ExecuteStmt" | "DeallocateStmt" | "FetchStmt" | "ClosePortalStmt" | "DiscardStmt" => {
            SqlKind::Other
        }
        // Everything else changes schema, roles, settings, storage or locks.
        _ => SqlKind::Ddl,
    }
}

fn qualified(schema: &str, name: &str) -> String {
    if schema.is_empty() {
        name.to_string()
    } else {
        format!("{schema}.{name}")
    }
}

/// One text's classification, shared between the cache and its users.
pub type Classified = Arc<Result<Vec<Statement>, ParseError>>;

/// Texts longer than this are classified every time rather than kept: the cache is
/// bounded by entries, and a few huge texts must not fill memory.
const LONGEST_CACHED: usize = 16 << 10;

/// Statements up to this long are parsed on the session's own task (microseconds).
const PARSED_INLINE: usize = 4 << 10;

/// How long a long statement may wait for the parsing thread before it is refused.
const LONG_WAIT: Duration = Duration::from_secs(5);

/// Classifications cached by statement text: an agent's repeated statements are parsed
/// once. Bounded: when full it starts over.
///
/// Long statements are parsed on a thread of their own, agents taking turns on it: a
/// statement near the 256 KiB limit takes the parser tens of milliseconds, and on the
/// runtime's threads one agent's stream of them held every other session and the
/// health endpoint; on the decision pool it would hold every decision.
pub struct ClassifyCache {
    entries: Mutex<HashMap<String, Classified>>,
    capacity: usize,
    long: DecisionPool,
}

impl ClassifyCache {
    pub fn new(capacity: usize) -> Self {
        ClassifyCache {
            entries: Mutex::new(HashMap::new()),
            capacity,
            long: DecisionPool::new(1, 2, LONG_WAIT),
        }
    }

    /// Classifies `text` for `agent`: from the cache, inline when short, else on the
    /// parsing thread. A long statement the parsing thread cannot take within
    /// [`LONG_WAIT`] is refused as [`ParseError::Busy`].
    pub async fn classify_for(&self, agent: &str, text: &str) -> Classified {
        if let Some(hit) = self.entries.lock().unwrap().get(text) {
            return hit.clone();
        }
        let result = if text.len() <= PARSED_INLINE {
            Arc::new(classify(text))
        } else {
            let owned = text.to_string();
            match self.long.run(agent, move |_| classify(&owned)).await {
                Ok(result) => Arc::new(result),
                Err(refusal) => return Arc::new(Err(ParseError::Busy(refusal.to_string()))),
            }
        };
        if text.len() <= LONGEST_CACHED {
            let mut entries = self.entries.lock().unwrap();
            if entries.len() >= self.capacity {
                entries.clear();
            }
            entries.insert(text.to_string(), result.clone());
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(sql: &str) -> Statement {
        let mut all = classify(sql).unwrap();
        assert_eq!(all.len(), 1, "{sql}");
        all.remove(0)
    }

    fn one(sql: &str) -> Statement {
        statement(sql)
    }

    #[test]
    fn statements_that_manage_prepared_statements() {
        for sql in [
            "PREPARE p AS SELECT email FROM users",
            "  deallocate ALL",
            "/* a /* nested */ comment */ DISCARD ALL",
            "-- a comment\nPrepare q (int) AS SELECT $1",
        ] {
            assert!(statement(sql).manages_prepared, "{sql}");
        }
        for sql in ["SELECT 1", "EXECUTE p", "/* PREPARE */ SELECT 'DEALLOCATE'"] {
            assert!(!statement(sql).manages_prepared, "{sql}");
        }
    }

    #[test]
    fn kinds_and_tables() {
        let s = one("SELECT u.id, o.total FROM users u JOIN public.orders o ON o.uid = u.id");
        assert_eq!(s.kind, SqlKind::Select);
        assert_eq!(s.tables_read, ["public.orders", "users"]);
        assert!(s.tables_written.is_empty());

        let s = one("UPDATE users SET email = 'x' WHERE id IN (SELECT uid FROM bans)");
        assert_eq!(s.kind, SqlKind::Update);
        assert_eq!(s.tables_written, ["users"]);
        assert_eq!(s.tables_read, ["bans"]);

        let s = one("INSERT INTO audit_copy SELECT * FROM audit");
        assert_eq!(
            (s.kind, s.tables_written.as_slice()),
            (SqlKind::Insert, &["audit_copy".to_string()][..])
        );

        assert_eq!(one("DELETE FROM t WHERE a = 1").kind, SqlKind::Delete);
        assert_eq!(one("DROP TABLE users").kind, SqlKind::Ddl);
        assert_eq!(one("TRUNCATE users").kind, SqlKind::Ddl);
        assert_eq!(one("ALTER SYSTEM SET fsync = off").kind, SqlKind::Ddl);
        assert_eq!(one("SELECT * INTO newt FROM users").kind, SqlKind::Ddl);
        assert_eq!(one("BEGIN").kind, SqlKind::Transaction);
        assert_eq!(one("SET search_path TO app").kind, SqlKind::Set);
        assert_eq!(one("SHOW search_path").kind, SqlKind::Show);
        assert_eq!(
            one("DO $$ BEGIN DELETE FROM t; END $$").kind,
            SqlKind::DoBlock
        );
        assert_eq!(one("CALL refresh_all()").kind, SqlKind::Call);
        assert_eq!(one("LOCK TABLE users").kind, SqlKind::Ddl);
    }

    #[test]
    fn hidden_writes_are_found() {
        let s = one("WITH gone AS (DELETE FROM users RETURNING *) SELECT count(*) FROM gone");
        assert_eq!(s.kind, SqlKind::Select);
        assert_eq!(s.tables_written, ["users"]);

        let s = one("EXPLAIN ANALYZE UPDATE users SET email = 'x'");
        assert_eq!(
            (s.kind, s.tables_written.as_slice()),
            (SqlKind::Explain, &["users".to_string()][..])
        );
        let s = one("EXPLAIN UPDATE users SET email = 'x'");
        assert!(s.tables_written.is_empty(), "planned, not run: {s:?}");
        assert_eq!(s.tables_read, ["users"]);

        let s = one("PREPARE p AS UPDATE users SET email = $1");
        assert_eq!(s.kind, SqlKind::Update);

        let s = one("SELECT nextval('orders_id_seq'), pg_catalog.pg_read_file('/etc/passwd')");
        assert_eq!(s.functions, ["nextval", "pg_catalog.pg_read_file"]);
    }

    #[test]
    fn copy_directions_and_server_files() {
        let s = one("COPY users TO STDOUT");
        assert_eq!(
            (s.kind, s.tables_read.as_slice()),
            (SqlKind::CopyTo, &["users".to_string()][..])
        );
        let s = one("COPY users FROM STDIN");
        assert_eq!(
            (s.kind, s.tables_written.as_slice()),
            (SqlKind::CopyFrom, &["users".to_string()][..])
        );
        let s = one("COPY users TO '/tmp/dump.csv'");
        assert_eq!(s.tables_written, ["file:/tmp/dump.csv"]);
        let s = one("COPY (SELECT 1) TO PROGRAM 'curl evil'");
        assert_eq!(s.tables_written, ["program:curl evil"]);
    }

    #[test]
    fn several_statements_each_classified() {
        let all = classify("SELECT 1; DELETE FROM t; SET search_path TO x").unwrap();
        let kinds: Vec<SqlKind> = all.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, [SqlKind::Select, SqlKind::Delete, SqlKind::Set]);
        assert_eq!(all[1].text, "DELETE FROM t");
        assert_eq!(all[1].tables_written, ["t"]);
    }

    #[test]
    fn functions_and_tables_are_found_in_every_kind_of_node() {
        for (sql, function) in [
            (
                "SELECT 1 WHERE pg_terminate_backend(1) IS NULL",
                "pg_terminate_backend",
            ),
            ("SELECT ARRAY[nextval('s')]", "nextval"),
            (
                "SELECT (lo_from_bytea(0, 'x'))::text COLLATE \"C\"",
                "lo_from_bytea",
            ),
            ("VALUES (pg_notify('c', 'x'))", "pg_notify"),
            ("SELECT 1 LIMIT pg_advisory_lock(1)", "pg_advisory_lock"),
            ("SELECT f(x => wipe())", "wipe"),
            ("SELECT count(*) FILTER (WHERE wipe()) FROM t", "wipe"),
            ("SELECT sum(a) OVER (ORDER BY wipe()) FROM t", "wipe"),
            ("SELECT xmlelement(name a, wipe())", "wipe"),
            (
                "SELECT * FROM t WHERE a IS TRUE AND (wipe()) IS NOT FALSE",
                "wipe",
            ),
            ("DECLARE c CURSOR FOR SELECT wipe()", "wipe"),
            ("PREPARE p AS SELECT wipe()", "wipe"),
            ("EXECUTE p(wipe())", "wipe"),
            ("SELECT * FROM t TABLESAMPLE bernoulli (wipe())", "wipe"),
            ("CALL refresh_all()", "refresh_all"),
        ] {
            let s = one(sql);
            assert!(s.functions.iter().any(|f| f == function), "{sql}: {s:?}");
        }
        let s = one("SELECT 1 WHERE (SELECT count(*) FROM secrets) IS NULL");
        assert_eq!(s.tables_read, ["secrets"]);
        let s = one("SELECT ARRAY(SELECT email FROM public.users)");
        assert_eq!(s.tables_read, ["public.users"]);
    }

    #[test]
    fn field_selections_are_possible_calls() {
        let s = one("SELECT c.touch, (c).stamp, u.id FROM customers c, users u");
        assert_eq!(s.field_names, ["id", "stamp", "touch"]);
        assert!(s.functions.is_empty());
        assert!(one("SELECT id FROM users").field_names.is_empty());
    }

    #[test]
    fn locks_listen_notify_and_two_phase() {
        assert!(one("SELECT * FROM t FOR UPDATE").locks_rows);
        assert!(one("SELECT * FROM (SELECT * FROM t FOR SHARE) s").locks_rows);
        assert!(!one("SELECT * FROM t FOR UPDATE").changes_nothing());
        assert!(!one("SELECT * FROM t").locks_rows);
        assert_eq!(one("LISTEN c").kind, SqlKind::Listen);
        assert_eq!(one("UNLISTEN *").kind, SqlKind::Listen);
        assert_eq!(one("NOTIFY c, 'x'").kind, SqlKind::Notify);
        for sql in [
            "PREPARE TRANSACTION 'x'",
            "COMMIT PREPARED 'x'",
            "ROLLBACK PREPARED 'x'",
        ] {
            assert_eq!(one(sql).kind, SqlKind::TwoPhase, "{sql}");
        }
        assert_eq!(one("COMMIT").kind, SqlKind::Transaction);
    }

    #[test]
    fn settings_and_read_write_are_found() {
        let settings = |sql: &str| statement(sql).settings;
        assert_eq!(
            settings("SET client_encoding = 'SJIS'"),
            ["client_encoding"]
        );
        assert_eq!(settings("SET NAMES 'SJIS'"), ["client_encoding"]);
        assert_eq!(settings("RESET ALL"), ["all"]);
        assert_eq!(settings("SET ROLE postgres"), ["role"]);
        assert_eq!(
            settings("SET SESSION AUTHORIZATION postgres"),
            ["session_authorization"]
        );
        assert_eq!(
            settings("ALTER ROLE r SET standard_conforming_strings = off"),
            ["standard_conforming_strings"]
        );
        assert_eq!(
            settings("SELECT set_config('Standard_Conforming_Strings', 'off', false)"),
            ["standard_conforming_strings"]
        );
        assert_eq!(
            settings("SELECT pg_catalog.set_config(name, 'off', false) FROM t"),
            ["*"]
        );
        assert!(settings("SELECT 1").is_empty());
        for sql in [
            "BEGIN READ WRITE",
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
            "SET TRANSACTION READ WRITE",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        ] {
            assert!(statement(sql).read_write, "{sql}");
        }
        for sql in ["BEGIN", "BEGIN READ ONLY", "SET TRANSACTION READ ONLY"] {
            assert!(!statement(sql).read_write, "{sql}");
        }
    }

    #[test]
    fn deep_and_long_texts() {
        let sum = format!("SELECT {}", vec!["c"; 48].join(" + "));
        assert_eq!(one(&sum).kind, SqlKind::Select);
        let deep = format!("SELECT 1{}", "+1".repeat(100_000));
        assert_eq!(classify(&deep), Err(ParseError::TooDeep));
        let huge = format!("SELECT 1{}", "+1".repeat(1_000_000));
        assert_eq!(classify(&huge), Err(ParseError::TooLong(huge.len())));
    }

    #[test]
    fn syntax_errors_are_errors() {
        assert!(classify("SELEC 1").is_err());
        assert!(classify("SELECT 'unterminated").is_err());
    }

    #[test]
    fn the_cache_returns_the_same_answer_inline_or_on_the_parsing_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cache = ClassifyCache::new(2);
        let long = format!("SELECT 1 WHERE 1 IN ({})", vec!["7"; 4000].join(","));
        assert!(long.len() > PARSED_INLINE);
        for _ in 0..3 {
            for sql in ["SELECT 1", "DELETE FROM t", "SELECT 2", long.as_str()] {
                let classified = runtime.block_on(cache.classify_for("agent", sql));
                assert_eq!(*classified, classify(sql));
            }
        }
    }
}
