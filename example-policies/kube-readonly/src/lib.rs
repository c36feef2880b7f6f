//! kube-readonly: Kubernetes requests may only read (get, list, watch), only in the
//! namespaces the target's `namespaces` label names (comma-separated).
//!
//! Secrets are not readable, and exec, attach, port-forward and proxy are refused:
//! each hands over more than a read. Cluster-scoped resources are outside every
//! namespace and so refused; API discovery (no resource) is allowed.

use airlock_policy_sdk::*;

const ESCAPE_SUBRESOURCES: &[&str] = &["exec", "attach", "portforward", "proxy"];

struct KubeReadonly;

impl Policy for KubeReadonly {
    fn check(context: GrantContext, action: Action) -> Verdict {
        let Action::Kube(request) = action else {
            return abstain();
        };
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
            return allow_with(None, true);
        }
        if let Some(sub) = request
            .subresource
            .as_deref()
            .filter(|s| ESCAPE_SUBRESOURCES.contains(s))
        {
            return deny(format!("pods/{sub} gives more than read access"));
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

export_policy!(KubeReadonly);
