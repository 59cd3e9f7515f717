//! tsunagi-fhir: the FHIR R4 core every other crate stands on.
//!
//! - [`model`]: the R4 resource types, choice elements, Patient compartment and
//!   search parameters, from a table generated from the HL7 R4 definitions.
//! - [`outcome`]: [`FhirError`] and OperationOutcome.
//! - [`search`] / [`query`]: the typed search model and the parser from URL parameters.
//! - [`index`]: extraction of index values from a resource for its search parameters.
//! - [`datetime`]: FHIR date/dateTime/instant parsing into ranges.
//! - [`bundle`]: Bundle construction helpers.
//! - [`extension`]: finding extensions by URL.

pub mod bundle;
pub mod datetime;
pub mod extension;
pub mod index;
pub mod model;
pub mod outcome;
pub mod query;
pub mod search;

pub use outcome::{FhirError, FhirResult, Issue, Severity, operation_outcome};

/// Media type of FHIR JSON.
pub const FHIR_JSON: &str = "application/fhir+json";
