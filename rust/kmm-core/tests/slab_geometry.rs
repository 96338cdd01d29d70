//! Cache geometry against the real kernel: every cache in
//! tests/data/linux/sys_kernel_slab.tsv (Linux 6.18, x86_64, 2 CPUs).

use kmm_core::slab::geometry::*;

/// Caches that 6.18 creates with SLAB_TYPESAFE_BY_RCU and an explicit
/// `freeptr_offset` (a free pointer kept inside the object): mm/vma_init.c
/// (`vm_area_struct.vm_freeptr`) and fs/file_table.c (`file.f_freeptr`).
const FREEPTR_OFFSET: &[(&str, u32)] = &[("vm_area_struct", 0), ("filp", 0)];

fn data(name: &str) -> String {
    let p = format!("{}/../../tests/data/linux/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn tsv() -> String {
    data("sys_kernel_slab.tsv")
}

const T: SlubTunables =
    SlubTunables { min_order: 0, max_order: 3, min_objects: 0, nr_cpus: 2, page_size: 4096, word: 8, kasan: false };

/// Geometry of the cache described by one tsv row, computed by the model.
fn model(header: &[&str], f: &[&str]) -> Geometry {
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let num = |name: &str| f[col(name)].parse::<u32>().unwrap();
    let name = f[col("name")];
    let mut flags = 0;
    for (c, bit) in [
        ("hwcache_align", SLAB_HWCACHE_ALIGN),
        ("reclaim_account", SLAB_RECLAIM_ACCOUNT),
        ("red_zone", SLAB_RED_ZONE),
        ("poison", SLAB_POISON),
        ("store_user", SLAB_STORE_USER),
        ("destroy_by_rcu", SLAB_TYPESAFE_BY_RCU),
        ("cache_dma", SLAB_CACHE_DMA),
    ] {
        if num(c) == 1 {
            flags |= bit;
        }
    }
    if name.contains("kmalloc-") {
        flags |= SLAB_KMALLOC;
    }
    let has_ctor = !f[col("ctor")].is_empty();
    let object_size = num("object_size");
    // The tsv's align is the kernel's result; fed back as the request it is a
    // fixed point of calculate_alignment.
    let align = calculate_alignment(flags, num("align"), object_size, 8);
    let freeptr = FREEPTR_OFFSET.iter().find(|(n, _)| *n == name).map(|&(_, o)| o);
    calculate_sizes(object_size, align, flags, has_ctor, freeptr, &T).unwrap()
}

#[test]
fn every_line_of_slabinfo_matches() {
    let text = tsv();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split('\t').collect()).collect();
    let slabinfo = data("slabinfo.txt");
    let mut n = 0;
    for line in slabinfo.lines().skip(2) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let row = rows.iter().find(|r| r[0] == f[0]).expect("cache in the tsv");
        let g = model(&header, row);
        // <objsize> <objperslab> <pagesperslab>
        let want: (u32, u32, u32) = (f[3].parse().unwrap(), f[4].parse().unwrap(), f[5].parse().unwrap());
        assert_eq!((g.size, g.objects, 1 << g.order), want, "{line}");
        n += 1;
    }
    assert_eq!(n, 235);
}

#[test]
fn every_cache_in_sys_kernel_slab_matches() {
    let text = tsv();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let mut checked = 0;
    let mut bad = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        let num = |name: &str| f[col(name)].parse::<u32>().unwrap();
        let name = f[col("name")];
        let g = model(&header, &f);
        let want = (num("object_size"), num("slab_size"), num("objs_per_slab"), num("order"), num("align"));
        let got = (g.object_size, g.size, g.objects, g.order, g.align);
        let want_p = (num("min_partial"), num("cpu_partial"));
        let got_p = (g.min_partial, g.cpu_partial);
        if got != want || got_p != want_p {
            bad.push(format!("{name}: want {want:?} {want_p:?} got {got:?} {got_p:?}"));
        }
        checked += 1;
    }
    assert!(checked > 300, "{checked}");
    assert!(bad.is_empty(), "{} of {checked} caches differ:\n{}", bad.len(), bad.join("\n"));
}
