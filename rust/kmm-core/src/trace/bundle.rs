//! A recording bundle's /proc files (DESIGN.md §9): the `start.*` and
//! `end.*` snapshots and `samples.txt`, read with `procfs`'s readers and
//! checked against each other and against the bundle's trace.
//!
//! ```text
//! DIR/perf.data | perf.txt   the trace (read elsewhere: perf_script.rs, the Python loader)
//! DIR/start.NAME.txt         /proc/NAME before: buddyinfo pagetypeinfo zoneinfo slabinfo meminfo vmstat
//! DIR/end.NAME.txt           the same after
//! DIR/samples.txt            "@ <CLOCK_MONOTONIC s>", buddyinfo, pagetypeinfo, vmstat lines, every ~100 ms
//! DIR/kallsyms.txt           /proc/kallsyms of the same boot (used by the perf.data decoder)
//! ```
//!
//! Every file here is optional, and none stops a replay: [`Bundle::from_texts`]
//! never fails. A malformed file is a warning naming the file and the line
//! and is treated as missing; files that cannot come from the same machine
//! (zones of other sizes, another page block order) or that disagree with
//! each other are warnings too, and [`Bundle::check_trace`] says when the
//! trace cannot come from the machine the files describe.
//!
//! # Kernel
//! The consistency rules are the kernel's: buddyinfo's count of a zone and
//! order is the sum over migratetypes of pagetypeinfo's (`mm/vmstat.c`
//! `frag_show_print`, `pagetypeinfo_showfree_print`; proc-1); zone spans and
//! managed pages are fixed at boot (`mm/mm_init.c`) unless memory is
//! hot-plugged or ballooned; zoneinfo lists a pageset for every online CPU
//! (`zoneinfo_show_print`'s `for_each_online_cpu`).
//!
//! SIMPLIFICATION: buddyinfo and pagetypeinfo are read at two moments, a
//! few microseconds apart, of a running system, so their totals are compared
//! with a tolerance ([`FREE_TOLERANCE_PAGES`] pages or
//! [`FREE_TOLERANCE_PERCENT`] percent of the zone's free pages, the larger;
//! the warm2 samples differ by at most 2,838 of ~1.1 M pages).
//!
//! # Invariants
//! - bundle-1: `from_texts` never panics and never fails; every file it
//!   ignores is named in `warnings`.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;

use super::perf_script::{Kind, TraceLog, F_FAILED};
use super::procfs::{
    parse_buddyinfo, parse_meminfo, parse_pagetypeinfo, parse_samples_partial, parse_slabinfo, parse_vmstat,
    parse_zoneinfo, BuddyZone, PagetypeInfo, SampleSnap, SlabInfoRow, ZoneInfo,
};

/// buddyinfo and pagetypeinfo totals of a zone may differ by this many pages.
pub const FREE_TOLERANCE_PAGES: u64 = 4096;
/// ... or by this percentage of the zone's free pages, whichever is larger.
pub const FREE_TOLERANCE_PERCENT: u64 = 1;

/// The /proc files of one moment (start or end); None when missing or malformed.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Snapshot {
    pub buddyinfo: Option<Vec<BuddyZone>>,
    pub pagetypeinfo: Option<PagetypeInfo>,
    pub zoneinfo: Option<ZoneInfo>,
    pub slabinfo: Option<Vec<SlabInfoRow>>,
    pub meminfo: Option<Vec<(String, u64)>>,
    pub vmstat: Option<Vec<(String, i64)>>,
}

/// The /proc side of a recording bundle.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Bundle {
    pub start: Snapshot,
    pub end: Snapshot,
    /// In file order (a warning says when that is not time order).
    pub samples: Vec<SampleSnap>,
    /// What was ignored or does not fit, one sentence each, naming the file.
    pub warnings: Vec<String>,
}

/// The /proc files a snapshot holds, by the NAME of `start.NAME.txt`.
pub const SNAPSHOT_FILES: [&str; 6] = ["buddyinfo", "pagetypeinfo", "zoneinfo", "slabinfo", "meminfo", "vmstat"];

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Start(usize),
    End(usize),
    Samples,
}

/// The role of a bundle file name (a path's last component; `.xz`/`.gz` allowed).
fn role(name: &str) -> Option<Role> {
    let base = name.rsplit('/').next().unwrap_or(name);
    let base = base.strip_suffix(".xz").or_else(|| base.strip_suffix(".gz")).unwrap_or(base);
    if base == "samples.txt" {
        return Some(Role::Samples);
    }
    let (when, rest) = base.split_once('.')?;
    let what = rest.strip_suffix(".txt")?;
    let k = SNAPSHOT_FILES.iter().position(|&f| f == what)?;
    match when {
        "start" => Some(Role::Start(k)),
        "end" => Some(Role::End(k)),
        _ => None,
    }
}

/// Seconds with 6 decimals, from ns.
fn secs(ns: u64) -> String {
    format!("{}.{:06}", ns / 1_000_000_000, ns % 1_000_000_000 / 1000)
}

fn list<T: ToString>(v: impl IntoIterator<Item = T>, max: usize) -> String {
    let all: Vec<String> = v.into_iter().map(|x| x.to_string()).collect();
    let mut s = all.iter().take(max).cloned().collect::<Vec<_>>().join(", ");
    if all.len() > max {
        s.push_str(&format!(", ... ({} in all)", all.len()));
    }
    s
}

fn total_pages(nr_free: &[u64]) -> u64 {
    nr_free
        .iter()
        .enumerate()
        .map(|(o, &n)| n.saturating_mul(1u64.checked_shl(o as u32).unwrap_or(0)))
        .fold(0, u64::saturating_add)
}

/// Why buddyinfo and pagetypeinfo of one moment disagree, if they do.
fn buddy_vs_pagetype(b: &[BuddyZone], p: &PagetypeInfo) -> Option<String> {
    let by_zone = p.nr_free_by_zone();
    for z in b {
        let Some(pt) = by_zone.get(&(z.node, z.zone.clone())) else {
            return Some(format!("zone {} is not in pagetypeinfo", z.zone));
        };
        if pt.len() != z.nr_free.len() {
            return Some(format!(
                "zone {}: {} orders in buddyinfo, {} in pagetypeinfo",
                z.zone,
                z.nr_free.len(),
                pt.len()
            ));
        }
        let (tb, tp) = (total_pages(&z.nr_free), total_pages(pt));
        let tol = FREE_TOLERANCE_PAGES.max(tb.max(tp) / 100 * FREE_TOLERANCE_PERCENT);
        if tb.abs_diff(tp) > tol {
            return Some(format!("zone {}: {tb} free pages in buddyinfo, {tp} in pagetypeinfo", z.zone));
        }
    }
    let bz: BTreeSet<(u32, &str)> = b.iter().map(|z| (z.node, z.zone.as_str())).collect();
    if let Some(f) = p.free.iter().find(|f| !bz.contains(&(f.node, f.zone.as_str()))) {
        return Some(format!("zone {} is in pagetypeinfo, not in buddyinfo", f.zone));
    }
    None
}

fn zone_names(b: &[BuddyZone]) -> Vec<(u32, String, usize)> {
    b.iter().map(|z| (z.node, z.zone.clone(), z.nr_free.len())).collect()
}

fn show_zones(v: &[(u32, String, usize)]) -> String {
    list(v.iter().map(|(_, z, _)| z), 8)
}

impl Bundle {
    /// Read a bundle's /proc files from `(file name, text)` pairs: names
    /// `start.NAME.txt`, `end.NAME.txt`, `samples.txt` (a `.xz`/`.gz` suffix
    /// is allowed: the text is already decompressed). Never fails: what
    /// cannot be used is a warning.
    pub fn from_texts(files: &[(String, String)]) -> Bundle {
        let mut b = Bundle::default();
        let mut have: Vec<(usize, String)> = Vec::new(); // role key, name
        let mut samples_name: Option<String> = None;
        for (name, text) in files {
            let Some(r) = role(name) else {
                b.warnings.push(format!("{name}: not a /proc file of a recording bundle; ignored"));
                continue;
            };
            let key = match r {
                Role::Start(k) => k,
                Role::End(k) => 6 + k,
                Role::Samples => 12,
            };
            if let Some((_, first)) = have.iter().find(|(k, _)| *k == key) {
                b.warnings.push(format!("{name}: {first} was read already; ignored"));
                continue;
            }
            have.push((key, name.clone()));
            match r {
                Role::Start(k) => {
                    if let Err(e) = read_snapshot_file(&mut b.start, k, text) {
                        b.warnings.push(format!("{name}: {e}; ignored: the replay starts without it"));
                    }
                }
                Role::End(k) => {
                    if let Err(e) = read_snapshot_file(&mut b.end, k, text) {
                        b.warnings.push(format!("{name}: {e}; ignored: the end state is not compared with it"));
                    }
                }
                Role::Samples => {
                    let (v, e) = parse_samples_partial(text);
                    if let Some(e) = e {
                        let kept = if v.is_empty() {
                            "ignored: the replay is not compared over time".to_string()
                        } else {
                            format!("the {} samples before it are kept, the rest ignored", v.len())
                        };
                        b.warnings.push(format!("{name}: {e}; {kept}"));
                    } else if v.is_empty() {
                        b.warnings.push(format!("{name}: no samples"));
                    }
                    b.samples = v;
                    samples_name = Some(name.clone());
                }
            }
        }
        b.check_consistency(samples_name.as_deref().unwrap_or("samples.txt"));
        b
    }

    fn check_consistency(&mut self, samples_name: &str) {
        let mut w = Vec::new();
        // One moment's own files.
        for (when, s) in [("start", &self.start), ("end", &self.end)] {
            if let (Some(b), Some(p)) = (&s.buddyinfo, &s.pagetypeinfo) {
                if let Some(why) = buddy_vs_pagetype(b, p) {
                    w.push(format!("{when}.buddyinfo.txt and {when}.pagetypeinfo.txt disagree ({why}): not read on the same machine at the same time"));
                }
            }
            if let (Some(b), Some(z)) = (&s.buddyinfo, &s.zoneinfo) {
                let bz: Vec<&str> = b.iter().map(|z| z.zone.as_str()).collect();
                let zz: Vec<&str> = z.zones.iter().filter(|z| z.is_populated()).map(|z| z.name.as_str()).collect();
                if bz != zz {
                    w.push(format!(
                        "{when}.buddyinfo.txt lists zones {} but {when}.zoneinfo.txt's populated zones are {}: not from the same machine",
                        list(&bz, 8),
                        list(&zz, 8)
                    ));
                }
            }
        }
        // Start against end: the same machine, the same boot.
        if let (Some(a), Some(b)) = (&self.start.zoneinfo, &self.end.zoneinfo) {
            let an: Vec<(u32, &str)> = a.zones.iter().map(|z| (z.node, z.name.as_str())).collect();
            let bn: Vec<(u32, &str)> = b.zones.iter().map(|z| (z.node, z.name.as_str())).collect();
            if an != bn {
                w.push(format!(
                    "start.zoneinfo.txt and end.zoneinfo.txt list different zones ({} / {}): not from the same machine",
                    list(an.iter().map(|z| z.1), 8),
                    list(bn.iter().map(|z| z.1), 8)
                ));
            } else {
                for (x, y) in a.zones.iter().zip(&b.zones) {
                    let mut diffs = Vec::new();
                    for (what, u, v) in [
                        ("spanned", x.spanned, y.spanned),
                        ("present", x.present, y.present),
                        ("managed", x.managed, y.managed),
                    ] {
                        if u != v {
                            diffs.push(format!("{what} {u} / {v}"));
                        }
                    }
                    if x.start_pfn != y.start_pfn {
                        diffs.push(format!("start_pfn {:?} / {:?}", x.start_pfn, y.start_pfn));
                    }
                    if !diffs.is_empty() {
                        w.push(format!(
                            "start.zoneinfo.txt and end.zoneinfo.txt: zone {} differs ({}): not from the same machine (or memory was hot-plugged or ballooned during the recording)",
                            x.name,
                            diffs.join(", ")
                        ));
                    }
                }
            }
        }
        if let (Some(a), Some(b)) = (&self.start.pagetypeinfo, &self.end.pagetypeinfo) {
            if a.pageblock_order != b.pageblock_order {
                w.push(format!(
                    "start.pagetypeinfo.txt has page block order {}, end.pagetypeinfo.txt {}: not from the same machine",
                    a.pageblock_order, b.pageblock_order
                ));
            }
        }
        if let (Some(a), Some(b)) = (&self.start.buddyinfo, &self.end.buddyinfo) {
            let (x, y) = (zone_names(a), zone_names(b));
            if x != y {
                w.push(format!(
                    "start.buddyinfo.txt and end.buddyinfo.txt list different zones or orders ({} / {}): not from the same machine",
                    show_zones(&x),
                    show_zones(&y)
                ));
            }
        }
        let total = |m: &Option<Vec<(String, u64)>>| {
            m.as_ref().and_then(|v| v.iter().find(|(k, _)| k == "MemTotal").map(|x| x.1))
        };
        if let (Some(a), Some(b)) = (total(&self.start.meminfo), total(&self.end.meminfo)) {
            if a != b {
                w.push(format!(
                    "start.meminfo.txt has MemTotal {a} kB, end.meminfo.txt {b} kB: not from the same machine (or memory was ballooned)"
                ));
            }
        }
        // The samples: time order, and the same machine as the snapshots.
        if let Some(i) = (1..self.samples.len()).find(|&i| self.samples[i].ts_ns < self.samples[i - 1].ts_ns) {
            w.push(format!(
                "{samples_name}: sample {} (@ {}) is earlier than the one before it (@ {}): the samples are not in time order",
                i + 1,
                secs(self.samples[i].ts_ns),
                secs(self.samples[i - 1].ts_ns)
            ));
        }
        let reference = self.start.buddyinfo.as_ref().or(self.end.buddyinfo.as_ref()).map(|b| zone_names(b));
        if let Some(r) = &reference {
            if let Some((i, s)) =
                self.samples.iter().enumerate().find(|(_, s)| !s.buddyinfo.is_empty() && zone_names(&s.buddyinfo) != *r)
            {
                w.push(format!(
                    "{samples_name}: sample {} (@ {}) lists zones or orders ({}) other than the bundle's buddyinfo ({}): not from the same machine",
                    i + 1,
                    secs(s.ts_ns),
                    show_zones(&zone_names(&s.buddyinfo)),
                    show_zones(r)
                ));
            }
        }
        let order = self.start.pagetypeinfo.as_ref().or(self.end.pagetypeinfo.as_ref()).map(|p| p.pageblock_order);
        if let Some(o) = order {
            if let Some((i, s)) = self
                .samples
                .iter()
                .enumerate()
                .find(|(_, s)| s.pagetypeinfo.as_ref().is_some_and(|p| p.pageblock_order != o))
            {
                w.push(format!(
                    "{samples_name}: sample {} has page block order {}, the bundle's pagetypeinfo {o}: not from the same machine",
                    i + 1,
                    s.pagetypeinfo.as_ref().map_or(0, |p| p.pageblock_order)
                ));
            }
        }
        let bad: Vec<(usize, String)> = self
            .samples
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let p = s.pagetypeinfo.as_ref()?;
                if s.buddyinfo.is_empty() {
                    return None;
                }
                buddy_vs_pagetype(&s.buddyinfo, p).map(|why| (i, why))
            })
            .collect();
        if let Some((i, why)) = bad.first() {
            w.push(format!(
                "{samples_name}: buddyinfo and pagetypeinfo disagree in {} sample(s) (first: sample {}, {why})",
                bad.len(),
                i + 1
            ));
        }
        self.warnings.extend(w);
    }

    /// The zoneinfo the trace is checked against: start's, else end's.
    fn reference_zoneinfo(&self) -> Option<(&'static str, &ZoneInfo)> {
        match (&self.start.zoneinfo, &self.end.zoneinfo) {
            (Some(z), _) => Some(("start.zoneinfo.txt", z)),
            (None, Some(z)) => Some(("end.zoneinfo.txt", z)),
            _ => None,
        }
    }

    /// Whether `log` fits this bundle: its page events' pfns inside the
    /// zones of start.zoneinfo, its CPUs among zoneinfo's pagesets, its
    /// timestamps overlapping the samples'. One warning per misfit, naming
    /// the bundle's file.
    pub fn check_trace(&self, log: &TraceLog) -> Vec<String> {
        let mut w = Vec::new();
        if let Some((fname, zi)) = self.reference_zoneinfo() {
            let mut ranges: Vec<(u64, u64, &str)> = zi
                .zones
                .iter()
                .filter(|z| z.is_populated())
                .filter_map(|z| z.start_pfn.map(|s| (s, s.saturating_add(z.spanned), z.name.as_str())))
                .collect();
            ranges.sort_unstable();
            // Inside some zone: the last zone starting at or before pfn, or
            // any earlier one (zones may overlap in a hostile file) reaching it.
            let max_end: Vec<u64> = ranges
                .iter()
                .scan(0u64, |m, r| {
                    *m = (*m).max(r.1);
                    Some(*m)
                })
                .collect();
            let inside = |pfn: u64| {
                let k = ranges.partition_point(|r| r.0 <= pfn);
                k > 0 && pfn < max_end[k - 1]
            };
            if !ranges.is_empty() {
                let mut outside = 0u64;
                let mut first: Option<(usize, u64)> = None;
                for (i, r) in log.events.iter().enumerate() {
                    let page = matches!(
                        r.kind,
                        Kind::MmPageAlloc
                            | Kind::MmPageFree
                            | Kind::MmPageFreeBatched
                            | Kind::MmPageAllocZoneLocked
                            | Kind::MmPagePcpuDrain
                    );
                    if !page || r.flags & F_FAILED != 0 {
                        continue;
                    }
                    if !inside(r.ptr) {
                        outside += 1;
                        first.get_or_insert((i, r.ptr));
                    }
                }
                if let Some((i, pfn)) = first {
                    let zones =
                        list(ranges.iter().map(|(s, e, n)| format!("{n} {s:#x}-{:#x}", e.saturating_sub(1))), 6);
                    w.push(format!(
                        "{fname}: {outside} page event(s) of the trace have pfns outside every zone (first: event {i}, pfn {pfn:#x}; zones {zones}): the trace is from another machine than the bundle's /proc files"
                    ));
                }
            }
            let cpus: BTreeSet<u32> = zi.zones.iter().flat_map(|z| z.pagesets.iter().map(|p| p.cpu)).collect();
            if !cpus.is_empty() {
                let traced: BTreeSet<u32> = log.events.iter().map(|r| r.cpu).collect();
                let missing: Vec<u32> = traced.difference(&cpus).copied().collect();
                if !missing.is_empty() {
                    w.push(format!(
                        "{fname}: the trace has events on CPU(s) {} that its pagesets do not list (CPUs {}): the trace is from another machine than the bundle's /proc files",
                        list(&missing, 8),
                        list(&cpus, 16)
                    ));
                }
            }
        }
        if !self.samples.is_empty() && !log.events.is_empty() {
            let (t0, t1) = log.events.iter().fold((u64::MAX, 0), |(a, b), r| (a.min(r.ts_ns), b.max(r.ts_ns)));
            let (s0, s1) = self.samples.iter().fold((u64::MAX, 0), |(a, b), s| (a.min(s.ts_ns), b.max(s.ts_ns)));
            if s1 < t0 || t1 < s0 {
                w.push(format!(
                    "samples.txt: the samples cover {}-{} s, the trace {}-{} s: they were not taken during this trace (another recording, or perf record without -k CLOCK_MONOTONIC)",
                    secs(s0),
                    secs(s1),
                    secs(t0),
                    secs(t1)
                ));
            }
        }
        w
    }
}

/// Parse one snapshot file (index into `SNAPSHOT_FILES`) into its slot.
fn read_snapshot_file(s: &mut Snapshot, k: usize, text: &str) -> Result<(), super::procfs::ProcError> {
    match k {
        0 => s.buddyinfo = Some(parse_buddyinfo(text)?),
        1 => s.pagetypeinfo = Some(parse_pagetypeinfo(text)?),
        2 => s.zoneinfo = Some(parse_zoneinfo(text)?),
        3 => s.slabinfo = Some(parse_slabinfo(text)?),
        4 => s.meminfo = Some(parse_meminfo(text)?),
        _ => s.vmstat = Some(parse_vmstat(text)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::perf_script::parse_str;

    fn warm2(name: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python/kmm/data/warm2").join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn all_files() -> Vec<(String, String)> {
        let mut v = Vec::new();
        for when in ["start", "end"] {
            for f in SNAPSHOT_FILES {
                let n = format!("{when}.{f}.txt");
                v.push((n.clone(), warm2(&n)));
            }
        }
        v.push(("samples.txt".into(), warm2("samples.txt")));
        v
    }

    #[test]
    fn the_warm2_bundle_reads_without_warnings() {
        let b = Bundle::from_texts(&all_files());
        assert_eq!(b.warnings, Vec::<String>::new());
        assert_eq!(b.samples.len(), 108);
        assert_eq!(b.start.zoneinfo.as_ref().unwrap().zones[2].managed, 2064384);
        assert_eq!(b.end.slabinfo.as_ref().unwrap().len(), 235);
        assert!(b.start.meminfo.is_some() && b.end.vmstat.is_some() && b.end.pagetypeinfo.is_some());
    }

    #[test]
    fn a_malformed_file_is_a_warning_and_missing() {
        let mut f = all_files();
        assert_eq!(f[2].0, "start.zoneinfo.txt");
        let z = &mut f[2].1;
        *z = z.replacen("        present  3998", "        present  39x8", 1);
        f.push(("start.zoneinfo.txt.xz".into(), String::new()));
        f.push(("perf.data".into(), String::new()));
        let b = Bundle::from_texts(&f);
        assert!(b.start.zoneinfo.is_none());
        assert_eq!(b.warnings.len(), 3, "{:?}", b.warnings);
        assert!(b.warnings[0].starts_with("start.zoneinfo.txt: line 61: '39x8' is not a number"), "{}", b.warnings[0]);
        assert!(b.warnings[0].ends_with("; ignored: the replay starts without it"));
        assert!(b.warnings[1].starts_with("start.zoneinfo.txt.xz: start.zoneinfo.txt was read already"));
        assert!(b.warnings[2].starts_with("perf.data: not a /proc file"));
    }

    #[test]
    fn a_truncated_samples_file_keeps_its_good_samples() {
        let s = warm2("samples.txt");
        let cut = &s[..s.len() - 1000];
        let b = Bundle::from_texts(&[("samples.txt.gz".into(), cut.to_string())]);
        assert_eq!(b.samples.len(), 107);
        assert_eq!(b.warnings.len(), 1);
        assert!(b.warnings[0].contains("the 107 samples before it are kept"), "{}", b.warnings[0]);
    }

    #[test]
    fn mismatched_machines_are_warned_about() {
        // end.* from kmm's own 2G machine instead of the real 24G one.
        let m =
            crate::machine::Machine::new(crate::machine::MachineConfig::default().with_memory("2G").unwrap()).unwrap();
        let mut f = all_files();
        for (n, t) in f.iter_mut() {
            match n.as_str() {
                "end.zoneinfo.txt" => *t = m.proc_zoneinfo(),
                "end.meminfo.txt" => *t = m.proc_meminfo(),
                "end.buddyinfo.txt" => *t = m.proc_buddyinfo(),
                _ => {}
            }
        }
        let b = Bundle::from_texts(&f);
        let w = b.warnings.join("\n");
        assert!(w.contains("end.buddyinfo.txt and end.pagetypeinfo.txt disagree"), "{w}");
        assert!(w.contains("zone DMA32 differs (spanned 1044480 / "), "{w}");
        assert!(w.contains("start.meminfo.txt has MemTotal 24683784 kB, end.meminfo.txt "), "{w}");
        assert!(w.contains("start.buddyinfo.txt and end.buddyinfo.txt list different zones or orders (DMA, DMA32, Normal / DMA, DMA32)"), "{w}");
        // A page block order of another machine, and samples out of order.
        let mut f = all_files();
        f[7].1 = f[7].1.replacen(
            "Page block order: 9\nPages per block:  512",
            "Page block order: 10\nPages per block:  1024",
            1,
        );
        assert_eq!(f[7].0, "end.pagetypeinfo.txt");
        let s = &mut f[12].1;
        *s = s.replacen("@ 1188.191175", "@ 1180.000000", 1);
        let b = Bundle::from_texts(&f);
        let w = b.warnings.join("\n");
        assert!(w.contains("start.pagetypeinfo.txt has page block order 9, end.pagetypeinfo.txt 10"), "{w}");
        assert!(
            w.contains("samples.txt: sample 2 (@ 1180.000000) is earlier than the one before it (@ 1188.079149)"),
            "{w}"
        );
    }

    #[test]
    fn buddyinfo_against_pagetypeinfo() {
        let b = warm2("start.buddyinfo.txt");
        // A zone with 30362 order-0 blocks more in buddyinfo than pagetypeinfo has.
        let b2 = b.replacen("Normal  30362", "Normal  60724", 1);
        let f = vec![
            ("start.buddyinfo.txt".to_string(), b2),
            ("start.pagetypeinfo.txt".into(), warm2("start.pagetypeinfo.txt")),
        ];
        let w = Bundle::from_texts(&f).warnings;
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("zone Normal: 1182732 free pages in buddyinfo, 1152370 in pagetypeinfo"), "{}", w[0]);
        // A small difference (two reads a moment apart) is not a warning.
        let b3 = b.replacen("Normal  30362", "Normal  30462", 1);
        let f = vec![
            ("start.buddyinfo.txt".to_string(), b3),
            ("start.pagetypeinfo.txt".into(), warm2("start.pagetypeinfo.txt")),
        ];
        assert!(Bundle::from_texts(&f).warnings.is_empty());
    }

    #[test]
    fn check_trace_pfns_cpus_and_time() {
        let b = Bundle::from_texts(&all_files());
        // Lines in warm2's perf script format: one fits, then a pfn beyond
        // Normal's end (0x640000), a CPU the machine lacks, all at warm2's time.
        let ok = "python 1 [001]  1190.000000: kmem:mm_page_alloc: page=0x100000 pfn=0x100000 order=0 migratetype=0 gfp_flags=GFP_KERNEL\n";
        assert_eq!(b.check_trace(&parse_str(ok, false).unwrap()), Vec::<String>::new());
        let bad = format!("{ok}python 1 [003]  1190.000001: kmem:mm_page_free: page=0x7000000 pfn=0x7000000 order=0\n");
        let w = b.check_trace(&parse_str(&bad, false).unwrap());
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("start.zoneinfo.txt: 1 page event(s) of the trace have pfns outside every zone (first: event 1, pfn 0x7000000; zones DMA 0x1-0xfff, DMA32 0x1000-0xfffff, Normal 0x100000-0x63ffff)"), "{}", w[0]);
        assert!(w[1].contains("events on CPU(s) 3 that its pagesets do not list (CPUs 0, 1)"), "{}", w[1]);
        let later = ok.replace("1190.000000", "2500.5");
        let w = b.check_trace(&parse_str(&later, false).unwrap());
        assert_eq!(w, vec!["samples.txt: the samples cover 1188.079149-1200.979358 s, the trace 2500.500000-2500.500000 s: they were not taken during this trace (another recording, or perf record without -k CLOCK_MONOTONIC)".to_string()]);
        // Without zoneinfo or samples there is nothing to check against.
        assert!(Bundle::default().check_trace(&parse_str(&bad, false).unwrap()).is_empty());
    }

    #[test]
    fn many_zones_read_in_linear_time() {
        // bundle-1 against a hostile file: 40,000 zones in buddyinfo and
        // pagetypeinfo (a pairwise comparison would be 1.6e9 steps).
        let n = 40_000;
        let mut b = String::new();
        let mut p = String::from(
            "Page block order: 9\nPages per block:  512\n\nFree pages count per migrate type at order 0 1\n",
        );
        for i in 0..n {
            b.push_str(&format!("Node 0, zone z{i} 1 1\n"));
            p.push_str(&format!("Node 0, zone z{i}, type Movable 1 1\n"));
        }
        let f = vec![("start.buddyinfo.txt".to_string(), b), ("start.pagetypeinfo.txt".to_string(), p)];
        let bundle = Bundle::from_texts(&f);
        assert_eq!(bundle.warnings, Vec::<String>::new());
        assert_eq!(bundle.start.buddyinfo.as_ref().unwrap().len(), n);
    }
}
