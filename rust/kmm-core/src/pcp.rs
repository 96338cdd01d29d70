//! Per-CPU page lists (`struct per_cpu_pages`): the page allocator's fast path.
//!
//! Frees of pcp-sized orders go onto the freeing CPU's list for (order,
//! migratetype); allocations take from the head of the matching list and
//! refill it from the buddy allocator in batches under the zone lock; when a
//! list set grows past `high`, pages drain back in batches from the tails.
//!
//! # Kernel
//! `mm/page_alloc.c` (6.7+ auto-tuned `high`): `order_to_pindex`,
//! `pindex_to_order`, `nr_pcp_alloc`, `__rmqueue_pcplist`, `rmqueue_bulk`,
//! `free_frozen_page_commit`, `nr_pcp_high`, `nr_pcp_free`,
//! `free_pcppages_bulk`, `drain_pages_zone`, `drain_all_pages`;
//! `include/linux/mmzone.h` (NR_PCP_LISTS, PCPF_* flags).
//!
//! `decay_pcp_high` (page_alloc.rs) lowers `high` once a second per CPU
//! when the simulated clock runs (`clock.rs`: vmstat_update on the trace's
//! clock during a replay, `Machine::advance_time` otherwise).
//!
//! SIMPLIFICATION: one node, so no remote-node drains (`pcp->expire`).
//! ZONE_RECLAIM_ACTIVE is never set (no reclaim). PCPF_FREE_HIGH_BATCH is
//! never set (the kernel sets it from the CPU's cache size).
//!
//! # Invariants
//! - pcp-1: `count` equals the pages on the lists (1 << order per entry).
//! - pcp-2: every page on a list has PG_pcp and the list's order; none has PG_buddy.
//!
//! Lock order: per-CPU pcp lock -> zone lock. The pcp lock is per CPU and per
//! zone: uncontended unless two threads share a CPU or a drain reaches over.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use crate::arch::PAGE_ALLOC_COSTLY_ORDER;
use crate::buddy::MIGRATE_PCPTYPES;

/// `CONFIG_PCP_BATCH_SCALE_MAX` default.
pub const PCP_BATCH_SCALE_MAX: u32 = 5;
/// Lists for orders 0..=COSTLY, three migratetypes each.
pub const NR_LOWORDER_PCP_LISTS: usize = (MIGRATE_PCPTYPES as usize) * (PAGE_ALLOC_COSTLY_ORDER as usize + 1);
/// Plus two THP lists (movable / not), CONFIG_TRANSPARENT_HUGEPAGE.
pub const NR_PCP_LISTS: usize = NR_LOWORDER_PCP_LISTS + 2;

const PCPF_PREV_FREE_HIGH_ORDER: u8 = 1 << 0;
const PCPF_FREE_HIGH_BATCH: u8 = 1 << 1;

/// `order_to_pindex`.
#[inline]
pub fn order_to_pindex(mt: u8, order: u32, pageblock_order: u32) -> usize {
    if order > PAGE_ALLOC_COSTLY_ORDER {
        debug_assert_eq!(order, pageblock_order);
        return NR_LOWORDER_PCP_LISTS + usize::from(mt == crate::buddy::MIGRATE_MOVABLE);
    }
    (MIGRATE_PCPTYPES as usize) * order as usize + mt as usize
}

/// `pindex_to_order`.
#[inline]
pub fn pindex_to_order(pindex: usize, pageblock_order: u32) -> u32 {
    if pindex >= NR_LOWORDER_PCP_LISTS {
        pageblock_order
    } else {
        (pindex / MIGRATE_PCPTYPES as usize) as u32
    }
}

/// One CPU's lists for one zone.
#[derive(Debug)]
pub struct PerCpuPages {
    pub lists: Vec<VecDeque<u32>>,
    /// Pages on the lists.
    pub count: u64,
    pub high: u64,
    pub high_min: u64,
    pub high_max: u64,
    pub batch: u64,
    pub flags: u8,
    pub alloc_factor: u32,
    pub free_count: u64,
}

impl PerCpuPages {
    pub fn new(batch: u64, high_min: u64, high_max: u64) -> PerCpuPages {
        PerCpuPages {
            lists: (0..NR_PCP_LISTS).map(|_| VecDeque::new()).collect(),
            count: 0,
            high: 0,
            high_min,
            high_max,
            batch,
            flags: 0,
            alloc_factor: 0,
            free_count: 0,
        }
    }

    /// `nr_pcp_alloc`: how many pages to take from the buddy allocator.
    pub fn nr_pcp_alloc(&mut self, order: u32, below_high: bool) -> u64 {
        let base_batch = self.batch;
        let (high_min, high_max) = (self.high_min, self.high_max);
        self.high = self.high.clamp(high_min, high_max.max(high_min));
        let mut high = self.high;
        if high < base_batch {
            return 1;
        }
        let mut batch = if order > 0 { base_batch } else { base_batch << self.alloc_factor };
        if high_min != high_max && !below_high {
            high = (high + batch).min(high_max);
            self.high = high;
        }
        if order == 0 {
            let max_nr_alloc = high.saturating_sub(self.count + base_batch).max(base_batch);
            if batch <= max_nr_alloc && self.alloc_factor < PCP_BATCH_SCALE_MAX {
                self.alloc_factor += 1;
            }
            batch = batch.min(max_nr_alloc);
        }
        if batch > 1 {
            batch = (batch >> order).max(2);
        }
        batch
    }

    /// The start of `free_frozen_page_commit`: bookkeeping for a free of
    /// `order`. Returns `free_high`.
    pub fn note_free(&mut self, order: u32) -> bool {
        self.alloc_factor >>= 1;
        let batch = self.batch;
        let mut free_high = false;
        if order > 0 && order <= PAGE_ALLOC_COSTLY_ORDER {
            free_high = self.free_count >= batch + self.high_min / 2
                && self.flags & PCPF_PREV_FREE_HIGH_ORDER != 0
                && (self.flags & PCPF_FREE_HIGH_BATCH == 0 || self.count >= batch);
            self.flags |= PCPF_PREV_FREE_HIGH_ORDER;
        } else if self.flags & PCPF_PREV_FREE_HIGH_ORDER != 0 {
            self.flags &= !PCPF_PREV_FREE_HIGH_ORDER;
        }
        if self.free_count < (batch << PCP_BATCH_SCALE_MAX) {
            self.free_count += 1 << order;
        }
        free_high
    }

    /// `nr_pcp_high`.
    pub fn nr_pcp_high(&mut self, free_high: bool, below_high: bool) -> u64 {
        let batch = self.batch;
        let (high_min, high_max) = (self.high_min, self.high_max);
        let mut high = self.high.clamp(high_min, high_max.max(high_min));
        self.high = high;
        if high == 0 {
            return 0;
        }
        if free_high {
            self.high = high.saturating_sub(batch << PCP_BATCH_SCALE_MAX).max(high_min);
            return 0;
        }
        if high_min == high_max {
            return high;
        }
        if below_high {
            let free_count = self.free_count.max(batch);
            self.high = high.saturating_sub(free_count).max(high_min);
            high = self.count.max(high_min);
        } else if self.count >= high {
            let need_high = self.free_count + batch;
            if self.high < need_high {
                self.high = need_high.clamp(high_min, high_max);
            }
        }
        high
    }

    /// `nr_pcp_free`: how many pages to drain.
    pub fn nr_pcp_free(&self, high: u64, free_high: bool) -> u64 {
        let batch = self.batch;
        if free_high {
            return self.count.min(batch << PCP_BATCH_SCALE_MAX);
        }
        if high < batch {
            return 1;
        }
        let (min_nr_free, max_nr_free) = (batch, high - batch);
        self.free_count.clamp(min_nr_free, max_nr_free.max(min_nr_free))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pindex_mapping() {
        assert_eq!(order_to_pindex(0, 0, 9), 0);
        assert_eq!(order_to_pindex(2, 0, 9), 2);
        assert_eq!(order_to_pindex(1, 3, 9), 10);
        assert_eq!(order_to_pindex(1, 9, 9), 13);
        assert_eq!(order_to_pindex(0, 9, 9), 12);
        for p in 0..NR_PCP_LISTS {
            let o = pindex_to_order(p, 9);
            let mt = if p >= NR_LOWORDER_PCP_LISTS { (p - NR_LOWORDER_PCP_LISTS) as u8 } else { (p % 3) as u8 };
            assert_eq!(order_to_pindex(mt, o, 9), p);
        }
    }

    #[test]
    fn batches_grow_for_runs_of_order0_allocations() {
        // DMA32 of the real machine: batch 63, high_min 8385, high_max 48307.
        let mut p = PerCpuPages::new(63, 8385, 48307);
        // First refill: batch << 0 = 63 (and alloc_factor becomes 1).
        assert_eq!(p.nr_pcp_alloc(0, false), 63);
        assert_eq!(p.alloc_factor, 1);
        assert_eq!(p.nr_pcp_alloc(0, false), 126);
        // A free halves alloc_factor.
        p.note_free(0);
        assert_eq!(p.alloc_factor, 1);
        // Order 3: batch >> order, at least 2.
        assert_eq!(p.nr_pcp_alloc(3, false), 7);
        // Boot pageset (high 0 < batch 1): one page at a time.
        let mut boot = PerCpuPages::new(1, 0, 0);
        assert_eq!(boot.nr_pcp_alloc(0, false), 1);
        assert_eq!(boot.nr_pcp_high(false, false), 0);
    }
}
