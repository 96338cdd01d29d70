"""What KASAN costs (issue 11): the same Python workloads on a machine booted
without and with ``kasan=on``, in one process.

    python benches/bench_kasan.py [--off-only] [--repeat N]

Rows: the ``kmalloc(64)`` + ``kfree`` pair; a slab-heavy Python loop (256
objects of sizes 16..2048 allocated, their first 8 bytes written and read
through the Block, then freed, per object); ``alloc_bulk``/``free_bulk`` of
1000 objects (per object); and the replay of the packaged sample trace
(83,084 events, ``python/kmm/data/sample.perf.txt.xz``) on a fresh 2 GiB,
4-CPU machine (events per second). Best of ``--repeat`` (default 7; replay:
3). ``--off-only`` runs only the ``kasan=off`` column, e.g. against another
build of kmm (the ``kmm`` on ``sys.path``) to compare the off path with it.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from pathlib import Path

import kmm

SIZES = [16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048]


def best_ns(stmt, number: int, per: int, repeat: int) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / (number * per) * 1e9


def measure(cmdline: str, repeat: int, trace) -> dict[str, float]:
    m = kmm.Machine(memory="1G", cmdline=cmdline)
    out: dict[str, float] = {}
    with m.on_cpu(0):
        kmalloc, kfree = m.kmalloc, m.kfree
        gfp = kmm.GFP_KERNEL

        def pair():
            kfree(kmalloc(64))

        sizes = [SIZES[i % len(SIZES)] for i in range(256)]

        def slab_loop():
            blocks = [kmalloc(s) for s in sizes]
            for b in blocks:
                b[0:8] = b"kmm-test"
                if b[7] != 116:
                    raise AssertionError("lost a write")
            for b in blocks:
                kfree(b)

        cache = m.kmem_cache_create("bench200", 200)

        def bulk():
            cache.free_bulk(cache.alloc_bulk(gfp, 1000))

        out["pair"] = best_ns(pair, 100_000, 1, repeat)
        out["loop"] = best_ns(slab_loop, 200, 256, repeat)
        out["bulk"] = best_ns(bulk, 200, 1000, repeat)
    best = float("inf")
    for _ in range(min(repeat, 3)):
        r = kmm.Machine(memory="2G", cpus=4, cmdline=cmdline)
        t0 = time.perf_counter()
        kmm.trace.replay(trace, r)
        best = min(best, time.perf_counter() - t0)
    out["replay"] = len(trace) / best
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--off-only", action="store_true")
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    trace = kmm.trace.load(str(Path(kmm.__file__).parent / "data" / "sample.perf.txt.xz"))
    cols = [("kasan=off", "")] + ([] if a.off_only else [("kasan=on", "kasan=on")])
    res = {name: measure(cmd, a.repeat, trace) for name, cmd in cols}
    print(f"CPython {sys.version.split()[0]}, kmm from {Path(kmm.__file__).parent}")
    head = "| workload | " + " | ".join(n for n, _ in cols) + (" | on / off |" if len(cols) == 2 else " |")
    print(head)
    print("|---|" + "---:|" * (len(cols) + (1 if len(cols) == 2 else 0)))
    rows = [
        ("pair", "`m.kmalloc(64)` + `m.kfree(block)`", "ns"),
        ("loop", "slab-heavy loop: kmalloc 16..2048, Block write+read, kfree (per object)", "ns"),
        ("bulk", "`alloc_bulk(GFP_KERNEL, 1000)` + `free_bulk`, 200-byte cache (per object)", "ns"),
        ("replay", "replay of sample.perf.txt.xz (83,084 events), cold 2 GiB / 4 CPUs", "events/s"),
    ]
    for key, label, unit in rows:
        vals = [res[n][key] for n, _ in cols]
        cells = [f"{v:,.0f} {unit}" if unit == "events/s" else f"{v:.1f} {unit}" for v in vals]
        ratio = ""
        if len(vals) == 2:
            r = vals[0] / vals[1] if unit == "events/s" else vals[1] / vals[0]
            ratio = f" {r:.2f}x slower |"
        print(f"| {label} | " + " | ".join(cells) + " |" + ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
