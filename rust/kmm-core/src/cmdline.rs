//! Boot parameters: the kernel command line kmm understands, in the
//! kernel's syntax, as one table (`BOOT_PARAMS`) and one parsed value
//! (`BootParams`) that a machine is booted with.
//!
//! # Kernel
//! `kernel/params.c` (`parse_args`, `next_arg`: `name` or `name=value`,
//! double quotes, `-` and `_` alike in names), `mm/slub.c`
//! (`setup_slub_debug`, `parse_slub_debug_flags`, `kmem_cache_flags`,
//! `setup_slub_min_order`, `setup_slub_max_order`, `setup_slub_min_objects`;
//! 6.9+ spells them `slab_*` and keeps the `slub_*` names),
//! `mm/mm_init.c` (`early_init_on_alloc`, `early_init_on_free`),
//! `mm/kasan/generic.c` + `mm/kasan/common.c` (`kasan=`),
//! `mm/kmemleak.c` (`kmemleak=`), `lib/fault-inject.c`
//! (`setup_fault_attr`: `<interval>,<probability>,<space>,<times>`),
//! `mm/failslab.c`, `mm/fail_page_alloc.c`.
//!
//! SIMPLIFICATION: parameters kmm does not model are refused (the kernel
//! passes unknown ones on to init); each accepted one is applied as the
//! kernel applies it at boot.
//!
//! # Invariants
//! - cmdline-1: `BootParams::parse(p.text())` gives back `p`.
#![forbid(unsafe_code)]

use crate::error::{KmmError, Result};
use crate::slab::geometry::{
    SLAB_CONSISTENCY_CHECKS, SLAB_FAILSLAB, SLAB_POISON, SLAB_RED_ZONE, SLAB_STORE_USER, SLAB_TRACE,
};

/// `DEBUG_DEFAULT_FLAGS`: `slub_debug` with no flags (F Z P U).
pub const DEBUG_DEFAULT_FLAGS: u32 = SLAB_CONSISTENCY_CHECKS | SLAB_RED_ZONE | SLAB_POISON | SLAB_STORE_USER;

/// (name, default, kernel file, meaning): every boot parameter kmm takes.
pub const BOOT_PARAMS: &[(&str, &str, &str, &str)] = &[
    ("kasan", "off", "mm/kasan/common.c", "on|off: generic KASAN, a shadow byte per 8-byte granule checked on every access"),
    ("slub_debug", "", "mm/slub.c", "SLUB debugging: flags F Z P U T A O or - (none: F Z P U), optionally ',cache,...'; groups split by ';' (alias slab_debug)"),
    ("slub_min_order", "0", "mm/slub.c", "smallest slab order (alias slab_min_order)"),
    ("slub_max_order", "3", "mm/slub.c", "largest slab order SLUB picks (alias slab_max_order)"),
    ("slub_min_objects", "0", "mm/slub.c", "objects a slab should hold at least; 0: 4 * (fls(cpus) + 1) (alias slab_min_objects)"),
    ("init_on_alloc", "0", "mm/mm_init.c", "1: zero every page and slab object when allocated"),
    ("init_on_free", "0", "mm/mm_init.c", "1: zero every page and slab object when freed"),
    ("failslab", "", "mm/failslab.c", "fault injection for slab allocations: <interval>,<probability>,<space>,<times>"),
    ("fail_page_alloc", "", "mm/fail_page_alloc.c", "fault injection for page allocations: <interval>,<probability>,<space>,<times>"),
    ("kmemleak", "off", "mm/kmemleak.c", "on|off: track allocations for kmemleak scans"),
    ("slab_nomerge", "", "mm/slab_common.c", "never merge a new cache into a compatible existing one (alias slub_nomerge; the Machine's slab_nomerge=True does the same)"),
    ("slab_merge", "", "mm/slab_common.c", "merge compatible caches, the default (alias slub_merge); the later of slab_merge and slab_nomerge wins"),
];

/// A fault attribute as `setup_fault_attr` reads it from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FaultAttrParam {
    pub interval: u64,
    /// Percent, 0..=100.
    pub probability: u32,
    pub space: i64,
    pub times: i64,
}

/// `slub_debug=`: the global flags and the per-cache groups.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SlubDebug {
    /// `slub_debug`: flags for every cache no group names.
    pub global: u32,
    /// `(flags, cache names)` of each group with a cache list, in order
    /// (a name may end with `*`: a prefix).
    pub groups: Vec<(u32, Vec<String>)>,
    /// `O`: no debug metadata for caches whose slabs it would make bigger.
    pub disable_higher_order: bool,
}

impl SlubDebug {
    /// `kmem_cache_flags(flags, name)`: the flags a cache of that name gets.
    pub fn flags_for(&self, name: &str, flags: u32) -> u32 {
        if flags & crate::slab::geometry::SLAB_NO_USER_FLAGS != 0 {
            return flags;
        }
        for (block, names) in &self.groups {
            for n in names {
                let hit = match n.strip_suffix('*') {
                    Some(prefix) => name.starts_with(prefix),
                    None => name == n,
                };
                if hit {
                    return flags | block;
                }
            }
        }
        flags | self.global
    }

    /// Is any debugging on?
    pub fn enabled(&self) -> bool {
        self.global != 0 || self.groups.iter().any(|g| g.0 != 0)
    }
}

/// The parsed command line a machine boots with.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BootParams {
    pub kasan: bool,
    pub slub_debug: Option<SlubDebug>,
    pub slub_min_order: Option<u32>,
    pub slub_max_order: Option<u32>,
    pub slub_min_objects: Option<u32>,
    pub init_on_alloc: bool,
    pub init_on_free: bool,
    pub failslab: Option<FaultAttrParam>,
    pub fail_page_alloc: Option<FaultAttrParam>,
    pub kmemleak: bool,
    /// `slab_nomerge` (true) / `slab_merge` (false), the later one given.
    pub slab_nomerge: Option<bool>,
    /// The parameters as given (normalised: one space between them).
    pub text: String,
}

fn bad(msg: String) -> KmmError {
    KmmError::InvalidArgument(msg)
}

/// `next_arg`: split a command line into (name, value) pairs; a value may
/// be double-quoted (quotes removed), as may the whole `name=value`.
fn split_args(s: &str) -> Result<Vec<(String, Option<String>)>> {
    let mut out = Vec::new();
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i].is_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let mut tok = String::new();
        let mut quoted = false;
        while i < b.len() && (quoted || !b[i].is_whitespace()) {
            if b[i] == '"' {
                quoted = !quoted;
            } else {
                tok.push(b[i]);
            }
            i += 1;
        }
        if quoted {
            return Err(bad(format!("boot parameters: unterminated quote in {s:?}")));
        }
        match tok.split_once('=') {
            Some((n, v)) => out.push((n.to_string(), Some(v.to_string()))),
            None => out.push((tok, None)),
        }
    }
    Ok(out)
}

/// The canonical name of a parameter (`parameq`: `-` and `_` alike; the
/// `slab_*` spellings of 6.9+).
fn canonical(name: &str) -> String {
    let n = name.replace('-', "_");
    match n.as_str() {
        "slab_debug" => "slub_debug".into(),
        "slab_min_order" => "slub_min_order".into(),
        "slab_max_order" => "slub_max_order".into(),
        "slab_min_objects" => "slub_min_objects".into(),
        "slub_nomerge" => "slab_nomerge".into(),
        "slub_merge" => "slab_merge".into(),
        _ => n,
    }
}

fn need_value<'a>(name: &str, v: &'a Option<String>) -> Result<&'a str> {
    v.as_deref().filter(|v| !v.is_empty()).ok_or_else(|| bad(format!("boot parameter {name} needs a value ({name}=...)")))
}

fn parse_uint(name: &str, v: &str, max: u64) -> Result<u64> {
    let n = if let Some(h) = v.strip_prefix("0x") { u64::from_str_radix(h, 16).ok() } else { v.parse::<u64>().ok() };
    match n {
        Some(n) if n <= max => Ok(n),
        _ => Err(bad(format!("boot parameter {name}={v}: not a number from 0 to {max}"))),
    }
}

fn parse_onoff(name: &str, v: &Option<String>) -> Result<bool> {
    match v.as_deref() {
        None | Some("on") | Some("1") | Some("y") | Some("Y") => Ok(true),
        Some("off") | Some("0") | Some("n") | Some("N") => Ok(false),
        Some(x) => Err(bad(format!("boot parameter {name}={x}: expected on or off"))),
    }
}

/// `setup_fault_attr`: `<interval>,<probability>,<space>,<times>`.
fn parse_fault_attr(name: &str, v: &str) -> Result<FaultAttrParam> {
    let parts: Vec<&str> = v.split(',').collect();
    let err = || bad(format!("boot parameter {name}={v}: expected <interval>,<probability>,<space>,<times>"));
    if parts.len() != 4 {
        return Err(err());
    }
    let interval: u64 = parts[0].trim().parse().map_err(|_| err())?;
    let probability: u32 = parts[1].trim().parse().map_err(|_| err())?;
    let space: i64 = parts[2].trim().parse().map_err(|_| err())?;
    let times: i64 = parts[3].trim().parse().map_err(|_| err())?;
    if probability > 100 {
        return Err(bad(format!("boot parameter {name}={v}: probability {probability} is over 100 (percent)")));
    }
    // setup_fault_attr: "attr->interval = interval ... if (!attr->interval) attr->interval = 1".
    Ok(FaultAttrParam { interval: interval.max(1), probability, space, times })
}

/// `setup_slub_debug` + `parse_slub_debug_flags`. `None` is `slub_debug`
/// with no `=` (full default debugging).
fn parse_slub_debug(v: Option<&str>) -> Result<SlubDebug> {
    let mut d = SlubDebug::default();
    let Some(s) = v.filter(|s| !s.is_empty()) else {
        d.global = DEBUG_DEFAULT_FLAGS;
        return Ok(d);
    };
    let mut global_changed = false;
    let mut list_given = false;
    let mut global = 0u32;
    for block in s.split(';').filter(|b| !b.is_empty()) {
        let (flag_part, list) = match block.split_once(',') {
            Some((f, l)) => (f, Some(l)),
            None => (block, None),
        };
        let mut flags = 0u32;
        if flag_part.is_empty() && list.is_some() {
            flags = DEBUG_DEFAULT_FLAGS;
        }
        for c in flag_part.chars() {
            match c.to_ascii_lowercase() {
                '-' => flags = 0,
                'f' => flags |= SLAB_CONSISTENCY_CHECKS,
                'z' => flags |= SLAB_RED_ZONE,
                'p' => flags |= SLAB_POISON,
                'u' => flags |= SLAB_STORE_USER,
                't' => flags |= SLAB_TRACE,
                'a' => flags |= SLAB_FAILSLAB,
                'o' => d.disable_higher_order = true,
                other => {
                    return Err(bad(format!(
                        "boot parameter slub_debug={s}: option '{other}' unknown (F Z P U T A O and - are)"
                    )))
                }
            }
        }
        match list {
            None => {
                global = flags;
                global_changed = true;
            }
            Some(l) => {
                list_given = true;
                let names: Vec<String> = l.split(',').filter(|n| !n.is_empty()).map(str::to_string).collect();
                d.groups.push((flags, names));
            }
        }
    }
    // "a single list of flags with list of slabs means debugging is only
    // changed for those slabs".
    d.global = if list_given && !global_changed { 0 } else { global };
    Ok(d)
}

impl BootParams {
    /// Parse a command line. Unknown parameters and bad values are refused,
    /// naming them.
    pub fn parse(s: &str) -> Result<BootParams> {
        let mut p = BootParams::default();
        let mut seen: Vec<String> = Vec::new();
        let mut words = Vec::new();
        for (name, v) in split_args(s)? {
            let c = canonical(&name);
            if seen.contains(&c) {
                return Err(bad(format!("boot parameter {name} given twice")));
            }
            match c.as_str() {
                "kasan" => p.kasan = parse_onoff(&name, &v)?,
                "kmemleak" => p.kmemleak = parse_onoff(&name, &v)?,
                "init_on_alloc" => p.init_on_alloc = parse_onoff(&name, &v)?,
                "init_on_free" => p.init_on_free = parse_onoff(&name, &v)?,
                "slub_debug" => p.slub_debug = Some(parse_slub_debug(v.as_deref())?),
                "slub_min_order" => p.slub_min_order = Some(parse_uint(&name, need_value(&name, &v)?, 10)? as u32),
                "slub_max_order" => p.slub_max_order = Some(parse_uint(&name, need_value(&name, &v)?, 10)? as u32),
                "slub_min_objects" => p.slub_min_objects = Some(parse_uint(&name, need_value(&name, &v)?, 32767)? as u32),
                "failslab" => p.failslab = Some(parse_fault_attr(&name, need_value(&name, &v)?)?),
                "fail_page_alloc" => p.fail_page_alloc = Some(parse_fault_attr(&name, need_value(&name, &v)?)?),
                // setup_slab_nomerge / setup_slab_merge (`__setup`): any
                // value after the name is ignored, as the kernel ignores it.
                "slab_nomerge" => p.slab_nomerge = Some(true),
                "slab_merge" => p.slab_nomerge = Some(false),
                _ => {
                    let known: Vec<&str> = BOOT_PARAMS.iter().map(|r| r.0).collect();
                    return Err(bad(format!(
                        "unknown boot parameter \"{name}\" (kmm knows: {})",
                        known.join(", ")
                    )));
                }
            }
            seen.push(c);
            words.push(match &v {
                Some(v) if v.contains(char::is_whitespace) => format!("{name}=\"{v}\""),
                Some(v) => format!("{name}={v}"),
                None => name.clone(),
            });
        }
        if let (Some(lo), Some(hi)) = (p.slub_min_order, p.slub_max_order) {
            if lo > hi {
                return Err(bad(format!("boot parameters: slub_min_order={lo} is above slub_max_order={hi}")));
            }
        }
        p.text = words.join(" ");
        Ok(p)
    }

    /// Check cmdline-1.
    pub fn check(&self) -> Vec<String> {
        match BootParams::parse(&self.text) {
            Ok(q) if q == *self => Vec::new(),
            Ok(_) => vec![format!("cmdline-1: {:?} parses to other parameters", self.text)],
            Err(e) => vec![format!("cmdline-1: {:?} does not parse: {e}", self.text)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slub_debug_as_the_kernel_reads_it() {
        // Plain `slub_debug`: full debugging for every cache.
        let d = BootParams::parse("slub_debug").unwrap().slub_debug.unwrap();
        assert_eq!(d.global, DEBUG_DEFAULT_FLAGS);
        // Flags and a cache list: only those caches.
        let d = BootParams::parse("slub_debug=FZ,dentry,kmalloc-*").unwrap().slub_debug.unwrap();
        assert_eq!(d.global, 0);
        assert_eq!(d.flags_for("dentry", 0), SLAB_CONSISTENCY_CHECKS | SLAB_RED_ZONE);
        assert_eq!(d.flags_for("kmalloc-64", 0), SLAB_CONSISTENCY_CHECKS | SLAB_RED_ZONE);
        assert_eq!(d.flags_for("filp", 0), 0);
        // Empty flags with a list: the default flags for those caches.
        let d = BootParams::parse("slub_debug=,dentry").unwrap().slub_debug.unwrap();
        assert_eq!(d.flags_for("dentry", 0), DEBUG_DEFAULT_FLAGS);
        // Groups: a global block and a per-cache block.
        let d = BootParams::parse("slub_debug=P;FU,filp").unwrap().slub_debug.unwrap();
        assert_eq!(d.global, SLAB_POISON);
        assert_eq!(d.flags_for("filp", 0), SLAB_CONSISTENCY_CHECKS | SLAB_STORE_USER);
        assert_eq!(d.flags_for("dentry", 0), SLAB_POISON);
        // '-' switches everything off; O is remembered.
        let d = BootParams::parse("slab_debug=FZ-O").unwrap().slub_debug.unwrap();
        assert_eq!(d.global, 0);
        assert!(d.disable_higher_order);
        assert!(BootParams::parse("slub_debug=FQ").is_err());
    }

    #[test]
    fn names_values_and_errors() {
        let p = BootParams::parse("kasan=on  slab-min-order=1 failslab=1,10,0,-1 init_on_free=1 kmemleak").unwrap();
        assert!(p.kasan && p.init_on_free && p.kmemleak && !p.init_on_alloc);
        assert_eq!(p.slub_min_order, Some(1));
        assert_eq!(p.failslab, Some(FaultAttrParam { interval: 1, probability: 10, space: 0, times: -1 }));
        assert_eq!(p.text, "kasan=on slab-min-order=1 failslab=1,10,0,-1 init_on_free=1 kmemleak");
        assert!(p.check().is_empty());
        let e = BootParams::parse("kasan=on quiet").unwrap_err().to_string();
        assert!(e.contains("unknown boot parameter \"quiet\""), "{e}");
        assert!(BootParams::parse("kasan=maybe").is_err());
        assert!(BootParams::parse("failslab=1,200,0,1").is_err());
        assert!(BootParams::parse("slub_min_order=3 slub_max_order=1").is_err());
        assert!(BootParams::parse("kasan kasan").is_err());
        assert!(BootParams::parse("slub_debug=\"FZ").is_err());
        assert_eq!(BootParams::parse("").unwrap(), BootParams::default());
    }
}
