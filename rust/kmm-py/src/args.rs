//! Numbers from Python, checked before they reach the core.
//!
//! Methods take their counts, sizes, addresses, orders, gfp masks and CPU
//! numbers as `i128` (any Python int PyO3 can hold) and convert them here,
//! so that a refused number names its function and argument:
//! `kmalloc: size must be >= 0, not -1` (an OverflowError, the class
//! Python itself raises for an int out of a C type's range).

use pyo3::exceptions::PyOverflowError as OverflowError;
use pyo3::prelude::*;

fn check(v: i128, max: u128, func: &str, arg: &str) -> PyResult<u128> {
    if v < 0 {
        return Err(OverflowError::new_err(format!("{func}: {arg} must be >= 0, not {v}")));
    }
    if v as u128 > max {
        return Err(OverflowError::new_err(format!("{func}: {arg} must be at most {max}, not {v}")));
    }
    Ok(v as u128)
}

/// A u64 argument (sizes, addresses, counts).
pub(crate) fn u64_arg(v: i128, func: &str, arg: &str) -> PyResult<u64> {
    check(v, u64::MAX as u128, func, arg).map(|v| v as u64)
}

/// A u32 argument (orders, gfp masks, CPUs).
pub(crate) fn u32_arg(v: i128, func: &str, arg: &str) -> PyResult<u32> {
    check(v, u32::MAX as u128, func, arg).map(|v| v as u32)
}

/// A usize argument (lengths, offsets, bulk counts).
pub(crate) fn usize_arg(v: i128, func: &str, arg: &str) -> PyResult<usize> {
    check(v, usize::MAX as u128, func, arg).map(|v| v as usize)
}

/// A u64 from any Python object (an int, or what has `__index__`).
pub(crate) fn nat(v: &Bound<'_, PyAny>, func: &str, arg: &str) -> PyResult<u64> {
    let n: i128 = v.extract().map_err(|e: PyErr| {
        if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(v.py()) {
            OverflowError::new_err(format!("{func}: {arg} is too large (at most {})", u64::MAX))
        } else {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "{func}: {arg} must be an int, not {}",
                v.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
            ))
        }
    })?;
    u64_arg(n, func, arg)
}
