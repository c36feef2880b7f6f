//! The Kubernetes layer with the real `kubectl` as the agent's client.
//!
//! No real kube-apiserver can be installed on this machine (none is packaged in the
//! registries reachable here), so these tests start a **stand-in API server**: a small
//! hyper program in this file that serves discovery, namespaces, pods, secrets, pod
//! logs (streamed), watches, and exec over WebSocket (`v5.channel.k8s.io`, running the
//! command as a real process on this machine, in place of a container), and keeps
//! every request and every exec it receives so the tests can see what reached the
//! cluster, not only what kubectl was told.

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
use crate::support::{refused, runtime, text};

/// The kinds only a Kubernetes target's streams write (checked here, not in the record's
/// run through every kind).
pub const KUBE_KINDS: &[&str] = &["kube.cast"];

/// The ServiceAccount token the gateway holds for the cluster.
const SA_TOKEN: &str = "sa-token-only-the-gateway-holds";

/// What the stand-in received: method, path and query, headers.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

/// An exec the stand-in ran: what, what it was sent, how it ended.
#[derive(Debug, Clone, Default)]
struct Exec {
    command: Vec<String>,
    stdin: Vec<u8>,
    /// Messages on streams that are not the client's to write.
    foreign: Vec<Vec<u8>>,
    exit: Option<i32>,
    /// The client went away before the command ended, and it was killed.
    killed: bool,
}

/// What the stand-in keeps of what reached it.
#[derive(Default)]
struct Log {
    received: Mutex<Vec<Received>>,
    execs: Mutex<Vec<Exec>>,
}

/// The stand-in API server, on a thread of its own until the test process ends.
struct StandIn {
    port: u16,
    log: Arc<Log>,
}

impl StandIn {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Log::default());
        let shared = log.clone();
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let log = shared.clone();
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |req| serve(req, log.clone()));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .with_upgrades()
                            .await;
                    });
                }
            });
        });
        StandIn { port, log }
    }

    fn received(&self) -> Vec<Received> {
        self.log.received.lock().unwrap().clone()
    }

    fn execs(&self) -> Vec<Exec> {
        self.log.execs.lock().unwrap().clone()
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
    log: Arc<Log>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    log.received.lock().unwrap().push(Received {
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
    let upgrade = req
        .headers()
        .get("upgrade")
        .is_some_and(|u| u == "websocket");
    let response = match (method.as_str(), parts.as_slice()) {
        (
            "GET",
            [
                "api",
                "v1",
                "namespaces",
                _,
                "pods",
                _,
                sub @ ("exec" | "portforward"),
            ],
        ) if upgrade => {
            let portforward = *sub == "portforward";
            websocket(req, &query, portforward, log)
        }
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

/// The stand-in's side of a WebSocket: an exec, or a port-forward that echoes.
fn websocket(
    mut req: Request<hyper::body::Incoming>,
    query: &str,
    portforward: bool,
    log: Arc<Log>,
) -> Response<Body> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let key = header("sec-websocket-key");
    let offered = header("sec-websocket-protocol");
    let ours = if portforward {
        ["SPDY/3.1+portforward.k8s.io"].as_slice()
    } else {
        ["v5.channel.k8s.io", "v4.channel.k8s.io"].as_slice()
    };
    let Some(chosen) = ours
        .iter()
        .find(|p| offered.split(',').any(|o| o.trim() == **p))
    else {
        return json_response(400, json!({"kind": "Status", "message": "no protocol"}));
    };
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let command: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    let stdin = params.iter().any(|(k, v)| k == "stdin" && v == "true");
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        if portforward {
            echo(ws).await;
        } else {
            exec(ws, command, stdin, log).await;
        }
    });
    Response::builder()
        .status(101)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .header("sec-websocket-protocol", *chosen)
        .body(Full::new(Bytes::new()).boxed())
        .unwrap()
}

type StandInSocket =
    tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Port-forward, as far as the stand-in goes: each message comes back, marked.
async fn echo(mut ws: StandInSocket) {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Binary(data) = message {
            let mut back = b"pod:".to_vec();
            back.extend_from_slice(&data);
            if ws.send(Message::Binary(back.into())).await.is_err() {
                return;
            }
        }
    }
}

/// Runs `command` as a process, its stdin, stdout and stderr on the v5 channels, and
/// its exit status on channel 3, as a kubelet would. (The process's pipes are read on
/// threads: the stand-in keeps to the gateway's own tokio features.)
async fn exec(ws: StandInSocket, command: Vec<String>, stdin: bool, log: Arc<Log>) {
    use futures_util::{SinkExt as _, StreamExt as _};
    use std::io::{Read as _, Write as _};
    use tokio_tungstenite::tungstenite::Message;
    let index = {
        let mut execs = log.execs.lock().unwrap();
        execs.push(Exec {
            command: command.clone(),
            ..Exec::default()
        });
        execs.len() - 1
    };
    let (mut sink, mut source) = ws.split();
    let status = |code: i32| {
        let status = if code == 0 {
            json!({"metadata": {}, "status": "Success"})
        } else {
            json!({"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                   "message": format!("command terminated with non-zero exit code: exit status {code}"),
                   "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
        };
        let mut message = vec![3u8];
        message.extend_from_slice(status.to_string().as_bytes());
        Message::Binary(message.into())
    };
    let spawned = Command::new(&command[0])
        .args(&command[1..])
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = spawned else {
        let _ = sink.send(status(127)).await;
        let _ = sink.close().await;
        return;
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let pipes: [(u8, Box<dyn std::io::Read + Send>); 2] = [
        (1, Box::new(child.stdout.take().unwrap())),
        (2, Box::new(child.stderr.take().unwrap())),
    ];
    for (channel, mut pipe) in pipes {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                let mut message = vec![channel];
                message.extend_from_slice(&buf[..n]);
                if tx.blocking_send(message).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut input = child.stdin.take();
    let kill = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
        log.execs.lock().unwrap()[index].killed = true;
    };
    loop {
        tokio::select! {
            message = source.next() => match message {
                Some(Ok(Message::Binary(data))) => match data.first() {
                    Some(0) => {
                        log.execs.lock().unwrap()[index].stdin.extend_from_slice(&data[1..]);
                        if let Some(input) = &mut input {
                            let _ = input.write_all(&data[1..]);
                        }
                    }
                    Some(255) if data.get(1) == Some(&0) => input = None,
                    Some(4) => {}
                    _ => log.execs.lock().unwrap()[index].foreign.push(data.to_vec()),
                },
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return kill(&mut child),
                Some(Ok(_)) => {}
            },
            output = rx.recv() => match output {
                Some(data) => {
                    if sink.send(Message::Binary(data.into())).await.is_err() {
                        return kill(&mut child);
                    }
                }
                None => break,
            },
        }
    }
    // Both pipes are closed: the process is ending.
    let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(-1);
    log.execs.lock().unwrap()[index].exit = Some(code);
    let _ = sink.send(status(code)).await;
    let _ = sink.close().await;
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
labels = {{ namespaces = "shop", exec-allow = "cat, ls, echo" }}
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

    /// Revokes the grant of the latest session; returns its id.
    fn revoke_latest(&self) -> String {
        let grant = self.gw.events("session.opened").last().unwrap()["grant"]
            .as_str()
            .unwrap()
            .to_string();
        let out = self.gw.cli(&["grants", "revoke", &grant]);
        assert!(out.status.success(), "{}", text(&out));
        grant
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
    refused(&out, "kube-system");
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
    refused(&out, "not a read");
    let out = s.kubectl(&["get", "secrets", "-n", "shop", "-o", "json"]);
    refused(&out, "secrets are not readable");
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
    refused(&out, "impersonation");
    let out = s.exec(&["sh", "-c", "id"]);
    assert!(!out.status.success(), "{}", text(&out));
    // The control plane's own paths are not discovery.
    let out = s.kubectl(&["get", "--raw", "/logs/kube-apiserver.log"]);
    refused(&out, "not API discovery");
    // A log cut at a byte the agent picks would give a masked value away, prefix by
    // prefix.
    let out = s.kubectl(&["logs", "web-1", "-n", "shop", "--limit-bytes=20"]);
    refused(&out, "limitBytes");
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
    let grant = s.revoke_latest();
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

impl KubeSetup {
    /// `kubectl exec web-1 -n shop -- COMMAND`.
    fn exec(&self, command: &[&str]) -> std::process::Output {
        let mut args = vec!["exec", "web-1", "-n", "shop", "--"];
        args.extend_from_slice(command);
        self.kubectl(&args)
    }

    /// `kubectl exec -i web-1 -- cat`, sent `first` on its stdin, which stays open.
    fn exec_cat(&self, first: &[u8]) -> (std::process::Child, std::process::ChildStdin) {
        use std::io::Write as _;
        let mut cat = self
            .connect("10m", &["exec", "-i", "web-1", "-n", "shop", "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = cat.stdin.take().unwrap();
        stdin.write_all(first).unwrap();
        stdin.flush().unwrap();
        (cat, stdin)
    }

    /// The result entries of requests that opened a stream.
    fn stream_results(&self) -> Vec<Value> {
        self.gw
            .events("http.result")
            .into_iter()
            .filter(|e| e["detail"]["stream"].is_u64())
            .collect()
    }

    /// A grant on `prod-k8s` for a raw client: its token, the gateway's URL and the
    /// chain its TLS is pinned to.
    fn grant(&self) -> (String, String, String) {
        let (status, grant) = self.gw.ask(
            &self.token,
            "prod-k8s",
            "check the shop pods after the deploy",
            "read",
            "10m",
        );
        assert_eq!(status, 201, "{grant}");
        let connection = &grant["connection"];
        (
            connection["token"].as_str().unwrap().to_string(),
            connection["url"].as_str().unwrap().to_string(),
            connection["ca"].as_str().unwrap().to_string(),
        )
    }
}

type RawSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A WebSocket to the gateway that kubectl would never open: `path` (with its query),
/// offering `protocols`. The gateway's refusal comes back as its status and body.
async fn raw_websocket(
    (token, url, ca): &(String, String, String),
    path: &str,
    protocols: &str,
) -> Result<RawSocket, (u16, String)> {
    use rustls::pki_types::pem::PemObject as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let addr = url.strip_prefix("https://").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut request = format!("wss://{addr}{path}").into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    headers.insert("sec-websocket-protocol", protocols.parse().unwrap());
    match tokio_tungstenite::client_async(request, tls).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err((
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => panic!("the WebSocket failed: {e}"),
    }
}

/// Reads `ws` until it closes (at most 20 s): the data of each binary message, and
/// the close frame's code and reason.
async fn read_to_close(ws: &mut RawSocket) -> (Vec<Vec<u8>>, Option<(u16, String)>) {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Binary(data)))) => messages.push(data.to_vec()),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return (
                    messages,
                    frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                );
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return (messages, None),
            Err(_) => panic!("the WebSocket stayed open: {messages:?}"),
        }
    }
}

/// An allowed exec of `cat`, its stdin open.
async fn raw_cat(grant: &(String, String, String)) -> RawSocket {
    let path = exec_path(&["cat"], "stdin=true&stdout=true&stderr=true");
    raw_websocket(grant, &path, "v5.channel.k8s.io")
        .await
        .unwrap()
}

/// An exec path on `web-1` with `command`, and the query's other parameters.
fn exec_path(command: &[&str], rest: &str) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for word in command {
        query.append_pair("command", word);
    }
    format!(
        "/api/v1/namespaces/shop/pods/web-1/exec?{}&{rest}",
        query.finish()
    )
}

#[test]
fn kubectl_exec_runs_allowed_commands_masked_recorded_and_replayed() {
    let s = KubeSetup::new();
    let file = s.gw.dir.path().join("orders.txt");
    std::fs::write(
        &file,
        "order 42 for alice@example.com\nlast order for bob@example.com",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = s.exec(&["cat", path]);
    assert!(out.status.success(), "{}", text(&out));
    // Masked line by line; the last line, unfinished, when the command ended.
    assert_eq!(
        stdout(&out),
        "order 42 for ***@example.com\nlast order for ***@example.com"
    );
    let execs = s.cluster.execs();
    assert_eq!(execs.len(), 1, "{execs:?}");
    assert_eq!(execs[0].command, ["cat", path]);
    assert_eq!(execs[0].exit, Some(0));

    // What the agent types reaches the command; what comes back is masked.
    let (cat, stdin) = s.exec_cat(b"typed by carol@example.com\n");
    drop(stdin);
    let out = cat.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "typed by ***@example.com\n");
    assert_eq!(s.cluster.execs()[1].stdin, b"typed by carol@example.com\n");

    // A long line is masked whole, wherever the agent puts a value in it; one too long
    // to mask whole is withheld, never cut.
    let long = s.gw.dir.path().join("long.txt");
    std::fs::write(&long, format!("{}4111111111111111\n", ",".repeat(16376))).unwrap();
    let out = s.exec(&["cat", long.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).starts_with(",,,,"), "{}", text(&out));
    assert!(!stdout(&out).contains("4111111111111111"), "{}", text(&out));
    let huge = s.gw.dir.path().join("huge.txt");
    std::fs::write(
        &huge,
        format!("{} 4111 1111 1111 1111", "x".repeat(1536 * 1024)),
    )
    .unwrap();
    let out = s.exec(&["cat", huge.to_str().unwrap()]);
    refused(&out, "cannot be masked without cutting it");
    assert!(stdout(&out).is_empty(), "{}", stdout(&out).len());

    // The command's exit code is kubectl's.
    let out = s.exec(&["ls", "/nonexistent-airlock"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // Recorded: the exec as a Kubernetes action, its result, its cast.
    let requests: Vec<Value> =
        s.gw.events("http.request")
            .into_iter()
            .filter(|e| e["detail"]["action"]["subresource"] == "exec")
            .collect();
    assert_eq!(requests.len(), 5, "{requests:?}");
    assert_eq!(
        requests[0]["detail"]["action"]["command"],
        json!(["cat", path])
    );
    assert_eq!(requests[0]["detail"]["verdict"], "allow");
    assert_eq!(requests[0]["detail"]["stream"], 0);
    let results = s.stream_results();
    assert_eq!(results.len(), 5, "{results:?}");
    assert_eq!(results[0]["detail"]["status"], 101);
    assert_eq!(results[0]["detail"]["exit_code"], 0);
    assert_eq!(results[0]["detail"]["masked"], "lines");
    assert_eq!(results[1]["detail"]["bytes_in"], 27);
    assert!(
        results[3]["detail"]["withheld"]
            .as_str()
            .is_some_and(|w| w.contains("without cutting")),
        "{results:?}"
    );
    assert_eq!(results[4]["detail"]["exit_code"], 2);
    let casts = s.gw.events("kube.cast");
    let events: Vec<&Value> = casts
        .iter()
        .flat_map(|c| c["detail"]["events"].as_array().unwrap())
        .collect();
    assert!(
        events
            .iter()
            .all(|e| e[1] != "o" || !e[2].as_str().unwrap().contains("alice@example.com")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e[1] == "i" && e[2] == "typed by carol@example.com\n"),
        "input is recorded as typed: {events:?}"
    );

    // The exec replays as it was shown.
    let session = requests[0]["detail"]["session"].as_str().unwrap();
    let cast = s.gw.dir.path().join("exec.cast");
    let out = s.gw.cli(&[
        "sessions",
        "replay",
        session,
        "--cast",
        cast.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<Value> = std::fs::read_to_string(&cast)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["version"], 2);
    let shown: String = lines[1..].iter().map(|e| e[2].as_str().unwrap()).collect();
    assert_eq!(
        shown,
        "order 42 for ***@example.com\nlast order for ***@example.com"
    );
}

#[test]
fn exec_attach_and_port_forward_are_decided_before_the_cluster() {
    let s = KubeSetup::new();
    let touched = s.gw.dir.path().join("touched");
    let touched = touched.to_str().unwrap();
    let out = s.exec(&["touch", touched]);
    refused(&out, "exec of `touch` is not allowed");
    let script = format!("touch {touched}");
    let out = s.exec(&["sh", "-c", &script]);
    refused(&out, "not a shell");
    let out = s.kubectl(&["attach", "web-1", "-n", "shop"]);
    refused(&out, "pods/attach gives more than read access");
    let mut forward = s
        .connect("10m", &["port-forward", "pod/web-1", "-n", "shop", "0:80"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while forward.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = forward.kill();
            panic!("kubectl port-forward ran on through a refusal");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = forward.wait_with_output().unwrap();
    refused(&out, "pods/portforward gives more than read access");

    // Nothing of them reached the cluster (kubectl reads the pod first; that is all).
    assert!(
        std::path::Path::new(touched).metadata().is_err(),
        "a refused exec ran"
    );
    assert!(s.cluster.execs().is_empty(), "{:?}", s.cluster.execs());
    let reached: Vec<Received> = s
        .cluster
        .received()
        .into_iter()
        .filter(|r| {
            ["/exec", "/attach", "/portforward"]
                .iter()
                .any(|sub| r.target.contains(sub))
        })
        .collect();
    assert!(reached.is_empty(), "{reached:?}");
    let denied: Vec<Value> =
        s.gw.events("http.request")
            .into_iter()
            .filter(|e| e["detail"]["verdict"] == "deny")
            .collect();
    for sub in ["exec", "attach", "portforward"] {
        assert!(
            denied
                .iter()
                .any(|e| e["detail"]["action"]["subresource"] == sub),
            "{sub}: {denied:?}"
        );
    }
}

#[test]
fn raw_websockets_are_held_to_the_channel_protocol() {
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let s = KubeSetup::new();
    let grant = s.grant();
    runtime().block_on(async {
        let refused = [
            // A pair Go would drop for its bad escape: policy would read `ls` first,
            // and the server run `touch`.
            (
                "/api/v1/namespaces/shop/pods/web-1/exec?command=/%zz/ls&command=touch&command=/tmp/airlock-kube-never-touched&stdout=true".to_string(),
                "v5.channel.k8s.io",
                400,
                "two hex digits",
            ),
            // A WebSocket opens streams, and nothing else.
            (
                "/api/v1/namespaces/shop/pods?watch=1".to_string(),
                "v5.channel.k8s.io",
                400,
                "only to open",
            ),
            // A protocol the gateway does not read is not relayed unread.
            (
                exec_path(&["ls"], "stdout=true"),
                "base64.channel.k8s.io",
                400,
                "subprotocols",
            ),
            // A terminal is refused by policy (and where masking applies, by the
            // gateway).
            (
                exec_path(&["ls"], "stdout=true&tty=true"),
                "v5.channel.k8s.io",
                403,
                "terminal",
            ),
        ];
        for (path, protocol, code, says) in refused {
            let (status, body) = raw_websocket(&grant, &path, protocol).await.unwrap_err();
            assert_eq!(status, code, "{path}: {body}");
            assert!(body.contains(says), "{path}: {body}");
        }

        // An allowed exec: stdin goes through; a message on stdout from the agent
        // ends the exchange before the cluster sees it.
        let mut ws = raw_cat(&grant).await;
        ws.send(Message::Binary(
            b"\x00hello dave@example.com\n".to_vec().into(),
        ))
        .await
        .unwrap();
        ws.send(Message::Binary(b"\x01forged output".to_vec().into()))
            .await
            .unwrap();
        let (messages, close) = read_to_close(&mut ws).await;
        let (code, reason) = close.expect("the gateway closes the stream");
        assert_eq!(code, 1008, "{reason}");
        assert!(reason.contains("not the agent's to write"), "{reason}");
        assert!(
            messages
                .iter()
                .all(|m| !String::from_utf8_lossy(m).contains("dave@example.com")),
            "{messages:?}"
        );
        // A text message is not the protocol either.
        let mut ws = raw_cat(&grant).await;
        ws.send(Message::Text("\u{0}ls".into())).await.unwrap();
        let (_, close) = read_to_close(&mut ws).await;
        assert_eq!(close.map(|c| c.0), Some(1008));
        // A message over the size limit ends the stream, and nothing else.
        let mut ws = raw_cat(&grant).await;
        let mut huge = vec![b'x'; 2 * 1024 * 1024];
        huge[0] = 0;
        let _ = ws.send(Message::Binary(huge.into())).await;
        let _ = read_to_close(&mut ws).await;
    });
    // What reached the cluster: stdin, never the forged output.
    assert!(std::fs::metadata("/tmp/airlock-kube-never-touched").is_err());
    let execs = s.cluster.execs();
    assert_eq!(execs.len(), 3, "{execs:?}");
    assert_eq!(execs[0].stdin, b"hello dave@example.com\n");
    assert!(execs.iter().all(|e| e.foreign.is_empty()), "{execs:?}");
    assert!(execs.iter().all(|e| e.stdin.len() < 1024), "{execs:?}");
    wait_for("the refused streams' commands to end", || {
        s.cluster
            .execs()
            .iter()
            .all(|e| e.killed || e.exit.is_some())
    });
    // kubectl's SPDY, which it falls back to, is refused even where policy allows.
    let (token, url, ca) = &grant;
    let ca_file = s.gw.dir.path().join("raw-ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let out = Command::new("curl")
        .args(["-s", "--http1.1", "--max-time", "10", "--cacert"])
        .arg(&ca_file)
        .args(["-X", "POST", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .args(["-H", "Connection: Upgrade", "-H", "Upgrade: SPDY/3.1"])
        .arg(format!("{url}{}", exec_path(&["ls"], "stdout=true")))
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("SPDY/3.1 streams are not served"),
        "{}",
        text(&out)
    );
    assert_eq!(s.cluster.execs().len(), 3);
    // The gateway still serves.
    let out = s.kubectl(&["get", "pods", "-n", "shop", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let results = s.stream_results();
    assert!(
        results.iter().any(|r| r["detail"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("broke the stream's protocol"))),
        "{results:?}"
    );
}

#[test]
fn an_exec_is_cut_when_its_grant_is_revoked() {
    let s = KubeSetup::new();
    let (mut cat, stdin) = s.exec_cat(b"first line for carol@example.com\n");
    let mut lines = BufReader::new(cat.stdout.take().unwrap()).lines();
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "first line for ***@example.com"
    );
    let grant = s.revoke_latest();
    let revoked = Instant::now();
    let deadline = revoked + Duration::from_secs(15);
    while cat.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the exec outlived its grant");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut cat.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("the grant ended"), "{err}");
    drop(stdin);
    // Upstream, the command was ended with the stream.
    wait_for("the command's end", || s.cluster.execs()[0].killed);
    let closed = s.gw.closed_reasons(&grant);
    assert!(closed.iter().any(|r| r.contains("revoked")), "{closed:?}");
    wait_for("the stream's result", || {
        s.gw.events("http.result").iter().any(|r| {
            r["detail"]["stream"] == 0
                && r["detail"]["withheld"]
                    .as_str()
                    .is_some_and(|w| w.contains("revoked"))
        })
    });
}

#[test]
fn port_forward_is_relayed_as_it_is_only_where_policy_allows_it() {
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let s = KubeSetup::new();
    let path = "/api/v1/namespaces/shop/pods/web-1/portforward?ports=8080";
    let protocol = "SPDY/3.1+portforward.k8s.io";
    let grant = s.grant();
    runtime().block_on(async {
        let (status, body) = raw_websocket(&grant, path, protocol).await.unwrap_err();
        assert_eq!(status, 403, "{body}");
    });
    // A bundle under which policy allows every Kubernetes action (the hostile test
    // module, in its benign mode) and pii-mask masks: the gateway still refuses what
    // no mask could read.
    let hostile = crate::support::component("tests/policies/hostile");
    let open = "name = \"open\"\nvalid-for = \"1d\"\n\n[[module]]\nname = \"task-guard\"\nfile = \"build/task-guard.wasm\"\napplies-to = { hooks = [\"authorize\"] }\n\n[[module]]\nname = \"hostile\"\nfile = \"hostile.wasm\"\napplies-to = { hooks = [\"check\"], target-kinds = [\"kubernetes\"] }\n";
    let masked = format!(
        "{open}\n[[module]]\nname = \"pii-mask\"\nfile = \"build/pii-mask.wasm\"\napplies-to = {{ hooks = [\"mask\"], target-kinds = [\"kubernetes\"] }}\n"
    );
    s.gw.install_bundle(2, &masked, &[("hostile.wasm", &hostile)]);
    let rt = runtime();
    let terminal = exec_path(&["ls"], "stdout=true&tty=true");
    let mut refusal = String::new();
    wait_for("the masking bundle", || {
        refusal = match rt.block_on(raw_websocket(&grant, &terminal, "v5.channel.k8s.io")) {
            Err((_, body)) => body,
            Ok(_) => panic!("a terminal's output went unmasked"),
        };
        refusal.contains("cannot be masked")
    });
    assert!(refusal.contains("without a TTY"), "{refusal}");
    let (status, body) = rt
        .block_on(raw_websocket(&grant, path, protocol))
        .unwrap_err();
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("port-forwarded bytes cannot be masked"),
        "{body}"
    );
    assert!(s.cluster.execs().is_empty());

    // Without a masking module, port-forward is relayed as it is.
    s.gw.install_bundle(3, open, &[("hostile.wasm", &hostile)]);
    let mut opened = None;
    wait_for("the open bundle", || {
        opened = rt.block_on(raw_websocket(&grant, path, protocol)).ok();
        opened.is_some()
    });
    let mut ws = opened.unwrap();
    rt.block_on(async {
        ws.send(Message::Binary(b"\x00\x01any bytes".to_vec().into()))
            .await
            .unwrap();
        use futures_util::StreamExt as _;
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            back,
            Message::Binary(b"pod:\x00\x01any bytes".to_vec().into())
        );
        ws.close(None).await.unwrap();
        let _ = read_to_close(&mut ws).await;
    });
    wait_for("the port-forward's result", || {
        s.gw.events("http.result").iter().any(|r| {
            r["detail"]["path"] == "/api/v1/namespaces/shop/pods/web-1/portforward"
                && r["detail"]["bytes_in"] == 11
                && r["detail"]["bytes_out"] == 15
        })
    });
}
