//! A machine built for a trace (shaped like its recording, warm-started):
//! conversions around `kmm_core::trace::shape::recorded_machine`.

use std::sync::Arc;

use kmm_core::trace::replay::ReplayOptions;
use kmm_core::trace::shape::recorded_machine as core_recorded_machine;
use kmm_core::warm::WarmReport;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::bundle::PyBundle;
use crate::machine::{machine_config, PyMachine};
use crate::to_py_err;
use crate::trace_import::PyTraceLog;

/// The warm start's report as plain Python data.
pub(crate) fn warm_report<'py>(py: Python<'py>, r: &WarmReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let zones = PyList::empty(py);
    for z in &r.zones {
        let zd = PyDict::new(py);
        zd.set_item("zone", z.zone)?;
        let names = kmm_core::buddy::MIGRATETYPE_NAMES;
        let per = |a: &[[u64; kmm_core::buddy::MIGRATE_TYPES]; kmm_core::arch::NR_PAGE_ORDERS]| -> PyResult<Bound<'py, PyDict>> {
            let m = PyDict::new(py);
            for (t, name) in names.iter().enumerate() {
                m.set_item(*name, a.iter().map(|o| o[t]).collect::<Vec<u64>>())?;
            }
            Ok(m)
        };
        zd.set_item("target", per(&z.target)?)?;
        zd.set_item("reached", per(&z.reached)?)?;
        let blocks = |b: &[u64; kmm_core::buddy::MIGRATE_TYPES]| -> PyResult<Bound<'py, PyDict>> {
            let m = PyDict::new(py);
            for (t, name) in names.iter().enumerate() {
                m.set_item(*name, b[t])?;
            }
            Ok(m)
        };
        zd.set_item("blocks_target", blocks(&z.blocks_target)?)?;
        zd.set_item("blocks_reached", blocks(&z.blocks_reached)?)?;
        zd.set_item("pcp_target", z.pcp_target.clone())?;
        zd.set_item("pcp_reached", z.pcp_reached.clone())?;
        zones.append(zd)?;
    }
    d.set_item("zones", zones)?;
    d.set_item("allocated", r.allocated.len())?;
    d.set_item("allocated_at_traced_pfn", r.allocated.iter().filter(|a| a.0 == a.1).count())?;
    d.set_item("allocated_missed", r.allocated_missed)?;
    d.set_item("caches", r.caches.clone())?;
    d.set_item("slabs_at_traced_pfn", r.slabs_at_traced_pfn)?;
    d.set_item("slabs_moved", r.slabs_moved)?;
    d.set_item("untracked_pages", r.untracked_pages)?;
    d.set_item("warnings", r.warnings.clone())?;
    Ok(d)
}

/// `recorded_machine(trace, bundle=None, warm=True, **Machine kwargs)`: a
/// Machine for replaying `trace`, shaped like the recording (or sized from
/// the trace) and, with `warm`, brought to its start state. Returns
/// `(machine, info)`; info: {"notes", "warnings", "warm", "caches_created"}.
#[pyfunction]
#[pyo3(signature = (trace, bundle=None, warm=true, arch="x86_64", memory=None, cpus=None, page_size=4096,
                    min_free_kbytes=None, watermark_scale_factor=10, lowmem_reserve_ratio=None,
                    transparent_hugepage=true, seed=0, slab_nomerge=false, tlb=None, cmdline="", sysctl=None))]
#[allow(clippy::too_many_arguments)]
pub fn recorded_machine<'py>(
    py: Python<'py>,
    trace: PyRef<'py, PyTraceLog>,
    bundle: Option<PyRef<'py, PyBundle>>,
    warm: bool,
    arch: &str,
    memory: Option<&Bound<'py, PyAny>>,
    cpus: Option<u32>,
    page_size: u32,
    min_free_kbytes: Option<u64>,
    watermark_scale_factor: u64,
    lowmem_reserve_ratio: Option<Vec<u64>>,
    transparent_hugepage: bool,
    seed: u64,
    slab_nomerge: bool,
    tlb: Option<std::collections::HashMap<String, (u32, u32)>>,
    cmdline: &str,
    sysctl: Option<Bound<'py, PyDict>>,
) -> PyResult<(PyMachine, Bound<'py, PyDict>)> {
    let memory_given = memory.is_some();
    let mut cfg = machine_config(
        arch,
        memory,
        cpus.unwrap_or(2),
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
    cfg.sysctl = crate::machine::sysctl_items(sysctl)?;
    let log = trace.log.clone();
    let b = bundle.map(|b| b.bundle.clone());
    let po = ReplayOptions::default().page_offset;
    let r = crate::gil::detach(py, move || {
        core_recorded_machine(cfg, b.as_deref(), &log, warm, po, cpus.is_some(), memory_given)
    })
    .map_err(to_py_err)?;
    let info = PyDict::new(py);
    info.set_item("notes", r.notes.clone())?;
    info.set_item("warnings", r.warnings.clone())?;
    info.set_item("warm", r.warm.as_ref().map(|w| warm_report(py, w)).transpose()?)?;
    info.set_item("caches_created", r.caches_created.clone())?;
    Ok((PyMachine { m: Arc::new(r.machine) }, info))
}
