//! Cache geometry: alignment, object layout and slab order, computed as SLUB
//! computes them.
//!
//! # Kernel
//! `mm/slab_common.c` (`calculate_alignment`, `create_boot_cache`: kmalloc
//! caches aligned to the largest power of two dividing their size),
//! `mm/slub.c` (`calculate_sizes`, `calculate_order`, `calc_slab_order`,
//! `oo_make`, `set_min_partial`, `set_cpu_partial`), `include/linux/slab.h`
//! (SLAB_* flag values, 6.18 enum order on x86_64 with SLUB_DEBUG, KASAN off,
//! MEMCG on, no KFENCE), `mm/kasan/generic.c` (`kasan_cache_create`,
//! `optimal_redzone`: the slot layout with `kasan=on`).
//!
//! # Invariants
//! - geom-1: `object_size <= inuse <= size`, `size % align == 0`,
//!   `objects * size <= PAGE_SIZE << order`.
//! - geom-2: the free pointer lies inside the slot: `offset + 8 <= size`.
#![forbid(unsafe_code)]

use crate::error::{invalid, Result};

// SLAB_* flags (include/linux/slab.h, `enum _slab_flag_bits`, 6.18, x86_64 with
// CONFIG_SLUB_DEBUG, CONFIG_MEMCG, CONFIG_FAILSLAB; KASAN and KFENCE off).
pub const SLAB_CONSISTENCY_CHECKS: u32 = 1 << 0;
pub const SLAB_RED_ZONE: u32 = 1 << 1;
pub const SLAB_POISON: u32 = 1 << 2;
pub const SLAB_KMALLOC: u32 = 1 << 3;
pub const SLAB_HWCACHE_ALIGN: u32 = 1 << 4;
pub const SLAB_CACHE_DMA: u32 = 1 << 5;
pub const SLAB_CACHE_DMA32: u32 = 1 << 6;
pub const SLAB_STORE_USER: u32 = 1 << 7;
pub const SLAB_PANIC: u32 = 1 << 8;
pub const SLAB_TYPESAFE_BY_RCU: u32 = 1 << 9;
pub const SLAB_TRACE: u32 = 1 << 10;
pub const SLAB_DEBUG_OBJECTS: u32 = 1 << 11;
pub const SLAB_NOLEAKTRACE: u32 = 1 << 12;
pub const SLAB_NO_MERGE: u32 = 1 << 13;
pub const SLAB_FAILSLAB: u32 = 1 << 14;
pub const SLAB_ACCOUNT: u32 = 1 << 15;
pub const SLAB_NO_USER_FLAGS: u32 = 1 << 16;
pub const SLAB_RECLAIM_ACCOUNT: u32 = 1 << 17;
pub const SLAB_OBJECT_POISON: u32 = 1 << 18;
pub const SLAB_CMPXCHG_DOUBLE: u32 = 1 << 19;
pub const SLAB_NO_OBJ_EXT: u32 = 1 << 20;
/// `SLAB_KASAN`: the cache carries KASAN metadata (set by
/// `kasan_cache_create` with `kasan=on`; `slab_ksize` is then the object
/// size). SIMPLIFICATION: a kmm-internal bit; the values above stay those
/// of a KASAN-off build (a CONFIG_KASAN_GENERIC kernel numbers the flags
/// from `_SLAB_KASAN` on one higher).
pub const SLAB_KASAN: u32 = 1 << 21;

/// `sizeof(struct kasan_alloc_meta)` and `sizeof(struct kasan_free_meta)`
/// (generic mode, 64-bit, no CONFIG_KASAN_EXTRA_INFO): a track (pid +
/// stack handle) and two aux stack handles; a quarantine link and a track.
pub const KASAN_ALLOC_META_SIZE: u32 = 16;
pub const KASAN_FREE_META_SIZE: u32 = 16;

/// Flags a caller may pass to `kmem_cache_create` (SLAB_CORE_FLAGS |
/// SLAB_DEBUG_FLAGS | SLAB_CACHE_FLAGS as mm/slab.h permits them).
pub const SLAB_FLAGS_PERMITTED: u32 = SLAB_CONSISTENCY_CHECKS
    | SLAB_RED_ZONE
    | SLAB_POISON
    | SLAB_HWCACHE_ALIGN
    | SLAB_CACHE_DMA
    | SLAB_CACHE_DMA32
    | SLAB_STORE_USER
    | SLAB_PANIC
    | SLAB_TYPESAFE_BY_RCU
    | SLAB_TRACE
    | SLAB_DEBUG_OBJECTS
    | SLAB_NOLEAKTRACE
    | SLAB_NO_MERGE
    | SLAB_FAILSLAB
    | SLAB_ACCOUNT
    | SLAB_NO_USER_FLAGS
    | SLAB_RECLAIM_ACCOUNT
    | SLAB_NO_OBJ_EXT
    | SLAB_KMALLOC;

/// Debug flags: a cache with any of them skips the per-CPU fast paths.
pub const SLAB_DEBUG_FLAGS: u32 = SLAB_RED_ZONE | SLAB_POISON | SLAB_STORE_USER | SLAB_TRACE | SLAB_CONSISTENCY_CHECKS;

/// The named flags, for display and for Python constants.
pub const SLAB_FLAG_NAMES: &[(&str, u32)] = &[
    ("SLAB_CONSISTENCY_CHECKS", SLAB_CONSISTENCY_CHECKS),
    ("SLAB_RED_ZONE", SLAB_RED_ZONE),
    ("SLAB_POISON", SLAB_POISON),
    ("SLAB_KMALLOC", SLAB_KMALLOC),
    ("SLAB_HWCACHE_ALIGN", SLAB_HWCACHE_ALIGN),
    ("SLAB_CACHE_DMA", SLAB_CACHE_DMA),
    ("SLAB_CACHE_DMA32", SLAB_CACHE_DMA32),
    ("SLAB_STORE_USER", SLAB_STORE_USER),
    ("SLAB_PANIC", SLAB_PANIC),
    ("SLAB_TYPESAFE_BY_RCU", SLAB_TYPESAFE_BY_RCU),
    ("SLAB_TRACE", SLAB_TRACE),
    ("SLAB_NOLEAKTRACE", SLAB_NOLEAKTRACE),
    ("SLAB_NO_MERGE", SLAB_NO_MERGE),
    ("SLAB_FAILSLAB", SLAB_FAILSLAB),
    ("SLAB_ACCOUNT", SLAB_ACCOUNT),
    ("SLAB_NO_USER_FLAGS", SLAB_NO_USER_FLAGS),
    ("SLAB_RECLAIM_ACCOUNT", SLAB_RECLAIM_ACCOUNT),
    ("SLAB_NO_OBJ_EXT", SLAB_NO_OBJ_EXT),
];

/// `cache_line_size()` on x86.
pub const CACHE_LINE_SIZE: u32 = 64;
/// `ARCH_SLAB_MINALIGN` / `ARCH_KMALLOC_MINALIGN` (`__alignof__(unsigned long long)`).
pub const ARCH_SLAB_MINALIGN: u32 = 8;
/// `MAX_OBJS_PER_PAGE` (15-bit objects counter).
pub const MAX_OBJS_PER_PAGE: u32 = 32767;
/// `MIN_PARTIAL` / `MAX_PARTIAL`.
pub const MIN_PARTIAL: u32 = 5;
pub const MAX_PARTIAL: u32 = 10;
/// `sizeof(struct track)` on 64-bit with CONFIG_STACKDEPOT (addr, handle, cpu, pid, when).
pub const TRACK_SIZE: u32 = 32;

/// Boot-time SLUB tunables (`slab_min_order=`, `slab_max_order=`, `slab_min_objects=`).
#[derive(Clone, Copy, Debug)]
pub struct SlubTunables {
    pub min_order: u32,
    pub max_order: u32,
    /// 0 = derived from the CPU count.
    pub min_objects: u32,
    /// num_present_cpus (and nr_cpu_ids) of the machine.
    pub nr_cpus: u32,
    pub page_size: u32,
    /// sizeof(void *): 8 on 64-bit, 4 on 32-bit.
    pub word: u32,
    /// `kasan=on`: every cache gets KASAN metadata and redzones
    /// (`kasan_cache_create`).
    pub kasan: bool,
}

/// What a cache's geometry comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub object_size: u32,
    /// Slot stride (`s->size`, /sys/kernel/slab/<c>/slab_size).
    pub size: u32,
    pub align: u32,
    /// Offset of the free pointer within the slot (from the object start).
    pub offset: u32,
    /// `s->inuse`: object plus right padding/redzone, before metadata.
    pub inuse: u32,
    pub red_left_pad: u32,
    pub order: u32,
    pub objects: u32,
    /// Fallback (`s->min`): the smallest order holding one object.
    pub min_order: u32,
    pub min_objects: u32,
    pub min_partial: u32,
    /// `cpu_partial` in objects, and `cpu_partial_slabs`.
    pub cpu_partial: u32,
    pub cpu_partial_slabs: u32,
    /// The flags in force (with SLAB_OBJECT_POISON resolved).
    pub flags: u32,
    /// `reciprocal_value(size)`: ceil(2^64 / size), so that offset / size is
    /// `(offset * recip) >> 64` exactly for offsets below 2^32 (the kernel's
    /// `obj_to_index` avoids the division the same way).
    pub recip: u64,
}

impl Geometry {
    /// `obj_to_index` for an offset from the first object: the index, or
    /// None when the offset is not on an object boundary.
    #[inline]
    pub fn index_of(&self, offset: u64) -> Option<u64> {
        debug_assert!(offset < 1 << 32);
        let q = ((offset as u128 * self.recip as u128) >> 64) as u64;
        (q * self.size as u64 == offset).then_some(q)
    }
}

fn align_up(x: u32, a: u32) -> u32 {
    x.div_ceil(a) * a
}

fn fls(x: u32) -> u32 {
    32 - x.leading_zeros()
}

/// `get_order(size)` for this page size.
pub fn get_order(size: u64, page_size: u32) -> u32 {
    if size <= page_size as u64 {
        return 0;
    }
    let pages = size.div_ceil(page_size as u64);
    64 - (pages - 1).leading_zeros()
}

/// `calculate_alignment`.
pub fn calculate_alignment(flags: u32, align: u32, size: u32, word: u32) -> u32 {
    let mut align = align;
    if flags & SLAB_HWCACHE_ALIGN != 0 {
        let mut ralign = CACHE_LINE_SIZE;
        while size <= ralign / 2 {
            ralign /= 2;
        }
        align = align.max(ralign);
    }
    align = align.max(ARCH_SLAB_MINALIGN);
    align_up(align, word)
}

/// `calc_slab_order`: the first order in [min, max] wasting at most 1/fract.
fn calc_slab_order(size: u32, min_order: u32, max_order: u32, fract: u32, page: u32) -> u32 {
    let mut order = min_order;
    while order <= max_order {
        let slab = (page as u64) << order;
        if slab % size as u64 <= slab / fract as u64 {
            break;
        }
        order += 1;
    }
    order
}

/// `calculate_order` (6.8+).
pub fn calculate_order(size: u32, t: &SlubTunables) -> Option<u32> {
    let page = t.page_size;
    let order_objects = |o: u32| ((page as u64) << o) / size as u64;
    let min_objects = if t.min_objects != 0 { t.min_objects } else { 4 * (fls(t.nr_cpus) + 1) };
    let max_objects = order_objects(t.max_order).max(1) as u32;
    let min_objects = min_objects.min(max_objects);
    let min_order = t.min_order.max(get_order(min_objects as u64 * size as u64, page));
    if order_objects(min_order) > MAX_OBJS_PER_PAGE as u64 {
        return Some(get_order(size as u64 * MAX_OBJS_PER_PAGE as u64, page) - 1);
    }
    let mut fraction = 16;
    while fraction > 1 {
        let order = calc_slab_order(size, min_order, t.max_order, fraction, page);
        if order <= t.max_order {
            return Some(order);
        }
        fraction /= 2;
    }
    let order = get_order(size as u64, page);
    (order <= crate::arch::MAX_PAGE_ORDER).then_some(order)
}

/// `optimal_redzone` (mm/kasan/generic.c): the adaptive redzone of
/// userspace ASan, larger for larger objects.
pub fn kasan_optimal_redzone(object_size: u32) -> u32 {
    match object_size {
        s if s <= 64 - 16 => 16,
        s if s <= 128 - 32 => 32,
        s if s <= 512 - 64 => 64,
        s if s <= 4096 - 128 => 128,
        s if s <= (1 << 14) - 256 => 256,
        s if s <= (1 << 15) - 512 => 512,
        s if s <= (1 << 16) - 1024 => 1024,
        _ => 2048,
    }
}

/// `kasan_cache_create` (mm/kasan/generic.c): the slot grows by the
/// alloc metadata, by the free metadata where it cannot live inside the
/// object (ctor, SLAB_TYPESAFE_BY_RCU, or objects under 16 bytes), and to
/// at least `object_size + optimal_redzone(object_size)`. kmm keeps the
/// metadata beside memory (`kasan.rs`), but the slot is laid out as the
/// kernel lays it out. `debug`: `__slub_debug_enabled()`.
/// SIMPLIFICATION: `__slub_debug_enabled()` is taken as "this cache has
/// debug flags" (the kernel's static key is on once any cache has them).
pub fn kasan_cache_create(object_size: u32, size: u32, flags: u32, has_ctor: bool, debug: bool) -> u32 {
    // KMALLOC_MAX_SIZE (kmalloc.rs; not imported: geometry sits below it).
    let max: u32 = 4 << 20;
    let mut size = size;
    let ok_size = size;
    size += KASAN_ALLOC_META_SIZE;
    if size > max {
        size = ok_size;
    }
    let ok_size = size;
    if flags & SLAB_TYPESAFE_BY_RCU != 0 || has_ctor {
        size += KASAN_FREE_META_SIZE;
    } else if KASAN_FREE_META_SIZE <= object_size {
        // free meta inside the object (offset 0)
    } else if !debug {
        size += KASAN_FREE_META_SIZE - object_size;
    } else {
        size += KASAN_FREE_META_SIZE;
    }
    if size > max {
        size = ok_size;
    }
    let optimal = (object_size + kasan_optimal_redzone(object_size)).min(max);
    size.max(optimal)
}

/// `calculate_sizes` + `kmem_cache_open`'s partial sizing. `align` is the
/// requested alignment (already through `calculate_alignment`).
pub fn calculate_sizes(
    object_size: u32,
    align: u32,
    flags: u32,
    has_ctor: bool,
    freeptr_offset: Option<u32>,
    t: &SlubTunables,
) -> Result<Geometry> {
    let w = t.word;
    let mut flags = flags;
    let mut size = align_up(object_size, w);
    if flags & SLAB_POISON != 0 && flags & SLAB_TYPESAFE_BY_RCU == 0 && !has_ctor {
        flags |= SLAB_OBJECT_POISON;
    } else {
        flags &= !SLAB_OBJECT_POISON;
    }
    if flags & SLAB_RED_ZONE != 0 && size == object_size {
        size += w;
    }
    let inuse = size;
    let kmalloc_store_user = flags & SLAB_KMALLOC != 0 && flags & SLAB_STORE_USER != 0;
    let rcu_no_offset = flags & SLAB_TYPESAFE_BY_RCU != 0 && freeptr_offset.is_none();
    let offset;
    if rcu_no_offset
        || flags & SLAB_POISON != 0
        || has_ctor
        || (flags & SLAB_RED_ZONE != 0 && (object_size < w || kmalloc_store_user))
    {
        offset = size;
        size += w;
    } else if let (true, Some(off)) = (flags & SLAB_TYPESAFE_BY_RCU != 0, freeptr_offset) {
        offset = off;
    } else {
        offset = (object_size / 2) / w * w;
    }
    if flags & SLAB_STORE_USER != 0 {
        size += 2 * TRACK_SIZE;
        if flags & SLAB_KMALLOC != 0 {
            size += 4;
        }
    }
    if t.kasan {
        // kasan_cache_create: metadata and a redzone, and no merging.
        size = kasan_cache_create(object_size, size, flags, has_ctor, flags & SLAB_DEBUG_FLAGS != 0);
        flags |= SLAB_KASAN | SLAB_NO_MERGE;
    }
    let mut red_left_pad = 0;
    if flags & SLAB_RED_ZONE != 0 {
        size += w;
        red_left_pad = align_up(w, align);
        size += red_left_pad;
    }
    let size = align_up(size, align);
    let Some(order) = calculate_order(size, t) else {
        return invalid(format!("object size {object_size} too large for a slab"));
    };
    let objects = (((t.page_size as u64) << order) / size as u64) as u32;
    let min_order = get_order(size as u64, t.page_size);
    let min_objects = (((t.page_size as u64) << min_order) / size as u64) as u32;
    if objects == 0 {
        return invalid(format!("object size {object_size} too large for a slab"));
    }
    let ilog2 = 31 - size.leading_zeros();
    let min_partial = (ilog2 / 2).clamp(MIN_PARTIAL, MAX_PARTIAL);
    let debug = flags & SLAB_DEBUG_FLAGS != 0;
    let cpu_partial: u32 = if debug {
        0
    } else if size >= t.page_size {
        6
    } else if size >= 1024 {
        24
    } else if size >= 256 {
        52
    } else {
        120
    };
    let cpu_partial_slabs = (cpu_partial * 2).div_ceil(objects);
    Ok(Geometry {
        object_size,
        size,
        align,
        offset,
        inuse,
        red_left_pad,
        order,
        objects,
        min_order,
        min_objects,
        min_partial,
        cpu_partial,
        cpu_partial_slabs,
        flags,
        recip: u64::MAX / size as u64 + 1,
    })
}

/// The geometry of a cache created with slab order `order` (the
/// objects per slab `oo_make(order, size)` gives, and the CPU partial slabs
/// that follow from them), as a recorded kernel's slabinfo shows a cache
/// whose order differs from SLUB's pick (e.g. one written through
/// /sys/kernel/slab/<cache>/order). None when no object
/// fits a slab of that order or the order is above the page allocator's
/// costly order (SLUB's `slub_max_order` bound).
pub fn with_order(mut g: Geometry, order: u32, page_size: u32) -> Option<Geometry> {
    if order > crate::arch::PAGE_ALLOC_COSTLY_ORDER {
        return None;
    }
    let objects = (((page_size as u64) << order) / g.size as u64) as u32;
    if objects == 0 {
        return None;
    }
    g.order = order;
    g.objects = objects;
    g.cpu_partial_slabs = (g.cpu_partial * 2).div_ceil(objects);
    Some(g)
}

/// Alignment `create_boot_cache` gives a kmalloc cache of `size`: at least
/// the largest power of two dividing it.
pub fn kmalloc_align(size: u32) -> u32 {
    ARCH_SLAB_MINALIGN.max(1 << size.trailing_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(cpus: u32) -> SlubTunables {
        SlubTunables { min_order: 0, max_order: 3, min_objects: 0, nr_cpus: cpus, page_size: 4096, word: 8, kasan: false }
    }

    #[test]
    fn kmalloc_table_matches_kernel_facts() {
        // KERNEL_FACTS 6.6: (size, 1 CPU, 4 CPUs, 8 CPUs, 16 CPUs) as (order, objects).
        let rows: &[(u32, [(u32, u32); 4])] = &[
            (8, [(0, 512), (0, 512), (0, 512), (0, 512)]),
            (192, [(0, 21), (0, 21), (0, 21), (1, 42)]),
            (256, [(0, 16), (0, 16), (1, 32), (1, 32)]),
            (512, [(0, 8), (1, 16), (2, 32), (2, 32)]),
            (1024, [(1, 8), (2, 16), (3, 32), (3, 32)]),
            (2048, [(2, 8), (3, 16), (3, 16), (3, 16)]),
            (4096, [(3, 8), (3, 8), (3, 8), (3, 8)]),
            (8192, [(3, 4), (3, 4), (3, 4), (3, 4)]),
        ];
        for &(size, exp) in rows {
            for (i, cpus) in [1u32, 4, 8, 16].into_iter().enumerate() {
                let g = calculate_sizes(size, kmalloc_align(size), SLAB_KMALLOC, false, None, &t(cpus)).unwrap();
                assert_eq!((g.order, g.objects), exp[i], "size {size} cpus {cpus}");
            }
        }
    }

    #[test]
    fn reciprocal_index_is_exact() {
        for size in [8u32, 24, 96, 104, 192, 696, 1280, 2368, 4232, 8192] {
            let g = calculate_sizes(size, 8, 0, false, None, &t(2)).unwrap();
            let span = (4096u64 << g.order) + 2 * g.size as u64;
            for off in 0..span {
                let want = (off % g.size as u64 == 0).then_some(off / g.size as u64);
                assert_eq!(g.index_of(off), want, "size {} off {off}", g.size);
            }
        }
    }

    #[test]
    fn alignment_rules() {
        assert_eq!(calculate_alignment(SLAB_HWCACHE_ALIGN, 0, 20, 8), 32);
        assert_eq!(calculate_alignment(SLAB_HWCACHE_ALIGN, 0, 40, 8), 64);
        assert_eq!(calculate_alignment(SLAB_HWCACHE_ALIGN, 0, 10, 8), 16);
        assert_eq!(calculate_alignment(0, 0, 10, 8), 8);
        assert_eq!(calculate_alignment(0, 12, 100, 8), 16);
        assert_eq!(kmalloc_align(96), 32);
        assert_eq!(kmalloc_align(192), 64);
        assert_eq!(kmalloc_align(1024), 1024);
    }

    #[test]
    fn debug_layout_example() {
        // KERNEL_FACTS 6.5: kmalloc-32 with slub_debug=FZPU, align 32 -> s->size 160.
        let f = SLAB_KMALLOC | SLAB_RED_ZONE | SLAB_POISON | SLAB_STORE_USER | SLAB_CONSISTENCY_CHECKS;
        let g = calculate_sizes(32, 32, f, false, None, &t(2)).unwrap();
        assert_eq!((g.size, g.offset, g.red_left_pad, g.inuse), (160, 40, 32, 40));
        assert_eq!(g.cpu_partial, 0);
    }

    #[test]
    fn kasan_layout() {
        // kasan_cache_create by hand: kmalloc-128 (align 128): 128 + 16
        // alloc meta = 144, free meta inside, optimal 128 + 64 = 192,
        // aligned to 128 -> 256.
        let k = SlubTunables { kasan: true, ..t(2) };
        let g = calculate_sizes(128, 128, SLAB_KMALLOC, false, None, &k).unwrap();
        assert_eq!(g.size, 256);
        assert_ne!(g.flags & SLAB_KASAN, 0);
        assert_ne!(g.flags & SLAB_NO_MERGE, 0);
        // kmalloc-8: 8 + 16 = 24, free meta does not fit: + (16 - 8) = 32.
        assert_eq!(calculate_sizes(8, 8, SLAB_KMALLOC, false, None, &k).unwrap().size, 32);
        // A 200-byte cache: 200 + 16 = 216 < 200 + 64 = 264.
        assert_eq!(calculate_sizes(200, 8, 0, false, None, &k).unwrap().size, 264);
        // With a ctor the free meta goes after the alloc meta: 200+16+16 = 232 < 264.
        assert_eq!(calculate_sizes(200, 8, 0, true, None, &k).unwrap().size, 264);
        // 3968 bytes: optimal redzone 128 -> 4096; 4000: 256 -> 4256.
        assert_eq!(calculate_sizes(3968, 8, 0, false, None, &k).unwrap().size, 4096);
        assert_eq!(calculate_sizes(4000, 8, 0, false, None, &k).unwrap().size, 4256);
        assert_eq!(kasan_optimal_redzone(48), 16);
        assert_eq!(kasan_optimal_redzone(49), 32);
        assert_eq!(kasan_optimal_redzone(65536), 2048);
    }
}
