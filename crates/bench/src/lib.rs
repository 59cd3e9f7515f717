//! tsunagi-bench: synthetic data and the platform-core benchmark.
//!
//! - [`synth`]: deterministic synthetic patients (Japanese names with kana,
//!   JLAC10 lab results over five years, ...), about 20 resources per patient.
//! - the `tsunagi-bench` binary: `gen` writes NDJSON or transaction Bundles;
//!   `platform` spawns the real `tsunagi serve` and measures it (see docs/BENCHMARKS.md).

pub mod synth;
