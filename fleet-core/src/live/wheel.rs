//! The deadline index: a timing wheel of one-second buckets with intrusive doubly linked lists.
//!
//! Every instance that can still change status without a heartbeat (online or warning) sits in
//! the bucket of its next deadline. Rescheduling on a heartbeat is O(1) and happens only when the
//! deadline moves to another bucket. A sweep visits the buckets from the last swept second to the
//! current one; a sweep with no due deadline touches one empty bucket, O(1). Entries whose
//! deadline is more than a wheel turn away are simply put back when their bucket comes round.

const NIL: u32 = u32::MAX;
const HEAD: u32 = 1 << 31;
/// Buckets (seconds) in one turn of the wheel.
const BUCKETS: usize = 4096;

#[derive(Debug)]
pub(crate) struct Wheel {
    heads: Vec<u32>,
    /// Per slot: (prev, next). `prev` is a slot, `HEAD | bucket` for a list head, or NIL when
    /// the slot is not scheduled.
    links: Vec<(u32, u32)>,
    /// Per slot: the second of the bucket it sits in.
    bucket_sec: Vec<i64>,
    /// Seconds before this one have been swept.
    cursor: Option<i64>,
}

fn bucket_of(sec: i64) -> usize {
    // rem_euclid of a positive modulus is in 0..BUCKETS.
    sec.rem_euclid(BUCKETS as i64) as usize
}

impl Wheel {
    pub(crate) fn new() -> Self {
        Self {
            heads: vec![NIL; BUCKETS],
            links: Vec::new(),
            bucket_sec: Vec::new(),
            cursor: None,
        }
    }

    /// Makes room for slot indices below `n`.
    pub(crate) fn ensure(&mut self, n: usize) {
        if self.links.len() < n {
            self.links.resize(n, (NIL, NIL));
            self.bucket_sec.resize(n, 0);
        }
    }

    pub(crate) fn is_scheduled(&self, slot: u32) -> bool {
        self.links.get(slot as usize).is_some_and(|l| l.0 != NIL)
    }

    pub(crate) fn unlink(&mut self, slot: u32) {
        let Some(&(prev, next)) = self.links.get(slot as usize) else {
            return;
        };
        if prev == NIL {
            return;
        }
        if prev & HEAD != 0 {
            self.heads[(prev & !HEAD) as usize] = next;
        } else {
            self.links[prev as usize].1 = next;
        }
        if next != NIL {
            self.links[next as usize].0 = prev;
        }
        self.links[slot as usize] = (NIL, NIL);
    }

    fn push(&mut self, slot: u32, sec: i64) {
        let b = bucket_of(sec);
        let head = self.heads[b];
        self.links[slot as usize] = (HEAD | b as u32, head);
        if head != NIL {
            self.links[head as usize].0 = slot;
        }
        self.heads[b] = slot;
        self.bucket_sec[slot as usize] = sec;
    }

    /// Schedules `slot` for `deadline_ms` (or unschedules it for `None`). Deadlines before the
    /// sweep cursor go into the cursor's bucket so the next sweep sees them.
    pub(crate) fn schedule(&mut self, slot: u32, deadline_ms: Option<i64>) {
        let Some(ms) = deadline_ms else {
            self.unlink(slot);
            return;
        };
        let mut sec = ms.div_euclid(1000);
        if let Some(c) = self.cursor {
            sec = sec.max(c);
        }
        if self.is_scheduled(slot) && self.bucket_sec[slot as usize] == sec {
            return;
        }
        self.unlink(slot);
        self.push(slot, sec);
    }

    /// Takes the slots that may be due at `now_ms`: the whole list of every bucket from the
    /// cursor up to the current second. The caller re-schedules each one (the not yet due ones at
    /// their real deadline). Advances the cursor. On the first sweep, and when the clock went
    /// backwards, every bucket is taken once so that no entry waits in a bucket the cursor will
    /// not reach in time.
    pub(crate) fn take_due(&mut self, now_ms: i64, out: &mut Vec<u32>) {
        let now_sec = now_ms.div_euclid(1000);
        let start = match self.cursor {
            Some(c) if c <= now_sec => c,
            _ => now_sec.saturating_sub(BUCKETS as i64 - 1),
        };
        let span = (now_sec - start).min(BUCKETS as i64 - 1);
        for sec in (now_sec - span)..=now_sec {
            let b = bucket_of(sec);
            let mut cur = std::mem::replace(&mut self.heads[b], NIL);
            while cur != NIL {
                let next = self.links[cur as usize].1;
                self.links[cur as usize] = (NIL, NIL);
                out.push(cur);
                cur = next;
            }
        }
        self.cursor = Some(now_sec);
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.heads.capacity() * 4 + self.links.capacity() * 8 + self.bucket_sec.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_take_and_clamp_to_cursor() {
        let mut w = Wheel::new();
        w.ensure(4);
        w.schedule(0, Some(10_500));
        w.schedule(1, Some(12_000));
        w.schedule(2, Some(10_900));
        let mut out = Vec::new();
        // The first sweep takes everything once (the caller puts back what is not due).
        w.take_due(9_000, &mut out);
        assert_eq!(out.len(), 3);
        w.schedule(0, Some(10_500));
        w.schedule(1, Some(12_000));
        w.schedule(2, Some(10_900));
        out.clear();
        // Only the current second's bucket: empty.
        w.take_due(9_500, &mut out);
        assert!(out.is_empty());
        w.take_due(11_000, &mut out);
        out.sort_unstable();
        assert_eq!(out, vec![0, 2]);
        assert!(!w.is_scheduled(0));
        // A deadline in the past lands in the cursor's bucket.
        out.clear();
        w.schedule(3, Some(1_000));
        w.take_due(11_000, &mut out);
        assert_eq!(out, vec![3]);
        // Unscheduling removes from the middle of a list.
        w.schedule(0, Some(12_100));
        w.schedule(2, Some(12_200));
        w.schedule(0, None);
        out.clear();
        w.take_due(13_000, &mut out);
        out.sort_unstable();
        assert_eq!(out, vec![1, 2]);
    }
}
