"""GFP flags: every ``__GFP_*`` bit and composite with the kernel's 6.18 values.

``format(mask)`` prints exactly what the kernel's tracepoints print
(``show_gfp_flags``: composites first, greedy in the kernel's table order,
leftover bits in hex, ``none`` for 0); ``parse(text)`` is its inverse.

>>> import kmm
>>> kmm.gfp.format(kmm.GFP_KERNEL | kmm.__GFP_ZERO)
'GFP_KERNEL|__GFP_ZERO'
>>> hex(kmm.gfp.parse("GFP_ATOMIC|__GFP_NOWARN"))
'0x2820'
"""

from __future__ import annotations

from kmm._kmm import GFP_NAMES, GFP_PRINT_TABLE, gfp_format, gfp_parse

#: name -> value for every gfp name the kernel defines (composites, groupings, bits).
NAMES: dict[str, int] = dict(GFP_NAMES)
#: The print table (``__def_gfpflag_names``) in the kernel's order.
PRINT_TABLE: list[tuple[str, int]] = list(GFP_PRINT_TABLE)

globals().update(NAMES)

__all__ = ["format", "parse", "NAMES", "PRINT_TABLE", *NAMES]


def format(mask: int) -> str:  # noqa: A001 - the kernel's name for it
    """The text the kernel's tracepoints print for ``mask`` (``show_gfp_flags``)."""
    return gfp_format(mask)


def parse(text: str) -> int:
    """The mask a ``gfp_flags=`` text denotes; raises BadGfpError for unknown names."""
    return gfp_parse(text)
