//! loom model tests of the two protocols real threads share: the CPU claim
//! (`cpu.rs`) and the SLUB remote free (`slab/cache.rs`).
//!
//! Nothing here is a copy of the protocol: built with `--cfg loom`, the
//! crate's `sync` seam gives `Cpus` its claim word and thread-locals, and
//! `KmemCache` its per-CPU lock and node `list_lock`, from loom, so loom
//! explores every interleaving of the production code. Each slab model
//! boots a small real `Machine` per execution.
//!
//! Run (about a minute on 2 cores; a wider search with LOOM_MAX_PREEMPTIONS=3):
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p kmm-core --release --test loom`
#![cfg(loom)]

use std::sync::atomic::AtomicUsize as StdCount;

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use loom::sync::Arc;
use loom::thread;

use kmm_core::cpu::{Cpus, PREEMPT_MASK, PREEMPT_OFFSET};

/// Run `f` under loom with a preemption bound of 4 unless the environment
/// (LOOM_MAX_PREEMPTIONS) sets another; prints how many executions it took.
fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(4);
    }
    let runs = std::sync::Arc::new(StdCount::new(0));
    let r = runs.clone();
    b.check(move || {
        r.fetch_add(1, Relaxed);
        f()
    });
    println!("{} executions", runs.load(Relaxed));
}

/// Per-CPU state that only the CPU's holder may touch: loom reports any
/// access not ordered after the previous holder's (a data race).
struct CpuState(UnsafeCell<u64>);

impl CpuState {
    fn new() -> Self {
        CpuState(UnsafeCell::new(0))
    }
    fn bump(&self) -> u64 {
        // SAFETY: the caller holds the CPU claim; loom checks that it
        // actually excludes every other access.
        self.0.with_mut(|p| unsafe {
            *p += 1;
            *p
        })
    }
    fn get(&self) -> u64 {
        // SAFETY: as `bump`.
        self.0.with(|p| unsafe { *p })
    }
}

// ---- the CPU claim ----------------------------------------------------------------------

/// Two unbound threads race for a one-CPU machine through `try_enter`/
/// `enter` (the per-call claim): one holds it at a time, the loser waits
/// and gets it after the release, and the claim orders one holder's
/// accesses before the next one's.
#[test]
fn per_call_claim_excludes_and_hands_over() {
    model(|| {
        let cpus = Arc::new(Cpus::new(1));
        let state = Arc::new(CpuState::new());
        let holders = Arc::new(AtomicUsize::new(0));
        let ts: Vec<_> = (0..2)
            .map(|_| {
                let (cpus, state, holders) = (cpus.clone(), state.clone(), holders.clone());
                thread::spawn(move || {
                    let g = cpus.enter();
                    assert_eq!(g.cpu, 0);
                    assert_eq!(holders.fetch_add(1, Relaxed), 0, "two holders of cpu 0");
                    state.bump();
                    holders.fetch_sub(1, Relaxed);
                    drop(g);
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        assert_eq!(state.get(), 2, "both threads ran on the CPU");
        assert!(!cpus.is_claimed(0));
        assert_eq!(cpus.slot(0).claims.load(Relaxed), 2, "one claim per entry");
    });
}

/// Waits that went through the wait hook (the binding's GIL release).
static HOOKED_WAITS: StdCount = StdCount::new(0);

fn counting_hook(wait: &mut (dyn FnMut() + Send)) {
    HOOKED_WAITS.fetch_add(1, Relaxed);
    wait();
}

/// A thread with preemption disabled keeps its CPU: a second thread's
/// `preempt_disable` on the same CPU waits (through the wait hook, where
/// the Python binding releases the GIL) until the first one's count is
/// back to zero, then gets the CPU and sees what the first one wrote.
#[test]
fn preempt_disable_waits_for_the_holder() {
    kmm_core::cpu::set_wait_hook(counting_hook);
    model(|| {
        let cpus = Arc::new(Cpus::new(1));
        let state = Arc::new(CpuState::new());
        let in_section = Arc::new(AtomicBool::new(false));
        let ts: Vec<_> = (0..2)
            .map(|_| {
                let (cpus, state, in_section) = (cpus.clone(), state.clone(), in_section.clone());
                thread::spawn(move || {
                    cpus.bind(0).unwrap();
                    assert_eq!(cpus.preempt_add(PREEMPT_OFFSET, false), 0);
                    // Nested: the inner disable neither claims again nor releases.
                    cpus.preempt_add(PREEMPT_OFFSET, false);
                    assert!(!in_section.swap(true, Relaxed), "two threads with preemption disabled on cpu 0");
                    let before = state.bump();
                    cpus.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false).unwrap();
                    assert!(cpus.is_claimed(0) && cpus.check().is_empty(), "cpu-2");
                    assert_eq!(state.bump(), before + 1, "preempted inside the section");
                    in_section.store(false, Relaxed);
                    cpus.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false).unwrap();
                    cpus.unbind().unwrap();
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        assert_eq!(state.get(), 4);
        assert!(!cpus.is_claimed(0));
    });
    assert!(HOOKED_WAITS.load(Relaxed) > 0, "no execution waited for the held CPU");
}

/// `wait_runnable` (what every allocation on a bound CPU runs first): a
/// thread that has seen the holder's section begin does not run on the CPU
/// until the holder has re-enabled preemption, and then sees all it wrote.
#[test]
fn runner_waits_out_a_preempt_disabled_section() {
    model(|| {
        let cpus = Arc::new(Cpus::new(1));
        let state = Arc::new(CpuState::new());
        let started = Arc::new(AtomicBool::new(false));
        let holder = {
            let (cpus, state, started) = (cpus.clone(), state.clone(), started.clone());
            thread::spawn(move || {
                cpus.bind(0).unwrap();
                cpus.preempt_add(PREEMPT_OFFSET, false);
                started.store(true, Release);
                state.bump();
                state.bump();
                cpus.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false).unwrap();
                cpus.unbind().unwrap();
            })
        };
        cpus.bind(0).unwrap();
        if started.load(Acquire) {
            cpus.wait_runnable(0);
            assert_eq!(state.get(), 2, "ran inside another thread's preempt-disabled section");
        }
        cpus.unbind().unwrap();
        holder.join().unwrap();
        assert!(!cpus.is_claimed(0));
    });
}

/// The window `wait_runnable` leaves (cpu.rs, SIMPLIFICATION): it checks
/// the claim and returns, holding nothing, so a thread that passed the
/// check is still running its operation on the CPU when another thread
/// disables preemption there. Its per-CPU data stays safe (each structure
/// has its own per-CPU lock); what breaks is the kernel's promise that
/// nothing else runs on a CPU inside a preempt-disabled section. Closing it
/// takes a guard held by every caller for the whole operation; this test
/// shows the window and fails once it is closed.
#[test]
#[should_panic(expected = "Causality violation")]
fn runner_in_flight_overlaps_a_later_preempt_disable() {
    model(|| {
        let cpus = Arc::new(Cpus::new(1));
        let state = Arc::new(CpuState::new());
        let holder = {
            let (cpus, state) = (cpus.clone(), state.clone());
            thread::spawn(move || {
                cpus.bind(0).unwrap();
                cpus.preempt_add(PREEMPT_OFFSET, false);
                state.bump();
                cpus.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false).unwrap();
                cpus.unbind().unwrap();
            })
        };
        cpus.bind(0).unwrap();
        cpus.wait_runnable(0);
        state.bump(); // the operation, with no per-CPU lock of its own
        cpus.unbind().unwrap();
        holder.join().unwrap();
    });
}

/// A per-call claim (an unbound thread) and a preempt-disabled claim (a
/// bound thread) on a one-CPU machine: each excludes the other.
#[test]
fn per_call_and_preempt_claims_exclude_each_other() {
    model(|| {
        let cpus = Arc::new(Cpus::new(1));
        let state = Arc::new(CpuState::new());
        let bound = {
            let (cpus, state) = (cpus.clone(), state.clone());
            thread::spawn(move || {
                cpus.bind(0).unwrap();
                cpus.preempt_add(PREEMPT_OFFSET, false);
                state.bump();
                cpus.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false).unwrap();
                cpus.unbind().unwrap();
            })
        };
        {
            let _g = cpus.enter();
            state.bump();
        }
        bound.join().unwrap();
        assert_eq!(state.get(), 2);
        assert!(!cpus.is_claimed(0));
    });
}
