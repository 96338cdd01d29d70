//! `m.fault_attr(name)`: a fault attribute (`kmm_core::fault_inject`) whose
//! Python attributes are its debugfs files (`-` spelled `_`), also reachable
//! by their debugfs names (`attr["ignore-gfp-wait"]`).

use std::sync::Arc;

use kmm_core::fault_inject::{FaultAttr, FaultKind};
use kmm_core::Machine;
use pyo3::exceptions::{PyAttributeError, PyKeyError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt};
use pyo3::IntoPyObjectExt;

use crate::machine::PyMachine;

/// One of the machine's fault attributes (failslab or fail_page_alloc), as
/// /sys/kernel/debug/<name>/ shows it. Writes take effect at once.
#[pyclass(frozen, name = "FaultAttr", module = "kmm._kmm")]
pub struct PyFaultAttr {
    m: Arc<Machine>,
    kind: FaultKind,
}

impl PyFaultAttr {
    fn attr(&self) -> &FaultAttr {
        match self.kind {
            FaultKind::Failslab => &self.m.faults.failslab,
            FaultKind::FailPageAlloc => &self.m.faults.fail_page_alloc,
        }
    }

    /// A file's value, or AttributeError when this attribute has no such file.
    fn get(&self, file: &str) -> PyResult<i128> {
        self.attr().read(file).map_err(|e| PyAttributeError::new_err(e.to_string()))
    }

    fn get_bool(&self, file: &str) -> PyResult<bool> {
        Ok(self.get(file)? != 0)
    }

    /// Write a file from Python: ints for numbers; bools (or 0/1) for Y/N files.
    fn set(&self, file: &str, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let is_bool = self.attr().is_bool(file).map_err(|e| PyAttributeError::new_err(e.to_string()))?;
        let name = self.kind.name();
        let n: i128 = if v.is_instance_of::<PyBool>() {
            if !is_bool {
                return Err(PyTypeError::new_err(format!("{name} {file} must be an int, not bool")));
            }
            v.extract::<bool>()? as i128
        } else if v.is_instance_of::<PyInt>() {
            v.extract::<i128>().map_err(|_| PyValueError::new_err(format!("{name} {file}: {v} is out of range")))?
        } else {
            let want = if is_bool { "a bool" } else { "an int" };
            return Err(PyTypeError::new_err(format!("{name} {file} must be {want}, not {}", v.get_type().name()?)));
        };
        self.attr().write(file, n).map_err(|e| PyValueError::new_err(e.to_string()))
    }
}

#[pymethods]
impl PyFaultAttr {
    /// The attribute's name: "failslab" or "fail_page_alloc".
    #[getter]
    fn name(&self) -> &'static str {
        self.kind.name()
    }
    /// Chance, in percent, that a call reaching the random test fails (0: never; the fault is off).
    #[getter]
    fn probability(&self) -> PyResult<u64> {
        Ok(self.get("probability")? as u64)
    }
    #[setter]
    fn set_probability(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set("probability", v)
    }
    /// Only every interval-th call that passes the other tests may fail (0 and 1: every call).
    #[getter]
    fn interval(&self) -> PyResult<u64> {
        Ok(self.get("interval")? as u64)
    }
    #[setter]
    fn set_interval(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set("interval", v)
    }
    /// Failures still allowed: each one counts it down; -1 means no limit, 0 none (default 1).
    #[getter]
    fn times(&self) -> PyResult<i32> {
        Ok(self.get("times")? as i32)
    }
    #[setter]
    fn set_times(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set("times", v)
    }
    /// Size let through before failures start: each smaller call takes its size off
    /// (bytes of the object for failslab, pages for fail_page_alloc).
    #[getter]
    fn space(&self) -> PyResult<i32> {
        Ok(self.get("space")? as i32)
    }
    #[setter]
    fn set_space(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set("space", v)
    }
    /// 0: fail silently; 1 or more: the "FAULT_INJECTION: forcing a failure" report
    /// heads the error's message (2, the default, would add a stack dump: the traceback).
    #[getter]
    fn verbose(&self) -> PyResult<u64> {
        Ok(self.get("verbose")? as u64)
    }
    #[setter]
    fn set_verbose(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set("verbose", v)
    }
    /// ignore-gfp-wait: leave requests that may sleep (__GFP_DIRECT_RECLAIM, e.g.
    /// GFP_KERNEL) alone; on by default, so only atomic requests fail.
    #[getter]
    fn ignore_gfp_wait(&self) -> PyResult<bool> {
        self.get_bool("ignore-gfp-wait")
    }
    #[setter]
    fn set_ignore_gfp_wait(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set("ignore-gfp-wait", v)
    }
    /// failslab's cache-filter: fail only caches created with SLAB_FAILSLAB
    /// (or given the A flag by slub_debug=). AttributeError on fail_page_alloc.
    #[getter]
    fn cache_filter(&self) -> PyResult<bool> {
        self.get_bool("cache-filter")
    }
    #[setter]
    fn set_cache_filter(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set("cache-filter", v)
    }
    /// fail_page_alloc's ignore-gfp-highmem: leave __GFP_HIGHMEM requests alone
    /// (default on). AttributeError on failslab.
    #[getter]
    fn ignore_gfp_highmem(&self) -> PyResult<bool> {
        self.get_bool("ignore-gfp-highmem")
    }
    #[setter]
    fn set_ignore_gfp_highmem(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set("ignore-gfp-highmem", v)
    }
    /// fail_page_alloc's min-order: leave smaller orders alone (default 1).
    /// AttributeError on failslab.
    #[getter]
    fn min_order(&self) -> PyResult<u32> {
        Ok(self.get("min-order")? as u32)
    }
    #[setter]
    fn set_min_order(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set("min-order", v)
    }
    /// The debugfs files this attribute has, by their kernel names.
    fn files(&self) -> Vec<&'static str> {
        self.attr().files()
    }
    /// A file by its debugfs name (`attr["ignore-gfp-wait"]`): a bool for Y/N files, else an int.
    fn __getitem__<'py>(&self, py: Python<'py>, file: &str) -> PyResult<Bound<'py, PyAny>> {
        let is_bool = self.attr().is_bool(file).map_err(|e| PyKeyError::new_err(e.to_string()))?;
        let v = self.get(file)?;
        if is_bool {
            (v != 0).into_bound_py_any(py)
        } else {
            v.into_bound_py_any(py)
        }
    }
    /// Write a file by its debugfs name.
    fn __setitem__(&self, file: &str, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.attr().is_bool(file).map_err(|e| PyKeyError::new_err(e.to_string()))?;
        self.set(file, v)
    }
    fn __repr__(&self) -> PyResult<String> {
        let mut parts = Vec::new();
        for f in self.attr().files() {
            let v = self.get(f)?;
            let shown = if self.attr().is_bool(f).unwrap_or(false) {
                (if v != 0 { "Y" } else { "N" }).to_string()
            } else {
                v.to_string()
            };
            parts.push(format!("{f}={shown}"));
        }
        Ok(format!("<FaultAttr {}: {}>", self.kind.name(), parts.join(" ")))
    }
}

#[pymethods]
impl PyMachine {
    /// The fault attribute `name` ("failslab" or "fail_page_alloc"), whose
    /// attributes read and write /sys/kernel/debug/<name>/'s files:
    /// `m.fault_attr("failslab").probability = 10`. Decisions come from a
    /// random stream seeded by the machine's seed.
    fn fault_attr(&self, name: &str) -> PyResult<PyFaultAttr> {
        let kind = match name {
            "failslab" => FaultKind::Failslab,
            "fail_page_alloc" => FaultKind::FailPageAlloc,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "no fault attribute {name:?} (kmm has failslab and fail_page_alloc)"
                )))
            }
        };
        Ok(PyFaultAttr { m: self.m.clone(), kind })
    }
    /// The calling thread's fail-nth (/proc/thread-self/fail-nth): set it to
    /// N and the N-th fault-injection point this thread reaches fails (any
    /// probability; the attributes' ignore-gfp-wait, min-order and the like
    /// still pick the points); it reads 0 once the failure was injected, or
    /// how many points are left. 0 switches it off.
    #[getter]
    fn fail_nth(&self) -> u32 {
        self.m.faults.fail_nth()
    }
    #[setter]
    fn set_fail_nth(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        if v.is_instance_of::<PyBool>() || !v.is_instance_of::<PyInt>() {
            return Err(PyTypeError::new_err(format!("fail_nth must be an int, not {}", v.get_type().name()?)));
        }
        let n: i128 = v.extract()?;
        let n = u32::try_from(n)
            .map_err(|_| PyValueError::new_err(format!("fail_nth: {n} is out of range (0 .. {})", u32::MAX)))?;
        self.m.faults.set_fail_nth(n);
        Ok(())
    }
}
