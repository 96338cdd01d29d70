//! The Machine: its configuration table, boot, and the address conversions
//! (pfn <-> physical <-> simulated virtual <-> host), all in one place.
//!
//! # Kernel
//! `mm/mm_init.c` (`free_area_init`, `memmap_init`, `memblock_free_all` ->
//! `__free_pages_memory`: free RAM in maximal aligned chunks, to the tail),
//! `mm/page_alloc.c` (`init_per_zone_wmark_min`, `build_all_zonelists`,
//! `page_group_by_mobility_disabled`), `mm/khugepaged.c`,
//! `arch/x86/include/asm/page.h` (`__va`, `__pa`, `virt_to_page`).
//!
//! Two ways to lay out RAM:
//! - from `memory` (the default): zones at the arch's boundaries, no holes,
//!   nothing reserved at boot except pfn 0 (so managed == present);
//! - from a recorded machine's zones (`MachineConfig::layout`, zoneinfo's
//!   `start_pfn`, `spanned`, `present`, `managed`): each zone's managed
//!   pages are one run of pfns (`managed_start`, default the zone's start);
//!   every other pfn of the span (holes, `present - managed` reserved pages:
//!   the kernel image, memmap, offline memory blocks) is PG_reserved and
//!   never reaches the buddy allocator, like the kernel's memblock-reserved
//!   and offline pages. `MachineConfig::tuning` then sets the watermarks,
//!   `lowmem_reserve` and pageset sizes the recorded kernel computed.
//!
//! SIMPLIFICATION: one node. The last frame of a 2^32-frame machine (16
//! TiB of 4 KiB pages) is reserved: its pfn is the u32 list terminator.
//! With a recorded layout, a zone's unmanaged pages
//! are placed around one managed run (the recording says how many there are,
//! not where); the caller picks the run's start (the replay places it so
//! that every traced pfn is managed).
//!
//! # Invariants
//! - machine-1: zones are disjoint, in index order, inside RAM; without a
//!   recorded layout they cover RAM from pfn 1 to the end.
//! - machine-2: the direct map covers every lowmem pfn and no highmem pfn.
//! - machine-3: a pfn outside every zone's managed run is PG_reserved.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use crate::arch::{parse_size, Arch, ZoneKind};
use crate::buddy::{FreeArea, MIGRATE_TYPES};
use crate::cpu::Cpus;
use crate::kmalloc::KmallocCaches;
use crate::shadow::Shadow;
use crate::slab::SlabRegistry;
use crate::error::{invalid, KmmError, Result};
use crate::page::{MemMap, Pfn, PG_RESERVED};
use crate::physmem::PhysMem;
use crate::trace::Tracing;
use crate::zone::{self, Zone, ZoneCounters};

/// A simulated kernel virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VirtAddr(pub u64);

/// A simulated physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PhysAddr(pub u64);

/// One zone of a recorded machine: zoneinfo's `start_pfn`, `spanned`,
/// `present` and `managed`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneLayout {
    pub kind: ZoneKind,
    pub start_pfn: u64,
    pub spanned: u64,
    pub present: u64,
    pub managed: u64,
    /// First pfn of the managed run; None: the zone's start.
    pub managed_start: Option<u64>,
    /// Pageblocks /proc/pagetypeinfo counts for the zone (the online ones);
    /// None: every pageblock of the span. They are taken ending at the
    /// managed run's end: pages beyond them are offline memory.
    pub online_pageblocks: Option<u64>,
}

/// Sizes the recorded kernel computed for one zone, used instead of kmm's
/// formulas (zoneinfo's `min/low/high/promo`, `protection:` and the
/// pagesets' `batch`, `high_min`, `high_max`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneTuning {
    /// min, low, high, promo; None: kmm's formulas.
    pub watermarks: Option<[u64; 4]>,
    /// `lowmem_reserve[]`, one per zone index (missing entries: kmm's value).
    pub lowmem_reserve: Vec<u64>,
    pub batch: u64,
    pub high_min: u64,
    pub high_max: u64,
}

/// Every tunable of a machine, with its default. `TUNABLES` documents them.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub arch: Arch,
    /// Bytes of RAM.
    pub memory: u64,
    /// Number of simulated CPUs.
    pub cpus: u32,
    /// Bytes per page.
    pub page_size: u32,
    /// `vm.min_free_kbytes`; None = the kernel's boot formula.
    pub min_free_kbytes: Option<u64>,
    /// `vm.watermark_scale_factor` (1..=3000, in 1/10000 of managed pages).
    pub watermark_scale_factor: u64,
    /// `vm.lowmem_reserve_ratio`, one per zone index; None = the kernel's defaults.
    pub lowmem_reserve_ratio: Option<Vec<u64>>,
    /// CONFIG_TRANSPARENT_HUGEPAGE with khugepaged running: raises
    /// min_free_kbytes to the THP recommendation, as on the reference machine.
    pub transparent_hugepage: bool,
    /// Seed for every random choice the model makes.
    pub seed: u64,
    /// `slab_nomerge`: never merge new caches into existing ones.
    pub slab_nomerge: bool,
    /// The TLB geometry of every CPU.
    pub tlb: crate::vm::tlb::TlbConfig,
    /// A recorded machine's zones (then `memory` is ignored: RAM ends with
    /// the last zone).
    pub layout: Option<Vec<ZoneLayout>>,
    /// Per zone index: the recorded kernel's watermarks and pageset sizes.
    pub tuning: Option<Vec<Option<ZoneTuning>>>,
    /// The kernel command line the machine boots with (`cmdline.rs`).
    pub cmdline: crate::cmdline::BootParams,
    /// Sysctls written once booted, in order (`sysctl.rs`: name, value).
    pub sysctl: Vec<(String, String)>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            arch: Arch::X86_64,
            memory: 1 << 30,
            cpus: 2,
            page_size: 4096,
            min_free_kbytes: None,
            watermark_scale_factor: 10,
            lowmem_reserve_ratio: None,
            transparent_hugepage: true,
            seed: 0,
            slab_nomerge: false,
            tlb: crate::vm::tlb::TlbConfig::default(),
            layout: None,
            tuning: None,
            cmdline: crate::cmdline::BootParams::default(),
            sysctl: Vec::new(),
        }
    }
}

impl MachineConfig {
    /// (name, default, meaning): the one table of tunables, shown by `kmm --help`.
    pub const TUNABLES: &'static [(&'static str, &'static str, &'static str)] = &[
        ("arch", "x86_64", "x86_64 (DMA, DMA32, Normal) | i386 (DMA, Normal <= 896M, HighMem) | i386-pae"),
        ("memory", "1G", "RAM size; sparse, so 64G costs little on a small host"),
        ("cpus", "2", "number of simulated CPUs"),
        ("page_size", "4096", "bytes per page: 4096, 8192, 16384 or 65536 (4096 only on i386)"),
        ("min_free_kbytes", "auto", "vm.min_free_kbytes; auto = 4*sqrt(lowmem kB), raised by THP"),
        ("watermark_scale_factor", "10", "vm.watermark_scale_factor: low/high gap in 1/10000 of the zone"),
        ("lowmem_reserve_ratio", "256 256 32 0 0", "vm.lowmem_reserve_ratio per zone"),
        ("transparent_hugepage", "true", "khugepaged's recommended min_free_kbytes (as on most distros)"),
        ("seed", "0", "seed for the model's random choices"),
        ("slab_nomerge", "false", "slab_nomerge: keep every kmem_cache separate instead of merging compatible ones"),
        ("tlb", "Skylake", "TLB arrays {name: (entries, ways)}: l1_4k 64/4, l1_2m 32/4, l1_1g 4/4, stlb 1536/12, stlb_1g 16/4"),
    ];

    /// Parse `memory` from a size string.
    pub fn with_memory(mut self, s: &str) -> Result<Self> {
        self.memory = parse_size(s)?;
        Ok(self)
    }
}

/// Machine-wide counters.
#[derive(Default, Debug)]
pub struct MachineStats {
    pub pgalloc_fail: AtomicU64,
}

/// Node vmstat items the model keeps (bytes, as the kernel's `_B` items).
#[derive(Default, Debug)]
pub struct VmStat {
    /// NR_SLAB_RECLAIMABLE_B: slab pages of SLAB_RECLAIM_ACCOUNT caches.
    pub nr_slab_reclaimable_b: AtomicI64,
    /// NR_SLAB_UNRECLAIMABLE_B: other slab pages and large kmallocs.
    pub nr_slab_unreclaimable_b: AtomicI64,
}

/// A simulated machine: memory, page metadata, zones, tracepoints.
pub struct Machine {
    pub cfg: MachineConfig,
    pub page_size: u64,
    pub page_shift: u32,
    pub pageblock_order: u32,
    /// Frames of RAM, pfn 0 included (reserved).
    pub nr_pages: u64,
    /// First pfn beyond the direct map.
    pub max_low_pfn: u64,
    pub phys: PhysMem,
    pub mem_map: MemMap,
    pub zones: Vec<Zone>,
    pub trace: Tracing,
    pub min_free_kbytes: AtomicU64,
    pub stats: MachineStats,
    pub vmstat: VmStat,
    /// The simulated CPUs and the threads running on them.
    pub cpus: Cpus,
    /// Per-object state beside memory (live/pinned/generation).
    pub shadow: Shadow,
    /// KASAN's shadow, quarantine and tracks (`kasan=on`; empty otherwise).
    pub kasan: crate::kasan::Kasan,
    /// Buffer exports and mappings that keep memory from being freed (`pins.rs`).
    pub pins: crate::pins::Pins,
    /// Every kmem_cache.
    pub slab: SlabRegistry,
    /// The kmalloc caches (set at boot).
    pub kmalloc_caches: OnceLock<KmallocCaches>,
    /// The per-CPU allocator.
    pub percpu: crate::percpu::Percpu,
    /// Page tables, TLBs, vmalloc, kmap, kernel stacks.
    pub vm: crate::vm::Vm,
    /// Simulated time and the kernel's timer work (`clock.rs`).
    pub clock: crate::clock::Clock,
    /// The kernel log and taint mask (`printk.rs`).
    pub printk: crate::printk::Printk,
    /// Allocation and free stacks, and call-site symbols (`stackdepot.rs`).
    pub depot: crate::stackdepot::StackDepot,
    /// kmemleak's object tracking (`kmemleak.rs`), on with `kmemleak=on`.
    pub kmemleak: crate::kmemleak::Kmemleak,
    /// Set by a warm start for a trace (`trace::shape`): what its replay maps.
    pub warm: parking_lot::Mutex<Option<std::sync::Arc<crate::warm::WarmSeeds>>>,
    /// How a machine built for a trace was sized and started (`trace::shape`).
    pub shape_notes: parking_lot::Mutex<Vec<String>>,
    /// The `vm.*` sysctls' current values (`sysctl.rs`).
    pub sysctls: crate::sysctl::Sysctls,
    /// failslab and fail_page_alloc (`fault_inject.rs`).
    pub faults: crate::fault_inject::FaultInject,
}

impl Machine {
    /// Boot a machine: size the zones, free all RAM into the buddy allocator,
    /// compute watermarks, protection and per-CPU list sizes.
    pub fn new(cfg: MachineConfig) -> Result<Machine> {
        let ps = cfg.page_size as u64;
        if !matches!(ps, 4096 | 8192 | 16384 | 65536) {
            return invalid(format!("page_size {ps} not supported (4096, 8192, 16384 or 65536)"));
        }
        if cfg.cpus == 0 || cfg.cpus > 1024 {
            return invalid(format!("cpus must be 1..=1024, not {}", cfg.cpus));
        }
        if cfg.arch != Arch::X86_64 && ps != 4096 {
            return invalid(format!(
                "page_size {ps} is not supported on {}: its 4 GiB address space holds the 896 MiB direct map, \
                 vmalloc, the pkmap window and the fixmap only with 4 KiB pages",
                cfg.arch.name()
            ));
        }
        if cfg.arch != Arch::X86_64 && cfg.cpus > 32 {
            return invalid(format!(
                "cpus must be 1..=32 on {} (NR_CPUS of 32-bit x86: the fixmap holds 16 kmap_local slots per CPU), not {}",
                cfg.arch.name(),
                cfg.cpus
            ));
        }
        if !(1..=3000).contains(&cfg.watermark_scale_factor) {
            return invalid("watermark_scale_factor must be 1..=3000");
        }
        let page_shift = ps.trailing_zeros();
        let mut cfg = cfg;
        // Zones: (kind, start, end, present, managed run start, managed).
        let spans = match cfg.layout.clone() {
            Some(layout) => {
                let spans = Self::recorded_spans(&cfg, &layout)?;
                let end = spans.iter().map(|s| s.2).max().unwrap_or(0).max(1);
                cfg.memory = end * ps;
                spans
            }
            None => Self::default_spans(&cfg)?,
        };
        let nr_pages = cfg.memory / ps;
        let pageblock_order = cfg.arch.pageblock_order(page_shift);
        let max_low_pfn = (cfg.arch.direct_map_span().min(cfg.memory)) / ps;
        let mut spans = spans;
        let arena_in_ram = Self::place_boot_tables(&cfg, &mut spans, page_shift, max_low_pfn)?;
        // The metadata first: a machine too big for the host fails here,
        // before its memory is mapped.
        let mem_map = MemMap::try_new(nr_pages)?;
        let phys = PhysMem::new(cfg.memory, max_low_pfn * ps)?;
        let vm = crate::vm::Vm::new(&cfg, page_shift, max_low_pfn, &phys, arena_in_ram)?;
        mem_map.get(0).set(PG_RESERVED, 0);
        mem_map.get(0).set_refcount(1);

        let nz = spans.len();
        // Online pfns per zone (pagetypeinfo's block count walks only those).
        let online: Vec<(u64, u64)> = spans
            .iter()
            .map(|&(kind, start, end, _, ms, managed)| {
                let counted = cfg.layout.as_ref().and_then(|l| l.iter().find(|l| l.kind == kind)).and_then(|l| l.online_pageblocks);
                match counted {
                    Some(nb) if managed > 0 => {
                        let pb = 1u64 << pageblock_order;
                        let oe = (ms + managed).next_multiple_of(pb).min(end);
                        // The online pageblocks end with the managed run; if
                        // they reach below the zone's start, they end higher.
                        let span = nb.saturating_mul(pb);
                        let oe = oe.max(start.saturating_add(span).min(end));
                        (oe.saturating_sub(span).max(start), oe)
                    }
                    _ => (start, end),
                }
            })
            .collect();
        let zones: Vec<Zone> = spans
            .iter()
            .enumerate()
            .map(|(idx, &(kind, start, end, present, _, managed))| {
                let spanned = end - start;
                let area = FreeArea::new(start, end, pageblock_order);
                let pageblocks = area.pageblock_flags();
                Zone {
                    idx,
                    kind,
                    start_pfn: start,
                    spanned,
                    present,
                    managed,
                    online: online[idx],
                    area: crate::zone::ZoneLock::new(area),
                    pageblocks,
                    // Boot pagesets (high 0, batch 1) until setup_watermarks sizes them.
                    pcp: (0..cfg.cpus)
                        .map(|_| crate::zone::PcpSlot {
                            lists: spin::Mutex::new(crate::pcp::PerCpuPages::new(1, 0, 0)),
                            contended: AtomicU64::new(0),
                            pgalloc: AtomicU64::new(0),
                            pgfree: AtomicU64::new(0),
                        })
                        .collect(),
                    nr_free_pages: Default::default(),
                    nr_free_pages_blocks: Default::default(),
                    nr_free_highatomic: Default::default(),
                    below_high: Default::default(),
                    watermark: Default::default(),
                    watermark_boost: Default::default(),
                    lowmem_reserve: (0..nz).map(|_| AtomicU64::new(0)).collect(),
                    nr_reserved_highatomic: Default::default(),
                    pcp_batch: Default::default(),
                    pcp_high_min: Default::default(),
                    pcp_high_max: Default::default(),
                    counters: ZoneCounters::default(),
                }
            })
            .collect();

        let m = Machine {
            page_size: ps,
            page_shift,
            pageblock_order,
            nr_pages,
            max_low_pfn,
            phys,
            mem_map,
            zones,
            trace: Tracing::default(),
            min_free_kbytes: AtomicU64::new(0),
            stats: MachineStats::default(),
            vmstat: VmStat::default(),
            cpus: Cpus::new(cfg.cpus),
            shadow: Shadow::new(cfg.memory),
            kasan: crate::kasan::Kasan::new(&cfg, max_low_pfn * ps, vm.vmalloc.start, vm.vmalloc.end),
            pins: crate::pins::Pins::default(),
            slab: Machine::new_slab_registry(&cfg),
            kmalloc_caches: OnceLock::new(),
            percpu: crate::percpu::Percpu::default(),
            vm,
            clock: crate::clock::Clock::new(cfg.cpus),
            printk: crate::printk::Printk::default(),
            depot: crate::stackdepot::StackDepot::new(cfg.arch.is_64bit()),
            kmemleak: crate::kmemleak::Kmemleak::new(cfg.cmdline.kmemleak),
            warm: parking_lot::Mutex::new(None),
            shape_notes: parking_lot::Mutex::new(Vec::new()),
            sysctls: crate::sysctl::Sysctls::new(&cfg, &spans.iter().map(|s| s.0).collect::<Vec<_>>()),
            faults: crate::fault_inject::FaultInject::new(cfg.seed),
            cfg,
        };

        // page_group_by_mobility_disabled: too little memory to group by mobility.
        let total: u64 = m.zones.iter().map(|z| z.managed).sum();
        let mobility_disabled = total < (1u64 << pageblock_order) * MIGRATE_TYPES as u64;

        // Everything outside the zones' managed runs is reserved (holes,
        // memblock reservations, offline memory): machine-3.
        let mut prev_end = 0u64;
        for &(_, _, _, _, ms, managed) in &spans {
            if managed == 0 {
                continue;
            }
            for pfn in prev_end..ms {
                m.mem_map.get(pfn).set(PG_RESERVED, 0);
                m.mem_map.get(pfn).set_refcount(1);
            }
            prev_end = ms + managed;
        }
        for pfn in prev_end..m.nr_pages {
            m.mem_map.get(pfn).set(PG_RESERVED, 0);
            m.mem_map.get(pfn).set_refcount(1);
        }
        // Boot page tables in reserved RAM (i386 with 4 GiB) are table pages.
        if let Some((s, e)) = m.vm.pt.arena_in_ram() {
            for pfn in s / ps..e / ps {
                m.mem_map.get(pfn).set_flag(crate::page::PG_TABLE);
            }
        }
        // KASAN: reserved memory accessible, the rest KASAN_PAGE_FREE.
        m.kasan_boot();
        // memblock_free_all: free each zone's managed pages in maximal
        // aligned chunks, to the tail.
        for (z, &(_, _, _, _, ms, managed)) in m.zones.iter().zip(&spans) {
            let mut a = z.area.lock();
            a.mobility_disabled = mobility_disabled;
            // The max-order blocks stay lazily initialised (buddy.rs): boot
            // touches no struct page of them.
            a.free_boot_range(&m.mem_map, ms, ms + managed);
            z.sync_counters(&a);
        }
        m.setup_watermarks(m.cfg.min_free_kbytes);
        m.apply_tuning();
        for (name, value) in m.cfg.sysctl.clone() {
            if crate::sysctl::slab_name(&name).is_none() {
                m.sysctl_set(&name, &value)?;
            }
        }
        let k = m.create_kmalloc_caches()?;
        let _ = m.kmalloc_caches.set(k);
        m.apply_boot_slab_sysctls()?;
        // vmalloc_init: the vmap_area cache (no pages until first use).
        m.vmap_area_cache()?;
        // failslab= and fail_page_alloc= (setup_fault_attr), armed once
        // booted: boot's own allocations never fail.
        if let Some(p) = &m.cfg.cmdline.failslab {
            m.faults.failslab.setup(p);
        }
        if let Some(p) = &m.cfg.cmdline.fail_page_alloc {
            m.faults.fail_page_alloc.setup(p);
        }
        Ok(m)
    }

    /// Where the boot page tables go when they cannot sit above RAM (see
    /// `vm/pgtable.rs`): i386's 4-byte entries address 4 GiB, so a machine
    /// whose RAM reaches that far keeps them in lowmem pages reserved at
    /// boot, as memblock does (`memblock_alloc` top-down below
    /// `max_low_pfn`). Default layouts give up the top of the last lowmem
    /// zone's managed run; recorded ones use their highest run of reserved
    /// lowmem frames. Returns the arena's physical address, if in RAM.
    #[allow(clippy::type_complexity)]
    fn place_boot_tables(
        cfg: &MachineConfig,
        spans: &mut [(ZoneKind, u64, u64, u64, u64, u64)],
        page_shift: u32,
        max_low_pfn: u64,
    ) -> Result<Option<u64>> {
        let ps = 1u64 << page_shift;
        let n = crate::vm::Vm::arena_tables(cfg, page_shift, max_low_pfn) as u64;
        let (_, entry_bytes) = crate::vm::pgtable::PageTables::geometry(cfg.arch);
        if entry_bytes != 4 || cfg.memory.saturating_add(n * ps) <= 1u64 << 32 {
            return Ok(None);
        }
        if cfg.layout.is_none() {
            // Trim the managed run that ends at max_low_pfn.
            if let Some(z) = spans.iter_mut().find(|z| z.4 + z.5 == max_low_pfn && z.5 > n) {
                z.5 -= n;
            }
        }
        // The highest run of n frames in [1, max_low_pfn) outside every managed run.
        let mut runs: Vec<(u64, u64)> = spans.iter().filter(|z| z.5 > 0).map(|z| (z.4, z.4 + z.5)).collect();
        runs.sort_unstable();
        let mut top = max_low_pfn;
        for &(s, e) in runs.iter().rev() {
            if e <= top && top - e >= n {
                return Ok(Some((top - n) * ps));
            }
            top = top.min(s);
        }
        if top > n {
            return Ok(Some((top - n) * ps));
        }
        invalid(format!(
            "{} with {} bytes of RAM: no {n} reserved lowmem frames for the boot page tables \
             (i386 page-table entries hold 32-bit addresses, so they cannot sit above RAM)",
            cfg.arch.name(),
            cfg.memory
        ))
    }

    /// Zone spans at the arch's boundaries for `cfg.memory` bytes: contiguous,
    /// index order, RAM from pfn 1 (pfn 0 reserved), managed == present.
    #[allow(clippy::type_complexity)]
    fn default_spans(cfg: &MachineConfig) -> Result<Vec<(ZoneKind, u64, u64, u64, u64, u64)>> {
        let ps = cfg.page_size as u64;
        let min_mem = 4 << 20;
        if cfg.memory < min_mem || cfg.memory > cfg.arch.max_phys() {
            return invalid(format!(
                "memory {} out of range for {} ({} .. {} bytes)",
                cfg.memory,
                cfg.arch.name(),
                min_mem,
                cfg.arch.max_phys()
            ));
        }
        if cfg.memory % ps != 0 {
            return invalid(format!("memory {} is not a multiple of the page size {ps}", cfg.memory));
        }
        let nr_pages = cfg.memory / ps;
        let kinds = cfg.arch.zone_kinds();
        let mut spans = Vec::with_capacity(kinds.len());
        let mut next = 1u64;
        for &k in kinds {
            let (start, end) = match k {
                ZoneKind::Movable | ZoneKind::Device => (0, 0),
                _ => {
                    let limit = cfg.arch.zone_limit(k);
                    let end = (limit / ps).min(nr_pages).max(next);
                    let r = (next, end);
                    next = end;
                    r
                }
            };
            spans.push((k, start, end, end - start, start, end - start));
        }
        // SIMPLIFICATION: pfns are u32 with u32::MAX the list terminator
        // (`page::NIL`): on a machine of 2^32 frames (16 TiB of 4 KiB pages)
        // that last frame is reserved, like pfn 0 (present, not managed).
        if nr_pages > crate::page::NIL as u64 {
            if let Some(z) = spans.iter_mut().rev().find(|z| z.2 == nr_pages && z.5 > 0) {
                z.5 -= nr_pages - crate::page::NIL as u64;
            }
        }
        Ok(spans)
    }

    /// Zone spans of a recorded machine (`cfg.layout`), checked: every zone
    /// kind the arch has (missing ones empty), spans in index order and
    /// disjoint, managed <= present <= spanned, the managed run inside the span.
    #[allow(clippy::type_complexity)]
    fn recorded_spans(cfg: &MachineConfig, layout: &[ZoneLayout]) -> Result<Vec<(ZoneKind, u64, u64, u64, u64, u64)>> {
        let ps = cfg.page_size as u64;
        let kinds = cfg.arch.zone_kinds();
        for l in layout {
            if !kinds.contains(&l.kind) {
                return invalid(format!("zone {} does not exist on {}", l.kind.name(), cfg.arch.name()));
            }
            if layout.iter().filter(|o| o.kind == l.kind).count() > 1 {
                return invalid(format!("zone {} is given twice", l.kind.name()));
            }
            if !(l.managed <= l.present && l.present <= l.spanned) {
                return invalid(format!(
                    "zone {}: needs managed <= present <= spanned, not managed {} present {} spanned {}",
                    l.kind.name(),
                    l.managed,
                    l.present,
                    l.spanned
                ));
            }
            let end = l.start_pfn.checked_add(l.spanned).filter(|&e| e <= u32::MAX as u64 && e <= cfg.arch.max_phys() / ps);
            if end.is_none() {
                return invalid(format!(
                    "zone {}: start_pfn {:#x} + spanned {} is beyond the largest memory kmm models on {} ({} bytes)",
                    l.kind.name(),
                    l.start_pfn,
                    l.spanned,
                    cfg.arch.name(),
                    cfg.arch.max_phys()
                ));
            }
            if let Some(ms) = l.managed_start {
                if ms < l.start_pfn || ms.saturating_add(l.managed) > l.start_pfn.saturating_add(l.spanned) {
                    return invalid(format!(
                        "zone {}: managed pages {:#x}+{} fall outside the zone's span {:#x}+{}",
                        l.kind.name(),
                        ms,
                        l.managed,
                        l.start_pfn,
                        l.spanned
                    ));
                }
            }
        }
        let mut spans = Vec::with_capacity(kinds.len());
        let mut prev_end = 1u64; // pfn 0 is never RAM kmm hands out
        for &k in kinds {
            match layout.iter().find(|l| l.kind == k && l.spanned > 0) {
                Some(l) => {
                    let start = l.start_pfn;
                    if start < prev_end {
                        return invalid(format!(
                            "zone {} starts at pfn {start:#x}, inside the zone below it (which ends at {prev_end:#x}); \
                             zones must be disjoint, in index order, above pfn 0",
                            k.name()
                        ));
                    }
                    let end = start + l.spanned;
                    spans.push((k, start, end, l.present, l.managed_start.unwrap_or(start), l.managed));
                    prev_end = end;
                }
                None => spans.push((k, 0, 0, 0, 0, 0)),
            }
        }
        if spans.iter().all(|s| s.5 == 0) {
            return invalid("the recorded layout has no managed pages");
        }
        Ok(spans)
    }

    /// Install the recorded kernel's watermarks, protection and pageset
    /// sizes (`cfg.tuning`) over the ones `setup_watermarks` computed.
    fn apply_tuning(&self) {
        let Some(tuning) = &self.cfg.tuning else { return };
        let mut pages_min: u64 = 0;
        for (z, t) in self.zones.iter().zip(tuning.iter()) {
            let Some(t) = t else { continue };
            if let Some(mut w) = t.watermarks {
                // zone-2 (min <= low <= high <= promo) holds for what a kernel prints.
                for i in 1..4 {
                    w[i] = w[i].max(w[i - 1]);
                }
                for (i, v) in w.iter().enumerate() {
                    z.watermark[i].store(*v, Relaxed);
                }
                if z.kind != ZoneKind::HighMem && z.kind != ZoneKind::Movable {
                    pages_min = pages_min.saturating_add(w[0]);
                }
            }
            for (j, r) in z.lowmem_reserve.iter().enumerate() {
                if let Some(&v) = t.lowmem_reserve.get(j) {
                    r.store(v, Relaxed);
                }
            }
            let batch = t.batch.max(1);
            let high_max = t.high_max.max(t.high_min);
            z.pcp_batch.store(batch, Relaxed);
            z.pcp_high_min.store(t.high_min, Relaxed);
            z.pcp_high_max.store(high_max, Relaxed);
            for slot in z.pcp.iter() {
                let mut p = slot.lists.lock();
                p.batch = batch;
                p.high_min = t.high_min;
                p.high_max = high_max;
            }
        }
        // min_free_kbytes as the sum of the recorded lowmem min watermarks
        // (`__setup_per_zone_wmarks` splits it in proportion to managed pages).
        if pages_min > 0 {
            self.min_free_kbytes.store(pages_min.saturating_mul(self.page_size / 1024), Relaxed);
        }
    }

    /// The kmalloc caches.
    #[inline]
    pub fn kmalloc_table(&self) -> &KmallocCaches {
        self.kmalloc_caches.get().expect("kmalloc caches are made at boot")
    }

    /// `compound_head`: the head page of the block `pfn` belongs to (tails
    /// of compound blocks record their head).
    #[inline]
    pub fn compound_head(&self, pfn: Pfn) -> Pfn {
        let p = self.mem_map.get(pfn.0);
        if p.has(crate::page::PG_TAIL) {
            Pfn(p.next() as u64)
        } else {
            pfn
        }
    }

    /// A page's flags and order as the kernel's `struct page` shows them:
    /// the head of a lazily-initialised free max-order block (`buddy.rs`,
    /// whose metadata is not written until carved) reads as PG_buddy of
    /// MAX_PAGE_ORDER. For views; the allocator reads `mem_map` directly.
    pub fn page_flags_order(&self, pfn: Pfn) -> (u32, u32) {
        let p = self.mem_map.get(pfn.0);
        if p.raw() == 0 && pfn.0 & ((1 << crate::arch::MAX_PAGE_ORDER) - 1) == 0 {
            if let Some(z) = self.pfn_zone(pfn) {
                let (lo, hi) = z.area.lock_uncounted().lazy_range();
                if pfn.0 >= lo && pfn.0 < hi {
                    return (crate::page::PG_BUDDY, crate::arch::MAX_PAGE_ORDER);
                }
            }
        }
        (p.flags(), p.order())
    }

    /// The lazily-initialised free ranges of every zone (`buddy.rs`), for
    /// scans that would otherwise read their all-zero metadata.
    pub fn lazy_ranges(&self) -> Vec<(u64, u64)> {
        self.zones.iter().map(|z| z.area.lock_uncounted().lazy_range()).filter(|r| r.0 < r.1).collect()
    }

    /// Boot with defaults except the given arch and memory (a convenience).
    pub fn boot(arch: Arch, memory: &str) -> Result<Machine> {
        Machine::new(MachineConfig { arch, ..MachineConfig::default() }.with_memory(memory)?)
    }

    /// Managed pages of zones at or below ZONE_NORMAL (`nr_free_buffer_pages` at boot).
    fn lowmem_managed(&self) -> u64 {
        self.zones
            .iter()
            .filter(|z| matches!(z.kind, ZoneKind::Dma | ZoneKind::Dma32 | ZoneKind::Normal))
            .map(|z| z.managed)
            .sum()
    }

    /// `init_per_zone_wmark_min` + `setup_per_zone_wmarks` +
    /// `setup_per_zone_lowmem_reserve` + pageset sizing. `min_free_kbytes`
    /// None = the kernel's formula (and the THP recommendation if enabled).
    pub fn setup_watermarks(&self, min_free_kbytes: Option<u64>) {
        let page_kb = self.page_size / 1024;
        let lowmem = self.lowmem_managed();
        let mfk = match min_free_kbytes {
            Some(v) => v,
            None => {
                let mut v = zone::calculate_min_free_kbytes(lowmem * page_kb);
                if self.cfg.transparent_hugepage {
                    let nr_zones = self
                        .zones
                        .iter()
                        .filter(|z| z.is_populated() && z.kind != ZoneKind::HighMem && z.kind != ZoneKind::Movable)
                        .count() as u64;
                    let rec = zone::thp_recommended_min_free_kbytes(
                        1 << self.pageblock_order,
                        nr_zones,
                        lowmem,
                        page_kb,
                    );
                    v = v.max(rec);
                }
                v
            }
        };
        self.min_free_kbytes.store(mfk, Relaxed);
        self.setup_per_zone_wmarks();
        self.setup_per_zone_lowmem_reserve();
    }

    /// `setup_per_zone_wmarks`: every zone's watermarks from
    /// `vm.min_free_kbytes` and `vm.watermark_scale_factor`, then its
    /// pageset sizes (`zone_pcp_update`), as the kernel does after any
    /// change of them.
    pub fn setup_per_zone_wmarks(&self) {
        let page_kb = self.page_size / 1024;
        let lowmem = self.lowmem_managed();
        let pages_min = self.min_free_kbytes.load(Relaxed) / page_kb;
        let wsf = self.sysctls.watermark_scale_factor.load(Relaxed);
        for z in &self.zones {
            let hm = matches!(z.kind, ZoneKind::HighMem | ZoneKind::Movable);
            let w = if z.kind == ZoneKind::Device {
                zone::Wmarks { min: 0, low: 0, high: 0, promo: 0 }
            } else {
                zone::zone_wmarks(pages_min, z.managed, lowmem, hm, wsf)
            };
            z.watermark[0].store(w.min, Relaxed);
            z.watermark[1].store(w.low, Relaxed);
            z.watermark[2].store(w.high, Relaxed);
            z.watermark[3].store(w.promo, Relaxed);
            self.zone_set_pageset_high_and_batch(z);
        }
    }

    /// `zone_set_pageset_high_and_batch`: batch from the zone's size; high
    /// from its low watermark, auto-tuned between high_min and high_max
    /// (managed / 8) -- or, with `vm.percpu_pagelist_high_fraction`, fixed
    /// at managed / fraction (auto-tuning off).
    pub fn zone_set_pageset_high_and_batch(&self, z: &crate::zone::Zone) {
        let batch = zone::zone_batchsize(z.managed, self.page_size).max(1);
        let cpus = self.cfg.cpus as u64;
        let low = z.watermark[crate::zone::WMARK_LOW].load(Relaxed);
        let fraction = self.sysctls.percpu_pagelist_high_fraction.load(Relaxed);
        let (high_min, high_max) = if z.managed == 0 {
            (0, 0)
        } else if fraction != 0 {
            let h = zone::zone_highsize(low, z.managed, batch, cpus, fraction);
            (h, h)
        } else {
            (
                zone::zone_highsize(low, z.managed, batch, cpus, 0),
                zone::zone_highsize(low, z.managed, batch, cpus, crate::sysctl::MIN_PERCPU_PAGELIST_HIGH_FRACTION),
            )
        };
        z.pcp_batch.store(batch, Relaxed);
        z.pcp_high_min.store(high_min, Relaxed);
        z.pcp_high_max.store(high_max, Relaxed);
        // __zone_set_pageset_high_and_batch: every CPU's pageset.
        for slot in z.pcp.iter() {
            let mut p = slot.lists.lock();
            p.batch = batch;
            p.high_min = high_min;
            p.high_max = high_max;
        }
    }

    /// `setup_per_zone_lowmem_reserve` from `vm.lowmem_reserve_ratio`.
    pub fn setup_per_zone_lowmem_reserve(&self) {
        let ratio: Vec<u64> = self.sysctls.lowmem_reserve_ratio.lock().clone();
        let managed: Vec<u64> = self.zones.iter().map(|z| z.managed).collect();
        let res = zone::lowmem_reserve(&managed, &ratio);
        for (i, z) in self.zones.iter().enumerate() {
            for (j, r) in z.lowmem_reserve.iter().enumerate() {
                r.store(res[i][j], Relaxed);
            }
        }
    }

    // ---- address conversions (the one place) ------------------------------------

    #[inline]
    pub fn pfn_to_phys(&self, pfn: Pfn) -> PhysAddr {
        PhysAddr(pfn.0 << self.page_shift)
    }

    #[inline]
    pub fn phys_to_pfn(&self, pa: PhysAddr) -> Pfn {
        Pfn(pa.0 >> self.page_shift)
    }

    /// Is `pfn` a frame of RAM?
    #[inline]
    pub fn pfn_valid(&self, pfn: Pfn) -> bool {
        pfn.0 < self.nr_pages
    }

    /// Is `pfn` permanently mapped by the direct map (not highmem)?
    #[inline]
    pub fn pfn_is_lowmem(&self, pfn: Pfn) -> bool {
        pfn.0 < self.max_low_pfn
    }

    /// `__va`: direct-map address of a physical address in low memory.
    pub fn phys_to_virt(&self, pa: PhysAddr) -> Option<VirtAddr> {
        self.pfn_is_lowmem(self.phys_to_pfn(pa)).then(|| VirtAddr(self.cfg.arch.page_offset() + pa.0))
    }

    /// `__pa` for direct-map addresses; a page fault for anything else.
    pub fn virt_to_phys(&self, va: VirtAddr) -> Result<PhysAddr> {
        let off = self.cfg.arch.page_offset();
        if va.0 >= off && va.0 - off < self.max_low_pfn << self.page_shift {
            Ok(PhysAddr(va.0 - off))
        } else {
            Err(KmmError::PageFault(format!(
                "BUG: unable to handle page fault for address: {:#x} (not a direct-map address)",
                va.0
            )))
        }
    }

    /// `page_address`: the direct-map address of a page, None for highmem.
    pub fn page_address(&self, pfn: Pfn) -> Option<VirtAddr> {
        self.phys_to_virt(self.pfn_to_phys(pfn))
    }

    /// `virt_to_page` for direct-map addresses.
    pub fn virt_to_pfn(&self, va: VirtAddr) -> Result<Pfn> {
        Ok(self.phys_to_pfn(self.virt_to_phys(va)?))
    }

    /// The zone a pfn belongs to.
    pub fn pfn_zone(&self, pfn: Pfn) -> Option<&Zone> {
        self.zones.iter().find(|z| z.spans(pfn.0))
    }

    /// Total managed pages.
    pub fn totalram_pages(&self) -> u64 {
        self.zones.iter().map(|z| z.managed).sum()
    }

    /// Free pages in the buddy allocator, all zones.
    pub fn nr_free_pages(&self) -> u64 {
        self.zones.iter().map(|z| z.free_pages()).sum()
    }

    /// Index of the zone of a kind, if the arch has it.
    pub fn zone_index(&self, kind: ZoneKind) -> Option<usize> {
        self.zones.iter().position(|z| z.kind == kind)
    }

    /// Run every invariant check; returns the violations.
    pub fn check(&self) -> Vec<String> {
        let mut errs = Vec::new();
        let mut prev_end = 1;
        let recorded = self.cfg.layout.is_some();
        for z in &self.zones {
            if z.spanned == 0 {
                continue;
            }
            if z.start_pfn != prev_end && !(recorded && z.start_pfn > prev_end) {
                errs.push(format!("machine-1: zone {} starts at {:#x}, expected {prev_end:#x}", z.kind.name(), z.start_pfn));
            }
            prev_end = z.end_pfn();
            let a = z.area.lock_uncounted();
            for e in a.check(&self.mem_map) {
                errs.push(format!("{}: {e}", z.kind.name()));
            }
            if a.free_pages as i64 != z.nr_free_pages.load(Relaxed) {
                errs.push(format!(
                    "zone-1: {} nr_free_pages {} but the free lists hold {}",
                    z.kind.name(),
                    z.nr_free_pages.load(Relaxed),
                    a.free_pages
                ));
            }
            // machine-3: the zone's pages that are not reserved are its managed
            // ones (metadata the host never backed is all-zero: not reserved).
            let reserved: u64 = self
                .mem_map
                .touched(z.start_pfn, z.end_pfn())
                .into_iter()
                .map(|(a, b)| (a..b).filter(|&p| self.mem_map.get(p).has(PG_RESERVED)).count() as u64)
                .sum();
            let unreserved = z.spanned - reserved;
            if unreserved != z.managed {
                errs.push(format!(
                    "machine-3: {} has {unreserved} pages not PG_reserved but manages {}",
                    z.kind.name(),
                    z.managed
                ));
            }
            if a.free_pages > z.managed {
                errs.push(format!("zone-1: {} has {} free pages but manages {}", z.kind.name(), a.free_pages, z.managed));
            }
            let w: Vec<u64> = z.watermark.iter().map(|w| w.load(Relaxed)).collect();
            if !(w[0] <= w[1] && w[1] <= w[2] && w[2] <= w[3]) {
                errs.push(format!("zone-2: {} watermarks out of order {w:?}", z.kind.name()));
            }
        }
        if prev_end != self.nr_pages && !(recorded && prev_end < self.nr_pages) {
            errs.push(format!("machine-1: zones end at {prev_end:#x}, RAM at {:#x}", self.nr_pages));
        }
        errs.extend(self.cpus.check());
        errs.extend(self.clock.check());
        errs.extend(self.check_pcp());
        errs.extend(self.check_percpu());
        errs.extend(self.check_slab());
        errs.extend(self.check_vm());
        errs.extend(self.printk.check());
        errs.extend(self.check_kmemleak());
        errs.extend(self.check_kasan());
        errs.extend(self.faults.check());
        errs.extend(self.check_pins());
        errs
    }
}
