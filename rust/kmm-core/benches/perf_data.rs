//! perf.data decoding (issue 10): events per second.
//!
//! - `perf_data/sample`: decode the sample recording's perf.data (83,084
//!   events, `tests/data/traces/sample.perf.data.xz`, decompressed once
//!   before timing) without kallsyms.
//! - `perf_script/sample`: the same events from its `perf script` text
//!   (`python/kmm/data/sample.perf.txt.xz`), for comparison.
//! - printed after criterion, if `KMM_PERF_DATA=path/to/perf.data` (and
//!   optionally `KMM_KALLSYMS=path/to/kallsyms.txt`) are set: that file
//!   decoded once, best of 3, in events/s.
//!
//! Run: `cargo bench -p kmm-core --bench perf_data`.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput};
use kmm_core::trace::kallsyms::Kallsyms;
use kmm_core::trace::perf_data::{parse, Options};
use kmm_core::trace::perf_script::parse_str;

fn unxz(path: &str) -> Vec<u8> {
    let xz = std::fs::read(path).expect(path);
    let mut out = Vec::new();
    lzma_rs::xz_decompress(&mut &xz[..], &mut out).expect("xz");
    out
}

fn main() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let data = unxz(&format!("{root}/tests/data/traces/sample.perf.data.xz"));
    let text = String::from_utf8(unxz(&format!("{root}/python/kmm/data/sample.perf.txt.xz"))).unwrap();
    let n = parse(&data, &Options::default()).unwrap().len() as u64;
    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(n));
    g.sample_size(20);
    g.bench_function("perf_data/sample", |b| b.iter(|| parse(black_box(&data), &Options::default()).unwrap()));
    g.bench_function("perf_script/sample", |b| b.iter(|| parse_str(black_box(&text), false).unwrap()));
    g.finish();

    if let Ok(path) = std::env::var("KMM_PERF_DATA") {
        let data = std::fs::read(&path).expect("KMM_PERF_DATA");
        let ks = std::env::var("KMM_KALLSYMS").ok().map(|p| Kallsyms::parse(&std::fs::read(p).unwrap()).unwrap());
        let o = Options { kallsyms: ks.as_ref(), lenient: false };
        let mut best = f64::MAX;
        let mut events = 0;
        for _ in 0..3 {
            let t = Instant::now();
            let log = parse(&data, &o).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
            events = log.len();
        }
        println!(
            "{path}: {events} events in {:.0} ms (best of 3): {:.2} M events/s",
            best * 1e3,
            events as f64 / best / 1e6
        );
    }
}
