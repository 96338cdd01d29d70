//! Python references that the core may drop on a thread without the GIL,
//! and Python callbacks from kmm at interpreter exit.
//!
//! kmm builds PyO3 without its global reference pool
//! (`--cfg pyo3_disable_reference_pool`, set in `.cargo/config.toml`): with
//! the pool, every `#[pymethods]` call first locked and unlocked the pool's
//! mutex once any call had released the GIL (~18 ns of a 165 ns `kmalloc` +
//! `kfree` pair from Python, issue 13). Without it, a `Py<T>` must not be
//! dropped by a thread that is not attached to the interpreter.
//!
//! The core keeps Python objects in exactly two kinds of closures: a cache's
//! constructor (`kmem_cache_create(..., ctor=f)`) and a trace callback
//! (`m.trace.attach(pattern, f)`). Both closures can be dropped with the GIL
//! released: a sink list snapshot held by a thread-local cache or by a
//! detached bulk call, a thread-exit destructor, the last `Arc<KmemCache>`.
//! Their Python objects are therefore wrapped in `Held`. Its drop releases
//! the reference at once when the thread is attached (`attached`); on any
//! other thread it queues the pointer, and the queue is emptied with the GIL
//! by `release_pending`, called where callbacks come and go: `Machine(...)`,
//! `kmem_cache_create`, `trace.attach` and `TraceHandle.detach`. Releasing
//! at once may run the object's `__del__`, which may call kmm again: the
//! core drops sink lists only outside its locks (`trace/mod.rs`). Other
//! Python objects kmm-py keeps are never dropped off the GIL: KASAN's saved
//! stacks sit in a depot that is never emptied (`kasan.rs`), the frame-name
//! cache releases its code objects only with the GIL (`debugging.rs`), and
//! `PyOnceLock` statics live for the process.
//!
//! Every GIL release in kmm-py goes through `detach` here, which marks the
//! thread (`DETACHED`): a Python thread inside one of kmm's detached calls
//! keeps its thread state, so CPython's own tests alone cannot tell that it
//! does not hold the GIL when PyGILState_Check is disabled (it then always
//! answers yes: subinterpreters, bpo-26558).
//!
//! Interpreter exit (`quiesce`, an `atexit` handler): from then on kmm
//! calls no Python callback and its hooks do not attach to Python, so a
//! daemon thread that CPython ends at finalization is never inside kmm's
//! frames running Python.
//!
//! Any `Py<T>` dropped detached that this audit missed is leaked, not a
//! crash: the build also sets `pyo3_leak_on_drop_without_reference_pool`.
//! Without those flags (a build with its own `RUSTFLAGS`) PyO3's pool is
//! back and everything here still holds.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::Mutex;
use pyo3::prelude::*;

/// Object pointers whose reference `Held` gave up without the GIL.
static PENDING: Mutex<Vec<usize>> = Mutex::new(Vec::new());
/// `PENDING` is non-empty (read without the lock on every drain point).
static ANY: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Depth of kmm's own GIL releases (`detach`) on this thread.
    static DETACHED: Cell<u32> = const { Cell::new(0) };
}

unsafe extern "C" {
    // In every CPython 3 (pystate.c), not in pyo3-ffi's abi3 set.
    fn PyGILState_Check() -> std::ffi::c_int;
}

/// Does this thread hold the GIL? Conservative: every doubt says no.
/// - `Py_IsInitialized`: false from the start of finalization on (and in
///   thread-exit destructors that run after it);
/// - `PyGILState_GetThisThreadState`: NULL on threads Python does not know
///   (the core's own worker threads) and in a Python thread's exit
///   destructors, which run after its thread state is deleted;
/// - `DETACHED`: inside one of kmm's detached calls (a destroyed flag, in a
///   thread-exit destructor, counts as detached);
/// - `PyGILState_Check`: the thread state is the one holding the GIL.
fn attached() -> bool {
    // SAFETY: these three CPython functions may be called on any thread,
    // with or without the GIL, at any time in the process's life.
    unsafe {
        pyo3::ffi::Py_IsInitialized() != 0
            && !pyo3::ffi::PyGILState_GetThisThreadState().is_null()
            && DETACHED.try_with(|d| d.get() == 0).unwrap_or(false)
            && PyGILState_Check() == 1
    }
}

/// `py.detach(f)`, with this thread marked detached while `f` runs (and
/// while what `f` captured is dropped).
pub(crate) fn detach<T, F>(py: Python<'_>, f: F) -> T
where
    F: Send + FnOnce() -> T,
    T: Send,
{
    struct Mark;
    impl Drop for Mark {
        fn drop(&mut self) {
            let _ = DETACHED.try_with(|d| d.set(d.get().saturating_sub(1)));
        }
    }
    py.detach(move || {
        let _ = DETACHED.try_with(|d| d.set(d.get() + 1));
        let _mark = Mark;
        f()
    })
}

/// A strong reference to a Python object that may be dropped on any thread.
pub(crate) struct Held(Option<Py<PyAny>>);

impl Held {
    pub(crate) fn new(o: Py<PyAny>) -> Held {
        Held(Some(o))
    }
    pub(crate) fn get(&self) -> &Py<PyAny> {
        self.0.as_ref().expect("Held is only emptied by its drop")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(o) = self.0.take() {
            if attached() {
                // SAFETY: this thread holds the GIL (attached), and the
                // reference is ours (into_ptr gives it up without a decref).
                unsafe { pyo3::ffi::Py_DecRef(o.into_ptr()) };
                return;
            }
            // into_ptr hands over the reference without a decref.
            let p = o.into_ptr() as usize;
            PENDING.lock().push(p);
            ANY.store(true, Ordering::Release);
        }
    }
}

/// Drop the references `Held` queued. The caller holds the GIL (`py`).
pub(crate) fn release_pending(py: Python<'_>) {
    if !ANY.load(Ordering::Acquire) {
        return;
    }
    let v = {
        let mut g = PENDING.lock();
        ANY.store(false, Ordering::Relaxed);
        std::mem::take(&mut *g)
    };
    for p in v {
        // SAFETY: each pointer is an owned reference that `Held::drop` gave
        // up (`into_ptr`) and nothing else uses; it is released once, here,
        // with the GIL held.
        drop(unsafe { Bound::<PyAny>::from_owned_ptr(py, p as *mut pyo3::ffi::PyObject) });
    }
}


// ---- interpreter exit ----------------------------------------------------------------

/// Set by `quiesce` (an `atexit` handler): Python is about to finalize.
static FINALIZING: AtomicBool = AtomicBool::new(false);
/// Python callbacks (trace callbacks, ctors) running, called from kmm.
static IN_CALLBACK: AtomicUsize = AtomicUsize::new(0);

/// Has interpreter exit begun (`quiesce` ran)? Hooks that would attach to
/// Python from inside kmm (stack capture, the wait hook) check this first.
pub(crate) fn exiting() -> bool {
    FINALIZING.load(Ordering::Acquire)
}

/// Counts a Python callback kmm is running; see `quiesce`.
pub(crate) struct InCallback(());

impl Drop for InCallback {
    fn drop(&mut self) {
        IN_CALLBACK.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Enter a Python callback from kmm, or None once exit has begun (the
/// callback is then skipped). Called with the GIL held, so that `quiesce`,
/// which sets the flag with the GIL held, sees every callback that began.
pub(crate) fn enter_callback(_py: Python<'_>) -> Option<InCallback> {
    if exiting() {
        return None;
    }
    IN_CALLBACK.fetch_add(1, Ordering::AcqRel);
    Some(InCallback(()))
}

/// `atexit` handler (registered when the extension loads, `register_quiesce`;
/// not a module attribute, so no script can switch callbacks off early):
/// stop calling Python callbacks from kmm, and wait (GIL released, at most
/// one second) for the ones running to return.
///
/// CPython 3.11-3.13 ends a daemon thread that wants the GIL once
/// finalization has begun with `pthread_exit`. If that thread was running a
/// Python callback that kmm called, the forced unwind crossed kmm's and
/// PyO3's frames and the process aborted at exit ("FATAL: exception not
/// rethrown"). After this handler no thread runs Python from inside kmm, so
/// daemon threads end in their own Python code, as any daemon thread does.
fn quiesce(py: Python<'_>) {
    FINALIZING.store(true, Ordering::Release);
    let t0 = std::time::Instant::now();
    while IN_CALLBACK.load(Ordering::Acquire) > 0 && t0.elapsed() < std::time::Duration::from_secs(1) {
        detach(py, || std::thread::sleep(std::time::Duration::from_millis(1)));
    }
}

/// Register `quiesce` with `atexit`, as an anonymous builtin.
pub(crate) fn register_quiesce(py: Python<'_>) -> PyResult<()> {
    let f = pyo3::types::PyCFunction::new_closure(
        py,
        Some(c"kmm_quiesce"),
        Some(c"kmm: stop calling Python callbacks from kmm at interpreter exit"),
        |args: &Bound<'_, pyo3::types::PyTuple>, _kw: Option<&Bound<'_, pyo3::types::PyDict>>| quiesce(args.py()),
    )?;
    py.import("atexit")?.call_method1("register", (f,))?;
    Ok(())
}
