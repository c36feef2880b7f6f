//! The Kubernetes layer with the real `kubectl` as the agent's client.
//!
//! No real kube-apiserver can be installed on this machine (none is packaged in the
//! registries reachable here), so these tests start a **stand-in API server**: a small
//! hyper program in this file that serves discovery, namespaces, pods, secrets, pod
//! logs (streamed) and watches, and keeps every request it receives so the tests can
//! see what reached the cluster, not only what kubectl was told.

use std::convert::Infallible;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper::{Request, Response};
use serde_json::{Value, json};

use crate::gateway::{Gateway, assert_follows_schema, wait_for};
use crate::support::text;

/// The ServiceAccount token the gateway holds for the cluster.
const SA_TOKEN: &str = "sa-token-only-the-gateway-holds";

/// What the stand-in received: method, path and query, headers.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

/// The stand-in API server, on a thread of its own until the test process ends.
struct StandIn {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
}

impl StandIn {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let log = log.clone();
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |req| serve(req, log.clone()));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        StandIn { port, received }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn json_response(status: u16, value: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

fn pod(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": "0b5c7e6a-0000-4000-8000-000000000001",
            "resourceVersion": "1",
            "creationTimestamp": "2026-11-29T00:00:00Z",
            "annotations": { "owner": "alice@example.com" },
        },
        "spec": { "containers": [{ "name": "app", "image": "shop:42",
            "env": [{ "name": "SUPPORT_PHONE", "value": "+1 555 123 4567" }] }] },
        "status": { "phase": "Running" },
    })
}

/// A body fed from a task.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// A body that yields `lines`, one every `every`; then ends, or with `hold` stays open
/// up to a minute (a follow or a watch with nothing new).
fn stream(lines: Vec<String>, every: Duration, hold: bool, content_type: &str) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for line in lines {
            tokio::time::sleep(every).await;
            if tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
        }
        if hold {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    });
    Response::builder()
        .header("content-type", content_type)
        .body(BodyExt::boxed(ChannelBody(rx)))
        .unwrap()
}

async fn serve(
    req: Request<hyper::body::Incoming>,
    log: Arc<Mutex<Vec<Received>>>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    log.lock().unwrap().push(Received {
        method: method.clone(),
        target: req.uri().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
    });
    if req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {SA_TOKEN}"))
    {
        return Ok(json_response(
            401,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Unauthorized", "code": 401}),
        ));
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let watch = query.contains("watch=1") || query.contains("watch=true");
    let follow = query.contains("follow=true");
    let response = match (method.as_str(), parts.as_slice()) {
        ("GET", ["api"]) => json_response(
            200,
            json!({"kind": "APIVersions", "versions": ["v1"],
                   "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]}),
        ),
        ("GET", ["apis"]) => json_response(
            200,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        ),
        ("GET", ["version"]) => json_response(
            200,
            json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-airlock-standin",
                   "platform": "linux/amd64"}),
        ),
        ("GET", ["api", "v1"]) => {
            let resource = |name: &str, kind: &str, namespaced: bool, verbs: &[&str]| json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": verbs});
            json_response(
                200,
                json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                    resource("namespaces", "Namespace", false, &["get", "list", "watch"]),
                    resource("pods", "Pod", true, &["create", "delete", "get", "list", "patch", "update", "watch"]),
                    resource("pods/log", "Pod", true, &["get"]),
                    resource("pods/exec", "PodExecOptions", true, &["create", "get"]),
                    resource("secrets", "Secret", true, &["get", "list", "watch"]),
                ]}),
            )
        }
        ("GET", ["api", "v1", "namespaces", ns, "pods"]) if watch => stream(
            (0..600)
                .map(|i| {
                    format!(
                        "{}\n",
                        json!({"type": "ADDED", "object": pod(ns, &format!("web-{i}"))})
                    )
                })
                .collect(),
            Duration::from_millis(100),
            true,
            "application/json",
        ),
        ("GET", ["api", "v1", "namespaces", ns, "pods"]) => json_response(
            200,
            json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                   "items": [pod(ns, "web-1"), pod(ns, "web-2")]}),
        ),
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => json_response(200, pod(ns, name)),
        ("GET", ["api", "v1", "namespaces", _, "pods", _, "log"]) => stream(
            (0..if follow { 600 } else { 3 })
                .map(|i| format!("log line {i} for carol@example.com\n"))
                .collect(),
            Duration::from_millis(if follow { 100 } else { 0 }),
            follow,
            "text/plain",
        ),
        ("DELETE", ["api", "v1", "namespaces", _, "pods", _]) => json_response(
            200,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        ),
        ("GET", ["api", "v1", "namespaces", ns, "secrets"]) => json_response(
            200,
            json!({"kind": "SecretList", "apiVersion": "v1", "items": [
                {"metadata": {"name": "db", "namespace": ns}, "data": {"password": "aHVudGVyMg=="}}]}),
        ),
        _ => json_response(
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
        ),
    };
    Ok(response)
}

/// A gateway with Kubernetes target `prod-k8s` in front of a stand-in, and an agent.
struct KubeSetup {
    gw: Gateway,
    token: String,
    cluster: StandIn,
}

impl KubeSetup {
    fn new() -> Self {
        let cluster = StandIn::start();
        let mut gw = Gateway::prepare(&format!(
            r#"
[[target]]
name = "prod-k8s"
kind = "kubernetes"
upstream = "http://127.0.0.1:{port}"
credential = "secret:prod-k8s"
labels = {{ namespaces = "shop" }}
"#,
            port = cluster.port
        ));
        // kubectl sends no credential over plain HTTP: the listener speaks TLS, its
        // chain (leaf and CA) is what the kubeconfig pins.
        let (ca, cert, key) = crate::support::test_certificates(gw.dir.path(), "gateway");
        let chain = gw.dir.path().join("gateway-chain.pem");
        std::fs::write(
            &chain,
            std::fs::read_to_string(&cert).unwrap() + &std::fs::read_to_string(&ca).unwrap(),
        )
        .unwrap();
        gw.edit_config(
            "[http]\nlisten = \"127.0.0.1:0\"\n",
            &format!("[http]\nlisten = \"127.0.0.1:0\"\ntls-cert = {chain:?}\ntls-key = {key:?}\n"),
        );
        let secrets = gw.data().join("secrets.toml");
        let mut text = std::fs::read_to_string(&secrets).unwrap();
        text.push_str(&format!("prod-k8s = \"{SA_TOKEN}\"\n"));
        std::fs::write(&secrets, text).unwrap();
        gw.spawn();
        let token = gw.agent("claude", &[]);
        KubeSetup { gw, token, cluster }
    }

    /// `airlock connect prod-k8s … -- ARGS` as the agent runs it.
    fn connect(&self, ttl: &str, args: &[&str]) -> Command {
        let mut command = crate::support::airlock();
        command
            .env("AIRLOCK_TOKEN", &self.token)
            .env("AIRLOCK_URL", format!("http://127.0.0.1:{}", self.gw.port))
            .env("HOME", self.gw.dir.path())
            .env("TMPDIR", self.gw.dir.path())
            .stdin(Stdio::null())
            .args([
                "connect",
                "prod-k8s",
                "--task",
                "check the shop pods after the deploy",
                "--ttl",
                ttl,
                "--",
            ])
            .args(args);
        command
    }

    fn kubectl(&self, args: &[&str]) -> std::process::Output {
        self.connect("10m", args).output().unwrap()
    }

    /// Requests that reached the cluster, beyond discovery.
    fn resource_requests(&self) -> Vec<Received> {
        self.cluster
            .received()
            .into_iter()
            .filter(|r| r.target.contains("/namespaces"))
            .collect()
    }
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kubectl_reads_through_the_gateway_with_the_gateways_identity_and_masked() {
    let s = KubeSetup::new();
    let out = s.kubectl(&["get", "pods", "-n", "shop", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let pod = &list["items"][0];
    assert_eq!(pod["metadata"]["name"], "web-1");
    assert_eq!(pod["metadata"]["annotations"]["owner"], "***@example.com");
    assert!(!stdout(&out).contains("alice@example.com"));
    // The kubeconfig's private directory is gone once kubectl ends.
    let left = crate::support::connect_leftovers(s.gw.dir.path());
    assert!(left.is_empty(), "{left:?}");
    // Every request carried the gateway's token, never the grant's.
    let received = s.cluster.received();
    assert!(!received.is_empty());
    for r in &received {
        let auth: Vec<&str> = r
            .headers
            .iter()
            .filter(|(k, _)| k == "authorization")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(auth, [format!("Bearer {SA_TOKEN}").as_str()], "{r:?}");
    }
    // Recorded as Kubernetes actions.
    let entry =
        s.gw.events("http.request")
            .into_iter()
            .find(|e| e["detail"]["path"] == "/api/v1/namespaces/shop/pods")
            .expect("the list is recorded");
    assert_eq!(entry["detail"]["action"]["verb"], "list");
    assert_eq!(entry["detail"]["action"]["resource"], "pods");
    assert_eq!(entry["detail"]["action"]["namespace"], "shop");
    assert_eq!(entry["detail"]["verdict"], "allow");
    assert_follows_schema(&entry);
    let opened = s.gw.events("session.opened");
    assert!(
        opened
            .iter()
            .any(|e| e["detail"]["protocol"] == "kubernetes"),
        "{opened:?}"
    );

    // Another namespace is refused by policy, and never reaches the cluster.
    let out = s.kubectl(&["get", "pods", "-n", "kube-system", "-o", "json"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("kube-system"), "{}", text(&out));
    assert!(
        s.resource_requests()
            .iter()
            .all(|r| !r.target.contains("kube-system")),
        "{:?}",
        s.resource_requests()
    );
}

#[test]
fn writes_secrets_and_impersonation_are_refused_before_the_cluster() {
    let s = KubeSetup::new();
    let before = s.resource_requests().len();
    let out = s.kubectl(&["delete", "pod", "web-1", "-n", "shop"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not a read"), "{}", text(&out));
    let out = s.kubectl(&["get", "secrets", "-n", "shop", "-o", "json"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("secrets are not readable"),
        "{}",
        text(&out)
    );
    let out = s.kubectl(&[
        "get",
        "pods",
        "-n",
        "shop",
        "--as",
        "system:admin",
        "-o",
        "json",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("impersonation"), "{}", text(&out));
    let out = s.kubectl(&["exec", "web-1", "-n", "shop", "--", "sh", "-c", "id"]);
    assert!(!out.status.success(), "{}", text(&out));
    // The control plane's own paths are not discovery.
    let out = s.kubectl(&["get", "--raw", "/logs/kube-apiserver.log"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not API discovery"), "{}", text(&out));
    // A log cut at a byte the agent picks would give a masked value away, prefix by
    // prefix.
    let out = s.kubectl(&["logs", "web-1", "-n", "shop", "--limit-bytes=20"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("limitBytes"), "{}", text(&out));
    // What reached the cluster: only reads of pods (kubectl exec reads the pod first).
    let reached = s.resource_requests();
    assert!(
        reached[before..]
            .iter()
            .all(|r| r.method == "GET" && r.target == "/api/v1/namespaces/shop/pods/web-1"),
        "refused requests reached the cluster: {reached:?}"
    );
    assert!(
        s.cluster.received().iter().all(|r| r.method == "GET"
            && !r.target.starts_with("/logs")
            && !r.target.contains("limitBytes")
            && r.headers.iter().all(|(k, _)| !k.starts_with("impersonate"))),
        "{:?}",
        s.cluster.received()
    );
    let requests = s.gw.events("http.request");
    let delete = requests
        .iter()
        .find(|e| e["detail"]["method"] == "DELETE")
        .unwrap();
    assert_eq!(delete["detail"]["action"]["verb"], "delete");
    assert_eq!(delete["detail"]["verdict"], "deny");
    let impersonation = requests
        .iter()
        .find(|e| {
            e["detail"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("impersonation"))
        })
        .expect("the impersonation refusal is recorded");
    assert_eq!(impersonation["detail"]["decided_by"], "gateway");
}

#[test]
fn logs_follow_stream_masked_and_stop_when_the_grant_is_revoked() {
    let s = KubeSetup::new();
    let mut logs = s
        .connect("10m", &["logs", "-f", "web-1", "-n", "shop"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(logs.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "log line 0 for ***@example.com");
    let grant = s.gw.events("session.opened").last().unwrap()["grant"]
        .as_str()
        .unwrap()
        .to_string();
    let out = s.gw.cli(&["grants", "revoke", &grant]);
    assert!(out.status.success(), "{}", text(&out));
    let revoked = Instant::now();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    logs.wait().unwrap();
    assert!(
        revoked.elapsed() < Duration::from_secs(10),
        "the stream outlived the grant"
    );
    assert!(rest.len() < 100, "{rest:?}");
    assert!(
        rest.iter().all(|l| !l.contains("carol@example.com")),
        "{rest:?}"
    );
    let closed = s.gw.closed_reasons(&grant);
    assert!(closed.iter().any(|r| r.contains("revoked")), "{closed:?}");
}

#[test]
fn a_watch_is_cut_when_its_grant_expires() {
    let s = KubeSetup::new();
    let started = Instant::now();
    let out = s
        .connect(
            "3s",
            &["get", "pods", "-n", "shop", "--watch", "-o", "json"],
        )
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(20),
        "the watch outlived its grant: {elapsed:?}"
    );
    let seen = stdout(&out);
    assert!(seen.contains("web-0"), "{}", text(&out));
    assert!(!seen.contains("alice@example.com"), "{seen}");
    wait_for("the session's end", || {
        s.gw.events("session.closed").iter().any(|e| {
            e["detail"]["reason"]
                .as_str()
                .unwrap_or("")
                .contains("expired")
        })
    });
    let watch =
        s.gw.events("http.request")
            .into_iter()
            .find(|e| e["detail"]["action"]["verb"] == "watch")
            .expect("the watch is recorded as one");
    assert_eq!(watch["detail"]["verdict"], "allow");
}
