//! Model-vs-implementation property test of the page allocator: random
//! alloc/free sequences over random orders and gfp masks keep every
//! invariant (`Machine::check`) and freeing everything restores boot state.

use kmm_core::arch::Arch;
use kmm_core::gfp::*;
use kmm_core::{Machine, MachineConfig, Pfn};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Alloc { order: u32, gfp: u32 },
    Free { pick: usize },
}

const GFPS: &[u32] = &[
    GFP_KERNEL,
    GFP_KERNEL | __GFP_ZERO,
    GFP_ATOMIC,
    GFP_NOWAIT,
    GFP_KERNEL | GFP_DMA,
    GFP_KERNEL | GFP_DMA32,
    GFP_HIGHUSER_MOVABLE,
    GFP_KERNEL | __GFP_COMP,
    GFP_NOFS | __GFP_RECLAIMABLE,
    GFP_HIGHUSER,
];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..=10, 0..GFPS.len()).prop_map(|(order, g)| Op::Alloc { order, gfp: GFPS[g] }),
        2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
    ]
}

fn run(arch: Arch, memory: &str, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let m = Machine::new(MachineConfig { arch, ..MachineConfig::default() }.with_memory(memory).unwrap()).unwrap();
    let boot: Vec<Vec<u64>> = m.zones.iter().map(|z| z.area.lock().nr_free.to_vec()).collect();
    let mut live: Vec<(Pfn, u32)> = Vec::new();
    for op in ops {
        match op {
            Op::Alloc { order, gfp } => {
                if let Ok(p) = m.alloc_pages(gfp | __GFP_NOWARN, order) {
                    prop_assert_eq!(p.0 % (1 << order), 0);
                    for &(q, o) in &live {
                        let disjoint = p.0 + (1 << order) <= q.0 || q.0 + (1 << o) <= p.0;
                        prop_assert!(disjoint, "overlap {:?}/{} and {:?}/{}", p, order, q, o);
                    }
                    live.push((p, order));
                }
            }
            Op::Free { pick } => {
                if !live.is_empty() {
                    let (p, o) = live.swap_remove(pick % live.len());
                    m.free_pages(p, o).unwrap();
                    prop_assert!(m.free_pages(p, o).is_err(), "double free accepted");
                }
            }
        }
        let errs = m.check();
        prop_assert!(errs.is_empty(), "{:?}", errs);
        let allocated: u64 = live.iter().map(|&(_, o)| 1u64 << o).sum();
        // Free pages are in the buddy allocator or on per-CPU lists.
        prop_assert_eq!(m.nr_free_pages() + m.nr_pcp_pages() + allocated, m.totalram_pages());
    }
    for (p, o) in live {
        m.free_pages(p, o).unwrap();
    }
    m.drain_all_pages();
    prop_assert!(m.check().is_empty());
    let end: Vec<Vec<u64>> = m.zones.iter().map(|z| z.area.lock().nr_free.to_vec()).collect();
    prop_assert_eq!(end, boot);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn x86_64_random_sequences(ops in prop::collection::vec(op(), 1..120)) {
        run(Arch::X86_64, "40M", ops)?;
    }

    #[test]
    fn i386_random_sequences(ops in prop::collection::vec(op(), 1..80)) {
        run(Arch::I386, "1G", ops)?;
    }
}
