//! Trace events for Python: per-event callbacks and recordings.

use std::sync::Arc;

use kmm_core::trace::{mask_for, Event, Recorder, Value};
use kmm_core::Machine;
use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

fn check_mask(pattern: &str) -> PyResult<u64> {
    let mask = mask_for(pattern);
    if mask == 0 {
        return Err(PyValueError::new_err(format!(
            "no tracepoint matches '{pattern}' (see Trace.available())"
        )));
    }
    Ok(mask)
}

/// One trace event: name, cpu, timestamp (ns since boot) and the kernel's fields.
#[pyclass(frozen, name = "Event", module = "kmm._kmm")]
pub struct PyEvent {
    ev: Event,
}

#[pymethods]
impl PyEvent {
    /// `system:name`, e.g. "kmem:mm_page_alloc".
    #[getter]
    fn name(&self) -> &'static str {
        self.ev.name()
    }
    /// The CPU the event happened on.
    #[getter]
    fn cpu(&self) -> u32 {
        self.ev.cpu
    }
    /// Nanoseconds since the machine booted.
    #[getter]
    fn timestamp(&self) -> u64 {
        self.ev.ts_ns
    }
    /// The fields, by the kernel's names.
    #[getter]
    fn fields<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.ev.payload.fields() {
            match v {
                Value::Int(i) => d.set_item(k, i)?,
                Value::UInt(u) => d.set_item(k, u)?,
                Value::Str(s) => d.set_item(k, s)?,
                Value::Bool(b) => d.set_item(k, b)?,
            }
        }
        Ok(d)
    }
    /// The `TP_printk` text.
    #[getter]
    fn text(&self) -> String {
        self.ev.payload.text()
    }
    fn __getitem__(&self, key: &str, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let d = self.fields(py)?;
        match d.get_item(key)? {
            Some(v) => Ok(v.unbind()),
            None => Err(pyo3::exceptions::PyKeyError::new_err(key.to_string())),
        }
    }
    /// One `perf script` line for this event.
    #[pyo3(signature = (comm="kmm", pid=0))]
    fn perf_script_line(&self, comm: &str, pid: u32) -> String {
        self.ev.perf_script_line(comm, pid)
    }
    fn __repr__(&self) -> String {
        format!("<Event {}: {}>", self.ev.name(), self.ev.payload.text())
    }
    fn __str__(&self) -> String {
        format!("{}: {}", self.ev.name(), self.ev.payload.text())
    }
}

/// A handle for an attached callback; `detach()` removes it.
#[pyclass(frozen, name = "TraceHandle", module = "kmm._kmm")]
pub struct PyTraceHandle {
    m: Arc<Machine>,
    id: u64,
}

#[pymethods]
impl PyTraceHandle {
    /// Stop calling the callback. Returns False if it was already detached.
    fn detach(&self, py: Python<'_>) -> bool {
        let r = self.m.trace.detach(self.id);
        crate::gil::release_pending(py);
        r
    }
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }
    fn __exit__(&self, py: Python<'_>, _a: Py<PyAny>, _b: Py<PyAny>, _c: Py<PyAny>) -> bool {
        self.detach(py);
        false
    }
}

pub(crate) fn attach(m: &Arc<Machine>, pattern: &str, callback: Py<PyAny>) -> PyResult<PyTraceHandle> {
    let mask = check_mask(pattern)?;
    Python::attach(crate::gil::release_pending);
    // Held: a sink list snapshot may be dropped without the GIL (gil.rs).
    let callback = crate::gil::Held::new(callback);
    let sink = Arc::new(move |e: &Event| {
        if crate::gil::exiting() {
            return; // interpreter exit: no Python from inside kmm (gil.rs)
        }
        Python::attach(|py| {
            let Some(_running) = crate::gil::enter_callback(py) else { return };
            if let Err(err) = callback.get().call1(py, (PyEvent { ev: e.clone() },)) {
                err.write_unraisable(py, Some(callback.get().bind(py)));
            }
        })
    });
    let id = m.trace.attach(mask, sink);
    Ok(PyTraceHandle { m: m.clone(), id })
}

/// Events recorded between `__enter__` and `__exit__` (or `start()`/`stop()`).
#[pyclass(frozen, name = "Recording", module = "kmm._kmm")]
pub struct PyRecording {
    m: Arc<Machine>,
    mask: u64,
    rec: Arc<Recorder>,
    handle: Mutex<Option<u64>>,
    events: Mutex<Vec<Event>>,
}

impl PyRecording {
    pub(crate) fn new(m: &Arc<Machine>, pattern: &str, capacity: u64) -> PyResult<PyRecording> {
        Ok(PyRecording {
            m: m.clone(),
            mask: check_mask(pattern)?,
            rec: Arc::new(Recorder::with_capacity(m.cfg.cpus, capacity)),
            handle: Mutex::new(None),
            events: Mutex::new(Vec::new()),
        })
    }
    fn collect(&self) {
        let new = self.rec.take();
        self.events.lock().extend(new);
    }
}

#[pymethods]
impl PyRecording {
    /// Start recording (idempotent).
    fn start(&self) {
        let mut h = self.handle.lock();
        if h.is_none() {
            *h = Some(self.m.trace.attach(self.mask, self.rec.sink()));
        }
    }
    /// Stop recording (idempotent).
    fn stop(&self) {
        if let Some(id) = self.handle.lock().take() {
            self.m.trace.detach(id);
        }
        self.collect();
    }
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf.get().start();
        slf
    }
    fn __exit__(&self, _a: Py<PyAny>, _b: Py<PyAny>, _c: Py<PyAny>) -> bool {
        self.stop();
        false
    }
    /// The recorded events.
    #[getter]
    fn events(&self) -> Vec<PyEvent> {
        self.collect();
        self.events.lock().iter().map(|e| PyEvent { ev: e.clone() }).collect()
    }
    fn __len__(&self) -> usize {
        self.collect();
        self.events.lock().len()
    }
    /// Events dropped because a CPU's buffer was full (perf's LOST count).
    #[getter]
    fn lost(&self) -> u64 {
        self.rec.lost()
    }
    /// The recording as `perf script` text (one line per event).
    #[pyo3(signature = (comm="kmm", pid=0))]
    fn to_perf_script(&self, comm: &str, pid: u32) -> String {
        self.collect();
        let mut s = String::new();
        for e in self.events.lock().iter() {
            s.push_str(&e.perf_script_line(comm, pid));
            s.push('\n');
        }
        s
    }
}
