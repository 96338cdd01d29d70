//! KASAN, generic mode (`kasan=on`): a shadow byte per 8-byte granule of
//! kernel memory, poisoned where mm/kasan poisons it and checked on every
//! access Python makes (`Machine::read/write/access`, Blocks, `m.block`
//! views), with the kernel's reports, a quarantine that delays the reuse
//! of freed objects, and the allocation and free stacks of slab objects.
//!
//! # Kernel
//! `mm/kasan/generic.c` (`memory_is_poisoned_*`, `check_region_inline`,
//! `kasan_byte_accessible`, `kasan_cache_create` (in `slab/geometry.rs`),
//! `kasan_save_alloc_info`, `kasan_save_free_info`), `mm/kasan/common.c`
//! (`__kasan_unpoison_pages`, `__kasan_poison_pages`, `__kasan_poison_slab`,
//! `__kasan_unpoison_new_object`, `__kasan_poison_new_object`,
//! `unpoison_slab_object`, `__kasan_slab_alloc`, `poison_slab_object`,
//! `__kasan_slab_free`, `check_slab_allocation`, `poison_kmalloc_redzone`,
//! `poison_kmalloc_large_redzone`, `__kasan_krealloc`,
//! `check_page_allocation`, `__kasan_check_byte`), `mm/kasan/shadow.c`
//! (`kasan_poison`, `kasan_unpoison`, `kasan_poison_last_granule`,
//! `__kasan_unpoison_vmalloc`, `__kasan_poison_vmalloc`),
//! `mm/kasan/report.c` (`print_error_description`, `describe_object_addr`,
//! `describe_object_stacks`, `print_address_description`,
//! `print_memory_metadata`, `complete_report_info`,
//! `kasan_report_invalid_free`), `mm/kasan/report_generic.c`
//! (`kasan_find_first_bad_addr`, `kasan_get_alloc_size`,
//! `get_shadow_bug_type`, `get_wild_bug_type`), `mm/kasan/quarantine.c`
//! (`kasan_quarantine_put`, `kasan_quarantine_reduce`,
//! `kasan_quarantine_remove_cache`, QUARANTINE_PERCPU_SIZE,
//! QUARANTINE_FRACTION, QUARANTINE_BATCHES), `mm/kasan/kasan.h` (the
//! shadow values), `mm/vmalloc.c` (`__vmalloc_node_range_noprof`,
//! `__get_vm_area_node`, `remove_vm_area`: where vmalloc space is
//! unpoisoned and poisoned), `mm/page_alloc.c` (`post_alloc_hook`,
//! `free_pages_prepare`), `mm/slub.c` (`allocate_slab`, `setup_object`,
//! `slab_free_hook`, `free_large_kmalloc`), `mm/slab_common.c` (`ksize`,
//! `__do_krealloc`, `kmem_cache_destroy`, `kmem_cache_shrink`).
//!
//! ```text
//!   shadow byte   meaning (one per 8-byte granule)
//!   0x00          all 8 bytes accessible
//!   0x01..0x07    only the first N bytes accessible (kmalloc(123): granule 15 = 0x03)
//!   0xFF          KASAN_PAGE_FREE        a freed page              -> use-after-free
//!   0xFE          KASAN_PAGE_REDZONE     large kmalloc's tail      -> slab-out-of-bounds
//!   0xFC          KASAN_SLAB_REDZONE     slab redzone / unused obj -> slab-out-of-bounds
//!   0xFB          KASAN_SLAB_FREE        a freed slab object       -> slab-use-after-free
//!   0xFA          KASAN_SLAB_FREE_META   its first granule, free track saved
//!   0xF8          KASAN_VMALLOC_INVALID  vmalloc tail, guard, unused space -> vmalloc-out-of-bounds
//! ```
//! Two shadows: the direct map's (indexed by physical address, lowmem
//! only, as the kernel's) and vmalloc space's. Addresses below the kernel
//! half (`addr_has_metadata`) are "null-ptr-deref" (below PAGE_SIZE),
//! "user-memory-access" (below TASK_SIZE) or "wild-memory-access" (the
//! non-canonical hole); other kernel addresses have an all-zero shadow, as
//! the kernel's early shadow page, and fault in the MMU if unmapped.
//!
//! Costs: with `kasan=off` nothing is allocated and every hook is one
//! test of a boolean fixed at boot. With `kasan=on` the shadow is made
//! lazily in chunks of 2 MiB of memory (256 KiB of shadow); a chunk all
//! of one value (free memory at boot, a freed 2 MiB block) stays a
//! single byte.
//!
//! SIMPLIFICATION: the kernel reports the first bug only (unless
//! `kasan_multi_shot`) and lets the bad access happen; kmm reports every
//! bad access as a `KasanError` and refuses it, changing nothing. Stacks
//! are Python call sites (innermost first, from the hook the binding
//! installs) or, in a replay, the traced call site; the metadata lives
//! beside memory, not in the slot (the slot is sized as the kernel sizes
//! it, `kasan_cache_create`). The vmalloc shadow is never released
//! (`kasan_release_vmalloc`): unused vmalloc space reads
//! KASAN_VMALLOC_INVALID, where the kernel may fault on an unmapped
//! shadow page. SLAB_TYPESAFE_BY_RCU objects are neither poisoned nor
//! quarantined at free (no RCU grace periods; as without
//! CONFIG_SLUB_RCU_DEBUG). kmap windows (i386, where the kernel has no
//! KASAN) carry no shadow. `dump_page` is a short version. No stack
//! or global redzones (kmm has no compiled code).
//!
//! # Invariants (`check_kasan`)
//! - kasan-1: each quarantine list's byte count is the sum of its
//!   objects' slot sizes; the global size is the sum of its batches.
//! - kasan-2: a quarantined object is not live (object shadow), its cache
//!   exists, and its first shadow byte is KASAN_SLAB_FREE_META.
//! - kasan-3: every live vmalloc area's first byte is accessible and its
//!   guard page reads KASAN_VMALLOC_INVALID.
//!
//! Lock order: per-CPU quarantine list -> `quarantine_lock` (global);
//! neither is held while quarantined objects go back to their slabs
//! (which takes the slab per-CPU, node and zone locks). A track shard's
//! lock is innermost. Reports take the vmalloc area lock with nothing held.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::error::{KasanBug, KmmError, Result};
use crate::gfp::{self, Gfp};
use crate::machine::{Machine, MachineConfig};
use crate::page::Pfn;
use crate::slab::cache::ObjRef;
use crate::slab::geometry::SLAB_TYPESAFE_BY_RCU;
use crate::slab::KmemCache;

/// `KASAN_SHADOW_SCALE_SHIFT`: one shadow byte per 2^3 bytes.
pub const KASAN_SHADOW_SCALE_SHIFT: u32 = 3;
/// `KASAN_GRANULE_SIZE`.
pub const KASAN_GRANULE_SIZE: u64 = 1 << KASAN_SHADOW_SCALE_SHIFT;
const GMASK: u64 = KASAN_GRANULE_SIZE - 1;

// Shadow values (mm/kasan/kasan.h, generic mode).
pub const KASAN_PAGE_FREE: u8 = 0xFF;
pub const KASAN_PAGE_REDZONE: u8 = 0xFE;
pub const KASAN_SLAB_REDZONE: u8 = 0xFC;
pub const KASAN_SLAB_FREE: u8 = 0xFB;
pub const KASAN_SLAB_FREE_META: u8 = 0xFA;
pub const KASAN_GLOBAL_REDZONE: u8 = 0xF9;
pub const KASAN_VMALLOC_INVALID: u8 = 0xF8;

/// `QUARANTINE_PERCPU_SIZE`: bytes a CPU's list holds before it moves to
/// the global quarantine.
pub const QUARANTINE_PERCPU_SIZE: u64 = 1 << 20;
/// `QUARANTINE_FRACTION`: the quarantine may hold 1/32 of RAM.
pub const QUARANTINE_FRACTION: u64 = 32;

// ---- the shadow ----------------------------------------------------------------------

/// Memory bytes per shadow chunk (2 MiB: 2^18 granules, 2^15 words).
const CHUNK_SHIFT: u32 = 21;
const GRANULES_PER_CHUNK: u64 = 1 << (CHUNK_SHIFT - KASAN_SHADOW_SCALE_SHIFT);
const WORDS_PER_CHUNK: usize = (GRANULES_PER_CHUNK / 8) as usize;
/// Chunks per second-level table (2 GiB of memory).
const L2_BITS: u32 = 10;

fn rep(b: u8) -> u64 {
    u64::from(b) * 0x0101_0101_0101_0101
}

/// A materialised chunk: 8 shadow bytes per word (granule `g` is byte
/// `g % 8`, little end first), stored XORed with `key` so that the zeroed
/// allocation reads as the value the chunk had before.
struct Chunk {
    key: u64,
    words: Box<[AtomicU64]>,
}

/// One chunk's place: its uniform value while it has no words.
struct Slot {
    uniform: AtomicU8,
    chunk: OnceLock<Chunk>,
}

/// A lazily built shadow of a range of memory, every granule
/// `default` until written.
struct ShadowMap {
    default: u8,
    l1: Box<[OnceLock<Box<[Slot]>>]>,
}

impl ShadowMap {
    fn new(len: u64, default: u8) -> ShadowMap {
        let chunks = len.div_ceil(1 << CHUNK_SHIFT);
        let l1 = chunks.div_ceil(1 << L2_BITS) as usize;
        ShadowMap { default, l1: (0..l1).map(|_| OnceLock::new()).collect() }
    }

    fn empty() -> ShadowMap {
        ShadowMap { default: 0, l1: Box::new([]) }
    }

    #[inline]
    fn slot(&self, ci: u64) -> Option<&Slot> {
        self.l1.get((ci >> L2_BITS) as usize)?.get().map(|l2| &l2[(ci & ((1 << L2_BITS) - 1)) as usize])
    }

    fn slot_make(&self, ci: u64) -> &Slot {
        let l2 = self.l1[(ci >> L2_BITS) as usize].get_or_init(|| {
            (0..1 << L2_BITS).map(|_| Slot { uniform: AtomicU8::new(self.default), chunk: OnceLock::new() }).collect()
        });
        &l2[(ci & ((1 << L2_BITS) - 1)) as usize]
    }

    /// The shadow byte of granule `g` (an index from the map's start).
    #[inline]
    fn get(&self, g: u64) -> u8 {
        let ci = g / GRANULES_PER_CHUNK;
        match self.slot(ci) {
            None => self.default,
            Some(s) => match s.chunk.get() {
                None => s.uniform.load(Relaxed),
                Some(c) => {
                    let i = g % GRANULES_PER_CHUNK;
                    let w = c.words[(i / 8) as usize].load(Relaxed) ^ c.key;
                    (w >> (8 * (i % 8))) as u8
                }
            },
        }
    }

    /// Set granules `[g0, g1)` to `v`.
    fn set(&self, g0: u64, g1: u64, v: u8) {
        let mut g = g0;
        while g < g1 {
            let ci = g / GRANULES_PER_CHUNK;
            let cstart = ci * GRANULES_PER_CHUNK;
            let end = g1.min(cstart + GRANULES_PER_CHUNK);
            let (a, b) = (g - cstart, end - cstart);
            let whole = a == 0 && b == GRANULES_PER_CHUNK;
            match self.slot(ci) {
                None if v == self.default => {}
                slot => {
                    let s = slot.unwrap_or_else(|| self.slot_make(ci));
                    match s.chunk.get() {
                        None if whole => s.uniform.store(v, Relaxed),
                        None if s.uniform.load(Relaxed) == v => {}
                        c => {
                            let c = c.unwrap_or_else(|| {
                                s.chunk.get_or_init(|| Chunk {
                                    key: rep(s.uniform.load(Relaxed)),
                                    words: bytemuck::allocation::zeroed_slice_box(WORDS_PER_CHUNK),
                                })
                            });
                            Self::set_words(c, a, b, v);
                        }
                    }
                }
            }
            g = end;
        }
    }

    fn set_words(c: &Chunk, a: u64, b: u64, v: u8) {
        let val = rep(v) ^ c.key;
        let (w0, w1) = (a / 8, (b - 1) / 8);
        for w in w0..=w1 {
            let lo = if w == w0 { a % 8 } else { 0 };
            let hi = if w == w1 { (b - 1) % 8 + 1 } else { 8 };
            let word = &c.words[w as usize];
            if lo == 0 && hi == 8 {
                word.store(val, Relaxed);
            } else {
                let mask = (u64::MAX >> (64 - 8 * (hi - lo))) << (8 * lo);
                let _ = word.fetch_update(Relaxed, Relaxed, |old| Some((old & !mask) | (val & mask)));
            }
        }
    }

    /// The first granule in `[g0, g1)` whose shadow is not 0, with its value.
    fn first_nonzero(&self, g0: u64, g1: u64) -> Option<(u64, u8)> {
        let mut g = g0;
        while g < g1 {
            let ci = g / GRANULES_PER_CHUNK;
            let cstart = ci * GRANULES_PER_CHUNK;
            let end = g1.min(cstart + GRANULES_PER_CHUNK);
            match self.slot(ci) {
                None if self.default != 0 => return Some((g, self.default)),
                None => {}
                Some(s) => match s.chunk.get() {
                    None => {
                        let u = s.uniform.load(Relaxed);
                        if u != 0 {
                            return Some((g, u));
                        }
                    }
                    Some(c) => {
                        let (a, b) = (g - cstart, end - cstart);
                        let (w0, w1) = (a / 8, (b - 1) / 8);
                        for w in w0..=w1 {
                            let lo = if w == w0 { a % 8 } else { 0 };
                            let hi = if w == w1 { (b - 1) % 8 + 1 } else { 8 };
                            let mask = (u64::MAX >> (64 - 8 * (hi - lo))) << (8 * lo);
                            let x = (c.words[w as usize].load(Relaxed) ^ c.key) & mask;
                            if x != 0 {
                                let byte = u64::from(x.trailing_zeros() / 8);
                                return Some((cstart + w * 8 + byte, (x >> (8 * byte)) as u8));
                            }
                        }
                    }
                },
            }
            g = end;
        }
        None
    }

    /// Chunks with words (host memory spent: 256 KiB each).
    fn materialised(&self) -> u64 {
        self.l1.iter().filter_map(|l| l.get()).flat_map(|l2| l2.iter()).filter(|s| s.chunk.get().is_some()).count() as u64
    }
}

// ---- stacks ----------------------------------------------------------------------------

/// One frame of a stack: `ip` as `%pS` would print it ("func+0xline"),
/// `loc` where it is ("file.py:line").
#[derive(Clone, Debug)]
pub struct Frame {
    pub ip: String,
    pub loc: String,
}

/// A saved stack (a stack depot entry), resolved into frames only when a
/// report prints it: saving one costs what reading the raw stack costs.
pub trait Stack: Send + Sync {
    /// The frames, innermost first.
    fn frames(&self) -> Vec<Frame>;
}

/// How to save the caller's stack (the Python binding installs one that
/// keeps the Python frames' code objects and offsets, deduplicated).
pub type StackHook = fn() -> Option<Arc<dyn Stack>>;
static STACK_HOOK: OnceLock<StackHook> = OnceLock::new();

/// Install the stack hook (once; later calls are ignored).
pub fn set_stack_hook(h: StackHook) {
    let _ = STACK_HOOK.set(h);
}

thread_local! {
    static TRACED: Cell<u32> = const { Cell::new(0) };
}

/// While alive, this thread's tracks record the call site an operation
/// is given (a replay's traced call site) instead of asking the hook.
pub struct TracedStacks(());

impl TracedStacks {
    pub fn enter() -> TracedStacks {
        TRACED.with(|t| t.set(t.get() + 1));
        TracedStacks(())
    }
}

impl Drop for TracedStacks {
    fn drop(&mut self) {
        TRACED.with(|t| t.set(t.get().saturating_sub(1)));
    }
}

/// `kasan_save_stack`: the caller's stack, if there is a hook and this is
/// not a replay.
fn save_stack() -> Option<Arc<dyn Stack>> {
    if TRACED.with(|t| t.get()) > 0 {
        return None;
    }
    STACK_HOOK.get().and_then(|h| h())
}

/// The caller's frames now (for a report's header and call trace).
fn frames() -> Vec<Frame> {
    save_stack().map(|s| s.frames()).unwrap_or_default()
}

/// The pid the reports name (`task_pid_nr(current)`): the process's.
fn pid() -> u32 {
    static PID: OnceLock<u32> = OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// `current->comm`: the calling thread's name.
fn comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .map(|s| s.trim_end().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kmm".into())
}

/// Where a track's stack came from.
#[derive(Clone)]
enum StackRef {
    /// The caller's stack (Python frames).
    Saved(Arc<dyn Stack>),
    /// The call site an operation was given (a replay's traced one).
    Site(Arc<str>),
    None,
}

/// A saved track (`struct kasan_track`): the task and its stack.
#[derive(Clone)]
struct Track {
    pid: u32,
    stack: StackRef,
}

impl Track {
    fn new(stack: Option<Arc<dyn Stack>>, call_site: Option<&str>) -> Track {
        let stack = match (stack, call_site) {
            (Some(s), _) => StackRef::Saved(s),
            (None, Some(cs)) if cs != "python" => StackRef::Site(Arc::from(cs)),
            _ => StackRef::None,
        };
        Track { pid: pid(), stack }
    }

    /// `print_track`'s stack lines.
    fn text(&self) -> String {
        let mut s = String::new();
        match &self.stack {
            StackRef::Saved(st) => {
                for f in st.frames() {
                    let _ = writeln!(s, " {} ({})", f.ip, f.loc);
                }
            }
            StackRef::Site(cs) => {
                let _ = writeln!(s, " {cs}");
            }
            StackRef::None => {}
        }
        if s.is_empty() {
            s.push_str("(stack is not available)\n");
        }
        s
    }
}

#[derive(Clone, Default)]
struct Tracks {
    alloc: Option<Track>,
    free: Option<Track>,
}

const TRACK_SHARDS: usize = 64;

// ---- the quarantine --------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct QEntry {
    cache: u32,
    obj: u64,
    slab_id: u32,
    slab_pfn: u64,
    size: u64,
}

#[derive(Debug, Default)]
struct QList {
    q: VecDeque<QEntry>,
    bytes: u64,
}

impl QList {
    fn take(&mut self) -> QList {
        std::mem::take(self)
    }
    fn append(&mut self, mut o: QList) {
        self.bytes += o.bytes;
        self.q.append(&mut o.q);
    }
    /// Remove the entries of `cache`, returning them.
    fn remove_cache(&mut self, cache: u32) -> Vec<QEntry> {
        let (out, keep): (Vec<QEntry>, Vec<QEntry>) = self.q.drain(..).partition(|e| e.cache == cache);
        self.q = keep.into();
        self.bytes -= out.iter().map(|e| e.size).sum::<u64>();
        out
    }
}

struct Global {
    /// `global_quarantine[]`: a round-robin FIFO of batches.
    batches: Vec<QList>,
    head: usize,
    tail: usize,
    /// `quarantine_size`, `quarantine_max_size`, `quarantine_batch_size`.
    size: u64,
    max_size: u64,
    batch_size: u64,
}

struct Quarantine {
    cpus: Box<[Mutex<QList>]>,
    global: Mutex<Global>,
    /// READ_ONCE(quarantine_size) > READ_ONCE(quarantine_max_size), kept
    /// under the lock: `kasan_quarantine_reduce`'s lock-free first test.
    over: std::sync::atomic::AtomicBool,
}

impl Quarantine {
    fn new(cpus: u32, on: bool) -> Quarantine {
        // QUARANTINE_BATCHES: 1024, or 4 per possible CPU if more.
        let batches = if on { 1024usize.max(4 * cpus as usize) } else { 0 };
        Quarantine {
            cpus: (0..if on { cpus } else { 0 }).map(|_| Mutex::new(QList::default())).collect(),
            global: Mutex::new(Global {
                batches: (0..batches).map(|_| QList::default()).collect(),
                head: 0,
                tail: 0,
                size: 0,
                max_size: 0,
                batch_size: 0,
            }),
            over: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

// ---- the state -------------------------------------------------------------------------

/// A machine's KASAN state (empty when `kasan=off`).
pub struct Kasan {
    on: bool,
    page_offset: u64,
    /// Bytes of the direct map (lowmem).
    lowmem: u64,
    direct: ShadowMap,
    vstart: u64,
    vend: u64,
    vmalloc: ShadowMap,
    /// TASK_SIZE, and the lowest address with shadow (`addr_has_metadata`).
    task_size: u64,
    meta_start: u64,
    page_size: u64,
    ptr_width: usize,
    tracks: Box<[Mutex<BTreeMap<u64, Tracks>>]>,
    quarantine: Quarantine,
    /// Reports made (every one refused its operation).
    pub reports: AtomicU64,
}

impl Kasan {
    /// The state for a machine about to boot: lowmem of `lowmem` bytes,
    /// vmalloc space `[vstart, vend)`.
    pub fn new(cfg: &MachineConfig, lowmem: u64, vstart: u64, vend: u64) -> Kasan {
        let on = cfg.cmdline.kasan;
        let arch = cfg.arch;
        let (task_size, meta_start) = if arch.is_64bit() {
            // TASK_SIZE_MAX with 4-level paging; kasan_shadow_to_mem(KASAN_SHADOW_START).
            (0x0000_7fff_ffff_f000, 0xffff_8000_0000_0000)
        } else {
            (arch.page_offset(), arch.page_offset())
        };
        Kasan {
            on,
            page_offset: arch.page_offset(),
            lowmem,
            direct: if on { ShadowMap::new(lowmem, KASAN_PAGE_FREE) } else { ShadowMap::empty() },
            vstart,
            vend,
            vmalloc: if on { ShadowMap::new(vend - vstart, KASAN_VMALLOC_INVALID) } else { ShadowMap::empty() },
            task_size,
            meta_start,
            page_size: cfg.page_size as u64,
            ptr_width: 2 * arch.pointer_bytes() as usize,
            tracks: (0..if on { TRACK_SHARDS } else { 0 }).map(|_| Mutex::new(BTreeMap::new())).collect(),
            quarantine: Quarantine::new(cfg.cpus, on),
            reports: AtomicU64::new(0),
        }
    }

    /// Is KASAN on (`kasan=on` at boot)?
    #[inline]
    pub fn enabled(&self) -> bool {
        self.on
    }

    /// The shadow byte of the granule holding `va` (0 where there is no
    /// shadow: the kernel's early shadow page).
    pub fn shadow_byte(&self, va: u64) -> u8 {
        if va >= self.page_offset && va - self.page_offset < self.lowmem {
            self.direct.get((va - self.page_offset) >> KASAN_SHADOW_SCALE_SHIFT)
        } else if va >= self.vstart && va < self.vend {
            self.vmalloc.get((va - self.vstart) >> KASAN_SHADOW_SCALE_SHIFT)
        } else {
            0
        }
    }

    /// `kasan_poison`/`kasan_unpoison` of whole granules: `[va, va + size)`
    /// (va granule-aligned; size rounded up) set to `v`.
    fn set(&self, va: u64, size: u64, v: u8) {
        if size == 0 {
            return;
        }
        let end = va.saturating_add(size);
        if va >= self.page_offset && va - self.page_offset < self.lowmem {
            let (a, b) = (va - self.page_offset, (end - self.page_offset).min(self.lowmem));
            self.direct.set(a >> 3, b.div_ceil(KASAN_GRANULE_SIZE), v);
        } else if va >= self.vstart && va < self.vend {
            let (a, b) = (va - self.vstart, end.min(self.vend) - self.vstart);
            self.vmalloc.set(a >> 3, b.div_ceil(KASAN_GRANULE_SIZE), v);
        }
    }

    /// `kasan_unpoison(addr, size)`: granules accessible, the last one
    /// partially (its shadow the count of accessible bytes).
    fn unpoison(&self, va: u64, size: u64) {
        if size == 0 {
            return;
        }
        self.set(va, size & !GMASK, 0);
        if size & GMASK != 0 {
            self.set(va + (size & !GMASK), 1, (size & GMASK) as u8);
        }
    }

    /// `poison_kmalloc_redzone`-style: `[va, va+size)` accessible, then
    /// `value` up to `end` (both granule-rounded as the kernel does).
    fn unpoison_with_redzone(&self, va: u64, size: u64, end: u64, value: u8) {
        self.unpoison(va, size);
        let rz = (va + size).next_multiple_of(KASAN_GRANULE_SIZE);
        let end = end.next_multiple_of(KASAN_GRANULE_SIZE);
        if end > rz {
            self.set(rz, end - rz, value);
        }
    }

    /// The first granule (its address, aligned) at or after `va` in the
    /// `count` granules from `va` whose shadow is not 0.
    fn first_nonzero(&self, va: u64, count: u64) -> Option<(u64, u8)> {
        let mut g = va & !GMASK;
        let mut left = count;
        while left > 0 {
            let (map, base, limit): (Option<&ShadowMap>, u64, u64) =
                if g >= self.page_offset && g - self.page_offset < self.lowmem {
                    (Some(&self.direct), self.page_offset, self.page_offset + self.lowmem)
                } else if g >= self.vstart && g < self.vend {
                    (Some(&self.vmalloc), self.vstart, self.vend)
                } else {
                    // No shadow up to the next region that has one.
                    let next = [self.page_offset, self.page_offset.saturating_add(self.lowmem), self.vstart, self.vend]
                        .into_iter()
                        .filter(|&b| b > g)
                        .min()
                        .unwrap_or(u64::MAX);
                    (None, 0, next)
                };
            let here = ((limit - g).div_ceil(KASAN_GRANULE_SIZE)).min(left);
            if let Some(map) = map {
                let g0 = (g - base) >> 3;
                if let Some((hit, v)) = map.first_nonzero(g0, g0 + here) {
                    return Some((base + (hit << 3), v));
                }
            }
            left -= here;
            g = match g.checked_add(here * KASAN_GRANULE_SIZE) {
                Some(x) => x,
                None => break,
            };
        }
        None
    }

    /// `memory_is_poisoned(addr, size)` (size >= 1, no wrap).
    fn poisoned(&self, va: u64, n: u64) -> bool {
        let last = va + n - 1;
        let count = (last >> 3) - (va >> 3) + 1;
        match self.first_nonzero(va, count) {
            None => false,
            Some((g, v)) => g != last & !GMASK || ((last & GMASK) as i8) >= v as i8,
        }
    }

    /// `kasan_byte_accessible`.
    fn byte_accessible(&self, va: u64) -> bool {
        let s = self.shadow_byte(va) as i8;
        (0..KASAN_GRANULE_SIZE as i8).contains(&s)
    }

    /// `kasan_find_first_bad_addr`.
    fn first_bad_addr(&self, va: u64, n: u64) -> u64 {
        if va < self.meta_start {
            return va;
        }
        let mut p = va;
        let end = va.saturating_add(n);
        while p < end && self.shadow_byte(p) == 0 {
            p += KASAN_GRANULE_SIZE;
        }
        p
    }

    /// `get_bug_type` (report_generic.c).
    fn bug_type(&self, va: u64, n: u64, first_bad: u64) -> &'static str {
        if va.checked_add(n).is_none() {
            return "out-of-bounds";
        }
        if va < self.meta_start {
            return if va < self.page_size {
                "null-ptr-deref"
            } else if va < self.task_size {
                "user-memory-access"
            } else {
                "wild-memory-access"
            };
        }
        let mut s = self.shadow_byte(first_bad);
        if s > 0 && s < KASAN_GRANULE_SIZE as u8 {
            s = self.shadow_byte(first_bad.wrapping_add(KASAN_GRANULE_SIZE));
        }
        match s {
            0..=7 => "out-of-bounds",
            KASAN_PAGE_REDZONE | KASAN_SLAB_REDZONE => "slab-out-of-bounds",
            KASAN_GLOBAL_REDZONE => "global-out-of-bounds",
            0xF1..=0xF4 => "stack-out-of-bounds",
            KASAN_PAGE_FREE => "use-after-free",
            KASAN_SLAB_FREE | KASAN_SLAB_FREE_META => "slab-use-after-free",
            0xCA | 0xCB => "alloca-out-of-bounds",
            KASAN_VMALLOC_INVALID => "vmalloc-out-of-bounds",
            _ => "unknown-crash",
        }
    }

    fn shard(&self, phys: u64) -> &Mutex<BTreeMap<u64, Tracks>> {
        &self.tracks[((phys >> CHUNK_SHIFT) as usize) % TRACK_SHARDS]
    }

    fn tracks_of(&self, phys: u64) -> Tracks {
        self.shard(phys).lock().get(&phys).cloned().unwrap_or_default()
    }

    /// Forget the tracks of objects in `[phys, phys + len)` (a new slab:
    /// `kasan_init_object_meta` zeroes the alloc meta).
    fn forget_tracks(&self, phys: u64, len: u64) {
        let mut at = phys & !((1 << CHUNK_SHIFT) - 1);
        while at < phys + len {
            let mut t = self.shard(at).lock();
            let keys: Vec<u64> = t.range(phys..phys + len).map(|(k, _)| *k).collect();
            for k in keys {
                t.remove(&k);
            }
            at += 1 << CHUNK_SHIFT;
        }
    }
}

/// `%px` of an address for this machine's pointer width.
fn px(k: &Kasan, a: u64) -> String {
    format!("{a:0w$x}", w = k.ptr_width)
}

// ---- the machine's KASAN ---------------------------------------------------------------

impl Machine {
    /// Is KASAN on?
    #[inline]
    pub fn kasan_on(&self) -> bool {
        self.kasan.on
    }

    #[inline]
    fn kphys(&self, va: u64) -> u64 {
        va - self.cfg.arch.page_offset()
    }

    /// Boot: what memblock left reserved (pfn 0, a recorded machine's
    /// holes and reservations) has an accessible shadow, as the kernel's
    /// shadow of memblock memory before `memblock_free_all` poisons the
    /// freed pages. Everything else starts as KASAN_PAGE_FREE.
    pub(crate) fn kasan_boot(&self) {
        if !self.kasan.on {
            return;
        }
        let mut pfn = 0;
        while pfn < self.max_low_pfn {
            if self.mem_map.get(pfn).has(crate::page::PG_RESERVED) {
                let start = pfn;
                while pfn < self.max_low_pfn && self.mem_map.get(pfn).has(crate::page::PG_RESERVED) {
                    pfn += 1;
                }
                let va = self.cfg.arch.page_offset() + (start << self.page_shift);
                self.kasan.set(va, (pfn - start) << self.page_shift, 0);
            } else {
                pfn += 1;
            }
        }
    }

    // ---- the page allocator ----------------------------------------------------------

    /// `kasan_unpoison_pages` (post_alloc_hook): a new block is accessible
    /// (lowmem only: highmem has no direct-map shadow).
    #[inline]
    pub(crate) fn kasan_unpoison_pages(&self, pfn: Pfn, order: u32) {
        if self.kasan.on && self.pfn_is_lowmem(pfn) {
            let va = self.cfg.arch.page_offset() + (pfn.0 << self.page_shift);
            self.kasan.set(va, self.page_size << order, 0);
        }
    }

    /// `kasan_poison_pages` (free_pages_prepare): a freed block is
    /// KASAN_PAGE_FREE.
    #[inline]
    pub(crate) fn kasan_poison_pages(&self, pfn: Pfn, order: u32) {
        if self.kasan.on && self.pfn_is_lowmem(pfn) {
            let va = self.cfg.arch.page_offset() + (pfn.0 << self.page_shift);
            self.kasan.set(va, self.page_size << order, KASAN_PAGE_FREE);
        }
    }

    /// `kasan_poison_slab` (allocate_slab): a new slab is all redzone
    /// until its objects are allocated; its objects' old tracks go.
    #[inline]
    pub(crate) fn kasan_poison_slab(&self, pfn: Pfn, order: u32) {
        if self.kasan.on {
            let phys = pfn.0 << self.page_shift;
            self.kasan.set(self.cfg.arch.page_offset() + phys, self.page_size << order, KASAN_SLAB_REDZONE);
            self.kasan.forget_tracks(phys, self.page_size << order);
        }
    }

    // ---- slab objects ----------------------------------------------------------------

    /// `kasan_unpoison_new_object`: around a ctor call.
    #[inline]
    pub(crate) fn kasan_unpoison_new_object(&self, c: &KmemCache, obj: u64) {
        if self.kasan.on {
            self.kasan.unpoison(obj, c.object_size() as u64);
        }
    }

    /// `kasan_poison_new_object`: after the ctor, back to redzone.
    #[inline]
    pub(crate) fn kasan_poison_new_object(&self, c: &KmemCache, obj: u64) {
        if self.kasan.on {
            self.kasan.set(obj, (c.object_size() as u64).next_multiple_of(KASAN_GRANULE_SIZE), KASAN_SLAB_REDZONE);
        }
    }

    fn kasan_save_track(&self, obj: u64, alloc: bool, st: &Option<Arc<dyn Stack>>, call_site: Option<&str>) {
        let phys = self.kphys(obj);
        let t = Track::new(st.clone(), call_site);
        let mut sh = self.kasan.shard(phys).lock();
        let e = sh.entry(phys).or_default();
        if alloc {
            *e = Tracks { alloc: Some(t), free: None };
        } else {
            e.free = Some(t);
        }
    }

    /// `__kasan_slab_alloc`: reduce the quarantine (when the mask may
    /// block), unpoison the whole object, save the alloc track (kmalloc
    /// caches save theirs in `kasan_kmalloc`).
    #[inline]
    pub(crate) fn kasan_slab_alloc(&self, c: &KmemCache, obj: u64, gfp: Gfp, call_site: Option<&str>) {
        if self.kasan.on {
            self.kasan_slab_alloc_on(c, obj, gfp, call_site);
        }
    }

    fn kasan_slab_alloc_on(&self, c: &KmemCache, obj: u64, gfp: Gfp, call_site: Option<&str>) {
        if gfp::allow_blocking(gfp) {
            self.kasan_quarantine_reduce();
        }
        self.kasan.unpoison(obj, c.object_size() as u64);
        if c.flags & crate::slab::geometry::SLAB_KMALLOC == 0 {
            self.kasan_save_track(obj, true, &save_stack(), call_site);
        }
    }

    /// `kasan_slab_alloc` for a bulk allocation: one stack for all.
    #[inline]
    pub(crate) fn kasan_slab_alloc_bulk(&self, c: &KmemCache, objs: &[u64], gfp: Gfp) {
        if self.kasan.on {
            self.kasan_slab_alloc_bulk_on(c, objs, gfp);
        }
    }

    fn kasan_slab_alloc_bulk_on(&self, c: &KmemCache, objs: &[u64], gfp: Gfp) {
        if gfp::allow_blocking(gfp) {
            self.kasan_quarantine_reduce();
        }
        let st = save_stack();
        let kmalloc = c.flags & crate::slab::geometry::SLAB_KMALLOC != 0;
        for &o in objs {
            self.kasan.unpoison(o, c.object_size() as u64);
            if !kmalloc {
                self.kasan_save_track(o, true, &st, None);
            }
        }
    }

    /// `kasan_kmalloc` (`poison_kmalloc_redzone`): the requested `size`
    /// accessible, the rest of the object redzone (byte-precise in the
    /// last granule), and the alloc track. Also what `__kasan_slab_alloc`
    /// did first (quarantine reduce, unpoison).
    #[inline]
    pub(crate) fn kasan_kmalloc(&self, c: &KmemCache, obj: u64, size: u64, gfp: Gfp, call_site: &str) {
        if self.kasan.on {
            self.kasan_kmalloc_on(c, obj, size, gfp, call_site);
        }
    }

    fn kasan_kmalloc_on(&self, c: &KmemCache, obj: u64, size: u64, gfp: Gfp, call_site: &str) {
        if gfp::allow_blocking(gfp) {
            self.kasan_quarantine_reduce();
        }
        self.kasan.unpoison_with_redzone(obj, size, obj + c.object_size() as u64, KASAN_SLAB_REDZONE);
        self.kasan_save_track(obj, true, &save_stack(), Some(call_site));
    }

    /// `__kasan_kmalloc_large` (`poison_kmalloc_large_redzone`): the pages
    /// were unpoisoned by the page allocator; past `size` is
    /// KASAN_PAGE_REDZONE.
    #[inline]
    pub(crate) fn kasan_kmalloc_large(&self, va: u64, size: u64, order: u32) {
        if self.kasan.on {
            self.kasan.unpoison_with_redzone(va, size, va + (self.page_size << order), KASAN_PAGE_REDZONE);
        }
    }

    /// `__kasan_krealloc` in place: `size` bytes accessible, the redzone
    /// after them (slab or large kmalloc), and a new alloc track.
    #[inline]
    pub(crate) fn kasan_krealloc(&self, va: u64, size: u64, call_site: &str) {
        if self.kasan.on {
            self.kasan_krealloc_on(va, size, call_site);
        }
    }

    fn kasan_krealloc_on(&self, va: u64, size: u64, call_site: &str) {
        match self.virt_to_slab(va) {
            Some((_, c)) => {
                self.kasan.unpoison_with_redzone(va, size, va + c.object_size() as u64, KASAN_SLAB_REDZONE);
                self.kasan_save_track(va, true, &save_stack(), Some(call_site));
            }
            None => {
                let pfn = self.compound_head(self.phys_to_pfn(crate::PhysAddr(self.kphys(va))));
                let order = self.mem_map.get(pfn.0).order();
                self.kasan_kmalloc_large(va, size, order);
            }
        }
    }

    /// `__kasan_check_byte` (ksize, krealloc, kmem_cache_destroy): a read
    /// of one byte, reported if it is not accessible.
    #[inline]
    pub fn kasan_check_byte(&self, va: u64) -> Result<()> {
        if self.kasan.on && !self.kasan.byte_accessible(va) {
            return Err(self.kasan_report(va, 1, false));
        }
        Ok(())
    }

    /// `kasan_slab_pre_free` (`check_slab_allocation`): freeing an object
    /// whose first byte is not accessible is a double free.
    #[inline]
    pub(crate) fn kasan_slab_pre_free(&self, c: &KmemCache, obj: u64) -> Result<()> {
        if self.kasan.on && c.flags & SLAB_TYPESAFE_BY_RCU == 0 && !self.kasan.byte_accessible(obj) {
            return Err(self.kasan_report_free(obj, true));
        }
        Ok(())
    }

    /// An invalid free as KASAN reports it (`check_slab_allocation`,
    /// `check_page_allocation`: the pointer is not the start of an
    /// object); `e` is what kmm says without KASAN.
    pub(crate) fn kasan_invalid_free(&self, va: u64, e: KmmError) -> KmmError {
        if self.kasan.on && matches!(e, KmmError::InvalidFree(_)) {
            self.kasan_report_free(va, false)
        } else {
            e
        }
    }

    /// `__kasan_slab_free` (`poison_slab_object`, `kasan_save_free_info`,
    /// `kasan_quarantine_put`). True: the object went to the quarantine
    /// and must not go back to its slab now.
    #[inline]
    pub(crate) fn kasan_slab_free(&self, c: &KmemCache, o: &ObjRef, obj: u64, call_site: Option<&str>) -> bool {
        if !self.kasan.on || c.flags & SLAB_TYPESAFE_BY_RCU != 0 {
            return false;
        }
        self.kasan_poison_freed(c, o, obj, &save_stack(), call_site);
        true
    }

    #[inline(never)]
    fn kasan_poison_freed(&self, c: &KmemCache, o: &ObjRef, obj: u64, st: &Option<Arc<dyn Stack>>, call_site: Option<&str>) {
        let os = (c.object_size() as u64).next_multiple_of(KASAN_GRANULE_SIZE);
        self.kasan.set(obj, os, KASAN_SLAB_FREE);
        self.kasan_save_track(obj, false, st, call_site);
        // kasan_save_free_info: the free meta is valid.
        self.kasan.set(obj, 1, KASAN_SLAB_FREE_META);
        self.kasan_quarantine_put(QEntry {
            cache: c.id,
            obj,
            slab_id: o.slab_id,
            slab_pfn: o.slab_pfn,
            size: c.geo.size as u64,
        });
    }

    /// `kmem_cache_free_bulk` with KASAN: every object is poisoned and
    /// quarantined (one stack for all); returns those that go straight
    /// back to their slab (SLAB_TYPESAFE_BY_RCU caches).
    #[inline]
    pub(crate) fn kasan_slab_free_bulk(&self, c: &KmemCache, objs: Vec<(u64, ObjRef)>) -> Vec<(u64, ObjRef)> {
        if !self.kasan.on || c.flags & SLAB_TYPESAFE_BY_RCU != 0 {
            return objs;
        }
        self.kasan_slab_free_bulk_on(c, objs)
    }

    fn kasan_slab_free_bulk_on(&self, c: &KmemCache, objs: Vec<(u64, ObjRef)>) -> Vec<(u64, ObjRef)> {
        let st = save_stack();
        for (obj, o) in &objs {
            self.kasan_poison_freed(c, o, *obj, &st, None);
        }
        Vec::new()
    }

    // ---- vmalloc ---------------------------------------------------------------------

    /// `kasan_unpoison_vmalloc(addr, size)`: a new area's `size` requested
    /// bytes (byte-precise); the rest of it and its guard stay
    /// KASAN_VMALLOC_INVALID.
    pub(crate) fn kasan_unpoison_vmalloc(&self, addr: u64, size: u64) {
        if self.kasan.on {
            self.kasan.unpoison(addr, size);
        }
    }

    /// `kasan_poison_vmalloc(addr, size)` (remove_vm_area).
    pub(crate) fn kasan_poison_vmalloc(&self, addr: u64, size: u64) {
        if self.kasan.on {
            self.kasan.set(addr, size.next_multiple_of(KASAN_GRANULE_SIZE), KASAN_VMALLOC_INVALID);
        }
    }

    // ---- accesses --------------------------------------------------------------------

    /// `check_region_inline`: an access of `n` bytes at `va`, checked
    /// against the shadow; the kernel's report as the error.
    #[inline]
    pub fn kasan_check(&self, va: u64, n: u64, write: bool) -> Result<()> {
        if !self.kasan.on || n == 0 {
            return Ok(());
        }
        let k = &self.kasan;
        if va.checked_add(n).is_none() || va < k.meta_start || k.poisoned(va, n) {
            return Err(self.kasan_report(va, n, write));
        }
        Ok(())
    }

    /// The shadow bytes of the granules covering `[va, va + n)` (what
    /// `kasan_metadata_fetch_row` reads; empty when KASAN is off).
    pub fn kasan_shadow(&self, va: u64, n: u64) -> Vec<u8> {
        if !self.kasan.on || n == 0 {
            return Vec::new();
        }
        let last = va.saturating_add(n - 1);
        let count = ((last >> 3) - (va >> 3) + 1).min(1 << 24);
        (0..count).map(|i| self.kasan.shadow_byte((va & !GMASK) + i * KASAN_GRANULE_SIZE)).collect()
    }

    // ---- reports ---------------------------------------------------------------------

    fn kasan_header(&self, out: &mut String, bug_type: &str, ip: &str) {
        out.push_str("==================================================================\n");
        let _ = writeln!(out, "BUG: KASAN: {bug_type} in {ip}");
    }

    /// `dump_stack_lvl`.
    fn kasan_dump_stack(&self, out: &mut String, fr: &[Frame], comm: &str) {
        let _ = writeln!(out, "CPU: {} UID: 0 PID: {} Comm: {comm} Not tainted (kmm)", self.this_cpu(), pid());
        out.push_str("Call Trace:\n <TASK>\n");
        for f in fr {
            let _ = writeln!(out, " {} ({})", f.ip, f.loc);
        }
        out.push_str(" </TASK>\n");
    }

    /// `kasan_report`: an access report, counted.
    pub(crate) fn kasan_report(&self, va: u64, n: u64, write: bool) -> KmmError {
        let k = &self.kasan;
        k.reports.fetch_add(1, Relaxed);
        let fr = frames();
        let ip = fr.first().map_or("kmm", |f| f.ip.as_str()).to_string();
        let comm = comm();
        let first_bad = k.first_bad_addr(va, n);
        let bug_type = k.bug_type(va, n, first_bad);
        let mut out = String::new();
        self.kasan_header(&mut out, bug_type, &ip);
        let _ = writeln!(
            out,
            "{} of size {n} at addr {} by task {comm}/{}",
            if write { "Write" } else { "Read" },
            px(k, va),
            pid()
        );
        out.push('\n');
        let has_meta = va >= k.meta_start && va.checked_add(n).is_some();
        if has_meta {
            self.kasan_describe(&mut out, va, bug_type, &fr, &comm);
            self.kasan_memory_state(&mut out, first_bad);
        } else {
            self.kasan_dump_stack(&mut out, &fr, &comm);
        }
        out.push_str("==================================================================");
        let bug = if bug_type.contains("use-after-free") { KasanBug::UseAfterFree } else { KasanBug::Access };
        KmmError::Kasan { bug, message: out }
    }

    /// `kasan_report_invalid_free`: a double free or an invalid free.
    fn kasan_report_free(&self, va: u64, double: bool) -> KmmError {
        let k = &self.kasan;
        k.reports.fetch_add(1, Relaxed);
        let fr = frames();
        let ip = fr.first().map_or("kmm", |f| f.ip.as_str()).to_string();
        let comm = comm();
        let bug_type = if double { "double-free" } else { "invalid-free" };
        let mut out = String::new();
        self.kasan_header(&mut out, bug_type, &ip);
        let _ = writeln!(out, "Free of addr {} by task {comm}/{}", px(k, va), pid());
        out.push('\n');
        self.kasan_describe(&mut out, va, bug_type, &fr, &comm);
        self.kasan_memory_state(&mut out, va);
        out.push_str("==================================================================");
        KmmError::Kasan { bug: if double { KasanBug::DoubleFree } else { KasanBug::InvalidFree }, message: out }
    }

    /// `print_address_description`: the stack, the object (slab), the
    /// vmalloc area, the page.
    fn kasan_describe(&self, out: &mut String, va: u64, bug_type: &str, fr: &[Frame], comm: &str) {
        let k = &self.kasan;
        self.kasan_dump_stack(out, fr, comm);
        out.push('\n');
        let direct = va >= k.page_offset && va - k.page_offset < k.lowmem;
        let mut page = None;
        if direct {
            let pfn = self.phys_to_pfn(crate::PhysAddr(va - k.page_offset));
            page = Some(pfn);
            if let Some((head, c)) = self.virt_to_slab(va) {
                self.kasan_describe_object(out, va, bug_type, head, c);
                out.push('\n');
            }
        } else if va >= k.vstart && va < k.vend {
            out.push_str("The buggy address belongs to a");
            // vmalloc_dump_obj: the area holding PAGE_ALIGN(addr).
            let probe = va.next_multiple_of(self.page_size);
            match self.find_vm_area(probe) {
                Some(a) => {
                    let _ = writeln!(
                        out,
                        " {}-page vmalloc region starting at {:#x} allocated at {}",
                        a.pages.len(),
                        a.addr,
                        a.caller
                    );
                }
                None => out.push_str(" vmalloc virtual mapping\n"),
            }
            page = self.vm.pt.walk(&self.phys, va).ok().map(|t| self.phys_to_pfn(crate::PhysAddr(t.phys)));
        }
        if let Some(pfn) = page.filter(|p| self.pfn_valid(*p)) {
            self.kasan_dump_page(out, pfn);
            out.push('\n');
        }
    }

    /// `describe_object`: alloc and free tracks, then where the address
    /// lies relative to the object (`describe_object_addr`).
    fn kasan_describe_object(&self, out: &mut String, va: u64, bug_type: &str, head: u64, c: &KmemCache) {
        let k = &self.kasan;
        // nearest_obj
        let size = c.geo.size as u64;
        let slab_addr = k.page_offset + (head << self.page_shift);
        let order = self.mem_map.get(head).order();
        let objects = ((self.page_size << order) / size).max(1);
        let slot = va - (va - slab_addr) % size;
        let last = slab_addr + (objects - 1) * size;
        let obj = slot.min(last) + c.geo.red_left_pad as u64;
        let object_size = c.object_size() as u64;
        // kasan_get_alloc_size: granules up to the first poisoned one.
        let mut alloc_size = 0u64;
        while alloc_size < object_size {
            match k.shadow_byte(obj + alloc_size) {
                0 => alloc_size += KASAN_GRANULE_SIZE,
                s @ 1..=7 => {
                    alloc_size += s as u64;
                    break;
                }
                _ => break,
            }
        }
        let alloc_size = if alloc_size == 0 { object_size } else { alloc_size.min(object_size) };
        let t = k.tracks_of(obj - k.page_offset);
        if let Some(a) = &t.alloc {
            let _ = write!(out, "Allocated by task {}:\n{}\n", a.pid, a.text());
        }
        if k.shadow_byte(obj) == KASAN_SLAB_FREE_META {
            if let Some(f) = &t.free {
                let _ = write!(out, "Freed by task {}:\n{}\n", f.pid, f.text());
            }
        }
        let _ = writeln!(
            out,
            "The buggy address belongs to the object at {}\n which belongs to the cache {} of size {}",
            px(k, obj),
            c.name,
            object_size
        );
        let (rel, bytes) = if va < obj {
            ("to the left", obj - va)
        } else if va >= obj + alloc_size {
            ("to the right", va - (obj + alloc_size))
        } else {
            ("inside", va - obj)
        };
        let state = match bug_type {
            "slab-out-of-bounds" => "allocated ",
            "slab-use-after-free" => "freed ",
            _ => "",
        };
        let _ = writeln!(
            out,
            "The buggy address is located {bytes} bytes {rel} of\n {state}{alloc_size}-byte region [{}, {})",
            px(k, obj),
            px(k, obj + alloc_size)
        );
    }

    /// `dump_page`, short.
    fn kasan_dump_page(&self, out: &mut String, pfn: Pfn) {
        let head = self.compound_head(pfn);
        let p = self.mem_map.get(head.0);
        let slab = p.has(crate::page::PG_SLAB);
        let refcount = if slab { 1 } else { p.refcount().max(0) };
        out.push_str("The buggy address belongs to the physical page:\n");
        let _ = writeln!(out, "page: refcount:{refcount} mapcount:0 mapping:{} index:0x0 pfn:{:#x}", px(&self.kasan, 0), pfn.0);
        if head != pfn {
            let _ = writeln!(out, "head: order:{} pfn:{:#x}", p.order(), head.0);
        }
        let mut names: Vec<String> = crate::page::flag_names(p.flags()).iter().map(|s| s.to_string()).collect();
        if let Some(z) = self.pfn_zone(pfn) {
            names.push(format!("zone={}", z.idx));
        }
        let _ = writeln!(out, "flags: {:#x}({})", p.flags(), names.join("|"));
        out.push_str("page dumped because: kasan: bad access detected\n");
    }

    /// `print_memory_metadata`: the shadow two rows either side.
    fn kasan_memory_state(&self, out: &mut String, addr: u64) {
        let k = &self.kasan;
        const ROW: u64 = 16 * KASAN_GRANULE_SIZE;
        out.push_str("Memory state around the buggy address:\n");
        let base = (addr & !(ROW - 1)).wrapping_sub(2 * ROW);
        for i in 0..5u64 {
            let row = base.wrapping_add(i * ROW);
            let bytes: Vec<String> =
                (0..16).map(|j| format!("{:02x}", k.shadow_byte(row.wrapping_add(j * KASAN_GRANULE_SIZE)))).collect();
            let _ = writeln!(out, "{}{}: {}", if i == 2 { '>' } else { ' ' }, px(k, row), bytes.join(" "));
            if addr >= row && addr - row < ROW {
                let offset = 3 + k.ptr_width + ((addr - row) / KASAN_GRANULE_SIZE) as usize * 3 + 1;
                let _ = writeln!(out, "{:>offset$}", "^");
            }
        }
    }

    // ---- the quarantine --------------------------------------------------------------

    /// `kasan_quarantine_put`: onto this CPU's list; past
    /// QUARANTINE_PERCPU_SIZE the list moves to the global tail batch.
    fn kasan_quarantine_put(&self, e: QEntry) {
        let q = &self.kasan.quarantine;
        let cpu = (self.this_cpu() as usize).min(q.cpus.len() - 1);
        let mut l = q.cpus[cpu].lock();
        l.q.push_back(e);
        l.bytes += e.size;
        if l.bytes > QUARANTINE_PERCPU_SIZE {
            let temp = l.take();
            let mut g = q.global.lock();
            g.size += temp.bytes;
            q.over.store(g.size > g.max_size, Relaxed);
            let tail = g.tail;
            g.batches[tail].append(temp);
            if g.batches[tail].bytes >= g.batch_size {
                let n = g.batches.len();
                let new_tail = (tail + 1) % n;
                if new_tail != g.head {
                    g.tail = new_tail;
                }
            }
        }
    }

    /// `kasan_quarantine_reduce`: past its maximum the global quarantine
    /// gives its oldest batch back to the slabs.
    pub fn kasan_quarantine_reduce(&self) {
        if !self.kasan.on {
            return;
        }
        let q = &self.kasan.quarantine;
        if !q.over.load(Relaxed) {
            return;
        }
        let to_free = {
            let mut g = q.global.lock();
            if g.size <= g.max_size {
                q.over.store(false, Relaxed);
                return;
            }
            let total = (self.totalram_pages() << self.page_shift) / QUARANTINE_FRACTION;
            let percpu = QUARANTINE_PERCPU_SIZE * self.cfg.cpus as u64;
            g.max_size = total.saturating_sub(percpu);
            g.batch_size = QUARANTINE_PERCPU_SIZE.max(2 * total / g.batches.len() as u64);
            let batch = if g.size > g.max_size {
                let head = g.head;
                let batch = g.batches[head].take();
                g.size -= batch.bytes;
                g.head = (head + 1) % g.batches.len();
                batch
            } else {
                QList::default()
            };
            q.over.store(g.size > g.max_size, Relaxed);
            batch
        };
        self.kasan_qlist_free(to_free.q.into_iter());
    }

    /// `kasan_quarantine_remove_cache`: every quarantined object of `c`
    /// goes back to its slab (shrink, destroy).
    pub(crate) fn kasan_quarantine_remove_cache(&self, c: &KmemCache) {
        if !self.kasan.on {
            return;
        }
        let q = &self.kasan.quarantine;
        let mut out = Vec::new();
        for l in q.cpus.iter() {
            out.extend(l.lock().remove_cache(c.id));
        }
        {
            let mut g = q.global.lock();
            let mut freed = 0;
            for b in g.batches.iter_mut() {
                let got = b.remove_cache(c.id);
                freed += got.iter().map(|e| e.size).sum::<u64>();
                out.extend(got);
            }
            g.size -= freed;
            q.over.store(g.size > g.max_size, Relaxed);
        }
        self.kasan_qlist_free(out.into_iter());
    }

    /// `qlist_free_all`: objects back to their slabs (`___cache_free`).
    fn kasan_qlist_free(&self, entries: impl Iterator<Item = QEntry>) {
        let cpu = self.run_cpu();
        for e in entries {
            if let Some(c) = self.slab.get(e.cache) {
                let o = ObjRef { slab_id: e.slab_id, slab_pfn: e.slab_pfn };
                c.free_raw(self, &o, e.obj, cpu);
            }
        }
    }

    /// Bytes in the quarantine: (per-CPU lists, global), and objects.
    pub fn kasan_quarantine_stats(&self) -> (u64, u64, u64) {
        if !self.kasan.on {
            return (0, 0, 0);
        }
        let q = &self.kasan.quarantine;
        let (mut pc, mut n) = (0, 0);
        for l in q.cpus.iter() {
            let l = l.lock();
            pc += l.bytes;
            n += l.q.len() as u64;
        }
        let g = q.global.lock();
        n += g.batches.iter().map(|b| b.q.len() as u64).sum::<u64>();
        (pc, g.size, n)
    }

    /// Host bytes the shadow takes (materialised chunks).
    pub fn kasan_shadow_bytes(&self) -> u64 {
        (self.kasan.direct.materialised() + self.kasan.vmalloc.materialised()) * (WORDS_PER_CHUNK as u64 * 8)
    }

    /// After a warm start (which lays pages and slabs out without the
    /// allocator's hooks): the shadow rebuilt from the page and slab
    /// state. Free blocks (buddy and pcp) are KASAN_PAGE_FREE, other
    /// lowmem pages accessible; slabs redzone except their live objects.
    pub(crate) fn kasan_rebuild(&self) {
        if !self.kasan.on {
            return;
        }
        let po = self.cfg.arch.page_offset();
        // All accessible first (whole chunks stay one byte), then the free
        // blocks poisoned: the shadow costs host memory for free memory only.
        self.kasan.set(po, self.max_low_pfn << self.page_shift, 0);
        let mut pfn = 0;
        while pfn < self.max_low_pfn {
            let p = self.mem_map.get(pfn);
            if p.has(crate::page::PG_BUDDY) || p.has(crate::page::PG_PCP) {
                let n = (1u64 << p.order()).min(self.max_low_pfn - pfn);
                self.kasan.set(po + (pfn << self.page_shift), n << self.page_shift, KASAN_PAGE_FREE);
                pfn += n;
            } else {
                pfn += 1;
            }
        }
        for c in self.slab.caches() {
            let slabs: Vec<(u64, u32)> = c.node.lock().slabs.iter().flatten().map(|s| (s.pfn, s.order)).collect();
            for (head, order) in slabs {
                self.kasan_poison_slab(Pfn(head), order);
                let base = po + (head << self.page_shift) + c.geo.red_left_pad as u64;
                let objects = (self.page_size << order) / c.geo.size as u64;
                for i in 0..objects {
                    let obj = base + i * c.geo.size as u64;
                    if self.shadow.is_live(obj - po) {
                        self.kasan.unpoison(obj, c.object_size() as u64);
                    }
                }
            }
        }
    }

    /// kasan-1..3.
    pub fn check_kasan(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if !self.kasan.on {
            return errs;
        }
        let k = &self.kasan;
        let po = self.cfg.arch.page_offset();
        let mut entries = Vec::new();
        for (cpu, l) in k.quarantine.cpus.iter().enumerate() {
            let l = l.lock();
            let sum: u64 = l.q.iter().map(|e| e.size).sum();
            if sum != l.bytes {
                errs.push(format!("kasan-1: cpu {cpu}'s quarantine counts {} bytes but holds {sum}", l.bytes));
            }
            entries.extend(l.q.iter().copied());
        }
        {
            let g = k.quarantine.global.lock();
            let mut total = 0;
            for (i, b) in g.batches.iter().enumerate() {
                let sum: u64 = b.q.iter().map(|e| e.size).sum();
                if sum != b.bytes {
                    errs.push(format!("kasan-1: quarantine batch {i} counts {} bytes but holds {sum}", b.bytes));
                }
                total += b.bytes;
                entries.extend(b.q.iter().copied());
            }
            if total != g.size {
                errs.push(format!("kasan-1: quarantine_size {} but the batches hold {total}", g.size));
            }
        }
        for e in entries {
            if self.slab.get(e.cache).is_none_or(|c| c.dead.load(Relaxed)) {
                errs.push(format!("kasan-2: quarantined object {:#x} belongs to no live cache", e.obj));
            }
            if self.shadow.is_live(e.obj - po) {
                errs.push(format!("kasan-2: quarantined object {:#x} is live", e.obj));
            }
            if k.shadow_byte(e.obj) != KASAN_SLAB_FREE_META {
                errs.push(format!(
                    "kasan-2: quarantined object {:#x} has shadow {:#04x}, not KASAN_SLAB_FREE_META",
                    e.obj,
                    k.shadow_byte(e.obj)
                ));
            }
        }
        for a in self.vm_areas() {
            if a.internal.load(Relaxed) == crate::vm::vmalloc::OWNER_IRQ_STACK && a.pages.is_empty() {
                continue;
            }
            if !k.byte_accessible(a.addr) {
                errs.push(format!("kasan-3: the vmalloc area at {:#x} starts poisoned", a.addr));
            }
            if a.flags & crate::vm::vmalloc::VM_NO_GUARD == 0 {
                let guard = a.addr + a.size - self.page_size;
                if k.shadow_byte(guard) != KASAN_VMALLOC_INVALID {
                    errs.push(format!("kasan-3: the guard page of the vmalloc area at {:#x} is not poisoned", a.addr));
                }
            }
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::BootParams;
    use crate::trace::CallSite;

    fn machine(kasan: bool) -> Machine {
        let cfg = MachineConfig {
            memory: 64 << 20,
            cmdline: BootParams::parse(if kasan { "kasan=on" } else { "" }).unwrap(),
            ..MachineConfig::default()
        };
        Machine::new(cfg).unwrap()
    }

    fn cs() -> CallSite {
        Arc::from("test+0x1")
    }

    #[test]
    fn shadow_map_encoding() {
        let s = ShadowMap::new(8 << 20, KASAN_PAGE_FREE);
        assert_eq!(s.get(0), 0xFF);
        assert_eq!(s.materialised(), 0);
        // Setting the default changes nothing and makes nothing.
        s.set(0, 100, 0xFF);
        assert_eq!(s.materialised(), 0);
        // A whole chunk: one byte, no words.
        s.set(GRANULES_PER_CHUNK, 2 * GRANULES_PER_CHUNK, 0);
        assert_eq!(s.materialised(), 0);
        assert_eq!(s.get(GRANULES_PER_CHUNK + 5), 0);
        assert_eq!(s.first_nonzero(GRANULES_PER_CHUNK, 2 * GRANULES_PER_CHUNK), None);
        assert_eq!(s.first_nonzero(GRANULES_PER_CHUNK, 2 * GRANULES_PER_CHUNK + 1), Some((2 * GRANULES_PER_CHUNK, 0xFF)));
        // Part of a chunk: words, keyed to the old value.
        s.set(3, 19, 0);
        s.set(19, 20, 3);
        assert_eq!(s.materialised(), 1);
        assert_eq!((s.get(2), s.get(3), s.get(18), s.get(19), s.get(20)), (0xFF, 0, 0, 3, 0xFF));
        assert_eq!(s.first_nonzero(3, 30), Some((19, 3)));
        assert_eq!(s.first_nonzero(0, 30), Some((0, 0xFF)));
        assert_eq!(s.first_nonzero(3, 19), None);
        // Byte-level updates leave the neighbours alone.
        s.set(8, 9, KASAN_SLAB_FREE_META);
        assert_eq!((s.get(7), s.get(8), s.get(9)), (0, 0xFA, 0));
    }

    #[test]
    fn unpoison_is_byte_precise() {
        let m = machine(true);
        let k = &m.kasan;
        let va = m.cfg.arch.page_offset() + (1 << 20);
        k.set(va, 4096, KASAN_SLAB_REDZONE);
        k.unpoison_with_redzone(va, 123, va + 128, KASAN_SLAB_REDZONE);
        assert_eq!(m.kasan_shadow(va + 112, 16), vec![0x00, 0x03]);
        assert_eq!(k.shadow_byte(va + 128), KASAN_SLAB_REDZONE);
        // memory_is_poisoned: bytes 0..123 fine, 123 not, 120..123 fine.
        assert!(!k.poisoned(va, 123));
        assert!(k.poisoned(va, 124));
        assert!(k.poisoned(va + 123, 1));
        assert!(!k.poisoned(va + 120, 3));
        assert!(k.poisoned(va + 120, 8));
        assert_eq!(k.bug_type(va + 123, 1, k.first_bad_addr(va + 123, 1)), "slab-out-of-bounds");
        // Wild pointers.
        assert_eq!(k.bug_type(0, 8, 0), "null-ptr-deref");
        assert_eq!(k.bug_type(0x1000_0000, 8, 0x1000_0000), "user-memory-access");
        assert_eq!(k.bug_type(0x8000_0000_0000_0000, 8, 0x8000_0000_0000_0000), "wild-memory-access");
    }

    #[test]
    fn off_costs_nothing() {
        let m = machine(false);
        assert!(!m.kasan_on());
        let p = m.kmalloc(123, gfp::GFP_KERNEL, &cs()).unwrap();
        // No shadow: every access passes, as without KASAN.
        assert!(m.kasan_check(p.0 + 200, 8, true).is_ok());
        assert!(m.kasan_shadow(p.0, 8).is_empty());
        assert_eq!(m.kasan_shadow_bytes(), 0);
    }

    #[test]
    fn kmalloc_tail_free_and_quarantine() {
        let m = machine(true);
        m.cpus.bind(0).unwrap();
        let p = m.kmalloc(123, gfp::GFP_KERNEL, &cs()).unwrap().0;
        assert_eq!(m.ksize(p).unwrap(), 128);
        assert!(m.kasan_check(p, 123, true).is_ok());
        let e = m.kasan_check(p + 123, 1, true).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("BUG: KASAN: slab-out-of-bounds in kmm"), "{msg}");
        assert!(msg.contains("Write of size 1 at addr"), "{msg}");
        assert!(msg.contains("located 0 bytes to the right of\n allocated 123-byte region"), "{msg}");
        assert!(msg.contains("which belongs to the cache kmalloc-128 of size 128"), "{msg}");
        assert!(msg.contains("Allocated by task"), "{msg}");
        m.kfree(p, &cs()).unwrap();
        let e = m.kasan_check(p + 8, 1, false).unwrap_err();
        assert!(matches!(e, KmmError::Kasan { bug: KasanBug::UseAfterFree, .. }));
        assert!(e.to_string().contains("slab-use-after-free"));
        assert!(e.to_string().contains("Freed by task"));
        // Double free: KASAN's report.
        let e = m.kfree(p, &cs()).unwrap_err();
        assert!(matches!(e, KmmError::Kasan { bug: KasanBug::DoubleFree, .. }), "{e}");
        // The quarantine keeps the slot from being reused.
        let q = m.kmalloc(123, gfp::GFP_KERNEL, &cs()).unwrap().0;
        assert_ne!(p, q);
        assert_eq!(m.kasan_quarantine_stats().2, 1);
        m.kfree(q, &cs()).unwrap();
        assert!(m.check().is_empty(), "{:?}", m.check());
        // Shrink empties the cache's quarantine.
        let c = m.kmalloc_slab(123, gfp::GFP_KERNEL).clone();
        m.kmem_cache_shrink(&c).unwrap();
        assert_eq!(m.kasan_quarantine_stats(), (0, 0, 0));
        assert!(m.check().is_empty(), "{:?}", m.check());
    }

    #[test]
    fn pages_and_vmalloc() {
        let m = machine(true);
        m.cpus.bind(0).unwrap();
        let pfn = m.alloc_pages(gfp::GFP_KERNEL, 2).unwrap();
        let va = m.page_address(pfn).unwrap().0;
        assert!(m.kasan_check(va, 4 * 4096, true).is_ok());
        m.free_pages(pfn, 2).unwrap();
        let e = m.kasan_check(va, 1, false).unwrap_err();
        assert!(e.to_string().contains("BUG: KASAN: use-after-free"), "{e}");
        let a = m.vmalloc(100, gfp::GFP_KERNEL, &cs()).unwrap();
        assert!(m.kasan_check(a.addr, 100, true).is_ok());
        assert_eq!(m.kasan_shadow(a.addr + 96, 1), vec![4]);
        let e = m.kasan_check(a.addr + 4096, 1, false).unwrap_err().to_string();
        assert!(e.contains("vmalloc-out-of-bounds"), "{e}");
        assert!(e.contains("1-page vmalloc region starting at"), "{e}");
        m.vfree(a.addr).unwrap();
        assert!(m.kasan_check(a.addr, 1, false).is_err());
        assert!(m.check().is_empty(), "{:?}", m.check());
    }
}
