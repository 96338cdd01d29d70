//! `Page` and `Zone`: Python views of the core's page metadata and zones.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use kmm_core::page::flag_names;
use kmm_core::{Machine, Pfn};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A `struct page`: a live view of one page frame's metadata.
#[pyclass(frozen, name = "Page", module = "kmm._kmm")]
pub struct PyPage {
    pub(crate) m: Arc<Machine>,
    pub(crate) pfn: u64,
}

impl PyPage {
    pub(crate) fn new(m: &Arc<Machine>, pfn: Pfn) -> PyPage {
        PyPage { m: m.clone(), pfn: pfn.0 }
    }
}

#[pymethods]
impl PyPage {
    /// Page frame number.
    #[getter]
    fn pfn(&self) -> u64 {
        self.pfn
    }
    /// Order of the block this page heads (allocated or free), 0 otherwise.
    #[getter]
    fn order(&self) -> u32 {
        self.m.page_flags_order(Pfn(self.pfn)).1
    }
    /// Name of the zone the page belongs to.
    #[getter]
    fn zone(&self) -> Option<&'static str> {
        self.m.pfn_zone(Pfn(self.pfn)).map(|z| z.kind.name())
    }
    /// Kernel names of the page's flags and page type ("head", "buddy", "reserved", ...).
    #[getter]
    fn flags(&self) -> Vec<&'static str> {
        flag_names(self.m.page_flags_order(Pfn(self.pfn)).0)
    }
    /// `page_ref_count()`.
    #[getter]
    fn refcount(&self) -> i32 {
        self.m.mem_map.get(self.pfn).refcount()
    }
    /// Migratetype of the page's pageblock ("Unmovable", "Movable", ...).
    #[getter]
    fn migratetype(&self) -> Option<&'static str> {
        let z = self.m.pfn_zone(Pfn(self.pfn))?;
        let mt = z.area.lock().pageblock_migratetype(self.pfn);
        Some(kmm_core::buddy::MIGRATETYPE_NAMES[mt as usize])
    }
    /// Physical address of the page.
    #[getter]
    fn phys(&self) -> u64 {
        self.m.pfn_to_phys(Pfn(self.pfn)).0
    }
    /// `page_address()`: the direct-map address; a highmem page's kmap()
    /// address while kmapped, else None.
    #[getter]
    fn address(&self) -> Option<u64> {
        self.m.page_address_any(Pfn(self.pfn)).map(|v| v.0)
    }
    /// `PageHighMem()`.
    #[getter]
    fn highmem(&self) -> bool {
        !self.m.pfn_is_lowmem(Pfn(self.pfn))
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<PyPage>() {
            Ok(o) => {
                let o = o.get();
                Arc::ptr_eq(&self.m, &o.m) && o.pfn == self.pfn
            }
            Err(_) => false,
        }
    }
    fn __hash__(&self) -> u64 {
        self.pfn ^ (Arc::as_ptr(&self.m) as u64).rotate_left(32)
    }
    fn __int__(&self) -> u64 {
        self.pfn
    }
    fn __repr__(&self) -> String {
        let (flags, order) = self.m.page_flags_order(Pfn(self.pfn));
        format!(
            "<Page pfn={:#x} order={} zone={} flags={} refcount={}>",
            self.pfn,
            order,
            self.zone().unwrap_or("?"),
            flag_names(flags).join("|"),
            self.m.mem_map.get(self.pfn).refcount()
        )
    }
}

/// A snapshot of one zone, with the kernel's field names.
#[pyclass(frozen, name = "Zone", module = "kmm._kmm")]
pub struct PyZone {
    /// The zone's name as /proc shows it ("DMA", "DMA32", "Normal", "HighMem", ...).
    #[pyo3(get)]
    pub name: &'static str,
    /// The zone's index in the node (`zone_idx`).
    #[pyo3(get)]
    pub index: usize,
    /// First page frame of the zone's span.
    #[pyo3(get)]
    pub start_pfn: u64,
    /// Pages the zone spans, holes included (`spanned_pages`).
    #[pyo3(get)]
    pub spanned: u64,
    /// Pages of RAM in the span (`present_pages`).
    #[pyo3(get)]
    pub present: u64,
    /// Pages the buddy allocator manages (`managed_pages`).
    #[pyo3(get)]
    pub managed: u64,
    /// Free pages in the buddy lists (NR_FREE_PAGES; per-CPU lists not counted).
    #[pyo3(get)]
    pub free_pages: u64,
    /// The min watermark, in pages (`WMARK_MIN`).
    #[pyo3(get)]
    pub min: u64,
    /// The low watermark, in pages: kswapd is woken below it (`WMARK_LOW`).
    #[pyo3(get)]
    pub low: u64,
    /// The high watermark, in pages: kswapd sleeps above it (`WMARK_HIGH`).
    #[pyo3(get)]
    pub high: u64,
    /// The promo watermark, in pages (`WMARK_PROMO`).
    #[pyo3(get)]
    pub promo: u64,
    /// Watermark boost after fragmenting fallbacks (`watermark_boost`).
    #[pyo3(get)]
    pub boost: u64,
    /// `lowmem_reserve[]`: pages kept back from requests that could use a higher zone, per zone index.
    #[pyo3(get)]
    pub lowmem_reserve: Vec<u64>,
    /// Free blocks per order (all migratetypes): /proc/buddyinfo's row.
    #[pyo3(get)]
    pub nr_free: Vec<u64>,
    /// Pages in MIGRATE_HIGHATOMIC pageblocks (`nr_reserved_highatomic`).
    #[pyo3(get)]
    pub nr_reserved_highatomic: u64,
    /// Pages allocated from the zone (/proc/vmstat's pgalloc_<zone>).
    #[pyo3(get)]
    pub pgalloc: u64,
    /// Pages freed to the zone (its share of /proc/vmstat's pgfree).
    #[pyo3(get)]
    pub pgfree: u64,
    /// Times `zone->lock` was taken since boot by the allocator (refills,
    /// drains, buddy allocations and frees; kmm's own snapshots not counted).
    #[pyo3(get)]
    pub lock_acquisitions: u64,
    nr_free_mt: Vec<Vec<u64>>,
    pageblocks: Vec<u64>,
}

impl PyZone {
    pub(crate) fn snapshot(m: &Machine, i: usize) -> PyZone {
        let z = &m.zones[i];
        let a = z.area.lock_uncounted();
        PyZone {
            lock_acquisitions: z.area.acquisitions(),
            name: z.kind.name(),
            index: i,
            start_pfn: z.start_pfn,
            spanned: z.spanned,
            present: z.present,
            managed: z.managed,
            free_pages: a.free_pages,
            min: z.wmark(0),
            low: z.wmark(1),
            high: z.wmark(2),
            promo: z.wmark(3),
            boost: z.watermark_boost.load(Relaxed),
            lowmem_reserve: z.lowmem_reserve.iter().map(|r| r.load(Relaxed)).collect(),
            nr_free: a.nr_free.to_vec(),
            nr_reserved_highatomic: z.nr_reserved_highatomic.load(Relaxed),
            pgalloc: z.pgalloc(),
            pgfree: z.pgfree(),
            nr_free_mt: (0..kmm_core::buddy::MIGRATE_TYPES)
                .map(|mt| a.nr_free_mt.iter().map(|o| o[mt]).collect())
                .collect(),
            pageblocks: a.pageblock_counts().to_vec(),
        }
    }
}

#[pymethods]
impl PyZone {
    /// Free blocks per order for each migratetype: {"Unmovable": [...], ...}.
    #[getter]
    fn nr_free_by_migratetype<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (mt, v) in self.nr_free_mt.iter().enumerate() {
            d.set_item(kmm_core::buddy::MIGRATETYPE_NAMES[mt], v.clone())?;
        }
        Ok(d)
    }
    /// Number of pageblocks of each migratetype.
    #[getter]
    fn pageblocks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (mt, v) in self.pageblocks.iter().enumerate() {
            d.set_item(kmm_core::buddy::MIGRATETYPE_NAMES[mt], *v)?;
        }
        Ok(d)
    }
    /// `populated_zone()`.
    #[getter]
    fn populated(&self) -> bool {
        self.managed > 0
    }
    fn __repr__(&self) -> String {
        format!(
            "<Zone {} start_pfn={:#x} spanned={} managed={} free={} min={} low={} high={}>",
            self.name, self.start_pfn, self.spanned, self.managed, self.free_pages, self.min, self.low, self.high
        )
    }
}
