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


def _words(o: Any, lo: int) -> list[int]:
    """The word values of an 8-byte integer array at or above ``lo``."""
    if type(o) is array.array:
        if o.typecode in _WORD_CODES and o.itemsize == 8:
            return [v for v in o if v >= lo]
        return []
    dtype = getattr(o, "dtype", None)  # numpy, without importing it
    if dtype is not None and type(o).__name__ == "ndarray" and dtype.itemsize == 8 and dtype.kind in "ui":
        return [v for v in o.ravel().tolist() if v >= lo]
    return []


def python_roots(machine: Machine) -> list[int]:
    """Every value the Python program holds that could be a pointer into
    ``machine``'s direct map (ints at or above its ``page_offset``, the
    addresses of live Blocks, the words of 8-byte integer arrays)."""
    lo = machine.page_offset
    me = sys._getframe()
    # Referents of every container: lists, dicts (module globals, object
    # attributes), tuples, sets, materialised frames...
    refs = gc.get_referents(*gc.get_objects())
    # ... and the locals of every running frame (fast locals are nobody's referents).
    for frame in sys._current_frames().values():
        f: Any = frame
        while f is not None:
            if f is not me:
                refs.extend(f.f_locals.values())
            f = f.f_back
    roots = [r for r in refs if type(r) is int and r >= lo]
    roots += [r.addr for r in refs if type(r) is Block and r.alive_]
    for r in refs:
        if type(r) is array.array or type(r).__name__ == "ndarray":
            roots += _words(r, lo)
    return roots
