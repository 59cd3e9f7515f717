//! todo
pub struct PgStore;
