//! The kmalloc family: size classes, the four kmalloc cache families, large
//! kmalloc through the page allocator, kfree, ksize, krealloc.
//!
//! # Kernel
//! `include/linux/slab.h` (`kmalloc_index`, `kmalloc_type`, KMALLOC_* limits),
//! `mm/slab_common.c` (`kmalloc_info`, `kmalloc_size_index`, `kmalloc_slab`,
//! `create_kmalloc_caches`, `__do_kmalloc_node`, `__kmalloc_large_node`,
//! `kfree`, `free_large_kmalloc`, `__ksize`, `krealloc`/`__do_krealloc`,
//! `kmalloc_size_roundup`), `mm/slab.h` (`kmalloc_fix_flags`).
//!
//! SIMPLIFICATION: no CONFIG_RANDOM_KMALLOC_CACHES (the reference machine has
//! none) and one NUMA node (`node=-1` in events).
//!
//! # Invariants
//! - kmalloc-1: `ksize(kmalloc(n)) >= n` for 0 < n <= KMALLOC_MAX_SIZE.
//! - kmalloc-2: a large kmalloc is a compound page block whose head is marked
//!   live in the shadow and accounted in NR_SLAB_UNRECLAIMABLE_B.
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering::Relaxed;

use crate::error::{KmmError, Result};
use crate::gfp::{self, Gfp};
use crate::machine::{Machine, VirtAddr};
use crate::page::{Pfn, PG_HEAD, PG_SLAB};
use crate::slab::geometry::*;
use crate::slab::{CacheArgs, KmemCache};
use crate::trace::{CallSite, EventId, Payload};

/// `KMALLOC_SHIFT_HIGH` for 4 KiB pages: the largest slab-backed class is 8 KiB.
pub const KMALLOC_MAX_CACHE_SIZE: u64 = 8192;
/// `KMALLOC_MAX_SIZE`: 2^(MAX_PAGE_ORDER + PAGE_SHIFT) = 4 MiB.
pub const KMALLOC_MAX_SIZE: u64 = 4 << 20;
/// `ZERO_SIZE_PTR`.
pub const ZERO_SIZE_PTR: u64 = 16;

/// `kmalloc_info[]` names by index (index 1 = 96, 2 = 192, 3.. = 2^index).
pub const KMALLOC_NAMES: [(&str, u32); 14] = [
    ("", 0),
    ("96", 96),
    ("192", 192),
    ("8", 8),
    ("16", 16),
    ("32", 32),
    ("64", 64),
    ("128", 128),
    ("256", 256),
    ("512", 512),
    ("1k", 1024),
    ("2k", 2048),
    ("4k", 4096),
    ("8k", 8192),
];

/// `enum kmalloc_cache_type` (without RANDOM caches), with the name prefix
/// and the cache flag of each family.
pub const KMALLOC_TYPES: [(&str, u32); 4] = [
    ("kmalloc-", 0),
    ("kmalloc-rcl-", SLAB_RECLAIM_ACCOUNT),
    ("dma-kmalloc-", SLAB_CACHE_DMA),
    ("kmalloc-cg-", SLAB_ACCOUNT),
];
pub const KMALLOC_NORMAL: usize = 0;
pub const KMALLOC_RECLAIM: usize = 1;
pub const KMALLOC_DMA: usize = 2;
pub const KMALLOC_CGROUP: usize = 3;

/// `kmalloc_size_index[]` for sizes 1..=192, by (size - 1) / 8.
const SIZE_INDEX: [u8; 24] = [3, 4, 5, 5, 6, 6, 6, 6, 1, 1, 1, 1, 7, 7, 7, 7, 2, 2, 2, 2, 2, 2, 2, 2];

/// `kmalloc_index(size)`: the class index for 1 <= size <= 8192.
#[inline]
pub fn kmalloc_index(size: u64) -> usize {
    debug_assert!(size > 0 && size <= KMALLOC_MAX_CACHE_SIZE);
    if size <= 192 {
        SIZE_INDEX[((size - 1) / 8) as usize] as usize
    } else {
        (64 - (size - 1).leading_zeros()) as usize
    }
}

/// `kmalloc_type(flags)`: DMA > RECLAIMABLE > ACCOUNT > normal.
#[inline]
pub fn kmalloc_type(gfp: Gfp) -> usize {
    if gfp & (gfp::__GFP_DMA | gfp::__GFP_RECLAIMABLE | gfp::__GFP_ACCOUNT) == 0 {
        KMALLOC_NORMAL
    } else if gfp & gfp::__GFP_DMA != 0 {
        KMALLOC_DMA
    } else if gfp & gfp::__GFP_RECLAIMABLE != 0 {
        KMALLOC_RECLAIM
    } else {
        KMALLOC_CGROUP
    }
}

/// The kmalloc caches of a machine: ids by [type][index].
#[derive(Clone, Debug, Default)]
pub struct KmallocCaches {
    pub ids: [[u32; 14]; 4],
}

/// What a pointer given to kfree/ksize is.
pub enum KObj<'a> {
    /// NULL or ZERO_SIZE_PTR.
    Zero,
    /// A slab object: its cache and its slab's head pfn.
    Slab(&'a std::sync::Arc<KmemCache>, u64),
    /// A large kmalloc: head pfn and order.
    Large(Pfn, u32),
}

impl Machine {
    /// `create_kmalloc_caches` (and the boot caches `kmem_cache`,
    /// `kmem_cache_node`, created first as in `kmem_cache_init`).
    pub(crate) fn create_kmalloc_caches(&self) -> Result<KmallocCaches> {
        let word = self.slab.tunables.word;
        self.kmem_cache_create(
            "kmem_cache",
            if word == 8 { 232 } else { 128 },
            CacheArgs { flags: SLAB_HWCACHE_ALIGN | SLAB_NO_MERGE, ..CacheArgs::default() },
        )?;
        self.kmem_cache_create(
            "kmem_cache_node",
            if word == 8 { 72 } else { 40 },
            CacheArgs { flags: SLAB_HWCACHE_ALIGN | SLAB_NO_MERGE, ..CacheArgs::default() },
        )?;
        let mut k = KmallocCaches::default();
        for (t, &(prefix, flag)) in KMALLOC_TYPES.iter().enumerate() {
            // Indices 1 (96) and 2 (192) first, then 3..=13, as the kernel loops.
            for i in [1usize, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13] {
                let (suffix, size) = KMALLOC_NAMES[i];
                let name = format!("{prefix}{suffix}");
                let flags = flag | SLAB_KMALLOC | SLAB_NO_MERGE;
                let c = self.kmem_cache_create(
                    &name,
                    size,
                    CacheArgs { align: kmalloc_align(size), flags, ..CacheArgs::default() },
                )?;
                k.ids[t][i] = c.cache.id;
            }
        }
        Ok(k)
    }

    /// The kmalloc cache serving `size` with `gfp` (`kmalloc_slab`).
    #[inline]
    pub fn kmalloc_slab(&self, size: u64, gfp: Gfp) -> &std::sync::Arc<KmemCache> {
        let id = self.kmalloc_table().ids[kmalloc_type(gfp)][kmalloc_index(size)];
        self.slab.get(id).expect("kmalloc cache exists")
    }

    /// `kmalloc(size, gfp)` (`__do_kmalloc_node`). Returns ZERO_SIZE_PTR for 0.
    pub fn kmalloc(&self, size: u64, gfp: Gfp, call_site: &CallSite) -> Result<VirtAddr> {
        if size == 0 {
            return Ok(VirtAddr(ZERO_SIZE_PTR));
        }
        if size > KMALLOC_MAX_CACHE_SIZE {
            return self.kmalloc_large(size, gfp, call_site);
        }
        let gfp = self.slab_gfp(gfp);
        let c = self.kmalloc_slab(size, gfp);
        self.kmalloc_object(c, size, gfp, call_site)
    }

    /// The slab half of kmalloc (`__do_kmalloc_node` after the size class,
    /// `__kmalloc_cache_noprof`): an object of `c` for `size` bytes, KASAN's
    /// poisoning of the unrequested tail (`kasan_kmalloc`) and the kmalloc
    /// tracepoint. `gfp` has been through `slab_gfp`.
    #[inline]
    pub(crate) fn kmalloc_object(&self, c: &KmemCache, size: u64, gfp: Gfp, call_site: &CallSite) -> Result<VirtAddr> {
        let r = self.slab_alloc(c, gfp, None, size as u32, call_site);
        if let Ok(o) = r {
            self.kasan_kmalloc(c, o, size, gfp, call_site);
        }
        if self.trace.on(EventId::Kmalloc) {
            self.trace.emit(
                self.this_cpu(),
                Payload::Kmalloc {
                    call_site: call_site.clone(),
                    ptr: *r.as_ref().unwrap_or(&0),
                    bytes_req: size,
                    bytes_alloc: c.geo.size as u64,
                    gfp_flags: gfp,
                    node: -1,
                    accounted: gfp & gfp::__GFP_ACCOUNT != 0,
                },
            );
        }
        r.map(VirtAddr)
    }

    /// `__kmalloc_large_node`: compound pages from the page allocator.
    fn kmalloc_large(&self, size: u64, gfp: Gfp, call_site: &CallSite) -> Result<VirtAddr> {
        self.might_alloc(gfp, "mm/slub.c (__kmalloc_large_node -> might_alloc)")?;
        // The pages get __GFP_COMP; the events show the caller's flags.
        let gfp = self.slab_gfp(gfp);
        let page_gfp = gfp | gfp::__GFP_COMP;
        let order = get_order(size, self.page_size as u32);
        let r = if size > KMALLOC_MAX_SIZE {
            Err(KmmError::OutOfMemory {
                order,
                gfp: page_gfp,
                message: format!(
                    "WARNING: kmalloc of {size} bytes exceeds KMALLOC_MAX_SIZE ({KMALLOC_MAX_SIZE}): page allocation failure: order:{order}, mode:{:#x}({}), nodemask=(null)",
                    page_gfp,
                    gfp::format_pgg(page_gfp)
                ),
            })
        } else {
            self.alloc_pages(page_gfp, order).map(|pfn| {
                let va = self.page_address(pfn).expect("kmalloc pages are lowmem").0;
                self.shadow.alloc(va - self.cfg.arch.page_offset());
                self.kasan_kmalloc_large(va, size, order);
                self.vmstat.nr_slab_unreclaimable_b.fetch_add((self.page_size << order) as i64, Relaxed);
                if self.kmemleak.enabled {
                    self.kmemleak_alloc(va, size, 1);
                }
                va
            })
        };
        // 6.18 traces a large kmalloc twice: once in __kmalloc_large_node
        // (its caller, inlined __do_kmalloc_node, as call site) and once in
        // __do_kmalloc_node with the real caller.
        for cs in [&std::sync::Arc::<str>::from("__kmalloc_noprof"), call_site] {
            if !self.trace.on(EventId::Kmalloc) {
                break;
            }
            self.trace.emit(
                self.this_cpu(),
                Payload::Kmalloc {
                    call_site: cs.clone(),
                    ptr: *r.as_ref().unwrap_or(&0),
                    bytes_req: size,
                    bytes_alloc: self.page_size << order,
                    gfp_flags: gfp,
                    node: -1,
                    accounted: gfp & gfp::__GFP_ACCOUNT != 0,
                },
            );
        }
        r.map(VirtAddr)
    }

    /// What kind of kmalloc'd object `va` is, or why it is not one.
    pub fn kobj(&self, va: u64) -> Result<KObj<'_>> {
        if va <= ZERO_SIZE_PTR {
            return Ok(KObj::Zero);
        }
        let pfn = self.virt_to_pfn(VirtAddr(va)).map_err(|_| {
            KmmError::InvalidFree(format!(
                "kfree: {va:#x} is not a kmalloc address (BUG: unable to handle page fault)"
            ))
        })?;
        let head = self.compound_head(pfn);
        let p = self.mem_map.get(head.0);
        if p.has(PG_SLAB) {
            let c = self.slab.get(p.refcount() as u32).expect("slab page names its cache");
            return Ok(KObj::Slab(c, head.0));
        }
        let hp = self.phys_of_pfn(head);
        if p.refcount() > 0 && self.shadow.is_live(hp) && p.has(PG_HEAD) {
            return Ok(KObj::Large(head, p.order()));
        }
        Err(KmmError::InvalidFree(format!(
            "kfree: {va:#x} is not a kmalloc'd object (page pfn:{:05x} is neither a slab nor a large kmalloc)",
            head.0
        )))
    }

    fn phys_of_pfn(&self, pfn: Pfn) -> u64 {
        pfn.0 << self.page_shift
    }

    /// `kfree(ptr)`: NULL and ZERO_SIZE_PTR are no-ops (but traced).
    pub fn kfree(&self, va: u64, call_site: &CallSite) -> Result<()> {
        let k = self.kobj(va)?;
        match &k {
            KObj::Zero => {}
            KObj::Slab(c, head) => {
                let o = c.locate_at(self, *head, va).map_err(|e| self.kasan_invalid_free(va, e))?;
                let o = self.check_slab_free_at(c, o, va)?;
                self.trace_kfree(va, call_site);
                self.slab_free_checked(c, &o, va, self.run_cpu(), call_site);
                return Ok(());
            }
            KObj::Large(pfn, order) => {
                let head_va = self.page_address(*pfn).expect("lowmem").0;
                if va != head_va {
                    // check_page_allocation: KASAN reports it first.
                    return Err(self.kasan_invalid_free(
                        va,
                        KmmError::InvalidFree(format!("kfree: {va:#x} is inside a large kmalloc that starts at {head_va:#x}")),
                    ));
                }
                let phys = head_va - self.cfg.arch.page_offset();
                if self.shadow.is_pinned(phys) {
                    return Err(KmmError::BufferBusy(format!(
                        "cannot free {va:#x}: a buffer export (memoryview) of it is alive"
                    )));
                }
                self.trace_kfree(va, call_site);
                if self.kmemleak.enabled {
                    self.kmemleak_free(va);
                }
                self.shadow.free(phys);
                self.vmstat.nr_slab_unreclaimable_b.fetch_sub((self.page_size << order) as i64, Relaxed);
                return self.free_pages(*pfn, *order);
            }
        }
        self.trace_kfree(va, call_site);
        Ok(())
    }

    fn trace_kfree(&self, va: u64, call_site: &CallSite) {
        if self.trace.on(EventId::Kfree) {
            self.trace.emit(self.this_cpu(), Payload::Kfree { call_site: call_site.clone(), ptr: va });
        }
    }

    /// `__ksize`: the usable size of a kmalloc'd object.
    pub fn ksize(&self, va: u64) -> Result<u64> {
        // ksize: kasan_check_byte first (a freed object is reported).
        if va > ZERO_SIZE_PTR {
            self.kasan_check_byte(va)?;
        }
        match self.kobj(va)? {
            KObj::Zero => Ok(0),
            KObj::Slab(c, head) => {
                c.locate_at(self, head, va)?;
                if !self.shadow.is_live(va - self.cfg.arch.page_offset()) {
                    return Err(KmmError::UseAfterFree(format!("ksize: {va:#x} was freed")));
                }
                Ok(c.ksize() as u64)
            }
            KObj::Large(_, order) => Ok(self.page_size << order),
        }
    }

    /// `kmalloc_size_roundup(size)`: what kmalloc(size) really provides.
    pub fn kmalloc_size_roundup(&self, size: u64) -> u64 {
        if size == 0 {
            0
        } else if size <= KMALLOC_MAX_CACHE_SIZE {
            self.kmalloc_slab(size, gfp::GFP_KERNEL).ksize() as u64
        } else if size <= KMALLOC_MAX_SIZE {
            self.page_size << get_order(size, self.page_size as u32)
        } else {
            size
        }
    }

    /// `kmalloc_array(n, size, gfp)`: fails on multiplication overflow.
    pub fn kmalloc_array(&self, n: u64, size: u64, gfp: Gfp, call_site: &CallSite) -> Result<VirtAddr> {
        match n.checked_mul(size) {
            Some(bytes) => self.kmalloc(bytes, gfp, call_site),
            None => Err(KmmError::InvalidArgument(format!(
                "kmalloc_array: {n} * {size} overflows (check_mul_overflow): nothing allocated"
            ))),
        }
    }

    /// `krealloc(p, new_size, gfp)`: in place when `ksize` allows, else
    /// allocate, copy and free. `p` may be NULL/ZERO_SIZE_PTR; size 0 frees.
    pub fn krealloc(&self, va: u64, new_size: u64, gfp: Gfp, call_site: &CallSite) -> Result<VirtAddr> {
        self.refused_changes_nothing(|| self.krealloc_(va, new_size, gfp, call_site))
    }

    fn krealloc_(&self, va: u64, new_size: u64, gfp: Gfp, call_site: &CallSite) -> Result<VirtAddr> {
        if new_size == 0 {
            self.kfree(va, call_site)?;
            return Ok(VirtAddr(ZERO_SIZE_PTR));
        }
        // __do_krealloc: "Check for double-free" (kasan_check_byte).
        if va > ZERO_SIZE_PTR {
            self.kasan_check_byte(va)?;
        }
        let ks = match self.kobj(va)? {
            KObj::Zero => 0,
            _ => self.ksize(va)?,
        };
        // A kmalloc cache with slub_debug's U keeps the request (orig_size).
        let orig = match self.kobj(va)? {
            KObj::Slab(c, _) if c.debug_orig_size() => c.get_orig_size(self, va) as u64,
            _ => 0,
        };
        if ks >= new_size && va > ZERO_SIZE_PTR {
            // "Zero out spare memory" (__do_krealloc; want_init_on_alloc:
            // __GFP_ZERO or init_on_alloc): from the old request when
            // growing within the object, else [new_size, ks).
            if self.want_init_on_alloc(gfp) {
                let p = va - self.cfg.arch.page_offset();
                if orig != 0 && orig < new_size {
                    self.phys.zero(p + orig, new_size - orig)?;
                } else {
                    self.phys.zero(p + new_size, ks - new_size)?;
                }
            }
            // "Setup kmalloc redzone when needed".
            if let KObj::Slab(c, _) = self.kobj(va)? {
                if c.debug_orig_size() {
                    c.set_orig_size(self, va, new_size as u32);
                    if c.flags & SLAB_RED_ZONE != 0 && new_size < ks {
                        self.phys.fill(va - self.cfg.arch.page_offset() + new_size, ks - new_size, crate::slab::cache::SLUB_RED_ACTIVE)?;
                    }
                }
            }
            self.kasan_krealloc(va, new_size, call_site);
            return Ok(VirtAddr(va));
        }
        let new = self.kmalloc(new_size, gfp, call_site)?;
        if va > ZERO_SIZE_PTR {
            // The copy runs with KASAN disabled (it reads the old redzone);
            // with slub_debug's orig_size, only the old request is copied.
            let copy = if orig != 0 { orig } else { ks }.min(new_size) as usize;
            let data = self.read_nocheck(VirtAddr(va), copy)?;
            self.write_nocheck(new, &data)?;
            if let Err(e) = self.kfree(va, call_site) {
                // Undo: the old object stays, the new one goes.
                let _ = self.kfree(new.0, call_site);
                return Err(e);
            }
        }
        Ok(new)
    }
}
