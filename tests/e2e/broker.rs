//! The broker's live-connection registry and grant authentication, with a test
//! connection type (no protocol gateway exists yet to hold a real one): a task that
//! holds a registered grant until the broker tells it the grant ended.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use airlock::grants::{
    AgentRecord, Broker, GrantAuthError, GrantRequestBody, GrantStatus, TargetRecord,
};
use airlock::keys::SecretKey;
use airlock::policy::ActivePolicy;
use airlock::policy::{BundleId, Kind, PolicySet};
use airlock::record::{Record, RecordOptions};

use crate::support::{engine, load, tempdir};

/// A broker over a real record, with task-guard deciding grants.
fn broker(dir: &std::path::Path) -> Arc<Broker> {
    let engine = engine();
    let guard = load(&engine, "example-policies/task-guard");
    let set = PolicySet::new(
        BundleId {
            name: "t".into(),
            version: 1,
        },
        vec![guard],
    );
    let record =
        Record::open(RecordOptions::new(dir.join("store")), SecretKey::generate()).unwrap();
    let target = |name: &str| TargetRecord {
        name: name.into(),
        kind: Kind::Postgres,
        upstream: "127.0.0.1:5432".into(),
        labels: BTreeMap::new(),
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
    Arc::new(
        Broker::load(
            record,
            Arc::new(ActivePolicy::new(set, &Default::default())),
            Arc::new(airlock::proxy::Protocols::builtin()),
            airlock::grants::GrantKey::generate(),
            vec![target("db-a"), target("db-b")],
            Duration::from_secs(3600),
        )
        .unwrap(),
    )
}

fn request(target: &str, ttl: &str) -> GrantRequestBody {
    serde_json::from_value(serde_json::json!({
        "target": target, "task": "confirm migration 42 ran", "access": "read", "ttl": ttl
    }))
    .unwrap()
}

async fn agent(broker: &Broker) -> AgentRecord {
    broker
        .add_agent("agent-1", BTreeMap::new())
        .await
        .unwrap()
        .agent
}

/// Holds a connection open under a grant until the broker ends it; returns the reason.
fn test_connection(broker: &Broker, id: &str, secret: &str) -> tokio::task::JoinHandle<String> {
    let mut live = broker
        .authenticate_grant(id, secret, "db-a")
        .expect("grant accepted");
    tokio::spawn(async move {
        live.ended
            .changed()
            .await
            .expect("the broker tells the connection");
        live.ended.borrow().clone().unwrap()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_grant_closes_its_connections() {
    let dir = tempdir();
    let broker = broker(dir.path());
    let agent = agent(&broker).await;
    let issued = broker
        .request(&agent, request("db-a", "10m"))
        .await
        .unwrap();
    let (id, secret) = (issued.grant.id.clone(), issued.secret.unwrap());
    let first = test_connection(&broker, &id, &secret);
    let second = test_connection(&broker, &id, &secret);
    assert_eq!(broker.live_connections(&id), 2);

    broker.revoke(&id, "uid:0").await.unwrap();
    for conn in [first, second] {
        let reason = tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .unwrap()
            .unwrap();
        assert!(reason.contains("was revoked"), "{reason}");
    }
    assert_eq!(
        broker.authenticate_grant(&id, &secret, "db-a").err(),
        Some(GrantAuthError::Ended("was revoked".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_closes_connections_and_the_secret_dies() {
    let dir = tempdir();
    let broker = broker(dir.path());
    let agent = agent(&broker).await;
    let issued = broker.request(&agent, request("db-a", "1s")).await.unwrap();
    let (id, secret) = (issued.grant.id.clone(), issued.secret.unwrap());
    let conn = test_connection(&broker, &id, &secret);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Past its window the grant is dead even before the sweep records it.
    assert!(matches!(
        broker.authenticate_grant(&id, &secret, "db-a"),
        Err(GrantAuthError::Ended(_))
    ));
    assert_eq!(broker.expire_due().await, 1);
    let reason = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .unwrap()
        .unwrap();
    assert!(reason.contains("expired"), "{reason}");
    assert_eq!(broker.grant(&id).unwrap().status, GrantStatus::Expired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_opens_only_its_target_with_only_its_secret() {
    let dir = tempdir();
    let broker = broker(dir.path());
    let agent = agent(&broker).await;
    let a = broker
        .request(&agent, request("db-a", "10m"))
        .await
        .unwrap();
    let b = broker
        .request(&agent, request("db-b", "10m"))
        .await
        .unwrap();
    let (id, secret) = (a.grant.id.clone(), a.secret.unwrap());
    assert!(broker.authenticate_grant(&id, &secret, "db-a").is_ok());
    assert_eq!(
        broker.authenticate_grant(&id, &secret, "db-b").err(),
        Some(GrantAuthError::WrongTarget {
            expected: "db-a".into(),
            presented: "db-b".into()
        })
    );
    // The other grant's secret, a wrong secret, an unknown id: all the same refusal.
    for (id, secret) in [
        (id.as_str(), b.secret.as_deref().unwrap()),
        (id.as_str(), "wrong"),
        ("g_0000000000000000", secret.as_str()),
    ] {
        assert_eq!(
            broker.authenticate_grant(id, secret, "db-a").err(),
            Some(GrantAuthError::BadCredentials)
        );
    }
    // Ended by the agent: dead.
    broker.end("agent-1", &id).await.unwrap();
    assert_eq!(
        broker.authenticate_grant(&id, &secret, "db-a").err(),
        Some(GrantAuthError::Ended("was ended".into()))
    );
}
