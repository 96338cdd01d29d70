//! A machine shaped like the recorded warm2 VM (zones from its
//! start.zoneinfo) and brought to its recorded start state (free lists from
//! start.pagetypeinfo, pcp counts from the pagesets).

use kmm_core::arch::{ZoneKind, NR_PAGE_ORDERS};
use kmm_core::buddy::MIGRATE_TYPES;
use kmm_core::machine::{ZoneLayout, ZoneTuning};
use kmm_core::warm::{WarmPlan, WarmZone};
use kmm_core::{Machine, MachineConfig};

fn bundle_file(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python/kmm/data/warm2").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// start.pagetypeinfo's free counts: zone -> [order][mt], and block counts.
fn pagetypeinfo() -> Vec<(String, [[u64; MIGRATE_TYPES]; NR_PAGE_ORDERS], [u64; MIGRATE_TYPES])> {
    let text = bundle_file("start.pagetypeinfo.txt");
    let names = ["Unmovable", "Movable", "Reclaimable", "HighAtomic", "Isolate"];
    let mut out: Vec<(String, [[u64; MIGRATE_TYPES]; NR_PAGE_ORDERS], [u64; MIGRATE_TYPES])> = Vec::new();
    let mut in_blocks = false;
    for line in text.lines() {
        if line.starts_with("Number of blocks type") {
            in_blocks = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("Node    0, zone ") {
            // "     DMA, type    Unmovable      0 ..."
            let (zone, rest) = rest.split_once(", type").unwrap();
            let zone = zone.trim().to_string();
            let mut it = rest.split_whitespace();
            let tn = it.next().unwrap();
            let mt = names.iter().position(|n| *n == tn).unwrap_or_else(|| panic!("{tn:?} in {line:?}"));
            let counts: Vec<u64> = it.map(|v| v.parse().unwrap()).collect();
            let e = match out.iter_mut().find(|e| e.0 == zone) {
                Some(e) => e,
                None => {
                    out.push((zone, [[0; MIGRATE_TYPES]; NR_PAGE_ORDERS], [0; MIGRATE_TYPES]));
                    out.last_mut().unwrap()
                }
            };
            for (o, c) in counts.iter().enumerate() {
                e.1[o][mt] = *c;
            }
        } else if in_blocks {
            if let Some(rest) = line.strip_prefix("Node 0, zone ") {
                let mut it = rest.split_whitespace();
                let zone = it.next().unwrap().to_string();
                let counts: Vec<u64> = it.map(|v| v.parse().unwrap()).collect();
                let e = out.iter_mut().find(|e| e.0 == zone).unwrap();
                for (mt, c) in counts.iter().enumerate().take(MIGRATE_TYPES) {
                    e.2[mt] = *c;
                }
            }
        }
    }
    out
}

/// The warm2 VM's zones as its start.zoneinfo prints them.
fn warm2_config() -> MachineConfig {
    // Managed runs where the recording's free blocks fit (DMA and DMA32
    // entirely free at the top: order-10 blocks up to the zone's end) and
    // pagetypeinfo's online pageblock counts.
    let z = |kind, start_pfn, spanned, present, managed, ms, nb| ZoneLayout {
        kind,
        start_pfn,
        spanned,
        present,
        managed,
        managed_start: Some(ms),
        online_pageblocks: Some(nb),
    };
    let t = |w: [u64; 4], lr: Vec<u64>, batch, high_min, high_max| Some(ZoneTuning { watermarks: Some(w), lowmem_reserve: lr, batch, high_min, high_max });
    MachineConfig {
        cpus: 2,
        layout: Some(vec![
            z(ZoneKind::Dma, 1, 4095, 3998, 3840, 4096 - 3840, 8),
            z(ZoneKind::Dma32, 4096, 1044480, 782336, 772848, 1048576 - 772848, 1528),
            z(ZoneKind::Normal, 1048576, 5505024, 5505024, 2064384, 1048576, 4032),
        ]),
        tuning: Some(vec![
            t([22, 27, 32, 37], vec![0, 3018, 11082, 11082, 11082], 1, 13, 240),
            t([4596, 5745, 6894, 8043], vec![0, 0, 8064, 8064, 8064], 63, 2872, 48303),
            t([12276, 15345, 18414, 21483], vec![0, 0, 0, 0, 0], 63, 7672, 129024),
            None,
            None,
        ]),
        ..MachineConfig::default()
    }
}

#[test]
fn recorded_zones_shape_the_machine() {
    let m = Machine::new(warm2_config()).unwrap();
    let zi = m.zone_infos();
    let names: Vec<&str> = m.zones.iter().map(|z| z.kind.name()).collect();
    assert_eq!(names, ["DMA", "DMA32", "Normal", "Movable", "Device"]);
    // start.zoneinfo: spanned/present/managed and start_pfn.
    let n = &m.zones[2];
    assert_eq!((n.start_pfn, n.spanned, n.present, n.managed), (1048576, 5505024, 5505024, 2064384));
    assert_eq!(m.zones[1].present, 782336);
    // A fresh machine: every managed page free, nothing else.
    assert_eq!(m.zones[2].free_pages(), 2064384);
    assert_eq!(m.zones[0].free_pages(), 3840);
    // Watermarks, protection and pagesets as recorded.
    assert_eq!((zi[2].min, zi[2].low, zi[2].high, zi[2].promo), (12276, 15345, 18414, 21483));
    assert_eq!(zi[0].lowmem_reserve, vec![0, 3018, 11082, 11082, 11082]);
    assert_eq!(m.nr_pages, 1048576 + 5505024);
    // An unmanaged page is reserved: freeing it is refused in the kernel's words.
    let e = m.free_pages(kmm_core::Pfn(1048576 + 2064384 + 7), 0).unwrap_err();
    assert!(e.to_string().contains("reserved"), "{e}");
    assert!(m.check().is_empty(), "{:?}", m.check());
}

#[test]
fn bad_layouts_are_refused() {
    let mut cfg = warm2_config();
    cfg.layout.as_mut().unwrap()[2].managed = 6_000_000; // more than present
    let e = Machine::new(cfg).err().unwrap();
    assert!(e.to_string().contains("managed <= present <= spanned"), "{e}");
    let mut cfg = warm2_config();
    cfg.layout.as_mut().unwrap()[1].start_pfn = 4000; // overlaps DMA
    assert!(Machine::new(cfg).is_err());
    let mut cfg = warm2_config();
    cfg.layout.as_mut().unwrap()[2].managed_start = Some(6_000_000); // outside the span
    assert!(Machine::new(cfg).is_err());
    let mut cfg = warm2_config();
    cfg.layout.as_mut().unwrap()[2].kind = ZoneKind::HighMem; // not on x86_64
    assert!(Machine::new(cfg).is_err());
}

#[test]
fn warm_start_meets_the_recorded_free_lists() {
    let m = Machine::new(warm2_config()).unwrap();
    let pti = pagetypeinfo();
    let zones: Vec<WarmZone> = pti
        .iter()
        .map(|(name, free, blocks)| WarmZone {
            zone: m.zones.iter().find(|z| z.kind.name() == name).map(|z| z.kind),
            free: *free,
            blocks: Some(*blocks),
            // start.zoneinfo's pagesets (count, high) per CPU.
            pcp: match name.as_str() {
                "Normal" => vec![(5026, 13412), (39678, 43038)],
                "DMA32" => vec![(0, 2872), (0, 0)],
                _ => vec![],
            },
        })
        .collect();
    let plan = WarmPlan { zones, ..Default::default() };
    let rep = m.warm_start(&plan).unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    for (name, free, blocks) in &pti {
        let z = m.zones.iter().find(|z| z.kind.name() == name).unwrap();
        let a = z.area.lock();
        assert_eq!(&a.nr_free_mt, free, "{name}: free lists per order and migratetype");
        drop(a);
        let r = rep.zones.iter().find(|r| r.zone == name).unwrap();
        assert_eq!(&r.reached, free);
        assert_eq!(&r.blocks_reached, blocks, "{name}: pageblocks per migratetype");
    }
    // Free pages are what pagetypeinfo's blocks add up to (Normal: 41 more
    // than start.zoneinfo's `pages free 1152329`, read a moment earlier);
    // DMA32 is entirely free, as zoneinfo says (772848 = managed).
    let sum = |free: &[[u64; MIGRATE_TYPES]; NR_PAGE_ORDERS]| -> u64 {
        free.iter().enumerate().map(|(o, per)| per.iter().sum::<u64>() << o).sum()
    };
    assert_eq!(m.zones[2].free_pages(), sum(&pti.iter().find(|e| e.0 == "Normal").unwrap().1));
    assert_eq!(m.zones[2].free_pages(), 1152370);
    assert_eq!(m.zones[1].free_pages(), 772848);
    // Managed pages unchanged by the layout.
    assert_eq!(m.zones.iter().map(|z| z.managed).collect::<Vec<_>>()[..3], [3840, 772848, 2064384]);
    let reserved_in = |z: &kmm_core::zone::Zone| {
        (z.start_pfn..z.end_pfn()).filter(|&p| m.mem_map.get(p).has(kmm_core::page::PG_RESERVED)).count() as u64
    };
    for z in &m.zones[..3] {
        assert_eq!(z.spanned - reserved_in(z), z.managed, "{}", z.kind.name());
    }
    // pagetypeinfo as the kernel printed it, line for line.
    assert_eq!(m.proc_pagetypeinfo(), bundle_file("start.pagetypeinfo.txt"));
    // buddyinfo is pagetypeinfo summed: the first line of start.buddyinfo.
    let bi = m.proc_buddyinfo();
    let want = bundle_file("start.buddyinfo.txt");
    assert_eq!(bi, want);
    // pcp counts as recorded.
    assert_eq!(m.zones[2].pcp[0].lists.lock().count, 5026);
    assert_eq!(m.zones[2].pcp[1].lists.lock().count, 39678);
    assert_eq!(m.zones[2].pcp[1].lists.lock().high, 43038);
    let errs = m.check();
    assert!(errs.is_empty(), "{:?}", &errs[..errs.len().min(5)]);
}

// ---- a small machine with hand-made targets ---------------------------------
//
// 64 MiB: DMA spans pfn 1..4096 but manages only the 3840 pages from pfn
// 100 (pfns 1..100 and 3940..4096 reserved); DMA32 spans and manages
// 4096..16384. Pageblocks are 512 pages (order 9), blocks at most order 10.

use kmm_core::buddy::{MIGRATE_MOVABLE, MIGRATE_UNMOVABLE};
use kmm_core::gfp::{GFP_HIGHUSER_MOVABLE, GFP_KERNEL};
use kmm_core::page::{PG_PCP, PG_RESERVED};
use kmm_core::slab::CacheArgs;
use kmm_core::trace::{Event, EventId};
use kmm_core::warm::{WarmCache, WarmSlab};
use kmm_core::{Pfn, VirtAddr};

const MOV: usize = MIGRATE_MOVABLE as usize;
const UNMOV: usize = MIGRATE_UNMOVABLE as usize;

fn small() -> Machine {
    let z = |kind, start_pfn, spanned, managed, ms| ZoneLayout {
        kind,
        start_pfn,
        spanned,
        present: spanned,
        managed,
        managed_start: ms,
        online_pageblocks: None,
    };
    let t = ZoneTuning { watermarks: None, lowmem_reserve: vec![], batch: 2, high_min: 100, high_max: 1000 };
    Machine::new(MachineConfig {
        cpus: 2,
        layout: Some(vec![z(ZoneKind::Dma, 1, 4095, 3840, Some(100)), z(ZoneKind::Dma32, 4096, 12288, 12288, None)]),
        tuning: Some(vec![None, Some(t)]),
        ..MachineConfig::default()
    })
    .unwrap()
}

fn no_free() -> [[u64; MIGRATE_TYPES]; NR_PAGE_ORDERS] {
    [[0; MIGRATE_TYPES]; NR_PAGE_ORDERS]
}

fn zone_plan(kind: ZoneKind, free: [[u64; MIGRATE_TYPES]; NR_PAGE_ORDERS], pcp: Vec<(u64, u64)>) -> WarmZone {
    WarmZone { zone: Some(kind), free, blocks: None, pcp }
}

fn reserved(m: &Machine, z: &kmm_core::zone::Zone) -> Vec<u64> {
    (z.start_pfn..z.end_pfn()).filter(|&p| m.mem_map.get(p).has(PG_RESERVED)).collect()
}

fn assert_clean(m: &Machine) {
    let errs = m.check();
    assert!(errs.is_empty(), "{:?}", &errs[..errs.len().min(5)]);
}

#[test]
fn small_machine_boots_with_its_reserved_pages() {
    let m = small();
    let dma = &m.zones[0];
    assert_eq!((dma.spanned, dma.present, dma.managed), (4095, 4095, 3840));
    assert_eq!(dma.free_pages(), 3840);
    let r = reserved(&m, dma);
    assert_eq!(r.len(), 255);
    assert_eq!((r[0], r[98], r[99], *r.last().unwrap()), (1, 99, 3940, 4095));
    assert_clean(&m);
}

#[test]
fn free_blocks_that_cannot_tile_the_managed_run_trade_reserved_pages() {
    // DMA's free target is all of its 3840 managed pages: 3 order-10, one
    // order-9 and one order-8 block. The only order-10 places in 1..4096 are
    // 1024, 2048 and 3072, and 3072..4096 holds 156 reserved pages
    // (3940..4096): the placement must take them, and give as many managed
    // pages back to the reserved ones so that the zone keeps 3840.
    let m = small();
    let mut free = no_free();
    free[10][MOV] = 3;
    free[9][MOV] = 1;
    free[8][MOV] = 1;
    let plan = WarmPlan { zones: vec![zone_plan(ZoneKind::Dma, free, vec![])], ..Default::default() };
    let rep = m.warm_start(&plan).unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    let dma = &m.zones[0];
    assert_eq!(dma.area.lock().nr_free_mt, free);
    assert_eq!(rep.zones[0].reached, free);
    assert_eq!(dma.free_pages(), 3840);
    assert_eq!(dma.managed, 3840);
    // Still 255 reserved pages, none of them in 3072..4096 any more.
    let r = reserved(&m, dma);
    assert_eq!(r.len(), 255);
    assert!(r.iter().all(|&p| p < 1024), "{:?}", &r[r.len() - 3..]);
    // Every page of the span is free or reserved: nothing left in use.
    assert_eq!(rep.untracked_pages, 0);
    // The order-10 block at 3072 is there to allocate, boot-reserved pages and all.
    let mut got: Vec<u64> = (0..3).map(|_| m.alloc_pages(kmm_core::gfp::GFP_DMA, 10).unwrap().0).collect();
    got.sort_unstable();
    assert_eq!(got, [1024, 2048, 3072]);
    for p in got {
        m.free_pages(Pfn(p), 10).unwrap();
    }
    assert_clean(&m);
}

#[test]
fn free_targets_beyond_the_zone_are_reported_not_fatal() {
    // One more order-7 block than DMA can hold: the warm start places what
    // fits, says what did not, and leaves a consistent machine.
    let m = small();
    let mut free = no_free();
    free[10][MOV] = 3;
    free[9][MOV] = 1;
    free[8][MOV] = 1;
    free[7][MOV] = 2;
    let plan = WarmPlan { zones: vec![zone_plan(ZoneKind::Dma, free, vec![])], ..Default::default() };
    let rep = m.warm_start(&plan).unwrap();
    // The larger blocks already hold all 3840 managed pages: no room for
    // the order-7 ones (free pages never exceed managed ones).
    assert_eq!(rep.warnings, ["DMA: placed 0 of 2 free order-7 Movable blocks (no room left in pageblocks of that type)"]);
    let dma = &m.zones[0];
    let reached = dma.area.lock().nr_free_mt;
    assert_eq!(reached, rep.zones[0].reached);
    for o in 8..=10 {
        assert_eq!(reached[o][MOV], free[o][MOV], "order {o}");
    }
    assert_eq!(reached[7][MOV], 0);
    assert_eq!(dma.free_pages(), 3840);
    assert!(dma.free_pages() <= dma.managed, "{} free of {} managed", dma.free_pages(), dma.managed);
    assert_eq!(dma.spanned - reserved(&m, dma).len() as u64, dma.managed);
    assert_clean(&m);
}

#[test]
fn pre_trace_blocks_are_allocated_at_their_pfns_and_free_cleanly() {
    let m = small();
    let mut free = no_free();
    free[10][MOV] = 4;
    free[0][MOV] = 3;
    let blocks = [(5000u64, 0u32), (6144, 3), (8192, 9), (9216, 10)];
    let plan = WarmPlan {
        zones: vec![zone_plan(ZoneKind::Dma32, free, vec![])],
        allocated: blocks.to_vec(),
        ..Default::default()
    };
    let rep = m.warm_start(&plan).unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    assert_eq!(rep.allocated_missed, 0);
    let want: Vec<(u64, u64, u32)> = blocks.iter().map(|&(p, o)| (p, p, o)).collect();
    assert_eq!(rep.allocated, want);
    assert_eq!(m.zones[1].area.lock().nr_free_mt, free);
    let free_before = m.zones[1].free_pages();
    assert_eq!(free_before, 4 * 1024 + 3);
    // Freeing a pfn inside a block (not its head) is refused; the heads free.
    assert!(m.free_pages(Pfn(6145), 0).is_err());
    for &(p, o) in &blocks {
        m.free_pages(Pfn(p), o).unwrap();
        assert_clean(&m);
    }
    m.drain_all_pages();
    assert_eq!(m.zones[1].free_pages(), free_before + 1 + 8 + 512 + 1024);
    // A second free of the same block is the kernel's bad-page report.
    assert!(m.free_pages(Pfn(9216), 10).is_err());
    assert_clean(&m);
}

#[test]
fn a_pre_trace_block_a_free_block_had_to_take_is_placed_elsewhere() {
    // DMA32 has one Unmovable pageblock; it goes to the pageblock holding
    // the traced block (4608..5120, pfn 5000), and the target's free
    // Unmovable order-9 block can only be that pageblock: the traced block
    // moves to another page of the zone, same order.
    let m = small();
    let mut free = no_free();
    free[9][UNMOV] = 1;
    free[10][MOV] = 4;
    let mut blocks = [0u64; MIGRATE_TYPES];
    blocks[UNMOV] = 1;
    blocks[MOV] = 23;
    let plan = WarmPlan {
        zones: vec![WarmZone { zone: Some(ZoneKind::Dma32), free, blocks: Some(blocks), pcp: vec![] }],
        allocated: vec![(5000, 0)],
        ..Default::default()
    };
    let rep = m.warm_start(&plan).unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    assert_eq!(rep.zones[0].blocks_reached, blocks);
    assert_eq!(m.zones[1].area.lock().nr_free_mt, free);
    assert_eq!(m.zones[1].pageblocks.get(4608), MIGRATE_UNMOVABLE);
    assert_eq!(rep.allocated.len(), 1);
    let (traced, at, order) = rep.allocated[0];
    assert_eq!((traced, order), (5000, 0));
    assert!(!(4608..5120).contains(&at), "moved out of the free block: {at}");
    assert!(m.zones[1].spans(at));
    m.free_pages(Pfn(at), 0).unwrap();
    assert_clean(&m);
}

#[test]
fn pcp_lists_get_their_counts_highs_and_traced_pages_first() {
    let m = small();
    let mut free = no_free();
    free[10][MOV] = 4;
    let plan = WarmPlan {
        // cpu 0: high 50 is below high_min 100; cpu 1: 2000 is above high_max 1000.
        zones: vec![zone_plan(ZoneKind::Dma32, free, vec![(10, 50), (5, 2000)])],
        pcp_pfns: vec![vec![], vec![9000, 9001, 9002]],
        ..Default::default()
    };
    let rep = m.warm_start(&plan).unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    assert_eq!(rep.zones[0].pcp_target, vec![10, 5]);
    assert_eq!(rep.zones[0].pcp_reached, vec![10, 5]);
    let z = &m.zones[1];
    let (c0, h0) = {
        let p = z.pcp[0].lists.lock();
        (p.count, p.high)
    };
    assert_eq!((c0, h0), (10, 100), "high clamped to high_min");
    let (c1, h1) = {
        let p = z.pcp[1].lists.lock();
        (p.count, p.high)
    };
    assert_eq!((c1, h1), (5, 1000), "high clamped to high_max");
    assert_eq!(m.nr_pcp_pages(), 15);
    for p in [9000u64, 9001, 9002] {
        assert!(m.mem_map.get(p).has(PG_PCP), "pfn {p} on a pcp list");
    }
    // The free lists are as asked; pcp pages are not free pages.
    assert_eq!(z.free_pages(), 4096);
    // cpu 1's movable allocations take the traced pages first, in order,
    // straight off the list: no buddy allocation.
    let evs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Event>::new()));
    let e2 = evs.clone();
    m.trace.attach(EventId::MmPageAllocZoneLocked.bit(), std::sync::Arc::new(move |e: &Event| e2.lock().unwrap().push(e.clone())));
    m.cpus.bind(1).unwrap();
    let got: Vec<u64> = (0..3).map(|_| m.alloc_pages(GFP_HIGHUSER_MOVABLE, 0).unwrap().0).collect();
    assert_eq!(got, [9000, 9001, 9002]);
    assert!(evs.lock().unwrap().is_empty());
    for p in got {
        m.free_pages(Pfn(p), 0).unwrap();
    }
    m.cpus.unbind().unwrap();
    assert_clean(&m);
}

#[test]
fn a_warm_slab_has_its_known_live_and_free_objects() {
    let m = small();
    let c = m.kmem_cache_create("warm_obj", 200, CacheArgs::default()).unwrap().cache;
    let per = c.geo.objects as u64;
    assert_eq!((c.geo.size, c.geo.order, per), (200, 0, 20), "200-byte objects, 20 a page");
    let mut free = no_free();
    free[10][MOV] = 4;
    // 5 slabs, 70 of their 100 objects in use; the traced slab at pfn 10000
    // has objects 0 and 3 live (the trace frees them first) and 1 free.
    let plan = WarmPlan {
        zones: vec![zone_plan(ZoneKind::Dma32, free, vec![])],
        caches: vec![WarmCache {
            cache: c.clone(),
            active_objs: 70,
            num_objs: 100,
            num_slabs: 5,
            slabs: vec![WarmSlab { pfn: 10000, live: vec![0, 3], free: vec![1] }],
        }],
        ..Default::default()
    };
    let rep = m.warm_start(&plan).unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    assert_eq!(rep.caches, vec![("warm_obj".to_string(), 5, 5, 70, 70)]);
    assert_eq!(rep.slabs, vec![(c.id, 10000, 10000)]);
    assert_eq!((rep.slabs_at_traced_pfn, rep.slabs_moved), (1, 0));
    // get_slabinfo: active_objs, num_objs, num_slabs.
    assert_eq!(c.slabinfo_counts(), (70, 100, 5));
    let row = m.proc_slabinfo().lines().find(|l| l.starts_with("warm_obj ")).map(|l| l.to_string()).unwrap();
    let f: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((f[1], f[2], f[3], f[4], f[5]), ("70", "100", "200", "20", "1"), "{row}");
    // The slab's pages: a slab of this cache at pfn 10000, in DMA32.
    assert!(m.mem_map.get(10000).has(kmm_core::page::PG_SLAB));
    let obj = |i: u64| VirtAddr(m.cfg.arch.page_offset() + (10000 << 12) + c.geo.red_left_pad as u64 + i * 200);
    let cs = kmm_core::trace::unknown_call_site();
    // A known-live object frees; a known-free one is a double free.
    m.kmem_cache_free(&c, obj(3), &cs).unwrap();
    assert_eq!(c.slabinfo_counts(), (69, 100, 5));
    assert!(m.kmem_cache_free(&c, obj(1), &cs).is_err(), "object 1 was free at start");
    m.kmem_cache_free(&c, obj(0), &cs).unwrap();
    assert_eq!(c.slabinfo_counts().0, 68);
    // New objects come from the warm slabs' free ones, no new slab.
    for _ in 0..10 {
        m.kmem_cache_alloc(&c, GFP_KERNEL, &cs).unwrap();
    }
    assert_eq!(c.slabinfo_counts().2, 5);
    assert_clean(&m);
}

#[test]
fn warm_start_refuses_a_machine_in_use() {
    // Pages on a pcp list.
    let m = small();
    m.cpus.bind(0).unwrap();
    let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    m.free_pages(p, 0).unwrap();
    let e = m.warm_start(&WarmPlan::default()).expect_err("bound to a CPU");
    assert!(e.to_string().contains("not bound to a CPU"), "{e}");
    m.cpus.unbind().unwrap();
    assert!(m.nr_pcp_pages() > 0);
    let e = m.warm_start(&WarmPlan::default()).expect_err("pcp pages in use");
    assert!(e.to_string().contains("freshly booted"), "{e}");
    // A slab in use.
    let m = small();
    let cs = kmm_core::trace::unknown_call_site();
    let a = m.kmalloc(64, GFP_KERNEL, &cs).unwrap();
    m.drain_all_pages();
    assert_eq!(m.nr_pcp_pages(), 0);
    let before = m.proc_buddyinfo();
    let e = m.warm_start(&WarmPlan::default()).expect_err("a slab in use");
    assert!(e.to_string().contains("freshly booted"), "{e}");
    assert_eq!(m.proc_buddyinfo(), before, "a refused warm start changes nothing");
    m.kfree(a.0, &cs).unwrap();
    assert_clean(&m);
}



#[test]
fn a_pre_trace_block_on_a_reserved_page_goes_elsewhere() {
    // The trace frees pfn 50 (order 0) and 3950 (order 1) before allocating
    // them, but the layout reserves 1..100 and 3940..4096 of DMA: the blocks
    // are placed on managed pages instead, and the zone keeps its 255
    // reserved pages (managed 3840).
    let m = small();
    let mut free = no_free();
    free[10][MOV] = 2;
    let plan = WarmPlan {
        zones: vec![zone_plan(ZoneKind::Dma, free, vec![])],
        allocated: vec![(50, 0), (3950, 1)],
        ..Default::default()
    };
    let rep = m.warm_start(&plan).unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    assert_eq!(rep.allocated_missed, 0);
    assert_eq!(rep.allocated.len(), 2);
    let dma = &m.zones[0];
    assert_eq!(reserved(&m, dma).len(), 255);
    for &(traced, at, order) in &rep.allocated {
        assert_ne!(traced, at);
        assert!(at >= 100 && at + (1 << order) <= 3940, "{at}");
        assert!(!m.mem_map.get(at).has(PG_RESERVED));
        m.free_pages(Pfn(at), order).unwrap();
    }
    m.drain_all_pages();
    assert_eq!(dma.free_pages(), 2048 + 1 + 2);
    assert!(dma.free_pages() <= dma.managed);
    assert_clean(&m);
}

#[test]
fn checker_reports_a_reserved_page_that_lost_its_flag() {
    let m = Machine::new(warm2_config()).unwrap();
    assert!(m.check().is_empty());
    // An offline page of Normal (beyond its managed run) loses PG_reserved:
    // the zone now has one page more outside the reserved ones than it manages.
    let pfn = 1048576 + 2064384 + 100;
    m.mem_map.get(pfn).clear();
    assert_eq!(m.check(), vec!["machine-3: Normal has 2064385 pages not PG_reserved but manages 2064384".to_string()]);
}
