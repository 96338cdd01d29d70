//! perf-data-1: decoding never panics, whatever the bytes: a proptest over
//! a real perf.data (the first records of `tests/data/traces/
//! sample.perf.data.xz`) with bytes flipped, ranges overwritten and the
//! file cut anywhere; each result is a TraceLog or a PerfDataError.

use std::sync::OnceLock;

use kmm_core::trace::kallsyms::Kallsyms;
use kmm_core::trace::perf_data::{parse, Options};
use kmm_core::trace::stat::{kmem_stat, StatOptions};
use proptest::prelude::*;

fn rd64(d: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(d[at..at + 8].try_into().unwrap())
}

/// The sample perf.data, shortened to its first `keep` records (the
/// feature sections moved up behind them), as the tests' fixture.
fn mini() -> &'static [u8] {
    static MINI: OnceLock<Vec<u8>> = OnceLock::new();
    MINI.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/traces/sample.perf.data.xz");
        let xz = std::fs::read(path).expect("tests/data/traces/sample.perf.data.xz");
        let mut data = Vec::new();
        lzma_rs::xz_decompress(&mut &xz[..], &mut data).expect("xz");
        let (d_off, d_size) = (rd64(&data, 40) as usize, rd64(&data, 48) as usize);
        let keep = 1500;
        let mut at = d_off;
        for _ in 0..keep {
            let size = u16::from_le_bytes([data[at + 6], data[at + 7]]) as usize;
            at += size;
        }
        let new_size = at - d_off;
        let shift = (d_size - new_size) as u64;
        let table = d_off + d_size;
        let nfeat: u32 = (0..4).map(|w| rd64(&data, 72 + 8 * w).count_ones()).sum();
        let mut out = data[..at].to_vec();
        out[48..56].copy_from_slice(&(new_size as u64).to_le_bytes());
        for k in 0..nfeat as usize {
            let (off, size) = (rd64(&data, table + 16 * k), rd64(&data, table + 16 * k + 8));
            out.extend_from_slice(&(off - shift).to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
        }
        out.extend_from_slice(&data[table + 16 * nfeat as usize..]);
        out
    })
}

fn kallsyms() -> &'static Kallsyms {
    static K: OnceLock<Kallsyms> = OnceLock::new();
    K.get_or_init(|| {
        Kallsyms::parse(b"ffffffff81000000 T _text\nffffffff81000000 T _stext\nffffffff813c0000 T sched_setaffinity\nffffffff81400000 t other\n")
            .unwrap()
    })
}

fn decode(data: &[u8], lenient: bool, with_kallsyms: bool) {
    let o = Options { kallsyms: with_kallsyms.then(kallsyms), lenient };
    if let Ok(log) = parse(data, &o) {
        assert!(log.check().is_empty(), "{:?}", log.check());
        let st = kmem_stat(&log, 4096);
        let _ = st.format(&StatOptions { caller: true, alloc: true, ..Default::default() });
        for i in 0..log.len() {
            let _ = log.fields(i);
        }
    }
}

#[test]
fn the_fixture_decodes() {
    let log = parse(mini(), &Options { kallsyms: Some(kallsyms()), lenient: false }).unwrap();
    assert!(log.len() > 500 && log.len() <= 1500, "{}", log.len());
    assert_eq!((log.truncated_at, log.skipped), (None, 0));
    // sched_setaffinity+0x10c in the text; here resolved against a made-up table.
    assert!(log.strings.get(log.events[0].call_site).starts_with("sched_setaffinity+0x"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn flipped_bytes(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
                     lenient in any::<bool>(), ks in any::<bool>()) {
        let mut d = mini().to_vec();
        for (at, v) in flips {
            let i = at.index(d.len());
            d[i] ^= v | 1;
        }
        decode(&d, lenient, ks);
    }

    #[test]
    fn flipped_header_and_tables(at in 0usize..200, v in any::<u64>(), lenient in any::<bool>()) {
        // The header, the attributes and (wherever they are) sizes and offsets.
        let mut d = mini().to_vec();
        let at = at.min(d.len() - 8);
        d[at..at + 8].copy_from_slice(&v.to_le_bytes());
        decode(&d, lenient, false);
    }

    #[test]
    fn big_numbers_in_the_feature_sections(k in 0usize..64, v in prop_oneof![Just(u64::MAX), Just(1u64 << 32), Just(0u64), any::<u64>()],
                                            lenient in any::<bool>()) {
        let mut d = mini().to_vec();
        let table = (rd64(&d, 40) + rd64(&d, 48)) as usize;
        let at = (table + 8 * k).min(d.len() - 8);
        d[at..at + 8].copy_from_slice(&v.to_le_bytes());
        decode(&d, lenient, true);
    }

    #[test]
    fn overwritten_ranges_in_the_tracing_data(start in 0usize..40_000, len in 1usize..64, fill in any::<u8>()) {
        let mut d = mini().to_vec();
        let n = d.len();
        let start = start % n;
        for b in d.iter_mut().skip(start).take(len) {
            *b = fill;
        }
        decode(&d, false, false);
        decode(&d, true, false);
    }

    #[test]
    fn cut_anywhere(cut in 0usize..100_000, lenient in any::<bool>()) {
        let d = mini();
        decode(&d[..cut.min(d.len())], lenient, true);
    }
}
