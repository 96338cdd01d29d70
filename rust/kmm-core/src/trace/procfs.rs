//! Readers for the kernel's /proc text of a recording bundle (DESIGN.md §9):
//! `/proc/buddyinfo`, `/proc/pagetypeinfo`, `/proc/zoneinfo`,
//! `/proc/slabinfo`, `/proc/meminfo`, `/proc/vmstat`, and the bundle's
//! `samples.txt` (timestamped buddyinfo + pagetypeinfo + vmstat lines).
//! The inverse of `proc.rs`'s renderers, for files captured on a real machine.
//!
//! # Kernel
//! The formats are the `seq_printf` strings of `mm/vmstat.c`
//! (`frag_show_print`: `"Node %d, zone %8s "` then `"%6lu "` per order;
//! `pagetypeinfo_show`: `"Page block order: %d"`, `"Pages per block:  %lu"`;
//! `pagetypeinfo_showfree_print`: `"Node %4d, zone %8s, type %12s "` then
//! `"%s%6lu "` with `">"` when a list holds 100000 or more;
//! `pagetypeinfo_showblockcount_print`: `"Number of blocks type "` and
//! `"%12lu "`; `pagetypeinfo_showmixedcount` (CONFIG_PAGE_OWNER);
//! `zoneinfo_show_print`; `vmstat_show`: `"%s %lu"`), `mm/slab_common.c`
//! (`print_slabinfo_header`, `cache_show`) and `fs/proc/meminfo.c`
//! (`show_val_kb`: `"%s:%8lu kB"`; `hugetlb_report_meminfo`: counts).
//!
//! # Tolerance
//! Files from 6.x kernels are the reference (`python/kmm/data/warm2/`,
//! `tests/data/linux/`); older and newer kernels differ in items, not in
//! shape. So: items a reader does not know are kept (zoneinfo stats and
//! per-node stats, vmstat, meminfo) or skipped (zoneinfo lines of another
//! shape, pagetypeinfo sections after the block counts); items that a
//! kernel may lack are `None` (`promo`, `cma`, `high_min`, ...). A line
//! that has the shape of the format but is broken (a count that is not a
//! number, a `protection:` without its parentheses, a zone header without
//! its zone, a missing `managed` line) is a [`ProcError`] with its 1-based
//! line number.
//!
//! SIMPLIFICATION: pagetypeinfo's capped counts (`>100000`) read as 100000.
//! SIMPLIFICATION: with several NUMA nodes, [`ZoneInfo::node_stats`] holds
//! the first node's per-node stats only.
//!
//! # Invariants
//! - procfs-1: no input makes a reader panic (proptest over arbitrary text).
//! - procfs-2: for kmm's own renderers, parse(render(m)) gives m's values.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;

/// A malformed line of a /proc file.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcError {
    /// 1-based line number.
    pub line: u64,
    pub message: String,
}

impl fmt::Display for ProcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ProcError {}

fn err<T>(line: u64, message: impl Into<String>) -> Result<T, ProcError> {
    Err(ProcError { line, message: message.into() })
}

/// A line with its 1-based number.
type Line<'a> = (u64, &'a str);

fn numbered(text: &str) -> Vec<Line<'_>> {
    text.lines().enumerate().map(|(i, l)| (i as u64 + 1, l)).collect()
}

/// A token, shortened for a message (a hostile line may be long).
fn show(tok: &str) -> String {
    let mut s: String = tok.chars().take(40).collect();
    if s.len() < tok.len() {
        s.push_str("...");
    }
    s
}

fn parse_u64(tok: &str, line: u64, what: &str) -> Result<u64, ProcError> {
    match tok.parse::<u64>() {
        Ok(v) if tok.bytes().all(|b| b.is_ascii_digit()) => Ok(v),
        _ => err(line, format!("'{}' is not a number ({what})", show(tok))),
    }
}

fn parse_u32(tok: &str, line: u64, what: &str) -> Result<u32, ProcError> {
    let v = parse_u64(tok, line, what)?;
    u32::try_from(v).or_else(|_| err(line, format!("{what} {v} is too large")))
}

/// A counter printed with `%lu`/`%ld`: a negative (transiently negative
/// per-CPU-summed item) or an unsigned value that wrapped, read as the
/// kernel's `long`.
fn parse_counter(tok: &str, line: u64, what: &str) -> Result<i64, ProcError> {
    if let Some(rest) = tok.strip_prefix('-') {
        if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(v) = tok.parse::<i64>() {
                return Ok(v);
            }
        }
        return err(line, format!("'{}' is not a number ({what})", show(tok)));
    }
    // Wrapping on purpose: `%lu` of a negative long.
    parse_u64(tok, line, what).map(|v| v as i64)
}

fn is_item_name(tok: &str) -> bool {
    !tok.is_empty() && tok.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

// ---- buddyinfo -------------------------------------------------------------------

/// One line of /proc/buddyinfo: free blocks per order of one zone.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct BuddyZone {
    pub node: u32,
    pub zone: String,
    /// Free blocks of each order, from order 0.
    pub nr_free: Vec<u64>,
}

/// A parsed `Node N, zone NAME[,] rest...`: the node, the zone name,
/// whether a comma followed it, and the other tokens.
type NodeZone<'a> = (u32, &'a str, bool, Vec<&'a str>);

/// `Node N, zone NAME[,] rest...`. `Ok(None)` when the line does not start with `Node`.
fn node_zone(l: &str, line: u64) -> Result<Option<NodeZone<'_>>, ProcError> {
    let mut t = l.split_whitespace();
    if t.next() != Some("Node") {
        return Ok(None);
    }
    let node_tok = t.next().unwrap_or("");
    let Some(node_num) = node_tok.strip_suffix(',') else {
        return err(line, format!("expected 'Node N, zone NAME', found '{}'", show(l.trim())));
    };
    let node = parse_u32(node_num, line, "node id")?;
    if t.next() != Some("zone") {
        return err(line, format!("expected 'zone' after 'Node {node},' in '{}'", show(l.trim())));
    }
    let Some(name_tok) = t.next() else {
        return err(line, "a zone header without its zone name");
    };
    let (name, comma) = match name_tok.strip_suffix(',') {
        Some(n) => (n, true),
        None => (name_tok, false),
    };
    if name.is_empty() {
        return err(line, "a zone header without its zone name");
    }
    Ok(Some((node, name, comma, t.collect())))
}

fn buddy_line(l: &str, line: u64) -> Result<BuddyZone, ProcError> {
    let Some((node, zone, comma, rest)) = node_zone(l, line)? else {
        return err(
            line,
            format!("expected 'Node N, zone NAME' and free blocks per order, found '{}'", show(l.trim())),
        );
    };
    if comma {
        return err(line, "buddyinfo has no ', type' after the zone (is this pagetypeinfo?)");
    }
    if rest.is_empty() {
        return err(line, format!("zone {zone} has no free-block counts"));
    }
    let nr_free = rest.iter().map(|t| parse_u64(t, line, "free blocks")).collect::<Result<_, _>>()?;
    Ok(BuddyZone { node, zone: zone.to_string(), nr_free })
}

fn buddyinfo_lines(lines: &[Line<'_>]) -> Result<Vec<BuddyZone>, ProcError> {
    let mut out = Vec::new();
    for &(n, l) in lines {
        if l.trim().is_empty() {
            continue;
        }
        out.push(buddy_line(l, n)?);
    }
    Ok(out)
}

/// /proc/buddyinfo (`frag_show_print`): one line per populated zone.
pub fn parse_buddyinfo(text: &str) -> Result<Vec<BuddyZone>, ProcError> {
    let v = buddyinfo_lines(&numbered(text))?;
    if v.is_empty() {
        return err(1, "no 'Node N, zone NAME' line: not a buddyinfo file");
    }
    Ok(v)
}

// ---- pagetypeinfo ----------------------------------------------------------------

/// /proc/pagetypeinfo.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PagetypeInfo {
    pub pageblock_order: u32,
    pub pages_per_block: u64,
    /// One per "Node N, zone Z, type T" line.
    pub free: Vec<PagetypeFree>,
    /// The header of "Number of blocks type": Unmovable Movable Reclaimable HighAtomic [CMA] Isolate.
    pub block_types: Vec<String>,
    pub blocks: Vec<PagetypeBlocks>,
}

/// Free blocks per order of one migratetype of one zone.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PagetypeFree {
    pub node: u32,
    pub zone: String,
    pub migratetype: String,
    /// Per order; a capped count (`>100000`) reads as 100000.
    pub nr_free: Vec<u64>,
}

/// Pageblocks of each type in one zone.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PagetypeBlocks {
    pub node: u32,
    pub zone: String,
    /// In `block_types` order.
    pub counts: Vec<u64>,
}

impl PagetypeInfo {
    /// Free blocks per order of a zone, summed over migratetypes (what
    /// buddyinfo shows for it, proc-1), or None if the zone is not listed.
    pub fn zone_nr_free(&self, node: u32, zone: &str) -> Option<Vec<u64>> {
        self.nr_free_by_zone().remove(&(node, zone.to_string()))
    }

    /// [`Self::zone_nr_free`] of every zone listed, in one pass.
    pub fn nr_free_by_zone(&self) -> BTreeMap<(u32, String), Vec<u64>> {
        let mut m: BTreeMap<(u32, String), Vec<u64>> = BTreeMap::new();
        for f in &self.free {
            let s = m.entry((f.node, f.zone.clone())).or_default();
            if s.len() < f.nr_free.len() {
                s.resize(f.nr_free.len(), 0);
            }
            for (a, b) in s.iter_mut().zip(&f.nr_free) {
                *a = a.saturating_add(*b);
            }
        }
        m
    }
}

#[derive(Clone, Copy, PartialEq)]
enum PtSection {
    Head,
    Free,
    Blocks,
    /// "Number of mixed blocks" (CONFIG_PAGE_OWNER) or a section kmm does not know: skipped.
    Other,
}

/// One "Node N, zone Z, type T counts" line.
fn pagetype_free_line(l: &str, line: u64, orders: Option<usize>) -> Result<PagetypeFree, ProcError> {
    let Some((node, zone, comma, rest)) = node_zone(l, line)? else {
        return err(line, format!("expected 'Node N, zone NAME, type TYPE' and counts, found '{}'", show(l.trim())));
    };
    if !comma || rest.first() != Some(&"type") || rest.len() < 2 {
        return err(line, format!("expected ', type TYPE' after zone {zone}"));
    }
    let migratetype = rest[1].to_string();
    let counts = &rest[2..];
    if counts.is_empty() {
        return err(line, format!("zone {zone}, type {migratetype} has no counts"));
    }
    if let Some(n) = orders {
        if counts.len() != n {
            return err(line, format!("{} counts, but the header lists {n} orders", counts.len()));
        }
    }
    let nr_free = counts
        .iter()
        .map(|t| parse_u64(t.strip_prefix('>').unwrap_or(t), line, "free blocks"))
        .collect::<Result<_, _>>()?;
    Ok(PagetypeFree { node, zone: zone.to_string(), migratetype, nr_free })
}

fn pagetypeinfo_lines(lines: &[Line<'_>]) -> Result<PagetypeInfo, ProcError> {
    let mut p = PagetypeInfo::default();
    let mut sec = PtSection::Head;
    let (mut have_order, mut have_ppb) = (false, false);
    let mut orders: Option<usize> = None;
    let first = lines.first().map_or(1, |l| l.0);
    for &(n, l) in lines {
        let t = l.trim();
        if t.is_empty() {
            continue;
        }
        if let Some(v) = t.strip_prefix("Page block order:") {
            if have_order {
                return err(n, "a second 'Page block order' line");
            }
            p.pageblock_order = parse_u32(v.trim(), n, "page block order")?;
            if p.pageblock_order >= 64 {
                return err(n, format!("page block order {} is out of range", p.pageblock_order));
            }
            have_order = true;
            continue;
        }
        if let Some(v) = t.strip_prefix("Pages per block:") {
            p.pages_per_block = parse_u64(v.trim(), n, "pages per block")?;
            have_ppb = true;
            continue;
        }
        if !have_order {
            return err(n, format!("expected 'Page block order: N' first, found '{}'", show(t)));
        }
        if let Some(rest) = t.strip_prefix("Free pages count per migrate type at order") {
            let v: Vec<u64> = rest.split_whitespace().map(|x| parse_u64(x, n, "order")).collect::<Result<_, _>>()?;
            if v.is_empty() || v.iter().enumerate().any(|(i, &o)| o != i as u64) {
                return err(n, "the orders of the free-pages header are not 0, 1, 2, ...");
            }
            orders = Some(v.len());
            sec = PtSection::Free;
            continue;
        }
        if let Some(rest) = t.strip_prefix("Number of blocks type") {
            if !p.block_types.is_empty() {
                return err(n, "a second 'Number of blocks type' header");
            }
            p.block_types = rest.split_whitespace().map(str::to_string).collect();
            if p.block_types.is_empty() {
                return err(n, "'Number of blocks type' lists no types");
            }
            sec = PtSection::Blocks;
            continue;
        }
        if t.starts_with("Node") {
            match sec {
                PtSection::Free => p.free.push(pagetype_free_line(l, n, orders)?),
                PtSection::Blocks => {
                    let Some((node, zone, comma, rest)) = node_zone(l, n)? else {
                        return err(n, format!("expected 'Node N, zone NAME' and block counts, found '{}'", show(t)));
                    };
                    if comma {
                        return err(n, format!("a block-count line has ', type' after zone {zone}"));
                    }
                    if rest.len() != p.block_types.len() {
                        return err(
                            n,
                            format!("{} block counts, but the header lists {} types", rest.len(), p.block_types.len()),
                        );
                    }
                    let counts = rest.iter().map(|x| parse_u64(x, n, "pageblocks")).collect::<Result<_, _>>()?;
                    p.blocks.push(PagetypeBlocks { node, zone: zone.to_string(), counts });
                }
                PtSection::Other => {}
                PtSection::Head => return err(n, "a zone line before the 'Free pages count per migrate type' header"),
            }
            continue;
        }
        // A section this reader does not know ("Number of mixed blocks type",
        // vmstat.c pagetypeinfo_showmixedcount with page_owner): skip it. Any
        // other line is malformed (skipping it would drop the rows after it).
        if !t.starts_with("Number of") {
            return err(n, format!("expected 'Node N, zone NAME, ...' or a 'Number of ...' header, found '{}'", show(t)));
        }
        sec = PtSection::Other;
    }
    if !have_order {
        return err(first, "no 'Page block order: N' line: not a pagetypeinfo file");
    }
    if !have_ppb {
        return err(first, "no 'Pages per block: N' line");
    }
    if p.pages_per_block != 1u64 << p.pageblock_order {
        return err(
            first + 1,
            format!("pages per block {} is not 2^{} (page block order)", p.pages_per_block, p.pageblock_order),
        );
    }
    Ok(p)
}

/// /proc/pagetypeinfo (`pagetypeinfo_show`).
pub fn parse_pagetypeinfo(text: &str) -> Result<PagetypeInfo, ProcError> {
    pagetypeinfo_lines(&numbered(text))
}

// ---- zoneinfo --------------------------------------------------------------------

/// One CPU's per-CPU pageset of a zone.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Pageset {
    pub cpu: u32,
    pub count: u64,
    pub high: u64,
    pub batch: u64,
    /// 6.7+.
    pub high_min: Option<u64>,
    pub high_max: Option<u64>,
    /// `vm stats threshold` (CONFIG_SMP), printed after each CPU's pageset.
    pub vm_stats_threshold: Option<u64>,
}

/// One zone of /proc/zoneinfo.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ZoneInfoZone {
    pub node: u32,
    pub name: String,
    pub free: u64,
    /// 5.0+; 0 when absent.
    pub boost: u64,
    pub min: u64,
    pub low: u64,
    pub high: u64,
    /// 6.0+ (memory tiering).
    pub promo: Option<u64>,
    pub spanned: u64,
    pub present: u64,
    pub managed: u64,
    pub cma: Option<u64>,
    /// `lowmem_reserve[]`, one per zone index.
    pub protection: Vec<u64>,
    /// The zone's "nr_free_pages 3840"-style items, in file order.
    pub stats: Vec<(String, i64)>,
    pub pagesets: Vec<Pageset>,
    /// Absent for unpopulated zones.
    pub start_pfn: Option<u64>,
    pub node_unreclaimable: Option<u64>,
}

impl ZoneInfoZone {
    pub fn is_populated(&self) -> bool {
        self.present > 0
    }
    /// One of the zone's stats by name.
    pub fn stat(&self, name: &str) -> Option<i64> {
        self.stats.iter().find(|(k, _)| k == name).map(|&(_, v)| v)
    }
}

/// /proc/zoneinfo: the per-node stats and every zone (unpopulated ones included).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ZoneInfo {
    pub node_stats: Vec<(String, i64)>,
    pub zones: Vec<ZoneInfoZone>,
}

#[derive(Clone, Copy, PartialEq)]
enum ZiSection {
    NodeStats,
    Zone,
    Pagesets,
}

/// The fields of a zone seen so far (for "missing" and "twice" checks).
#[derive(Default)]
struct ZoneSeen {
    header_line: u64,
    free: bool,
    min: bool,
    low: bool,
    high: bool,
    spanned: bool,
    present: bool,
    managed: bool,
}

fn finish_zone(z: &ZoneInfoZone, seen: &ZoneSeen, ps_line: u64, ps_seen: (bool, bool, bool)) -> Result<(), ProcError> {
    for (ok, what) in [
        (seen.free, "pages free"),
        (seen.min, "min"),
        (seen.low, "low"),
        (seen.high, "high"),
        (seen.spanned, "spanned"),
        (seen.present, "present"),
        (seen.managed, "managed"),
    ] {
        if !ok {
            return err(seen.header_line, format!("zone {} has no '{what}' line", z.name));
        }
    }
    check_pageset(z, ps_line, ps_seen)
}

fn check_pageset(z: &ZoneInfoZone, ps_line: u64, (count, high, batch): (bool, bool, bool)) -> Result<(), ProcError> {
    if let Some(p) = z.pagesets.last() {
        for (ok, what) in [(count, "count"), (high, "high"), (batch, "batch")] {
            if !ok {
                return err(ps_line, format!("zone {} cpu {} pageset has no '{what}:' line", z.name, p.cpu));
            }
        }
    }
    Ok(())
}

fn zoneinfo_lines(lines: &[Line<'_>]) -> Result<ZoneInfo, ProcError> {
    let mut zi = ZoneInfo::default();
    let mut cur: Option<(ZoneInfoZone, ZoneSeen)> = None;
    let mut sec = ZiSection::Zone;
    let mut node_stats_node: Option<u32> = None;
    // The current pageset's header line and which of count/high/batch it had.
    let mut ps_line = 0u64;
    let mut ps_seen = (false, false, false);
    let first = lines.first().map_or(1, |l| l.0);
    for &(n, l) in lines {
        let t = l.trim();
        if t.is_empty() {
            continue;
        }
        if let Some((node, name, comma, rest)) = node_zone(l, n)? {
            if comma || !rest.is_empty() {
                return err(n, format!("a zoneinfo zone header is 'Node N, zone NAME' alone, found '{}'", show(t)));
            }
            if let Some((z, seen)) = cur.take() {
                finish_zone(&z, &seen, ps_line, ps_seen)?;
                zi.zones.push(z);
            }
            let z = ZoneInfoZone { node, name: name.to_string(), ..Default::default() };
            cur = Some((z, ZoneSeen { header_line: n, ..Default::default() }));
            sec = ZiSection::Zone;
            ps_seen = (false, false, false);
            continue;
        }
        let Some((z, seen)) = cur.as_mut() else {
            return err(n, format!("expected 'Node N, zone NAME' first, found '{}'", show(t)));
        };
        if t == "per-node stats" {
            sec = ZiSection::NodeStats;
            continue;
        }
        if t == "pagesets" {
            sec = ZiSection::Pagesets;
            continue;
        }
        if let Some(v) = t.strip_prefix("pages free") {
            if seen.free {
                return err(n, format!("zone {}: a second 'pages free' line", z.name));
            }
            z.free = parse_u64(v.trim(), n, "pages free")?;
            seen.free = true;
            sec = ZiSection::Zone;
            continue;
        }
        if let Some(v) = t.strip_prefix("protection:") {
            let v = v.trim();
            let Some(inner) = v.strip_prefix('(').and_then(|v| v.strip_suffix(')')) else {
                return err(n, format!("expected 'protection: (n, n, ...)', found '{}'", show(v)));
            };
            z.protection = inner.split(',').map(|x| parse_u64(x.trim(), n, "protection")).collect::<Result<_, _>>()?;
            continue;
        }
        if let Some(v) = t.strip_prefix("cpu:") {
            if sec != ZiSection::Pagesets {
                return err(n, "a 'cpu:' line outside 'pagesets'");
            }
            check_pageset(z, ps_line, ps_seen)?;
            let cpu = parse_u32(v.trim(), n, "cpu")?;
            z.pagesets.push(Pageset { cpu, ..Default::default() });
            ps_line = n;
            ps_seen = (false, false, false);
            continue;
        }
        // "key: value" (pagesets, node_unreclaimable, start_pfn) or "key value".
        let (key, val, colon) = match t.split_once(':') {
            Some((k, v)) => (k.trim(), v.trim(), true),
            None => {
                let mut it = t.split_whitespace();
                let k = it.next().unwrap_or("");
                let v = it.next().unwrap_or("");
                if it.next().is_some() || v.is_empty() || !is_item_name(k) {
                    continue; // another shape: a line this reader does not know
                }
                (k, v, false)
            }
        };
        if colon {
            match key {
                "node_unreclaimable" => z.node_unreclaimable = Some(parse_u64(val, n, key)?),
                "start_pfn" => z.start_pfn = Some(parse_u64(val, n, key)?),
                "vm stats threshold" => {
                    let v = parse_u64(val, n, key)?;
                    match z.pagesets.last_mut() {
                        Some(p) => p.vm_stats_threshold = Some(v),
                        None => return err(n, "'vm stats threshold' before any 'cpu:' line"),
                    }
                }
                "count" | "high" | "batch" | "high_min" | "high_max" if sec == ZiSection::Pagesets => {
                    let v = parse_u64(val, n, key)?;
                    let Some(p) = z.pagesets.last_mut() else {
                        return err(n, format!("'{key}:' before any 'cpu:' line"));
                    };
                    match key {
                        "count" => (p.count, ps_seen.0) = (v, true),
                        "high" => (p.high, ps_seen.1) = (v, true),
                        "batch" => (p.batch, ps_seen.2) = (v, true),
                        "high_min" => p.high_min = Some(v),
                        _ => p.high_max = Some(v),
                    }
                }
                _ => {} // another "key: value" line (all_unreclaimable, inactive_ratio, ...)
            }
            continue;
        }
        match sec {
            ZiSection::NodeStats => {
                let v = parse_counter(val, n, key)?;
                if node_stats_node.is_none_or(|nd| nd == z.node) {
                    node_stats_node = Some(z.node);
                    zi.node_stats.push((key.to_string(), v));
                }
            }
            ZiSection::Zone | ZiSection::Pagesets => {
                let slot: Option<(&mut u64, Option<&mut bool>)> = match key {
                    "boost" => Some((&mut z.boost, None)),
                    "min" => Some((&mut z.min, Some(&mut seen.min))),
                    "low" => Some((&mut z.low, Some(&mut seen.low))),
                    "high" => Some((&mut z.high, Some(&mut seen.high))),
                    "spanned" => Some((&mut z.spanned, Some(&mut seen.spanned))),
                    "present" => Some((&mut z.present, Some(&mut seen.present))),
                    "managed" => Some((&mut z.managed, Some(&mut seen.managed))),
                    _ => None,
                };
                if let Some((field, seen_flag)) = slot {
                    let v = parse_u64(val, n, key)?;
                    if let Some(s) = seen_flag {
                        if *s {
                            return err(n, format!("zone {}: a second '{key}' line", z.name));
                        }
                        *s = true;
                    }
                    *field = v;
                    continue;
                }
                match key {
                    "promo" => z.promo = Some(parse_u64(val, n, key)?),
                    "cma" => z.cma = Some(parse_u64(val, n, key)?),
                    _ => z.stats.push((key.to_string(), parse_counter(val, n, key)?)),
                }
            }
        }
    }
    match cur {
        Some((z, seen)) => {
            finish_zone(&z, &seen, ps_line, ps_seen)?;
            zi.zones.push(z);
        }
        None => return err(first, "no 'Node N, zone NAME' line: not a zoneinfo file"),
    }
    Ok(zi)
}

/// /proc/zoneinfo (`zoneinfo_show_print` for every zone).
pub fn parse_zoneinfo(text: &str) -> Result<ZoneInfo, ProcError> {
    zoneinfo_lines(&numbered(text))
}

// ---- slabinfo --------------------------------------------------------------------

/// One line of /proc/slabinfo (version 2.1).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct SlabInfoRow {
    pub name: String,
    pub active_objs: u64,
    pub num_objs: u64,
    pub objsize: u64,
    pub objperslab: u64,
    pub pagesperslab: u64,
    pub limit: u64,
    pub batchcount: u64,
    pub sharedfactor: u64,
    pub active_slabs: u64,
    pub num_slabs: u64,
    pub sharedavail: u64,
}

fn slab_row(l: &str, line: u64) -> Result<SlabInfoRow, ProcError> {
    let t: Vec<&str> = l.split_whitespace().collect();
    // Found from the right of the name, so a name with spaces still reads:
    // NAME a b c d e : tunables f g h : slabdata i j k [: globalstat ...]
    let Some(tun) = t.windows(2).position(|w| w == [":", "tunables"]) else {
        return err(line, format!("no ': tunables' in '{}'", show(l.trim())));
    };
    if tun < 6 {
        return err(line, "expected NAME and 5 numbers before ': tunables'");
    }
    if t.len() < tun + 10 || t[tun + 5] != ":" || t[tun + 6] != "slabdata" {
        return err(line, "expected ': tunables L B S : slabdata A N S'");
    }
    let num = |i: usize, what: &str| parse_u64(t[i], line, what);
    Ok(SlabInfoRow {
        name: t[..tun - 5].join(" "),
        active_objs: num(tun - 5, "active_objs")?,
        num_objs: num(tun - 4, "num_objs")?,
        objsize: num(tun - 3, "objsize")?,
        objperslab: num(tun - 2, "objperslab")?,
        pagesperslab: num(tun - 1, "pagesperslab")?,
        limit: num(tun + 2, "limit")?,
        batchcount: num(tun + 3, "batchcount")?,
        sharedfactor: num(tun + 4, "sharedfactor")?,
        active_slabs: num(tun + 7, "active_slabs")?,
        num_slabs: num(tun + 8, "num_slabs")?,
        sharedavail: num(tun + 9, "sharedavail")?,
    })
}

/// /proc/slabinfo: the "slabinfo - version: 2.1" header is required.
pub fn parse_slabinfo(text: &str) -> Result<Vec<SlabInfoRow>, ProcError> {
    let lines = numbered(text);
    let mut it = lines.iter().filter(|(_, l)| !l.trim().is_empty());
    let Some(&(n0, head)) = it.next() else {
        return err(1, "empty: not a slabinfo file");
    };
    let Some(version) = head.trim().strip_prefix("slabinfo - version:") else {
        return err(n0, format!("expected 'slabinfo - version: 2.1', found '{}'", show(head.trim())));
    };
    let version = version.trim();
    // "2.1", or "2.1 (statistics)" with CONFIG_DEBUG_SLAB.
    if version.split_whitespace().next() != Some("2.1") {
        return err(n0, format!("slabinfo version {} is not supported (2.1 is)", show(version)));
    }
    let mut out = Vec::new();
    for &(n, l) in it {
        if l.trim_start().starts_with('#') {
            continue;
        }
        out.push(slab_row(l, n)?);
    }
    Ok(out)
}

// ---- meminfo, vmstat -------------------------------------------------------------

/// /proc/meminfo: `(name, value)` in file order; values in kB except the
/// `HugePages_*` counts, which are as given.
pub fn parse_meminfo(text: &str) -> Result<Vec<(String, u64)>, ProcError> {
    let mut out = Vec::new();
    for (n, l) in numbered(text) {
        let t = l.trim();
        if t.is_empty() {
            continue;
        }
        let Some((k, v)) = t.split_once(':') else {
            return err(n, format!("expected 'Name: value kB', found '{}'", show(t)));
        };
        let k = k.trim();
        if k.is_empty() || k.contains(char::is_whitespace) {
            return err(n, format!("'{}' is not a meminfo item name", show(k)));
        }
        let mut vt = v.split_whitespace();
        let val = parse_u64(vt.next().unwrap_or(""), n, k)?;
        match (vt.next(), vt.next()) {
            (None, _) | (Some("kB"), None) => {}
            _ => return err(n, format!("expected 'value' or 'value kB' after '{k}:'")),
        }
        out.push((k.to_string(), val));
    }
    if out.is_empty() {
        return err(1, "empty: not a meminfo file");
    }
    Ok(out)
}

fn vmstat_line(t: &str, n: u64) -> Result<(String, i64), ProcError> {
    let mut it = t.split_whitespace();
    let (k, v) = (it.next().unwrap_or(""), it.next());
    let Some(v) = v.filter(|_| it.next().is_none() && is_item_name(k)) else {
        return err(n, format!("expected 'name value', found '{}'", show(t)));
    };
    Ok((k.to_string(), parse_counter(v, n, k)?))
}

fn vmstat_lines(lines: &[Line<'_>]) -> Result<Vec<(String, i64)>, ProcError> {
    let mut out = Vec::new();
    for &(n, l) in lines {
        let t = l.trim();
        if !t.is_empty() {
            out.push(vmstat_line(t, n)?);
        }
    }
    Ok(out)
}

/// /proc/vmstat: `(name, value)` in file order, every item kept.
pub fn parse_vmstat(text: &str) -> Result<Vec<(String, i64)>, ProcError> {
    let v = vmstat_lines(&numbered(text))?;
    if v.is_empty() {
        return err(1, "empty: not a vmstat file");
    }
    Ok(v)
}

// ---- samples.txt -----------------------------------------------------------------

/// One sample of samples.txt: the state at one CLOCK_MONOTONIC instant.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct SampleSnap {
    /// CLOCK_MONOTONIC, ns (the clock of `perf record -k CLOCK_MONOTONIC`).
    pub ts_ns: u64,
    pub buddyinfo: Vec<BuddyZone>,
    /// None when the recorder could not read /proc/pagetypeinfo (root only).
    pub pagetypeinfo: Option<PagetypeInfo>,
    /// The selected /proc/vmstat lines.
    pub vmstat: Vec<(String, i64)>,
}

/// "1188.079149" seconds as ns, exactly (no float rounding).
fn parse_seconds(tok: &str, line: u64) -> Result<u64, ProcError> {
    let (int, frac) = tok.split_once('.').unwrap_or((tok, ""));
    let bad = || err(line, format!("'{}' is not a time in seconds", show(tok)));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return bad();
    }
    if frac.len() > 9 {
        return err(line, format!("'{}': more than 9 decimals", show(tok)));
    }
    let Ok(s) = int.parse::<u64>() else { return bad() };
    let f: u64 = if frac.is_empty() { 0 } else { frac.parse::<u64>().unwrap_or(0) * 10u64.pow(9 - frac.len() as u32) };
    match s.checked_mul(1_000_000_000).and_then(|v| v.checked_add(f)) {
        Some(v) => Ok(v),
        None => err(line, format!("'{}' seconds is out of range", show(tok))),
    }
}

/// A samples.txt vmstat line: one item name and one value.
fn is_vmstat_shaped(t: &str) -> bool {
    let mut it = t.split_whitespace();
    matches!((it.next(), it.next(), it.next()), (Some(k), Some(_), None) if k != "Node" && is_item_name(k))
}

fn sample_chunk(ts_ns: u64, head: u64, lines: &[Line<'_>]) -> Result<SampleSnap, ProcError> {
    // buddyinfo lines, then (optionally) pagetypeinfo, then vmstat lines.
    let pt_start = lines.iter().position(|l| l.1.trim_start().starts_with("Page block order:"));
    let vm_start = lines
        .iter()
        .enumerate()
        .skip(pt_start.unwrap_or(0))
        .find(|(_, l)| is_vmstat_shaped(l.1))
        .map(|(i, _)| i)
        .unwrap_or(lines.len());
    let buddy_end = pt_start.unwrap_or(vm_start).min(vm_start);
    let buddyinfo = buddyinfo_lines(&lines[..buddy_end])?;
    if buddyinfo.is_empty() {
        // The recorder always writes buddyinfo; without it a sample says nothing.
        return err(head, "a sample without buddyinfo lines");
    }
    let pagetypeinfo = match pt_start {
        Some(s) if s < vm_start => Some(pagetypeinfo_lines(&lines[s..vm_start])?),
        _ => None,
    };
    let vmstat = vmstat_lines(&lines[vm_start..])?;
    Ok(SampleSnap { ts_ns, buddyinfo, pagetypeinfo, vmstat })
}

/// samples.txt, as far as it reads: the samples before the first broken
/// one, and the error if there is one (a recording cut short leaves a
/// truncated last sample; the ones before it are still good).
pub fn parse_samples_partial(text: &str) -> (Vec<SampleSnap>, Option<ProcError>) {
    let lines = numbered(text);
    let mut out = Vec::new();
    let mut i = 0;
    // Nothing but blank lines before the first "@".
    while i < lines.len() && !lines[i].1.starts_with('@') {
        if !lines[i].1.trim().is_empty() {
            let e = ProcError {
                line: lines[i].0,
                message: format!("expected '@ <seconds>' first, found '{}'", show(lines[i].1.trim())),
            };
            return (out, Some(e));
        }
        i += 1;
    }
    while i < lines.len() {
        let (n, head) = lines[i];
        let mut ht = head[1..].split_whitespace();
        let ts = match (ht.next(), ht.next()) {
            (Some(tok), None) => parse_seconds(tok, n),
            _ => err(n, format!("expected '@ <seconds>', found '{}'", show(head.trim()))),
        };
        let ts = match ts {
            Ok(t) => t,
            Err(e) => return (out, Some(e)),
        };
        let end = lines[i + 1..].iter().position(|l| l.1.starts_with('@')).map_or(lines.len(), |p| i + 1 + p);
        match sample_chunk(ts, n, &lines[i + 1..end]) {
            Ok(s) => out.push(s),
            Err(e) => return (out, Some(e)),
        }
        i = end;
    }
    (out, None)
}

/// samples.txt: `@ <CLOCK_MONOTONIC seconds>` lines, each followed by
/// /proc/buddyinfo, /proc/pagetypeinfo (optional) and selected /proc/vmstat
/// lines. `"@ 1188.079149"` is `ts_ns` 1188079149000.
pub fn parse_samples(text: &str) -> Result<Vec<SampleSnap>, ProcError> {
    match parse_samples_partial(text) {
        (v, None) => Ok(v),
        (_, Some(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Arch;
    use crate::machine::{Machine, MachineConfig};

    fn real(name: &str) -> String {
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        std::fs::read_to_string(base.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }
    fn warm2(name: &str) -> String {
        real(&format!("python/kmm/data/warm2/{name}"))
    }

    #[test]
    fn buddyinfo_real_files() {
        let b = parse_buddyinfo(&warm2("start.buddyinfo.txt")).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!((b[0].node, b[0].zone.as_str()), (0, "DMA"));
        assert_eq!(b[0].nr_free, vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 3]);
        assert_eq!(b[2].zone, "Normal");
        assert_eq!(b[2].nr_free, vec![30362, 14958, 5977, 2329, 311, 123, 52, 80, 122, 27, 959]);
        let l = parse_buddyinfo(&real("tests/data/linux/buddyinfo.txt")).unwrap();
        assert_eq!(l[1].nr_free, vec![1, 1, 4, 2, 5, 4, 3, 3, 4, 2, 752]);
    }

    #[test]
    fn pagetypeinfo_real_files() {
        for f in ["python/kmm/data/warm2/start.pagetypeinfo.txt", "tests/data/linux/pagetypeinfo.txt"] {
            let p = parse_pagetypeinfo(&real(f)).unwrap();
            assert_eq!((p.pageblock_order, p.pages_per_block), (9, 512));
            assert_eq!(p.free.len(), 15, "{f}");
            assert_eq!(p.block_types, ["Unmovable", "Movable", "Reclaimable", "HighAtomic", "Isolate"]);
            assert_eq!(p.blocks.len(), 3);
        }
        let p = parse_pagetypeinfo(&warm2("start.pagetypeinfo.txt")).unwrap();
        let f = &p.free[10];
        assert_eq!((f.zone.as_str(), f.migratetype.as_str()), ("Normal", "Unmovable"));
        assert_eq!(f.nr_free, vec![16, 261, 183, 75, 78, 40, 33, 11, 9, 1, 0]);
        assert_eq!(p.blocks[2].counts, vec![59, 3887, 86, 0, 0]);
        // proc-1 holds in the real file: buddyinfo = sum over migratetypes.
        let b = parse_buddyinfo(&warm2("start.buddyinfo.txt")).unwrap();
        for z in &b {
            assert_eq!(p.zone_nr_free(z.node, &z.zone).unwrap(), z.nr_free, "{}", z.zone);
        }
    }

    #[test]
    fn zoneinfo_real_files() {
        let zi = parse_zoneinfo(&warm2("start.zoneinfo.txt")).unwrap();
        assert_eq!(zi.zones.len(), 5);
        let names: Vec<&str> = zi.zones.iter().map(|z| z.name.as_str()).collect();
        assert_eq!(names, ["DMA", "DMA32", "Normal", "Movable", "Device"]);
        assert_eq!(zi.node_stats.len(), 51);
        assert_eq!(zi.node_stats[0], ("nr_inactive_anon".to_string(), 14598));
        assert_eq!(zi.node_stats.last().unwrap().0, "nr_kernel_file_pages");
        let dma = &zi.zones[0];
        assert_eq!((dma.free, dma.boost, dma.min, dma.low, dma.high, dma.promo), (3840, 0, 22, 27, 32, Some(37)));
        assert_eq!((dma.spanned, dma.present, dma.managed, dma.cma), (4095, 3998, 3840, Some(0)));
        assert_eq!(dma.protection, vec![0, 3018, 11082, 11082, 11082]);
        assert_eq!(dma.stat("nr_free_pages_blocks"), Some(3584));
        assert_eq!(dma.stats.len(), 17);
        assert_eq!(dma.start_pfn, Some(1));
        assert_eq!(dma.pagesets[0].high_max, Some(240));
        let n = &zi.zones[2];
        assert_eq!(n.managed, 2064384);
        assert_eq!(n.start_pfn, Some(1048576));
        assert_eq!(n.node_unreclaimable, Some(0));
        assert_eq!(n.pagesets.len(), 2);
        let p1 = &n.pagesets[1];
        assert_eq!((p1.cpu, p1.count, p1.high, p1.batch), (1, 39678, 43038, 63));
        assert_eq!((p1.high_min, p1.high_max, p1.vm_stats_threshold), (Some(7672), Some(129024), Some(28)));
        assert_eq!(n.stat("numa_hit"), Some(40981917));
        let mv = &zi.zones[3];
        assert_eq!((mv.present, mv.min, mv.start_pfn), (0, 32, None));
        assert!(mv.pagesets.is_empty() && mv.stats.is_empty());
        let l = parse_zoneinfo(&real("tests/data/linux/zoneinfo.txt")).unwrap();
        assert_eq!(l.zones.len(), 5);
        let e = parse_zoneinfo(&warm2("end.zoneinfo.txt")).unwrap();
        assert_eq!(e.zones[2].managed, 2064384);
    }

    #[test]
    fn slabinfo_meminfo_vmstat_real_files() {
        let s = parse_slabinfo(&warm2("start.slabinfo.txt")).unwrap();
        assert_eq!(s.len(), 235);
        assert_eq!(s[0].name, "btrfs_delayed_node");
        assert_eq!((s[0].objsize, s[0].objperslab, s[0].pagesperslab), (312, 13, 1));
        assert_eq!((s[2].name.as_str(), s[2].active_objs, s[2].active_slabs, s[2].num_slabs), ("bio-312", 12, 1, 1));
        assert_eq!(parse_slabinfo(&real("tests/data/linux/slabinfo.txt")).unwrap().len(), 235);
        let m = parse_meminfo(&warm2("start.meminfo.txt")).unwrap();
        assert_eq!(m.len(), 54);
        assert_eq!(m[0], ("MemTotal".to_string(), 24683784));
        assert!(m.contains(&("HugePages_Free".to_string(), 0)));
        assert_eq!(m.last().unwrap(), &("DirectMap1G".to_string(), 25165824));
        assert_eq!(parse_meminfo(&real("tests/data/linux/meminfo.txt")).unwrap()[1].1, 24458104);
        let v = parse_vmstat(&warm2("start.vmstat.txt")).unwrap();
        assert_eq!(v.len(), 192);
        assert_eq!(v[0], ("nr_free_pages".to_string(), 1929017));
        assert_eq!(v.last().unwrap().0, "nr_unstable");
    }

    #[test]
    fn samples_real_file() {
        let s = parse_samples(&warm2("samples.txt")).unwrap();
        assert_eq!(s.len(), 108);
        assert_eq!(s[0].ts_ns, 1_188_079_149_000);
        assert_eq!(s[1].ts_ns, 1_188_191_175_000);
        assert_eq!(s.last().unwrap().ts_ns, 1_200_979_358_000);
        assert_eq!(s[0].buddyinfo[2].nr_free[0], 28413);
        let pt = s[0].pagetypeinfo.as_ref().unwrap();
        assert_eq!(pt.free[10].nr_free[0], 209);
        assert_eq!(s[0].vmstat[0], ("nr_free_pages".to_string(), 1926931));
        assert_eq!(s[0].vmstat.iter().find(|(k, _)| k == "pgfree").unwrap().1, 44951572);
        assert_eq!(s[0].vmstat.last().unwrap().0, "thp_swpout_fallback");
        assert!(s.iter().all(|x| x.buddyinfo.len() == 3 && x.pagetypeinfo.is_some() && !x.vmstat.is_empty()));
    }

    #[test]
    fn errors_name_the_line() {
        let mut z = warm2("start.zoneinfo.txt");
        z = z.replacen("        managed  3840", "        managed  38x0", 1);
        let e = parse_zoneinfo(&z).unwrap_err();
        let line = warm2("start.zoneinfo.txt").lines().position(|l| l == "        managed  3840").unwrap() as u64 + 1;
        assert_eq!(e.line, line);
        assert!(e.message.contains("38x0"), "{e}");
        assert!(e.to_string().starts_with(&format!("line {line}: ")));
        let z = warm2("start.zoneinfo.txt").replacen("        protection: (0, 3018", "        protection: 0, 3018", 1);
        assert_eq!(parse_zoneinfo(&z).unwrap_err().line, line + 2);
        let z = warm2("start.zoneinfo.txt").replacen("        managed  3840\n", "", 1);
        let e = parse_zoneinfo(&z).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("no 'managed'"), "{e}");
        let b = "Node 0, zone DMA 1 2 3\nNode 0, zone Normal 1 x 3\n";
        assert_eq!(parse_buddyinfo(b).unwrap_err().line, 2);
        assert_eq!(parse_buddyinfo("").unwrap_err().line, 1);
        let p = warm2("start.pagetypeinfo.txt").replacen("   59         3887", "   59         38a7", 1);
        assert_eq!(parse_pagetypeinfo(&p).unwrap_err().line, 24);
        let p = warm2("start.pagetypeinfo.txt").replacen("Page block order: 9", "Page block order: 8", 1);
        assert!(parse_pagetypeinfo(&p).unwrap_err().message.contains("2^8"));
        let s = warm2("start.slabinfo.txt").replacen("version: 2.1", "version: 1.1", 1);
        assert_eq!(parse_slabinfo(&s).unwrap_err().line, 1);
        let s =
            warm2("start.slabinfo.txt").replacen(" : slabdata      1      1      0", " : slabdata      1      1", 1);
        assert_eq!(parse_slabinfo(&s).unwrap_err().line, 5);
        assert_eq!(parse_meminfo("MemTotal: 1 kB\nMemFree 2 kB\n").unwrap_err().line, 2);
        assert_eq!(parse_meminfo("MemTotal: 1 MB\n").unwrap_err().line, 1);
        assert_eq!(parse_vmstat("a 1\nb 2 3\n").unwrap_err().line, 2);
        let s = "@ 1.5\nNode 0, zone DMA 1\nnr_free_pages 4\n@ 2.x\n";
        let (v, e) = parse_samples_partial(s);
        assert_eq!((v.len(), v[0].ts_ns, e.unwrap().line), (1, 1_500_000_000, 4));
        let e = parse_samples("@ 1.5\nNode 0, zone DMA 1\n@ 1.6\nnr_free_pages 4\n").unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (3, "a sample without buddyinfo lines"));
        assert_eq!(parse_samples("junk\n@ 1\n").unwrap_err().line, 1);
    }

    #[test]
    fn tolerant_of_other_kernels() {
        // A 4.x-style zone: "scanned", no boost/promo/cma/high_min, per-CPU
        // "vm stats threshold" inside the pageset, "all_unreclaimable".
        let old = "Node 0, zone   Normal\n  pages free     100\n        min      1\n        low      2\n        high     3\n        scanned  0\n        spanned  512\n        present  512\n        managed  500\n    nr_free_pages 100\n        protection: (0, 0)\n  pagesets\n    cpu: 0\n              count: 7\n              high:  186\n              batch: 31\n  vm stats threshold: 8\n  all_unreclaimable: 0\n  start_pfn:         4096\n  inactive_ratio:    1\n";
        let z = parse_zoneinfo(old).unwrap();
        let n = &z.zones[0];
        assert_eq!((n.free, n.boost, n.managed, n.promo, n.cma), (100, 0, 500, None, None));
        assert_eq!(n.stat("scanned"), Some(0));
        assert_eq!(n.stat("nr_free_pages"), Some(100));
        assert_eq!(
            n.pagesets[0],
            Pageset { cpu: 0, count: 7, high: 186, batch: 31, vm_stats_threshold: Some(8), ..Default::default() }
        );
        assert_eq!(n.start_pfn, Some(4096));
        // vmstat and zoneinfo counters printed with %lu from a negative long.
        assert_eq!(parse_vmstat("nr_x 18446744073709551615\n").unwrap()[0].1, -1);
        // pagetypeinfo: a capped count, a CMA type and the PAGE_OWNER section.
        let pt = "Page block order: 9\nPages per block:  512\n\nFree pages count per migrate type at order       0      1 \nNode    0, zone   Normal, type    Unmovable >100000      1 \n\nNumber of blocks type     Unmovable      Movable  Reclaimable   HighAtomic          CMA      Isolate \nNode 0, zone   Normal            1            2            3            4            5            6 \nNumber of mixed blocks    Unmovable      Movable  Reclaimable   HighAtomic          CMA      Isolate \nNode 0, zone   Normal            0            0            0            0            0            0 \n";
        let p = parse_pagetypeinfo(pt).unwrap();
        assert_eq!(p.free[0].nr_free, vec![100000, 1]);
        assert_eq!(p.block_types[4], "CMA");
        assert_eq!(p.blocks.len(), 1);
        assert_eq!(p.blocks[0].counts, vec![1, 2, 3, 4, 5, 6]);
        // slabinfo with CONFIG_DEBUG_SLAB statistics columns.
        let s = "slabinfo - version: 2.1 (statistics)\n# name ...\nfoo 1 2 3 4 5 : tunables 6 7 8 : slabdata 9 10 11 : globalstat 1 2 3 : cpustat 4 5 6 7\n";
        assert_eq!(parse_slabinfo(s).unwrap()[0].sharedavail, 11);
    }

    /// procfs-2: kmm's own renderers read back as the machine's values.
    #[test]
    fn round_trip_kmm_renderers() {
        for (arch, mem, cpus) in [(Arch::X86_64, "2G", 3), (Arch::I386, "1G", 2)] {
            let cfg = MachineConfig { arch, cpus, ..MachineConfig::default() }.with_memory(mem).unwrap();
            let m = Machine::new(cfg).unwrap();
            let infos = m.zone_infos();
            let zi = parse_zoneinfo(&m.proc_zoneinfo()).unwrap();
            assert_eq!(zi.zones.len(), infos.len());
            for (z, i) in zi.zones.iter().zip(&infos) {
                assert_eq!(z.name, i.name);
                assert_eq!(
                    (z.free, z.min, z.low, z.high, z.promo),
                    (i.free_pages, i.min, i.low, i.high, Some(i.promo))
                );
                assert_eq!((z.spanned, z.present, z.managed, z.boost), (i.spanned, i.present, i.managed, i.boost));
                assert_eq!(z.protection, i.lowmem_reserve);
                if i.populated {
                    assert_eq!(z.start_pfn, Some(i.start_pfn));
                    assert_eq!(z.pagesets.len(), cpus as usize);
                    assert!(z.pagesets.iter().all(|p| p.batch == i.pcp_batch && p.high_max == Some(i.pcp_high_max)));
                    assert!(z.pagesets.iter().all(|p| p.vm_stats_threshold == Some(i.vmstat_threshold)));
                    assert_eq!(z.stat("nr_free_pages"), Some(i.free_pages as i64));
                }
            }
            let b = parse_buddyinfo(&m.proc_buddyinfo()).unwrap();
            let pop: Vec<_> = infos.iter().filter(|i| i.populated).collect();
            assert_eq!(b.len(), pop.len());
            for (bz, i) in b.iter().zip(&pop) {
                assert_eq!((bz.zone.as_str(), &bz.nr_free[..]), (i.name, &i.nr_free[..]));
            }
            let p = parse_pagetypeinfo(&m.proc_pagetypeinfo()).unwrap();
            assert_eq!(p.pageblock_order, m.pageblock_order);
            for (bl, i) in p.blocks.iter().zip(&pop) {
                assert_eq!(bl.counts, i.pageblocks.to_vec());
            }
            for i in &pop {
                assert_eq!(p.zone_nr_free(0, i.name).unwrap(), i.nr_free.to_vec());
            }
            let mi = parse_meminfo(&m.proc_meminfo()).unwrap();
            let want: Vec<(String, u64)> = m.meminfo_fields().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            assert_eq!(mi, want);
            let vs = parse_vmstat(&m.proc_vmstat()).unwrap();
            let want: Vec<(String, i64)> =
                m.vmstat_fields().into_iter().map(|(k, v)| (k.to_string(), v as i64)).collect();
            assert_eq!(vs, want);
            let sl = parse_slabinfo(&m.proc_slabinfo()).unwrap();
            let rows = m.slabinfo_rows();
            assert_eq!(sl.len(), rows.len());
            for (a, r) in sl.iter().zip(&rows) {
                assert_eq!(
                    (&a.name, a.active_objs, a.num_objs, a.objsize),
                    (&r.name, r.active_objs, r.num_objs, r.objsize as u64)
                );
                assert_eq!(
                    (a.objperslab, a.pagesperslab, a.num_slabs),
                    (r.objperslab as u64, r.pagesperslab as u64, r.num_slabs)
                );
            }
        }
    }

    fn all_parsers(t: &str) {
        let _ = parse_buddyinfo(t);
        let _ = parse_pagetypeinfo(t);
        let _ = parse_zoneinfo(t);
        let _ = parse_slabinfo(t);
        let _ = parse_meminfo(t);
        let _ = parse_vmstat(t);
        let _ = parse_samples(t);
        let _ = crate::trace::bundle::Bundle::from_texts(&[
            ("start.zoneinfo.txt".into(), t.to_string()),
            ("start.buddyinfo.txt".into(), t.to_string()),
            ("start.pagetypeinfo.txt".into(), t.to_string()),
            ("samples.txt".into(), t.to_string()),
        ]);
    }

    /// Lines of the real files, and pieces of them, for mutated inputs.
    fn vocabulary() -> Vec<String> {
        let mut v = Vec::new();
        for f in ["start.zoneinfo.txt", "start.pagetypeinfo.txt", "start.buddyinfo.txt"] {
            v.extend(warm2(f).lines().map(str::to_string));
        }
        v.extend(warm2("start.slabinfo.txt").lines().take(6).map(str::to_string));
        v.extend(warm2("start.meminfo.txt").lines().take(6).map(str::to_string));
        v.extend(warm2("samples.txt").lines().take(60).map(str::to_string));
        v.extend(
            ["@ 1.5", "@", "@ x", "Node", "Node 0,", "Node 0, zone", "protection: (", "cpu: 99999999999", ">", ""]
                .map(String::from),
        );
        v
    }

    use proptest::prelude::*;
    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1500))]
        /// procfs-1: arbitrary text never panics a reader.
        #[test]
        fn arbitrary_text_never_panics(t in ".{0,400}") {
            all_parsers(&t);
        }

        /// procfs-1 on near-valid input: real lines picked, cut and joined.
        #[test]
        fn mutated_real_lines_never_panic(picks in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..120, any::<bool>()), 0..60)) {
            let voc = vocabulary();
            let mut t = String::new();
            for (i, cut, whole) in picks {
                let l = &voc[i.index(voc.len())];
                let l = if whole { l.as_str() } else { l.get(..cut.min(l.len())).unwrap_or(l) };
                t.push_str(l);
                t.push('\n');
            }
            all_parsers(&t);
        }
    }
}
