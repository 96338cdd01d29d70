"""The per-CPU allocator (mm/percpu.c) from Python."""

from __future__ import annotations

import re

import pytest

import kmm


def test_each_cpu_has_its_own_zeroed_copy():
    m = kmm.Machine(cpus=4)
    p = m.alloc_percpu(64, 8)
    copies = [m.per_cpu_ptr(p, cpu) for cpu in range(4)]
    assert len({c.addr for c in copies}) == 4
    assert all(bytes(c) == bytes(64) for c in copies)  # zeroed in every unit
    for cpu, c in enumerate(copies):
        c[0:8] = cpu.to_bytes(8, "little")
    assert [int.from_bytes(bytes(m.per_cpu_ptr(p, cpu))[:8], "little") for cpu in range(4)] == [0, 1, 2, 3]
    with m.on_cpu(2):
        assert m.this_cpu_ptr(p).addr == copies[2].addr
    m.free_percpu(p)
    with pytest.raises(kmm.UseAfterFreeError):
        bytes(copies[0])
    assert m.check() == []


def test_limits_and_errors_in_the_kernels_words():
    m = kmm.Machine()
    for size, align in [(0, 8), ((32 << 10) + 4, 8), (8, 12), (8, 8192)]:
        with pytest.raises(ValueError, match=re.escape(f"illegal size (")):
            m.alloc_percpu(size, align)
    p = m.alloc_percpu(16)
    with pytest.raises(kmm.InvalidFreeError):
        m.free_percpu(p + 4)
    m.free_percpu(p)
    with pytest.raises(kmm.DoubleFreeError):
        m.free_percpu(p)
    m.free_percpu(0)  # NULL is a no-op
    with pytest.raises(ValueError):
        m.per_cpu_ptr(m.alloc_percpu(8), 7)
    with pytest.raises(kmm.InvalidFreeError):
        m.kfree(m.per_cpu_ptr(m.alloc_percpu(8), 0))
    assert m.check() == []


def test_free_with_a_live_memoryview_is_refused():
    m = kmm.Machine()
    p = m.alloc_percpu(32)
    view = memoryview(m.per_cpu_ptr(p, 1))
    with pytest.raises(BufferError):
        m.free_percpu(p)
    view[0] = 7
    assert bytes(m.per_cpu_ptr(p, 1))[0] == 7
    view.release()
    m.free_percpu(p)


def test_first_fit_alignment_and_reuse():
    m = kmm.Machine()
    a = m.alloc_percpu(4, 4)
    b = m.alloc_percpu(4, 64)
    assert b % 64 == 0 and b > a
    m.free_percpu(a)
    c = m.alloc_percpu(4, 4)
    assert c == a  # first fit refills the hole
    m.free_percpu(b)
    m.free_percpu(c)


def test_new_chunks_when_the_first_is_full_and_meminfo_percpu():
    m = kmm.Machine(cpus=2)
    before = m.proc.meminfo_dict()["Percpu"]
    ptrs = [m.alloc_percpu(16 << 10, 8) for _ in range(3)]  # more than one 36 KiB unit holds
    after = m.proc.meminfo_dict()["Percpu"]
    # Percpu = populated pages x units: two chunks of one 36 KiB-rounded unit per CPU.
    unit_pages = 16  # 36 KiB rounded up to a power-of-two page block (order 4)
    assert after - before == 2 * 2 * unit_pages * 4 - before
    # Atomic requests never create chunks: with the chunks full they fail.
    with pytest.raises(kmm.OutOfMemoryError, match="percpu: allocation failed"):
        m.alloc_percpu(16 << 10, 8, kmm.GFP_ATOMIC | kmm.__GFP_NOWARN)
    for p in ptrs:
        m.free_percpu(p)
    assert m.check() == []


def test_named_variables_and_get_cpu_var():
    m = kmm.Machine()
    m.define_per_cpu("runqueue_len", 8)
    with pytest.raises(ValueError):
        m.define_per_cpu("runqueue_len", 8)
    with m.on_cpu(1):
        with m.get_cpu_var("runqueue_len") as v:
            assert m.in_atomic() and m.preempt_count() == 1
            v[0:8] = (5).to_bytes(8, "little")
        assert not m.in_atomic()
    assert bytes(m.per_cpu("runqueue_len", 1))[:8] == (5).to_bytes(8, "little")
    assert bytes(m.per_cpu("runqueue_len", 0)) == bytes(8)
    with pytest.raises(ValueError):
        m.per_cpu("nonesuch", 0)


def test_percpu_tracepoints_have_the_kernels_fields():
    m = kmm.Machine(cpus=2)
    with m.trace.record("percpu:*") as rec:
        p = m.alloc_percpu(16, 8)
        m.free_percpu(p)
    a, f = rec.events
    assert a.name == "percpu:percpu_alloc_percpu" and f.name == "percpu:percpu_free_percpu"
    # bytes_alloc = pcpu_obj_full_size: size x possible CPUs + one obj_cgroup
    # pointer per 4-byte unit (16 x 2 + 16 / 4 x 8 = 64, as in the real trace).
    assert a["bytes_alloc"] == 64
    assert re.fullmatch(
        r"call_site=\S+ reserved=0 is_atomic=0 size=16 align=8 base_addr=0x[0-9a-f]+ off=\d+ "
        r"ptr=0x[0-9a-f]+ bytes_alloc=64 gfp_flags=GFP_KERNEL",
        a.text,
    )
    assert f.text == f"base_addr={hex(a['base_addr'])} off={a['off']} ptr={hex(p)}"
