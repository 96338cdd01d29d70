"""``kmm record``: write a recording bundle (DESIGN.md §9) of this machine.

::

    kmm record [-o DIR] [--duration S] [--interval S] [-- COMMAND ...]

1. ``start.NAME.txt``: /proc/NAME for buddyinfo, pagetypeinfo, zoneinfo,
   slabinfo, meminfo and vmstat;
2. ``perf.data``: ``perf record -k CLOCK_MONOTONIC -e
   'kmem:*,percpu:*,vmalloc:*' -a`` running COMMAND (or ``sleep S``), while
   a sampler thread writes ``samples.txt``: every ``--interval`` (0.1 s) a
   line ``@ <CLOCK_MONOTONIC seconds>`` (the clock perf's ``-k`` gives the
   events), /proc/buddyinfo, /proc/pagetypeinfo and the ``pgalloc*``,
   ``pgfree``, ``nr_free*``, ``nr_slab*``, ``compact*``, ``thp_*`` lines
   of /proc/vmstat;
3. ``end.NAME.txt``: the same six files again;
4. ``kallsyms.txt``: /proc/kallsyms (perf.data's call sites are addresses).

``kmm.trace.load(DIR)`` reads the result (``kmm.recording``).

What cannot work is said in one line before anything is written: no
``perf`` (the package to install), ``kernel.perf_event_paranoid`` too high
for an unprivileged user (raw tracepoint samples system-wide need -1, or
CAP_PERFMON: ``perf_allow_tracepoint`` in include/linux/perf_event.h,
``perf_trace_event_perm`` in kernel/trace/trace_event_perf.c), tracefs not
readable (perf reads the tracepoints' formats there), an output directory
that is not empty. A /proc file that cannot be read (pagetypeinfo and
slabinfo are root-only) is left out of the bundle with a warning.

For tests and unusual systems, the paths are injectable: ``KMM_PROC_ROOT``
(instead of /proc), ``KMM_PERF`` (the perf binary), ``KMM_TRACEFS`` (the
tracefs mount), or the parameters of :func:`record`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RecordError", "RecordPaths", "record", "main", "SAMPLE_VMSTAT_PREFIXES", "PROC_FILES", "TRACE_SYSTEMS"]

#: The /proc files of the start and end snapshots.
PROC_FILES = ("buddyinfo", "pagetypeinfo", "zoneinfo", "slabinfo", "meminfo", "vmstat")
#: The tracepoint systems recorded (those the kernel has; kmem is required).
TRACE_SYSTEMS = ("kmem", "percpu", "vmalloc")
#: The /proc/vmstat lines a sample keeps.
SAMPLE_VMSTAT_PREFIXES = ("pgalloc", "pgfree", "nr_free", "nr_slab", "compact", "thp_")

DEFAULT_DURATION = 10.0
DEFAULT_INTERVAL = 0.1
PERF_PACKAGES = "Debian/Ubuntu: linux-perf or linux-tools-$(uname -r); Fedora: perf"

# CAP_SYS_ADMIN and CAP_PERFMON (include/uapi/linux/capability.h).
_CAP_SYS_ADMIN = 21
_CAP_PERFMON = 38


class RecordError(Exception):
    """Why a recording cannot be made, in one line."""


@dataclass
class RecordPaths:
    """Where ``kmm record`` looks: /proc, the perf binary, tracefs."""

    proc: Path = field(default_factory=lambda: Path(os.environ.get("KMM_PROC_ROOT") or "/proc"))
    perf: str | None = field(default_factory=lambda: os.environ.get("KMM_PERF") or shutil.which("perf"))
    tracefs: Path | None = field(default_factory=lambda: _default_tracefs())


def _default_tracefs() -> Path | None:
    env = os.environ.get("KMM_TRACEFS")
    if env:
        return Path(env)
    for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.isdir(p):
            return Path(p)
    return None


def privileged() -> bool:
    """Root, or CAP_PERFMON / CAP_SYS_ADMIN in the effective set (perfmon_capable)."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps & (1 << _CAP_PERFMON) or caps & (1 << _CAP_SYS_ADMIN))
    except (OSError, ValueError, IndexError):
        pass
    return False


def _read(p: Path) -> str:
    with open(p, encoding="utf-8", errors="replace") as f:
        return f.read()


def _isdir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:  # EACCES on a parent
        return False


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def preflight(out: Path, paths: RecordPaths, is_privileged: bool | None = None) -> tuple[list[str], list[str]]:
    """Check that a recording can work; return (tracepoint systems, warnings).
    Raises :class:`RecordError` with one line saying what to do."""
    warnings: list[str] = []
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "exists and is not a directory"
        raise RecordError(f"{out} {what}: choose another -o DIR or remove it")
    perf = paths.perf
    if not perf or not (os.path.isfile(perf) and os.access(perf, os.X_OK)):
        where = f" (KMM_PERF={perf} is not an executable)" if perf else ""
        raise RecordError(f"perf not found{where}: install it ({PERF_PACKAGES}), or set KMM_PERF to its path")
    if not (paths.proc / "buddyinfo").is_file():
        raise RecordError(f"{paths.proc}/buddyinfo not found: kmm record needs Linux's /proc")
    if is_privileged is None:
        is_privileged = privileged()
    if not is_privileged:
        pfile = paths.proc / "sys/kernel/perf_event_paranoid"
        try:
            paranoid = int(_read(pfile).strip())
        except (OSError, ValueError):
            paranoid = 2  # the kernel's default when unreadable
        if paranoid > -1:
            raise RecordError(
                f"kernel.perf_event_paranoid is {paranoid}: recording kernel tracepoints system-wide needs root "
                "(sudo kmm record ...), CAP_PERFMON, or `sudo sysctl kernel.perf_event_paranoid=-1`"
            )
    # perf reads the tracepoints' formats in tracefs, and mounts it itself
    # when it is not mounted and it may (tools/lib/api/fs/tracing_path.c).
    tfs = paths.tracefs
    if tfs is not None and _isdir(tfs) and not os.access(tfs, os.R_OK | os.X_OK):
        raise RecordError(f"cannot read {tfs} (tracefs), where perf finds the tracepoints: run as root (sudo kmm record ...)")
    events = tfs / "events" if tfs is not None else None
    if events is None or not _isdir(events):
        if not is_privileged:
            where = f"at {tfs}" if tfs is not None else "(no /sys/kernel/tracing)"
            raise RecordError(
                f"tracefs is not mounted {where}: `sudo mount -t tracefs nodev /sys/kernel/tracing`, or run as root"
            )
        return list(TRACE_SYSTEMS), warnings  # perf mounts it; it says if a system is missing
    if not os.access(events, os.R_OK | os.X_OK):
        raise RecordError(f"cannot read {events} (tracefs), where perf finds the tracepoints: run as root (sudo kmm record ...)")
    systems = [s for s in TRACE_SYSTEMS if _isdir(events / s)]
    if "kmem" not in systems:
        raise RecordError(f"{events}/kmem not found: this kernel has no kmem tracepoints (CONFIG_TRACEPOINTS)")
    for s in TRACE_SYSTEMS:
        if s not in systems:
            warnings.append(f"this kernel has no {s}:* tracepoints ({events}/{s}): recorded without them")
    return systems, warnings


def _snapshot(proc: Path, out: Path, when: str, warn: Callable[[str], None]) -> int:
    """Copy the six /proc files to ``out/when.NAME.txt``; return how many were written."""
    n = 0
    for name in PROC_FILES:
        try:
            text = _read(proc / name)
        except OSError as e:
            warn(f"cannot read {proc / name} ({_why(e)}): the bundle has no {when}.{name}.txt")
            continue
        (out / f"{when}.{name}.txt").write_text(text)
        n += 1
    return n


class _Sampler(threading.Thread):
    """Writes samples.txt every ``interval`` seconds until stopped, then once more."""

    def __init__(self, proc: Path, path: Path, interval: float, warn: Callable[[str], None]):
        super().__init__(name="kmm-record-sampler", daemon=True)
        self.proc, self.path, self.interval, self.warn = proc, path, interval, warn
        self.stopping = threading.Event()
        self.samples = 0
        self.pagetypeinfo = True
        self.error: BaseException | None = None

    def sample(self, f) -> None:  # type: ignore[no-untyped-def]
        ts = time.clock_gettime(time.CLOCK_MONOTONIC)
        parts = [f"@ {ts:.6f}\n"]
        try:
            parts.append(_read(self.proc / "buddyinfo"))
        except OSError as e:
            self.warn(f"cannot read {self.proc / 'buddyinfo'} ({_why(e)}): sampling stopped")
            raise
        if self.pagetypeinfo:
            try:
                pt = _read(self.proc / "pagetypeinfo")
                parts.append(pt if pt.endswith("\n") else pt + "\n")
            except OSError as e:
                self.pagetypeinfo = False
                self.warn(f"cannot read {self.proc / 'pagetypeinfo'} ({_why(e)}): samples.txt has no pagetypeinfo")
        try:
            vm = _read(self.proc / "vmstat")
        except OSError:
            vm = ""
        parts.extend(line + "\n" for line in vm.splitlines() if line.startswith(SAMPLE_VMSTAT_PREFIXES))
        f.write("".join(parts))
        f.flush()
        self.samples += 1

    def run(self) -> None:
        try:
            with open(self.path, "w") as f:
                due = time.monotonic()
                while not self.stopping.is_set():
                    self.sample(f)
                    due += self.interval
                    delay = due - time.monotonic()
                    if delay < 0:
                        due, delay = time.monotonic(), 0.0
                    self.stopping.wait(delay)
                self.sample(f)
        except OSError as e:
            self.error = e


def _copy_kallsyms(proc: Path, out: Path, warn: Callable[[str], None]) -> bool:
    src = proc / "kallsyms"
    try:
        with open(src, "rb") as fi, open(out / "kallsyms.txt", "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
    except OSError as e:
        warn(f"cannot read {src} ({_why(e)}): the bundle has no kallsyms.txt (call sites stay addresses)")
        return False
    with open(out / "kallsyms.txt", "rb") as f:
        head = [line.split(b" ", 1)[0] for line in f.read(1 << 16).splitlines()[:-1]]
    if head and all(a.strip(b"0") == b"" for a in head):
        warn(
            "kallsyms addresses read as zero (kernel.kptr_restrict, or not root): perf.data's call sites "
            "cannot be named; record as root, or `sudo sysctl kernel.kptr_restrict=0`"
        )
    return True


def _perf_error(lines: list[str]) -> str:
    """perf's reason, from its last stderr lines: the first line naming an
    error (with the line after a bare "Error:"), else the last line."""
    lines = [x.strip() for x in lines if x.strip()]
    for i, x in enumerate(lines):
        if "error" in x.lower():
            if x.rstrip(":").lower() == "error" and i + 1 < len(lines):
                return lines[i + 1]
            return " ".join(x.split())
    return lines[-1] if lines else ""


def _relay(stream, sink, tail: deque[str]) -> None:  # type: ignore[no-untyped-def]
    """Copy perf's stderr (and the workload's) to ours, keeping its last lines."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        tail.append(line.rstrip("\n"))
        try:
            sink.write(line)
            sink.flush()
        except (OSError, ValueError):
            pass


def record(
    out: str | os.PathLike[str],
    command: Sequence[str] = (),
    duration: float = DEFAULT_DURATION,
    interval: float = DEFAULT_INTERVAL,
    paths: RecordPaths | None = None,
    is_privileged: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Record a bundle into ``out`` (see the module docstring); return its path.

    ``command``: run under perf (default: ``sleep duration``). ``log``:
    where warnings and progress go (default: stderr, prefixed ``kmm:``).
    Raises :class:`RecordError` when the recording cannot be made.
    """
    paths = paths or RecordPaths()
    out = Path(out)
    emit = log or (lambda s: print(f"kmm: {s}", file=sys.stderr, flush=True))
    if not duration > 0 and not command:
        raise RecordError(f"--duration must be positive, not {duration}")
    if not interval > 0:
        raise RecordError(f"--interval must be positive, not {interval}")
    systems, warnings = preflight(out, paths, is_privileged)
    for w in warnings:
        emit(f"warning: {w}")
    warn = lambda s: emit(f"warning: {s}")  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)

    n_start = _snapshot(paths.proc, out, "start", warn)
    workload = list(command) if command else ["sleep", f"{duration:g}"]
    perf_data = out / "perf.data"
    cmd = [
        str(paths.perf), "record", "-k", "CLOCK_MONOTONIC",
        "-e", ",".join(f"{s}:*" for s in systems), "-a", "-o", str(perf_data), "--", *workload,
    ]  # fmt: skip
    emit(f"recording {' '.join(workload)} into {out} ...")
    sampler = _Sampler(paths.proc, out / "samples.txt", interval, warn)
    sampler.start()
    tail: deque[str] = deque(maxlen=40)
    try:
        p = subprocess.Popen(cmd, stderr=subprocess.PIPE)  # the workload keeps our stdin and stdout
    except OSError as e:
        sampler.stopping.set()
        sampler.join()
        raise RecordError(f"cannot run {paths.perf}: {_why(e)}") from None
    relay = threading.Thread(target=_relay, args=(p.stderr, sys.stderr, tail), daemon=True)
    relay.start()
    try:
        while True:
            try:
                rc = p.wait()
                break
            except KeyboardInterrupt:
                # Ctrl-C reached perf too (same process group): it stops and
                # writes perf.data; wait for it, then finish the bundle.
                emit("interrupted: finishing the bundle")
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
    finally:
        sampler.stopping.set()
        sampler.join()
        relay.join(timeout=5)
    if sampler.error is not None:
        warn(f"samples.txt: {sampler.error}")
    n_end = _snapshot(paths.proc, out, "end", warn)
    kallsyms = _copy_kallsyms(paths.proc, out, warn)
    if not perf_data.is_file() or perf_data.stat().st_size == 0:
        why = _perf_error(list(tail))
        raise RecordError(f"perf record failed (exit status {rc}){': ' + why if why else ''}; {out} has no perf.data")
    if rc != 0:
        warn(f"perf record exited with status {rc} (the command's failure, or perf's); perf.data was written")
    size = perf_data.stat().st_size
    emit(
        f"wrote {out}: perf.data ({size / 1e6:.1f} MB), {n_start}+{n_end} /proc snapshots, "
        f"samples.txt ({sampler.samples} samples){', kallsyms.txt' if kallsyms else ''}. "
        f"Read it with kmm.trace.load({str(out)!r}) or `kmm replay {out}`"
    )
    return out


def default_out() -> Path:
    return Path(time.strftime("kmm-recording-%Y%m%d-%H%M%S"))


def main(a) -> int:  # type: ignore[no-untyped-def]
    """The ``kmm record`` subcommand (``a``: its parsed arguments)."""
    try:
        record(a.output or default_out(), a.command, a.duration, a.interval)
    except RecordError as e:
        print(f"kmm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kmm: interrupted", file=sys.stderr)
        return 130
    return 0
