//! Object shadow: per-allocation state kept beside simulated memory, one
//! 16-bit cell per 8-byte granule (like KASAN's shadow, but recording which
//! granules start a live object rather than which bytes are addressable).
//!
//! A cell is `[gen:14][pinned:1][live:1]`:
//! - `live`: a live slab object or large kmalloc starts here;
//! - `pinned`: Python holds a buffer export of it (freeing raises BufferError);
//! - `gen`: bumped at every allocation, so a stale handle to a freed and
//!   reallocated object is detected (it wraps after 16384 reuses of one slot).
//!
//! Cells are written only by the owner of the object (the allocating or
//! freeing call), with Relaxed loads and stores; distinct objects never share
//! a granule (objects are at least 8 bytes and 8-aligned).
//!
//! Shadow is mapped lazily in 64 MiB-of-RAM chunks (16 MiB of cells each, a
//! `physmem::Zeroed` host mapping the host backs only where written), so a
//! machine pays only for the host pages of cells near slab objects, and the
//! chunk table costs 24 bytes per 64 MiB of RAM (384 KiB for 16 TiB).
//!
//! # Invariants
//! - shadow-1: a live cell's granule is the start of an allocated object.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU16, Ordering::Relaxed};
use std::sync::OnceLock;

const GRANULE_SHIFT: u32 = 3;
const CHUNK_SHIFT: u32 = 26; // 64 MiB of RAM per chunk
const CELLS_PER_CHUNK: usize = 1 << (CHUNK_SHIFT - GRANULE_SHIFT);

pub const LIVE: u16 = 1;
pub const PINNED: u16 = 2;
const GEN_SHIFT: u32 = 2;

pub struct Shadow {
    chunks: Box<[OnceLock<crate::physmem::Zeroed<AtomicU16>>]>,
}

impl Shadow {
    pub fn new(memory: u64) -> Shadow {
        let n = memory.div_ceil(1 << CHUNK_SHIFT) as usize;
        Shadow { chunks: (0..n).map(|_| OnceLock::new()).collect() }
    }

    #[inline]
    fn cell(&self, phys: u64) -> &AtomicU16 {
        let chunk = self.chunks[(phys >> CHUNK_SHIFT) as usize].get_or_init(|| {
            // A 16 MiB NORESERVE mapping: refused only when the host's
            // address space is exhausted, which no allocation path can report.
            crate::physmem::Zeroed::new(CELLS_PER_CHUNK).expect("host refused a 16 MiB shadow mapping")
        });
        &chunk.as_slice()[((phys >> GRANULE_SHIFT) as usize) & (CELLS_PER_CHUNK - 1)]
    }

    /// Read a cell without creating its chunk.
    #[inline]
    pub fn get(&self, phys: u64) -> u16 {
        // An address beyond RAM (a caller's bad guess) has no object.
        match self.chunks.get((phys >> CHUNK_SHIFT) as usize).and_then(|c| c.get()) {
            Some(c) => c.as_slice()[((phys >> GRANULE_SHIFT) as usize) & (CELLS_PER_CHUNK - 1)].load(Relaxed),
            None => 0,
        }
    }

    /// Mark an object live; returns its new generation.
    #[inline]
    pub fn alloc(&self, phys: u64) -> u16 {
        let c = self.cell(phys);
        let gen = (c.load(Relaxed) >> GEN_SHIFT).wrapping_add(1) & 0x3fff;
        c.store((gen << GEN_SHIFT) | LIVE, Relaxed);
        gen
    }

    /// Mark an object free (keeping its generation).
    #[inline]
    pub fn free(&self, phys: u64) {
        let c = self.cell(phys);
        c.store(c.load(Relaxed) & !(LIVE | PINNED), Relaxed);
    }

    /// Undo `free` (same generation): for rolling back a refused bulk free.
    #[inline]
    pub fn revive(&self, phys: u64) {
        let c = self.cell(phys);
        c.store(c.load(Relaxed) | LIVE, Relaxed);
    }

    #[inline]
    pub fn is_live(&self, phys: u64) -> bool {
        self.get(phys) & LIVE != 0
    }

    #[inline]
    pub fn is_pinned(&self, phys: u64) -> bool {
        self.get(phys) & PINNED != 0
    }

    /// Is the object at `phys` live with generation `gen`?
    #[inline]
    pub fn is_live_gen(&self, phys: u64, gen: u16) -> bool {
        self.get(phys) == (gen << GEN_SHIFT) | LIVE || self.get(phys) == (gen << GEN_SHIFT) | LIVE | PINNED
    }

    /// Set or clear the pinned bit of a live object.
    pub fn set_pinned(&self, phys: u64, pinned: bool) {
        let c = self.cell(phys);
        let v = c.load(Relaxed);
        c.store(if pinned { v | PINNED } else { v & !PINNED }, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_and_pins() {
        let s = Shadow::new(64 << 20);
        assert_eq!(s.get(4096), 0);
        let g1 = s.alloc(4096);
        assert!(s.is_live(4096) && s.is_live_gen(4096, g1));
        s.set_pinned(4096, true);
        assert!(s.is_pinned(4096) && s.is_live_gen(4096, g1));
        s.free(4096);
        assert!(!s.is_live(4096) && !s.is_pinned(4096));
        let g2 = s.alloc(4096);
        assert_ne!(g1, g2);
        assert!(!s.is_live_gen(4096, g1));
        assert_eq!(s.get(4104), 0, "neighbouring granule untouched");
    }
}
