"""Blocks: the real, writable memory of a live allocation, with the buffer
protocol; use-after-free, double free and busy buffers; and the kmalloc/kfree
tracepoints with the Python caller as call site.
"""

from __future__ import annotations

import re
import sys

import pytest

import kmm
from conftest import assert_healthy, buddyinfo, sample_trace_lines, free_pages


def snapshot(m: kmm.Machine):
    return m.proc.slabinfo(), free_pages(m), buddyinfo(m)


def test_block_basics(m):
    b = m.kmalloc(10)
    assert isinstance(b, kmm.Block)
    assert len(b) == 10
    assert b.addr >= m.page_offset
    assert int(b) == b.addr and b.__index__() == b.addr
    assert b.alive_
    b[0] = 0x41
    b[-1] = 0x42
    b[1:4] = b"xyz"
    assert b[0] == 0x41 and isinstance(b[0], int)
    assert b[-1] == 0x42 and b[9] == 0x42
    assert b[1:4] == b"xyz" and isinstance(b[1:4], bytes)
    assert b[:0] == b""
    assert b[8:100] == b[8:10]  # slices clip like bytes slices
    assert bytes(b)[:4] == b"Axyz"
    assert m.read(b.addr, 4) == b"Axyz"
    assert m.read(b.addr + 9, 1) == b"B"
    b.write(b"hello", 5)
    assert b.read(5, 5) == b"hello" and b.read(8) == b"lo"
    assert m.read(b.addr + 5, 5) == b"hello"
    m.write(b.addr, b"Z")  # writes through the machine show in the Block
    assert b[0] == ord("Z")
    m.kfree(b)
    assert_healthy(m)


def test_block_bounds(m):
    b = m.kmalloc(10)  # kmalloc-16: ksize 16, but the Block is the 10 asked for
    assert m.ksize(b) == 16
    before = m.read(b.addr, 16)
    with pytest.raises(IndexError):
        b[10]
    with pytest.raises(IndexError):
        b[-11]
    with pytest.raises(IndexError):
        b[10] = 1
    with pytest.raises(ValueError):
        b[8:12] = b"abcd"  # only 2 bytes fit: a slice cannot grow
    with pytest.raises(ValueError):
        b[0:2] = b"a"
    with pytest.raises(IndexError):
        b.write(b"abc", 8)
    with pytest.raises(IndexError):
        b.read(8, 3)
    with pytest.raises((ValueError, OverflowError)):
        b[0] = 256
    with pytest.raises(TypeError):
        b[0:1] = "x"
    assert m.read(b.addr, 16) == before  # nothing was written
    m.kfree(b)


def test_memoryview_is_the_real_memory(m):
    b = m.kmalloc(100)
    v = memoryview(b)
    assert v.format == "B" and v.itemsize == 1 and v.nbytes == 100 and not v.readonly
    v[0:5] = b"abcde"
    assert m.read(b.addr, 5) == b"abcde"
    m.write(b.addr + 50, b"!")
    assert v[50] == ord("!")
    assert bytes(v[:5]) == b[:5]
    v.release()
    m.kfree(b)


def test_use_after_free_raises(m):
    b = m.kmalloc(32)
    addr = b.addr
    m.kfree(b)
    assert not b.alive_
    assert b.addr == addr and int(b) == addr  # the address itself is just a number
    for use in (
        lambda: len(b),
        lambda: bytes(b),
        lambda: b[0],
        lambda: b[0:4],
        lambda: b.__setitem__(0, 1),
        lambda: b.read(),
        lambda: b.write(b"x"),
        lambda: memoryview(b),
        lambda: m.ksize(b),
        lambda: m.krealloc(b, 64),
    ):
        with pytest.raises(kmm.UseAfterFreeError):
            use()
    assert_healthy(m)


def test_cache_object_use_after_free(m):
    c = m.kmem_cache_create("t_uaf", 48)
    o = c.alloc()
    c.free(o)
    with pytest.raises(kmm.UseAfterFreeError):
        o[0] = 1
    with pytest.raises(kmm.UseAfterFreeError):
        memoryview(o)
    with pytest.raises(kmm.DoubleFreeError):
        c.free(o)


def test_large_kmalloc_use_after_free(m):
    b = m.kmalloc(20000)
    m.kfree(b)
    with pytest.raises(kmm.UseAfterFreeError):
        bytes(b)
    with pytest.raises(kmm.DoubleFreeError):
        m.kfree(b)


@pytest.mark.parametrize("size", [24, 700, 20000])
def test_free_with_a_live_memoryview_is_refused(m, size):
    b = m.kmalloc(size)
    v = memoryview(b)
    v[0] = 7
    before = snapshot(m)
    with m.trace.record("kmem:kfree") as rec:
        with pytest.raises(BufferError):
            m.kfree(b)
        with pytest.raises(BufferError):
            m.kfree(b.addr)  # by address too: the memory is pinned
        with pytest.raises(BufferError):
            m.krealloc(b, size * 4)
    assert len(rec) == 0  # nothing freed, so no kfree event either
    assert snapshot(m) == before
    assert b.alive_ and v[0] == 7 and b[0] == 7
    assert_healthy(m)
    v.release()
    m.kfree(b)
    assert not b.alive_
    assert_healthy(m)


def test_two_memoryviews_both_pin(m):
    b = m.kmalloc(40)
    with memoryview(b) as v1:
        with memoryview(b) as v2:
            v2[0] = 1
        with pytest.raises(BufferError):
            m.kfree(b)  # v1 still alive
        assert v1[0] == 1
    m.kfree(b)


def test_cache_free_with_a_live_memoryview_is_refused(m):
    c = m.kmem_cache_create("t_pin", 80)
    o = c.alloc()
    v = memoryview(o)
    before = snapshot(m)
    with pytest.raises(BufferError):
        c.free(o)
    with pytest.raises(BufferError):
        c.free_bulk([o])
    assert snapshot(m) == before and c.objects_in_use() == 1
    v.release()
    c.free(o)
    assert c.objects_in_use() == 0


def test_double_free(m):
    b = m.kmalloc(64)
    m.kfree(b)
    after = snapshot(m)
    with pytest.raises(kmm.DoubleFreeError):
        m.kfree(b)
    with pytest.raises(kmm.DoubleFreeError, match="double free"):
        m.kfree(b.addr)
    assert snapshot(m) == after
    assert_healthy(m)


def test_kfree_by_address(m):
    b = m.kmalloc(64)
    b[0] = 9
    m.kfree(b.addr)
    assert not b.alive_
    with pytest.raises(kmm.UseAfterFreeError):
        b[0]
    big = m.kmalloc(50000)
    free = free_pages(m)
    m.kfree(int(big))
    assert free_pages(m) == free + 16
    assert_healthy(m)


def test_kfree_of_an_interior_pointer_is_refused(m):
    b = m.kmalloc(64)
    big = m.kmalloc(20000)
    before = snapshot(m)
    with pytest.raises(kmm.InvalidFreeError):
        m.kfree(b.addr + 8)
    with pytest.raises(kmm.InvalidFreeError):
        m.kfree(big.addr + 4096)
    with pytest.raises(kmm.InvalidFreeError):
        m.kfree(0x12345)
    assert snapshot(m) == before and b.alive_ and big.alive_
    m.kfree(b)
    m.kfree(big)
    assert_healthy(m)


def test_stale_block_freed_by_address_then_reused_is_use_after_free(m):
    old = m.kmalloc(64)
    m.kfree(old.addr)  # freed behind the Block's back
    new = m.kmalloc(64)
    assert new.addr == old.addr  # LIFO: the same memory went to someone else
    new[:] = b"n" * 64
    before = snapshot(m)
    with pytest.raises(kmm.UseAfterFreeError):
        bytes(old)
    with pytest.raises(kmm.UseAfterFreeError):
        old[0] = 0
    with pytest.raises(kmm.UseAfterFreeError):
        m.kfree(old)  # must not free the new owner's object
    assert snapshot(m) == before
    assert new.alive_ and bytes(new) == b"n" * 64
    m.kfree(new)
    assert_healthy(m)


def test_stale_block_of_a_reused_cache_object(m):
    c = m.kmem_cache_create("t_stale", 64)
    old = c.alloc()
    c.free(old.addr)
    new = c.alloc()
    assert new.addr == old.addr
    with pytest.raises(kmm.UseAfterFreeError):
        old[0]
    with pytest.raises(kmm.UseAfterFreeError):
        c.free(old)
    assert new.alive_ and c.objects_in_use() == 1
    c.free(new)


def test_machine_block_views_a_live_allocation(m):
    b = m.kmalloc(64)
    b[:4] = b"live"
    v = m.block(b.addr, 64)
    assert bytes(v)[:4] == b"live"
    m.kfree(v)  # freeing through either Block frees the allocation
    assert not b.alive_
    with pytest.raises(kmm.UseAfterFreeError):
        m.block(b.addr, 64)


def test_module_level_kmalloc_uses_the_default_machine():
    d = kmm.default_machine()
    b = kmm.kmalloc(100)
    assert d.ksize(b) == 128
    kmm.kfree(b)
    assert not b.alive_


# ---- tracing -------------------------------------------------------------------------------


def test_trace_call_site_is_the_python_caller(m):
    with m.trace.record("kmem:kmalloc,kmem:kfree") as rec:
        line_a = sys._getframe().f_lineno + 1
        b = m.kmalloc(40)
        line_f = sys._getframe().f_lineno + 1
        m.kfree(b)
        line_n = sys._getframe().f_lineno + 1
        m.kfree(None)
    a, f, n = rec.events
    fn = "test_trace_call_site_is_the_python_caller"
    assert (a.name, f.name, n.name) == ("kmem:kmalloc", "kmem:kfree", "kmem:kfree")
    assert a["call_site"] == f"{fn}+{line_a:#x}"
    assert f["call_site"] == f"{fn}+{line_f:#x}"
    assert n["call_site"] == f"{fn}+{line_n:#x}"
    assert a.text == (
        f"call_site={fn}+{line_a:#x} ptr={b.addr:#x} bytes_req=40 bytes_alloc=64 "
        "gfp_flags=GFP_KERNEL node=-1 accounted=false"
    )
    assert a["ptr"] == b.addr and a["bytes_req"] == 40 and a["bytes_alloc"] == 64
    assert f.text == f"call_site={fn}+{line_f:#x} ptr={b.addr:#x}"
    assert n.text == f"call_site={fn}+{line_n:#x} ptr=(nil)"  # kfree(NULL) is traced too


def test_trace_text_has_the_shape_of_the_real_trace(m):
    real_kmalloc = real_kfree = None
    for line in sample_trace_lines():
        if real_kmalloc is None and "kmem:kmalloc:" in line and "GFP_KERNEL_ACCOUNT node" in line:
            real_kmalloc = line.split("kmem:kmalloc: ", 1)[1].strip()
        if real_kfree is None and "kmem:kfree:" in line and "(nil)" not in line:
            real_kfree = line.split("kmem:kfree: ", 1)[1].strip()
        if real_kmalloc and real_kfree:
            break

    def shape(text):
        return re.sub(r"call_site=\S+", "call_site=S", re.sub(r"ptr=0x[0-9a-f]+", "ptr=P", text))

    req = int(re.search(r"bytes_req=(\d+)", real_kmalloc)[1])
    with m.trace.record("kmem:kmalloc,kmem:kfree") as rec:
        b = m.kmalloc(req, kmm.GFP_KERNEL_ACCOUNT)
        m.kfree(b)
    a, f = rec.events
    assert shape(a.text) == shape(real_kmalloc)
    assert shape(f.text) == shape(real_kfree)
    assert "accounted=true" in a.text
    script = rec.to_perf_script()
    assert " kmem:kmalloc: call_site=" in script and " kmem:kfree: call_site=" in script


def test_krealloc_traces(m):
    a = m.kmalloc(20)
    with m.trace.record("kmem:kmalloc,kmem:kfree") as rec:
        b = m.krealloc(a, 30)  # in place: no event
    assert len(rec) == 0
    with m.trace.record("kmem:kmalloc,kmem:kfree") as rec:
        c = m.krealloc(b, 300)  # moves: a kmalloc, then the kfree of the old object
    assert [e.name for e in rec.events] == ["kmem:kmalloc", "kmem:kfree"]
    k, f = rec.events
    assert k["ptr"] == c.addr and k["bytes_req"] == 300 and k["bytes_alloc"] == 512
    assert f["ptr"] == a.addr
    m.kfree(c)


def test_cache_events(m):
    c = m.kmem_cache_create("t_ev", 50)
    with m.trace.record("kmem:kmem_cache_*") as rec:
        o = c.alloc()
        c.free(o)
    al, fr = rec.events
    assert al.name == "kmem:kmem_cache_alloc" and fr.name == "kmem:kmem_cache_free"
    fn = "test_cache_events"
    assert al.text.startswith(f"call_site={fn}+0x")
    assert al.text.endswith(
        f" ptr={o.addr:#x} name=t_ev bytes_req=50 bytes_alloc=56 gfp_flags=GFP_KERNEL node=-1 accounted=false"
    )
    assert fr.text.endswith(f"ptr={o.addr:#x} name=t_ev")
