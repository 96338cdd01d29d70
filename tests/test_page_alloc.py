"""The page allocator from Python: alloc/free, addresses, zeroing, errors."""

from __future__ import annotations

import logging

import pytest

import kmm
from conftest import assert_healthy, buddyinfo


def test_alloc_pages_returns_a_page_view(m):
    p = m.alloc_pages(kmm.GFP_KERNEL, 3)
    assert isinstance(p, kmm.Page)
    assert p.order == 3
    assert p.refcount == 1
    assert p.pfn % 8 == 0  # buddy blocks are naturally aligned
    assert p.zone in ("DMA32", "DMA")
    assert p.flags == []  # not compound
    q = m.alloc_pages(kmm.GFP_KERNEL | kmm.__GFP_COMP, 2)
    assert "head" in q.flags
    assert "tail" in m.pfn_to_page(q.pfn + 1).flags
    assert m.page_to_pfn(p) == p.pfn
    assert m.pfn_to_page(p.pfn) == p
    m.free_pages(p, 3)
    m.free_pages(q, 2)
    assert "tail" not in m.pfn_to_page(q.pfn + 1).flags
    assert_healthy(m)


def test_free_pages_restores_buddyinfo_exactly(m):
    before = buddyinfo(m)
    pages = [(m.alloc_pages(kmm.GFP_KERNEL, o % 11), o % 11) for o in range(60)]
    assert buddyinfo(m) != before
    for p, o in reversed(pages):
        m.free_pages(p, o)
    assert buddyinfo(m) == before
    assert_healthy(m)


def test_addresses_round_trip(m):
    p = m.alloc_page(kmm.GFP_KERNEL)
    a = m.page_address(p)
    assert a == m.page_offset + p.pfn * 4096  # x86_64 __va: PAGE_OFFSET + phys
    assert m.page_offset == 0xFFFF888000000000
    assert m.virt_to_phys(a) == p.pfn * 4096
    assert m.virt_to_page(a + 123) == p
    assert m.phys_to_virt(p.phys) == a
    m.free_page(a)  # by address
    assert "buddy" in m.pfn_to_page(p.pfn).flags or m.pfn_to_page(p.pfn).refcount == 0


def test_get_free_pages_and_zeroing(m):
    a = m.__get_free_pages(kmm.GFP_KERNEL, 1)
    m.write(a, b"\xab" * 8192)
    assert m.read(a, 8192) == b"\xab" * 8192
    m.free_pages(a, 1)
    b = m.get_free_pages(kmm.GFP_KERNEL | kmm.__GFP_ZERO, 1)
    assert b == a  # the same block comes back (LIFO free lists)
    assert m.read(b, 8192) == bytes(8192)
    z = m.get_zeroed_page(kmm.GFP_KERNEL)
    assert m.read(z, 4096) == bytes(4096)
    m.free_pages(b, 1)
    m.free_page(z)


def test_bytes_survive_other_allocations(small):
    m = small
    keep = m.get_free_pages(kmm.GFP_KERNEL, 2)
    m.write(keep, bytes(range(256)) * 64)
    others = [m.get_free_pages(kmm.GFP_KERNEL | kmm.__GFP_ZERO, o) for o in (0, 1, 2, 3)]
    for o, a in zip((0, 1, 2, 3), others):
        m.free_pages(a, o)
    assert m.read(keep, 16384) == bytes(range(256)) * 64
    m.free_pages(keep, 2)


def test_i386_highmem_has_no_page_address():
    m = kmm.Machine(arch="i386", memory="2G")
    p = m.alloc_pages(kmm.GFP_HIGHUSER, 0)
    assert p.zone == "HighMem" and p.highmem
    assert m.page_address(p) is None
    assert p.address is None
    # __get_free_pages masks __GFP_HIGHMEM (get_free_pages_noprof): lowmem only.
    a = m.get_free_pages(kmm.GFP_HIGHUSER, 0)
    assert not m.virt_to_page(a).highmem
    m.free_pages(a, 0)
    low = m.alloc_pages(kmm.GFP_KERNEL, 0)
    assert low.zone == "Normal"
    assert m.page_address(low) == 0xC0000000 + low.pfn * 4096
    m.free_pages(p)
    m.free_pages(low)
    assert_healthy(m)


def test_i386_pae_and_large_page_sizes():
    m = kmm.Machine(arch="i386-pae", memory="8G")
    assert [z.name for z in m.zones if z.populated] == ["DMA", "Normal", "HighMem"]
    assert m.pageblock_order == 9
    assert kmm.Machine(arch="i386", memory="1G").pageblock_order == 10
    for ps in (8192, 16384, 65536):
        big = kmm.Machine(memory="256M", page_size=ps)
        assert big.page_size == ps
        p = big.alloc_pages(kmm.GFP_KERNEL, 0)
        assert big.page_address(p) == big.page_offset + p.pfn * ps
        big.free_pages(p)
        assert_healthy(big)
    with pytest.raises(ValueError):
        kmm.Machine(page_size=12345)


def test_64g_machine_boots_sparse():
    m = kmm.Machine(memory="64G")
    assert m.nr_pages == 64 << 18
    normal = [z for z in m.zones if z.name == "Normal"][0]
    assert normal.start_pfn == 1 << 20
    p = m.alloc_pages(kmm.GFP_KERNEL, 10)
    assert p.zone == "Normal"
    m.free_pages(p, 10)


def test_errors_change_nothing_and_use_kernel_words(small):
    m = small
    p = m.alloc_pages(kmm.GFP_KERNEL, 2)
    before = buddyinfo(m)
    with pytest.raises(kmm.InvalidFreeError, match="order 1 but allocated with order 2"):
        m.free_pages(p, 1)
    with pytest.raises(kmm.InvalidFreeError, match="not the first page"):
        m.free_pages(m.pfn_to_page(p.pfn + 1), 0)
    with pytest.raises(kmm.InvalidFreeError, match="not page aligned"):
        m.free_pages(m.page_address(p) + 8, 2)
    with pytest.raises(kmm.InvalidFreeError):
        m.free_pages(0x1234, 0)  # not a direct-map address
    with pytest.raises(kmm.InvalidFreeError, match="reserved"):
        m.free_pages(m.pfn_to_page(0), 0)
    with pytest.raises(TypeError):
        m.free_pages("page", 0)
    assert buddyinfo(m) == before
    m.free_pages(p, 2)
    after = buddyinfo(m)
    with pytest.raises(kmm.DoubleFreeError, match="double free or corruption"):
        m.free_pages(p, 2)
    with pytest.raises(kmm.DoubleFreeError):
        m.free_pages(m.pfn_to_page(p.pfn + 1), 0)  # inside a free block
    assert buddyinfo(m) == after
    assert isinstance(kmm.DoubleFreeError("x"), ValueError)
    assert_healthy(m)


def test_pages_of_another_machine_are_refused(m, small):
    p = small.alloc_page(kmm.GFP_KERNEL)
    with pytest.raises(ValueError, match="another Machine"):
        m.free_pages(p, 0)
    small.free_pages(p, 0)


def test_out_of_memory_is_logged_unless_nowarn(small, caplog):
    m = small
    caplog.set_level(logging.WARNING, logger="kmm")
    with pytest.raises(kmm.OutOfMemoryError) as ei:
        m.alloc_pages(kmm.GFP_KERNEL, 11)
    assert isinstance(ei.value, MemoryError)
    assert "page allocation failure: order:11, mode:0xcc0(GFP_KERNEL)" in str(ei.value)
    assert any("page allocation failure: order:11" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with pytest.raises(kmm.OutOfMemoryError):
        m.alloc_pages(kmm.GFP_KERNEL | kmm.__GFP_NOWARN, 11)
    assert caplog.records == []


def _drain(m, gfp, order=0):
    got = []
    while True:
        try:
            got.append(m.alloc_pages(gfp | kmm.__GFP_NOWARN, order))
        except kmm.OutOfMemoryError:
            return got


def test_watermarks_atomic_dips_below_min_and_nofail(small):
    m = small
    dma = lambda: [z for z in m.zones if z.name == "DMA"][0]  # noqa: E731
    # The watermark is checked before each allocation; a per-CPU list refill
    # then takes up to a batch at once: at most batch << PCP_BATCH_SCALE_MAX
    # = 1 << 5 pages for the DMA zone (batch 1), which bounds the overshoot.
    overshoot = 32
    kernel = _drain(m, kmm.GFP_KERNEL | kmm.GFP_DMA)
    z = dma()
    # GFP_KERNEL stops at the min watermark (slow path, ALLOC_WMARK_MIN).
    assert z.min - overshoot < z.free_pages <= z.min
    # GFP_ATOMIC (__GFP_HIGH, cannot block) may go down to 3/8 of min.
    atomic = _drain(m, kmm.GFP_ATOMIC | kmm.GFP_DMA)
    assert atomic
    z = dma()
    assert z.min * 3 // 8 - overshoot < z.free_pages <= z.min * 3 // 8 + 1
    # __GFP_NOFAIL never fails while a page exists.
    nofail = _drain(m, kmm.GFP_KERNEL | kmm.GFP_DMA | kmm.gfp.__GFP_NOFAIL)
    z = dma()
    assert nofail and z.free_pages == 0
    # __GFP_MEMALLOC ignores watermarks too, but nothing is left now.
    with pytest.raises(kmm.OutOfMemoryError):
        m.alloc_pages(kmm.GFP_ATOMIC | kmm.GFP_DMA | kmm.gfp.__GFP_MEMALLOC | kmm.__GFP_NOWARN)
    for p in kernel + atomic + nofail:
        m.free_pages(p)
    assert_healthy(m)


def test_lowmem_reserve_protects_dma(small):
    m = small
    # GFP_KERNEL may fall back into DMA only while DMA keeps min + protection free.
    got = _drain(m, kmm.GFP_KERNEL)
    dma = [z for z in m.zones if z.name == "DMA"][0]
    dma32_idx = [z.name for z in m.zones].index("DMA32")
    normal_idx = [z.name for z in m.zones].index("Normal")
    # highest_zoneidx of GFP_KERNEL is Normal on x86_64.
    assert dma.lowmem_reserve[normal_idx] > 0
    # Stopped at min + protection (less at most one per-CPU refill, 32 pages).
    protected = dma.min + dma.lowmem_reserve[normal_idx]
    assert protected - 32 < dma.free_pages <= protected
    assert dma.lowmem_reserve[dma32_idx] <= dma.lowmem_reserve[normal_idx]
    # Yet a GFP_DMA request can still use DMA's pages.
    extra = m.alloc_pages(kmm.GFP_DMA | kmm.GFP_KERNEL)
    assert extra.zone == "DMA"
    for p in got + [extra]:
        m.free_pages(p)
    assert_healthy(m)


def test_module_level_functions_use_the_default_machine():
    d = kmm.default_machine()
    assert d is kmm.default_machine()
    p = kmm.alloc_pages(kmm.GFP_KERNEL, 1)
    assert kmm.page_to_pfn(p) == p.pfn
    addr = kmm.get_free_page(kmm.GFP_KERNEL)
    kmm.write(addr, b"x")
    assert kmm.read(addr, 1) == b"x"
    kmm.free_page(addr)
    kmm.free_pages(p, 1)
    m2 = kmm.Machine(memory="32M")
    kmm.set_default_machine(m2)
    try:
        assert kmm.default_machine() is m2
    finally:
        kmm.set_default_machine(d)


def test_machine_arguments_are_validated():
    with pytest.raises(ValueError, match="arch"):
        kmm.Machine(arch="sparc")
    with pytest.raises(ValueError):
        kmm.Machine(memory="1K")
    with pytest.raises(ValueError):
        kmm.Machine(memory="lots")
    with pytest.raises(ValueError):
        kmm.Machine(cpus=0)
    with pytest.raises(TypeError):
        kmm.Machine(memory=1.5)
    assert kmm.Machine(memory=64 << 20).memory == 64 << 20
    assert kmm.parse_size("2G") == 2 << 30


def test_high_order_atomic_reserves_a_highatomic_pageblock(m):
    # Bring every zone below its low watermark (+ protection), so GFP_ATOMIC
    # fails the fast path everywhere and takes the slow path (ALLOC_HIGHATOMIC
    # for order > 0 with __GFP_HIGH), which reserves a pageblock.
    big = _drain(m, kmm.GFP_KERNEL, 9)
    small = _drain(m, kmm.GFP_KERNEL, 0)
    z = [z for z in m.zones if z.name == "DMA32"][0]
    assert z.free_pages < z.low and z.nr_reserved_highatomic == 0
    a = m.alloc_pages(kmm.GFP_ATOMIC, 1)
    z = [z for z in m.zones if z.name == "DMA32"][0]
    assert z.nr_reserved_highatomic == 512  # one pageblock (zone managed/100 >= pageblock)
    assert z.pageblocks["HighAtomic"] == 1
    assert m.pfn_to_page(a.pfn).migratetype == "HighAtomic"
    assert a.zone == "DMA32"
    m.free_pages(a, 1)
    for p in big:
        m.free_pages(p, 9)
    for p in small:
        m.free_pages(p, 0)
    assert_healthy(m)


def test_i386_needs_4k_pages():
    # x86's 32-bit layout (896 MiB direct map, vmalloc, pkmap, fixmap in 4 GiB)
    # exists only with 4 KiB pages.
    for arch in ("i386", "i386-pae"):
        with pytest.raises(ValueError, match="not supported on"):
            kmm.Machine(arch=arch, page_size=16384)
