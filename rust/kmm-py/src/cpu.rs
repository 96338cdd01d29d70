//! CPU binding and execution contexts for Python: `with m.on_cpu(k)`,
//! `with m.preempt_disabled()`, `with m.atomic()`, `with m.irq()`.

use std::sync::Arc;

use kmm_core::cpu::{HARDIRQ_MASK, HARDIRQ_OFFSET, PREEMPT_MASK, PREEMPT_OFFSET};
use kmm_core::{KmmError, Machine};
use pyo3::prelude::*;

use crate::to_py_err;

/// Wait for a CPU another thread holds (or a pkmap slot) with the GIL
/// released; every 20 ms, with the GIL taken again, look for a Ctrl-C and
/// give up if one came (the SIGINT is re-armed, so KeyboardInterrupt is
/// raised as soon as the call returns to Python, or at once by the
/// caller that gives up: see `errors::to_py_err`).
pub(crate) fn wait_hook(poll: &mut (dyn FnMut() -> bool + Send)) -> bool {
    use std::time::{Duration, Instant};
    if crate::gil::exiting() {
        // Interpreter exit: wait without Python (no Ctrl-C check; gil.rs).
        while !poll() {
            std::thread::sleep(Duration::from_micros(200));
        }
        return true;
    }
    Python::attach(|py| {
        let mut waited = Duration::ZERO;
        loop {
            let done = crate::gil::detach(py, || {
                let t0 = Instant::now();
                loop {
                    if poll() {
                        return true;
                    }
                    let t = t0.elapsed();
                    if t >= Duration::from_millis(20) {
                        return false;
                    }
                    // A long wait: stop burning a host CPU.
                    if waited + t > Duration::from_millis(2) {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            });
            if done {
                return true;
            }
            waited += Duration::from_millis(20);
            // SAFETY: plain C-API calls with the GIL held (attached); they
            // read and set the interpreter's signal flags only.
            if unsafe { pyo3::ffi::PyOS_InterruptOccurred() } != 0 {
                // SAFETY: as above; re-arms the SIGINT just consumed.
                unsafe { pyo3::ffi::PyErr_SetInterrupt() };
                return false;
            }
        }
    })
}

/// `with m.on_cpu(k):` binds the calling thread to CPU k for the block.
#[pyclass(frozen, name = "OnCpu", module = "kmm._kmm")]
pub struct PyOnCpu {
    m: Arc<Machine>,
    cpu: u32,
}

impl PyOnCpu {
    pub(crate) fn new(m: &Arc<Machine>, cpu: u32) -> Self {
        PyOnCpu { m: m.clone(), cpu }
    }
}

#[pymethods]
impl PyOnCpu {
    fn __enter__(&self) -> PyResult<u32> {
        self.m.cpus.bind(self.cpu).map_err(pyo3::exceptions::PyValueError::new_err)?;
        Ok(self.cpu)
    }
    fn __exit__(&self, _a: Py<PyAny>, _b: Py<PyAny>, _c: Py<PyAny>) -> PyResult<bool> {
        self.m.cpus.unbind().map_err(pyo3::exceptions::PyValueError::new_err)?;
        Ok(false)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CtxKind {
    Preempt,
    Irq,
}

/// A preempt-disabled or interrupt section as a context manager.
#[pyclass(frozen, name = "Context", module = "kmm._kmm")]
pub struct PyContext {
    m: Arc<Machine>,
    kind: CtxKind,
}

impl PyContext {
    pub(crate) fn new(m: &Arc<Machine>, kind: CtxKind) -> Self {
        PyContext { m: m.clone(), kind }
    }
}

#[pymethods]
impl PyContext {
    /// Enter: returns the CPU the section runs on.
    fn __enter__(&self) -> PyResult<u32> {
        match self.kind {
            CtxKind::Preempt => self.m.cpus.try_preempt_add(PREEMPT_OFFSET, false),
            CtxKind::Irq => self.m.cpus.try_preempt_add(HARDIRQ_OFFSET, true),
        }
        .map_err(to_py_err)
    }
    fn __exit__(&self, _a: Py<PyAny>, _b: Py<PyAny>, _c: Py<PyAny>) -> PyResult<bool> {
        let r = match self.kind {
            CtxKind::Preempt => self.m.cpus.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false),
            CtxKind::Irq => self.m.cpus.preempt_sub(HARDIRQ_OFFSET, HARDIRQ_MASK, true),
        };
        r.map_err(|e| to_py_err(KmmError::Bug(e)))?;
        Ok(false)
    }
}

/// `with m.get_cpu_var(name) as v:` — preemption disabled, `v` this CPU's copy.
#[pyclass(frozen, name = "CpuVar", module = "kmm._kmm")]
pub struct PyCpuVar {
    m: Arc<Machine>,
    ptr: u64,
}

impl PyCpuVar {
    pub(crate) fn new(m: &Arc<Machine>, ptr: u64) -> Self {
        PyCpuVar { m: m.clone(), ptr }
    }
}

#[pymethods]
impl PyCpuVar {
    fn __enter__(&self) -> PyResult<crate::slab::PyBlock> {
        let cpu = self.m.cpus.try_preempt_add(PREEMPT_OFFSET, false).map_err(to_py_err)?;
        match crate::slab::PyBlock::for_percpu(&self.m, self.ptr, cpu) {
            Ok(b) => Ok(b),
            Err(e) => {
                let _ = self.m.cpus.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false);
                Err(e)
            }
        }
    }
    fn __exit__(&self, _a: Py<PyAny>, _b: Py<PyAny>, _c: Py<PyAny>) -> PyResult<bool> {
        self.m
            .cpus
            .preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false)
            .map_err(|e| to_py_err(KmmError::Bug(e)))?;
        Ok(false)
    }
}
