//! Simulated time and the kernel's time-driven work.
//!
//! A machine has a clock (nanoseconds, like CLOCK_MONOTONIC) that only moves
//! when it is told to: a replay moves it to each event's timestamp, Python
//! moves it with `Machine.advance_time`. Work the kernel does on a timer runs
//! when the clock passes its due time, in due-time order, on the CPU it
//! belongs to:
//!
//! - `vmstat_update` (mm/vmstat.c), per CPU, every `sysctl_stat_interval`
//!   (HZ: one second) while the CPU has work for it: it folds the CPU's
//!   counters and, for every zone, runs `decay_pcp_high`, which lowers
//!   `pcp->high` by an eighth towards `high_min` and drains what the lists
//!   hold above it (`mm_page_pcpu_drain` events). The worker re-arms itself
//!   while a decay reports work left; otherwise `vmstat_shepherd` (every
//!   second) re-arms it for a CPU whose counters moved since its last run.
//!
//! # Kernel
//! `mm/vmstat.c` (`vmstat_update`, `refresh_cpu_vm_stats`, `vmstat_shepherd`,
//! `need_update`, `sysctl_stat_interval`, `round_jiffies_relative`),
//! `mm/page_alloc.c` (`decay_pcp_high`).
//!
//! Both timers are deferrable (`INIT_DEFERRABLE_WORK`): a CPU's worker that
//! falls due while the CPU is idle runs when it next wakes. A replay knows
//! which CPU is running at each event (`Machine::advance_time_awake`), so a
//! CPU's worker runs at its first event at or after the due time;
//! `Machine::advance_time` (Python) counts every CPU as awake.
//!
//! SIMPLIFICATION: work runs at its due time exactly (no scheduling delay,
//! no jiffy granularity beyond the whole-second rounding of
//! `round_jiffies_relative`, whose per-CPU skew of 3 jiffies at HZ=250 is
//! kept). Where whole jiffies-seconds fall on CLOCK_MONOTONIC depends on the
//! boot; a replay estimates it from the kernel's own vmstat_update drains
//! (`mm_page_pcpu_drain` from a kworker), else takes whole seconds. The shepherd's check of a CPU's counters is "did the CPU allocate
//! or free pages since its last vmstat_update" (the kernel checks its
//! per-CPU stat diffs, which any such call leaves non-zero).
//!
//! # Invariants
//! - clock-1: the clock never goes backwards; each CPU's next due time is
//!   after the last time its work ran.
//!
//! Lock order: `work` (a mutex serialising the advance) is taken before any
//! allocator lock; the work itself takes pcp and zone locks as `page_alloc`
//! does.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

/// The latest time the clock reaches (u64::MAX less an hour): due times
/// computed from it cannot wrap.
pub const MAX_TIME_NS: u64 = u64::MAX - 3_600_000_000_000;

/// One second, in nanoseconds (`sysctl_stat_interval` = HZ).
pub const STAT_INTERVAL_NS: u64 = 1_000_000_000;
/// `round_jiffies` skews each CPU by 3 jiffies (HZ=250: 12 ms) so that
/// CPUs do not all fire at once.
pub const CPU_SKEW_NS: u64 = 12_000_000;

/// The per-CPU state of the vmstat worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmstatWork {
    /// When it next runs (ns), 0 = not armed yet.
    pub next_ns: u64,
    /// The CPU's page alloc+free count when it last ran (the shepherd
    /// re-arms the work when this moved).
    pub seen_events: u64,
    /// The last run left work (a decay still above high_min or a drain).
    pub pending: bool,
    /// Runs so far.
    pub runs: u64,
}

/// Simulated time and the timers hanging off it.
pub struct Clock {
    now: AtomicU64,
    /// When `vmstat_shepherd` next runs (ns), 0 = the clock has not started.
    pub(crate) shepherd_ns: AtomicU64,
    /// Where whole jiffies-seconds fall on this clock (ns into each second):
    /// `round_jiffies` rounds to multiples of HZ jiffies, and jiffies and
    /// CLOCK_MONOTONIC seconds do not start together.
    pub phase_ns: AtomicU64,
    /// Serialises advances; holds each CPU's vmstat worker state.
    pub(crate) work: Mutex<Vec<VmstatWork>>,
}

impl Clock {
    pub fn new(cpus: u32) -> Clock {
        Clock {
            now: AtomicU64::new(0),
            shepherd_ns: AtomicU64::new(0),
            phase_ns: AtomicU64::new(0),
            work: Mutex::new(vec![VmstatWork::default(); cpus as usize]),
        }
    }

    /// The simulated time, ns.
    #[inline]
    pub fn now(&self) -> u64 {
        self.now.load(Relaxed)
    }

    pub(crate) fn set(&self, t: u64) {
        self.now.fetch_max(t, Relaxed);
    }

    /// When work queued at `t` with `round_jiffies_relative(HZ)` on `cpu`
    /// fires: `t + HZ` rounded to a whole second as `round_jiffies_common`
    /// rounds (with the CPU's skew; down when less than a quarter second
    /// past it, else up), never at or before `t`.
    pub fn round_next(t: u64, cpu: u32, phase: u64) -> u64 {
        let t = t.min(MAX_TIME_NS);
        let skew = CPU_SKEW_NS * cpu as u64 % STAT_INTERVAL_NS;
        let phase = phase % STAT_INTERVAL_NS;
        let abs = t + STAT_INTERVAL_NS;
        // On the jiffies grid: whole seconds fall at `phase` on this clock.
        let j = abs + skew + STAT_INTERVAL_NS - phase;
        let rem = j % STAT_INTERVAL_NS;
        let r = if rem < STAT_INTERVAL_NS / 4 { j - rem } else { j - rem + STAT_INTERVAL_NS };
        let r = (r + phase).saturating_sub(skew + STAT_INTERVAL_NS);
        if r <= t {
            abs
        } else {
            r
        }
    }

    /// The first time after `t` on `cpu`'s grid (where work that
    /// `round_jiffies_relative(HZ)` keeps re-arming fires): a worker of a
    /// system already running when the clock starts fires there next.
    pub fn next_on_grid(t: u64, cpu: u32, phase: u64) -> u64 {
        let t = t.min(MAX_TIME_NS);
        let skew = CPU_SKEW_NS * cpu as u64 % STAT_INTERVAL_NS;
        let phase = phase % STAT_INTERVAL_NS;
        // Grid points g with (g + skew) % 1s == phase.
        let off = (phase + STAT_INTERVAL_NS - skew % STAT_INTERVAL_NS) % STAT_INTERVAL_NS;
        let base = t - t % STAT_INTERVAL_NS + off;
        if base > t {
            base
        } else {
            base + STAT_INTERVAL_NS
        }
    }

    /// The jiffies phase seen in timer work of a trace: the start times
    /// (ns) of vmstat_update's drains on each CPU. A run of CPU `c` fires at
    /// `phase - skew(c)` into a second; returns the median phase, or None.
    pub fn estimate_phase(bursts: &[(u32, u64)]) -> Option<u64> {
        let mut v: Vec<u64> = bursts
            .iter()
            .map(|&(cpu, t)| (t % STAT_INTERVAL_NS + CPU_SKEW_NS * cpu as u64 % STAT_INTERVAL_NS) % STAT_INTERVAL_NS)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        Some(v[v.len() / 2])
    }

    /// Check clock-1.
    pub fn check(&self) -> Vec<String> {
        let now = self.now();
        let mut errs = Vec::new();
        for (cpu, w) in self.work.lock().iter().enumerate() {
            if w.next_ns != 0 && w.runs > 0 && w.next_ns + STAT_INTERVAL_NS * 2 < now {
                errs.push(format!("clock-1: cpu {cpu}'s vmstat work is due at {} but the clock is at {now}", w.next_ns));
            }
        }
        errs
    }
}
