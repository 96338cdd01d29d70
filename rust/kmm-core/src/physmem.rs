//! Real backing memory: one sparse memfd holds every simulated physical byte;
//! the direct map is one host mapping of (the low part of) it.
//!
//! This is one of the two places where `unsafe` lives (the other is the
//! buffer-protocol export in the binding). Every other module forbids it.
//!
//! # Model
//! - Physical address `p` is file offset `p` of the memfd. The file is created
//!   with `ftruncate` and never written at boot, so untouched pages cost the
//!   host nothing: a 64 GiB machine boots on a 24 GiB host.
//! - The direct map covers physical `[0, direct_len)`: all of RAM on x86_64,
//!   low memory only on i386 (high pages have no permanent host address, as in
//!   the kernel). Bytes outside it are reached with `pread`/`pwrite`.
//! - Zeroing large ranges punches holes (`FALLOC_FL_PUNCH_HOLE`), which also
//!   gives the memory back to the host.
//! - A `Zeroed<T>` is a host array of zero-initialised metadata (the
//!   `mem_map`): an anonymous MAP_NORESERVE mapping, so untouched entries cost
//!   the host nothing and a 16 TiB machine's 64 GiB mem_map needs no
//!   overcommit. `Zeroed::touched` reads `/proc/self/pagemap` to tell which
//!   host pages of it were ever written (a host page never faulted in reads
//!   as zeros), so invariant checks can skip untouched metadata; where
//!   pagemap cannot be read it reports every page (exact, slower).
//! - A `HostMap` makes scattered pages virtually contiguous for the host (a
//!   vmalloc area exported to Python): a reserved range with each run of
//!   contiguous pfns mapped MAP_FIXED|MAP_SHARED from the memfd, so a write
//!   through it is visible through the direct map. Host mappings are a budget
//!   (`vm.max_map_count`, 65530 by default): `HOST_MAP_BUDGET` caps what kmm
//!   holds at once, and `map_pages` refuses beyond it.
//!
//! # Invariants
//! - physmem-1: the direct mapping is `direct_len` bytes, MAP_SHARED of the
//!   memfd at offset 0, and lives as long as the `PhysMem`.
//! - physmem-2: every host pointer handed out lies inside that mapping, or
//!   inside a live `HostMap` (which the caller keeps alive while using it).
//! - physmem-4: a `Zeroed<T>` mapping is private anonymous memory of exactly
//!   `len` elements, zero-filled by the host, owned by the `Zeroed`.
//! - physmem-3: `host_maps` counts the mappings of live `HostMap`s and never
//!   exceeds `HOST_MAP_BUDGET`.
//!
//! Concurrency: simulated memory is plain bytes shared by every thread, like
//! RAM. Two threads writing the same simulated bytes at once race exactly as
//! two CPUs would; the allocator never hands the same bytes to two owners.

use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use rustix::fs::{fallocate, ftruncate, memfd_create, FallocateFlags, MemfdFlags};
use rustix::io::{pread, pwrite};
use rustix::mm::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

use crate::error::{KmmError, Result};

/// A zero-filled host array of `T` (see the module header): the `mem_map`.
pub struct Zeroed<T> {
    ptr: NonNull<T>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is owned by this struct; `T` is only reachable through
// `&[T]`, so sharing it is sound when `T` is `Sync` (atomics).
unsafe impl<T: Sync> Send for Zeroed<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Zeroed<T> {}

impl<T: bytemuck::Zeroable> Zeroed<T> {
    /// `len` zeroed elements, or the host's refusal.
    pub fn new(len: usize) -> Result<Zeroed<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| KmmError::Host(format!("cannot map {len} metadata entries: size overflows")))?;
        if bytes == 0 {
            return Ok(Zeroed { ptr: NonNull::dangling(), len, bytes });
        }
        // SAFETY: a fresh private anonymous mapping at an address the kernel
        // picks (no MAP_FIXED); the host fills it with zeros, a valid `T`
        // (`Zeroable`), and page alignment satisfies any `T`'s alignment.
        let p = unsafe {
            mmap_anonymous(std::ptr::null_mut(), bytes, ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE | MapFlags::NORESERVE)
        }
        .map_err(|e| host_err(&format!("mmap of {} MiB of page metadata", bytes >> 20), e))?;
        Ok(Zeroed { ptr: NonNull::new(p.cast::<T>()).expect("mmap returned null"), len, bytes })
    }

    #[inline]
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `ptr` points to `len` initialised (zero-filled) `T`s that
        // live as long as `self` (physmem-4); only shared references are made.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Runs `[a, b)` of element indexes inside `[lo, hi)` whose host pages
    /// may hold non-zero bytes: every element outside them is still zero.
    /// Sorted and disjoint. Without a readable `/proc/self/pagemap`, the
    /// whole range.
    pub fn touched(&self, lo: usize, hi: usize) -> Vec<(usize, usize)> {
        let hi = hi.min(self.len);
        if lo >= hi {
            return Vec::new();
        }
        self.touched_pagemap(lo, hi).unwrap_or_else(|| vec![(lo, hi)])
    }

    fn touched_pagemap(&self, lo: usize, hi: usize) -> Option<Vec<(usize, usize)>> {
        use std::os::unix::fs::FileExt;
        let sz = std::mem::size_of::<T>();
        let hp = rustix::param::page_size();
        let base = self.ptr.as_ptr() as usize;
        // Host pages [p0, p1) hold elements [lo, hi).
        let (p0, p1) = ((base + lo * sz) / hp, (base + hi * sz).div_ceil(hp));
        let f = std::fs::File::open("/proc/self/pagemap").ok()?;
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut buf = vec![0u8; 8 * 65536];
        let mut page = p0;
        while page < p1 {
            let n = (p1 - page).min(65536);
            let b = &mut buf[..8 * n];
            f.read_exact_at(b, (page * 8) as u64).ok()?;
            for (k, e) in b.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                // Bit 63: present; bit 62: swapped (or a migration entry).
                if e >> 62 == 0 {
                    continue;
                }
                let hpage = page + k;
                let a = ((hpage * hp).saturating_sub(base) / sz).max(lo);
                let z = ((hpage + 1) * hp - base).div_ceil(sz).min(hi);
                match runs.last_mut() {
                    Some(r) if r.1 >= a => r.1 = r.1.max(z),
                    _ => runs.push((a, z)),
                }
            }
            page += n;
        }
        Some(runs)
    }
}

impl<T> Drop for Zeroed<T> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            // SAFETY: unmapping exactly the mapping made in `new`; no
            // reference into it outlives `self`.
            let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.bytes) };
        }
    }
}

/// Below this many bytes, zeroing is a memset; at or above, a hole punch.
const PUNCH_THRESHOLD: u64 = 64 << 10;

/// Host mappings kmm may hold at once for `HostMap`s: half of Linux's
/// default `vm.max_map_count` (65530), leaving the rest to the process.
pub const HOST_MAP_BUDGET: usize = 32768;

/// The simulated machine's physical memory.
pub struct PhysMem {
    fd: OwnedFd,
    size: u64,
    direct: NonNull<u8>,
    direct_len: usize,
    /// Mappings held by live `HostMap`s (physmem-3).
    host_maps: Arc<AtomicUsize>,
}

/// Scattered physical pages mapped contiguously in the host (see the module
/// header). Unmapped when dropped.
pub struct HostMap {
    ptr: NonNull<u8>,
    len: usize,
    maps: usize,
    budget: Arc<AtomicUsize>,
}

// SAFETY: the mapping is owned by this struct; it is shared memory, plain bytes
// any thread may touch (see the module header).
unsafe impl Send for HostMap {}
// SAFETY: as above.
unsafe impl Sync for HostMap {}

impl HostMap {
    /// Host address of the first byte.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host mappings this map uses (one per run of contiguous pfns).
    pub fn mappings(&self) -> usize {
        self.maps
    }
}

impl Drop for HostMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range reserved in `map_pages`; the
        // owner guarantees no pointer into it is used after the drop.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) };
        self.budget.fetch_sub(self.maps, Relaxed);
    }
}

// SAFETY: the mapping is shared memory owned by this struct for its whole
// life; all access goes through methods that bounds-check, and simulated
// memory is plain bytes that any thread may touch (see the module header).
unsafe impl Send for PhysMem {}
// SAFETY: as above; no method hands out references with aliasing guarantees.
unsafe impl Sync for PhysMem {}

fn host_err(what: &str, e: rustix::io::Errno) -> KmmError {
    KmmError::Host(format!("{what}: {e}"))
}

impl PhysMem {
    /// Create `size` bytes of sparse physical memory and map `[0, direct_len)`.
    pub fn new(size: u64, direct_len: u64) -> Result<PhysMem> {
        assert!(direct_len <= size);
        let fd = memfd_create("kmm-physmem", MemfdFlags::CLOEXEC)
            .map_err(|e| host_err("memfd_create", e))?;
        ftruncate(&fd, size).map_err(|e| host_err("ftruncate", e))?;
        let direct_len = usize::try_from(direct_len)
            .map_err(|_| KmmError::InvalidArgument("memory too large for this host".into()))?;
        let direct = if direct_len == 0 {
            NonNull::dangling()
        } else {
            // SAFETY: a fresh shared mapping of our own memfd; nothing else is
            // mapped at the address the kernel picks (no MAP_FIXED).
            let p = unsafe {
                mmap(
                    std::ptr::null_mut(),
                    direct_len,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED | MapFlags::NORESERVE,
                    &fd,
                    0,
                )
            }
            .map_err(|e| host_err("mmap of the direct map", e))?;
            NonNull::new(p.cast::<u8>()).expect("mmap returned null")
        };
        Ok(PhysMem { fd, size, direct, direct_len, host_maps: Arc::new(AtomicUsize::new(0)) })
    }

    /// Host mappings held by live `HostMap`s.
    pub fn host_mappings(&self) -> usize {
        self.host_maps.load(Relaxed)
    }

    /// Map the pages at physical addresses `pages` (each `page_size` bytes)
    /// one after another in a fresh host range: one mapping per run of
    /// physically contiguous pages. Refused (BufferBusy) beyond the budget.
    pub fn map_pages(&self, pages: &[u64], page_size: u64) -> Result<HostMap> {
        let ps = page_size as usize;
        let mut runs: Vec<(usize, u64, usize)> = Vec::new(); // (first index, phys, pages)
        for (i, &p) in pages.iter().enumerate() {
            self.check(p, ps)?;
            match runs.last_mut() {
                Some(r) if r.1 + (r.2 * ps) as u64 == p => r.2 += 1,
                _ => runs.push((i, p, 1)),
            }
        }
        let len = pages.len() * ps;
        if len == 0 {
            return Err(KmmError::InvalidArgument("map_pages: no pages".into()));
        }
        let held = self.host_maps.fetch_add(runs.len(), Relaxed);
        if held + runs.len() > HOST_MAP_BUDGET {
            self.host_maps.fetch_sub(runs.len(), Relaxed);
            return Err(KmmError::BufferBusy(format!(
                "host mapping budget spent: exporting this buffer needs {} host mappings and kmm holds {held} of its \
                 budget of {HOST_MAP_BUDGET} (half of the vm.max_map_count sysctl's default); release other \
                 exports, or use Machine.read/write, which need no host mapping",
                runs.len()
            )));
        }
        // SAFETY: a fresh private reservation at an address the kernel picks.
        let base = match unsafe { mmap_anonymous(std::ptr::null_mut(), len, ProtFlags::empty(), MapFlags::PRIVATE | MapFlags::NORESERVE) } {
            Ok(p) => p.cast::<u8>(),
            Err(e) => {
                self.host_maps.fetch_sub(runs.len(), Relaxed);
                return Err(host_err("mmap (reserve)", e));
            }
        };
        let map = HostMap {
            ptr: NonNull::new(base).expect("mmap returned null"),
            len,
            maps: runs.len(),
            budget: self.host_maps.clone(),
        };
        for &(i, phys, n) in &runs {
            // SAFETY: the target lies inside the reservation made above, which
            // `map` owns; MAP_FIXED replaces only our own reserved pages.
            unsafe {
                mmap(
                    base.add(i * ps).cast(),
                    n * ps,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED | MapFlags::FIXED,
                    &self.fd,
                    phys,
                )
            }
            .map_err(|e| host_err("mmap (MAP_FIXED of a page run)", e))?;
        }
        Ok(map)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn direct_len(&self) -> u64 {
        self.direct_len as u64
    }

    fn check(&self, phys: u64, len: usize) -> Result<()> {
        match phys.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(KmmError::PageFault(format!(
                "BUG: unable to handle page fault for address: {phys:#x} (physical range beyond RAM)"
            ))),
        }
    }

    fn in_direct(&self, phys: u64, len: usize) -> bool {
        phys.checked_add(len as u64).is_some_and(|e| e <= self.direct_len as u64)
    }

    /// Host pointer for `[phys, phys+len)` if it lies in the direct map.
    ///
    /// The pointer stays valid as long as `self` lives (physmem-1). Callers
    /// that build slices from it must own those bytes (a live allocation).
    pub fn direct_ptr(&self, phys: u64, len: usize) -> Option<NonNull<u8>> {
        if !self.in_direct(phys, len) {
            return None;
        }
        // SAFETY: phys + len <= direct_len, so the offset stays inside the mapping.
        Some(unsafe { self.direct.add(phys as usize) })
    }

    /// Copy simulated bytes at `phys` into `buf`.
    pub fn read(&self, phys: u64, buf: &mut [u8]) -> Result<()> {
        self.check(phys, buf.len())?;
        if let Some(p) = self.direct_ptr(phys, buf.len()) {
            // SAFETY: `p..p+len` is inside the live mapping (checked above);
            // `buf` is a distinct Rust buffer, so the ranges cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), buf.as_mut_ptr(), buf.len()) };
            return Ok(());
        }
        let mut done = 0;
        while done < buf.len() {
            let n = pread(&self.fd, &mut buf[done..], phys + done as u64)
                .map_err(|e| host_err("pread", e))?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }

    /// Copy `data` into simulated memory at `phys`.
    pub fn write(&self, phys: u64, data: &[u8]) -> Result<()> {
        self.check(phys, data.len())?;
        if let Some(p) = self.direct_ptr(phys, data.len()) {
            // SAFETY: inside the live mapping (checked); `data` is a Rust slice
            // outside the mapping's range of host addresses handed to Rust code.
            unsafe { std::ptr::copy(data.as_ptr(), p.as_ptr(), data.len()) };
            return Ok(());
        }
        let mut done = 0;
        while done < data.len() {
            let n = pwrite(&self.fd, &data[done..], phys + done as u64)
                .map_err(|e| host_err("pwrite", e))?;
            done += n;
        }
        Ok(())
    }

    /// Read a native-endian u64 (a slab free pointer) at `phys`.
    #[inline]
    pub fn read_u64(&self, phys: u64) -> Result<u64> {
        if let Some(p) = self.direct_ptr(phys, 8) {
            // SAFETY: 8 bytes inside the live mapping (checked by direct_ptr);
            // read_unaligned has no alignment requirement.
            return Ok(unsafe { p.as_ptr().cast::<u64>().read_unaligned() });
        }
        let mut b = [0u8; 8];
        self.read(phys, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }

    /// Write a native-endian u64 at `phys`.
    #[inline]
    pub fn write_u64(&self, phys: u64, v: u64) -> Result<()> {
        if let Some(p) = self.direct_ptr(phys, 8) {
            // SAFETY: 8 bytes inside the live mapping (checked by direct_ptr).
            unsafe { p.as_ptr().cast::<u64>().write_unaligned(v) };
            return Ok(());
        }
        self.write(phys, &v.to_ne_bytes())
    }

    /// Fill `[phys, phys+len)` with `byte` (poisoning, red zones).
    pub fn fill(&self, phys: u64, len: u64, byte: u8) -> Result<()> {
        self.check(phys, len as usize)?;
        if let Some(p) = self.direct_ptr(phys, len as usize) {
            // SAFETY: inside the live mapping (checked above).
            unsafe { std::ptr::write_bytes(p.as_ptr(), byte, len as usize) };
            return Ok(());
        }
        self.write(phys, &vec![byte; len as usize])
    }

    /// Zero `[phys, phys+len)`: memset for small ranges in the direct map,
    /// otherwise a hole punch (which also returns the memory to the host).
    pub fn zero(&self, phys: u64, len: u64) -> Result<()> {
        self.check(phys, len as usize)?;
        if len < PUNCH_THRESHOLD {
            if let Some(p) = self.direct_ptr(phys, len as usize) {
                // SAFETY: inside the live mapping (checked above).
                unsafe { std::ptr::write_bytes(p.as_ptr(), 0, len as usize) };
                return Ok(());
            }
        }
        self.punch(phys, len)
    }

    /// Give `[phys, phys+len)` back to the host; it reads as zero afterwards.
    pub fn punch(&self, phys: u64, len: u64) -> Result<()> {
        self.check(phys, len as usize)?;
        fallocate(
            &self.fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            phys,
            len,
        )
        .map_err(|e| host_err("fallocate(PUNCH_HOLE)", e))
    }
}

impl Drop for PhysMem {
    fn drop(&mut self) {
        if self.direct_len != 0 {
            // SAFETY: unmapping exactly the mapping created in `new`; no
            // pointer into it outlives `self` (physmem-2).
            let _ = unsafe { munmap(self.direct.as_ptr().cast(), self.direct_len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_and_shared() {
        let pm = PhysMem::new(64 << 30, 1 << 30).unwrap();
        let mut b = [0xffu8; 8];
        pm.read(5 << 30, &mut b).unwrap(); // beyond the direct map: pread
        assert_eq!(b, [0; 8]);
        pm.write(4096, b"hello").unwrap();
        let mut r = [0u8; 5];
        pm.read(4096, &mut r).unwrap();
        assert_eq!(&r, b"hello");
        pm.write((5 << 30) + 7, b"high").unwrap();
        let mut r = [0u8; 4];
        pm.read((5 << 30) + 7, &mut r).unwrap();
        assert_eq!(&r, b"high");
        pm.zero(4096, 4096).unwrap();
        pm.read(4096, &mut r).unwrap();
        assert_eq!(r, [0; 4]);
        pm.write(1 << 20, &[7u8; 4096]).unwrap();
        pm.zero(0, 2 << 20).unwrap(); // punched
        let mut r = [1u8; 16];
        pm.read(1 << 20, &mut r).unwrap();
        assert_eq!(r, [0; 16]);
        assert!(pm.read(64 << 30, &mut r).is_err());
    }

    #[test]
    fn host_map_aliases_scattered_pages() {
        let pm = PhysMem::new(1 << 30, 1 << 30).unwrap();
        pm.write(5 * 4096, b"five").unwrap();
        pm.write(2 * 4096, b"two").unwrap();
        pm.write((5 << 30) / 8, b"far").unwrap(); // beyond both, same file
        // pages 5, 2, 3: runs [5], [2, 3] -> two mappings
        let m = pm.map_pages(&[5 * 4096, 2 * 4096, 3 * 4096], 4096).unwrap();
        assert_eq!(m.mappings(), 2);
        assert_eq!(pm.host_mappings(), 2);
        // SAFETY: the map is alive and 3 pages long.
        let s = unsafe { std::slice::from_raw_parts_mut(m.ptr().as_ptr(), m.len()) };
        assert_eq!(&s[..4], b"five");
        assert_eq!(&s[4096..4099], b"two");
        s[2 * 4096] = b'X'; // page 3 through the alias
        let mut b = [0u8; 1];
        pm.read(3 * 4096, &mut b).unwrap();
        assert_eq!(&b, b"X");
        drop(m);
        assert_eq!(pm.host_mappings(), 0);
        assert!(pm.map_pages(&[1 << 30], 4096).is_err(), "beyond RAM");
    }
}
