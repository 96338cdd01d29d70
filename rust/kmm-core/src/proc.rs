//! The /proc views of a machine, byte for byte in the kernel's formats:
//! `/proc/buddyinfo`, `/proc/pagetypeinfo`, `/proc/zoneinfo`,
//! `/proc/meminfo`, `/proc/vmstat` and `/proc/slabinfo`, the
//! `/sys/kernel/slab/<cache>/` attributes, plus structured equivalents
//! ([`ZoneInfo`], [`Machine::meminfo_fields`], [`Machine::vmstat_fields`],
//! [`SlabinfoRow`]) for the Python binding.
//!
//! # Kernel
//! `mm/vmstat.c` (`frag_show_print`, `pagetypeinfo_showfree_print`,
//! `pagetypeinfo_showblockcount_print`, `zoneinfo_show_print`,
//! `vmstat_text[]`, `vmstat_start`, `vmstat_show`), `fs/proc/meminfo.c`
//! (`meminfo_proc_show`, `show_val_kb`), `mm/show_mem.c`
//! (`si_mem_available`), `mm/page_alloc.c` (`calculate_totalreserve_pages`),
//! `mm/util.c` (`vm_commit_limit`), `mm/hugetlb.c`
//! (`hugetlb_report_meminfo`), `mm/page-writeback.c`
//! (`global_dirtyable_memory`, `highmem_dirtyable_memory`,
//! `domain_dirty_limits`), `arch/x86/mm/pat/set_memory.c`
//! (`arch_report_meminfo`), `arch/x86/mm/init.c` (`split_mem_range`),
//! `mm/slab_common.c` (`print_slabinfo_header`, `slab_show`, `cache_show`),
//! `mm/slub.c` (`get_slabinfo`, `show_slab_objects`, the `*_show` sysfs
//! attributes of `slab_attrs[]`).
//! Ground truth: the files captured from Linux 6.18 x86_64 in
//! `shared/data/linux/` (the item lists below are those files' lists, which
//! differ a little from older `vmstat_text[]`: no `nr_bounce`, no
//! `nr_writeback_temp`, plus `pgpromote_candidate_nrl`, `nr_kernel_file_pages`).
//!
//! SIMPLIFICATION: the kernel configuration is the reference machine's for
//! every arch (CONFIG_NUMA, ZSMALLOC, ZSWAP, IOMMU_SUPPORT, SWAP,
//! NUMA_BALANCING, HUGETLB_PAGE, TRANSPARENT_HUGEPAGE; no CMA, no
//! MEMORY_FAILURE, no PAGE_OWNER), plus CONFIG_HIGHMEM on i386. Counters the
//! model does not keep (page cache, LRU lists, swap, NUMA events, ...)
//! print as 0 so that parsers written for the real files still work. Slab
//! memory is kept (NR_SLAB_RECLAIMABLE_B / NR_SLAB_UNRECLAIMABLE_B, in bytes
//! as the kernel's `_B` items, large kmallocs included) and shown in pages
//! (vmstat, zoneinfo) and kB (meminfo `Slab`, `SReclaimable`, `SUnreclaim`,
//! `KReclaimable`, `MemAvailable`). Pagesets show each CPU's pcp lists
//! (count, high, batch, high_min, high_max).
//! `pgfree` counts frees after boot only (the kernel also counts the boot-time
//! `memblock_free_all` frees). `DirectMap*` lines describe the direct map the
//! kernel would build for one hole-free RAM range: 4k pages for the first
//! PMD, PMD-sized pages up to the first 1 GiB boundary, 1 GiB pages (x86_64,
//! gbpages) for whole aligned GiBs, then PMD pages and a 4k tail; the real
//! kernel also splits pages for holes, MTRRs and kernel-text permissions.
//!
//! # Invariants
//! - proc-1: buddyinfo's count for (zone, order) equals the sum over
//!   migratetypes of pagetypeinfo's (uncapped) counts.
//! - proc-2: MemFree equals the sum of zoneinfo's `pages free`, in kB.
//! - proc-3: meminfo's `Slab` is `SReclaimable + SUnreclaim`, which are
//!   vmstat's `nr_slab_reclaimable` / `nr_slab_unreclaimable` pages in kB.
//!
//! Locks: each zone's `area` lock (zone->lock) is taken alone and briefly to
//! copy its free-area counts, as `walk_zones_in_node` does; never two at once.
//! The slab views take `slab_mutex` (the cache list) only to copy the list,
//! then each cache's per-CPU locks one at a time and its node `list_lock`
//! alone, as `get_slabinfo` / `show_slab_objects` do.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use crate::arch::{Arch, ZoneKind, NR_PAGE_ORDERS};
use crate::buddy::{MIGRATETYPE_NAMES, MIGRATE_TYPES};
use crate::machine::Machine;
use crate::{KmmError, Result};
use crate::slab::geometry::*;
use crate::slab::KmemCache;
use crate::zone::{self, Zone, WMARK_HIGH, WMARK_LOW, WMARK_MIN, WMARK_PROMO};

/// pagetypeinfo stops counting a free list at this many entries and prints ">".
pub const PAGETYPEINFO_FREECOUNT_CAP: u64 = 100_000;

/// `enum zone_stat_item` names in 6.18 (zoneinfo's per-zone items, vmstat's first block).
pub const ZONE_STAT_ITEMS: &[&str] = &[
    "nr_free_pages",
    "nr_free_pages_blocks",
    "nr_zone_inactive_anon",
    "nr_zone_active_anon",
    "nr_zone_inactive_file",
    "nr_zone_active_file",
    "nr_zone_unevictable",
    "nr_zone_write_pending",
    "nr_mlock",
    "nr_zspages",
    "nr_free_cma",
];

/// `enum numa_stat_item` names (CONFIG_NUMA).
pub const NUMA_STAT_ITEMS: &[&str] =
    &["numa_hit", "numa_miss", "numa_foreign", "numa_interleave", "numa_local", "numa_other"];

/// `enum node_stat_item` names in 6.18 (zoneinfo's "per-node stats").
pub const NODE_STAT_ITEMS: &[&str] = &[
    "nr_inactive_anon",
    "nr_active_anon",
    "nr_inactive_file",
    "nr_active_file",
    "nr_unevictable",
    "nr_slab_reclaimable",
    "nr_slab_unreclaimable",
    "nr_isolated_anon",
    "nr_isolated_file",
    "workingset_nodes",
    "workingset_refault_anon",
    "workingset_refault_file",
    "workingset_activate_anon",
    "workingset_activate_file",
    "workingset_restore_anon",
    "workingset_restore_file",
    "workingset_nodereclaim",
    "nr_anon_pages",
    "nr_mapped",
    "nr_file_pages",
    "nr_dirty",
    "nr_writeback",
    "nr_shmem",
    "nr_shmem_hugepages",
    "nr_shmem_pmdmapped",
    "nr_file_hugepages",
    "nr_file_pmdmapped",
    "nr_anon_transparent_hugepages",
    "nr_vmscan_write",
    "nr_vmscan_immediate_reclaim",
    "nr_dirtied",
    "nr_written",
    "nr_throttled_written",
    "nr_kernel_misc_reclaimable",
    "nr_foll_pin_acquired",
    "nr_foll_pin_released",
    "nr_kernel_stack",
    "nr_page_table_pages",
    "nr_sec_page_table_pages",
    "nr_iommu_pages",
    "nr_swapcached",
    "pgpromote_success",
    "pgpromote_candidate",
    "pgpromote_candidate_nrl",
    "pgdemote_kswapd",
    "pgdemote_direct",
    "pgdemote_khugepaged",
    "pgdemote_proactive",
    "nr_hugetlb",
    "nr_balloon_pages",
    "nr_kernel_file_pages",
];

/// `vm.dirty_ratio` and `vm.dirty_background_ratio` defaults.
const VM_DIRTY_RATIO: u64 = 20;
const DIRTY_BACKGROUND_RATIO: u64 = 10;
/// `vm.overcommit_ratio` default.
const OVERCOMMIT_RATIO: u64 = 50;

/// A snapshot of one zone: everything zoneinfo, buddyinfo and pagetypeinfo show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneInfo {
    /// "DMA", "DMA32", "Normal", "HighMem", "Movable", "Device".
    pub name: &'static str,
    /// Zone index (`enum zone_type`).
    pub idx: usize,
    pub populated: bool,
    pub start_pfn: u64,
    pub spanned: u64,
    pub present: u64,
    pub managed: u64,
    /// NR_FREE_PAGES.
    pub free_pages: u64,
    /// NR_FREE_PAGES_BLOCKS: free pages in blocks of at least pageblock order.
    pub free_pages_blocks: u64,
    /// Watermarks as zoneinfo prints them (boost included, like `min_wmark_pages`).
    pub min: u64,
    pub low: u64,
    pub high: u64,
    pub promo: u64,
    pub boost: u64,
    /// `lowmem_reserve[]` ("protection"), one entry per zone index.
    pub lowmem_reserve: Vec<u64>,
    /// Free blocks per order, all migratetypes (buddyinfo).
    pub nr_free: [u64; NR_PAGE_ORDERS],
    /// Free blocks per migratetype (index: `buddy::MIGRATE_*`) and order (pagetypeinfo).
    pub nr_free_mt: Vec<[u64; NR_PAGE_ORDERS]>,
    /// Pageblocks of each migratetype (pagetypeinfo's "Number of blocks type").
    pub pageblocks: [u64; MIGRATE_TYPES],
    pub nr_reserved_highatomic: u64,
    /// Per-CPU pageset: pages on the lists (0: the model has none), high, batch.
    pub pcp_count: u64,
    pub pcp_high: u64,
    pub pcp_batch: u64,
    pub pcp_high_min: u64,
    pub pcp_high_max: u64,
    /// `vm stats threshold` (`calculate_normal_threshold`).
    pub vmstat_threshold: u64,
    /// Pages allocated from / freed to this zone (vmstat pgalloc_<zone>, pgfree share).
    pub pgalloc: u64,
    pub pgfree: u64,
}

/// The two header lines of /proc/slabinfo (`print_slabinfo_header`,
/// without CONFIG_DEBUG_SLAB), newline included.
pub const SLABINFO_HEADER: &str = "slabinfo - version: 2.1\n\
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>\n";

/// One line of /proc/slabinfo (`struct slabinfo` as `cache_show` prints it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlabinfoRow {
    pub name: String,
    /// Objects not free on the node partial list (CPU-held free objects count as active).
    pub active_objs: u64,
    pub num_objs: u64,
    /// `s->size`: the slot stride.
    pub objsize: u32,
    pub objperslab: u32,
    /// `1 << order`.
    pub pagesperslab: u32,
    /// SLUB has no tunables: 0, 0, 0.
    pub limit: u32,
    pub batchcount: u32,
    pub sharedfactor: u32,
    /// SLUB reports every slab as active: equal to `num_slabs`.
    pub active_slabs: u64,
    pub num_slabs: u64,
    /// Always 0.
    pub sharedavail: u64,
}

/// The `seq_printf` label widths of one meminfo line.
enum MemLine {
    /// `show_val_kb`: 16-column label, value right-aligned in 8, " kB".
    Kb,
    /// `HugePages_*:` counts: 19-column label, value right-aligned in 5.
    Count,
}

fn meminfo_line_kind(name: &str) -> MemLine {
    if name.starts_with("HugePages_") {
        MemLine::Count
    } else {
        MemLine::Kb
    }
}

/// vmstat's per-zone event suffix (`TEXTS_FOR_ZONES`): HighMem is "high".
fn zone_event_names(kind: ZoneKind) -> [&'static str; 3] {
    match kind {
        ZoneKind::Dma => ["pgalloc_dma", "allocstall_dma", "pgskip_dma"],
        ZoneKind::Dma32 => ["pgalloc_dma32", "allocstall_dma32", "pgskip_dma32"],
        ZoneKind::Normal => ["pgalloc_normal", "allocstall_normal", "pgskip_normal"],
        ZoneKind::HighMem => ["pgalloc_high", "allocstall_high", "pgskip_high"],
        ZoneKind::Movable => ["pgalloc_movable", "allocstall_movable", "pgskip_movable"],
        ZoneKind::Device => ["pgalloc_device", "allocstall_device", "pgskip_device"],
    }
}

/// Names of the owner codes of `Machine::page_owners`, by code.
pub const PAGE_OWNER_NAMES: [&str; 8] =
    ["reserved", "buddy free", "pcp", "slab", "vmalloc", "page table", "pages", "in use before the trace"];

impl Machine {
    /// One byte per page frame saying who holds it (the codes index
    /// `PAGE_OWNER_NAMES`): free in the buddy allocator, on a per-CPU list,
    /// a slab page, a vmalloc page, a page-table page, other allocated
    /// pages (alloc_pages, large kmalloc, percpu, stacks), reserved, or in
    /// use since before a replayed trace began (a warm start's PG_warm pages).
    /// Read without locks: a snapshot that may straddle a concurrent call.
    ///
    /// One byte per frame is 4 GiB for a 16 TiB machine: a host that cannot
    /// allocate it gets `KmmError::Host`, not an abort.
    pub fn page_owners(&self) -> Result<Vec<u8>> {
        use crate::page::{PG_BUDDY, PG_PCP, PG_RESERVED, PG_SLAB, PG_TABLE, PG_TAIL, PG_VMALLOC, PG_WARM};
        let n = self.nr_pages as usize;
        let mut out = Vec::new();
        if out.try_reserve_exact(n).is_err() {
            return Err(KmmError::Host(format!(
                "page_owners: the host cannot allocate {n} bytes (one per page frame)"
            )));
        }
        out.resize(n, 6u8);
        // Lazily-initialised free blocks (buddy.rs) are free, unwritten.
        let lazy = self.lazy_ranges();
        for &(lo, hi) in &lazy {
            out[lo as usize..hi as usize].fill(1);
        }
        let mut pfn = 0usize;
        while pfn < n {
            if let Some(&(_, hi)) = lazy.iter().find(|r| r.0 as usize == pfn) {
                pfn = hi as usize;
                continue;
            }
            let p = self.mem_map.get(pfn as u64);
            let f = p.flags();
            if f & (PG_BUDDY | PG_PCP) != 0 {
                let end = (pfn + (1usize << p.order().min(crate::arch::MAX_PAGE_ORDER))).min(n);
                out[pfn..end].fill(if f & PG_BUDDY != 0 { 1 } else { 2 });
                pfn = end;
                continue;
            }
            // A tail's head link is read without locks: a block being built
            // may show PG_TAIL before its link, so check the link is a pfn.
            let hf = if f & PG_TAIL != 0 {
                let head = self.compound_head(crate::Pfn(pfn as u64)).0;
                if head < self.nr_pages { self.mem_map.get(head).flags() } else { 0 }
            } else {
                f
            };
            out[pfn] = if f & PG_RESERVED != 0 {
                0
            } else if hf & PG_SLAB != 0 {
                3
            } else if f & PG_VMALLOC != 0 {
                4
            } else if f & PG_TABLE != 0 {
                5
            } else if f & PG_WARM != 0 {
                7
            } else {
                6
            };
            pfn += 1;
        }
        Ok(out)
    }

    // ---- snapshots ----------------------------------------------------------------

    /// A snapshot of every zone of the node, in index order (unpopulated ones included).
    pub fn zone_infos(&self) -> Vec<ZoneInfo> {
        self.zones.iter().map(|z| self.zone_info(z)).collect()
    }

    /// pagetypeinfo's "Number of mixed blocks" (`mm/page_owner.c`
    /// `pagetypeinfo_showmixedcount_print`, printed with page_owner=on): per
    /// pageblock migratetype, the pageblocks holding an allocated block
    /// whose allocation asked for another migratetype. Walked as the kernel
    /// walks it, without the zone lock: a free block is skipped by its order,
    /// an allocated head by its allocation's order; pages on per-CPU lists
    /// (page_owner has them freed), reserved pages and pages of unknown
    /// owner are stepped over one by one.
    ///
    /// SIMPLIFICATION: pages a warm start marks in use by an unknown owner
    /// (PG_WARM), and pre-trace slabs it lays out, have no page_owner record
    /// (their allocation's gfp is not in any recording), so they never make a
    /// block mixed; the kernel's figure would count them.
    pub fn mixed_blocks(&self, z: &Zone) -> [u64; MIGRATE_TYPES] {
        let mut count = [0u64; MIGRATE_TYPES];
        let nr = 1u64 << self.pageblock_order;
        let (start, end) = (z.start_pfn.max(z.online.0), z.end_pfn().min(z.online.1));
        // Lazily-initialised free blocks hold no allocation: stepped over.
        let (lazy_lo, lazy_hi) = z.area.lock_uncounted().lazy_range();
        let mut pfn = start;
        while pfn < end {
            if pfn >= lazy_lo && pfn < lazy_hi {
                pfn = lazy_hi;
                continue;
            }
            let block_end = ((pfn | (nr - 1)) + 1).min(end);
            let block_mt = z.pageblocks.get(pfn);
            while pfn < block_end {
                let p = self.mem_map.get(pfn);
                if p.has(crate::page::PG_BUDDY) {
                    pfn += 1u64 << p.order();
                    continue;
                }
                if p.has(crate::page::PG_RESERVED) || p.has(crate::page::PG_PCP) || p.refcount() <= 0 && !p.has(crate::page::PG_SLAB) {
                    pfn += 1;
                    continue;
                }
                let Some(page_mt) = p.owner_mt() else {
                    pfn += 1;
                    continue;
                };
                if page_mt != block_mt {
                    // is_migrate_cma(pageblock_mt) counts as MOVABLE; kmm has no CMA.
                    if (block_mt as usize) < MIGRATE_TYPES {
                        count[block_mt as usize] += 1;
                    }
                    pfn = block_end;
                    break;
                }
                pfn += 1u64 << p.order();
            }
            pfn = pfn.max(block_end);
        }
        count
    }

    fn zone_info(&self, z: &Zone) -> ZoneInfo {
        let (nr_free, nr_free_mt, pageblocks) = {
            // kmm's own observers do not count as zone-lock acquisitions:
            // that figure is the allocator's work.
            let a = z.area.lock_uncounted();
            let mut mt = vec![[0u64; NR_PAGE_ORDERS]; MIGRATE_TYPES];
            for (o, per_mt) in a.nr_free_mt.iter().enumerate() {
                for (t, &n) in per_mt.iter().enumerate() {
                    mt[t][o] = n;
                }
            }
            // pagetypeinfo_showblockcount_print: one step per pageblock from
            // zone_start_pfn, reading the type of the block each step lands
            // in, skipping offline pfns (pfn_to_online_page).
            let mut blocks = [0u64; MIGRATE_TYPES];
            let step = 1u64 << self.pageblock_order;
            let mut pfn = z.start_pfn;
            while pfn < z.end_pfn() {
                let t = a.pageblock_migratetype(pfn) as usize;
                if t < MIGRATE_TYPES && pfn >= z.online.0 && pfn < z.online.1 {
                    blocks[t] += 1;
                }
                pfn += step;
            }
            (a.nr_free, mt, blocks)
        };
        let populated = z.is_populated();
        ZoneInfo {
            name: z.kind.name(),
            idx: z.idx,
            populated,
            start_pfn: z.start_pfn,
            spanned: z.spanned,
            present: z.present,
            managed: z.managed,
            free_pages: z.free_pages(),
            free_pages_blocks: z.nr_free_pages_blocks.load(Relaxed).max(0) as u64,
            min: z.wmark(WMARK_MIN),
            low: z.wmark(WMARK_LOW),
            high: z.wmark(WMARK_HIGH),
            promo: z.wmark(WMARK_PROMO),
            boost: z.watermark_boost.load(Relaxed),
            lowmem_reserve: z.lowmem_reserve.iter().map(|r| r.load(Relaxed)).collect(),
            nr_free,
            nr_free_mt,
            pageblocks,
            nr_reserved_highatomic: z.nr_reserved_highatomic.load(Relaxed),
            pcp_count: z.pcp.iter().map(|p| p.lists.lock().count).sum(),
            pcp_high: z.pcp.iter().map(|p| p.lists.lock().high).max().unwrap_or(0),
            pcp_batch: z.pcp_batch.load(Relaxed),
            pcp_high_min: z.pcp_high_min.load(Relaxed),
            pcp_high_max: z.pcp_high_max.load(Relaxed),
            vmstat_threshold: if populated {
                zone::vmstat_threshold(z.managed, self.page_shift, self.cfg.cpus as u64)
            } else {
                0
            },
            pgalloc: z.pgalloc(),
            pgfree: z.pgfree(),
        }
    }

    /// `totalreserve_pages` (`calculate_totalreserve_pages`): per zone, the
    /// largest `lowmem_reserve` plus the high watermark, capped at managed.
    /// Computed by the kernel when watermarks are set, so without boost.
    pub fn totalreserve_pages(&self) -> u64 {
        self.zones
            .iter()
            .map(|z| {
                let max_reserve = z.lowmem_reserve[z.idx..].iter().map(|r| r.load(Relaxed)).max().unwrap_or(0);
                (max_reserve + z.watermark[WMARK_HIGH].load(Relaxed)).min(z.managed)
            })
            .sum()
    }

    /// `si_mem_available` in pages: free pages less `totalreserve_pages`,
    /// plus the reclaimable slab (less what the low watermarks claim). The
    /// model has no page cache.
    pub fn si_mem_available(&self) -> u64 {
        let wmark_low: u64 = self.zones.iter().map(|z| z.wmark(WMARK_LOW)).sum();
        let mut available = self.nr_free_pages() as i64 - self.totalreserve_pages() as i64;
        let pagecache: u64 = 0; // NR_ACTIVE_FILE + NR_INACTIVE_FILE
        available += (pagecache - (pagecache / 2).min(wmark_low)) as i64;
        let reclaimable: u64 = self.node_stat("nr_slab_reclaimable") + self.node_stat("nr_kernel_misc_reclaimable");
        available += (reclaimable - (reclaimable / 2).min(wmark_low)) as i64;
        available.max(0) as u64
    }

    /// A node counter (`node_page_state_pages`) by its vmstat name, in pages
    /// (byte items are kept in bytes and shown in pages, as the kernel does).
    /// The model keeps only the slab counters; the others (LRU, page cache,
    /// ...) are 0.
    fn node_stat(&self, name: &str) -> u64 {
        let pages = |bytes: i64| bytes.max(0) as u64 / self.page_size;
        match name {
            "nr_slab_reclaimable" => pages(self.vmstat.nr_slab_reclaimable_b.load(Relaxed)),
            "nr_slab_unreclaimable" => pages(self.vmstat.nr_slab_unreclaimable_b.load(Relaxed)),
            // NR_KERNEL_STACK_KB is kept in kB, as the kernel keeps it.
            "nr_kernel_stack" => self.vm.stacks.kernel_stack_kb.load(Relaxed),
            "nr_page_table_pages" => self.vm.pt.nr_runtime_tables.load(Relaxed),
            _ => 0,
        }
    }

    /// A zone counter (`zone_page_state`) by its vmstat name.
    fn zone_stat(z: &Zone, name: &str) -> u64 {
        match name {
            "nr_free_pages" => z.free_pages(),
            "nr_free_pages_blocks" => z.nr_free_pages_blocks.load(Relaxed).max(0) as u64,
            _ => 0,
        }
    }

    /// A NUMA event counter of a zone. The model counts pages allocated
    /// (pgalloc) but not allocation calls, which is what numa_hit counts: 0.
    fn zone_numa_stat(_z: &Zone, _name: &str) -> u64 {
        0
    }

    fn highmem_zones(&self) -> impl Iterator<Item = &Zone> {
        self.zones.iter().filter(|z| z.is_highmem())
    }

    /// (nr_dirty_background_threshold, nr_dirty_threshold) in pages
    /// (`global_dirty_limits` with the default ratios, for a non-RT task).
    pub fn dirty_limits(&self) -> (u64, u64) {
        // global_dirtyable_memory
        let free = self.nr_free_pages();
        let mut x = free - free.min(self.totalreserve_pages());
        x += self.node_stat("nr_inactive_file") + self.node_stat("nr_active_file");
        // highmem_dirtyable_memory (vm_highmem_is_dirtyable = 0)
        let mut high = 0u64;
        for z in self.highmem_zones().filter(|z| z.is_populated()) {
            let nr = z.free_pages();
            high += nr - nr.min(z.wmark(WMARK_HIGH)); // + the zone's file LRU pages (0)
        }
        x -= high.min(x);
        let avail = x + 1;
        // domain_dirty_limits: ratios converted to per-PAGE_SIZE units.
        let ps = self.page_size;
        let ratio = VM_DIRTY_RATIO * ps / 100;
        let bg_ratio = DIRTY_BACKGROUND_RATIO * ps / 100;
        let mut thresh = ratio * avail / ps;
        let mut bg = bg_ratio * avail / ps;
        if bg >= thresh {
            bg = thresh / 2;
        }
        thresh = thresh.min(u32::MAX as u64);
        if bg >= thresh {
            bg = thresh / 2;
        }
        (bg, thresh)
    }

    /// `VMALLOC_END - VMALLOC_START` in bytes, as meminfo's VmallocTotal uses it.
    fn vmalloc_total(&self) -> u64 {
        self.vm.vmalloc.end - self.vm.vmalloc.start
    }

    /// The direct map's page-size split (`arch_report_meminfo`): (label, kB).
    /// See the module header for the (simplified) `split_mem_range` rule.
    fn direct_map(&self) -> Vec<(&'static str, u64)> {
        let end = self.max_low_pfn * self.page_size;
        let (pmd, pmd_label): (u64, &'static str) = match self.cfg.arch {
            Arch::I386 => (4 << 20, "DirectMap4M"),
            _ => (2 << 20, "DirectMap2M"),
        };
        let head = end.min(pmd); // [0, PMD) is mapped with 4k pages
        let big_end = (end / pmd * pmd).max(head);
        let mut big = big_end - head;
        let k4 = head + (end - big_end);
        let mut v = vec![("DirectMap4k", k4 >> 10)];
        if self.cfg.arch == Arch::X86_64 {
            let gb = 1u64 << 30;
            let gb_end = end / gb * gb;
            let k1g = gb_end.saturating_sub(gb);
            big -= k1g;
            v.push((pmd_label, big >> 10));
            v.push(("DirectMap1G", k1g >> 10));
        } else {
            v.push((pmd_label, big >> 10));
        }
        v
    }

    /// The /proc/meminfo lines as (name, value): kB, except `HugePages_*`
    /// which are counts. Every line the reference 6.18 file has, in its order.
    pub fn meminfo_fields(&self) -> Vec<(&'static str, u64)> {
        let kb = |pages: u64| pages << (self.page_shift - 10);
        let totalram = self.totalram_pages();
        let freeram = self.nr_free_pages();
        let ns = |n: &str| kb(self.node_stat(n));
        let mut v: Vec<(&'static str, u64)> = vec![
            ("MemTotal", kb(totalram)),
            ("MemFree", kb(freeram)),
            ("MemAvailable", kb(self.si_mem_available())),
            ("Buffers", 0),
            ("Cached", 0),
            ("SwapCached", ns("nr_swapcached")),
            ("Active", ns("nr_active_anon") + ns("nr_active_file")),
            ("Inactive", ns("nr_inactive_anon") + ns("nr_inactive_file")),
            ("Active(anon)", ns("nr_active_anon")),
            ("Inactive(anon)", ns("nr_inactive_anon")),
            ("Active(file)", ns("nr_active_file")),
            ("Inactive(file)", ns("nr_inactive_file")),
            ("Unevictable", ns("nr_unevictable")),
            ("Mlocked", 0),
        ];
        if self.zone_index(ZoneKind::HighMem).is_some() {
            // CONFIG_HIGHMEM: totalhigh_pages / nr_free_highpages.
            let totalhigh: u64 = self.highmem_zones().map(|z| z.managed).sum();
            let freehigh: u64 = self.highmem_zones().map(|z| z.free_pages()).sum();
            v.extend([
                ("HighTotal", kb(totalhigh)),
                ("HighFree", kb(freehigh)),
                ("LowTotal", kb(totalram - totalhigh)),
                ("LowFree", kb(freeram - freehigh)),
            ]);
        }
        let slab_r = ns("nr_slab_reclaimable");
        let slab_u = ns("nr_slab_unreclaimable");
        let hpage_kb = (self.page_size << self.hpage_pmd_order()) >> 10;
        v.extend([
            ("SwapTotal", 0),
            ("SwapFree", 0),
            ("Zswap", 0),
            ("Zswapped", 0),
            ("Dirty", ns("nr_dirty")),
            ("Writeback", ns("nr_writeback")),
            ("AnonPages", ns("nr_anon_pages")),
            ("Mapped", ns("nr_mapped")),
            ("Shmem", ns("nr_shmem")),
            ("KReclaimable", slab_r + ns("nr_kernel_misc_reclaimable")),
            ("Slab", slab_r + slab_u),
            ("SReclaimable", slab_r),
            ("SUnreclaim", slab_u),
            ("KernelStack", self.node_stat("nr_kernel_stack")),
            ("PageTables", ns("nr_page_table_pages")),
            ("SecPageTables", ns("nr_sec_page_table_pages")),
            ("NFS_Unstable", 0),
            ("Bounce", 0),
            ("WritebackTmp", 0),
            // vm_commit_limit: totalram * overcommit_ratio / 100 (+ swap, none).
            ("CommitLimit", kb(totalram * OVERCOMMIT_RATIO / 100)),
            ("Committed_AS", 0),
            ("VmallocTotal", self.vmalloc_total() >> 10),
            ("VmallocUsed", kb(self.vmalloc_nr_pages())),
            ("VmallocChunk", 0),
            ("Percpu", self.pcpu_nr_pages() * (self.page_size >> 10)),
            ("AnonHugePages", 0),
            ("ShmemHugePages", 0),
            ("ShmemPmdMapped", 0),
            ("FileHugePages", 0),
            ("FilePmdMapped", 0),
            ("Balloon", 0),
            ("HugePages_Total", 0),
            ("HugePages_Free", 0),
            ("HugePages_Rsvd", 0),
            ("HugePages_Surp", 0),
            ("Hugepagesize", hpage_kb),
            ("Hugetlb", 0),
        ]);
        v.extend(self.direct_map());
        v
    }

    /// `HPAGE_PMD_ORDER`: pages mapped by one PMD entry (4-byte PTEs on i386
    /// without PAE, 8-byte otherwise).
    fn hpage_pmd_order(&self) -> u32 {
        let pte_shift = if self.cfg.arch == Arch::I386 { 2 } else { 3 };
        self.page_shift - pte_shift
    }

    /// The /proc/vmstat lines as (name, value), in `vmstat_text[]` order.
    /// A subset: every counter item, then the vm events up to `pgfree`,
    /// then the deprecated `nr_unstable` the kernel appends at the end.
    pub fn vmstat_fields(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<(&'static str, u64)> = Vec::new();
        for &n in ZONE_STAT_ITEMS {
            v.push((n, self.zones.iter().map(|z| Self::zone_stat(z, n)).sum()));
        }
        for &n in NUMA_STAT_ITEMS {
            v.push((n, self.zones.iter().map(|z| Self::zone_numa_stat(z, n)).sum()));
        }
        for &n in NODE_STAT_ITEMS {
            v.push((n, self.node_stat(n)));
        }
        let (bg, thresh) = self.dirty_limits();
        v.push(("nr_dirty_threshold", thresh));
        v.push(("nr_dirty_background_threshold", bg));
        v.push(("nr_memmap_pages", 0));
        v.push(("nr_memmap_boot_pages", 0));
        for n in ["pgpgin", "pgpgout", "pswpin", "pswpout"] {
            v.push((n, 0));
        }
        for z in &self.zones {
            v.push((zone_event_names(z.kind)[0], z.pgalloc()));
        }
        for k in 1..3 {
            for z in &self.zones {
                v.push((zone_event_names(z.kind)[k], 0));
            }
        }
        v.push(("pgfree", self.zones.iter().map(|z| z.pgfree()).sum()));
        v.push(("nr_unstable", 0));
        v
    }

    // ---- renderers ----------------------------------------------------------------

    /// /proc/buddyinfo (`frag_show`): populated zones, free blocks per order.
    pub fn proc_buddyinfo(&self) -> String {
        let mut s = String::new();
        for z in self.zones.iter().filter(|z| z.is_populated()) {
            let nr_free = z.area.lock_uncounted().nr_free;
            let _ = write!(s, "Node {}, zone {:>8} ", 0, z.kind.name());
            for n in nr_free {
                let _ = write!(s, "{n:>6} ");
            }
            s.push('\n');
        }
        s
    }

    /// /proc/pagetypeinfo (`pagetypeinfo_show`).
    pub fn proc_pagetypeinfo(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "Page block order: {}", self.pageblock_order);
        let _ = writeln!(s, "Pages per block:  {}", 1u64 << self.pageblock_order);
        s.push('\n');
        let _ = write!(s, "{:<43} ", "Free pages count per migrate type at order");
        for o in 0..NR_PAGE_ORDERS {
            let _ = write!(s, "{o:>6} ");
        }
        s.push('\n');
        let infos: Vec<ZoneInfo> = self.zone_infos().into_iter().filter(|i| i.populated).collect();
        for zi in &infos {
            for (mt, name) in MIGRATETYPE_NAMES.iter().enumerate() {
                let _ = write!(s, "Node {:>4}, zone {:>8}, type {:>12} ", 0, zi.name, name);
                for &n in &zi.nr_free_mt[mt] {
                    let overflow = n >= PAGETYPEINFO_FREECOUNT_CAP;
                    let shown = n.min(PAGETYPEINFO_FREECOUNT_CAP);
                    let _ = write!(s, "{}{shown:>6} ", if overflow { ">" } else { "" });
                }
                s.push('\n');
            }
        }
        let _ = write!(s, "\n{:<23}", "Number of blocks type ");
        for name in MIGRATETYPE_NAMES {
            let _ = write!(s, "{name:>12} ");
        }
        s.push('\n');
        for zi in &infos {
            let _ = write!(s, "Node {}, zone {:>8} ", 0, zi.name);
            for n in zi.pageblocks {
                let _ = write!(s, "{n:>12} ");
            }
            s.push('\n');
        }
        s
    }

    /// /proc/zoneinfo (`zoneinfo_show_print` for every zone of the node).
    pub fn proc_zoneinfo(&self) -> String {
        let mut s = String::new();
        let first_populated = self.zones.iter().position(|z| z.is_populated());
        for (z, zi) in self.zones.iter().zip(self.zone_infos()) {
            let _ = write!(s, "Node {}, zone {:>8}", 0, zi.name);
            if Some(z.idx) == first_populated {
                s.push_str("\n  per-node stats");
                for &n in NODE_STAT_ITEMS {
                    let _ = write!(s, "\n      {:<12} {}", n, self.node_stat(n));
                }
            }
            let _ = write!(
                s,
                "\n  pages free     {}\n        boost    {}\n        min      {}\n        low      {}\n        high     {}\n        promo    {}\n        spanned  {}\n        present  {}\n        managed  {}\n        cma      {}",
                zi.free_pages, zi.boost, zi.min, zi.low, zi.high, zi.promo, zi.spanned, zi.present, zi.managed, 0
            );
            let prot: Vec<String> = zi.lowmem_reserve.iter().map(|r| r.to_string()).collect();
            let _ = write!(s, "\n        protection: ({})", prot.join(", "));
            if !zi.populated {
                s.push('\n');
                continue;
            }
            for &n in ZONE_STAT_ITEMS {
                let _ = write!(s, "\n      {:<12} {}", n, Self::zone_stat(z, n));
            }
            for &n in NUMA_STAT_ITEMS {
                let _ = write!(s, "\n      {:<12} {}", n, Self::zone_numa_stat(z, n));
            }
            s.push_str("\n  pagesets");
            for cpu in 0..self.cfg.cpus {
                let p = z.pcp[cpu as usize].lists.lock();
                let _ = write!(
                    s,
                    "\n    cpu: {cpu}\n              count:    {}\n              high:     {}\n              batch:    {}\n              high_min: {}\n              high_max: {}",
                    p.count, p.high, p.batch, p.high_min, p.high_max
                );
                drop(p);
                let _ = write!(s, "\n  vm stats threshold: {}", zi.vmstat_threshold);
            }
            let _ = write!(s, "\n  node_unreclaimable:  {}\n  start_pfn:           {}\n", 0, zi.start_pfn);
        }
        s
    }

    /// /proc/meminfo (`meminfo_proc_show`, `hugetlb_report_meminfo`, `arch_report_meminfo`).
    pub fn proc_meminfo(&self) -> String {
        let mut s = String::new();
        for (name, val) in self.meminfo_fields() {
            let label = format!("{name}:");
            match meminfo_line_kind(name) {
                MemLine::Kb => {
                    let _ = writeln!(s, "{label:<16}{val:>8} kB");
                }
                MemLine::Count => {
                    let _ = writeln!(s, "{label:<19}{val:>5}");
                }
            }
        }
        s
    }

    /// /proc/vmstat (`vmstat_show`): `name value` lines.
    pub fn proc_vmstat(&self) -> String {
        let mut s = String::new();
        for (name, val) in self.vmstat_fields() {
            let _ = writeln!(s, "{name} {val}");
        }
        s
    }

    // ---- slab views -----------------------------------------------------------------

    /// The rows of /proc/slabinfo: every live root cache in `slab_caches`
    /// order (newest first), counted as SLUB's `get_slabinfo` counts them.
    pub fn slabinfo_rows(&self) -> Vec<SlabinfoRow> {
        self.slab
            .caches()
            .iter()
            .map(|c| {
                let (active_objs, num_objs, num_slabs) = c.slabinfo_counts();
                SlabinfoRow {
                    name: c.name.clone(),
                    active_objs,
                    num_objs,
                    objsize: c.geo.size,
                    objperslab: c.geo.objects,
                    pagesperslab: 1 << c.geo.order,
                    limit: 0,
                    batchcount: 0,
                    sharedfactor: 0,
                    active_slabs: num_slabs,
                    num_slabs,
                    sharedavail: 0,
                }
            })
            .collect()
    }

    /// /proc/slabinfo (`slab_show`): the version 2.1 header, then one
    /// `cache_show` line per cache. Names longer than 17 columns push the
    /// rest of their line right, as in the kernel.
    pub fn proc_slabinfo(&self) -> String {
        let mut s = String::from(SLABINFO_HEADER);
        for r in self.slabinfo_rows() {
            let _ = writeln!(
                s,
                "{:<17} {:>6} {:>6} {:>6} {:>4} {:>4} : tunables {:>4} {:>4} {:>4} : slabdata {:>6} {:>6} {:>6}",
                r.name,
                r.active_objs,
                r.num_objs,
                r.objsize,
                r.objperslab,
                r.pagesperslab,
                r.limit,
                r.batchcount,
                r.sharedfactor,
                r.active_slabs,
                r.num_slabs,
                r.sharedavail
            );
        }
        s
    }

    /// The files of /sys/kernel/slab/<name>/ as (file, contents without the
    /// trailing newline), in `ls` order, for a live cache found by its name
    /// or by the name of a cache merged into it (an alias). None if no such
    /// cache.
    ///
    /// The attributes of `slab_attrs[]` for the reference configuration
    /// (SLUB_DEBUG, SLUB_CPU_PARTIAL, ZONE_DMA, NUMA, FAILSLAB,
    /// HARDENED_USERCOPY; no SLUB_STATS, no KFENCE). SIMPLIFICATION: the
    /// counting files (`objects`, `objects_partial`, `partial`, `cpu_slabs`,
    /// `slabs`, `total_objects`) hold the total only: with one node the
    /// kernel's `" N0=<n>"` suffix repeats it (this is also how
    /// tests/data/linux/sys_kernel_slab.tsv records them). `ctor` is "ctor"
    /// for a cache with a constructor (the kernel prints its symbol), and
    /// `shrink` / `validate` read empty as in the kernel. `usersize` is the
    /// object size for kmalloc caches (`create_boot_cache(..., 0, size)`)
    /// and 0 for others (the model has no usercopy regions).
    pub fn sysfs_slab(&self, name: &str) -> Option<Vec<(&'static str, String)>> {
        let caches = self.slab.caches();
        let c = caches
            .iter()
            .find(|c| c.name == name)
            .or_else(|| caches.iter().find(|c| c.aliases.lock().iter().any(|a| a == name)))?;
        Some(Self::sysfs_slab_attrs(c))
    }

    fn sysfs_slab_attrs(c: &KmemCache) -> Vec<(&'static str, String)> {
        let g = &c.geo;
        let flag = |f: u32| u32::from(c.flags & f != 0).to_string();
        // show_slab_objects(SO_CPU): per CPU with an active slab, 1 plus the
        // slabs on its partial list. slabs_cpu_partial: every CPU's partial
        // slabs, objects estimated as half of each slab.
        let per_cpu = c.cpu_slab_counts();
        let cpu_slabs: u64 = per_cpu.iter().filter(|(active, _)| *active).map(|&(_, p)| 1 + p as u64).sum();
        let half = |slabs: u32| slabs as u64 * g.objects as u64 / 2;
        let cpu_partial_slabs: u32 = per_cpu.iter().map(|&(_, p)| p).sum();
        let mut slabs_cpu_partial = format!("{}({})", half(cpu_partial_slabs), cpu_partial_slabs);
        for (cpu, &(_, p)) in per_cpu.iter().enumerate().filter(|(_, (_, p))| *p > 0) {
            let _ = write!(slabs_cpu_partial, " C{cpu}={}({})", half(p), p);
        }
        // The node counts, under list_lock.
        let (total_objects, nr_slabs, nr_partial, partial_inuse, partial_free) = {
            let n = c.node.lock();
            let (mut inuse, mut free) = (0u64, 0u64);
            for id in KmemCache::partial_ids(&n) {
                if let Some(s) = n.slabs[id as usize].as_ref() {
                    inuse += s.inuse as u64;
                    free += (s.objects - s.inuse) as u64;
                }
            }
            (n.total_objects, n.nr_slabs, n.nr_partial as u64, inuse, free)
        };
        let aliases = c.refcount.load(Relaxed).saturating_sub(1);
        let usersize = if c.flags & SLAB_KMALLOC != 0 { g.object_size } else { 0 };
        vec![
            ("aliases", aliases.to_string()),
            ("align", g.align.to_string()),
            ("cache_dma", flag(SLAB_CACHE_DMA)),
            ("cpu_partial", c.cpu_partial().0.to_string()),
            ("cpu_slabs", cpu_slabs.to_string()),
            ("ctor", if c.ctor.is_some() { "ctor".to_string() } else { String::new() }),
            ("destroy_by_rcu", flag(SLAB_TYPESAFE_BY_RCU)),
            ("failslab", flag(SLAB_FAILSLAB)),
            ("hwcache_align", flag(SLAB_HWCACHE_ALIGN)),
            ("min_partial", c.min_partial().to_string()),
            ("object_size", g.object_size.to_string()),
            ("objects", (total_objects - partial_free).to_string()),
            ("objects_partial", partial_inuse.to_string()),
            ("objs_per_slab", g.objects.to_string()),
            ("order", g.order.to_string()),
            ("partial", nr_partial.to_string()),
            ("poison", flag(SLAB_POISON)),
            ("reclaim_account", flag(SLAB_RECLAIM_ACCOUNT)),
            ("red_zone", flag(SLAB_RED_ZONE)),
            // remote_node_defrag_ratio: the default 1000, shown divided by 10.
            ("remote_node_defrag_ratio", "100".to_string()),
            ("sanity_checks", flag(SLAB_CONSISTENCY_CHECKS)),
            ("shrink", String::new()),
            ("slab_size", g.size.to_string()),
            ("slabs", nr_slabs.to_string()),
            ("slabs_cpu_partial", slabs_cpu_partial),
            ("store_user", flag(SLAB_STORE_USER)),
            ("total_objects", total_objects.to_string()),
            ("trace", flag(SLAB_TRACE)),
            ("usersize", usersize.to_string()),
            ("validate", String::new()),
        ]
    }
}
