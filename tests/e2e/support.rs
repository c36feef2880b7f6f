//! Shared helpers: the binary, the workspace, built policy components, temp dirs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};

use airlock::policy::types::{
    Access, Action, Agent, GrantContext, SqlKind, SqlStatement, Target, TargetKind,
};
use airlock::policy::{LoadedModule, PolicyEngine, PolicyLimits, Scope};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("gateway/ has a parent")
        .to_path_buf()
}

pub fn airlock() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_airlock"));
    // Never pick up a developer's own data directory.
    cmd.env_remove("AIRLOCK_DATA").env("AIRLOCK_LOG", "warn");
    cmd
}

/// Runs `airlock ARGS…` and returns its output.
pub fn run(args: &[&str]) -> Output {
    airlock().args(args).output().expect("airlock runs")
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A runtime on the calling thread, for a test's async client or a stand-in server's
/// thread.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Asserts `output` is a failure whose text says `expected`.
pub fn refused(output: &Output, expected: &str) {
    let out = text(output);
    assert!(
        !output.status.success(),
        "expected a refusal, got success:\n{out}"
    );
    assert!(out.contains(expected), "expected {expected:?} in:\n{out}");
}

/// Builds the policy crate at `crate_path` (relative to the workspace) once per test
/// run with `airlock policy build`, and returns the component's path.
pub fn component(crate_path: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    if let Some(path) = built.get(crate_path) {
        return path.clone();
    }
    let out_dir = workspace().join("target/e2e-policies");
    std::fs::create_dir_all(&out_dir).unwrap();
    let name = Path::new(crate_path).file_name().unwrap().to_str().unwrap();
    let out = out_dir.join(format!("{name}.wasm"));
    let output = airlock()
        .arg("policy")
        .arg("build")
        .arg(workspace().join(crate_path))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("airlock policy build runs");
    assert!(
        output.status.success(),
        "policy build failed:\n{}",
        text(&output)
    );
    built.insert(crate_path.to_string(), out.clone());
    out
}

/// Builds the policy crate at `crate_path` with the library, without the checks
/// `airlock policy build` makes: for modules the gateway must refuse.
pub fn component_unchecked(crate_path: &str) -> Vec<u8> {
    static BUILT: OnceLock<Mutex<HashMap<String, Vec<u8>>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    built
        .entry(crate_path.to_string())
        .or_insert_with(|| {
            airlock::policy::build_policy_crate(&workspace().join(crate_path))
                .expect("the policy crate builds")
        })
        .clone()
}

pub fn engine() -> Arc<PolicyEngine> {
    PolicyEngine::new(PolicyLimits::default(), None).expect("engine builds")
}

/// Loads a built component with a scope covering every hook and target.
pub fn load(engine: &Arc<PolicyEngine>, crate_path: &str) -> LoadedModule {
    let bytes = std::fs::read(component(crate_path)).unwrap();
    let name = Path::new(crate_path).file_name().unwrap().to_str().unwrap();
    engine
        .load_module(name, &bytes, Scope::everything())
        .expect("module loads")
}

/// A private temporary directory (0700), removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// A read grant on the postgres target `prod-db`; `task` steers the hostile module.
pub fn grant_context(task: &str) -> GrantContext {
    GrantContext {
        grant_id: "g-1".into(),
        agent: Agent {
            id: "agent-1".into(),
            labels: vec![],
        },
        target: Target {
            name: "prod-db".into(),
            kind: TargetKind::Postgres,
            labels: vec![],
        },
        task: task.into(),
        access: Access::Read,
        now_unix_ms: 1_700_000_000_000,
    }
}

/// A whole-decision deadline for calling modules directly: each call keeps its own.
pub fn soon() -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_secs(5)
}

/// `UPDATE users …`: denied by read-only-sql under a read grant.
pub fn update_users() -> Action {
    Action::Sql(SqlStatement {
        text: "UPDATE users SET email = 'x'".into(),
        kind: SqlKind::Update,
        tables_read: vec![],
        tables_written: vec!["users".into()],
        functions: vec![],
        locks_rows: false,
    })
}

/// A throwaway certificate authority and a certificate it signed for `127.0.0.1` and
/// `localhost` (a server's, or a client's), made with `openssl` in `dir`: (CA, certificate, key),
/// the key 0600.
pub fn test_certificates(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    test_certificates_for(dir, name, "127.0.0.1")
}

/// [`test_certificates`] for the loopback address `ip` (and `localhost`).
pub fn test_certificates_for(dir: &Path, name: &str, ip: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca = dir.join(format!("{name}-ca.pem"));
    let ca_key = dir.join(format!("{name}-ca.key"));
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!("subjectAltName=IP:{ip},DNS:localhost\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"),
    )
    .unwrap();
    let openssl = |build: &dyn Fn(&mut Command)| {
        let mut command = Command::new("openssl");
        build(&mut command);
        let out = command.output().unwrap();
        assert!(out.status.success(), "openssl: {}", text(&out));
    };
    const EC: [&str; 5] = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(&|c| {
        c.args(["req", "-x509", "-days", "1", "-subj", "/CN=airlock test CA"])
            .args(EC)
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca);
    });
    openssl(&|c| {
        c.args(["req", "-subj", "/CN=localhost"])
            .args(EC)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr);
    });
    openssl(&|c| {
        c.args(["x509", "-req", "-days", "1", "-CAcreateserial", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&cert);
    });
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (ca, cert, key)
}

/// What `airlock connect` left in `dir` (its private directories): nothing, once the
/// client it ran has ended.
pub fn connect_leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("airlock-connect-")
        })
        .map(|e| e.path())
        .collect()
}
