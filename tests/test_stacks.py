"""Kernel stacks: THREAD_SIZE per architecture, STACK_END_MAGIC at the lowest
word, VMAP_STACK stacks whose overflow hits a guard page, page-allocator
stacks whose overflow silently corrupts the memory below until the
scheduler's end-magic check catches it, per-CPU IRQ stacks, and the
/proc/vmallocinfo and meminfo lines they produce.

Expected values come from the kernel (6.18) and the real machine:
- arch/x86/include/asm/page_64_types.h: THREAD_SIZE_ORDER 2 (16 KiB, no
  KASAN), IRQ_STACK_ORDER 2; page_32_types.h: THREAD_SIZE_ORDER 1 (8 KiB).
- include/uapi/linux/magic.h: STACK_END_MAGIC 0x57AC6E9D, written by
  set_task_stack_end_magic at end_of_stack() (the lowest word: stacks grow down).
- kernel/fork.c alloc_thread_stack_node: with VMAP_STACK,
  __vmalloc_node_range(THREAD_SIZE, THREAD_ALIGN = THREAD_SIZE, ...,
  THREADINFO_GFP (zeroed)); else alloc_pages(THREADINFO_GFP, THREAD_SIZE_ORDER).
  account_kernel_stack adds THREAD_SIZE / 1024 to NR_KERNEL_STACK_KB
  (meminfo KernelStack) for task stacks.
- arch/x86/Kconfig: HAVE_ARCH_VMAP_STACK only on X86_64.
- arch/x86/kernel/irq_64.c map_irq_stack: vmap() of the IRQ stack's pages
  (vmallocinfo "vmap", no pages=); irq_32.c: THREAD_SIZE from the page allocator.
- arch/x86/kernel/traps.c handle_stack_overflow: "stack guard page was hit";
  kernel/sched/core.c schedule_debug: "corrupted stack end detected inside scheduler".
- The real /proc/vmallocinfo lines below (tests/data/linux/vmallocinfo.head.txt).
"""

from __future__ import annotations

import re

import pytest

import kmm
from conftest import LINUX, assert_healthy

PAGE = 4096
STACK_END_MAGIC = 0x57AC6E9D
THREAD_SIZE = {"x86_64": 16384, "i386": 8192, "i386-pae": 8192}

# From the real machine (tests/data/linux/vmallocinfo.head.txt, lines 1 and 4).
REAL_IRQ_STACK_LINE = "0x000000004f6eb052-0x00000000bab13501   20480 irq_init_percpu_irqstack+0xca/0x100 vmap"
REAL_TASK_STACK_LINE = "0x000000005e732ad9-0x000000007c744740   20480 kernel_clone+0x94/0x3e0 pages=4 vmalloc N0=4"


def machine(arch: str) -> kmm.Machine:
    return kmm.Machine(arch=arch, memory="1G")


def line_for(m: kmm.Machine, addr: int) -> str:
    return next(
        line for line in m.proc.vmallocinfo().splitlines() if line and int(line.split("-")[0], 16) == addr
    )


def after_addresses(line: str) -> str:
    """A vmallocinfo line without its (hashed, %pK) address range."""
    return line.split(" ", 1)[1]


def test_the_real_lines_are_in_the_captured_file():
    real = (LINUX / "vmallocinfo.head.txt").read_text().splitlines()
    assert real[0] == REAL_IRQ_STACK_LINE
    assert REAL_TASK_STACK_LINE in real
    assert sum("kernel_clone+0x94/0x3e0 pages=4 vmalloc N0=4" in line for line in real) >= 10


# ---- THREAD_SIZE and the end magic ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["x86_64", "i386", "i386-pae"])
def test_thread_size_and_end_magic(arch):
    m = machine(arch)
    assert kmm.STACK_END_MAGIC == STACK_END_MAGIC
    assert m.thread_size == THREAD_SIZE[arch]
    kb0 = m.proc.meminfo_dict()["KernelStack"]
    s = m.alloc_thread_stack()
    assert s.size == THREAD_SIZE[arch] and s.top == s.base + s.size
    assert s.vmap == (arch == "x86_64")  # VMAP_STACK is the x86_64 default
    assert s.irq_cpu is None
    raw = m.read(s.base, s.size)
    assert int.from_bytes(raw[:4], "little") == STACK_END_MAGIC
    assert raw[4:] == bytes(s.size - 4)  # THREADINFO_GFP zeroes the rest
    assert not s.end_corrupted()
    s.check()
    assert m.proc.meminfo_dict()["KernelStack"] - kb0 == THREAD_SIZE[arch] // 1024
    m.free_thread_stack(s)
    assert m.proc.meminfo_dict()["KernelStack"] == kb0
    assert_healthy(m)


@pytest.mark.parametrize("arch", ["x86_64", "i386", "i386-pae"])
def test_page_allocator_stack_is_one_aligned_block_in_the_direct_map(arch):
    m = machine(arch)
    s = m.alloc_thread_stack(vmap=False)
    order = (THREAD_SIZE[arch] // PAGE).bit_length() - 1
    assert not s.vmap and not m.is_vmalloc_addr(s.base)
    pages = s.pages
    assert len(pages) == 1 << order
    assert pages[0].order == order and pages[0].pfn % (1 << order) == 0
    assert s.base == pages[0].address
    assert [p.pfn for p in pages] == list(range(pages[0].pfn, pages[0].pfn + (1 << order)))
    m.free_thread_stack(s)
    assert pages[0].refcount == 0
    assert_healthy(m)


@pytest.mark.parametrize("arch", ["i386", "i386-pae"])
def test_vmap_stack_does_not_exist_on_i386(arch):
    m = machine(arch)
    before = (m.proc.meminfo_dict()["KernelStack"], m.proc.vmallocinfo(), m.nr_free_pages())
    with pytest.raises(ValueError, match="VMAP_STACK"):
        m.alloc_thread_stack(vmap=True)
    assert (m.proc.meminfo_dict()["KernelStack"], m.proc.vmallocinfo(), m.nr_free_pages()) == before


# ---- VMAP_STACK: a guard page below -------------------------------------------------------------


def test_vmap_stack_is_aligned_and_shown_like_the_real_ones(m):
    m.vmalloc(PAGE)  # something before it, so the alignment matters
    s = m.alloc_thread_stack(vmap=True)
    assert m.is_vmalloc_addr(s.base)
    assert s.base % 16384 == 0  # THREAD_ALIGN
    line = line_for(m, s.base)
    start, end = (int(x, 16) for x in line.split()[0].split("-"))
    assert (start, end) == (s.base, s.base + 20480)  # 4 pages + the guard page
    assert after_addresses(line) == after_addresses(REAL_TASK_STACK_LINE)
    assert [m.vmalloc_to_pfn(s.base + i * PAGE) for i in range(4)] == [p.pfn for p in s.pages]
    assert all(p.order == 0 for p in s.pages)
    assert m.vmalloc_to_page(s.top) is None  # the guard page above
    assert m.vmalloc_to_page(s.base - PAGE) is None  # and nothing below
    assert_healthy(m)


def test_vmap_stack_overflow_hits_the_guard_page_and_writes_nothing(m):
    below = m.vmalloc(2 * PAGE)
    below.write(b"\x5a" * (2 * PAGE))
    s = m.alloc_thread_stack(vmap=True)
    s.use(s.size - 4)  # all but the end magic: fine
    s.check()
    used = m.read(s.base, s.size)
    assert int.from_bytes(used[:4], "little") == STACK_END_MAGIC
    for depth in (s.size + 1, s.size + 8, s.size + PAGE):
        with pytest.raises(kmm.PageFaultError) as ei:
            s.use(depth)
        text = str(ei.value)
        assert "guard page" in text and "kernel stack overflow" in text
        # A fault is taken before any byte is stored.
        assert m.read(s.base, s.size) == used
    assert not s.end_corrupted()
    assert bytes(below) == b"\x5a" * (2 * PAGE)
    s.check()
    m.free_thread_stack(s)
    assert_healthy(m)


def test_using_the_whole_stack_reaches_the_end_magic(m):
    s = m.alloc_thread_stack(vmap=True)
    s.use(s.size)  # the last word used is the end magic's
    assert s.end_corrupted()
    with pytest.raises(kmm.MemoryCorruptionError, match="corrupted stack end detected inside scheduler"):
        s.check()


# ---- without VMAP_STACK: silent corruption ---------------------------------------------------


@pytest.mark.parametrize("arch", ["x86_64", "i386"])
def test_non_vmap_overflow_silently_corrupts_the_memory_below(arch):
    m = machine(arch)
    s = m.alloc_thread_stack(vmap=False)
    m.write(s.base - 64, bytes(64))
    s.use(s.size - 4)
    s.check()
    s.use(s.size + 64)  # no fault: the page below is mapped in the direct map
    assert m.read(s.base - 64, 64) != bytes(64)
    assert s.end_corrupted()
    with pytest.raises(kmm.MemoryCorruptionError, match="corrupted stack end detected inside scheduler") as ei:
        s.check()
    assert f"{s.base:#x}" in str(ei.value)


# ---- IRQ stacks ------------------------------------------------------------------------------------


def test_x86_64_irq_stacks_are_vmapped_per_cpu(m):
    kb0 = m.proc.meminfo_dict()["KernelStack"]
    irq0 = m.irq_stack(0)
    irq1 = m.irq_stack(1)
    assert (irq0.irq_cpu, irq1.irq_cpu) == (0, 1)
    assert irq0.base != irq1.base
    assert m.irq_stack(0).base == irq0.base  # made once per CPU
    for s in (irq0, irq1):
        assert s.vmap and s.size == 16384 and m.is_vmalloc_addr(s.base)
        assert int.from_bytes(m.read(s.base, 4), "little") == STACK_END_MAGIC
        assert after_addresses(line_for(m, s.base)) == after_addresses(REAL_IRQ_STACK_LINE)
    # vmap()ed pages: not vmalloc's own, not task stacks.
    assert m.vmalloc_nr_pages() == 0
    assert m.proc.meminfo_dict()["KernelStack"] == kb0
    with pytest.raises(kmm.PageFaultError, match="guard page"):
        irq1.use(irq1.size + 16)
    before = (m.proc.vmallocinfo(), m.nr_free_pages())
    with pytest.raises(kmm.InvalidFreeError):
        m.free_thread_stack(irq0)
    with pytest.raises(ValueError):
        m.irq_stack(2)
    assert (m.proc.vmallocinfo(), m.nr_free_pages()) == before
    assert_healthy(m)


def test_i386_irq_stack_comes_from_the_page_allocator():
    m = machine("i386")
    s = m.irq_stack(1)
    assert not s.vmap and s.size == 8192 and s.irq_cpu == 1
    assert s.base == s.pages[0].address and s.pages[0].order == 1
    assert int.from_bytes(m.read(s.base, 4), "little") == STACK_END_MAGIC
    assert m.proc.vmallocinfo() == ""


# ---- freeing ------------------------------------------------------------------------------------


def test_free_vmap_stack_twice_is_a_double_free(m):
    s = m.alloc_thread_stack(vmap=True)
    used0 = m.vmalloc_nr_pages()
    m.free_thread_stack(s)
    assert m.vmalloc_nr_pages() == used0 - 4
    # The range waits for the lazy purge, like any vfree'd area.
    assert re.fullmatch(r"0x[0-9a-f]{16}-0x[0-9a-f]{16}   20480 unpurged vm_area", line_for(m, s.base))
    before = (m.proc.vmallocinfo(), m.proc.meminfo_dict()["KernelStack"], m.nr_free_pages())
    with pytest.raises(kmm.DoubleFreeError):
        m.free_thread_stack(s)
    assert (m.proc.vmallocinfo(), m.proc.meminfo_dict()["KernelStack"], m.nr_free_pages()) == before
    assert_healthy(m)


def test_many_stacks_account_and_give_everything_back(m):
    kb0 = m.proc.meminfo_dict()["KernelStack"]
    stacks = [m.alloc_thread_stack(vmap=i % 2 == 0) for i in range(20)]
    assert m.proc.meminfo_dict()["KernelStack"] - kb0 == 20 * 16
    assert len({s.base for s in stacks}) == 20
    for s in stacks:
        s.use(1000)
        s.check()
    for s in stacks:
        m.free_thread_stack(s)
    m.vm_unmap_aliases()
    assert m.proc.meminfo_dict()["KernelStack"] == kb0
    assert m.vmalloc_nr_pages() == 0 and m.proc.vmallocinfo() == ""
    assert_healthy(m)


@pytest.mark.parametrize("vmap", [True, False])
def test_alloc_thread_stack_may_sleep(m, vmap):
    # THREADINFO_GFP is GFP_KERNEL-based: vmalloc or alloc_pages may sleep.
    m.drain_all_pages()
    before = (m.proc.buddyinfo(), m.proc.vmallocinfo(), m.proc.meminfo_dict()["KernelStack"], m.nr_free_pages())
    with m.atomic():
        with pytest.raises(kmm.SleepInAtomicError, match="sleeping function called from invalid context"):
            m.alloc_thread_stack(vmap=vmap)
    m.drain_all_pages()
    assert (m.proc.buddyinfo(), m.proc.vmallocinfo(), m.proc.meminfo_dict()["KernelStack"], m.nr_free_pages()) == before
