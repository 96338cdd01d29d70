"""Slab layer and kmalloc from Python: kmm calls against a CPython baseline, in one process.

Run: python benches/bench_slab.py
Prints ns per operation (best of 7 repeats), the ratio to the baseline
(`bytearray(64)` create + drop) and each target's verdict.
"""

from __future__ import annotations

import sys
import timeit

import kmm


def best_ns(stmt, number: int, per: int = 1, repeat: int = 7) -> float:
    """Best-of-`repeat` ns per operation; one call of `stmt` is `per` operations."""
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / (number * per) * 1e9


def main() -> int:
    m = kmm.Machine(memory="1G")
    gfp = kmm.GFP_KERNEL
    kmalloc, kfree = m.kmalloc, m.kfree
    cache = m.kmem_cache_create("bench64", 64)
    alloc, free = cache.alloc, cache.free
    alloc_bulk, free_bulk = cache.alloc_bulk, cache.free_bulk

    def bytearray_pair():
        bytearray(64)

    def kmalloc_pair():
        kfree(kmalloc(64))

    def cache_pair():
        free(alloc())

    def bulk_1000():
        free_bulk(alloc_bulk(gfp, 1000))

    def bulk_64():
        free_bulk(alloc_bulk(gfp, 64))

    n = 200_000
    base = best_ns(bytearray_pair, n)
    kmalloc_ns = best_ns(kmalloc_pair, n)
    cache_ns = best_ns(cache_pair, n)
    bulk64_ns = best_ns(bulk_64, 20_000, per=64)
    bulk1000_ns = best_ns(bulk_1000, 2_000, per=1000)
    assert cache.objects_in_use() == 0, "the benchmark leaked objects"

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    rows = [
        ("bytearray(64) create+drop (baseline)", base, ""),
        ("m.kmalloc(64) + m.kfree(block)", kmalloc_ns, f"<= 1.5x: {verdict(kmalloc_ns <= 1.5 * base)}"),
        ("cache.alloc() + cache.free(block), per object", cache_ns, ""),
        ("cache.alloc_bulk(GFP_KERNEL, 64) + free_bulk(arr), per object", bulk64_ns, ""),
        (
            "cache.alloc_bulk(GFP_KERNEL, 1000) + free_bulk(arr), per object",
            bulk1000_ns,
            f"<= 20 ns: {verdict(bulk1000_ns <= 20.0)}",
        ),
    ]
    print(f"CPython {sys.version.split()[0]}, kmm {kmm.__version__}")
    print(f"{'operation':66s} {'ns/op':>8s} {'x baseline':>10s}  target")
    for name, ns, target in rows:
        print(f"{name:66s} {ns:8.1f} {ns / base:10.2f}  {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
