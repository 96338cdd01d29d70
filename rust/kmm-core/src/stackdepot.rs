//! Call stacks of allocations and frees, stored once (`lib/stackdepot.c`),
//! and `current`: who is running (pid, comm) and its call stack.
//!
//! kmm's "kernel code" is the Python program driving it, so a call stack
//! is the Python stack (innermost frame first, "function+0xline" per frame,
//! as tracepoint call sites are): the binding installs a hook that walks
//! it (`set_stack_hook`); without one (pure Rust use) stacks are empty.
//! Each frame gets a text address (`sym_addr`) so that `struct track` can
//! store it in the object's metadata as the kernel stores `addr`, and
//! `%pS` finds the name again (`sym_name`).
//!
//! The hook may take Python's GIL: call `save_stack` only with no kmm lock
//! held (slab_debug and kmemleak capture at the API entry, before the
//! allocator takes its locks).
//!
//! # Kernel
//! `lib/stackdepot.c` (`stack_depot_save`, `stack_depot_fetch`,
//! `stack_depot_print`), `kernel/stacktrace.c` (`stack_trace_print`),
//! `include/linux/sched.h` (`current->pid`, `current->comm`,
//! TASK_COMM_LEN 16).
//!
//! SIMPLIFICATION: `pid` and `comm` are the host thread's (its Linux tid
//! and /proc/thread-self/comm), read once per thread.
//!
//! # Invariants
//! - stackdepot-1: a handle names one stack for the depot's life; handle 0 is "no stack".
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::trace::CallSite;

/// Frames of a call stack, innermost first.
pub type Frames = Arc<[CallSite]>;

/// `TRACK_ADDRS_COUNT` / kmemleak's `MAX_TRACE`: frames kept per stack.
pub const MAX_FRAMES: usize = 16;

/// Walks the caller's stack (the binding's Python stack walker).
pub type StackHook = fn() -> Frames;

static HOOK: OnceLock<StackHook> = OnceLock::new();

/// Install the stack walker (once per process; later calls are ignored).
pub fn set_stack_hook(h: StackHook) {
    let _ = HOOK.set(h);
}

/// `stack_trace_save`: the current call stack (empty without a hook).
/// Must not be called with a kmm lock held.
pub fn save_stack() -> Frames {
    match HOOK.get() {
        Some(h) => {
            let f = h();
            if f.len() > MAX_FRAMES {
                f[..MAX_FRAMES].iter().cloned().collect()
            } else {
                f
            }
        }
        None => Arc::from(Vec::new()),
    }
}

/// `current->pid` and `current->comm` of the calling thread.
pub fn current_task() -> (i32, Arc<str>) {
    thread_local! {
        static TASK: (i32, Arc<str>) = read_task();
    }
    TASK.with(|t| t.clone())
}

fn read_task() -> (i32, Arc<str>) {
    // /proc/thread-self -> "<tgid>/task/<tid>".
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().and_then(|s| s.to_str()).and_then(|s| s.parse::<i32>().ok()))
        .unwrap_or(std::process::id() as i32);
    let mut comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_else(|_| "kmm".into());
    comm.truncate(comm.trim_end().len());
    // TASK_COMM_LEN 16: 15 characters and the NUL.
    while comm.len() > 15 {
        comm.pop();
    }
    (tid, Arc::from(comm.as_str()))
}

#[derive(Default)]
struct Depot {
    stacks: Vec<Frames>,
    by_stack: HashMap<Frames, u32>,
    syms: Vec<CallSite>,
    by_sym: HashMap<CallSite, u32>,
}

/// One machine's stack depot and symbol table.
pub struct StackDepot {
    inner: Mutex<Depot>,
    /// Where the text addresses of call sites start (`_text`).
    text_base: u64,
}

impl StackDepot {
    pub fn new(is_64bit: bool) -> StackDepot {
        StackDepot {
            inner: Mutex::new(Depot::default()),
            text_base: if is_64bit { 0xffff_ffff_8100_0000 } else { 0xc100_0000 },
        }
    }

    /// `stack_depot_save`: the handle of `frames` (0 for an empty stack).
    pub fn save(&self, frames: &Frames) -> u32 {
        if frames.is_empty() {
            return 0;
        }
        let mut d = self.inner.lock();
        if let Some(&h) = d.by_stack.get(frames) {
            return h;
        }
        d.stacks.push(frames.clone());
        let h = d.stacks.len() as u32;
        d.by_stack.insert(frames.clone(), h);
        h
    }

    /// `stack_depot_fetch`.
    pub fn fetch(&self, handle: u32) -> Option<Frames> {
        if handle == 0 {
            return None;
        }
        self.inner.lock().stacks.get(handle as usize - 1).cloned()
    }

    /// The text address of a call site (never 0).
    pub fn sym_addr(&self, site: &CallSite) -> u64 {
        let mut d = self.inner.lock();
        let i = match d.by_sym.get(site) {
            Some(&i) => i,
            None => {
                d.syms.push(site.clone());
                let i = d.syms.len() as u32;
                d.by_sym.insert(site.clone(), i);
                i
            }
        };
        self.text_base + i as u64 * 16
    }

    /// `%pS` of a text address: the call site's name, or the raw address.
    pub fn sym_name(&self, addr: u64) -> String {
        if addr >= self.text_base && (addr - self.text_base) % 16 == 0 {
            let i = (addr - self.text_base) / 16;
            if i >= 1 {
                if let Some(s) = self.inner.lock().syms.get(i as usize - 1) {
                    return s.to_string();
                }
            }
        }
        format!("0x{addr:x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_and_symbols() {
        let d = StackDepot::new(true);
        let a: Frames = vec![Arc::from("f+0x1"), Arc::from("g+0x2")].into();
        let b: Frames = vec![Arc::from("f+0x1")].into();
        let ha = d.save(&a);
        assert_eq!(d.save(&a), ha);
        let hb = d.save(&b);
        assert!(ha != 0 && hb != 0 && ha != hb);
        assert_eq!(d.fetch(ha).unwrap().len(), 2);
        assert_eq!(d.save(&Arc::from(Vec::new())), 0);
        assert!(d.fetch(0).is_none());
        let s: CallSite = Arc::from("f+0x1");
        let addr = d.sym_addr(&s);
        assert_eq!(d.sym_addr(&s), addr);
        assert_eq!(d.sym_name(addr), "f+0x1");
        assert_eq!(d.sym_name(0x1234), "0x1234");
        let (pid, comm) = current_task();
        assert!(pid > 0 && !comm.is_empty() && comm.len() <= 15);
    }
}
