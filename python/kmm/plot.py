"""Plots of a replay (needs the optional ``plot`` extra: matplotlib).

:func:`replay_plot` draws, over the events replayed: the free pages in
blocks of each order (``/proc/buddyinfo`` over time, all zones summed), the
memory in use, and the unusable free space index per order of the zone the
trace used most (``mm/vmstat.c``); given ``Machine.page_owners()``, also the
physical memory map by owner, zoomed to the page frames in use. Every panel
labels its axes; legends sit outside the data, on the right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kmm.trace import ReplayReport


#: One colour per order (0..10), so no two orders share a line colour.
ORDER_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000",
)

#: Colours of the page owners (kmm.PAGE_OWNER_NAMES order): reserved, buddy
#: free, pcp, slab, vmalloc, page table, pages, in use before the trace
#: (a warm start's pages of unknown owner).
OWNER_COLOURS = ("#000000", "#e8e8e8", "#9ecae1", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#c7b299")

#: Owner codes that do not count as memory in use for the zoom: reserved
#: (pfn 0 and holes) and free in the buddy allocator.
_NOT_IN_USE = (0, 1)

#: Colour of a row that stands for skipped rows (no frame in use).
GAP_COLOUR = "#ffffff"

#: At most this many rows in the memory map (a row is one pageblock, or
#: more frames when the memory in use spans more).
_MAX_ROWS = 512

#: At most this many skipped stretches (gaps) in the memory map.
_MAX_GAPS = 6

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


def _size(nbytes: float) -> str:
    """1536 -> "1.5 KiB"; whole numbers without decimals."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if nbytes == int(nbytes) else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def map_rows(owners: bytes, width: int, keep: int = 4) -> list[tuple[int, int]] | None:
    """The stretches of the physical memory map worth showing, as pfn ranges
    ``[start, end)`` in whole rows of ``width`` frames: every row with a
    frame in use (any owner but reserved and buddy free), and the free rows
    between two such rows when there are at most ``keep`` of them; longer
    runs of free rows are left out (the map shows a gap). None when no frame
    is in use."""
    import numpy as np

    a = np.frombuffer(owners, dtype=np.uint8)
    n = -(-len(a) // width)
    cells = np.zeros(n * width, dtype=np.uint8)  # frames past the end of RAM count as reserved
    cells[: len(a)] = a
    rows = np.flatnonzero((cells.reshape(n, width) > max(_NOT_IN_USE)).any(axis=1))
    if not len(rows):
        return None
    stretches: list[tuple[int, int]] = []
    first = last = int(rows[0])
    for r in map(int, rows[1:]):
        if r - last - 1 > keep:
            stretches.append((first * width, (last + 1) * width))
            first = r
        last = r
    stretches.append((first * width, (last + 1) * width))
    return stretches


def memory_map(ax: Any, owners: bytes, page_size: int, pageblock_pages: int = 512,
               when: str = "at the end") -> list[tuple[int, int]]:
    """Draw the physical memory map: one cell per page frame, coloured by
    owner (``Machine.page_owners()``), one pageblock a row (more frames a
    row when the memory in use spans more than ``_MAX_ROWS`` pageblocks),
    zoomed to the rows in use: long runs of rows without a frame in use are
    left out, each shown as one white gap row saying how much it skipped.
    The y axis counts rows; its labels give the pfn (and address) of the
    row's first frame.

    Return: the pfn ranges ``[start, end)`` shown, in order (the whole
    memory when no frame is in use).
    """
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, FuncFormatter

    from kmm import PAGE_OWNER_NAMES

    width, keep = max(1, pageblock_pages), 4
    while True:
        stretches = map_rows(owners, width, keep) or [(0, -(-len(owners) // width) * width)]
        nrows = sum((e - s) // width for s, e in stretches) + len(stretches) - 1
        if nrows > _MAX_ROWS:
            width *= 2
        elif len(stretches) - 1 > _MAX_GAPS:
            keep *= 2
        else:
            break
    gap = len(OWNER_COLOURS)
    a = np.frombuffer(owners, dtype=np.uint8)
    parts, labels = [], {}  # labels: row -> text
    row = 0
    for i, (start, end) in enumerate(stretches):
        if i:
            skipped = start - stretches[i - 1][1]
            parts.append(np.full(width, gap, dtype=np.uint8))
            labels[row + 0.5] = f"({_size(skipped * page_size)} skipped)"
            for y in (row, row + 1):
                ax.axhline(y, color="#999999", linewidth=0.8, linestyle="--")
            row += 1
        cells = np.zeros(end - start, dtype=np.uint8)
        shown = a[start:end]
        cells[: len(shown)] = shown
        parts.append(cells)
        rows = (end - start) // width
        step = max(1, -(-nrows // 12))  # at most ~12 labels over all stretches
        for k in range(0, rows, step):
            labels[row + k] = start + k * width
        row += rows
    grid = np.concatenate(parts).reshape(-1, width)
    ax.imshow(grid, cmap=ListedColormap([*OWNER_COLOURS, GAP_COLOUR]), vmin=0, vmax=gap,
              interpolation="nearest", aspect="auto", extent=(0, width, nrows, 0))
    ax.set_ylim(nrows, 0)
    mib = stretches[-1][1] * page_size < 64 << 30  # MiB are exact at one pageblock a row (2 or 4 MiB)

    def label(y: float, _: int) -> str:
        v = labels.get(y, "")
        if isinstance(v, str):
            return v
        return f"{v:#x} ({(v * page_size) >> 20:,} MiB)" if mib else f"{v:#x} ({_size(v * page_size)})"

    ax.yaxis.set_major_locator(FixedLocator(sorted(labels)))
    ax.yaxis.set_major_formatter(FuncFormatter(label))
    ax.tick_params(axis="y", labelsize="small")
    ax.set_ylabel("pfn of the row's first frame (physical address)")
    ax.xaxis.set_major_locator(FixedLocator([width * k // 4 for k in range(5)]))
    row_text = f"{width} frames = {_size(width * page_size)} a row"
    if width == pageblock_pages:
        row_text += ", one pageblock"
    ax.set_xlabel(f"page frame within the row ({row_text})")
    if map_rows(owners, width, keep) is None:
        where = "no frame in use: the whole memory"
    else:
        where = f"the rows with frames in use, pfns {stretches[0][0]:#x}-{stretches[-1][1]:#x}"
    ax.set_title(f"Physical memory by owner {when}: {where}", fontsize="medium")
    counts = [owners.count(i) for i in range(len(OWNER_COLOURS))]
    handles = [Patch(color=c, label=f"{n}: {counts[i]:,} pages")
               for i, (c, n) in enumerate(zip(OWNER_COLOURS, PAGE_OWNER_NAMES))]
    if len(stretches) > 1:
        handles.append(Patch(facecolor=GAP_COLOUR, edgecolor="#999999", label="gap: rows left out (nothing in use)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
              title="whole machine")
    return stretches


def _busiest_zone(report: ReplayReport) -> int | None:
    """The index of the zone whose free pages moved most over the samples
    (the zone the trace allocated from); ties go to the larger zone."""
    samples = report.samples
    if not samples or not samples[0].zones:
        return None

    def free(s: Any, i: int) -> int:
        return sum(n << o for o, n in enumerate(s.zones[i].nr_free))

    def key(i: int) -> tuple[int, int]:
        series = [free(s, i) for s in samples]
        return max(series) - min(series), series[-1]

    return max(range(len(samples[0].zones)), key=key)


def trajectory_panel(ax, traj: list) -> None:
    """kmm's free pages against the kernel's at each sample of samples.txt
    (zones whose free pages change), and their distance (right axis)."""
    t0 = traj[0].ts_ns
    xs = [(t.ts_ns - t0) / 1e9 for t in traj]
    zones = [z for z, *_ in traj[0].zones]
    moving = [z for z in zones
              if len({(k, m) for t in traj for (zn, k, m, _d) in t.zones if zn == z}) > 1] or zones[:1]
    for i, zone in enumerate(moving):
        col = ORDER_COLOURS[i % len(ORDER_COLOURS)]
        pts = [[(k, m, d) for (zn, k, m, d) in t.zones if zn == zone][0] for t in traj]
        ax.plot(xs, [p[0] for p in pts], color=col, linestyle="--", label=f"{zone}: kernel (samples.txt)")
        ax.plot(xs, [p[1] for p in pts], color=col, label=f"{zone}: kmm")
    ax.set_title("Free pages in the buddy allocator, kmm against the kernel at each sample (buddyinfo)",
                 fontsize="medium")
    ax.set_xlabel(f"seconds on the trace's clock (from {t0 / 1e9:.3f} s)")
    ax.set_ylabel("free pages")
    d = ax.twinx()
    for i, zone in enumerate(moving):
        col = ORDER_COLOURS[i % len(ORDER_COLOURS)]
        d.plot(xs, [[dd for (zn, _k, _m, dd) in t.zones if zn == zone][0] for t in traj], color=col,
               linestyle=":", label=f"{zone}: distance")
    d.set_ylabel("distance: sum over orders |kmm - kernel| / kernel free pages")
    d.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = d.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize="small")


def replay_plot(report: ReplayReport, path: str, title: str = "kmm replay", owners: bytes | None = None,
                pageblock_order: int = 9) -> None:
    """Free pages per order over the replay (all zones summed), the memory
    in use, the unusable free space index per order of the zone the trace
    used most, and, given ``owners`` (``Machine.page_owners()`` at the end),
    the physical memory map by owner zoomed to the frames in use, one
    pageblock (``1 << pageblock_order`` frames) a row."""
    plt = _pyplot()
    samples = report.samples
    x = [s.event for s in samples]
    orders = len(samples[0].zones[0].nr_free) if samples and samples[0].zones else 0
    traj = list(getattr(report, "trajectory", []) or [])
    ratios = [3, 2, 3] + ([3] if traj else []) + ([4] if owners is not None else [])
    fig, axes = plt.subplots(len(ratios), 1, figsize=(13, 4.2 * len(ratios)), layout="constrained",
                             gridspec_kw={"height_ratios": ratios})
    a1, a2, a3 = axes[:3]
    if traj:
        trajectory_panel(axes[3], traj)
    if owners is not None:
        memory_map(axes[-1], owners, report.page_size, 1 << pageblock_order,
                   when="after --free-at-end" if report.free_at_end else "at the end")
    fig.suptitle(title)
    side = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": "small"}

    for o in range(orders):
        a1.plot(x, [sum(z.nr_free[o] << o for z in s.zones) for s in samples], label=f"order {o}",
                color=ORDER_COLOURS[o % len(ORDER_COLOURS)])
    a1.set_title("Free pages in blocks of each order, all zones (/proc/buddyinfo over the replay)", fontsize="medium")
    a1.set_ylabel("free pages (log scale)")
    a1.set_yscale("symlog")
    a1.set_xlabel("events replayed")
    a1.legend(**side)

    peak = max((s.used_pages for s in samples), default=0) * report.page_size
    unit, div = ("MiB", 1 << 20) if peak >= 16 << 20 else ("KiB", 1 << 10)
    a2.plot(x, [s.used_pages * report.page_size / div for s in samples], color="#1f77b4")
    a2.set_title("Memory in use (managed - free; pages on per-CPU lists count as used, as in MemFree)",
                 fontsize="medium")
    a2.set_ylabel(f"in use ({unit})")
    a2.set_xlabel("events replayed")
    a2.set_ylim(bottom=0)

    big = _busiest_zone(report)
    if big is not None:
        name = samples[-1].zones[big].zone
        flat = [o for o in range(orders) if not any(s.zones[big].unusable_index[o] for s in samples)]
        for o in range(orders):
            if o not in flat:
                a3.plot(x, [s.zones[big].unusable_index[o] / 1000 for s in samples], label=f"order {o}",
                        color=ORDER_COLOURS[o % len(ORDER_COLOURS)])
        a3.set_title(f"Unusable free space index per order, zone {name} (mm/vmstat.c: the share of free memory "
                     "in blocks too small for the order)", fontsize="medium")
        if len(flat) < orders:
            zero = (f"order {flat[0]}" if len(flat) == 1 else f"orders {flat[0]}-{flat[-1]}") if flat else ""
            a3.legend(title=f"{zero}: 0 throughout" if zero else None, **side)
        else:
            a3.text(0.5, 0.5, "0 at every order throughout: all free memory usable", transform=a3.transAxes,
                    ha="center", va="center")
    a3.set_ylabel("unusable index (0 = none, 1 = all)")
    a3.set_xlabel("events replayed")
    a3.set_ylim(0, 1.02)  # the index's whole range, so that plots compare and 0.001 looks like 0.001
    fig.savefig(path)
    plt.close(fig)
