//! Run-time tunables: the `vm.*` sysctls kmm models, one table
//! (`SYSCTLS`) with their ranges, read and written by name; a write
//! recomputes what the kernel's handler recomputes.
//!
//! # Kernel
//! `mm/page_alloc.c`: `min_free_kbytes_sysctl_handler`,
//! `watermark_scale_factor_sysctl_handler` (both `setup_per_zone_wmarks`,
//! which ends with `zone_pcp_update` for every zone),
//! `percpu_pagelist_high_fraction_sysctl_handler` (0 or at least
//! `MIN_PERCPU_PAGELIST_HIGH_FRACTION`; `zone_set_pageset_high_and_batch`),
//! `lowmem_reserve_ratio_sysctl_handler` (values below 1 become 0;
//! `setup_per_zone_lowmem_reserve`), `watermark_boost_factor` (read by
//! `boost_watermark`; no handler), and the `vm_page_alloc_table` entries'
//! `extra1`/`extra2` ranges. `mm/slub.c`: `min_partial_store` (kstrtoul,
//! no clamp), `cpu_partial_store` (kstrtouint; EINVAL for a non-zero count
//! on a cache without cpu partial lists; `slub_set_cpu_partial`, `flush_all`)
//! behind `slab.<cache>.min_partial` and `slab.<cache>.cpu_partial`, kmm's
//! names for /sys/kernel/slab/<cache>/{min_partial,cpu_partial}.
//!
//! SIMPLIFICATION: a slab tunable given at boot (`Machine(sysctl=...)`,
//! `--set`) for a cache that does not exist yet waits for it: it is written
//! when a cache (or alias) of that name is created, as a udev rule would.
//! Written at run time, a missing cache is ENOENT, as in sysfs.
//!
//! # Invariants
//! - sysctl-1: zones' watermarks, protection and pageset sizes are those the
//!   handlers compute from the current values (unless a recorded machine's
//!   tuning set them at boot and nothing was written since).
//!
//! Lock order: `lowmem_reserve_ratio` is a leaf lock; a write takes each
//! CPU's pcp lock alone while it resizes the pagesets.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::error::{KmmError, Result};
use crate::Machine;

/// `MIN_PERCPU_PAGELIST_HIGH_FRACTION`.
pub const MIN_PERCPU_PAGELIST_HIGH_FRACTION: u64 = 8;

/// (name, default, valid values, meaning): every sysctl kmm models.
pub const SYSCTLS: &[(&str, &str, &str, &str)] = &[
    ("vm.min_free_kbytes", "auto", "0 .. 2147483647", "the reserve the min watermarks are cut from (kB)"),
    ("vm.watermark_scale_factor", "10", "1 .. 3000", "low/high watermark gap in 1/10000 of the zone"),
    ("vm.watermark_boost_factor", "15000", "0 .. 2147483647", "watermark boost after a fragmenting fallback, in 1/10000 of high"),
    ("vm.percpu_pagelist_high_fraction", "0", "0, or 8 .. 2147483647", "pcp high = managed / fraction, auto-tuning off (0: from the low watermark)"),
    ("vm.lowmem_reserve_ratio", "256 256 32 0 0", "one value per zone, 0 .. 2147483647", "protection of lower zones from higher-zone allocations"),
    ("slab.<cache>.min_partial", "per cache", "0 .. 18446744073709551615", "empty slabs a cache keeps on its node partial list (/sys/kernel/slab/<cache>/min_partial)"),
    ("slab.<cache>.cpu_partial", "per cache", "0 .. 4294967295 (0 on debug caches)", "objects a CPU keeps in partial slabs (/sys/kernel/slab/<cache>/cpu_partial)"),
];

/// A slab cache's sysfs tunable.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SlabAttr {
    MinPartial,
    CpuPartial,
}

/// `slab.<cache>.<attr>` as (cache, attr); None for any other name.
pub fn slab_name(name: &str) -> Option<(&str, SlabAttr)> {
    let rest = name.strip_prefix("slab.")?;
    let (cache, attr) = rest.rsplit_once('.')?;
    let attr = match attr {
        "min_partial" => SlabAttr::MinPartial,
        "cpu_partial" => SlabAttr::CpuPartial,
        _ => return None,
    };
    (!cache.is_empty()).then_some((cache, attr))
}

/// The table row of a name (`slab.<cache>.X` matches its pattern row).
fn row(name: &str) -> Option<&'static (&'static str, &'static str, &'static str, &'static str)> {
    match slab_name(name) {
        Some((_, SlabAttr::MinPartial)) => SYSCTLS.iter().find(|r| r.0 == "slab.<cache>.min_partial"),
        Some((_, SlabAttr::CpuPartial)) => SYSCTLS.iter().find(|r| r.0 == "slab.<cache>.cpu_partial"),
        None => SYSCTLS.iter().find(|r| r.0 == name && !r.0.contains('<')),
    }
}

/// A slab tunable's value, as its store function parses it.
fn slab_value(name: &str, attr: SlabAttr, value: &str, valid: &str) -> Result<u64> {
    // kstrtoul/kstrtouint, base 10, one trailing newline allowed.
    let t = value.strip_suffix('\n').unwrap_or(value);
    let hi = match attr {
        SlabAttr::MinPartial => u64::MAX,
        SlabAttr::CpuPartial => u32::MAX as u64,
    };
    match t.parse::<u64>() {
        Ok(n) if n <= hi => Ok(n),
        _ => Err(einval(name, value, valid)),
    }
}

/// The values a machine runs with.
pub struct Sysctls {
    pub watermark_scale_factor: AtomicU64,
    pub watermark_boost_factor: AtomicU64,
    pub percpu_pagelist_high_fraction: AtomicU64,
    pub lowmem_reserve_ratio: Mutex<Vec<u64>>,
}

const INT_MAX: u64 = i32::MAX as u64;

fn einval(name: &str, value: &str, valid: &str) -> KmmError {
    KmmError::InvalidArgument(format!("sysctl {name}: invalid value {value:?} (valid: {valid}): Invalid argument"))
}

fn parse_int(name: &str, v: &str, lo: u64, hi: u64, valid: &str) -> Result<u64> {
    let t = v.trim();
    match t.parse::<u64>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(einval(name, v, valid)),
    }
}

impl Machine {
    /// Read a sysctl as `/proc/sys` prints it.
    pub fn sysctl_get(&self, name: &str) -> Result<String> {
        if let Some((cache, attr)) = slab_name(name) {
            let c = self.slab_cache_for_sysfs(name, cache)?;
            return Ok(match attr {
                SlabAttr::MinPartial => c.min_partial().to_string(),
                SlabAttr::CpuPartial => c.cpu_partial().0.to_string(),
            });
        }
        let s = &self.sysctls;
        Ok(match name {
            "vm.min_free_kbytes" => self.min_free_kbytes.load(Relaxed).to_string(),
            "vm.watermark_scale_factor" => s.watermark_scale_factor.load(Relaxed).to_string(),
            "vm.watermark_boost_factor" => s.watermark_boost_factor.load(Relaxed).to_string(),
            "vm.percpu_pagelist_high_fraction" => s.percpu_pagelist_high_fraction.load(Relaxed).to_string(),
            "vm.lowmem_reserve_ratio" => {
                s.lowmem_reserve_ratio.lock().iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\t")
            }
            _ => return Err(unknown(name)),
        })
    }

    /// Write a sysctl (the text one would write to `/proc/sys/...`); an
    /// invalid value is refused with nothing changed, as the kernel's
    /// handler refuses it (EINVAL).
    pub fn sysctl_set(&self, name: &str, value: &str) -> Result<()> {
        let row = row(name).ok_or_else(|| unknown(name))?;
        let valid = row.2;
        if let Some((cache, attr)) = slab_name(name) {
            let v = slab_value(name, attr, value, valid)?;
            let c = self.slab_cache_for_sysfs(name, cache)?;
            return self.slab_attr_store(&c, attr, v);
        }
        let s = &self.sysctls;
        match name {
            "vm.min_free_kbytes" => {
                let v = parse_int(name, value, 0, INT_MAX, valid)?;
                // A reserve the zones cannot hold would leave no memory.
                let total_kb = self.totalram_pages().saturating_mul(self.page_size / 1024);
                if v >= total_kb {
                    return Err(KmmError::InvalidArgument(format!(
                        "sysctl {name}: {v} kB is all of this machine's {total_kb} kB: nothing would be left to allocate"
                    )));
                }
                self.min_free_kbytes.store(v, Relaxed);
                self.setup_per_zone_wmarks();
            }
            "vm.watermark_scale_factor" => {
                let v = parse_int(name, value, 1, 3000, valid)?;
                s.watermark_scale_factor.store(v, Relaxed);
                self.setup_per_zone_wmarks();
            }
            "vm.watermark_boost_factor" => {
                let v = parse_int(name, value, 0, INT_MAX, valid)?;
                s.watermark_boost_factor.store(v, Relaxed);
            }
            "vm.percpu_pagelist_high_fraction" => {
                let v = parse_int(name, value, 0, INT_MAX, valid)?;
                if v != 0 && v < MIN_PERCPU_PAGELIST_HIGH_FRACTION {
                    return Err(einval(name, value, valid));
                }
                s.percpu_pagelist_high_fraction.store(v, Relaxed);
                for z in self.zones.iter().filter(|z| z.is_populated()) {
                    self.zone_set_pageset_high_and_batch(z);
                }
            }
            "vm.lowmem_reserve_ratio" => {
                let words: Vec<&str> = value.split_whitespace().collect();
                if words.is_empty() || words.len() > self.zones.len() {
                    return Err(einval(name, value, valid));
                }
                let mut r = s.lowmem_reserve_ratio.lock().clone();
                for (i, w) in words.iter().enumerate() {
                    // "if (sysctl_lowmem_reserve_ratio[i] < 1) ... = 0": negative
                    // values parse as ints and become 0.
                    let n: i64 = w.parse().map_err(|_| einval(name, value, valid))?;
                    if n > INT_MAX as i64 {
                        return Err(einval(name, value, valid));
                    }
                    r[i] = n.max(0) as u64;
                }
                *s.lowmem_reserve_ratio.lock() = r;
                self.setup_per_zone_lowmem_reserve();
            }
            _ => return Err(unknown(name)),
        }
        Ok(())
    }
}

/// Check a value's syntax and range before any machine exists (what
/// depends on the machine, e.g. a min_free_kbytes above its memory, is
/// checked when it is written).
pub fn check_value(name: &str, value: &str) -> Result<()> {
    let row = row(name).ok_or_else(|| unknown(name))?;
    let valid = row.2;
    if let Some((_, attr)) = slab_name(name) {
        return slab_value(name, attr, value, valid).map(drop);
    }
    match name {
        "vm.watermark_scale_factor" => parse_int(name, value, 1, 3000, valid).map(drop),
        "vm.percpu_pagelist_high_fraction" => {
            let v = parse_int(name, value, 0, INT_MAX, valid)?;
            if v != 0 && v < MIN_PERCPU_PAGELIST_HIGH_FRACTION {
                return Err(einval(name, value, valid));
            }
            Ok(())
        }
        "vm.lowmem_reserve_ratio" => {
            let words: Vec<&str> = value.split_whitespace().collect();
            if words.is_empty() || words.iter().any(|w| w.parse::<i64>().map_or(true, |n| n > INT_MAX as i64)) {
                return Err(einval(name, value, valid));
            }
            Ok(())
        }
        _ => parse_int(name, value, 0, INT_MAX, valid).map(drop),
    }
}

impl Machine {
    /// The live cache /sys/kernel/slab/<cache> names (an alias names the
    /// cache it was merged into).
    fn slab_cache_for_sysfs(&self, name: &str, cache: &str) -> Result<std::sync::Arc<crate::slab::cache::KmemCache>> {
        self.slab
            .caches()
            .into_iter()
            .find(|c| c.name == cache || c.aliases.lock().iter().any(|a| a == cache))
            .ok_or_else(|| {
                KmmError::InvalidArgument(format!(
                    "sysctl {name}: /sys/kernel/slab/{cache}: No such file or directory (no cache of that name)"
                ))
            })
    }

    fn slab_attr_store(&self, c: &crate::slab::cache::KmemCache, attr: SlabAttr, v: u64) -> Result<()> {
        match attr {
            SlabAttr::MinPartial => {
                c.set_min_partial(v);
                Ok(())
            }
            SlabAttr::CpuPartial => c.set_cpu_partial(self, v as u32),
        }
    }

    /// Boot: write the slab tunables of `cfg.sysctl` to the caches that
    /// exist, and keep the others for the caches' creation.
    pub(crate) fn apply_boot_slab_sysctls(&self) -> Result<()> {
        for (name, value) in self.cfg.sysctl.iter().filter(|(n, _)| slab_name(n).is_some()) {
            let (cache, attr) = slab_name(name).expect("filtered");
            let v = slab_value(name, attr, value, row(name).map_or("", |r| r.2))?;
            match self.slab_cache_for_sysfs(name, cache) {
                Ok(c) => self.slab_attr_store(&c, attr, v)?,
                Err(_) => self.slab.pending_tunables.lock().push((cache.to_string(), attr, v)),
            }
        }
        Ok(())
    }

    /// A cache called `name` was just created (or merged into `c`): write the
    /// boot tunables waiting for it.
    pub(crate) fn apply_pending_slab_sysctls(&self, name: &str, c: &crate::slab::cache::KmemCache) -> Result<()> {
        let mine: Vec<(SlabAttr, u64)> = {
            let p = self.slab.pending_tunables.lock();
            p.iter().filter(|(n, _, _)| n == name).map(|&(_, a, v)| (a, v)).collect()
        };
        for (attr, v) in mine {
            self.slab_attr_store(c, attr, v)?;
        }
        Ok(())
    }
}

fn unknown(name: &str) -> KmmError {
    let known: Vec<&str> = SYSCTLS.iter().map(|r| r.0).collect();
    if let Some(rest) = name.strip_prefix("slab.") {
        return KmmError::InvalidArgument(format!(
            "unknown sysctl {name:?}: slab tunables are slab.<cache>.min_partial and slab.<cache>.cpu_partial, not {rest:?}"
        ));
    }
    KmmError::InvalidArgument(format!("unknown sysctl {name:?} (kmm knows: {})", known.join(", ")))
}

impl Sysctls {
    /// The boot values of a configuration.
    pub fn new(cfg: &crate::machine::MachineConfig, zone_kinds: &[crate::arch::ZoneKind]) -> Sysctls {
        let ratio = match &cfg.lowmem_reserve_ratio {
            Some(r) => (0..zone_kinds.len()).map(|i| r.get(i).copied().unwrap_or(0)).collect(),
            None => zone_kinds.iter().map(|&k| crate::zone::default_lowmem_reserve_ratio(k)).collect(),
        };
        Sysctls {
            watermark_scale_factor: AtomicU64::new(cfg.watermark_scale_factor),
            watermark_boost_factor: AtomicU64::new(crate::page_alloc::WATERMARK_BOOST_FACTOR),
            percpu_pagelist_high_fraction: AtomicU64::new(0),
            lowmem_reserve_ratio: Mutex::new(ratio),
        }
    }
}
