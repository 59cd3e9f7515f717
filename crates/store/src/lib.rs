//! tsunagi-store: versioned FHIR storage behind one interface ([`Store`]) with two
//! backends, [`sqlite::SqliteStore`] (embedded default) and [`postgres::PgStore`].

pub mod api;

pub use api::*;
