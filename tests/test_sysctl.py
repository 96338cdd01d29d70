"""vm.* sysctls: each write recomputes what the kernel's handler
recomputes (mm/page_alloc.c), checked against the kernel's formulas
written out again here, independently of kmm's code."""

from __future__ import annotations

import pytest

import kmm


def lowmem(m):
    return sum(z.managed for z in m.zones if z.name in ("DMA", "DMA32", "Normal"))


def wmarks(pages_min, managed, low_pages, wsf):
    """__setup_per_zone_wmarks for a lowmem zone."""
    tmp = pages_min * managed // low_pages
    delta = max(tmp >> 2, managed * wsf // 10000)
    return tmp, tmp + delta, tmp + 2 * delta


def batchsize(managed):
    """zone_batchsize (CONFIG_MMU), 4 KiB pages, as
    zone_set_pageset_high_and_batch uses it: max(1, ...)."""
    batch = min(managed >> 10, (1 << 20) // 4096) // 4
    batch = max(batch, 1)
    x = batch + batch // 2
    return max(1, (1 << (x.bit_length() - 1)) - 1)


def highsize(total, batch, cpus):
    """zone_highsize: total / CPUs, at least 4 batches."""
    return max(total // cpus, batch * 4)


@pytest.fixture
def m():
    return kmm.Machine(memory="1G", cpus=2)


def populated(m):
    return [z for z in m.zones if z.populated]


def test_watermark_scale_factor_recomputes_watermarks_and_pagesets(m):
    mfk = int(m.sysctl("vm.min_free_kbytes"))
    m.sysctl("vm.watermark_scale_factor", 200)
    assert m.sysctl("vm.watermark_scale_factor") == "200"
    for z in populated(m):
        assert (z.min, z.low, z.high) == wmarks(mfk // 4, z.managed, lowmem(m), 200), z.name
        b = batchsize(z.managed)
        p = m.pcp_state(z.name, 0)
        # zone_pcp_update after the watermarks: high_min from the new low mark.
        assert (p["batch"], p["high_min"]) == (b, highsize(z.low, b, 2)), z.name
        assert p["high_max"] == highsize(z.managed // 8, b, 2)
    assert m.check() == []


def test_min_free_kbytes_recomputes_watermarks(m):
    m.sysctl("vm.min_free_kbytes", 8192)
    assert m.sysctl("vm.min_free_kbytes") == "8192"
    for z in populated(m):
        assert (z.min, z.low, z.high) == wmarks(8192 // 4, z.managed, lowmem(m), 10), z.name


def test_min_free_kbytes_that_leaves_nothing_is_refused(m):
    before = [(z.min, z.low, z.high) for z in m.zones]
    with pytest.raises(ValueError, match="nothing would be left"):
        m.sysctl("vm.min_free_kbytes", 10**9)
    assert [(z.min, z.low, z.high) for z in m.zones] == before


def test_percpu_pagelist_high_fraction_fixes_high(m):
    m.sysctl("vm.percpu_pagelist_high_fraction", 16)
    for z in populated(m):
        b = batchsize(z.managed)
        p = m.pcp_state(z.name, 1)
        want = highsize(z.managed // 16, b, 2)
        assert (p["high_min"], p["high_max"]) == (want, want), z.name
    # Back to 0: auto-tuning from the low watermark again.
    m.sysctl("vm.percpu_pagelist_high_fraction", 0)
    z = populated(m)[-1]
    b = batchsize(z.managed)
    assert m.pcp_state(z.name, 1)["high_min"] == highsize(z.low, b, 2)


@pytest.mark.parametrize("bad", [1, 7, -1, "x", 2**31])
def test_percpu_pagelist_high_fraction_refuses_what_the_kernel_refuses(m, bad):
    before = m.pcp_state("DMA32", 0)
    with pytest.raises(ValueError, match="Invalid argument"):
        m.sysctl("vm.percpu_pagelist_high_fraction", bad)
    assert m.pcp_state("DMA32", 0) == before
    assert m.sysctl("vm.percpu_pagelist_high_fraction") == "0"


def test_lowmem_reserve_ratio_recomputes_protection(m):
    m.sysctl("vm.lowmem_reserve_ratio", [128, 64, 0, 0, 0])
    assert m.sysctl("vm.lowmem_reserve_ratio").split() == ["128", "64", "0", "0", "0"]
    managed = [z.managed for z in m.zones]
    ratio = [128, 64, 0, 0, 0]
    for i, z in enumerate(m.zones):
        for j in range(i + 1, len(managed)):
            above = sum(managed[i + 1:j + 1])
            want = 0 if ratio[i] == 0 or managed[i] == 0 else above // ratio[i]
            assert z.lowmem_reserve[j] == want, (z.name, j)
    # Values below 1 become 0, as the handler does.
    m.sysctl("vm.lowmem_reserve_ratio", "-5 256")
    assert m.sysctl("vm.lowmem_reserve_ratio").split()[:2] == ["0", "256"]


def test_watermark_boost_factor_is_read_and_written(m):
    assert m.sysctl("vm.watermark_boost_factor") == "15000"  # the kernel's default
    m.sysctl("vm.watermark_boost_factor", 0)
    assert m.sysctl("vm.watermark_boost_factor") == "0"


def test_unknown_names_and_types_are_refused(m):
    with pytest.raises(ValueError, match="unknown sysctl"):
        m.sysctl("vm.swappiness")
    with pytest.raises(TypeError):
        m.sysctl("vm.watermark_scale_factor", 1.5)
    with pytest.raises(ValueError, match="Invalid argument"):
        m.sysctl("vm.watermark_scale_factor", 0)


def test_sysctls_at_boot():
    m = kmm.Machine(memory="1G", sysctl={"vm.watermark_scale_factor": 100, "vm.percpu_pagelist_high_fraction": 8})
    assert m.sysctl("vm.watermark_scale_factor") == "100"
    mfk = int(m.sysctl("vm.min_free_kbytes"))
    z = populated(m)[-1]
    assert (z.min, z.low, z.high) == wmarks(mfk // 4, z.managed, lowmem(m), 100)
    with pytest.raises(ValueError, match="vm.watermark_scale_factor"):
        kmm.Machine(memory="1G", sysctl={"vm.watermark_scale_factor": 5000})
    assert kmm.SYSCTLS[0][0] == "vm.min_free_kbytes"


def test_settings_split_boot_parameters_from_sysctls():
    from kmm import settings

    assert settings.split("slub_min_order=1 vm.watermark_scale_factor=200 kasan") == (
        "slub_min_order=1 kasan", {"vm.watermark_scale_factor": "200"})
    with pytest.raises(ValueError, match="unknown sysctl 'vm.swappiness'"):
        settings.split("vm.swappiness=10")
    with pytest.raises(ValueError, match="needs a value"):
        settings.split("vm.min_free_kbytes")


def test_cli_set_applies_both_kinds(capsys):
    from kmm import cli

    assert cli.main(["proc", "zoneinfo", "--memory", "1G", "--set", "vm.watermark_scale_factor=200"]) == 0
    out = capsys.readouterr().out
    m = kmm.Machine(memory="1G")
    mfk = int(m.sysctl("vm.min_free_kbytes"))
    z = populated(m)[-1]
    want = wmarks(mfk // 4, z.managed, lowmem(m), 200)
    block = out.split(f"zone {z.name:>8}")[1]
    assert f"min      {want[0]}\n" in block and f"low      {want[1]}\n" in block


@pytest.mark.parametrize("setting,what", [
    ("vm.watermark_scale_factor=99999", "valid: 1 .. 3000"),
    ("vm.percpu_pagelist_high_fraction=3", "valid: 0, or 8 .. 2147483647"),
    ("quiet", 'unknown boot parameter "quiet"'),
    ("vm.nope=1", "unknown sysctl"),
])
def test_cli_bad_settings_exit_2_before_anything_runs(capsys, setting, what):
    from kmm import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["replay", "--set", setting])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and what in err and err.count("\n") == 1


# ---- slab.<cache>.min_partial and slab.<cache>.cpu_partial ------------------------------
# mm/slub.c: min_partial_store (kstrtoul, any value), cpu_partial_store
# (kstrtouint; EINVAL for a non-zero count on a cache without cpu partial
# lists; slub_set_cpu_partial: cpu_partial_slabs = DIV_ROUND_UP(objects * 2,
# oo_objects); flush_all).


def empty_after_churn(c, slabs):
    objs = [c.alloc() for _ in range(slabs * c.objs_per_slab)]
    for o in objs:
        c.free(o)
    return c.slabs()


def test_min_partial_is_how_many_empty_slabs_the_node_keeps():
    m = kmm.Machine(slab_nomerge=True, cpus=1)
    c = m.kmem_cache_create("t_mp", 1024)
    # set_min_partial(s, ilog2(s->size) / 2), clamped to [5, 10].
    assert m.sysctl("slab.t_mp.min_partial") == str(max(5, min(10, ((1024).bit_length() - 1) // 2)))
    m.sysctl("slab.t_mp.min_partial", 0)
    assert c.min_partial == 0 and m.sysfs_slab("t_mp")["min_partial"] == 0
    s = empty_after_churn(c, 20)
    # No empty slab is kept on the node list; what stays is the CPU slab and
    # the CPU partial list.
    assert s["node_partial"] == 0
    m.sysctl("slab.t_mp.min_partial", 12)  # above the kernel's clamp: allowed
    assert c.min_partial == 12
    s = empty_after_churn(c, 20)
    assert s["node_partial"] == 12
    m.check()


def test_cpu_partial_sets_the_cpu_partial_slabs_and_flushes():
    m = kmm.Machine(slab_nomerge=True, cpus=1)
    c = m.kmem_cache_create("t_cp", 1024)
    assert c.cpu_partial == 24  # set_cpu_partial: s->size >= 1024 -> 24
    per_slab = c.objs_per_slab
    objs = [c.alloc() for _ in range(8 * per_slab)]
    c.free(objs[0])  # the first full slab gains a free object: CPU partial
    assert c.slabs()["cpu_partial"] == 1
    m.sysctl("slab.t_cp.cpu_partial", 5 * per_slab // 2)  # 2.5 slabs of objects
    # flush_all: the CPU slab and the CPU partial list went to the node.
    assert c.slabs()["cpu_partial"] == 0 and c.slabs()["cpu"] == 0
    assert m.sysctl("slab.t_cp.cpu_partial") == str(5 * per_slab // 2)
    cap = -(-(5 * per_slab // 2) * 2 // per_slab)  # DIV_ROUND_UP(objects * 2, oo_objects) = 5
    # One free in each of `cap` full slabs fills the CPU partial list; the
    # next one drains it first (put_cpu_partial with drain=1).
    full = [objs[i * per_slab + 1] for i in range(1, cap + 2)]
    for o in full[:cap]:
        c.free(o)
    assert c.slabs()["cpu_partial"] == cap
    c.free(full[cap])
    assert c.slabs()["cpu_partial"] == 1
    m.check()


def test_cpu_partial_zero_and_debug_caches():
    m = kmm.Machine(slab_nomerge=True, cpus=1, cmdline="slub_debug=F,t_dbg")
    d = m.kmem_cache_create("t_dbg", 256)
    assert d.cpu_partial == 0
    with pytest.raises(ValueError, match="Invalid argument"):
        m.sysctl("slab.t_dbg.cpu_partial", 10)
    assert d.cpu_partial == 0
    m.sysctl("slab.t_dbg.cpu_partial", 0)  # 0 is always accepted
    c = m.kmem_cache_create("t_zero", 1024)
    m.sysctl("slab.t_zero.cpu_partial", 0)
    objs = [c.alloc() for _ in range(6 * c.objs_per_slab)]
    for i in range(5):
        c.free(objs[i * c.objs_per_slab])
        # cpu_partial_slabs 0: each put drains the list first, so it holds one.
        assert c.slabs()["cpu_partial"] == 1
    m.check()


@pytest.mark.parametrize("name,value,what", [
    ("slab.kmalloc-64.min_partial", "-1", "invalid value"),
    ("slab.kmalloc-64.min_partial", "0x10", "invalid value"),
    ("slab.kmalloc-64.cpu_partial", str(2**32), "invalid value"),
    ("slab.no_such_cache.min_partial", "3", "No such file or directory"),
    ("slab.kmalloc-64.order", "3", "unknown sysctl"),
])
def test_slab_tunables_refused_change_nothing(m, name, value, what):
    before = (m.sysctl("slab.kmalloc-64.min_partial"), m.sysctl("slab.kmalloc-64.cpu_partial"))
    with pytest.raises(ValueError, match=what):
        m.sysctl(name, value)
    assert (m.sysctl("slab.kmalloc-64.min_partial"), m.sysctl("slab.kmalloc-64.cpu_partial")) == before


def test_slab_tunables_at_boot_wait_for_their_cache():
    m = kmm.Machine(slab_nomerge=True, sysctl={"slab.kmalloc-128.min_partial": 9, "slab.t_late.cpu_partial": 7})
    assert m.sysctl("slab.kmalloc-128.min_partial") == "9"
    c = m.kmem_cache_create("t_late", 512)
    assert c.cpu_partial == 7
    assert kmm.settings.split("slab.t_late.min_partial=3 slub_min_order=1") == (
        "slub_min_order=1", {"slab.t_late.min_partial": "3"})
    with pytest.raises(ValueError, match="unknown sysctl"):
        kmm.settings.split("slab.t_late.order=3")


def test_one_table_holds_every_setting():
    # DESIGN.md §7: one table with kernel name, type, range, default and
    # the kernel file, for both kinds of setting.
    from kmm.settings import PARAMETERS

    names = [p.name for p in PARAMETERS]
    assert len(names) == len(set(names))
    assert {p.name for p in PARAMETERS if p.kind == "boot"} == {n for n, *_ in kmm.BOOT_PARAMS}
    assert {p.name for p in PARAMETERS if p.kind == "sysctl"} == {n for n, *_ in kmm.SYSCTLS}
    for p in PARAMETERS:
        assert p.type and p.range and p.default and p.meaning, p
        assert p.file.startswith("mm/"), p
    # Every boot parameter the table names is one the command line takes.
    for p in PARAMETERS:
        if p.kind == "boot" and p.type == "flag":
            kmm.Machine(memory="16M", cmdline=p.name)
    byname = {p.name: p for p in PARAMETERS}
    assert byname["vm.watermark_scale_factor"].range == "1 .. 3000"
    assert byname["slab_nomerge"].file == "mm/slab_common.c"
