//! tsunagi-store: versioned FHIR storage behind one interface ([`Store`]) with two
//! backends, [`sqlite::SqliteStore`] (embedded default) and [`postgres::PgStore`].
//!
//! Search semantics are defined once, in the shared SQL builder (`sql`) and the
//! backend-independent engine (`engine`); the backends only execute statements.
//! [`conformance`] is the test suite both backends must pass.

pub mod api;
pub mod audit;
pub mod conformance;
mod engine;
pub mod postgres;
pub mod schema;
pub mod sql;
pub mod sqlite;

pub use api::*;
pub use engine::{PreparedResource, format_instant};

pub use sqlite::SqliteStore;
