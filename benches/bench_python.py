"""Python-side benchmarks: kmm calls against CPython baselines, in one process.

Run: python benches/bench_python.py
Prints ns per operation (best of 7 repeats) and the ratio to the baseline.
"""

from __future__ import annotations

import sys
import time
import timeit

import kmm


def best_ns(stmt, number: int, repeat: int = 7) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e9


def main() -> int:
    m = kmm.Machine(memory="1G")
    gfp = kmm.GFP_KERNEL
    alloc_pages, free_pages = m.alloc_pages, m.free_pages
    gfpages = m.__get_free_pages

    def page_pair():
        free_pages(alloc_pages(gfp, 0), 0)

    def addr_pair():
        free_pages(gfpages(gfp, 0), 0)

    def bytearray_pair():
        bytearray(64)

    n = 200_000
    base = best_ns(bytearray_pair, n)
    rows = [
        ("bytearray(64) create+drop (baseline)", base),
        ("alloc_pages(GFP_KERNEL,0)+free_pages(page)", best_ns(page_pair, n)),
        ("__get_free_pages(GFP_KERNEL,0)+free_pages(addr)", best_ns(addr_pair, n)),
    ]
    t = time.perf_counter()
    kmm.Machine(memory="64G")
    boot = time.perf_counter() - t
    print(f"CPython {sys.version.split()[0]}, kmm {kmm.__version__}")
    print(f"{'operation':52s} {'ns/op':>8s} {'x baseline':>10s}")
    for name, ns in rows:
        print(f"{name:52s} {ns:8.1f} {ns / base:10.2f}")
    label = 'Machine(memory="64G") boot'
    print(f"{label:52s} {boot * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
