//! A machine shaped like the recorded one, and the warm-start plan of a
//! trace: what `kmm replay DIR` and `Recording.machine()` build before the
//! first event.
//!
//! From a bundle (`bundle.rs`): the zones of start.zoneinfo (spanned,
//! present, managed; present minus managed is reserved), its CPUs, its
//! watermarks, `protection` and pageset sizes, pagetypeinfo's online
//! pageblocks, and the caches of start.slabinfo with their geometry. Without
//! a bundle: RAM up to the highest pfn the trace names and the CPUs it ran
//! on (`notes` say which).
//!
//! The warm plan (`warm.rs` builds it) reads the trace once, in order, for
//! what it shows of the start state:
//! - a page block freed before any traced allocation covers it was
//!   allocated at start (at that pfn, that order), unless slab objects live
//!   in it (then it is a slab the kernel discarded);
//! - a slab object whose page no traced allocation covers lived in a slab
//!   that existed at start: its cache (named by the event, by kmalloc's size
//!   class, or, for kfree, by another object of the same slab) gives the
//!   slab's order and the object's index; the object was live at start if
//!   its first event frees it, free if its first event allocates it;
//! - an order-0 page the trace allocates on a CPU before any traced free or
//!   buddy refill names it was on that CPU's pcp list at start.
//!
//! # Kernel
//! `arch/x86/mm/init.c` (`zone_sizes_init`), `mm/mm_init.c` (zone spans,
//! present and managed pages), `mm/slub.c` (`allocate_slab`: a slab is a
//! naturally aligned block of `oo_order(s->oo)`; objects at `slab_address +
//! i * s->size`), `mm/slab_common.c` (`kmalloc_slab`), `mm/vmstat.c`.
//!
//! SIMPLIFICATION: a named cache that start.slabinfo lists is created with
//! the traced object size (or its slot size) and the first flags whose slot
//! size matches the recorded one; its slab order is then set as recorded,
//! as a write to /sys/kernel/slab/NAME/order would. Caches the recorded
//! kernel created with SLAB_RECLAIM_ACCOUNT are recognised by the
//! migratetype of their traced slab pages, else by name (the reclaimable
//! caches of Linux 6.18, `RECLAIMABLE_CACHES`).
//!
//! SIMPLIFICATION: recorded zones that span more than 1 TiB
//! (`MAX_RECORDED_PAGES`) are not used: the warm start costs host memory in
//! proportion to the recorded free blocks, so such a recording is replayed
//! cold on a machine sized from the trace.
//!
//! # Invariants
//! - shape-1: a shaped machine has every zone start.zoneinfo lists with its
//!   spanned/present/managed counts.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::bundle::Bundle;
use super::perf_script::{Kind, TraceLog, F_FAILED, NONE};
use crate::arch::{ZoneKind, MAX_PAGE_ORDER, NR_PAGE_ORDERS};
use crate::buddy::{MIGRATETYPE_NAMES, MIGRATE_RECLAIMABLE, MIGRATE_TYPES};
use crate::error::{KmmError, Result};
use crate::machine::{MachineConfig, ZoneLayout, ZoneTuning};
use crate::slab::cache::KmemCache;
use crate::slab::geometry::{calculate_alignment, calculate_sizes, SLAB_HWCACHE_ALIGN, SLAB_NO_MERGE, SLAB_RECLAIM_ACCOUNT};
use crate::slab::CacheArgs;
use crate::warm::{WarmCache, WarmPlan, WarmSlab, WarmZone};
use crate::Machine;

/// Caches Linux 6.18 creates with SLAB_RECLAIM_ACCOUNT (their slabs are
/// reclaimable pages): the `reclaim_account` ones of the reference
/// machine's /sys/kernel/slab (tests/data/linux/sys_kernel_slab.tsv).
pub const RECLAIMABLE_CACHES: &[&str] = &[
    "bdev_cache", "bio_post_read_ctx", "btrfs_inode", "btrfs_trans_handle", "buffer_head", "dax_cache",
    "debugfs_inode_cache", "dentry", "dquot", "erofs_inode", "ext4_allocation_context", "ext4_fc_dentry_update",
    "ext4_free_data", "ext4_groupinfo_4k", "ext4_inode_cache", "ext4_io_end", "ext4_prealloc_space",
    "extent_status", "fscrypt_inode_info", "fuse_inode", "inode_cache", "jbd2_journal_handle",
    "jbd2_journal_head", "jbd2_revoke_record_s", "jbd2_revoke_table_s", "jbd2_transaction_s", "mb_cache_entry",
    "ovl_inode", "pending_reservation", "pidfs_attr_cache", "pidfs_xattr_cache", "proc_inode_cache",
    "radix_tree_node", "sock_inode_cache", "squashfs_inode_cache", "tracefs_inode_cache", "xfs_buf", "xfs_ili",
    "xfs_inode",
];

/// The most CPUs a machine built for a trace gets (`Machine::new`'s limit).
pub const MAX_CPUS: u32 = 1024;

/// The most page frames a recorded layout may span (1 TiB of 4 KiB pages).
/// The warm start reads every frame of the span and adds each recorded free
/// block to the free lists one by one, writing its head's struct page: about
/// one host page per free max-order block, 1.6 GiB of host memory and ~7 s
/// for a recording of a mostly idle 1 TiB machine (benches/README.md, "Big
/// recordings"). SIMPLIFICATION: beyond that, a recording is replayed cold
/// (sized from the trace); the boot's lazy free range (buddy.rs) is not used
/// for recorded free blocks.
pub const MAX_RECORDED_PAGES: u64 = 256 << 20;

/// A machine configuration shaped for a trace, and how it was shaped.
#[derive(Clone, Debug)]
pub struct Shape {
    pub cfg: MachineConfig,
    /// How the machine was sized, one sentence each (for the report).
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
}

/// The kernel's zone kind of a zoneinfo name.
pub fn zone_kind(name: &str) -> Option<ZoneKind> {
    Some(match name {
        "DMA" => ZoneKind::Dma,
        "DMA32" => ZoneKind::Dma32,
        "Normal" => ZoneKind::Normal,
        "HighMem" => ZoneKind::HighMem,
        "Movable" => ZoneKind::Movable,
        "Device" => ZoneKind::Device,
        _ => return None,
    })
}

/// CPUs the trace ran on (highest CPU number + 1; 1 for an empty trace).
pub fn cpus_seen(log: &TraceLog) -> u32 {
    log.events.iter().map(|e| e.cpu).max().map_or(1, |c| c.saturating_add(1))
}

fn is_page_event(k: Kind) -> bool {
    matches!(k, Kind::MmPageAlloc | Kind::MmPageFree | Kind::MmPageFreeBatched | Kind::MmPageAllocZoneLocked | Kind::MmPagePcpuDrain)
}

fn is_slab_event(k: Kind) -> bool {
    matches!(
        k,
        Kind::Kmalloc | Kind::KmallocNode | Kind::KmemCacheAlloc | Kind::KmemCacheAllocNode | Kind::Kfree | Kind::KmemCacheFree
    )
}

/// Highest pfn the trace names: page events, and slab objects in the
/// direct map (`page_offset` + 64 TiB).
pub fn max_pfn_seen(log: &TraceLog, page_offset: u64, page_shift: u32) -> Option<u64> {
    let mut max = None::<u64>;
    for e in &log.events {
        let pfn = if is_page_event(e.kind) {
            if e.kind == Kind::MmPageAlloc && e.flags & F_FAILED != 0 {
                continue;
            }
            e.ptr.saturating_add((1u64 << (e.order as u32).min(MAX_PAGE_ORDER)) - 1)
        } else if is_slab_event(e.kind) && e.ptr >= page_offset && e.ptr - page_offset < (64 << 40) {
            (e.ptr - page_offset) >> page_shift
        } else {
            continue;
        };
        max = Some(max.map_or(pfn, |m| m.max(pfn)));
    }
    max
}

/// Traced page-event pfns per recorded zone span: (min, max).
fn traced_pfn_range(log: &TraceLog, lo: u64, hi: u64) -> Option<(u64, u64)> {
    let mut r: Option<(u64, u64)> = None;
    for e in &log.events {
        if !is_page_event(e.kind) || (e.kind == Kind::MmPageAlloc && e.flags & F_FAILED != 0) {
            continue;
        }
        if e.ptr >= lo && e.ptr < hi {
            let end = e.ptr.saturating_add((1u64 << (e.order as u32).min(MAX_PAGE_ORDER)) - 1);
            r = Some(r.map_or((e.ptr, end), |(a, b)| (a.min(e.ptr), b.max(end))));
        }
    }
    r
}

/// Shape a machine configuration for `log`: from the bundle's start
/// snapshot when it has a zoneinfo, else from the trace. `base` carries the
/// caller's overrides; `cpus_given`/`memory_given` say which it set.
pub fn shape_config(
    base: MachineConfig,
    bundle: Option<&Bundle>,
    log: &TraceLog,
    page_offset: u64,
    cpus_given: bool,
    memory_given: bool,
) -> Result<Shape> {
    let mut cfg = base;
    let mut notes = Vec::new();
    let mut warnings = Vec::new();
    let page_shift = cfg.page_size.trailing_zeros();
    // The CPUs the trace ran on, as many as kmm models (events of higher
    // CPUs run on cpu % cpus, and the report counts them).
    let traced_cpus = cpus_seen(log).min(MAX_CPUS);
    if cpus_seen(log) > MAX_CPUS {
        notes.push(format!("the trace names CPU {}; kmm models {MAX_CPUS} CPUs at most", cpus_seen(log) - 1));
    }
    let zi = bundle.and_then(|b| b.start.zoneinfo.as_ref().or(b.end.zoneinfo.as_ref()));
    let from_start = bundle.is_some_and(|b| b.start.zoneinfo.is_some());
    match zi {
        Some(zi) if !memory_given && cfg.arch == crate::Arch::X86_64 && cfg.page_size == 4096 => {
            let which = if from_start { "start.zoneinfo" } else { "end.zoneinfo (no start.zoneinfo)" };
            let pti = bundle.and_then(|b| b.start.pagetypeinfo.as_ref());
            let pb = 1u64 << cfg.arch.pageblock_order(page_shift);
            let align = 1u64 << MAX_PAGE_ORDER;
            let mut layout = Vec::new();
            let mut tuning: Vec<Option<ZoneTuning>> = vec![None; cfg.arch.zone_kinds().len()];
            let mut rec_cpus = 0u32;
            for z in zi.zones.iter().filter(|z| z.node == 0) {
                let Some(kind) = zone_kind(&z.name) else {
                    warnings.push(format!("{which}: zone {} is not one kmm models; left out", z.name));
                    continue;
                };
                let Some(idx) = cfg.arch.zone_kinds().iter().position(|&k| k == kind) else {
                    warnings.push(format!("{which}: zone {} does not exist on x86_64; left out", z.name));
                    continue;
                };
                rec_cpus = rec_cpus.max(z.pagesets.iter().map(|p| p.cpu.saturating_add(1)).max().unwrap_or(0));
                // What a zoneinfo can say: managed <= present <= spanned.
                let spanned = z.spanned;
                let present = z.present.min(spanned);
                let managed = z.managed.min(present);
                if spanned == 0 || managed == 0 {
                    continue;
                }
                let Some(start) = z.start_pfn else {
                    warnings.push(format!("{which}: zone {} has no start_pfn; left out", z.name));
                    continue;
                };
                let end = start.saturating_add(spanned);
                // The managed pages as one run: over the pfns the trace uses,
                // else ending at the zone's last MAX_ORDER boundary.
                let top = (end / align * align).max(start.saturating_add(managed)).min(end);
                let ms = match traced_pfn_range(log, start, end) {
                    Some((lo, hi)) => {
                        let ms = (lo / align * align).clamp(start, top - managed.min(top - start));
                        if hi >= ms.saturating_add(managed) {
                            warnings.push(format!(
                                "{which}: zone {} manages {} pages but the trace uses pfns {lo:#x}..{hi:#x}; some traced pages fall outside them",
                                z.name, z.managed
                            ));
                        }
                        ms
                    }
                    None => top.saturating_sub(managed).max(start),
                };
                let online = pti.and_then(|p| {
                    p.blocks
                        .iter()
                        .find(|b| b.node == 0 && b.zone == z.name)
                        .map(|b| b.counts.iter().fold(0u64, |a, &c| a.saturating_add(c)))
                });
                layout.push(ZoneLayout {
                    kind,
                    start_pfn: start,
                    spanned,
                    present,
                    managed,
                    managed_start: Some(ms),
                    online_pageblocks: online.filter(|&n| n.saturating_mul(pb) >= managed && n.saturating_mul(pb) <= spanned),
                });
                // The kernel keeps pageset sizes in ints, and no zone's lists
                // can hold more than it manages.
                let cap = managed.min(i32::MAX as u64);
                let ps0 = z.pagesets.first();
                let clamp = |v: u64| v.min(cap);
                tuning[idx] = Some(ZoneTuning {
                    watermarks: Some([z.min, z.low, z.high, z.promo.unwrap_or(z.high)].map(|w| w.min(managed))),
                    lowmem_reserve: z.protection.iter().map(|&p| p.min(i64::MAX as u64)).collect(),
                    batch: clamp(ps0.map_or(1, |p| p.batch)).max(1),
                    high_min: clamp(ps0.map_or(0, |p| p.high_min.unwrap_or(p.high))),
                    high_max: clamp(ps0.map_or(0, |p| p.high_max.unwrap_or(p.high))),
                });
            }
            if layout.is_empty() {
                return Err(KmmError::InvalidArgument(format!("{which}: no populated zone to shape the machine from")));
            }
            let end = layout.iter().map(|l| l.start_pfn.saturating_add(l.spanned)).max().unwrap_or(0);
            if end > MAX_RECORDED_PAGES {
                return Err(KmmError::InvalidArgument(format!(
                    "{which}: its zones span {} GiB of physical addresses; kmm shapes machines of up to {} GiB",
                    (end << page_shift) >> 30,
                    (MAX_RECORDED_PAGES << 12) >> 30
                )));
            }
            if cfg.min_free_kbytes.is_some() || cfg.watermark_scale_factor != MachineConfig::default().watermark_scale_factor {
                // The caller's sysctls decide the watermarks; keep the pageset sizes.
                notes.push("watermarks from kmm's formulas (min_free_kbytes or watermark_scale_factor was set)".into());
                for t in tuning.iter_mut().flatten() {
                    t.watermarks = None;
                }
            }
            if !cpus_given {
                cfg.cpus = rec_cpus.max(traced_cpus).clamp(1, MAX_CPUS);
            }
            let desc: Vec<String> = layout
                .iter()
                .map(|l| format!("{} {} pages managed of {} present", l.kind.name(), l.managed, l.present))
                .collect();
            notes.push(format!("shaped like the recording: zones from {which} ({}), {} CPUs", desc.join(", "), cfg.cpus));
            cfg.layout = Some(layout);
            cfg.tuning = Some(tuning);
        }
        _ => {
            if zi.is_some() && memory_given {
                notes.push("--memory given: the recording's zones are not used".into());
            }
            if !memory_given {
                let gib = 1u64 << 30;
                let need = match max_pfn_seen(log, page_offset, page_shift) {
                    Some(p) => {
                        let bytes = (p + 1) << page_shift;
                        let mem = bytes.div_ceil(gib / 4) * (gib / 4);
                        let cap = cfg.arch.max_phys().min(MAX_RECORDED_PAGES * cfg.page_size as u64);
                        let mem = mem.max(gib).min(cap);
                        notes.push(format!(
                            "sized from the trace: highest pfn {p:#x} ({:.2} GiB) -> {} MiB of RAM{}",
                            bytes as f64 / gib as f64,
                            mem >> 20,
                            if mem < bytes { " (kmm's limit for a machine sized from a trace)" } else { "" }
                        ));
                        mem
                    }
                    None => {
                        notes.push("sized from the trace: it names no pfn; 1 GiB of RAM".into());
                        gib
                    }
                };
                cfg.memory = need;
            }
            if !cpus_given {
                cfg.cpus = traced_cpus;
                notes.push(format!("{} CPUs, as many as the trace ran on", cfg.cpus));
            }
        }
    }
    Ok(Shape { cfg, notes, warnings })
}

/// Find or create the cache a recorded kernel had under `name`: object
/// size `object_size`, slot size `slot` (None: any), slab order `order`
/// (None: SLUB's). Tries no flags, SLAB_HWCACHE_ALIGN, a constructor, both,
/// then explicit alignments, for the first whose slot size matches.
/// Returns the cache and how it was made.
pub fn create_cache_like(
    m: &Machine,
    name: &str,
    object_size: u64,
    slot: Option<u64>,
    order: Option<u32>,
    reclaimable: bool,
) -> Result<(Arc<KmemCache>, String)> {
    let size = u32::try_from(object_size.max(1))
        .map_err(|_| KmmError::InvalidArgument(format!("{name}: object size {object_size}")))?;
    let t = &m.slab.tunables;
    let ctor: crate::slab::cache::Ctor = Arc::new(|_| {});
    let mut tries: Vec<(u32, u32, bool, String)> = vec![
        (0, 0, false, "no flags".into()),
        (SLAB_HWCACHE_ALIGN, 0, false, "SLAB_HWCACHE_ALIGN".into()),
        (0, 0, true, "constructor".into()),
        (SLAB_HWCACHE_ALIGN, 0, true, "SLAB_HWCACHE_ALIGN, constructor".into()),
    ];
    for sh in 3..=12 {
        tries.push((0, 1 << sh, false, format!("align {}", 1 << sh)));
    }
    let base = if reclaimable { SLAB_RECLAIM_ACCOUNT } else { 0 };
    let mut pick = None;
    for (flags, align, has_ctor, how) in &tries {
        let a = calculate_alignment(base | *flags, *align, size, t.word);
        if let Ok(g) = calculate_sizes(size, a, base | *flags, *has_ctor, None, t) {
            if slot.is_none_or(|s| g.size as u64 == s) {
                pick = Some((*flags, *align, *has_ctor, how.clone()));
                break;
            }
        }
    }
    let (flags, align, has_ctor, mut how) = pick.unwrap_or((0, 0, false, "no flags (no geometry matched)".into()));
    if reclaimable {
        how.push_str(", SLAB_RECLAIM_ACCOUNT");
    }
    let mut args = CacheArgs {
        align,
        flags: base | flags | SLAB_NO_MERGE,
        ctor: has_ctor.then_some(ctor),
        freeptr_offset: None,
        order: None,
    };
    // The recorded order, if SLUB would pick another -- unless this
    // machine's command line changes how SLUB picks orders (a what-if
    // replay with slub_min_order=, slub_max_order= or slub_min_objects=):
    // then the recorded order moves as those bound calculate_order
    // (slub_min_objects: SLUB's own pick under the new value).
    let p = &m.cfg.cmdline;
    let order = if p.slub_min_objects.is_some() {
        None
    } else {
        order.map(|o| {
            let o = p.slub_min_order.map_or(o, |lo| o.max(lo));
            p.slub_max_order.map_or(o, |hi| o.min(hi.max(p.slub_min_order.unwrap_or(0))))
        })
    };
    if let Some(o) = order {
        let a = calculate_alignment(args.flags, align, size, t.word);
        if let Ok(g) = calculate_sizes(size, a, args.flags, has_ctor, None, t) {
            if g.order != o {
                args.order = Some(o);
                how.push_str(&format!(", order {o} as recorded"));
            }
        }
    }
    let c = match m.kmem_cache_create(name, size, args.clone()) {
        Ok(c) => c.cache,
        Err(_) if args.order.is_some() => {
            args.order = None;
            m.kmem_cache_create(name, size, args)?.cache
        }
        Err(e) => return Err(e),
    };
    Ok((c, how))
}

/// What the warm start needs from a trace and bundle, and what the replay
/// then maps (see the module header).
#[derive(Default)]
pub struct WarmInputs {
    pub plan: WarmPlan,
    /// Caches made for start.slabinfo: (name, object_size, size, how).
    pub caches_created: Vec<(String, u32, u32, String)>,
    pub warnings: Vec<String>,
}

/// A pre-trace slab seen in the trace.
struct PreSlab {
    cache: Arc<KmemCache>,
    /// Object index -> live at start (its first event frees it).
    objs: HashMap<u32, bool>,
}

/// Build the warm plan of `log` on `m` from the bundle's start snapshot:
/// creates the caches start.slabinfo lists (if missing) on `m`.
pub fn warm_inputs(m: &Machine, bundle: &Bundle, log: &TraceLog, page_offset: u64) -> WarmInputs {
    let mut out = WarmInputs::default();
    let shift = m.page_shift;
    let start = &bundle.start;

    // --- caches of start.slabinfo -------------------------------------------
    // Traced object sizes and reclaimable slab pages per cache name.
    let mut traced_size: HashMap<&str, u64> = HashMap::new();
    for e in &log.events {
        if matches!(e.kind, Kind::KmemCacheAlloc | Kind::KmemCacheAllocNode) && e.cache != NONE && e.ptr != 0 {
            traced_size.entry(log.strings.get(e.cache)).or_insert(e.bytes_req);
        }
    }
    let reclaimable_pages = reclaimable_slab_caches(m, log, page_offset);
    let mut caches: Vec<(Arc<KmemCache>, &super::procfs::SlabInfoRow)> = Vec::new();
    if let Some(rows) = &start.slabinfo {
        for row in rows {
            let c = match m.slab.find(&row.name) {
                Some(c) => c,
                None if row.num_objs == 0 && !traced_size.contains_key(row.name.as_str()) => continue,
                None => {
                    let order = row.pagesperslab.checked_ilog2().filter(|&o| 1u64 << o == row.pagesperslab);
                    let objsize = traced_size.get(row.name.as_str()).copied().unwrap_or(row.objsize);
                    let reclaim = RECLAIMABLE_CACHES.contains(&row.name.as_str()) || reclaimable_pages.contains(row.name.as_str());
                    match create_cache_like(m, &row.name, objsize, Some(row.objsize), order, reclaim) {
                        Ok((c, how)) => {
                            out.caches_created.push((row.name.clone(), c.object_size(), c.geo.size, how));
                            c
                        }
                        Err(e) => {
                            out.warnings.push(format!("start.slabinfo: {}: {}; no warm slabs for it", row.name, e.message()));
                            continue;
                        }
                    }
                }
            };
            if c.geo.size as u64 != row.objsize || c.geo.objects as u64 != row.objperslab || (1u64 << c.geo.order) != row.pagesperslab {
                out.warnings.push(format!(
                    "start.slabinfo: {}: recorded {} objects of {} bytes in {} pages a slab, kmm's cache has {} of {} in {}",
                    row.name,
                    row.objperslab,
                    row.objsize,
                    row.pagesperslab,
                    c.geo.objects,
                    c.geo.size,
                    1u64 << c.geo.order
                ));
            }
            caches.push((c, row));
        }
    }

    // --- one pass over the trace --------------------------------------------
    // Traced blocks allocated and live: head -> order.
    let mut live: HashMap<u64, u32> = HashMap::new();
    // pfns the trace allocated, freed or took off the buddy lists (first touch seen).
    let mut touched: HashSet<u64> = HashSet::new();
    let mut allocated: Vec<(u64, u32)> = Vec::new();
    let mut misaligned = 0u64;
    let mut pre_slabs: HashMap<u64, PreSlab> = HashMap::new();
    let mut pending_kfree: Vec<u64> = Vec::new();
    let mut pcp_pfns: Vec<Vec<u64>> = vec![Vec::new(); m.cpus.len() as usize];
    let in_live = |live: &HashMap<u64, u32>, pfn: u64| -> bool {
        (0..=MAX_PAGE_ORDER).any(|o| live.get(&(pfn >> o << o)).is_some_and(|&lo| lo >= o))
    };
    let slab_of = |ptr: u64| -> Option<u64> {
        (ptr >= page_offset && ptr - page_offset < (64 << 40)).then(|| (ptr - page_offset) >> shift)
    };
    for e in &log.events {
        match e.kind {
            Kind::MmPageAlloc if e.flags & F_FAILED == 0 => {
                let o = (e.order as u32).min(MAX_PAGE_ORDER);
                if o == 0 && !touched.contains(&e.ptr) {
                    if let Some(v) = pcp_pfns.get_mut(e.cpu as usize) {
                        v.push(e.ptr);
                    }
                }
                live.insert(e.ptr, o);
                for p in e.ptr..e.ptr.saturating_add(1u64 << o) {
                    touched.insert(p);
                }
            }
            Kind::MmPageAllocZoneLocked => {
                let o = (e.order as u32).min(MAX_PAGE_ORDER);
                for p in e.ptr..e.ptr.saturating_add(1u64 << o) {
                    touched.insert(p);
                }
            }
            Kind::MmPagePcpuDrain => {
                if !touched.contains(&e.ptr) && e.order == 0 {
                    if let Some(v) = pcp_pfns.get_mut(e.cpu as usize) {
                        v.push(e.ptr);
                    }
                }
                touched.insert(e.ptr);
            }
            Kind::MmPageFree => {
                let o = (e.order as u32).min(MAX_PAGE_ORDER);
                if live.remove(&e.ptr).is_none() && !touched.contains(&e.ptr) && !pre_slabs.contains_key(&e.ptr) {
                    if e.ptr & ((1u64 << o) - 1) == 0 {
                        allocated.push((e.ptr, o));
                    } else {
                        misaligned += 1; // no buddy block starts there: the trace is damaged
                    }
                }
                for p in e.ptr..e.ptr.saturating_add(1u64 << o) {
                    touched.insert(p);
                }
            }
            k if is_slab_event(k) => {
                let Some(pfn) = slab_of(e.ptr) else { continue };
                if e.ptr == 0 || touched.contains(&pfn) || in_live(&live, pfn) {
                    continue;
                }
                let is_alloc = matches!(k, Kind::Kmalloc | Kind::KmallocNode | Kind::KmemCacheAlloc | Kind::KmemCacheAllocNode);
                let cache = match k {
                    Kind::Kmalloc | Kind::KmallocNode => {
                        if e.bytes_req == 0 || e.bytes_req > crate::kmalloc::KMALLOC_MAX_CACHE_SIZE {
                            continue;
                        }
                        Some(m.kmalloc_slab(e.bytes_req, e.gfp).clone())
                    }
                    Kind::KmemCacheAlloc | Kind::KmemCacheAllocNode | Kind::KmemCacheFree => {
                        if e.cache == NONE {
                            None
                        } else {
                            m.slab.find(log.strings.get(e.cache))
                        }
                    }
                    _ => None,
                };
                match cache {
                    Some(c) => {
                        let head = pfn >> c.geo.order << c.geo.order;
                        let s = pre_slabs.entry(head).or_insert_with(|| PreSlab { cache: c.clone(), objs: HashMap::new() });
                        if s.cache.id != c.id {
                            continue;
                        }
                        if let Some(i) = obj_index(m, &c, head, e.ptr) {
                            s.objs.entry(i).or_insert(!is_alloc);
                        }
                    }
                    None if k == Kind::Kfree => pending_kfree.push(e.ptr),
                    None => {}
                }
            }
            _ => {}
        }
    }
    // kfrees whose cache another object of the same slab names.
    for ptr in pending_kfree {
        let Some(pfn) = slab_of(ptr) else { continue };
        for o in 0..=crate::arch::PAGE_ALLOC_COSTLY_ORDER {
            let head = pfn >> o << o;
            if let Some(s) = pre_slabs.get_mut(&head) {
                if s.cache.geo.order == o {
                    if let Some(i) = obj_index(m, &s.cache, head, ptr) {
                        // The kfree came before the events that named the cache: live at start.
                        s.objs.insert(i, true);
                    }
                    break;
                }
            }
        }
    }
    // Page blocks freed before allocation that hold a pre-trace slab are the
    // kernel discarding it: not "allocated" blocks.
    allocated.retain(|&(pfn, _)| !pre_slabs.contains_key(&pfn));
    if misaligned > 0 {
        out.warnings.push(format!(
            "the trace frees {misaligned} page blocks at pfns not aligned to their order (no block of the buddy allocator starts there); they are not placed"
        ));
    }
    out.plan.allocated = allocated;
    out.plan.pcp_pfns = pcp_pfns;

    // --- zones ---------------------------------------------------------------
    if let Some(pti) = &start.pagetypeinfo {
        let mt_index = |name: &str| MIGRATETYPE_NAMES.iter().position(|n| *n == name);
        let mut zones: Vec<WarmZone> = Vec::new();
        for f in pti.free.iter().filter(|f| f.node == 0) {
            let Some(kind) = zone_kind(&f.zone) else { continue };
            let Some(mt) = mt_index(&f.migratetype) else {
                if f.nr_free.iter().any(|&n| n > 0) {
                    out.warnings.push(format!(
                        "start.pagetypeinfo: zone {}: migratetype {} is not one kmm models; its free blocks are left out",
                        f.zone, f.migratetype
                    ));
                }
                continue;
            };
            let wz = match zones.iter_mut().position(|w| w.zone == Some(kind)) {
                Some(i) => &mut zones[i],
                None => {
                    zones.push(WarmZone { zone: Some(kind), ..Default::default() });
                    zones.last_mut().expect("just pushed")
                }
            };
            for (o, &n) in f.nr_free.iter().enumerate().take(NR_PAGE_ORDERS) {
                wz.free[o][mt] = n;
            }
        }
        for b in pti.blocks.iter().filter(|b| b.node == 0) {
            let Some(w) = zones.iter_mut().find(|w| w.zone == zone_kind(&b.zone)) else { continue };
            let mut counts = [0u64; MIGRATE_TYPES];
            for (name, &n) in pti.block_types.iter().zip(&b.counts) {
                match mt_index(name) {
                    Some(mt) => counts[mt] += n,
                    None if n > 0 => {
                        out.warnings.push(format!(
                            "start.pagetypeinfo: zone {}: {n} {name} pageblocks counted as Movable (kmm has no {name})",
                            b.zone
                        ));
                        counts[crate::buddy::MIGRATE_MOVABLE as usize] += n;
                    }
                    None => {}
                }
            }
            w.blocks = Some(counts);
        }
        out.plan.zones = zones;
    } else if let Some(bi) = &start.buddyinfo {
        out.warnings.push("no start.pagetypeinfo: free blocks from start.buddyinfo, all Movable".into());
        for z in bi.iter().filter(|z| z.node == 0) {
            let Some(kind) = zone_kind(&z.zone) else { continue };
            let mut w = WarmZone { zone: Some(kind), ..Default::default() };
            for (o, &n) in z.nr_free.iter().enumerate().take(NR_PAGE_ORDERS) {
                w.free[o][crate::buddy::MIGRATE_MOVABLE as usize] = n;
            }
            out.plan.zones.push(w);
        }
    } else {
        out.warnings.push("no start.pagetypeinfo or start.buddyinfo: free lists not warmed".into());
    }
    if let Some(zi) = &start.zoneinfo {
        for w in out.plan.zones.iter_mut() {
            if let Some(z) = zi.zones.iter().find(|z| z.node == 0 && zone_kind(&z.name) == w.zone) {
                let mut pcp = vec![(0, 0); m.cpus.len() as usize];
                for p in &z.pagesets {
                    if let Some(slot) = pcp.get_mut(p.cpu as usize) {
                        *slot = (p.count, p.high);
                    }
                }
                w.pcp = pcp;
            }
        }
    }

    // --- slabs ---------------------------------------------------------------
    let mut by_cache: HashMap<u32, Vec<WarmSlab>> = HashMap::new();
    for (head, s) in pre_slabs {
        let mut ws = WarmSlab { pfn: head, ..Default::default() };
        for (&i, &is_live) in &s.objs {
            if is_live {
                ws.live.push(i);
            } else {
                ws.free.push(i);
            }
        }
        ws.live.sort_unstable();
        ws.free.sort_unstable();
        by_cache.entry(s.cache.id).or_default().push(ws);
    }
    for (c, row) in caches {
        let mut slabs = by_cache.remove(&c.id).unwrap_or_default();
        slabs.sort_by_key(|s| s.pfn);
        // A what-if geometry (slub_min_order=, slub_max_order=, ...): the
        // recorded objects, active and total, in as many slabs as the new
        // geometry needs for them, as a kernel booted with it would hold the
        // same workload's objects; not the recorded slab count at the new
        // size (that would scale slab memory by the order change).
        let (num_objs, num_slabs) = if c.geo.objects as u64 != row.objperslab && c.geo.objects > 0 {
            let per = c.geo.objects as u64;
            let n = row.num_objs.div_ceil(per).max(slabs.len() as u64);
            (n * per, n)
        } else {
            (row.num_objs, row.num_slabs)
        };
        out.plan.caches.push(WarmCache {
            cache: c,
            active_objs: row.active_objs.min(num_objs),
            num_objs,
            num_slabs,
            slabs,
        });
    }
    // Traced pre-trace slabs of caches start.slabinfo does not list.
    for (id, slabs) in by_cache {
        let Some(c) = m.slab.get(id).cloned() else { continue };
        let n = slabs.len() as u64;
        let live: u64 = slabs.iter().map(|s| s.live.len() as u64).sum();
        let num_objs = n * c.geo.objects as u64;
        out.plan.caches.push(WarmCache { cache: c, active_objs: live, num_objs, num_slabs: n, slabs });
    }
    out
}

/// The index of the object at `ptr` in the slab at `head`, if it is on an
/// object boundary of that slab.
fn obj_index(m: &Machine, c: &KmemCache, head: u64, ptr: u64) -> Option<u32> {
    let base = m.cfg.arch.page_offset() + (head << m.page_shift) + c.geo.red_left_pad as u64;
    let off = ptr.checked_sub(base)?;
    let i = u32::try_from(c.geo.index_of(off)?).ok()?;
    (i < c.geo.objects).then_some(i)
}

/// Names of caches whose traced slab pages were reclaimable (migratetype
/// 2 in their mm_page_alloc event).
fn reclaimable_slab_caches<'a>(m: &Machine, log: &'a TraceLog, page_offset: u64) -> HashSet<&'a str> {
    let mut out = HashSet::new();
    let mut live: HashMap<u64, (u32, i8)> = HashMap::new();
    for e in &log.events {
        match e.kind {
            Kind::MmPageAlloc if e.flags & F_FAILED == 0 => {
                live.insert(e.ptr, (e.order as u32, e.migratetype));
            }
            Kind::MmPageFree => {
                live.remove(&e.ptr);
            }
            Kind::KmemCacheAlloc | Kind::KmemCacheAllocNode if e.cache != NONE && e.ptr >= page_offset => {
                let pfn = (e.ptr - page_offset) >> m.page_shift;
                for o in 0..=crate::arch::PAGE_ALLOC_COSTLY_ORDER {
                    if let Some(&(lo, mt)) = live.get(&(pfn >> o << o)) {
                        if lo >= o {
                            if mt as u8 == MIGRATE_RECLAIMABLE {
                                out.insert(log.strings.get(e.cache));
                            }
                            break;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// A machine built for a trace, and how.
pub struct Recorded {
    pub machine: Machine,
    /// How it was sized and warmed, one sentence each.
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
    pub warm: Option<crate::warm::WarmReport>,
    /// Caches made for start.slabinfo: (name, object_size, size, how).
    pub caches_created: Vec<(String, u32, u32, String)>,
}

/// The trace's identity for `WarmSeeds::trace_id`.
pub fn trace_id(log: &TraceLog) -> (u64, u64, u64) {
    let first = log.events.first().map_or(0, |e| e.ts_ns);
    let last = log.events.last().map_or(0, |e| e.ts_ns);
    (log.events.len() as u64, first, last)
}

/// Build the machine a replay of `log` runs on: shaped like the recording
/// (or sized from the trace), and with `warm`, brought to the recorded start
/// state (`warm.rs`), its `warm` seeds set for the replay.
pub fn recorded_machine(
    base: MachineConfig,
    bundle: Option<&Bundle>,
    log: &TraceLog,
    warm: bool,
    page_offset: u64,
    cpus_given: bool,
    memory_given: bool,
) -> Result<Recorded> {
    // A bundle whose zones cannot make a machine: say why, and size the
    // machine from the trace instead (a cold start).
    let given_bundle = bundle.is_some();
    let (shape, m, bundle) = match shape_config(base.clone(), bundle, log, page_offset, cpus_given, memory_given)
        .and_then(|s| Machine::new(s.cfg.clone()).map(|m| (s, m)))
    {
        Ok((s, m)) => (s, m, bundle),
        Err(e) if bundle.is_some() => {
            let mut s = shape_config(base, None, log, page_offset, cpus_given, memory_given)?;
            s.warnings.insert(0, format!("the recording's zones cannot shape a machine ({}): sized from the trace, cold", e.message()));
            let m = Machine::new(s.cfg.clone())?;
            (s, m, None)
        }
        Err(e) => return Err(e),
    };
    let mut notes = shape.notes;
    let mut warnings = shape.warnings;
    let mut caches_created = Vec::new();
    let mut warm_rep = None;
    match (warm, bundle) {
        (true, Some(b)) if b.start.pagetypeinfo.is_some() || b.start.buddyinfo.is_some() || b.start.slabinfo.is_some() => {
            let wi = warm_inputs(&m, b, log, page_offset);
            warnings.extend(wi.warnings.iter().cloned());
            let rep = m.warm_start(&wi.plan)?;
            warnings.extend(rep.warnings.iter().map(|w| format!("warm start: {w}")));
            caches_created = wi.caches_created.clone();
            // Traced pre-trace objects -> kmm's, through their slabs' placement.
            let mut objs = Vec::new();
            let mut slab_heads = Vec::new();
            for &(cid, th, kh) in &rep.slabs {
                slab_heads.push(th);
                let Some(wc) = wi.plan.caches.iter().find(|c| c.cache.id == cid) else { continue };
                let Some(ws) = wc.slabs.iter().find(|s| s.pfn == th) else { continue };
                let c = &wc.cache;
                let base = |h: u64| m.cfg.arch.page_offset() + (h << m.page_shift) + c.geo.red_left_pad as u64;
                for &i in &ws.live {
                    let off = i as u64 * c.geo.size as u64;
                    objs.push((base(th) + off, base(kh) + off, cid));
                }
            }
            let placed: u64 = rep.zones.iter().map(|z| z.reached.iter().flatten().sum::<u64>()).sum();
            let target: u64 = rep.zones.iter().map(|z| z.target.iter().flatten().sum::<u64>()).sum();
            notes.push(format!(
                "warm start: {placed} of {target} free blocks as start.pagetypeinfo lists them, {} pcp pages, {} slabs of {} caches, {} pre-trace page blocks and {} pre-trace objects at their traced places",
                rep.zones.iter().map(|z| z.pcp_reached.iter().sum::<u64>()).sum::<u64>(),
                rep.caches.iter().map(|c| c.2).sum::<u64>(),
                rep.caches.len(),
                rep.allocated.len(),
                objs.len(),
            ));
            *m.warm.lock() = Some(Arc::new(crate::warm::WarmSeeds {
                used: Default::default(),
                trace_id: trace_id(log),
                report: rep.clone(),
                objs,
                slab_heads,
                notes: notes.clone(),
            }));
            warm_rep = Some(rep);
        }
        (true, Some(_)) => notes.push("cold start: the bundle has no start.pagetypeinfo, buddyinfo or slabinfo".into()),
        (true, None) if given_bundle => notes.push("cold start: the recording's zones could not be used".into()),
        (true, None) => notes.push("cold start: no recording bundle (its start.* files give the warm start)".into()),
        (false, _) => notes.push("cold start (warm=False)".into()),
    }
    *m.shape_notes.lock() = notes.clone();
    Ok(Recorded { machine: m, notes, warnings, warm: warm_rep, caches_created })
}
