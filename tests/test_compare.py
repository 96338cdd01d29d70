"""kmm replay --compare (issue 12, part 2): the figures, the mmtests-style
report, the zone-lock counter, mixed pageblocks and slabinfo's loss."""

from __future__ import annotations

from pathlib import Path

import pytest

import kmm
from kmm import cli, compare

SAMPLE = str(Path(kmm.__file__).parent / "data" / "sample.perf.txt.xz")


def zone(m, name):
    return next(z for z in m.zones if z.name == name)


# ---- zone->lock acquisitions ---------------------------------------------------------------------


def test_pcp_hits_take_no_zone_lock_and_buddy_orders_do():
    """mm/page_alloc.c: orders up to PAGE_ALLOC_COSTLY_ORDER (3) are served
    from the per-CPU lists (rmqueue_pcplist: pcp->lock only; a refill
    takes zone->lock once for a whole batch); order 4 goes to rmqueue_buddy
    and free_one_page, each under zone->lock."""
    m = kmm.Machine(memory="1G", cpus=1)
    n = zone(m, "Normal") if any(z.name == "Normal" and z.populated for z in m.zones) else zone(m, "DMA32")
    p = m.alloc_pages(kmm.GFP_KERNEL)  # the first: a refill (one acquisition)
    m.free_pages(p)
    before = n.lock_acquisitions if n.name == "Normal" else zone(m, n.name).lock_acquisitions
    for _ in range(10):
        m.free_pages(m.alloc_pages(kmm.GFP_KERNEL))
    assert zone(m, n.name).lock_acquisitions == before  # pcp hits: no zone lock
    q = m.alloc_pages(kmm.GFP_KERNEL, order=4)
    assert zone(m, n.name).lock_acquisitions == before + 1
    m.free_pages(q, order=4)
    assert zone(m, n.name).lock_acquisitions == before + 2
    m.check()


# ---- mixed pageblocks ------------------------------------------------------------------------------


def test_mixed_blocks_of_a_fresh_machine_are_none():
    """pagetypeinfo_showmixedcount_print counts pageblocks holding a page
    allocated for another migratetype: a freshly booted machine has none."""
    m = kmm.Machine(memory="256M", cpus=2)
    got = m.mixed_blocks()
    assert set(got) == {z.name for z in m.zones if z.populated}
    for row in got.values():
        assert set(row) >= {"Unmovable", "Movable", "Reclaimable"}
        assert sum(row.values()) == 0


def test_a_fallback_makes_a_mixed_block():
    """Unmovable allocations that exhaust the unmovable free lists fall back
    to a movable block (__rmqueue_fallback); a block whose ownership did not
    change then holds unmovable pages among movable ones: a mixed block,
    counted under the block's type (Movable)."""
    m = kmm.Machine(memory="64M", cpus=1)
    held = []
    with m.trace.record("kmem:mm_page_alloc_extfrag") as r:
        while not [e for e in r.events if "change_ownership=0" in str(e)] and len(held) < 20000:
            held.append(m.alloc_pages(kmm.GFP_KERNEL))
    assert any("change_ownership=0" in str(e) for e in r.events)
    # The fallback refilled the pcp list: hand its pages out too (a page
    # still on a pcp list is free, not an allocation of any type).
    for _ in range(256):
        try:
            held.append(m.alloc_pages(kmm.GFP_KERNEL))
        except kmm.OutOfMemoryError:
            break
    assert sum(row["Movable"] for row in m.mixed_blocks().values()) >= 1
    for p in held:
        m.free_pages(p)
    m.check()


# ---- slab usage as tools/mm/slabinfo computes it -----------------------------------------------------


def test_slab_usage_is_slabinfo_space_and_loss():
    m = kmm.Machine(memory="256M", cpus=1, slab_nomerge=True)
    c = m.kmem_cache_create("t_loss", 200)
    objs = [c.alloc() for _ in range(3 * c.objs_per_slab)]
    got = compare.slab_usage(m)["t_loss"]
    slabs = 3
    space = slabs * (m.page_size << c.order)
    # slab_waste: slab_size - objects * object_size (tools/mm/slabinfo.c).
    assert got == (space, space - len(objs) * 200)
    for o in objs:
        c.free(o)


# ---- the report ------------------------------------------------------------------------------------


def run_(settings, figures):
    return compare.Run(settings=settings, report=None, figures=figures)  # type: ignore[arg-type]


def test_format_marks_differences_in_mmtests_style():
    a = run_("", {"peak_used_mib": 100.0, "fallbacks": 4, "zone_lock": 10})
    b = run_("slub_min_order=1", {"peak_used_mib": 100.0, "fallbacks": 5, "zone_lock": 0})
    c = compare.Comparison(a, b, name="x")
    text = c.format()
    rows = {line.split("  ")[1].strip(): line for line in text.splitlines() if line.startswith("  ") and "%" in line}
    fb = next(v for k, v in rows.items() if k.startswith("Fallbacks"))
    assert fb.split()[-2:] == ["*", "25.00%*"]  # (5 - 4) / 4
    peak = next(v for k, v in rows.items() if k.startswith("Peak memory"))
    assert peak.rstrip().endswith("(   0.00%)")
    zl = next(v for k, v in rows.items() if k.startswith("Zone lock"))
    assert zl.split()[-2:] == ["*", "-100.00%*"]
    assert c.differences() == ["fallbacks", "zone_lock"]
    assert "2 of 3 figures differ: fallbacks, zone_lock" in text
    assert compare.change_pct(0, 0) == 0.0 and compare.change_pct(0, 3) is None


def test_compare_the_sample_under_two_slab_orders():
    """slub_min_order=1 puts every cache's slabs at order >= 1, so slab memory
    can only grow, and each cache's slab size is a multiple of 8 KiB."""
    t = kmm.trace.load(SAMPLE)
    c = compare.compare(t, "", "slub_min_order=1", probe=False)
    assert c.a.figures["slab_mib"] <= c.b.figures["slab_mib"]
    assert "slab_mib" in c.differences()
    for name, (space, loss) in c.b.caches.items():
        assert space % 8192 == 0, name
        assert 0 <= loss <= space
    assert c.a.report.events == c.b.report.events == len(t)


def test_cli_compare(tmp_path, capsys):
    png = tmp_path / "c.png"
    rc = cli.main(["replay", SAMPLE, "--compare", "", "vm.percpu_pagelist_high_fraction=8", "--plot", str(png)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "A: (default)" in out and "B: vm.percpu_pagelist_high_fraction=8" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("pcp high at the end"))
    assert "*" in line  # the fraction fixes pcp->high: it differs
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("bad", ["vm.watermark_scale_factor=0", "nosuch=1", "vm.nosuch=1"])
def test_cli_compare_bad_settings_exit_2(capsys, bad):
    try:
        rc = cli.main(["replay", SAMPLE, "--compare", "", bad])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and "Replaying" not in out and err.count("\n") == 1


def test_a_what_if_slab_order_holds_the_recorded_objects_in_fewer_slabs():
    """Under slub_min_order=1 the warm start puts each cache's recorded
    objects (start.slabinfo's num_objs) into slabs of the new geometry: a
    kernel booted so would hold the same objects in half as many order-1
    slabs, not in the recorded number of slabs at twice the size."""
    rec = kmm.trace.load(kmm.trace.BUNDLE)
    m = rec.machine(cmdline="slub_min_order=1")

    def rows(text):
        return {f[0]: [int(x) for x in (f[1], f[2], f[4], f[5], f[-2])]
                for f in (line.split() for line in text.splitlines()[2:])}

    want = rows((kmm.trace.BUNDLE / "start.slabinfo.txt").read_text())
    got = rows(m.proc.slabinfo())
    active, num, per, pages, slabs = want["dentry"]
    assert pages == 1 and got["dentry"][2:4] == [2 * per, 2]  # order 1: twice the objects a slab
    assert got["dentry"][1] == -(-num // (2 * per)) * 2 * per
    assert got["dentry"][4] == -(-num // (2 * per))
    assert abs(got["dentry"][0] - active) <= active // 1000 + 25  # pre-trace frees aside
    m.check()
