"""Big recordings: what shaping and warming a machine from a recording of a
big server costs (trace/shape.rs `MAX_RECORDED_PAGES`).

Run: python benches/bench_big_recordings.py [--add 0,64G,240G,1T]

No real recording of a big server ships with kmm, so each size is warm2
(the bundle kmm ships, python/kmm/data/warm2: a 2-CPU VM with 24 GiB) with SIZE of
free max-order blocks added to its Normal zone, consistently in every /proc
file that counts them (zoneinfo's spanned/present/managed/free, buddyinfo,
pagetypeinfo's free lists and pageblocks, meminfo), in a temporary
directory. Each size is replayed by ``kmm replay DIR`` in a fresh process,
under ``/usr/bin/time``: wall time and peak RSS of the whole replay (load,
shape, warm start, replay of warm2's 2 M events, report).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import kmm

WARM2 = Path(kmm.__file__).parent / "data" / "warm2"  # the bundle kmm ships


def grown_bundle(dst: Path, add_bytes: int) -> None:
    """warm2 with `add_bytes` of free order-10 blocks in Normal."""
    n = add_bytes >> 22  # 4 MiB blocks
    x = n << 10  # pages
    shutil.copytree(WARM2, dst)
    for f in dst.iterdir():
        f.chmod(0o644)

    def edit(name: str, fn) -> None:
        p = dst / name
        p.write_text(fn(p.read_text()))

    zone = re.compile(r"Node 0, zone   Normal\n.*?(?=\nNode|\Z)", re.S)

    def zoneinfo(t: str) -> str:
        def grow(m: re.Match) -> str:
            blk = m.group(0)
            for key in ("pages free", "spanned", "present", "managed", "nr_free_pages", "nr_free_pages_blocks"):
                blk = re.sub(rf"(\n\s+{key}\s+)(\d+)", lambda v: v.group(1) + str(int(v.group(2)) + x), blk, count=1)
            return blk
        return zone.sub(grow, t, count=1)

    for ph in ("start", "end"):
        edit(f"{ph}.zoneinfo.txt", zoneinfo)
        edit(f"{ph}.buddyinfo.txt", lambda t: re.sub(
            r"(zone\s+Normal(?:\s+\d+){10}\s+)(\d+)", lambda v: v.group(1) + str(int(v.group(2)) + n), t))
        edit(f"{ph}.pagetypeinfo.txt", lambda t: re.sub(
            r"(Node 0, zone\s+Normal\s+\d+\s+)(\d+)", lambda v: v.group(1) + str(int(v.group(2)) + 2 * n),
            re.sub(r"(zone\s+Normal, type\s+Movable(?:\s+\d+){10}\s+)(\d+)",
                   lambda v: v.group(1) + str(int(v.group(2)) + n), t)))

        def meminfo(t: str) -> str:
            for key in ("MemTotal", "MemFree", "MemAvailable"):
                t = re.sub(rf"({key}:\s+)(\d+)", lambda v: v.group(1) + str(int(v.group(2)) + x * 4), t)
            return t
        edit(f"{ph}.meminfo.txt", meminfo)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--add", default="0,64G,240G,1T", help="free memory to add, comma-separated sizes")
    a = ap.parse_args()
    print(f"kmm {kmm.__version__}, warm2 + free max-order blocks in Normal; kmm replay DIR in a fresh process")
    print(f"{'added':>8} {'recorded span':>14} {'shaped':>8} {'wall':>8} {'peak RSS':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.add.split(","):
            add = kmm.parse_size(size) if size != "0" else 0
            d = Path(tmp) / f"rec{size}"
            grown_bundle(d, add)
            z = re.search(r"Node 0, zone   Normal\n.*?spanned\s+(\d+).*?start_pfn:\s+(\d+)",
                          (d / "start.zoneinfo.txt").read_text(), re.S)
            span_gib = (int(z.group(2)) + int(z.group(1))) * 4096 / 2**30  # the zone's end: the machine's span
            r = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "kmm", "replay", str(d)],
                               capture_output=True, text=True)
            t = re.search(r"TIME (\S+) (\d+)", r.stderr)
            shaped = "warm" if "shaped like the recording" in r.stdout else "cold"
            if r.returncode != 0 or not t:
                print(f"{size:>8} {span_gib:>10.0f} GiB failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            print(f"{size:>8} {span_gib:>10.0f} GiB {shaped:>8} {float(t.group(1)):>6.2f} s {int(t.group(2)) / 1024:>6.0f} MiB")
            shutil.rmtree(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
