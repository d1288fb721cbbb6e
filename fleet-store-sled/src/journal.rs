//! The heartbeat journal: an append-only file of heartbeat batches beside the sled database, its
//! record format, and its recovery at open.
//!
//! Each record (format 2) is a 20-byte header and a body:
//!
//! ```text
//! [sync marker: 8 bytes 00 46 4C EE 48 42 4A 02]
//! [body length: u32 LE][crc32 of the body as stored: u32 LE]
//! [crc32 of the 16 bytes before it (marker, length, body crc): u32 LE]
//! [body: the batch (a version byte and postcard), COBS-encoded so it holds no 00 byte]
//! ```
//!
//! The body is [COBS](https://en.wikipedia.org/wiki/Consistent_Overhead_Byte_Stuffing)-encoded
//! (at most one byte added per 254), so the marker, which begins with `00`, can only appear
//! where a record starts — never inside a body, whatever the heartbeats carry. Appending writes
//! one record and calls `fdatasync` once — one fsync per batch, never per heartbeat.
//!
//! Replaying ([`Journal::open`]) reads every record whose two checksums hold. A record that fails
//! them is skipped and the reader resynchronizes on the next marker (from the byte after the
//! failed one), so damage in the middle loses only the records it touches: the header checksum
//! covers the length, so a damaged length is skipped like any other damage, never taken for the
//! end of the file. Only a torn tail — an incomplete record at the end of the file, what a crash
//! in the middle of an append leaves — is reported as torn. Afterwards the file holds exactly
//! the intact records: a torn or damaged tail is cut off; damage in the middle (or a journal in
//! the previous format) makes open rewrite the file — the intact records (copied byte for byte,
//! or framed anew if in the previous format) into a temporary file that is fsynced and renamed
//! over the journal, then the directory is fsynced — so a crash during the rewrite leaves the old file or the new one, both complete,
//! and a later append never lands behind garbage. What recovery found is reported as a
//! [`JournalRecovery`] and logged (`tracing`, warn level when records were skipped).
//!
//! The previous format (version 1: `[length: u32 LE][crc32 of body: u32 LE][body]`, no marker)
//! is still read: its records at the start of the file are replayed and the file is rewritten in
//! format 2. That format cannot resynchronize, so in a damaged version-1 journal what follows
//! the first damaged record is skipped, as the previous version did (it is counted, not
//! replayed). A format-2 file is never taken for version 1: the marker read as a version-1
//! length exceeds the largest record.
//!
//! Once the batches are compacted into sled, the file is truncated to zero. The file is created
//! 0600, and an existing one is set to 0600 at open.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fleet_core::StoreError;
use fleet_core::store::HeartbeatRecord;

use crate::codec::{decode, encode};
use crate::perms;

/// File name of the journal inside the store directory.
pub(crate) const FILE_NAME: &str = "fleet-heartbeats.journal";
/// File name of the journal being rewritten (renamed over [`FILE_NAME`] once complete).
const REWRITE_NAME: &str = "fleet-heartbeats.journal.rewrite";
/// The sync marker every record starts with. It begins with `00`, which a COBS-encoded body
/// never holds; `EE 48` is not UTF-8; read as a version-1 length (little-endian
/// `0xEE4C4600`) it exceeds [`MAX_RECORD`].
const MARKER: [u8; 8] = [0x00, b'F', b'L', 0xEE, b'H', b'B', b'J', 0x02];
/// Bytes of a record header: marker, body length, body crc, header crc.
const HEADER: usize = 20;
/// Largest record body accepted (a larger length means a corrupt header).
const MAX_RECORD: usize = 1 << 30;

/// What replaying the heartbeat journal found when the store was opened; see
/// [`SledStore::journal_recovery`](crate::SledStore::journal_recovery).
///
/// All zero after a clean shutdown ([`SledStore::close`](crate::SledStore::close) empties the
/// journal). After a crash, `records_replayed` counts the batches recovered and a torn tail is
/// normal; `records_skipped` or `bytes_skipped` above zero mean the file was damaged (disk or
/// outside interference) and those heartbeat batches were lost — the instances' next heartbeats
/// restore their state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournalRecovery {
    /// Intact records (heartbeat batches) replayed, including `legacy_records`.
    pub records_replayed: u64,
    /// Of those, records in the previous journal format (version 1), converted to the current one.
    pub legacy_records: u64,
    /// Damaged records skipped (an estimate: each damaged record whose marker survived, plus one
    /// for each damaged stretch that does not start with a marker).
    pub records_skipped: u64,
    /// Bytes of damaged records skipped, torn tail excluded.
    pub bytes_skipped: u64,
    /// Bytes of the incomplete record at the end of the file (an interrupted append), cut off.
    pub torn_tail_bytes: u64,
    /// Whether the journal was rewritten to hold only its intact records (damage before an intact
    /// record, or a version-1 journal); otherwise at most its tail was cut off.
    pub rewritten: bool,
}

#[derive(Debug)]
pub(crate) struct Journal {
    file: File,
    path: PathBuf,
    /// Bytes of valid records in the file.
    pub(crate) len: u64,
}

fn io(path: &Path, e: std::io::Error) -> StoreError {
    crate::file_error("heartbeat journal", path, e)
}

/// Opens a journal file for reading and appending, created 0600, and sets an existing one to 0600.
fn open_file(path: &Path) -> Result<File, StoreError> {
    let mut options = OpenOptions::new();
    options.read(true).append(true).create(true);
    perms::private_file_mode(&mut options);
    let file = options.open(path).map_err(|e| io(path, e))?;
    perms::make_file_private(&file).map_err(|e| io(path, e))?;
    Ok(file)
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// COBS-encodes `data` onto `out`: the result holds no `00` byte. Each block is a code byte
/// `n` and `n - 1` non-zero bytes, followed by an implied `00` unless `n` is `FF` or the block
/// is the last.
fn cobs_encode(data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len() + data.len() / 254 + 1);
    let mut rest = data;
    loop {
        let window = &rest[..rest.len().min(254)];
        match window.iter().position(|&b| b == 0) {
            Some(n) => {
                out.push(n as u8 + 1);
                out.extend_from_slice(&rest[..n]);
                rest = &rest[n + 1..];
            }
            None if window.len() == 254 => {
                out.push(0xff);
                out.extend_from_slice(window);
                rest = &rest[254..];
            }
            None => {
                out.push(window.len() as u8 + 1);
                out.extend_from_slice(window);
                return;
            }
        }
    }
}

/// Decodes what [`cobs_encode`] wrote; `None` if `enc` is not a valid encoding.
fn cobs_decode(enc: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(enc.len());
    let mut i = 0;
    while i < enc.len() {
        let code = usize::from(enc[i]);
        if code == 0 {
            return None;
        }
        let block = enc.get(i + 1..i + code)?;
        if block.contains(&0) {
            return None;
        }
        out.extend_from_slice(block);
        i += code;
        if code < 0xff && i < enc.len() {
            out.push(0);
        }
    }
    Some(out)
}

/// One format-2 record around `body` (an encoded batch).
fn frame(body: &[u8]) -> Option<Vec<u8>> {
    let mut record = Vec::with_capacity(HEADER + body.len() + body.len() / 254 + 1);
    record.extend_from_slice(&MARKER);
    record.extend_from_slice(&[0; HEADER - MARKER.len()]);
    cobs_encode(body, &mut record);
    let len = record.len() - HEADER;
    if len > MAX_RECORD {
        return None;
    }
    let len = u32::try_from(len).ok()?;
    let body_crc = crc32fast::hash(&record[HEADER..]);
    record[8..12].copy_from_slice(&len.to_le_bytes());
    record[12..16].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&record[..16]);
    record[16..20].copy_from_slice(&header_crc.to_le_bytes());
    Some(record)
}

/// What the bytes at a marker hold.
enum Candidate {
    /// An intact record ending at `end`, and its batch.
    Intact {
        end: usize,
        batch: Vec<HeartbeatRecord>,
    },
    /// The header holds, and declares a body running past the end of the file.
    Incomplete,
    /// A checksum or the decoding failed.
    Damaged,
}

/// Reads the format-2 record at `at`, where `bytes` has a full marker.
fn record_at(bytes: &[u8], at: usize) -> Candidate {
    let (Some(len), Some(body_crc), Some(header_crc)) = (
        u32_at(bytes, at + 8),
        u32_at(bytes, at + 12),
        u32_at(bytes, at + 16),
    ) else {
        return Candidate::Incomplete;
    };
    if crc32fast::hash(&bytes[at..at + 16]) != header_crc {
        return Candidate::Damaged;
    }
    let len = len as usize;
    if len > MAX_RECORD {
        return Candidate::Damaged;
    }
    let end = at + HEADER + len;
    let Some(stored) = bytes.get(at + HEADER..end) else {
        return Candidate::Incomplete;
    };
    if crc32fast::hash(stored) != body_crc {
        return Candidate::Damaged;
    }
    let Some(body) = cobs_decode(stored) else {
        return Candidate::Damaged;
    };
    match decode::<Vec<HeartbeatRecord>>(&body, String::new) {
        Ok(batch) => Candidate::Intact { end, batch },
        Err(_) => Candidate::Damaged,
    }
}

/// Reads the version-1 record at `at`: `Ok((end, body, batch))` if intact, `Err(true)` if it
/// runs past the end of the file (torn), `Err(false)` if damaged.
fn legacy_record_at(bytes: &[u8], at: usize) -> Result<(usize, &[u8], Vec<HeartbeatRecord>), bool> {
    let (Some(len), Some(crc)) = (u32_at(bytes, at), u32_at(bytes, at + 4)) else {
        return Err(true);
    };
    let len = len as usize;
    if len > MAX_RECORD {
        return Err(false);
    }
    let end = at + 8 + len;
    let body = bytes.get(at + 8..end).ok_or(true)?;
    if crc32fast::hash(body) != crc {
        return Err(false);
    }
    let batch = decode::<Vec<HeartbeatRecord>>(body, String::new).map_err(|_| false)?;
    Ok((end, body, batch))
}

/// Where the next full marker at or after `from` starts.
fn next_marker(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    loop {
        at += bytes.get(at..)?.iter().position(|&b| b == MARKER[0])?;
        if bytes.get(at..at + MARKER.len())? == MARKER {
            return Some(at);
        }
        at += 1;
    }
}

/// How a record kept by recovery is written back if the file is rewritten.
enum Kept {
    /// A format-2 record: these bytes of the file, as they are.
    Raw(std::ops::Range<usize>),
    /// A version-1 record: this range of the file is its body, framed anew.
    Legacy(std::ops::Range<usize>),
}

/// The result of scanning a journal's bytes.
struct Scan {
    batches: Vec<Vec<HeartbeatRecord>>,
    kept: Vec<Kept>,
    /// End of the last intact record: the file is cut there if nothing else changes.
    valid_end: usize,
    /// Whether damaged bytes precede an intact record (the file must be rewritten).
    gap_inside: bool,
    recovery: JournalRecovery,
}

impl Scan {
    /// Counts `bytes` as skipped damage.
    fn skip(&mut self, bytes: &[u8]) {
        let mut markers = 0;
        let mut at = 0;
        while let Some(m) = next_marker(bytes, at) {
            markers += 1;
            at = m + 1;
        }
        let headless = u64::from(!bytes.starts_with(&MARKER));
        self.recovery.records_skipped += markers + headless;
        self.recovery.bytes_skipped += bytes.len() as u64;
    }
}

/// Whether `tail` (what follows the last intact record, up to the end of the file) is the
/// beginning of a format-2 record cut short.
fn is_torn(tail: &[u8]) -> bool {
    if tail.len() < MARKER.len() {
        return MARKER.starts_with(tail);
    }
    tail.starts_with(&MARKER) && matches!(record_at(tail, 0), Candidate::Incomplete)
}

/// Reads every intact record of a journal's bytes, in order.
fn scan(bytes: &[u8]) -> Scan {
    let mut s = Scan {
        batches: Vec::new(),
        kept: Vec::new(),
        valid_end: 0,
        gap_inside: false,
        recovery: JournalRecovery::default(),
    };
    // Version-1 records, at the start of a journal the previous version wrote.
    let mut legacy_torn = false;
    while !bytes[s.valid_end..].starts_with(&MARKER) {
        match legacy_record_at(bytes, s.valid_end) {
            Ok((end, body, batch)) => {
                let start = end - body.len();
                s.kept.push(Kept::Legacy(start..end));
                s.batches.push(batch);
                s.recovery.legacy_records += 1;
                s.valid_end = end;
            }
            Err(torn) => {
                legacy_torn = torn && s.recovery.legacy_records > 0;
                break;
            }
        }
    }
    let legacy_end = s.valid_end;
    let mut from = s.valid_end;
    while let Some(at) = next_marker(bytes, from) {
        match record_at(bytes, at) {
            Candidate::Intact { end, batch } => {
                if at > s.valid_end {
                    s.gap_inside = true;
                    let gap = &bytes[s.valid_end..at];
                    s.skip(gap);
                }
                s.kept.push(Kept::Raw(at..end));
                s.batches.push(batch);
                s.valid_end = end;
                from = end;
            }
            Candidate::Incomplete | Candidate::Damaged => from = at + 1,
        }
    }
    let tail = &bytes[s.valid_end..];
    if !tail.is_empty() {
        if is_torn(tail) || (legacy_torn && s.valid_end == legacy_end) {
            s.recovery.torn_tail_bytes = tail.len() as u64;
        } else {
            s.skip(tail);
        }
    }
    s.recovery.records_replayed = s.batches.len() as u64;
    s
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and replays it: the batches of every intact record,
    /// in order, and what recovery found. Afterwards the file holds exactly the intact records,
    /// in the current format (see the module docs).
    pub(crate) fn open(
        dir: &Path,
    ) -> Result<(Self, Vec<Vec<HeartbeatRecord>>, JournalRecovery), StoreError> {
        let path = dir.join(FILE_NAME);
        let rewrite = dir.join(REWRITE_NAME);
        // A rewrite that a crash interrupted before its rename: the journal itself is intact.
        match std::fs::remove_file(&rewrite) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&rewrite, e)),
            _ => {}
        }
        let mut file = open_file(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io(&path, e))?;
        let Scan {
            batches,
            kept,
            valid_end,
            gap_inside,
            mut recovery,
        } = scan(&bytes);
        let len = if gap_inside || recovery.legacy_records > 0 {
            let mut out = Vec::with_capacity(valid_end);
            for k in kept {
                match k {
                    Kept::Raw(r) => out.extend_from_slice(&bytes[r]),
                    Kept::Legacy(r) => out.extend(
                        frame(&bytes[r])
                            .ok_or_else(|| io(&path, std::io::ErrorKind::InvalidData.into()))?,
                    ),
                }
            }
            drop(file);
            file = replace(dir, &rewrite, &path, &out)?;
            recovery.rewritten = true;
            out.len()
        } else {
            if valid_end < bytes.len() {
                file.set_len(valid_end as u64).map_err(|e| io(&path, e))?;
                file.sync_all().map_err(|e| io(&path, e))?;
            }
            valid_end
        };
        log(&path, &recovery);
        Ok((
            Self {
                file,
                path,
                len: len as u64,
            },
            batches,
            recovery,
        ))
    }

    /// Appends one batch durably (one write, one `fdatasync`). On failure the file is cut back
    /// to its last intact record, so a later append does not follow a partial one.
    pub(crate) fn append(&mut self, batch: &[HeartbeatRecord]) -> Result<(), StoreError> {
        let body = encode(&batch)?;
        let record =
            frame(&body).ok_or_else(|| io(&self.path, std::io::ErrorKind::InvalidInput.into()))?;
        let written = self
            .file
            .write_all(&record)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Best effort: if this fails too, the next open skips the partial record.
            let _ = self.file.set_len(self.len);
            return Err(io(&self.path, e));
        }
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

/// Replaces the journal at `path` with `content`, crash-safely: written to `tmp` (0600), fsynced,
/// renamed over `path`, directory fsynced. Returns the new journal, open for appending.
fn replace(dir: &Path, tmp: &Path, path: &Path, content: &[u8]) -> Result<File, StoreError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    perms::private_file_mode(&mut options);
    let mut f = options.open(tmp).map_err(|e| io(tmp, e))?;
    perms::make_file_private(&f).map_err(|e| io(tmp, e))?;
    f.write_all(content).map_err(|e| io(tmp, e))?;
    f.sync_all().map_err(|e| io(tmp, e))?;
    drop(f);
    std::fs::rename(tmp, path).map_err(|e| io(path, e))?;
    perms::sync_dir(dir).map_err(|e| io(dir, e))?;
    open_file(path)
}

/// Logs what recovery found: a warning if records were skipped.
fn log(path: &Path, r: &JournalRecovery) {
    let path = path.display();
    if r.records_skipped > 0 || r.bytes_skipped > 0 {
        tracing::warn!(
            %path,
            records_replayed = r.records_replayed,
            records_skipped = r.records_skipped,
            bytes_skipped = r.bytes_skipped,
            torn_tail_bytes = r.torn_tail_bytes,
            legacy_records = r.legacy_records,
            rewritten = r.rewritten,
            "heartbeat journal damaged: skipped the damaged records, replayed the intact ones"
        );
    } else if r.torn_tail_bytes > 0 || r.legacy_records > 0 {
        tracing::info!(
            %path,
            records_replayed = r.records_replayed,
            torn_tail_bytes = r.torn_tail_bytes,
            legacy_records = r.legacy_records,
            rewritten = r.rewritten,
            "heartbeat journal recovered (an interrupted append cut off, or the previous format converted)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_core::{InstanceId, Timestamp};
    use proptest::prelude::*;
    use std::ops::Range;

    fn rec(n: u128) -> HeartbeatRecord {
        HeartbeatRecord {
            id: InstanceId::from_u128(n),
            last_seen: Timestamp::from_unix_secs(n as i64),
            metrics: None,
            apps: None,
        }
    }

    /// Batch `i` of a test journal: distinct, and of varied sizes.
    fn batch(i: u128) -> Vec<HeartbeatRecord> {
        (0..1 + i % 4).map(|k| rec(i * 10 + k)).collect()
    }

    fn path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join(FILE_NAME)
    }

    /// A journal of batches `0..n` appended one by one; its bytes and the range of each record.
    fn journal_of(n: u128) -> (Vec<u8>, Vec<Range<usize>>) {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, replayed, _) = Journal::open(dir.path()).unwrap();
        assert!(replayed.is_empty());
        let mut ranges = Vec::new();
        for i in 0..n {
            let start = j.len as usize;
            j.append(&batch(i)).unwrap();
            ranges.push(start..j.len as usize);
        }
        drop(j);
        (std::fs::read(path(&dir)).unwrap(), ranges)
    }

    /// Opens `damaged` (the journal `original`, with records at `ranges`, damaged) and checks
    /// that exactly the records whose bytes it left as they were are replayed, in order; that the
    /// file then holds those records only; and that a later append survives the next open.
    fn check_recovery(
        original: &[u8],
        damaged: &[u8],
        ranges: &[Range<usize>],
        why: &str,
    ) -> JournalRecovery {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(&dir), damaged).unwrap();
        let intact: Vec<_> = (0..ranges.len())
            .filter(|&i| damaged.get(ranges[i].clone()) == Some(&original[ranges[i].clone()]))
            .map(|i| batch(i as u128))
            .collect();
        let (mut j, replayed, recovery) = Journal::open(dir.path()).unwrap();
        assert_eq!(replayed, intact, "{why}: every intact record is replayed");
        assert_eq!(recovery.records_replayed, intact.len() as u64, "{why}");
        assert_eq!(
            std::fs::metadata(path(&dir)).unwrap().len(),
            j.len,
            "{why}: the file holds the intact records only"
        );
        j.append(&[rec(999_999)]).unwrap();
        drop(j);
        let (_, again, second) = Journal::open(dir.path()).unwrap();
        let mut expected = intact;
        expected.push(vec![rec(999_999)]);
        assert_eq!(again, expected, "{why}: a later append survives");
        assert_eq!(
            second,
            JournalRecovery {
                records_replayed: expected.len() as u64,
                ..JournalRecovery::default()
            },
            "{why}: the recovered file is clean"
        );
        recovery
    }

    #[test]
    fn append_replay_and_torn_tail() {
        let (bytes, ranges) = journal_of(3);
        let clean = check_recovery(&bytes, &bytes, &ranges, "clean");
        assert_eq!(
            clean,
            JournalRecovery {
                records_replayed: 3,
                ..JournalRecovery::default()
            },
            "a clean journal reports nothing else"
        );
        // A crash in the middle of the next append leaves a prefix of a record, of any length.
        let next = frame(&encode(&batch(3)).unwrap()).unwrap();
        for cut in 1..next.len() {
            let mut torn = bytes.clone();
            torn.extend_from_slice(&next[..cut]);
            let why = format!("torn at {cut}");
            let r = check_recovery(&bytes, &torn, &ranges, &why);
            assert_eq!(r.torn_tail_bytes, cut as u64, "{why}");
            assert_eq!((r.records_skipped, r.bytes_skipped), (0, 0), "{why}");
            assert!(!r.rewritten, "{why}: a torn tail is cut off, not rewritten");
        }
    }

    /// The attack: damage at any offset of a journal of many records — a flipped byte, an
    /// overwritten range, a damaged length — loses only the records it touches; every record
    /// after it is still replayed (the previous format stopped at the first damage and cut the
    /// file there, destroying them).
    #[test]
    fn damage_anywhere_loses_only_the_damaged_records() {
        let (bytes, ranges) = journal_of(40);
        let n = bytes.len();
        for at in (0..n).step_by(3).chain([n - 1]) {
            let flip = [0x01, 0x80, 0xff][at % 3];
            let mut b = bytes.clone();
            b[at] ^= flip;
            let why = format!("byte {at} ^ {flip:#x}");
            let r = check_recovery(&bytes, &b, &ranges, &why);
            assert!(
                r.records_skipped >= 1 && r.bytes_skipped > 0,
                "{why}: {r:?}"
            );
            assert!(r.records_replayed >= 39, "{why}: {r:?}");
            assert_eq!(r.torn_tail_bytes, 0, "{why}: damage is not a torn tail");
        }
        for at in (0..n).step_by(29) {
            for (len, fill) in [(5, 0x00), (64, 0xa5), (300, 0x00)] {
                let end = (at + len).min(n);
                let mut b = bytes.clone();
                b[at..end].fill(fill);
                check_recovery(&bytes, &b, &ranges, &format!("{at}..{end} = {fill:#x}"));
            }
        }
        // A damaged length: smaller, larger, huge, zero.
        for (i, r) in ranges.iter().enumerate() {
            let len = u32_at(&bytes, r.start + 8).unwrap();
            for bad in [len - 1, len + 1, len + 1000, u32::MAX, 0] {
                let mut b = bytes.clone();
                b[r.start + 8..r.start + 12].copy_from_slice(&bad.to_le_bytes());
                let why = format!("record {i}: length {len} -> {bad}");
                let rec = check_recovery(&bytes, &b, &ranges, &why);
                assert_eq!(rec.records_replayed, 39, "{why}");
                assert_eq!(rec.records_skipped, 1, "{why}");
                assert_eq!(rec.bytes_skipped, r.len() as u64, "{why}");
                assert_eq!(
                    rec.torn_tail_bytes, 0,
                    "{why}: a damaged length is not a torn tail"
                );
            }
        }
    }

    /// Damage in the middle is skipped and the torn tail is still cut off: both are reported.
    #[test]
    fn damage_and_torn_tail_together() {
        let (bytes, ranges) = journal_of(10);
        let mut b = bytes.clone();
        let mid = ranges[4].start + HEADER + 1;
        b[mid] ^= 0x55;
        let next = frame(&encode(&batch(10)).unwrap()).unwrap();
        b.extend_from_slice(&next[..next.len() - 3]);
        let r = check_recovery(&bytes, &b, &ranges, "middle and tail");
        assert_eq!(r.records_skipped, 1);
        assert_eq!(r.bytes_skipped, ranges[4].len() as u64);
        assert_eq!(r.torn_tail_bytes, next.len() as u64 - 3);
        assert!(r.rewritten);
    }

    /// A batch that carries a well-formed record (marker, checksums and all) is never replayed as
    /// that record, even when damage to its own header makes the reader resynchronize.
    #[test]
    fn a_record_inside_a_body_is_not_replayed() {
        let forged = frame(&encode(&vec![rec(666)]).unwrap()).unwrap();
        // postcard ignores what follows the value: the carrier decodes, forged record and all.
        let mut body = encode(&vec![rec(1)]).unwrap();
        body.extend_from_slice(&forged);
        let record = frame(&body).unwrap();
        assert!(
            !record[HEADER..].windows(MARKER.len()).any(|w| w == MARKER),
            "the marker never appears inside a body"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(&dir), &record).unwrap();
        let (_, replayed, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(replayed, vec![vec![rec(1)]], "the carrier itself is intact");
        let mut damaged = record.clone();
        damaged[9] ^= 0x40; // its length: the reader must resync
        std::fs::write(path(&dir), &damaged).unwrap();
        let (_, replayed, r) = Journal::open(dir.path()).unwrap();
        assert!(replayed.is_empty(), "{replayed:?}");
        assert_eq!(
            (r.records_skipped, r.bytes_skipped),
            (1, record.len() as u64)
        );
    }

    fn legacy(batch: &[HeartbeatRecord]) -> Vec<u8> {
        let body = encode(&batch).unwrap();
        let mut r = (body.len() as u32).to_le_bytes().to_vec();
        r.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        r.extend_from_slice(&body);
        r
    }

    /// A journal written by the previous version is replayed and converted.
    #[test]
    fn a_version_1_journal_is_replayed_and_converted() {
        let dir = tempfile::tempdir().unwrap();
        let mut old: Vec<u8> = (0..5).flat_map(|i| legacy(&batch(i))).collect();
        // With its own torn tail.
        let next = legacy(&batch(5));
        old.extend_from_slice(&next[..next.len() - 2]);
        std::fs::write(path(&dir), &old).unwrap();
        let (mut j, replayed, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(replayed, (0..5).map(batch).collect::<Vec<_>>());
        assert_eq!((r.records_replayed, r.legacy_records), (5, 5));
        assert_eq!(r.torn_tail_bytes, next.len() as u64 - 2);
        assert!(r.rewritten);
        j.append(&batch(6)).unwrap();
        drop(j);
        let bytes = std::fs::read(path(&dir)).unwrap();
        assert!(bytes.starts_with(&MARKER), "converted to format 2");
        let (_, replayed, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(replayed, [0, 1, 2, 3, 4, 6].map(batch).to_vec());
        assert_eq!((r.legacy_records, r.rewritten), (0, false));

        // Damage in a version-1 journal: that format cannot resync, what follows is skipped.
        let dir = tempfile::tempdir().unwrap();
        let mut old: Vec<u8> = (0..4).flat_map(|i| legacy(&batch(i))).collect();
        let first = legacy(&batch(0)).len();
        old[first + 9] ^= 1;
        std::fs::write(path(&dir), &old).unwrap();
        let (_, replayed, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(replayed, vec![batch(0)]);
        assert_eq!(r.records_skipped, 1);
        assert_eq!(r.bytes_skipped, (old.len() - first) as u64);
    }

    /// A rewrite a crash interrupted (its temporary file left behind) changes nothing.
    #[test]
    fn an_interrupted_rewrite_is_discarded() {
        let (bytes, ranges) = journal_of(3);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(&dir), &bytes).unwrap();
        std::fs::write(dir.path().join(REWRITE_NAME), &bytes[..10]).unwrap();
        let (_, replayed, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(replayed.len(), ranges.len());
        assert_eq!(r.records_replayed, 3);
        assert!(!dir.path().join(REWRITE_NAME).exists());
    }

    #[test]
    fn cobs_round_trip() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            vec![1; 253],
            vec![1; 254],
            vec![1; 255],
            [vec![1; 254], vec![0]].concat(),
            (0..=255).cycle().take(2000).collect(),
        ];
        for c in cases {
            let mut enc = Vec::new();
            cobs_encode(&c, &mut enc);
            assert!(!enc.contains(&0), "{c:?}");
            assert_eq!(cobs_decode(&enc).as_deref(), Some(&c[..]));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// COBS round-trips any bytes (zeros dense or sparse, long runs) and never emits `00`.
        #[test]
        fn cobs_round_trips_anything(
            data in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>(), 1u8..], 0..2000),
        ) {
            let mut enc = Vec::new();
            cobs_encode(&data, &mut enc);
            prop_assert!(!enc.contains(&0));
            prop_assert!(enc.len() <= data.len() + data.len() / 254 + 1);
            prop_assert_eq!(cobs_decode(&enc), Some(data));
        }

        /// Random damage (bytes set at random offsets, and perhaps a range overwritten) in a
        /// journal of random length: exactly the records it leaves untouched are replayed.
        #[test]
        fn random_damage_spares_intact_records(
            n in 1u128..30,
            hits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            range in proptest::option::of((any::<prop::sample::Index>(), 1usize..200, any::<u8>())),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let (bytes, ranges) = journal_of(n);
            let mut b = bytes.clone();
            for (i, v) in hits {
                let at = i.index(b.len());
                b[at] = v;
            }
            if let Some((i, len, v)) = range {
                let at = i.index(b.len());
                let end = (at + len).min(b.len());
                b[at..end].fill(v);
            }
            if let Some(i) = cut {
                // Cut inside the last record: a torn tail on top of the damage.
                let last = ranges[ranges.len() - 1].clone();
                b.truncate(last.start + 1 + i.index(last.len() - 1));
            }
            check_recovery(&bytes, &b, &ranges, "random damage");
        }
    }
}
