"""Regression tests for bugs found while writing test_cpu.py / test_threads.py
(all fixed): each test states what the kernel does.

The hangs are real deadlocks (a thread spinning forever, some of them while
holding the GIL, so no in-process timeout can interrupt them): those scenarios
run in a child interpreter that is killed after a generous limit, and the test
asserts the child finished and printed its result.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import kmm

# Far above what any of these scripts needs (they finish in well under a
# second when the model is right); only a deadlock reaches it.
LIMIT = 10


def run_child(code: str) -> str:
    """Run `code` in a fresh interpreter; return its stdout, or fail on a hang."""
    try:
        r = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=LIMIT,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"deadlock: the script never finished (stdout so far: {out!r})")
    assert r.returncode == 0, r.stderr
    return r.stdout


# ---- 1. get_cpu()/preempt_disable()/atomic()/irq() inside on_cpu(k) deadlocks -----------------
#
# kernel: get_cpu() is preempt_disable(); smp_processor_id() on a task pinned to
# CPU k. It never waits. kmm (was): Cpus::preempt_add tried to claim the CPU with a
# CAS from 0 to this thread's token, but the thread already owns the CPU
# through its on_cpu binding, so the CAS failed forever (cpu.rs, preempt_add).


@pytest.mark.parametrize(
    "enter,leave",
    [
        ("c = m.get_cpu()", "m.put_cpu()"),
        ("m.preempt_disable(); c = m.smp_processor_id()", "m.preempt_enable()"),
        ("ctx = m.atomic(); c = ctx.__enter__()", "ctx.__exit__(None, None, None)"),
        ("ctx = m.irq(); c = ctx.__enter__()", "ctx.__exit__(None, None, None)"),
    ],
)
def test_atomic_section_inside_on_cpu(enter, leave):
    out = run_child(
        f"""
        import kmm
        m = kmm.Machine()
        with m.on_cpu(1):
            {enter}
            print("cpu", c, "count", hex(m.preempt_count()))
            p = m.alloc_pages(kmm.GFP_ATOMIC)
            m.free_pages(p)
            {leave}
            print("after", m.preempt_count())
        print("done")
        """
    )
    lines = out.split("\n")
    assert lines[0] in ("cpu 1 count 0x1", "cpu 1 count 0x10000"), out
    assert lines[1:3] == ["after 0", "done"], out


def test_nested_get_cpu_inside_on_cpu():
    out = run_child(
        """
        import kmm
        m = kmm.Machine()
        with m.on_cpu(0):
            a = m.get_cpu(); b = m.get_cpu()
            print(a, b, m.preempt_count())
            m.put_cpu(); m.put_cpu()
        print("done", m.preempt_count())
        """
    )
    assert out.split("\n")[:2] == ["0 0 2", "done 0"], out


# ---- 2. on_cpu(k) while another thread holds k hangs the whole process -----------------------
#
# kernel: two tasks pinned to one CPU take turns on it. kmm (was): binding was
# exclusive, so the second on_cpu(k) waited for the first to end; but
# Cpus::bind spun without the wait hook, i.e. still holding the GIL, so the
# first thread (a Python thread too) could never run to its unbind: deadlock. The
# core's own comment on wait hooks: "the Python binding releases the GIL while
# it waits, so the thread holding the CPU can run".


def test_second_thread_binding_a_busy_cpu_does_not_hang_the_process():
    out = run_child(
        """
        import threading, kmm
        m = kmm.Machine()
        a_bound = threading.Event(); b_starting = threading.Event(); release = threading.Event()
        log = []
        def a():
            with m.on_cpu(0):
                a_bound.set()
                release.wait()
                log.append("A done")
        def b():
            a_bound.wait()
            b_starting.set()
            with m.on_cpu(0):
                log.append("B on %d" % m.smp_processor_id())
        ta = threading.Thread(target=a); tb = threading.Thread(target=b)
        ta.start(); tb.start()
        b_starting.wait()
        release.set()          # the main thread needs the GIL to get here
        ta.join(); tb.join()
        print(sorted(log))
        """
    )
    # Either order is right: B after A's binding ends (kmm's exclusive binding)
    # or both on CPU 0 taking turns (the kernel's scheduler).
    assert out.strip() == "['A done', 'B on 0']", out


def test_thread_bound_to_a_cpu_held_by_get_cpu_waits_for_put_cpu():
    """The brief's scenario: A is bound to CPU 0 and disables preemption there;
    B, also bound to CPU 0, allocates. B must complete, after A's put_cpu."""
    out = run_child(
        """
        import threading, kmm
        m = kmm.Machine()
        held = threading.Event(); b_trying = threading.Event()
        log = []
        def a():
            with m.on_cpu(0):
                assert m.get_cpu() == 0
                held.set()
                b_trying.wait()
                log.append("A put_cpu")
                m.put_cpu()
        def b():
            held.wait()
            b_trying.set()
            with m.on_cpu(0):
                p = m.alloc_pages(kmm.GFP_KERNEL)
                log.append("B allocated on %d" % m.smp_processor_id())
                m.free_pages(p)
        ta = threading.Thread(target=a); tb = threading.Thread(target=b)
        ta.start(); tb.start(); ta.join(); tb.join()
        print(log, m.check())
        """
    )
    assert out.strip() == "['A put_cpu', 'B allocated on 0'] []", out


# ---- 3. on_cpu(other) inside a preempt-disabled section migrates the thread -----------------
#
# kernel: while preemption is disabled the task cannot migrate, so
# smp_processor_id() is stable (that is what get_cpu() is for); changing the
# affinity from atomic context is a "scheduling while atomic" bug. kmm (was): binding
# another CPU inside atomic() succeeded and smp_processor_id() changed while
# the section still held the first CPU, so this-CPU data (pcp lists, slab cpu
# slabs) of a CPU the section did not pin is used.


def test_no_migration_while_preemption_is_disabled():
    m = kmm.Machine()
    with m.atomic() as cpu:
        try:
            with m.on_cpu(1 - cpu):
                assert m.smp_processor_id() == cpu
        except (ValueError, kmm.KmmError):
            pass  # refusing the migration is right too
        assert m.smp_processor_id() == cpu
    assert m.preempt_count() == 0


# ---- 4. mm_page_pcpu_drain is reported on the draining CPU ----------------------------------
#
# kernel (6.2+): __drain_all_pages drains every CPU's lists from the calling
# CPU (drain_pages(cpu) in a loop, no IPI/work item), so free_pcppages_bulk and
# its trace_mm_page_pcpu_drain run on the caller: perf shows the caller's CPU.
# kmm (was): the events carried the CPU whose list was drained.


def test_drain_all_pages_events_are_on_the_calling_cpu():
    m = kmm.Machine()
    with m.on_cpu(1):
        p = m.alloc_pages(kmm.GFP_KERNEL)
        m.free_pages(p)
    with m.on_cpu(0):
        with m.trace.record("kmem:mm_page_pcpu_drain") as rec:
            m.drain_all_pages()
    assert len(rec) > 0
    assert {e.cpu for e in rec.events} == {0}


# ---- 5. __get_free_pages strips __GFP_HIGHMEM -----------------------------------------------
#
# kernel 6.18 mm/page_alloc.c get_free_pages_noprof():
#     page = alloc_pages_noprof(gfp_mask & ~__GFP_HIGHMEM, order);
# (the old VM_BUG_ON on __GFP_HIGHMEM is long gone). kmm raised BadGfpError
# (and tests/test_page_alloc.py asserted that; changed with the fix).


@pytest.mark.parametrize("arch", ["x86_64", "i386"])
def test_get_free_pages_masks_gfp_highmem(arch):
    m = kmm.Machine(arch=arch, memory="2G")
    addr = m.get_free_pages(kmm.GFP_HIGHUSER, 0)
    page = m.virt_to_page(addr)
    assert not page.highmem
    assert m.page_address(page) == addr
    m.free_pages(addr, 0)
    z = m.get_zeroed_page(kmm.GFP_HIGHUSER)
    assert m.read(z, 4096) == bytes(4096)
    m.free_pages(z, 0)
    assert m.check() == []
