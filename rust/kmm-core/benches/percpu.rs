//! Per-CPU allocator benchmarks (issue 13, part 2: mm/percpu.c's block
//! hints and chunk slots; see benches/README.md for the figures).
//!
//! - `pair_with_live/L`: one alloc_percpu + free_percpu pair (sizes from
//!   the "wide" mix: 4 B .. 1 KiB, align 8) with L allocations of that mix
//!   live. With the kernel's hints the pair's cost does not depend on L.
//! - `fill_and_free/N`: N wide-mix allocations on a fresh machine, then their
//!   frees in shuffled order (the Python bench's workload, without Python).
//!
//! Run: `cargo bench -p kmm-core --bench percpu` (`PERCPU_BENCH_MAX=10000`
//! skips the larger sizes: the allocator before issue 13 needed minutes
//! for 100,000).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion};
use kmm_core::gfp::GFP_KERNEL;
use kmm_core::{Machine, MachineConfig};

fn machine() -> Machine {
    Machine::new(MachineConfig { memory: 1 << 30, cpus: 2, ..MachineConfig::default() }).unwrap()
}

fn lcg(x: &mut u64) -> u64 {
    *x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *x >> 33
}

/// The "wide" mix: 4 B .. 1 KiB in 4-byte steps.
fn wide(x: &mut u64) -> u64 {
    (lcg(x) % 256 + 1) * 4
}

fn fill(m: &Machine, n: usize, seed: u64) -> Vec<u64> {
    let cs = kmm_core::trace::unknown_call_site();
    let mut x = seed;
    (0..n).map(|_| m.alloc_percpu(wide(&mut x), 8, GFP_KERNEL, &cs).unwrap()).collect()
}

fn main() {
    let mut c = Criterion::default().configure_from_args().warm_up_time(Duration::from_millis(500));
    let cs = kmm_core::trace::unknown_call_site();
    let max: usize = std::env::var("PERCPU_BENCH_MAX").ok().and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);

    let mut g = c.benchmark_group("percpu/pair_with_live");
    for live in [0usize, 10_000, 100_000].into_iter().filter(|&n| n <= max) {
        let m = machine();
        let keep = fill(&m, live, 13);
        // Free every third: holes of every size, as a long-running system has.
        for p in keep.iter().step_by(3) {
            m.free_percpu(*p).unwrap();
        }
        let mut x = 7u64;
        g.bench_function(format!("{live}"), |b| {
            b.iter(|| {
                let p = m.alloc_percpu(wide(&mut x), 8, GFP_KERNEL, &cs).unwrap();
                m.free_percpu(black_box(p)).unwrap();
            })
        });
        assert!(m.check_percpu().is_empty());
    }
    g.finish();

    let mut g = c.benchmark_group("percpu/fill_and_free");
    g.sample_size(10);
    for n in [2_500usize, 10_000, 100_000].into_iter().filter(|&n| n <= max) {
        g.bench_function(format!("{n}"), |b| {
            b.iter_batched(
                machine,
                |m| {
                    let mut ptrs = fill(&m, n, 13);
                    let mut s = 14u64;
                    for i in (1..ptrs.len()).rev() {
                        let j = (lcg(&mut s) % (i as u64 + 1)) as usize;
                        ptrs.swap(i, j);
                    }
                    for p in ptrs {
                        m.free_percpu(p).unwrap();
                    }
                    m
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
    c.final_summary();
}
