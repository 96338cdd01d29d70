//! Warm start: bring a freshly booted machine to the state a recorded kernel
//! was in when its trace began, so that a replay starts where the kernel
//! stood instead of on empty memory.
//!
//! What a recording tells (`/proc` just before `perf record`): per zone,
//! order and migratetype the free-block counts (pagetypeinfo; buddyinfo is
//! their sum), how many pageblocks each migratetype owns, each CPU's pcp
//! `count` and `high` (zoneinfo's pagesets), and per slab cache its objects
//! in use and slabs (slabinfo). What the trace tells: the blocks it frees
//! before allocating them (they were allocated at start, at those pfns), the
//! slab objects it frees before allocating them (live at start, at those
//! addresses) and the pages the kernel took straight off its per-CPU lists.
//! The warm start lays memory out to meet all of it:
//!
//! 1. every free block leaves the free lists: all managed pages are "in use";
//! 2. pageblocks get their migratetypes (the recorded count of each);
//!    pageblocks holding a traced slab of a reclaimable cache are
//!    Reclaimable, of another cache Unmovable; the remaining quota goes to
//!    the lowest pageblocks, Movable to the rest;
//! 3. free blocks are placed per (order, migratetype): blocks of pageblock
//!    order and above on whole free pageblocks of their type from the top of
//!    the zone down, smaller ones in the other pageblocks of their type from
//!    the bottom up; a block is placed only where its buddy is not a free
//!    block of the same order, so nothing merges and each free list holds
//!    exactly its count. Pages the trace needs allocated are avoided; a
//!    block may take reserved pages only while as many in-use pages are left
//!    to become reserved instead (free pages never exceed managed ones);
//! 4. the traced pre-trace blocks become allocated blocks of their order at
//!    their pfns (elsewhere in their zone, same order, if a free block had to
//!    take the spot or the layout reserves it);
//! 5. slabs: the traced ones at their pfns with their traced live objects,
//!    the rest of each cache's recorded slabs in other in-use pages of
//!    GFP_KERNEL's zones (Normal first, then the zones below); free objects spread evenly over a cache's slabs, which then sit
//!    on the node partial list (so slabinfo's active_objs/num_objs come back);
//! 6. each CPU's pcp list gets its recorded `count` of order-0 pages (the
//!    traced ones first) and its recorded `high`;
//! 7. every other managed page stays allocated, owner unknown (PG_warm).
//!
//! # Kernel
//! `mm/vmstat.c` (`pagetypeinfo_showfree_print`,
//! `pagetypeinfo_showblockcount_print`, `zoneinfo_show_print`),
//! `mm/slub.c` (`get_slabinfo`: free objects counted on node partial slabs
//! only), `mm/page_alloc.c` (`__free_one_page`: the merge a placement must
//! not trigger).
//!
//! SIMPLIFICATION: where in a zone the kernel's free blocks, pageblock types
//! and other in-use pages were is not recorded; the placement above is a
//! plausible one, the counts are exact. pcp pages are order 0. Warm slabs
//! have no CPU slab and no CPU partial list: every slab with a free object
//! is on the node partial list.
//!
//! # Invariants
//! - warm-1: after `warm_start`, every zone's free lists hold, per order and
//!   migratetype, the target count (or the report says how far short).
//! - warm-2: `Machine::check()` passes after `warm_start` (buddy, pcp, slab).
//!
//! Lock order: runs on a machine nothing else uses yet; takes each zone lock,
//! pcp lock and cache `list_lock` alone.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::arch::{ZoneKind, NR_PAGE_ORDERS};
use crate::buddy::{MIGRATE_MOVABLE, MIGRATE_PCPTYPES, MIGRATE_RECLAIMABLE, MIGRATE_TYPES, MIGRATE_UNMOVABLE};
use crate::error::{KmmError, Result};
use crate::page::{PG_PCP, PG_WARM};
use crate::slab::geometry::SLAB_RECLAIM_ACCOUNT;
use crate::slab::KmemCache;
use crate::Machine;

/// The recorded state of one zone.
#[derive(Clone, Debug, Default)]
pub struct WarmZone {
    pub zone: Option<ZoneKind>,
    /// Free blocks per order and migratetype (`MIGRATETYPE_NAMES` order).
    pub free: [[u64; MIGRATE_TYPES]; NR_PAGE_ORDERS],
    /// Pageblocks per migratetype; None: leave the types as booted.
    pub blocks: Option<[u64; MIGRATE_TYPES]>,
    /// Per CPU: (pcp count, pcp high); missing CPUs keep empty lists.
    pub pcp: Vec<(u64, u64)>,
}

/// A slab the trace shows existing before it began.
#[derive(Clone, Debug, Default)]
pub struct WarmSlab {
    /// Head pfn (aligned to the cache's slab order).
    pub pfn: u64,
    /// Object indices known live at start (freed by the trace first).
    pub live: Vec<u32>,
    /// Object indices known free at start (allocated by the trace first).
    pub free: Vec<u32>,
}

/// One cache's recorded state (a /proc/slabinfo row) and its traced slabs.
#[derive(Clone)]
pub struct WarmCache {
    pub cache: Arc<KmemCache>,
    pub active_objs: u64,
    pub num_objs: u64,
    pub num_slabs: u64,
    pub slabs: Vec<WarmSlab>,
}

/// What to build.
#[derive(Clone, Default)]
pub struct WarmPlan {
    pub zones: Vec<WarmZone>,
    /// Blocks allocated at start: (traced pfn, order).
    pub allocated: Vec<(u64, u32)>,
    /// Per CPU: pfns the trace took straight off that CPU's pcp lists.
    pub pcp_pfns: Vec<Vec<u64>>,
    pub caches: Vec<WarmCache>,
}

/// How exactly the warm start met its targets.
#[derive(Clone, Debug, Default)]
pub struct WarmZoneReport {
    pub zone: &'static str,
    /// Free blocks per order and migratetype: target and reached.
    pub target: [[u64; MIGRATE_TYPES]; NR_PAGE_ORDERS],
    pub reached: [[u64; MIGRATE_TYPES]; NR_PAGE_ORDERS],
    pub blocks_target: [u64; MIGRATE_TYPES],
    pub blocks_reached: [u64; MIGRATE_TYPES],
    /// Per CPU: pcp pages asked for and placed.
    pub pcp_target: Vec<u64>,
    pub pcp_reached: Vec<u64>,
}

/// One cache: (name, slabs target, slabs made, active objects target, made).
pub type WarmCacheReport = (String, u64, u64, u64, u64);

#[derive(Clone, Debug, Default)]
pub struct WarmReport {
    pub zones: Vec<WarmZoneReport>,
    /// Traced pre-trace blocks: (traced pfn, kmm pfn, order) of each placed one.
    pub allocated: Vec<(u64, u64, u32)>,
    /// Traced pre-trace blocks that found no room.
    pub allocated_missed: u64,
    pub caches: Vec<WarmCacheReport>,
    /// Traced pre-trace slabs: (cache id, traced head pfn, kmm head pfn).
    pub slabs: Vec<(u32, u64, u64)>,
    /// Traced slabs placed at their own pfns, and moved elsewhere.
    pub slabs_at_traced_pfn: u64,
    pub slabs_moved: u64,
    /// Pages left in use with no known owner (PG_warm).
    pub untracked_pages: u64,
    pub warnings: Vec<String>,
}

/// What a warm start leaves for the replay of the trace it was made for:
/// how traced pre-trace pages and objects map to kmm's.
#[derive(Debug, Default)]
pub struct WarmSeeds {
    /// A replay has mapped them already (a second replay must not free
    /// what the first one left, taking it for pre-trace memory).
    pub used: std::sync::atomic::AtomicBool,
    /// The trace it was made for: (events, first timestamp, last timestamp).
    pub trace_id: (u64, u64, u64),
    pub report: WarmReport,
    /// Pre-trace objects the trace frees: (traced ptr, kmm ptr, cache id).
    pub objs: Vec<(u64, u64, u32)>,
    /// Head pfns of the traced pre-trace slabs (their traced frees are the
    /// kernel discarding them).
    pub slab_heads: Vec<u64>,
    /// How the machine was shaped and warmed, one sentence each.
    pub notes: Vec<String>,
}

// Page states of the layout map (one byte per managed pfn of a zone).
const USED: u8 = 0; // in use, owner unknown (the default)
const NEED: u8 = 1; // the trace needs it allocated (pre-trace block, traced slab)
const FREE: u8 = 2; // part of a placed free block
const PCP: u8 = 3; // on a pcp list
const TAKEN: u8 = 4; // given to an allocated block or slab, or not ours
const RESV: u8 = 5; // present, not managed (PG_reserved): may trade places with a USED page

/// The layout of one zone's managed run being built.
struct Layout {
    start: u64,
    state: Vec<u8>,
    /// `find_aligned`'s resume points per (order, from_top): a position
    /// once found not all-USED never becomes so (USED pages only go).
    cursors: HashMap<(u32, bool), u64>,
}

impl Layout {
    fn get(&self, pfn: u64) -> u8 {
        self.state[(pfn - self.start) as usize]
    }
    fn set(&mut self, pfn: u64, n: u64, v: u8) {
        let i = (pfn - self.start) as usize;
        self.state[i..i + n as usize].fill(v);
    }
    fn contains(&self, pfn: u64, n: u64) -> bool {
        pfn >= self.start && pfn.checked_add(n).is_some_and(|e| e <= self.start + self.state.len() as u64)
    }
    fn all(&self, pfn: u64, n: u64, v: u8) -> bool {
        self.contains(pfn, n) && {
            let i = (pfn - self.start) as usize;
            self.state[i..i + n as usize].iter().all(|&s| s == v)
        }
    }
    fn count(&self, pfn: u64, n: u64, v: u8) -> u64 {
        let i = (pfn - self.start) as usize;
        self.state[i..i + n as usize].iter().filter(|&&s| s == v).count() as u64
    }
}

impl Machine {
    /// Lay the machine out as `plan` says (see the module header). Call it
    /// on a freshly booted machine, before anything is allocated.
    pub fn warm_start(&self, plan: &WarmPlan) -> Result<WarmReport> {
        if self.cpus.current().is_some() {
            return Err(KmmError::InvalidArgument(
                "warm_start lays out every CPU's lists; call it from a thread not bound to a CPU".into(),
            ));
        }
        if self.nr_pcp_pages() != 0 || self.slab.caches().iter().any(|c| c.slabinfo_counts().2 != 0) {
            return Err(KmmError::InvalidArgument(
                "warm_start needs a freshly booted machine (pages or slabs are already in use)".into(),
            ));
        }
        let mut rep = WarmReport::default();
        let _d = self.trace.defer();

        // Slab pfns the trace names: zone layout must keep them.
        let mut slab_need: Vec<(u64, u32, u8)> = Vec::new(); // (head, order, mt)
        for wc in &plan.caches {
            let order = wc.cache.geo.order;
            let mt = if wc.cache.flags & SLAB_RECLAIM_ACCOUNT != 0 { MIGRATE_RECLAIMABLE } else { MIGRATE_UNMOVABLE };
            for s in &wc.slabs {
                slab_need.push((s.pfn >> order << order, order, mt));
            }
        }

        // Per zone: layout, pageblock types, free blocks, pcp pages.
        let mut layouts: Vec<Option<Layout>> = Vec::new();
        for z in &self.zones {
            let Some(wz) = plan.zones.iter().find(|w| w.zone == Some(z.kind)) else {
                layouts.push(None);
                continue;
            };
            if !z.is_populated() {
                layouts.push(None);
                continue;
            }
            // The layout covers the zone's online pfns (and its managed
            // pages): pages now in free blocks are USED (ours to hand out),
            // reserved ones RESV, anything else allocated already TAKEN.
            let (lo, hi) = self.warm_region(z);
            let mut lay = Layout { start: lo, state: vec![TAKEN; (hi - lo) as usize], cursors: HashMap::new() };
            for pfn in lo..hi {
                if self.mem_map.get(pfn).has(crate::page::PG_RESERVED) {
                    lay.set(pfn, 1, RESV);
                }
            }
            for (pfn, order) in z.area.lock().free_blocks(&self.mem_map) {
                let n = 1u64 << order;
                if lay.contains(pfn, n) {
                    lay.set(pfn, n, USED);
                }
            }
            // Only pages ours to hand out: a traced block over reserved
            // (or already used) pages goes elsewhere (steps 4 and 5), so the
            // zone keeps its managed count.
            let need = |lay: &mut Layout, pfn: u64, n: u64| {
                if lay.contains(pfn, n) {
                    for p in pfn..pfn + n {
                        if lay.get(p) == USED {
                            lay.set(p, 1, NEED);
                        }
                    }
                }
            };
            for &(pfn, order) in &plan.allocated {
                need(&mut lay, pfn, 1u64 << order.min(crate::arch::MAX_PAGE_ORDER));
            }
            for &(pfn, order, _) in &slab_need {
                need(&mut lay, pfn, 1u64 << order);
            }
            let mut zr = WarmZoneReport { zone: z.kind.name(), target: wz.free, ..Default::default() };
            {
                let mut a = z.area.lock();
                a.take_all(&self.mem_map);
                // 2. pageblock types.
                if let Some(target) = wz.blocks {
                    zr.blocks_target = target;
                    self.warm_pageblock_types(z, &mut a, &lay, target, &slab_need, &mut rep);
                }
                // 3. free blocks, then as many USED pages become reserved as
                // free blocks took reserved ones (managed stays as recorded).
                let took = self.warm_free_blocks(&mut a, &mut lay, &wz.free, &mut rep, z.kind.name());
                self.warm_rebalance_reserved(&mut lay, took, &mut rep, z.kind.name());
                zr.reached = a.nr_free_mt;
                for b in self.online_pageblocks(z) {
                    zr.blocks_reached[a.pageblock_migratetype(b) as usize] += 1;
                }
                z.sync_counters(&a);
            }
            // 6. pcp lists.
            for (cpu, slot) in z.pcp.iter().enumerate() {
                let (count, high) = wz.pcp.get(cpu).copied().unwrap_or((0, 0));
                zr.pcp_target.push(count);
                let hints = plan.pcp_pfns.get(cpu).map(|v| v.as_slice()).unwrap_or(&[]);
                let placed = self.warm_pcp(z, slot, &mut lay, count, high, hints);
                zr.pcp_reached.push(placed);
            }
            rep.zones.push(zr);
            layouts.push(Some(lay));
        }

        // 4. pre-trace allocated blocks.
        for &(pfn, order) in &plan.allocated {
            if order > crate::arch::MAX_PAGE_ORDER {
                rep.allocated_missed += 1;
                continue;
            }
            let n = 1u64 << order;
            let zi = self.zones.iter().position(|z| z.spans(pfn));
            let Some(zi) = zi else {
                rep.allocated_missed += 1;
                continue;
            };
            let Some(lay) = layouts[zi].as_mut() else {
                rep.allocated_missed += 1;
                continue;
            };
            let aligned = pfn & (n - 1) == 0;
            let at = if aligned && lay.contains(pfn, n) && (0..n).all(|k| lay.get(pfn + k) == NEED) {
                Some(pfn)
            } else {
                find_aligned(lay, order, USED, false)
            };
            match at {
                Some(p) => {
                    lay.set(p, n, TAKEN);
                    let head = self.mem_map.get(p);
                    head.set(0, order);
                    head.set_refcount(1);
                    rep.allocated.push((pfn, p, order));
                }
                None => rep.allocated_missed += 1,
            }
        }

        // 5. slabs.
        for wc in &plan.caches {
            self.warm_cache(wc, &mut layouts, &mut rep);
        }

        // 7. the rest: in use, owner unknown.
        for lay in layouts.iter().flatten() {
            for (i, &s) in lay.state.iter().enumerate() {
                if s == USED || s == NEED {
                    let p = self.mem_map.get(lay.start + i as u64);
                    p.set(PG_WARM, 0);
                    p.set_refcount(1);
                    rep.untracked_pages += 1;
                }
            }
        }
        for z in &self.zones {
            let a = z.area.lock();
            z.sync_counters(&a);
            // ZONE_BELOW_HIGH as the allocator would find it.
            let high = z.wmark(crate::zone::WMARK_HIGH);
            z.below_high.store(z.free_pages() <= high, Relaxed);
        }
        // The layout bypassed the allocator's KASAN hooks: rebuild the shadow.
        self.kasan_rebuild();
        Ok(rep)
    }

    /// The pfns the warm start lays out in a zone: its online pfns and its
    /// managed pages.
    fn warm_region(&self, z: &crate::zone::Zone) -> (u64, u64) {
        let (mut lo, mut hi) = z.online;
        // The managed pages: those not reserved, within the span.
        let mut pfn = z.start_pfn;
        let (mut mlo, mut mhi) = (u64::MAX, 0);
        while pfn < z.end_pfn() {
            if !self.mem_map.get(pfn).has(crate::page::PG_RESERVED) {
                mlo = mlo.min(pfn);
                mhi = pfn + 1;
            }
            pfn += 1;
        }
        if mhi > mlo {
            lo = lo.min(mlo);
            hi = hi.max(mhi);
        }
        (lo.max(z.start_pfn), hi.min(z.end_pfn()))
    }

    /// After free blocks took `took` reserved pages, make as many USED pages
    /// reserved (the lowest ones), so the zone keeps its managed count.
    fn warm_rebalance_reserved(&self, lay: &mut Layout, took: u64, rep: &mut WarmReport, zone: &str) {
        let mut left = took;
        for i in 0..lay.state.len() {
            if left == 0 {
                break;
            }
            if lay.state[i] == USED {
                lay.state[i] = RESV;
                let p = self.mem_map.get(lay.start + i as u64);
                p.set(crate::page::PG_RESERVED, 0);
                p.set_refcount(1);
                left -= 1;
            }
        }
        if left > 0 {
            rep.warnings.push(format!(
                "{zone}: the free blocks need {left} more managed pages than the zone has in use"
            ));
        }
    }

    /// The pageblocks /proc/pagetypeinfo counts for a zone (its online
    /// ones, stepping from the zone's start as
    /// `pagetypeinfo_showblockcount_print` does), by first pfn.
    pub fn online_pageblocks(&self, z: &crate::zone::Zone) -> Vec<u64> {
        let pbo = self.pageblock_order;
        let mut v = Vec::new();
        let mut pfn = z.start_pfn;
        while pfn < z.end_pfn() {
            if pfn >= z.online.0 && pfn < z.online.1 {
                v.push(pfn >> pbo << pbo);
            }
            pfn += 1 << pbo;
        }
        v
    }

    /// Step 2: give the zone's online pageblocks the recorded migratetype counts.
    fn warm_pageblock_types(
        &self,
        z: &crate::zone::Zone,
        a: &mut crate::buddy::FreeArea,
        lay: &Layout,
        target: [u64; MIGRATE_TYPES],
        slab_need: &[(u64, u32, u8)],
        rep: &mut WarmReport,
    ) {
        let pbo = self.pageblock_order;
        let pb = 1u64 << pbo;
        let end = lay.start + lay.state.len() as u64;
        let blocks = self.online_pageblocks(z);
        let mut left = target;
        let total: u64 = target.iter().fold(0u64, |a, &c| a.saturating_add(c));
        let n = blocks.len() as u64;
        if total != n {
            rep.warnings.push(format!(
                "{}: pagetypeinfo counts {total} pageblocks but the zone has {n} online: Movable takes the difference",
                z.kind.name()
            ));
            let others: u64 = target.iter().enumerate().filter(|&(i, _)| i != MIGRATE_MOVABLE as usize).map(|(_, v)| v).sum();
            left[MIGRATE_MOVABLE as usize] = n.saturating_sub(others);
        }
        let mut ty: HashMap<u64, u8> = HashMap::new();
        // Hints: pageblocks of traced slabs.
        for &(pfn, _, mt) in slab_need {
            let b = pfn >> pbo << pbo;
            if blocks.binary_search(&b).is_ok() && !ty.contains_key(&b) && left[mt as usize] > 0 {
                ty.insert(b, mt);
                left[mt as usize] -= 1;
            }
        }
        // The rest: non-movable types go to managed pageblocks first, those
        // holding pages the trace needs allocated first, lowest first;
        // Movable everywhere else.
        let mut order: Vec<u64> = blocks.iter().copied().filter(|b| !ty.contains_key(b)).collect();
        order.sort_by_key(|&b| {
            let s = b.max(lay.start);
            let e = (b + pb).min(end);
            let managed = e > s;
            (!managed, !managed || lay.count(s, e - s, NEED) == 0, b)
        });
        let mut it = order.into_iter();
        for mt in [MIGRATE_UNMOVABLE, MIGRATE_RECLAIMABLE, crate::buddy::MIGRATE_HIGHATOMIC, crate::buddy::MIGRATE_ISOLATE] {
            while left[mt as usize] > 0 {
                let Some(b) = it.next() else { break };
                ty.insert(b, mt);
                left[mt as usize] -= 1;
            }
        }
        for b in blocks {
            a.set_pageblock_migratetype(b, *ty.get(&b).unwrap_or(&MIGRATE_MOVABLE));
        }
    }

    /// Step 3: place the free blocks. Returns how many reserved pages they
    /// took (they become managed).
    fn warm_free_blocks(
        &self,
        a: &mut crate::buddy::FreeArea,
        lay: &mut Layout,
        target: &[[u64; MIGRATE_TYPES]; NR_PAGE_ORDERS],
        rep: &mut WarmReport,
        zone: &str,
    ) -> u64 {
        let mut took = 0u64;
        let pbo = self.pageblock_order;
        let end = lay.start + lay.state.len() as u64;
        // USED pages not in a placed block: each reserved page a block takes
        // needs one of them to become reserved in its place (free pages
        // never exceed the managed ones).
        let mut used_left = lay.state.iter().filter(|&&s| s == USED).count() as u64;
        for order in (0..NR_PAGE_ORDERS as u32).rev() {
            let n = 1u64 << order;
            for mt in 0..MIGRATE_TYPES as u8 {
                let want = target[order as usize][mt as usize];
                if want == 0 {
                    continue;
                }
                let mut placed = 0u64;
                // Large blocks from the top down; small ones from the bottom up.
                let top_down = order >= pbo;
                let mut pass = 0;
                while placed < want && pass < 2 {
                    // Pass 0 avoids pages the trace needs; pass 1 takes them.
                    let avoid_need = pass == 0;
                    if end.saturating_sub(lay.start) < n {
                        break; // no block of this order fits the zone at all
                    }
                    let mut cur = if top_down { (end - n) >> order << order } else { lay.start.next_multiple_of(n) };
                    loop {
                        if placed >= want {
                            break;
                        }
                        if cur < lay.start || cur + n > end {
                            break;
                        }
                        if a.pageblock_migratetype(cur) == mt
                            && (order < pbo || (0..n >> pbo).all(|k| a.pageblock_migratetype(cur + (k << pbo)) == mt))
                            && lay.all_free_candidates(cur, n, avoid_need)
                            && !a.would_merge(&self.mem_map, cur, order, mt)
                            && used_left - lay.count(cur, n, USED) >= took + lay.count(cur, n, RESV)
                        {
                            used_left -= lay.count(cur, n, USED);
                            let resv = lay.count(cur, n, RESV);
                            if resv > 0 {
                                for p in cur..cur + n {
                                    self.mem_map.get(p).clear();
                                }
                                took += resv;
                            }
                            a.place_free(&self.mem_map, cur, order, mt);
                            lay.set(cur, n, FREE);
                            placed += 1;
                        }
                        if top_down {
                            if cur < n {
                                break;
                            }
                            cur -= n;
                        } else {
                            cur += n;
                        }
                    }
                    pass += 1;
                }
                if placed < want {
                    rep.warnings.push(format!(
                        "{zone}: placed {placed} of {want} free order-{order} {} blocks (no room left in pageblocks of that type)",
                        crate::buddy::MIGRATETYPE_NAMES[mt as usize]
                    ));
                }
            }
        }
        took
    }

    /// Step 6: one CPU's pcp list for a zone.
    fn warm_pcp(
        &self,
        z: &crate::zone::Zone,
        slot: &crate::zone::PcpSlot,
        lay: &mut Layout,
        count: u64,
        high: u64,
        hints: &[u64],
    ) -> u64 {
        let mut pcp = slot.lists.lock();
        let mut placed = 0;
        let put = |pfn: u64, lay: &mut Layout, pcp: &mut crate::pcp::PerCpuPages| {
            let mut mt = z.pageblocks.get(pfn);
            if mt >= MIGRATE_PCPTYPES {
                mt = MIGRATE_MOVABLE;
            }
            let pindex = crate::pcp::order_to_pindex(mt, 0, self.pageblock_order);
            self.mem_map.get(pfn).set(PG_PCP, 0);
            pcp.lists[pindex].push_back(pfn as u32);
            pcp.count += 1;
            lay.set(pfn, 1, PCP);
        };
        for &pfn in hints {
            if placed >= count {
                break;
            }
            if lay.contains(pfn, 1) && lay.get(pfn) == USED {
                put(pfn, lay, &mut pcp);
                placed += 1;
            }
        }
        // The rest: in-use pages of movable pageblocks, from the top of the zone.
        let mut pfn = lay.start + lay.state.len() as u64;
        while placed < count && pfn > lay.start {
            pfn -= 1;
            if lay.get(pfn) == USED && z.pageblocks.get(pfn) == MIGRATE_MOVABLE {
                put(pfn, lay, &mut pcp);
                placed += 1;
            }
        }
        pcp.high = high.clamp(pcp.high_min, pcp.high_max.max(pcp.high_min));
        placed
    }

    /// Step 5: one cache's slabs.
    fn warm_cache(&self, wc: &WarmCache, layouts: &mut [Option<Layout>], rep: &mut WarmReport) {
        let c = &wc.cache;
        let order = c.geo.order;
        let per_slab = c.geo.objects as u64;
        let n = 1u64 << order;
        // Slabs to make: the traced ones (each once), then anonymous ones.
        let mut seen = HashSet::new();
        let mut traced: Vec<&WarmSlab> = Vec::new();
        for s in &wc.slabs {
            if seen.insert(s.pfn >> order << order) {
                traced.push(s);
            }
        }
        let nslabs = wc.num_slabs.max(traced.len() as u64);
        let total_objs = nslabs.saturating_mul(per_slab);
        let mut free_left = total_objs.saturating_sub(wc.active_objs.min(wc.num_objs.max(wc.active_objs)));
        // Free objects the traced slabs must have.
        let known_free: u64 = traced.iter().map(|s| s.free.len() as u64).sum();
        free_left = free_left.saturating_sub(known_free);
        let anon = nslabs - traced.len() as u64;
        // Free objects per slab beyond the known ones, spread evenly.
        let each = free_left.checked_div(nslabs).unwrap_or(0);
        let extra = free_left.checked_rem(nslabs).unwrap_or(0);
        // Slabs come from GFP_KERNEL's zonelist: Normal, then the zones below
        // it (a machine below 4 GiB has no Normal zone; a full one falls back).
        let zonelist: Vec<usize> = (0..=self.zone_index(ZoneKind::Normal).unwrap_or(0)).rev().collect();
        let find = |layouts: &mut [Option<Layout>]| {
            zonelist.iter().find_map(|&zi| layouts[zi].as_mut().and_then(|l| find_aligned(l, order, USED, true)))
        };
        let mut made = 0u64;
        let mut active = 0u64;
        let mut k = 0u64;
        let make = |head: u64, known_live: &[u32], known_free: &[u32], k: u64| -> u64 {
            let mut live = vec![true; per_slab as usize];
            for &i in known_free {
                if let Some(l) = live.get_mut(i as usize) {
                    *l = false;
                }
            }
            let want_free = each + u64::from(k < extra);
            let mut freed = known_free.len() as u64;
            let keep: HashSet<u32> = known_live.iter().copied().collect();
            for i in (0..per_slab as u32).rev() {
                if freed >= want_free + known_free.len() as u64 || freed + 1 >= per_slab {
                    break;
                }
                if live[i as usize] && !keep.contains(&i) {
                    live[i as usize] = false;
                    freed += 1;
                }
            }
            let objs = c.warm_slab(self, head, order, &live);
            live.iter().take(objs as usize).filter(|&&l| l).count() as u64
        };
        for s in &traced {
            let head = s.pfn >> order << order;
            let zi = self.zones.iter().position(|z| z.spans(head));
            let spot = zi.and_then(|zi| layouts[zi].as_mut()).filter(|l| l.contains(head, n) && l.all(head, n, NEED));
            let at = match spot {
                Some(l) => {
                    l.set(head, n, TAKEN);
                    rep.slabs_at_traced_pfn += 1;
                    Some(head)
                }
                None => {
                    rep.slabs_moved += 1;
                    find(layouts)
                }
            };
            let Some(at) = at else { break };
            rep.slabs.push((c.id, head, at));
            let (kl, kf): (&[u32], &[u32]) = (&s.live, &s.free);
            active += make(at, kl, kf, k);
            k += 1;
            made += 1;
        }
        for _ in 0..anon {
            let at = find(layouts);
            let Some(at) = at else {
                rep.warnings.push(format!("{}: no room for {} more slabs", c.name, nslabs - made));
                break;
            };
            active += make(at, &[], &[], k);
            k += 1;
            made += 1;
        }
        rep.caches.push((c.name.clone(), wc.num_slabs, made, wc.active_objs, active));
    }
}

impl Layout {
    /// Can a free block cover [pfn, pfn+n)? (in use, unowned; pages the
    /// trace needs only when `avoid_need` is false)
    fn all_free_candidates(&self, pfn: u64, n: u64, avoid_need: bool) -> bool {
        if !self.contains(pfn, n) {
            return false;
        }
        let i = (pfn - self.start) as usize;
        self.state[i..i + n as usize].iter().all(|&s| s == USED || s == RESV || (!avoid_need && s == NEED))
    }
}

/// An aligned block of `order` whose pages are all `v`, taken (marked
/// TAKEN); searched from the bottom (or the top) of the layout.
fn find_aligned(lay: &mut Layout, order: u32, v: u8, from_top: bool) -> Option<u64> {
    let n = 1u64 << order;
    let end = lay.start + lay.state.len() as u64;
    let first = lay.start.next_multiple_of(n);
    if first + n > end {
        return None;
    }
    let last = (end - n) >> order << order;
    let mut cur = match lay.cursors.get(&(order, from_top)) {
        Some(&c) => c,
        None if from_top => last,
        None => first,
    };
    loop {
        if cur < first || cur > last {
            lay.cursors.insert((order, from_top), cur);
            return None;
        }
        if lay.all(cur, n, v) {
            lay.set(cur, n, TAKEN);
            lay.cursors.insert((order, from_top), cur);
            return Some(cur);
        }
        if from_top {
            if cur < n {
                lay.cursors.insert((order, from_top), 0);
                return None;
            }
            cur -= n;
        } else {
            cur += n;
        }
    }
}
