//! The slab layer (SLUB): the list of caches, `kmem_cache_create` with cache
//! merging, and the `kmem_cache_*` API on a machine.
//!
//! # Kernel
//! `mm/slab_common.c` (`__kmem_cache_create_args`, `find_mergeable`,
//! `slab_unmergeable`, `kmem_cache_destroy`, `kmem_cache_shrink`,
//! `create_boot_cache`), `mm/slub.c` (`kmem_cache_alloc`, `kmem_cache_free`,
//! `cache_from_obj`, `kmem_cache_alloc_bulk`, `kmem_cache_free_bulk`,
//! `__kmem_cache_shutdown`, `slab_pre_alloc_hook` (failslab:
//! `fault_inject.rs`), `slab_post_alloc_hook` and `slab_free_hook`
//! (zeroing, init_on_alloc/init_on_free: `mem_init.rs`)), `mm/slab.h`.
//!
//! Modules: `geometry` (layout and order), `cache` (one cache's slabs and
//! per-CPU state), `cache::debug` (slub_debug: checks, repairs, reports,
//! user tracking, validate). The kmemleak hooks (`kmemleak_alloc`,
//! `kmemleak_free`) sit where `slab_post_alloc_hook` and `slab_free_hook`
//! call them.
//!
//! # Invariants
//! - slab-1: `slab_caches` lists each live root cache once, newest first.
//! - slab-2: a cache id maps to one cache for the machine's life (ids are not reused).
//!
//! SIMPLIFICATION: cache descriptors are Rust structures, not objects of the
//! `kmem_cache` cache (which exists, empty, as in /proc/slabinfo), so a
//! freshly booted machine's buddy allocator is untouched.
//!
//! SIMPLIFICATION: `kmem_cache_destroy` is refused (KmmError "busy") while
//! a slab of the cache is being set up, i.e. from the cache's own ctor or
//! racing another CPU's `new_slab`; the kernel would free the cache under
//! that allocation (a use after free).
//!
//! Lock order: `slab_mutex` (cache list) -> per-CPU lock -> node list_lock -> zone lock.
#![forbid(unsafe_code)]

pub mod cache;
pub mod geometry;

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

pub use cache::debug::{Caller, DebugCtx, Track, TRACK_ALLOC, TRACK_FREE};
pub use cache::{Ctor, KmemCache};
use geometry::*;

use crate::error::{KmmError, Result};
use crate::gfp::{self, Gfp};
use crate::machine::{Machine, VirtAddr};
use crate::trace::{CallSite, EventId, Payload};

/// Most caches a machine can create over its life.
pub const MAX_CACHES: usize = 1 << 14;

/// Flags that forbid merging (`SLAB_NEVER_MERGE`).
pub const SLAB_NEVER_MERGE: u32 = SLAB_RED_ZONE
    | SLAB_POISON
    | SLAB_STORE_USER
    | SLAB_TRACE
    | SLAB_TYPESAFE_BY_RCU
    | SLAB_NOLEAKTRACE
    | SLAB_FAILSLAB
    | SLAB_NO_MERGE;
/// Flags that merged caches must share (`SLAB_MERGE_SAME`).
pub const SLAB_MERGE_SAME: u32 = SLAB_RECLAIM_ACCOUNT | SLAB_CACHE_DMA | SLAB_CACHE_DMA32 | SLAB_ACCOUNT;

/// The caches of one machine.
pub struct SlabRegistry {
    caches: Box<[OnceLock<Arc<KmemCache>>]>,
    next_id: AtomicU32,
    /// `slab_mutex` and `slab_caches` (ids, newest first).
    pub list: Mutex<Vec<u32>>,
    pub tunables: SlubTunables,
    /// `slab_nomerge`.
    pub nomerge: bool,
    /// `slub_debug=` (`kmem_cache_flags` applies it to each new cache).
    pub debug: Option<crate::cmdline::SlubDebug>,
    /// Pages the slab layer took from the page allocator for new slabs, and
    /// gave back when it discarded them (warm slabs not counted).
    pub pages_allocated: std::sync::atomic::AtomicU64,
    pub pages_freed: std::sync::atomic::AtomicU64,
    /// Errors slub_debug's checks reported, counted as lib/slub_kunit.c's
    /// `slab_errors` counts them (`slab_add_kunit_errors`).
    pub errors: std::sync::atomic::AtomicU64,
    /// Boot-time `slab.<cache>.*` sysctls whose cache does not exist yet
    /// (sysctl.rs): (cache name, attribute, value), written at its creation.
    pub pending_tunables: Mutex<Vec<(String, crate::sysctl::SlabAttr, u64)>>,
}

/// The arguments of `kmem_cache_create`.
#[derive(Clone, Default)]
pub struct CacheArgs {
    pub align: u32,
    pub flags: u32,
    pub ctor: Option<Ctor>,
    /// `freeptr_offset` for SLAB_TYPESAFE_BY_RCU caches that keep it inside.
    pub freeptr_offset: Option<u32>,
    /// The slab order, as if written to /sys/kernel/slab/<cache>/order
    /// after creation (a recorded cache's order); None: SLUB's choice.
    pub order: Option<u32>,
}

impl SlabRegistry {
    pub fn new(tunables: SlubTunables, nomerge: bool) -> SlabRegistry {
        SlabRegistry {
            debug: None,
            caches: (0..MAX_CACHES).map(|_| OnceLock::new()).collect(),
            next_id: AtomicU32::new(0),
            list: Mutex::new(Vec::new()),
            tunables,
            nomerge,
            pages_allocated: Default::default(),
            pages_freed: Default::default(),
            errors: Default::default(),
            pending_tunables: Mutex::new(Vec::new()),
        }
    }

    /// The cache with this id.
    #[inline]
    pub fn get(&self, id: u32) -> Option<&Arc<KmemCache>> {
        self.caches.get(id as usize)?.get()
    }

    /// Live caches in `slab_caches` order (newest first).
    pub fn caches(&self) -> Vec<Arc<KmemCache>> {
        self.list.lock().iter().filter_map(|&id| self.get(id).cloned()).collect()
    }

    /// A live cache by name.
    pub fn find(&self, name: &str) -> Option<Arc<KmemCache>> {
        self.caches().into_iter().find(|c| c.name == name)
    }
}

/// What `kmem_cache_create` returns: the cache, and whether it is an alias
/// of an existing one.
pub struct Created {
    pub cache: Arc<KmemCache>,
    pub merged: bool,
}

impl Machine {
    fn slub_tunables(cpus: u32, page_size: u32) -> SlubTunables {
        SlubTunables { min_order: 0, max_order: 3, min_objects: 0, nr_cpus: cpus, page_size, word: 8, kasan: false }
    }

    /// A fresh registry for a machine: `slub_min_order=`, `slub_max_order=`,
    /// `slub_min_objects=` and `slub_debug=` from the command line
    /// (`setup_slub_min_order` and friends clamp the orders to
    /// MAX_PAGE_ORDER; min_order raises max_order, as
    /// `setup_slub_min_order` does).
    pub(crate) fn new_slab_registry(cfg: &crate::machine::MachineConfig) -> SlabRegistry {
        let mut t = Self::slub_tunables(cfg.cpus, cfg.page_size);
        t.word = cfg.arch.pointer_bytes();
        let b = &cfg.cmdline;
        t.kasan = b.kasan;
        if let Some(o) = b.slub_max_order {
            t.max_order = o.min(crate::arch::MAX_PAGE_ORDER);
            t.min_order = t.min_order.min(t.max_order);
        }
        if let Some(o) = b.slub_min_order {
            t.min_order = o.min(crate::arch::MAX_PAGE_ORDER);
            t.max_order = t.max_order.max(t.min_order);
        }
        if let Some(n) = b.slub_min_objects {
            t.min_objects = n;
        }
        // The boot parameter, when given, decides; else the config's flag.
        let mut r = SlabRegistry::new(t, b.slab_nomerge.unwrap_or(cfg.slab_nomerge));
        r.debug = b.slub_debug.clone().filter(|d| d.enabled());
        r
    }

    /// `kmem_cache_flags`: the slub_debug flags a cache of this name gets.
    pub(crate) fn kmem_cache_flags(&self, name: &str, flags: u32) -> u32 {
        match &self.slab.debug {
            Some(d) => d.flags_for(name, flags),
            None => flags,
        }
    }

    /// `find_mergeable`: an existing cache this request can share.
    /// `list` is `slab_caches` (the caller holds `slab_mutex`).
    fn find_mergeable(&self, list: &[u32], size: u32, align: u32, flags: u32, a: &CacheArgs) -> Option<Arc<KmemCache>> {
        let r = &self.slab;
        if r.nomerge || a.ctor.is_some() || flags & SLAB_NEVER_MERGE != 0 || a.freeptr_offset.is_some() {
            return None;
        }
        let w = r.tunables.word;
        let size = size.div_ceil(w) * w;
        let align = calculate_alignment(flags, align, size, w);
        let size = size.div_ceil(align) * align;
        // list_for_each_entry_reverse: oldest first.
        for c in list.iter().rev().filter_map(|&id| r.get(id)).cloned() {
            if c.flags & SLAB_NEVER_MERGE != 0 || c.ctor.is_some() || c.dead.load(Relaxed) {
                continue;
            }
            if c.flags & SLAB_KMALLOC != 0 && c.flags & SLAB_NO_MERGE != 0 {
                continue;
            }
            if size > c.geo.size {
                continue;
            }
            if flags & SLAB_MERGE_SAME != c.flags & SLAB_MERGE_SAME {
                continue;
            }
            if c.geo.size & !(align - 1) != c.geo.size {
                continue;
            }
            if c.geo.size - size >= w {
                continue;
            }
            return Some(c);
        }
        None
    }

    /// `kmem_cache_create(name, size, align, flags, ctor)`.
    pub fn kmem_cache_create(&self, name: &str, size: u32, a: CacheArgs) -> Result<Created> {
        if name.is_empty() {
            return Err(KmmError::InvalidArgument("kmem_cache_create: a cache needs a name".into()));
        }
        if size == 0 || size as u64 > crate::kmalloc::KMALLOC_MAX_SIZE {
            return Err(KmmError::InvalidArgument(format!(
                "kmem_cache_create({name}): invalid object size {size} (1 .. {})",
                crate::kmalloc::KMALLOC_MAX_SIZE
            )));
        }
        if a.align != 0 && !a.align.is_power_of_two() {
            return Err(KmmError::InvalidArgument(format!(
                "kmem_cache_create({name}): alignment {} is not a power of two",
                a.align
            )));
        }
        if a.flags & !SLAB_FLAGS_PERMITTED != 0 {
            return Err(KmmError::InvalidArgument(format!(
                "kmem_cache_create({name}): unknown flags {:#x}",
                a.flags & !SLAB_FLAGS_PERMITTED
            )));
        }
        if a.flags & SLAB_CACHE_DMA32 != 0 && a.flags & SLAB_CACHE_DMA != 0 {
            return Err(KmmError::InvalidArgument(format!(
                "kmem_cache_create({name}): SLAB_CACHE_DMA and SLAB_CACHE_DMA32 together"
            )));
        }
        if let Some(off) = a.freeptr_offset {
            if a.flags & SLAB_TYPESAFE_BY_RCU == 0 || off % self.slab.tunables.word != 0 || off + 8 > size {
                return Err(KmmError::InvalidArgument(format!(
                    "kmem_cache_create({name}): freeptr_offset {off} needs SLAB_TYPESAFE_BY_RCU and a word-aligned offset inside the object"
                )));
            }
        }
        self.might_sleep_mutex()?;
        // kmem_cache_flags: slub_debug= adds its flags by cache name.
        let mut flags = self.kmem_cache_flags(name, a.flags);
        let mut list = self.slab.list.lock(); // slab_mutex
        if let Some(c) = self.find_mergeable(&list, size, a.align, flags, &a) {
            c.refcount.fetch_add(1, Relaxed);
            c.merge_size(size);
            c.aliases.lock().push(name.to_string());
            drop(list);
            self.apply_pending_slab_sysctls(name, &c)?;
            return Ok(Created { cache: c, merged: true });
        }
        let t = &self.slab.tunables;
        let align = calculate_alignment(flags, a.align, size, t.word);
        let mut geo = calculate_sizes(size, align, flags, a.ctor.is_some(), a.freeptr_offset, t)?;
        // slub_debug=O (kmem_cache_open, disable_higher_order_debug): no
        // debug metadata where it would make a slot need a higher page order.
        if self.slab.debug.as_ref().is_some_and(|d| d.disable_higher_order)
            && flags & (SLAB_RED_ZONE | SLAB_STORE_USER) != a.flags & (SLAB_RED_ZONE | SLAB_STORE_USER)
            && get_order(geo.size as u64, t.page_size) > get_order(size as u64, t.page_size)
        {
            flags &= !((SLAB_RED_ZONE | SLAB_STORE_USER) & !a.flags);
            geo = calculate_sizes(size, calculate_alignment(flags, a.align, size, t.word), flags, a.ctor.is_some(), a.freeptr_offset, t)?;
        }
        if let Some(order) = a.order {
            geo = with_order(geo, order, t.page_size).ok_or_else(|| {
                KmmError::InvalidArgument(format!(
                    "kmem_cache_create({name}): slab order {order} holds no object of {} bytes (or is above order 3)",
                    geo.size
                ))
            })?;
        }
        let id = self.slab.next_id.fetch_add(1, Relaxed);
        if id as usize >= MAX_CACHES {
            return Err(KmmError::InvalidArgument(format!(
                "kmem_cache_create({name}): more than {MAX_CACHES} caches created on this machine"
            )));
        }
        let cache = Arc::new(KmemCache::new(id, name, geo, flags | (geo.flags & SLAB_OBJECT_POISON), a.ctor, self.cfg.cpus));
        let _ = self.slab.caches[id as usize].set(cache.clone());
        list.insert(0, id);
        drop(list);
        self.apply_pending_slab_sysctls(name, &cache)?;
        Ok(Created { cache, merged: false })
    }

    /// Post-allocation hooks (`slab_post_alloc_hook`): shadow, zeroing,
    /// kmemleak. A kmalloc cache with red zones and user tracking zeroes
    /// only the request (the rest is its kmalloc red zone).
    #[inline]
    fn slab_post_alloc(&self, c: &KmemCache, obj: u64, gfp: Gfp, orig_size: u32) -> u64 {
        let phys = obj - self.cfg.arch.page_offset();
        self.shadow.alloc(phys);
        // "If redzone check is enabled for the extra space, don't zero it".
        let zero_size =
            if c.flags & SLAB_KMALLOC != 0 && c.flags & (SLAB_STORE_USER | SLAB_RED_ZONE) != 0 { orig_size } else { c.object_size() };
        self.slab_init_on_alloc(c, phys, gfp, zero_size);
        if self.kmemleak.enabled && c.flags & SLAB_NOLEAKTRACE == 0 {
            self.kmemleak_alloc(obj, c.object_size() as u64, 1);
        }
        obj
    }

    /// Fix up gfp bits a slab request must not carry (`kmalloc_fix_flags`).
    #[inline]
    pub(crate) fn slab_gfp(&self, gfp: Gfp) -> Gfp {
        if gfp & gfp::GFP_SLAB_BUG_MASK != 0 {
            let fixed = gfp & !gfp::GFP_SLAB_BUG_MASK;
            log_once_unexpected_gfp(gfp, fixed);
            fixed
        } else {
            gfp
        }
    }

    /// `kmem_cache_alloc` without the tracepoint (and no request size).
    #[allow(dead_code)]
    pub(crate) fn kmem_cache_alloc_inner(&self, c: &KmemCache, gfp: Gfp, cpu: Option<u32>) -> Result<u64> {
        self.slab_alloc(c, gfp, cpu, c.object_size(), python_call_site())
    }

    /// `slab_alloc_node` for a request of `orig_size` bytes (kmalloc's
    /// size, else the object size) from `call_site`.
    pub(crate) fn slab_alloc(&self, c: &KmemCache, gfp: Gfp, cpu: Option<u32>, orig_size: u32, call_site: &CallSite) -> Result<u64> {
        if c.dead.load(Relaxed) {
            return Err(KmmError::UseAfterFree(format!("kmem_cache_alloc: cache {} was destroyed", c.name)));
        }
        let gfp = self.slab_gfp(gfp);
        self.might_alloc(gfp, "mm/slub.c (slab_pre_alloc_hook -> might_alloc)")?;
        self.should_failslab(c, gfp)?;
        let obj = if c.is_debug() {
            // The caller (it may call into Python) before any slab lock.
            let ctx = DebugCtx { orig_size, caller: self.slab_caller(c, call_site) };
            let _ = cpu.unwrap_or_else(|| self.run_cpu());
            let _d = self.trace.defer();
            c.alloc_debug(self, gfp, &ctx)?
        } else {
            let cpu = cpu.unwrap_or_else(|| self.run_cpu());
            c.alloc_raw(self, gfp, cpu)?
        };
        Ok(self.slab_post_alloc(c, obj, gfp, orig_size))
    }

    /// `kmem_cache_alloc(s, gfp)`.
    pub fn kmem_cache_alloc(&self, c: &KmemCache, gfp: Gfp, call_site: &CallSite) -> Result<VirtAddr> {
        let obj = self.slab_alloc(c, gfp, None, c.object_size(), call_site);
        if let Ok(o) = obj {
            self.kasan_slab_alloc(c, o, gfp, Some(call_site));
        }
        if self.trace.on(EventId::KmemCacheAlloc) {
            self.trace.emit(
                self.this_cpu(),
                Payload::KmemCacheAlloc {
                    call_site: call_site.clone(),
                    ptr: *obj.as_ref().unwrap_or(&0),
                    name: c.name.clone().into(),
                    bytes_req: c.object_size() as u64,
                    bytes_alloc: c.geo.size as u64,
                    gfp_flags: gfp,
                    node: -1,
                    accounted: c.flags & SLAB_ACCOUNT != 0 || gfp & gfp::__GFP_ACCOUNT != 0,
                },
            );
        }
        obj.map(VirtAddr)
    }

    /// Classify `va` as an object of cache `c` that may be freed.
    /// `check_slab_free` once the object is located.
    #[inline]
    pub(crate) fn check_slab_free_at(&self, c: &KmemCache, o: cache::ObjRef, va: u64) -> Result<cache::ObjRef> {
        // slab_free_hook -> kasan_slab_pre_free: KASAN sees a double free first.
        self.kasan_slab_pre_free(c, va)?;
        let phys = va - self.cfg.arch.page_offset();
        let sh = self.shadow.get(phys);
        if sh & crate::shadow::LIVE == 0 {
            c.report_double_free(self, &o, va);
            return Err(KmmError::DoubleFree(format!(
                "BUG {} (Not tainted): Object already free: double free or corruption of {va:#x}",
                c.name
            )));
        }
        if sh & crate::shadow::PINNED != 0 {
            return Err(KmmError::BufferBusy(format!(
                "cannot free {va:#x}: a buffer export (memoryview) of it is alive"
            )));
        }
        if c.is_debug() {
            // Out of line (slab/debug.rs): only debug caches pay the call.
            c.free_debug_check(self, &o, va)?;
        }
        Ok(o)
    }

    /// Free an object already checked with `check_slab_free` (`slab_free`:
    /// `slab_free_hook`'s kmemleak_free and init_on_free memset; with KASAN
    /// the object goes to the quarantine instead, `kasan_slab_free`).
    pub(crate) fn slab_free_checked(&self, c: &KmemCache, o: &cache::ObjRef, va: u64, cpu: u32, call_site: &CallSite) {
        if self.kmemleak.enabled {
            self.kmemleak_free(va);
        }
        self.shadow.free(va - self.cfg.arch.page_offset());
        self.slab_init_on_free(c, va - self.cfg.arch.page_offset());
        if self.kasan_slab_free(c, o, va, Some(call_site)) {
            return;
        }
        if c.is_debug() {
            let caller = self.slab_caller(c, call_site);
            let _d = self.trace.defer();
            c.free_to_partial_list(self, o, va, caller.as_ref());
        } else {
            c.free_raw(self, o, va, cpu);
        }
    }

    /// The cache a slab object belongs to (`virt_to_cache`), if it is one.
    pub fn virt_to_cache(&self, va: u64) -> Option<&Arc<KmemCache>> {
        self.virt_to_slab(va).map(|(_, c)| c)
    }

    /// The head page of the slab holding `va`, and its cache.
    #[inline]
    pub(crate) fn virt_to_slab(&self, va: u64) -> Option<(u64, &Arc<KmemCache>)> {
        let pfn = self.virt_to_pfn(VirtAddr(va)).ok()?;
        let head = self.compound_head(pfn).0;
        let p = self.mem_map.get(head);
        if !p.has(crate::page::PG_SLAB) {
            return None;
        }
        Some((head, self.slab.get(p.refcount() as u32)?))
    }

    /// `kmem_cache_free(s, obj)`; with `cache_from_obj`'s wrong-cache check.
    pub fn kmem_cache_free(&self, c: &KmemCache, va: VirtAddr, call_site: &CallSite) -> Result<()> {
        let o = match self.virt_to_slab(va.0) {
            Some((head, owner)) => {
                if owner.id != c.id {
                    return Err(KmmError::InvalidFree(format!(
                        "kmem_cache_free: Wrong slab cache. {} but object is from {}",
                        c.name, owner.name
                    )));
                }
                // check_slab_allocation: not an object's start.
                c.locate_at(self, head, va.0).map_err(|e| self.kasan_invalid_free(va.0, e))?
            }
            None => c.locate(self, va.0)?,
        };
        let o = self.check_slab_free_at(c, o, va.0)?;
        if self.trace.on(EventId::KmemCacheFree) {
            self.trace.emit(
                self.this_cpu(),
                Payload::KmemCacheFree { call_site: call_site.clone(), ptr: va.0, name: c.name.clone().into() },
            );
        }
        self.slab_free_checked(c, &o, va.0, self.run_cpu(), call_site);
        Ok(())
    }

    /// `kmem_cache_alloc_bulk`: `n` objects or none (objects already taken
    /// are freed on failure). No per-object tracepoint, as in the kernel.
    pub fn kmem_cache_alloc_bulk(&self, c: &KmemCache, gfp: Gfp, n: usize, out: &mut Vec<u64>) -> Result<()> {
        if c.dead.load(Relaxed) {
            return Err(KmmError::UseAfterFree(format!("kmem_cache_alloc_bulk: cache {} was destroyed", c.name)));
        }
        let gfp = self.slab_gfp(gfp);
        self.might_alloc(gfp, "mm/slub.c (slab_pre_alloc_hook -> might_alloc)")?;
        // More objects than all of RAM holds can never be had: fail before
        // taking any (and before sizing a host buffer for them).
        let slots = self.totalram_pages().saturating_mul(self.page_size) / c.geo.size.max(1) as u64;
        if n as u64 > slots {
            return Err(KmmError::OutOfMemory {
                order: c.geo.order,
                gfp,
                message: format!(
                    "SLUB: Unable to allocate memory on node -1, gfp={gfp:#x}({})\n  cache: {}: kmem_cache_alloc_bulk \
                     of {n} objects of {} bytes, more than all of RAM ({} pages) holds",
                    gfp::format_pgg(gfp),
                    c.name,
                    c.geo.size,
                    self.totalram_pages()
                ),
            });
        }
        if n > 0 {
            self.should_failslab(c, gfp)?;
        }
        let start = out.len();
        if out.try_reserve(n).is_err() {
            return Err(KmmError::Host(format!(
                "kmem_cache_alloc_bulk: the host cannot allocate an array of {n} object addresses"
            )));
        }
        let ctx = DebugCtx { orig_size: c.object_size(), caller: self.slab_caller(c, python_call_site()) };
        let cpu = self.run_cpu();
        let since = self.slab.pages_allocated.load(Relaxed);
        if let Err(e) = c.alloc_bulk_raw(self, gfp, cpu, n, out, &ctx) {
            // All or nothing: what was taken goes back.
            let got: Vec<(u64, cache::ObjRef)> =
                out[start..].iter().filter_map(|&o| c.locate(self, o).ok().map(|r| (o, r))).collect();
            c.free_bulk_raw(self, &got, cpu, None);
            out.truncate(start);
            c.discard_new_empty(self, cpu, since);
            return Err(e);
        }
        let po = self.cfg.arch.page_offset();
        let leak = self.kmemleak.enabled && c.flags & SLAB_NOLEAKTRACE == 0;
        for &o in &out[start..] {
            self.shadow.alloc(o - po);
            self.slab_init_on_alloc(c, o - po, gfp, c.object_size());
            if leak {
                self.kmemleak_alloc(o, c.object_size() as u64, 1);
            }
        }
        self.kasan_slab_alloc_bulk(c, &out[start..], gfp);
        Ok(())
    }

    /// `kmem_cache_free_bulk`: every object is checked first (a duplicate in
    /// the array is a double free); if any is bad nothing is freed.
    pub fn kmem_cache_free_bulk(&self, c: &KmemCache, objs: &[u64]) -> Result<()> {
        let po = self.cfg.arch.page_offset();
        let mut refs = Vec::with_capacity(objs.len());
        let mut fail = None;
        for &o in objs {
            let r = match self.virt_to_slab(o) {
                Some((_, owner)) if owner.id != c.id => Err(KmmError::InvalidFree(format!(
                    "kmem_cache_free_bulk: Wrong slab cache. {} but object {o:#x} is from {}",
                    c.name, owner.name
                ))),
                Some((head, _)) => c.locate_at(self, head, o).map_err(|e| self.kasan_invalid_free(o, e)),
                None => c.locate(self, o),
            }
            .and_then(|r| self.check_slab_free_at(c, r, o));
            match r {
                Ok(r) => {
                    // Marked free now, so a duplicate later in the array is caught.
                    self.shadow.free(o - po);
                    refs.push((o, r));
                }
                Err(e) => {
                    fail = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = fail {
            for (o, _) in &refs {
                self.shadow.revive(o - po);
            }
            return Err(e);
        }
        if self.kmemleak.enabled {
            for (o, _) in &refs {
                self.kmemleak_free(*o);
            }
        }
        if self.slab_want_init_on_free(c) {
            for (o, _) in &refs {
                self.slab_init_on_free(c, o - po);
            }
        }
        // KASAN quarantines what it poisons (slab_free_freelist_hook).
        let refs = self.kasan_slab_free_bulk(c, refs);
        let caller = self.slab_caller(c, python_call_site());
        c.free_bulk_raw(self, &refs, self.run_cpu(), caller.as_ref());
        Ok(())
    }

    /// `kmem_cache_shrink`: flush CPU slabs and give empty slabs back.
    /// Returns the pages freed.
    pub fn kmem_cache_shrink(&self, c: &KmemCache) -> Result<u64> {
        let _d = self.trace.defer(); // page events under slab_mutex
        self.might_sleep_mutex()?;
        self.kasan_quarantine_remove_cache(c); // kasan_cache_shrink
        let _l = self.slab.list.lock();
        Ok(c.shrink(self))
    }

    /// `mutex_lock(&slab_mutex)` may sleep.
    fn might_sleep_mutex(&self) -> Result<()> {
        self.cpus.might_sleep("kernel/locking/mutex.c (mutex_lock)").map_err(KmmError::SleepInAtomic)
    }

    /// `kmem_cache_destroy`: drop a reference; the last one shuts the cache
    /// down. A cache with objects still allocated is kept (and usable), with
    /// the kernel's report as the error.
    pub fn kmem_cache_destroy(&self, c: &KmemCache) -> Result<()> {
        self.kmem_cache_destroy_alias(c, None)
    }

    /// `kmem_cache_destroy` of the handle `kmem_cache_create(alias, ...)`
    /// returned when it was merged into `c`: drops that alias (its name
    /// leaves `c.aliases`); None drops the reference of `c`'s own name.
    /// The cache goes when the last reference does.
    pub fn kmem_cache_destroy_alias(&self, c: &KmemCache, alias: Option<&str>) -> Result<()> {
        let _d = self.trace.defer(); // page events under slab_mutex
        self.might_sleep_mutex()?;
        let mut list = self.slab.list.lock();
        if c.dead.load(Relaxed) {
            return Err(KmmError::UseAfterFree(format!(
                "kmem_cache_destroy: cache {} was already destroyed",
                c.name
            )));
        }
        if c.refcount.load(Relaxed) > 1 {
            let mut names = c.aliases.lock();
            match alias.map(|a| names.iter().rposition(|n| n == a)) {
                Some(None) => {
                    return Err(KmmError::UseAfterFree(format!(
                        "kmem_cache_destroy: {} (merged into {}) was already destroyed",
                        alias.unwrap_or_default(),
                        c.name
                    )))
                }
                Some(Some(i)) => {
                    names.remove(i);
                }
                // The original name's reference: the aliases live on.
                None => {}
            }
            c.refcount.fetch_sub(1, Relaxed);
            return Ok(());
        }
        if let Some(a) = alias {
            // The last reference through an alias handle whose name is gone.
            if !c.aliases.lock().iter().any(|n| n == a) {
                return Err(KmmError::UseAfterFree(format!(
                    "kmem_cache_destroy: {a} (merged into {}) was already destroyed",
                    c.name
                )));
            }
        }
        // kasan_cache_shutdown: quarantined objects go back first (they
        // were freed already: flushing them changes nothing a caller sees).
        self.kasan_quarantine_remove_cache(c);
        // Live objects refuse the destroy before anything else moves (the
        // kernel shrinks first, then complains; a refused call here
        // changes nothing).
        if c.setting_up.load(Relaxed) > 0 {
            // A slab of this cache is being set up: its ctor is running
            // (here, on this thread, if the ctor destroys its own cache).
            // The kernel would free the cache under the allocation (a use
            // after free); kmm refuses and changes nothing.
            return Err(KmmError::Busy(format!(
                "kmem_cache_destroy {}: a slab of the cache is being set up (called from the cache's constructor?)",
                c.name
            )));
        }
        let inuse = c.objects_in_use(self);
        if inuse > 0 {
            // free_partial -> list_slab_objects: the report (into the log).
            c.list_slab_objects(self);
            let msg = format!(
                "kmem_cache_destroy {}: Slab cache still has objects when called from {} ({inuse} objects remaining on __kmem_cache_shutdown())",
                c.name, "kmm"
            );
            self.printk([msg.clone()]);
            return Err(KmmError::Busy(msg));
        }
        c.shrink(self);
        // Any slabs left are empty ones kept for min_partial: free them all.
        {
            let n = c.node.lock();
            debug_assert!(n.slabs.iter().flatten().all(|s| s.inuse == 0));
        }
        c.release_all_slabs(self);
        c.dead.store(true, Relaxed);
        list.retain(|&id| id != c.id);
        Ok(())
    }

    /// Run `f`; if it fails, give back the empty slabs it made (in every
    /// cache), so that a refused call changes no accounting: a failed
    /// vmalloc or bulk allocation leaves no slab pages behind. Returns
    /// what `f` returned.
    pub fn refused_changes_nothing<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let since = self.slab.pages_allocated.load(Relaxed);
        let r = f();
        if r.is_err() && self.slab.pages_allocated.load(Relaxed) != since {
            let cpu = self.this_cpu();
            for c in self.slab.caches() {
                c.discard_new_empty(self, cpu, since);
            }
        }
        r
    }

    /// Invariants of every cache.
    pub fn check_slab(&self) -> Vec<String> {
        let mut errs = Vec::new();
        for c in self.slab.caches() {
            errs.extend(c.check(self));
        }
        errs
    }
}

/// The call site of a request that came without one (the binding's
/// placeholder for "the Python caller"; the stack says who).
pub(crate) fn python_call_site() -> &'static CallSite {
    static CS: OnceLock<CallSite> = OnceLock::new();
    CS.get_or_init(|| Arc::from("python"))
}

fn log_once_unexpected_gfp(gfp: Gfp, fixed: Gfp) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!(
            "Unexpected gfp: {:#x} ({}). Fixing up to gfp: {:#x} ({}). Fix your code!",
            gfp & gfp::GFP_SLAB_BUG_MASK,
            gfp::format_pgg(gfp & gfp::GFP_SLAB_BUG_MASK),
            fixed,
            gfp::format_pgg(fixed)
        )
    });
}
