//! What a target's own catalog says about the functions and types its statements and
//! results name: a function's schemas, volatility and whether it is built in, and a
//! type's name (extension types such as `citext` included). Read from the upstream by
//! the gateway, never guessed from names, and cached per target.
//!
//! A name the catalog does not have (created since it was read) resolves to the worst
//! case: volatile, not built in. The cache is read again at a session's login once it
//! is older than [`CATALOG_TTL`], and at once after DDL ran through the gateway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::policy::types::{SqlFunction, Volatility};

/// How long a target's catalog is trusted before a login reads it again.
pub const CATALOG_TTL: Duration = Duration::from_secs(60);

/// Functions that execute SQL given to them as text (or run queries named by a
/// relation), so the statements they run were never seen by any policy: the built-ins
/// and the common extensions' (dblink, tablefunc). Matched by name in any schema.
pub const RUNS_SQL_TEXT: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "dblink",
    "dblink_exec",
    "dblink_open",
    "dblink_fetch",
    "dblink_send_query",
    "crosstab",
    "crosstab2",
    "crosstab3",
    "crosstab4",
    "connectby",
    "xpath_table",
];

/// PostgreSQL's first OID for objects made after initdb: below it, built in.
pub const FIRST_NORMAL_OID: u32 = 16_384;

/// The query that reads a catalog: functions, then types.
pub const QUERY: &str = "SELECT p.proname, n.nspname, p.provolatile, p.oid::int8, \
     p.pronargs - p.pronargdefaults <= 1 AND p.pronargs >= 1 \
     FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace; \
     SELECT t.oid::int8, t.typname FROM pg_catalog.pg_type t";

#[derive(Debug, Clone)]
struct Candidate {
    schema: String,
    volatility: Volatility,
    builtin: bool,
    /// Can be called with one argument (others have defaults), so `x.name` can call it.
    one_argument: bool,
}

/// One target's functions and types.
#[derive(Debug, Default)]
pub struct Catalog {
    functions: HashMap<String, Vec<Candidate>>,
    types: HashMap<u32, String>,
}

impl Catalog {
    /// Builds a catalog from the rows of [`QUERY`]'s two results: (name, schema,
    /// provolatile, oid, callable with one argument) and (oid, type name).
    pub fn from_rows(functions: &[Vec<Option<String>>], types: &[Vec<Option<String>>]) -> Self {
        let mut catalog = Catalog::default();
        for row in functions {
            let [
                Some(name),
                Some(schema),
                Some(volatility),
                Some(oid),
                Some(one_argument),
            ] = row.as_slice()
            else {
                continue;
            };
            let volatility = match volatility.as_str() {
                "i" => Volatility::Immutable,
                "s" => Volatility::Stable,
                _ => Volatility::Volatile,
            };
            let builtin = oid.parse::<u32>().is_ok_and(|oid| oid < FIRST_NORMAL_OID);
            catalog
                .functions
                .entry(name.clone())
                .or_default()
                .push(Candidate {
                    schema: schema.clone(),
                    volatility,
                    builtin,
                    one_argument: one_argument == "t",
                });
        }
        for row in types {
            if let [Some(oid), Some(name)] = row.as_slice()
                && let Ok(oid) = oid.parse()
            {
                catalog.types.insert(oid, name.clone());
            }
        }
        catalog
    }

    /// A function as written in a statement (`name` or `schema.name`), resolved: every
    /// candidate of that name (in that schema, when qualified) counts, so the answer is
    /// the worst the call could be whatever the search path.
    pub fn function(&self, written: &str) -> SqlFunction {
        let (schema, name) = match written.rsplit_once('.') {
            Some((schema, name)) => (Some(schema.rsplit('.').next().unwrap_or(schema)), name),
            None => (None, written),
        };
        let candidates: Vec<&Candidate> = self
            .functions
            .get(name)
            .into_iter()
            .flatten()
            .filter(|c| schema.is_none_or(|s| c.schema == s))
            .collect();
        resolved(written, name, &candidates)
    }

    /// A name selected from a value (`c.f`, `(c).f`) as the function PostgreSQL calls
    /// when no column has that name, if the catalog has a function of it callable with
    /// one argument (`pg_terminate_backend(pid, timeout DEFAULT 0)` is).
    pub fn field_function(&self, name: &str) -> Option<SqlFunction> {
        let candidates: Vec<&Candidate> = self
            .functions
            .get(name)
            .into_iter()
            .flatten()
            .filter(|c| c.one_argument)
            .collect();
        (!candidates.is_empty()).then(|| resolved(name, name, &candidates))
    }

    /// A type's name by OID, when the catalog has it.
    pub fn type_name(&self, oid: u32) -> Option<&str> {
        self.types.get(&oid).map(String::as_str)
    }
}

/// A function as written, resolved to the worst of its candidates.
fn resolved(written: &str, name: &str, candidates: &[&Candidate]) -> SqlFunction {
    let mut schemas: Vec<String> = candidates.iter().map(|c| c.schema.clone()).collect();
    schemas.sort();
    schemas.dedup();
    let volatility = candidates
        .iter()
        .map(|c| c.volatility)
        .max_by_key(|v| match v {
            Volatility::Immutable => 0,
            Volatility::Stable => 1,
            Volatility::Volatile => 2,
        })
        .unwrap_or(Volatility::Volatile);
    SqlFunction {
        name: written.to_string(),
        schemas,
        volatility,
        builtin: !candidates.is_empty() && candidates.iter().all(|c| c.builtin),
        runs_sql_text: RUNS_SQL_TEXT.contains(&name),
    }
}

/// Each target's catalog, as last read.
#[derive(Default)]
pub struct Catalogs {
    by_target: Mutex<HashMap<String, (Instant, Arc<Catalog>)>>,
}

impl Catalogs {
    /// The target's catalog as last read (a session picks up what another session
    /// read after DDL), and whether it was read less than [`CATALOG_TTL`] ago.
    pub fn latest(&self, target: &str) -> Option<(Arc<Catalog>, bool)> {
        let by_target = self.by_target.lock().unwrap();
        by_target
            .get(target)
            .map(|(at, catalog)| (catalog.clone(), at.elapsed() < CATALOG_TTL))
    }

    /// Keeps a catalog just read.
    pub fn put(&self, target: &str, catalog: Arc<Catalog>) {
        self.by_target
            .lock()
            .unwrap()
            .insert(target.to_string(), (Instant::now(), catalog));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[&str]) -> Vec<Option<String>> {
        values.iter().map(|v| Some(v.to_string())).collect()
    }

    #[test]
    fn functions_resolve_to_their_worst_candidate() {
        let catalog = Catalog::from_rows(
            &[
                row(&["lower", "pg_catalog", "i", "870", "t"]),
                row(&["now", "pg_catalog", "s", "1299", "f"]),
                row(&["nextval", "pg_catalog", "v", "1574", "t"]),
                row(&["lower", "app", "v", "16500", "t"]),
                row(&["query_to_xml", "pg_catalog", "s", "2924", "f"]),
                row(&["touch", "public", "v", "16501", "t"]),
            ],
            &[row(&["25", "text"]), row(&["16400", "citext"])],
        );
        let lower = catalog.function("lower");
        assert_eq!(lower.volatility, Volatility::Volatile);
        assert_eq!(lower.schemas, ["app", "pg_catalog"]);
        assert!(!lower.builtin);
        let qualified = catalog.function("pg_catalog.lower");
        assert_eq!(qualified.volatility, Volatility::Immutable);
        assert!(qualified.builtin);
        assert_eq!(catalog.function("now").volatility, Volatility::Stable);
        let unknown = catalog.function("wipe");
        assert_eq!(
            (unknown.volatility, unknown.builtin, unknown.schemas.len()),
            (Volatility::Volatile, false, 0)
        );
        assert!(catalog.function("pg_catalog.query_to_xml").runs_sql_text);
        assert!(!catalog.function("lower").runs_sql_text);
        // `c.touch` calls touch(c); `c.now` cannot (now takes no argument); a column
        // name no function has is a column.
        assert_eq!(
            catalog.field_function("touch").map(|f| f.volatility),
            Some(Volatility::Volatile)
        );
        assert!(catalog.field_function("now").is_none());
        assert!(catalog.field_function("email").is_none());
        assert_eq!(catalog.type_name(16400), Some("citext"));
        assert_eq!(catalog.type_name(1), None);
    }
}
