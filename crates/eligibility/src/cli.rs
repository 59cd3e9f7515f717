//! CLI entry points the `tsunagi` binary wires in.

pub use crate::bulk::cli::{CoverageArgs, run_coverage};
pub use crate::cards::{CardArgs, run_card};
