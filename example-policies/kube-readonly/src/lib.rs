//! kube-readonly: Kubernetes requests may only read (get, list, watch), only in the
//! namespaces the target's `namespaces` label names (comma-separated).
//!
//! Secrets are not readable, and attach, port-forward and proxy are refused: each
//! hands over more than a read. `exec` runs a command in a container, so it is refused
//! unless the target's `exec-allow` label names the command (its first word, as written:
//! `exec-allow = "date, env, ls"` allows `ls` but not `/tmp/x/ls`), without a terminal,
//! and never a shell or an
//! interpreter: `sh -c …` executes text no policy saw. Cluster-scoped resources are
//! outside every namespace and so refused; API discovery is allowed, and no other path
//! outside the resource API (`/logs`, `/metrics`, `/debug/pprof`).

use airlock_policy_sdk::*;

const ESCAPE_SUBRESOURCES: &[&str] = &["attach", "portforward", "proxy"];

/// Programs that run text given to them: never allowed through `exec-allow`.
const INTERPRETERS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "ash", "ksh", "busybox", "env", "python", "python3", "perl",
    "ruby", "node", "php", "lua", "awk", "gawk", "xargs", "find", "nsenter", "chroot",
];

struct KubeReadonly;

impl Policy for KubeReadonly {
    fn check(context: GrantContext, action: Action) -> Verdict {
        let Action::Kube(request) = action else {
            return abstain();
        };
        if request.subresource.as_deref() == Some("exec") {
            return exec(&context, &request);
        }
        if let Some(sub) = request
            .subresource
            .as_deref()
            .filter(|s| ESCAPE_SUBRESOURCES.contains(s))
        {
            return deny(format!("pods/{sub} gives more than read access"));
        }
        if !request.is_read_only() {
            return deny_with_hint(
                format!(
                    "`{}` is not a read (only get, list and watch are allowed)",
                    request.verb
                ),
                "this target is read-only for agents; ask an operator to make the change",
            );
        }
        if request.resource_type.is_empty() {
            return discovery(&request);
        }
        if request.resource_type == "secrets" {
            return deny_with_hint(
                "secrets are not readable through Airlock",
                "ask an operator for the value you need",
            );
        }
        let namespaces = context.target.label_list("namespaces");
        if !request.in_namespaces(&namespaces) {
            let asked = request.namespace.as_deref().unwrap_or("(cluster scope)");
            return deny_with_hint(
                format!("namespace {asked} is not open on this target"),
                format!("readable namespaces: {}", namespaces.join(", ")),
            );
        }
        allow_with(None, true)
    }
}

/// Paths outside the resource API: only discovery (what the API serves, its version,
/// its OpenAPI documents). `/logs`, `/metrics`, `/debug/…` and the like are the
/// control plane's own, outside every namespace.
fn discovery(request: &KubeRequest) -> Verdict {
    let parts: Vec<&str> = request.path.trim_matches('/').split('/').collect();
    let allowed = matches!(
        parts.as_slice(),
        ["api"] | ["api", _] | ["apis"] | ["apis", _] | ["apis", _, _] | ["version"]
    ) || parts.first() == Some(&"openapi");
    if allowed && request.verb == "get" {
        allow_with(None, true)
    } else {
        deny_with_hint(
            format!("`{}` is not API discovery", request.path),
            "only the resource API and discovery are open through Airlock",
        )
    }
}

/// An `exec`: only a command the target's `exec-allow` label names, in an open
/// namespace, without a terminal, and never one that runs text.
fn exec(context: &GrantContext, request: &KubeRequest) -> Verdict {
    // Exec is a pod's, opened with GET or POST; the same name on another resource, or
    // with another verb, is not an exec this policy can vouch for.
    if request.resource_type != "pods"
        || !request.api_group.is_empty()
        || !matches!(request.verb.as_str(), "create" | "get")
    {
        return deny(format!(
            "`{}` on {}/exec is not a pod exec",
            request.verb,
            request.full_resource()
        ));
    }
    let namespaces = context.target.label_list("namespaces");
    if !request.in_namespaces(&namespaces) {
        return deny("exec outside the namespaces open on this target");
    }
    let Some(program) = request.command.first() else {
        return deny("exec without a command");
    };
    let name = program.rsplit('/').next().unwrap_or(program);
    let allowed = context.target.label_list("exec-allow");
    if INTERPRETERS.contains(&name) {
        return deny_with_hint(
            format!("`{program}` runs text no policy saw"),
            "exec a command itself, not a shell or an interpreter",
        );
    }
    // By the name the container's PATH resolves, as listed: a path names whatever
    // binary sits there, listed name or not.
    if !allowed.contains(&program.as_str()) {
        return deny_with_hint(
            format!("exec of `{program}` is not allowed on this target"),
            if allowed.is_empty() {
                "this target allows no exec".to_string()
            } else {
                format!("commands allowed: {}", allowed.join(", "))
            },
        );
    }
    if request.tty {
        return deny_with_hint(
            "exec with a terminal",
            "run the command without -t: a terminal's programs start shells",
        );
    }
    allow_with(None, context.access == Access::Read)
}

export_policy!(KubeReadonly);
