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
from kmm.errors import (
    BadGfpError,
    DoubleFreeError,
    InvalidFreeError,
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

#: SLAB_* cache flags with the kernel's values (include/linux/slab.h, 6.18).
globals().update(dict(SLAB_FLAGS))

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


def _forward(name: str):
    method = getattr(Machine, name)

    def f(*args, **kwargs):
        return getattr(default_machine(), name)(*args, **kwargs)

    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"{method.__doc__ or ''}\n\nActs on kmm.default_machine()."
    return f


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
