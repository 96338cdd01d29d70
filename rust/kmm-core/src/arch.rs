//! Architectures: address-space layout, zone boundaries and page geometry.
//!
//! # Kernel
//! `arch/x86/include/asm/page_64_types.h` (`__PAGE_OFFSET` 0xffff888000000000),
//! `arch/x86/include/asm/page_32_types.h` (PAGE_OFFSET 0xc0000000),
//! `arch/x86/include/asm/dma.h` (`MAX_DMA_PFN` 16 MiB, `MAX_DMA32_PFN` 4 GiB),
//! `arch/x86/mm/init.c` (`zone_sizes_init`), `include/linux/pageblock-flags.h`
//! (`pageblock_order` = min(HUGETLB_PAGE_ORDER, MAX_PAGE_ORDER)),
//! `arch/x86/include/asm/pgtable_64_types.h` (VMALLOC_START, 32 TiB).
//!
//! SIMPLIFICATION: RAM is one contiguous range with no PCI hole below 4 GiB;
//! only the first page frame is reserved (as x86's e820 reserves it, which is
//! why the real DMA zone starts at pfn 1). i386 lowmem ends at exactly
//! 896 MiB (the kernel's `MAXMEM` is a little lower, depending on VMALLOC_RESERVE).
#![forbid(unsafe_code)]

use crate::error::{invalid, Result};

/// `MAX_PAGE_ORDER`: largest buddy order (inclusive), 6.8+ naming.
pub const MAX_PAGE_ORDER: u32 = 10;
/// `NR_PAGE_ORDERS`: number of free-area lists.
pub const NR_PAGE_ORDERS: usize = MAX_PAGE_ORDER as usize + 1;
/// `PAGE_ALLOC_COSTLY_ORDER`.
pub const PAGE_ALLOC_COSTLY_ORDER: u32 = 3;

/// A simulated architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    I386,
    I386Pae,
}

/// Kinds of zone the kernel knows (`enum zone_type`), in index order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ZoneKind {
    Dma,
    Dma32,
    Normal,
    HighMem,
    Movable,
    Device,
}

impl ZoneKind {
    /// The name /proc prints ("DMA", "DMA32", "Normal", "HighMem", "Movable", "Device").
    pub fn name(self) -> &'static str {
        match self {
            ZoneKind::Dma => "DMA",
            ZoneKind::Dma32 => "DMA32",
            ZoneKind::Normal => "Normal",
            ZoneKind::HighMem => "HighMem",
            ZoneKind::Movable => "Movable",
            ZoneKind::Device => "Device",
        }
    }
}

impl Arch {
    pub fn parse(s: &str) -> Result<Arch> {
        match s {
            "x86_64" | "x86-64" | "amd64" => Ok(Arch::X86_64),
            "i386" | "x86" | "i686" => Ok(Arch::I386),
            "i386-pae" | "i386_pae" | "x86-pae" => Ok(Arch::I386Pae),
            _ => invalid(format!(
                "unknown arch '{s}' (expected \"x86_64\", \"i386\" or \"i386-pae\")"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::I386 => "i386",
            Arch::I386Pae => "i386-pae",
        }
    }

    pub fn is_64bit(self) -> bool {
        self == Arch::X86_64
    }

    /// Bytes in a pointer (how wide `%p` prints).
    pub fn pointer_bytes(self) -> u32 {
        if self.is_64bit() {
            8
        } else {
            4
        }
    }

    /// The zones this configuration compiles in, in index order
    /// (x86_64: CONFIG_ZONE_DMA, DMA32, ZONE_DEVICE; i386: DMA, HIGHMEM).
    pub fn zone_kinds(self) -> &'static [ZoneKind] {
        match self {
            Arch::X86_64 => &[
                ZoneKind::Dma,
                ZoneKind::Dma32,
                ZoneKind::Normal,
                ZoneKind::Movable,
                ZoneKind::Device,
            ],
            Arch::I386 | Arch::I386Pae => &[
                ZoneKind::Dma,
                ZoneKind::Normal,
                ZoneKind::HighMem,
                ZoneKind::Movable,
            ],
        }
    }

    /// `PAGE_OFFSET`: simulated virtual address of physical 0 in the direct map.
    pub fn page_offset(self) -> u64 {
        match self {
            Arch::X86_64 => 0xffff_8880_0000_0000,
            Arch::I386 | Arch::I386Pae => 0xc000_0000,
        }
    }

    /// Size of the direct map's virtual window.
    pub fn direct_map_span(self) -> u64 {
        match self {
            Arch::X86_64 => 64 << 40,
            Arch::I386 | Arch::I386Pae => LOWMEM_LIMIT_I386,
        }
    }

    /// Largest physical memory the architecture addresses.
    pub fn max_phys(self) -> u64 {
        match self {
            // Model limit (the kernel's is 64 TiB): page-frame numbers are
            // u32 with u32::MAX the list terminator (`page::NIL`), so with
            // 4 KiB pages the last frame of a 16 TiB machine is reserved
            // (machine.rs `default_spans`). The mem_map is a sparse host
            // mapping (64 GiB reserved, backed only where touched).
            Arch::X86_64 => 16 << 40,
            Arch::I386 => 4 << 30,
            Arch::I386Pae => 64 << 30,
        }
    }

    /// `pageblock_order` for a page size: min(PMD order, MAX_PAGE_ORDER).
    pub fn pageblock_order(self, page_shift: u32) -> u32 {
        let pte_bytes_shift = match self {
            Arch::I386 => 2, // 4-byte PTEs: a PMD maps 1024 pages (4 MiB at 4 KiB)
            _ => 3,          // 8-byte PTEs: 512 pages (2 MiB)
        };
        (page_shift - pte_bytes_shift).min(MAX_PAGE_ORDER)
    }

    /// Physical limit of each zone kind (end, exclusive, in bytes).
    pub fn zone_limit(self, kind: ZoneKind) -> u64 {
        match (self, kind) {
            (_, ZoneKind::Dma) => 16 << 20,
            (Arch::X86_64, ZoneKind::Dma32) => 4 << 30,
            (Arch::X86_64, ZoneKind::Normal) => u64::MAX,
            (_, ZoneKind::Normal) => LOWMEM_LIMIT_I386,
            (_, ZoneKind::HighMem) => u64::MAX,
            _ => 0,
        }
    }

    /// x86_64's `VMALLOC_START` / `VMALLOC_END` (4-level paging, no KASLR):
    /// 0xffffc90000000000 and 32 TiB later, END being itself excluded
    /// (`is_vmalloc_addr` tests `< VMALLOC_END`). i386's range depends on the
    /// pkmap and fixmap layout: see `vm::highmem::Layout::vmalloc_range`.
    pub fn vmalloc_range_64(self) -> (u64, u64) {
        (0xffff_c900_0000_0000, 0xffff_c900_0000_0000 + (32u64 << 40) - 1)
    }
}

/// End of i386 low memory (the direct map covers physical [0, 896 MiB)).
pub const LOWMEM_LIMIT_I386: u64 = 896 << 20;

/// Parse a size: an integer number of bytes or a string with a K/M/G/T suffix
/// ("512M", "64G", "4096", "1.5G").
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some(c @ ('k' | 'K' | 'm' | 'M' | 'g' | 'G' | 't' | 'T')) => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => 1 << 40,
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    let num = num.trim().trim_end_matches(['i', 'B', 'b']);
    if let Ok(v) = num.parse::<u64>() {
        return v.checked_mul(mult).map_or_else(|| invalid(format!("size '{s}' overflows")), Ok);
    }
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok((v * mult as f64) as u64),
        _ => invalid(format!("cannot parse size '{s}' (expected e.g. 4096, \"512M\", \"64G\")")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("64G").unwrap(), 64 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn pageblock_orders() {
        // x86_64 and PAE: 2 MiB pageblocks (order 9); i386 non-PAE: 4 MiB (order 10).
        assert_eq!(Arch::X86_64.pageblock_order(12), 9);
        assert_eq!(Arch::I386Pae.pageblock_order(12), 9);
        assert_eq!(Arch::I386.pageblock_order(12), 10);
        assert_eq!(Arch::X86_64.pageblock_order(16), 10);
    }
}
