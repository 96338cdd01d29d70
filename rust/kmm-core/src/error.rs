//! The one error type of the crate. Each variant has a stable code (used by
//! the Python binding to pick the exception class) and a message in the
//! kernel's words where the kernel has some.
//!
//! A call that returns an error has changed nothing: every operation checks
//! before it mutates, or undoes what it did (see each module's invariants).
#![forbid(unsafe_code)]

use std::fmt;

/// Errors of the model. The `code()` of each variant is stable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KmmError {
    /// An allocation could not be satisfied ("page allocation failure: ...").
    OutOfMemory { order: u32, gfp: u32, message: String },
    /// Freeing something that is not a live allocation start, or with the wrong size/order/cache.
    InvalidFree(String),
    /// Freeing something already free ("double free or corruption").
    DoubleFree(String),
    /// Touching memory through a handle after it was freed.
    UseAfterFree(String),
    /// A call that may sleep was made in atomic context.
    SleepInAtomic(String),
    /// An invalid gfp mask (bad zone combination, unknown name).
    BadGfp(String),
    /// An access to an address with no mapping.
    PageFault(String),
    /// Redzone / poison / freelist corruption detected.
    MemoryCorruption(String),
    /// A bad argument (size, alignment, order, configuration).
    InvalidArgument(String),
    /// A buffer cannot be released while exported.
    BufferBusy(String),
    /// A host (OS) call failed.
    Host(String),
    /// An object is still in use (e.g. destroying a cache with live objects).
    Busy(String),
    /// Misuse the kernel answers with a BUG/WARN (e.g. an unbalanced put_cpu).
    Bug(String),
    /// A KASAN report (`kasan=on`): a bad access, double free or invalid
    /// free, refused; `message` is the whole report (`kasan.rs`).
    Kasan { bug: KasanBug, message: String },
}

/// What a KASAN report is about (picks the Python exception class:
/// `KasanError` and, for frees and use after free, also the class kmm
/// raises for them without KASAN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KasanBug {
    /// An access to poisoned memory other than a freed object or page
    /// (out of bounds, redzones, vmalloc guard, null or wild pointers).
    Access,
    /// An access to a freed slab object or freed page.
    UseAfterFree,
    /// Freeing a slab object that is already free ("double-free").
    DoubleFree,
    /// Freeing a pointer that is not an object's start ("invalid-free").
    InvalidFree,
}

impl KmmError {
    /// A stable, short code per variant.
    pub fn code(&self) -> &'static str {
        match self {
            KmmError::OutOfMemory { .. } => "out_of_memory",
            KmmError::InvalidFree(_) => "invalid_free",
            KmmError::DoubleFree(_) => "double_free",
            KmmError::UseAfterFree(_) => "use_after_free",
            KmmError::SleepInAtomic(_) => "sleep_in_atomic",
            KmmError::BadGfp(_) => "bad_gfp",
            KmmError::PageFault(_) => "page_fault",
            KmmError::MemoryCorruption(_) => "memory_corruption",
            KmmError::InvalidArgument(_) => "invalid_argument",
            KmmError::BufferBusy(_) => "buffer_busy",
            KmmError::Host(_) => "host",
            KmmError::Busy(_) => "busy",
            KmmError::Bug(_) => "bug",
            KmmError::Kasan { .. } => "kasan",
        }
    }

    /// Every code, for tests that check each is raised somewhere.
    pub const ALL_CODES: &'static [&'static str] = &[
        "out_of_memory",
        "invalid_free",
        "double_free",
        "use_after_free",
        "sleep_in_atomic",
        "bad_gfp",
        "page_fault",
        "memory_corruption",
        "invalid_argument",
        "buffer_busy",
        "host",
        "busy",
        "bug",
        "kasan",
    ];

    pub fn message(&self) -> &str {
        match self {
            KmmError::OutOfMemory { message, .. } => message,
            KmmError::InvalidFree(m)
            | KmmError::DoubleFree(m)
            | KmmError::UseAfterFree(m)
            | KmmError::SleepInAtomic(m)
            | KmmError::BadGfp(m)
            | KmmError::PageFault(m)
            | KmmError::MemoryCorruption(m)
            | KmmError::InvalidArgument(m)
            | KmmError::BufferBusy(m)
            | KmmError::Host(m)
            | KmmError::Busy(m)
            | KmmError::Bug(m) => m,
            KmmError::Kasan { message, .. } => message,
        }
    }
}

impl fmt::Display for KmmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for KmmError {}

pub type Result<T, E = KmmError> = std::result::Result<T, E>;

/// Shorthand for `Err(KmmError::InvalidArgument(..))`.
pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(KmmError::InvalidArgument(msg.into()))
}
