//! Real threads on one shared machine: each thread bound to its own simulated
//! CPU, objects and pages allocated on one CPU and freed on another (remote
//! frees), then everything given back. Afterwards the machine must be exactly
//! as it booted: every page free (buddy + per-CPU lists), the buddy lists
//! identical once the per-CPU lists are drained, and every invariant intact.
//!
//! Every allocation carries a tag written by its allocating thread and checked
//! by the freeing one, so two threads handed the same memory would be caught.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::{Arc, Barrier};

use kmm_core::gfp::*;
use kmm_core::slab::geometry::SLAB_NO_MERGE;
use kmm_core::slab::{CacheArgs, KmemCache};
use kmm_core::trace::unknown_call_site;
use kmm_core::{Machine, MachineConfig, Pfn, VirtAddr};

/// xorshift64*: a seeded generator, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One live allocation, with the tag written into its first 8 bytes.
#[derive(Clone, Copy, Debug)]
enum Item {
    Obj { va: u64, tag: u64 },
    Kmalloc { va: u64, tag: u64 },
    Pages { pfn: u64, order: u32, tag: u64 },
}

fn boot(cpus: u32) -> Machine {
    Machine::new(MachineConfig { cpus, ..MachineConfig::default() }).unwrap()
}

fn buddy(m: &Machine) -> Vec<Vec<u64>> {
    m.zones.iter().map(|z| z.area.lock().nr_free.to_vec()).collect()
}

fn all_free(m: &Machine) -> u64 {
    m.nr_free_pages() + m.nr_pcp_pages()
}

fn ok(m: &Machine) {
    let e = m.check();
    assert!(e.is_empty(), "{e:#?}");
}

fn write_tag(m: &Machine, va: u64, tag: u64) {
    m.write(VirtAddr(va), &tag.to_le_bytes()).unwrap();
}

fn read_tag(m: &Machine, va: u64) -> u64 {
    u64::from_le_bytes(m.read(VirtAddr(va), 8).unwrap().try_into().unwrap())
}

fn alloc_item(m: &Machine, c: &KmemCache, rng: &mut Rng, tag: u64) -> Item {
    let cs = unknown_call_site();
    match rng.below(10) {
        0..=3 => {
            let va = m.kmem_cache_alloc(c, GFP_KERNEL, &cs).unwrap().0;
            write_tag(m, va, tag);
            Item::Obj { va, tag }
        }
        4..=6 => {
            // Mostly slab sizes, sometimes a large kmalloc (page allocator).
            let size = if rng.below(20) == 0 { 8193 + rng.below(24000) } else { 8 + rng.below(4089) };
            let va = m.kmalloc(size, GFP_KERNEL, &cs).unwrap().0;
            write_tag(m, va, tag);
            Item::Kmalloc { va, tag }
        }
        _ => {
            // pcp-sized orders 0..=3 mostly, sometimes order 4 (buddy direct).
            let order = match rng.below(16) {
                0 => 4,
                1..=2 => 3,
                3..=4 => 2,
                5..=7 => 1,
                _ => 0,
            };
            let gfp = if rng.below(2) == 0 { GFP_KERNEL } else { GFP_HIGHUSER_MOVABLE };
            let pfn = m.alloc_pages(gfp, order).unwrap();
            let va = m.page_address(pfn).unwrap().0;
            write_tag(m, va, tag);
            Item::Pages { pfn: pfn.0, order, tag }
        }
    }
}

fn free_item(m: &Machine, c: &KmemCache, it: Item) {
    let cs = unknown_call_site();
    match it {
        Item::Obj { va, tag } => {
            assert_eq!(read_tag(m, va), tag, "cache object {va:#x} was overwritten");
            m.kmem_cache_free(c, VirtAddr(va), &cs).unwrap();
        }
        Item::Kmalloc { va, tag } => {
            assert_eq!(read_tag(m, va), tag, "kmalloc object {va:#x} was overwritten");
            m.kfree(va, &cs).unwrap();
        }
        Item::Pages { pfn, order, tag } => {
            let va = m.page_address(Pfn(pfn)).unwrap().0;
            assert_eq!(read_tag(m, va), tag, "page {pfn:#x} was overwritten");
            m.free_pages(Pfn(pfn), order).unwrap();
        }
    }
}

/// Free everything cached: flush and shrink every cache, drain every pcp list.
fn settle(m: &Machine) {
    for c in m.slab.caches() {
        m.kmem_cache_shrink(&c).unwrap();
    }
    m.drain_all_pages();
}

fn pcp_contention(m: &Machine) -> u64 {
    m.zones.iter().flat_map(|z| z.pcp.iter()).map(|s| s.contended.load(Relaxed)).sum()
}

fn slab_contention(m: &Machine) -> u64 {
    m.slab.caches().iter().flat_map(|c| c.cpu_contention()).sum()
}

/// The brief's shape: one producer on CPU 0 allocating cache objects, kmalloc
/// objects and pages, one consumer on CPU 1 freeing them. 200k operations.
#[test]
fn producer_on_cpu0_consumer_on_cpu1() {
    let m = Arc::new(boot(2));
    let boot_free = all_free(&m);
    let boot_buddy = buddy(&m);
    let cache = m.kmem_cache_create("stress_obj", 120, CacheArgs { flags: SLAB_NO_MERGE, ..Default::default() }).unwrap().cache;
    assert_eq!(all_free(&m), boot_free, "creating a cache allocates no pages");
    const PRODUCED: u64 = 100_000; // + 100_000 frees = 200k operations

    let (tx, rx) = mpsc::channel::<Item>();
    std::thread::scope(|s| {
        let (mp, cp) = (m.clone(), cache.clone());
        s.spawn(move || {
            mp.cpus.bind(0).unwrap();
            assert_eq!(mp.this_cpu(), 0);
            let mut rng = Rng::new(1);
            for i in 0..PRODUCED {
                let it = alloc_item(&mp, &cp, &mut rng, (1 << 56) | i);
                tx.send(it).unwrap();
            }
            drop(tx);
            mp.cpus.unbind().unwrap();
        });
        let (mc, cc) = (m.clone(), cache.clone());
        s.spawn(move || {
            mc.cpus.bind(1).unwrap();
            assert_eq!(mc.this_cpu(), 1);
            let mut n = 0u64;
            for it in rx {
                free_item(&mc, &cc, it);
                n += 1;
            }
            assert_eq!(n, PRODUCED);
            mc.cpus.unbind().unwrap();
        });
    });

    let st = cache.stats();
    assert!(st.free_remote > 0, "frees on CPU 1 of CPU 0's slab objects are remote: {st:?}");
    assert_eq!(st.free_fastpath, 0, "CPU 1 never allocated from this cache: {st:?}");
    assert_eq!(cache.objects_in_use(&m), 0);
    // Each thread on its own CPU: nobody ever waited for a per-CPU lock.
    assert_eq!(cache.cpu_contention(), vec![0, 0]);
    assert_eq!(slab_contention(&m), 0);
    assert_eq!(pcp_contention(&m), 0);
    ok(&m);

    settle(&m);
    ok(&m);
    assert_eq!(m.nr_pcp_pages(), 0);
    assert_eq!(all_free(&m), boot_free);
    assert_eq!(m.nr_free_pages(), boot_free);
    assert_eq!(buddy(&m), boot_buddy);
    m.kmem_cache_destroy(&cache).unwrap();
    ok(&m);
}

/// Four threads on four CPUs in a ring: each allocates, keeps some, frees
/// some itself and sends some to the next thread. 200k operations in all.
#[test]
fn ring_of_four_cpus_with_local_and_remote_frees() {
    const THREADS: u32 = 4;
    const OPS: u64 = 50_000; // per thread
    let m = Arc::new(boot(THREADS));
    let boot_free = all_free(&m);
    let boot_buddy = buddy(&m);
    let cache = m.kmem_cache_create("ring_obj", 200, CacheArgs { flags: SLAB_NO_MERGE, ..Default::default() }).unwrap().cache;

    let mut txs = Vec::new();
    let mut rxs = Vec::new();
    for _ in 0..THREADS {
        let (tx, rx) = mpsc::channel::<Item>();
        txs.push(Some(tx));
        rxs.push(Some(rx));
    }
    let barrier = Barrier::new(THREADS as usize);
    std::thread::scope(|s| {
        for k in 0..THREADS {
            let tx = txs[((k + 1) % THREADS) as usize].take().unwrap();
            let rx = rxs[k as usize].take().unwrap();
            let (m, c, barrier) = (m.clone(), cache.clone(), &barrier);
            s.spawn(move || {
                m.cpus.bind(k).unwrap();
                barrier.wait(); // all bound before anyone allocates
                assert_eq!(m.this_cpu(), k);
                let mut rng = Rng::new(100 + k as u64);
                let mut live: Vec<Item> = Vec::new();
                let mut seq = 0u64;
                for _ in 0..OPS {
                    // Free what arrived from the previous CPU.
                    while let Ok(it) = rx.try_recv() {
                        free_item(&m, &c, it);
                    }
                    let r = rng.below(100);
                    if r < 50 || live.is_empty() {
                        seq += 1;
                        let it = alloc_item(&m, &c, &mut rng, ((k as u64 + 1) << 56) | seq);
                        live.push(it);
                    } else if r < 80 {
                        let i = rng.below(live.len() as u64) as usize;
                        let it = live.swap_remove(i);
                        free_item(&m, &c, it);
                    } else {
                        let i = rng.below(live.len() as u64) as usize;
                        let it = live.swap_remove(i);
                        tx.send(it).unwrap();
                    }
                    if live.len() > 3000 {
                        for it in live.drain(..1000) {
                            free_item(&m, &c, it);
                        }
                    }
                }
                for it in live.drain(..) {
                    free_item(&m, &c, it);
                }
                drop(tx);
                for it in rx {
                    free_item(&m, &c, it);
                }
                m.cpus.unbind().unwrap();
            });
        }
    });

    let st = cache.stats();
    assert!(st.free_remote > 0, "{st:?}");
    assert!(st.free_fastpath > 0, "{st:?}");
    assert_eq!(cache.objects_in_use(&m), 0);
    assert_eq!(cache.cpu_contention(), vec![0; THREADS as usize]);
    assert_eq!(slab_contention(&m), 0);
    assert_eq!(pcp_contention(&m), 0);
    ok(&m);

    settle(&m);
    ok(&m);
    assert_eq!(all_free(&m), boot_free);
    assert_eq!(buddy(&m), boot_buddy);
}

/// Bulk allocation and freeing on two CPUs at once, and a cross-CPU bulk
/// free: the objects one CPU allocated freed in bulk by the other.
#[test]
fn bulk_on_two_cpus_with_cross_frees() {
    let m = Arc::new(boot(2));
    let boot_free = all_free(&m);
    let boot_buddy = buddy(&m);
    let cache = m.kmem_cache_create("bulk_obj", 64, CacheArgs { flags: SLAB_NO_MERGE, ..Default::default() }).unwrap().cache;
    let (tx0, rx1) = mpsc::channel::<Vec<u64>>();
    let (tx1, rx0) = mpsc::channel::<Vec<u64>>();
    std::thread::scope(|s| {
        for (k, tx, rx) in [(0u32, tx0, rx0), (1u32, tx1, rx1)] {
            let (m, c) = (m.clone(), cache.clone());
            s.spawn(move || {
                m.cpus.bind(k).unwrap();
                for round in 0..200 {
                    let mut v = Vec::new();
                    m.kmem_cache_alloc_bulk(&c, GFP_KERNEL, 500, &mut v).unwrap();
                    assert_eq!(v.len(), 500);
                    if round % 4 == 0 {
                        tx.send(v).unwrap();
                    } else {
                        m.kmem_cache_free_bulk(&c, &v).unwrap();
                    }
                    while let Ok(v) = rx.try_recv() {
                        m.kmem_cache_free_bulk(&c, &v).unwrap();
                    }
                }
                drop(tx);
                for v in rx {
                    m.kmem_cache_free_bulk(&c, &v).unwrap();
                }
                m.cpus.unbind().unwrap();
            });
        }
    });
    assert_eq!(cache.objects_in_use(&m), 0);
    assert_eq!(cache.cpu_contention(), vec![0, 0]);
    // Cross frees of full slabs went through the slow path of the freeing CPU.
    assert!(cache.stats().free_slowpath > 0);
    ok(&m);
    settle(&m);
    ok(&m);
    assert_eq!(all_free(&m), boot_free);
    assert_eq!(buddy(&m), boot_buddy);
}

/// Binding is affinity: two threads per CPU (four threads on two CPUs) take
/// turns through the per-CPU locks; the pcp trylock falls back to the buddy
/// allocator when the other thread holds it. 200k operations in all.
#[test]
fn two_threads_per_cpu_share_its_locks() {
    const THREADS: u32 = 4;
    const OPS: u64 = 50_000;
    let m = Arc::new(boot(2));
    let boot_free = all_free(&m);
    let boot_buddy = buddy(&m);
    let cache = m.kmem_cache_create("shared_obj", 88, CacheArgs { flags: SLAB_NO_MERGE, ..Default::default() }).unwrap().cache;
    let mut txs = Vec::new();
    let mut rxs = Vec::new();
    for _ in 0..THREADS {
        let (tx, rx) = mpsc::channel::<Item>();
        txs.push(Some(tx));
        rxs.push(Some(rx));
    }
    let barrier = Barrier::new(THREADS as usize);
    std::thread::scope(|s| {
        for k in 0..THREADS {
            // Thread k sends to thread k+1: sometimes the same CPU, sometimes not.
            let tx = txs[((k + 1) % THREADS) as usize].take().unwrap();
            let rx = rxs[k as usize].take().unwrap();
            let (m, c, barrier) = (m.clone(), cache.clone(), &barrier);
            s.spawn(move || {
                let cpu = k / 2;
                m.cpus.bind(cpu).unwrap();
                barrier.wait();
                let mut rng = Rng::new(7 + k as u64);
                let mut live: Vec<Item> = Vec::new();
                for seq in 0..OPS {
                    assert_eq!(m.this_cpu(), cpu);
                    while let Ok(it) = rx.try_recv() {
                        free_item(&m, &c, it);
                    }
                    let r = rng.below(100);
                    if r < 50 || live.is_empty() {
                        live.push(alloc_item(&m, &c, &mut rng, ((k as u64 + 1) << 56) | seq));
                    } else {
                        let i = rng.below(live.len() as u64) as usize;
                        let it = live.swap_remove(i);
                        if r < 85 {
                            free_item(&m, &c, it);
                        } else {
                            tx.send(it).unwrap();
                        }
                    }
                    if live.len() > 2000 {
                        for it in live.drain(..500) {
                            free_item(&m, &c, it);
                        }
                    }
                }
                for it in live.drain(..) {
                    free_item(&m, &c, it);
                }
                drop(tx);
                for it in rx {
                    free_item(&m, &c, it);
                }
                m.cpus.unbind().unwrap();
            });
        }
    });
    assert_eq!(cache.objects_in_use(&m), 0);
    ok(&m);
    settle(&m);
    ok(&m);
    assert_eq!(all_free(&m), boot_free);
    assert_eq!(buddy(&m), boot_buddy);
}

/// A thread with preemption disabled keeps its CPU: another thread bound to
/// the same CPU allocates only after preempt_enable.
#[test]
fn preempt_disabled_cpu_makes_the_other_thread_wait() {
    use kmm_core::cpu::{PREEMPT_MASK, PREEMPT_OFFSET};
    use std::sync::atomic::AtomicU32;
    let m = Arc::new(boot(2));
    let step = AtomicU32::new(0);
    let (a_at, b_at) = (AtomicU32::new(0), AtomicU32::new(0));
    let cs = unknown_call_site();
    std::thread::scope(|s| {
        s.spawn(|| {
            m.cpus.bind(0).unwrap();
            assert_eq!(m.cpus.preempt_add(PREEMPT_OFFSET, false), 0);
            let contended0 = m.cpus.slot(0).contended.load(Relaxed);
            step.store(1, Relaxed); // B may go
            // Wait (bounded) until B is seen waiting for CPU 0.
            let mut waited = false;
            for _ in 0..2_000_000 {
                if m.cpus.slot(0).contended.load(Relaxed) > contended0 {
                    waited = true;
                    break;
                }
                std::thread::yield_now();
            }
            assert!(waited, "B never waited for CPU 0");
            a_at.store(step.fetch_add(1, Relaxed) + 1, Relaxed);
            m.cpus.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false).unwrap();
            m.cpus.unbind().unwrap();
        });
        s.spawn(|| {
            m.cpus.bind(0).unwrap();
            while step.load(Relaxed) == 0 {
                std::thread::yield_now();
            }
            assert!(!m.cpus.in_atomic(), "preempt_count is per thread");
            let va = m.kmalloc(64, GFP_KERNEL, &cs).unwrap();
            b_at.store(step.fetch_add(1, Relaxed) + 1, Relaxed);
            m.kfree(va.0, &cs).unwrap();
            m.cpus.unbind().unwrap();
        });
    });
    assert_eq!((a_at.load(Relaxed), b_at.load(Relaxed)), (2, 3), "B allocated only after A's preempt_enable");
    ok(&m);
}
