"""Real Python threads on one machine: each bound to its own simulated CPU,
allocating and freeing at random, handing objects to each other for remote
frees, bulk calls that release the GIL, and a thread waiting for a CPU whose
holder disabled preemption.

After every run everything is given back, the per-CPU lists drained and every
cache shrunk: the buddy lists and /proc/slabinfo must be exactly as they were
before, and every invariant (m.check()) must hold.
"""

from __future__ import annotations

import random
import threading
from collections import deque

import kmm
from conftest import assert_healthy, buddyinfo, free_pages


def settle(m: kmm.Machine) -> None:
    for c in m.caches:
        c.shrink()
    m.drain_all_pages()


def active_objs(m: kmm.Machine) -> dict[str, tuple[int, int]]:
    """/proc/slabinfo: name -> (active_objs, num_objs)."""
    out = {}
    for line in m.proc.slabinfo().splitlines()[2:]:
        f = line.split()
        out[f[0]] = (int(f[1]), int(f[2]))
    return out


def state(m: kmm.Machine):
    settle(m)
    return buddyinfo(m), active_objs(m), m.proc.slabinfo(), free_pages(m)


def seen_contended(m, cpu: int, before: int) -> bool:
    """Poll (bounded, ~20 s) until another thread is seen waiting for `cpu`."""
    for _ in range(200_000):
        if m.cpu_stats()[cpu][1] > before:
            return True
        threading.Event().wait(0.0001)
    return False


def run_threads(targets) -> None:
    """Run the callables in threads; re-raise the first failure here."""
    errors: list[BaseException] = []

    def wrap(f):
        def run():
            try:
                f()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        return run

    ts = [threading.Thread(target=wrap(f)) for f in targets]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def test_two_cpus_random_ops_with_remote_frees():
    m = kmm.Machine()
    cache = m.kmem_cache_create("t_threads", 136)
    assert cache.alias is None  # its own cache, so its stats are ours alone
    before = state(m)
    stats_before = m.cpu_stats()
    OPS = 100_000
    inbox = [deque(), deque()]  # inbox[k]: items thread k must free
    done_sending = threading.Barrier(2)
    counts = [dict(), dict()]

    def worker(k: int) -> None:
        rng = random.Random(1234 + k)
        other = inbox[1 - k]
        mine = inbox[k]
        kmallocs: list[kmm.Block] = []
        pages: list[tuple[kmm.Page, int, bytes]] = []
        objs: list[kmm.Block] = []
        n_remote = 0
        tag = 0

        def free_item(item) -> None:
            kind, x, extra = item
            if kind == "k":
                assert bytes(x[:8]) == extra
                m.kfree(x)
            elif kind == "o":
                assert bytes(x[:8]) == extra
                cache.free(x)
            else:
                page, order = x
                assert m.read(m.page_address(page), 8) == extra
                m.free_pages(page, order)

        with m.on_cpu(k):
            assert m.smp_processor_id() == k
            for _ in range(OPS):
                while mine:
                    free_item(mine.popleft())
                r = rng.random()
                tag += 1
                t = (k << 56 | tag).to_bytes(8, "little")
                if r < 0.22:
                    size = rng.choice((8, 24, 64, 100, 192, 500, 1000, 3000, 4096, 9000))
                    b = m.kmalloc(size, kmm.GFP_KERNEL)
                    b[:8] = t
                    kmallocs.append((b, t))
                elif r < 0.40:
                    if kmallocs:
                        b, t0 = kmallocs.pop(rng.randrange(len(kmallocs)))
                        if rng.random() < 0.25:
                            other.append(("k", b, t0))
                            n_remote += 1
                        else:
                            free_item(("k", b, t0))
                elif r < 0.52:
                    order = rng.choice((0, 0, 0, 1, 2, 3, 4))
                    p = m.alloc_pages(rng.choice((kmm.GFP_KERNEL, kmm.GFP_HIGHUSER_MOVABLE & ~kmm.__GFP_HIGHMEM)), order)
                    m.write(m.page_address(p), t)
                    pages.append((p, order, t))
                elif r < 0.62:
                    if pages:
                        p, order, t0 = pages.pop(rng.randrange(len(pages)))
                        if rng.random() < 0.25:
                            other.append(("p", (p, order), t0))
                            n_remote += 1
                        else:
                            free_item(("p", (p, order), t0))
                elif r < 0.82:
                    o = cache.alloc(kmm.GFP_KERNEL)
                    o[:8] = t
                    objs.append((o, t))
                else:
                    if objs:
                        # Mostly the newest objects: they sit in this CPU's slab,
                        # so the other CPU's free of them is a remote free.
                        i = len(objs) - 1 if rng.random() < 0.5 else rng.randrange(len(objs))
                        o, t0 = objs.pop(i)
                        if rng.random() < 0.3:
                            other.append(("o", o, t0))
                            n_remote += 1
                        else:
                            free_item(("o", o, t0))
            for b, t0 in kmallocs:
                free_item(("k", b, t0))
            for p, order, t0 in pages:
                free_item(("p", (p, order), t0))
            for o, t0 in objs:
                free_item(("o", o, t0))
            done_sending.wait()  # nothing more arrives after this
            while mine:
                free_item(mine.popleft())
        counts[k]["remote"] = n_remote

    run_threads([lambda: worker(0), lambda: worker(1)])
    assert counts[0]["remote"] > 0 and counts[1]["remote"] > 0
    assert cache.objects_in_use() == 0
    st = cache.stats()
    assert st["free_remote"] > 0, st
    # Two threads, two CPUs: no per-CPU slab lock was ever contended, and no
    # thread ever had to wait for a CPU.
    assert cache.cpu_contention() == [0, 0]
    for c in m.caches:
        assert c.cpu_contention() == [0, 0], c.name
    assert [s[1] for s in m.cpu_stats()] == [s[1] for s in stats_before]
    assert_healthy(m)
    after = state(m)
    assert after[0] == before[0]  # buddyinfo
    assert after[1] == before[1]  # active_objs, num_objs
    assert after[2] == before[2]  # the whole slabinfo text
    assert after[3] == before[3]
    assert m.nr_pcp_pages() == 0
    assert_healthy(m)


def test_bulk_alloc_free_on_two_cpus():
    m = kmm.Machine()
    caches = [m.kmem_cache_create("t_bulk0", 64), m.kmem_cache_create("t_bulk1", 64)]
    shared = m.kmem_cache_create("t_bulk_shared", 200)
    before = state(m)

    def worker(k: int) -> None:
        with m.on_cpu(k):
            own = caches[k]
            for i in range(200):
                objs = own.alloc_bulk(kmm.GFP_KERNEL, 1000)
                assert len(objs) == 1000
                assert len(set(objs)) == 1000
                # Both threads also hammer one shared cache.
                sh = shared.alloc_bulk(kmm.GFP_KERNEL, 100)
                own.free_bulk(objs)
                shared.free_bulk(sh)
            assert m.smp_processor_id() == k

    run_threads([lambda: worker(0), lambda: worker(1)])
    for c in (*caches, shared):
        assert c.objects_in_use() == 0
        # Different CPUs: the per-CPU locks were never found held.
        assert c.cpu_contention() == [0, 0], c.name
    assert_healthy(m)
    assert state(m) == before
    assert_healthy(m)


def test_bulk_objects_freed_by_the_other_cpu():
    m = kmm.Machine()
    cache = m.kmem_cache_create("t_bulk_x", 96)
    before = state(m)
    handoff = [deque(), deque()]
    barrier = threading.Barrier(2)

    def worker(k: int) -> None:
        with m.on_cpu(k):
            for _ in range(100):
                handoff[1 - k].append(cache.alloc_bulk(kmm.GFP_KERNEL, 500))
                while handoff[k]:
                    cache.free_bulk(handoff[k].popleft())
            barrier.wait()
            while handoff[k]:
                cache.free_bulk(handoff[k].popleft())

    run_threads([lambda: worker(0), lambda: worker(1)])
    assert cache.objects_in_use() == 0
    assert cache.cpu_contention() == [0, 0]
    st = cache.stats()
    # The other CPU's objects: slow path, unless their slab has since become
    # this CPU's slab (via its partial list), which is allowed.
    assert st["free_slowpath"] > 0
    assert_healthy(m)
    assert state(m) == before


def test_a_cpu_held_with_preemption_disabled_makes_others_wait():
    """get_cpu() keeps the CPU: another thread running there can allocate only
    after put_cpu(), and its wait releases the GIL (no deadlock).

    A one-CPU machine puts both threads on CPU 0 without binding."""
    m = kmm.Machine(memory="64M", cpus=1)
    held = threading.Event()
    b_trying = threading.Event()
    log: list[str] = []
    result = {}

    def a() -> None:
        cpu = m.get_cpu()
        assert cpu == 0
        contended0 = m.cpu_stats()[0][1]
        held.set()
        b_trying.wait()
        result["b_waited"] = seen_contended(m, 0, contended0)
        log.append("A put_cpu")
        m.put_cpu()

    def b() -> None:
        held.wait()
        assert m.smp_processor_id() == 0
        b_trying.set()
        p = m.alloc_pages(kmm.GFP_KERNEL)
        log.append("B allocated")
        m.free_pages(p)

    run_threads([a, b])
    assert result["b_waited"]
    assert log == ["A put_cpu", "B allocated"]
    assert m.preempt_count() == 0
    assert_healthy(m)


def test_bound_thread_waits_for_put_cpu_on_its_cpu():
    """Thread A, bound to CPU 0, disables preemption there (get_cpu); thread B,
    also bound to CPU 0, allocates: B runs only after A's put_cpu, and its wait
    releases the GIL (A keeps running Python code meanwhile)."""
    m = kmm.Machine()
    held = threading.Event()
    b_trying = threading.Event()
    log: list[str] = []
    result = {}

    def a() -> None:
        with m.on_cpu(0):
            assert m.get_cpu() == 0
            assert m.preempt_count() == 1
            contended0 = m.cpu_stats()[0][1]
            held.set()
            b_trying.wait()
            # A runs Python here while B waits.
            result["b_waited"] = seen_contended(m, 0, contended0)
            log.append("A put_cpu")
            m.put_cpu()
            assert m.preempt_count() == 0

    def b() -> None:
        held.wait()
        with m.on_cpu(0):
            assert m.smp_processor_id() == 0
            assert m.preempt_count() == 0  # A's count is A's alone
            b_trying.set()
            p = m.alloc_pages(kmm.GFP_KERNEL)
            log.append("B allocated")
            blk = m.kmalloc(64, kmm.GFP_KERNEL)
            m.kfree(blk)
            m.free_pages(p)

    run_threads([a, b])
    assert result["b_waited"]
    assert log == ["A put_cpu", "B allocated"]
    assert_healthy(m)


def test_two_threads_sharing_one_cpu():
    """Binding is affinity: two threads on CPU 0 take turns through its per-CPU
    locks (bulk calls run without the GIL, so they really overlap)."""
    m = kmm.Machine()
    cache = m.kmem_cache_create("t_shared_cpu", 80)
    before = state(m)
    barrier = threading.Barrier(2)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with m.on_cpu(0):
            barrier.wait()
            live = []
            for _ in range(300):
                objs = cache.alloc_bulk(kmm.GFP_KERNEL, rng.randrange(1, 400))
                live.append(objs)
                p = m.alloc_pages(kmm.GFP_KERNEL, rng.choice((0, 1, 3)))
                b = m.kmalloc(rng.randrange(1, 3000), kmm.GFP_KERNEL)
                if len(live) > 5:
                    cache.free_bulk(live.pop(rng.randrange(len(live))))
                m.kfree(b)
                m.free_pages(p, p.order)
                assert m.smp_processor_id() == 0
            for objs in live:
                cache.free_bulk(objs)

    run_threads([lambda: worker(1), lambda: worker(2)])
    assert cache.objects_in_use() == 0
    assert cache.cpu_contention()[1] == 0  # nobody ran on CPU 1
    assert_healthy(m)
    assert state(m) == before
    assert_healthy(m)


def test_a_thread_on_another_cpu_does_not_wait():
    """get_cpu() on one CPU does not stop a thread bound to the other CPU."""
    m = kmm.Machine()
    held = threading.Event()
    b_done = threading.Event()
    result = {}

    def a() -> None:
        cpu = m.get_cpu()
        result["a_cpu"] = cpu
        held.set()
        # B must finish while A still holds its CPU.
        result["b_done_while_held"] = b_done.wait(timeout=60)
        m.put_cpu()

    def b() -> None:
        held.wait()
        with m.on_cpu(1 - result["a_cpu"]):
            # A's preempt_count is A's own: B is not atomic.
            result["b_count"] = m.preempt_count()
            result["b_atomic"] = m.in_atomic()
            p = m.alloc_pages(kmm.GFP_KERNEL)
            blk = m.kmalloc(100, kmm.GFP_KERNEL)
            m.kfree(blk)
            m.free_pages(p)
        b_done.set()

    run_threads([a, b])
    assert result["b_done_while_held"]
    assert result["b_count"] == 0 and result["b_atomic"] is False
    assert m.preempt_count() == 0
    assert_healthy(m)
