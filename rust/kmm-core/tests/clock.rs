//! Simulated time and the kernel's timer work (`clock.rs`, the clock half
//! of `page_alloc.rs`): `round_jiffies_relative`'s rounding, `decay_pcp_high`
//! against values computed by hand from the 6.18 formula, and
//! `advance_time` running `vmstat_update` / `vmstat_shepherd` as
//! mm/vmstat.c does.
//!
//! The kernel's rules (mm/vmstat.c, mm/page_alloc.c, kernel/time/timer.c):
//! - `round_jiffies_common(j, cpu, false)`: add `3 * cpu` jiffies, round to
//!   a whole second (down when less than HZ/4 past it, else up), subtract
//!   the skew again; the result must lie in the future, else `j` itself.
//!   `round_jiffies_relative(HZ)` does this for `jiffies + HZ`.
//! - `decay_pcp_high`: if `high > high_min`, `high = max3(count - (batch <<
//!   5), high - high / 8, high_min)`; then drain `count - high` pages if
//!   positive. It reports work left while `high > high_min` or it drained.
//! - `vmstat_update` re-queues itself while `refresh_cpu_vm_stats` reports
//!   a change; `vmstat_shepherd` (every second) queues it with delay 0 for a
//!   CPU whose counters moved.

use std::sync::{Arc, Mutex};

use kmm_core::arch::{ZoneKind, NR_PAGE_ORDERS};
use kmm_core::buddy::{MIGRATE_MOVABLE, MIGRATE_TYPES};
use kmm_core::clock::{Clock, CPU_SKEW_NS, STAT_INTERVAL_NS};
use kmm_core::gfp::GFP_KERNEL;
use kmm_core::machine::ZoneTuning;
use kmm_core::trace::{Event, EventId, Payload};
use kmm_core::warm::{WarmPlan, WarmZone};
use kmm_core::{Machine, MachineConfig};

const S: u64 = STAT_INTERVAL_NS;
const MS: u64 = 1_000_000;

// ---- round_next -------------------------------------------------------------

#[test]
fn constants_are_hz_and_three_jiffies_at_250_hz() {
    assert_eq!(S, 1_000_000_000);
    // 3 jiffies of 4 ms.
    assert_eq!(CPU_SKEW_NS, 3 * 4 * MS);
}

#[test]
fn round_next_rounds_down_within_a_quarter_second_else_up() {
    // cpu 0, phase 0: t + 1 s, rounded to a whole second.
    assert_eq!(Clock::round_next(0, 0, 0), S); // exactly on a second: stays
    assert_eq!(Clock::round_next(100 * MS, 0, 0), S); // 1.1 s: 0.1 past 1 s, down
    assert_eq!(Clock::round_next(249 * MS, 0, 0), S); // 1.249: still down
    assert_eq!(Clock::round_next(250 * MS, 0, 0), 2 * S); // 1.25: HZ/4 past, up
    assert_eq!(Clock::round_next(300 * MS, 0, 0), 2 * S);
    assert_eq!(Clock::round_next(999 * MS, 0, 0), 2 * S);
    assert_eq!(Clock::round_next(1000 * S + 500 * MS, 0, 0), 1002 * S);
    assert_eq!(Clock::round_next(1000 * S + 10 * MS, 0, 0), 1001 * S);
}

#[test]
fn round_next_skews_each_cpu_by_three_jiffies() {
    // cpu 1: +12 ms before rounding, -12 ms after.
    // t = 0.1: 1.1 + 0.012 = 1.112, 0.112 past a second: down to 1.0, minus 12 ms.
    assert_eq!(Clock::round_next(100 * MS, 1, 0), S - 12 * MS);
    // t = 0.238: 1.238 + 0.012 = 1.25 exactly: HZ/4 past, up to 2.0, minus 12 ms.
    assert_eq!(Clock::round_next(238 * MS, 1, 0), 2 * S - 12 * MS);
    // One ns earlier: 1.249999999, down.
    assert_eq!(Clock::round_next(238 * MS - 1, 1, 0), S - 12 * MS);
    // cpu 10: skew 120 ms. t = 0.2: 1.2 + 0.12 = 1.32: up to 2.0, minus 0.12.
    assert_eq!(Clock::round_next(200 * MS, 10, 0), 2 * S - 120 * MS);
    // t = 0.1: 1.1 + 0.12 = 1.22: down to 1.0, minus 0.12 = 0.88.
    assert_eq!(Clock::round_next(100 * MS, 10, 0), S - 120 * MS);
    // A CPU whose skew exceeds a second (cpu 100: 1.2 s): 5.0 + 1.2 = 6.2,
    // 0.2 past: down to 6.0, minus 1.2 = 4.8 (> 4.0: still in the future).
    assert_eq!(Clock::round_next(4 * S, 100, 0), 4 * S + 800 * MS);
}

#[test]
fn round_next_rounds_on_the_jiffies_grid_of_the_phase() {
    // Whole jiffies-seconds at +0.092 s on this clock (warm2's phase).
    let phase = 92 * MS;
    // t = 1188.0: 1189.0 is 0.908 past the grid second 1188.092: up to 1189.092.
    assert_eq!(Clock::round_next(1188 * S, 0, phase), 1189 * S + phase);
    // t = 1188.2: 1189.2 is 0.108 past 1189.092: down.
    assert_eq!(Clock::round_next(1188 * S + 200 * MS, 0, phase), 1189 * S + phase);
    // t = 1188.35: 1189.35 is 0.258 past 1189.092: up to 1190.092.
    assert_eq!(Clock::round_next(1188 * S + 350 * MS, 0, phase), 1190 * S + phase);
    // cpu 1 on that grid: 1189.2 + 0.012 = 1189.212, 0.120 past: down, minus skew.
    assert_eq!(Clock::round_next(1188 * S + 200 * MS, 1, phase), 1189 * S + phase - 12 * MS);
    // The phase is taken modulo a second.
    assert_eq!(Clock::round_next(1188 * S + 200 * MS, 0, phase + 3 * S), 1189 * S + phase);
    // A phase just below a second, near t = 0: no underflow.
    assert_eq!(Clock::round_next(0, 0, S - 1), S - 1);
}

#[test]
fn round_next_is_always_in_the_future_and_at_most_a_second_and_a_quarter_away() {
    // Rounding moves t + 1 s by less than a quarter second down or less than
    // a second up (on each CPU's skewed grid).
    for cpu in [0u32, 1, 3, 50] {
        for phase in [0u64, 92 * MS, 999 * MS] {
            let mut t = 7 * S + 3;
            while t < 10 * S {
                let r = Clock::round_next(t, cpu, phase);
                assert!(r > t + 3 * S / 4 && r < t + 2 * S, "t {t} cpu {cpu} phase {phase}: {r}");
                // On the grid: r + skew - phase is a whole second.
                let skew = CPU_SKEW_NS * cpu as u64;
                assert_eq!((r + skew + S - phase % S) % S, 0, "t {t} cpu {cpu} phase {phase}: {r}");
                t += 37 * MS + 11;
            }
        }
    }
}

#[test]
fn estimate_phase_is_the_median_of_the_skew_corrected_burst_starts() {
    // warm2's four vmstat_update drain bursts on CPU1 (pcp_dynamics.md §1):
    // 1191.796, 1195.080, 1196.075, 1199.076 s; + 12 ms of skew each:
    // .808 .092 .087 .088 -> sorted .087 .088 .092 .808 -> index 2.
    let b = [(1, 1_191_796 * MS), (1, 1_195_080 * MS), (1, 1_196_075 * MS), (1, 1_199_076 * MS)];
    assert_eq!(Clock::estimate_phase(&b), Some(92 * MS));
    assert_eq!(Clock::estimate_phase(&[]), None);
    assert_eq!(Clock::estimate_phase(&[(0, 5 * S + 300 * MS)]), Some(300 * MS));
}

// ---- a small machine with known pagesets ------------------------------------

const BATCH: u64 = 2;
const HIGH_MIN: u64 = 100;
const HIGH_MAX: u64 = 1000;

/// 64 MiB, 2 CPUs; DMA32's pagesets: batch 2, high_min 100, high_max 1000.
fn machine() -> Machine {
    let t = ZoneTuning { watermarks: None, lowmem_reserve: vec![], batch: BATCH, high_min: HIGH_MIN, high_max: HIGH_MAX };
    let cfg = MachineConfig { memory: 64 << 20, cpus: 2, tuning: Some(vec![None, Some(t)]), ..MachineConfig::default() };
    Machine::new(cfg).unwrap()
}

fn dma32(m: &Machine) -> &kmm_core::zone::Zone {
    &m.zones[m.zone_index(ZoneKind::Dma32).unwrap()]
}

/// Warm DMA32 to 4 free order-10 blocks and the given (count, high) per CPU.
fn warm(m: &Machine, pcp: Vec<(u64, u64)>) {
    let mut free = [[0u64; MIGRATE_TYPES]; NR_PAGE_ORDERS];
    free[10][MIGRATE_MOVABLE as usize] = 4;
    let plan = WarmPlan { zones: vec![WarmZone { zone: Some(ZoneKind::Dma32), free, blocks: None, pcp }], ..Default::default() };
    let rep = m.warm_start(&plan).unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
}

fn pcp(m: &Machine, cpu: usize) -> (u64, u64) {
    let p = dma32(m).pcp[cpu].lists.lock();
    (p.count, p.high)
}

fn set_high(m: &Machine, cpu: usize, high: u64) {
    dma32(m).pcp[cpu].lists.lock().high = high;
}

/// Every event of the kinds in `ids`, as emitted.
fn record(m: &Machine, ids: &[EventId]) -> Arc<Mutex<Vec<Event>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    let mask = ids.iter().fold(0, |a, e| a | e.bit());
    m.trace.attach(mask, Arc::new(move |e: &Event| o.lock().unwrap().push(e.clone())));
    out
}

fn drains(ev: &Mutex<Vec<Event>>) -> Vec<(u32, u64, u64)> {
    ev.lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e.payload {
            Payload::MmPagePcpuDrain { pfn, order, .. } => {
                assert_eq!(order, 0);
                Some((e.cpu, e.ts_ns, pfn))
            }
            _ => None,
        })
        .collect()
}

fn assert_clean(m: &Machine) {
    let errs = m.check();
    assert!(errs.is_empty(), "{:?}", &errs[..errs.len().min(5)]);
    assert!(m.clock.check().is_empty(), "{:?}", m.clock.check());
}

/// The kernel's decay of (count, high), by hand: (count, high, drained).
fn kernel_decay(count: u64, high: u64) -> (u64, u64, u64) {
    let mut high = high as i64;
    let count = count as i64;
    if high > HIGH_MIN as i64 {
        high = (count - ((BATCH as i64) << 5)).max(high - (high >> 3)).max(HIGH_MIN as i64);
    }
    let drain = (count - high).max(0);
    ((count - drain) as u64, high as u64, drain as u64)
}

// ---- decay_pcp_high ---------------------------------------------------------

#[test]
fn decay_pcp_high_follows_the_kernel_formula() {
    let m = machine();
    warm(&m, vec![(300, 400), (950, 1000)]);
    assert_eq!(pcp(&m, 0), (300, 400));
    assert_eq!(pcp(&m, 1), (950, 1000));
    let ev = record(&m, &[EventId::MmPagePcpuDrain]);
    let free0 = dma32(&m).free_pages();

    // cpu 0: max(300 - 64, 400 - 50, 100) = 350; 300 <= 350: nothing drained.
    assert!(m.decay_pcp_high(dma32(&m), 0) > 0, "high 350 > high_min: work left");
    assert_eq!(pcp(&m, 0), (300, 350));
    // Then 350 - 43 = 307; then 307 - 38 = 269 < 300: 31 pages drained.
    assert!(m.decay_pcp_high(dma32(&m), 0) > 0);
    assert_eq!(pcp(&m, 0), (300, 307));
    assert!(drains(&ev).is_empty());
    assert!(m.decay_pcp_high(dma32(&m), 0) > 0);
    assert_eq!(pcp(&m, 0), (269, 269));
    assert_eq!(drains(&ev).len(), 31);

    // cpu 1: count - (batch << 5) wins: max(950 - 64, 1000 - 125, 100) = 886: 64 drained.
    assert!(m.decay_pcp_high(dma32(&m), 1) > 0);
    assert_eq!(pcp(&m, 1), (886, 886));
    let d = drains(&ev);
    assert_eq!(d.len(), 31 + 64);
    assert!(d[..31].iter().all(|e| e.0 == 0) && d[31..].iter().all(|e| e.0 == 1), "each drain on its own CPU");
    // The drained pages went back to the buddy allocator.
    assert_eq!(dma32(&m).free_pages(), free0 + 31 + 64);
    let mut pfns: Vec<u64> = d.iter().map(|e| e.2).collect();
    pfns.sort_unstable();
    pfns.dedup();
    assert_eq!(pfns.len(), 95, "95 distinct pages");
    for &p in &pfns {
        assert!(!m.mem_map.get(p).has(kmm_core::page::PG_PCP), "pfn {p:#x} left the pcp list");
    }
    assert_eq!(m.nr_pcp_pages(), 269 + 886);
    assert_clean(&m);
}

#[test]
fn decay_pcp_high_stops_at_high_min_and_still_drains_above_it() {
    let m = machine();
    // cpu 0: 0 pages, high 110. cpu 1: 150 pages, high 50 (clamped to high_min 100).
    warm(&m, vec![(0, 110), (150, 50)]);
    assert_eq!(pcp(&m, 0), (0, 110));
    assert_eq!(pcp(&m, 1), (150, HIGH_MIN), "high is clamped to high_min");
    let ev = record(&m, &[EventId::MmPagePcpuDrain]);
    // max(0 - 64, 110 - 13 = 97, 100) = 100 = high_min, nothing to drain: no work left.
    assert_eq!(m.decay_pcp_high(dma32(&m), 0), 0);
    assert_eq!(pcp(&m, 0), (0, HIGH_MIN));
    assert_eq!(m.decay_pcp_high(dma32(&m), 0), 0, "at high_min: high stays");
    assert_eq!(pcp(&m, 0), (0, HIGH_MIN));
    // high == high_min is not lowered, but count - high = 50 pages drain.
    assert!(m.decay_pcp_high(dma32(&m), 1) > 0);
    assert_eq!(pcp(&m, 1), (HIGH_MIN, HIGH_MIN));
    assert_eq!(drains(&ev).len(), 50);
    assert_eq!(m.decay_pcp_high(dma32(&m), 1), 0);
    assert_clean(&m);
}

#[test]
fn decay_pcp_high_matches_the_formula_over_many_steps() {
    // From a few start points, step by step to high_min.
    for (count, high) in [(0u64, 1000u64), (500, 1000), (999, 1000), (120, 130), (700, 720)] {
        let m = machine();
        warm(&m, vec![(count, high), (0, 0)]);
        let (mut c, mut h) = (count, high);
        for step in 0..64 {
            let (c2, h2, _) = kernel_decay(c, h);
            let todo = m.decay_pcp_high(dma32(&m), 0);
            assert_eq!(pcp(&m, 0), (c2, h2), "start ({count}, {high}), step {step}");
            assert_eq!(todo > 0, h2 > HIGH_MIN || c2 < c, "start ({count}, {high}), step {step}: todo {todo}");
            (c, h) = (c2, h2);
        }
        assert_eq!(h, HIGH_MIN);
        assert_clean(&m);
    }
}

// ---- advance_time -----------------------------------------------------------

#[test]
fn the_first_advance_only_starts_the_clock() {
    let m = machine();
    warm(&m, vec![(950, 1000), (950, 1000)]);
    assert_eq!(m.clock.now(), 0);
    assert_eq!(m.clock_next_due(), 0, "not started");
    let ev = record(&m, &[EventId::MmPagePcpuDrain]);
    let t0 = 11 * S + 500 * MS;
    assert_eq!(m.advance_time(t0), 0, "no work at the start");
    assert_eq!(m.clock.now(), t0);
    assert!(drains(&ev).is_empty());
    assert_eq!(pcp(&m, 0), (950, 1000));
    // The workers of a system already running fire at their next point on
    // the jiffies grid: cpu 1 first, at 12.0 s minus its 12 ms skew.
    assert_eq!(m.clock_next_due(), 12 * S - 12 * MS);
    // A time in the past changes nothing.
    assert_eq!(m.advance_time(t0 - S), 0);
    assert_eq!(m.clock.now(), t0);
}

#[test]
fn timer_work_runs_in_time_order_and_its_events_carry_the_simulated_time() {
    let m = machine();
    warm(&m, vec![(300, 400), (950, 1000)]);
    let ev = record(&m, &[EventId::MmPagePcpuDrain]);
    let t0 = 11 * S + 500 * MS;
    m.advance_time(t0);
    // Up to 12.5 s: cpu 1 at 11.988 (drains 64: 950 -> 886), cpu 0 at 12.0
    // (400 -> 350, nothing drained).
    assert_eq!(m.advance_time(12 * S + 500 * MS), 2);
    assert_eq!(m.clock.now(), 12 * S + 500 * MS);
    assert_eq!(pcp(&m, 0), (300, 350));
    assert_eq!(pcp(&m, 1), (886, 886));
    let d = drains(&ev);
    assert_eq!(d.len(), 64);
    assert!(d.iter().all(|&(cpu, ts, _)| cpu == 1 && ts == 12 * S - 12 * MS), "{:?}", &d[..2]);
    // To 14.5 s: cpu 1 at 12.988 (886 -> max(822, 776) = 822: 64 more) and
    // 13.988 (822 -> 758: 64), cpu 0 at 13.0 (350 -> 307) and 14.0 (307 -> 269: 31).
    assert_eq!(m.advance_time(14 * S + 500 * MS), 4);
    assert_eq!(pcp(&m, 1), (758, 758));
    assert_eq!(pcp(&m, 0), (269, 269));
    let d = drains(&ev);
    assert_eq!(d.len(), 64 * 3 + 31);
    let when: Vec<(u32, u64)> = d[64..].iter().map(|&(c, t, _)| (c, t)).collect();
    let mut want = vec![(1, 13 * S - 12 * MS); 64];
    want.extend(vec![(1, 14 * S - 12 * MS); 64]);
    want.extend(vec![(0, 14 * S); 31]);
    assert_eq!(when, want, "in due-time order, each at its due time");
    assert!(d.windows(2).all(|w| w[0].1 <= w[1].1), "timestamps never go back");
    // Events emitted after the work carry the clock, too.
    let ev2 = record(&m, &[EventId::MmPageAlloc]);
    m.cpus.bind(0).unwrap();
    let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    m.free_pages(p, 0).unwrap();
    m.cpus.unbind().unwrap();
    let a = ev2.lock().unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].cpu, a[0].ts_ns), (0, 14 * S + 500 * MS));
    drop(a);
    assert_clean(&m);
}

#[test]
fn a_cpu_above_high_min_decays_every_second_until_it_reaches_it() {
    let m = machine();
    warm(&m, vec![(0, 0), (0, 0)]);
    set_high(&m, 0, 800);
    let t0 = 100 * S; // phase 0, cpu 0 runs on whole seconds
    m.advance_time(t0);
    // By hand: 800 700 613 537 470 412 361 316 277 243 213 187 164 144 126 111 100.
    let want = [700u64, 613, 537, 470, 412, 361, 316, 277, 243, 213, 187, 164, 144, 126, 111, 100];
    for (i, &h) in want.iter().enumerate() {
        let t = t0 + (i as u64 + 1) * S;
        let runs = m.advance_time(t);
        // cpu 1 (nothing to do) runs once, at the first second, then stops.
        assert_eq!(runs, if i == 0 { 2 } else { 1 }, "second {}", i + 1);
        assert_eq!(pcp(&m, 0).1, h, "second {}", i + 1);
    }
    // The run that reached high_min left no work: the worker stops.
    assert_eq!(m.advance_time(t0 + 30 * S), 0);
    assert_eq!(pcp(&m, 0), (0, HIGH_MIN));
    assert_clean(&m);
}

#[test]
fn an_idle_cpu_at_high_min_sleeps_until_it_allocates_again() {
    let m = machine();
    warm(&m, vec![(50, 100), (50, 100)]);
    let t0 = 100 * S + 300 * MS;
    m.advance_time(t0);
    // Both workers run once (nothing to decay, nothing allocated) and stop.
    assert_eq!(m.advance_time(t0 + 2 * S), 2);
    assert_eq!(m.advance_time(t0 + 20 * S), 0, "no work for 18 s");
    // cpu 1 allocates (and frees) a page: the shepherd's next tick queues its
    // worker (delay 0), which sees the change and runs once more a second later.
    m.cpus.bind(1).unwrap();
    let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    m.free_pages(p, 0).unwrap();
    m.cpus.unbind().unwrap();
    let due = m.clock_next_due();
    // The shepherd: cpu 0's grid (phase 0), the next whole second.
    assert_eq!(due, 121 * S);
    assert_eq!(m.advance_time(121 * S), 1, "cpu 1's worker runs at the shepherd's tick");
    assert_eq!(m.advance_time(125 * S), 1, "then once more, finds nothing new, and stops");
    assert_eq!(m.advance_time(140 * S), 0);
    assert_eq!(pcp(&m, 0), (50, 100));
    // An allocation on cpu 0 wakes cpu 0's worker only.
    m.cpus.bind(0).unwrap();
    let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    m.cpus.unbind().unwrap();
    assert_eq!(m.advance_time(145 * S), 2);
    m.cpus.bind(0).unwrap();
    m.free_pages(p, 0).unwrap();
    m.cpus.unbind().unwrap();
    assert_clean(&m);
}

#[test]
fn the_clock_never_goes_backwards() {
    let m = machine();
    warm(&m, vec![(300, 400), (300, 400)]);
    m.advance_time(5 * S);
    m.advance_time(9 * S);
    assert_eq!(m.clock.now(), 9 * S);
    m.clock_set(7 * S);
    assert_eq!(m.clock.now(), 9 * S, "clock_set never moves it back");
    assert_eq!(m.advance_time(8 * S), 0);
    assert_eq!(m.clock.now(), 9 * S);
    let high = pcp(&m, 0).1;
    assert_eq!(m.advance_time(9 * S), 0, "the same time again: nothing runs twice");
    assert_eq!(pcp(&m, 0).1, high);
    // A jump over many seconds runs each second's work, in order, once.
    let ev = record(&m, &[EventId::MmPagePcpuDrain]);
    let runs = m.advance_time(60 * S);
    assert!(runs >= 2, "{runs}");
    let d = drains(&ev);
    assert!(d.windows(2).all(|w| w[0].1 <= w[1].1));
    assert!(d.iter().all(|e| e.1 > 9 * S && e.1 <= 60 * S));
    assert_eq!(m.clock.now(), 60 * S);
    assert!(m.clock_next_due() > 60 * S);
    assert_clean(&m);
}

