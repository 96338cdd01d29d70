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
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kmm._kmm import KmemStat as _KmemStat
from kmm._kmm import TraceEvent, TraceLog, TraceParser, parse_perf_data, sniff_trace
from kmm.errors import TraceFormatError
from kmm.recording import Recording, load_dir

__all__ = [
    "SAMPLE",
    "BUNDLE",
    "TraceLog",
    "TraceEvent",
    "Recording",
    "TraceFormatError",
    "KmemStat",
    "SlabSummary",
    "PageSummary",
    "load",
    "parse",
    "stat",
    "replay",
    "ReplayReport",
    "DynRow",
    "TrajPoint",
    "machine_for",
    "FragSample",
    "ZoneFrag",
    "SLAB_SORT_KEYS",
    "PAGE_SORT_KEYS",
]

#: The sample trace shipped with kmm (Linux 6.18, 2 CPUs, 83,084 events).
SAMPLE = Path(__file__).parent / "data" / "sample.perf.txt.xz"

#: The recording bundle shipped with kmm (Linux 6.18 VM, 2 CPUs, 12 s of a
#: copy/compress/compile workload, 2.08M events; perf.data, kallsyms and the
#: /proc state around it): what plain ``kmm`` replays.
BUNDLE = Path(__file__).parent / "data" / "warm2"

#: perf kmem's sort keys (``-s``), slab and page.
SLAB_SORT_KEYS = ("ptr", "callsite", "hit", "bytes", "frag", "pingpong")
PAGE_SORT_KEYS = ("page", "callsite", "hit", "bytes", "order", "migtype", "gfp")

_CHUNK = 1 << 20
#: Width of the report's wrapped notes.
_WIDTH = 100
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

    A directory is read as a recording bundle (``kmm.recording``): the
    result is a :class:`Recording`, which behaves as its trace.
    """
    p = Path(path)
    if p.is_dir():
        return load_dir(p, lenient=lenient, progress=progress)  # type: ignore[return-value]
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
        """Bytes allocated and not freed within the trace."""
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
        """Page allocations the trace does not free."""
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
    trace = trace.trace if isinstance(trace, Recording) else trace
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


def zone_frag(zone: str, nr_free: list[int]) -> ZoneFrag:
    """A zone's indices from its free blocks per order, by mm/vmstat.c's
    ``fill_contig_page_info``, ``unusable_free_index`` and
    ``__fragmentation_index`` (the Rust replay's samples use the same
    formulas, in ``rust/kmm-core/src/trace/replay.rs``)."""
    unusable, frag = [], []
    for order in range(len(nr_free)):
        free_pages = sum(n << o for o, n in enumerate(nr_free))
        total = sum(nr_free)
        suitable = sum(n << (o - order) for o, n in enumerate(nr_free) if o >= order)
        # "No free memory is interpreted as all free memory is unusable".
        unusable.append(1000 if free_pages == 0 else (free_pages - (suitable << order)) * 1000 // free_pages)
        if total == 0:
            frag.append(0)
        elif suitable:
            frag.append(-1000)  # "only makes sense when a request would fail"
        else:
            frag.append(1000 - (1000 + free_pages * 1000 // (1 << order)) // total)
    return ZoneFrag(zone, list(nr_free), unusable, frag)


def _orders(orders: list[int]) -> str:
    """``[3]`` -> "order 3", ``[0, 1, 2]`` -> "orders 0-2"."""
    if len(orders) == 1:
        return f"order {orders[0]}"
    return f"orders {orders[0]}-{orders[-1]}"


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@dataclass(frozen=True)
class DynRow:
    """One figure of the dynamics table: a tracepoint counted in the trace
    (the kernel) and in the replay (kmm's own)."""

    what: str
    tracepoint: str
    kernel: int
    kmm: int
    #: Of ``kmm``, those that fell in stretches where perf lost the kernel's
    #: events on their CPU (the kernel's count cannot include its own there).
    kmm_in_lost: int = 0

    @property
    def ratio(self) -> float | None:
        """kmm / kernel (None when the kernel's count is 0)."""
        return self.kmm / self.kernel if self.kernel else None

    @property
    def ratio_seen(self) -> float | None:
        """kmm outside perf's lost stretches / kernel: the comparison where
        the trace saw everything (None when the kernel's count is 0)."""
        return (self.kmm - self.kmm_in_lost) / self.kernel if self.kernel else None


@dataclass(frozen=True)
class TrajPoint:
    """kmm's state at one sample of samples.txt: per zone (name, kernel
    free pages, kmm free pages, distance)."""

    ts_ns: int
    event: int
    zones: list[tuple[str, int, int, float]]


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
    #: Whether ``free_at_end`` freed everything the replay allocated.
    free_at_end: bool = False
    #: The end state: each populated zone's free blocks and indices, read at
    #: the same moment as ``buddyinfo`` (after the frees with
    #: ``free_at_end``; without it, the same as ``samples[-1].zones``).
    end_zones: list[ZoneFrag] = field(default_factory=list)
    #: How the machine was shaped and started, one sentence each.
    machine_notes: list[str] = field(default_factory=list)
    #: The replay started from the recorded start state (a warm start).
    warm: bool = False
    #: The warm start's targets and what was reached (``Machine.warm_start``).
    warm_start: dict[str, Any] | None = None
    #: Times the kernel's timer work (vmstat_update) ran on the trace's clock.
    timer_runs: int = 0
    #: Simulated time from the first to the last event, ns.
    sim_ns: int = 0
    #: Things to know about this replay, one sentence each.
    warnings: list[str] = field(default_factory=list)
    #: The kernel's allocator-internal events against kmm's own (:class:`DynRow`).
    dynamics: list[DynRow] = field(default_factory=list)
    #: kmm's end state beside the kernel's end.buddyinfo/pagetypeinfo, per zone.
    end_state: list[dict[str, Any]] = field(default_factory=list)
    #: kmm's free pages against each sample of samples.txt (:class:`TrajPoint`).
    trajectory: list[TrajPoint] = field(default_factory=list)
    #: Chunks and events perf lost while recording (the replay could not see them).
    lost_chunks: int = 0
    lost_events: int = 0
    #: Where perf lost events: (cpu, start ns, end ns), each the CPU's longest
    #: silence before its PERF_RECORD_LOST.
    lost_stretches: list[tuple[int, int, int]] = field(default_factory=list)
    #: Page allocations per order the trace used: (order, kernel succeeded,
    #: kernel failed, kmm succeeded, kmm failed), mm_page_alloc on each side.
    page_alloc_orders: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    #: zone->lock acquisitions during the replay, all zones.
    zone_lock_acquisitions: int = 0

    def __getitem__(self, key: str) -> Any:
        """``report["dynamics"]``, ``report["end_state"]``, ``report["trajectory"]``, ...:
        every field by name."""
        if not isinstance(key, str) or key.startswith("_") or key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)

    def mean_trajectory_distance(self, min_free_pages: int = 1000) -> dict[str, float]:
        """Per zone: the mean over samples of the distance, for zones whose
        kernel free pages exceed ``min_free_pages`` in every sample."""
        per: dict[str, list[float]] = {}
        small: set[str] = set()
        for t in self.trajectory:
            for zone, kfree, _kmm, dist in t.zones:
                if kfree <= min_free_pages:
                    small.add(zone)
                per.setdefault(zone, []).append(dist)
        return {z: sum(v) / len(v) for z, v in per.items() if v and z not in small}

    def format(self, slabinfo: bool = False) -> str:
        """A human-readable report (the ``kmm replay`` output)."""
        if self.events == 0:
            return "\n".join(["No events: the trace is empty, nothing was replayed.", "",
                              *self._format_end_state()]) + "\n"
        out = []
        w = out.append
        if self.machine_notes:
            w("Machine:")
            for n in self.machine_notes:
                w(f"  {n}")
            w("")
        if self.warm_start:
            out.extend(self._format_warm())
        for msg in self.warnings:
            w(f"warning: {msg}")
        if self.lost_chunks or self.lost_events:
            w(f"warning: perf lost {self.lost_chunks:,} chunks ({self.lost_events:,} events) while recording: "
              "the replay could not see them, and the kernel's counts below miss them too")
        if self.warnings or self.lost_chunks or self.lost_events:
            w("")
        w(f"Replayed {self.replayed:,} of {self.events:,} events in {self.seconds * 1e3:.1f} ms "
          f"({self.events_per_second / 1e6:.2f} M events/s)"
          + (f", {self.sim_ns / 1e9:.1f} s of the trace's clock, timer work ran {self.timer_runs:,} times"
             if self.sim_ns else ""))
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
        out.extend(self._format_dynamics())
        out.extend(self._format_end_state())
        if slabinfo and self.slabinfo:
            w("")
            w("/proc/slabinfo at the end:")
            out.extend(self.slabinfo.rstrip("\n").splitlines())
        return "\n".join(out) + "\n"

    def _format_warm(self) -> list[str]:
        """The warm start: per zone and order, target free blocks and reached."""
        ws = self.warm_start or {}
        rep = ws.get("report") or {}
        out = ["Warm start (the recorded start state; free blocks per order, all migratetypes: target/reached):"]
        for z in rep.get("zones", []):
            tgt = [sum(v[o] for v in z["target"].values()) for o in range(11)]
            got = [sum(v[o] for v in z["reached"].values()) for o in range(11)]
            if not any(tgt) and not any(got):
                continue
            exact = "exact" if z["target"] == z["reached"] else "short"
            cells = " ".join(f"{t}" if t == g else f"{t}/{g}" for t, g in zip(tgt, got))
            out.append(f"  {z['zone']:<7} {cells}  ({exact} per migratetype)")
            pt, pr = sum(z["pcp_target"]), sum(z["pcp_reached"])
            if pt or pr:
                out.append(f"  {'':<7} pcp pages per CPU: {z['pcp_reached']} of {z['pcp_target']}")
        caches = rep.get("caches", [])
        if caches:
            slabs_t = sum(c[1] for c in caches)
            slabs = sum(c[2] for c in caches)
            act_t = sum(c[3] for c in caches)
            act = sum(c[4] for c in caches)
            out.append(f"  slabs: {slabs:,} of {slabs_t:,} in {len(caches)} caches; objects in use {act:,} of {act_t:,}")
        out.append(f"  pre-trace page blocks the trace frees: {rep.get('allocated', 0):,} placed, "
                   f"{rep.get('allocated_at_traced_pfn', 0):,} of them at their traced pfn"
                   + (f", {rep['allocated_missed']:,} without room" if rep.get("allocated_missed") else ""))
        out.append(f"  pre-trace slabs at their traced pfns: {rep.get('slabs_at_traced_pfn', 0):,}"
                   + (f", moved: {rep['slabs_moved']:,}" if rep.get("slabs_moved") else ""))
        out.append("")
        return out

    def _format_dynamics(self) -> list[str]:
        """The dynamics table, the end state against the kernel's and the trajectory."""
        out: list[str] = []
        w = out.append
        if self.dynamics:
            lost = bool(self.lost_stretches)
            w("kmm's dynamics against the kernel's (tracepoints counted in the trace and in the replay):")
            head = f"  {'':<44} {'kernel':>10} {'kmm':>10} {'kmm/kernel':>11}"
            if lost:
                head += f" {'in lost':>9} {'seen/kernel':>12}"
            w(head)
            for r in self.dynamics:
                ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
                line = f"  {r.what:<44} {r.kernel:>10,} {r.kmm:>10,} {ratio:>11}"
                if lost:
                    seen = f"{r.ratio_seen:.2f}" if r.ratio_seen is not None else "-"
                    line += f" {r.kmm_in_lost:>9,} {seen:>12}"
                w(line)
            if lost:
                span = sum(b - a for _c, a, b in self.lost_stretches) / 1e9
                w(f"  in lost: kmm's events in the {len(self.lost_stretches)} stretches ({span:.2f} s of CPU time) where "
                  f"perf lost {self.lost_events:,} of the kernel's events ({self.lost_chunks} chunks); seen/kernel "
                  "leaves them out. The kernel's counts miss what perf lost, and the replay never saw the lost "
                  "allocations and frees.")
            w("")
        if self.end_state:
            w("End state against the kernel's end.buddyinfo (free blocks per order; distance = "
              "sum over orders |kmm - kernel| free pages / kernel free pages):")
            for z in self.end_state:
                w(f"  {z['zone']:<7} kernel " + " ".join(f"{n:>6}" for n in z["kernel"])
                  + f"   {z['kernel_free_pages']:>9,} pages")
                w(f"  {'':<7} kmm    " + " ".join(f"{n:>6}" for n in z["kmm"])
                  + f"   {z['kmm_free_pages']:>9,} pages   distance {z['distance']:.3f}")
            w("")
        if self.trajectory:
            means = self.mean_trajectory_distance(0)
            first, last = self.trajectory[0].ts_ns, self.trajectory[-1].ts_ns
            w(f"Trajectory: kmm against {len(self.trajectory)} samples of samples.txt "
              f"({first / 1e9:.3f} .. {last / 1e9:.3f} s): mean distance per zone")
            for zone, m in means.items():
                worst = max(d for t in self.trajectory for (zn, _k, _m, d) in t.zones if zn == zone)
                w(f"  {zone:<7} mean {m:.3f}, worst {worst:.3f}")
            w("")
        return out

    def _format_end_state(self) -> list[str]:
        """Memory in use, the fragmentation table and /proc/buddyinfo, all
        of one moment: the end of the trace, or after ``free_at_end``."""
        kb = self.page_size // 1024
        out: list[str] = []
        w = out.append
        if self.free_at_end:
            w("End state, after freeing everything the replay allocated (--free-at-end: its objects, pages and")
            w("per-CPU areas freed, the caches it created destroyed, the others shrunk, the per-CPU lists drained):")
            live = f"{self.live_at_end:,} replayed allocations were live before the frees"
        else:
            w(f"End state, after the last of the {self.events:,} events:" if self.events else "End state:")
            live = f"{self.live_at_end:,} replayed allocations still live"
        w(f"  memory in use: boot {self.boot_used_pages * kb:,} kB, peak {self.peak_used_pages * kb:,} kB, "
          f"end {self.final_used_pages * kb:,} kB ({live})")
        zones = self.end_zones or (self.samples[-1].zones if self.samples else [])
        if zones:
            w("")
            out.extend(self._format_frag(zones))
        over_time = self._format_samples()
        if over_time:
            w("")
            out.extend(over_time)
        if self.buddyinfo:
            w("")
            w("/proc/buddyinfo (the same moment):")
            out.extend(self.buddyinfo.rstrip("\n").splitlines())
        return out

    @staticmethod
    def _format_frag(zones: list[ZoneFrag]) -> list[str]:
        """The kernel's external-fragmentation indices (mm/vmstat.c, as
        /sys/kernel/debug/extfrag/{unusable_index,extfrag_index} print
        them), only where they say something: the unusable index from the
        first order where some zone has free memory it cannot use (below
        it, 0.000 everywhere: the index never falls as the order grows);
        the fragmentation index only for zones where an allocation of a
        shown order would fail (elsewhere it is -1.000, "would succeed",
        at every order). Zones without free memory get one line."""
        out: list[str] = []
        w = out.append
        free = [z for z in zones if any(z.nr_free)]
        empty = [z.zone for z in zones if not any(z.nr_free)]
        w("External fragmentation per order (mm/vmstat.c's indices, as /sys/kernel/debug/extfrag prints them):")
        left: list[str] = []
        failing: list[ZoneFrag] = []
        if free:
            nr_orders = len(free[0].nr_free)
            lo = next((o for o in range(nr_orders) if any(z.unusable_index[o] for z in free)), nr_orders)
            failing = [z for z in free if any(f != -1000 for f in z.fragmentation_index)]
            if lo == nr_orders:
                w(f"  unusable index 0.000 at every order in {_names([z.zone for z in free])}")
            else:
                shown = range(lo, nr_orders)
                w(f"  {'order':<22}" + "".join(f"{o:>7}" for o in shown))
                for z in free:
                    w(f"  {z.zone:<8}{'unusable':<14}" + "".join(f"{_milli(z.unusable_index[o]):>7}" for o in shown))
                    if z in failing:
                        w(f"  {z.zone:<8}{'fragmentation':<14}"
                          + "".join(f"{_milli(z.fragmentation_index[o]):>7}" for o in shown))
                if lo:
                    left.append(f"{_orders(list(range(lo)))} (unusable index 0.000 in every zone)")
            succeed = [z.zone for z in free if z not in failing]
            if succeed:
                left.append(f"the fragmentation index of {_names(succeed)} (-1.000 at every order: "
                            f"an allocation of any order would succeed)")
        for name in empty:
            w(f"  {name:<8}no free pages: every allocation from it fails")
        notes = ["unusable: the share of free memory in blocks smaller than the order (0: all usable, 1: none)."]
        if free and failing:
            notes.append("fragmentation, only where an allocation of the order would fail: towards 0 it fails for lack "
                         "of memory, towards 1 for fragmentation (above order 3, mm/compaction.c compaction_suitable() "
                         "compacts only above vm.extfrag_threshold, 0.500).")
        if left:
            notes.append("Left out: " + "; ".join(left) + ".")
        for note in notes:
            out.extend(textwrap.wrap(note, width=_WIDTH, initial_indent="  ", subsequent_indent="  "))
        return out

    def _format_samples(self) -> list[str]:
        """One line on the samples taken during the replay: the smallest
        largest free block each zone had."""
        if len(self.samples) < 2:
            return []
        worst: dict[str, tuple[int, int, int]] = {}  # zone -> (lowest top order, samples below max, first event)
        for s in self.samples:
            for z in s.zones:
                top = max((o for o, n in enumerate(z.nr_free) if n), default=-1)
                lowest, below, first = worst.get(z.zone, (len(z.nr_free) - 1, 0, -1))
                if top < len(z.nr_free) - 1:
                    below += 1
                    first = s.event if first < 0 else first
                worst[z.zone] = (min(lowest, top), below, first)
        n = len(self.samples)
        hit = [(name, v) for name, v in worst.items() if v[1]]
        if not hit:
            top = len(self.samples[0].zones[0].nr_free) - 1 if self.samples[0].zones else 0
            return [f"During the replay ({n} samples): every zone kept a free order-{top} block at every sample."]
        top = len(self.samples[0].zones[0].nr_free) - 1
        out = [f"During the replay ({n} samples), zones that lost their last free order-{top} block:"]
        for name, (lowest, below, first) in hit:
            low = "no free pages at all" if lowest < 0 else f"largest free block down to order {lowest}"
            out.append(f"  {name:<8}no free order-{top} block at {below} of {n} samples "
                       f"(the first before event {first:,}); {low}")
        return out


def replay(
    trace: TraceLog | Recording,
    machine: Any,
    sample_every: int = 1000,
    free_at_end: bool = False,
    time: bool = True,
) -> ReplayReport:
    """Replay a loaded trace on ``machine``: every allocation and free, in
    order, each on the CPU it ran on (see ``rust/kmm-core/src/trace/replay.rs``
    for what is replayed and what is counted). Runs in Rust with the GIL
    released. ``sample_every``: events between fragmentation samples.
    ``free_at_end``: free everything the replay allocated, destroy the caches
    it created, shrink the others and drain the per-CPU lists; the report's
    end state (``end_zones``, ``buddyinfo``) is then read after the frees.
    An empty trace replays nothing and gives a report with ``events == 0``
    (its ``format()`` says "No events"; the ``kmm`` command refuses such a
    file instead).

    With a :class:`Recording` (``load(DIR)``) on a machine from
    ``rec.machine()``: the replay starts from the recorded start state, and
    the report compares kmm's dynamics (``report["dynamics"]``), end state
    (``report["end_state"]``) and trajectory (``report["trajectory"]``) with
    the kernel's. ``time``: move the machine's clock to each event's
    timestamp so the kernel's timer work runs when it would have."""
    bundle = trace.bundle if isinstance(trace, Recording) else None
    trace = trace.trace if isinstance(trace, Recording) else trace
    if not isinstance(trace, TraceLog):
        raise TypeError(f"expected a TraceLog (kmm.trace.load), not {type(trace).__name__}")
    d = trace.replay(machine, sample_every, free_at_end, bundle, time)
    d["dynamics"] = [DynRow(*r) for r in d["dynamics"]]
    d["trajectory"] = [TrajPoint(ts, ev, [tuple(z) for z in zones]) for ts, ev, zones in d["trajectory"]]
    d["samples"] = [
        FragSample(ev, used, [ZoneFrag(z, list(nf), list(ui), list(fi)) for z, nf, ui, fi in zones])
        for ev, used, zones in d["samples"]
    ]
    # The end state is read in one go, after the frees when free_at_end (the
    # replay's last sample is taken before them).
    end_zones = [zone_frag(z.name, list(z.nr_free)) for z in machine.zones if z.populated]
    return ReplayReport(
        **d, page_size=machine.page_size, buddyinfo=machine.proc.buddyinfo(), slabinfo=machine.proc.slabinfo(),
        free_at_end=free_at_end, end_zones=end_zones, warm_start=machine.warm_start if d["warm"] else None,
        lost_chunks=getattr(trace, "lost_chunks", 0), lost_events=getattr(trace, "lost_events", 0),
    )


def machine_for(trace: TraceLog | Recording, warm: bool = True, **overrides: Any) -> Any:
    """The machine a replay of ``trace`` runs on: for a :class:`Recording`,
    ``trace.machine(warm, **overrides)``; for a bare trace, one sized from
    it (RAM up to the highest pfn it names, the CPUs it ran on), cold.
    ``overrides`` are :class:`kmm.Machine`'s keyword arguments."""
    if isinstance(trace, Recording):
        return trace.machine(warm=warm, **overrides)
    if not isinstance(trace, TraceLog):
        raise TypeError(f"expected a TraceLog or Recording (kmm.trace.load), not {type(trace).__name__}")
    from kmm._kmm import recorded_machine

    m, _info = recorded_machine(trace, None, warm, **overrides)
    return m
