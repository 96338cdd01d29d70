//! The chunk slots: `pcpu_chunk_lists[]` of mm/percpu.c, one list per slot
//! (`pcpu_chunk_slot`: the power of two of a chunk's contig hint), moved
//! with `list_move`/`list_move_tail` as `__pcpu_chunk_move` does.
//!
//! A doubly linked list over chunk indices (the kernel's `list_head` in each
//! chunk), so a move is O(1) and `pcpu_alloc` walks the lists in the
//! kernel's order.
//!
//! # Invariants
//! - percpu-slot-1: every chunk is on exactly one list, the links agree
//!   both ways, and `slot_of` names that list.
#![forbid(unsafe_code)]

const NIL: usize = usize::MAX;

#[derive(Default)]
pub(crate) struct ChunkLists {
    head: Vec<usize>,
    tail: Vec<usize>,
    prev: Vec<usize>,
    next: Vec<usize>,
    /// The list a chunk is on (NIL before its first `pcpu_chunk_relocate`).
    slot_of: Vec<usize>,
}

impl ChunkLists {
    pub(crate) fn new(nr_slots: usize) -> ChunkLists {
        ChunkLists { head: vec![NIL; nr_slots], tail: vec![NIL; nr_slots], ..ChunkLists::default() }
    }

    /// A new chunk index, on no list yet.
    pub(crate) fn add_chunk(&mut self) -> usize {
        self.prev.push(NIL);
        self.next.push(NIL);
        self.slot_of.push(NIL);
        self.slot_of.len() - 1
    }

    pub(crate) fn slot_of(&self, c: usize) -> Option<usize> {
        (self.slot_of[c] != NIL).then_some(self.slot_of[c])
    }

    pub(crate) fn first(&self, slot: usize) -> Option<usize> {
        (self.head[slot] != NIL).then_some(self.head[slot])
    }

    pub(crate) fn next(&self, c: usize) -> Option<usize> {
        (self.next[c] != NIL).then_some(self.next[c])
    }

    fn unlink(&mut self, c: usize) {
        let s = self.slot_of[c];
        if s == NIL {
            return;
        }
        let (p, n) = (self.prev[c], self.next[c]);
        if p == NIL {
            self.head[s] = n;
        } else {
            self.next[p] = n;
        }
        if n == NIL {
            self.tail[s] = p;
        } else {
            self.prev[n] = p;
        }
        self.prev[c] = NIL;
        self.next[c] = NIL;
        self.slot_of[c] = NIL;
    }

    /// `list_move` (`front`) or `list_move_tail` onto `slot`'s list.
    pub(crate) fn move_to(&mut self, c: usize, slot: usize, front: bool) {
        self.unlink(c);
        self.slot_of[c] = slot;
        if front {
            let h = self.head[slot];
            self.next[c] = h;
            if h == NIL {
                self.tail[slot] = c;
            } else {
                self.prev[h] = c;
            }
            self.head[slot] = c;
        } else {
            let t = self.tail[slot];
            self.prev[c] = t;
            if t == NIL {
                self.head[slot] = c;
            } else {
                self.next[t] = c;
            }
            self.tail[slot] = c;
        }
    }

    /// Check percpu-slot-1.
    pub(crate) fn check(&self) -> Vec<String> {
        let mut errs = Vec::new();
        let mut seen = vec![0u32; self.slot_of.len()];
        for s in 0..self.head.len() {
            let (mut c, mut prev) = (self.head[s], NIL);
            let mut steps = 0;
            while c != NIL {
                if c >= seen.len() || steps > seen.len() {
                    errs.push(format!("percpu-slot-1: slot {s}: the list is corrupt"));
                    break;
                }
                seen[c] += 1;
                if self.slot_of[c] != s || self.prev[c] != prev {
                    errs.push(format!("percpu-slot-1: chunk {c} on slot {s}'s list has slot_of {} / a bad back link", self.slot_of[c]));
                }
                prev = c;
                c = self.next[c];
                steps += 1;
            }
            if self.tail[s] != prev {
                errs.push(format!("percpu-slot-1: slot {s}: tail does not end the list"));
            }
        }
        for (c, &n) in seen.iter().enumerate() {
            if n != 1 {
                errs.push(format!("percpu-slot-1: chunk {c} is on {n} lists"));
            }
        }
        errs
    }
}
