//! `perf kmem stat` over a parsed trace: the slab and page-allocator
//! summaries, the `--caller` and `--alloc` tables and their sort keys, in
//! perf's own text layout.
//!
//! # Kernel
//! `tools/perf/builtin-kmem.c` as of perf 6.1 (the version that printed the
//! reference output `sample.perf-kmem-stat-*.txt`):
//! - slab: `evsel__process_alloc_event` (kmalloc, kmem_cache_alloc: per-ptr
//!   and per-call-site records, totals), `evsel__process_alloc_node_event`
//!   (only the legacy `*_node` events count cross-CPU allocations in 6.1:
//!   node of the CPU != the event's node, -1 included; 6.2 changed this),
//!   `evsel__process_free_event` (kfree, kmem_cache_free: unknown ptr
//!   ignored; `total_freed += last_alloc`; a free on another CPU than the
//!   last alloc is a ping-pong for the ptr and its call site; the ptr's
//!   `alloc_cpu` becomes -1, so a second free of it counts again);
//! - page: `evsel__process_page_alloc_event` / `_page_free_event` (only
//!   `kmem:mm_page_alloc` and `kmem:mm_page_free`; `mm_page_free_batched` is
//!   not read), keyed by pfn (`use_pfn`: the event has a pfn field), a
//!   failed allocation (page NULL) counted and not recorded, a free of a pfn
//!   not allocated in the trace is "free-only", `order_stats[order][migratetype]`
//!   indexed by the raw migratetype under perf's column titles;
//! - output: `print_slab_summary`, `print_page_summary`,
//!   `__print_slab_result`, `__print_page_alloc_result`,
//!   `__print_page_caller_result`, `print_gfp_flags`, `compact_gfp_flags`,
//!   the sort dimensions and `sort_slab_insert` / `sort_page_insert`
//!   (descending, ties in input order). Numbers print as in the C locale
//!   (no thousands separators), as in the reference output.
//!
//! SIMPLIFICATION: perf keys call sites by address; text traces give
//! `symbol+0xoff`, so call sites are ordered by that text where perf orders
//! by address (only the order of rows with equal sort keys can differ).
//! SIMPLIFICATION: a page allocation with no callchain has call site
//! "[unknown]" (perf would print the sample's instruction pointer).
//! SIMPLIFICATION: one NUMA node (node of every CPU is 0).
//! SIMPLIFICATION: perf stops with an error when a free's order does not
//! match its allocation's; here that free only skips the per-alloc record.
//!
//! # Invariants
//! - stat-1: `nomatch <= nr_page_frees`; the per-pfn records hold every
//!   successful allocation, `sum(order_stats)` those of orders < 11 and
//!   migratetypes < 6; the per-ptr hits sum to `nr_allocs`. `check()`.
#![forbid(unsafe_code)]

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use super::perf_script::{Kind, Strings, TraceLog, F_FAILED, NONE};
use crate::gfp;

/// `MAX_PAGE_ORDER` / `MAX_MIGRATE_TYPES` of builtin-kmem.c.
pub const PERF_MAX_PAGE_ORDER: usize = 11;
pub const PERF_MAX_MIGRATE_TYPES: usize = 6;

/// One row of a slab table (per ptr, or per call site).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlabRow {
    pub ptr: u64,
    /// Interned call site.
    pub call_site: u32,
    pub bytes_req: u64,
    pub bytes_alloc: u64,
    pub hit: u64,
    pub pingpong: u64,
    last_alloc: u64,
    alloc_cpu: i32,
}

/// The numbers of `perf kmem --slab stat`.
#[derive(Clone, Debug, Default)]
pub struct SlabStat {
    pub total_requested: u64,
    pub total_allocated: u64,
    pub total_freed: u64,
    pub nr_allocs: u64,
    pub nr_cross_allocs: u64,
    /// Per ptr, ascending ptr.
    pub allocs: Vec<SlabRow>,
    /// Per call site, ascending call site text.
    pub callers: Vec<SlabRow>,
}

impl SlabStat {
    /// `fragmentation(total_requested, total_allocated)`, percent.
    pub fn fragmentation(&self) -> f64 {
        fragmentation(self.total_requested, self.total_allocated)
    }
}

/// One row of a page table (`struct page_stat`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageRow {
    pub page: u64,
    pub callsite: u32,
    pub order: u32,
    pub gfp_flags: u32,
    pub migrate_type: u32,
    pub alloc_bytes: u64,
    pub free_bytes: u64,
    pub nr_alloc: u64,
    pub nr_free: u64,
}

/// The numbers of `perf kmem --page stat`.
#[derive(Clone, Debug, Default)]
pub struct PageStat {
    pub page_size: u64,
    pub nr_page_allocs: u64,
    pub nr_page_frees: u64,
    pub nr_page_fails: u64,
    pub nr_page_nomatch: u64,
    pub total_page_alloc_bytes: u64,
    pub total_page_free_bytes: u64,
    pub total_page_fail_bytes: u64,
    pub total_page_nomatch_bytes: u64,
    /// `order_stats[order][migratetype]`.
    pub order_stats: [[u64; PERF_MAX_MIGRATE_TYPES]; PERF_MAX_PAGE_ORDER],
    /// Per (pfn, order, migratetype, gfp), ascending.
    pub allocs: Vec<PageRow>,
    /// Per (call site, order, migratetype, gfp), ascending.
    pub callers: Vec<PageRow>,
    /// gfp masks seen (with a valid page), ascending.
    pub gfps: Vec<u32>,
}

impl PageStat {
    pub fn nr_alloc_freed(&self) -> u64 {
        self.nr_page_frees - self.nr_page_nomatch
    }
    pub fn total_alloc_freed_bytes(&self) -> u64 {
        self.total_page_free_bytes - self.total_page_nomatch_bytes
    }
}

/// Both, with the call-site names the tables print.
#[derive(Clone, Debug, Default)]
pub struct KmemStat {
    pub slab: SlabStat,
    pub page: PageStat,
    pub strings: Strings,
}

/// `fragmentation()` of builtin-kmem.c.
pub fn fragmentation(n_req: u64, n_alloc: u64) -> f64 {
    if n_alloc == 0 {
        0.0
    } else {
        100.0 - (100.0 * n_req as f64 / n_alloc as f64)
    }
}

/// Compute the statistics of a trace (page size in bytes, 4096 on x86).
pub fn kmem_stat(log: &TraceLog, page_size: u64) -> KmemStat {
    let mut s = SlabStat::default();
    let mut by_ptr: HashMap<u64, SlabRow> = HashMap::new();
    let mut by_site: HashMap<u32, SlabRow> = HashMap::new();

    let mut p = PageStat { page_size, ..Default::default() };
    // page_live_tree: pfn -> (order, gfp, migratetype, callsite).
    let mut live: HashMap<u64, PageRow> = HashMap::new();
    let mut alloc_tree: BTreeMap<(u64, u32, u32, u32), PageRow> = BTreeMap::new();
    let mut caller_tree: HashMap<(u32, u32, u32, u32), PageRow> = HashMap::new();
    let mut gfps: Vec<u32> = Vec::new();

    for r in &log.events {
        match r.kind {
            Kind::Kmalloc | Kind::KmemCacheAlloc | Kind::KmallocNode | Kind::KmemCacheAllocNode => {
                // insert_alloc_stat / insert_caller_stat take int sizes.
                let req = r.bytes_req as i32 as i64 as u64;
                let alloc = r.bytes_alloc as i32 as i64 as u64;
                let e = by_ptr.entry(r.ptr).or_insert_with(|| SlabRow { ptr: r.ptr, ..Default::default() });
                e.hit += 1;
                e.bytes_req = e.bytes_req.wrapping_add(req);
                e.bytes_alloc = e.bytes_alloc.wrapping_add(alloc);
                e.call_site = r.call_site;
                e.alloc_cpu = r.cpu as i16 as i32;
                e.last_alloc = alloc;
                let c = by_site
                    .entry(r.call_site)
                    .or_insert_with(|| SlabRow { call_site: r.call_site, ..Default::default() });
                c.hit += 1;
                c.bytes_req = c.bytes_req.wrapping_add(req);
                c.bytes_alloc = c.bytes_alloc.wrapping_add(alloc);
                s.total_requested = s.total_requested.wrapping_add(req);
                s.total_allocated = s.total_allocated.wrapping_add(alloc);
                s.nr_allocs += 1;
                if matches!(r.kind, Kind::KmallocNode | Kind::KmemCacheAllocNode) && r.node != 0 {
                    s.nr_cross_allocs += 1;
                }
            }
            Kind::Kfree | Kind::KmemCacheFree => {
                let Some(a) = by_ptr.get_mut(&r.ptr) else { continue };
                s.total_freed = s.total_freed.wrapping_add(a.last_alloc);
                if r.cpu as i16 as i32 != a.alloc_cpu {
                    a.pingpong += 1;
                    if let Some(c) = by_site.get_mut(&a.call_site) {
                        c.pingpong += 1;
                    }
                }
                a.alloc_cpu = -1;
            }
            Kind::MmPageAlloc => {
                let order = r.order as u32;
                let bytes = page_size.checked_shl(order).unwrap_or(0);
                p.nr_page_allocs += 1;
                p.total_page_alloc_bytes = p.total_page_alloc_bytes.wrapping_add(bytes);
                if r.flags & F_FAILED != 0 {
                    p.nr_page_fails += 1;
                    p.total_page_fail_bytes = p.total_page_fail_bytes.wrapping_add(bytes);
                    continue;
                }
                let mt = r.migratetype as i32 as u32;
                if let Err(i) = gfps.binary_search(&r.gfp) {
                    gfps.insert(i, r.gfp);
                }
                // perf's three trees (page_live, page_alloc, page_caller):
                // the same row, keyed differently (the caller tree has no page).
                let row = |page| PageRow {
                    page,
                    callsite: r.call_site,
                    order,
                    gfp_flags: r.gfp,
                    migrate_type: mt,
                    ..Default::default()
                };
                for x in [
                    live.entry(r.ptr).or_insert_with(|| row(r.ptr)),
                    alloc_tree.entry((r.ptr, order, mt, r.gfp)).or_insert_with(|| row(r.ptr)),
                    caller_tree.entry((r.call_site, order, mt, r.gfp)).or_insert_with(|| row(0)),
                ] {
                    x.nr_alloc += 1;
                    x.alloc_bytes += bytes;
                    x.callsite = r.call_site;
                }
                if (order as usize) < PERF_MAX_PAGE_ORDER && (mt as usize) < PERF_MAX_MIGRATE_TYPES {
                    p.order_stats[order as usize][mt as usize] += 1;
                }
            }
            Kind::MmPageFree => {
                let order = r.order as u32;
                let bytes = page_size.checked_shl(order).unwrap_or(0);
                p.nr_page_frees += 1;
                p.total_page_free_bytes = p.total_page_free_bytes.wrapping_add(bytes);
                let Some(l) = live.remove(&r.ptr) else {
                    p.nr_page_nomatch += 1;
                    p.total_page_nomatch_bytes = p.total_page_nomatch_bytes.wrapping_add(bytes);
                    continue;
                };
                if let Some(a) = alloc_tree.get_mut(&(r.ptr, order, l.migrate_type, l.gfp_flags)) {
                    a.nr_free += 1;
                    a.free_bytes += bytes;
                }
                if let Some(c) = caller_tree.get_mut(&(l.callsite, order, l.migrate_type, l.gfp_flags)) {
                    c.nr_free += 1;
                    c.free_bytes += bytes;
                }
            }
            _ => {}
        }
    }
    let site = |id: u32| log.strings.get(id);
    let mut allocs: Vec<SlabRow> = by_ptr.into_values().collect();
    allocs.sort_by_key(|r| r.ptr);
    let mut callers: Vec<SlabRow> = by_site.into_values().collect();
    callers.sort_by(|a, b| site(a.call_site).cmp(site(b.call_site)));
    s.allocs = allocs;
    s.callers = callers;
    p.allocs = alloc_tree.into_values().collect();
    let mut pc: Vec<((u32, u32, u32, u32), PageRow)> = caller_tree.into_iter().collect();
    pc.sort_by(|(a, _), (b, _)| {
        site(a.0).cmp(site(b.0)).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3))
    });
    p.callers = pc.into_iter().map(|(_, r)| r).collect();
    p.gfps = gfps;
    KmemStat { slab: s, page: p, strings: log.strings.clone() }
}

// ---------------------------------------------------------------------------
// Sort keys
// ---------------------------------------------------------------------------

/// Slab sort dimensions (`slab_sorts[]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlabKey {
    Ptr,
    Callsite,
    Hit,
    Bytes,
    Frag,
    Pingpong,
}

/// Page sort dimensions (`page_sorts[]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKey {
    Page,
    Callsite,
    Hit,
    Bytes,
    Order,
    Migtype,
    Gfp,
}

/// perf's default slab sort.
pub const DEFAULT_SLAB_SORT: &str = "frag,hit,bytes";
/// perf's default page sort.
pub const DEFAULT_PAGE_SORT: &str = "bytes,hit";

/// `setup_slab_sorting`.
pub fn slab_keys(arg: &str) -> Result<Vec<SlabKey>, String> {
    arg.split(',')
        .map(|t| {
            Ok(match t {
                "ptr" => SlabKey::Ptr,
                "callsite" => SlabKey::Callsite,
                "hit" => SlabKey::Hit,
                "bytes" => SlabKey::Bytes,
                "frag" => SlabKey::Frag,
                "pingpong" => SlabKey::Pingpong,
                _ => return Err(format!("Unknown slab --sort key: '{t}'")),
            })
        })
        .collect()
}

/// `setup_page_sorting`.
pub fn page_keys(arg: &str) -> Result<Vec<PageKey>, String> {
    arg.split(',')
        .map(|t| {
            Ok(match t {
                "page" => PageKey::Page,
                "callsite" => PageKey::Callsite,
                "hit" => PageKey::Hit,
                "bytes" => PageKey::Bytes,
                "order" => PageKey::Order,
                "migtype" => PageKey::Migtype,
                "gfp" => PageKey::Gfp,
                _ => return Err(format!("Unknown page --sort key: '{t}'")),
            })
        })
        .collect()
}

fn slab_cmp(k: SlabKey, a: &SlabRow, b: &SlabRow, st: &Strings) -> Ordering {
    match k {
        SlabKey::Ptr => a.ptr.cmp(&b.ptr),
        SlabKey::Callsite => st.get(a.call_site).cmp(st.get(b.call_site)),
        SlabKey::Hit => a.hit.cmp(&b.hit),
        SlabKey::Bytes => a.bytes_alloc.cmp(&b.bytes_alloc),
        SlabKey::Frag => {
            let (x, y) = (fragmentation(a.bytes_req, a.bytes_alloc), fragmentation(b.bytes_req, b.bytes_alloc));
            x.partial_cmp(&y).unwrap_or(Ordering::Equal)
        }
        SlabKey::Pingpong => a.pingpong.cmp(&b.pingpong),
    }
}

fn page_cmp(k: PageKey, a: &PageRow, b: &PageRow, st: &Strings) -> Ordering {
    match k {
        PageKey::Page => a.page.cmp(&b.page),
        PageKey::Callsite => st.get(a.callsite).cmp(st.get(b.callsite)),
        PageKey::Hit => a.nr_alloc.cmp(&b.nr_alloc),
        PageKey::Bytes => a.alloc_bytes.cmp(&b.alloc_bytes),
        PageKey::Order => a.order.cmp(&b.order),
        PageKey::Migtype => a.migrate_type.cmp(&b.migrate_type),
        PageKey::Gfp => a.gfp_flags.cmp(&b.gfp_flags),
    }
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

/// `graph_dotted_line` (tools/perf/util/util.c), as `%.105s` prints it.
const DOTS: &str = "---------------------------------------------------------------------------------------------------------";

/// `migrate_type_str[]`.
const MIGRATE_TYPE_STR: [&str; 6] = ["UNMOVABL", "RECLAIM", "MOVABLE", "RESERVED", "CMA/ISLT", "UNKNOWN"];

/// `gfp_compact_table[]` (perf 6.1).
const GFP_COMPACT: &[(&str, &str)] = &[
    ("GFP_TRANSHUGE", "THP"),
    ("GFP_TRANSHUGE_LIGHT", "THL"),
    ("GFP_HIGHUSER_MOVABLE", "HUM"),
    ("GFP_HIGHUSER", "HU"),
    ("GFP_USER", "U"),
    ("GFP_KERNEL_ACCOUNT", "KAC"),
    ("GFP_KERNEL", "K"),
    ("GFP_NOFS", "NF"),
    ("GFP_ATOMIC", "A"),
    ("GFP_NOIO", "NI"),
    ("GFP_NOWAIT", "NW"),
    ("GFP_DMA", "D"),
    ("__GFP_HIGHMEM", "HM"),
    ("GFP_DMA32", "D32"),
    ("__GFP_HIGH", "H"),
    ("__GFP_ATOMIC", "_A"),
    ("__GFP_IO", "I"),
    ("__GFP_FS", "F"),
    ("__GFP_NOWARN", "NWR"),
    ("__GFP_RETRY_MAYFAIL", "R"),
    ("__GFP_NOFAIL", "NF"),
    ("__GFP_NORETRY", "NR"),
    ("__GFP_COMP", "C"),
    ("__GFP_ZERO", "Z"),
    ("__GFP_NOMEMALLOC", "NMA"),
    ("__GFP_MEMALLOC", "MA"),
    ("__GFP_HARDWALL", "HW"),
    ("__GFP_THISNODE", "TN"),
    ("__GFP_RECLAIMABLE", "RC"),
    ("__GFP_MOVABLE", "M"),
    ("__GFP_ACCOUNT", "AC"),
    ("__GFP_WRITE", "WR"),
    ("__GFP_RECLAIM", "R"),
    ("__GFP_DIRECT_RECLAIM", "DR"),
    ("__GFP_KSWAPD_RECLAIM", "KR"),
];

/// `compact_gfp_flags`: the tracepoint text of a mask, each known name
/// replaced by its short form (unknown names dropped; "(null)" if none).
pub fn compact_gfp(mask: u32) -> String {
    let text = gfp::format(mask);
    let parts: Vec<&str> = text
        .split('|')
        .filter_map(|t| GFP_COMPACT.iter().find(|(o, _)| *o == t).map(|&(_, c)| c))
        .collect();
    if parts.is_empty() {
        "(null)".to_string()
    } else {
        parts.join("|")
    }
}

/// `symbol+0xoff` -> `symbol+off` as perf's `"%s+%" PRIx64` prints it.
fn perf_sym_off(site: &str) -> String {
    let s = site.split(' ').next().unwrap_or(site);
    let s = s.split('/').next().unwrap_or(s);
    match s.rsplit_once("+0x") {
        Some((sym, off)) => format!("{sym}+{off}"),
        None => s.to_string(),
    }
}

/// The page tables print the symbol only.
fn perf_sym(site: &str) -> &str {
    let s = site.split(' ').next().unwrap_or(site);
    s.split('+').next().unwrap_or(s)
}

/// What to print, like perf's options.
#[derive(Clone, Debug)]
pub struct StatOptions {
    pub slab: bool,
    pub page: bool,
    pub caller: bool,
    pub alloc: bool,
    pub slab_sort: Vec<SlabKey>,
    pub page_sort: Vec<PageKey>,
    /// `-l N`: rows per table (-1: all).
    pub lines: i64,
}

impl Default for StatOptions {
    fn default() -> Self {
        StatOptions {
            slab: true,
            page: true,
            caller: false,
            alloc: false,
            slab_sort: slab_keys(DEFAULT_SLAB_SORT).unwrap_or_default(),
            page_sort: page_keys(DEFAULT_PAGE_SORT).unwrap_or_default(),
            lines: -1,
        }
    }
}

impl KmemStat {
    /// The violations of stat-1.
    pub fn check(&self) -> Vec<String> {
        let p = &self.page;
        let mut errs = Vec::new();
        if p.nr_page_nomatch > p.nr_page_frees {
            errs.push(format!("stat-1: {} free-only of {} frees", p.nr_page_nomatch, p.nr_page_frees));
        }
        let table: u64 = p.order_stats.iter().flatten().sum();
        let allocs: u64 = p.allocs.iter().map(|r| r.nr_alloc).sum();
        if table > p.nr_page_allocs - p.nr_page_fails || allocs != p.nr_page_allocs - p.nr_page_fails {
            errs.push(format!(
                "stat-1: order table {table}, alloc records {allocs}, successful allocations {}",
                p.nr_page_allocs - p.nr_page_fails
            ));
        }
        let s = &self.slab;
        let hits: u64 = s.allocs.iter().map(|r| r.hit).sum();
        if hits != s.nr_allocs {
            errs.push(format!("stat-1: per-ptr hits {hits} != {} allocations", s.nr_allocs));
        }
        errs
    }

    /// `print_result`: what `perf kmem stat` prints for these options.
    pub fn format(&self, o: &StatOptions) -> String {
        let mut out = String::new();
        if o.slab {
            if o.caller {
                self.slab_table(&mut out, true, o);
            }
            if o.alloc {
                self.slab_table(&mut out, false, o);
            }
            self.slab_summary(&mut out);
        }
        if o.page {
            if o.caller || o.alloc {
                self.gfp_flags(&mut out);
            }
            if o.caller {
                self.page_table(&mut out, true, o);
            }
            if o.alloc {
                self.page_table(&mut out, false, o);
            }
            self.page_summary(&mut out);
        }
        out
    }

    /// `print_slab_summary`.
    pub fn slab_summary(&self, out: &mut String) {
        let s = &self.slab;
        out.push_str("\nSUMMARY (SLAB allocator)\n========================\n");
        let _ = writeln!(out, "Total bytes requested: {}", s.total_requested);
        let _ = writeln!(out, "Total bytes allocated: {}", s.total_allocated);
        let _ = writeln!(out, "Total bytes freed:     {}", s.total_freed);
        if s.total_allocated > s.total_freed {
            let _ = writeln!(out, "Net total bytes allocated: {}", s.total_allocated - s.total_freed);
        }
        let _ = writeln!(
            out,
            "Total bytes wasted on internal fragmentation: {}",
            s.total_allocated.wrapping_sub(s.total_requested)
        );
        let _ = writeln!(out, "Internal fragmentation: {:.6}%", s.fragmentation());
        let _ = writeln!(out, "Cross CPU allocations: {}/{}", s.nr_cross_allocs, s.nr_allocs);
    }

    /// `print_page_summary`.
    pub fn page_summary(&self, out: &mut String) {
        let p = &self.page;
        let line = |out: &mut String, t: &str, n: u64, b: u64| {
            let _ = writeln!(out, "{t:<30}: {n:>16}   [ {:>16} KB ]", b / 1024);
        };
        out.push_str("\nSUMMARY (page allocator)\n========================\n");
        line(out, "Total allocation requests", p.nr_page_allocs, p.total_page_alloc_bytes);
        line(out, "Total free requests", p.nr_page_frees, p.total_page_free_bytes);
        out.push('\n');
        line(out, "Total alloc+freed requests", p.nr_alloc_freed(), p.total_alloc_freed_bytes());
        line(
            out,
            "Total alloc-only requests",
            p.nr_page_allocs.wrapping_sub(p.nr_alloc_freed()),
            p.total_page_alloc_bytes.wrapping_sub(p.total_alloc_freed_bytes()),
        );
        line(out, "Total free-only requests", p.nr_page_nomatch, p.total_page_nomatch_bytes);
        out.push('\n');
        line(out, "Total allocation failures", p.nr_page_fails, p.total_page_fail_bytes);
        out.push('\n');
        let _ = writeln!(
            out,
            "{:>5}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}",
            "Order", "Unmovable", "Reclaimable", "Movable", "Reserved", "CMA/Isolated"
        );
        let d12 = &DOTS[..12];
        let _ = writeln!(out, "{}  {d12}  {d12}  {d12}  {d12}  {d12}", &DOTS[..5]);
        for (o, row) in p.order_stats.iter().enumerate() {
            let _ = write!(out, "{o:>5}");
            for &n in &row[..PERF_MAX_MIGRATE_TYPES - 1] {
                if n != 0 {
                    let _ = write!(out, "  {n:>12}");
                } else {
                    let _ = write!(out, "  {:>12}", '.');
                }
            }
            out.push('\n');
        }
    }

    /// `__print_slab_result`.
    fn slab_table(&self, out: &mut String, is_caller: bool, o: &StatOptions) {
        let mut rows: Vec<&SlabRow> =
            if is_caller { self.slab.callers.iter().collect() } else { self.slab.allocs.iter().collect() };
        rows.sort_by(|a, b| {
            o.slab_sort
                .iter()
                .map(|&k| slab_cmp(k, b, a, &self.strings))
                .find(|c| c.is_ne())
                .unwrap_or(Ordering::Equal)
        });
        let _ = writeln!(out, "{DOTS}");
        let _ = write!(out, " {:<34} |", if is_caller { "Callsite" } else { "Alloc Ptr" });
        out.push_str(" Total_alloc/Per | Total_req/Per   | Hit      | Ping-pong | Frag\n");
        let _ = writeln!(out, "{DOTS}");
        let mut n_lines = o.lines;
        for r in rows {
            // `while (next && n_lines--)`
            let go = n_lines != 0;
            n_lines -= 1;
            if !go {
                break;
            }
            let name = if is_caller {
                if r.call_site == NONE {
                    "0x0".to_string()
                } else {
                    perf_sym_off(self.strings.get(r.call_site))
                }
            } else {
                format!("{:#x}", r.ptr)
            };
            let hit = r.hit.max(1);
            let _ = writeln!(
                out,
                " {:<34} | {:>9}/{:<5} | {:>9}/{:<5} | {:>8} | {:>9} | {:>6.3}%",
                name,
                r.bytes_alloc,
                r.bytes_alloc / hit,
                r.bytes_req,
                r.bytes_req / hit,
                r.hit,
                r.pingpong,
                fragmentation(r.bytes_req, r.bytes_alloc)
            );
        }
        if n_lines == -1 {
            out.push_str(" ...                                | ...             | ...             | ...      | ...       | ...   \n");
        }
        let _ = writeln!(out, "{DOTS}");
    }

    fn gfp_len(&self) -> usize {
        self.page.gfps.iter().map(|&g| compact_gfp(g).len()).max().unwrap_or(0).max("GFP flags".len())
    }

    /// `print_gfp_flags`.
    fn gfp_flags(&self, out: &mut String) {
        let max = self.page.gfps.iter().map(|&g| compact_gfp(g).len()).max().unwrap_or(0);
        out.push_str("#\n# GFP flags\n# ---------\n");
        for &g in &self.page.gfps {
            let _ = writeln!(out, "# {:08x}: {:>max$}: {}", g, compact_gfp(g), gfp::format(g));
        }
    }

    /// `__print_page_caller_result` / `__print_page_alloc_result`.
    fn page_table(&self, out: &mut String, is_caller: bool, o: &StatOptions) {
        let gl = self.gfp_len();
        let mut rows: Vec<&PageRow> =
            if is_caller { self.page.callers.iter().collect() } else { self.page.allocs.iter().collect() };
        rows.sort_by(|a, b| {
            o.page_sort
                .iter()
                .map(|&k| page_cmp(k, b, a, &self.strings))
                .find(|c| c.is_ne())
                .unwrap_or(Ordering::Equal)
        });
        let _ = write!(out, "\n{DOTS}\n");
        if is_caller {
            let _ = writeln!(out, " {:>5} alloc (KB) | Hits      | Order | Mig.type | {:<gl$} | Callsite", "Total", "GFP flags");
        } else {
            let _ = writeln!(
                out,
                " {:<16} | {:>5} alloc (KB) | Hits      | Order | Mig.type | {:<gl$} | Callsite",
                "PFN", "Total", "GFP flags"
            );
        }
        let _ = writeln!(out, "{DOTS}");
        let mut n_lines = o.lines;
        for r in rows {
            let go = n_lines != 0;
            n_lines -= 1;
            if !go {
                break;
            }
            let caller = if r.callsite == NONE { "[unknown]" } else { perf_sym(self.strings.get(r.callsite)) };
            let mt = MIGRATE_TYPE_STR.get(r.migrate_type as usize).copied().unwrap_or("UNKNOWN");
            if !is_caller {
                let _ = write!(out, " {:>16} |", r.page);
            }
            let _ = writeln!(
                out,
                " {:>16} | {:>9} | {:>5} | {:>8} | {:<gl$} | {}",
                r.alloc_bytes / 1024,
                r.nr_alloc,
                r.order,
                mt,
                compact_gfp(r.gfp_flags),
                caller
            );
        }
        if n_lines == -1 {
            if is_caller {
                let _ = writeln!(out, " ...              | ...       | ...   | ...      | {:<gl$} | ...", "...");
            } else {
                let _ = writeln!(
                    out,
                    " ...              | ...              | ...       | ...   | ...      | {:<gl$} | ...",
                    "..."
                );
            }
        }
        let _ = writeln!(out, "{DOTS}");
    }
}

#[cfg(test)]
mod tests {
    use super::super::perf_script::parse_str;
    use super::*;

    // A hand-made trace whose numbers are counted by hand in the comments.
    const T: &str = "\
a 1 [000] 1.000001: kmem:kmalloc: call_site=f+0x10 ptr=0x100 bytes_req=30 bytes_alloc=32 gfp_flags=GFP_KERNEL node=-1 accounted=false
a 1 [001] 1.000002: kmem:kmem_cache_alloc: call_site=g+0x20 ptr=0x200 name=c bytes_req=100 bytes_alloc=128 gfp_flags=GFP_KERNEL node=-1 accounted=false
a 1 [001] 1.000003: kmem:kfree: call_site=h+0x1 ptr=0x100
a 1 [001] 1.000004: kmem:kfree: call_site=h+0x1 ptr=0x999
a 1 [000] 1.000005: kmem:mm_page_alloc: page=0x10 pfn=0x10 order=1 migratetype=1 gfp_flags=GFP_HIGHUSER_MOVABLE
a 1 [000] 1.000006: kmem:mm_page_alloc: page=(nil) pfn=0x0 order=3 migratetype=0 gfp_flags=GFP_KERNEL
a 1 [000] 1.000007: kmem:mm_page_free: page=0x10 pfn=0x10 order=1
a 1 [000] 1.000008: kmem:mm_page_free: page=0x20 pfn=0x20 order=0
a 1 [000] 1.000009: kmem:mm_page_free_batched: page=0x20 pfn=0x20 order=0
";

    #[test]
    fn hand_counted() {
        let st = kmem_stat(&parse_str(T, false).unwrap(), 4096);
        let s = &st.slab;
        assert_eq!((s.total_requested, s.total_allocated, s.total_freed, s.nr_allocs), (130, 160, 32, 2));
        // kfree of 0x100 on cpu 1, allocated on cpu 0: one ping-pong for f+0x10.
        let f = s.callers.iter().find(|r| st.strings.get(r.call_site) == "f+0x10").unwrap();
        assert_eq!(f.pingpong, 1);
        let p = &st.page;
        assert_eq!((p.nr_page_allocs, p.nr_page_fails, p.nr_page_frees, p.nr_page_nomatch), (2, 1, 2, 1));
        assert!(st.check().is_empty());
        let mut bad = st.clone();
        bad.page.nr_page_nomatch = 5;
        bad.slab.nr_allocs = 7;
        assert_eq!(bad.check().len(), 2, "{:?}", bad.check());
        assert_eq!(p.total_page_alloc_bytes, 8192 + 32768);
        assert_eq!(p.order_stats[1][1], 1);
        let text = st.format(&StatOptions::default());
        assert!(text.contains("Total free-only requests      :                1   [                4 KB ]"), "{text}");
        assert!(text.contains("Internal fragmentation: 18.750000%"), "{text}");
    }

    #[test]
    fn tables_sort_descending_and_truncate_like_perf() {
        let st = kmem_stat(&parse_str(T, false).unwrap(), 4096);
        let o = StatOptions { caller: true, alloc: true, lines: 1, ..Default::default() };
        let text = st.format(&o);
        // frag of g: 21.875% > f: 6.25%, so g first; -l 1 cuts with a "..." row.
        assert!(text.contains(" g+20                               |       128/128   |       100/100   |        1 |         0 | 21.875%"), "{text}");
        assert!(text.contains(" ...                                | ..."), "{text}");
        assert!(text.contains(&format!("# {:08x}: HUM: GFP_HIGHUSER_MOVABLE", gfp::GFP_HIGHUSER_MOVABLE)), "{text}");
        assert!(slab_keys("frag,nope").is_err());
        assert!(page_keys("order,migtype,gfp").is_ok());
    }
}
