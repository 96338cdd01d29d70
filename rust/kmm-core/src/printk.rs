//! The kernel log (`printk`'s ring buffer, read by `dmesg`), the taint
//! mask that reports print, and `jiffies` on the machine's clock.
//!
//! Debugging reports that do not fail a call (slub_debug repairs found at
//! allocation or by `validate`, kmemleak's summary) go to the log, as the
//! kernel's go to its log; reports that refuse a call are also the
//! exception's text.
//!
//! # Kernel
//! `kernel/printk/printk.c` (the ring buffer, `[%5lu.%06lu]` timestamps,
//! `CONFIG_LOG_BUF_SHIFT`), `kernel/panic.c` (`taint_flags`,
//! `_print_tainted`, `add_taint`), `include/linux/jiffies.h`
//! (`INITIAL_JIFFIES`).
//!
//! SIMPLIFICATION: one log level for everything (no console: nothing is
//! written to the host's stderr); `WARN_ON` adds TAINT_WARN but prints no
//! "cut here" splat; the buffer keeps whole lines and drops the oldest
//! beyond `LOG_BUF_LEN` bytes.
//!
//! jiffies: `HZ` = 250 ticks of the simulated clock (`m.time_ns`, which only
//! moves when told to), from `INITIAL_JIFFIES` at time 0; on 32-bit
//! machines jiffies is an `unsigned long` and wraps five minutes in, as in
//! the kernel.
//!
//! # Invariants
//! - printk-1: the log holds at most `LOG_BUF_LEN` bytes of text.
//!
//! Lock order: the log lock is a leaf (taken under any slab or zone lock).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::machine::Machine;

/// `HZ` of the reference configuration.
pub const HZ: u64 = 250;
/// `INITIAL_JIFFIES`: `(unsigned long)(unsigned int)(-300 * HZ)`.
pub const INITIAL_JIFFIES: u64 = (1u64 << 32) - 300 * HZ;
/// `1 << CONFIG_LOG_BUF_SHIFT` (the Kconfig default, 17).
pub const LOG_BUF_LEN: usize = 1 << 17;

/// `TAINT_BAD_PAGE` ('B'): slab corruption was reported.
pub const TAINT_BAD_PAGE: u32 = 5;
/// `TAINT_WARN` ('W'): a WARN_ON fired.
pub const TAINT_WARN: u32 = 9;

/// `taint_flags[]` (6.18): the letter when set and when not.
const TAINT_CHARS: [(char, char); 20] = [
    ('P', 'G'),
    ('F', ' '),
    ('S', ' '),
    ('R', ' '),
    ('M', ' '),
    ('B', ' '),
    ('U', ' '),
    ('D', ' '),
    ('A', ' '),
    ('W', ' '),
    ('C', ' '),
    ('I', ' '),
    ('O', ' '),
    ('E', ' '),
    ('L', ' '),
    ('K', ' '),
    ('X', ' '),
    ('T', ' '),
    ('N', ' '),
    ('J', ' '),
];

/// The log and the taint mask of one machine.
#[derive(Default)]
pub struct Printk {
    log: Mutex<Log>,
    taint: AtomicU32,
}

#[derive(Default)]
struct Log {
    lines: VecDeque<(u64, String)>,
    bytes: usize,
}

impl Printk {
    /// Append lines stamped with `now_ns`.
    pub fn log<I: IntoIterator<Item = String>>(&self, now_ns: u64, lines: I) {
        let mut l = self.log.lock();
        for line in lines {
            l.bytes += line.len() + 1;
            l.lines.push_back((now_ns, line));
        }
        while l.bytes > LOG_BUF_LEN {
            match l.lines.pop_front() {
                Some((_, old)) => l.bytes -= old.len() + 1,
                None => break,
            }
        }
    }

    /// `add_taint(flag)`.
    pub fn add_taint(&self, flag: u32) {
        self.taint.fetch_or(1 << flag, Relaxed);
    }

    /// `print_tainted()`: "Not tainted", or "Tainted: " and one letter or
    /// blank per flag.
    pub fn tainted(&self) -> String {
        let t = self.taint.load(Relaxed);
        if t == 0 {
            return "Not tainted".into();
        }
        let mut s = String::from("Tainted: ");
        for (i, &(on, off)) in TAINT_CHARS.iter().enumerate() {
            s.push(if t & (1 << i) != 0 { on } else { off });
        }
        s
    }

    /// The log as `dmesg` prints it: `[seconds.micros] text` per line.
    pub fn text(&self) -> String {
        let l = self.log.lock();
        let mut s = String::with_capacity(l.bytes + 15 * l.lines.len());
        for (t, line) in &l.lines {
            s.push_str(&format!("[{:5}.{:06}] {line}\n", t / 1_000_000_000, t % 1_000_000_000 / 1000));
        }
        s
    }

    /// `dmesg -C`.
    pub fn clear(&self) {
        let mut l = self.log.lock();
        l.lines.clear();
        l.bytes = 0;
    }

    /// printk-1.
    pub fn check(&self) -> Vec<String> {
        let l = self.log.lock();
        let bytes: usize = l.lines.iter().map(|(_, s)| s.len() + 1).sum();
        if bytes != l.bytes || bytes > LOG_BUF_LEN {
            return vec![format!("printk-1: the log holds {bytes} bytes, counted {} (limit {LOG_BUF_LEN})", l.bytes)];
        }
        Vec::new()
    }
}

impl Machine {
    /// `jiffies` on the simulated clock, as a 64-bit count that never wraps
    /// (`jiffies_64`); see `jiffies_ulong` for what an `unsigned long` shows.
    pub fn jiffies64(&self) -> u64 {
        INITIAL_JIFFIES + self.clock.now() / (1_000_000_000 / HZ)
    }

    /// `jiffies` as the kernel prints it (`%lu`): wrapped to 32 bits on a
    /// 32-bit machine.
    pub fn jiffies_ulong(&self, j64: u64) -> u64 {
        if self.cfg.arch.is_64bit() {
            j64
        } else {
            j64 & 0xffff_ffff
        }
    }

    /// `printk` lines into the kernel log, stamped with the clock.
    pub fn printk<I: IntoIterator<Item = String>>(&self, lines: I) {
        self.printk.log(self.clock.now(), lines);
    }

    /// The kernel log (`dmesg`).
    pub fn dmesg(&self) -> String {
        self.printk.text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taint_string_and_ring() {
        let p = Printk::default();
        assert_eq!(p.tainted(), "Not tainted");
        p.add_taint(TAINT_BAD_PAGE);
        p.add_taint(TAINT_WARN);
        // G, four blanks, B, three blanks, W, ten blanks.
        assert_eq!(p.tainted(), "Tainted: G    B   W          ");
        p.log(1_500_000_000, ["hello".to_string()]);
        assert_eq!(p.text(), "[    1.500000] hello\n");
        for i in 0..20_000 {
            p.log(0, [format!("line {i:05}")]);
        }
        assert!(p.check().is_empty());
        assert!(p.text().len() < LOG_BUF_LEN + 20_000 * 15);
        assert!(!p.text().contains("hello"), "the oldest lines go first");
    }
}
