//! The per-CPU allocator: `alloc_percpu`/`free_percpu` over chunks with one
//! unit per CPU, `per_cpu_ptr`/`this_cpu_ptr`, and named per-CPU variables.
//!
//! # Kernel
//! `mm/percpu.c` (`pcpu_alloc_noprof`, `free_percpu`, `pcpu_find_block_fit`,
//! `pcpu_alloc_area`, `pcpu_free_area`, `pcpu_create_chunk`,
//! `pcpu_chunk_relocate`, `pcpu_size_to_slot`, `pcpu_obj_full_size`,
//! `pcpu_nr_pages`), `mm/percpu-internal.h` (`struct pcpu_block_md`),
//! `include/linux/percpu.h` (PCPU_MIN_UNIT_SIZE, PCPU_MIN_ALLOC_SIZE,
//! PERCPU_DYNAMIC_RESERVE, PCPU_BITMAP_BLOCK_SIZE),
//! `include/linux/percpu-defs.h` (`per_cpu_ptr`, `this_cpu_ptr`,
//! `get_cpu_var`), `include/trace/events/percpu.h`.
//!
//! ```text
//!   chunk: | unit 0 (CPU 0) | unit 1 (CPU 1) | ... |   unit_size bytes each
//!   an allocation is one offset `off` valid in every unit:
//!   per_cpu_ptr(p, cpu) = chunk base + cpu * unit_size + off
//!
//!   chunk slots (pcpu_chunk_lists), by the size of a chunk's contig hint:
//!   slot 0: full or failed   1: < 16 B   2: < 32 B   ...   k: < 2^(k+3) B
//!   ...   free slot: entirely free chunks
//!   pcpu_alloc walks the slots from pcpu_size_to_slot(size) up, each list
//!   in order; a chunk's hints (chunk.rs) say in O(1) whether it can fit and
//!   where in its map the bitmap scan starts.
//! ```
//!
//! The search is the kernel's: chunk slots by free size, then
//! `pcpu_find_block_fit` over the per-block hints (`pcpu_block_md`, one per
//! PCPU_BITMAP_BLOCK_SIZE = PAGE_SIZE of a unit) and `pcpu_alloc_area`'s
//! bounded bitmap scan (see `chunk.rs`). An allocation's cost does not grow
//! with the number of live allocations. The offsets chosen are the kernel's:
//! first fit within a chunk as far as the hints allow (a request that fits
//! no block's or chunk's aligned contig hint skips it, and the scan hint
//! lets a search start past a known-too-small area), chunks tried from the
//! fullest slot that can hold the request rather than in creation order.
//!
//! SIMPLIFICATION: each unit of a chunk is its own block of pages from the
//! buddy allocator, populated when the chunk is created and reached through
//! the direct map (the kernel places units `unit_size` apart in the vmalloc
//! area and populates them lazily; so there is no populated bitmap, no
//! `nr_empty_pop_pages`, no balance work and no chunk is ever destroyed or
//! sidelined). There is no reserved chunk for modules: the first chunk's
//! first PERCPU_MODULE_RESERVE bytes are hidden as the kernel hides a first
//! chunk's static area (`pcpu_alloc_first_chunk`). One chunk type (no memcg
//! chunk lists, as in Linux 5.14+). No `bound_map`: an allocation's size is
//! kept in the allocation table. `__percpu` pointers are offsets from the
//! first chunk's base, as on x86_64 SMP where `__per_cpu_start` is 0.
//!
//! # Invariants
//! - percpu-1: a chunk's bitmap marks exactly the 4-byte units of its live
//!   allocations (and the first chunk's hidden start); allocations do not
//!   overlap; `free_bytes` counts the rest.
//! - percpu-2: every live allocation is zero-initialised at allocation time
//!   in every unit.
//! - percpu-3: every chunk is on one slot list: the slot `pcpu_chunk_slot`
//!   gives, or slot 0 if that slot is below PCPU_SLOT_FAIL_THRESHOLD (a
//!   chunk that failed a search there is moved to slot 0 until a free or an
//!   alloc changes its slot, as in the kernel). With percpu-slot-1 (slots.rs).
//! - percpu-hint-1..6: every block and chunk hint agrees with a
//!   recomputation from the bitmap (chunk.rs lists them).
//!
//! Lock order: `pcpu_alloc_mutex` (the chunk list; kmm's one state lock
//! also stands for `pcpu_lock`) -> zone lock.
#![forbid(unsafe_code)]

pub mod chunk;
mod slots;

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::error::{KmmError, Result};
use crate::gfp::{self, Gfp};
use crate::machine::{Machine, VirtAddr};
use crate::page::Pfn;
use crate::trace::{CallSite, EventId, Payload};

use chunk::{PcpuChunk, PCPU_SLOT_FAIL_THRESHOLD};
use slots::ChunkLists;

/// `PCPU_MIN_UNIT_SIZE`: 32 KiB, the largest allocation.
pub const PCPU_MIN_UNIT_SIZE: u64 = 32 << 10;
/// `PCPU_MIN_ALLOC_SIZE`: the allocation map's granularity.
pub use chunk::PCPU_MIN_ALLOC_SIZE;
/// `PERCPU_DYNAMIC_RESERVE` on 64-bit: dynamic space in the first chunk.
pub const PERCPU_DYNAMIC_RESERVE: u64 = 28 << 10;
/// `PERCPU_MODULE_RESERVE`: the first chunk's reserved area (for modules'
/// static per-CPU data), ahead of the dynamic area; kmm keeps it unused.
pub const PERCPU_MODULE_RESERVE: u64 = 8 << 10;

struct Chunk {
    /// Direct-map address of unit 0.
    base: u64,
    /// Head pfn and order of each unit's pages.
    units: Vec<(Pfn, u32)>,
    /// The allocation map and its hints.
    map: PcpuChunk,
    /// Bytes at the start hidden for other uses (the first chunk's module area).
    reserved: u64,
}

/// A live allocation.
#[derive(Clone, Copy, Debug)]
pub struct PercpuAlloc {
    pub chunk: usize,
    pub off: u64,
    pub size: u64,
    pub align: u64,
    /// Bumped at every allocation (stale handles are detected).
    pub gen: u64,
    /// Buffer exports alive.
    pub pins: u64,
}

/// The allocator's state (`pcpu_alloc_mutex`).
#[derive(Default)]
pub struct PercpuState {
    chunks: Vec<Chunk>,
    /// `pcpu_chunk_lists`: the chunk slots (made with the first chunk).
    lists: ChunkLists,
    allocs: HashMap<u64, PercpuAlloc>,
    /// Named per-CPU variables (`DEFINE_PER_CPU`).
    pub vars: HashMap<String, u64>,
    next_gen: u64,
    /// Populated pages of one unit, over all chunks.
    pub populated_pages: u64,
}

/// The per-CPU allocator of a machine.
#[derive(Default)]
pub struct Percpu {
    pub state: Mutex<PercpuState>,
}

impl Machine {
    fn unit_size(&self) -> u64 {
        PCPU_MIN_UNIT_SIZE.max(PERCPU_MODULE_RESERVE + PERCPU_DYNAMIC_RESERVE).next_multiple_of(self.page_size)
    }

    fn pcpu_ptr(&self, st: &PercpuState, chunk: usize, off: u64) -> u64 {
        st.chunks[chunk].base - st.chunks[0].base + off
    }

    /// `pcpu_create_chunk`: one contiguous block of pages per CPU, on the
    /// free slot's list (`pcpu_chunk_relocate(chunk, -1)`: at its head).
    fn pcpu_create_chunk(&self, st: &mut PercpuState, gfp: Gfp) -> Result<usize> {
        let unit = self.unit_size();
        let order = crate::slab::geometry::get_order(unit, self.page_size as u32);
        let mut units = Vec::new();
        for _ in 0..self.cfg.cpus {
            match self.alloc_pages((gfp & gfp::GFP_RECLAIM_MASK) | gfp::__GFP_ZERO | gfp::__GFP_COMP, order) {
                Ok(p) => units.push((p, order)),
                Err(e) => {
                    for (p, o) in units {
                        let _ = self.free_pages(p, o);
                    }
                    return Err(e);
                }
            }
        }
        // Units of a chunk must be `unit_size` apart: model each unit on its
        // own block and keep the addresses per unit.
        let base = self.page_address(units[0].0).expect("lowmem").0;
        st.populated_pages += 1 << order;
        // PCPU_BITMAP_BLOCK_SIZE is PAGE_SIZE.
        let mut map = PcpuChunk::new(unit, self.page_size);
        let reserved = if st.chunks.is_empty() {
            st.lists = ChunkLists::new(chunk::free_slot(map.map_bits * PCPU_MIN_ALLOC_SIZE as i32) + 1);
            PERCPU_MODULE_RESERVE
        } else {
            0
        };
        map.hide_start((reserved / PCPU_MIN_ALLOC_SIZE) as i32);
        st.chunks.push(Chunk { base, units, map, reserved });
        let ci = st.lists.add_chunk();
        debug_assert_eq!(ci, st.chunks.len() - 1);
        Self::pcpu_chunk_relocate(st, ci, -1);
        Ok(ci)
    }

    /// `pcpu_chunk_relocate`: after an alloc or free changed the chunk, move
    /// it to the list of its new slot if that differs from `oslot` (the slot
    /// it had before; a chunk moved to slot 0 after a failed search stays
    /// there when its slot did not change): to the head when it went up, to
    /// the tail when it went down (`__pcpu_chunk_move`).
    fn pcpu_chunk_relocate(st: &mut PercpuState, ci: usize, oslot: isize) {
        let nslot = st.chunks[ci].map.slot();
        if oslot != nslot as isize {
            st.lists.move_to(ci, nslot, oslot < nslot as isize);
        }
    }

    /// `pcpu_alloc`'s search: the slots from `pcpu_size_to_slot(size)` up to
    /// the free slot, each list in order (`list_for_each_entry_safe`);
    /// `pcpu_find_block_fit` then `pcpu_alloc_area`. A chunk whose hints say
    /// no in a slot below PCPU_SLOT_FAIL_THRESHOLD moves to slot 0
    /// (`pcpu_chunk_move(chunk, 0)`). Returns (chunk, bit offset).
    fn pcpu_search(st: &mut PercpuState, size: u64, bits: i32, align_bits: i32) -> Option<(usize, i32)> {
        if st.chunks.is_empty() {
            return None;
        }
        let unit_bytes = st.chunks[0].map.map_bits * PCPU_MIN_ALLOC_SIZE as i32;
        let free_slot = chunk::free_slot(unit_bytes);
        for slot in chunk::size_to_slot(size as i32, unit_bytes)..=free_slot {
            let mut cur = st.lists.first(slot);
            while let Some(ci) = cur {
                cur = st.lists.next(ci);
                let Some(start) = st.chunks[ci].map.find_block_fit(bits, align_bits) else {
                    if slot < PCPU_SLOT_FAIL_THRESHOLD {
                        st.lists.move_to(ci, 0, true);
                    }
                    continue;
                };
                let oslot = st.chunks[ci].map.slot() as isize;
                if let Some(b) = st.chunks[ci].map.alloc_area(bits, align_bits, start) {
                    Self::pcpu_chunk_relocate(st, ci, oslot);
                    return Some((ci, b));
                }
            }
        }
        None
    }

    /// `__alloc_percpu_gfp(size, align, gfp)`: zeroed memory in every CPU's
    /// unit. Returns the `__percpu` pointer.
    pub fn alloc_percpu(&self, size: u64, align: u64, gfp: Gfp, call_site: &CallSite) -> Result<u64> {
        self.refused_changes_nothing(|| self.alloc_percpu_(size, align, gfp, call_site))
    }

    fn alloc_percpu_(&self, size: u64, align: u64, gfp: Gfp, call_site: &CallSite) -> Result<u64> {
        let _d = self.trace.defer(); // page events under pcpu state lock
        let align = align.max(PCPU_MIN_ALLOC_SIZE);
        let size = size.checked_next_multiple_of(PCPU_MIN_ALLOC_SIZE).unwrap_or(0);
        if size == 0 || size > PCPU_MIN_UNIT_SIZE || align > self.page_size || !align.is_power_of_two() {
            return Err(KmmError::InvalidArgument(format!(
                "illegal size ({size}) or align ({align}) for percpu allocation"
            )));
        }
        let is_atomic = !gfp::allow_blocking(gfp);
        if !is_atomic {
            self.might_alloc(gfp, "mm/percpu.c (pcpu_alloc_noprof -> mutex_lock)")?;
        }
        let (bits, align_bits) = ((size / PCPU_MIN_ALLOC_SIZE) as i32, (align / PCPU_MIN_ALLOC_SIZE) as i32);
        let mut st = self.percpu.state.lock();
        // restart: search; no fit -> a new chunk (never for atomic requests
        // once the first chunk exists), search again. A second new chunk at
        // most: the first chunk's hidden start may leave too little room.
        let mut created = 0;
        let (ci, b) = loop {
            if let Some(f) = Self::pcpu_search(&mut st, size, bits, align_bits) {
                break f;
            }
            if is_atomic && !st.chunks.is_empty() {
                return Err(KmmError::OutOfMemory {
                    order: 0,
                    gfp,
                    message: format!(
                        "percpu: allocation failed, size={size} align={align} atomic=1, atomic alloc failed, no space left"
                    ),
                });
            }
            if created == 2 {
                // A free chunk fits every legal request (size <=
                // PCPU_MIN_UNIT_SIZE <= unit_size, align <= PAGE_SIZE).
                return Err(KmmError::OutOfMemory {
                    order: 0,
                    gfp,
                    message: format!("percpu: allocation failed, size={size} align={align}, no fit in a new chunk"),
                });
            }
            self.pcpu_create_chunk(&mut st, gfp).map_err(|e| KmmError::OutOfMemory {
                order: 0,
                gfp,
                message: format!(
                    "percpu: allocation failed, size={size} align={align} atomic={}, failed to allocate new chunk ({})",
                    u8::from(is_atomic),
                    e.message()
                ),
            })?;
            created += 1;
        };
        let c = &st.chunks[ci];
        let off = b as u64 * PCPU_MIN_ALLOC_SIZE;
        // Zero every unit's copy (memset in pcpu_alloc).
        for &(pfn, _) in &c.units {
            let pa = self.pfn_to_phys(pfn).0 + off;
            self.phys.zero(pa, size)?;
        }
        st.next_gen += 1;
        let gen = st.next_gen;
        let ptr = self.pcpu_ptr(&st, ci, off);
        st.allocs.insert(ptr, PercpuAlloc { chunk: ci, off, size, align, gen, pins: 0 });
        let base = st.chunks[ci].base;
        drop(st);
        if self.trace.on(EventId::PercpuAllocPercpu) {
            self.trace.emit(
                self.this_cpu(),
                Payload::PercpuAllocPercpu {
                    call_site: call_site.clone(),
                    reserved: false,
                    is_atomic,
                    size,
                    align,
                    base_addr: base,
                    off: off as i64,
                    ptr,
                    // pcpu_obj_full_size: every unit, plus memcg's obj_cgroup pointers.
                    bytes_alloc: size * self.cfg.cpus as u64 + size / PCPU_MIN_ALLOC_SIZE * 8,
                    gfp_flags: gfp,
                },
            );
        }
        Ok(ptr)
    }

    /// `free_percpu(ptr)`: NULL is a no-op; callable from atomic context.
    pub fn free_percpu(&self, ptr: u64) -> Result<()> {
        let _d = self.trace.defer(); // page events under pcpu state lock
        let mut st = self.percpu.state.lock();
        let Some(&a) = st.allocs.get(&ptr) else {
            if ptr == 0 {
                return Ok(());
            }
            let owner = st.allocs.iter().find(|(&p, a)| ptr > p && ptr < p + a.size).map(|(&p, _)| p);
            return Err(match owner {
                Some(p) => KmmError::InvalidFree(format!(
                    "free_percpu: {ptr:#x} is inside the per-CPU allocation at {p:#x}, not its start"
                )),
                None => KmmError::DoubleFree(format!(
                    "free_percpu: {ptr:#x} is not a live per-CPU allocation (double free or corruption?)"
                )),
            });
        };
        if a.pins > 0 {
            return Err(KmmError::BufferBusy(format!(
                "cannot free per-CPU allocation {ptr:#x}: a buffer export (memoryview) of it is alive"
            )));
        }
        st.allocs.remove(&ptr);
        // pcpu_free_area + pcpu_chunk_relocate
        let oslot = st.chunks[a.chunk].map.slot() as isize;
        st.chunks[a.chunk].map.free_area((a.off / PCPU_MIN_ALLOC_SIZE) as i32, (a.size / PCPU_MIN_ALLOC_SIZE) as i32);
        Self::pcpu_chunk_relocate(&mut st, a.chunk, oslot);
        let base = st.chunks[a.chunk].base;
        drop(st);
        if self.trace.on(EventId::PercpuFreePercpu) {
            self.trace
                .emit(self.this_cpu(), Payload::PercpuFreePercpu { base_addr: base, off: a.off as i64, ptr });
        }
        Ok(())
    }

    /// `per_cpu_ptr(ptr, cpu)`: the address of `cpu`'s copy, its size and
    /// the allocation's generation.
    pub fn per_cpu_ptr(&self, ptr: u64, cpu: u32) -> Result<(VirtAddr, u64, u64)> {
        if cpu >= self.cfg.cpus {
            return Err(KmmError::InvalidArgument(format!(
                "per_cpu_ptr: cpu {cpu} does not exist (the machine has {} CPUs)",
                self.cfg.cpus
            )));
        }
        let st = self.percpu.state.lock();
        let a = st.allocs.get(&ptr).ok_or_else(|| {
            KmmError::UseAfterFree(format!("per_cpu_ptr: {ptr:#x} is not a live per-CPU allocation"))
        })?;
        let (pfn, _) = st.chunks[a.chunk].units[cpu as usize];
        let va = self.page_address(pfn).expect("lowmem").0 + a.off;
        Ok((VirtAddr(va), a.size, a.gen))
    }

    /// Is `ptr` live with generation `gen`?
    pub fn percpu_live(&self, ptr: u64, gen: u64) -> bool {
        self.percpu.state.lock().allocs.get(&ptr).is_some_and(|a| a.gen == gen)
    }

    /// Count a buffer export of a per-CPU allocation (free is refused while > 0).
    pub fn percpu_pin(&self, ptr: u64, pin: bool) {
        if let Some(a) = self.percpu.state.lock().allocs.get_mut(&ptr) {
            if pin {
                a.pins += 1;
            } else {
                a.pins = a.pins.saturating_sub(1);
            }
        }
    }

    /// `DEFINE_PER_CPU(name)` at run time: a named per-CPU variable.
    pub fn define_per_cpu(&self, name: &str, size: u64, align: u64) -> Result<u64> {
        if self.percpu.state.lock().vars.contains_key(name) {
            return Err(KmmError::InvalidArgument(format!("per-CPU variable '{name}' is already defined")));
        }
        let ptr = self.alloc_percpu(size, align, gfp::GFP_KERNEL, &crate::trace::unknown_call_site())?;
        self.percpu.state.lock().vars.insert(name.to_string(), ptr);
        Ok(ptr)
    }

    /// The pointer of a named per-CPU variable.
    pub fn per_cpu_var(&self, name: &str) -> Result<u64> {
        self.percpu
            .state
            .lock()
            .vars
            .get(name)
            .copied()
            .ok_or_else(|| KmmError::InvalidArgument(format!("no per-CPU variable named '{name}'")))
    }

    /// Every live allocation in every CPU's unit as (physical address,
    /// bytes): the per-CPU memory kmemleak scans (mm/kmemleak.c: dynamic
    /// per-CPU objects are `kmemleak_alloc_percpu`'d with min_count 0, so
    /// scanned while allocated; freed space is not scanned).
    pub(crate) fn pcpu_alloc_ranges(&self) -> Vec<(u64, u64)> {
        let st = self.percpu.state.lock();
        let mut out = Vec::new();
        for a in st.allocs.values() {
            let Some(c) = st.chunks.get(a.chunk) else { continue };
            for &(pfn, order) in &c.units {
                if a.off.saturating_add(a.size) <= self.page_size << order {
                    out.push(((pfn.0 << self.page_shift) + a.off, a.size));
                }
            }
        }
        out
    }

    /// `pcpu_nr_pages()`: populated pages times units (meminfo's Percpu).
    pub fn pcpu_nr_pages(&self) -> u64 {
        self.percpu.state.lock().populated_pages * self.cfg.cpus as u64
    }

    /// Check percpu-1, percpu-3, percpu-slot-1 and percpu-hint-1..6 (every
    /// hint against a recomputation from the bitmaps).
    pub fn check_percpu(&self) -> Vec<String> {
        let st = self.percpu.state.lock();
        let mut errs = Vec::new();
        let unit = self.unit_size();
        let mut by_chunk: Vec<Vec<&PercpuAlloc>> = vec![Vec::new(); st.chunks.len()];
        for a in st.allocs.values() {
            match by_chunk.get_mut(a.chunk) {
                Some(v) => v.push(a),
                None => errs.push(format!("percpu-1: an allocation names chunk {} of {}", a.chunk, st.chunks.len())),
            }
        }
        for (ci, c) in st.chunks.iter().enumerate() {
            let mut want = vec![0u64; c.map.alloc_map.len()];
            let mark = |want: &mut Vec<u64>, i: u64| {
                let (w, b) = ((i / 64) as usize, i % 64);
                let was = want[w] & (1 << b) != 0;
                want[w] |= 1 << b;
                was
            };
            for i in 0..c.reserved / PCPU_MIN_ALLOC_SIZE {
                mark(&mut want, i);
            }
            for a in &by_chunk[ci] {
                for i in a.off / PCPU_MIN_ALLOC_SIZE..(a.off + a.size) / PCPU_MIN_ALLOC_SIZE {
                    if mark(&mut want, i) {
                        errs.push(format!("percpu-1: chunk {ci}: allocations overlap at offset {}", i * 4));
                    }
                }
            }
            if want != c.map.alloc_map {
                errs.push(format!("percpu-1: chunk {ci}: bitmap differs from the live allocations"));
            }
            let used: u64 = by_chunk[ci].iter().map(|a| a.size).sum();
            if c.map.free_bytes as u64 + used + c.reserved != unit {
                errs.push(format!(
                    "percpu-1: chunk {ci}: free_bytes {} + used {used} + hidden {} != unit size {unit}",
                    c.map.free_bytes, c.reserved
                ));
            }
            errs.extend(c.map.check(&format!("chunk {ci}")));
            let want_slot = c.map.slot();
            match st.lists.slot_of(ci) {
                Some(s) if s == want_slot || (s == 0 && want_slot < PCPU_SLOT_FAIL_THRESHOLD) => {}
                s => errs.push(format!("percpu-3: chunk {ci} is on slot {s:?}'s list, its slot is {want_slot}")),
            }
        }
        if !st.chunks.is_empty() {
            errs.extend(st.lists.check());
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Machine, MachineConfig};

    #[test]
    fn alloc_free_and_per_cpu_copies() {
        let m = Machine::new(MachineConfig { memory: 256 << 20, ..MachineConfig::default() }).unwrap();
        let cs = crate::trace::unknown_call_site();
        let p = m.alloc_percpu(16, 8, gfp::GFP_KERNEL, &cs).unwrap();
        let q = m.alloc_percpu(100, 64, gfp::GFP_KERNEL, &cs).unwrap();
        assert_eq!(q % 64, 0);
        let (a0, s0, _) = m.per_cpu_ptr(p, 0).unwrap();
        let (a1, _, _) = m.per_cpu_ptr(p, 1).unwrap();
        assert_eq!(s0, 16);
        assert_ne!(a0, a1);
        m.write(a0, &[1; 16]).unwrap();
        assert_eq!(m.read(a1, 16).unwrap(), vec![0; 16], "each CPU has its own copy");
        assert!(m.check_percpu().is_empty());
        m.free_percpu(p).unwrap();
        assert!(matches!(m.free_percpu(p), Err(KmmError::DoubleFree(_))));
        let r = m.alloc_percpu(16, 8, gfp::GFP_KERNEL, &cs).unwrap();
        assert_eq!(r, p, "first fit reuses the hole");
        assert_eq!(m.read(m.per_cpu_ptr(r, 0).unwrap().0, 16).unwrap(), vec![0; 16], "zeroed again");
        assert!(m.alloc_percpu(0, 8, gfp::GFP_KERNEL, &cs).is_err());
        assert!(m.alloc_percpu(PCPU_MIN_UNIT_SIZE + 4, 8, gfp::GFP_KERNEL, &cs).is_err());
        assert!(m.alloc_percpu(8, 12, gfp::GFP_KERNEL, &cs).is_err(), "align 12 is not a power of two");
        assert!(m.alloc_percpu(8, 8192, gfp::GFP_KERNEL, &cs).is_err(), "align above PAGE_SIZE");
        m.free_percpu(0).unwrap();
        assert!(m.check_percpu().is_empty());
    }
}
