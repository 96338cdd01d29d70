"""Big machines (issue 13, part 1): boot time and host memory per size, and
the host memory each simulated CPU costs.

Run: python benches/bench_big_machines.py [--sizes 64G,1T,4T,16T] [--cpus 256]

Each figure comes from a fresh subprocess (so peak RSS is that machine's
alone): the child imports kmm, notes ru_maxrss, boots
``kmm.Machine(memory=SIZE)`` (x86_64, 2 CPUs) timing the call, and prints
the boot time, the peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
and the peak RSS minus the one after ``import kmm``. A size whose boot fails
prints the error instead.

Per-CPU memory: the peak RSS of a 64 GiB machine with ``--cpus`` CPUs minus
that with 2 CPUs, over the extra CPUs; once right after boot, once after a
kmalloc(64)/kfree and an order-0 page alloc/free on every CPU (which fills
each CPU's pcp lists and slab CPU state).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import kmm
size, cpus, touch = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    m = kmm.Machine(memory=size, cpus=cpus)
except Exception as e:  # report, do not crash the bench
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    sys.exit(0)
boot = time.perf_counter() - t0
if touch:
    for c in range(cpus):
        with m.on_cpu(c):
            b = m.kmalloc(64)
            m.kfree(b)
            p = m.alloc_pages(kmm.GFP_KERNEL, 0)
            m.free_pages(p)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"boot_s": boot, "peak_kib": peak, "import_kib": base}))
"""


def run(size: str, cpus: int, touch: bool = False) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, size, str(cpus), "1" if touch else "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64G,1T,4T,16T")
    ap.add_argument("--cpus", type=int, default=256)
    args = ap.parse_args()
    print(f"{'size':>6} {'boot':>9} {'peak RSS':>10} {'above import':>13}")
    for size in args.sizes.split(","):
        r = run(size, 2)
        if "error" in r:
            print(f"{size:>6}  failed: {r['error']}")
            continue
        print(
            f"{size:>6} {r['boot_s']:8.3f}s {r['peak_kib'] / 1024:8.1f}M {(r['peak_kib'] - r['import_kib']) / 1024:11.1f}M"
        )
    n = args.cpus
    for touch in (False, True):
        a, b = run("64G", 2, touch), run("64G", n, touch)
        if "error" in a or "error" in b:
            print(f"per-CPU ({n} CPUs): failed: {a.get('error') or b.get('error')}")
            continue
        per = (b["peak_kib"] - a["peak_kib"]) / (n - 2)
        what = "after a kmalloc+page pair on every CPU" if touch else "after boot"
        print(
            f"64G, {n} CPUs {what}: boot {b['boot_s']:.3f}s, peak RSS {b['peak_kib'] / 1024:.1f}M "
            f"(2 CPUs: {a['peak_kib'] / 1024:.1f}M): {per:.1f} KiB per extra CPU"
        )


if __name__ == "__main__":
    main()
