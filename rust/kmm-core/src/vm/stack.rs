//! Kernel stacks: THREAD_SIZE per task, vmapped with a guard page
//! (CONFIG_VMAP_STACK) or taken from the page allocator, and per-CPU IRQ
//! stacks.
//!
//! # Kernel
//! `kernel/fork.c` (`alloc_thread_stack_node`: `__vmalloc_node_range(THREAD_SIZE,
//! THREAD_ALIGN, VMALLOC_START, VMALLOC_END, THREADINFO_GFP, ...)` with
//! VMAP_STACK, else `alloc_pages_node(THREADINFO_GFP, THREAD_SIZE_ORDER)`;
//! `set_task_stack_end_magic`), `include/linux/sched/task_stack.h`
//! (`end_of_stack`, `task_stack_end_corrupted`), `include/uapi/linux/magic.h`
//! (STACK_END_MAGIC 0x57AC6E9D), `arch/x86/include/asm/page_64_types.h`
//! (THREAD_SIZE_ORDER 2: 16 KiB; IRQ_STACK_ORDER 2), `page_32_types.h`
//! (THREAD_SIZE_ORDER 1: 8 KiB), `arch/x86/kernel/irq_64.c`
//! (`map_irq_stack`: the IRQ stack's pages vmap()ed with a guard),
//! `arch/x86/kernel/traps.c` (`handle_stack_overflow`), `kernel/sched/core.c`
//! (`schedule_debug`: "corrupted stack end detected inside scheduler").
//!
//! ```text
//!   low address                                   high address
//!   | STACK_END_MAGIC | ........ stack grows down <- sp | top
//!   ^ base (end_of_stack)                               ^ base + THREAD_SIZE
//!   vmapped: the page below base is unmapped (a guard) -> overflow faults
//!   not vmapped: below base is the previous physical page -> silently corrupted
//! ```
//!
//! SIMPLIFICATION: no per-CPU cache of freed vmapped stacks (the kernel
//! keeps NR_CACHED_STACKS = 2 per CPU); IRQ stacks are made on first use
//! rather than at boot (so that boot leaves the buddy allocator untouched),
//! with allocations that do not sleep (GFP_NOWAIT), so that the first use
//! may be in interrupt context.
//! CONFIG_VMAP_STACK exists on x86_64 only, as in the kernel's Kconfig.
//!
//! # Invariants
//! - stack-1: a live stack is THREAD_SIZE bytes at a THREAD_ALIGN-aligned base.
//!
//! Lock order: `irq` (the IRQ stack table) is held only to read or install
//! an entry, never while a stack is being made (see `irq_stack`).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::arch::Arch;
use crate::error::{KmmError, Result};
use crate::gfp;
use crate::machine::{Machine, VirtAddr};
use crate::page::Pfn;
use crate::trace::CallSite;

use super::vmalloc::VmArea;

/// `STACK_END_MAGIC`.
pub const STACK_END_MAGIC: u32 = 0x57AC_6E9D;

/// Where a stack's memory comes from.
#[derive(Clone, Debug)]
pub enum Backing {
    /// A vmalloc area (VMAP_STACK).
    Vmap(Arc<VmArea>),
    /// 2^order pages from the page allocator, in the direct map.
    Pages(Pfn, u32),
}

/// A kernel stack.
#[derive(Clone, Debug)]
pub struct KStack {
    /// Lowest address (`task_stack_page`, where the end magic lives).
    pub base: u64,
    pub size: u64,
    pub backing: Backing,
    /// An IRQ stack (owned by its CPU, never freed).
    pub irq_cpu: Option<u32>,
    /// Set by `free_thread_stack` (shared by the handle's clones).
    pub freed: Arc<AtomicBool>,
}

impl KStack {
    pub fn top(&self) -> u64 {
        self.base + self.size
    }

    pub fn vmapped(&self) -> bool {
        matches!(self.backing, Backing::Vmap(_))
    }
}

/// Per-CPU IRQ stacks, made on first use.
pub struct Stacks {
    irq: Mutex<Vec<Option<KStack>>>,
    /// `NR_KERNEL_STACK_KB` (meminfo KernelStack): task stacks, in kB.
    pub kernel_stack_kb: AtomicU64,
}

impl Stacks {
    pub fn new(cpus: u32) -> Stacks {
        Stacks { irq: Mutex::new(vec![None; cpus as usize]), kernel_stack_kb: AtomicU64::new(0) }
    }
}

impl Machine {
    /// `THREAD_SIZE`: 16 KiB on x86_64, 8 KiB on i386 (at least a page).
    pub fn thread_size(&self) -> u64 {
        let t: u64 = if self.cfg.arch == Arch::X86_64 { 16 << 10 } else { 8 << 10 };
        t.max(self.page_size)
    }

    fn thread_size_order(&self) -> u32 {
        (self.thread_size() / self.page_size).trailing_zeros()
    }

    /// `alloc_thread_stack_node` + `set_task_stack_end_magic`. `vmap`:
    /// CONFIG_VMAP_STACK (x86_64 only).
    pub fn alloc_thread_stack(&self, vmap: bool, caller: &CallSite) -> Result<KStack> {
        self.refused_changes_nothing(|| self.alloc_thread_stack_(vmap, caller))
    }

    fn alloc_thread_stack_(&self, vmap: bool, caller: &CallSite) -> Result<KStack> {
        let size = self.thread_size();
        let threadinfo_gfp = gfp::GFP_KERNEL_ACCOUNT | gfp::__GFP_ZERO;
        let st = if vmap {
            if self.cfg.arch != Arch::X86_64 {
                return Err(KmmError::InvalidArgument(format!(
                    "CONFIG_VMAP_STACK is not available on {} (HAVE_ARCH_VMAP_STACK is x86_64-only): use vmap=False",
                    self.cfg.arch.name()
                )));
            }
            // THREAD_ALIGN = THREAD_SIZE with VMAP_STACK.
            let a = self.vmalloc_node_range(size, size, threadinfo_gfp, 0, caller)?;
            KStack { base: a.addr, size, backing: Backing::Vmap(a), irq_cpu: None, freed: Arc::default() }
        } else {
            let order = self.thread_size_order();
            let pfn = self.alloc_pages(threadinfo_gfp, order)?;
            let base = self.page_address(pfn).expect("THREADINFO_GFP has no __GFP_HIGHMEM").0;
            KStack { base, size, backing: Backing::Pages(pfn, order), irq_cpu: None, freed: Arc::default() }
        };
        self.write(VirtAddr(st.base), &STACK_END_MAGIC.to_ne_bytes())?;
        // account_kernel_stack
        self.vm.stacks.kernel_stack_kb.fetch_add(size >> 10, Relaxed);
        Ok(st)
    }

    /// `free_thread_stack`.
    pub fn free_thread_stack(&self, st: &KStack) -> Result<()> {
        if st.irq_cpu.is_some() {
            return Err(KmmError::InvalidFree("an IRQ stack belongs to its CPU and is never freed".into()));
        }
        if st.freed.swap(true, Relaxed) {
            return Err(KmmError::DoubleFree(format!(
                "double free or corruption: the kernel stack at {:#x} was freed already",
                st.base
            )));
        }
        let r = match &st.backing {
            Backing::Vmap(a) => self.vfree(a.addr),
            Backing::Pages(pfn, order) => self.free_pages(*pfn, *order),
        };
        if let Err(e) = r {
            st.freed.store(false, Relaxed);
            return Err(e);
        }
        self.vm.stacks.kernel_stack_kb.fetch_sub(st.size >> 10, Relaxed);
        Ok(())
    }

    /// A freed stack's handle reaches memory that is someone else's now.
    fn stack_live(&self, st: &KStack) -> Result<()> {
        if st.freed.load(Relaxed) {
            return Err(KmmError::UseAfterFree(format!(
                "BUG: KASAN: use-after-free: the kernel stack at {:#x} was freed (free_thread_stack)",
                st.base
            )));
        }
        Ok(())
    }

    /// `task_stack_end_corrupted`: the end magic was overwritten.
    pub fn stack_end_corrupted(&self, st: &KStack) -> Result<bool> {
        self.stack_live(st)?;
        let b = self.read(VirtAddr(st.base), 4)?;
        Ok(u32::from_ne_bytes(b.try_into().expect("4 bytes")) != STACK_END_MAGIC)
    }

    /// The scheduler's check (`schedule_debug`): a corrupted end magic is
    /// the kernel's panic, reported as MemoryCorruption.
    pub fn check_stack(&self, st: &KStack) -> Result<()> {
        if self.stack_end_corrupted(st)? {
            return Err(KmmError::MemoryCorruption(format!(
                "Kernel panic - not syncing: corrupted stack end detected inside scheduler\n\
                 (STACK_END_MAGIC at {:#x}, the lowest word of the stack {:#x}..{:#x}, was overwritten: the stack overflowed)",
                st.base,
                st.base,
                st.top()
            )));
        }
        Ok(())
    }

    /// Use `depth` bytes of the stack, as nested calls would: write a frame
    /// pattern from the top down to `top - depth`. Past the base, a vmapped
    /// stack hits its guard page (a fault; nothing is written), a stack from
    /// the page allocator silently overwrites its end magic and the memory
    /// below it.
    pub fn stack_use(&self, st: &KStack, depth: u64) -> Result<()> {
        self.stack_live(st)?;
        if depth == 0 {
            return Ok(());
        }
        let low = st.top().checked_sub(depth);
        // Translate the whole range first (a fault writes nothing), then
        // write the pattern a chunk at a time.
        let checked = match low {
            // Stack pushes are not KASAN-checked: an overflow meets the guard page.
            Some(low) => self.access_nocheck(VirtAddr(low), depth as usize, true).map(|_| low),
            None => Err(self.fault(0, true, "")),
        };
        let r = checked.and_then(|low| {
            const CHUNK: u64 = 64 << 10;
            let pattern: Vec<u8> = (0..CHUNK.min(depth)).map(|i| 0xa0 | (i % 16) as u8).collect();
            let mut at = low;
            while at < st.top() {
                let k = (st.top() - at).min(CHUNK);
                self.write_nocheck(VirtAddr(at), &pattern[..k as usize])?;
                at += k;
            }
            Ok(())
        });
        match r {
            Err(KmmError::PageFault(_)) if st.vmapped() && low.is_none_or(|l| l < st.base) => Err(KmmError::PageFault(format!(
                "BUG: stack guard page was hit at {:#x} (stack is {:#x}..{:#x})\n\
                 kernel stack overflow (double-fault): 0000 [#1] SMP\n\
                 (a stack use of {depth} bytes overflows the {}-byte stack)",
                st.base - 8,
                st.base,
                st.top() - 1,
                st.size
            ))),
            r => r,
        }
    }

    /// This CPU's IRQ stack (`irq_init_percpu_irqstack`): on x86_64 its
    /// pages are vmap()ed with a guard page ("vmap" in vmallocinfo); on
    /// i386 it is THREAD_SIZE from the page allocator.
    pub fn irq_stack(&self, cpu: u32) -> Result<KStack> {
        if cpu >= self.cfg.cpus {
            return Err(KmmError::InvalidArgument(format!("cpu {cpu} does not exist")));
        }
        if let Some(s) = &self.vm.stacks.irq.lock()[cpu as usize] {
            return Ok(s.clone());
        }
        // Made with no lock held (the allocations may wait for a CPU, and
        // their trace events may call back into the machine); installed
        // below unless another thread made this CPU's first.
        let _defer = self.trace.defer();
        let size = self.thread_size();
        let order = self.thread_size_order();
        // CPU bring-up work: it must not sleep, since the first use may be
        // in interrupt context (the kernel made it before the CPU ran).
        let bringup = gfp::GFP_NOWAIT | gfp::__GFP_ZERO;
        let pfn = self.alloc_pages(bringup, order)?;
        let st = if self.cfg.arch == Arch::X86_64 {
            let pages: Vec<Pfn> = (0..1u64 << order).map(|i| Pfn(pfn.0 + i)).collect();
            match self.vmap_gfp(&pages, &std::sync::Arc::from("irq_init_percpu_irqstack+0xca/0x100"), bringup) {
                Ok(a) => KStack { base: a.addr, size, backing: Backing::Vmap(a), irq_cpu: Some(cpu), freed: Arc::default() },
                Err(e) => {
                    let _ = self.free_pages(pfn, order);
                    return Err(e);
                }
            }
        } else {
            let base = self.page_address(pfn).expect("lowmem").0;
            KStack { base, size, backing: Backing::Pages(pfn, order), irq_cpu: Some(cpu), freed: Arc::default() }
        };
        self.write(VirtAddr(st.base), &STACK_END_MAGIC.to_ne_bytes())?;
        let mut t = self.vm.stacks.irq.lock();
        if let Some(s) = &t[cpu as usize] {
            let s = s.clone();
            drop(t);
            self.drop_irq_stack(&st);
            return Ok(s);
        }
        if let Backing::Vmap(a) = &st.backing {
            a.internal.store(super::vmalloc::OWNER_IRQ_STACK, Relaxed);
        }
        t[cpu as usize] = Some(st.clone());
        Ok(st)
    }

    /// Undo an IRQ stack that lost the race to be installed.
    fn drop_irq_stack(&self, st: &KStack) {
        match &st.backing {
            Backing::Vmap(a) => {
                let order = (a.pages.len() as u64).trailing_zeros();
                let _ = self.vfree_internal(a.addr);
                let _ = self.free_pages(a.pages[0], order);
            }
            Backing::Pages(pfn, order) => {
                let _ = self.free_pages(*pfn, *order);
            }
        }
    }
}
