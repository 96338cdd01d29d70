//! Replay: feed a real trace's allocations and frees, in order and each on
//! the CPU it happened on, into a kmm machine, and report where kmm decided
//! differently from the kernel and how fragmentation evolved.
//!
//! # Kernel
//! What each event stands for: `include/trace/events/kmem.h` and `percpu.h`
//! (which call emitted it). The kernel's zone of a traced pfn:
//! `arch/x86/mm/init.c` `zone_sizes_init` (x86_64: DMA below 16 MiB, DMA32
//! below 4 GiB, Normal above). Fragmentation indices: `mm/vmstat.c`
//! `fill_contig_page_info`, `unusable_free_index`, `__fragmentation_index`
//! (/sys/kernel/debug/extfrag/{unusable_index,extfrag_index}).
//!
//! # What is replayed
//! - `kmalloc` -> `kmalloc(bytes_req, gfp)`; `kfree` -> `kfree`;
//! - `kmem_cache_alloc` -> `kmem_cache_alloc` on the cache of that name:
//!   an existing kmm cache (the kmalloc caches), or one created on first
//!   sight with `object_size = bytes_req` and the first of (no flags,
//!   SLAB_HWCACHE_ALIGN, a constructor, both, an explicit alignment) whose
//!   slot size equals the traced `bytes_alloc` (`kmem_cache_create` leaves
//!   the flags out of the trace, the geometry tells them back);
//! - `kmem_cache_free` -> `kmem_cache_free` (or `kfree` for a kmalloc'd ptr);
//! - `mm_page_alloc` / `mm_page_free` -> `alloc_pages(gfp, order)` /
//!   `__free_pages`, except the pages the slab layer took for its slabs (and
//!   large kmalloc): those are recognised by a first pass (a later slab
//!   object's address falls inside the block while it is allocated), and
//!   kmm's own slab layer allocates its own;
//! - `percpu_alloc_percpu` / `percpu_free_percpu` -> `alloc_percpu` /
//!   `free_percpu`;
//! - `vmalloc:alloc_vmap_area` (its `size` includes the guard page) ->
//!   `__vmalloc_node_range(size - PAGE_SIZE, align)`, which also allocates
//!   the area's pages (the kernel's bulk page allocator does not trace
//!   them); `vmalloc:free_vmap_area_noflush` -> `vfree` (lazy, as traced);
//!   `purge_vmap_area_lazy` is a consequence (kmm purges on its own).
//!
//! On a machine from `shape::recorded_machine` (its `warm` seeds made for
//! this trace), the pages and objects the trace frees before allocating
//! them are kmm's warm ones and are freed too, and the frees of pre-trace
//! slab pages are the kernel discarding a slab (counted as slab pages).
//!
//! Time: with `ReplayOptions::time` the machine's clock moves to each
//! event's timestamp (starting at the first event, or the first sample of
//! the bundle if earlier), so `vmstat_update`'s decay of pcp->high runs
//! when it would have (`clock.rs`); its jiffies phase is estimated from the
//! kernel's own kworker drains in the trace.
//!
//! Against the kernel: the dynamics table counts, for the kernel, the
//! allocator-internal events in the trace (`mm_page_alloc_zone_locked`,
//! `mm_page_pcpu_drain`, `mm_page_alloc_extfrag`, slab pages, page allocs
//! and frees) and, for kmm, its own tracepoints during the replay (a sink);
//! with a bundle, kmm's free lists are compared with each sample of
//! samples.txt at its timestamp (trajectory) and with end.buddyinfo /
//! end.pagetypeinfo after the last event (end state), by the distance
//! Σ over orders |kmm free pages − kernel free pages| / kernel free pages.
//!
//! Not replayed, counted: frees of objects allocated before the trace
//! started, kfree(NULL), failed allocations, events that are consequences of
//! the allocator's own work (`mm_page_alloc_zone_locked`, `mm_page_pcpu_drain`,
//! `mm_page_free_batched`, `mm_page_alloc_extfrag`: kmm makes its own),
//! vmalloc events, other events.
//!
//! SIMPLIFICATION: a vmap area's traced metadata kmallocs (the page array
//! from `__vmalloc_node_range`, the vm_struct) are replayed as traced, and
//! kmm's vmalloc makes its own too: 2 small objects counted twice per area.
//! The areas' addresses are not compared (the traced kernel's vmalloc space
//! was filled long before the recording started). Every traced area becomes
//! a vmalloc with fresh pages, vmap/ioremap areas (whose pages the trace does
//! not name) included.
//! SIMPLIFICATION: trace CPUs beyond the machine's CPUs run on cpu % cpus.
//! SIMPLIFICATION: peak memory is read after every replayed allocation from
//! the zones' free counters (pages on per-CPU lists count as used, as in
//! the kernel's MemFree).
//! SIMPLIFICATION: a second allocation of a ptr still live in the replay (its
//! free was not traced) frees the older kmm object first; counted.
//!
//! # Invariants
//! - replay-1: every event is counted in exactly one outcome:
//!   `replayed + before_trace + null_frees + failed_in_trace + slab_pages +
//!   consequences + vmalloc + other == events`.
//! - replay-2: with `free_at_end`, everything the replay allocated is freed
//!   and the caches it created are destroyed.
//!
//! Lock order: none of its own; replay calls the machine's public API from
//! one thread, bound to one simulated CPU at a time.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::bundle::Bundle;
use super::perf_script::{Kind, TraceLog, F_FAILED, F_REFILL, NONE};
use crate::buddy::{MIGRATETYPE_NAMES, MIGRATE_TYPES};
use super::CallSite;
use crate::arch::{MAX_PAGE_ORDER, NR_PAGE_ORDERS};
use crate::error::{KmmError, Result};
use crate::slab::cache::KmemCache;
use crate::{Machine, Pfn, VirtAddr};

/// Options of a replay.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// Take a fragmentation sample every this many events (0: only at the end).
    pub sample_every: u64,
    /// Free everything the replay allocated at the end, destroy the caches it
    /// created and shrink the rest.
    pub free_at_end: bool,
    /// Start of the direct map (`PAGE_OFFSET`) of the traced kernel, to turn
    /// slab pointers into pfns (x86_64: 0xffff888000000000).
    pub page_offset: u64,
    /// Move the machine's clock to each event's timestamp, so that the
    /// kernel's timer work (`clock.rs`) runs when it would have.
    pub time: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions { sample_every: 1000, free_at_end: false, page_offset: 0xffff_8880_0000_0000, time: true }
    }
}

/// One figure of the kernel's dynamics against kmm's: how often an
/// allocator-internal event happened in the trace and in the replay.
#[derive(Clone, Debug, PartialEq)]
pub struct DynRow {
    pub what: String,
    /// The tracepoint (and filter) counted.
    pub tracepoint: String,
    pub kernel: u64,
    pub kmm: u64,
    /// Of `kmm`, those in stretches perf lost on their CPU (the kernel's
    /// trace cannot show its own there).
    pub kmm_in_lost: u64,
}

impl DynRow {
    /// kmm / kernel (None when the kernel's count is 0).
    pub fn ratio(&self) -> Option<f64> {
        (self.kernel > 0).then(|| self.kmm as f64 / self.kernel as f64)
    }
}

/// One zone's end state: the kernel's (end.buddyinfo / end.pagetypeinfo)
/// and kmm's, free blocks per order.
#[derive(Clone, Debug, PartialEq)]
pub struct ZoneEnd {
    pub zone: String,
    pub kernel: Vec<u64>,
    pub kmm: Vec<u64>,
    /// Per migratetype name: (kernel, kmm) free blocks per order (empty
    /// without end.pagetypeinfo).
    pub by_type: Vec<(String, Vec<u64>, Vec<u64>)>,
    pub kernel_free_pages: u64,
    pub kmm_free_pages: u64,
    /// Σ over orders |kmm free pages - kernel free pages| / kernel free pages.
    pub distance: f64,
}

/// kmm's state against one sample of samples.txt.
#[derive(Clone, Debug, PartialEq)]
pub struct TrajPoint {
    pub ts_ns: u64,
    /// Events replayed before it.
    pub event: u64,
    /// Per zone: (name, kernel free pages, kmm free pages, distance).
    pub zones: Vec<(String, u64, u64, f64)>,
}

/// `Σ_o |a_o - k_o| << o / Σ_o k_o << o` (free pages per order).
pub fn free_distance(kernel: &[u64], kmm: &[u64]) -> f64 {
    let n = kernel.len().max(kmm.len());
    let (mut diff, mut total) = (0u64, 0u64);
    for o in 0..n.min(64) {
        let k = kernel.get(o).copied().unwrap_or(0).saturating_mul(1 << o);
        let a = kmm.get(o).copied().unwrap_or(0).saturating_mul(1 << o);
        diff = diff.saturating_add(k.abs_diff(a));
        total = total.saturating_add(k);
    }
    if total == 0 {
        if diff == 0 { 0.0 } else { f64::INFINITY }
    } else {
        diff as f64 / total as f64
    }
}

fn free_pages_of(nr_free: &[u64]) -> u64 {
    nr_free.iter().enumerate().take(64).map(|(o, &n)| n.saturating_mul(1 << o)).fold(0, u64::saturating_add)
}

/// Free blocks per order of one zone at one point of the replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneSample {
    pub zone: &'static str,
    pub nr_free: [u64; NR_PAGE_ORDERS],
}

/// One fragmentation sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Events replayed or skipped so far.
    pub event: u64,
    /// Pages in use on the machine (MemTotal - MemFree).
    pub used_pages: u64,
    pub zones: Vec<ZoneSample>,
}

/// A kmm decision that differed from the kernel's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// 0-based index of the event in the trace.
    pub event: u64,
    pub what: String,
    pub kernel: String,
    pub kmm: String,
}

/// What a replay did.
#[derive(Clone, Debug, Default)]
pub struct ReplayReport {
    pub events: u64,
    /// Events turned into kmm calls.
    pub replayed: u64,
    /// Per event name: replayed count.
    pub replayed_by_name: Vec<(String, u64)>,
    pub before_trace: u64,
    pub null_frees: u64,
    pub failed_in_trace: u64,
    pub slab_pages: u64,
    /// Of `slab_pages`, the mm_page_alloc events.
    pub slab_page_allocs: u64,
    pub consequences: u64,
    pub vmalloc: u64,
    pub other: u64,
    /// Allocations whose ptr was still live in the replay (free not traced).
    pub reused_live: u64,
    /// kmm calls that failed (e.g. out of memory), with the first messages.
    pub kmm_failures: u64,
    pub kmm_failure_examples: Vec<String>,
    /// Slab allocations compared, and those whose bytes_alloc differed.
    pub bytes_alloc_checked: u64,
    pub bytes_alloc_mismatches: u64,
    /// Page allocations compared, and those that came from another zone.
    pub zone_checked: u64,
    pub zone_mismatches: u64,
    /// (kernel zone, kmm zone) -> count, for page allocations.
    pub zone_pairs: Vec<((String, String), u64)>,
    /// The first mismatches.
    pub mismatch_examples: Vec<Mismatch>,
    /// Caches created from the trace: (name, object_size, size, how).
    pub caches_created: Vec<(String, u32, u32, String)>,
    pub trace_cpus_remapped: u64,
    pub seconds: f64,
    pub peak_used_pages: u64,
    pub boot_used_pages: u64,
    pub final_used_pages: u64,
    pub samples: Vec<Sample>,
    /// Objects/pages/percpu areas still held by the replay at the end (before
    /// `free_at_end`).
    pub live_at_end: u64,
    /// How the machine was shaped and started (warm or cold), one sentence each.
    pub machine_notes: Vec<String>,
    /// The replay started from a warm start made for this trace.
    pub warm: bool,
    /// The kernel's allocator-internal events against kmm's own.
    pub dynamics: Vec<DynRow>,
    /// kmm's end state beside the kernel's (with an end.* file).
    pub end_state: Vec<ZoneEnd>,
    /// kmm's state against each sample of samples.txt.
    pub trajectory: Vec<TrajPoint>,
    /// Times the kernel's timer work (vmstat_update) ran during the replay.
    pub timer_runs: u64,
    /// Simulated time covered, ns (first to last event).
    pub sim_ns: u64,
    /// Things the reader should know (a warm start made for another trace, ...).
    pub warnings: Vec<String>,
    /// Where perf lost events: (cpu, start ns, end ns).
    pub lost_stretches: Vec<(u32, u64, u64)>,
    /// Page allocations per order, for the orders the trace used:
    /// (order, kernel succeeded, kernel failed, kmm succeeded, kmm failed).
    /// The kernel's from mm_page_alloc (pfn=-1 when it failed); kmm's from
    /// the replayed calls (the trace's failures are not replayed).
    pub page_alloc_orders: Vec<(u32, u64, u64, u64, u64)>,
    /// zone->lock acquisitions during the replay (all zones; `ZoneLock`).
    pub zone_lock_acquisitions: u64,
}

impl ReplayReport {
    /// The violations of replay-1.
    pub fn check(&self) -> Vec<String> {
        let sum = self.replayed
            + self.before_trace
            + self.null_frees
            + self.failed_in_trace
            + self.slab_pages
            + self.consequences
            + self.vmalloc
            + self.other;
        if sum == self.events {
            Vec::new()
        } else {
            vec![format!("replay-1: outcomes sum to {sum}, not {} events", self.events)]
        }
    }

    pub fn events_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.events as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The kernel's counts in a trace (see `Replayer::dynamics`).
#[derive(Default)]
struct KernelCounts {
    zone_locked: u64,
    zone_locked_refill: u64,
    drain: u64,
    extfrag: u64,
    extfrag_owner: u64,
    extfrag_by: [[u64; MIGRATE_TYPES]; MIGRATE_TYPES],
    alloc_events: u64,
    alloc_pages: u64,
    free_events: u64,
    free_pages: u64,
    slab_in: u64,
    slab_out: u64,
    extfrag_fragmenting: u64,
    /// mm_page_alloc per order: succeeded, failed.
    order_ok: [u64; NR_PAGE_ORDERS],
    order_failed: [u64; NR_PAGE_ORDERS],
}

/// `fill_contig_page_info`'s numbers for one zone and a suitable order.
fn contig_info(nr_free: &[u64], suitable_order: usize) -> (u64, u64, u64) {
    let (mut free_pages, mut total, mut suitable) = (0u64, 0u64, 0u64);
    for (order, &blocks) in nr_free.iter().enumerate() {
        total += blocks;
        free_pages += blocks << order;
        if order >= suitable_order {
            suitable += blocks << (order - suitable_order);
        }
    }
    (free_pages, total, suitable)
}

/// `unusable_free_index` (mm/vmstat.c), in thousandths: the share of free
/// memory that cannot serve an allocation of this order.
pub fn unusable_free_index(nr_free: &[u64], order: usize) -> i64 {
    let (free_pages, _, suitable) = contig_info(nr_free, order);
    // "No free memory is interpreted as all free memory is unusable".
    if free_pages == 0 {
        return 1000;
    }
    (((free_pages - (suitable << order)) * 1000) / free_pages) as i64
}

/// `__fragmentation_index` (mm/vmstat.c), in thousandths: towards 0 a
/// failure would be for lack of memory, towards 1000 for fragmentation;
/// -1000 when an allocation of this order would succeed.
pub fn fragmentation_index(nr_free: &[u64], order: usize) -> i64 {
    let requested = 1u64 << order;
    if order > MAX_PAGE_ORDER as usize {
        return 0;
    }
    let (free_pages, total, suitable) = contig_info(nr_free, order);
    if total == 0 {
        return 0;
    }
    if suitable != 0 {
        return -1000;
    }
    1000 - ((1000 + (free_pages * 1000 / requested)) / total) as i64
}

/// The kernel's zone of a pfn on x86_64 (`zone_sizes_init`).
pub fn x86_64_zone_of_pfn(pfn: u64) -> &'static str {
    if pfn < (16 << 20) >> 12 {
        "DMA"
    } else if pfn < (4u64 << 30) >> 12 {
        "DMA32"
    } else {
        "Normal"
    }
}

/// What a traced ptr became in kmm.
#[derive(Clone)]
enum Obj {
    Kmalloc(u64),
    Cache(u64, Arc<KmemCache>),
}

struct Replayer<'a> {
    m: &'a Machine,
    log: &'a TraceLog,
    o: &'a ReplayOptions,
    r: ReplayReport,
    objs: HashMap<u64, Obj>,
    /// trace pfn -> (kmm pfn, order).
    pages: HashMap<u64, (u64, u32)>,
    /// trace percpu ptr -> kmm percpu ptr.
    percpu: HashMap<u64, u64>,
    /// Traced va_start -> kmm's vmalloc address.
    vmaps: HashMap<u64, u64>,
    /// Cache name id -> cache.
    caches: HashMap<u32, Arc<KmemCache>>,
    created: Vec<Arc<KmemCache>>,
    sites: Vec<Option<CallSite>>,
    bound: Option<u32>,
    by_name: HashMap<u32, u64>,
    zone_pairs: HashMap<(&'static str, &'static str), u64>,
    total_pages: u64,
    /// Traced pfns of slab-owned blocks still allocated.
    slab_live: HashSet<u64>,
    /// Head pfns of pre-trace slabs laid out by a warm start.
    warm_slab_heads: HashSet<u64>,
    bundle: Option<&'a Bundle>,
    /// samples.txt entries not yet compared.
    next_sample: usize,
    /// The clock's next due work (ns): events before it need no advance.
    next_due: u64,
    /// samples.txt is on the trace's clock (their times overlap).
    use_samples: bool,
    /// When each CPU was running, as the trace shows it (deferrable timers).
    activity: Activity,
    counts: Arc<KmmCounts>,
}

/// Counts of kmm's own allocator-internal events.
#[derive(Default)]
struct Counts {
    zone_locked: AtomicU64,
    zone_locked_refill: AtomicU64,
    drain: AtomicU64,
    extfrag: AtomicU64,
    extfrag_owner: AtomicU64,
    /// Fallbacks that split a block below pageblock order (`fragmenting=1`).
    extfrag_fragmenting: AtomicU64,
    /// (alloc_mt, fallback_mt) -> count, both < MIGRATE_TYPES.
    extfrag_by: [[AtomicU64; MIGRATE_TYPES]; MIGRATE_TYPES],
    alloc_events: AtomicU64,
    alloc_pages: AtomicU64,
    free_events: AtomicU64,
    free_pages: AtomicU64,
    /// mm_page_alloc per order: succeeded, failed.
    order_ok: [AtomicU64; NR_PAGE_ORDERS],
    order_failed: [AtomicU64; NR_PAGE_ORDERS],
}

impl Counts {
    fn add(&self, p: &crate::trace::Payload) {
        use crate::trace::Payload::*;
        match p {
            MmPageAllocZoneLocked { percpu_refill, .. } => {
                self.zone_locked.fetch_add(1, Relaxed);
                if *percpu_refill {
                    self.zone_locked_refill.fetch_add(1, Relaxed);
                }
            }
            MmPagePcpuDrain { .. } => {
                self.drain.fetch_add(1, Relaxed);
            }
            MmPageAllocExtfrag { alloc_migratetype, fallback_migratetype, change_ownership, fragmenting, .. } => {
                self.extfrag.fetch_add(1, Relaxed);
                if *fragmenting {
                    self.extfrag_fragmenting.fetch_add(1, Relaxed);
                }
                if *change_ownership {
                    self.extfrag_owner.fetch_add(1, Relaxed);
                }
                let (a, f) = (*alloc_migratetype as usize, *fallback_migratetype as usize);
                if a < MIGRATE_TYPES && f < MIGRATE_TYPES {
                    self.extfrag_by[a][f].fetch_add(1, Relaxed);
                }
            }
            MmPageAlloc { pfn: Some(_), order, .. } => {
                self.alloc_events.fetch_add(1, Relaxed);
                self.alloc_pages.fetch_add(1 << (*order).min(MAX_PAGE_ORDER), Relaxed);
                self.order_ok[(*order).min(MAX_PAGE_ORDER) as usize].fetch_add(1, Relaxed);
            }
            MmPageAlloc { pfn: None, order, .. } => {
                self.order_failed[(*order).min(MAX_PAGE_ORDER) as usize].fetch_add(1, Relaxed);
            }
            MmPageFree { order, .. } => {
                self.free_events.fetch_add(1, Relaxed);
                self.free_pages.fetch_add(1 << (*order).min(MAX_PAGE_ORDER), Relaxed);
            }
            _ => {}
        }
    }
}

/// kmm's own allocator-internal events during a replay (a trace sink):
/// all of them, and those inside the stretches perf lost on their CPU
/// (where the kernel's trace has no events to compare them with).
#[derive(Default)]
struct KmmCounts {
    all: Counts,
    in_lost: Counts,
    /// Per CPU: the stretches (start, end ns) perf lost, sorted.
    lost: std::collections::BTreeMap<u32, Vec<(u64, u64)>>,
    /// Only events in the trace's time span count (timer work that runs
    /// between the start state and the first traced event, or after the
    /// last, has no kernel events to compare with).
    span: (u64, u64),
}

impl KmmCounts {
    fn in_lost_stretch(&self, cpu: u32, ts: u64) -> bool {
        let Some(w) = self.lost.get(&cpu) else { return false };
        let i = w.partition_point(|&(a, _)| a < ts);
        i > 0 && ts < w[i - 1].1
    }

    fn sink(self: &Arc<Self>) -> crate::trace::Sink {
        let c = self.clone();
        Arc::new(move |ev: &crate::trace::Event| {
            if ev.ts_ns < c.span.0 || ev.ts_ns > c.span.1 {
                return;
            }
            c.all.add(&ev.payload);
            if c.in_lost_stretch(ev.cpu, ev.ts_ns) {
                c.in_lost.add(&ev.payload);
            }
        })
    }
}

/// Where perf lost events: for each PERF_RECORD_LOST of a CPU, the longest
/// silence of that CPU in the second before perf wrote the record (the
/// record carries the time writing resumed, not when the buffer filled).
/// Per CPU, sorted (start, end) ns.
pub fn lost_stretches(log: &TraceLog) -> std::collections::BTreeMap<u32, Vec<(u64, u64)>> {
    let mut out: std::collections::BTreeMap<u32, Vec<(u64, u64)>> = Default::default();
    if log.lost_records.is_empty() {
        return out;
    }
    let cpus: HashSet<u32> = log.lost_records.iter().map(|r| r.0).collect();
    let mut per_cpu: HashMap<u32, Vec<u64>> = HashMap::new();
    for e in log.events.iter().filter(|e| cpus.contains(&e.cpu)) {
        per_cpu.entry(e.cpu).or_default().push(e.ts_ns);
    }
    for ts in per_cpu.values_mut() {
        ts.sort_unstable(); // perf's order is by time already; a hostile file may not be
    }
    for &(cpu, t, _) in &log.lost_records {
        let Some(ts) = per_cpu.get(&cpu) else { continue };
        let lo = ts.partition_point(|&x| x < t.saturating_sub(1_000_000_000)).saturating_sub(1);
        let hi = ts.partition_point(|&x| x <= t);
        let seg = &ts[lo..hi.max(lo)];
        if let Some((a, b)) = seg.windows(2).map(|w| (w[0], w[1])).max_by_key(|(a, b)| b.saturating_sub(*a)) {
            let v = out.entry(cpu).or_default();
            if !v.contains(&(a, b)) {
                v.push((a, b));
            }
        }
    }
    for w in out.values_mut() {
        w.sort_unstable();
    }
    out
}

/// A CPU silent this long in the trace around a due time counts as idle.
pub const IDLE_GAP_NS: u64 = 100_000_000;

/// When each CPU ran, as the trace shows it: the kernel's vmstat timers are
/// deferrable, so an idle CPU's work waits for the CPU to wake.
///
/// SIMPLIFICATION: a CPU with no traced event within `IDLE_GAP_NS` on both
/// sides of a due time counts as idle (NOHZ) until its next event; a CPU
/// that runs without allocating for that long (a compute-bound task) is
/// taken for idle too. Outside the trace's time span and in stretches perf
/// lost, CPUs count as running.
struct Activity {
    /// Per CPU (as the machine runs them: trace CPU % cpus): event times, sorted.
    times: HashMap<u32, Vec<u64>>,
    lost: std::collections::BTreeMap<u32, Vec<(u64, u64)>>,
    span: (u64, u64),
}

impl Activity {
    fn new(log: &TraceLog, ncpus: u32) -> Activity {
        let mut times: HashMap<u32, Vec<u64>> = HashMap::new();
        for e in &log.events {
            let c = if e.cpu < ncpus { e.cpu } else { e.cpu % ncpus.max(1) };
            times.entry(c).or_default().push(e.ts_ns);
        }
        for v in times.values_mut() {
            v.sort_unstable();
        }
        let span = match (log.events.first(), log.events.last()) {
            (Some(a), Some(b)) => (a.ts_ns, b.ts_ns),
            _ => (u64::MAX, 0),
        };
        Activity { times, lost: lost_stretches(log), span }
    }

    /// When `cpu`'s worker due at `due` runs: at `due` if the CPU is running
    /// then, else at its next traced event.
    fn runs_at(&self, cpu: u32, due: u64) -> u64 {
        if due < self.span.0 || due > self.span.1 {
            return due;
        }
        if self.lost.get(&cpu).is_some_and(|w| w.iter().any(|&(a, b)| a <= due && due <= b)) {
            return due;
        }
        let Some(ts) = self.times.get(&cpu) else { return u64::MAX };
        let i = ts.partition_point(|&x| x < due);
        let next = ts.get(i).copied();
        let prev = i.checked_sub(1).map(|j| ts[j]);
        let busy_before = prev.is_some_and(|p| due - p <= IDLE_GAP_NS);
        let busy_after = next.is_some_and(|n| n - due <= IDLE_GAP_NS);
        if busy_before || busy_after {
            due
        } else {
            next.unwrap_or(u64::MAX)
        }
    }
}

/// Mark the page allocations the slab layer made (`true` = slab-owned).
/// A block is slab-owned when a slab object (or a large kmalloc) is
/// allocated inside it while it is allocated.
fn slab_owned_pages(log: &TraceLog, page_offset: u64, page_shift: u32) -> Vec<bool> {
    let mut owned = vec![false; log.events.len()];
    // Live traced blocks: head pfn -> (event index, order).
    let mut live: HashMap<u64, (usize, u32)> = HashMap::new();
    for (i, e) in log.events.iter().enumerate() {
        match e.kind {
            Kind::MmPageAlloc if e.flags & F_FAILED == 0 => {
                live.insert(e.ptr, (i, e.order as u32));
            }
            Kind::MmPageFree => {
                live.remove(&e.ptr);
            }
            Kind::Kmalloc | Kind::KmallocNode | Kind::KmemCacheAlloc | Kind::KmemCacheAllocNode => {
                if e.ptr < page_offset {
                    continue;
                }
                let pfn = (e.ptr - page_offset) >> page_shift;
                for order in 0..=MAX_PAGE_ORDER {
                    let head = pfn & !((1u64 << order) - 1);
                    if let Some(&(j, o)) = live.get(&head) {
                        if o >= order {
                            owned[j] = true;
                            break;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    owned
}

impl<'a> Replayer<'a> {
    fn site(&mut self, id: u32) -> CallSite {
        if id == NONE {
            return super::unknown_call_site();
        }
        let i = id as usize;
        if self.sites.len() <= i {
            self.sites.resize(i + 1, None);
        }
        self.sites[i].get_or_insert_with(|| Arc::from(self.log.strings.get(id))).clone()
    }

    fn on_cpu(&mut self, cpu: u32) -> Result<()> {
        let n = self.m.cpus.len();
        let cpu = if cpu >= n {
            self.r.trace_cpus_remapped += 1;
            cpu % n
        } else {
            cpu
        };
        if self.bound == Some(cpu) {
            return Ok(());
        }
        if self.bound.take().is_some() {
            self.m.cpus.unbind().map_err(KmmError::Bug)?;
        }
        self.m.cpus.bind(cpu).map_err(KmmError::Bug)?;
        self.bound = Some(cpu);
        Ok(())
    }

    fn fail(&mut self, e: KmmError) {
        self.r.kmm_failures += 1;
        if self.r.kmm_failure_examples.len() < 10 {
            self.r.kmm_failure_examples.push(e.to_string());
        }
    }

    fn mismatch(&mut self, event: usize, what: String, kernel: String, kmm: String) {
        if self.r.mismatch_examples.len() < 20 {
            self.r.mismatch_examples.push(Mismatch { event: event as u64, what, kernel, kmm });
        }
    }

    fn used_pages(&self) -> u64 {
        self.total_pages.saturating_sub(self.m.nr_free_pages())
    }

    fn note_peak(&mut self) {
        let u = self.used_pages();
        if u > self.r.peak_used_pages {
            self.r.peak_used_pages = u;
        }
    }

    fn sample(&mut self, event: u64) {
        let zones = self
            .m
            .zones
            .iter()
            .filter(|z| z.is_populated())
            .map(|z| ZoneSample { zone: z.kind.name(), nr_free: z.area.lock_uncounted().nr_free })
            .collect();
        let used_pages = self.used_pages();
        self.r.samples.push(Sample { event, used_pages, zones });
    }

    /// Free what a traced ptr became.
    fn free_obj(&mut self, obj: Obj, cs: &CallSite) -> Result<()> {
        match obj {
            Obj::Kmalloc(a) => self.m.kfree(a, cs),
            Obj::Cache(a, c) => self.m.kmem_cache_free(&c, VirtAddr(a), cs),
        }
    }

    /// The cache a kmem_cache_alloc event names: existing, or created now.
    fn cache_for(&mut self, name: u32, bytes_req: u64, bytes_alloc: u64) -> Result<Arc<KmemCache>> {
        if let Some(c) = self.caches.get(&name) {
            return Ok(c.clone());
        }
        let n = self.log.strings.get(name).to_string();
        let c = match self.m.slab.find(&n) {
            Some(c) => c,
            None => self.create_cache(&n, bytes_req, bytes_alloc)?,
        };
        self.caches.insert(name, c.clone());
        Ok(c)
    }

    fn create_cache(&mut self, name: &str, bytes_req: u64, bytes_alloc: u64) -> Result<Arc<KmemCache>> {
        let (c, how) = super::shape::create_cache_like(self.m, name, bytes_req, Some(bytes_alloc), None, false)?;
        self.r.caches_created.push((name.to_string(), c.object_size(), c.geo.size, how));
        self.created.push(c.clone());
        Ok(c)
    }

    /// The kernel's zone of a traced pfn: the recorded zones when the machine
    /// was shaped from a recording, else x86_64's boundaries.
    fn kernel_zone_of(&self, pfn: u64) -> &'static str {
        if self.m.cfg.layout.is_some() {
            if let Some(z) = self.m.pfn_zone(Pfn(pfn)) {
                return z.kind.name();
            }
        }
        x86_64_zone_of_pfn(pfn)
    }

    fn kmm_zone_of(&self, pfn: u64) -> &'static str {
        self.m.pfn_zone(Pfn(pfn)).map_or("?", |z| z.kind.name())
    }

    /// Seed the maps from the machine's warm start, if it was made for this trace.
    fn seed_warm(&mut self) {
        self.r.machine_notes = self.m.shape_notes.lock().clone();
        let seeds = self.m.warm.lock().clone();
        let Some(seeds) = seeds else { return };
        if seeds.trace_id != super::shape::trace_id(self.log) {
            self.r.warnings.push(
                "the machine was warmed for another trace: its pre-trace pages and objects are not mapped (cold start for this one)".into(),
            );
            return;
        }
        if seeds.used.swap(true, Relaxed) {
            self.r.warnings.push(
                "the machine's warm start was used by an earlier replay: this one starts from the state that replay left, its pre-trace pages and objects not mapped again".into(),
            );
            return;
        }
        self.r.warm = true;
        self.r.machine_notes = seeds.notes.clone();
        for &(tp, kp, order) in &seeds.report.allocated {
            self.pages.insert(tp, (kp, order));
        }
        for &(tptr, kptr, cid) in &seeds.objs {
            if let Some(c) = self.m.slab.get(cid) {
                self.objs.insert(tptr, Obj::Cache(kptr, c.clone()));
            }
        }
        self.warm_slab_heads.extend(seeds.slab_heads.iter().copied());
    }

    /// Start times of the drain bursts kworker threads made (vmstat_update's
    /// decay): (cpu, ns).
    fn kworker_drain_bursts(&self) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        let mut last: Option<(u32, u64)> = None;
        for (i, e) in self.log.events.iter().enumerate() {
            if e.kind != Kind::MmPagePcpuDrain {
                continue;
            }
            let burst_on = matches!(last, Some((c, t)) if c == e.cpu && e.ts_ns.saturating_sub(t) < 2_000_000);
            if !burst_on && self.log.comm(i).starts_with("kworker/") {
                out.push((e.cpu, e.ts_ns));
            }
            last = Some((e.cpu, e.ts_ns));
        }
        out
    }

    /// Run the timer work due up to `t` (and compare samples due by then).
    fn advance(&mut self, t: u64, event: u64) {
        while let Some(b) = self.bundle.filter(|_| self.use_samples) {
            let Some(s) = b.samples.get(self.next_sample) else { break };
            if s.ts_ns > t {
                break;
            }
            if self.o.time {
                // Reading /proc wakes no CPU of the model.
                let act = &self.activity;
                self.r.timer_runs += self.m.advance_time_when(s.ts_ns, &|c, due| act.runs_at(c, due));
            }
            self.compare_sample(s.ts_ns, event, &s.buddyinfo);
            self.next_sample += 1;
        }
        if self.o.time {
            if t >= self.next_due {
                let act = &self.activity;
                self.r.timer_runs += self.m.advance_time_when(t, &|c, due| act.runs_at(c, due));
                self.next_due = self.m.clock_next_due();
            } else {
                self.m.clock_set(t);
            }
        }
    }

    fn kmm_nr_free(&self, zone: &str) -> Option<Vec<u64>> {
        self.m.zones.iter().find(|z| z.kind.name() == zone && z.is_populated()).map(|z| z.area.lock_uncounted().nr_free.to_vec())
    }

    fn compare_sample(&mut self, ts: u64, event: u64, bi: &[super::procfs::BuddyZone]) {
        let mut zones = Vec::new();
        for bz in bi.iter().filter(|b| b.node == 0) {
            let Some(kmm) = self.kmm_nr_free(&bz.zone) else { continue };
            zones.push((bz.zone.clone(), free_pages_of(&bz.nr_free), free_pages_of(&kmm), free_distance(&bz.nr_free, &kmm)));
        }
        self.r.trajectory.push(TrajPoint { ts_ns: ts, event, zones });
    }

    /// kmm's end state beside end.buddyinfo / end.pagetypeinfo.
    fn end_state(&mut self) {
        let Some(b) = self.bundle else { return };
        let pti = b.end.pagetypeinfo.as_ref();
        let zones: Vec<(String, Vec<u64>)> = match (&b.end.buddyinfo, pti) {
            (Some(bi), _) => bi.iter().filter(|z| z.node == 0).map(|z| (z.zone.clone(), z.nr_free.clone())).collect(),
            (None, Some(p)) => {
                let mut names: Vec<String> = p.free.iter().filter(|f| f.node == 0).map(|f| f.zone.clone()).collect();
                names.dedup();
                names.into_iter().filter_map(|n| p.zone_nr_free(0, &n).map(|v| (n, v))).collect()
            }
            (None, None) => return,
        };
        for (zone, kernel) in zones {
            let Some(z) = self.m.zones.iter().find(|z| z.kind.name() == zone && z.is_populated()) else { continue };
            let (kmm, kmm_mt) = {
                let a = z.area.lock_uncounted();
                (a.nr_free.to_vec(), a.nr_free_mt)
            };
            let mut by_type = Vec::new();
            if let Some(p) = pti {
                for f in p.free.iter().filter(|f| f.node == 0 && f.zone == zone) {
                    let Some(mt) = MIGRATETYPE_NAMES.iter().position(|n| *n == f.migratetype) else { continue };
                    let mine: Vec<u64> = kmm_mt.iter().map(|per| per[mt]).collect();
                    by_type.push((f.migratetype.clone(), f.nr_free.clone(), mine));
                }
            }
            self.r.end_state.push(ZoneEnd {
                distance: free_distance(&kernel, &kmm),
                kernel_free_pages: free_pages_of(&kernel),
                kmm_free_pages: free_pages_of(&kmm),
                zone,
                kernel,
                kmm,
                by_type,
            });
        }
    }

    /// The dynamics table: the kernel's counts from the trace, kmm's from
    /// its own tracepoints during the replay.
    fn dynamics(&mut self, owned: &[bool], slab_pages_in: u64, slab_pages_out: u64) {
        let mut k = KernelCounts::default();
        // Traced blocks live (head -> slab-owned?), and pfns holding slab
        // objects the trace named: a free of a block the trace did not
        // allocate is a pre-trace slab's page when objects lived in it.
        let mut traced: HashMap<u64, bool> = HashMap::new();
        let mut obj_pfns: HashSet<u64> = HashSet::new();
        let shift = self.m.page_shift;
        for (i, e) in self.log.events.iter().enumerate() {
            match e.kind {
                Kind::MmPageAllocZoneLocked => {
                    k.zone_locked += 1;
                    if e.flags & F_REFILL != 0 {
                        k.zone_locked_refill += 1;
                    }
                }
                Kind::MmPagePcpuDrain => k.drain += 1,
                Kind::MmPageAlloc if e.flags & F_FAILED != 0 => {
                    k.order_failed[(e.order as u32).min(MAX_PAGE_ORDER) as usize] += 1;
                }
                Kind::MmPageAlloc => {
                    k.order_ok[(e.order as u32).min(MAX_PAGE_ORDER) as usize] += 1;
                    let n = 1u64 << (e.order as u32).min(MAX_PAGE_ORDER);
                    k.alloc_events += 1;
                    k.alloc_pages += n;
                    if owned[i] {
                        k.slab_in += n;
                    }
                    traced.insert(e.ptr, owned[i]);
                }
                Kind::MmPageFree => {
                    let o = (e.order as u32).min(MAX_PAGE_ORDER);
                    let n = 1u64 << o;
                    k.free_events += 1;
                    k.free_pages += n;
                    let slab = match traced.remove(&e.ptr) {
                        Some(owned) => owned,
                        None => (e.ptr..e.ptr.saturating_add(n)).any(|p| obj_pfns.contains(&p)),
                    };
                    if slab {
                        k.slab_out += n;
                    }
                }
                Kind::Kmalloc | Kind::KmallocNode | Kind::KmemCacheAlloc | Kind::KmemCacheAllocNode | Kind::Kfree | Kind::KmemCacheFree
                    if e.ptr >= self.o.page_offset && e.ptr - self.o.page_offset < (64 << 40) =>
                {
                    obj_pfns.insert((e.ptr - self.o.page_offset) >> shift);
                }
                Kind::Other if self.log.name(i) == "kmem:mm_page_alloc_extfrag" => {
                    k.extfrag += 1;
                    if self.field(i, "change_ownership").unwrap_or(0) != 0 {
                        k.extfrag_owner += 1;
                    }
                    // fragmenting is fallback_order < pageblock_order, computed
                    // here: the fragmenting= perf prints is libtraceevent's
                    // misgrouping of that expression (9 or 10, never 0/1;
                    // tp_format.rs). fallback_order is an int: -1 is not below.
                    let pb = self.field(i, "pageblock_order").unwrap_or(self.m.pageblock_order as u64);
                    let fb = self.field_i64(i, "fallback_order");
                    if fb.is_some_and(|f| f >= 0 && (f as u64) < pb) {
                        k.extfrag_fragmenting += 1;
                    }
                    if let (Some(a), Some(f)) = (self.field(i, "alloc_migratetype"), self.field(i, "fallback_migratetype")) {
                        if (a as usize) < MIGRATE_TYPES && (f as usize) < MIGRATE_TYPES {
                            k.extfrag_by[a as usize][f as usize] += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        let (c, l) = (&self.counts.all, &self.counts.in_lost);
        let g = |a: &AtomicU64| a.load(Relaxed);
        let row = |what: &str, tp: &str, kernel: u64, kmm: u64, lost: u64| DynRow {
            what: what.into(),
            tracepoint: tp.into(),
            kernel,
            kmm,
            kmm_in_lost: lost,
        };
        let mut rows = vec![
            row("pcp refills and other buddy allocations", "kmem:mm_page_alloc_zone_locked", k.zone_locked, g(&c.zone_locked), g(&l.zone_locked)),
            row(
                "  of pcp-sized orders (percpu_refill=1)",
                "kmem:mm_page_alloc_zone_locked percpu_refill=1",
                k.zone_locked_refill,
                g(&c.zone_locked_refill),
                g(&l.zone_locked_refill),
            ),
            row("pcp drains (pages)", "kmem:mm_page_pcpu_drain", k.drain, g(&c.drain), g(&l.drain)),
            row("fallbacks to another migratetype", "kmem:mm_page_alloc_extfrag", k.extfrag, g(&c.extfrag), g(&l.extfrag)),
            row(
                "  that took the pageblock",
                "kmem:mm_page_alloc_extfrag change_ownership=1",
                k.extfrag_owner,
                g(&c.extfrag_owner),
                g(&l.extfrag_owner),
            ),
            row(
                "  below pageblock order (fragmenting)",
                "kmem:mm_page_alloc_extfrag fragmenting=1",
                k.extfrag_fragmenting,
                g(&c.extfrag_fragmenting),
                g(&l.extfrag_fragmenting),
            ),
        ];
        for (a, an) in MIGRATETYPE_NAMES.iter().enumerate() {
            for (f, fname) in MIGRATETYPE_NAMES.iter().enumerate() {
                let (kn, mn) = (k.extfrag_by[a][f], g(&c.extfrag_by[a][f]));
                if kn + mn > 0 {
                    rows.push(row(
                        &format!("  {an} from {fname}"),
                        &format!("kmem:mm_page_alloc_extfrag alloc_migratetype={a} fallback_migratetype={f}"),
                        kn,
                        mn,
                        g(&l.extfrag_by[a][f]),
                    ));
                }
            }
        }
        rows.extend([
            row("pages the slab layer took", "kmem:mm_page_alloc of slab pages", k.slab_in, slab_pages_in, 0),
            row("pages the slab layer returned", "kmem:mm_page_free of slab pages", k.slab_out, slab_pages_out, 0),
            row("page allocations", "kmem:mm_page_alloc", k.alloc_events, g(&c.alloc_events), g(&l.alloc_events)),
            row("pages allocated", "kmem:mm_page_alloc (1 << order)", k.alloc_pages, g(&c.alloc_pages), g(&l.alloc_pages)),
            row("page frees", "kmem:mm_page_free", k.free_events, g(&c.free_events), g(&l.free_events)),
            row("pages freed", "kmem:mm_page_free (1 << order)", k.free_pages, g(&c.free_pages), g(&l.free_pages)),
        ]);
        self.r.dynamics = rows;
        self.r.page_alloc_orders = (0..NR_PAGE_ORDERS)
            .map(|o| (o as u32, k.order_ok[o], k.order_failed[o], g(&c.order_ok[o]), g(&c.order_failed[o])))
            .filter(|r| r.1 + r.2 + r.3 + r.4 > 0)
            .collect();
    }

    fn run(&mut self) -> Result<()> {
        let owned = slab_owned_pages(self.log, self.o.page_offset, self.m.page_size.trailing_zeros());
        self.seed_warm();
        // samples.txt must be on the trace's clock (perf record -k CLOCK_MONOTONIC).
        if let (Some(b), Some(e0), Some(e1)) = (self.bundle, self.log.events.first(), self.log.events.last()) {
            if let (Some(s0), Some(s1)) = (b.samples.first(), b.samples.last()) {
                let slack = 1_000_000_000;
                if s0.ts_ns > e1.ts_ns.saturating_add(slack) || s1.ts_ns.saturating_add(slack) < e0.ts_ns {
                    self.use_samples = false;
                    self.r.warnings.push(format!(
                        "samples.txt's times ({:.3} .. {:.3} s) do not overlap the trace's ({:.3} .. {:.3} s): was the trace \
                         recorded without `perf record -k CLOCK_MONOTONIC`? The trajectory is not compared",
                        s0.ts_ns as f64 / 1e9,
                        s1.ts_ns as f64 / 1e9,
                        e0.ts_ns as f64 / 1e9,
                        e1.ts_ns as f64 / 1e9
                    ));
                }
            }
        }
        self.r.boot_used_pages = self.used_pages();
        self.r.peak_used_pages = self.r.boot_used_pages;
        // kmm's own events, counted while the replay runs.
        use crate::trace::EventId as E;
        let mask = [E::MmPageAlloc, E::MmPageFree, E::MmPageAllocZoneLocked, E::MmPagePcpuDrain, E::MmPageAllocExtfrag]
            .iter()
            .fold(0, |m, e| m | e.bit());
        let handle = self.m.trace.attach(mask, self.counts.sink());
        let slab_in0 = self.m.slab.pages_allocated.load(Relaxed);
        let locks0: u64 = self.m.zones.iter().map(|z| z.area.acquisitions()).sum();
        let slab_out0 = self.m.slab.pages_freed.load(Relaxed);
        // The clock starts at the first event (or the first sample, if earlier).
        if self.o.time {
            let first_ev = self.log.events.first().map(|e| e.ts_ns);
            let first_sample = self.bundle.filter(|_| self.use_samples).and_then(|b| b.samples.first()).map(|s| s.ts_ns);
            let start = match (first_ev, first_sample) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(t) = start {
                if t > 0 && self.m.clock_next_due() == 0 {
                    // The jiffies phase, from the kernel's own vmstat_update drains.
                    let bursts = self.kworker_drain_bursts();
                    if let Some(p) = crate::clock::Clock::estimate_phase(&bursts) {
                        self.m.clock.phase_ns.store(p, Relaxed);
                        self.r.machine_notes.push(format!(
                            "timer work on the trace's clock: whole jiffies-seconds at +{:.3} s, from {} drain bursts of the kernel's vmstat_update",
                            p as f64 / 1e9,
                            bursts.len()
                        ));
                    }
                    self.m.advance_time(t);
                }
            }
            self.next_due = self.m.clock_next_due();
        }
        let res = self.run_events(&owned);
        self.m.trace.detach(handle);
        res?;
        let slab_in = self.m.slab.pages_allocated.load(Relaxed) - slab_in0;
        let slab_out = self.m.slab.pages_freed.load(Relaxed) - slab_out0;
        self.dynamics(&owned, slab_in, slab_out);
        self.r.zone_lock_acquisitions = self.m.zones.iter().map(|z| z.area.acquisitions()).sum::<u64>() - locks0;
        for (&cpu, w) in self.counts.lost.iter() {
            self.r.lost_stretches.extend(w.iter().map(|&(a, b)| (cpu, a, b)));
        }
        self.end_state();
        self.r.sim_ns = match (self.log.events.first(), self.log.events.last()) {
            (Some(a), Some(b)) => b.ts_ns.saturating_sub(a.ts_ns),
            _ => 0,
        };
        if self.o.free_at_end {
            self.free_all()?;
        }
        self.r.final_used_pages = self.used_pages();
        let mut by: Vec<(String, u64)> =
            self.by_name.iter().map(|(&id, &n)| (self.log.strings.get(id).to_string(), n)).collect();
        by.sort();
        self.r.replayed_by_name = by;
        let mut zp: Vec<((String, String), u64)> =
            self.zone_pairs.iter().map(|(&(k, m), &n)| ((k.to_string(), m.to_string()), n)).collect();
        zp.sort();
        self.r.zone_pairs = zp;
        Ok(())
    }

    fn run_events(&mut self, owned: &[bool]) -> Result<()> {
        let t0 = Instant::now();
        for (i, e) in self.log.events.iter().enumerate() {
            if self.o.sample_every > 0 && i as u64 % self.o.sample_every == 0 {
                self.sample(i as u64);
            }
            if self.o.time || self.bundle.is_some() {
                self.advance(e.ts_ns, i as u64);
            }
            let replayed = match e.kind {
                Kind::Kmalloc | Kind::KmallocNode | Kind::KmemCacheAlloc | Kind::KmemCacheAllocNode => {
                    if e.ptr == 0 {
                        self.r.failed_in_trace += 1;
                        false
                    } else {
                        self.on_cpu(e.cpu)?;
                        let cs = self.site(e.call_site);
                        if let Some(old) = self.objs.remove(&e.ptr) {
                            self.r.reused_live += 1;
                            if let Err(err) = self.free_obj(old, &cs) {
                                self.fail(err);
                            }
                        }
                        let is_kmalloc = matches!(e.kind, Kind::Kmalloc | Kind::KmallocNode);
                        let got = if is_kmalloc {
                            let bytes = if e.bytes_req > crate::kmalloc::KMALLOC_MAX_CACHE_SIZE {
                                self.m.page_size << crate::slab::geometry::get_order(e.bytes_req, self.m.page_size as u32)
                            } else if e.bytes_req == 0 {
                                0
                            } else {
                                self.m.kmalloc_slab(e.bytes_req, e.gfp).geo.size as u64
                            };
                            self.m.kmalloc(e.bytes_req, e.gfp, &cs).map(|va| (Obj::Kmalloc(va.0), bytes))
                        } else {
                            match self.cache_for(e.cache, e.bytes_req, e.bytes_alloc) {
                                Ok(c) => self
                                    .m
                                    .kmem_cache_alloc(&c, e.gfp, &cs)
                                    .map(|va| (Obj::Cache(va.0, c.clone()), c.geo.size as u64)),
                                Err(err) => Err(err),
                            }
                        };
                        match got {
                            Ok((obj, bytes)) => {
                                self.r.bytes_alloc_checked += 1;
                                if bytes != e.bytes_alloc {
                                    self.r.bytes_alloc_mismatches += 1;
                                    let what = format!(
                                        "{} {} bytes_req={}",
                                        self.log.name(i),
                                        if e.cache != NONE { self.log.strings.get(e.cache) } else { "" },
                                        e.bytes_req
                                    );
                                    self.mismatch(i, what, format!("bytes_alloc={}", e.bytes_alloc), format!("bytes_alloc={bytes}"));
                                }
                                self.objs.insert(e.ptr, obj);
                                self.note_peak();
                                true
                            }
                            Err(err) => {
                                self.fail(err);
                                true
                            }
                        }
                    }
                }
                Kind::Kfree | Kind::KmemCacheFree => {
                    if e.ptr == 0 || e.ptr == crate::kmalloc::ZERO_SIZE_PTR {
                        self.r.null_frees += 1;
                        false
                    } else if let Some(obj) = self.objs.remove(&e.ptr) {
                        self.on_cpu(e.cpu)?;
                        let cs = self.site(e.call_site);
                        if let Err(err) = self.free_obj(obj, &cs) {
                            self.fail(err);
                        }
                        true
                    } else {
                        self.r.before_trace += 1;
                        false
                    }
                }
                Kind::MmPageAlloc => {
                    if e.flags & F_FAILED != 0 {
                        self.r.failed_in_trace += 1;
                        false
                    } else if owned[i] {
                        self.r.slab_pages += 1;
                        self.r.slab_page_allocs += 1;
                        self.slab_live.insert(e.ptr);
                        false
                    } else {
                        self.on_cpu(e.cpu)?;
                        if let Some((old, order)) = self.pages.remove(&e.ptr) {
                            self.r.reused_live += 1;
                            if let Err(err) = self.m.free_pages(Pfn(old), order) {
                                self.fail(err);
                            }
                        }
                        match self.m.alloc_pages(e.gfp, e.order as u32) {
                            Ok(p) => {
                                self.pages.insert(e.ptr, (p.0, e.order as u32));
                                let (kz, mz) = (self.kernel_zone_of(e.ptr), self.kmm_zone_of(p.0));
                                self.r.zone_checked += 1;
                                *self.zone_pairs.entry((kz, mz)).or_insert(0) += 1;
                                if kz != mz {
                                    self.r.zone_mismatches += 1;
                                    let what = format!("mm_page_alloc order={} pfn={:#x}", e.order, e.ptr);
                                    self.mismatch(i, what, format!("zone {kz}"), format!("zone {mz} (pfn {:#x})", p.0));
                                }
                                self.note_peak();
                            }
                            Err(err) => self.fail(err),
                        }
                        true
                    }
                }
                Kind::MmPageFree => {
                    if let Some((p, order)) = self.pages.remove(&e.ptr) {
                        self.on_cpu(e.cpu)?;
                        if order != e.order as u32 {
                            self.mismatch(i, format!("mm_page_free pfn={:#x}", e.ptr), format!("order={}", e.order), format!("allocated with order={order}"));
                        }
                        if let Err(err) = self.m.free_pages(Pfn(p), order) {
                            self.fail(err);
                        }
                        true
                    } else if self.is_slab_page_free(e.ptr) || self.warm_slab_heads.contains(&e.ptr) {
                        self.r.slab_pages += 1;
                        false
                    } else {
                        self.r.before_trace += 1;
                        false
                    }
                }
                Kind::PercpuAllocPercpu => {
                    if e.ptr == 0 {
                        self.r.failed_in_trace += 1;
                        false
                    } else {
                        self.on_cpu(e.cpu)?;
                        let cs = self.site(e.call_site);
                        if let Some(old) = self.percpu.remove(&e.ptr) {
                            self.r.reused_live += 1;
                            if let Err(err) = self.m.free_percpu(old) {
                                self.fail(err);
                            }
                        }
                        match self.m.alloc_percpu(e.bytes_req, e.extra as u64, e.gfp, &cs) {
                            Ok(p) => {
                                self.percpu.insert(e.ptr, p);
                                self.note_peak();
                            }
                            Err(err) => self.fail(err),
                        }
                        true
                    }
                }
                Kind::PercpuFreePercpu => {
                    if e.ptr == 0 {
                        self.r.null_frees += 1;
                        false
                    } else if let Some(p) = self.percpu.remove(&e.ptr) {
                        self.on_cpu(e.cpu)?;
                        if let Err(err) = self.m.free_percpu(p) {
                            self.fail(err);
                        }
                        true
                    } else {
                        self.r.before_trace += 1;
                        false
                    }
                }
                Kind::MmPageFreeBatched | Kind::MmPageAllocZoneLocked | Kind::MmPagePcpuDrain => {
                    self.r.consequences += 1;
                    false
                }
                Kind::Other => {
                    let name = self.log.name(i);
                    if name == "kmem:mm_page_alloc_extfrag" || name == "vmalloc:purge_vmap_area_lazy" {
                        self.r.consequences += 1;
                        false
                    } else if name == "vmalloc:alloc_vmap_area" {
                        self.vmap_alloc(i)?
                    } else if name == "vmalloc:free_vmap_area_noflush" {
                        self.vmap_free(i)?
                    } else if name.starts_with("vmalloc:") {
                        self.r.vmalloc += 1;
                        false
                    } else {
                        self.r.other += 1;
                        false
                    }
                }
            };
            if replayed {
                self.r.replayed += 1;
                *self.by_name.entry(e.name).or_insert(0) += 1;
            }
        }
        self.r.seconds = t0.elapsed().as_secs_f64();
        self.r.events = self.log.events.len() as u64;
        // Samples after the last event: the clock runs on to them.
        let end_ts = self.bundle.filter(|_| self.use_samples).and_then(|b| b.samples.last()).map(|s| s.ts_ns).unwrap_or(0);
        if end_ts > 0 {
            self.advance(end_ts, self.r.events);
        }
        self.sample(self.r.events);
        self.r.live_at_end = (self.objs.len() + self.pages.len() + self.percpu.len() + self.vmaps.len()) as u64;
        Ok(())
    }

    /// A field of an `Other` event's text: `key=value` or `key: value`.
    fn field(&self, i: usize, key: &str) -> Option<u64> {
        let t = self.log.raw_text(i);
        let at = t.find(&format!("{key}=")).map(|p| p + key.len() + 1).or_else(|| t.find(&format!("{key}: ")).map(|p| p + key.len() + 2))?;
        let v = t[at..].split_whitespace().next()?;
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => v.parse().ok(),
        }
    }

    /// A signed decimal field of an `Other` event's text.
    fn field_i64(&self, i: usize, key: &str) -> Option<i64> {
        let t = self.log.raw_text(i);
        let at = t.find(&format!(" {key}=")).map(|p| p + key.len() + 2)?;
        t[at..].split_whitespace().next()?.parse().ok()
    }

    /// `vmalloc:alloc_vmap_area`: vmalloc the traced size (minus the guard).
    fn vmap_alloc(&mut self, i: usize) -> Result<bool> {
        let (Some(va), Some(size), Some(align)) = (self.field(i, "va_start"), self.field(i, "size"), self.field(i, "align")) else {
            self.r.other += 1;
            return Ok(false);
        };
        if self.field(i, "failed").unwrap_or(0) != 0 {
            self.r.failed_in_trace += 1;
            return Ok(false);
        }
        self.on_cpu(self.log.events[i].cpu)?;
        if let Some(old) = self.vmaps.remove(&va) {
            self.r.reused_live += 1;
            if let Err(err) = self.m.vfree(old) {
                self.fail(err);
            }
        }
        let usable = size.saturating_sub(self.m.page_size).max(1);
        let align = align.max(1).next_power_of_two();
        match self.m.vmalloc_node_range(usable, align, crate::gfp::GFP_KERNEL, 0, &self.site(self.log.events[i].call_site)) {
            Ok(a) => {
                self.vmaps.insert(va, a.addr);
                self.note_peak();
            }
            Err(err) => self.fail(err),
        }
        Ok(true)
    }

    /// `vmalloc:free_vmap_area_noflush`: vfree the area, if the trace made it.
    fn vmap_free(&mut self, i: usize) -> Result<bool> {
        let Some(va) = self.field(i, "va_start") else {
            self.r.other += 1;
            return Ok(false);
        };
        match self.vmaps.remove(&va) {
            Some(a) => {
                self.on_cpu(self.log.events[i].cpu)?;
                if let Err(err) = self.m.vfree(a) {
                    self.fail(err);
                }
                Ok(true)
            }
            None => {
                self.r.before_trace += 1;
                Ok(false)
            }
        }
    }

    /// A free of a pfn the slab layer owned (its allocation was skipped).
    fn is_slab_page_free(&mut self, pfn: u64) -> bool {
        self.slab_live.remove(&pfn)
    }

    fn free_all(&mut self) -> Result<()> {
        let cs = super::unknown_call_site();
        for (_, obj) in std::mem::take(&mut self.objs) {
            if let Err(e) = self.free_obj(obj, &cs) {
                self.fail(e);
            }
        }
        for (_, (p, order)) in std::mem::take(&mut self.pages) {
            if let Err(e) = self.m.free_pages(Pfn(p), order) {
                self.fail(e);
            }
        }
        for (_, p) in std::mem::take(&mut self.percpu) {
            if let Err(e) = self.m.free_percpu(p) {
                self.fail(e);
            }
        }
        for (_, a) in std::mem::take(&mut self.vmaps) {
            if let Err(e) = self.m.vfree(a) {
                self.fail(e);
            }
        }
        self.m.purge_vmap_area_lazy();
        for c in std::mem::take(&mut self.created) {
            if let Err(e) = self.m.kmem_cache_destroy(&c) {
                self.fail(e);
            }
        }
        for c in self.m.slab.caches() {
            let _ = self.m.kmem_cache_shrink(&c);
        }
        self.m.drain_all_pages();
        Ok(())
    }
}

/// Replay a trace on a machine (see the module header). The calling thread
/// must not be bound to a CPU of this machine; it is bound to each traced
/// event's CPU in turn and unbound at the end.
pub fn replay(log: &TraceLog, m: &Machine, o: &ReplayOptions) -> Result<ReplayReport> {
    replay_bundle(log, m, o, None)
}

/// `replay` with a recording bundle: kmm's state is compared with its
/// samples (trajectory) and end.* files (end state).
pub fn replay_bundle(log: &TraceLog, m: &Machine, o: &ReplayOptions, bundle: Option<&Bundle>) -> Result<ReplayReport> {
    if let Some(cpu) = m.cpus.current() {
        return Err(KmmError::InvalidArgument(format!(
            "replay binds the calling thread to each traced CPU; this thread already runs on cpu {cpu} (call it outside `with m.on_cpu(...)`)"
        )));
    }
    let total_pages = m.totalram_pages();
    // KASAN tracks record each event's traced call site, not the Python stack.
    let _stacks = crate::kasan::TracedStacks::enter();
    let mut r = Replayer {
        m,
        log,
        o,
        r: ReplayReport::default(),
        objs: HashMap::new(),
        pages: HashMap::new(),
        percpu: HashMap::new(),
        vmaps: HashMap::new(),
        caches: HashMap::new(),
        created: Vec::new(),
        sites: Vec::new(),
        bound: None,
        by_name: HashMap::new(),
        zone_pairs: HashMap::new(),
        total_pages,
        slab_live: HashSet::new(),
        warm_slab_heads: HashSet::new(),
        bundle,
        next_sample: 0,
        next_due: 0,
        use_samples: true,
        activity: Activity::new(log, m.cpus.len()),
        counts: Arc::new(KmmCounts {
            lost: lost_stretches(log),
            span: match (log.events.first(), log.events.last(), o.time) {
                (Some(a), Some(b), true) => (a.ts_ns, b.ts_ns),
                _ => (0, u64::MAX),
            },
            ..Default::default()
        }),
    };
    let res = r.run();
    if r.bound.take().is_some() {
        let _ = m.cpus.unbind();
    }
    res?;
    debug_assert!(r.r.check().is_empty(), "{:?}", r.r.check());
    Ok(r.r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_follow_mm_vmstat() {
        // One free order-3 block and four order-0 pages: 12 free pages.
        let mut nr = [0u64; NR_PAGE_ORDERS];
        nr[0] = 4;
        nr[3] = 1;
        // order 0: everything usable.
        assert_eq!(unusable_free_index(&nr, 0), 0);
        // order 1: only the 8 pages of the order-3 block serve: 4/12 unusable.
        assert_eq!(unusable_free_index(&nr, 1), 333);
        // order 4: nothing serves.
        assert_eq!(unusable_free_index(&nr, 4), 1000);
        assert_eq!(fragmentation_index(&nr, 2), -1000);
        // order 4 (16 pages): 1000 - (1000 + 12*1000/16) / 5 = 1000 - 1750/5 = 650.
        assert_eq!(fragmentation_index(&nr, 4), 650);
        assert_eq!(fragmentation_index(&[0; NR_PAGE_ORDERS], 4), 0);
        assert_eq!(unusable_free_index(&[0; NR_PAGE_ORDERS], 4), 1000);
    }

    #[test]
    fn report_check_counts_every_event_once() {
        let mut r = ReplayReport { events: 10, replayed: 6, before_trace: 3, vmalloc: 1, ..Default::default() };
        assert!(r.check().is_empty());
        r.other = 1;
        assert_eq!(r.check(), vec!["replay-1: outcomes sum to 11, not 10 events".to_string()]);
    }

    #[test]
    fn x86_64_zones() {
        assert_eq!(x86_64_zone_of_pfn(0xfff), "DMA");
        assert_eq!(x86_64_zone_of_pfn(0x1000), "DMA32");
        assert_eq!(x86_64_zone_of_pfn(0xfffff), "DMA32");
        assert_eq!(x86_64_zone_of_pfn(0x1057ab), "Normal");
    }
}
