"""Fault injection: failslab and fail_page_alloc (lib/fault-inject.c,
mm/failslab.c, mm/fail_page_alloc.c), from the command line and at run time.

Expected values follow the kernel's rules, computed here independently:
``should_fail_ex`` tests probability != 0, times != 0, then space (a call
smaller than the space left takes its size off and passes), then interval
(only every interval-th call counted that far may fail), then the random
draw; ``fail_dump`` prints times before it is counted down.
"""

from __future__ import annotations

import logging

import pytest

import kmm

ATOMIC = kmm.GFP_ATOMIC


def state(m: kmm.Machine) -> tuple:
    """The machine's accounting as /proc and the allocator counters show it."""
    return (
        m.nr_free_pages(),
        m.nr_pcp_pages(),
        m.proc.meminfo_dict(),
        m.proc.vmstat_dict(),
        m.proc.slabinfo(),
        m.proc.buddyinfo(),
        [(z.name, z.free_pages, z.pgalloc, z.pgfree) for z in m.zones],
    )


def arm(m: kmm.Machine, name: str, **attrs: int | bool) -> kmm.FaultAttr:
    a = m.fault_attr(name)
    for k, v in {"probability": 100, "times": -1, "ignore_gfp_wait": False, **attrs}.items():
        setattr(a, k, v)
    return a


def outcome(call) -> bool:
    """True when the call raised OutOfMemoryError."""
    try:
        call()
    except kmm.OutOfMemoryError:
        return True
    return False


# ---- defaults and the command line -------------------------------------------------


def test_defaults_are_the_kernels():
    m = kmm.Machine()
    fs, fpa = m.fault_attr("failslab"), m.fault_attr("fail_page_alloc")
    # FAULT_ATTR_INITIALIZER: interval 1, times 1, verbose 2; probability 0.
    for a in (fs, fpa):
        assert (a.probability, a.interval, a.times, a.space, a.verbose) == (0, 1, 1, 0, 2)
        assert a.ignore_gfp_wait is True
    assert fs.cache_filter is False
    assert fpa.ignore_gfp_highmem is True and fpa.min_order == 1
    assert fs.files() == ["probability", "interval", "times", "space", "verbose", "ignore-gfp-wait", "cache-filter"]
    assert fpa.files() == [
        "probability", "interval", "times", "space", "verbose",
        "ignore-gfp-wait", "ignore-gfp-highmem", "min-order",
    ]
    # Each attribute has only its own wrapper's files.
    with pytest.raises(AttributeError, match="min-order"):
        fs.min_order
    with pytest.raises(AttributeError, match="cache-filter"):
        fpa.cache_filter = True
    assert not hasattr(fs, "ignore_gfp_highmem")
    # Off: nothing fails.
    for _ in range(50):
        m.kfree(m.kmalloc(64, ATOMIC))
        m.free_pages(m.alloc_pages(ATOMIC, 1), 1)


def test_cmdline_sets_interval_probability_space_times():
    m = kmm.Machine(cmdline="failslab=3,40,100,7 fail_page_alloc=2,100,0,-1")
    fs, fpa = m.fault_attr("failslab"), m.fault_attr("fail_page_alloc")
    assert (fs.interval, fs.probability, fs.space, fs.times) == (3, 40, 100, 7)
    assert (fpa.interval, fpa.probability, fpa.space, fpa.times) == (2, 100, 0, -1)
    # The wrapper's switches keep their defaults.
    assert fs.verbose == 2 and fs.ignore_gfp_wait and fpa.min_order == 1
    assert m.cmdline == "failslab=3,40,100,7 fail_page_alloc=2,100,0,-1"
    # fail_page_alloc at interval 2, probability 100: every second atomic order-1 call fails.
    got = [outcome(lambda: m.free_pages(m.alloc_pages(ATOMIC, 1), 1)) for _ in range(6)]
    assert got == [False, True, False, True, False, True]
    assert m.check() == []


def test_machine_boots_with_everything_armed():
    m = kmm.Machine(cmdline="failslab=1,100,0,-1 fail_page_alloc=1,100,0,-1")
    assert m.check() == []
    assert outcome(lambda: m.kmalloc(8, ATOMIC))
    assert outcome(lambda: m.alloc_pages(ATOMIC, 3))


# ---- probability, times, interval, space ----------------------------------------------


def test_probability_100_fails_every_call():
    m = kmm.Machine()
    arm(m, "failslab")
    c = m.kmem_cache_create("fi_obj", 200)
    for _ in range(100):
        assert outcome(lambda: m.kmalloc(64))
        assert outcome(lambda: c.alloc())
        assert outcome(lambda: m.kzalloc(3000, ATOMIC))
        assert outcome(lambda: c.alloc_bulk(kmm.GFP_KERNEL, 10))
    arm(m, "fail_page_alloc")
    for order in (1, 2, 5):
        for _ in range(30):
            assert outcome(lambda: m.alloc_pages(kmm.GFP_KERNEL, order))
            assert outcome(lambda: m.get_free_pages(ATOMIC, order))
    # kmalloc beyond the slab classes takes pages (order 1 for 8193 bytes).
    m.fault_attr("failslab").probability = 0
    assert outcome(lambda: m.kmalloc(8193))
    assert m.check() == []


def test_times_counts_failures_down():
    m = kmm.Machine()
    a = arm(m, "failslab", times=3)
    got = [outcome(lambda: m.kfree(m.kmalloc(32))) for _ in range(8)]
    assert got == [True, True, True, False, False, False, False, False]
    assert a.times == 0
    # -1: no limit, and it stays -1.
    a.times = -1
    assert all(outcome(lambda: m.kmalloc(32)) for _ in range(20))
    assert a.times == -1


def test_default_times_is_one():
    m = kmm.Machine()
    m.fault_attr("failslab").probability = 100  # ignore-gfp-wait on: atomic requests only
    got = [outcome(lambda: m.kfree(m.kmalloc(16, ATOMIC))) for _ in range(4)]
    assert got == [True, False, False, False]


def test_interval():
    m = kmm.Machine()
    arm(m, "failslab", interval=4)
    got = [outcome(lambda: m.kfree(m.kmalloc(32))) for _ in range(13)]
    # attr->count counts each call that reached the interval test.
    assert [i for i, f in enumerate(got) if f] == [i for i in range(13) if (i + 1) % 4 == 0]


def kernel_space_rule(space: int, size: int, n: int) -> list[bool]:
    """should_fail_ex's space test, probability 100 and no limit on times."""
    out = []
    for _ in range(n):
        if space > size:
            space -= size
            out.append(False)
        else:
            out.append(True)
    return out


def test_space_in_bytes_for_failslab():
    m = kmm.Machine()
    a = arm(m, "failslab", space=200)
    got = [outcome(lambda: m.kfree(m.kmalloc(64))) for _ in range(6)]
    # The size is the cache's object_size: kmalloc(64) comes from kmalloc-64.
    assert got == kernel_space_rule(200, 64, 6)
    assert a.space == 200 - 3 * 64


def test_space_in_pages_for_fail_page_alloc():
    m = kmm.Machine()
    a = arm(m, "fail_page_alloc", space=5)
    got = [outcome(lambda: m.free_pages(m.alloc_pages(kmm.GFP_KERNEL, 1), 1)) for _ in range(4)]
    assert got == kernel_space_rule(5, 2, 4)
    assert a.space == 1


def test_min_order():
    m = kmm.Machine()
    arm(m, "fail_page_alloc")
    # min-order 1 by default: order 0 is left alone.
    m.free_pages(m.alloc_pages(kmm.GFP_KERNEL, 0), 0)
    assert outcome(lambda: m.alloc_pages(kmm.GFP_KERNEL, 1))
    m.fault_attr("fail_page_alloc").min_order = 3
    for order in (0, 1, 2):
        m.free_pages(m.alloc_pages(kmm.GFP_KERNEL, order), order)
    for order in (3, 4, 10):
        assert outcome(lambda: m.alloc_pages(kmm.GFP_KERNEL, order))
    m.fault_attr("fail_page_alloc").min_order = 0
    assert outcome(lambda: m.alloc_pages(kmm.GFP_KERNEL, 0))


def test_ignore_gfp_wait_and_nofail():
    m = kmm.Machine()
    for name in ("failslab", "fail_page_alloc"):
        arm(m, name, ignore_gfp_wait=True)
    # GFP_KERNEL may reclaim (__GFP_DIRECT_RECLAIM): left alone.
    m.kfree(m.kmalloc(64, kmm.GFP_KERNEL))
    m.free_pages(m.alloc_pages(kmm.GFP_KERNEL, 2), 2)
    # GFP_ATOMIC and GFP_NOWAIT may not: they fail.
    for gfp in (kmm.GFP_ATOMIC, kmm.GFP_NOWAIT):
        assert outcome(lambda: m.kmalloc(64, gfp))
        assert outcome(lambda: m.alloc_pages(gfp, 2))
    # __GFP_NOFAIL is never failed.
    m.kfree(m.kmalloc(64, kmm.GFP_ATOMIC | kmm.__GFP_NOFAIL))
    m.free_pages(m.alloc_pages(kmm.GFP_ATOMIC | kmm.__GFP_NOFAIL, 2), 2)
    for name in ("failslab", "fail_page_alloc"):
        m.fault_attr(name).ignore_gfp_wait = False
    assert outcome(lambda: m.kmalloc(64, kmm.GFP_KERNEL))
    assert outcome(lambda: m.alloc_pages(kmm.GFP_KERNEL, 2))


def test_ignore_gfp_highmem():
    m = kmm.Machine(arch="i386", memory="2G")
    a = arm(m, "fail_page_alloc")
    # Default on: __GFP_HIGHMEM requests pass.
    m.free_pages(m.alloc_pages(kmm.GFP_HIGHUSER, 1), 1)
    assert outcome(lambda: m.alloc_pages(kmm.GFP_KERNEL, 1))
    a.ignore_gfp_highmem = False
    assert outcome(lambda: m.alloc_pages(kmm.GFP_HIGHUSER, 1))
    assert m.check() == []


def test_cache_filter_and_slab_failslab():
    m = kmm.Machine(cmdline="slub_debug=A,fi_marked")
    a = arm(m, "failslab", cache_filter=True)
    marked = m.kmem_cache_create("fi_marked", 48)
    flagged = m.kmem_cache_create("fi_flagged", 48, flags=kmm.SLAB_FAILSLAB)
    plain = m.kmem_cache_create("fi_plain", 48)
    assert m.sysfs_slab("fi_marked")["failslab"] == 1
    assert outcome(lambda: marked.alloc())
    assert outcome(lambda: flagged.alloc())
    plain.free(plain.alloc())
    m.kfree(m.kmalloc(48))
    a.cache_filter = False
    assert outcome(lambda: plain.alloc())


# ---- reproducible from the seed -------------------------------------------------------


def pattern(seed: int, n: int = 400, pages_between: bool = False) -> list[bool]:
    m = kmm.Machine(seed=seed)
    arm(m, "failslab", probability=50)
    if pages_between:
        arm(m, "fail_page_alloc", probability=50)
    out = []
    for _ in range(n):
        out.append(outcome(lambda: m.kfree(m.kmalloc(64))))
        if pages_between:
            try:
                m.free_pages(m.alloc_pages(kmm.GFP_KERNEL, 1), 1)
            except kmm.OutOfMemoryError:
                pass
    return out


def test_same_seed_same_failures_different_seed_different():
    a, b, c = pattern(11), pattern(11), pattern(12)
    assert a == b
    assert a != c
    # probability 50: about half fail (binomial, n=400: sd 10).
    assert 150 < sum(a) < 250 and 150 < sum(c) < 250


def test_each_attribute_has_its_own_stream():
    # fail_page_alloc's draws between failslab's do not move failslab's.
    assert pattern(5) == pattern(5, pages_between=True)


def test_probability_is_a_percentage():
    m = kmm.Machine(seed=3)
    arm(m, "failslab", probability=10)
    n = 5000
    got = sum(outcome(lambda: m.kfree(m.kmalloc(64))) for _ in range(n))
    # 10% of 5000 = 500, sd about 21.
    assert 400 < got < 600


# ---- exact accounting and the events --------------------------------------------------


def test_injected_failures_change_nothing():
    m = kmm.Machine()
    c = m.kmem_cache_create("fi_acct", 96)
    keep = [m.kmalloc(64), c.alloc(), m.alloc_pages(kmm.GFP_KERNEL, 2)]  # warm caches and lists
    arm(m, "failslab")
    arm(m, "fail_page_alloc", min_order=0)
    calls = {
        "kmalloc": lambda: m.kmalloc(64),
        "kzalloc": lambda: m.kzalloc(700),
        "kmalloc large": lambda: m.kmalloc(50_000),
        "kmem_cache_alloc": lambda: c.alloc(),
        "kmem_cache_alloc_bulk": lambda: c.alloc_bulk(kmm.GFP_KERNEL, 64),
        "alloc_pages 0": lambda: m.alloc_pages(kmm.GFP_KERNEL, 0),
        "alloc_pages 3": lambda: m.alloc_pages(kmm.GFP_KERNEL | kmm.__GFP_ZERO, 3),
        "__get_free_pages": lambda: m.__get_free_pages(kmm.GFP_ATOMIC, 1),
        "get_zeroed_page": lambda: m.get_zeroed_page(kmm.GFP_KERNEL),
        "krealloc": lambda: m.krealloc(keep[0], 1000),
    }
    for name, call in calls.items():
        before = state(m)
        with pytest.raises(kmm.OutOfMemoryError):
            call()
        assert state(m) == before, name
        assert m.check() == [], name
    # The block krealloc could not move is still live, and everything frees.
    assert m.ksize(keep[0]) == 64
    for name in ("failslab", "fail_page_alloc"):
        m.fault_attr(name).probability = 0
    m.kfree(keep[0])
    c.free(keep[1])
    m.free_pages(keep[2], 2)
    assert m.check() == []


def test_events_of_an_injected_failure():
    m = kmm.Machine()
    arm(m, "failslab")
    arm(m, "fail_page_alloc")
    with m.trace.record("kmem:*") as rec:
        for call in (lambda: m.kmalloc(64), lambda: m.alloc_pages(kmm.GFP_KERNEL, 2)):
            with pytest.raises(kmm.OutOfMemoryError):
                call()
    # trace_kmalloc runs with the NULL slab_alloc_node returned; the page
    # allocator returns before trace_mm_page_alloc.
    names = [e.name for e in rec.events]
    assert names == ["kmem:kmalloc"], names
    assert rec.events[0].fields["ptr"] == 0


# ---- the report ------------------------------------------------------------------------


def test_verbose_report_is_fail_dump(caplog):
    m = kmm.Machine()
    arm(m, "failslab", times=2)
    with caplog.at_level(logging.WARNING, logger="kmm"):
        with pytest.raises(kmm.OutOfMemoryError) as e:
            m.kmalloc(64)
    # times is printed before it is counted down.
    assert str(e.value).startswith(
        "FAULT_INJECTION: forcing a failure.\nname failslab, interval 1, probability 100, space 0, times 2\n"
    )
    assert "kmalloc-64" in str(e.value)
    assert "FAULT_INJECTION: forcing a failure." in caplog.text
    arm(m, "fail_page_alloc", interval=1)
    with pytest.raises(kmm.OutOfMemoryError) as e:
        m.alloc_pages(kmm.GFP_KERNEL, 3)
    lines = str(e.value).splitlines()
    assert lines[:2] == [
        "FAULT_INJECTION: forcing a failure.",
        "name fail_page_alloc, interval 1, probability 100, space 0, times -1",
    ]
    assert lines[2].startswith("page allocation failure: order:3, mode:0xcc0(GFP_KERNEL)")


def test_silent_when_not_verbose_or_nowarn(caplog):
    m = kmm.Machine()
    a = arm(m, "failslab", verbose=0)
    with pytest.raises(kmm.OutOfMemoryError) as e:
        m.kmalloc(64)
    assert "FAULT_INJECTION" not in str(e.value)
    a.verbose = 1
    caplog.clear()
    # __GFP_NOWARN: FAULT_NOWARN, no report (and nothing logged).
    with caplog.at_level(logging.WARNING, logger="kmm"):
        with pytest.raises(kmm.OutOfMemoryError) as e:
            m.kmalloc(64, kmm.GFP_KERNEL | kmm.__GFP_NOWARN)
    assert "FAULT_INJECTION" not in str(e.value)
    assert caplog.text == ""


# ---- the Python face --------------------------------------------------------------------


def test_debugfs_names_and_bad_values():
    m = kmm.Machine()
    a = m.fault_attr("fail_page_alloc")
    a["ignore-gfp-wait"] = False
    a["min-order"] = 2
    assert a.ignore_gfp_wait is False and a["min-order"] == 2 and a["ignore-gfp-highmem"] is True
    assert repr(a) == (
        "<FaultAttr fail_page_alloc: probability=0 interval=1 times=1 space=0 verbose=2 "
        "ignore-gfp-wait=N ignore-gfp-highmem=Y min-order=2>"
    )
    with pytest.raises(KeyError, match="cache-filter"):
        a["cache-filter"]
    with pytest.raises(ValueError, match="probability: -1 is out of range"):
        a.probability = -1
    with pytest.raises(ValueError, match="times: 4294967296 is out of range"):
        a.times = 1 << 32
    with pytest.raises(TypeError, match="must be an int"):
        a.probability = "10"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="must be an int, not bool"):
        a.interval = True
    with pytest.raises(ValueError):
        a.ignore_gfp_wait = 2  # type: ignore[assignment]
    with pytest.raises(AttributeError):
        del a.probability
    with pytest.raises(ValueError, match="failslab and fail_page_alloc"):
        m.fault_attr("fail_make_request")
    # Writes take effect on the machine, whichever handle made them.
    m.fault_attr("fail_page_alloc").probability = 7
    assert a.probability == 7
    assert m.check() == []


# ---- fail-nth ---------------------------------------------------------------------------


def test_fail_nth_fails_the_nth_point():
    m = kmm.Machine()
    m.fault_attr("failslab").ignore_gfp_wait = False
    assert m.fail_nth == 0
    m.fail_nth = 3
    got = [outcome(lambda: m.kfree(m.kmalloc(16))) for _ in range(6)]
    # Any probability (0 here): the third point fails, then nothing.
    assert got == [False, False, True, False, False, False]
    assert m.fail_nth == 0
    # Not reached: it reads how many points are left.
    m.fail_nth = 10
    for _ in range(4):
        m.kfree(m.kmalloc(16))
    assert m.fail_nth == 6
    m.fail_nth = 0
    assert m.check() == []
    # The wrapper still picks the points: with ignore-gfp-wait on, GFP_KERNEL is none.
    m.fault_attr("failslab").ignore_gfp_wait = True
    m.fail_nth = 1
    m.kfree(m.kmalloc(16))
    assert m.fail_nth == 1
    assert outcome(lambda: m.kmalloc(16, ATOMIC))
    with pytest.raises(ValueError, match="fail_nth: -1 is out of range"):
        m.fail_nth = -1
    with pytest.raises(TypeError):
        m.fail_nth = "1"  # type: ignore[assignment]


def test_fail_nth_is_per_thread():
    import threading

    m = kmm.Machine()
    m.fault_attr("failslab").ignore_gfp_wait = False
    m.fail_nth = 2
    seen: list[int] = []

    def other() -> None:
        seen.append(m.fail_nth)
        for _ in range(5):
            m.kfree(m.kmalloc(16))  # no fail-nth of its own: nothing fails

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [0]
    assert m.fail_nth == 2
    assert [outcome(lambda: m.kfree(m.kmalloc(16))) for _ in range(3)] == [False, True, False]


def test_fail_nth_walks_every_point_of_a_call():
    """The systematic use: fail the 1st, 2nd, ... point of one call until
    fail-nth is no longer reached. kmem_cache_alloc on an empty cache of
    1 KiB objects has two: should_failslab, then new_slab's order-2 page
    allocation (calculate_order on 2 CPUs: min_objects 4 * (fls(2) + 1) = 12,
    16 objects in 16 KiB), whose failure allocate_slab answers with the
    cache's smallest order (order 0, below min-order: not a point)."""
    results = []
    for n in range(1, 5):
        m = kmm.Machine()
        arm(m, "failslab", probability=0)
        arm(m, "fail_page_alloc", probability=0)
        c = m.kmem_cache_create("fi_walk", 1024)
        assert m.sysfs_slab("fi_walk")["order"] == 2
        m.drain_all_pages()
        before = state(m)
        m.fail_nth = n
        try:
            obj = c.alloc()
        except kmm.OutOfMemoryError:
            assert state(m) == before
            results.append(("failed", m.fail_nth))
        else:
            used = (before[0] + before[1]) - (m.nr_free_pages() + m.nr_pcp_pages())
            results.append(("allocated", m.fail_nth, used))
            c.free(obj)
        assert m.check() == []
        m.fail_nth = 0
    assert results == [
        ("failed", 0),  # should_failslab
        ("allocated", 0, 1),  # the order-2 slab failed; an order-0 slab instead
        ("allocated", 1, 4),  # two points only: the third is never reached
        ("allocated", 2, 4),
    ]


ACCOUNTED = ("MemFree", "Slab", "PageTables", "Percpu", "KernelStack", "VmallocUsed")


def accounted(m: kmm.Machine) -> dict[str, int]:
    m.drain_all_pages()
    mi = m.proc.meminfo_dict()
    return {k: mi[k] for k in ACCOUNTED}


def test_fail_nth_every_error_path_of_composite_calls_leaks_nothing():
    """vmalloc, vzalloc, a vmapped kernel stack, percpu and bulk allocations
    make several allocations each; failing each of them in turn (fail-nth)
    must raise OutOfMemoryError, leave every invariant whole and lose no
    page: what /proc/meminfo accounts (free, slab, page tables, percpu,
    stacks, vmalloc) adds up to the same. A failed call may leave its
    metadata caches a slab bigger, as the kernel's does (the slab's objects
    are free again)."""
    calls = {
        "vmalloc": lambda m, c: m.vmalloc(5 * 4096),
        "vzalloc": lambda m, c: m.vzalloc(3 * 4096),
        "kvmalloc": lambda m, c: m.kvmalloc(40000),
        "alloc_thread_stack": lambda m, c: m.alloc_thread_stack(vmap=True),
        "alloc_percpu": lambda m, c: m.alloc_percpu(20000),
        "kmem_cache_alloc_bulk": lambda m, c: c.alloc_bulk(kmm.GFP_KERNEL, 200),
    }
    for name, call in calls.items():
        injected = 0
        for n in range(1, 100):
            m = kmm.Machine(memory="256M")
            for attr in ("failslab", "fail_page_alloc"):
                arm(m, attr, probability=0, verbose=0)
            m.fault_attr("fail_page_alloc").min_order = 0
            c = m.kmem_cache_create("fi_walk2", 100)
            with m.on_cpu(0):
                before = accounted(m)
                m.fail_nth = n
                try:
                    call(m, c)
                    failed = False
                except kmm.OutOfMemoryError:
                    failed = True
                left, m.fail_nth = m.fail_nth, 0
                if failed:
                    injected += 1
                    after = accounted(m)
                    assert sum(after.values()) == sum(before.values()), (name, n, before, after)
                    assert after["MemFree"] >= before["MemFree"] - 16, (name, n)  # a few cached slabs at most
                assert m.check() == [], (name, n)
            if left:
                break  # the n-th point was never reached: every point was tried
        else:
            raise AssertionError(f"{name}: more than 99 injection points")
        # kvmalloc answers its failed kmalloc with vmalloc, which fail-nth
        # (spent on the kmalloc) then lets through: kvmalloc never fails here.
        assert injected >= 1 or name == "kvmalloc", name
