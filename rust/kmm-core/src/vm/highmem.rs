//! High memory: the persistent kmap window (pkmap) and the per-CPU
//! kmap_local/kmap_atomic fixmap slots.
//!
//! # Kernel
//! `mm/highmem.c` (`kmap_high`, `map_new_virtual`, `flush_all_zero_pkmaps`,
//! `kunmap_high`, `kmap_flush_unused`, `__kmap_local_pfn_prot`,
//! `kunmap_local_indexed`, `page_address`), `include/linux/highmem-internal.h`
//! (`kmap`, `kmap_local_page`, `kmap_atomic`), `include/asm-generic/kmap_size.h`
//! (KM_MAX_IDX 16), `arch/x86/include/asm/pgtable_32_areas.h` (PKMAP_BASE,
//! LAST_PKMAP: one PTE table), `arch/x86/include/asm/fixmap.h`.
//!
//! ```text
//!   pkmap_count[nr]: 0 free and TLB-clean | 1 unused but still mapped
//!                    (stale until flush_all_zero_pkmaps) | n>=2: n-1 users
//! ```
//!
//! SIMPLIFICATION: the fixmap holds only the kmap_local slots (from index
//! FIX_KMAP_BEGIN = 16; the kernel's earlier fixmap slots vary by config),
//! and PKMAP_BASE sits at the first PMD boundary below them; VMALLOC_END is
//! PKMAP_BASE - 2 pages, as the kernel defines it.
//! SIMPLIFICATION: kmap_local_page disables preemption, as kmap_atomic does
//! (the kernel only disables migration): kmm's threads keep their CPU, and
//! so their fixmap slots, only with preemption disabled. Sleeping calls
//! inside kmap_local therefore raise, as DESIGN.md §3 specifies.
//!
//! # Invariants
//! - kmap-1: a pkmap slot with count >= 1 has its PTE set and is recorded as
//!   its page's address; a slot with count 0 has no PTE.
//! - kmap-2: a CPU's kmap_local stack holds at most KM_MAX_IDX - 1 fixmap
//!   slots, and each maps the page recorded for it.
//!
//! Lock order: `kmap_lock` -> TLB locks. Neither path takes the page-table
//! lock: the pkmap and fixmap PTE tables exist since boot and each slot's
//! PTE is written only by its owner (under kmap_lock, or by the CPU that
//! holds the slot), as the kernel's `set_pte_at` on them. A CPU's kmap_local
//! stack is that CPU's (preemption is disabled while it is non-empty),
//! behind an uncontended spin lock.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use parking_lot::{Condvar, Mutex};

use crate::arch::Arch;
use crate::cpu::{PREEMPT_MASK, PREEMPT_OFFSET};
use crate::error::{KmmError, Result};
use crate::machine::{Machine, VirtAddr};
use crate::page::Pfn;
use crate::trace::{EventId, Payload};

/// `KM_MAX_IDX`: kmap_local slots per CPU (without CONFIG_DEBUG_KMAP_LOCAL).
pub const KM_MAX_IDX: u32 = 16;
/// First fixmap index of the kmap_local slots (see the SIMPLIFICATION).
pub const FIX_KMAP_BEGIN: u64 = 16;

/// Where the highmem windows sit.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub highmem: bool,
    pub page_shift: u32,
    pub last_pkmap: u64,
    pub pkmap_base: u64,
    pub fixaddr_top: u64,
    pub cpus: u32,
    pmd_size: u64,
}

impl Layout {
    pub fn new(arch: Arch, page_shift: u32, cpus: u32, _lowmem: u64) -> Layout {
        let ps = 1u64 << page_shift;
        let (highmem, entry_bytes) = match arch {
            Arch::X86_64 => (false, 8),
            Arch::I386 => (true, 4),
            Arch::I386Pae => (true, 8),
        };
        let last_pkmap = ps / entry_bytes;
        let pmd_size = ps * last_pkmap;
        let fixaddr_top = (1u64 << 32) - ps;
        let mut l = Layout { highmem, page_shift, last_pkmap, pkmap_base: 0, fixaddr_top, cpus, pmd_size };
        if highmem {
            l.pkmap_base = (l.fixmap_bottom() - last_pkmap * ps) & !(pmd_size - 1);
        }
        l
    }

    /// `__fix_to_virt(FIX_KMAP_BEGIN + idx)` for slot `idx` of CPU `cpu`.
    pub fn slot_addr(&self, cpu: u32, idx: u32) -> u64 {
        self.fixaddr_top - ((FIX_KMAP_BEGIN + idx as u64 + (KM_MAX_IDX * cpu) as u64) << self.page_shift)
    }

    /// Lowest fixmap address of any kmap_local slot.
    pub fn fixmap_bottom(&self) -> u64 {
        self.slot_addr(self.cpus - 1, KM_MAX_IDX - 1)
    }

    /// PTE tables the fixmap needs.
    pub fn fixmap_tables(&self) -> usize {
        if !self.highmem {
            return 0;
        }
        ((self.fixaddr_top + (1 << self.page_shift) - (self.fixmap_bottom() & !(self.pmd_size - 1))) / self.pmd_size) as usize + 1
    }

    pub fn pkmap_addr(&self, nr: u64) -> u64 {
        self.pkmap_base + (nr << self.page_shift)
    }

    fn is_kmap_local_addr(&self, va: u64) -> bool {
        self.highmem && va >= self.fixmap_bottom() && va <= self.slot_addr(0, 0)
    }

    /// [VMALLOC_START, VMALLOC_END): x86_64's 32 TiB; i386's between
    /// high_memory + VMALLOC_OFFSET (8 MiB) and PKMAP_BASE - 2 pages.
    pub fn vmalloc_range(&self, arch: Arch, lowmem: u64) -> (u64, u64) {
        match arch {
            // x86_64's VMALLOC_END (0xffffe8ffffffffff) is itself excluded:
            // is_vmalloc_addr tests addr < VMALLOC_END, and areas end below it.
            Arch::X86_64 => arch.vmalloc_range_64(),
            _ => (arch.page_offset() + lowmem + (8 << 20), self.pkmap_base - 2 * (1 << self.page_shift)),
        }
    }
}

struct Pkmap {
    count: Vec<u32>,
    slot_page: Vec<Option<Pfn>>,
    last_pkmap_nr: u64,
    /// `page_address_htable`: highmem pages with a pkmap address.
    page_address: HashMap<u64, u64>,
    flushes: u64,
    waits: u64,
    /// Bumped by every kunmap that frees a slot (the wake-up of pkmap_map_wait).
    wake_gen: u64,
    /// Slots whose page holds a mapping pin (`pins.rs`) while it has users
    /// (count >= 2): a plain allocation is not freed under a live kmap.
    slot_pinned: Vec<bool>,
}

/// One kmap_local mapping on a CPU's stack.
#[derive(Clone, Copy, Debug)]
struct Local {
    va: u64,
    /// The fixmap slot used (None for a lowmem page: its direct-map address).
    slot: Option<u32>,
    /// Unique per mapping (a later mapping may reuse the slot's address).
    gen: u64,
    /// Buffer exports of this mapping alive (kunmap_local is refused).
    pins: u32,
    /// The pfn that took a mapping pin (`pins.rs`: a plain allocation
    /// cannot be freed while this mapping reaches it); kunmap_local drops it.
    map_pin: Option<u64>,
}

static NEXT_LOCAL_GEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_gen() -> u64 {
    NEXT_LOCAL_GEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The highmem state of a machine.
pub struct Highmem {
    pub layout: Layout,
    pkmap: Mutex<Pkmap>,
    pkmap_wait: Condvar,
    local: Box<[spin::Mutex<Vec<Local>>]>,
}

impl Highmem {
    pub fn new(layout: Layout, cpus: u32) -> Highmem {
        let n = if layout.highmem { layout.last_pkmap as usize } else { 0 };
        Highmem {
            layout,
            pkmap: Mutex::new(Pkmap {
                count: vec![0; n],
                slot_page: vec![None; n],
                slot_pinned: vec![false; n],
                last_pkmap_nr: 0,
                page_address: HashMap::new(),
                flushes: 0,
                waits: 0,
                wake_gen: 0,
            }),
            pkmap_wait: Condvar::new(),
            local: (0..cpus).map(|_| spin::Mutex::new(Vec::new())).collect(),
        }
    }
}

/// Counters of the pkmap window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PkmapStats {
    /// Slots with a user (count >= 2).
    pub in_use: u64,
    /// Slots unused but still mapped (count 1).
    pub stale: u64,
    /// `flush_all_zero_pkmaps` runs that cleared something.
    pub flushes: u64,
    /// Times a kmap waited for a free slot.
    pub waits: u64,
}

impl Machine {
    /// Pin `pfn` for a new kmap/kmap_local mapping if it is a plain page
    /// allocation (`pins.rs`; the kernel does not check, and freeing the
    /// page under the mapping is a use after free through it).
    fn pin_mapped(&self, pfn: Pfn) -> Option<u64> {
        self.plain_alloc_head(pfn.0)?;
        self.pin_pages([pfn.0], crate::pins::PinKind::Map);
        Some(pfn.0)
    }

    /// Undo `pin_mapped`.
    fn unpin_mapped(&self, pinned: Option<u64>) {
        if let Some(pfn) = pinned {
            self.unpin_pages([pfn], crate::pins::PinKind::Map);
        }
    }

    fn highmem_page(&self, pfn: Pfn) -> Result<bool> {
        if !self.pfn_valid(pfn) {
            return Err(KmmError::InvalidArgument(format!("pfn {:#x} is not RAM", pfn.0)));
        }
        Ok(!self.pfn_is_lowmem(pfn))
    }

    /// `page_address`: the direct map for lowmem, the pkmap address of a
    /// kmap()ed highmem page, None otherwise.
    pub fn page_address_any(&self, pfn: Pfn) -> Option<VirtAddr> {
        if self.pfn_is_lowmem(pfn) {
            return self.page_address(pfn);
        }
        self.vm.highmem.pkmap.lock().page_address.get(&pfn.0).map(|&v| VirtAddr(v))
    }

    /// `flush_all_zero_pkmaps`: clear every count-1 slot; one kernel-range
    /// TLB flush over the window if any was cleared. Called with kmap_lock.
    fn flush_all_zero_pkmaps(&self, p: &mut Pkmap) {
        let l = &self.vm.highmem.layout;
        let mut need_flush = false;
        for nr in 0..l.last_pkmap as usize {
            if p.count[nr] != 1 {
                continue;
            }
            p.count[nr] = 0;
            let page = p.slot_page[nr].take().expect("a mapped slot records its page");
            let _ = self.vm.pt.set_boot_pte(&self.phys, l.pkmap_addr(nr as u64), None);
            p.page_address.remove(&page.0);
            need_flush = true;
        }
        if need_flush {
            p.flushes += 1;
            self.flush_tlb_kernel_range(l.pkmap_addr(0), l.pkmap_addr(l.last_pkmap));
        }
    }

    /// `kmap_flush_unused`.
    pub fn kmap_flush_unused(&self) {
        if !self.vm.highmem.layout.highmem {
            return;
        }
        let _defer = self.trace.defer();
        let mut p = self.vm.highmem.pkmap.lock();
        self.flush_all_zero_pkmaps(&mut p);
    }

    /// `map_new_virtual`: a free slot for `pfn`, or None when every slot is
    /// in use (the caller waits).
    fn map_new_virtual(&self, p: &mut Pkmap, pfn: Pfn) -> Result<Option<u64>> {
        let l = self.vm.highmem.layout;
        let mut count = l.last_pkmap;
        loop {
            p.last_pkmap_nr = (p.last_pkmap_nr + 1) & (l.last_pkmap - 1);
            if p.last_pkmap_nr == 0 {
                self.flush_all_zero_pkmaps(p);
                count = l.last_pkmap;
            }
            let nr = p.last_pkmap_nr as usize;
            if p.count[nr] == 0 {
                let va = l.pkmap_addr(nr as u64);
                self.vm.pt.set_boot_pte(&self.phys, va, Some(self.pfn_to_phys(pfn).0))?;
                p.count[nr] = 1;
                p.slot_page[nr] = Some(pfn);
                p.page_address.insert(pfn.0, va);
                return Ok(Some(va));
            }
            count -= 1;
            if count == 0 {
                return Ok(None);
            }
        }
    }

    /// `kmap(page)`: may sleep; a lowmem page's direct-map address; a
    /// highmem page gets a pkmap slot (shared by every kmap of that page),
    /// waiting with the GIL released while all LAST_PKMAP slots are in use.
    pub fn kmap(&self, pfn: Pfn) -> Result<VirtAddr> {
        self.cpus.might_sleep("include/linux/highmem-internal.h (kmap)").map_err(KmmError::SleepInAtomic)?;
        let _defer = self.trace.defer(); // no event may reach a sink under kmap_lock
        if !self.highmem_page(pfn)? {
            let va = self.page_address(pfn).expect("lowmem page");
            if self.trace.on(EventId::Kmap) {
                self.trace.emit(self.this_cpu(), Payload::Kmap { pfn: pfn.0, addr: va.0, nr: -1, count: 0 });
            }
            return Ok(va);
        }
        let h = &self.vm.highmem;
        let mut p = h.pkmap.lock();
        loop {
            let va = match p.page_address.get(&pfn.0) {
                Some(&va) => va,
                None => match self.map_new_virtual(&mut p, pfn)? {
                    Some(va) => va,
                    None => {
                        // Every slot busy: sleep on pkmap_map_wait with kmap_lock
                        // dropped (and, from Python, the GIL released).
                        p.waits += 1;
                        let gen = p.wake_gen;
                        drop(p);
                        // Timed waits, so that a Ctrl-C is seen (cpu.rs).
                        let woken = crate::cpu::wait_until(&mut || {
                            let mut g = h.pkmap.lock();
                            if g.wake_gen == gen {
                                h.pkmap_wait.wait_for(&mut g, std::time::Duration::from_millis(2));
                            }
                            g.wake_gen != gen
                        });
                        if !woken {
                            return Err(crate::cpu::interrupted("for a pkmap slot (every LAST_PKMAP slot is kmapped)"));
                        }
                        p = h.pkmap.lock();
                        continue;
                    }
                },
            };
            let nr = ((va - h.layout.pkmap_base) >> self.page_shift) as usize;
            p.count[nr] += 1;
            if p.count[nr] == 2 && !p.slot_pinned[nr] {
                p.slot_pinned[nr] = self.pin_mapped(pfn).is_some();
            }
            if self.trace.on(EventId::Kmap) {
                // Under kmap_lock: delivered when the deferral above ends.
                let count = p.count[nr];
                self.trace.emit(self.this_cpu(), Payload::Kmap { pfn: pfn.0, addr: va, nr: nr as i32, count });
            }
            return Ok(VirtAddr(va));
        }
    }

    /// `kunmap(page)`: drop a user of the page's slot; the mapping stays
    /// (count 1) until the next flush. An unbalanced kunmap is the kernel's BUG.
    pub fn kunmap(&self, pfn: Pfn) -> Result<()> {
        self.cpus.might_sleep("include/linux/highmem-internal.h (kunmap)").map_err(KmmError::SleepInAtomic)?;
        if !self.highmem_page(pfn)? {
            if self.trace.on(EventId::Kunmap) {
                let va = self.page_address(pfn).expect("lowmem page").0;
                self.trace.emit(self.this_cpu(), Payload::Kunmap { pfn: pfn.0, addr: va, nr: -1, count: 0 });
            }
            return Ok(());
        }
        let h = &self.vm.highmem;
        let _defer = self.trace.defer();
        let mut p = h.pkmap.lock();
        let va = *p.page_address.get(&pfn.0).ok_or_else(|| {
            KmmError::Bug(format!("kernel BUG at mm/highmem.c (kunmap_high): page pfn:{:05x} is not kmapped", pfn.0))
        })?;
        let nr = ((va - h.layout.pkmap_base) >> self.page_shift) as usize;
        if p.count[nr] < 2 {
            return Err(KmmError::Bug(format!(
                "kernel BUG at mm/highmem.c (kunmap_high): BUG_ON(!pkmap_count[{nr}]) (unbalanced kunmap of pfn:{:05x})",
                pfn.0
            )));
        }
        p.count[nr] -= 1;
        if p.count[nr] == 1 {
            if std::mem::take(&mut p.slot_pinned[nr]) {
                self.unpin_pages([pfn.0], crate::pins::PinKind::Map);
            }
            p.wake_gen += 1;
            h.pkmap_wait.notify_all();
        }
        if self.trace.on(EventId::Kunmap) {
            let count = p.count[nr];
            self.trace.emit(self.this_cpu(), Payload::Kunmap { pfn: pfn.0, addr: va, nr: nr as i32, count });
        }
        Ok(())
    }

    /// pkmap occupancy and counters.
    pub fn pkmap_stats(&self) -> PkmapStats {
        let p = self.vm.highmem.pkmap.lock();
        PkmapStats {
            in_use: p.count.iter().filter(|&&c| c >= 2).count() as u64,
            stale: p.count.iter().filter(|&&c| c == 1).count() as u64,
            flushes: p.flushes,
            waits: p.waits,
        }
    }

    /// `kmap_local_page(page)`: preemption off (see the SIMPLIFICATION);
    /// a highmem page takes the CPU's next fixmap slot, a lowmem page is its
    /// direct-map address and takes none (x86_64: always page_address).
    /// `kmap_local_idx_push` BUGs when the index reaches KM_MAX_IDX, so at
    /// most KM_MAX_IDX - 1 highmem mappings nest.
    pub fn kmap_local_page(&self, pfn: Pfn) -> Result<VirtAddr> {
        let high = self.highmem_page(pfn)?;
        let cpu = self.cpus.try_preempt_add(PREEMPT_OFFSET, false)?;
        let r = (|| {
            let mut st = self.vm.highmem.local[cpu as usize].lock();
            if !high {
                let va = self.page_address(pfn).expect("lowmem").0;
                let map_pin = self.pin_mapped(pfn);
                st.push(Local { va, slot: None, gen: next_gen(), pins: 0, map_pin });
                return Ok(VirtAddr(va));
            }
            let idx = st.iter().filter(|l| l.slot.is_some()).count() as u32;
            if idx + 1 >= KM_MAX_IDX {
                return Err(KmmError::Bug(format!(
                    "kernel BUG at mm/highmem.c (kmap_local_idx_push): BUG_ON(idx >= KM_MAX_IDX): \
                     {idx} kmap_local mappings of highmem pages already held on cpu {cpu} (at most {})",
                    KM_MAX_IDX - 1
                )));
            }
            let va = self.vm.highmem.layout.slot_addr(cpu, idx);
            self.vm.pt.set_boot_pte(&self.phys, va, Some(self.pfn_to_phys(pfn).0))?;
            let map_pin = self.pin_mapped(pfn);
            st.push(Local { va, slot: Some(idx), gen: next_gen(), pins: 0, map_pin });
            Ok(VirtAddr(va))
        })();
        match &r {
            Err(_) => {
                let _ = self.cpus.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false);
            }
            Ok(va) if self.trace.on(EventId::KmapLocal) => {
                let idx = if high { ((self.vm.highmem.layout.slot_addr(cpu, 0) - va.0) >> self.page_shift) as i32 } else { -1 };
                self.trace.emit(cpu, Payload::KmapLocal { pfn: pfn.0, addr: va.0, idx });
            }
            Ok(_) => {}
        }
        r
    }

    /// `kunmap_local(addr)`: a fixmap slot must be the most recent one
    /// (kunmap_local_indexed WARNs otherwise; here that changes nothing); a
    /// lowmem address needs no unmapping, only the preemption it disabled
    /// is given back.
    pub fn kunmap_local(&self, va: VirtAddr) -> Result<()> {
        let Some(cpu) = self.cpus.ctx().claimed else {
            return Err(KmmError::Bug(format!(
                "WARNING: kunmap_local({:#x}) with no kmap_local mapping held on this thread",
                va.0
            )));
        };
        let idx;
        {
            let mut st = self.vm.highmem.local[cpu as usize].lock();
            let page = va.0 & !(self.page_size - 1);
            idx = st.iter().rposition(|l| l.va == page).and_then(|i| st[i].slot).map_or(-1, |s| s as i32);
            if self.is_kmap_local_addr(page) {
                let top = st.iter().rposition(|l| l.slot.is_some());
                if let Some(i) = top.filter(|&i| st[i].va == page && st[i].pins > 0) {
                    return Err(KmmError::BufferBusy(format!(
                        "cannot kunmap_local {:#x}: {} buffer export(s) (memoryview) of it alive",
                        va.0, st[i].pins
                    )));
                }
                match top {
                    Some(i) if st[i].va == page => {
                        let e = st.remove(i);
                        self.unpin_mapped(e.map_pin);
                        let _ = self.vm.pt.set_boot_pte(&self.phys, e.va, None);
                        self.flush_tlb_one_kernel(e.va);
                    }
                    Some(i) => {
                        let known = st.iter().any(|l| l.va == page);
                        return Err(KmmError::Bug(format!(
                            "WARNING: CPU: {cpu} at mm/highmem.c kunmap_local_indexed: WARN_ON_ONCE(addr != \
                             __fix_to_virt(FIX_KMAP_BEGIN + idx)): {:#x} {} but the most recent mapping is {:#x} \
                             (kunmap_local must undo kmap_local_page in reverse order)",
                            va.0,
                            if known { "is mapped" } else { "is not a kmap_local mapping" },
                            st[i].va
                        )));
                    }
                    None => {
                        return Err(KmmError::Bug(format!(
                            "WARNING: kunmap_local({:#x}) on cpu {cpu}, which holds no kmap_local slot",
                            va.0
                        )))
                    }
                }
            } else {
                match st.iter().rposition(|l| l.slot.is_none() && l.va == page) {
                    Some(i) if st[i].pins > 0 => {
                        return Err(KmmError::BufferBusy(format!(
                            "cannot kunmap_local {:#x}: {} buffer export(s) (memoryview) of it alive",
                            va.0, st[i].pins
                        )));
                    }
                    Some(i) => {
                        let e = st.remove(i);
                        self.unpin_mapped(e.map_pin);
                    }
                    None => {
                        return Err(KmmError::Bug(format!(
                            "WARNING: kunmap_local({:#x}): no kmap_local_page of that page is held on cpu {cpu}",
                            va.0
                        )))
                    }
                }
            }
        }
        if self.trace.on(EventId::KunmapLocal) {
            self.trace.emit(cpu, Payload::KunmapLocal { addr: va.0 & !(self.page_size - 1), idx });
        }
        self.cpus.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false).map_err(KmmError::Bug)
    }

    /// `kmap_atomic(page)`: pagefault_disable + preempt_disable + kmap_local.
    pub fn kmap_atomic(&self, pfn: Pfn) -> Result<VirtAddr> {
        self.kmap_local_page(pfn)
    }

    /// `kunmap_atomic(addr)`.
    pub fn kunmap_atomic(&self, va: VirtAddr) -> Result<()> {
        self.kunmap_local(va)
    }

    /// The generation of this thread's most recent kmap_local mapping at
    /// `va` (None if it holds none): identifies one mapping, since a later
    /// one may reuse the address.
    pub fn kmap_local_gen(&self, va: u64) -> Option<u64> {
        let cpu = self.cpus.ctx().claimed?;
        let st = self.vm.highmem.local[cpu as usize].lock();
        st.iter().rev().find(|l| l.va == va).map(|l| l.gen)
    }

    /// Is the kmap_local mapping `(va, gen)` still held (on any CPU)?
    pub fn kmap_local_live(&self, va: u64, gen: u64) -> bool {
        self.vm.highmem.local.iter().any(|st| st.lock().iter().any(|l| l.va == va && l.gen == gen))
    }

    /// Count a buffer export of the mapping `(va, gen)` (`delta` +1 or -1);
    /// false if the mapping is gone.
    pub fn kmap_local_pin(&self, va: u64, gen: u64, delta: i32) -> bool {
        for st in self.vm.highmem.local.iter() {
            let mut st = st.lock();
            if let Some(l) = st.iter_mut().find(|l| l.va == va && l.gen == gen) {
                l.pins = l.pins.saturating_add_signed(delta);
                return true;
            }
        }
        false
    }

    /// kmap_local mappings held on a CPU.
    pub fn kmap_local_depth(&self, cpu: u32) -> usize {
        self.vm.highmem.local[cpu as usize].lock().len()
    }

    /// Is `va` in the kmap_local fixmap range?
    pub fn is_kmap_local_addr(&self, va: u64) -> bool {
        self.vm.highmem.layout.is_kmap_local_addr(va)
    }

    pub(crate) fn check_highmem(&self) -> Vec<String> {
        let mut errs = Vec::new();
        let l = self.vm.highmem.layout;
        if !l.highmem {
            return errs;
        }
        {
            let p = self.vm.highmem.pkmap.lock();
            for nr in 0..l.last_pkmap as usize {
                let mapped = self.vm.pt.walk(&self.phys, l.pkmap_addr(nr as u64)).ok();
                match (p.count[nr], p.slot_page[nr], mapped) {
                    (0, None, None) => {}
                    (c, Some(pg), Some(t)) if c >= 1 && t.phys == self.pfn_to_phys(pg).0 => {
                        if p.page_address.get(&pg.0) != Some(&l.pkmap_addr(nr as u64)) {
                            errs.push(format!("kmap-1: slot {nr} maps pfn {:#x} but page_address disagrees", pg.0));
                        }
                    }
                    other => errs.push(format!("kmap-1: slot {nr} is inconsistent: {other:?}")),
                }
            }
        }
        for (cpu, st) in self.vm.highmem.local.iter().enumerate() {
            let st = st.lock();
            let slots = st.iter().filter(|e| e.slot.is_some()).count() as u32;
            if slots >= KM_MAX_IDX {
                errs.push(format!("kmap-2: cpu {cpu} holds {slots} kmap_local slots"));
            }
            for e in st.iter().filter(|e| e.slot.is_some()) {
                if self.vm.pt.walk(&self.phys, e.va).is_err() {
                    errs.push(format!("kmap-2: cpu {cpu} slot at {:#x} has no PTE", e.va));
                }
            }
        }
        errs
    }
}
