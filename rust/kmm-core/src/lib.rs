//! # kmm-core: a user-space model of the Linux kernel's memory manager
//!
//! kmm models the kernel's page allocator (zones, watermarks, the buddy
//! system, migratetypes), with real bytes behind every page, the kernel's
//! tracepoints and its /proc views. The Python package `kmm` drives it
//! through the `kmm-py` binding; this crate has no Python in it.
//!
//! ## Glossary
//! - **pfn**: page frame number, physical address >> PAGE_SHIFT ([`page::Pfn`]).
//! - **order**: a block of 2^order contiguous pages; orders 0..=MAX_PAGE_ORDER (10).
//! - **zone**: a physical range with its own free lists and watermarks (DMA,
//!   DMA32, Normal, HighMem, Movable, Device).
//! - **pageblock**: 2^pageblock_order pages sharing one migratetype.
//! - **migratetype**: Unmovable, Movable, Reclaimable, HighAtomic, Isolate.
//! - **gfp mask**: how an allocation may behave and where it may come from.
//! - **direct map**: the kernel's linear mapping of low memory at PAGE_OFFSET.
//!
//! ## Module graph (lower modules never import higher ones)
//! ```text
//!   error, arch, gfp, page, physmem      (no dependencies inside the crate)
//!   cmdline      <- slab::geometry                       (boot parameters)
//!   mem_init     <- machine, slab                        (init_on_alloc, init_on_free)
//!   fault_inject <- cmdline, gfp                         (failslab, fail_page_alloc; its
//!                   hooks run in page_alloc's and slab's request paths)
//!   trace        <- gfp
//!   buddy        <- page, arch
//!   zone         <- buddy, arch
//!   machine      <- physmem, page, zone, buddy, trace, arch
//!   clock        (simulated time; its work lives in page_alloc)
//!   page_alloc   <- machine, buddy, gfp, trace, clock   (the page-allocator API, timer work)
//!   proc         <- machine, page_alloc                  (/proc renderers)
//!   sysctl       <- machine, zone                        (vm.* sysctls and their handlers)
//!   pins         <- machine, shadow, page                (exports and mappings that keep memory from being freed)
//!   vm           <- machine, page_alloc, slab, kmalloc   (page tables, TLB,
//!                   vmalloc, kmap, stacks; Machine::read/write go through it)
//!   kasan        <- machine, slab, vm                    (kasan=on: shadow, checks,
//!                   reports, quarantine; hooked from page_alloc, slab, kmalloc, vm)
//!   trace::{perf_script, stat} <- gfp                     (trace import, perf kmem stat)
//!   trace::{perf_data, tp_format, kallsyms} <- perf_script (perf.data input: formats from the file, call sites)
//!   trace::{procfs, bundle} <- perf_script                (a recording's /proc files)
//!   trace::shape  <- machine, slab, warm, bundle          (a machine shaped and warmed for a trace)
//!   warm         <- machine, buddy, pcp, slab            (warm start: a recorded state)
//!   trace::replay <- machine, slab, kmalloc, percpu, page_alloc, warm (drives the machine's public API)
//!   printk, stackdepot <- machine, trace          (kernel log and taint; stacks and current)
//!   slab::cache::debug <- slab, printk, stackdepot     (slub_debug)
//!   kmemleak     <- machine, slab, percpu, vm, printk, stackdepot (leak scans)
//! ```
//! ## How to read it
//! Start with `machine.rs` (boot and address conversions), then
//! `page_alloc.rs` (the request path), then `buddy.rs` (split, merge,
//! fallback). Every module header names the kernel files it follows, its
//! deliberate simplifications, its invariants and its locks.
//!
//! ## Safety
//! `unsafe` lives in `physmem.rs` only; every other module forbids it.

pub mod arch;
pub mod buddy;
pub mod clock;
pub mod cmdline;
pub mod cpu;
pub mod error;
pub mod fault_inject;
pub mod gfp;
pub mod kasan;
pub mod kmalloc;
pub mod kmemleak;
pub mod machine;
pub mod mem_init;
pub mod page;
pub mod page_alloc;
pub mod pcp;
pub mod percpu;
pub mod physmem;
pub mod pins;
pub mod printk;
pub mod slab;
pub mod stackdepot;
pub mod sysctl;
pub mod sync;
pub mod proc;
pub mod shadow;
pub mod trace;
pub mod vm;
pub mod warm;
pub mod zone;

pub use arch::Arch;
pub use error::{KmmError, Result};
pub use machine::{Machine, MachineConfig, PhysAddr, VirtAddr};
pub use page::Pfn;

/// `pcp_allowed_order`: orders kept on per-CPU lists (0..=COSTLY, plus the
/// THP order = pageblock_order with CONFIG_TRANSPARENT_HUGEPAGE).
#[inline]
pub fn pcp_allowed_order(order: u32, pageblock_order: u32) -> bool {
    order <= arch::PAGE_ALLOC_COSTLY_ORDER || order == pageblock_order
}
