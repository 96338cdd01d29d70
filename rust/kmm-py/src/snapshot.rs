//! `Machine.snapshot()`: defined in Python (`kmm/snapshots.py`), reached
//! from the Machine like every other method.

use pyo3::prelude::*;

use crate::machine::PyMachine;

#[pymethods]
impl PyMachine {
    /// A `kmm.Snapshot` of the allocator state (free pages per
    /// zone/order/migratetype, slab caches, per-CPU lists, vmalloc areas,
    /// meminfo); `new.compare_to(old, key_type)` lists what changed.
    fn snapshot<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py().import("kmm.snapshots")?.getattr("take")?.call1((slf,))
    }
}

#[pymethods]
impl PyMachine {
    /// One byte per page frame: who holds it, as an index into
    /// `kmm.PAGE_OWNER_NAMES` (reserved, buddy free, pcp, slab, vmalloc,
    /// page table, pages).
    /// MemoryError when the host cannot hold one byte per frame.
    fn page_owners<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let m = self.m.clone();
        let v = crate::gil::detach(py, move || m.page_owners())
            .map_err(|e| pyo3::exceptions::PyMemoryError::new_err(e.to_string()))?;
        Ok(pyo3::types::PyBytes::new(py, &v))
    }
}
