//! The one seam where loom replaces std for model checking (crossbeam's
//! pattern): the CPU claim word and its thread-locals (`cpu.rs`), and the
//! slab per-CPU lock and node `list_lock` (`slab/cache.rs`), come from here.
//!
//! Normal builds re-export exactly the types those modules used before —
//! `std`'s atomics and `thread_local!`, `spin::Mutex` for the per-CPU lock,
//! `parking_lot::Mutex` for `list_lock` — so production pays nothing: no
//! wrapper, no indirection. Built with `RUSTFLAGS="--cfg loom"`, the same
//! names are loom's, and `tests/loom.rs` runs the real protocol code under
//! loom's exhaustive scheduler. Statistics counters stay plain std atomics
//! in both builds: they are not part of any protocol, and every modelled
//! atomic multiplies the interleavings loom has to explore.
//!
//! Nothing here may be used outside a `loom::model` closure in a loom build
//! (loom's types panic there); the loom build runs `tests/loom.rs` only.
#![forbid(unsafe_code)]

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::AtomicU64;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::AtomicU64;

#[cfg(not(loom))]
pub(crate) use std::thread_local;
#[cfg(loom)]
pub(crate) use loom::thread_local;

/// `thread_local!` with `const` initialisers (no lazy-init check on the
/// fast path); loom's macro takes no `const { }`, so there it is dropped.
macro_rules! const_thread_local {
    ($($(#[$attr:meta])* static $name:ident: $t:ty = $init:expr;)*) => {
        #[cfg(not(loom))]
        std::thread_local! { $($(#[$attr])* static $name: $t = const { $init };)* }
        #[cfg(loom)]
        loom::thread_local! { $($(#[$attr])* static $name: $t = $init;)* }
    };
}
pub(crate) use const_thread_local;

/// One turn of a busy-wait loop (loom: a point where another thread runs).
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(not(loom))]
    std::hint::spin_loop();
    #[cfg(loom)]
    loom::hint::spin_loop();
}

/// Give the host CPU away in a long wait.
#[inline]
pub(crate) fn yield_now() {
    #[cfg(not(loom))]
    std::thread::yield_now();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// A lock never held across a callback or a sleep: the per-CPU slab lock.
#[cfg(not(loom))]
pub type SpinLock<T> = spin::Mutex<T>;
#[cfg(not(loom))]
pub type SpinGuard<'a, T> = spin::MutexGuard<'a, T>;

/// A lock that may be held across longer work: the slab node `list_lock`.
#[cfg(not(loom))]
pub type ListLock<T> = parking_lot::Mutex<T>;

#[cfg(loom)]
pub use model::{LoomMutex as SpinLock, LoomMutex as ListLock, SpinGuard};

#[cfg(loom)]
mod model {
    /// loom's mutex with the `lock`/`try_lock` shape of spin's and
    /// parking_lot's (no poisoning: a panic ends the loom model anyway).
    #[derive(Debug)]
    pub struct LoomMutex<T>(loom::sync::Mutex<T>);

    pub type SpinGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> LoomMutex<T> {
        pub fn new(t: T) -> Self {
            LoomMutex(loom::sync::Mutex::new(t))
        }

        pub fn lock(&self) -> SpinGuard<'_, T> {
            self.0.lock().expect("loom mutex poisoned")
        }

        pub fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
            self.0.try_lock().ok()
        }
    }
}
