//! The sandbox: hostile modules are cut off with a deny that names the cause, within
//! the deadline, and the host keeps deciding correctly afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock::policy::types::{Column, Constraints, Rows, Verdict};
use airlock::policy::{BundleId, Fault, LoadError, MaskError, Outcome, PolicySet, Scope};

use crate::support::{
    component, component_unchecked, engine, grant_context, load, run, soon, tempdir, text,
    update_users, workspace,
};

const HOSTILE: &str = "tests/policies/hostile";
const READ_ONLY_SQL: &str = "example-policies/read-only-sql";

fn allowed() -> Verdict {
    Verdict::Allow(Constraints {
        max_ttl_seconds: None,
        read_only: false,
    })
}

#[test]
fn each_fault_is_a_deny_naming_its_cause_and_the_host_keeps_serving() {
    let engine = engine();
    let deadline = engine.limits().deadline;
    let hostile = load(&engine, HOSTILE);
    let good = load(&engine, READ_ONLY_SQL);
    type Expected = fn(&Fault) -> bool;
    let cases: [(&str, Expected); 5] = [
        ("loop", |f| matches!(f, Fault::Deadline(_))),
        ("bomb", |f| matches!(f, Fault::Memory(_))),
        ("recurse", |f| matches!(f, Fault::StackOverflow)),
        (
            "trap",
            |f| matches!(f, Fault::Trap(why) if why.contains("unreachable")),
        ),
        (
            "garbage",
            |f| matches!(f, Fault::Malformed(why) if why.contains("empty reason")),
        ),
    ];
    for (task, expected) in cases {
        let started = Instant::now();
        let verdict = hostile.check(&grant_context(task), &update_users(), soon());
        let elapsed = started.elapsed();
        match &verdict {
            Err(fault) => assert!(expected(fault), "{task}: unexpected fault {fault:?}"),
            Ok(v) => panic!("{task}: expected a fault, got {v:?}"),
        }
        // Not a speed claim: the runaway call is cut off, not left running. The bound
        // is generous so a loaded machine cannot make it flaky.
        assert!(
            elapsed < deadline * 50,
            "{task}: took {elapsed:?} with a {deadline:?} deadline"
        );
        assert_eq!(
            hostile.check(&grant_context("fine"), &update_users(), soon()),
            Ok(allowed())
        );
        assert!(matches!(
            good.check(&grant_context("fine"), &update_users(), soon()),
            Ok(Verdict::Deny(d)) if d.reason.contains("UPDATE writes to users")
        ));
    }
}

#[test]
fn a_fault_in_a_bundle_denies_the_combined_verdict_and_names_the_module() {
    let engine = engine();
    let set = PolicySet::new(
        BundleId {
            name: "test".into(),
            version: 1,
        },
        vec![load(&engine, HOSTILE)],
    );
    let decision = set.check(&grant_context("loop"), &update_users(), soon());
    match &decision.outcome {
        Outcome::Deny { module, reason, .. } => {
            assert_eq!(module.as_deref(), Some("hostile"));
            assert!(
                reason.contains("policy module `hostile` ran past its 20ms deadline"),
                "{reason}"
            );
        }
        other => panic!("expected deny, got {other:?}"),
    }
    assert_eq!(decision.votes.len(), 1);
    assert!(
        set.check(&grant_context("fine"), &update_users(), soon())
            .outcome
            .is_allow()
    );
}

#[test]
fn a_decision_has_one_deadline_for_all_its_modules() {
    let engine = engine();
    // Each call's own deadline is 20 ms; the whole decision gets 5 ms, so the first
    // looping call is cut by the decision's deadline, not its own, and says so.
    let set = PolicySet::new(
        BundleId {
            name: "test".into(),
            version: 1,
        },
        vec![
            load(&engine, HOSTILE),
            load(&engine, HOSTILE),
            load(&engine, HOSTILE),
        ],
    );
    let decision = set.check(
        &grant_context("loop"),
        &update_users(),
        Instant::now() + Duration::from_millis(5),
    );
    match &decision.outcome {
        Outcome::Deny { reason, .. } => assert!(
            reason.contains("ran past the 100ms deadline of the whole decision"),
            "{reason}"
        ),
        other => panic!("expected deny, got {other:?}"),
    }
    // A decision whose deadline has passed asks no module at all.
    let late = set.check(&grant_context("fine"), &update_users(), Instant::now());
    assert!(
        matches!(&late.votes[..], [vote] if vote.verdict == Err(Fault::DecisionDeadline(Duration::from_millis(100)))),
        "{:?}",
        late.votes
    );
    assert!(!late.outcome.is_allow());
    assert!(
        set.check(&grant_context("fine"), &update_users(), soon())
            .outcome
            .is_allow()
    );
}

#[test]
fn a_mask_that_changes_the_shape_withholds_the_result() {
    let engine = engine();
    let set = Arc::new(PolicySet::new(
        BundleId {
            name: "test".into(),
            version: 1,
        },
        vec![load(&engine, HOSTILE)],
    ));
    let columns = vec![Column {
        name: "email".into(),
        type_name: "text".into(),
    }];
    let rows = Rows {
        columns: columns.clone(),
        values: vec![vec![Some("alice@example.com".into())]],
    };
    let ctx = grant_context("garbage");
    let plan = set.mask_plan(&ctx, &columns, soon()).unwrap();
    let err = plan.mask_rows(&ctx, rows.clone(), soon()).unwrap_err();
    assert!(matches!(&err, MaskError::Module { module, .. } if &**module == "hostile"));
    assert!(
        err.to_string()
            .contains("returned malformed output: mask returned 2 rows for 1; result withheld"),
        "{err}"
    );
    let ctx = grant_context("fine");
    assert_eq!(
        set.mask_plan(&ctx, &columns, soon())
            .unwrap()
            .mask_rows(&ctx, rows.clone(), soon())
            .unwrap(),
        rows
    );
}

#[test]
fn no_state_survives_between_decisions() {
    let engine = engine();
    let hostile = load(&engine, HOSTILE);
    for _ in 0..3 {
        assert_eq!(
            hostile.check(&grant_context("count"), &update_users(), soon()),
            Ok(Verdict::Allow(Constraints {
                max_ttl_seconds: Some(1),
                read_only: false
            })),
            "a fresh instance per decision sees its first call"
        );
    }
}

#[test]
fn concurrent_decisions_each_get_their_own_instance() {
    let engine = engine();
    let module = Arc::new(load(&engine, READ_ONLY_SQL));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let module = module.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let verdict = module
                        .check(&grant_context("fine"), &update_users(), soon())
                        .unwrap();
                    assert!(matches!(verdict, Verdict::Deny(_)));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// A component importing WASI's filesystem, written by hand: no Rust toolchain for
/// WASI is needed to build it.
const WASI_FS_COMPONENT: &str = r#"
(component
  (import "wasi:filesystem/preopens@0.2.0" (instance
    (export "get-directories" (func (result (list string))))
  ))
)
"#;

#[test]
fn a_module_whose_start_function_never_returns_is_refused_at_load() {
    let engine = engine();
    let bytes = component_unchecked("tests/policies/stuck-start");
    let started = Instant::now();
    let err = engine
        .load_module("stuck", &bytes, Scope::everything())
        .err()
        .expect("refused");
    assert!(
        matches!(&err, LoadError::Unstartable { module, fault: Fault::Deadline(_) } if module == "stuck"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "module `stuck` cannot start: instantiating it ran past its 20ms deadline"
    );
    // Bounded: the probe is cut at the call deadline (generous against a loaded box).
    assert!(started.elapsed() < Duration::from_secs(10));

    // `airlock policy build` refuses it too, naming the crate, and writes nothing.
    let dir = tempdir();
    let out = dir.path().join("stuck.wasm");
    let output = run(&[
        "policy",
        "build",
        workspace()
            .join("tests/policies/stuck-start")
            .to_str()
            .unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("module `stuck-start` cannot start"),
        "{}",
        text(&output)
    );
    assert!(!out.exists());
}

#[test]
fn a_module_importing_wasi_is_refused_at_load_naming_the_import() {
    let engine = engine();
    let bytes = wat::parse_str(WASI_FS_COMPONENT).unwrap();
    let err = engine
        .load_module("sneaky", &bytes, Scope::everything())
        .err()
        .expect("refused");
    assert!(
        matches!(&err, LoadError::ForbiddenImport { import, .. } if import == "wasi:filesystem/preopens@0.2.0"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("module `sneaky` imports `wasi:filesystem/preopens@0.2.0`"),
        "{err}"
    );

    // The CLI says the same and fails.
    let dir = tempdir();
    let wasm = dir.path().join("sneaky.wasm");
    std::fs::write(&wasm, &bytes).unwrap();
    let fixture = dir.path().join("f.toml");
    std::fs::write(
        &fixture,
        "[[case]]\nname = \"x\"\ncheck = \"ssh-shell\"\nexpect = {}\n",
    )
    .unwrap();
    let output = run(&[
        "policy",
        "test",
        wasm.to_str().unwrap(),
        fixture.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("imports `wasi:filesystem/preopens@0.2.0`"),
        "{}",
        text(&output)
    );
}

#[test]
fn bytes_that_are_not_a_component_are_refused() {
    let engine = engine();
    let core_module = wat::parse_str("(module)").unwrap();
    for bytes in [&b"\0asm garbage"[..], &core_module] {
        let err = engine
            .load_module("junk", bytes, Scope::everything())
            .err()
            .expect("refused");
        assert!(matches!(err, LoadError::InvalidComponent { .. }), "{err}");
    }
    // A real policy module still loads on the same engine.
    let bytes = std::fs::read(component(READ_ONLY_SQL)).unwrap();
    assert!(
        engine
            .load_module("good", &bytes, Scope::everything())
            .is_ok()
    );
}
