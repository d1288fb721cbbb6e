//! A PostgreSQL for tests (feature `testing`): [`TestDatabase::create`] gives each test a fresh,
//! empty database.
//!
//! Where the server comes from:
//!
//! 1. `FLEET_TEST_DATABASE_URL` (e.g. `postgres://postgres@127.0.0.1/postgres`): a server you run;
//!    each test creates its own database there (and drops it afterwards);
//! 2. otherwise a throwaway server started once per test process from the system binaries
//!    (`initdb` and `postgres` under `/usr/lib/postgresql/*/bin`, or on `PATH`) in a temporary
//!    directory, on a free loopback port, as the `postgres` user when running as root. A watchdog
//!    stops it and deletes its directory as soon as the test process exits. It runs with
//!    `fsync=off` for speed unless `FLEET_TEST_PG_DURABLE` is set (benchmarks set it).
//!
//! When neither works the tests fail — never skip — with a message saying how to install
//! PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::Connection;

/// Why no test database could be had.
#[derive(Debug, thiserror::Error)]
pub enum TestDbError {
    /// No server binaries and no `FLEET_TEST_DATABASE_URL`.
    #[error(
        "no PostgreSQL for the tests: set FLEET_TEST_DATABASE_URL to a server, or install one \
         (Debian/Ubuntu: `apt-get install -y postgresql`; the tests start a throwaway server from \
         /usr/lib/postgresql/*/bin themselves): {0}"
    )]
    NotAvailable(String),
    /// The server or the database could not be prepared.
    #[error("preparing the test database failed: {0}")]
    Setup(String),
}

/// A throwaway server: its admin URL. The watchdog owns its lifetime.
#[derive(Debug)]
struct Server {
    admin_url: String,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists() && p.join("postgres").exists())
        .collect();
    found.sort();
    found.pop()
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

/// `cmd` as the unprivileged `postgres` user when we are root (PostgreSQL refuses to run as root).
fn as_server_user(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// Starts the throwaway server, trying again on a fresh port if another process took the one it
/// picked first (ports are chosen free but can be taken before the server binds them).
fn start_server() -> Result<Server, String> {
    let mut last = String::new();
    for _ in 0..3 {
        match start_server_once() {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Whether the server in `data` is ours and listening on `port` (its pid file says so), so a
/// ready answer on the port is not another process's server.
fn serves_port(data: &Path, port: u16) -> bool {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|pid| pid.lines().nth(3).map(|l| l.trim() == port.to_string()))
        .unwrap_or(false)
}

fn start_server_once() -> Result<Server, String> {
    let bin = bin_dir().ok_or("no initdb/postgres under /usr/lib/postgresql/*/bin")?;
    let root = is_root();
    let dir = tempfile::Builder::new()
        .prefix("fleet-pg-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let data = dir.join("data");
    if root {
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir))?;
    }
    run(as_server_user(&bin.join("initdb"), root)
        .args(["-D"])
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        .stdout(Stdio::null()))?;
    let port = free_port()?;
    // The watchdog: runs the server, and stops it (and removes its directory) once this process
    // is gone — test harnesses have no "after all tests" hook.
    // Tests trade durability for speed; benchmarks (FLEET_TEST_PG_DURABLE=1) keep the defaults.
    let speed = if std::env::var_os("FLEET_TEST_PG_DURABLE").is_some() {
        ""
    } else {
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    };
    let script = format!(
        "{postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 \
         {speed} -c max_connections=200 \
         > {dir}/server.log 2>&1 & pg=$!; \
         while [ -d /proc/{parent} ] && kill -0 $pg 2>/dev/null; do sleep 0.5; done; \
         kill -INT $pg 2>/dev/null; wait $pg; rm -rf {dir}",
        postgres = bin.join("postgres").display(),
        data = data.display(),
        dir = dir.display(),
        parent = std::process::id(),
    );
    let mut watchdog = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", &script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    };
    watchdog
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the server: {e}"))?;
    let admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = serves_port(&data, port)
            && Command::new(bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
        if ready {
            return Ok(Server { admin_url });
        }
        if !dir.exists() {
            return Err("the server exited at once (port taken?)".into());
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            return Err(format!("the server did not start within 30 s: {log}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn admin_url() -> Result<String, TestDbError> {
    if let Ok(url) = std::env::var("FLEET_TEST_DATABASE_URL") {
        return Ok(url);
    }
    match SERVER.get_or_init(start_server) {
        Ok(s) => Ok(s.admin_url.clone()),
        Err(e) => Err(TestDbError::NotAvailable(e.clone())),
    }
}

/// A fresh database on the test server, dropped when this guard drops.
#[derive(Debug)]
pub struct TestDatabase {
    /// Connection URL of the database.
    pub url: String,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates an empty database (see the module docs for where the server comes from).
    pub async fn create() -> Result<Self, TestDbError> {
        Self::create_on(&admin_url()?).await
    }

    /// Creates an empty database on the server `admin_url` names (a database URL whose last path
    /// segment is replaced by the new database's name).
    pub async fn create_on(admin_url: &str) -> Result<Self, TestDbError> {
        let admin_url = admin_url.to_owned();
        let name = format!("fleet_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .map_err(|e| TestDbError::Setup(format!("connecting to {admin_url}: {e}")))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .map_err(|e| TestDbError::Setup(format!("CREATE DATABASE: {e}")))?;
        let _ = admin.close().await;
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => return Err(TestDbError::Setup(format!("odd URL {admin_url}"))),
        };
        Ok(Self {
            url,
            name,
            admin_url,
        })
    }

    /// Like [`create`](Self::create), panicking with the message of [`TestDbError`] on failure —
    /// what a test wants.
    #[allow(clippy::panic, reason = "a test helper: failing loudly is its job")]
    pub async fn create_or_panic() -> Self {
        match Self::create().await {
            Ok(db) => db,
            Err(e) => panic!("{e}"),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop can't await; a short-lived thread with its own runtime does the cleanup.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                    let _ = admin.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A server of its own for a test that stops and restarts it (outages). Stopped and deleted when
/// dropped, and by a watchdog if the test process dies first.
#[derive(Debug)]
pub struct DedicatedServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    root: bool,
}

impl DedicatedServer {
    /// Initialises and starts a server from the system binaries (no `FLEET_TEST_DATABASE_URL`
    /// here: the test needs to stop it).
    pub fn start() -> Result<Self, TestDbError> {
        let bin = bin_dir().ok_or_else(|| {
            TestDbError::NotAvailable("no initdb/postgres under /usr/lib/postgresql/*/bin".into())
        })?;
        let root = is_root();
        let dir = tempfile::Builder::new()
            .prefix("fleet-pg-dedicated-")
            .tempdir()
            .map_err(|e| TestDbError::Setup(e.to_string()))?
            .keep();
        let setup = |r: Result<String, String>| r.map(|_| ()).map_err(TestDbError::Setup);
        if root {
            setup(run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)))?;
        }
        setup(run(as_server_user(&bin.join("initdb"), root)
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())))?;
        let port = free_port().map_err(TestDbError::Setup)?;
        let server = Self {
            bin,
            dir,
            port,
            root,
        };
        let watchdog = format!(
            "while [ -d /proc/{parent} ] && [ -d {dir} ]; do sleep 0.5; done; \
             {pg_ctl} -D {dir}/data stop -m immediate >/dev/null 2>&1; rm -rf {dir}",
            parent = std::process::id(),
            dir = server.dir.display(),
            pg_ctl = server.bin.join("pg_ctl").display(),
        );
        let mut w = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", &watchdog]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &watchdog]);
            c
        };
        w.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| TestDbError::Setup(format!("starting the watchdog: {e}")))?;
        server.resume()?;
        Ok(server)
    }

    /// The admin URL (database `postgres`).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self) -> Command {
        let mut c = as_server_user(&self.bin.join("pg_ctl"), self.root);
        c.arg("-D").arg(self.dir.join("data"));
        c
    }

    /// Stops the server now (`pg_ctl stop -m fast`): clients see their connections drop.
    pub fn stop(&self) -> Result<(), TestDbError> {
        run(self.pg_ctl().args(["stop", "-m", "fast", "-w"]))
            .map(|_| ())
            .map_err(TestDbError::Setup)
    }

    /// Starts it (again) and waits until it accepts connections.
    pub fn resume(&self) -> Result<(), TestDbError> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        run(self
            .pg_ctl()
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-o", &options, "-w", "-t", "30", "start"])
            .stdout(Stdio::null()))
        .map(|_| ())
        .map_err(TestDbError::Setup)
    }
}

impl Drop for DedicatedServer {
    fn drop(&mut self) {
        let _ = run(self.pg_ctl().args(["stop", "-m", "immediate"]));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
