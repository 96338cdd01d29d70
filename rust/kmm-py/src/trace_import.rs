//! Trace import, `perf kmem stat` and replay for Python: conversions and GIL
//! release around `kmm_core::trace::{perf_script, stat}`.

use std::sync::Arc;

use kmm_core::trace::kallsyms::Kallsyms;
use kmm_core::trace::perf_data::{self, Content};
use kmm_core::trace::perf_script::{ParseError, Parser, TraceLog};
use kmm_core::trace::replay::{fragmentation_index, replay_bundle, unusable_free_index, ReplayOptions};
use kmm_core::trace::stat::{kmem_stat, page_keys, slab_keys, KmemStat, StatOptions};
use kmm_core::trace::Value;
use parking_lot::Mutex;
use pyo3::exceptions::{PyIndexError, PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::machine::PyMachine;
use crate::to_py_err;

use crate::errors::TraceFormatError;

fn parse_err(py: Python<'_>, e: ParseError) -> PyErr {
    let err = TraceFormatError::new_err(e.to_string());
    let _ = err.value(py).setattr("line", e.line);
    err
}

/// What a file's first bytes look like: "perf.data", "text", or (for
/// anything else) a sentence saying what it looks like and what would work.
#[pyfunction]
pub(crate) fn sniff_trace(head: &[u8]) -> (String, Option<String>) {
    match perf_data::sniff(head) {
        Content::PerfData => ("perf.data".into(), None),
        Content::Text => ("text".into(), None),
        Content::NotATrace(m) => ("none".into(), Some(m)),
    }
}

/// Decode a perf.data held in `data` (GIL released). `kallsyms`: the
/// recorded boot's /proc/kallsyms text, to name call sites. Errors are
/// TraceFormatError with `offset` (byte in the file) or `kallsyms_line` set.
#[pyfunction]
#[pyo3(signature = (data, kallsyms=None, lenient=false))]
pub(crate) fn parse_perf_data(py: Python<'_>, data: &[u8], kallsyms: Option<&[u8]>, lenient: bool) -> PyResult<PyTraceLog> {
    let r = crate::gil::detach(py, || -> Result<TraceLog, (String, Option<u64>, Option<u64>)> {
        let ks = match kallsyms {
            Some(k) => Some(Kallsyms::parse(k).map_err(|e| (e.message.clone(), None, Some(e.line)))?),
            None => None,
        };
        let o = perf_data::Options { kallsyms: ks.as_ref(), lenient };
        perf_data::parse(data, &o).map_err(|e| (e.message, e.offset, None))
    });
    match r {
        Ok(log) => Ok(PyTraceLog { log: Arc::new(log) }),
        Err((msg, offset, kline)) => {
            let text = match (offset, kline) {
                (Some(o), _) => format!("byte {o}: {msg}"),
                (None, Some(l)) => format!("kallsyms line {l}: {msg}"),
                _ => msg,
            };
            let err = TraceFormatError::new_err(text);
            let v = err.value(py);
            let _ = v.setattr("offset", offset);
            let _ = v.setattr("kallsyms_line", kline);
            Err(err)
        }
    }
}

/// A fragmentation sample as Python tuples: (event, used_pages, zones).
type SampleTuple<'a> = (u64, u64, Vec<(&'a str, Vec<u64>, Vec<i64>, Vec<i64>)>);

fn set_value<'py>(d: &Bound<'py, PyDict>, k: &str, v: Value) -> PyResult<()> {
    match v {
        Value::Int(i) => d.set_item(k, i),
        Value::UInt(u) => d.set_item(k, u),
        Value::Str(s) => d.set_item(k, s),
        Value::Bool(b) => d.set_item(k, b),
    }
}

/// A streaming parser for `perf script` / `trace_pipe` text: `feed(bytes)`
/// chunks (parsed with the GIL released), then `finish()`.
#[pyclass(frozen, name = "TraceParser", module = "kmm._kmm")]
pub struct PyTraceParser {
    inner: Mutex<Option<Parser>>,
}

#[pymethods]
impl PyTraceParser {
    #[new]
    #[pyo3(signature = (lenient=false))]
    fn new(lenient: bool) -> Self {
        PyTraceParser { inner: Mutex::new(Some(Parser::new(lenient))) }
    }
    /// Parse the complete lines of `data`; a partial last line waits for the next chunk.
    fn feed(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let r = crate::gil::detach(py, || match self.inner.lock().as_mut() {
            Some(p) => Ok(p.feed(data)),
            None => Err(()),
        });
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(parse_err(py, e)),
            Err(()) => Err(PyValueError::new_err("parser already finished")),
        }
    }
    /// Parse what is left and return the trace.
    fn finish(&self, py: Python<'_>) -> PyResult<PyTraceLog> {
        let p = self.inner.lock().take().ok_or_else(|| PyValueError::new_err("parser already finished"))?;
        let log = crate::gil::detach(py, || p.finish()).map_err(|e| parse_err(py, e))?;
        Ok(PyTraceLog { log: Arc::new(log) })
    }
    /// Bytes fed so far.
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.lock().as_ref().map_or(0, |p| p.bytes())
    }
    /// Events parsed so far.
    #[getter]
    fn events(&self) -> usize {
        self.inner.lock().as_ref().map_or(0, |p| p.events())
    }
}

/// A parsed trace: a sequence of events, with counts per event name.
#[pyclass(frozen, name = "TraceLog", module = "kmm._kmm", sequence)]
pub struct PyTraceLog {
    pub(crate) log: Arc<TraceLog>,
}

#[pymethods]
impl PyTraceLog {
    fn __len__(&self) -> usize {
        self.log.len()
    }
    fn __getitem__(&self, i: isize) -> PyResult<PyTraceEvent> {
        let n = self.log.len() as isize;
        let j = if i < 0 { i + n } else { i };
        if j < 0 || j >= n {
            return Err(PyIndexError::new_err("event index out of range"));
        }
        Ok(PyTraceEvent { log: self.log.clone(), i: j as usize })
    }
    /// Events per `system:event` name.
    fn counts(&self) -> Vec<(String, u64)> {
        self.log.counts()
    }
    /// Events whose name is not a tracepoint kmm knows (kept, not decoded).
    #[getter]
    fn unknown(&self) -> u64 {
        self.log.unknown
    }
    /// Malformed lines skipped in lenient mode.
    #[getter]
    fn skipped(&self) -> u64 {
        self.log.skipped
    }
    /// The first skipped lines: (line number, reason).
    #[getter]
    fn skipped_examples(&self) -> Vec<(u64, String)> {
        self.log.skipped_examples.clone()
    }
    /// Lines read.
    #[getter]
    fn lines(&self) -> u64 {
        self.log.lines
    }
    /// Events the kernel reported lost (ftrace `CPU:N [LOST M EVENTS]`;
    /// perf.data: the events its PERF_RECORD_LOST records count).
    #[getter]
    fn lost_events(&self) -> u64 {
        self.log.lost_events
    }
    /// perf.data: PERF_RECORD_LOST records ("chunks" perf lost).
    #[getter]
    fn lost_chunks(&self) -> u64 {
        self.log.lost_chunks
    }
    /// perf.data: each lost chunk as (cpu, ns when perf wrote it, events lost).
    #[getter]
    fn lost_records(&self) -> Vec<(u32, u64, u64)> {
        self.log.lost_records.clone()
    }
    /// perf.data: samples counted by PERF_RECORD_LOST_SAMPLES records.
    #[getter]
    fn lost_samples(&self) -> u64 {
        self.log.lost_samples
    }
    /// perf.data: the byte offset where a truncated file ended (None if whole).
    #[getter]
    fn truncated_at(&self) -> Option<u64> {
        self.log.truncated_at
    }
    /// The first event where this trace and `other` differ: (index, what),
    /// or None. `ts_unit_ns`: compare timestamps in these units.
    #[pyo3(signature = (other, ts_unit_ns=1))]
    fn first_difference(&self, py: Python<'_>, other: PyRef<'_, PyTraceLog>, ts_unit_ns: u64) -> Option<(usize, String)> {
        let (a, b) = (self.log.clone(), other.log.clone());
        crate::gil::detach(py, move || perf_data::first_difference(&a, &b, ts_unit_ns))
    }
    /// The violated invariants of the parsed trace (empty when sound).
    fn check(&self) -> Vec<String> {
        self.log.check()
    }
    /// `perf kmem stat` numbers (computed with the GIL released).
    #[pyo3(signature = (page_size=4096))]
    fn kmem_stat(&self, py: Python<'_>, page_size: u64) -> PyKmemStat {
        let log = self.log.clone();
        PyKmemStat { st: crate::gil::detach(py, move || kmem_stat(&log, page_size)) }
    }
    /// Replay the trace on `machine` (GIL released); returns the report as a dict.
    #[pyo3(signature = (machine, sample_every=1000, free_at_end=false, bundle=None, time=true))]
    fn replay<'py>(
        &self,
        py: Python<'py>,
        machine: PyRef<'py, PyMachine>,
        sample_every: u64,
        free_at_end: bool,
        bundle: Option<PyRef<'py, crate::bundle::PyBundle>>,
        time: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (log, m) = (self.log.clone(), machine.m.clone());
        let b = bundle.map(|b| b.bundle.clone());
        let o = ReplayOptions { sample_every, free_at_end, time, ..Default::default() };
        let r = crate::gil::detach(py, move || replay_bundle(&log, &m, &o, b.as_deref())).map_err(to_py_err)?;
        let d = PyDict::new(py);
        d.set_item("machine_notes", r.machine_notes.clone())?;
        d.set_item("warm", r.warm)?;
        d.set_item("timer_runs", r.timer_runs)?;
        d.set_item("sim_ns", r.sim_ns)?;
        d.set_item("warnings", r.warnings.clone())?;
        let dynamics: Vec<(String, String, u64, u64, u64)> =
            r.dynamics.iter().map(|x| (x.what.clone(), x.tracepoint.clone(), x.kernel, x.kmm, x.kmm_in_lost)).collect();
        d.set_item("dynamics", dynamics)?;
        d.set_item("lost_stretches", r.lost_stretches.clone())?;
        d.set_item("page_alloc_orders", r.page_alloc_orders.clone())?;
        d.set_item("zone_lock_acquisitions", r.zone_lock_acquisitions)?;
        let ends = pyo3::types::PyList::empty(py);
        for z in &r.end_state {
            let zd = PyDict::new(py);
            zd.set_item("zone", &z.zone)?;
            zd.set_item("kernel", z.kernel.clone())?;
            zd.set_item("kmm", z.kmm.clone())?;
            zd.set_item("by_type", z.by_type.clone())?;
            zd.set_item("kernel_free_pages", z.kernel_free_pages)?;
            zd.set_item("kmm_free_pages", z.kmm_free_pages)?;
            zd.set_item("distance", z.distance)?;
            ends.append(zd)?;
        }
        d.set_item("end_state", ends)?;
        type Point = (u64, u64, Vec<(String, u64, u64, f64)>);
        let traj: Vec<Point> =
            r.trajectory.iter().map(|t| (t.ts_ns, t.event, t.zones.clone())).collect();
        d.set_item("trajectory", traj)?;
        d.set_item("events", r.events)?;
        d.set_item("replayed", r.replayed)?;
        d.set_item("replayed_by_name", r.replayed_by_name.clone())?;
        d.set_item("before_trace", r.before_trace)?;
        d.set_item("null_frees", r.null_frees)?;
        d.set_item("failed_in_trace", r.failed_in_trace)?;
        d.set_item("slab_pages", r.slab_pages)?;
        d.set_item("slab_page_allocs", r.slab_page_allocs)?;
        d.set_item("consequences", r.consequences)?;
        d.set_item("vmalloc", r.vmalloc)?;
        d.set_item("other", r.other)?;
        d.set_item("reused_live", r.reused_live)?;
        d.set_item("kmm_failures", r.kmm_failures)?;
        d.set_item("kmm_failure_examples", r.kmm_failure_examples.clone())?;
        d.set_item("bytes_alloc_checked", r.bytes_alloc_checked)?;
        d.set_item("bytes_alloc_mismatches", r.bytes_alloc_mismatches)?;
        d.set_item("zone_checked", r.zone_checked)?;
        d.set_item("zone_mismatches", r.zone_mismatches)?;
        d.set_item("zone_pairs", r.zone_pairs.clone())?;
        let mm: Vec<(u64, String, String, String)> =
            r.mismatch_examples.iter().map(|x| (x.event, x.what.clone(), x.kernel.clone(), x.kmm.clone())).collect();
        d.set_item("mismatch_examples", mm)?;
        d.set_item("caches_created", r.caches_created.clone())?;
        d.set_item("trace_cpus_remapped", r.trace_cpus_remapped)?;
        d.set_item("seconds", r.seconds)?;
        d.set_item("events_per_second", r.events_per_second())?;
        d.set_item("peak_used_pages", r.peak_used_pages)?;
        d.set_item("boot_used_pages", r.boot_used_pages)?;
        d.set_item("final_used_pages", r.final_used_pages)?;
        d.set_item("live_at_end", r.live_at_end)?;
        // samples: (event, used_pages, [(zone, nr_free, unusable, fragindex)])
        let samples: Vec<SampleTuple<'_>> = r
            .samples
            .iter()
            .map(|s| {
                let zones = s
                    .zones
                    .iter()
                    .map(|z| {
                        let n = z.nr_free.len();
                        (
                            z.zone,
                            z.nr_free.to_vec(),
                            (0..n).map(|o| unusable_free_index(&z.nr_free, o)).collect(),
                            (0..n).map(|o| fragmentation_index(&z.nr_free, o)).collect(),
                        )
                    })
                    .collect();
                (s.event, s.used_pages, zones)
            })
            .collect();
        d.set_item("samples", samples)?;
        Ok(d)
    }
    fn __repr__(&self) -> String {
        format!("<TraceLog: {} events, {} unknown, {} skipped lines>", self.log.len(), self.log.unknown, self.log.skipped)
    }
}

/// One imported event: name, cpu, timestamp (ns), comm, pid and fields.
#[pyclass(frozen, name = "TraceEvent", module = "kmm._kmm")]
pub struct PyTraceEvent {
    log: Arc<TraceLog>,
    i: usize,
}

#[pymethods]
impl PyTraceEvent {
    /// `system:name`, e.g. "kmem:kmalloc".
    #[getter]
    fn name(&self) -> &str {
        self.log.name(self.i)
    }
    /// The CPU the event was recorded on.
    #[getter]
    fn cpu(&self) -> u32 {
        self.log.events[self.i].cpu
    }
    /// Nanoseconds, from the trace's timestamp.
    #[getter]
    fn timestamp(&self) -> u64 {
        self.log.events[self.i].ts_ns
    }
    /// The task's command name, as perf script prints it.
    #[getter]
    fn comm(&self) -> &str {
        self.log.comm(self.i)
    }
    /// The task's pid (tid), as perf script prints it.
    #[getter]
    fn pid(&self) -> u32 {
        self.log.events[self.i].pid
    }
    /// The fields, by the kernel's names.
    #[getter]
    fn fields<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.log.fields(self.i) {
            set_value(&d, &k, v)?;
        }
        Ok(d)
    }
    fn __getitem__(&self, key: &str, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self.fields(py)?.get_item(key)? {
            Some(v) => Ok(v.unbind()),
            None => Err(PyKeyError::new_err(key.to_string())),
        }
    }
    fn __repr__(&self) -> String {
        format!("<TraceEvent {} cpu={} ts={}>", self.log.name(self.i), self.cpu(), self.timestamp())
    }
}

/// The numbers of `perf kmem --slab stat` and `perf kmem --page stat`.
#[pyclass(frozen, name = "KmemStat", module = "kmm._kmm")]
pub struct PyKmemStat {
    st: KmemStat,
}

#[pymethods]
impl PyKmemStat {
    /// The violated invariants of the statistics (empty when sound).
    fn check(&self) -> Vec<String> {
        self.st.check()
    }
    /// The slab summary numbers.
    fn slab_summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.st.slab;
        let d = PyDict::new(py);
        d.set_item("total_requested", s.total_requested)?;
        d.set_item("total_allocated", s.total_allocated)?;
        d.set_item("total_freed", s.total_freed)?;
        d.set_item("nr_allocs", s.nr_allocs)?;
        d.set_item("nr_cross_allocs", s.nr_cross_allocs)?;
        d.set_item("fragmentation", s.fragmentation())?;
        Ok(d)
    }
    /// The page summary numbers (bytes, not KB).
    fn page_summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = &self.st.page;
        let d = PyDict::new(py);
        d.set_item("page_size", p.page_size)?;
        d.set_item("nr_page_allocs", p.nr_page_allocs)?;
        d.set_item("nr_page_frees", p.nr_page_frees)?;
        d.set_item("nr_page_fails", p.nr_page_fails)?;
        d.set_item("nr_page_nomatch", p.nr_page_nomatch)?;
        d.set_item("nr_alloc_freed", p.nr_alloc_freed())?;
        d.set_item("total_page_alloc_bytes", p.total_page_alloc_bytes)?;
        d.set_item("total_page_free_bytes", p.total_page_free_bytes)?;
        d.set_item("total_page_fail_bytes", p.total_page_fail_bytes)?;
        d.set_item("total_page_nomatch_bytes", p.total_page_nomatch_bytes)?;
        d.set_item("total_alloc_freed_bytes", p.total_alloc_freed_bytes())?;
        d.set_item("order_stats", p.order_stats.iter().map(|r| r.to_vec()).collect::<Vec<_>>())?;
        Ok(d)
    }
    /// perf's text for these options (`sort`: perf's -s keys; `lines`: -l, None = all).
    #[pyo3(signature = (slab=true, page=true, caller=false, alloc=false, sort=None, lines=None))]
    fn format(
        &self,
        slab: bool,
        page: bool,
        caller: bool,
        alloc: bool,
        sort: Option<&str>,
        lines: Option<i64>,
    ) -> PyResult<String> {
        let lines = lines.unwrap_or(-1);
        let mut o = StatOptions { slab, page, caller, alloc, lines, ..Default::default() };
        if let Some(keys) = sort {
            if slab {
                o.slab_sort = slab_keys(keys).map_err(PyValueError::new_err)?;
            }
            if page {
                o.page_sort = page_keys(keys).map_err(PyValueError::new_err)?;
            }
        }
        Ok(self.st.format(&o))
    }
}
