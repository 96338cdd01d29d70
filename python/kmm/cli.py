"""The ``kmm`` command.

``kmm`` (or ``kmm replay``) replays the sample kernel trace shipped with kmm
on a simulated machine; ``kmm replay FILE`` and ``kmm stat FILE`` work on a
trace of your own (a ``perf.data``, or its ``perf script`` text); ``kmm demo`` boots a machine and
walks through the page allocator, printing the kernel's own views;
``kmm proc`` prints a /proc file of a configured machine; ``kmm record``
writes a recording bundle of the Linux machine it runs on.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import kmm

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_ERROR = 1


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2):
    ``kmm proc: error: argument --cpus: must be an integer >= 1, not '-1'``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(lo: int | None = None, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]."""
    bounds = " and ".join(b for b in (lo is not None and f">= {lo}", hi is not None and f"<= {hi}") if b)

    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer{' ' + bounds if bounds else ''}, not {text!r}")
        return v

    conv.__name__ = "integer"
    return conv


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return v


def _size(text: str) -> str:
    """An argparse type: a size such as 512M or 64G (checked, kept as text)."""
    try:
        if kmm.parse_size(text) <= 0:
            raise ValueError("zero")
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"must be a size such as 4096, 512M or 64G, not {text!r}") from None
    return text


def _cmdline(text: str) -> str:
    """An argparse type: boot parameters, checked by booting the smallest machine with them."""
    if text.strip():
        try:
            kmm.Machine(memory="4M", cpus=1, cmdline=text)
        except (ValueError, OverflowError, kmm.KmmError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def default_trace() -> tuple[Path, str]:
    """The trace plain ``kmm`` (and ``kmm replay`` without a FILE) replays,
    and a few words on what it is: the one place to change the default."""
    return kmm.trace.BUNDLE, ("the recording shipped with kmm (12 s of a Linux 6.18 VM with 2 CPUs copying, "
                              "compressing and compiling files: its perf.data and /proc state)")


def _machine_args(p: argparse.ArgumentParser, memory: str | None = "1G", cpus: int | None = 2,
                  settings: bool = True) -> None:
    p.add_argument("--arch", default="x86_64", choices=["x86_64", "i386", "i386-pae"], help="architecture (default x86_64)")
    if memory is None:
        p.add_argument("--memory", default=None, type=_size,
                       help="RAM size, e.g. 512M, 64G (default: the recording's zones, or up to the highest pfn the trace names)")
    else:
        p.add_argument("--memory", default=memory, type=_size, help=f"RAM size, e.g. 512M, 64G (default {memory})")
    if cpus is None:
        p.add_argument("--cpus", type=_int(1, 1024), default=None,
                       help="simulated CPUs (default: as recorded, or as many as the trace ran on)")
    else:
        p.add_argument("--cpus", type=_int(1, 1024), default=cpus, help=f"simulated CPUs (default {cpus})")
    p.add_argument("--page-size", type=int, default=4096, choices=[4096, 8192, 16384, 65536], metavar="BYTES",
                   help="bytes per page: 4096, 8192, 16384 or 65536 (default 4096)")
    p.add_argument("--min-free-kbytes", type=_int(0), default=None, help="vm.min_free_kbytes (default: the kernel's formula)")
    p.add_argument("--cmdline", default="", metavar="PARAMS", type=_cmdline,
                   help="boot parameters in the kernel's syntax, e.g. \"slub_debug=FZ,kmalloc-64 slub_min_order=1\" "
                   "(kmm --help lists them)")
    if not settings:
        return
    p.add_argument("--set", dest="settings", default="", metavar="\"NAME=VALUE ...\"",
                   help="settings: a NAME with a dot is a sysctl (vm.watermark_scale_factor=200), one without a "
                   "boot parameter (slub_min_order=1); kmm --help lists both")


def _settings(a: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """--cmdline and --set, as (command line, sysctls)."""
    from kmm import settings

    boot, sysctl = settings.split(a.settings)
    return " ".join(x for x in (a.cmdline, boot) if x), sysctl


def _make_machine(a: argparse.Namespace) -> kmm.Machine:
    cmdline, sysctl = _settings(a)
    return kmm.Machine(arch=a.arch, memory=a.memory, cpus=a.cpus, page_size=a.page_size, min_free_kbytes=a.min_free_kbytes,
                       cmdline=cmdline, sysctl=sysctl)


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
    boot = m.proc.buddyinfo()
    print(boot, end="")

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
    for line in _trace_summary(rec.to_perf_script(comm="demo", pid=1).splitlines()):
        print(line)

    _section("/proc/buddyinfo after the allocations (orders split by expand())")
    print(m.proc.buddyinfo(), end="")

    _section("Requests the kernel refuses")
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
    # Order-0 to order-3 frees stop on the per-CPU lists (as the kernel's
    # free_unref_page does), with the pages a refill brought: drain them so
    # that the buddies can merge.
    on_pcp = m.nr_pcp_pages()
    m.drain_all_pages()
    _section("Everything freed: drain_all_pages(), and the buddies merged back (/proc/buddyinfo)")
    after = m.proc.buddyinfo()
    print(after, end="")
    print(f"  the frees stopped on the per-CPU lists (orders 0-3 do), with the rest of each refill's batch: "
          f"{on_pcp} pages;")
    print("  drained, " + ("every split block merged back with its buddy: the same as at boot" if after == boot
                          else "the free lists still differ from boot"))
    _section("The slab layer: kmalloc and a cache of your own")
    free = lambda: m.nr_free_pages() + m.nr_pcp_pages()  # noqa: E731 - pages on pcp lists are free too
    before = free()
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
    held = free()
    k128.shrink()
    print(f"  free pages (buddy and per-CPU lists) {before} -> {held}: kmalloc-128 keeps its empty cpu slab; "
          f"kmem_cache_shrink() gives it back: {free()}")

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
    on_pcp = m.nr_pcp_pages()
    m.drain_all_pages()
    print(f"  3 order-0 pages allocated and freed on cpu 1: refills fill its per-CPU list a batch at a time and "
          f"the frees go back there: {on_pcp} pages on pcp lists; drain_all_pages() -> {m.nr_pcp_pages()}")
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


#: What each page-allocator tracepoint of the demo stands for
#: (include/trace/events/kmem.h, and where mm/page_alloc.c fires it).
_TRACEPOINTS = {
    "kmem:mm_page_alloc": "one per allocation",
    "kmem:mm_page_alloc_zone_locked": "taken under zone->lock (percpu_refill=1: refilling a per-CPU list)",
    "kmem:mm_page_alloc_extfrag": "a fallback: the first block taken from another migratetype's pageblock",
    "kmem:mm_page_free": "one per free",
    "kmem:mm_page_free_batched": "a page freed in a batch",
    "kmem:mm_page_pcpu_drain": "a page going back from a per-CPU list to the free lists",
}

#: Events that fired more often than this show only their first lines.
_TRACE_EXAMPLES = 8


def _trace_summary(lines: list[str]) -> list[str]:
    """perf script lines summarised for the tour: a count per event, then
    every line of the rare events and the first two of the frequent ones."""
    names = [line.split(": ", 2)[1].strip() if line.count(": ") >= 2 else "?" for line in lines]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    out = [f"  tracepoints fired: {len(lines)} (kmm records them as the kernel does; perf script's format):"]
    width = max(map(len, counts), default=0)
    for n, c in counts.items():
        out.append(f"    {c:5d}  {n:<{width}}  {_TRACEPOINTS.get(n, '')}".rstrip())
    seen: dict[str, int] = {}
    skipped = False
    for n, line in zip(names, lines):
        seen[n] = seen.get(n, 0) + 1
        if counts[n] > _TRACE_EXAMPLES and seen[n] > 2:
            skipped = True
            continue
        if skipped:
            out.append("     ...")
            skipped = False
        out.append("     " + line.strip())
    if skipped:
        out.append("     ...")
    return out


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
        if _no_events(a.trace, t):
            return EXIT_ERROR
        kmm.trace.replay(t, m)
    fn = getattr(m.proc, a.file)
    sys.stdout.write(fn())
    return EXIT_OK


def _no_events(path, t: "kmm.trace.TraceLog") -> bool:
    """Say so on stderr when a trace holds no events (an empty file, or
    only comments and blank lines)."""
    if len(t):
        return False
    lines = f"{t.lines:,} line{'s' if t.lines != 1 else ''}"
    if t.lines == 0:
        why = "the file is empty"
    elif t.skipped:
        why = f"{lines}, {t.skipped:,} of them malformed and skipped"
    else:
        why = f"{lines}, only comments and blank lines"
    print(f"kmm: error: {path}: no events ({why})", file=sys.stderr)
    return True


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
    if _no_events(a.file, t):
        return EXIT_ERROR
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
    path, what = (a.file, "") if a.file else default_trace()
    t = _load(a, path)
    if _no_events(path, t):
        return EXIT_ERROR
    cmdline, sysctl = _settings(a)
    overrides = _overrides(a, cmdline, sysctl)
    if a.compare:
        return _compare(a, t, path, overrides)
    if isinstance(t, kmm.trace.Recording):
        m = t.machine(warm=not a.cold, **overrides)
        for w in (*t.warnings, *t.machine_info.get("warnings", ())):
            print(f"kmm: warning: {w}", file=sys.stderr)
    else:
        m = kmm.trace.machine_for(t, warm=not a.cold, **overrides)
    if not a.file:
        print(f"Replaying {what} ({Path(path).name})")
    print(f"Machine: {m!r}\n")
    r = kmm.trace.replay(t, m, sample_every=a.sample_every, free_at_end=a.free_at_end, time=a.time)
    sys.stdout.write(r.format(slabinfo=a.slabinfo))
    if a.plot:
        from kmm import plot

        plot.replay_plot(r, a.plot, title=f"kmm replay of {Path(path).name} on {m!r}", owners=m.page_owners(),
                         pageblock_order=m.pageblock_order)
        print(f"\nplot written to {a.plot}")
    return EXIT_OK


def _overrides(a: argparse.Namespace, cmdline: str, sysctl: dict[str, str]) -> dict[str, Any]:
    """The machine arguments a replay's machine gets from the command line
    (what is not given stays as the recording says)."""
    overrides = {k: v for k, v in (("arch", a.arch), ("memory", a.memory), ("cpus", a.cpus), ("page_size", a.page_size),
                                   ("min_free_kbytes", a.min_free_kbytes), ("cmdline", cmdline or None),
                                   ("sysctl", sysctl or None)) if v is not None}
    if overrides.get("arch") == "x86_64":
        del overrides["arch"]
    if overrides.get("page_size") == 4096:
        del overrides["page_size"]
    return overrides


def sweep(a: argparse.Namespace) -> int:
    """kmm sweep: the grid of replays, to worker processes or a cluster."""
    from kmm import settings as _settings_mod
    from kmm import sweep as _sweep

    recordings: list[str] = [str(r) for r in a.recordings]
    settings_list: list[str] = list(a.grid_settings or [])
    seeds = a.seeds or 1
    try:
        if a.grid:
            g_recs, g_sets, g_seeds = _sweep.load_grid(a.grid)
            recordings += g_recs
            settings_list += g_sets
            seeds = a.seeds or g_seeds
        if not recordings:
            recordings = [str(default_trace()[0])]
        base = a.cmdline
        jobs = _sweep.grid(recordings, settings_list or [""], seeds)
        for s in {j.settings for j in jobs}:  # each with the base command line
            boot, sysctl = _settings_mod.split(s)
            kmm._kmm.check_settings(" ".join(x for x in (base, boot) if x), sysctl)
    except (ValueError, TypeError) as e:
        print(f"kmm sweep: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"kmm sweep: error: {e.filename or a.grid}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    if a.cluster is not None and "://" not in a.cluster:
        print(f"kmm sweep: error: --cluster {a.cluster!r}: expected a scheduler address such as tcp://HOST:PORT",
              file=sys.stderr)
        return EXIT_USAGE
    if a.plot:
        from kmm import plot

        try:
            plot.require()
        except plot.PlotUnavailable as e:
            print(f"kmm: error: --plot: {e}", file=sys.stderr)
            return EXIT_ERROR
    for r in dict.fromkeys(recordings):
        if not Path(r).exists():
            print(f"kmm sweep: error: {r}: No such file or directory", file=sys.stderr)
            return EXIT_ERROR
    options = dict(_overrides(a, base, {}), warm=not a.cold, time=a.time, sample_every=a.sample_every,
                   probe=a.probe)
    out = Path(a.output)
    where = f"the Dask cluster at {a.cluster}" if a.cluster else f"{a.jobs or os.cpu_count() or 1} worker process(es)"
    print(f"kmm sweep: {len(jobs)} runs ({len(dict.fromkeys(recordings))} recording(s) x "
          f"{len({j.settings for j in jobs})} settings x {seeds} seed(s)) on {where}; results in {out}", flush=True)
    try:
        res = _sweep.sweep(recordings, settings_list or [""], seeds=seeds, jobs=a.jobs, output=out,
                           cluster=a.cluster, progress=a.progress, **options)
    except (RuntimeError, ConnectionError) as e:
        print(f"kmm sweep: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if res.skipped:
        print(f"kmm sweep: {res.skipped} run(s) already in {out}: skipped")
    print()
    sys.stdout.write(res.summary())
    print(f"\n{len(res.rows)} rows in {out}" + (f" and {res.parquet}" if res.parquet else ""))
    if a.plot:
        _sweep.plot(res.rows, a.plot, title=f"kmm sweep: {len(res.rows)} runs")
        print(f"plot written to {a.plot}")
    return EXIT_OK if not res.failed else EXIT_ERROR


def _compare(a: argparse.Namespace, t: Any, path: str | Path, overrides: dict[str, Any]) -> int:
    """kmm replay --compare A B: both replays, side by side."""
    from kmm import compare

    name = Path(path).name
    sa, sb = a.compare
    print(f"Replaying {name} twice: A {sa or '(default)'!r}, B {sb or '(default)'!r}\n", flush=True)
    c = compare.compare(t, sa, sb, name=name, warm=not a.cold, time=a.time, sample_every=a.sample_every, **overrides)
    for w in getattr(t, "warnings", ()):
        print(f"kmm: warning: {w}", file=sys.stderr)
    print(f"Machine A: {c.a.machine}\nMachine B: {c.b.machine}\n")
    sys.stdout.write(c.format())
    if a.plot:
        compare.plot(c, a.plot, title=f"kmm replay --compare of {name}")
        print(f"\nplot written to {a.plot}")
    return EXIT_OK


def record(a: argparse.Namespace) -> int:
    from kmm import record as _record

    return _record.main(a)


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lenient", action="store_true", help="skip malformed lines (counted) instead of stopping at the first")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: for files over 4 MiB when stderr is a terminal)")


def _fill(text: str, width: int = 78) -> str:
    """Wrap a paragraph without breaking a `quoted command` across lines."""
    parts = text.split("`")
    parts[1::2] = [p.replace(" ", "\xa0") for p in parts[1::2]]  # textwrap splits on ASCII whitespace only
    return textwrap.fill("`".join(parts), width=width).replace("\xa0", " ")


def build_parser() -> argparse.ArgumentParser:
    tunables = "\n".join(f"  {n:24s} {d:16s} {h}" for n, d, h in kmm.TUNABLES)
    boot = "\n".join(f"  {n:24s} {d or '-':16s} {h}" for n, d, _f, h in kmm.BOOT_PARAMS)
    sysctls = "\n".join(f"  {n:34s} {v:22s} {h}" for n, _d, v, h in kmm.SYSCTLS)
    path, what = default_trace()
    plain = _fill(
        f"Plain `kmm` (no COMMAND) is `kmm replay`: it replays {what} ({path.name}), on a simulated machine "
        "shaped like the recorded one and started from its recorded state, and reports how kmm's own decisions "
        "compare with the kernel's (per-CPU list refills and drains, fallbacks, slab pages, the free lists over "
        "time), memory in use and fragmentation. "
        "`kmm demo` is a guided tour instead; `kmm COMMAND --help` describes each command."
    )
    p = _Parser(
        prog="kmm",
        description=f"kmm: a fast, faithful model of the Linux kernel's memory manager.\n\n{plain}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Machine tunables (kmm.Machine keyword arguments):\n{tunables}\n\n"
        f"Boot parameters (kmm.Machine(cmdline=...), --cmdline, --set NAME=VALUE):\n{boot}\n\n"
        f"Sysctls (kmm.Machine(sysctl={{...}}), m.sysctl(name, value), --set NAME=VALUE):\n{sysctls}\n\n"
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
    st.add_argument("-l", "--line", dest="lines", type=_int(0), default=None, metavar="N", help="show N lines per table")
    _trace_args(st)
    st.set_defaults(func=stat, parser=st)
    rp = sub.add_parser(
        "replay",
        help="replay a trace's allocations and frees on a kmm machine (default, and plain `kmm`: the sample)",
        description="Feed a trace's kmalloc/kfree, kmem_cache_alloc/free, page, percpu and vmap-area events, each on "
        "the CPU it ran on and at its time on the trace's clock, into a kmm machine; report kmm's decisions that "
        "differed from the kernel's (bytes_alloc, zone), kmm's own allocator-internal events against the "
        "kernel's (pcp refills and drains, fallbacks, slab pages, pages allocated and freed), memory and "
        "external fragmentation. Given a recording bundle (kmm record), the machine is shaped like the recorded "
        "one (zones, CPUs, watermarks, caches) and starts from its recorded state (free lists, pcp lists, "
        "slabs); kmm's state is compared with the bundle's samples over time and its end.* files. Given a bare "
        "trace, the machine is sized from it and starts empty. vmap areas (alloc_vmap_area / "
        "free_vmap_area_noflush) are vmalloc'ed and vfree'd; their addresses are not compared.",
    )
    rp.add_argument("file", metavar="FILE|DIR", nargs="?",
                    help=f"a recording bundle directory (kmm record), a perf.data, or `perf script` / trace_pipe text "
                    f"(default: {what}, {path.name})")
    _machine_args(rp, memory=None, cpus=None)
    rp.add_argument("--cold", action="store_true",
                    help="start from a freshly booted machine instead of the bundle's recorded start state")
    rp.add_argument("--time", action=argparse.BooleanOptionalAction, default=True,
                    help="run the kernel's timer work (vmstat_update's decay of pcp->high) on the trace's clock (default on)")
    rp.add_argument("--sample-every", type=_int(0), default=1000, metavar="N",
                    help="events between fragmentation samples; 0: none (default 1000)")
    rp.add_argument("--plot", metavar="OUT.png", help="draw free pages per order over time and the physical memory map by owner (needs matplotlib: the 'plot' extra)")
    rp.add_argument("--slabinfo", action="store_true", help="print /proc/slabinfo at the end too")
    rp.add_argument("--free-at-end", action="store_true", help="free everything the replay allocated at the end")
    rp.add_argument("--compare", nargs=2, metavar=("SETTINGS_A", "SETTINGS_B"),
                    help="replay twice, under settings A and under settings B (each \"NAME=VALUE ...\" as --set; \"\" "
                    "is the default machine; --set and --cmdline apply to both), and print the two side by side in "
                    "mmtests' compare style: memory, slab space and loss per cache, THP-sized allocation success, "
                    "fallbacks, mixed pageblocks, fragmentation, pcp refills, drains and high, zone-lock acquisitions")
    _trace_args(rp)
    rp.set_defaults(func=replay)
    sw = sub.add_parser(
        "sweep",
        help="replay recordings under a grid of settings and seeds, in parallel or on a Dask cluster",
        description="Replay every recording under every --set (one settings string each, in --set's syntax; "
        "an empty string is the default machine) with seeds 0..K-1: each combination an independent replay "
        "measured as `kmm replay --compare` measures it. Runs go to -j worker processes, or to a Dask cluster "
        "with --cluster (the 'cluster' extra). Each finished run is a row of the CSV at once; a rerun with the "
        "same output skips the runs already done and retries failed ones. A summary table per settings at the "
        "end. Exit 1 if any run failed.",
    )
    sw.add_argument("recordings", metavar="REC", nargs="*",
                    help=f"recording bundles or traces (default: {path.name}, the recording shipped with kmm)")
    sw.add_argument("--set", dest="grid_settings", action="append", metavar="\"NAME=VALUE ...\"",
                    help="one point of the grid (repeat it); default: the default machine only")
    sw.add_argument("--grid", metavar="GRID.toml",
                    help="a TOML file with recordings = [...], settings = [...], seeds = K (added to the command line's)")
    sw.add_argument("--seeds", type=_int(1), default=None, metavar="K",
                    help="seeds 0..K-1 per combination (default 1, or the grid file's)")
    sw.add_argument("-j", "--jobs", type=_int(1, 1024), default=None, metavar="N",
                    help="worker processes (default: the host's CPUs; 1: in this process)")
    sw.add_argument("-o", "--output", default="kmm-sweep.csv", metavar="OUT.csv",
                    help="the results, one row per run (default kmm-sweep.csv); also OUT.parquet when pyarrow is installed")
    sw.add_argument("--cluster", metavar="tcp://HOST:PORT", help="a Dask scheduler to run on (pip install 'linux-kmm[cluster]')")
    sw.add_argument("--plot", metavar="OUT.png", help="bars per settings for the main figures (needs matplotlib)")
    sw.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress on stderr (default: a bar on a terminal)")
    _machine_args(sw, memory=None, cpus=None, settings=False)
    sw.add_argument("--cold", action="store_true", help="start each replay from a freshly booted machine")
    sw.add_argument("--time", action=argparse.BooleanOptionalAction, default=True,
                    help="run the kernel's timer work on the trace's clock (default on)")
    sw.add_argument("--sample-every", type=_int(0), default=1000, metavar="N",
                    help="events between fragmentation samples; 0: none (default 1000)")
    sw.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                    help="the order-9 (THP) probe after each replay (default on)")
    sw.set_defaults(func=sweep)
    rc = sub.add_parser(
        "record",
        help="record a bundle of this Linux machine: a perf trace with /proc snapshots and samples",
        description="Write a recording bundle (kmm.trace.load(DIR) reads it): start.* and end.* copies of "
        "/proc/{buddyinfo,pagetypeinfo,zoneinfo,slabinfo,meminfo,vmstat}, perf.data of `perf record -k "
        "CLOCK_MONOTONIC -e 'kmem:*,percpu:*,vmalloc:*' -a` running COMMAND (or sleep DURATION), "
        "samples.txt (buddyinfo, pagetypeinfo and vmstat every INTERVAL) and kallsyms.txt. Needs perf and "
        "root (or kernel.perf_event_paranoid=-1). KMM_PROC_ROOT, KMM_PERF and KMM_TRACEFS override /proc, "
        "the perf binary and the tracefs mount.",
    )
    rc.add_argument("-o", "--output", metavar="DIR",
                    help="the bundle directory, new or empty (default: kmm-recording-DATE-TIME)")
    rc.add_argument("--duration", type=_positive_float, default=10.0, metavar="S",
                    help="seconds to record when no COMMAND is given (default 10)")
    rc.add_argument("--interval", type=_positive_float, default=0.1, metavar="S",
                    help="seconds between samples (default 0.1)")
    rc.add_argument("command", nargs="*", metavar="-- COMMAND", help="the workload to run under perf (default: sleep DURATION)")
    rc.set_defaults(func=record)
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
    if hasattr(a, "settings"):
        # Settings are checked before anything runs: a bad one is bad usage.
        from kmm import settings as _s

        try:
            cmdline, sysctl = _settings(a)
            kmm._kmm.check_settings(cmdline, sysctl)
            for extra in getattr(a, "compare", None) or ():
                boot, more = _s.split(extra)
                kmm._kmm.check_settings(" ".join(x for x in (cmdline, boot) if x), {**sysctl, **more})
        except ValueError as e:
            parser.exit(EXIT_USAGE, f"kmm: error: {e}\n")
    try:
        return a.func(a)
    except BrokenPipeError:  # `kmm | head`: the reader left; not an error (before OSError, its base)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("kmm: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"kmm: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OverflowError, TypeError, MemoryError, kmm.KmmError) as e:
        print(f"kmm: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # never a traceback from the command line
        print(f"kmm: internal error: {type(e).__name__}: {_one_line(e)} (please report it)", file=sys.stderr)
        return EXIT_ERROR


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (kernel reports span several)."""
    return " / ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
