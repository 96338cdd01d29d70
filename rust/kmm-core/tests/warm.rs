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
