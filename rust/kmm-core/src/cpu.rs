//! Simulated CPUs and the claims real threads hold on them.
//!
//! A real thread runs on one simulated CPU at a time. Per-CPU state (slab
//! CPU freelists, later pcp lists, TLBs, kmap slots) is touched only by the
//! thread holding that CPU's claim, so it needs no lock: its fields are
//! atomics read and written with Relaxed loads and stores (plain moves on
//! x86), the way the kernel uses `this_cpu_*` operations. The claim itself
//! is an Acquire CAS and a Release store, which order one holder's accesses
//! before the next holder's.
//!
//! # Kernel
//! `include/linux/percpu-defs.h` (this_cpu ops), `include/linux/preempt.h`,
//! `include/linux/smp.h` (`smp_processor_id`, `get_cpu`/`put_cpu`).
//!
//! A thread that is not bound to a CPU runs on a "home" CPU assigned
//! round-robin when it first uses the machine (the kernel's scheduler would
//! have put it on one); two such threads may share a CPU, and then take turns
//! through the per-CPU locks of the structures they touch.
//!
//! SIMPLIFICATION: a thread that runs on a CPU without claiming it (bound
//! threads, and every allocation through `wait_runnable`) checks the claim
//! word once and then holds nothing, so an operation already past that
//! check can still be running when another thread disables preemption on
//! the CPU. Per-CPU data stays consistent (each per-CPU structure has its
//! own lock, or is updated with atomic read-modify-writes); only the
//! kernel's "nothing else runs here" promise has that window. loom shows
//! it (`runner_in_flight_overlaps_a_later_preempt_disable`).
//!
//! # Invariants
//! - cpu-1: a CPU's `owner` is 0 or the token of the one thread running on it.
//! - cpu-2: a thread with preemption disabled owns the CPU it runs on.
//! - cpu-3: every read of `owner` that lets a thread run on the CPU is an
//!   Acquire (the CAS that claims, or the load that finds it free), pairing
//!   with the Release store of the previous holder's release.
//!
//! # The claim word
//! ```text
//!   owner   who runs on the CPU                 moves to
//!   0       anyone (bound threads take turns)   tok: CAS(0 -> tok, Acquire)
//!   tok     the holder: a per-call claim        0: store(0, Release) when the
//!           (CpuGuard) or preempt_count > 0        guard drops / count hits 0
//! ```
//! A thread that finds another's token spins, then yields, until it reads
//! 0: to claim the CPU (`enter`, `preempt_add`) or to run on it unclaimed
//! (`wait_runnable`); the last two wait inside the wait hook, where the
//! binding releases the GIL and, every few milliseconds, looks for a
//! Ctrl-C: an interrupted `try_preempt_add` fails (nothing claimed), an
//! interrupted `wait_runnable` runs the call on the CPU anyway (the window
//! of the SIMPLIFICATION above) and the KeyboardInterrupt follows it.
//!
//! A thread that ends with preemption disabled or in interrupt context
//! (a Python thread that returned inside `get_cpu()`) gives its CPU back
//! when it exits, as `do_exit` (kernel/exit.c) resets `preempt_count` with
//! the note "exited with preempt_count N": otherwise the CPU would stay
//! claimed for ever and every later call on it would wait.
//! The word and the thread-locals come through `crate::sync`, so
//! `tests/loom.rs` model-checks this code itself.
//!
//! Lock order: a CPU claim is taken before any allocator lock (zone lock,
//! slab list_lock) and released after them.
#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, Weak};

use crate::sync;

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);
static NEXT_MACHINE: AtomicU64 = AtomicU64::new(1);

// Through the loom seam: under `cfg(loom)` each loom thread has its own.
sync::thread_local! {
    static TOKEN: u64 = NEXT_TOKEN.fetch_add(1, Relaxed);
}
sync::const_thread_local! {
    /// (machine id, cpu, nesting depth) for every machine this thread runs on.
    static BOUND: RefCell<Vec<(u64, u32, u32)>> = RefCell::new(Vec::new());
    /// (machine id, cpu): where an unbound thread last ran ("the scheduler
    /// put it there"); sticky, assigned round-robin on first use.
    static HOME: RefCell<Vec<(u64, u32)>> = RefCell::new(Vec::new());
    /// (machine id, cpu) of the last `this_cpu` answer: the fast path.
    static LAST: Cell<(u64, u32)> = Cell::new((0, 0));
    /// Per machine: this thread's `preempt_count` and irq-disable depth.
    static CTX: RefCell<Vec<(u64, Ctx)>> = RefCell::new(Vec::new());
}
sync::thread_local! {
    /// The CPUs this thread holds claimed through preempt_count: given back
    /// when the thread exits (`ExitClaims::drop`).
    // Not `const { .. }`: loom's thread_local! (cfg(loom)) takes no const block.
    #[allow(clippy::missing_const_for_thread_local)]
    static EXIT: RefCell<ExitClaims> = RefCell::new(ExitClaims(Vec::new()));
}

/// (the machine's CPUs, cpu, this thread's token) for each CPU held.
struct ExitClaims(Vec<(Weak<[CpuSlot]>, u32, u64)>);

impl Drop for ExitClaims {
    /// `do_exit`: "note: %s[%d] exited with preempt_count %d", then
    /// `preempt_count_set(PREEMPT_ENABLED)` (kernel/exit.c).
    fn drop(&mut self) {
        // Under loom a model thread's thread-locals are dropped after its
        // execution ended, where loom's atomics cannot be touched: the
        // exit path is left to the Python tests (test_robustness.py).
        if cfg!(loom) {
            return;
        }
        for (slots, cpu, tok) in self.0.drain(..) {
            let Some(slots) = slots.upgrade() else { continue };
            let s = &slots[cpu as usize];
            let pc = s.preempt_count.load(Relaxed);
            {
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "note: kmm thread [{}] exited with preempt_count {pc:#x} on cpu {cpu}",
                    std::process::id()
                );
            }
            s.preempt_count.store(0, Relaxed);
            let _ = s.owner.compare_exchange(tok, 0, Release, Relaxed);
        }
    }
}

/// Remember (or forget) that this thread holds `cpu` of `slots`.
fn note_claim(slots: &Arc<[CpuSlot]>, cpu: u32, tok: u64, held: bool) {
    let _ = EXIT.try_with(|e| {
        let mut e = e.borrow_mut();
        let same = |x: &(Weak<[CpuSlot]>, u32, u64)| x.1 == cpu && std::ptr::eq(x.0.as_ptr() as *const CpuSlot, slots.as_ptr());
        if held {
            e.0.push((Arc::downgrade(slots), cpu, tok));
        } else if let Some(i) = e.0.iter().rposition(same) {
            e.0.swap_remove(i);
        }
    });
}

/// `preempt_count` layout (include/linux/preempt.h).
pub const PREEMPT_OFFSET: u32 = 1;
pub const SOFTIRQ_OFFSET: u32 = 1 << 8;
pub const HARDIRQ_OFFSET: u32 = 1 << 16;
pub const NMI_OFFSET: u32 = 1 << 20;
pub const PREEMPT_MASK: u32 = 0xff;
pub const SOFTIRQ_MASK: u32 = 0xff << 8;
pub const HARDIRQ_MASK: u32 = 0xf << 16;
pub const NMI_MASK: u32 = 0xf << 20;

/// A thread's execution context on a machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ctx {
    /// `preempt_count()`.
    pub preempt_count: u32,
    /// `local_irq_disable` nesting (hard irq entry disables interrupts).
    pub irq_disabled: u32,
    /// The CPU claimed while the count is non-zero.
    pub claimed: Option<u32>,
}

/// How to wait: the hook calls `poll` (which waits a little and says
/// whether the wait is over) until it returns true, and returns true; or
/// returns false to give up (an interrupt).
pub type WaitHook = fn(&mut (dyn FnMut() -> bool + Send)) -> bool;
static WAIT_HOOK: std::sync::OnceLock<WaitHook> = std::sync::OnceLock::new();

/// Install how to wait for a busy CPU or a wait queue (the Python binding
/// releases the GIL while it waits, so the thread holding the CPU can run,
/// and gives up on Ctrl-C).
pub fn set_wait_hook(h: WaitHook) {
    let _ = WAIT_HOOK.set(h);
}

/// The message of a wait given up on an interrupt (`is_interrupted`).
const INTERRUPTED: &str = "interrupted while waiting";

/// The error of a wait the hook gave up (Ctrl-C).
pub fn interrupted(what: &str) -> crate::KmmError {
    crate::KmmError::Host(format!("{INTERRUPTED} {what}"))
}

/// Is `e` an interrupted wait (the binding raises KeyboardInterrupt)?
pub fn is_interrupted(e: &crate::KmmError) -> bool {
    matches!(e, crate::KmmError::Host(m) if m.starts_with(INTERRUPTED))
}

/// Wait until `done()` through the installed hook: `done` is polled, and
/// may itself block briefly (a timed wait on a wait queue). False if the
/// hook gave up (an interrupt).
pub fn wait_until(done: &mut (dyn FnMut() -> bool + Send)) -> bool {
    let mut poll = || {
        for spins in 0..256u32 {
            if done() {
                return true;
            }
            if spins < 64 {
                sync::spin_loop();
            } else {
                sync::yield_now();
            }
        }
        false
    };
    match WAIT_HOOK.get() {
        Some(h) => h(&mut poll),
        None => {
            while !poll() {}
            true
        }
    }
}

/// Spin (then yield) until `done()`; the one busy-wait of the module.
fn spin_until(mut done: impl FnMut() -> bool) {
    let mut spins = 0u32;
    while !done() {
        spins += 1;
        if spins < 64 {
            sync::spin_loop();
        } else {
            sync::yield_now();
        }
    }
}

/// A fresh machine id (for thread-local lookups).
pub fn new_machine_id() -> u64 {
    NEXT_MACHINE.fetch_add(1, Relaxed)
}

fn token() -> u64 {
    TOKEN.with(|t| *t)
}

/// One simulated CPU.
#[derive(Default)]
#[repr(align(64))]
pub struct CpuSlot {
    /// The claim word (cpu-1); loom's atomic under `cfg(loom)`.
    owner: sync::AtomicU64,
    /// Claims taken on this CPU (each per-call claim or bind counts once).
    pub claims: AtomicU64,
    /// Times a thread found this CPU busy and had to try another or wait.
    pub contended: AtomicU64,
    /// `preempt_count` (issue 4 grows this into contexts).
    pub preempt_count: AtomicU32,
}

/// The CPUs of one machine.
pub struct Cpus {
    machine: u64,
    /// Shared with the exit hooks of the threads holding a CPU.
    slots: Arc<[CpuSlot]>,
    next_home: AtomicU32,
}

/// Proof that the current thread runs on `cpu` until the guard drops.
pub struct CpuGuard<'a> {
    cpus: &'a Cpus,
    pub cpu: u32,
    /// True when this guard took the claim (and so releases it).
    owned: bool,
}

impl Cpus {
    pub fn new(n: u32) -> Cpus {
        Cpus {
            machine: new_machine_id(),
            slots: (0..n).map(|_| CpuSlot::default()).collect(),
            next_home: AtomicU32::new(0),
        }
    }

    pub fn len(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn slot(&self, cpu: u32) -> &CpuSlot {
        &self.slots[cpu as usize]
    }

    /// The CPU this thread is bound to on this machine, if any.
    #[inline]
    pub fn current(&self) -> Option<u32> {
        let id = self.machine;
        BOUND.with(|b| b.borrow().iter().rev().find(|e| e.0 == id).map(|e| e.1))
    }

    /// The CPU the calling thread runs on: the bound one, or its home CPU
    /// (assigned round-robin the first time the thread touches this machine).
    #[inline]
    pub fn this_cpu(&self) -> u32 {
        let (m, c) = LAST.with(|l| l.get());
        if m == self.machine {
            return c;
        }
        let cpu = self.this_cpu_slow();
        LAST.with(|l| l.set((self.machine, cpu)));
        cpu
    }

    fn this_cpu_slow(&self) -> u32 {
        if let Some(c) = self.current() {
            return c;
        }
        let id = self.machine;
        HOME.with(|h| {
            if let Some(e) = h.borrow().iter().find(|e| e.0 == id) {
                return e.1;
            }
            let cpu = self.next_home.fetch_add(1, Relaxed) % self.len();
            let mut h = h.borrow_mut();
            if h.len() > 64 {
                h.remove(0); // forget machines this thread touched long ago
            }
            h.push((id, cpu));
            cpu
        })
    }

    fn try_claim(&self, cpu: u32, tok: u64) -> bool {
        let s = &self.slots[cpu as usize];
        if s.owner.compare_exchange(0, tok, Acquire, Relaxed).is_ok() {
            s.claims.fetch_add(1, Relaxed);
            true
        } else {
            s.contended.fetch_add(1, Relaxed);
            false
        }
    }

    fn push(&self, cpu: u32) {
        LAST.with(|l| l.set((0, 0)));
        let id = self.machine;
        BOUND.with(|b| {
            let mut b = b.borrow_mut();
            if let Some(e) = b.iter_mut().rev().find(|e| e.0 == id && e.1 == cpu) {
                e.2 += 1;
            } else {
                b.push((id, cpu, 1));
            }
        });
    }

    /// Run on a CPU: the bound one, or claim a free one for this call.
    /// Never blocks: None when every CPU is busy.
    pub fn try_enter(&self) -> Option<CpuGuard<'_>> {
        if let Some(cpu) = self.current() {
            return Some(CpuGuard { cpus: self, cpu, owned: false });
        }
        let tok = token();
        let n = self.len();
        let start = (tok % n as u64) as u32;
        for k in 0..n {
            let cpu = (start + k) % n;
            if self.try_claim(cpu, tok) {
                self.push(cpu);
                return Some(CpuGuard { cpus: self, cpu, owned: true });
            }
        }
        None
    }

    /// Like `try_enter`, but waits (yielding) for a CPU to become free.
    pub fn enter(&self) -> CpuGuard<'_> {
        let mut g = None;
        spin_until(|| {
            g = self.try_enter();
            g.is_some()
        });
        g.expect("spin_until returned")
    }

    /// Run this thread on `cpu` until `unbind` (affinity, like
    /// `sched_setaffinity` to one CPU). Several threads may be bound to one
    /// CPU: they take turns through its per-CPU locks, and a thread with
    /// preemption disabled keeps the CPU to itself. Nested binds of the same
    /// CPU nest; binding a different CPU while bound is refused.
    pub fn bind(&self, cpu: u32) -> Result<(), String> {
        if cpu >= self.len() {
            return Err(format!("cpu {cpu} does not exist (the machine has {} CPUs)", self.len()));
        }
        if let Some(cur) = self.current() {
            if cur != cpu {
                return Err(format!("this thread already runs on cpu {cur}; it cannot also run on cpu {cpu}"));
            }
        }
        if self.ctx().claimed.is_some_and(|c| c != cpu) {
            return Err(format!("cannot move to cpu {cpu} with preemption disabled"));
        }
        self.push(cpu);
        self.slots[cpu as usize].claims.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Undo one `bind`.
    pub fn unbind(&self) -> Result<u32, String> {
        LAST.with(|l| l.set((0, 0)));
        let id = self.machine;
        let popped = BOUND.with(|b| {
            let mut b = b.borrow_mut();
            let i = b.iter().rposition(|e| e.0 == id)?;
            b[i].2 -= 1;
            let cpu = b[i].1;
            if b[i].2 == 0 {
                b.remove(i);
                Some((cpu, true))
            } else {
                Some((cpu, false))
            }
        });
        match popped {
            Some((cpu, _last)) => Ok(cpu),
            None => Err("this thread is not bound to a CPU".into()),
        }
    }

    // ---- contexts: preemption and interrupts (include/linux/preempt.h) -----

    /// This thread's context on this machine.
    pub fn ctx(&self) -> Ctx {
        let id = self.machine;
        CTX.with(|c| c.borrow().iter().find(|e| e.0 == id).map(|e| e.1).unwrap_or_default())
    }

    fn set_ctx(&self, ctx: Ctx) {
        let id = self.machine;
        CTX.with(|c| {
            let mut c = c.borrow_mut();
            if let Some(e) = c.iter_mut().find(|e| e.0 == id) {
                e.1 = ctx;
            } else {
                c.push((id, ctx));
            }
        });
    }

    /// Wait until no other thread holds `cpu` exclusively (a thread with
    /// preemption disabled or in interrupt context keeps its CPU: others
    /// run there only when it is done, as the scheduler would).
    #[inline]
    pub fn wait_runnable(&self, cpu: u32) {
        let s = &self.slots[cpu as usize];
        // Acquire, like the wait loop below: a CPU found free must also
        // show what its last holder wrote there (found by tests/loom.rs;
        // a plain load on x86 either way).
        let o = s.owner.load(Acquire);
        if o == 0 || o == token() {
            return;
        }
        s.contended.fetch_add(1, Relaxed);
        let tok = token();
        // Interrupted: run anyway (see the module header).
        let _ = wait_until(&mut || {
            let o = s.owner.load(Acquire);
            o == 0 || o == tok
        });
    }

    /// Add to `preempt_count` (preempt_disable, irq_enter...): the first
    /// step up claims this thread's CPU until the count is back to 0.
    /// Waits for the CPU however long it takes (see `try_preempt_add`).
    pub fn preempt_add(&self, val: u32, irq_off: bool) -> u32 {
        loop {
            if let Ok(cpu) = self.try_preempt_add(val, irq_off) {
                return cpu;
            }
        }
    }

    /// `preempt_add`, failing (with nothing changed) when the wait for a
    /// CPU another thread holds is interrupted.
    pub fn try_preempt_add(&self, val: u32, irq_off: bool) -> crate::Result<u32> {
        let mut ctx = self.ctx();
        if ctx.preempt_count == 0 && ctx.claimed.is_none() {
            let cpu = self.this_cpu();
            let tok = token();
            let s = &self.slots[cpu as usize];
            if s.owner.load(Relaxed) != tok && !self.try_claim(cpu, tok) {
                let claimed = wait_until(&mut || s.owner.compare_exchange(0, tok, Acquire, Relaxed).is_ok());
                if !claimed {
                    return Err(interrupted(&format!(
                        "for cpu {cpu}, which another thread holds with preemption disabled"
                    )));
                }
            }
            note_claim(&self.slots, cpu, tok, true);
            ctx.claimed = Some(cpu);
        }
        ctx.preempt_count += val;
        if irq_off {
            ctx.irq_disabled += 1;
        }
        if let Some(cpu) = ctx.claimed {
            self.slots[cpu as usize].preempt_count.store(ctx.preempt_count, Relaxed);
        }
        self.set_ctx(ctx);
        Ok(ctx.claimed.expect("claimed above"))
    }

    /// Subtract from `preempt_count`; releasing the CPU at 0. Err if the
    /// count would go negative in that field (an unbalanced enable).
    pub fn preempt_sub(&self, val: u32, mask: u32, irq_on: bool) -> Result<(), String> {
        let mut ctx = self.ctx();
        if ctx.preempt_count & mask < val || (irq_on && ctx.irq_disabled == 0) {
            return Err(format!(
                "WARNING: DEBUG_LOCKS_WARN_ON(val > preempt_count()): unbalanced enable (preempt_count {:#x}, subtracting {val:#x})",
                ctx.preempt_count
            ));
        }
        ctx.preempt_count -= val;
        if irq_on {
            ctx.irq_disabled -= 1;
        }
        if let Some(cpu) = ctx.claimed {
            self.slots[cpu as usize].preempt_count.store(ctx.preempt_count, Relaxed);
            if ctx.preempt_count == 0 && ctx.irq_disabled == 0 {
                ctx.claimed = None;
                note_claim(&self.slots, cpu, token(), false);
                self.slots[cpu as usize].owner.store(0, Release);
            }
        }
        self.set_ctx(ctx);
        Ok(())
    }

    /// `in_atomic()`.
    pub fn in_atomic(&self) -> bool {
        self.ctx().preempt_count != 0
    }

    /// `in_interrupt()`.
    pub fn in_interrupt(&self) -> bool {
        self.ctx().preempt_count & (HARDIRQ_MASK | SOFTIRQ_MASK | NMI_MASK) != 0
    }

    /// `irqs_disabled()`.
    pub fn irqs_disabled(&self) -> bool {
        self.ctx().irq_disabled != 0
    }

    /// `__might_sleep`: the kernel's report when a sleeping call is made
    /// in atomic context (CONFIG_DEBUG_ATOMIC_SLEEP), as an error message.
    pub fn might_sleep(&self, file_line: &str) -> Result<(), String> {
        let ctx = self.ctx();
        if ctx.preempt_count == 0 && ctx.irq_disabled == 0 {
            return Ok(());
        }
        Err(format!(
            "BUG: sleeping function called from invalid context at {file_line}\n\
             in_atomic(): {}, irqs_disabled(): {}, non_block: 0, pid: {}, name: {}\n\
             preempt_count: {:x}, expected: 0",
            u8::from(ctx.preempt_count != 0),
            u8::from(ctx.irq_disabled != 0),
            std::process::id(),
            std::thread::current().name().unwrap_or("python"),
            ctx.preempt_count
        ))
    }

    /// Is `cpu` held by some thread right now?
    pub fn is_claimed(&self, cpu: u32) -> bool {
        self.slots[cpu as usize].owner.load(Relaxed) != 0
    }

    /// Check cpu-1/cpu-2 for the calling thread.
    pub fn check(&self) -> Vec<String> {
        let mut errs = Vec::new();
        let tok = token();
        if let Some(cpu) = self.ctx().claimed {
            if self.slots[cpu as usize].owner.load(Relaxed) != tok {
                errs.push(format!("cpu-2: this thread has preemption disabled on cpu {cpu} but does not own it"));
            }
        }
        errs
    }
}

impl Drop for CpuGuard<'_> {
    fn drop(&mut self) {
        if self.owned {
            LAST.with(|l| l.set((0, 0)));
            let id = self.cpus.machine;
            let cpu = self.cpu;
            BOUND.with(|b| {
                let mut b = b.borrow_mut();
                if let Some(i) = b.iter().rposition(|e| e.0 == id && e.1 == cpu) {
                    b[i].2 -= 1;
                    if b[i].2 == 0 {
                        b.remove(i);
                    }
                }
            });
            self.cpus.slots[cpu as usize].owner.store(0, Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_call_claims_and_binding() {
        let c = Cpus::new(2);
        {
            let g = c.try_enter().unwrap();
            assert!(c.is_claimed(g.cpu));
            assert_eq!(c.current(), Some(g.cpu));
            // Nested entry reuses the claim.
            let g2 = c.try_enter().unwrap();
            assert_eq!(g2.cpu, g.cpu);
            assert!(!g2.owned);
        }
        assert!(!c.is_claimed(0) && !c.is_claimed(1));
        c.bind(1).unwrap();
        assert_eq!(c.current(), Some(1));
        assert_eq!(c.this_cpu(), 1);
        assert!(c.bind(0).is_err());
        c.bind(1).unwrap();
        assert_eq!(c.unbind(), Ok(1));
        assert_eq!(c.unbind(), Ok(1));
        assert!(c.unbind().is_err());
        assert!(c.bind(5).is_err());
    }

    #[test]
    fn preemption_keeps_the_cpu() {
        let c = std::sync::Arc::new(Cpus::new(2));
        c.bind(0).unwrap();
        assert_eq!(c.preempt_add(PREEMPT_OFFSET, false), 0);
        assert!(c.in_atomic() && c.is_claimed(0));
        assert!(c.might_sleep("here").unwrap_err().starts_with("BUG: sleeping function called from invalid context at here"));
        assert_eq!(c.preempt_add(PREEMPT_OFFSET, false), 0);
        c.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false).unwrap();
        assert!(c.is_claimed(0));
        c.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false).unwrap();
        assert!(!c.is_claimed(0) && !c.in_atomic());
        assert!(c.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false).is_err());
        c.preempt_add(HARDIRQ_OFFSET, true);
        assert!(c.in_interrupt() && c.irqs_disabled());
        c.preempt_sub(HARDIRQ_OFFSET, HARDIRQ_MASK, true).unwrap();
        c.unbind().unwrap();
    }

    #[test]
    fn two_threads_get_two_cpus() {
        let c = std::sync::Arc::new(Cpus::new(2));
        c.bind(0).unwrap();
        c.preempt_add(PREEMPT_OFFSET, false);
        let c2 = c.clone();
        let other = std::thread::spawn(move || {
            let g = c2.try_enter().unwrap();
            g.cpu
        })
        .join()
        .unwrap();
        assert_eq!(other, 1, "cpu 0 is held with preemption disabled");
        c.preempt_sub(PREEMPT_OFFSET, PREEMPT_MASK, false).unwrap();
        c.unbind().unwrap();
    }
}
