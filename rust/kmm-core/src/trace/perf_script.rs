//! Trace import: a streaming parser for `perf script` text and for ftrace /
//! trace-cmd `trace_pipe` text, into a compact in-memory [`TraceLog`].
//!
//! # Kernel
//! Line formats: `tools/perf/builtin-script.c` (`perf_sample__fprintf_start`:
//! `%16s %5d [%03d] %5lu.%06lu: %s: `), `kernel/trace/trace_output.c`
//! (`trace_print_context`: `%16s-%-7d [%03d] <flags> %5lu.%06lu: name: `).
//! Field text: the `TP_printk` strings of `include/trace/events/kmem.h` and
//! `include/trace/events/percpu.h` (see `trace/mod.rs`).
//!
//! Accepted lines:
//! - perf script: `comm pid[/tid] [cpu] sec.frac: system:event: fields`
//! - trace_pipe / trace-cmd: `comm-pid [cpu] [flags] sec.frac: event: fields`
//!   (the system is added for the events kmm knows: `kmalloc` -> `kmem:kmalloc`)
//! - callchain frames (`perf script -g`): `\t addr symbol+off (dso)`; the
//!   first frame outside the page allocator becomes the call site of a
//!   `mm_page_alloc`, as `perf kmem` `find_callsite` picks it
//! - blank lines and `#` comment lines (trace_pipe headers) are skipped.
//!
//! Anything else is malformed: an error naming the 1-based line number, or,
//! with `lenient`, a skipped line that is counted.
//!
//! A perf.data builds the same [`TraceLog`] (`perf_data.rs`): its decoder
//! appends records through `TraceLog::push_rec`, and events it prints from
//! their format go through `Parser::push_event` like a line of this text.
//!
//! # Storage
//! One fixed-size [`Rec`] per event (88 bytes); event names, comms, call
//! sites and cache names are interned once. Events kmm does not decode field
//! by field (vmalloc, extfrag, unknown events) keep their field text in one
//! arena and are decoded on demand by [`TraceLog::fields`].
//!
//! SIMPLIFICATION: gfp flag names kmm does not know (a newer kernel's) are
//! dropped from the mask rather than rejected.
//!
//! # Invariants
//! - perf-script-1: parsing never panics, whatever the bytes (tested with
//!   proptest over arbitrary input).
//! - perf-script-2: `len() == sum(counts)`; `unknown` counts events whose
//!   name is not a tracepoint kmm knows.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt;

use crate::gfp;

use super::Value;

/// What kind of event a record holds (the events kmm decodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Kmalloc,
    /// `kmem:kmalloc_node` (kernels before 6.1).
    KmallocNode,
    KmemCacheAlloc,
    /// `kmem:kmem_cache_alloc_node` (kernels before 6.1).
    KmemCacheAllocNode,
    Kfree,
    KmemCacheFree,
    MmPageAlloc,
    MmPageFree,
    MmPageFreeBatched,
    MmPageAllocZoneLocked,
    MmPagePcpuDrain,
    PercpuAllocPercpu,
    PercpuFreePercpu,
    /// Any other event: its field text is kept verbatim.
    Other,
}

/// Flag bits of [`Rec::flags`].
pub const F_ACCOUNTED: u8 = 1;
/// mm_page_alloc: the allocation failed (page=NULL).
pub const F_FAILED: u8 = 2;
pub const F_RESERVED: u8 = 4;
pub const F_ATOMIC: u8 = 8;
/// mm_page_alloc_zone_locked: percpu_refill.
pub const F_REFILL: u8 = 16;
/// The event name is not a tracepoint kmm knows.
pub const F_UNKNOWN: u8 = 32;

/// "no string" in an interned-id field.
pub const NONE: u32 = u32::MAX;

/// One event, compactly. Which fields mean something depends on `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rec {
    pub ts_ns: u64,
    /// ptr (slab, percpu) or pfn (page events).
    pub ptr: u64,
    /// bytes_req, or percpu `size`.
    pub bytes_req: u64,
    pub bytes_alloc: u64,
    /// percpu `base_addr`; for `Other`, the field text's arena offset.
    pub aux: u64,
    /// Interned `system:event` name.
    pub name: u32,
    pub cpu: u32,
    pub pid: u32,
    /// Interned comm.
    pub comm: u32,
    /// Interned call site (`NONE` if the event has none).
    pub call_site: u32,
    /// Interned cache name (kmem_cache_alloc/free), `NONE` otherwise.
    pub cache: u32,
    pub gfp: u32,
    /// percpu `align`; for `Other`, the field text's length.
    pub extra: u32,
    /// percpu `off`.
    pub off: i32,
    pub node: i16,
    pub order: u8,
    pub migratetype: i8,
    pub flags: u8,
    pub kind: Kind,
}

impl Rec {
    pub(crate) fn new(kind: Kind) -> Rec {
        Rec {
            ts_ns: 0,
            ptr: 0,
            bytes_req: 0,
            bytes_alloc: 0,
            aux: 0,
            name: NONE,
            cpu: 0,
            pid: 0,
            comm: NONE,
            call_site: NONE,
            cache: NONE,
            gfp: 0,
            extra: 0,
            off: 0,
            node: -1,
            order: 0,
            migratetype: 0,
            flags: 0,
            kind,
        }
    }
}

/// A malformed line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: u64,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Interned strings.
#[derive(Default, Debug, Clone)]
pub struct Strings {
    list: Vec<Box<str>>,
    map: HashMap<Box<str>, u32>,
}

impl Strings {
    pub fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.map.get(s) {
            return id;
        }
        let id = self.list.len() as u32;
        self.list.push(s.into());
        self.map.insert(s.into(), id);
        id
    }
    /// The string of an id ("" for `NONE` or an unknown id).
    pub fn get(&self, id: u32) -> &str {
        self.list.get(id as usize).map(|s| &**s).unwrap_or("")
    }
    pub fn len(&self) -> usize {
        self.list.len()
    }
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// A parsed trace.
#[derive(Default, Debug, Clone)]
pub struct TraceLog {
    pub events: Vec<Rec>,
    pub strings: Strings,
    /// Field text of `Other` events.
    arena: String,
    /// Events per name id.
    name_counts: HashMap<u32, u64>,
    /// Events whose name kmm does not know.
    pub unknown: u64,
    /// Malformed lines skipped (lenient mode).
    pub skipped: u64,
    /// The first skipped lines, as (line number, reason), at most 10.
    pub skipped_examples: Vec<(u64, String)>,
    /// Lines read (including blank, comment and callchain lines).
    pub lines: u64,
    /// Events the kernel dropped (ftrace `CPU:N [LOST M EVENTS]` lines;
    /// in perf.data, the events counted by its PERF_RECORD_LOST records).
    pub lost_events: u64,
    /// perf.data: PERF_RECORD_LOST records ("chunks": each is one stretch
    /// of events a CPU's ring buffer had no room for).
    pub lost_chunks: u64,
    /// perf.data: each PERF_RECORD_LOST as (cpu, ns, events lost): the
    /// time perf wrote it, after the stretch it could not record.
    pub lost_records: Vec<(u32, u64, u64)>,
    /// perf.data: samples its PERF_RECORD_LOST_SAMPLES records count (perf
    /// record reads them from each event at the end; they overlap
    /// `lost_events`).
    pub lost_samples: u64,
    /// perf.data: the file ended (or was unreadable) at this byte offset;
    /// the events before it were kept.
    pub truncated_at: Option<u64>,
}

impl TraceLog {
    pub fn len(&self) -> usize {
        self.events.len()
    }
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
    /// `system:event` of event `i`.
    pub fn name(&self, i: usize) -> &str {
        self.strings.get(self.events[i].name)
    }
    pub fn comm(&self, i: usize) -> &str {
        self.strings.get(self.events[i].comm)
    }
    /// Events per name, sorted by name.
    pub fn counts(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> =
            self.name_counts.iter().map(|(&id, &n)| (self.strings.get(id).to_string(), n)).collect();
        v.sort();
        v
    }
    /// Events of one name.
    pub fn count(&self, name: &str) -> u64 {
        self.strings.map.get(name).and_then(|id| self.name_counts.get(id)).copied().unwrap_or(0)
    }
    /// The violations of perf-script-2 (and of the string/arena references).
    pub fn check(&self) -> Vec<String> {
        let mut errs = Vec::new();
        let total: u64 = self.name_counts.values().sum();
        if total != self.events.len() as u64 {
            errs.push(format!("perf-script-2: name counts sum to {total}, not {} events", self.events.len()));
        }
        let unknown = self.events.iter().filter(|r| r.flags & F_UNKNOWN != 0).count() as u64;
        if unknown != self.unknown {
            errs.push(format!("perf-script-2: {unknown} unknown events, counted {}", self.unknown));
        }
        let n = self.strings.len();
        for (i, r) in self.events.iter().enumerate() {
            for (what, id) in [("name", r.name), ("comm", r.comm), ("call_site", r.call_site), ("cache", r.cache)] {
                if id != NONE && id as usize >= n {
                    errs.push(format!("event {i}: {what} id {id} out of {n} strings"));
                }
            }
            if r.kind == Kind::Other && r.aux as usize + r.extra as usize > self.arena.len() {
                errs.push(format!("event {i}: field text beyond the arena"));
            }
        }
        errs
    }

    /// Append a decoded event (perf.data), counting it as the parser does.
    pub(crate) fn push_rec(&mut self, r: Rec) {
        if r.flags & F_UNKNOWN != 0 {
            self.unknown += 1;
        }
        *self.name_counts.entry(r.name).or_insert(0) += 1;
        self.events.push(r);
    }

    /// The field text of an `Other` event.
    pub fn raw_text(&self, i: usize) -> &str {
        let r = &self.events[i];
        let (a, n) = (r.aux as usize, r.extra as usize);
        self.arena.get(a..a + n).unwrap_or("")
    }

    /// The fields of event `i`, by the kernel's names.
    pub fn fields(&self, i: usize) -> Vec<(String, Value)> {
        use Value::*;
        let r = &self.events[i];
        let s = |id: u32| Str(self.strings.get(id).to_string());
        let f = |k: &str, v: Value| (k.to_string(), v);
        let b = |bit: u8| Bool(r.flags & bit != 0);
        match r.kind {
            Kind::Kmalloc | Kind::KmallocNode | Kind::KmemCacheAlloc | Kind::KmemCacheAllocNode => {
                let mut v = vec![f("call_site", s(r.call_site)), f("ptr", UInt(r.ptr))];
                if r.cache != NONE {
                    v.push(f("name", s(r.cache)));
                }
                v.extend([
                    f("bytes_req", UInt(r.bytes_req)),
                    f("bytes_alloc", UInt(r.bytes_alloc)),
                    f("gfp_flags", UInt(r.gfp as u64)),
                    f("node", Int(r.node as i64)),
                    f("accounted", b(F_ACCOUNTED)),
                ]);
                v
            }
            Kind::Kfree => vec![f("call_site", s(r.call_site)), f("ptr", UInt(r.ptr))],
            Kind::KmemCacheFree => {
                vec![f("call_site", s(r.call_site)), f("ptr", UInt(r.ptr)), f("name", s(r.cache))]
            }
            Kind::MmPageAlloc => {
                let mut v = vec![
                    f("pfn", UInt(if r.flags & F_FAILED != 0 { 0 } else { r.ptr })),
                    f("order", UInt(r.order as u64)),
                    f("migratetype", Int(r.migratetype as i64)),
                    f("gfp_flags", UInt(r.gfp as u64)),
                ];
                if r.call_site != NONE {
                    v.push(f("call_site", s(r.call_site)));
                }
                v
            }
            Kind::MmPageFree => vec![f("pfn", UInt(r.ptr)), f("order", UInt(r.order as u64))],
            Kind::MmPageFreeBatched => vec![f("pfn", UInt(r.ptr))],
            Kind::MmPageAllocZoneLocked => vec![
                f("pfn", UInt(r.ptr)),
                f("order", UInt(r.order as u64)),
                f("migratetype", Int(r.migratetype as i64)),
                f("percpu_refill", b(F_REFILL)),
            ],
            Kind::MmPagePcpuDrain => vec![
                f("pfn", UInt(r.ptr)),
                f("order", UInt(r.order as u64)),
                f("migratetype", Int(r.migratetype as i64)),
            ],
            Kind::PercpuAllocPercpu => vec![
                f("call_site", s(r.call_site)),
                f("reserved", b(F_RESERVED)),
                f("is_atomic", b(F_ATOMIC)),
                f("size", UInt(r.bytes_req)),
                f("align", UInt(r.extra as u64)),
                f("base_addr", UInt(r.aux)),
                f("off", Int(r.off as i64)),
                f("ptr", UInt(r.ptr)),
                f("bytes_alloc", UInt(r.bytes_alloc)),
                f("gfp_flags", UInt(r.gfp as u64)),
            ],
            Kind::PercpuFreePercpu => {
                vec![f("base_addr", UInt(r.aux)), f("off", Int(r.off as i64)), f("ptr", UInt(r.ptr))]
            }
            Kind::Other => generic_fields(self.raw_text(i)),
        }
    }
}

/// Fields of an event kmm does not decode: `key=value` pairs, numbers where
/// they parse (decimal, or hex with 0x), strings otherwise. `key: value`
/// (vmalloc's `va_start: %lu`) is accepted too.
pub fn generic_fields(text: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut pending_key: Option<&str> = None;
    for (k, v) in FieldIter::new(text) {
        let (k, v) = match (k, pending_key.take()) {
            (Some(k), _) => (k, v),
            (None, Some(pk)) => (pk, v),
            (None, None) => {
                if let Some(pk) = v.strip_suffix(':') {
                    pending_key = Some(pk);
                } else {
                    out.push(("text".to_string(), Value::Str(v.to_string())));
                }
                continue;
            }
        };
        out.push((k.to_string(), generic_value(v)));
    }
    out
}

fn generic_value(v: &str) -> Value {
    if let Some(h) = v.strip_prefix("0x") {
        if let Ok(n) = u64::from_str_radix(h, 16) {
            return Value::UInt(n);
        }
    }
    if let Ok(n) = v.parse::<u64>() {
        return Value::UInt(n);
    }
    if let Ok(n) = v.parse::<i64>() {
        return Value::Int(n);
    }
    Value::Str(v.to_string())
}

/// `key=value` pairs of a field text. A value runs to the next token that
/// holds `=` (so `call_site=foo+0x1/0x2 [module]` keeps its module); a
/// leading token without `=` comes back with key None.
struct FieldIter<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> FieldIter<'a> {
    fn new(text: &'a str) -> Self {
        FieldIter { text, pos: 0 }
    }
    /// Next whitespace-separated token as (start, end).
    fn token(&self, from: usize) -> Option<(usize, usize)> {
        let b = self.text.as_bytes();
        let mut i = from;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            return None;
        }
        let s = i;
        while i < b.len() && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        Some((s, i))
    }
}

impl<'a> Iterator for FieldIter<'a> {
    type Item = (Option<&'a str>, &'a str);
    fn next(&mut self) -> Option<Self::Item> {
        let (s, e) = self.token(self.pos)?;
        let tok = &self.text[s..e];
        let Some(eq) = tok.find('=') else {
            self.pos = e;
            return Some((None, tok));
        };
        let key = &tok[..eq];
        let vstart = s + eq + 1;
        let mut end = e;
        // Absorb following tokens without '=' (" [module]").
        while let Some((s2, e2)) = self.token(end) {
            let t = &self.text[s2..e2];
            if t.contains('=') || t.ends_with(':') {
                break;
            }
            end = e2;
        }
        self.pos = end;
        Some((Some(key), &self.text[vstart..end]))
    }
}

// ---------------------------------------------------------------------------
// Value parsers (the TP_printk conversions, inverted)
// ---------------------------------------------------------------------------

/// `%p`: `(nil)`, `0x...`, or bare hex (a hashed pointer).
pub(crate) fn parse_ptr(v: &str) -> Result<u64, String> {
    if v == "(nil)" || v == "(null)" {
        return Ok(0);
    }
    let h = v.strip_prefix("0x").unwrap_or(v);
    u64::from_str_radix(h, 16).map_err(|_| format!("bad pointer '{v}'"))
}

/// `pfn=0x%lx` (or `%lu` on old kernels).
pub(crate) fn parse_pfn(v: &str) -> Result<u64, String> {
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse::<u64>(),
    }
    .map_err(|_| format!("bad pfn '{v}'"))
}

pub(crate) fn parse_u64(k: &str, v: &str) -> Result<u64, String> {
    v.parse::<u64>().map_err(|_| format!("bad {k} '{v}'"))
}

pub(crate) fn parse_i64(k: &str, v: &str) -> Result<i64, String> {
    v.parse::<i64>().map_err(|_| format!("bad {k} '{v}'"))
}

pub(crate) fn parse_bool(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("bad {k} '{v}'")),
    }
}

/// gfp text (`GFP_KERNEL|__GFP_ZERO`, `0x...`, `none`); unknown names are
/// dropped (see the module header).
pub(crate) fn parse_gfp(v: &str) -> Result<u32, String> {
    if let Ok(m) = gfp::parse(v) {
        return Ok(m);
    }
    let mut m = 0;
    let mut any = false;
    for part in v.split('|') {
        if let Ok(x) = gfp::parse(part) {
            m |= x;
            any = true;
        } else if part.is_empty() || !part.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
            return Err(format!("bad gfp_flags '{v}'"));
        }
    }
    let _ = any;
    Ok(m)
}

pub(crate) fn small<T: TryFrom<i64>>(k: &str, v: i64) -> Result<T, String> {
    T::try_from(v).map_err(|_| format!("{k}={v} out of range"))
}

// ---------------------------------------------------------------------------
// The line parser
// ---------------------------------------------------------------------------

/// Known event names, full and as ftrace prints them (without the system).
const KNOWN: &[(&str, Kind)] = &[
    ("kmem:kmalloc", Kind::Kmalloc),
    ("kmem:kmalloc_node", Kind::KmallocNode),
    ("kmem:kmem_cache_alloc", Kind::KmemCacheAlloc),
    ("kmem:kmem_cache_alloc_node", Kind::KmemCacheAllocNode),
    ("kmem:kfree", Kind::Kfree),
    ("kmem:kmem_cache_free", Kind::KmemCacheFree),
    ("kmem:mm_page_alloc", Kind::MmPageAlloc),
    ("kmem:mm_page_free", Kind::MmPageFree),
    ("kmem:mm_page_free_batched", Kind::MmPageFreeBatched),
    ("kmem:mm_page_alloc_zone_locked", Kind::MmPageAllocZoneLocked),
    ("kmem:mm_page_pcpu_drain", Kind::MmPagePcpuDrain),
    ("kmem:mm_page_alloc_extfrag", Kind::Other),
    ("kmem:rss_stat", Kind::Other),
    ("kmem:mm_alloc_contig_migrate_range_info", Kind::Other),
    ("percpu:percpu_alloc_percpu", Kind::PercpuAllocPercpu),
    ("percpu:percpu_free_percpu", Kind::PercpuFreePercpu),
    ("percpu:percpu_alloc_percpu_fail", Kind::Other),
    ("percpu:percpu_create_chunk", Kind::Other),
    ("percpu:percpu_destroy_chunk", Kind::Other),
    ("vmalloc:alloc_vmap_area", Kind::Other),
    ("vmalloc:free_vmap_area_noflush", Kind::Other),
    ("vmalloc:purge_vmap_area_lazy", Kind::Other),
];

pub(crate) fn lookup_kind(name: &str) -> Option<(&'static str, Kind)> {
    KNOWN.iter().find_map(|&(full, k)| {
        let short = &full[full.find(':').unwrap_or(0) + 1..];
        (full == name || short == name).then_some((full, k))
    })
}

/// The parts of an event line.
struct Head<'a> {
    comm: &'a str,
    pid: u32,
    cpu: u32,
    ts_ns: u64,
    name: &'a str,
    fields: &'a str,
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())
}

/// Split an event line; None if it has no `[cpu]` marker.
fn split_head(line: &str) -> Option<Result<Head<'_>, String>> {
    let b = line.as_bytes();
    // The first " [digits] " (or at the start).
    let mut lb = None;
    let mut i = 0;
    while let Some(off) = line.get(i..).and_then(|s| s.find('[')) {
        let p = i + off;
        let before_ok = p == 0 || b[p - 1].is_ascii_whitespace();
        if let Some(rb) = line[p + 1..].find(']') {
            let inner = &line[p + 1..p + 1 + rb];
            let after = p + 2 + rb;
            let after_ok = after >= b.len() || b[after].is_ascii_whitespace();
            if before_ok && after_ok && is_digits(inner) {
                lb = Some((p, after));
                break;
            }
        }
        i = p + 1;
    }
    let (lb, after) = lb?;
    Some(split_rest(line, lb, after))
}

fn split_rest(line: &str, lb: usize, after: usize) -> Result<Head<'_>, String> {
    let cpu: u32 = line[lb + 1..after - 1].parse().map_err(|_| "bad cpu".to_string())?;
    let head = line[..lb].trim();
    // perf: "comm pid" / "comm pid/tid"; ftrace: "comm-pid".
    let (comm, pid) = match head.rsplit_once(|c: char| c.is_ascii_whitespace()) {
        Some((c, p)) if is_digits(p.split('/').next().unwrap_or("")) => (c.trim(), p.split('/').next().unwrap_or("")),
        _ => match head.rsplit_once('-') {
            Some((c, p)) if is_digits(p) => (c, p),
            _ if is_digits(head) => ("", head),
            _ => return Err(format!("cannot find comm and pid in '{head}'")),
        },
    };
    let pid: u32 = pid.parse().map_err(|_| format!("bad pid '{pid}'"))?;
    // Then: [flags] timestamp: event: fields
    let mut rest = &line[after..];
    let mut ts = None;
    for _ in 0..2 {
        let t = rest.trim_start();
        let end = t.find(|c: char| c.is_ascii_whitespace()).unwrap_or(t.len());
        let tok = &t[..end];
        rest = &t[end..];
        if let Some(x) = tok.strip_suffix(':') {
            ts = Some(parse_ts(x)?);
            break;
        }
    }
    let ts_ns = ts.ok_or_else(|| "no timestamp".to_string())?;
    let t = rest.trim_start();
    let end = t.find(|c: char| c.is_ascii_whitespace()).unwrap_or(t.len());
    let name = t[..end].strip_suffix(':').ok_or_else(|| "no event name".to_string())?;
    if name.is_empty() {
        return Err("empty event name".into());
    }
    let fields = t[end..].trim();
    Ok(Head { comm, pid, cpu, ts_ns, name, fields })
}

/// `sec.frac` (microseconds from perf, any number of digits) to ns.
fn parse_ts(s: &str) -> Result<u64, String> {
    let bad = || format!("bad timestamp '{s}'");
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    if !is_digits(sec) || !(frac.is_empty() || is_digits(frac)) || frac.len() > 9 {
        return Err(bad());
    }
    let sec: u64 = sec.parse().map_err(|_| bad())?;
    let mut ns: u64 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| bad())? };
    for _ in frac.len()..9 {
        ns *= 10;
    }
    sec.checked_mul(1_000_000_000).and_then(|x| x.checked_add(ns)).ok_or_else(bad)
}

/// Is this symbol part of the page allocator (`perf kmem`'s
/// `^_?_?(alloc|get_free|get_zeroed)_pages?`)?
fn is_alloc_func(sym: &str) -> bool {
    let mut s = sym;
    for _ in 0..2 {
        s = s.strip_prefix('_').unwrap_or(s);
    }
    ["alloc_page", "get_free_page", "get_zeroed_page"].iter().any(|p| s.starts_with(p))
}

/// trace-cmd report / trace_pipe lines that carry no event: `cpus=2`,
/// `version = 6`, `CPU 1 is empty`, `CPU:0 [LOST 12 EVENTS]`.
fn is_meta_line(t: &str) -> bool {
    t.strip_prefix("cpus=").is_some_and(is_digits)
        || t.starts_with("version = ")
        || (t.starts_with("CPU ") && t.ends_with(" is empty"))
        || lost_events(t).is_some()
}

/// The count of a `CPU:N [LOST M EVENTS]` line.
fn lost_events(t: &str) -> Option<u64> {
    let rest = t.strip_prefix("CPU:")?;
    let (_, rest) = rest.split_once(" [LOST ")?;
    rest.strip_suffix(" EVENTS]")?.parse().ok()
}

/// A streaming parser: `feed` it chunks of bytes, then `finish`.
pub struct Parser {
    log: TraceLog,
    /// Memo of gfp texts already parsed (a trace repeats a few dozen masks).
    gfp_memo: HashMap<Box<str>, u32>,
    /// Memo of event names already looked up.
    kind_memo: HashMap<Box<str>, (u32, Kind, bool)>,
    partial: Vec<u8>,
    lenient: bool,
    /// Index of the mm_page_alloc event whose callchain is being read.
    chain_of: Option<usize>,
    bytes: u64,
}

impl Parser {
    pub fn new(lenient: bool) -> Parser {
        Parser {
            log: TraceLog::default(),
            gfp_memo: HashMap::new(),
            kind_memo: HashMap::new(),
            partial: Vec::new(),
            lenient,
            chain_of: None,
            bytes: 0,
        }
    }

    /// Bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    /// Events parsed so far.
    pub fn events(&self) -> usize {
        self.log.events.len()
    }

    /// The trace built so far (perf.data appends to it directly).
    pub(crate) fn log_mut(&mut self) -> &mut TraceLog {
        &mut self.log
    }

    /// One event from its parts, as if it were a line of `perf script`
    /// (perf.data: events printed from their format). The error is the
    /// message a malformed line would get.
    pub(crate) fn push_event(
        &mut self,
        comm: &str,
        pid: u32,
        cpu: u32,
        ts_ns: u64,
        name: &str,
        fields: &str,
    ) -> Result<(), String> {
        self.chain_of = None;
        self.event(Head { comm, pid, cpu, ts_ns, name, fields })
    }

    /// Parse the complete lines of `chunk` (keeping a trailing partial line).
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), ParseError> {
        self.bytes += chunk.len() as u64;
        let mut start = 0;
        while let Some(nl) = chunk[start..].iter().position(|&c| c == b'\n') {
            let end = start + nl;
            if self.partial.is_empty() {
                self.line_bytes(&chunk[start..end], false)?;
            } else {
                let mut p = std::mem::take(&mut self.partial);
                p.extend_from_slice(&chunk[start..end]);
                self.line_bytes(&p, false)?;
            }
            start = end + 1;
        }
        self.partial.extend_from_slice(&chunk[start..]);
        Ok(())
    }

    /// Parse the last line (if the input did not end with a newline).
    pub fn finish(mut self) -> Result<TraceLog, ParseError> {
        if !self.partial.is_empty() {
            let p = std::mem::take(&mut self.partial);
            self.line_bytes(&p, true)?;
        }
        debug_assert!(self.log.check().is_empty(), "{:?}", self.log.check());
        Ok(self.log)
    }

    fn line_bytes(&mut self, raw: &[u8], last: bool) -> Result<(), ParseError> {
        self.log.lines += 1;
        let no = self.log.lines;
        let r = match std::str::from_utf8(raw) {
            Ok(s) => self.line(s.strip_suffix('\r').unwrap_or(s)),
            Err(e) => Err(format!("not UTF-8 text (byte {})", e.valid_up_to())),
        };
        match r {
            Ok(()) => Ok(()),
            Err(msg) => {
                let msg = if last { format!("{msg} (truncated last line: no newline at end of file)") } else { msg };
                if self.lenient {
                    self.log.skipped += 1;
                    if self.log.skipped_examples.len() < 10 {
                        self.log.skipped_examples.push((no, msg));
                    }
                    Ok(())
                } else {
                    Err(ParseError { line: no, message: msg })
                }
            }
        }
    }

    fn line(&mut self, line: &str) -> Result<(), String> {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || is_meta_line(t) {
            self.chain_of = None;
            if let Some(n) = lost_events(t) {
                self.log.lost_events += n;
            }
            return Ok(());
        }
        match split_head(line) {
            Some(h) => {
                self.chain_of = None;
                let h = h?;
                self.event(h)
            }
            None => self.frame(t),
        }
    }

    /// A callchain frame: `addr symbol+off (dso)`.
    fn frame(&mut self, t: &str) -> Result<(), String> {
        let mut it = t.split_ascii_whitespace();
        let addr = it.next().unwrap_or("");
        if addr.is_empty() || !addr.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("not an event line (no '[cpu]'): '{}'", clip(t)));
        }
        let sym = it.next().unwrap_or("[unknown]");
        if let Some(i) = self.chain_of {
            let name = sym.split('+').next().unwrap_or(sym);
            if !is_alloc_func(name) {
                let id = self.log.strings.intern(sym);
                self.log.events[i].call_site = id;
                self.chain_of = None;
            }
        }
        Ok(())
    }

    fn event(&mut self, h: Head<'_>) -> Result<(), String> {
        let (name_id, kind, known) = match self.kind_memo.get(h.name) {
            Some(&v) => v,
            None => {
                let v = match lookup_kind(h.name) {
                    Some((full, k)) => (self.log.strings.intern(full), k, true),
                    None => (self.log.strings.intern(h.name), Kind::Other, false),
                };
                self.kind_memo.insert(h.name.into(), v);
                v
            }
        };
        let mut r = Rec::new(kind);
        r.ts_ns = h.ts_ns;
        r.cpu = h.cpu;
        r.pid = h.pid;
        if !known {
            r.flags |= F_UNKNOWN;
        }
        if let Err(e) = self.decode(&mut r, h.fields) {
            return Err(format!("{}: {e}", self.log.strings.get(name_id)));
        }
        let log = &mut self.log;
        r.name = name_id;
        r.comm = log.strings.intern(h.comm);
        if kind == Kind::Other {
            r.aux = log.arena.len() as u64;
            r.extra = u32::try_from(h.fields.len()).map_err(|_| "line too long".to_string())?;
            log.arena.push_str(h.fields);
        }
        if r.flags & F_UNKNOWN != 0 {
            log.unknown += 1;
        }
        *log.name_counts.entry(r.name).or_insert(0) += 1;
        if kind == Kind::MmPageAlloc {
            self.chain_of = Some(log.events.len());
        }
        log.events.push(r);
        Ok(())
    }

    fn decode(&mut self, r: &mut Rec, text: &str) -> Result<(), String> {
        if r.kind == Kind::Other {
            return Ok(());
        }
        // Which fields were seen (bit per key below).
        let mut seen = 0u32;
        let mut page_null = false;
        for (k, v) in FieldIter::new(text) {
            let Some(k) = k else {
                return Err(format!("unexpected '{}'", clip(v)));
            };
            let bit = match k {
                "call_site" => {
                    r.call_site = self.log.strings.intern(v);
                    1
                }
                "ptr" => {
                    r.ptr = parse_ptr(v)?;
                    2
                }
                "bytes_req" | "size" => {
                    r.bytes_req = parse_u64(k, v)?;
                    4
                }
                "bytes_alloc" => {
                    r.bytes_alloc = parse_u64(k, v)?;
                    8
                }
                "gfp_flags" => {
                    r.gfp = match self.gfp_memo.get(v) {
                        Some(&g) => g,
                        None => {
                            let g = parse_gfp(v)?;
                            self.gfp_memo.insert(v.into(), g);
                            g
                        }
                    };
                    16
                }
                "node" => {
                    r.node = small(k, parse_i64(k, v)?)?;
                    32
                }
                "accounted" => {
                    if parse_bool(k, v)? {
                        r.flags |= F_ACCOUNTED;
                    }
                    64
                }
                "name" => {
                    r.cache = self.log.strings.intern(v);
                    128
                }
                "page" => {
                    page_null = parse_ptr(v)? == 0;
                    256
                }
                "pfn" => {
                    r.ptr = parse_pfn(v)?;
                    512
                }
                "order" => {
                    r.order = small(k, parse_i64(k, v)?)?;
                    1024
                }
                "migratetype" => {
                    r.migratetype = small(k, parse_i64(k, v)?)?;
                    2048
                }
                "percpu_refill" => {
                    if parse_bool(k, v)? {
                        r.flags |= F_REFILL;
                    }
                    4096
                }
                "reserved" => {
                    if parse_bool(k, v)? {
                        r.flags |= F_RESERVED;
                    }
                    8192
                }
                "is_atomic" => {
                    if parse_bool(k, v)? {
                        r.flags |= F_ATOMIC;
                    }
                    16384
                }
                "align" => {
                    r.extra = small(k, parse_i64(k, v)?)?;
                    32768
                }
                "base_addr" => {
                    r.aux = parse_ptr(v)?;
                    65536
                }
                "off" => {
                    r.off = small(k, parse_i64(k, v)?)?;
                    131072
                }
                _ => 0, // a field of another kernel version
            };
            seen |= bit;
        }
        let need: u32 = match r.kind {
            Kind::Kmalloc | Kind::KmallocNode => 1 | 2 | 4 | 8 | 16,
            Kind::KmemCacheAlloc | Kind::KmemCacheAllocNode => 1 | 2 | 4 | 8 | 16,
            Kind::Kfree => 1 | 2,
            Kind::KmemCacheFree => 1 | 2,
            Kind::MmPageAlloc => 512 | 1024 | 2048 | 16,
            Kind::MmPageFree | Kind::MmPagePcpuDrain => 512 | 1024,
            Kind::MmPageFreeBatched => 512,
            Kind::MmPageAllocZoneLocked => 512 | 1024 | 2048,
            Kind::PercpuAllocPercpu => 2 | 4 | 32768 | 65536 | 131072,
            Kind::PercpuFreePercpu => 2 | 65536 | 131072,
            Kind::Other => 0,
        };
        if seen & need != need {
            let names = [
                "call_site", "ptr", "bytes_req", "bytes_alloc", "gfp_flags", "node", "accounted", "name", "page", "pfn",
                "order", "migratetype", "percpu_refill", "reserved", "is_atomic", "align", "base_addr", "off",
            ];
            let missing: Vec<&str> =
                (0..names.len()).filter(|b| need & !seen & (1 << b) != 0).map(|b| names[b]).collect();
            return Err(format!("missing field {}", missing.join(", ")));
        }
        if r.kind == Kind::MmPageAlloc && (page_null || (seen & 256 == 0 && r.ptr == 0)) {
            r.flags |= F_FAILED;
        }
        if r.kind == Kind::PercpuAllocPercpu && seen & 8 == 0 {
            r.bytes_alloc = r.bytes_req;
        }
        Ok(())
    }
}

fn clip(s: &str) -> String {
    let mut e = s.len().min(60);
    while !s.is_char_boundary(e) {
        e -= 1;
    }
    if e < s.len() {
        format!("{}...", &s[..e])
    } else {
        s.to_string()
    }
}

/// Parse a whole text.
pub fn parse_str(text: &str, lenient: bool) -> Result<TraceLog, ParseError> {
    let mut p = Parser::new(lenient);
    p.feed(text.as_bytes())?;
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
            perf  5217 [000]   329.328933:                   kmem:kmalloc: call_site=sched_setaffinity+0x10c ptr=0xffff88810442cb20 bytes_req=32 bytes_alloc=32 gfp_flags=GFP_KERNEL node=-1 accounted=false
            perf  5217 [001]   329.329056:                     kmem:kfree: call_site=sched_setaffinity+0x160 ptr=0xffff88810442cb20
            perf  5217 [001]   329.329062:          kmem:kmem_cache_alloc: call_site=getname_flags.part.0+0x24 ptr=0xffff88810087c000 name=names_cache bytes_req=4096 bytes_alloc=4096 gfp_flags=GFP_KERNEL node=-1 accounted=false
            perf  5217 [001]   329.329170:             kmem:mm_page_alloc: page=0x1057ab pfn=0x1057ab order=0 migratetype=0 gfp_flags=GFP_HIGHUSER|__GFP_ACCOUNT
 kworker/1:1-eve    41 [001]   329.363819: vmalloc:free_vmap_area_noflush: va_start=0xffffc90004194000 nr_lazy=8220 nr_lazy_max=16384
";

    #[test]
    fn perf_script_lines() {
        let log = parse_str(SAMPLE, false).unwrap();
        assert_eq!(log.len(), 5);
        let k = &log.events[0];
        assert_eq!(k.kind, Kind::Kmalloc);
        assert_eq!((k.cpu, k.pid, k.ts_ns), (0, 5217, 329_328_933_000));
        assert_eq!(log.comm(0), "perf");
        assert_eq!(log.strings.get(k.call_site), "sched_setaffinity+0x10c");
        assert_eq!((k.ptr, k.bytes_req, k.bytes_alloc, k.gfp, k.node), (0xffff88810442cb20, 32, 32, gfp::GFP_KERNEL, -1));
        assert_eq!(log.strings.get(log.events[2].cache), "names_cache");
        let p = &log.events[3];
        assert_eq!((p.kind, p.ptr, p.order, p.migratetype), (Kind::MmPageAlloc, 0x1057ab, 0, 0));
        assert_eq!(p.gfp, gfp::GFP_HIGHUSER | gfp::__GFP_ACCOUNT);
        assert_eq!(log.comm(4), "kworker/1:1-eve");
        assert_eq!(log.name(4), "vmalloc:free_vmap_area_noflush");
        assert_eq!(log.raw_text(4), "va_start=0xffffc90004194000 nr_lazy=8220 nr_lazy_max=16384");
        assert_eq!(log.fields(4)[1], ("nr_lazy".to_string(), Value::UInt(8220)));
        assert_eq!(log.count("kmem:kmalloc"), 1);
        assert_eq!(log.unknown, 0);
    }

    #[test]
    fn trace_pipe_lines() {
        let t = "cpus=2\nCPU 0 is empty\nCPU:1 [LOST 12 EVENTS]\n# tracer: nop\n#\n              sh-5218    [001] d..1.   329.329371: kmalloc: call_site=single_open+0x2a/0x90 ptr=0xffff888102b19e80 bytes_req=32 bytes_alloc=32 gfp_flags=GFP_KERNEL_ACCOUNT node=-1 accounted=true\n  my-comm-12 [000] .....  1.5: mm_page_free: page=0x10 pfn=0x10 order=3\n";
        let log = parse_str(t, false).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log.name(0), "kmem:kmalloc");
        assert_eq!((log.events[0].pid, log.events[0].cpu), (5218, 1));
        assert_eq!(log.comm(1), "my-comm");
        assert_eq!(log.events[1].ts_ns, 1_500_000_000);
        assert_eq!(log.events[1].order, 3);
        assert_eq!(log.lost_events, 12);
    }

    #[test]
    fn callchain_gives_page_call_site() {
        let t = "perf 1 [000] 1.000001: kmem:mm_page_alloc: page=0x10 pfn=0x10 order=0 migratetype=0 gfp_flags=GFP_KERNEL\n\tffffffff81234567 __alloc_pages_noprof+0x1a3 ([kernel.kallsyms])\n\tffffffff81234568 alloc_pages_mpol+0x10 ([kernel.kallsyms])\n\tffffffff81234569 pte_alloc_one+0x20 ([kernel.kallsyms])\n\tffffffff8123456a do_fault+0x20 ([kernel.kallsyms])\n\n";
        let log = parse_str(t, false).unwrap();
        assert_eq!(log.strings.get(log.events[0].call_site), "pte_alloc_one+0x20");
    }

    #[test]
    fn errors_name_the_line_and_lenient_counts() {
        let t = format!("{}garbage here\n{}", &SAMPLE[..SAMPLE.find('\n').unwrap() + 1], SAMPLE);
        let e = parse_str(&t, false).unwrap_err();
        assert_eq!(e.line, 2);
        let log = parse_str(&t, true).unwrap();
        assert_eq!((log.skipped, log.len()), (1, 6));
        // A truncated last line.
        let cut = &SAMPLE[..SAMPLE.find("bytes_alloc=32").unwrap() + 12];
        let e = parse_str(cut, false).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("truncated"), "{e}");
        // Missing fields.
        let e = parse_str("a 1 [000] 1.0: kmem:kfree: ptr=0x10\n", false).unwrap_err();
        assert!(e.message.contains("missing field call_site"), "{e}");
    }

    #[test]
    fn failed_page_alloc() {
        let log = parse_str(
            "kmm 0 [000] 0.000001: kmem:mm_page_alloc: page=(nil) pfn=0x0 order=10 migratetype=0 gfp_flags=GFP_DMA|__GFP_NOWARN\n",
            false,
        )
        .unwrap();
        assert!(log.events[0].flags & F_FAILED != 0);
    }

    #[test]
    fn unknown_events_are_kept_and_counted() {
        let log = parse_str("x 1 [001] 2.000000: sched:sched_switch: prev_comm=a prev_pid=1\n", false).unwrap();
        assert_eq!((log.len(), log.unknown), (1, 1));
        assert_eq!(log.fields(0)[1], ("prev_pid".to_string(), Value::UInt(1)));
    }

    #[test]
    fn check_reports_exactly_the_corruption() {
        let mut log = parse_str(SAMPLE, false).unwrap();
        assert!(log.check().is_empty());
        log.unknown = 3;
        log.events[1].name = 999;
        let errs = log.check();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("perf-script-2: 0 unknown events, counted 3"));
        assert!(errs[1].starts_with("event 1: name id 999"));
    }

    #[test]
    fn chunk_boundaries_do_not_matter() {
        let whole = parse_str(SAMPLE, false).unwrap();
        for step in [1, 7, 64] {
            let mut p = Parser::new(false);
            for c in SAMPLE.as_bytes().chunks(step) {
                p.feed(c).unwrap();
            }
            let log = p.finish().unwrap();
            assert_eq!(log.events, whole.events);
        }
    }
}
