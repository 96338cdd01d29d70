//! One `kmem_cache`: its slabs, the per-CPU active slab and freelist (the
//! fast path), per-CPU partial slabs, and the node partial list.
//!
//! # Kernel
//! `mm/slub.c` (6.8 - 6.17, before sheaves): `slab_alloc_node`,
//! `___slab_alloc`, `get_freelist`, `get_partial_node`, `put_cpu_partial`,
//! `__put_partials`, `deactivate_slab`, `do_slab_free`, `__slab_free`,
//! `discard_slab`, `allocate_slab`, `setup_object`, `__kmem_cache_shrink`,
//! `alloc_single_from_partial`, `free_to_partial_list` (debug caches),
//! `check_object`, `init_object`; `include/linux/poison.h`.
//!
//! # Slab states
//! ```text
//!   state              frozen  on list          freelist of the slab
//!   cpu slab           yes     none (c->slab)   remote frees only; c->freelist has the rest
//!   cpu partial        no      c->partial       its free objects
//!   node partial       no      n->partial       its free objects
//!   full               no      none             empty
//!   empty -> discarded when nr_partial >= min_partial, else kept on n->partial
//! ```
//!
//! `min_partial`, `cpu_partial` and `cpu_partial_slabs` start as
//! kmem_cache_open computed them (`geo`) and live in the cache as atomics:
//! /sys/kernel/slab/<cache>/{min_partial,cpu_partial} (kmm's
//! `slab.<cache>.*` sysctls, sysctl.rs) rewrite them at run time.
//!
//! SIMPLIFICATION: the kernel updates a slab's (freelist, counters) with
//! cmpxchg_double and takes `list_lock` only when a list changes; kmm's slow
//! paths always take `list_lock`, which serialises the same transitions. The
//! per-CPU state is guarded by a per-CPU lock (the kernel's
//! `local_lock`/preempt-disable), uncontended unless two threads share a CPU
//! or a flush reaches over from another CPU. No freelist randomisation or
//! pointer hardening: objects are handed out in address order, free pointers
//! are stored plain. Debug caches (slub_debug, SLAB_* debug flags) are
//! `debug.rs`. A corrupt free pointer met on the per-CPU fast path (where a
//! kernel without slub_debug would follow it and oops) refuses the
//! allocation with the kernel's "Freepointer corrupt" report and cuts the
//! chain there, as `check_object` repairs it: the objects behind are lost.
//!
//! # Invariants (checked by `KmemCache::check`)
//! - slub-1: every slab's `inuse` equals its objects minus its free objects
//!   (free = on its freelist, plus on a CPU freelist for the cpu slab).
//! - slub-2: a slab is on at most one list and `nr_partial` counts the node list.
//! - slub-3: free pointers stay inside their slab, on object boundaries.
//! - slub-4: a live object is marked live in the shadow; a free one is not.
//! - slub-5: an isolated (frozen) debug slab is full and on no list.
//!
//! Lock order: per-CPU lock -> node `list_lock` -> zone lock (through the
//! page allocator). `ctor` callbacks run with no lock held, while the
//! cache counts the slab as `setting_up` (a destroy is refused then). The per-CPU
//! lock and `list_lock` come through `crate::sync`: `tests/loom.rs` runs
//! this code's remote free (`__slab_free` into another CPU's frozen slab,
//! racing that CPU's fast path and refill) under loom.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

// slub_debug lives beside the cache it checks (it reaches the slab table
// and the free-pointer helpers).
#[path = "debug.rs"]
pub mod debug;
use debug::{Caller, DebugCtx, Report};

use parking_lot::Mutex;

use crate::sync::{ListLock, SpinGuard as MutexGuard, SpinLock};

use super::geometry::*;
use crate::error::{KmmError, Result};
use crate::gfp::{self, Gfp};
use crate::machine::{Machine, VirtAddr};
use crate::page::{Pfn, PG_SLAB};

/// An object constructor (`ctor`), called with each object's address when its
/// slab is set up.
pub type Ctor = Arc<dyn Fn(VirtAddr) + Send + Sync>;

pub const POISON_INUSE: u8 = 0x5a;
pub const POISON_FREE: u8 = 0x6b;
pub const POISON_END: u8 = 0xa5;
pub const SLUB_RED_INACTIVE: u8 = 0xbb;
pub const SLUB_RED_ACTIVE: u8 = 0xcc;

const NIL: u32 = u32::MAX;

/// Where a slab is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlabList {
    /// Full, or being set up: on no list.
    None,
    /// The active slab of a CPU (frozen).
    Cpu(u32),
    /// On a CPU's partial list.
    CpuPartial(u32),
    /// On the node partial list.
    NodePartial,
}

/// `struct slab`, kept beside the page metadata (indexed by slab id).
#[derive(Clone, Debug)]
pub struct Slab {
    pub pfn: u64,
    pub order: u32,
    pub objects: u32,
    pub inuse: u32,
    /// First free object (virtual address), 0 = none.
    pub freelist: u64,
    pub list: SlabList,
    /// A debug cache's slab isolated after a failed consistency check
    /// (`slab->frozen` reused as the kernel does): full, on no list, for good.
    pub frozen: bool,
    prev: u32,
    next: u32,
    /// `SlabRegistry::pages_allocated` just after this slab's pages were
    /// taken (0 for a warm slab): which slabs a call made (`discard_new_empty`).
    pub born: u64,
}

/// Per-CPU slab state (`struct kmem_cache_cpu`).
#[derive(Debug)]
pub struct CpuSlab {
    /// Lockless-in-the-kernel freelist of the cpu slab (virtual address), 0 = empty.
    pub freelist: u64,
    /// The cpu slab's id, NIL = none.
    pub slab: u32,
    /// Its pfn (for the free fast path's "is it my slab" test).
    pub slab_pfn: u64,
    /// Address of its first object and one past its last (free-pointer checks).
    pub slab_base: u64,
    pub slab_end: u64,
    pub tid: u64,
    /// Per-CPU partial slabs, most recently added last.
    pub partial: Vec<u32>,
    pub stats: CpuStats,
}

/// CONFIG_SLUB_STATS-style counters, per CPU (summed for display).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuStats {
    pub alloc_fastpath: u64,
    pub alloc_slowpath: u64,
    pub free_fastpath: u64,
    pub free_slowpath: u64,
    pub alloc_refill: u64,
    pub alloc_from_partial: u64,
    pub cpu_partial_alloc: u64,
    pub cpu_partial_free: u64,
    pub cpu_partial_node: u64,
    pub cpu_partial_drain: u64,
    pub alloc_slab: u64,
    pub free_slab: u64,
    pub free_frozen: u64,
    /// Frees of objects whose slab is another CPU's active slab (cross-CPU).
    pub free_remote: u64,
    pub deactivate_full: u64,
    pub deactivate_empty: u64,
    pub order_fallback: u64,
}

impl CpuStats {
    fn add(&mut self, o: &CpuStats) {
        macro_rules! s {
            ($($f:ident),*) => { $( self.$f += o.$f; )* };
        }
        s!(alloc_fastpath, alloc_slowpath, free_fastpath, free_slowpath, alloc_refill, alloc_from_partial,
           cpu_partial_alloc, cpu_partial_free, cpu_partial_node, cpu_partial_drain, alloc_slab, free_slab,
           free_frozen, free_remote, deactivate_full, deactivate_empty, order_fallback);
    }
}

/// `struct kmem_cache_node`: what `list_lock` protects.
#[derive(Debug, Default)]
pub struct Node {
    pub slabs: Vec<Option<Slab>>,
    free_ids: Vec<u32>,
    partial_head: u32,
    partial_tail: u32,
    pub nr_partial: u32,
    pub nr_slabs: u64,
    pub total_objects: u64,
}

/// A per-CPU lock padded to its own cache line: a spin lock (one CAS to
/// take, a plain release store to drop), never held across a callback.
#[repr(align(64))]
pub struct PerCpu {
    pub lock: SpinLock<CpuSlab>,
    /// Times this CPU's lock was found held (two threads on one CPU, or a flush).
    pub contended: AtomicU64,
}

/// `struct kmem_cache`.
pub struct KmemCache {
    pub id: u32,
    pub name: String,
    pub geo: Geometry,
    /// Flags as created (plus SLAB_OBJECT_POISON when resolved).
    pub flags: u32,
    pub ctor: Option<Ctor>,
    /// Page-allocator flags every slab of this cache adds (`s->allocflags`).
    pub allocflags: Gfp,
    cpus: Box<[PerCpu]>,
    pub node: ListLock<Node>,
    /// `refcount`: 1 + aliases merged into this cache.
    pub refcount: AtomicU32,
    pub dead: AtomicBool,
    /// Slabs between `new_slab`'s page allocation and their linking into
    /// the node (ctors run then, with no lock held): `kmem_cache_destroy`
    /// refuses while any is (a ctor destroying its own cache would
    /// otherwise leave that slab in a dead cache).
    pub(crate) setting_up: AtomicU32,
    /// Names of the caches merged into this one.
    pub aliases: Mutex<Vec<String>>,
    /// `s->object_size` as raised by merges (`__kmem_cache_alias`).
    object_size: AtomicU32,
    /// `s->min_partial`, `s->cpu_partial` and `s->cpu_partial_slabs` as
    /// /sys/kernel/slab/<cache>/{min_partial,cpu_partial} may rewrite them
    /// (`geo` keeps what kmem_cache_open computed).
    min_partial: AtomicU64,
    cpu_partial: AtomicU32,
    cpu_partial_slabs: AtomicU32,
}

/// Result of classifying an address for a free.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ObjRef {
    pub slab_id: u32,
    pub slab_pfn: u64,
}

impl KmemCache {
    pub fn new(id: u32, name: &str, geo: Geometry, flags: u32, ctor: Option<Ctor>, ncpus: u32) -> KmemCache {
        let mut allocflags = gfp::__GFP_COMP;
        if flags & SLAB_CACHE_DMA != 0 {
            allocflags |= gfp::GFP_DMA;
        }
        if flags & SLAB_CACHE_DMA32 != 0 {
            allocflags |= gfp::GFP_DMA32;
        }
        if flags & SLAB_RECLAIM_ACCOUNT != 0 {
            allocflags |= gfp::__GFP_RECLAIMABLE;
        }
        KmemCache {
            id,
            name: name.to_string(),
            flags: geo.flags,
            geo,
            ctor,
            allocflags,
            cpus: (0..ncpus)
                .map(|_| PerCpu {
                    lock: SpinLock::new(CpuSlab {
                        freelist: 0,
                        slab: NIL,
                        slab_pfn: u64::MAX,
                        slab_base: 0,
                        slab_end: 0,
                        tid: 0,
                        partial: Vec::new(),
                        stats: CpuStats::default(),
                    }),
                    contended: AtomicU64::new(0),
                })
                .collect(),
            node: ListLock::new(Node { partial_head: NIL, partial_tail: NIL, ..Node::default() }),
            refcount: AtomicU32::new(1),
            dead: AtomicBool::new(false),
            setting_up: AtomicU32::new(0),
            aliases: Mutex::new(Vec::new()),
            object_size: AtomicU32::new(geo.object_size),
            min_partial: AtomicU64::new(geo.min_partial as u64),
            cpu_partial: AtomicU32::new(geo.cpu_partial),
            cpu_partial_slabs: AtomicU32::new(geo.cpu_partial_slabs),
        }
    }

    /// `s->object_size`: the created size, raised by merged requests.
    #[inline]
    pub fn object_size(&self) -> u32 {
        self.object_size.load(Relaxed)
    }

    /// `__kmem_cache_alias`: a merged request of `size` bytes.
    pub(crate) fn merge_size(&self, size: u32) {
        self.object_size.fetch_max(size, Relaxed);
    }

    /// Debug caches skip the per-CPU fast paths (`kmem_cache_debug`).
    #[inline]
    pub fn is_debug(&self) -> bool {
        self.flags & SLAB_DEBUG_FLAGS != 0
    }

    /// `kmem_cache_has_cpu_partial` (CONFIG_SLUB_CPU_PARTIAL=y): every
    /// cache but a debug one, whatever its cpu_partial.
    #[inline]
    fn has_cpu_partial(&self) -> bool {
        !self.is_debug()
    }

    /// `s->min_partial`: empty slabs a node keeps on its partial list.
    #[inline]
    pub fn min_partial(&self) -> u64 {
        self.min_partial.load(Relaxed)
    }

    /// `s->cpu_partial` (objects) and `s->cpu_partial_slabs`.
    #[inline]
    pub fn cpu_partial(&self) -> (u32, u32) {
        (self.cpu_partial.load(Relaxed), self.cpu_partial_slabs.load(Relaxed))
    }

    /// `min_partial_store`: any unsigned long, no clamp (mm/slub.c).
    pub fn set_min_partial(&self, min: u64) {
        self.min_partial.store(min, Relaxed);
    }

    /// `cpu_partial_store`: EINVAL for a non-zero count on a cache without
    /// cpu partial lists; else `slub_set_cpu_partial` (cpu_partial_slabs =
    /// DIV_ROUND_UP(objects * 2, oo_objects)) and `flush_all`.
    pub fn set_cpu_partial(&self, m: &Machine, objects: u32) -> Result<()> {
        if objects != 0 && !self.has_cpu_partial() {
            return Err(KmmError::InvalidArgument(format!(
                "/sys/kernel/slab/{}/cpu_partial: {objects}: Invalid argument (a debug cache has no cpu partial lists)",
                self.name
            )));
        }
        let per_slab = self.geo.objects.max(1);
        self.cpu_partial.store(objects, Relaxed);
        self.cpu_partial_slabs.store(((objects as u64 * 2).div_ceil(per_slab as u64)) as u32, Relaxed);
        for cpu in 0..self.cpus.len() as u32 {
            self.flush_cpu(m, cpu);
        }
        Ok(())
    }

    /// Lock this CPU's slab state, counting contention.
    #[inline]
    pub(crate) fn cpu_lock(&self, cpu: u32) -> MutexGuard<'_, CpuSlab> {
        let p = &self.cpus[cpu as usize];
        match p.lock.try_lock() {
            Some(g) => g,
            None => {
                p.contended.fetch_add(1, Relaxed);
                p.lock.lock()
            }
        }
    }

    pub fn nr_cpus(&self) -> u32 {
        self.cpus.len() as u32
    }

    /// Contention counts of the per-CPU locks (what proves no shared lock on the fast path).
    pub fn cpu_contention(&self) -> Vec<u64> {
        self.cpus.iter().map(|p| p.contended.load(Relaxed)).collect()
    }

    /// Sum of every CPU's counters.
    pub fn stats(&self) -> CpuStats {
        let mut t = CpuStats::default();
        for p in self.cpus.iter() {
            t.add(&p.lock.lock().stats);
        }
        t
    }

    /// Bytes the user may use in an object (`slab_ksize`).
    pub fn ksize(&self) -> u32 {
        if self.flags & (SLAB_RED_ZONE | SLAB_POISON | SLAB_KASAN) != 0 {
            self.object_size()
        } else if self.flags & (SLAB_TYPESAFE_BY_RCU | SLAB_STORE_USER) != 0 {
            self.geo.inuse
        } else {
            self.geo.size
        }
    }

    // ---- slab table (under list_lock) --------------------------------------------

    fn new_slab_id(n: &mut Node, slab: Slab) -> u32 {
        if let Some(id) = n.free_ids.pop() {
            n.slabs[id as usize] = Some(slab);
            id
        } else {
            n.slabs.push(Some(slab));
            (n.slabs.len() - 1) as u32
        }
    }

    fn slab_mut(n: &mut Node, id: u32) -> &mut Slab {
        n.slabs[id as usize].as_mut().expect("live slab id")
    }

    /// `add_partial`: to the head or the tail of the node list.
    fn add_partial(n: &mut Node, id: u32, tail: bool) {
        let (h, t) = (n.partial_head, n.partial_tail);
        {
            let s = Self::slab_mut(n, id);
            debug_assert_eq!(s.list, SlabList::None);
            s.list = SlabList::NodePartial;
            if h == NIL {
                s.prev = NIL;
                s.next = NIL;
            } else if tail {
                s.prev = t;
                s.next = NIL;
            } else {
                s.prev = NIL;
                s.next = h;
            }
        }
        if h == NIL {
            n.partial_head = id;
            n.partial_tail = id;
        } else if tail {
            Self::slab_mut(n, t).next = id;
            n.partial_tail = id;
        } else {
            Self::slab_mut(n, h).prev = id;
            n.partial_head = id;
        }
        n.nr_partial += 1;
    }

    /// `remove_partial`: O(1) unlink.
    fn remove_partial(n: &mut Node, id: u32) {
        let (prev, next) = {
            let s = Self::slab_mut(n, id);
            debug_assert_eq!(s.list, SlabList::NodePartial);
            s.list = SlabList::None;
            (s.prev, s.next)
        };
        if prev == NIL {
            n.partial_head = next;
        } else {
            Self::slab_mut(n, prev).next = next;
        }
        if next == NIL {
            n.partial_tail = prev;
        } else {
            Self::slab_mut(n, next).prev = prev;
        }
        n.nr_partial -= 1;
    }

    /// Node partial slab ids, head first.
    pub fn partial_ids(n: &Node) -> Vec<u32> {
        let mut v = Vec::new();
        let mut p = n.partial_head;
        while p != NIL {
            v.push(p);
            p = n.slabs[p as usize].as_ref().map_or(NIL, |s| s.next);
        }
        v
    }

    // ---- object addresses -----------------------------------------------------------

    #[inline]
    fn slab_base(&self, m: &Machine, pfn: u64) -> u64 {
        m.cfg.arch.page_offset() + (pfn << m.page_shift) + self.geo.red_left_pad as u64
    }

    #[inline]
    fn phys_of(m: &Machine, va: u64) -> u64 {
        va - m.cfg.arch.page_offset()
    }

    #[inline]
    fn get_fp(&self, m: &Machine, obj: u64) -> u64 {
        let at = Self::phys_of(m, obj) + self.geo.offset as u64;
        if m.cfg.arch.is_64bit() {
            m.phys.read_u64(at).unwrap_or(0)
        } else {
            // A 32-bit kernel's free pointer is 4 bytes (sizeof(void *)).
            let mut b = [0u8; 4];
            let _ = m.phys.read(at, &mut b);
            u32::from_ne_bytes(b) as u64
        }
    }

    #[inline]
    fn set_fp(&self, m: &Machine, obj: u64, next: u64) {
        let at = Self::phys_of(m, obj) + self.geo.offset as u64;
        if m.cfg.arch.is_64bit() {
            let _ = m.phys.write_u64(at, next);
        } else {
            let _ = m.phys.write(at, &(next as u32).to_ne_bytes());
        }
    }

    /// Is `next` a valid free pointer inside the slab at `pfn` (or 0)?
    #[inline]
    fn fp_ok(&self, m: &Machine, pfn: u64, order: u32, next: u64) -> bool {
        let base = self.slab_base(m, pfn);
        let end = base + self.objects_in(m, order) as u64 * self.geo.size as u64;
        self.fp_in(base, end, next)
    }

    /// `fp_ok` against a known slab range (the cpu slab's, on the fast path).
    #[inline]
    fn fp_in(&self, base: u64, end: u64, next: u64) -> bool {
        next == 0 || (next >= base && next < end && self.geo.index_of(next - base).is_some())
    }

    /// Objects in a slab of `order` (`s->oo` or, after a fallback, `s->min`).
    #[inline]
    fn objects_in(&self, m: &Machine, order: u32) -> u32 {
        if order == self.geo.order {
            self.geo.objects
        } else if order == self.geo.min_order {
            self.geo.min_objects
        } else {
            ((m.page_size << order) / self.geo.size as u64) as u32
        }
    }

    /// Make `id` (at `pfn`, of `order`) the cpu slab.
    #[inline]
    fn install_cpu_slab(&self, m: &Machine, c: &mut CpuSlab, id: u32, pfn: u64, order: u32) {
        c.slab = id;
        c.slab_pfn = pfn;
        c.slab_base = self.slab_base(m, pfn);
        c.slab_end = c.slab_base + self.objects_in(m, order) as u64 * self.geo.size as u64;
    }

    /// A corrupt free pointer met on the per-CPU fast path: the kernel's
    /// report (`object_err(.., "Freepointer corrupt")`, into the log too),
    /// and `check_object`'s repair: the pointer is zapped, so `obj` stays the
    /// last free object of the CPU freelist and the objects behind it are
    /// lost (counted in use). Called with the CPU lock held (node lock next).
    fn freepointer_corrupt(&self, m: &Machine, slab_id: u32, obj: u64, next: u64) -> KmmError {
        let mut rep = Report::new(m);
        {
            let n = self.node.lock();
            if let Some(s) = n.slabs.get(slab_id as usize).and_then(|s| s.as_ref()) {
                let snap = s.clone();
                self.report_freepointer(m, &mut rep, &snap, obj);
            }
        }
        self.set_fp(m, obj, 0);
        let text = rep.flush();
        KmmError::MemoryCorruption(format!(
            "{text}\n(object {obj:#x} pointed to {next:#x}, outside its slab: a write to freed memory? \
             The free objects behind it are lost; the allocation was refused.)"
        ))
    }

    /// Which object of which slab is `va`? Err for anything that is not an object start.
    pub(crate) fn locate(&self, m: &Machine, va: u64) -> Result<ObjRef> {
        let pfn = m.virt_to_pfn(VirtAddr(va)).map_err(|_| self.invalid_ptr(va))?;
        self.locate_at(m, m.compound_head(pfn).0, va)
    }

    /// `locate` when the slab's head page is known (`check_valid_pointer`).
    #[inline]
    pub(crate) fn locate_at(&self, m: &Machine, head: u64, va: u64) -> Result<ObjRef> {
        let page = m.mem_map.get(head);
        if !page.has(PG_SLAB) || page.refcount() != self.id as i32 {
            return Err(self.invalid_ptr(va));
        }
        let base = self.slab_base(m, head);
        let end = base + self.objects_in(m, page.order()) as u64 * self.geo.size as u64;
        if va < base || va >= end || self.geo.index_of(va - base).is_none() {
            return Err(self.invalid_ptr(va));
        }
        Ok(ObjRef { slab_id: page.next(), slab_pfn: head })
    }

    fn invalid_ptr(&self, va: u64) -> KmmError {
        KmmError::InvalidFree(format!("BUG {} (Not tainted): Invalid object pointer {va:#x}", self.name))
    }

    // ---- allocation ---------------------------------------------------------------------

    /// `slab_alloc_node`: the per-CPU fast path, else `___slab_alloc`.
    /// Returns the object's address; the caller runs the post-alloc hooks.
    pub fn alloc_raw(&self, m: &Machine, gfp: Gfp, cpu: u32) -> Result<u64> {
        if self.is_debug() {
            // Page events emitted under the node lock reach sinks after it drops.
            let _d = m.trace.defer();
            return self.alloc_debug(m, gfp, &DebugCtx { orig_size: self.geo.object_size, caller: None });
        }
        let mut c = self.cpu_lock(cpu);
        let obj = c.freelist;
        if obj != 0 {
            // The fast path emits no events: no deferral needed (issue 13,
            // part 4: `Deferral`'s drop was an out-of-line call on every pair).
            let next = self.get_fp(m, obj);
            if !self.fp_in(c.slab_base, c.slab_end, next) {
                // The report may emit events: deferred past the lock
                // (declared after `_d`, this `c` drops before it).
                let _d = m.trace.defer();
                let c = c;
                return Err(self.freepointer_corrupt(m, c.slab, obj, next));
            }
            c.freelist = next;
            c.tid += 1;
            c.stats.alloc_fastpath += 1;
            return Ok(obj);
        }
        c.stats.alloc_slowpath += 1;
        // Page events emitted under the cpu/node locks reach sinks after
        // they drop: `c` is moved into the slow path, which drops it (and
        // every lock it takes) before `_d` drops at the end of this function.
        let _d = m.trace.defer();
        self.slab_alloc_slow(m, gfp, cpu, c)
    }

    /// `___slab_alloc`.
    fn slab_alloc_slow<'a>(&'a self, m: &Machine, gfp: Gfp, cpu: u32, mut c: MutexGuard<'a, CpuSlab>) -> Result<u64> {
        // reread_slab: objects freed remotely to the cpu slab (get_freelist).
        if c.slab != NIL {
            let mut n = self.node.lock();
            let s = Self::slab_mut(&mut n, c.slab);
            if s.freelist != 0 {
                let fl = std::mem::take(&mut s.freelist);
                s.inuse = s.objects;
                drop(n);
                c.stats.alloc_refill += 1;
                return self.load_freelist(m, &mut c, fl);
            }
            // The cpu slab is full: deactivate it (it leaves on no list).
            s.list = SlabList::None;
            drop(n);
            c.slab = NIL;
            c.slab_pfn = u64::MAX;
            c.stats.deactivate_full += 1;
        }
        // new_slab: the per-CPU partial list.
        while let Some(id) = c.partial.pop() {
            let mut n = self.node.lock();
            let s = Self::slab_mut(&mut n, id);
            let fl = std::mem::take(&mut s.freelist);
            s.inuse = s.objects;
            if fl == 0 {
                // Can't happen for a partial slab; keep it untracked (full).
                s.list = SlabList::None;
                continue;
            }
            s.list = SlabList::Cpu(cpu);
            let (pfn, order) = (s.pfn, s.order);
            drop(n);
            self.install_cpu_slab(m, &mut c, id, pfn, order);
            c.stats.cpu_partial_alloc += 1;
            return self.load_freelist(m, &mut c, fl);
        }
        // new_objects: get_partial_node.
        {
            let mut n = self.node.lock();
            if n.partial_head != NIL {
                let first = n.partial_head;
                Self::remove_partial(&mut n, first);
                let mut moved = 0;
                // get_partial_node: stop once more than half of
                // cpu_partial_slabs moved (with 0, after one).
                let cap = self.cpu_partial().1;
                if self.has_cpu_partial() {
                    while n.partial_head != NIL {
                        let id = n.partial_head;
                        Self::remove_partial(&mut n, id);
                        Self::slab_mut(&mut n, id).list = SlabList::CpuPartial(cpu);
                        c.partial.push(id); // put_cpu_partial(drain=0): pushed at the head
                        c.stats.cpu_partial_node += 1;
                        moved += 1;
                        if moved > cap / 2 {
                            break;
                        }
                    }
                }
                let s = Self::slab_mut(&mut n, first);
                let fl = std::mem::take(&mut s.freelist);
                s.inuse = s.objects;
                s.list = SlabList::Cpu(cpu);
                let (pfn, order) = (s.pfn, s.order);
                drop(n);
                self.install_cpu_slab(m, &mut c, first, pfn, order);
                c.stats.alloc_from_partial += 1;
                return self.load_freelist(m, &mut c, fl);
            }
        }
        // A new slab, with no lock held while pages are allocated and ctors run.
        drop(c);
        let (id, pfn, fl) = self.new_slab(m, gfp, SlabList::Cpu(cpu))?;
        let mut c = self.cpu_lock(cpu);
        c.stats.alloc_slab += 1;
        if c.slab != NIL {
            // Someone (a reentrant ctor) installed a slab meanwhile: put ours
            // back as a cpu slab replacement, deactivating theirs.
            let (old, old_fl) = (c.slab, std::mem::take(&mut c.freelist));
            self.deactivate_slab(m, old, old_fl, &mut c.stats);
        }
        let order = m.mem_map.get(pfn).order();
        self.install_cpu_slab(m, &mut c, id, pfn, order);
        self.load_freelist(m, &mut c, fl)
    }

    /// `load_freelist`: hand out the first object, keep the rest on the CPU.
    fn load_freelist(&self, m: &Machine, c: &mut CpuSlab, fl: u64) -> Result<u64> {
        let next = self.get_fp(m, fl);
        if !self.fp_in(c.slab_base, c.slab_end, next) {
            // `fl` stays free, alone on the CPU freelist.
            c.freelist = fl;
            return Err(self.freepointer_corrupt(m, c.slab, fl, next));
        }
        c.freelist = next;
        c.tid += 1;
        Ok(fl)
    }

    /// `allocate_slab` + `new_slab`: pages from the buddy allocator, objects
    /// set up (ctor), freelist in address order. Returns (id, pfn, freelist).
    fn new_slab(&self, m: &Machine, gfp: Gfp, list: SlabList) -> Result<(u32, u64, u64)> {
        struct SettingUp<'a>(&'a AtomicU32);
        impl Drop for SettingUp<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        self.setting_up.fetch_add(1, Relaxed);
        let _setting_up = SettingUp(&self.setting_up);
        let flags = (gfp & (gfp::GFP_RECLAIM_MASK | gfp::__GFP_HARDWALL | gfp::__GFP_THISNODE)) | self.allocflags;
        let mut alloc_gfp = (flags | gfp::__GFP_NOWARN | gfp::__GFP_NORETRY) & !gfp::__GFP_NOFAIL;
        let (mut order, mut objects) = (self.geo.order, self.geo.objects);
        if alloc_gfp & gfp::__GFP_DIRECT_RECLAIM != 0 && order > self.geo.min_order {
            alloc_gfp = (alloc_gfp | gfp::__GFP_NOMEMALLOC) & !gfp::__GFP_RECLAIM;
        }
        let pfn = match m.alloc_pages(alloc_gfp, order) {
            Ok(p) => p,
            Err(_) => {
                order = self.geo.min_order;
                objects = self.geo.min_objects;
                match m.alloc_pages(flags, order) {
                    Ok(p) => {
                        let cpu = m.this_cpu();
                        self.cpu_lock(cpu).stats.order_fallback += 1;
                        p
                    }
                    Err(e) => return Err(self.slab_out_of_memory(gfp, e)),
                }
            }
        };
        // The pages become a slab: PG_slab head holding the cache id, tails
        // pointing at the head.
        m.make_slab_pages(pfn, order, self.id);
        let base = self.slab_base(m, pfn.0);
        // setup_slab_debug, setup_object (+ setup_object_debug), then the freelist.
        self.setup_slab_debug(m, pfn.0, order);
        for i in 0..objects {
            let obj = base + i as u64 * self.geo.size as u64;
            self.setup_object_debug(m, obj);
            if let Some(ctor) = &self.ctor {
                // setup_object: the ctor may touch the object (KASAN).
                m.kasan_unpoison_new_object(self, obj);
                ctor(VirtAddr(obj));
                m.kasan_poison_new_object(self, obj);
            }
        }
        for i in 0..objects {
            let obj = base + i as u64 * self.geo.size as u64;
            let next = if i + 1 < objects { obj + self.geo.size as u64 } else { 0 };
            self.set_fp(m, obj, next);
        }
        let bytes = (m.page_size << order) as i64;
        if self.flags & SLAB_RECLAIM_ACCOUNT != 0 {
            m.vmstat.nr_slab_reclaimable_b.fetch_add(bytes, Relaxed);
        } else {
            m.vmstat.nr_slab_unreclaimable_b.fetch_add(bytes, Relaxed);
        }
        let born = m.slab.pages_allocated.fetch_add(1 << order, Relaxed) + (1 << order);
        let mut n = self.node.lock();
        let frozen = matches!(list, SlabList::Cpu(_));
        let slab = Slab {
            pfn: pfn.0,
            order,
            objects,
            inuse: if frozen { objects } else { 0 },
            freelist: if frozen { 0 } else { base },
            list: SlabList::None,
            frozen: false,
            prev: NIL,
            next: NIL,
            born,
        };
        let id = Self::new_slab_id(&mut n, slab);
        Self::slab_mut(&mut n, id).list = list;
        n.nr_slabs += 1;
        n.total_objects += objects as u64;
        drop(n);
        m.mem_map.get(pfn.0).set_next(id);
        Ok((id, pfn.0, base))
    }

    /// A slab that existed before the trace (warm start, `warm.rs`): `pfn`
    /// heads a block of `order` pages the caller holds (allocated, not on any
    /// list). Objects with `live[i]` are allocated (marked live in the
    /// shadow), the others free, chained in address order. The slab goes to
    /// the tail of the node partial list if it has a free object, on no
    /// list if it is full: what `get_slabinfo` then counts is what a
    /// recorded /proc/slabinfo says (free objects on node partial slabs).
    /// Returns the number of objects of the slab.
    pub(crate) fn warm_slab(&self, m: &Machine, pfn: u64, order: u32, live: &[bool]) -> u32 {
        // prep_new_page with __GFP_COMP, then allocate_slab.
        let head = m.mem_map.get(pfn);
        let mut flags = 0;
        if order > 0 {
            flags |= crate::page::PG_HEAD;
            for t in 1..(1u64 << order) {
                let tail = m.mem_map.get(pfn + t);
                tail.set(crate::page::PG_TAIL, 0);
                tail.set_next(pfn as u32);
            }
        }
        head.set(flags, order);
        m.make_slab_pages(Pfn(pfn), order, self.id);
        let objects = self.objects_in(m, order);
        let base = self.slab_base(m, pfn);
        let is_live = |i: u32| live.get(i as usize).copied().unwrap_or(true);
        let mut freelist = 0u64;
        let mut inuse = 0u32;
        for i in (0..objects).rev() {
            let obj = base + i as u64 * self.geo.size as u64;
            if is_live(i) {
                inuse += 1;
                self.init_object(m, obj, SLUB_RED_ACTIVE);
                m.shadow.alloc(obj - m.cfg.arch.page_offset());
            } else {
                self.init_object(m, obj, SLUB_RED_INACTIVE);
                self.set_fp(m, obj, freelist);
                freelist = obj;
            }
        }
        let bytes = (m.page_size << order) as i64;
        if self.flags & SLAB_RECLAIM_ACCOUNT != 0 {
            m.vmstat.nr_slab_reclaimable_b.fetch_add(bytes, Relaxed);
        } else {
            m.vmstat.nr_slab_unreclaimable_b.fetch_add(bytes, Relaxed);
        }
        let mut n = self.node.lock();
        let slab = Slab { pfn, order, objects, inuse, freelist, list: SlabList::None, frozen: false, prev: NIL, next: NIL, born: 0 };
        let id = Self::new_slab_id(&mut n, slab);
        n.nr_slabs += 1;
        n.total_objects += objects as u64;
        if inuse < objects {
            Self::add_partial(&mut n, id, true);
        }
        drop(n);
        m.mem_map.get(pfn).set_next(id);
        objects
    }

    /// The "SLUB: Unable to allocate memory" report as an OutOfMemory error.
    fn slab_out_of_memory(&self, gfp: Gfp, e: KmmError) -> KmmError {
        let n = self.node.lock();
        let free: u64 = n.slabs.iter().flatten().map(|s| (s.objects - s.inuse) as u64).sum();
        let msg = format!(
            "SLUB: Unable to allocate memory on node -1, gfp={:#x}({})\n  cache: {}, object size: {}, buffer size: {}, default order: {}, min order: {}\n  node 0: slabs: {}, objs: {}, free: {}\n{}",
            gfp,
            gfp::format_pgg(gfp),
            self.name,
            self.geo.object_size,
            self.geo.size,
            self.geo.order,
            self.geo.min_order,
            n.nr_slabs,
            n.total_objects,
            free,
            e.message()
        );
        KmmError::OutOfMemory { order: self.geo.order, gfp, message: msg }
    }

    /// `discard_slab`: give a slab's pages back to the buddy allocator.
    /// Returns how many.
    fn discard_slab(&self, m: &Machine, n: &mut Node, id: u32) -> u64 {
        let s = n.slabs[id as usize].take().expect("live slab");
        n.free_ids.push(id);
        n.nr_slabs -= 1;
        n.total_objects -= s.objects as u64;
        let bytes = (m.page_size << s.order) as i64;
        if self.flags & SLAB_RECLAIM_ACCOUNT != 0 {
            m.vmstat.nr_slab_reclaimable_b.fetch_sub(bytes, Relaxed);
        } else {
            m.vmstat.nr_slab_unreclaimable_b.fetch_sub(bytes, Relaxed);
        }
        m.free_slab_pages(Pfn(s.pfn), s.order);
        m.slab.pages_freed.fetch_add(1 << s.order, Relaxed);
        1 << s.order
    }

    /// `deactivate_slab`: return a cpu slab (and its CPU freelist) to the
    /// node. Returns the pages discarded (0 or the slab's).
    fn deactivate_slab(&self, m: &Machine, id: u32, mut cpu_fl: u64, stats: &mut CpuStats) -> u64 {
        let mut n = self.node.lock();
        // Remote frees waiting on the slab: it goes to the tail of the node list.
        let to_tail = Self::slab_mut(&mut n, id).freelist != 0;
        // Splice the CPU freelist onto the slab's freelist.
        let mut freed = 0;
        while cpu_fl != 0 {
            let next = self.get_fp(m, cpu_fl);
            let s = Self::slab_mut(&mut n, id);
            let prior = s.freelist;
            self.set_fp(m, cpu_fl, prior);
            s.freelist = cpu_fl;
            freed += 1;
            cpu_fl = next;
        }
        let s = Self::slab_mut(&mut n, id);
        s.inuse -= freed;
        s.list = SlabList::None;
        let (inuse, has_free) = (s.inuse, s.freelist != 0);
        if inuse == 0 && n.nr_partial as u64 >= self.min_partial() {
            stats.deactivate_empty += 1;
            stats.free_slab += 1;
            return self.discard_slab(m, &mut n, id);
        } else if has_free {
            Self::add_partial(&mut n, id, to_tail);
        } else {
            stats.deactivate_full += 1;
        }
        0
    }

    /// `__put_partials`: move a CPU's partial slabs to the node list
    /// (discarding empty ones beyond min_partial). Returns the pages discarded.
    fn put_partials(&self, m: &Machine, ids: Vec<u32>, stats: &mut CpuStats) -> u64 {
        let mut n = self.node.lock();
        let mut pages = 0;
        for id in ids {
            let s = Self::slab_mut(&mut n, id);
            s.list = SlabList::None;
            if s.inuse == 0 && n.nr_partial as u64 >= self.min_partial() {
                pages += self.discard_slab(m, &mut n, id);
                stats.free_slab += 1;
            } else {
                Self::add_partial(&mut n, id, true);
            }
        }
        pages
    }

    // ---- freeing ---------------------------------------------------------------------------

    /// `do_slab_free`: the fast path onto this CPU's freelist when the object
    /// belongs to the cpu slab, else `__slab_free`.
    pub(crate) fn free_raw(&self, m: &Machine, o: &ObjRef, obj: u64, cpu: u32) {
        if self.is_debug() {
            let _d = m.trace.defer();
            return self.free_to_partial_list(m, o, obj, None);
        }
        let mut c = self.cpu_lock(cpu);
        if c.slab_pfn == o.slab_pfn {
            // free_chain's fast path (onto the cpu freelist): no events,
            // so no deferral (issue 13, part 4).
            return self.free_chain(m, &mut c, o, &[obj], cpu);
        }
        // Page events emitted under the cpu/node locks reach sinks after
        // they drop: declared after `_d`, this `c` drops before it.
        let _d = m.trace.defer();
        let mut c = c;
        self.free_chain(m, &mut c, o, &[obj], cpu);
    }

    /// `do_slab_free` of a chain of objects of one slab (`head`..`tail`,
    /// `cnt`): onto the CPU freelist when the slab is the cpu slab, else one
    /// `__slab_free` for the whole chain.
    fn free_chain(&self, m: &Machine, c: &mut CpuSlab, o: &ObjRef, objs: &[u64], cpu: u32) {
        let n = objs.len() as u64;
        if c.slab_pfn == o.slab_pfn {
            for &obj in objs {
                self.set_fp(m, obj, c.freelist);
                c.freelist = obj;
            }
            c.tid += 1;
            c.stats.free_fastpath += n;
            return;
        }
        c.stats.free_slowpath += n;
        self.slab_free_slow(m, o.slab_id, objs, cpu, c);
    }

    /// `__slab_free` of `objs`, all in slab `id`.
    fn slab_free_slow(&self, m: &Machine, id: u32, objs: &[u64], cpu: u32, c: &mut CpuSlab) {
        let mut n = self.node.lock();
        let s = Self::slab_mut(&mut n, id);
        let prior = s.freelist;
        let mut head = prior;
        for &obj in objs.iter().rev() {
            self.set_fp(m, obj, head);
            head = obj;
        }
        s.freelist = head;
        s.inuse -= objs.len() as u32;
        let list = s.list;
        let inuse = s.inuse;
        if let SlabList::Cpu(owner) = list {
            // Frozen: another CPU's active slab collects it at its next refill.
            drop(n);
            c.stats.free_frozen += objs.len() as u64;
            if owner != cpu {
                c.stats.free_remote += objs.len() as u64;
            }
            return;
        }
        if prior == 0 && self.has_cpu_partial() {
            // It was full (on no list): it goes on this CPU's partial list.
            s.list = SlabList::CpuPartial(cpu);
            drop(n);
            c.stats.cpu_partial_free += 1;
            self.put_cpu_partial(m, c, id);
            return;
        }
        let on_node_partial = list == SlabList::NodePartial;
        if prior != 0 && !on_node_partial {
            return; // on some CPU's partial list: nothing to move
        }
        if inuse == 0 && n.nr_partial as u64 >= self.min_partial() {
            if prior != 0 {
                Self::remove_partial(&mut n, id);
            }
            self.discard_slab(m, &mut n, id);
            c.stats.free_slab += 1;
            return;
        }
        if prior == 0 {
            // No cpu partial lists (debug/cpu_partial 0): a full slab that gained a free object.
            Self::add_partial(&mut n, id, true);
        }
    }

    /// `kmem_cache_free_bulk` after the checks: runs of objects of one slab
    /// are freed together (`build_detached_freelist`), under one CPU lock.
    pub(crate) fn free_bulk_raw(&self, m: &Machine, objs: &[(u64, ObjRef)], cpu: u32, caller: Option<&Caller>) {
        let _d = m.trace.defer();
        if self.is_debug() {
            for (obj, o) in objs {
                self.free_to_partial_list(m, o, *obj, caller);
            }
            return;
        }
        let mut c = self.cpu_lock(cpu);
        let mut run: Vec<u64> = Vec::with_capacity(64);
        let mut i = 0;
        while i < objs.len() {
            let o = &objs[i].1;
            run.clear();
            while i < objs.len() && objs[i].1.slab_pfn == o.slab_pfn {
                run.push(objs[i].0);
                i += 1;
            }
            self.free_chain(m, &mut c, o, &run, cpu);
        }
    }

    /// `__kmem_cache_alloc_bulk`: `n` objects under one CPU lock, taking the
    /// slow path whenever the CPU freelist runs dry.
    pub(crate) fn alloc_bulk_raw(&self, m: &Machine, gfp: Gfp, cpu: u32, n: usize, out: &mut Vec<u64>, ctx: &DebugCtx) -> Result<()> {
        let _d = m.trace.defer();
        if self.is_debug() {
            for _ in 0..n {
                out.push(self.alloc_debug(m, gfp, ctx)?);
            }
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let mut c = self.cpu_lock(cpu);
            while left > 0 && c.freelist != 0 {
                let obj = c.freelist;
                let next = self.get_fp(m, obj);
                if !self.fp_in(c.slab_base, c.slab_end, next) {
                    return Err(self.freepointer_corrupt(m, c.slab, obj, next));
                }
                c.freelist = next;
                c.stats.alloc_fastpath += 1;
                out.push(obj);
                left -= 1;
            }
            c.tid += 1;
            if left == 0 {
                break;
            }
            c.stats.alloc_slowpath += 1;
            out.push(self.slab_alloc_slow(m, gfp, cpu, c)?);
            left -= 1;
        }
        Ok(())
    }

    /// `put_cpu_partial(s, slab, drain=1)`: push on this CPU's partial list,
    /// first draining it to the node when it already holds cpu_partial_slabs.
    fn put_cpu_partial(&self, m: &Machine, c: &mut CpuSlab, id: u32) {
        if c.partial.len() as u32 >= self.cpu_partial().1 {
            let old = std::mem::take(&mut c.partial);
            c.stats.cpu_partial_drain += 1;
            let mut stats = c.stats;
            self.put_partials(m, old, &mut stats);
            c.stats = stats;
        }
        c.partial.push(id);
    }

    // ---- flushing and shrinking ------------------------------------------------------------------

    /// `flush_cpu_slab` for one CPU: deactivate its slab, drain its
    /// partials. Returns the pages discarded.
    pub fn flush_cpu(&self, m: &Machine, cpu: u32) -> u64 {
        let mut c = self.cpu_lock(cpu);
        let mut stats = c.stats;
        let mut pages = 0;
        if c.slab != NIL {
            let (id, fl) = (c.slab, std::mem::take(&mut c.freelist));
            c.slab = NIL;
            c.slab_pfn = u64::MAX;
            pages += self.deactivate_slab(m, id, fl, &mut stats);
        }
        let parts = std::mem::take(&mut c.partial);
        pages += self.put_partials(m, parts, &mut stats);
        c.stats = stats;
        pages
    }

    /// `flush_all` + `__kmem_cache_shrink`: flush every CPU, then free every
    /// empty slab on the node list. Returns the pages it gave back (the
    /// kernel returns only whether slabs remain), counted as they are
    /// discarded: other CPUs may allocate slabs meanwhile, so a before/after
    /// difference of the cache's pages can go negative (found by loom).
    pub fn shrink(&self, m: &Machine) -> u64 {
        let _d = m.trace.defer();
        let mut pages = 0;
        for cpu in 0..self.nr_cpus() {
            pages += self.flush_cpu(m, cpu);
        }
        // __kmem_cache_do_shrink: free every empty slab (min_partial does
        // not apply), and move the fullest slabs (1..=32 free) to the head,
        // fullest first, so allocations fill them before the emptier ones.
        let mut n = self.node.lock();
        let mut promote: Vec<Vec<u32>> = vec![Vec::new(); 32];
        for id in Self::partial_ids(&n) {
            let s = n.slabs[id as usize].as_ref().expect("partial slab");
            let free = s.objects - s.inuse;
            if s.inuse == 0 {
                Self::remove_partial(&mut n, id);
                pages += self.discard_slab(m, &mut n, id);
            } else if free <= 32 {
                Self::remove_partial(&mut n, id);
                promote[free as usize - 1].push(id);
            }
        }
        for ids in promote.iter().rev() {
            for &id in ids.iter().rev() {
                Self::add_partial(&mut n, id, false);
            }
        }
        pages
    }

    /// Give back the empty slabs made after `since` (a `pages_allocated`
    /// reading): what a refused call grew the cache by. This CPU's slab and
    /// partial slabs among them are flushed first; other CPUs' are left
    /// alone. The kernel keeps such slabs; kmm gives them back so that a
    /// call that fails leaves the accounting as it was. Returns the pages.
    pub(crate) fn discard_new_empty(&self, m: &Machine, cpu: u32, since: u64) -> u64 {
        let _d = m.trace.defer();
        let is_new = |n: &Node, id: u32| n.slabs.get(id as usize).and_then(|s| s.as_ref()).is_some_and(|s| s.born > since);
        let mut pages = 0;
        {
            let mut c = self.cpu_lock(cpu);
            let mut stats = c.stats;
            let (cur_new, parts) = {
                let n = self.node.lock();
                let cur_new = c.slab != NIL && is_new(&n, c.slab);
                let parts: Vec<u32> = c.partial.iter().copied().filter(|&id| is_new(&n, id)).collect();
                (cur_new, parts)
            };
            if cur_new {
                let (id, fl) = (c.slab, std::mem::take(&mut c.freelist));
                c.slab = NIL;
                c.slab_pfn = u64::MAX;
                pages += self.deactivate_slab(m, id, fl, &mut stats);
            }
            if !parts.is_empty() {
                c.partial.retain(|id| !parts.contains(id));
                pages += self.put_partials(m, parts, &mut stats);
            }
            c.stats = stats;
        }
        let mut n = self.node.lock();
        for id in Self::partial_ids(&n) {
            let s = n.slabs[id as usize].as_ref().expect("partial slab");
            if s.born > since && s.inuse == 0 {
                Self::remove_partial(&mut n, id);
                pages += self.discard_slab(m, &mut n, id);
            }
        }
        pages
    }

    /// Free every slab left (all empty): the end of `__kmem_cache_shutdown`.
    pub(crate) fn release_all_slabs(&self, m: &Machine) {
        let _d = m.trace.defer();
        let mut n = self.node.lock();
        for id in Self::partial_ids(&n) {
            Self::remove_partial(&mut n, id);
        }
        let ids: Vec<u32> =
            n.slabs.iter().enumerate().filter(|(_, s)| s.is_some()).map(|(i, _)| i as u32).collect();
        for id in ids {
            Self::slab_mut(&mut n, id).list = SlabList::None;
            self.discard_slab(m, &mut n, id);
        }
    }

    /// Free objects on a CPU freelist (walked through the free pointers).
    fn cpu_freelist_len(&self, m: &Machine, c: &CpuSlab) -> u64 {
        let (mut n, mut p) = (0u64, c.freelist);
        while p != 0 && n <= (1 << 16) {
            n += 1;
            p = self.get_fp(m, p);
        }
        n
    }

    /// Objects allocated and not freed (exact: CPU freelists are walked).
    pub fn objects_in_use(&self, m: &Machine) -> u64 {
        let mut cpu_free = 0u64;
        for p in self.cpus.iter() {
            let c = p.lock.lock();
            cpu_free += self.cpu_freelist_len(m, &c);
        }
        let n = self.node.lock();
        let inuse: u64 = n.slabs.iter().flatten().map(|s| s.inuse as u64).sum();
        inuse - cpu_free
    }

    /// `get_slabinfo`: (active_objs, num_objs, num_slabs). As in SLUB, free
    /// objects count as inactive only when they sit on node partial slabs.
    pub fn slabinfo_counts(&self) -> (u64, u64, u64) {
        let n = self.node.lock();
        let free_partial: u64 = Self::partial_ids(&n)
            .into_iter()
            .filter_map(|id| n.slabs[id as usize].as_ref())
            .map(|s| (s.objects - s.inuse) as u64)
            .sum();
        (n.total_objects - free_partial, n.total_objects, n.nr_slabs)
    }

    /// Per CPU, in CPU order: (has an active slab, slabs on its partial
    /// list). What sysfs `cpu_slabs` and `slabs_cpu_partial` read.
    pub fn cpu_slab_counts(&self) -> Vec<(bool, u32)> {
        self.cpus
            .iter()
            .map(|p| {
                let c = p.lock.lock();
                (c.slab != NIL, c.partial.len() as u32)
            })
            .collect()
    }

    /// Slabs in the seed book's three lists, by how many free objects they
    /// have: (full, partial, empty). The cpu slab's free objects include its
    /// CPU freelist.
    pub fn seed_lists(&self, m: &Machine) -> (u64, u64, u64) {
        let cpus: Vec<MutexGuard<'_, CpuSlab>> = self.cpus.iter().map(|p| p.lock.lock()).collect();
        let n = self.node.lock();
        let mut t = (0, 0, 0);
        for (id, s) in n.slabs.iter().enumerate() {
            let Some(s) = s else { continue };
            let mut free = (s.objects - s.inuse) as u64;
            if let SlabList::Cpu(cpu) = s.list {
                let c = &cpus[cpu as usize];
                if c.slab == id as u32 {
                    free += self.cpu_freelist_len(m, c);
                }
            }
            if free == 0 {
                t.0 += 1;
            } else if free == s.objects as u64 {
                t.2 += 1;
            } else {
                t.1 += 1;
            }
        }
        t
    }

    /// Slabs per state: (cpu, cpu partial, node partial, full).
    pub fn slab_states(&self) -> (u64, u64, u64, u64) {
        let n = self.node.lock();
        let mut t = (0, 0, 0, 0);
        for s in n.slabs.iter().flatten() {
            match s.list {
                SlabList::Cpu(_) => t.0 += 1,
                SlabList::CpuPartial(_) => t.1 += 1,
                SlabList::NodePartial => t.2 += 1,
                SlabList::None => t.3 += 1,
            }
        }
        t
    }

    /// Check slub-1..4. Returns the violations found.
    pub fn check(&self, m: &Machine) -> Vec<String> {
        let mut errs = Vec::new();
        // Lock order: every CPU lock, then the node.
        let cpus: Vec<MutexGuard<'_, CpuSlab>> = self.cpus.iter().map(|p| p.lock.lock()).collect();
        let n = self.node.lock();
        let name = &self.name;
        let walk = |pfn: u64, order: u32, mut p: u64, errs: &mut Vec<String>| -> Vec<u64> {
            let mut v = Vec::new();
            while p != 0 {
                if !self.fp_ok(m, pfn, order, p) || v.len() > 1 << 16 {
                    errs.push(format!("slub-3: {name}: free pointer {p:#x} outside slab pfn {pfn:#x}"));
                    break;
                }
                v.push(p);
                p = self.get_fp(m, p);
            }
            v
        };
        let mut nr_partial = 0;
        let mut total = 0u64;
        for (id, s) in n.slabs.iter().enumerate() {
            let Some(s) = s else { continue };
            total += s.objects as u64;
            let mut free = walk(s.pfn, s.order, s.freelist, &mut errs);
            // inuse counts everything not on the slab's own freelist (for the
            // cpu slab that includes the objects on the CPU freelist).
            if s.inuse as usize + free.len() != s.objects as usize {
                errs.push(format!(
                    "slub-1: {name}: slab {id} inuse {} + free {} != objects {}",
                    s.inuse,
                    free.len(),
                    s.objects
                ));
            }
            if let SlabList::Cpu(cpu) = s.list {
                let c = &cpus[cpu as usize];
                if c.slab != id as u32 {
                    errs.push(format!("slub-2: {name}: slab {id} says it is cpu {cpu}'s slab, the cpu disagrees"));
                } else {
                    free.extend(walk(s.pfn, s.order, c.freelist, &mut errs));
                }
            }
            if s.list == SlabList::NodePartial {
                nr_partial += 1;
            }
            if s.frozen && (s.list != SlabList::None || s.freelist != 0 || s.inuse != s.objects) {
                errs.push(format!("slub-5: {name}: isolated slab {id} is not full and off the lists"));
            }
            if let SlabList::CpuPartial(cpu) = s.list {
                if !cpus[cpu as usize].partial.contains(&(id as u32)) {
                    errs.push(format!("slub-2: {name}: slab {id} not on cpu {cpu}'s partial list"));
                }
            }
            let mut sorted = free.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != free.len() {
                errs.push(format!("slub-3: {name}: slab {id} has an object on its freelists twice"));
            }
            for &o in &free {
                if m.shadow.is_live(o - m.cfg.arch.page_offset()) {
                    errs.push(format!("slub-4: {name}: free object {o:#x} is marked live"));
                }
            }
            let head = m.mem_map.get(s.pfn);
            if !head.has(PG_SLAB) || head.refcount() != self.id as i32 || head.next() != id as u32 {
                errs.push(format!("slub-2: {name}: slab {id}'s head page metadata is wrong"));
            }
        }
        if nr_partial != n.nr_partial || Self::partial_ids(&n).len() as u32 != n.nr_partial {
            errs.push(format!("slub-2: {name}: nr_partial {} but {} slabs on the list", n.nr_partial, nr_partial));
        }
        if total != n.total_objects {
            errs.push(format!("slub-2: {name}: total_objects {} but slabs hold {total}", n.total_objects));
        }
        errs
    }
}
