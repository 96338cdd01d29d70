"""Property-based test: random kmalloc/kfree/krealloc and cache alloc/free
sequences keep live objects disjoint and their bytes intact, keep every slab
invariant, and give every page back once all is freed and shrunk.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import kmm
from conftest import buddyinfo, free_pages

# Module-level aliases: inside a class body `kmm.__GFP_X` would be name-mangled.
ZERO = kmm.__GFP_ZERO
ACCOUNT = kmm.__GFP_ACCOUNT
RECLAIMABLE = kmm.gfp.__GFP_RECLAIMABLE

GFPS = [
    kmm.GFP_KERNEL,
    kmm.GFP_KERNEL | ZERO,
    kmm.GFP_ATOMIC,
    kmm.GFP_KERNEL_ACCOUNT,
    kmm.GFP_KERNEL | ACCOUNT | ZERO,
    kmm.GFP_NOFS | RECLAIMABLE,
    kmm.GFP_KERNEL | kmm.GFP_DMA,
]

SEEDS = st.integers(0, 2**32 - 1)
SIZES = st.one_of(
    st.integers(0, 256),
    st.integers(257, 8192),
    st.integers(8193, 40000),  # large kmalloc: compound pages
    st.sampled_from([8, 16, 96, 192, 4096, 8192, 8193]),
)

# (name, object size, flags)
CACHES = [
    ("prop_small", 40, 0),
    ("prop_big", 1500, kmm.SLAB_HWCACHE_ALIGN),
    ("prop_rcl", 200, kmm.SLAB_RECLAIM_ACCOUNT),
]


class SlabMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m = kmm.Machine(memory="256M")
        self.free0 = free_pages(self.m)
        self.buddy0 = buddyinfo(self.m)
        self.caches = [self.m.kmem_cache_create(n, s, flags=f) for n, s, f in CACHES]
        self.live = {}  # key -> [block, cache index or None, expected bytes]
        self.next_key = 0

    def _add(self, block, cache, data):
        key = self.next_key
        self.next_key += 1
        self.live[key] = [block, cache, data]

    def _pick(self, data):
        """A live object's key, or None when nothing is live (the rule is then a no-op)."""
        return data.draw(st.sampled_from(sorted(self.live))) if self.live else None

    def _fill(self, block, seed):
        # Contents from a drawn seed, not drawn byte by byte: a 40 KB block
        # would otherwise exhaust Hypothesis's entropy budget (data_too_large).
        data = random.Random(seed).randbytes(len(block))
        if data:
            block[:] = data
        return data

    @rule(size=SIZES, gfp=st.sampled_from(GFPS), seed=SEEDS)
    def kmalloc(self, size, gfp, seed):
        b = self.m.kmalloc(size, gfp)
        assert len(b) == size
        if gfp & ZERO and size:
            assert bytes(b) == bytes(size)
        if size == 0:
            assert b.addr == kmm.ZERO_SIZE_PTR
            self._add(b, None, b"")
            return
        self._add(b, None, self._fill(b, seed))

    @rule(which=st.integers(0, len(CACHES) - 1), zero=st.booleans(), seed=SEEDS)
    def cache_alloc(self, which, zero, seed):
        c = self.caches[which]
        b = c.alloc(kmm.GFP_KERNEL | (ZERO if zero else 0))
        assert len(b) == CACHES[which][1]
        if zero:
            assert bytes(b) == bytes(len(b))
        self._add(b, which, self._fill(b, seed))

    @rule(data=st.data(), size=SIZES, gfp=st.sampled_from(GFPS), seed=SEEDS)
    def krealloc(self, data, size, gfp, seed):
        key = self._pick(data)
        if key is None:
            return
        block, cache, old = self.live[key]
        if cache is not None:
            # Not a kmalloc object: free it the right way and start a new one.
            self.caches[cache].free(block)
            del self.live[key]
            self.kmalloc(size, gfp, seed)
            return
        ks = self.m.ksize(block) if block.addr != kmm.ZERO_SIZE_PTR else 0
        new = self.m.krealloc(block, size, gfp)
        del self.live[key]
        assert len(new) == size
        if size == 0:
            assert new.addr == kmm.ZERO_SIZE_PTR
            assert not block.alive_ or block.addr == kmm.ZERO_SIZE_PTR
            self._add(new, None, b"")
            return
        if 0 < size <= ks:
            assert new.addr == block.addr  # fits: stays in place
        keep = min(len(old), size)
        assert new[:keep] == old[:keep]
        if new.addr != block.addr and block.addr != kmm.ZERO_SIZE_PTR:
            assert not block.alive_
        self._add(new, None, self._fill(new, seed))

    @rule(data=st.data())
    def free(self, data):
        key = self._pick(data)
        if key is None:
            return
        block, cache, _ = self.live.pop(key)
        if cache is None:
            self.m.kfree(block)
        else:
            self.caches[cache].free(block)
        if block.addr != kmm.ZERO_SIZE_PTR:
            assert not block.alive_

    @rule(data=st.data(), seed=SEEDS)
    def rewrite(self, data, seed):
        key = self._pick(data)
        if key is not None:
            self.live[key][2] = self._fill(self.live[key][0], seed)

    @rule(which=st.integers(0, len(CACHES) - 1))
    def shrink(self, which):
        c = self.caches[which]
        in_use = c.objects_in_use()
        c.shrink()
        assert c.objects_in_use() == in_use

    @invariant()
    def live_objects_are_disjoint_and_intact(self):
        spans = []
        for block, cache, data in self.live.values():
            if block.addr == kmm.ZERO_SIZE_PTR:
                assert len(block) == 0
                continue
            assert block.alive_
            assert bytes(block) == data
            ks = self.m.ksize(block)
            assert ks >= len(block)
            spans.append((block.addr, block.addr + ks))
        spans.sort()
        for (a0, a1), (b0, _) in zip(spans, spans[1:]):
            assert a1 <= b0, (hex(a0), hex(a1), hex(b0))
        for i, c in enumerate(self.caches):
            assert c.objects_in_use() == sum(1 for _, k, _ in self.live.values() if k == i)

    @invariant()
    def healthy(self):
        assert self.m.check() == []

    def teardown(self):
        for block, cache, _ in self.live.values():
            if cache is None:
                self.m.kfree(block)
            else:
                self.caches[cache].free(block)
        self.live.clear()
        for c in self.m.caches:  # ours and every kmalloc cache
            c.shrink()
            assert c.objects_in_use() == 0, c.name
        assert self.m.check() == []
        assert free_pages(self.m) == self.free0
        assert buddyinfo(self.m) == self.buddy0


SlabMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSlabMachine = SlabMachine.TestCase
