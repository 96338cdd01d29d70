"""How kmm presents its results (issue 10, part 6): the replay report's end
state and fragmentation table, the replay plot, `kmm demo` as a tour, empty
traces, `kmm --help`.

Expected indices are computed here by hand or with mm/vmstat.c's formulas
written out again below; expected free lists come from freshly booted
machines.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

import kmm
from kmm import cli
from conftest import SAMPLE_TRACE, sample_trace_lines

NR_ORDERS = kmm.MAX_PAGE_ORDER + 1
PERF_LINE = re.compile(r"\[\d{3}\]\s+\d+\.\d{6}:")


def unusable(nr_free: list[int], order: int) -> int:
    """mm/vmstat.c unusable_free_index, in thousandths."""
    free = sum(n << o for o, n in enumerate(nr_free))
    if free == 0:
        return 1000
    suitable = sum(n << (o - order) for o, n in enumerate(nr_free) if o >= order)
    return (free - (suitable << order)) * 1000 // free


def table(text: str) -> tuple[list[int], dict[tuple[str, str], list[str]]]:
    """The fragmentation table of a report: its orders and its rows by
    (zone, "unusable" | "fragmentation")."""
    lines = text.split("External fragmentation per order", 1)[1].splitlines()
    orders = [int(x) for x in lines[1].split()[1:]]
    rows = {}
    for line in lines[2:]:
        parts = line.split()
        if len(parts) != 2 + len(orders) or parts[1] not in ("unusable", "fragmentation"):
            break
        rows[(parts[0], parts[1])] = parts[2:]
    return orders, rows


def populated(m: kmm.Machine) -> dict[str, list[int]]:
    return {z.name: list(z.nr_free) for z in m.zones if z.populated}


@pytest.fixture(scope="module")
def sample() -> kmm.trace.TraceLog:
    return kmm.trace.load(SAMPLE_TRACE)


@pytest.fixture(scope="module")
def empty_report() -> kmm.trace.ReplayReport:
    return kmm.trace.replay(kmm.trace.parse(""), kmm.Machine(memory="64M"))


# --- the fragmentation indices ------------------------------------------------


def test_zone_frag_by_hand():
    # 3 order-0, 1 order-1 and 2 order-3 blocks: 21 free pages in 6 blocks.
    z = kmm.trace.zone_frag("Normal", [3, 1, 0, 2] + [0] * 7)
    # order 1: 3 single pages of 21 unusable; orders 2-3: 5 of 21; order 4+: all.
    assert z.unusable_index[:5] == [0, 3000 // 21, 5000 // 21, 5000 // 21, 1000]
    # Orders 0-3 would succeed; order 4 (16 pages) would fail:
    # 1000 - (1000 + 21 * 1000 // 16) // 6 = 1000 - 2312 // 6 = 615.
    assert z.fragmentation_index[:4] == [-1000] * 4
    assert z.fragmentation_index[4] == 615 and z.fragmentation_index[5] == 1000 - (1000 + 21000 // 32) // 6
    # No free memory: all unusable (1.000), and fragmentation index 0.
    empty = kmm.trace.zone_frag("HighMem", [0] * NR_ORDERS)
    assert empty.unusable_index == [1000] * NR_ORDERS and empty.fragmentation_index == [0] * NR_ORDERS


def test_zone_frag_agrees_with_the_replays_own_samples(sample):
    # A 40 MiB machine fragments under the sample (orders that would fail):
    # the Python end state and the Rust samples compute the same indices.
    r = kmm.trace.replay(sample, kmm.Machine(memory="40M", cpus=2), sample_every=5000)
    assert any(f != -1000 for s in r.samples for z in s.zones for f in z.fragmentation_index)
    for s in r.samples:
        for z in s.zones:
            assert kmm.trace.zone_frag(z.zone, z.nr_free) == z
    assert r.end_zones == r.samples[-1].zones  # no free_at_end: the end state is the last sample


# --- the fragmentation table --------------------------------------------------


def test_table_shows_only_what_says_something(empty_report):
    zones = {
        "DMA32": [0] * 10 + [4],  # all free memory in order-10 blocks
        "Normal": [3, 1, 0, 2] + [0] * 7,  # the zone of test_zone_frag_by_hand
        "HighMem": [0] * NR_ORDERS,  # no free pages
    }
    r = dataclasses.replace(empty_report, events=10, end_zones=[kmm.trace.zone_frag(n, f) for n, f in zones.items()])
    text = r.format()
    orders, rows = table(text)
    # Order 0 is 0.000 everywhere (left out); order 1 is Normal's first non-zero.
    assert orders == list(range(1, NR_ORDERS))
    assert "Left out: order 0 (unusable index 0.000 in every zone)" in text
    assert rows[("DMA32", "unusable")] == ["0.000"] * len(orders)
    assert rows[("Normal", "unusable")] == [f"0.{unusable(zones['Normal'], o):03d}" for o in range(1, 4)] + [
        "1.000"
    ] * (NR_ORDERS - 4)
    # A fragmentation row only where an allocation would fail: Normal, from order 4.
    assert ("DMA32", "fragmentation") not in rows
    assert rows[("Normal", "fragmentation")][:4] == ["-1.000", "-1.000", "-1.000", "0.615"]
    assert "the fragmentation index of DMA32 (-1.000 at every order" in " ".join(text.split())
    assert text.count("-1.000") == 3 + 1  # Normal's orders 1-3, and the note on DMA32
    # A zone without free pages gets a line, not a row of indices.
    assert ("HighMem", "unusable") not in rows
    assert re.search(r"^  HighMem +no free pages", text, re.M)


def test_table_of_a_machine_without_fragmentation(empty_report):
    r = dataclasses.replace(empty_report, events=10,
                            end_zones=[kmm.trace.zone_frag("DMA32", [0] * 10 + [12])])
    text = r.format()
    assert "unusable index 0.000 at every order in DMA32" in text
    assert "fragmentation index of DMA32 (-1.000 at every order" in " ".join(text.split())


def test_free_at_end_prints_one_consistent_end_state(sample):
    # Without the percpu and vmalloc events everything the replay allocated
    # goes back: the end state is a freshly booted machine's.
    no_percpu = kmm.trace.parse("".join(
        line for line in sample_trace_lines() if " percpu:" not in line and " vmalloc:" not in line))
    # 40 MiB: small enough that the replay fragments DMA32 before the frees.
    m = kmm.Machine(memory="40M", cpus=2)
    boot = populated(kmm.Machine(memory="40M", cpus=2))
    r = kmm.trace.replay(no_percpu, m, free_at_end=True)
    assert r.kmm_failures == 0 and populated(m) == boot
    before = dataclasses.replace(r, end_zones=r.samples[-1].zones)
    assert table(before.format())[1][("DMA32", "unusable")][-1] != "0.000"
    text = r.format()
    assert "End state, after freeing everything the replay allocated (--free-at-end" in text
    # The buddyinfo printed is the machine's after the frees ...
    printed = text.split("/proc/buddyinfo (the same moment):\n", 1)[1]
    assert printed == m.proc.buddyinfo()
    # ... and so is the table: a fresh machine's, DMA's boot blocks (one of
    # each order 0-9 and 3 of order 10: 4095 pages) the only ones below
    # order 10.
    orders, rows = table(text)
    first = next(o for o in range(NR_ORDERS) if any(unusable(f, o) for f in boot.values()))
    assert first == 3 and orders == list(range(3, NR_ORDERS))
    for zone, nr_free in boot.items():
        assert rows[(zone, "unusable")] == [f"{unusable(nr_free, o) // 1000}.{unusable(nr_free, o) % 1000:03d}"
                                            for o in orders]
        assert (zone, "fragmentation") not in rows
    assert rows[("DMA", "unusable")][-1] == f"0.{1023 * 1000 // 4095:03d}"  # 0.249


def test_kmm_replay_free_at_end_matches_the_machine(capsys, tmp_path):
    p = tmp_path / "part.txt"
    p.write_text("".join(list(sample_trace_lines())[:20000]))
    assert cli.main(["replay", str(p), "--memory", "1G", "--free-at-end"]) == 0
    out = capsys.readouterr().out
    m = kmm.Machine(memory="1G")
    kmm.trace.replay(kmm.trace.load(p), m, free_at_end=True)  # the same replay again
    assert out.split("/proc/buddyinfo (the same moment):\n", 1)[1] == m.proc.buddyinfo()
    assert out.count("/proc/buddyinfo") == 1 and out.count("External fragmentation") == 1


# --- empty traces -------------------------------------------------------------


@pytest.mark.parametrize("content,why", [("", "the file is empty"),
                                         ("# perf script header\n#\n\n", "3 lines, only comments and blank lines")])
@pytest.mark.parametrize("cmd", [["replay"], ["stat"], ["proc", "buddyinfo", "--trace"]])
def test_an_empty_trace_says_no_events(tmp_path, capsys, content, why, cmd):
    p = tmp_path / "empty.perf.txt"
    p.write_text(content)
    assert cli.main([*cmd, str(p)]) == 1
    out, err = capsys.readouterr()
    # One line naming the file and saying "no events" (an empty file also
    # says what kmm reads instead).
    assert err.startswith(f"kmm: error: {p}: no events ({why})") and err.count("\n") == 1
    assert out == ""


def test_replaying_an_empty_tracelog_gives_an_empty_report(empty_report):
    r = empty_report
    assert r.events == r.replayed == 0 and r.live_at_end == 0
    text = r.format()
    assert text.startswith("No events: the trace is empty, nothing was replayed.\n")
    assert "Events not replayed" not in text
    assert text.endswith(kmm.Machine(memory="64M").proc.buddyinfo())


# --- kmm demo -----------------------------------------------------------------


def section(out: str, title: str) -> str:
    body = out.split(title + "\n", 1)[1].split("\n", 1)[1]  # past the underline
    return body.split("\n\n", 1)[0] + "\n"


@pytest.mark.parametrize("arch", ["x86_64", "i386", "i386-pae"])
def test_demo_is_a_tour(arch, capsys):
    assert cli.main(["demo", "--arch", arch]) == 0
    out = capsys.readouterr().out
    # The trace is summarised: counts per event, a few example lines.
    lines = [line for line in out.splitlines() if PERF_LINE.search(line)]
    assert 0 < len(lines) <= 16
    fired = int(re.search(r"tracepoints fired: (\d+)", out).group(1))
    counts = re.findall(r"^ +(\d+)  (kmem:\w+)", out, re.M)
    assert sum(int(n) for n, _ in counts) == fired > len(lines)
    assert dict((name, int(n)) for n, name in counts)["kmem:mm_page_alloc"] == 6  # the six allocations
    # Everything freed and the per-CPU lists drained: the buddies merged
    # back into a freshly booted machine's free lists.
    fresh = kmm.Machine(arch=arch).proc.buddyinfo()
    split = section(out, "/proc/buddyinfo after the allocations (orders split by expand())")
    merged = section(out, "Everything freed: drain_all_pages(), and the buddies merged back (/proc/buddyinfo)")
    assert split != fresh
    assert merged.startswith(fresh)
    assert "every split block merged back with its buddy: the same as at boot" in merged


# --- kmm --help ---------------------------------------------------------------


def test_help_says_plain_kmm_replays_the_sample(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    path, what = cli.default_trace()
    assert path == kmm.trace.BUNDLE and (path / "perf.data.xz").is_file()
    assert f"Plain `kmm` (no COMMAND) is `kmm replay`: it replays {what} ({path.name})" in text


def test_plain_kmm_says_what_it_replays(capsys):
    assert cli.main([]) == 0
    path, what = cli.default_trace()
    assert capsys.readouterr().out.startswith(f"Replaying {what} ({path.name})\n")


# --- the plot -----------------------------------------------------------------


def render(monkeypatch, report, path, owners, pageblock_order):
    """replay_plot, keeping the figure it closes."""
    import matplotlib.pyplot as plt

    from kmm import plot

    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figs.append(fig), close(fig)))
    plot.replay_plot(report, str(path), owners=owners, pageblock_order=pageblock_order)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return figs[0]


@pytest.mark.parametrize("arch,memory", [("x86_64", "8G"), ("i386", "2G")])
def test_plot_panels_and_memory_map_zoom(monkeypatch, tmp_path, sample, arch, memory):
    from kmm import plot

    m = kmm.Machine(arch=arch, memory=memory, cpus=2)
    report = kmm.trace.replay(sample, m)
    owners = m.page_owners()
    fig = render(monkeypatch, report, tmp_path / "r.png", owners, m.pageblock_order)
    axes = fig.axes
    assert len(axes) == 4
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the closed figure's layout, as saved
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        leg = ax.get_legend()
        if leg is not None:  # beside the data, not over it
            assert leg.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    # The memory map shows exactly the stretches of memory in use: every
    # frame in use (owner other than reserved and buddy free) is in one,
    # and the image's cells are the owners of those frames.
    ax = axes[3]
    width = 1 << m.pageblock_order
    grid = ax.images[0].get_array()
    rows, _ = grid.shape
    assert ax.get_ylim() == (rows, 0)
    used = [pfn for pfn, o in enumerate(owners) if o > 1]
    r, cells, starts = 0, [], []
    gap = len(plot.OWNER_COLOURS)
    while r < rows:
        if grid[r][0] == gap and all(c == gap for c in grid[r]):
            r += 1
            continue
        starts.append(r)
        while r < rows and not all(c == gap for c in grid[r]):
            cells.append(r)
            r += 1
    labels = {t.get_position()[1]: t.get_text() for t in ax.get_yticklabels()}
    first = int(labels[0].split()[0], 16)
    assert first <= used[0] < first + width
    stretches = []
    for s in starts:
        pfn = int(labels[s].split()[0], 16)
        end = s
        while end < rows and not all(c == gap for c in grid[end]):
            end += 1
        stretches.append((pfn, pfn + (end - s) * width))
        shown = [int(c) for row in grid[s:end] for c in row]
        assert shown == list(owners[pfn:pfn + (end - s) * width])
    assert all(any(a <= p < b for a, b in stretches) for p in used)
    assert stretches[-1][1] - width <= used[-1]
    # Zoomed: a few dozen rows out of the whole memory's thousands.
    assert rows <= 32 < len(owners) // width
    if arch == "i386":
        # Lowmem (slab) and HighMem (user pages) are far apart: a gap between.
        assert len(stretches) == 2 and "skipped)" in labels[starts[1] - 0.5]
