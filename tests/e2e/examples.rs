//! Every example policy passes its own fixtures through the real host, via the CLI.

use crate::support::{component, run, text, workspace};

#[test]
fn each_example_policy_passes_its_fixtures() {
    for name in [
        "read-only-sql",
        "pii-mask",
        "ssh-allowlist",
        "kube-readonly",
        "http-allowlist",
        "task-guard",
    ] {
        let wasm = component(&format!("example-policies/{name}"));
        let fixtures = workspace().join(format!("example-policies/{name}/fixtures"));
        let output = run(&[
            "policy",
            "test",
            wasm.to_str().unwrap(),
            fixtures.to_str().unwrap(),
        ]);
        let out = text(&output);
        assert!(output.status.success(), "{name}:\n{out}");
        let passed: u32 = out
            .split(" passed, 0 failed")
            .next()
            .and_then(|before| before.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no summary:\n{out}"));
        assert!(passed > 0, "{name} ran no case:\n{out}");
    }
}

#[test]
fn a_failing_fixture_fails_the_run_and_says_why() {
    let dir = crate::support::tempdir();
    let fixture = dir.path().join("wrong.toml");
    std::fs::write(
        &fixture,
        r#"
[[case]]
name = "claims an UPDATE is allowed under read"
check.sql = { text = "UPDATE t SET a = 1", kind = "update", tables-written = ["t"] }
expect = { verdict = "allow" }
"#,
    )
    .unwrap();
    let wasm = component("example-policies/read-only-sql");
    let output = run(&[
        "policy",
        "test",
        wasm.to_str().unwrap(),
        fixture.to_str().unwrap(),
    ]);
    let out = text(&output);
    assert!(!output.status.success(), "{out}");
    assert!(out.contains("0 passed, 1 failed"), "{out}");
    assert!(
        out.contains("expected allow, got deny (read-only grant: UPDATE writes to t)"),
        "{out}"
    );
}
