"""kmm's own tracepoints (kmap, kmap_local, kernel-range TLB flushes) and
the per-CPU recording buffers (issue 6, part 1). Expected values follow
mm/highmem.c and arch/x86/mm/tlb.c, computed here independently."""

from __future__ import annotations

import kmm


def test_kmap_events_carry_slot_and_count():
    m = kmm.Machine(arch="i386", memory="2G", cpus=2)
    p = m.alloc_pages(kmm.GFP_HIGHUSER, 0)
    with m.trace.record("kmm:*") as rec:
        a = m.kmap(p)
        m.kunmap(p)
    ev = [(e.name, e.fields) for e in rec.events]
    # map_new_virtual scans from last_pkmap_nr + 1: the first slot is 1;
    # pkmap_count goes 0 -> 1 (mapped) -> 2 (one user), back to 1 on kunmap.
    assert ev == [
        ("kmm:kmap", {"pfn": p.pfn, "addr": a, "nr": 1, "count": 2}),
        ("kmm:kunmap", {"pfn": p.pfn, "addr": a, "nr": 1, "count": 1}),
    ]
    assert a == m.pkmap_base + 1 * m.page_size


def test_kmap_local_events_and_the_window_flush():
    m = kmm.Machine(arch="i386", memory="2G", cpus=2)
    p = m.alloc_pages(kmm.GFP_HIGHUSER, 0)
    with m.trace.record("kmm:*") as rec, m.on_cpu(1):
        with m.kmap_local_page(p) as mem:
            addr = mem.addr
        m.kmap(p)
        m.kunmap(p)
        m.kmap_flush_unused()
    names = [e.name for e in rec.events]
    assert names == ["kmm:kmap_local", "kmm:kunmap_local", "kmm:kmap", "kmm:kunmap", "kmm:tlb_flush_kernel_range"]
    local = rec.events[0].fields
    # __fix_to_virt(FIX_KMAP_BEGIN + idx + KM_MAX_IDX * cpu): idx 0 on cpu 1.
    assert local == {"pfn": p.pfn, "addr": addr, "idx": 0}
    assert rec.events[1].fields == {"addr": addr, "idx": 0}
    flush = rec.events[4]
    # The whole pkmap window (LAST_PKMAP = 1024 pages) is more than the
    # 33-page ceiling: a full flush (-1), one IPI to the other CPU.
    assert flush.cpu == 1
    assert flush.fields == {
        "start": m.pkmap_base,
        "end": m.pkmap_base + 1024 * m.page_size,
        "pages": -1,
        "ipis": 1,
    }
    assert "pages=-1 ipis=1" in rec.to_perf_script()


def test_a_small_range_flush_counts_its_pages():
    m = kmm.Machine(cpus=4)
    with m.trace.record("kmm:tlb_flush_kernel_range") as rec:
        m.flush_tlb_kernel_range(m.vmalloc_start, m.vmalloc_start + 3 * m.page_size)
    [e] = rec.events
    assert e.fields["pages"] == 3 and e.fields["ipis"] == 3


def test_recording_buffers_are_per_cpu_and_bounded():
    m = kmm.Machine(cpus=2)
    with m.trace.record("kmem:kmalloc", capacity=10) as rec:
        with m.on_cpu(0):
            blocks = [m.kmalloc(32) for _ in range(25)]
        with m.on_cpu(1):
            blocks += [m.kmalloc(32) for _ in range(4)]
    # CPU 0's buffer keeps its first 10 events and drops 15; CPU 1's keeps 4.
    assert len(rec) == 14
    assert rec.lost == 15
    cpus = [e.cpu for e in rec.events]
    assert cpus.count(0) == 10 and cpus.count(1) == 4
    ts = [e.timestamp for e in rec.events]
    assert ts == sorted(ts), "merged in timestamp order"
    kept = [e.fields["ptr"] for e in rec.events if e.cpu == 0]
    assert kept == [b.addr for b in blocks[:10]]
    for b in blocks:
        m.kfree(b)


def test_every_tracepoint_has_a_system_and_a_name():
    names = kmm.TRACEPOINTS
    assert len(names) == len(set(names))
    for n in names:
        system, _, event = n.partition(":")
        assert system in {"kmem", "percpu", "vmalloc", "kmm"} and event
    assert {"kmm:kmap", "kmm:kunmap", "kmm:kmap_local", "kmm:kunmap_local", "kmm:tlb_flush_kernel_range"} <= set(names)
