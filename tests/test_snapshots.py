"""Snapshots and compare_to (issue 6, part 6): what grew, read from the
kernel's own views. Expected values are computed here from the requests
made, with the kernel's rules cited."""

from __future__ import annotations

import pytest

import kmm


@pytest.fixture
def m():
    return kmm.Machine(memory="1G", cpus=2)


def test_identical_snapshots_have_no_differences(m):
    a, b = m.snapshot(), m.snapshot()
    for key_type in kmm.snapshots.KEY_TYPES:
        assert b.compare_to(a, key_type) == []


def test_vmalloc_area_shows_under_its_caller_with_the_guard_page(m):
    old = m.snapshot()
    v = m.vmalloc(100_000)
    new = m.snapshot()
    # mm/vmalloc.c: PAGE_ALIGN(100000) = 25 pages, plus one guard page in vm->size.
    pages = -(-100_000 // m.page_size)
    [d] = new.compare_to(old, "vmalloc")
    assert (d.count, d.count_diff, d.size_diff) == (1, 1, (pages + 1) * m.page_size)
    assert "test_vmalloc_area_shows_under_its_caller" in str(d.key)
    # meminfo VmallocUsed counts the pages (not the guard), in kB.
    used = {x.key: x for x in new.compare_to(old, "meminfo")}["VmallocUsed"]
    assert used.count_diff == pages * m.page_size // 1024
    m.vfree(v)
    # Freed but not yet purged: the area is listed as "unpurged vm_area".
    lazy = {d.key: d for d in m.snapshot().compare_to(new, "vmalloc")}
    assert lazy["(unpurged)"].count_diff == 1
    m.vm_unmap_aliases()
    assert m.snapshot().compare_to(old, "vmalloc") == []


def test_cache_growth_is_whole_slabs(m):
    c = m.kmem_cache_create("snap_obj", 200)
    old = m.snapshot()
    objs = [c.alloc() for _ in range(c.objs_per_slab * 3)]
    grew = {d.key: d for d in m.snapshot().grew(old, "cache")}
    d = grew["snap_obj"]
    # Exactly three full slabs: 3 * objs_per_slab objects, 3 slabs of 2^order pages.
    assert d.count_diff == 3 * c.objs_per_slab
    assert d.size_diff == 3 * (m.page_size << c.order)
    for o in objs:
        c.free(o)


def test_zone_differences_add_up_to_the_pages_taken(m):
    old = m.snapshot()
    free0 = sum(z.free_pages for z in m.zones)
    pages = [m.alloc_pages(kmm.GFP_KERNEL, 4) for _ in range(3)]
    free1 = sum(z.free_pages for z in m.zones)
    diffs = m.snapshot().compare_to(old, "zone")
    # Every (zone, order, migratetype) entry's size is free blocks * block
    # size, so the differences sum to the change in free bytes.
    assert sum(d.size_diff for d in diffs) == (free1 - free0) * m.page_size
    assert free1 < free0
    for p in pages:
        m.free_pages(p, 4)


def test_per_cpu_lists_are_keyed_by_zone_and_cpu(m):
    with m.on_cpu(1):
        old = m.snapshot()
        p = m.alloc_page(kmm.GFP_KERNEL)
        m.free_page(p)
        new = m.snapshot()
    d = {x.key: x for x in new.compare_to(old, "cpu")}
    # An order-0 allocation refills CPU 1's list with a batch (rmqueue_bulk)
    # and the free goes back onto it: only CPU 1's entry changed.
    assert [k[1] for k in d] == [1]
    assert all(x.count_diff > 0 for x in d.values())


def test_bad_key_type_and_bad_argument(m):
    s = m.snapshot()
    with pytest.raises(ValueError, match="unknown key_type 'slab'"):
        s.compare_to(s, "slab")
    with pytest.raises(TypeError):
        s.compare_to(object(), "cache")


def test_module_level_snapshot_uses_the_default_machine(monkeypatch):
    monkeypatch.setattr(kmm, "_default", None)  # restored after the test
    m = kmm.Machine(memory="256M")
    kmm.set_default_machine(m)
    s = kmm.snapshot()
    assert isinstance(s, kmm.Snapshot)
    assert s.memory == 256 << 20
