"""/proc views from Python: the kernel's formats, and values computed independently."""

from __future__ import annotations

import re

import kmm
from conftest import real


def shape(text: str) -> list[str]:
    """Lines with every number (and the padding before it) replaced by " N":
    labels, indentation and order remain, whatever the numbers' widths."""
    return [re.sub(r" *\d+", " N", line) for line in text.splitlines()]


def test_buddyinfo_format_and_boot_values(m):
    text = m.proc.buddyinfo()
    # Same layout as the real file: "Node 0, zone %8s " then "%6lu " per order.
    real_line = real("buddyinfo.txt").splitlines()[0]
    ours = text.splitlines()[0]
    assert len(ours) == len(real_line)
    assert ours.startswith("Node 0, zone      DMA ")
    # A fresh zone [1, 4096) freed in maximal aligned chunks: orders 0..9 once, then 3 x order 10.
    assert [int(x) for x in ours.split()[4:]] == [1] * 10 + [3]
    # DMA32 [4096, 262144): 252 order-10 blocks.
    assert [int(x) for x in text.splitlines()[1].split()[4:]] == [0] * 10 + [252]
    assert [z.nr_free for z in m.zones if z.populated] == [
        [int(x) for x in line.split()[4:]] for line in text.splitlines()
    ]


def test_zoneinfo_has_the_real_files_structure():
    m = kmm.Machine(memory="24G")  # DMA, DMA32 and Normal populated, like the real machine
    assert shape(m.proc.zoneinfo()) == shape(real("zoneinfo.txt"))


def test_pagetypeinfo_and_meminfo_have_the_real_structure():
    m = kmm.Machine(memory="24G")
    assert shape(m.proc.pagetypeinfo()) == shape(real("pagetypeinfo.txt"))
    ours = [line.split(":")[0] for line in m.proc.meminfo().splitlines()]
    theirs = [line.split(":")[0] for line in real("meminfo.txt").splitlines()]
    assert ours == theirs


def test_meminfo_values_follow_allocations(m):
    info = m.proc.meminfo_dict()
    assert info["MemTotal"] == m.totalram_pages() * 4
    assert info["MemFree"] == m.nr_free_pages() * 4
    p = m.alloc_pages(kmm.GFP_KERNEL, 4)
    assert m.proc.meminfo_dict()["MemFree"] == info["MemFree"] - 16 * 4
    line = [x for x in m.proc.meminfo().splitlines() if x.startswith("MemFree:")][0]
    assert line == f"MemFree:        {info['MemFree'] - 64:>8} kB"
    m.free_pages(p, 4)
    assert m.proc.meminfo_dict()["MemFree"] == info["MemFree"]
    assert info["VmallocTotal"] == 34359738367  # x86_64 4-level, as on the real machine


def test_i386_meminfo_reports_highmem():
    m = kmm.Machine(arch="i386", memory="2G")
    info = m.proc.meminfo_dict()
    high = [z for z in m.zones if z.name == "HighMem"][0]
    assert info["HighTotal"] == high.managed * 4
    assert info["LowTotal"] == info["MemTotal"] - info["HighTotal"]
    assert info["HighFree"] == high.free_pages * 4


def test_zone_fields_match_zoneinfo(m):
    text = m.proc.zoneinfo()
    for z in m.zones:
        block = text.split(f"zone {z.name:>8}\n")[1].split("\nNode")[0]
        assert re.search(rf"\n        min      {z.min}\n", block)
        assert re.search(rf"\n        spanned  {z.spanned}\n", block)
        assert f"protection: ({', '.join(map(str, z.lowmem_reserve))})" in block


def test_min_free_kbytes_formula_and_override():
    # 1 GiB x86_64 with THP: 512 pages * 2 populated zones * 11 = 11264 pages = 45056 kB
    # (below the 5% cap of 13107 pages), as khugepaged's set_recommended_min_free_kbytes.
    assert kmm.Machine(memory="1G").min_free_kbytes == 45056
    # Without THP: int_sqrt(lowmem_kbytes * 16) = 4 * sqrt(1048572) = 4095.
    m = kmm.Machine(memory="1G", transparent_hugepage=False)
    assert m.min_free_kbytes == 4095
    pages_min = 4095 // 4
    # Split over zones in proportion to managed pages (floor each share).
    lowmem = sum(z.managed for z in m.zones)
    for z in m.zones:
        if z.name in ("DMA", "DMA32", "Normal"):
            assert z.min == pages_min * z.managed // lowmem
        elif z.name == "Movable":
            assert z.min == 32  # highmem/movable get clamp(managed/1024, 32, 128), as in the real zoneinfo
    o = kmm.Machine(memory="1G", min_free_kbytes=65536)
    assert o.min_free_kbytes == 65536
    lowmem_mins = sum(z.min for z in o.zones if z.name in ("DMA", "DMA32", "Normal"))
    assert lowmem_mins in range(16384 - 2, 16385)  # 65536 kB = 16384 pages, floored per zone


def test_watermark_scale_factor_widens_low_high():
    a = kmm.Machine(memory="2G", transparent_hugepage=False)
    b = kmm.Machine(memory="2G", transparent_hugepage=False, watermark_scale_factor=1000)
    za = [z for z in a.zones if z.name == "DMA32"][0]
    zb = [z for z in b.zones if z.name == "DMA32"][0]
    assert za.min == zb.min
    # delta = max(min/4, managed * wsf / 10000)
    assert zb.low - zb.min == max(zb.min // 4, zb.managed * 1000 // 10000)
    assert zb.high - zb.low == zb.low - zb.min
    assert za.low - za.min == max(za.min // 4, za.managed * 10 // 10000)
