//! PostgreSQL's own parser (libpg_query: the PostgreSQL 15.1 grammar, matching the
//! upstream servers), run where no input can overflow a stack, and read back as a JSON
//! tree every node of which the classifier can see.
//!
//! The grammar itself is iterative, but turning its tree into output recurses once per
//! level, in C and in the JSON reader, and a left-deep chain like `1+1+…+1` is as deep as
//! it is long. So before the parse, PostgreSQL's own scanner bounds the tree's depth from
//! the tokens: a text whose bound is past what a PostgreSQL server evaluates gets the
//! server's own answer (`54001`) without being parsed; anything else is parsed on a stack
//! sized for its bound. A flat text (a long `VALUES` list, a wide `SELECT`, a long `OR`
//! chain) has a small bound whatever its size, so it is never refused for being long.
//!
//! pg_query's own Rust walk of the tree is neither complete (it skips node types such as
//! `NullTest`, so a function call there would be invisible) nor linear in the number of
//! nodes, which is why the tree is taken as libpg_query's JSON and walked here.

use std::ffi::{CStr, CString, c_char, c_int};

use pg_query::protobuf::{KeywordKind, Token};
use serde::Deserialize;
use serde_json::Value;

/// Why a text was not parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// PostgreSQL's parser rejected it: the server would too (`42601`).
    #[error("{0}")]
    Syntax(String),
    /// Nested deeper than a PostgreSQL server evaluates (`54001`).
    #[error("stack depth limit exceeded: the statement is nested too deeply")]
    TooDeep,
    /// Longer than the gateway checks (`54000`): the tree it reads costs memory in
    /// proportion, about 2 KB per byte of a flat list.
    #[error(
        "the statement is {0} bytes, over the {MAX_TEXT} bytes this gateway checks; split it, or load data with COPY"
    )]
    TooLong(usize),
    /// Not parsed: the policy host's pool, where long statements are parsed, refused
    /// it (`53000`, insufficient resources).
    #[error("{0}")]
    Busy(String),
}

impl ParseError {
    /// PostgreSQL's SQLSTATE for the refusal.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ParseError::Syntax(_) => "42601",
            ParseError::TooDeep => "54001",
            ParseError::TooLong(_) => "54000",
            ParseError::Busy(_) => "53000",
        }
    }
}

/// The longest statement text the gateway parses and checks. The JSON tree it walks
/// takes about 1.7 GB for 1 MB of `SELECT 1,1,…`, so this bounds what one statement can
/// cost the gateway to a few hundred MB.
pub const MAX_TEXT: usize = 256 << 10;

/// Tree levels a token can add when it is an operator or a keyword: a production makes
/// at most this many nested nodes per token (e.g. a `TypeCast` around a `TypeName`).
const LEVELS_PER_TOKEN: u64 = 4;

/// Tree levels a bracketed group adds on its own.
const LEVELS_PER_GROUP: u64 = 2;

/// Levels every statement has before its first token counts (`RawStmt`, the statement
/// node, its lists).
const BASE_LEVELS: u64 = 32;

/// The deepest bound parsed. A PostgreSQL server with its default `max_stack_depth`
/// (2 MB) stops evaluating far shallower trees with `54001`, so anything past this is
/// refused with the same answer the server would give.
const MAX_LEVELS: u64 = 200_000;

/// Stack bytes the parse, the JSON reader and the tree's drop use per level of the
/// bound: measured at 280 for an operator chain and 140 for a cast chain (four levels a
/// token), so about four times what the costliest construct seen needs.
const STACK_PER_LEVEL: u64 = 1024;

/// The parser's own stack limit (bison's `YYMAXDEPTH`, which PostgreSQL keeps): an
/// open bracket stays on that stack until its match, so a text nested deeper fails with
/// "memory exhausted" (`42601`) before any tree is built, as it does on the server.
const PARSER_MAX_NESTING: usize = 10_000;

/// Parses `text` (one or more statements) into libpg_query's JSON tree and hands it to
/// `read`, on a stack deep enough for both and for the tree's drop (a deep `Value` drops
/// recursively). `read` must not recurse per level itself.
pub fn with_tree<R>(text: &str, read: impl FnOnce(&Value) -> R) -> Result<R, ParseError> {
    if text.len() > MAX_TEXT {
        return Err(ParseError::TooLong(text.len()));
    }
    let run = || parse_here(text).map(|tree| read(&tree));
    // Every text gets a stack sized for its bound, however short: how much stack a
    // level costs depends on how the compiler laid out this build, and a kilobyte of
    // `((((…` overflowed a 2 MiB thread in one build and not in another.
    let levels = match pg_query::scan(text) {
        Ok(scan) => depth_bound(&scan.tokens),
        // The scanner rejected it, so the parser stops at the same token without
        // building a tree; parse anyway for PostgreSQL's exact message.
        Err(_) => BASE_LEVELS,
    };
    if levels > MAX_LEVELS {
        return Err(ParseError::TooDeep);
    }
    let stack = (levels * STACK_PER_LEVEL + (1 << 20)) as usize;
    stacker::grow(stack, run)
}

/// The parse proper.
fn parse_here(text: &str) -> Result<Value, ParseError> {
    let json = libpg_query_json(text)?;
    let mut reader = serde_json::Deserializer::from_str(&json);
    // The depth is bounded by the caller (`depth_bound`), not by serde_json's default
    // limit of 128, which would refuse ordinary statements (a 48-term sum).
    reader.disable_recursion_limit();
    Value::deserialize(&mut reader)
        .map_err(|e| ParseError::Syntax(format!("the parser's output could not be read: {e}")))
}

#[repr(C)]
struct PgQueryError {
    message: *mut c_char,
    funcname: *mut c_char,
    filename: *mut c_char,
    lineno: c_int,
    cursorpos: c_int,
    context: *mut c_char,
}

#[repr(C)]
struct PgQueryParseResult {
    parse_tree: *mut c_char,
    stderr_buffer: *mut c_char,
    error: *mut PgQueryError,
}

// libpg_query, linked by the pg_query crate; declared as in its `pg_query.h`.
unsafe extern "C" {
    fn pg_query_parse(input: *const c_char) -> PgQueryParseResult;
    fn pg_query_free_parse_result(result: PgQueryParseResult);
}

/// libpg_query's JSON parse tree of `text`, or its error message.
fn libpg_query_json(text: &str) -> Result<String, ParseError> {
    let input = CString::new(text)
        .map_err(|_| ParseError::Syntax("the statement contains a NUL byte".into()))?;
    // SAFETY: `input` is a valid NUL-terminated string for the call's duration; the
    // result's strings are read before it is freed, exactly once.
    unsafe {
        let result = pg_query_parse(input.as_ptr());
        let out = if !result.error.is_null() {
            Err(ParseError::Syntax(
                CStr::from_ptr((*result.error).message)
                    .to_string_lossy()
                    .into_owned(),
            ))
        } else if result.parse_tree.is_null() {
            Err(ParseError::Syntax("the parser returned no tree".into()))
        } else {
            Ok(CStr::from_ptr(result.parse_tree)
                .to_string_lossy()
                .into_owned())
        };
        pg_query_free_parse_result(result);
        out
    }
}

/// Keywords that build expressions, and so, like operators, cannot reach past a comma
/// (or `AND`/`OR`) at their bracket level. Every other keyword may start a clause that
/// spans the whole group (`SELECT`, `FROM`, `UNION`), so it counts for the whole group.
const EXPRESSION_KEYWORDS: &[Token] = &[
    Token::Case,
    Token::When,
    Token::Then,
    Token::Else,
    Token::EndP,
    Token::Not,
    Token::Is,
    Token::NullP,
    Token::TrueP,
    Token::FalseP,
    Token::Between,
    Token::Like,
    Token::Ilike,
    Token::Similar,
    Token::InP,
    Token::Any,
    Token::All,
    Token::Some,
    Token::Cast,
    Token::Array,
    Token::Row,
    Token::Collate,
    Token::Exists,
];

/// An upper bound on the depth of the tree `tokens` parse into.
///
/// Within a bracketed group, an operator or expression keyword deepens only the list
/// element it is in (elements are separated by `,`, `;`, and the `AND`/`OR` chains that
/// PostgreSQL's grammar flattens into one node); a clause keyword may enclose every
/// element. So a group is at most: its clause keywords, plus its deepest element, where
/// an element is its own operators plus its deepest bracketed group.
pub(super) fn depth_bound(tokens: &[pg_query::protobuf::ScanToken]) -> u64 {
    #[derive(Default)]
    struct Group {
        keywords: u64,
        element: u64,
        element_child: u64,
        deepest: u64,
    }
    impl Group {
        fn end_element(&mut self) {
            self.deepest = self
                .deepest
                .max(self.element * LEVELS_PER_TOKEN + self.element_child);
            self.element = 0;
            self.element_child = 0;
        }
        fn depth(mut self) -> u64 {
            self.end_element();
            self.keywords * LEVELS_PER_TOKEN + self.deepest
        }
    }
    let mut groups = vec![Group::default()];
    let mut nesting = 0;
    // Statements are siblings: the deepest one bounds the text.
    let mut deepest_statement = 0;
    for token in tokens {
        let kind = Token::from_i32(token.token).unwrap_or(Token::Nul);
        let outermost = groups.len() == 1;
        let group = groups.last_mut().expect("the outermost group stays");
        match kind {
            Token::Ascii40 | Token::Ascii91 => {
                groups.push(Group::default());
                nesting = nesting.max(groups.len() - 1);
            }
            Token::Ascii41 | Token::Ascii93 => {
                if groups.len() > 1 {
                    let inner = groups.pop().expect("more than one").depth() + LEVELS_PER_GROUP;
                    let outer = groups.last_mut().expect("the outermost group stays");
                    outer.element_child = outer.element_child.max(inner);
                }
            }
            Token::Ascii59 if outermost => {
                let statement = std::mem::take(group);
                deepest_statement = deepest_statement.max(statement.depth());
            }
            Token::Ascii44 | Token::Ascii59 | Token::And | Token::Or => group.end_element(),
            Token::Ident
            | Token::Uident
            | Token::Fconst
            | Token::Sconst
            | Token::Usconst
            | Token::Bconst
            | Token::Xconst
            | Token::Iconst
            | Token::Param
            | Token::SqlComment
            | Token::CComment => {}
            _ if token.keyword_kind != KeywordKind::NoKeyword as i32
                && !EXPRESSION_KEYWORDS.contains(&kind) =>
            {
                group.keywords += 1
            }
            _ => group.element += 1,
        }
    }
    if nesting > PARSER_MAX_NESTING {
        // The parser refuses it with no tree to output: safe to parse on any stack.
        return BASE_LEVELS;
    }
    // Unclosed groups: the parser will refuse the text, but bound it all the same.
    while groups.len() > 1 {
        let inner = groups.pop().expect("more than one").depth() + LEVELS_PER_GROUP;
        let outer = groups.last_mut().expect("the outermost group stays");
        outer.element_child = outer.element_child.max(inner);
    }
    let last = groups.pop().expect("the outermost group").depth();
    BASE_LEVELS + deepest_statement.max(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(sql: &str) -> u64 {
        depth_bound(&pg_query::scan(sql).unwrap().tokens)
    }

    #[test]
    fn flat_texts_have_small_bounds_whatever_their_length() {
        let values: Vec<String> = (0..20_000)
            .map(|i| format!("({i}, 'x{i}', NULL)"))
            .collect();
        let insert = format!("INSERT INTO t VALUES {}", values.join(", "));
        assert!(bound(&insert) < 100, "{}", bound(&insert));
        let ors: Vec<String> = (0..20_000).map(|i| format!("id = {i}")).collect();
        let select = format!("SELECT * FROM t WHERE {}", ors.join(" OR "));
        assert!(bound(&select) < 100, "{}", bound(&select));
        let sums: Vec<String> = (0..20_000).map(|i| format!("a + {i}")).collect();
        assert!(bound(&format!("SELECT {}", sums.join(", "))) < 100);
        // Many statements are as deep as the deepest one.
        assert!(bound(&"SELECT 1 UNION SELECT 2;".repeat(50_000)) < 100);
    }

    #[test]
    fn chains_and_nesting_count() {
        let chain = format!("SELECT 1{}", "+1".repeat(1000));
        assert!(bound(&chain) >= 1000);
        let nested = format!("SELECT {}1{}", "(".repeat(500), ")".repeat(500));
        assert!(bound(&nested) >= 1000);
        // A clause keyword encloses every element after it.
        let unions = "SELECT 1, 2 UNION ".repeat(300) + "SELECT 1, 2";
        assert!(bound(&unions) >= 300);
    }

    #[test]
    fn deep_chains_parse_or_are_refused_without_overflow() {
        // Run where a tokio worker would: on a 2 MiB stack.
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                let parse = |sql: &str| with_tree(sql, |_| ());
                let sum = format!("SELECT {}", vec!["c"; 48].join(" + "));
                assert_eq!(parse(&sum), Ok(()));
                let chain = format!("SELECT 1{}", "+1".repeat(10_000));
                assert_eq!(parse(&chain), Ok(()));
                let long = format!("SELECT 1{}", "+1".repeat(40_000));
                assert_eq!(parse(&long), Ok(()));
                let deeper = format!("SELECT 1{}", "+1".repeat(100_000));
                assert_eq!(parse(&deeper), Err(ParseError::TooDeep));
                let huge = format!("SELECT 1{}", "+1".repeat(1_000_000));
                assert_eq!(parse(&huge), Err(ParseError::TooLong(huge.len())));
                let parens = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
                assert!(matches!(parse(&parens), Err(ParseError::Syntax(e)) if e.contains("memory exhausted")));
                let parens = format!("SELECT {}1{}", "(".repeat(9_000), ")".repeat(9_000));
                assert_eq!(parse(&parens), Ok(()));
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
