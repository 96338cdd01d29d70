"""Simulated time through Python: ``Machine.time_ns``, ``advance_time``,
``decay_pcp_high`` and ``pcp_state``, and the clock of a replay. The
kernel's rules (mm/vmstat.c vmstat_update, mm/page_alloc.c decay_pcp_high,
kernel/time/timer.c round_jiffies_common) are restated here and the
expected values computed from them; rust/kmm-core/tests/clock.rs has the
finer cases."""

from __future__ import annotations

import pytest

import kmm

S = 1_000_000_000


def kernel_decay(p: dict) -> tuple[int, int]:
    """decay_pcp_high (6.18): (count, high) after one run."""
    count, high = p["count"], p["high"]
    if high > p["high_min"]:
        high = max(count - (p["batch"] << 5), high - (high >> 3), p["high_min"])
    return min(count, high), high


def fill_pcp(m: kmm.Machine, cpu: int, n: int) -> None:
    """Allocate n pages on cpu and free them there: they stop on its pcp list."""
    with m.on_cpu(cpu):
        pages = [m.alloc_pages(kmm.GFP_KERNEL, 0) for _ in range(n)]
        for p in pages:
            m.free_pages(p)


def test_the_clock_starts_at_zero_and_never_goes_back():
    m = kmm.Machine(memory="64M", cpus=2)
    assert m.time_ns == 0
    assert m.advance_time(5 * S) == 0, "the first advance only starts the clock"
    assert m.time_ns == 5 * S
    assert m.advance_time(4 * S) == 0
    assert m.time_ns == 5 * S
    assert m.advance_time(5 * S) == 0
    # Each CPU's worker runs at the next whole second (cpu 1 12 ms earlier).
    assert m.advance_time(6 * S + 1) == 2
    assert m.time_ns == 6 * S + 1
    assert m.check() == []


def test_decay_pcp_high_by_the_kernel_formula():
    m = kmm.Machine(memory="64M", cpus=2)
    fill_pcp(m, 0, 600)
    p = m.pcp_state("DMA32", 0)
    assert p["count"] > 0 and p["high"] > p["high_min"], p
    drained = 0
    with m.trace.record("kmem:mm_page_pcpu_drain") as rec:
        for _ in range(40):
            count, high = kernel_decay(p)
            todo = m.decay_pcp_high("DMA32", 0)
            q = m.pcp_state("DMA32", 0)
            assert (q["count"], q["high"]) == (count, high), (p, q)
            assert (todo > 0) == (high > p["high_min"] or count < p["count"])
            drained += p["count"] - count
            p = q
    assert p["high"] == p["high_min"]
    assert len(rec) == drained and all(e.cpu == 0 for e in rec.events)
    assert m.check() == []


def test_decay_pcp_high_and_pcp_state_refuse_what_does_not_exist():
    m = kmm.Machine(memory="64M", cpus=2)
    with pytest.raises(ValueError, match='no zone "Highmem" on this machine'):
        m.decay_pcp_high("Highmem", 0)
    with pytest.raises(ValueError, match="cpu 2 out of range"):
        m.decay_pcp_high("DMA32", 2)
    with pytest.raises(ValueError, match="cpu 7 out of range"):
        m.pcp_state("DMA32", 7)
    with pytest.raises(OverflowError):
        m.advance_time(-1)


def test_timer_work_decays_an_idle_cpus_high_every_second():
    m = kmm.Machine(memory="64M", cpus=2)
    fill_pcp(m, 0, 600)
    start = m.pcp_state("DMA32", 0)
    m.advance_time(100 * S)
    # Second by second: cpu 0's worker decays once a second, on whole seconds.
    p = start
    for sec in range(101, 111):
        m.advance_time(sec * S)
        want = kernel_decay(p)
        p = m.pcp_state("DMA32", 0)
        assert (p["count"], p["high"]) == want, sec
    assert p["high"] < start["high"]
    assert m.check() == []


def line(t: float, text: str, cpu: int = 0) -> str:
    return f"kmm 1 [{cpu:03d}] {t:.6f}: kmem:{text}\n"


TRACE = "".join([
    line(10.0, "mm_page_alloc: page=0x2000 pfn=0x2000 order=0 migratetype=0 gfp_flags=GFP_KERNEL"),
    line(12.5, "mm_page_alloc: page=0x2100 pfn=0x2100 order=0 migratetype=0 gfp_flags=GFP_KERNEL", cpu=1),
    line(14.5, "mm_page_free: page=0x2000 pfn=0x2000 order=0"),
])


def test_a_replay_moves_the_clock_to_each_event():
    m = kmm.Machine(memory="64M", cpus=2)
    with m.trace.record("kmem:mm_page_alloc,kmem:mm_page_free") as rec:
        r = kmm.trace.replay(kmm.trace.parse(TRACE), m)
    assert m.time_ns == 14_500_000_000
    assert [e.timestamp for e in rec.events] == [10 * S, 12_500_000_000, 14_500_000_000]
    assert [e.cpu for e in rec.events] == [0, 1, 0]
    assert r.timer_runs >= 2 and r.sim_ns == 4_500_000_000
    assert m.check() == []


def test_a_replay_without_time_leaves_the_clock_alone():
    m = kmm.Machine(memory="64M", cpus=2)
    r = kmm.trace.replay(kmm.trace.parse(TRACE), m, time=False)
    assert m.time_ns == 0 and r.timer_runs == 0
    assert r.replayed == 3
