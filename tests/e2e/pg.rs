//! A throwaway PostgreSQL 15 cluster on a free loopback port, for the tests.
//!
//! PostgreSQL refuses to run as root, so the cluster belongs to the `postgres` system
//! user. Loopback TCP needs SCRAM-SHA-256; the Unix socket in the cluster's own
//! directory is trusted for the `postgres` superuser that sets the cluster up.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    dir: PathBuf,
    pub port: u16,
}

/// The password the gateway's upstream role `airlock` has.
pub const UPSTREAM_PASSWORD: &str = "upstream-password-for-tests";

fn as_postgres(program: &str, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{BIN}/{program}"))
        .args(args)
        .output()
        .expect("runuser runs")
}

impl Postgres {
    pub fn start() -> Self {
        Self::start_with_tls(None)
    }

    /// A cluster that also offers TLS with this certificate and key.
    pub fn start_tls(cert: &Path, key: &Path) -> Self {
        Self::start_with_tls(Some((cert, key)))
    }

    fn start_with_tls(tls: Option<(&Path, &Path)>) -> Self {
        let dir =
            std::env::temp_dir().join(format!("airlock-pg-{}", airlock::fsperm::random_suffix()));
        std::fs::create_dir(&dir).unwrap();
        assert!(
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(&dir)
                .status()
                .unwrap()
                .success()
        );
        let data = dir.join("data");
        let out = as_postgres(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut ssl = String::new();
        if let Some((cert, key)) = tls {
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                std::fs::copy(from, data.join(to)).unwrap();
                assert!(
                    Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(data.join(to))
                        .status()
                        .unwrap()
                        .success()
                );
            }
            ssl = " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key".into();
        }
        // A port picked free can be taken before the server binds it (tests run in
        // parallel): try a few.
        let mut started = None;
        for _ in 0..5 {
            let port = crate::gateway::free_port();
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c password_encryption=scram-sha-256{ssl}",
                dir.display()
            );
            let log = dir.join("log");
            let out = as_postgres(
                "pg_ctl",
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-o",
                    &options,
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "start",
                ],
            );
            if out.status.success() {
                started = Some(port);
                break;
            }
        }
        let port = started.expect("PostgreSQL started on one of five free ports");
        let pg = Postgres { dir, port };
        pg.psql_super(
            &format!("CREATE ROLE airlock LOGIN PASSWORD '{UPSTREAM_PASSWORD}'"),
            "postgres",
        );
        pg.psql_super("CREATE DATABASE app OWNER airlock", "postgres");
        pg.psql_super(
            "CREATE TABLE users (id int PRIMARY KEY, email text, name text); \
             INSERT INTO users VALUES (1, 'alice@example.com', 'Alice'), (2, 'bob@example.com', 'Bob'); \
             CREATE TABLE schema_migrations (id int PRIMARY KEY, applied_at timestamptz DEFAULT now()); \
             INSERT INTO schema_migrations (id) VALUES (41), (42); \
             ALTER TABLE users OWNER TO airlock; ALTER TABLE schema_migrations OWNER TO airlock;",
            "app",
        );
        pg
    }

    /// Runs SQL as the superuser over the cluster's Unix socket; returns stdout.
    pub fn psql_super(&self, sql: &str, db: &str) -> String {
        let out = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "psql",
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args([
                "-h",
                self.dir.to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-m",
                "immediate",
                "stop",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
