//! The HTTP gateway against a real upstream process (`http_upstream.py`, a small JSON
//! service on loopback that logs every request it receives) with the real `curl` as
//! the agent's client. Each test reads the upstream's log: what reached the upstream,
//! not only what the client was told.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::gateway::{Gateway, assert_follows_schema, free_port, wait_for};
use crate::support::{tempdir, text, workspace};

/// The audit entry kinds only the HTTP gateway writes: the HTTP tests check their
/// export, the record tests' run covers the rest.
pub const HTTP_KINDS: &[&str] = &["http.request", "http.result"];

/// What the gateway injects upstream: only it holds this.
const UPSTREAM_TOKEN: &str = "upstream-token-only-the-gateway-holds";

/// The upstream service, killed when dropped.
struct Upstream {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Upstream {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// `tls`: the server's certificate, its key, and the CA its clients' certificates
    /// must be signed by.
    fn start_with(tls: &[&std::path::Path]) -> Self {
        let dir = tempdir();
        let log = dir.path().join("received.jsonl");
        std::fs::write(&log, "").unwrap();
        let port = free_port();
        let child = Command::new("python3")
            .arg(workspace().join("tests/e2e/http_upstream.py"))
            .arg(port.to_string())
            .arg(&log)
            .args(tls)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs the test upstream");
        wait_for("the upstream to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Upstream {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// Every request the upstream received, in order.
    fn received(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn paths(&self) -> Vec<String> {
        self.received()
            .iter()
            .filter_map(|r| r["path"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway with HTTP target `api` in front of its own upstream, and an agent.
struct HttpSetup {
    gw: Gateway,
    token: String,
    upstream: Upstream,
}

const ALLOWED: &str = "GET /echo/**; GET /users/*; GET /stream; GET /events; GET /binary; \
                       GET /gzip; GET /big; POST /orders; POST /echo/**";

impl HttpSetup {
    fn new() -> Self {
        Self::with("", "")
    }

    /// `http` is more of the `[http]` section; `extra` more configuration.
    fn with(http: &str, extra: &str) -> Self {
        Self::in_front_of(Upstream::start(), "http", "", http, extra, "")
    }

    /// `scheme` and `settings` (more of the target) for `upstream`; `secrets` more of
    /// the secrets file.
    fn in_front_of(
        upstream: Upstream,
        scheme: &str,
        settings: &str,
        http: &str,
        extra: &str,
        secrets: &str,
    ) -> Self {
        let config = format!(
            r#"
[[target]]
name = "api"
kind = "http"
upstream = "{scheme}://127.0.0.1:{port}"
credential = "secret:api-token"
labels = {{ http-allow = "{ALLOWED}" }}
{settings}
{extra}
"#,
            port = upstream.port,
            settings = settings.replace("{port}", &upstream.port.to_string()),
        );
        let mut gw = Gateway::prepare(&config);
        if !http.is_empty() {
            gw.edit_config(
                "[http]\nlisten = \"127.0.0.1:0\"\n",
                &format!("[http]\nlisten = \"127.0.0.1:0\"\n{http}\n"),
            );
        }
        let secrets_file = gw.data().join("secrets.toml");
        let mut text = std::fs::read_to_string(&secrets_file).unwrap();
        if secrets.is_empty() {
            text.push_str(&format!("api-token = \"{UPSTREAM_TOKEN}\"\n"));
        } else {
            text.push_str(secrets);
        }
        std::fs::write(&secrets_file, text).unwrap();
        gw.spawn();
        let token = gw.agent("claude", &[]);
        HttpSetup {
            gw,
            token,
            upstream,
        }
    }

    fn base(&self) -> String {
        let endpoints: Value = serde_json::from_str(
            &std::fs::read_to_string(self.gw.data().join("endpoints.json")).unwrap(),
        )
        .unwrap();
        let scheme = if endpoints["http_tls"] == true {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", endpoints["http"].as_str().unwrap())
    }

    /// A grant for `target`; returns its bearer token and its id.
    fn grant(&self, target: &str, access: &str) -> (String, String) {
        let (status, grant) = self.gw.ask(
            &self.token,
            target,
            "look up order 42 in the orders service",
            access,
            "10m",
        );
        assert_eq!(status, 201, "{grant}");
        let connection = &grant["connection"];
        assert_eq!(connection["protocol"], "http", "{grant}");
        assert_eq!(connection["url"].as_str().unwrap(), self.base());
        (
            connection["token"].as_str().unwrap().to_string(),
            grant["id"].as_str().unwrap().to_string(),
        )
    }

    /// `curl` with the grant's token; returns the status and the body.
    fn curl(&self, bearer: &str, path: &str, args: &[&str]) -> (u16, String) {
        let mut curl = Command::new("curl");
        curl.arg("--path-as-is")
            .arg("-H")
            .arg(format!("Authorization: Bearer {bearer}"))
            .args(args)
            .arg(format!("{}{path}", self.base()));
        status_and_body(&mut curl)
    }
}

/// Runs a `curl` command: the status and the body (with curl's own error, if any).
fn status_and_body(curl: &mut Command) -> (u16, String) {
    let out = curl
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .output()
        .unwrap();
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = all.rsplit_once('\n').unwrap_or(("", &all));
    let body = format!("{body}{}", String::from_utf8_lossy(&out.stderr));
    (code.trim().parse().unwrap_or(0), body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn the_upstream_sees_the_gateways_credential_and_never_the_agents() {
    let s = HttpSetup::new();
    let (bearer, grant) = s.grant("api", "read");
    let (status, body) = s.curl(
        &bearer,
        "/echo/orders/42?expand=items",
        &[
            "-H",
            "Cookie: agent-session=1",
            "-H",
            "X-Forwarded-For: 10.0.0.1",
            "-H",
            "Proxy-Authorization: Basic eDp5",
            "-H",
            "Connection: keep-alive, X-Hop",
            "-H",
            "X-Hop: secret",
            "-H",
            "X-Request-Id: 42",
            "-H",
            "Host: evil.example",
            "-H",
            "X-Original-URL: /admin/users",
            "-H",
            "X-HTTP-Method-Override: DELETE",
        ],
    );
    assert_eq!(status, 200, "{body}");
    // The upstream got the gateway's credential; the agent, whose request the upstream
    // echoes back, gets it overwritten.
    let received = s.upstream.received();
    let headers = &received[0]["headers"];
    assert_eq!(headers["authorization"], format!("Bearer {UPSTREAM_TOKEN}"));
    let echo = json(&body);
    assert_eq!(
        echo["headers"]["authorization"],
        format!("Bearer {}", "*".repeat(UPSTREAM_TOKEN.len()))
    );
    assert!(!body.contains(UPSTREAM_TOKEN), "{body}");
    for stripped in [
        "cookie",
        "x-forwarded-for",
        "proxy-authorization",
        "x-hop",
        "x-original-url",
        "x-http-method-override",
    ] {
        assert!(
            headers.get(stripped).is_none(),
            "{stripped} reached: {echo}"
        );
    }
    assert_eq!(headers["x-request-id"], "42");
    assert_eq!(
        headers["host"],
        format!("127.0.0.1:{}", s.upstream.port),
        "the upstream's own host"
    );
    assert_eq!(echo["path"], "/echo/orders/42?expand=items");
    assert!(
        !body.contains(&bearer),
        "the grant token reached the upstream"
    );

    // The upstream's cookie does not reach the agent.
    let out = Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null", "-H"])
        .arg(format!("Authorization: Bearer {bearer}"))
        .arg(format!("{}/users/1", s.base()))
        .output()
        .unwrap();
    let response_headers = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        response_headers.starts_with("http/1.1 200"),
        "{response_headers}"
    );
    assert!(
        !response_headers.contains("set-cookie"),
        "{response_headers}"
    );

    // HTTP/2 (prior knowledge on loopback) is served the same way.
    let (status, body) = s.curl(&bearer, "/echo/h2", &["--http2-prior-knowledge"]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["path"], "/echo/h2");
    assert!(!body.contains(UPSTREAM_TOKEN), "{body}");

    // Recorded: the request before it was sent, the result after.
    let requests = s.gw.events("http.request");
    let first = requests
        .iter()
        .find(|e| e["detail"]["path"] == "/echo/orders/42")
        .expect("the request is recorded");
    assert_eq!(first["grant"], grant.as_str());
    assert_eq!(first["detail"]["verdict"], "allow");
    assert_eq!(first["detail"]["query"], "expand=items");
    assert!(
        first["detail"]["votes"]
            .as_array()
            .is_some_and(|v| !v.is_empty())
    );
    wait_for("the result entries", || {
        s.gw.events("http.result")
            .iter()
            .any(|e| e["detail"]["path"] == "/echo/h2")
            || s.gw.events("session.closed").len() >= 2
    });
    let results = s.gw.events("http.result");
    let result = results
        .iter()
        .find(|e| e["detail"]["path"] == "/echo/orders/42")
        .expect("the result is recorded");
    assert_eq!(result["detail"]["status"], 200);
    assert_eq!(result["detail"]["withheld"], Value::Null, "{result}");
    assert_eq!(result["detail"]["masked"], "whole", "{result}");
    assert!(result["detail"]["bytes_out"].as_u64().unwrap() > 0);
    for entry in requests.iter().chain(&results) {
        assert_follows_schema(entry);
    }
    assert!(
        !s.gw.log_text().contains(UPSTREAM_TOKEN),
        "the upstream credential is logged"
    );
    let export = s.gw.cli(&["audit", "export"]);
    let export = String::from_utf8_lossy(&export.stdout);
    let secret = bearer.split_once('.').unwrap().1;
    assert!(
        !export.contains(secret),
        "the grant secret is in the record"
    );
    assert!(
        !export.contains(UPSTREAM_TOKEN),
        "the upstream credential is in the record"
    );
}

#[test]
fn every_spelling_of_a_path_is_decided_as_the_path_the_upstream_serves() {
    let s = HttpSetup::new();
    let (bearer, _) = s.grant("api", "read");
    // Spellings of /admin/users: each is refused by policy as /admin/users.
    for spelling in [
        "/echo/../admin/users",
        "/%61dmin/users",
        "//admin/users",
        "/echo/%2e%2e/admin/users",
        "/echo/%2E./admin/users",
        "/./admin/users",
    ] {
        let (status, body) = s.curl(&bearer, spelling, &[]);
        assert_eq!(status, 403, "{spelling}: {body}");
        assert!(body.contains("/admin/users"), "{spelling}: {body}");
    }
    // What could be read two ways is refused before policy, by the gateway.
    for (spelling, why) in [
        ("/echo/..%2fadmin/users", "encoded"),
        ("/echo/%2f..%2fadmin", "encoded"),
        ("/echo/%252e%252e/admin/users", "inside percent-encoding"),
        ("/echo;x=1/../admin/users", "`;`"),
        ("/echo/..;/admin/users", "`;`"),
        ("/echo/..%5cadmin", "encoded"),
        ("/../../etc/passwd", "climbs above the root"),
        ("/echo/%00", "encoded"),
        ("/users/1%3b", "`;`"),
    ] {
        let (status, body) = s.curl(&bearer, spelling, &[]);
        assert_eq!(status, 400, "{spelling}: {body}");
        assert!(body.contains(why), "{spelling}: {body}");
    }
    // A method is what it says, in its case.
    let (status, body) = s.curl(&bearer, "/echo/a", &["-X", "get"]);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("upper case"), "{body}");
    assert!(
        s.upstream.paths().is_empty(),
        "a refused path reached the upstream: {:?}",
        s.upstream.paths()
    );
    // An allowed path reaches the upstream as the gateway read it, in its encoding.
    let (status, body) = s.curl(&bearer, "/echo/a/./b/../c//d%20e?x=%2e%2e", &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["path"], "/echo/a/c/d%20e?x=%2e%2e");
    let refused = s.gw.events("http.request");
    assert!(
        refused
            .iter()
            .any(|e| e["detail"]["decided_by"] == "gateway"
                && e["detail"]["path"] == "/echo/..%2fadmin/users"),
        "the gateway's refusals are recorded"
    );
    for entry in &refused {
        assert_follows_schema(entry);
    }
}

#[test]
fn a_read_grant_cannot_write_and_a_denied_request_never_reaches_the_upstream() {
    let s = HttpSetup::new();
    let (read, _) = s.grant("api", "read");
    let order = r#"{"item": "book", "qty": 1}"#;
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let (status, body) = s.curl(
            &read,
            "/orders",
            &[
                "-X",
                method,
                "-H",
                "Content-Type: application/json",
                "-d",
                order,
            ],
        );
        assert_eq!(status, 403, "{method}: {body}");
        assert_eq!(json(&body)["error"], "denied");
    }
    // Method override headers are the upstream's business; the method policy saw is
    // the one sent.
    let (status, _) = s.curl(
        &read,
        "/orders",
        &[
            "-X",
            "POST",
            "-H",
            "X-HTTP-Method-Override: GET",
            "-d",
            order,
        ],
    );
    assert_eq!(status, 403);
    assert!(
        s.upstream.received().is_empty(),
        "a denied write reached the upstream: {:?}",
        s.upstream.received()
    );

    let (write, _) = s.grant("api", "write");
    let (status, body) = s.curl(
        &write,
        "/orders",
        &["-H", "Content-Type: application/json", "-d", order],
    );
    assert_eq!(status, 201, "{body}");
    let received = s.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0]["body"], order,
        "the body reached the upstream whole"
    );
    // Policy was shown the JSON body.
    let entry =
        s.gw.events("http.request")
            .into_iter()
            .rfind(|e| e["detail"]["method"] == "POST" && e["detail"]["verdict"] == "allow")
            .unwrap();
    assert_eq!(entry["detail"]["body"], "inspected");
    assert!(
        entry["detail"].get("recorded_body").is_none(),
        "bodies are not recorded by default"
    );

    // A body over the inspection limit is forwarded whole, marked not inspected.
    let big = format!(r#"{{"note": "{}"}}"#, "x".repeat(70 * 1024));
    let (status, body) = s.curl(
        &write,
        "/echo/big",
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &big,
        ],
    );
    assert_eq!(status, 200);
    assert_eq!(json(&body)["body"].as_str().unwrap().len(), big.len());
    let entry = s.gw.events("http.request").into_iter().last().unwrap();
    assert_eq!(entry["detail"]["body"], "not-inspected");
}

#[test]
fn responses_are_masked_by_content_or_withheld() {
    let s = HttpSetup::with("mask-body-bytes = 4096", "");
    let (bearer, _) = s.grant("api", "read");
    let (status, body) = s.curl(&bearer, "/users/7", &[]);
    assert_eq!(status, 200, "{body}");
    let user = json(&body);
    assert_eq!(user["email"], "***@example.com");
    assert_eq!(user["card"], "**** **** **** 1111");
    assert_eq!(user["id"], "7");
    assert!(!body.contains("alice@example.com"));
    // Headers carry data too: masked the same way.
    let (_, with_headers) = s.curl(&bearer, "/users/7", &["-D", "-"]);
    assert!(
        with_headers.contains("x-owner: ***@example.com"),
        "{with_headers}"
    );
    // The same body again comes from the session's masked-body cache: masked the same.
    for _ in 0..3 {
        let (_, again) = s.curl(&bearer, "/users/7", &[]);
        assert_eq!(again, body);
    }

    // Where masking applies a Range is not sent: a card number split across parts
    // would pass a mask each part alone.
    let (status, body) = s.curl(&bearer, "/users/7", &["-H", "Range: bytes=60-80"]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["card"], "**** **** **** 1111");
    let last = s.upstream.received().pop().unwrap();
    assert!(last["headers"].get("range").is_none(), "{last}");

    // Streams are masked line by line as they arrive.
    let (status, body) = s.curl(&bearer, "/stream?n=3", &[]);
    assert_eq!(status, 200);
    assert_eq!(body.lines().count(), 3, "{body}");
    assert!(
        body.lines().all(|l| l.ends_with("for ***@example.com")),
        "{body}"
    );
    let (status, body) = s.curl(&bearer, "/events?n=2", &[]);
    assert_eq!(status, 200);
    assert!(body.contains(r#""email": "***@example.com""#), "{body}");
    assert!(!body.contains("bob@example.com"), "{body}");

    // What no module can read is withheld, with the reason.
    for (path, why) in [
        ("/binary", "only JSON and text"),
        ("/gzip", "compressed"),
        ("/big?bytes=10000", "mask-body-bytes"),
    ] {
        let (status, body) = s.curl(&bearer, path, &[]);
        assert_eq!(status, 502, "{path}: {body}");
        let reply = json(&body);
        assert_eq!(reply["error"], "withheld", "{path}: {body}");
        assert!(
            reply["reason"].as_str().unwrap().contains(why),
            "{path}: {body}"
        );
        assert!(!body.contains("4111"), "{path}: {body}");
    }
    let results = s.gw.events("http.result");
    let binary = results
        .iter()
        .find(|e| e["detail"]["path"] == "/binary")
        .unwrap();
    assert!(
        binary["detail"]["withheld"]
            .as_str()
            .unwrap()
            .contains("JSON and text")
    );
    let user = results
        .iter()
        .find(|e| e["detail"]["path"] == "/users/7")
        .unwrap();
    assert_eq!(user["detail"]["masked"], "whole");
    for entry in &results {
        assert_follows_schema(entry);
    }

    // With no masking module, bytes pass untouched.
    s.gw.install_bundle_without("pii-mask");
    wait_for("the bundle without pii-mask", || {
        s.curl(&bearer, "/binary", &[]).0 == 200
    });
    let (_, body) = s.curl(&bearer, "/users/7", &[]);
    assert_eq!(json(&body)["email"], "alice@example.com");
}

#[test]
fn request_smuggling_is_refused_and_nothing_reaches_the_upstream() {
    let s = HttpSetup::new();
    let (bearer, _) = s.grant("api", "write");
    let addr = s.base().trim_start_matches("http://").to_string();
    let auth = format!("Authorization: Bearer {bearer}\r\n");
    let send = |raw: String| -> String {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(raw.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    let smuggled = "GET /admin/users HTTP/1.1\r\nHost: x\r\n\r\n";
    for (name, raw) in [
        (
            "two different Content-Lengths",
            format!(
                "POST /echo/a HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 4\r\nContent-Length: 40\r\n\r\nbody{smuggled}"
            ),
        ),
        (
            "a transfer coding other than chunked",
            format!(
                "POST /echo/a HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: gzip\r\n\r\n{smuggled}"
            ),
        ),
        (
            "bad chunking",
            format!(
                "POST /echo/a HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\nzz\r\nbody\r\n0\r\n\r\n"
            ),
        ),
        (
            "a header folded over two lines",
            format!("GET /echo/a HTTP/1.1\r\nHost: x\r\n{auth}X-A: 1\r\n folded\r\n\r\n"),
        ),
        (
            "a bare CR in a header",
            format!("GET /echo/a HTTP/1.1\r\nHost: x\r\n{auth}X-A: 1\rX-B: 2\r\n\r\n"),
        ),
        (
            "a space before the colon",
            format!(
                "GET /echo/a HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
    ] {
        let answer = send(raw);
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{name}: not refused: {answer:?}"
        );
        assert!(
            !answer[12..].contains("HTTP/1.1 "),
            "{name}: a second response: {answer:?}"
        );
    }
    assert!(
        s.upstream.received().is_empty(),
        "a smuggling attempt reached the upstream: {:?}",
        s.upstream.received()
    );
    // Both Content-Length and Transfer-Encoding: hyper reads the body as chunked,
    // drops the Content-Length and closes the connection after one response (RFC 9112
    // §6.1), so what follows the chunked body is never read as a request; the upstream
    // gets one request the gateway framed itself.
    let answer = send(format!(
        "POST /echo/a HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
    ));
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer:?}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer:?}"
    );
    let received = s.upstream.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0]["path"], "/echo/a");
    assert_eq!(received[0]["body"], "");
    assert!(received[0]["headers"].get("content-length").is_none());
    // The gateway still serves.
    let (status, _) = s.curl(&bearer, "/echo/after", &[]);
    assert_eq!(status, 200);
}

#[test]
fn a_stream_is_cut_when_its_grant_is_revoked() {
    let s = HttpSetup::new();
    let (bearer, grant) = s.grant("api", "read");
    let mut curl = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "60", "-H"])
        .arg(format!("Authorization: Bearer {bearer}"))
        .arg(format!("{}/stream?n=600&ms=100", s.base()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = curl.stdout.take().unwrap();
    let mut first = [0u8; 8];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"line 0 f");
    let out = s.gw.cli(&["grants", "revoke", &grant]);
    assert!(out.status.success(), "{}", text(&out));
    let revoked = Instant::now();
    let status = curl.wait().unwrap();
    assert!(
        revoked.elapsed() < Duration::from_secs(10),
        "the stream outlived the grant"
    );
    assert!(!status.success(), "curl saw a clean end of a cut stream");
    let mut rest = String::new();
    let _ = stdout.read_to_string(&mut rest);
    assert!(rest.lines().count() < 100, "{rest}");
    wait_for("the upstream to notice", || {
        s.upstream
            .received()
            .iter()
            .any(|r| r["stream_cut"] == "/stream")
    });
    let closed = s.gw.closed_reasons(&grant);
    assert!(closed.iter().any(|r| r.contains("revoked")), "{closed:?}");
    // The revoked grant opens nothing more.
    let (status, body) = s.curl(&bearer, "/echo/again", &[]);
    assert_eq!(status, 403, "{body}");
}

#[test]
fn bad_tokens_are_refused_recorded_and_never_forwarded() {
    let s = HttpSetup::new();
    let (bearer, grant) = s.grant("api", "read");
    let (status, body) = s.curl("", "/echo/x", &[]);
    assert_eq!(status, 401, "{body}");
    let wrong = format!("{grant}.not-the-secret");
    let (status, body) = s.curl(&wrong, "/echo/x", &[]);
    assert_eq!(status, 401, "{body}");
    // A PostgreSQL grant's token names a target this listener does not serve.
    let (code, pg) = s.gw.ask(
        &s.token,
        "prod-db",
        "read the orders table for order 42",
        "read",
        "5m",
    );
    assert_eq!(code, 201, "{pg}");
    let pg_bearer = format!(
        "{}.{}",
        pg["id"].as_str().unwrap(),
        pg["secret"].as_str().unwrap()
    );
    let (status, body) = s.curl(&pg_bearer, "/echo/x", &[]);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("postgres"), "{body}");
    // Basic authentication carries the same grant.
    let (id, secret) = bearer.split_once('.').unwrap();
    let (status, _) = s.curl_basic(id, secret, "/echo/basic");
    assert_eq!(status, 200);
    assert_eq!(s.upstream.paths(), ["/echo/basic"]);
    let refused = s.gw.events("session.refused");
    assert!(
        refused
            .iter()
            .filter(|e| e["detail"]["protocol"] == "http")
            .count()
            >= 3,
        "{refused:?}"
    );
    let export = String::from_utf8_lossy(&s.gw.cli(&["audit", "export"]).stdout).into_owned();
    assert!(
        !export.contains("not-the-secret"),
        "a presented secret is in the record"
    );
}

impl HttpSetup {
    fn curl_basic(&self, user: &str, password: &str, path: &str) -> (u16, String) {
        status_and_body(
            Command::new("curl")
                .arg("-u")
                .arg(format!("{user}:{password}"))
                .arg(format!("{}{path}", self.base())),
        )
    }
}

#[test]
fn airlock_connect_runs_curl_with_the_grant_on_a_pipe() {
    let s = HttpSetup::new();
    let connect = |args: &[&str]| {
        crate::support::airlock()
            .env("AIRLOCK_TOKEN", &s.token)
            .env("AIRLOCK_URL", format!("http://127.0.0.1:{}", s.gw.port))
            .stdin(Stdio::null())
            .arg("connect")
            .args([
                "api",
                "--task",
                "look up order 42 in the orders service",
                "--",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = connect(&["-sS", "/echo/orders/42", "-o", "/dev/stdout"]);
    assert!(out.status.success(), "{}", text(&out));
    let echo = json(String::from_utf8_lossy(&out.stdout).lines().next().unwrap());
    assert_eq!(echo["path"], "/echo/orders/42");
    assert_eq!(
        s.upstream.received()[0]["headers"]["authorization"],
        format!("Bearer {UPSTREAM_TOKEN}")
    );
    // A denied request is curl's to report, as any HTTP error.
    let out = connect(&["-s", "--fail-with-body", "/admin/users"]);
    assert_eq!(out.status.code(), Some(22), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not allowed"));
    assert_eq!(s.upstream.paths(), ["/echo/orders/42"]);
}

#[test]
fn tls_both_ways_and_a_client_certificate_the_agent_never_holds() {
    let dir = tempdir();
    let certs = |name| crate::support::test_certificates(dir.path(), name);
    let (upstream_ca, upstream_cert, upstream_key) = certs("upstream");
    let (client_ca, client_cert, client_key) = certs("client");
    let (gateway_ca, gateway_cert, gateway_key) = certs("gateway");
    let upstream = Upstream::start_with(&[&upstream_cert, &upstream_key, &client_ca]);
    let identity = format!(
        "{}{}",
        std::fs::read_to_string(&client_cert).unwrap(),
        std::fs::read_to_string(&client_key).unwrap()
    );
    let s = HttpSetup::in_front_of(
        upstream,
        "https",
        &format!(
            "ca = {upstream_ca:?}\ninject = \"client-cert\"\n\
             [[target]]\nname = \"api-wrong-ca\"\nkind = \"http\"\n\
             upstream = \"https://127.0.0.1:{{port}}\"\nca = {gateway_ca:?}\n"
        ),
        &format!("tls-cert = {gateway_cert:?}\ntls-key = {gateway_key:?}"),
        "",
        &format!("api-token = '''\n{identity}'''\n"),
    );
    let (bearer, _) = s.grant("api", "read");
    assert!(s.base().starts_with("https://"), "{}", s.base());
    let curl = |bearer: &str, extra: &[&str]| {
        status_and_body(
            Command::new("curl")
                .arg("--cacert")
                .arg(&gateway_ca)
                .arg("-H")
                .arg(format!("Authorization: Bearer {bearer}"))
                .args(extra)
                .arg(format!("{}/echo/tls", s.base())),
        )
    };
    for version in ["--http1.1", "--http2"] {
        let (status, body) = curl(&bearer, &[version]);
        assert_eq!(status, 200, "{version}: {body}");
        let echo = json(&body);
        assert_eq!(echo["client_cert"]["commonName"], "localhost", "{body}");
        assert!(echo["headers"].get("authorization").is_none(), "{body}");
    }
    // A target whose upstream is not signed by the CA it names is never reached.
    let (bearer, _) = s.grant("api-wrong-ca", "read");
    let (status, body) = curl(&bearer, &[]);
    assert_eq!(status, 502, "{body}");
    assert_eq!(s.upstream.paths(), ["/echo/tls", "/echo/tls"]);
    assert!(!s.gw.log_text().contains("PRIVATE KEY"));
}
