"""Big machines (issue 13, part 1), functionally (timing is in
benches/bench_big_machines.py): 1 TiB and 16 TiB x86_64 machines boot and
pass check(), hand out and take back pages at both ends of their memory,
and print /proc/buddyinfo and pagetypeinfo counts that follow the kernel's
formulas for their zone sizes; a 256-CPU machine keeps per-CPU page lists
and slab state on CPU 255 and replays the packaged sample trace.

Expected counts are computed here from the zone spans alone, the way the
kernel's boot frees memory (mm/mm_init.c memblock_free_all ->
__free_pages_memory: maximal aligned chunks of at most MAX_PAGE_ORDER) and
counts pageblocks (mm/vmstat.c pagetypeinfo_showblockcount_print: one per
pageblock_nr_pages step from zone_start_pfn), not from kmm's code.
"""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

import kmm
from kmm.errors import DoubleFreeError

MAX_ORDER = 10
PAGEBLOCK = 512
SAMPLE = Path(kmm.__file__).parent / "data" / "sample.perf.txt.xz"


def boot_chunks(start: int, end: int) -> list[int]:
    """nr_free per order after freeing [start, end) in maximal aligned chunks."""
    counts = [0] * (MAX_ORDER + 1)
    pfn = start
    while pfn < end:
        order = MAX_ORDER
        while pfn % (1 << order) or pfn + (1 << order) > end:
            order -= 1
        counts[order] += 1
        pfn += 1 << order
    return counts


def parse_buddyinfo(text: str) -> dict[str, list[int]]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if parts[:2] == ["Node", "0,"] and parts[2] == "zone":
            out[parts[3]] = [int(x) for x in parts[4:]]
    return out


def parse_blockcounts(text: str) -> dict[str, list[int]]:
    out = {}
    section = False
    for line in text.splitlines():
        if line.startswith("Number of blocks type"):
            section = True
            continue
        parts = line.split()
        if section and parts[:3] == ["Node", "0,", "zone"]:
            out[parts[3]] = [int(x) for x in parts[4:]]
        elif section and not line.strip():
            break
    return out


def managed_runs(m: kmm.Machine) -> dict[str, tuple[int, int]]:
    """Each populated zone's free run at boot: its span, less the last frame
    of a 2^32-frame machine (kmm's u32 pfns: it is reserved)."""
    runs = {}
    for z in m.zones:
        if z.spanned:
            runs[z.name] = (z.start_pfn, min(z.start_pfn + z.spanned, (1 << 32) - 1))
    return runs


@pytest.fixture(scope="module", params=["1T", "16T"])
def big(request):
    return kmm.Machine(memory=request.param)


def test_boots_and_passes_check(big):
    assert big.check() == []
    nr = big.memory // 4096
    assert big.nr_pages == nr
    # machine-1: zones from pfn 1 to the end of RAM.
    spans = [(z.start_pfn, z.start_pfn + z.spanned) for z in big.zones if z.spanned]
    assert spans[0][0] == 1 and spans[-1][1] == nr
    runs = managed_runs(big)
    assert big.totalram_pages() == sum(e - s for s, e in runs.values())
    assert big.nr_free_pages() == big.totalram_pages()


def test_buddyinfo_and_pagetypeinfo_follow_the_kernels_formulas(big):
    # A fresh machine has only the boot frees on its lists (kmalloc caches
    # made at boot take their slabs later, at first use).
    fresh = kmm.Machine(memory=big.memory)
    buddy = parse_buddyinfo(fresh.proc.buddyinfo())
    blocks = parse_blockcounts(fresh.proc.pagetypeinfo())
    for name, (s, e) in managed_runs(fresh).items():
        assert buddy[name] == boot_chunks(s, e), name
        z = next(z for z in fresh.zones if z.name == name)
        assert z.nr_free == boot_chunks(s, e)
        assert z.nr_free_by_migratetype["Movable"] == boot_chunks(s, e)
        # Unmovable, Movable, Reclaimable, HighAtomic, Isolate.
        nblocks = len(range(z.start_pfn, z.start_pfn + z.spanned, PAGEBLOCK))
        assert blocks[name] == [0, nblocks, 0, 0, 0], name
    assert fresh.check() == []


def test_alloc_and_free_at_both_ends_of_memory(big):
    m = big
    top = m.nr_pages - 1
    # The low end: ZONE_DMA's first pages, then a max-order block from the
    # bottom of ZONE_NORMAL (the head of its free list).
    # (An unmovable request claims the largest movable block first:
    # __rmqueue_claim walks from MAX_PAGE_ORDER down, so DMA's first
    # max-order block, at pfn 1024.)
    low = m.alloc_pages(kmm.GFP_DMA, 0)
    assert low.zone == "DMA" and low.pfn == 1024
    normal = next(z for z in m.zones if z.name == "Normal")
    blk = m.alloc_pages(kmm.GFP_KERNEL | kmm.__GFP_COMP, MAX_ORDER)
    assert blk.zone == "Normal" and blk.pfn == normal.start_pfn and blk.order == MAX_ORDER
    assert "head" in blk.flags and blk.refcount == 1
    assert m.check() == []
    # The high end: the last max-order block is free, and reads so.
    last_block = (top >> MAX_ORDER) << MAX_ORDER
    if m.nr_pages == 1 << 32:
        # Its last frame is reserved: the block is split below it.
        assert "reserved" in m.pfn_to_page(top).flags
        head = m.pfn_to_page(last_block)
        assert head.flags == ["buddy"] and head.order == MAX_ORDER - 1
    else:
        head = m.pfn_to_page(last_block)
        assert head.flags == ["buddy"] and head.order == MAX_ORDER
        assert head.refcount == 0 and head.migratetype == "Movable"
    # Freeing a page of it is a double free, as for any free page.
    with pytest.raises(DoubleFreeError):
        m.free_pages(m.pfn_to_page(top - 1), 0)
    assert m.check() == []
    m.free_pages(blk, MAX_ORDER)
    m.free_pages(low, 0)
    assert m.check() == []


def test_max_order_blocks_are_handed_out_bottom_up_to_the_top_and_taken_back():
    # 1 TiB ends max-order aligned: its last block is the Normal list's
    # last. Taking max-order blocks up to the top one would need 2^18
    # calls; a machine with a 64 MiB Normal zone shows the same: blocks come
    # in ascending order until the zone's low watermark sends requests to
    # DMA32 (get_page_from_freelist's fast path), leaving the top block free.
    m = kmm.Machine(memory="4160M")
    normal = next(z for z in m.zones if z.name == "Normal")
    end = normal.start_pfn + normal.spanned
    got = []
    while True:
        p = m.alloc_pages(kmm.GFP_KERNEL, MAX_ORDER)
        got.append(p)
        if p.zone != "Normal":
            break
        assert m.check() == []
    normal_pfns = [p.pfn for p in got if p.zone == "Normal"]
    blocks = list(range(normal.start_pfn, end, 1 << MAX_ORDER))
    assert normal_pfns == blocks[: len(normal_pfns)]
    left = blocks[len(normal_pfns):]
    assert left and left[-1] == end - (1 << MAX_ORDER)
    for pfn in left:
        assert m.pfn_to_page(pfn).flags == ["buddy"] and m.pfn_to_page(pfn).order == MAX_ORDER
    now = next(z for z in m.zones if z.name == "Normal")
    assert now.nr_free[MAX_ORDER] == len(left)
    for p in reversed(got):
        m.free_pages(p, MAX_ORDER)
        assert m.check() == []
    now = next(z for z in m.zones if z.name == "Normal")
    assert now.free_pages == normal.free_pages and now.nr_free == normal.nr_free


@pytest.fixture(scope="module")
def smp256():
    return kmm.Machine(memory="8G", cpus=256)


def test_256_cpus_boot_with_a_pageset_each(smp256):
    m = smp256
    assert m.cpus == 256 and m.check() == []
    normal = next(z for z in m.zones if z.name == "Normal")
    st = m.pcp_state("Normal", 255)
    # zone_batchsize: min(managed/1024, 1 MiB of pages)/4 -> 2^n - 1.
    batch = min(normal.managed >> 10, 256) // 4
    batch = (1 << ((batch + batch // 2).bit_length() - 1)) - 1
    assert st["batch"] == batch
    # zone_highsize: high_min = low watermark / CPUs, high_max = managed / 8 / CPUs
    # (at least 4 batches each).
    assert st["high_min"] == max(normal.low // 256, 4 * batch)
    assert st["high_max"] == max(normal.managed // 8 // 256, 4 * batch)
    assert st["count"] == 0


def test_pcp_and_slab_state_on_cpu_255(smp256):
    m = smp256
    with m.on_cpu(255):
        assert m.smp_processor_id() == 255
        p = m.alloc_page(kmm.GFP_KERNEL)
        st = m.pcp_state("Normal", 255)
        # rmqueue_bulk refilled CPU 255's list with a batch, one page taken.
        assert st["count"] == st["batch"] - 1
        assert m.pcp_state("Normal", 254)["count"] == 0
        m.free_page(p)
        assert m.pcp_state("Normal", 255)["count"] == st["batch"]
        c = m.kmem_cache_create("bigmem_test", 96)
        objs = [c.alloc() for _ in range(10)]
        assert c.objects_in_use() == 10
        for o in objs:
            c.free(o)
        assert c.objects_in_use() == 0
        b = m.kmalloc(64)
        m.kfree(b)
    assert m.check() == []


def test_replay_on_256_cpus(smp256):
    lines = lzma.open(SAMPLE, "rt").read().splitlines()[:3000]
    trace = kmm.trace.parse("\n".join(lines) + "\n")
    m = kmm.Machine(memory="8G", cpus=256)
    r = kmm.trace.replay(trace, m, free_at_end=True)
    assert r.events > 0
    assert m.check() == []
