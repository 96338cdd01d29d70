//! The buddy allocator of one zone: free areas per order and migratetype,
//! O(1) split (`expand`) and merge (`__free_one_page`) from page metadata, and
//! the migratetype fallback that claims or steals from other pageblocks.
//!
//! # Kernel
//! `mm/page_alloc.c` (6.15+): `__rmqueue_smallest`, `expand`,
//! `page_del_and_expand`, `__rmqueue`, `__rmqueue_claim`, `__rmqueue_steal`,
//! `try_to_claim_block`, `should_try_claim_block`, `find_suitable_fallback`,
//! `fallbacks[]`, `prep_move_freepages_block`, `__move_freepages_block`,
//! `boost_watermark`, `__free_one_page`, `buddy_merge_likely`,
//! `account_freepages`; `mm/internal.h` (`__find_buddy_pfn`, `page_is_buddy`).
//!
//! # Lazily-initialised max-order blocks
//! A zone keeps the run of max-order blocks that boot freed and nothing has
//! touched since as one range, `lazy` (the kernel's deferred struct page
//! init and sparse vmemmap ideas: pay for `struct page`s only where pages are
//! used). Those blocks are free blocks like any other: counted in
//! `nr_free[MAX_PAGE_ORDER]`, `nr_free_mt[MAX_PAGE_ORDER][lazy_mt]`,
//! `free_pages` and `free_pages_blocks`, and they are the *tail* of the
//! (MAX_PAGE_ORDER, lazy_mt) free list, in ascending pfn order -- exactly
//! where boot's ascending FPI_TO_TAIL frees put them. Only their head pages
//! lack PG_buddy: their metadata stays all-zero, so the host never backs it.
//! - Taking the list's first block when the real part is empty carves the
//!   range's lowest block (`del`), as the kernel takes the list head.
//! - Any other use that would see them as list entries (a block added to
//!   that list's tail, a pageblock inside the range rescanned or retyped)
//!   first turns the whole range into real list entries (`materialize`),
//!   in the same order, so every answer stays the kernel's.
//! - `find_free_block`, `is_free_buddy`, `list_pfns`/`free_blocks` and
//!   `check` answer for the range as for real blocks.
//!
//! SIMPLIFICATION: no CMA and no page shuffling; no guard pages
//! (debug_pagealloc). "Movable pages" in a pageblock (for the claim decision)
//! are allocated pages that were asked for with `__GFP_MOVABLE` (the kernel
//! counts LRU and movable_ops pages).
//!
//! # Invariants (checked by `FreeArea::check`)
//! - buddy-1: every free block is aligned to its order, lies inside the zone,
//!   its head has PG_buddy with that order, and it is on exactly one list.
//! - buddy-2: a free block sits on the list of its pageblock's migratetype.
//! - buddy-3: `nr_free[o]` and `nr_free_mt[o][mt]` equal the list lengths.
//! - buddy-4: `free_pages` equals the sum over lists of `1 << order`.
//! - buddy-5: no two free buddies of the same order below pageblock order
//!   are left unmerged. At pageblock order and above the kernel leaves
//!   some apart too: `migratetype_is_mergeable` keeps a normal type from
//!   HIGHATOMIC/ISOLATE at free time, and a later type change
//!   (`unreserve_highatomic_pageblock`, `move_freepages_block`) moves a
//!   block between lists without merging it.
//! - buddy-6: free blocks do not overlap.
//! - buddy-7: the lazy range is max-order aligned, inside the zone, every
//!   pageblock in it has type `lazy_mt`, and every page in it has all-zero
//!   metadata (so no PG_buddy head: it is on no real list).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;

use crate::arch::{MAX_PAGE_ORDER, NR_PAGE_ORDERS};
use crate::page::{MemMap, PG_BUDDY, PG_LRU, NIL};

pub const MIGRATE_UNMOVABLE: u8 = 0;
pub const MIGRATE_MOVABLE: u8 = 1;
pub const MIGRATE_RECLAIMABLE: u8 = 2;
/// Number of types kept on per-CPU lists.
pub const MIGRATE_PCPTYPES: u8 = 3;
pub const MIGRATE_HIGHATOMIC: u8 = MIGRATE_PCPTYPES;
/// CONFIG_CMA is off (as on the reference machine); ISOLATE follows HIGHATOMIC.
pub const MIGRATE_ISOLATE: u8 = 4;
pub const MIGRATE_TYPES: usize = 5;

/// `migratetype_names[]` (mm/vmstat.c), as /proc/pagetypeinfo prints them.
pub const MIGRATETYPE_NAMES: [&str; MIGRATE_TYPES] =
    ["Unmovable", "Movable", "Reclaimable", "HighAtomic", "Isolate"];

/// `fallbacks[]`: where each type may take pages from, in order.
const FALLBACKS: [[u8; 2]; 3] = [
    [MIGRATE_RECLAIMABLE, MIGRATE_MOVABLE],   // UNMOVABLE
    [MIGRATE_RECLAIMABLE, MIGRATE_UNMOVABLE], // MOVABLE
    [MIGRATE_UNMOVABLE, MIGRATE_MOVABLE],     // RECLAIMABLE
];

/// `ALLOC_*` flags (mm/internal.h) that the buddy layer looks at.
pub mod alloc_flags {
    pub const ALLOC_WMARK_MIN: u32 = 0;
    pub const ALLOC_WMARK_LOW: u32 = 1;
    pub const ALLOC_WMARK_HIGH: u32 = 2;
    pub const ALLOC_NO_WATERMARKS: u32 = 0x04;
    pub const ALLOC_WMARK_MASK: u32 = ALLOC_NO_WATERMARKS - 1;
    pub const ALLOC_OOM: u32 = 0x08;
    pub const ALLOC_NON_BLOCK: u32 = 0x10;
    pub const ALLOC_MIN_RESERVE: u32 = 0x20;
    pub const ALLOC_CPUSET: u32 = 0x40;
    pub const ALLOC_CMA: u32 = 0x80;
    pub const ALLOC_NOFRAGMENT: u32 = 0x100;
    pub const ALLOC_HIGHATOMIC: u32 = 0x200;
    pub const ALLOC_KSWAPD: u32 = 0x800;
    pub const ALLOC_RESERVES: u32 = ALLOC_NON_BLOCK | ALLOC_MIN_RESERVE | ALLOC_HIGHATOMIC | ALLOC_OOM;
}
use alloc_flags::*;

/// Something the buddy layer reports for tracepoints (emitted by the caller
/// after the zone lock is dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuddyEvent {
    /// `mm_page_alloc_zone_locked`
    ZoneLocked { pfn: u64, order: u32, migratetype: u8, percpu_refill: bool },
    /// `mm_page_alloc_extfrag`
    ExtFrag {
        pfn: u64,
        alloc_order: u32,
        fallback_order: u32,
        alloc_migratetype: u8,
        fallback_migratetype: u8,
        change_ownership: bool,
    },
}

/// A lock-free view of a zone's pageblock migratetypes.
#[derive(Clone)]
pub struct PageblockFlags {
    base: u64,
    order: u32,
    mt: Arc<[AtomicU8]>,
}

impl PageblockFlags {
    /// `get_pfnblock_migratetype`.
    #[inline]
    pub fn get(&self, pfn: u64) -> u8 {
        self.mt[((pfn - self.base) >> self.order) as usize].load(Relaxed)
    }
}

/// Where `__rmqueue` found pages last time (`enum rmqueue_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RmqueueMode {
    Normal,
    Claim,
    Steal,
}

#[derive(Clone, Copy, Debug, Default)]
struct ListHead {
    head: u32,
    tail: u32,
}

/// Free areas and pageblock types of one zone: what `zone->lock` protects.
pub struct FreeArea {
    zone_start: u64,
    zone_end: u64,
    pageblock_order: u32,
    /// First pfn of the first pageblock the zone touches.
    pb_base: u64,
    lists: [[ListHead; MIGRATE_TYPES]; NR_PAGE_ORDERS],
    pub nr_free: [u64; NR_PAGE_ORDERS],
    pub nr_free_mt: [[u64; MIGRATE_TYPES]; NR_PAGE_ORDERS],
    /// Migratetype of each pageblock (`pageblock_flags`): written under the
    /// zone lock, read without it (the per-CPU free path), as in the kernel.
    pageblock_mt: Arc<[AtomicU8]>,
    /// Pages on the free lists (NR_FREE_PAGES).
    pub free_pages: u64,
    /// Free pages in blocks of order >= pageblock_order (NR_FREE_PAGES_BLOCKS).
    pub free_pages_blocks: u64,
    /// Free pages on HIGHATOMIC lists (`zone->nr_free_highatomic`).
    pub free_highatomic: u64,
    /// `page_group_by_mobility_disabled`.
    pub mobility_disabled: bool,
    /// Pending watermark boost requests (`boost_watermark`), applied by the zone.
    pub boost_requests: u64,
    /// Lazily-initialised free max-order blocks `[lo, hi)` (buddy-7): the
    /// tail of the (MAX_PAGE_ORDER, `lazy_mt`) list.
    lazy: (u64, u64),
    lazy_mt: u8,
}

/// What the caller must apply to zone counters after a buddy operation.
impl FreeArea {
    pub fn new(zone_start: u64, zone_end: u64, pageblock_order: u32) -> FreeArea {
        let pb_base = zone_start >> pageblock_order << pageblock_order;
        let nblocks = if zone_end > zone_start {
            ((zone_end - pb_base) + (1 << pageblock_order) - 1) >> pageblock_order
        } else {
            0
        };
        FreeArea {
            zone_start,
            zone_end,
            pageblock_order,
            pb_base,
            lists: [[ListHead { head: NIL, tail: NIL }; MIGRATE_TYPES]; NR_PAGE_ORDERS],
            nr_free: [0; NR_PAGE_ORDERS],
            nr_free_mt: [[0; MIGRATE_TYPES]; NR_PAGE_ORDERS],
            // memmap_init marks every pageblock MIGRATE_MOVABLE at boot.
            pageblock_mt: (0..nblocks).map(|_| AtomicU8::new(MIGRATE_MOVABLE)).collect(),
            free_pages: 0,
            free_pages_blocks: 0,
            free_highatomic: 0,
            mobility_disabled: false,
            boost_requests: 0,
            lazy: (0, 0),
            lazy_mt: MIGRATE_MOVABLE,
        }
    }

    // ---- the lazy range (see the module header) ----------------------------------

    /// The lazily-initialised free max-order blocks: `[lo, hi)` pfns.
    pub fn lazy_range(&self) -> (u64, u64) {
        self.lazy
    }

    #[inline]
    fn in_lazy(&self, pfn: u64) -> bool {
        pfn >= self.lazy.0 && pfn < self.lazy.1
    }

    #[inline]
    fn lazy_blocks(&self) -> u64 {
        (self.lazy.1 - self.lazy.0) >> MAX_PAGE_ORDER
    }

    /// Turn every lazy block into a real list entry, in order, at the tail
    /// of its list (where it already was, logically). Counters unchanged.
    pub fn materialize(&mut self, map: &MemMap) {
        let (lo, hi) = self.lazy;
        let (n, mt) = (self.lazy_blocks(), self.lazy_mt);
        self.lazy = (lo, lo);
        self.nr_free[MAX_PAGE_ORDER as usize] -= n;
        self.nr_free_mt[MAX_PAGE_ORDER as usize][mt as usize] -= n;
        self.account(MAX_PAGE_ORDER, mt, -(n as i64));
        let mut p = lo;
        while p < hi {
            self.add(map, p, MAX_PAGE_ORDER, mt, true);
            p += 1 << MAX_PAGE_ORDER;
        }
    }

    /// Materialize if `[pfn, pfn + nr)` overlaps the lazy range.
    fn materialize_over(&mut self, map: &MemMap, pfn: u64, nr: u64) {
        if pfn < self.lazy.1 && pfn + nr > self.lazy.0 {
            self.materialize(map);
        }
    }

    /// `memblock_free_all` for one zone's managed run `[start, end)`: free
    /// it in maximal aligned chunks to the tail, in ascending order (as
    /// `free_boot_block` one by one would), keeping the max-order blocks of
    /// pageblock type MOVABLE lazy.
    pub fn free_boot_range(&mut self, map: &MemMap, start: u64, end: u64) {
        let max = 1u64 << MAX_PAGE_ORDER;
        let (lo, hi) = (start.next_multiple_of(max), end >> MAX_PAGE_ORDER << MAX_PAGE_ORDER);
        let lazy_ok = lo < hi
            && self.lazy.0 == self.lazy.1
            && self.list_empty(MAX_PAGE_ORDER, MIGRATE_MOVABLE)
            && (lo..hi).step_by(1 << self.pageblock_order).all(|p| self.pageblock_migratetype(p) == MIGRATE_MOVABLE);
        let free_chunks = |a: &mut FreeArea, mut pfn: u64, end: u64| {
            while pfn < end {
                let mut order = pfn.trailing_zeros().min(MAX_PAGE_ORDER);
                while pfn + (1u64 << order) > end {
                    order -= 1;
                }
                a.free_boot_block(map, pfn, order);
                pfn += 1u64 << order;
            }
        };
        if !lazy_ok {
            free_chunks(self, start, end);
            return;
        }
        free_chunks(self, start, lo);
        self.lazy = (lo, hi);
        self.lazy_mt = MIGRATE_MOVABLE;
        let n = (hi - lo) >> MAX_PAGE_ORDER;
        self.nr_free[MAX_PAGE_ORDER as usize] += n;
        self.nr_free_mt[MAX_PAGE_ORDER as usize][MIGRATE_MOVABLE as usize] += n;
        self.account(MAX_PAGE_ORDER, MIGRATE_MOVABLE, n as i64);
        free_chunks(self, hi, end);
    }

    pub fn pageblock_order(&self) -> u32 {
        self.pageblock_order
    }

    // ---- pageblock migratetypes --------------------------------------------

    #[inline]
    pub fn pageblock_migratetype(&self, pfn: u64) -> u8 {
        self.pageblock_mt[((pfn - self.pb_base) >> self.pageblock_order) as usize].load(Relaxed)
    }

    /// Callers retype only pageblocks of blocks they took off the lists or
    /// hold allocated, never lazily free ones (`check` reports buddy-7 if
    /// one is).
    #[inline]
    pub fn set_pageblock_migratetype(&mut self, pfn: u64, mt: u8) {
        let i = ((pfn - self.pb_base) >> self.pageblock_order) as usize;
        self.pageblock_mt[i].store(mt, Relaxed);
    }

    /// The pageblock types, shared for lock-free reads (`get_pfnblock_migratetype`).
    pub fn pageblock_flags(&self) -> PageblockFlags {
        PageblockFlags { base: self.pb_base, order: self.pageblock_order, mt: self.pageblock_mt.clone() }
    }

    /// `change_pageblock_range`: retype every pageblock of a block of `order`.
    fn change_pageblock_range(&mut self, pfn: u64, order: u32, mt: u8) {
        let nr = 1u64 << order.saturating_sub(self.pageblock_order);
        for k in 0..nr {
            self.set_pageblock_migratetype(pfn + (k << self.pageblock_order), mt);
        }
    }

    /// Number of pageblocks of each type (pagetypeinfo's second table).
    pub fn pageblock_counts(&self) -> [u64; MIGRATE_TYPES] {
        let mut c = [0u64; MIGRATE_TYPES];
        for mt in self.pageblock_mt.iter() {
            c[mt.load(Relaxed) as usize] += 1;
        }
        c
    }

    // ---- free lists -----------------------------------------------------------

    #[inline]
    fn account(&mut self, order: u32, mt: u8, delta: i64) {
        let nr = (1i64 << order) * delta;
        if mt == MIGRATE_HIGHATOMIC {
            self.free_highatomic = (self.free_highatomic as i64 + nr) as u64;
        }
        self.free_pages = (self.free_pages as i64 + nr) as u64;
        if order >= self.pageblock_order {
            self.free_pages_blocks = (self.free_pages_blocks as i64 + nr) as u64;
        }
    }

    /// `__add_to_free_list` + `set_buddy_order` + `account_freepages`.
    fn add(&mut self, map: &MemMap, pfn: u64, order: u32, mt: u8, tail: bool) {
        if tail && order == MAX_PAGE_ORDER && mt == self.lazy_mt && self.lazy.0 < self.lazy.1 {
            // The lazy blocks are this list's tail: keep the order exact.
            self.materialize(map);
        }
        let page = map.get(pfn);
        page.set(PG_BUDDY, order);
        page.set_refcount(0);
        let l = &mut self.lists[order as usize][mt as usize];
        let p = pfn as u32;
        if l.head == NIL {
            page.set_next(NIL);
            page.set_prev(NIL);
            l.head = p;
            l.tail = p;
        } else if tail {
            map.get(l.tail as u64).set_next(p);
            page.set_prev(l.tail);
            page.set_next(NIL);
            l.tail = p;
        } else {
            map.get(l.head as u64).set_prev(p);
            page.set_next(l.head);
            page.set_prev(NIL);
            l.head = p;
        }
        self.nr_free[order as usize] += 1;
        self.nr_free_mt[order as usize][mt as usize] += 1;
        self.account(order, mt, 1);
    }

    /// `__del_page_from_free_list` + `account_freepages`: O(1) unlink.
    fn del(&mut self, map: &MemMap, pfn: u64, order: u32, mt: u8) {
        if self.in_lazy(pfn) {
            if pfn != self.lazy.0 || order != MAX_PAGE_ORDER || mt != self.lazy_mt {
                self.materialize(map);
                return self.del(map, pfn, order, mt);
            }
            // Carve the lowest lazy block: its metadata is already all-zero.
            self.lazy.0 += 1 << MAX_PAGE_ORDER;
            self.nr_free[order as usize] -= 1;
            self.nr_free_mt[order as usize][mt as usize] -= 1;
            self.account(order, mt, -1);
            return;
        }
        let page = map.get(pfn);
        debug_assert!(page.has(PG_BUDDY) && page.order() == order, "del of non-buddy {pfn:#x}");
        let (next, prev) = (page.next(), page.prev());
        let l = &mut self.lists[order as usize][mt as usize];
        if prev == NIL {
            l.head = next;
        } else {
            map.get(prev as u64).set_next(next);
        }
        if next == NIL {
            l.tail = prev;
        } else {
            map.get(next as u64).set_prev(prev);
        }
        page.set(0, 0);
        page.set_next(NIL);
        page.set_prev(NIL);
        self.nr_free[order as usize] -= 1;
        self.nr_free_mt[order as usize][mt as usize] -= 1;
        self.account(order, mt, -1);
    }

    /// `move_to_free_list`: same block, another migratetype's list (tail).
    fn move_to(&mut self, map: &MemMap, pfn: u64, order: u32, old: u8, new: u8) {
        self.del(map, pfn, order, old);
        self.add(map, pfn, order, new, true);
    }

    #[inline]
    fn lazy_list(&self, order: u32, mt: u8) -> bool {
        order == MAX_PAGE_ORDER && mt == self.lazy_mt && self.lazy.0 < self.lazy.1
    }

    #[inline]
    pub fn list_empty(&self, order: u32, mt: u8) -> bool {
        self.lists[order as usize][mt as usize].head == NIL && !self.lazy_list(order, mt)
    }

    #[inline]
    fn first(&self, order: u32, mt: u8) -> Option<u64> {
        let h = self.lists[order as usize][mt as usize].head;
        if h != NIL {
            Some(h as u64)
        } else if self.lazy_list(order, mt) {
            Some(self.lazy.0)
        } else {
            None
        }
    }

    /// The pfns on one free list, head first (for views and tests).
    pub fn list_pfns(&self, map: &MemMap, order: u32, mt: u8) -> Vec<u64> {
        let mut v = Vec::new();
        let mut p = self.lists[order as usize][mt as usize].head;
        while p != NIL {
            v.push(p as u64);
            p = map.get(p as u64).next();
        }
        if self.lazy_list(order, mt) {
            v.extend((self.lazy.0..self.lazy.1).step_by(1 << MAX_PAGE_ORDER));
        }
        v
    }

    // ---- allocation -------------------------------------------------------------

    /// `expand`: split a block of order `high` down to `low`, putting the
    /// upper halves on the free lists (at the head). Returns pages added.
    fn expand(&mut self, map: &MemMap, pfn: u64, low: u32, mut high: u32, mt: u8) -> u64 {
        let mut nr_added = 0;
        while high > low {
            high -= 1;
            let buddy = pfn + (1u64 << high);
            self.add(map, buddy, high, mt, false);
            nr_added += 1 << high;
        }
        nr_added
    }

    /// `page_del_and_expand`.
    fn del_and_expand(&mut self, map: &MemMap, pfn: u64, low: u32, high: u32, mt: u8) {
        self.del(map, pfn, high, mt);
        self.expand(map, pfn, low, high, mt);
    }

    /// `__rmqueue_smallest`: the first block on the smallest order list of
    /// `mt` that can satisfy `order`, split down. O(orders).
    pub fn rmqueue_smallest(
        &mut self,
        map: &MemMap,
        order: u32,
        mt: u8,
        ev: &mut Option<&mut Vec<BuddyEvent>>,
    ) -> Option<u64> {
        for cur in order..=MAX_PAGE_ORDER {
            if let Some(pfn) = self.first(cur, mt) {
                self.del_and_expand(map, pfn, order, cur, mt);
                if let Some(ev) = ev {
                    ev.push(BuddyEvent::ZoneLocked {
                        pfn,
                        order,
                        migratetype: mt,
                        percpu_refill: crate::pcp_allowed_order(order, self.pageblock_order)
                            && mt < MIGRATE_PCPTYPES,
                    });
                }
                return Some(pfn);
            }
        }
        None
    }

    /// `find_suitable_fallback`: the first fallback type with a free block of
    /// `order`. `Err(())` is the kernel's -2: too low an order to claim.
    fn find_suitable_fallback(&self, order: u32, mt: u8, claimable: bool) -> Result<Option<u8>, ()> {
        if claimable && !self.should_try_claim_block(order, mt) {
            return Err(());
        }
        if self.nr_free[order as usize] == 0 || mt >= MIGRATE_PCPTYPES {
            return Ok(None);
        }
        Ok(FALLBACKS[mt as usize].iter().copied().find(|&f| !self.list_empty(order, f)))
    }

    /// `should_try_claim_block`.
    fn should_try_claim_block(&self, order: u32, start_mt: u8) -> bool {
        order >= self.pageblock_order
            || order >= self.pageblock_order / 2
            || start_mt == MIGRATE_RECLAIMABLE
            || start_mt == MIGRATE_UNMOVABLE
            || self.mobility_disabled
    }

    /// `prep_move_freepages_block`: the pageblock around `pfn`, with counts of
    /// free and movable pages in it; None if the zone does not span it whole.
    fn prep_move_freepages_block(&self, map: &MemMap, pfn: u64) -> Option<(u64, u64, u64)> {
        let start = pfn >> self.pageblock_order << self.pageblock_order;
        let end = start + (1 << self.pageblock_order);
        if start < self.zone_start || end > self.zone_end {
            return None;
        }
        if self.in_lazy(start) {
            // Inside a lazily free max-order block: every page is free.
            return Some((start, 1 << self.pageblock_order, 0));
        }
        let (mut free, mut movable) = (0u64, 0u64);
        let mut p = start;
        while p < end {
            let page = map.get(p);
            if page.has(PG_BUDDY) {
                let nr = 1u64 << page.order();
                free += nr;
                p += nr;
                continue;
            }
            if page.has(PG_LRU) {
                movable += 1;
            }
            p += 1;
        }
        Some((start, free, movable))
    }

    /// `__move_freepages_block`: move every free block of the pageblock at
    /// `start` from `old` to `new` lists. Returns pages moved.
    fn move_freepages_block(&mut self, map: &MemMap, start: u64, old: u8, new: u8) -> u64 {
        self.materialize_over(map, start, 1 << self.pageblock_order);
        let end = start + (1 << self.pageblock_order);
        let mut p = start;
        let mut moved = 0;
        while p < end {
            let page = map.get(p);
            if !page.has(PG_BUDDY) {
                p += 1;
                continue;
            }
            let order = page.order();
            self.move_to(map, p, order, old, new);
            p += 1 << order;
            moved += 1 << order;
        }
        moved
    }

    /// `try_to_claim_block`.
    #[allow(clippy::too_many_arguments)]
    fn try_to_claim_block(
        &mut self,
        map: &MemMap,
        pfn: u64,
        current_order: u32,
        order: u32,
        start_type: u8,
        block_type: u8,
        ev: &mut Option<&mut Vec<BuddyEvent>>,
    ) -> Option<u64> {
        // Take ownership for orders >= pageblock_order.
        if current_order >= self.pageblock_order {
            self.del(map, pfn, current_order, block_type);
            self.change_pageblock_range(pfn, current_order, start_type);
            self.expand(map, pfn, order, current_order, start_type);
            return Some(pfn);
        }
        // boost_watermark: the zone applies it (it owns the watermarks).
        self.boost_requests += 1;
        let (start, free, movable) = self.prep_move_freepages_block(map, pfn)?;
        let alike = if start_type == MIGRATE_MOVABLE {
            movable
        } else if block_type == MIGRATE_MOVABLE {
            (1u64 << self.pageblock_order) - (free + movable)
        } else {
            0
        };
        if free + alike >= (1 << (self.pageblock_order - 1)) || self.mobility_disabled {
            self.move_freepages_block(map, start, block_type, start_type);
            self.set_pageblock_migratetype(start, start_type);
            return self.rmqueue_smallest(map, order, start_type, ev);
        }
        None
    }

    /// `__rmqueue_claim`: take the largest block of a fallback type and try
    /// to claim its pageblock for `start_mt`.
    fn rmqueue_claim(
        &mut self,
        map: &MemMap,
        order: u32,
        start_mt: u8,
        alloc_flags: u32,
        ev: &mut Option<&mut Vec<BuddyEvent>>,
    ) -> Option<u64> {
        let min_order = if order < self.pageblock_order && alloc_flags & ALLOC_NOFRAGMENT != 0 {
            self.pageblock_order
        } else {
            order
        };
        let mut cur = MAX_PAGE_ORDER as i64;
        while cur >= min_order as i64 {
            let co = cur as u32;
            cur -= 1;
            let fallback_mt = match self.find_suitable_fallback(co, start_mt, true) {
                Err(()) => break,
                Ok(None) => continue,
                Ok(Some(f)) => f,
            };
            let pfn = self.first(co, fallback_mt).expect("non-empty list");
            if let Some(page) =
                self.try_to_claim_block(map, pfn, co, order, start_mt, fallback_mt, ev)
            {
                if let Some(ev) = ev {
                    ev.push(self.extfrag(page, order, co, start_mt, fallback_mt));
                }
                return Some(page);
            }
        }
        None
    }

    /// `__rmqueue_steal`: take the smallest suitable fallback block without
    /// claiming its pageblock.
    fn rmqueue_steal(
        &mut self,
        map: &MemMap,
        order: u32,
        start_mt: u8,
        ev: &mut Option<&mut Vec<BuddyEvent>>,
    ) -> Option<u64> {
        for co in order..=MAX_PAGE_ORDER {
            let Ok(Some(fallback_mt)) = self.find_suitable_fallback(co, start_mt, false) else {
                continue;
            };
            let pfn = self.first(co, fallback_mt).expect("non-empty list");
            self.del_and_expand(map, pfn, order, co, fallback_mt);
            if let Some(ev) = ev {
                ev.push(self.extfrag(pfn, order, co, start_mt, fallback_mt));
            }
            return Some(pfn);
        }
        None
    }

    fn extfrag(&self, pfn: u64, order: u32, fallback_order: u32, start: u8, fallback: u8) -> BuddyEvent {
        BuddyEvent::ExtFrag {
            pfn,
            alloc_order: order,
            fallback_order,
            alloc_migratetype: start,
            fallback_migratetype: fallback,
            change_ownership: self.pageblock_migratetype(pfn) == start,
        }
    }

    /// `__rmqueue`: the requested type first, then claiming, then stealing.
    pub fn rmqueue(
        &mut self,
        map: &MemMap,
        order: u32,
        mt: u8,
        alloc_flags: u32,
        mode: &mut RmqueueMode,
        ev: &mut Option<&mut Vec<BuddyEvent>>,
    ) -> Option<u64> {
        let mt = if self.mobility_disabled && mt < MIGRATE_PCPTYPES { MIGRATE_UNMOVABLE } else { mt };
        if *mode == RmqueueMode::Normal {
            if let Some(p) = self.rmqueue_smallest(map, order, mt, ev) {
                return Some(p);
            }
        }
        if *mode != RmqueueMode::Steal {
            if let Some(p) = self.rmqueue_claim(map, order, mt, alloc_flags, ev) {
                *mode = RmqueueMode::Normal;
                return Some(p);
            }
        }
        if alloc_flags & ALLOC_NOFRAGMENT == 0 {
            if let Some(p) = self.rmqueue_steal(map, order, mt, ev) {
                *mode = RmqueueMode::Steal;
                return Some(p);
            }
        }
        None
    }

    // ---- freeing ------------------------------------------------------------------

    /// `page_is_buddy`: is `buddy` the free head of an order-`order` block in this zone?
    #[inline]
    fn is_free_buddy(&self, map: &MemMap, buddy: u64, order: u32) -> bool {
        if self.in_lazy(buddy) {
            return order == MAX_PAGE_ORDER && buddy & ((1 << MAX_PAGE_ORDER) - 1) == 0;
        }
        buddy >= self.zone_start
            && buddy < self.zone_end
            && {
                let b = map.get(buddy);
                b.has(PG_BUDDY) && b.order() == order
            }
    }

    /// `__free_one_page`: merge with free buddies while possible (each step
    /// O(1): the buddy's state is read from its metadata), then insert at the
    /// head, or at the tail when the next-higher buddy is free too
    /// (`buddy_merge_likely`) or `to_tail` is asked for (FPI_TO_TAIL).
    /// Returns the (pfn, order) of the final block.
    pub fn free_one_page(
        &mut self,
        map: &MemMap,
        mut pfn: u64,
        mut order: u32,
        mt: u8,
        to_tail: bool,
    ) -> (u64, u32) {
        let mut buddy_pfn = pfn;
        while order < MAX_PAGE_ORDER {
            buddy_pfn = pfn ^ (1u64 << order);
            if !self.is_free_buddy(map, buddy_pfn, order) {
                break;
            }
            let buddy_mt = self.pageblock_migratetype(buddy_pfn);
            // At pageblock order and above, HIGHATOMIC/ISOLATE blocks only
            // merge with their own type (migratetype_is_mergeable).
            if order >= self.pageblock_order
                && mt != buddy_mt
                && (mt >= MIGRATE_PCPTYPES || buddy_mt >= MIGRATE_PCPTYPES)
            {
                break;
            }
            self.del(map, buddy_pfn, order, buddy_mt);
            if buddy_mt != mt {
                // "Match buddy type": keep sub-blocks on the right lists after expand.
                self.set_pageblock_migratetype(buddy_pfn, mt);
            }
            pfn &= buddy_pfn;
            order += 1;
        }
        let tail = to_tail || self.buddy_merge_likely(map, pfn, buddy_pfn, order);
        self.add(map, pfn, order, mt, tail);
        (pfn, order)
    }

    /// `buddy_merge_likely`: is the buddy of the next-higher block free?
    fn buddy_merge_likely(&self, map: &MemMap, pfn: u64, buddy_pfn: u64, order: u32) -> bool {
        if order >= MAX_PAGE_ORDER - 1 {
            return false;
        }
        let higher = buddy_pfn & pfn;
        let higher_buddy = higher ^ (1u64 << (order + 1));
        self.is_free_buddy(map, higher_buddy, order + 1)
    }

    /// Free a block at boot (`__free_pages_core` -> `__free_pages_ok` with
    /// FPI_TO_TAIL), using the pageblock's type.
    pub fn free_boot_block(&mut self, map: &MemMap, pfn: u64, order: u32) {
        let mt = self.pageblock_migratetype(pfn);
        self.free_one_page(map, pfn, order, mt, true);
    }

    /// `reserve_highatomic_pageblock`'s core: retype the pageblock of `pfn`
    /// to HIGHATOMIC and move its free pages.
    pub fn reserve_highatomic(&mut self, map: &MemMap, pfn: u64) -> bool {
        let mt = self.pageblock_migratetype(pfn);
        if mt == MIGRATE_HIGHATOMIC || mt == MIGRATE_ISOLATE {
            return false;
        }
        let start = pfn >> self.pageblock_order << self.pageblock_order;
        if start < self.zone_start || start + (1 << self.pageblock_order) > self.zone_end {
            return false;
        }
        self.move_freepages_block(map, start, mt, MIGRATE_HIGHATOMIC);
        self.set_pageblock_migratetype(start, MIGRATE_HIGHATOMIC);
        true
    }

    /// `unreserve_highatomic_pageblock`'s core: give one HIGHATOMIC pageblock
    /// (one with free pages) back to `to`. Returns true if one was released.
    pub fn unreserve_highatomic(&mut self, map: &MemMap, to: u8) -> bool {
        for order in 0..=MAX_PAGE_ORDER {
            if let Some(pfn) = self.first(order, MIGRATE_HIGHATOMIC) {
                let start = pfn >> self.pageblock_order << self.pageblock_order;
                if order >= self.pageblock_order {
                    self.change_pageblock_range(pfn, order, to);
                    self.move_to(map, pfn, order, MIGRATE_HIGHATOMIC, to);
                } else {
                    self.move_freepages_block(map, start, MIGRATE_HIGHATOMIC, to);
                    self.set_pageblock_migratetype(start, to);
                }
                return true;
            }
        }
        false
    }

    // ---- warm start (see warm.rs) ---------------------------------------------------

    /// Forget every free block: their heads lose PG_buddy and the lists and
    /// counters empty, as if every page of the zone were allocated.
    pub(crate) fn take_all(&mut self, map: &MemMap) {
        for o in 0..NR_PAGE_ORDERS {
            for mt in 0..MIGRATE_TYPES {
                let mut p = self.lists[o][mt].head;
                while p != NIL {
                    let page = map.get(p as u64);
                    let next = page.next();
                    page.set(0, 0);
                    page.set_next(NIL);
                    page.set_prev(NIL);
                    p = next;
                }
                self.lists[o][mt] = ListHead { head: NIL, tail: NIL };
                self.nr_free_mt[o][mt] = 0;
            }
            self.nr_free[o] = 0;
        }
        self.free_pages = 0;
        self.free_pages_blocks = 0;
        self.free_highatomic = 0;
        // The lazy blocks' pages are all-zero already: "allocated" as the rest.
        self.lazy = (self.lazy.0, self.lazy.0);
    }

    /// Would a free block (pfn, order) of type `mt` merge with its buddy?
    pub(crate) fn would_merge(&self, map: &MemMap, pfn: u64, order: u32, mt: u8) -> bool {
        if order >= MAX_PAGE_ORDER {
            return false;
        }
        let b = pfn ^ (1u64 << order);
        if !self.is_free_buddy(map, b, order) {
            return false;
        }
        let bmt = self.pageblock_migratetype(b);
        !(order >= self.pageblock_order && mt != bmt && (mt >= MIGRATE_PCPTYPES || bmt >= MIGRATE_PCPTYPES))
    }

    /// Put a block on the tail of the free list of `mt` without merging
    /// (the caller checked `would_merge`): the warm start lays out free
    /// lists exactly as a recorded /proc/pagetypeinfo counts them.
    pub(crate) fn place_free(&mut self, map: &MemMap, pfn: u64, order: u32, mt: u8) {
        debug_assert!(!self.would_merge(map, pfn, order, mt));
        self.add(map, pfn, order, mt, true);
    }

    /// Every free block: (head pfn, order).
    pub(crate) fn free_blocks(&self, map: &MemMap) -> Vec<(u64, u32)> {
        let mut v = Vec::new();
        for o in 0..NR_PAGE_ORDERS as u32 {
            for mt in 0..MIGRATE_TYPES as u8 {
                v.extend(self.list_pfns(map, o, mt).into_iter().map(|p| (p, o)));
            }
        }
        v
    }

    // ---- queries and checks ------------------------------------------------------------

    /// Is `pfn` inside a free block? Returns that block's (head, order).
    pub fn find_free_block(&self, map: &MemMap, pfn: u64) -> Option<(u64, u32)> {
        if self.in_lazy(pfn) {
            return Some((pfn >> MAX_PAGE_ORDER << MAX_PAGE_ORDER, MAX_PAGE_ORDER));
        }
        for o in 0..=MAX_PAGE_ORDER {
            let head = pfn >> o << o;
            if head < self.zone_start {
                break;
            }
            let p = map.get(head);
            if p.has(PG_BUDDY) && p.order() >= o {
                return (pfn < head + (1u64 << p.order())).then_some((head, p.order()));
            }
        }
        None
    }

    /// `__zone_watermark_ok`'s free-area scan: is there a block of at least
    /// `order` on a list this request may use?
    pub fn has_usable_block(&self, order: u32, alloc_flags: u32) -> bool {
        for o in order..=MAX_PAGE_ORDER {
            if self.nr_free[o as usize] == 0 {
                continue;
            }
            for mt in 0..MIGRATE_PCPTYPES {
                if !self.list_empty(o, mt) {
                    return true;
                }
            }
            if alloc_flags & (ALLOC_HIGHATOMIC | ALLOC_OOM) != 0
                && !self.list_empty(o, MIGRATE_HIGHATOMIC)
            {
                return true;
            }
        }
        false
    }

    /// Check invariants buddy-1..7. Returns the violations found. Costs
    /// O(free blocks log free blocks + touched metadata): pages whose
    /// metadata the host never backed are all-zero (`MemMap::touched`).
    pub fn check(&self, map: &MemMap) -> Vec<String> {
        let mut errs = Vec::new();
        // Every listed block (pfn, order), for buddy-6 and the stray scan.
        let mut blocks: Vec<(u64, u64)> = Vec::new();
        let mut total = 0u64;
        let mut blocks_total = 0u64;
        for o in 0..NR_PAGE_ORDERS {
            let mut n_order = 0;
            #[allow(clippy::needless_range_loop)]
            for mt in 0..MIGRATE_TYPES {
                let mut n = 0u64;
                let mut prev = NIL;
                let mut p = self.lists[o][mt].head;
                while p != NIL {
                    let pfn = p as u64;
                    let page = map.get(pfn);
                    if page.prev() != prev {
                        errs.push(format!("buddy-1: broken prev link at pfn {pfn:#x}"));
                    }
                    if !page.has(PG_BUDDY) || page.order() as usize != o {
                        errs.push(format!(
                            "buddy-1: pfn {pfn:#x} on order-{o} list without PG_buddy/order {o} (flags {:#x}, order {})",
                            page.flags(),
                            page.order()
                        ));
                    }
                    if pfn & ((1 << o) - 1) != 0 {
                        errs.push(format!("buddy-1: pfn {pfn:#x} misaligned for order {o}"));
                    }
                    if pfn < self.zone_start || pfn + (1 << o) > self.zone_end {
                        errs.push(format!("buddy-1: block {pfn:#x}/{o} outside the zone"));
                    } else {
                        blocks.push((pfn, pfn + (1 << o)));
                        if (self.pageblock_migratetype(pfn) as usize) != mt {
                            errs.push(format!(
                                "buddy-2: block {pfn:#x}/{o} on the {} list but its pageblock is {}",
                                MIGRATETYPE_NAMES[mt],
                                MIGRATETYPE_NAMES[self.pageblock_migratetype(pfn) as usize]
                            ));
                        }
                        if (o as u32) < MAX_PAGE_ORDER.min(self.pageblock_order) {
                            let b = pfn ^ (1 << o);
                            // Report each unmerged pair once, from its lower half.
                            if b > pfn && self.is_free_buddy(map, b, o as u32) {
                                errs.push(format!("buddy-5: free buddies {pfn:#x} and {b:#x} of order {o} not merged"));
                            }
                        }
                    }
                    n += 1;
                    total += 1 << o;
                    if o as u32 >= self.pageblock_order {
                        blocks_total += 1 << o;
                    }
                    prev = p;
                    p = page.next();
                    if n > self.zone_end {
                        errs.push("buddy-1: free list cycle".into());
                        break;
                    }
                }
                if self.lists[o][mt].tail != prev {
                    errs.push(format!("buddy-1: order-{o} {} list tail is stale", MIGRATETYPE_NAMES[mt]));
                }
                if self.lazy_list(o as u32, mt as u8) {
                    let k = self.lazy_blocks();
                    n += k;
                    total += k << MAX_PAGE_ORDER;
                    if MAX_PAGE_ORDER >= self.pageblock_order {
                        blocks_total += k << MAX_PAGE_ORDER;
                    }
                }
                if n != self.nr_free_mt[o][mt] {
                    errs.push(format!(
                        "buddy-3: order-{o} {} list holds {n} blocks but nr_free_mt says {}",
                        MIGRATETYPE_NAMES[mt], self.nr_free_mt[o][mt]
                    ));
                }
                n_order += n;
            }
            if n_order != self.nr_free[o] {
                errs.push(format!("buddy-3: order-{o} lists hold {n_order} blocks but nr_free is {}", self.nr_free[o]));
            }
        }
        if total != self.free_pages {
            errs.push(format!("buddy-4: lists hold {total} pages but free_pages is {}", self.free_pages));
        }
        if blocks_total != self.free_pages_blocks {
            errs.push(format!(
                "buddy-4: lists hold {blocks_total} pages in pageblock-sized blocks but free_pages_blocks is {}",
                self.free_pages_blocks
            ));
        }
        // buddy-7: the lazy range.
        let (lo, hi) = self.lazy;
        if lo < hi {
            let max = 1u64 << MAX_PAGE_ORDER;
            if lo % max != 0 || hi % max != 0 || lo < self.zone_start || hi > self.zone_end {
                errs.push(format!("buddy-7: lazy range {lo:#x}..{hi:#x} misaligned or outside the zone"));
            }
            let pb = 1u64 << self.pageblock_order;
            if let Some(p) = (lo..hi).step_by(pb as usize).find(|&p| self.pageblock_migratetype(p) != self.lazy_mt) {
                errs.push(format!(
                    "buddy-7: pageblock {p:#x} in the lazy range is {}, not {}",
                    MIGRATETYPE_NAMES[self.pageblock_migratetype(p) as usize],
                    MIGRATETYPE_NAMES[self.lazy_mt as usize]
                ));
            }
            'scan: for (a, b) in map.touched(lo, hi) {
                for p in a..b {
                    if !map.is_zero(p) {
                        errs.push(format!("buddy-7: pfn {p:#x} in the lazy range has metadata (flags {:#x}, refcount {})",
                            map.get(p).flags(), map.get(p).refcount()));
                        break 'scan;
                    }
                }
            }
            blocks.push((lo, hi));
        }
        // buddy-6: no overlaps.
        blocks.sort_unstable();
        for w in blocks.windows(2) {
            if w[1].0 < w[0].1 {
                errs.push(format!("buddy-6: pfn {:#x} in two free blocks", w[1].0));
            }
        }
        // Stray PG_buddy heads not on any list (only touched metadata can have one).
        for (a, b) in map.touched(self.zone_start, self.zone_end) {
            for pfn in a..b {
                if map.get(pfn).has(PG_BUDDY) && blocks.binary_search_by(|&(s, _)| s.cmp(&pfn)).is_err() {
                    errs.push(format!("buddy-1: pfn {pfn:#x} has PG_buddy but is on no free list"));
                }
            }
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::MemMap;

    /// A 16 MiB zone of pfns [0, 4096) freed at boot: four order-10 blocks.
    fn zone() -> (FreeArea, MemMap) {
        let map = MemMap::new(4096);
        let mut a = FreeArea::new(0, 4096, 9);
        for k in 0..4 {
            a.free_boot_block(&map, k * 1024, 10);
        }
        (a, map)
    }

    #[test]
    fn fresh_zone_is_clean() {
        let (a, map) = zone();
        assert_eq!(a.check(&map), Vec::<String>::new());
        assert_eq!(a.nr_free[10], 4);
        assert_eq!(a.free_pages, 4096);
    }

    #[test]
    fn checker_reports_a_wrong_counter() {
        let (mut a, map) = zone();
        a.nr_free[10] += 1;
        assert_eq!(a.check(&map), vec!["buddy-3: order-10 lists hold 4 blocks but nr_free is 5".to_string()]);
    }

    #[test]
    fn checker_reports_a_missing_buddy_flag() {
        let (a, map) = zone();
        map.get(1024).set(0, 10);
        assert_eq!(
            a.check(&map),
            vec!["buddy-1: pfn 0x400 on order-10 list without PG_buddy/order 10 (flags 0x0, order 10)".to_string()]
        );
    }

    #[test]
    fn checker_reports_unmerged_buddies() {
        let (mut a, map) = zone();
        let mut ev = None;
        let p = a.rmqueue_smallest(&map, 0, MIGRATE_MOVABLE, &mut ev).unwrap();
        assert_eq!(p, 0);
        // Put page 0 back without merging it with its free buddy (page 1).
        a.add(&map, 0, 0, MIGRATE_MOVABLE, false);
        let errs = a.check(&map);
        assert_eq!(errs, vec!["buddy-5: free buddies 0x0 and 0x1 of order 0 not merged".to_string()]);
    }

    #[test]
    fn checker_reports_a_block_on_the_wrong_migratetype_list() {
        let (mut a, map) = zone();
        a.set_pageblock_migratetype(2048, MIGRATE_UNMOVABLE);
        assert_eq!(
            a.check(&map),
            vec!["buddy-2: block 0x800/10 on the Movable list but its pageblock is Unmovable".to_string()]
        );
    }

    #[test]
    fn split_and_merge_are_exact() {
        let (mut a, map) = zone();
        let mut ev = None;
        let p = a.rmqueue_smallest(&map, 3, MIGRATE_MOVABLE, &mut ev).unwrap();
        // expand() left one free block at each order 3..9 inside the first order-10 block.
        assert_eq!(&a.nr_free[3..], &[1, 1, 1, 1, 1, 1, 1, 3]);
        assert_eq!(a.free_pages, 4096 - 8);
        let (pfn, order) = a.free_one_page(&map, p, 3, MIGRATE_MOVABLE, false);
        assert_eq!((pfn, order), (0, 10));
        assert_eq!(a.nr_free[10], 4);
        assert!(a.check(&map).is_empty());
    }

    #[test]
    fn unmovable_claims_whole_pageblocks_and_steals_otherwise() {
        let (mut a, map) = zone();
        let mut evs = Vec::new();
        let mut mode = RmqueueMode::Normal;
        // No unmovable pages: claim the largest movable block (order 10 = 2 pageblocks).
        let p = a.rmqueue(&map, 0, MIGRATE_UNMOVABLE, 0, &mut mode, &mut Some(&mut evs)).unwrap();
        assert_eq!(a.pageblock_counts(), [2, 6, 0, 0, 0]);
        assert_eq!(a.pageblock_migratetype(p), MIGRATE_UNMOVABLE);
        assert!(matches!(
            evs[0],
            BuddyEvent::ExtFrag { alloc_order: 0, fallback_order: 10, change_ownership: true, .. }
        ));
        assert!(a.check(&map).is_empty());
        // With ALLOC_NOFRAGMENT a reclaimable request may only claim >= pageblock blocks.
        let mut mode = RmqueueMode::Normal;
        let q = a.rmqueue(&map, 0, MIGRATE_RECLAIMABLE, ALLOC_NOFRAGMENT, &mut mode, &mut None);
        assert!(q.is_some());
        assert_eq!(a.pageblock_counts()[MIGRATE_RECLAIMABLE as usize], 2);
        assert!(a.check(&map).is_empty());
    }

    // ---- the lazy range (buddy-7) ----------------------------------------------

    /// A zone [1, 1 + 16 max-order blocks + 300) booted twice: lazily
    /// (`free_boot_range`) and eagerly (`free_boot_block` chunk by chunk, as
    /// before the lazy range existed). The eager one is the reference.
    fn lazy_and_eager() -> ((FreeArea, MemMap), (FreeArea, MemMap)) {
        let (start, end) = (1u64, 1 + 16 * 1024 + 300);
        let lm = MemMap::new(end + 1024);
        let mut la = FreeArea::new(start, end, 9);
        la.free_boot_range(&lm, start, end);
        let em = MemMap::new(end + 1024);
        let mut ea = FreeArea::new(start, end, 9);
        let mut pfn = start;
        while pfn < end {
            let mut order = pfn.trailing_zeros().min(MAX_PAGE_ORDER);
            while pfn + (1u64 << order) > end {
                order -= 1;
            }
            ea.free_boot_block(&em, pfn, order);
            pfn += 1 << order;
        }
        ((la, lm), (ea, em))
    }

    fn same_state(l: &FreeArea, lm: &MemMap, e: &FreeArea, em: &MemMap) {
        assert_eq!(l.nr_free, e.nr_free);
        assert_eq!(l.nr_free_mt, e.nr_free_mt);
        assert_eq!((l.free_pages, l.free_pages_blocks, l.free_highatomic), (e.free_pages, e.free_pages_blocks, e.free_highatomic));
        assert_eq!(l.pageblock_counts(), e.pageblock_counts());
        for o in 0..NR_PAGE_ORDERS as u32 {
            for mt in 0..MIGRATE_TYPES as u8 {
                assert_eq!(l.list_pfns(lm, o, mt), e.list_pfns(em, o, mt), "order {o} mt {mt}");
            }
        }
        let (le, ee) = (l.check(lm), e.check(em));
        assert_eq!(le, ee);
        // unreserve_highatomic moves a pageblock-sized block to a normal
        // type without merging it with its (now mergeable) free buddy, as
        // the kernel's move_to_free_list does: allowed by buddy-5.
        assert!(le.is_empty(), "{le:?}");
    }

    #[test]
    fn lazy_boot_equals_eager_boot_and_touches_no_max_order_head() {
        let ((l, lm), (e, em)) = lazy_and_eager();
        assert_eq!(l.lazy_range(), (1024, 16 * 1024));
        assert_eq!(l.nr_free[10], 15);
        same_state(&l, &lm, &e, &em);
        for p in (1024..16 * 1024).step_by(1024) {
            assert!(lm.is_zero(p));
            assert_eq!(l.find_free_block(&lm, p + 5), Some((p, 10)));
        }
    }

    #[test]
    fn checker_reports_metadata_written_in_the_lazy_range() {
        let ((l, lm), _) = lazy_and_eager();
        lm.get(4096 + 7).set_refcount(1);
        assert_eq!(
            l.check(&lm),
            vec!["buddy-7: pfn 0x1007 in the lazy range has metadata (flags 0x0, refcount 1)".to_string()]
        );
    }

    #[test]
    fn checker_reports_a_retyped_lazy_pageblock_and_a_stray_head() {
        let ((mut l, lm), _) = lazy_and_eager();
        l.set_pageblock_migratetype(2048 + 512, MIGRATE_UNMOVABLE);
        assert_eq!(l.check(&lm), vec!["buddy-7: pageblock 0xa00 in the lazy range is Unmovable, not Movable".to_string()]);
        l.set_pageblock_migratetype(2048 + 512, MIGRATE_MOVABLE);
        lm.get(3072).set(PG_BUDDY, 10);
        let errs = l.check(&lm);
        assert!(errs.contains(&"buddy-7: pfn 0xc00 in the lazy range has metadata (flags 0x8, refcount 0)".to_string()), "{errs:?}");
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc { order: u32, mt: u8, nofrag: bool },
        Free { pick: usize, to_tail: bool },
        Highatomic { pick: usize },
        Unreserve { to: u8 },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u32..=MAX_PAGE_ORDER, 0u8..3, any::<bool>()).prop_map(|(order, mt, nofrag)| Op::Alloc { order, mt, nofrag }),
            3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, to_tail)| Op::Free { pick, to_tail }),
            1 => any::<usize>().prop_map(|pick| Op::Highatomic { pick }),
            1 => (0u8..3).prop_map(|to| Op::Unreserve { to }),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
        /// Allocations that carve into the lazy range, frees that merge back
        /// (to the head or the tail of the max-order list), highatomic
        /// reservations: the lazy zone answers exactly as the eager one,
        /// and both pass check() after every step.
        #[test]
        fn lazy_range_behaves_as_eager_lists(ops in proptest::collection::vec(op(), 1..80)) {
            let ((mut l, lm), (mut e, em)) = lazy_and_eager();
            let mut live: Vec<(u64, u32)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc { order, mt, nofrag } => {
                        let flags = if nofrag { ALLOC_NOFRAGMENT } else { 0 };
                        let (mut ml, mut me) = (RmqueueMode::Normal, RmqueueMode::Normal);
                        let (mut evl, mut eve) = (Vec::new(), Vec::new());
                        let a = l.rmqueue(&lm, order, mt, flags, &mut ml, &mut Some(&mut evl));
                        let b = e.rmqueue(&em, order, mt, flags, &mut me, &mut Some(&mut eve));
                        proptest::prop_assert_eq!(a, b);
                        proptest::prop_assert_eq!(evl, eve);
                        if let Some(p) = a {
                            // What prep_new_page does: the head records its order.
                            lm.get(p).set(0, order);
                            lm.get(p).set_refcount(1);
                            em.get(p).set(0, order);
                            em.get(p).set_refcount(1);
                            live.push((p, order));
                        }
                    }
                    Op::Free { pick, to_tail } => {
                        if live.is_empty() { continue; }
                        let (p, order) = live.swap_remove(pick % live.len());
                        lm.get(p).clear();
                        em.get(p).clear();
                        let mt = l.pageblock_migratetype(p);
                        proptest::prop_assert_eq!(mt, e.pageblock_migratetype(p));
                        let a = l.free_one_page(&lm, p, order, mt, to_tail);
                        let b = e.free_one_page(&em, p, order, mt, to_tail);
                        proptest::prop_assert_eq!(a, b);
                    }
                    Op::Highatomic { pick } => {
                        if live.is_empty() { continue; }
                        let (p, _) = live[pick % live.len()];
                        proptest::prop_assert_eq!(l.reserve_highatomic(&lm, p), e.reserve_highatomic(&em, p));
                    }
                    Op::Unreserve { to } => {
                        proptest::prop_assert_eq!(l.unreserve_highatomic(&lm, to), e.unreserve_highatomic(&em, to));
                    }
                }
                same_state(&l, &lm, &e, &em);
            }
        }
    }
}
