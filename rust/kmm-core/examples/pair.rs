//! A hot loop of order-0 alloc+free pairs, for profiling (`perf record`).
use kmm_core::gfp::GFP_KERNEL;
use kmm_core::{Machine, MachineConfig};

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10_000_000);
    let m = Machine::new(MachineConfig::default()).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..n {
        let p = m.alloc_pages(std::hint::black_box(GFP_KERNEL), 0).unwrap();
        m.free_pages(p, 0).unwrap();
    }
    println!("{:.1} ns/pair", t.elapsed().as_nanos() as f64 / n as f64);
}
