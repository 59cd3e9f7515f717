//! (to be written)

/// Live consent grants.
#[derive(Default)]
pub struct Grants {}

pub struct ConsentRule(pub std::sync::Arc<crate::Shared>);

impl tsunagi_policy::AccessRule for ConsentRule {
    fn name(&self) -> &'static str {
        "consent"
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
