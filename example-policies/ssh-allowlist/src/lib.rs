//! ssh-allowlist: SSH commands must match an allowlist of argv patterns; interactive
//! shells and file-transfer subsystems need an explicit opt-in.
//!
//! A pattern is space-separated globs, one per argv word; a final `**` word matches any
//! remaining arguments. Read grants get the built-in read-only diagnostics, plus the
//! target's `ssh-allow` label (patterns separated by `;`). Write and admin grants also
//! get the target's `ssh-allow-write` label. Words with shell metacharacters are
//! refused outright: the remote shell would interpret them.
//!
//! An interactive shell needs the target label `ssh-shell=allow` and a write or admin
//! grant; `sftp` needs a write or admin grant.

use airlock_policy_sdk::*;

const READ_ONLY_DIAGNOSTICS: &[&str] = &[
    "uptime",
    "hostname",
    "whoami",
    "id",
    "uname **",
    "date",
    "df **",
    "free **",
    "ps **",
    "ls **",
    "cat /var/log/**",
    "tail **",
    "head **",
    "journalctl **",
    "systemctl status **",
    "systemctl is-active **",
];

const SHELL_METACHARACTERS: &[char] = &[
    ';', '&', '|', '$', '`', '<', '>', '(', ')', '{', '}', '\\', '\n', '\r', '!',
];

struct SshAllowlist;

impl Policy for SshAllowlist {
    fn check(context: GrantContext, action: Action) -> Verdict {
        let writer = context.access != Access::Read;
        match action {
            Action::SshExec(argv) => check_exec(&context, &argv, writer),
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
            Action::SshSubsystem(name) if name == "sftp" && writer => allow(),
            Action::SshSubsystem(name) => deny_with_hint(
                format!("subsystem `{name}` is not allowed under this grant"),
                "file transfer needs a grant with access=write",
            ),
            _ => abstain(),
        }
    }
}

fn check_exec(context: &GrantContext, argv: &[String], writer: bool) -> Verdict {
    if argv.is_empty() {
        return deny("an empty command is not allowed");
    }
    if let Some(word) = argv.iter().find(|w| w.contains(SHELL_METACHARACTERS)) {
        return deny_with_hint(
            format!("`{word}` contains shell metacharacters"),
            "pass plain arguments; pipes, redirects and substitutions are not allowed",
        );
    }
    let mut patterns: Vec<&str> = READ_ONLY_DIAGNOSTICS.to_vec();
    let extra = |key| {
        context
            .target
            .label(key)
            .map(|v| {
                v.split(';')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .collect()
            })
            .unwrap_or_else(Vec::new)
    };
    patterns.extend(extra("ssh-allow"));
    if writer {
        patterns.extend(extra("ssh-allow-write"));
    }
    if patterns.iter().any(|p| argv_matches(p, argv)) {
        allow_with(None, !writer)
    } else {
        deny_with_hint(
            format!(
                "`{}` is not on this target's command allowlist",
                argv.join(" ")
            ),
            "allowed: read-only diagnostics such as uptime, df -h, systemctl status NAME, journalctl",
        )
    }
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
