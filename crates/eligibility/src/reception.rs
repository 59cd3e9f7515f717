//! (to be written)

use axum::Router;
use tsunagi_server::{AppState, OperationDecl};

pub fn routes() -> Router<AppState> {
    Router::new()
}

#[allow(dead_code)]
pub fn operations() -> Vec<OperationDecl> {
    Vec::new()
}

/// One-time reception nonces.
#[derive(Default)]
pub struct Nonces {}
