"""init_on_alloc=1 and init_on_free=1 (mm/mm_init.c, include/linux/mm.h
``want_init_on_*``, mm/slab.h ``slab_want_init_on_*``, mm/slub.c
``slab_free_hook``): pages and slab objects zeroed when allocated or freed,
except caches with a constructor, SLAB_TYPESAFE_BY_RCU and SLAB_POISON.

Each test dirties memory, frees it and allocates again: the per-CPU slab
freelist and the per-CPU page lists are last-in first-out, so the same
memory comes back (asserted), and what it holds is compared with what a
kernel would leave there.
"""

from __future__ import annotations

import kmm

DIRTY = 0xA5


def reused_kmalloc(m: kmm.Machine, size: int, gfp: int = kmm.GFP_KERNEL) -> tuple[int, bytes]:
    """kmalloc(size), fill it, kfree, kmalloc again at the same address."""
    with m.on_cpu(0):
        b = m.kmalloc(size, gfp)
        b[:] = bytes([DIRTY]) * size
        addr = b.addr
        m.kfree(b)
        b2 = m.kmalloc(size, gfp)
        assert b2.addr == addr
        data = bytes(b2)
        m.kfree(b2)
    return addr, data


def reused_page(m: kmm.Machine, order: int, gfp: int = kmm.GFP_KERNEL) -> bytes:
    with m.on_cpu(0):
        p = m.alloc_pages(gfp, order)
        addr = m.page_address(p)
        assert addr is not None
        m.write(addr, bytes([DIRTY]) * (m.page_size << order))
        m.free_pages(p, order)
        q = m.alloc_pages(gfp, order)
        assert q.pfn == p.pfn
        data = m.read(addr, m.page_size << order)
        m.free_pages(q, order)
    return data


def test_off_by_default_stale_data_comes_back():
    m = kmm.Machine()
    assert m.cmdline == ""
    _, data = reused_kmalloc(m, 64)
    # SLUB keeps the free pointer in the middle of the object (offset 32 for
    # kmalloc-64, ALIGN_DOWN(object_size / 2, sizeof(void *))); the rest is stale.
    assert data[:32] == bytes([DIRTY]) * 32 and data[40:] == bytes([DIRTY]) * 24
    assert reused_page(m, 0) == bytes([DIRTY]) * 4096
    assert m.check() == []


def test_init_on_alloc_zeroes_objects_and_pages():
    m = kmm.Machine(cmdline="init_on_alloc=1")
    for size in (8, 64, 100, 4096, 8192):
        _, data = reused_kmalloc(m, size)
        assert data == bytes(size), size
    for order in (0, 1, 3, 9):
        assert reused_page(m, order) == bytes(4096 << order), order
    # A large kmalloc is pages: zeroed too.
    with m.on_cpu(0):
        b = m.kmalloc(20000)
        b[:] = b"\xff" * 20000
        addr = b.addr
        m.kfree(b)
        b = m.kmalloc(20000)
        assert b.addr == addr and bytes(b) == bytes(20000)
        m.kfree(b)
    assert m.check() == []


def test_init_on_alloc_bulk_and_vmalloc():
    m = kmm.Machine(cmdline="init_on_alloc=1")
    c = m.kmem_cache_create("io_bulk", 72)
    with m.on_cpu(0):
        objs = c.alloc_bulk(kmm.GFP_KERNEL, 40)
        for a in objs:
            m.write(a, b"\x11" * 72)
        c.free_bulk(objs)
        again = c.alloc_bulk(kmm.GFP_KERNEL, 40)
        assert sorted(again) == sorted(objs)
        assert all(m.read(a, 72) == bytes(72) for a in again)
        c.free_bulk(again)
        v = m.vmalloc(3 * 4096)
        v[:] = b"\x22" * len(v)
        m.vfree(v)
        v = m.vmalloc(3 * 4096)
        assert bytes(v) == bytes(3 * 4096)
        m.vfree(v)
    assert m.check() == []


def test_init_on_alloc_exceptions_ctor_rcu_poison():
    m = kmm.Machine(cmdline="init_on_alloc=1")
    seen = []

    def ctor(b: kmm.Block) -> None:
        b[:] = b"\x77" * len(b)
        seen.append(b.addr)

    # A constructor's state survives: never zeroed (slab_want_init_on_alloc -> false).
    withctor = m.kmem_cache_create("io_ctor", 48, ctor=ctor)
    with m.on_cpu(0):
        o = withctor.alloc()
        assert bytes(o) == b"\x77" * 48
        o[:4] = b"used"
        a = o.addr
        withctor.free(o)
        o = withctor.alloc()
        assert o.addr == a and bytes(o[:4]) == b"used"
        withctor.free(o)
        # SLAB_TYPESAFE_BY_RCU: only __GFP_ZERO zeroes.
        rcu = m.kmem_cache_create("io_rcu", 64, flags=kmm.SLAB_TYPESAFE_BY_RCU)
        o = rcu.alloc()
        o[:] = b"\x33" * 64
        a = o.addr
        rcu.free(o)
        o = rcu.alloc()
        assert o.addr == a and bytes(o) == b"\x33" * 64
        rcu.free(o)
        o = rcu.alloc(kmm.GFP_KERNEL | kmm.__GFP_ZERO)
        assert bytes(o) == bytes(64)
        rcu.free(o)
        # SLAB_POISON takes precedence: a free object holds POISON_FREE
        # (0x6b..., POISON_END 0xa5 last) and allocation leaves it.
        poisoned = m.kmem_cache_create("io_poison", 32, flags=kmm.SLAB_POISON)
        o = poisoned.alloc()
        assert bytes(o) == b"\x6b" * 31 + b"\xa5"
        poisoned.free(o)
        o = poisoned.alloc(kmm.GFP_KERNEL | kmm.__GFP_ZERO)
        assert bytes(o) == bytes(32)
        poisoned.free(o)
    assert m.check() == []


def test_init_on_free_zeroes_at_free():
    m = kmm.Machine(cmdline="init_on_free=1")
    with m.on_cpu(0):
        b = m.kmalloc(64)
        b[:] = bytes([DIRTY]) * 64
        addr = b.addr
        m.kfree(b)
        # Freed: zero but for the 8-byte free pointer at offset 32.
        freed = m.read(addr, 64)
        assert freed[:32] == bytes(32) and freed[40:] == bytes(24)
        # maybe_wipe_obj_freeptr: the next allocation is all zero.
        b = m.kmalloc(64)
        assert b.addr == addr and bytes(b) == bytes(64)
        m.kfree(b)
        # Pages: zero as soon as they are freed.
        p = m.alloc_pages(kmm.GFP_KERNEL, 2)
        pa = m.page_address(p)
        assert pa is not None
        m.write(pa, b"\x99" * (4 << 12))
        m.free_pages(p, 2)
        assert m.read(pa, 4 << 12) == bytes(4 << 12)
        # post_alloc_hook skips __GFP_ZERO's memset: the pages are already zero.
        q = m.alloc_pages(kmm.GFP_KERNEL | kmm.__GFP_ZERO, 2)
        assert q.pfn == p.pfn and m.read(pa, 4 << 12) == bytes(4 << 12)
        m.free_pages(q, 2)
    _, data = reused_kmalloc(m, 200)
    assert data == bytes(200)
    assert m.check() == []


def test_init_on_free_bulk_and_metadata():
    m = kmm.Machine(cmdline="init_on_free=1")
    # 100-byte objects, cache-line aligned: slots of 128 bytes, padding after the object.
    c = m.kmem_cache_create("io_pad", 100, flags=kmm.SLAB_HWCACHE_ALIGN)
    assert m.sysfs_slab("io_pad")["slab_size"] == 128
    with m.on_cpu(0):
        objs = c.alloc_bulk(kmm.GFP_KERNEL, 10)
        for a in objs:
            m.write(a, b"\x44" * 128)  # the object and its slot's padding
        c.free_bulk(objs)
        for a in objs:
            data = m.read(a, 128)
            # slab_free_hook zeroes the object (100 bytes) and the slot from
            # s->inuse (104: the object rounded up to a word) to its end; the
            # free pointer (offset 48) is set after. Bytes 100..103 keep
            # what was there, as in the kernel.
            assert data[:48] == bytes(48)
            assert data[56:100] == bytes(44)
            assert data[100:104] == b"\x44" * 4
            assert data[104:] == bytes(24)
    assert m.check() == []


def test_init_on_free_exceptions():
    m = kmm.Machine(cmdline="init_on_free=1")

    def ctor(b: kmm.Block) -> None:
        b[:] = b"\x55" * len(b)

    c = m.kmem_cache_create("io_free_ctor", 64, ctor=ctor)
    rcu = m.kmem_cache_create("io_free_rcu", 64, flags=kmm.SLAB_TYPESAFE_BY_RCU)
    with m.on_cpu(0):
        for cache in (c, rcu):
            o = cache.alloc()
            o[:8] = b"kept it!"
            a = o.addr
            cache.free(o)
            assert m.read(a, 8) == b"kept it!"
    assert m.check() == []


def test_krealloc_in_place_zeroes_the_spare_with_init_on_alloc():
    for cmdline, spare in (("", b"\xff" * 64), ("init_on_alloc=1", bytes(64))):
        m = kmm.Machine(cmdline=cmdline)
        with m.on_cpu(0):
            b = m.kmalloc(100)  # kmalloc-128
            m.write(b.addr, b"\xff" * 128)
            r = m.krealloc(b, 64)
            assert r.addr == b.addr
            assert m.read(r.addr + 64, 64) == spare, cmdline
            m.kfree(r)
        assert m.check() == []


def test_both_on():
    m = kmm.Machine(cmdline="init_on_alloc=1 init_on_free=1")
    assert m.cmdline == "init_on_alloc=1 init_on_free=1"
    _, data = reused_kmalloc(m, 64)
    assert data == bytes(64)
    assert reused_page(m, 1) == bytes(8192)
    assert m.check() == []
