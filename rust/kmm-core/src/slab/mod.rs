//! The slab layer (SLUB): cache geometry, slabs, per-CPU freelists and node
//! partial lists.
#![forbid(unsafe_code)]

pub mod geometry;
