"""Snapshots of allocator state and their differences, in the spirit of
:mod:`tracemalloc`'s ``Snapshot.compare_to``.

A :class:`Snapshot` is read from the kernel's own views of a machine
(``/proc/buddyinfo``-level free counts per zone, order and migratetype from
``Machine.zones``; ``/proc/slabinfo``; the per-CPU ``pagesets`` of
``/proc/zoneinfo``; ``/proc/vmallocinfo``; ``/proc/meminfo``), so what it
reports is what those files would show.

>>> import kmm
>>> m = kmm.Machine()
>>> old = m.snapshot()
>>> blocks = [m.kmalloc(64) for _ in range(100)]
>>> for d in m.snapshot().compare_to(old, "cache")[:1]:
...     print(d.key, d.size_diff, d.count_diff)
kmalloc-64 8192 128

(two new slabs of 64 objects: SLUB's slabinfo counts every object of a
CPU slab as active, so 100 allocations show as 128, as the kernel shows them.)

Key types (the ``key_type`` of :meth:`Snapshot.compare_to`):

``"zone"``      free pages per (zone, order, migratetype); size = bytes free
``"cache"``     slab caches: count = active objects, size = bytes of slabs
``"cpu"``       per-CPU page lists: (zone, cpu) -> pages on the list
``"vmalloc"``   vmalloc areas by caller: count = areas, size = bytes (guard included)
``"meminfo"``   every /proc/meminfo line, in kB (size) and as a count
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["KEY_TYPES", "Snapshot", "Statistic", "StatisticDiff", "take"]

KEY_TYPES = ("zone", "cache", "cpu", "vmalloc", "meminfo")


@dataclass(frozen=True)
class Statistic:
    """One entry of a snapshot: a key with a size (bytes) and a count."""

    key: Any
    size: int
    count: int


@dataclass(frozen=True)
class StatisticDiff:
    """One key's change between two snapshots (tracemalloc's field names)."""

    key: Any
    size: int
    size_diff: int
    count: int
    count_diff: int

    def __str__(self) -> str:
        return f"{_fmt_key(self.key)}: size={self.size} ({self.size_diff:+d}), count={self.count} ({self.count_diff:+d})"


def _fmt_key(key: Any) -> str:
    return " ".join(str(k) for k in key) if isinstance(key, tuple) else str(key)


_PAGESET = re.compile(r"^\s+cpu: (\d+)\s*$")
_COUNT = re.compile(r"^\s+count:\s+(\d+)\s*$")
_VMALLOC = re.compile(r"^0x[0-9a-f]+-0x[0-9a-f]+\s+(\d+)\s+(\S+)(.*)$")


def _zones(m) -> dict[Any, Statistic]:
    ps = m.page_size
    out = {}
    for z in m.zones:
        if not z.populated:
            continue
        for mt, per_order in z.nr_free_by_migratetype.items():
            for order, n in enumerate(per_order):
                out[(z.name, order, mt)] = Statistic((z.name, order, mt), n * (ps << order), n)
    return out


def _caches(m) -> dict[Any, Statistic]:
    out = {}
    for line in m.proc.slabinfo().splitlines()[2:]:
        f = line.split()
        # name active_objs num_objs objsize objperslab pagesperslab : tunables ... : slabdata active_slabs num_slabs 0
        name, active, pages_per_slab, num_slabs = f[0], int(f[1]), int(f[5]), int(f[14])
        out[name] = Statistic(name, num_slabs * pages_per_slab * m.page_size, active)
    return out


def _cpus(m) -> dict[Any, Statistic]:
    out = {}
    zone, cpu = None, None
    for line in m.proc.zoneinfo().splitlines():
        if line.startswith("Node "):
            zone = line.split()[-1]
            continue
        if mo := _PAGESET.match(line):
            cpu = int(mo.group(1))
            continue
        if (mo := _COUNT.match(line)) and cpu is not None:
            n = int(mo.group(1))
            out[(zone, cpu)] = Statistic((zone, cpu), n * m.page_size, n)
            cpu = None
    return out


def _vmalloc(m) -> dict[Any, Statistic]:
    size: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    for line in m.proc.vmallocinfo().splitlines():
        mo = _VMALLOC.match(line)
        if not mo:
            continue
        caller = mo.group(2) if "unpurged" not in line else "(unpurged)"
        size[caller] += int(mo.group(1))
        count[caller] += 1
    return {k: Statistic(k, size[k], count[k]) for k in size}


def _meminfo(m) -> dict[Any, Statistic]:
    return {k: Statistic(k, v * 1024 if not k.startswith("HugePages_") else v, v) for k, v in m.proc.meminfo_dict().items()}


_READERS = {"zone": _zones, "cache": _caches, "cpu": _cpus, "vmalloc": _vmalloc, "meminfo": _meminfo}


class Snapshot:
    """Allocator state of a machine at one moment (see the module docstring)."""

    def __init__(self, stats: dict[str, dict[Any, Statistic]], arch: str, memory: int) -> None:
        self._stats = stats
        self.arch = arch
        self.memory = memory

    @classmethod
    def take(cls, machine) -> "Snapshot":
        return cls({k: f(machine) for k, f in _READERS.items()}, machine.arch, machine.memory)

    def statistics(self, key_type: str) -> list[Statistic]:
        """Entries of one key type, biggest size first."""
        return sorted(self._by(key_type).values(), key=lambda s: (-s.size, -s.count, _fmt_key(s.key)))

    def _by(self, key_type: str) -> dict[Any, Statistic]:
        try:
            return self._stats[key_type]
        except KeyError:
            raise ValueError(f"unknown key_type {key_type!r} (expected one of {', '.join(KEY_TYPES)})") from None

    def compare_to(self, old: "Snapshot", key_type: str = "cache") -> list[StatisticDiff]:
        """What changed since ``old``: one entry per key that differs, the
        biggest absolute size change first (then count change), as
        tracemalloc orders them. Keys present in only one snapshot count as
        zero in the other."""
        if not isinstance(old, Snapshot):
            raise TypeError(f"compare_to needs a Snapshot, not {type(old).__name__}")
        new_s, old_s = self._by(key_type), old._by(key_type)
        out = []
        for key in set(new_s) | set(old_s):
            n = new_s.get(key, Statistic(key, 0, 0))
            o = old_s.get(key, Statistic(key, 0, 0))
            if n.size != o.size or n.count != o.count:
                out.append(StatisticDiff(key, n.size, n.size - o.size, n.count, n.count - o.count))
        out.sort(key=lambda d: (-abs(d.size_diff), -abs(d.count_diff), _fmt_key(d.key)))
        return out

    def grew(self, old: "Snapshot", key_type: str = "cache") -> list[StatisticDiff]:
        """Only the entries whose size or count grew."""
        return [d for d in self.compare_to(old, key_type) if d.size_diff > 0 or d.count_diff > 0]

    def __repr__(self) -> str:
        return f"<Snapshot {self.arch} {self.memory >> 20} MiB: " + ", ".join(
            f"{k} {len(v)}" for k, v in self._stats.items()
        ) + ">"


def take(machine) -> Snapshot:
    """``Snapshot.take(machine)``; also ``machine.snapshot()``."""
    return Snapshot.take(machine)


def format_diffs(diffs: Iterable[StatisticDiff], limit: int = 10) -> str:
    """The top entries as text, one per line."""
    return "\n".join(str(d) for d in list(diffs)[:limit])
