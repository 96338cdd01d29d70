//! A per-CPU TLB model: set-associative arrays with LRU replacement, split
//! by page size at the first level, with a second-level (shared 4K/2M) TLB,
//! and the kernel's flush and shootdown policy.
//!
//! # Sources
//! Default geometry: Intel's Skylake client core (Intel 64 and IA-32
//! Architectures Optimization Reference Manual, the Skylake
//! microarchitecture's TLB table): first-level DTLB 4 KiB pages 64 entries
//! 4-way, 2M/4M pages 32 entries 4-way, 1 GiB pages 4 entries 4-way;
//! second-level STLB 1536 entries 12-way shared by 4 KiB and 2M/4M pages,
//! and 16 entries 4-way for 1 GiB pages. Flush policy:
//! `arch/x86/mm/tlb.c` (`flush_tlb_kernel_range`: more than
//! `tlb_single_page_flush_ceiling` = 33 pages flushes everything, otherwise
//! one INVLPG per page, on every CPU through IPIs; `flush_tlb_one_kernel`
//! is local).
//!
//! # Model
//! A lookup probes the first-level array of each page size (hardware does
//! it in parallel), then the STLB; a miss walks the page tables (counted,
//! with the entries read) and fills both levels. Kernel mappings are global:
//! only explicit flushes remove them.
//!
//! # Invariants
//! - tlb-1: a valid entry's tag is the virtual page number at its size, and
//!   no set holds two valid entries with the same tag and size.
//!
//! Lock order: each CPU's TLB has its own spin lock, the innermost lock of
//! the crate; the CPU's thread takes it for lookups, a flushing CPU takes
//! each other CPU's in turn.
#![forbid(unsafe_code)]

/// Entries and associativity of each array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbConfig {
    pub l1_4k: (u32, u32),
    pub l1_2m: (u32, u32),
    pub l1_1g: (u32, u32),
    pub stlb: (u32, u32),
    pub stlb_1g: (u32, u32),
}

impl Default for TlbConfig {
    fn default() -> Self {
        TlbConfig { l1_4k: (64, 4), l1_2m: (32, 4), l1_1g: (4, 4), stlb: (1536, 12), stlb_1g: (16, 4) }
    }
}

impl TlbConfig {
    /// The arrays by name, as `Machine(tlb={...})` names them.
    pub const NAMES: [&'static str; 5] = ["l1_4k", "l1_2m", "l1_1g", "stlb", "stlb_1g"];

    pub fn set(&mut self, name: &str, entries: u32, ways: u32) -> Result<(), String> {
        if entries == 0 || ways == 0 || entries % ways != 0 || entries > 1 << 16 {
            return Err(format!("tlb {name}: {entries} entries in {ways} ways is not a set-associative geometry"));
        }
        let slot = match name {
            "l1_4k" => &mut self.l1_4k,
            "l1_2m" => &mut self.l1_2m,
            "l1_1g" => &mut self.l1_1g,
            "stlb" => &mut self.stlb,
            "stlb_1g" => &mut self.stlb_1g,
            _ => return Err(format!("unknown TLB array '{name}' (expected one of {:?})", Self::NAMES)),
        };
        *slot = (entries, ways);
        Ok(())
    }
}

/// Counters of one CPU's TLB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlbStats {
    /// Lookups answered by a first-level array.
    pub hits: u64,
    /// Lookups answered by the STLB.
    pub l2_hits: u64,
    /// Lookups that missed both levels.
    pub misses: u64,
    /// Page walks (a miss that found a mapping or faulted).
    pub walks: u64,
    /// Page-table entries read by walks.
    pub walk_reads: u64,
    /// Full local flushes.
    pub flushes: u64,
    /// Single-page invalidations (INVLPG).
    pub flush_pages: u64,
    /// IPIs this CPU sent to flush other CPUs (kernel-range shootdowns).
    pub shootdowns: u64,
    /// Flush IPIs this CPU received.
    pub ipis: u64,
}

#[derive(Clone, Copy, Default)]
struct Entry {
    /// vpn + 1 (0 = invalid).
    tag: u64,
    base: u64,
    stamp: u64,
}

struct Array {
    sets: usize,
    ways: usize,
    e: Vec<Entry>,
}

impl Array {
    fn new((entries, ways): (u32, u32)) -> Array {
        let ways = ways as usize;
        Array { sets: entries as usize / ways, ways, e: vec![Entry::default(); entries as usize] }
    }

    #[inline]
    fn set(&self, vpn: u64) -> usize {
        (vpn % self.sets as u64) as usize * self.ways
    }

    #[inline]
    fn lookup(&mut self, vpn: u64, now: u64) -> Option<u64> {
        let s = self.set(vpn);
        for e in &mut self.e[s..s + self.ways] {
            if e.tag == vpn + 1 {
                e.stamp = now;
                return Some(e.base);
            }
        }
        None
    }

    fn insert(&mut self, vpn: u64, base: u64, now: u64) {
        let s = self.set(vpn);
        let set = &mut self.e[s..s + self.ways];
        let victim = set
            .iter()
            .position(|e| e.tag == vpn + 1 || e.tag == 0)
            .unwrap_or_else(|| (0..set.len()).min_by_key(|&i| set[i].stamp).expect("ways > 0"));
        set[victim] = Entry { tag: vpn + 1, base, stamp: now };
    }

    fn invalidate(&mut self, vpn: u64) {
        let s = self.set(vpn);
        for e in &mut self.e[s..s + self.ways] {
            if e.tag == vpn + 1 {
                e.tag = 0;
            }
        }
    }

    fn clear(&mut self) {
        self.e.iter_mut().for_each(|e| e.tag = 0);
    }

    fn valid(&self) -> usize {
        self.e.iter().filter(|e| e.tag != 0).count()
    }

    fn check(&self, name: &str) -> Vec<String> {
        let mut errs = Vec::new();
        for s in 0..self.sets {
            let set = &self.e[s * self.ways..(s + 1) * self.ways];
            for (i, a) in set.iter().enumerate() {
                if a.tag == 0 {
                    continue;
                }
                if ((a.tag - 1) % self.sets as u64) as usize != s {
                    errs.push(format!("tlb-1: {name} set {s} holds vpn {:#x} of another set", a.tag - 1));
                }
                if set[i + 1..].iter().any(|b| b.tag == a.tag) {
                    errs.push(format!("tlb-1: {name} set {s} holds vpn {:#x} twice", a.tag - 1));
                }
            }
        }
        errs
    }
}

/// Page-size classes the arrays hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeClass {
    Base,
    Large,
    Huge,
}

/// One CPU's TLB.
pub struct Tlb {
    shifts: [u32; 3],
    l1: [Array; 3],
    stlb: Array,
    stlb_1g: Array,
    now: u64,
    pub stats: TlbStats,
}

/// A TLB hit: physical base of the page and its size class.
#[derive(Clone, Copy, Debug)]
pub struct Hit {
    pub base: u64,
    pub class: SizeClass,
}

impl Tlb {
    /// `shifts`: log2 of the base, large (PMD) and huge (PUD) page sizes.
    pub fn new(cfg: &TlbConfig, shifts: [u32; 3]) -> Tlb {
        Tlb {
            shifts,
            l1: [Array::new(cfg.l1_4k), Array::new(cfg.l1_2m), Array::new(cfg.l1_1g)],
            stlb: Array::new(cfg.stlb),
            stlb_1g: Array::new(cfg.stlb_1g),
            now: 0,
            stats: TlbStats::default(),
        }
    }

    #[inline]
    fn vpn(&self, va: u64, c: usize) -> u64 {
        // STLB tags of large pages are kept apart from base-page tags by a
        // top bit (the hardware keeps the page size in the entry).
        (va >> self.shifts[c]) | ((c as u64) << 62)
    }

    /// Look `va` up: the physical base of its page and size class.
    #[inline]
    pub fn lookup(&mut self, va: u64) -> Option<Hit> {
        self.now += 1;
        let now = self.now;
        for c in 0..3 {
            let vpn = self.vpn(va, c);
            if let Some(base) = self.l1[c].lookup(vpn, now) {
                self.stats.hits += 1;
                return Some(Hit { base, class: [SizeClass::Base, SizeClass::Large, SizeClass::Huge][c] });
            }
        }
        for c in 0..3 {
            let vpn = self.vpn(va, c);
            let arr = if c == 2 { &mut self.stlb_1g } else { &mut self.stlb };
            if let Some(base) = arr.lookup(vpn, now) {
                self.stats.l2_hits += 1;
                self.l1[c].insert(vpn, base, now);
                return Some(Hit { base, class: [SizeClass::Base, SizeClass::Large, SizeClass::Huge][c] });
            }
        }
        self.stats.misses += 1;
        None
    }

    /// Fill both levels after a walk found `base` for `va` at size class `c`.
    pub fn fill(&mut self, va: u64, base: u64, class: SizeClass) {
        let c = class as usize;
        let vpn = self.vpn(va, c);
        let now = self.now;
        self.l1[c].insert(vpn, base, now);
        if c == 2 {
            self.stlb_1g.insert(vpn, base, now);
        } else {
            self.stlb.insert(vpn, base, now);
        }
    }

    /// Size class of a page size.
    pub fn class_of(&self, page_size: u64) -> SizeClass {
        let sh = page_size.trailing_zeros();
        if sh == self.shifts[0] {
            SizeClass::Base
        } else if sh == self.shifts[1] {
            SizeClass::Large
        } else {
            SizeClass::Huge
        }
    }

    /// INVLPG: drop whatever maps `va`, at every size.
    pub fn flush_one(&mut self, va: u64) {
        self.stats.flush_pages += 1;
        for c in 0..3 {
            let vpn = self.vpn(va, c);
            self.l1[c].invalidate(vpn);
            if c == 2 {
                self.stlb_1g.invalidate(vpn);
            } else {
                self.stlb.invalidate(vpn);
            }
        }
    }

    /// A full flush (global entries included, as `__flush_tlb_all` does).
    pub fn flush_all(&mut self) {
        self.stats.flushes += 1;
        self.l1.iter_mut().for_each(Array::clear);
        self.stlb.clear();
        self.stlb_1g.clear();
    }

    /// Valid entries in (first level, STLB).
    pub fn occupancy(&self) -> (usize, usize) {
        (self.l1.iter().map(Array::valid).sum(), self.stlb.valid() + self.stlb_1g.valid())
    }

    pub fn check(&self) -> Vec<String> {
        let mut errs = Vec::new();
        for (i, a) in self.l1.iter().enumerate() {
            errs.extend(a.check(TlbConfig::NAMES[i]));
        }
        errs.extend(self.stlb.check("stlb"));
        errs.extend(self.stlb_1g.check("stlb_1g"));
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_within_a_set() {
        // 2 sets of 2 ways for base pages; everything else tiny.
        let cfg = TlbConfig { l1_4k: (4, 2), l1_2m: (2, 2), l1_1g: (2, 2), stlb: (2, 2), stlb_1g: (2, 2) };
        let mut t = Tlb::new(&cfg, [12, 21, 30]);
        // vpns 0, 2, 4 all land in set 0 of the 4K array.
        for vpn in [0u64, 2] {
            assert!(t.lookup(vpn << 12).is_none());
            t.fill(vpn << 12, vpn << 12, SizeClass::Base);
        }
        assert!(t.lookup(0).is_some()); // 0 is now most recent; 2 is LRU
        assert!(t.lookup(4 << 12).is_none());
        t.fill(4 << 12, 4 << 12, SizeClass::Base); // evicts vpn 2 from L1
        assert_eq!(t.stats.hits, 1);
        assert!(t.lookup(0).is_some());
        assert_eq!(t.stats.hits, 2);
        // vpn 2 left L1 but the STLB (2 entries, 1 set) kept the last two fills: 2 and 4.
        assert!(t.lookup(2 << 12).is_some());
        assert_eq!(t.stats.l2_hits, 1);
        assert!(t.check().is_empty());
        t.flush_one(0);
        assert!(t.lookup(0).is_none());
        t.flush_all();
        assert_eq!(t.occupancy(), (0, 0));
    }
}
