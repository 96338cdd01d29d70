"""Simulated CPUs and execution contexts: on_cpu binding, get_cpu/put_cpu,
preempt-disabled, atomic and hard-irq sections, the kernel's
"sleeping function called from invalid context" report for blocking calls
made there, and the per-CPU page lists (struct per_cpu_pages).

Expected values come from the kernel (6.18): include/linux/preempt.h for the
preempt_count layout, kernel/sched/core.c __might_sleep for the report,
include/linux/gfp.h gfpflags_allow_blocking for which masks may sleep, and
mm/page_alloc.c (zone_batchsize, zone_highsize, nr_pcp_alloc,
free_frozen_page_commit, free_pcppages_bulk) for the per-CPU lists, computed
independently here.
"""

from __future__ import annotations

import re

import pytest

import kmm
from conftest import assert_healthy, buddyinfo, free_pages

HARDIRQ_OFFSET = 1 << 16
PREEMPT_OFFSET = 1
SLEEP_BUG = "BUG: sleeping function called from invalid context"


def snapshot(m: kmm.Machine):
    """Everything a refused call must leave alone (buddyinfo drains the pcp lists)."""
    return buddyinfo(m), m.proc.slabinfo(), free_pages(m), m.nr_free_pages() + m.nr_pcp_pages()


def pagesets(m: kmm.Machine, zone: str) -> dict[int, dict[str, int]]:
    """The `pagesets` block of one zone in /proc/zoneinfo: cpu -> fields."""
    text = m.proc.zoneinfo()
    blocks = re.split(r"^Node 0, zone\s+", text, flags=re.M)
    block = next(b for b in blocks if b.split("\n", 1)[0].strip() == zone)
    out: dict[int, dict[str, int]] = {}
    cpu = None
    in_sets = False
    for line in block.splitlines():
        s = line.strip()
        if s == "pagesets":
            in_sets = True
            continue
        if not in_sets:
            continue
        if s.startswith("cpu:"):
            cpu = int(s.split()[1])
            out[cpu] = {}
        elif s.startswith("vm stats threshold") or cpu is None:
            continue
        elif s.startswith("node_unreclaimable"):
            break
        else:
            k, v = s.split(":")
            out[cpu][k.strip()] = int(v)
    return out


def zone(m: kmm.Machine, name: str) -> kmm.Zone:
    return next(z for z in m.zones if z.name == name)


def kernel_zone_batchsize(managed: int, page_size: int = 4096) -> int:
    """mm/page_alloc.c zone_batchsize (CONFIG_MMU), then max(1, batch) as in
    zone_set_pageset_high_and_batch."""
    b = min(managed >> 10, (1 << 20) // page_size) // 4
    if b < 1:
        b = 1
    x = b + b // 2
    p = 1
    while p * 2 <= x:
        p *= 2
    return max(1, p - 1)


def kernel_zone_highsize(total_pages: int, batch: int, cpus: int) -> int:
    """zone_highsize: total / nr_split_cpus, at least batch << 2."""
    return max(total_pages // cpus, batch << 2)


# ---- on_cpu ---------------------------------------------------------------------------------


def test_on_cpu_binds_the_thread(m):
    with m.on_cpu(1) as cpu:
        assert cpu == 1
        assert m.smp_processor_id() == 1
    with m.on_cpu(0) as cpu:
        assert cpu == 0
        assert m.smp_processor_id() == 0
    assert_healthy(m)


def test_on_cpu_nests_on_the_same_cpu_and_refuses_another(m):
    with m.on_cpu(1):
        with m.on_cpu(1):
            assert m.smp_processor_id() == 1
        # The outer binding is still in force after the inner one ends.
        assert m.smp_processor_id() == 1
        with pytest.raises(ValueError):
            with m.on_cpu(0):
                pass
        assert m.smp_processor_id() == 1
    # Fully unbound now: binding CPU 0 works.
    with m.on_cpu(0):
        assert m.smp_processor_id() == 0
    assert_healthy(m)


@pytest.mark.parametrize("cpu", [2, 5, 1000])
def test_on_cpu_rejects_a_cpu_that_does_not_exist(m, cpu):
    with pytest.raises(ValueError):
        with m.on_cpu(cpu):
            pass
    with pytest.raises(ValueError):
        m.on_cpu(cpu).__enter__()
    # Nothing was bound: both CPUs can still be bound.
    with m.on_cpu(0):
        pass
    with m.on_cpu(1):
        pass


def test_on_cpu_ends_when_an_exception_leaves_the_block(m):
    with pytest.raises(RuntimeError):
        with m.on_cpu(1):
            raise RuntimeError("boom")
    # Not bound to 1 any more: binding 0 is allowed.
    with m.on_cpu(0):
        assert m.smp_processor_id() == 0
    with m.on_cpu(1):
        assert m.smp_processor_id() == 1
    assert_healthy(m)


def test_single_cpu_machine_runs_everything_on_cpu_0():
    m = kmm.Machine(memory="64M", cpus=1)
    assert m.smp_processor_id() == 0
    with m.on_cpu(0):
        assert m.smp_processor_id() == 0
    with pytest.raises(ValueError):
        m.on_cpu(1)


# ---- get_cpu / put_cpu and preempt_count ----------------------------------------------------


def test_get_cpu_put_cpu_count_and_balance(m):
    assert m.preempt_count() == 0
    assert not m.in_atomic()
    cpu = m.get_cpu()
    assert cpu == m.smp_processor_id()
    assert cpu in (0, 1)
    assert m.preempt_count() == 1
    assert m.in_atomic()
    assert not m.in_interrupt()
    assert not m.irqs_disabled()
    assert m.get_cpu() == cpu  # nested: the same CPU
    assert m.preempt_count() == 2
    m.put_cpu()
    assert m.preempt_count() == 1
    assert m.in_atomic()
    m.put_cpu()
    assert m.preempt_count() == 0
    assert not m.in_atomic()
    with pytest.raises(kmm.KmmError):
        m.put_cpu()  # unbalanced
    assert m.preempt_count() == 0
    assert_healthy(m)


def test_get_cpu_on_a_bound_cpu(m):
    """get_cpu() on a thread pinned to CPU 1 is CPU 1; atomic allocations there
    use CPU 1's per-CPU list."""
    with m.on_cpu(1):
        assert m.get_cpu() == 1
        assert m.preempt_count() == 1 and m.in_atomic()
        with pytest.raises(kmm.SleepInAtomicError):
            m.alloc_pages(kmm.GFP_KERNEL)
        p = m.alloc_pages(kmm.GFP_ATOMIC)
        sets = pagesets(m, p.zone)
        assert sets[1]["count"] > 0 and sets[0]["count"] == 0
        m.free_pages(p)
        m.put_cpu()
        assert m.preempt_count() == 0
        assert m.smp_processor_id() == 1
    assert_healthy(m)


def test_preempt_disable_enable_pair_and_unbalanced_enable(m):
    m.preempt_disable()
    assert m.preempt_count() == PREEMPT_OFFSET and m.in_atomic()
    m.preempt_enable()
    assert m.preempt_count() == 0 and not m.in_atomic()
    with pytest.raises(kmm.KmmError):
        m.preempt_enable()
    assert m.preempt_count() == 0


@pytest.mark.parametrize("ctx", ["get_cpu", "preempt_disabled", "atomic"])
def test_atomic_contexts_count_one(m, ctx):
    if ctx == "get_cpu":
        cpu = m.get_cpu()
    else:
        cpu = getattr(m, ctx)().__enter__()
    try:
        assert cpu == m.smp_processor_id()
        assert m.preempt_count() == 1
        assert m.in_atomic()
        assert not m.in_interrupt()
        assert not m.irqs_disabled()
    finally:
        m.put_cpu()
    assert m.preempt_count() == 0 and not m.in_atomic()


def test_irq_context_fields(m):
    assert not m.in_interrupt() and not m.irqs_disabled()
    with m.irq() as cpu:
        assert cpu == m.smp_processor_id()
        assert m.in_interrupt()
        assert m.irqs_disabled()
        assert m.in_atomic()
        assert m.preempt_count() == HARDIRQ_OFFSET
    assert m.preempt_count() == 0
    assert not m.in_interrupt() and not m.irqs_disabled() and not m.in_atomic()


def test_contexts_nest_and_add_up(m):
    with m.atomic():
        with m.irq():
            assert m.preempt_count() == HARDIRQ_OFFSET + PREEMPT_OFFSET
            assert m.in_interrupt() and m.irqs_disabled()
            with m.preempt_disabled():
                assert m.preempt_count() == HARDIRQ_OFFSET + 2 * PREEMPT_OFFSET
            assert m.preempt_count() == HARDIRQ_OFFSET + PREEMPT_OFFSET
        assert m.preempt_count() == PREEMPT_OFFSET
        assert not m.in_interrupt() and not m.irqs_disabled()
    assert m.preempt_count() == 0


@pytest.mark.parametrize("ctx", ["preempt_disabled", "atomic", "irq"])
def test_contexts_end_when_an_exception_leaves_the_block(m, ctx):
    with pytest.raises(RuntimeError):
        with getattr(m, ctx)():
            raise RuntimeError("boom")
    assert m.preempt_count() == 0
    assert not m.in_atomic() and not m.in_interrupt() and not m.irqs_disabled()
    # And the context is really gone: a sleeping allocation is allowed again.
    p = m.alloc_pages(kmm.GFP_KERNEL)
    m.free_pages(p)
    with pytest.raises(kmm.KmmError):
        m.put_cpu()
    assert_healthy(m)


def test_put_cpu_does_not_leave_an_irq_section(m):
    # put_cpu subtracts from the preempt field only; inside irq() that field is 0.
    with m.irq():
        with pytest.raises(kmm.KmmError):
            m.put_cpu()
        assert m.preempt_count() == HARDIRQ_OFFSET
        assert m.in_interrupt()
    assert m.preempt_count() == 0


# ---- sleeping in atomic context -------------------------------------------------------------

SLEEPING = {
    "GFP_KERNEL": kmm.GFP_KERNEL,
    "GFP_NOFS": kmm.GFP_NOFS,
    "GFP_NOIO": kmm.GFP_NOIO,
    "GFP_USER": kmm.GFP_USER,
    "GFP_HIGHUSER_MOVABLE": kmm.GFP_HIGHUSER_MOVABLE,
    "GFP_KERNEL_ACCOUNT": kmm.GFP_KERNEL_ACCOUNT,
}
NON_SLEEPING = {"GFP_ATOMIC": kmm.GFP_ATOMIC, "GFP_NOWAIT": kmm.GFP_NOWAIT}


def enter(m: kmm.Machine, ctx: str) -> None:
    if ctx == "get_cpu":
        m.get_cpu()
    elif ctx == "irq":
        m.irq().__enter__()
    else:
        getattr(m, ctx)().__enter__()


def leave(m: kmm.Machine, ctx: str) -> None:
    if ctx == "get_cpu":
        m.put_cpu()
    elif ctx == "irq":
        m.irq().__exit__(None, None, None)
    else:
        getattr(m, ctx)().__exit__(None, None, None)


def check_sleep_bug(e: pytest.ExceptionInfo, irqs_off: bool, count: int) -> None:
    msg = str(e.value)
    assert msg.startswith(SLEEP_BUG), msg
    assert "in_atomic(): 1" in msg
    assert f"irqs_disabled(): {int(irqs_off)}" in msg
    assert f"preempt_count: {count:x}" in msg
    assert isinstance(e.value, kmm.KmmError)


CONTEXTS = [("get_cpu", False, 1), ("preempt_disabled", False, 1), ("atomic", False, 1), ("irq", True, HARDIRQ_OFFSET)]


@pytest.mark.parametrize("ctx,irqs_off,count", CONTEXTS)
def test_blocking_allocations_refused_in_atomic_context(m, ctx, irqs_off, count):
    cache = m.kmem_cache_create("t_atomic", 100)
    held = cache.alloc(kmm.GFP_KERNEL)  # a slab exists, so a refusal is not just "no memory"
    before = snapshot(m)
    enter(m, ctx)
    try:
        assert m.in_atomic()
        for name, gfp in SLEEPING.items():
            calls = [
                lambda: m.alloc_pages(gfp),
                lambda: m.alloc_pages(gfp, 3),
                lambda: m.alloc_page(gfp),
                lambda: m.get_free_pages(gfp & ~kmm.__GFP_HIGHMEM, 1),
                lambda: m.get_zeroed_page(gfp & ~kmm.__GFP_HIGHMEM),
                lambda: m.kmalloc(64, gfp),
                lambda: m.kzalloc(200, gfp),
                lambda: m.kcalloc(4, 16, gfp),
                lambda: m.kmalloc(20000, gfp),  # large: straight to the page allocator
                lambda: cache.alloc(gfp),
                lambda: m.kmem_cache_alloc(cache, gfp),
                lambda: cache.alloc_bulk(gfp, 10),
            ]
            for call in calls:
                with pytest.raises(kmm.SleepInAtomicError) as e:
                    call()
                check_sleep_bug(e, irqs_off, count)
        assert m.preempt_count() == count  # a refusal does not leave the context
    finally:
        leave(m, ctx)
    assert m.preempt_count() == 0
    assert snapshot(m) == before
    assert_healthy(m)
    cache.free(held)


@pytest.mark.parametrize("ctx,irqs_off,count", CONTEXTS)
def test_non_blocking_allocations_work_in_atomic_context(m, ctx, irqs_off, count):
    cache = m.kmem_cache_create("t_atomic_ok", 100)
    before_free = free_pages(m)
    enter(m, ctx)
    try:
        for gfp in NON_SLEEPING.values():
            p = m.alloc_pages(gfp)
            p3 = m.alloc_pages(gfp, 2)
            b = m.kmalloc(64, gfp)
            big = m.kmalloc(20000, gfp)
            o = cache.alloc(gfp)
            objs = cache.alloc_bulk(gfp, 5)
            b[:5] = b"hello"
            assert bytes(b[:5]) == b"hello"
            # Frees are fine in atomic context too.
            cache.free_bulk(objs)
            cache.free(o)
            m.kfree(big)
            m.kfree(b)
            m.free_pages(p3, 2)
            m.free_pages(p)
        assert m.preempt_count() == count
    finally:
        leave(m, ctx)
    for c in m.caches:  # kmalloc-64's new slab too
        c.shrink()
    assert free_pages(m) == before_free
    assert_healthy(m)


@pytest.mark.parametrize("ctx,irqs_off,count", CONTEXTS)
def test_cache_management_takes_a_mutex(m, ctx, irqs_off, count):
    cache = m.kmem_cache_create("t_mutex", 88)  # 72 would merge into vmap_area, as in the kernel
    obj = cache.alloc(kmm.GFP_KERNEL)
    names_before = [c.name for c in m.caches]
    before = snapshot(m)
    enter(m, ctx)
    try:
        for call in (
            lambda: m.kmem_cache_create("t_mutex_new", 80),
            lambda: cache.shrink(),
            lambda: m.kmem_cache_shrink(cache),
            lambda: cache.destroy(),
            lambda: m.kmem_cache_destroy(cache),
        ):
            with pytest.raises(kmm.SleepInAtomicError) as e:
                call()
            check_sleep_bug(e, irqs_off, count)
    finally:
        leave(m, ctx)
    assert [c.name for c in m.caches] == names_before
    assert m.kmem_cache("t_mutex_new") is None
    assert not cache.destroyed
    assert snapshot(m) == before
    # The cache is intact and usable.
    cache.free(obj)
    o2 = cache.alloc(kmm.GFP_KERNEL)
    cache.free(o2)
    cache.destroy()
    assert cache.destroyed
    assert_healthy(m)


def test_refusal_inside_irq_is_a_sleep_bug_with_irqs_disabled(m):
    with m.irq():
        with pytest.raises(kmm.SleepInAtomicError) as e:
            m.kmalloc(64, kmm.GFP_KERNEL)
        check_sleep_bug(e, True, HARDIRQ_OFFSET)
        blk = m.kmalloc(64, kmm.GFP_ATOMIC)
        m.kfree(blk)


def test_blocking_allocations_work_again_after_the_context(m):
    with m.atomic():
        with pytest.raises(kmm.SleepInAtomicError):
            m.kmalloc(64, kmm.GFP_KERNEL)
    b = m.kmalloc(64, kmm.GFP_KERNEL)
    p = m.alloc_pages(kmm.GFP_KERNEL, 1)
    m.kfree(b)
    m.free_pages(p, 1)
    c = m.kmem_cache_create("t_after", 48)
    c.destroy()
    assert_healthy(m)


# ---- per-CPU page lists ---------------------------------------------------------------------


def test_pcp_sizes_follow_zone_batchsize_and_zone_highsize():
    for memory, cpus in (("1G", 2), ("4G", 4), ("64M", 1), ("256M", 3)):
        m = kmm.Machine(memory=memory, cpus=cpus)
        checked = 0
        for z in m.zones:
            if z.managed == 0:
                continue
            sets = pagesets(m, z.name)
            assert sorted(sets) == list(range(cpus)), z.name
            batch = kernel_zone_batchsize(z.managed)
            high_min = kernel_zone_highsize(z.low, batch, cpus)
            high_max = kernel_zone_highsize(z.managed // 8, batch, cpus)
            for cpu, f in sets.items():
                assert f["batch"] == batch, (memory, z.name, cpu)
                assert f["high_min"] == high_min, (memory, z.name, cpu)
                assert f["high_max"] == high_max, (memory, z.name, cpu)
                assert f["count"] == 0  # nothing allocated yet
            checked += 1
        assert checked >= 2


def test_pcp_sizes_of_the_default_machine(m):
    z = zone(m, "DMA32")
    sets = pagesets(m, "DMA32")
    # 1G machine: DMA32 managed 258048 -> 252 >> 2 = 63 -> rounddown_pow2(94) - 1 = 63.
    assert z.managed == 258048
    for f in sets.values():
        assert f["batch"] == 63
        assert f["high_min"] == z.low // 2
        assert f["high_max"] == 258048 // 8 // 2
    d = pagesets(m, "DMA")
    # DMA: managed >> 10 = 3, / 4 = 0 -> 1 -> rounddown_pow2(1) - 1 = 0 -> max(1, 0) = 1.
    assert all(f["batch"] == 1 for f in d.values())


def test_first_order0_allocation_refills_one_batch(m):
    """nr_pcp_alloc on a fresh pageset: high is clamped to high_min, grows by a
    batch (ZONE_BELOW_HIGH clear), and the refill is one batch (63 pages)."""
    z = zone(m, "DMA32")
    boot_free = m.nr_free_pages()
    with m.on_cpu(0):
        p = m.alloc_pages(kmm.GFP_KERNEL)
    assert p.zone == "DMA32"
    sets = pagesets(m, "DMA32")
    assert sets[0]["count"] == 62
    assert sets[0]["high"] == z.low // 2 + 63
    assert sets[1]["count"] == 0
    assert m.nr_pcp_pages() == 62
    # Pages on the per-CPU lists are not counted free in the zone (rmqueue_bulk).
    assert m.nr_free_pages() == boot_free - 63
    assert free_pages(m) == boot_free - 1
    with m.on_cpu(0):
        m.free_pages(p)
    assert pagesets(m, "DMA32")[0]["count"] == 63
    assert free_pages(m) == boot_free
    assert_healthy(m)


def test_order0_free_goes_to_the_pcp_list_and_drain_restores_buddy(m):
    before = buddyinfo(m)
    before_free = free_pages(m)
    p = m.alloc_pages(kmm.GFP_KERNEL)
    m.free_pages(p)
    assert m.nr_pcp_pages() > 0
    pg = m.pfn_to_page(p.pfn)
    assert pg.refcount == 0
    assert free_pages(m) == before_free
    assert buddyinfo(m) == before  # drained
    assert m.nr_pcp_pages() == 0
    assert m.nr_free_pages() == before_free
    assert_healthy(m)


def test_high_orders_bypass_the_pcp_lists(m):
    before = buddyinfo(m)
    # Order 4 is above PAGE_ALLOC_COSTLY_ORDER and not the pageblock order.
    p = m.alloc_pages(kmm.GFP_KERNEL, 4)
    assert m.nr_pcp_pages() == 0
    m.free_pages(p, 4)
    assert m.nr_pcp_pages() == 0
    # Order 3 is pcp-sized.
    q = m.alloc_pages(kmm.GFP_KERNEL, 3)
    assert m.nr_pcp_pages() > 0
    assert m.nr_pcp_pages() % 8 == 0
    m.free_pages(q, 3)
    assert buddyinfo(m) == before
    assert_healthy(m)


def test_drain_all_pages_emits_one_pcpu_drain_event_per_page(m):
    pages = [m.alloc_pages(kmm.GFP_KERNEL) for _ in range(10)]
    for p in pages:
        m.free_pages(p)
    on_lists = m.nr_pcp_pages()
    assert on_lists > 0
    mts = {name: i for i, name in enumerate(kmm._kmm.MIGRATETYPE_NAMES)}
    expect_mt = {p.pfn: mts[m.pfn_to_page(p.pfn).migratetype] for p in pages}
    with m.trace.record("kmem:mm_page_pcpu_drain") as rec:
        m.drain_all_pages()
    events = rec.events
    assert len(events) == on_lists
    assert m.nr_pcp_pages() == 0
    pat = re.compile(r"page=0x([0-9a-f]+) pfn=0x([0-9a-f]+) order=0 migratetype=(\d+)")
    seen = {}
    for e in events:
        assert e.name == "kmem:mm_page_pcpu_drain"
        mo = pat.fullmatch(e.text)
        assert mo, e.text
        pfn = int(mo.group(2), 16)
        assert e["pfn"] == pfn and e["order"] == 0
        assert int(mo.group(3)) == e["migratetype"]
        assert pfn not in seen
        seen[pfn] = e["migratetype"]
    # Every page we freed was drained, with its pageblock's migratetype.
    for pfn, mt in expect_mt.items():
        assert seen[pfn] == mt
    # Nothing more to drain.
    with m.trace.record("kmem:mm_page_pcpu_drain") as rec2:
        m.drain_all_pages()
    assert len(rec2) == 0
    assert_healthy(m)


def test_drain_local_pages_drains_only_this_cpu(m):
    with m.on_cpu(0):
        a = m.alloc_pages(kmm.GFP_KERNEL)
        m.free_pages(a)
    with m.on_cpu(1):
        b = m.alloc_pages(kmm.GFP_KERNEL)
        m.free_pages(b)
    sets = pagesets(m, "DMA32")
    assert sets[0]["count"] > 0 and sets[1]["count"] > 0
    with m.on_cpu(1):
        with m.trace.record("kmem:mm_page_pcpu_drain") as rec:
            m.drain_local_pages()
    sets2 = pagesets(m, "DMA32")
    assert sets2[1]["count"] == 0
    assert sets2[0]["count"] == sets[0]["count"]
    assert len(rec) == sets[1]["count"]
    assert b.pfn in {e["pfn"] for e in rec.events}
    assert_healthy(m)


def test_the_freeing_cpu_gets_the_page_lifo(m):
    with m.on_cpu(1):
        p = m.alloc_pages(kmm.GFP_KERNEL)
        m.free_pages(p)
    assert pagesets(m, "DMA32")[1]["count"] > 0
    # Another CPU's allocation does not see CPU 1's list.
    with m.on_cpu(0):
        q = m.alloc_pages(kmm.GFP_KERNEL)
    assert q.pfn != p.pfn
    # CPU 1 gets its most recently freed page back (head of the list).
    with m.on_cpu(1):
        r = m.alloc_pages(kmm.GFP_KERNEL)
    assert r.pfn == p.pfn
    # A page freed on cpu 0 but allocated first on cpu 1 lands on cpu 0's list.
    with m.on_cpu(0):
        m.free_pages(r)
    with m.on_cpu(0):
        s = m.alloc_pages(kmm.GFP_KERNEL)
    assert s.pfn == r.pfn
    with m.on_cpu(1):
        t = m.alloc_pages(kmm.GFP_KERNEL)
    assert t.pfn != s.pfn
    for x in (q, s, t):
        m.free_pages(x)
    assert_healthy(m)


def test_lifo_order_of_several_frees(m):
    with m.on_cpu(1):
        pages = [m.alloc_pages(kmm.GFP_KERNEL) for _ in range(5)]
        for p in pages:
            m.free_pages(p)
        again = [m.alloc_pages(kmm.GFP_KERNEL) for _ in range(5)]
    assert [p.pfn for p in again] == [p.pfn for p in reversed(pages)]
    for p in again:
        m.free_pages(p)
    assert_healthy(m)


def test_pcp_list_is_per_migratetype(m):
    with m.on_cpu(0):
        p = m.alloc_pages(kmm.GFP_KERNEL)  # unmovable
        m.free_pages(p)
        q = m.alloc_pages(kmm.GFP_HIGHUSER_MOVABLE)  # movable list: not p
        r = m.alloc_pages(kmm.GFP_KERNEL)
    assert q.pfn != p.pfn
    assert r.pfn == p.pfn
    m.free_pages(q)
    m.free_pages(r)
    assert_healthy(m)


def test_pcp_lists_drain_in_batches_past_high(m):
    """free_frozen_page_commit: once count reaches high, a batch drains back."""
    with m.on_cpu(0):
        pages = [m.alloc_pages(kmm.GFP_KERNEL) for _ in range(20000)]
        for p in pages:
            m.free_pages(p)
        sets = pagesets(m, "DMA32")
    # The list never holds more than high_max pages.
    assert sets[0]["count"] <= sets[0]["high_max"]
    assert sets[0]["count"] > 0
    assert m.nr_pcp_pages() == sum(f["count"] for z in ("DMA", "DMA32") for f in pagesets(m, z).values())
    before = free_pages(m)
    with m.trace.record("kmem:mm_page_pcpu_drain") as rec:
        m.drain_all_pages()
    assert len(rec) == sets[0]["count"]
    assert free_pages(m) == before
    assert_healthy(m)


def test_cpu_stats_shape(m):
    stats = m.cpu_stats()
    assert len(stats) == m.cpus == 2
    with m.on_cpu(1):
        pass
    after = m.cpu_stats()
    assert after[1][0] >= stats[1][0] + 1  # a claim was taken on cpu 1
