//! kmemleak (`kmemleak=on`): every slab object and large kmalloc is
//! tracked from allocation to free, and a scan finds the ones nothing
//! references any more.
//!
//! A scan works as mm/kmemleak.c's `kmemleak_scan`: every tracked object is
//! whitened (count 0); the roots are scanned word by word for values that
//! point into a tracked object (anywhere inside it: aliases count); an
//! object reaching `min_count` references turns gray and is scanned in turn
//! (the gray list); white objects whose contents changed since the last
//! scan (crc32 checksum) are grayed for this scan; what is still white,
//! allocated and at least 5 s old (`MSECS_MIN_AGE`) is a suspected leak,
//! reported once (`OBJECT_REPORTED`) and listed by
//! /sys/kernel/debug/kmemleak (`Machine::kmemleak_report`). Note the
//! kernel's consequence: a freshly leaked object is normally reported by the
//! second scan after it turned old enough (the first one only records its
//! checksum), unless its bytes checksum to 0 (all zero).
//!
//! Roots, kmm's stand-ins for the kernel's data sections, per-CPU areas and
//! task stacks: the values Python still holds (live Blocks, ints and 8-byte
//! integer arrays, collected by the binding), every live per-CPU allocation
//! in every CPU's unit, the
//! pages of every vmalloc area (vmapped kernel stacks among them), and the
//! vmalloc layer's own objects (vm_struct, vmap_area, page arrays: the kernel
//! reaches them from its vmap_area tree).
//!
//! # Kernel
//! `mm/kmemleak.c` (6.18): `create_object`, `delete_object_full`,
//! `update_refs`, `scan_block`, `scan_object`, `scan_gray_list`,
//! `update_checksum`, `kmemleak_scan`, `unreferenced_object`,
//! `print_unreferenced`, `hex_dump_object`, `kmemleak_seq_show`,
//! `kmemleak_clear`, `kmemleak_not_leak`; `mm/slub.c`
//! (`slab_post_alloc_hook`, `slab_free_hook`: min_count 1, size
//! `s->object_size`, SLAB_NOLEAKTRACE caches untracked),
//! `mm/slub.c` (`___kmalloc_large_node`: the requested size);
//! `lib/crc32.c` (`crc32_le`).
//!
//! SIMPLIFICATION: vmalloc areas and per-CPU allocations are scanned as
//! roots but never reported (the kernel tracks them too); pages from the
//! page allocator are neither tracked nor scanned (as in the kernel);
//! jiffies are the simulated clock's (`printk.rs`: HZ 250 ticks of
//! `m.time_ns`, which only moves when told to, so an object ages only
//! across `advance_time`); no automatic scan thread, no `scan=`, `stack=`
//! or `dump=` commands; freeing an untracked object (one a warm start
//! placed) is silent.
//!
//! # Invariants
//! - kmemleak-1: every tracked object is a live allocation (its shadow cell is live).
//!
//! Lock order: the kmemleak lock is taken with no allocator lock held; a
//! scan gathers the areas to read (percpu, vmalloc locks) before taking it.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{KmmError, Result};
use crate::machine::Machine;
use crate::printk::HZ;
use crate::slab::cache::debug::hex_dump_line;

/// `MSECS_MIN_AGE`: objects younger than this are not reported.
pub const MSECS_MIN_AGE: u64 = 5000;
/// `jiffies_min_age` = msecs_to_jiffies(MSECS_MIN_AGE).
pub const JIFFIES_MIN_AGE: u64 = MSECS_MIN_AGE * HZ / 1000;
/// `HEX_ROW_SIZE * HEX_MAX_LINES`: bytes shown per object.
const HEX_DUMP_MAX: u64 = 32;

const OBJECT_ALLOCATED: u8 = 1;
const OBJECT_REPORTED: u8 = 2;
/// `KMEMLEAK_BLACK`.
const BLACK: i32 = -1;

/// A `struct kmemleak_object`.
#[derive(Clone, Debug)]
struct Obj {
    size: u64,
    min_count: i32,
    count: i32,
    flags: u8,
    checksum: u32,
    jiffies: u64,
    pid: i32,
    comm: Arc<str>,
    trace: u32,
    /// Creation order (`object_list` is in allocation order).
    seq: u64,
}

impl Obj {
    fn white(&self) -> bool {
        self.count != BLACK && self.count < self.min_count
    }
    fn gray(&self) -> bool {
        self.min_count != BLACK && self.count >= self.min_count
    }
}

#[derive(Default)]
struct State {
    objects: BTreeMap<u64, Obj>,
    seq: u64,
    /// `jiffies_last_scan` (jiffies_64).
    last_scan: u64,
}

/// The kmemleak state of a machine.
#[derive(Default)]
pub struct Kmemleak {
    /// `kmemleak=on`.
    pub enabled: bool,
    state: Mutex<State>,
}

impl Kmemleak {
    pub fn new(enabled: bool) -> Kmemleak {
        Kmemleak { enabled, state: Mutex::new(State::default()) }
    }
}

/// `crc32_le(0, p, len)` as lib/crc32.c computes it (no inversion).
pub fn crc32_le(mut crc: u32, p: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0xedb8_8320 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    for &b in p {
        crc = t[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// The object containing `ptr` (`__lookup_object` with alias).
fn lookup(objects: &BTreeMap<u64, Obj>, ptr: u64) -> Option<u64> {
    let (&start, o) = objects.range(..=ptr).next_back()?;
    (ptr < start + o.size.max(1)).then_some(start)
}

/// A scan in progress: the gray list and the address bounds.
struct Scan<'a> {
    st: &'a mut State,
    gray: std::collections::VecDeque<u64>,
    min_addr: u64,
    max_addr: u64,
    word: usize,
}

impl Scan<'_> {
    /// One value found in scanned memory (`scan_block`'s loop body).
    fn reference(&mut self, v: u64, scanned: Option<u64>) {
        if v < self.min_addr || v >= self.max_addr {
            return;
        }
        let Some(start) = lookup(&self.st.objects, v) else { return };
        if Some(start) == scanned {
            return; // self referenced
        }
        let o = self.st.objects.get_mut(&start).expect("looked up");
        if o.gray() || !o.white() {
            return;
        }
        // update_refs.
        o.count += 1;
        if o.gray() {
            self.gray.push_back(start);
        }
    }

    /// `scan_block` over bytes read from memory.
    fn block(&mut self, bytes: &[u8], scanned: Option<u64>) {
        for w in bytes.chunks_exact(self.word) {
            let v = if self.word == 8 {
                u64::from_le_bytes(w.try_into().expect("8 bytes"))
            } else {
                u32::from_le_bytes(w.try_into().expect("4 bytes")) as u64
            };
            self.reference(v, scanned);
        }
    }

    /// `scan_gray_list`: scan each gray object, including the ones it grays.
    fn gray_list(&mut self, m: &Machine) {
        while let Some(start) = self.gray.pop_front() {
            let Some(o) = self.st.objects.get(&start) else { continue };
            if o.flags & OBJECT_ALLOCATED == 0 {
                continue;
            }
            let bytes = read_object(m, start, o.size);
            self.block(&bytes, Some(start));
        }
    }
}

/// An object's bytes (slab objects and large kmallocs are in the direct map).
fn read_object(m: &Machine, va: u64, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    if let Ok(pa) = m.virt_to_phys(crate::machine::VirtAddr(va)) {
        let _ = m.phys.read(pa.0, &mut buf);
    }
    buf
}

impl Machine {
    fn kmemleak_on(&self) -> Result<()> {
        if self.kmemleak.enabled {
            Ok(())
        } else {
            Err(KmmError::InvalidArgument(
                "kmemleak is off (no /sys/kernel/debug/kmemleak): boot with cmdline=\"kmemleak=on\"".into(),
            ))
        }
    }

    /// `kmemleak_alloc(ptr, size, min_count)`: track a new object. Called
    /// with no allocator lock held (it records the Python caller).
    pub(crate) fn kmemleak_alloc(&self, ptr: u64, size: u64, min_count: i32) {
        let c = self.caller(crate::slab::python_call_site());
        let jiffies = self.jiffies64();
        let mut st = self.kmemleak.state.lock();
        st.seq += 1;
        let seq = st.seq;
        st.objects.insert(
            ptr,
            Obj {
                size,
                min_count,
                count: 0,
                flags: OBJECT_ALLOCATED,
                checksum: 0,
                jiffies,
                pid: c.pid,
                comm: c.comm,
                trace: c.handle,
                seq,
            },
        );
    }

    /// `kmemleak_free(ptr)`: stop tracking an object.
    pub(crate) fn kmemleak_free(&self, ptr: u64) {
        self.kmemleak.state.lock().objects.remove(&ptr);
    }

    /// Every live per-CPU allocation and vmalloc page, as (physical address, bytes),
    /// and the vmalloc layer's own objects: the scan's memory roots.
    fn kmemleak_root_areas(&self) -> (Vec<(u64, u64)>, Vec<u64>) {
        let mut areas = self.pcpu_alloc_ranges();
        for a in self.vm_areas() {
            for pfn in &a.pages {
                areas.push((pfn.0 << self.page_shift, self.page_size));
            }
        }
        (areas, self.vmalloc_internal_objects())
    }

    /// `kmemleak_scan` ("echo scan > /sys/kernel/debug/kmemleak"), with the
    /// values Python holds as extra roots. Returns how many new suspected
    /// leaks it found (also logged: "kmemleak: N new suspected memory leaks").
    pub fn kmemleak_scan(&self, roots: &[u64]) -> Result<usize> {
        self.kmemleak_on()?;
        let (areas, internal) = self.kmemleak_root_areas();
        let now = self.jiffies64();
        let mut st = self.kmemleak.state.lock();
        st.last_scan = now;
        // Whiten every object; gray ones (min_count 0) go on the gray list.
        let mut gray = std::collections::VecDeque::new();
        for (&k, o) in st.objects.iter_mut() {
            o.count = 0;
            if o.gray() {
                gray.push_back(k);
            }
        }
        let min_addr = st.objects.keys().next().copied().unwrap_or(u64::MAX);
        let max_addr = st.objects.iter().next_back().map_or(0, |(&k, o)| k + o.size.max(1));
        let word = self.cfg.arch.pointer_bytes() as usize;
        let mut scan = Scan { st: &mut st, gray, min_addr, max_addr, word };
        for &v in roots.iter().chain(&internal) {
            scan.reference(v, None);
        }
        let mut buf = vec![0u8; 1 << 16];
        for &(pa, len) in &areas {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                if self.phys.read(pa + off, &mut buf[..n]).is_ok() {
                    scan.block(&buf[..n], None);
                }
                off += n as u64;
            }
        }
        scan.gray_list(self);
        // White objects modified since the previous scan are gray for now.
        let whites: Vec<u64> =
            scan.st.objects.iter().filter(|(_, o)| o.white() && o.flags & OBJECT_ALLOCATED != 0).map(|(&k, _)| k).collect();
        for k in whites {
            let size = scan.st.objects[&k].size;
            let crc = crc32_le(0, &read_object(self, k, size));
            let o = scan.st.objects.get_mut(&k).expect("listed");
            let changed = o.checksum != crc;
            o.checksum = crc;
            if changed {
                o.count = o.min_count;
                scan.gray.push_back(k);
            }
        }
        scan.gray_list(self);
        let mut new_leaks = 0;
        for o in st.objects.values_mut() {
            if o.white() && o.flags & OBJECT_ALLOCATED != 0 && o.jiffies + JIFFIES_MIN_AGE <= now && o.flags & OBJECT_REPORTED == 0 {
                o.flags |= OBJECT_REPORTED;
                new_leaks += 1;
            }
        }
        drop(st);
        if new_leaks > 0 {
            self.printk([format!(
                "kmemleak: {new_leaks} new suspected memory leaks (see /sys/kernel/debug/kmemleak)"
            )]);
        }
        Ok(new_leaks)
    }

    /// `unreferenced_object` as of the last scan.
    fn unreferenced(o: &Obj, last_scan: u64) -> bool {
        o.white() && o.flags & OBJECT_ALLOCATED != 0 && o.jiffies + JIFFIES_MIN_AGE <= last_scan
    }

    /// /sys/kernel/debug/kmemleak: every reported object still unreferenced,
    /// in allocation order (`print_unreferenced`).
    pub fn kmemleak_report(&self) -> Result<String> {
        self.kmemleak_on()?;
        let st = self.kmemleak.state.lock();
        let mut objs: Vec<(&u64, &Obj)> =
            st.objects.iter().filter(|(_, o)| o.flags & OBJECT_REPORTED != 0 && Self::unreferenced(o, st.last_scan)).collect();
        objs.sort_by_key(|(_, o)| o.seq);
        let mut s = String::new();
        for (&ptr, o) in objs {
            s.push_str(&format!("unreferenced object 0x{ptr:08x} (size {}):\n", o.size));
            s.push_str(&format!("  comm \"{}\", pid {}, jiffies {}\n", o.comm, o.pid, self.jiffies_ulong(o.jiffies)));
            let len = o.size.min(HEX_DUMP_MAX);
            s.push_str(&format!("  hex dump (first {len} bytes):\n"));
            for row in read_object(self, ptr, len).chunks(16) {
                s.push_str(&format!("    {}\n", hex_dump_line(row)));
            }
            s.push_str(&format!("  backtrace (crc {:x}):\n", o.checksum));
            if let Some(frames) = self.depot.fetch(o.trace) {
                for f in frames.iter() {
                    s.push_str(&format!("    {f}\n"));
                }
            }
        }
        Ok(s)
    }

    /// "echo clear > /sys/kernel/debug/kmemleak": the reported leaks are
    /// painted gray (never reported again).
    pub fn kmemleak_clear(&self) -> Result<()> {
        self.kmemleak_on()?;
        let mut st = self.kmemleak.state.lock();
        let last = st.last_scan;
        for o in st.objects.values_mut() {
            if o.flags & OBJECT_REPORTED != 0 && Self::unreferenced(o, last) {
                o.min_count = 0;
            }
        }
        Ok(())
    }

    /// `kmemleak_not_leak(ptr)`: the object is never reported (gray).
    pub fn kmemleak_not_leak(&self, ptr: u64) -> Result<()> {
        self.kmemleak_on()?;
        match self.kmemleak.state.lock().objects.get_mut(&ptr) {
            Some(o) => {
                o.min_count = 0;
                Ok(())
            }
            None => Err(KmmError::InvalidArgument(format!(
                "kmemleak: Trying to color unknown object at {ptr:#x} as Grey (not a tracked allocation)"
            ))),
        }
    }

    /// Objects kmemleak tracks.
    pub fn kmemleak_objects(&self) -> usize {
        self.kmemleak.state.lock().objects.len()
    }

    /// kmemleak-1.
    pub fn check_kmemleak(&self) -> Vec<String> {
        let st = self.kmemleak.state.lock();
        let po = self.cfg.arch.page_offset();
        st.objects
            .keys()
            .filter(|&&k| k < po || !self.shadow.is_live(k - po))
            .map(|k| format!("kmemleak-1: tracked object {k:#x} is not a live allocation"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_kernels() {
        // crc32_le with seed 0 and no final inversion: the standard CRC-32
        // of "123456789" is 0xcbf43926 = !crc32_le(!0, ..).
        assert_eq!(!crc32_le(!0, b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32_le(0, &[0u8; 64]), 0, "zeroes checksum to 0");
        assert_ne!(crc32_le(0, &[0x6bu8; 64]), 0);
    }

    #[test]
    fn lookup_finds_aliases() {
        let mut m = BTreeMap::new();
        let o = Obj {
            size: 64,
            min_count: 1,
            count: 0,
            flags: OBJECT_ALLOCATED,
            checksum: 0,
            jiffies: 0,
            pid: 1,
            comm: Arc::from("t"),
            trace: 0,
            seq: 1,
        };
        m.insert(0x1000, o);
        assert_eq!(lookup(&m, 0x1000), Some(0x1000));
        assert_eq!(lookup(&m, 0x103f), Some(0x1000));
        assert_eq!(lookup(&m, 0x1040), None);
        assert_eq!(lookup(&m, 0xfff), None);
    }
}
