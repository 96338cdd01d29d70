//! Numbers from Python, checked before they reach the core.
//!
//! Methods take their counts, sizes, addresses, orders, gfp masks and CPU
//! numbers as `i128` (any Python int PyO3 can hold) and convert them here,
//! so that a refused number names its function and argument:
//! `kmalloc: size must be >= 0, not -1` (an OverflowError, the class
//! Python itself raises for an int out of a C type's range).

use pyo3::exceptions::PyOverflowError as OverflowError;
use pyo3::prelude::*;

/// An int argument of any size PyO3 can hold, extracted quickly.
///
/// PyO3's own `i128` extraction under the limited API (abi3) is its "slow
/// 128-bit conversion": a mask read, a Python int for the shift, a
/// `PyNumber_Rshift` and a second extraction, about 20-30 ns per argument
/// (issue 13, part 3: `perf` put `slow_128bit_int_conversion` and
/// `long_rshift` on every `kmalloc` call). `Int` reads an `i64` with one
/// `PyLong_AsLongLong` and falls back to the `i128` path only when the value
/// does not fit (OverflowError), so every value is still accepted or refused
/// as before.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Int(pub(crate) i128);

impl From<Int> for i128 {
    #[inline]
    fn from(v: Int) -> i128 {
        v.0
    }
}

impl FromPyObject<'_, '_> for Int {
    type Error = PyErr;

    #[inline]
    fn extract(ob: pyo3::Borrowed<'_, '_, PyAny>) -> PyResult<Int> {
        match ob.extract::<i64>() {
            Ok(v) => Ok(Int(v as i128)),
            Err(e) if e.is_instance_of::<OverflowError>(ob.py()) => ob.extract::<i128>().map(Int),
            Err(e) => Err(e),
        }
    }
}

#[cold]
#[inline(never)]
fn refuse(v: i128, max: u128, func: &str, arg: &str) -> PyErr {
    if v < 0 {
        OverflowError::new_err(format!("{func}: {arg} must be >= 0, not {v}"))
    } else {
        OverflowError::new_err(format!("{func}: {arg} must be at most {max}, not {v}"))
    }
}

#[inline(always)]
fn check(v: i128, max: u128, func: &str, arg: &str) -> PyResult<u128> {
    if v < 0 || v as u128 > max {
        return Err(refuse(v, max, func, arg));
    }
    Ok(v as u128)
}

/// A u64 argument (sizes, addresses, counts).
#[inline]
pub(crate) fn u64_arg(v: impl Into<i128>, func: &str, arg: &str) -> PyResult<u64> {
    check(v.into(), u64::MAX as u128, func, arg).map(|v| v as u64)
}

/// A u32 argument (orders, gfp masks, CPUs).
#[inline]
pub(crate) fn u32_arg(v: impl Into<i128>, func: &str, arg: &str) -> PyResult<u32> {
    check(v.into(), u32::MAX as u128, func, arg).map(|v| v as u32)
}

/// A usize argument (lengths, offsets, bulk counts).
#[inline]
pub(crate) fn usize_arg(v: impl Into<i128>, func: &str, arg: &str) -> PyResult<usize> {
    check(v.into(), usize::MAX as u128, func, arg).map(|v| v as usize)
}

/// A u64 from any Python object (an int, or what has `__index__`).
pub(crate) fn nat(v: &Bound<'_, PyAny>, func: &str, arg: &str) -> PyResult<u64> {
    let n: i128 = v.extract::<Int>().map(i128::from).map_err(|e: PyErr| {
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
