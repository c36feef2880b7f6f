//! Policy decision benchmark: `cargo bench -p airlock-gateway --bench policy`.
//!
//! Builds the example policies with the real build path, loads them as the example
//! bundle declares, and measures, with a fresh instance per call as in production:
//! - `check` of a SQL SELECT on a postgres target across the bundle,
//! - `authorize` of a grant request (task-guard),
//! - `mask` of a 256-row batch with PII (pii-mask), and the plan that precedes it,
//! - `check` on the decision pool, awaited from an async runtime, as the gateway calls it,
//! - `check` throughput with one thread per core.
//!
//! Latency is wall clock per call (p50/p99); CPU per call is the thread's CPU time over
//! the run divided by the calls.

use std::path::Path;
use std::time::{Duration, Instant};

use airlock::bundle::SourceBundle;
use airlock::policy::types::{
    Access, Action, Agent, Column, GrantContext, GrantRequest, Label, Rows, SqlKind, SqlStatement,
    Target, TargetKind,
};
use airlock::policy::{
    ActivePolicy, BundleId, PolicyEngine, PolicyLimits, PolicySet, build_policy_crate,
};

const WARMUP: usize = 2_000;
const CALLS: usize = 50_000;
const MASK_CALLS: usize = 2_000;

/// A whole-decision deadline that never cuts: each module call keeps its own.
fn far() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

struct Stats {
    p50: Duration,
    p99: Duration,
    cpu_per_call: Duration,
    per_second: f64,
}

fn measure(calls: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..WARMUP.min(calls) {
        f();
    }
    let mut samples = Vec::with_capacity(calls);
    let cpu_start = thread_cpu();
    let wall_start = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
    }
    let wall = wall_start.elapsed();
    let cpu = thread_cpu() - cpu_start;
    samples.sort_unstable();
    Stats {
        p50: samples[calls / 2],
        p99: samples[calls * 99 / 100],
        cpu_per_call: cpu / calls as u32,
        per_second: calls as f64 / wall.as_secs_f64(),
    }
}

fn label(key: &str, value: &str) -> Label {
    Label {
        key: key.into(),
        value: value.into(),
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../example-policies");
    let source = SourceBundle::parse(
        &std::fs::read_to_string(root.join("bundle.toml")).unwrap(),
        &root.join("bundle.toml"),
    )
    .unwrap();
    let engine = PolicyEngine::new(PolicyLimits::default(), None).unwrap();
    let modules = source
        .modules
        .iter()
        .map(|m| {
            let bytes = build_policy_crate(&root.join(&m.name)).expect("example policy builds");
            engine
                .load_module(&m.name, &bytes, m.applies_to.clone())
                .unwrap()
        })
        .collect();
    // Direct calls use the set; the pool row goes through `active` as the gateway does.
    let active = ActivePolicy::new(
        PolicySet::new(
            BundleId {
                name: source.name.clone(),
                version: 1,
            },
            modules,
        ),
        &PolicyLimits::default(),
    );
    let set = active.current();

    let agent = Agent {
        id: "claude-code".into(),
        labels: vec![label("team", "payments")],
    };
    let target = Target {
        name: "prod-db".into(),
        kind: TargetKind::Postgres,
        labels: vec![label("env", "prod")],
    };
    let context = GrantContext {
        grant_id: "g-0123456789abcdef".into(),
        agent: agent.clone(),
        target: target.clone(),
        task: "confirm migration 42 ran".into(),
        access: Access::Read,
        now_unix_ms: 1_700_000_000_000,
    };
    let select = Action::Sql(SqlStatement {
        text: "SELECT id, applied_at FROM schema_migrations WHERE id = 42".into(),
        kind: SqlKind::Select,
        tables_read: vec!["schema_migrations".into()],
        tables_written: vec![],
        functions: vec![],
        locks_rows: false,
    });
    let request = GrantRequest {
        agent,
        target,
        task: "confirm migration 42 ran".into(),
        access: Access::Read,
        ttl_seconds: 600,
        now_unix_ms: 1_700_000_000_000,
    };
    let columns = vec![
        Column {
            name: "id".into(),
            type_name: "int4".into(),
        },
        Column {
            name: "email".into(),
            type_name: "text".into(),
        },
        Column {
            name: "phone".into(),
            type_name: "text".into(),
        },
        Column {
            name: "note".into(),
            type_name: "text".into(),
        },
    ];
    let rows = Rows {
        columns: columns.clone(),
        values: (0..256)
            .map(|i| {
                vec![
                    Some(i.to_string()),
                    Some(format!("user{i}@example.com")),
                    Some(format!("+1 (555) 01{:02}-{:04}", i % 100, i)),
                    Some("shipped on 2026-11-24, all good".to_string()),
                ]
            })
            .collect(),
    };

    assert!(set.check(&context, &select, far()).outcome.is_allow());
    assert!(set.authorize(&request, far()).outcome.is_allow());

    println!(
        "policy benchmark: example bundle ({} modules), fresh instance per call",
        set.modules().len()
    );
    println!(
        "{:<44} {:>9} {:>9} {:>11} {:>12}",
        "operation", "p50", "p99", "cpu/call", "calls/s"
    );
    let report = |name: &str, s: &Stats| {
        println!(
            "{:<44} {:>7.1}µs {:>7.1}µs {:>9.1}µs {:>12.0}",
            name,
            s.p50.as_secs_f64() * 1e6,
            s.p99.as_secs_f64() * 1e6,
            s.cpu_per_call.as_secs_f64() * 1e6,
            s.per_second
        );
    };

    report(
        "check (SQL SELECT, postgres target)",
        &measure(CALLS, || {
            std::hint::black_box(set.check(&context, &select, far()));
        }),
    );
    report(
        "authorize (grant request)",
        &measure(CALLS, || {
            std::hint::black_box(set.authorize(&request, far()));
        }),
    );
    report(
        "mask plan (per row description)",
        &measure(CALLS, || {
            std::hint::black_box(set.mask_plan(&context, &columns, far()).unwrap());
        }),
    );
    let plan = set.mask_plan(&context, &columns, far()).unwrap();
    let mask = measure(MASK_CALLS, || {
        std::hint::black_box(plan.mask_rows(&context, rows.clone(), far()).unwrap());
    });
    report("mask (256-row batch, 3 text columns)", &mask);
    println!(
        "{:<44} {:>7.2}µs",
        "  mask cost per row",
        mask.cpu_per_call.as_secs_f64() * 1e6 / 256.0
    );

    // The same check as the gateway makes it: on the decision pool, awaited from the
    // async runtime. The difference to the direct call is the hand-off.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    report(
        "check on the decision pool (as the gateway)",
        &measure(CALLS, || {
            std::hint::black_box(runtime.block_on(active.check(
                &set,
                context.clone(),
                select.clone(),
            )));
        }),
    );

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            let (set, context, select) = (set.clone(), context.clone(), select.clone());
            std::thread::spawn(move || {
                for _ in 0..CALLS {
                    std::hint::black_box(set.check(&context, &select, far()));
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let per_second = (cores * CALLS) as f64 / started.elapsed().as_secs_f64();
    println!(
        "check throughput, {cores} threads: {per_second:.0} decisions/s ({:.0} per core)",
        per_second / cores as f64
    );
}
