"""Issue 6: trace import, `perf kmem stat` and replay speed on the sample trace.

    python benches/bench_trace.py [--repeat N] [--no-perf]

Times (best of N, one process): decompressing the sample alone (the floor
set by Python's lzma), load (decompress + parse), stat, load+stat from an
uncompressed copy, and replay on a fresh machine. When `perf` is installed
and the sample's perf.data is available, times `perf kmem --slab stat` and
`perf kmem --page stat` on the same recording (decompressed once, outside
the timing).
"""

from __future__ import annotations

import argparse
import lzma
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import kmm

PERF_DATA_XZ = Path("/work/shared/data/traces/sample.perf.data.xz")


def best(fn, repeat: int) -> tuple[float, object]:
    t_best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        t_best = min(t_best, time.perf_counter() - t0)
    return t_best, out


def row(what: str, secs: float, events: int) -> None:
    print(f"| {what} | {secs * 1e3:8.1f} ms | {events / secs / 1e6:6.2f} M events/s |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-perf", action="store_true")
    a = ap.parse_args()
    sample = kmm.trace.SAMPLE
    t = kmm.trace.load(sample)
    n = len(t)
    print(f"sample: {sample.name}, {n:,} events\n")
    print("| step | time (best of %d) | rate |" % a.repeat)
    print("|---|---|---|")
    row("lzma decompress only (Python stdlib)", best(lambda: lzma.decompress(sample.read_bytes()), a.repeat)[0], n)
    row("load .xz (decompress + parse)", best(lambda: kmm.trace.load(sample), a.repeat)[0], n)
    with tempfile.TemporaryDirectory() as d:
        plain = Path(d) / "sample.perf.txt"
        plain.write_bytes(lzma.decompress(sample.read_bytes()))
        row("load plain text (parse)", best(lambda: kmm.trace.load(plain), a.repeat)[0], n)
        row("stat (perf kmem numbers)", best(lambda: kmm.trace.stat(t), a.repeat)[0], n)
        row("load plain + stat + format", best(lambda: kmm.trace.stat(kmm.trace.load(plain)).format(), a.repeat)[0], n)
        row("load .xz + stat + format", best(lambda: kmm.trace.stat(kmm.trace.load(sample)).format(), a.repeat)[0], n)
        if hasattr(kmm.trace, "replay"):
            def rep():
                return kmm.trace.replay(t, kmm.Machine(memory="8G", cpus=2))
            secs, rpt = best(rep, a.repeat)
            print(f"| replay (incl. 8G machine boot) | {secs * 1e3:8.1f} ms | {n / secs / 1e6:6.2f} M events/s |")
            print(f"| replay, core loop as reported | {rpt.seconds * 1e3:8.1f} ms | {rpt.events_per_second / 1e6:6.2f} M events/s |")
        perf = shutil.which("perf")
        if perf and not a.no_perf and PERF_DATA_XZ.exists():
            data = Path(d) / "sample.perf.data"
            data.write_bytes(lzma.decompress(PERF_DATA_XZ.read_bytes()))
            for mode in ("--slab", "--page"):
                cmd = [perf, "kmem", "-i", str(data), mode, "stat"]
                secs, _ = best(lambda: subprocess.run(cmd, capture_output=True, check=True), a.repeat)
                row(f"`perf kmem {mode} stat` (perf.data)", secs, n)
            secs, _ = best(
                lambda: subprocess.run([perf, "script", "-i", str(data)], capture_output=True, check=True), a.repeat
            )
            row("`perf script` (perf.data -> text)", secs, n)
        else:
            print("\n(perf not run: not installed, --no-perf, or no sample.perf.data.xz)")
    print(f"\nhost: {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
