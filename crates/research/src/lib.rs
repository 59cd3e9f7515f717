//! Secondary use (二次利用), the research side: a separate process
//! (`tsunagi-research serve`) with its own data directory, accounts and audit
//! trail, and no access to the primary database or the linkage key.
//!
//! - [`service`]: catalogue, applications and review, public register, queries,
//!   output checking (HTTP);
//! - [`workspace`]: the Visiting analysis environment (DataFusion over the
//!   project's Parquet extract, aggregate-only);
//! - [`sdc`]: statistical disclosure control of outputs;
//! - [`anon`] and [`anonymise`]: anonymisation transforms and k-anonymity;
//! - [`audit`]: the hash-chained research audit trail.

pub mod accounts;
pub mod anon;
pub mod anonymise;
pub mod audit;
pub mod config;
pub mod sdc;
pub mod service;
pub mod workspace;

pub use service::{Research, router};
