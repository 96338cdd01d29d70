"""The ``kmm`` command.

``kmm`` (or ``kmm replay``) replays the sample kernel trace shipped with kmm
on a simulated machine; ``kmm replay FILE`` and ``kmm stat FILE`` work on a
trace of your own (a ``perf.data``, or its ``perf script`` text); ``kmm demo`` boots a machine and
walks through the page allocator, printing the kernel's own views;
``kmm proc`` prints a /proc file of a configured machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import kmm

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_ERROR = 1


def _machine_args(p: argparse.ArgumentParser, memory: str = "1G") -> None:
    p.add_argument("--arch", default="x86_64", choices=["x86_64", "i386", "i386-pae"], help="architecture (default x86_64)")
    p.add_argument("--memory", default=memory, help=f"RAM size, e.g. 512M, 64G (default {memory})")
    p.add_argument("--cpus", type=int, default=2, help="simulated CPUs (default 2)")
    p.add_argument("--page-size", type=int, default=4096, help="bytes per page (default 4096)")
    p.add_argument("--min-free-kbytes", type=int, default=None, help="vm.min_free_kbytes (default: the kernel's formula)")


def _make_machine(a: argparse.Namespace) -> kmm.Machine:
    return kmm.Machine(arch=a.arch, memory=a.memory, cpus=a.cpus, page_size=a.page_size, min_free_kbytes=a.min_free_kbytes)


def _section(title: str) -> None:
    print()
    print(title)
    print("-" * len(title))


def demo(a: argparse.Namespace) -> int:
    m = _make_machine(a)
    print(f"Booted {m!r}: {m.nr_pages} page frames, pageblock order {m.pageblock_order}, "
          f"min_free_kbytes {m.min_free_kbytes}")
    _section("Zones (the kernel's struct zone fields)")
    for z in m.zones:
        if not z.populated:
            print(f"  {z.name:8s} (empty)")
            continue
        print(f"  {z.name:8s} start_pfn={z.start_pfn:#x} spanned={z.spanned} managed={z.managed} "
              f"free={z.free_pages} min={z.min} low={z.low} high={z.high} protection={tuple(z.lowmem_reserve)}")
    _section("/proc/buddyinfo at boot")
    print(m.proc.buddyinfo(), end="")

    _section("Allocating with gfp flags")
    with m.trace.record("kmem:mm_page_*") as rec:
        kernel = [m.alloc_pages(kmm.GFP_KERNEL, o) for o in (0, 1, 3)]
        dma = m.alloc_pages(kmm.GFP_KERNEL | kmm.GFP_DMA, 0)
        user = m.alloc_pages(kmm.GFP_HIGHUSER_MOVABLE, 0)
        addr = m.get_zeroed_page(kmm.GFP_KERNEL)
    for p in [*kernel, dma, user]:
        print(f"  {p!r}  from zone {p.zone}, pageblock {p.migratetype}")
    print(f"  get_zeroed_page -> {addr:#x} (virt_to_phys {m.virt_to_phys(addr):#x}, "
          f"first bytes {m.read(addr, 8).hex()})")
    m.write(addr, b"hello, buddy")
    print(f"  wrote and read back: {m.read(addr, 12)!r}")
    print("  tracepoints fired (as perf script prints them):")
    for line in rec.to_perf_script(comm="demo", pid=1).splitlines():
        print("   " + line.strip())

    _section("/proc/buddyinfo after the allocations (orders split by expand())")
    print(m.proc.buddyinfo(), end="")

    _section("A request that cannot be satisfied")
    try:
        m.alloc_pages(kmm.GFP_KERNEL | kmm.__GFP_NOWARN, kmm.MAX_PAGE_ORDER + 1)
    except kmm.OutOfMemoryError as e:
        print(f"  OutOfMemoryError: {e}")
    try:
        m.free_pages(kernel[0], 0)
        m.free_pages(kernel[0], 0)
    except kmm.DoubleFreeError as e:
        print(f"  DoubleFreeError: {e}")
    for p, o in zip(kernel[1:], (1, 3)):
        m.free_pages(p, o)
    m.free_pages(dma)
    m.free_pages(user)
    m.free_page(addr)
    _section("Everything freed: buddies merged back (/proc/buddyinfo)")
    print(m.proc.buddyinfo(), end="")
    _section("The slab layer: kmalloc and a cache of your own")
    before = m.nr_free_pages()
    blk = m.kmalloc(100, kmm.GFP_KERNEL)
    print(f"  kmalloc(100) -> {blk!r}: ksize {m.ksize(blk)} (served by kmalloc-128)")
    blk[0:5] = b"hello"
    print(f"  bytes(block)[:5] = {bytes(blk)[:5]!r}; memoryview works: {memoryview(blk)[:5].tobytes()!r}")
    m.kfree(blk)
    try:
        len(blk)
    except kmm.UseAfterFreeError as e:
        print(f"  after kfree: UseAfterFreeError: {e}")
    seen = []
    cache = m.kmem_cache_create("demo_obj", 200, flags=kmm.SLAB_HWCACHE_ALIGN, ctor=lambda b: seen.append(b.addr))
    print(f"  {cache!r}")
    objs = [cache.alloc(kmm.GFP_KERNEL) for _ in range(cache.objs_per_slab + 3)]
    print(f"  {len(objs)} objects: ctor ran {len(seen)} times (once per object of each new slab); slabs {cache.slabs()}")
    for o in objs:
        cache.free(o)
    print(f"  all freed: slabs {cache.slabs()}; shrink gave back {cache.shrink()} pages")
    print("  /proc/slabinfo (head):")
    for line in m.proc.slabinfo().splitlines()[:4]:
        print("   " + line)
    cache.destroy()
    k128 = m.kmem_cache("kmalloc-128")
    print(f"  kmalloc-128 still holds its empty cpu slab: free pages {before} -> {m.nr_free_pages()}; "
          f"after its shrink: {k128.shrink() and m.nr_free_pages()}")

    _section("Per-CPU: CPUs, preemption, per-CPU page lists and variables")
    with m.on_cpu(1):
        cpu = m.get_cpu()
        print(f"  get_cpu() -> {cpu}; in_atomic() {m.in_atomic()}, preempt_count() {m.preempt_count():#x}")
        try:
            m.kmalloc(64, kmm.GFP_KERNEL)
        except kmm.SleepInAtomicError as e:
            print("  GFP_KERNEL with preemption disabled: SleepInAtomicError:")
            for line in str(e).splitlines():
                print("    " + line)
        blk = m.kmalloc(64, kmm.GFP_ATOMIC)
        print(f"  GFP_ATOMIC works: {blk!r}")
        m.put_cpu()
        m.kfree(blk)
        pages = [m.alloc_page(kmm.GFP_KERNEL) for _ in range(3)]
        for p in pages:
            m.free_page(p)
    print(f"  3 order-0 pages freed on cpu 1 wait on its per-CPU lists: {m.nr_pcp_pages()} pages "
          f"on pcp lists (a refill brought a batch); drain_all_pages() gives them back")
    m.drain_all_pages()
    m.define_per_cpu("counter", 8)
    for k in range(m.cpus):
        with m.on_cpu(k), m.get_cpu_var("counter") as v:
            v[0:8] = (100 + k).to_bytes(8, "little")
    print("  per-CPU variable 'counter':",
          [int.from_bytes(bytes(m.per_cpu("counter", k)), "little") for k in range(m.cpus)])

    _section("Virtual memory: vmalloc over page tables, the TLB, kernel stacks")
    po = m.page_offset
    for off in (0x1000, 2 << 20):
        phys, size = m.translate(po + off)
        print(f"  direct map {po + off:#x} -> phys {phys:#x} in a {size >> 10} KiB page")
    v = m.vmalloc(3 * m.page_size + 100)
    v[0:6] = b"vmaddr"
    pages = [m.vmalloc_to_page(v.addr + i * m.page_size) for i in range(4)]
    print(f"  vmalloc({len(v)}) -> {v.addr:#x}: virtually contiguous, pages at pfns "
          f"{[hex(p.pfn) for p in pages]} (order-0 pages, each mapped on its own PTE)")
    if pages[0].address is not None:
        print(f"  the same bytes through the first page's direct-map address: {m.read(pages[0].address, 6)!r}")
    else:
        a = m.kmap(pages[0])
        print(f"  the first page is HighMem (no direct-map address); through kmap() at {a:#x}: {m.read(a, 6)!r}")
        m.kunmap(pages[0])
    try:
        m.read(v.addr + 4 * m.page_size, 1)
    except kmm.PageFaultError as e:
        print(f"  reading the guard page: PageFaultError: {str(e).splitlines()[0]}")
    st = m.alloc_thread_stack()
    print(f"  a kernel stack: {st!r}, STACK_END_MAGIC at its base: {m.read(st.base, 4)[::-1].hex()}")
    print("  /proc/vmallocinfo:")
    for line in m.proc.vmallocinfo().splitlines():
        print("   " + line)
    m.vfree(v)
    m.free_thread_stack(st)
    print(f"  after vfree the ranges wait for a lazy purge ({m.vmap_lazy_nr} of {m.lazy_max_pages} pages); "
          f"vm_unmap_aliases() purges {m.vm_unmap_aliases()} areas with one TLB flush")
    t = m.tlb_stats()
    print(f"  TLB of this CPU: {t[m.smp_processor_id()]}")
    h = kmm.Machine(arch="i386", memory="2G", cpus=2)
    hp = h.alloc_pages(kmm.GFP_HIGHUSER, 0)
    a = h.kmap(hp)
    print(f"  i386: a HighMem page has no address ({hp!r}); kmap() gives it pkmap slot {a:#x}")
    h.kunmap(hp)
    with h.kmap_local_page(hp) as mem:
        mem[0:2] = b"hi"
        print(f"  kmap_local_page() -> fixmap slot {mem.addr:#x} (preemption off: in_atomic() {h.in_atomic()})")
    h.free_pages(hp, 0)

    _section("/proc/zoneinfo (the DMA32 zone, without the node's stats)")
    print(_zone_block(m.proc.zoneinfo(), "DMA32"), end="")
    errs = m.check()
    print(f"invariant check: {'ok' if not errs else errs}")
    return EXIT_OK if not errs else EXIT_ERROR


def _zone_block(zoneinfo: str, name: str) -> str:
    """One zone's block of /proc/zoneinfo, with the per-node stats left out."""
    out, inside, node_stats = [], False, False
    for line in zoneinfo.splitlines(keepends=True):
        if line.startswith("Node "):
            inside = line.split()[-1] == name
        if not inside:
            continue
        if line.startswith("  per-node stats"):
            node_stats = True
            continue
        if node_stats and line.startswith("      "):
            continue
        node_stats = False
        out.append(line)
    return "".join(out)


def proc(a: argparse.Namespace) -> int:
    m = _make_machine(a)
    if a.trace:
        t = _load(a, a.trace)
        kmm.trace.replay(t, m)
    fn = getattr(m.proc, a.file)
    sys.stdout.write(fn())
    return EXIT_OK


def _load(a: argparse.Namespace, path) -> "kmm.trace.TraceLog":
    t = kmm.trace.load(path, lenient=a.lenient, progress=a.progress)
    lost = []
    if t.lost_chunks:
        lost.append(f"{t.lost_chunks:,} chunks ({max(t.lost_events, t.lost_samples):,} events) while recording")
    elif t.lost_events or t.lost_samples:
        lost.append(f"{max(t.lost_events, t.lost_samples):,} events while recording")
    if t.truncated_at is not None:
        lost.append(f"whatever came after byte {t.truncated_at:,}, where the file is cut")
    if lost:
        print(f"kmm: warning: the trace lost {' and '.join(lost)} (ring buffer overruns): "
              "kmm could not see them, so these counts and the replay are partial", file=sys.stderr)
    if t.skipped:
        first = t.skipped_examples[0]
        print(f"kmm: skipped {t.skipped} malformed line(s) (first: line {first[0]}: {first[1]})", file=sys.stderr)
    return t


def stat(a: argparse.Namespace) -> int:
    both = not a.slab and not a.page
    slab, page = a.slab or both, a.page or both
    if a.sort:
        for mode, keys in (("slab", kmm.trace.SLAB_SORT_KEYS), ("page", kmm.trace.PAGE_SORT_KEYS)):
            if (mode == "slab" and slab) or (mode == "page" and page):
                bad = [k for k in a.sort.split(",") if k not in keys]
                if bad:
                    a.parser.error(f"unknown {mode} --sort key: '{bad[0]}' (keys: {', '.join(keys)})")
    t = _load(a, a.file)
    st = kmm.trace.stat(t)
    sys.stdout.write(st.format(slab=slab, page=page, caller=a.caller, alloc=a.alloc, sort=a.sort, lines=a.lines))
    return EXIT_OK


def replay(a: argparse.Namespace) -> int:
    if a.plot:
        from kmm import plot

        try:
            plot.require()
        except plot.PlotUnavailable as e:
            print(f"kmm: error: --plot: {e}", file=sys.stderr)
            return EXIT_ERROR
    path = a.file or kmm.trace.SAMPLE
    t = _load(a, path)
    m = _make_machine(a)
    if not a.file:
        print(f"Replaying the sample trace shipped with kmm ({path.name}: perf script of Linux 6.18, 2 CPUs)")
    print(f"Machine: {m!r}\n")
    r = kmm.trace.replay(t, m, sample_every=a.sample_every, free_at_end=a.free_at_end)
    sys.stdout.write(r.format(slabinfo=a.slabinfo))
    if a.plot:
        from kmm import plot

        plot.replay_plot(r, a.plot, title=f"kmm replay of {Path(path).name}", owners=m.page_owners())
        print(f"\nplot written to {a.plot}")
    return EXIT_OK


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lenient", action="store_true", help="skip malformed lines (counted) instead of stopping at the first")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: for files over 4 MiB when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    tunables = "\n".join(f"  {n:24s} {d:16s} {h}" for n, d, h in kmm.TUNABLES)
    p = argparse.ArgumentParser(
        prog="kmm",
        description="kmm: a fast, faithful model of the Linux kernel's memory manager.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Machine tunables (kmm.Machine keyword arguments):\n{tunables}\n\n"
        "Exit codes: 0 success, 1 an error (a malformed trace line, a missing file, a model or\n"
        "invariant error), 2 bad usage.",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    d = sub.add_parser("demo", help="boot a machine and walk through the page allocator, slab, per-CPU")
    _machine_args(d)
    d.set_defaults(func=demo)
    pr = sub.add_parser("proc", help="print a /proc file of a freshly booted machine (or after replaying a trace)")
    pr.add_argument("file", choices=["buddyinfo", "zoneinfo", "pagetypeinfo", "meminfo", "vmstat", "slabinfo", "vmallocinfo"])
    pr.add_argument("--trace", metavar="FILE", help="replay this trace first (perf.data, or perf script / trace_pipe text)")
    pr.add_argument("--lenient", action="store_true", help="skip malformed trace lines (counted) instead of failing")
    pr.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar while loading (default: when stderr is a terminal)")
    _machine_args(pr)
    pr.set_defaults(func=proc)
    st = sub.add_parser(
        "stat",
        help="perf kmem stat over a perf.data or perf script / trace_pipe text (plain, .gz, .xz)",
        description="The numbers of `perf kmem --slab stat` and `perf kmem --page stat` (perf 6.1), "
        "in perf's layout. With neither --slab nor --page, both.",
    )
    st.add_argument("file", metavar="FILE", help="a perf.data (call sites named from a kallsyms.txt[.xz|.gz] beside it), "
                    "or `perf script` / trace_pipe text; plain, .gz or .xz")
    st.add_argument("--slab", action="store_true", help="analyze the slab allocator")
    st.add_argument("--page", action="store_true", help="analyze the page allocator")
    st.add_argument("--caller", action="store_true", help="show per-callsite statistics")
    st.add_argument("--alloc", action="store_true", help="show per-allocation statistics")
    st.add_argument("-s", "--sort", metavar="KEYS",
                    help="sort keys, comma-separated: slab: ptr, callsite, bytes, hit, pingpong, frag "
                    "(default frag,hit,bytes); page: page, callsite, bytes, hit, order, migtype, gfp (default bytes,hit)")
    st.add_argument("-l", "--line", dest="lines", type=int, default=None, metavar="N", help="show N lines per table")
    _trace_args(st)
    st.set_defaults(func=stat, parser=st)
    rp = sub.add_parser(
        "replay",
        help="replay a trace's allocations and frees on a kmm machine (default: the packaged sample)",
        description="Feed a trace's kmalloc/kfree, kmem_cache_alloc/free, page, percpu and vmap-area events, each on "
        "the CPU it ran on, into a kmm machine; report kmm's decisions that differed from the kernel's "
        "(bytes_alloc, zone: the kernel's zone is read from the traced pfn with x86_64's boundaries), "
        "memory and external fragmentation. vmap areas (alloc_vmap_area / free_vmap_area_noflush) are "
        "vmalloc'ed and vfree'd; their addresses are not compared.",
    )
    rp.add_argument("file", metavar="FILE", nargs="?", help="a perf.data, or `perf script` / trace_pipe text; plain, .gz or .xz "
                    "(default: the sample trace)")
    _machine_args(rp, memory="8G")
    rp.add_argument("--sample-every", type=int, default=1000, metavar="N", help="events between fragmentation samples (default 1000)")
    rp.add_argument("--plot", metavar="OUT.png", help="draw free pages per order over time and the physical memory map by owner (needs matplotlib: the 'plot' extra)")
    rp.add_argument("--slabinfo", action="store_true", help="print /proc/slabinfo at the end too")
    rp.add_argument("--free-at-end", action="store_true", help="free everything the replay allocated at the end")
    _trace_args(rp)
    rp.set_defaults(func=replay)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["replay"]
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return a.func(a)
    except OSError as e:
        print(f"kmm: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, kmm.KmmError) as e:
        print(f"kmm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_OK
