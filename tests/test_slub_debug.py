"""slub_debug: lib/slub_kunit.c's cases (Linux 6.18) translated one test per
kernel case, then the reports, repairs and user tracking of mm/slub.c.

The kunit cases count errors through their `slab_errors` resource
(`slab_add_kunit_errors`: one per detection, one per FIX line); kmm keeps
the same count in `m.slab_errors`, and `validate()` returns its share. The
kernel's expected counts are copied from lib/slub_kunit.c. `test_bench` is
a benchmark, not a check, and is not translated. kmm has no RCU: the two
kfree_rcu cases free at once (what they check, no error at destroy, holds).
"""

from __future__ import annotations

import re
import threading

import pytest

import kmm
from conftest import assert_healthy


def test_kmem_cache_create(m: kmm.Machine, name: str, size: int, flags: int) -> kmm.KmemCache:
    """lib/slub_kunit.c's wrapper: SLAB_NO_USER_FLAGS keeps slub_debug= out."""
    return m.kmem_cache_create(name, size, flags=flags | kmm.SLAB_NO_USER_FLAGS)


# pytest must not collect the helper above as a test.
test_kmem_cache_create.__test__ = False  # type: ignore[attr-defined]


class SlabErrors:
    """The kunit `slab_errors` resource: errors reported since the test began."""

    def __init__(self, m: kmm.Machine) -> None:
        self.m = m
        self.start = m.slab_errors

    def __int__(self) -> int:
        return self.m.slab_errors - self.start

    def reset(self) -> None:
        self.start = self.m.slab_errors


@pytest.fixture
def mm() -> kmm.Machine:
    return kmm.Machine(memory="256M")


def slab_start(c: kmm.KmemCache, addr: int) -> int:
    """The first byte of the slab holding `addr` (slab pages are naturally aligned)."""
    return addr & ~((4096 << c.order) - 1)


# ---- lib/slub_kunit.c ----------------------------------------------------------------------


def test_clobber_zone(mm):
    slab_errors = SlabErrors(mm)
    s = test_kmem_cache_create(mm, "TestSlub_RZ_alloc", 64, kmm.SLAB_RED_ZONE)
    p = s.alloc()
    mm.write(p.addr + 64, b"\x12")  # p[64] = 0x12, KASAN off

    assert s.validate() == 2
    assert int(slab_errors) == 2
    log = mm.dmesg()
    a = f"{p.addr + 64:016x}"
    assert f"[Right Redzone overwritten] 0x{a}-0x{a} @offset={p.addr + 64 - slab_start(s, p.addr)}. First byte 0x12 instead of 0xcc" in log
    assert "BUG TestSlub_RZ_alloc (Not tainted): Object corrupt" in log
    assert f"FIX TestSlub_RZ_alloc: Restoring Right Redzone 0x{a}-0x{a}=0xcc" in log
    assert mm.read(p.addr + 64, 1) == b"\xcc"  # repaired
    assert_healthy(mm)

    s.free(p)
    s.destroy()
    assert int(slab_errors) == 2
    assert_healthy(mm)


def test_next_pointer(mm):
    slab_errors = SlabErrors(mm)
    s = test_kmem_cache_create(mm, "TestSlub_next_ptr_free", 64, kmm.SLAB_POISON)
    p = s.alloc()
    s.free(p)
    ptr_addr = p.addr + s.offset
    tmp = mm.read(ptr_addr, 8)
    mm.write(ptr_addr, bytes([tmp[0] ^ 0xFF]))  # p[s->offset] = ~p[s->offset]

    # The corrupted freechain, the wrong count of objects in use, the fix.
    assert s.validate() == 3
    assert int(slab_errors) == 3
    log = mm.dmesg(clear=True)
    assert "BUG TestSlub_next_ptr_free (Not tainted): Freechain corrupt" in log
    assert f"Wrong object count. Counter is 0 but counted were {s.objs_per_slab - 1}" in log
    assert "FIX TestSlub_next_ptr_free: Object count adjusted" in log
    assert_healthy(mm)

    # Repair the free pointer: the count of objects in use is wrong again.
    mm.write(ptr_addr, tmp)
    slab_errors.reset()
    assert s.validate() == 2
    assert int(slab_errors) == 2
    assert f"Wrong object count. Counter is {s.objs_per_slab - 1} but counted were 0" in mm.dmesg()
    assert_healthy(mm)

    # The previous validation repaired the count.
    slab_errors.reset()
    assert s.validate() == 0
    assert int(slab_errors) == 0
    s.destroy()
    assert_healthy(mm)


def test_first_word(mm):
    slab_errors = SlabErrors(mm)
    s = test_kmem_cache_create(mm, "TestSlub_1th_word_free", 64, kmm.SLAB_POISON)
    p = s.alloc()
    s.free(p)
    mm.write(p.addr, b"\x78")  # *p = 0x78

    assert s.validate() == 2
    assert int(slab_errors) == 2
    log = mm.dmesg()
    assert f"[Poison overwritten] 0x{p.addr:016x}-0x{p.addr:016x}" in log
    assert "First byte 0x78 instead of 0x6b" in log
    assert "FIX TestSlub_1th_word_free: Restoring Poison" in log
    assert mm.read(p.addr, 64) == b"\x6b" * 63 + b"\xa5"
    s.destroy()
    assert_healthy(mm)


def test_clobber_50th_byte(mm):
    slab_errors = SlabErrors(mm)
    s = test_kmem_cache_create(mm, "TestSlub_50th_word_free", 64, kmm.SLAB_POISON)
    p = s.alloc()
    s.free(p)
    mm.write(p.addr + 50, b"\x9a")  # p[50] = 0x9a

    assert s.validate() == 2
    assert int(slab_errors) == 2
    assert "First byte 0x9a instead of 0x6b" in mm.dmesg()
    assert mm.read(p.addr, 64) == b"\x6b" * 63 + b"\xa5"
    s.destroy()
    assert_healthy(mm)


def test_clobber_redzone_free(mm):
    slab_errors = SlabErrors(mm)
    s = test_kmem_cache_create(mm, "TestSlub_RZ_free", 64, kmm.SLAB_RED_ZONE)
    p = s.alloc()
    s.free(p)
    mm.write(p.addr + 64, b"\xab")  # p[64] = 0xab after the free

    assert s.validate() == 2
    assert int(slab_errors) == 2
    assert "[Right Redzone overwritten]" in mm.dmesg()
    assert "First byte 0xab instead of 0xbb" in mm.dmesg()
    assert mm.read(p.addr + 64, 1) == b"\xbb"
    s.destroy()
    assert_healthy(mm)


def test_kmalloc_redzone_access(mm):
    slab_errors = SlabErrors(mm)
    s = test_kmem_cache_create(mm, "TestSlub_RZ_kmalloc", 32, kmm.SLAB_KMALLOC | kmm.SLAB_STORE_USER | kmm.SLAB_RED_ZONE)
    p = s.kmalloc(18)  # __kmalloc_cache_noprof(s, GFP_KERNEL, 18)
    assert len(p) == 18
    mm.write(p.addr + 18, b"\xab\xab")  # p[18] = p[19] = 0xab

    assert s.validate() == 2
    assert int(slab_errors) == 2
    a, b = f"{p.addr + 18:016x}", f"{p.addr + 19:016x}"
    assert f"[kmalloc Redzone overwritten] 0x{a}-0x{b}" in mm.dmesg()
    assert f"FIX TestSlub_RZ_kmalloc: Restoring kmalloc Redzone 0x{a}-0x{b}=0xcc" in mm.dmesg()
    assert mm.read(p.addr + 18, 14) == b"\xcc" * 14
    s.free(p)
    s.destroy()
    assert_healthy(mm)


def test_kfree_rcu(mm):
    slab_errors = SlabErrors(mm)
    # sizeof(struct rcu_head) on 64-bit: two pointers.
    s = test_kmem_cache_create(mm, "TestSlub_kfree_rcu", 16, kmm.SLAB_NO_MERGE)
    p = s.alloc()
    s.free(p)  # kfree_rcu(p, rcu): no grace period in kmm
    s.destroy()
    assert int(slab_errors) == 0
    assert s.destroyed
    assert_healthy(mm)


def test_kfree_rcu_wq_destroy(mm):
    slab_errors = SlabErrors(mm)
    for _ in range(10):  # KMEM_CACHE_DESTROY_NR
        s = test_kmem_cache_create(mm, "TestSlub_kfree_rcu_wq_destroy", 16, kmm.SLAB_NO_MERGE)
        p = s.alloc()
        s.free(p)
        # queue_work + flush_work: destroyed from another thread.
        t = threading.Thread(target=s.destroy)
        t.start()
        t.join()
        assert s.destroyed
    assert int(slab_errors) == 0
    assert_healthy(mm)


def test_leak_destroy(mm):
    slab_errors = SlabErrors(mm)
    s = test_kmem_cache_create(mm, "TestSlub_leak_destroy", 64, kmm.SLAB_NO_MERGE)
    p = s.alloc()
    # The kernel reports and leaks the cache; kmm refuses the destroy.
    with pytest.raises(kmm.KmmError, match="Slab cache still has objects"):
        s.destroy()
    # list_slab_objects: one for the slab, one per object left.
    assert int(slab_errors) == 2
    log = mm.dmesg()
    assert re.search(r"BUG TestSlub_leak_destroy \(.*\): Objects remaining in TestSlub_leak_destroy on __kmem_cache_shutdown\(\)", log)
    assert f"Object 0x{p.addr:016x} @offset={p.addr - slab_start(s, p.addr)}" in log
    assert_healthy(mm)
    s.free(p)
    s.destroy()
    assert_healthy(mm)


def test_krealloc_redzone_zeroing(mm):
    slab_errors = SlabErrors(mm)
    s = test_kmem_cache_create(mm, "TestSlub_krealloc", 64, kmm.SLAB_KMALLOC | kmm.SLAB_STORE_USER | kmm.SLAB_RED_ZONE)
    p = s.kmalloc(48)
    p[:] = b"\xff" * 48

    # Shrink.
    p = mm.krealloc(p, 40, kmm.GFP_KERNEL | kmm.__GFP_ZERO)
    assert mm.read(p.addr + 40, 24) == b"\xcc" * 24  # SLUB_RED_ACTIVE
    # Grow within the same 64-byte object.
    p = mm.krealloc(p, 56, kmm.GFP_KERNEL | kmm.__GFP_ZERO)
    assert mm.read(p.addr + 40, 16) == bytes(16)
    assert mm.read(p.addr + 56, 8) == b"\xcc" * 8
    assert s.validate() == 0
    assert int(slab_errors) == 0

    p[:] = b"\xff" * 56
    # Grow into a bigger (128-byte) kmalloc object.
    p = mm.krealloc(p, 112, kmm.GFP_KERNEL | kmm.__GFP_ZERO)
    assert bytes(p[:56]) == b"\xff" * 56
    assert bytes(p[56:112]) == bytes(56)
    mm.kfree(p)
    s.destroy()
    assert int(slab_errors) == 0
    assert_healthy(mm)


# ---- reports and repairs at allocation and free (F) ----------------------------------------


def test_cmdline_debugging_catches_a_redzone_write_at_kfree():
    m = kmm.Machine(memory="256M", cmdline="slub_debug=FZPU,kmalloc-64")
    c = m.kmem_cache("kmalloc-64")
    assert c.flags & (kmm.SLAB_CONSISTENCY_CHECKS | kmm.SLAB_RED_ZONE | kmm.SLAB_POISON | kmm.SLAB_STORE_USER)
    assert not m.kmem_cache("kmalloc-128").flags & kmm.SLAB_RED_ZONE
    b = m.kmalloc(64)
    m.write(b.addr + 64, b"\x00\x11")  # two bytes into the right red zone
    errors = SlabErrors(m)
    with pytest.raises(kmm.MemoryCorruptionError) as ei:
        m.kfree(b)
    text = str(ei.value)
    a, e = f"{b.addr + 64:016x}", f"{b.addr + 65:016x}"
    assert f"[Right Redzone overwritten] 0x{a}-0x{e}" in text
    assert "First byte 0x0 instead of 0xcc" in text
    assert "BUG kmalloc-64 (Not tainted): Object corrupt" in text
    # U: who allocated it, on which CPU, in which task.
    me = "test_cmdline_debugging_catches_a_redzone_write_at_kfree"
    assert re.search(rf"Allocated in {me}\+0x[0-9a-f]+ age=0 cpu=\d+ pid={threading.get_native_id()}\n", text)
    assert f"FIX kmalloc-64: Restoring Right Redzone 0x{a}-0x{e}=0xcc" in text
    assert f"FIX kmalloc-64: Object at 0x{b.addr:016x} not freed" in text
    # The same report, line by line, in the kernel log ("[    0.000000] " stamped).
    assert text in re.sub(r"(?m)^\[ *\d+\.\d{6}\] ", "", m.dmesg())
    assert int(errors) == 3  # detection, restore, "not freed"
    assert b.alive_  # refused: still allocated
    assert "B" in m.tainted
    assert_healthy(m)
    # Restored, so the free now goes through; the next report is tainted.
    m.kfree(b)
    c2 = m.kmalloc(64)
    m.write(c2.addr - 1, b"\x01")
    with pytest.raises(kmm.MemoryCorruptionError, match=r"BUG kmalloc-64 \(Tainted: G    B   W          \): Object corrupt"):
        m.kfree(c2)
    assert "[Left Redzone overwritten]" in m.dmesg()
    m.kfree(c2)
    assert_healthy(m)


def test_poison_overwritten_at_allocation_isolates_the_slab(mm):
    c = mm.kmem_cache_create("t_poison_alloc", 100, flags=kmm.SLAB_CONSISTENCY_CHECKS | kmm.SLAB_POISON | kmm.SLAB_STORE_USER)
    keep = c.alloc()
    x = c.alloc()
    c.free(x)
    mm.write(x.addr + 7, b"\x00")  # a write after free
    in_use = c.objects_in_use()
    slabs = mm.sysfs_slab("t_poison_alloc")["slabs"]
    y = c.alloc()  # takes x's slot first: the check fails, a new slab serves it
    assert y.addr != x.addr
    log = mm.dmesg()
    assert "[Poison overwritten]" in log and "First byte 0x0 instead of 0x6b" in log
    assert "FIX t_poison_alloc: Marking all objects used" in log
    # The old slab is full and off the lists for good (its free objects are lost).
    assert mm.sysfs_slab("t_poison_alloc")["slabs"] == slabs + 1
    # All of the old slab counts as used, and y.
    assert c.objects_in_use() == in_use + (c.objs_per_slab - 1) + 1
    assert_healthy(mm)
    # An object of the isolated slab cannot be freed any more.
    with pytest.raises(kmm.MemoryCorruptionError, match="Slab disabled since SLUB metadata consistency check failed") as ei:
        c.free(keep)
    assert f"Object at 0x{keep.addr:016x} not freed" in str(ei.value)
    assert keep.alive_
    c.free(y)
    assert_healthy(mm)


def test_double_free_with_consistency_checks_is_reported(mm):
    c = mm.kmem_cache_create("t_df", 64, flags=kmm.SLAB_CONSISTENCY_CHECKS | kmm.SLAB_RED_ZONE)
    x = c.alloc()
    c.free(x)
    errors = SlabErrors(mm)
    with pytest.raises(kmm.DoubleFreeError):
        c.free(x.addr)
    assert "BUG t_df (Not tainted): Object already free" in mm.dmesg()
    assert f"FIX t_df: Object at 0x{x.addr:016x} not freed" in mm.dmesg()
    assert int(errors) == 2
    assert_healthy(mm)


def test_without_consistency_checks_free_repaints_and_validate_finds_nothing(mm):
    # mm/slub.c free_debug_processing checks only with F; init_object then
    # paints the red zones over whatever was written.
    c = mm.kmem_cache_create("t_nof", 64, flags=kmm.SLAB_RED_ZONE)
    x = c.alloc()
    mm.write(x.addr + 64, b"\x01")
    c.free(x)
    assert mm.read(x.addr + 64, 8) == b"\xbb" * 8
    assert c.validate() == 0
    assert_healthy(mm)


def test_freepointer_corrupt_on_the_fast_path_is_refused_and_cut(mm):
    c = mm.kmem_cache_create("t_fp", 64, flags=kmm.SLAB_NO_MERGE)
    x, y = c.alloc(), c.alloc()
    c.free(y)
    c.free(x)  # the CPU freelist: x -> y -> ...
    in_use = c.objects_in_use()
    mm.write(x.addr + c.offset, (0x1234).to_bytes(8, "little"))  # x's free pointer
    with pytest.raises(kmm.MemoryCorruptionError, match="Freepointer corrupt") as ei:
        c.alloc()
    assert "BUG t_fp (Not tainted): Freepointer corrupt" in str(ei.value)
    assert f"Object 0x{x.addr:016x}" in str(ei.value)
    # check_object's repair: the pointer is zapped; x stays free, the rest is lost.
    assert mm.read(x.addr + c.offset, 8) == bytes(8)
    assert_healthy(mm)
    lost = c.objects_in_use() - in_use
    assert lost > 0
    z = c.alloc()
    assert z.addr == x.addr
    more = [c.alloc() for _ in range(3 * c.objs_per_slab)]  # the cache still works
    assert_healthy(mm)
    for o in more + [z]:
        c.free(o)
    assert c.objects_in_use() == lost
    assert_healthy(mm)


def test_padding_checks(mm):
    # 100 bytes, Z and P: slot 128, left red zone 8, the free pointer at 104,
    # then one debug word of padding (0x5a) at 112..119; 4096 % 128 = 0, so
    # a 232-byte object shows the slab padding instead.
    c = mm.kmem_cache_create("t_pad", 100, flags=kmm.SLAB_RED_ZONE | kmm.SLAB_POISON)
    x = c.alloc()
    assert mm.read(x.addr + 112, 8) == b"\x5a" * 8
    mm.write(x.addr + 115, b"\x00")
    assert c.validate() == 2
    assert "[Object padding overwritten]" in mm.dmesg()
    assert mm.read(x.addr + 112, 8) == b"\x5a" * 8
    c.free(x)

    d = mm.kmem_cache_create("t_slabpad", 200, flags=kmm.SLAB_POISON)
    y = d.alloc()
    length = 4096 << d.order
    remainder = length % d.size
    assert remainder > 0
    pad = slab_start(d, y.addr) + length - remainder
    assert mm.read(pad, remainder) == b"\x5a" * remainder
    mm.write(pad + 1, b"\x07")
    # slab_pad_check: only restore_bytes' FIX counts.
    assert d.validate() == 1
    assert f"Padding overwritten. 0x{pad + 1:016x}-0x{pad + 1:016x} @offset={length - remainder + 1}" in mm.dmesg()
    assert mm.read(pad, remainder) == b"\x5a" * remainder
    d.free(y)
    assert_healthy(mm)


def test_validate_needs_a_debug_cache(mm):
    c = mm.kmem_cache_create("t_plain", 64)
    with pytest.raises(ValueError, match="Invalid argument"):
        c.validate()
    with pytest.raises(ValueError, match="alloc_traces does not exist"):
        c.alloc_traces()


def test_trace_flag_logs_every_alloc_and_free(mm):
    c = mm.kmem_cache_create("t_trace", 32, flags=kmm.SLAB_TRACE)
    x = c.alloc()
    c.free(x)
    log = mm.dmesg()
    assert re.search(rf"TRACE t_trace alloc 0x{x.addr:016x} inuse=1 fp=0x[0-9a-f]{{16}}", log)
    assert re.search(rf"TRACE t_trace free 0x{x.addr:016x} inuse=1", log)
    assert "test_trace_flag_logs_every_alloc_and_free+0x" in log  # the stack


# ---- user tracking: alloc_traces / free_traces ---------------------------------------------


def alloc_here(c: kmm.KmemCache, n: int) -> list[kmm.Block]:
    out = []
    for _ in range(n):
        out.append(c.kmalloc(40))
    return out


def test_alloc_and_free_traces_group_by_call_site():
    m = kmm.Machine(memory="256M", cmdline="slub_debug=U,kmalloc-64")
    c = m.kmem_cache("kmalloc-64")
    a = alloc_here(c, 3)
    b = [m.kmalloc(64), m.kmalloc(64)]
    text = c.alloc_traces()
    lines = [ln for ln in text.split("\n") if ln and not ln.startswith("        ")]
    # Most frequent first; kmalloc(40) from a 64-byte object wastes 24 each.
    assert re.fullmatch(r"      3 alloc_here\+0x[0-9a-f]+ waste=72/24 age=0 pid=\d+ cpus=\d", lines[0]), lines
    assert re.fullmatch(
        r"      2 test_alloc_and_free_traces_group_by_call_site\+0x[0-9a-f]+ age=0 pid=\d+ cpus=\d", lines[1]
    ), lines
    assert "        alloc_here+0x" in text  # the stack, innermost first
    # free_traces: the allocated objects' last frees; none was ever freed.
    assert c.free_traces().startswith(f"      {len(a) + len(b)} <not-available> ")
    # Free one and reallocate its slot: its free track is where it was freed.
    m.kfree(b.pop())
    m.advance_time(2_000_000_000)  # 500 jiffies at HZ=250
    b.append(m.kmalloc(64))
    ft = c.free_traces()
    assert re.search(r"      1 test_alloc_and_free_traces_group_by_call_site\+0x[0-9a-f]+ age=500 ", ft), ft
    for x in a + b:
        m.kfree(x)
    assert c.alloc_traces() == "No data\n"
    assert_healthy(m)


def test_i386_reports_use_32_bit_pointers():
    m = kmm.Machine(arch="i386", memory="256M", cmdline="slub_debug=FZP,kmalloc-32")
    b = m.kmalloc(32)
    m.write(b.addr + 32, b"\x55")
    with pytest.raises(kmm.MemoryCorruptionError) as ei:
        m.kfree(b)
    assert f"[Right Redzone overwritten] 0x{b.addr + 32:08x}-0x{b.addr + 32:08x}" in str(ei.value)
    m.kfree(b)
    assert_healthy(m)


# ---- with init_on_alloc / init_on_free ----------------------------------------------------


def test_kzalloc_zeroes_only_the_request_of_a_red_zoned_kmalloc_object():
    # mm/slub.c slab_post_alloc_hook: a kmalloc cache with SLAB_STORE_USER or
    # SLAB_RED_ZONE zeroes orig_size bytes; the rest is the kmalloc red zone.
    m = kmm.Machine(memory="256M", cmdline="slub_debug=FZU,kmalloc-64")
    b = m.kzalloc(40)
    assert bytes(b) == bytes(40)
    assert m.read(b.addr + 40, 24) == b"\xcc" * 24  # SLUB_RED_ACTIVE
    m.kfree(b)
    assert m.slab_errors == 0
    assert_healthy(m)


def test_init_on_free_keeps_the_kmalloc_red_zone_and_orig_size():
    # slab_free_hook with init: memset(x, 0, get_orig_size(s, x)), then the
    # metadata after get_info_end, then set_orig_size again ("otherwise
    # kmalloc redzone overwritten would be reported").
    m = kmm.Machine(memory="256M", cmdline="init_on_free=1 slub_debug=FZU,kmalloc-64")
    c = m.kmem_cache("kmalloc-64")
    b = m.kmalloc(40)
    b[:] = b"\x5a" * 40
    m.kfree(b)
    assert m.slab_errors == 0
    assert "Redzone overwritten" not in m.dmesg()
    # Red zone and orig_size put the free pointer after the object
    # (calculate_sizes), so the whole request reads zero.
    assert c.offset >= 64
    assert m.read(b.addr, 40) == bytes(40)
    # init_object(SLUB_RED_INACTIVE) paints [object_size, inuse) only: the
    # kmalloc red zone inside the object keeps SLUB_RED_ACTIVE.
    assert m.read(b.addr + 40, 24) == b"\xcc" * 24
    assert m.read(b.addr + 64, 8) == b"\xbb" * 8
    assert c.validate() == 0
    assert_healthy(m)
