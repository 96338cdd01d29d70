"""Real kernel traces: load ``perf script`` / ``trace_pipe`` text, compute
``perf kmem stat``'s numbers, and replay a trace on a kmm machine.

>>> import kmm
>>> t = kmm.trace.load(kmm.trace.SAMPLE)          # plain, .gz or .xz
>>> print(kmm.trace.stat(t).format(), end="")     # perf kmem stat's text

Record a trace of your own machine with::

    perf record -e 'kmem:*' -a -- sleep 5
    perf script > my.perf.txt

This module is ``kmm.trace``; ``Machine.trace`` (a machine's own
tracepoints, ``m.trace.record(...)``) is a different thing.

Parsing runs in Rust with the GIL released; Python only decompresses
(``gzip``/``lzma`` from the standard library) and feeds chunks.
"""

from __future__ import annotations

import gzip
import lzma
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kmm._kmm import KmemStat as _KmemStat
from kmm._kmm import TraceEvent, TraceLog, TraceParser
from kmm.errors import TraceFormatError

__all__ = [
    "SAMPLE",
    "TraceLog",
    "TraceEvent",
    "TraceFormatError",
    "KmemStat",
    "SlabSummary",
    "PageSummary",
    "load",
    "parse",
    "stat",
    "SLAB_SORT_KEYS",
    "PAGE_SORT_KEYS",
]

#: The sample trace shipped with kmm (Linux 6.18, 2 CPUs, 83,084 events).
SAMPLE = Path(__file__).parent / "data" / "sample.perf.txt.xz"

#: perf kmem's sort keys (``-s``), slab and page.
SLAB_SORT_KEYS = ("ptr", "callsite", "hit", "bytes", "frag", "pingpong")
PAGE_SORT_KEYS = ("page", "callsite", "hit", "bytes", "order", "migtype", "gfp")

_CHUNK = 1 << 20
_PROGRESS_MIN_BYTES = 4 << 20


class _Progress:
    """A one-line progress bar on stderr (``\\r``-rewritten)."""

    def __init__(self, path: Path, total: int, enabled: bool | None):
        if enabled is None:
            enabled = total >= _PROGRESS_MIN_BYTES and sys.stderr.isatty()
        self.enabled = enabled
        self.path = path.name
        self.total = max(total, 1)
        self.shown = -1

    def update(self, done: int, events: int) -> None:
        if not self.enabled:
            return
        pct = min(100, done * 100 // self.total)
        if pct == self.shown:
            return
        self.shown = pct
        bar = "#" * (pct // 5)
        sys.stderr.write(f"\rkmm: reading {self.path} [{bar:<20}] {pct:3d}% {events:,} events")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.shown >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()


def load(path: str | os.PathLike[str], lenient: bool = False, progress: bool | None = None) -> TraceLog:
    """Read a ``perf script`` or ``trace_pipe`` text file (plain, .gz or .xz).

    ``lenient``: skip malformed lines (counted in ``.skipped``) instead of
    raising :class:`TraceFormatError` naming the line. ``progress``: a
    progress bar on stderr (None: only for files over 4 MiB when stderr is a
    terminal).
    """
    p = Path(path)
    total = p.stat().st_size
    parser = TraceParser(lenient)
    bar = _Progress(p, total, progress)
    try:
        with open(p, "rb") as raw:
            with _open_fileobj(raw) as f:
                while True:
                    try:
                        chunk = f.read(_CHUNK)
                    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as e:
                        raise TraceFormatError(f"{p}: compressed data is damaged or truncated ({e})") from None
                    if not chunk:
                        break
                    parser.feed(chunk)
                    bar.update(raw.tell(), parser.events)
            return parser.finish()
    except TraceFormatError as e:
        if str(e).startswith(str(p)):
            raise
        err = TraceFormatError(f"{p}: {e}")
        err.line = getattr(e, "line", 0)
        raise err from None
    finally:
        bar.close()


def _open_fileobj(raw: IO[bytes]) -> IO[bytes]:
    magic = raw.read(6)
    raw.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    return _NoClose(raw)


class _NoClose:
    """A context manager around an already-open file that the caller closes."""

    def __init__(self, f: IO[bytes]):
        self.f = f

    def read(self, n: int) -> bytes:
        return self.f.read(n)

    def __enter__(self) -> _NoClose:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def parse(text: str | bytes, lenient: bool = False) -> TraceLog:
    """Parse trace text held in memory (see :func:`load`)."""
    parser = TraceParser(lenient)
    parser.feed(text.encode() if isinstance(text, str) else text)
    return parser.finish()


@dataclass(frozen=True)
class SlabSummary:
    """``perf kmem --slab stat``'s summary (bytes)."""

    total_requested: int
    total_allocated: int
    total_freed: int
    nr_allocs: int
    nr_cross_allocs: int
    fragmentation: float

    @property
    def net_allocated(self) -> int:
        return self.total_allocated - self.total_freed

    @property
    def wasted(self) -> int:
        """Bytes wasted on internal fragmentation (allocated - requested)."""
        return self.total_allocated - self.total_requested


@dataclass(frozen=True)
class PageSummary:
    """``perf kmem --page stat``'s summary (counts, and bytes)."""

    page_size: int
    nr_page_allocs: int
    nr_page_frees: int
    nr_page_fails: int
    nr_page_nomatch: int
    nr_alloc_freed: int
    total_page_alloc_bytes: int
    total_page_free_bytes: int
    total_page_fail_bytes: int
    total_page_nomatch_bytes: int
    total_alloc_freed_bytes: int
    #: ``order_stats[order][migratetype]``: orders 0..10, migratetypes 0..5.
    order_stats: list[list[int]] = field(default_factory=list)

    @property
    def nr_alloc_only(self) -> int:
        return self.nr_page_allocs - self.nr_alloc_freed


@dataclass(frozen=True)
class KmemStat:
    """The numbers of ``perf kmem --slab stat`` and ``--page stat`` for a trace."""

    slab: SlabSummary
    page: PageSummary
    _raw: Any = field(repr=False, compare=False)

    def format(
        self,
        slab: bool = True,
        page: bool = True,
        caller: bool = False,
        alloc: bool = False,
        sort: str | None = None,
        lines: int | None = None,
    ) -> str:
        """perf kmem stat's text: the ``--caller``/``--alloc`` tables (sorted by
        ``sort``, perf's ``-s`` keys; ``lines`` rows, perf's ``-l``) and the
        summaries, slab first."""
        return self._raw.format(slab, page, caller, alloc, sort, lines)


def stat(trace: TraceLog, page_size: int = 4096) -> KmemStat:
    """``perf kmem stat`` over a loaded trace (perf 6.1's rules; see
    ``rust/kmm-core/src/trace/stat.rs``)."""
    if not isinstance(trace, TraceLog):
        raise TypeError(f"expected a TraceLog (kmm.trace.load), not {type(trace).__name__}")
    raw: _KmemStat = trace.kmem_stat(page_size)
    s = raw.slab_summary()
    p = raw.page_summary()
    return KmemStat(SlabSummary(**s), PageSummary(**p), raw)
