//! The free-text index: every instance's lowercased hostname and IP addresses in one arena, and
//! the matcher that searches it for a `text:` term's values.
//!
//! An unscoped search is a pass over a contiguous buffer (tens of megabytes at a million
//! instances) instead of a million pointer chases, done a bounded range of entries at a time
//! ([`TextIndex::scan`]) so that no pass holds the view's lock for long; a search among a few
//! instances (one tenant's) reads just their entries ([`TextIndex::bytes`]). Entries are
//! separated by `\n`; a needle can contain neither `\n` nor NUL, so a match never spans two
//! entries, and removed entries are overwritten with NUL so they never match. The arena is
//! compacted when more than half of it is dead; each compaction moves every entry and bumps
//! [`TextIndex::generation`], so that a scan spread over several lock holds notices.

use aho_corasick::AhoCorasick;
use memchr::memmem;

/// What a `text:` term looks for: any of its values as a substring.
///
/// Two ways, chosen by the number of values and the length of the text (measured, one core of
/// the build machine): on one instance's ~30 bytes, a `memmem` search per value costs ~15 ns
/// each and one Aho-Corasick automaton ~40 ns for any number, so the automaton is used from
/// [`AC_PER_INSTANCE`] values on; over the arena, a `memmem` pass costs ~30 ns per KiB per value
/// and the automaton ~2.5 µs per KiB, so passes are used up to [`PASSES_OVER_ARENA`] values.
#[derive(Debug)]
pub(crate) struct TextMatcher {
    /// One per value (empty: nothing can match).
    finders: Vec<memmem::Finder<'static>>,
    /// Built from [`AC_PER_INSTANCE`] values on (`None` also if it could not be built, beyond
    /// its size limits: not reachable with parsed filters, which are limited).
    ac: Option<AhoCorasick>,
}

/// Values from which one instance's text is searched with the automaton.
const AC_PER_INSTANCE: usize = 4;
/// Values up to which the arena is searched a `memmem` pass per value.
const PASSES_OVER_ARENA: usize = 48;

impl TextMatcher {
    /// The matcher for these (lowercased) values; empty values and values with `\n` or NUL are
    /// dropped (they never match).
    pub(crate) fn new(needles: &[String]) -> Self {
        let mut valid: Vec<&[u8]> = needles
            .iter()
            .map(|n| n.as_bytes())
            .filter(|n| !n.is_empty() && !n.iter().any(|&b| b == b'\n' || b == 0))
            .collect();
        valid.sort_unstable();
        valid.dedup();
        let ac = (valid.len() >= AC_PER_INSTANCE)
            .then(|| AhoCorasick::new(&valid).ok())
            .flatten();
        Self {
            finders: valid
                .iter()
                .map(|n| memmem::Finder::new(n).into_owned())
                .collect(),
            ac,
        }
    }

    /// Whether no text can match.
    pub(crate) fn never(&self) -> bool {
        self.finders.is_empty()
    }

    /// Whether `text` (one instance's) contains any of the values.
    pub(crate) fn is_match(&self, text: &[u8]) -> bool {
        match &self.ac {
            Some(ac) => ac.is_match(text),
            None => self.finders.iter().any(|f| f.find(text).is_some()),
        }
    }

    /// Searches `hay` (a range of the arena): calls `hit` with the position of a match, which
    /// answers where to go on (the start of the next entry, so that an entry is reported at most
    /// once per pass however often it matches). With passes, an entry may be reported once per
    /// value, out of order.
    fn search(&self, hay: &[u8], hit: &mut dyn FnMut(usize) -> usize) {
        match &self.ac {
            Some(ac) if self.finders.len() > PASSES_OVER_ARENA => {
                let mut pos = 0;
                while pos < hay.len() {
                    match ac.find(aho_corasick::Input::new(hay).range(pos..)) {
                        Some(m) => pos = hit(m.start()).max(pos + 1),
                        None => break,
                    }
                }
            }
            _ => {
                for f in &self.finders {
                    let mut pos = 0;
                    while let Some(i) = hay.get(pos..).and_then(|h| f.find(h)) {
                        pos = hit(pos + i).max(pos + 1);
                    }
                }
            }
        }
    }

    /// Rough cost of searching one instance's text, in the units of `live::query` (≈ ns).
    pub(crate) fn cost_per_instance(&self) -> u64 {
        match &self.ac {
            Some(_) => 40,
            None => 15 * self.finders.len() as u64,
        }
    }

    /// Rough cost of searching 1 KiB of the arena, in the same units.
    pub(crate) fn cost_per_kib(&self) -> u64 {
        match &self.ac {
            Some(_) if self.finders.len() > PASSES_OVER_ARENA => 2_500,
            _ => 30 * self.finders.len() as u64,
        }
    }
}

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
    /// Compactions so far: entry numbers and offsets of one generation mean nothing in another.
    generation: u64,
}

/// How far a [`TextIndex::scan`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// The entry to continue from ([`TextIndex::entries`] when the arena is done).
    pub(crate) next: usize,
    /// Entries passed over (live or dead).
    pub(crate) entries: usize,
    /// Bytes searched.
    pub(crate) bytes: usize,
    /// Matches reported.
    pub(crate) hits: usize,
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

    /// The text of `r`, as bytes (no UTF-8 check: what a matcher reads).
    pub(crate) fn bytes(&self, r: TextRef) -> &[u8] {
        if r == TextRef::NONE {
            return &[];
        }
        let start = r.offset as usize;
        self.arena
            .get(start..start + r.len as usize)
            .unwrap_or_default()
    }

    /// Entries appended since the last compaction (live or dead).
    pub(crate) fn entries(&self) -> usize {
        self.owners.len()
    }

    /// Bytes of the arena.
    pub(crate) fn len(&self) -> usize {
        self.arena.len()
    }

    /// Average bytes per entry (separator included; at least 1).
    pub(crate) fn entry_bytes(&self) -> usize {
        (self.arena.len() / self.owners.len().max(1)).max(1)
    }

    /// Compactions so far.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
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
        self.generation += 1;
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

    /// Searches the `count` entries from number `from` on (at least one), calling
    /// `hit(slot, offset)` for each entry that contains a match of `m` (once, or once per value
    /// with passes). `offset` is the entry's: the caller checks it is still the slot's live text.
    pub(crate) fn scan(
        &self,
        m: &TextMatcher,
        from: usize,
        count: usize,
        mut hit: impl FnMut(u32, u32),
    ) -> Scanned {
        let Some(&(start, _)) = self.owners.get(from) else {
            return Scanned {
                next: self.owners.len(),
                entries: 0,
                bytes: 0,
                hits: 0,
            };
        };
        let start = start as usize;
        let rest = &self.owners[from..];
        let n = count.clamp(1, rest.len());
        let end = rest
            .get(n)
            .map_or(self.arena.len(), |&(off, _)| off as usize);
        let entries = &rest[..n];
        let hay = self.arena.get(start..end).unwrap_or_default();
        let mut hits = 0;
        m.search(hay, &mut |pos| {
            let at = start + pos;
            let Some(entry) = entries
                .partition_point(|&(off, _)| off as usize <= at)
                .checked_sub(1)
            else {
                return pos + 1;
            };
            let (off, slot) = entries[entry];
            hit(slot, off);
            hits += 1;
            entries
                .get(entry + 1)
                .map_or(hay.len(), |&(next, _)| next as usize - start)
        });
        Scanned {
            next: from + n,
            entries: n,
            bytes: hay.len(),
            hits,
        }
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

    /// Every slot the whole arena matches, scanning `chunk` entries at a time.
    fn search(t: &TextIndex, needles: &[&str], chunk: usize, refs: &[TextRef]) -> Vec<u32> {
        let m = TextMatcher::new(&needles.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        let mut hits = Vec::new();
        let mut from = 0;
        while from < t.entries() {
            let s = t.scan(&m, from, chunk, |slot, off| {
                if refs[slot as usize].offset() == off {
                    hits.push(slot);
                }
            });
            assert!(s.entries >= 1);
            from = s.next;
        }
        hits.sort_unstable();
        hits.dedup();
        hits
    }

    #[test]
    fn search_insert_remove_compact() {
        let mut t = TextIndex::default();
        let mut refs = [
            t.insert(0, "web-01\n10.0.0.1").unwrap(),
            t.insert(1, "db-01\n10.0.0.2").unwrap(),
            t.insert(2, "web-02").unwrap(),
        ];
        for chunk in [0, 1, 2, 3, 1 << 20] {
            assert_eq!(search(&t, &["web"], chunk, &refs), vec![0, 2]);
            assert_eq!(search(&t, &["zzz", "db-"], chunk, &refs), vec![1]);
            assert_eq!(search(&t, &["0.0.0.", "02"], chunk, &refs), vec![0, 1, 2]);
            // Separator: "01\n10" never matches across the newline.
            assert!(search(&t, &["0110"], chunk, &refs).is_empty());
            assert!(search(&t, &["01\n10"], chunk, &refs).is_empty());
        }
        assert_eq!(t.generation(), 0);
        t.remove(refs[0]);
        refs[0] = TextRef::NONE;
        assert_eq!(search(&t, &["web"], 4, &refs), vec![2]);
        t.compact(refs.iter_mut().enumerate().map(|(i, r)| (i as u32, r)));
        assert_eq!(t.generation(), 1);
        assert_eq!(t.get(refs[1]), "db-01\n10.0.0.2");
        assert_eq!(t.bytes(refs[1]), b"db-01\n10.0.0.2");
        assert_eq!(search(&t, &["10.0.0"], 3, &refs), vec![1]);
    }

    #[test]
    fn matcher_kinds_agree() {
        let texts = ["web-01\n10.0.0.1", "db-01", "", "cache\nfe80::1"];
        let sets: [&[&str]; 6] = [
            &[],
            &[""],
            &["web"],
            &["zz", "::1", "db"],
            &["\n", "b-"],
            &["q1", "q2", "q3", "q4", "q5", "e8", "q6"],
        ];
        for set in sets {
            let needles: Vec<String> = set.iter().map(|n| n.to_string()).collect();
            let m = TextMatcher::new(&needles);
            let valid: Vec<&str> = set
                .iter()
                .copied()
                .filter(|n| !n.is_empty() && !n.contains('\n'))
                .collect();
            assert_eq!(m.ac.is_some(), valid.len() >= AC_PER_INSTANCE, "{set:?}");
            let passes = TextMatcher {
                finders: std::mem::take(&mut TextMatcher::new(&needles).finders),
                ac: None,
            };
            for text in texts {
                let want = valid.iter().any(|n| text.contains(n));
                assert_eq!(m.is_match(text.as_bytes()), want, "{set:?} in {text:?}");
                assert_eq!(
                    passes.is_match(text.as_bytes()),
                    want,
                    "{set:?} in {text:?}"
                );
            }
        }
        assert!(TextMatcher::new(&[String::new()]).never());
    }

    #[test]
    fn the_arena_is_searched_alike_with_passes_and_with_the_automaton() {
        let mut t = TextIndex::default();
        let mut refs = Vec::new();
        for i in 0..200u32 {
            refs.push(
                t.insert(i, &format!("host-{i:03}\n10.0.{}.{}", i / 7, i % 7))
                    .unwrap(),
            );
        }
        let many: Vec<String> = (0..60).map(|i| format!("host-{:03}", i * 3)).collect();
        let m = TextMatcher::new(&many);
        assert!(m.finders.len() > PASSES_OVER_ARENA && m.ac.is_some());
        let passes = TextMatcher {
            finders: std::mem::take(&mut TextMatcher::new(&many).finders),
            ac: None,
        };
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (m, out) in [(&m, &mut a), (&passes, &mut b)] {
            let mut from = 0;
            while from < t.entries() {
                from = t
                    .scan(m, from, 100, |slot, off| {
                        if refs[slot as usize].offset() == off {
                            out.push(slot);
                        }
                    })
                    .next;
            }
            out.sort_unstable();
            out.dedup();
        }
        assert_eq!(a, (0..60).map(|i| i * 3).collect::<Vec<u32>>());
        assert_eq!(a, b);
    }
}
