//! # fleet-store-sled
//!
//! The embedded, crash-safe default store of fleet, on [sled](https://docs.rs/sled) 0.34: one
//! control-plane process keeps its whole fleet on local disk with no other service to run.
//!
//! ```no_run
//! use fleet_core::Fleet;
//! use fleet_store_sled::SledStore;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SledStore::open("./fleet-data/db").await?;
//! // The key that seals the CA key in the store; kept outside it (see fleet_core::seal).
//! let kek = fleet_core::seal::KeyEncryptionKey::parse(&std::fs::read_to_string("./fleet-data/ca.kek")?)?;
//! let fleet = Fleet::builder(store).key_encryption_key(kek).open().await?; // rebuilds the live view
//! # Ok(()) }
//! ```
//!
//! ## Guarantees
//!
//! - Every durable write (registration, enrollment, token change, tag/group edit, certificate
//!   change, deregistration) is one sled transaction across all the trees it touches, flushed to
//!   disk before the call returns. Enrollment checks the token, counts the use, creates the
//!   instance, records its serial and the ledger entry in one multi-tree transaction.
//! - Heartbeats arrive in batches ([`Fleet::flush_heartbeats`](fleet_core::Fleet::flush_heartbeats),
//!   once per flush interval, latest per instance). A batch is appended to a **journal** file
//!   beside the database as one checksummed record — one write and one fsync per batch, never one
//!   per heartbeat — and merged into an in-memory overlay that reads consult. When the journal
//!   reaches [`JOURNAL_MAX_BYTES`] (or the overlay [`OVERLAY_MAX`] instances) the overlay is
//!   compacted into the per-instance `state` tree, once per instance however often it
//!   heartbeated, and the journal is emptied; opening a store replays what is left into the
//!   overlay.
//!   A crash loses at most the heartbeats since the last flush.
//! - Damage to the journal loses only the batches it touches: a record that fails its checksums
//!   is skipped and replay resynchronizes on the next record (see "Heartbeat journal" below);
//!   [`SledStore::journal_recovery`] reports what was skipped, also logged as a warning.
//! - Secondary indexes — token → ledger, token+key → enrollment (retry window), serial →
//!   instance — are maintained in the same transaction as the record they index.
//! - sled calls block; every one runs on tokio's blocking pool, never on an async worker.
//!
//! ## Layout
//!
//! Every value is a format-version byte and a postcard body; keys scanned in order are big-endian.
//! Beside sled's files, `fleet-heartbeats.journal` holds heartbeat batches not yet compacted
//! (see "Heartbeat journal").
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | `format`, `seq`, `ca` | store format; last change-feed sequence number; CA material |
//! | `instances` | instance id (16 bytes) | the durable record (as registered, with later edits) |
//! | `state` | first 2 bytes of the instance id | last seen, latest metrics, apps of the instances in that page (compacted from the journal) |
//! | `feed` | sequence number (u64 BE) | change-feed entry |
//! | `tokens` | token id | registration token (secret hash only) |
//! | `ledger` | token id + u64 BE | ledger entry, in insertion order |
//! | `enrollments` | token id + key fingerprint | (instance, time) of the last enrollment |
//! | `serials` | serial (16 bytes) | instance id |
//! | `revoked` | serial | revoked certificate |
//! | `history` | time (u64 BE, sign flipped) + instance id + statuses | status change (alerts, uptime) |
//! | `history_by_instance` | instance id + `history` key | (index) |
//! | `commands` | command id (16 bytes, time-ordered) | command |
//! | `commands_by_instance` | instance id + command id | (index) |
//! | `commands_open` | instance id + command id | (index of queued and delivered commands) |
//! | `command_keys` | instance id + idempotency key | command id |
//! | `commands_by_batch` | batch id + command id | (index) |
//! | `fleet_alerts` | time (u64 BE, sign flipped) + alert id | fleet-level alert |
//! | `trends` | bucket start (u64 BE, sign flipped) | fleet trend bucket |
//! | `policies` | policy name | compliance policy |
//!
//! ## Heartbeat journal
//!
//! `fleet-heartbeats.journal` is a sequence of records, each a 20-byte header and a body:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | sync marker `00 46 4C EE 48 42 4A 02` |
//! | 4 | body length (u32 LE) |
//! | 4 | CRC-32 of the body as stored (u32 LE) |
//! | 4 | CRC-32 of the 16 bytes before it — marker, length, body CRC (u32 LE) |
//! | length | the batch (format-version byte and postcard), [COBS]-encoded so it holds no `00` byte |
//!
//! The marker begins with `00`, which an encoded body never holds, so it can only appear where
//! a record starts, whatever the heartbeats carry (the header's length and checksums are raw
//! bytes, but the header checksum rules out taking them for a record). Opening a store replays every
//! record whose two checksums hold; a damaged one (a length included, which the header CRC
//! covers) is skipped and replay continues at the next marker. Only an incomplete last record —
//! an append a crash interrupted — counts as a torn tail. The file is then left holding exactly
//! its intact records: a torn or damaged tail is cut off, and damage in the middle makes open
//! rewrite the file (to a temporary file, fsynced, renamed over the journal, directory fsynced;
//! a crash in between leaves the old file or the new, both complete). A journal in the previous
//! format (`[length][CRC-32 of body][body]`, no marker) is replayed and rewritten in this one;
//! that format cannot resynchronize, so what follows a damaged record in it is skipped.
//!
//! [COBS]: https://en.wikipedia.org/wiki/Consistent_Overhead_Byte_Stuffing
//!
//! ## File permissions
//!
//! On Unix the store keeps its files to the user running it. [`SledStore::open`] creates a
//! missing store directory (and missing parents) 0700, creates the journal 0600, and once sled
//! has opened sets every file below the directory to 0600 and every directory below it to 0700,
//! whatever the umask gave them; [`SledStore::close`] does it again. sled creates files later
//! too (snapshots, `blobs/`) with the umask's mode: a 0700 store directory is what keeps other
//! local users from reaching them in between. An existing store directory keeps its mode —
//! whether a more permissive one is acceptable is the caller's decision to check before opening.
//! [`SledStore::backup_to`] creates its destination 0700 (or sets an existing empty one to 0700)
//! and leaves every file of the copy 0600. Symbolic links in the store are left as they are.
//! Elsewhere than Unix none of this applies.
//!
//! ## Backup and restore
//!
//! [`SledStore::backup_to`] writes a consistent copy with sled's own export/import into a new
//! directory; restoring is opening that directory with [`SledStore::open`]. The CA key is in the
//! store (unencrypted): protect the data directory and its backups accordingly.
//!
//! ## Caveats
//!
//! sled 0.34 is stable but frozen upstream, and can use more disk space than the data it holds;
//! see the README's figures. For several control-plane replicas use the PostgreSQL store.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod codec;
mod commands;
mod journal;
mod perms;
mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleet_core::StoreError;

pub use fleet_core;
pub use journal::JournalRecovery;
pub use sled;

use codec::decode;

/// Identifies a sled database as a fleet store (the `meta/format` value).
const FORMAT_MAGIC: &[u8] = b"fleet-store-sled";
/// Version of the tree layout. A store with another layout version is refused at open.
pub const LAYOUT_VERSION: u8 = 1;
/// Change-feed entries kept; older ones are pruned (readers that fall behind reconcile).
pub const FEED_RETENTION: u64 = 1 << 20;
/// The trees of a fleet store.
const TREE_NAMES: [&str; 19] = [
    "commands",
    "commands_by_instance",
    "commands_open",
    "command_keys",
    "commands_by_batch",
    "fleet_alerts",
    "trends",
    "policies",
    "history",
    "history_by_instance",
    "meta",
    "instances",
    "state",
    "feed",
    "tokens",
    "ledger",
    "enrollments",
    "serials",
    "revoked",
];
/// Journal size at which the overlay is compacted into the `state` tree.
pub const JOURNAL_MAX_BYTES: u64 = 128 << 20;
/// Instances in the heartbeat overlay that trigger a compaction (the overlay holds up to this many
/// latest heartbeat states in memory, about 250 bytes each).
pub const OVERLAY_MAX: usize = 1 << 20;

/// Why a store could not be opened. Every variant names the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The path exists and is not a directory.
    #[error("{path}: not a directory (a sled store is a directory)")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The directory holds something that is not a fleet sled store.
    #[error("{path}: not a fleet store ({detail})")]
    Foreign {
        /// The path.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// A fleet store of another layout version.
    #[error(
        "{path}: fleet store layout version {found}, this build reads version {LAYOUT_VERSION}"
    )]
    UnsupportedVersion {
        /// The path.
        path: PathBuf,
        /// The version found.
        found: u8,
    },
    /// sled could not open or recover the database: corruption, or I/O failure.
    #[error("{path}: cannot open the sled database")]
    Sled {
        /// The path.
        path: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// Another process (or a handle in this one that is still open) holds the store.
    #[error("{path}: the store is in use by another process")]
    Locked {
        /// The path.
        path: PathBuf,
    },
    /// sled panicked while reading the database (it does on some corruptions).
    #[error("{path}: the sled database is corrupt ({detail})")]
    Corrupt {
        /// The path.
        path: PathBuf,
        /// The panic message.
        detail: String,
    },
    /// A stored record failed to decode while verifying the store.
    #[error("{path}: invalid record")]
    Record {
        /// The path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: StoreError,
    },
    /// The blocking task running the open was cancelled or panicked.
    #[error("{path}: the open task failed")]
    Task {
        /// The path.
        path: PathBuf,
    },
    /// A file-system operation on the store directory failed: creating it, or making what is in
    /// it private (see "File permissions" in the crate docs).
    #[error("{path}: cannot {action}")]
    Io {
        /// The path the operation failed on (the directory, or a file in it).
        path: PathBuf,
        /// What was attempted.
        action: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub(crate) struct Trees {
    pub(crate) db: sled::Db,
    pub(crate) path: PathBuf,
    pub(crate) meta: sled::Tree,
    pub(crate) instances: sled::Tree,
    pub(crate) state: sled::Tree,
    pub(crate) feed: sled::Tree,
    pub(crate) tokens: sled::Tree,
    pub(crate) ledger: sled::Tree,
    pub(crate) enrollments: sled::Tree,
    pub(crate) serials: sled::Tree,
    pub(crate) revoked: sled::Tree,
    pub(crate) history: sled::Tree,
    pub(crate) history_by_instance: sled::Tree,
    pub(crate) commands: sled::Tree,
    pub(crate) commands_by_instance: sled::Tree,
    pub(crate) commands_open: sled::Tree,
    pub(crate) command_keys: sled::Tree,
    pub(crate) commands_by_batch: sled::Tree,
    pub(crate) fleet_alerts: sled::Tree,
    pub(crate) trends: sled::Tree,
    pub(crate) policies: sled::Tree,
    /// Heartbeat state journaled but not yet compacted into `state`, with the journal file. The
    /// mutex also serializes journal appends with compaction.
    pub(crate) overlay: std::sync::Mutex<store::Overlay>,
    /// What replaying the journal found at open.
    pub(crate) journal_recovery: JournalRecovery,
}

/// The sled store; see the crate docs. Cheap to clone (a handle).
#[derive(Debug, Clone)]
pub struct SledStore {
    pub(crate) trees: Arc<Trees>,
}

/// Figures about an open store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Instances stored.
    pub instances: usize,
    /// Bytes sled reports using on disk.
    pub size_on_disk: u64,
}

fn sled_files_present(dir: &Path) -> bool {
    dir.join("conf").is_file() || dir.join("db").is_file()
}

fn open_blocking(path: &Path) -> Result<Trees, OpenError> {
    let p = || path.to_path_buf();
    if path.exists() {
        if !path.is_dir() {
            return Err(OpenError::NotADirectory { path: p() });
        }
        let non_empty = std::fs::read_dir(path)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if non_empty && !sled_files_present(path) {
            return Err(OpenError::Foreign {
                path: p(),
                detail: "the directory holds other files".into(),
            });
        }
    } else {
        // Created private, so no other local user can enter it, whatever sled creates inside.
        perms::create_private_dir(path).map_err(|source| OpenError::Io {
            path: p(),
            action: "create the store directory (0700)",
            source,
        })?;
    }
    let config = sled::Config::new().path(path).flush_every_ms(Some(500));
    // sled 0.34 panics instead of returning an error on some corrupted files; turn that into an
    // error naming the path rather than taking the process down.
    // A handle dropped a moment ago in this process releases sled's file lock from a background
    // thread: wait a little for it before reporting the store as locked.
    let mut attempts = 0;
    let opened = loop {
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
        match opened {
            Ok(Err(sled::Error::Io(e)))
                if e.to_string().contains("could not acquire lock") && attempts < 40 =>
            {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock") => {
                return Err(OpenError::Locked { path: p() });
            }
            other => break other,
        }
    };
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(source)) => return Err(OpenError::Sled { path: p(), source }),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "sled panicked".into());
            return Err(OpenError::Corrupt { path: p(), detail });
        }
    };
    let tree = |name: &str| {
        db.open_tree(name)
            .map_err(|source| OpenError::Sled { path: p(), source })
    };
    let meta = tree("meta")?;
    let instances = tree("instances")?;
    let state = tree("state")?;
    let feed = tree("feed")?;
    let tokens = tree("tokens")?;
    let ledger = tree("ledger")?;
    let enrollments = tree("enrollments")?;
    let serials = tree("serials")?;
    let revoked = tree("revoked")?;
    let history = tree("history")?;
    let history_by_instance = tree("history_by_instance")?;
    let commands = tree("commands")?;
    let commands_by_instance = tree("commands_by_instance")?;
    let commands_open = tree("commands_open")?;
    let command_keys = tree("command_keys")?;
    let commands_by_batch = tree("commands_by_batch")?;
    let fleet_alerts = tree("fleet_alerts")?;
    let trends = tree("trends")?;
    let policies = tree("policies")?;
    // Verified before the journal is replayed: recovery may rewrite the journal, which must not
    // happen to a store this build refuses.
    verify_format(&db, &meta, path)?;
    let (journal, replayed, journal_recovery) =
        journal::Journal::open(path).map_err(|source| OpenError::Record { path: p(), source })?;
    make_private(path)?;
    let trees = Trees {
        meta,
        instances,
        state,
        feed,
        tokens,
        ledger,
        enrollments,
        serials,
        revoked,
        history,
        history_by_instance,
        commands,
        commands_by_instance,
        commands_open,
        command_keys,
        commands_by_batch,
        fleet_alerts,
        trends,
        policies,
        overlay: std::sync::Mutex::new(store::Overlay::new(journal)),
        journal_recovery,
        path: p(),
        db,
    };
    // Replayed heartbeats stay in the overlay (reads see them) until the next compaction, so
    // opening does not pay for one.
    if let Ok(mut overlay) = trees.overlay.lock() {
        replayed.into_iter().for_each(|b| overlay.merge_batch(b));
    }
    Ok(trees)
}

/// Sets what is inside the store directory to 0600 (files) and 0700 (directories).
fn make_private(path: &Path) -> Result<(), OpenError> {
    perms::make_tree_private(path).map_err(|(path, source)| OpenError::Io {
        path,
        action: "make the store's files private (0600, directories 0700)",
        source,
    })
}

/// Checks (or, on an empty database, writes) the format marker.
fn verify_format(db: &sled::Db, meta: &sled::Tree, path: &Path) -> Result<(), OpenError> {
    let p = || path.to_path_buf();
    let sled_err = |source| OpenError::Sled { path: p(), source };
    match meta.get(b"format").map_err(sled_err)? {
        Some(v) => {
            let (version, magic) = v.split_first().ok_or_else(|| OpenError::Foreign {
                path: p(),
                detail: "empty format marker".into(),
            })?;
            if magic != FORMAT_MAGIC {
                return Err(OpenError::Foreign {
                    path: p(),
                    detail: "unknown format marker".into(),
                });
            }
            if *version != LAYOUT_VERSION {
                return Err(OpenError::UnsupportedVersion {
                    path: p(),
                    found: *version,
                });
            }
            Ok(())
        }
        None => {
            let names = db.tree_names();
            let mut has_data = !db.is_empty();
            for name in names.iter().filter(|n| n.as_ref() != b"__sled__default") {
                let foreign_tree = !TREE_NAMES.iter().any(|o| name.as_ref() == o.as_bytes());
                let tree = db.open_tree(name).map_err(sled_err)?;
                if foreign_tree || !tree.is_empty() {
                    has_data = true;
                }
            }
            if has_data {
                return Err(OpenError::Foreign {
                    path: p(),
                    detail: "a sled database without a fleet format marker".into(),
                });
            }
            let mut marker = vec![LAYOUT_VERSION];
            marker.extend_from_slice(FORMAT_MAGIC);
            meta.insert(b"format", marker).map_err(sled_err)?;
            db.flush().map_err(sled_err)?;
            Ok(())
        }
    }
}

impl SledStore {
    /// Opens (or creates) the store in directory `path`, verifying that it is a fleet store of
    /// this layout version. A file, a foreign directory or a corrupt database is an [`OpenError`]
    /// naming the path, never a panic.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        let path = path.as_ref().to_path_buf();
        let task_path = path.clone();
        let trees = tokio::task::spawn_blocking(move || open_blocking(&task_path))
            .await
            .map_err(|_| OpenError::Task { path })??;
        Ok(Self {
            trees: Arc::new(trees),
        })
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.trees.path
    }

    /// What replaying the heartbeat journal found when this store was opened: records replayed,
    /// damaged records and bytes skipped, the torn tail cut off. Non-zero skipped figures mean
    /// the journal was damaged (see [`JournalRecovery`]); they were also logged as a warning.
    pub fn journal_recovery(&self) -> JournalRecovery {
        self.trees.journal_recovery
    }

    /// Instance count and disk usage.
    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.blocking(|t| {
            Ok(StoreStats {
                instances: t.instances.len(),
                size_on_disk: t.db.size_on_disk().map_err(store::backend)?,
            })
        })
        .await
    }

    /// Prepares for a clean shutdown: compacts the heartbeat journal into the database and
    /// flushes, so the next open has nothing to replay. Call it after the last
    /// [`Fleet::flush_heartbeats`](fleet_core::Fleet::flush_heartbeats); the store stays usable.
    /// Files sled created since the open are set to 0600 (see "File permissions").
    pub async fn close(&self) -> Result<(), StoreError> {
        self.blocking(|t| {
            t.compact_now()?;
            make_tree_private(&t.path)
        })
        .await
    }

    /// Writes a consistent copy of the whole store into the new directory `dest` (sled's
    /// export/import). Restore by opening `dest` with [`SledStore::open`].
    ///
    /// `dest` must not exist or be empty. It is created 0700 (missing parents too) or, if it
    /// exists, set to 0700, and every file of the copy is 0600.
    pub async fn backup_to(&self, dest: impl AsRef<Path>) -> Result<(), StoreError> {
        let dest = dest.as_ref().to_path_buf();
        self.blocking(move |t| {
            if dest.exists()
                && std::fs::read_dir(&dest)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(true)
            {
                return Err(StoreError::Conflict(format!(
                    "backup destination {} is not empty",
                    dest.display()
                )));
            }
            // Private before anything is written into it.
            perms::create_private_dir(&dest)
                .map_err(|e| file_error("cannot create the backup directory", &dest, e))?;
            // Heartbeats still in the journal go into sled first, so the export has them.
            t.compact_now()?;
            let copy = sled::Config::new()
                .path(&dest)
                .open()
                .map_err(store::backend)?;
            copy.import(t.db.export());
            copy.flush().map_err(store::backend)?;
            drop(copy);
            make_tree_private(&dest)
        })
        .await
    }

    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Trees) -> Result<T, StoreError> + Send + 'static,
    {
        let trees = Arc::clone(&self.trees);
        tokio::task::spawn_blocking(move || f(&trees))
            .await
            .map_err(|e| StoreError::Backend {
                backend: "sled",
                source: Box::new(e),
            })?
    }
}

/// An I/O error on a file or directory of the store: the source of a [`StoreError::Backend`].
#[derive(Debug, thiserror::Error)]
#[error("{what} {}", path.display())]
struct FileError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// An I/O error on `path` (`what` names the file's role), as a store error keeping its source.
pub(crate) fn file_error(what: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Backend {
        backend: "sled",
        source: Box::new(FileError {
            what,
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// [`perms::make_tree_private`], as a store error.
fn make_tree_private(dir: &Path) -> Result<(), StoreError> {
    perms::make_tree_private(dir).map_err(|(path, e)| {
        file_error(
            "cannot set the private mode (0600, directories 0700) of",
            &path,
            e,
        )
    })
}

/// Decodes the value of `key` in `tree`, naming both on failure.
pub(crate) fn decode_at<T: serde::de::DeserializeOwned>(
    tree: &str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    decode(bytes, || format!("{tree}/{}", hex(key)))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
