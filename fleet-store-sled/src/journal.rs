//! The heartbeat journal: an append-only file of heartbeat batches beside the sled database.
//!
//! Each record is `[length: u32 LE][crc32 of body: u32 LE][body]`, the body being a version byte
//! and a postcard-encoded batch. Appending writes one record and calls `fdatasync` once — one
//! fsync per batch, never per heartbeat. Replaying reads records until the end of the file or the
//! first torn or corrupt record (what a crash in the middle of an append leaves) and truncates the
//! file there. Once the batches are compacted into sled, the file is truncated to zero.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fleet_core::StoreError;
use fleet_core::store::HeartbeatRecord;

use crate::codec::{decode, encode};

/// File name of the journal inside the store directory.
pub(crate) const FILE_NAME: &str = "fleet-heartbeats.journal";
/// Largest record accepted when replaying (a length beyond it means a corrupt header).
const MAX_RECORD: usize = 1 << 30;

#[derive(Debug)]
pub(crate) struct Journal {
    file: File,
    path: PathBuf,
    /// Bytes of valid records in the file.
    pub(crate) len: u64,
}

fn io(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Backend {
        backend: "sled",
        source: format!("heartbeat journal {}: {e}", path.display()).into(),
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and replays it: the batches of every intact record,
    /// in order. A torn or corrupt tail is cut off.
    pub(crate) fn open(dir: &Path) -> Result<(Self, Vec<Vec<HeartbeatRecord>>), StoreError> {
        let path = dir.join(FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io(&path, e))?;
        let mut batches = Vec::new();
        let mut pos = 0usize;
        while let Some(header) = bytes.get(pos..pos + 8) {
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            let Some(body) = bytes
                .get(pos + 8..pos + 8 + len)
                .filter(|_| len <= MAX_RECORD)
            else {
                break;
            };
            if crc32fast::hash(body) != crc {
                break;
            }
            let Ok(batch) = decode::<Vec<HeartbeatRecord>>(body, String::new) else {
                break;
            };
            batches.push(batch);
            pos += 8 + len;
        }
        if pos < bytes.len() {
            file.set_len(pos as u64).map_err(|e| io(&path, e))?;
            file.sync_all().map_err(|e| io(&path, e))?;
        }
        Ok((
            Self {
                file,
                path,
                len: pos as u64,
            },
            batches,
        ))
    }

    /// Appends one batch durably (one write, one `fdatasync`).
    pub(crate) fn append(&mut self, batch: &[HeartbeatRecord]) -> Result<(), StoreError> {
        let body = encode(&batch)?;
        let len = u32::try_from(body.len())
            .map_err(|_| io(&self.path, std::io::ErrorKind::InvalidInput.into()))?;
        let mut record = Vec::with_capacity(body.len() + 8);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        record.extend_from_slice(&body);
        self.file
            .write_all(&record)
            .map_err(|e| io(&self.path, e))?;
        self.file.sync_data().map_err(|e| io(&self.path, e))?;
        self.len += record.len() as u64;
        Ok(())
    }

    /// Empties the journal once its batches are safely in sled.
    pub(crate) fn clear(&mut self) -> Result<(), StoreError> {
        self.file.set_len(0).map_err(|e| io(&self.path, e))?;
        self.file.sync_all().map_err(|e| io(&self.path, e))?;
        self.len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_core::{InstanceId, Timestamp};

    fn rec(n: u128) -> HeartbeatRecord {
        HeartbeatRecord {
            id: InstanceId::from_u128(n),
            last_seen: Timestamp::from_unix_secs(n as i64),
            metrics: None,
            apps: None,
        }
    }

    #[test]
    fn append_replay_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, replayed) = Journal::open(dir.path()).unwrap();
        assert!(replayed.is_empty());
        j.append(&[rec(1), rec(2)]).unwrap();
        j.append(&[rec(3)]).unwrap();
        let good_len = j.len;
        drop(j);
        // A crash in the middle of the next append leaves a torn record.
        let path = dir.path().join(FILE_NAME);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
        drop(f);
        let (mut j, replayed) = Journal::open(dir.path()).unwrap();
        assert_eq!(replayed, vec![vec![rec(1), rec(2)], vec![rec(3)]]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            good_len,
            "the torn tail is cut off"
        );
        // A flipped bit in a body stops the replay at that record.
        j.clear().unwrap();
        j.append(&[rec(4)]).unwrap();
        j.append(&[rec(5)]).unwrap();
        drop(j);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let (_, replayed) = Journal::open(dir.path()).unwrap();
        assert_eq!(replayed, vec![vec![rec(4)]]);
    }
}
