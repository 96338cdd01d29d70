//! perf.data input: the binary file `perf record` writes, decoded into the
//! same [`TraceLog`] the text parser builds from `perf script`'s text of it.
//!
//! Each tracepoint is decoded from the format description stored in the
//! file's own tracing data (offsets, sizes and the `print fmt`, see
//! `tp_format.rs`), never from a table of offsets compiled into kmm. For an
//! event kmm decodes (kmalloc, kfree, page events, percpu, ...) the keys it
//! reads are resolved once per event type to the print-fmt conversions that
//! print them; each record then reads only those fields. Other events
//! (vmalloc:*, mm_page_alloc_extfrag, rss_stat, unknown events) are printed
//! from their print fmt as libtraceevent prints them, so
//! [`TraceLog::fields`] gives the same values as for the text.
//!
//! What `perf script` derives from more than the record, done as perf 6.1
//! does it:
//! - order: perf's ordered-events queue (`tools/perf/util/ordered-events.c`):
//!   records are queued by time; at each PERF_RECORD_FINISHED_ROUND those at
//!   or before the previous round's newest time are delivered; equal times
//!   keep file order (`queue_event` inserts after equal timestamps).
//! - comm: the thread's latest PERF_RECORD_COMM, inherited at
//!   PERF_RECORD_FORK when the parent had one, `:TID` for a thread never
//!   named, `swapper` for 0 (`tools/perf/util/machine.c`,
//!   `machine__process_{comm,fork}_event`, `thread__fork`; an EXIT only marks
//!   the thread dead in 6.1).
//! - pid: the sample's TID (perf script's default `tid` field); cpu: the
//!   sample's CPU; time: the sample's TIME (CLOCK_MONOTONIC with `-k
//!   CLOCK_MONOTONIC`) cut to microseconds, as perf script prints `%lu.%06lu`.
//! - call sites: raw addresses resolved through the bundle's kallsyms
//!   (`kallsyms.rs`) inside the kernel map of the file's
//!   `[kernel.kallsyms]_text` MMAP, as libtraceevent's `%pS` prints them;
//!   without kallsyms, or outside every symbol, `0x<address>` as perf prints
//!   an address it cannot resolve.
//! - lost data: PERF_RECORD_LOST records (perf's "lost N chunks") and the
//!   events they count, and PERF_RECORD_LOST_SAMPLES, in
//!   [`TraceLog::lost_chunks`], [`TraceLog::lost_events`],
//!   [`TraceLog::lost_samples`].
//!
//! # Why linux-perf-data
//! Two maintained crates read perf.data. `tracepoint_perf` (with
//! `tracepoint_decode`) parses the tracing data too, but opens files by path
//! only (a decompressed `.xz` would have to go through a temporary file),
//! sorts events only within each round (perf's rounds overlap, so its order
//! is not perf script's), and cannot read `perf record -z` files.
//! `linux-perf-data` (used by samply, the Firefox profiler's importer) reads
//! from any `Read + Seek` (bytes in memory), orders records with perf's
//! round rule and ties in file order, decompresses zstd records, and parses
//! each record's layout per event attribute (`linux-perf-event-reader`).
//! It leaves the tracing data to the caller: its parser is
//! [`parse_tracing_data`] here (the layout of `tools/perf/util/trace-event-read.c`),
//! the format files are `tp_format.rs`'s (tracepoint_decode's parser asserts
//! its own deductions with `debug_assert!`/`panic!`, which a hostile format
//! could trip in a debug build; and the print fmt has to be evaluated anyway).
//! The crate trusts the header's sizes (it allocates what a section or
//! count claims), so every offset, size and count it will read is checked
//! here first and it is handed a header that names only checked sections
//! (`Overlay`).
//!
//! # Bad input
//! Every failure is a [`PerfDataError`] with the byte offset where there is
//! one. A file cut inside its data section has lost its tracing data (perf
//! writes the feature sections after the data): an error. A file cut after
//! the tracing data (inside later feature sections) is decoded and
//! [`TraceLog::truncated_at`] says where it ended. With `lenient`, a corrupt
//! record ends the data there (the events before it are kept,
//! `truncated_at` set), and samples that cannot be decoded are skipped and
//! counted in [`TraceLog::skipped`] (examples hold their byte offset).
//!
//! Differences from perf script's text: none in the decoded events of
//! Linux 6.18's kmem, percpu and vmalloc tracepoints (tested on two
//! recordings: every field of every event, call sites included, equal).
//! SIMPLIFICATION: an event whose print fmt `tp_format.rs` cannot compile
//! (none of the kmem, percpu and vmalloc events of 6.18) is printed as
//! libtraceevent's `tep_print_fields` prints fields (`name=value` by the
//! struct's names) rather than as perf would, so its `fields()` are the
//! struct's; call sites in modules resolve as if perf ran on the recording
//! machine (`kallsyms.rs`); pipe-mode files (`perf record -o -`) and
//! AUXTRACE records are refused with what to do instead.
//!
//! # Invariants
//! - perf-data-1: decoding never panics, whatever the bytes, and allocates
//!   for a size or count read from the file only once it is checked against
//!   the file's length (proptest over mutated real files,
//!   `tests/perf_data.rs`). The exception is what perf itself trusts: the
//!   zstd records of `perf record -z` expand as their frames say (at most
//!   ~128 KiB per compressed block).
//! - perf-data-2: the TraceLog's events are in perf script's order: time
//!   non-decreasing except where perf itself delivers a late record.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};

use linux_perf_data::linux_perf_event_reader::{CpuMode, EventRecord, RecordType};
use linux_perf_data::{PerfFileReader, PerfFileRecord};

use super::kallsyms::Kallsyms;
use super::perf_script::{
    self as ps, Kind, Parser, Rec, TraceLog, F_ACCOUNTED, F_ATOMIC, F_FAILED, F_REFILL, F_RESERVED, F_UNKNOWN,
};
use super::tp_format::{Format, Program, Symbols};

/// What `perf record` command gives kmm what it needs.
pub const RECORD_HINT: &str = "perf record -k CLOCK_MONOTONIC -e 'kmem:*,percpu:*,vmalloc:*' -a -- sleep 10";

/// A perf.data that cannot be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PerfDataError {
    /// Byte offset in the (decompressed) file, where there is one.
    pub offset: Option<u64>,
    pub message: String,
}

impl fmt::Display for PerfDataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(o) => write!(f, "byte {o}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for PerfDataError {}

fn err(message: impl Into<String>) -> PerfDataError {
    PerfDataError { offset: None, message: message.into() }
}

fn err_at(offset: u64, message: impl Into<String>) -> PerfDataError {
    PerfDataError { offset: Some(offset), message: message.into() }
}

// ---------------------------------------------------------------------------
// What a file is
// ---------------------------------------------------------------------------

/// What the first bytes of a (decompressed) file look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// A perf.data file (`PERFILE2`, either byte order).
    PerfData,
    /// Text: perf script or trace_pipe output, for the text parser.
    Text,
    /// Neither: what it looks like, and what would work.
    NotATrace(String),
}

/// What to record or convert, for messages about files that are no trace.
pub const WHAT_WORKS: &str = "kmm reads perf.data (perf record -k CLOCK_MONOTONIC -e 'kmem:*,percpu:*,vmalloc:*' -a) \
     or its `perf script` text, plain, .gz or .xz";

/// Classify a file by its first bytes (up to a few KiB of its decompressed
/// content; `head` empty means an empty file).
pub fn sniff(head: &[u8]) -> Content {
    let not = |what: &str| Content::NotATrace(format!("this looks like {what}, not a trace: {WHAT_WORKS}"));
    if head.is_empty() {
        return Content::NotATrace(format!("no events (the file is empty): {WHAT_WORKS}"));
    }
    if head.starts_with(b"PERFILE2") || head.starts_with(b"2ELIFREP") {
        let be = head.starts_with(b"2ELIFREP");
        if rd64(head, 8, be) == Some(16) {
            return Content::NotATrace(
                "this is a perf.data in pipe mode (perf record -o -); kmm reads the file form: convert it with \
                 `perf inject -i IN -o OUT.data`"
                    .into(),
            );
        }
        return Content::PerfData;
    }
    let magics: &[(&[u8], &str)] = &[
        (b"PERFFILE", "a perf.data of the old version 1 format (perf before 2010)"),
        (b"\x7fELF", "an ELF file (a program, library or vmlinux)"),
        (b"\x89PNG", "a PNG image"),
        (b"GIF8", "a GIF image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"%PDF", "a PDF document"),
        (b"PK\x03\x04", "a zip archive"),
        (b"\x28\xb5\x2f\xfd", "zstd-compressed data (decompress it with zstd -d first)"),
        (b"BZh", "bzip2-compressed data (decompress it with bunzip2 first)"),
        (b"\x1f\x8b", "gzip data compressed twice"),
        (b"\xfd7zXZ\x00", "xz data compressed twice"),
        (b"SQLite format 3\x00", "an SQLite database"),
    ];
    for (m, what) in magics {
        if head.starts_with(m) {
            return not(what);
        }
    }
    let t = head.iter().position(|c| !c.is_ascii_whitespace()).map_or(&head[..0], |i| &head[i..]);
    if let Some(&c) = t.first() {
        let next = t[1..].iter().find(|c| !c.is_ascii_whitespace());
        let json = match c {
            b'{' => matches!(next, Some(b'"' | b'}')),
            b'[' => matches!(next, Some(b'{' | b'[' | b'"' | b']')),
            _ => false,
        };
        if json {
            return not("JSON");
        }
    }
    if head.contains(&0) {
        return not("binary data (it has NUL bytes)");
    }
    match std::str::from_utf8(head) {
        Ok(_) => Content::Text,
        // A multi-byte character cut by the end of the sniffed bytes is fine.
        Err(e) if e.error_len().is_none() => Content::Text,
        Err(_) => not("binary data (it is not UTF-8 text)"),
    }
}

// ---------------------------------------------------------------------------
// Byte helpers (every read is checked)
// ---------------------------------------------------------------------------

fn rd32(d: &[u8], off: u64, be: bool) -> Option<u32> {
    let off = usize::try_from(off).ok()?;
    let b: [u8; 4] = d.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(if be { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) })
}

fn rd64(d: &[u8], off: u64, be: bool) -> Option<u64> {
    let off = usize::try_from(off).ok()?;
    let b: [u8; 8] = d.get(off..off.checked_add(8)?)?.try_into().ok()?;
    Some(if be { u64::from_be_bytes(b) } else { u64::from_le_bytes(b) })
}

/// `[off, off+size)` lies inside `len` bytes.
fn fits(off: u64, size: u64, len: u64) -> bool {
    off.checked_add(size).is_some_and(|e| e <= len)
}

fn slice(d: &[u8], off: u64, size: u64) -> &[u8] {
    if !fits(off, size, d.len() as u64) {
        return &[];
    }
    &d[off as usize..(off + size) as usize]
}

// ---------------------------------------------------------------------------
// The header (tools/perf/util/header.h struct perf_file_header)
// ---------------------------------------------------------------------------

const HEADER_SIZE: u64 = 104;
/// Feature bits (tools/perf/util/header.h enum HEADER_*).
const FEAT_TRACING_DATA: u32 = 1;
const FEAT_EVENT_DESC: u32 = 12;
const FEAT_COMPRESSED: u32 = 27;
/// PERF_RECORD_AUXTRACE (tools/lib/perf/include/perf/event.h).
const PERF_RECORD_AUXTRACE: u32 = 71;
/// PERF_ATTR_SIZE_VER0 + the ids file section after each attr.
const MIN_ATTR_SIZE: u64 = 64 + 16;

struct Header {
    be: bool,
    attr_size: u64,
    attrs: (u64, u64),
    data: (u64, u64),
    /// (feature bit, offset, size) of every feature whose section is in the file.
    features: Vec<(u32, u64, u64)>,
    /// Features named in the header whose sections are past the end.
    lost_features: Vec<u32>,
    truncated_at: Option<u64>,
}

impl Header {
    fn read(d: &[u8]) -> Result<Header, PerfDataError> {
        let len = d.len() as u64;
        let be = d.starts_with(b"2ELIFREP");
        if !(be || d.starts_with(b"PERFILE2")) {
            return Err(err_at(0, "not a perf.data file (it does not start with PERFILE2)"));
        }
        let size = rd64(d, 8, be).ok_or_else(|| err_at(len, "the file ends inside the perf.data header"))?;
        if size == 16 {
            return Err(err_at(8, "a perf.data in pipe mode (perf record -o -): convert it with `perf inject -i IN -o OUT.data`"));
        }
        if size != HEADER_SIZE {
            return Err(err_at(8, format!("header size {size}: not a perf.data header kmm knows (104 bytes)")));
        }
        if len < HEADER_SIZE {
            return Err(err_at(len, "the file ends inside the perf.data header (104 bytes): truncated"));
        }
        let r = |o: u64| rd64(d, o, be).unwrap_or(0);
        let attr_size = r(16);
        let attrs = (r(24), r(32));
        let data = (r(40), r(48));
        if !(MIN_ATTR_SIZE..=4096).contains(&attr_size) {
            return Err(err_at(16, format!("attribute size {attr_size}: corrupt header")));
        }
        if !fits(attrs.0, attrs.1, u64::MAX) || attrs.1 == 0 {
            return Err(err_at(24, "corrupt header: bad attributes section"));
        }
        if !fits(attrs.0, attrs.1, len) {
            return Err(err_at(len, format!(
                "truncated: the event attributes (bytes {}..{}) are past the end of the file",
                attrs.0,
                attrs.0 + attrs.1
            )));
        }
        if !fits(data.0, data.1, u64::MAX) || data.0 < HEADER_SIZE {
            return Err(err_at(40, "corrupt header: bad data section"));
        }
        if data.1 == 0 {
            return Err(err_at(48, "the header's data size is 0: perf record did not finish writing this file \
                 (it was interrupted), so the event formats it writes at the end are missing"));
        }
        let data_end = data.0 + data.1;
        if data_end > len {
            return Err(err_at(len, format!(
                "truncated at byte {len}: the data section runs to byte {data_end}, and the event formats \
                 (tracing data) that perf stores after it are lost, so no event can be decoded"
            )));
        }
        let mut h = Header { be, attr_size, attrs, data, features: Vec::new(), lost_features: Vec::new(), truncated_at: None };
        let mut k = 0u64;
        for word in 0..4u64 {
            let bits = r(72 + 8 * word);
            for b in 0..64u32 {
                if bits >> b & 1 == 0 {
                    continue;
                }
                let bit = word as u32 * 64 + b;
                let at = data_end + 16 * k;
                k += 1;
                match (rd64(d, at, be), rd64(d, at + 8, be)) {
                    (Some(off), Some(sz)) if fits(off, sz, len) => h.features.push((bit, off, sz)),
                    (Some(off), Some(sz)) if fits(off, sz, u64::MAX) => {
                        h.lost_features.push(bit);
                        h.truncated_at = Some(len);
                    }
                    (Some(_), Some(_)) => return Err(err_at(at, format!("corrupt feature section table (feature {bit})"))),
                    _ => {
                        h.lost_features.push(bit);
                        h.truncated_at = Some(len);
                    }
                }
            }
        }
        Ok(h)
    }

    fn feature<'a>(&self, d: &'a [u8], bit: u32) -> Option<(u64, &'a [u8])> {
        self.features.iter().find(|f| f.0 == bit).map(|&(_, off, sz)| (off, slice(d, off, sz)))
    }
}

/// The file as the crate sees it: our header (only checked sections named)
/// and feature table over the real bytes.
struct Overlay<'a> {
    data: &'a [u8],
    head: [u8; HEADER_SIZE as usize],
    table_at: u64,
    table: Vec<u8>,
    pos: u64,
}

impl Read for Overlay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = self.data.len() as u64;
        let table_end = self.table_at + self.table.len() as u64;
        let (src, until): (&[u8], u64) = if self.pos < HEADER_SIZE {
            (&self.head[self.pos as usize..], HEADER_SIZE)
        } else if self.pos >= self.table_at && self.pos < table_end {
            (&self.table[(self.pos - self.table_at) as usize..], table_end)
        } else if self.pos < len {
            let until = if self.pos < self.table_at { self.table_at.min(len) } else { len };
            (&self.data[self.pos as usize..until as usize], until)
        } else {
            return Ok(0);
        };
        let n = buf.len().min(src.len()).min((until - self.pos) as usize);
        buf[..n].copy_from_slice(&src[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Overlay<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let end = (self.data.len() as u64).max(self.table_at + self.table.len() as u64);
        let p = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => end.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = p.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        Ok(self.pos)
    }
}

// ---------------------------------------------------------------------------
// Event attributes
// ---------------------------------------------------------------------------

struct Attr {
    type_: u32,
    config: u64,
    ids: Vec<u64>,
    name: Option<String>,
}

/// The attr section: `attr_size`-byte entries, each a perf_event_attr and
/// the file section of its ids.
fn read_attrs(d: &[u8], h: &Header) -> Result<Vec<Attr>, PerfDataError> {
    let n = h.attrs.1 / h.attr_size;
    if n == 0 || n > 65536 {
        return Err(err_at(h.attrs.0, format!("{n} event attributes: corrupt header")));
    }
    let mut v = Vec::with_capacity(n as usize);
    for i in 0..n {
        let base = h.attrs.0 + i * h.attr_size;
        let type_ = rd32(d, base, h.be).unwrap_or(0);
        let config = rd64(d, base + 8, h.be).unwrap_or(0);
        let ids_at = base + h.attr_size - 16;
        let (off, sz) = (rd64(d, ids_at, h.be).unwrap_or(0), rd64(d, ids_at + 8, h.be).unwrap_or(0));
        if !fits(off, sz, d.len() as u64) || sz % 8 != 0 {
            return Err(err_at(ids_at, format!("event attribute {i}: its ids (bytes {off}+{sz}) are not in the file")));
        }
        let ids = (0..sz / 8).filter_map(|j| rd64(d, off + 8 * j, h.be)).collect();
        v.push(Attr { type_, config, ids, name: None });
    }
    Ok(v)
}

/// HEADER_EVENT_DESC: `nr, attr_size, {attr, nr_ids, string, ids[nr_ids]}[nr]`;
/// checks every count and size, returns (name, ids) per event.
fn read_event_desc(sec: &[u8], base: u64, be: bool) -> Result<Vec<(String, Vec<u64>)>, PerfDataError> {
    let len = sec.len() as u64;
    let bad = |at: u64, what: &str| err_at(base + at, format!("corrupt event descriptions (EVENT_DESC): {what}"));
    let nr = rd32(sec, 0, be).ok_or_else(|| bad(0, "too short"))? as u64;
    let attr_size = rd32(sec, 4, be).ok_or_else(|| bad(4, "too short"))? as u64;
    if !(64..=4096).contains(&attr_size) {
        return Err(bad(4, &format!("attribute size {attr_size}")));
    }
    // The attr's own size field must not claim more than attr_size, nor less than VER0.
    let mut v = Vec::new();
    let mut p = 8u64;
    for _ in 0..nr {
        let asz = rd32(sec, p + 4, be).ok_or_else(|| bad(p, "an attribute past the end"))? as u64;
        if !(64..=attr_size).contains(&asz) || !fits(p, attr_size, len) {
            return Err(bad(p, "a bad attribute"));
        }
        p += attr_size;
        let nr_ids = rd32(sec, p, be).ok_or_else(|| bad(p, "ids count past the end"))? as u64;
        let slen = rd32(sec, p + 4, be).ok_or_else(|| bad(p + 4, "name length past the end"))? as u64;
        p += 8;
        if !fits(p, slen, len) {
            return Err(bad(p, "a name past the end"));
        }
        let name = slice(sec, p, slen);
        let name = String::from_utf8_lossy(&name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())]).into_owned();
        p += slen;
        if nr_ids.checked_mul(8).is_none_or(|n| !fits(p, n, len)) {
            return Err(bad(p, "ids past the end"));
        }
        let ids = (0..nr_ids).filter_map(|j| rd64(sec, p + 8 * j, be)).collect();
        p += 8 * nr_ids;
        v.push((name, ids));
    }
    Ok(v)
}

// ---------------------------------------------------------------------------
// Tracing data (tools/perf/util/trace-event-read.c trace_report)
// ---------------------------------------------------------------------------

/// The event formats of a tracing-data blob: (system, format text, byte
/// offset in `buf`), plus the file's byte order and sizeof(long).
pub struct TracingData {
    pub big_endian: bool,
    pub long_size: u8,
    pub formats: Vec<(String, String, u64)>,
}

/// Split perf's tracing data: magic `\x17\x08\x44tracing`, version string,
/// endianness, sizeof(long), page size, header_page, header_event, ftrace
/// formats, then per system its event formats; kallsyms, printk formats and
/// (0.6+) saved cmdlines follow and are not needed.
pub fn parse_tracing_data(buf: &[u8]) -> Result<TracingData, (u64, String)> {
    let len = buf.len() as u64;
    let mut p: u64;
    let need = |p: u64, n: u64, what: &str| -> Result<(), (u64, String)> {
        if fits(p, n, len) {
            Ok(())
        } else {
            Err((p, format!("the tracing data ends inside {what}")))
        }
    };
    need(0, 10, "its magic")?;
    if &buf[..10] != b"\x17\x08\x44tracing" {
        return Err((0, "the tracing data does not start with its magic".into()));
    }
    p = 10;
    let rest = &buf[p as usize..];
    let vlen = rest.iter().position(|&c| c == 0).ok_or((p, "the tracing data's version string is not terminated".to_string()))?;
    let version = String::from_utf8_lossy(&rest[..vlen]).into_owned();
    p += vlen as u64 + 1;
    need(p, 6, "its header")?;
    let big_endian = buf[p as usize] != 0;
    let long_size = buf[p as usize + 1];
    if long_size != 4 && long_size != 8 {
        return Err((p + 1, format!("the tracing data says sizeof(long) is {long_size}")));
    }
    p += 2 + 4; // page size
    // header_page and header_event: a NUL-terminated tag, then a u64 size.
    for tag in [&b"header_page\0"[..], &b"header_event\0"[..]] {
        need(p, tag.len() as u64 + 8, "header_page/header_event")?;
        if &buf[p as usize..p as usize + tag.len()] != tag {
            return Err((p, "the tracing data has no header_page/header_event".into()));
        }
        p += tag.len() as u64;
        let sz = rd64(buf, p, big_endian).unwrap_or(u64::MAX);
        p += 8;
        need(p, sz, "header_page/header_event")?;
        p += sz;
    }
    // ftrace formats: u32 count, each u64 size + text.
    need(p, 4, "the ftrace formats")?;
    let n = rd32(buf, p, big_endian).unwrap_or(0) as u64;
    p += 4;
    for _ in 0..n {
        need(p, 8, "the ftrace formats")?;
        let sz = rd64(buf, p, big_endian).unwrap_or(u64::MAX);
        p += 8;
        need(p, sz, "the ftrace formats")?;
        p += sz;
    }
    // Event formats: u32 systems, each: name\0, u32 count, each u64 size + text.
    need(p, 4, "the event formats")?;
    let systems = rd32(buf, p, big_endian).unwrap_or(0);
    p += 4;
    let mut formats = Vec::new();
    for _ in 0..systems {
        let rest = buf.get(p as usize..).unwrap_or(&[]);
        let slen = rest.iter().position(|&c| c == 0).ok_or((p, "the tracing data ends inside a system name".to_string()))?;
        let system = String::from_utf8_lossy(&rest[..slen]).into_owned();
        p += slen as u64 + 1;
        need(p, 4, "the event formats")?;
        let count = rd32(buf, p, big_endian).unwrap_or(0);
        p += 4;
        for _ in 0..count {
            need(p, 8, "the event formats")?;
            let sz = rd64(buf, p, big_endian).unwrap_or(u64::MAX);
            p += 8;
            need(p, sz, "an event format")?;
            let text = String::from_utf8_lossy(slice(buf, p, sz)).into_owned();
            formats.push((system.clone(), text, p));
            p += sz;
        }
    }
    let _ = version;
    Ok(TracingData { big_endian, long_size, formats })
}

// ---------------------------------------------------------------------------
// Decoding one event type
// ---------------------------------------------------------------------------

/// The keys the text parser reads (`perf_script.rs` `Parser::decode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    CallSite,
    Ptr,
    BytesReq,
    BytesAlloc,
    Gfp,
    Node,
    Accounted,
    Name,
    Page,
    Pfn,
    Order,
    Migratetype,
    PercpuRefill,
    Reserved,
    IsAtomic,
    Align,
    BaseAddr,
    Off,
}

impl Key {
    fn of(k: &str) -> Option<Key> {
        Some(match k {
            "call_site" => Key::CallSite,
            "ptr" => Key::Ptr,
            "bytes_req" | "size" => Key::BytesReq,
            "bytes_alloc" => Key::BytesAlloc,
            "gfp_flags" => Key::Gfp,
            "node" => Key::Node,
            "accounted" => Key::Accounted,
            "name" => Key::Name,
            "page" => Key::Page,
            "pfn" => Key::Pfn,
            "order" => Key::Order,
            "migratetype" => Key::Migratetype,
            "percpu_refill" => Key::PercpuRefill,
            "reserved" => Key::Reserved,
            "is_atomic" => Key::IsAtomic,
            "align" => Key::Align,
            "base_addr" => Key::BaseAddr,
            "off" => Key::Off,
            _ => return None,
        })
    }
    /// The `seen` bit of `Parser::decode`.
    fn bit(self) -> u32 {
        1 << (self as u32)
    }
    fn name(self) -> &'static str {
        [
            "call_site", "ptr", "bytes_req", "bytes_alloc", "gfp_flags", "node", "accounted", "name", "page", "pfn",
            "order", "migratetype", "percpu_refill", "reserved", "is_atomic", "align", "base_addr", "off",
        ][self as usize]
    }
}

/// `Parser::decode`'s required keys per kind.
fn required(kind: Kind) -> u32 {
    use Key::*;
    let m = |ks: &[Key]| ks.iter().fold(0, |a, k| a | k.bit());
    match kind {
        Kind::Kmalloc | Kind::KmallocNode | Kind::KmemCacheAlloc | Kind::KmemCacheAllocNode => {
            m(&[CallSite, Ptr, BytesReq, BytesAlloc, Gfp])
        }
        Kind::Kfree | Kind::KmemCacheFree => m(&[CallSite, Ptr]),
        Kind::MmPageAlloc => m(&[Pfn, Order, Migratetype, Gfp]),
        Kind::MmPageFree | Kind::MmPagePcpuDrain => m(&[Pfn, Order]),
        Kind::MmPageFreeBatched => m(&[Pfn]),
        Kind::MmPageAllocZoneLocked => m(&[Pfn, Order, Migratetype]),
        Kind::PercpuAllocPercpu => m(&[Ptr, BytesReq, Align, BaseAddr, Off]),
        Kind::PercpuFreePercpu => m(&[Ptr, BaseAddr, Off]),
        Kind::Other => 0,
    }
}

/// How one key's value is read.
#[derive(Clone, Debug)]
enum Source {
    /// The conversion's value as a number, no text (the text would parse
    /// back to exactly this).
    Num(usize),
    /// The conversion's text (prefix + conversion + suffix) through the text
    /// parser's function, memoized by the one field it reads (if one).
    Text { conv: usize, memo_field: Option<usize> },
    /// A literal `key=value` of the print fmt.
    Const(String),
}

#[derive(Clone, Debug)]
struct Step {
    key: Key,
    read: Source,
    memo: HashMap<u64, Result<u64, String>>,
}

struct Plan {
    steps: Vec<Step>,
    /// Required keys the format does not print: every record fails as a text line would.
    missing: Option<String>,
}

/// One event attribute, ready to decode.
struct Event {
    name: String,
    name_id: u32,
    kind: Kind,
    known: bool,
    /// Tracepoint format and its program (None: not a tracepoint, or no format).
    fmt: Option<Format>,
    prog: Option<Program>,
    plan: Option<Plan>,
}

/// Which text function a key goes through, and the number it yields.
fn apply_text(log: &mut TraceLog, key: Key, text: &str) -> Result<u64, String> {
    let k = key.name();
    Ok(match key {
        Key::CallSite | Key::Name => log.strings.intern(text) as u64,
        Key::Ptr | Key::Page | Key::BaseAddr => ps::parse_ptr(text)?,
        Key::Pfn => ps::parse_pfn(text)?,
        Key::BytesReq | Key::BytesAlloc => ps::parse_u64(k, text)?,
        Key::Gfp => ps::parse_gfp(text)? as u64,
        Key::Node => ps::small::<i16>(k, ps::parse_i64(k, text)?)? as u64,
        Key::Order => ps::small::<u8>(k, ps::parse_i64(k, text)?)? as u64,
        Key::Migratetype => ps::small::<i8>(k, ps::parse_i64(k, text)?)? as u64,
        Key::Align => ps::small::<u32>(k, ps::parse_i64(k, text)?)? as u64,
        Key::Off => ps::small::<i32>(k, ps::parse_i64(k, text)?)? as u64,
        Key::Accounted | Key::PercpuRefill | Key::Reserved | Key::IsAtomic => ps::parse_bool(k, text)? as u64,
    })
}

/// The same, from a number printed by an integer or `%p` conversion
/// (`signed`: printed with %d); only for (key, conversion) pairs whose
/// text parses back to the number.
fn apply_num(key: Key, v: u64, signed: bool) -> Result<u64, String> {
    let k = key.name();
    let as_i64 = || -> Result<i64, String> {
        if signed {
            Ok(v as i64)
        } else {
            i64::try_from(v).map_err(|_| format!("bad {k} '{v}'"))
        }
    };
    Ok(match key {
        Key::Ptr | Key::Page | Key::BaseAddr | Key::Pfn => v,
        Key::BytesReq | Key::BytesAlloc => {
            if signed && (v as i64) < 0 {
                return Err(format!("bad {k} '{}'", v as i64));
            }
            v
        }
        Key::Node => ps::small::<i16>(k, as_i64()?)? as u64,
        Key::Order => ps::small::<u8>(k, as_i64()?)? as u64,
        Key::Migratetype => ps::small::<i8>(k, as_i64()?)? as u64,
        Key::Align => ps::small::<u32>(k, as_i64()?)? as u64,
        Key::Off => ps::small::<i32>(k, as_i64()?)? as u64,
        Key::Accounted | Key::PercpuRefill | Key::Reserved | Key::IsAtomic => match v {
            0 | 1 => v,
            _ => return Err(format!("bad {k} '{}'", if signed { (v as i64).to_string() } else { v.to_string() })),
        },
        Key::CallSite | Key::Name | Key::Gfp => return Err(format!("bad {k}")),
    })
}

/// The fast plan for a known event, or None when its print fmt has text
/// the fast path would read differently from the text parser (then every
/// record is printed and parsed as text).
fn build_plan(kind: Kind, name: &str, f: &Format, p: &Program) -> Option<Plan> {
    // Literal tokens must all be `key=...` (a bare word would be read by the
    // text parser as an error or glued to the value before it).
    let mut steps = Vec::new();
    let mut seen = 0u32;
    let convs = p.convs();
    // Walk the print fmt text: literal tokens and conversions in order.
    let lit_tokens = literal_key_values(p)?;
    for tok in lit_tokens {
        match tok {
            LitTok::Const(k, v) => {
                if let Some(key) = Key::of(&k) {
                    seen |= key.bit();
                    steps.push(Step { key, read: Source::Const(v), memo: HashMap::new() });
                }
            }
            LitTok::Conv(i) => {
                let c = convs.get(i)?;
                if c.key.is_empty() || c.suffix.contains('\0') {
                    return None;
                }
                let Some(key) = Key::of(&c.key) else { continue };
                seen |= key.bit();
                let sp = &c.spec;
                let plain = c.suffix.is_empty();
                let numeric = match key {
                    Key::Ptr | Key::Page | Key::BaseAddr => plain && c.prefix.is_empty() && sp.is_pointer(),
                    Key::Pfn => {
                        plain
                            && ((c.prefix == "0x" && sp.conv == b'x' && !sp.hash && sp.width == 0 && sp.precision.is_none())
                                || (c.prefix.is_empty() && sp.conv == b'u' && sp.width == 0 && sp.precision.is_none()))
                    }
                    Key::CallSite | Key::Name | Key::Gfp => false,
                    _ => plain && c.prefix.is_empty() && matches!(sp.conv, b'd' | b'i' | b'u') && sp.width == 0 && sp.precision.is_none(),
                };
                let read = if numeric {
                    Source::Num(i)
                } else {
                    let fr = p.fields_read(i);
                    // A string field read by __get_str varies freely: no memo.
                    let memo_field = (fr.len() == 1 && f.fields.get(fr[0]).is_some_and(|x| x.kind == super::tp_format::FieldKind::Scalar))
                        .then(|| fr[0]);
                    Source::Text { conv: i, memo_field }
                };
                steps.push(Step { key, read, memo: HashMap::new() });
            }
        }
    }
    let need = required(kind);
    let missing = (need & !seen != 0).then(|| {
        let names: Vec<&str> = (0..18u32).filter(|b| need & !seen & (1 << b) != 0).map(|b| [
            "call_site", "ptr", "bytes_req", "bytes_alloc", "gfp_flags", "node", "accounted", "name", "page", "pfn",
            "order", "migratetype", "percpu_refill", "reserved", "is_atomic", "align", "base_addr", "off",
        ][b as usize]).collect();
        format!("{name}: missing field {}", names.join(", "))
    });
    Some(Plan { steps, missing })
}

enum LitTok {
    /// A literal `key=value` token.
    Const(String, String),
    /// A conversion (its key is in `Conv`).
    Conv(usize),
}

/// The print fmt as the text parser would tokenize its output, or None if a
/// literal word has no `=` (the text parser would treat it specially).
fn literal_key_values(p: &Program) -> Option<Vec<LitTok>> {
    // Rebuild the literal text around each conversion with a placeholder.
    let mut text = String::new();
    p.render_template(&mut text);
    let mut out = Vec::new();
    for tok in text.split_ascii_whitespace() {
        match tok.find('\u{1}') {
            Some(at) => {
                // `key=prefix\u{1}N\u{2}suffix`
                let end = tok[at..].find('\u{2}')? + at;
                let idx: usize = tok[at + 1..end].parse().ok()?;
                if tok[end + 1..].contains('\u{1}') {
                    return None;
                }
                out.push(LitTok::Conv(idx));
            }
            None => {
                let (k, v) = tok.split_once('=')?;
                out.push(LitTok::Const(k.to_string(), v.to_string()));
            }
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Threads (tools/perf/util/machine.c, thread.c of perf 6.1)
// ---------------------------------------------------------------------------

struct Thread {
    pid: i32,
    /// Interned comm; None = never named (`:TID`).
    comm: Option<u32>,
}

#[derive(Default)]
struct Threads {
    map: HashMap<i32, Thread>,
}

impl Threads {
    fn findnew(&mut self, pid: i32, tid: i32) -> &mut Thread {
        let t = self.map.entry(tid).or_insert(Thread { pid, comm: None });
        if t.pid == -1 {
            t.pid = pid;
        }
        t
    }
}

/// `%pS` through kallsyms inside the kernel map.
struct Resolver<'a> {
    kallsyms: Option<&'a Kallsyms>,
    /// The kernel map [start, end) from the `[kernel.kallsyms]` MMAP.
    map: Option<(u64, u64)>,
    delta: u64,
}

impl Symbols for Resolver<'_> {
    fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let k = self.kallsyms?;
        let (start, end) = self.map?;
        let (name, st, module) = k.lookup(addr, self.delta)?;
        let in_kernel = addr >= start && addr < end;
        (in_kernel != module).then_some((name, st))
    }
}

// ---------------------------------------------------------------------------
// The decoder
// ---------------------------------------------------------------------------

/// Options for [`parse`].
#[derive(Clone, Copy, Default)]
pub struct Options<'a> {
    /// `/proc/kallsyms` of the recorded boot, to name call sites.
    pub kallsyms: Option<&'a Kallsyms>,
    /// Skip undecodable records (counted) instead of failing.
    pub lenient: bool,
}

/// Decode a whole perf.data file held in memory.
pub fn parse(data: &[u8], o: &Options<'_>) -> Result<TraceLog, PerfDataError> {
    let h = Header::read(data)?;
    let mut attrs = read_attrs(data, &h)?;
    let mut truncated_at = h.truncated_at;
    let mut skipped: Vec<(u64, String)> = Vec::new();
    let mut n_skipped = 0u64;

    // Names: EVENT_DESC (checked), else the tracepoint formats below.
    let mut desc_ok = false;
    if let Some((off, sec)) = h.feature(data, FEAT_EVENT_DESC) {
        match read_event_desc(sec, off, h.be) {
            Ok(descs) => {
                desc_ok = true;
                for (name, ids) in descs {
                    if let Some(a) = attrs.iter_mut().find(|a| a.name.is_none() && !ids.is_empty() && a.ids.iter().any(|i| ids.contains(i))) {
                        a.name = Some(name);
                    }
                }
            }
            Err(e) if o.lenient => {
                n_skipped += 1;
                skipped.push((e.offset.unwrap_or(0), e.message));
            }
            Err(e) => return Err(e),
        }
    }

    // Tracing data: the formats.
    let mut formats: HashMap<u64, (String, Format)> = HashMap::new();
    let tracing = h.feature(data, FEAT_TRACING_DATA);
    if let Some((off, buf)) = tracing {
        let td = parse_tracing_data(buf).map_err(|(at, m)| err_at(off + at, m))?;
        for (system, text, _) in &td.formats {
            if let Some(f) = Format::parse(text, td.big_endian, td.long_size) {
                formats.insert(f.id as u64, (system.clone(), f));
            }
        }
    }
    for a in attrs.iter_mut().filter(|a| a.name.is_none()) {
        a.name = Some(match (a.type_, formats.get(&a.config)) {
            (2, Some((sys, f))) => format!("{sys}:{}", f.name),
            (t, _) => format!("event type {t} config {:#x}", a.config),
        });
    }
    let names: Vec<&str> = attrs.iter().filter_map(|a| a.name.as_deref()).collect();
    let ours = |n: &str| n.starts_with("kmem:") || n.starts_with("percpu:") || n.starts_with("vmalloc:");
    if !names.iter().any(|n| ours(n)) {
        let list = names.iter().filter(|n| !n.starts_with("dummy:")).copied().collect::<Vec<_>>().join(", ");
        let list = if list.is_empty() { names.join(", ") } else { list };
        return Err(err(format!(
            "this perf.data has no kmem, percpu or vmalloc tracepoints (its events: {list}); record them with: {RECORD_HINT}"
        )));
    }
    if tracing.is_none() {
        return Err(match h.lost_features.contains(&FEAT_TRACING_DATA) {
            true => err_at(data.len() as u64, "truncated: the file ends inside its tracing data (the event formats), so no event can be decoded"),
            false => err("the file has no tracing data (the event formats): it cannot be decoded"),
        });
    }

    // Walk the records once: check their framing, note sample offsets.
    let (d0, d1) = (h.data.0, h.data.0 + h.data.1);
    let mut sample_offsets: Vec<u64> = Vec::new();
    let mut data_end = d1;
    let mut at = d0;
    while at < d1 {
        let (ty, size) = match (rd32(data, at, h.be), data.get(at as usize + 6..at as usize + 8)) {
            (Some(t), Some(s)) => (t, if h.be { u16::from_be_bytes([s[0], s[1]]) } else { u16::from_le_bytes([s[0], s[1]]) } as u64),
            _ => (0, 0),
        };
        let problem = if size < 8 {
            Some(format!("a record header says its size is {size} bytes: the data section is corrupt from here"))
        } else if at + size > d1 {
            Some(format!("a record of {size} bytes runs past the end of the data section (byte {d1})"))
        } else if ty == PERF_RECORD_AUXTRACE {
            // Its payload follows the record (the crate would allocate what it claims).
            Some("an AUXTRACE record (hardware trace data, not tracepoints): kmm does not read these".to_string())
        } else {
            None
        };
        if let Some(msg) = problem {
            if !o.lenient {
                return Err(err_at(at, msg));
            }
            n_skipped += 1;
            skipped.push((at, msg));
            truncated_at = Some(at);
            data_end = at;
            break;
        }
        if ty == RecordType::SAMPLE.0 {
            sample_offsets.push(at);
        }
        at += size;
    }

    // The header the crate reads: only checked sections.
    let mut head = [0u8; HEADER_SIZE as usize];
    head.copy_from_slice(&data[..HEADER_SIZE as usize]);
    let put = |head: &mut [u8; HEADER_SIZE as usize], off: usize, v: u64| {
        let b = if h.be { v.to_be_bytes() } else { v.to_le_bytes() };
        head[off..off + 8].copy_from_slice(&b);
    };
    put(&mut head, 48, data_end - d0);
    put(&mut head, 56, 0); // no legacy event_types section
    put(&mut head, 64, 0);
    let mut table = Vec::new();
    let mut bits = [0u64; 4];
    for &(bit, off, sz) in &h.features {
        if (bit == FEAT_EVENT_DESC && desc_ok) || bit == FEAT_COMPRESSED {
            bits[(bit / 64) as usize] |= 1 << (bit % 64);
            for v in [off, sz] {
                table.extend_from_slice(&if h.be { v.to_be_bytes() } else { v.to_le_bytes() });
            }
        }
    }
    for (w, b) in bits.iter().enumerate() {
        put(&mut head, 72 + 8 * w, *b);
    }
    let ov = Overlay { data, head, table_at: data_end, table, pos: 0 };
    let PerfFileReader { mut perf_file, mut record_iter } =
        PerfFileReader::parse_file(ov).map_err(|e| err(format!("cannot read the file: {e}")))?;

    // Per attribute: name, kind, format, program, plan.
    let mut parser = Parser::new(false);
    let mut events: Vec<Event> = Vec::with_capacity(attrs.len());
    let mut by_id: HashMap<u64, usize> = HashMap::new();
    for (i, a) in attrs.iter().enumerate() {
        let name = a.name.clone().unwrap_or_default();
        let (name_id, kind, known) = match ps::lookup_kind(&name) {
            Some((full, k)) => (parser.log_mut().strings.intern(full), k, true),
            None => (parser.log_mut().strings.intern(&name), Kind::Other, false),
        };
        let fmt = (a.type_ == 2).then(|| formats.get(&a.config).map(|(_, f)| f.clone())).flatten();
        let prog = fmt.as_ref().and_then(|f| Program::compile(f).ok());
        let plan = match (&fmt, &prog) {
            (Some(f), Some(p)) if kind != Kind::Other => build_plan(kind, &name, f, p),
            _ => None,
        };
        for &id in &a.ids {
            by_id.insert(id, i);
        }
        events.push(Event { name, name_id, kind, known, fmt, prog, plan });
    }

    let mut threads = Threads::default();
    threads.map.insert(0, Thread { pid: 0, comm: Some(parser.log_mut().strings.intern("swapper")) });
    let mut tid_comm: HashMap<i32, u32> = HashMap::new();
    let mut res = Resolver { kallsyms: o.kallsyms, map: None, delta: 0 };
    let mut cs_memo: HashMap<u64, u32> = HashMap::new();
    let (mut lost_chunks, mut lost_events, mut lost_samples) = (0u64, 0u64, 0u64);
    let mut lost_recs: Vec<(u32, u64, u64)> = Vec::new();
    let mut text = String::new();
    let mut sample_no = 0u64;

    loop {
        let rec = match record_iter.next_record(&mut perf_file) {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                let msg = format!("cannot read a record: {e}");
                if !o.lenient {
                    return Err(err(msg));
                }
                n_skipped += 1;
                skipped.push((0, msg));
                break;
            }
        };
        let PerfFileRecord::EventRecord { record, .. } = rec else { continue };
        let rt = record.record_type;
        if rt == RecordType::LOST_SAMPLES {
            lost_samples += record.data.as_slice().get(..8).map_or(0, |b| {
                let b: [u8; 8] = b.try_into().unwrap_or_default();
                if h.be { u64::from_be_bytes(b) } else { u64::from_le_bytes(b) }
            });
            continue;
        }
        // Only the records kmm uses are parsed (the crate asserts on some
        // fields of others, e.g. an MMAP2 build id longer than 20 bytes).
        if ![RecordType::SAMPLE, RecordType::COMM, RecordType::FORK, RecordType::LOST, RecordType::MMAP].contains(&rt) {
            continue;
        }
        let parsed = match record.parse() {
            Ok(p) => p,
            Err(e) => {
                if rt == RecordType::SAMPLE {
                    sample_no += 1;
                }
                let msg = format!("a record of type {} cannot be read: {e}", rt.0);
                let off = if rt == RecordType::SAMPLE { find_sample(data, &sample_offsets, &record.data.as_slice()) } else { None };
                if !o.lenient {
                    return Err(PerfDataError { offset: off, message: msg });
                }
                n_skipped += 1;
                skipped.push((off.unwrap_or(0), msg));
                continue;
            }
        };
        match parsed {
            EventRecord::Sample(s) => {
                sample_no += 1;
                let ev_i = match s.id.and_then(|id| by_id.get(&id).copied()).or((events.len() == 1).then_some(0)) {
                    Some(i) => i,
                    None => {
                        let msg = format!("a sample of an event id {:?} the file does not describe", s.id);
                        let off = find_sample(data, &sample_offsets, &record.data.as_slice());
                        if !o.lenient {
                            return Err(PerfDataError { offset: off, message: msg });
                        }
                        n_skipped += 1;
                        skipped.push((off.unwrap_or(0), msg));
                        continue;
                    }
                };
                let (pid, tid) = (s.pid.unwrap_or(-1), s.tid.unwrap_or(-1));
                let comm = match tid_comm.get(&tid) {
                    Some(&c) => c,
                    None => {
                        let t = threads.findnew(pid, tid);
                        let c = match t.comm {
                            Some(c) => c,
                            None => parser.log_mut().strings.intern(&format!(":{tid}")),
                        };
                        tid_comm.insert(tid, c);
                        c
                    }
                };
                let ts = s.timestamp.unwrap_or(0) / 1000 * 1000;
                let cpu = s.cpu.unwrap_or(0);
                let raw = s.raw.as_ref().map(|r| r.as_slice()).unwrap_or_default();
                let ev = &mut events[ev_i];
                let r = decode_sample(&mut parser, ev, &raw, &res, &mut cs_memo, &mut text, ts, cpu, tid as u32, comm);
                if let Err(msg) = r {
                    let secs = format!("{}.{:06}", ts / 1_000_000_000, ts % 1_000_000_000 / 1000);
                    let msg = format!("sample {sample_no} (time {secs}, cpu {cpu}): {msg}");
                    let off = find_sample(data, &sample_offsets, &record.data.as_slice());
                    if !o.lenient {
                        return Err(PerfDataError { offset: off, message: msg });
                    }
                    n_skipped += 1;
                    if skipped.len() < 10 {
                        skipped.push((off.unwrap_or(0), msg));
                    }
                }
            }
            EventRecord::Comm(c) => {
                let name = c.name.as_slice();
                let id = parser.log_mut().strings.intern(&String::from_utf8_lossy(&name));
                threads.findnew(c.pid, c.tid).comm = Some(id);
                tid_comm.insert(c.tid, id);
            }
            EventRecord::Fork(f) => {
                // machine__process_fork_event
                let parent_ok = threads.map.get(&f.ptid).is_none_or(|p| p.pid == f.ppid);
                if !parent_ok {
                    threads.map.remove(&f.ptid);
                    tid_comm.remove(&f.ptid);
                }
                let pcomm = threads.findnew(f.ppid, f.ptid).comm;
                threads.map.remove(&f.tid);
                tid_comm.remove(&f.tid);
                threads.findnew(f.pid, f.tid).comm = pcomm;
            }
            EventRecord::Lost(l) => {
                lost_chunks += 1;
                lost_events += l.count;
                if let Ok(c) = record.common_data() {
                    lost_recs.push((c.cpu.unwrap_or(u32::MAX), c.timestamp.unwrap_or(0), l.count));
                }
            }
            EventRecord::Mmap(m) if m.cpu_mode == CpuMode::Kernel => {
                let path = m.path.as_slice();
                if let Some(refname) = path.strip_prefix(b"[kernel.kallsyms]") {
                    res.map = Some((m.address, m.address.saturating_add(m.length)));
                    let refname = String::from_utf8_lossy(refname);
                    res.delta = match (o.kallsyms.and_then(|k| k.ref_symbol(&refname)), m.page_offset) {
                        (Some(a), pg) if pg != 0 => a.wrapping_sub(pg),
                        _ => 0,
                    };
                    cs_memo.clear();
                    for ev in events.iter_mut() {
                        if let Some(p) = ev.plan.as_mut() {
                            for st in p.steps.iter_mut().filter(|s| s.key == Key::CallSite) {
                                st.memo.clear();
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    let mut log = std::mem::take(parser.log_mut());
    log.lost_chunks = lost_chunks;
    lost_recs.sort_unstable_by_key(|r| r.1);
    log.lost_records = lost_recs;
    log.lost_events = lost_events;
    log.lost_samples = lost_samples;
    log.truncated_at = truncated_at;
    log.skipped = n_skipped;
    log.skipped_examples = skipped.into_iter().take(10).collect();
    debug_assert!(log.check().is_empty(), "{:?}", log.check());
    Ok(log)
}

/// The first event where two traces differ (name, comm, pid, cpu, time or
/// any field by name), as (index, what differs); None if they are the same
/// events in the same order. `ts_unit_ns`: compare times in these units
/// (1000 when one side came from perf script's microseconds).
pub fn first_difference(a: &TraceLog, b: &TraceLog, ts_unit_ns: u64) -> Option<(usize, String)> {
    let unit = ts_unit_ns.max(1);
    for i in 0..a.len().min(b.len()) {
        let (x, y) = (&a.events[i], &b.events[i]);
        let what = if a.name(i) != b.name(i) {
            format!("name {} != {}", a.name(i), b.name(i))
        } else if a.comm(i) != b.comm(i) {
            format!("comm {} != {}", a.comm(i), b.comm(i))
        } else if (x.pid, x.cpu) != (y.pid, y.cpu) {
            format!("pid/cpu {}/{} != {}/{}", x.pid, x.cpu, y.pid, y.cpu)
        } else if x.ts_ns / unit != y.ts_ns / unit {
            format!("time {} != {}", x.ts_ns, y.ts_ns)
        } else {
            let (fa, fb) = (a.fields(i), b.fields(i));
            if fa == fb {
                continue;
            }
            format!("fields {fa:?} != {fb:?}")
        };
        return Some((i, format!("{}: {what}", a.name(i))));
    }
    (a.len() != b.len()).then(|| (a.len().min(b.len()), format!("{} events != {}", a.len(), b.len())))
}

/// The byte offset of a sample record whose body is `body` (error messages only).
fn find_sample(data: &[u8], offsets: &[u64], body: &[u8]) -> Option<u64> {
    offsets.iter().copied().find(|&o| {
        let o = o as usize;
        data.get(o + 8..o + 8 + body.len()) == Some(body)
    })
}

#[allow(clippy::too_many_arguments)]
fn decode_sample(
    parser: &mut Parser,
    ev: &mut Event,
    raw: &[u8],
    res: &Resolver<'_>,
    cs_memo: &mut HashMap<u64, u32>,
    text: &mut String,
    ts: u64,
    cpu: u32,
    pid: u32,
    comm: u32,
) -> Result<(), String> {
    let (Some(f), Some(p)) = (ev.fmt.as_ref(), ev.prog.as_ref()) else {
        // Not a tracepoint we have a program for: printed field by field
        // (or nothing), parsed as a text line.
        text.clear();
        if let Some(f) = ev.fmt.as_ref() {
            super::tp_format::render_fields(f, raw, text);
        }
        let c = parser.log_mut().strings.get(comm).to_string();
        return parser.push_event(&c, pid, cpu, ts, &ev.name, text.trim());
    };
    let Some(plan) = ev.plan.as_mut() else {
        text.clear();
        p.render(f, raw, res, text);
        let c = parser.log_mut().strings.get(comm).to_string();
        return parser.push_event(&c, pid, cpu, ts, &ev.name, text.trim());
    };
    if let Some(m) = &plan.missing {
        return Err(m.clone());
    }
    let log = parser.log_mut();
    let mut r = Rec::new(ev.kind);
    r.ts_ns = ts;
    r.cpu = cpu;
    r.pid = pid;
    r.comm = comm;
    r.name = ev.name_id;
    if !ev.known {
        r.flags |= F_UNKNOWN;
    }
    let mut page_null = false;
    let mut seen = 0u32;
    for st in plan.steps.iter_mut() {
        let v = match &st.read {
            Source::Num(c) => {
                let sp = p.convs()[*c].spec;
                apply_num(st.key, sp.cast(p.value(f, raw, *c)), sp.signed())
            }
            Source::Const(t) => apply_text(log, st.key, t),
            Source::Text { conv, memo_field } => {
                let conv = *conv;
                let key_val = memo_field.map(|fi| f.read_num(raw, fi));
                let memo_hit = key_val.and_then(|kv| st.memo.get(&kv).cloned());
                match memo_hit {
                    Some(v) => v,
                    None => {
                        let v = if st.key == Key::CallSite && p.convs()[conv].spec.is_function() && p.convs()[conv].prefix.is_empty() && p.convs()[conv].suffix.is_empty() {
                            let addr = p.value(f, raw, conv);
                            match cs_memo.get(&addr) {
                                Some(&id) => Ok(id as u64),
                                None => {
                                    text.clear();
                                    p.render_conv(f, raw, conv, res, text);
                                    let id = log.strings.intern(text);
                                    cs_memo.insert(addr, id);
                                    Ok(id as u64)
                                }
                            }
                        } else {
                            let c = &p.convs()[conv];
                            text.clear();
                            text.push_str(&c.prefix);
                            p.render_conv(f, raw, conv, res, text);
                            text.push_str(&c.suffix);
                            apply_text(log, st.key, text)
                        };
                        if let Some(kv) = key_val {
                            if st.memo.len() < 4096 {
                                st.memo.insert(kv, v.clone());
                            }
                        }
                        v
                    }
                }
            }
        };
        let v = v.map_err(|e| format!("{}: {e}", ev.name))?;
        seen |= st.key.bit();
        match st.key {
            Key::CallSite => r.call_site = v as u32,
            Key::Ptr | Key::Pfn => r.ptr = v,
            Key::BytesReq => r.bytes_req = v,
            Key::BytesAlloc => r.bytes_alloc = v,
            Key::Gfp => r.gfp = v as u32,
            Key::Node => r.node = v as i16,
            Key::Accounted => set_flag(&mut r, F_ACCOUNTED, v),
            Key::Name => r.cache = v as u32,
            Key::Page => page_null = v == 0,
            Key::Order => r.order = v as u8,
            Key::Migratetype => r.migratetype = v as i8,
            Key::PercpuRefill => set_flag(&mut r, F_REFILL, v),
            Key::Reserved => set_flag(&mut r, F_RESERVED, v),
            Key::IsAtomic => set_flag(&mut r, F_ATOMIC, v),
            Key::Align => r.extra = v as u32,
            Key::BaseAddr => r.aux = v,
            Key::Off => r.off = v as i32,
        }
    }
    if r.kind == Kind::MmPageAlloc && (page_null || (seen & Key::Page.bit() == 0 && r.ptr == 0)) {
        r.flags |= F_FAILED;
    }
    if r.kind == Kind::PercpuAllocPercpu && seen & Key::BytesAlloc.bit() == 0 {
        r.bytes_alloc = r.bytes_req;
    }
    log.push_rec(r);
    Ok(())
}

fn set_flag(r: &mut Rec, bit: u8, v: u64) {
    if v != 0 {
        r.flags |= bit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_names_what_a_file_is() {
        assert_eq!(sniff(b"PERFILE2\x68\0\0\0\0\0\0\0"), Content::PerfData);
        assert!(matches!(sniff(b"PERFILE2\x10\0\0\0\0\0\0\0"), Content::NotATrace(m) if m.contains("pipe mode")));
        assert_eq!(sniff(b"  perf 1 [000] 1.0: kmem:kfree: call_site=x ptr=0x1\n"), Content::Text);
        for (head, what) in [
            (&b""[..], "empty"),
            (b"\x7fELF\x02\x01\x01", "ELF"),
            (b"\x89PNG\r\n\x1a\n", "PNG"),
            (b"{\"traceEvents\": []}", "JSON"),
            (b"[{\"a\": 1}]", "JSON"),
            (b"\x00\x01\x02\x03", "binary"),
            (b"\xc3\x28\xa0\xa1 hello", "binary"),
        ] {
            match sniff(head) {
                Content::NotATrace(m) => assert!(m.contains(what), "{m}"),
                c => panic!("{head:?}: {c:?}"),
            }
        }
        // A multi-byte character cut at the end of the sniffed bytes is text.
        assert_eq!(sniff("comm é".as_bytes().split_last().unwrap().1), Content::Text);
    }

    #[test]
    fn header_errors_have_offsets() {
        let e = parse(b"PERFILE2", &Options::default()).unwrap_err();
        assert_eq!(e.offset, Some(8));
        let mut h = b"PERFILE2".to_vec();
        h.extend_from_slice(&104u64.to_le_bytes());
        let e = parse(&h, &Options::default()).unwrap_err();
        assert!(e.message.contains("header"), "{e}");
        let e = parse(b"hello world, this is text", &Options::default()).unwrap_err();
        assert_eq!(e.offset, Some(0));
    }
}
