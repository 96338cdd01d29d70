//! perf-script-1: the trace parser never panics, whatever it is fed, and
//! `kmem_stat` copes with whatever it parsed.

use kmm_core::trace::perf_script::{parse_str, Parser};
use kmm_core::trace::stat::{kmem_stat, StatOptions};
use proptest::prelude::*;

const LINE: &str = "            perf  5217 [001]   329.329062:          kmem:kmem_cache_alloc: call_site=getname_flags.part.0+0x24 ptr=0xffff88810087c000 name=names_cache bytes_req=4096 bytes_alloc=4096 gfp_flags=GFP_KERNEL node=-1 accounted=false\n";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..600), lenient in any::<bool>()) {
        let mut p = Parser::new(lenient);
        let r = p.feed(&data).and_then(|_| p.finish());
        if let Ok(log) = r {
            let st = kmem_stat(&log, 4096);
            let _ = st.format(&StatOptions { caller: true, alloc: true, ..Default::default() });
            for i in 0..log.len() {
                let _ = log.fields(i);
            }
        }
    }

    #[test]
    fn mutated_real_lines(cut in 0..LINE.len(), ins in "[ \\[\\]:=.x0-9a-z_-]{0,12}", lenient in any::<bool>()) {
        let mut s = String::from(&LINE[..cut]);
        s.push_str(&ins);
        s.push_str(&LINE[cut..]);
        s.push_str(LINE);
        if let Ok(log) = parse_str(&s, lenient) {
            let _ = kmem_stat(&log, 4096).format(&StatOptions::default());
            for i in 0..log.len() {
                let _ = log.fields(i);
            }
        }
    }
}

#[test]
fn the_untouched_line_parses() {
    let log = parse_str(LINE, false).unwrap();
    assert_eq!(log.len(), 1);
}
