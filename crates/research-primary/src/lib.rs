//! Secondary use (二次利用), the primary side.
//!
//! Everything here runs next to the primary stores and is kept small on purpose:
//! - [`optout`]: the patient's self-service research opt-out (a `Consent` in their
//!   compartment, written with its audit record), and the snapshot an extraction applies;
//! - [`extract`]: the one-way extraction that reads the primary store read-only and
//!   writes pseudonymised Parquet files into a separate research data directory;
//! - [`linkage`]: the linkage service, the only holder of the pseudonym key.
//!
//! The research side (`tsunagi-research`, with DataFusion) only ever sees the files
//! written by [`extract`]; it has no store handle and never reads the key file.

pub mod cli;
pub mod extract;
pub mod linkage;
pub mod optout;
pub mod schema;

pub use extract::{ExtractConfig, ExtractReport, Extractor};
pub use linkage::LinkageKey;
pub use optout::{OptOutService, OptOutSnapshot};
