//! /proc renderers (placeholder until written)
#![forbid(unsafe_code)]
