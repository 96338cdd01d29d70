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


#: Colours of the page owners (kmm.PAGE_OWNER_NAMES order): reserved, buddy
#: free, pcp, slab, vmalloc, page table, pages.
OWNER_COLOURS = ("#000000", "#e8e8e8", "#9ecae1", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def memory_map(ax, owners: bytes, page_size: int, width: int = 1024) -> None:
    """Draw a physical memory map: one cell per page frame, `width` frames a
    row, coloured by owner (``Machine.page_owners()``)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from kmm import PAGE_OWNER_NAMES

    rows = -(-len(owners) // width)
    grid = [list(owners[r * width:(r + 1) * width]) for r in range(rows)]
    if grid and len(grid[-1]) < width:
        grid[-1] += [0] * (width - len(grid[-1]))
    ax.imshow(grid, cmap=ListedColormap(OWNER_COLOURS), vmin=0, vmax=len(OWNER_COLOURS) - 1,
              interpolation="nearest", aspect="auto")
    mib = width * page_size / (1 << 20)
    ax.set_ylabel(f"physical address ({mib:g} MiB a row)")
    ax.set_xticks([])
    ax.set_yticks([0, rows - 1], ["0", f"{rows * mib:g} MiB"])
    counts = [owners.count(i) for i in range(len(OWNER_COLOURS))]
    ax.legend(handles=[Patch(color=c, label=f"{n} ({counts[i]} pages)")
                       for i, (c, n) in enumerate(zip(OWNER_COLOURS, PAGE_OWNER_NAMES))],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")


def replay_plot(report: ReplayReport, path: str, title: str = "kmm replay", owners: bytes | None = None) -> None:
    """Free pages per order over the replay (all zones summed), the pages in
    use, the unusable-free-space index per order of the largest zone, and,
    given ``owners`` (``Machine.page_owners()`` at the end), the physical
    memory map coloured by owner."""
    plt = _pyplot()
    samples = report.samples
    x = [s.event for s in samples]
    orders = len(samples[0].zones[0].nr_free) if samples and samples[0].zones else 0
    if owners is not None:
        fig = plt.figure(figsize=(12, 15))
        gs = fig.add_gridspec(4, 1, height_ratios=[3, 2, 3, 4])
        a1 = fig.add_subplot(gs[0])
        a2 = fig.add_subplot(gs[1], sharex=a1)
        a3 = fig.add_subplot(gs[2], sharex=a1)
        memory_map(fig.add_subplot(gs[3]), owners, report.page_size)
    else:
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
