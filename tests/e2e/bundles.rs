//! Signed bundles through the real binary: sign, verify, install, refusals, rollback,
//! permissions; and hot reload under concurrent decisions.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use airlock::bundle::{BundleError, PolicyDir, Reloader, SizeLimits};
use airlock::keys::{PublicKey, SecretKey, TrustedKeys};
use airlock::policy::ActivePolicy;
use airlock::policy::{Outcome, PolicySet};

use crate::support::{
    component, component_unchecked, engine, grant_context, refused, run, soon, tempdir, text,
    update_users, workspace,
};

/// A bundle source with two modules, a signing key, and a gateway data directory whose
/// configuration trusts that key.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Self::with_modules(&[
            (
                "read-only-sql",
                "example-policies/read-only-sql",
                r#"{ hooks = ["check"], target-kinds = ["postgres"] }"#,
            ),
            (
                "task-guard",
                "example-policies/task-guard",
                r#"{ hooks = ["authorize"] }"#,
            ),
        ])
    }

    /// `modules`: (name, crate path, applies-to). Fixtures come from the crate's
    /// `fixtures/` directory when it has one.
    fn with_modules(modules: &[(&str, &str, &str)]) -> Self {
        let dir = tempdir();
        let setup = Setup { dir };
        let out = run(&["bundle", "keygen", "--out", setup.keys().to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        let src = setup.src();
        std::fs::create_dir_all(&src).unwrap();
        let mut toml = String::from("name = \"test\"\n");
        for (name, crate_path, applies) in modules {
            std::fs::copy(component(crate_path), src.join(format!("{name}.wasm"))).unwrap();
            // The signer reads only inside the source directory: fixtures are copied in.
            let fixtures = workspace().join(crate_path).join("fixtures");
            let fixture_line = if fixtures.is_dir() {
                let copied = src.join(format!("{name}-fixtures"));
                std::fs::create_dir(&copied).unwrap();
                for entry in std::fs::read_dir(&fixtures).unwrap() {
                    let entry = entry.unwrap();
                    std::fs::copy(entry.path(), copied.join(entry.file_name())).unwrap();
                }
                format!("fixtures = [\"{name}-fixtures\"]\n")
            } else {
                String::new()
            };
            toml += &format!(
                "[[module]]\nname = \"{name}\"\nfile = \"{name}.wasm\"\napplies-to = {applies}\n{fixture_line}"
            );
        }
        std::fs::write(src.join("bundle.toml"), toml).unwrap();
        std::fs::create_dir(setup.data()).unwrap();
        std::fs::set_permissions(setup.data(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(
            setup.data().join("airlock.toml"),
            format!(
                "[policy]\ntrusted-keys = [{:?}]\n",
                setup.public_key().to_str().unwrap()
            ),
        )
        .unwrap();
        setup
    }

    fn keys(&self) -> PathBuf {
        self.dir.path().join("keys")
    }
    fn key(&self) -> PathBuf {
        self.keys().join("bundle-signing.key")
    }
    fn public_key(&self) -> PathBuf {
        self.keys().join("bundle-signing.key.pub")
    }
    fn src(&self) -> PathBuf {
        self.dir.path().join("src")
    }
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn policy_dir(&self) -> PathBuf {
        self.data().join("policy")
    }
    fn trust(&self) -> TrustedKeys {
        TrustedKeys::new(vec![
            PublicKey::from_arg(self.public_key().to_str().unwrap()).unwrap(),
        ])
    }

    fn sign(&self, version: u64) -> PathBuf {
        self.sign_with(&self.key(), version)
    }

    /// Signs the source as `version` with `key` through the CLI.
    fn sign_with(&self, key: &Path, version: u64) -> PathBuf {
        let out = self
            .dir
            .path()
            .join(format!("bundle-v{version}-{}", rand_suffix()));
        let output = run(&[
            "bundle",
            "sign",
            self.src().to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--version",
            &version.to_string(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{}", text(&output));
        out
    }

    fn verify(&self, bundle: &Path) -> Output {
        run(&[
            "bundle",
            "verify",
            bundle.to_str().unwrap(),
            "--trust",
            self.public_key().to_str().unwrap(),
        ])
    }

    fn install(&self, bundle: &Path) -> Output {
        run(&[
            "--data",
            self.data().to_str().unwrap(),
            "bundle",
            "install",
            bundle.to_str().unwrap(),
        ])
    }

    fn status(&self) -> String {
        text(&run(&[
            "--data",
            self.data().to_str().unwrap(),
            "bundle",
            "status",
        ]))
    }
}

fn rand_suffix() -> String {
    airlock::fsperm::random_suffix()
}

#[test]
fn sign_verify_install_and_status() {
    let setup = Setup::new();
    let bundle = setup.sign(1);
    let out = setup.verify(&bundle);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("ok: test v1 signed by key"),
        "{}",
        text(&out)
    );
    assert!(setup.status().contains("no bundle installed"));
    let out = setup.install(&bundle);
    assert!(out.status.success(), "{}", text(&out));
    let status = setup.status();
    assert!(status.contains("bundle:  test v1"), "{status}");
    assert!(status.contains("read-only-sql"), "{status}");
    // Everything the gateway wrote is private to it.
    for path in [setup.policy_dir(), setup.policy_dir().join("cache")] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", path.display());
    }
    let key_mode = std::fs::metadata(setup.key()).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
}

#[test]
fn a_tampered_module_byte_is_refused_naming_the_file_and_both_digests() {
    let setup = Setup::new();
    let bundle = setup.sign(1);
    let module = bundle.join("modules/read-only-sql.wasm");
    let mut bytes = std::fs::read(&module).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&module, &bytes).unwrap();
    let out = setup.verify(&bundle);
    refused(
        &out,
        "modules/read-only-sql.wasm does not match its digest: manifest says sha256 ",
    );
    refused(&out, ", file has ");
    refused(&setup.install(&bundle), "does not match its digest");
    assert!(setup.status().contains("no bundle installed"));
}

#[test]
fn an_edited_manifest_is_refused() {
    let setup = Setup::new();
    let bundle = setup.sign(1);
    let manifest = bundle.join("manifest.toml");
    let edited = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("target-kinds = [\"postgres\"]", "target-kinds = [\"ssh\"]");
    std::fs::write(&manifest, edited).unwrap();
    refused(
        &setup.verify(&bundle),
        "does not verify: manifest.toml was changed after signing",
    );
    refused(&setup.install(&bundle), "does not verify");
}

#[test]
fn a_signature_by_an_untrusted_key_is_refused() {
    let setup = Setup::new();
    let other = tempdir();
    assert!(
        run(&["bundle", "keygen", "--out", other.path().to_str().unwrap()])
            .status
            .success()
    );
    let bundle = setup.sign_with(&other.path().join("bundle-signing.key"), 1);
    refused(&setup.verify(&bundle), "which is not trusted (trusted: ");
    refused(&setup.install(&bundle), "which is not trusted");
}

#[test]
fn an_unsigned_bundle_is_refused() {
    let setup = Setup::new();
    let bundle = setup.sign(1);
    std::fs::remove_file(bundle.join("manifest.sig")).unwrap();
    refused(
        &setup.verify(&bundle),
        "is unsigned: manifest.sig is missing",
    );
    refused(&setup.install(&bundle), "is unsigned");
}

#[test]
fn an_expired_bundle_is_refused() {
    let setup = Setup::new();
    let key = SecretKey::read(&setup.key()).unwrap();
    let bundle = setup.dir.path().join("old");
    let two_years_ago = SystemTime::now() - Duration::from_secs(2 * 365 * 86_400);
    airlock::bundle::sign(&setup.src(), &key, 1, &bundle, two_years_ago).unwrap();
    refused(&setup.verify(&bundle), "bundle test v1 expired at ");
    refused(&setup.install(&bundle), "expired at");
}

#[test]
fn a_rollback_is_refused_and_the_installed_bundle_stays() {
    let setup = Setup::new();
    let v1 = setup.sign(1);
    let v2 = setup.sign(2);
    assert!(setup.install(&v2).status.success());
    refused(
        &setup.install(&v1),
        "bundle test v1 is not newer than the installed v2; refusing a rollback",
    );
    refused(&setup.install(&v2), "not newer than the installed v2");
    assert!(setup.status().contains("bundle:  test v2"));
}

#[test]
fn a_policy_directory_others_can_write_is_refused() {
    let setup = Setup::new();
    assert!(setup.install(&setup.sign(1)).status.success());
    for (path, mode) in [
        (setup.policy_dir(), 0o777),
        (setup.policy_dir(), 0o770),
        (setup.policy_dir().join("cache"), 0o733),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        refused(
            &setup.install(&setup.sign(2)),
            "lets a group or other users write it; refusing to use it",
        );
        let status = setup.status();
        assert!(status.contains("refusing to use it"), "{status}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    assert!(setup.status().contains("bundle:  test v1"));
}

#[test]
fn a_bundle_failing_its_own_fixtures_is_refused() {
    let setup = Setup::new();
    let fixtures = setup.src().join("lying-fixtures");
    std::fs::create_dir(&fixtures).unwrap();
    std::fs::write(
        fixtures.join("wrong.toml"),
        "[[case]]\nname = \"claims DROP is fine\"\ncheck.sql = { text = \"DROP TABLE t\", kind = \"ddl\" }\nexpect = { verdict = \"allow\" }\n",
    )
    .unwrap();
    let toml = std::fs::read_to_string(setup.src().join("bundle.toml")).unwrap();
    let toml = toml.replacen("fixtures = [", "fixtures = [\"lying-fixtures\", ", 1);
    std::fs::write(setup.src().join("bundle.toml"), toml).unwrap();
    let bundle = setup.sign(1);
    refused(
        &setup.install(&bundle),
        "module `read-only-sql` failed its fixtures: 1 of ",
    );
    assert!(setup.status().contains("no bundle installed"));
}

/// Waits (bounded) until the reloader has activated `version`.
fn activate(reloader: &mut Reloader, active: &ActivePolicy, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while active.current().bundle().map(|b| b.version) != Some(version) {
        assert!(Instant::now() < deadline, "v{version} was never activated");
        reloader.poll().expect("the installed bundle loads");
    }
}

#[test]
fn hot_swap_under_concurrent_decisions_never_mixes_bundles() {
    // Odd versions hold read-only-sql (UPDATE under read → deny); even versions hold
    // the hostile module in its benign mode (→ allow). A decision that mixed two
    // bundles would show a vote from a module its bundle does not have.
    let deny_setup = Setup::with_modules(&[(
        "read-only-sql",
        "example-policies/read-only-sql",
        r#"{ hooks = ["check"] }"#,
    )]);
    let allow_setup = Setup::with_modules(&[(
        "hostile",
        "tests/policies/hostile",
        r#"{ hooks = ["check"] }"#,
    )]);
    let allow_src = allow_setup.src();
    let bundles: Vec<PathBuf> = (1..=4u64)
        .map(|v| {
            if v % 2 == 0 {
                let key = SecretKey::read(&deny_setup.key()).unwrap();
                let out = deny_setup.dir.path().join(format!("allow-v{v}"));
                airlock::bundle::sign(&allow_src, &key, v, &out, SystemTime::now()).unwrap();
                out
            } else {
                deny_setup.sign(v)
            }
        })
        .collect();

    assert!(deny_setup.install(&bundles[0]).status.success());
    // A generous call deadline: this test is about which bundle decides, and three
    // spinning threads on a loaded two-core machine can stretch one call past 20 ms.
    let engine = airlock::policy::PolicyEngine::new(
        airlock::policy::PolicyLimits {
            deadline: Duration::from_secs(2),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let dir = PolicyDir::open(&deny_setup.policy_dir()).unwrap();
    let trust = deny_setup.trust();
    let first = dir
        .load_current(&engine, &trust, SystemTime::now())
        .unwrap()
        .unwrap();
    let active = Arc::new(ActivePolicy::new(first, &Default::default()));
    let mut reloader = Reloader::new(
        dir.clone(),
        engine.clone(),
        trust,
        active.clone(),
        dir.current().unwrap(),
    );

    let in_flight: Arc<PolicySet> = active.current();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let active = active.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen = [0usize; 5];
                for _ in 0..200_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let set = active.current();
                    let version = set.bundle().unwrap().version;
                    let decision = set.check(&grant_context("fine"), &update_users(), soon());
                    assert_eq!(decision.bundle.as_ref().unwrap().version, version);
                    let voters: Vec<&str> = decision.votes.iter().map(|v| &*v.module).collect();
                    if version % 2 == 1 {
                        assert_eq!(voters, ["read-only-sql"], "v{version}");
                        assert!(
                            matches!(decision.outcome, Outcome::Deny { .. }),
                            "v{version}"
                        );
                    } else {
                        assert_eq!(voters, ["hostile"], "v{version}");
                        assert!(
                            decision.outcome.is_allow(),
                            "v{version}: {:?}",
                            decision.outcome
                        );
                    }
                    seen[version as usize] += 1;
                }
                seen
            })
        })
        .collect();

    for (i, bundle) in bundles.iter().enumerate().skip(1) {
        let out = deny_setup.install(bundle);
        assert!(out.status.success(), "{}", text(&out));
        activate(&mut reloader, &active, i as u64 + 1);
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = [0usize; 5];
    for worker in workers {
        let counts = worker.join().expect("no decision failed");
        for (total, n) in seen.iter_mut().zip(counts) {
            *total += n;
        }
    }
    assert!(
        seen[1..].iter().all(|&n| n > 0),
        "every bundle decided: {seen:?}"
    );

    // A decision holding the old set finishes on it, after three swaps.
    assert_eq!(in_flight.bundle().unwrap().version, 1);
    assert!(matches!(
        in_flight
            .check(&grant_context("fine"), &update_users(), soon())
            .outcome,
        Outcome::Deny { .. }
    ));
}

#[test]
fn the_reloader_keeps_the_active_bundle_when_the_installed_one_is_broken() {
    let setup = Setup::new();
    assert!(setup.install(&setup.sign(1)).status.success());
    let engine = engine();
    let dir = PolicyDir::open(&setup.policy_dir()).unwrap();
    let first = dir
        .load_current(&engine, &setup.trust(), SystemTime::now())
        .unwrap()
        .unwrap();
    let active = Arc::new(ActivePolicy::new(first, &Default::default()));
    let mut reloader = Reloader::new(
        dir.clone(),
        engine,
        setup.trust(),
        active.clone(),
        dir.current().unwrap(),
    );
    assert_eq!(reloader.poll().unwrap(), None, "nothing new yet");

    // v2 installs cleanly, then its module is corrupted on disk before the gateway
    // loads it.
    assert!(setup.install(&setup.sign(2)).status.success());
    let installed = dir.current().unwrap().unwrap();
    let module = installed.join("modules/read-only-sql.wasm");
    let mut bytes = std::fs::read(&module).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&module, bytes).unwrap();

    let err = reloader.poll().unwrap_err();
    assert!(matches!(err, BundleError::DigestMismatch { .. }), "{err}");
    assert_eq!(active.current().bundle().unwrap().version, 1);
    assert!(matches!(
        active.current().check(&grant_context("fine"), &update_users(), soon()).outcome,
        Outcome::Deny { ref reason, .. } if reason.contains("UPDATE writes to users")
    ));
    assert_eq!(
        reloader.poll().unwrap(),
        None,
        "a refused bundle is reported once"
    );
}

#[test]
fn a_corrupt_cached_artifact_is_recompiled_and_a_writable_one_refused() {
    let setup = Setup::new();
    assert!(setup.install(&setup.sign(1)).status.success());
    let dir = PolicyDir::open(&setup.policy_dir()).unwrap();
    let artifacts: Vec<PathBuf> = std::fs::read_dir(dir.cache_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(
        artifacts.len(),
        2,
        "install compiled both modules into the cache"
    );
    let engine = airlock::policy::PolicyEngine::new(
        airlock::policy::PolicyLimits::default(),
        Some(&dir.cache_dir()),
    )
    .unwrap();

    // A truncated artifact does not load: the module is compiled again and the
    // artifact rewritten, and decisions are unaffected.
    let victim = &artifacts[0];
    let original = std::fs::metadata(victim).unwrap().len();
    std::fs::write(victim, b"not an artifact").unwrap();
    let set = dir
        .load_current(&engine, &setup.trust(), SystemTime::now())
        .unwrap()
        .unwrap();
    assert!(matches!(
        set.check(&grant_context("fine"), &update_users(), soon()).outcome,
        Outcome::Deny { ref reason, .. } if reason.contains("UPDATE writes to users")
    ));
    assert_eq!(std::fs::metadata(victim).unwrap().len(), original);

    // An artifact someone else could have written is native code nobody vouches for.
    std::fs::set_permissions(victim, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = dir
        .load_current(&engine, &setup.trust(), SystemTime::now())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("refusing to use it"), "{err}");
}

#[test]
fn a_spawned_reloader_activates_a_newly_installed_bundle() {
    let setup = Setup::new();
    assert!(setup.install(&setup.sign(1)).status.success());
    let engine = engine();
    let dir = PolicyDir::open(&setup.policy_dir()).unwrap();
    let active = Arc::new(ActivePolicy::new(PolicySet::empty(), &Default::default()));
    let handle = Reloader::new(dir, engine, setup.trust(), active.clone(), None)
        .spawn(Duration::from_millis(20));
    let wait_for = |version: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while active.current().bundle().map(|b| b.version) != Some(version) {
            assert!(Instant::now() < deadline, "v{version} was never activated");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(1);
    assert!(setup.install(&setup.sign(2)).status.success());
    wait_for(2);
    drop(handle);
}

/// Rewrites a signed bundle's manifest with `edit` and signs it again with the trusted
/// key, as a compromised build pipeline holding that key could.
fn resign(setup: &Setup, bundle: &Path, edit: impl FnOnce(String) -> String) {
    let manifest = bundle.join("manifest.toml");
    let text = edit(std::fs::read_to_string(&manifest).unwrap());
    std::fs::write(&manifest, &text).unwrap();
    let key = SecretKey::read(&setup.key()).unwrap();
    let signature = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        key.sign(text.as_bytes()),
    );
    std::fs::write(
        bundle.join("manifest.sig"),
        format!(
            "algorithm = \"ed25519\"\nkey-id = \"{}\"\nsignature = \"{signature}\"\n",
            key.public().id()
        ),
    )
    .unwrap();
}

/// Replaces the manifest's `created` line.
fn set_created(text: &str, created: &str) -> String {
    let start = text.find("created = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    format!("{}created = \"{created}\"{}", &text[..start], &text[end..])
}

/// A signing key in the wrong hands: a bundle named to escape the policy directory or
/// to write control characters, a version that would end rotation, a `created` that is
/// no time or lies in the future. Each is refused naming the problem, nothing is
/// written outside the policy directory, and the installed bundle stays.
#[test]
fn a_signed_manifest_cannot_escape_end_rotation_or_lie_about_time() {
    let setup = Setup::new();
    assert!(setup.install(&setup.sign(1)).status.success());
    let escaped = setup.dir.path().join("escaped");
    let tomorrow =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(86_400))
            .to_string();
    type Edit = Box<dyn Fn(String) -> String>;
    let edits: Vec<(Edit, &str)> = vec![
        (
            Box::new(|t| t.replace("name = \"test\"", "name = \"../../../escaped\"")),
            "must be 1-64 characters of letters, digits",
        ),
        (
            Box::new(|t| t.replace("name = \"test\"", "name = \"te\\u001b[2Jst\"")),
            "must be 1-64 characters of letters, digits",
        ),
        (
            Box::new(|t| t.replace("version = 2", "version = 18446744073709551615")),
            "over the limit of 9007199254740992",
        ),
        (
            Box::new(|t| set_created(&t, "yesterday")),
            "is not an RFC 3339 time",
        ),
        (
            Box::new(move |t| set_created(&t, &tomorrow)),
            "is in the future",
        ),
    ];
    for (edit, expected) in edits {
        let bundle = setup.sign(2);
        resign(&setup, &bundle, edit);
        refused(&setup.verify(&bundle), expected);
        refused(&setup.install(&bundle), expected);
        assert!(!escaped.exists());
        assert!(setup.status().contains("test v1"), "{}", setup.status());
    }
    // The signer refuses such a version too.
    let out = run(&[
        "bundle",
        "sign",
        setup.src().to_str().unwrap(),
        "--key",
        setup.key().to_str().unwrap(),
        "--version",
        "18446744073709551615",
        "--out",
        setup.dir.path().join("never").to_str().unwrap(),
    ]);
    refused(&out, "would leave no room for the next bundle");
    assert!(setup.install(&setup.sign(3)).status.success());
}

/// Files that are not what they claim: a module that is a FIFO, a manifest linked to
/// /dev/zero, an oversized manifest. Refused at once, by name, without hanging or
/// holding the install lock.
#[test]
fn bundle_files_must_be_bounded_regular_files() {
    let setup = Setup::new();
    let started = std::time::Instant::now();

    let fifo_bundle = setup.sign(1);
    let module = fifo_bundle.join("modules/read-only-sql.wasm");
    std::fs::remove_file(&module).unwrap();
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&module)
            .status()
            .unwrap()
            .success()
    );
    refused(&setup.verify(&fifo_bundle), "is a FIFO, not a regular file");
    refused(
        &setup.install(&fifo_bundle),
        "is a FIFO, not a regular file",
    );

    let zero = setup.sign(1);
    std::fs::remove_file(zero.join("manifest.toml")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", zero.join("manifest.toml")).unwrap();
    refused(&setup.verify(&zero), "manifest.toml is a symbolic link");

    let huge = setup.sign(1);
    let mut text = std::fs::read_to_string(huge.join("manifest.toml")).unwrap();
    text.push_str(&format!("# {}\n", "x".repeat(2 << 20)));
    std::fs::write(huge.join("manifest.toml"), text).unwrap();
    refused(&setup.verify(&huge), "over the limit of 1048576");

    // The operator's limits apply: a module over its limit, and a bundle over its
    // limit in all; and the configuration refuses a limit of nothing.
    let bundle = setup.sign(1);
    let within = |limits: SizeLimits| {
        airlock::bundle::verify_within(&bundle, &setup.trust(), SystemTime::now(), &limits)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let module_size = std::fs::metadata(bundle.join("modules/read-only-sql.wasm"))
        .unwrap()
        .len();
    let small = within(SizeLimits {
        module: module_size - 1,
        ..SizeLimits::default()
    });
    assert!(
        small.contains(&format!("is {module_size} bytes, over the limit of")),
        "{small}"
    );
    let total = within(SizeLimits {
        bundle: module_size + 1,
        ..SizeLimits::default()
    });
    assert!(total.contains("over the limit of"), "{total}");
    assert_eq!(within(SizeLimits::default()), "");
    let config = setup.data().join("airlock.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        original.replace("[policy]\n", "[policy]\nmax-bundle-mib = 0\n"),
    )
    .unwrap();
    refused(
        &setup.install(&bundle),
        "max-bundle-mib must be between 1 and 4096",
    );
    std::fs::write(&config, &original).unwrap();

    // None of it hung, and the lock was never left held: a good bundle installs.
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(setup.install(&setup.sign(2)).status.success());
}

/// Expiry is enforced while the bundle is active, not only at install and load: once
/// its window closes, every decision is a denial naming the expiry.
#[test]
fn an_active_bundle_stops_deciding_when_it_expires() {
    let setup = Setup::new();
    let key = SecretKey::read(&setup.key()).unwrap();
    let bundle = setup.dir.path().join("expiring");
    // Signed so that its 365-day window closes three seconds from now.
    let signed_at = SystemTime::now() - Duration::from_secs(365 * 86_400) + Duration::from_secs(3);
    airlock::bundle::sign(&setup.src(), &key, 1, &bundle, signed_at).unwrap();
    assert!(setup.install(&bundle).status.success());
    let dir = PolicyDir::open(&setup.policy_dir()).unwrap();
    let set = dir
        .load_current(&engine(), &setup.trust(), SystemTime::now())
        .unwrap()
        .unwrap();
    let at = |time: SystemTime| {
        let mut context = grant_context("fine");
        context.now_unix_ms = time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        set.check(&context, &update_users(), soon())
    };
    // Before: the module decides (an UPDATE under read is denied by read-only-sql).
    let before = at(SystemTime::now());
    assert_eq!(before.votes.len(), 1);
    // After: no module is asked, and the denial says why and what to do.
    let after = at(SystemTime::now() + Duration::from_secs(10));
    assert!(after.votes.is_empty());
    match after.outcome {
        Outcome::Deny { reason, hint, .. } => {
            assert!(
                reason.contains("policy bundle test v1 expired at "),
                "{reason}"
            );
            assert!(hint.unwrap().contains("airlock bundle install"));
        }
        other => panic!("{other:?}"),
    }

    // A running gateway's reloader records the expiry once, when it passes.
    let store = tempdir();
    let record = airlock::record::Record::open(
        airlock::record::RecordOptions::new(store.path().join("store")),
        SecretKey::generate(),
    )
    .unwrap();
    let engine = engine();
    let loaded = dir
        .load_current(&engine, &setup.trust(), SystemTime::now())
        .unwrap()
        .unwrap();
    let active = Arc::new(ActivePolicy::new(loaded, &Default::default()));
    let current = dir.current().unwrap();
    let reloader = Reloader::new(dir, engine, setup.trust(), active, current)
        .recording(record.clone())
        .spawn(Duration::from_millis(50));
    let expired = || {
        airlock::record::export_lines(record.spaces(), 0)
            .unwrap()
            .iter()
            .filter(|line| {
                String::from_utf8_lossy(&line.to_line()).contains("\"kind\":\"policy.expired\"")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while expired() == 0 {
        assert!(Instant::now() < deadline, "the expiry was never recorded");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(reloader);
    assert_eq!(expired(), 1, "recorded once, not at every poll");
}

/// A bundle signed for longer than the gateway's `policy.max-validity` is refused, and
/// the operator can raise the limit.
#[test]
fn a_bundle_signed_for_too_long_is_refused() {
    let setup = Setup::new();
    let source = setup.src().join("bundle.toml");
    let text = std::fs::read_to_string(&source).unwrap();
    std::fs::write(
        &source,
        text.replace("name = \"test\"", "name = \"test\"\nvalid-for = \"500d\""),
    )
    .unwrap();
    let bundle = setup.sign(1);
    refused(
        &setup.install(&bundle),
        "bundle test v1 is signed for 500 days, longer than this gateway's policy.max-validity of 400 days",
    );
    let config = setup.data().join("airlock.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[policy]\n", "[policy]\nmax-validity = \"600d\"\n"),
    )
    .unwrap();
    assert!(setup.install(&bundle).status.success());
}

/// An old, inactive bundle that others can write is reported, not fatal: it is never
/// loaded again. The active one stays strictly checked.
#[test]
fn a_writable_inactive_bundle_is_reported_not_fatal() {
    let setup = Setup::new();
    assert!(setup.install(&setup.sign(1)).status.success());
    assert!(setup.install(&setup.sign(2)).status.success());
    let old = setup.policy_dir().join("bundles/test-v1/manifest.toml");
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(
        setup.status().contains("bundle:  test v2"),
        "{}",
        setup.status()
    );
    let dir = PolicyDir::open(&setup.policy_dir()).unwrap();
    assert!(
        dir.load_current(&engine(), &setup.trust(), SystemTime::now())
            .unwrap()
            .is_some()
    );
    assert!(setup.install(&setup.sign(3)).status.success());
    let active = setup.policy_dir().join("bundles/test-v3/manifest.toml");
    std::fs::set_permissions(&active, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(
        setup.status().contains("refusing to use it"),
        "{}",
        setup.status()
    );
}

/// Fixtures a module passed are remembered by the module's and fixtures' digests, so a
/// reload does not run them again; a failure is never remembered.
#[test]
fn fixture_results_are_cached_by_digest() {
    let setup = Setup::new();
    let markers = || {
        std::fs::read_dir(setup.policy_dir().join("cache"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("fixtures-"))
            .count()
    };
    assert_eq!(markers(), 0);
    assert!(setup.install(&setup.sign(1)).status.success());
    let passed = markers();
    assert!(passed > 0, "each module with fixtures passed them once");
    // The same modules and fixtures in a new version: nothing new to remember.
    assert!(setup.install(&setup.sign(2)).status.success());
    assert_eq!(markers(), passed);
    let dir = PolicyDir::open(&setup.policy_dir()).unwrap();
    assert!(
        dir.load_current(&engine(), &setup.trust(), SystemTime::now())
            .unwrap()
            .is_some()
    );
}

#[test]
fn a_module_that_cannot_start_is_refused_at_install_and_the_active_bundle_stays() {
    let setup = Setup::new();
    let good = setup.sign(1);
    let out = setup.install(&good);
    assert!(out.status.success(), "{}", text(&out));

    // Signed by the trusted key: only the module's behaviour is wrong.
    std::fs::write(
        setup.src().join("stuck.wasm"),
        component_unchecked("tests/policies/stuck-start"),
    )
    .unwrap();
    std::fs::write(
        setup.src().join("bundle.toml"),
        "name = \"test\"\n[[module]]\nname = \"stuck\"\nfile = \"stuck.wasm\"\napplies-to = { hooks = [\"check\"] }\n",
    )
    .unwrap();
    let bundle = setup.sign(2);
    refused(
        &setup.install(&bundle),
        "module `stuck` cannot start: instantiating it ran past its 20ms deadline",
    );
    let status = setup.status();
    assert!(status.contains("bundle:  test v1"), "{status}");
}

/// A gateway stuck on a version (at the limit, or one an older gateway accepted and
/// this one cannot read) recovers with `airlock bundle recover`: refused while the
/// active bundle can be rotated from, recorded with the operator's reason when the
/// running gateway activates the bundle, and rotation goes on normally afterwards.
#[test]
fn a_gateway_stuck_on_a_version_recovers_by_a_recorded_operator_procedure() {
    use crate::gateway::{Gateway, wait_for};
    use airlock::bundle::MAX_VERSION;

    let mut gw = Gateway::start();
    let manifest = gw.example_manifest();
    let activated = |gw: &Gateway, bundle: &str| {
        gw.events("policy.activated")
            .into_iter()
            .rfind(|e| e["detail"]["bundle"] == bundle)
    };

    // Not stuck: recovery is refused and names the normal way.
    let v2 = gw.sign_bundle(2, &manifest, &[]);
    let v2 = v2.to_str().unwrap();
    refused(
        &gw.cli(&["bundle", "recover", v2, "--reason", "testing"]),
        "no recovery needed: the active bundle example v1 can be rotated from",
    );

    // Stuck: the highest version there is. A newer install is a rollback that says
    // where the way out is.
    gw.install_bundle(MAX_VERSION, &manifest, &[]);
    let max = format!("example v{MAX_VERSION}");
    wait_for("the top version to be active", || {
        activated(&gw, &max).is_some()
    });
    refused(
        &gw.cli(&["bundle", "install", v2]),
        "leaves no room above it: see airlock bundle recover",
    );
    refused(
        &gw.cli(&["bundle", "recover", v2, "--reason", " "]),
        "a recovery needs --reason",
    );
    let out = gw.cli(&[
        "bundle",
        "recover",
        v2,
        "--reason",
        "v2^53 came from a compromised pipeline",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let mut event = None;
    wait_for("the recovery to be recorded", || {
        event = activated(&gw, "example v2");
        event.is_some()
    });
    let detail = &event.unwrap()["detail"];
    assert_eq!(
        detail["recovery"]["reason"],
        "v2^53 came from a compromised pipeline"
    );
    assert_eq!(detail["previous"], max, "{detail}");
    assert!(
        detail["recovery"]["stuck_on"]
            .as_str()
            .unwrap()
            .contains("leaves no version above it"),
        "{detail}"
    );
    let status = text(&gw.cli(&["bundle", "status"]));
    assert!(status.contains("bundle:  example v2"), "{status}");
    assert!(
        status.contains("reason: v2^53 came from a compromised pipeline"),
        "{status}"
    );

    // Rotation goes on; the note is gone with the recovered bundle.
    gw.install_bundle(3, &manifest, &[]);
    wait_for("v3 to be active", || activated(&gw, "example v3").is_some());
    let status = text(&gw.cli(&["bundle", "status"]));
    assert!(!status.contains("recovered"), "{status}");

    // Stuck on what an older gateway accepted and this one cannot read: a version
    // over the limit. (Made by hand: this gateway refuses to install it.)
    let policy = gw.data().join("policy");
    let old = policy.join("bundles/example-v18446744073709551615");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(policy.join("bundles/example-v3"))
        .arg(&old)
        .status()
        .unwrap();
    assert!(status.success());
    let manifest_path = old.join("manifest.toml");
    let text_before = std::fs::read_to_string(&manifest_path).unwrap();
    std::fs::write(
        &manifest_path,
        text_before.replace("version = 3", "version = 18446744073709551615"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        "bundles/example-v18446744073709551615",
        policy.join("current.new"),
    )
    .unwrap();
    std::fs::rename(policy.join("current.new"), policy.join("current")).unwrap();
    gw.restart();
    let (_, denied) = gw.ask(
        &gw.agent("stuck-agent", &[]),
        "prod-db",
        "confirm migration 42 ran",
        "read",
        "5m",
    );
    assert_eq!(denied["status"], "denied", "{denied}");
    assert!(
        !gw.events("policy.refused").is_empty(),
        "the refusal is recorded"
    );
    let v4 = gw.sign_bundle(4, &manifest, &[]);
    let v4 = v4.to_str().unwrap();
    refused(
        &gw.cli(&["bundle", "install", v4]),
        "the active bundle cannot be read",
    );
    let out = gw.cli(&[
        "bundle",
        "recover",
        v4,
        "--reason",
        "left over from airlock 0.0",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let mut event = None;
    wait_for("the second recovery to be recorded", || {
        event = activated(&gw, "example v4");
        event.is_some()
    });
    let detail = &event.unwrap()["detail"];
    assert_eq!(
        detail["recovery"]["replaced"],
        "example-v18446744073709551615"
    );
    assert!(
        detail["recovery"]["stuck_on"]
            .as_str()
            .unwrap()
            .contains("cannot be read"),
        "{detail}"
    );

    // Prune leaves only the active bundle.
    let out = gw.cli(&["bundle", "prune"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("removed bundles/example-v18446744073709551615"));
    let left: Vec<_> = std::fs::read_dir(policy.join("bundles"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["example-v4"]);
    let status = text(&gw.cli(&["bundle", "status"]));
    assert!(status.contains("bundle:  example v4"), "{status}");
    let out = gw.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Whoever can write the source directory an operator signs: the signer reads only
/// regular files inside it, through no link, within the install limits, so it can
/// neither copy another of the operator's files (the signing key) into a bundle nor
/// hang. What it prints about the source is escaped.
#[test]
fn signing_reads_only_bounded_regular_files_inside_the_source() {
    let setup = Setup::new();
    let source = setup.src().join("bundle.toml");
    let original = std::fs::read_to_string(&source).unwrap();
    let key = setup.key();
    let sign = |version: u64| {
        let out = setup.dir.path().join(format!("out-{}", rand_suffix()));
        let output = run(&[
            "bundle",
            "sign",
            setup.src().to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--version",
            &version.to_string(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!out.exists(), "nothing is written when signing is refused");
        output
    };
    let with_fixture = |path: &str| {
        std::fs::write(
            &source,
            original.replacen("fixtures = [", &format!("fixtures = [{path:?}, "), 1),
        )
        .unwrap();
    };

    // An absolute path, and one that climbs out.
    with_fixture(key.to_str().unwrap());
    refused(&sign(1), "is not a relative path inside the directory");
    with_fixture("../keys/bundle-signing.key");
    refused(&sign(1), "is not a relative path inside the directory");
    // A link inside to the key, and a directory inside that is a link out.
    std::os::unix::fs::symlink(&key, setup.src().join("leak.json")).unwrap();
    with_fixture("leak.json");
    refused(&sign(1), "leak.json is a symbolic link");
    std::os::unix::fs::symlink(setup.keys(), setup.src().join("keys")).unwrap();
    with_fixture("keys/bundle-signing.key");
    refused(&sign(1), "is a symbolic link, or lies under one");
    // A FIFO module is refused at once, not waited on.
    std::fs::write(&source, &original).unwrap();
    let module = setup.src().join("read-only-sql.wasm");
    std::fs::remove_file(&module).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &module,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let started = Instant::now();
    refused(&sign(1), "read-only-sql.wasm is a FIFO, not a regular file");
    assert!(started.elapsed() < Duration::from_secs(10));
    std::fs::remove_file(&module).unwrap();
    std::fs::copy(component("example-policies/read-only-sql"), &module).unwrap();

    // Text that would drive the terminal reaches it escaped.
    std::fs::write(
        &source,
        original.replacen(
            "name = \"test\"",
            "name = \"x\\u001b]0;PWNED\\u0007\\u001b[2J\"",
            1,
        ),
    )
    .unwrap();
    let out = sign(1);
    assert!(!out.status.success());
    let printed = text(&out);
    assert!(!printed.contains('\u{1b}'), "{printed:?}");
    assert!(printed.contains("\\u{1b}"), "{printed:?}");
    // Target patterns are held to target-name characters and wildcards.
    std::fs::write(
        &source,
        original.replacen(
            "hooks = [\"check\"]",
            "hooks = [\"check\"], targets = [\"prod\\u001b[2J\"]",
            1,
        ),
    )
    .unwrap();
    refused(&sign(1), "target pattern");

    // A signed manifest may not list one file twice (multiplying the per-file limits).
    std::fs::write(&source, &original).unwrap();
    let bundle = setup.sign(1);
    resign(&setup, &bundle, |text| {
        let first = text.find("[[module.fixture]]").expect("a fixture entry");
        let end = text[first + 1..]
            .find("\n[")
            .map_or(text.len(), |i| first + 1 + i);
        let entry = text[first..end].to_string();
        format!("{}\n{entry}", text.trim_end())
    });
    refused(&setup.verify(&bundle), "more than once");
    refused(&setup.install(&bundle), "more than once");
    assert!(setup.install(&setup.sign(2)).status.success());
}
