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

/// Disaster declarations.
#[derive(Default)]
pub struct Declarations {}

pub struct DisasterRule(pub std::sync::Arc<crate::Shared>);

impl tsunagi_policy::AccessRule for DisasterRule {
    fn name(&self) -> &'static str {
        "disaster"
    }
    fn decide(
        &self,
        _: &tsunagi_policy::Principal,
        _: &tsunagi_policy::AccessRequest,
    ) -> tsunagi_policy::policy::Verdict {
        tsunagi_policy::policy::Verdict::NotApplicable(None)
    }
    fn search_scope(
        &self,
        _: &tsunagi_policy::Principal,
        _: &str,
        _: tsunagi_policy::Purpose,
    ) -> tsunagi_policy::policy::ScopeGrant {
        tsunagi_policy::policy::ScopeGrant::None(None)
    }
}
