//! The slab layer and kmalloc: allocation, freeing, states, errors,
//! accounting back to the buddy allocator.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use kmm_core::gfp::*;
use kmm_core::kmalloc::ZERO_SIZE_PTR;
use kmm_core::slab::geometry::*;
use kmm_core::slab::CacheArgs;
use kmm_core::trace::unknown_call_site;
use kmm_core::{KmmError, Machine, MachineConfig, VirtAddr};

fn machine() -> Machine {
    Machine::new(MachineConfig { memory: 256 << 20, ..MachineConfig::default() }).unwrap()
}

fn ok(m: &Machine) {
    let e = m.check();
    assert!(e.is_empty(), "{e:#?}");
}

/// Free pages, counting those waiting on the per-CPU lists.
fn free_pages(m: &Machine) -> u64 {
    m.nr_free_pages() + m.nr_pcp_pages()
}

#[test]
fn boot_creates_the_kmalloc_families() {
    let m = machine();
    let names: Vec<String> = m.slab.caches().iter().map(|c| c.name.clone()).collect();
    // Newest first: vmalloc_init's vmap_area, kmalloc-cg-8k ... and
    // kmem_cache last, like /proc/slabinfo.
    assert_eq!(names.last().unwrap(), "kmem_cache");
    assert_eq!(names[names.len() - 2], "kmem_cache_node");
    assert_eq!(names[0], "vmap_area");
    assert_eq!(names[1], "kmalloc-cg-8k");
    for n in ["kmalloc-96", "kmalloc-rcl-192", "dma-kmalloc-8", "kmalloc-cg-1k", "kmalloc-8k"] {
        assert!(names.iter().any(|x| x == n), "{n}");
    }
    assert_eq!(names.len(), 3 + 4 * 13);
    let k96 = m.slab.find("kmalloc-96").unwrap();
    assert_eq!((k96.geo.size, k96.geo.objects, k96.geo.order, k96.geo.align), (96, 42, 0, 32));
    let kc = m.slab.find("kmem_cache").unwrap();
    assert_eq!((kc.geo.size, kc.geo.objects), (256, 16), "as in the real slabinfo");
    ok(&m);
}

#[test]
fn kmalloc_classes_and_ksize() {
    let m = machine();
    let cs = unknown_call_site();
    for (req, want) in [(1, 8), (8, 8), (9, 16), (33, 64), (65, 96), (97, 128), (129, 192), (193, 256), (1000, 1024), (4097, 8192)] {
        let a = m.kmalloc(req, GFP_KERNEL, &cs).unwrap();
        assert_eq!(m.ksize(a.0).unwrap(), want, "kmalloc({req})");
        m.kfree(a.0, &cs).unwrap();
    }
    // Large: page allocator, PAGE_SIZE << order.
    let big = m.kmalloc(20000, GFP_KERNEL, &cs).unwrap();
    assert_eq!(m.ksize(big.0).unwrap(), 32768);
    m.kfree(big.0, &cs).unwrap();
    assert_eq!(m.kmalloc(0, GFP_KERNEL, &cs).unwrap(), VirtAddr(ZERO_SIZE_PTR));
    m.kfree(ZERO_SIZE_PTR, &cs).unwrap();
    m.kfree(0, &cs).unwrap();
    assert_eq!(m.ksize(ZERO_SIZE_PTR).unwrap(), 0);
    assert!(matches!(m.kmalloc(5 << 20, GFP_KERNEL, &cs), Err(KmmError::OutOfMemory { .. })));
    ok(&m);
}

#[test]
fn kmalloc_type_picks_the_family() {
    let m = machine();
    assert_eq!(m.kmalloc_slab(64, GFP_KERNEL).name, "kmalloc-64");
    assert_eq!(m.kmalloc_slab(64, GFP_KERNEL | __GFP_RECLAIMABLE).name, "kmalloc-rcl-64");
    assert_eq!(m.kmalloc_slab(64, GFP_KERNEL | GFP_DMA).name, "dma-kmalloc-64");
    assert_eq!(m.kmalloc_slab(64, GFP_KERNEL_ACCOUNT).name, "kmalloc-cg-64");
    assert_eq!(m.kmalloc_slab(64, GFP_DMA | __GFP_RECLAIMABLE | __GFP_ACCOUNT).name, "dma-kmalloc-64");
    assert_eq!(m.kmalloc_slab(64, __GFP_RECLAIMABLE | __GFP_ACCOUNT).name, "kmalloc-rcl-64");
    let cs = unknown_call_site();
    let a = m.kmalloc(100, GFP_KERNEL | GFP_DMA, &cs).unwrap();
    let pfn = m.virt_to_pfn(a).unwrap();
    assert_eq!(m.pfn_zone(pfn).unwrap().kind.name(), "DMA");
    m.kfree(a.0, &cs).unwrap();
}

#[test]
fn cache_lifecycle_returns_every_page() {
    let m = machine();
    let boot_free = free_pages(&m);
    let c = m.kmem_cache_create("test_obj", 200, CacheArgs::default()).unwrap();
    assert!(!c.merged);
    let c = c.cache;
    let cs = unknown_call_site();
    let mut objs = Vec::new();
    for _ in 0..1000 {
        objs.push(m.kmem_cache_alloc(&c, GFP_KERNEL, &cs).unwrap());
    }
    ok(&m);
    let mut sorted: Vec<u64> = objs.iter().map(|v| v.0).collect();
    sorted.sort();
    assert!(sorted.windows(2).all(|w| w[1] - w[0] >= c.geo.size as u64), "no overlap");
    assert!(free_pages(&m) < boot_free);
    for (i, o) in objs.iter().enumerate() {
        if i % 2 == 0 {
            m.kmem_cache_free(&c, *o, &cs).unwrap();
        }
    }
    ok(&m);
    for (i, o) in objs.iter().enumerate() {
        if i % 2 == 1 {
            m.kmem_cache_free(&c, *o, &cs).unwrap();
        }
    }
    ok(&m);
    assert_eq!(c.objects_in_use(&m), 0);
    m.kmem_cache_shrink(&c).unwrap();
    ok(&m);
    assert_eq!(free_pages(&m), boot_free);
    m.kmem_cache_destroy(&c).unwrap();
    assert!(m.kmem_cache_alloc(&c, GFP_KERNEL, &cs).is_err());
    ok(&m);
}

#[test]
fn errors_change_nothing() {
    let m = machine();
    let cs = unknown_call_site();
    let a = m.slab.find("kmalloc-64").unwrap();
    let b = m.kmem_cache_create("other", 64, CacheArgs { flags: SLAB_NO_MERGE, ..Default::default() }).unwrap().cache;
    let x = m.kmem_cache_alloc(&a, GFP_KERNEL, &cs).unwrap();
    let before = (a.objects_in_use(&m), free_pages(&m));
    assert!(matches!(m.kmem_cache_free(&b, x, &cs), Err(KmmError::InvalidFree(e)) if e.contains("Wrong slab cache")));
    assert!(matches!(m.kfree(x.0 + 8, &cs), Err(KmmError::InvalidFree(e)) if e.contains("Invalid object pointer")));
    assert!(matches!(m.kfree(0x1234_5678, &cs), Err(KmmError::InvalidFree(_))));
    assert_eq!((a.objects_in_use(&m), free_pages(&m)), before);
    m.kfree(x.0, &cs).unwrap();
    assert!(matches!(m.kfree(x.0, &cs), Err(KmmError::DoubleFree(e)) if e.contains("Object already free")));
    let y = m.kmem_cache_alloc(&b, GFP_KERNEL, &cs).unwrap();
    assert!(matches!(m.kmem_cache_destroy(&b), Err(KmmError::Busy(e)) if e.contains("Slab cache still has objects")));
    // Still usable after the refused destroy.
    let z = m.kmem_cache_alloc(&b, GFP_KERNEL, &cs).unwrap();
    m.kmem_cache_free(&b, y, &cs).unwrap();
    m.kmem_cache_free(&b, z, &cs).unwrap();
    m.kmem_cache_destroy(&b).unwrap();
    assert!(m.kmem_cache_create("", 8, CacheArgs::default()).is_err());
    assert!(m.kmem_cache_create("x", 0, CacheArgs::default()).is_err());
    assert!(m.kmem_cache_create("x", 64, CacheArgs { align: 3, ..Default::default() }).is_err());
    assert!(matches!(m.kmalloc_array(1 << 40, 1 << 40, GFP_KERNEL, &cs), Err(KmmError::InvalidArgument(_))));
    ok(&m);
}

#[test]
fn merging_follows_find_mergeable() {
    let m = machine();
    let a = m.kmem_cache_create("a56", 56, CacheArgs::default()).unwrap();
    let b = m.kmem_cache_create("b52", 52, CacheArgs::default()).unwrap();
    assert!(!a.merged);
    assert!(b.merged, "52 rounds to 56 and merges with a56");
    assert_eq!(b.cache.id, a.cache.id);
    let c = m.kmem_cache_create("c56", 56, CacheArgs { flags: SLAB_RECLAIM_ACCOUNT, ..Default::default() }).unwrap();
    assert!(!c.merged, "SLAB_MERGE_SAME differs");
    let d = m.kmem_cache_create("d56", 56, CacheArgs { ctor: Some(Arc::new(|_| {})), ..Default::default() }).unwrap();
    assert!(!d.merged, "ctor caches never merge");
    m.kmem_cache_destroy(&b.cache).unwrap();
    assert!(!a.cache.dead.load(Relaxed));
    m.kmem_cache_destroy(&a.cache).unwrap();
    assert!(a.cache.dead.load(Relaxed));
}

#[test]
fn ctor_runs_once_per_object_when_the_slab_is_set_up() {
    let m = machine();
    let calls = Arc::new(AtomicU64::new(0));
    let c2 = calls.clone();
    let c = m
        .kmem_cache_create("ctor_cache", 100, CacheArgs { ctor: Some(Arc::new(move |_| { c2.fetch_add(1, Relaxed); })), ..Default::default() })
        .unwrap()
        .cache;
    let cs = unknown_call_site();
    let x = m.kmem_cache_alloc(&c, GFP_KERNEL, &cs).unwrap();
    assert_eq!(calls.load(Relaxed), c.geo.objects as u64);
    m.kmem_cache_free(&c, x, &cs).unwrap();
    let y = m.kmem_cache_alloc(&c, GFP_KERNEL, &cs).unwrap();
    assert_eq!(calls.load(Relaxed), c.geo.objects as u64, "reuse does not run the ctor again");
    m.kmem_cache_free(&c, y, &cs).unwrap();
}

#[test]
fn debug_cache_catches_redzone_and_poison_damage() {
    let m = machine();
    let cs = unknown_call_site();
    // mm/slub.c checks objects at alloc and free only with SLAB_CONSISTENCY_CHECKS (F).
    let c = m
        .kmem_cache_create("dbg", 40, CacheArgs { flags: SLAB_CONSISTENCY_CHECKS | SLAB_RED_ZONE | SLAB_POISON, ..Default::default() })
        .unwrap()
        .cache;
    let x = m.kmem_cache_alloc(&c, GFP_KERNEL, &cs).unwrap();
    // Write one byte past the object: the right red zone.
    m.write(VirtAddr(x.0 + 40), &[0]).unwrap();
    match m.kmem_cache_free(&c, x, &cs) {
        Err(KmmError::MemoryCorruption(e)) => {
            assert!(e.contains("[Right Redzone overwritten]"), "{e}");
            assert!(e.contains(&format!("Object at {:#018x} not freed", x.0)), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // The report restored the red zone, so the free now works.
    m.kmem_cache_free(&c, x, &cs).unwrap();
    // A freed object is poisoned: 0x6b... ending in 0xa5.
    let p = m.read(x, 40).unwrap();
    assert!(p[..39].iter().all(|&b| b == 0x6b) && p[39] == 0xa5);
    // Use after free (a write into the freed object) is caught at the next
    // allocation, which takes that object: its slab is isolated and the
    // allocation is served from a new slab.
    m.write(VirtAddr(x.0 + 3), &[1]).unwrap();
    let y = m.kmem_cache_alloc(&c, GFP_KERNEL, &cs).unwrap();
    assert_ne!(y, x);
    let log = m.dmesg();
    assert!(log.contains("[Poison overwritten]") && log.contains("FIX dbg: Marking all objects used"), "{log}");
    assert!(m.check().is_empty(), "{:?}", m.check());
}

#[test]
fn without_consistency_checks_validate_finds_what_free_does_not() {
    let m = machine();
    let cs = unknown_call_site();
    let c = m
        .kmem_cache_create("dbg_nof", 40, CacheArgs { flags: SLAB_RED_ZONE | SLAB_POISON, ..Default::default() })
        .unwrap()
        .cache;
    let x = m.kmem_cache_alloc(&c, GFP_KERNEL, &cs).unwrap();
    let keep = m.kmem_cache_alloc(&c, GFP_KERNEL, &cs).unwrap();
    m.write(VirtAddr(keep.0 + 40), &[7]).unwrap();
    m.kmem_cache_free(&c, x, &cs).unwrap();
    let (errors, report) = c.validate(&m);
    // check_bytes_and_report (1) + restore_bytes' FIX (1).
    assert_eq!(errors, 2, "{report}");
    assert!(report.contains("[Right Redzone overwritten]") && report.contains("First byte 0x7 instead of 0xcc"), "{report}");
    assert_eq!(c.validate(&m).0, 0);
    m.kmem_cache_free(&c, keep, &cs).unwrap();
    assert!(m.check().is_empty(), "{:?}", m.check());
}

#[test]
fn remote_free_goes_back_through_the_slow_path() {
    let m = Arc::new(machine());
    let cs = unknown_call_site();
    let c = m.kmem_cache_create("remote", 64, CacheArgs { flags: SLAB_NO_MERGE, ..Default::default() }).unwrap().cache;
    m.cpus.bind(0).unwrap();
    // Fill CPU 0's slab exactly: its CPU freelist is then empty.
    let n = c.geo.objects as usize;
    let all: Vec<u64> = (0..n).map(|_| m.kmem_cache_alloc(&c, GFP_KERNEL, &cs).unwrap().0).collect();
    let objs: Vec<u64> = all[..10].to_vec();
    let mut freed = objs.clone();
    let (m2, c2) = (m.clone(), c.clone());
    std::thread::spawn(move || {
        m2.cpus.bind(1).unwrap();
        let cs = unknown_call_site();
        for o in objs {
            m2.kmem_cache_free(&c2, VirtAddr(o), &cs).unwrap();
        }
        m2.cpus.unbind().unwrap();
    })
    .join()
    .unwrap();
    let st = c.stats();
    assert_eq!(st.free_remote, 10, "{st:?}");
    assert_eq!(st.free_fastpath, 0);
    ok(&m);
    // CPU 0 picks the remotely freed objects up again from its slab's freelist.
    let mut again: Vec<u64> = (0..10).map(|_| m.kmem_cache_alloc(&c, GFP_KERNEL, &cs).unwrap().0).collect();
    assert_eq!(c.stats().alloc_refill, 1);
    again.sort();
    freed.sort();
    assert_eq!(again, freed);
    for o in again.into_iter().chain(all[10..].iter().copied()) {
        m.kmem_cache_free(&c, VirtAddr(o), &cs).unwrap();
    }
    m.cpus.unbind().unwrap();
    ok(&m);
}

#[test]
fn bulk_is_all_or_nothing() {
    let m = machine();
    let c = m.slab.find("kmalloc-128").unwrap();
    let mut v = Vec::new();
    m.kmem_cache_alloc_bulk(&c, GFP_KERNEL, 500, &mut v).unwrap();
    assert_eq!(v.len(), 500);
    let before = c.objects_in_use(&m);
    let mut bad = v.clone();
    bad.push(v[0]);
    assert!(matches!(m.kmem_cache_free_bulk(&c, &bad), Err(KmmError::DoubleFree(_))));
    assert_eq!(c.objects_in_use(&m), before);
    m.kmem_cache_free_bulk(&c, &v).unwrap();
    ok(&m);
}

#[test]
fn krealloc_keeps_contents() {
    let m = machine();
    let cs = unknown_call_site();
    let a = m.kmalloc(20, GFP_KERNEL, &cs).unwrap();
    m.write(a, b"0123456789abcdefghij").unwrap();
    let b = m.krealloc(a.0, 30, GFP_KERNEL, &cs).unwrap();
    assert_eq!(b, a, "30 fits in kmalloc-32: in place");
    let c = m.krealloc(b.0, 300, GFP_KERNEL, &cs).unwrap();
    assert_ne!(c, b);
    assert_eq!(&m.read(c, 20).unwrap(), b"0123456789abcdefghij");
    assert!(matches!(m.kfree(b.0, &cs), Err(KmmError::DoubleFree(_))));
    let d = m.krealloc(c.0, 10000, GFP_KERNEL, &cs).unwrap();
    assert_eq!(&m.read(d, 20).unwrap(), b"0123456789abcdefghij");
    assert_eq!(m.krealloc(d.0, 0, GFP_KERNEL, &cs).unwrap(), VirtAddr(ZERO_SIZE_PTR));
    ok(&m);
}

/// A sink may call back into the machine: page events that slab and percpu
/// emit while holding their own locks (a discarded slab's pages are freed
/// under `list_lock`; a new chunk's pages come under the pcpu lock) are
/// delivered after those locks drop. Before deferral this deadlocked, so the
/// work runs on a thread and the test fails on a timeout instead of hanging.
#[test]
fn trace_sinks_can_reenter_from_slab_and_percpu_page_events() {
    use kmm_core::trace::EventId;
    let m = Arc::new(machine());
    let seen = Arc::new(AtomicU64::new(0));
    let (w, s) = (Arc::downgrade(&m), seen.clone());
    let mask = EventId::MmPageFree.bit() | EventId::MmPageAlloc.bit();
    m.trace.attach(
        mask,
        Arc::new(move |_ev: &kmm_core::trace::Event| {
            if let Some(m) = w.upgrade() {
                // Takes every slab node lock and the pcpu lock.
                let _ = (m.slabinfo_rows(), m.pcpu_nr_pages());
                s.fetch_add(1, Relaxed);
            }
        }),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let mm = m.clone();
    std::thread::spawn(move || {
        let cs = unknown_call_site();
        let objs: Vec<_> = (0..400).map(|_| mm.kmalloc(256, GFP_KERNEL, &cs).unwrap()).collect();
        for a in objs {
            mm.kfree(a.0, &cs).unwrap();
        }
        let c = mm.slab.find("kmalloc-256").unwrap();
        mm.kmem_cache_shrink(&c).unwrap();
        let before = mm.pcpu_nr_pages();
        let mut ptrs = Vec::new();
        while mm.pcpu_nr_pages() == before {
            ptrs.push(mm.alloc_percpu(4096, 8, GFP_KERNEL, &cs).unwrap());
        }
        for p in ptrs {
            mm.free_percpu(p).unwrap();
        }
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(60)).expect("deadlock: a sink re-entered under an allocator lock");
    // 400 x 256 B is 7 slabs of kmalloc-256 (16 per page) at least, each
    // allocated and freed, plus a new per-CPU chunk.
    assert!(seen.load(Relaxed) >= 14, "{}", seen.load(Relaxed));
    ok(&m);
}
