"""GFP flags: values, kernel-identical formatting, parse/format round trips."""

from __future__ import annotations

import re

import pytest

import kmm
from conftest import sample_trace_lines, free_pages


def test_composite_values_are_the_kernels():
    # include/linux/gfp_types.h (6.18); hex values independent of the model.
    assert kmm.GFP_KERNEL == 0xCC0
    assert kmm.GFP_ATOMIC == 0x820
    assert kmm.GFP_NOWAIT == 0x2800
    assert kmm.GFP_NOIO == 0xC00
    assert kmm.GFP_NOFS == 0xC40
    assert kmm.GFP_USER == 0x100CC0
    assert kmm.GFP_DMA == 0x1
    assert kmm.GFP_DMA32 == 0x4
    assert kmm.GFP_HIGHUSER == 0x100CC2
    assert kmm.GFP_HIGHUSER_MOVABLE == 0x100CCA
    assert kmm.GFP_KERNEL_ACCOUNT == 0x400CC0
    assert kmm.__GFP_ZERO == 0x100
    assert kmm.__GFP_COMP == 0x40000
    assert kmm.gfp.__GFP_NOFAIL == 0x8000


def test_every_bit_has_its_kernel_value():
    bits = [
        "__GFP_DMA", "__GFP_HIGHMEM", "__GFP_DMA32", "__GFP_MOVABLE", "__GFP_RECLAIMABLE",
        "__GFP_HIGH", "__GFP_IO", "__GFP_FS", "__GFP_ZERO", None, "__GFP_DIRECT_RECLAIM",
        "__GFP_KSWAPD_RECLAIM", "__GFP_WRITE", "__GFP_NOWARN", "__GFP_RETRY_MAYFAIL",
        "__GFP_NOFAIL", "__GFP_NORETRY", "__GFP_MEMALLOC", "__GFP_COMP", "__GFP_NOMEMALLOC",
        "__GFP_HARDWALL", "__GFP_THISNODE", "__GFP_ACCOUNT", "__GFP_ZEROTAGS",
    ]
    for i, name in enumerate(bits):
        if name:
            assert getattr(kmm, name) == 1 << i, name


@pytest.mark.parametrize(
    "mask, text",
    [
        (0, "none"),
        (0xCC0, "GFP_KERNEL"),
        (0xDC0, "GFP_KERNEL|__GFP_ZERO"),
        (0x40CC0, "GFP_KERNEL|__GFP_COMP"),
        (0xC20, "GFP_ATOMIC|__GFP_DIRECT_RECLAIM"),
        (0xCC1, "GFP_KERNEL|GFP_DMA"),
        (0x1C20CA, "GFP_TRANSHUGE_LIGHT"),
        (0x200, "0x200"),
        (
            0xC40 | 0x2 | 0x8 | 0x2000 | 0x10000 | 0x40000 | 0x100000,
            "GFP_NOFS|__GFP_HIGHMEM|__GFP_MOVABLE|__GFP_NOWARN|__GFP_NORETRY|__GFP_COMP|__GFP_HARDWALL",
        ),
    ],
)
def test_format_matches_the_kernel(mask, text):
    assert kmm.gfp.format(mask) == text
    assert kmm.gfp.parse(text) == mask


def test_every_gfp_string_in_the_real_trace_round_trips():
    seen = set()
    for line in sample_trace_lines():
        for s in re.findall(r"gfp_flags=(\S+)", line):
            seen.add(s)
    assert len(seen) >= 30  # the sample trace has 36 distinct masks
    for s in seen:
        assert kmm.gfp.format(kmm.gfp.parse(s)) == s, s


def test_parse_rejects_unknown_names():
    with pytest.raises(kmm.BadGfpError, match="GFP_KERNAL"):
        kmm.gfp.parse("GFP_KERNAL")
    with pytest.raises(ValueError):
        kmm.gfp.parse("GFP_KERNEL|")


def test_gfp_zone_and_zonelists(m):
    assert m.gfp_zone(kmm.GFP_KERNEL) == "Normal"
    assert m.gfp_zone(kmm.GFP_DMA) == "DMA"
    assert m.gfp_zone(kmm.GFP_DMA32) == "DMA32"
    assert m.gfp_zone(kmm.GFP_HIGHUSER_MOVABLE) == "Movable"
    # 1 GiB x86_64: Normal is empty, so GFP_KERNEL falls back DMA32 -> DMA.
    assert m.zonelist(kmm.GFP_KERNEL) == ["DMA32", "DMA"]
    assert m.zonelist(kmm.GFP_DMA) == ["DMA"]
    big = kmm.Machine(memory="8G")
    assert big.zonelist(kmm.GFP_KERNEL) == ["Normal", "DMA32", "DMA"]
    assert big.zonelist(kmm.GFP_HIGHUSER_MOVABLE) == ["Normal", "DMA32", "DMA"]
    i386 = kmm.Machine(arch="i386", memory="2G")
    assert i386.zonelist(kmm.GFP_HIGHUSER) == ["HighMem", "Normal", "DMA"]
    assert i386.zonelist(kmm.GFP_KERNEL) == ["Normal", "DMA"]
    assert i386.gfp_zone(kmm.GFP_DMA32) == "Normal"  # no DMA32 zone on i386


@pytest.mark.parametrize("bad", [0x3, 0x5, 0x6, 0x7, 0xB, 0xD, 0xE, 0xF])
def test_bad_zone_combinations_raise(m, bad):
    with pytest.raises(kmm.BadGfpError):
        m.gfp_zone(bad)
    before = free_pages(m)
    with pytest.raises(kmm.BadGfpError):
        m.alloc_pages(kmm.GFP_KERNEL | bad, 0)
    assert free_pages(m) == before
