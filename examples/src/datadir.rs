//! The control panel's data directory and process set-up: who else on the machine can read what
//! it writes, and how many connections it can hold.
//!
//! - The data directory is created **0700** and every file the control panel writes in it is
//!   **0600**; the process runs with umask 077, so files created later (sled's snapshots) are
//!   private too.
//! - An existing data directory, or a file in it, that group or others can read is refused at
//!   start, with its path and mode, unless `--insecure-permissions` says otherwise.
//! - The key-encryption key that seals the CA key in the store ([`fleet_core::seal`]) comes from
//!   `FLEET_CA_KEK` (hex; for replicas sharing a database) or from a 0600 file, `ca.kek` in the
//!   data directory by default, made on first start. It is not in the store: a copy of the
//!   store (`data/db`) or a `pg_dump` alone cannot sign.
//! - The soft limit on open files is raised to the hard limit, and the two listeners' connection
//!   caps are fitted under it ([`connection_budget`]), so that neither listener can take the
//!   file descriptors the other needs: thousands of agents do not starve the operator listener,
//!   and a flood of operator connections does not stop agents from reaching theirs.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fleet_core::seal::KeyEncryptionKey;

/// The environment variable that carries the key-encryption key (hex), for replicas.
pub const KEK_ENV: &str = "FLEET_CA_KEK";

/// Makes files this process creates private from now on (umask 077).
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Raises the soft limit on open files to the hard limit; returns the limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return raised.current;
        }
    }
    limit.current
}

/// File descriptors kept out of the listeners' caps for everything else: the store's files, a
/// database pool, the log, the listening sockets and the one a refused operator connection
/// needs for a moment.
pub const RESERVED_FDS: u64 = 64;

/// The connection caps of the two listeners, fitted under the limit on open files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionBudget {
    /// The operator listener's cap.
    pub operator: usize,
    /// The agent listener's cap.
    pub agent: usize,
    /// Whether a cap had to be lowered from what was asked.
    pub lowered: bool,
}

/// Fits the caps asked for under `fd_limit` (`None`: no limit) less [`RESERVED_FDS`] and
/// `extra` (descriptors the process needs besides, such as the client side of demo agents). When
/// both do not fit, the operator listener gets at most a quarter of what is left — a few hundred
/// connections are plenty for operators, and it refuses what is over its cap at once — and the
/// agent listener the rest. Each keeps at least one connection.
pub fn connection_budget(
    fd_limit: Option<u64>,
    extra: u64,
    operator: usize,
    agent: usize,
) -> ConnectionBudget {
    let Some(limit) = fd_limit else {
        return ConnectionBudget {
            operator,
            agent,
            lowered: false,
        };
    };
    let available =
        usize::try_from(limit.saturating_sub(RESERVED_FDS + extra)).unwrap_or(usize::MAX);
    if operator.saturating_add(agent) <= available {
        return ConnectionBudget {
            operator,
            agent,
            lowered: false,
        };
    }
    let op = operator.min(available / 4).max(1);
    let ag = agent.min(available.saturating_sub(op)).max(1);
    ConnectionBudget {
        operator: op,
        agent: ag,
        lowered: true,
    }
}

fn mode_of(path: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(path)
        .with_context(|| format!("reading the mode of {}", path.display()))?
        .permissions()
        .mode()
        & 0o777)
}

/// Creates `dir` 0700 if missing; otherwise checks that neither it nor anything in it (the
/// store's directory included, to a depth of four) is open to group or others. `insecure` turns
/// the refusal into a warning.
pub fn prepare(dir: &Path, insecure: bool) -> Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        // `mode` is filtered by the umask; say exactly what is meant.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", dir.display()))?;
        return Ok(());
    }
    let mut open: Vec<(PathBuf, u32)> = Vec::new();
    collect_open(dir, 4, &mut open)?;
    if open.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = open
        .iter()
        .map(|(p, m)| format!("{} is mode {m:03o}", p.display()))
        .collect();
    if insecure {
        tracing::warn!(
            "{}: group or others can read them (allowed by --insecure-permissions)",
            list.join("; ")
        );
        return Ok(());
    }
    bail!(
        "{}: group or others can read them, and the data directory holds the operator tokens and \
         the key that unseals the CA. Run `chmod 700 {}` and `chmod 600` on those files, or pass \
         --insecure-permissions",
        list.join("; "),
        dir.display()
    )
}

/// Adds `path` and, for a directory, what is in it (to `depth` levels) to `open` when group or
/// others have any access. Symbolic links are not followed.
fn collect_open(path: &Path, depth: u32, open: &mut Vec<(PathBuf, u32)>) -> Result<()> {
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if (meta.is_file() || meta.is_dir()) && mode & 0o077 != 0 {
        open.push((path.to_path_buf(), mode));
    }
    if meta.is_dir() && depth > 0 {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
        {
            let entry = entry.with_context(|| format!("reading {}", path.display()))?;
            collect_open(&entry.path(), depth - 1, open)?;
        }
    }
    Ok(())
}

/// The key-encryption key in the file at `path` (never the environment), made (0600) when
/// missing: the new key of a rotation.
pub fn key_file(path: &Path) -> Result<KeyEncryptionKey> {
    if path.exists() {
        let mode = mode_of(path)?;
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "{} is readable by group or others (mode {:o}); it must be 0600",
                path.display(),
                mode & 0o777
            );
        }
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        return KeyEncryptionKey::parse(&text).with_context(|| path.display().to_string());
    }
    let kek = KeyEncryptionKey::generate()?;
    crate::write_private(path, &format!("{}\n", kek.expose_hex()))?;
    tracing::info!(path = %path.display(), id = %kek.id(), "created a new key-encryption key (0600)");
    Ok(kek)
}

/// The key-encryption key: `FLEET_CA_KEK` if set, else the file at `path`, made (0600) on first
/// start. Returns the key and where it came from, for the log.
pub fn key_encryption_key(path: &Path) -> Result<(KeyEncryptionKey, String)> {
    if let Ok(hex) = std::env::var(KEK_ENV) {
        let kek = KeyEncryptionKey::parse(&hex).context(KEK_ENV)?;
        return Ok((kek, KEK_ENV.to_owned()));
    }
    if path.exists() {
        let mode = mode_of(path)?;
        if mode & 0o077 != 0 {
            bail!(
                "{} is mode {mode:03o}: the key that unseals the CA must be readable by its owner \
                 only (chmod 600 {})",
                path.display(),
                path.display()
            );
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let kek = KeyEncryptionKey::parse(&text).with_context(|| path.display().to_string())?;
        return Ok((kek, path.display().to_string()));
    }
    let kek = KeyEncryptionKey::generate()?;
    crate::write_private(path, &format!("{}\n", kek.expose_hex()))?;
    tracing::info!(path = %path.display(), id = %kek.id(), "created the key-encryption key that seals the CA (0600); back it up apart from the store");
    Ok((kek, path.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_readable_data_directory_is_refused_and_a_new_one_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b");
        prepare(&fresh, false).unwrap();
        assert_eq!(mode_of(&fresh).unwrap(), 0o700);

        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = prepare(&open, false).unwrap_err().to_string();
        assert!(
            err.contains("is mode 755") && err.contains("--insecure-permissions"),
            "{err}"
        );
        prepare(&open, true).unwrap();

        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).unwrap();
        let token = open.join("operator-token");
        std::fs::write(&token, "x").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = prepare(&open, false).unwrap_err().to_string();
        assert!(err.contains("operator-token is mode 644"), "{err}");

        // The store's own directory is checked too.
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let db = open.join("db");
        std::fs::create_dir(&db).unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o700)).unwrap();
        prepare(&open, false).unwrap();
        let file = db.join("db");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = prepare(&open, false).unwrap_err().to_string();
        assert!(err.contains("db/db is mode 644"), "{err}");
    }

    #[test]
    fn the_listeners_caps_fit_under_the_file_limit() {
        let fits = connection_budget(Some(1 << 20), 0, 1024, 10_000);
        assert_eq!(
            (fits.operator, fits.agent, fits.lowered),
            (1024, 10_000, false)
        );
        assert!(!connection_budget(None, 0, 1024, 10_000).lowered);
        // `ulimit -n 256`: 192 left, a quarter of it for operators.
        let low = connection_budget(Some(256), 0, 1024, 10_000);
        assert_eq!((low.operator, low.agent, low.lowered), (48, 144, true));
        assert!(low.operator + low.agent + RESERVED_FDS as usize <= 256);
        // Demo agents' client sockets are kept out too.
        let demo = connection_budget(Some(256), 32, 1024, 10_000);
        assert_eq!(demo.operator + demo.agent, 256 - 64 - 32);
        // Small caps asked for are kept.
        let small = connection_budget(Some(256), 0, 10, 10_000);
        assert_eq!((small.operator, small.agent), (10, 182));
        let tiny = connection_budget(Some(16), 0, 1024, 10_000);
        assert_eq!((tiny.operator, tiny.agent), (1, 1));
    }

    #[test]
    fn the_key_file_is_made_private_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ca.kek");
        let (made, _) = key_encryption_key(&path).unwrap();
        assert_eq!(mode_of(&path).unwrap(), 0o600);
        let (read, _) = key_encryption_key(&path).unwrap();
        assert_eq!(made.id(), read.id());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(key_encryption_key(&path).is_err());
    }
}
