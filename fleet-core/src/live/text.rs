//! The free-text index: every instance's lowercased hostname and IP addresses in one arena.
//!
//! Searching is one `memmem` pass over a contiguous buffer (tens of megabytes at a million
//! instances) instead of a million pointer chases. Entries are separated by `\n`; a needle can
//! contain neither `\n` nor NUL, so a match never spans two entries, and removed entries are
//! overwritten with NUL so they never match. The arena is compacted when more than half of it is
//! dead.

use memchr::memmem;
use roaring::RoaringBitmap;

/// Where one slot's text lives in the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TextRef {
    offset: u32,
    len: u32,
}

impl TextRef {
    pub(crate) const NONE: Self = Self {
        offset: u32::MAX,
        len: 0,
    };
}

#[derive(Debug, Default)]
pub(crate) struct TextIndex {
    arena: Vec<u8>,
    /// (offset, slot) of every entry ever appended since the last compaction, ascending offset.
    owners: Vec<(u32, u32)>,
    dead: usize,
}

/// Arena size above which dead space triggers compaction.
const COMPACT_MIN: usize = 1 << 16;

impl TextIndex {
    /// The text of `r`.
    pub(crate) fn get(&self, r: TextRef) -> &str {
        if r == TextRef::NONE {
            return "";
        }
        let start = r.offset as usize;
        self.arena
            .get(start..start + r.len as usize)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    /// Appends `text` for `slot`. Returns `None` if the arena would exceed 4 GiB, in which case the
    /// slot is not searchable (a limit far above any real fleet: 1 M instances use ~40 MB).
    pub(crate) fn insert(&mut self, slot: u32, text: &str) -> Option<TextRef> {
        let offset = u32::try_from(self.arena.len()).ok()?;
        let len = u32::try_from(text.len()).ok()?;
        offset.checked_add(len)?.checked_add(1)?;
        self.arena.extend_from_slice(text.as_bytes());
        self.arena.push(b'\n');
        self.owners.push((offset, slot));
        Some(TextRef { offset, len })
    }

    /// Forgets `r`; its bytes can never match again.
    pub(crate) fn remove(&mut self, r: TextRef) {
        if r == TextRef::NONE {
            return;
        }
        let start = r.offset as usize;
        if let Some(bytes) = self.arena.get_mut(start..start + r.len as usize) {
            bytes.fill(0);
        }
        self.dead += r.len as usize + 1;
    }

    /// Whether compaction would pay off.
    pub(crate) fn wants_compaction(&self) -> bool {
        self.arena.len() > COMPACT_MIN && self.dead * 2 > self.arena.len()
    }

    /// Rewrites the arena with only the live entries; `refs` yields each live slot's current
    /// reference and receives its new one.
    pub(crate) fn compact<'a>(&mut self, refs: impl Iterator<Item = (u32, &'a mut TextRef)>) {
        let old = std::mem::take(&mut self.arena);
        self.owners.clear();
        self.dead = 0;
        for (slot, r) in refs {
            if *r == TextRef::NONE {
                continue;
            }
            let start = r.offset as usize;
            let text = old.get(start..start + r.len as usize).unwrap_or_default();
            let text = std::str::from_utf8(text).unwrap_or_default();
            *r = self.insert(slot, text).unwrap_or(TextRef::NONE);
        }
    }

    /// Slots whose text contains `needle` (already lowercased). `current` says whether an entry
    /// at an offset is still the slot's live text.
    pub(crate) fn search(&self, needle: &str, current: impl Fn(u32, u32) -> bool) -> RoaringBitmap {
        let mut out = RoaringBitmap::new();
        if needle.is_empty() || needle.bytes().any(|b| b == b'\n' || b == 0) {
            return out;
        }
        let finder = memmem::Finder::new(needle.as_bytes());
        let mut last_entry = usize::MAX;
        for pos in finder.find_iter(&self.arena) {
            let idx = self.owners.partition_point(|&(off, _)| off as usize <= pos);
            let Some(entry) = idx.checked_sub(1) else {
                continue;
            };
            if entry == last_entry {
                continue;
            }
            last_entry = entry;
            let (off, slot) = self.owners[entry];
            if current(slot, off) {
                out.insert(slot);
            }
        }
        out
    }

    /// Bytes of the arena plus the owner table.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.arena.capacity() + self.owners.capacity() * 8
    }
}

impl TextRef {
    pub(crate) fn offset(self) -> u32 {
        self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_insert_remove_compact() {
        let mut t = TextIndex::default();
        let mut refs = [
            t.insert(0, "web-01\n10.0.0.1").unwrap(),
            t.insert(1, "db-01\n10.0.0.2").unwrap(),
            t.insert(2, "web-02").unwrap(),
        ];
        let live = |refs: &[TextRef; 3]| {
            let refs = *refs;
            move |slot: u32, off: u32| refs[slot as usize].offset() == off
        };
        let hits: Vec<u32> = t.search("web", live(&refs)).iter().collect();
        assert_eq!(hits, vec![0, 2]);
        // Separator: "01\n10" never matches across the newline.
        assert!(t.search("0110", live(&refs)).is_empty());
        t.remove(refs[0]);
        refs[0] = TextRef::NONE;
        let hits: Vec<u32> = t.search("web", live(&refs)).iter().collect();
        assert_eq!(hits, vec![2]);
        t.compact(refs.iter_mut().enumerate().map(|(i, r)| (i as u32, r)));
        assert_eq!(t.get(refs[1]), "db-01\n10.0.0.2");
        let hits: Vec<u32> = t.search("10.0.0", live(&refs)).iter().collect();
        assert_eq!(hits, vec![1]);
    }
}
