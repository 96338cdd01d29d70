//! vmalloc: virtually contiguous kernel memory from scattered pages.
//!
//! # Kernel
//! `mm/vmalloc.c`: `__vmalloc_node_range_noprof`, `__get_vm_area_node`,
//! `alloc_vmap_area`, `__alloc_vmap_area` (lowest-address first fit),
//! `__vmalloc_area_node`, `vm_area_alloc_pages`, `vmap_pages_range`,
//! `vfree`, `remove_vm_area`, `free_vmap_area_noflush`, `lazy_max_pages`,
//! `__purge_vmap_area_lazy`, `vmap`, `vunmap`, `vmalloc_to_page`,
//! `is_vmalloc_addr`, `vmalloc_nr_pages`, `s_show`/`show_numa_info`
//! (/proc/vmallocinfo); `mm/util.c` (`kvmalloc_node_noprof`,
//! `kmalloc_gfp_adjust`, `kvfree`); `include/trace/events/vmalloc.h`.
//!
//! ```text
//!   vmalloc(size): size = PAGE_ALIGN(size)
//!     vm_struct (kmalloc) + vmap_area (kmem_cache "vmap_area")
//!     [addr, addr + size + PAGE_SIZE)  <- lowest free range; last page = guard
//!     pages: order-0, gfp | __GFP_HIGHMEM, one by one; page array kmalloc'ed
//!            (vmalloc'ed, "vpages", when bigger than a page)
//!     map them (page tables allocated on demand)
//!   vfree(addr): clear PTEs, free the pages now; the range goes on the purge
//!     list (vmap_lazy_nr += pages) and comes back, with ONE TLB flush for the
//!     whole batch, when vmap_lazy_nr > lazy_max_pages()
//! ```
//!
//! SIMPLIFICATION: free space is a BTreeMap of ranges searched in address
//! order (the kernel keeps an augmented rb-tree with subtree_max_size, so
//! its search is O(log n); the result, the lowest fitting address, is the
//! same). One vmap node (the kernel shards busy areas per node since 6.9).
//! vfree in interrupt context frees at once (the kernel defers it to a
//! workqueue through vfree_atomic). A vmalloc that fails after its range
//! was reserved returns the range at once instead of through the lazy list.
//! One `vmap_area` object per area (the kernel may also take a spare one for
//! `ne_fit_preload`). Freeing a page a vmalloc area still maps, with
//! `__free_page`, is refused here (the kernel does not check; it corrupts).
//!
//! # Invariants
//! - vmalloc-1: busy areas, lazily freed ranges and free ranges are
//!   disjoint and together cover [VMALLOC_START, VMALLOC_END).
//! - vmalloc-2: every page of a live VM_ALLOC area is mapped at its place
//!   and is an allocated page; the guard page is unmapped.
//! - vmalloc-3: `nr_vmalloc_pages` is the sum of the live VM_ALLOC areas' pages.
//! - vmalloc-4: `lazy_nr` is the page count of the purge list.
//!
//! Lock order: `purge_lock` (vmap_purge_lock) -> `state` (vmap_area_lock);
//! `state` is never held while allocating or freeing pages or slab objects,
//! nor while flushing TLBs; page_table_lock is taken without it.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::error::{KmmError, Result};
use crate::gfp::{self, Gfp};
use crate::machine::{Machine, VirtAddr};
use crate::page::{Pfn, PG_VMALLOC};
use crate::physmem::HostMap;
use crate::slab::{CacheArgs, KmemCache};
use crate::trace::{CallSite, EventId, Payload};

pub const VM_IOREMAP: u32 = 0x1;
pub const VM_ALLOC: u32 = 0x2;
pub const VM_MAP: u32 = 0x4;
pub const VM_USERMAP: u32 = 0x8;
pub const VM_UNINITIALIZED: u32 = 0x20;
pub const VM_NO_GUARD: u32 = 0x40;

/// `VmArea::internal` of a CPU's IRQ stack.
pub const OWNER_IRQ_STACK: u64 = 1;

/// `sizeof(struct vm_struct)` on 64-bit (kzalloc'ed per area).
const VM_STRUCT_SIZE: u64 = 72;
/// `sizeof(struct vmap_area)` on 64-bit (the "vmap_area" cache).
const VMAP_AREA_SIZE: u32 = 72;

/// A `struct vm_struct` with its `vmap_area`.
pub struct VmArea {
    pub addr: u64,
    /// Bytes of address space, the guard page included (vmallocinfo's size).
    pub size: u64,
    pub flags: u32,
    /// Pages mapped, in order (owned for VM_ALLOC, borrowed for VM_MAP).
    pub pages: Vec<Pfn>,
    pub caller: CallSite,
    /// The size asked for.
    pub requested: u64,
    /// Buffer exports alive (a vfree is refused while > 0).
    pub pinned: AtomicU32,
    /// Who owns the area when not its caller: `OWNER_IRQ_STACK`, or the
    /// address of the area whose page array it is. 0: the caller's to free.
    pub internal: AtomicU64,
    pub freed: AtomicBool,
    host: OnceLock<HostMap>,
    vm_struct: u64,
    va_obj: u64,
    page_array: PageArray,
    /// Pages of a vmap that are the caller's plain allocations: pinned
    /// (`pins.rs`) so that `free_pages` refuses them while mapped.
    map_pins: Vec<u64>,
    /// Page tables this area's mapping installed (freed again only when
    /// a failed vmalloc undoes its page array: `discard_area`).
    tables: Vec<u64>,
}

/// What `get_vm_area` reserved for an area, and its page array.
struct Meta {
    addr: u64,
    size: u64,
    vm_struct: u64,
    va_obj: u64,
    page_array: PageArray,
    tables: Vec<u64>,
}

#[derive(Clone, Copy, Debug)]
enum PageArray {
    None,
    Kmalloc(u64),
    /// A nested vmalloc area (vmallocinfo prints "vpages").
    Vmalloc(u64),
}

impl std::fmt::Debug for VmArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmArea {{ addr: {:#x}, size: {}, flags: {:#x}, pages: {} }}", self.addr, self.size, self.flags, self.pages.len())
    }
}

impl VmArea {
    /// Bytes usable (the guard page excluded).
    pub fn usable(&self) -> u64 {
        self.pages.len() as u64 * (self.size / (self.pages.len() as u64 + u64::from(self.flags & VM_NO_GUARD == 0)))
    }

    /// The host mapping of this area's pages, made on first use.
    pub fn host(&self, m: &Machine) -> Result<&HostMap> {
        if let Some(h) = self.host.get() {
            return Ok(h);
        }
        let phys: Vec<u64> = self.pages.iter().map(|p| m.pfn_to_phys(*p).0).collect();
        let h = m.phys.map_pages(&phys, m.page_size)?;
        Ok(self.host.get_or_init(|| h))
    }
}

struct State {
    /// Free ranges: start -> end (exclusive).
    free: BTreeMap<u64, u64>,
    busy: BTreeMap<u64, Arc<VmArea>>,
    /// Lazily freed ranges waiting for a purge: start -> (end, vmap_area object).
    purge: BTreeMap<u64, (u64, u64)>,
    lazy_nr: u64,
}

/// The vmalloc space of a machine.
pub struct Vmalloc {
    pub start: u64,
    /// `VMALLOC_END`: areas end at or below it; `is_vmalloc_addr` excludes it.
    pub end: u64,
    state: Mutex<State>,
    pub nr_vmalloc_pages: AtomicU64,
    pub lazy_max: u64,
    pub purges: AtomicU64,
    /// `vmap_purge_lock`: one purge at a time, so that a search that
    /// failed and purges waits for a purge in flight to give its ranges back.
    purge_lock: Mutex<()>,
    cache: OnceLock<Arc<KmemCache>>,
}

fn fls(x: u64) -> u64 {
    64 - x.leading_zeros() as u64
}

impl Vmalloc {
    pub fn new(start: u64, end: u64, cpus: u32) -> Vmalloc {
        let mut free = BTreeMap::new();
        free.insert(start, end);
        Vmalloc {
            start,
            end,
            state: Mutex::new(State { free, busy: BTreeMap::new(), purge: BTreeMap::new(), lazy_nr: 0 }),
            nr_vmalloc_pages: AtomicU64::new(0),
            // lazy_max_pages() = fls(num_online_cpus()) * (32 MiB / PAGE_SIZE); set per page size in Machine::new.
            lazy_max: fls(cpus as u64),
            purges: AtomicU64::new(0),
            purge_lock: Mutex::new(()),
            cache: OnceLock::new(),
        }
    }
}

fn cs(s: &str) -> CallSite {
    Arc::from(s)
}

/// Insert [s, e) into the free map, merging with neighbours.
fn merge_free(free: &mut BTreeMap<u64, u64>, mut s: u64, mut e: u64) {
    if let Some((&ps, &pe)) = free.range(..s).next_back() {
        if pe == s {
            free.remove(&ps);
            s = ps;
        }
    }
    if let Some(&ne) = free.get(&e) {
        free.remove(&e);
        e = ne;
    }
    free.insert(s, e);
}

impl Machine {
    /// `lazy_max_pages()`.
    pub fn lazy_max_pages(&self) -> u64 {
        self.vm.vmalloc.lazy_max * ((32 << 20) / self.page_size)
    }

    /// `is_vmalloc_addr`.
    pub fn is_vmalloc_addr(&self, va: u64) -> bool {
        va >= self.vm.vmalloc.start && va < self.vm.vmalloc.end
    }

    /// `vmalloc_nr_pages()`: pages held by vmalloc areas (meminfo VmallocUsed).
    pub fn vmalloc_nr_pages(&self) -> u64 {
        self.vm.vmalloc.nr_vmalloc_pages.load(Relaxed)
    }

    pub(crate) fn vmap_area_cache(&self) -> Result<&Arc<KmemCache>> {
        if let Some(c) = self.vm.vmalloc.cache.get() {
            return Ok(c);
        }
        // vmalloc_init: KMEM_CACHE(vmap_area, SLAB_PANIC).
        let c = self
            .kmem_cache_create("vmap_area", VMAP_AREA_SIZE, CacheArgs { align: 8, flags: crate::slab::geometry::SLAB_PANIC, ..CacheArgs::default() })?
            .cache;
        Ok(self.vm.vmalloc.cache.get_or_init(|| c))
    }

    /// `alloc_vmap_area`: the lowest `size`-byte range aligned to `align`.
    /// Purges lazily freed ranges and retries once before failing.
    fn alloc_vmap_range(&self, size: u64, traced_align: u64) -> Option<u64> {
        // The trace shows the align asked for (1 for vmalloc); the search
        // aligns to at least a page.
        let align = traced_align.max(self.page_size);
        let vstart = self.vm.vmalloc.start;
        let vend_print = self.vm.vmalloc.end;
        for attempt in 0..2 {
            let found = {
                let mut st = self.vm.vmalloc.state.lock();
                let mut hit = None;
                for (&fs, &fe) in st.free.iter() {
                    let a = fs.div_ceil(align) * align;
                    if a.checked_add(size).is_some_and(|e| e <= fe) {
                        hit = Some((fs, fe, a));
                        break;
                    }
                }
                hit.map(|(fs, fe, a)| {
                    st.free.remove(&fs);
                    if fs < a {
                        st.free.insert(fs, a);
                    }
                    if a + size < fe {
                        st.free.insert(a + size, fe);
                    }
                    a
                })
            };
            // alloc_vmap_area traces every search, the failed one before the purge too.
            {
                if self.trace.on(EventId::AllocVmapArea) {
                    self.trace.emit(
                        self.this_cpu(),
                        Payload::AllocVmapArea {
                            addr: found.unwrap_or(0),
                            size,
                            align: traced_align,
                            vstart,
                            vend: vend_print,
                            failed: found.is_none(),
                        },
                    );
                }
            }
            if found.is_some() || attempt == 1 {
                return found;
            }
            self.purge_vmap_area_lazy();
        }
        None
    }

    fn release_vmap_range(&self, s: u64, e: u64) {
        let mut st = self.vm.vmalloc.state.lock();
        merge_free(&mut st.free, s, e);
    }

    /// `__get_vm_area_node`: vm_struct + vmap_area + the address range
    /// (`size` usable bytes, plus the guard page unless VM_NO_GUARD).
    fn get_vm_area(&self, size: u64, align: u64, flags: u32, gfp: Gfp) -> Result<(u64, u64, u64, u64)> {
        let gfp = gfp & gfp::GFP_RECLAIM_MASK;
        let vm_struct = self.kmalloc(VM_STRUCT_SIZE, gfp | gfp::__GFP_ZERO, &cs("__get_vm_area_node+0x6a/0x130"))?;
        let cache = match self.vmap_area_cache() {
            Ok(c) => c.clone(),
            Err(e) => {
                let _ = self.kfree(vm_struct.0, &cs("__get_vm_area_node+0x6a/0x130"));
                return Err(e);
            }
        };
        let va_obj = match self.kmem_cache_alloc(&cache, gfp, &cs("alloc_vmap_area+0x8f/0x4a0")) {
            Ok(v) => v,
            Err(e) => {
                let _ = self.kfree(vm_struct.0, &cs("__get_vm_area_node+0x6a/0x130"));
                return Err(e);
            }
        };
        let total = size + if flags & VM_NO_GUARD != 0 { 0 } else { self.page_size };
        match self.alloc_vmap_range(total, align) {
            Some(a) => Ok((a, total, vm_struct.0, va_obj.0)),
            None => {
                let _ = self.kmem_cache_free(&cache, va_obj, &cs("alloc_vmap_area+0x8f/0x4a0"));
                let _ = self.kfree(vm_struct.0, &cs("__get_vm_area_node+0x6a/0x130"));
                Err(KmmError::OutOfMemory {
                    order: 0,
                    gfp: gfp::GFP_KERNEL,
                    message: format!("vmap allocation for size {total} failed: use vmalloc=<size> to increase size"),
                })
            }
        }
    }

    fn put_vm_area_meta(&self, vm_struct: u64, va_obj: u64) {
        let _ = self.kfree(vm_struct, &cs("__get_vm_area_node+0x6a/0x130"));
        if let Some(c) = self.vm.vmalloc.cache.get() {
            let _ = self.kmem_cache_free(c, VirtAddr(va_obj), &cs("free_vmap_area+0x1b/0x60"));
        }
    }

    fn vmalloc_error(&self, size: u64, gfp: Gfp, why: &str) -> KmmError {
        KmmError::OutOfMemory {
            order: 0,
            gfp,
            message: format!(
                "vmalloc error: size {size}, {why}, mode:{:#x}({}), nodemask=(null)",
                gfp,
                gfp::format_pgg(gfp)
            ),
        }
    }

    /// `__vmalloc_node_range`: `size` bytes of virtually contiguous memory
    /// aligned to `align` with pages allocated with `gfp`; `flags` are
    /// VM_* flags added to VM_ALLOC. May sleep.
    pub fn vmalloc_node_range(&self, size: u64, align: u64, gfp: Gfp, flags: u32, caller: &CallSite) -> Result<Arc<VmArea>> {
        self.cpus.might_sleep("mm/vmalloc.c (__vmalloc_node_range_noprof)").map_err(KmmError::SleepInAtomic)?;
        if size == 0 {
            return Err(KmmError::InvalidArgument(
                "vmalloc(0): WARNING at mm/vmalloc.c __vmalloc_node_range_noprof: WARN_ON_ONCE(!size); returns NULL".into(),
            ));
        }
        if align == 0 || !align.is_power_of_two() {
            return Err(KmmError::InvalidArgument(format!("vmalloc: alignment {align} is not a power of two")));
        }
        let real = size;
        let size = size.checked_next_multiple_of(self.page_size).unwrap_or(u64::MAX);
        let nr_pages = size / self.page_size;
        if size == u64::MAX || nr_pages > self.totalram_pages() {
            return Err(self.vmalloc_error(real, gfp, "exceeds total pages"));
        }
        // Page gfp: __GFP_HIGHMEM unless a DMA zone was asked for.
        let mut page_gfp = gfp & !gfp::__GFP_COMP;
        if gfp & (gfp::__GFP_DMA | gfp::__GFP_DMA32) == 0 {
            page_gfp |= gfp::__GFP_HIGHMEM;
        }
        // Check the mask before anything is reserved.
        self.prepare_alloc(page_gfp, 0)?;
        let (addr, total, vm_struct, va_obj) = self.get_vm_area(size, align, VM_ALLOC | flags, gfp::GFP_KERNEL)?;
        let undo_area = |m: &Machine| {
            m.release_vmap_range(addr, addr + total);
            m.put_vm_area_meta(vm_struct, va_obj);
        };
        // The page array: kmalloc'ed, or vmalloc'ed when bigger than a page.
        let ptr_bytes = self.cfg.arch.pointer_bytes() as u64;
        let array_bytes = nr_pages * ptr_bytes;
        let page_array = if array_bytes > self.page_size {
            // __vmalloc_area_node: the nested area carries the outer caller.
            match self.vmalloc_node_range(array_bytes, 1, (gfp & gfp::GFP_RECLAIM_MASK) | gfp::__GFP_ZERO, 0, caller) {
                Ok(a) => PageArray::Vmalloc(a.addr),
                Err(e) => {
                    undo_area(self);
                    return Err(e);
                }
            }
        } else {
            match self.kmalloc(array_bytes, gfp::GFP_KERNEL | gfp::__GFP_ZERO, &cs("__vmalloc_area_node+0x9d/0x2b0")) {
                Ok(v) => PageArray::Kmalloc(v.0),
                Err(e) => {
                    undo_area(self);
                    return Err(e);
                }
            }
        };
        let free_array = |m: &Machine| match page_array {
            PageArray::Kmalloc(a) => {
                let _ = m.kfree(a, &cs("__vunmap+0x1c4/0x2b0"));
            }
            PageArray::Vmalloc(a) => m.discard_area(a),
            PageArray::None => {}
        };
        // vm_area_alloc_pages: order-0 pages one by one.
        let mut pages = Vec::with_capacity(nr_pages as usize);
        for _ in 0..nr_pages {
            match self.alloc_pages(page_gfp | gfp::__GFP_NOWARN, 0) {
                Ok(p) => pages.push(p),
                Err(_) => {
                    for p in pages {
                        let _ = self.free_pages(p, 0);
                    }
                    free_array(self);
                    undo_area(self);
                    return Err(self.vmalloc_error(real, gfp, "page order 0, failed to allocate pages"));
                }
            }
        }
        let tables = match self.map_pages_at(addr, &pages, gfp::GFP_KERNEL) {
            Ok(t) => t,
            Err(e) => {
            for p in pages {
                let _ = self.free_pages(p, 0);
            }
            free_array(self);
            undo_area(self);
            return Err(match e {
                KmmError::OutOfMemory { .. } => self.vmalloc_error(real, gfp, "failed to map pages"),
                e => e,
            });
            }
        };
        for p in &pages {
            self.mem_map.get(p.0).set_flag(PG_VMALLOC);
        }
        // Record the page pointers (vmemmap addresses, as struct page *) in the array.
        if let PageArray::Kmalloc(a) | PageArray::Vmalloc(a) = page_array {
            // x86_64: vmemmap + pfn * sizeof(struct page) (64); i386: mem_map
            // in lowmem, 32-byte pages (a plausible pointer, 4 bytes).
            let bytes: Vec<u8> = if ptr_bytes == 8 {
                pages.iter().flat_map(|p| (0xffff_ea00_0000_0000u64 + p.0 * 64).to_ne_bytes()).collect()
            } else {
                pages.iter().flat_map(|p| ((0xc100_0000u64 + p.0 * 32) as u32).to_ne_bytes()).collect()
            };
            let _ = self.write_nocheck(VirtAddr(a), &bytes);
        }
        self.vm.vmalloc.nr_vmalloc_pages.fetch_add(nr_pages, Relaxed);
        let meta = Meta { addr, size: total, vm_struct, va_obj, page_array, tables };
        Ok(self.register_area(meta, VM_ALLOC | flags, pages, caller, real))
    }

    /// Make the `VmArea` of a mapped range and enter it among the busy
    /// areas (marking its vmalloc'ed page array as its own).
    fn register_area(&self, m: Meta, flags: u32, pages: Vec<Pfn>, caller: &CallSite, requested: u64) -> Arc<VmArea> {
        self.register_area_pinned(m, flags, pages, caller, requested, Vec::new())
    }

    /// `register_area` for a vmap whose plain pages `map_pins` were pinned.
    fn register_area_pinned(
        &self,
        m: Meta,
        flags: u32,
        pages: Vec<Pfn>,
        caller: &CallSite,
        requested: u64,
        map_pins: Vec<u64>,
    ) -> Arc<VmArea> {
        // kasan_unpoison_vmalloc: the requested bytes (VM_ALLOC in
        // __vmalloc_node_range, others in __get_vm_area_node).
        self.kasan_unpoison_vmalloc(m.addr, requested);
        let area = Arc::new(VmArea {
            addr: m.addr,
            size: m.size,
            flags,
            pages,
            caller: caller.clone(),
            requested,
            pinned: AtomicU32::new(0),
            internal: AtomicU64::new(0),
            freed: AtomicBool::new(false),
            host: OnceLock::new(),
            vm_struct: m.vm_struct,
            va_obj: m.va_obj,
            page_array: m.page_array,
            map_pins,
            tables: m.tables,
        });
        let mut st = self.vm.vmalloc.state.lock();
        if let PageArray::Vmalloc(p) = m.page_array {
            if let Some(nested) = st.busy.get(&p) {
                nested.internal.store(m.addr, Relaxed);
            }
        }
        st.busy.insert(m.addr, area.clone());
        area
    }

    /// `vmalloc(size)`.
    pub fn vmalloc(&self, size: u64, gfp: Gfp, caller: &CallSite) -> Result<Arc<VmArea>> {
        self.refused_changes_nothing(|| self.vmalloc_node_range(size, 1, gfp, 0, caller))
    }

    /// `vmap(pages, count, VM_MAP, PAGE_KERNEL)`: map existing pages
    /// contiguously. The pages stay the caller's.
    pub fn vmap(&self, pages: &[Pfn], caller: &CallSite) -> Result<Arc<VmArea>> {
        self.cpus.might_sleep("mm/vmalloc.c (vmap)").map_err(KmmError::SleepInAtomic)?;
        self.refused_changes_nothing(|| self.vmap_gfp(pages, caller, gfp::GFP_KERNEL))
    }

    /// `vmap` with its metadata and page tables allocated with `gfp` (CPU
    /// bring-up maps IRQ stacks this way without sleeping).
    pub(crate) fn vmap_gfp(&self, pages: &[Pfn], caller: &CallSite, gfp: Gfp) -> Result<Arc<VmArea>> {
        if pages.is_empty() {
            return Err(KmmError::InvalidArgument("vmap: no pages (count 0)".into()));
        }
        if pages.len() as u64 > self.totalram_pages() {
            return Err(KmmError::InvalidArgument(format!("vmap: count {} exceeds totalram_pages", pages.len())));
        }
        for p in pages {
            if !self.pfn_valid(*p) {
                return Err(KmmError::InvalidArgument(format!("vmap: pfn {:#x} is not RAM", p.0)));
            }
        }
        let size = pages.len() as u64 * self.page_size;
        let (addr, total, vm_struct, va_obj) = self.get_vm_area(size, 1, VM_MAP, gfp)?;
        let tables = match self.map_pages_at(addr, pages, gfp) {
            Ok(t) => t,
            Err(e) => {
                self.release_vmap_range(addr, addr + total);
                self.put_vm_area_meta(vm_struct, va_obj);
                return Err(e);
            }
        };
        // The caller's own pages stay pinned while mapped (`pins.rs`).
        let mut map_pins: Vec<u64> = pages.iter().map(|p| p.0).filter(|&p| self.plain_alloc_head(p).is_some()).collect();
        map_pins.sort_unstable();
        map_pins.dedup();
        self.pin_pages(map_pins.iter().copied(), crate::pins::PinKind::Map);
        let meta = Meta { addr, size: total, vm_struct, va_obj, page_array: PageArray::None, tables };
        Ok(self.register_area_pinned(meta, VM_MAP, pages.to_vec(), caller, size, map_pins))
    }

    /// `find_vm_area(addr)`: the live area starting at... or containing `addr`.
    pub fn find_vm_area(&self, va: u64) -> Option<Arc<VmArea>> {
        let st = self.vm.vmalloc.state.lock();
        let (_, a) = st.busy.range(..=va).next_back()?;
        (va < a.addr + a.size).then(|| a.clone())
    }

    /// Look up the area `vfree`/`vunmap` is asked to free, with the kernel's
    /// warnings as errors. Nothing is changed.
    /// ... and, when it may be freed, take it out of the busy areas in the
    /// same critical section as the checks (so that no buffer export can
    /// pin it in between: see `pin_area`).
    fn area_to_free(&self, va: u64, what: &str) -> Result<Arc<VmArea>> {
        if va & (self.page_size - 1) != 0 {
            return Err(KmmError::InvalidFree(format!(
                "WARNING: at mm/vmalloc.c {what}: Trying to {what}() bad address ({va:#x})"
            )));
        }
        let mut st = self.vm.vmalloc.state.lock();
        if let Some(a) = st.busy.get(&va) {
            match a.internal.load(Relaxed) {
                0 => {}
                OWNER_IRQ_STACK => {
                    return Err(KmmError::InvalidFree(format!(
                        "{what}({va:#x}): this is a CPU's IRQ stack, which belongs to the CPU and is never freed"
                    )))
                }
                outer => {
                    return Err(KmmError::InvalidFree(format!(
                        "{what}({va:#x}): this area is the page array of the vmalloc area at {outer:#x}, freed with it"
                    )))
                }
            }
            if a.pinned.load(Relaxed) > 0 {
                return Err(KmmError::BufferBusy(format!(
                    "cannot {what} {va:#x}: a buffer export (memoryview) of it is alive"
                )));
            }
            if what == "vunmap" && a.flags & VM_ALLOC != 0 {
                return Err(KmmError::InvalidFree(format!(
                    "vunmap({va:#x}): a vmalloc area owns its pages and would leak them: free it with vfree"
                )));
            }
            if let PageArray::Vmalloc(p) = a.page_array {
                if st.busy.get(&p).is_some_and(|n| n.pinned.load(Relaxed) > 0) {
                    return Err(KmmError::BufferBusy(format!(
                        "cannot {what} {va:#x}: a buffer export of its page array is alive"
                    )));
                }
            }
            return Ok(st.busy.remove(&va).expect("found above"));
        }
        if st.purge.range(..=va).next_back().is_some_and(|(&s, &(e, _))| va >= s && va < e) {
            return Err(KmmError::DoubleFree(format!(
                "double free or corruption: WARNING at mm/vmalloc.c {what}: Trying to {what}() nonexistent vm area ({va:#x}): \
                 it was freed already and waits for the lazy purge"
            )));
        }
        let inside = st.busy.range(..va).next_back().filter(|(_, a)| va < a.addr + a.size).map(|(_, a)| a.addr);
        Err(KmmError::InvalidFree(match inside {
            Some(start) => format!(
                "WARNING: at mm/vmalloc.c {what}: Trying to {what}() nonexistent vm area ({va:#x}): it lies inside the area at {start:#x}"
            ),
            None if !self.is_vmalloc_addr(va) => format!(
                "WARNING: at mm/vmalloc.c {what}: Trying to {what}() nonexistent vm area ({va:#x}): not a vmalloc address{}",
                if self.virt_to_phys(VirtAddr(va)).is_ok() { " (a direct-map address: kmalloc memory is freed with kfree)" } else { "" }
            ),
            None => format!("WARNING: at mm/vmalloc.c {what}: Trying to {what}() nonexistent vm area ({va:#x})"),
        }))
    }

    /// `vfree(addr)`: unmap, free the pages, and put the range on the lazy
    /// purge list. NULL is a no-op. May sleep (except from interrupt context,
    /// where the kernel takes the vfree_atomic path).
    pub fn vfree(&self, va: u64) -> Result<()> {
        if va == 0 {
            return Ok(());
        }
        if !self.cpus.in_interrupt() {
            self.cpus.might_sleep("mm/vmalloc.c (vfree)").map_err(KmmError::SleepInAtomic)?;
        }
        let a = self.area_to_free(va, "vfree")?;
        self.release_area(a)
    }

    /// Free an area kmm made for itself (no sleep check, no owner check).
    pub(crate) fn vfree_internal(&self, va: u64) -> Result<()> {
        self.vfree_now(va)
    }

    /// The body of vfree/vunmap once the area is known to be freeable.
    fn vfree_now(&self, va: u64) -> Result<()> {
        let a = {
            let mut st = self.vm.vmalloc.state.lock();
            st.busy.remove(&va).ok_or_else(|| KmmError::InvalidFree(format!("Trying to vfree() nonexistent vm area ({va:#x})")))?
        };
        self.release_area(a)
    }

    /// Undo an area nobody has been given yet (the page array of a vmalloc
    /// that failed after mapping it): as vfree, but its range, its
    /// vmap_area and the page tables it installed go back at once, so
    /// that the refused call leaves the machine as it was.
    fn discard_area(&self, va: u64) {
        let Some(a) = self.vm.vmalloc.state.lock().busy.remove(&va) else { return };
        a.freed.store(true, Relaxed);
        self.unmap_pages_at(a.addr, a.pages.len() as u64);
        self.flush_tlb_kernel_range(a.addr, a.addr + a.size);
        for p in &a.pages {
            self.mem_map.get(p.0).clear_flag(PG_VMALLOC);
            let _ = self.free_pages(*p, 0);
        }
        self.vm.vmalloc.nr_vmalloc_pages.fetch_sub(a.pages.len() as u64, Relaxed);
        match a.page_array {
            PageArray::Kmalloc(p) => {
                let _ = self.kfree(p, &cs("__vunmap+0x1c4/0x2b0"));
            }
            PageArray::Vmalloc(p) => self.discard_area(p),
            PageArray::None => {}
        }
        self.free_new_tables(a.addr, a.addr + a.size, &a.tables);
        self.release_vmap_range(a.addr, a.addr + a.size);
        self.put_vm_area_meta(a.vm_struct, a.va_obj);
    }

    /// Everything vfree does once the area is out of the busy areas.
    fn release_area(&self, a: Arc<VmArea>) -> Result<()> {
        a.freed.store(true, Relaxed);
        // remove_vm_area: kasan_poison_vmalloc(addr, get_vm_area_size(vm)).
        let guard = if a.flags & VM_NO_GUARD != 0 { 0 } else { self.page_size };
        self.kasan_poison_vmalloc(a.addr, a.size - guard);
        self.unpin_pages(a.map_pins.iter().copied(), crate::pins::PinKind::Map);
        // remove_vm_area -> free_unmap_vmap_area: PTEs cleared, no TLB flush
        // yet, the range onto the purge list; then vfree frees the pages,
        // the page array and the vm_struct, in that order.
        self.unmap_pages_at(a.addr, a.pages.len() as u64);
        self.free_vmap_area_noflush(a.addr, a.addr + a.size, a.va_obj);
        if a.flags & VM_ALLOC != 0 {
            for p in &a.pages {
                self.mem_map.get(p.0).clear_flag(PG_VMALLOC);
                self.free_pages(*p, 0)?;
            }
            self.vm.vmalloc.nr_vmalloc_pages.fetch_sub(a.pages.len() as u64, Relaxed);
            match a.page_array {
                PageArray::Kmalloc(p) => self.kfree(p, &cs("vfree+0xe3/0x2a0"))?,
                PageArray::Vmalloc(p) => self.vfree_now(p)?,
                PageArray::None => {}
            }
        }
        let _ = self.kfree(a.vm_struct, &cs("vfree+0xfa/0x2a0"));
        Ok(())
    }

    /// `free_vmap_area_noflush`: onto the purge list; purge past lazy_max_pages.
    fn free_vmap_area_noflush(&self, s: u64, e: u64, va_obj: u64) {
        let pages = (e - s) / self.page_size;
        let nr_lazy = {
            let mut st = self.vm.vmalloc.state.lock();
            st.purge.insert(s, (e, va_obj));
            st.lazy_nr += pages;
            st.lazy_nr
        };
        let max = self.lazy_max_pages();
        if self.trace.on(EventId::FreeVmapAreaNoflush) {
            self.trace.emit(self.this_cpu(), Payload::FreeVmapAreaNoflush { va_start: s, nr_lazy, nr_lazy_max: max });
        }
        if nr_lazy > max {
            self.purge_vmap_area_lazy();
        }
    }

    /// `__purge_vmap_area_lazy` (also what `vm_unmap_aliases` ends in): one
    /// kernel-range TLB flush over every lazily freed range, then the ranges
    /// go back to the free space. Returns the areas purged.
    pub fn purge_vmap_area_lazy(&self) -> u32 {
        // Events (the purge's own, slab frees) reach sinks after the lock
        // drops: a sink may vfree, and so purge, again.
        let _defer = self.trace.defer();
        let _purging = self.vm.vmalloc.purge_lock.lock();
        let list = {
            let mut st = self.vm.vmalloc.state.lock();
            st.lazy_nr = 0;
            std::mem::take(&mut st.purge)
        };
        if list.is_empty() {
            return 0;
        }
        let start = *list.keys().next().expect("non-empty");
        let end = list.values().map(|v| v.0).max().expect("non-empty");
        self.flush_tlb_kernel_range(start, end);
        {
            let mut st = self.vm.vmalloc.state.lock();
            for (&s, &(e, _)) in &list {
                merge_free(&mut st.free, s, e);
            }
        }
        if let Some(c) = self.vm.vmalloc.cache.get() {
            for &(_, obj) in list.values() {
                let _ = self.kmem_cache_free(c, VirtAddr(obj), &cs("__purge_vmap_area_lazy+0x2ba/0x6f0"));
            }
        }
        self.vm.vmalloc.purges.fetch_add(1, Relaxed);
        let n = list.len() as u32;
        if self.trace.on(EventId::PurgeVmapAreaLazy) {
            self.trace.emit(self.this_cpu(), Payload::PurgeVmapAreaLazy { start, end, npurged: n });
        }
        n
    }

    /// Pin a live area for a buffer export: checked and counted under the
    /// area lock, so that a concurrent vfree either sees the pin or has
    /// already taken the area (then this fails).
    pub fn pin_area(&self, a: &Arc<VmArea>) -> Result<()> {
        let st = self.vm.vmalloc.state.lock();
        match st.busy.get(&a.addr) {
            Some(b) if Arc::ptr_eq(a, b) => {
                a.pinned.fetch_add(1, Relaxed);
                Ok(())
            }
            _ => Err(KmmError::UseAfterFree(format!(
                "BUG: KASAN: use-after-free: the vmalloc area at {:#x} was freed",
                a.addr
            ))),
        }
    }

    /// Undo one `pin_area`.
    pub fn unpin_area(&self, a: &VmArea) {
        a.pinned.fetch_sub(1, Relaxed);
    }

    /// Pages waiting on the lazy purge list (`vmap_lazy_nr`).
    pub fn vmap_lazy_nr(&self) -> u64 {
        self.vm.vmalloc.state.lock().lazy_nr
    }

    /// `vunmap(addr)`: release a vmap()ed area (its pages stay the caller's).
    pub fn vunmap(&self, va: u64) -> Result<()> {
        if va == 0 {
            return Ok(());
        }
        self.cpus.might_sleep("mm/vmalloc.c (vunmap)").map_err(KmmError::SleepInAtomic)?;
        let a = self.area_to_free(va, "vunmap")?;
        self.release_area(a)
    }

    /// `vmalloc_to_page`: the software walk; None if nothing is mapped.
    pub fn vmalloc_to_page(&self, va: u64) -> Result<Option<Pfn>> {
        if !self.is_vmalloc_addr(va) && !self.is_kmap_local_addr(va) && !self.is_pkmap_addr(va) {
            return Err(KmmError::InvalidArgument(format!(
                "vmalloc_to_page({va:#x}): VIRTUAL_BUG_ON(!is_vmalloc_or_module_addr(addr))"
            )));
        }
        let Ok(t) = self.vm.pt.walk(&self.phys, va) else { return Ok(None) };
        let pfn = self.phys_to_pfn(crate::PhysAddr(t.phys));
        if !self.pfn_valid(pfn) {
            // Simulated memory is writable, page tables included.
            return Err(KmmError::MemoryCorruption(format!(
                "vmalloc_to_page({va:#x}): the page table entry maps physical address {:#x}, which is not RAM \
                 (a corrupted page table)",
                t.phys
            )));
        }
        Ok(Some(pfn))
    }

    fn is_pkmap_addr(&self, va: u64) -> bool {
        let l = &self.vm.highmem.layout;
        l.highmem && va >= l.pkmap_base && va < l.pkmap_addr(l.last_pkmap)
    }

    /// `kvmalloc(size, gfp)`: kmalloc first (NOWARN, and NORETRY above a
    /// page), vmalloc when that fails and the mask may block.
    pub fn kvmalloc(&self, size: u64, gfp: Gfp, caller: &CallSite) -> Result<(VirtAddr, Option<Arc<VmArea>>)> {
        self.refused_changes_nothing(|| self.kvmalloc_(size, gfp, caller))
    }

    fn kvmalloc_(&self, size: u64, gfp: Gfp, caller: &CallSite) -> Result<(VirtAddr, Option<Arc<VmArea>>)> {
        if size > i32::MAX as u64 {
            // mm/util.c kvmalloc_node: "Don't even allow crazy sizes".
            return Err(KmmError::OutOfMemory {
                order: 0,
                gfp,
                message: format!("WARNING: at mm/util.c kvmalloc_node_noprof: size {size} > INT_MAX; returns NULL"),
            });
        }
        let mut kgfp = gfp;
        if size > self.page_size {
            kgfp |= gfp::__GFP_NOWARN;
            if gfp & gfp::__GFP_RETRY_MAYFAIL == 0 {
                kgfp |= gfp::__GFP_NORETRY;
            }
            kgfp &= !gfp::__GFP_NOFAIL;
        }
        if size <= crate::kmalloc::KMALLOC_MAX_SIZE {
            match self.kmalloc(size, kgfp, caller) {
                Ok(v) => return Ok((v, None)),
                Err(KmmError::OutOfMemory { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if !gfp::allow_blocking(gfp) {
            return Err(KmmError::OutOfMemory {
                order: 0,
                gfp,
                message: format!("kvmalloc: kmalloc of {size} bytes failed and {} cannot fall back to vmalloc", gfp::format_pgg(gfp)),
            });
        }
        let a = self.vmalloc_node_range(size, 1, gfp, 0, caller)?;
        Ok((VirtAddr(a.addr), Some(a)))
    }

    /// `kvfree(addr)`: vfree for vmalloc addresses, kfree otherwise.
    pub fn kvfree(&self, va: u64, caller: &CallSite) -> Result<()> {
        if self.is_vmalloc_addr(va) {
            self.vfree(va)
        } else {
            self.kfree(va, caller)
        }
    }

    /// /proc/vmallocinfo (mm/vmalloc.c `vmalloc_info_show`): live areas by
    /// address, then the lazily freed ones as "unpurged vm_area".
    pub fn vmallocinfo(&self) -> String {
        use std::fmt::Write as _;
        let st = self.vm.vmalloc.state.lock();
        let w = if self.cfg.arch.is_64bit() { 16 } else { 8 };
        let mut s = String::new();
        for a in st.busy.values() {
            let _ = write!(s, "0x{:0w$x}-0x{:0w$x} {:7} {}", a.addr, a.addr + a.size, a.size, a.caller);
            if a.flags & VM_ALLOC != 0 && !a.pages.is_empty() {
                let _ = write!(s, " pages={}", a.pages.len());
            }
            if a.flags & VM_IOREMAP != 0 {
                s.push_str(" ioremap");
            }
            if a.flags & VM_ALLOC != 0 {
                s.push_str(" vmalloc");
            }
            if a.flags & VM_MAP != 0 {
                s.push_str(" vmap");
            }
            if a.flags & VM_USERMAP != 0 {
                s.push_str(" user");
            }
            if matches!(a.page_array, PageArray::Vmalloc(_)) {
                s.push_str(" vpages");
            }
            // show_numa_info (CONFIG_NUMA, one node): pages per node.
            if a.flags & VM_ALLOC != 0 && !a.pages.is_empty() {
                let _ = write!(s, " N0={}", a.pages.len());
            }
            s.push('\n');
        }
        for (&b, &(e, _)) in &st.purge {
            let _ = writeln!(s, "0x{b:0w$x}-0x{e:0w$x} {:7} unpurged vm_area", e - b);
        }
        s
    }

    /// The vmalloc layer's own slab objects (each live area's vm_struct,
    /// vmap_area and kmalloc'd page array; the vmap_areas waiting for a
    /// purge): what the kernel reaches from its vmap_area tree, and
    /// kmemleak scans as referenced.
    pub(crate) fn vmalloc_internal_objects(&self) -> Vec<u64> {
        let st = self.vm.vmalloc.state.lock();
        let mut v = Vec::new();
        for a in st.busy.values() {
            v.push(a.vm_struct);
            v.push(a.va_obj);
            if let PageArray::Kmalloc(p) = a.page_array {
                v.push(p);
            }
        }
        v.extend(st.purge.values().map(|&(_, obj)| obj));
        v
    }

    /// Live areas, by address.
    pub fn vm_areas(&self) -> Vec<Arc<VmArea>> {
        self.vm.vmalloc.state.lock().busy.values().cloned().collect()
    }

    pub(crate) fn check_vmalloc(&self) -> Vec<String> {
        let mut errs = Vec::new();
        let v = &self.vm.vmalloc;
        let _no_purge = v.purge_lock.lock(); // a purge in flight holds ranges in neither map
        let st = v.state.lock();
        let mut ranges: Vec<(u64, u64, &str)> = Vec::new();
        ranges.extend(st.free.iter().map(|(&s, &e)| (s, e, "free")));
        ranges.extend(st.busy.values().map(|a| (a.addr, a.addr + a.size, "busy")));
        ranges.extend(st.purge.iter().map(|(&s, &(e, _))| (s, e, "lazy")));
        ranges.sort();
        let mut at = v.start;
        for &(s, e, kind) in &ranges {
            if s != at {
                errs.push(format!("vmalloc-1: {kind} range {s:#x}-{e:#x} does not start where the previous ended ({at:#x})"));
            }
            at = e;
        }
        if at != v.end {
            errs.push(format!("vmalloc-1: ranges end at {at:#x}, VMALLOC_END is {:#x}", v.end));
        }
        let mut pages = 0;
        for a in st.busy.values() {
            for (i, p) in a.pages.iter().enumerate() {
                let va = a.addr + i as u64 * self.page_size;
                match self.vm.pt.walk(&self.phys, va) {
                    Ok(t) if t.phys == self.pfn_to_phys(*p).0 => {}
                    other => errs.push(format!("vmalloc-2: page {i} of area {:#x} walks to {other:?}", a.addr)),
                }
                if a.flags & VM_ALLOC != 0 && self.mem_map.get(p.0).refcount() < 1 {
                    errs.push(format!("vmalloc-2: page {i} (pfn {:#x}) of area {:#x} is not allocated", p.0, a.addr));
                }
            }
            if a.flags & VM_NO_GUARD == 0 && self.vm.pt.walk(&self.phys, a.addr + a.size - self.page_size).is_ok() {
                errs.push(format!("vmalloc-2: the guard page of area {:#x} is mapped", a.addr));
            }
            if a.flags & VM_ALLOC != 0 {
                pages += a.pages.len() as u64;
            }
        }
        if pages != v.nr_vmalloc_pages.load(Relaxed) {
            errs.push(format!("vmalloc-3: nr_vmalloc_pages {} but areas hold {pages}", v.nr_vmalloc_pages.load(Relaxed)));
        }
        let lazy: u64 = st.purge.iter().map(|(&s, &(e, _))| (e - s) / self.page_size).sum();
        if lazy != st.lazy_nr {
            errs.push(format!("vmalloc-4: vmap_lazy_nr {} but the purge list holds {lazy} pages", st.lazy_nr));
        }
        errs
    }
}
