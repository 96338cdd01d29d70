"""Regressions found by the review of the recording replay (issue 10): each
test is one finding, with the input that broke kmm."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import kmm

WARM2 = Path(kmm.__file__).parent / "data" / "warm2"


def line(t: float, name: str, text: str, cpu: int = 0) -> str:
    return f"kmm 1 [{cpu:03d}] {t:.6f}: {name}: {text}\n"


def bundle(d: Path, trace: str, edit: dict | None = None) -> Path:
    """warm2's /proc files with a hand-written trace."""
    d.mkdir()
    (d / "perf.txt").write_text(trace)
    for src in WARM2.glob("*.txt"):
        text = src.read_text()
        if edit and src.name in edit:
            text = edit[src.name](text)
        (d / src.name).write_text(text)
    return d


def finishes(fn, seconds: float = 60.0) -> bool:
    """Run fn on a thread; False if it is still running after `seconds`."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def test_advance_time_to_the_end_of_time_returns():
    m = kmm.Machine(memory="64M")
    m.advance_time(2**64 - 5 * 10**9)
    assert finishes(lambda: m.advance_time(2**64 - 1))
    assert m.time_ns <= 2**64 - 1
    assert m.check() == []


def test_a_trace_spanning_centuries_replays():
    trace = (line(10.0, "kmem:mm_page_alloc", "page=0x2000 pfn=0x2000 order=0 migratetype=0 gfp_flags=GFP_KERNEL")
             + "kmm 1 [000] 18446744073.709551: kmem:mm_page_free: page=0x2000 pfn=0x2000 order=0\n")
    t = kmm.trace.parse(trace)
    out = {}
    assert finishes(lambda: out.setdefault("r", kmm.trace.replay(t, kmm.Machine(memory="64M"))))
    assert out["r"].events == 2


def test_a_trace_naming_cpu_4294967295_does_not_abort(tmp_path):
    # Run in a child: the old code aborted the whole interpreter.
    p = tmp_path / "bigcpu.txt"
    p.write_text(line(1.0, "kmem:mm_page_alloc", "page=0x2000 pfn=0x2000 order=0 migratetype=0 gfp_flags=GFP_KERNEL",
                      cpu=4294967295))
    code = textwrap.dedent(f"""
        import kmm
        t = kmm.trace.load({str(p)!r})
        r = kmm.trace.replay(t, kmm.Machine(memory="64M", cpus=2))
        assert r.trace_cpus_remapped == 1, r.trace_cpus_remapped
        m = kmm.trace.machine_for(t)
        assert m.cpus == 1024, m.cpus
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_tiny_zone_with_a_big_free_block_is_a_warning(tmp_path):
    def tiny_dma(t: str) -> str:
        return t.replace("spanned  4095", "spanned  200").replace("present  3998", "present  200") \
                .replace("managed  3840", "managed  200")
    trace = line(1189.0, "kmem:mm_page_alloc", "page=0x100000 pfn=0x100000 order=0 migratetype=1 gfp_flags=GFP_KERNEL")
    rec = kmm.trace.load(bundle(tmp_path / "b", trace, {"start.zoneinfo.txt": tiny_dma}))
    m = rec.machine()
    assert any("DMA: placed" in w for w in rec.machine_info["warnings"]), rec.machine_info["warnings"]
    assert m.check() == []
    r = kmm.trace.replay(rec, m)
    assert r.kmm_failures == 0 and m.check() == []


def test_a_sink_attached_during_advance_time_can_call_back():
    m = kmm.Machine(memory="256M", cpus=2)
    with m.on_cpu(1):
        pages = [m.alloc_pages(kmm.GFP_KERNEL, 0) for _ in range(20000)]
        for p in pages:
            m.free_pages(p, 0)
    m.advance_time(1)
    calls = []

    def sink(ev):
        calls.append(m.check())  # takes the clock's lock: must not be held here

    advancer = threading.Thread(target=lambda: m.advance_time(10**16), daemon=True)
    advancer.start()
    h = m.trace.attach("kmem:mm_page_pcpu_drain", sink)
    advancer.join(60)
    assert not advancer.is_alive()
    h.detach()
    assert all(c == [] for c in calls)


def test_a_misaligned_pre_trace_free_is_not_placed(tmp_path):
    trace = (line(1188.2, "kmem:mm_page_free", "page=0x100001 pfn=0x100001 order=3")
             + line(1188.3, "kmem:mm_page_alloc", "page=0x100400 pfn=0x100400 order=0 migratetype=1 gfp_flags=GFP_KERNEL"))
    rec = kmm.trace.load(bundle(tmp_path / "b", trace))
    m = rec.machine()
    assert any("not aligned to their order" in w for w in rec.machine_info["warnings"])
    kmm.trace.replay(rec, m)
    m.drain_all_pages()
    assert m.check() == []


def test_a_second_replay_on_one_warm_machine_frees_nothing_of_the_first(tmp_path):
    trace = (line(1188.2, "kmem:mm_page_free", "page=0x100400 pfn=0x100400 order=2")
             + line(1188.3, "kmem:mm_page_alloc", "page=0x100400 pfn=0x100400 order=2 migratetype=1 gfp_flags=GFP_KERNEL"))
    rec = kmm.trace.load(bundle(tmp_path / "b", trace))
    m = rec.machine()
    r1 = kmm.trace.replay(rec, m)
    assert r1.warm and r1.before_trace == 0  # the pre-trace block was freed on warm memory
    free_after_first = sum(z.free_pages for z in m.zones)
    r2 = kmm.trace.replay(rec, m)
    assert not r2.warm
    assert any("used by an earlier replay" in w for w in r2.warnings)
    assert r2.before_trace == 1  # the free is not taken for the first replay's live block
    # The second replay allocated one more order-2 block and freed nothing.
    assert sum(z.free_pages for z in m.zones) <= free_after_first
    assert m.check() == []


def test_absurd_pageset_values_are_clamped(tmp_path):
    def huge_high(t: str) -> str:
        return t.replace("high:     43038", "high:     18446744073709551615")
    trace = line(1188.2, "kmem:mm_page_alloc", "page=0x100400 pfn=0x100400 order=0 migratetype=1 gfp_flags=GFP_KERNEL")
    rec = kmm.trace.load(bundle(tmp_path / "b", trace, {"start.zoneinfo.txt": huge_high}))
    m = rec.machine()
    before = m.pcp_state("Normal", 1)
    assert before["count"] == 39678 and before["high"] <= before["high_max"]
    m.advance_time(1190 * 10**9)
    after = m.pcp_state("Normal", 1)
    # One decay takes at most batch << 5 (2016) pages: count - high can only
    # shrink by that per second, never everything at once.
    assert after["count"] >= 39678 - 2 * 2016
    assert m.check() == []


def test_warm2_short_traces_keep_dma32s_pageblocks(tmp_path):
    trace = line(1188.2, "kmem:mm_page_alloc", "page=0x100400 pfn=0x100400 order=0 migratetype=1 gfp_flags=GFP_KERNEL")
    rec = kmm.trace.load(bundle(tmp_path / "b", trace))
    m = rec.machine()
    assert not any("pageblocks" in w for w in rec.machine_info["warnings"]), rec.machine_info["warnings"]
    assert m.proc.pagetypeinfo() == (WARM2 / "start.pagetypeinfo.txt").read_text()
