"""kmm: a fast, faithful model of the Linux kernel's memory manager.

Zones, the buddy page allocator, GFP flags and watermarks run in a Rust core
with real bytes behind every page; the kernel's /proc views and tracepoints
show what happened.

>>> import kmm
>>> m = kmm.Machine(arch="x86_64", memory="1G", cpus=2)
>>> page = m.alloc_pages(kmm.GFP_KERNEL, 2)
>>> m.free_pages(page, 2)

Module-level functions (``kmm.alloc_pages`` ...) act on :func:`default_machine`.
"""

from __future__ import annotations

import threading as _threading
from typing import TYPE_CHECKING, Any, Callable, Final

from kmm import errors, gfp, snapshots
from kmm.snapshots import Snapshot, Statistic, StatisticDiff
from kmm._kmm import (
    ERROR_CODES,
    KMALLOC_MAX_CACHE_SIZE,
    KM_MAX_IDX,
    PAGE_OWNER_NAMES,
    KMALLOC_MAX_SIZE,
    SLAB_FLAGS,
    STACK_END_MAGIC,
    ZERO_SIZE_PTR,
    Block,
    KmemCache,
    MAX_PAGE_ORDER,
    MIGRATETYPE_NAMES,
    TRACEPOINTS,
    TUNABLES,
    BOOT_PARAMS,
    SYSCTLS,
    Event,
    FaultAttr,
    Machine,
    Page,
    Proc,
    Recording,
    ThreadStack,
    Trace,
    TraceHandle,
    Zone,
    parse_size,
)
from kmm.errors import *  # noqa: F401,F403  (re-exports errors.__all__ for type checkers)
from kmm.errors import (
    BadGfpError,
    DoubleFreeError,
    InvalidFreeError,
    KasanDoubleFreeError,
    KasanError,
    KasanIndexError,
    KasanInvalidFreeError,
    KasanUseAfterFreeError,
    KmmError,
    MemoryCorruptionError,
    OutOfMemoryError,
    PageFaultError,
    SleepInAtomicError,
    TraceFormatError,
    UseAfterFreeError,
)
from kmm.gfp import *  # noqa: F401,F403  (GFP_KERNEL, __GFP_ZERO, ...)
from kmm import trace  # noqa: E402  (the trace-file module; m.trace is a machine's tracepoints)
from kmm import settings, compare, sweep  # noqa: E402  (what-if studies: kmm.compare.compare, kmm.sweep.sweep)

# ---- SLAB_* cache flags (include/linux/slab.h, 6.18 ``enum _slab_flag_bits`` on
# x86_64 with SLUB_DEBUG, MEMCG and FAILSLAB; KASAN and KFENCE off). Declared
# for type checkers and IDEs; ``SLAB_FLAGS`` is the core's table (a test keeps
# the two equal).
#: DEBUG: perform (expensive) consistency checks (slub_debug F).
SLAB_CONSISTENCY_CHECKS: Final[int] = 0x1
#: DEBUG: red zones around each object (slub_debug Z).
SLAB_RED_ZONE: Final[int] = 0x2
#: DEBUG: poison free objects (slub_debug P).
SLAB_POISON: Final[int] = 0x4
#: A kmalloc cache.
SLAB_KMALLOC: Final[int] = 0x8
#: Align objects on cache lines.
SLAB_HWCACHE_ALIGN: Final[int] = 0x10
#: Slab pages from ZONE_DMA.
SLAB_CACHE_DMA: Final[int] = 0x20
#: Slab pages from ZONE_DMA32.
SLAB_CACHE_DMA32: Final[int] = 0x40
#: DEBUG: store the last owner (slub_debug U).
SLAB_STORE_USER: Final[int] = 0x80
#: Panic if kmem_cache_create() fails.
SLAB_PANIC: Final[int] = 0x100
#: Defer freeing slabs to RCU (objects may be reused, never returned, within a grace period).
SLAB_TYPESAFE_BY_RCU: Final[int] = 0x200
#: DEBUG: trace allocations and frees (slub_debug T).
SLAB_TRACE: Final[int] = 0x400
#: Avoid kmemleak tracing.
SLAB_NOLEAKTRACE: Final[int] = 0x1000
#: Never merge this cache with another.
SLAB_NO_MERGE: Final[int] = 0x2000
#: Fault injection: failslab's cache-filter fails only caches with this flag (slub_debug A).
SLAB_FAILSLAB: Final[int] = 0x4000
#: Account to the memory cgroup (the kmalloc-cg-* caches).
SLAB_ACCOUNT: Final[int] = 0x8000
#: Ignore user-specified debugging flags (slub_debug=) for this cache.
SLAB_NO_USER_FLAGS: Final[int] = 0x10000
#: Objects are reclaimable (counted as SReclaimable).
SLAB_RECLAIM_ACCOUNT: Final[int] = 0x20000
#: Slab pages without object extensions.
SLAB_NO_OBJ_EXT: Final[int] = 0x100000

__version__ = "0.1.0"

_default: Machine | None = None
_default_lock = _threading.Lock()


def default_machine() -> Machine:
    """The machine module-level functions act on: x86_64, 1 GiB, 2 CPUs, made on first use."""
    global _default
    m = _default
    if m is None:
        with _default_lock:
            if _default is None:
                _default = Machine()
            m = _default
    return m


def set_default_machine(machine: Machine) -> Machine:
    """Make ``machine`` the one module-level functions act on; returns it."""
    global _default
    if not isinstance(machine, Machine):
        raise TypeError(f"expected a Machine, not {type(machine).__name__}")
    with _default_lock:
        _default = machine
    return machine


_FORWARDED = (
    "alloc_pages",
    "alloc_page",
    "__get_free_pages",
    "get_free_pages",
    "__get_free_page",
    "get_free_page",
    "get_zeroed_page",
    "__free_pages",
    "free_pages",
    "free_page",
    "__free_page",
    "page_address",
    "virt_to_page",
    "virt_to_phys",
    "phys_to_virt",
    "pfn_to_page",
    "page_to_pfn",
    "read",
    "write",
    "gfp_zone",
    "zonelist",
    "nr_free_pages",
    "totalram_pages",
    "kmalloc",
    "kzalloc",
    "kcalloc",
    "kmalloc_array",
    "krealloc",
    "kfree",
    "ksize",
    "kmalloc_size_roundup",
    "kmem_cache_create",
    "kmem_cache_alloc",
    "kmem_cache_free",
    "kmem_cache_alloc_bulk",
    "kmem_cache_free_bulk",
    "kmem_cache_shrink",
    "kmem_cache_destroy",
    "kmem_cache",
    "sysfs_slab",
    "block",
    "on_cpu",
    "smp_processor_id",
    "get_cpu",
    "put_cpu",
    "preempt_disable",
    "preempt_enable",
    "preempt_disabled",
    "atomic",
    "irq",
    "in_atomic",
    "in_interrupt",
    "irqs_disabled",
    "preempt_count",
    "drain_all_pages",
    "drain_local_pages",
    "nr_pcp_pages",
    "alloc_percpu",
    "free_percpu",
    "per_cpu_ptr",
    "this_cpu_ptr",
    "define_per_cpu",
    "per_cpu",
    "get_cpu_var",
    "translate",
    "access",
    "tlb_stats",
    "flush_tlb_all",
    "flush_tlb_kernel_range",
    "vmalloc",
    "vzalloc",
    "vfree",
    "vmap",
    "vunmap",
    "kvmalloc",
    "kvzalloc",
    "kvfree",
    "vmalloc_to_page",
    "vmalloc_to_pfn",
    "is_vmalloc_addr",
    "vmalloc_nr_pages",
    "vm_unmap_aliases",
    "kmap",
    "kunmap",
    "kmap_atomic",
    "kunmap_atomic",
    "kmap_local_page",
    "kunmap_local",
    "kmap_flush_unused",
    "alloc_thread_stack",
    "free_thread_stack",
    "irq_stack",
    "snapshot",
)


def _forward(name: str) -> Callable[..., Any]:
    method = getattr(Machine, name)

    def f(*args: Any, **kwargs: Any) -> Any:
        return getattr(default_machine(), name)(*args, **kwargs)

    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"{method.__doc__ or ''}\n\nActs on kmm.default_machine()."
    return f


if TYPE_CHECKING:
    # What type checkers and IDEs see: each function has the signature of the
    # Machine method it forwards to (a test keeps this list and _FORWARDED equal).
    _dm: Machine
    alloc_pages = _dm.alloc_pages
    alloc_page = _dm.alloc_page
    __get_free_pages = _dm.__get_free_pages
    get_free_pages = _dm.get_free_pages
    __get_free_page = _dm.__get_free_page
    get_free_page = _dm.get_free_page
    get_zeroed_page = _dm.get_zeroed_page
    __free_pages = _dm.__free_pages
    free_pages = _dm.free_pages
    free_page = _dm.free_page
    __free_page = _dm.__free_page
    page_address = _dm.page_address
    virt_to_page = _dm.virt_to_page
    virt_to_phys = _dm.virt_to_phys
    phys_to_virt = _dm.phys_to_virt
    pfn_to_page = _dm.pfn_to_page
    page_to_pfn = _dm.page_to_pfn
    read = _dm.read
    write = _dm.write
    gfp_zone = _dm.gfp_zone
    zonelist = _dm.zonelist
    nr_free_pages = _dm.nr_free_pages
    totalram_pages = _dm.totalram_pages
    kmalloc = _dm.kmalloc
    kzalloc = _dm.kzalloc
    kcalloc = _dm.kcalloc
    kmalloc_array = _dm.kmalloc_array
    krealloc = _dm.krealloc
    kfree = _dm.kfree
    ksize = _dm.ksize
    kmalloc_size_roundup = _dm.kmalloc_size_roundup
    kmem_cache_create = _dm.kmem_cache_create
    kmem_cache_alloc = _dm.kmem_cache_alloc
    kmem_cache_free = _dm.kmem_cache_free
    kmem_cache_alloc_bulk = _dm.kmem_cache_alloc_bulk
    kmem_cache_free_bulk = _dm.kmem_cache_free_bulk
    kmem_cache_shrink = _dm.kmem_cache_shrink
    kmem_cache_destroy = _dm.kmem_cache_destroy
    kmem_cache = _dm.kmem_cache
    sysfs_slab = _dm.sysfs_slab
    block = _dm.block
    on_cpu = _dm.on_cpu
    smp_processor_id = _dm.smp_processor_id
    get_cpu = _dm.get_cpu
    put_cpu = _dm.put_cpu
    preempt_disable = _dm.preempt_disable
    preempt_enable = _dm.preempt_enable
    preempt_disabled = _dm.preempt_disabled
    atomic = _dm.atomic
    irq = _dm.irq
    in_atomic = _dm.in_atomic
    in_interrupt = _dm.in_interrupt
    irqs_disabled = _dm.irqs_disabled
    preempt_count = _dm.preempt_count
    drain_all_pages = _dm.drain_all_pages
    drain_local_pages = _dm.drain_local_pages
    nr_pcp_pages = _dm.nr_pcp_pages
    alloc_percpu = _dm.alloc_percpu
    free_percpu = _dm.free_percpu
    per_cpu_ptr = _dm.per_cpu_ptr
    this_cpu_ptr = _dm.this_cpu_ptr
    define_per_cpu = _dm.define_per_cpu
    per_cpu = _dm.per_cpu
    get_cpu_var = _dm.get_cpu_var
    translate = _dm.translate
    access = _dm.access
    tlb_stats = _dm.tlb_stats
    flush_tlb_all = _dm.flush_tlb_all
    flush_tlb_kernel_range = _dm.flush_tlb_kernel_range
    vmalloc = _dm.vmalloc
    vzalloc = _dm.vzalloc
    vfree = _dm.vfree
    vmap = _dm.vmap
    vunmap = _dm.vunmap
    kvmalloc = _dm.kvmalloc
    kvzalloc = _dm.kvzalloc
    kvfree = _dm.kvfree
    vmalloc_to_page = _dm.vmalloc_to_page
    vmalloc_to_pfn = _dm.vmalloc_to_pfn
    is_vmalloc_addr = _dm.is_vmalloc_addr
    vmalloc_nr_pages = _dm.vmalloc_nr_pages
    vm_unmap_aliases = _dm.vm_unmap_aliases
    kmap = _dm.kmap
    kunmap = _dm.kunmap
    kmap_atomic = _dm.kmap_atomic
    kunmap_atomic = _dm.kunmap_atomic
    kmap_local_page = _dm.kmap_local_page
    kunmap_local = _dm.kunmap_local
    kmap_flush_unused = _dm.kmap_flush_unused
    alloc_thread_stack = _dm.alloc_thread_stack
    free_thread_stack = _dm.free_thread_stack
    irq_stack = _dm.irq_stack
    snapshot = _dm.snapshot
else:
    for _name in _FORWARDED:
        globals()[_name] = _forward(_name)
    del _name

__all__ = [
    "Machine",
    "Block",
    "KmemCache",
    "Page",
    "Zone",
    "Event",
    "FaultAttr",
    "Proc",
    "Trace",
    "TraceHandle",
    "Recording",
    "ThreadStack",
    "default_machine",
    "set_default_machine",
    "parse_size",
    "errors",
    "gfp",
    "snapshots",
    "Snapshot",
    "Statistic",
    "StatisticDiff",
    "trace",
    *errors.__all__,
    "MAX_PAGE_ORDER",
    "MIGRATETYPE_NAMES",
    "TRACEPOINTS",
    "TUNABLES",
    "BOOT_PARAMS",
    "SYSCTLS",
    "ERROR_CODES",
    "ZERO_SIZE_PTR",
    "KMALLOC_MAX_CACHE_SIZE",
    "KMALLOC_MAX_SIZE",
    "STACK_END_MAGIC",
    "KM_MAX_IDX",
    "PAGE_OWNER_NAMES",
    *(name for name, _ in SLAB_FLAGS),
    *_FORWARDED,
    *gfp.__all__[4:],
]
