//! `struct page`: the per-frame metadata array (`mem_map`), 16 bytes a page
//! (the kernel spends 64).
//!
//! # Kernel
//! `include/linux/mm_types.h` (struct page), `include/linux/page-flags.h`
//! (PG_* flags, page types such as PGTY_buddy, compound head/tail),
//! `mm/internal.h` (`buddy_order`, `set_buddy_order`).
//!
//! # Layout (one `PageMeta`)
//! ```text
//!   flags    u32   bits 0..15 PG_* flags and page types, bits 16..19 order,
//!                  bits 20..22 the allocation's migratetype + 1 (page_owner's)
//!   refcount i32   _refcount: > 0 for the head of an allocated block
//!   next     u32   free-list / slab-list link (a pfn, NIL = u32::MAX)
//!   prev     u32   free-list / slab-list link
//! ```
//! The zone and the pageblock migratetype are not stored per page: the zone
//! follows from the pfn (zones are contiguous ranges) and the migratetype
//! lives in the zone's pageblock array (like `pageblock_flags`).
//! All-zero metadata is the state of a page inside a free block (not a head),
//! so booting touches only the head page of each free block -- and none of
//! the zone's lazily-initialised max-order blocks (`buddy.rs`, buddy-7),
//! whose pages stay all-zero until an allocation carves them.
//!
//! Fields are relaxed atomics: each is written only under the lock that owns
//! the page (zone lock while free, the owner while allocated); atomics make the
//! array `Sync` without `unsafe` and cost plain moves on x86.
//!
//! # Invariants
//! - page-1: a page with PG_buddy is the head of a free block of `order()`
//!   pages, on the free list of its pageblock's migratetype; refcount 0.
//! - page-2: the head of an allocated block has refcount > 0 and records its
//!   order; tails of compound blocks have PG_tail.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering::Relaxed};

use bytemuck::Zeroable;

/// A page frame number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pfn(pub u64);

/// The "no page" link value.
pub const NIL: u32 = u32::MAX;

// Flag bits. Names shown to users are the kernel's (`%pGp` names and page types).
pub const PG_RESERVED: u32 = 1 << 0;
pub const PG_HEAD: u32 = 1 << 1;
pub const PG_TAIL: u32 = 1 << 2;
/// Page type "buddy": head of a free block in the buddy allocator.
pub const PG_BUDDY: u32 = 1 << 3;
/// Page type "slab".
pub const PG_SLAB: u32 = 1 << 4;
/// On a per-CPU page list (the kernel keeps no flag; pages there are "allocated"
/// from the zone's point of view). kmm marks them to catch double frees.
pub const PG_PCP: u32 = 1 << 5;
/// Page type "table": a page-table page.
pub const PG_TABLE: u32 = 1 << 6;
/// Backs a vmalloc area (`PageVmalloc` in the kernel is derived from the area).
pub const PG_VMALLOC: u32 = 1 << 7;
/// On an LRU list: kmm sets it on blocks allocated with `__GFP_MOVABLE`
/// (user pages), which the pageblock-claim heuristic counts as movable.
pub const PG_LRU: u32 = 1 << 8;
/// In use since before a replayed trace began, by an owner kmm does not
/// know (page cache, anonymous memory, ...): set by the warm start on the
/// pages a recorded machine had allocated. Never freed.
pub const PG_WARM: u32 = 1 << 9;

const ORDER_SHIFT: u32 = 16;
const ORDER_MASK: u32 = 0xf << ORDER_SHIFT;
/// Bits 20..22 of an allocated head: its allocation's migratetype + 1
/// (`gfp_migratetype(page_owner->gfp_mask)`, what page_owner keeps per
/// allocation), 0 when unknown. Cleared by `set` (every free, every prep).
const OWNER_SHIFT: u32 = 20;
const OWNER_MASK: u32 = 0x7 << OWNER_SHIFT;

/// The flag names, in the order `%pGp`-style dumps list them.
pub const FLAG_NAMES: &[(u32, &str)] = &[
    (PG_RESERVED, "reserved"),
    (PG_HEAD, "head"),
    (PG_TAIL, "tail"),
    (PG_BUDDY, "buddy"),
    (PG_SLAB, "slab"),
    (PG_PCP, "pcp"),
    (PG_TABLE, "table"),
    (PG_VMALLOC, "vmalloc"),
    (PG_LRU, "lru"),
    (PG_WARM, "warm"),
];

/// One page's metadata. 16 bytes.
#[derive(Zeroable, Debug)]
#[repr(C)]
pub struct PageMeta {
    flags: AtomicU32,
    refcount: AtomicI32,
    next: AtomicU32,
    prev: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<PageMeta>() == 16);

impl PageMeta {
    #[inline]
    pub fn flags(&self) -> u32 {
        self.flags.load(Relaxed) & !(ORDER_MASK | OWNER_MASK)
    }
    #[inline]
    pub fn raw(&self) -> u32 {
        self.flags.load(Relaxed)
    }
    #[inline]
    pub fn has(&self, f: u32) -> bool {
        self.flags.load(Relaxed) & f != 0
    }
    #[inline]
    pub fn order(&self) -> u32 {
        (self.flags.load(Relaxed) & ORDER_MASK) >> ORDER_SHIFT
    }
    /// Set flags and order at once (replaces both, forgets the owner's migratetype).
    #[inline]
    pub fn set(&self, flags: u32, order: u32) {
        debug_assert!(flags & (ORDER_MASK | OWNER_MASK) == 0 && order <= 15);
        self.flags.store(flags | (order << ORDER_SHIFT), Relaxed);
    }
    /// `set` plus the owner's migratetype, in one plain store (the
    /// allocation fast path: no lock-prefixed read-modify-write).
    #[inline]
    pub fn set_with_owner(&self, flags: u32, order: u32, mt: u8) {
        debug_assert!(flags & (ORDER_MASK | OWNER_MASK) == 0 && order <= 15 && mt < 7);
        self.flags.store(flags | (order << ORDER_SHIFT) | (((mt as u32 + 1) << OWNER_SHIFT) & OWNER_MASK), Relaxed);
    }
    /// Record the migratetype an allocated head was asked for (page_owner's
    /// `gfp_mask`, `__set_page_owner`).
    #[inline]
    pub fn set_owner_mt(&self, mt: u8) {
        debug_assert!(mt < 7);
        self.flags.fetch_or(((mt as u32 + 1) << OWNER_SHIFT) & OWNER_MASK, Relaxed);
    }
    /// The migratetype this allocated head was asked for, if known.
    #[inline]
    pub fn owner_mt(&self) -> Option<u8> {
        match (self.flags.load(Relaxed) & OWNER_MASK) >> OWNER_SHIFT {
            0 => None,
            v => Some(v as u8 - 1),
        }
    }
    #[inline]
    pub fn set_flag(&self, f: u32) {
        self.flags.fetch_or(f, Relaxed);
    }
    #[inline]
    pub fn clear_flag(&self, f: u32) {
        self.flags.fetch_and(!f, Relaxed);
    }
    #[inline]
    pub fn clear(&self) {
        self.flags.store(0, Relaxed);
        self.refcount.store(0, Relaxed);
    }
    #[inline]
    pub fn refcount(&self) -> i32 {
        self.refcount.load(Relaxed)
    }
    #[inline]
    pub fn set_refcount(&self, v: i32) {
        self.refcount.store(v, Relaxed);
    }
    /// `page_ref_inc`; returns the new count.
    #[inline]
    pub fn ref_inc(&self) -> i32 {
        self.refcount.fetch_add(1, Relaxed) + 1
    }
    /// `page_ref_dec_and_test`-like; returns the new count.
    #[inline]
    pub fn ref_dec(&self) -> i32 {
        self.refcount.fetch_sub(1, Relaxed) - 1
    }
    #[inline]
    pub fn next(&self) -> u32 {
        self.next.load(Relaxed)
    }
    #[inline]
    pub fn prev(&self) -> u32 {
        self.prev.load(Relaxed)
    }
    #[inline]
    pub fn set_next(&self, v: u32) {
        self.next.store(v, Relaxed)
    }
    #[inline]
    pub fn set_prev(&self, v: u32) {
        self.prev.store(v, Relaxed)
    }
}

/// Kernel names of a flags word.
pub fn flag_names(flags: u32) -> Vec<&'static str> {
    FLAG_NAMES.iter().filter(|(b, _)| flags & b != 0).map(|&(_, n)| n).collect()
}

/// The `mem_map` array, indexed by pfn: a host mapping that costs nothing
/// until touched (the kernel's sparse vmemmap idea: the array is reserved,
/// the host backs it on demand), see `physmem::Zeroed`.
pub struct MemMap {
    pages: crate::physmem::Zeroed<PageMeta>,
}

impl MemMap {
    /// A zeroed array for `nr` frames (panics if the host refuses: tests).
    pub fn new(nr: u64) -> MemMap {
        MemMap::try_new(nr).expect("mem_map")
    }

    /// `new`, or an error when the host cannot map the array.
    pub fn try_new(nr: u64) -> crate::Result<MemMap> {
        let bytes = nr.saturating_mul(std::mem::size_of::<PageMeta>() as u64);
        let fail = |why: String| {
            crate::KmmError::Host(format!(
                "cannot allocate the mem_map of {nr} page frames ({} MiB of struct page metadata): \
                 the host refused the memory (use a smaller machine): {why}",
                bytes >> 20
            ))
        };
        let n = usize::try_from(nr).map_err(|_| fail("too many frames for this host".into()))?;
        let pages = crate::physmem::Zeroed::new(n).map_err(|e| fail(e.to_string()))?;
        Ok(MemMap { pages })
    }
    #[inline]
    pub fn len(&self) -> u64 {
        self.pages.as_slice().len() as u64
    }
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    #[inline]
    pub fn get(&self, pfn: u64) -> &PageMeta {
        &self.pages.as_slice()[pfn as usize]
    }

    /// Runs of pfns in `[lo, hi)` whose metadata may be non-zero (their
    /// host pages were written at some time); every other pfn of the range
    /// has all-zero metadata. Sorted, disjoint. Scans that look for pages
    /// with flags (checks, page owners) walk only these.
    pub fn touched(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let hi = hi.min(self.len());
        if lo >= hi {
            return Vec::new();
        }
        self.pages.touched(lo as usize, hi as usize).into_iter().map(|(a, b)| (a as u64, b as u64)).collect()
    }

    /// Is every field of this page zero (never written, or written back to zero)?
    #[inline]
    pub fn is_zero(&self, pfn: u64) -> bool {
        let p = self.get(pfn);
        p.raw() == 0 && p.refcount() == 0 && p.next() == 0 && p.prev() == 0
    }
}
