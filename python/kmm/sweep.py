"""Sweeps: a grid of what-if replays (recordings x settings x seeds).

``kmm sweep REC... --set "SETTINGS" [--set ...] [--seeds K] [-j N]
[-o OUT.csv] [--cluster tcp://HOST:PORT]`` and :func:`sweep` replay every
recording under every setting (``kmm.settings`` syntax; "" is the default
machine) with seeds 0..K-1. Each combination is an independent run of
:func:`kmm.compare.run`: the machine shaped and warmed as the recording
says, the settings applied, the trace replayed, the figures measured.

- Runs go to ``jobs`` worker processes (``spawn``: no fork of a process
  that holds Rust threads); ``jobs=1`` runs them in this process. With
  ``cluster`` (a Dask scheduler address; the ``linux-kmm[cluster]`` extra)
  they go to the cluster's workers instead, one task per run.
- Each finished run is a row of the output CSV at once (recording,
  settings, seed, status, error, seconds, events, then every figure of
  :data:`kmm.compare.FIGURES`), so a sweep stopped half way keeps what it
  did; a rerun with the same output skips the runs already done (status
  ``ok``) and retries the failed ones. With pyarrow installed, the rows are
  also written as Parquet next to the CSV at the end.
- A run that fails (a setting the kernel refuses on this machine, a broken
  recording, a worker that died) is a row with status ``failed`` and its
  error; the sweep goes on.
- At the end: a summary table (per settings, the mean of each figure over
  recordings and seeds, and its change from the first settings, mmtests
  style) and, on request, a plot.

Every setting is checked before any run starts (ValueError naming it).

SIMPLIFICATION: cluster workers open the recordings by path: the paths
must be readable on the workers (a shared filesystem, or a local cluster).
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import kmm
from kmm import compare as _compare
from kmm import settings as _settings

__all__ = ["Job", "SweepResult", "COLUMNS", "grid", "load_grid", "run_job", "sweep", "summary", "plot"]

#: Identity of a run, in the CSV's first columns.
KEY = ("recording", "settings", "seed")
#: Every column of the output, in order.
COLUMNS: tuple[str, ...] = (*KEY, "status", "error", "seconds", "events", *_compare.FIGURES)

#: Seconds to wait for a Dask scheduler before giving up.
CONNECT_TIMEOUT = 10

#: The figures the summary table and the plot show by default.
SUMMARY_FIGURES = (
    "peak_used_mib", "slab_mib", "slab_loss_mib", "thp_success_pct", "fallbacks", "mt_mismatches",
    "extfrag_below_pageblock", "mixed_blocks", "unusable_index_mean", "pcp_refills", "pcp_drains", "pcp_high",
    "zone_lock",
)


@dataclass(frozen=True)
class Job:
    """One run of a sweep."""

    recording: str
    settings: str
    seed: int

    def key(self) -> tuple[str, str, str]:
        return (self.recording, self.settings, str(self.seed))


@dataclass
class SweepResult:
    """Every row of a sweep (those found in the output included), and how
    many runs this call did and skipped."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    ran: int = 0
    skipped: int = 0
    output: Path | None = None
    parquet: Path | None = None

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "ok"]

    def summary(self, figures: Sequence[str] = SUMMARY_FIGURES) -> str:
        return summary(self.rows, figures)


def _recording_name(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.fspath(path))


def grid(recordings: Iterable[str | os.PathLike[str]], settings: Sequence[str], seeds: int = 1) -> list[Job]:
    """Every (recording, settings, seed) combination, recordings outermost.
    Checks every setting first (ValueError naming it), and that ``seeds``
    is at least 1."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, not {seeds!r}")
    settings = list(settings) or [""]
    for s in settings:
        if not isinstance(s, str):
            raise TypeError(f"a setting is a str such as 'vm.watermark_scale_factor=200', not {type(s).__name__}")
        boot, sysctl = _settings.split(s)
        kmm._kmm.check_settings(boot, sysctl)
    if len(set(settings)) != len(settings):
        dup = next(s for s in settings if settings.count(s) > 1)
        raise ValueError(f"settings {dup!r} given twice")
    recs = [_recording_name(r) for r in recordings]
    if not recs:
        raise ValueError("a sweep needs at least one recording")
    return [Job(r, s, seed) for r in recs for s in settings for seed in range(seeds)]


def load_grid(path: str | os.PathLike[str]) -> tuple[list[str], list[str], int]:
    """A grid from a TOML file: ``recordings = [...]`` (paths relative to
    the file), ``settings = [...]``, ``seeds = K`` (default 1)."""
    import tomllib

    p = Path(path)
    try:
        with open(p, "rb") as f:
            d = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: {e}") from None
    unknown = set(d) - {"recordings", "settings", "seeds"}
    if unknown:
        raise ValueError(f"{p}: unknown key(s) {', '.join(sorted(unknown))} (a grid has recordings, settings, seeds)")
    recs = d.get("recordings", [])
    sets = d.get("settings", [""])
    seeds = d.get("seeds", 1)
    if not isinstance(recs, list) or not all(isinstance(r, str) for r in recs):
        raise ValueError(f"{p}: recordings must be a list of paths")
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise ValueError(f"{p}: settings must be a list of strings")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"{p}: seeds must be an integer >= 1, not {seeds!r}")
    return [str((p.parent / r) if not os.path.isabs(r) else r) for r in recs], sets, seeds


# ---- one run (in a worker) ------------------------------------------------------------------

#: Recordings this process has loaded, by path: a worker reads each once.
_LOADED: dict[str, Any] = {}


def _load(path: str) -> Any:
    t = _LOADED.get(path)
    if t is None:
        t = kmm.trace.load(path)
        if len(_LOADED) >= 4:  # a worker holds a few recordings at most
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[path] = t
    return t


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def run_job(job: Job, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one job and return its row; never raises for a failed run (the
    row says status ``failed`` and the error). ``options``: keyword
    arguments of :func:`kmm.compare.run` (warm, time, sample_every, probe,
    and Machine overrides)."""
    row: dict[str, Any] = {"recording": job.recording, "settings": job.settings, "seed": job.seed}
    t0 = time.perf_counter()
    try:
        t = _load(job.recording)
        r = _compare.run(t, job.settings, seed=job.seed, **dict(options or {}))
        row.update(status="ok", error="", events=r.report.events)
        row.update(r.figures)
    except Exception as e:  # a failed run is a row, not the end of the sweep
        row.update(status="failed", error=_one_line(e), events="")
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


# ---- the output -----------------------------------------------------------------------------


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        missing = [k for k in (*KEY, "status") if k not in (r.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a kmm sweep output (no {', '.join(missing)} column)")
        return [dict(row) for row in r]


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    return (str(row["recording"]), str(row["settings"]), str(row["seed"]))


class _Writer:
    """The CSV, rewritten once at the start with the rows kept, then one row
    appended (and flushed) per finished run."""

    def __init__(self, path: Path | None, kept: list[dict[str, Any]]):
        self.f = None
        if path is None:
            return
        if path.parent != Path("") and not path.parent.exists():
            raise FileNotFoundError(2, "No such file or directory", str(path.parent))
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(kept)
        os.replace(tmp, path)
        self.f = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=COLUMNS, extrasaction="ignore")

    def add(self, row: dict[str, Any]) -> None:
        if self.f is not None:
            self.w.writerow(row)
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    cols: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    for r in rows:
        for c in COLUMNS:
            v = r.get(c, "")
            if c in _compare.FIGURES or c in ("seconds", "events"):
                v = float(v) if v not in ("", None) else None
            elif c == "seed":
                v = int(v)
            else:
                v = str(v)
            cols[c].append(v)
    out = path.with_suffix(".parquet")
    pq.write_table(pa.table(cols), out)
    return out


# ---- progress ---------------------------------------------------------------------------------


class _Bar:
    """Progress on stderr: a bar rewritten in place on a terminal, a line
    per finished run otherwise."""

    def __init__(self, total: int, enabled: bool | None, stream: Any = None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.tty if enabled is None else enabled
        self.total, self.done, self.failed = total, 0, 0
        self.t0 = time.monotonic()

    def update(self, row: dict[str, Any]) -> None:
        self.done += 1
        self.failed += row["status"] != "ok"
        if not self.enabled:
            return
        el = time.monotonic() - self.t0
        left = el / self.done * (self.total - self.done)
        pct = self.done * 100 // max(self.total, 1)
        bar = "#" * (pct // 5)
        what = f"{self.done}/{self.total} runs, {self.failed} failed, {el:.0f} s, ~{left:.0f} s left"
        if self.tty:
            self.stream.write(f"\rkmm sweep [{bar:<20}] {pct:3d}% {what}")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            tag = "ok" if row["status"] == "ok" else f"FAILED: {row['error']}"
            self.stream.write(f"kmm sweep: {what}: {Path(row['recording']).name} "
                              f"{row['settings'] or '(default)'!r} seed {row['seed']}: {tag}\n")
        self.stream.flush()


# ---- running the grid -----------------------------------------------------------------------


def _pool_runs(todo: list[Job], options: dict[str, Any], jobs: int, done: Callable[[dict[str, Any]], None]) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp

    pending = list(todo)
    while pending:
        ex = cf.ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=mp.get_context("spawn"))
        futs = {ex.submit(run_job, j, options): j for j in pending}
        pending = []
        reported: set[Any] = set()
        try:
            for fut in cf.as_completed(futs):
                j = futs[fut]
                reported.add(fut)
                try:
                    row = fut.result()
                except cf.process.BrokenProcessPool:
                    # A worker died (killed, out of memory). Which run it held
                    # is not known: this one is counted failed, the others
                    # not yet reported go to a fresh pool (so the sweep ends
                    # even if a run kills every worker it gets).
                    done({"recording": j.recording, "settings": j.settings, "seed": j.seed, "status": "failed",
                          "error": "a worker process died while this run was in flight", "seconds": "",
                          "events": ""})
                    pending = [x for f, x in futs.items() if f not in reported]
                    break
                done(row)
        finally:
            ex.shutdown(wait=True, cancel_futures=True)


def _connect(address: str) -> Any:
    try:
        from distributed import Client
    except ImportError:
        raise RuntimeError("--cluster needs Dask's distributed scheduler: pip install 'linux-kmm[cluster]'") from None
    if "://" not in address:
        raise ValueError(f"cluster address {address!r}: expected a scheduler address such as tcp://HOST:PORT")
    try:
        return Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except Exception as e:
        raise ConnectionError(f"cannot reach the Dask scheduler at {address}: {_one_line(e)}") from None


def _cluster_runs(todo: list[Job], options: dict[str, Any], client: Any,
                  done: Callable[[dict[str, Any]], None]) -> None:
    from distributed import as_completed

    try:
        futs = {client.submit(run_job, j, options, pure=False, key=f"kmm-sweep-{i}-{os.getpid()}-{time.time_ns()}"): j
                for i, j in enumerate(todo)}
        for fut in as_completed(list(futs), loop=client.loop):
            j = futs[fut]
            try:
                done(fut.result())
            except Exception as e:  # the task died with its worker
                done({"recording": j.recording, "settings": j.settings, "seed": j.seed, "status": "failed",
                      "error": f"on the cluster: {_one_line(e)}", "seconds": "", "events": ""})
    finally:
        client.close()


def sweep(
    recordings: Iterable[str | os.PathLike[str]],
    settings: Sequence[str],
    seeds: int = 1,
    jobs: int | None = None,
    output: str | os.PathLike[str] | None = None,
    cluster: str | None = None,
    progress: bool | None = None,
    **options: Any,
) -> SweepResult:
    """Run the grid; see the module docstring. ``jobs``: worker processes
    (default: the host's CPUs; 1 runs in this process); ``output``: the CSV
    (resumed when it exists); ``cluster``: a Dask scheduler address;
    ``progress``: the progress display (None: a bar when stderr is a
    terminal); ``options``: as :func:`kmm.compare.run` (warm, time,
    sample_every, probe, and Machine keyword arguments for every run)."""
    work = grid(recordings, settings, seeds)
    if jobs is None:
        jobs = os.cpu_count() or 1
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, not {jobs!r}")
    if cluster is not None and not isinstance(cluster, str):
        raise TypeError("cluster is a scheduler address such as 'tcp://127.0.0.1:8786'")
    out = Path(output) if output is not None else None
    previous = _read_rows(out) if out is not None else []
    wanted = {j.key() for j in work}
    kept = [r for r in previous if r["status"] == "ok"]
    done_keys = {_key(r) for r in kept}
    todo = [j for j in work if j.key() not in done_keys]
    res = SweepResult(rows=list(kept), skipped=sum(_key(r) in wanted for r in kept), output=out)
    client = _connect(cluster) if cluster is not None and todo else None
    try:
        writer = _Writer(out, kept)
    except BaseException:
        if client is not None:
            client.close()
        raise
    bar = _Bar(len(todo), progress)

    def done(row: dict[str, Any]) -> None:
        writer.add(row)
        res.rows.append(row)
        res.ran += 1
        bar.update(row)

    try:
        if not todo:
            pass
        elif client is not None:
            _cluster_runs(todo, options, client, done)
        elif jobs == 1 or len(todo) == 1:
            for j in todo:
                done(run_job(j, options))
        else:
            _pool_runs(todo, options, jobs, done)
    finally:
        writer.close()
    if out is not None:
        res.parquet = _write_parquet(res.rows, out)
    return res


# ---- summary and plot -----------------------------------------------------------------------


def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _by_settings(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r["settings"]), []).append(r)
    return groups


def means(rows: list[dict[str, Any]], figures: Sequence[str] = SUMMARY_FIGURES) -> dict[str, dict[str, float]]:
    """Per settings: the mean of each figure over its successful runs."""
    out: dict[str, dict[str, float]] = {}
    for s, rs in _by_settings(rows).items():
        ok = [r for r in rs if r["status"] == "ok"]
        m: dict[str, float] = {}
        for f in figures:
            vals = [v for v in (_num(r.get(f)) for r in ok) if v is not None]
            m[f] = sum(vals) / len(vals) if vals else math.nan
        out[s] = m
    return out


def summary(rows: list[dict[str, Any]], figures: Sequence[str] = SUMMARY_FIGURES) -> str:
    """The summary table: one column per settings (the first is the
    baseline), one row per figure with the mean over recordings and seeds
    and, after the baseline, the change in % (``*`` marks a change)."""
    groups = _by_settings(rows)
    if not groups:
        return "No runs.\n"
    mean = means(rows, figures)
    names = list(groups)
    lines = ["Runs per settings (ok/failed): " + ", ".join(
        f"{n or '(default)'!r} {sum(r['status'] == 'ok' for r in groups[n])}/"
        f"{sum(r['status'] != 'ok' for r in groups[n])}" for n in names)]
    head = f"{'':44}" + "".join(f"{(n or '(default)')[:25]:>27}" for n in names)
    lines += ["", head]
    for f in figures:
        label = _compare.FIGURES[f][0][:43]
        base = mean[names[0]][f]
        cells = [f"{_fmt_mean(base):>27}"]
        for n in names[1:]:
            v = mean[n][f]
            if math.isnan(v) or math.isnan(base):
                cells.append(f"{_fmt_mean(v):>27}")
            else:
                cells.append(f"{_compare._cell(base, v):>27}")
        lines.append(f"{label:<44}" + "".join(cells))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", f"{len(failed)} failed run(s):"]
        lines += [f"  {Path(str(r['recording'])).name} {r['settings'] or '(default)'!r} seed {r['seed']}: {r['error']}"
                  for r in failed[:20]]
    return "\n".join(lines) + "\n"


def _fmt_mean(v: float) -> str:
    return "-" if math.isnan(v) else _compare._fmt(v)


def plot(rows: list[dict[str, Any]], path: str | os.PathLike[str], title: str = "",
         figures: Sequence[str] = ("thp_success_pct", "fallbacks", "peak_used_mib", "slab_loss_mib",
                                   "pcp_drains", "zone_lock")) -> None:
    """One figure: per figure a panel of bars, one per settings (the mean
    over recordings and seeds), with the runs' range as error bars."""
    from kmm.plot import _pyplot

    plt = _pyplot()
    groups = _by_settings(rows)
    names = list(groups)
    n = len(figures)
    cols = 2 if n > 1 else 1
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5.5 * cols, 2.6 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, f in zip(axes.flat, figures):
        ys, lo, hi = [], [], []
        for s in names:
            vals = [v for v in (_num(r.get(f)) for r in groups[s] if r["status"] == "ok") if v is not None]
            mean = sum(vals) / len(vals) if vals else 0.0
            ys.append(mean)
            lo.append(mean - min(vals) if vals else 0.0)
            hi.append(max(vals) - mean if vals else 0.0)
        x = list(range(len(names)))
        ax.bar(x, ys, yerr=[lo, hi], capsize=3)
        ax.set_xticks(x)
        ax.set_xticklabels([(s or "(default)")[:22] for s in names], rotation=20, ha="right", fontsize="x-small")
        ax.set_title(_compare.FIGURES[f][0], fontsize="small")
        ax.set_ylim(bottom=0)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title or f"kmm sweep: {len(rows)} runs")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
