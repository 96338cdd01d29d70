//! Recording bundles for Python: `kmm._kmm.Bundle` (a bundle's /proc files,
//! read by `kmm_core::trace::bundle`) and `parse_proc` (one /proc file).
//! Conversions only: every value becomes plain Python data (dicts, lists,
//! ints, None); name/value lists become dicts in file order.

use std::sync::Arc;

use kmm_core::trace::bundle::{Bundle, Snapshot};
use kmm_core::trace::procfs::{self, BuddyZone, PagetypeInfo, ProcError, SampleSnap, SlabInfoRow, ZoneInfo};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::trace_import::PyTraceLog;

use crate::errors::TraceFormatError;

fn proc_err(py: Python<'_>, what: &str, e: ProcError) -> PyErr {
    let err = TraceFormatError::new_err(format!("{what}: {e}"));
    let _ = err.value(py).setattr("line", e.line);
    err
}

fn pairs<'py, V: IntoPyObject<'py> + Copy>(py: Python<'py>, v: &[(String, V)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, x) in v {
        d.set_item(k, *x)?;
    }
    Ok(d)
}

fn buddyinfo<'py>(py: Python<'py>, v: &[BuddyZone]) -> PyResult<Bound<'py, PyList>> {
    let l = PyList::empty(py);
    for z in v {
        let d = PyDict::new(py);
        d.set_item("node", z.node)?;
        d.set_item("zone", &z.zone)?;
        d.set_item("nr_free", &z.nr_free)?;
        l.append(d)?;
    }
    Ok(l)
}

fn pagetypeinfo<'py>(py: Python<'py>, p: &PagetypeInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("pageblock_order", p.pageblock_order)?;
    d.set_item("pages_per_block", p.pages_per_block)?;
    let free = PyList::empty(py);
    for f in &p.free {
        let x = PyDict::new(py);
        x.set_item("node", f.node)?;
        x.set_item("zone", &f.zone)?;
        x.set_item("migratetype", &f.migratetype)?;
        x.set_item("nr_free", &f.nr_free)?;
        free.append(x)?;
    }
    d.set_item("free", free)?;
    d.set_item("block_types", &p.block_types)?;
    let blocks = PyList::empty(py);
    for b in &p.blocks {
        let x = PyDict::new(py);
        x.set_item("node", b.node)?;
        x.set_item("zone", &b.zone)?;
        x.set_item("counts", &b.counts)?;
        blocks.append(x)?;
    }
    d.set_item("blocks", blocks)?;
    Ok(d)
}

fn zoneinfo<'py>(py: Python<'py>, zi: &ZoneInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("node_stats", pairs(py, &zi.node_stats)?)?;
    let zones = PyList::empty(py);
    for z in &zi.zones {
        let x = PyDict::new(py);
        x.set_item("node", z.node)?;
        x.set_item("name", &z.name)?;
        x.set_item("free", z.free)?;
        x.set_item("boost", z.boost)?;
        x.set_item("min", z.min)?;
        x.set_item("low", z.low)?;
        x.set_item("high", z.high)?;
        x.set_item("promo", z.promo)?;
        x.set_item("spanned", z.spanned)?;
        x.set_item("present", z.present)?;
        x.set_item("managed", z.managed)?;
        x.set_item("cma", z.cma)?;
        x.set_item("protection", &z.protection)?;
        x.set_item("stats", pairs(py, &z.stats)?)?;
        let ps = PyList::empty(py);
        for p in &z.pagesets {
            let y = PyDict::new(py);
            y.set_item("cpu", p.cpu)?;
            y.set_item("count", p.count)?;
            y.set_item("high", p.high)?;
            y.set_item("batch", p.batch)?;
            y.set_item("high_min", p.high_min)?;
            y.set_item("high_max", p.high_max)?;
            y.set_item("vm_stats_threshold", p.vm_stats_threshold)?;
            ps.append(y)?;
        }
        x.set_item("pagesets", ps)?;
        x.set_item("start_pfn", z.start_pfn)?;
        x.set_item("node_unreclaimable", z.node_unreclaimable)?;
        zones.append(x)?;
    }
    d.set_item("zones", zones)?;
    Ok(d)
}

fn slabinfo<'py>(py: Python<'py>, v: &[SlabInfoRow]) -> PyResult<Bound<'py, PyList>> {
    let l = PyList::empty(py);
    for r in v {
        let d = PyDict::new(py);
        d.set_item("name", &r.name)?;
        d.set_item("active_objs", r.active_objs)?;
        d.set_item("num_objs", r.num_objs)?;
        d.set_item("objsize", r.objsize)?;
        d.set_item("objperslab", r.objperslab)?;
        d.set_item("pagesperslab", r.pagesperslab)?;
        d.set_item("limit", r.limit)?;
        d.set_item("batchcount", r.batchcount)?;
        d.set_item("sharedfactor", r.sharedfactor)?;
        d.set_item("active_slabs", r.active_slabs)?;
        d.set_item("num_slabs", r.num_slabs)?;
        d.set_item("sharedavail", r.sharedavail)?;
        l.append(d)?;
    }
    Ok(l)
}

fn snapshot<'py>(py: Python<'py>, s: &Snapshot) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("buddyinfo", s.buddyinfo.as_deref().map(|v| buddyinfo(py, v)).transpose()?)?;
    d.set_item("pagetypeinfo", s.pagetypeinfo.as_ref().map(|v| pagetypeinfo(py, v)).transpose()?)?;
    d.set_item("zoneinfo", s.zoneinfo.as_ref().map(|v| zoneinfo(py, v)).transpose()?)?;
    d.set_item("slabinfo", s.slabinfo.as_deref().map(|v| slabinfo(py, v)).transpose()?)?;
    d.set_item("meminfo", s.meminfo.as_deref().map(|v| pairs(py, v)).transpose()?)?;
    d.set_item("vmstat", s.vmstat.as_deref().map(|v| pairs(py, v)).transpose()?)?;
    Ok(d)
}

fn sample<'py>(py: Python<'py>, s: &SampleSnap) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("ts_ns", s.ts_ns)?;
    d.set_item("buddyinfo", buddyinfo(py, &s.buddyinfo)?)?;
    d.set_item("pagetypeinfo", s.pagetypeinfo.as_ref().map(|v| pagetypeinfo(py, v)).transpose()?)?;
    d.set_item("vmstat", pairs(py, &s.vmstat)?)?;
    Ok(d)
}

/// The /proc side of a recording bundle, read from `(file name, text)`
/// pairs. Never raises for bad files: what cannot be used is in `warnings`.
#[pyclass(frozen, name = "Bundle", module = "kmm._kmm")]
pub struct PyBundle {
    pub(crate) bundle: Arc<Bundle>,
}

#[pymethods]
impl PyBundle {
    #[new]
    fn new(py: Python<'_>, files: Vec<(String, String)>) -> Self {
        let bundle = crate::gil::detach(py, move || Bundle::from_texts(&files));
        PyBundle { bundle: Arc::new(bundle) }
    }
    /// The start snapshot: {"buddyinfo", "pagetypeinfo", "zoneinfo", "slabinfo", "meminfo", "vmstat"}, None if missing.
    #[getter]
    fn start<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        snapshot(py, &self.bundle.start)
    }
    /// The end snapshot, as `start`.
    #[getter]
    fn end<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        snapshot(py, &self.bundle.end)
    }
    /// samples.txt: [{"ts_ns", "buddyinfo", "pagetypeinfo", "vmstat"}].
    #[getter]
    fn samples<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let l = PyList::empty(py);
        for s in &self.bundle.samples {
            l.append(sample(py, s)?)?;
        }
        Ok(l)
    }
    /// Number of samples (without converting them).
    #[getter]
    fn nr_samples(&self) -> usize {
        self.bundle.samples.len()
    }
    /// What was ignored or does not fit, one sentence each, naming the file.
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.bundle.warnings.clone()
    }
    /// Whether a trace fits this bundle: one warning per misfit (GIL released).
    fn check_trace(&self, py: Python<'_>, trace: PyRef<'_, PyTraceLog>) -> Vec<String> {
        let (b, log) = (self.bundle.clone(), trace.log.clone());
        crate::gil::detach(py, move || b.check_trace(&log))
    }
    fn __repr__(&self) -> String {
        let b = &self.bundle;
        let n = |s: &Snapshot| {
            [
                s.buddyinfo.is_some(),
                s.pagetypeinfo.is_some(),
                s.zoneinfo.is_some(),
                s.slabinfo.is_some(),
                s.meminfo.is_some(),
                s.vmstat.is_some(),
            ]
            .iter()
            .filter(|&&x| x)
            .count()
        };
        format!(
            "<Bundle: start {}/6 files, end {}/6, {} samples, {} warnings>",
            n(&b.start),
            n(&b.end),
            b.samples.len(),
            b.warnings.len()
        )
    }
}

/// Parse one /proc file's text: `kind` is "buddyinfo", "pagetypeinfo",
/// "zoneinfo", "slabinfo", "meminfo", "vmstat" or "samples". Raises
/// `TraceFormatError` (with `.line`) for a malformed line.
#[pyfunction]
pub fn parse_proc(py: Python<'_>, kind: &str, text: &str) -> PyResult<Py<PyAny>> {
    let e = |e| proc_err(py, kind, e);
    Ok(match kind {
        "buddyinfo" => buddyinfo(py, &procfs::parse_buddyinfo(text).map_err(e)?)?.into_any().unbind(),
        "pagetypeinfo" => pagetypeinfo(py, &procfs::parse_pagetypeinfo(text).map_err(e)?)?.into_any().unbind(),
        "zoneinfo" => zoneinfo(py, &procfs::parse_zoneinfo(text).map_err(e)?)?.into_any().unbind(),
        "slabinfo" => slabinfo(py, &procfs::parse_slabinfo(text).map_err(e)?)?.into_any().unbind(),
        "meminfo" => pairs(py, &procfs::parse_meminfo(text).map_err(e)?)?.into_any().unbind(),
        "vmstat" => pairs(py, &procfs::parse_vmstat(text).map_err(e)?)?.into_any().unbind(),
        "samples" => {
            let l = PyList::empty(py);
            for s in procfs::parse_samples(text).map_err(e)? {
                l.append(sample(py, &s)?)?;
            }
            l.into_any().unbind()
        }
        _ => return Err(PyValueError::new_err(format!(
            "unknown /proc file kind '{kind}' (buddyinfo, pagetypeinfo, zoneinfo, slabinfo, meminfo, vmstat, samples)"
        ))),
    })
}
