"""A state machine over the whole allocation API that also misuses it
(issue 11, part 8): after every step the machine's structures are whole
(``m.check()``), every live allocation still holds what was written into it,
and the pages are all accounted for; every misuse raises the kernel's kind of
error and changes nothing (the /proc views before and after are the same
text); at the end, with everything freed, the free memory is what boot left.

Misuse, each as a kernel engineer would expect it refused: a double kfree,
kfree of an interior pointer, a write through a Block after its kfree,
free_pages of a page twice or with the wrong order, a double vfree,
kmem_cache_destroy with live objects, a bulk allocation no RAM can hold,
a negative or absurd size, reads past the end of RAM.
"""

from __future__ import annotations

import hashlib

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kmm

NOWARN = kmm.__GFP_NOWARN
KERNEL = kmm.GFP_KERNEL | NOWARN


def pattern(key: int, n: int) -> bytes:
    seed = hashlib.blake2b(key.to_bytes(8, "little"), digest_size=16).digest()
    return (seed * (n // 16 + 1))[:n]


def state(m: kmm.Machine) -> tuple[str, ...]:
    """What a refused call must leave exactly as it was (no drain first:
    a refused call may not move a page between the pcp and buddy lists)."""
    p = m.proc
    return (p.buddyinfo(), p.slabinfo(), p.meminfo(), p.vmallocinfo(), repr(m.nr_pcp_pages()))


class Misuse(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = kmm.Machine(memory="64M", cpus=2, slab_nomerge=True)
        self.m.drain_all_pages()
        self.boot_free = self.m.nr_free_pages()
        self.boot_meminfo = self.m.proc.meminfo()
        self.n = 0
        self.kmallocs: dict[int, tuple[kmm.Block, int]] = {}  # key -> (block, size)
        self.stale: list[kmm.Block] = []
        self.pages: dict[int, tuple[kmm.Page, int]] = {}  # pfn -> (page, order)
        self.freed_pages: list[tuple[int, int]] = []
        self.vmallocs: dict[int, tuple[kmm.Block, int]] = {}
        self.vfreed: list[int] = []
        self.cache = self.m.kmem_cache_create("misuse", 200)
        self.objs: dict[int, kmm.Block] = {}

    def key(self) -> int:
        self.n += 1
        return self.n

    def refused(self, call, *errors: type[BaseException]) -> BaseException:
        before = state(self.m)
        try:
            call()
        except errors as e:
            after = state(self.m)
            assert after == before, f"a refused call changed the machine: {e}"
            return e
        raise AssertionError(f"not refused: {call}")

    # ---- ordinary use -------------------------------------------------------------------------

    @rule(size=st.sampled_from([1, 8, 13, 64, 100, 192, 1000, 4096, 5000, 9000, 70000]))
    def kmalloc(self, size: int) -> None:
        try:
            b = self.m.kmalloc(size, KERNEL)
        except kmm.OutOfMemoryError:
            return
        k = self.key()
        b[:] = pattern(k, len(b))
        self.kmallocs[k] = (b, size)

    @precondition(lambda self: self.kmallocs)
    @rule(data=st.data())
    def kfree(self, data) -> None:
        k = data.draw(st.sampled_from(sorted(self.kmallocs)))
        b, _ = self.kmallocs.pop(k)
        self.m.kfree(b)
        self.stale.append(b)

    @rule(order=st.integers(0, 5))
    def alloc_pages(self, order: int) -> None:
        try:
            p = self.m.alloc_pages(KERNEL, order)
        except kmm.OutOfMemoryError:
            return
        self.m.write(p.address, pattern(p.pfn, 64))
        self.pages[p.pfn] = (p, order)

    @precondition(lambda self: self.pages)
    @rule(data=st.data())
    def free_pages(self, data) -> None:
        pfn = data.draw(st.sampled_from(sorted(self.pages)))
        p, order = self.pages.pop(pfn)
        self.m.free_pages(p, order)
        self.freed_pages.append((pfn, order))

    @rule(size=st.sampled_from([1, 4096, 10000, 70000]))
    def vmalloc(self, size: int) -> None:
        try:
            v = self.m.vmalloc(size)
        except kmm.OutOfMemoryError:
            return
        k = self.key()
        v[:] = pattern(k, len(v))
        self.vmallocs[k] = (v, size)

    @precondition(lambda self: self.vmallocs)
    @rule(data=st.data())
    def vfree(self, data) -> None:
        k = data.draw(st.sampled_from(sorted(self.vmallocs)))
        v, _ = self.vmallocs.pop(k)
        addr = v.addr
        self.m.vfree(v)
        self.vfreed.append(addr)

    @rule()
    def cache_alloc(self) -> None:
        try:
            o = self.cache.alloc(KERNEL)
        except kmm.OutOfMemoryError:
            return
        k = self.key()
        o[:] = pattern(k, len(o))
        self.objs[k] = o

    @precondition(lambda self: self.objs)
    @rule(data=st.data())
    def cache_free(self, data) -> None:
        k = data.draw(st.sampled_from(sorted(self.objs)))
        self.cache.free(self.objs.pop(k))

    # ---- misuse --------------------------------------------------------------------------------

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def double_kfree(self, data) -> None:
        b = data.draw(st.sampled_from(self.stale))
        # Through the Block: it knows it was freed. (By raw address the slot
        # may hold a new allocation by now, kmm's own included: legal.)
        self.refused(lambda: self.m.kfree(b), kmm.DoubleFreeError, kmm.UseAfterFreeError, kmm.InvalidFreeError)

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def write_after_free(self, data) -> None:
        b = data.draw(st.sampled_from(self.stale))

        def write() -> None:
            b[0] = 1

        self.refused(write, kmm.UseAfterFreeError)

    @precondition(lambda self: any(size >= 16 for _b, size in self.kmallocs.values()))
    @rule(data=st.data())
    def kfree_interior_pointer(self, data) -> None:
        k = data.draw(st.sampled_from(sorted(k for k, (_b, s) in self.kmallocs.items() if s >= 16)))
        b, _ = self.kmallocs[k]
        self.refused(lambda: self.m.kfree(b.addr + 8), kmm.InvalidFreeError, kmm.KmmError)

    @precondition(lambda self: self.freed_pages)
    @rule(data=st.data())
    def double_free_pages(self, data) -> None:
        pfn, order = data.draw(st.sampled_from(self.freed_pages))
        if any(pfn <= p < pfn + (1 << order) for p in self.pages) or any(
            p <= pfn < p + (1 << o) for p, (_pg, o) in self.pages.items()
        ):
            return  # the page was reused: freeing it would be legal
        if any(self.m.pfn_to_page(pfn + i).refcount > 0 for i in range(1 << order)):
            return  # reused inside kmm (a slab, a vmalloc page, a page table)
        self.refused(lambda: self.m.free_pages(self.m.pfn_to_page(pfn), order), kmm.DoubleFreeError,
                     kmm.InvalidFreeError)

    @precondition(lambda self: any(o > 0 for _p, o in self.pages.values()))
    @rule(data=st.data())
    def free_pages_wrong_order(self, data) -> None:
        pfn = data.draw(st.sampled_from(sorted(p for p, (_pg, o) in self.pages.items() if o > 0)))
        p, order = self.pages[pfn]
        self.refused(lambda: self.m.free_pages(p, order - 1), kmm.InvalidFreeError, kmm.KmmError)

    @precondition(lambda self: self.vfreed)
    @rule(data=st.data())
    def double_vfree(self, data) -> None:
        addr = data.draw(st.sampled_from(self.vfreed))
        if any(v.addr == addr for v, _s in self.vmallocs.values()):
            return  # the area was reused
        self.refused(lambda: self.m.vfree(addr), kmm.KmmError)

    @precondition(lambda self: self.objs)
    @rule()
    def destroy_busy_cache(self) -> None:
        self.refused(self.cache.destroy, kmm.KmmError)
        assert not self.cache.destroyed

    @rule(n=st.sampled_from([2**32 + 1, 2**40, 2**63 - 1]))
    def absurd_bulk(self, n: int) -> None:
        self.refused(lambda: self.cache.alloc_bulk(KERNEL, n), kmm.OutOfMemoryError)

    @rule(size=st.sampled_from([-1, -(2**40), 2**40, 2**64]))
    def absurd_kmalloc(self, size: int) -> None:
        self.refused(lambda: self.m.kmalloc(size, KERNEL), ValueError, OverflowError, kmm.OutOfMemoryError)

    @rule(off=st.sampled_from([0, 4096, 2**30, 2**40]))
    def read_past_ram(self, off: int) -> None:
        end_pfn = max(z.start_pfn + z.spanned for z in self.m.zones)
        addr = self.m.page_offset + end_pfn * 4096 + off
        self.refused(lambda: self.m.read(addr, 16), kmm.PageFaultError)

    # ---- invariants ----------------------------------------------------------------------------

    @invariant()
    def structures_are_whole(self) -> None:
        assert self.m.check() == []

    @invariant()
    def live_memory_holds_what_was_written(self) -> None:
        for k, (b, _s) in self.kmallocs.items():
            assert bytes(b) == pattern(k, len(b))
        for pfn, (p, _o) in self.pages.items():
            assert self.m.read(p.address, 64) == pattern(pfn, 64)
        for k, (v, _s) in self.vmallocs.items():
            assert bytes(v) == pattern(k, len(v))
        for k, o in self.objs.items():
            assert bytes(o) == pattern(k, len(o))

    def teardown(self) -> None:
        for b, _s in self.kmallocs.values():
            self.m.kfree(b)
        for p, o in self.pages.values():
            self.m.free_pages(p, o)
        for v, _s in self.vmallocs.values():
            self.m.vfree(v)
        for o in self.objs.values():
            self.cache.free(o)
        self.cache.destroy()
        for c in self.m.caches:
            c.shrink()
        self.m.vm_unmap_aliases()
        self.m.drain_all_pages()
        # Exact accounting: every page the steps took came back, except what
        # the slab layer keeps for its own bookkeeping caches (vmap_area) and
        # page tables vmalloc built (the kernel keeps both too): both are
        # counted in meminfo's Slab and PageTables, so free + those is boot.
        mi = self.m.proc.meminfo()
        kb = {line.split(":")[0]: int(line.split()[1]) for line in mi.splitlines() if line.split()[-1] == "kB"}
        held = (kb["Slab"] + kb["PageTables"]) // 4
        diff = [(a, b) for a, b in zip(self.boot_meminfo.splitlines(), mi.splitlines()) if a != b]
        assert self.m.nr_free_pages() + held == self.boot_free, diff
        assert self.m.check() == []


Misuse.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestMisuse = Misuse.TestCase
