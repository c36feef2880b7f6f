//! Record and grant benchmark: `cargo bench -p airlock-gateway --bench record`.
//!
//! - Durable audit appends: many concurrent writers, one entry per write, every write
//!   acknowledged only after its group-commit batch is fsynced.
//! - Grant issue latency through the real broker: the example bundle's task-guard
//!   decides (fresh Wasm instance), then the request and decision are recorded
//!   durably, then the grant is returned. Sequential (one agent) and 16 concurrent.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock::grants::{Broker, GrantRequestBody, TargetRecord};
use airlock::keys::SecretKey;
use airlock::policy::{
    ActivePolicy, BundleId, Kind, PolicyEngine, PolicyLimits, PolicySet, Scope, build_policy_crate,
};
use airlock::record::{AuditEvent, EventKind, Record, RecordOptions, Write};

fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort_unstable();
    samples[(samples.len() * p / 100).min(samples.len() - 1)]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    println!("record benchmark: fjall store on {}", dir.path().display());

    // Durable appends.
    for writers in [1usize, 64, 512] {
        let path = dir.path().join(format!("appends-{writers}"));
        let record = Record::open(RecordOptions::new(path), SecretKey::generate()).unwrap();
        let total: usize = if writers == 1 { 2_000 } else { 200_000 };
        let per_writer = total / writers;
        let started = Instant::now();
        runtime.block_on(async {
            let tasks: Vec<_> = (0..writers)
                .map(|w| {
                    let record = record.clone();
                    tokio::spawn(async move {
                        for i in 0..per_writer {
                            let event = AuditEvent::new(EventKind::SqlStatement)
                                .agent("agent-1")
                                .grant("g_0123456789abcdef")
                                .detail(serde_json::json!({ "writer": w, "n": i, "sql": "SELECT id FROM schema_migrations WHERE id = 42" }));
                            record.write_async(Write::event(event)).await.unwrap();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        let elapsed = started.elapsed();
        let n = per_writer * writers;
        println!(
            "durable audit appends, {writers:>3} concurrent writers: {n} entries in {:.2}s = {:.0} entries/s",
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64()
        );
        record.close();
    }

    // Grant issue latency.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../example-policies/task-guard");
    let engine = PolicyEngine::new(PolicyLimits::default(), None).unwrap();
    let module = engine
        .load_module(
            "task-guard",
            &build_policy_crate(&root).unwrap(),
            Scope::everything(),
        )
        .unwrap();
    let policy = Arc::new(ActivePolicy::new(
        PolicySet::new(
            BundleId {
                name: "example".into(),
                version: 1,
            },
            vec![module],
        ),
        &Default::default(),
    ));
    let record = Record::open(
        RecordOptions::new(dir.path().join("grants")),
        SecretKey::generate(),
    )
    .unwrap();
    let target = TargetRecord {
        name: "prod-db".into(),
        kind: Kind::Postgres,
        upstream: "127.0.0.1:5432".into(),
        labels: BTreeMap::from([("env".to_string(), "prod".to_string())]),
        credential: None,
        read_user: None,
        read_credential: None,
        allow_superuser: false,
        end_as: None,
        end_credential: None,
        host_key: None,
        ca: None,
        inject: None,
        record_body_bytes: None,
    };
    let broker = Arc::new(
        Broker::load(
            record,
            policy,
            Arc::new(airlock::proxy::Protocols::builtin()),
            airlock::grants::GrantKey::generate(),
            vec![target],
            Duration::from_secs(3600),
        )
        .unwrap(),
    );
    let agent = runtime
        .block_on(broker.add_agent("agent-1", BTreeMap::new()))
        .unwrap()
        .agent;
    let body = || -> GrantRequestBody {
        serde_json::from_value(serde_json::json!({
            "target": "prod-db", "task": "confirm migration 42 ran", "access": "read", "ttl": "10m"
        }))
        .unwrap()
    };
    for clients in [1usize, 16] {
        let per_client = 2_000 / clients.min(4);
        let started = Instant::now();
        let mut samples: Vec<Duration> = runtime.block_on(async {
            let tasks: Vec<_> = (0..clients)
                .map(|_| {
                    let (broker, agent) = (broker.clone(), agent.clone());
                    tokio::spawn(async move {
                        let mut samples = Vec::with_capacity(per_client);
                        for _ in 0..per_client {
                            let t = Instant::now();
                            let issued = broker.request(&agent, body()).await.unwrap();
                            assert!(issued.secret.is_some());
                            samples.push(t.elapsed());
                        }
                        samples
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        });
        let elapsed = started.elapsed();
        let n = samples.len();
        println!(
            "grant issue (policy + durable record), {clients:>2} concurrent: p50 {:.2} ms, p99 {:.2} ms, {:.0} grants/s",
            percentile(&mut samples, 50).as_secs_f64() * 1e3,
            percentile(&mut samples, 99).as_secs_f64() * 1e3,
            n as f64 / elapsed.as_secs_f64()
        );
    }
}
