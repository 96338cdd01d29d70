//! Pins: what must not be freed while something outside the allocator
//! still reaches it.
//!
//! Two kinds of holder keep memory from being freed:
//! - a **buffer export** (a Python memoryview of a Block): the binding hands
//!   out a host pointer into simulated memory, so the memory under it may
//!   not go back to the allocator (a freed page could be handed to someone
//!   else and written through the stale pointer);
//! - a **mapping** the page allocator does not know about: a `vmap` area,
//!   a `kmap_local_page` slot or a `kmap` pkmap slot over a page the caller
//!   owns. The kernel does not check these (freeing a page under a live
//!   vmap is a use after free through the mapping); kmm refuses the free.
//!
//! Exports are counted per object (one count per live buffer export of the
//! object, whichever Block made it) and per page; mappings per page. The
//! shadow's `pinned` bit of an object is set while its export count is
//! non-zero, so the slab free paths test one bit and take no lock.
//!
//! # Kernel
//! None: the kernel has no buffer exports, and its `free_pages` trusts the
//! caller. `mm/vmalloc.c` (`vmap` takes no page references) and
//! `mm/highmem.c` (`kmap`, `kmap_local_page`) are why mappings need pins.
//!
//! # Invariants
//! - pins-1: an object's shadow `pinned` bit is set iff its export count is
//!   non-zero (checked by `check`).
//! - pins-2: no pinned page is free in the buddy allocator or on a pcp list.
//!
//! Lock order: `state` is a leaf lock (nothing is taken under it).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::error::{KmmError, Result};
use crate::machine::Machine;
use crate::page::{PG_BUDDY, PG_PCP};

/// Why a page is pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinKind {
    /// A buffer export (memoryview) covers it.
    Export,
    /// A vmap area, kmap or kmap_local mapping maps it.
    Map,
}

#[derive(Default)]
struct State {
    /// Export count per object (by the physical address of its start).
    objects: HashMap<u64, u32>,
    /// (exports, mappings) per pfn.
    pages: HashMap<u64, (u32, u32)>,
}

/// The pin table of a machine.
#[derive(Default)]
pub struct Pins {
    state: Mutex<State>,
    /// Pages with a pin: `pages_pinned` is one relaxed load while it is 0.
    nr_pages: AtomicUsize,
}

impl Machine {
    /// Count one buffer export of the object at `phys` (its shadow `pinned`
    /// bit is set on the first).
    pub fn pin_object(&self, phys: u64) {
        let mut st = self.pins.state.lock();
        let n = st.objects.entry(phys).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.shadow.set_pinned(phys, true);
        }
    }

    /// Drop one export of the object at `phys` (the `pinned` bit is cleared
    /// with the last).
    pub fn unpin_object(&self, phys: u64) {
        let mut st = self.pins.state.lock();
        if let Some(n) = st.objects.get_mut(&phys) {
            *n -= 1;
            if *n == 0 {
                st.objects.remove(&phys);
                if self.shadow.is_live(phys) {
                    self.shadow.set_pinned(phys, false);
                }
            }
        }
    }

    /// Pin each page of `pfns` once.
    pub fn pin_pages(&self, pfns: impl IntoIterator<Item = u64>, kind: PinKind) {
        let mut st = self.pins.state.lock();
        for pfn in pfns {
            let e = st.pages.entry(pfn).or_insert((0, 0));
            match kind {
                PinKind::Export => e.0 += 1,
                PinKind::Map => e.1 += 1,
            }
        }
        self.pins.nr_pages.store(st.pages.len(), Relaxed);
    }

    /// Undo `pin_pages`.
    pub fn unpin_pages(&self, pfns: impl IntoIterator<Item = u64>, kind: PinKind) {
        let mut st = self.pins.state.lock();
        for pfn in pfns {
            if let Some(e) = st.pages.get_mut(&pfn) {
                match kind {
                    PinKind::Export => e.0 = e.0.saturating_sub(1),
                    PinKind::Map => e.1 = e.1.saturating_sub(1),
                }
                if *e == (0, 0) {
                    st.pages.remove(&pfn);
                }
            }
        }
        self.pins.nr_pages.store(st.pages.len(), Relaxed);
    }

    /// The pfns of the pages under `[phys, phys + len)`.
    pub fn pfns_of_range(&self, phys: u64, len: u64) -> std::ops::Range<u64> {
        let first = phys >> self.page_shift;
        let end = if len == 0 { first } else { (phys + len - 1) >> self.page_shift };
        first..end + 1
    }

    /// Refuse to free `[pfn, pfn + nr)` while an export or a mapping
    /// reaches into it (the error names which).
    pub(crate) fn check_unpinned(&self, pfn: u64, nr: u64) -> Result<()> {
        if self.pins.nr_pages.load(Relaxed) == 0 {
            return Ok(());
        }
        let st = self.pins.state.lock();
        for p in pfn..pfn.saturating_add(nr) {
            match st.pages.get(&p) {
                Some(&(e, _)) if e > 0 => {
                    return Err(KmmError::BufferBusy(format!(
                        "cannot free pfn:{p:05x}: a buffer export (memoryview) of memory in it is alive"
                    )))
                }
                Some(&(_, m)) if m > 0 => {
                    return Err(KmmError::InvalidFree(format!(
                        "BUG: Bad page state in process kmm  pfn:{p:05x}: freeing a page that a vmap, kmap or \
                         kmap_local mapping still maps (unmap it first)"
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The head of the block `pfn` lies in, when that block is a plain
    /// page-allocator allocation: allocated with `alloc_pages` and owned by
    /// its caller, not by the slab layer, vmalloc, the page tables or the
    /// kmalloc of a large object, and not free or reserved. Only such pages
    /// take pins: the allocator frees the others itself, under any pin.
    pub fn plain_alloc_head(&self, pfn: u64) -> Option<u64> {
        use crate::page::{PG_RESERVED, PG_SLAB, PG_TABLE, PG_TAIL, PG_VMALLOC};
        if pfn >= self.nr_pages {
            return None;
        }
        let owned = PG_BUDDY | PG_PCP | PG_RESERVED | PG_SLAB | PG_TABLE | PG_VMALLOC;
        let plain = |head: u64| {
            let h = self.mem_map.get(head);
            (h.flags() & owned == 0 && h.refcount() > 0 && !self.shadow.is_live(head << self.page_shift)).then_some(head)
        };
        let p = self.mem_map.get(pfn);
        if p.has(PG_TAIL) {
            return plain(self.compound_head(crate::Pfn(pfn)).0);
        }
        for o in 0..=crate::arch::MAX_PAGE_ORDER {
            let head = pfn >> o << o;
            let h = self.mem_map.get(head);
            if h.has(PG_TAIL) {
                continue;
            }
            if (h.refcount() > 0 || h.flags() & owned != 0) && pfn < head + (1u64 << h.order()) {
                return plain(head);
            }
        }
        None
    }

    /// pins-1 and pins-2.
    pub(crate) fn check_pins(&self) -> Vec<String> {
        let mut errs = Vec::new();
        let st = self.pins.state.lock();
        for (&phys, &n) in &st.objects {
            if n > 0 && !self.shadow.is_pinned(phys) {
                errs.push(format!("pins-1: object at phys {phys:#x} has {n} exports but is not pinned in the shadow"));
            }
        }
        for &pfn in st.pages.keys() {
            if pfn >= self.nr_pages {
                errs.push(format!("pins-2: pinned pfn {pfn:#x} is beyond RAM"));
            } else if self.mem_map.get(pfn).has(PG_BUDDY) || self.mem_map.get(pfn).has(PG_PCP) {
                errs.push(format!("pins-2: pinned pfn {pfn:#x} is free"));
            }
        }
        errs
    }
}
