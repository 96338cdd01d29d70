"""Tracepoints: names, fields and text as the kernel (and perf script) print them."""

from __future__ import annotations

import re
import sys

import pytest

import kmm


def test_record_page_events(small):
    m = small
    with m.trace.record("kmem:mm_page_alloc,kmem:mm_page_free") as rec:
        p = m.alloc_pages(kmm.GFP_KERNEL | kmm.__GFP_ZERO, 2)
        m.free_pages(p, 2)
    ev = rec.events
    assert [e.name for e in ev] == ["kmem:mm_page_alloc", "kmem:mm_page_free"]
    a, f = ev
    assert a.fields == {"pfn": p.pfn, "order": 2, "migratetype": 0, "gfp_flags": 0xDC0}
    assert a.text == f"page={p.pfn:#x} pfn={p.pfn:#x} order=2 migratetype=0 gfp_flags=GFP_KERNEL|__GFP_ZERO"
    assert f.text == f"page={p.pfn:#x} pfn={p.pfn:#x} order=2"
    assert a["order"] == 2
    assert a.timestamp <= f.timestamp


def test_zone_locked_event_has_percpu_refill(small):
    m = small
    # An order-0 request refills this CPU's list with a batch taken under the
    # zone lock: every page of the batch from __rmqueue_smallest is traced
    # with percpu_refill=1 (pcp_allowed_order && migratetype < PCPTYPES). The
    # first unmovable allocation claims a whole order-10 block and splits it
    # with expand() directly (not traced), as in the kernel.
    with m.trace.record("mm_page_alloc_zone_locked") as rec:
        p0 = m.alloc_pages(kmm.GFP_KERNEL, 0)
        n0 = len(rec)
        p4 = m.alloc_pages(kmm.GFP_HIGHUSER_MOVABLE, 4)
    ev = rec.events
    assert n0 >= 1
    assert all(e.fields["order"] == 0 and e.fields["percpu_refill"] is True for e in ev[:n0])
    # Order 4 is not cached per CPU: straight from the buddy lists.
    e4 = ev[-1]
    assert len(ev) == n0 + 1
    assert e4.fields["percpu_refill"] is False
    assert e4.fields["migratetype"] == 1
    assert e4.text.endswith("order=4 migratetype=1 percpu_refill=0")
    m.free_pages(p0)
    m.free_pages(p4, 4)


def test_failed_allocation_is_traced_with_null_page(small):
    m = small
    got = []
    with m.trace.record("kmem:mm_page_alloc") as rec:
        with pytest.raises(kmm.OutOfMemoryError):
            while True:
                got.append(m.alloc_pages(kmm.GFP_DMA | kmm.__GFP_NOWARN, 10))
    ev = rec.events
    assert len(ev) == len(got) + 1
    assert ev[-1].text == "page=(nil) pfn=0x0 order=10 migratetype=0 gfp_flags=GFP_DMA|__GFP_NOWARN"
    for p in got:
        m.free_pages(p, 10)


def test_extfrag_when_unmovable_claims_a_movable_pageblock(small):
    m = small
    # Every pageblock starts MIGRATE_MOVABLE, so the first unmovable request
    # of a pageblock-sized chunk claims one (mm_page_alloc_extfrag).
    with m.trace.record("kmem:mm_page_alloc_extfrag") as rec:
        p = m.alloc_pages(kmm.GFP_KERNEL, 0)
    (e,) = rec.events
    f = e.fields
    assert f["alloc_migratetype"] == 0 and f["fallback_migratetype"] == 1
    assert f["pageblock_order"] == 9
    assert f["fragmenting"] is (f["fallback_order"] < 9)
    assert f["change_ownership"] is True
    assert p.migratetype == "Unmovable"
    z = [z for z in m.zones if z.name == p.zone][0]
    # A block of pageblock order or more is claimed whole: all its pageblocks.
    assert z.pageblocks["Unmovable"] == 1 << max(0, f["fallback_order"] - 9)
    m.free_pages(p)


def test_attach_calls_back_and_detach_stops(small):
    m = small
    seen = []
    h = m.trace.attach("kmem:mm_page_*", seen.append)
    p = m.alloc_pages(kmm.GFP_KERNEL, 0)
    m.free_pages(p)
    names = [e.name for e in seen]
    assert "kmem:mm_page_alloc" in names and "kmem:mm_page_free" in names
    assert h.detach() is True
    n = len(seen)
    m.free_pages(m.alloc_pages(kmm.GFP_KERNEL, 0))
    assert len(seen) == n
    assert h.detach() is False


def test_callback_errors_do_not_break_the_allocator(small, monkeypatch):
    m = small
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    def bad(e):
        raise RuntimeError("callback failed")

    with m.trace.attach("kmem:mm_page_alloc", bad):
        p = m.alloc_pages(kmm.GFP_KERNEL, 0)
    m.free_pages(p)
    assert m.check() == []
    assert len(reported) == 1 and isinstance(reported[0].exc_value, RuntimeError)


def test_perf_script_text_has_perfs_layout(small):
    m = small
    with m.trace.record("kmem:mm_page_alloc") as rec:
        p = m.alloc_pages(kmm.GFP_KERNEL, 0)
    m.free_pages(p)
    line = rec.to_perf_script(comm="python3", pid=42).rstrip("\n")
    # The real trace's layout: comm, pid, [cpu], secs.usecs:, event name right-aligned, fields.
    real = "            perf  5217 [001]   329.329170:             kmem:mm_page_alloc: page=0x1057ab pfn=0x1057ab order=0 migratetype=0 gfp_flags=GFP_HIGHUSER|__GFP_ACCOUNT"
    pat = r"^\s*(\S+)\s+(\d+) \[(\d{3})\]\s+(\d+\.\d{6}):\s+(kmem:\w+): (.*)$"
    assert re.match(pat, real)
    g = re.match(pat, line).groups()
    assert g[0] == "python3" and g[1] == "42" and g[4] == "kmem:mm_page_alloc"
    assert line.index("kmem:") == real.index("kmem:")


def test_unknown_pattern_is_an_error(small):
    with pytest.raises(ValueError, match="no tracepoint"):
        small.trace.record("kmem:nonesuch")
    assert "kmem:mm_page_alloc" in small.trace.available()
