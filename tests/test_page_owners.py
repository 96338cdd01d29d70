"""Machine.page_owners (the physical memory map of `kmm replay --plot`) and
`kmm proc --trace`. Expected owners follow from the calls made: what was
allocated, by which allocator, counted here."""

from __future__ import annotations

import kmm
from kmm import cli
from conftest import SAMPLE_TRACE

NAMES = kmm.PAGE_OWNER_NAMES


def counts(m):
    o = m.page_owners()
    assert len(o) == m.nr_pages
    return {NAMES[i]: o.count(i) for i in range(len(NAMES))}


def test_a_fresh_machine_is_free_but_for_pfn_0():
    m = kmm.Machine(memory="256M")
    c = counts(m)
    # Only pfn 0 is reserved at boot (arch.rs); the rest is in the buddy lists.
    assert c["reserved"] == 1
    assert c["buddy free"] == m.nr_pages - 1


def test_each_allocator_shows_under_its_owner():
    m = kmm.Machine(memory="256M", cpus=2)
    base = counts(m)
    with m.on_cpu(0):
        pages = m.alloc_pages(kmm.GFP_KERNEL, 3)          # 8 pages
        v = m.vmalloc(5 * m.page_size)                    # 5 vmalloc pages + tables
        c = m.kmem_cache_create("owners_obj", 1000)
        obj = c.alloc()                                   # one slab of 2^order pages
        m.drain_all_pages()                               # nothing left on pcp lists
        now = counts(m)
    assert now["vmalloc"] == 5
    # vmalloc's page tables: a fresh machine has none after boot (x86_64: PUD, PMD, PTE).
    assert now["page table"] == 3
    assert now["slab"] - base["slab"] >= 1 << c.order
    # pages: the order-3 block, plus kmalloc'd metadata lives in slab pages, not here.
    assert now["pages"] - base["pages"] == 8
    assert now["pcp"] == 0
    assert sum(now.values()) == m.nr_pages
    # The order-3 block is where its pfns say.
    o = m.page_owners()
    assert set(o[pages.pfn:pages.pfn + 8]) == {NAMES.index("pages")}
    c.free(obj)
    m.vfree(v)
    m.free_pages(pages, 3)


def test_pages_on_a_per_cpu_list_are_pcp():
    m = kmm.Machine(memory="256M", cpus=2)
    with m.on_cpu(1):
        p = m.alloc_page(kmm.GFP_KERNEL)
        m.free_page(p)
    assert m.nr_pcp_pages() > 0
    assert counts(m)["pcp"] == m.nr_pcp_pages()


def test_kmm_proc_after_a_trace(capsys):
    assert cli.main(["proc", "slabinfo", "--memory", "8G", "--trace", str(SAMPLE_TRACE)]) == 0
    out = capsys.readouterr().out
    # The replay created the trace's caches (e.g. dentry, filp) on the machine.
    names = {line.split()[0] for line in out.splitlines()[2:]}
    assert {"dentry", "filp", "names_cache"} <= names
    assert cli.main(["proc", "buddyinfo", "--memory", "8G"]) == 0
    fresh = capsys.readouterr().out
    assert "Normal" in fresh
