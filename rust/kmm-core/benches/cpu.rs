//! Per-CPU benchmarks (issue 4): the pcp fast path, throughput scaling over
//! threads bound to simulated CPUs, the cost of a remote free, and the host's
//! shared-counter vs per-CPU-counter contrast (see benches/README.md).
//!
//! - `pcp/*` (criterion): `alloc_pages(GFP_KERNEL, 0)` + `free_pages(p, 0)`,
//!   hot, the bench thread bound to CPU 0 (the per-CPU list fast path), the
//!   same pair on an unbound thread (home CPU), and the same pair with the
//!   per-CPU lists bypassed: the bench holds CPU 0's pcp locks, so every
//!   `pcp_spin_trylock` fails and the pair takes the buddy path (split an
//!   order-10 block, merge it back), which is the pre-pcp figure of
//!   `benches/buddy.rs` measured again in this run.
//! - scaling (timed sweep, best of 5 wall times): 1 thread bound to CPU 0 vs
//!   2 threads bound to CPUs 0 and 1, each doing a fixed number of
//!   operations (`std::thread::scope`): slab fast-path pairs (64-byte
//!   objects, one shared cache), pcp order-0 pairs, and
//!   `kmem_cache_alloc_bulk`/`free_bulk` of 64 and 1000 objects.
//!   Total ops/s and the 2-thread / 1-thread ratio (2.0 = perfect scaling).
//!   Bench thread k is pinned to host CPU k (`sched_setaffinity`).
//!   A control row runs the pcp pairs with a machine per thread (no shared
//!   kmm state), which shows what the host itself allows.
//! - remote free (timed sweep, median of rounds): K objects allocated on
//!   CPU 0, then freed on CPU 0 (local) or by the thread moved to CPU 1
//!   (remote); the next K allocations on CPU 0 are timed too (after remote
//!   frees they must take the objects back from the slab: `get_freelist`).
//!   Also pcp order-0 pages freed locally and remotely.
//! - counters (host only, no kmm): N threads (1, 2) each doing a fixed
//!   number of increments of one shared `AtomicU64` (`fetch_add`), of their
//!   own counters in one cache line (false sharing), of their own
//!   cache-line-padded counter (`fetch_add`), and of their own padded
//!   counter with a plain load + store (what `this_cpu_inc` is on x86).
//!
//! At the end a ratio table is printed. Run: `cargo bench -p kmm-core --bench cpu`
//! (about 20 s) on an otherwise idle host: with 2 host CPUs, any other busy
//! process takes the second CPU and every 2-thread figure collapses to ~1x.
//! `cargo test --benches` runs only the criterion part, once.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::Criterion;
use kmm_core::gfp::GFP_KERNEL;
use kmm_core::slab::{CacheArgs, KmemCache};
use kmm_core::trace::{unknown_call_site, CallSite};
use kmm_core::{Machine, MachineConfig, Pfn, VirtAddr};

const MEM: u64 = 512 << 20;
const OBJ: u32 = 64;
/// Best of this many wall times for every threaded measurement.
const BEST_OF: usize = 5;

fn machine() -> Machine {
    Machine::new(MachineConfig { memory: MEM, cpus: 2, ..MachineConfig::default() }).unwrap()
}

/// Per-benchmark samples (ns per operation), as criterion measured them.
#[derive(Default)]
struct Rec(RefCell<BTreeMap<String, Vec<f64>>>);

impl Rec {
    fn time(&self, key: &str, iters: u64, mut f: impl FnMut()) -> Duration {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        let d = t.elapsed();
        if d >= Duration::from_micros(50) {
            let per = d.as_nanos() as f64 / iters as f64;
            self.0.borrow_mut().entry(key.to_string()).or_default().push(per);
        }
        d
    }

    fn median(&self, key: &str) -> f64 {
        let mut v = self.0.borrow().get(key).cloned().unwrap_or_default();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

// ---- (a) the pcp pair ----------------------------------------------------------------------

fn pcp_pair(m: &Machine) {
    let p = m.alloc_pages(black_box(GFP_KERNEL), 0).unwrap();
    m.free_pages(black_box(p), 0).unwrap();
}

fn bench_pcp(c: &mut Criterion, rec: &Rec) {
    let bound = machine();
    bound.cpus.bind(0).unwrap();
    let unbound = machine();
    let nopcp = machine();
    nopcp.cpus.bind(0).unwrap();
    let mut g = c.benchmark_group("pcp");
    g.bench_function("order0_pair/bound_cpu0", |b| b.iter_custom(|it| rec.time("pcp/bound", it, || pcp_pair(&bound))));
    g.bench_function("order0_pair/unbound", |b| b.iter_custom(|it| rec.time("pcp/unbound", it, || pcp_pair(&unbound))));
    g.bench_function("order0_pair/pcp_bypassed_buddy", |b| {
        b.iter_custom(|it| {
            // Hold CPU 0's pcp lock of every zone: rmqueue_pcplist and
            // free_to_pcp find it taken (their trylock fails) and go to the
            // buddy lists, as the kernel does.
            let held: Vec<_> = nopcp.zones.iter().filter_map(|z| z.pcp.first()).map(|s| s.lists.lock()).collect();
            let d = rec.time("pcp/bypassed", it, || pcp_pair(&nopcp));
            drop(held);
            d
        })
    });
    g.finish();
    assert!(bound.check_pcp().is_empty() && nopcp.check_pcp().is_empty());
    bound.cpus.unbind().unwrap();
    nopcp.cpus.unbind().unwrap();
}

// ---- (b) scaling -----------------------------------------------------------------------------

/// Pin the calling thread to host CPU `k` (modulo the host's CPUs), so two
/// bench threads really run side by side: left to the scheduler, two short
/// runs released by one barrier sometimes share a host CPU, which hides
/// cache-line contention and halves throughput. False if the host refuses.
fn pin_to_host_cpu(k: usize) -> bool {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = rustix::thread::CpuSet::new();
    set.set(k % n);
    rustix::thread::sched_setaffinity(None, &set).is_ok()
}

/// Wall time of `threads` threads started together, thread k running
/// `f(k)` once: from the first start to the last finish, as each thread
/// timed them itself (the spawning thread may not run at once on a
/// 2-CPU host). Thread k runs on host CPU k. Best of BEST_OF runs.
fn timed_threads(threads: usize, f: &(dyn Fn(usize) + Sync)) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..BEST_OF {
        let bar = Barrier::new(threads);
        let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|k| {
                    let bar = &bar;
                    s.spawn(move || {
                        assert!(pin_to_host_cpu(k), "sched_setaffinity refused");
                        bar.wait();
                        let t0 = Instant::now();
                        f(k);
                        (t0, Instant::now())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let start = spans.iter().map(|s| s.0).min().unwrap();
        let end = spans.iter().map(|s| s.1).max().unwrap();
        best = best.min(end - start);
    }
    best
}

/// `timed_threads` with thread k bound to CPU k of `m` (bound before the
/// start, unbound after the finish).
fn wall(m: &Machine, threads: u32, f: &(dyn Fn(u32) + Sync)) -> Duration {
    let bar = Barrier::new(threads as usize);
    timed_threads(threads as usize, &|k| {
        // The bind happens inside the timed span; it is one uncontended CAS.
        m.cpus.bind(k as u32).unwrap();
        bar.wait();
        f(k as u32);
        m.cpus.unbind().unwrap();
    })
}

struct Scale {
    label: &'static str,
    /// ops/s with 1 thread and with 2.
    one: f64,
    two: f64,
}

impl Scale {
    fn ratio(&self) -> f64 {
        self.two / self.one
    }
}

/// 1 thread vs 2 threads, each doing `ops` operations in `f` (called with
/// the thread's index).
fn scale(label: &'static str, m: &Machine, ops: u64, f: &(dyn Fn(u32) + Sync)) -> Scale {
    let w1 = wall(m, 1, f);
    let w2 = wall(m, 2, f);
    let s = Scale { label, one: ops as f64 / w1.as_secs_f64(), two: 2.0 * ops as f64 / w2.as_secs_f64() };
    println!(
        "scaling {label:<34} 1 thread {:7.2} Mops/s ({:6.1} ns/op)  2 threads {:7.2} Mops/s  x{:.2}",
        s.one / 1e6,
        1e9 / s.one,
        s.two / 1e6,
        s.ratio()
    );
    s
}

fn bench_scaling(cs: &CallSite) -> Vec<Scale> {
    let mut out = Vec::new();
    // Slab fast path: one shared cache, each thread on its own CPU.
    {
        let m = machine();
        let cache: std::sync::Arc<KmemCache> = m.kmem_cache_create("scale64", OBJ, CacheArgs::default()).unwrap().cache;
        const N: u64 = 2_000_000;
        out.push(scale("slab pair, 64 B (alloc+free)", &m, N, &|_| {
            for _ in 0..N {
                let o = m.kmem_cache_alloc(&cache, GFP_KERNEL, cs).unwrap();
                m.kmem_cache_free(&cache, black_box(o), cs).unwrap();
            }
        }));
        for (label, n, calls) in [
            ("slab alloc_bulk+free_bulk 64, per obj", 64usize, 30_000u64),
            ("slab alloc_bulk+free_bulk 1000, per obj", 1000, 2_000),
        ] {
            out.push(scale(label, &m, calls * n as u64, &|_| {
                let mut v = Vec::with_capacity(n);
                for _ in 0..calls {
                    v.clear();
                    m.kmem_cache_alloc_bulk(&cache, GFP_KERNEL, n, &mut v).unwrap();
                    m.kmem_cache_free_bulk(&cache, black_box(&v)).unwrap();
                }
            }));
        }
        let errs = m.check_slab();
        assert!(errs.is_empty(), "{errs:?}");
    }
    // pcp order-0 pairs.
    {
        let m = machine();
        const N: u64 = 2_000_000;
        out.push(scale("pcp order-0 pair (alloc+free)", &m, N, &|_| {
            for _ in 0..N {
                pcp_pair(&m);
            }
        }));
        assert!(m.check_pcp().is_empty());
    }
    // Control: the same pairs with a machine per thread (each thread on CPU 0
    // of its own machine), so the two threads share no kmm state at all.
    {
        let ms = [machine(), machine()];
        const N: u64 = 2_000_000;
        let run = |threads: usize| {
            let bar = Barrier::new(threads);
            timed_threads(threads, &|k| {
                ms[k].cpus.bind(0).unwrap();
                bar.wait();
                for _ in 0..N {
                    pcp_pair(&ms[k]);
                }
                ms[k].cpus.unbind().unwrap();
            })
        };
        let (w1, w2) = (run(1), run(2));
        let s = Scale {
            label: "pcp pair, a machine per thread (control)",
            one: N as f64 / w1.as_secs_f64(),
            two: 2.0 * N as f64 / w2.as_secs_f64(),
        };
        println!(
            "scaling {:<34} 1 thread {:7.2} Mops/s  2 threads {:7.2} Mops/s  x{:.2}",
            s.label,
            s.one / 1e6,
            s.two / 1e6,
            s.ratio()
        );
        out.push(s);
    }
    out
}

// ---- (c) remote free -------------------------------------------------------------------------

struct Remote {
    label: String,
    local: f64,
    remote: f64,
}

/// Rounds of: K objects allocated on CPU 0 (timed), then freed one by one
/// on CPU 0 or on CPU 1 (timed). Returns (alloc ns/obj, free ns/obj), medians.
fn slab_round(m: &Machine, cache: &KmemCache, cs: &CallSite, k: usize, rounds: usize, remote: bool) -> (f64, f64) {
    let mut v: Vec<VirtAddr> = Vec::with_capacity(k);
    let (mut a, mut f) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        m.cpus.bind(0).unwrap();
        v.clear();
        let t = Instant::now();
        for _ in 0..k {
            v.push(m.kmem_cache_alloc(cache, GFP_KERNEL, cs).unwrap());
        }
        a.push(t.elapsed().as_nanos() as f64 / k as f64);
        if remote {
            m.cpus.unbind().unwrap();
            m.cpus.bind(1).unwrap();
        }
        let t = Instant::now();
        for &o in &v {
            m.kmem_cache_free(cache, o, cs).unwrap();
        }
        f.push(t.elapsed().as_nanos() as f64 / k as f64);
        m.cpus.unbind().unwrap();
    }
    (median(a), median(f))
}

fn pcp_round(m: &Machine, k: usize, rounds: usize, remote: bool) -> (f64, f64) {
    let mut v: Vec<Pfn> = Vec::with_capacity(k);
    let (mut a, mut f) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        m.cpus.bind(0).unwrap();
        v.clear();
        let t = Instant::now();
        for _ in 0..k {
            v.push(m.alloc_pages(GFP_KERNEL, 0).unwrap());
        }
        a.push(t.elapsed().as_nanos() as f64 / k as f64);
        if remote {
            m.cpus.unbind().unwrap();
            m.cpus.bind(1).unwrap();
        }
        let t = Instant::now();
        for &p in &v {
            m.free_pages(p, 0).unwrap();
        }
        f.push(t.elapsed().as_nanos() as f64 / k as f64);
        m.cpus.unbind().unwrap();
    }
    (median(a), median(f))
}

fn bench_remote(cs: &CallSite) -> Vec<Remote> {
    let mut out = Vec::new();
    for (k, rounds) in [(32usize, 20_000usize), (1000, 1_000)] {
        let (ml, mr) = (machine(), machine());
        let cl = ml.kmem_cache_create("local64", OBJ, CacheArgs::default()).unwrap().cache;
        let cr = mr.kmem_cache_create("remote64", OBJ, CacheArgs::default()).unwrap().cache;
        let (al, fl) = slab_round(&ml, &cl, cs, k, rounds, false);
        let (ar, fr) = slab_round(&mr, &cr, cs, k, rounds, true);
        println!(
            "remote  slab 64 B, K={k:<4}: free {fl:5.1} ns local, {fr:5.1} ns remote;  next alloc on CPU 0 {al:5.1} ns after local, {ar:5.1} ns after remote"
        );
        out.push(Remote { label: format!("slab free, K={k}"), local: fl, remote: fr });
        out.push(Remote { label: format!("slab alloc on CPU 0 after, K={k}"), local: al, remote: ar });
        for (m, c) in [(&ml, &cl), (&mr, &cr)] {
            let st = c.stats();
            println!(
                "        {}: alloc fast {} slow {} (refill {}, cpu partial {}, node partial {}, new slab {}), free fast {} slow {} (remote {}, frozen {})",
                c.name,
                st.alloc_fastpath,
                st.alloc_slowpath,
                st.alloc_refill,
                st.cpu_partial_alloc,
                st.alloc_from_partial,
                st.alloc_slab,
                st.free_fastpath,
                st.free_slowpath,
                st.free_remote,
                st.free_frozen
            );
            let errs = m.check_slab();
            assert!(errs.is_empty(), "{errs:?}");
        }
    }
    {
        let (ml, mr) = (machine(), machine());
        let k = 1000;
        let (al, fl) = pcp_round(&ml, k, 1_000, false);
        let (ar, fr) = pcp_round(&mr, k, 1_000, true);
        println!(
            "remote  pcp order-0, K={k}: free {fl:5.1} ns local, {fr:5.1} ns remote;  next alloc on CPU 0 {al:5.1} ns after local, {ar:5.1} ns after remote"
        );
        out.push(Remote { label: format!("pcp free, K={k}"), local: fl, remote: fr });
        out.push(Remote { label: format!("pcp alloc on CPU 0 after, K={k}"), local: al, remote: ar });
        assert!(ml.check_pcp().is_empty() && mr.check_pcp().is_empty());
    }
    out
}

// ---- (d) counters --------------------------------------------------------------------------

/// One counter alone on its cache line pair (128 B: the adjacent-line
/// prefetcher moves lines in pairs).
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

/// Two counters in one cache line (false sharing between their threads).
#[repr(align(64))]
#[derive(Default)]
struct SameLine([AtomicU64; 2]);

fn bench_counters() -> Vec<Scale> {
    const N: u64 = 20_000_000;
    let shared = AtomicU64::new(0);
    let same_line = SameLine::default();
    let padded: [Padded; 2] = Default::default();
    let padded_plain: [Padded; 2] = Default::default();
    let kinds: [(&'static str, &(dyn Fn(usize) + Sync)); 4] = [
        ("one shared AtomicU64, fetch_add", &|_| {
            for _ in 0..N {
                shared.fetch_add(1, Relaxed);
            }
        }),
        ("own counters, one line, fetch_add", &|k| {
            for _ in 0..N {
                same_line.0[k].fetch_add(1, Relaxed);
            }
        }),
        ("own padded counter, fetch_add", &|k| {
            for _ in 0..N {
                padded[k].0.fetch_add(1, Relaxed);
            }
        }),
        ("own padded counter, load+store", &|k| {
            let c = &padded_plain[k].0;
            for _ in 0..N {
                c.store(c.load(Relaxed) + 1, Relaxed);
            }
        }),
    ];
    let mut out = Vec::new();
    for (label, f) in kinds {
        let w1 = timed_threads(1, f);
        let w2 = timed_threads(2, f);
        let s = Scale { label, one: N as f64 / w1.as_secs_f64(), two: 2.0 * N as f64 / w2.as_secs_f64() };
        println!(
            "counter {label:<34} 1 thread {:7.1} Mops/s ({:5.2} ns/op)  2 threads {:7.1} Mops/s ({:5.2} ns/op each)  x{:.2}",
            s.one / 1e6,
            1e9 / s.one,
            s.two / 1e6,
            2e9 / s.two,
            s.ratio()
        );
        out.push(s);
    }
    assert_eq!(shared.load(Relaxed), N * 3 * BEST_OF as u64);
    out
}

// ---- the table -------------------------------------------------------------------------------

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let rec = Rec::default();
    let cs = unknown_call_site();
    bench_pcp(&mut c, &rec);
    // The timed sweeps only run under `cargo bench` (which passes --bench),
    // not in `cargo test --benches` smoke runs.
    if !std::env::args().any(|a| a == "--bench") {
        c.final_summary();
        return;
    }
    let (scaling, remote, counters) = (bench_scaling(&cs), bench_remote(&cs), bench_counters());

    let bound = rec.median("pcp/bound");
    let unbound = rec.median("pcp/unbound");
    let bypassed = rec.median("pcp/bypassed");
    println!("\nper-CPU ratios (pcp pair: median ns of criterion's samples; scaling and counters: best of {BEST_OF} wall times)");
    println!("{:<44} {:>12} {:>12} {:>8}  target", "benchmark", "a", "b", "b/a");
    println!(
        "{:<44} {:>9.1} ns {:>9.1} ns {:>8.2}  <= 25 ns: {}",
        "pcp order-0 pair: bound CPU 0 / pcp bypassed",
        bound,
        bypassed,
        bypassed / bound,
        verdict(bound <= 25.0)
    );
    println!(
        "{:<44} {:>9.1} ns {:>9.1} ns {:>8.2}",
        "pcp order-0 pair: bound CPU 0 / unbound",
        bound,
        unbound,
        unbound / bound
    );
    println!("{:<44} {:>12} {:>12} {:>8}", "scaling (Mops/s)", "1 thread", "2 threads", "2T/1T");
    for s in &scaling {
        println!(
            "{:<44} {:>12.2} {:>12.2} {:>8.2}  {}",
            s.label,
            s.one / 1e6,
            s.two / 1e6,
            s.ratio(),
            if s.label.contains("control") { String::new() } else { format!(">= 1.8x: {}", verdict(s.ratio() >= 1.8)) }
        );
    }
    println!("{:<44} {:>12} {:>12} {:>8}", "remote free (ns per object)", "local", "remote", "rem/loc");
    for r in &remote {
        println!("{:<44} {:>12.1} {:>12.1} {:>8.2}", r.label, r.local, r.remote, r.remote / r.local);
    }
    println!("{:<44} {:>12} {:>12} {:>8}", "host counters (Mops/s, total)", "1 thread", "2 threads", "2T/1T");
    for s in &counters {
        println!("{:<44} {:>12.1} {:>12.1} {:>8.2}", s.label, s.one / 1e6, s.two / 1e6, s.ratio());
    }
    if counters.len() == 4 {
        println!(
            "{:<44} {:>12} {:>12.1} {:>8}",
            "2 threads: padded fetch_add / shared, x",
            "",
            counters[2].two / counters[0].two,
            ""
        );
    }
    c.final_summary();
}
