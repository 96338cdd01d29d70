//! One percpu chunk's allocation map and the hints over it: mm/percpu.c's
//! bitmap allocator (Linux 5.2+, "percpu: convert chunk hints to be based
//! off of pcpu_block_md" and the scan hint).
//!
//! # Kernel
//! `mm/percpu.c`: `pcpu_block_update`, `pcpu_block_update_scan`,
//! `pcpu_chunk_refresh_hint`, `pcpu_block_refresh_hint`,
//! `pcpu_block_update_hint_alloc`, `pcpu_block_update_hint_free`,
//! `pcpu_next_hint`, `pcpu_next_md_free_region`, `pcpu_next_fit_region`,
//! `pcpu_find_block_fit`, `pcpu_find_zero_area`, `pcpu_alloc_area`,
//! `pcpu_free_area`, `pcpu_init_md_blocks`, `pcpu_alloc_first_chunk`,
//! `pcpu_size_to_slot`, `pcpu_chunk_slot`; `mm/percpu-internal.h`
//! (`struct pcpu_block_md`).
//!
//! ```text
//!   alloc_map: 1 bit per PCPU_MIN_ALLOC_SIZE (4) bytes of a unit
//!   | block 0 (PAGE_SIZE / 4 bits) | block 1 | ... |      md_blocks[i] describes block i
//!   chunk_md describes the whole map (nr_bits = map bits)
//!   pcpu_block_md: first_free, left_free .. right_free, contig_hint at
//!   contig_hint_start (largest free area), scan_hint at scan_hint_start
//!   (a known free area before the contig hint, so a search for more than
//!   scan_hint bits can start after it)
//! ```
//!
//! The allocation map is the truth; the hints only steer the search
//! (`pcpu_find_block_fit` picks where `pcpu_alloc_area` starts scanning the
//! bitmap), so a stale hint costs a missed fit, never an overlap. They are
//! the kernel's, stale spots included:
//! - KERNEL QUIRK: `pcpu_block_update_hint_free` updates `chunk_md` with
//!   `pcpu_block_update(&chunk->chunk_md, pcpu_block_off_to_off(s_index,
//!   start), end)`, `end` block-relative: for a free inside one block other
//!   than block 0 that neither frees the whole block nor spans blocks, the
//!   chunk's contig hint is not raised (contig = end - start < 0). kmm does
//!   the same, so chunk hints may under-state free space exactly as the
//!   kernel's do (the next alloc that breaks the hint, or a larger free,
//!   refreshes them).
//! - The scan hint comes from the areas `pcpu_find_zero_area` skipped; it is
//!   "imperfect, but in general good enough" (the kernel's words).
//!
//! SIMPLIFICATION: no `bound_map` (the size of an allocation is kept by the
//! caller's allocation table), no populated bitmap or `nr_empty_pop_pages`
//! (every page of a chunk is populated at creation, see the module header),
//! so `pcpu_find_block_fit`'s `pop_only` pass is always satisfied.
//!
//! # Invariants (checked by [`PcpuChunk::check`], ids percpu-hint-N)
//! - percpu-hint-1: a block's `contig_hint` never exceeds its largest free
//!   area, and `[contig_hint_start, +contig_hint)` is free. (Not always
//!   equal, in the kernel too: when an allocation breaks the contig hint,
//!   `pcpu_block_refresh_hint` promotes the scan hint and rescans only after
//!   it, and a scan hint recorded by `pcpu_block_update_scan` after the old
//!   one was cleared may sit after a larger free area.)
//! - percpu-hint-2: `left_free`/`right_free` never exceed the free runs
//!   touching the block's ends. (Not always equal: a refresh that promotes
//!   a scan hint lying at the block's end does not rescan it, and
//!   `pcpu_block_refresh_hint` zeroes `right_free` first.)
//! - percpu-hint-3: `first_free` is at most the first free bit (so a search
//!   from it misses nothing; a block made full in the middle of a
//!   cross-block allocation keeps its old value, as in the kernel).
//! - percpu-hint-4: a nonzero `scan_hint` names a free area no larger than
//!   `contig_hint`; `scan_hint_start` > `contig_hint_start` only when
//!   `scan_hint == contig_hint` (mm/percpu-internal.h).
//! - percpu-hint-5: the chunk's `contig_hint` never exceeds its largest free
//!   area (kernel comment on `pcpu_block_update_hint_free`: "it will never be
//!   more than the available space") and names a free area; its `scan_hint`
//!   names a free area; its `first_free` is at most the first free bit.
//! - percpu-hint-6: `free_bytes` is 4 x the clear bits of the map.
#![forbid(unsafe_code)]

/// `PCPU_MIN_ALLOC_SIZE`: bytes per bit of the allocation map.
pub const PCPU_MIN_ALLOC_SIZE: u64 = 4;
/// `PCPU_SLOT_BASE_SHIFT`: sizes 1-31 share a slot.
pub const PCPU_SLOT_BASE_SHIFT: i32 = 5;
/// `PCPU_SLOT_FAIL_THRESHOLD`: a chunk in a slot below this that fails a
/// search is moved to slot 0 (mm/percpu.c `pcpu_alloc`).
pub const PCPU_SLOT_FAIL_THRESHOLD: usize = 3;

/// `struct pcpu_block_md` (mm/percpu-internal.h); all in bits, `int` like
/// the kernel's (the arithmetic of `pcpu_block_update` relies on it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockMd {
    pub scan_hint: i32,
    pub scan_hint_start: i32,
    pub contig_hint: i32,
    pub contig_hint_start: i32,
    pub left_free: i32,
    pub right_free: i32,
    pub first_free: i32,
    pub nr_bits: i32,
}

/// `__ffs`: the lowest set bit (callers pass nonzero values).
fn ffs(x: i32) -> u32 {
    x.trailing_zeros()
}

/// `ALIGN(x, a)` for a power-of-two `a`.
fn align_up(x: i32, a: i32) -> i32 {
    (x + a - 1) & !(a - 1)
}

impl BlockMd {
    /// `pcpu_init_md_block`: a free block (the struct was zero-allocated, so
    /// the hint starts and scan hint are 0).
    pub fn new(nr_bits: i32) -> BlockMd {
        BlockMd {
            scan_hint: 0,
            scan_hint_start: 0,
            contig_hint: nr_bits,
            contig_hint_start: 0,
            left_free: nr_bits,
            right_free: nr_bits,
            first_free: 0,
            nr_bits,
        }
    }

    /// `pcpu_block_update`: a known free area `[start, end)`; prefers the
    /// better-aligned start among equal contig hints and keeps the scan hint.
    fn update(&mut self, start: i32, end: i32) {
        let contig = end - start;
        self.first_free = self.first_free.min(start);
        if start == 0 {
            self.left_free = contig;
        }
        if end == self.nr_bits {
            self.right_free = contig;
        }
        if contig > self.contig_hint {
            // promote the old contig_hint to be the new scan_hint
            if start > self.contig_hint_start {
                if self.contig_hint > self.scan_hint {
                    self.scan_hint_start = self.contig_hint_start;
                    self.scan_hint = self.contig_hint;
                } else if start < self.scan_hint_start {
                    // the old contig_hint == scan_hint; keep
                    // scan_hint_start < contig_hint_start
                    self.scan_hint = 0;
                }
            } else {
                self.scan_hint = 0;
            }
            self.contig_hint_start = start;
            self.contig_hint = contig;
        } else if contig == self.contig_hint {
            if self.contig_hint_start != 0 && (start == 0 || ffs(start) > ffs(self.contig_hint_start)) {
                // start has a better alignment so use it
                self.contig_hint_start = start;
                if start < self.scan_hint_start && self.contig_hint > self.scan_hint {
                    self.scan_hint = 0;
                }
            } else if start > self.scan_hint_start || self.contig_hint > self.scan_hint {
                // update the scan_hint if it is farther than or larger than
                // the current one
                self.scan_hint_start = start;
                self.scan_hint = contig;
            }
        } else if start < self.contig_hint_start
            && (contig > self.scan_hint || (contig == self.scan_hint && start > self.scan_hint_start))
        {
            // smaller than the contig hint: only a larger (or equal and
            // farther) scan hint is kept
            self.scan_hint_start = start;
            self.scan_hint = contig;
        }
    }

    /// `pcpu_next_hint`: where a search for `alloc_bits` starts — after the
    /// scan hint when it is known too small, else `first_free`.
    fn next_hint(&self, alloc_bits: i32) -> i32 {
        if self.scan_hint != 0 && self.contig_hint_start > self.scan_hint_start && alloc_bits > self.scan_hint {
            return self.scan_hint_start + self.scan_hint;
        }
        self.first_free
    }
}

/// `pcpu_region_overlap`: do `[a, b)` and `[x, y)` overlap?
fn region_overlap(a: i32, b: i32, x: i32, y: i32) -> bool {
    a < y && x < b
}

/// `find_next_zero_bit(map, size, start)`: `size` when none.
fn find_next_zero_bit(map: &[u64], size: i32, start: i32) -> i32 {
    find_next(map, size, start, !0)
}

/// `find_next_bit(map, size, start)`: `size` when none.
fn find_next_bit(map: &[u64], size: i32, start: i32) -> i32 {
    find_next(map, size, start, 0)
}

/// The first bit at or after `start` set in `map ^ flip` (lib/find_bit.c's
/// `_find_next_bit` with its `munge`): `size` when none.
fn find_next(map: &[u64], size: i32, start: i32, flip: u64) -> i32 {
    if start >= size {
        return size;
    }
    let (mut w, b) = ((start / 64) as usize, start % 64);
    let mut word = (map[w] ^ flip) & (!0u64 << b);
    loop {
        if word != 0 {
            let i = w as i32 * 64 + word.trailing_zeros() as i32;
            return i.min(size);
        }
        w += 1;
        if w as i32 * 64 >= size {
            return size;
        }
        word = map[w] ^ flip;
    }
}

/// The last set bit in `[lo, hi)`, if any.
fn find_last_bit_in(map: &[u64], lo: i32, hi: i32) -> Option<i32> {
    let mut i = hi;
    while i > lo {
        let w = ((i - 1) / 64) as usize;
        let top = (i - 1) % 64; // highest bit of interest in word w
        let mask = if top == 63 { !0u64 } else { (1u64 << (top + 1)) - 1 };
        let word = map[w] & mask;
        if word != 0 {
            let bit = w as i32 * 64 + 63 - word.leading_zeros() as i32;
            return (bit >= lo).then_some(bit);
        }
        i = w as i32 * 64;
    }
    None
}

fn bitmap_assign(map: &mut [u64], start: i32, nr: i32, on: bool) {
    let (mut i, end) = (start, start + nr);
    while i < end {
        let (w, b) = ((i / 64) as usize, i % 64);
        let n = (64 - b).min(end - i);
        let mask = if n == 64 { !0u64 } else { ((1u64 << n) - 1) << b };
        if on {
            map[w] |= mask;
        } else {
            map[w] &= !mask;
        }
        i += n;
    }
}

fn test_bit(map: &[u64], i: i32) -> bool {
    map[(i / 64) as usize] & (1 << (i % 64)) != 0
}

/// `__pcpu_size_to_slot`: chunk list by the power of two of a free size.
pub fn size_to_slot_raw(size: i32) -> usize {
    let highbit = 32 - size.leading_zeros() as i32; // fls
    (highbit - PCPU_SLOT_BASE_SHIFT + 2).max(1) as usize
}

/// `pcpu_free_slot` for a unit size (Linux 5.14+: the slot of fully free
/// chunks, one past the largest partly used one; `pcpu_nr_slots` is one more
/// here, kmm having no sidelined or to-depopulate chunks).
pub fn free_slot(unit_size: i32) -> usize {
    size_to_slot_raw(unit_size) + 1
}

/// `pcpu_size_to_slot`.
pub fn size_to_slot(size: i32, unit_size: i32) -> usize {
    if size == unit_size {
        return free_slot(unit_size);
    }
    size_to_slot_raw(size)
}

/// A chunk's allocation map and hints (the index part of `struct
/// pcpu_chunk`; the pages are the caller's).
#[derive(Clone, Debug)]
pub struct PcpuChunk {
    /// `alloc_map`: one bit per 4 bytes of a unit, set = allocated.
    pub alloc_map: Vec<u64>,
    /// `pcpu_chunk_map_bits`.
    pub map_bits: i32,
    /// `PCPU_BITMAP_BLOCK_BITS` (PAGE_SIZE / 4).
    pub block_bits: i32,
    /// `free_bytes`.
    pub free_bytes: i32,
    /// `chunk_md`.
    pub chunk_md: BlockMd,
    /// `md_blocks`.
    pub md_blocks: Vec<BlockMd>,
}

impl PcpuChunk {
    /// `pcpu_alloc_chunk` + `pcpu_init_md_blocks`: a free chunk of
    /// `unit_size` bytes, blocks of `block_size` bytes (`PCPU_BITMAP_BLOCK_SIZE`
    /// = PAGE_SIZE). `unit_size` is a multiple of `block_size`, which is a
    /// multiple of 256 (so a block is whole words of the map).
    pub fn new(unit_size: u64, block_size: u64) -> PcpuChunk {
        assert!(block_size >= 256 && unit_size % block_size == 0 && unit_size <= 1 << 30, "percpu chunk geometry");
        let map_bits = (unit_size / PCPU_MIN_ALLOC_SIZE) as i32;
        let block_bits = (block_size / PCPU_MIN_ALLOC_SIZE) as i32;
        let nr_blocks = (map_bits / block_bits) as usize;
        PcpuChunk {
            alloc_map: vec![0; (map_bits as usize).div_ceil(64)],
            map_bits,
            block_bits,
            free_bytes: unit_size as i32,
            chunk_md: BlockMd::new(map_bits),
            md_blocks: vec![BlockMd::new(block_bits); nr_blocks],
        }
    }

    /// `pcpu_alloc_first_chunk`'s "hide the beginning of the bitmap": the
    /// first `offset_bits` bits are in use (kmm: the module reserve).
    pub fn hide_start(&mut self, offset_bits: i32) {
        if offset_bits == 0 {
            return;
        }
        bitmap_assign(&mut self.alloc_map, 0, offset_bits, true);
        self.chunk_md.first_free = offset_bits;
        self.free_bytes -= offset_bits * PCPU_MIN_ALLOC_SIZE as i32;
        self.block_update_hint_alloc(0, offset_bits);
    }

    /// `pcpu_chunk_slot`: the chunk list by the size of the contig hint.
    pub fn slot(&self) -> usize {
        if self.free_bytes < PCPU_MIN_ALLOC_SIZE as i32 || self.chunk_md.contig_hint == 0 {
            return 0;
        }
        size_to_slot(self.chunk_md.contig_hint * PCPU_MIN_ALLOC_SIZE as i32, self.map_bits * PCPU_MIN_ALLOC_SIZE as i32)
    }

    fn nr_blocks(&self) -> i32 {
        self.md_blocks.len() as i32
    }

    fn off_to_block_index(&self, off: i32) -> i32 {
        off / self.block_bits
    }

    fn off_to_block_off(&self, off: i32) -> i32 {
        off & (self.block_bits - 1)
    }

    fn block_off_to_off(&self, index: i32, off: i32) -> i32 {
        index * self.block_bits + off
    }

    /// `find_next_zero_bit(pcpu_index_alloc_map(chunk, index), size, start)`.
    fn block_next_zero(&self, index: i32, size: i32, start: i32) -> i32 {
        let base = index * self.block_bits;
        find_next_zero_bit(&self.alloc_map, base + size, base + start) - base
    }

    /// `find_next_bit(pcpu_index_alloc_map(chunk, index), size, start)`.
    fn block_next_bit(&self, index: i32, size: i32, start: i32) -> i32 {
        let base = index * self.block_bits;
        find_next_bit(&self.alloc_map, base + size, base + start) - base
    }

    /// `find_last_bit(pcpu_index_alloc_map(chunk, index), size)`: `size` when none.
    fn block_last_bit(&self, index: i32, size: i32) -> i32 {
        let base = index * self.block_bits;
        find_last_bit_in(&self.alloc_map, base, base + size).map_or(size, |b| b - base)
    }

    /// `pcpu_next_md_free_region`: the next free area by the block hints,
    /// joined across blocks.
    fn next_md_free_region(&self, bit_off: &mut i32, bits: &mut i32) {
        let mut i = self.off_to_block_index(*bit_off);
        let mut block_off = self.off_to_block_off(*bit_off);
        *bits = 0;
        while i < self.nr_blocks() {
            let block = &self.md_blocks[i as usize];
            // handles contig area across blocks
            if *bits != 0 {
                *bits += block.left_free;
                if block.left_free == self.block_bits {
                    i += 1;
                    continue;
                }
                return;
            }
            // is there a contig hint, not checked before (block_off), not
            // spilling into the next block?
            *bits = block.contig_hint;
            if *bits != 0 && block.contig_hint_start >= block_off && *bits + block.contig_hint_start < self.block_bits {
                *bit_off = self.block_off_to_off(i, block.contig_hint_start);
                return;
            }
            // reset to satisfy the second predicate above
            block_off = 0;
            *bits = block.right_free;
            *bit_off = (i + 1) * self.block_bits - block.right_free;
            i += 1;
        }
    }

    /// `pcpu_next_fit_region`: the next area by the block hints where
    /// `alloc_bits` aligned to `align` fit; `bit_off = map_bits` when none.
    fn next_fit_region(&self, alloc_bits: i32, align: i32, bit_off: &mut i32, bits: &mut i32) {
        let mut i = self.off_to_block_index(*bit_off);
        let mut block_off = self.off_to_block_off(*bit_off);
        *bits = 0;
        while i < self.nr_blocks() {
            let block = &self.md_blocks[i as usize];
            // handles contig area across blocks
            if *bits != 0 {
                *bits += block.left_free;
                if *bits >= alloc_bits {
                    return;
                }
                if block.left_free == self.block_bits {
                    i += 1;
                    continue;
                }
            }
            // check block->contig_hint
            *bits = align_up(block.contig_hint_start, align) - block.contig_hint_start;
            // block_off tells whether this was checked in the prior iteration
            if block.contig_hint != 0 && block.contig_hint_start >= block_off && block.contig_hint >= *bits + alloc_bits {
                let start = block.next_hint(alloc_bits);
                *bits += alloc_bits + block.contig_hint_start - start;
                *bit_off = self.block_off_to_off(i, start);
                return;
            }
            // reset to satisfy the second predicate above
            block_off = 0;
            let off = align_up(self.block_bits - block.right_free, align);
            *bits = self.block_bits - off;
            *bit_off = self.block_off_to_off(i, off);
            if *bits >= alloc_bits {
                return;
            }
            i += 1;
        }
        // no valid offsets were found - fail condition
        *bit_off = self.map_bits;
    }

    /// `pcpu_block_update_scan`: a free area a scan skipped may become the
    /// block's scan hint (scanning back over bits lost to alignment).
    fn block_update_scan(&mut self, bit_off: i32, bits: i32) {
        let mut s_off = self.off_to_block_off(bit_off);
        let e_off = s_off + bits;
        if e_off > self.block_bits {
            return;
        }
        let s_index = self.off_to_block_index(bit_off);
        // scan backwards in case of alignment skipping free bits
        let l_bit = self.block_last_bit(s_index, s_off);
        s_off = if s_off == l_bit { 0 } else { l_bit + 1 };
        self.md_blocks[s_index as usize].update(s_off, e_off);
    }

    /// `pcpu_chunk_refresh_hint`: rebuild the chunk hint from the block
    /// hints, from the scan hint on unless `full_scan`.
    fn chunk_refresh_hint(&mut self, full_scan: bool) {
        let mut bit_off;
        let md = &mut self.chunk_md;
        // promote scan_hint to contig_hint
        if !full_scan && md.scan_hint != 0 {
            bit_off = md.scan_hint_start + md.scan_hint;
            md.contig_hint_start = md.scan_hint_start;
            md.contig_hint = md.scan_hint;
            md.scan_hint = 0;
        } else {
            bit_off = md.first_free;
            md.contig_hint = 0;
        }
        let mut bits = 0;
        // pcpu_for_each_md_free_region
        self.next_md_free_region(&mut bit_off, &mut bits);
        while bit_off < self.map_bits {
            self.chunk_md.update(bit_off, bit_off + bits);
            bit_off += bits + 1;
            self.next_md_free_region(&mut bit_off, &mut bits);
        }
    }

    /// `pcpu_block_refresh_hint`: rescan a block from its scan hint (or
    /// first_free) for its free areas.
    fn block_refresh_hint(&mut self, index: i32) {
        let bb = self.block_bits;
        let base = index * bb;
        let block = &mut self.md_blocks[index as usize];
        // promote scan_hint to contig_hint
        let start = if block.scan_hint != 0 {
            let s = block.scan_hint_start + block.scan_hint;
            block.contig_hint_start = block.scan_hint_start;
            block.contig_hint = block.scan_hint;
            block.scan_hint = 0;
            s
        } else {
            block.contig_hint = 0;
            block.first_free
        };
        block.right_free = 0;
        // bitmap_for_each_clear_region(alloc_map, rs, re, start, BITS)
        let mut rs = start;
        loop {
            rs = find_next_zero_bit(&self.alloc_map, base + bb, base + rs) - base;
            if rs >= bb {
                break;
            }
            let re = find_next_bit(&self.alloc_map, base + bb, base + rs + 1) - base;
            self.md_blocks[index as usize].update(rs, re);
            rs = re + 1;
        }
    }

    /// `pcpu_block_update_hint_alloc`: hints after `[bit_off, +bits)` was
    /// set in the map. Block scans only when a block's contig hint broke, a
    /// chunk refresh only when the chunk's did.
    fn block_update_hint_alloc(&mut self, bit_off: i32, bits: i32) {
        let bb = self.block_bits;
        let s_index = self.off_to_block_index(bit_off);
        let e_index = self.off_to_block_index(bit_off + bits - 1);
        let s_off = self.off_to_block_off(bit_off);
        let e_off = self.off_to_block_off(bit_off + bits - 1) + 1;

        // Update s_block: first_free if the allocation takes its place; a
        // scan if it breaks the contig hint.
        if s_off == self.md_blocks[s_index as usize].first_free {
            let ff = self.block_next_zero(s_index, bb, s_off + bits);
            self.md_blocks[s_index as usize].first_free = ff;
        }
        let s_block = &mut self.md_blocks[s_index as usize];
        if region_overlap(s_block.scan_hint_start, s_block.scan_hint_start + s_block.scan_hint, s_off, s_off + bits) {
            s_block.scan_hint = 0;
        }
        if region_overlap(
            s_block.contig_hint_start,
            s_block.contig_hint_start + s_block.contig_hint,
            s_off,
            s_off + bits,
        ) {
            // block contig hint is broken - scan to fix it
            if s_off == 0 {
                s_block.left_free = 0;
            }
            self.block_refresh_hint(s_index);
        } else {
            // update left and right contig manually
            s_block.left_free = s_block.left_free.min(s_off);
            if s_index == e_index {
                s_block.right_free = s_block.right_free.min(bb - e_off);
            } else {
                s_block.right_free = 0;
            }
        }

        // Update e_block.
        if s_index != e_index {
            let mut e_end = e_index; // first block not reset below
            // the allocation ends along the left part of e_block
            let ff = self.block_next_zero(e_index, bb, e_off);
            self.md_blocks[e_index as usize].first_free = ff;
            if e_off == bb {
                // reset the block
                e_end += 1;
            } else {
                let e_block = &mut self.md_blocks[e_index as usize];
                if e_off > e_block.scan_hint_start {
                    e_block.scan_hint = 0;
                }
                e_block.left_free = 0;
                if e_off > e_block.contig_hint_start {
                    // contig hint is broken - scan to fix it
                    self.block_refresh_hint(e_index);
                } else {
                    e_block.right_free = e_block.right_free.min(bb - e_off);
                }
            }
            // update in-between md_blocks
            for block in &mut self.md_blocks[(s_index + 1) as usize..e_end as usize] {
                block.scan_hint = 0;
                block.contig_hint = 0;
                block.left_free = 0;
                block.right_free = 0;
            }
        }

        let md = &mut self.chunk_md;
        if region_overlap(md.scan_hint_start, md.scan_hint_start + md.scan_hint, bit_off, bit_off + bits) {
            md.scan_hint = 0;
        }
        // The only time a full chunk scan is required is if the chunk contig
        // hint is broken.
        if region_overlap(md.contig_hint_start, md.contig_hint_start + md.contig_hint, bit_off, bit_off + bits) {
            self.chunk_refresh_hint(false);
        }
    }

    /// `pcpu_block_update_hint_free`: hints after `[bit_off, +bits)` was
    /// cleared. Uses the contig hints to find the extent of the free area,
    /// else scans, never past the ends of the blocks.
    fn block_update_hint_free(&mut self, bit_off: i32, bits: i32) {
        let bb = self.block_bits;
        let s_index = self.off_to_block_index(bit_off);
        let e_index = self.off_to_block_index(bit_off + bits - 1);
        let s_off = self.off_to_block_off(bit_off);
        let mut e_off = self.off_to_block_off(bit_off + bits - 1) + 1;
        let s_block = self.md_blocks[s_index as usize];
        let e_block = self.md_blocks[e_index as usize];

        // start and end of the free area within their blocks
        let start = if s_off == s_block.contig_hint + s_block.contig_hint_start {
            s_block.contig_hint_start
        } else {
            // scan backwards; find_last_bit returns the start when no bit is set
            let l_bit = self.block_last_bit(s_index, s_off);
            if s_off == l_bit {
                0
            } else {
                l_bit + 1
            }
        };
        let end = if e_off == e_block.contig_hint_start {
            e_block.contig_hint_start + e_block.contig_hint
        } else {
            self.block_next_bit(e_index, bb, e_off)
        };

        // update s_block
        e_off = if s_index == e_index { end } else { bb };
        self.md_blocks[s_index as usize].update(start, e_off);

        if s_index != e_index {
            // update e_block
            self.md_blocks[e_index as usize].update(0, end);
            // reset md_blocks in the middle
            for block in &mut self.md_blocks[(s_index + 1) as usize..e_index as usize] {
                block.first_free = 0;
                block.scan_hint = 0;
                block.contig_hint_start = 0;
                block.contig_hint = bb;
                block.left_free = bb;
                block.right_free = bb;
            }
        }

        // Refresh the chunk hint when the free makes a block free or spans
        // blocks; else a cheap update (KERNEL QUIRK: `end` block-relative,
        // see the module header).
        if end - start >= bb || s_index != e_index {
            self.chunk_refresh_hint(true);
        } else {
            let off = self.block_off_to_off(s_index, start);
            self.chunk_md.update(off, end);
        }
    }

    /// `pcpu_find_block_fit` (never `pop_only`: every page is populated):
    /// the offset where `pcpu_alloc_area` starts scanning, or None when the
    /// hints say `alloc_bits` aligned to `align` bits do not fit. Not quite
    /// first fit: a request that does not fit the chunk's (or a block's)
    /// contig hint where that hint is aligned skips it.
    pub fn find_block_fit(&self, alloc_bits: i32, align: i32) -> Option<i32> {
        let md = &self.chunk_md;
        // "if it cannot fit in the global hint, there is memory pressure and
        // creating a new chunk would happen soon"
        let pad = align_up(md.contig_hint_start, align) - md.contig_hint_start;
        if pad + alloc_bits > md.contig_hint {
            return None;
        }
        let mut bit_off = md.next_hint(alloc_bits);
        let mut bits = 0;
        // pcpu_for_each_fit_region: the first region returned is taken
        self.next_fit_region(alloc_bits, align, &mut bit_off, &mut bits);
        (bit_off < self.map_bits).then_some(bit_off)
    }

    /// `pcpu_find_zero_area`: `bitmap_find_next_zero_area_off` that
    /// remembers the largest (best aligned) area it skipped.
    fn find_zero_area(
        &self,
        size: i32,
        mut start: i32,
        nr: i32,
        align_mask: i32,
        largest_off: &mut i32,
        largest_bits: &mut i32,
    ) -> i32 {
        loop {
            let index = find_next_zero_bit(&self.alloc_map, size, start);
            // align allocation
            let index = (index + align_mask) & !align_mask;
            let area_off = index;
            let end = index + nr;
            if end > size {
                return end;
            }
            let i = find_next_bit(&self.alloc_map, end, index);
            if i < end {
                let area_bits = i - area_off;
                // remember largest unused area with best alignment
                if area_bits > *largest_bits
                    || (area_bits == *largest_bits
                        && *largest_off != 0
                        && (area_off == 0 || ffs(area_off) > ffs(*largest_off)))
                {
                    *largest_off = area_off;
                    *largest_bits = area_bits;
                }
                start = i + 1;
                continue;
            }
            return index;
        }
    }

    /// `pcpu_alloc_area`: scan the map from `start` (from
    /// [`find_block_fit`](Self::find_block_fit)) for `alloc_bits` aligned to
    /// `align` bits, within a block's length past the request; mark them and
    /// update the hints. Returns the bit offset, None if the scan failed.
    /// The caller relocates the chunk (`pcpu_chunk_relocate`) with the slot
    /// it had before.
    pub fn alloc_area(&mut self, alloc_bits: i32, align: i32, start: i32) -> Option<i32> {
        let (mut area_off, mut area_bits) = (0, 0);
        let end = (start + alloc_bits + self.block_bits).min(self.map_bits);
        let bit_off = self.find_zero_area(end, start, alloc_bits, align - 1, &mut area_off, &mut area_bits);
        if bit_off >= end {
            return None;
        }
        if area_bits != 0 {
            self.block_update_scan(area_off, area_bits);
        }
        bitmap_assign(&mut self.alloc_map, bit_off, alloc_bits, true);
        self.free_bytes -= alloc_bits * PCPU_MIN_ALLOC_SIZE as i32;
        // update first free bit
        if bit_off == self.chunk_md.first_free {
            self.chunk_md.first_free = find_next_zero_bit(&self.alloc_map, self.map_bits, bit_off + alloc_bits);
        }
        self.block_update_hint_alloc(bit_off, alloc_bits);
        Some(bit_off)
    }

    /// `pcpu_free_area`: clear `[bit_off, +bits)` (the kernel reads `bits`
    /// from the bound map) and update the hints. The caller relocates.
    pub fn free_area(&mut self, bit_off: i32, bits: i32) {
        bitmap_assign(&mut self.alloc_map, bit_off, bits, false);
        self.free_bytes += bits * PCPU_MIN_ALLOC_SIZE as i32;
        self.chunk_md.first_free = self.chunk_md.first_free.min(bit_off);
        self.block_update_hint_free(bit_off, bits);
    }

    /// Is bit `i` allocated?
    pub fn test_bit(&self, i: i32) -> bool {
        test_bit(&self.alloc_map, i)
    }

    /// Check percpu-hint-1..6 against a recomputation from the map; the
    /// violations found, each prefixed with `what`. The hints may under-state
    /// free space (as the kernel's do) but must never claim bits that are
    /// allocated.
    pub fn check(&self, what: &str) -> Vec<String> {
        let mut errs = Vec::new();
        let map = &self.alloc_map;
        let free_in = |lo: i32, hi: i32| lo >= 0 && hi <= self.map_bits && find_next_bit(map, hi, lo) >= hi;
        // free runs of [lo, hi): (start, len)
        let runs = |lo: i32, hi: i32| {
            let mut v = Vec::new();
            let mut rs = lo;
            loop {
                rs = find_next_zero_bit(map, hi, rs);
                if rs >= hi {
                    break;
                }
                let re = find_next_bit(map, hi, rs + 1);
                v.push((rs, re - rs));
                rs = re;
            }
            v
        };
        for (i, b) in self.md_blocks.iter().enumerate() {
            let (lo, hi) = (i as i32 * self.block_bits, (i as i32 + 1) * self.block_bits);
            let r = runs(lo, hi);
            let largest = r.iter().map(|&(_, l)| l).max().unwrap_or(0);
            let first = r.first().map_or(self.block_bits, |&(s, _)| s - lo);
            let left = r.first().filter(|&&(s, _)| s == lo).map_or(0, |&(_, l)| l);
            let right = r.last().filter(|&&(s, l)| s + l == hi).map_or(0, |&(_, l)| l);
            let tag = format!("{what} block {i}");
            if b.nr_bits != self.block_bits {
                errs.push(format!("percpu-hint-1: {tag}: nr_bits {} != {}", b.nr_bits, self.block_bits));
            }
            if b.contig_hint > largest || b.contig_hint < 0 {
                errs.push(format!("percpu-hint-1: {tag}: contig_hint {} but the largest free area is {largest}", b.contig_hint));
            }
            if b.contig_hint > 0 && !free_in(lo + b.contig_hint_start, lo + b.contig_hint_start + b.contig_hint) {
                errs.push(format!(
                    "percpu-hint-1: {tag}: contig hint [{}, +{}) is not free",
                    b.contig_hint_start, b.contig_hint
                ));
            }
            if b.left_free > left || b.right_free > right || b.left_free < 0 || b.right_free < 0 {
                errs.push(format!(
                    "percpu-hint-2: {tag}: left_free {} right_free {} but the free runs at the ends are {left} and {right}",
                    b.left_free, b.right_free
                ));
            }
            if b.first_free > first || b.first_free < 0 {
                errs.push(format!("percpu-hint-3: {tag}: first_free {} but the first free bit is {first}", b.first_free));
            }
            if b.scan_hint != 0
                && (b.scan_hint > b.contig_hint
                    || !free_in(lo + b.scan_hint_start, lo + b.scan_hint_start + b.scan_hint)
                    || (b.scan_hint_start > b.contig_hint_start && b.scan_hint != b.contig_hint))
            {
                errs.push(format!(
                    "percpu-hint-4: {tag}: scan hint [{}, +{}) (contig hint [{}, +{})) is not a free area within the rules",
                    b.scan_hint_start, b.scan_hint, b.contig_hint_start, b.contig_hint
                ));
            }
        }
        let r = runs(0, self.map_bits);
        let largest = r.iter().map(|&(_, l)| l).max().unwrap_or(0);
        let first = r.first().map_or(self.map_bits, |&(s, _)| s);
        let md = &self.chunk_md;
        if md.contig_hint > largest || (md.contig_hint > 0 && !free_in(md.contig_hint_start, md.contig_hint_start + md.contig_hint)) {
            errs.push(format!(
                "percpu-hint-5: {what}: chunk contig hint [{}, +{}) is not free (largest free area {largest})",
                md.contig_hint_start, md.contig_hint
            ));
        }
        if md.scan_hint != 0 && !free_in(md.scan_hint_start, md.scan_hint_start + md.scan_hint) {
            errs.push(format!(
                "percpu-hint-5: {what}: chunk scan hint [{}, +{}) is not free",
                md.scan_hint_start, md.scan_hint
            ));
        }
        if md.first_free > first || md.first_free < 0 {
            errs.push(format!("percpu-hint-5: {what}: chunk first_free {} but the first free bit is {first}", md.first_free));
        }
        let free: i32 = r.iter().map(|&(_, l)| l).sum();
        if self.free_bytes != free * PCPU_MIN_ALLOC_SIZE as i32 {
            errs.push(format!(
                "percpu-hint-6: {what}: free_bytes {} but the map has {} free bytes",
                self.free_bytes,
                free * PCPU_MIN_ALLOC_SIZE as i32
            ));
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_helpers() {
        let mut m = vec![0u64; 4];
        bitmap_assign(&mut m, 3, 70, true);
        assert_eq!(find_next_bit(&m, 256, 0), 3);
        assert_eq!(find_next_zero_bit(&m, 256, 3), 73);
        assert_eq!(find_next_zero_bit(&m, 50, 3), 50);
        assert_eq!(find_last_bit_in(&m, 0, 256), Some(72));
        assert_eq!(find_last_bit_in(&m, 0, 3), None);
        assert_eq!(find_last_bit_in(&m, 10, 64), Some(63));
        bitmap_assign(&mut m, 10, 60, false);
        assert_eq!(find_next_bit(&m, 256, 4), 4);
        assert_eq!(find_next_bit(&m, 256, 10), 70);
    }

    #[test]
    fn slots_follow_the_kernel() {
        // __pcpu_size_to_slot: fls(size) - 5 + 2, at least 1.
        assert_eq!(size_to_slot_raw(4), 1);
        assert_eq!(size_to_slot_raw(16), 2);
        assert_eq!(size_to_slot_raw(32), 3);
        assert_eq!(size_to_slot_raw(36 << 10), 13); // fls(0x9000) = 16
        assert_eq!(size_to_slot(36 << 10, 36 << 10), 14);
    }

    #[test]
    fn first_chunk_hides_its_start_and_fits_after_it() {
        let mut c = PcpuChunk::new(36 << 10, 4096);
        c.hide_start(2048); // 8 KiB
        assert!(c.check("c").is_empty(), "{:?}", c.check("c"));
        assert_eq!(c.chunk_md.first_free, 2048);
        assert_eq!(c.chunk_md.contig_hint, 9216 - 2048);
        let off = c.find_block_fit(4, 1).unwrap();
        assert_eq!(c.alloc_area(4, 1, off), Some(2048));
        assert!(c.check("c").is_empty(), "{:?}", c.check("c"));
    }
}
