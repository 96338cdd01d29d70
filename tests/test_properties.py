"""Property-based tests: random alloc/free sequences keep the buddy invariants."""

from __future__ import annotations

import hashlib

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kmm
from conftest import buddyinfo, free_pages

# Module-level aliases: inside a class body `kmm.__GFP_X` would be name-mangled.
NOWARN = kmm.__GFP_NOWARN
ZERO = kmm.__GFP_ZERO

GFPS = [
    kmm.GFP_KERNEL,
    kmm.GFP_KERNEL | kmm.__GFP_ZERO,
    kmm.GFP_ATOMIC,
    kmm.GFP_NOWAIT,
    kmm.GFP_KERNEL | kmm.GFP_DMA,
    kmm.GFP_DMA32 | kmm.GFP_KERNEL,
    kmm.GFP_HIGHUSER_MOVABLE,
    kmm.GFP_KERNEL | kmm.__GFP_COMP,
    kmm.GFP_NOFS | kmm.gfp.__GFP_RECLAIMABLE,
    kmm.GFP_HIGHUSER,
]


def pattern(pfn: int, n: int) -> bytes:
    seed = hashlib.blake2b(pfn.to_bytes(8, "little"), digest_size=16).digest()
    return (seed * (n // 16 + 1))[:n]


class PageAllocator(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        arch = "x86_64"
        self.m = kmm.Machine(arch=arch, memory="48M")
        self.boot = buddyinfo(self.m)
        self.live: dict[int, tuple[int, int]] = {}  # pfn -> (order, gfp)
        self.written: set[int] = set()

    @rule(order=st.integers(0, 10), gfp=st.sampled_from(GFPS), write=st.booleans())
    def alloc(self, order, gfp, write):
        try:
            p = self.m.alloc_pages(gfp | NOWARN, order)
        except kmm.OutOfMemoryError:
            return
        assert p.pfn % (1 << order) == 0
        assert p.pfn not in self.live
        self.live[p.pfn] = (order, gfp)
        addr = p.address
        if gfp & ZERO:
            assert self.m.read(addr, 64) == bytes(64)
            assert self.m.read(addr + (4096 << order) - 64, 64) == bytes(64)
        if write and addr is not None:
            n = min(4096 << order, 8192)
            self.m.write(addr, pattern(p.pfn, n))
            self.written.add(p.pfn)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        pfn = data.draw(st.sampled_from(sorted(self.live)))
        order, gfp = self.live[pfn]
        page = self.m.pfn_to_page(pfn)
        if data.draw(st.booleans()):
            # Bad frees first: they must change nothing.
            before = buddyinfo(self.m)
            try:
                self.m.free_pages(page, (order + 1) % 11)
                raise AssertionError("wrong order accepted")
            except kmm.InvalidFreeError:
                pass
            assert buddyinfo(self.m) == before
        self.m.free_pages(page, order)
        del self.live[pfn]
        self.written.discard(pfn)
        try:
            self.m.free_pages(page, order)
            raise AssertionError("double free accepted")
        except (kmm.DoubleFreeError, kmm.InvalidFreeError):
            pass

    @invariant()
    def no_overlap(self):
        spans = sorted((pfn, pfn + (1 << o)) for pfn, (o, _) in self.live.items())
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            assert a1 <= b0, f"overlap {a0:#x}-{a1:#x} and {b0:#x}-{b1:#x}"

    @invariant()
    def free_plus_allocated_is_managed(self):
        managed = sum(z.managed for z in self.m.zones)
        allocated = sum(1 << o for o, _ in self.live.values())
        assert free_pages(self.m) + allocated == managed

    @invariant()
    def structure_is_consistent(self):
        # Lists, counters, migratetypes, alignment, and no unmerged free buddies.
        assert self.m.check() == []

    @invariant()
    def written_bytes_are_intact(self):
        for pfn in self.written:
            order, _ = self.live[pfn]
            n = min(4096 << order, 8192)
            assert self.m.read(self.m.pfn_to_page(pfn).address, n) == pattern(pfn, n), hex(pfn)

    def teardown(self):
        for pfn, (order, _) in list(self.live.items()):
            self.m.free_pages(self.m.pfn_to_page(pfn), order)
        assert buddyinfo(self.m) == self.boot
        assert self.m.check() == []


PageAllocator.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPageAllocator = PageAllocator.TestCase
