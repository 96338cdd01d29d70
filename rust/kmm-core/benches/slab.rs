//! Slab layer and kmalloc benchmarks, kmm beside real user-space allocators
//! in the same run (see benches/README.md for the figures).
//!
//! The peers are called through the `GlobalAlloc` trait as values (none of
//! them is this binary's `#[global_allocator]`): `std::alloc::System`
//! (glibc malloc) and `mimalloc::MiMalloc`. (tikv-jemallocator was tried
//! too; its jemalloc build takes about a minute here, paid by every fresh
//! `cargo test`, so it is not a dev-dependency.)
//!
//! - `pair/*`: one 64-byte object allocated and freed, hot, one thread.
//!   kmm: a cache made with `kmem_cache_create("bench64", 64)`, and the
//!   kmalloc-64 path (`kmalloc(64)` + `kfree`). The bench thread is bound to
//!   CPU 0 first, so kmm takes its per-CPU freelist fast path.
//! - `mixed/*`: 1000 random sizes 8..=4096 (fixed seed) allocated, then
//!   freed in a fixed random order; kmm through kmalloc/kfree, the peers
//!   with the same sizes (align 8, what malloc promises).
//! - `bulk/N/*`: N 64-byte objects: kmm's `kmem_cache_alloc_bulk` +
//!   `kmem_cache_free_bulk`, kmm's one-at-a-time loop, and the peers'
//!   N allocs then N frees (GlobalAlloc has no bulk call). Reported per object.
//!
//! At the end a ratio table (kmm / mimalloc, kmm / system) is printed from
//! the same samples criterion measured (median ns per operation).
//!
//! Run: `cargo bench -p kmm-core --bench slab`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use kmm_core::gfp::GFP_KERNEL;
use kmm_core::slab::{CacheArgs, KmemCache};
use kmm_core::trace::{unknown_call_site, CallSite};
use kmm_core::{Machine, MachineConfig};
use mimalloc::MiMalloc;

const MEM: u64 = 512 << 20;
const OBJ: usize = 64;
const MIX_N: usize = 1000;
const BULK_NS: [usize; 2] = [64, 1000];

fn lcg(x: &mut u64) -> u64 {
    *x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *x >> 33
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut s = seed;
    for i in (1..v.len()).rev() {
        let j = (lcg(&mut s) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Per-benchmark samples (ns per operation), as criterion measured them.
#[derive(Default)]
struct Rec(RefCell<BTreeMap<String, Vec<f64>>>);

impl Rec {
    /// Time `iters` runs of `f`, each counting as `ops` operations; record
    /// the sample and hand the duration to criterion.
    fn time(&self, key: &str, iters: u64, ops: usize, mut f: impl FnMut()) -> Duration {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        let d = t.elapsed();
        // Skip tiny warm-up samples whose timer overhead would dominate.
        if d >= Duration::from_micros(50) {
            let per = d.as_nanos() as f64 / (iters as f64 * ops as f64);
            self.0.borrow_mut().entry(key.to_string()).or_default().push(per);
        }
        d
    }

    fn median(&self, key: &str) -> Option<f64> {
        let mut v = self.0.borrow().get(key)?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Some(v[v.len() / 2])
    }
}

/// Run `$body` once per peer, with `$name` the peer's name and `$a` a
/// reference to the allocator value (a concrete type, so calls are direct).
macro_rules! for_each_peer {
    (|$name:ident, $a:ident| $body:block) => {{
        {
            let ($name, $a) = ("system", &System);
            $body
        }
        {
            let ($name, $a) = ("mimalloc", &MiMalloc);
            $body
        }
    }};
}

/// One malloc+free pair through `GlobalAlloc` (generic, so the call is direct).
#[inline(always)]
fn peer_pair<A: GlobalAlloc + ?Sized>(a: &A, l: Layout) {
    // SAFETY: `l` has a non-zero size; the pointer is checked and freed with
    // the same layout by the allocator that returned it.
    unsafe {
        let p = black_box(a.alloc(l));
        assert!(!p.is_null());
        a.dealloc(p, l);
    }
}

/// Allocate every size, then free in `order`; `ptrs` is reused storage.
#[inline(always)]
fn peer_mix<A: GlobalAlloc + ?Sized>(a: &A, sizes: &[Layout], order: &[usize], ptrs: &mut Vec<*mut u8>) {
    ptrs.clear();
    for &l in sizes {
        // SAFETY: every layout has a non-zero size.
        let p = unsafe { a.alloc(l) };
        assert!(!p.is_null());
        ptrs.push(black_box(p));
    }
    for &i in order {
        // SAFETY: ptrs[i] came from `a.alloc(sizes[i])` above and is freed once.
        unsafe { a.dealloc(ptrs[i], sizes[i]) };
    }
}

fn machine() -> Machine {
    let m = Machine::new(MachineConfig { memory: MEM, ..MachineConfig::default() }).unwrap();
    m.cpus.bind(0).unwrap();
    m
}

fn bench_pair(c: &mut Criterion, rec: &Rec, m: &Machine, cache: &KmemCache, cs: &CallSite) {
    let mut g = c.benchmark_group("pair");
    g.bench_function("kmm/kmem_cache64", |b| {
        b.iter_custom(|iters| {
            rec.time("pair/kmm_cache", iters, 1, || {
                let o = m.kmem_cache_alloc(cache, black_box(GFP_KERNEL), cs).unwrap();
                m.kmem_cache_free(cache, black_box(o), cs).unwrap();
            })
        })
    });
    g.bench_function("kmm/kmalloc64", |b| {
        b.iter_custom(|iters| {
            rec.time("pair/kmm_kmalloc", iters, 1, || {
                let o = m.kmalloc(black_box(OBJ as u64), GFP_KERNEL, cs).unwrap();
                m.kfree(black_box(o.0), cs).unwrap();
            })
        })
    });
    let l = Layout::from_size_align(OBJ, 8).unwrap();
    for_each_peer!(|name, a| {
        g.bench_function(format!("{name}/malloc64"), |b| {
            b.iter_custom(|iters| rec.time(&format!("pair/{name}"), iters, 1, || peer_pair(a, black_box(l))))
        });
    });
    g.finish();
}

fn bench_mixed(c: &mut Criterion, rec: &Rec, m: &Machine, cs: &CallSite) {
    let mut s = 42u64;
    let sizes: Vec<usize> = (0..MIX_N).map(|_| 8 + (lcg(&mut s) % (4096 - 8 + 1)) as usize).collect();
    let layouts: Vec<Layout> = sizes.iter().map(|&n| Layout::from_size_align(n, 8).unwrap()).collect();
    let mut order: Vec<usize> = (0..MIX_N).collect();
    shuffle(&mut order, 7);
    let mut g = c.benchmark_group("mixed");
    // Per element = one alloc + one free.
    g.throughput(Throughput::Elements(MIX_N as u64));
    let mut vas: Vec<u64> = Vec::with_capacity(MIX_N);
    g.bench_function("kmm/kmalloc_8_4096_x1000", |b| {
        b.iter_custom(|iters| {
            rec.time("mixed/kmm", iters, MIX_N, || {
                vas.clear();
                for &n in &sizes {
                    vas.push(m.kmalloc(n as u64, GFP_KERNEL, cs).unwrap().0);
                }
                for &i in &order {
                    m.kfree(vas[i], cs).unwrap();
                }
            })
        })
    });
    let mut ptrs: Vec<*mut u8> = Vec::with_capacity(MIX_N);
    for_each_peer!(|name, a| {
        g.bench_function(format!("{name}/malloc_8_4096_x1000"), |b| {
            b.iter_custom(|iters| {
                rec.time(&format!("mixed/{name}"), iters, MIX_N, || peer_mix(a, &layouts, &order, &mut ptrs))
            })
        });
    });
    g.finish();
}

fn bench_bulk(c: &mut Criterion, rec: &Rec, m: &Machine, cache: &KmemCache, cs: &CallSite) {
    let l = Layout::from_size_align(OBJ, 8).unwrap();
    for n in BULK_NS {
        let mut g = c.benchmark_group(format!("bulk/{n}"));
        g.throughput(Throughput::Elements(n as u64));
        let mut v: Vec<u64> = Vec::with_capacity(n);
        g.bench_function("kmm/alloc_bulk+free_bulk", |b| {
            b.iter_custom(|iters| {
                rec.time(&format!("bulk{n}/kmm_bulk"), iters, n, || {
                    v.clear();
                    m.kmem_cache_alloc_bulk(cache, GFP_KERNEL, n, &mut v).unwrap();
                    m.kmem_cache_free_bulk(cache, black_box(&v)).unwrap();
                })
            })
        });
        g.bench_function("kmm/alloc_loop+free_loop", |b| {
            b.iter_custom(|iters| {
                rec.time(&format!("bulk{n}/kmm_loop"), iters, n, || {
                    v.clear();
                    for _ in 0..n {
                        v.push(m.kmem_cache_alloc(cache, GFP_KERNEL, cs).unwrap().0);
                    }
                    for &o in black_box(&v).iter() {
                        m.kmem_cache_free(cache, kmm_core::VirtAddr(o), cs).unwrap();
                    }
                })
            })
        });
        let layouts = vec![l; n];
        let order: Vec<usize> = (0..n).collect();
        let mut ptrs: Vec<*mut u8> = Vec::with_capacity(n);
        for_each_peer!(|name, a| {
            g.bench_function(format!("{name}/malloc64_loop+free_loop"), |b| {
                b.iter_custom(|iters| {
                    rec.time(&format!("bulk{n}/{name}"), iters, n, || peer_mix(a, &layouts, &order, &mut ptrs))
                })
            });
        });
        g.finish();
    }
}

fn ratio_table(rec: &Rec) {
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", a / b),
        _ => "-".to_string(),
    };
    println!("\nslab ratios (median ns per operation of criterion's samples; pair = alloc+free,");
    println!("mixed = one alloc + one free, bulk = per object)");
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "benchmark", "kmm", "system", "mimalloc", "kmm/mi", "kmm/sys"
    );
    let mut rows: Vec<(String, String, String)> = vec![
        ("pair: kmem_cache 64".into(), "pair/kmm_cache".into(), "pair".into()),
        ("pair: kmalloc-64".into(), "pair/kmm_kmalloc".into(), "pair".into()),
        ("mixed 8..4096 x1000".into(), "mixed/kmm".into(), "mixed".into()),
    ];
    for n in BULK_NS {
        rows.push((format!("bulk {n}: alloc/free_bulk"), format!("bulk{n}/kmm_bulk"), format!("bulk{n}")));
        rows.push((format!("bulk {n}: kmem_cache loop"), format!("bulk{n}/kmm_loop"), format!("bulk{n}")));
    }
    for (label, key, peer) in rows {
        let k = rec.median(&key);
        let s = rec.median(&format!("{peer}/system"));
        let mi = rec.median(&format!("{peer}/mimalloc"));
        println!(
            "{label:<28} {:>9} {:>9} {:>9} {:>9} {:>9}",
            f(k),
            f(s),
            f(mi),
            r(k, mi),
            r(k, s)
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let rec = Rec::default();
    let m = machine();
    let cs = unknown_call_site();
    let cache = m.kmem_cache_create("bench64", OBJ as u32, CacheArgs::default()).unwrap().cache;
    bench_pair(&mut c, &rec, &m, &cache, &cs);
    bench_mixed(&mut c, &rec, &m, &cs);
    bench_bulk(&mut c, &rec, &m, &cache, &cs);
    let errs = m.check_slab();
    assert!(errs.is_empty(), "slab invariants broken after the benches: {errs:?}");
    ratio_table(&rec);
    c.final_summary();
}
