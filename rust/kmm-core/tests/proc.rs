//! The /proc renderers against the real files captured from Linux 6.18
//! x86_64 (tests/data/linux/): the same lines, labels, indentation and
//! column alignment, with numbers replaced by a placeholder on both sides;
//! and values checked against numbers worked out independently.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;

use kmm_core::arch::{Arch, ZoneKind};
use kmm_core::buddy::{MIGRATE_MOVABLE, MIGRATE_TYPES};
use kmm_core::gfp::*;
use kmm_core::slab::geometry::*;
use kmm_core::slab::CacheArgs;
use kmm_core::trace::unknown_call_site;
use kmm_core::{Machine, MachineConfig};

// ---- helpers ------------------------------------------------------------------------

/// A real /proc file from Linux 6.18 (the repository's copy, else the shared one).
fn real(name: &str) -> String {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates =
        [manifest.join("../../tests/data/linux").join(name), manifest.join("../../../shared/data/linux").join(name)];
    for p in &candidates {
        if let Ok(s) = std::fs::read_to_string(p) {
            return s;
        }
    }
    panic!("reference file {name} not found in {candidates:?}");
}

fn boot_default() -> Machine {
    Machine::new(MachineConfig::default()).unwrap()
}

/// The reference machine's shape: x86_64, 2 CPUs, DMA + DMA32 + Normal populated.
fn boot_24g() -> Machine {
    Machine::new(MachineConfig { memory: 24 << 30, ..MachineConfig::default() }).unwrap()
}

/// Left-aligned shape: every run of digits becomes '#'. Labels, indentation and
/// the padding between a label and its (left-aligned) number must match exactly.
fn shape_left(text: &str) -> Vec<String> {
    text.split('\n')
        .map(|line| {
            let mut out = String::new();
            let mut in_digits = false;
            for c in line.chars() {
                if c.is_ascii_digit() {
                    if !in_digits {
                        out.push('#');
                    }
                    in_digits = true;
                } else {
                    out.push(c);
                    in_digits = false;
                }
            }
            out
        })
        .collect()
}

/// Right-aligned shape: each whitespace-separated token (digit runs as '#')
/// with the column where it ends, plus the line's length. Right-aligned
/// numbers end in the same column whatever their value, so equal shapes mean
/// equal labels in the same order with values in the same columns.
fn shape_right(text: &str) -> Vec<(Vec<(String, usize)>, usize)> {
    text.split('\n')
        .map(|line| {
            let mut toks = Vec::new();
            let mut start = None;
            for (i, c) in line.char_indices().chain(std::iter::once((line.len(), ' '))) {
                match (c == ' ', start) {
                    (false, None) => start = Some(i),
                    (true, Some(s)) => {
                        let t: String = shape_left(&line[s..i]).concat();
                        toks.push((t, i));
                        start = None;
                    }
                    _ => {}
                }
            }
            (toks, line.len())
        })
        .collect()
}

fn assert_same<T: PartialEq + std::fmt::Debug>(ours: &[T], theirs: &[T], what: &str) {
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a, b, "{what}: line {} differs", i + 1);
    }
    assert_eq!(ours.len(), theirs.len(), "{what}: line counts differ");
}

/// A meminfo value, read after draining the per-CPU page lists, so that
/// MemFree counts every free page (pcp pages are not in NR_FREE_PAGES).
fn field(m: &Machine, name: &str) -> u64 {
    m.drain_all_pages();
    m.meminfo_fields().into_iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no {name}")).1
}

/// A vmstat value, after draining the per-CPU page lists (see `field`).
fn vmstat(m: &Machine, name: &str) -> u64 {
    m.drain_all_pages();
    let text = m.proc_vmstat();
    let line = text.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("no {name}"));
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Boot rule, worked by hand: free [start, end) in maximal aligned chunks.
fn boot_buddy_counts(start: u64, end: u64) -> [u64; 11] {
    let mut c = [0u64; 11];
    let mut pfn = start;
    while pfn < end {
        let mut o = pfn.trailing_zeros().min(10);
        while pfn + (1 << o) > end {
            o -= 1;
        }
        c[o as usize] += 1;
        pfn += 1 << o;
    }
    c
}

// ---- format against the real files --------------------------------------------------

#[test]
fn buddyinfo_format_matches_real() {
    let m = boot_24g();
    assert_same(&shape_right(&m.proc_buddyinfo()), &shape_right(&real("buddyinfo.txt")), "buddyinfo");
}

#[test]
fn pagetypeinfo_format_matches_real() {
    let m = boot_24g();
    let ours = m.proc_pagetypeinfo();
    let theirs = real("pagetypeinfo.txt");
    assert_same(&shape_right(&ours), &shape_right(&theirs), "pagetypeinfo");
    // The header lines are identical, numbers included (pageblock order 9).
    for (a, b) in ours.lines().zip(theirs.lines()).take(4) {
        assert_eq!(a, b);
    }
}

#[test]
fn zoneinfo_format_matches_real() {
    let m = boot_24g();
    let ours = m.proc_zoneinfo();
    let theirs = real("zoneinfo.txt");
    assert_same(&shape_left(&ours), &shape_left(&theirs), "zoneinfo");
    // Quirks kept: "%-12s %lu" padding and the two-space node_unreclaimable gap.
    assert!(ours.contains("\n      nr_mapped    0\n"));
    assert!(ours.contains("\n      nr_zspages   0\n"));
    assert!(ours.contains("\n  node_unreclaimable:  0\n  start_pfn:           1\n"));
}

#[test]
fn meminfo_format_matches_real() {
    let m = boot_24g();
    let ours = m.proc_meminfo();
    let theirs = real("meminfo.txt");
    assert_same(&shape_right(&ours), &shape_right(&theirs), "meminfo");
    // VmallocTotal is a constant of the x86_64 layout: identical to the real one.
    let vt = |s: &str| s.lines().find(|l| l.starts_with("VmallocTotal:")).unwrap().to_string();
    assert_eq!(vt(&ours), vt(&theirs));
    let hs = |s: &str| s.lines().find(|l| l.starts_with("Hugepagesize:")).unwrap().to_string();
    assert_eq!(hs(&ours), hs(&theirs));
}

#[test]
fn every_meminfo_line_parses_like_real() {
    // A parser for real /proc/meminfo: "Name: value [kB]".
    fn parse(s: &str) -> Vec<(String, u64, bool)> {
        s.lines()
            .map(|l| {
                let (name, rest) = l.split_once(':').unwrap();
                let mut it = rest.split_whitespace();
                let v = it.next().unwrap().parse().unwrap();
                (name.to_string(), v, it.next() == Some("kB"))
            })
            .collect()
    }
    let m = boot_24g();
    let ours = parse(&m.proc_meminfo());
    let theirs = parse(&real("meminfo.txt"));
    let names = |v: &[(String, u64, bool)]| v.iter().map(|(n, _, k)| (n.clone(), *k)).collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&theirs));
    let fields = m.meminfo_fields();
    assert_eq!(fields.len(), ours.len());
    for ((n, v), (pn, pv, _)) in fields.iter().zip(&ours) {
        assert_eq!((*n, *v), (pn.as_str(), *pv));
    }
}

// ---- values worked out independently -------------------------------------------------

#[test]
fn buddyinfo_of_fresh_1g_by_hand() {
    let m = boot_default();
    // DMA [1, 4096): 1,2,4,...,512 then 1024-aligned order-10 blocks at 1024, 2048, 3072.
    // DMA32 [4096, 262144): 252 order-10 blocks.
    assert_eq!(boot_buddy_counts(1, 4096), [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3]);
    assert_eq!(boot_buddy_counts(4096, 262_144), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 252]);
    let expect = "Node 0, zone      DMA      1      1      1      1      1      1      1      1      1      1      3 \n\
                  Node 0, zone    DMA32      0      0      0      0      0      0      0      0      0      0    252 \n";
    assert_eq!(m.proc_buddyinfo(), expect);
}

#[test]
fn buddyinfo_of_odd_sizes_follows_the_boot_rule() {
    for mem in [(64u64 << 20) + (12 << 12), (5u64 << 30) + (3 << 20) + (7 << 12)] {
        let m = Machine::new(MachineConfig { memory: mem, ..MachineConfig::default() }).unwrap();
        let text = m.proc_buddyinfo();
        let populated: Vec<_> = m.zones.iter().filter(|z| z.spanned > 0).collect();
        assert_eq!(text.lines().count(), populated.len());
        for (line, z) in text.lines().zip(populated) {
            let nums: Vec<u64> = line.split_whitespace().skip(4).map(|t| t.parse().unwrap()).collect();
            assert_eq!(nums, boot_buddy_counts(z.start_pfn, z.end_pfn()).to_vec(), "{line}");
        }
    }
}

#[test]
fn pagetypeinfo_of_fresh_1g() {
    let m = boot_default();
    let t = m.proc_pagetypeinfo();
    // Boot marks every pageblock Movable, so every free block is on a Movable list.
    assert!(t.contains(
        "Node    0, zone      DMA, type      Movable      1      1      1      1      1      1      1      1      1      1      3 \n"
    ));
    assert!(t.contains(
        "Node    0, zone    DMA32, type    Unmovable      0      0      0      0      0      0      0      0      0      0      0 \n"
    ));
    // Blocks: DMA's 8 pageblocks (pfn 0..4096), DMA32's (262144-4096)/512 = 504.
    assert!(t.contains("Node 0, zone      DMA            0            8            0            0            0 \n"));
    assert!(t.contains("Node 0, zone    DMA32            0          504            0            0            0 \n"));
    let zi = m.zone_infos();
    assert_eq!(zi[1].pageblocks[MIGRATE_MOVABLE as usize], 504);
}

#[test]
fn pagetypeinfo_caps_long_lists_at_100000() {
    let m = boot_default();
    // Take everything GFP_KERNEL can get, then free every other page: ~125k
    // lone order-0 free pages, more than pagetypeinfo will count.
    let mut got = Vec::new();
    while let Ok(p) = m.alloc_pages(GFP_KERNEL, 0) {
        got.push(p);
    }
    let mut kept = Vec::new();
    got.sort();
    for p in got {
        if p.0 % 2 == 0 {
            m.free_pages(p, 0).unwrap();
        } else {
            kept.push(p);
        }
    }
    let dma32 = m.zone_index(ZoneKind::Dma32).unwrap();
    let zi = &m.zone_infos()[dma32];
    let (mt, n) = (0..MIGRATE_TYPES).map(|t| (t, zi.nr_free_mt[t][0])).max_by_key(|&(_, n)| n).unwrap();
    assert!(n > 100_000, "only {n} order-0 blocks");
    let t = m.proc_pagetypeinfo();
    let name = kmm_core::buddy::MIGRATETYPE_NAMES[mt];
    let row = t.lines().find(|l| l.starts_with(&format!("Node    0, zone    DMA32, type {name:>12} "))).unwrap();
    assert_eq!(row.split_whitespace().nth(6), Some(">100000"), "{row}");
    // buddyinfo shows the true count.
    let bi = m.proc_buddyinfo();
    let line = bi.lines().find(|l| l.contains("DMA32")).unwrap();
    assert_eq!(line.split_whitespace().nth(4).unwrap().parse::<u64>().unwrap(), zi.nr_free[0]);
    for p in kept {
        m.free_pages(p, 0).unwrap();
    }
    assert!(m.check().is_empty());
}

#[test]
fn zoneinfo_values_24g() {
    let m = boot_24g();
    let text = m.proc_zoneinfo();
    let zi = m.zone_infos();
    let names: Vec<_> = zi.iter().map(|z| z.name).collect();
    assert_eq!(names, ["DMA", "DMA32", "Normal", "Movable", "Device"]);
    // Normal: pfn 1M..6M, all free at boot.
    let n = &zi[2];
    assert_eq!((n.start_pfn, n.spanned, n.managed), (1 << 20, 5 << 20, 5 << 20));
    assert!(text.contains(&format!("Node 0, zone   Normal\n  pages free     {}\n", n.free_pages)));
    assert!(text.contains("\n  start_pfn:           1048576\n"));
    // Protection lines are the zones' lowmem_reserve arrays.
    for z in &m.zones {
        let r: Vec<String> = z.lowmem_reserve.iter().map(|r| r.load(Relaxed).to_string()).collect();
        assert!(text.contains(&format!("protection: ({})", r.join(", "))));
    }
    // DMA's reserve: DMA32 + Normal managed / 256 (the real machine: 3019, 3787...).
    let dma32_managed = (1 << 20) - 4096;
    assert_eq!(zi[0].lowmem_reserve[1], dma32_managed / 256);
    assert_eq!(zi[0].lowmem_reserve[2], (dma32_managed + (5 << 20)) / 256);
    // Unpopulated zones stop after protection; populated ones end with start_pfn.
    let blocks: Vec<&str> = text.split("Node 0, zone ").skip(1).collect();
    assert_eq!(blocks.len(), 5);
    for (b, z) in blocks.iter().zip(&zi) {
        assert_eq!(b.contains("pagesets"), z.populated, "{}", z.name);
        assert_eq!(b.matches("\n    cpu: ").count(), if z.populated { 2 } else { 0 });
    }
    assert_eq!(text.matches("per-node stats").count(), 1);
    assert!(blocks[0].contains("per-node stats"));
    // Movable: empty, tiny highmem-style min of 32 (as in the real file).
    assert!(blocks[3].contains("        min      32\n"));
}

#[test]
fn zoneinfo_pagesets_use_zone_sizing() {
    let m = boot_24g();
    let text = m.proc_zoneinfo();
    for z in m.zones.iter().filter(|z| z.is_populated()) {
        let block = text.split("Node 0, zone ").find(|b| b.trim_start().starts_with(z.kind.name())).unwrap();
        let expect = format!(
            "\n    cpu: 1\n              count:    0\n              high:     0\n              batch:    {}\n              high_min: {}\n              high_max: {}\n  vm stats threshold: {}\n",
            z.pcp_batch.load(Relaxed),
            z.pcp_high_min.load(Relaxed),
            z.pcp_high_max.load(Relaxed),
            kmm_core::zone::vmstat_threshold(z.managed, 12, 2)
        );
        assert!(block.contains(&expect), "{block}");
    }
}

#[test]
fn meminfo_free_follows_allocations() {
    let m = boot_default();
    // 1 GiB minus the reserved pfn 0, all free at boot.
    assert_eq!(field(&m, "MemTotal"), (1 << 20) - 4);
    assert_eq!(field(&m, "MemFree"), (1 << 20) - 4);
    let free0 = field(&m, "MemFree");
    let p = m.alloc_pages(GFP_KERNEL, 3).unwrap();
    assert_eq!(field(&m, "MemFree"), free0 - 8 * 4);
    let q = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    assert_eq!(field(&m, "MemFree"), free0 - 9 * 4);
    assert!(m.proc_meminfo().contains(&format!("MemFree:        {:>8} kB\n", free0 - 36)));
    m.free_pages(p, 3).unwrap();
    m.free_pages(q, 0).unwrap();
    assert_eq!(field(&m, "MemFree"), free0);
    // MemFree is the sum of zoneinfo's "pages free".
    let sum: u64 = m.zone_infos().iter().map(|z| z.free_pages).sum();
    assert_eq!(field(&m, "MemFree"), sum * 4);
}

#[test]
fn meminfo_available_and_commit_limit() {
    for m in [boot_default(), boot_24g(), Machine::boot(Arch::I386, "2G").unwrap()] {
        // totalreserve_pages by hand: per zone min(max(lowmem_reserve[i..]) + high, managed).
        let mut reserve = 0;
        for z in &m.zones {
            let max = z.lowmem_reserve[z.idx..].iter().map(|r| r.load(Relaxed)).max().unwrap();
            reserve += (max + z.watermark[2].load(Relaxed)).min(z.managed);
        }
        assert_eq!(field(&m, "MemAvailable"), field(&m, "MemFree") - reserve * 4);
        assert_eq!(field(&m, "CommitLimit"), m.totalram_pages() / 2 * 4);
    }
    // On the real machine's numbers the formula gives the real MemAvailable:
    // DMA min(3787+98, 3840) + DMA32 768+20124 + Normal 5118 = 29850 pages.
    let real_free_kb = 24_458_104u64;
    assert_eq!(real_free_kb - 29850 * 4 + 47_248 + 10_376, 24_396_328);
}

#[test]
fn meminfo_i386_has_highmem_lines() {
    let m = Machine::boot(Arch::I386, "2G").unwrap();
    let text = m.proc_meminfo();
    let names: Vec<&str> = text.lines().map(|l| l.split(':').next().unwrap()).collect();
    let at = names.iter().position(|&n| n == "Mlocked").unwrap();
    assert_eq!(&names[at + 1..at + 6], ["HighTotal", "HighFree", "LowTotal", "LowFree", "SwapTotal"]);
    // HighMem is everything above 896 MiB.
    let high_kb = (2u64 << 20) - (896 << 10);
    assert_eq!(field(&m, "HighTotal"), high_kb);
    assert_eq!(field(&m, "LowTotal") + field(&m, "HighTotal"), field(&m, "MemTotal"));
    assert_eq!(field(&m, "LowFree") + field(&m, "HighFree"), field(&m, "MemFree"));
    assert!(text.contains(&format!("HighTotal:      {high_kb:>8} kB\n")));
    // GFP_HIGHUSER takes from HighMem: HighFree drops, LowFree does not.
    let (hf, lf) = (field(&m, "HighFree"), field(&m, "LowFree"));
    let p = m.alloc_pages(GFP_HIGHUSER, 2).unwrap();
    assert_eq!((field(&m, "HighFree"), field(&m, "LowFree")), (hf - 16, lf));
    m.free_pages(p, 2).unwrap();
    // i386 without PAE: 4 MiB pageblocks and huge pages, DirectMap4M, no 1G line.
    assert!(text.contains("Hugepagesize:       4096 kB\n"));
    assert!(text.contains("DirectMap4M:"));
    assert!(!text.contains("DirectMap1G"));
    assert_eq!(field(&m, "DirectMap4k") + field(&m, "DirectMap4M"), 896 << 10);
    // x86_64 has none of them.
    assert!(!boot_default().proc_meminfo().contains("HighTotal"));
}

#[test]
fn meminfo_direct_map_split() {
    let m = boot_24g();
    assert_eq!(field(&m, "DirectMap4k"), 2048);
    assert_eq!(field(&m, "DirectMap2M"), (1 << 20) - 2048);
    assert_eq!(field(&m, "DirectMap1G"), 23 << 20);
    let m = boot_default();
    assert_eq!(
        (field(&m, "DirectMap4k"), field(&m, "DirectMap2M"), field(&m, "DirectMap1G")),
        (2048, (1 << 20) - 2048, 0)
    );
}

#[test]
fn vmstat_counts_allocations_per_zone() {
    let m = boot_default();
    assert_eq!(vmstat(&m, "nr_free_pages"), m.nr_free_pages());
    let p = m.alloc_pages(GFP_KERNEL, 3).unwrap();
    let d = m.alloc_pages(GFP_KERNEL | GFP_DMA, 1).unwrap();
    assert_eq!(vmstat(&m, "pgalloc_dma32"), 8);
    assert_eq!(vmstat(&m, "pgalloc_dma"), 2);
    assert_eq!(vmstat(&m, "pgalloc_normal"), 0);
    assert_eq!(vmstat(&m, "nr_free_pages"), m.nr_free_pages());
    m.free_pages(p, 3).unwrap();
    m.free_pages(d, 1).unwrap();
    assert_eq!(vmstat(&m, "pgfree"), 10);
    assert_eq!(vmstat(&m, "nr_free_pages"), (1 << 18) - 1);
}

#[test]
fn vmstat_order_and_names() {
    let m = boot_default();
    let text = m.proc_vmstat();
    let names: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert!(text.lines().all(|l| l.split(' ').count() == 2));
    assert_eq!(names[0], "nr_free_pages");
    assert_eq!(names[1], "nr_free_pages_blocks");
    assert_eq!(*names.last().unwrap(), "nr_unstable");
    let pos = |n: &str| names.iter().position(|&x| x == n).unwrap_or_else(|| panic!("{n}"));
    // Blocks in vmstat_text order: zone items, NUMA events, node items, thresholds, events.
    assert!(pos("nr_free_cma") < pos("numa_hit"));
    assert!(pos("numa_other") < pos("nr_inactive_anon"));
    assert!(pos("nr_kernel_file_pages") < pos("nr_dirty_threshold"));
    assert!(pos("nr_dirty_threshold") < pos("nr_dirty_background_threshold"));
    assert!(pos("pswpout") < pos("pgalloc_dma"));
    let zones = ["dma", "dma32", "normal", "movable", "device"];
    for w in zones.windows(2) {
        assert_eq!(pos(&format!("pgalloc_{}", w[0])) + 1, pos(&format!("pgalloc_{}", w[1])));
    }
    assert!(pos("pgalloc_device") < pos("allocstall_dma") && pos("allocstall_device") < pos("pgskip_dma"));
    assert_eq!(pos("pgskip_device") + 1, pos("pgfree"));
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "duplicate names");
    // The node items are zoneinfo's per-node list, in the same order.
    let zi = real("zoneinfo.txt");
    let per_node: Vec<&str> = zi
        .lines()
        .skip(2)
        .take_while(|l| !l.starts_with("  pages free"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    let start = pos("nr_inactive_anon");
    assert_eq!(&names[start..start + per_node.len()], per_node.as_slice());
    // i386: pgalloc_high, no dma32 or device.
    let m = Machine::boot(Arch::I386, "2G").unwrap();
    let t = m.proc_vmstat();
    let names: Vec<&str> = t.lines().map(|l| l.split(' ').next().unwrap()).collect();
    let pg: Vec<&str> = names.iter().copied().filter(|n| n.starts_with("pgalloc_")).collect();
    assert_eq!(pg, ["pgalloc_dma", "pgalloc_normal", "pgalloc_high", "pgalloc_movable"]);
}

#[test]
fn vmstat_dirty_thresholds() {
    let m = boot_default();
    // No page cache: dirtyable = free - totalreserve + 1; 20% and 10% in per-page units.
    let reserve: u64 = m
        .zones
        .iter()
        .map(|z| {
            let max = z.lowmem_reserve[z.idx..].iter().map(|r| r.load(Relaxed)).max().unwrap();
            (max + z.watermark[2].load(Relaxed)).min(z.managed)
        })
        .sum();
    let avail = m.nr_free_pages() - reserve + 1;
    assert_eq!(vmstat(&m, "nr_dirty_threshold"), 819 * avail / 4096);
    assert_eq!(vmstat(&m, "nr_dirty_background_threshold"), 409 * avail / 4096);
}

#[test]
fn structured_views_agree_with_text() {
    let m = boot_24g();
    let p = m.alloc_pages(GFP_KERNEL, 4).unwrap();
    let zi = m.zone_infos();
    let bi = m.proc_buddyinfo();
    for (line, z) in bi.lines().zip(zi.iter().filter(|z| z.populated)) {
        let nums: Vec<u64> = line.split_whitespace().skip(4).map(|t| t.parse().unwrap()).collect();
        assert_eq!(nums, z.nr_free.to_vec());
        // proc-1: per-order counts are the sums over migratetypes.
        for o in 0..11 {
            assert_eq!(z.nr_free[o], z.nr_free_mt.iter().map(|t| t[o]).sum::<u64>());
        }
        // Free pages from the counts.
        let pages: u64 = z.nr_free.iter().enumerate().map(|(o, n)| n << o).sum();
        assert_eq!(pages, z.free_pages);
    }
    m.free_pages(p, 4).unwrap();
}

// ---- /proc/slabinfo and /sys/kernel/slab ------------------------------------------------

/// The lines of a slabinfo text after the two header lines.
fn slab_lines(text: &str) -> Vec<&str> {
    text.lines().skip(2).collect()
}

/// A slabinfo line's fields: name, then the eleven numbers (the ":",
/// "tunables" and "slabdata" tokens dropped).
fn slab_fields(line: &str) -> (String, Vec<u64>) {
    let mut it = line.split_whitespace();
    let name = it.next().unwrap().to_string();
    let nums = it.filter_map(|t| t.parse().ok()).collect::<Vec<u64>>();
    assert_eq!(nums.len(), 11, "{line}");
    (name, nums)
}

/// The slabinfo line of one cache.
fn slab_line(m: &Machine, name: &str) -> String {
    let text = m.proc_slabinfo();
    let line = text.lines().find(|l| l.split_whitespace().next() == Some(name));
    line.unwrap_or_else(|| panic!("no {name} in slabinfo")).to_string()
}

/// (active_objs, num_objs, num_slabs) of one cache, read from the text.
fn slab_counts(m: &Machine, name: &str) -> (u64, u64, u64) {
    let (_, n) = slab_fields(&slab_line(m, name));
    (n[0], n[1], n[9])
}

fn sysfs(m: &Machine, cache: &str, attr: &str) -> String {
    let attrs = m.sysfs_slab(cache).unwrap_or_else(|| panic!("no cache {cache}"));
    attrs.into_iter().find(|(n, _)| *n == attr).unwrap_or_else(|| panic!("no {attr}")).1
}

/// The real kmalloc lines: those below `kmalloc_buckets` (6.18's bucket cache
/// for kmalloc with CONFIG_SLAB_BUCKETS, which the model does not create).
fn real_kmalloc_tail(real_text: &str) -> Vec<&str> {
    let lines = slab_lines(real_text);
    let at = lines.iter().position(|l| l.starts_with("kmalloc_buckets ")).expect("kmalloc_buckets line");
    lines[at + 1..].to_vec()
}

#[test]
fn slabinfo_header_is_the_kernels() {
    let m = boot_default();
    let ours = m.proc_slabinfo();
    let theirs = real("slabinfo.txt");
    let head = |s: &str| s.split_inclusive('\n').take(2).collect::<String>();
    assert_eq!(head(&ours), head(&theirs));
    assert_eq!(head(&ours), kmm_core::proc::SLABINFO_HEADER);
    assert!(ours.ends_with('\n'));
}

#[test]
fn slabinfo_columns_match_real() {
    // With its name token left out, a line whose name fits in 17 columns
    // has every number ending in a fixed column. All such real lines share
    // one shape; every line of ours must have it too.
    let cut = |line: &str| {
        let (toks, len) = shape_right(line).remove(0);
        (toks[1..].to_vec(), len)
    };
    let theirs_text = real("slabinfo.txt");
    let theirs: Vec<_> =
        slab_lines(&theirs_text).into_iter().filter(|l| l.split(' ').next().unwrap().len() < 17).map(cut).collect();
    assert!(theirs.len() > 100);
    assert!(theirs.iter().all(|s| *s == theirs[0]), "the real short-name lines share one shape");
    for m in [boot_default(), boot_24g(), Machine::boot(Arch::I386, "2G").unwrap()] {
        let text = m.proc_slabinfo();
        let ours = slab_lines(&text);
        assert_eq!(ours.len(), 55, "the kmalloc caches, kmem_cache(_node) and vmap_area");
        for l in ours {
            assert!(l.split(' ').next().unwrap().len() < 17, "{l}");
            assert_eq!(cut(l), theirs[0], "{l}");
        }
    }
    // Long names push the line right, as in the kernel: an empty cache of
    // the real file, created with its geometry, prints the very same line.
    let m = boot_default();
    m.kmem_cache_create("btrfs_ordered_extent", 416, CacheArgs::default()).unwrap();
    let want = slab_lines(&theirs_text).into_iter().find(|l| l.starts_with("btrfs_ordered_extent ")).unwrap();
    assert_eq!(
        want,
        "btrfs_ordered_extent      0      0    416   19    2 : tunables    0    0    0 : slabdata      0      0      0"
    );
    assert_eq!(slab_lines(&m.proc_slabinfo())[0], want, "newest cache first");
}

#[test]
fn slabinfo_of_fresh_machine_lists_the_kmalloc_caches() {
    let m = boot_default();
    let text = m.proc_slabinfo();
    let all = slab_lines(&text);
    let theirs_text = real("slabinfo.txt");
    // vmalloc_init's vmap_area cache comes after the kmalloc caches (newest
    // first), with the real geometry: objsize 72, 56 per slab, 1 page.
    let real_va = slab_lines(&theirs_text).into_iter().find(|l| l.starts_with("vmap_area ")).unwrap();
    assert_eq!(slab_fields(all[0]).0, "vmap_area");
    assert_eq!(slab_fields(all[0]).1[2..5], slab_fields(real_va).1[2..5]);
    let ours = all[1..].to_vec();
    let theirs = real_kmalloc_tail(&theirs_text);
    // Same caches in the same order: kmalloc-cg-8k ... kmalloc-96, then
    // kmem_cache_node, kmem_cache (created first, so listed last).
    let names = |v: &[&str]| v.iter().map(|l| slab_fields(l).0).collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&theirs));
    assert_eq!(names(&ours)[0], "kmalloc-cg-8k");
    assert_eq!(names(&ours)[51], "kmalloc-96");
    assert_eq!(names(&ours)[52..], ["kmem_cache_node", "kmem_cache"]);
    for (a, b) in ours.iter().zip(&theirs) {
        let ((_, x), (_, y)) = (slab_fields(a), slab_fields(b));
        // <objsize> <objperslab> <pagesperslab> as SLUB computed them for 2 CPUs.
        assert_eq!(x[2..5], y[2..5], "{a}\n{b}");
        // Nothing allocated yet.
        assert!(x.iter().enumerate().all(|(i, &v)| (2..5).contains(&i) || v == 0), "{a}");
        // Caches that were empty on the real machine print identically.
        if y[1] == 0 {
            assert_eq!(a, b);
        }
    }
    assert_eq!(
        slab_line(&m, "kmalloc-96"),
        "kmalloc-96             0      0     96   42    1 : tunables    0    0    0 : slabdata      0      0      0"
    );
    // The structured rows are the text's.
    let rows = m.slabinfo_rows();
    assert_eq!(rows.len(), all.len());
    for (r, l) in rows.iter().zip(&all) {
        let (name, n) = slab_fields(l);
        assert_eq!(r.name, name);
        let got = [
            r.active_objs,
            r.num_objs,
            r.objsize as u64,
            r.objperslab as u64,
            r.pagesperslab as u64,
            r.limit as u64,
            r.batchcount as u64,
            r.sharedfactor as u64,
            r.active_slabs,
            r.num_slabs,
            r.sharedavail,
        ];
        assert_eq!(got.to_vec(), n);
    }
    let k96 = rows.iter().find(|r| r.name == "kmalloc-96").unwrap();
    assert_eq!((k96.objsize, k96.objperslab, k96.pagesperslab), (96, 42, 1));
}

#[test]
fn slabinfo_and_meminfo_follow_kmalloc() {
    let m = boot_default();
    let cs = unknown_call_site();
    let (slab0, unrecl0, recl0) = (field(&m, "Slab"), field(&m, "SUnreclaim"), field(&m, "SReclaimable"));
    let free0 = field(&m, "MemFree");
    assert_eq!((slab0, unrecl0, recl0), (0, 0, 0), "a fresh machine has no slab pages");
    assert_eq!(slab_counts(&m, "kmalloc-64"), (0, 0, 0));

    // 64 objects per order-0 slab. From one CPU a fresh cache fills its cpu
    // slab (objects 1-64), then the 65th allocation finds it full, leaves it
    // full on no list and takes a new slab: objects 65-100 in use, 28 free
    // on the CPU freelist. Two slabs, 128 objects; SLUB counts free objects
    // as inactive only on node partial slabs, so all 128 show as active.
    let objs: Vec<u64> = (0..100).map(|_| m.kmalloc(64, GFP_KERNEL, &cs).unwrap().0).collect();
    assert_eq!(slab_counts(&m, "kmalloc-64"), (128, 128, 2));
    assert_eq!(
        slab_line(&m, "kmalloc-64"),
        "kmalloc-64           128    128     64   64    1 : tunables    0    0    0 : slabdata      2      2      0"
    );
    // Two slab pages: 8 kB more SUnreclaim and Slab, 8 kB less free.
    assert_eq!(field(&m, "SUnreclaim"), unrecl0 + 2 * 4);
    assert_eq!(field(&m, "Slab"), slab0 + 2 * 4);
    assert_eq!(field(&m, "SReclaimable"), recl0);
    assert_eq!(field(&m, "MemFree"), free0 - 2 * 4);
    assert_eq!(vmstat(&m, "nr_slab_unreclaimable"), 2);
    assert!(m.proc_zoneinfo().contains("\n      nr_slab_unreclaimable 2\n"));
    assert!(m.proc_meminfo().contains("SUnreclaim:            8 kB\n"));
    // sysfs: one CPU holds one active slab; the full one is on no list.
    let k = "kmalloc-64";
    assert_eq!(sysfs(&m, k, "objects"), "128");
    assert_eq!(sysfs(&m, k, "total_objects"), "128");
    assert_eq!(sysfs(&m, k, "slabs"), "2");
    assert_eq!(sysfs(&m, k, "partial"), "0");
    assert_eq!(sysfs(&m, k, "objects_partial"), "0");
    assert_eq!(sysfs(&m, k, "cpu_slabs"), "1");
    assert_eq!(sysfs(&m, k, "slabs_cpu_partial"), "0(0)");

    // Freed: the first (full) slab goes to this CPU's partial list, the
    // second stays the cpu slab. Nothing is on the node list, so SLUB still
    // reports every object active until the cache is shrunk.
    for &o in &objs {
        m.kfree(o, &cs).unwrap();
    }
    let cpu = m.this_cpu();
    assert_eq!(slab_counts(&m, "kmalloc-64"), (128, 128, 2));
    assert_eq!(sysfs(&m, k, "cpu_slabs"), "2");
    assert_eq!(sysfs(&m, k, "slabs_cpu_partial"), format!("32(1) C{cpu}=32(1)"));
    let cache = m.kmalloc_slab(64, GFP_KERNEL).clone();
    assert_eq!(m.kmem_cache_shrink(&cache).unwrap(), 2);
    assert_eq!(slab_counts(&m, "kmalloc-64"), (0, 0, 0));
    assert_eq!(sysfs(&m, k, "cpu_slabs"), "0");
    assert_eq!((field(&m, "SUnreclaim"), field(&m, "Slab"), field(&m, "MemFree")), (unrecl0, slab0, free0));
    assert_eq!(vmstat(&m, "nr_slab_unreclaimable"), 0);
    assert!(m.check().is_empty(), "{:?}", m.check());
}

#[test]
fn node_partial_free_objects_are_inactive() {
    let m = boot_default();
    let cs = unknown_call_site();
    // Fill two slabs of kmalloc-64, free half of the first, shrink: the
    // flush puts both slabs on the node partial list, where SLUB counts
    // their free objects as inactive.
    let objs: Vec<u64> = (0..128).map(|_| m.kmalloc(64, GFP_KERNEL, &cs).unwrap().0).collect();
    for &o in &objs[..32] {
        m.kfree(o, &cs).unwrap();
    }
    let cache = m.kmalloc_slab(64, GFP_KERNEL).clone();
    m.kmem_cache_shrink(&cache).unwrap();
    // Slab 1: 32 free on the node list; slab 2 was the (full) cpu slab.
    assert_eq!(slab_counts(&m, "kmalloc-64"), (96, 128, 2));
    assert_eq!(sysfs(&m, "kmalloc-64", "objects"), "96");
    assert_eq!(sysfs(&m, "kmalloc-64", "partial"), "1");
    assert_eq!(sysfs(&m, "kmalloc-64", "objects_partial"), "32");
    for &o in &objs[32..] {
        m.kfree(o, &cs).unwrap();
    }
    m.kmem_cache_shrink(&cache).unwrap();
    assert_eq!(slab_counts(&m, "kmalloc-64"), (0, 0, 0));
    assert!(m.check().is_empty());
}

#[test]
fn reclaimable_kmalloc_counts_as_sreclaimable() {
    let m = boot_default();
    let cs = unknown_call_site();
    let (recl0, unrecl0, avail0) = (field(&m, "SReclaimable"), field(&m, "SUnreclaim"), field(&m, "MemAvailable"));
    let o = m.kmalloc(64, GFP_KERNEL | __GFP_RECLAIMABLE, &cs).unwrap();
    assert_eq!(slab_counts(&m, "kmalloc-rcl-64"), (64, 64, 1));
    assert_eq!(slab_counts(&m, "kmalloc-64"), (0, 0, 0));
    assert_eq!(field(&m, "SReclaimable"), recl0 + 4);
    assert_eq!(field(&m, "KReclaimable"), field(&m, "SReclaimable"));
    assert_eq!(field(&m, "SUnreclaim"), unrecl0);
    assert_eq!(field(&m, "Slab"), field(&m, "SReclaimable") + field(&m, "SUnreclaim"));
    assert_eq!(vmstat(&m, "nr_slab_reclaimable"), 1);
    assert!(m.proc_zoneinfo().contains("\n      nr_slab_reclaimable 1\n"));
    // si_mem_available: one page less free, one reclaimable page more
    // (less min(1 / 2, low watermarks) = 0): unchanged.
    assert_eq!(field(&m, "MemAvailable"), avail0);
    m.kfree(o.0, &cs).unwrap();
    m.kmem_cache_shrink(m.kmalloc_slab(64, GFP_KERNEL | __GFP_RECLAIMABLE)).unwrap();
    assert_eq!(field(&m, "SReclaimable"), recl0);
    assert_eq!(vmstat(&m, "nr_slab_reclaimable"), 0);
}

#[test]
fn large_kmalloc_counts_as_sunreclaim_but_not_in_slabinfo() {
    let m = boot_default();
    let cs = unknown_call_site();
    let before = m.proc_slabinfo();
    let unrecl0 = field(&m, "SUnreclaim");
    // 12 KiB + 1 is above KMALLOC_MAX_CACHE_SIZE (8 KiB): an order-2 block.
    let o = m.kmalloc(12289, GFP_KERNEL, &cs).unwrap();
    assert_eq!(field(&m, "SUnreclaim"), unrecl0 + 16);
    assert_eq!(vmstat(&m, "nr_slab_unreclaimable"), 4);
    assert_eq!(m.proc_slabinfo(), before);
    m.kfree(o.0, &cs).unwrap();
    assert_eq!(field(&m, "SUnreclaim"), unrecl0);
}

#[test]
fn sysfs_slab_kmalloc_96_matches_real() {
    let m = boot_default();
    let k = "kmalloc-96";
    for (attr, want) in [
        ("object_size", "96"),
        ("slab_size", "96"),
        ("objs_per_slab", "42"),
        ("order", "0"),
        ("align", "32"),
        ("min_partial", "5"),
        ("cpu_partial", "120"),
        ("cache_dma", "0"),
        ("aliases", "0"),
        ("ctor", ""),
        ("objects", "0"),
        ("cpu_slabs", "0"),
        ("usersize", "96"),
    ] {
        assert_eq!(sysfs(&m, k, attr), want, "{attr}");
    }
    // The real machine's dma-kmalloc-96 (empty, same geometry): every column
    // of its tsv row, counts included; kmalloc-96 shares its geometry.
    let tsv = real("sys_kernel_slab.tsv");
    let mut lines = tsv.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    let row: Vec<&str> = lines.map(|l| l.split('\t').collect::<Vec<_>>()).find(|r| r[0] == "dma-kmalloc-96").unwrap();
    for (col, want) in header.iter().zip(&row).skip(1) {
        assert_eq!(sysfs(&m, "dma-kmalloc-96", col), *want, "dma-kmalloc-96 {col}");
    }
    for col in ["object_size", "slab_size", "objs_per_slab", "order", "align", "cpu_partial", "min_partial"] {
        let at = header.iter().position(|h| *h == col).unwrap();
        assert_eq!(sysfs(&m, k, col), row[at], "kmalloc-96 {col}");
    }
    // Attribute files in ls order, each once.
    let names: Vec<&str> = m.sysfs_slab(k).unwrap().into_iter().map(|(n, _)| n).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(names, sorted);
    assert!(m.sysfs_slab("no-such-cache").is_none());
}

#[test]
fn sysfs_slab_flags_aliases_and_ctor() {
    let m = boot_default();
    // Two compatible caches merge: the second is an alias of the first.
    let a = m.kmem_cache_create("kmm_test_a", 200, CacheArgs::default()).unwrap();
    let b = m.kmem_cache_create("kmm_test_b", 196, CacheArgs::default()).unwrap();
    assert!(b.merged && !a.merged);
    assert_eq!(sysfs(&m, "kmm_test_a", "aliases"), "1");
    assert_eq!(m.sysfs_slab("kmm_test_b"), m.sysfs_slab("kmm_test_a"));
    assert_eq!(sysfs(&m, "kmm_test_b", "object_size"), "200");
    assert_eq!(sysfs(&m, "kmm_test_a", "usersize"), "0");
    // slabinfo lists the root cache only.
    let text = m.proc_slabinfo();
    assert!(text.contains("\nkmm_test_a "));
    assert!(!text.contains("kmm_test_b"));
    // Flags as 0/1.
    let f = SLAB_HWCACHE_ALIGN | SLAB_RECLAIM_ACCOUNT | SLAB_TYPESAFE_BY_RCU;
    m.kmem_cache_create("kmm_test_rcu", 100, CacheArgs { flags: f, ..CacheArgs::default() }).unwrap();
    let d = SLAB_RED_ZONE | SLAB_POISON | SLAB_STORE_USER | SLAB_CONSISTENCY_CHECKS | SLAB_CACHE_DMA;
    m.kmem_cache_create("kmm_test_debug", 100, CacheArgs { flags: d, ..CacheArgs::default() }).unwrap();
    let ctor: kmm_core::slab::Ctor = std::sync::Arc::new(|_| {});
    m.kmem_cache_create("kmm_test_ctor", 100, CacheArgs { ctor: Some(ctor), ..CacheArgs::default() }).unwrap();
    let bits = |c: &str| {
        let attrs = ["hwcache_align", "reclaim_account", "destroy_by_rcu", "red_zone"];
        let more = ["poison", "store_user", "sanity_checks", "cache_dma"];
        attrs.iter().chain(&more).map(|a| sysfs(&m, c, a)).collect::<String>()
    };
    assert_eq!(bits("kmm_test_rcu"), "11100000");
    assert_eq!(bits("kmm_test_debug"), "00011111");
    assert_eq!(bits("kmm_test_ctor"), "00000000");
    assert_eq!(sysfs(&m, "kmm_test_ctor", "ctor"), "ctor");
    assert_eq!(sysfs(&m, "kmm_test_rcu", "ctor"), "");
    // Debug caches have no per-CPU partial slabs.
    assert_eq!(sysfs(&m, "kmm_test_debug", "cpu_partial"), "0");
    assert_eq!(sysfs(&m, "kmm_test_rcu", "cpu_partial"), "120");
}

// ---- mixed pageblocks (mm/page_owner.c pagetypeinfo_showmixedcount_print) ----

/// Mixed pageblocks against a count made from the test's own record of what
/// it allocated: a pageblock is mixed when a live allocation of another
/// migratetype than the block's sits in it, counted under the block's type.
#[test]
fn mixed_blocks_count_blocks_holding_another_migratetype() {
    let m = Machine::new(MachineConfig { memory: 64 << 20, cpus: 1, ..MachineConfig::default() }).unwrap();
    m.cpus.bind(0).unwrap();
    let boot: Vec<[u64; MIGRATE_TYPES]> = m.zones.iter().map(|z| m.mixed_blocks(z)).collect();
    assert!(boot.iter().all(|c| c.iter().all(|&n| n == 0)), "a fresh machine has no mixed blocks: {boot:?}");
    let kinds = [(GFP_KERNEL, 0u8), (GFP_HIGHUSER_MOVABLE & !__GFP_HIGHMEM, 1), (GFP_KERNEL | __GFP_RECLAIMABLE, 2)];
    // A deterministic mix (xorshift), then frees of every other block, so
    // the migratetypes interleave and fallbacks steal from each other.
    let mut x = 0x2545F4914F6CDD1Du64;
    let mut live: Vec<(u64, u32, u8)> = Vec::new();
    for _ in 0..6000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (gfp, mt) = kinds[(x % 3) as usize];
        let order = ((x >> 8) % 4) as u32;
        match m.alloc_pages(gfp, order) {
            Ok(p) => live.push((p.0, order, mt)),
            Err(_) => break,
        }
    }
    let mut kept = Vec::new();
    for (i, &(pfn, order, mt)) in live.iter().enumerate() {
        if i % 2 == 0 {
            m.free_pages(kmm_core::page::Pfn(pfn), order).unwrap();
        } else {
            kept.push((pfn, order, mt));
        }
    }
    let nr = 1u64 << m.pageblock_order;
    let mut expect = vec![[0u64; MIGRATE_TYPES]; m.zones.len()];
    let mut seen = std::collections::HashSet::new();
    for &(pfn, _, mt) in &kept {
        let (zi, z) = m.zones.iter().enumerate().find(|(_, z)| z.spans(pfn)).unwrap();
        let block_mt = z.pageblocks.get(pfn);
        if mt != block_mt && seen.insert(pfn / nr) {
            expect[zi][block_mt as usize] += 1;
        }
    }
    let got: Vec<[u64; MIGRATE_TYPES]> = m.zones.iter().map(|z| m.mixed_blocks(z)).collect();
    assert_eq!(got, expect);
    assert!(expect.iter().flatten().sum::<u64>() > 0, "the mix should leave some block mixed");
    m.cpus.unbind().unwrap();
}
