"""kmem caches from Python: geometry against the real machine, merging,
objects as Blocks, bulk calls, slab states, shrink, ctor, destroy, errors and
the debug caches (red zones, poison).

Geometry expectations come from /sys/kernel/slab of the real Linux 6.18
machine (tests/data/linux/sys_kernel_slab.tsv, 2 CPUs, like kmm's default
machine), recreated with the flags the kernel's own callers pass; the rest from
mm/slub.c and mm/slab_common.c as documented there, computed independently here.
"""

from __future__ import annotations

import csv
from array import array
from functools import cache

import pytest

import kmm
from conftest import LINUX, assert_healthy, buddyinfo, free_pages

PANIC = kmm.SLAB_PANIC
HWCACHE = kmm.SLAB_HWCACHE_ALIGN
RECLAIM = kmm.SLAB_RECLAIM_ACCOUNT
ACCOUNT = kmm.SLAB_ACCOUNT
RCU = kmm.SLAB_TYPESAFE_BY_RCU


@cache
def sys_slab() -> dict[str, dict[str, str]]:
    with open(LINUX / "sys_kernel_slab.tsv", newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f, delimiter="\t")}


def nomerge() -> kmm.Machine:
    return kmm.Machine(slab_nomerge=True)


def snapshot(m: kmm.Machine):
    return m.proc.slabinfo(), free_pages(m), buddyinfo(m)


# ---- geometry -------------------------------------------------------------------------------

# (real cache, our name, object size, align, flags, has ctor): the flags are
# those of the kernel's own kmem_cache_create calls for these caches (fs/dcache.c,
# fs/inode.c, net/vmw_vsock, fs/dcache.c names_cache, kernel/fork.c, net/core/sock.c).
GEOMETRY = [
    ("dentry", "t_dentry", 192, 0, RECLAIM | PANIC | ACCOUNT, False),
    ("inode_cache", "t_inode", 616, 0, RECLAIM | PANIC | ACCOUNT, True),
    ("AF_VSOCK", "t_vsock", 1240, 0, HWCACHE, False),
    ("names_cache", "t_names", 4096, 0, HWCACHE | PANIC, False),
    ("task_struct", "t_task", 5840, 64, PANIC | ACCOUNT, False),
    ("mm_struct", "t_mm", 1568, 0, HWCACHE | PANIC | ACCOUNT, False),
    ("files_cache", "t_files", 704, 0, HWCACHE | PANIC | ACCOUNT, False),
    ("TCP", "t_tcp", 2304, 0, HWCACHE | ACCOUNT | RCU, False),
    ("UDPv6", "t_udp6", 1472, 0, HWCACHE | ACCOUNT, False),
]


@pytest.mark.parametrize("real,name,size,align,flags,ctor", GEOMETRY, ids=[g[0] for g in GEOMETRY])
def test_geometry_matches_the_real_machine(real, name, size, align, flags, ctor):
    want = sys_slab()[real]
    assert int(want["object_size"]) == size
    m = nomerge()
    c = m.kmem_cache_create(name, size, align=align, flags=flags, ctor=(lambda b: None) if ctor else None)
    assert c.name == name and c.alias is None
    got = {
        "object_size": c.object_size,
        "slab_size": c.size,
        "objs_per_slab": c.objs_per_slab,
        "order": c.order,
        "align": c.align,
        "cpu_partial": c.cpu_partial,
        "min_partial": c.min_partial,
    }
    assert got == {k: int(want[k]) for k in got}
    sysfs = m.sysfs_slab(name)
    for k in ("object_size", "slab_size", "objs_per_slab", "order", "align", "hwcache_align",
              "reclaim_account", "red_zone", "poison", "store_user", "destroy_by_rcu", "cache_dma"):
        assert sysfs[k] == int(want[k]), k
    assert bool(sysfs["ctor"]) == bool(want["ctor"])
    line = next(l for l in m.proc.slabinfo().splitlines() if l.split()[0] == name).split()
    assert line[1:6] == ["0", "0", want["slab_size"], want["objs_per_slab"], str(1 << int(want["order"]))]


def test_geometry_by_hand_for_three_caches():
    # An independent computation of calculate_sizes/calculate_order (2 CPUs:
    # min_objects = 4 * (fls(2) + 1) = 12) for the brief's three examples.
    m = nomerge()
    d = m.kmem_cache_create("t_dentry", 192, flags=RECLAIM)
    assert (d.size, d.objs_per_slab, d.order) == (192, 4096 // 192, 0)
    i = m.kmem_cache_create("t_inode", 616, flags=RECLAIM, ctor=lambda b: None)
    # ctor: the free pointer moves behind the object: 616 + 8.
    assert (i.size, i.offset) == (624, 616)
    assert (i.objs_per_slab, i.order) == (8192 // 624, 1)
    v = m.kmem_cache_create("t_vsock", 1240, flags=HWCACHE)
    assert (v.align, v.size, v.objs_per_slab, v.order) == (64, 1280, 16384 // 1280, 2)
    # Without ctor/poison/RCU the free pointer is in the middle of the object.
    assert d.offset == 96
    assert_healthy(m)


# ---- merging ------------------------------------------------------------------------------------


def test_compatible_caches_merge(m):
    a = m.kmem_cache_create("t_merge_a", 100)
    b = m.kmem_cache_create("t_merge_b", 100)
    c = m.kmem_cache_create("t_merge_c", 104)  # same slot size (104)
    assert (a.name, a.alias) == ("t_merge_a", None)
    assert (b.name, b.alias) == ("t_merge_a", "t_merge_b")
    assert (c.name, c.alias) == ("t_merge_a", "t_merge_c")
    assert m.sysfs_slab("t_merge_a")["aliases"] == 2
    names = [l.split()[0] for l in m.proc.slabinfo().splitlines()[2:]]
    assert "t_merge_a" in names and "t_merge_b" not in names and "t_merge_c" not in names
    # One cache: objects of b come from a's slabs, and a can free them.
    x = b.alloc()
    assert a.objects_in_use() == 1
    a.free(x)
    assert b.objects_in_use() == 0
    # Destroying an alias only drops a reference.
    b.destroy()
    assert not a.destroyed
    assert m.sysfs_slab("t_merge_a")["aliases"] == 1
    y = a.alloc()
    a.free(y)
    assert_healthy(m)


@pytest.mark.parametrize(
    "size,kw",
    [
        (96, {}),  # 104 - 96 = 8 bytes of waste: not < sizeof(void *)
        (112, {}),  # bigger than the slot
        (100, {"flags": RECLAIM}),  # SLAB_MERGE_SAME differs
        (100, {"flags": ACCOUNT}),
        (100, {"flags": kmm.SLAB_CACHE_DMA}),
        (100, {"flags": kmm.SLAB_POISON}),  # SLAB_NEVER_MERGE
        (100, {"flags": kmm.SLAB_RED_ZONE}),
        (100, {"flags": kmm.SLAB_NO_MERGE}),
        (100, {"flags": RCU}),
        (100, {"ctor": lambda b: None}),
        (100, {"flags": HWCACHE}),  # align 64 makes the slot 128: bigger than 104
    ],
)
def test_incompatible_caches_do_not_merge(m, size, kw):
    m.kmem_cache_create("t_base", 100)
    c = m.kmem_cache_create("t_other", size, **kw)
    assert c.name == "t_other" and c.alias is None
    assert m.sysfs_slab("t_base")["aliases"] == 0


def test_slab_nomerge_machine_never_merges():
    m = nomerge()
    a = m.kmem_cache_create("t_a", 100)
    b = m.kmem_cache_create("t_b", 100)
    assert b.name == "t_b" and b.alias is None and a.name == "t_a"


@pytest.mark.parametrize("cmdline,merged", [
    ("", True),  # CONFIG_SLAB_MERGE_DEFAULT=y
    ("slab_nomerge", False),
    ("slub_nomerge", False),  # the older spelling (__setup_param)
    ("slab-nomerge=1", False),  # '-' as '_'; setup_slab_nomerge ignores the value
    ("slab_nomerge slab_merge", True),  # the later one wins
    ("slab_merge slub_nomerge", False),
])
def test_slab_nomerge_on_the_command_line(cmdline, merged):
    # mm/slab_common.c: setup_slab_nomerge / setup_slab_merge.
    m = kmm.Machine(memory="64M", cmdline=cmdline)
    a = m.kmem_cache_create("t_a", 100)
    b = m.kmem_cache_create("t_b", 100)
    assert a.name == "t_a"
    assert (b.name, b.alias) == (("t_a", "t_b") if merged else ("t_b", None))
    assert m.sysfs_slab("t_a")["aliases"] == (1 if merged else 0)


def test_the_command_line_overrides_the_slab_nomerge_argument():
    m = kmm.Machine(memory="64M", slab_nomerge=True, cmdline="slab_merge")
    m.kmem_cache_create("t_a", 100)
    assert m.kmem_cache_create("t_b", 100).name == "t_a"


def test_kmalloc_caches_take_no_aliases(m):
    # kmalloc-64 (and the other kmalloc caches) are unmergeable on the real
    # machine: its sysfs shows 0 aliases for every kmalloc cache.
    real = sys_slab()
    assert all(real[n]["aliases"] == "0" for n in real if "kmalloc" in n)
    c = m.kmem_cache_create("t_64", 64)
    assert c.name == "t_64" and c.alias is None


@pytest.mark.parametrize("flags,zone,mt", [
    (kmm.SLAB_CACHE_DMA, "DMA", "Unmovable"),
    (kmm.SLAB_CACHE_DMA32, "DMA32", "Unmovable"),
    (RECLAIM, "DMA32", "Reclaimable"),  # a 1G machine has no Normal zone
    (0, "DMA32", "Unmovable"),
])
def test_cache_flags_pick_the_slab_pages(m, flags, zone, mt):
    # s->allocflags (mm/slub.c calculate_sizes): GFP_DMA, GFP_DMA32, __GFP_RECLAIMABLE.
    c = m.kmem_cache_create("t_zone", 256, flags=flags)
    o = c.alloc()
    page = m.virt_to_page(o.addr)
    assert page.zone == zone and page.migratetype == mt
    assert "slab" in page.flags
    assert m.sysfs_slab(c.name)["cache_dma"] == int(flags == kmm.SLAB_CACHE_DMA)
    c.free(o)


# ---- objects as Blocks -------------------------------------------------------------------------


def test_cache_objects_are_blocks_with_real_bytes():
    m = nomerge()
    c = m.kmem_cache_create("t_obj", 100)
    b = c.alloc()
    assert isinstance(b, kmm.Block)
    assert len(b) == 100
    assert m.ksize(b) == c.ksize == 104
    b[:] = bytes(range(100))
    assert m.read(b.addr, 100) == bytes(range(100))
    v = memoryview(b)
    assert len(v) == 100 and not v.readonly
    v[0:4] = b"abcd"
    assert m.read(b.addr, 4) == b"abcd"
    v.release()
    b2 = m.kmem_cache_alloc(c)
    assert b2.addr == b.addr + c.size  # address order in a fresh slab (kmm: no freelist randomisation)
    m.kmem_cache_free(c, b2)
    c.free(b)
    assert c.objects_in_use() == 0
    assert_healthy(m)


def test_alloc_bulk_and_free_bulk():
    m = nomerge()
    c = m.kmem_cache_create("t_bulk", 200)
    n = 3 * c.objs_per_slab + 5
    arr = c.alloc_bulk(kmm.GFP_KERNEL, n)
    assert isinstance(arr, array) and arr.typecode == "Q" and len(arr) == n
    assert len(set(arr)) == n
    assert c.objects_in_use() == n
    for a in arr:
        blk = m.block(a, 200)  # each is a live object
        blk[0] = 1
    arr2 = m.kmem_cache_alloc_bulk(c, kmm.GFP_KERNEL, 10)
    assert c.objects_in_use() == n + 10
    c.free_bulk(arr)
    m.kmem_cache_free_bulk(c, arr2)
    assert c.objects_in_use() == 0
    blocks = [c.alloc() for _ in range(7)]
    c.free_bulk(blocks)  # a list of Blocks
    assert c.objects_in_use() == 0
    with pytest.raises(kmm.UseAfterFreeError):
        bytes(blocks[0])
    assert len(c.alloc_bulk(kmm.GFP_KERNEL, 0)) == 0
    c.free_bulk([])
    assert_healthy(m)


def test_free_bulk_is_all_or_nothing():
    m = nomerge()
    c = m.kmem_cache_create("t_bulk", 64)
    d = m.kmem_cache_create("t_bulk2", 64)
    arr = c.alloc_bulk(kmm.GFP_KERNEL, 20)
    foreign = d.alloc()
    before = snapshot(m)
    for bad, err in [
        (list(arr) + [arr[3]], kmm.DoubleFreeError),
        (list(arr) + [arr[3] + 8], kmm.InvalidFreeError),
        (list(arr) + [foreign.addr], kmm.InvalidFreeError),
    ]:
        with pytest.raises(err):
            c.free_bulk(array("Q", bad))
        assert c.objects_in_use() == 20
        assert snapshot(m) == before
        assert_healthy(m)
    c.free_bulk(arr)
    d.free(foreign)
    assert_healthy(m)


# ---- slab states -------------------------------------------------------------------------------


def test_slab_states_of_a_simple_scenario():
    m = nomerge()
    c = m.kmem_cache_create("t_states", 192, flags=RECLAIM)
    n = c.objs_per_slab
    assert n == 21
    objs = [c.alloc() for _ in range(n)]
    # All n objects of the first slab taken: it is full (no free object).
    assert (c.slabs()["full"], c.slabs()["partial"], c.slabs()["empty"]) == (1, 0, 0)
    objs += [c.alloc() for _ in range(n + 1)]
    # 2n + 1: two full slabs and a third (the CPU slab) with 1 object of n.
    s = c.slabs()
    assert (s["full"], s["partial"], s["empty"]) == (2, 1, 0)
    assert s["cpu"] == 1  # SLUB's own view: one CPU slab
    assert c.objects_in_use() == 2 * n + 1
    # /proc/slabinfo counts free objects only on node-partial slabs, so all
    # 3n objects are "active" here (the CPU slab's free ones included).
    line = next(l for l in m.proc.slabinfo().splitlines() if l.split()[0] == "t_states").split()
    assert line[1:3] == [str(3 * n), str(3 * n)]
    assert line[-3:-1] == ["3", "3"]
    # Free one object of the first slab: it becomes partial.
    c.free(objs[0])
    s = c.slabs()
    assert (s["full"], s["partial"], s["empty"]) == (1, 2, 0)
    # Free the rest of the first slab: it is empty (every object free).
    for o in objs[1:n]:
        c.free(o)
    s = c.slabs()
    assert (s["full"], s["partial"], s["empty"]) == (1, 1, 1)
    # Free the lone object of the third slab: empty too.
    c.free(objs[2 * n])
    s = c.slabs()
    assert (s["full"], s["partial"], s["empty"]) == (1, 0, 2)
    for o in objs[n : 2 * n]:
        c.free(o)
    s = c.slabs()
    assert (s["full"], s["partial"], s["empty"]) == (0, 0, 3)
    assert c.objects_in_use() == 0
    assert c.shrink() == 3
    s = c.slabs()
    assert (s["full"], s["partial"], s["empty"]) == (0, 0, 0)
    assert_healthy(m)


def test_shrink_gives_every_page_back():
    m = nomerge()
    free0, bi0 = free_pages(m), buddyinfo(m)
    c = m.kmem_cache_create("t_shrink", 1240, flags=HWCACHE)  # order-2 slabs
    objs = [c.alloc() for _ in range(5 * c.objs_per_slab + 3)]
    assert free_pages(m) == free0 - 6 * 4
    for o in objs[::2]:
        c.free(o)
    held = free_pages(m)
    c.shrink()  # no slab is empty yet: nothing to give back
    assert free_pages(m) == held
    for o in objs[1::2]:
        c.free(o)
    c.shrink()
    assert free_pages(m) == free0
    assert buddyinfo(m) == bi0
    s = c.slabs()
    assert (s["full"], s["partial"], s["empty"]) == (0, 0, 0)
    assert c.shrink() == 0
    assert_healthy(m)


def test_empty_slabs_beyond_min_partial_go_back_without_shrink():
    m = nomerge()
    free0 = free_pages(m)
    c = m.kmem_cache_create("t_minpart", 1024)
    assert c.min_partial == 5
    objs = [c.alloc() for _ in range(20 * c.objs_per_slab)]
    for o in objs:
        c.free(o)
    # cpu_partial 24 objects -> cpu_partial_slabs = DIV_ROUND_UP(24 * 2, 16) = 3.
    # Each full slab's first free puts it on the CPU partial list; the 4th
    # drains the three before it to the node list (__put_partials), which
    # keeps empty slabs only while nr_partial < min_partial (5). So: 5 on the
    # node list, S19 alone on the CPU partial list, S20 the CPU slab = 7 kept.
    kept = c.slabs()["empty"]
    assert kept == 7
    s = c.slabs()
    assert (s["cpu"], s["cpu_partial"], s["node_partial"]) == (1, 1, 5)
    assert free_pages(m) == free0 - (kept << c.order)
    c.shrink()
    assert free_pages(m) == free0
    assert c.slabs()["empty"] == 0


# ---- ctor ----------------------------------------------------------------------------------------


def test_ctor_runs_once_per_object_when_a_slab_is_set_up():
    m = nomerge()
    calls = []

    def ctor(blk):
        calls.append(blk)
        m.write(blk.addr, b"\xc7" * 64)  # construct the object

    c = m.kmem_cache_create("t_ctor", 64, ctor=ctor)
    assert c.ctor is ctor
    assert calls == []  # nothing before the first slab
    n = c.objs_per_slab
    assert c.size == 72 and n == 4096 // 72  # free pointer behind the object
    first = c.alloc()
    assert len(calls) == n
    assert all(isinstance(b, kmm.Block) for b in calls)
    assert len({b.addr for b in calls}) == n
    assert first.addr in {b.addr for b in calls}
    assert bytes(first) == b"\xc7" * 64
    objs = [first] + [c.alloc() for _ in range(n - 1)]
    assert len(calls) == n  # same slab: no more ctor calls
    assert sorted(o.addr for o in objs) == sorted(b.addr for b in calls)
    # Freeing and reallocating does not construct again, and the constructed
    # state survives (the free pointer is outside the object).
    c.free(objs[-1])
    again = c.alloc()
    assert again.addr == objs[-1].addr
    assert bytes(again) == b"\xc7" * 64
    assert len(calls) == n
    objs[-1] = again
    extra = c.alloc()  # a second slab
    assert len(calls) == 2 * n
    for o in objs + [extra]:
        c.free(o)
    assert_healthy(m)


# ---- destroy ----------------------------------------------------------------------------------------


def test_destroy_refused_while_objects_live():
    m = nomerge()
    free0 = free_pages(m)
    c = m.kmem_cache_create("t_destroy", 300)
    objs = [c.alloc() for _ in range(3)]
    with pytest.raises(kmm.KmmError, match="Slab cache still has objects"):
        c.destroy()
    with pytest.raises(kmm.KmmError, match="Slab cache still has objects"):
        m.kmem_cache_destroy(c)
    assert not c.destroyed
    assert c.objects_in_use() == 3
    assert m.kmem_cache("t_destroy") is not None
    assert "t_destroy" in m.proc.slabinfo()
    more = c.alloc()  # still usable
    more[:] = b"x" * 300
    assert all(o.alive_ for o in objs)
    assert_healthy(m)
    for o in objs + [more]:
        c.free(o)
    c.destroy()
    assert c.destroyed
    assert m.kmem_cache("t_destroy") is None
    assert "t_destroy" not in m.proc.slabinfo()
    assert free_pages(m) == free0
    with pytest.raises(kmm.KmmError):
        c.alloc()
    assert_healthy(m)


# ---- errors change nothing ----------------------------------------------------------------------------


def test_free_errors_change_nothing():
    m = nomerge()
    c = m.kmem_cache_create("t_err", 100)
    d = m.kmem_cache_create("t_err2", 100)
    a, b = c.alloc(), c.alloc()
    x = d.alloc()
    k = m.kmalloc(100)
    page = m.get_free_page(kmm.GFP_KERNEL)
    c.free(b)
    before = snapshot(m)
    in_use = (c.objects_in_use(), d.objects_in_use())

    def same():
        assert snapshot(m) == before
        assert (c.objects_in_use(), d.objects_in_use()) == in_use
        assert_healthy(m)

    with pytest.raises(kmm.DoubleFreeError):
        c.free(b)  # the same Block again
    same()
    with pytest.raises(kmm.DoubleFreeError):
        c.free(b.addr)  # by address
    same()
    with pytest.raises(kmm.DoubleFreeError):
        m.kfree(b.addr)
    same()
    for bad in (a.addr + 8, a.addr + 1, a.addr - 8, a.addr + c.size - 1):
        with pytest.raises(kmm.InvalidFreeError):
            c.free(bad)  # an interior (or in-between) pointer
        same()
    for foreign in (0x1234, page, page + 64, m.page_offset + 0x100000):
        with pytest.raises(kmm.InvalidFreeError):
            c.free(foreign)  # not a slab object at all
        same()
    with pytest.raises(kmm.InvalidFreeError, match="Wrong slab cache"):
        c.free(x)
    same()
    with pytest.raises(kmm.InvalidFreeError, match="Wrong slab cache"):
        m.kmem_cache_free(c, x.addr)
    same()
    with pytest.raises(kmm.InvalidFreeError, match="Wrong slab cache"):
        c.free(k)  # a kmalloc-128 object
    same()
    with pytest.raises(kmm.InvalidFreeError):
        m.kfree(page)  # a plain page is not a kmalloc
    same()
    assert a.alive_ and x.alive_ and k.alive_
    c.free(a)
    d.free(x)
    m.kfree(k)
    m.free_page(page)
    assert_healthy(m)


# ---- debug caches ------------------------------------------------------------------------------------


def test_red_zone_and_poison_layout():
    m = nomerge()
    r = m.kmem_cache_create("t_debug", 100, flags=kmm.SLAB_RED_ZONE | kmm.SLAB_POISON)
    # calculate_sizes: 104 (word), free pointer behind it: 112, red zone
    # padding word: 120, left red zone: 128.
    assert r.size == 128 and r.offset == 104 and r.objs_per_slab == 32
    assert r.ksize == 100  # slab_ksize: object_size for red-zoned/poisoned caches
    assert r.cpu_partial == 0  # debug caches have no per-CPU partial slabs
    s = m.sysfs_slab("t_debug")
    assert (s["red_zone"], s["poison"]) == (1, 1)
    x = r.alloc()
    assert len(x) == 100
    # Active red zones: 0xcc on both sides (SLUB_RED_ACTIVE).
    assert m.read(x.addr - 8, 8) == b"\xcc" * 8
    assert m.read(x.addr + 100, 4) == b"\xcc" * 4
    x[:] = b"\x01" * 100
    r.free(x)
    # A freed object: POISON_FREE then POISON_END; inactive red zones 0xbb.
    assert m.read(x.addr, 100) == b"\x6b" * 99 + b"\xa5"
    assert m.read(x.addr - 8, 8) == b"\xbb" * 8
    assert m.read(x.addr + 100, 4) == b"\xbb" * 4
    assert_healthy(m)


@pytest.mark.parametrize("where,what", [(100, "Right Redzone"), (103, "Right Redzone"), (-1, "Left Redzone")])
def test_red_zone_overwrite_is_caught_at_free(where, what):
    m = nomerge()
    # mm/slub.c free_debug_processing checks objects only with
    # SLAB_CONSISTENCY_CHECKS (slub_debug's F).
    r = m.kmem_cache_create("t_rz", 100, flags=kmm.SLAB_CONSISTENCY_CHECKS | kmm.SLAB_RED_ZONE | kmm.SLAB_POISON)
    x = r.alloc()
    keep = r.alloc()
    with pytest.raises(IndexError):
        x[100] = 0  # the Block itself refuses
    m.write(x.addr + where, b"X")  # a raw write past the end
    before = snapshot(m)
    with pytest.raises(kmm.MemoryCorruptionError, match=f"{what} overwritten"):
        r.free(x)
    # Not freed ("Object at ... not freed"); the red zone was restored.
    assert x.alive_ and r.objects_in_use() == 2
    assert snapshot(m) == before
    assert m.read(x.addr + where, 1) == b"\xcc"
    assert_healthy(m)
    r.free(x)
    r.free(keep)
    assert_healthy(m)


def test_write_after_free_is_caught_by_poison():
    m = nomerge()
    r = m.kmem_cache_create("t_poison", 64, flags=kmm.SLAB_CONSISTENCY_CHECKS | kmm.SLAB_POISON)
    x = r.alloc()
    r.free(x)
    assert m.read(x.addr, 64) == b"\x6b" * 63 + b"\xa5"
    m.write(x.addr + 10, b"\x00")
    # alloc_debug_processing: the slab is isolated ("Marking all objects
    # used") and the allocation is served from a new slab.
    y = r.alloc()
    assert y.addr != x.addr
    log = m.dmesg()
    assert "[Poison overwritten]" in log and "FIX t_poison: Marking all objects used" in log
    assert_healthy(m)
