"""kmemleak's Python roots: the values a program still holds that may point
into a machine's memory.

kmm's "kernel code" is the Python program driving it, so what the program
holds plays the part of the kernel's data sections and task stacks in
mm/kmemleak.c's scan: a live :class:`kmm.Block`, an ``int``, or an 8-byte
integer array (``array('Q')`` as ``alloc_bulk`` returns, a numpy
uint64/int64 array) anywhere in the Python heap or in a running frame's
locals. Like the kernel's scan this is conservative: an int that happens to
equal an address inside an object keeps it referenced.

:meth:`kmm.Machine.kmemleak_scan` calls :func:`python_roots`; the scan itself
(per-CPU areas, vmalloc'd memory, then the referenced objects, recursively)
runs in the core.
"""

from __future__ import annotations

import array
import gc
import sys
from typing import Any

from kmm._kmm import Block, Machine

__all__ = ["python_roots"]

_WORD_CODES = frozenset("QqLl")
_HI = 1 << 64


def _words(o: Any, lo: int) -> list[int]:
    """The word values of an 8-byte integer array at or above ``lo``."""
    if type(o) is array.array:
        if o.typecode in _WORD_CODES and o.itemsize == 8:
            return [v for v in o if lo <= v < _HI]
        return []
    dtype = getattr(o, "dtype", None)  # numpy, without importing it
    if dtype is not None and type(o).__name__ == "ndarray" and dtype.itemsize == 8 and dtype.kind in "ui":
        return [v for v in o.ravel().tolist() if lo <= v < _HI]
    return []


def _frame_locals() -> list[Any]:
    """The locals of every running frame but this module's (fast locals are
    nobody's referents). Reading ``f_locals`` also refreshes each frame's
    snapshot dict, so a local deleted since the last scan is no longer in
    it when the heap is walked next."""
    me = sys._getframe()
    skip = (me, me.f_back)
    out: list[Any] = []
    frames: list[Any] = list(sys._current_frames().values())
    try:
        for f in frames:
            while f is not None:
                if f not in skip:
                    out.extend(f.f_locals.values())
                f = f.f_back
    finally:
        # Frames hold their locals: drop every frame reference (no cycles).
        frames.clear()
        del me, skip, f
    return out


def python_roots(machine: Machine) -> list[int]:
    """Every value the Python program holds that could be a pointer into
    ``machine``'s direct map (ints at or above its ``page_offset``, the
    addresses of live Blocks, the words of 8-byte integer arrays)."""
    lo = machine.page_offset
    # Garbage is no root: unreachable cycles would otherwise keep what they
    # mention referenced.
    gc.collect()
    refs = _frame_locals()
    # Referents of every container: lists, dicts (module globals, object
    # attributes, the frames' refreshed locals), tuples, sets...
    refs += gc.get_referents(*gc.get_objects())
    try:
        roots = [r for r in refs if type(r) is int and lo <= r < _HI]
        roots += [r.addr for r in refs if type(r) is Block and r.alive_]
        for r in refs:
            if type(r) is array.array or type(r).__name__ == "ndarray":
                roots += _words(r, lo)
    finally:
        refs.clear()  # an earlier scan's list must never look like a root
    return roots
