//! Zones: their spans, watermarks, `lowmem_reserve` (protection), per-zone
//! counters, and the boot-time formulas that size them.
//!
//! # Kernel
//! `include/linux/mmzone.h` (struct zone, zone_type), `mm/page_alloc.c`
//! (`calculate_min_free_kbytes`, `__setup_per_zone_wmarks`,
//! `setup_per_zone_lowmem_reserve`, `zone_batchsize`, `zone_highsize`),
//! `mm/vmstat.c` (`calculate_normal_threshold`), `mm/khugepaged.c`
//! (`set_recommended_min_free_kbytes`).
//!
//! SIMPLIFICATION: one NUMA node; managed == present (nothing reserved
//! beyond pfn 0) unless the machine is shaped from a recording
//! (`MachineConfig::layout`: holes, reserved and offline pages as recorded);
//! no ZONE_MOVABLE pages (kernelcore= unset) and an empty ZONE_DEVICE, both
//! shown as the kernel shows unpopulated zones.
//!
//! # Invariants
//! - zone-1: `nr_free_pages` equals the pages on the zone's buddy free lists.
//! - zone-2: min <= low <= high <= promo.
//!
//! Lock order: `Zone::area` (zone->lock) is a leaf lock: nothing else is taken
//! while holding it, and tracepoint callbacks run after it is released.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::arch::ZoneKind;
use crate::buddy::{FreeArea, PageblockFlags};
use crate::pcp::PerCpuPages;

/// One CPU's page lists for one zone, on its own cache line, behind a spin
/// lock (the kernel's `pcp->lock`, taken with a trylock).
#[repr(align(64))]
pub struct PcpSlot {
    pub lists: spin::Mutex<PerCpuPages>,
    /// Times the lock was found held (threads sharing a CPU, or a drain).
    pub contended: AtomicU64,
    /// This CPU's share of PGALLOC / PGFREE (per-CPU vm events, as the
    /// kernel's `vm_event_states`, so CPUs do not bounce a shared line).
    pub pgalloc: AtomicU64,
    pub pgfree: AtomicU64,
}

/// `zone->lock`: a mutex that counts its acquisitions. The counter sits
/// beside the lock word, on the line every acquisition bounces anyway, so
/// counting costs one uncontended atomic add per acquisition and no extra
/// sharing. `lock()` is the only way in: every path that takes the zone
/// lock (rmqueue_bulk, free_pcppages_bulk, rmqueue_buddy, free_one_page,
/// the boot and sysctl paths) is counted.
pub struct ZoneLock {
    lock: Mutex<FreeArea>,
    acquisitions: AtomicU64,
}

impl ZoneLock {
    pub fn new(area: FreeArea) -> Self {
        ZoneLock { lock: Mutex::new(area), acquisitions: AtomicU64::new(0) }
    }
    /// `spin_lock_irqsave(&zone->lock, flags)`.
    #[inline]
    pub fn lock(&self) -> parking_lot::MutexGuard<'_, FreeArea> {
        self.acquisitions.fetch_add(1, Relaxed);
        self.lock.lock()
    }
    /// Take the lock without counting it: for kmm's observers (snapshots,
    /// the replay's samples), which the kernel has no counterpart of.
    #[inline]
    pub fn lock_uncounted(&self) -> parking_lot::MutexGuard<'_, FreeArea> {
        self.lock.lock()
    }
    /// Times the lock was taken since boot.
    pub fn acquisitions(&self) -> u64 {
        self.acquisitions.load(Relaxed)
    }
}

/// Watermark indices (`enum zone_watermarks`).
pub const WMARK_MIN: usize = 0;
pub const WMARK_LOW: usize = 1;
pub const WMARK_HIGH: usize = 2;
pub const WMARK_PROMO: usize = 3;

/// Default `vm.lowmem_reserve_ratio` per zone kind (mm/page_alloc.c).
pub fn default_lowmem_reserve_ratio(kind: ZoneKind) -> u64 {
    match kind {
        ZoneKind::Dma | ZoneKind::Dma32 => 256,
        ZoneKind::Normal => 32,
        ZoneKind::HighMem | ZoneKind::Movable | ZoneKind::Device => 0,
    }
}

/// Per-zone event counters (`/proc/vmstat` pgalloc_<zone>, pgfree share).
#[derive(Default, Debug)]
pub struct ZoneCounters {
    /// Pages handed out (1 << order per allocation).
    pub pgalloc: AtomicU64,
    /// Pages freed back.
    pub pgfree: AtomicU64,
    /// Allocation requests that failed in this zone's watermark check.
    pub wmark_fail: AtomicU64,
}

/// One zone of node 0.
pub struct Zone {
    pub idx: usize,
    pub kind: ZoneKind,
    pub start_pfn: u64,
    pub spanned: u64,
    pub present: u64,
    pub managed: u64,
    /// Pfns whose struct page is online (`pfn_to_online_page`): the whole
    /// span, except on a recorded machine with offline memory blocks.
    pub online: (u64, u64),
    /// `zone->lock` and what it protects: free lists and pageblock types.
    /// Counts its acquisitions (the figure MM cover letters quote for zone
    /// lock contention work, e.g. the pcp high auto-tuning series).
    pub area: ZoneLock,
    /// Pageblock migratetypes, readable without the zone lock.
    pub pageblocks: PageblockFlags,
    /// Per-CPU page lists (`zone->per_cpu_pageset`), one per CPU.
    pub pcp: Box<[PcpSlot]>,
    /// NR_FREE_PAGES, readable without the lock (kept in step under it).
    pub nr_free_pages: AtomicI64,
    /// NR_FREE_PAGES_BLOCKS (6.18): free pages in blocks >= pageblock_order.
    pub nr_free_pages_blocks: AtomicI64,
    /// `nr_free_highatomic`: free pages on HIGHATOMIC lists.
    pub nr_free_highatomic: AtomicI64,
    /// ZONE_BELOW_HIGH: the zone failed its high-watermark check.
    pub below_high: AtomicBool,
    /// `_watermark[]`: min, low, high, promo.
    pub watermark: [AtomicU64; 4],
    pub watermark_boost: AtomicU64,
    /// `lowmem_reserve[]`, one entry per zone index.
    pub lowmem_reserve: Vec<AtomicU64>,
    pub nr_reserved_highatomic: AtomicU64,
    /// Per-CPU list sizing (zone_batchsize / zone_highsize).
    pub pcp_batch: AtomicU64,
    pub pcp_high_min: AtomicU64,
    pub pcp_high_max: AtomicU64,
    pub counters: ZoneCounters,
}

impl Zone {
    pub fn is_populated(&self) -> bool {
        self.managed > 0
    }
    pub fn end_pfn(&self) -> u64 {
        self.start_pfn + self.spanned
    }
    pub fn spans(&self, pfn: u64) -> bool {
        pfn >= self.start_pfn && pfn < self.end_pfn()
    }
    pub fn wmark(&self, i: usize) -> u64 {
        self.watermark[i].load(Relaxed) + self.watermark_boost.load(Relaxed)
    }
    pub fn free_pages(&self) -> u64 {
        self.nr_free_pages.load(Relaxed).max(0) as u64
    }
    /// Mirror the locked free-area counters into the lock-free vmstat copies.
    pub fn sync_counters(&self, a: &FreeArea) {
        self.nr_free_pages.store(a.free_pages as i64, Relaxed);
        self.nr_free_pages_blocks.store(a.free_pages_blocks as i64, Relaxed);
        self.nr_free_highatomic.store(a.free_highatomic as i64, Relaxed);
    }
    /// PGALLOC for this zone: the zone-wide count plus every CPU's share.
    pub fn pgalloc(&self) -> u64 {
        self.counters.pgalloc.load(Relaxed) + self.pcp.iter().map(|p| p.pgalloc.load(Relaxed)).sum::<u64>()
    }
    /// PGFREE attributed to this zone.
    pub fn pgfree(&self) -> u64 {
        self.counters.pgfree.load(Relaxed) + self.pcp.iter().map(|p| p.pgfree.load(Relaxed)).sum::<u64>()
    }
    pub fn is_highmem(&self) -> bool {
        self.kind == ZoneKind::HighMem
    }
}

/// `int_sqrt`: floor of the square root.
pub fn int_sqrt(x: u64) -> u64 {
    if x < 2 {
        return x;
    }
    let mut r = (x as f64).sqrt() as u64;
    while r * r > x {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= x {
        r += 1;
    }
    r
}

/// `calculate_min_free_kbytes`: 4 * sqrt(lowmem_kbytes), clamped to [128, 262144].
pub fn calculate_min_free_kbytes(lowmem_kbytes: u64) -> u64 {
    int_sqrt(lowmem_kbytes * 16).clamp(128, 262_144)
}

/// `set_recommended_min_free_kbytes` (khugepaged, CONFIG_TRANSPARENT_HUGEPAGE):
/// pageblock_nr_pages * nr_zones * (2 + MIGRATE_PCPTYPES^2) pages, capped at 5%
/// of lowmem; replaces min_free_kbytes when larger.
pub fn thp_recommended_min_free_kbytes(
    pageblock_nr_pages: u64,
    nr_populated_zones_le_normal: u64,
    lowmem_pages: u64,
    page_kb: u64,
) -> u64 {
    let recommended = pageblock_nr_pages * nr_populated_zones_le_normal * (2 + 3 * 3);
    let recommended = recommended.min(lowmem_pages * 5 / 100);
    recommended * page_kb
}

/// Watermarks of one zone as `__setup_per_zone_wmarks` computes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wmarks {
    pub min: u64,
    pub low: u64,
    pub high: u64,
    pub promo: u64,
}

/// `__setup_per_zone_wmarks` for one zone.
/// `pages_min` = min_free_kbytes in pages; `lowmem_pages` = managed pages of all
/// non-highmem, non-movable zones.
pub fn zone_wmarks(
    pages_min: u64,
    managed: u64,
    lowmem_pages: u64,
    highmem_or_movable: bool,
    watermark_scale_factor: u64,
) -> Wmarks {
    let tmp = (pages_min * managed).checked_div(lowmem_pages).unwrap_or(0);
    let min = if highmem_or_movable {
        // "It's preferable for highmem/movable to have a tiny min" (clamp 32..128).
        (managed / 1024).clamp(32, 128)
    } else {
        tmp
    };
    let delta = (tmp >> 2).max(managed * watermark_scale_factor / 10_000);
    Wmarks { min, low: min + delta, high: min + 2 * delta, promo: min + 3 * delta }
}

/// `setup_per_zone_lowmem_reserve` for one node: `managed[i]` per zone index,
/// `ratio[i]` per zone index. Returns `reserve[i][j]`.
pub fn lowmem_reserve(managed: &[u64], ratio: &[u64]) -> Vec<Vec<u64>> {
    let n = managed.len();
    let mut out = vec![vec![0u64; n]; n];
    for i in 0..n {
        let mut managed_pages = 0;
        for j in i + 1..n {
            managed_pages += managed[j];
            out[i][j] = if ratio[i] == 0 || managed[i] == 0 { 0 } else { managed_pages / ratio[i] };
        }
    }
    out
}

/// `zone_batchsize` (CONFIG_MMU): a 2^n - 1 value, about a quarter of
/// managed/1024 capped at 1 MiB worth of pages.
pub fn zone_batchsize(managed: u64, page_size: u64) -> u64 {
    let mut batch = (managed >> 10).min((1 << 20) / page_size) / 4;
    if batch < 1 {
        batch = 1;
    }
    // rounddown_pow_of_two(batch + batch/2) - 1
    let x = batch + batch / 2;
    let p = 1u64 << (63 - x.leading_zeros());
    p - 1
}

/// `zone_highsize`: the per-CPU `high` limit, from the low watermark (default)
/// or `managed / fraction`, split over the node's CPUs, at least 4 batches.
pub fn zone_highsize(low_wmark: u64, managed: u64, batch: u64, cpus: u64, fraction: u64) -> u64 {
    let total = managed.checked_div(fraction).unwrap_or(low_wmark);
    let high = total / cpus.max(1);
    high.max(batch * 4)
}

/// `calculate_normal_threshold` (mm/vmstat.c): the vmstat per-CPU drift threshold.
pub fn vmstat_threshold(managed: u64, page_shift: u32, online_cpus: u64) -> u64 {
    let fls = |x: u64| 64 - x.leading_zeros() as u64;
    let mem = managed >> (27 - page_shift);
    let threshold = 2 * fls(online_cpus) * (1 + fls(mem));
    threshold.min(125)
}


#[cfg(test)]
mod tests {
    use super::*;

    // Ground truth: ../shared/data/linux/zoneinfo.txt (Linux 6.18, x86_64, 2 CPUs).
    // managed: DMA 3840, DMA32 772915, Normal 196608; min_free_kbytes 67584
    // (raised by THP to 512 pages * 3 zones * 11 = 16896 pages).
    const MANAGED: [u64; 5] = [3840, 772_915, 196_608, 0, 0];

    #[test]
    fn watermarks_match_real_zoneinfo() {
        let lowmem: u64 = MANAGED[..3].iter().sum();
        let pages_min = thp_recommended_min_free_kbytes(512, 3, lowmem, 4) / 4;
        assert_eq!(pages_min, 16896);
        let w = |m| zone_wmarks(pages_min, m, lowmem, false, 10);
        assert_eq!(w(3840), Wmarks { min: 66, low: 82, high: 98, promo: 114 });
        assert_eq!(w(772_915), Wmarks { min: 13416, low: 16770, high: 20124, promo: 23478 });
        assert_eq!(w(196_608), Wmarks { min: 3412, low: 4265, high: 5118, promo: 5971 });
        // The empty Movable zone: min 32 low 32 high 32 promo 32.
        assert_eq!(
            zone_wmarks(pages_min, 0, lowmem, true, 10),
            Wmarks { min: 32, low: 32, high: 32, promo: 32 }
        );
    }

    #[test]
    fn protection_matches_real_zoneinfo() {
        let r = lowmem_reserve(&MANAGED, &[256, 256, 32, 0, 0]);
        assert_eq!(r[0], vec![0, 3019, 3787, 3787, 3787]);
        assert_eq!(r[1], vec![0, 0, 768, 768, 768]);
        assert_eq!(r[2], vec![0, 0, 0, 0, 0]);
    }

    #[test]
    fn pagesets_match_real_zoneinfo() {
        // DMA: 0, and zone_set_pageset_high_and_batch uses max(1, batch) -> 1.
        assert_eq!(zone_batchsize(3840, 4096), 0);
        assert_eq!(zone_batchsize(772_915, 4096), 63);
        assert_eq!(zone_batchsize(196_608, 4096), 63);
        // high_min = low / cpus; high_max = managed / 8 / cpus.
        assert_eq!(zone_highsize(82, 3840, 1, 2, 0), 41);
        assert_eq!(zone_highsize(82, 3840, 1, 2, 8), 240);
        assert_eq!(zone_highsize(16770, 772_915, 63, 2, 0), 8385);
        assert_eq!(zone_highsize(16770, 772_915, 63, 2, 8), 48307);
        assert_eq!(zone_highsize(4265, 196_608, 63, 2, 0), 2132);
        assert_eq!(zone_highsize(4265, 196_608, 63, 2, 8), 12288);
    }

    #[test]
    fn vmstat_thresholds_match_real_zoneinfo() {
        assert_eq!(vmstat_threshold(3840, 12, 2), 4);
        assert_eq!(vmstat_threshold(772_915, 12, 2), 24);
        assert_eq!(vmstat_threshold(196_608, 12, 2), 16);
    }

    #[test]
    fn min_free_kbytes_reference_points() {
        // KERNEL_FACTS 4.1: 16 MiB -> 512 k, 128 MiB -> 1448 k, 1 GiB -> 4096 k, 64 GiB -> 32768 k.
        assert_eq!(calculate_min_free_kbytes(16 << 10), 512);
        assert_eq!(calculate_min_free_kbytes(128 << 10), 1448);
        assert_eq!(calculate_min_free_kbytes(1 << 20), 4096);
        assert_eq!(calculate_min_free_kbytes(64 << 20), 32768);
        assert_eq!(calculate_min_free_kbytes(1), 128);
    }
}
