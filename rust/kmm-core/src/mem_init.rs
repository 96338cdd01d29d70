//! Memory auto-initialisation: `init_on_alloc=1` zeroes every page and slab
//! object when it is allocated, `init_on_free=1` when it is freed, with the
//! kernel's exceptions. Both are boot parameters (`cmdline.rs`), fixed for
//! the machine's life.
//!
//! # Kernel
//! `mm/mm_init.c` (`early_init_on_alloc`, `early_init_on_free`,
//! `mem_debugging_and_hardening_init`), `include/linux/mm.h`
//! (`want_init_on_alloc`, `want_init_on_free`), `mm/page_alloc.c`
//! (`post_alloc_hook`: pages are zeroed at allocation only when init_on_free
//! has not already zeroed them at free; `free_pages_prepare` ->
//! `kernel_init_pages`), `mm/slab.h` (`slab_want_init_on_alloc`,
//! `slab_want_init_on_free`: caches with a ctor are never initialised,
//! SLAB_TYPESAFE_BY_RCU and SLAB_POISON caches only for `__GFP_ZERO`, and
//! SLAB_POISON takes precedence at free), `mm/slub.c` (`slab_free_hook`:
//! the object and the metadata after it, not the left red zone;
//! `maybe_wipe_obj_freeptr`), `mm/slab_common.c` (`__do_krealloc`).
//!
//! SIMPLIFICATION: no page poisoning (`page_poison=`), which in the kernel
//! turns both off.
//!
//! With slub_debug, a kmalloc cache with red zones or user tracking zeroes
//! only the request at allocation (`slab_post_alloc_hook`'s `zero_size =
//! orig_size`: the rest is its kmalloc red zone), and at free only
//! `get_orig_size` bytes, restoring the stored request afterwards.
//!
//! Why `__GFP_ZERO` may skip its zeroing under init_on_free: every page
//! reaches the free lists through `free_block` (which zeroes it) or was
//! never written (the backing memfd starts zero), and every free object of
//! a cache `slab_want_init_on_free` accepts was zeroed but for its free
//! pointer, which allocation wipes. A write through a stale address to
//! freed memory breaks that, in kmm as in the kernel.
#![forbid(unsafe_code)]

use crate::gfp::{self, Gfp};
use crate::machine::Machine;
use crate::page::Pfn;
use crate::slab::geometry::{SLAB_POISON, SLAB_RED_ZONE, SLAB_TYPESAFE_BY_RCU};
use crate::slab::KmemCache;

impl Machine {
    /// `want_init_on_alloc(gfp)`.
    #[inline]
    pub fn want_init_on_alloc(&self, gfp: Gfp) -> bool {
        self.cfg.cmdline.init_on_alloc || gfp & gfp::__GFP_ZERO != 0
    }

    /// `want_init_on_free()`.
    #[inline]
    pub fn want_init_on_free(&self) -> bool {
        self.cfg.cmdline.init_on_free
    }

    /// `post_alloc_hook`'s `init`: zero new pages unless init_on_free did
    /// when they were freed.
    #[inline]
    pub(crate) fn page_init_on_alloc(&self, gfp: Gfp) -> bool {
        !self.want_init_on_free() && self.want_init_on_alloc(gfp)
    }

    /// `free_pages_prepare` -> `kernel_init_pages`: zero a block being freed.
    #[inline]
    pub(crate) fn page_init_on_free(&self, pfn: Pfn, order: u32) {
        if self.want_init_on_free() {
            let _ = self.phys.zero(self.pfn_to_phys(pfn).0, self.page_size << order);
        }
    }

    /// `slab_want_init_on_alloc(gfp, c)`.
    #[inline]
    pub fn slab_want_init_on_alloc(&self, gfp: Gfp, c: &KmemCache) -> bool {
        if self.cfg.cmdline.init_on_alloc {
            if c.ctor.is_some() {
                return false;
            }
            if c.flags & (SLAB_TYPESAFE_BY_RCU | SLAB_POISON) != 0 {
                return gfp & gfp::__GFP_ZERO != 0;
            }
            return true;
        }
        gfp & gfp::__GFP_ZERO != 0
    }

    /// `slab_want_init_on_free(c)`.
    #[inline]
    pub fn slab_want_init_on_free(&self, c: &KmemCache) -> bool {
        self.cfg.cmdline.init_on_free && c.ctor.is_none() && c.flags & (SLAB_TYPESAFE_BY_RCU | SLAB_POISON) == 0
    }

    /// The post-allocation zeroing of one object at physical `phys`:
    /// `slab_post_alloc_hook`'s memset of `zero_size` bytes when
    /// `slab_want_init_on_alloc`, else `maybe_wipe_obj_freeptr` (init_on_free
    /// left the object zero but for the free pointer stored inside it).
    #[inline]
    pub(crate) fn slab_init_on_alloc(&self, c: &KmemCache, phys: u64, gfp: Gfp, zero_size: u32) {
        if self.slab_want_init_on_alloc(gfp, c) {
            let _ = self.phys.zero(phys, zero_size as u64);
        } else if self.slab_want_init_on_free(c) && c.geo.offset < c.geo.inuse {
            let _ = self.phys.zero(phys + c.geo.offset as u64, self.slab.tunables.word as u64);
        }
    }

    /// `slab_free_hook`'s `init` memsets for one object at physical `phys`:
    /// the object, then the metadata from `get_info_end` to the slot's end
    /// (not the left red zone, which belongs to the slot's start).
    #[inline]
    pub(crate) fn slab_init_on_free(&self, c: &KmemCache, phys: u64) {
        if !self.slab_want_init_on_free(c) {
            return;
        }
        let g = &c.geo;
        let va = phys + self.cfg.arch.page_offset();
        let orig_size = c.get_orig_size(self, va);
        let _ = self.phys.zero(phys, orig_size as u64);
        let info_end = if g.offset >= g.inuse { g.inuse + self.slab.tunables.word } else { g.inuse };
        let rsize = if c.flags & SLAB_RED_ZONE != 0 { g.red_left_pad } else { 0 };
        let end = g.size.saturating_sub(rsize);
        if end > info_end {
            let _ = self.phys.zero(phys + info_end as u64, (end - info_end) as u64);
        }
        // "Restore orig_size, otherwize kmalloc redzone overwritten would be reported".
        c.set_orig_size(self, va, orig_size);
    }
}
