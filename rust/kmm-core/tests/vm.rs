//! Virtual memory from Rust: direct-map page sizes per architecture, vmalloc
//! from real threads on two CPUs (tagged contents, remote vfree, lazy purge
//! with shootdowns), and a kmap that sleeps until another thread kunmaps.
//! Expected values come from the kernel sources named in each test.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use kmm_core::gfp::*;
use kmm_core::trace::unknown_call_site;
use kmm_core::{Arch, Machine, MachineConfig, Pfn, VirtAddr};

fn machine(arch: Arch, memory: u64, cpus: u32) -> Machine {
    Machine::new(MachineConfig { arch, memory, cpus, ..MachineConfig::default() }).unwrap()
}

#[test]
fn direct_map_page_sizes() {
    // arch/x86/mm/init.c split_mem_range: 4K below the first PMD, PMD pages
    // after, 1 GiB pages from 1 GiB to the last whole GiB (x86_64, gbpages).
    let m = machine(Arch::X86_64, 4 << 30, 2);
    let po = 0xffff_8880_0000_0000u64;
    for (off, size) in [(0x1000u64, 4096u64), (2 << 20, 2 << 20), ((1 << 30) - 4096, 2 << 20), (1 << 30, 1 << 30), ((3 << 30) + 5, 1 << 30)] {
        let t = m.translate(VirtAddr(po + off)).unwrap();
        assert_eq!((t.phys, t.page_size), (off, size), "offset {off:#x}");
    }
    assert!(m.translate(VirtAddr(po + (4 << 30))).is_err(), "beyond RAM is unmapped");
    // i386: PSE 4 MiB pages; PAE: 2 MiB (pgtable-2level / 3level).
    let i = machine(Arch::I386, 512 << 20, 2);
    assert_eq!(i.translate(VirtAddr(0xc000_0000 + (8 << 20))).unwrap().page_size, 4 << 20);
    let p = machine(Arch::I386Pae, 512 << 20, 2);
    assert_eq!(p.translate(VirtAddr(0xc000_0000 + (8 << 20))).unwrap().page_size, 2 << 20);
    for x in [&m, &i, &p] {
        assert_eq!(x.check(), Vec::<String>::new());
    }
}

#[test]
fn vmalloc_on_two_cpus_with_remote_vfree() {
    let m = Arc::new(machine(Arch::X86_64, 1 << 30, 2));
    let free0 = m.nr_free_pages();
    let (tx, rx) = mpsc::channel::<(u64, u64, u64)>();
    let cs = unknown_call_site();
    std::thread::scope(|s| {
        let m1 = m.clone();
        let cs1 = cs.clone();
        // CPU 0 allocates and tags; CPU 1 checks the tag and frees (remote vfree).
        s.spawn(move || {
            m1.cpus.bind(0).unwrap();
            for k in 0..400u64 {
                let size = 32768 * (1 + k % 9) + k;
                let a = m1.vmalloc(size, GFP_KERNEL, &cs1).unwrap();
                m1.write(VirtAddr(a.addr + size - 8), &k.to_ne_bytes()).unwrap();
                tx.send((a.addr, size, k)).unwrap();
            }
            drop(tx);
            m1.cpus.unbind().unwrap();
        });
        let m2 = m.clone();
        s.spawn(move || {
            m2.cpus.bind(1).unwrap();
            for (addr, size, k) in rx {
                let tag = m2.read(VirtAddr(addr + size - 8), 8).unwrap();
                assert_eq!(u64::from_ne_bytes(tag.try_into().unwrap()), k, "area {addr:#x} holds another's tag");
                m2.vfree(addr).unwrap();
            }
            m2.cpus.unbind().unwrap();
        });
    });
    assert_eq!(m.vmalloc_nr_pages(), 0);
    // Pages used: sum of (pages + guard) over 400 areas exceeds lazy_max_pages
    // (fls(2) * 32 MiB / 4 KiB = 16384, mm/vmalloc.c) at least once.
    let total: u64 = (0..400u64).map(|k| (32768 * (1 + k % 9) + k).div_ceil(4096) + 1).sum();
    assert!(total > 16384);
    assert!(m.vm.vmalloc.purges.load(SeqCst) >= 1);
    let stats = m.tlb_stats();
    let sent: u64 = stats.iter().map(|s| s.shootdowns).sum();
    let received: u64 = stats.iter().map(|s| s.ipis).sum();
    assert_eq!(sent, received, "every flush IPI sent is received");
    assert!(sent >= 1);
    m.purge_vmap_area_lazy();
    assert_eq!(m.vmallocinfo(), "");
    m.drain_all_pages();
    // What stays allocated: vmalloc's page tables (never freed, as in the
    // kernel) and the slab pages of vm_struct / vmap_area / page arrays.
    let tables = m.vm.pt.nr_runtime_tables.load(SeqCst);
    assert!(tables >= 2, "a PUD... and PTE tables were built");
    assert!(m.nr_free_pages() + tables <= free0);
    assert_eq!(m.check(), Vec::<String>::new());
}

#[test]
fn kmap_sleeps_until_a_slot_is_free() {
    // mm/highmem.c: LAST_PKMAP slots (1024 on non-PAE i386); the next kmap of
    // another page sleeps on pkmap_map_wait until a kunmap frees a slot.
    let m = Arc::new(machine(Arch::I386, 1 << 30, 2));
    let last = m.vm.highmem.layout.last_pkmap;
    assert_eq!(last, 1024);
    let pages: Vec<Pfn> = (0..=last).map(|_| m.alloc_pages(GFP_HIGHUSER, 0).unwrap()).collect();
    assert!(pages.iter().all(|p| !m.pfn_is_lowmem(*p)));
    // Slot 0 is never handed out first (the scan starts at last_pkmap_nr + 1),
    // and on wrap-around it becomes usable: every slot is usable once.
    let mut addrs = std::collections::HashSet::new();
    for p in &pages[..last as usize] {
        addrs.insert(m.kmap(*p).unwrap().0);
    }
    assert_eq!(addrs.len() as u64, last);
    assert_eq!(m.pkmap_stats().in_use, last);
    let done = Arc::new(AtomicBool::new(false));
    let (m2, d2, extra) = (m.clone(), done.clone(), pages[last as usize]);
    let h = std::thread::spawn(move || {
        let a = m2.kmap(extra).unwrap();
        d2.store(true, SeqCst);
        a
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(!done.load(SeqCst), "kmap returned while every slot was in use");
    m.kunmap(pages[7]).unwrap();
    let a = h.join().unwrap();
    assert!(done.load(SeqCst));
    assert_eq!(m.pkmap_stats().waits, 1);
    // The freed slot went through flush_all_zero_pkmaps (one window flush).
    assert!(m.pkmap_stats().flushes >= 1);
    let b = m.read(a, 4).unwrap();
    assert_eq!(b.len(), 4);
    assert_eq!(m.check(), Vec::<String>::new());
}

#[test]
fn trace_sinks_can_reenter_vmalloc_from_its_page_events() {
    // vmalloc allocates page-table pages under init_mm's page_table_lock;
    // their mm_page_alloc events must reach sinks only after it drops, or a
    // sink calling back into vmalloc would deadlock.
    use kmm_core::trace::{mask_for, EventId};
    let m = Arc::new(machine(Arch::X86_64, 1 << 30, 2));
    let weak = Arc::downgrade(&m);
    let inner = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let inner2 = inner.clone();
    let id = m.trace.attach(
        mask_for("kmem:mm_page_alloc"),
        Arc::new(move |ev: &kmm_core::trace::Event| {
            assert_eq!(ev.payload.id(), EventId::MmPageAlloc);
            let Some(m) = weak.upgrade() else { return };
            // The sink runs with no page-table lock held (single thread here).
            assert!(!m.vm.pt.lock.is_locked(), "a page event reached a sink under page_table_lock");
            if inner2.fetch_add(1, SeqCst) == 0 {
                let a = m.vmalloc(3 * 4096, GFP_KERNEL, &unknown_call_site()).unwrap();
                assert!(m.vmallocinfo().contains("pages=3"));
                m.vfree(a.addr).unwrap();
            }
        }),
    );
    assert_eq!(m.vm.pt.nr_runtime_tables.load(SeqCst), 0, "a fresh machine has only boot tables");
    let a = m.vmalloc(64 << 10, GFP_KERNEL, &unknown_call_site()).unwrap();
    m.trace.detach(id);
    assert!(m.vm.pt.nr_runtime_tables.load(SeqCst) >= 2, "vmalloc's PMD and PTE tables were built while traced");
    assert!(inner.load(SeqCst) > 16, "each of the 16 pages (and the tables) was traced");
    m.vfree(a.addr).unwrap();
    assert_eq!(m.check(), Vec::<String>::new());
}
