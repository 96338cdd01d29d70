"""Real kernel traces: load a ``perf.data`` or ``perf script`` /
``trace_pipe`` text, compute ``perf kmem stat``'s numbers, and replay a trace
on a kmm machine.

>>> import kmm
>>> t = kmm.trace.load(kmm.trace.SAMPLE)          # plain, .gz or .xz
>>> print(kmm.trace.stat(t).format(), end="")     # perf kmem stat's text

Record a trace of your own machine with::

    perf record -k CLOCK_MONOTONIC -e 'kmem:*,percpu:*,vmalloc:*' -a -- sleep 5
    cp /proc/kallsyms kallsyms.txt     # to name the call sites (as root)

and load ``perf.data`` directly (``perf script > my.perf.txt`` works too).

This module is ``kmm.trace``; ``Machine.trace`` (a machine's own
tracepoints, ``m.trace.record(...)``) is a different thing.

Parsing runs in Rust with the GIL released; Python only decompresses
(``gzip``/``lzma`` from the standard library: C code that releases the GIL)
and feeds chunks. A perf.data is decompressed into memory whole (its event
formats are stored after its events) and decoded in one call.
"""

from __future__ import annotations

import gzip
import lzma
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kmm._kmm import KmemStat as _KmemStat
from kmm._kmm import TraceEvent, TraceLog, TraceParser, parse_perf_data, sniff_trace
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
    "replay",
    "ReplayReport",
    "FragSample",
    "ZoneFrag",
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
_SNIFF_BYTES = 4096
#: Names of the kallsyms file looked for next to a perf.data.
KALLSYMS_NAMES = ("kallsyms.txt", "kallsyms.txt.xz", "kallsyms.txt.gz")


class _Progress:
    """A one-line progress bar on stderr (``\\r``-rewritten)."""

    def __init__(self, path: Path, total: int, enabled: bool | None):
        if enabled is None:
            enabled = total >= _PROGRESS_MIN_BYTES and sys.stderr.isatty()
        self.enabled = enabled
        self.path = path.name
        self.total = max(total, 1)
        self.shown = -1

    def update(self, done: int, events: int | None) -> None:
        if not self.enabled:
            return
        pct = min(100, done * 100 // self.total)
        if pct == self.shown:
            return
        self.shown = pct
        bar = "#" * (pct // 5)
        tail = "" if events is None else f" {events:,} events"
        sys.stderr.write(f"\rkmm: reading {self.path} [{bar:<20}] {pct:3d}%{tail}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.shown >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()


def load(
    path: str | os.PathLike[str],
    lenient: bool = False,
    progress: bool | None = None,
    kallsyms: str | os.PathLike[str] | None = None,
) -> TraceLog:
    """Read a trace file: a ``perf.data``, or ``perf script`` / ``trace_pipe``
    text; plain, .gz or .xz (the content decides, not the name).

    ``lenient``: skip malformed lines or undecodable perf.data records
    (counted in ``.skipped``) instead of raising :class:`TraceFormatError`
    naming the line (text) or byte offset (perf.data). ``progress``: a
    progress bar on stderr (None: only for files over 4 MiB when stderr is a
    terminal). ``kallsyms``: for a perf.data, the recorded boot's
    /proc/kallsyms (plain, .gz or .xz), to print call sites as ``perf script``
    does (``function+0xoff``); None looks for ``kallsyms.txt[.xz|.gz]`` next
    to the file, and without one call sites are raw addresses (``0x...``),
    as perf prints what it cannot resolve. A truncated perf.data whose event
    formats survived loads with ``.truncated_at`` set; lost chunks are in
    ``.lost_chunks``/``.lost_events``.
    """
    p = Path(path)
    kind, why = sniff_trace(_head(p))
    if kind == "perf.data":
        return _load_perf_data(p, lenient, progress, kallsyms)
    if why is not None and not (lenient and "binary data" in why):
        raise TraceFormatError(f"{p}: {why}")
    total = p.stat().st_size
    parser = TraceParser(lenient)
    bar = _Progress(p, total, progress)
    # A reader thread decompresses the next chunks (lzma and zlib release
    # the GIL) while this thread parses the current one (the parser
    # releases it too): the two overlap on two cores.
    chunks: queue.Queue[tuple[bytes, int] | BaseException | None] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def reader() -> None:
        try:
            with open(p, "rb") as raw, _open_fileobj(raw) as f:
                while not stop.is_set():
                    try:
                        chunk = f.read(_CHUNK)
                    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as e:
                        chunks.put(TraceFormatError(f"{p}: compressed data is damaged or truncated ({e})"))
                        return
                    if not chunk:
                        break
                    chunks.put((chunk, raw.tell()))
            chunks.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the parsing thread
            chunks.put(e)

    t = threading.Thread(target=reader, name="kmm-trace-reader", daemon=True)
    t.start()
    try:
        while True:
            item = chunks.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            chunk, done = item
            parser.feed(chunk)
            bar.update(done, parser.events)
        return parser.finish()
    except TraceFormatError as e:
        if str(e).startswith(str(p)):
            raise
        err = TraceFormatError(f"{p}: {e}")
        err.line = getattr(e, "line", 0)
        raise err from None
    finally:
        stop.set()
        while t.is_alive():
            try:
                chunks.get_nowait()
            except queue.Empty:
                t.join(0.01)
        bar.close()


def _head(p: Path) -> bytes:
    """The first bytes of the decompressed content."""
    with open(p, "rb") as raw, _open_fileobj(raw) as f:
        try:
            return f.read(_SNIFF_BYTES)
        except (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as e:
            raise TraceFormatError(f"{p}: compressed data is damaged or truncated ({e})") from None


def _read_all(p: Path, bar: _Progress | None = None) -> bytes:
    """The whole decompressed content (lzma and zlib release the GIL)."""
    with open(p, "rb") as raw:
        magic = raw.read(6)
        raw.seek(0)
        if magic[:2] != b"\x1f\x8b" and magic != b"\xfd7zXZ\x00":
            data = raw.read()
            if bar:
                bar.update(len(data), None)
            return data
        parts = []
        with _open_fileobj(raw) as f:
            while True:
                try:
                    chunk = f.read(8 * _CHUNK)
                except (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as e:
                    raise TraceFormatError(f"{p}: compressed data is damaged or truncated ({e})") from None
                if not chunk:
                    break
                parts.append(chunk)
                if bar:
                    bar.update(raw.tell(), None)
        return b"".join(parts)


def find_kallsyms(path: str | os.PathLike[str]) -> Path | None:
    """The ``kallsyms.txt[.xz|.gz]`` in the directory of ``path``, if any."""
    d = Path(path).parent
    for name in KALLSYMS_NAMES:
        if (d / name).is_file():
            return d / name
    return None


def _load_perf_data(
    p: Path, lenient: bool, progress: bool | None, kallsyms: str | os.PathLike[str] | None
) -> TraceLog:
    kpath = Path(kallsyms) if kallsyms is not None else find_kallsyms(p)
    ks = _read_all(kpath) if kpath is not None else None
    bar = _Progress(p, p.stat().st_size, progress)
    try:
        data = _read_all(p, bar)
    finally:
        bar.close()
    try:
        return parse_perf_data(data, ks, lenient)
    except TraceFormatError as e:
        line = getattr(e, "kallsyms_line", None)
        if line is not None and kpath is not None:
            msg = str(e).split(": ", 1)[-1]
            err = TraceFormatError(f"{kpath}: line {line}: {msg}")
            err.line = line
            raise err from None
        err = TraceFormatError(f"{p}: {e}")
        err.offset = getattr(e, "offset", None)  # type: ignore[attr-defined]
        raise err from None


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


# --- replay -----------------------------------------------------------------


@dataclass(frozen=True)
class ZoneFrag:
    """One zone at one sample: free blocks per order and the kernel's
    external-fragmentation indices per order (mm/vmstat.c), as the kernel
    prints them in /sys/kernel/debug/extfrag: thousandths, shown ``0.333``;
    a fragmentation index of ``-1.000`` means the order would succeed."""

    zone: str
    nr_free: list[int]
    unusable_index: list[int]
    fragmentation_index: list[int]


@dataclass(frozen=True)
class FragSample:
    """A sample taken before ``event`` (0-based) was replayed."""

    event: int
    used_pages: int
    zones: list[ZoneFrag]


def _milli(v: int) -> str:
    sign = "-" if v < 0 else ""
    v = abs(v)
    return f"{sign}{v // 1000}.{v % 1000:03d}"


@dataclass(frozen=True)
class ReplayReport:
    """What :func:`replay` did: outcomes per event, kmm's decisions that
    differed from the kernel's, memory and fragmentation over time."""

    events: int
    replayed: int
    replayed_by_name: list[tuple[str, int]]
    before_trace: int
    null_frees: int
    failed_in_trace: int
    slab_pages: int
    slab_page_allocs: int
    consequences: int
    vmalloc: int
    other: int
    reused_live: int
    kmm_failures: int
    kmm_failure_examples: list[str]
    bytes_alloc_checked: int
    bytes_alloc_mismatches: int
    zone_checked: int
    zone_mismatches: int
    zone_pairs: list[tuple[tuple[str, str], int]]
    mismatch_examples: list[tuple[int, str, str, str]]
    caches_created: list[tuple[str, int, int, str]]
    trace_cpus_remapped: int
    seconds: float
    events_per_second: float
    peak_used_pages: int
    boot_used_pages: int
    final_used_pages: int
    live_at_end: int
    samples: list[FragSample]
    page_size: int = 4096
    buddyinfo: str = ""
    slabinfo: str = ""

    def format(self, slabinfo: bool = False) -> str:
        """A human-readable report (the ``kmm replay`` output)."""
        kb = self.page_size // 1024
        out = []
        w = out.append
        w(f"Replayed {self.replayed:,} of {self.events:,} events in {self.seconds * 1e3:.1f} ms "
          f"({self.events_per_second / 1e6:.2f} M events/s)")
        w("")
        w("Events not replayed (counted):")
        for label, n in (
            ("frees of objects allocated before the trace", self.before_trace),
            ("kfree(NULL) / free_percpu(NULL)", self.null_frees),
            ("allocations that failed in the trace", self.failed_in_trace),
            ("slab pages (kmm's slab layer allocates its own)", self.slab_pages),
            ("allocator-internal events (zone_locked, pcpu_drain, free_batched, extfrag)", self.consequences),
            ("not replayed (vmalloc)", self.vmalloc),
            ("other events", self.other),
        ):
            w(f"  {label:<76} {n:>8,}")
        if self.trace_cpus_remapped:
            w(f"  (events on CPUs the machine lacks, run on cpu % cpus: {self.trace_cpus_remapped:,})")
        if self.reused_live:
            w(f"  (allocations of a ptr still live in the replay, older object freed first: {self.reused_live:,})")
        w("")
        w("kmm's decisions against the kernel's:")
        w(f"  slab bytes_alloc differed: {self.bytes_alloc_mismatches:,} of {self.bytes_alloc_checked:,}")
        w(f"  page zone differed:        {self.zone_mismatches:,} of {self.zone_checked:,}")
        for (kz, mz), n in self.zone_pairs:
            w(f"    kernel {kz:<7} -> kmm {mz:<7} {n:>8,}")
        for ev, what, k, m in self.mismatch_examples[:8]:
            w(f"    event {ev}: {what}: kernel {k}, kmm {m}")
        if self.kmm_failures:
            w(f"  kmm calls that failed: {self.kmm_failures:,}")
            for msg in self.kmm_failure_examples[:3]:
                w(f"    {msg.splitlines()[0]}")
        w("")
        w(f"Caches created from the trace: {len(self.caches_created)}")
        w("")
        w(f"Memory in use: boot {self.boot_used_pages * kb:,} kB, peak {self.peak_used_pages * kb:,} kB, "
          f"end {self.final_used_pages * kb:,} kB ({self.live_at_end:,} replayed allocations still live)")
        if self.samples:
            last = self.samples[-1]
            w("")
            w(f"External fragmentation at the end (after {last.event:,} events; mm/vmstat.c indices per order):")
            for z in last.zones:
                w(f"  {z.zone:<7} free blocks   " + " ".join(f"{n:>6}" for n in z.nr_free))
                w(f"  {z.zone:<7} unusable      " + " ".join(f"{_milli(v):>6}" for v in z.unusable_index))
                w(f"  {z.zone:<7} fragmentation " + " ".join(f"{_milli(v):>6}" for v in z.fragmentation_index))
        if self.buddyinfo:
            w("")
            w("/proc/buddyinfo at the end:")
            out.extend(self.buddyinfo.rstrip("\n").splitlines())
        if slabinfo and self.slabinfo:
            w("")
            w("/proc/slabinfo at the end:")
            out.extend(self.slabinfo.rstrip("\n").splitlines())
        return "\n".join(out) + "\n"


def replay(trace: TraceLog, machine: Any, sample_every: int = 1000, free_at_end: bool = False) -> ReplayReport:
    """Replay a loaded trace on ``machine``: every allocation and free, in
    order, each on the CPU it ran on (see ``rust/kmm-core/src/trace/replay.rs``
    for what is replayed and what is counted). Runs in Rust with the GIL
    released. ``sample_every``: events between fragmentation samples.
    ``free_at_end``: free everything the replay allocated, destroy the caches
    it created, shrink the others and drain the per-CPU lists."""
    if not isinstance(trace, TraceLog):
        raise TypeError(f"expected a TraceLog (kmm.trace.load), not {type(trace).__name__}")
    d = trace.replay(machine, sample_every, free_at_end)
    d["samples"] = [
        FragSample(ev, used, [ZoneFrag(z, list(nf), list(ui), list(fi)) for z, nf, ui, fi in zones])
        for ev, used, zones in d["samples"]
    ]
    return ReplayReport(
        **d, page_size=machine.page_size, buddyinfo=machine.proc.buddyinfo(), slabinfo=machine.proc.slabinfo()
    )
