//! The one place core errors become Python exceptions.

use kmm_core::error::KasanBug;
use kmm_core::KmmError;
use pyo3::exceptions::{PyBufferError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::type_object::PyTypeInfo;

/// kmm's exception classes (kmm/errors.py), imported, and `resolve_classes`
/// over the same list, so that a class cannot be declared and not resolved.
macro_rules! imported_classes {
    ($($name:ident),* $(,)?) => {
        $(pyo3::import_exception!(kmm.errors, $name);)*
        /// The base class, for errors with no more specific class.
        mod base {
            pyo3::import_exception!(kmm.errors, KmmError);
        }

        /// Resolve every imported exception class now, at module init. PyO3
        /// imports each lazily, the first time one is raised, and panics if
        /// that import fails; raised deep in a recursion (a trace callback
        /// that allocates, so its events call it again), the import met
        /// RecursionError and the panic aborted the interpreter. Once
        /// resolved, the classes are cached.
        pub(crate) fn resolve_classes(py: Python<'_>) -> PyResult<()> {
            py.import("kmm.errors")?; // a clean ImportError, not a panic, if it is missing
            $(let _ = $name::type_object(py);)*
            let _ = base::KmmError::type_object(py);
            Ok(())
        }
    };
}

imported_classes!(
    OutOfMemoryError,
    InvalidFreeError,
    DoubleFreeError,
    UseAfterFreeError,
    SleepInAtomicError,
    BadGfpError,
    PageFaultError,
    MemoryCorruptionError,
    KasanError,
    KasanUseAfterFreeError,
    KasanDoubleFreeError,
    KasanInvalidFreeError,
    KasanIndexError,
    TraceFormatError,
);

/// Map a core error to its Python exception (the class picked by the error's code).
/// A wait given up on Ctrl-C raises the KeyboardInterrupt (the wait hook
/// re-armed the SIGINT; running the handler now takes it).
pub(crate) fn to_py_err(e: KmmError) -> PyErr {
    if kmm_core::cpu::is_interrupted(&e) {
        if let Err(k) = Python::attach(|py| py.check_signals()) {
            return k;
        }
    }
    let msg = e.message().to_string();
    match e {
        KmmError::OutOfMemory { .. } => OutOfMemoryError::new_err(msg),
        KmmError::InvalidFree(_) => InvalidFreeError::new_err(msg),
        KmmError::DoubleFree(_) => DoubleFreeError::new_err(msg),
        KmmError::UseAfterFree(_) => UseAfterFreeError::new_err(msg),
        KmmError::SleepInAtomic(_) => SleepInAtomicError::new_err(msg),
        KmmError::BadGfp(_) => BadGfpError::new_err(msg),
        KmmError::PageFault(_) => PageFaultError::new_err(msg),
        KmmError::MemoryCorruption(_) => MemoryCorruptionError::new_err(msg),
        KmmError::InvalidArgument(_) => PyValueError::new_err(msg),
        KmmError::BufferBusy(_) => PyBufferError::new_err(msg),
        KmmError::Host(_) => PyOSError::new_err(msg),
        KmmError::Busy(_) | KmmError::Bug(_) => base::KmmError::new_err(msg),
        KmmError::Kasan { bug, .. } => match bug {
            KasanBug::Access => KasanError::new_err(msg),
            KasanBug::UseAfterFree => KasanUseAfterFreeError::new_err(msg),
            KasanBug::DoubleFree => KasanDoubleFreeError::new_err(msg),
            KasanBug::InvalidFree => KasanInvalidFreeError::new_err(msg),
        },
    }
}

/// A KASAN report from a Block access: a use after free when the Block's
/// memory was freed, else (for indexing and slicing) also an IndexError.
pub(crate) fn kasan_block_err(e: KmmError, dead: bool, index: bool) -> PyErr {
    match e {
        KmmError::Kasan { message, .. } if dead => KasanUseAfterFreeError::new_err(message),
        KmmError::Kasan { message, .. } if index => KasanIndexError::new_err(message),
        e => to_py_err(e),
    }
}

/// Log an allocation failure through Python `logging` (logger "kmm"), as
/// `warn_alloc` prints it, unless the mask has `__GFP_NOWARN`.
pub(crate) fn warn_alloc(py: Python<'_>, e: &KmmError) {
    if let KmmError::OutOfMemory { gfp, message, .. } = e {
        if gfp & kmm_core::gfp::__GFP_NOWARN != 0 {
            return;
        }
        let r = (|| -> PyResult<()> {
            let logger = py.import("logging")?.call_method1("getLogger", ("kmm",))?;
            logger.call_method1("warning", (format!("kmm: {message}"),))?;
            Ok(())
        })();
        if let Err(err) = r {
            err.write_unraisable(py, None);
        }
    }
}
