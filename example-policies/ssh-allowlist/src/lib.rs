//! ssh-allowlist: every command an SSH command line runs must match an allowlist of
//! argv patterns; interactive shells and file transfer need an explicit opt-in.
//!
//! The host parses a command line with a shell's grammar into the simple commands it
//! runs and the operators between them. `ls; rm -rf /`, `ls && rm x` and `ls | sh` are
//! three commands here, and each must be allowed on its own. A command line with
//! anything the remote shell would decide when it runs (substitutions, redirections,
//! variables, globs, here-documents, newlines, control flow) is denied whole, as is one
//! that runs something in the background.
//!
//! A pattern is space-separated globs, one per argv word; a final `**` word matches any
//! remaining arguments. Read grants get the built-in read-only diagnostics, each with the
//! few options it may carry, plus the target's `ssh-allow` label (patterns separated by
//! `;`, whose options are the operator's to choose). Write and admin grants also
//! get the target's `ssh-allow-write` label. An argument with a `..` path component is
//! refused: a glob such as `/var/log/**` would match it while the server reads
//! elsewhere. Paths in commands are decided as text: a symbolic link under an allowed
//! directory is followed by the command (SFTP, by contrast, is decided on the path the
//! server resolves).
//!
//! An interactive shell needs the target label `ssh-shell=allow` and a write or admin
//! grant. SFTP is decided per operation: reads (open for reading, list, stat) under the
//! target's `sftp-read` globs (default `/var/log/**`), writes only under a write or
//! admin grant and the target's `sftp-write` globs (none by default).

use airlock_policy_sdk::ssh::climbs;
use airlock_policy_sdk::*;

/// The built-in read-only diagnostics: an argv pattern, and the options (words that
/// start with `-`, compared up to any `=`) it may carry. Any other option is refused:
/// options are where commands hide network reach, writes and pagers
/// (`systemctl -H host`, `journalctl --vacuum-size=1`, `ps e`'s environments).
const READ_ONLY_DIAGNOSTICS: &[(&str, &[&str])] = &[
    ("uptime", &[]),
    ("hostname", &[]),
    ("whoami", &[]),
    ("id", &[]),
    ("date", &[]),
    ("uname **", &["-a", "-r", "-s", "-m", "-n", "-v", "-o"]),
    ("df **", &["-h", "-H", "-T", "-i", "-l", "-P"]),
    ("free **", &["-h", "-m", "-g", "-k", "-b", "-t", "-w"]),
    ("ps", &[]),
    ("ps aux", &[]),
    ("ps -ef", &["-ef"]),
    (
        "ls **",
        &[
            "-l", "-a", "-la", "-al", "-lh", "-lah", "-h", "-t", "-r", "-S", "-1", "-d", "-ld",
            "-ltr",
        ],
    ),
    ("cat /var/log/**", &[]),
    ("tail /var/log/**", &[]),
    ("tail -n * /var/log/**", &["-n"]),
    ("head /var/log/**", &[]),
    ("head -n * /var/log/**", &["-n"]),
    (
        "journalctl **",
        &[
            "-u",
            "--unit",
            "-n",
            "--lines",
            "--since",
            "--until",
            "-p",
            "--priority",
            "-b",
            "--boot",
            "-k",
            "--dmesg",
            "--no-pager",
            "-r",
            "--reverse",
            "-q",
            "--quiet",
            "-o",
            "--output",
            "-x",
            "--catalog",
            "-g",
            "--grep",
        ],
    ),
    (
        "systemctl status **",
        &["--no-pager", "-l", "--full", "-n", "--lines", "--no-legend"],
    ),
    ("systemctl is-active **", &["-q", "--quiet"]),
];

const DEFAULT_SFTP_READ: &str = "/var/log/**";

struct SshAllowlist;

impl Policy for SshAllowlist {
    fn check(context: GrantContext, action: Action) -> Verdict {
        let writer = context.access != Access::Read;
        match action {
            Action::SshExec(command) => check_exec(&context, &command, writer),
            Action::SshShell => {
                if context.target.has_label("ssh-shell", "allow") && writer {
                    allow()
                } else {
                    deny_with_hint(
                        "interactive shells are not allowed on this target",
                        "run a single command instead, e.g. `airlock connect … -- uptime`",
                    )
                }
            }
            Action::SshSubsystem(name) if name == "sftp" => allow_with(None, !writer),
            Action::SshSubsystem(name) => {
                deny(format!("subsystem `{name}` is not allowed on this target"))
            }
            Action::Sftp(request) => check_sftp(&context, &request, writer),
            _ => abstain(),
        }
    }
}

fn check_exec(context: &GrantContext, command: &SshCommand, writer: bool) -> Verdict {
    if !command.is_plain() {
        return deny_with_hint(
            format!(
                "the command line holds what the remote shell would decide ({}), not only commands",
                command.features_text()
            ),
            "send plain commands and quote their arguments; no pipes into shells, redirections, substitutions or globs",
        );
    }
    if command.commands.is_empty() {
        return deny("an empty command is not allowed");
    }
    if command.operators.contains(&ShellOperator::Background) {
        return deny("commands in the background (`&`) are not allowed");
    }
    // The target's own patterns are the operator's: any options they match are allowed.
    let mut patterns: Vec<(&str, Option<&[&str]>)> = READ_ONLY_DIAGNOSTICS
        .iter()
        .map(|(pattern, options)| (*pattern, Some(*options)))
        .collect();
    patterns.extend(
        label_list(context, "ssh-allow")
            .into_iter()
            .map(|p| (p, None)),
    );
    if writer {
        patterns.extend(
            label_list(context, "ssh-allow-write")
                .into_iter()
                .map(|p| (p, None)),
        );
    }
    for argv in &command.commands {
        if let Some(word) = argv.iter().find(|w| climbs(w)) {
            return deny(format!("`{word}` climbs out of its directory (`..`)"));
        }
        let allowed = |(pattern, options): &(&str, Option<&[&str]>)| {
            argv_matches(pattern, argv) && options.is_none_or(|o| options_allowed(argv, o))
        };
        if !patterns.iter().any(allowed) {
            return deny_with_hint(
                format!(
                    "`{}` is not on this target's command allowlist",
                    argv.join(" ")
                ),
                "allowed: read-only diagnostics such as uptime, df -h, systemctl status NAME, journalctl",
            );
        }
    }
    allow_with(None, !writer)
}

fn check_sftp(context: &GrantContext, request: &SftpRequest, writer: bool) -> Verdict {
    // Resolving a path tells nothing of a file's content; clients do it first.
    if request.op == SftpOp::Realpath {
        return allow_with(None, !writer);
    }
    let paths = std::iter::once(&request.path).chain(&request.target_path);
    let globs: Vec<&str> = if request.op.reads_only() {
        let read = label_list(context, "sftp-read");
        if read.is_empty() {
            vec![DEFAULT_SFTP_READ]
        } else {
            read
        }
    } else if writer {
        label_list(context, "sftp-write")
    } else {
        return deny_with_hint(
            format!("`{}` changes files: not under a read grant", request.path),
            "ask for access=write",
        );
    };
    for path in paths {
        if climbs(path) || !globs.iter().any(|g| glob(g, path)) {
            return deny(format!(
                "`{path}` is outside what this grant may {} over SFTP",
                if request.op.reads_only() {
                    "read"
                } else {
                    "change"
                }
            ));
        }
    }
    allow_with(None, !writer)
}

/// A `;`-separated list in one of the target's labels.
fn label_list<'a>(context: &'a GrantContext, key: &str) -> Vec<&'a str> {
    context
        .target
        .label(key)
        .map(|v| {
            v.split(';')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Every option in `argv` (after the command) is one of `allowed`.
fn options_allowed(argv: &[String], allowed: &[&str]) -> bool {
    argv.iter().skip(1).filter(|w| w.starts_with('-')).all(|w| {
        let name = w.split_once('=').map_or(w.as_str(), |(name, _)| name);
        allowed.contains(&name)
    })
}

fn argv_matches(pattern: &str, argv: &[String]) -> bool {
    let words: Vec<&str> = pattern.split_whitespace().collect();
    let (rest_any, words) = match words.split_last() {
        Some((&"**", init)) => (true, init),
        _ => (false, &words[..]),
    };
    if argv.len() < words.len() || (!rest_any && argv.len() != words.len()) {
        return false;
    }
    words.iter().zip(argv).all(|(p, a)| glob(p, a))
}

export_policy!(SshAllowlist);
