//! KASAN's stack hook: the Python call sites of the calling thread, for
//! the allocation and free stacks and the header of KASAN reports
//! (`kmm_core::kasan`). Conversion only.
//!
//! Saving a stack keeps each frame's code object and bytecode offset
//! (`f_lasti`), deduplicated like the kernel's stack depot; names and line
//! numbers are worked out only when a report prints the stack.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use kmm_core::kasan::{Frame, Stack};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// Frames kept per stack (the kernel's KASAN_STACK_DEPTH is 64).
const DEPTH: usize = 8;

/// A saved Python stack: (code object, f_lasti), innermost first.
struct PyStack {
    frames: Vec<(Py<PyAny>, i64)>,
}

impl Stack for PyStack {
    fn frames(&self) -> Vec<Frame> {
        Python::attach(|py| self.frames.iter().map(|(code, lasti)| resolve(py, code.bind(py), *lasti)).collect())
    }
}

/// "func+0xline" and "file.py:line" of an offset in a code object.
fn resolve(py: Python<'_>, code: &Bound<'_, PyAny>, lasti: i64) -> Frame {
    let name: String = code
        .getattr(pyo3::intern!(py, "co_qualname"))
        .and_then(|n| n.extract())
        .unwrap_or_else(|_| "?".into());
    let file: String = code.getattr(pyo3::intern!(py, "co_filename")).and_then(|n| n.extract()).unwrap_or_default();
    let file = file.rsplit('/').next().unwrap_or(&file).to_string();
    let line = line_of(code, lasti).unwrap_or(0);
    Frame { ip: format!("{name}+{line:#x}"), loc: format!("{file}:{line}") }
}

/// The line `code.co_lines()` gives for the instruction at `lasti`.
fn line_of(code: &Bound<'_, PyAny>, lasti: i64) -> Option<i64> {
    for r in code.call_method0("co_lines").ok()?.try_iter().ok()? {
        let (start, end, line): (i64, i64, Option<i64>) = r.ok()?.extract().ok()?;
        if start <= lasti && lasti < end {
            return line;
        }
    }
    None
}

type Key = Vec<(usize, i64)>;

/// The depot: one `PyStack` per distinct stack.
fn depot() -> &'static Mutex<HashMap<Key, Arc<PyStack>>> {
    static D: OnceLock<Mutex<HashMap<Key, Arc<PyStack>>>> = OnceLock::new();
    D.get_or_init(Default::default)
}

/// The calling thread's Python stack (None when it has no Python frame).
pub(crate) fn stack_hook() -> Option<Arc<dyn Stack>> {
    if crate::gil::exiting() {
        return None; // interpreter exit: no Python from inside kmm (gil.rs)
    }
    Python::attach(|py| save(py).ok().flatten())
}

fn save(py: Python<'_>) -> PyResult<Option<Arc<dyn Stack>>> {
    static GETFRAME: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let gf = GETFRAME.get_or_try_init(py, || py.import("sys")?.getattr("_getframe").map(Bound::unbind))?;
    let mut f = gf.bind(py).call1((0,))?;
    let mut raw: Vec<(Bound<'_, PyAny>, i64)> = Vec::with_capacity(DEPTH);
    for _ in 0..DEPTH {
        let code = f.getattr(pyo3::intern!(py, "f_code"))?;
        let lasti: i64 = f.getattr(pyo3::intern!(py, "f_lasti"))?.extract()?;
        raw.push((code, lasti));
        let back = f.getattr(pyo3::intern!(py, "f_back"))?;
        if back.is_none() {
            break;
        }
        f = back;
    }
    if raw.is_empty() {
        return Ok(None);
    }
    let key: Key = raw.iter().map(|(c, l)| (c.as_ptr() as usize, *l)).collect();
    let mut d = depot().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = d.get(&key) {
        return Ok(Some(s.clone()));
    }
    let s = Arc::new(PyStack { frames: raw.into_iter().map(|(c, l)| (c.unbind(), l)).collect() });
    d.insert(key, s.clone());
    Ok(Some(s))
}
