//! Tracepoints: the kernel's kmem events with their names, fields and
//! `TP_printk` text, and the sinks that receive them (Python callbacks,
//! recorders).
//!
//! # Kernel
//! `include/trace/events/kmem.h` (mm_page_alloc, mm_page_free,
//! mm_page_free_batched, mm_page_alloc_zone_locked, mm_page_pcpu_drain,
//! mm_page_alloc_extfrag, kmalloc, kfree, kmem_cache_alloc, kmem_cache_free),
//! `include/trace/events/percpu.h`, `include/trace/events/vmalloc.h`.
//! Text follows what `perf script` prints for these events (the real trace in
//! `shared/data/traces` is the reference): pointers raw (`no_hash_pointers`),
//! `page=` printed as perf prints it (the pfn), `pfn=0x%lx`.
//!
//! kmm's own events, where the kernel has no tracepoint: `kmm:kmap`,
//! `kmm:kunmap`, `kmm:kmap_local`, `kmm:kunmap_local` and
//! `kmm:tlb_flush_kernel_range` (one per flush, on the asking CPU).
//!
//! # Cost
//! A disabled tracepoint is one relaxed load of the enabled mask and a bit
//! test (`Tracing::on`). Events are built only when their bit is set.
//! An enabled one reads the TSC (`quanta`), takes the sinks from a
//! thread-local cache checked against a generation number (no lock, no
//! shared reference count), and a `Recorder` appends to the emitting CPU's
//! own buffer (chunks reused after `take`/`clear`): ~36 ns an event in
//! steady state (benches/README.md).
//!
//! # Invariants
//! - trace-1: `enabled` is the union of the masks of the attached sinks.
//! - trace-2: `generation` changes after every change of `sinks`, so a
//!   thread's cached sinks are used only while they are current.
//! - trace-3: a `Recorder` CPU buffer's `len` is the events its chunks hold,
//!   at most `capacity`; events beyond it are counted in `lost`.
//!
//! Lock order: `sinks` (RwLock) is taken after every allocator lock has been
//! released; sinks may call back into the machine. Paths that emit while
//! holding allocator locks (a slab discard frees pages under the node
//! `list_lock`) run inside `Tracing::defer`: their events are queued on the
//! thread and delivered, in order, when the outermost deferral ends.
//! Dropping a sink can run foreign code (a Python callback's `__del__`,
//! which may attach, detach or allocate): sink lists are dropped outside
//! `sinks`, and a list a thread's cache lets go of during a deferral is
//! kept (`STALE`) until the outermost deferral ends.
#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::gfp;

pub mod bundle;
pub mod kallsyms;
pub mod perf_data;
pub mod perf_script;
pub mod procfs;
pub mod replay;
pub mod shape;
pub mod stat;
pub mod tp_format;

/// Every tracepoint kmm knows, by id (bit in the enabled mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventId {
    MmPageAlloc = 0,
    MmPageFree,
    MmPageFreeBatched,
    MmPageAllocZoneLocked,
    MmPagePcpuDrain,
    MmPageAllocExtfrag,
    Kmalloc,
    Kfree,
    KmemCacheAlloc,
    KmemCacheFree,
    PercpuAllocPercpu,
    PercpuFreePercpu,
    AllocVmapArea,
    FreeVmapAreaNoflush,
    PurgeVmapAreaLazy,
    Kmap,
    Kunmap,
    KmapLocal,
    KunmapLocal,
    TlbFlush,
}

impl EventId {
    pub const ALL: [EventId; 20] = [
        EventId::MmPageAlloc,
        EventId::MmPageFree,
        EventId::MmPageFreeBatched,
        EventId::MmPageAllocZoneLocked,
        EventId::MmPagePcpuDrain,
        EventId::MmPageAllocExtfrag,
        EventId::Kmalloc,
        EventId::Kfree,
        EventId::KmemCacheAlloc,
        EventId::KmemCacheFree,
        EventId::PercpuAllocPercpu,
        EventId::PercpuFreePercpu,
        EventId::AllocVmapArea,
        EventId::FreeVmapAreaNoflush,
        EventId::PurgeVmapAreaLazy,
        EventId::Kmap,
        EventId::Kunmap,
        EventId::KmapLocal,
        EventId::KunmapLocal,
        EventId::TlbFlush,
    ];

    /// `system:name`, as perf names it.
    pub fn name(self) -> &'static str {
        match self {
            EventId::MmPageAlloc => "kmem:mm_page_alloc",
            EventId::MmPageFree => "kmem:mm_page_free",
            EventId::MmPageFreeBatched => "kmem:mm_page_free_batched",
            EventId::MmPageAllocZoneLocked => "kmem:mm_page_alloc_zone_locked",
            EventId::MmPagePcpuDrain => "kmem:mm_page_pcpu_drain",
            EventId::MmPageAllocExtfrag => "kmem:mm_page_alloc_extfrag",
            EventId::Kmalloc => "kmem:kmalloc",
            EventId::Kfree => "kmem:kfree",
            EventId::KmemCacheAlloc => "kmem:kmem_cache_alloc",
            EventId::KmemCacheFree => "kmem:kmem_cache_free",
            EventId::PercpuAllocPercpu => "percpu:percpu_alloc_percpu",
            EventId::PercpuFreePercpu => "percpu:percpu_free_percpu",
            EventId::AllocVmapArea => "vmalloc:alloc_vmap_area",
            EventId::FreeVmapAreaNoflush => "vmalloc:free_vmap_area_noflush",
            EventId::PurgeVmapAreaLazy => "vmalloc:purge_vmap_area_lazy",
            // kmm's own (the kernel has no tracepoints here).
            EventId::Kmap => "kmm:kmap",
            EventId::Kunmap => "kmm:kunmap",
            EventId::KmapLocal => "kmm:kmap_local",
            EventId::KunmapLocal => "kmm:kunmap_local",
            EventId::TlbFlush => "kmm:tlb_flush_kernel_range",
        }
    }

    #[inline]
    pub fn bit(self) -> u64 {
        1u64 << (self as u8)
    }
}

/// Mask of the events whose `system:name` matches a glob (`*`, `?`), given
/// either whole (`kmem:mm_page_*`) or without the system (`mm_page_alloc`).
/// Several patterns may be joined with `,`.
pub fn mask_for(pattern: &str) -> u64 {
    let mut m = 0;
    for pat in pattern.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        for id in EventId::ALL {
            let full = id.name();
            let short = &full[full.find(':').unwrap() + 1..];
            if glob(pat, full) || glob(pat, short) {
                m |= id.bit();
            }
        }
    }
    m
}

fn glob(p: &str, s: &str) -> bool {
    let (p, s) = (p.as_bytes(), s.as_bytes());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, usize::MAX, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = pi;
            mark = si;
            pi += 1;
        } else if star != usize::MAX {
            pi = star + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// A call site as the kernel's `%pS` prints it ("func+0xoff"), shared.
pub type CallSite = std::sync::Arc<str>;

/// A call site for callers that have none to report.
pub fn unknown_call_site() -> CallSite {
    std::sync::Arc::from("kmm")
}

/// The payload of one event, with the kernel's field names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// `kmem:kmalloc` (ptr 0 = the allocation failed).
    Kmalloc {
        call_site: CallSite,
        ptr: u64,
        bytes_req: u64,
        bytes_alloc: u64,
        gfp_flags: u32,
        node: i32,
        accounted: bool,
    },
    /// `kmem:kfree`
    Kfree { call_site: CallSite, ptr: u64 },
    /// `kmem:kmem_cache_alloc` (6.18 prints `name=` after `ptr=`).
    KmemCacheAlloc {
        call_site: CallSite,
        ptr: u64,
        name: std::sync::Arc<str>,
        bytes_req: u64,
        bytes_alloc: u64,
        gfp_flags: u32,
        node: i32,
        accounted: bool,
    },
    /// `kmem:kmem_cache_free`
    KmemCacheFree { call_site: CallSite, ptr: u64, name: std::sync::Arc<str> },
    /// `percpu:percpu_alloc_percpu` (6.0+ fields)
    PercpuAllocPercpu {
        call_site: CallSite,
        reserved: bool,
        is_atomic: bool,
        size: u64,
        align: u64,
        base_addr: u64,
        off: i64,
        ptr: u64,
        bytes_alloc: u64,
        gfp_flags: u32,
    },
    /// `percpu:percpu_free_percpu`
    PercpuFreePercpu { base_addr: u64, off: i64, ptr: u64 },
    /// pfn None = allocation failure (page=NULL, pfn=0x0).
    MmPageAlloc { pfn: Option<u64>, order: u32, migratetype: i32, gfp_flags: u32 },
    MmPageFree { pfn: u64, order: u32 },
    MmPageFreeBatched { pfn: u64 },
    MmPageAllocZoneLocked { pfn: u64, order: u32, migratetype: i32, percpu_refill: bool },
    MmPagePcpuDrain { pfn: u64, order: u32, migratetype: i32 },
    MmPageAllocExtfrag {
        pfn: u64,
        alloc_order: u32,
        fallback_order: u32,
        pageblock_order: u32,
        alloc_migratetype: i32,
        fallback_migratetype: i32,
        fragmenting: bool,
        change_ownership: bool,
    },
    /// `vmalloc:alloc_vmap_area` (mm/vmalloc.c alloc_vmap_area; failed=1 with addr 0).
    AllocVmapArea { addr: u64, size: u64, align: u64, vstart: u64, vend: u64, failed: bool },
    /// `vmalloc:free_vmap_area_noflush` (an area put on the lazy purge list).
    FreeVmapAreaNoflush { va_start: u64, nr_lazy: u64, nr_lazy_max: u64 },
    /// `vmalloc:purge_vmap_area_lazy` (one purge: the flushed range and areas freed).
    PurgeVmapAreaLazy { start: u64, end: u64, npurged: u32 },
    /// `kmm:kmap`: a kmap() (`nr` = the pkmap slot, -1 for a lowmem page;
    /// `count` = pkmap_count[nr] after it).
    Kmap { pfn: u64, addr: u64, nr: i32, count: u32 },
    /// `kmm:kunmap`.
    Kunmap { pfn: u64, addr: u64, nr: i32, count: u32 },
    /// `kmm:kmap_local` (`idx` = the fixmap slot index, -1 for lowmem).
    KmapLocal { pfn: u64, addr: u64, idx: i32 },
    /// `kmm:kunmap_local`.
    KunmapLocal { addr: u64, idx: i32 },
    /// `kmm:tlb_flush_kernel_range` on the CPU that asked (`pages` -1 = a
    /// full flush; `ipis` = flush IPIs sent to the other CPUs).
    TlbFlush { start: u64, end: u64, pages: i64, ipis: u32 },
}

/// A field value, for Python and for generic consumers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Int(i64),
    UInt(u64),
    Str(String),
    Bool(bool),
}

impl Payload {
    pub fn id(&self) -> EventId {
        match self {
            Payload::MmPageAlloc { .. } => EventId::MmPageAlloc,
            Payload::MmPageFree { .. } => EventId::MmPageFree,
            Payload::MmPageFreeBatched { .. } => EventId::MmPageFreeBatched,
            Payload::MmPageAllocZoneLocked { .. } => EventId::MmPageAllocZoneLocked,
            Payload::MmPagePcpuDrain { .. } => EventId::MmPagePcpuDrain,
            Payload::MmPageAllocExtfrag { .. } => EventId::MmPageAllocExtfrag,
            Payload::Kmalloc { .. } => EventId::Kmalloc,
            Payload::Kfree { .. } => EventId::Kfree,
            Payload::KmemCacheAlloc { .. } => EventId::KmemCacheAlloc,
            Payload::KmemCacheFree { .. } => EventId::KmemCacheFree,
            Payload::PercpuAllocPercpu { .. } => EventId::PercpuAllocPercpu,
            Payload::PercpuFreePercpu { .. } => EventId::PercpuFreePercpu,
            Payload::AllocVmapArea { .. } => EventId::AllocVmapArea,
            Payload::FreeVmapAreaNoflush { .. } => EventId::FreeVmapAreaNoflush,
            Payload::PurgeVmapAreaLazy { .. } => EventId::PurgeVmapAreaLazy,
            Payload::Kmap { .. } => EventId::Kmap,
            Payload::Kunmap { .. } => EventId::Kunmap,
            Payload::KmapLocal { .. } => EventId::KmapLocal,
            Payload::KunmapLocal { .. } => EventId::KunmapLocal,
            Payload::TlbFlush { .. } => EventId::TlbFlush,
        }
    }

    /// Fields in the order the kernel's TP_STRUCT declares them.
    pub fn fields(&self) -> Vec<(&'static str, Value)> {
        use Value::*;
        match self {
            Payload::Kmalloc { call_site, ptr, bytes_req, bytes_alloc, gfp_flags, node, accounted } => {
                return vec![
                    ("call_site", Str(call_site.to_string())),
                    ("ptr", UInt(*ptr)),
                    ("bytes_req", UInt(*bytes_req)),
                    ("bytes_alloc", UInt(*bytes_alloc)),
                    ("gfp_flags", UInt(*gfp_flags as u64)),
                    ("node", Int(*node as i64)),
                    ("accounted", Bool(*accounted)),
                ]
            }
            Payload::KmemCacheAlloc { call_site, ptr, name, bytes_req, bytes_alloc, gfp_flags, node, accounted } => {
                return vec![
                    ("call_site", Str(call_site.to_string())),
                    ("ptr", UInt(*ptr)),
                    ("name", Str(name.to_string())),
                    ("bytes_req", UInt(*bytes_req)),
                    ("bytes_alloc", UInt(*bytes_alloc)),
                    ("gfp_flags", UInt(*gfp_flags as u64)),
                    ("node", Int(*node as i64)),
                    ("accounted", Bool(*accounted)),
                ]
            }
            Payload::Kfree { call_site, ptr } => {
                return vec![("call_site", Str(call_site.to_string())), ("ptr", UInt(*ptr))]
            }
            Payload::KmemCacheFree { call_site, ptr, name } => {
                return vec![
                    ("call_site", Str(call_site.to_string())),
                    ("ptr", UInt(*ptr)),
                    ("name", Str(name.to_string())),
                ]
            }
            Payload::PercpuAllocPercpu {
                call_site,
                reserved,
                is_atomic,
                size,
                align,
                base_addr,
                off,
                ptr,
                bytes_alloc,
                gfp_flags,
            } => {
                return vec![
                    ("call_site", Str(call_site.to_string())),
                    ("reserved", Bool(*reserved)),
                    ("is_atomic", Bool(*is_atomic)),
                    ("size", UInt(*size)),
                    ("align", UInt(*align)),
                    ("base_addr", UInt(*base_addr)),
                    ("off", Int(*off)),
                    ("ptr", UInt(*ptr)),
                    ("bytes_alloc", UInt(*bytes_alloc)),
                    ("gfp_flags", UInt(*gfp_flags as u64)),
                ]
            }
            Payload::PercpuFreePercpu { base_addr, off, ptr } => {
                return vec![("base_addr", UInt(*base_addr)), ("off", Int(*off)), ("ptr", UInt(*ptr))]
            }
            _ => {}
        }
        match *self {
            Payload::MmPageAlloc { pfn, order, migratetype, gfp_flags } => vec![
                ("pfn", UInt(pfn.unwrap_or(0))),
                ("order", UInt(order as u64)),
                ("migratetype", Int(migratetype as i64)),
                ("gfp_flags", UInt(gfp_flags as u64)),
            ],
            Payload::MmPageFree { pfn, order } => {
                vec![("pfn", UInt(pfn)), ("order", UInt(order as u64))]
            }
            Payload::MmPageFreeBatched { pfn } => vec![("pfn", UInt(pfn))],
            Payload::MmPageAllocZoneLocked { pfn, order, migratetype, percpu_refill } => vec![
                ("pfn", UInt(pfn)),
                ("order", UInt(order as u64)),
                ("migratetype", Int(migratetype as i64)),
                ("percpu_refill", Bool(percpu_refill)),
            ],
            Payload::MmPagePcpuDrain { pfn, order, migratetype } => vec![
                ("pfn", UInt(pfn)),
                ("order", UInt(order as u64)),
                ("migratetype", Int(migratetype as i64)),
            ],
            Payload::MmPageAllocExtfrag {
                pfn,
                alloc_order,
                fallback_order,
                pageblock_order,
                alloc_migratetype,
                fallback_migratetype,
                fragmenting,
                change_ownership,
            } => vec![
                ("pfn", UInt(pfn)),
                ("alloc_order", Int(alloc_order as i64)),
                ("fallback_order", Int(fallback_order as i64)),
                ("pageblock_order", Int(pageblock_order as i64)),
                ("alloc_migratetype", Int(alloc_migratetype as i64)),
                ("fallback_migratetype", Int(fallback_migratetype as i64)),
                ("fragmenting", Bool(fragmenting)),
                ("change_ownership", Bool(change_ownership)),
            ],
            Payload::AllocVmapArea { addr, size, align, vstart, vend, failed } => vec![
                ("addr", UInt(addr)),
                ("size", UInt(size)),
                ("align", UInt(align)),
                ("vstart", UInt(vstart)),
                ("vend", UInt(vend)),
                ("failed", Int(failed as i64)),
            ],
            Payload::FreeVmapAreaNoflush { va_start, nr_lazy, nr_lazy_max } => vec![
                ("va_start", UInt(va_start)),
                ("nr_lazy", UInt(nr_lazy)),
                ("nr_lazy_max", UInt(nr_lazy_max)),
            ],
            Payload::PurgeVmapAreaLazy { start, end, npurged } => vec![
                ("start", UInt(start)),
                ("end", UInt(end)),
                ("npurged", UInt(npurged as u64)),
            ],
            Payload::Kmap { pfn, addr, nr, count } | Payload::Kunmap { pfn, addr, nr, count } => vec![
                ("pfn", UInt(pfn)),
                ("addr", UInt(addr)),
                ("nr", Int(nr as i64)),
                ("count", UInt(count as u64)),
            ],
            Payload::KmapLocal { pfn, addr, idx } => {
                vec![("pfn", UInt(pfn)), ("addr", UInt(addr)), ("idx", Int(idx as i64))]
            }
            Payload::KunmapLocal { addr, idx } => vec![("addr", UInt(addr)), ("idx", Int(idx as i64))],
            Payload::TlbFlush { start, end, pages, ipis } => vec![
                ("start", UInt(start)),
                ("end", UInt(end)),
                ("pages", Int(pages)),
                ("ipis", UInt(ipis as u64)),
            ],
            _ => unreachable!("handled above"),
        }
    }

    /// The `TP_printk` text (as `perf script` shows it).
    pub fn text(&self) -> String {
        let mut s = String::with_capacity(96);
        let ptr = |p: u64| if p == 0 { "(nil)".to_string() } else { format!("{p:#x}") };
        match self {
            Payload::Kmalloc { call_site, ptr: p, bytes_req, bytes_alloc, gfp_flags, node, accounted } => {
                let _ = write!(
                    s,
                    "call_site={call_site} ptr={} bytes_req={bytes_req} bytes_alloc={bytes_alloc} gfp_flags={} node={node} accounted={accounted}",
                    ptr(*p),
                    gfp::format(*gfp_flags)
                );
                return s;
            }
            Payload::KmemCacheAlloc { call_site, ptr: p, name, bytes_req, bytes_alloc, gfp_flags, node, accounted } => {
                let _ = write!(
                    s,
                    "call_site={call_site} ptr={} name={name} bytes_req={bytes_req} bytes_alloc={bytes_alloc} gfp_flags={} node={node} accounted={accounted}",
                    ptr(*p),
                    gfp::format(*gfp_flags)
                );
                return s;
            }
            Payload::Kfree { call_site, ptr: p } => {
                let _ = write!(s, "call_site={call_site} ptr={}", ptr(*p));
                return s;
            }
            Payload::KmemCacheFree { call_site, ptr: p, name } => {
                let _ = write!(s, "call_site={call_site} ptr={} name={name}", ptr(*p));
                return s;
            }
            Payload::PercpuAllocPercpu {
                call_site,
                reserved,
                is_atomic,
                size,
                align,
                base_addr,
                off,
                ptr: p,
                bytes_alloc,
                gfp_flags,
            } => {
                let _ = write!(
                    s,
                    "call_site={call_site} reserved={} is_atomic={} size={size} align={align} base_addr={} off={off} ptr={} bytes_alloc={bytes_alloc} gfp_flags={}",
                    u8::from(*reserved),
                    u8::from(*is_atomic),
                    ptr(*base_addr),
                    ptr(*p),
                    gfp::format(*gfp_flags)
                );
                return s;
            }
            Payload::PercpuFreePercpu { base_addr, off, ptr: p } => {
                let _ = write!(s, "base_addr={} off={off} ptr={}", ptr(*base_addr), ptr(*p));
                return s;
            }
            _ => {}
        }
        match *self {
            Payload::MmPageAlloc { pfn, order, migratetype, gfp_flags } => {
                let _ = match pfn {
                    Some(p) => write!(s, "page={p:#x} pfn={p:#x}"),
                    None => write!(s, "page=(nil) pfn=0x0"),
                };
                let _ = write!(
                    s,
                    " order={order} migratetype={migratetype} gfp_flags={}",
                    gfp::format(gfp_flags)
                );
            }
            Payload::MmPageFree { pfn, order } => {
                let _ = write!(s, "page={pfn:#x} pfn={pfn:#x} order={order}");
            }
            Payload::MmPageFreeBatched { pfn } => {
                let _ = write!(s, "page={pfn:#x} pfn={pfn:#x} order=0");
            }
            Payload::MmPageAllocZoneLocked { pfn, order, migratetype, percpu_refill } => {
                let _ = write!(
                    s,
                    "page={pfn:#x} pfn={pfn:#x} order={order} migratetype={migratetype} percpu_refill={}",
                    percpu_refill as u8
                );
            }
            Payload::MmPagePcpuDrain { pfn, order, migratetype } => {
                let _ = write!(s, "page={pfn:#x} pfn={pfn:#x} order={order} migratetype={migratetype}");
            }
            Payload::MmPageAllocExtfrag {
                pfn,
                alloc_order,
                fallback_order,
                pageblock_order,
                alloc_migratetype,
                fallback_migratetype,
                fragmenting,
                change_ownership,
            } => {
                let _ = write!(
                    s,
                    "page={pfn:#x} pfn={pfn:#x} alloc_order={alloc_order} fallback_order={fallback_order} pageblock_order={pageblock_order} alloc_migratetype={alloc_migratetype} fallback_migratetype={fallback_migratetype} fragmenting={} change_ownership={}",
                    fragmenting as u8, change_ownership as u8
                );
            }
            // include/trace/events/vmalloc.h: alloc_vmap_area prints va_start
            // with "%lu" after a colon, as the real trace shows.
            Payload::AllocVmapArea { addr, size, align, vstart, vend, failed } => {
                let _ = write!(
                    s,
                    "va_start: {addr} size={size} align={align} vstart={vstart:#x} vend={vend:#x} failed={}",
                    failed as u8
                );
            }
            Payload::FreeVmapAreaNoflush { va_start, nr_lazy, nr_lazy_max } => {
                let _ = write!(s, "va_start={va_start:#x} nr_lazy={nr_lazy} nr_lazy_max={nr_lazy_max}");
            }
            Payload::PurgeVmapAreaLazy { start, end, npurged } => {
                let _ = write!(s, "start={start:#x} end={end:#x} num_purged={npurged}");
            }
            Payload::Kmap { pfn, addr, nr, count } | Payload::Kunmap { pfn, addr, nr, count } => {
                let _ = write!(s, "pfn={pfn:#x} addr={addr:#x} nr={nr} count={count}");
            }
            Payload::KmapLocal { pfn, addr, idx } => {
                let _ = write!(s, "pfn={pfn:#x} addr={addr:#x} idx={idx}");
            }
            Payload::KunmapLocal { addr, idx } => {
                let _ = write!(s, "addr={addr:#x} idx={idx}");
            }
            Payload::TlbFlush { start, end, pages, ipis } => {
                let _ = write!(s, "start={start:#x} end={end:#x} pages={pages} ipis={ipis}");
            }
            _ => unreachable!("handled above"),
        }
        s
    }
}

/// One event as delivered to sinks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub cpu: u32,
    /// Nanoseconds since the machine booted.
    pub ts_ns: u64,
    pub payload: Payload,
}

impl Event {
    pub fn name(&self) -> &'static str {
        self.payload.id().name()
    }

    /// One `perf script` line: `comm pid [cpu] sec.usec: name: text`.
    pub fn perf_script_line(&self, comm: &str, pid: u32) -> String {
        format!(
            "{comm:>16} {pid:>5} [{:03}] {:>5}.{:06}: {:>30}: {}",
            self.cpu,
            self.ts_ns / 1_000_000_000,
            (self.ts_ns / 1000) % 1_000_000,
            self.name(),
            self.payload.text()
        )
    }
}

/// A receiver of events.
pub type Sink = Arc<dyn Fn(&Event) + Send + Sync>;

thread_local! {
    /// Nesting depth of `Tracing::defer` on this thread.
    static DEFER: Cell<u32> = const { Cell::new(0) };
    /// Events waiting for the deferral to end, with the sinks that take them.
    static PENDING: RefCell<Vec<(Vec<LiveSink>, Event)>> = const { RefCell::new(Vec::new()) };
    /// Sink lists this thread's cache let go of while it may have held
    /// allocator locks (an `emit` under a deferral): dropped where no lock
    /// is held (`release_stale`). Dropping a sink can run foreign code (a
    /// Python callback's `__del__`, which may call back into the machine).
    static STALE: RefCell<Vec<Arc<[Attached]>>> = const { RefCell::new(Vec::new()) };
}

/// Keep `old` until this thread is outside every allocator lock.
fn retire(old: Arc<[Attached]>) {
    let mut old = Some(old);
    let _ = STALE.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            s.extend(old.take());
        }
    });
    drop(old); // the thread is exiting (STALE destroyed): no lock is held
}

/// Drop the sink lists `retire` kept: at the end of a deferral and on an
/// `emit` outside any deferral (by convention, no allocator lock is held
/// at either; see `Tracing::defer`).
fn release_stale() {
    let v = STALE.try_with(|s| s.try_borrow_mut().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default());
    drop(v);
}

/// While alive, events emitted on this thread are queued (see `Tracing::defer`).
pub struct Deferral {
    active: bool,
}

impl Drop for Deferral {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        let depth = DEFER.with(|d| {
            d.set(d.get() - 1);
            d.get()
        });
        if depth == 0 {
            for (sinks, ev) in PENDING.with(|p| std::mem::take(&mut *p.borrow_mut())) {
                for (alive, s) in sinks {
                    if alive.load(Relaxed) {
                        s(&ev); // not to a sink detached since the event
                    }
                }
            }
            release_stale();
        }
    }
}

struct Attached {
    id: u64,
    mask: u64,
    sink: Sink,
    /// Cleared by `detach`: deferred events check it before delivery.
    alive: Arc<std::sync::atomic::AtomicBool>,
}

impl Attached {
    fn share(&self) -> Attached {
        Attached { id: self.id, mask: self.mask, sink: self.sink.clone(), alive: self.alive.clone() }
    }
}

/// A sink with its liveness flag, as deferred events hold it.
type LiveSink = (Arc<std::sync::atomic::AtomicBool>, Sink);

static NEXT_TRACING: AtomicU64 = AtomicU64::new(1);

/// (registry id, generation, the registry's sinks at that generation).
type CachedSinks = (u64, u64, Arc<[Attached]>);

thread_local! {
    /// Per registry: (registry id, generation, the sinks at that generation).
    /// `emit` takes the sinks from here while the generation is unchanged:
    /// no lock, no reference-count traffic shared between CPUs.
    static SINK_CACHE: RefCell<Vec<CachedSinks>> = const { RefCell::new(Vec::new()) };
}

/// The tracepoint registry of one machine.
pub struct Tracing {
    enabled: AtomicU64,
    /// The attached sinks; replaced (copy on write) by attach/detach.
    sinks: RwLock<Arc<[Attached]>>,
    /// Bumped by every attach/detach (after `sinks` is replaced).
    generation: AtomicU64,
    id: u64,
    next_id: AtomicU64,
    boot: quanta::Instant,
    /// The machine's simulated clock (ns) once started (`clock.rs`): events
    /// then carry it as their timestamp; 0 = the TSC since boot.
    pub(crate) sim_ns: AtomicU64,
}

/// The trace clock: the TSC, calibrated (`quanta`), as the kernel's
/// `local_clock` reads it; a few ns instead of clock_gettime's ~25.
static CLOCK: std::sync::LazyLock<quanta::Clock> = std::sync::LazyLock::new(quanta::Clock::new);

impl Default for Tracing {
    fn default() -> Self {
        Tracing {
            enabled: AtomicU64::new(0),
            sinks: RwLock::new(Arc::from(Vec::new())),
            generation: AtomicU64::new(0),
            id: NEXT_TRACING.fetch_add(1, Relaxed),
            next_id: AtomicU64::new(1),
            boot: CLOCK.now(),
            sim_ns: AtomicU64::new(0),
        }
    }
}

impl Tracing {
    /// Run `f` on the attached sinks, from this thread's cache while the
    /// generation is unchanged (no lock, no shared reference count). A
    /// nested call (a sink that emits) that misses reads the registry.
    #[inline]
    fn current_sinks<R>(&self, f: impl FnOnce(&[Attached]) -> R) -> R {
        let gen = self.generation.load(std::sync::atomic::Ordering::Acquire);
        SINK_CACHE.with(|c| {
            if let Ok(cache) = c.try_borrow() {
                if let Some(e) = cache.iter().find(|e| e.0 == self.id && e.1 == gen) {
                    return f(&e.2);
                }
            }
            let s = self.sinks.read().clone();
            if let Ok(mut cache) = c.try_borrow_mut() {
                // The replaced lists are retired, not dropped: this may run
                // under allocator locks.
                while let Some(i) = cache.iter().position(|e| e.0 == self.id) {
                    retire(cache.remove(i).2);
                }
                if cache.len() >= 16 {
                    retire(cache.remove(0).2); // registries this thread used long ago
                }
                cache.push((self.id, gen, s.clone()));
            }
            f(&s)
        })
    }

    /// Is this tracepoint on? One relaxed load.
    #[inline(always)]
    pub fn on(&self, id: EventId) -> bool {
        self.enabled.load(Relaxed) & id.bit() != 0
    }

    /// Is any of these tracepoints on?
    #[inline(always)]
    pub fn any(&self, mask: u64) -> bool {
        self.enabled.load(Relaxed) & mask != 0
    }

    pub fn now_ns(&self) -> u64 {
        match self.sim_ns.load(Relaxed) {
            0 => CLOCK.now().duration_since(self.boot).as_nanos() as u64,
            t => t,
        }
    }

    /// Deliver an event to every sink that asked for it (none runs under
    /// the registry lock: a sink may attach or detach).
    pub fn emit(&self, cpu: u32, payload: Payload) {
        let ev = Event { cpu, ts_ns: self.now_ns(), payload };
        let bit = ev.payload.id().bit();
        if DEFER.with(|d| d.get()) > 0 {
            let sinks: Vec<LiveSink> = self.current_sinks(|v| {
                v.iter().filter(|a| a.mask & bit != 0).map(|a| (a.alive.clone(), a.sink.clone())).collect()
            });
            PENDING.with(|p| p.borrow_mut().push((sinks, ev)));
            return;
        }
        release_stale();
        self.current_sinks(|v| {
            for a in v.iter().filter(|a| a.mask & bit != 0) {
                if a.alive.load(Relaxed) {
                    (a.sink)(&ev);
                }
            }
        });
    }

    /// `defer` even when no tracepoint is on at entry (a sink attached
    /// meanwhile by another thread must not run under the caller's locks):
    /// for long calls such as `advance_time` that hold a lock throughout.
    pub fn defer_always(&self) -> Deferral {
        DEFER.with(|d| d.set(d.get() + 1));
        Deferral { active: true }
    }

    /// Queue this thread's events until the returned guard drops: for calls
    /// that may emit while holding allocator locks. Costs one relaxed load
    /// when no tracepoint is on.
    #[inline]
    pub fn defer(&self) -> Deferral {
        if self.enabled.load(Relaxed) == 0 {
            return Deferral { active: false };
        }
        DEFER.with(|d| d.set(d.get() + 1));
        Deferral { active: true }
    }

    /// Attach a sink for the events in `mask`; returns a handle for `detach`.
    pub fn attach(&self, mask: u64, sink: Sink) -> u64 {
        let id = self.next_id.fetch_add(1, Relaxed);
        let mut v = self.sinks.write();
        let mut all: Vec<Attached> = v.iter().map(Attached::share).collect();
        all.push(Attached { id, mask, sink, alive: Arc::new(std::sync::atomic::AtomicBool::new(true)) });
        self.enabled.store(all.iter().fold(0, |m, a| m | a.mask), Relaxed);
        let old = std::mem::replace(&mut *v, Arc::from(all));
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
        drop(v);
        drop(old); // outside the lock: dropping a sink may run code that attaches
        id
    }

    /// Detach a sink; false if the handle was not attached.
    pub fn detach(&self, handle: u64) -> bool {
        let mut v = self.sinks.write();
        let before = v.len();
        for a in v.iter().filter(|a| a.id == handle) {
            a.alive.store(false, Relaxed);
        }
        let all: Vec<Attached> = v.iter().filter(|a| a.id != handle).map(Attached::share).collect();
        let changed = all.len() != before;
        self.enabled.store(all.iter().fold(0, |m, a| m | a.mask), Relaxed);
        let old = std::mem::replace(&mut *v, Arc::from(all));
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
        drop(v);
        drop(old); // outside the lock: dropping a sink may run code that attaches
        self.forget_cached_sinks();
        release_stale();
        changed
    }

    /// Drop this thread's cached snapshot of this registry, so that a
    /// detached sink (and what it holds, e.g. the machine) is not kept
    /// alive by the cache. Other threads' caches refresh on their next emit.
    fn forget_cached_sinks(&self) {
        // Taken out first, dropped after the borrow ends (a dropped sink
        // may emit, and emit reads this cache).
        let gone: Vec<CachedSinks> = SINK_CACHE.with(|c| match c.try_borrow_mut() {
            Ok(mut c) => {
                let (gone, keep) = std::mem::take(&mut *c).into_iter().partition(|e| e.0 == self.id);
                *c = keep;
                gone
            }
            Err(_) => Vec::new(),
        });
        drop(gone);
    }
}

/// Events per chunk of a recording buffer (allocated whole, never moved).
const REC_CHUNK: usize = 4096;

#[repr(align(64))]
#[derive(Default)]
struct CpuBuf {
    chunks: spin::Mutex<Chunks>,
    len: AtomicU64,
    lost: AtomicU64,
}

/// A CPU's recorded events in fixed-size chunks, and emptied chunks kept
/// for reuse (so a recording that is taken and refilled touches no new
/// memory, like the kernel's preallocated ring buffer pages).
#[derive(Default)]
struct Chunks {
    full: Vec<Vec<Event>>,
    spare: Vec<Vec<Event>>,
}

/// A recording (what `trace.record()` uses): one buffer per CPU, like the
/// kernel's per-CPU ring buffers, so CPUs record without sharing a lock or
/// a cache line. Each buffer holds up to `capacity` events; beyond that
/// new events are dropped and counted as lost (perf's behaviour).
/// `take` merges the buffers in timestamp order.
pub struct Recorder {
    cpus: Box<[CpuBuf]>,
    capacity: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new(1)
    }
}

impl Recorder {
    /// Default events per CPU buffer.
    pub const DEFAULT_CAPACITY: u64 = 1 << 22;

    pub fn new(cpus: u32) -> Recorder {
        Recorder::with_capacity(cpus, Self::DEFAULT_CAPACITY)
    }

    pub fn with_capacity(cpus: u32, capacity: u64) -> Recorder {
        Recorder { cpus: (0..cpus.max(1)).map(|_| CpuBuf::default()).collect(), capacity }
    }

    fn push(&self, e: &Event) {
        let b = &self.cpus[e.cpu as usize % self.cpus.len()];
        if b.len.load(Relaxed) >= self.capacity {
            b.lost.fetch_add(1, Relaxed);
            return;
        }
        let mut c = b.chunks.lock();
        if b.len.load(Relaxed) >= self.capacity {
            b.lost.fetch_add(1, Relaxed); // another thread filled it meanwhile
            return;
        }
        match c.full.last_mut() {
            Some(last) if last.len() < REC_CHUNK => last.push(e.clone()),
            _ => {
                let mut v = c.spare.pop().unwrap_or_else(|| Vec::with_capacity(REC_CHUNK));
                v.push(e.clone());
                c.full.push(v);
            }
        }
        b.len.store(b.len.load(Relaxed) + 1, Relaxed);
    }

    pub fn sink(self: &Arc<Self>) -> Sink {
        let me = self.clone();
        Arc::new(move |e: &Event| me.push(e))
    }

    /// Events recorded and not yet taken.
    pub fn len(&self) -> usize {
        self.cpus.iter().map(|b| b.len.load(Relaxed) as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events dropped because a CPU's buffer was full.
    pub fn lost(&self) -> u64 {
        self.cpus.iter().map(|b| b.lost.load(Relaxed)).sum()
    }

    /// Drop every recorded event.
    pub fn clear(&self) {
        for b in self.cpus.iter() {
            let mut g = b.chunks.lock();
            b.len.store(0, Relaxed);
            let full = std::mem::take(&mut g.full);
            for mut v in full {
                v.clear();
                g.spare.push(v);
            }
        }
    }

    /// Take every recorded event, merged by timestamp (ties by CPU).
    pub fn take(&self) -> Vec<Event> {
        let mut all = Vec::with_capacity(self.len());
        for b in self.cpus.iter() {
            let full = {
                let mut g = b.chunks.lock();
                b.len.store(0, Relaxed);
                std::mem::take(&mut g.full)
            };
            let mut spare = Vec::with_capacity(full.len());
            for mut c in full {
                all.append(&mut c);
                spare.push(c);
            }
            b.chunks.lock().spare.extend(spare);
        }
        // Each CPU's events are in order; a stable sort keeps them so.
        all.sort_by_key(|e| (e.ts_ns, e.cpu));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert_eq!(mask_for("kmem:mm_page_alloc"), EventId::MmPageAlloc.bit());
        assert_eq!(mask_for("mm_page_alloc"), EventId::MmPageAlloc.bit());
        let m = mask_for("kmem:*");
        assert!(m & EventId::Kmalloc.bit() != 0 && m & EventId::PercpuAllocPercpu.bit() == 0);
        assert_eq!(mask_for("*").count_ones() as usize, EventId::ALL.len());
        assert_eq!(mask_for("nothing"), 0);
        assert_eq!(
            mask_for("kmem:mm_page_alloc,kmem:mm_page_free"),
            EventId::MmPageAlloc.bit() | EventId::MmPageFree.bit()
        );
    }

    #[test]
    fn text_matches_perf_script() {
        // From sample.perf.txt: "page=0x1057ab pfn=0x1057ab order=0 migratetype=0 gfp_flags=GFP_HIGHUSER|__GFP_ACCOUNT"
        let p = Payload::MmPageAlloc {
            pfn: Some(0x1057ab),
            order: 0,
            migratetype: 0,
            gfp_flags: gfp::GFP_HIGHUSER | gfp::__GFP_ACCOUNT,
        };
        assert_eq!(
            p.text(),
            "page=0x1057ab pfn=0x1057ab order=0 migratetype=0 gfp_flags=GFP_HIGHUSER|__GFP_ACCOUNT"
        );
        assert_eq!(
            Payload::MmPageFree { pfn: 0x112fae, order: 0 }.text(),
            "page=0x112fae pfn=0x112fae order=0"
        );
    }

    #[test]
    fn slab_events_match_perf_script() {
        // Lines of sample.perf.txt (Linux 6.18).
        let k = Payload::Kmalloc {
            call_site: "sched_setaffinity+0x10c".into(),
            ptr: 0xffff88810442cb20,
            bytes_req: 32,
            bytes_alloc: 32,
            gfp_flags: gfp::GFP_KERNEL,
            node: -1,
            accounted: false,
        };
        assert_eq!(k.text(), "call_site=sched_setaffinity+0x10c ptr=0xffff88810442cb20 bytes_req=32 bytes_alloc=32 gfp_flags=GFP_KERNEL node=-1 accounted=false");
        let a = Payload::KmemCacheAlloc {
            call_site: "alloc_empty_file+0x3c".into(),
            ptr: 0xffff88811854bd80,
            name: "filp".into(),
            bytes_req: 184,
            bytes_alloc: 192,
            gfp_flags: gfp::GFP_KERNEL,
            node: -1,
            accounted: true,
        };
        assert_eq!(a.text(), "call_site=alloc_empty_file+0x3c ptr=0xffff88811854bd80 name=filp bytes_req=184 bytes_alloc=192 gfp_flags=GFP_KERNEL node=-1 accounted=true");
        let f = Payload::KmemCacheFree { call_site: "__fput+0x141".into(), ptr: 0xffff888101beb468, name: "lsm_file_cache".into() };
        assert_eq!(f.text(), "call_site=__fput+0x141 ptr=0xffff888101beb468 name=lsm_file_cache");
        let kf = Payload::Kfree { call_site: "single_release+0x17".into(), ptr: 0xffff888104311000 };
        assert_eq!(kf.text(), "call_site=single_release+0x17 ptr=0xffff888104311000");
    }

    #[test]
    fn percpu_events_match_perf_script() {
        // sample.perf.txt: "call_site=mm_init+0x2bf reserved=0 is_atomic=0 size=16 align=8
        // base_addr=0xffffe8ffffc00000 off=96880 ptr=0x60795bb10a70 bytes_alloc=64 gfp_flags=GFP_KERNEL"
        let a = Payload::PercpuAllocPercpu {
            call_site: "mm_init+0x2bf".into(),
            reserved: false,
            is_atomic: false,
            size: 16,
            align: 8,
            base_addr: 0xffffe8ffffc00000,
            off: 96880,
            ptr: 0x60795bb10a70,
            bytes_alloc: 64,
            gfp_flags: gfp::GFP_KERNEL,
        };
        assert_eq!(a.text(), "call_site=mm_init+0x2bf reserved=0 is_atomic=0 size=16 align=8 base_addr=0xffffe8ffffc00000 off=96880 ptr=0x60795bb10a70 bytes_alloc=64 gfp_flags=GFP_KERNEL");
        let f = Payload::PercpuFreePercpu { base_addr: 0xffffe8ffffc00000, off: 60976, ptr: 0x60795bb07e30 };
        assert_eq!(f.text(), "base_addr=0xffffe8ffffc00000 off=60976 ptr=0x60795bb07e30");
    }

    #[test]
    fn deferred_events_arrive_in_order_when_the_deferral_ends() {
        let t = Tracing::default();
        let r = Arc::new(Recorder::default());
        t.attach(EventId::MmPageFree.bit(), r.sink());
        {
            let _outer = t.defer();
            t.emit(0, Payload::MmPageFree { pfn: 1, order: 0 });
            {
                let _inner = t.defer();
                t.emit(0, Payload::MmPageFree { pfn: 2, order: 0 });
            }
            assert!(r.take().is_empty(), "held until the outermost deferral ends");
        }
        let pfns: Vec<_> = r
            .take()
            .into_iter()
            .map(|e| match e.payload {
                Payload::MmPageFree { pfn, .. } => pfn,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(pfns, vec![1, 2]);
    }

    #[test]
    fn enabled_mask_follows_sinks() {
        let t = Tracing::default();
        assert!(!t.on(EventId::MmPageAlloc));
        let r = Arc::new(Recorder::default());
        let h = t.attach(EventId::MmPageAlloc.bit(), r.sink());
        assert!(t.on(EventId::MmPageAlloc) && !t.on(EventId::MmPageFree));
        t.emit(0, Payload::MmPageFree { pfn: 1, order: 0 });
        t.emit(1, Payload::MmPageAlloc { pfn: Some(1), order: 0, migratetype: 0, gfp_flags: 0 });
        let ev = r.take();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].cpu, 1);
        assert!(t.detach(h));
        assert!(!t.on(EventId::MmPageAlloc));
        assert!(!t.detach(h));
    }
}
