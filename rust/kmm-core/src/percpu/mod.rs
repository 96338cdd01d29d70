//! The per-CPU allocator: `alloc_percpu`/`free_percpu` over chunks with one
//! unit per CPU, `per_cpu_ptr`/`this_cpu_ptr`, and named per-CPU variables.
//!
//! # Kernel
//! `mm/percpu.c` (`pcpu_alloc_noprof`, `free_percpu`, `pcpu_find_block_fit`,
//! `pcpu_alloc_area`, `pcpu_free_area`, `pcpu_create_chunk`,
//! `pcpu_obj_full_size`, `pcpu_nr_pages`), `include/linux/percpu.h`
//! (PCPU_MIN_UNIT_SIZE, PCPU_MIN_ALLOC_SIZE, PERCPU_DYNAMIC_RESERVE),
//! `include/linux/percpu-defs.h` (`per_cpu_ptr`, `this_cpu_ptr`,
//! `get_cpu_var`), `include/trace/events/percpu.h`.
//!
//! ```text
//!   chunk: | unit 0 (CPU 0) | unit 1 (CPU 1) | ... |   unit_size bytes each
//!   an allocation is one offset `off` valid in every unit:
//!   per_cpu_ptr(p, cpu) = chunk base + cpu * unit_size + off
//! ```
//!
//! SIMPLIFICATION: each unit of a chunk is its own block of pages from the
//! buddy allocator, populated when the chunk is created and reached through
//! the direct map (the kernel places units `unit_size` apart in the vmalloc
//! area and populates them lazily); the allocation map is a first-fit bitmap of 4-byte units
//! (the kernel adds per-block hints to skip full blocks). There is no
//! reserved chunk for modules. `__percpu` pointers are offsets from the first
//! chunk's base, as on x86_64 SMP where `__per_cpu_start` is 0.
//!
//! # Invariants
//! - percpu-1: a chunk's bitmap marks exactly the 4-byte units of its live
//!   allocations; allocations do not overlap.
//! - percpu-2: every live allocation is zero-initialised at allocation time
//!   in every unit.
//!
//! Lock order: `pcpu_alloc_mutex` (the chunk list) -> zone lock.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::error::{KmmError, Result};
use crate::gfp::{self, Gfp};
use crate::machine::{Machine, VirtAddr};
use crate::page::Pfn;
use crate::trace::{CallSite, EventId, Payload};

/// `PCPU_MIN_UNIT_SIZE`: 32 KiB, the largest allocation.
pub const PCPU_MIN_UNIT_SIZE: u64 = 32 << 10;
/// `PCPU_MIN_ALLOC_SIZE`: the allocation map's granularity.
pub const PCPU_MIN_ALLOC_SIZE: u64 = 4;
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
    /// One bit per 4-byte unit of a unit's space.
    map: Vec<u64>,
    free_bytes: u64,
    /// Bytes at the start reserved for other uses (the first chunk's module area).
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

    /// `pcpu_create_chunk`: one contiguous block of pages per CPU.
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
        let words = (unit / PCPU_MIN_ALLOC_SIZE).div_ceil(64) as usize;
        let reserved = if st.chunks.is_empty() { PERCPU_MODULE_RESERVE } else { 0 };
        let mut map = vec![0; words];
        Self::set_bits(&mut map, 0, reserved / PCPU_MIN_ALLOC_SIZE, true);
        st.chunks.push(Chunk { base, units, map, free_bytes: unit - reserved, reserved });
        Ok(st.chunks.len() - 1)
    }

    /// First fit in a chunk's bitmap for `bits` units aligned to `align_bits`.
    fn pcpu_find_fit(map: &[u64], total_bits: u64, bits: u64, align_bits: u64) -> Option<u64> {
        let test = |i: u64| map[(i / 64) as usize] & (1 << (i % 64)) != 0;
        let mut start = 0;
        while start + bits <= total_bits {
            match (start..start + bits).find(|&i| test(i)) {
                None => return Some(start),
                Some(busy) => start = (busy + 1).next_multiple_of(align_bits),
            }
        }
        None
    }

    fn set_bits(map: &mut [u64], start: u64, bits: u64, on: bool) {
        for i in start..start + bits {
            let (w, b) = ((i / 64) as usize, i % 64);
            if on {
                map[w] |= 1 << b;
            } else {
                map[w] &= !(1 << b);
            }
        }
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
        let unit = self.unit_size();
        let total_bits = unit / PCPU_MIN_ALLOC_SIZE;
        let (bits, align_bits) = (size / PCPU_MIN_ALLOC_SIZE, align / PCPU_MIN_ALLOC_SIZE);
        let mut st = self.percpu.state.lock();
        let mut found = None;
        for (ci, c) in st.chunks.iter().enumerate() {
            if c.free_bytes < size {
                continue;
            }
            if let Some(b) = Self::pcpu_find_fit(&c.map, total_bits, bits, align_bits) {
                found = Some((ci, b));
                break;
            }
        }
        let (ci, b) = match found {
            Some(f) => f,
            None if is_atomic && !st.chunks.is_empty() => {
                return Err(KmmError::OutOfMemory {
                    order: 0,
                    gfp,
                    message: format!(
                        "percpu: allocation failed, size={size} align={align} atomic=1, atomic alloc failed, no space left"
                    ),
                })
            }
            None => {
                let ci = self.pcpu_create_chunk(&mut st, gfp).map_err(|e| KmmError::OutOfMemory {
                    order: 0,
                    gfp,
                    message: format!(
                        "percpu: allocation failed, size={size} align={align} atomic={}, failed to allocate new chunk ({})",
                        u8::from(is_atomic),
                        e.message()
                    ),
                })?;
                let b = Self::pcpu_find_fit(&st.chunks[ci].map, total_bits, bits, align_bits).expect("fresh chunk fits");
                (ci, b)
            }
        };
        let c = &mut st.chunks[ci];
        Self::set_bits(&mut c.map, b, bits, true);
        c.free_bytes -= size;
        let off = b * PCPU_MIN_ALLOC_SIZE;
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
        let c = &mut st.chunks[a.chunk];
        Self::set_bits(&mut c.map, a.off / PCPU_MIN_ALLOC_SIZE, a.size / PCPU_MIN_ALLOC_SIZE, false);
        c.free_bytes += a.size;
        let base = c.base;
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

    /// Check percpu-1.
    pub fn check_percpu(&self) -> Vec<String> {
        let st = self.percpu.state.lock();
        let mut errs = Vec::new();
        let unit = self.unit_size();
        for (ci, c) in st.chunks.iter().enumerate() {
            let mut want = vec![0u64; c.map.len()];
            Self::set_bits(&mut want, 0, c.reserved / PCPU_MIN_ALLOC_SIZE, true);
            for a in st.allocs.values().filter(|a| a.chunk == ci) {
                for i in a.off / PCPU_MIN_ALLOC_SIZE..(a.off + a.size) / PCPU_MIN_ALLOC_SIZE {
                    let (w, b) = ((i / 64) as usize, i % 64);
                    if want[w] & (1 << b) != 0 {
                        errs.push(format!("percpu-1: chunk {ci}: allocations overlap at offset {}", i * 4));
                    }
                    want[w] |= 1 << b;
                }
            }
            if want != c.map {
                errs.push(format!("percpu-1: chunk {ci}: bitmap differs from the live allocations"));
            }
            let used: u64 = st.allocs.values().filter(|a| a.chunk == ci).map(|a| a.size).sum();
            if c.free_bytes + used + c.reserved != unit {
                errs.push(format!("percpu-1: chunk {ci}: free_bytes {} + used {used} != unit size {unit}", c.free_bytes));
            }
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
