//! Tracing overheads (issue 6): what a tracepoint costs when it is off, and
//! what recording costs per event.
//!
//! - `off/kmalloc_kfree_64`: `kmalloc(64)` + `kfree` with no sink attached
//!   (each call passes its tracepoint: one relaxed load and a bit test).
//! - `record/kmalloc_kfree_64`: the same pair while `kmem:*` is recorded into
//!   a `Recorder` (two events per pair). (record - off) / 2 is the cost of
//!   recording one event, timestamp included.
//! - `emit/record_one`: `Tracing::emit` of one `kmem:kmalloc` event straight
//!   into a recorder (no allocator work).
//! - `off/check`: the disabled check alone (`Tracing::on`), 1000 times.
//! - printed after criterion: 1M events into a fresh recorder (cold: every
//!   buffer page touched for the first time), best of 5.
//!
//! Recorders reuse their emptied chunks, so the criterion figures are the
//! steady state (a recording taken and refilled).
//!
//! Run: `cargo bench -p kmm-core --bench trace`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::Criterion;
use kmm_core::gfp::GFP_KERNEL;
use kmm_core::trace::{mask_for, unknown_call_site, EventId, Payload, Recorder, Tracing};
use kmm_core::{Machine, MachineConfig};

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let cs = unknown_call_site();
    let m = Machine::new(MachineConfig { memory: 512 << 20, cpus: 2, ..MachineConfig::default() }).unwrap();
    m.cpus.bind(0).unwrap();
    c.bench_function("off/kmalloc_kfree_64", |b| {
        b.iter(|| {
            let a = m.kmalloc(64, GFP_KERNEL, &cs).unwrap();
            m.kfree(black_box(a.0), &cs).unwrap();
        })
    });
    let rec = Arc::new(Recorder::new(2));
    let h = m.trace.attach(mask_for("kmem:*"), rec.sink());
    c.bench_function("record/kmalloc_kfree_64", |b| {
        b.iter(|| {
            let a = m.kmalloc(64, GFP_KERNEL, &cs).unwrap();
            m.kfree(black_box(a.0), &cs).unwrap();
            if rec.len() > 1 << 20 {
                rec.clear();
            }
        })
    });
    m.trace.detach(h);

    let t = Tracing::default();
    let rec = Arc::new(Recorder::new(2));
    t.attach(EventId::Kmalloc.bit(), rec.sink());
    c.bench_function("emit/record_one", |b| {
        b.iter(|| {
            t.emit(
                0,
                Payload::Kmalloc {
                    call_site: cs.clone(),
                    ptr: black_box(0xffff_8880_0000_1000),
                    bytes_req: 64,
                    bytes_alloc: 64,
                    gfp_flags: GFP_KERNEL,
                    node: -1,
                    accounted: false,
                },
            );
            if rec.len() > 1 << 20 {
                rec.clear();
            }
        })
    });
    let off = Tracing::default();
    c.bench_function("off/check_x1000", |b| {
        b.iter(|| {
            let mut n = 0u32;
            for _ in 0..1000 {
                n += u32::from(black_box(&off).on(EventId::Kmalloc));
            }
            n
        })
    });
    c.final_summary();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Tracing::default();
        let rec = Arc::new(Recorder::new(2));
        t.attach(EventId::Kmalloc.bit(), rec.sink());
        let start = std::time::Instant::now();
        for i in 0..1_000_000u64 {
            t.emit(
                (i & 1) as u32,
                Payload::Kmalloc {
                    call_site: cs.clone(),
                    ptr: black_box(i),
                    bytes_req: 64,
                    bytes_alloc: 64,
                    gfp_flags: GFP_KERNEL,
                    node: -1,
                    accounted: false,
                },
            );
        }
        best = best.min(start.elapsed().as_nanos() as f64 / 1e6);
        assert_eq!(rec.len(), 1_000_000);
    }
    println!("cold recording: {best:.1} ns/event (1M events into a fresh recorder, best of 5)");
}
