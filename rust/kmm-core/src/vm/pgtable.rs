//! Kernel page tables (init_mm): the levels of each architecture, map,
//! unmap and the software walk.
//!
//! # Kernel
//! `arch/x86/include/asm/pgtable_types.h` (_PAGE_PRESENT, _PAGE_RW, _PAGE_PSE,
//! _PAGE_GLOBAL), `arch/x86/include/asm/pgtable_64_types.h` (4-level:
//! PGDIR_SHIFT 39, PUD_SHIFT 30, PMD_SHIFT 21), `pgtable-2level_types.h`
//! (i386: PGDIR_SHIFT 22, 1024 4-byte entries), `pgtable-3level_types.h` (PAE:
//! a 4-entry PDPT, PMD_SHIFT 21, 8-byte entries), `arch/x86/mm/init.c`
//! (`init_memory_mapping`: the direct map uses 1 GiB pages where aligned and
//! the CPU has gbpages, 2 MiB (PAE) or 4 MiB (i386 PSE) pages where aligned,
//! 4 KiB pages elsewhere), `mm/vmalloc.c` (`vmap_pages_range`,
//! `vunmap_range_noflush`, `vmalloc_to_page`), `mm/memory.c`
//! (`__pte_alloc_kernel`).
//!
//! # Model
//! Entries use the x86 format: the next table's (or the page's) physical
//! address with flag bits P, RW, PS (a leaf above the PTE level) and G.
//! Levels are numbered from the leaf: 0 = PTE, 1 = PMD (i386: PDE), 2 = PUD,
//! 3 = PGD. A table is one page of `entries` entries.
//!
//! Tables built after boot (vmalloc's) are real pages from the buddy
//! allocator (GFP_KERNEL|__GFP_ZERO, marked PG_TABLE) and their entries live
//! in simulated memory, so a page walk reads simulated RAM.
//!
//! SIMPLIFICATION: the boot tables (the PGD, the direct map's tables and the
//! pkmap/fixmap PTE tables) come from memblock in the kernel; here they live
//! in an arena outside simulated RAM, at physical addresses just above it,
//! so that boot leaves the buddy allocator untouched. Nothing else differs:
//! entries point to them by physical address like any table. When the
//! arena would not be addressable above RAM (i386's 4-byte entries hold
//! 32-bit addresses: a 4 GiB machine has no room above RAM), it is a run
//! of reserved lowmem pages instead, below `max_low_pfn` as memblock
//! places them, read and written through RAM like runtime tables
//! (`Machine::new` takes them out of the zone's managed pages).
//! Page-table pages are never freed (nor does the kernel free vmalloc's),
//! except those a failed vmalloc installed (`free_new_tables`).
//!
//! # Invariants
//! - pgtable-1: every present non-leaf entry points to a table page (arena
//!   or PG_TABLE page), and every leaf to RAM.
//!
//! Lock order: `lock` (init_mm.page_table_lock) serialises vmalloc's table
//! installs; nothing is allocated under it (tables are allocated first, see
//! `Machine::map_pages_at`). The boot tables' slots (pkmap, fixmap) are
//! written without it by their owners (`set_boot_pte`).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::arch::Arch;
use crate::error::{KmmError, Result};
use crate::physmem::PhysMem;

pub const _PAGE_PRESENT: u64 = 1 << 0;
pub const _PAGE_RW: u64 = 1 << 1;
pub const _PAGE_ACCESSED: u64 = 1 << 5;
pub const _PAGE_DIRTY: u64 = 1 << 6;
pub const _PAGE_PSE: u64 = 1 << 7;
pub const _PAGE_GLOBAL: u64 = 1 << 8;
/// `__PAGE_KERNEL` without NX (the model does not execute).
pub const PAGE_KERNEL: u64 = _PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_GLOBAL;
/// Flags of a non-leaf entry (`_KERNPG_TABLE`).
pub const KERNPG_TABLE: u64 = _PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY;

/// The result of a successful walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Physical address of the byte asked for.
    pub phys: u64,
    /// Size of the page that maps it.
    pub page_size: u64,
    /// Level of the leaf (0 = PTE).
    pub level: u32,
    /// Table entries read by the walk.
    pub reads: u32,
}

/// The kernel's page tables.
pub struct PageTables {
    pub levels: u32,
    entry_bytes: u32,
    bits: u32,
    page_shift: u32,
    /// Physical address of the top table.
    pub root: u64,
    /// First physical address of the arena's own storage (= RAM size;
    /// u64::MAX when the boot tables live in RAM).
    arena_base: u64,
    arena: Box<[Box<[AtomicU64]>]>,
    /// Where boot table 0 is, and how many boot tables there may be.
    arena_start: u64,
    arena_len: usize,
    /// `init_mm.page_table_lock`.
    pub lock: Mutex<()>,
    /// Table pages taken from the buddy allocator after boot.
    pub nr_runtime_tables: AtomicU64,
}

/// Where a walk stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkErr {
    /// No present entry at this level.
    NotPresent { level: u32 },
}

impl PageTables {
    /// Page-table geometry of an architecture at a page size:
    /// (levels, bytes per entry).
    pub fn geometry(arch: Arch) -> (u32, u32) {
        match arch {
            Arch::X86_64 => (4, 8),
            Arch::I386 => (2, 4),
            Arch::I386Pae => (3, 8),
        }
    }

    /// `arena_tables` boot tables are made empty; `new` links none of them.
    /// With `in_ram`, they are the (zeroed, reserved) RAM pages from that
    /// physical address on.
    pub fn new(arch: Arch, page_shift: u32, ram: u64, arena_tables: usize, in_ram: Option<u64>) -> PageTables {
        let (levels, entry_bytes) = Self::geometry(arch);
        let bits = page_shift - entry_bytes.trailing_zeros();
        let entries = 1usize << bits;
        let stored = if in_ram.is_some() { 0 } else { arena_tables };
        let arena = (0..stored)
            .map(|_| (0..entries).map(|_| AtomicU64::new(0)).collect::<Box<[AtomicU64]>>())
            .collect::<Box<[_]>>();
        let start = in_ram.unwrap_or(ram);
        PageTables {
            levels,
            entry_bytes,
            bits,
            page_shift,
            root: start, // arena table 0
            arena_base: if in_ram.is_some() { u64::MAX } else { ram },
            arena,
            arena_start: start,
            arena_len: arena_tables,
            lock: Mutex::new(()),
            nr_runtime_tables: AtomicU64::new(0),
        }
    }

    /// Entries per table.
    pub fn entries(&self) -> u64 {
        1 << self.bits
    }

    /// Bytes one entry maps at `level`.
    #[inline]
    pub fn level_size(&self, level: u32) -> u64 {
        1u64 << self.level_shift(level)
    }

    #[inline]
    fn level_shift(&self, level: u32) -> u32 {
        self.page_shift + level * self.bits
    }

    #[inline]
    fn index(&self, va: u64, level: u32) -> u64 {
        let sh = self.level_shift(level);
        if sh >= 64 {
            0
        } else {
            (va >> sh) & ((1 << self.bits) - 1)
        }
    }

    /// The physical address of boot-arena table `i`.
    pub fn arena_table(&self, i: usize) -> u64 {
        assert!(i < self.arena_len, "boot arena has {} tables", self.arena_len);
        self.arena_start + ((i as u64) << self.page_shift)
    }

    /// The boot tables' physical range when they live in RAM.
    pub fn arena_in_ram(&self) -> Option<(u64, u64)> {
        (self.arena_base == u64::MAX).then(|| (self.arena_start, self.arena_start + ((self.arena_len as u64) << self.page_shift)))
    }

    fn addr_mask(&self) -> u64 {
        let top = if self.entry_bytes == 4 { 32 } else { 52 };
        ((1u64 << top) - 1) & !((1u64 << self.page_shift) - 1) & !0xfff
    }

    #[inline]
    fn read_entry(&self, pm: &PhysMem, table: u64, idx: u64) -> u64 {
        if table >= self.arena_base {
            // A corrupted entry (simulated memory is writable) may point
            // anywhere: outside the arena it reads as not present.
            let t = ((table - self.arena_base) >> self.page_shift) as usize;
            return self.arena.get(t).map_or(0, |tb| tb[idx as usize].load(Relaxed));
        }
        let at = table + idx * self.entry_bytes as u64;
        if self.entry_bytes == 8 {
            pm.read_u64(at).unwrap_or(0)
        } else {
            let mut b = [0u8; 4];
            let _ = pm.read(at, &mut b);
            u32::from_ne_bytes(b) as u64
        }
    }

    fn write_entry(&self, pm: &PhysMem, table: u64, idx: u64, v: u64) -> Result<()> {
        if table >= self.arena_base {
            let t = ((table - self.arena_base) >> self.page_shift) as usize;
            let tb = self.arena.get(t).ok_or_else(|| {
                KmmError::Bug(format!("kernel BUG: page table at {table:#x} is neither RAM nor a boot table (corrupted entry)"))
            })?;
            tb[idx as usize].store(v, Relaxed);
            return Ok(());
        }
        let at = table + idx * self.entry_bytes as u64;
        if self.entry_bytes == 8 {
            pm.write_u64(at, v)
        } else {
            pm.write(at, &(v as u32).to_ne_bytes())
        }
    }

    /// Walk to `va`: the software walk of `vmalloc_to_page`, and what the
    /// MMU does on a TLB miss.
    #[inline]
    pub fn walk(&self, pm: &PhysMem, va: u64) -> std::result::Result<Translation, WalkErr> {
        let mut table = self.root;
        for (k, level) in (0..self.levels).rev().enumerate() {
            let reads = k as u32 + 1;
            let e = self.read_entry(pm, table, self.index(va, level));
            if e & _PAGE_PRESENT == 0 {
                return Err(WalkErr::NotPresent { level });
            }
            let addr = e & self.addr_mask();
            if level == 0 || e & _PAGE_PSE != 0 {
                let size = self.level_size(level);
                return Ok(Translation { phys: (addr & !(size - 1)) + (va & (size - 1)), page_size: size, level, reads });
            }
            table = addr;
        }
        unreachable!("level 0 is a leaf")
    }

    /// The entry that maps `va` at `level`, walking (and, with `alloc`,
    /// creating) the tables above it. Returns (table, index).
    fn table_for(
        &self,
        pm: &PhysMem,
        va: u64,
        level: u32,
        alloc: &mut dyn FnMut() -> Result<u64>,
    ) -> Result<(u64, u64)> {
        let mut table = self.root;
        for l in (level + 1..self.levels).rev() {
            let idx = self.index(va, l);
            let e = self.read_entry(pm, table, idx);
            if e & _PAGE_PRESENT == 0 {
                let t = alloc()?;
                self.write_entry(pm, table, idx, t | KERNPG_TABLE)?;
                table = t;
            } else if e & _PAGE_PSE != 0 {
                return Err(KmmError::Bug(format!(
                    "kernel BUG: mapping {va:#x} at level {level} under a large page at level {l}"
                )));
            } else {
                table = e & self.addr_mask();
            }
        }
        Ok((table, self.index(va, level)))
    }

    /// How many tables mapping base pages at `[va, va + n pages)` would
    /// allocate now (a racy read: tables are only ever added, so the count
    /// can only fall before the caller maps).
    pub fn missing_tables(&self, pm: &PhysMem, va: u64, n: u64) -> usize {
        let mut need = std::collections::HashSet::new();
        for i in 0..n {
            let a = va + (i << self.page_shift);
            let mut table = self.root;
            for level in (1..self.levels).rev() {
                let e = self.read_entry(pm, table, self.index(a, level));
                if e & _PAGE_PRESENT == 0 {
                    // A table for each level below this one, keyed by what it covers.
                    for l in 0..level {
                        need.insert((l, a >> self.level_shift(l + 1).min(63)));
                    }
                    break;
                }
                if e & _PAGE_PSE != 0 {
                    break;
                }
                table = e & self.addr_mask();
            }
        }
        need.len()
    }

    /// Set (or, with `phys` None, clear) the base-page PTE of `va` in a
    /// table that exists since boot (the pkmap window, the fixmap): no
    /// allocation and no page-table lock, like the kernel's `set_pte_at` on
    /// `pkmap_page_table` / `kmap_pte`. The caller owns the slot.
    pub fn set_boot_pte(&self, pm: &PhysMem, va: u64, phys: Option<u64>) -> Result<()> {
        let (t, i) = self.table_for(pm, va, 0, &mut || {
            Err(KmmError::Bug(format!("kernel BUG: no boot page table maps {va:#x}")))
        })?;
        self.write_entry(pm, t, i, phys.map_or(0, |p| p | PAGE_KERNEL))
    }

    /// Install a leaf for `va` -> `phys` at `level` (0 = a base page; 1 or 2
    /// = a large page, which must be aligned). Intermediate tables come
    /// from `alloc` (which returns a zeroed table's physical address).
    pub fn map(&self, pm: &PhysMem, va: u64, phys: u64, level: u32, alloc: &mut dyn FnMut() -> Result<u64>) -> Result<()> {
        let size = self.level_size(level);
        debug_assert!(va % size == 0 && phys % size == 0);
        let (t, i) = self.table_for(pm, va, level, alloc)?;
        let flags = if level == 0 { PAGE_KERNEL } else { PAGE_KERNEL | _PAGE_PSE };
        self.write_entry(pm, t, i, phys | flags)
    }

    /// Link an existing table (e.g. a boot arena table) at `level` for `va`.
    pub fn link_table(&self, pm: &PhysMem, va: u64, level: u32, table: u64, alloc: &mut dyn FnMut() -> Result<u64>) -> Result<()> {
        let (t, i) = self.table_for(pm, va, level + 1, alloc)?;
        self.write_entry(pm, t, i, table | KERNPG_TABLE)
    }

    /// Clear the base-page leaf mapping `va` (no TLB flush: the caller
    /// flushes, as `vunmap_range_noflush` leaves it to its caller).
    /// Returns the physical page it mapped, if any.
    pub fn unmap(&self, pm: &PhysMem, va: u64) -> Option<u64> {
        let mut table = self.root;
        for level in (0..self.levels).rev() {
            let idx = self.index(va, level);
            let e = self.read_entry(pm, table, idx);
            if e & _PAGE_PRESENT == 0 {
                return None;
            }
            if level == 0 {
                let _ = self.write_entry(pm, table, idx, 0);
                return Some(e & self.addr_mask());
            }
            if e & _PAGE_PSE != 0 {
                return None; // large pages are the direct map's; never unmapped
            }
            table = e & self.addr_mask();
        }
        None
    }

    /// Clear the entries that link those of `candidates` which cover part
    /// of `[start, end)` and map nothing, lowest level first (so a table
    /// above one freed may empty too). Returns the tables unlinked. The
    /// caller holds `lock`.
    pub fn unlink_empty(&self, pm: &PhysMem, start: u64, end: u64, candidates: &[u64]) -> Vec<u64> {
        let mut freed = Vec::new();
        for level in 0..self.levels.saturating_sub(1) {
            let step = self.level_size(level + 1);
            let mut va = start & !(step - 1);
            while va < end {
                let at = self.table_for(pm, va, level + 1, &mut || Err(KmmError::Bug(String::new())));
                if let Ok((parent, idx)) = at {
                    let e = self.read_entry(pm, parent, idx);
                    let t = e & self.addr_mask();
                    if e & _PAGE_PRESENT != 0
                        && e & _PAGE_PSE == 0
                        && candidates.contains(&t)
                        && (0..self.entries()).all(|i| self.read_entry(pm, t, i) & _PAGE_PRESENT == 0)
                        && self.write_entry(pm, parent, idx, 0).is_ok()
                    {
                        freed.push(t);
                    }
                }
                match va.checked_add(step) {
                    Some(v) => va = v,
                    None => break,
                }
            }
        }
        freed
    }

    /// Check pgtable-1 over the tables reachable from the root (stops at
    /// `limit` tables, so that a check of a big direct map stays cheap).
    pub fn check(&self, pm: &PhysMem, ram: u64, is_table: &dyn Fn(u64) -> bool, limit: usize) -> Vec<String> {
        let mut errs = Vec::new();
        let mut stack = vec![(self.root, self.levels - 1)];
        let mut seen = 0;
        while let Some((t, level)) = stack.pop() {
            seen += 1;
            if seen > limit {
                break;
            }
            for i in 0..self.entries() {
                let e = self.read_entry(pm, t, i);
                if e & _PAGE_PRESENT == 0 {
                    continue;
                }
                let a = e & self.addr_mask();
                if level == 0 || e & _PAGE_PSE != 0 {
                    if a >= ram {
                        errs.push(format!("pgtable-1: a leaf at level {level} maps {a:#x}, beyond RAM"));
                    }
                } else if a < self.arena_base && !is_table(a) {
                    errs.push(format!("pgtable-1: entry {i} of table {t:#x} points to {a:#x}, not a table page"));
                } else {
                    stack.push((a, level - 1));
                }
            }
        }
        errs
    }
}
