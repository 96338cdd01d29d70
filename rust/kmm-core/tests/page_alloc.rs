//! Integration tests of the page allocator: boot, alloc/free, watermarks,
//! migratetype fallback, errors that change nothing.

use kmm_core::arch::{Arch, ZoneKind};
use kmm_core::gfp::*;
use kmm_core::{KmmError, Machine, MachineConfig, Pfn};

fn boot(arch: Arch, mem: &str) -> Machine {
    Machine::boot(arch, mem).unwrap()
}

fn assert_ok(m: &Machine) {
    let errs = m.check();
    assert!(errs.is_empty(), "{errs:#?}");
}

fn buddyinfo(m: &Machine) -> Vec<Vec<u64>> {
    m.zones.iter().map(|z| z.area.lock().nr_free.to_vec()).collect()
}

#[test]
fn boot_x86_64_1g_layout() {
    let m = boot(Arch::X86_64, "1G");
    assert_ok(&m);
    let names: Vec<_> = m.zones.iter().map(|z| z.kind.name()).collect();
    assert_eq!(names, ["DMA", "DMA32", "Normal", "Movable", "Device"]);
    // DMA: pfn 1..4096 (pfn 0 reserved, like the real zoneinfo's start_pfn 1, spanned 4095).
    assert_eq!((m.zones[0].start_pfn, m.zones[0].spanned), (1, 4095));
    assert_eq!((m.zones[1].start_pfn, m.zones[1].spanned), (4096, 262144 - 4096));
    assert_eq!(m.zones[2].spanned, 0);
    // The DMA zone's buddy layout from pfn 1: 1,2,4,...,2048 blocks of orders 0..11 -> orders 0..10.
    // pfn1 o0, pfn2 o1, ... pfn512 o9, then 1024, 2048, 3072 at o10 (the real DMA zone also shows 3 order-10 blocks).
    let bi = buddyinfo(&m);
    assert_eq!(bi[0], vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3]);
    assert_eq!(m.nr_free_pages(), 262143);
}

#[test]
fn i386_has_highmem_without_page_address() {
    let m = boot(Arch::I386, "2G");
    assert_ok(&m);
    let names: Vec<_> = m.zones.iter().map(|z| z.kind.name()).collect();
    assert_eq!(names, ["DMA", "Normal", "HighMem", "Movable"]);
    let hi = m.zone_index(ZoneKind::HighMem).unwrap();
    assert_eq!(m.zones[hi].start_pfn, (896 << 20) >> 12);
    let p = m.alloc_pages(GFP_HIGHUSER, 0).unwrap();
    assert!(m.zones[hi].spans(p.0), "GFP_HIGHUSER comes from HighMem first");
    assert_eq!(m.page_address(p), None);
    // __get_free_pages masks __GFP_HIGHMEM: the page comes from lowmem.
    let a = m.get_free_pages(GFP_HIGHUSER, 0).unwrap();
    assert!(!m.zones[hi].spans(m.virt_to_pfn(a).unwrap().0));
    m.free_pages_addr(a, 0).unwrap();
    let q = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    assert!(m.page_address(q).is_some());
    m.free_pages(p, 0).unwrap();
    m.free_pages(q, 0).unwrap();
    assert_ok(&m);
}

#[test]
fn alloc_free_restores_buddyinfo() {
    let m = boot(Arch::X86_64, "256M");
    let before = buddyinfo(&m);
    let mut got = Vec::new();
    for i in 0..200u32 {
        let order = i % 11;
        got.push((m.alloc_pages(GFP_KERNEL, order).unwrap(), order));
        assert_ok(&m);
    }
    // No two allocations overlap.
    let mut spans: Vec<(u64, u64)> = got.iter().map(|&(p, o)| (p.0, p.0 + (1 << o))).collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlap {w:?}");
    }
    for (p, o) in got.into_iter().rev() {
        m.free_pages(p, o).unwrap();
    }
    assert_ok(&m);
    // Frees of orders 0..=3 and 9 wait on the per-CPU lists until drained.
    m.drain_all_pages();
    assert_eq!(buddyinfo(&m), before);
}

#[test]
fn gfp_zero_zeroes_real_bytes_and_data_survives() {
    let m = boot(Arch::X86_64, "64M");
    let a = m.get_free_pages(GFP_KERNEL, 1).unwrap();
    m.write(a, &[0xab; 8192]).unwrap();
    m.free_pages_addr(a, 1).unwrap();
    let b = m.get_free_pages(GFP_KERNEL | __GFP_ZERO, 1).unwrap();
    assert_eq!(a, b, "LIFO reuse of the same block");
    assert!(m.read(b, 8192).unwrap().iter().all(|&x| x == 0));
    m.write(b, b"kernel").unwrap();
    assert_eq!(m.read(b, 6).unwrap(), b"kernel");
}

#[test]
fn errors_change_nothing() {
    let m = boot(Arch::X86_64, "64M");
    let p = m.alloc_pages(GFP_KERNEL, 2).unwrap();
    let before = buddyinfo(&m);
    assert!(matches!(m.free_pages(p, 1), Err(KmmError::InvalidFree(_))));
    assert!(matches!(m.free_pages(Pfn(p.0 + 1), 0), Err(KmmError::InvalidFree(_))));
    assert!(matches!(m.free_pages(Pfn(0), 0), Err(KmmError::InvalidFree(_))));
    assert!(matches!(m.free_pages(Pfn(1 << 40), 0), Err(KmmError::InvalidFree(_))));
    assert!(matches!(m.alloc_pages(GFP_KERNEL, 11), Err(KmmError::OutOfMemory { .. })));
    assert!(matches!(m.alloc_pages(__GFP_DMA | __GFP_DMA32, 0), Err(KmmError::BadGfp(_))));
    assert_eq!(buddyinfo(&m), before);
    m.free_pages(p, 2).unwrap();
    assert!(matches!(m.free_pages(p, 2), Err(KmmError::DoubleFree(_))));
    // A page inside a larger free block.
    assert!(matches!(m.free_pages(Pfn(p.0 + 1), 0), Err(KmmError::DoubleFree(_))));
    assert_ok(&m);
}

#[test]
fn dma_comes_from_dma_and_exhaustion_fails() {
    let m = boot(Arch::X86_64, "64M");
    let dma = m.zone_index(ZoneKind::Dma).unwrap();
    let mut got = Vec::new();
    loop {
        match m.alloc_pages(GFP_KERNEL | GFP_DMA, 0) {
            Ok(p) => {
                assert!(m.zones[dma].spans(p.0));
                got.push(p)
            }
            Err(KmmError::OutOfMemory { message, .. }) => {
                assert!(message.starts_with("page allocation failure: order:0, mode:0xcc1(GFP_KERNEL|GFP_DMA)"), "{message}");
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // GFP_KERNEL stops at the min watermark (via the slow path), not at zero.
    let z = &m.zones[dma];
    let min = z.watermark[0].load(std::sync::atomic::Ordering::Relaxed);
    assert!(z.free_pages() <= min + 1 && z.free_pages() > 0, "free {} min {}", z.free_pages(), min);
    // GFP_ATOMIC may dip below min (3/8 of it), so it still succeeds.
    let a = m.alloc_pages(GFP_ATOMIC | GFP_DMA, 0).unwrap();
    got.push(a);
    for p in got {
        m.free_pages(p, 0).unwrap();
    }
    assert_ok(&m);
}

#[test]
fn boot_64g_is_cheap() {
    let t = std::time::Instant::now();
    let m = Machine::new(MachineConfig::default().with_memory("64G").unwrap()).unwrap();
    let dt = t.elapsed();
    assert_eq!(m.nr_pages, 16 << 20);
    eprintln!("boot 64G: {dt:?}");
    let p = m.alloc_pages(GFP_KERNEL, 10).unwrap();
    m.free_pages(p, 10).unwrap();
}
