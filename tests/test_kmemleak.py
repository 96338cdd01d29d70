"""kmemleak (kmemleak=on): mm/kmemleak.c's scan and its debugfs report.

A leaked address is kept as a string here: an int equal to it is a value
Python holds, which kmemleak's scan (conservative, as the kernel's) counts as
a reference. Objects must be 5 s old (simulated time) to be reported, and a
new leak is normally reported by the second scan after that (the first one
records its checksum), as in the kernel.
"""

from __future__ import annotations

import array
import re
import threading
import zlib

import pytest

import kmm
from conftest import assert_healthy

SECOND = 1_000_000_000
# include/linux/jiffies.h: INITIAL_JIFFIES = (unsigned int)(-300 * HZ), HZ = 250.
INITIAL_JIFFIES = (1 << 32) - 300 * 250


@pytest.fixture
def lm() -> kmm.Machine:
    return kmm.Machine(memory="256M", cmdline="kmemleak=on")


def leak(m: kmm.Machine, size: int = 64, fill: bytes = b"") -> str:
    """kmalloc and drop the Block; the address comes back as text."""
    b = m.kmalloc(size)
    if fill:
        b[: len(fill)] = fill
    return f"0x{b.addr:016x}"


def reported(m: kmm.Machine) -> list[str]:
    return re.findall(r"^unreferenced object (0x[0-9a-f]+) \(size \d+\):$", m.proc.kmemleak(), re.M)


def age_and_scan(m: kmm.Machine, seconds: float = 6) -> int:
    m.advance_time(m.time_ns + int(seconds * SECOND))
    return m.kmemleak_scan() + m.kmemleak_scan()


def test_a_leaked_object_is_found(lm):
    a = leak(lm, fill=b"leak")
    assert age_and_scan(lm) == 1
    assert reported(lm) == [a]
    assert "kmemleak: 1 new suspected memory leaks (see /sys/kernel/debug/kmemleak)" in lm.dmesg()
    # Reported once; still listed while unreferenced.
    assert lm.kmemleak_scan() == 0
    assert reported(lm) == [a]
    assert_healthy(lm)


def test_a_referenced_object_is_not(lm):
    kept = lm.kmalloc(64)
    also = lm.kzalloc(128)
    assert age_and_scan(lm) == 0
    assert reported(lm) == []
    lm.kfree(kept)
    lm.kfree(also)
    assert lm.kmemleak_scan() == 0
    assert_healthy(lm)


def test_references_through_objects(lm):
    root = lm.kmalloc(64)
    # root -> middle -> tail: only root is held by Python.
    middle = lm.kmalloc(128)
    tail = lm.kmalloc(32)
    middle[8:16] = tail.addr.to_bytes(8, "little")
    # An alias (a pointer into the middle of an object) counts.
    root[0:8] = (middle.addr + 40).to_bytes(8, "little")
    m_text, t_text = f"0x{middle.addr:016x}", f"0x{tail.addr:016x}"
    del middle, tail
    assert age_and_scan(lm) == 0
    # Cut the chain: both are unreferenced now (tail only by a leaked object).
    root[0:8] = bytes(8)
    assert age_and_scan(lm) == 2
    assert sorted(reported(lm)) == sorted([m_text, t_text])
    assert_healthy(lm)


def test_min_age(lm):
    a = leak(lm, fill=b"young")
    lm.advance_time(lm.time_ns + 4 * SECOND)
    assert lm.kmemleak_scan() + lm.kmemleak_scan() == 0  # younger than MSECS_MIN_AGE
    # jiffies + msecs_to_jiffies(5000) <= jiffies_last_scan: 5 s exactly.
    lm.advance_time(5 * SECOND)
    assert lm.kmemleak_scan() == 1
    assert reported(lm) == [a]


def test_checksum_change_delays_the_report(lm):
    # mm/kmemleak.c kmemleak_scan: only a white object's checksum is updated
    # (update_checksum), and a white object whose checksum changed is
    # colored gray for that scan, so not reported by it.
    b = lm.kmalloc(64)
    b[:4] = b"abcd"
    text = f"0x{b.addr:016x}"
    holder = lm.kmalloc(16)
    holder[0:8] = b.addr.to_bytes(8, "little")
    del b
    lm.advance_time(6 * SECOND)
    assert lm.kmemleak_scan() == 0  # referenced: black, checksum not taken
    holder[0:8] = bytes(8)
    assert lm.kmemleak_scan() == 0  # white, but its checksum changed (0 -> crc)
    assert lm.kmemleak_scan() == 1  # white and unchanged: a leak
    assert reported(lm) == [text]


def test_writing_to_a_leak_between_scans_delays_its_report(lm):
    a = leak(lm, fill=b"first")
    lm.advance_time(6 * SECOND)
    assert lm.kmemleak_scan() == 0  # the first checksum
    lm.write(int(a, 16), b"second")  # written through a raw address
    assert lm.kmemleak_scan() == 0  # changed again: gray for this scan
    assert lm.kmemleak_scan() == 1
    assert reported(lm) == [a]


def test_all_zero_object_is_reported_by_the_first_old_scan(lm):
    # crc32_le(0, zeroes) is 0, the checksum a new object starts with: unchanged.
    # (kmalloc's object would still hold the stale free pointer: kzalloc.)
    b = lm.kzalloc(64)
    a = f"0x{b.addr:016x}"
    del b
    lm.advance_time(6 * SECOND)
    assert lm.kmemleak_scan() == 1
    assert reported(lm) == [a]


def test_output_format(lm):
    lm.advance_time(3 * SECOND)
    t_alloc = lm.time_ns
    data = bytes(range(0x41, 0x41 + 40))
    a = leak(lm, size=50, fill=data)
    assert age_and_scan(lm) == 1
    text = lm.proc.kmemleak()
    lines = text.splitlines()
    # kmalloc(50) comes from kmalloc-64: kmemleak tracks s->object_size.
    assert lines[0] == f"unreferenced object {a} (size 64):"
    comm = open("/proc/thread-self/comm").read().strip()[:15]
    jiffies = INITIAL_JIFFIES + t_alloc // (SECOND // 250)
    assert lines[1] == f'  comm "{comm}", pid {threading.get_native_id()}, jiffies {jiffies}'
    assert lines[2] == "  hex dump (first 32 bytes):"
    head = data[:32]

    def row(b: bytes) -> str:
        return "    " + " ".join(f"{x:02x}" for x in b).ljust(49) + "".join(chr(x) if 32 <= x < 127 else "." for x in b)

    assert lines[3] == row(head[:16])
    assert lines[4] == row(head[16:32])
    # crc32(0, object, 64) without inversion, from zlib's standard CRC-32.
    full = data + bytes(64 - len(data))
    crc = zlib.crc32(full, 0xFFFFFFFF) ^ 0xFFFFFFFF
    assert lines[5] == f"  backtrace (crc {crc:x}):"
    assert re.fullmatch(r"    leak\+0x[0-9a-f]+", lines[6]), lines
    assert re.fullmatch(r"    test_output_format\+0x[0-9a-f]+", lines[7]), lines


def test_percpu_and_vmalloc_memory_are_roots(lm):
    p = lm.alloc_percpu(16)
    v = lm.vmalloc(8192)
    x, y = lm.kmalloc(64), lm.kmalloc(64)
    lm.per_cpu_ptr(p, 1)[0:8] = x.addr.to_bytes(8, "little")
    v[4096:4104] = y.addr.to_bytes(8, "little")
    del x, y
    assert age_and_scan(lm) == 0
    lm.free_percpu(p)
    lm.vfree(v)
    assert age_and_scan(lm) == 2


def test_an_alloc_bulk_array_is_a_root(lm):
    c = lm.kmem_cache_create("t_bulk", 96)
    arr = c.alloc_bulk(kmm.GFP_KERNEL, 5)
    assert isinstance(arr, array.array)
    assert age_and_scan(lm) == 0
    texts = sorted(f"0x{a:016x}" for a in arr)
    del arr
    assert age_and_scan(lm) == 5
    assert sorted(reported(lm)) == texts


def test_clear_and_not_leak(lm):
    leak(lm)
    assert age_and_scan(lm) == 1
    lm.kmemleak_clear()
    assert reported(lm) == []
    assert age_and_scan(lm) == 0
    b = lm.kmalloc(64)
    lm.kmemleak_not_leak(b)
    del b
    assert age_and_scan(lm) == 0
    with pytest.raises(ValueError, match="unknown object"):
        lm.kmemleak_not_leak(0xFFFF888000001000)


def test_freed_objects_are_forgotten_and_slab_nolktrace_untracked(lm):
    c = lm.kmem_cache_create("t_nolk", 64, flags=kmm.SLAB_NOLEAKTRACE)
    c.alloc()  # dropped, but the cache is not tracked
    x = lm.kmalloc(64)
    lm.kfree(x)
    big = lm.kmalloc(3 << 20)  # a large kmalloc: tracked with its requested size
    text = f"0x{big.addr:016x}"
    del big
    assert age_and_scan(lm) == 1
    assert reported(lm) == [text]
    assert f"unreferenced object {text} (size {3 << 20}):" in lm.proc.kmemleak()
    assert_healthy(lm)


def test_kmemleak_is_off_by_default():
    m = kmm.Machine(memory="64M")
    with pytest.raises(ValueError, match="kmemleak=on"):
        m.kmemleak_scan()
    with pytest.raises(ValueError, match="kmemleak=on"):
        m.proc.kmemleak()


def test_a_cache_ctor_does_not_keep_its_machine_alive():
    # The ctor's closure lives in the machine's cache; holding the machine
    # from it made a cycle, so a dropped machine (and whatever its ctor
    # held: ints that later scans took for pointers) was never freed.
    freed = []

    class Marker:
        def __del__(self) -> None:
            freed.append(True)

    def make() -> None:
        m = kmm.Machine(memory="64M")
        mark = Marker()
        c = m.kmem_cache_create("t_ctor_life", 48, ctor=lambda b: mark)
        c.free(c.alloc())

    make()
    assert freed == [True]
