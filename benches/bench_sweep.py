"""Benchmark: an 8-setting sweep over warm2 (issue 12's figures).

    python benches/bench_sweep.py [--runs 8] [--skip-dask]

Runs the same 8 runs three ways, each into a fresh CSV:
  - ``-j 1``: every run in this process, one after the other;
  - ``-j 2``: two spawned worker processes;
  - a local Dask cluster (2 worker processes, 1 thread each, on loopback).
and prints wall times, the -j 2 speed-up over -j 1 (goal >= 1.8x on 2 cores)
and the Dask path's cost per run against the process pool's (goal within
10%). The cluster is started before its timer starts (a real study keeps
one running); the pool's worker start-up is inside its time, as a user pays
it on every `kmm sweep`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import kmm
from kmm import sweep as sw

SETTINGS = [
    "",
    "vm.watermark_scale_factor=200",
    "vm.watermark_boost_factor=0",
    "vm.percpu_pagelist_high_fraction=8",
    "vm.min_free_kbytes=65536",
    "slub_min_order=1",
    "slub_max_order=0",
    "vm.lowmem_reserve_ratio=\"32 32 32 0 0\"",
]


def timed(label: str, fn) -> float:
    t0 = time.perf_counter()
    res = fn()
    dt = time.perf_counter() - t0
    assert res.ran == len(res.rows) and not res.failed, [r["error"] for r in res.failed]
    print(f"{label:<28} {dt:7.2f} s  ({dt / res.ran:5.2f} s per run, {res.ran} runs)", flush=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=8, help="settings to sweep (the first N of the list)")
    ap.add_argument("--skip-dask", action="store_true")
    a = ap.parse_args()
    settings = SETTINGS[: a.runs]
    rec = str(kmm.trace.BUNDLE)
    tmp = Path(tempfile.mkdtemp(prefix="kmm-bench-sweep-"))
    print(f"{len(settings)} runs over {Path(rec).name}")
    j1 = timed("-j 1 (in process)", lambda: sw.sweep([rec], settings, jobs=1, output=tmp / "j1.csv"))
    j2 = timed("-j 2 (process pool)", lambda: sw.sweep([rec], settings, jobs=2, output=tmp / "j2.csv"))
    print(f"speed-up -j 2 / -j 1: {j1 / j2:.2f}x (goal >= 1.8x)")
    if not a.skip_dask:
        from distributed import LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as c:
            dk = timed("Dask LocalCluster (2 workers)",
                       lambda: sw.sweep([rec], settings, cluster=c.scheduler_address, output=tmp / "dask.csv"))
        print(f"Dask cost per run / pool's: {dk / j2:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
