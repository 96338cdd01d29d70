"""What slub_debug and kmemleak cost, from Python.

Run: python benches/bench_debug.py [--repeat 9] [--number 100000]

One machine per mode (x86_64, 1 GiB, 2 CPUs, bound to CPU 0):
  off                 no boot parameters
  slub_debug=FZPU     consistency checks, red zones, poison and user
                      tracking on kmalloc-64 only (the cache timed)
  slub_debug=FZPU-all the same on every cache (`slub_debug=FZPU`)
  kmemleak=on         every object tracked from allocation to free
For each: `m.kmalloc(64) + m.kfree(b)` (ns per pair) and a slab-heavy loop
(`kmalloc` of 32 objects of 8..256 bytes, then their `kfree`, ns per
object), best of `--repeat` runs of `--number` pairs, each run in a fresh
interpreter and the modes interleaved run by run, so that noise from other
processes falls on all of them alike. User tracking (U) records the Python
call stack at every allocation and free, which is most of its cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import timeit

MODES = {
    "off": "",
    "slub_debug=FZPU": "slub_debug=FZPU,kmalloc-64",
    "slub_debug=FZP": "slub_debug=FZP,kmalloc-64",
    "slub_debug=FZPU-all": "slub_debug=FZPU",
    "kmemleak=on": "kmemleak=on",
}

SIZES = [8 << (i % 6) for i in range(32)]  # 8..256 bytes


def one_run(mode: str, number: int) -> dict[str, float]:
    import kmm

    m = kmm.Machine(memory="1G", cmdline=MODES[mode])
    kmalloc, kfree = m.kmalloc, m.kfree

    def pair() -> None:
        kfree(kmalloc(64))

    def mixed() -> None:
        bs = [kmalloc(s) for s in SIZES]
        for b in bs:
            kfree(b)

    with m.on_cpu(0):
        pair(), mixed()  # warm the per-CPU slabs
        k = timeit.timeit(pair, number=number) / number * 1e9
        n = max(1, number // len(SIZES))
        x = timeit.timeit(mixed, number=n) / (n * len(SIZES)) * 1e9
    return {"kmalloc": k, "mixed": x}


def run_one(mode: str, number: int) -> dict[str, float]:
    """One mode timed in a fresh interpreter (so every figure starts alike)."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", mode, "--number", str(number)],
        env=dict(os.environ), capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--number", type=int, default=100_000)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run of one mode, JSON out
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_run(a.one, a.number)))
        return 0
    best: dict[str, dict[str, float]] = {}
    for _ in range(a.repeat):
        for mode in MODES:
            b = best.setdefault(mode, {"kmalloc": float("inf"), "mixed": float("inf")})
            for k, v in run_one(mode, a.number).items():
                b[k] = min(b[k], v)
    ref = best["off"]
    print(f"CPython {sys.version.split()[0]}; best of {a.repeat} runs; ns per kmalloc(64)+kfree pair, ns per object of the mixed loop")
    print(f"{'mode':20s} {'kmalloc(64)+kfree':>18s} {'vs off':>7s} {'mixed 8..256 B':>15s} {'vs off':>7s}")
    for label, r in best.items():
        print(
            f"{label:20s} {r['kmalloc']:18.1f} {r['kmalloc'] / ref['kmalloc']:7.2f}"
            f" {r['mixed']:15.1f} {r['mixed'] / ref['mixed']:7.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
