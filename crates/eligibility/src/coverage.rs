//! (to be written)

use axum::Router;
use tsunagi_server::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
}
