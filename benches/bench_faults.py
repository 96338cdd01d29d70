"""What fault injection and init_on_alloc/init_on_free cost, from Python.

Run: python benches/bench_faults.py [--repeat 9] [--number 100000]

One process, one machine per mode (x86_64, 1 GiB, 2 CPUs, bound to CPU 0):
  off          no boot parameters (what main measures)
  armed-p0     failslab=1,0,0,-1 fail_page_alloc=1,0,0,-1 and both attributes
               set to probability 0 at run time: the hooks run, nothing fails
  armed-p0-nw  as armed-p0 with ignore_gfp_wait off, so GFP_KERNEL requests
               reach should_fail_ex (the probability-0 test)
  init_on_alloc  init_on_alloc=1: every page and slab object zeroed at allocation
  init_on_free   init_on_free=1: zeroed at free instead
For each: `m.kmalloc(64) + m.kfree(b)` and `m.alloc_pages(GFP_KERNEL, 0) +
m.free_pages(p)`, best of `--repeat` runs of `--number` pairs (ns per pair),
each run in a fresh interpreter and the modes interleaved run by run, so
that noise from other processes falls on all of them alike. `--baseline
DIR` also times the `off` mode of another build of kmm (a directory
holding its `kmm` package, e.g. a copy of main's python/kmm with its
compiled module), interleaved the same way; ratios are to it.
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
    "armed-p0": "failslab=1,0,0,-1 fail_page_alloc=1,0,0,-1",
    "armed-p0-nw": "failslab=1,0,0,-1 fail_page_alloc=1,0,0,-1",
    "init_on_alloc": "init_on_alloc=1",
    "init_on_free": "init_on_free=1",
}


def pairs(mode: str, cmdline: str):
    import kmm

    m = kmm.Machine(memory="1G", cmdline=cmdline)
    if mode == "armed-p0-nw":
        for name in ("failslab", "fail_page_alloc"):
            m.fault_attr(name).ignore_gfp_wait = False  # type: ignore[attr-defined]
    gfp = kmm.GFP_KERNEL
    kmalloc, kfree = m.kmalloc, m.kfree
    alloc_pages, free_pages = m.alloc_pages, m.free_pages

    def kmalloc_pair() -> None:
        kfree(kmalloc(64))

    def page_pair() -> None:
        free_pages(alloc_pages(gfp, 0), 0)

    return m, kmalloc_pair, page_pair


def one_run(mode: str, number: int) -> dict[str, float]:
    m, kp, pp = pairs(mode, MODES[mode])
    with m.on_cpu(0):
        kp(), pp()  # warm the per-CPU slab and page lists
        k = timeit.timeit(kp, number=number) / number * 1e9
        p = timeit.timeit(pp, number=number) / number * 1e9
    return {"kmalloc": k, "pages": p}


def run_one(mode: str, number: int, path: str | None) -> dict[str, float]:
    """One mode timed in a fresh interpreter (so every figure starts alike)."""
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path
    out = subprocess.run(
        [sys.executable, __file__, "--one", mode, "--number", str(number)],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--number", type=int, default=100_000)
    ap.add_argument("--baseline", help="directory holding another build's kmm package (timed in 'off' mode)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run of one mode, JSON out
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_run(a.one, a.number)))
        return 0
    best: dict[str, dict[str, float]] = {}

    def note(label: str, r: dict[str, float]) -> None:
        b = best.setdefault(label, {"kmalloc": float("inf"), "pages": float("inf")})
        for k, v in r.items():
            b[k] = min(b[k], v)

    for _ in range(a.repeat):
        if a.baseline:
            note("baseline off", run_one("off", a.number, a.baseline))
        for mode in MODES:
            note(mode, run_one(mode, a.number, None))
    ref = best.get("baseline off", best["off"])
    print(f"CPython {sys.version.split()[0]}; best of {a.repeat} x {a.number} pairs; ns per pair")
    print(f"{'mode':16s} {'kmalloc(64)+kfree':>18s} {'vs ref':>7s} {'alloc_pages+free':>17s} {'vs ref':>7s}")
    for label, r in best.items():
        print(
            f"{label:16s} {r['kmalloc']:18.1f} {r['kmalloc'] / ref['kmalloc']:7.3f}"
            f" {r['pages']:17.1f} {r['pages'] / ref['pages']:7.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
