//! Fault injection: failslab and fail_page_alloc. Each is a `struct
//! fault_attr` with the kernel's attributes (its debugfs files under
//! /sys/kernel/debug/<name>/), set from the command line
//! (`failslab=<interval>,<probability>,<space>,<times>`) or at run time, and
//! consulted where the kernel consults it: `slab_pre_alloc_hook` (every
//! kmem_cache_alloc, kmalloc and kmem_cache_alloc_bulk call, once per call)
//! and `prepare_alloc_pages` (every page allocation). An injected failure is
//! an ordinary allocation failure (`KmmError::OutOfMemory`) raised before
//! anything is touched, with `fail_dump`'s report in front of its message
//! when `verbose` asks for one.
//!
//! # Kernel
//! `lib/fault-inject.c` (`setup_fault_attr`, `should_fail_ex`, `fail_dump`,
//! `fault_create_debugfs_attr`), `include/linux/fault-inject.h`
//! (`FAULT_ATTR_INITIALIZER`: interval 1, times 1, verbose 2),
//! `mm/failslab.c` (`should_failslab`: ignore-gfp-wait and cache-filter,
//! the bootstrap `kmem_cache` exempt, `__GFP_NOWARN` -> FAULT_NOWARN),
//! `mm/fail_page_alloc.c` (`should_fail_alloc_page`: min-order 1,
//! ignore-gfp-highmem and ignore-gfp-wait on by default), `mm/slub.c`
//! (`slab_pre_alloc_hook`), `mm/page_alloc.c` (`prepare_alloc_pages`),
//! `include/linux/random.h` (`get_random_u32_below`).
//!
//! Randomness: each attribute draws from its own PCG32 stream (O'Neill's
//! `pcg32_random_r`, the `oorandom` crate), seeded from the machine's seed
//! and the attribute, so the same seed and the same sequence of calls give
//! the same failures, and arming one attribute does not change the other's
//! decisions. `probability <= get_random_u32_below(100)` draws as the
//! kernel's constant-ceiling path does: `get_random_u8()` times 100,
//! rejecting low bytes below 256 % 100.
//!
//! `fail-nth` (`/proc/thread-self/fail-nth`, `fault_inject.rst`): a thread
//! that writes N makes the N-th fault-injection point it reaches fail (a
//! point is a call that passed its wrapper's tests: ignore-gfp-wait,
//! min-order, ...), whatever the probability; reading it back gives 0 once
//! the failure was injected. Task context only, as `in_task()` demands.
//! A task here is a host thread (one Python thread): its fail-nth lives in
//! thread-local storage and goes with the thread, as `current->fail_nth`
//! goes with the task.
//!
//! SIMPLIFICATION: no `task-filter` (`make-it-fail`), stack-trace filter
//! (`require-start` ...) or verbose rate limit (the kernel's default,
//! `RATELIMIT_STATE_INIT_DISABLED`, limits nothing). `verbose` 2's
//! `dump_stack()` is the Python traceback of the exception.
//!
//! # Invariants
//! - fault-1: an attribute is armed exactly when its probability is not 0;
//!   the hooks' lock-free test is "armed, or some thread has a fail-nth
//!   pending for this machine" (`FailNth::pending`, kept by each thread's
//!   set, consume and exit), the first tests of `should_fail_ex`.
//!
//! Lock order: one mutex per attribute, a leaf (nothing else is taken under
//! it), taken only past the lock-free test; the hooks run before the
//! allocator they guard takes any lock of its own.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::cmdline::FaultAttrParam;
use crate::error::{KmmError, Result};
use crate::gfp::{self, Gfp};

/// Which fault attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Failslab,
    FailPageAlloc,
}

impl FaultKind {
    /// The debugfs directory name (`%pd` in the report).
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Failslab => "failslab",
            FaultKind::FailPageAlloc => "fail_page_alloc",
        }
    }
}

/// Every attribute file, (debugfs name, is a bool, which kinds have it).
pub const ATTR_FILES: &[(&str, bool, &[FaultKind])] = &[
    ("probability", false, &[FaultKind::Failslab, FaultKind::FailPageAlloc]),
    ("interval", false, &[FaultKind::Failslab, FaultKind::FailPageAlloc]),
    ("times", false, &[FaultKind::Failslab, FaultKind::FailPageAlloc]),
    ("space", false, &[FaultKind::Failslab, FaultKind::FailPageAlloc]),
    ("verbose", false, &[FaultKind::Failslab, FaultKind::FailPageAlloc]),
    ("ignore-gfp-wait", true, &[FaultKind::Failslab, FaultKind::FailPageAlloc]),
    ("cache-filter", true, &[FaultKind::Failslab]),
    ("ignore-gfp-highmem", true, &[FaultKind::FailPageAlloc]),
    ("min-order", false, &[FaultKind::FailPageAlloc]),
];

/// The state behind one attribute's lock.
#[derive(Clone, Debug)]
pub struct AttrState {
    /// Percent; above 100 fails every call that gets this far.
    pub probability: u64,
    /// Fail only every `interval`-th call that gets this far (0 and 1: every one).
    pub interval: u64,
    /// Failures left; -1: no limit; 0: none.
    pub times: i32,
    /// Size (bytes for failslab, pages for fail_page_alloc) to let through first.
    pub space: i32,
    /// 0: silent; 1: the report; 2: the report and a stack dump.
    pub verbose: u64,
    /// `ignore-gfp-wait`: leave requests that may reclaim (`__GFP_DIRECT_RECLAIM`) alone.
    pub ignore_gfp_reclaim: bool,
    /// failslab `cache-filter`: only caches with SLAB_FAILSLAB.
    pub cache_filter: bool,
    /// fail_page_alloc `ignore-gfp-highmem`: leave `__GFP_HIGHMEM` requests alone.
    pub ignore_gfp_highmem: bool,
    /// fail_page_alloc `min-order`: leave smaller orders alone.
    pub min_order: u32,
    /// `attr->count`: calls counted for `interval`.
    pub count: u64,
    rng: oorandom::Rand32,
}

/// One `struct fault_attr` with its mm/ wrapper's switches.
#[derive(Debug)]
pub struct FaultAttr {
    pub kind: FaultKind,
    /// fault-1: probability != 0.
    armed: AtomicBool,
    st: Mutex<AttrState>,
}

/// A PCG stream per attribute (any odd-making constant works; these are
/// the attribute's index in a fixed table, so the streams never change).
fn stream(kind: FaultKind) -> u64 {
    match kind {
        FaultKind::Failslab => 0x6661_696c_736c_6162,      // "failslab"
        FaultKind::FailPageAlloc => 0x6661_696c_5f70_6167, // "fail_pag"
    }
}

impl FaultAttr {
    /// `FAULT_ATTR_INITIALIZER` plus the wrapper's defaults.
    pub fn new(kind: FaultKind, seed: u64) -> FaultAttr {
        let st = AttrState {
            probability: 0,
            interval: 1,
            times: 1,
            space: 0,
            verbose: 2,
            ignore_gfp_reclaim: true,
            cache_filter: false,
            ignore_gfp_highmem: true,
            min_order: if kind == FaultKind::FailPageAlloc { 1 } else { 0 },
            count: 0,
            rng: oorandom::Rand32::new_inc(seed, stream(kind)),
        };
        FaultAttr { kind, armed: AtomicBool::new(false), st: Mutex::new(st) }
    }

    /// probability != 0 (fault-1).
    #[inline(always)]
    pub fn armed(&self) -> bool {
        self.armed.load(Relaxed)
    }

    /// A copy of the attribute's state.
    pub fn state(&self) -> AttrState {
        self.st.lock().clone()
    }

    /// Change the state (keeps fault-1).
    pub fn update(&self, f: impl FnOnce(&mut AttrState)) {
        let mut st = self.st.lock();
        f(&mut st);
        self.armed.store(st.probability != 0, Relaxed);
    }

    /// `setup_fault_attr`: the command line's four numbers.
    pub fn setup(&self, p: &FaultAttrParam) {
        self.update(|st| {
            st.probability = p.probability as u64;
            st.interval = p.interval;
            // atomic_set(int): the kernel's sscanf("%d") into an int.
            st.times = p.times.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
            st.space = p.space.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
        });
    }

    fn has(&self, file: &str) -> Result<bool> {
        match ATTR_FILES.iter().find(|f| f.0 == file) {
            Some((_, is_bool, kinds)) if kinds.contains(&self.kind) => Ok(*is_bool),
            Some(_) => Err(KmmError::InvalidArgument(format!(
                "/sys/kernel/debug/{}/{file} does not exist ({file} belongs to {})",
                self.kind.name(),
                if self.kind == FaultKind::Failslab { "fail_page_alloc" } else { "failslab" }
            ))),
            None => Err(KmmError::InvalidArgument(format!(
                "/sys/kernel/debug/{}/{file} does not exist (the attributes are {})",
                self.kind.name(),
                self.files().join(", ")
            ))),
        }
    }

    /// The debugfs files this attribute has, in the table's order.
    pub fn files(&self) -> Vec<&'static str> {
        ATTR_FILES.iter().filter(|f| f.2.contains(&self.kind)).map(|f| f.0).collect()
    }

    /// Is `file` one of this attribute's bool files (Y/N)?
    pub fn is_bool(&self, file: &str) -> Result<bool> {
        self.has(file)
    }

    /// Read a debugfs file's value (bools as 0/1).
    pub fn read(&self, file: &str) -> Result<i128> {
        self.has(file)?;
        let st = self.st.lock();
        Ok(match file {
            "probability" => st.probability as i128,
            "interval" => st.interval as i128,
            "times" => st.times as i128,
            "space" => st.space as i128,
            "verbose" => st.verbose as i128,
            "ignore-gfp-wait" => st.ignore_gfp_reclaim as i128,
            "cache-filter" => st.cache_filter as i128,
            "ignore-gfp-highmem" => st.ignore_gfp_highmem as i128,
            "min-order" => st.min_order as i128,
            _ => unreachable!("has() checked the name"),
        })
    }

    /// Write a debugfs file. Values outside the file's C type are refused,
    /// naming the file and the range (the kernel would truncate them).
    pub fn write(&self, file: &str, v: i128) -> Result<()> {
        let is_bool = self.has(file)?;
        let path = format!("/sys/kernel/debug/{}/{file}", self.kind.name());
        let range = |lo: i128, hi: i128| -> Result<()> {
            if v < lo || v > hi {
                return Err(KmmError::InvalidArgument(format!("{path}: {v} is out of range ({lo} .. {hi})")));
            }
            Ok(())
        };
        if is_bool {
            range(0, 1)?;
        } else {
            match file {
                "probability" | "interval" | "verbose" => range(0, u64::MAX as i128)?,
                "times" | "space" => range(i32::MIN as i128, i32::MAX as i128)?,
                "min-order" => range(0, u32::MAX as i128)?,
                _ => unreachable!("has() checked the name"),
            }
        }
        self.update(|st| match file {
            "probability" => st.probability = v as u64,
            "interval" => st.interval = v as u64,
            "times" => st.times = v as i32,
            "space" => st.space = v as i32,
            "verbose" => st.verbose = v as u64,
            "ignore-gfp-wait" => st.ignore_gfp_reclaim = v != 0,
            "cache-filter" => st.cache_filter = v != 0,
            "ignore-gfp-highmem" => st.ignore_gfp_highmem = v != 0,
            "min-order" => st.min_order = v as u32,
            _ => unreachable!("has() checked the name"),
        });
        Ok(())
    }

    /// The mm/ wrapper's tests, then `should_fail_ex(attr, size, flags)`.
    /// `filtered(st)` is the wrapper's own tests (true: leave this request
    /// alone). Returns None to let the request through, or Some(report):
    /// `fail_dump`'s text ("" when silent).
    fn should_fail(
        &self,
        size: i64,
        gfp: Gfp,
        filtered: impl FnOnce(&AttrState) -> bool,
        nth: Option<&Arc<FailNth>>,
    ) -> Option<String> {
        let mut st = self.st.lock();
        if gfp & gfp::__GFP_NOFAIL != 0 || (st.ignore_gfp_reclaim && gfp & gfp::__GFP_DIRECT_RECLAIM != 0) || filtered(&st) {
            return None;
        }
        // should_fail_ex, in its order: the task's fail-nth first.
        match nth.map(|n| n.step()) {
            Some(NthStep::Fail) => return Some(self.fail(&mut st, gfp)),
            Some(NthStep::NotYet) => return None,
            _ => {}
        }
        if st.probability == 0 || st.times == 0 {
            return None;
        }
        if st.space as i64 > size {
            st.space = (st.space as i64 - size) as i32;
            return None;
        }
        if st.interval > 1 {
            st.count = st.count.wrapping_add(1);
            if st.count % st.interval != 0 {
                return None;
            }
        }
        if st.probability <= get_random_u32_below_100(&mut st.rng) as u64 {
            return None;
        }
        Some(self.fail(&mut st, gfp))
    }

    /// `fail:` fail_dump unless FAULT_NOWARN (__GFP_NOWARN), then times--
    /// (`atomic_dec_not_zero` unless -1).
    fn fail(&self, st: &mut AttrState, gfp: Gfp) -> String {
        let report = if gfp & gfp::__GFP_NOWARN == 0 && st.verbose > 0 {
            format!(
                "FAULT_INJECTION: forcing a failure.\nname {}, interval {}, probability {}, space {}, times {}\n",
                self.kind.name(),
                st.interval,
                st.probability,
                st.space,
                st.times
            )
        } else {
            String::new()
        };
        if st.times != -1 && st.times != 0 {
            st.times -= 1;
        }
        report
    }
}

/// `get_random_u32_below(100)` as the kernel compiles it for a constant
/// ceiling <= 256: `mult = ceil * get_random_u8()`, rejected while its low
/// byte is below `256 % ceil`, the result `mult >> 8`. The byte is the top
/// of a PCG32 output (its best bits).
fn get_random_u32_below_100(rng: &mut oorandom::Rand32) -> u32 {
    const CEIL: u32 = 100;
    loop {
        let mult = CEIL * (rng.rand_u32() >> 24);
        if (mult & 0xff) >= (1 << 8) % CEIL {
            return mult >> 8;
        }
    }
}

/// The threads' `current->fail_nth` for one machine: how many are pending
/// (non-zero). The values live in each thread's `TASK_FAIL_NTH`.
#[derive(Debug, Default)]
pub struct FailNth {
    pending: AtomicU32,
}

/// One thread's fail-nth per machine (by the machine's `FailNth`); on
/// thread exit the pending ones are uncounted.
#[derive(Default)]
struct TaskFailNth(Vec<(Weak<FailNth>, u32)>);

impl Drop for TaskFailNth {
    fn drop(&mut self) {
        for (w, n) in &self.0 {
            if *n > 0 {
                if let Some(f) = w.upgrade() {
                    f.pending.fetch_sub(1, Relaxed);
                }
            }
        }
    }
}

thread_local! {
    static TASK_FAIL_NTH: RefCell<TaskFailNth> = RefCell::new(TaskFailNth::default());
}

enum NthStep {
    /// This thread has no fail-nth.
    Unset,
    /// Counted down, not yet 0: this point passes.
    NotYet,
    /// Reached 0: this point fails.
    Fail,
}

impl FailNth {
    /// Run `f` on the calling thread's fail-nth for this machine (None
    /// while the thread's storage is being torn down at its exit).
    fn with_mine<R>(self: &Arc<Self>, f: impl FnOnce(&mut u32) -> R) -> Option<R> {
        TASK_FAIL_NTH.try_with(|t| {
            let mut t = t.borrow_mut();
            let me = Arc::as_ptr(self);
            t.0.retain(|(w, n)| (*n > 0 && w.strong_count() > 0) || w.as_ptr() == me);
            let i = match t.0.iter().position(|(w, _)| w.as_ptr() == me) {
                Some(i) => i,
                None => {
                    t.0.push((Arc::downgrade(self), 0));
                    t.0.len() - 1
                }
            };
            let before = t.0[i].1;
            let r = f(&mut t.0[i].1);
            match (before, t.0[i].1) {
                (0, n) if n > 0 => {
                    self.pending.fetch_add(1, Relaxed);
                }
                (b, 0) if b > 0 => {
                    self.pending.fetch_sub(1, Relaxed);
                }
                _ => {}
            }
            r
        })
        .ok()
    }

    /// should_fail_ex's first test for the calling thread.
    fn step(self: &Arc<Self>) -> NthStep {
        self.with_mine(|n| match *n {
            0 => NthStep::Unset,
            1 => {
                *n = 0;
                NthStep::Fail
            }
            _ => {
                *n -= 1;
                NthStep::NotYet
            }
        })
        .unwrap_or(NthStep::Unset)
    }
}

/// The machine's fault attributes.
#[derive(Debug)]
pub struct FaultInject {
    pub failslab: FaultAttr,
    pub fail_page_alloc: FaultAttr,
    nth: Arc<FailNth>,
}

impl FaultInject {
    pub fn new(seed: u64) -> FaultInject {
        FaultInject {
            failslab: FaultAttr::new(FaultKind::Failslab, seed),
            fail_page_alloc: FaultAttr::new(FaultKind::FailPageAlloc, seed),
            nth: Arc::new(FailNth::default()),
        }
    }

    /// Write the calling thread's `fail-nth`: its `n`-th fault-injection
    /// point fails (0: none).
    pub fn set_fail_nth(&self, n: u32) {
        let _ = self.nth.with_mine(|v| *v = n);
    }

    /// Read the calling thread's `fail-nth`: points left before the failure
    /// (0: none pending, or it was injected).
    pub fn fail_nth(&self) -> u32 {
        self.nth.with_mine(|v| *v).unwrap_or(0)
    }

    /// Threads with a fail-nth pending on this machine.
    pub fn nth_pending(&self) -> u32 {
        self.nth.pending.load(Relaxed)
    }

    /// The hooks' lock-free test: `a` armed, or a fail-nth pending somewhere.
    #[inline(always)]
    pub fn maybe(&self, a: &FaultAttr) -> bool {
        a.armed() || self.nth.pending.load(Relaxed) != 0
    }

    /// `a`'s wrapper tests and `should_fail_ex`, with the calling thread's
    /// fail-nth when `in_task`.
    fn should_fail(
        &self,
        a: &FaultAttr,
        size: i64,
        gfp: Gfp,
        filtered: impl FnOnce(&AttrState) -> bool,
        in_task: bool,
    ) -> Option<String> {
        let nth = (in_task && self.nth.pending.load(Relaxed) != 0).then_some(&self.nth);
        a.should_fail(size, gfp, filtered, nth)
    }

    /// An attribute by its debugfs directory name.
    pub fn get(&self, name: &str) -> Result<&FaultAttr> {
        match name {
            "failslab" => Ok(&self.failslab),
            "fail_page_alloc" => Ok(&self.fail_page_alloc),
            _ => Err(KmmError::InvalidArgument(format!(
                "no fault attribute {name:?} (kmm has failslab and fail_page_alloc)"
            ))),
        }
    }

    /// fault-1.
    pub fn check(&self) -> Vec<String> {
        let mut errs = Vec::new();
        for a in [&self.failslab, &self.fail_page_alloc] {
            let p = a.st.lock().probability;
            if a.armed() != (p != 0) {
                errs.push(format!("fault-1: {} armed={} with probability {p}", a.kind.name(), a.armed()));
            }
        }
        errs
    }
}

impl crate::machine::Machine {
    /// `should_failslab` from `slab_pre_alloc_hook`: Err(OutOfMemory) when
    /// failslab fails this kmem_cache_alloc / kmalloc / bulk request.
    #[inline]
    pub(crate) fn should_failslab(&self, c: &crate::slab::KmemCache, gfp: Gfp) -> Result<()> {
        if !self.faults.maybe(&self.faults.failslab) {
            return Ok(());
        }
        self.should_failslab_slow(c, gfp)
    }

    #[cold]
    fn should_failslab_slow(&self, c: &crate::slab::KmemCache, gfp: Gfp) -> Result<()> {
        // "No fault-injection for bootstrap cache".
        if c.name == "kmem_cache" && c.id == 0 {
            return Ok(());
        }
        let filtered = |st: &AttrState| st.cache_filter && c.flags & crate::slab::geometry::SLAB_FAILSLAB == 0;
        let in_task = !self.cpus.in_interrupt();
        match self.faults.should_fail(&self.faults.failslab, c.object_size() as i64, gfp, filtered, in_task) {
            None => Ok(()),
            Some(report) => Err(KmmError::OutOfMemory {
                order: c.geo.order,
                gfp,
                message: format!(
                    "{report}should_failslab: {} allocation failed (injected by failslab), mode:{gfp:#x}({})",
                    c.name,
                    gfp::format_pgg(gfp)
                ),
            }),
        }
    }

    /// `should_fail_alloc_page` from `prepare_alloc_pages`: Err(OutOfMemory)
    /// when fail_page_alloc fails this page allocation.
    #[inline]
    pub(crate) fn should_fail_alloc_page(&self, gfp: Gfp, order: u32) -> Result<()> {
        if !self.faults.maybe(&self.faults.fail_page_alloc) {
            return Ok(());
        }
        self.should_fail_alloc_page_slow(gfp, order)
    }

    #[cold]
    fn should_fail_alloc_page_slow(&self, gfp: Gfp, order: u32) -> Result<()> {
        let filtered =
            |st: &AttrState| order < st.min_order || (st.ignore_gfp_highmem && gfp & gfp::__GFP_HIGHMEM != 0);
        let in_task = !self.cpus.in_interrupt();
        match self.faults.should_fail(&self.faults.fail_page_alloc, 1i64 << order.min(62), gfp, filtered, in_task) {
            None => Ok(()),
            Some(report) => Err(KmmError::OutOfMemory {
                order,
                gfp,
                message: format!(
                    "{report}page allocation failure: order:{order}, mode:{gfp:#x}({}), nodemask=(null) \
                     (injected by fail_page_alloc)",
                    gfp::format_pgg(gfp)
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(a: &FaultAttr, prob: u64, interval: u64, times: i32, space: i32) {
        a.update(|st| {
            st.probability = prob;
            st.interval = interval;
            st.times = times;
            st.space = space;
            st.ignore_gfp_reclaim = false;
        });
    }

    fn decisions(a: &FaultAttr, n: usize, size: i64) -> Vec<bool> {
        (0..n).map(|_| a.should_fail(size, gfp::GFP_KERNEL, |_| false, None).is_some()).collect()
    }

    #[test]
    fn interval_times_space_as_should_fail_ex() {
        let a = FaultAttr::new(FaultKind::Failslab, 1);
        // probability 100, every 3rd call, at most 2 failures.
        arm(&a, 100, 3, 2, 0);
        let d = decisions(&a, 12, 64);
        let idx: Vec<usize> = d.iter().enumerate().filter(|x| *x.1).map(|x| x.0).collect();
        assert_eq!(idx, vec![2, 5]);
        assert_eq!(a.state().times, 0);
        // space: 200 bytes pass first (each call of 64 bytes takes 64 off
        // while space > size), then every call fails.
        arm(&a, 100, 1, -1, 200);
        assert_eq!(decisions(&a, 5, 64), vec![false, false, false, true, true]);
        assert_eq!(a.state().space, 200 - 3 * 64);
        assert_eq!(a.state().times, -1);
        // times 0: never; probability 0: never (and not armed).
        arm(&a, 100, 1, 0, 0);
        assert!(decisions(&a, 10, 8).iter().all(|f| !f));
        arm(&a, 0, 1, -1, 0);
        assert!(!a.armed());
        assert!(decisions(&a, 10, 8).iter().all(|f| !f));
    }

    #[test]
    fn ignore_gfp_wait_and_nofail() {
        let a = FaultAttr::new(FaultKind::FailPageAlloc, 0);
        a.update(|st| {
            st.probability = 100;
            st.times = -1;
        });
        // ignore-gfp-wait is on by default: GFP_KERNEL passes, GFP_ATOMIC fails.
        assert!(a.should_fail(2, gfp::GFP_KERNEL, |_| false, None).is_none());
        assert!(a.should_fail(2, gfp::GFP_ATOMIC, |_| false, None).is_some());
        assert!(a.should_fail(2, gfp::GFP_ATOMIC | gfp::__GFP_NOFAIL, |_| false, None).is_none());
        // __GFP_NOWARN: a failure with no report.
        assert_eq!(a.should_fail(2, gfp::GFP_ATOMIC | gfp::__GFP_NOWARN, |_| false, None), Some(String::new()));
    }

    #[test]
    fn probability_is_a_percentage_reproducible_from_the_seed() {
        let run = |seed: u64| {
            let a = FaultAttr::new(FaultKind::Failslab, seed);
            arm(&a, 30, 1, -1, 0);
            decisions(&a, 20_000, 8)
        };
        let (a, b, c) = (run(7), run(7), run(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let n = a.iter().filter(|f| **f).count() as f64 / a.len() as f64;
        assert!((n - 0.30).abs() < 0.02, "{n}");
        // The draw is uniform over 0..100: probability 1 fails about 1%.
        let a = FaultAttr::new(FaultKind::Failslab, 3);
        arm(&a, 1, 1, -1, 0);
        let n = decisions(&a, 50_000, 8).iter().filter(|f| **f).count();
        assert!((350..650).contains(&n), "{n}");
    }

    #[test]
    fn report_is_fail_dump() {
        let a = FaultAttr::new(FaultKind::Failslab, 0);
        arm(&a, 100, 1, 5, 0);
        let r = a.should_fail(8, gfp::GFP_KERNEL, |_| false, None).unwrap();
        assert_eq!(
            r,
            "FAULT_INJECTION: forcing a failure.\nname failslab, interval 1, probability 100, space 0, times 5\n"
        );
        a.update(|st| st.verbose = 0);
        assert_eq!(a.should_fail(8, gfp::GFP_KERNEL, |_| false, None).unwrap(), "");
    }

    #[test]
    fn files_and_ranges() {
        let f = FaultInject::new(0);
        assert!(f.failslab.read("min-order").is_err());
        assert!(f.fail_page_alloc.read("cache-filter").is_err());
        assert_eq!(f.fail_page_alloc.read("min-order").unwrap(), 1);
        assert_eq!(f.failslab.read("verbose").unwrap(), 2);
        assert_eq!(f.failslab.read("times").unwrap(), 1);
        assert!(f.failslab.write("times", 1 << 40).is_err());
        assert!(f.failslab.write("probability", -1).is_err());
        assert!(f.failslab.write("ignore-gfp-wait", 2).is_err());
        f.failslab.write("probability", 5).unwrap();
        assert!(f.failslab.armed() && f.check().is_empty());
        assert!(f.get("failmalloc").is_err());
    }

    #[test]
    fn fail_nth_fails_the_nth_point_of_this_thread_only() {
        let f = FaultInject::new(0);
        f.failslab.update(|st| st.ignore_gfp_reclaim = false);
        assert!(!f.maybe(&f.failslab));
        f.set_fail_nth(3);
        assert!(f.maybe(&f.failslab) && !f.failslab.armed() && f.nth_pending() == 1);
        // Another thread's points do not count down this thread's.
        std::thread::scope(|s| {
            s.spawn(|| {
                assert_eq!(f.fail_nth(), 0);
                assert!(f.should_fail(&f.failslab, 8, gfp::GFP_KERNEL, |_| false, true).is_none());
            });
        });
        let got: Vec<bool> =
            (0..5).map(|_| f.should_fail(&f.failslab, 8, gfp::GFP_KERNEL, |_| false, true).is_some()).collect();
        assert_eq!(got, vec![false, false, true, false, false]);
        assert_eq!(f.fail_nth(), 0);
        assert!(!f.maybe(&f.failslab) && f.nth_pending() == 0);
        // times went from 1 to 0 with the failure, as should_fail_ex does.
        assert_eq!(f.failslab.state().times, 0);
        // Not reached: the count stays.
        f.set_fail_nth(10);
        let _ = f.should_fail(&f.failslab, 8, gfp::GFP_KERNEL, |_| false, true);
        assert_eq!(f.fail_nth(), 9);
        f.set_fail_nth(0);
        assert!(!f.maybe(&f.failslab) && f.check().is_empty());
        // A thread that ends with a fail-nth pending is uncounted.
        // An explicit join waits for the OS thread, thread-local destructors
        // included; the scope's implicit end waits only for the closure.
        std::thread::scope(|s| {
            s.spawn(|| {
                f.set_fail_nth(5);
                assert_eq!(f.nth_pending(), 1);
            })
            .join()
            .unwrap();
        });
        assert_eq!(f.nth_pending(), 0);
    }
}
