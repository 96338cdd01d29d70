"""Regression tests for bugs found while writing the slab/kmalloc tests.
Each docstring names the kernel source (or kmm's documented API) it follows
and the bug it guards against.
"""

from __future__ import annotations

import pytest

import kmm
from conftest import free_pages

ZERO = kmm.__GFP_ZERO


def test_merged_cache_takes_the_larger_object_size():
    """mm/slub.c __kmem_cache_alias: a merged request of `size` bytes sets
    s->object_size = max(s->object_size, size) (and s->inuse likewise), so a
    caller of the alias gets objects of the size it asked for. kmm leaves the
    old object_size: the alias hands out 97-byte Blocks to a 100-byte user."""
    m = kmm.Machine()
    a = m.kmem_cache_create("bug_a", 97)
    b = m.kmem_cache_create("bug_b", 100)
    assert b.alias == "bug_b" and b.name == "bug_a"  # merged (slot 104 for both)
    o = b.alloc()
    assert b.object_size == 100
    assert len(o) == 100
    o[99] = 1
    b.free(o)


def test_ctor_can_write_the_object_through_its_block():
    """A ctor constructs the object it is given (mm/slub.c setup_object ->
    s->ctor(object)). kmm passes a Block that is not yet "live", so every
    write through it raises UseAfterFreeError inside the ctor (reported as
    unraisable and swallowed), and the object is never constructed."""
    m = kmm.Machine()
    errors = []

    def ctor(blk):
        try:
            blk[:] = b"\x42" * 64
        except Exception as e:  # noqa: BLE001 - collect, assert below
            errors.append(e)

    c = m.kmem_cache_create("bug_ctor", 64, ctor=ctor)
    o = c.alloc()
    assert errors == []
    assert bytes(o) == b"\x42" * 64
    c.free(o)


def test_krealloc_gfp_zero_in_place_zeroes_the_tail():
    """mm/slub.c __do_krealloc (documented in include/linux/slab.h krealloc):
    without a stored orig_size, an in-place krealloc with __GFP_ZERO zeroes
    [new_size, ks) ("keep | zero"). kmm zeroes nothing in place."""
    m = kmm.Machine()
    b = m.kmalloc(32)
    b[:] = b"\xff" * 32
    s = m.krealloc(b, 10, kmm.GFP_KERNEL | ZERO)
    assert s.addr == b.addr
    assert m.read(s.addr, 32) == b"\xff" * 10 + bytes(22)
    m.kfree(s)


def test_zero_size_block_reads_as_empty():
    """kmalloc(0) is the zero-length Block at ZERO_SIZE_PTR; reading zero
    bytes touches no memory (memcpy(dst, ZERO_SIZE_PTR, 0) is fine in the
    kernel) and memoryview(block) is already b"". kmm raises PageFaultError
    for bytes(block), block[:], block.read() and block.write(b"")."""
    m = kmm.Machine()
    z = m.kmalloc(0)
    assert bytes(memoryview(z)) == b""
    assert bytes(z) == b""
    assert z[:] == b""
    assert z.read() == b""
    z.write(b"")


def test_large_kmalloc_event_shows_the_callers_gfp_flags():
    """mm/slub.c: ___kmalloc_large_node(size, flags, node) ORs __GFP_COMP into
    its own copy of flags; __kmalloc_large_node_noprof and __do_kmalloc_node
    call trace_kmalloc(..., flags, node) with the caller's flags. So
    kmalloc(20000, GFP_KERNEL) traces gfp_flags=GFP_KERNEL (twice), not
    GFP_KERNEL|__GFP_COMP as kmm prints."""
    m = kmm.Machine()
    with m.trace.record("kmem:kmalloc") as rec:
        b = m.kmalloc(20000, kmm.GFP_KERNEL)
    assert len(rec) == 2
    for e in rec.events:
        assert e["gfp_flags"] == kmm.GFP_KERNEL
        assert " gfp_flags=GFP_KERNEL node=-1 " in e.text
    m.kfree(b)


def test_shrink_returns_every_page_it_gave_back():
    """KmemCache.shrink() is documented as "give empty slabs back; returns
    pages freed" (Machine.kmem_cache_shrink: "pages given back"). Slabs that
    the shrink's own flush discards (CPU partial slabs drained when the node
    list already holds min_partial slabs) are given back but not counted."""
    m = kmm.Machine(slab_nomerge=True)
    c = m.kmem_cache_create("bug_shrink", 1024)
    objs = [c.alloc() for _ in range(20 * c.objs_per_slab)]
    for o in objs:
        c.free(o)
    before = free_pages(m)
    returned = c.shrink()
    assert returned == free_pages(m) - before  # was: 20 returned, 28 given back


@pytest.mark.parametrize("how", ["kfree", "kmem_cache_free"])
def test_stale_block_whose_memory_was_reused_is_use_after_free_on_free(how):
    """Per the slab brief: a Block whose memory now belongs to another
    allocation raises UseAfterFreeError on use *and* on free, not
    DoubleFreeError (the memory is not free: it is someone else's object,
    and kmm already has the message "was freed and its memory belongs to
    another allocation now" for it). kmm raises UseAfterFreeError when the
    Block was freed by address, but DoubleFreeError when it was freed
    through the Block itself. (The new owner is protected either way.)"""
    m = kmm.Machine()
    c = m.kmem_cache_create("bug_stale", 64)
    if how == "kfree":
        old = m.kmalloc(64)
        m.kfree(old)
        new = m.kmalloc(64)
        free = m.kfree
    else:
        old = c.alloc()
        c.free(old)
        new = c.alloc()
        free = c.free
    assert new.addr == old.addr
    with pytest.raises(kmm.UseAfterFreeError):
        bytes(old)
    with pytest.raises(kmm.UseAfterFreeError):
        free(old)
    assert new.alive_
