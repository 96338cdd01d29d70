//! The /proc renderers against the real files captured from Linux 6.18
//! x86_64 (tests/data/linux/): the same lines, labels, indentation and
//! column alignment, with numbers replaced by a placeholder on both sides;
//! and values checked against numbers worked out independently.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;

use kmm_core::arch::{Arch, ZoneKind};
use kmm_core::buddy::{MIGRATE_MOVABLE, MIGRATE_TYPES};
use kmm_core::gfp::*;
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

fn field(m: &Machine, name: &str) -> u64 {
    m.meminfo_fields().into_iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no {name}")).1
}

fn vmstat(m: &Machine, name: &str) -> u64 {
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
