//! Buddy allocator benchmarks, kmm beside the `buddy_system_allocator` crate
//! in the same run (see benches/README.md for the figures).
//!
//! - `pair/order0`: alloc_pages(GFP_KERNEL, 0) + free_pages, hot.
//! - `mix/random`: random orders 0..10, allocated then freed in random order.
//! - `fragmented_free/N`: N scattered order-0 pages freed in shuffled order
//!   (kmm merges in O(1) per free from page metadata; the crate's linked-list
//!   heap searches its free lists, so its cost grows with N).
//!
//! Run: `cargo bench -p kmm-core --bench buddy`.

use std::alloc::Layout;
use std::hint::black_box;
use std::time::{Duration, Instant};

use buddy_system_allocator::Heap;
use criterion::{BatchSize, Criterion};
use kmm_core::gfp::GFP_KERNEL;
use kmm_core::{Machine, MachineConfig, Pfn};

const MEM: usize = 256 << 20;
const PAGE: usize = 4096;

fn machine() -> Machine {
    Machine::new(MachineConfig { memory: MEM as u64, ..MachineConfig::default() }).unwrap()
}

/// A buddy_system_allocator heap over MEM bytes of real memory.
struct Bsa {
    heap: Heap<33>,
    _mem: Vec<u8>,
}

impl Bsa {
    fn new() -> Bsa {
        let mut mem = vec![0u8; MEM + PAGE];
        let base = (mem.as_mut_ptr() as usize).next_multiple_of(PAGE);
        let mut heap = Heap::<33>::empty();
        // SAFETY: `mem` outlives the heap (both live in the struct) and the
        // range [base, base+MEM) lies inside it.
        unsafe { heap.init(base, MEM) };
        Bsa { heap, _mem: mem }
    }
}

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

/// Allocate n order-0 pages keeping every other one (so the survivors are
/// scattered), then return the ones to free, shuffled.
fn kmm_fragment(m: &Machine, n: usize) -> (Vec<Pfn>, Vec<Pfn>) {
    let all: Vec<Pfn> = (0..2 * n).map(|_| m.alloc_pages(GFP_KERNEL, 0).unwrap()).collect();
    let (mut free, keep): (Vec<_>, Vec<_>) = all.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let mut free: Vec<Pfn> = free.drain(..).map(|(_, p)| p).collect();
    shuffle(&mut free, n as u64);
    (free, keep.into_iter().map(|(_, p)| p).collect())
}

fn bsa_fragment(h: &mut Bsa, n: usize) -> (Vec<std::ptr::NonNull<u8>>, Vec<std::ptr::NonNull<u8>>) {
    let l = Layout::from_size_align(PAGE, PAGE).unwrap();
    let all: Vec<_> = (0..2 * n).map(|_| h.heap.alloc(l).unwrap()).collect();
    let mut free = Vec::new();
    let mut keep = Vec::new();
    for (i, p) in all.into_iter().enumerate() {
        if i % 2 == 0 {
            free.push(p)
        } else {
            keep.push(p)
        }
    }
    shuffle(&mut free, n as u64);
    (free, keep)
}

fn best_of<F: FnMut() -> Duration>(runs: usize, mut f: F) -> Duration {
    (0..runs).map(|_| f()).min().unwrap()
}

fn fragmented_sweep() {
    println!("\nfragmented_free: N scattered order-0 frees (best of 5), per free");
    println!("{:>6} {:>12} {:>12} {:>8}", "N", "kmm ns", "bsa ns", "bsa/kmm");
    let l = Layout::from_size_align(PAGE, PAGE).unwrap();
    for n in [500usize, 1000, 2000, 5000, 10000] {
        let k = best_of(5, || {
            let m = machine();
            let (free, keep) = kmm_fragment(&m, n);
            let t = Instant::now();
            for p in free {
                m.free_pages(black_box(p), 0).unwrap();
            }
            let d = t.elapsed();
            drop(keep);
            d
        });
        let b = best_of(5, || {
            let mut h = Bsa::new();
            let (free, _keep) = bsa_fragment(&mut h, n);
            let t = Instant::now();
            for p in free {
                h.heap.dealloc(black_box(p), l);
            }
            t.elapsed()
        });
        let (kn, bn) = (k.as_nanos() as f64 / n as f64, b.as_nanos() as f64 / n as f64);
        println!("{n:>6} {kn:>12.1} {bn:>12.1} {:>8.1}", bn / kn);
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args().warm_up_time(Duration::from_millis(500));
    {
        let m = machine();
        let mut g = c.benchmark_group("pair");
        g.bench_function("kmm/order0", |b| {
            b.iter(|| {
                let p = m.alloc_pages(black_box(GFP_KERNEL), 0).unwrap();
                m.free_pages(p, 0).unwrap();
            })
        });
        let mut h = Bsa::new();
        let l = Layout::from_size_align(PAGE, PAGE).unwrap();
        g.bench_function("bsa/order0", |b| {
            b.iter(|| {
                let p = h.heap.alloc(black_box(l)).unwrap();
                h.heap.dealloc(p, l);
            })
        });
        g.finish();
    }
    {
        let mut g = c.benchmark_group("mix");
        let orders: Vec<u32> = {
            let mut s = 7u64;
            (0..256).map(|_| (lcg(&mut s) % 11) as u32).collect()
        };
        let m = machine();
        g.bench_function("kmm/random_0_10_x256", |b| {
            b.iter_batched(
                || {
                    let mut idx: Vec<usize> = (0..orders.len()).collect();
                    shuffle(&mut idx, 3);
                    idx
                },
                |idx| {
                    let got: Vec<_> = orders.iter().map(|&o| m.alloc_pages(GFP_KERNEL, o).ok()).collect();
                    for i in idx {
                        if let Some(p) = got[i] {
                            m.free_pages(p, orders[i]).unwrap();
                        }
                    }
                },
                BatchSize::SmallInput,
            )
        });
        let mut h = Bsa::new();
        g.bench_function("bsa/random_0_10_x256", |b| {
            b.iter_batched(
                || {
                    let mut idx: Vec<usize> = (0..orders.len()).collect();
                    shuffle(&mut idx, 3);
                    idx
                },
                |idx| {
                    let got: Vec<_> = orders
                        .iter()
                        .map(|&o| h.heap.alloc(Layout::from_size_align(PAGE << o, PAGE << o).unwrap()).ok())
                        .collect();
                    for i in idx {
                        if let Some(p) = got[i] {
                            h.heap.dealloc(p, Layout::from_size_align(PAGE << orders[i], PAGE << orders[i]).unwrap());
                        }
                    }
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
    {
        let t = Instant::now();
        let m = Machine::new(MachineConfig::default().with_memory("64G").unwrap()).unwrap();
        let d = t.elapsed();
        drop(m);
        let best = best_of(5, || {
            let t = Instant::now();
            let m = Machine::new(MachineConfig::default().with_memory("64G").unwrap()).unwrap();
            let d = t.elapsed();
            drop(m);
            d
        });
        println!("\nboot x86_64 64G: first {d:?}, best of 5 {best:?}");
    }
    fragmented_sweep();
    c.final_summary();
}
