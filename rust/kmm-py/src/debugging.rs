//! The debugging modes' Python face: slub_debug's `validate` and traces
//! views on KmemCache, the kernel log, kmemleak's scan and report; and the
//! Python stack walker the core records callers with.

use std::sync::{Arc, OnceLock};

use kmm_core::slab::{TRACK_ALLOC, TRACK_FREE};
use kmm_core::stackdepot::{Frames, MAX_FRAMES};
use kmm_core::trace::CallSite;
use kmm_core::KmmError;
use pyo3::prelude::*;

use crate::machine::{PyMachine, PyProc};
use crate::slab::{alloc_err, call_site, PyBlock, PyKmemCache};
use crate::to_py_err;

/// The directory of the `kmm` package: its frames are kmm's, not the caller's.
fn kmm_dir(py: Python<'_>) -> &'static str {
    static DIR: OnceLock<String> = OnceLock::new();
    DIR.get_or_init(|| {
        py.import("kmm")
            .and_then(|k| k.getattr("__file__"))
            .and_then(|f| f.extract::<String>())
            .ok()
            .and_then(|f| std::path::Path::new(&f).parent().map(|d| format!("{}/", d.display())))
            .unwrap_or_else(|| "\0".into())
    })
}

/// (code object address, line) -> (the code object, its frame text; None
/// for kmm's own frames).
type FrameNames = std::collections::HashMap<(usize, u32), (std::mem::ManuallyDrop<Py<PyAny>>, Option<CallSite>)>;

fn python_stack(py: Python<'_>) -> PyResult<Frames> {
    // One formatted frame per (code object, line), cached per thread: the
    // walk then costs three attribute reads per frame and no allocation
    // but the result. A code object's address could be reused after it is
    // freed; the cache keeps the code object itself alive to rule that out
    // (ManuallyDrop: never released from a thread-exit destructor, without
    // the GIL; released with the GIL held when the cache is emptied).
    thread_local! {
        static NAMES: std::cell::RefCell<FrameNames> =
            std::cell::RefCell::new(std::collections::HashMap::new());
    }
    let dir = kmm_dir(py);
    let mut v: Vec<CallSite> = Vec::new();
    let mut f = py.import(pyo3::intern!(py, "sys"))?.getattr(pyo3::intern!(py, "_getframe"))?.call1((0,))?;
    while !f.is_none() && v.len() < MAX_FRAMES {
        let code = f.getattr(pyo3::intern!(py, "f_code"))?;
        let line: u32 = f.getattr(pyo3::intern!(py, "f_lineno"))?.extract().unwrap_or(0);
        let key = (code.as_ptr() as usize, line);
        let hit = NAMES.with(|n| n.borrow().get(&key).map(|(_, s)| s.clone()));
        let site = match hit {
            Some(s) => s,
            None => {
                let file: String = code.getattr(pyo3::intern!(py, "co_filename"))?.extract()?;
                let site = if file.starts_with(dir) {
                    None
                } else {
                    let name: String = code
                        .getattr(pyo3::intern!(py, "co_qualname"))
                        .or_else(|_| code.getattr(pyo3::intern!(py, "co_name")))?
                        .extract()?;
                    Some(CallSite::from(format!("{name}+{line:#x}").as_str()))
                };
                NAMES.with(|n| {
                    let mut n = n.borrow_mut();
                    if n.len() >= 1 << 16 {
                        // Bounded: a program with endless code objects.
                        for (_, (c, _)) in n.drain() {
                            drop(std::mem::ManuallyDrop::into_inner(c));
                        }
                    }
                    n.insert(key, (std::mem::ManuallyDrop::new(code.clone().unbind()), site.clone()));
                });
                site
            }
        };
        if let Some(s) = site {
            v.push(s);
        }
        f = f.getattr(pyo3::intern!(py, "f_back"))?;
    }
    Ok(v.into())
}

/// The core's stack hook: the calling thread's Python stack, innermost
/// frame first (empty when the thread runs no Python code).
pub(crate) fn stack_hook() -> Frames {
    if crate::gil::exiting() {
        return Arc::from(Vec::new()); // interpreter exit: no Python from inside kmm (gil.rs)
    }
    Python::attach(|py| python_stack(py).unwrap_or_else(|_| Arc::from(Vec::new())))
}

#[pymethods]
impl PyKmemCache {
    /// Write 1 to /sys/kernel/slab/<cache>/validate: check every slab on the
    /// node's lists (free pointers, counts, red zones, poison, padding) and
    /// repair what is wrong. Returns the errors found, counted as
    /// lib/slub_kunit.c counts them (one per detection, one per FIX); the
    /// report is in `m.dmesg()`. ValueError for a cache without debugging,
    /// as the kernel answers EINVAL. GIL released.
    fn validate(&self, py: Python<'_>) -> PyResult<u32> {
        if !self.c.is_debug() {
            return Err(to_py_err(KmmError::InvalidArgument(format!(
                "echo 1 > /sys/kernel/slab/{}/validate: Invalid argument (the cache has no slub_debug flags)",
                self.c.name
            ))));
        }
        let (m, c) = (self.m.clone(), self.c.clone());
        Ok(crate::gil::detach(py, move || c.validate(&m)).0)
    }
    /// /sys/kernel/debug/slab/<cache>/alloc_traces: the allocated objects
    /// grouped by where they were allocated (SLAB_STORE_USER caches only).
    fn alloc_traces(&self) -> PyResult<String> {
        self.traces(TRACK_ALLOC, "alloc_traces")
    }
    /// /sys/kernel/debug/slab/<cache>/free_traces: the allocated objects
    /// grouped by where they were last freed.
    fn free_traces(&self) -> PyResult<String> {
        self.traces(TRACK_FREE, "free_traces")
    }
    /// `kmalloc` of `size` bytes from this cache (`__kmalloc_cache_noprof`):
    /// a Block of `size` bytes; with SLAB_KMALLOC | SLAB_STORE_USER the
    /// bytes from `size` to the object size are a red zone.
    #[pyo3(signature = (size, gfp=kmm_core::gfp::GFP_KERNEL))]
    fn kmalloc(&self, py: Python<'_>, size: u64, gfp: u32) -> PyResult<PyBlock> {
        let cs = call_site(py, &self.m);
        match self.m.kmalloc_cache(&self.c, size, gfp, &cs) {
            Ok(a) => Ok(PyBlock::new(&self.m, a.0, size as usize)),
            Err(e) => Err(alloc_err(py, e)),
        }
    }
}

impl PyKmemCache {
    fn traces(&self, which: u64, file: &str) -> PyResult<String> {
        if self.c.flags & kmm_core::slab::geometry::SLAB_STORE_USER == 0 {
            return Err(to_py_err(KmmError::InvalidArgument(format!(
                "/sys/kernel/debug/slab/{}/{file} does not exist: the cache does not store users (slub_debug=U, SLAB_STORE_USER)",
                self.c.name
            ))));
        }
        Ok(self.c.traces(&self.m, which))
    }
}

#[pymethods]
impl PyMachine {
    /// Errors slub_debug has reported since boot (checks at alloc and free,
    /// validate, kmem_cache_destroy's leftovers), counted as
    /// lib/slub_kunit.c counts `slab_errors`: one per detection, one per FIX.
    #[getter]
    fn slab_errors(&self) -> u64 {
        self.m.slab.errors.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// `print_tainted()`: "Not tainted", or the taint letters (B after a
    /// slab corruption report, W after a WARN).
    #[getter]
    fn tainted(&self) -> String {
        self.m.printk.tainted()
    }
    /// The kernel log (`dmesg`): slub_debug's reports and repairs, kmemleak's
    /// summaries. `clear=True` empties it after reading (`dmesg -c`).
    #[pyo3(signature = (clear=false))]
    fn dmesg(&self, clear: bool) -> String {
        let s = self.m.dmesg();
        if clear {
            self.m.printk.clear();
        }
        s
    }
    /// "echo scan > /sys/kernel/debug/kmemleak" (kmemleak=on): look for
    /// allocated objects nothing references. Roots: what Python holds (live
    /// Blocks, ints, 8-byte integer arrays), per-CPU areas, vmalloc'd
    /// memory; then the objects they reference, recursively. Objects
    /// younger than 5 s of simulated time (`m.time_ns`) are not reported,
    /// and a new leak usually needs two scans (the first records its
    /// checksum), as in the kernel. Returns the new suspected leaks.
    fn kmemleak_scan(slf: &Bound<'_, Self>) -> PyResult<usize> {
        let py = slf.py();
        let m = slf.get().m.clone();
        if !m.kmemleak.enabled {
            return Err(to_py_err(m.kmemleak_scan(&[]).expect_err("kmemleak is off")));
        }
        let roots: Vec<u64> = py.import("kmm.kmemleak")?.getattr("python_roots")?.call1((slf,))?.extract()?;
        crate::gil::detach(py, move || m.kmemleak_scan(&roots)).map_err(to_py_err)
    }
    /// "echo clear > /sys/kernel/debug/kmemleak": forget the leaks reported
    /// so far (they are never reported again).
    fn kmemleak_clear(&self) -> PyResult<()> {
        self.m.kmemleak_clear().map_err(to_py_err)
    }
    /// `kmemleak_not_leak(obj)`: never report this object.
    fn kmemleak_not_leak(&self, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        let a = match obj.cast::<PyBlock>() {
            Ok(b) => b.get().addr,
            Err(_) => obj.extract::<u64>()?,
        };
        self.m.kmemleak_not_leak(a).map_err(to_py_err)
    }
}

#[pymethods]
impl PyProc {
    /// /sys/kernel/debug/kmemleak: the suspected leaks of the last scans
    /// (kmemleak=on), in the kernel's format.
    fn kmemleak(&self) -> PyResult<String> {
        self.m.kmemleak_report().map_err(to_py_err)
    }
}
