"""Plots of a replay (needs the optional ``plot`` extra: matplotlib)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kmm.trace import ReplayReport


#: One colour per order (0..10), so no two orders share a line colour.
ORDER_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000",
)


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotUnavailable(
            "plotting needs matplotlib: pip install 'linux-kmm[plot]' (or pip install matplotlib)"
        ) from e
    return plt


def require() -> None:
    """Raise :class:`PlotUnavailable` now if matplotlib is missing."""
    _pyplot()


def replay_plot(report: ReplayReport, path: str, title: str = "kmm replay") -> None:
    """Free pages per order over the replay (all zones summed), the pages in
    use, and the unusable-free-space index per order of the largest zone."""
    plt = _pyplot()
    samples = report.samples
    x = [s.event for s in samples]
    orders = len(samples[0].zones[0].nr_free) if samples and samples[0].zones else 0
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    for o in range(orders):
        a1.plot(x, [sum(z.nr_free[o] << o for z in s.zones) for s in samples], label=f"order {o}",
                color=ORDER_COLOURS[o % len(ORDER_COLOURS)])
    a1.set_ylabel("free pages (buddy, all zones)")
    a1.set_yscale("symlog")
    a1.legend(ncol=4, fontsize="small")
    a1.set_title(title)
    a2.plot(x, [s.used_pages * report.page_size / 1024 for s in samples])
    a2.set_ylabel("memory in use (kB)")
    if samples and samples[-1].zones:
        big = max(range(len(samples[-1].zones)), key=lambda i: sum(samples[-1].zones[i].nr_free))
        name = samples[-1].zones[big].zone
        for o in range(orders):
            a3.plot(x, [s.zones[big].unusable_index[o] / 1000 for s in samples], label=f"order {o}",
                    color=ORDER_COLOURS[o % len(ORDER_COLOURS)])
        a3.set_ylabel(f"unusable free space index ({name})")
        a3.legend(ncol=4, fontsize="small")
    a3.set_xlabel("events replayed")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
