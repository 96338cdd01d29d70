//! The page allocator's API: gfp -> zonelist -> watermarks -> buddy, and the
//! free path back. `alloc_pages`, `__get_free_pages`, `__free_pages`, ...
//!
//! # Kernel
//! `mm/page_alloc.c`: `__alloc_pages_noprof`, `prepare_alloc_pages`,
//! `get_page_from_freelist`, `zone_watermark_fast`, `__zone_watermark_ok`,
//! `alloc_flags_nofragment`, `gfp_to_alloc_flags`, `__gfp_pfmemalloc_flags`,
//! `__alloc_pages_slowpath`, `rmqueue`, `rmqueue_buddy`,
//! `reserve_highatomic_pageblock`, `boost_watermark`, `warn_alloc`,
//! `__free_pages`, `free_pages_prepare`, `__free_pages_ok`, `free_one_page`;
//! `mm/page_alloc.c` `prep_new_page` / `post_alloc_hook` (zeroing, with
//! init_on_alloc/init_on_free: `mem_init.rs`), `prep_compound_page`;
//! `should_fail_alloc_page` in `prepare_alloc_pages` (`fault_inject.rs`).
//!
//! SIMPLIFICATION: there is nothing to reclaim (no page cache, no swap), so
//! the slow path has no direct reclaim, compaction or OOM killer: after the
//! min-watermark attempt (and the reserves the gfp mask entitles it to) an
//! allocation fails. kswapd, when woken, only resets a boosted watermark (it
//! would find nothing to reclaim). `__GFP_NOFAIL` then ignores watermarks
//! rather than looping forever waiting for reclaim; a request that no free
//! block can satisfy still fails.
//!
//! Timer work: `decay_pcp_high` and `vmstat_update` (mm/vmstat.c: the
//! pageset part of `refresh_cpu_vm_stats`), run by `advance_time` when the
//! simulated clock (`clock.rs`) passes their due time; 6.18.y drains the
//! decayed excess in chunks of `batch` (the stable backport), each chunk
//! from pindex 0 as the kernel does.
//!
//! # Invariants
//! - alloc-1: an allocated block's head has refcount >= 1 and records its order.
//! - alloc-2: a failed call changes no counter, list or page.
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering::Relaxed;

use crate::arch::{ZoneKind, MAX_PAGE_ORDER};
use crate::buddy::{alloc_flags::*, BuddyEvent, RmqueueMode, MIGRATE_HIGHATOMIC};
use crate::error::{KmmError, Result};
use crate::gfp::{self, Gfp, ZoneKindReq};
use crate::machine::{Machine, VirtAddr};
use crate::page::{Pfn, PG_BUDDY, PG_HEAD, PG_LRU, PG_PCP, PG_RESERVED, PG_SLAB, PG_TAIL};
use crate::trace::{EventId, Payload};
use crate::zone::Zone;

/// `watermark_boost_factor` default (15000 = 150% of the high watermark).
pub const WATERMARK_BOOST_FACTOR: u64 = 15000;

/// The resolved request (`struct alloc_context`).
#[derive(Clone, Copy, Debug)]
pub struct AllocContext {
    pub highest_zoneidx: usize,
    pub migratetype: u8,
}

impl Machine {
    /// The simulated CPU the calling thread runs on (see `cpu.rs`).
    #[inline]
    pub fn this_cpu(&self) -> u32 {
        self.cpus.this_cpu()
    }

    /// The CPU to run on, once no other thread holds it with preemption
    /// disabled (see `Cpus::wait_runnable`).
    #[inline]
    pub fn run_cpu(&self) -> u32 {
        let cpu = self.cpus.this_cpu();
        self.cpus.wait_runnable(cpu);
        cpu
    }

    /// `might_alloc(gfp)`: an allocation that may sleep, in atomic context,
    /// is the kernel's "sleeping function called from invalid context".
    #[inline]
    pub fn might_alloc(&self, gfp: Gfp, at: &str) -> Result<()> {
        if gfp::allow_blocking(gfp) {
            self.cpus.might_sleep(at).map_err(KmmError::SleepInAtomic)?;
        }
        Ok(())
    }

    /// `gfp_zone()` resolved to this machine's zone index.
    pub fn gfp_zone(&self, gfp: Gfp) -> Result<usize> {
        let has_high = self.zone_index(ZoneKind::HighMem).is_some();
        let has_dma32 = self.zone_index(ZoneKind::Dma32).is_some();
        let kind = match gfp::gfp_zone_kind(gfp, has_high, has_dma32)? {
            ZoneKindReq::Dma => ZoneKind::Dma,
            ZoneKindReq::Dma32 => ZoneKind::Dma32,
            ZoneKindReq::Normal => ZoneKind::Normal,
            ZoneKindReq::HighMem => ZoneKind::HighMem,
            ZoneKindReq::Movable => ZoneKind::Movable,
        };
        Ok(self.zone_index(kind).expect("arch has the zone gfp_zone picked"))
    }

    /// The zonelist walk for a request: populated zones from `highest` down.
    pub fn zonelist(&self, highest: usize) -> impl Iterator<Item = &Zone> {
        self.zones[..=highest].iter().rev().filter(|z| z.is_populated())
    }

    /// `prepare_alloc_pages`: validate the mask, resolve zone and migratetype.
    pub fn prepare_alloc(&self, gfp: Gfp, order: u32) -> Result<AllocContext> {
        if gfp & gfp::GFP_MOVABLE_MASK == gfp::GFP_MOVABLE_MASK {
            return Err(KmmError::BadGfp(format!(
                "gfp mask {:#x}({}) asks for both __GFP_MOVABLE and __GFP_RECLAIMABLE",
                gfp,
                gfp::format_pgg(gfp)
            )));
        }
        let highest_zoneidx = self.gfp_zone(gfp)?;
        self.might_alloc(gfp, "mm/page_alloc.c (prepare_alloc_pages -> might_alloc)")?;
        if order > MAX_PAGE_ORDER {
            return Err(self.alloc_failure(gfp, order, "order > MAX_PAGE_ORDER"));
        }
        self.should_fail_alloc_page(gfp, order)?;
        Ok(AllocContext { highest_zoneidx, migratetype: gfp::migratetype(gfp) })
    }

    /// `__alloc_pages`: allocate 2^order contiguous pages. Returns the head pfn.
    pub fn alloc_pages(&self, gfp: Gfp, order: u32) -> Result<Pfn> {
        let ac = self.prepare_alloc(gfp, order)?;
        let mut alloc_flags = ALLOC_WMARK_LOW;
        alloc_flags |= self.alloc_flags_nofragment(ac.highest_zoneidx, gfp);
        let mut page = self.get_page_from_freelist(order, alloc_flags, &ac);
        if page.is_none() {
            page = self.alloc_pages_slowpath(gfp, order, &ac);
        }
        match page {
            Some(pfn) => {
                self.prep_new_page(pfn, order, gfp)?;
                if self.trace.on(EventId::MmPageAlloc) {
                    self.trace.emit(
                        self.this_cpu(),
                        Payload::MmPageAlloc {
                            pfn: Some(pfn.0),
                            order,
                            migratetype: ac.migratetype as i32,
                            gfp_flags: gfp,
                        },
                    );
                }
                Ok(pfn)
            }
            None => {
                if self.trace.on(EventId::MmPageAlloc) {
                    self.trace.emit(
                        self.this_cpu(),
                        Payload::MmPageAlloc {
                            pfn: None,
                            order,
                            migratetype: ac.migratetype as i32,
                            gfp_flags: gfp,
                        },
                    );
                }
                self.stats.pgalloc_fail.fetch_add(1, Relaxed);
                Err(self.alloc_failure(gfp, order, ""))
            }
        }
    }

    /// The `warn_alloc` report as an error.
    fn alloc_failure(&self, gfp: Gfp, order: u32, why: &str) -> KmmError {
        let mut message = format!(
            "page allocation failure: order:{order}, mode:{:#x}({}), nodemask=(null)",
            gfp,
            gfp::format_pgg(gfp)
        );
        if !why.is_empty() {
            message = format!("WARNING: {why}: {message}");
        }
        KmmError::OutOfMemory { order, gfp, message }
    }

    /// `alloc_flags_nofragment`: avoid fragmenting fallbacks in Normal while
    /// DMA32 still has room (the "preferred zone is Normal and DMA32 exists" rule).
    fn alloc_flags_nofragment(&self, highest: usize, gfp: Gfp) -> u32 {
        let flags = gfp & __GFP_KSWAPD_RECLAIM_ALLOC;
        // CONFIG_ZONE_DMA32 only; one node, so no populated_zone(DMA32) check.
        match self.zonelist(highest).next() {
            Some(z) if z.kind == ZoneKind::Normal && self.zone_index(ZoneKind::Dma32).is_some() => {
                flags | ALLOC_NOFRAGMENT
            }
            _ => flags,
        }
    }

    /// `gfp_to_alloc_flags`.
    fn gfp_to_alloc_flags(&self, gfp: Gfp, order: u32) -> u32 {
        let mut f = ALLOC_WMARK_MIN | ALLOC_CPUSET;
        // ALLOC_MIN_RESERVE == __GFP_HIGH and ALLOC_KSWAPD == __GFP_KSWAPD_RECLAIM.
        f |= gfp & (gfp::__GFP_HIGH | gfp::__GFP_KSWAPD_RECLAIM);
        if !gfp::allow_blocking(gfp) {
            if gfp & gfp::__GFP_NOMEMALLOC == 0 {
                f |= ALLOC_NON_BLOCK;
                if order > 0 && f & ALLOC_MIN_RESERVE != 0 {
                    f |= ALLOC_HIGHATOMIC;
                }
            }
            if f & ALLOC_MIN_RESERVE != 0 {
                f &= !ALLOC_CPUSET;
            }
        }
        f
    }

    /// `__gfp_pfmemalloc_flags`.
    fn pfmemalloc_flags(&self, gfp: Gfp) -> u32 {
        if gfp & gfp::__GFP_NOMEMALLOC != 0 {
            return 0;
        }
        if gfp & gfp::__GFP_MEMALLOC != 0 {
            return ALLOC_NO_WATERMARKS;
        }
        0
    }

    /// `__alloc_pages_slowpath`, less reclaim, compaction and the OOM killer.
    fn alloc_pages_slowpath(&self, gfp: Gfp, order: u32, ac: &AllocContext) -> Option<Pfn> {
        let mut alloc_flags = self.gfp_to_alloc_flags(gfp, order);
        if alloc_flags & ALLOC_KSWAPD != 0 {
            self.wake_all_kswapds(ac.highest_zoneidx);
        }
        if let Some(p) = self.get_page_from_freelist(order, alloc_flags, ac) {
            return Some(p);
        }
        let reserve = self.pfmemalloc_flags(gfp);
        if reserve != 0 {
            alloc_flags = reserve | (alloc_flags & ALLOC_KSWAPD);
            if let Some(p) = self.get_page_from_freelist(order, alloc_flags, ac) {
                return Some(p);
            }
        }
        if gfp & gfp::__GFP_NOFAIL != 0 {
            // __alloc_pages_cpuset_fallback(ALLOC_MIN_RESERVE), then (model) no watermarks.
            for f in [ALLOC_MIN_RESERVE, ALLOC_NO_WATERMARKS] {
                if let Some(p) = self.get_page_from_freelist(order, f, ac) {
                    return Some(p);
                }
            }
        }
        None
    }

    /// kswapd, woken: nothing to reclaim in the model, so it only drops the
    /// watermark boost as `balance_pgdat` does when it finishes.
    fn wake_all_kswapds(&self, highest: usize) {
        for z in self.zonelist(highest) {
            z.watermark_boost.store(0, Relaxed);
        }
    }

    /// `get_page_from_freelist`: walk the zonelist, check watermarks, take pages.
    pub fn get_page_from_freelist(
        &self,
        order: u32,
        mut alloc_flags: u32,
        ac: &AllocContext,
    ) -> Option<Pfn> {
        loop {
            let no_fallback = alloc_flags & ALLOC_NOFRAGMENT != 0;
            for z in self.zonelist(ac.highest_zoneidx) {
                // A zone above its high watermark is used without the
                // request's own check; below it, ZONE_BELOW_HIGH is set.
                let mut ok = false;
                if !z.below_high.load(Relaxed) {
                    let high = z.wmark(crate::zone::WMARK_HIGH);
                    if self.zone_watermark_fast(z, order, high, ac.highest_zoneidx, alloc_flags) {
                        ok = true;
                    } else {
                        z.below_high.store(true, Relaxed);
                    }
                }
                if !ok {
                    let mark = z.wmark((alloc_flags & ALLOC_WMARK_MASK) as usize);
                    if !self.zone_watermark_fast(z, order, mark, ac.highest_zoneidx, alloc_flags)
                        && alloc_flags & ALLOC_NO_WATERMARKS == 0
                    {
                        z.counters.wmark_fail.fetch_add(1, Relaxed);
                        continue;
                    }
                }
                if let Some(pfn) = self.rmqueue(z, order, alloc_flags, ac.migratetype) {
                    if alloc_flags & ALLOC_HIGHATOMIC != 0 {
                        self.reserve_highatomic_pageblock(z, pfn, order);
                    }
                    return Some(Pfn(pfn));
                }
            }
            if no_fallback {
                alloc_flags &= !ALLOC_NOFRAGMENT;
                continue;
            }
            return None;
        }
    }

    /// `zone_watermark_fast`.
    fn zone_watermark_fast(&self, z: &Zone, order: u32, mark: u64, highest: usize, alloc_flags: u32) -> bool {
        let free = z.nr_free_pages.load(Relaxed);
        let reserve = z.lowmem_reserve[highest].load(Relaxed) as i64;
        if order == 0 {
            let unusable = Self::watermark_unusable_free(z, 0, alloc_flags);
            let usable = free - free.max(0).min(unusable);
            if usable > mark as i64 + reserve {
                return true;
            }
        }
        if self.zone_watermark_ok(z, order, mark, highest, alloc_flags, free) {
            return true;
        }
        // Ignore boosting for __GFP_HIGH order-0 allocations at the min mark.
        if order == 0
            && alloc_flags & ALLOC_MIN_RESERVE != 0
            && z.watermark_boost.load(Relaxed) != 0
            && alloc_flags & ALLOC_WMARK_MASK == ALLOC_WMARK_MIN
        {
            let mark = z.watermark[0].load(Relaxed);
            return self.zone_watermark_ok(z, order, mark, highest, alloc_flags, free);
        }
        false
    }

    /// `__zone_watermark_unusable_free`: pages this request cannot use.
    fn watermark_unusable_free(z: &Zone, order: u32, alloc_flags: u32) -> i64 {
        let mut u = (1i64 << order) - 1;
        if alloc_flags & ALLOC_RESERVES == 0 {
            u += z.nr_free_highatomic.load(Relaxed);
        }
        u
    }

    /// `__zone_watermark_ok`.
    pub fn zone_watermark_ok(
        &self,
        z: &Zone,
        order: u32,
        mark: u64,
        highest: usize,
        alloc_flags: u32,
        free_pages: i64,
    ) -> bool {
        let mut min = mark as i64;
        let free = free_pages - Self::watermark_unusable_free(z, order, alloc_flags);
        if alloc_flags & ALLOC_RESERVES != 0 {
            if alloc_flags & ALLOC_MIN_RESERVE != 0 {
                min -= min / 2;
                if alloc_flags & ALLOC_NON_BLOCK != 0 {
                    min -= min / 4;
                }
            }
            if alloc_flags & ALLOC_OOM != 0 {
                min -= min / 2;
            }
        }
        if free <= min + z.lowmem_reserve[highest].load(Relaxed) as i64 {
            return false;
        }
        if order == 0 {
            return true;
        }
        // The kernel reads free_area[o] here without zone->lock
        // (__zone_watermark_ok: free_area_empty, lockless): not counted.
        z.area.lock_uncounted().has_usable_block(order, alloc_flags)
    }

    /// `rmqueue`: the per-CPU lists for pcp-sized orders, else the buddy lists.
    fn rmqueue(&self, z: &Zone, order: u32, alloc_flags: u32, mt: u8) -> Option<u64> {
        if crate::pcp_allowed_order(order, self.pageblock_order) {
            if let Some(p) = self.rmqueue_pcplist(z, order, alloc_flags, mt) {
                return Some(p);
            }
        }
        self.rmqueue_buddy(z, order, alloc_flags, mt)
    }

    /// `rmqueue_pcplist`: the head of this CPU's (order, migratetype) list,
    /// refilled from the buddy allocator in a batch (`rmqueue_bulk`) when empty.
    fn rmqueue_pcplist(&self, z: &Zone, order: u32, alloc_flags: u32, mt: u8) -> Option<u64> {
        let cpu = self.run_cpu();
        let slot = &z.pcp[cpu as usize];
        let Some(mut pcp) = slot.lists.try_lock() else {
            slot.contended.fetch_add(1, Relaxed);
            return None; // pcp_spin_trylock failed: take the buddy path
        };
        pcp.free_count >>= 1;
        let pindex = crate::pcp::order_to_pindex(mt, order, self.pageblock_order);
        let mut events = Vec::new();
        if pcp.lists[pindex].is_empty() {
            let batch = pcp.nr_pcp_alloc(order, z.below_high.load(Relaxed));
            let tracing = self.trace.any(EventId::MmPageAllocZoneLocked.bit() | EventId::MmPageAllocExtfrag.bit());
            let mut ev = if tracing { Some(&mut events) } else { None };
            let boosts;
            {
                let mut a = z.area.lock();
                let mut mode = RmqueueMode::Normal;
                for _ in 0..batch {
                    let Some(p) = a.rmqueue(&self.mem_map, order, mt, alloc_flags, &mut mode, &mut ev) else {
                        break;
                    };
                    self.mem_map.get(p).set(PG_PCP, order);
                    pcp.lists[pindex].push_back(p as u32);
                    pcp.count += 1 << order;
                }
                z.sync_counters(&a);
                boosts = std::mem::take(&mut a.boost_requests);
            }
            self.apply_boosts(z, boosts, alloc_flags);
        }
        let pfn = pcp.lists[pindex].pop_front().map(|p| p as u64);
        if pfn.is_some() {
            pcp.count -= 1 << order;
            // PGALLOC, as `__count_zid_vm_events`' this_cpu_add: a plain
            // load and store, no lock prefix. The slot's counters are only
            // written under its pcp lock (here and in `free_to_pcp`), so no
            // update is lost; readers sum them with relaxed loads (issue 13,
            // part 4: the `lock add` was ~1/4 of this function's samples).
            slot.pgalloc.store(slot.pgalloc.load(Relaxed) + (1 << order), Relaxed);
        }
        drop(pcp);
        self.emit_buddy_events(&events);
        let pfn = pfn?;
        self.mem_map.get(pfn).set(0, 0);
        Some(pfn)
    }

    /// `rmqueue_buddy`: take a block from one zone's buddy lists.
    fn rmqueue_buddy(&self, z: &Zone, order: u32, alloc_flags: u32, mt: u8) -> Option<u64> {
        let tracing = self.trace.any(EventId::MmPageAllocZoneLocked.bit() | EventId::MmPageAllocExtfrag.bit());
        let mut events = Vec::new();
        let mut ev = if tracing { Some(&mut events) } else { None };
        let (page, boosts) = {
            let mut a = z.area.lock();
            let mut page = None;
            if alloc_flags & ALLOC_HIGHATOMIC != 0 {
                page = a.rmqueue_smallest(&self.mem_map, order, MIGRATE_HIGHATOMIC, &mut ev);
            }
            if page.is_none() {
                let mut mode = RmqueueMode::Normal;
                page = a.rmqueue(&self.mem_map, order, mt, alloc_flags, &mut mode, &mut ev);
                if page.is_none() && alloc_flags & (ALLOC_OOM | ALLOC_NON_BLOCK) != 0 {
                    page = a.rmqueue_smallest(&self.mem_map, order, MIGRATE_HIGHATOMIC, &mut ev);
                }
            }
            z.sync_counters(&a);
            let b = std::mem::take(&mut a.boost_requests);
            (page, b)
        };
        self.apply_boosts(z, boosts, alloc_flags);
        self.emit_buddy_events(&events);
        let pfn = page?;
        z.counters.pgalloc.fetch_add(1 << order, Relaxed);
        Some(pfn)
    }

    /// `boost_watermark` once per fragmenting fallback the buddy layer
    /// reported; with ALLOC_KSWAPD, kswapd is woken (ZONE_BOOSTED_WATERMARK)
    /// and, having nothing to reclaim, resets the boost at once.
    fn apply_boosts(&self, z: &Zone, boosts: u64, alloc_flags: u32) {
        for _ in 0..boosts {
            self.boost_watermark(z);
        }
        if boosts > 0 && alloc_flags & ALLOC_KSWAPD != 0 {
            z.watermark_boost.store(0, Relaxed);
        }
    }

    fn emit_buddy_events(&self, events: &[BuddyEvent]) {
        let cpu = self.this_cpu();
        for e in events {
            match *e {
                BuddyEvent::ZoneLocked { pfn, order, migratetype, percpu_refill } => {
                    if self.trace.on(EventId::MmPageAllocZoneLocked) {
                        self.trace.emit(
                            cpu,
                            Payload::MmPageAllocZoneLocked {
                                pfn,
                                order,
                                migratetype: migratetype as i32,
                                percpu_refill,
                            },
                        );
                    }
                }
                BuddyEvent::ExtFrag {
                    pfn,
                    alloc_order,
                    fallback_order,
                    alloc_migratetype,
                    fallback_migratetype,
                    change_ownership,
                } => {
                    if self.trace.on(EventId::MmPageAllocExtfrag) {
                        self.trace.emit(
                            cpu,
                            Payload::MmPageAllocExtfrag {
                                pfn,
                                alloc_order,
                                fallback_order,
                                pageblock_order: self.pageblock_order,
                                alloc_migratetype: alloc_migratetype as i32,
                                fallback_migratetype: fallback_migratetype as i32,
                                fragmenting: fallback_order < self.pageblock_order,
                                change_ownership,
                            },
                        );
                    }
                }
            }
        }
    }

    /// `boost_watermark`.
    fn boost_watermark(&self, z: &Zone) -> bool {
        let pb = 1u64 << self.pageblock_order;
        if pb * 4 > z.managed {
            return false;
        }
        let factor = self.sysctls.watermark_boost_factor.load(Relaxed);
        let max_boost = z.watermark[2].load(Relaxed).saturating_mul(factor) / 10000;
        if max_boost == 0 {
            return false;
        }
        let max_boost = max_boost.max(pb);
        let cur = z.watermark_boost.load(Relaxed);
        z.watermark_boost.store((cur + pb).min(max_boost), Relaxed);
        true
    }

    /// `reserve_highatomic_pageblock`: at most 1% of the zone plus one pageblock.
    fn reserve_highatomic_pageblock(&self, z: &Zone, pfn: u64, order: u32) {
        let pb = 1u64 << self.pageblock_order;
        if z.managed / 100 < pb {
            return;
        }
        let max_managed = (z.managed / 100).div_ceil(pb) * pb;
        if z.nr_reserved_highatomic.load(Relaxed) >= max_managed {
            return;
        }
        let mut a = z.area.lock();
        if z.nr_reserved_highatomic.load(Relaxed) >= max_managed {
            return;
        }
        let mt = a.pageblock_migratetype(pfn);
        if mt >= crate::buddy::MIGRATE_PCPTYPES {
            return; // only mergeable (normal) pageblocks are reserved
        }
        if order < self.pageblock_order {
            if a.reserve_highatomic(&self.mem_map, pfn) {
                z.nr_reserved_highatomic.fetch_add(pb, Relaxed);
            }
        } else {
            let nr = 1u64 << (order - self.pageblock_order);
            for k in 0..nr {
                a.set_pageblock_migratetype(pfn + k * pb, MIGRATE_HIGHATOMIC);
            }
            z.nr_reserved_highatomic.fetch_add(1 << order, Relaxed);
        }
        z.sync_counters(&a);
    }

    /// `prep_new_page`: refcount, order, compound metadata, zeroing.
    fn prep_new_page(&self, pfn: Pfn, order: u32, gfp: Gfp) -> Result<()> {
        let head = self.mem_map.get(pfn.0);
        let mut flags = 0;
        if order > 0 && gfp & gfp::__GFP_COMP != 0 {
            flags |= PG_HEAD;
            for t in 1..(1u64 << order) {
                let tail = self.mem_map.get(pfn.0 + t);
                tail.set(PG_TAIL, 0);
                tail.set_next(pfn.0 as u32); // compound_head
            }
        }
        if gfp & gfp::__GFP_MOVABLE != 0 {
            flags |= PG_LRU;
        }
        head.set_with_owner(flags, order, gfp::migratetype(gfp));
        head.set_refcount(1);
        self.kasan_unpoison_pages(pfn, order); // post_alloc_hook
        if self.page_init_on_alloc(gfp) {
            let pa = self.pfn_to_phys(pfn).0;
            if let Err(e) = self.phys.zero(pa, self.page_size << order) {
                // Undo: give the block back, so a failure changes nothing.
                self.free_block(pfn, order);
                return Err(e);
            }
        }
        Ok(())
    }

    /// `__get_free_pages` (`get_free_pages_noprof`): allocate and return the
    /// direct-map address. It never hands out highmem: `__GFP_HIGHMEM` is
    /// masked off, as the kernel does ("Never use with __GFP_HIGHMEM").
    pub fn get_free_pages(&self, gfp: Gfp, order: u32) -> Result<VirtAddr> {
        let pfn = self.alloc_pages(gfp & !gfp::__GFP_HIGHMEM, order)?;
        Ok(self.page_address(pfn).expect("non-highmem page has an address"))
    }

    /// Classify `pfn` for a free: Ok(head order) for a live block start, or the error.
    fn check_free(&self, pfn: Pfn, order: u32) -> Result<u32> {
        if !self.pfn_valid(pfn) {
            return Err(KmmError::InvalidFree(format!(
                "BUG: Bad page state: pfn:{:05x} is not RAM (invalid pfn)",
                pfn.0
            )));
        }
        let p = self.mem_map.get(pfn.0);
        if p.has(PG_RESERVED) {
            return Err(KmmError::InvalidFree(format!(
                "BUG: Bad page state in process kmm  pfn:{:05x}: PAGE_FLAGS_CHECK_AT_FREE flag(s) set (reserved)",
                pfn.0
            )));
        }
        if p.has(PG_BUDDY) || p.has(PG_PCP) {
            return Err(KmmError::DoubleFree(format!(
                "double free or corruption: pfn:{:05x} order:{order} is already free (page dumped because: VM_BUG_ON_PAGE(page_ref_count(page) == 0))",
                pfn.0
            )));
        }
        if p.has(PG_SLAB) {
            return Err(KmmError::InvalidFree(format!(
                "BUG: Bad page state in process kmm  pfn:{:05x}: freeing a slab page with free_pages",
                pfn.0
            )));
        }
        if p.has(crate::page::PG_VMALLOC) {
            return Err(KmmError::InvalidFree(format!(
                "BUG: Bad page state in process kmm  pfn:{:05x}: freeing a page a vmalloc area still maps \
                 (vfree frees the area's pages)",
                pfn.0
            )));
        }
        if p.has(crate::page::PG_TABLE) {
            return Err(KmmError::InvalidFree(format!(
                "BUG: Bad page state in process kmm  pfn:{:05x}: freeing a page-table page with free_pages \
                 (the page tables still link it)",
                pfn.0
            )));
        }
        if self.shadow.is_live(self.pfn_to_phys(pfn).0) {
            return Err(KmmError::InvalidFree(format!(
                "BUG: Bad page state in process kmm  pfn:{:05x}: freeing a large kmalloc with free_pages \
                 (kfree frees it)",
                pfn.0
            )));
        }
        if p.refcount() <= 0 {
            // Inside a free block, or a tail of an allocated block?
            let z = self.pfn_zone(pfn).expect("valid pfn has a zone");
            if z.area.lock().find_free_block(&self.mem_map, pfn.0).is_some() || self.in_pcp_block(pfn.0) {
                return Err(KmmError::DoubleFree(format!(
                    "double free or corruption: pfn:{:05x} lies in a free block (page dumped because: VM_BUG_ON_PAGE(page_ref_count(page) == 0))",
                    pfn.0
                )));
            }
            return Err(KmmError::InvalidFree(format!(
                "BUG: Bad page state in process kmm  pfn:{:05x}: not the first page of an allocation{}",
                pfn.0,
                if p.has(PG_TAIL) { " (a compound tail page)" } else { "" }
            )));
        }
        if p.order() != order {
            return Err(KmmError::InvalidFree(format!(
                "BUG: Bad page state in process kmm  pfn:{:05x}: freed with order {order} but allocated with order {}",
                pfn.0,
                p.order()
            )));
        }
        // A buffer export or a vmap over it (pins.rs).
        self.check_unpinned(pfn.0, 1 << order)?;
        Ok(p.order())
    }

    /// Is `pfn` inside a block sitting on a per-CPU list?
    fn in_pcp_block(&self, pfn: u64) -> bool {
        (0..=self.pageblock_order).any(|o| {
            let head = pfn >> o << o;
            let m = self.mem_map.get(head);
            m.has(PG_PCP) && pfn < head + (1u64 << m.order())
        })
    }

    /// `__free_pages`: drop a reference; free the block when it was the last.
    pub fn free_pages(&self, pfn: Pfn, order: u32) -> Result<()> {
        self.check_free(pfn, order)?;
        let head = self.mem_map.get(pfn.0);
        if head.ref_dec() > 0 {
            return Ok(());
        }
        if self.trace.on(EventId::MmPageFree) {
            self.trace.emit(self.this_cpu(), Payload::MmPageFree { pfn: pfn.0, order });
        }
        self.free_block(pfn, order);
        Ok(())
    }

    /// `free_pages(addr, order)`: free by direct-map address.
    pub fn free_pages_addr(&self, addr: VirtAddr, order: u32) -> Result<()> {
        let pa = self.virt_to_phys(addr).map_err(|_| {
            KmmError::InvalidFree(format!("free_pages: {:#x} is not a direct-map address", addr.0))
        })?;
        if pa.0 & (self.page_size - 1) != 0 {
            return Err(KmmError::InvalidFree(format!(
                "free_pages: {:#x} is not page aligned (VM_BUG_ON(!virt_addr_valid(addr)))",
                addr.0
            )));
        }
        self.free_pages(self.phys_to_pfn(pa), order)
    }

    /// `free_pages_prepare` + `__free_frozen_pages`: clear page state, then
    /// the per-CPU lists for pcp-sized orders, or the buddy allocator.
    fn free_block(&self, pfn: Pfn, order: u32) {
        self.kasan_poison_pages(pfn, order); // free_pages_prepare
        self.page_init_on_free(pfn, order);
        let head = self.mem_map.get(pfn.0);
        if head.has(PG_HEAD) {
            for t in 1..(1u64 << order) {
                self.mem_map.get(pfn.0 + t).clear();
            }
        }
        head.clear();
        let z = self.pfn_zone(pfn).expect("allocated page has a zone");
        if crate::pcp_allowed_order(order, self.pageblock_order) && self.free_to_pcp(z, pfn.0, order) {
            return;
        }
        self.free_one_page(z, pfn.0, order);
    }

    /// `free_one_page`: straight to the buddy lists under the zone lock.
    fn free_one_page(&self, z: &Zone, pfn: u64, order: u32) {
        {
            let mut a = z.area.lock();
            let mt = a.pageblock_migratetype(pfn);
            a.free_one_page(&self.mem_map, pfn, order, mt, false);
            z.sync_counters(&a);
        }
        z.counters.pgfree.fetch_add(1 << order, Relaxed);
        self.clear_below_high(z, order);
    }

    /// ZONE_BELOW_HIGH is cleared once a free brings the zone back above
    /// its high watermark (free_frozen_page_commit).
    fn clear_below_high(&self, z: &Zone, order: u32) {
        if crate::pcp_allowed_order(order, self.pageblock_order) && z.below_high.load(Relaxed) {
            let high = z.wmark(crate::zone::WMARK_HIGH);
            let hz = self.zone_index(ZoneKind::Movable).unwrap_or(self.zones.len() - 1);
            if self.zone_watermark_ok(z, 0, high, hz, 0, z.nr_free_pages.load(Relaxed)) {
                z.below_high.store(false, Relaxed);
            }
        }
    }

    /// `free_frozen_page_commit`: onto this CPU's list; drain a batch back
    /// to the buddy allocator when the lists pass `high`. False when the
    /// page must go to the buddy allocator instead (isolated pageblock, or
    /// the pcp lock is busy).
    fn free_to_pcp(&self, z: &Zone, pfn: u64, order: u32) -> bool {
        let mut mt = z.pageblocks.get(pfn);
        if mt >= crate::buddy::MIGRATE_PCPTYPES {
            if mt == crate::buddy::MIGRATE_ISOLATE {
                return false;
            }
            mt = crate::buddy::MIGRATE_MOVABLE; // HIGHATOMIC pages use the movable list
        }
        let cpu = self.run_cpu();
        let slot = &z.pcp[cpu as usize];
        let Some(mut pcp) = slot.lists.try_lock() else {
            slot.contended.fetch_add(1, Relaxed);
            return false;
        };
        let free_high = pcp.note_free(order);
        let pindex = crate::pcp::order_to_pindex(mt, order, self.pageblock_order);
        self.mem_map.get(pfn).set(PG_PCP, order);
        pcp.lists[pindex].push_front(pfn as u32);
        pcp.count += 1 << order;
        // PGFREE (`__count_vm_events`): a plain load and store under the
        // pcp lock, see `rmqueue_pcplist`.
        slot.pgfree.store(slot.pgfree.load(Relaxed) + (1 << order), Relaxed);
        let below_high = z.below_high.load(Relaxed);
        let high = pcp.nr_pcp_high(free_high, below_high);
        if pcp.count >= high {
            let n = pcp.nr_pcp_free(high, free_high);
            let drained = self.free_pcppages_bulk(z, &mut pcp, n, pindex);
            drop(pcp);
            self.emit_drain(&drained, cpu);
            self.clear_below_high(z, order);
        }
        true
    }

    /// `free_pcppages_bulk`: give `count` pages back, round-robin over the
    /// lists starting with `pindex`, each list from its tail. Returns the
    /// (pfn, order, migratetype) of each page for `mm_page_pcpu_drain`.
    fn free_pcppages_bulk(
        &self,
        z: &Zone,
        pcp: &mut crate::pcp::PerCpuPages,
        count: u64,
        pindex: usize,
    ) -> Vec<(u64, u32, u8)> {
        let mut count = count.min(pcp.count) as i64;
        let tracing = self.trace.on(EventId::MmPagePcpuDrain);
        let mut out = Vec::new();
        let nlists = pcp.lists.len();
        let mut p = (pindex + nlists - 1) % nlists;
        let mut a = z.area.lock();
        while count > 0 {
            loop {
                p = (p + 1) % nlists;
                if !pcp.lists[p].is_empty() {
                    break;
                }
            }
            let order = crate::pcp::pindex_to_order(p, self.pageblock_order);
            let nr = 1i64 << order;
            while count > 0 {
                let Some(pfn) = pcp.lists[p].pop_back() else { break };
                let pfn = pfn as u64;
                let mt = a.pageblock_migratetype(pfn);
                count -= nr;
                pcp.count -= nr as u64;
                self.mem_map.get(pfn).set(0, 0);
                a.free_one_page(&self.mem_map, pfn, order, mt, false);
                if tracing {
                    out.push((pfn, order, mt));
                }
            }
        }
        z.sync_counters(&a);
        out
    }

    fn emit_drain(&self, drained: &[(u64, u32, u8)], cpu: u32) {
        for &(pfn, order, mt) in drained {
            self.trace.emit(cpu, Payload::MmPagePcpuDrain { pfn, order, migratetype: mt as i32 });
        }
    }

    /// `drain_all_pages(NULL)`: empty every CPU's lists in every zone. As in
    /// 6.2+ `__drain_all_pages`, the caller drains them all itself, so the
    /// `mm_page_pcpu_drain` events carry the calling CPU.
    pub fn drain_all_pages(&self) {
        let me = self.cpus.this_cpu();
        for z in &self.zones {
            for slot in z.pcp.iter() {
                let mut pcp = slot.lists.lock();
                let n = pcp.count;
                let drained = if n > 0 { self.free_pcppages_bulk(z, &mut pcp, n, 0) } else { Vec::new() };
                drop(pcp);
                self.emit_drain(&drained, me);
            }
        }
    }

    /// `drain_local_pages`: this CPU's lists only.
    pub fn drain_local_pages(&self) {
        let cpu = self.run_cpu();
        for z in &self.zones {
            let mut pcp = z.pcp[cpu as usize].lists.lock();
            let n = pcp.count;
            let drained = if n > 0 { self.free_pcppages_bulk(z, &mut pcp, n, 0) } else { Vec::new() };
            drop(pcp);
            self.emit_drain(&drained, cpu);
        }
    }

    /// `decay_pcp_high` for one CPU's lists of a zone: lower `high` by an
    /// eighth (but not below `count - (batch << PCP_BATCH_SCALE_MAX)` nor
    /// `high_min`) and drain what the lists hold above it. Returns the
    /// kernel's `todo`: non-zero while high is above high_min or pages
    /// were drained.
    pub fn decay_pcp_high(&self, z: &Zone, cpu: u32) -> u32 {
        let Some(slot) = z.pcp.get(cpu as usize) else { return 0 };
        let mut pcp = slot.lists.lock();
        let (high_min, batch) = (pcp.high_min as i64, pcp.batch as i64);
        let mut todo = 0;
        let high = pcp.high as i64;
        if high > high_min {
            let count = pcp.count as i64;
            let h = (count - (batch << crate::pcp::PCP_BATCH_SCALE_MAX)).max(high - (high >> 3)).max(high_min);
            pcp.high = h as u64;
            if h > high_min {
                todo += 1;
            }
        }
        // 6.18.y: drain in chunks of `batch`, each from pindex 0.
        let mut to_drain = pcp.count as i64 - pcp.high as i64;
        let mut drained = Vec::new();
        if to_drain > 0 {
            todo += 1;
        }
        while to_drain > 0 {
            let n = to_drain.min(batch.max(1));
            drained.extend(self.free_pcppages_bulk(z, &mut pcp, n as u64, 0));
            to_drain -= n;
        }
        drop(pcp);
        self.emit_drain(&drained, cpu);
        todo
    }

    /// `vmstat_update` on `cpu` (the pageset part of
    /// `refresh_cpu_vm_stats(true)`): decay every zone's lists. Returns
    /// `changes`: counters folded (1 if the CPU allocated or freed since its
    /// last run) plus the decays that left work.
    fn vmstat_update(&self, cpu: u32, w: &mut crate::clock::VmstatWork) -> u32 {
        let events = self.cpu_page_events(cpu);
        let mut changes = u32::from(events != w.seen_events);
        w.seen_events = events;
        for z in self.zones.iter().filter(|z| z.is_populated()) {
            if self.decay_pcp_high(z, cpu) > 0 {
                changes += 1;
            }
        }
        w.runs += 1;
        w.pending = changes > 0;
        changes
    }

    /// Page allocations and frees through `cpu`'s pcp lists so far.
    fn cpu_page_events(&self, cpu: u32) -> u64 {
        self.zones
            .iter()
            .filter_map(|z| z.pcp.get(cpu as usize))
            .map(|s| s.pgalloc.load(Relaxed) + s.pgfree.load(Relaxed))
            .sum()
    }

    /// Set the simulated clock (never backwards); trace events then carry it.
    #[inline]
    pub fn clock_set(&self, t: u64) {
        self.clock.set(t);
        self.trace.sim_ns.store(self.clock.now(), Relaxed);
    }

    /// When the clock next has work due (ns): `u64::MAX` when nothing is
    /// armed, 0 before the clock starts.
    pub fn clock_next_due(&self) -> u64 {
        let shepherd = self.clock.shepherd_ns.load(Relaxed);
        if shepherd == 0 {
            return 0;
        }
        let w = self.clock.work.lock();
        w.iter().filter(|w| w.next_ns != 0).map(|w| w.next_ns).min().unwrap_or(u64::MAX).min(shepherd)
    }

    /// Move the simulated clock to `t` ns, running the timer work that falls
    /// due on the way, in time order (see `clock.rs`). The first call starts
    /// the clock at `t` and arms every CPU's vmstat worker. Returns how many
    /// times timer work ran. A `t` in the past changes nothing.
    pub fn advance_time(&self, t: u64) -> u64 {
        self.advance_time_when(t, &|_, due| due)
    }

    /// `advance_time` with the kernel's deferrable timers: `when(cpu, due)`
    /// says when a worker due at `due` can run (`due` for a CPU that is
    /// running; the time it next wakes for an idle one; beyond `t`: not in
    /// this advance). A replay answers from the trace (`replay.rs`).
    pub fn advance_time_when(&self, t: u64, when: &dyn Fn(u32, u64) -> u64) -> u64 {
        use crate::clock::{Clock, STAT_INTERVAL_NS};
        // Far enough from the end of time that due times cannot wrap.
        let t = t.min(crate::clock::MAX_TIME_NS);
        // Events of timer work reach sinks after `work` is released.
        let _d = self.trace.defer_always();
        let mut work = self.clock.work.lock();
        let now = self.clock.now();
        let phase = self.clock.phase_ns.load(Relaxed);
        if t <= now && self.clock.shepherd_ns.load(Relaxed) != 0 {
            return 0;
        }
        if self.clock.shepherd_ns.load(Relaxed) == 0 {
            // Start: the workers of a running system are armed on their
            // grid, each to fire at its next point after `t`.
            self.clock_set(t);
            self.clock.shepherd_ns.store(Clock::next_on_grid(t, 0, phase), Relaxed);
            for (cpu, w) in work.iter_mut().enumerate() {
                w.next_ns = Clock::next_on_grid(t, cpu as u32, phase);
                w.seen_events = self.cpu_page_events(cpu as u32);
            }
            return 0;
        }
        let mut runs = 0;
        loop {
            // The earliest work that can run: a worker (when its CPU runs),
            // or the shepherd (ties: the worker first).
            let shepherd = self.clock.shepherd_ns.load(Relaxed);
            let next_cpu = work
                .iter()
                .enumerate()
                .filter(|(_, w)| w.next_ns != 0)
                .map(|(c, w)| (c, when(c as u32, w.next_ns).max(w.next_ns).max(now)))
                .min_by_key(|&(_, at)| at);
            let (due, cpu) = match next_cpu {
                Some((c, at)) if at <= shepherd => (at, Some(c as u32)),
                _ => (shepherd, None),
            };
            if due > t {
                break;
            }
            self.clock_set(due);
            match cpu {
                Some(c) => {
                    let w = &mut work[c as usize];
                    let changes = self.vmstat_update(c, w);
                    w.next_ns = if changes > 0 { Clock::round_next(due, c, phase) } else { 0 };
                    runs += 1;
                }
                None => {
                    // vmstat_shepherd: queue (delay 0) the work of CPUs whose counters moved.
                    for (c, w) in work.iter_mut().enumerate() {
                        if w.next_ns == 0 && self.cpu_page_events(c as u32) != w.seen_events {
                            w.next_ns = due;
                        }
                    }
                    // No counter moves during an advance (timer work drains,
                    // it neither allocates nor frees through the lists), so
                    // the shepherd's later ticks up to `t` would arm nothing:
                    // its next tick is the first after `t`, on its grid.
                    let next = Clock::round_next(due, 0, phase)
                        .max(due + STAT_INTERVAL_NS / 2)
                        .max(Clock::next_on_grid(t, 0, phase));
                    self.clock.shepherd_ns.store(next, Relaxed);
                }
            }
        }
        self.clock_set(t);
        runs
    }

    /// Pages sitting on per-CPU lists, all zones and CPUs.
    pub fn nr_pcp_pages(&self) -> u64 {
        self.zones.iter().flat_map(|z| z.pcp.iter()).map(|s| s.lists.lock().count).sum()
    }

    /// Check pcp-1/pcp-2.
    pub fn check_pcp(&self) -> Vec<String> {
        let mut errs = Vec::new();
        for z in &self.zones {
            for (cpu, slot) in z.pcp.iter().enumerate() {
                let pcp = slot.lists.lock();
                let mut pages = 0u64;
                for (i, l) in pcp.lists.iter().enumerate() {
                    let order = crate::pcp::pindex_to_order(i, self.pageblock_order);
                    for &pfn in l {
                        let m = self.mem_map.get(pfn as u64);
                        if !m.has(PG_PCP) || m.has(PG_BUDDY) || m.order() != order {
                            errs.push(format!(
                                "pcp-2: {} cpu {cpu}: pfn {pfn:#x} on the order-{order} list has flags {:#x} order {}",
                                z.kind.name(),
                                m.flags(),
                                m.order()
                            ));
                        }
                        if !z.spans(pfn as u64) {
                            errs.push(format!("pcp-2: {} cpu {cpu}: pfn {pfn:#x} is not in the zone", z.kind.name()));
                        }
                        pages += 1 << order;
                    }
                }
                if pages != pcp.count {
                    errs.push(format!(
                        "pcp-1: {} cpu {cpu}: count {} but the lists hold {pages} pages",
                        z.kind.name(),
                        pcp.count
                    ));
                }
            }
        }
        errs
    }

    /// Turn freshly allocated (compound) pages into a slab of cache `cache_id`:
    /// the head gets PG_slab and the cache id (`slab->slab_cache`).
    pub(crate) fn make_slab_pages(&self, pfn: Pfn, order: u32, cache_id: u32) {
        let head = self.mem_map.get(pfn.0);
        let flags = head.flags() & PG_HEAD;
        // page_owner's record survives the page becoming a slab.
        let owner = head.owner_mt();
        head.set(flags | PG_SLAB, order);
        if let Some(mt) = owner {
            head.set_owner_mt(mt);
        }
        head.set_refcount(cache_id as i32);
        self.kasan_poison_slab(pfn, order); // allocate_slab: kasan_poison_slab
    }

    /// Give a discarded slab's pages back (`__free_slab`): the slab page
    /// becomes an ordinary allocated block again, then is freed.
    pub(crate) fn free_slab_pages(&self, pfn: Pfn, order: u32) {
        let head = self.mem_map.get(pfn.0);
        head.clear_flag(PG_SLAB);
        head.set_refcount(1);
        self.free_pages(pfn, order).expect("a discarded slab frees cleanly");
    }

    /// Pages allocated (managed - free) in a zone.
    pub fn zone_allocated(&self, z: &Zone) -> u64 {
        z.managed - z.free_pages()
    }
}

/// ALLOC_KSWAPD == __GFP_KSWAPD_RECLAIM numerically; the fast path copies it.
const __GFP_KSWAPD_RECLAIM_ALLOC: u32 = gfp::__GFP_KSWAPD_RECLAIM;

