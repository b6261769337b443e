//! A throwaway PostgreSQL cluster for tests (features `conformance` and `postgres`), started
//! and stopped with `scripts/pg.sh`, the same script people and CI use.
//!
//! [`PgCluster::start`] fails loudly when the PostgreSQL binaries are missing, unless
//! `MUSTER_PG_OPTIONAL=1`, where it returns `None` after saying why on stderr, so a machine
//! without PostgreSQL can still run the rest. The cluster listens on `$MUSTER_PG_HOST`
//! (default 127.0.0.1) and a free port, and is stopped when the handle is dropped, also when
//! the test panics.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A started cluster; dropped = stopped and removed.
pub struct PgCluster {
    /// Holds the cluster directory; removed after the cluster is stopped.
    root: tempfile::TempDir,
    url: String,
}

/// Exit status of `scripts/pg.sh` when the PostgreSQL binaries are not installed.
const BINARIES_MISSING: i32 = 3;

impl PgCluster {
    /// Starts a cluster with an empty database `muster`.
    pub fn start() -> Option<PgCluster> {
        let root = tempfile::Builder::new()
            .prefix("muster-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a directory for PostgreSQL: {e}"));
        // The cluster may run as another user (as root, as `postgres`): it must reach its dir.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", root.path().display()));
        }
        let dir = root.path().join("cluster");
        let output = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| panic!("running scripts/pg.sh: {e}"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.code() == Some(BINARIES_MISSING) {
            if std::env::var("MUSTER_PG_OPTIONAL").as_deref() == Ok("1") {
                eprintln!(
                    "SKIPPED: PostgreSQL is not installed and MUSTER_PG_OPTIONAL=1 ({})",
                    stderr.trim()
                );
                return None;
            }
            panic!(
                "PostgreSQL is not installed ({}): install it (apt-get install postgresql) or \
                 set MUSTER_PG_OPTIONAL=1 to skip the PostgreSQL tests",
                stderr.trim()
            );
        }
        // From here on, dropping the handle stops whatever the script started.
        let mut cluster = PgCluster {
            root,
            url: String::new(),
        };
        assert!(
            output.status.success(),
            "scripts/pg.sh start failed ({}): {stderr}",
            output.status
        );
        cluster.url = String::from_utf8_lossy(&output.stdout).trim().to_string();
        Some(cluster)
    }

    /// The URL of the `muster` database (no TLS options).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of database `name` on this cluster.
    pub fn url_for(&self, name: &str) -> String {
        match self.url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("unexpected cluster URL {}", self.url),
        }
    }

    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        // A file copy keeps the write-ahead log small (what tests search through).
        self.admin(&format!("CREATE DATABASE \"{name}\" STRATEGY = FILE_COPY"))
            .await;
        self.url_for(name)
    }

    /// Runs `sql` on the `postgres` database as the cluster's superuser.
    pub async fn admin(&self, sql: &str) {
        let url = format!("{}?sslmode=disable", self.url_for("postgres"));
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        let task = tokio::spawn(connection);
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        drop(client);
        let _ = task.await;
    }

    /// The self-signed certificate the server presents (for `sslrootcert`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir().join("ca.crt")
    }

    /// The cluster's data directory (what it keeps at rest).
    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// Stops the server now (the directory stays until drop), as an outage would.
    pub fn stop_server(&self) {
        let bin = Command::new("bash")
            .arg("-c")
            .arg("ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let pg_ctl = Path::new(&bin).join("pg_ctl");
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            Command::new(pg_ctl)
        };
        let status = command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .status()
            .unwrap_or_else(|e| panic!("pg_ctl stop: {e}"));
        assert!(status.success(), "pg_ctl stop: {status}");
    }

    fn dir(&self) -> PathBuf {
        self.root.path().join("cluster")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let status = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "scripts/pg.sh stop {} failed: {status:?}",
                self.dir().display()
            );
        }
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg.sh")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
