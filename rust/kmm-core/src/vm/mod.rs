//! Virtual memory: the kernel's page tables, a per-CPU TLB model, vmalloc,
//! high-memory kmap and kernel stacks.
//!
//! ```text
//!   Machine::read/write/access(va)
//!      -> the KASAN check (kasan=on, kasan.rs)
//!      -> this CPU's TLB (tlb.rs) --miss--> page walk (pgtable.rs) -> fill
//!      -> physical bytes (physmem.rs)
//!   vmalloc.rs: vmap areas over [VMALLOC_START, VMALLOC_END), pages mapped
//!               one by one, lazy unmap + batched TLB flush
//!   highmem.rs: pkmap window (kmap), per-CPU fixmap slots (kmap_local)
//!   stack.rs:   THREAD_SIZE stacks, vmapped with a guard page or not
//! ```
//!
//! # Kernel
//! `arch/x86/mm/init.c`, `arch/x86/mm/init_64.c` / `init_32.c` (the direct
//! map), `arch/x86/mm/tlb.c` (flush_tlb_kernel_range, flush_tlb_all),
//! `arch/x86/mm/fault.c` (the oops text), and the files each submodule names.
//!
//! Simplifications (each explained where it lives): boot page tables in an
//! arena beyond RAM, built lazily upper tables for vmalloc (the kernel
//! preallocates x86_64's PUDs), first-fit over a BTreeMap of free ranges,
//! the fixmap holding only kmap_local slots, kmap_local disabling
//! preemption, no cache of freed vmapped stacks, IRQ stacks made on first use.
//!
//! # Invariants
//! - vm-1: the direct map translates every lowmem virtual address to
//!   `va - PAGE_OFFSET` (checked on a sample in `check`).
//! - the submodules' own (pgtable-1, tlb-1, vmalloc-1.., kmap-1..).
//!
//! Lock order: vmap_area_lock -> page_table_lock (no allocation under it:
//! tables are allocated before it is taken); kmap_lock -> TLB locks; a CPU's
//! TLB lock is innermost and never held while another is taken.
#![forbid(unsafe_code)]

pub mod highmem;
pub mod pgtable;
pub mod stack;
pub mod tlb;
pub mod vmalloc;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::arch::Arch;
use crate::error::{KmmError, Result};
use crate::gfp;
use crate::machine::{Machine, MachineConfig, VirtAddr};
use crate::page::{Pfn, PG_TABLE};
use pgtable::{PageTables, Translation, WalkErr};
use tlb::{Tlb, TlbConfig, TlbStats};

/// `tlb_single_page_flush_ceiling` (arch/x86/mm/tlb.c): above this many
/// pages a range flush becomes a full flush.
pub const TLB_SINGLE_PAGE_FLUSH_CEILING: u64 = 33;

/// The virtual-memory state of a machine.
pub struct Vm {
    pub pt: PageTables,
    pub tlbs: Box<[spin::Mutex<Tlb>]>,
    pub tlb_cfg: TlbConfig,
    pub vmalloc: vmalloc::Vmalloc,
    pub highmem: highmem::Highmem,
    pub stacks: stack::Stacks,
    /// Flush IPIs sent, machine-wide.
    pub ipis: AtomicU64,
}

impl Vm {
    /// Boot-time page tables: the direct map, and on highmem machines the
    /// pkmap and fixmap PTE tables.
    /// How many boot page tables the arena holds (an upper bound).
    pub fn arena_tables(cfg: &MachineConfig, page_shift: u32, max_low_pfn: u64) -> usize {
        let ps = 1u64 << page_shift;
        let lowmem = max_low_pfn << page_shift;
        let hm = highmem::Layout::new(cfg.arch, page_shift, cfg.cpus, lowmem);
        let entries_guess = ps / 8;
        8 + (lowmem / (entries_guess * entries_guess * ps)) as usize + hm.fixmap_tables() + 2
    }

    /// `arena_in_ram`: the physical address of reserved RAM pages that hold
    /// the boot tables, when they cannot sit above RAM (see `pgtable.rs`).
    pub fn new(
        cfg: &MachineConfig,
        page_shift: u32,
        max_low_pfn: u64,
        pm: &crate::physmem::PhysMem,
        arena_in_ram: Option<u64>,
    ) -> Result<Vm> {
        let ps = 1u64 << page_shift;
        let lowmem = max_low_pfn << page_shift;
        let (levels, _) = PageTables::geometry(cfg.arch);
        let hm = highmem::Layout::new(cfg.arch, page_shift, cfg.cpus, lowmem);
        let arena = Self::arena_tables(cfg, page_shift, max_low_pfn);
        let pt = PageTables::new(cfg.arch, page_shift, cfg.memory, arena, arena_in_ram);
        let mut next = 1usize;
        let mut alloc = || -> Result<u64> {
            let t = pt.arena_table(next);
            next += 1;
            Ok(t)
        };
        // init_memory_mapping / split_mem_range, as proc.rs's DirectMap lines
        // describe it: 4K pages below the first PMD, PMD-size pages after,
        // 1 GiB pages (x86_64) from 1 GiB to the last whole GiB, then PMD
        // and 4K pages for the tail.
        let base = cfg.arch.page_offset();
        let pmd = pt.level_size(1);
        let head_end = lowmem.min(pmd);
        let big_end = (lowmem / pmd * pmd).max(head_end);
        let gb = if cfg.arch == Arch::X86_64 && levels > 2 { pt.level_size(2) } else { u64::MAX };
        let gb_end = if gb == u64::MAX { 0 } else { lowmem / gb * gb };
        let mut pa = 0u64;
        while pa < lowmem {
            let level = if pa < head_end || pa >= big_end {
                0
            } else if pa >= gb && pa < gb_end {
                2
            } else {
                1
            };
            pt.map(pm, base + pa, pa, level, &mut alloc)?;
            pa += pt.level_size(level);
        }
        if hm.highmem {
            // permanent_kmaps_init / kmap_init: one PTE table for the pkmap
            // window, and the fixmap's PTE tables for the kmap_local slots.
            let t = alloc()?;
            pt.link_table(pm, hm.pkmap_base, 0, t, &mut alloc)?;
            let mut va = hm.fixmap_bottom() & !(pt.level_size(1) - 1);
            while va < hm.fixaddr_top + ps {
                let t = alloc()?;
                pt.link_table(pm, va, 0, t, &mut alloc)?;
                va += pt.level_size(1);
                if va == 0 {
                    break; // wrapped past the top of the 32-bit space
                }
            }
        }
        let shifts = [page_shift, pt.level_size(1).trailing_zeros(), pt.level_size(2).trailing_zeros()];
        let tlbs = (0..cfg.cpus).map(|_| spin::Mutex::new(Tlb::new(&cfg.tlb, shifts))).collect();
        let (vstart, vend) = hm.vmalloc_range(cfg.arch, lowmem);
        Ok(Vm {
            pt,
            tlbs,
            tlb_cfg: cfg.tlb,
            vmalloc: vmalloc::Vmalloc::new(vstart, vend, cfg.cpus),
            highmem: highmem::Highmem::new(hm, cfg.cpus),
            stacks: stack::Stacks::new(cfg.cpus),
            ipis: AtomicU64::new(0),
        })
    }
}

impl Machine {
    /// The page-walk oops text (arch/x86/mm/fault.c `show_fault_oops`).
    pub(crate) fn fault(&self, va: u64, write: bool, why: &str) -> KmmError {
        KmmError::PageFault(format!(
            "BUG: unable to handle page fault for address: {va:#x}\n#PF: supervisor {} access in kernel mode\n\
             #PF: error_code({:#06x}) - not-present page{why}",
            if write { "write" } else { "read" },
            if write { 2 } else { 0 }
        ))
    }

    /// Walk the kernel page tables for `va` (no TLB): `m.translate(addr)`.
    pub fn translate(&self, va: VirtAddr) -> Result<Translation> {
        self.vm.pt.walk(&self.phys, va.0).map_err(|WalkErr::NotPresent { .. }| self.fault(va.0, false, ""))
    }

    /// The MMU: translate `va` through this CPU's TLB, walking the page
    /// tables on a miss. Returns (physical address, bytes to the page end).
    #[inline]
    pub fn mmu(&self, va: u64, write: bool) -> Result<(u64, u64)> {
        let cpu = self.this_cpu() as usize;
        let mut t = self.vm.tlbs[cpu].lock();
        if let Some(h) = t.lookup(va) {
            let size = self.vm.pt.level_size(h.class as u32);
            let off = va & (size - 1);
            return Ok((h.base + off, size - off));
        }
        t.stats.walks += 1;
        match self.vm.pt.walk(&self.phys, va) {
            Ok(tr) => {
                t.stats.walk_reads += tr.reads as u64;
                let class = t.class_of(tr.page_size);
                t.fill(va, tr.phys & !(tr.page_size - 1), class);
                Ok((tr.phys, tr.page_size - (va & (tr.page_size - 1))))
            }
            Err(WalkErr::NotPresent { level }) => {
                t.stats.walk_reads += (self.vm.pt.levels - level) as u64;
                drop(t);
                Err(self.fault(va, write, ""))
            }
        }
    }

    /// Touch `[va, va+n)` through the MMU (each page once), as a load or a
    /// store would, without moving data. Faults change nothing but the TLB.
    /// With `kasan=on` the access is checked against the shadow first
    /// (`kasan.rs`): a bad one is reported and touches nothing.
    pub fn access(&self, va: VirtAddr, n: usize, write: bool) -> Result<()> {
        if self.kasan_on() {
            self.kasan_check(va.0, n as u64, write)?;
        }
        self.access_nocheck(va, n, write)
    }

    /// `access` without the KASAN check (uninstrumented code: stack pushes).
    pub(crate) fn access_nocheck(&self, va: VirtAddr, n: usize, write: bool) -> Result<()> {
        let mut at = va.0;
        let mut left = n as u64;
        while left > 0 {
            let (_, room) = self.mmu(at, write)?;
            let k = room.min(left);
            left -= k;
            at = at.checked_add(k).ok_or_else(|| self.fault(u64::MAX, write, ""))?;
        }
        Ok(())
    }

    /// Check the whole range translates before touching any byte (so a
    /// faulting access changes no memory), then return the chunks.
    fn chunks(&self, va: u64, n: usize, write: bool) -> Result<Vec<(u64, usize)>> {
        let mut out = Vec::with_capacity(1);
        let mut at = va;
        let mut left = n as u64;
        while left > 0 {
            let (pa, room) = self.mmu(at, write)?;
            let k = room.min(left);
            out.push((pa, k as usize));
            left -= k;
            if left > 0 {
                at = at.checked_add(k).ok_or_else(|| self.fault(u64::MAX, write, ""))?;
            }
        }
        Ok(out)
    }

    /// `memcpy` from kernel virtual memory, through the MMU model (and,
    /// with `kasan=on`, the KASAN check). A buffer the host cannot
    /// allocate is an error, not an abort.
    pub fn read(&self, va: VirtAddr, n: usize) -> Result<Vec<u8>> {
        if self.kasan_on() {
            self.kasan_check(va.0, n as u64, false)?;
        }
        self.read_nocheck(va, n)
    }

    /// `read` without the KASAN check (`kasan_disable_current()`
    /// sections: krealloc's copy of the old object).
    pub(crate) fn read_nocheck(&self, va: VirtAddr, n: usize) -> Result<Vec<u8>> {
        let chunks = self.chunks(va.0, n, false)?; // fault before allocating
        let mut buf = Vec::new();
        buf.try_reserve_exact(n).map_err(|_| {
            KmmError::Host(format!("read of {n} bytes at {:#x}: the host cannot allocate a buffer that large", va.0))
        })?;
        buf.resize(n, 0);
        self.copy_chunks(&chunks, &mut buf)?;
        Ok(buf)
    }

    /// The physical pieces of `[va, va + n)` through the MMU, as `read`
    /// walks them (a fault before anything is allocated or copied): for
    /// callers that bring their own buffer (`copy_chunks`). With
    /// `kasan=on` this is a read and KASAN checks it first.
    pub fn translate_range(&self, va: VirtAddr, n: usize) -> Result<Vec<(u64, usize)>> {
        if self.kasan_on() {
            self.kasan_check(va.0, n as u64, false)?;
        }
        self.chunks(va.0, n, false)
    }

    /// Copy the pieces `translate_range` found into `buf` (their total length).
    pub fn copy_chunks(&self, chunks: &[(u64, usize)], buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        for &(pa, k) in chunks {
            self.phys.read(pa, &mut buf[done..done + k])?;
            done += k;
        }
        Ok(())
    }

    /// `memcpy` into kernel virtual memory, through the MMU model (and,
    /// with `kasan=on`, the KASAN check: a bad write changes nothing).
    pub fn write(&self, va: VirtAddr, data: &[u8]) -> Result<()> {
        if self.kasan_on() {
            self.kasan_check(va.0, data.len() as u64, true)?;
        }
        self.write_nocheck(va, data)
    }

    /// `write` without the KASAN check (uninstrumented code: stack pushes,
    /// kmm's own bookkeeping writes).
    pub(crate) fn write_nocheck(&self, va: VirtAddr, data: &[u8]) -> Result<()> {
        let mut done = 0;
        for (pa, k) in self.chunks(va.0, data.len(), true)? {
            self.phys.write(pa, &data[done..done + k])?;
            done += k;
        }
        Ok(())
    }

    /// Per-CPU TLB counters.
    pub fn tlb_stats(&self) -> Vec<TlbStats> {
        self.vm.tlbs.iter().map(|t| t.lock().stats).collect()
    }

    /// Valid TLB entries per CPU: (first level, second level).
    pub fn tlb_occupancy(&self) -> Vec<(usize, usize)> {
        self.vm.tlbs.iter().map(|t| t.lock().occupancy()).collect()
    }

    /// `flush_tlb_one_kernel`: INVLPG on this CPU only.
    pub fn flush_tlb_one_kernel(&self, va: u64) {
        let cpu = self.this_cpu() as usize;
        self.vm.tlbs[cpu].lock().flush_one(va);
    }

    /// `flush_tlb_kernel_range(start, end)`: every CPU, through IPIs
    /// (counted on the sender and each receiver); a full flush above
    /// `TLB_SINGLE_PAGE_FLUSH_CEILING` pages, else one INVLPG per page.
    pub fn flush_tlb_kernel_range(&self, start: u64, end: u64) {
        let me = self.this_cpu() as usize;
        let pages = end.saturating_sub(start).div_ceil(self.page_size);
        let full = pages > TLB_SINGLE_PAGE_FLUSH_CEILING;
        if self.trace.on(crate::trace::EventId::TlbFlush) {
            self.trace.emit(
                me as u32,
                crate::trace::Payload::TlbFlush {
                    start,
                    end,
                    pages: if full { -1 } else { pages as i64 },
                    ipis: self.vm.tlbs.len() as u32 - 1,
                },
            );
        }
        for (c, t) in self.vm.tlbs.iter().enumerate() {
            let mut t = t.lock();
            if c != me {
                t.stats.ipis += 1;
            }
            if full {
                t.flush_all();
            } else {
                let mut va = start & !(self.page_size - 1);
                while va < end {
                    t.flush_one(va);
                    va += self.page_size;
                }
            }
        }
        let others = self.vm.tlbs.len() as u64 - 1;
        self.vm.tlbs[me].lock().stats.shootdowns += others;
        self.vm.ipis.fetch_add(others, Relaxed);
    }

    /// `flush_tlb_all`: a full flush on every CPU.
    pub fn flush_tlb_all(&self) {
        self.flush_tlb_kernel_range(0, u64::MAX);
    }

    /// A zeroed page-table page from the buddy allocator
    /// (`__pte_alloc_kernel` -> `pte_alloc_one_kernel`, GFP_PGTABLE_KERNEL).
    pub(crate) fn alloc_table_page(&self, gfp: gfp::Gfp) -> Result<u64> {
        let pfn = self.alloc_pages((gfp & !gfp::__GFP_HIGHMEM) | gfp::__GFP_ZERO, 0)?;
        self.mem_map.get(pfn.0).set_flag(PG_TABLE);
        self.vm.pt.nr_runtime_tables.fetch_add(1, Relaxed);
        Ok(self.pfn_to_phys(pfn).0)
    }

    /// Map `pfns` at `va` with base pages (vmap_pages_range). The tables
    /// it needs are allocated first, with no lock held (a table allocation
    /// may wait for a CPU another thread holds, and that thread may be
    /// waiting for the page-table lock), then installed under the lock, as
    /// `__pte_alloc_kernel` does; spares are given back. On error, unmaps
    /// what it mapped (and installed no table). Returns the tables it
    /// installed.
    pub(crate) fn map_pages_at(&self, va: u64, pfns: &[Pfn], gfp: gfp::Gfp) -> Result<Vec<u64>> {
        // A table page's mm_page_alloc event is delivered after the locks
        // drop (a trace sink may call back into vmalloc).
        let _defer = self.trace.defer();
        let need = self.vm.pt.missing_tables(&self.phys, va, pfns.len() as u64);
        let mut pool = Vec::with_capacity(need);
        for _ in 0..need {
            match self.alloc_table_page(gfp) {
                Ok(t) => pool.push(t),
                Err(e) => {
                    self.free_table_pages(pool);
                    return Err(e);
                }
            }
        }
        let allocated = pool.clone();
        let r = {
            let _g = self.vm.pt.lock.lock();
            let mut r = Ok(());
            for (i, p) in pfns.iter().enumerate() {
                let at = va + i as u64 * self.page_size;
                if let Err(e) = self.vm.pt.map(&self.phys, at, self.pfn_to_phys(*p).0, 0, &mut || {
                    pool.pop().ok_or_else(|| KmmError::Bug("page tables vanished while vmalloc mapped".into()))
                }) {
                    for j in 0..i {
                        self.vm.pt.unmap(&self.phys, va + j as u64 * self.page_size);
                    }
                    r = Err(e);
                    break;
                }
            }
            r
        };
        let installed: Vec<u64> = allocated.into_iter().filter(|t| !pool.contains(t)).collect();
        self.free_table_pages(pool);
        r.map(|()| installed)
    }

    /// Unlink and free those of `tables` (installed by one mapping of
    /// `[start, end)`) that map nothing any more: undoing a vmalloc that
    /// failed after it mapped its page array (a refused call changes
    /// nothing; the kernel keeps such tables).
    pub(crate) fn free_new_tables(&self, start: u64, end: u64, tables: &[u64]) {
        if tables.is_empty() {
            return;
        }
        let freed = {
            let _g = self.vm.pt.lock.lock();
            self.vm.pt.unlink_empty(&self.phys, start, end, tables)
        };
        self.free_table_pages(freed);
    }

    /// Give back table pages that were not installed.
    fn free_table_pages(&self, pool: Vec<u64>) {
        for t in pool {
            let pfn = self.phys_to_pfn(crate::PhysAddr(t));
            self.mem_map.get(pfn.0).clear_flag(PG_TABLE);
            self.vm.pt.nr_runtime_tables.fetch_sub(1, Relaxed);
            let _ = self.free_pages(pfn, 0);
        }
    }

    /// `vunmap_range_noflush`: clear the PTEs of `[va, va + n pages)`.
    pub(crate) fn unmap_pages_at(&self, va: u64, n: u64) {
        let _g = self.vm.pt.lock.lock();
        for i in 0..n {
            self.vm.pt.unmap(&self.phys, va + i * self.page_size);
        }
    }

    pub(crate) fn check_vm(&self) -> Vec<String> {
        let mut errs = Vec::new();
        let ram = self.cfg.memory;
        let is_table = |pa: u64| self.mem_map.get(pa >> self.page_shift).has(PG_TABLE);
        errs.extend(self.vm.pt.check(&self.phys, ram, &is_table, 64));
        // vm-1 on a sample of lowmem pages.
        let step = (self.max_low_pfn / 7).max(1);
        for pfn in (1..self.max_low_pfn).step_by(step as usize) {
            let va = self.cfg.arch.page_offset() + (pfn << self.page_shift) + 8;
            match self.vm.pt.walk(&self.phys, va) {
                Ok(t) if t.phys == (pfn << self.page_shift) + 8 => {}
                other => errs.push(format!("vm-1: direct map of pfn {pfn:#x} walks to {other:?}")),
            }
        }
        for t in self.vm.tlbs.iter() {
            errs.extend(t.lock().check());
        }
        errs.extend(self.check_vmalloc());
        errs.extend(self.check_highmem());
        errs
    }
}
