"""KASAN (``kasan=on``): the kernel's own test cases (mm/kasan/kasan_test_c.c,
generic mode), translated to kmm, one test per kernel case under its name;
then the access routes, what a report refuses, the quarantine and the
shadow encoding.

Every ``KUNIT_EXPECT_KASAN_FAIL`` becomes a KasanError whose report is
checked (bug type, access kind and size, where the address lies), every
access the kernel expects to pass must pass, and ``m.check()`` must be
clean after each test. Expected offsets and sizes are worked out from the
kernel's rules (kasan_test_c.c's sizes, ``KASAN_GRANULE_SIZE`` 8, kmalloc's
size classes), not read back from kmm.

Cases left out, and why: ``page_alloc_oob_right``, ``kmalloc_uaf3``,
``kasan_bitops_tags``, ``vmalloc_helpers_tags``, ``vmap_tags``,
``vm_map_ram_tags``, ``match_all_*`` (tag-based modes only: skipped in
generic mode); ``rcu_uaf``, ``workqueue_uaf``, ``kmem_cache_rcu_uaf`` (no RCU
or workqueues in kmm); ``mempool_*`` (no mempool API); ``kasan_global_*``,
``kasan_stack_oob``, ``kasan_alloca_*``, ``rust_uaf`` (no compiled code:
no globals, stacks or allocas to instrument).
"""

from __future__ import annotations

import re

import pytest

import kmm

GRANULE = 8  # KASAN_GRANULE_SIZE
KMALLOC_MAX_CACHE_SIZE = 8192
PAGE_SIZE = 4096


@pytest.fixture
def m():
    mach = kmm.Machine(memory="256M", cpus=2, cmdline="kasan=on")
    with mach.on_cpu(0):
        yield mach
    assert mach.check() == []


def kasan_fail(fn, bug: str | None = None, *, access: str | None = None, size: int | None = None,
               where: str | None = None, cls: type = kmm.KasanError) -> str:
    """Run ``fn``, expect a KASAN report; check its first lines."""
    with pytest.raises(cls) as ei:
        fn()
    e = ei.value
    assert isinstance(e, kmm.KasanError) and isinstance(e, kmm.MemoryCorruptionError)
    text = str(e)
    lines = text.splitlines()
    assert lines[0] == "=" * 66 and lines[-1] == "=" * 66, text
    assert lines[1].startswith("BUG: KASAN: "), text
    if bug is not None:
        assert e.bug_type == bug, text
    if access is not None:
        assert re.match(rf"{access} of size {size} at addr [0-9a-f]{{16}} by task .+/\d+$", lines[2]), text
    if where is not None:
        assert where in text, text
    return text


def located(n: int, rel: str, state: str, size: int) -> str:
    """describe_object_addr's lines (mm/kasan/report.c)."""
    return f"The buggy address is located {n} bytes {rel} of\n {state}{size}-byte region ["


# ---- kasan_test_c.c ------------------------------------------------------------------


def test_kmalloc_oob_right(m):
    size = 128 - GRANULE - 5  # 115
    p = m.kmalloc(size)
    kasan_fail(lambda: m.write(p.addr + size, b"x"), "slab-out-of-bounds", access="Write", size=1,
               where=located(0, "to the right", "allocated ", size))
    kasan_fail(lambda: m.write(p.addr + size + 5, b"y"), "slab-out-of-bounds", access="Write", size=1,
               where=located(5, "to the right", "allocated ", size))
    kasan_fail(lambda: m.read(p.addr + size + GRANULE + 5, 1), "slab-out-of-bounds", access="Read", size=1,
               where=located(13, "to the right", "allocated ", size))
    text = kasan_fail(lambda: m.write(p.addr + size, b"x"))
    assert "which belongs to the cache kmalloc-128 of size 128" in text
    assert "Allocated by task" in text and "test_kmalloc_oob_right" in text
    m.kfree(p)


def test_kmalloc_oob_left(m):
    first = m.kmalloc(15)  # so that ptr - 1 lies in the slab, not before it
    p = m.kmalloc(15)
    kasan_fail(lambda: m.read(p.addr - 1, 1), "slab-out-of-bounds", access="Read", size=1,
               where="which belongs to the cache kmalloc-16 of size 16")
    m.kfree(p)
    m.kfree(first)


def test_kmalloc_node_oob_right(m):
    size = 4096
    p = m.kmalloc(size)
    kasan_fail(lambda: m.read(p.addr + size, 1), "slab-out-of-bounds", access="Read", size=1,
               where=located(0, "to the right", "allocated ", size))
    m.kfree(p)


def test_kmalloc_track_caller_oob_right(m):
    size = 128 - GRANULE
    for _ in range(2):  # kmalloc_track_caller, kmalloc_node_track_caller
        p = m.kmalloc(size)
        kasan_fail(lambda: m.write(p.addr + size, b"y"), "slab-out-of-bounds", access="Write", size=1)
        m.kfree(p)


def test_kmalloc_big_oob_right(m):
    size = KMALLOC_MAX_CACHE_SIZE - 256
    p = m.kmalloc(size)
    kasan_fail(lambda: m.write(p.addr + size, b"\0"), "slab-out-of-bounds", access="Write", size=1,
               where="which belongs to the cache kmalloc-8k of size 8192")
    m.kfree(p)


def test_kmalloc_large_oob_right(m):
    size = KMALLOC_MAX_CACHE_SIZE + 10
    p = m.kmalloc(size)
    # KASAN_PAGE_REDZONE past the requested size: reported as slab-out-of-bounds.
    text = kasan_fail(lambda: m.write(p.addr + size, b"\0"), "slab-out-of-bounds", access="Write", size=1,
                      where="The buggy address belongs to the physical page:")
    assert "belongs to the cache" not in text
    m.kfree(p)


def test_kmalloc_large_uaf(m):
    size = KMALLOC_MAX_CACHE_SIZE + 10
    p = m.kmalloc(size)
    addr = p.addr
    m.kfree(p)
    kasan_fail(lambda: m.read(addr, 1), "use-after-free", access="Read", size=1, cls=kmm.KasanUseAfterFreeError)


def test_kmalloc_large_invalid_free(m):
    size = KMALLOC_MAX_CACHE_SIZE + 10
    p = m.kmalloc(size)
    text = kasan_fail(lambda: m.kfree(p.addr + 1), "invalid-free", cls=kmm.KasanInvalidFreeError)
    assert re.search(r"^Free of addr [0-9a-f]{16} by task ", text, re.M)
    # Refused: the allocation is intact and frees normally.
    p[0] = 7
    assert p[0] == 7
    m.kfree(p)


def test_page_alloc_uaf(m):
    order = 4
    page = m.alloc_pages(kmm.GFP_KERNEL, order)
    ptr = m.page_address(page)
    m.free_pages(ptr, order)
    kasan_fail(lambda: m.read(ptr, 1), "use-after-free", access="Read", size=1, cls=kmm.KasanUseAfterFreeError,
               where="The buggy address belongs to the physical page:")


def krealloc_more_oob_helper(m, size1: int, size2: int) -> None:
    middle = size1 + (size2 - size1) // 2
    p1 = m.kmalloc(size1)
    p2 = m.krealloc(p1, size2)
    for off in (size1 - 1, size1, middle, size2 - 1):  # all accessible
        m.write(p2.addr + off, b"x")
    kasan_fail(lambda: m.write(p2.addr + size2, b"x"), access="Write", size=1)
    kasan_fail(lambda: m.write(p2.addr + -(-size2 // GRANULE) * GRANULE, b"x"), access="Write", size=1)
    # Through the Block too: krealloc's Block is size2 long.
    kasan_fail(lambda: p2.__setitem__(size2, 1), cls=kmm.KasanIndexError)
    m.kfree(p2)


def krealloc_less_oob_helper(m, size1: int, size2: int) -> None:
    middle = size2 + (size1 - size2) // 2
    p1 = m.kmalloc(size1)
    p2 = m.krealloc(p1, size2)
    m.write(p2.addr + size2 - 1, b"x")
    kasan_fail(lambda: m.write(p2.addr + size2, b"x"), access="Write", size=1)
    kasan_fail(lambda: m.write(p2.addr + -(-size2 // GRANULE) * GRANULE, b"x"), access="Write", size=1)
    assert -(-size2 // GRANULE) * GRANULE <= middle // GRANULE * GRANULE
    assert -(-middle // GRANULE) * GRANULE <= size1 // GRANULE * GRANULE
    for off in (middle, size1 - 1, size1):
        kasan_fail(lambda: m.write(p2.addr + off, b"x"), access="Write", size=1)
    m.kfree(p2)


def test_krealloc_more_oob(m):
    krealloc_more_oob_helper(m, 201, 235)


def test_krealloc_less_oob(m):
    krealloc_less_oob_helper(m, 235, 201)


def test_krealloc_large_more_oob(m):
    krealloc_more_oob_helper(m, KMALLOC_MAX_CACHE_SIZE + 201, KMALLOC_MAX_CACHE_SIZE + 235)


def test_krealloc_large_less_oob(m):
    krealloc_less_oob_helper(m, KMALLOC_MAX_CACHE_SIZE + 235, KMALLOC_MAX_CACHE_SIZE + 201)


def test_krealloc_uaf(m):
    p1 = m.kmalloc(201)
    addr = p1.addr
    m.kfree(p1)
    before = m.kasan_stats()["quarantine_objects"]
    # krealloc reports the use after free and returns nothing (kmm: refuses).
    kasan_fail(lambda: m.krealloc(addr, 235), "slab-use-after-free", access="Read", size=1,
               cls=kmm.KasanUseAfterFreeError)
    kasan_fail(lambda: m.krealloc(p1, 235), "slab-use-after-free", cls=kmm.KasanUseAfterFreeError)
    assert m.kasan_stats()["quarantine_objects"] == before
    kasan_fail(lambda: m.read(addr, 1), "slab-use-after-free", access="Read", size=1)


def test_kmalloc_oob_16(m):
    p1 = m.kmalloc(16 - 3)
    p2 = m.kmalloc(16)
    kasan_fail(lambda: m.write(p1.addr, m.read(p2.addr, 16)), "slab-out-of-bounds", access="Write", size=16,
               where=located(0, "inside", "allocated ", 13))
    m.kfree(p1)
    m.kfree(p2)


def test_kmalloc_uaf_16(m):
    p1 = m.kmalloc(16)
    p2 = m.kmalloc(16)
    a2 = p2.addr
    m.kfree(p2)
    kasan_fail(lambda: m.write(p1.addr, m.read(a2, 16)), "slab-use-after-free", access="Read", size=16,
               where=located(0, "inside", "freed ", 16))
    m.kfree(p1)


def test_kmalloc_oob_in_memset(m):
    size = 128 - GRANULE
    p = m.kmalloc(size)
    kasan_fail(lambda: m.write(p.addr, bytes(size + GRANULE)), "slab-out-of-bounds", access="Write",
               size=size + GRANULE)
    m.kfree(p)


@pytest.mark.parametrize("memset_size", [2, 4, 8, 16])
def test_kmalloc_oob_memset(m, memset_size):
    """kmalloc_oob_memset_2, _4, _8 and _16."""
    size = 128 - GRANULE
    p = m.kmalloc(size)
    p[size - memset_size + 1: size] = b"\xaa" * (memset_size - 1)
    at = p.addr + size - memset_size + 1
    kasan_fail(lambda: m.write(at, bytes(memset_size)), "slab-out-of-bounds", access="Write", size=memset_size,
               where=located(size - memset_size + 1, "inside", "allocated ", size))
    # Refused: the in-bounds bytes of the memset were not written.
    assert m.read(at, memset_size - 1) == b"\xaa" * (memset_size - 1)
    m.kfree(p)


def test_kmalloc_memmove_negative_size(m):
    p = m.kmalloc(64)
    m.write(p.addr, bytes(64))
    invalid_size = 2**64 - 2  # (size_t)-2
    kasan_fail(lambda: m.read(p.addr + 4, invalid_size), "out-of-bounds", access="Read", size=invalid_size)
    m.kfree(p)


def test_kmalloc_memmove_invalid_size(m):
    p = m.kmalloc(64)
    m.write(p.addr, bytes(64))
    kasan_fail(lambda: m.write(p.addr, m.read(p.addr + 4, 64)), "slab-out-of-bounds", access="Read", size=64)
    m.kfree(p)


def test_kmalloc_uaf(m):
    p = m.kmalloc(10)
    m.kfree(p)
    kasan_fail(lambda: m.read(p.addr + 8, 1), "slab-use-after-free", access="Read", size=1,
               # a freed object's size is the cache's (kasan_get_alloc_size finds none)
               where=located(8, "inside", "freed ", 16))


def test_kmalloc_uaf_memset(m):
    size = 33
    p = m.kmalloc(size)
    m.kfree(p)
    text = kasan_fail(lambda: m.write(p.addr, bytes(size)), "slab-use-after-free", access="Write", size=size)
    assert "Freed by task" in text and "test_kmalloc_uaf_memset" in text


def test_kmalloc_uaf2(m):
    p1 = m.kmalloc(43)
    a1 = p1.addr
    m.kfree(p1)
    p2 = m.kmalloc(43)
    kasan_fail(lambda: m.read(a1 + 40, 1), "slab-use-after-free", access="Read", size=1)
    assert p2.addr != a1  # the quarantine holds the freed slot
    m.kfree(p2)


def test_kasan_atomics(m):
    a1 = m.kzalloc(48)
    a2 = m.kzalloc(8)
    unsafe = a1.addr + 48
    for size in (4, 8):  # atomic_t, atomic_long_t
        kasan_fail(lambda: m.read(unsafe, size), "slab-out-of-bounds", access="Read", size=size)
        kasan_fail(lambda: m.write(unsafe, bytes(size)), "slab-out-of-bounds", access="Write", size=size)
        kasan_fail(lambda: m.access(unsafe, size, write=True), "slab-out-of-bounds", access="Write", size=size)
        m.access(a2.addr, size, write=True)  # the safe one
    m.kfree(a1)
    m.kfree(a2)


def test_kmalloc_double_kzfree(m):
    p = m.kmalloc(16)
    m.write(p.addr, bytes(16))  # kfree_sensitive: memzero_explicit, then kfree
    m.kfree(p)
    text = kasan_fail(lambda: m.kfree(p.addr), "double-free", cls=kmm.KasanDoubleFreeError)
    assert "Freed by task" in text
    # The Block route reports it too, and both are DoubleFreeErrors.
    with pytest.raises(kmm.DoubleFreeError):
        m.kfree(p)


def test_ksize_unpoisons_memory(m):
    size = 128 - GRANULE - 5
    p = m.kmalloc(size)
    real_size = m.ksize(p)
    assert real_size > size
    m.write(p.addr, b"x")
    m.write(p.addr + size - 1, b"x")
    for off in (size, size + 5, real_size - 1):
        kasan_fail(lambda: m.read(p.addr + off, 1), "slab-out-of-bounds", access="Read", size=1)
    m.kfree(p)


def test_ksize_uaf(m):
    size = 128 - GRANULE
    p = m.kmalloc(size)
    addr = p.addr
    m.kfree(p)
    kasan_fail(lambda: m.ksize(addr), "slab-use-after-free", access="Read", size=1, cls=kmm.KasanUseAfterFreeError)
    kasan_fail(lambda: m.ksize(p), "slab-use-after-free", cls=kmm.KasanUseAfterFreeError)
    kasan_fail(lambda: m.read(addr, 1), "slab-use-after-free")
    kasan_fail(lambda: m.read(addr + size, 1), "slab-use-after-free")


def test_kfree_via_page(m):
    p = m.kmalloc(8)
    page = m.virt_to_page(p.addr)
    offset = p.addr % PAGE_SIZE
    m.kfree(m.page_address(page) + offset)  # no report
    assert m.kasan_stats()["reports"] == 0


def test_kfree_via_phys(m):
    p = m.kmalloc(8)
    m.kfree(m.phys_to_virt(m.virt_to_phys(p.addr)))  # no report
    assert m.kasan_stats()["reports"] == 0


def test_kmem_cache_oob(m):
    size = 200
    c = m.kmem_cache_create("test_cache", size)
    p = c.alloc()
    kasan_fail(lambda: m.read(p.addr + size, 1), "slab-out-of-bounds", access="Read", size=1,
               where="which belongs to the cache test_cache of size 200\n" + located(0, "to the right", "allocated ", 200))
    c.free(p)
    c.destroy()


def test_kmem_cache_double_free(m):
    c = m.kmem_cache_create("test_cache", 200)
    p = c.alloc()
    addr = p.addr
    c.free(p)
    kasan_fail(lambda: c.free(addr), "double-free", cls=kmm.KasanDoubleFreeError)
    c.destroy()


def test_kmem_cache_invalid_free(m):
    c = m.kmem_cache_create("test_cache", 200, flags=kmm.SLAB_TYPESAFE_BY_RCU)
    p = c.alloc()
    kasan_fail(lambda: c.free(p.addr + 1), "invalid-free", cls=kmm.KasanInvalidFreeError)
    c.free(p)  # the object was not freed: this free is fine
    c.destroy()


def test_kmem_cache_double_destroy(m):
    # kmm's cache descriptors are not slab objects (slab/mod.rs), so the
    # second destroy is kmm's use-after-free error rather than a KASAN report.
    c = m.kmem_cache_create("test_cache", 200, flags=kmm.SLAB_NO_MERGE)
    c.destroy()
    with pytest.raises(kmm.UseAfterFreeError, match="test_cache was destroyed"):
        c.destroy()


def test_kmem_cache_accounted(m):
    c = m.kmem_cache_create("test_cache", 200, flags=kmm.SLAB_ACCOUNT)
    for _ in range(5):
        c.free(c.alloc())
    c.destroy()  # quarantined objects go back first (kasan_cache_shutdown)
    assert m.kasan_stats()["reports"] == 0


def test_kmem_cache_bulk(m):
    size = 200
    c = m.kmem_cache_create("test_cache", size)
    arr = c.alloc_bulk(kmm.GFP_KERNEL, 10)
    for a in arr:
        m.write(a, b"\x2a")
        m.write(a + size - 1, b"\x2a")
    c.free_bulk(arr)
    kasan_fail(lambda: m.read(arr[3], 1), "slab-use-after-free")
    c.destroy()


def test_kasan_memchr(m):
    size = 24
    p = m.kzalloc(size)
    kasan_fail(lambda: m.read(p.addr, size + 1), "slab-out-of-bounds", access="Read", size=size + 1)
    m.kfree(p)


def test_kasan_memcmp(m):
    size = 24
    p = m.kzalloc(size)
    arr = bytes(36)
    kasan_fail(lambda: m.read(p.addr, size + 1) == arr[: size + 1], "slab-out-of-bounds", access="Read",
               size=size + 1)
    m.kfree(p)


def test_kasan_strings(m):
    ptr = m.kzalloc(24)
    src = m.kzalloc(GRANULE)
    m.write(src.addr, b"f0cacc1\0")
    # strscpy(ptr, src + 1, 8) stops at the terminator inside src: no report.
    m.write(ptr.addr, m.read(src.addr + 1, GRANULE - 1))
    # strscpy fails if the first byte is unreadable.
    kasan_fail(lambda: m.read(src.addr + GRANULE, 1), "slab-out-of-bounds", access="Read", size=1)
    pa = ptr.addr
    m.kfree(src)
    m.kfree(ptr)
    # strchr, strrchr, strcmp, strncmp, strlen, strnlen of the freed string.
    for _ in range(6):
        kasan_fail(lambda: m.read(pa + 16, 1), "slab-use-after-free", access="Read", size=1)


def test_kasan_bitops_generic(m):
    bits = m.kzalloc(8 + 1)  # rounds up to kmalloc-16
    long = bits.addr + 8  # the long holding bit BITS_PER_LONG (and BITS_PER_LONG + 8)
    for _ in range(8):  # set_bit .. __change_bit
        kasan_fail(lambda: m.write(long, bytes(8)), "slab-out-of-bounds", access="Write", size=8)
    for _ in range(8):  # test_and_set_bit .. test_bit
        kasan_fail(lambda: m.read(long, 8), "slab-out-of-bounds", access="Read", size=8)
    m.kfree(bits)


def test_vmalloc_oob(m):
    size = PAGE_SIZE // 2 - GRANULE - 5  # 2035
    v = m.vmalloc(size)
    m.write(v.addr, b"\0")
    m.write(v.addr + size - 1, b"\0")
    text = kasan_fail(lambda: m.read(v.addr + size, 1), "vmalloc-out-of-bounds", access="Read", size=1)
    assert re.search(r"The buggy address belongs to a 1-page vmalloc region starting at 0x[0-9a-f]+ allocated at ",
                     text), text
    kasan_fail(lambda: m.read(v.addr + size + 5, 1), "vmalloc-out-of-bounds", access="Read", size=1)
    page = m.vmalloc_to_page(v.addr)
    m.write(m.page_address(page), b"\0")  # in bounds through the direct map
    m.vfree(v)


def test_copy_to_kernel_nofault_oob(m):
    size = 128
    p = m.kmalloc(size - GRANULE)
    kasan_fail(lambda: m.read(p.addr, size), "slab-out-of-bounds", access="Read", size=size)
    kasan_fail(lambda: m.write(p.addr, bytes(size)), "slab-out-of-bounds", access="Write", size=size)
    m.kfree(p)


def test_copy_user_test_oob(m):
    size = 128 - GRANULE
    kmem = m.kmalloc(size)
    usermem = bytes([ord("a")]) * (size + 1)
    for _ in range(3):  # copy_from_user, __copy_from_user, __copy_from_user_inatomic
        kasan_fail(lambda: m.write(kmem.addr, usermem), "slab-out-of-bounds", access="Write", size=size + 1)
    for _ in range(3):  # copy_to_user and friends read kmem
        kasan_fail(lambda: m.read(kmem.addr, size + 1), "slab-out-of-bounds", access="Read", size=size + 1)
    kasan_fail(lambda: m.write(kmem.addr, usermem), access="Write", size=size + 1)  # strncpy_from_user
    m.kfree(kmem)


# ---- every access route ------------------------------------------------------------------

ROUTES = ["read", "write", "access", "index", "index_set", "slice", "slice_set", "block_read", "block_write",
          "m_block", "memoryview"]


def oob_via(m, route: str, p, off: int):
    """One out-of-bounds access at ``p.addr + off`` (off >= len(p))."""
    a = p.addr + off
    return {
        "read": lambda: m.read(a, 1),
        "write": lambda: m.write(a, b"z"),
        "access": lambda: m.access(a, 1, write=True),
        "index": lambda: p[off],
        "index_set": lambda: p.__setitem__(off, 1),
        "slice": lambda: p[off: off + 1],
        "slice_set": lambda: p.__setitem__(slice(off, off + 1), b"z"),
        "block_read": lambda: p.read(off, 1),
        "block_write": lambda: p.write(b"z", off),
        "m_block": lambda: m.block(p.addr, off + 1),
        "memoryview": lambda: memoryview(m.block(p.addr, off + 1)),
    }[route]


@pytest.mark.parametrize("route", ROUTES)
def test_slab_out_of_bounds_every_route(m, route):
    size = 123
    p = m.kmalloc(size)
    p[0:size] = bytes(range(size))
    cls = kmm.KasanIndexError if route in ("index", "index_set", "slice", "slice_set", "block_read",
                                           "block_write") else kmm.KasanError
    text = kasan_fail(oob_via(m, route, p, size), "slab-out-of-bounds", cls=cls)
    assert "which belongs to the cache kmalloc-128 of size 128" in text
    if cls is kmm.KasanIndexError:
        assert isinstance(text, str)
        with pytest.raises(IndexError):
            oob_via(m, route, p, size)()
    # Nothing changed: the object's bytes and the redzone's shadow.
    assert bytes(p) == bytes(range(size))
    assert m.kasan_shadow(p.addr + 120, 16) == bytes([3, 0xFC])
    m.kfree(p)


@pytest.mark.parametrize("route", ["read", "write", "access", "index", "index_set", "slice", "slice_set",
                                   "block_read", "block_write", "bytes", "memoryview", "m_block"])
def test_use_after_free_every_route(m, route):
    p = m.kmalloc(64)
    a = p.addr
    m.kfree(p)
    fn = {
        "read": lambda: m.read(a, 8),
        "write": lambda: m.write(a, b"12345678"),
        "access": lambda: m.access(a, 8),
        "index": lambda: p[3],
        "index_set": lambda: p.__setitem__(3, 1),
        "slice": lambda: p[0:8],
        "slice_set": lambda: p.__setitem__(slice(0, 8), b"12345678"),
        "block_read": lambda: p.read(0, 8),
        "block_write": lambda: p.write(b"1", 0),
        "bytes": lambda: bytes(p),
        "memoryview": lambda: memoryview(p),
        "m_block": lambda: m.block(a, 64),
    }[route]
    text = kasan_fail(fn, "slab-use-after-free", cls=kmm.KasanUseAfterFreeError)
    assert "Freed by task" in text
    with pytest.raises(kmm.UseAfterFreeError):
        fn()


def test_without_kasan_raw_access_is_the_kernels_view():
    m = kmm.Machine(memory="256M")
    p = m.kmalloc(123)
    m.write(p.addr + 123, b"x")  # the unrequested tail: no KASAN, no error
    assert m.read(p.addr + 123, 1) == b"x"
    with pytest.raises(IndexError) as ei:
        p[123]
    assert not isinstance(ei.value, kmm.KasanError)
    assert m.kasan_shadow(p.addr, 8) == b""
    assert m.kasan_stats()["enabled"] is False
    m.kfree(p)
    assert m.check() == []


# ---- the shadow ---------------------------------------------------------------------------


def test_kmalloc_poisons_its_unrequested_tail(m):
    p = m.kmalloc(123)
    # Granules 0..14 accessible, granule 15 holds 123 - 120 = 3 bytes, then
    # the slot's KASAN redzone (kmalloc-128's slot is 256 with KASAN:
    # 128 + 16 alloc meta, at least 128 + optimal_redzone(128) = 192, aligned to 128).
    assert m.kasan_shadow(p.addr, 128) == bytes(15) + b"\x03"
    assert m.kasan_shadow(p.addr + 128, 128) == b"\xfc" * 16
    m.kfree(p)
    assert m.kasan_shadow(p.addr, 128) == b"\xfa" + b"\xfb" * 15  # KASAN_SLAB_FREE_META, KASAN_SLAB_FREE


def test_pages_vmalloc_and_large_kmalloc_shadow(m):
    page = m.alloc_pages(kmm.GFP_KERNEL, 1)
    a = m.page_address(page)
    assert m.kasan_shadow(a, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE // GRANULE)
    m.free_pages(page, 1)
    assert m.kasan_shadow(a, 2 * PAGE_SIZE) == b"\xff" * (2 * PAGE_SIZE // GRANULE)  # KASAN_PAGE_FREE
    big = m.kmalloc(KMALLOC_MAX_CACHE_SIZE + 10)
    sh = m.kasan_shadow(big.addr, 4 * PAGE_SIZE)
    assert sh[1024:1026] == b"\x00\x02" and set(sh[1026:]) == {0xFE}  # KASAN_PAGE_REDZONE
    m.kfree(big)
    v = m.vmalloc(100)
    assert m.kasan_shadow(v.addr, PAGE_SIZE * 2) == bytes(12) + b"\x04" + b"\xf8" * (1024 - 13)  # tail and guard
    m.vfree(v)
    assert set(m.kasan_shadow(v.addr, PAGE_SIZE)) == {0xF8}


def test_slab_redzone_on_unallocated_objects_and_ctor(m):
    seen = []

    def ctor(blk):
        blk[0:4] = b"ctor"  # the ctor may touch its object
        seen.append(blk.addr)

    c = m.kmem_cache_create("with_ctor", 40, ctor=ctor)
    p = c.alloc()
    assert bytes(p[0:4]) == b"ctor"
    nxt = seen[1]  # built by the ctor, never allocated: KASAN_SLAB_REDZONE
    assert set(m.kasan_shadow(nxt, 40)) == {0xFC}
    kasan_fail(lambda: m.read(nxt, 1), "slab-out-of-bounds")
    c.free(p)
    c.destroy()


def test_wild_and_null_accesses(m):
    kasan_fail(lambda: m.read(0, 8), "null-ptr-deref", access="Read", size=8)
    kasan_fail(lambda: m.write(0x10, b"x"), "null-ptr-deref", access="Write", size=1)
    kasan_fail(lambda: m.read(0x7F00_0000_0000, 1), "user-memory-access")
    kasan_fail(lambda: m.read(0x8000_0000_0000_0000, 1), "wild-memory-access")
    z = m.kmalloc(0)  # ZERO_SIZE_PTR
    kasan_fail(lambda: z[0], "null-ptr-deref", cls=kmm.KasanIndexError)
    # A kernel address with no shadow and no mapping still faults in the MMU.
    with pytest.raises(kmm.PageFaultError):
        m.read(0xFFFF_FF00_0000_0000, 1)


def test_vmalloc_guard_and_unmapped_space(m):
    v = m.vmalloc(PAGE_SIZE)
    kasan_fail(lambda: m.read(v.addr + PAGE_SIZE, 1), "vmalloc-out-of-bounds")  # the guard page
    kasan_fail(lambda: m.write(v.addr + (1 << 30), b"x"), "vmalloc-out-of-bounds",
               where="vmalloc virtual mapping")  # unmapped vmalloc space
    m.vfree(v)
    kasan_fail(lambda: m.read(v.addr, 1), "vmalloc-out-of-bounds")  # after vfree


# ---- refused with nothing changed ----------------------------------------------------------


def test_refused_double_and_invalid_frees_change_nothing(m):
    c = m.kmalloc_size_roundup(100)
    assert c == 128
    p = m.kmalloc(100)
    q = m.kmalloc(100)
    m.kfree(p)
    info = m.proc.slabinfo()
    stats = m.kasan_stats()
    kasan_fail(lambda: m.kfree(p.addr), "double-free", cls=kmm.KasanDoubleFreeError)
    kasan_fail(lambda: m.kfree(q.addr + 8), "invalid-free", cls=kmm.KasanInvalidFreeError)
    assert m.proc.slabinfo() == info
    after = m.kasan_stats()
    assert after["quarantine_objects"] == stats["quarantine_objects"]
    assert after["reports"] == stats["reports"] + 2
    q[99] = 5  # q is intact
    m.kfree(q)


# ---- the quarantine --------------------------------------------------------------------------


def test_quarantine_is_sized_as_the_kernel_sizes_it(m):
    # quarantine.c: per-CPU lists up to QUARANTINE_PERCPU_SIZE (1 MiB) before
    # they move to the global quarantine, which may hold RAM / 32 minus the
    # per-CPU lists; kasan_quarantine_reduce gives back its oldest batch
    # (>= 1 MiB) when it is over.
    ram = m.totalram_pages() * PAGE_SIZE
    max_global = ram // 32 - (1 << 20) * 2
    slot = 8192  # kmalloc-4k's slot with KASAN (4096 + optimal redzone 256, aligned to 4096)
    seen_global = 0
    for _ in range(4000):  # 4000 * 8 KiB = 31 MiB of slots freed
        m.kfree(m.kmalloc(4096))
        st = m.kasan_stats()
        assert st["quarantine_percpu_bytes"] <= (1 << 20) + slot
        assert st["quarantine_bytes"] <= max_global + 2 * ((1 << 20) + slot)
        seen_global = max(seen_global, st["quarantine_bytes"])
    assert seen_global > max_global - (2 << 20)
    # Shrinking the cache empties its part of the quarantine.
    m.kmem_cache("kmalloc-4k").shrink()
    assert m.kasan_stats()["quarantine_objects"] == 0


def test_quarantine_delays_reuse(m):
    freed = []
    for _ in range(50):
        p = m.kmalloc(64)
        freed.append(p.addr)
        m.kfree(p)
    assert len(set(freed)) == 50  # no slot handed out twice while quarantined


# ---- recordings ---------------------------------------------------------------------------------


def test_replay_with_kasan_reports_nothing():
    from pathlib import Path

    trace = Path(kmm.__file__).parent / "data" / "sample.perf.txt.xz"
    t = kmm.trace.load(str(trace))
    m = kmm.Machine(memory="2G", cpus=4, cmdline="kasan=on")
    kmm.trace.replay(t, m)
    assert m.kasan_stats()["reports"] == 0
    assert m.check() == []


def test_warm_start_with_kasan():
    # The warm start lays pages and slabs out without the allocator's hooks;
    # the shadow is rebuilt from that state: free blocks poisoned, in-use
    # pages accessible, slabs redzone but for their live objects.
    from pathlib import Path

    rec = kmm.trace.load(str(Path(kmm.__file__).parent / "data" / "warm2"))
    m = rec.machine(warm=True, cmdline="kasan=on")
    assert m.check() == []
    c = max(m.caches, key=lambda c: c.objects_in_use())
    # A fresh object of the busiest recorded cache is accessible, its slot's
    # tail is not, and freeing it is no double free.
    with m.on_cpu(0):
        p = c.alloc()
        m.write(p.addr, bytes(c.object_size))
        kasan_fail(lambda: m.read(p.addr + c.object_size, 1), "slab-out-of-bounds")
        c.free(p)
    assert m.kasan_stats()["reports"] == 1
    assert m.check() == []


def test_i386_direct_map_checked_kmap_windows_not():
    m = kmm.Machine(arch="i386", memory="2G", cmdline="kasan=on")
    page = m.alloc_pages(kmm.GFP_HIGHUSER, 0)  # highmem: no direct-map address, no shadow
    assert m.page_address(page) is None
    with m.kmap_local_page(page) as mem:
        mem[0:4] = b"abcd"
        assert bytes(mem[0:4]) == b"abcd"
    b = m.kmalloc(50)
    text = kasan_fail(lambda: b[50], "slab-out-of-bounds", cls=kmm.KasanIndexError)
    assert re.search(r"Read of size 1 at addr [0-9a-f]{8} by task", text), text  # 32-bit %px
    kasan_fail(lambda: m.read(0x100, 4), "null-ptr-deref")
    m.kfree(b)
    m.free_pages(page, 0)
    assert m.check() == []


# ---- with the other boot parameters --------------------------------------------------


def test_with_init_on_free_quarantine_and_destroy():
    """kasan=on beside init_on_alloc/init_on_free: slab_free_hook zeroes the
    object, then kasan_slab_free quarantines it (mm/slub.c), so a use after
    free is still reported; kmem_cache_destroy flushes the cache's
    quarantined objects first (kasan_cache_shutdown) and is refused only
    for live ones (mm/slab_common.c)."""
    m = kmm.Machine(memory="256M", cpus=2, cmdline="kasan=on init_on_alloc=1 init_on_free=1")
    with m.on_cpu(0):
        p = m.kmalloc(100)
        p[0:4] = b"\xaa\xbb\xcc\xdd"
        addr = p.addr
        m.kfree(p)
        kasan_fail(lambda: m.read(addr, 4), "slab-use-after-free", access="Read", size=4,
                   cls=kmm.KasanUseAfterFreeError)
        c = m.kmem_cache_create("kasan_destroy", 40)
        live = c.alloc()
        freed = [c.alloc() for _ in range(5)]
        for o in freed:
            c.free(o)
        with pytest.raises(kmm.KmmError, match="Slab cache still has objects"):
            m.kmem_cache_destroy(c)
        assert live[0:1] == bytes(1)  # init_on_alloc: zeroed, and still live
        c.free(live)
        m.kmem_cache_destroy(c)
    assert m.check() == []


def test_read_whose_end_wraps_is_out_of_bounds(m):
    # report_generic.c, kasan_get_bug_type: access_addr + access_size < access_addr.
    p = m.kmalloc(64)
    kasan_fail(lambda: m.read(p.addr, 2**64 - 8), "out-of-bounds")
    m.kfree(p)


def test_kmalloc_from_a_cache_poisons_the_unrequested_tail(m):
    """__kmalloc_cache_noprof goes through kasan_kmalloc as kmalloc does:
    bytes 123..127 of a 123-byte request from kmalloc-128 are poisoned."""
    c = m.kmem_cache("kmalloc-128")
    b = c.kmalloc(123, kmm.GFP_KERNEL)
    m.write(b.addr + 122, b"\x01")
    kasan_fail(lambda: m.write(b.addr + 123, b"\x01"), "slab-out-of-bounds", access="Write", size=1,
               where=located(0, "to the right", "allocated ", 123))
    m.kfree(b)
