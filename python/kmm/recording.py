"""Recording bundles (DESIGN.md §9): a kernel trace with the /proc state
around it, in one directory.

::

    DIR/perf.data          perf record -k CLOCK_MONOTONIC -e 'kmem:*,percpu:*,vmalloc:*' -a
    DIR/perf.txt           perf script's text (beside or instead of perf.data)
    DIR/start.NAME.txt     /proc/NAME before: buddyinfo pagetypeinfo zoneinfo slabinfo meminfo vmstat
    DIR/end.NAME.txt       the same after
    DIR/samples.txt        "@ <CLOCK_MONOTONIC s>", buddyinfo, pagetypeinfo, vmstat lines, every ~100 ms
    DIR/kallsyms.txt       /proc/kallsyms of the same boot

Every file but the trace is optional and any file may be ``.xz`` or
``.gz``. ``kmm record`` writes a bundle; ``kmm.trace.load(DIR)`` reads one:

>>> rec = kmm.trace.load("warm2/")                      # doctest: +SKIP
>>> rec.start["zoneinfo"]["zones"][2]["managed"]        # doctest: +SKIP
2064384
>>> kmm.trace.stat(rec)                                 # a Recording works where a TraceLog does

Bad files never stop a load: a malformed, unreadable or mismatched /proc
file is a warning (``rec.warnings``) naming the file and the line, and the
file is treated as missing. Only the trace itself is required. The parsing
and the checks live in Rust (``rust/kmm-core/src/trace/{procfs,bundle}.rs``).
"""

from __future__ import annotations

import gzip
import inspect
import lzma
import os
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kmm._kmm import Bundle, TraceLog, parse_proc
from kmm.errors import TraceFormatError

__all__ = ["Recording", "load_dir", "parse_proc", "PROC_FILES", "TRACE_FILES", "SUFFIXES"]

#: The /proc files of a snapshot (``start.NAME.txt``, ``end.NAME.txt``).
PROC_FILES = ("buddyinfo", "pagetypeinfo", "zoneinfo", "slabinfo", "meminfo", "vmstat")
#: The trace, in order of preference.
TRACE_FILES = ("perf.data", "perf.txt")
#: Any bundle file may be compressed.
SUFFIXES = ("", ".xz", ".gz")

#: A /proc file larger than this once decompressed is not read (a hostile
#: or mistaken file must not exhaust memory; real ones are kilobytes,
#: samples.txt ~4 KB per sample).
MAX_PROC_BYTES = 256 << 20

_OTHER_FILES = ("kallsyms.txt", "samples.txt", *(f"{w}.{n}.txt" for w in ("start", "end") for n in PROC_FILES))


def _freeze(v: Any) -> Any:
    """Read-only view of plain data: dicts become mappingproxies, lists tuples."""
    if isinstance(v, dict):
        return MappingProxyType({k: _freeze(x) for k, x in v.items()})
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def _read_text(path: Path, cap: int = MAX_PROC_BYTES) -> str:
    """A bundle text file, decompressed by its magic (gzip, xz) and decoded
    as UTF-8 (bad bytes become U+FFFD, so a parser reports the line)."""
    with open(path, "rb") as raw:
        magic = raw.read(6)
        raw.seek(0)
        f: Any
        if magic[:2] == b"\x1f\x8b":
            f = gzip.GzipFile(fileobj=raw)
        elif magic == b"\xfd7zXZ\x00":
            f = lzma.LZMAFile(raw)
        else:
            f = raw
        data = f.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"larger than {cap >> 20} MiB")
    return data.decode("utf-8", errors="replace")


def _find(d: Path, name: str, warnings: list[str]) -> Path | None:
    """``d/name`` plain, .xz or .gz (the first found; others are named in a warning)."""
    found = [d / (name + s) for s in SUFFIXES if (d / (name + s)).is_file()]
    for other in found[1:]:
        warnings.append(f"{other.name}: {found[0].name} is read instead; ignored")
    return found[0] if found else None


def _perf_data_supported(load: Any) -> bool:
    # Seam until the perf.data decoder is merged: it adds a ``kallsyms``
    # keyword to kmm.trace.load. Without it a perf.data cannot be read.
    try:
        return "kallsyms" in inspect.signature(load).parameters
    except (TypeError, ValueError):
        return False


class Recording:
    """A loaded recording bundle: its trace and its /proc files.

    It behaves as its trace wherever a :class:`TraceLog` is taken
    (``len(rec)``, ``rec[i]``, ``rec.counts()``, ``kmm.trace.stat(rec)``,
    ``kmm.trace.replay(rec, m)``).

    - ``path``: the bundle directory; ``files``: which files were found
      (name without the compression suffix -> path); ``kallsyms``: the
      kallsyms file, or None.
    - ``trace``: the :class:`TraceLog`; ``bundle``: the :class:`kmm._kmm.Bundle`.
    - ``start`` / ``end``: read-only views of the /proc snapshots, by file
      name (``"buddyinfo"``, ``"pagetypeinfo"``, ``"zoneinfo"``,
      ``"slabinfo"``, ``"meminfo"``, ``"vmstat"``), None where missing;
      ``samples``: the samples of samples.txt (``ts_ns`` on the trace's
      clock, ``buddyinfo``, ``pagetypeinfo``, ``vmstat``).
    - ``warnings``: every file ignored and every misfit found, one
      sentence each, naming the file.
    """

    def __init__(
        self,
        path: Path,
        trace: TraceLog,
        bundle: Bundle,
        files: Mapping[str, Path],
        kallsyms: Path | None = None,
        warnings: list[str] | None = None,
    ):
        self.path = Path(path)
        self.trace = trace
        self.bundle = bundle
        self.files: Mapping[str, Path] = MappingProxyType(dict(files))
        self.kallsyms = kallsyms
        self.warnings: tuple[str, ...] = tuple(warnings or ())

    @cached_property
    def start(self) -> Mapping[str, Any]:
        """The /proc files read just before the recording (read-only)."""
        return _freeze(self.bundle.start)  # type: ignore[no-any-return]

    @cached_property
    def end(self) -> Mapping[str, Any]:
        """The /proc files read just after the recording (read-only)."""
        return _freeze(self.bundle.end)  # type: ignore[no-any-return]

    @cached_property
    def samples(self) -> tuple[Mapping[str, Any], ...]:
        """samples.txt, in file order (read-only)."""
        return _freeze(self.bundle.samples)  # type: ignore[no-any-return]

    # ---- Recording.machine(warm=True) -------------------------------------

    def machine(self, warm: bool = True, **overrides: Any) -> Any:
        """A :class:`kmm.Machine` shaped like the recorded one: the zones of
        start.zoneinfo (spanned, present and managed pages; present minus
        managed is reserved), its CPUs, its watermarks, ``protection`` and
        pageset sizes, and the caches of start.slabinfo with their geometry.
        With ``warm`` (the default) it is brought to the recorded start
        state before the first event: per zone, order and migratetype the
        free blocks of start.pagetypeinfo, each CPU's pcp lists as the
        pagesets show them, the caches' slabs and objects in use, and the
        pages and objects the trace frees before allocating them at their
        traced places (``m.warm_start`` says how exactly).

        ``overrides`` are :class:`kmm.Machine` keyword arguments (``cpus``,
        ``min_free_kbytes``, ``watermark_scale_factor``, ``seed``, ...);
        ``memory`` replaces the recorded zones with a machine of that size.
        """
        from kmm._kmm import recorded_machine

        m, info = recorded_machine(self.trace, self.bundle, warm, **overrides)
        self.machine_info = info
        return m

    # ---- the trace's face --------------------------------------------------

    def __len__(self) -> int:
        return len(self.trace)

    def __getitem__(self, i: int) -> Any:
        return self.trace[i]

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self.trace)):
            yield self.trace[i]

    def __getattr__(self, name: str) -> Any:
        # Only reached for names Recording lacks: the TraceLog's (counts,
        # lost_events, skipped, ...). Guarded so a half-built object
        # (copy, pickle) does not recurse.
        if name.startswith("__") or name in ("trace", "bundle", "path"):
            raise AttributeError(name)
        return getattr(self.trace, name)

    def __repr__(self) -> str:
        return (
            f"<Recording {str(self.path)!r}: {len(self.trace):,} events, "
            f"{len(self.files)} files, {self.bundle.nr_samples} samples, {len(self.warnings)} warnings>"
        )


def load_dir(path: str | os.PathLike[str], lenient: bool = False, progress: bool | None = None) -> Recording:
    """Read a recording bundle directory (see the module docstring).

    The trace is ``perf.data`` if present (decoded with the bundle's
    kallsyms), else ``perf.txt``; each plain, .xz or .gz. ``lenient`` and
    ``progress`` are :func:`kmm.trace.load`'s. Raises ``FileNotFoundError``
    naming the directory when it holds no trace, and what ``load`` raises
    for a broken trace; everything else becomes a warning.
    """
    from kmm import trace as _trace

    d = Path(path)
    warnings: list[str] = []
    files: dict[str, Path] = {}
    for name in (*TRACE_FILES, *_OTHER_FILES):
        p = _find(d, name, warnings)
        if p is not None:
            files[name] = p
    if not any(n in files for n in TRACE_FILES):
        names = ", ".join(n + s for n in TRACE_FILES for s in SUFFIXES)
        raise FileNotFoundError(
            2,
            f"not a recording bundle: no trace in this directory (one of {names}); "
            f"record one with `kmm record -o {d}`",
            str(d),
        )
    kallsyms = files.get("kallsyms.txt")

    tr: TraceLog | None = None
    pd, pt = files.get("perf.data"), files.get("perf.txt")
    if pd is not None:
        if _perf_data_supported(_trace.load):
            try:
                tr = _trace.load(pd, lenient=lenient, progress=progress, kallsyms=kallsyms)  # type: ignore[call-arg]
            except (ValueError, OSError, EOFError, lzma.LZMAError) as e:  # TraceFormatError is a ValueError
                if pt is None:
                    raise
                warnings.append(f"{pd.name}: {e}; {pt.name} is read instead")
        elif pt is not None:
            warnings.append(f"{pd.name}: this kmm cannot decode perf.data; {pt.name} is read instead")
        else:
            hint = f"perf script -i {pd} > {d / 'perf.txt'}"
            raise TraceFormatError(f"{pd}: this kmm cannot decode perf.data; convert it to text with `{hint}`")
    if tr is None:
        assert pt is not None
        tr = _trace.load(pt, lenient=lenient, progress=progress)

    texts: list[tuple[str, str]] = []
    for name in _OTHER_FILES:
        p = files.get(name)
        if p is None or name == "kallsyms.txt":
            continue
        try:
            texts.append((p.name, _read_text(p)))
        except (OSError, EOFError, lzma.LZMAError, ValueError) as e:  # gzip.BadGzipFile is an OSError
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            warnings.append(f"{p.name}: cannot be read ({why}); ignored")
    bundle = Bundle(texts)
    warnings.extend(bundle.warnings)
    warnings.extend(bundle.check_trace(tr))
    return Recording(d, tr, bundle, files, kallsyms, warnings)
