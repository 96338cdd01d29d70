"""mm/kfence/kfence_test.c, translated to kmm (issue 11, part 8).

kmm has no KFENCE sampling pool; every allocation is checked instead, by
KASAN (``kasan=on``), which reports the same misuse where the kernel's
KFENCE would (each case names the KFENCE error it expects, and the KASAN
report kmm gives for it). Where KFENCE reports only at free time (memory
corruption in the object's page), KASAN reports at the bad access itself and
refuses it, so the free that follows is clean. Each case runs twice, as the
kernel's KFENCE_KUNIT_CASE does: with kmalloc and with a ``-memcache``.

Cases the API cannot express: ``test_use_after_free_read_nofault``
(copy_from_kernel_nofault of a KFENCE page: no such pool);
``test_memcache_alloc_bulk``'s "some objects come from the KFENCE pool"
(no pool; what is left of it, that a bulk allocation reports nothing, is
kept).
"""

from __future__ import annotations

import pytest

import kmm
from test_kasan import kasan_fail, m  # noqa: F401  (m: the kasan=on machine fixture)

SIZE = 32


def reports(m) -> int:
    return m.kasan_stats()["reports"]


class Alloc:
    """test_alloc/test_free: kmalloc, or the test's memcache."""

    def __init__(self, m, memcache: bool, size: int = SIZE, flags: int = 0, ctor=None):
        self.m = m
        self.cache = m.kmem_cache_create("test", size, flags=flags | kmm.SLAB_NO_MERGE, ctor=ctor) if memcache else None

    def alloc(self, size: int = SIZE, gfp: int = kmm.GFP_KERNEL):
        return self.cache.alloc(gfp) if self.cache else self.m.kmalloc(size, gfp)

    def free(self, obj) -> None:
        if self.cache:
            self.cache.free(obj)
        else:
            self.m.kfree(obj)

    def destroy(self) -> None:
        if self.cache:
            self.cache.destroy()

    def alloc_inside(self):
        """An object that is not the first of its slab page: KFENCE's
        ALLOCATE_LEFT puts a guard page to its left; in a slab the left
        neighbour is the previous slot's red zone (a first object's left
        neighbour is another page, whose report names that page instead)."""
        held = []
        while True:
            b = self.alloc()
            if b.addr % 4096:
                for h in held:
                    self.free(h)
                return b
            held.append(b)


both = pytest.mark.parametrize("memcache", [False, True], ids=["", "memcache"])


@both
def test_out_of_bounds_read(m, memcache):
    # KFENCE_ERROR_OOB, read, on both sides of the object.
    t = Alloc(m, memcache)
    buf = t.alloc_inside()
    kasan_fail(lambda: m.read(buf.addr - 1, 1), "slab-out-of-bounds", access="Read", size=1)
    kasan_fail(lambda: m.read(buf.addr + SIZE, 1), "slab-out-of-bounds", access="Read", size=1)
    t.free(buf)
    t.destroy()


@both
def test_out_of_bounds_write(m, memcache):
    t = Alloc(m, memcache)
    buf = t.alloc_inside()
    kasan_fail(lambda: m.write(buf.addr - 1, b"\x2a"), "slab-out-of-bounds", access="Write", size=1)
    t.free(buf)
    t.destroy()


@both
def test_use_after_free_read(m, memcache):
    # KFENCE_ERROR_UAF.
    t = Alloc(m, memcache)
    buf = t.alloc()
    addr = buf.addr
    t.free(buf)
    kasan_fail(lambda: m.read(addr, 1), "slab-use-after-free", access="Read", size=1)
    t.destroy()


@both
def test_double_free(m, memcache):
    # KFENCE_ERROR_INVALID_FREE for the second free.
    t = Alloc(m, memcache)
    buf = t.alloc()
    addr = buf.addr
    t.free(buf)
    kasan_fail(lambda: t.free(addr), "double-free", cls=kmm.KasanDoubleFreeError)
    t.destroy()


@both
def test_invalid_addr_free(m, memcache):
    # KFENCE_ERROR_INVALID_FREE for buf + 1; then the right free is fine.
    t = Alloc(m, memcache)
    buf = t.alloc()
    kasan_fail(lambda: t.free(buf.addr + 1), "invalid-free", cls=kmm.KasanInvalidFreeError)
    n = reports(m)
    t.free(buf)
    assert reports(m) == n
    t.destroy()


@both
def test_corruption(m, memcache):
    # KFENCE_ERROR_CORRUPTION at free, for a write just past the object and
    # just before it. KASAN catches (and refuses) each write as it happens.
    t = Alloc(m, memcache)
    buf = t.alloc()
    kasan_fail(lambda: m.write(buf.addr + SIZE, b"\x2a"), "slab-out-of-bounds", access="Write", size=1)
    n = reports(m)
    t.free(buf)
    assert reports(m) == n
    buf = t.alloc_inside()
    kasan_fail(lambda: m.write(buf.addr - 1, b"\x2a"), "slab-out-of-bounds", access="Write", size=1)
    t.free(buf)
    t.destroy()


@both
def test_free_bulk(m, memcache):
    """SLUB must not modify objects on bulk free: no report, whatever the
    object size, with and without a constructor."""
    for i, size in enumerate((8, 77, 150, 263, 307)):
        ctor = (lambda b: b.write(b"x" * 8)) if i & 1 else None
        c = m.kmem_cache_create(f"test{i}", size, flags=kmm.SLAB_NO_MERGE, ctor=ctor)
        n = reports(m)
        objs = [c.alloc() for _ in range(5)]
        c.free_bulk(objs)
        assert reports(m) == n
        c.destroy()


@both
def test_init_on_free(memcache):
    """init_on_free: a freed object is zeroed, and reading it is a
    use-after-free (KFENCE_ERROR_UAF)."""
    m = kmm.Machine(memory="256M", cpus=1, cmdline="kasan=on init_on_free=1")
    t = Alloc(m, memcache)
    buf = t.alloc()
    buf[:] = bytes(range(1, SIZE + 1))
    addr = buf.addr
    t.free(buf)
    kasan_fail(lambda: m.read(addr, 1), "slab-use-after-free")
    # Without KASAN the zeroing shows: all zero but the free pointer SLUB
    # stores in a free object (one word).
    m2 = kmm.Machine(memory="256M", cpus=1, cmdline="init_on_free=1")
    t2 = Alloc(m2, memcache)
    buf = t2.alloc()
    buf[:] = bytes(range(1, SIZE + 1))
    addr = buf.addr
    t2.free(buf)
    after = m2.read(addr, SIZE)
    assert sum(1 for b in after if b) <= 8, after
    assert not any(after[i] == i + 1 for i in range(SIZE) if after[i])


def test_kmalloc_aligned_oob_read(m):
    """kmalloc(73) sits in a kmalloc-96 slot; KFENCE sees only past the
    alignment gap. KASAN sees every byte past the 73 requested: reading
    buf + 73 (in the slot, not requested) and buf + 73 + align (past the
    slot) are both reported."""
    size = 73
    align = 8  # kmalloc_cache_alignment(73) on SLUB: ARCH_KMALLOC_MINALIGN
    buf = m.kmalloc(size)
    kasan_fail(lambda: m.read(buf.addr + size, 1), "slab-out-of-bounds", access="Read", size=1)
    kasan_fail(lambda: m.read(buf.addr + size + align, 1), "slab-out-of-bounds", access="Read", size=1)
    m.kfree(buf)


def test_kmalloc_aligned_oob_write(m):
    # KFENCE_ERROR_CORRUPTION at free for buf[73]++; KASAN at the write.
    buf = m.kmalloc(73)
    kasan_fail(lambda: m.read(buf.addr + 73, 1), "slab-out-of-bounds")
    kasan_fail(lambda: m.write(buf.addr + 73, b"\x01"), "slab-out-of-bounds", access="Write", size=1)
    n = reports(m)
    m.kfree(buf)
    assert reports(m) == n


def test_shrink_memcache(m):
    t = Alloc(m, True)
    buf = t.alloc()
    n = reports(m)
    t.cache.shrink()
    t.free(buf)
    assert reports(m) == n
    t.destroy()


def test_memcache_ctor(m):
    t = Alloc(m, True, ctor=lambda b: b.write(b"x" * 8))
    buf = t.alloc()
    assert bytes(buf[:8]) == b"x" * 8
    n = reports(m)
    t.free(buf)
    assert reports(m) == n
    t.destroy()


def test_invalid_access(m):
    """KFENCE_ERROR_INVALID: a read of memory no allocation owns (the pool's
    guard). In kmm: a free page of the buddy allocator, which KASAN poisons."""
    p = m.alloc_pages(kmm.GFP_KERNEL)
    addr = p.address
    m.free_pages(p)
    m.drain_all_pages()
    kasan_fail(lambda: m.read(addr + 10, 1), access="Read", size=1)


def test_gfpzero():
    """A PAGE_SIZE object written, freed, and allocated again with
    __GFP_ZERO comes back zeroed. Without KASAN's quarantine the same object
    comes back at once (SLUB's LIFO freelist), as the kernel's test waits for."""
    m = kmm.Machine(memory="256M", cpus=1)
    c = m.kmem_cache_create("test", 4096, flags=kmm.SLAB_NO_MERGE)
    buf1 = c.alloc()
    buf1[:] = bytes((i + 1) & 0xFF for i in range(4096))
    a1 = buf1.addr
    c.free(buf1)
    buf2 = c.alloc(kmm.GFP_KERNEL | kmm.__GFP_ZERO)
    assert buf2.addr == a1
    assert bytes(buf2) == bytes(4096)
    c.free(buf2)
    c.destroy()


def test_memcache_typesafe_by_rcu(m):
    """SLAB_TYPESAFE_BY_RCU: a freed object stays valid memory of its type
    (kasan_slab_free neither poisons nor quarantines it), so the read after
    free sees 42 and KASAN reports nothing; the free pointer lives outside
    the object for such caches, so byte 0 survives."""
    t = Alloc(m, True, flags=kmm.SLAB_TYPESAFE_BY_RCU)
    buf = t.alloc()
    m.write(buf.addr, b"\x2a")
    addr = buf.addr
    n = reports(m)
    t.free(buf)
    assert m.read(addr, 1) == b"\x2a"
    assert reports(m) == n
    t.destroy()


def test_krealloc(m):
    buf = m.kmalloc(SIZE)
    first = buf.addr
    assert m.ksize(buf) == SIZE  # kmalloc-32: the slot is the size
    buf[:] = bytes(range(1, SIZE + 1))
    buf = m.krealloc(buf, SIZE * 3)  # grow
    assert m.ksize(buf) >= SIZE * 3
    assert bytes(buf[:SIZE]) == bytes(range(1, SIZE + 1))
    buf[SIZE:SIZE * 3] = bytes(range(SIZE + 1, SIZE * 3 + 1))
    buf = m.krealloc(buf, SIZE * 2)  # shrink
    assert m.ksize(buf) >= SIZE * 2
    assert bytes(buf[:SIZE * 2]) == bytes(range(1, SIZE * 2 + 1))
    n = reports(m)
    gone = m.krealloc(buf, 0)  # free: ZERO_SIZE_PTR
    assert gone is None or int(gone) == 16
    assert reports(m) == n
    # The first object was freed by the first krealloc.
    kasan_fail(lambda: m.read(first, 1), "slab-use-after-free")


def test_memcache_alloc_bulk(m):
    t = Alloc(m, True)
    n = reports(m)
    for _ in range(5):
        objs = t.cache.alloc_bulk(kmm.GFP_ATOMIC, 100)
        assert len(objs) == 100
        t.cache.free_bulk(objs)
    assert reports(m) == n
    t.destroy()
