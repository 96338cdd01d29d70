//! GFP ("get free pages") flags: the bits, the composites, `gfp_zone()`, and
//! the kernel-identical text form used by tracepoints.
//!
//! # Kernel
//! `include/linux/gfp_types.h` (bit values, composites), `include/linux/gfp.h`
//! (`gfp_zone`, `GFP_ZONE_TABLE`, `GFP_ZONE_BAD`, `gfp_migratetype`),
//! `include/trace/events/mmflags.h` (`__def_gfpflag_names`, `show_gfp_flags`),
//! `kernel/trace/trace_output.c` (`trace_print_flags_seq`: greedy match in
//! table order, leftovers printed as hex).
//!
//! Values are those of Linux 6.18 on x86 with CONFIG_KASAN_HW_TAGS and
//! CONFIG_LOCKDEP off: the config-dependent bits (`__GFP_SKIP_ZERO`,
//! `__GFP_SKIP_KASAN`, `__GFP_NOLOCKDEP`, `__GFP_NO_OBJ_EXT`) are 0, exactly as
//! the kernel defines them when their option is off. `GFP_NOWAIT` includes
//! `__GFP_NOWARN` as in 6.18 (the sample trace shows slab refills, which always
//! add `__GFP_NOWARN`, printed as plain `GFP_NOWAIT|...`).
//!
//! # Invariants
//! - gfp-1: `parse(format(m)) == m` for every mask `m` (format is lossless:
//!   leftover bits are printed as hex).
//! - gfp-2: the name table is the kernel's, in the kernel's order.
#![forbid(unsafe_code)]

use crate::error::{KmmError, Result};

/// A gfp mask (`gfp_t`).
pub type Gfp = u32;

// --- raw bits (gfp_types.h, enum ___GFP_*_BIT order) -------------------------
pub const __GFP_DMA: Gfp = 0x1;
pub const __GFP_HIGHMEM: Gfp = 0x2;
pub const __GFP_DMA32: Gfp = 0x4;
pub const __GFP_MOVABLE: Gfp = 0x8;
pub const __GFP_RECLAIMABLE: Gfp = 0x10;
pub const __GFP_HIGH: Gfp = 0x20;
pub const __GFP_IO: Gfp = 0x40;
pub const __GFP_FS: Gfp = 0x80;
pub const __GFP_ZERO: Gfp = 0x100;
/// 0x200 has been unused since 6.3 (it was `__GFP_ATOMIC`).
pub const __GFP_UNUSED: Gfp = 0x200;
pub const __GFP_DIRECT_RECLAIM: Gfp = 0x400;
pub const __GFP_KSWAPD_RECLAIM: Gfp = 0x800;
pub const __GFP_WRITE: Gfp = 0x1000;
pub const __GFP_NOWARN: Gfp = 0x2000;
pub const __GFP_RETRY_MAYFAIL: Gfp = 0x4000;
pub const __GFP_NOFAIL: Gfp = 0x8000;
pub const __GFP_NORETRY: Gfp = 0x10000;
pub const __GFP_MEMALLOC: Gfp = 0x20000;
pub const __GFP_COMP: Gfp = 0x40000;
pub const __GFP_NOMEMALLOC: Gfp = 0x80000;
pub const __GFP_HARDWALL: Gfp = 0x100000;
pub const __GFP_THISNODE: Gfp = 0x200000;
pub const __GFP_ACCOUNT: Gfp = 0x400000;
pub const __GFP_ZEROTAGS: Gfp = 0x800000;
/// Config-dependent bits: 0 when their option is off (KASAN_HW_TAGS, LOCKDEP,
/// SLAB_OBJ_EXT), as in the kernel.
pub const __GFP_SKIP_ZERO: Gfp = 0;
pub const __GFP_SKIP_KASAN: Gfp = 0;
pub const __GFP_NOLOCKDEP: Gfp = 0;
pub const __GFP_NO_OBJ_EXT: Gfp = 0;
/// `__GFP_BITS_SHIFT` for this configuration (`___GFP_LAST_BIT`).
pub const __GFP_BITS_SHIFT: u32 = 24;
pub const __GFP_BITS_MASK: Gfp = (1 << __GFP_BITS_SHIFT) - 1;

// --- groupings ---------------------------------------------------------------
pub const __GFP_RECLAIM: Gfp = __GFP_DIRECT_RECLAIM | __GFP_KSWAPD_RECLAIM;
pub const GFP_ZONEMASK: Gfp = __GFP_DMA | __GFP_HIGHMEM | __GFP_DMA32 | __GFP_MOVABLE;
pub const GFP_MOVABLE_MASK: Gfp = __GFP_RECLAIMABLE | __GFP_MOVABLE;
pub const GFP_MOVABLE_SHIFT: u32 = 3;

// --- composites (gfp_types.h "Useful GFP flag combinations") ------------------
/// Cannot sleep, high priority, may use the atomic reserves.
pub const GFP_ATOMIC: Gfp = __GFP_HIGH | __GFP_KSWAPD_RECLAIM;
/// Typical kernel allocation: may sleep, reclaim, start I/O and call into filesystems.
pub const GFP_KERNEL: Gfp = __GFP_RECLAIM | __GFP_IO | __GFP_FS;
/// GFP_KERNEL charged to the memory cgroup.
pub const GFP_KERNEL_ACCOUNT: Gfp = GFP_KERNEL | __GFP_ACCOUNT;
/// Cannot sleep, no reserves; fails quietly (6.18 adds `__GFP_NOWARN`).
pub const GFP_NOWAIT: Gfp = __GFP_KSWAPD_RECLAIM | __GFP_NOWARN;
/// May reclaim but must not start physical I/O.
pub const GFP_NOIO: Gfp = __GFP_RECLAIM;
/// May reclaim and do I/O, must not call into filesystems.
pub const GFP_NOFS: Gfp = __GFP_RECLAIM | __GFP_IO;
/// Memory for user space that the kernel also accesses directly.
pub const GFP_USER: Gfp = __GFP_RECLAIM | __GFP_IO | __GFP_FS | __GFP_HARDWALL;
pub const GFP_DMA: Gfp = __GFP_DMA;
pub const GFP_DMA32: Gfp = __GFP_DMA32;
/// User pages the kernel need not map permanently (may come from HighMem).
pub const GFP_HIGHUSER: Gfp = GFP_USER | __GFP_HIGHMEM;
/// User pages that may also be migrated.
pub const GFP_HIGHUSER_MOVABLE: Gfp = GFP_HIGHUSER | __GFP_MOVABLE | __GFP_SKIP_KASAN;
/// THP allocation that does no reclaim at all.
pub const GFP_TRANSHUGE_LIGHT: Gfp =
    (GFP_HIGHUSER_MOVABLE | __GFP_COMP | __GFP_NOMEMALLOC | __GFP_NOWARN) & !__GFP_RECLAIM;
/// THP allocation as khugepaged does it.
pub const GFP_TRANSHUGE: Gfp = GFP_TRANSHUGE_LIGHT | __GFP_DIRECT_RECLAIM;
/// Reclaim-context mask used by the slab and vmalloc to pass constraints down.
pub const GFP_RECLAIM_MASK: Gfp = __GFP_RECLAIM
    | __GFP_HIGH
    | __GFP_IO
    | __GFP_FS
    | __GFP_NOWARN
    | __GFP_RETRY_MAYFAIL
    | __GFP_NOFAIL
    | __GFP_NORETRY
    | __GFP_MEMALLOC
    | __GFP_NOMEMALLOC
    | __GFP_NOLOCKDEP;
/// Bits the slab allocator refuses (`GFP_SLAB_BUG_MASK`, mm/slab.h).
pub const GFP_SLAB_BUG_MASK: Gfp = __GFP_DMA32 | __GFP_HIGHMEM | !__GFP_BITS_MASK;

/// Every name the kernel knows, with its value: composites, groupings and bits.
/// This is the vocabulary `parse` accepts (the print table is a subset).
pub const ALL_NAMES: &[(&str, Gfp)] = &[
    ("GFP_TRANSHUGE", GFP_TRANSHUGE),
    ("GFP_TRANSHUGE_LIGHT", GFP_TRANSHUGE_LIGHT),
    ("GFP_HIGHUSER_MOVABLE", GFP_HIGHUSER_MOVABLE),
    ("GFP_HIGHUSER", GFP_HIGHUSER),
    ("GFP_USER", GFP_USER),
    ("GFP_KERNEL_ACCOUNT", GFP_KERNEL_ACCOUNT),
    ("GFP_KERNEL", GFP_KERNEL),
    ("GFP_NOFS", GFP_NOFS),
    ("GFP_ATOMIC", GFP_ATOMIC),
    ("GFP_NOIO", GFP_NOIO),
    ("GFP_NOWAIT", GFP_NOWAIT),
    ("GFP_DMA", GFP_DMA),
    ("GFP_DMA32", GFP_DMA32),
    ("__GFP_RECLAIM", __GFP_RECLAIM),
    ("__GFP_DMA", __GFP_DMA),
    ("__GFP_HIGHMEM", __GFP_HIGHMEM),
    ("__GFP_DMA32", __GFP_DMA32),
    ("__GFP_MOVABLE", __GFP_MOVABLE),
    ("__GFP_RECLAIMABLE", __GFP_RECLAIMABLE),
    ("__GFP_HIGH", __GFP_HIGH),
    ("__GFP_IO", __GFP_IO),
    ("__GFP_FS", __GFP_FS),
    ("__GFP_ZERO", __GFP_ZERO),
    ("__GFP_DIRECT_RECLAIM", __GFP_DIRECT_RECLAIM),
    ("__GFP_KSWAPD_RECLAIM", __GFP_KSWAPD_RECLAIM),
    ("__GFP_WRITE", __GFP_WRITE),
    ("__GFP_NOWARN", __GFP_NOWARN),
    ("__GFP_RETRY_MAYFAIL", __GFP_RETRY_MAYFAIL),
    ("__GFP_NOFAIL", __GFP_NOFAIL),
    ("__GFP_NORETRY", __GFP_NORETRY),
    ("__GFP_MEMALLOC", __GFP_MEMALLOC),
    ("__GFP_COMP", __GFP_COMP),
    ("__GFP_NOMEMALLOC", __GFP_NOMEMALLOC),
    ("__GFP_HARDWALL", __GFP_HARDWALL),
    ("__GFP_THISNODE", __GFP_THISNODE),
    ("__GFP_ACCOUNT", __GFP_ACCOUNT),
    ("__GFP_ZEROTAGS", __GFP_ZEROTAGS),
    ("__GFP_SKIP_ZERO", __GFP_SKIP_ZERO),
    ("__GFP_SKIP_KASAN", __GFP_SKIP_KASAN),
    ("__GFP_NOLOCKDEP", __GFP_NOLOCKDEP),
    ("__GFP_NO_OBJ_EXT", __GFP_NO_OBJ_EXT),
    ("GFP_ZONEMASK", GFP_ZONEMASK),
    ("GFP_MOVABLE_MASK", GFP_MOVABLE_MASK),
    ("GFP_RECLAIM_MASK", GFP_RECLAIM_MASK),
];

/// `__def_gfpflag_names` (mmflags.h, 6.15+ order): the composites, then one
/// entry per bit in bit order. Entries whose value is 0 in this config are
/// absent, as in the kernel.
pub const PRINT_TABLE: &[(&str, Gfp)] = &[
    ("GFP_TRANSHUGE", GFP_TRANSHUGE),
    ("GFP_TRANSHUGE_LIGHT", GFP_TRANSHUGE_LIGHT),
    ("GFP_HIGHUSER_MOVABLE", GFP_HIGHUSER_MOVABLE),
    ("GFP_HIGHUSER", GFP_HIGHUSER),
    ("GFP_USER", GFP_USER),
    ("GFP_KERNEL_ACCOUNT", GFP_KERNEL_ACCOUNT),
    ("GFP_KERNEL", GFP_KERNEL),
    ("GFP_NOFS", GFP_NOFS),
    ("GFP_ATOMIC", GFP_ATOMIC),
    ("GFP_NOIO", GFP_NOIO),
    ("GFP_NOWAIT", GFP_NOWAIT),
    ("GFP_DMA", GFP_DMA),
    ("GFP_DMA32", GFP_DMA32),
    ("__GFP_RECLAIM", __GFP_RECLAIM),
    ("__GFP_DMA", __GFP_DMA),
    ("__GFP_HIGHMEM", __GFP_HIGHMEM),
    ("__GFP_DMA32", __GFP_DMA32),
    ("__GFP_MOVABLE", __GFP_MOVABLE),
    ("__GFP_RECLAIMABLE", __GFP_RECLAIMABLE),
    ("__GFP_HIGH", __GFP_HIGH),
    ("__GFP_IO", __GFP_IO),
    ("__GFP_FS", __GFP_FS),
    ("__GFP_ZERO", __GFP_ZERO),
    ("__GFP_DIRECT_RECLAIM", __GFP_DIRECT_RECLAIM),
    ("__GFP_KSWAPD_RECLAIM", __GFP_KSWAPD_RECLAIM),
    ("__GFP_WRITE", __GFP_WRITE),
    ("__GFP_NOWARN", __GFP_NOWARN),
    ("__GFP_RETRY_MAYFAIL", __GFP_RETRY_MAYFAIL),
    ("__GFP_NOFAIL", __GFP_NOFAIL),
    ("__GFP_NORETRY", __GFP_NORETRY),
    ("__GFP_MEMALLOC", __GFP_MEMALLOC),
    ("__GFP_COMP", __GFP_COMP),
    ("__GFP_NOMEMALLOC", __GFP_NOMEMALLOC),
    ("__GFP_HARDWALL", __GFP_HARDWALL),
    ("__GFP_THISNODE", __GFP_THISNODE),
    ("__GFP_ACCOUNT", __GFP_ACCOUNT),
    ("__GFP_ZEROTAGS", __GFP_ZEROTAGS),
];

/// `show_gfp_flags(mask)`: what `gfp_flags=%s` prints in a tracepoint.
/// Greedy in table order; bits no entry covers are appended as `0x%x`.
pub fn format(mask: Gfp) -> String {
    if mask == 0 {
        return "none".to_string();
    }
    let mut out = String::with_capacity(48);
    format_into(mask, &mut out);
    out
}

/// `%pGg` (lib/vsprintf.c): like `format` but a zero mask prints as "".
pub fn format_pgg(mask: Gfp) -> String {
    let mut out = String::new();
    if mask != 0 {
        format_into(mask, &mut out);
    }
    out
}

fn format_into(mask: Gfp, out: &mut String) {
    let mut rest = mask;
    for &(name, bits) in PRINT_TABLE {
        if bits != 0 && rest & bits == bits {
            if !out.is_empty() {
                out.push('|');
            }
            out.push_str(name);
            rest &= !bits;
            if rest == 0 {
                return;
            }
        }
    }
    if rest != 0 {
        if !out.is_empty() {
            out.push('|');
        }
        out.push_str(&format!("{rest:#x}"));
    }
}

/// The inverse of `format`: `|`-separated names (any name in `ALL_NAMES`),
/// hex or decimal numbers, or `none`. Whitespace around names is ignored.
pub fn parse(text: &str) -> Result<Gfp> {
    let t = text.trim();
    if t == "none" || t == "0" {
        return Ok(0);
    }
    if t.is_empty() {
        return Err(KmmError::BadGfp("empty gfp string".into()));
    }
    let mut mask: Gfp = 0;
    for part in t.split('|') {
        let p = part.trim();
        let v = if let Some(hex) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
            Gfp::from_str_radix(hex, 16).map_err(|_| bad_name(p))?
        } else if p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty() {
            p.parse::<Gfp>().map_err(|_| bad_name(p))?
        } else {
            lookup(p).ok_or_else(|| bad_name(p))?
        };
        mask |= v;
    }
    Ok(mask)
}

fn bad_name(p: &str) -> KmmError {
    KmmError::BadGfp(format!("unknown gfp flag '{p}'"))
}

/// Value of one kernel gfp name (`GFP_KERNEL`, `__GFP_ZERO`, ...).
pub fn lookup(name: &str) -> Option<Gfp> {
    ALL_NAMES.iter().find(|(n, _)| *n == name).map(|&(_, v)| v)
}

/// `gfpflags_allow_blocking()`: may this allocation sleep?
#[inline]
pub fn allow_blocking(gfp: Gfp) -> bool {
    gfp & __GFP_DIRECT_RECLAIM != 0
}

/// `gfp_migratetype()`: 0 UNMOVABLE, 1 MOVABLE, 2 RECLAIMABLE.
/// Both mobility bits together is a bug the kernel BUILD_BUG/VM_WARNs on;
/// callers reject it through `gfp_zone`/`check_mobility` first.
#[inline]
pub fn migratetype(gfp: Gfp) -> u8 {
    ((gfp & GFP_MOVABLE_MASK) >> GFP_MOVABLE_SHIFT) as u8
}

/// The zone a gfp mask asks for at most (`gfp_zone()`), as a kernel zone kind.
/// `GFP_ZONE_BAD` combinations (two zone modifiers together) are an error here
/// (the kernel only catches them with CONFIG_DEBUG_VM).
pub fn gfp_zone_kind(gfp: Gfp, has_highmem: bool, has_dma32: bool) -> Result<ZoneKindReq> {
    let bits = gfp & GFP_ZONEMASK;
    use ZoneKindReq::*;
    let z = match bits {
        0x0 => Normal,
        0x1 | 0x9 => Dma,
        0x2 => {
            if has_highmem {
                HighMem
            } else {
                Normal
            }
        }
        0x4 | 0xc => {
            if has_dma32 {
                Dma32
            } else {
                Normal
            }
        }
        0x8 => Normal,
        0xa => Movable,
        _ => {
            return Err(KmmError::BadGfp(format!(
                "invalid zone combination in gfp mask {:#x}({}): GFP_ZONE_BAD",
                gfp,
                format_pgg(gfp)
            )))
        }
    };
    Ok(z)
}

/// The zone kind `gfp_zone()` selects; resolved to an index by the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZoneKindReq {
    Dma,
    Dma32,
    Normal,
    HighMem,
    Movable,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_values_are_the_kernels() {
        // gfp_types.h (6.18): hex values quoted in KERNEL_FACTS 1.2.
        assert_eq!(GFP_KERNEL, 0xcc0);
        assert_eq!(GFP_ATOMIC, 0x820);
        assert_eq!(GFP_KERNEL_ACCOUNT, 0x400cc0);
        assert_eq!(GFP_NOIO, 0xc00);
        assert_eq!(GFP_NOFS, 0xc40);
        assert_eq!(GFP_USER, 0x100cc0);
        assert_eq!(GFP_HIGHUSER, 0x100cc2);
        assert_eq!(GFP_HIGHUSER_MOVABLE, 0x100cca);
        assert_eq!(GFP_TRANSHUGE_LIGHT, 0x1c20ca);
        assert_eq!(GFP_TRANSHUGE, 0x1c24ca);
        assert_eq!(GFP_NOWAIT, 0x2800);
    }

    #[test]
    fn worked_examples() {
        assert_eq!(format(0), "none");
        assert_eq!(format(0xcc0), "GFP_KERNEL");
        assert_eq!(format(0xdc0), "GFP_KERNEL|__GFP_ZERO");
        assert_eq!(format(0x2dc0), "GFP_KERNEL|__GFP_ZERO|__GFP_NOWARN");
        assert_eq!(format(0x40cc0), "GFP_KERNEL|__GFP_COMP");
        assert_eq!(format(0xc00), "GFP_NOIO");
        assert_eq!(format(0xc20), "GFP_ATOMIC|__GFP_DIRECT_RECLAIM");
        assert_eq!(format(0xcc1), "GFP_KERNEL|GFP_DMA");
        assert_eq!(format(0x140dca), "GFP_HIGHUSER_MOVABLE|__GFP_ZERO|__GFP_COMP");
        assert_eq!(format(0x1c20ca), "GFP_TRANSHUGE_LIGHT");
        assert_eq!(format(0x200), "0x200");
        assert_eq!(format(0xcc0 | 0x200), "GFP_KERNEL|0x200");
        assert_eq!(format_pgg(0), "");
    }

    #[test]
    fn issue_example_round_trips() {
        let s = "GFP_NOFS|__GFP_HIGHMEM|__GFP_MOVABLE|__GFP_NOWARN|__GFP_NORETRY|__GFP_COMP|__GFP_HARDWALL";
        let m = parse(s).unwrap();
        assert_eq!(m, 0xc40 | 0x2 | 0x8 | 0x2000 | 0x10000 | 0x40000 | 0x100000);
        assert_eq!(format(m), s);
    }

    #[test]
    fn every_mask_round_trips() {
        for m in (0..(1u32 << 24)).step_by(4099) {
            assert_eq!(parse(&format(m)).unwrap(), m, "{m:#x}");
        }
    }

    #[test]
    fn bad_names_are_rejected() {
        assert!(parse("GFP_KERNAL").is_err());
        assert!(parse("").is_err());
        assert!(parse("GFP_KERNEL|").is_err());
    }

    #[test]
    fn gfp_zone_table() {
        use ZoneKindReq::*;
        // x86_64 (DMA32, no highmem)
        let z = |g| gfp_zone_kind(g, false, true).unwrap();
        assert_eq!(z(GFP_KERNEL), Normal);
        assert_eq!(z(GFP_DMA), Dma);
        assert_eq!(z(GFP_DMA32), Dma32);
        assert_eq!(z(GFP_HIGHUSER), Normal);
        assert_eq!(z(GFP_HIGHUSER_MOVABLE), Movable);
        assert_eq!(z(__GFP_MOVABLE | __GFP_DMA32), Dma32);
        // i386 (highmem, no DMA32)
        let z = |g| gfp_zone_kind(g, true, false).unwrap();
        assert_eq!(z(GFP_HIGHUSER), HighMem);
        assert_eq!(z(GFP_DMA32), Normal);
        for bad in [0x3, 0x5, 0x6, 0x7, 0xb, 0xd, 0xe, 0xf] {
            assert!(gfp_zone_kind(bad, true, true).is_err(), "{bad:#x}");
        }
    }
}
