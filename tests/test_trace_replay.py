"""kmm.trace.replay and `kmm replay`: a real trace fed into a kmm machine.

Expected counts are computed here from the trace text (independently of the
Rust replay); the kernel's own decisions (bytes_alloc, pfn) are in the trace.
"""

from __future__ import annotations

import math
import sys
import types
from collections import Counter

import pytest

import kmm
from kmm import cli
from conftest import SAMPLE_TRACE, buddyinfo, sample_trace_lines

SLAB_ALLOC = ("kmem:kmalloc", "kmem:kmem_cache_alloc")
SLAB_FREE = ("kmem:kfree", "kmem:kmem_cache_free")


def parse_line(line: str) -> tuple[str, dict[str, str]]:
    _, name, rest = line.split(": ", 2)
    fields = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
    if rest.startswith("va_start: "):  # alloc_vmap_area prints "va_start: %lu"
        fields["va_start"] = rest.split()[1]
    return name.strip(), fields


def vmap_start(f: dict[str, str]) -> int:
    return int(f["va_start"])


@pytest.fixture(scope="module")
def sample_events() -> list[tuple[str, dict[str, str]]]:
    return [parse_line(line) for line in sample_trace_lines()]


@pytest.fixture(scope="module")
def sample() -> kmm.trace.TraceLog:
    return kmm.trace.load(SAMPLE_TRACE)


@pytest.fixture(scope="module")
def report(sample) -> kmm.trace.ReplayReport:
    return kmm.trace.replay(sample, kmm.Machine(memory="8G", cpus=2))


def test_sample_replay_has_no_bytes_alloc_disagreement(report, sample_events):
    allocs = [f for n, f in sample_events if n in SLAB_ALLOC and int(f["ptr"], 16) != 0]
    assert report.bytes_alloc_checked == len(allocs) == 30_467
    assert report.bytes_alloc_mismatches == 0, report.mismatch_examples
    assert report.kmm_failures == 0, report.kmm_failure_examples


def test_sample_pages_come_from_the_kernels_zone(report, sample_events):
    # x86_64: DMA below 16 MiB, DMA32 below 4 GiB, Normal above.
    def zone(pfn: int) -> str:
        return "DMA" if pfn < 0x1000 else "DMA32" if pfn < 0x100000 else "Normal"

    kernel = Counter(zone(int(f["pfn"], 16)) for n, f in sample_events if n == "kmem:mm_page_alloc")
    assert report.zone_checked + report.slab_page_allocs == sum(kernel.values())
    assert report.zone_mismatches == 0, report.mismatch_examples
    assert dict(report.zone_pairs) == {("Normal", "Normal"): report.zone_checked}


def test_outcomes_match_an_independent_count(report, sample_events):
    live: set[tuple[str, int]] = set()
    before = nulls = 0
    for n, f in sample_events:
        if n in SLAB_ALLOC:
            live.add(("slab", int(f["ptr"], 16)))
        elif n in SLAB_FREE:
            p = int(f["ptr"], 16) if f["ptr"] != "(nil)" else 0
            if p == 0:
                nulls += 1
            elif ("slab", p) in live:
                live.remove(("slab", p))
            else:
                before += 1
        elif n == "kmem:mm_page_alloc":
            live.add(("page", int(f["pfn"], 16)))
        elif n == "kmem:mm_page_free":
            key = ("page", int(f["pfn"], 16))
            if key in live:
                live.remove(key)
            else:
                before += 1
        elif n == "percpu:percpu_alloc_percpu":
            live.add(("percpu", int(f["ptr"], 16)))
        elif n == "vmalloc:alloc_vmap_area":
            live.add(("vmap", vmap_start(f)))
        elif n == "vmalloc:free_vmap_area_noflush":
            key = ("vmap", int(f["va_start"], 16))
            if key in live:
                live.remove(key)
            else:
                before += 1
        elif n == "percpu:percpu_free_percpu":
            key = ("percpu", int(f["ptr"], 16))
            if key in live:
                live.remove(key)
            else:
                before += 1
    names = Counter(n for n, _ in sample_events)
    assert report.before_trace == before
    assert report.null_frees == nulls == 5_509
    # vmalloc: every alloc_vmap_area (none failed) is replayed; a
    # free_vmap_area_noflush of an area the trace made is replayed, the
    # others freed areas made before the recording; purges are consequences.
    assert report.vmalloc == 0
    assert report.consequences == (
        names["kmem:mm_page_alloc_zone_locked"] + names["kmem:mm_page_free_batched"]
        + names["kmem:mm_page_pcpu_drain"] + names["kmem:mm_page_alloc_extfrag"]
        + names["vmalloc:purge_vmap_area_lazy"]
    )
    # replay-1: every event has exactly one outcome.
    assert report.events == len(sample_events) == 83_084
    assert (
        report.replayed + report.before_trace + report.null_frees + report.failed_in_trace + report.slab_pages
        + report.consequences + report.vmalloc + report.other
    ) == report.events
    assert sum(n for _, n in report.replayed_by_name) == report.replayed
    by = dict(report.replayed_by_name)
    assert by["kmem:kmalloc"] + by["kmem:kmem_cache_alloc"] == 30_467


def test_report_fields_are_sane(report):
    assert report.events_per_second > 0 and report.seconds > 0
    assert len(report.samples) == math.ceil(report.events / 1000) + 1
    assert report.samples[0].event == 0 and report.samples[-1].event == report.events
    assert report.peak_used_pages >= report.final_used_pages >= report.boot_used_pages
    assert report.peak_used_pages == max(report.peak_used_pages, *(s.used_pages for s in report.samples))
    for s in report.samples:
        for z in s.zones:
            assert len(z.nr_free) == len(z.unusable_index) == len(z.fragmentation_index) == kmm.MAX_PAGE_ORDER + 1
            assert all(0 <= u <= 1000 for u in z.unusable_index)
            assert all(-1000 <= f <= 1000 for f in z.fragmentation_index)
    last = {z.zone: z.nr_free for z in report.samples[-1].zones}
    for line in report.buddyinfo.splitlines():
        parts = line.split()
        assert [int(x) for x in parts[4:]] == last[parts[3]]
    assert ("filp", 184, 192, "SLAB_HWCACHE_ALIGN") in report.caches_created
    assert "Replayed" in report.format() and "/proc/buddyinfo" in report.format()


def test_free_at_end_gives_back_the_boot_state(sample):
    m = kmm.Machine(memory="8G", cpus=2)
    boot = buddyinfo(m)
    r = kmm.trace.replay(sample, m, sample_every=0, free_at_end=True)
    assert r.live_at_end > 0 and r.kmm_failures == 0
    # The percpu allocator keeps the pages it populated for its chunk (the
    # kernel depopulates them later, from pcpu_balance_workfn): everything
    # else is back in the buddy allocator.
    percpu_pages = m.proc.meminfo_dict()["Percpu"] // 4
    assert percpu_pages > 0
    # vmalloc's page tables stay too (mm/vmalloc.c never frees them): the
    # replayed vmap areas built a PUD, a PMD and a PTE table.
    table_pages = m.proc.meminfo_dict()["PageTables"] // 4
    assert table_pages == 3
    pages = lambda bi: sum(n << o for zone in bi for o, n in enumerate(zone))  # noqa: E731
    assert pages(buddyinfo(m)) + percpu_pages + table_pages == pages(boot)
    assert m.check() == []
    assert r.samples[-1].event == r.events and len(r.samples) == 1
    names = {line.split()[0] for line in m.proc.slabinfo().splitlines()[2:]}
    assert not names & {name for name, *_ in r.caches_created}


def test_free_at_end_without_percpu_events_is_exactly_the_boot_buddyinfo(tmp_path):
    # Without the percpu events (whose chunk pages percpu keeps) and the
    # vmalloc ones (whose page tables vmalloc keeps), nothing stays allocated.
    p = tmp_path / "no-percpu.txt"
    p.write_text("".join(line for line in sample_trace_lines() if " percpu:" not in line and " vmalloc:" not in line))
    m = kmm.Machine(memory="8G", cpus=2)
    boot = buddyinfo(m)
    r = kmm.trace.replay(kmm.trace.load(p), m, free_at_end=True)
    assert r.replayed > 60_000
    assert buddyinfo(m) == boot
    assert m.check() == []


def test_replay_of_a_kmm_recording_agrees_with_itself():
    src = kmm.Machine(memory="256M")
    cache = src.kmem_cache_create("rt_obj", 200, flags=kmm.SLAB_HWCACHE_ALIGN)
    with src.trace.record("kmem:*,percpu:*") as rec:
        keep = []
        for i in range(400):
            with src.on_cpu(i % 2):
                keep.append(src.kmalloc(1 + 53 * i % 9000, kmm.GFP_KERNEL))
                keep.append(cache.alloc(kmm.GFP_KERNEL))
        for b in keep[::3]:
            if isinstance(b, kmm.Block):
                src.kfree(b)
    t = kmm.trace.parse(rec.to_perf_script())
    r = kmm.trace.replay(t, kmm.Machine(memory="256M"), free_at_end=True)
    assert r.bytes_alloc_mismatches == 0 and r.bytes_alloc_checked == sum(
        1 for e in rec.events if e.name in SLAB_ALLOC
    )
    assert ("rt_obj", 200, 256, "SLAB_HWCACHE_ALIGN") in r.caches_created


def test_replay_refuses_a_thread_bound_to_a_cpu(sample):
    m = kmm.Machine(memory="1G")
    with m.on_cpu(0):
        with pytest.raises(ValueError, match="already runs on cpu 0"):
            kmm.trace.replay(sample, m)


# --- the command ---------------------------------------------------------------


def test_kmm_without_arguments_replays_the_recording(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "Replaying the recording shipped with kmm" in out
    # perf kmem stat of the same perf.data: "Cross CPU allocations: 0/426468".
    assert "slab bytes_alloc differed: 0 of 426,468" in out
    assert "Warm start (the recorded start state" in out
    assert "kmm's dynamics against the kernel's" in out
    assert "End state against the kernel's end.buddyinfo" in out


def test_kmm_demo_still_runs(capsys):
    assert cli.main(["demo", "--memory", "256M"]) == 0
    assert "/proc/buddyinfo at boot" in capsys.readouterr().out


def test_replay_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["replay", "--plot", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err and "linux-kmm[plot]" in err


def test_replay_plot_draws_free_pages_per_order(monkeypatch, tmp_path, report):
    calls: list[tuple] = []

    class Ax:
        def __getattr__(self, name):
            return lambda *a, **k: calls.append((name, a, k))

    class Fig(Ax):
        pass

    pyplot = types.SimpleNamespace(
        subplots=lambda *a, **k: (Fig(), (Ax(), Ax(), Ax())), close=lambda f: None, cm=None
    )
    mpl = types.ModuleType("matplotlib")
    mpl.use = lambda backend: None  # type: ignore[attr-defined]
    mpl.pyplot = pyplot  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    from kmm import plot

    out = tmp_path / "r.png"
    plot.replay_plot(report, str(out))
    labels = [k.get("label") for name, a, k in calls if name == "plot" and k.get("label")]
    assert labels[: kmm.MAX_PAGE_ORDER + 1] == [f"order {o}" for o in range(kmm.MAX_PAGE_ORDER + 1)]
    assert ("savefig", (str(out),), {}) in calls
    first = next(a for name, a, k in calls if name == "plot")
    # Order-0 line: free order-0 pages over all zones at every sample.
    assert list(first[1]) == [sum(z.nr_free[0] for z in s.zones) for s in report.samples]


def test_kmm_replay_of_a_file_with_options(tmp_path, capsys):
    lines = list(sample_trace_lines())[:3000]
    lines.insert(100, "not a trace line\n")
    p = tmp_path / "part.txt"
    p.write_text("".join(lines))
    assert cli.main(["replay", str(p)]) == 1
    assert "line 101" in capsys.readouterr().err
    code = cli.main(["replay", str(p), "--lenient", "--cpus", "1", "--memory", "6G", "--slabinfo", "--free-at-end",
                     "--sample-every", "500"])
    out, err = capsys.readouterr()
    assert code == 0 and "skipped 1 malformed line(s) (first: line 101" in err
    assert "memory=6144 MiB cpus=1" in out
    assert "events on CPUs the machine lacks, run on cpu % cpus:" in out
    assert "/proc/slabinfo at the end:" in out and "slabinfo - version: 2.1" in out
