"""GFP flags: every ``__GFP_*`` bit and composite with the kernel's 6.18 values.

``format(mask)`` prints exactly what the kernel's tracepoints print
(``show_gfp_flags``: composites first, greedy in the kernel's table order,
leftover bits in hex, ``none`` for 0); ``parse(text)`` is its inverse.

The names are declared here, laid out as ``include/linux/gfp_types.h`` lays
them out, so that type checkers and IDEs see them; ``NAMES`` is the core's
table of the same names (a test keeps the two equal).

>>> import kmm
>>> kmm.gfp.format(kmm.GFP_KERNEL | kmm.__GFP_ZERO)
'GFP_KERNEL|__GFP_ZERO'
>>> hex(kmm.gfp.parse("GFP_ATOMIC|__GFP_NOWARN"))
'0x2820'
"""

from __future__ import annotations

from typing import Final

from kmm._kmm import GFP_NAMES, GFP_PRINT_TABLE, gfp_format, gfp_parse

# ---- the bits (``enum ___GFP_*_BIT``), by purpose ---------------------------------
# Physical address zone modifiers.
__GFP_DMA: Final[int] = 0x1
__GFP_HIGHMEM: Final[int] = 0x2
__GFP_DMA32: Final[int] = 0x4
__GFP_MOVABLE: Final[int] = 0x8
#: Page mobility and placement hint (with __GFP_MOVABLE: the migratetype).
__GFP_RECLAIMABLE: Final[int] = 0x10
# Watermark modifiers: access to the emergency reserves.
__GFP_HIGH: Final[int] = 0x20
# Reclaim modifiers.
__GFP_IO: Final[int] = 0x40
__GFP_FS: Final[int] = 0x80
# Action modifiers.
__GFP_ZERO: Final[int] = 0x100
__GFP_DIRECT_RECLAIM: Final[int] = 0x400
__GFP_KSWAPD_RECLAIM: Final[int] = 0x800
__GFP_WRITE: Final[int] = 0x1000
__GFP_NOWARN: Final[int] = 0x2000
__GFP_RETRY_MAYFAIL: Final[int] = 0x4000
__GFP_NOFAIL: Final[int] = 0x8000
__GFP_NORETRY: Final[int] = 0x10000
__GFP_MEMALLOC: Final[int] = 0x20000
__GFP_COMP: Final[int] = 0x40000
__GFP_NOMEMALLOC: Final[int] = 0x80000
__GFP_HARDWALL: Final[int] = 0x100000
__GFP_THISNODE: Final[int] = 0x200000
__GFP_ACCOUNT: Final[int] = 0x400000
__GFP_ZEROTAGS: Final[int] = 0x800000
#: Bits whose kernel option is off in the modelled configuration
#: (CONFIG_KASAN_HW_TAGS, CONFIG_LOCKDEP, CONFIG_SLAB_OBJ_EXT): 0, as the kernel defines them then.
__GFP_SKIP_ZERO: Final[int] = 0
__GFP_SKIP_KASAN: Final[int] = 0
__GFP_NOLOCKDEP: Final[int] = 0
__GFP_NO_OBJ_EXT: Final[int] = 0

# ---- groupings -------------------------------------------------------------------------
__GFP_RECLAIM: Final[int] = __GFP_DIRECT_RECLAIM | __GFP_KSWAPD_RECLAIM
GFP_ZONEMASK: Final[int] = __GFP_DMA | __GFP_HIGHMEM | __GFP_DMA32 | __GFP_MOVABLE
GFP_MOVABLE_MASK: Final[int] = __GFP_RECLAIMABLE | __GFP_MOVABLE

# ---- useful combinations ---------------------------------------------------------------
#: Cannot sleep, high priority, may dip into the atomic reserves (interrupt handlers).
GFP_ATOMIC: Final[int] = __GFP_HIGH | __GFP_KSWAPD_RECLAIM
#: The usual kernel allocation: may sleep, reclaim, start I/O and call into filesystems.
GFP_KERNEL: Final[int] = __GFP_RECLAIM | __GFP_IO | __GFP_FS
#: GFP_KERNEL charged to the memory cgroup.
GFP_KERNEL_ACCOUNT: Final[int] = GFP_KERNEL | __GFP_ACCOUNT
#: Cannot sleep and uses no reserves; fails quietly (6.18 includes __GFP_NOWARN).
GFP_NOWAIT: Final[int] = __GFP_KSWAPD_RECLAIM | __GFP_NOWARN
#: May reclaim but must not start physical I/O.
GFP_NOIO: Final[int] = __GFP_RECLAIM
#: May reclaim and do I/O, but must not call into filesystems.
GFP_NOFS: Final[int] = __GFP_RECLAIM | __GFP_IO
#: Memory for user space that the kernel also accesses directly.
GFP_USER: Final[int] = __GFP_RECLAIM | __GFP_IO | __GFP_FS | __GFP_HARDWALL
#: From ZONE_DMA (the first 16 MiB on x86).
GFP_DMA: Final[int] = __GFP_DMA
#: From ZONE_DMA32 (below 4 GiB).
GFP_DMA32: Final[int] = __GFP_DMA32
#: User pages the kernel need not map permanently (may come from HighMem).
GFP_HIGHUSER: Final[int] = GFP_USER | __GFP_HIGHMEM
#: User pages that may also be migrated.
GFP_HIGHUSER_MOVABLE: Final[int] = GFP_HIGHUSER | __GFP_MOVABLE | __GFP_SKIP_KASAN
#: A transparent huge page that does no reclaim at all.
GFP_TRANSHUGE_LIGHT: Final[int] = (
    GFP_HIGHUSER_MOVABLE | __GFP_COMP | __GFP_NOMEMALLOC | __GFP_NOWARN
) & ~__GFP_RECLAIM
#: A transparent huge page as khugepaged allocates one.
GFP_TRANSHUGE: Final[int] = GFP_TRANSHUGE_LIGHT | __GFP_DIRECT_RECLAIM
#: What the slab and vmalloc pass down of a caller's reclaim constraints.
GFP_RECLAIM_MASK: Final[int] = (
    __GFP_RECLAIM
    | __GFP_HIGH
    | __GFP_IO
    | __GFP_FS
    | __GFP_NOWARN
    | __GFP_RETRY_MAYFAIL
    | __GFP_NOFAIL
    | __GFP_NORETRY
    | __GFP_MEMALLOC
    | __GFP_NOMEMALLOC
    | __GFP_NOLOCKDEP
)

#: name -> value for every gfp name the kernel defines (composites, groupings, bits).
NAMES: dict[str, int] = dict(GFP_NAMES)
#: The print table (``__def_gfpflag_names``) in the kernel's order.
PRINT_TABLE: list[tuple[str, int]] = list(GFP_PRINT_TABLE)

__all__ = [
    "format",
    "parse",
    "NAMES",
    "PRINT_TABLE",
    "GFP_TRANSHUGE",
    "GFP_TRANSHUGE_LIGHT",
    "GFP_HIGHUSER_MOVABLE",
    "GFP_HIGHUSER",
    "GFP_USER",
    "GFP_KERNEL_ACCOUNT",
    "GFP_KERNEL",
    "GFP_NOFS",
    "GFP_ATOMIC",
    "GFP_NOIO",
    "GFP_NOWAIT",
    "GFP_DMA",
    "GFP_DMA32",
    "__GFP_RECLAIM",
    "__GFP_DMA",
    "__GFP_HIGHMEM",
    "__GFP_DMA32",
    "__GFP_MOVABLE",
    "__GFP_RECLAIMABLE",
    "__GFP_HIGH",
    "__GFP_IO",
    "__GFP_FS",
    "__GFP_ZERO",
    "__GFP_DIRECT_RECLAIM",
    "__GFP_KSWAPD_RECLAIM",
    "__GFP_WRITE",
    "__GFP_NOWARN",
    "__GFP_RETRY_MAYFAIL",
    "__GFP_NOFAIL",
    "__GFP_NORETRY",
    "__GFP_MEMALLOC",
    "__GFP_COMP",
    "__GFP_NOMEMALLOC",
    "__GFP_HARDWALL",
    "__GFP_THISNODE",
    "__GFP_ACCOUNT",
    "__GFP_ZEROTAGS",
    "__GFP_SKIP_ZERO",
    "__GFP_SKIP_KASAN",
    "__GFP_NOLOCKDEP",
    "__GFP_NO_OBJ_EXT",
    "GFP_ZONEMASK",
    "GFP_MOVABLE_MASK",
    "GFP_RECLAIM_MASK",
]


def format(mask: int) -> str:  # noqa: A001 - the kernel's name for it
    """The text the kernel's tracepoints print for ``mask`` (``show_gfp_flags``)."""
    return gfp_format(mask)


def parse(text: str) -> int:
    """The mask a ``gfp_flags=`` text denotes; raises BadGfpError for unknown names."""
    return gfp_parse(text)
