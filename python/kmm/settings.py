"""Settings: boot parameters and sysctls in one syntax (DESIGN.md §7).

``"NAME=VALUE ..."`` items, whitespace-separated: a name with a dot is a
sysctl (``vm.watermark_scale_factor=200``, set once the machine booted, as
``sysctl -w`` would), a name without one a boot parameter
(``slub_min_order=1``, on the kernel command line). ``--set`` on ``kmm
replay``, ``demo`` and ``proc`` takes this syntax; so does
:func:`split`.

>>> split("slub_min_order=1 vm.watermark_scale_factor=200")
('slub_min_order=1', {'vm.watermark_scale_factor': '200'})
"""

from __future__ import annotations

import shlex

from kmm._kmm import BOOT_PARAMS, SYSCTLS

__all__ = ["split", "names"]


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
