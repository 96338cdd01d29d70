//! SLUB debugging: what `slub_debug=` and the SLAB_* debug flags of
//! `kmem_cache_create` turn on for a cache.
//!
//! - F (SLAB_CONSISTENCY_CHECKS): `check_slab`, `on_freelist` and
//!   `check_object` at every allocation and free; a slab found corrupt at
//!   allocation is isolated ("Marking all objects used", frozen) and the
//!   allocation is served from another slab; an object found corrupt at free
//!   is not freed ("Object at 0x... not freed", the call is refused).
//! - Z (SLAB_RED_ZONE): red zones left and right of each object, 0xcc while
//!   allocated, 0xbb while free; for kmalloc caches with U also the bytes
//!   between the requested size (`orig_size`) and the object size.
//! - P (SLAB_POISON): free objects hold 0x6b... 0xa5 (also freshly allocated
//!   ones, as `init_object` poisons on allocation too); slab and object
//!   padding hold 0x5a.
//! - U (SLAB_STORE_USER): who allocated and freed each object (`struct
//!   track`: call site, CPU, pid, jiffies, stack) in the object's metadata;
//!   shown in reports and in `alloc_traces`/`free_traces`.
//! - T (SLAB_TRACE): every allocation and free of the cache is logged.
//! - `validate` (/sys/kernel/slab/<cache>/validate): every slab on the
//!   node's lists checked and repaired; returns the errors lib/slub_kunit.c
//!   counts (`slab_add_kunit_errors`: one per detection, one per FIX line).
//!
//! Reports go to the kernel log (`m.dmesg()`) in 6.18's format (6.15 moved
//! the corrupted range into a "[<what> overwritten] ..." line before an
//! "Object corrupt" report, so that the dump shows the bytes before they are
//! restored); a refused free also carries its report as the error's text.
//!
//! # Kernel
//! `mm/slub.c` (6.18): `check_bytes_and_report`, `restore_bytes`,
//! `check_object`, `check_pad_bytes`, `slab_pad_check`, `check_slab`,
//! `on_freelist`, `alloc_consistency_checks`, `alloc_debug_processing`,
//! `alloc_single_from_partial`, `free_consistency_checks`,
//! `free_debug_processing`, `free_to_partial_list`, `init_object`,
//! `setup_object_debug`, `setup_slab_debug`, `set_track_update`,
//! `init_tracking`, `print_track`, `print_tracking`, `print_slab_info`,
//! `print_trailer`, `slab_bug`, `slab_fix`, `object_err`, `slab_err`,
//! `trace`, `set_orig_size`, `get_orig_size`, `validate_slab`,
//! `validate_slab_node`, `validate_slab_cache`, `add_location`,
//! `process_slab`, `slab_debugfs_show`; `lib/slub_kunit.c` (the counts);
//! `lib/hexdump.c` (`hex_dump_to_buffer`, `print_hex_dump`).
//!
//! SIMPLIFICATION: `struct track` has the 64-bit layout on every arch (kmm
//! reserves 32 bytes per track everywhere) and keeps `jiffies_64`;
//! `slab->objects` lives in kmm's own slab table, out of reach of a stray
//! write, so `on_freelist`'s "Wrong number of objects" check cannot fire and
//! is left out; a slab whose free pointer is corrupt is isolated at
//! allocation even without F (the kernel would follow the pointer and
//! crash); "Slab 0x..." prints a vmemmap-style address for the slab and
//! `%pGp` reduced to head/node/zone; no WARN_ON splats (the taint is kept).
//!
//! Debug caches take `list_lock` for every allocation and free (no per-CPU
//! slabs), so the checks run under it; the caller's stack is captured
//! before (it may call into Python).
#![forbid(unsafe_code)]

use super::*;
use crate::printk::{TAINT_BAD_PAGE, TAINT_WARN};
use crate::stackdepot::{current_task, save_stack, Frames};
use crate::trace::CallSite;

/// `TRACK_ALLOC` / `TRACK_FREE`.
pub const TRACK_ALLOC: u64 = 0;
pub const TRACK_FREE: u64 = 1;

/// Who called, as `set_track` and kmemleak record it; captured before any
/// slab lock is taken.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Text address of the call site (`_RET_IP_`), 0 when unknown.
    pub addr: u64,
    /// Stack depot handle of the whole stack, 0 when there is none.
    pub handle: u32,
    pub pid: i32,
    pub comm: Arc<str>,
    pub frames: Frames,
}

/// What an allocation from a debug cache carries in.
#[derive(Clone, Debug)]
pub struct DebugCtx {
    /// The size asked for (`orig_size`): kmalloc's request, else object_size.
    pub orig_size: u32,
    pub caller: Option<Caller>,
}

/// A `struct track` as stored in an object's metadata.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Track {
    pub addr: u64,
    pub handle: u32,
    pub cpu: u32,
    pub pid: i32,
    pub when: u64,
}

/// A report in the making: lines as the kernel prints them (non-kunit),
/// and the errors as lib/slub_kunit.c counts them.
pub(crate) struct Report<'m> {
    m: &'m Machine,
    pub lines: Vec<String>,
    pub errors: u32,
}

impl<'m> Report<'m> {
    pub fn new(m: &'m Machine) -> Report<'m> {
        Report { m, lines: Vec::new(), errors: 0 }
    }

    fn pr_err(&mut self, s: String) {
        self.lines.push(s);
    }

    /// `__slab_bug`.
    fn slab_bug(&mut self, name: &str, msg: &str) {
        self.pr_err("=============================================================================".into());
        self.pr_err(format!("BUG {name} ({}): {msg}", self.m.printk.tainted()));
        self.pr_err("-----------------------------------------------------------------------------".into());
        self.pr_err(String::new());
    }

    /// `slab_fix`: counted, "FIX <cache>: ...".
    fn slab_fix(&mut self, name: &str, msg: &str) {
        self.errors += 1;
        self.pr_err(format!("FIX {name}: {msg}"));
    }

    /// `add_taint(TAINT_BAD_PAGE)` and the WARN_ON's TAINT_WARN.
    fn taint(&self) {
        self.m.printk.add_taint(TAINT_BAD_PAGE);
        self.m.printk.add_taint(TAINT_WARN);
    }

    /// Into the kernel log (and the errors into `m.slab.errors`); returns
    /// the text (for an error message).
    pub fn flush(self) -> String {
        self.m.slab.errors.fetch_add(self.errors as u64, Relaxed);
        let text = self.lines.join("\n");
        if !self.lines.is_empty() {
            self.m.printk(self.lines);
        }
        text
    }
}

/// `%p` with no_hash_pointers (slub_debug turns hashing off): the full
/// width in hex, no 0x.
fn p(m: &Machine, v: u64) -> String {
    if m.cfg.arch.is_64bit() {
        format!("{v:016x}")
    } else {
        format!("{:08x}", v as u32)
    }
}

/// `hex_dump_to_buffer(buf, len, 16, 1, ..., ascii=true)`: hex bytes, the
/// ASCII column at 16 * 2 + 16 + 1.
pub(crate) fn hex_dump_line(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(66);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&format!("{b:02x}"));
    }
    while s.len() < 49 {
        s.push(' ');
    }
    for &b in bytes {
        s.push(if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' });
    }
    s
}

/// `print_hex_dump(KERN_ERR, text, DUMP_PREFIX_ADDRESS, 16, 1, addr, len, 1)`.
fn print_section(m: &Machine, rep: &mut Report<'_>, text: &str, va: u64, len: u64) {
    let mut buf = vec![0u8; len as usize];
    let _ = m.phys.read(va - m.cfg.arch.page_offset(), &mut buf);
    for (i, row) in buf.chunks(16).enumerate() {
        rep.pr_err(format!("{text}{}: {}", p(m, va + i as u64 * 16), hex_dump_line(row)));
    }
}

/// `%*pbl` of a CPU set: "0-1,3".
fn cpulist(cpus: &std::collections::BTreeSet<u32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let v: Vec<u32> = cpus.iter().copied().collect();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j { v[i].to_string() } else { format!("{}-{}", v[i], v[j]) });
        i = j + 1;
    }
    out.join(",")
}

impl Machine {
    /// The caller of an allocator entry point: the Python stack (with the
    /// internal call site in front when it is not the Python caller), pid
    /// and comm. May call into Python: no kmm lock may be held.
    pub(crate) fn caller(&self, site: &CallSite) -> Caller {
        let py = save_stack();
        let frames: Frames = if &**site != "python" && py.first() != Some(site) {
            std::iter::once(site.clone()).chain(py.iter().cloned()).take(crate::stackdepot::MAX_FRAMES).collect()
        } else {
            py
        };
        let (pid, comm) = current_task();
        let addr = frames.first().map_or(0, |f| self.depot.sym_addr(f));
        Caller { addr, handle: self.depot.save(&frames), pid, comm, frames }
    }

    /// `__kmalloc_cache_noprof(s, gfp, size)` (what kmalloc() inlines for a
    /// constant size): `size` bytes from cache `c`, traced as kmalloc. With
    /// SLAB_KMALLOC and U the request is kept (`orig_size`) and the rest of
    /// the object is a red zone.
    pub fn kmalloc_cache(&self, c: &KmemCache, size: u64, gfp: Gfp, call_site: &CallSite) -> Result<crate::machine::VirtAddr> {
        if size == 0 || size > c.object_size() as u64 {
            return Err(KmmError::InvalidArgument(format!(
                "kmalloc from {}: size must be 1 ..= {} (the object size), not {size}",
                c.name,
                c.object_size()
            )));
        }
        // As kmalloc's slab half does it: KASAN's tail poisoning included.
        self.kmalloc_object(c, size, self.slab_gfp(gfp), call_site)
    }

    /// The caller, when cache `c` records callers (U, or T's stack dumps).
    pub(crate) fn slab_caller(&self, c: &KmemCache, site: &CallSite) -> Option<Caller> {
        (c.flags & (SLAB_STORE_USER | SLAB_TRACE) != 0).then(|| self.caller(site))
    }
}

impl KmemCache {
    // ---- layout --------------------------------------------------------------------------------

    /// `slab_address`: the first byte of the slab's pages.
    #[inline]
    fn slab_addr(m: &Machine, pfn: u64) -> u64 {
        m.cfg.arch.page_offset() + (pfn << m.page_shift)
    }

    /// `freeptr_outside_object`.
    #[inline]
    fn fp_outside(&self) -> bool {
        self.geo.offset >= self.geo.inuse
    }

    /// `get_info_end`: where the tracks start (after an outside free pointer).
    #[inline]
    fn info_end(&self, m: &Machine) -> u64 {
        if self.fp_outside() {
            (self.geo.inuse + m.cfg.arch.pointer_bytes()) as u64
        } else {
            self.geo.inuse as u64
        }
    }

    /// `size_from_object`.
    #[inline]
    fn size_from_object(&self) -> u64 {
        (self.geo.size - if self.flags & SLAB_RED_ZONE != 0 { self.geo.red_left_pad } else { 0 }) as u64
    }

    /// `slub_debug_orig_size`: kmalloc caches with U keep the request size.
    #[inline]
    pub(crate) fn debug_orig_size(&self) -> bool {
        self.flags & SLAB_STORE_USER != 0 && self.flags & SLAB_KMALLOC != 0
    }

    fn orig_size_at(&self, m: &Machine, obj: u64) -> u64 {
        obj + self.info_end(m) + 2 * TRACK_SIZE as u64
    }

    /// `get_orig_size` (clamped to the object: a corrupted value is no size).
    pub(crate) fn get_orig_size(&self, m: &Machine, obj: u64) -> u32 {
        if !self.debug_orig_size() {
            return self.geo.object_size;
        }
        let mut b = [0u8; 4];
        let _ = m.phys.read(Self::phys_of(m, self.orig_size_at(m, obj)), &mut b);
        u32::from_le_bytes(b).min(self.geo.object_size)
    }

    /// `set_orig_size`.
    pub(crate) fn set_orig_size(&self, m: &Machine, obj: u64, size: u32) {
        if self.debug_orig_size() {
            let _ = m.phys.write(Self::phys_of(m, self.orig_size_at(m, obj)), &size.to_le_bytes());
        }
    }

    fn track_va(&self, m: &Machine, obj: u64, which: u64) -> u64 {
        obj + self.info_end(m) + which * TRACK_SIZE as u64
    }

    /// `get_track`.
    pub fn read_track(&self, m: &Machine, obj: u64, which: u64) -> Track {
        let mut b = [0u8; 32];
        let _ = m.phys.read(Self::phys_of(m, self.track_va(m, obj, which)), &mut b);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        Track { addr: u64_at(0), handle: u32_at(8), cpu: u32_at(12), pid: u32_at(16) as i32, when: u64_at(24) }
    }

    fn write_track(&self, m: &Machine, obj: u64, which: u64, t: &Track) {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&t.addr.to_le_bytes());
        b[8..12].copy_from_slice(&t.handle.to_le_bytes());
        b[12..16].copy_from_slice(&t.cpu.to_le_bytes());
        b[16..20].copy_from_slice(&t.pid.to_le_bytes());
        b[24..32].copy_from_slice(&t.when.to_le_bytes());
        let _ = m.phys.write(Self::phys_of(m, self.track_va(m, obj, which)), &b);
    }

    /// `set_track_update`.
    pub(crate) fn set_track(&self, m: &Machine, obj: u64, which: u64, c: &Caller) {
        if self.flags & SLAB_STORE_USER == 0 {
            return;
        }
        let t = Track { addr: c.addr, handle: c.handle, cpu: m.this_cpu(), pid: c.pid, when: m.jiffies64() };
        self.write_track(m, obj, which, &t);
    }

    /// `init_tracking`: both tracks zeroed.
    fn init_tracking(&self, m: &Machine, obj: u64) {
        if self.flags & SLAB_STORE_USER != 0 {
            let _ = m.phys.zero(Self::phys_of(m, self.track_va(m, obj, TRACK_ALLOC)), 2 * TRACK_SIZE as u64);
        }
    }

    /// `setup_slab_debug`: a new slab of a poisoning cache is all 0x5a.
    pub(crate) fn setup_slab_debug(&self, m: &Machine, pfn: u64, order: u32) {
        if self.flags & SLAB_POISON != 0 {
            let _ = m.phys.fill(pfn << m.page_shift, m.page_size << order, POISON_INUSE);
        }
    }

    /// `setup_object_debug`.
    pub(crate) fn setup_object_debug(&self, m: &Machine, obj: u64) {
        if self.flags & (SLAB_STORE_USER | SLAB_RED_ZONE | SLAB_OBJECT_POISON) == 0 {
            return;
        }
        self.init_object(m, obj, SLUB_RED_INACTIVE);
        self.init_tracking(m, obj);
    }

    /// `init_object`: red zones to `val`; poison (also on allocation); the
    /// kmalloc red zone between orig_size and object_size when active.
    pub(crate) fn init_object(&self, m: &Machine, obj: u64, val: u8) {
        if !self.is_debug() {
            return;
        }
        let ph = Self::phys_of(m, obj);
        let os = self.geo.object_size as u64;
        let mut poison_size = os;
        if self.flags & SLAB_RED_ZONE != 0 {
            let pad = self.geo.red_left_pad as u64;
            let _ = m.phys.fill(ph - pad, pad, val);
            if self.debug_orig_size() && val == SLUB_RED_ACTIVE {
                poison_size = self.get_orig_size(m, obj) as u64;
            }
        }
        if self.flags & SLAB_OBJECT_POISON != 0 && poison_size > 0 {
            let _ = m.phys.fill(ph, poison_size - 1, POISON_FREE);
            let _ = m.phys.fill(ph + poison_size - 1, 1, POISON_END);
        }
        if self.flags & SLAB_RED_ZONE != 0 {
            let _ = m.phys.fill(ph + poison_size, self.geo.inuse as u64 - poison_size, val);
        }
    }

    // ---- reports -------------------------------------------------------------------------------

    /// The `struct slab *` printed for a slab (its vmemmap address).
    fn slab_ptr(m: &Machine, pfn: u64) -> u64 {
        if m.cfg.arch.is_64bit() {
            0xffff_ea00_0000_0000 + pfn * 64
        } else {
            0xf500_0000 + pfn * 32
        }
    }

    /// `print_slab_info`.
    fn print_slab_info(&self, m: &Machine, rep: &mut Report<'_>, s: &Slab) {
        let zone = m.pfn_zone(Pfn(s.pfn)).map_or(0, |z| z.idx as u64);
        let head = s.order > 0;
        let (shift, headbit) = if m.cfg.arch.is_64bit() { (56, 1 << 6) } else { (30, 1 << 6) };
        let flags = (zone << shift) | if head { headbit } else { 0 };
        rep.pr_err(format!(
            "Slab 0x{} objects={} used={} fp=0x{} flags=0x{flags:x}({}node=0|zone={zone})",
            p(m, Self::slab_ptr(m, s.pfn)),
            s.objects,
            s.inuse,
            p(m, s.freelist),
            if head { "head|" } else { "" }
        ));
    }

    /// `print_track`.
    fn print_track(&self, m: &Machine, rep: &mut Report<'_>, what: &str, t: &Track, pr_time: u64) {
        if t.addr == 0 {
            return;
        }
        rep.pr_err(format!(
            "{what} in {} age={} cpu={} pid={}",
            m.depot.sym_name(t.addr),
            pr_time.wrapping_sub(t.when),
            t.cpu,
            t.pid
        ));
        match m.depot.fetch(t.handle) {
            Some(frames) => {
                for f in frames.iter() {
                    rep.pr_err(format!(" {f}"));
                }
            }
            None => rep.pr_err("object allocation/free stack trace missing".into()),
        }
    }

    /// `print_trailer`.
    fn print_trailer(&self, m: &Machine, rep: &mut Report<'_>, s: &Slab, obj: u64) {
        if self.flags & SLAB_STORE_USER != 0 {
            let now = m.jiffies64();
            self.print_track(m, rep, "Allocated", &self.read_track(m, obj, TRACK_ALLOC), now);
            self.print_track(m, rep, "Freed", &self.read_track(m, obj, TRACK_FREE), now);
        }
        self.print_slab_info(m, rep, s);
        let base = Self::slab_addr(m, s.pfn);
        rep.pr_err(format!("Object 0x{} @offset={} fp=0x{}", p(m, obj), obj - base, p(m, self.get_fp(m, obj))));
        rep.pr_err(String::new());
        let os = self.geo.object_size as u64;
        if self.flags & SLAB_RED_ZONE != 0 {
            let pad = self.geo.red_left_pad as u64;
            print_section(m, rep, "Redzone  ", obj - pad, pad);
        } else if obj > base + 16 {
            print_section(m, rep, "Bytes b4 ", obj - 16, 16);
        }
        print_section(m, rep, "Object   ", obj, os.min(m.page_size));
        if self.flags & SLAB_RED_ZONE != 0 {
            print_section(m, rep, "Redzone  ", obj + os, self.geo.inuse as u64 - os);
        }
        let mut off = self.info_end(m);
        if self.flags & SLAB_STORE_USER != 0 {
            off += 2 * TRACK_SIZE as u64;
        }
        if self.debug_orig_size() {
            off += 4;
        }
        let sfo = self.size_from_object();
        if off < sfo {
            // Beginning of the filler is the free pointer.
            print_section(m, rep, "Padding  ", obj + off, sfo - off);
        }
    }

    /// `object_err`; `counted` is false where the kernel reaches it only
    /// outside kunit (the "Object corrupt" dump of check_bytes_and_report).
    fn object_err(&self, m: &Machine, rep: &mut Report<'_>, s: &Slab, obj: u64, reason: &str, counted: bool) {
        if counted {
            rep.errors += 1;
        }
        rep.slab_bug(&self.name, reason);
        if obj == 0 || !self.fp_ok(m, s.pfn, s.order, obj) {
            self.print_slab_info(m, rep, s);
            rep.pr_err(format!("Invalid pointer 0x{}", p(m, obj)));
        } else {
            self.print_trailer(m, rep, s, obj);
        }
        rep.taint();
    }

    /// The report of a corrupt free pointer met outside a check (the fast path).
    pub(crate) fn report_freepointer(&self, m: &Machine, rep: &mut Report<'_>, s: &Slab, obj: u64) {
        self.object_err(m, rep, s, obj, "Freepointer corrupt", true);
    }

    /// `slab_err`.
    fn slab_err(&self, m: &Machine, rep: &mut Report<'_>, s: &Slab, msg: &str) {
        rep.errors += 1;
        rep.slab_bug(&self.name, msg);
        self.print_slab_info(m, rep, s);
        rep.taint();
    }

    // ---- checks --------------------------------------------------------------------------------

    /// `check_bytes_and_report` + `restore_bytes`.
    #[allow(clippy::too_many_arguments)]
    fn check_bytes_and_report(
        &self,
        m: &Machine,
        rep: &mut Report<'_>,
        s: &Slab,
        obj: u64,
        what: &str,
        start: u64,
        value: u8,
        bytes: u64,
        print_obj: bool,
    ) -> bool {
        if bytes == 0 {
            return true;
        }
        let mut buf = vec![0u8; bytes as usize];
        let _ = m.phys.read(Self::phys_of(m, start), &mut buf);
        let Some(fault) = buf.iter().position(|&b| b != value) else { return true };
        let mut end = buf.len();
        while end > fault && buf[end - 1] == value {
            end -= 1;
        }
        let (from, to) = (start + fault as u64, start + end as u64);
        rep.errors += 1;
        rep.pr_err(format!(
            "[{what} overwritten] 0x{}-0x{} @offset={}. First byte 0x{:x} instead of 0x{:x}",
            p(m, from),
            p(m, to - 1),
            from - Self::slab_addr(m, s.pfn),
            buf[fault],
            value
        ));
        if print_obj {
            self.object_err(m, rep, s, obj, "Object corrupt", false);
        }
        rep.slab_fix(&self.name, &format!("Restoring {what} 0x{}-0x{}=0x{value:x}", p(m, from), p(m, to - 1)));
        let _ = m.phys.fill(Self::phys_of(m, from), to - from, value);
        false
    }

    /// `check_pad_bytes`.
    fn check_pad_bytes(&self, m: &Machine, rep: &mut Report<'_>, s: &Slab, obj: u64) -> bool {
        let mut off = self.info_end(m);
        if self.flags & SLAB_STORE_USER != 0 {
            off += 2 * TRACK_SIZE as u64;
            if self.flags & SLAB_KMALLOC != 0 {
                off += 4;
            }
        }
        let sfo = self.size_from_object();
        if off >= sfo {
            return true;
        }
        self.check_bytes_and_report(m, rep, s, obj, "Object padding", obj + off, POISON_INUSE, sfo - off, true)
    }

    /// `slab_pad_check`: the bytes after the last slot.
    fn slab_pad_check(&self, m: &Machine, rep: &mut Report<'_>, s: &Slab) {
        if self.flags & SLAB_POISON == 0 {
            return;
        }
        let start = Self::slab_addr(m, s.pfn);
        let length = m.page_size << s.order;
        let remainder = length % self.geo.size as u64;
        if remainder == 0 {
            return;
        }
        let pad = start + length - remainder;
        let mut buf = vec![0u8; remainder as usize];
        let _ = m.phys.read(Self::phys_of(m, pad), &mut buf);
        let Some(fault) = buf.iter().position(|&b| b != POISON_INUSE) else { return };
        let mut end = buf.len();
        while end > fault && buf[end - 1] == POISON_INUSE {
            end -= 1;
        }
        let (from, to) = (pad + fault as u64, pad + end as u64);
        rep.slab_bug(
            &self.name,
            &format!("Padding overwritten. 0x{}-0x{} @offset={}", p(m, from), p(m, to - 1), from - start),
        );
        print_section(m, rep, "Padding ", pad, remainder);
        self.print_slab_info(m, rep, s);
        rep.taint();
        rep.slab_fix(&self.name, &format!("Restoring slab padding 0x{}-0x{}=0x{POISON_INUSE:x}", p(m, from), p(m, to - 1)));
        let _ = m.phys.fill(Self::phys_of(m, from), to - from, POISON_INUSE);
    }

    /// `check_object`: `val` is SLUB_RED_ACTIVE for an allocated object,
    /// SLUB_RED_INACTIVE for a free one. Repairs what it reports.
    pub(crate) fn check_object(&self, m: &Machine, rep: &mut Report<'_>, s: &Slab, obj: u64, val: u8) -> bool {
        let os = self.geo.object_size as u64;
        let inuse = self.geo.inuse as u64;
        let mut ret = true;
        if self.flags & SLAB_RED_ZONE != 0 {
            let pad = self.geo.red_left_pad as u64;
            if !self.check_bytes_and_report(m, rep, s, obj, "Left Redzone", obj - pad, val, pad, ret) {
                ret = false;
            }
            if !self.check_bytes_and_report(m, rep, s, obj, "Right Redzone", obj + os, val, inuse - os, ret) {
                ret = false;
            }
            if self.debug_orig_size() && val == SLUB_RED_ACTIVE {
                let orig = self.get_orig_size(m, obj) as u64;
                if os > orig && !self.check_bytes_and_report(m, rep, s, obj, "kmalloc Redzone", obj + orig, val, os - orig, ret)
                {
                    ret = false;
                }
            }
        } else if self.flags & SLAB_POISON != 0
            && os < inuse
            && !self.check_bytes_and_report(m, rep, s, obj, "Alignment padding", obj + os, POISON_INUSE, inuse - os, ret)
        {
            ret = false;
        }
        if self.flags & SLAB_POISON != 0 {
            if val != SLUB_RED_ACTIVE && self.flags & SLAB_OBJECT_POISON != 0 {
                if os > 1 && !self.check_bytes_and_report(m, rep, s, obj, "Poison", obj, POISON_FREE, os - 1, ret) {
                    ret = false;
                }
                if !self.check_bytes_and_report(m, rep, s, obj, "End Poison", obj + os - 1, POISON_END, 1, ret) {
                    ret = false;
                }
            }
            if !self.check_pad_bytes(m, rep, s, obj) {
                ret = false;
            }
        }
        // The free pointer of an allocated object may be its data.
        if (self.fp_outside() || val != SLUB_RED_ACTIVE) && !self.fp_ok(m, s.pfn, s.order, self.get_fp(m, obj)) {
            self.object_err(m, rep, s, obj, "Freepointer corrupt", true);
            // No choice but to zap it and lose the rest of the slab's free objects.
            self.set_fp(m, obj, 0);
            ret = false;
        }
        ret
    }

    /// `check_slab`.
    fn check_slab(&self, m: &Machine, rep: &mut Report<'_>, s: &Slab) -> bool {
        let maxobj = ((m.page_size << s.order) / self.geo.size as u64) as u32;
        if s.objects > maxobj {
            self.slab_err(m, rep, s, &format!("objects {} > max {maxobj}", s.objects));
            return false;
        }
        if s.inuse > s.objects {
            self.slab_err(m, rep, s, &format!("inuse {} > max {}", s.inuse, s.objects));
            return false;
        }
        if s.frozen {
            self.slab_err(m, rep, s, "Slab disabled since SLUB metadata consistency check failed");
            return false;
        }
        self.slab_pad_check(m, rep, s);
        true
    }

    /// `on_freelist`: is `search` on the slab's freelist (0: check the
    /// freelist only)? Repairs the freelist and the in-use count.
    fn on_freelist(&self, m: &Machine, rep: &mut Report<'_>, s: &mut Slab, search: u64) -> bool {
        let mut nr = 0u32;
        let mut fp = s.freelist;
        let mut object = 0u64;
        while fp != 0 && nr <= s.objects {
            if fp == search {
                return true;
            }
            if !self.fp_ok(m, s.pfn, s.order, fp) {
                if object != 0 {
                    self.object_err(m, rep, s, object, "Freechain corrupt", true);
                    self.set_fp(m, object, 0);
                    break;
                }
                self.slab_err(m, rep, s, "Freepointer corrupt");
                s.freelist = 0;
                s.inuse = s.objects;
                rep.slab_fix(&self.name, "Freelist cleared");
                return false;
            }
            object = fp;
            fp = self.get_fp(m, object);
            nr += 1;
        }
        if nr > s.objects {
            self.slab_err(m, rep, s, "Freelist cycle detected");
            s.freelist = 0;
            s.inuse = s.objects;
            rep.slab_fix(&self.name, "Freelist cleared");
            return false;
        }
        if s.inuse != s.objects - nr {
            let msg = format!("Wrong object count. Counter is {} but counted were {}", s.inuse, s.objects - nr);
            self.slab_err(m, rep, s, &msg);
            s.inuse = s.objects - nr;
            rep.slab_fix(&self.name, "Object count adjusted");
        }
        search == 0
    }

    /// `trace` (SLAB_TRACE).
    fn trace_op(&self, m: &Machine, rep: &mut Report<'_>, s: &Slab, obj: u64, alloc: bool, caller: Option<&Caller>) {
        if self.flags & SLAB_TRACE == 0 {
            return;
        }
        rep.pr_err(format!(
            "TRACE {} {} 0x{} inuse={} fp=0x{}",
            self.name,
            if alloc { "alloc" } else { "free" },
            p(m, obj),
            s.inuse,
            p(m, s.freelist)
        ));
        if !alloc {
            print_section(m, rep, "Object ", obj, self.geo.object_size as u64);
        }
        rep.pr_err("Call Trace:".into());
        if let Some(c) = caller {
            for f in c.frames.iter() {
                rep.pr_err(format!(" {f}"));
            }
        }
    }

    // ---- allocation and free of debug caches ----------------------------------------------------

    /// `alloc_single_from_partial` with `alloc_debug_processing`: the object,
    /// or None when the slab had to be isolated (the caller tries the next).
    fn alloc_single_from_partial(&self, m: &Machine, rep: &mut Report<'_>, n: &mut Node, id: u32, ctx: &DebugCtx) -> Option<u64> {
        let checks = self.flags & SLAB_CONSISTENCY_CHECKS != 0;
        let s = Self::slab_mut(n, id);
        let obj = s.freelist;
        if obj == 0 {
            // Left on the list with nothing free by a repair: it is full.
            Self::remove_partial(n, id);
            return None;
        }
        let next = self.get_fp(m, obj);
        s.freelist = next;
        s.inuse += 1;
        let mut snapshot = s.clone();
        let ok = if checks {
            // alloc_consistency_checks.
            self.check_slab(m, rep, &snapshot)
                && if !self.fp_ok(m, snapshot.pfn, snapshot.order, obj) {
                    self.object_err(m, rep, &snapshot, obj, "Freelist Pointer check fails", true);
                    false
                } else {
                    self.check_object(m, rep, &snapshot, obj, SLUB_RED_INACTIVE)
                }
        } else if !self.fp_ok(m, snapshot.pfn, snapshot.order, next) {
            self.object_err(m, rep, &snapshot, obj, "Freepointer corrupt", true);
            self.set_fp(m, obj, 0);
            false
        } else {
            true
        };
        let s = Self::slab_mut(n, id);
        if !ok {
            // Do the best we can: marking all objects used avoids touching
            // the rest; the slab is isolated (frozen) for good.
            rep.slab_fix(&self.name, "Marking all objects used");
            s.inuse = s.objects;
            s.freelist = 0;
            s.frozen = true;
            Self::remove_partial(n, id);
            return None;
        }
        snapshot.freelist = s.freelist;
        snapshot.inuse = s.inuse;
        self.trace_op(m, rep, &snapshot, obj, true, ctx.caller.as_ref());
        self.set_orig_size(m, obj, ctx.orig_size);
        self.init_object(m, obj, SLUB_RED_ACTIVE);
        let s = Self::slab_mut(n, id);
        if s.inuse == s.objects || s.freelist == 0 {
            Self::remove_partial(n, id);
        }
        Some(obj)
    }

    /// An allocation from a debug cache: one object at a time under
    /// list_lock, from the node's partial slabs or a new one.
    pub(crate) fn alloc_debug(&self, m: &Machine, gfp: Gfp, ctx: &DebugCtx) -> Result<u64> {
        let mut rep = Report::new(m);
        let r = loop {
            {
                let mut n = self.node.lock();
                let mut got = None;
                while n.partial_head != NIL {
                    let id = n.partial_head;
                    if let Some(obj) = self.alloc_single_from_partial(m, &mut rep, &mut n, id, ctx) {
                        got = Some(obj);
                        break;
                    }
                }
                if let Some(obj) = got {
                    break Ok(obj);
                }
            }
            match self.new_slab(m, gfp, SlabList::None) {
                Ok((id, _pfn, _fl)) => {
                    let mut n = self.node.lock();
                    Self::add_partial(&mut n, id, false);
                }
                Err(e) => break Err(e),
            }
        };
        rep.flush();
        if let (Ok(obj), Some(c)) = (&r, &ctx.caller) {
            self.set_track(m, *obj, TRACK_ALLOC, c);
        }
        r
    }

    /// `free_debug_processing`'s checks for one object of a debug cache,
    /// before anything is freed: Err (the report) when the object must not
    /// be freed ("Object at 0x... not freed").
    pub(crate) fn free_debug_check(&self, m: &Machine, o: &ObjRef, obj: u64) -> Result<()> {
        if !self.is_debug() {
            return Ok(());
        }
        let checks = self.flags & SLAB_CONSISTENCY_CHECKS != 0;
        let mut rep = Report::new(m);
        let ok = {
            let mut n = self.node.lock();
            let s = Self::slab_mut(&mut n, o.slab_id);
            let snapshot = s.clone();
            if (checks || snapshot.frozen) && !self.check_slab(m, &mut rep, &snapshot) {
                false
            } else if snapshot.inuse < 1 {
                self.slab_err(m, &mut rep, &snapshot, "Slab has 0 allocated objects but 1 are to be freed\n");
                false
            } else if checks {
                // free_consistency_checks.
                let s = Self::slab_mut(&mut n, o.slab_id);
                if self.on_freelist(m, &mut rep, s, obj) {
                    let snap = s.clone();
                    self.object_err(m, &mut rep, &snap, obj, "Object already free", true);
                    false
                } else {
                    let snap = s.clone();
                    self.check_object(m, &mut rep, &snap, obj, SLUB_RED_ACTIVE)
                }
            } else {
                true
            }
        };
        if ok {
            rep.flush();
            return Ok(());
        }
        rep.slab_fix(&self.name, &format!("Object at 0x{} not freed", p(m, obj)));
        Err(KmmError::MemoryCorruption(rep.flush()))
    }

    /// The kernel's report for a double free found by F (`on_freelist` in
    /// `free_consistency_checks`), into the log.
    pub(crate) fn report_double_free(&self, m: &Machine, o: &ObjRef, obj: u64) {
        if self.flags & SLAB_CONSISTENCY_CHECKS == 0 {
            return;
        }
        let mut rep = Report::new(m);
        {
            let n = self.node.lock();
            if let Some(s) = n.slabs.get(o.slab_id as usize).and_then(|s| s.as_ref()) {
                let snap = s.clone();
                self.object_err(m, &mut rep, &snap, obj, "Object already free", true);
            }
        }
        rep.slab_fix(&self.name, &format!("Object at 0x{} not freed", p(m, obj)));
        rep.flush();
    }

    /// `free_to_partial_list` after `free_debug_check` passed.
    pub(crate) fn free_to_partial_list(&self, m: &Machine, o: &ObjRef, obj: u64, caller: Option<&Caller>) {
        if let Some(c) = caller {
            self.set_track(m, obj, TRACK_FREE, c);
        }
        let mut rep = Report::new(m);
        let mut n = self.node.lock();
        if self.flags & SLAB_TRACE != 0 {
            let snap = Self::slab_mut(&mut n, o.slab_id).clone();
            self.trace_op(m, &mut rep, &snap, obj, false, caller);
        }
        // The free pointer is not overwritten by init_object: P moved it out.
        self.init_object(m, obj, SLUB_RED_INACTIVE);
        let s = Self::slab_mut(&mut n, o.slab_id);
        let prior = s.freelist;
        self.set_fp(m, obj, prior);
        s.freelist = obj;
        s.inuse -= 1;
        let (inuse, list) = (s.inuse, s.list);
        if inuse == 0 && n.nr_partial as u64 >= self.min_partial() {
            if list == SlabList::NodePartial {
                Self::remove_partial(&mut n, o.slab_id);
            }
            self.discard_slab(m, &mut n, o.slab_id);
        } else if prior == 0 && list == SlabList::None {
            Self::add_partial(&mut n, o.slab_id, true);
        }
        drop(n);
        rep.flush();
    }

    /// `list_slab_objects` for every slab that `__kmem_cache_shutdown`'s
    /// `free_partial` would find on the node's partial list after
    /// `flush_all_cpus_locked`: the node partial slabs and the CPU (and CPU
    /// partial) slabs that are neither empty nor full, their CPU freelists
    /// counted as free. Nothing moves (kmm refuses the destroy and changes
    /// nothing). One error for the slab and one per object, into the log.
    pub(crate) fn list_slab_objects(&self, m: &Machine) {
        let mut cpu_free = std::collections::HashSet::new();
        let mut cpu_held = Vec::new();
        for p in self.cpus.iter() {
            let c = p.lock.lock();
            let mut fp = c.freelist;
            while fp != 0 && cpu_free.len() <= 1 << 20 && cpu_free.insert(fp) {
                fp = self.get_fp(m, fp);
            }
            if c.slab != NIL {
                cpu_held.push(c.slab);
            }
            cpu_held.extend(c.partial.iter().copied());
        }
        let mut rep = Report::new(m);
        {
            let n = self.node.lock();
            let mut ids = Self::partial_ids(&n);
            for id in cpu_held {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            for id in ids {
                let Some(s) = n.slabs.get(id as usize).and_then(|s| s.as_ref()) else { continue };
                let snap = s.clone();
                let (addr, base) = (Self::slab_addr(m, snap.pfn), self.slab_base(m, snap.pfn));
                let mut free = self.free_set(m, &snap);
                for i in 0..snap.objects {
                    let obj = base + i as u64 * self.geo.size as u64;
                    if cpu_free.contains(&obj) {
                        free.insert(obj);
                    }
                }
                let inuse = snap.objects as usize - free.len().min(snap.objects as usize);
                if inuse == 0 || (inuse == snap.objects as usize && snap.list != SlabList::NodePartial) {
                    continue;
                }
                let msg = format!("Objects remaining in {} on __kmem_cache_shutdown()", self.name);
                self.slab_err(m, &mut rep, &snap, &msg);
                for i in 0..snap.objects {
                    let obj = base + i as u64 * self.geo.size as u64;
                    if free.contains(&obj) {
                        continue;
                    }
                    rep.errors += 1;
                    rep.pr_err(format!("Object 0x{} @offset={}", p(m, obj), obj - addr));
                    if self.flags & SLAB_STORE_USER != 0 {
                        let now = m.jiffies64();
                        self.print_track(m, &mut rep, "Allocated", &self.read_track(m, obj, TRACK_ALLOC), now);
                        self.print_track(m, &mut rep, "Freed", &self.read_track(m, obj, TRACK_FREE), now);
                    }
                }
                self.print_slab_info(m, &mut rep, &snap);
            }
        }
        rep.flush();
    }

    // ---- validate and the traces views --------------------------------------------------------------

    /// `validate_slab`.
    fn validate_slab(&self, m: &Machine, rep: &mut Report<'_>, s: &mut Slab) {
        if !self.check_slab(m, rep, s) || !self.on_freelist(m, rep, s, 0) {
            return;
        }
        let free = self.free_set(m, s);
        let base = self.slab_base(m, s.pfn);
        for i in 0..s.objects {
            let obj = base + i as u64 * self.geo.size as u64;
            let val = if free.contains(&obj) { SLUB_RED_INACTIVE } else { SLUB_RED_ACTIVE };
            if !self.check_object(m, rep, s, obj, val) {
                break;
            }
        }
    }

    /// `__fill_map`: the free objects of a slab (its freelist, which
    /// `on_freelist` has made valid; a stray pointer ends the walk).
    fn free_set(&self, m: &Machine, s: &Slab) -> std::collections::HashSet<u64> {
        let mut free = std::collections::HashSet::new();
        let mut fp = s.freelist;
        while fp != 0 && self.fp_ok(m, s.pfn, s.order, fp) && free.len() <= s.objects as usize {
            if !free.insert(fp) {
                break;
            }
            fp = self.get_fp(m, fp);
        }
        free
    }

    /// Ids of the slabs on the node's lists as `validate_slab_node` and
    /// the traces walk them: partial, then (for SLAB_STORE_USER caches,
    /// which keep one) full.
    fn listed_slabs(&self, n: &Node) -> (Vec<u32>, Vec<u32>) {
        let partial = Self::partial_ids(n);
        let full = if self.flags & SLAB_STORE_USER != 0 {
            n.slabs
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().filter(|s| s.list == SlabList::None && !s.frozen).map(|_| i as u32))
                .collect()
        } else {
            Vec::new()
        };
        (partial, full)
    }

    /// `validate_slab_cache` (what writing 1 to /sys/kernel/slab/<cache>/validate
    /// runs): every listed slab checked and repaired. Returns the errors
    /// lib/slub_kunit.c would count and the report (also in the log).
    pub fn validate(&self, m: &Machine) -> (u32, String) {
        let mut rep = Report::new(m);
        {
            let mut n = self.node.lock();
            let (partial, full) = self.listed_slabs(&n);
            let mut count = 0u64;
            for &id in &partial {
                let mut s = Self::slab_mut(&mut n, id).clone();
                self.validate_slab(m, &mut rep, &mut s);
                Self::slab_mut(&mut n, id).apply_repair(&s);
                count += 1;
            }
            if count != n.nr_partial as u64 {
                rep.errors += 1;
                rep.pr_err(format!("SLUB {}: {count} partial slabs counted but counter={}", self.name, n.nr_partial));
            }
            if self.flags & SLAB_STORE_USER != 0 {
                for &id in &full {
                    let mut s = Self::slab_mut(&mut n, id).clone();
                    self.validate_slab(m, &mut rep, &mut s);
                    Self::slab_mut(&mut n, id).apply_repair(&s);
                    count += 1;
                }
                if count != n.nr_slabs {
                    rep.errors += 1;
                    rep.pr_err(format!("SLUB: {} {count} slabs counted but counter={}", self.name, n.nr_slabs));
                }
            }
        }
        let errors = rep.errors;
        (errors, rep.flush())
    }

    /// /sys/kernel/debug/slab/<cache>/alloc_traces (`which` TRACK_ALLOC)
    /// or free_traces (TRACK_FREE): the allocated objects' tracks grouped
    /// by call site, stack and waste, most frequent first.
    pub fn traces(&self, m: &Machine, which: u64) -> String {
        #[derive(Default)]
        struct Loc {
            count: u64,
            sum_time: u64,
            min_time: u64,
            max_time: u64,
            min_pid: i64,
            max_pid: i64,
            cpus: std::collections::BTreeSet<u32>,
        }
        let now = m.jiffies64();
        let mut locs: std::collections::BTreeMap<(u64, u32, u32), Loc> = std::collections::BTreeMap::new();
        {
            let n = self.node.lock();
            let (partial, full) = self.listed_slabs(&n);
            for id in partial.into_iter().chain(full) {
                let Some(s) = n.slabs[id as usize].as_ref() else { continue };
                let free = self.free_set(m, s);
                let base = self.slab_base(m, s.pfn);
                for i in 0..s.objects {
                    let obj = base + i as u64 * self.geo.size as u64;
                    if free.contains(&obj) {
                        continue;
                    }
                    let t = self.read_track(m, obj, which);
                    let orig = if which == TRACK_ALLOC { self.get_orig_size(m, obj) } else { self.geo.object_size };
                    let waste = self.geo.object_size.saturating_sub(orig);
                    let age = now.wrapping_sub(t.when);
                    let l = locs.entry((t.addr, t.handle, waste)).or_default();
                    if l.count == 0 {
                        (l.sum_time, l.min_time, l.max_time) = (age, age, age);
                        (l.min_pid, l.max_pid) = (t.pid as i64, t.pid as i64);
                        l.cpus.insert(t.cpu);
                    } else if t.when != 0 {
                        l.sum_time = l.sum_time.wrapping_add(age);
                        l.min_time = l.min_time.min(age);
                        l.max_time = l.max_time.max(age);
                        l.min_pid = l.min_pid.min(t.pid as i64);
                        l.max_pid = l.max_pid.max(t.pid as i64);
                        l.cpus.insert(t.cpu);
                    }
                    l.count += 1;
                }
            }
        }
        let mut v: Vec<((u64, u32, u32), Loc)> = locs.into_iter().collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.1.count));
        let mut out = String::new();
        for ((addr, handle, waste), l) in &v {
            out.push_str(&format!("{:7} ", l.count));
            if *addr != 0 {
                out.push_str(&m.depot.sym_name(*addr));
            } else {
                out.push_str("<not-available>");
            }
            if *waste != 0 {
                out.push_str(&format!(" waste={}/{}", l.count * *waste as u64, waste));
            }
            if l.sum_time != l.min_time {
                out.push_str(&format!(" age={}/{}/{}", l.min_time, l.sum_time / l.count, l.max_time));
            } else {
                out.push_str(&format!(" age={}", l.min_time));
            }
            if l.min_pid != l.max_pid {
                out.push_str(&format!(" pid={}-{}", l.min_pid, l.max_pid));
            } else {
                out.push_str(&format!(" pid={}", l.min_pid));
            }
            if m.cfg.cpus > 1 && !l.cpus.is_empty() {
                out.push_str(&format!(" cpus={}", cpulist(&l.cpus)));
            }
            if let Some(frames) = m.depot.fetch(*handle) {
                out.push('\n');
                for f in frames.iter() {
                    out.push_str(&format!("        {f}\n"));
                }
            }
            out.push('\n');
        }
        if v.is_empty() {
            out.push_str("No data\n");
        }
        out
    }
}

impl Slab {
    /// Take what a validation repaired (freelist, in-use count); the list
    /// links stay the node's.
    fn apply_repair(&mut self, s: &Slab) {
        self.freelist = s.freelist;
        self.inuse = s.inuse;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_dump_matches_the_kernel_layout() {
        let row: Vec<u8> = (0..16).map(|i| if i < 8 { 0x6b } else { b'A' + i as u8 }).collect();
        let line = hex_dump_line(&row);
        assert_eq!(line, "6b 6b 6b 6b 6b 6b 6b 6b 49 4a 4b 4c 4d 4e 4f 50  kkkkkkkkIJKLMNOP");
        // A short row keeps the ASCII column at 49.
        assert_eq!(hex_dump_line(&[0xcc, 0x00]), format!("cc 00{}..", " ".repeat(44)));
    }

    #[test]
    fn cpu_lists() {
        let s: std::collections::BTreeSet<u32> = [0, 1, 2, 4, 6, 7].into_iter().collect();
        assert_eq!(cpulist(&s), "0-2,4,6-7");
    }
}
