//! Virtual memory for Python: the MMU model (translate, access, TLB stats),
//! vmalloc/vmap/kvmalloc, kmap and kmap_local, kernel stacks.

use std::sync::Arc;

use kmm_core::vm::stack::{Backing, KStack};
use kmm_core::{KmmError, Machine, Pfn, VirtAddr};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt};

use crate::errors::warn_alloc;
use crate::machine::{PyMachine, PyProc};
use crate::objects::PyPage;
use crate::slab::{caller, PyBlock};
use crate::to_py_err;

fn oom(py: Python<'_>, e: KmmError) -> PyErr {
    warn_alloc(py, &e);
    to_py_err(e)
}

impl PyMachine {
    fn page_arg(&self, page: &Bound<'_, PyAny>) -> PyResult<Pfn> {
        if let Ok(p) = page.cast::<PyPage>() {
            let p = p.get();
            if !Arc::ptr_eq(&p.m, &self.m) {
                return Err(PyValueError::new_err("that Page belongs to another Machine"));
            }
            return Ok(Pfn(p.pfn));
        }
        Err(PyTypeError::new_err(format!("expected a Page, not {}", page.get_type().name()?)))
    }

    /// An address from a Block, an int, or None (0).
    fn addr_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<(u64, Option<Py<PyBlock>>)> {
        let Some(obj) = obj else { return Ok((0, None)) };
        if let Ok(b) = obj.cast::<PyBlock>() {
            return Ok((b.get().addr, Some(b.clone().unbind())));
        }
        if obj.is_instance_of::<PyInt>() {
            return Ok((crate::args::nat(obj, "vfree", "addr")?, None));
        }
        Err(PyTypeError::new_err(format!("expected a Block, an address or None, not {}", obj.get_type().name()?)))
    }

    fn vfree_with(&self, obj: Option<&Bound<'_, PyAny>>, f: impl Fn(&Machine, u64) -> kmm_core::Result<()>) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let (addr, blk) = Self::addr_arg(obj)?;
        match blk {
            Some(b) => b.get().owned_by(&self.m)?.free_with(|a| f(&self.m, a)),
            None => f(&self.m, addr).map_err(to_py_err),
        }
    }
}

#[pymethods]
impl PyMachine {
    // ---- the MMU model -----------------------------------------------------------

    /// Walk the kernel page tables: (physical address, page size) of `addr`.
    /// PageFaultError when nothing maps it.
    fn translate(&self, addr: i128) -> PyResult<(u64, u64)> {
        let addr = crate::args::u64_arg(addr, "translate", "addr")?;
        let t = self.m.translate(VirtAddr(addr)).map_err(to_py_err)?;
        Ok((t.phys, t.page_size))
    }
    /// Touch `[addr, addr+n)` through this CPU's TLB and the page tables, as
    /// loads (or stores) would, without moving data.
    #[pyo3(signature = (addr, n=1, write=false))]
    fn access(&self, addr: i128, n: i128, write: bool) -> PyResult<()> {
        let addr = crate::args::u64_arg(addr, "access", "addr")?;
        let n = crate::args::usize_arg(n, "access", "n")?;
        self.m.access(VirtAddr(addr), n, write).map_err(to_py_err)
    }
    /// Per-CPU TLB counters: hits (first level), l2_hits (STLB), misses,
    /// walks, walk_reads, flushes (full), flush_pages (INVLPG), shootdowns
    /// (IPIs sent), ipis (received).
    fn tlb_stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.m
            .tlb_stats()
            .into_iter()
            .map(|s| {
                let d = PyDict::new(py);
                d.set_item("hits", s.hits)?;
                d.set_item("l2_hits", s.l2_hits)?;
                d.set_item("misses", s.misses)?;
                d.set_item("walks", s.walks)?;
                d.set_item("walk_reads", s.walk_reads)?;
                d.set_item("flushes", s.flushes)?;
                d.set_item("flush_pages", s.flush_pages)?;
                d.set_item("shootdowns", s.shootdowns)?;
                d.set_item("ipis", s.ipis)?;
                Ok(d)
            })
            .collect()
    }
    /// The TLB geometry: {array: (entries, ways)}.
    #[getter]
    fn tlb_config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.m.vm.tlb_cfg;
        let d = PyDict::new(py);
        for (k, v) in kmm_core::vm::tlb::TlbConfig::NAMES.iter().zip([c.l1_4k, c.l1_2m, c.l1_1g, c.stlb, c.stlb_1g]) {
            d.set_item(k, v)?;
        }
        Ok(d)
    }
    /// `flush_tlb_all()`: a full flush on every CPU (IPIs counted).
    fn flush_tlb_all(&self) {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        self.m.flush_tlb_all()
    }
    /// `flush_tlb_kernel_range(start, end)`.
    fn flush_tlb_kernel_range(&self, start: i128, end: i128) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let f = "flush_tlb_kernel_range";
        let (start, end) = (crate::args::u64_arg(start, f, "start")?, crate::args::u64_arg(end, f, "end")?);
        self.m.flush_tlb_kernel_range(start, end);
        Ok(())
    }

    // ---- vmalloc ------------------------------------------------------------------

    /// `vmalloc(size, gfp)`: virtually contiguous memory from order-0 pages
    /// (highmem allowed), with a guard page after it. May sleep.
    #[pyo3(signature = (size, gfp=kmm_core::gfp::GFP_KERNEL as i128))]
    fn vmalloc(&self, py: Python<'_>, size: i128, gfp: i128) -> PyResult<PyBlock> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let size = crate::args::u64_arg(size, "vmalloc", "size")?;
        let gfp = crate::args::u32_arg(gfp, "vmalloc", "gfp")?;
        let cs = caller(py);
        let m = self.m.clone();
        let a = crate::gil::detach(py, || m.vmalloc(size, gfp, &cs)).map_err(|e| oom(py, e))?;
        Ok(PyBlock::for_area(&self.m, a, size as usize))
    }
    /// `vzalloc(size)`: zeroed vmalloc.
    #[pyo3(signature = (size, gfp=kmm_core::gfp::GFP_KERNEL as i128))]
    fn vzalloc(&self, py: Python<'_>, size: i128, gfp: i128) -> PyResult<PyBlock> {
        let size = crate::args::u64_arg(size, "vzalloc", "size")?;
        let gfp = crate::args::u32_arg(gfp, "vzalloc", "gfp")?;
        self.vmalloc(py, size as i128, (gfp | kmm_core::gfp::__GFP_ZERO) as i128)
    }
    /// `vfree(obj)`: a vmalloc Block, its address, or None (a no-op).
    #[pyo3(signature = (obj))]
    fn vfree(&self, obj: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.vfree_with(obj, |m, a| m.vfree(a))
    }
    /// `vmap(pages)`: map existing pages contiguously (they stay yours).
    fn vmap(&self, py: Python<'_>, pages: Vec<Bound<'_, PyAny>>) -> PyResult<PyBlock> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let pfns: Vec<Pfn> = pages.iter().map(|p| self.page_arg(p)).collect::<PyResult<_>>()?;
        let cs = caller(py);
        let a = self.m.vmap(&pfns, &cs).map_err(to_py_err)?;
        let len = pfns.len() * self.m.page_size as usize;
        Ok(PyBlock::for_area(&self.m, a, len))
    }
    /// `vunmap(obj)`: release a vmap()ed area.
    fn vunmap(&self, obj: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.vfree_with(obj, |m, a| m.vunmap(a))
    }
    /// `kvmalloc(size, gfp)`: kmalloc, falling back to vmalloc.
    #[pyo3(signature = (size, gfp=kmm_core::gfp::GFP_KERNEL as i128))]
    fn kvmalloc(&self, py: Python<'_>, size: i128, gfp: i128) -> PyResult<PyBlock> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let size = crate::args::u64_arg(size, "kvmalloc", "size")?;
        let gfp = crate::args::u32_arg(gfp, "kvmalloc", "gfp")?;
        let cs = caller(py);
        match self.m.kvmalloc(size, gfp, &cs) {
            Ok((_, Some(a))) => Ok(PyBlock::for_area(&self.m, a, size as usize)),
            Ok((va, None)) => Ok(PyBlock::new(&self.m, va.0, size as usize)),
            Err(e) => Err(oom(py, e)),
        }
    }
    /// `kvzalloc(size, gfp)`.
    #[pyo3(signature = (size, gfp=kmm_core::gfp::GFP_KERNEL as i128))]
    fn kvzalloc(&self, py: Python<'_>, size: i128, gfp: i128) -> PyResult<PyBlock> {
        let size = crate::args::u64_arg(size, "kvzalloc", "size")?;
        let gfp = crate::args::u32_arg(gfp, "kvzalloc", "gfp")?;
        self.kvmalloc(py, size as i128, (gfp | kmm_core::gfp::__GFP_ZERO) as i128)
    }
    /// `kvfree(obj)`: vfree or kfree, by address.
    fn kvfree(&self, py: Python<'_>, obj: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let cs = caller(py);
        self.vfree_with(obj, |m, a| m.kvfree(a, &cs))
    }
    /// `vmalloc_to_page(addr)`: the page mapped there, None if none.
    fn vmalloc_to_page(&self, addr: i128) -> PyResult<Option<PyPage>> {
        let addr = crate::args::u64_arg(addr, "vmalloc_to_page", "addr")?;
        Ok(self.m.vmalloc_to_page(addr).map_err(to_py_err)?.map(|p| PyPage::new(&self.m, p)))
    }
    /// `vmalloc_to_pfn(addr)`.
    fn vmalloc_to_pfn(&self, addr: i128) -> PyResult<Option<u64>> {
        let addr = crate::args::u64_arg(addr, "vmalloc_to_pfn", "addr")?;
        Ok(self.m.vmalloc_to_page(addr).map_err(to_py_err)?.map(|p| p.0))
    }
    /// `is_vmalloc_addr(addr)`.
    fn is_vmalloc_addr(&self, addr: i128) -> PyResult<bool> {
        Ok(self.m.is_vmalloc_addr(crate::args::u64_arg(addr, "is_vmalloc_addr", "addr")?))
    }
    /// `vmalloc_nr_pages()`: pages held by vmalloc areas (meminfo VmallocUsed).
    fn vmalloc_nr_pages(&self) -> u64 {
        self.m.vmalloc_nr_pages()
    }
    /// `vm_unmap_aliases()`: purge the lazily freed areas now (one TLB
    /// flush for all). Returns the number of areas purged.
    fn vm_unmap_aliases(&self) -> u32 {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        self.m.purge_vmap_area_lazy()
    }
    /// `vmap_lazy_nr`: pages of freed areas waiting for the lazy purge.
    #[getter]
    fn vmap_lazy_nr(&self) -> u64 {
        self.m.vmap_lazy_nr()
    }
    /// `lazy_max_pages()`: the purge threshold.
    #[getter]
    fn lazy_max_pages(&self) -> u64 {
        self.m.lazy_max_pages()
    }
    /// `VMALLOC_START`.
    #[getter]
    fn vmalloc_start(&self) -> u64 {
        self.m.vm.vmalloc.start
    }
    /// `VMALLOC_END` (not itself a vmalloc address: `is_vmalloc_addr` tests `< VMALLOC_END`).
    #[getter]
    fn vmalloc_end(&self) -> u64 {
        self.m.vm.vmalloc.end
    }

    // ---- highmem ------------------------------------------------------------------

    /// `kmap(page)`: an address for the page; highmem pages take a pkmap
    /// slot, waiting (GIL released) when all are in use. May sleep.
    fn kmap(&self, py: Python<'_>, page: &Bound<'_, PyAny>) -> PyResult<u64> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let pfn = self.page_arg(page)?;
        let m = self.m.clone();
        crate::gil::detach(py, || m.kmap(pfn)).map(|v| v.0).map_err(to_py_err)
    }
    /// `kunmap(page)`.
    fn kunmap(&self, py: Python<'_>, page: &Bound<'_, PyAny>) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let pfn = self.page_arg(page)?;
        let m = self.m.clone();
        crate::gil::detach(py, || m.kunmap(pfn)).map_err(to_py_err)
    }
    /// `kmap_atomic(page)`: disables preemption until kunmap_atomic.
    fn kmap_atomic(&self, py: Python<'_>, page: &Bound<'_, PyAny>) -> PyResult<u64> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let pfn = self.page_arg(page)?;
        let m = self.m.clone();
        crate::gil::detach(py, || m.kmap_atomic(pfn)).map(|v| v.0).map_err(to_py_err)
    }
    /// `kunmap_atomic(addr)`.
    fn kunmap_atomic(&self, addr: i128) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let addr = crate::args::u64_arg(addr, "kunmap_atomic", "addr")?;
        self.m.kunmap_atomic(VirtAddr(addr)).map_err(to_py_err)
    }
    /// `kmap_local_page(page)`: a Block over the mapping, usable as a
    /// context manager that unmaps it on exit. Preemption is disabled while
    /// it is held; mappings nest and must be undone in reverse order.
    fn kmap_local_page(&self, py: Python<'_>, page: &Bound<'_, PyAny>) -> PyResult<PyBlock> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let pfn = self.page_arg(page)?;
        let m = self.m.clone();
        // Released: claiming the CPU may wait for a thread that needs the GIL.
        let va = crate::gil::detach(py, || m.kmap_local_page(pfn)).map_err(to_py_err)?;
        Ok(PyBlock::for_kmap(&self.m, va.0, pfn.0))
    }
    /// `kunmap_local(block_or_addr)`.
    fn kunmap_local(&self, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        if let Ok(b) = obj.cast::<PyBlock>() {
            return b.get().owned_by(&self.m)?.kunmap();
        }
        if !obj.is_instance_of::<PyInt>() {
            return Err(PyTypeError::new_err("kunmap_local: expected a kmap_local Block or an address"));
        }
        let a = crate::args::nat(obj, "kunmap_local", "addr")?;
        self.m.kunmap_local(VirtAddr(a)).map_err(to_py_err)
    }
    /// `kmap_flush_unused()`: clear stale pkmap slots (one TLB flush).
    fn kmap_flush_unused(&self) {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        self.m.kmap_flush_unused()
    }
    /// pkmap occupancy: in_use, stale, flushes, waits.
    fn pkmap_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.m.pkmap_stats();
        let d = PyDict::new(py);
        d.set_item("in_use", s.in_use)?;
        d.set_item("stale", s.stale)?;
        d.set_item("flushes", s.flushes)?;
        d.set_item("waits", s.waits)?;
        Ok(d)
    }
    /// `LAST_PKMAP` (0 without highmem).
    #[getter]
    fn last_pkmap(&self) -> u64 {
        let l = &self.m.vm.highmem.layout;
        if l.highmem {
            l.last_pkmap
        } else {
            0
        }
    }
    /// `PKMAP_BASE` (None without highmem).
    #[getter]
    fn pkmap_base(&self) -> Option<u64> {
        let l = &self.m.vm.highmem.layout;
        l.highmem.then_some(l.pkmap_base)
    }
    /// kmap_local mappings held on `cpu`.
    fn kmap_local_depth(&self, cpu: i128) -> PyResult<usize> {
        let cpu = crate::args::u32_arg(cpu, "kmap_local_depth", "cpu")?;
        if cpu >= self.m.cfg.cpus {
            return Err(PyValueError::new_err(format!("cpu {cpu} does not exist")));
        }
        Ok(self.m.kmap_local_depth(cpu))
    }

    // ---- kernel stacks ------------------------------------------------------------

    /// `THREAD_SIZE`.
    #[getter]
    fn thread_size(&self) -> u64 {
        self.m.thread_size()
    }
    /// `alloc_thread_stack_node`: a THREAD_SIZE stack with STACK_END_MAGIC
    /// at its end. `vmap` (default: True on x86_64, the only arch with
    /// CONFIG_VMAP_STACK) puts it in vmalloc space with a guard page.
    #[pyo3(signature = (vmap=None))]
    fn alloc_thread_stack(&self, py: Python<'_>, vmap: Option<bool>) -> PyResult<PyThreadStack> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let vmap = vmap.unwrap_or(self.m.cfg.arch == kmm_core::Arch::X86_64);
        let st = self.m.alloc_thread_stack(vmap, &Arc::from("kernel_clone+0x94/0x3e0")).map_err(|e| oom(py, e))?;
        Ok(PyThreadStack { m: self.m.clone(), st })
    }
    /// `free_thread_stack`.
    fn free_thread_stack(&self, stack: &Bound<'_, PyThreadStack>) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let s = stack.get();
        if !Arc::ptr_eq(&s.m, &self.m) {
            return Err(PyValueError::new_err("that stack belongs to another Machine"));
        }
        self.m.free_thread_stack(&s.st).map_err(to_py_err)
    }
    /// CPU `cpu`'s IRQ stack (made on first use).
    fn irq_stack(&self, cpu: i128) -> PyResult<PyThreadStack> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let cpu = crate::args::u32_arg(cpu, "irq_stack", "cpu")?;
        let st = self.m.irq_stack(cpu).map_err(to_py_err)?;
        Ok(PyThreadStack { m: self.m.clone(), st })
    }
}

#[pymethods]
impl PyProc {
    /// /proc/vmallocinfo
    fn vmallocinfo(&self) -> String {
        self.m.vmallocinfo()
    }
}

/// A kernel stack: THREAD_SIZE bytes from `base` (where STACK_END_MAGIC
/// lives) up to `top`; it grows down from `top`.
#[pyclass(frozen, name = "ThreadStack", module = "kmm._kmm")]
pub struct PyThreadStack {
    m: Arc<Machine>,
    st: KStack,
}

#[pymethods]
impl PyThreadStack {
    /// Lowest address (`end_of_stack`).
    #[getter]
    fn base(&self) -> u64 {
        self.st.base
    }
    /// One past the highest address (the initial stack pointer).
    #[getter]
    fn top(&self) -> u64 {
        self.st.top()
    }
    /// THREAD_SIZE: bytes of the stack.
    #[getter]
    fn size(&self) -> u64 {
        self.st.size
    }
    /// In vmalloc space with a guard page (CONFIG_VMAP_STACK)?
    #[getter]
    fn vmap(&self) -> bool {
        self.st.vmapped()
    }
    /// The CPU of an IRQ stack, None for a task stack.
    #[getter]
    fn irq_cpu(&self) -> Option<u32> {
        self.st.irq_cpu
    }
    /// The pages behind the stack.
    #[getter]
    fn pages(&self) -> Vec<PyPage> {
        match &self.st.backing {
            Backing::Vmap(a) => a.pages.iter().map(|p| PyPage::new(&self.m, *p)).collect(),
            Backing::Pages(p, o) => (0..1u64 << o).map(|i| PyPage::new(&self.m, Pfn(p.0 + i))).collect(),
        }
    }
    /// `task_stack_end_corrupted()`.
    fn end_corrupted(&self) -> PyResult<bool> {
        self.m.stack_end_corrupted(&self.st).map_err(to_py_err)
    }
    /// The scheduler's check: MemoryCorruptionError if the end magic was overwritten.
    fn check(&self) -> PyResult<()> {
        self.m.check_stack(&self.st).map_err(to_py_err)
    }
    /// Use `depth` bytes of stack (writes a frame pattern from the top
    /// down). Past the base a vmapped stack faults on its guard page
    /// (PageFaultError, nothing written); another overwrites the end magic
    /// and the memory below, silently.
    #[pyo3(name = "use")]
    fn use_(&self, depth: i128) -> PyResult<()> {
        let depth = crate::args::u64_arg(depth, "ThreadStack.use", "depth")?;
        self.m.stack_use(&self.st, depth).map_err(to_py_err)
    }
    fn __repr__(&self) -> String {
        format!(
            "<ThreadStack base={:#x} size={} {}{}>",
            self.st.base,
            self.st.size,
            if self.st.vmapped() { "vmap" } else { "pages" },
            self.st.irq_cpu.map(|c| format!(" irq cpu {c}")).unwrap_or_default()
        )
    }
}
