"""The seed's 12.5 claim, measured: vmalloc memory costs TLB misses that
the direct map does not (issue 5).

Run: python benches/bench_tlb.py [--plot tlb.png]

For each buffer size, the same number of bytes is walked, one access per
4 KiB page, PASSES times, through:
  - the direct map: order-10 blocks from the page allocator (the direct map
    maps them with 2 MiB / 1 GiB pages), and
  - a vmalloc buffer (4 KiB mappings of scattered pages),
on CPU 0 of a 4 GiB x86_64 machine with the default (Skylake) TLB, after a
full TLB flush. Printed: TLB misses (both levels missed), page walks and
page-table entries read, per kind, and the vmalloc / direct-map ratio.
With --plot (needs matplotlib: pip install matplotlib) it draws misses per
access against the buffer size for both kinds.
"""

from __future__ import annotations

import argparse

import kmm

PASSES = 4
SIZES_MIB = [1, 2, 4, 6, 8, 16, 32]


def walk(m: kmm.Machine, ranges: list[tuple[int, int]]) -> dict[str, int]:
    m.flush_tlb_all()
    before = m.tlb_stats()[0]
    for _ in range(PASSES):
        for addr, n in ranges:
            m.access(addr, n)  # one access per page, in one call
    after = m.tlb_stats()[0]
    return {k: after[k] - before[k] for k in ("hits", "l2_hits", "misses", "walks", "walk_reads")}


def measure(size: int) -> tuple[dict[str, int], dict[str, int]]:
    m = kmm.Machine(memory="4G", cpus=2)
    with m.on_cpu(0):
        order = 10
        block = m.page_size << order
        blocks = [m.get_free_pages(kmm.GFP_KERNEL, order) for _ in range(max(1, size // block))]
        direct = walk(m, [(a, min(block, size)) for a in blocks])
        v = m.vmalloc(size)
        vm = walk(m, [(v.addr, size)])
        m.vfree(v)
        for a in blocks:
            m.free_pages(a, order)
    return direct, vm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot", metavar="PNG", help="draw misses per access against buffer size")
    a = ap.parse_args()
    rows = []
    print(f"{'MiB':>4} {'accesses':>9} | {'direct misses':>13} {'walks':>6} {'reads':>6} | "
          f"{'vmalloc misses':>14} {'walks':>6} {'reads':>6} | {'miss ratio':>10}")
    for mib in SIZES_MIB:
        size = mib << 20
        d, v = measure(size)
        accesses = PASSES * size // 4096
        ratio = v["misses"] / max(d["misses"], 1)
        rows.append((mib, accesses, d, v))
        print(f"{mib:>4} {accesses:>9} | {d['misses']:>13} {d['walks']:>6} {d['walk_reads']:>6} | "
              f"{v['misses']:>14} {v['walks']:>6} {v['walk_reads']:>6} | {ratio:>9.0f}x")
    if a.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise SystemExit("--plot needs matplotlib (pip install matplotlib)")
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [r[0] for r in rows]
        ax.plot(xs, [r[2]["misses"] / r[1] for r in rows], "o-", label="direct map (2M/1G pages)")
        ax.plot(xs, [r[3]["misses"] / r[1] for r in rows], "s-", label="vmalloc (4K pages)")
        ax.axvline(1536 * 4096 / (1 << 20), ls=":", c="grey", label="STLB reach, 4K pages (6 MiB)")
        ax.set_xlabel("buffer size (MiB)")
        ax.set_ylabel(f"TLB misses per access ({PASSES} passes)")
        ax.set_title("kmm: TLB misses, direct map vs vmalloc (Skylake-like TLB)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"plot written to {a.plot}")


if __name__ == "__main__":
    main()
