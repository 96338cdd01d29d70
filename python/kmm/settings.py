"""Settings: boot parameters and sysctls in one syntax (DESIGN.md §7).

``"NAME=VALUE ..."`` items, whitespace-separated: a name with a dot is a
sysctl (``vm.watermark_scale_factor=200``, set once the machine booted, as
``sysctl -w`` would), a name without one a boot parameter
(``slub_min_order=1``, on the kernel command line). ``--set`` on ``kmm
replay``, ``demo`` and ``proc`` takes this syntax; so does
:func:`split`.

>>> split("slub_min_order=1 vm.watermark_scale_factor=200")
('slub_min_order=1', {'vm.watermark_scale_factor': '200'})

:data:`PARAMETERS` is the one table of every setting: kernel name, kind,
type, range, default, the kernel file that defines it, and its meaning.
"""

from __future__ import annotations

import shlex
from typing import NamedTuple

from kmm._kmm import BOOT_PARAMS, MAX_PAGE_ORDER, SYSCTLS

__all__ = ["split", "names", "Parameter", "PARAMETERS"]


class Parameter(NamedTuple):
    """One row of :data:`PARAMETERS`."""

    name: str
    kind: str  # "boot" (kernel command line) or "sysctl" (set at run time)
    type: str
    range: str
    default: str
    file: str  # the kernel source file that defines it
    meaning: str


# Type and range of each boot parameter, as its kernel parser accepts it.
_BOOT_TYPES = {
    "kasan": ("on|off", "on, off (also 1, y, Y, 0, n, N; no value: on)"),
    "slub_debug": ("flags[,cache,...][;...]", "F Z P U T A O -"),
    "slub_min_order": ("unsigned int", f"0 .. {MAX_PAGE_ORDER}"),
    "slub_max_order": ("unsigned int", f"0 .. {MAX_PAGE_ORDER}"),
    "slub_min_objects": ("unsigned int", "0 .. 32767"),
    "init_on_alloc": ("bool", "1, 0 (also on, y, Y, off, n, N; no value: 1)"),
    "init_on_free": ("bool", "1, 0 (also on, y, Y, off, n, N; no value: 1)"),
    "failslab": ("fault attribute", "<interval>,<probability 0..100>,<space>,<times>"),
    "fail_page_alloc": ("fault attribute", "<interval>,<probability 0..100>,<space>,<times>"),
    "kmemleak": ("on|off", "on, off (also 1, y, Y, 0, n, N; no value: on)"),
    "slab_nomerge": ("flag", "no value (a value is ignored)"),
    "slab_merge": ("flag", "no value (a value is ignored)"),
}

# The kernel file (and handler) behind each sysctl.
_SYSCTL_FILES = {
    "vm.min_free_kbytes": "mm/page_alloc.c (min_free_kbytes_sysctl_handler)",
    "vm.watermark_scale_factor": "mm/page_alloc.c (watermark_scale_factor_sysctl_handler)",
    "vm.watermark_boost_factor": "mm/page_alloc.c (page_alloc_sysctl_table)",
    "vm.percpu_pagelist_high_fraction": "mm/page_alloc.c (percpu_pagelist_high_fraction_sysctl_handler)",
    "vm.lowmem_reserve_ratio": "mm/page_alloc.c (lowmem_reserve_ratio_sysctl_handler)",
    "slab.<cache>.min_partial": "mm/slub.c (min_partial_store)",
    "slab.<cache>.cpu_partial": "mm/slub.c (cpu_partial_store)",
}

#: Every boot parameter and sysctl kmm knows (DESIGN.md §7).
PARAMETERS: tuple[Parameter, ...] = tuple(
    [Parameter(n, "boot", *_BOOT_TYPES[n], d or "-", f, h) for n, d, f, h in BOOT_PARAMS]
    + [
        Parameter(n, "sysctl", "integers" if n == "vm.lowmem_reserve_ratio" else "integer", r, d, _SYSCTL_FILES[n], h)
        for n, d, r, h in SYSCTLS
    ]
)


def names() -> dict[str, str]:
    """Every setting kmm knows, with its valid values."""
    out = {n: (f"default {d}" if d else "no default") for n, d, _f, _h in BOOT_PARAMS}
    out.update({n: v for n, _d, v, _h in SYSCTLS})
    return out


def _slab_tunable(name: str) -> bool:
    """``slab.<cache>.min_partial`` or ``slab.<cache>.cpu_partial`` (the
    cache itself is looked up when the machine runs)."""
    cache, _, attr = name.removeprefix("slab.").rpartition(".")
    return name.startswith("slab.") and bool(cache) and attr in ("min_partial", "cpu_partial")


def split(text: str) -> tuple[str, dict[str, str]]:
    """Split settings into (kernel command line, {sysctl: value}).

    Raises ValueError naming an unknown sysctl (boot parameters are checked
    when the machine boots, by the kernel-syntax parser) or an item that is
    not ``NAME=VALUE`` (a boot parameter may be a bare ``NAME``).
    """
    try:
        items = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"settings {text!r}: {e}") from None
    boot: list[str] = []
    sysctl: dict[str, str] = {}
    known = {n for n, *_ in SYSCTLS}
    for item in items:
        name, eq, value = item.partition("=")
        if "." in name:
            if not eq:
                raise ValueError(f"setting {item!r}: a sysctl needs a value (NAME=VALUE)")
            if name not in known and not _slab_tunable(name):
                valid = ", ".join(f"{n} ({v})" for n, _d, v, _h in SYSCTLS)
                raise ValueError(f"unknown sysctl {name!r}; kmm knows: {valid}")
            if name in sysctl:
                raise ValueError(f"setting {name} given twice")
            sysctl[name] = value
        else:
            boot.append(f'{name}="{value}"' if " " in value else item)
    return " ".join(boot), sysctl
