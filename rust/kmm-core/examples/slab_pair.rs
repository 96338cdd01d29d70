//! A hot loop of kmem_cache alloc+free pairs (64 B), for profiling.
use kmm_core::gfp::GFP_KERNEL;
use kmm_core::slab::CacheArgs;
use kmm_core::trace::unknown_call_site;
use kmm_core::{Machine, MachineConfig};

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20_000_000);
    let m = Machine::new(MachineConfig::default()).unwrap();
    m.cpus.bind(0).unwrap();
    let c = m.kmem_cache_create("bench64", 64, CacheArgs::default()).unwrap().cache;
    let cs = unknown_call_site();
    let t = std::time::Instant::now();
    for _ in 0..n {
        let o = m.kmem_cache_alloc(&c, std::hint::black_box(GFP_KERNEL), &cs).unwrap();
        m.kmem_cache_free(&c, o, &cs).unwrap();
    }
    println!("kmem_cache pair: {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let t = std::time::Instant::now();
    for _ in 0..n {
        let o = m.kmalloc(std::hint::black_box(64), GFP_KERNEL, &cs).unwrap();
        m.kfree(o.0, &cs).unwrap();
    }
    println!("kmalloc pair: {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
}
