//! `kmm._kmm`: the PyO3 binding of kmm-core. Conversions, GIL handling and
//! error mapping only; the model lives in kmm-core.
//!
//! Errors are mapped to the exception classes defined in `kmm/errors.py`
//! (several have two bases, e.g. `OutOfMemoryError(KmmError, MemoryError)`),
//! in exactly one place: `to_py_err`.

use pyo3::prelude::*;

mod args;
mod bundle;
mod cpu;
mod debugging;
mod errors;
mod kasan;
mod fault;
mod gil;
mod machine;
mod objects;
mod recorded;
mod slab;
mod snapshot;
mod trace_import;
mod tracing;
mod vm;

pub(crate) use errors::to_py_err;

/// The compiled core of kmm.
#[pymodule(gil_used = false)]
fn _kmm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::resolve_classes(m.py())?;
    gil::register_quiesce(m.py())?;
    kmm_core::cpu::set_wait_hook(cpu::wait_hook);
    kmm_core::stackdepot::set_stack_hook(debugging::stack_hook);
    kmm_core::kasan::set_stack_hook(kasan::stack_hook);
    m.add_class::<cpu::PyOnCpu>()?;
    m.add_class::<cpu::PyContext>()?;
    m.add_class::<cpu::PyCpuVar>()?;
    m.add_class::<machine::PyMachine>()?;
    m.add_class::<objects::PyPage>()?;
    m.add_class::<objects::PyZone>()?;
    m.add_class::<slab::PyBlock>()?;
    m.add_class::<slab::PyKmemCache>()?;
    m.add_class::<tracing::PyEvent>()?;
    m.add_class::<tracing::PyRecording>()?;
    m.add_class::<tracing::PyTraceHandle>()?;
    m.add_class::<trace_import::PyTraceParser>()?;
    m.add_class::<trace_import::PyTraceLog>()?;
    m.add_class::<trace_import::PyTraceEvent>()?;
    m.add_class::<trace_import::PyKmemStat>()?;
    m.add_class::<bundle::PyBundle>()?;
    m.add_function(wrap_pyfunction!(bundle::parse_proc, m)?)?;
    m.add_function(wrap_pyfunction!(recorded::recorded_machine, m)?)?;
    m.add_function(wrap_pyfunction!(machine::check_settings, m)?)?;
    m.add_class::<machine::PyProc>()?;
    m.add_class::<machine::PyTrace>()?;
    m.add_class::<fault::PyFaultAttr>()?;
    m.add_class::<vm::PyThreadStack>()?;
    m.add_function(wrap_pyfunction!(gfp_format, m)?)?;
    m.add_function(wrap_pyfunction!(gfp_parse, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(trace_import::sniff_trace, m)?)?;
    m.add_function(wrap_pyfunction!(trace_import::parse_perf_data, m)?)?;
    let names: Vec<(&str, u32)> = kmm_core::gfp::ALL_NAMES.to_vec();
    m.add("GFP_NAMES", names)?;
    let table: Vec<(&str, u32)> = kmm_core::gfp::PRINT_TABLE.to_vec();
    m.add("GFP_PRINT_TABLE", table)?;
    m.add("MAX_PAGE_ORDER", kmm_core::arch::MAX_PAGE_ORDER)?;
    m.add("MIGRATETYPE_NAMES", kmm_core::buddy::MIGRATETYPE_NAMES.to_vec())?;
    m.add("TRACEPOINTS", kmm_core::trace::EventId::ALL.iter().map(|e| e.name()).collect::<Vec<_>>())?;
    let tunables: Vec<(&str, &str, &str)> = kmm_core::MachineConfig::TUNABLES.to_vec();
    m.add("TUNABLES", tunables)?;
    m.add("BOOT_PARAMS", kmm_core::cmdline::BOOT_PARAMS.to_vec())?;
    m.add("SYSCTLS", kmm_core::sysctl::SYSCTLS.to_vec())?;
    m.add("ERROR_CODES", kmm_core::KmmError::ALL_CODES.to_vec())?;
    let slab_flags: Vec<(&str, u32)> = kmm_core::slab::geometry::SLAB_FLAG_NAMES.to_vec();
    m.add("SLAB_FLAGS", slab_flags)?;
    m.add("ZERO_SIZE_PTR", kmm_core::kmalloc::ZERO_SIZE_PTR)?;
    m.add("KMALLOC_MAX_CACHE_SIZE", kmm_core::kmalloc::KMALLOC_MAX_CACHE_SIZE)?;
    m.add("KMALLOC_MAX_SIZE", kmm_core::kmalloc::KMALLOC_MAX_SIZE)?;
    m.add("STACK_END_MAGIC", kmm_core::vm::stack::STACK_END_MAGIC)?;
    m.add("KM_MAX_IDX", kmm_core::vm::highmem::KM_MAX_IDX)?;
    m.add("PAGE_OWNER_NAMES", kmm_core::proc::PAGE_OWNER_NAMES.to_vec())?;
    Ok(())
}

/// `show_gfp_flags`: the text a tracepoint prints for a gfp mask.
#[pyfunction]
fn gfp_format(mask: u32) -> String {
    kmm_core::gfp::format(mask)
}

/// The inverse of `gfp_format`.
#[pyfunction]
fn gfp_parse(text: &str) -> PyResult<u32> {
    kmm_core::gfp::parse(text).map_err(to_py_err)
}

/// Parse a size such as 4096, "512M" or "64G" into bytes.
#[pyfunction]
fn parse_size(text: &str) -> PyResult<u64> {
    kmm_core::arch::parse_size(text).map_err(to_py_err)
}
