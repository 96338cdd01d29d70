//! `Machine`: the Python face of `kmm_core::Machine` (shared, `&self`, frozen).

use std::sync::Arc;

use kmm_core::arch::{parse_size, Arch};
use kmm_core::{KmmError, Machine, MachineConfig, Pfn, VirtAddr};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyString};

use crate::args::u32_arg;
use crate::errors::warn_alloc;
use crate::objects::{PyPage, PyZone};
use crate::slab::{addresses, alloc_err, call_site, to_array, PyBlock, PyKmemCache};
use crate::to_py_err;
use crate::tracing::{PyRecording, PyTraceHandle};

/// Sizes are ints or strings like "512M".
fn size_arg(v: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(s) = v.cast::<PyString>() {
        return parse_size(s.to_str()?).map_err(to_py_err);
    }
    if v.is_instance_of::<PyInt>() {
        return crate::args::nat(v, "Machine", "memory");
    }
    Err(PyTypeError::new_err("size must be an int or a string like \"512M\""))
}

/// A simulated machine: memory, zones, the page allocator, /proc views and
/// tracepoints. Shared freely between threads.
#[pyclass(frozen, name = "Machine", module = "kmm._kmm")]
pub struct PyMachine {
    pub(crate) m: Arc<Machine>,
}

enum PageOrAddr {
    Page(u64),
    Addr(u64),
}

fn page_or_addr(v: &Bound<'_, PyAny>) -> PyResult<PageOrAddr> {
    if let Ok(p) = v.cast::<PyPage>() {
        return Ok(PageOrAddr::Page(p.get().pfn));
    }
    if v.is_instance_of::<PyInt>() {
        return Ok(PageOrAddr::Addr(v.extract()?));
    }
    Err(PyTypeError::new_err(format!(
        "expected a Page or an address (int), not {}",
        v.get_type().name()?
    )))
}

impl PyMachine {
    fn oom(&self, py: Python<'_>, e: KmmError) -> PyErr {
        warn_alloc(py, &e);
        to_py_err(e)
    }

    /// A cache of this machine (a cache handle of another machine is refused).
    fn own_cache<'a>(&self, c: &'a Bound<'_, PyKmemCache>) -> PyResult<&'a PyKmemCache> {
        let c = c.get();
        if !Arc::ptr_eq(&c.m, &self.m) {
            return Err(PyValueError::new_err(format!("cache {} belongs to another Machine", c.c.name)));
        }
        Ok(c)
    }

    fn own_page(&self, p: &Bound<'_, PyPage>) -> PyResult<u64> {
        let p = p.get();
        if !Arc::ptr_eq(&p.m, &self.m) {
            return Err(PyValueError::new_err("that Page belongs to another Machine"));
        }
        Ok(p.pfn)
    }

    /// A zone by its /proc name, checking `cpu` is one of the machine's.
    fn zone_and_cpu(&self, zone: &str, cpu: u32) -> PyResult<&kmm_core::zone::Zone> {
        let z = self
            .m
            .zones
            .iter()
            .find(|z| z.kind.name() == zone)
            .ok_or_else(|| PyValueError::new_err(format!("no zone {zone:?} on this machine")))?;
        if cpu >= self.m.cfg.cpus {
            return Err(PyValueError::new_err(format!("cpu {cpu} out of range (the machine has {})", self.m.cfg.cpus)));
        }
        Ok(z)
    }

    fn do_free(&self, x: &Bound<'_, PyAny>, order: u32) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        match page_or_addr(x)? {
            PageOrAddr::Page(pfn) => {
                let p = x.cast::<PyPage>()?;
                self.own_page(p)?;
                self.m.free_pages(Pfn(pfn), order)
            }
            PageOrAddr::Addr(a) => self.m.free_pages_addr(VirtAddr(a), order),
        }
        .map_err(to_py_err)
    }
}

#[pymethods]
impl PyMachine {
    #[new]
    #[pyo3(signature = (arch="x86_64", memory=None, cpus=2, page_size=4096, min_free_kbytes=None,
                        watermark_scale_factor=10, lowmem_reserve_ratio=None,
                        transparent_hugepage=true, seed=0, slab_nomerge=false, tlb=None, cmdline="", sysctl=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        arch: &str,
        memory: Option<&Bound<'_, PyAny>>,
        cpus: i128,
        page_size: i128,
        min_free_kbytes: Option<i128>,
        watermark_scale_factor: i128,
        lowmem_reserve_ratio: Option<Vec<u64>>,
        transparent_hugepage: bool,
        seed: i128,
        slab_nomerge: bool,
        tlb: Option<std::collections::HashMap<String, (u32, u32)>>,
        cmdline: &str,
        sysctl: Option<Bound<'_, PyDict>>,
    ) -> PyResult<PyMachine> {
        crate::gil::release_pending(py);
        let f = "Machine";
        let (cpus, page_size) = (u32_arg(cpus, f, "cpus")?, u32_arg(page_size, f, "page_size")?);
        let min_free_kbytes = min_free_kbytes.map(|v| crate::args::u64_arg(v, f, "min_free_kbytes")).transpose()?;
        let watermark_scale_factor = crate::args::u64_arg(watermark_scale_factor, f, "watermark_scale_factor")?;
        let seed = crate::args::u64_arg(seed, f, "seed")?;
        let mut cfg = machine_config(
            arch,
            memory,
            cpus,
            page_size,
            min_free_kbytes,
            watermark_scale_factor,
            lowmem_reserve_ratio,
            transparent_hugepage,
            seed,
            slab_nomerge,
            tlb,
        )?;
        cfg.cmdline = kmm_core::cmdline::BootParams::parse(cmdline).map_err(to_py_err)?;
        cfg.sysctl = sysctl_items(sysctl)?;
        let m = crate::gil::detach(py, || Machine::new(cfg)).map_err(to_py_err)?;
        Ok(PyMachine { m: Arc::new(m) })
    }

    /// The warm start this machine was brought to for a trace
    /// (`recorded_machine`), as {"notes", "report", "trace_events"}; None
    /// for a cold machine.
    #[getter]
    fn warm_start<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(w) = self.m.warm.lock().clone() else { return Ok(None) };
        let d = PyDict::new(py);
        d.set_item("notes", w.notes.clone())?;
        d.set_item("report", crate::recorded::warm_report(py, &w.report)?)?;
        d.set_item("trace_events", w.trace_id.0)?;
        Ok(Some(d))
    }
    /// `m.sysctl(name)` reads a sysctl as /proc/sys prints it;
    /// `m.sysctl(name, value)` writes it, recomputing what the kernel's
    /// handler recomputes (watermarks, protection, pageset sizes). A value
    /// the kernel refuses raises ValueError and changes nothing.
    #[pyo3(signature = (name, value=None))]
    fn sysctl(&self, name: &str, value: Option<Bound<'_, PyAny>>) -> PyResult<Option<String>> {
        match value {
            None => self.m.sysctl_get(name).map(Some).map_err(to_py_err),
            Some(v) => {
                let text = sysctl_value(&v)?;
                self.m.sysctl_set(name, &text).map_err(to_py_err)?;
                Ok(None)
            }
        }
    }
    /// The kernel command line the machine booted with (normalised).
    #[getter]
    fn cmdline(&self) -> String {
        self.m.cfg.cmdline.text.clone()
    }
    /// The simulated clock, ns (CLOCK_MONOTONIC of the replayed trace).
    #[getter]
    fn time_ns(&self) -> u64 {
        self.m.clock.now()
    }
    /// Move the simulated clock to `t_ns`, running the kernel's timer work
    /// that falls due (vmstat_update's decay of pcp->high, every second per
    /// CPU); the first call only starts the clock. Returns how many times
    /// timer work ran. GIL released.
    fn advance_time(&self, py: Python<'_>, t_ns: i128) -> PyResult<u64> {
        let t_ns = crate::args::u64_arg(t_ns, "advance_time", "t_ns")?;
        let m = self.m.clone();
        Ok(crate::gil::detach(py, move || m.advance_time(t_ns)))
    }
    /// pagetypeinfo's "Number of mixed blocks" (what the kernel prints with
    /// page_owner=on): per populated zone, per pageblock migratetype, the
    /// pageblocks that hold an allocation of another migratetype
    /// (`pagetypeinfo_showmixedcount_print`). Walks every page: O(RAM).
    fn mixed_blocks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.m.clone();
        let per: Vec<(&'static str, [u64; kmm_core::buddy::MIGRATE_TYPES])> = crate::gil::detach(py, move || {
            m.zones.iter().filter(|z| z.is_populated()).map(|z| (z.kind.name(), m.mixed_blocks(z))).collect()
        });
        let d = PyDict::new(py);
        for (zone, counts) in per {
            let row = PyDict::new(py);
            for (t, n) in counts.iter().enumerate() {
                row.set_item(kmm_core::buddy::MIGRATETYPE_NAMES[t], n)?;
            }
            d.set_item(zone, row)?;
        }
        Ok(d)
    }
    /// One CPU's per-CPU page lists in one zone (by zone name), as
    /// `struct per_cpu_pages` holds them: {"count", "high", "high_min",
    /// "high_max", "batch", "free_count", "alloc_factor", "lists"} where
    /// lists maps (order, migratetype) to the pages on that list.
    fn pcp_state<'py>(&self, py: Python<'py>, zone: &str, cpu: i128) -> PyResult<Bound<'py, PyDict>> {
        let cpu = crate::args::u32_arg(cpu, "pcp_state", "cpu")?;
        let z = self.zone_and_cpu(zone, cpu)?;
        let p = z.pcp[cpu as usize].lists.lock();
        let d = PyDict::new(py);
        d.set_item("count", p.count)?;
        d.set_item("high", p.high)?;
        d.set_item("high_min", p.high_min)?;
        d.set_item("high_max", p.high_max)?;
        d.set_item("batch", p.batch)?;
        d.set_item("free_count", p.free_count)?;
        d.set_item("alloc_factor", p.alloc_factor)?;
        let lists = PyDict::new(py);
        for (i, l) in p.lists.iter().enumerate() {
            if l.is_empty() {
                continue;
            }
            let order = kmm_core::pcp::pindex_to_order(i, self.m.pageblock_order);
            let mt = if i >= kmm_core::pcp::NR_LOWORDER_PCP_LISTS {
                (i - kmm_core::pcp::NR_LOWORDER_PCP_LISTS) as u8
            } else {
                (i % kmm_core::buddy::MIGRATE_PCPTYPES as usize) as u8
            };
            // The THP lists are one for movable pages and one for the rest.
            let name = match (i >= kmm_core::pcp::NR_LOWORDER_PCP_LISTS, mt) {
                (true, 0) => "Unmovable+Reclaimable",
                _ => kmm_core::buddy::MIGRATETYPE_NAMES[mt as usize],
            };
            lists.set_item((order, name), l.len() as u64 * (1u64 << order))?;
        }
        d.set_item("lists", lists)?;
        Ok(d)
    }
    /// `decay_pcp_high` of one CPU's lists in one zone (by zone name); the
    /// kernel's `todo` (non-zero while work is left).
    fn decay_pcp_high(&self, zone: &str, cpu: i128) -> PyResult<u32> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let cpu = crate::args::u32_arg(cpu, "decay_pcp_high", "cpu")?;
        let z = self.zone_and_cpu(zone, cpu)?;
        Ok(self.m.decay_pcp_high(z, cpu))
    }

    /// The architecture: "x86_64", "i386" or "i386-pae".
    #[getter]
    fn arch(&self) -> &'static str {
        self.m.cfg.arch.name()
    }
    /// Bytes of RAM.
    #[getter]
    fn memory(&self) -> u64 {
        self.m.cfg.memory
    }
    /// Number of simulated CPUs.
    #[getter]
    fn cpus(&self) -> u32 {
        self.m.cfg.cpus
    }
    /// Bytes per page (PAGE_SIZE).
    #[getter]
    fn page_size(&self) -> u64 {
        self.m.page_size
    }
    /// Page frames of RAM, pfn 0 included.
    #[getter]
    fn nr_pages(&self) -> u64 {
        self.m.nr_pages
    }
    /// `pageblock_order`: pages of one migratetype block are 2^pageblock_order.
    #[getter]
    fn pageblock_order(&self) -> u32 {
        self.m.pageblock_order
    }
    /// `vm.min_free_kbytes` in force.
    #[getter]
    fn min_free_kbytes(&self) -> u64 {
        self.m.min_free_kbytes.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// `PAGE_OFFSET`: where the direct map starts.
    #[getter]
    fn page_offset(&self) -> u64 {
        self.m.cfg.arch.page_offset()
    }
    /// Snapshots of every zone of node 0, in index order.
    #[getter]
    fn zones(&self) -> Vec<PyZone> {
        (0..self.m.zones.len()).map(|i| PyZone::snapshot(&self.m, i)).collect()
    }
    /// Pages free in the buddy allocator.
    fn nr_free_pages(&self) -> u64 {
        self.m.nr_free_pages()
    }
    /// `totalram_pages()`.
    fn totalram_pages(&self) -> u64 {
        self.m.totalram_pages()
    }
    /// The zone `gfp_zone()` picks for a mask (its name); BadGfpError if invalid.
    fn gfp_zone(&self, gfp: i128) -> PyResult<&'static str> {
        let gfp = crate::args::u32_arg(gfp, "gfp_zone", "gfp")?;
        let i = self.m.gfp_zone(gfp).map_err(to_py_err)?;
        Ok(self.m.zones[i].kind.name())
    }
    /// Names of the zones an allocation with this mask may use, in fallback order.
    fn zonelist(&self, gfp: i128) -> PyResult<Vec<&'static str>> {
        let gfp = crate::args::u32_arg(gfp, "zonelist", "gfp")?;
        let i = self.m.gfp_zone(gfp).map_err(to_py_err)?;
        Ok(self.m.zonelist(i).map(|z| z.kind.name()).collect())
    }

    // ---- the page allocator --------------------------------------------------

    /// `alloc_pages(gfp, order)`: 2^order contiguous pages; returns the head Page.
    #[pyo3(signature = (gfp, order=crate::args::Int(0)), text_signature = "($self, gfp, order=0)")]
    fn alloc_pages(&self, py: Python<'_>, gfp: crate::args::Int, order: crate::args::Int) -> PyResult<PyPage> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let gfp = crate::args::u32_arg(gfp, "alloc_pages", "gfp")?;
        let order = crate::args::u32_arg(order, "alloc_pages", "order")?;
        match self.m.alloc_pages(gfp, order) {
            Ok(pfn) => Ok(PyPage::new(&self.m, pfn)),
            Err(e) => Err(self.oom(py, e)),
        }
    }
    /// `alloc_page(gfp)`.
    fn alloc_page(&self, py: Python<'_>, gfp: i128) -> PyResult<PyPage> {
        let gfp = crate::args::u32_arg(gfp, "alloc_page", "gfp")?;
        self.alloc_pages(py, crate::args::Int(gfp as i128), crate::args::Int(0))
    }
    /// `__get_free_pages(gfp, order)`: the direct-map address of new pages.
    #[pyo3(signature = (gfp, order=crate::args::Int(0)), text_signature = "($self, gfp, order=0)")]
    fn __get_free_pages(&self, py: Python<'_>, gfp: crate::args::Int, order: crate::args::Int) -> PyResult<u64> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let gfp = crate::args::u32_arg(gfp, "__get_free_pages", "gfp")?;
        let order = crate::args::u32_arg(order, "__get_free_pages", "order")?;
        match self.m.get_free_pages(gfp, order) {
            Ok(a) => Ok(a.0),
            Err(e) => Err(self.oom(py, e)),
        }
    }
    /// `__get_free_pages` under its other name.
    #[pyo3(signature = (gfp, order=0))]
    fn get_free_pages(&self, py: Python<'_>, gfp: i128, order: i128) -> PyResult<u64> {
        let gfp = crate::args::u32_arg(gfp, "get_free_pages", "gfp")?;
        let order = crate::args::u32_arg(order, "get_free_pages", "order")?;
        self.__get_free_pages(py, crate::args::Int(gfp as i128), crate::args::Int(order as i128))
    }
    /// `__get_free_page(gfp)`.
    fn __get_free_page(&self, py: Python<'_>, gfp: i128) -> PyResult<u64> {
        let gfp = crate::args::u32_arg(gfp, "__get_free_page", "gfp")?;
        self.__get_free_pages(py, crate::args::Int(gfp as i128), crate::args::Int(0))
    }
    /// `get_free_page(gfp)` (the book's name for `__get_free_page`).
    fn get_free_page(&self, py: Python<'_>, gfp: i128) -> PyResult<u64> {
        let gfp = crate::args::u32_arg(gfp, "get_free_page", "gfp")?;
        self.__get_free_pages(py, crate::args::Int(gfp as i128), crate::args::Int(0))
    }
    /// `get_zeroed_page(gfp)`: one page, zeroed.
    fn get_zeroed_page(&self, py: Python<'_>, gfp: i128) -> PyResult<u64> {
        let gfp = crate::args::u32_arg(gfp, "get_zeroed_page", "gfp")?;
        self.__get_free_pages(py, crate::args::Int((gfp | kmm_core::gfp::__GFP_ZERO) as i128), crate::args::Int(0))
    }
    /// `__free_pages(page, order)`; also accepts a direct-map address.
    #[pyo3(signature = (page, order=0))]
    fn __free_pages(&self, page: &Bound<'_, PyAny>, order: i128) -> PyResult<()> {
        let order = crate::args::u32_arg(order, "__free_pages", "order")?;
        self.do_free(page, order)
    }
    /// `free_pages(addr, order)`; also accepts a Page.
    #[pyo3(signature = (page_or_addr, order=crate::args::Int(0)), text_signature = "($self, page_or_addr, order=0)")]
    fn free_pages(&self, page_or_addr: &Bound<'_, PyAny>, order: crate::args::Int) -> PyResult<()> {
        let order = crate::args::u32_arg(order, "free_pages", "order")?;
        self.do_free(page_or_addr, order)
    }
    /// `free_page(addr)`; also accepts a Page.
    fn free_page(&self, page_or_addr: &Bound<'_, PyAny>) -> PyResult<()> {
        self.do_free(page_or_addr, 0)
    }
    /// `__free_page(page)`; also accepts an address.
    fn __free_page(&self, page: &Bound<'_, PyAny>) -> PyResult<()> {
        self.do_free(page, 0)
    }

    // ---- addresses -----------------------------------------------------------

    /// `page_address(page)`: its direct-map address; for a highmem page its
    /// kmap() address while kmapped, else None.
    fn page_address(&self, page: &Bound<'_, PyPage>) -> PyResult<Option<u64>> {
        let pfn = self.own_page(page)?;
        Ok(self.m.page_address_any(Pfn(pfn)).map(|v| v.0))
    }
    /// `virt_to_page(addr)` for direct-map addresses.
    fn virt_to_page(&self, addr: i128) -> PyResult<PyPage> {
        let addr = crate::args::u64_arg(addr, "virt_to_page", "addr")?;
        let pfn = self.m.virt_to_pfn(VirtAddr(addr)).map_err(to_py_err)?;
        Ok(PyPage::new(&self.m, pfn))
    }
    /// `virt_to_phys(addr)` for direct-map addresses.
    fn virt_to_phys(&self, addr: i128) -> PyResult<u64> {
        let addr = crate::args::u64_arg(addr, "virt_to_phys", "addr")?;
        Ok(self.m.virt_to_phys(VirtAddr(addr)).map_err(to_py_err)?.0)
    }
    /// `phys_to_virt(phys)` (`__va`); None for highmem.
    fn phys_to_virt(&self, phys: i128) -> PyResult<Option<u64>> {
        let phys = crate::args::u64_arg(phys, "phys_to_virt", "phys")?;
        Ok(self.m.phys_to_virt(kmm_core::PhysAddr(phys)).map(|v| v.0))
    }
    /// `pfn_to_page(pfn)`.
    fn pfn_to_page(&self, pfn: i128) -> PyResult<PyPage> {
        let pfn = crate::args::u64_arg(pfn, "pfn_to_page", "pfn")?;
        if !self.m.pfn_valid(Pfn(pfn)) {
            return Err(PyValueError::new_err(format!("pfn {pfn:#x} is not valid (beyond RAM)")));
        }
        Ok(PyPage::new(&self.m, Pfn(pfn)))
    }
    /// `page_to_pfn(page)`.
    fn page_to_pfn(&self, page: &Bound<'_, PyPage>) -> PyResult<u64> {
        self.own_page(page)
    }
    /// Read `n` bytes at a mapped address (through this CPU's TLB and the
    /// page tables; PageFaultError where nothing is mapped).
    fn read<'py>(&self, py: Python<'py>, addr: i128, n: i128) -> PyResult<Bound<'py, PyBytes>> {
        let addr = crate::args::u64_arg(addr, "read", "addr")?;
        let n = crate::args::usize_arg(n, "read", "n")?;
        read_bytes(py, &self.m, addr, n)
    }
    /// Write bytes at a mapped address (through the MMU model, like `read`).
    fn write(&self, addr: i128, data: &[u8]) -> PyResult<()> {
        let addr = crate::args::u64_arg(addr, "write", "addr")?;
        self.m.write(VirtAddr(addr), data).map_err(to_py_err)
    }

    // ---- the slab layer and kmalloc ----------------------------------------------

    /// `kmalloc(size, gfp)`: a Block of `size` bytes (kmalloc(0) gives the
    /// zero-length ZERO_SIZE_PTR Block at address 16).
    #[pyo3(signature = (size, gfp=crate::args::Int(kmm_core::gfp::GFP_KERNEL as i128)))]
    fn kmalloc(&self, py: Python<'_>, size: crate::args::Int, gfp: crate::args::Int) -> PyResult<PyBlock> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let size = crate::args::u64_arg(size, "kmalloc", "size")?;
        let gfp = crate::args::u32_arg(gfp, "kmalloc", "gfp")?;
        let cs = call_site(py, &self.m);
        match self.m.kmalloc(size, gfp, &cs) {
            Ok(a) => Ok(PyBlock::new(&self.m, a.0, size as usize)),
            Err(e) => Err(alloc_err(py, e)),
        }
    }
    /// `kzalloc(size, gfp)`: kmalloc with __GFP_ZERO.
    #[pyo3(signature = (size, gfp=kmm_core::gfp::GFP_KERNEL as i128))]
    fn kzalloc(&self, py: Python<'_>, size: i128, gfp: i128) -> PyResult<PyBlock> {
        let size = crate::args::u64_arg(size, "kzalloc", "size")?;
        let gfp = crate::args::u32_arg(gfp, "kzalloc", "gfp")?;
        self.kmalloc(py, crate::args::Int(size as i128), crate::args::Int((gfp | kmm_core::gfp::__GFP_ZERO) as i128))
    }
    /// `kmalloc_array(n, size, gfp)`: ValueError on overflow, nothing allocated.
    #[pyo3(signature = (n, size, gfp=kmm_core::gfp::GFP_KERNEL as i128))]
    fn kmalloc_array(&self, py: Python<'_>, n: i128, size: i128, gfp: i128) -> PyResult<PyBlock> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let n = crate::args::u64_arg(n, "kmalloc_array", "n")?;
        let size = crate::args::u64_arg(size, "kmalloc_array", "size")?;
        let gfp = crate::args::u32_arg(gfp, "kmalloc_array", "gfp")?;
        let cs = call_site(py, &self.m);
        match self.m.kmalloc_array(n, size, gfp, &cs) {
            Ok(a) => Ok(PyBlock::new(&self.m, a.0, (n * size) as usize)),
            Err(e) => Err(alloc_err(py, e)),
        }
    }
    /// `kcalloc(n, size, gfp)`: zeroed kmalloc_array.
    #[pyo3(signature = (n, size, gfp=kmm_core::gfp::GFP_KERNEL as i128))]
    fn kcalloc(&self, py: Python<'_>, n: i128, size: i128, gfp: i128) -> PyResult<PyBlock> {
        let n = crate::args::u64_arg(n, "kcalloc", "n")?;
        let size = crate::args::u64_arg(size, "kcalloc", "size")?;
        let gfp = crate::args::u32_arg(gfp, "kcalloc", "gfp")?;
        self.kmalloc_array(py, n as i128, size as i128, (gfp | kmm_core::gfp::__GFP_ZERO) as i128)
    }
    /// `krealloc(block, new_size, gfp)`: keeps the contents; may stay in place
    /// when ksize allows. `block` may be None.
    #[pyo3(signature = (block, new_size, gfp=kmm_core::gfp::GFP_KERNEL as i128))]
    fn krealloc(&self, py: Python<'_>, block: Option<&Bound<'_, PyAny>>, new_size: i128, gfp: i128) -> PyResult<PyBlock> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let new_size = crate::args::u64_arg(new_size, "krealloc", "new_size")?;
        let gfp = crate::args::u32_arg(gfp, "krealloc", "gfp")?;
        let cs = call_site(py, &self.m);
        let old: Option<&PyBlock> = match block {
            None => None,
            Some(b) => match b.cast::<PyBlock>() {
                Ok(b) => Some(b.get().owned_by(&self.m)?),
                Err(_) => None,
            },
        };
        if let Some(b) = old.filter(|b| !b.is_kmalloc()) {
            return Err(crate::errors::InvalidFreeError::new_err(format!(
                "krealloc: Block {:#x} is not a kmalloc'd object (a vmalloc, per-CPU or kmap Block: use the matching API)",
                b.addr
            )));
        }
        let addr = match (block, old) {
            (None, _) => 0,
            (Some(_), Some(b)) => {
                b.kasan_guard(0, 1, false, false)?; // __do_krealloc: kasan_check_byte
                b.check_alive()?;
                b.addr
            }
            (Some(x), None) => crate::args::nat(x, "krealloc", "block")?,
        };
        if let Some(b) = old {
            if b.addr > kmm_core::kmalloc::ZERO_SIZE_PTR && self.m.shadow.is_pinned(b.addr.wrapping_sub(self.m.cfg.arch.page_offset())) {
                return Err(pyo3::exceptions::PyBufferError::new_err("cannot krealloc a Block with a live memoryview"));
            }
        }
        match self.m.krealloc(addr, new_size, gfp, &cs) {
            Ok(a) => Ok(PyBlock::new(&self.m, a.0, new_size as usize)),
            Err(e) => Err(alloc_err(py, e)),
        }
    }
    /// `kfree(obj)`: a Block, an address or None (a no-op, as are NULL and ZERO_SIZE_PTR).
    fn kfree(&self, py: Python<'_>, obj: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let cs = call_site(py, &self.m);
        let Some(obj) = obj else {
            return self.m.kfree(0, &cs).map_err(to_py_err);
        };
        if let Ok(b) = obj.cast::<PyBlock>() {
            return b.get().owned_by(&self.m)?.free_with(|a| self.m.kfree(a, &cs));
        }
        if !obj.is_instance_of::<PyInt>() {
            return Err(PyTypeError::new_err(format!(
                "kfree: expected a Block, an address or None, not {}",
                obj.get_type().name()?
            )));
        }
        let a = crate::args::nat(obj, "kfree", "obj")?;
        self.m.kfree(a, &cs).map_err(to_py_err)
    }
    /// `ksize(obj)`: usable bytes of a kmalloc'd object.
    fn ksize(&self, obj: &Bound<'_, PyAny>) -> PyResult<u64> {
        let a = if let Ok(b) = obj.cast::<PyBlock>() {
            let b = b.get().owned_by(&self.m)?;
            b.kasan_guard(0, 1, false, false)?; // ksize: kasan_check_byte
            b.check_alive()?;
            b.addr
        } else {
            crate::args::nat(obj, "ksize", "obj")?
        };
        self.m.ksize(a).map_err(to_py_err)
    }
    /// `kmalloc_size_roundup(size)`.
    fn kmalloc_size_roundup(&self, size: i128) -> PyResult<u64> {
        Ok(self.m.kmalloc_size_roundup(crate::args::u64_arg(size, "kmalloc_size_roundup", "size")?))
    }
    /// `kmem_cache_create(name, size, align=0, flags=0, ctor=None)`. The ctor
    /// is called with each object's Block when a new slab is set up.
    #[pyo3(signature = (name, size, align=0, flags=0, ctor=None, freeptr_offset=None))]
    #[allow(clippy::too_many_arguments)]
    fn kmem_cache_create(
        &self,
        py: Python<'_>,
        name: &str,
        size: i128,
        align: i128,
        flags: i128,
        ctor: Option<Py<PyAny>>,
        freeptr_offset: Option<i128>,
    ) -> PyResult<PyKmemCache> {
        let f = "kmem_cache_create";
        let (size, align, flags) = (u32_arg(size, f, "size")?, u32_arg(align, f, "align")?, u32_arg(flags, f, "flags")?);
        let freeptr_offset = freeptr_offset.map(|o| u32_arg(o, f, "freeptr_offset")).transpose()?;
        crate::gil::release_pending(py);
        let core_ctor: Option<kmm_core::slab::Ctor> = ctor.as_ref().map(|c| {
            // Held: the core may drop the closure without the GIL (gil.rs).
            let c = crate::gil::Held::new(c.clone_ref(py));
            // Weak: the cache (inside the machine) keeps this closure, which
            // must not keep the machine (an Arc cycle: never freed).
            let m = Arc::downgrade(&self.m);
            let f: kmm_core::slab::Ctor = Arc::new(move |va: VirtAddr| {
                let Some(m) = m.upgrade() else { return };
                if crate::gil::exiting() {
                    return; // interpreter exit: no Python from inside kmm (gil.rs)
                }
                Python::attach(|py| {
                    let Some(_running) = crate::gil::enter_callback(py) else { return };
                    let blk = match Py::new(py, PyBlock::for_ctor(&m, va.0, size as usize)) {
                        Ok(b) => b,
                        Err(e) => return e.write_unraisable(py, Some(c.get().bind(py))),
                    };
                    if let Err(e) = c.get().call1(py, (blk.clone_ref(py),)) {
                        e.write_unraisable(py, Some(c.get().bind(py)));
                    }
                    blk.get().expire();
                })
            });
            f
        });
        let args = kmm_core::slab::CacheArgs { align, flags, ctor: core_ctor, freeptr_offset, order: None };
        let r = self.m.kmem_cache_create(name, size, args).map_err(to_py_err)?;
        let alias = r.merged.then(|| name.to_string());
        Ok(PyKmemCache::new(&self.m, r.cache, alias, ctor))
    }
    /// `kmem_cache_alloc(cache, gfp)`.
    #[pyo3(signature = (cache, gfp=kmm_core::gfp::GFP_KERNEL as i128))]
    fn kmem_cache_alloc(&self, py: Python<'_>, cache: &Bound<'_, PyKmemCache>, gfp: i128) -> PyResult<PyBlock> {
        let gfp = crate::args::u32_arg(gfp, "kmem_cache_alloc", "gfp")?;
        self.own_cache(cache)?.alloc_block(py, gfp)
    }
    /// `kmem_cache_free(cache, obj)`.
    fn kmem_cache_free(&self, py: Python<'_>, cache: &Bound<'_, PyKmemCache>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        self.own_cache(cache)?.free_obj(py, obj)
    }
    /// `kmem_cache_alloc_bulk(cache, gfp, n)`: an array('Q') of addresses.
    fn kmem_cache_alloc_bulk<'py>(&self, py: Python<'py>, cache: &Bound<'py, PyKmemCache>, gfp: i128, n: i128) -> PyResult<Bound<'py, PyAny>> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let gfp = crate::args::u32_arg(gfp, "kmem_cache_alloc_bulk", "gfp")?;
        let n = crate::args::usize_arg(n, "kmem_cache_alloc_bulk", "n")?;
        let (m, c) = (&self.m, &self.own_cache(cache)?.c); // borrowed: no shared refcount traffic
        let r = crate::gil::detach(py, move || {
            let mut v = Vec::new(); // sized by the core, which refuses absurd counts
            m.kmem_cache_alloc_bulk(c, gfp, n, &mut v).map(|_| v)
        });
        match r {
            Ok(v) => to_array(py, &v),
            Err(e) => Err(alloc_err(py, e)),
        }
    }
    /// `kmem_cache_free_bulk(cache, objs)`.
    fn kmem_cache_free_bulk(&self, py: Python<'_>, cache: &Bound<'_, PyKmemCache>, objs: &Bound<'_, PyAny>) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let v = addresses(&self.m, objs)?;
        let (m, c) = (&self.m, &self.own_cache(cache)?.c); // borrowed: no shared refcount traffic
        crate::gil::detach(py, move || m.kmem_cache_free_bulk(c, &v)).map_err(to_py_err)
    }
    /// `kmem_cache_shrink(cache)`: pages given back.
    fn kmem_cache_shrink(&self, py: Python<'_>, cache: &Bound<'_, PyKmemCache>) -> PyResult<u64> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let (m, c) = (&self.m, &self.own_cache(cache)?.c);
        crate::gil::detach(py, move || m.kmem_cache_shrink(c)).map_err(to_py_err)
    }
    /// `kmem_cache_destroy(cache)`.
    fn kmem_cache_destroy(&self, cache: &Bound<'_, PyKmemCache>) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        self.m.kmem_cache_destroy(&self.own_cache(cache)?.c).map_err(to_py_err)
    }
    /// A live cache by name (e.g. "kmalloc-64"), or None.
    fn kmem_cache(&self, name: &str) -> Option<PyKmemCache> {
        self.m.slab.find(name).map(|c| PyKmemCache::new(&self.m, c, None, None))
    }
    /// Every live cache, newest first (/proc/slabinfo order).
    #[getter]
    fn caches(&self) -> Vec<PyKmemCache> {
        self.m.slab.caches().into_iter().map(|c| PyKmemCache::new(&self.m, c, None, None)).collect()
    }
    /// /sys/kernel/slab/<name>/ attributes, or None.
    fn sysfs_slab<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(attrs) = self.m.sysfs_slab(name) else { return Ok(None) };
        let d = PyDict::new(py);
        for (k, v) in attrs {
            match v.parse::<i64>() {
                Ok(n) => d.set_item(k, n)?,
                Err(_) => d.set_item(k, v)?,
            }
        }
        Ok(Some(d))
    }
    /// A Block over a live allocation at `addr` of `size` bytes (for memory
    /// that came back as an address, e.g. from alloc_bulk).
    fn block(&self, addr: i128, size: i128) -> PyResult<PyBlock> {
        let addr = crate::args::u64_arg(addr, "block", "addr")?;
        let size = crate::args::usize_arg(size, "block", "size")?;
        if self.m.is_vmalloc_addr(addr) {
            return match self.m.find_vm_area(addr) {
                Some(a) if a.internal.load(std::sync::atomic::Ordering::Relaxed) != 0 => Err(PyValueError::new_err(format!(
                    "{addr:#x} is an area kmm made for itself (a page array or an IRQ stack), not a Block to hand out"
                ))),
                Some(a) if a.addr == addr && size as u64 <= a.usable() => {
                    let b = PyBlock::for_area(&self.m, a, size);
                    b.kasan_guard(0, size, false, false)?;
                    Ok(b)
                }
                _ => Err(PyValueError::new_err(format!("{addr:#x} is not the start of a live vmalloc area of >= {size} bytes"))),
            };
        }
        if addr == kmm_core::kmalloc::ZERO_SIZE_PTR {
            return Ok(PyBlock::new(&self.m, addr, 0));
        }
        let Ok(phys) = self.m.virt_to_phys(VirtAddr(addr)) else {
            return Err(PyValueError::new_err(format!("{addr:#x} is neither a direct-map nor a vmalloc address")));
        };
        // kasan=on: the view is checked whole first, so a freed object or
        // a view past the requested size gets KASAN's report.
        if self.m.kasan_on() {
            self.m.kasan_check(addr, size as u64, false).map_err(to_py_err)?;
        }
        if !self.m.shadow.is_live(phys.0) {
            return Err(crate::errors::UseAfterFreeError::new_err(format!(
                "BUG: KASAN: use-after-free: {addr:#x} is not a live object (freed, or not the start of a kmalloc \
                 or kmem_cache object)"
            )));
        }
        // The Block may not reach past the allocation (ksize: the usable bytes).
        let usable = self.m.ksize(addr).map_err(to_py_err)?;
        if size as u64 > usable {
            return Err(PyValueError::new_err(format!(
                "block: {size} bytes at {addr:#x} reach past the allocation ({usable} usable bytes)"
            )));
        }
        let b = PyBlock::new(&self.m, addr, size);
        b.check_alive()?;
        Ok(b)
    }

    /// With `kasan=on`: the shadow bytes of the 8-byte granules covering
    /// `[addr, addr + n)` (0: accessible, 1..7: that many bytes, 0xFF
    /// freed page, 0xFE large kmalloc redzone, 0xFC slab redzone, 0xFB
    /// freed object, 0xFA its first granule, 0xF8 vmalloc invalid);
    /// empty with KASAN off.
    #[pyo3(signature = (addr, n=1))]
    fn kasan_shadow<'py>(&self, py: Python<'py>, addr: i128, n: i128) -> PyResult<Bound<'py, PyBytes>> {
        let addr = crate::args::u64_arg(addr, "kasan_shadow", "addr")?;
        let n = crate::args::u64_arg(n, "kasan_shadow", "n")?;
        Ok(PyBytes::new(py, &self.m.kasan_shadow(addr, n)))
    }
    /// With `kasan=on`: the quarantine (mm/kasan/quarantine.c) as a dict:
    /// bytes on the per-CPU lists, bytes in the global batches, objects,
    /// and the KASAN reports made so far; the shadow's host bytes.
    fn kasan_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (percpu, global, objects) = self.m.kasan_quarantine_stats();
        let d = PyDict::new(py);
        d.set_item("enabled", self.m.kasan_on())?;
        d.set_item("quarantine_percpu_bytes", percpu)?;
        d.set_item("quarantine_bytes", global)?;
        d.set_item("quarantine_objects", objects)?;
        d.set_item("reports", self.m.kasan.reports.load(std::sync::atomic::Ordering::Relaxed))?;
        d.set_item("shadow_bytes", self.m.kasan_shadow_bytes())?;
        Ok(d)
    }

    // ---- the per-CPU allocator -------------------------------------------------

    /// `__alloc_percpu_gfp(size, align, gfp)`: zeroed memory in every CPU's
    /// unit; returns the `__percpu` pointer (an int).
    #[pyo3(signature = (size, align=8, gfp=kmm_core::gfp::GFP_KERNEL as i128))]
    fn alloc_percpu(&self, py: Python<'_>, size: i128, align: i128, gfp: i128) -> PyResult<u64> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let size = crate::args::u64_arg(size, "alloc_percpu", "size")?;
        let align = crate::args::u64_arg(align, "alloc_percpu", "align")?;
        let gfp = crate::args::u32_arg(gfp, "alloc_percpu", "gfp")?;
        let cs = call_site(py, &self.m);
        self.m.alloc_percpu(size, align, gfp, &cs).map_err(|e| alloc_err(py, e))
    }
    /// `free_percpu(ptr)` (0 is a no-op).
    fn free_percpu(&self, ptr: i128) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let ptr = crate::args::u64_arg(ptr, "free_percpu", "ptr")?;
        self.m.free_percpu(ptr).map_err(to_py_err)
    }
    /// `per_cpu_ptr(ptr, cpu)`: a Block over that CPU's copy.
    fn per_cpu_ptr(&self, ptr: i128, cpu: i128) -> PyResult<PyBlock> {
        let ptr = crate::args::u64_arg(ptr, "per_cpu_ptr", "ptr")?;
        let cpu = crate::args::u32_arg(cpu, "per_cpu_ptr", "cpu")?;
        PyBlock::for_percpu(&self.m, ptr, cpu)
    }
    /// `this_cpu_ptr(ptr)`: the calling CPU's copy.
    fn this_cpu_ptr(&self, ptr: i128) -> PyResult<PyBlock> {
        let ptr = crate::args::u64_arg(ptr, "this_cpu_ptr", "ptr")?;
        PyBlock::for_percpu(&self.m, ptr, self.m.cpus.this_cpu())
    }
    /// `DEFINE_PER_CPU`: a named per-CPU variable of `size` bytes; returns its pointer.
    #[pyo3(signature = (name, size, align=8))]
    fn define_per_cpu(&self, name: &str, size: i128, align: i128) -> PyResult<u64> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let size = crate::args::u64_arg(size, "define_per_cpu", "size")?;
        let align = crate::args::u64_arg(align, "define_per_cpu", "align")?;
        self.m.define_per_cpu(name, size, align).map_err(to_py_err)
    }
    /// `per_cpu(name, cpu)`: a Block over that CPU's copy of a named variable.
    fn per_cpu(&self, name: &str, cpu: i128) -> PyResult<PyBlock> {
        let cpu = crate::args::u32_arg(cpu, "per_cpu", "cpu")?;
        let ptr = self.m.per_cpu_var(name).map_err(to_py_err)?;
        PyBlock::for_percpu(&self.m, ptr, cpu)
    }
    /// `with m.get_cpu_var(name) as v:` this CPU's copy with preemption
    /// disabled (get_cpu_var/put_cpu_var).
    fn get_cpu_var(&self, name: &str) -> PyResult<crate::cpu::PyCpuVar> {
        let ptr = self.m.per_cpu_var(name).map_err(to_py_err)?;
        Ok(crate::cpu::PyCpuVar::new(&self.m, ptr))
    }

    // ---- CPUs, preemption, interrupts, per-CPU page lists ---------------------

    /// `with m.on_cpu(k):` run the calling thread on simulated CPU k.
    fn on_cpu(&self, cpu: i128) -> PyResult<crate::cpu::PyOnCpu> {
        let cpu = crate::args::u32_arg(cpu, "on_cpu", "cpu")?;
        if cpu >= self.m.cfg.cpus {
            return Err(PyValueError::new_err(format!(
                "cpu {cpu} does not exist (the machine has {} CPUs)",
                self.m.cfg.cpus
            )));
        }
        Ok(crate::cpu::PyOnCpu::new(&self.m, cpu))
    }
    /// `smp_processor_id()`: the CPU the calling thread runs on.
    fn smp_processor_id(&self) -> u32 {
        self.m.cpus.this_cpu()
    }
    /// `get_cpu()`: disable preemption (the thread keeps its CPU) and return it.
    /// Waits while another thread holds the CPU with preemption disabled
    /// (Ctrl-C gives up). A thread that ends without `put_cpu()` gives the
    /// CPU back as it exits (a "note: ... exited with preempt_count" on stderr).
    fn get_cpu(&self) -> PyResult<u32> {
        self.m.cpus.try_preempt_add(kmm_core::cpu::PREEMPT_OFFSET, false).map_err(to_py_err)
    }
    /// `put_cpu()`: enable preemption again; unbalanced calls raise.
    fn put_cpu(&self) -> PyResult<()> {
        self.m
            .cpus
            .preempt_sub(kmm_core::cpu::PREEMPT_OFFSET, kmm_core::cpu::PREEMPT_MASK, false)
            .map_err(|e| to_py_err(KmmError::Bug(e)))
    }
    /// `preempt_disable()`.
    fn preempt_disable(&self) -> PyResult<()> {
        self.get_cpu().map(|_| ())
    }
    /// `preempt_enable()`.
    fn preempt_enable(&self) -> PyResult<()> {
        self.put_cpu()
    }
    /// `with m.preempt_disabled():` a preempt_disable/enable pair.
    fn preempt_disabled(&self) -> crate::cpu::PyContext {
        crate::cpu::PyContext::new(&self.m, crate::cpu::CtxKind::Preempt)
    }
    /// `with m.atomic():` atomic context (preemption disabled, as under a spinlock).
    fn atomic(&self) -> crate::cpu::PyContext {
        crate::cpu::PyContext::new(&self.m, crate::cpu::CtxKind::Preempt)
    }
    /// `with m.irq():` hard-interrupt context on the current CPU (irq_enter/irq_exit).
    fn irq(&self) -> crate::cpu::PyContext {
        crate::cpu::PyContext::new(&self.m, crate::cpu::CtxKind::Irq)
    }
    /// `in_atomic()`.
    fn in_atomic(&self) -> bool {
        self.m.cpus.in_atomic()
    }
    /// `in_interrupt()`.
    fn in_interrupt(&self) -> bool {
        self.m.cpus.in_interrupt()
    }
    /// `irqs_disabled()`.
    fn irqs_disabled(&self) -> bool {
        self.m.cpus.irqs_disabled()
    }
    /// `preempt_count()` (the kernel's layout: preempt, softirq, hardirq fields).
    fn preempt_count(&self) -> u32 {
        self.m.cpus.ctx().preempt_count
    }
    /// `drain_all_pages()`: empty every CPU's per-CPU page lists.
    fn drain_all_pages(&self, py: Python<'_>) {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let m = self.m.clone();
        crate::gil::detach(py, move || m.drain_all_pages())
    }
    /// `drain_local_pages()`: this CPU's lists only.
    fn drain_local_pages(&self) {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        self.m.drain_local_pages()
    }
    /// Pages on per-CPU lists (free, but not in the buddy allocator).
    fn nr_pcp_pages(&self) -> u64 {
        self.m.nr_pcp_pages()
    }
    /// Per CPU: claims taken and times a thread found the CPU busy.
    fn cpu_stats(&self) -> Vec<(u64, u64)> {
        (0..self.m.cfg.cpus)
            .map(|c| {
                let s = self.m.cpus.slot(c);
                (s.claims.load(std::sync::atomic::Ordering::Relaxed), s.contended.load(std::sync::atomic::Ordering::Relaxed))
            })
            .collect()
    }

    // ---- views, checks, tracing ----------------------------------------------

    /// The kernel's /proc views of this machine.
    #[getter]
    fn proc(slf: &Bound<'_, Self>) -> PyProc {
        PyProc { m: slf.get().m.clone() }
    }
    /// Tracepoints: `attach(pattern, callback)` and `record(pattern)`.
    #[getter]
    fn trace(slf: &Bound<'_, Self>) -> PyTrace {
        PyTrace { m: slf.get().m.clone() }
    }
    /// Run every invariant check; returns the violations (empty when healthy).
    fn check(&self, py: Python<'_>) -> Vec<String> {
        let m = self.m.clone();
        crate::gil::detach(py, move || m.check())
    }
    fn __repr__(&self) -> String {
        format!(
            "<Machine arch={} memory={} MiB cpus={} page_size={}>",
            self.m.cfg.arch.name(),
            self.m.cfg.memory >> 20,
            self.m.cfg.cpus,
            self.m.page_size
        )
    }
}

/// The /proc files of a machine, in the kernel's formats.
#[pyclass(frozen, name = "Proc", module = "kmm._kmm")]
pub struct PyProc {
    pub(crate) m: Arc<Machine>,
}

#[pymethods]
impl PyProc {
    /// /proc/buddyinfo
    fn buddyinfo(&self) -> String {
        self.m.proc_buddyinfo()
    }
    /// /proc/zoneinfo
    fn zoneinfo(&self) -> String {
        self.m.proc_zoneinfo()
    }
    /// /proc/pagetypeinfo
    fn pagetypeinfo(&self) -> String {
        self.m.proc_pagetypeinfo()
    }
    /// /proc/meminfo
    fn meminfo(&self) -> String {
        self.m.proc_meminfo()
    }
    /// /proc/vmstat
    fn vmstat(&self) -> String {
        self.m.proc_vmstat()
    }
    /// /proc/slabinfo (version 2.1)
    fn slabinfo(&self) -> String {
        self.m.proc_slabinfo()
    }
    /// /proc/meminfo as a dict of kB values (HugePages_* are counts, as in the file).
    fn meminfo_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.m.meminfo_fields() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }
    /// /proc/vmstat as a dict.
    fn vmstat_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.m.vmstat_fields() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }
    fn __repr__(&self) -> String {
        format!(
            "<Proc of a {} machine, {} MiB: buddyinfo() zoneinfo() pagetypeinfo() meminfo() vmstat() slabinfo() vmallocinfo()>",
            self.m.cfg.arch.name(),
            self.m.cfg.memory >> 20
        )
    }
}

/// Tracepoints of a machine.
#[pyclass(frozen, name = "Trace", module = "kmm._kmm")]
pub struct PyTrace {
    m: Arc<Machine>,
}

#[pymethods]
impl PyTrace {
    /// Call `callback(event)` for every event whose name matches `pattern`
    /// (globs such as "kmem:*" or "mm_page_alloc", comma-separated).
    fn attach(&self, pattern: &str, callback: Py<PyAny>) -> PyResult<PyTraceHandle> {
        crate::tracing::attach(&self.m, pattern, callback)
    }
    /// Record matching events: `with m.trace.record("kmem:*") as rec: ...`,
    /// into per-CPU buffers of `capacity` events each (beyond it events are
    /// dropped and counted in `rec.lost`, as perf counts LOST events).
    #[pyo3(signature = (pattern="*", capacity=kmm_core::trace::Recorder::DEFAULT_CAPACITY as i128))]
    fn record(&self, pattern: &str, capacity: i128) -> PyResult<PyRecording> {
        let capacity = crate::args::u64_arg(capacity, "trace.record", "capacity")?;
        PyRecording::new(&self.m, pattern, capacity)
    }
    /// Names of every tracepoint the machine has.
    fn available(&self) -> Vec<&'static str> {
        kmm_core::trace::EventId::ALL.iter().map(|e| e.name()).collect()
    }
    /// Which tracepoints are on (a recording or a callback wants them).
    fn __repr__(&self) -> String {
        let all = kmm_core::trace::EventId::ALL;
        let on: Vec<&str> = all.iter().filter(|e| self.m.trace.on(**e)).map(|e| e.name()).collect();
        if on.is_empty() {
            format!("<Trace: {} tracepoints, all off>", all.len())
        } else {
            format!("<Trace: {} of {} tracepoints on: {}>", on.len(), all.len(), on.join(", "))
        }
    }
}

/// The `Machine(...)` keyword arguments as a configuration.
#[allow(clippy::too_many_arguments)]
pub(crate) fn machine_config(
    arch: &str,
    memory: Option<&Bound<'_, PyAny>>,
    cpus: u32,
    page_size: u32,
    min_free_kbytes: Option<u64>,
    watermark_scale_factor: u64,
    lowmem_reserve_ratio: Option<Vec<u64>>,
    transparent_hugepage: bool,
    seed: u64,
    slab_nomerge: bool,
    tlb: Option<std::collections::HashMap<String, (u32, u32)>>,
) -> PyResult<MachineConfig> {
    let memory = match memory {
        Some(v) => size_arg(v)?,
        None => 1 << 30,
    };
    let mut cfg = MachineConfig {
        arch: Arch::parse(arch).map_err(to_py_err)?,
        memory,
        cpus,
        page_size,
        min_free_kbytes,
        watermark_scale_factor,
        lowmem_reserve_ratio,
        transparent_hugepage,
        seed,
        slab_nomerge,
        ..MachineConfig::default()
    };
    for (name, (entries, ways)) in tlb.unwrap_or_default() {
        cfg.tlb.set(&name, entries, ways).map_err(PyValueError::new_err)?;
    }
    Ok(cfg)
}

/// A sysctl value from Python: an int, a string, or a list of ints
/// (`vm.lowmem_reserve_ratio`), as the text one would write to /proc/sys.
pub(crate) fn sysctl_value(v: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(s) = v.extract::<String>() {
        return Ok(s);
    }
    if let Ok(n) = v.extract::<i64>() {
        return Ok(n.to_string());
    }
    if let Ok(l) = v.extract::<Vec<i64>>() {
        return Ok(l.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" "));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "a sysctl value is an int, a str or a list of ints, not {}",
        v.get_type().name()?
    )))
}

/// `sysctl={name: value}` as (name, text) pairs, in the dict's order.
pub(crate) fn sysctl_items(items: Option<Bound<'_, PyDict>>) -> PyResult<Vec<(String, String)>> {
    let Some(d) = items else { return Ok(Vec::new()) };
    d.iter().map(|(k, v)| Ok((k.extract::<String>()?, sysctl_value(&v)?))).collect()
}

/// Check a command line and sysctls without booting a machine: raises
/// ValueError naming the first unknown name or bad value.
#[pyfunction]
#[pyo3(signature = (cmdline="", sysctl=None))]
pub fn check_settings(cmdline: &str, sysctl: Option<Bound<'_, PyDict>>) -> PyResult<()> {
    kmm_core::cmdline::BootParams::parse(cmdline).map_err(to_py_err)?;
    for (k, v) in sysctl_items(sysctl)? {
        kmm_core::sysctl::check_value(&k, &v).map_err(to_py_err)?;
    }
    Ok(())
}

/// `n` bytes at `addr`, read straight into a new bytes object (a buffer
/// Python cannot allocate is a MemoryError, not an abort).
pub(crate) fn read_bytes<'py>(py: Python<'py>, m: &Machine, addr: u64, n: usize) -> PyResult<Bound<'py, PyBytes>> {
    // Fault first (nothing allocated), then copy.
    let chunks = m.translate_range(VirtAddr(addr), n).map_err(to_py_err)?;
    PyBytes::new_with(py, n, |buf| m.copy_chunks(&chunks, buf).map_err(to_py_err))
}
