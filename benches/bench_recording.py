"""Replaying a recording bundle: how long each step takes, and how close
kmm's dynamics come to the kernel's (issue 10).

    python benches/bench_recording.py [--bundle DIR] [--repeat N] [--cold]

Prints, in Markdown: the time to load the bundle (trace and /proc files),
to build the machine shaped like the recorded one and bring it to the
recorded start state, and to replay; then the fidelity table (each figure:
the kernel's count in the trace, kmm's own, their ratio), the end-state
distance per zone and the mean trajectory distance. With ``--cold`` the
same table for a cold start (a freshly booted machine of the same shape),
for comparison. Timings: best of ``--repeat`` runs in one process.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import kmm

PACKAGED = Path(kmm.__file__).parent / "data" / "warm2"


def best(fn, repeat: int):
    out, t = None, float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return out, t


def table(r: kmm.trace.ReplayReport, title: str) -> None:
    print(f"\n{title}\n")
    print("| figure | tracepoint | kernel | kmm | kmm/kernel | kmm in perf's lost stretches | seen/kernel |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for d in r["dynamics"]:
        ratio = f"{d.ratio:.2f}" if d.ratio is not None else "-"
        seen = f"{d.ratio_seen:.2f}" if d.ratio_seen is not None else "-"
        print(f"| {d.what.strip()} | `{d.tracepoint}` | {d.kernel:,} | {d.kmm:,} | {ratio} | {d.kmm_in_lost:,} | {seen} |")
    print()
    print("| zone | kernel free pages at the end | kmm's | end-state distance | mean trajectory distance |")
    print("|---|---:|---:|---:|---:|")
    means = r.mean_trajectory_distance(0)
    for z in r["end_state"]:
        m = means.get(z["zone"])
        print(f"| {z['zone']} | {z['kernel_free_pages']:,} | {z['kmm_free_pages']:,} | {z['distance']:.3f} | "
              f"{m:.3f} |" if m is not None else "| - |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(PACKAGED), help="a recording bundle (default: the packaged warm2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also replay from a cold start, for comparison")
    a = ap.parse_args()

    rec, t_load = best(lambda: kmm.trace.load(a.bundle), a.repeat)
    n = len(rec)
    _, t_machine = best(lambda: rec.machine(warm=True), a.repeat)
    runs = []

    def one():
        m = rec.machine(warm=True)
        r = kmm.trace.replay(rec, m)
        runs.append(r.seconds)
        return r

    r, t_total = best(one, a.repeat)
    core = min(runs)
    print(f"Bundle: {a.bundle}: {n:,} events, {rec.bundle.nr_samples} samples, "
          f"lost chunks {getattr(rec.trace, 'lost_chunks', 0)}")
    print()
    print("| step | time | events/s |")
    print("|---|---:|---:|")
    print(f"| `kmm.trace.load(DIR)` (trace and /proc files) | {t_load * 1e3:.0f} ms | {n / t_load / 1e6:.2f} M |")
    print(f"| `rec.machine(warm=True)` (shape and warm start) | {t_machine * 1e3:.0f} ms | |")
    print(f"| replay, the core loop as the report times it | {core * 1e3:.0f} ms | **{n / core / 1e6:.2f} M** |")
    print(f"| machine + replay + comparisons | {t_total * 1e3:.0f} ms | {n / t_total / 1e6:.2f} M |")
    table(r, "Warm start (the default):")
    if a.cold:
        m = rec.machine(warm=False)
        table(kmm.trace.replay(rec, m), "Cold start (`rec.machine(warm=False)`), for comparison:")


if __name__ == "__main__":
    main()
