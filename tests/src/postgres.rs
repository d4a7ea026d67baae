//! PostgreSQL for the ledger tests: a database of a test's own on the machine's server
//! (SLUICE_TEST_POSTGRES_URL, default the local one that scripts/ensure-postgres.sh makes
//! sure of), or a whole server of the test's own that it can kill and restart. Both are
//! driven with `psql`, which comes with the server.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The machine's server, as the ledger tests reach it.
pub fn postgres_url() -> String {
    std::env::var("SLUICE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Runs SQL with `psql` at `url`; its unaligned, tuples-only output.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", url, "-c", sql])
        .output()
        .expect("psql (installed with PostgreSQL)");
    assert!(
        out.status.success(),
        "psql failed on {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let server = url.rsplit_once('/').map_or(url, |(s, _)| s);
    format!("{server}/{database}")
}

/// A database of a test's own, dropped with it.
pub struct PgDatabase {
    pub url: String,
    name: String,
    server: String,
}

impl PgDatabase {
    /// A fresh database on the machine's server.
    pub fn create() -> PgDatabase {
        PgDatabase::create_on(&postgres_url())
    }

    /// A fresh database on the server at `server_url`.
    pub fn create_on(server_url: &str) -> PgDatabase {
        let name = format!("sluice_e2e_{}", uuid::Uuid::new_v4().simple());
        psql(server_url, &format!("CREATE DATABASE {name}"));
        PgDatabase {
            url: with_database(server_url, &name),
            name,
            server: server_url.to_owned(),
        }
    }

    /// Runs SQL in this database.
    pub fn query(&self, sql: &str) -> String {
        psql(&self.url, sql)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-X", "-q", "-d", &self.server, "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A PostgreSQL server of the test's own on a loopback port (trust auth), which the test
/// can kill and restart with its data.
pub struct OwnPostgres {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Where the server binaries are (Debian keeps them out of PATH).
fn server_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .filter(|d| d.join("postgres").exists())
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (scripts/ensure-postgres.sh installs them)")
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// The server refuses to run as root; as root, it runs as the postgres user.
fn as_server_user(program: PathBuf) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl OwnPostgres {
    pub fn start() -> OwnPostgres {
        let bin = server_bin();
        let dir = tempfile::tempdir().unwrap();
        if running_as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        let status = as_server_user(bin.join("initdb"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "postgres", "--auth=trust", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("initdb");
        assert!(status.success(), "initdb failed");
        let mut server = OwnPostgres {
            port: crate::free_port(),
            bin,
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    /// Starts (or restarts) the server with the data it had.
    pub fn spawn(&mut self) {
        let child = as_server_user(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            // Fast to kill and start: a test server, not a durable one.
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres");
        self.child = Some(child);
        for _ in 0..300 {
            let ready = Command::new("psql")
                .args(["-X", "-At", "-d", &self.url(), "-c", "SELECT 1"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("postgres did not start on {}", self.port);
    }

    /// Kills the server as a crash would: an immediate shutdown (every process ends at
    /// once, nothing is checkpointed; the next start recovers from the WAL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = as_server_user(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.kill();
    }
}
