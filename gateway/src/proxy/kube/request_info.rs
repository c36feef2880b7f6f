//! A Kubernetes API request read with the API server's own request-info rules
//! (`k8s.io/apiserver/pkg/endpoints/request/requestinfo.go`): the verb, API group and
//! version, resource, subresource, namespace and name the server's authorizer sees.
//!
//! The path is the one the HTTP layer already read once (decoded, resolved) and sends
//! upstream. Query parameters the server reads into the request's meaning (`watch`,
//! `fieldSelector` for a list's name, an exec's `command` and `tty`, a port-forward's
//! `ports`) are read with the same form decoding; where the server's reading depends
//! on how it would fail to parse (a `watch=yes`, a repeated `watch`, a pair Go's
//! `ParseQuery` would silently drop for a bad `%` escape), the request is refused
//! instead of guessed at.

use hyper::Method;

use crate::policy::types::KubeRequest;
use crate::proxy::http::path::check_query;

/// Why a Kubernetes request was refused before policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeError {
    #[error("query parameter `{0}` is given more than once")]
    Repeated(&'static str),
    #[error("query parameter `{0}` = {1:?} is not a boolean the API server reads one way")]
    NotBool(&'static str, String),
    #[error("port {0:?} is not a port number")]
    BadPort(String),
    #[error("a `;` in the query, which the API server reads as a separator and Go refuses")]
    Semicolon,
    #[error(
        "a query pair with a `%` not followed by two hex digits, or not UTF-8 once decoded: the API server would drop it unseen, or read other bytes"
    )]
    BadQueryEscape,
    #[error(
        "`{0}`: impersonation is not allowed through Airlock (the request is authorized as the gateway's own identity, and decided by policy as this grant)"
    )]
    Impersonation(String),
    #[error(
        "limitBytes cuts a log line wherever the agent chooses, so a masked value could be rebuilt from its prefixes; use tailLines"
    )]
    LimitBytes,
}

/// A query's pairs, decoded as Go's `url.ParseQuery` decodes them (`+` is a space),
/// refusing what it would skip or read as other bytes: a pair with a bad escape is
/// dropped there (so a `command` policy saw would never run, and the next would), and
/// bytes that are not UTF-8 would be read lossily here.
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, KubeError> {
    let decode = |text: &str| -> Result<String, KubeError> {
        check_query(text).map_err(|_| KubeError::BadQueryEscape)?;
        let spaced = text.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8()
            .map(|decoded| decoded.into_owned())
            .map_err(|_| KubeError::BadQueryEscape)
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(key)?, decode(value)?))
        })
        .collect()
}

/// The API server's verbs for each HTTP method (`GET` and `HEAD` are `get` until the
/// path shows a collection).
fn verb_of(method: &Method) -> String {
    match *method {
        Method::POST => "create".into(),
        Method::GET | Method::HEAD => "get".into(),
        Method::PUT => "update".into(),
        Method::PATCH => "patch".into(),
        Method::DELETE => "delete".into(),
        _ => method.as_str().to_ascii_lowercase(),
    }
}

/// Reads a request: `path` as the HTTP layer resolved it (starting with `/`), `query`
/// as sent.
pub fn request_info(method: &Method, path: &str, query: &str) -> Result<KubeRequest, KubeError> {
    if query.contains(';') {
        return Err(KubeError::Semicolon);
    }
    let params = query_pairs(query)?;
    let values = |name: &str| -> Vec<&str> {
        params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let single = |name: &'static str| -> Result<Option<&str>, KubeError> {
        match values(name).as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            _ => Err(KubeError::Repeated(name)),
        }
    };
    let boolean = |name: &'static str| -> Result<bool, KubeError> {
        match single(name)? {
            None => Ok(false),
            Some(v) => parse_bool(v).ok_or_else(|| KubeError::NotBool(name, v.to_string())),
        }
    };

    let mut info = KubeRequest {
        verb: method.as_str().to_ascii_lowercase(),
        api_group: String::new(),
        api_version: String::new(),
        resource_type: String::new(),
        subresource: None,
        namespace: None,
        name: None,
        command: Vec::new(),
        tty: false,
        ports: Vec::new(),
        path: path.to_string(),
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // The resource API: /api/VERSION/… (the core group) or /apis/GROUP/VERSION/….
    let rest: &[&str] = match parts.as_slice() {
        ["api", version, rest @ ..] if !rest.is_empty() => {
            info.api_version = version.to_string();
            rest
        }
        ["apis", group, version, rest @ ..] if !rest.is_empty() => {
            info.api_group = group.to_string();
            info.api_version = version.to_string();
            rest
        }
        // Discovery and everything else: a non-resource request, its verb the method.
        _ => return Ok(info),
    };
    info.verb = verb_of(method);
    let mut rest = rest;
    // The deprecated watch paths: /api/v1/watch/….
    if rest[0] == "watch" {
        info.verb = "watch".into();
        rest = &rest[1..];
    } else if rest[0] == "proxy" {
        info.verb = "proxy".into();
        rest = &rest[1..];
    }
    if rest.first() == Some(&"namespaces")
        && let Some(namespace) = rest.get(1)
    {
        info.namespace = Some(namespace.to_string());
        // `namespaces/NAME/status` and `…/finalize` are the namespace's own
        // subresources; anything else after the name is a namespaced resource.
        if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
            rest = &rest[2..];
        }
    }
    if rest.len() >= 3 && info.verb != "proxy" {
        info.subresource = Some(rest[2].to_string());
    }
    if rest.len() >= 2 {
        info.name = Some(rest[1].to_string());
    }
    if let Some(resource) = rest.first() {
        info.resource_type = resource.to_string();
    }
    // A get without a name is a list, or a watch; a delete without one, a
    // deletecollection.
    if info.name.is_none() && info.verb == "get" {
        info.verb = if boolean("watch")? { "watch" } else { "list" }.into();
        // A list narrowed to one name by `fieldSelector=metadata.name=NAME`.
        if let Some(selector) = single("fieldSelector")? {
            info.name = exact_name(selector);
        }
    } else {
        // Refused when repeated or unreadable even where it means nothing, so no reading
        // of a request depends on where the server stops parsing.
        boolean("watch")?;
    }
    if info.name.is_none() && info.verb == "delete" {
        info.verb = "deletecollection".into();
    }
    match info.subresource.as_deref() {
        Some("exec" | "attach") => {
            info.command = values("command").into_iter().map(str::to_string).collect();
            info.tty = boolean("tty")?;
        }
        Some("portforward") => {
            for value in values("ports") {
                for port in value.split(',') {
                    let port = port.trim();
                    info.ports.push(
                        port.parse()
                            .ok()
                            .filter(|&p: &u16| p > 0)
                            .ok_or_else(|| KubeError::BadPort(port.to_string()))?,
                    );
                }
            }
        }
        _ => {}
    }
    Ok(info)
}

/// Go's `strconv.ParseBool`.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The name a field selector requires exactly (`metadata.name=NAME` or `==`), when it
/// is the whole selector; the API server narrows a list to it.
fn exact_name(selector: &str) -> Option<String> {
    let selector = selector.trim();
    if selector.contains(',') {
        // One of several requirements: the server still narrows to the name, so the
        // name is reported if exactly one requirement names it.
        let names: Vec<String> = selector.split(',').filter_map(exact_name).collect();
        return (names.len() == 1).then(|| names[0].clone());
    }
    let (field, value) = selector
        .split_once("==")
        .or_else(|| selector.split_once('='))?;
    (field.trim() == "metadata.name" && !value.contains('!') && !value.trim().is_empty())
        .then(|| value.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(method: Method, target: &str) -> KubeRequest {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        request_info(&method, path, query).unwrap()
    }

    #[track_caller]
    fn assert_reads(
        method: Method,
        target: &str,
        (verb, group, resource, sub, ns, name): (
            &str,
            &str,
            &str,
            Option<&str>,
            Option<&str>,
            Option<&str>,
        ),
    ) {
        let i = info(method, target);
        assert_eq!(i.verb, verb, "{target}");
        assert_eq!(i.api_group, group, "{target}");
        assert_eq!(i.resource_type, resource, "{target}");
        assert_eq!(i.subresource.as_deref(), sub, "{target}");
        assert_eq!(i.namespace.as_deref(), ns, "{target}");
        assert_eq!(i.name.as_deref(), name, "{target}");
    }

    #[test]
    fn requests_read_as_the_api_server_reads_them() {
        use Method as M;
        for (method, target, expected) in [
            (
                M::GET,
                "/api/v1/namespaces/shop/pods",
                ("list", "", "pods", None, Some("shop"), None),
            ),
            (
                M::GET,
                "/api/v1/namespaces/shop/pods?watch=1",
                ("watch", "", "pods", None, Some("shop"), None),
            ),
            (
                M::GET,
                "/api/v1/namespaces/shop/pods?watch=false",
                ("list", "", "pods", None, Some("shop"), None),
            ),
            (
                M::GET,
                "/api/v1/watch/namespaces/shop/pods",
                ("watch", "", "pods", None, Some("shop"), None),
            ),
            (
                M::GET,
                "/api/v1/namespaces/shop/pods/web-1",
                ("get", "", "pods", None, Some("shop"), Some("web-1")),
            ),
            (
                M::GET,
                "/api/v1/namespaces/shop/pods/web-1/log",
                ("get", "", "pods", Some("log"), Some("shop"), Some("web-1")),
            ),
            (
                M::POST,
                "/api/v1/namespaces/shop/pods/web-1/exec",
                (
                    "create",
                    "",
                    "pods",
                    Some("exec"),
                    Some("shop"),
                    Some("web-1"),
                ),
            ),
            (
                M::DELETE,
                "/api/v1/namespaces/shop/pods/web-1",
                ("delete", "", "pods", None, Some("shop"), Some("web-1")),
            ),
            (
                M::DELETE,
                "/api/v1/namespaces/shop/pods",
                ("deletecollection", "", "pods", None, Some("shop"), None),
            ),
            (
                M::PATCH,
                "/apis/apps/v1/namespaces/shop/deployments/web",
                (
                    "patch",
                    "apps",
                    "deployments",
                    None,
                    Some("shop"),
                    Some("web"),
                ),
            ),
            (
                M::PUT,
                "/apis/apps/v1/namespaces/shop/deployments/web/scale",
                (
                    "update",
                    "apps",
                    "deployments",
                    Some("scale"),
                    Some("shop"),
                    Some("web"),
                ),
            ),
            (
                M::POST,
                "/apis/apps/v1/namespaces/shop/deployments",
                ("create", "apps", "deployments", None, Some("shop"), None),
            ),
            (
                M::GET,
                "/api/v1/namespaces",
                ("list", "", "namespaces", None, None, None),
            ),
            (
                M::GET,
                "/api/v1/namespaces/shop",
                ("get", "", "namespaces", None, Some("shop"), Some("shop")),
            ),
            (
                M::PUT,
                "/api/v1/namespaces/shop/finalize",
                (
                    "update",
                    "",
                    "namespaces",
                    Some("finalize"),
                    Some("shop"),
                    Some("shop"),
                ),
            ),
            (
                M::GET,
                "/api/v1/nodes/n1",
                ("get", "", "nodes", None, None, Some("n1")),
            ),
            (
                M::GET,
                "/api/v1/namespaces/shop/secrets?fieldSelector=metadata.name%3Ddb",
                ("list", "", "secrets", None, Some("shop"), Some("db")),
            ),
            (
                M::GET,
                "/api/v1/proxy/namespaces/shop/services/web/x/y",
                ("proxy", "", "services", None, Some("shop"), Some("web")),
            ),
            (M::GET, "/api", ("get", "", "", None, None, None)),
            (M::GET, "/apis/apps/v1", ("get", "", "", None, None, None)),
            (M::GET, "/version", ("get", "", "", None, None, None)),
        ] {
            assert_reads(method, target, expected);
        }
    }

    #[test]
    fn pairs_go_would_drop_or_read_as_other_bytes_are_refused() {
        let exec = "/api/v1/namespaces/a/pods/p/exec";
        for query in [
            "command=/%zz/ls&command=sh",
            "command=%/date&command=sh",
            "command=ls%2",
            "comm%zzand=ls",
            "command=%ff",
        ] {
            assert_eq!(
                request_info(&Method::GET, exec, query),
                Err(KubeError::BadQueryEscape),
                "{query}"
            );
        }
        let read = request_info(&Method::GET, exec, "command=ls+-l&command=%2Fsrv%20x").unwrap();
        assert_eq!(read.command, ["ls -l", "/srv x"]);
    }

    #[test]
    fn exec_commands_ttys_and_ports_are_read() {
        let exec = info(
            Method::POST,
            "/api/v1/namespaces/shop/pods/web-1/exec?command=sh&command=-c&command=cat%20%2Fetc%2Fpasswd&stdout=true&tty=true",
        );
        assert_eq!(exec.command, ["sh", "-c", "cat /etc/passwd"]);
        assert!(exec.tty);
        let pf = info(
            Method::POST,
            "/api/v1/namespaces/shop/pods/web-1/portforward?ports=5432&ports=8080,9090",
        );
        assert_eq!(pf.ports, [5432, 8080, 9090]);
        assert_eq!(info(Method::GET, "/healthz").path, "/healthz");
    }

    #[test]
    fn readings_that_depend_on_how_the_server_fails_are_refused() {
        let read = |q: &str| request_info(&Method::GET, "/api/v1/namespaces/shop/pods", q);
        assert_eq!(
            read("watch=yes"),
            Err(KubeError::NotBool("watch", "yes".into()))
        );
        assert_eq!(read("watch=1&watch=0"), Err(KubeError::Repeated("watch")));
        assert_eq!(read("watch=1;x=2"), Err(KubeError::Semicolon));
        assert!(
            request_info(
                &Method::GET,
                "/api/v1/namespaces/shop/pods/web-1",
                "watch=maybe"
            )
            .is_err()
        );
        assert_eq!(
            request_info(
                &Method::POST,
                "/api/v1/namespaces/a/pods/p/portforward",
                "ports=http"
            ),
            Err(KubeError::BadPort("http".into()))
        );
        assert!(
            request_info(
                &Method::POST,
                "/api/v1/namespaces/a/pods/p/exec",
                "command=ls&tty=on"
            )
            .is_err()
        );
    }
}
