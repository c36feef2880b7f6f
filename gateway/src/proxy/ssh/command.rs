//! An SSH `exec` command line, read with a shell's grammar (brush-parser, bash's) into
//! what a shell would run: the simple commands, each as its argv, the operators between
//! them, and whatever the remote shell would decide at run time (substitutions,
//! redirections, variables, globs, …).
//!
//! The gateway and the remote shell must read the same bytes the same way. A command
//! line with none of those features is not sent as the client wrote it: the gateway
//! sends its own rendering of exactly the argvs the policies saw, each word in POSIX
//! single quotes where it is not plainly safe, so a difference between this parser and
//! the upstream's shell cannot change what runs. A command line with features is sent
//! as written only when every policy allowed it knowing that.

use brush_parser::ast::{
    AndOr, Command, CommandPrefixOrSuffixItem, CompoundCommand, CompoundList, IoFileRedirectTarget,
    IoRedirect, Pipeline, SeparatorOperator,
};
use brush_parser::word::WordPiece;
use brush_parser::{ParserOptions, TokenizerOptions};

use crate::policy::types::{ShellFeature, ShellOperator, SshCommand};

/// The longest command line the gateway parses; a longer one is unparsable (OpenSSH's
/// own client sends at most a few hundred KiB, and no allowlist needs this much).
const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Nesting the parser is asked to follow at most: it recurses (deeply) once per level.
/// A level opens with a bracket, a backquote or a reserved word (`if`, `while`, …), so
/// the count of those bounds the depth, whatever the nesting is made of.
const MAX_NESTING: usize = 256;

/// Reserved words that open a level of nesting.
const OPENING_WORDS: &[&str] = &[
    "if", "then", "elif", "else", "while", "until", "do", "case", "for", "select", "function",
    "coproc", "!", "[[", "time",
];

/// Stack for one parse: enough for `MAX_NESTING` levels with a wide margin.
const PARSE_STACK: usize = 32 << 20;

/// Reserved words: bare, they would start shell syntax instead of naming a command.
const RESERVED: &[&str] = &[
    "!", "{", "}", "[[", "]]", "case", "coproc", "do", "done", "elif", "else", "esac", "fi", "for",
    "function", "if", "in", "select", "then", "time", "until", "while",
];

/// Parses a command line as sent in an SSH `exec` request.
pub fn parse(bytes: &[u8]) -> SshCommand {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let mut reader = Reader::default();
    let parseable = std::str::from_utf8(bytes).is_ok()
        && !bytes.contains(&0)
        && bytes.len() <= MAX_COMMAND_BYTES
        && nesting_bound(&text) <= MAX_NESTING;
    if !parseable || !reader.read(&text) {
        reader = Reader::default();
        reader.flag(ShellFeature::Unparsable);
    }
    if text.contains(['\n', '\r']) {
        reader.flag(ShellFeature::Newline);
    }
    SshCommand {
        text,
        commands: reader.commands,
        operators: reader.operators,
        features: reader.features,
    }
}

/// An upper bound on how deep the parser would recurse for `text`: every bracket,
/// backquote and reserved word that could open a level, wherever it stands (quoted ones
/// too: over-counting only makes a line unparsable, never lets one through).
fn nesting_bound(text: &str) -> usize {
    let brackets = text
        .bytes()
        .filter(|b| matches!(b, b'(' | b'{' | b'`' | b'['))
        .count();
    let words = text
        .split(|c: char| c.is_whitespace() || ";&|()<>`".contains(c))
        .filter(|word| OPENING_WORDS.contains(word))
        .count();
    brackets + words
}

/// What the upstream is sent for a command line with no features: its commands and
/// operators, each word quoted where it is not plainly safe. `None` when the line has
/// features (only its own text says what it means) or no command.
pub fn render(command: &SshCommand) -> Option<String> {
    if !command.features.is_empty() || command.commands.is_empty() {
        return None;
    }
    let mut out = String::new();
    let last = command.commands.len() - 1;
    for (i, (argv, operator)) in command.commands.iter().zip(&command.operators).enumerate() {
        let words: Vec<String> = argv.iter().map(|w| quote(w)).collect();
        out.push_str(&words.join(" "));
        out.push_str(match (operator, i == last) {
            (ShellOperator::Sequence, true) => "",
            (ShellOperator::Sequence, false) => "; ",
            (ShellOperator::And, _) => " && ",
            (ShellOperator::Or, _) => " || ",
            (ShellOperator::Pipe, _) => " | ",
            (ShellOperator::Background, _) => " &",
        });
        if *operator == ShellOperator::Background && i != last {
            out.push(' ');
        }
    }
    Some(out)
}

/// A word as a POSIX shell reads back exactly: bare when it is made only of characters
/// no shell treats specially (and is no reserved word), else in single quotes.
fn quote(word: &str) -> String {
    let safe = !word.is_empty()
        && !RESERVED.contains(&word)
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./,:@%+-".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The walk over one parse tree.
#[derive(Default)]
struct Reader {
    commands: Vec<Vec<String>>,
    operators: Vec<ShellOperator>,
    features: Vec<ShellFeature>,
}

impl Reader {
    fn flag(&mut self, feature: ShellFeature) {
        if !self.features.contains(&feature) {
            self.features.push(feature);
        }
    }

    /// False when the text is not a command line the parser accepts.
    fn read(&mut self, text: &str) -> bool {
        // Always on a stack of its own: a worker thread's (2 MiB) is far too small.
        stacker::maybe_grow(PARSE_STACK / 2, PARSE_STACK, || {
            let options = ParserOptions::default();
            let tokenizer = TokenizerOptions {
                enable_extended_globbing: options.enable_extended_globbing,
                posix_mode: options.posix_mode,
                sh_mode: options.sh_mode,
            };
            let Ok(tokens) = brush_parser::tokenize_str_with_options(text, &tokenizer) else {
                return false;
            };
            let Ok(program) = brush_parser::parse_tokens(&tokens, &options) else {
                return false;
            };
            for list in &program.complete_commands {
                self.list(list, &options);
            }
            true
        })
    }

    fn list(&mut self, list: &CompoundList, options: &ParserOptions) {
        for item in &list.0 {
            let and_or = &item.0;
            self.pipeline(&and_or.first, options);
            for next in &and_or.additional {
                let (operator, pipeline) = match next {
                    AndOr::And(p) => (ShellOperator::And, p),
                    AndOr::Or(p) => (ShellOperator::Or, p),
                };
                self.set_last_operator(operator);
                self.pipeline(pipeline, options);
            }
            if matches!(item.1, SeparatorOperator::Async) {
                self.set_last_operator(ShellOperator::Background);
            }
        }
    }

    fn pipeline(&mut self, pipeline: &Pipeline, options: &ParserOptions) {
        if pipeline.bang || pipeline.timed.is_some() {
            self.flag(ShellFeature::Compound);
        }
        for (i, command) in pipeline.seq.iter().enumerate() {
            if i > 0 {
                self.set_last_operator(ShellOperator::Pipe);
            }
            self.command(command, options);
        }
    }

    /// The operator after the last command read so far.
    fn set_last_operator(&mut self, operator: ShellOperator) {
        if let Some(last) = self.operators.last_mut() {
            *last = operator;
        }
    }

    fn command(&mut self, command: &Command, options: &ParserOptions) {
        match command {
            Command::Simple(simple) => {
                let mut argv = Vec::new();
                let items = simple
                    .prefix
                    .iter()
                    .flat_map(|p| &p.0)
                    .chain(simple.suffix.iter().flat_map(|s| &s.0));
                let mut name = simple.word_or_name.iter();
                // The prefix comes before the command's name, the suffix after it.
                let prefix_len = simple.prefix.as_ref().map_or(0, |p| p.0.len());
                for (i, item) in items.enumerate() {
                    if i == prefix_len
                        && let Some(word) = name.next()
                    {
                        argv.push(self.word(&word.value, options));
                    }
                    match item {
                        CommandPrefixOrSuffixItem::Word(word) => {
                            argv.push(self.word(&word.value, options))
                        }
                        CommandPrefixOrSuffixItem::IoRedirect(redirect) => self.redirect(redirect),
                        CommandPrefixOrSuffixItem::AssignmentWord(..) => {
                            self.flag(ShellFeature::Assignment);
                        }
                        CommandPrefixOrSuffixItem::ProcessSubstitution(..) => {
                            self.flag(ShellFeature::Substitution);
                        }
                    }
                }
                if let Some(word) = name.next() {
                    argv.push(self.word(&word.value, options));
                }
                if argv.is_empty() {
                    // Only assignments or redirections: nothing of its own runs.
                    return;
                }
                self.commands.push(argv);
                self.operators.push(ShellOperator::Sequence);
            }
            Command::Compound(compound, redirects) => {
                self.flag(ShellFeature::Compound);
                for redirect in redirects.iter().flat_map(|r| &r.0) {
                    self.redirect(redirect);
                }
                self.compound(compound, options);
            }
            Command::Function(function) => {
                self.flag(ShellFeature::Compound);
                self.compound(&function.body.0, options);
            }
            Command::ExtendedTest(..) => {
                self.flag(ShellFeature::Compound);
            }
        }
    }

    /// Reads the commands inside control flow too, so a policy can name them; the line
    /// is flagged `compound` whatever they are.
    fn compound(&mut self, compound: &CompoundCommand, options: &ParserOptions) {
        match compound {
            CompoundCommand::BraceGroup(group) => self.list(&group.list, options),
            CompoundCommand::Subshell(subshell) => self.list(&subshell.list, options),
            CompoundCommand::ForClause(f) => self.list(&f.body.list, options),
            CompoundCommand::ArithmeticForClause(f) => self.list(&f.body.list, options),
            CompoundCommand::CaseClause(c) => {
                for list in c.cases.iter().filter_map(|c| c.cmd.as_ref()) {
                    self.list(list, options);
                }
            }
            CompoundCommand::IfClause(i) => {
                self.list(&i.condition, options);
                self.list(&i.then, options);
                for clause in i.elses.iter().flatten() {
                    if let Some(condition) = &clause.condition {
                        self.list(condition, options);
                    }
                    self.list(&clause.body, options);
                }
            }
            CompoundCommand::WhileClause(w) | CompoundCommand::UntilClause(w) => {
                self.list(&w.0, options);
                self.list(&w.1.list, options);
            }
            CompoundCommand::Coprocess(c) => self.command(&c.body, options),
            CompoundCommand::Arithmetic(..) => {
                self.flag(ShellFeature::Expansion);
            }
        }
    }

    fn redirect(&mut self, redirect: &IoRedirect) {
        let feature = match redirect {
            IoRedirect::HereDocument(..) | IoRedirect::HereString(..) => ShellFeature::HereDoc,
            IoRedirect::File(_, _, IoFileRedirectTarget::ProcessSubstitution(..)) => {
                self.flag(ShellFeature::Substitution);
                ShellFeature::Redirection
            }
            IoRedirect::File(..) | IoRedirect::OutputAndError(..) => ShellFeature::Redirection,
        };
        self.flag(feature);
    }

    /// A word's value after quote removal, flagging whatever in it the shell would
    /// expand.
    fn word(&mut self, raw: &str, options: &ParserOptions) -> String {
        match brush_parser::word::parse(raw, options) {
            Ok(pieces) => {
                let mut value = String::new();
                for piece in pieces {
                    self.piece(&piece.piece, false, &mut value);
                }
                value
            }
            Err(_) => {
                self.flag(ShellFeature::Unparsable);
                raw.to_string()
            }
        }
    }

    fn piece(&mut self, piece: &WordPiece, quoted: bool, value: &mut String) {
        match piece {
            WordPiece::Text(text) => {
                if !quoted {
                    if text.contains(['*', '?', '[', ']', '(', ')']) {
                        self.flag(ShellFeature::Glob);
                    }
                    if text.contains(['{', '}', '~']) {
                        self.flag(ShellFeature::Expansion);
                    }
                }
                value.push_str(text);
            }
            WordPiece::SingleQuotedText(text) => value.push_str(text),
            WordPiece::DoubleQuotedSequence(pieces) => {
                for inner in pieces {
                    self.piece(&inner.piece, true, value);
                }
            }
            WordPiece::EscapeSequence(escape) => {
                // `\c` is `c`; inside double quotes only `\$`, `` \` ``, `\"` and `\\`
                // lose their backslash, and the grammar yields only those there.
                value.push_str(escape.strip_prefix('\\').unwrap_or(escape));
            }
            WordPiece::CommandSubstitution(..) | WordPiece::BackquotedCommandSubstitution(..) => {
                self.flag(ShellFeature::Substitution);
            }
            WordPiece::AnsiCQuotedText(..)
            | WordPiece::GettextDoubleQuotedSequence(..)
            | WordPiece::TildeExpansion(..)
            | WordPiece::ArithmeticExpression(..) => {
                self.flag(ShellFeature::Expansion);
            }
            WordPiece::ParameterExpansion(..) => {
                self.flag(ShellFeature::Expansion);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argvs(text: &str) -> Vec<Vec<String>> {
        parse(text.as_bytes()).commands
    }

    fn features(text: &str) -> Vec<ShellFeature> {
        parse(text.as_bytes()).features
    }

    #[test]
    fn plain_commands_read_as_argv_and_render_back_quoted() {
        let c = parse(br#"ls -la '/var/log/my app' "x y" a\ b"#);
        assert!(c.features.is_empty(), "{:?}", c.features);
        assert_eq!(c.commands, [["ls", "-la", "/var/log/my app", "x y", "a b"]]);
        let rendered = render(&c).unwrap();
        assert_eq!(rendered, "ls -la '/var/log/my app' 'x y' 'a b'");
        assert_eq!(parse(rendered.as_bytes()).commands, c.commands);
    }

    #[test]
    fn operators_split_commands_and_each_is_seen() {
        for (text, ops) in [
            (
                "ls; rm -rf /",
                vec![ShellOperator::Sequence, ShellOperator::Sequence],
            ),
            (
                "ls && rm x",
                vec![ShellOperator::And, ShellOperator::Sequence],
            ),
            (
                "ls || rm x",
                vec![ShellOperator::Or, ShellOperator::Sequence],
            ),
            (
                "ls | sh",
                vec![ShellOperator::Pipe, ShellOperator::Sequence],
            ),
            (
                "ls & rm x",
                vec![ShellOperator::Background, ShellOperator::Sequence],
            ),
        ] {
            let c = parse(text.as_bytes());
            assert_eq!(c.commands.len(), 2, "{text}");
            assert_eq!(c.operators, ops, "{text}");
            assert!(c.features.is_empty(), "{text}");
            assert_eq!(parse(render(&c).unwrap().as_bytes()).commands, c.commands);
        }
        assert_eq!(
            parse(b"sleep 9 &").operators,
            [ShellOperator::Background],
            "a trailing & is kept"
        );
        assert_eq!(render(&parse(b"sleep 9 &")).unwrap(), "sleep 9 &");
    }

    #[test]
    fn what_the_shell_would_decide_is_flagged() {
        use ShellFeature::*;
        for (text, feature) in [
            ("ls $(rm x)", Substitution),
            ("ls `rm x`", Substitution),
            ("ls \"$(rm x)\"", Substitution),
            ("diff <(rm x) y", Substitution),
            ("cat > /etc/x", Redirection),
            ("cat /etc/x 2>&1", Redirection),
            ("cat <<EOF\nx\nEOF", HereDoc),
            ("cat <<< x", HereDoc),
            ("echo $HOME", Expansion),
            ("echo \"${HOME}\"", Expansion),
            ("echo ~root", Expansion),
            ("echo $((1+1))", Expansion),
            ("echo $'\\x41'", Expansion),
            ("rm{,} x", Expansion),
            ("ls *.log", Glob),
            ("ls ?", Glob),
            ("ls [ab]", Glob),
            ("PATH=/tmp ls", Assignment),
            ("ls\nrm x", Newline),
            ("(rm x)", Compound),
            ("{ rm x; }", Compound),
            ("if true; then rm x; fi", Compound),
            ("for f in a; do rm $f; done", Compound),
            ("! ls", Compound),
            ("f() { rm x; }; f", Compound),
            ("ls 'unterminated", Unparsable),
        ] {
            let found = features(text);
            assert!(found.contains(&feature), "{text:?}: {found:?}");
            assert_eq!(render(&parse(text.as_bytes())), None, "{text:?}");
        }
        // Commands inside control flow are still there for a policy to name.
        assert!(argvs("(rm x)").contains(&vec!["rm".to_string(), "x".to_string()]));
        assert!(argvs("if true; then rm x; fi").iter().any(|a| a[0] == "rm"));
    }

    #[test]
    fn quoted_metacharacters_are_literal_and_stay_quoted() {
        let c = parse(br#"echo '$(rm x)' "a;b" '*' "`x`" 'if'"#);
        assert_eq!(c.features, vec![ShellFeature::Substitution]);
        let c = parse(br#"echo '$(rm x)' "a;b" '*' 'if'"#);
        assert!(c.features.is_empty(), "{:?}", c.features);
        assert_eq!(c.commands, [["echo", "$(rm x)", "a;b", "*", "if"]]);
        assert_eq!(render(&c).unwrap(), r"echo '$(rm x)' 'a;b' '*' 'if'");
        let c = parse(br#"echo 'it'\''s'"#);
        assert_eq!(c.commands, [["echo", "it's"]]);
        assert_eq!(render(&c).unwrap(), r"echo 'it'\''s'");
    }

    #[test]
    fn bytes_the_server_would_read_differently_are_unparsable() {
        for bytes in [&b"ls\0; rm x"[..], b"ls \xff", &[b'('; 300]] {
            assert!(parse(bytes).features.contains(&ShellFeature::Unparsable));
        }
        let huge = format!("echo {}", "a".repeat(MAX_COMMAND_BYTES));
        assert!(features(&huge).contains(&ShellFeature::Unparsable));
    }

    #[test]
    fn deep_nesting_within_the_bound_parses_without_overflow() {
        let text = format!("{}ls{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
        let c = parse(text.as_bytes());
        assert!(
            c.features.contains(&ShellFeature::Compound),
            "{:?}",
            c.features
        );
        let text = format!("echo {}", "$(".repeat(200) + &")".repeat(200));
        assert!(features(&text).contains(&ShellFeature::Substitution));
        // Nesting made of reserved words, each of which the parser recurses through.
        let levels = MAX_NESTING / 2;
        let text = format!(
            "{}true{}",
            "if true; then ".repeat(levels),
            "; fi".repeat(levels)
        );
        assert!(features(&text).contains(&ShellFeature::Compound));
        for opener in [
            "if ",
            "while ",
            "until ",
            "case a in a) ",
            "! ",
            "for x in y; do ",
        ] {
            let text = format!("{}true", opener.repeat(2000));
            assert!(
                features(&text).contains(&ShellFeature::Unparsable),
                "{opener:?} x 2000"
            );
        }
    }

    #[test]
    fn empty_and_comment_only_lines_run_nothing() {
        assert!(argvs("").is_empty());
        assert!(argvs("# rm -rf /").is_empty());
        assert_eq!(render(&parse(b"")), None);
        assert_eq!(argvs("ls # rm -rf /"), [["ls"]]);
    }
}
