"""What-if replays: one recording under two settings, side by side.

``kmm replay REC --compare "SETTINGS_A" "SETTINGS_B"`` and
:func:`compare` replay the same recording, from the same start state, on
two machines that differ only in their settings (``kmm.settings`` syntax:
``NAME=VALUE`` items, a dotted name a sysctl, the rest boot parameters; an
empty string is the default machine). The report puts the two side by side
in mmtests' compare style (each row: A, B and the change in %, a changed
figure marked ``*``), with the figures MM developers quote in LKML cover
letters, per-cache slab memory and loss as ``tools/mm/slabinfo`` reports
them, and one plot with both runs.

:func:`run` is one replay and its :class:`Figures`; ``kmm sweep``
(``kmm.sweep``) runs many of them.

Where each figure comes from:

- memory: pages in use (MemTotal - MemFree) at the replay's peak and end;
- slab: per cache, ``tools/mm/slabinfo``'s ``slab_size`` (slabs x
  PAGE_SIZE << order) and loss (``slab_waste``: ``slab_size - objects x
  object_size``), read from the sysfs attributes (``m.sysfs_slab``);
- kmm's allocator events during the replay (its own tracepoints):
  ``mm_page_alloc_extfrag`` (fallbacks; those with alloc != fallback
  migratetype, i.e. change_ownership=0, are the migratetype mismatches;
  those with fallback_order < pageblock_order the fragmenting ones),
  ``mm_page_alloc_zone_locked percpu_refill=1`` (pcp refills, in pages) and
  ``mm_page_pcpu_drain`` (pcp drains, in pages); zone->lock acquisitions
  (every path that takes it, ``zone.rs`` ``ZoneLock``);
- pcp high: the sum over zones and CPUs of ``pcp->high`` at the end;
- mixed pageblocks: pagetypeinfo's "Number of mixed blocks" (page_owner's
  ``pagetypeinfo_showmixedcount_print``) at the end;
- external fragmentation: the unusable free space index for a pageblock-
  order (THP-sized) request (``/sys/kernel/debug/extfrag/unusable_index``)
  of all zones' free lists together, at the end and averaged over the
  replay's samples;
- order-9 (THP-sized) allocation success: after the replay, the THP probe
  asks for pageblock-order blocks with ``GFP_TRANSHUGE_LIGHT`` (no reclaim,
  no compaction: a THP fault's first try) as many times as free memory
  could hold one, the way mmtests' stress-highalloc asks for a share of
  memory; success % is how many it got. The blocks are given back, and the
  replay's order-9 allocations, when the trace has any, are counted too.

SIMPLIFICATION: kmm has no compaction or reclaim, so the THP probe's
success is what the free lists hold, as with compaction deferred.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kmm
from kmm import settings as _settings
from kmm.trace import Recording, ReplayReport, TraceLog

__all__ = ["FIGURES", "Figures", "Run", "Comparison", "run", "compare", "figures"]

#: Every figure: key -> (label, section, lower is better?). The order is the
#: report's.
FIGURES: dict[str, tuple[str, str, bool | None]] = {
    "peak_used_mib": ("Peak memory in use (MiB)", "Memory", True),
    "end_used_mib": ("Memory in use at the end (MiB)", "Memory", True),
    "slab_mib": ("Slab memory (MiB)", "Memory", True),
    "slab_loss_mib": ("Slab loss (MiB, tools/mm/slabinfo)", "Memory", True),
    "thp_success_pct": ("Order-9 (THP) allocation success %", "High-order allocations", False),
    "thp_fail_pct": ("Order-9 (THP) allocation failure %", "High-order allocations", True),
    "thp_attempts": ("Order-9 probe requests", "High-order allocations", None),
    "order9_allocs": ("Order-9 allocations in the replay", "High-order allocations", None),
    "order9_failed": ("Order-9 allocations that failed", "High-order allocations", True),
    "high_order_failed": ("Order>0 allocations that failed", "High-order allocations", True),
    "fallbacks": ("Fallbacks (mm_page_alloc_extfrag)", "Fragmentation", True),
    "mt_mismatches": ("Migratetype mismatches (alloc != fallback)", "Fragmentation", True),
    "extfrag_below_pageblock": ("Extfrag events below pageblock order", "Fragmentation", True),
    "mixed_blocks": ("Mixed pageblocks (pagetypeinfo)", "Fragmentation", True),
    "unusable_index_end": ("Unusable index, order 9, at the end", "Fragmentation", True),
    "unusable_index_mean": ("Unusable index, order 9, mean over time", "Fragmentation", True),
    "pcp_refills": ("pcp refills (pages)", "Per-CPU lists and zone lock", True),
    "pcp_drains": ("pcp drains (pages)", "Per-CPU lists and zone lock", True),
    "pcp_high": ("pcp high at the end (pages, all CPUs)", "Per-CPU lists and zone lock", None),
    "zone_lock": ("Zone lock acquisitions", "Per-CPU lists and zone lock", True),
    "page_allocs": ("Page allocations", "Work", None),
    "kmm_failures": ("kmm calls that failed", "Work", True),
}

Figures = dict[str, float]


@dataclass
class Run:
    """One replay under one set of settings."""

    settings: str
    report: ReplayReport
    figures: Figures
    #: Per cache: name -> (slab_size bytes, loss bytes), tools/mm/slabinfo's.
    caches: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Per sample: (event, pages in use, unusable index order 9 in thousandths).
    series: list[tuple[int, int, int]] = field(default_factory=list)
    machine: str = ""


def _dyn(report: ReplayReport, tracepoint: str) -> int:
    for row in report.dynamics:
        if row.tracepoint == tracepoint:
            return row.kmm
    return 0


def _unusable(nr_free_by_zone: list[list[int]], order: int) -> int:
    """``unusable_free_index`` of all zones' free blocks together, thousandths."""
    orders = max((len(z) for z in nr_free_by_zone), default=0)
    nr = [sum(z[o] for z in nr_free_by_zone if o < len(z)) for o in range(orders)]
    free_pages = sum(n << o for o, n in enumerate(nr))
    if free_pages == 0:
        return 1000
    suitable = sum(n << (o - order) for o, n in enumerate(nr) if o >= order)
    return (free_pages - (suitable << order)) * 1000 // free_pages


def slab_usage(m: Any) -> dict[str, tuple[int, int]]:
    """Per cache (aliases once): ``tools/mm/slabinfo``'s ``slab_size`` and
    ``slab_waste`` (loss), in bytes, from the sysfs attributes."""
    out: dict[str, tuple[int, int]] = {}
    for c in m.caches:
        if c.alias is not None or c.destroyed:
            continue
        a = m.sysfs_slab(c.name)
        if a is None:
            continue
        size = int(a["slabs"]) * (m.page_size << int(a["order"]))
        out[c.name] = (size, size - int(a["objects"]) * int(a["object_size"]))
    return out


def thp_probe(m: Any) -> tuple[int, int]:
    """Ask for pageblock-order blocks with GFP_TRANSHUGE_LIGHT as many times
    as free memory could hold one (or until the first failure); give them
    back. Returns (requests, successes)."""
    order = m.pageblock_order
    attempts = m.nr_free_pages() >> order
    got = []
    with m.on_cpu(0):
        try:
            for _ in range(attempts):
                try:
                    got.append(m.alloc_pages(kmm.gfp.GFP_TRANSHUGE_LIGHT, order))
                except kmm.OutOfMemoryError:
                    break
        finally:
            for p in got:
                m.free_pages(p, order)
    return attempts, len(got)


def figures(report: ReplayReport, m: Any, probe: bool = True) -> tuple[Figures, dict[str, tuple[int, int]]]:
    """The figures of one replay on machine ``m`` (read at the end; the
    THP probe, with ``probe``, changes nothing it leaves behind but the
    pcp lists it drained)."""
    mib = m.page_size / (1 << 20)
    caches = slab_usage(m)
    f: Figures = {
        "peak_used_mib": report.peak_used_pages * mib,
        "end_used_mib": report.final_used_pages * mib,
        "slab_mib": sum(s for s, _ in caches.values()) / (1 << 20),
        "slab_loss_mib": sum(w for _, w in caches.values()) / (1 << 20),
    }
    pb = m.pageblock_order
    orders = {o: (ok, failed) for o, _k_ok, _k_failed, ok, failed in report.page_alloc_orders}
    f["order9_allocs"] = sum(ok + failed for o, (ok, failed) in orders.items() if o == pb)
    f["order9_failed"] = sum(failed for o, (_ok, failed) in orders.items() if o == pb)
    f["high_order_failed"] = sum(failed for o, (_ok, failed) in orders.items() if o > 0)
    extfrag = _dyn(report, "kmem:mm_page_alloc_extfrag")
    f["fallbacks"] = extfrag
    f["mt_mismatches"] = extfrag - _dyn(report, "kmem:mm_page_alloc_extfrag change_ownership=1")
    f["extfrag_below_pageblock"] = _dyn(report, "kmem:mm_page_alloc_extfrag fragmenting=1")
    f["pcp_refills"] = _dyn(report, "kmem:mm_page_alloc_zone_locked percpu_refill=1")
    f["pcp_drains"] = _dyn(report, "kmem:mm_page_pcpu_drain")
    f["zone_lock"] = report.zone_lock_acquisitions
    f["page_allocs"] = _dyn(report, "kmem:mm_page_alloc")
    f["kmm_failures"] = report.kmm_failures
    populated = [z for z in m.zones if z.populated]
    f["pcp_high"] = sum(m.pcp_state(z.name, cpu)["high"] for z in populated for cpu in range(m.cpus))
    f["mixed_blocks"] = sum(sum(row.values()) for row in m.mixed_blocks().values())
    f["unusable_index_end"] = _unusable([list(z.nr_free) for z in populated], pb) / 1000
    idx = [_unusable([z.nr_free for z in s.zones], pb) for s in report.samples]
    f["unusable_index_mean"] = (sum(idx) / len(idx) / 1000) if idx else f["unusable_index_end"]
    if probe:
        attempts, ok = thp_probe(m)
        f["thp_attempts"] = attempts
        f["thp_success_pct"] = 100.0 * ok / attempts if attempts else 0.0
        f["thp_fail_pct"] = 100.0 - f["thp_success_pct"] if attempts else 0.0
    return f, caches


def run(
    trace: TraceLog | Recording,
    settings: str = "",
    *,
    warm: bool = True,
    time: bool = True,
    sample_every: int = 1000,
    seed: int | None = None,
    probe: bool = True,
    **overrides: Any,
) -> Run:
    """Replay ``trace`` on a machine built with ``settings`` (``kmm.settings``
    syntax) and ``overrides`` (:class:`kmm.Machine` keyword arguments; a
    ``cmdline`` or ``sysctl`` there comes first, the settings after), and
    measure it. Raises ValueError for a bad setting before anything runs."""
    boot, sysctl = _settings.split(settings)
    base_cmdline = overrides.pop("cmdline", None) or ""
    base_sysctl = dict(overrides.pop("sysctl", None) or {})
    cmdline = " ".join(x for x in (base_cmdline, boot) if x)
    sysctl = {**base_sysctl, **sysctl}
    kmm._kmm.check_settings(cmdline, sysctl)
    if seed is not None:
        overrides["seed"] = seed
    m = kmm.trace.machine_for(trace, warm=warm, cmdline=cmdline, sysctl=sysctl or None, **overrides)
    report = kmm.trace.replay(trace, m, sample_every=sample_every, time=time)
    pb = m.pageblock_order
    series = [(s.event, s.used_pages, _unusable([z.nr_free for z in s.zones], pb)) for s in report.samples]
    f, caches = figures(report, m, probe=probe)
    return Run(settings=settings, report=report, figures=f, caches=caches, series=series, machine=repr(m))


def _fmt(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"


def change_pct(a: float, b: float) -> float | None:
    """(B - A) / A in %, None when A is 0 and B is not (infinite)."""
    if a == b:
        return 0.0
    if a == 0:
        return None
    return (b - a) * 100.0 / abs(a)


def _cell(a: float, b: float) -> str:
    """mmtests' compare cell: B, then the change in %; ``*`` marks a change."""
    pct = change_pct(a, b)
    if pct is None:
        return f"{_fmt(b):>14} *     new*"
    if a == b:
        return f"{_fmt(b):>14} (   0.00%)"
    return f"{_fmt(b):>14} *{pct:8.2f}%*"


@dataclass
class Comparison:
    """Two runs of one recording, A and B."""

    a: Run
    b: Run
    name: str = ""

    def differences(self) -> list[str]:
        """The figures that differ between A and B."""
        return [k for k in FIGURES if k in self.a.figures and self.a.figures.get(k) != self.b.figures.get(k)]

    def format(self, caches: int = 12) -> str:
        a, b = self.a, self.b
        la, lb = a.settings or "(default)", b.settings or "(default)"
        out = [f"Replay of {self.name or 'the recording'} under two settings (mmtests compare style: A, B, change in %; "
               "* marks a difference)", ""]
        out.append(f"  A: {la}")
        out.append(f"  B: {lb}")
        out.append("")
        w = 46
        out.append(f"{'':{w}} {'A':>14} {'B':>25}")
        section = None
        for key, (label, sec, _lower) in FIGURES.items():
            if key not in a.figures or key not in b.figures:
                continue
            if sec != section:
                out.append(sec)
                section = sec
            va, vb = a.figures[key], b.figures[key]
            out.append(f"  {label:<{w - 2}} {_fmt(va):>14} {_cell(va, vb)}")
        diff = self.differences()
        out.append("")
        out.append(f"{len(diff)} of {sum(1 for k in FIGURES if k in a.figures)} figures differ"
                   + (f": {', '.join(diff)}" if diff else ""))
        # Per-cache slab memory and loss (tools/mm/slabinfo's Space and Loss).
        names = sorted(set(a.caches) | set(b.caches),
                       key=lambda n: -(a.caches.get(n, (0, 0))[0] + b.caches.get(n, (0, 0))[0]))
        changed = [n for n in names if a.caches.get(n) != b.caches.get(n)]
        shown = (changed + [n for n in names if n not in changed])[:caches]
        if shown:
            out.append("")
            out.append(f"Slab caches (tools/mm/slabinfo: Space = slabs x PAGE_SIZE << order, Loss = Space - objects x "
                       f"objsize; KiB; {len(changed)} of {len(names)} caches differ, * marks them)")
            out.append(f"  {'Name':<24} {'Space A':>11} {'Space B':>11} {'Loss A':>10} {'Loss B':>10}")
            for n in shown:
                sa, wa = a.caches.get(n, (0, 0))
                sb, wb = b.caches.get(n, (0, 0))
                mark = "*" if (sa, wa) != (sb, wb) else " "
                out.append(f"{mark} {n:<24} {sa // 1024:>11,} {sb // 1024:>11,} {wa // 1024:>10,} {wb // 1024:>10,}")
        return "\n".join(out) + "\n"


def compare(
    trace: TraceLog | Recording,
    settings_a: str,
    settings_b: str,
    name: str = "",
    **kw: Any,
) -> Comparison:
    """Replay ``trace`` under ``settings_a`` and ``settings_b`` (each in
    ``kmm.settings`` syntax; "" is the default machine). Both settings are
    checked before either replay starts. ``kw``: as :func:`run`."""
    for s in (settings_a, settings_b):
        boot, sysctl = _settings.split(s)
        kmm._kmm.check_settings(boot, sysctl)
    return Comparison(run(trace, settings_a, **dict(kw)), run(trace, settings_b, **dict(kw)), name=name)


def plot(c: Comparison, path: str | Path, title: str = "") -> None:
    """One figure with both runs: memory in use and the order-9 unusable
    index over the replay, and the THP probe's success."""
    from kmm.plot import _pyplot

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for run_, label, style in ((c.a, "A: " + (c.a.settings or "(default)"), "-"),
                               (c.b, "B: " + (c.b.settings or "(default)"), "--")):
        ev = [e for e, _u, _i in run_.series]
        mib = run_.report.page_size / (1 << 20)
        ax1.plot(ev, [u * mib for _e, u, _i in run_.series], style, label=label)
        ax2.plot(ev, [i / 1000 for _e, _u, i in run_.series], style, label=label)
    ax1.set_ylabel("memory in use (MiB)")
    ax2.set_ylabel("unusable index, order 9")
    ax2.set_xlabel("events replayed")
    ax2.set_ylim(bottom=0)
    ax1.legend(loc="best", fontsize="small")
    ta = c.a.figures.get("thp_success_pct", math.nan)
    tb = c.b.figures.get("thp_success_pct", math.nan)
    ax1.set_title(title or f"kmm replay --compare: THP success A {ta:.1f}%, B {tb:.1f}%")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
