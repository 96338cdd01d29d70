"""The kmalloc family from Python: size classes, families, large kmalloc,
zeroing, krealloc, and every kmalloc of a real Linux 6.18 trace replayed.

Expected values come from the kernel (include/linux/slab.h kmalloc_index,
mm/slab_common.c kmalloc_info / kmalloc_type / krealloc, mm/slub.c
__kmalloc_large_node), the real trace and /proc data in tests/data, or are
computed here independently.
"""

from __future__ import annotations

import re

import pytest

import kmm
from conftest import assert_healthy, buddyinfo, real, sample_trace_lines, free_pages

PAGE = 4096
RECLAIMABLE = kmm.gfp.__GFP_RECLAIMABLE


def size_class(n: int) -> int:
    """kmalloc_index() as a size: 8, 16, 32, 64, 96, 128, 192, then powers of two."""
    for c in (8, 16, 32, 64, 96, 128, 192):
        if n <= c:
            return c
    c = 256
    while c < n:
        c *= 2
    return c


def class_name(c: int) -> str:
    return {1024: "1k", 2048: "2k", 4096: "4k", 8192: "8k"}.get(c, str(c))


def get_order(size: int) -> int:
    order, span = 0, PAGE
    while span < size:
        span *= 2
        order += 1
    return order


def in_use(m: kmm.Machine, name: str) -> int:
    c = m.kmem_cache(name)
    assert c is not None, name
    return c.objects_in_use()


# ---- size classes ----------------------------------------------------------------


def test_size_class_helper_matches_the_kernels_table():
    # kmalloc_size_index[] of mm/slab_common.c, indexed by (size - 1) / 8 for
    # sizes up to 192: 8 16 32 32 64 64 64 64 96 96 96 96 128*4 192*8.
    table = [8, 16, 32, 32, 64, 64, 64, 64] + [96] * 4 + [128] * 4 + [192] * 8
    for n in range(1, 193):
        assert size_class(n) == table[(n - 1) // 8], n
    assert [size_class(n) for n in (193, 256, 257, 4097, 8192)] == [256, 256, 512, 8192, 8192]


@pytest.mark.parametrize(
    "lo,hi,cls",
    [(1, 8, 8), (9, 16, 16), (17, 32, 32), (33, 64, 64), (65, 96, 96), (97, 128, 128),
     (129, 192, 192), (193, 256, 256), (257, 512, 512), (513, 1024, 1024),
     (1025, 2048, 2048), (2049, 4096, 4096), (4097, 8192, 8192)],
)
def test_boundaries_land_in_the_named_kmalloc_cache(m, lo, hi, cls):
    name = f"kmalloc-{class_name(cls)}"
    for n in (lo, hi):
        before = in_use(m, name)
        b = m.kmalloc(n)
        assert len(b) == n
        assert m.ksize(b) == cls
        assert in_use(m, name) == before + 1
        m.kfree(b)
        assert in_use(m, name) == before
    assert_healthy(m)


def test_every_size_up_to_8k_gets_its_class(m):
    for n in range(1, kmm.KMALLOC_MAX_CACHE_SIZE + 1):
        b = m.kmalloc(n)
        assert m.ksize(b) == size_class(n), n
        assert m.kmalloc_size_roundup(n) == size_class(n), n
        m.kfree(b)
    assert kmm.KMALLOC_MAX_CACHE_SIZE == 8192
    assert_healthy(m)


def test_kmalloc_alignment_is_the_largest_power_of_two_divisor(m):
    # Documentation/core-api/memory-allocation.rst: power-of-two sizes are
    # naturally aligned; kmalloc-96 gives 32-byte and kmalloc-192 64-byte alignment.
    keep = []
    for n, align in ((8, 8), (16, 16), (32, 32), (64, 64), (96, 32), (128, 128),
                     (192, 64), (256, 256), (1024, 1024), (4096, 4096), (8192, 8192)):
        for _ in range(40):
            b = m.kmalloc(n)
            assert b.addr % align == 0, (n, hex(b.addr))
            keep.append(b)
    for b in keep:
        m.kfree(b)
    assert_healthy(m)


def test_kmalloc_caches_have_the_real_machines_geometry(m):
    # /proc/slabinfo of the real machine: objsize, objperslab, pagesperslab.
    want = {}
    for line in real("slabinfo.txt").splitlines()[2:]:
        f = line.split()
        if re.fullmatch(r"(kmalloc-|kmalloc-rcl-|kmalloc-cg-|dma-kmalloc-)\w+", f[0]):
            want[f[0]] = (int(f[3]), int(f[4]), int(f[5]))
    assert len(want) == 4 * 13
    for name, (size, per, pages) in want.items():
        c = m.kmem_cache(name)
        assert c is not None, name
        assert (c.size, c.objs_per_slab, 1 << c.order) == (size, per, pages), name
        assert c.ksize == size


# ---- kmalloc(0), kfree(NULL) ----------------------------------------------------------


def test_kmalloc_zero_is_zero_size_ptr(m):
    free = free_pages(m)
    slabinfo = m.proc.slabinfo()
    z = m.kmalloc(0)
    assert z.addr == 16 == kmm.ZERO_SIZE_PTR
    assert int(z) == 16
    assert len(z) == 0
    assert m.ksize(z) == 0
    assert m.kmalloc_size_roundup(0) == 0
    assert len(memoryview(z)) == 0
    m.kfree(z)
    m.kfree(z)  # kfree(ZERO_SIZE_PTR) is a no-op, however often
    m.kfree(kmm.ZERO_SIZE_PTR)
    m.kfree(None)  # kfree(NULL)
    m.kfree(0)
    assert free_pages(m) == free
    assert m.proc.slabinfo() == slabinfo
    assert_healthy(m)


# ---- large kmalloc -------------------------------------------------------------------


@pytest.mark.parametrize("size", [8193, 12288, 16384, 16385, 65536, 100000, 1 << 20, 4 << 20])
def test_large_kmalloc_is_a_compound_page(m, size):
    free = free_pages(m)
    sunreclaim = m.proc.meminfo_dict()["SUnreclaim"]
    order = get_order(size)
    b = m.kmalloc(size)
    assert len(b) == size
    assert m.ksize(b) == PAGE << order
    assert m.kmalloc_size_roundup(size) == PAGE << order
    assert b.addr % (PAGE << order) == 0  # a buddy block is naturally aligned
    head = m.virt_to_page(b.addr)
    assert "head" in head.flags
    assert head.order == order
    if order:
        assert "tail" in m.pfn_to_page(head.pfn + (1 << order) - 1).flags
    assert free_pages(m) == free - (1 << order)
    # Large kmallocs are NR_SLAB_UNRECLAIMABLE_B (mm/slub.c ___kmalloc_large_node).
    assert m.proc.meminfo_dict()["SUnreclaim"] == sunreclaim + (PAGE << order) // 1024
    b[size - 1] = 0x5A
    assert m.read(b.addr + size - 1, 1) == b"\x5a"
    m.kfree(b)
    assert free_pages(m) == free
    assert m.proc.meminfo_dict()["SUnreclaim"] == sunreclaim
    assert_healthy(m)


def test_large_kmalloc_is_unreclaimable_even_with_gfp_reclaimable(m):
    before = m.proc.meminfo_dict()
    b = m.kmalloc(10000, kmm.GFP_KERNEL | RECLAIMABLE)
    after = m.proc.meminfo_dict()
    assert after["SUnreclaim"] - before["SUnreclaim"] == 16
    assert after["SReclaimable"] == before["SReclaimable"]
    m.kfree(b)


def test_kmalloc_beyond_kmalloc_max_size_fails_and_changes_nothing(m):
    assert kmm.KMALLOC_MAX_SIZE == 4 << 20
    free, bi = free_pages(m), buddyinfo(m)
    with pytest.raises(kmm.OutOfMemoryError):
        m.kmalloc(kmm.KMALLOC_MAX_SIZE + 1, kmm.GFP_KERNEL | kmm.__GFP_NOWARN)
    assert free_pages(m) == free and buddyinfo(m) == bi
    assert_healthy(m)


# ---- zeroing ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [7, 24, 100, 192, 1000, 4096, 8192, 20000])
def test_kzalloc_zeroes_real_bytes(m, size):
    b = m.kmalloc(size)
    addr = b.addr
    b[:] = b"\xee" * size
    m.kfree(b)
    z = m.kzalloc(size)
    # SLUB's per-CPU freelist (and the buddy free list) is LIFO: the same
    # memory comes back, so the zeroes are really written, not just fresh.
    assert z.addr == addr
    assert bytes(z) == bytes(size)
    assert m.read(z.addr, size) == bytes(size)
    m.kfree(z)


def test_kmalloc_does_not_zero(m):
    b = m.kmalloc(64)
    b[:] = b"\x11" * 64
    m.kfree(b)
    c = m.kmalloc(64)
    assert c.addr == b.addr
    # The free pointer sits in the middle of a free object (offset 32 for
    # kmalloc-64); the rest of the old bytes are still there.
    assert c[:8] == b"\x11" * 8
    m.kfree(c)


def test_kcalloc_zeroes_n_times_size(m):
    b = m.kmalloc(120)
    b[:] = b"\x77" * 120
    m.kfree(b)
    z = m.kcalloc(10, 12)
    assert z.addr == b.addr
    assert len(z) == 120
    assert m.ksize(z) == 128
    assert bytes(z) == bytes(120)
    m.kfree(z)


def test_kmalloc_array(m):
    b = m.kmalloc_array(3, 10)
    assert len(b) == 30
    assert m.ksize(b) == 32
    m.kfree(b)


@pytest.mark.parametrize("fn", ["kmalloc_array", "kcalloc"])
@pytest.mark.parametrize("n,size", [(1 << 32, 1 << 32), (2**63, 2), (2**64 - 1, 3)])
def test_kmalloc_array_overflow_allocates_nothing(m, fn, n, size):
    keep = m.kmalloc(100)  # something live, so slabinfo is not trivially empty
    slabinfo, free, bi = m.proc.slabinfo(), free_pages(m), buddyinfo(m)
    with m.trace.record("kmem:*") as rec:
        with pytest.raises(ValueError):
            getattr(m, fn)(n, size)
    assert m.proc.slabinfo() == slabinfo
    assert free_pages(m) == free and buddyinfo(m) == bi
    assert [e.name for e in rec.events] == []
    m.kfree(keep)
    assert_healthy(m)


# ---- krealloc ----------------------------------------------------------------------------


def test_krealloc_grows_in_place_within_ksize(m):
    a = m.kmalloc(20)
    a[:] = bytes(range(20))
    b = m.krealloc(a, 30)
    assert b.addr == a.addr  # 30 still fits kmalloc-32
    assert len(b) == 30
    assert b[:20] == bytes(range(20))
    assert m.ksize(b) == 32
    assert in_use(m, "kmalloc-32") >= 1
    m.kfree(b)
    assert_healthy(m)


def test_krealloc_moves_when_it_must_and_frees_the_old_object(m):
    a = m.kmalloc(30)
    a[:] = b"k" * 30
    n32, n512 = in_use(m, "kmalloc-32"), in_use(m, "kmalloc-512")
    b = m.krealloc(a, 300)
    assert b.addr != a.addr
    assert len(b) == 300 and m.ksize(b) == 512
    assert b[:30] == b"k" * 30
    assert in_use(m, "kmalloc-32") == n32 - 1
    assert in_use(m, "kmalloc-512") == n512 + 1
    with pytest.raises(kmm.UseAfterFreeError):
        bytes(a)
    m.kfree(b)
    assert_healthy(m)


def test_krealloc_shrinking_never_moves(m):
    a = m.kmalloc(300)
    a[:] = bytes(range(256)) + bytes(44)
    b = m.krealloc(a, 10)
    assert b.addr == a.addr and len(b) == 10
    assert bytes(b) == bytes(range(10))
    assert m.ksize(b) == 512
    big = m.kmalloc(20000)
    small = m.krealloc(big, 100)  # a large kmalloc keeps its pages too
    assert small.addr == big.addr and m.ksize(small) == 32768
    m.kfree(b)
    m.kfree(small)
    assert_healthy(m)


def test_krealloc_null_and_zero(m):
    a = m.krealloc(None, 50)
    assert len(a) == 50 and m.ksize(a) == 64
    free = in_use(m, "kmalloc-64")
    z = m.krealloc(a, 0)  # frees, returns ZERO_SIZE_PTR
    assert z.addr == kmm.ZERO_SIZE_PTR and len(z) == 0
    assert in_use(m, "kmalloc-64") == free - 1
    with pytest.raises(kmm.UseAfterFreeError):
        len(a)
    c = m.krealloc(z, 8)  # from ZERO_SIZE_PTR: a fresh allocation
    assert len(c) == 8 and m.ksize(c) == 8
    m.kfree(c)
    assert_healthy(m)


# ---- families -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gfp,prefix",
    [
        (kmm.GFP_KERNEL, "kmalloc-"),
        (kmm.GFP_NOFS, "kmalloc-"),
        (kmm.GFP_ATOMIC, "kmalloc-"),
        (kmm.GFP_KERNEL | kmm.GFP_DMA, "dma-kmalloc-"),
        (kmm.GFP_KERNEL | RECLAIMABLE, "kmalloc-rcl-"),
        (kmm.GFP_NOFS | RECLAIMABLE, "kmalloc-rcl-"),
        (kmm.GFP_KERNEL | kmm.__GFP_ACCOUNT, "kmalloc-cg-"),
        (kmm.GFP_KERNEL_ACCOUNT, "kmalloc-cg-"),
        # kmalloc_type: DMA > RECLAIMABLE > ACCOUNT.
        (kmm.GFP_KERNEL | kmm.GFP_DMA | RECLAIMABLE, "dma-kmalloc-"),
        (kmm.GFP_KERNEL_ACCOUNT | kmm.GFP_DMA, "dma-kmalloc-"),
        (kmm.GFP_KERNEL_ACCOUNT | RECLAIMABLE, "kmalloc-rcl-"),
    ],
)
@pytest.mark.parametrize("size", [8, 96, 150, 700, 8192])
def test_gfp_picks_the_kmalloc_family(m, gfp, prefix, size):
    name = prefix + class_name(size_class(size))
    before = {c.name: c.objects_in_use() for c in m.caches}
    with m.trace.record("kmem:kmalloc") as rec:
        b = m.kmalloc(size, gfp)
    after = {c.name: c.objects_in_use() for c in m.caches}
    changed = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert changed == {name: 1}
    (ev,) = rec.events
    assert ev["bytes_req"] == size
    assert ev["bytes_alloc"] == size_class(size)
    assert ev["accounted"] == bool(gfp & kmm.__GFP_ACCOUNT)
    # The slabinfo line of that cache shows the slab it took.
    line = next(l for l in m.proc.slabinfo().splitlines() if l.split()[0] == name)
    assert int(line.split()[1]) >= 1
    page = m.virt_to_page(b.addr)
    assert "slab" in page.flags
    if prefix == "dma-kmalloc-":
        assert page.zone == "DMA"
    else:
        assert page.zone != "DMA"
    if prefix == "kmalloc-rcl-":
        # SLAB_RECLAIM_ACCOUNT caches take their pages with __GFP_RECLAIMABLE.
        assert page.migratetype == "Reclaimable"
    else:
        assert page.migratetype == "Unmovable"
    m.kfree(b)
    assert_healthy(m)


def test_reclaimable_family_is_accounted_as_sreclaimable(m):
    before = m.proc.meminfo_dict()
    b = m.kmalloc(100, kmm.GFP_KERNEL | RECLAIMABLE)
    after = m.proc.meminfo_dict()
    assert after["SReclaimable"] - before["SReclaimable"] == 4  # one order-0 slab
    assert after["SUnreclaim"] == before["SUnreclaim"]
    m.kfree(b)


def test_gfp_dma_large_kmalloc_comes_from_zone_dma(m):
    b = m.kmalloc(9000, kmm.GFP_KERNEL | kmm.GFP_DMA)
    assert m.virt_to_page(b.addr).zone == "DMA"
    m.kfree(b)


# ---- the real trace -------------------------------------------------------------------------

KMALLOC_RE = re.compile(
    r"kmem:kmalloc: call_site=\S+ ptr=\S+ bytes_req=(\d+) bytes_alloc=(\d+) "
    r"gfp_flags=(\S+) node=(-?\d+) accounted=(true|false)"
)


def test_every_kmalloc_of_the_real_trace_gets_the_real_bytes_alloc():
    m = kmm.Machine(memory="4G")
    events = []
    for line in sample_trace_lines():
        if "kmem:kmalloc:" in line:
            g = KMALLOC_RE.search(line)
            assert g, line
            events.append((int(g[1]), int(g[2]), g[3], g[5] == "true"))
    assert len(events) > 7000
    with m.trace.record("kmem:kmalloc") as rec:
        for req, alloc, flags, _ in events:
            b = m.kmalloc(req, kmm.gfp.parse(flags))
            assert m.ksize(b) == alloc, (req, alloc, flags)
            m.kfree(b)
    evs = rec.events
    assert len(evs) == len(events)  # no large kmalloc in the sample: one event each
    for ev, (req, alloc, flags, accounted) in zip(evs, events):
        assert (ev["bytes_req"], ev["bytes_alloc"], ev["accounted"]) == (req, alloc, accounted)
        assert f"gfp_flags={flags} " in ev.text
    assert_healthy(m)


# ---- odds and ends ------------------------------------------------------------------------


def test_kzalloc_zeroes_the_whole_object(m):
    # slab_post_alloc_hook zeroes s->object_size (16 for kmalloc-16), not just
    # the 10 bytes asked for (no kmalloc red zone without SLAB_STORE_USER).
    b = m.kmalloc(16)
    b[:] = b"\xff" * 16
    m.kfree(b)
    z = m.kzalloc(10)
    assert z.addr == b.addr
    assert m.read(z.addr, 16) == bytes(16)
    m.kfree(z)


def test_kmalloc_zero_emits_no_event_but_kfree_null_does(m):
    with m.trace.record("kmem:kmalloc,kmem:kfree") as rec:
        z = m.kmalloc(0)
        m.kfree(z)
    assert [e.name for e in rec.events] == ["kmem:kfree"]
    assert rec.events[0]["ptr"] == kmm.ZERO_SIZE_PTR


def test_kfree_frees_kmem_cache_objects_too(m):
    # Since 6.4, kfree() accepts objects from any cache (mm/slab_common.c kfree).
    c = m.kmem_cache_create("t_kfree_any", 72)
    o = c.alloc()
    m.kfree(o)
    assert not o.alive_ and c.objects_in_use() == 0
    k = m.kmalloc(50)
    m.kmem_cache("kmalloc-64").free(k)  # and kmem_cache_free frees kmalloc objects
    assert not k.alive_
    assert_healthy(m)
