//! loom model tests of the two protocols real threads share: the CPU claim
//! (`cpu.rs`) and the SLUB remote free (`slab/cache.rs`).
//!
//! Nothing here is a copy of the protocol: built with `--cfg loom`, the
//! crate's `sync` seam gives `Cpus` its claim word and thread-locals, and
//! `KmemCache` its per-CPU lock and node `list_lock`, from loom, so loom
//! switches threads at every access to the claim word and every take of
//! those locks in the production code, exploring the interleavings up to
//! its preemption bound. The rest (statistics counters, the page
//! allocator's zone and pcp locks) runs unmodelled between those points;
//! the page allocator checks the claim word before it takes its locks, so
//! loom never switches threads while one is held. Each slab model boots a
//! small real `Machine` per execution.
//!
//! Run (about a second of model checking once built, at a preemption bound
//! of 4; LOOM_MAX_PREEMPTIONS=8 searches wider in about 30 s):
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p kmm-core --release --test loom`
#![cfg(loom)]

use std::sync::atomic::AtomicUsize as StdCount;

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use loom::sync::Arc;
use loom::thread;

use kmm_core::cpu::{Cpus, PREEMPT_MASK, PREEMPT_OFFSET};
use kmm_core::gfp::GFP_ATOMIC;
use kmm_core::slab::geometry::SLAB_NO_MERGE;
use kmm_core::slab::{CacheArgs, KmemCache};
use kmm_core::trace::unknown_call_site;
use kmm_core::{Machine, MachineConfig, VirtAddr};

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

fn counting_hook(poll: &mut (dyn FnMut() -> bool + Send)) -> bool {
    HOOKED_WAITS.fetch_add(1, Relaxed);
    while !poll() {}
    true
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

// ---- the SLUB remote free ---------------------------------------------------------------

struct Slab {
    m: Machine,
    c: std::sync::Arc<KmemCache>,
}

/// A small machine with one cache, and cpu 0's slab filled completely from
/// cpu 0 (so its CPU freelist is empty and the slab is frozen with
/// `inuse == objects`). Returns the objects, in allocation order.
fn filled_slab(cpus: u32) -> (Arc<Slab>, Vec<u64>) {
    let m = Machine::new(MachineConfig { memory: 64 << 20, cpus, ..MachineConfig::default() }).unwrap();
    // 1024-byte objects: an order-3 slab of 32.
    let c = m.kmem_cache_create("loom_obj", 1024, CacheArgs { flags: SLAB_NO_MERGE, ..Default::default() }).unwrap().cache;
    let n = c.geo.objects as usize;
    m.cpus.bind(0).unwrap();
    let objs: Vec<u64> = (0..n).map(|_| alloc(&m, &c)).collect();
    m.cpus.unbind().unwrap();
    assert_eq!(c.slab_states(), (1, 0, 0, 0), "one cpu slab");
    assert_eq!(c.stats().alloc_slab, 1, "the models below count from here");
    (Arc::new(Slab { m, c }), objs)
}

fn alloc(m: &Machine, c: &KmemCache) -> u64 {
    m.kmem_cache_alloc(c, GFP_ATOMIC, &unknown_call_site()).unwrap().0
}

fn free(m: &Machine, c: &KmemCache, va: u64) {
    m.kmem_cache_free(c, VirtAddr(va), &unknown_call_site()).unwrap();
}

/// After the threads: every invariant (slub-1: inuse + free == objects;
/// slub-3: no object on two freelists; slub-4: no free object marked live),
/// the exact number of live objects, and the live ones all distinct.
fn settled(s: &Slab, live: &[u64]) {
    assert_eq!(s.c.check(&s.m), Vec::<String>::new());
    assert_eq!(s.m.check(), Vec::<String>::new());
    assert_eq!(s.c.objects_in_use(&s.m), live.len() as u64, "an object lost or handed out twice");
    let mut sorted = live.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), live.len(), "one object handed to two owners");
}

/// A remote free (cpu 1 frees an object of cpu 0's slab) racing cpu 0's
/// own free and allocations, which run dry and take the slow path: the
/// refill (`get_freelist`) either collects the remote free or deactivates
/// the full slab, and the remote free then finds the slab frozen (counted
/// as the cross-CPU "pingpong", `free_remote`) or unfrozen (it goes on cpu
/// 1's partial list). No object is lost or handed out twice.
#[test]
fn remote_free_races_local_alloc_and_free() {
    // Executions where the refill collected the remote free, and where it did not.
    static SEEN: [StdCount; 2] = [StdCount::new(0), StdCount::new(0)];
    model(|| {
        let (s, objs) = filled_slab(2);
        let remote = {
            let s = s.clone();
            let victim = objs[0];
            thread::spawn(move || {
                s.m.cpus.bind(1).unwrap();
                free(&s.m, &s.c, victim);
                s.m.cpus.unbind().unwrap();
            })
        };
        s.m.cpus.bind(0).unwrap();
        free(&s.m, &s.c, objs[1]); // fast path onto cpu 0's freelist
        let a = alloc(&s.m, &s.c); // fast path: the same object back (LIFO)
        assert_eq!(a, objs[1]);
        let b = alloc(&s.m, &s.c); // slow path: refill or a new slab
        s.m.cpus.unbind().unwrap();
        remote.join().unwrap();

        let st = s.c.stats();
        SEEN[usize::from(b == objs[0])].fetch_add(1, Relaxed);
        assert_eq!(st.free_fastpath, 1);
        assert_eq!(st.free_slowpath, 1, "the remote free takes __slab_free");
        if b == objs[0] {
            // The refill collected the remote free: the slab stayed frozen.
            assert_eq!((st.alloc_refill, st.free_frozen, st.free_remote), (1, 1, 1));
        } else {
            // The refill ran first and found the slab full: it was
            // deactivated (unfrozen, on no list) and b came from a new
            // slab; the remote free then made the full slab partial, on
            // the freeing CPU's partial list (put_cpu_partial).
            assert_eq!((st.alloc_slab - 1, st.deactivate_full), (1, 1), "one more slab");
            assert_eq!((st.free_frozen, st.free_remote, st.cpu_partial_free), (0, 0, 1));
        }
        let mut live: Vec<u64> = objs[1..].to_vec();
        live.push(b);
        settled(&s, &live);
    });
    assert!(SEEN.iter().all(|n| n.load(Relaxed) > 0), "loom explored only one outcome of the race");
}

/// Two remote frees from two CPUs into cpu 0's frozen slab, racing each
/// other and cpu 0's slow-path refill: both land. Either the refill
/// collected one or both of them (the slab stayed frozen, so both count as
/// pingpong) and cpu 0's next allocation returns the other one (from its
/// CPU freelist, or by a second refill), or the refill found the slab full
/// and deactivated it first (no pingpong).
#[test]
fn two_remote_frees_both_land() {
    // Executions where the refill found 0, 1 or 2 of the remote frees.
    static SEEN: [StdCount; 3] = [StdCount::new(0), StdCount::new(0), StdCount::new(0)];
    model(|| {
        let (s, objs) = filled_slab(3);
        let ts: Vec<_> = [1u32, 2]
            .into_iter()
            .map(|cpu| {
                let s = s.clone();
                let victim = objs[cpu as usize - 1];
                thread::spawn(move || {
                    s.m.cpus.bind(cpu).unwrap();
                    free(&s.m, &s.c, victim);
                    s.m.cpus.unbind().unwrap();
                })
            })
            .collect();
        s.m.cpus.bind(0).unwrap();
        let got = alloc(&s.m, &s.c);
        for t in ts {
            t.join().unwrap();
        }
        let st = s.c.stats();
        assert_eq!(st.free_slowpath, 2);
        let mut live: Vec<u64> = objs[2..].to_vec();
        live.push(got);
        if got == objs[0] || got == objs[1] {
            assert_eq!((st.alloc_refill, st.free_frozen, st.free_remote), (1, 2, 2));
            let other = if got == objs[0] { objs[1] } else { objs[0] };
            let again = alloc(&s.m, &s.c);
            assert_eq!(again, other, "the second remote free was lost");
            let st2 = s.c.stats();
            let took_both = st2.alloc_refill == 1;
            if took_both {
                assert_eq!(st2.alloc_fastpath, st.alloc_fastpath + 1);
            } else {
                assert_eq!(st2.alloc_refill, 2);
            }
            SEEN[1 + usize::from(took_both)].fetch_add(1, Relaxed);
            live.push(again);
        } else {
            // The first free puts the full slab on its CPU's partial list,
            // the second finds it partial already (nothing to move).
            assert_eq!((st.alloc_slab - 1, st.deactivate_full), (1, 1), "one more slab");
            assert_eq!((st.free_frozen, st.free_remote, st.cpu_partial_free), (0, 0, 1));
            SEEN[0].fetch_add(1, Relaxed);
        }
        settled(&s, &live);
        // Everything back: nothing live, every invariant intact.
        for &o in &live {
            free(&s.m, &s.c, o);
        }
        s.m.cpus.unbind().unwrap();
        settled(&s, &[]);
    });
    assert!(SEEN.iter().all(|n| n.load(Relaxed) > 0), "loom explored only some outcomes of the race");
}

/// `kmem_cache_shrink` on cpu 2 flushes cpu 0's slab from across CPUs
/// (`flush_cpu` takes cpu 0's per-CPU lock) while cpu 0 frees and allocates
/// on its fast path and cpu 1 frees remotely into the same slab. cpu 0's
/// allocation gets back one of the two freed objects, unless the flush left
/// the slab full and cpu 1's free then parked it on cpu 1's partial list,
/// out of cpu 0's reach (as in the kernel): then, and only then, cpu 0
/// takes a new slab. Either way the books balance.
#[test]
fn flush_from_another_cpu_races_the_fast_path_and_a_remote_free() {
    static SEEN: [StdCount; 2] = [StdCount::new(0), StdCount::new(0)];
    model(|| {
        let (s, objs) = filled_slab(3);
        let remote = {
            let s = s.clone();
            let victim = objs[0];
            thread::spawn(move || {
                s.m.cpus.bind(1).unwrap();
                free(&s.m, &s.c, victim);
                s.m.cpus.unbind().unwrap();
            })
        };
        let flusher = {
            let s = s.clone();
            thread::spawn(move || {
                s.m.cpus.bind(2).unwrap();
                assert_eq!(s.m.kmem_cache_shrink(&s.c).unwrap(), 0, "no slab is empty");
                s.m.cpus.unbind().unwrap();
            })
        };
        s.m.cpus.bind(0).unwrap();
        free(&s.m, &s.c, objs[1]);
        let got = alloc(&s.m, &s.c);
        s.m.cpus.unbind().unwrap();
        remote.join().unwrap();
        flusher.join().unwrap();
        let st = s.c.stats();
        let fresh = st.alloc_slab == 2;
        SEEN[usize::from(fresh)].fetch_add(1, Relaxed);
        if fresh {
            // Both freed objects stay free on the old slab (cpu 1's partial
            // list, or the node's if the shrink flushed cpu 1 afterwards).
            assert!(!objs.contains(&got));
            assert_eq!(s.c.slab_states().0, 1, "one cpu slab: the new one");
        } else {
            assert_eq!(st.alloc_slab, 1);
            assert!(got == objs[0] || got == objs[1], "allocated {got:#x}, not a freed object");
        }
        let mut live: Vec<u64> = objs[2..].to_vec();
        live.push(got);
        settled(&s, &live);
    });
    assert!(SEEN.iter().all(|n| n.load(Relaxed) > 0), "loom explored only one outcome of the race");
}

/// Two threads bound to cpu 0 of a fresh cache both miss, and both drop
/// the per-CPU lock to allocate a slab (`new_slab` runs with no lock held):
/// the second to come back finds the first one's slab installed and
/// deactivates it (to the node partial list) before installing its own.
#[test]
fn two_threads_on_one_cpu_race_to_install_a_new_slab() {
    static SEEN: [StdCount; 2] = [StdCount::new(0), StdCount::new(0)];
    model(|| {
        let m = Machine::new(MachineConfig { memory: 64 << 20, cpus: 1, ..MachineConfig::default() }).unwrap();
        let c = m.kmem_cache_create("loom_obj", 1024, CacheArgs { flags: SLAB_NO_MERGE, ..Default::default() }).unwrap().cache;
        let s = Arc::new(Slab { m, c });
        let other = {
            let s = s.clone();
            thread::spawn(move || {
                s.m.cpus.bind(0).unwrap();
                let o = alloc(&s.m, &s.c);
                s.m.cpus.unbind().unwrap();
                o
            })
        };
        s.m.cpus.bind(0).unwrap();
        let mine = alloc(&s.m, &s.c);
        s.m.cpus.unbind().unwrap();
        let theirs = other.join().unwrap();
        let slabs = s.c.stats().alloc_slab;
        assert!(slabs == 1 || slabs == 2);
        SEEN[slabs as usize - 1].fetch_add(1, Relaxed);
        if slabs == 2 {
            assert_eq!(s.c.slab_states(), (1, 0, 1, 0), "the replaced slab went to the node partial list");
        }
        settled(&s, &[mine, theirs]);
    });
    assert!(SEEN.iter().all(|n| n.load(Relaxed) > 0), "loom explored only one outcome of the race");
}
