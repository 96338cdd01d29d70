//! The percpu allocator's block hints (mm/percpu.c `pcpu_block_md`, chunk
//! slots): random alloc/free sequences with every hint checked against a
//! recomputation from the bitmaps after each operation (issue 13, part 2).
//!
//! Two levels: a chunk's map alone ([`PcpuChunk`], small and real
//! geometries, so allocations cross blocks often), and the machine's
//! `alloc_percpu`/`free_percpu` with `check_percpu()` (bitmap vs live
//! allocations, hints, slot lists).

use kmm_core::gfp::{GFP_ATOMIC, GFP_KERNEL};
use kmm_core::percpu::chunk::{BlockMd, PcpuChunk};
use kmm_core::{KmmError, Machine, MachineConfig};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// bits (1..), log2 of the alignment in bits
    Alloc(i32, u32),
    /// index into the live allocations (modulo)
    Free(usize),
}

fn ops(max_bits: i32, max_align_log: u32, len: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            3 => (1..=max_bits, 0..=max_align_log).prop_map(|(b, a)| Op::Alloc(b, a)),
            // mostly small requests, as the kernel's callers make
            3 => (1..=8i32, 0..=2u32).prop_map(|(b, a)| Op::Alloc(b, a)),
            3 => any::<usize>().prop_map(Op::Free),
        ],
        1..len,
    )
}

/// Runs `ops` on one chunk (`hidden` bits hidden at its start, as the first
/// chunk's) with `check` after each; returns the live allocations.
fn run_chunk(unit: u64, block: u64, hidden: i32, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut c = PcpuChunk::new(unit, block);
    c.hide_start(hidden);
    let errs = c.check("chunk");
    prop_assert!(errs.is_empty(), "after hide_start: {errs:?}");
    let mut live: Vec<(i32, i32)> = Vec::new();
    for (n, op) in ops.iter().enumerate() {
        match *op {
            Op::Alloc(bits, align_log) => {
                let align = 1 << align_log;
                if let Some(start) = c.find_block_fit(bits, align) {
                    prop_assert!(start >= 0 && start < c.map_bits);
                    if let Some(b) = c.alloc_area(bits, align, start) {
                        prop_assert_eq!(b % align, 0, "op {}: misaligned", n);
                        prop_assert!(b >= start && b + bits <= c.map_bits);
                        // independent of the hints: no live allocation overlaps it
                        for &(o, l) in &live {
                            prop_assert!(b + bits <= o || o + l <= b, "op {}: [{}, +{}) overlaps [{}, +{})", n, b, bits, o, l);
                        }
                        live.push((b, bits));
                    }
                }
            }
            Op::Free(i) => {
                if !live.is_empty() {
                    let (o, l) = live.swap_remove(i % live.len());
                    c.free_area(o, l);
                }
            }
        }
        let errs = c.check("chunk");
        prop_assert!(errs.is_empty(), "after op {} {:?}: {:?}", n, op, errs);
    }
    // Freeing everything restores the hints of a chunk with only its hidden start.
    for (o, l) in live.drain(..) {
        c.free_area(o, l);
        let errs = c.check("chunk");
        prop_assert!(errs.is_empty(), "draining: {errs:?}");
    }
    let free_bits = c.map_bits - hidden;
    prop_assert_eq!(c.free_bytes, free_bits * 4);
    prop_assert_eq!(c.chunk_md.first_free, hidden);
    if hidden == 0 {
        // The last free made a block free: pcpu_chunk_refresh_hint(chunk,
        // true) rebuilt the chunk hint from the (then exact) block hints.
        prop_assert_eq!(c.chunk_md.contig_hint, free_bits, "an emptied chunk's contig hint is all of it");
        prop_assert_eq!(c.chunk_md.contig_hint_start, 0);
        prop_assert_eq!(c.find_block_fit(c.map_bits, 1), Some(0), "an empty chunk fits its whole map");
        prop_assert_eq!(c.slot(), kmm_core::percpu::chunk::free_slot(c.map_bits * 4));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// 1024 bits in 16 blocks of 64: most allocations touch block edges.
    #[test]
    fn small_blocks_keep_true_hints(ops in ops(200, 6, 400), hidden in prop_oneof![Just(0), 1..100i32]) {
        run_chunk(4096, 256, hidden, &ops)?;
    }

    /// The real x86_64 geometry: a 36 KiB unit, 4 KiB blocks of 1024 bits,
    /// the first chunk's 8 KiB hidden or not.
    #[test]
    fn kernel_geometry_keeps_true_hints(ops in ops(8192, 10, 300), first in any::<bool>()) {
        run_chunk(36 << 10, 4096, if first { 2048 } else { 0 }, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The machine's allocator: random mixed-size alloc_percpu/free_percpu
    /// (several chunks), check_percpu() after each.
    #[test]
    fn machine_alloc_free_keeps_every_invariant(
        ops in prop::collection::vec(
            prop_oneof![
                3 => (prop_oneof![1..=64u64, 1..=4096u64, Just(32 << 10)], 0..=12u32).prop_map(|(s, a)| (true, s, a as usize)),
                2 => any::<usize>().prop_map(|i| (false, 0, i)),
            ],
            1..250,
        )
    ) {
        let m = Machine::new(MachineConfig { memory: 256 << 20, cpus: 2, ..MachineConfig::default() }).unwrap();
        let cs = kmm_core::trace::unknown_call_site();
        let mut live: Vec<(u64, u64)> = Vec::new();
        for (n, &(alloc, size, x)) in ops.iter().enumerate() {
            if alloc {
                let align = 1u64 << x;
                let p = m.alloc_percpu(size, align, GFP_KERNEL, &cs).unwrap();
                prop_assert_eq!(p % align.max(4), 0);
                let (va, got, _) = m.per_cpu_ptr(p, 1).unwrap();
                prop_assert_eq!(got, size.next_multiple_of(4));
                prop_assert_eq!(m.read(va, size as usize).unwrap(), vec![0u8; size as usize], "percpu-2: zeroed");
                m.write(va, &vec![0xa5; size as usize]).unwrap();
                live.push((p, size));
            } else if !live.is_empty() {
                let (p, _) = live.swap_remove(x % live.len());
                m.free_percpu(p).unwrap();
            }
            let errs = m.check_percpu();
            prop_assert!(errs.is_empty(), "after op {}: {:?}", n, errs);
        }
        for (p, _) in live {
            m.free_percpu(p).unwrap();
        }
        let errs = m.check_percpu();
        prop_assert!(errs.is_empty(), "{errs:?}");
    }
}

/// The checker reports a corrupted hint, and exactly that one.
#[test]
fn check_reports_each_corrupted_hint() {
    let mut c = PcpuChunk::new(36 << 10, 4096);
    let a = c.find_block_fit(100, 1).unwrap();
    let a = c.alloc_area(100, 1, a).unwrap();
    let b = c.find_block_fit(1500, 8).unwrap();
    c.alloc_area(1500, 8, b).unwrap();
    c.free_area(a, 100);
    assert_eq!(c.check("c"), Vec::<String>::new());
    let ids = |c: &PcpuChunk| c.check("c").iter().map(|e| e.split(':').next().unwrap().to_string()).collect::<Vec<_>>();

    let mut x = c.clone();
    x.md_blocks[2].contig_hint += 1;
    assert_eq!(ids(&x), ["percpu-hint-1"]);
    let mut x = c.clone();
    x.md_blocks[0].right_free = 7;
    assert_eq!(ids(&x), ["percpu-hint-2"]);
    let mut x = c.clone();
    x.md_blocks[0].first_free = 5;
    assert_eq!(ids(&x), ["percpu-hint-3"]);
    let mut x = c.clone();
    x.md_blocks[1].scan_hint = 4;
    x.md_blocks[1].scan_hint_start = 1000;
    assert_eq!(ids(&x), ["percpu-hint-4"]);
    let mut x = c.clone();
    x.chunk_md.contig_hint = x.map_bits;
    assert_eq!(ids(&x), ["percpu-hint-5"]);
    let mut x = c.clone();
    x.free_bytes -= 4;
    assert_eq!(ids(&x), ["percpu-hint-6"]);
    // An empty block's md is the kernel's pcpu_init_md_block.
    assert_eq!(c.md_blocks[8], BlockMd::new(1024));
}

/// The kernel's chunk order: the fullest slot that can hold a request is
/// tried first, not the oldest chunk (mm/percpu.c pcpu_alloc walks
/// pcpu_chunk_lists from pcpu_size_to_slot(size) up).
#[test]
fn requests_go_to_the_fullest_chunk_that_fits() {
    let m = Machine::new(MachineConfig { memory: 256 << 20, cpus: 2, ..MachineConfig::default() }).unwrap();
    let cs = kmm_core::trace::unknown_call_site();
    // Chunk 0 has 28 KiB dynamic: 16 KiB + 8 KiB leave 4 KiB.
    let a = m.alloc_percpu(16 << 10, 8, GFP_KERNEL, &cs).unwrap();
    let b = m.alloc_percpu(8 << 10, 8, GFP_KERNEL, &cs).unwrap();
    // 20 KiB does not fit: chunk 1 (36 KiB); it then has 16 KiB left.
    let c = m.alloc_percpu(20 << 10, 8, GFP_KERNEL, &cs).unwrap();
    let unit = 36u64 << 10;
    let chunk_of = |p: u64| m.per_cpu_ptr(p, 0).map(|_| p);
    assert!(chunk_of(c).is_ok());
    // 2 KiB fits both; chunk 0's contig hint (4 KiB, slot 10) is a lower
    // slot than chunk 1's (16 KiB, slot 12): it goes to chunk 0 ...
    let d = m.alloc_percpu(2 << 10, 8, GFP_KERNEL, &cs).unwrap();
    assert!(d < unit, "the fuller chunk 0 serves it: {d:#x}");
    // ... and 8 KiB only fits chunk 1.
    let e = m.alloc_percpu(8 << 10, 8, GFP_KERNEL, &cs).unwrap();
    assert_ne!(e / unit, d / unit);
    assert!(m.check_percpu().is_empty(), "{:?}", m.check_percpu());
    // Atomic requests never create chunks.
    assert!(matches!(m.alloc_percpu(20 << 10, 8, GFP_ATOMIC, &cs), Err(KmmError::OutOfMemory { .. })));
    for p in [a, b, c, d, e] {
        m.free_percpu(p).unwrap();
    }
    assert!(m.check_percpu().is_empty(), "{:?}", m.check_percpu());
}
