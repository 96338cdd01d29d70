"""Per-CPU work from Python threads (issue 4), in one process.

Run: python benches/bench_threads.py [--bulk N]   (N objects per bulk call;
default 512, issue 13's batch size; issue 4's figures used 1000)

1. Two threads bound to CPUs 0 and 1 (`with m.on_cpu(k):`), each doing
   `cache.free_bulk(cache.alloc_bulk(GFP_KERNEL, N))` in a loop (both
   calls release the GIL), against one thread on CPU 0 doing the same total
   work: wall-clock speedup (best of 5; 2.0 = perfect).
2. `m.alloc_pages(GFP_KERNEL, 0)` + `m.free_pages(page, 0)` (the per-CPU
   list fast path) against `bytearray(64)` create + drop, unbound and
   inside `with m.on_cpu(0):` (best of 7 repeats).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import timeit

import kmm

BULK = 512  # objects per bulk call (--bulk)
OBJECTS = 2_000_000  # objects per thread in the two-thread run
REPEAT = 5


def best_ns(stmt, number: int, repeat: int = 7) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e9


def pin_to_host_cpu(k: int) -> None:
    """Run the calling thread on host CPU k (Linux: pid 0 is this thread).
    Left to the scheduler, two short runs sometimes share one host CPU."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {k % (os.cpu_count() or 1)})


def run_threads(m, cache, plan: list[tuple[int, int]]) -> float:
    """Wall time of threads started together, one per (cpu, calls) in plan:
    from the first start to the last finish, as each thread timed itself."""
    gfp = kmm.GFP_KERNEL
    alloc_bulk, free_bulk = cache.alloc_bulk, cache.free_bulk
    barrier = threading.Barrier(len(plan))
    spans: list[tuple[float, float]] = []

    def work(cpu: int, calls: int) -> None:
        pin_to_host_cpu(cpu)
        with m.on_cpu(cpu):
            barrier.wait()
            t0 = time.perf_counter()
            for _ in range(calls):
                free_bulk(alloc_bulk(gfp, BULK))
            spans.append((t0, time.perf_counter()))

    ts = [threading.Thread(target=work, args=p) for p in plan]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return max(e for _, e in spans) - min(s for s, _ in spans)


def main() -> int:
    global BULK
    if "--bulk" in sys.argv:
        BULK = int(sys.argv[sys.argv.index("--bulk") + 1])
    CALLS = OBJECTS // BULK  # bulk calls per thread in the two-thread run
    m = kmm.Machine(memory="1G", cpus=2)
    gfp = kmm.GFP_KERNEL
    cache = m.kmem_cache_create("bench_threads64", 64)

    # 1. Threads. Alternate the two shapes so host noise hits both alike.
    one, two = [], []
    run_threads(m, cache, [(0, CALLS // 4)])  # warm up: slabs, code
    for _ in range(REPEAT):
        one.append(run_threads(m, cache, [(0, 2 * CALLS)]))
        two.append(run_threads(m, cache, [(0, CALLS), (1, CALLS)]))
    assert cache.objects_in_use() == 0, "the benchmark leaked objects"
    t1, t2 = min(one), min(two)
    total = 2 * CALLS * BULK
    speedup = t1 / t2

    # 2. The pcp pair from Python.
    alloc_pages, free_pages = m.alloc_pages, m.free_pages

    def page_pair():
        free_pages(alloc_pages(gfp, 0), 0)

    def bytearray_pair():
        bytearray(64)

    n = 200_000
    base = best_ns(bytearray_pair, n)
    unbound = best_ns(page_pair, n)
    with m.on_cpu(0):
        bound = best_ns(page_pair, n)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(f"CPython {sys.version.split()[0]}, kmm {kmm.__version__}, host CPUs {os.cpu_count()}")
    print(f"alloc_bulk({BULK})+free_bulk, {total:,} objects in all (best of {REPEAT}):")
    print(f"  1 thread on CPU 0       {t1 * 1e3:8.1f} ms  {total / t1 / 1e6:6.1f} M objects/s  {t1 * 1e9 / total:5.1f} ns/object")
    print(f"  2 threads on CPUs 0, 1  {t2 * 1e3:8.1f} ms  {total / t2 / 1e6:6.1f} M objects/s")
    print(f"  speedup {speedup:.2f}x (target >= 1.8x: {verdict(speedup >= 1.8)})")
    print(f"{'operation':52s} {'ns/op':>8s} {'x baseline':>10s}  target")
    rows = [
        ("bytearray(64) create+drop (baseline)", base, ""),
        ("alloc_pages(GFP_KERNEL,0)+free_pages(page,0)", unbound, f"<= 1.5x: {verdict(unbound <= 1.5 * base)}"),
        ("  the same inside `with m.on_cpu(0):`", bound, ""),
    ]
    for name, ns, target in rows:
        print(f"{name:52s} {ns:8.1f} {ns / base:10.2f}  {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
