"""High memory on i386 and i386-PAE: the persistent kmap window (kmap/kunmap,
pkmap_count, flush_all_zero_pkmaps, a kmap that sleeps until another thread
kunmaps), kmap_atomic and kmap_local_page over per-CPU fixmap slots, and the
context rules; on x86_64 kmap is page_address.

Expected values come from the kernel (6.18), computed here independently:
- arch/x86/include/asm/pgtable_32_areas.h: LAST_PKMAP = one PTE table's
  entries (1024 with 4-byte PTEs, 512 with PAE's 8-byte PTEs), PKMAP_BASE is
  PMD-aligned, VMALLOC_END = PKMAP_BASE - 2 * PAGE_SIZE, VMALLOC_START =
  high_memory + VMALLOC_OFFSET (8 MiB).
- mm/highmem.c: `map_new_virtual` (last_pkmap_nr = (last_pkmap_nr + 1) &
  LAST_PKMAP_MASK before the first look, so the first kmap takes slot 1; a
  wrap to slot 0 runs flush_all_zero_pkmaps; after LAST_PKMAP busy slots it
  sleeps on pkmap_map_wait), `kmap_high` (pkmap_count++ -> 2 for a new
  mapping), `kunmap_high` (--pkmap_count; 0 is a BUG, 1 wakes waiters),
  `flush_all_zero_pkmaps` (count 1 -> 0, set_page_address(page, NULL), one
  flush_tlb_kernel_range over the window if anything was cleared),
  `page_address` (highmem: the pkmap address while one exists),
  `kunmap_local_indexed` (WARN unless the address is the most recent slot).
- arch/x86/include/asm/fixmap.h: `__fix_to_virt(x)` = FIXADDR_TOP - (x <<
  PAGE_SHIFT), and kmap_local slot idx of CPU c is FIX_KMAP_BEGIN + idx +
  KM_MAX_IDX * c: consecutive mappings step down by a page, CPUs by 16 pages.
- include/linux/highmem-internal.h (!CONFIG_HIGHMEM): kmap, kmap_local_page
  and kmap_atomic return page_address().
"""

from __future__ import annotations

import threading

import pytest

import kmm
from conftest import assert_healthy, vm_state

PAGE = 4096
MiB = 1 << 20
KM_MAX_IDX = 16  # include/asm-generic/kmap_size.h (without CONFIG_DEBUG_KMAP_LOCAL)
LAST_PKMAP = {"i386": 1024, "i386-pae": 512}
PMD_SIZE = {"i386": 4 * MiB, "i386-pae": 2 * MiB}
ARCHES = ["i386", "i386-pae"]


def machine(arch: str, **kw) -> kmm.Machine:
    """1 GiB on i386: 896 MiB of lowmem and 128 MiB of HighMem."""
    return kmm.Machine(arch=arch, memory="1G", **kw)


def highpages(m: kmm.Machine, n: int) -> list[kmm.Page]:
    pages = [m.alloc_page(kmm.GFP_HIGHUSER) for _ in range(n)]
    assert all(p.highmem and p.zone == "HighMem" and p.address is None for p in pages)
    return pages


def snapshot(m: kmm.Machine) -> dict:
    return vm_state(m)


def wait_until(pred, limit: float = 20.0) -> bool:
    """Poll `pred` (bounded): True as soon as it holds."""
    ev = threading.Event()
    for _ in range(int(limit / 0.001)):
        if pred():
            return True
        ev.wait(0.001)
    return pred()


# ---- layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
def test_pkmap_window_and_vmalloc_range(arch):
    m = machine(arch)
    assert m.last_pkmap == LAST_PKMAP[arch]
    base = m.pkmap_base
    assert base % PMD_SIZE[arch] == 0
    # The window is one PTE table: LAST_PKMAP pages, exactly one PMD.
    assert m.last_pkmap * PAGE == PMD_SIZE[arch]
    assert m.vmalloc_end == base - 2 * PAGE
    lowmem_end = max(z.start_pfn + z.spanned for z in m.zones if z.name in ("DMA", "Normal"))
    assert m.vmalloc_start == m.page_offset + lowmem_end * PAGE + 8 * MiB
    assert m.page_offset == 0xC0000000
    assert not m.is_vmalloc_addr(base) and not m.is_vmalloc_addr(m.vmalloc_end)
    assert m.is_vmalloc_addr(m.vmalloc_end - 1)
    assert_healthy(m)


@pytest.mark.parametrize("arch, big", [("i386", 4 * MiB), ("i386-pae", 2 * MiB)])
def test_direct_map_uses_pse_or_pae_large_pages(arch, big):
    # split_mem_range (CONFIG_X86_32): the first PMD of memory with 4 KiB
    # pages, then 4 MiB (PSE) or 2 MiB (PAE) pages.
    m = machine(arch)
    po = m.page_offset
    assert m.translate(po + 4096) == (4096, PAGE)
    assert m.translate(po + big - 1) == (big - 1, PAGE)
    assert m.translate(po + big) == (big, big)
    assert m.translate(po + 800 * MiB + 5) == (800 * MiB + 5, big)
    # 2-level i386 walks read 2 entries for a 4K page and 1 for a 4M page;
    # PAE's 3 levels read 3 and 2.
    levels = 2 if arch == "i386" else 3
    with m.on_cpu(0):
        for off, reads in [(4096, levels), (64 * MiB, levels - 1)]:
            s0 = m.tlb_stats()[0]
            m.access(po + off)
            s1 = m.tlb_stats()[0]
            assert s1["walk_reads"] - s0["walk_reads"] == reads
            assert s1["misses"] - s0["misses"] == 1


# ---- kmap / kunmap -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
def test_kmap_of_a_lowmem_page_is_its_direct_map_address(arch):
    m = machine(arch)
    p = m.alloc_page(kmm.GFP_KERNEL)
    assert not p.highmem
    assert m.kmap(p) == p.address == m.page_offset + p.phys
    assert m.pkmap_stats()["in_use"] == 0
    m.kunmap(p)
    m.kunmap(p)  # a no-op for lowmem, however often
    assert m.pkmap_stats() == {"in_use": 0, "stale": 0, "flushes": 0, "waits": 0}


@pytest.mark.parametrize("arch", ARCHES)
def test_pkmap_count_semantics(arch):
    m = machine(arch)
    hp, other = highpages(m, 2)
    assert m.page_address(hp) is None
    a = m.kmap(hp)
    # map_new_virtual advances last_pkmap_nr before looking: slot 1 first.
    assert a == m.pkmap_base + 1 * PAGE
    assert m.page_address(hp) == a
    assert m.translate(a) == (hp.phys, PAGE)
    assert m.pkmap_stats()["in_use"] == 1  # pkmap_count 2: one user
    assert m.kmap(hp) == a  # the same page shares its slot
    assert m.pkmap_stats()["in_use"] == 1
    m.kunmap(hp)
    assert m.pkmap_stats()["in_use"] == 1  # still one user
    m.kunmap(hp)
    # pkmap_count 1: unused but still mapped until flush_all_zero_pkmaps.
    assert m.pkmap_stats()["in_use"] == 0 and m.pkmap_stats()["stale"] == 1
    assert m.page_address(hp) == a
    assert m.translate(a) == (hp.phys, PAGE)
    # A kmap of the same page reuses the stale mapping.
    assert m.kmap(hp) == a
    assert m.pkmap_stats()["stale"] == 0
    # Another page takes the next slot.
    assert m.kmap(other) == m.pkmap_base + 2 * PAGE
    m.kunmap(hp)
    m.kunmap(other)
    assert m.pkmap_stats()["stale"] == 2
    s0 = m.tlb_stats()
    m.kmap_flush_unused()
    s1 = m.tlb_stats()
    st = m.pkmap_stats()
    assert (st["stale"], st["in_use"], st["flushes"]) == (0, 0, 1)
    assert m.page_address(hp) is None and m.page_address(other) is None
    with pytest.raises(kmm.PageFaultError):
        m.translate(a)
    # One flush_tlb_kernel_range over the whole window (LAST_PKMAP pages > 33:
    # a full flush) on each CPU, with an IPI to the other.
    assert [s1[c]["flushes"] - s0[c]["flushes"] for c in range(2)] == [1, 1]
    assert sum(s1[c]["ipis"] - s0[c]["ipis"] for c in range(2)) == 1
    # Nothing stale: no flush at all.
    m.kmap_flush_unused()
    assert m.pkmap_stats()["flushes"] == 1
    assert m.tlb_stats() == s1
    assert_healthy(m)


@pytest.mark.parametrize("arch", ARCHES)
def test_wrap_to_slot_zero_flushes_the_stale_slots(arch):
    m = machine(arch)
    n = m.last_pkmap
    pages = highpages(m, n)
    # Slots 1 .. n-1 each get a page and are left stale (count 1).
    for i, p in enumerate(pages[: n - 1]):
        assert m.kmap(p) == m.pkmap_base + (i + 1) * PAGE
        m.kunmap(p)
    assert m.pkmap_stats() == {"in_use": 0, "stale": n - 1, "flushes": 0, "waits": 0}
    # The next new page wraps last_pkmap_nr to 0: flush_all_zero_pkmaps clears
    # every stale slot (one flush), then slot 0 is free.
    assert m.kmap(pages[-1]) == m.pkmap_base
    assert m.pkmap_stats() == {"in_use": 1, "stale": 0, "flushes": 1, "waits": 0}
    assert m.page_address(pages[0]) is None
    m.kunmap(pages[-1])
    assert_healthy(m)


@pytest.mark.parametrize("arch", ARCHES)
def test_bytes_through_kmap_are_the_pages_bytes(arch):
    m = machine(arch)
    hp = highpages(m, 1)[0]
    a = m.kmap(hp)
    m.write(a + 100, b"through pkmap")
    with m.kmap_local_page(hp) as blk:
        assert blk.read(100, 13) == b"through pkmap"
        blk.write(b"local", 200)
    assert m.read(a + 200, 5) == b"local"
    m.kunmap(hp)
    assert_healthy(m)


@pytest.mark.parametrize("arch", ARCHES)
def test_vmalloc_takes_highmem_pages_visible_through_kmap(arch):
    # __vmalloc_area_node adds __GFP_HIGHMEM to the page gfp.
    m = machine(arch)
    b = m.vmalloc(3 * PAGE)
    data = bytes(range(256)) * (3 * PAGE // 256)
    b.write(data)
    pages = [m.vmalloc_to_page(b.addr + i * PAGE) for i in range(3)]
    assert all(p.highmem and p.address is None for p in pages)
    for i, p in enumerate(pages):
        a = m.kmap(p)
        assert m.read(a, PAGE) == data[i * PAGE : (i + 1) * PAGE]
        m.kunmap(p)
    assert m.proc.meminfo_dict()["VmallocUsed"] >= 12
    m.vfree(b)
    assert_healthy(m)


@pytest.mark.parametrize("arch", ARCHES)
def test_unbalanced_kunmap_is_a_bug_and_changes_nothing(arch):
    m = machine(arch)
    hp, never = highpages(m, 2)
    m.kmap(hp)
    m.kunmap(hp)  # count 1 now
    before = snapshot(m)
    with pytest.raises(kmm.KmmError, match="kunmap_high"):
        m.kunmap(hp)
    with pytest.raises(kmm.KmmError, match="kunmap_high"):
        m.kunmap(never)
    assert snapshot(m) == before
    assert_healthy(m)


@pytest.mark.parametrize("arch", ARCHES)
def test_kmap_and_kunmap_may_sleep(arch):
    m = machine(arch)
    hp, lp = highpages(m, 1)[0], m.alloc_page(kmm.GFP_KERNEL)
    m.kmap(hp)
    before = snapshot(m)
    for ctx in (m.atomic, m.preempt_disabled, m.irq):
        with ctx():
            for call in (lambda: m.kmap(hp), lambda: m.kmap(lp), lambda: m.kunmap(hp)):
                with pytest.raises(kmm.SleepInAtomicError, match="sleeping function called from invalid context"):
                    call()
    assert snapshot(m) == before
    m.kunmap(hp)


def test_kmap_blocks_until_another_thread_kunmaps():
    m = machine("i386-pae")
    n = m.last_pkmap
    pages = highpages(m, n + 1)
    addrs = [m.kmap(p) for p in pages[:n]]
    assert len(set(addrs)) == n
    assert m.pkmap_stats()["in_use"] == n
    got: list[int] = []
    errors: list[BaseException] = []

    def waiter():
        try:
            got.append(m.kmap(pages[n]))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    # Every slot is in use: the kmap sleeps on pkmap_map_wait.
    assert wait_until(lambda: m.pkmap_stats()["waits"] >= 1)
    assert t.is_alive() and got == []
    victim = 137
    m.kunmap(pages[victim])  # count 2 -> 1: wakes the waiter
    t.join(timeout=20)
    assert not t.is_alive()
    assert errors == []
    # The waiter's rescan wraps, flush_all_zero_pkmaps frees the victim's
    # slot, and the new page takes it.
    assert got == [addrs[victim]]
    assert m.page_address(pages[n]) == addrs[victim]
    assert m.page_address(pages[victim]) is None
    assert m.pkmap_stats()["in_use"] == n
    for i, p in enumerate(pages):
        if i != victim:
            m.kunmap(p)
    assert_healthy(m)


# ---- kmap_atomic and kmap_local_page --------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
def test_kmap_atomic_disables_preemption(arch):
    m = machine(arch)
    hp = highpages(m, 1)[0]
    with m.on_cpu(1):
        a = m.kmap_atomic(hp)
        assert m.in_atomic() and m.preempt_count() == 1
        assert m.translate(a) == (hp.phys, PAGE)
        assert m.vmalloc_to_pfn(a) == hp.pfn  # the fixmap slot maps the page
        assert m.page_address(hp) is None  # kmap_local mappings are not recorded
        m.write(a, b"atomic")
        m.kunmap_atomic(a)
        assert not m.in_atomic() and m.preempt_count() == 0
        with pytest.raises(kmm.PageFaultError):
            m.translate(a)
        b = m.kmap_atomic(hp)
        assert b == a  # the same slot again
        assert m.read(b, 6) == b"atomic"
        m.kunmap_atomic(b)


@pytest.mark.parametrize("arch", ARCHES)
def test_kmap_local_slots_step_down_per_mapping_and_per_cpu(arch):
    m = machine(arch)
    hps = highpages(m, 3)
    with m.on_cpu(0):
        blocks = [m.kmap_local_page(p) for p in hps]
        a0 = blocks[0].addr
        # __fix_to_virt(FIX_KMAP_BEGIN + idx): each nested slot a page lower.
        assert [b.addr for b in blocks] == [a0, a0 - PAGE, a0 - 2 * PAGE]
        assert m.kmap_local_depth(0) == 3 and m.preempt_count() == 3
        for p, b in zip(hps, blocks):
            assert m.vmalloc_to_pfn(b.addr) == p.pfn
        for b in reversed(blocks):
            m.kunmap_local(b)
        assert m.kmap_local_depth(0) == 0 and m.preempt_count() == 0
    with m.on_cpu(1):
        with m.kmap_local_page(hps[0]) as b1:
            # CPU 1's slots start KM_MAX_IDX pages below CPU 0's.
            assert b1.addr == a0 - KM_MAX_IDX * PAGE
            assert m.kmap_local_depth(1) == 1 and m.kmap_local_depth(0) == 0
    assert_healthy(m)


@pytest.mark.parametrize("arch", ARCHES)
def test_kmap_local_context_manager_unmaps_on_exit(arch):
    m = machine(arch)
    hp = highpages(m, 1)[0]
    with m.on_cpu(0):
        with m.kmap_local_page(hp) as blk:
            assert len(blk) == PAGE
            addr = blk.addr
            blk[0:5] = b"hello"
            assert m.in_atomic()
        assert not m.in_atomic() and m.kmap_local_depth(0) == 0
        with pytest.raises(kmm.PageFaultError):
            m.translate(addr)
        with pytest.raises(kmm.UseAfterFreeError):
            bytes(blk)
        with m.kmap_local_page(hp) as again:
            assert again.read(0, 5) == b"hello"
    assert_healthy(m)


@pytest.mark.parametrize("arch", ARCHES)
def test_kmap_local_block_exports_a_buffer(arch):
    m = machine(arch)
    hp = highpages(m, 1)[0]
    with m.on_cpu(0):
        blk = m.kmap_local_page(hp)
        view = memoryview(blk)
        view[10:14] = b"view"
        assert m.read(blk.addr + 10, 4) == b"view"
        with pytest.raises(BufferError):
            m.kunmap_local(blk)
        assert m.kmap_local_depth(0) == 1
        view.release()
        m.kunmap_local(blk)
        assert m.kmap_local_depth(0) == 0
    a = m.kmap(hp)
    assert m.read(a + 10, 4) == b"view"
    m.kunmap(hp)


@pytest.mark.parametrize("arch", ARCHES)
def test_kunmap_local_out_of_order_warns_and_changes_nothing(arch):
    m = machine(arch)
    hps = highpages(m, 3)
    with m.on_cpu(0):
        blocks = [m.kmap_local_page(p) for p in hps]
        for i, b in enumerate(blocks):
            b.write(bytes([i + 1]) * 8)
        before = snapshot(m)
        for wrong in (blocks[0], blocks[1].addr, blocks[0].addr + 100):
            with pytest.raises(kmm.KmmError, match="kunmap_local"):
                m.kunmap_local(wrong)
        assert snapshot(m) == before
        for i, b in enumerate(blocks):
            assert b.read(0, 8) == bytes([i + 1]) * 8  # every mapping still works
        # The right order works; an address inside the top page counts as it.
        m.kunmap_local(blocks[2].addr + 123)
        m.kunmap_local(blocks[1])
        m.kunmap_local(blocks[0])
        # Nothing left: one more is a bug too.
        before = snapshot(m)
        with pytest.raises(kmm.KmmError):
            m.kunmap_local(blocks[0].addr)
        with pytest.raises(kmm.KmmError):
            m.kunmap_local(blocks[0])  # this Block's mapping is gone already
        assert snapshot(m) == before
    assert_healthy(m)


@pytest.mark.parametrize("arch", ARCHES)
def test_nested_kmap_local_within_the_slot_limit(arch):
    # kmap_local_idx_push: idx += 1, BUG_ON(idx >= KM_MAX_IDX): up to
    # KM_MAX_IDX - 1 = 15 nested mappings always work.
    m = machine(arch)
    hps = highpages(m, 15)
    with m.on_cpu(0):
        blocks = [m.kmap_local_page(p) for p in hps]
        assert m.kmap_local_depth(0) == 15 and m.preempt_count() == 15
        assert len({b.addr for b in blocks}) == 15
        for i, b in enumerate(blocks):
            b.write(i.to_bytes(2, "little"))
        for i, b in enumerate(blocks):
            assert b.read(0, 2) == i.to_bytes(2, "little")
        for b in reversed(blocks):
            m.kunmap_local(b)
        assert m.kmap_local_depth(0) == 0 and m.preempt_count() == 0
    assert_healthy(m)


@pytest.mark.parametrize("arch", ARCHES)
def test_too_many_kmap_local_is_a_bug_and_changes_nothing(arch):
    m = machine(arch)
    hps = highpages(m, 20)
    with m.on_cpu(0):
        held = []
        err = None
        for p in hps:
            before = snapshot(m)
            try:
                held.append(m.kmap_local_page(p))
            except kmm.KmmError as e:
                err = e
                break
        # Whatever the exact limit, the kernel BUGs before a 17th slot.
        assert err is not None and len(held) <= KM_MAX_IDX
        assert "KM_MAX_IDX" in str(err)
        assert snapshot(m) == before  # the refused map took no slot, no preempt count
        for i, b in enumerate(held):
            b.write(bytes([i]))
        for b in reversed(held):
            m.kunmap_local(b)
        assert m.preempt_count() == 0
    assert_healthy(m)


@pytest.mark.parametrize("arch", ARCHES)
def test_sleeping_allocation_inside_kmap_local_raises(arch):
    # kmap_local_page pins the task to its CPU; kmm disables preemption there
    # (DESIGN.md §3), so a GFP_KERNEL allocation inside is "sleeping function
    # called from invalid context"; GFP_ATOMIC works.
    m = machine(arch)
    hp = highpages(m, 1)[0]
    with m.on_cpu(0):
        with m.kmap_local_page(hp):
            before = snapshot(m)
            with pytest.raises(kmm.SleepInAtomicError, match="sleeping function called from invalid context"):
                m.kmalloc(64, kmm.GFP_KERNEL)
            with pytest.raises(kmm.SleepInAtomicError):
                m.alloc_page(kmm.GFP_KERNEL)
            with pytest.raises(kmm.SleepInAtomicError):
                m.vmalloc(PAGE)
            with pytest.raises(kmm.SleepInAtomicError):
                m.kmap(hp)
            assert snapshot(m) == before
            k = m.kmalloc(64, kmm.GFP_ATOMIC)
            m.kfree(k)
    assert not m.in_atomic()
    assert_healthy(m)


# ---- x86_64: no highmem ------------------------------------------------------------------------


def test_x86_64_kmap_is_page_address(m):
    p = m.alloc_page(kmm.GFP_HIGHUSER)  # no HighMem zone: a lowmem page
    assert not p.highmem
    assert m.last_pkmap == 0 and m.pkmap_base is None
    assert m.kmap(p) == p.address == m.page_offset + p.phys
    m.kunmap(p)
    with m.on_cpu(0):
        assert m.kmap_atomic(p) == p.address
        assert m.in_atomic()
        m.kunmap_atomic(p.address)
        assert not m.in_atomic()
        with m.kmap_local_page(p) as blk:
            assert blk.addr == p.address
            blk[0:3] = b"x64"
        assert m.read(p.address, 3) == b"x64"
    assert m.pkmap_stats() == {"in_use": 0, "stale": 0, "flushes": 0, "waits": 0}
    m.kmap_flush_unused()  # nothing to do
    assert_healthy(m)


@pytest.mark.parametrize("arch", ARCHES)
def test_vmap_of_highmem_pages_and_32_bit_vmallocinfo(arch):
    m = machine(arch)
    hps = highpages(m, 2)
    v = m.vmap(hps)
    assert m.vmalloc_start <= v.addr < m.vmalloc_end
    v.write(b"A" * PAGE + b"B" * PAGE)
    for p, ch in zip(hps, b"AB"):
        a = m.kmap(p)
        assert m.read(a, PAGE) == bytes([ch]) * PAGE
        m.kunmap(p)
    # %pK on a 32-bit kernel prints 8 hex digits.
    line = next(line for line in m.proc.vmallocinfo().splitlines() if line)
    assert line.startswith(f"0x{v.addr:08x}-0x{v.addr + 3 * PAGE:08x}   12288 ")
    assert line.endswith(" vmap")
    m.vunmap(v)
    assert all(p.refcount == 1 for p in hps)
    assert_healthy(m)


class RefPkmap:
    """mm/highmem.c's pkmap bookkeeping, written out independently:
    kmap_high / map_new_virtual / flush_all_zero_pkmaps / kunmap_high."""

    def __init__(self, last_pkmap: int):
        self.n = last_pkmap
        self.count = [0] * last_pkmap
        self.page = [None] * last_pkmap
        self.addr_of: dict[int, int] = {}  # pfn -> slot (page_address_htable)
        self.last = 0
        self.flushes = 0

    def flush_all_zero(self):
        cleared = False
        for nr in range(self.n):
            if self.count[nr] == 1:
                self.count[nr] = 0
                del self.addr_of[self.page[nr]]
                self.page[nr] = None
                cleared = True
        self.flushes += cleared

    def kmap(self, pfn: int) -> int:
        if pfn not in self.addr_of:
            left = self.n
            while True:
                self.last = (self.last + 1) & (self.n - 1)
                if self.last == 0:
                    self.flush_all_zero()
                    left = self.n
                if self.count[self.last] == 0:
                    break
                left -= 1
                assert left, "would sleep"
            self.count[self.last] = 1
            self.page[self.last] = pfn
            self.addr_of[pfn] = self.last
        nr = self.addr_of[pfn]
        self.count[nr] += 1
        return nr

    def kunmap(self, pfn: int) -> None:
        self.count[self.addr_of[pfn]] -= 1

    def stats(self) -> dict[str, int]:
        return {
            "in_use": sum(c >= 2 for c in self.count),
            "stale": sum(c == 1 for c in self.count),
            "flushes": self.flushes,
            "waits": 0,
        }


@pytest.mark.parametrize("arch, seed", [("i386-pae", 1), ("i386-pae", 2), ("i386", 3)])
def test_pkmap_follows_the_kernels_algorithm(arch, seed):
    import random

    m = machine(arch)
    n = m.last_pkmap
    ref = RefPkmap(n)
    pages = highpages(m, n + n // 2)
    rng = random.Random(seed)
    held: list[kmm.Page] = []  # one entry per kmap not yet kunmapped
    for step in range(4 * n):
        op = rng.random()
        if op < 0.55 and len({p.pfn for p in held}) < n - 8:
            p = rng.choice(pages)
            assert m.kmap(p) == m.pkmap_base + ref.kmap(p.pfn) * PAGE, step
            held.append(p)
        elif op < 0.97 and held:
            p = held.pop(rng.randrange(len(held)))
            m.kunmap(p)
            ref.kunmap(p.pfn)
        else:
            m.kmap_flush_unused()
            ref.flush_all_zero()
        assert m.pkmap_stats() == ref.stats(), step
    assert ref.flushes >= 2  # the walk wrapped around the window more than once
    for p in held:
        m.kunmap(p)
    assert_healthy(m)


def test_a_reused_pkmap_slot_is_not_stale_on_another_cpu():
    # flush_all_zero_pkmaps flushes the whole window on every CPU
    # (flush_tlb_kernel_range), so a CPU that cached slot 1 for page A sees
    # page C there once the slot is reused.
    m = machine("i386-pae")
    n = m.last_pkmap
    a_page, *others = highpages(m, n + 1)
    with m.on_cpu(0):
        addr = m.kmap(a_page)
        assert addr == m.pkmap_base + PAGE
        m.write(addr, b"AAAA")
    with m.on_cpu(1):
        assert m.read(addr, 4) == b"AAAA"  # CPU 1 now caches slot 1
    m.kunmap(a_page)
    with m.on_cpu(0):
        for p in others[: n - 2]:  # slots 2 .. n-1, left stale
            m.kmap(p)
            m.kunmap(p)
        b_page, c_page = others[n - 2], others[n - 1]
        assert m.kmap(b_page) == m.pkmap_base  # the wrap: flush, then slot 0
        assert m.kmap(c_page) == addr  # slot 1 again
        m.write(addr, b"CCCC")
    with m.on_cpu(1):
        assert m.read(addr, 4) == b"CCCC"
    ka = m.kmap(a_page)
    assert m.read(ka, 4) == b"AAAA"  # A's bytes are still A's
    for p in (a_page, b_page, c_page):
        m.kunmap(p)
    assert_healthy(m)


def test_a_reused_kmap_local_slot_maps_the_new_page():
    m = machine("i386")
    p1, p2 = highpages(m, 2)
    a2 = m.kmap(p2)
    m.write(a2, b"xyz")
    m.kunmap(p2)
    with m.on_cpu(0):
        with m.kmap_local_page(p1) as b1:
            b1.write(b"one")
            addr = b1.addr
        with m.kmap_local_page(p2) as b2:
            assert b2.addr == addr  # the same fixmap slot
            assert m.read(addr, 3) == b"xyz"  # p2's bytes, not a stale p1 entry
            b2.write(b"two")
        with m.kmap_local_page(p1) as b1:
            assert b1.read(0, 3) == b"one"


def test_threads_kmap_and_kmap_local_concurrently():
    m = machine("i386-pae")
    per_thread = 300  # 4 x 300 distinct pages > 512 slots: the window wraps and flushes
    pages = highpages(m, 4 * per_thread)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        import random

        try:
            rng = random.Random(k)
            mine = pages[k * per_thread : (k + 1) * per_thread]
            stamp = {}
            with m.on_cpu(k % 2):
                for i in range(600):
                    p = rng.choice(mine)
                    if rng.random() < 0.7:
                        a = m.kmap(p)
                        if p.pfn in stamp:
                            assert m.read(a, 8) == stamp[p.pfn]
                        stamp[p.pfn] = i.to_bytes(4, "little") + k.to_bytes(4, "little")
                        m.write(a, stamp[p.pfn])
                        m.kunmap(p)
                    else:
                        with m.kmap_local_page(p) as blk:
                            if p.pfn in stamp:
                                assert blk.read(0, 8) == stamp[p.pfn]
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    st = m.pkmap_stats()
    assert st["in_use"] == 0 and st["flushes"] >= 1
    assert [m.kmap_local_depth(c) for c in range(2)] == [0, 0]
    assert_healthy(m)
