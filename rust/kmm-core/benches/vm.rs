//! Virtual-memory benchmarks (issue 5), each beside its host peer where one
//! exists, in the same run (see benches/README.md):
//!
//! - `vm/vmalloc_vfree_1M`: `vmalloc(1 MiB)` + `vfree`, the lazy purge
//!   included (one purge per ~64 pairs at 2 CPUs); peer `host/mmap_munmap_1M`:
//!   an anonymous 1 MiB mmap, touched once per page, then munmap (what the
//!   host kernel does for the same job, page faults included).
//! - `vm/kmap_kunmap_high`: `kmap` + `kunmap` of a highmem page on i386
//!   (the pkmap slot stays cached, as in the kernel); `vm/kmap_local_high`:
//!   `kmap_local_page` + `kunmap_local` (set PTE, INVLPG).
//! - `tlb/hit`: `Machine::access` of one byte on a hot page (a first-level
//!   TLB hit), `tlb/miss_walk`: one byte on each of 4096 vmalloc pages in
//!   turn (more than the STLB holds: every access misses and walks 4 levels).
//!
//! Run: `cargo bench -p kmm-core --bench vm`.

use std::hint::black_box;

use criterion::{BatchSize, Criterion};
use kmm_core::gfp::{GFP_HIGHUSER, GFP_KERNEL};
use kmm_core::trace::unknown_call_site;
use kmm_core::{Arch, Machine, MachineConfig, VirtAddr};
use rustix::mm::{mmap_anonymous, munmap, MapFlags, ProtFlags};

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let cs = unknown_call_site();

    let m = Machine::new(MachineConfig { memory: 1 << 30, cpus: 2, ..MachineConfig::default() }).unwrap();
    let _bind = m.cpus.bind(0);
    c.bench_function("vm/vmalloc_vfree_1M", |b| {
        b.iter(|| {
            let a = m.vmalloc(1 << 20, GFP_KERNEL, &cs).unwrap();
            m.vfree(black_box(a.addr)).unwrap();
        })
    });
    c.bench_function("host/mmap_munmap_1M", |b| {
        b.iter(|| {
            // SAFETY: a fresh private anonymous mapping, touched inside its
            // bounds and unmapped before the next iteration.
            unsafe {
                let p = mmap_anonymous(std::ptr::null_mut(), 1 << 20, ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE).unwrap();
                for i in (0..1 << 20).step_by(4096) {
                    p.cast::<u8>().add(i).write_volatile(1);
                }
                munmap(black_box(p), 1 << 20).unwrap();
            }
        })
    });

    let hot = m.get_free_pages(GFP_KERNEL, 0).unwrap();
    c.bench_function("tlb/hit", |b| b.iter(|| m.access(black_box(hot), 1, false).unwrap()));
    let big = m.vmalloc(16 << 20, GFP_KERNEL, &cs).unwrap();
    let mut i = 0u64;
    c.bench_function("tlb/miss_walk", |b| {
        b.iter(|| {
            i = (i + 1) % 4096;
            m.access(VirtAddr(big.addr + i * 4096), 1, false).unwrap()
        })
    });
    m.vfree(big.addr).unwrap();

    let h = Machine::new(MachineConfig { arch: Arch::I386, memory: 2 << 30, cpus: 2, ..MachineConfig::default() }).unwrap();
    let _bind = h.cpus.bind(0);
    let page = h.alloc_pages(GFP_HIGHUSER, 0).unwrap();
    c.bench_function("vm/kmap_kunmap_high", |b| {
        b.iter(|| {
            let a = h.kmap(page).unwrap();
            black_box(a);
            h.kunmap(page).unwrap();
        })
    });
    c.bench_function("vm/kmap_local_high", |b| {
        b.iter_batched(
            || (),
            |_| {
                let a = h.kmap_local_page(page).unwrap();
                h.kunmap_local(black_box(a)).unwrap();
            },
            BatchSize::SmallInput,
        )
    });
    c.final_summary();
}
