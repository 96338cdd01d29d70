//! `/proc/kallsyms` of the recorded boot: kernel addresses to the text a
//! `%pS` call site prints as (`sched_setaffinity+0x127`).
//!
//! perf.data stores call sites as raw addresses; `perf script` turns them
//! into `function+0xoffset` through the kernel's symbol table. This module
//! builds that table from a `/proc/kallsyms` text the way perf 6.1 builds
//! its kernel map from kallsyms, so the names and offsets are the ones perf
//! printed: sorted start addresses and a binary search per lookup.
//!
//! # Kernel
//! `tools/perf/util/symbol.c` (perf 6.1): `map__process_kallsym_symbol`
//! keeps the types `symbol_type__filter` accepts (T, W, D, B in either
//! case; R/r rodata and the rest are dropped) and skips names starting with
//! `$`; `symbols__fixup_end` ends each symbol where the next starts, except
//! at a kernel/module boundary (`[module]` in the name), where the last
//! symbol before it ends at `roundup(start + 4096, 4096)`, and the very last
//! at `roundup(start, 4096) + 4096`; `symbols__fixup_duplicate` keeps one
//! symbol per address by `choose_best_symbol` (non-zero length, then non-weak,
//! then global, then fewer leading underscores, then the longer name, then
//! not a `SyS` alias) — after fixup_end only the last of a run of symbols at
//! one address has a length, so it wins. `maps__split_kallsyms` moves
//! `name\t[module]` symbols to their module (the name printed without the
//! module) and shifts kernel symbols by the relocation delta
//! (`kallsyms__delta`: the reference symbol's address in kallsyms minus the
//! one perf.data recorded). libtraceevent's `print_function`
//! (`tools/lib/traceevent/event-parse.c`) prints a found symbol as
//! `name+0x%llx` and anything else as `0x%llx`.
//!
//! SIMPLIFICATION: perf maps a module's symbols only inside that module's
//! range from `/proc/modules` (of the machine perf runs on); here a module
//! symbol covers addresses up to the next symbol, as if perf ran on the
//! recording machine.
//!
//! # Invariants
//! - kallsyms-1: `starts` is sorted, one symbol per address, and
//!   `starts[i] < ends[i] <= starts[i+1]` for the kernel's own symbols.
//! - kallsyms-2: parsing never panics, whatever the bytes.
#![forbid(unsafe_code)]

use std::fmt;

/// A malformed kallsyms line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KallsymsError {
    /// 1-based line number.
    pub line: u64,
    pub message: String,
}

impl fmt::Display for KallsymsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for KallsymsError {}

/// One symbol while the table is built.
struct Sym {
    start: u64,
    end: u64,
    /// The name as kallsyms gives it, `\t[module]` included (perf compares
    /// and measures that string).
    name: String,
    /// kallsyms type letter.
    kind: u8,
}

impl Sym {
    fn is_module(&self) -> bool {
        self.name.contains('[')
    }
    fn weak(&self) -> bool {
        // kallsyms2elf_binding: only 'W' is weak; lower case is local.
        self.kind == b'W'
    }
    fn global(&self) -> bool {
        self.kind.is_ascii_uppercase() && self.kind != b'W'
    }
}

/// The kernel's symbol table of one boot.
#[derive(Clone, Debug, Default)]
pub struct Kallsyms {
    starts: Vec<u64>,
    ends: Vec<u64>,
    /// Printed names (module part removed), one per symbol.
    names: Vec<Box<str>>,
    /// The symbol belongs to a module (`name\t[mod]` in kallsyms).
    module: Vec<bool>,
    /// Addresses of the reference symbols perf relocates by.
    text: Option<u64>,
    stext: Option<u64>,
    /// Lines read.
    pub lines: u64,
}

fn roundup_page(x: u64) -> u64 {
    x.saturating_add(4095) & !4095
}

/// `choose_best_symbol`: true if `a` is kept over `b`.
fn keep_a(a: &Sym, b: &Sym) -> bool {
    let (la, lb) = (a.end.wrapping_sub(a.start), b.end.wrapping_sub(b.start));
    if lb == 0 && la > 0 {
        return true;
    }
    if la == 0 && lb > 0 {
        return false;
    }
    if b.weak() && !a.weak() {
        return true;
    }
    if a.weak() && !b.weak() {
        return false;
    }
    if a.global() && !b.global() {
        return true;
    }
    if b.global() && !a.global() {
        return false;
    }
    let us = |s: &str| s.bytes().take_while(|&c| c == b'_').count();
    let (ua, ub) = (us(&a.name), us(&b.name));
    if ub > ua {
        return true;
    }
    if ua > ub {
        return false;
    }
    if a.name.len() != b.name.len() {
        return a.name.len() > b.name.len();
    }
    // arch__choose_best_symbol: avoid the "SyS" syscall aliases.
    !(a.name.starts_with("SyS") || a.name.starts_with("compat_SyS"))
}

impl Kallsyms {
    /// Parse `/proc/kallsyms` text: `address type name[\t[module]]` per line.
    pub fn parse(text: &[u8]) -> Result<Kallsyms, KallsymsError> {
        let mut syms: Vec<Sym> = Vec::new();
        let mut k = Kallsyms::default();
        for (i, raw) in text.split(|&c| c == b'\n').enumerate() {
            let no = i as u64 + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.iter().all(|c| c.is_ascii_whitespace()) {
                continue;
            }
            k.lines = no;
            let err = |m: &str| KallsymsError { line: no, message: m.to_string() };
            let line = std::str::from_utf8(raw).map_err(|_| err("not UTF-8 text: not a /proc/kallsyms file"))?;
            let mut it = line.splitn(3, [' ', '\t']);
            let addr = it.next().unwrap_or("");
            let kind = it.next().unwrap_or("");
            let name = it.next().unwrap_or("");
            let start = u64::from_str_radix(addr, 16)
                .map_err(|_| err(&format!("'{}' is not 'address type name' (/proc/kallsyms)", clip(line))))?;
            if kind.len() != 1 || name.is_empty() {
                return Err(err(&format!("'{}' is not 'address type name' (/proc/kallsyms)", clip(line))));
            }
            let kind = kind.as_bytes()[0];
            let bare = name.split('\t').next().unwrap_or(name).trim_end();
            match bare {
                "_text" if k.text.is_none() => k.text = Some(start),
                "_stext" if k.stext.is_none() => k.stext = Some(start),
                _ => {}
            }
            if !matches!(kind.to_ascii_uppercase(), b'T' | b'W' | b'D' | b'B') || name.starts_with('$') {
                continue;
            }
            syms.push(Sym { start, end: start, name: name.to_string(), kind });
        }
        // __symbols__insert: equal addresses keep file order.
        syms.sort_by_key(|s| s.start);
        // symbols__fixup_end(symbols, is_kallsyms = true)
        for i in 1..syms.len() {
            let (cur_start, cur_mod) = (syms[i].start, syms[i].is_module());
            let prev = &mut syms[i - 1];
            if prev.end == prev.start {
                prev.end = if prev.is_module() != cur_mod { roundup_page(prev.end.saturating_add(4096)) } else { cur_start };
            }
        }
        if let Some(last) = syms.last_mut() {
            if last.end == last.start {
                last.end = roundup_page(last.start).saturating_add(4096);
            }
        }
        // symbols__fixup_duplicate
        let mut kept: Vec<Sym> = Vec::with_capacity(syms.len());
        for s in syms {
            match kept.last() {
                Some(prev) if prev.start == s.start => {
                    if !keep_a(prev, &s) {
                        kept.pop();
                        kept.push(s);
                    }
                }
                _ => kept.push(s),
            }
        }
        for s in kept {
            let (bare, module) = match s.name.split_once('\t') {
                Some((n, m)) => (n.trim_end(), m.contains('[')),
                None => (s.name.as_str(), s.is_module()),
            };
            k.starts.push(s.start);
            k.ends.push(s.end);
            k.names.push(bare.into());
            k.module.push(module);
        }
        Ok(k)
    }

    /// Symbols kept.
    pub fn len(&self) -> usize {
        self.starts.len()
    }
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The address of a reference symbol perf relocates by (`_text`, `_stext`).
    pub fn ref_symbol(&self, name: &str) -> Option<u64> {
        match name {
            "_text" => self.text,
            "_stext" => self.stext,
            _ => None,
        }
    }

    /// The symbol containing `addr`: (name, start, is a module symbol).
    /// `delta` is subtracted from kernel (not module) symbol addresses
    /// first, as perf relocates them.
    pub fn lookup(&self, addr: u64, delta: u64) -> Option<(&str, u64, bool)> {
        // Kernel symbols are shifted by -delta; look the address up shifted
        // by +delta among them, and unshifted among module symbols.
        let find = |a: u64| -> Option<usize> {
            let i = self.starts.partition_point(|&s| s <= a);
            let i = i.checked_sub(1)?;
            (a < self.ends[i]).then_some(i)
        };
        if delta != 0 {
            if let Some(i) = find(addr.wrapping_add(delta)).filter(|&i| !self.module[i]) {
                return Some((&self.names[i], self.starts[i].wrapping_sub(delta), false));
            }
            return find(addr).filter(|&i| self.module[i]).map(|i| (&*self.names[i], self.starts[i], true));
        }
        find(addr).map(|i| (&*self.names[i], self.starts[i], self.module[i]))
    }

    /// The violations of kallsyms-1.
    pub fn check(&self) -> Vec<String> {
        let mut errs = Vec::new();
        for i in 0..self.starts.len() {
            if self.starts[i] >= self.ends[i] {
                errs.push(format!("kallsyms-1: symbol {} ends at or before its start", self.names[i]));
            }
            if i > 0 && self.starts[i - 1] >= self.starts[i] {
                errs.push(format!("kallsyms-1: symbol {} is not after the one before", self.names[i]));
            }
            if i > 0 && !self.module[i] && !self.module[i - 1] && self.ends[i - 1] > self.starts[i] {
                errs.push(format!("kallsyms-1: symbol {} overlaps the next", self.names[i - 1]));
            }
        }
        errs
    }
}

/// `%pS` as libtraceevent prints it: `name+0xoff`, or the raw address.
pub fn format_ps(out: &mut String, addr: u64, found: Option<(&str, u64)>, with_offset: bool) {
    use std::fmt::Write;
    match found {
        Some((name, start)) => {
            out.push_str(name);
            if with_offset {
                let _ = write!(out, "+0x{:x}", addr.wrapping_sub(start));
            }
        }
        None => {
            let _ = write!(out, "0x{addr:x}");
        }
    }
}

fn clip(s: &str) -> String {
    let mut e = s.len().min(60);
    while !s.is_char_boundary(e) {
        e -= 1;
    }
    if e < s.len() {
        format!("{}...", &s[..e])
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &str = "\
ffffffff81000000 T srso_alias_untrain_ret
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81001000 t local_fn
ffffffff81001000 W weak_alias
ffffffff81001100 T __two
ffffffff81001100 T one_
ffffffff81001200 r some_rodata
ffffffff81001300 T sched_setaffinity
ffffffff81002000 D data_sym
ffffffffc0201000 t ftrace_trampoline\t[__builtin__ftrace]
ffffffffc0202000 t mod_fn\t[mymod]
";

    #[test]
    fn names_and_offsets_as_perf_prints_them() {
        let k = Kallsyms::parse(K.as_bytes()).unwrap();
        assert!(k.check().is_empty(), "{:?}", k.check());
        let ps = |a: u64| {
            let mut s = String::new();
            format_ps(&mut s, a, k.lookup(a, 0).map(|(n, st, _)| (n, st)), true);
            s
        };
        // Three at one address: only the last has a length after fixup_end.
        assert_eq!(ps(0xffffffff81000010), "_text+0x10");
        // 't' local vs 'W' weak at one address: the last (weak) has the length.
        assert_eq!(ps(0xffffffff81001004), "weak_alias+0x4");
        assert_eq!(ps(0xffffffff81001100), "one_+0x0");
        // rodata is dropped: the text symbol before it extends over it.
        assert_eq!(ps(0xffffffff81001210), "one_+0x110");
        assert_eq!(ps(0xffffffff81001427), "sched_setaffinity+0x127");
        // The last kernel symbol before a module ends a page past its start, rounded.
        assert_eq!(ps(0xffffffff81002fff), "data_sym+0xfff");
        assert_eq!(ps(0xffffffff81003000), "0xffffffff81003000");
        // Module symbols print without their module.
        assert_eq!(ps(0xffffffffc0202010), "mod_fn+0x10");
        // Beyond the last symbol's page: not found.
        assert_eq!(ps(0xffffffffc0204000), "0xffffffffc0204000");
        assert_eq!(ps(0x1000), "0x1000");
        assert_eq!(k.ref_symbol("_text"), Some(0xffffffff81000000));
    }

    #[test]
    fn relocation_delta_shifts_kernel_symbols_only() {
        let k = Kallsyms::parse(K.as_bytes()).unwrap();
        // kallsyms says _text is 0x1000 above where the recording had it.
        let (n, s, m) = k.lookup(0xffffffff81000427, 0x1000).unwrap();
        assert_eq!((n, s, m), ("sched_setaffinity", 0xffffffff81000300, false));
        assert_eq!(k.lookup(0xffffffffc0202010, 0x1000).map(|x| x.0), Some("mod_fn"));
    }

    #[test]
    fn bad_lines_name_the_line() {
        let e = Kallsyms::parse(b"ffffffff81000000 T _text\nhello world\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = Kallsyms::parse(b"\x89PNG\r\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(Kallsyms::parse(b"").unwrap().is_empty());
    }
}
