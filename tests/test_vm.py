"""Virtual memory on x86_64: kernel page tables and translate, the per-CPU TLB
model, vmalloc/vzalloc/vfree, vmap/vunmap, kvmalloc/kvfree, the lazy purge,
/proc/vmallocinfo and the meminfo lines that follow vmalloc, and every wrong
usage the kernel would WARN or BUG on.

Expected values come from the kernel (6.18) or from an independent
computation, never from the code under test:
- mm/vmalloc.c: `__vmalloc_node_range_noprof` (size = PAGE_ALIGN(size), a
  guard page unless VM_NO_GUARD, so vmalloc(5000) is 12288 bytes of address
  space), `lazy_max_pages()` = fls(num_online_cpus()) * (32 MiB / PAGE_SIZE),
  `free_vmap_area_noflush` (vmap_lazy_nr += va_size >> PAGE_SHIFT, purge when
  it exceeds lazy_max_pages), `__purge_vmap_area_lazy` (one
  flush_tlb_kernel_range over [min va_start, max va_end)), `vmalloc_info_show`
  ("0x%pK-0x%pK %7ld" caller " pages=%d" " vmalloc"/" vmap" " N0=%u").
- include/trace/events/vmalloc.h: the three TP_printk formats.
- arch/x86/mm/tlb.c: `tlb_single_page_flush_ceiling` = 33; more pages than
  that in a kernel-range flush is a full flush on every CPU, through one IPI
  per other CPU (on_each_cpu).
- arch/x86/mm/init.c `init_mem_mapping` / `split_mem_range`: the direct map
  uses 4 KiB pages for the first 2 MiB (the ISA range is mapped on its own),
  2 MiB pages up to the first 1 GiB boundary and 1 GiB pages above it.
- The real machine's /proc/vmallocinfo and perf trace (tests/data).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kmm
from conftest import LINUX, assert_healthy, sample_trace_lines, vm_state

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
# arch/x86/include/asm/pgtable_64_types.h (4-level, no KASLR): VMALLOC_START,
# and VMALLOC_END = VMALLOC_START + (32 TiB) - 1 (VMALLOC_SIZE_TB_L4).
VMALLOC_START = 0xFFFFC90000000000
VMALLOC_END = VMALLOC_START + (32 << 40) - 1
# arch/x86/mm/tlb.c
TLB_SINGLE_PAGE_FLUSH_CEILING = 33

NOWARN = kmm.__GFP_NOWARN

# Lines of the real machine's `perf script` (tests/data/README.md: the trace
# in /work/shared/data/traces/sample.perf.txt.xz), 2 CPUs, 4 KiB pages.
REAL_ALLOC_VMAP_AREA = (
    "              sh  5218 [000]   329.331622:        vmalloc:alloc_vmap_area: va_start: 18446683600640000000 "
    "size=20480 align=16384 vstart=0xffffc90000000000 vend=0xffffe8ffffffffff failed=0"
)
REAL_FREE_VMAP_AREA_NOFLUSH = (
    " kworker/1:1-eve    41 [001]   329.363819: vmalloc:free_vmap_area_noflush: "
    "va_start=0xffffc90004194000 nr_lazy=8220 nr_lazy_max=16384"
)
# The sample holds no purge; its TP_printk (include/trace/events/vmalloc.h):
PURGE_FORMAT = re.compile(r"start=0x[0-9a-f]+ end=0x[0-9a-f]+ num_purged=\d+")


def fls(x: int) -> int:
    return x.bit_length()


def kernel_lazy_max_pages(cpus: int, page_size: int = PAGE) -> int:
    """mm/vmalloc.c lazy_max_pages()."""
    return fls(cpus) * (32 * MiB // page_size)


def snapshot(m: kmm.Machine) -> dict:
    return vm_state(m)


def pattern(seed: int, n: int) -> bytes:
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=64).digest()
        i += 1
    return out[:n]


def vmallocinfo_lines(m: kmm.Machine) -> list[str]:
    return [line for line in m.proc.vmallocinfo().splitlines() if line]


def line_for(m: kmm.Machine, addr: int) -> str:
    return next(line for line in vmallocinfo_lines(m) if int(line.split("-")[0], 16) == addr)


def shape(text: str) -> str:
    """A trace line's format with the values taken out."""
    text = re.sub(r"0x[0-9a-f]+", "0xH", text)
    return re.sub(r"\b\d+\b", "N", text)


def stats(m: kmm.Machine, cpu: int) -> dict[str, int]:
    return m.tlb_stats()[cpu]


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


# ---- vmalloc: size, guard page, vmallocinfo, meminfo --------------------------------------


def test_vmalloc_5000_is_two_pages_and_a_guard(m):
    used0 = m.proc.meminfo_dict()["VmallocUsed"]
    b = m.vmalloc(5000)
    assert len(b) == 5000
    assert m.is_vmalloc_addr(b.addr) and VMALLOC_START <= b.addr < VMALLOC_END
    assert b.addr % PAGE == 0
    # __vmalloc_node_range: PAGE_ALIGN(5000) = 8192 = 2 pages, + 1 guard page.
    line = line_for(m, b.addr)
    start, end = (int(x, 16) for x in line.split()[0].split("-"))
    assert end - start == 12288
    assert re.fullmatch(r"0x[0-9a-f]{16}-0x[0-9a-f]{16}   12288 \S+ pages=2 vmalloc N0=2", line), line
    assert m.vmalloc_nr_pages() == 2
    assert m.proc.meminfo_dict()["VmallocUsed"] - used0 == 8  # kB
    # Both pages are mapped with 4 KiB PTEs; the guard page is not mapped.
    for off in (0, PAGE):
        phys, size = m.translate(b.addr + off + 123)
        page = m.vmalloc_to_page(b.addr + off)
        assert size == PAGE
        assert phys == page.phys + 123
        assert page.order == 0 and page.refcount == 1
    with pytest.raises(kmm.PageFaultError, match="unable to handle page fault"):
        m.translate(b.addr + 2 * PAGE)
    with pytest.raises(kmm.PageFaultError):
        m.read(b.addr + 2 * PAGE, 1)
    assert m.vmalloc_to_page(b.addr + 2 * PAGE) is None
    assert_healthy(m)


def test_vmallocinfo_columns_match_the_real_file(m):
    real = (LINUX / "vmallocinfo.head.txt").read_text().splitlines()
    real_stack = next(line for line in real if "kernel_clone" in line)
    b = m.vmalloc(16384)  # 4 pages, like a VMAP_STACK stack
    mine = line_for(m, b.addr)
    # "0x%pK-0x%pK %7ld": the size column ends at the same offset in both.
    for line in (real_stack, mine):
        assert re.match(r"0x[0-9a-f]{16}-0x[0-9a-f]{16} ", line)
        assert line[37] == " " and line[38:45].strip().isdigit() and line[45] == " "
    assert real_stack.split()[1:2] == mine.split()[1:2] == ["20480"]
    assert real_stack.split()[3:] == mine.split()[3:] == ["pages=4", "vmalloc", "N0=4"]


def test_vmap_area_cache_geometry_matches_the_real_slabinfo(m):
    # vmalloc_init: KMEM_CACHE(vmap_area, SLAB_PANIC); one vmap_area per area.
    real = next(line for line in (LINUX / "slabinfo.txt").read_text().splitlines() if line.startswith("vmap_area "))
    b = m.vmalloc(PAGE)
    mine = next(line for line in m.proc.slabinfo().splitlines() if line.startswith("vmap_area "))
    # <objsize> <objperslab> <pagesperslab>: 72 56 1 on the real machine.
    assert mine.split()[3:6] == real.split()[3:6] == ["72", "56", "1"]
    assert int(mine.split()[1]) >= 1  # the live area's vmap_area
    m.vfree(b)


def test_pages_are_order0_and_visible_through_the_direct_map(m):
    n = 5 * PAGE + 100
    b = m.vmalloc(n)
    data = pattern(1, n)
    b.write(data)
    pages = [m.vmalloc_to_page(b.addr + i * PAGE) for i in range(6)]
    assert len({p.pfn for p in pages}) == 6
    for i, p in enumerate(pages):
        assert p.order == 0 and not p.highmem
        chunk = data[i * PAGE : (i + 1) * PAGE]
        assert m.read(p.address, len(chunk)) == chunk
    # The other way round: a store through the direct map shows in the Block.
    m.write(pages[3].address + 7, b"direct")
    assert b.read(3 * PAGE + 7, 6) == b"direct"
    assert bytes(b)[3 * PAGE + 7 : 3 * PAGE + 13] == b"direct"
    m.vfree(b)
    # vfree gives every page back at once (only the address range is lazy).
    assert all(p.refcount == 0 for p in pages)
    assert_healthy(m)


def test_vzalloc_is_zeroed_even_over_dirty_pages(m):
    b = m.vmalloc(3 * PAGE)
    b.write(b"\xff" * (3 * PAGE))
    pfns = {m.vmalloc_to_pfn(b.addr + i * PAGE) for i in range(3)}
    m.vfree(b)
    z = m.vzalloc(3 * PAGE)
    # The freed (hot, per-CPU list) pages come back first: vzalloc must clear them.
    assert pfns & {m.vmalloc_to_pfn(z.addr + i * PAGE) for i in range(3)}
    assert bytes(z) == bytes(3 * PAGE)
    assert_healthy(m)


def test_buffer_export_and_vfree_while_exported(m):
    b = m.vmalloc(2 * PAGE + 10)
    view = memoryview(b)
    assert view.nbytes == 2 * PAGE + 10 and not view.readonly
    view[PAGE - 2 : PAGE + 2] = b"ABCD"  # straddles two scattered pages
    assert m.read(b.addr + PAGE - 2, 4) == b"ABCD"
    assert m.read(m.vmalloc_to_page(b.addr + PAGE).address, 2) == b"CD"
    m.write(b.addr + 2 * PAGE + 5, b"Z")
    assert view[2 * PAGE + 5] == ord("Z")
    before = snapshot(m)
    with pytest.raises(BufferError):
        m.vfree(b)
    with pytest.raises(BufferError):
        m.vfree(b.addr)
    assert snapshot(m) == before
    assert b.alive_
    view.release()
    m.vfree(b)
    assert not b.alive_
    with pytest.raises(kmm.UseAfterFreeError):
        bytes(b)
    assert_healthy(m)


def test_page_tables_meminfo_counts_table_pages_and_vfree_keeps_them(m):
    # Each 2 MiB of vmalloc space needs one PTE table page; vunmap clears PTEs
    # but never frees kernel page-table pages (mm/vmalloc.c vunmap_pte_range).
    a = m.vmalloc(PAGE)
    assert a.addr == VMALLOC_START  # lowest-address first fit
    pt1 = m.proc.meminfo_dict()["PageTables"]
    b = m.vmalloc(PAGE)  # same 2 MiB region: no new table
    assert b.addr == VMALLOC_START + 2 * PAGE
    assert m.proc.meminfo_dict()["PageTables"] == pt1
    # [4 pages + 2 MiB): crosses into the second 2 MiB region -> one PTE table.
    # (Its page array, 513 * 8 bytes > PAGE, is itself vmalloc'ed after it,
    # still inside the second region.)
    c = m.vmalloc(2 * MiB + PAGE)
    assert c.addr == VMALLOC_START + 4 * PAGE
    assert m.proc.meminfo_dict()["PageTables"] == pt1 + 4
    for x in (a, b, c):
        m.vfree(x)
    m.vm_unmap_aliases()
    assert m.proc.meminfo_dict()["PageTables"] == pt1 + 4
    assert m.vmalloc_nr_pages() == 0
    assert_healthy(m)


def test_meminfo_vmalloc_used_and_total(m):
    mi0 = m.proc.meminfo_dict()
    # VmallocTotal = (VMALLOC_END - VMALLOC_START) >> 10, as fs/proc/meminfo.c prints it;
    # the real 4-level machine shows 34359738367 kB.
    real_total = int(re.search(r"VmallocTotal:\s+(\d+)", (LINUX / "meminfo.txt").read_text()).group(1))
    assert mi0["VmallocTotal"] == (VMALLOC_END - VMALLOC_START) >> 10 == real_total
    blocks = [m.vmalloc(s) for s in (1, PAGE, PAGE + 1, 10 * PAGE)]
    pages = 1 + 1 + 2 + 10
    assert m.vmalloc_nr_pages() == pages
    assert m.proc.meminfo_dict()["VmallocUsed"] - mi0["VmallocUsed"] == pages * 4
    for b in blocks:
        m.vfree(b)
    # nr_vmalloc_pages drops at vfree, not at the purge.
    assert m.vmalloc_nr_pages() == 0
    assert m.proc.meminfo_dict()["VmallocUsed"] == mi0["VmallocUsed"]


def test_freed_range_is_reused_only_after_the_purge(m):
    a = m.vmalloc(PAGE)
    m.vfree(a)
    # The range sits on the purge list ("unpurged vm_area") until a purge.
    assert vmallocinfo_lines(m) == [f"0x{a.addr:016x}-0x{a.addr + 2 * PAGE:016x}    8192 unpurged vm_area"]
    b = m.vmalloc(PAGE)
    assert b.addr == a.addr + 2 * PAGE
    m.vfree(b)
    assert m.vm_unmap_aliases() == 2
    assert m.vmap_lazy_nr == 0
    assert vmallocinfo_lines(m) == []
    c = m.vmalloc(PAGE)
    assert c.addr == a.addr
    assert_healthy(m)


def test_alignment_first_fit(m):
    a = m.vmalloc(PAGE)  # [S, S + 2 pages)
    st_ = m.alloc_thread_stack()  # THREAD_ALIGN = 16 KiB (kernel/fork.c with VMAP_STACK)
    assert st_.base % 16384 == 0 and st_.base == VMALLOC_START + 16384
    b = m.vmalloc(PAGE)  # fits the hole [S + 2 pages, S + 4 pages)
    assert b.addr == a.addr + 2 * PAGE
    m.free_thread_stack(st_)
    for x in (a, b):
        m.vfree(x)
    assert_healthy(m)


# ---- vmap / vunmap / kvmalloc --------------------------------------------------------------


def test_vmap_maps_existing_pages_contiguously(m):
    pages = [m.alloc_page(kmm.GFP_KERNEL) for _ in range(3)]
    for i, p in enumerate(pages):
        m.write(p.address, bytes([0x40 + i]) * PAGE)
    v = m.vmap(list(reversed(pages)))
    assert len(v) == 3 * PAGE and m.is_vmalloc_addr(v.addr)
    assert bytes(v) == b"B" * PAGE + b"A" * PAGE + b"@" * PAGE
    assert [m.vmalloc_to_pfn(v.addr + i * PAGE) for i in range(3)] == [p.pfn for p in reversed(pages)]
    # vmap areas have no pages= (vm->nr_pages is 0 without VM_MAP_PUT_PAGES) and say "vmap".
    assert re.fullmatch(r"0x[0-9a-f]{16}-0x[0-9a-f]{16}   16384 \S+ vmap", line_for(m, v.addr))
    assert m.vmalloc_nr_pages() == 0  # VmallocUsed counts vmalloc's own pages only
    v[0:2] = b"xy"
    assert m.read(pages[2].address, 2) == b"xy"
    m.vunmap(v)
    # The pages stay the caller's, contents intact.
    assert all(p.refcount == 1 for p in pages)
    assert m.read(pages[0].address, 1) == b"@"
    with pytest.raises(kmm.PageFaultError):
        m.translate(v.addr)
    for p in pages:
        m.free_page(p)
    assert_healthy(m)


def test_vfree_of_a_vmap_area_unmaps_without_freeing_the_pages(m):
    # mm/vmalloc.c vfree: the page loop runs over vm->nr_pages, which is 0 for vmap().
    p = m.alloc_page(kmm.GFP_KERNEL)
    v = m.vmap([p])
    m.vfree(v)
    assert p.refcount == 1
    m.free_page(p)
    assert_healthy(m)


def test_kvmalloc_uses_kmalloc_when_it_can_and_vmalloc_otherwise(m):
    small = m.kvmalloc(100)
    assert not m.is_vmalloc_addr(small.addr) and small.addr >= m.page_offset
    assert m.vmalloc_nr_pages() == 0
    # Above KMALLOC_MAX_SIZE kmalloc cannot serve it: vmalloc does.
    big = m.kvmalloc(kmm.KMALLOC_MAX_SIZE + 1)
    assert m.is_vmalloc_addr(big.addr)
    n = (kmm.KMALLOC_MAX_SIZE + 1 + PAGE - 1) // PAGE
    assert n == 1025
    # 1025 page pointers = 8200 bytes > PAGE: the page array is vmalloc'ed
    # ("vpages"), 3 pages of its own, counted in nr_vmalloc_pages like any vmalloc.
    assert m.vmalloc_nr_pages() == n + 3
    assert re.fullmatch(r"\S+ 4202496 \S+ pages=1025 vmalloc vpages N0=1025", line_for(m, big.addr))
    array = line_for(m, big.addr + 4202496)
    # __vmalloc_area_node passes area->caller to the nested allocation: the
    # array's line names the same caller as the area's.
    caller = line_for(m, big.addr).split()[2]
    assert re.fullmatch(rf"\S+   16384 {re.escape(caller)} pages=3 vmalloc N0=3", array), array
    z = m.kvzalloc(3 * PAGE)
    assert bytes(z) == bytes(3 * PAGE)
    m.kvfree(small)
    m.kvfree(big.addr)
    m.kvfree(z)
    m.kvfree(None)
    assert m.vmalloc_nr_pages() == 0
    assert_healthy(m)


def test_vfree_from_interrupt_context_is_allowed(m):
    # vfree() in interrupt context takes the vfree_atomic path instead of sleeping.
    b = m.vmalloc(PAGE)
    with m.irq():
        m.vfree(b)
    assert m.vmalloc_nr_pages() == 0
    assert_healthy(m)


# ---- wrong usage: a clear exception and nothing changed ---------------------------------------


def _live(m):
    """A machine with one of everything, so a bad call has state to damage."""
    v = m.vmalloc(3 * PAGE)
    k = m.kmalloc(64)
    p = m.alloc_page(kmm.GFP_KERNEL)
    vm = m.vmap([p])
    return v, k, p, vm


BAD_CALLS = {
    "vfree of a kmalloc address": (lambda m, v, k, vm: m.vfree(k.addr), kmm.InvalidFreeError, "kfree"),
    "vfree of a kmalloc Block": (lambda m, v, k, vm: m.vfree(k), kmm.InvalidFreeError, "nonexistent vm area"),
    "kfree of a vmalloc address": (lambda m, v, k, vm: m.kfree(v.addr), kmm.InvalidFreeError, None),
    "kfree of a vmalloc Block": (lambda m, v, k, vm: m.kfree(v), kmm.InvalidFreeError, None),
    "vfree of an unaligned address": (lambda m, v, k, vm: m.vfree(v.addr + 8), kmm.InvalidFreeError, "bad address"),
    "vfree inside an area": (lambda m, v, k, vm: m.vfree(v.addr + PAGE), kmm.InvalidFreeError, "nonexistent vm area"),
    "vfree of a never-allocated vmalloc address": (
        lambda m, v, k, vm: m.vfree(VMALLOC_START + GiB),
        kmm.InvalidFreeError,
        "nonexistent vm area",
    ),
    "vunmap of a vmalloc area": (lambda m, v, k, vm: m.vunmap(v), kmm.InvalidFreeError, "vfree"),
    "vunmap of a vmalloc address": (lambda m, v, k, vm: m.vunmap(v.addr), kmm.InvalidFreeError, "vfree"),
    "vunmap of a kmalloc address": (lambda m, v, k, vm: m.vunmap(k.addr), kmm.InvalidFreeError, None),
    "vmalloc(0)": (lambda m, v, k, vm: m.vmalloc(0), ValueError, None),
    "vzalloc(0)": (lambda m, v, k, vm: m.vzalloc(0), ValueError, None),
    "vmalloc of more than RAM": (lambda m, v, k, vm: m.vmalloc(2 * GiB), kmm.OutOfMemoryError, "exceeds total pages"),
    "vmalloc(2**64 - 1)": (lambda m, v, k, vm: m.vmalloc(2**64 - 1), kmm.OutOfMemoryError, None),
    "vmalloc(-1)": (lambda m, v, k, vm: m.vmalloc(-1), OverflowError, None),
    "vmalloc(2**64)": (lambda m, v, k, vm: m.vmalloc(2**64), OverflowError, None),
    "kvmalloc of more than RAM": (lambda m, v, k, vm: m.kvmalloc(2 * GiB), kmm.OutOfMemoryError, None),
    "vmap of no pages": (lambda m, v, k, vm: m.vmap([]), ValueError, None),
    "vmap of a non-Page": (lambda m, v, k, vm: m.vmap([k.addr]), TypeError, None),
    "vmalloc_to_page of a direct-map address": (
        lambda m, v, k, vm: m.vmalloc_to_page(k.addr),
        ValueError,
        "is_vmalloc_or_module_addr",
    ),
    "translate of an unmapped address": (
        lambda m, v, k, vm: m.translate(VMALLOC_START + GiB),
        kmm.PageFaultError,
        None,
    ),
    "read of the guard page": (lambda m, v, k, vm: m.read(v.addr + 3 * PAGE, 8), kmm.PageFaultError, None),
    "write running into the guard page": (
        lambda m, v, k, vm: m.write(v.addr + 3 * PAGE - 4, b"12345678"),
        kmm.PageFaultError,
        None,
    ),
    "Block write beyond its end": (lambda m, v, k, vm: v.write(b"x", 3 * PAGE), IndexError, None),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_wrong_usage_raises_and_changes_nothing(case):
    m = kmm.Machine()
    v, k, p, vm = _live(m)
    v.write(pattern(2, 3 * PAGE))
    call, exc, words = BAD_CALLS[case]
    before = snapshot(m)
    with pytest.raises(exc) as ei:
        call(m, v, k, vm)
    if words:
        assert words in str(ei.value)
    assert snapshot(m) == before
    assert bytes(v) == pattern(2, 3 * PAGE)  # a refused write wrote nothing
    assert_healthy(m)


def test_vfree_twice_is_a_double_free_and_changes_nothing(m):
    v = m.vmalloc(2 * PAGE)
    addr = v.addr
    m.vfree(addr)
    before = snapshot(m)
    with pytest.raises(kmm.DoubleFreeError, match="double free"):
        m.vfree(addr)
    with pytest.raises(kmm.DoubleFreeError):
        m.kvfree(addr)
    assert snapshot(m) == before
    assert_healthy(m)


def test_vunmap_twice_is_a_double_free_and_changes_nothing(m):
    p = m.alloc_page(kmm.GFP_KERNEL)
    vm = m.vmap([p])
    m.vunmap(vm.addr)
    before = snapshot(m)
    with pytest.raises(kmm.DoubleFreeError):
        m.vunmap(vm.addr)
    assert snapshot(m) == before
    assert p.refcount == 1


def test_null_is_a_no_op(m):
    before = snapshot(m)
    m.vfree(None)
    m.vfree(0)
    m.vunmap(None)
    m.kvfree(None)
    assert snapshot(m) == before


@pytest.mark.parametrize(
    "call",
    ["vmalloc", "vzalloc", "vfree", "vunmap", "vmap", "kvfree of vmalloc", "kvmalloc of 8 MiB"],
)
@pytest.mark.parametrize("ctx", ["atomic", "preempt_disabled"])
def test_sleeping_calls_in_atomic_context_raise_and_change_nothing(call, ctx):
    # vmalloc, vfree, vmap and vunmap might_sleep() (mm/vmalloc.c).
    m = kmm.Machine()
    v, k, p, vm = _live(m)
    p2 = m.alloc_page(kmm.GFP_KERNEL)
    calls = {
        "vmalloc": lambda: m.vmalloc(PAGE),
        "vzalloc": lambda: m.vzalloc(PAGE),
        "vfree": lambda: m.vfree(v),
        "vunmap": lambda: m.vunmap(vm),
        "vmap": lambda: m.vmap([p2]),
        "kvfree of vmalloc": lambda: m.kvfree(v.addr),
        "kvmalloc of 8 MiB": lambda: m.kvmalloc(8 * MiB),
    }
    before = snapshot(m)
    with getattr(m, ctx)():
        with pytest.raises(kmm.SleepInAtomicError, match="sleeping function called from invalid context"):
            calls[call]()
    assert snapshot(m) == before
    assert v.alive_ and vm.alive_
    assert_healthy(m)


# ---- page tables: the direct map's page sizes ---------------------------------------------------


def test_direct_map_page_sizes_on_a_4g_machine():
    m = kmm.Machine(memory="4G")
    po = m.page_offset
    assert po == 0xFFFF888000000000  # Documentation/arch/x86/x86_64/mm.rst
    expect = [
        (0, PAGE),
        (1 * MiB + 5, PAGE),
        (2 * MiB - 1, PAGE),
        (2 * MiB, 2 * MiB),
        (GiB - 1, 2 * MiB),
        (GiB, GiB),
        (3 * GiB + 12345, GiB),
        (4 * GiB - 1, GiB),
    ]
    for off, size in expect:
        phys, got = m.translate(po + off)
        assert (phys, got) == (off, size), hex(off)
    # arch_report_meminfo counts the same split.
    mi = m.proc.meminfo_dict()
    assert (mi["DirectMap4k"], mi["DirectMap2M"], mi["DirectMap1G"]) == (
        2 * 1024,
        (GiB - 2 * MiB) >> 10,
        (3 * GiB) >> 10,
    )
    assert_healthy(m)


def test_direct_map_without_gigabyte_boundary_uses_2m_pages(m):
    # 1 GiB of RAM: [0, 2M) 4K, [2M, 1G) 2M, nothing reaches a 1 GiB page.
    assert m.translate(m.page_offset + 4096) == (4096, PAGE)
    assert m.translate(m.page_offset + 512 * MiB + 3) == (512 * MiB + 3, 2 * MiB)
    with pytest.raises(kmm.PageFaultError):
        m.translate(m.page_offset + GiB + 4096)


# ---- the TLB ---------------------------------------------------------------------------------


def test_second_access_to_a_page_hits_and_walks_read_four_levels(m):
    b = m.vmalloc(2 * PAGE)
    with m.on_cpu(0):
        s0 = stats(m, 0)
        other0 = stats(m, 1)
        m.access(b.addr)
        s1 = stats(m, 0)
        # A miss, a 4-level walk (PGD, PUD, PMD, PTE) for a 4 KiB page.
        assert delta(s1, s0) == {"misses": 1, "walks": 1, "walk_reads": 4}
        m.access(b.addr + 100)
        assert delta(stats(m, 0), s1) == {"hits": 1}
        m.access(b.addr + PAGE)
        assert delta(stats(m, 0), s1) == {"hits": 1, "misses": 1, "walks": 1, "walk_reads": 4}
    assert stats(m, 1) == other0


def test_walk_reads_by_page_size():
    # A leaf at level L is found after (levels - L) entry reads: 2 MiB pages
    # after 3 reads, 1 GiB pages after 2 (4-level x86_64).
    m = kmm.Machine(memory="4G")
    with m.on_cpu(1):
        for off, reads in [(8 * MiB, 3), (2 * GiB, 2), (4096, 4)]:
            s0 = stats(m, 1)
            m.access(m.page_offset + off)
            assert delta(stats(m, 1), s0) == {"misses": 1, "walks": 1, "walk_reads": reads}
            s0 = stats(m, 1)
            m.access(m.page_offset + off + 64)
            assert delta(stats(m, 1), s0) == {"hits": 1}


def test_a_large_page_covers_many_base_pages_in_one_entry(m):
    with m.on_cpu(0):
        m.access(m.page_offset + 64 * MiB)
        s0 = stats(m, 0)
        # 512 distinct 4K pages inside one 2 MiB page: one TLB entry serves them all.
        for i in range(512):
            m.access(m.page_offset + 64 * MiB + i * PAGE)
        assert delta(stats(m, 0), s0) == {"hits": 512}


def _walk(m, base, pages, cpu):
    for i in range(pages):
        m.access(base + i * PAGE)


@pytest.mark.parametrize("pages, l2_hits, misses", [(1024, 1024, 0), (2048, 0, 2048)])
def test_walking_more_pages_than_the_stlb_holds_misses_every_time(m, pages, l2_hits, misses):
    # Default geometry (Skylake): L1 4K 64 entries 4-way = 16 sets, STLB 1536
    # 12-way = 128 sets. Consecutive virtual pages spread evenly over the sets:
    # 1024 pages put 64 in each L1 set (> 4 ways: L1 thrashes) and 8 in each
    # STLB set (<= 12 ways: the STLB keeps them all); 2048 pages put 16 in each
    # STLB set (> 12 ways), and LRU over a cyclic walk then misses every time.
    assert m.tlb_config["l1_4k"] == (64, 4) and m.tlb_config["stlb"] == (1536, 12)
    b = m.vmalloc(pages * PAGE)
    with m.on_cpu(0):
        _walk(m, b.addr, pages, 0)
        s0 = stats(m, 0)
        _walk(m, b.addr, pages, 0)
        d = delta(stats(m, 0), s0)
    assert d.get("hits", 0) == 0
    assert d.get("l2_hits", 0) == l2_hits
    assert d.get("misses", 0) == misses
    assert d.get("walks", 0) == misses
    m.vfree(b)


@pytest.mark.parametrize("pages, first_level, stlb", [(16, 16, 0), (64, 0, 64)])
def test_2m_pages_have_their_own_first_level_array(pages, first_level, stlb):
    # Default geometry: L1 2M/4M 32 entries 4-way = 8 sets. 16 consecutive 2 MiB
    # pages put 2 in each set (they all stay); 64 put 8 in each (> 4 ways:
    # cyclic LRU misses in L1) but the shared STLB (128 sets) holds all 64.
    m = kmm.Machine(memory="1G")
    base = m.page_offset + 64 * MiB
    with m.on_cpu(0):
        for _ in range(2):
            s0 = stats(m, 0)
            for i in range(pages):
                m.access(base + i * 2 * MiB + 8)
        d = delta(stats(m, 0), s0)
    assert (d.get("hits", 0), d.get("l2_hits", 0), d.get("misses", 0)) == (first_level, stlb, 0)


class RefTlb:
    """An independent two-level LRU TLB for 4 KiB pages: an L1 hit; else an
    STLB hit (promoted into L1); else a miss that fills both levels."""

    def __init__(self, l1: tuple[int, int], l2: tuple[int, int]):
        self.l1 = [OrderedDict() for _ in range(l1[0] // l1[1])], l1[1]
        self.l2 = [OrderedDict() for _ in range(l2[0] // l2[1])], l2[1]
        self.hits = self.l2_hits = self.misses = 0

    @staticmethod
    def _touch(arr, vpn) -> bool:
        sets, _ = arr
        s = sets[vpn % len(sets)]
        if vpn in s:
            s.move_to_end(vpn)
            return True
        return False

    @staticmethod
    def _fill(arr, vpn) -> None:
        sets, ways = arr
        s = sets[vpn % len(sets)]
        s[vpn] = True
        s.move_to_end(vpn)
        if len(s) > ways:
            s.popitem(last=False)

    def access(self, vpn: int) -> None:
        if self._touch(self.l1, vpn):
            self.hits += 1
        elif self._touch(self.l2, vpn):
            self.l2_hits += 1
            self._fill(self.l1, vpn)
        else:
            self.misses += 1
            self._fill(self.l1, vpn)
            self._fill(self.l2, vpn)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tiny_tlb_matches_an_independent_lru_model(seed):
    import random

    geo = {"l1_4k": (4, 2), "stlb": (16, 4)}
    m = kmm.Machine(memory="256M", tlb=geo)
    assert m.tlb_config["l1_4k"] == (4, 2) and m.tlb_config["stlb"] == (16, 4)
    b = m.vmalloc(40 * PAGE)
    rng = random.Random(seed)
    seq = [rng.randrange(40) for _ in range(3000)]
    ref = RefTlb(geo["l1_4k"], geo["stlb"])
    with m.on_cpu(0):
        m.flush_tlb_all()  # start both from empty
        s0 = stats(m, 0)
        for i in seq:
            m.access(b.addr + i * PAGE + rng.randrange(PAGE))
            ref.access((b.addr >> 12) + i)
        d = delta(stats(m, 0), s0)
    assert (d.get("hits", 0), d.get("l2_hits", 0), d.get("misses", 0)) == (ref.hits, ref.l2_hits, ref.misses)
    assert ref.hits and ref.l2_hits and ref.misses  # the sequence exercised all three


def test_invalid_tlb_geometry_is_refused():
    with pytest.raises(ValueError):
        kmm.Machine(tlb={"l1_4k": (6, 4)})  # not a multiple of the ways
    with pytest.raises(ValueError):
        kmm.Machine(tlb={"stlb": (0, 1)})
    with pytest.raises(ValueError):
        kmm.Machine(tlb={"l3": (64, 4)})


def test_kernel_range_flush_single_pages_up_to_the_ceiling_then_full():
    m = kmm.Machine(cpus=4)
    b = m.vmalloc(64 * PAGE)
    with m.on_cpu(2):
        m.access(b.addr, 64 * PAGE)
        s0 = m.tlb_stats()
        m.flush_tlb_kernel_range(b.addr, b.addr + TLB_SINGLE_PAGE_FLUSH_CEILING * PAGE)
        s1 = m.tlb_stats()
        # 33 pages: one INVLPG per page on every CPU; an IPI to each of the 3 others.
        for cpu in range(4):
            d = delta(s1[cpu], s0[cpu])
            assert d.get("flush_pages") == 33 and "flushes" not in d
            assert d.get("ipis", 0) == (0 if cpu == 2 else 1)
        assert delta(s1[2], s0[2])["shootdowns"] == 3
        # Flushed on this CPU: the next access to page 0 misses, page 40 still hits.
        m.access(b.addr)
        m.access(b.addr + 40 * PAGE)
        d = delta(stats(m, 2), s1[2])
        assert d["misses"] == 1 and d["hits"] == 1
        s2 = m.tlb_stats()
        m.flush_tlb_kernel_range(b.addr, b.addr + (TLB_SINGLE_PAGE_FLUSH_CEILING + 1) * PAGE)
        s3 = m.tlb_stats()
        for cpu in range(4):
            d = delta(s3[cpu], s2[cpu])
            assert d.get("flushes") == 1 and "flush_pages" not in d
        m.access(b.addr + 40 * PAGE)  # a full flush dropped it too
        assert delta(stats(m, 2), s3[2]) == {"misses": 1, "walks": 1, "walk_reads": 4}


def test_stale_tlb_entry_survives_vfree_until_the_purge(m):
    b = m.vmalloc(PAGE)
    b.write(b"stale!")
    addr = b.addr
    with m.on_cpu(0):
        assert m.read(addr, 6) == b"stale!"  # CPU 0 caches the translation
    m.vfree(b)
    # The PTE is gone (a page walk faults) ...
    with pytest.raises(kmm.PageFaultError):
        m.translate(addr)
    # ... but the flush is deferred to the purge (lazy TLB flushing): CPU 0
    # still translates through its stale entry, CPU 1 has none and faults.
    with m.on_cpu(0):
        m.access(addr)
    with m.on_cpu(1):
        with pytest.raises(kmm.PageFaultError, match=f"{addr:#x}"):
            m.access(addr)
    m.vm_unmap_aliases()
    with m.on_cpu(0):
        with pytest.raises(kmm.PageFaultError):
            m.read(addr, 1)
    assert_healthy(m)


# ---- the lazy purge and the vmalloc tracepoints -------------------------------------------------


def test_lazy_max_pages(m):
    assert m.lazy_max_pages == kernel_lazy_max_pages(2) == 16384
    assert kmm.Machine(cpus=1, memory="64M").lazy_max_pages == 8192
    assert kmm.Machine(cpus=4, memory="64M").lazy_max_pages == 24576
    assert kmm.Machine(cpus=8, memory="64M").lazy_max_pages == kernel_lazy_max_pages(8) == 32768


def test_lazy_purge_fires_once_past_lazy_max_pages(m):
    # 511-page areas: 512 pages of address space each (with the guard) and a
    # page array of 511 * 8 bytes <= PAGE (kmalloc'ed, not a nested area).
    # 32 of them make vmap_lazy_nr = 16384, not above lazy_max_pages; the 33rd
    # makes it 16896 > 16384: exactly one purge, over all 33.
    lazy_max = kernel_lazy_max_pages(2)
    addrs = []
    with m.on_cpu(0):
        s0 = m.tlb_stats()
        with m.trace.record("vmalloc:*") as rec:
            for _ in range(33):
                b = m.vmalloc(511 * PAGE)
                addrs.append(b.addr)
                m.vfree(b)
        s1 = m.tlb_stats()
    frees = [e for e in rec.events if e.name == "vmalloc:free_vmap_area_noflush"]
    purges = [e for e in rec.events if e.name == "vmalloc:purge_vmap_area_lazy"]
    allocs = [e for e in rec.events if e.name == "vmalloc:alloc_vmap_area"]
    assert len(allocs) == 33 and len(frees) == 33 and len(purges) == 1
    for i, e in enumerate(frees):
        assert e["va_start"] == addrs[i]
        assert e["nr_lazy"] == 512 * (i + 1)
        assert e["nr_lazy_max"] == lazy_max
    for i, e in enumerate(allocs):
        assert e["addr"] == addrs[i] and e["size"] == 512 * PAGE and e["failed"] == 0
    # Freed ranges are not reused before the purge: each area follows the last.
    assert addrs == [addrs[0] + i * 512 * PAGE for i in range(33)]
    p = purges[0]
    # The purge follows the 33rd free (and ends the recording).
    assert [e.name for e in rec.events][-2:] == ["vmalloc:free_vmap_area_noflush", "vmalloc:purge_vmap_area_lazy"]
    assert (p["start"], p["end"], p["npurged"]) == (addrs[0], addrs[-1] + 512 * PAGE, 33)
    assert p.text == f"start={addrs[0]:#x} end={addrs[-1] + 512 * PAGE:#x} num_purged=33"
    assert PURGE_FORMAT.fullmatch(p.text)
    assert m.vmap_lazy_nr == 0 and vmallocinfo_lines(m) == []
    # One flush_tlb_kernel_range of 16896 pages (> 33): a full flush on both
    # CPUs, one IPI from CPU 0 to CPU 1.
    d0, d1 = delta(s1[0], s0[0]), delta(s1[1], s0[1])
    assert d0["flushes"] == 1 and d1["flushes"] == 1
    assert d0["shootdowns"] == 1 and d1["ipis"] == 1
    assert "ipis" not in d0 and "shootdowns" not in d1
    assert_healthy(m)


def test_purge_sends_one_ipi_per_other_cpu():
    m = kmm.Machine(cpus=4, memory="256M")
    b = m.vmalloc(PAGE)
    m.vfree(b)
    with m.on_cpu(3):
        s0 = m.tlb_stats()
        assert m.vm_unmap_aliases() == 1
        s1 = m.tlb_stats()
    assert s1[3]["shootdowns"] - s0[3]["shootdowns"] == 3
    assert [s1[c]["ipis"] - s0[c]["ipis"] for c in range(4)] == [1, 1, 1, 0]
    # 2 pages (<= 33): single-page flushes, not full ones.
    assert all(s1[c]["flushes"] == s0[c]["flushes"] for c in range(4))
    assert all(s1[c]["flush_pages"] - s0[c]["flush_pages"] == 2 for c in range(4))


def test_vmalloc_event_texts_have_the_real_traces_format(m):
    with m.trace.record("vmalloc:*") as rec:
        st_ = m.alloc_thread_stack()  # the real trace's allocations are stacks too
        m.free_thread_stack(st_)
    alloc, free = rec.events
    assert alloc.name == "vmalloc:alloc_vmap_area" and free.name == "vmalloc:free_vmap_area_noflush"
    real_alloc_text = REAL_ALLOC_VMAP_AREA.split("vmalloc:alloc_vmap_area: ", 1)[1]
    real_free_text = REAL_FREE_VMAP_AREA_NOFLUSH.split("vmalloc:free_vmap_area_noflush: ", 1)[1]
    # Same text but the address: the same size, align, vstart, vend, failed.
    assert alloc.text == re.sub(r"va_start: \d+", f"va_start: {st_.base}", real_alloc_text)
    assert shape(free.text) == shape(real_free_text)
    assert free.text == f"va_start={st_.base:#x} nr_lazy=5 nr_lazy_max=16384"
    # perf script: the event name column is padded as in the real output.
    for e, real in [(alloc, REAL_ALLOC_VMAP_AREA), (free, REAL_FREE_VMAP_AREA_NOFLUSH)]:
        line = e.perf_script_line()
        pad = re.compile(r"\d+\.\d{6}:(\s+)vmalloc:")
        assert pad.search(line).group(1) == pad.search(real).group(1)
        assert line.endswith(e.text)


def test_the_real_sample_traces_vmalloc_lines_parse_with_our_formats():
    lines = [line.rstrip("\n") for line in sample_trace_lines() if "vmalloc:" in line]
    assert len(lines) == 23
    alloc_re = re.compile(r"va_start: \d+ size=\d+ align=\d+ vstart=0x[0-9a-f]+ vend=0x[0-9a-f]+ failed=[01]")
    free_re = re.compile(r"va_start=0x[0-9a-f]+ nr_lazy=\d+ nr_lazy_max=\d+")
    m = kmm.Machine()
    with m.trace.record("vmalloc:*") as rec:
        m.vfree(m.vmalloc(PAGE))
    mine = {e.name: e.text for e in rec.events}
    assert alloc_re.fullmatch(mine["vmalloc:alloc_vmap_area"])
    assert free_re.fullmatch(mine["vmalloc:free_vmap_area_noflush"])
    for line in lines:
        body = re.split(r"vmalloc:\w+: ", line, maxsplit=1)[1]
        assert alloc_re.fullmatch(body) or free_re.fullmatch(body), line
        if "nr_lazy_max" in body:
            assert body.endswith("nr_lazy_max=16384")  # the real machine has 2 CPUs, as m


# ---- a random walk over the whole vmalloc API ------------------------------------------------------

SIZES = st.sampled_from([1, 100, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE, 511 * PAGE, 513 * PAGE, 70000])


class VmallocMachine(RuleBasedStateMachine):
    ARCH, MEMORY, MAX_BYTES = "x86_64", "128M", None

    def __init__(self):
        super().__init__()
        self.m = kmm.Machine(arch=self.ARCH, memory=self.MEMORY)
        self.areas: dict[int, tuple[kmm.Block, str, int, list]] = {}  # addr -> (block, kind, seed, pages)
        self.seed = 0

    def _fill(self, b, kind, pages=()):
        self.seed += 1
        n = min(len(b), 3 * PAGE)
        b.write(pattern(self.seed, n))
        self.areas[b.addr] = (b, kind, self.seed, list(pages))

    @rule(size=SIZES, zero=st.booleans())
    def vmalloc(self, size, zero):
        size = min(size, self.MAX_BYTES or size)
        b = self.m.vzalloc(size) if zero else self.m.vmalloc(size)
        if zero:
            assert b.read(0, min(size, 64)) == bytes(min(size, 64))
        self._fill(b, "vmalloc")

    @rule(size=SIZES)
    def kvmalloc(self, size):
        size = min(size, self.MAX_BYTES or size)
        self._fill(self.m.kvmalloc(size), "kvmalloc")

    @rule(n=st.integers(1, 5), order=st.integers(0, 2))
    def vmap(self, n, order):
        pages = [self.m.alloc_pages(kmm.GFP_KERNEL, order) for _ in range(n)]
        sub = [self.m.pfn_to_page(p.pfn + i) for p in pages for i in range(1 << order)]
        b = self.m.vmap(sub)
        assert len(b) == len(sub) * PAGE
        self._fill(b, "vmap", [(p, order) for p in pages])

    @precondition(lambda self: self.areas)
    @rule(data=st.data())
    def free(self, data):
        addr = data.draw(st.sampled_from(sorted(self.areas)))
        b, kind, _, pages = self.areas.pop(addr)
        if kind == "vmalloc":
            self.m.vfree(b if data.draw(st.booleans()) else addr)
        elif kind == "kvmalloc":
            self.m.kvfree(addr)
        else:
            self.m.vunmap(b)
            for p, order in pages:
                self.m.free_pages(p, order)

    @precondition(lambda self: self.areas)
    @rule(data=st.data(), cpu=st.integers(0, 1))
    def access(self, data, cpu):
        addr = data.draw(st.sampled_from(sorted(self.areas)))
        b = self.areas[addr][0]
        with self.m.on_cpu(cpu):
            self.m.access(addr, len(b))

    @rule()
    def purge(self):
        self.m.vm_unmap_aliases()
        assert self.m.vmap_lazy_nr == 0

    @invariant()
    def contents_intact(self):
        for b, _, seed, _ in self.areas.values():
            n = min(len(b), 3 * PAGE)
            assert b.read(0, n) == pattern(seed, n)
            if not self.m.is_vmalloc_addr(b.addr):
                continue
            # The same bytes through the first page's own mapping (the
            # direct map, or a kmap for a highmem page).
            page = self.m.vmalloc_to_page(b.addr)
            k = min(n, PAGE)
            if page.highmem:
                a = self.m.kmap(page)
                assert self.m.read(a, k) == pattern(seed, n)[:k]
                self.m.kunmap(page)
            else:
                assert self.m.read(page.address, k) == pattern(seed, n)[:k]

    @invariant()
    def accounting(self):
        # Every vmalloc'ed area's pages, plus its page array's when that is
        # above a page (then vmalloc'ed itself: mm/vmalloc.c __vmalloc_area_node).
        expect = 0
        for b, kind, _, _ in self.areas.values():
            if kind == "vmap" or not self.m.is_vmalloc_addr(b.addr):
                continue
            n = (len(b) + PAGE - 1) // PAGE
            expect += n + ((n * 8 + PAGE - 1) // PAGE if n * 8 > PAGE else 0)
        assert self.m.vmalloc_nr_pages() == expect

    @invariant()
    def healthy(self):
        assert self.m.check() == []

    def teardown(self):
        for addr in list(self.areas):
            b, kind, _, pages = self.areas.pop(addr)
            if kind == "vmap":
                self.m.vunmap(addr)
                for p, order in pages:
                    self.m.free_pages(p, order)
            else:
                self.m.kvfree(addr)
        self.m.vm_unmap_aliases()
        assert self.m.vmalloc_nr_pages() == 0
        assert self.m.proc.vmallocinfo() == ""
        assert self.m.vmap_lazy_nr == 0
        assert self.m.check() == []


VmallocMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestVmallocMachine = VmallocMachine.TestCase

