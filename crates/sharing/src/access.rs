//! The `sharing` access rule: what the service's labels open beyond consent.
//!
//! | label (`meta.security`) | who | purpose | types |
//! |---|---|---|---|
//! | `addressee|{institution}` | staff of that institution (clinical roles) | treatment | DocumentReference |
//! | `insurer|{insurer number}` | insurer staff of that insurer | insurer | DocumentReference |
//! | `mailbox|{organisation}` | staff of that public health centre | operations | Communication |
//!
//! Reads only (read, vread, instance history, search scope). Consent categories
//! (A/B/C) are the eligibility service's consent rule; patients' own view is the
//! core rule (minus what is labelled withheld).

use tsunagi_policy::identity::{OrgKind, Principal, Purpose, Role};
use tsunagi_policy::policy::{AccessRequest, Operation, ScopeGrant, Verdict};
use tsunagi_store::ScopeRule;

use crate::kinds::{ADDRESSEE_SYSTEM, INSURER_LABEL_SYSTEM, MAILBOX_SYSTEM};

pub struct SharingRule;

/// The label system and resource type a principal may read by, if any.
fn grant(p: &Principal, purpose: Purpose) -> Option<(&'static str, &'static str)> {
    if p.org_kind.is_care_facility() && p.role.is_clinical() && purpose == Purpose::Treatment {
        Some((ADDRESSEE_SYSTEM, "DocumentReference"))
    } else if p.org_kind == OrgKind::Insurer
        && p.role == Role::InsurerStaff
        && purpose == Purpose::Insurer
    {
        Some((INSURER_LABEL_SYSTEM, "DocumentReference"))
    } else if p.org_kind == OrgKind::PublicHealthCentre
        && p.role == Role::MunicipalityStaff
        && purpose == Purpose::Operations
    {
        Some((MAILBOX_SYSTEM, "Communication"))
    } else {
        None
    }
}

impl tsunagi_policy::AccessRule for SharingRule {
    fn name(&self) -> &'static str {
        "sharing"
    }

    fn decide(&self, p: &Principal, req: &AccessRequest) -> Verdict {
        if !req.operation.is_read()
            || matches!(req.operation, Operation::Search | Operation::Everything)
        {
            return Verdict::NotApplicable(None);
        }
        let Some((system, rt)) = grant(p, req.purpose) else {
            return Verdict::NotApplicable(None);
        };
        if req.resource_type == rt && req.has_label(system, &p.org) {
            Verdict::Permit(format!("{rt} is addressed to the caller's organisation"))
        } else {
            Verdict::NotApplicable(None)
        }
    }

    fn search_scope(&self, p: &Principal, rt: &str, purpose: Purpose) -> ScopeGrant {
        match grant(p, purpose) {
            Some((system, t)) if t == rt => ScopeGrant::Rules(vec![ScopeRule::Label {
                system: system.to_string(),
                code: p.org.clone(),
                types: Some(vec![t.to_string()]),
            }]),
            _ => ScopeGrant::None(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsunagi_policy::AccessRule;

    fn principal(org: &str, kind: OrgKind, role: Role) -> Principal {
        Principal::new(org, kind, vec![], role, Some("u".into()), None, true).unwrap()
    }

    #[test]
    fn only_the_labelled_organisation_reads() {
        let to = principal("1310543218", OrgKind::Clinic, Role::Doctor);
        let other = principal("1310999999", OrgKind::Clinic, Role::Doctor);
        let req = AccessRequest::new(Operation::Read, "DocumentReference", Purpose::Treatment)
            .patient("p1")
            .labels(vec![(ADDRESSEE_SYSTEM.into(), "1310543218".into())]);
        assert!(matches!(SharingRule.decide(&to, &req), Verdict::Permit(_)));
        assert!(matches!(
            SharingRule.decide(&other, &req),
            Verdict::NotApplicable(_)
        ));
        let wrong_type = AccessRequest {
            resource_type: "Basic".into(),
            ..req.clone()
        };
        assert!(matches!(
            SharingRule.decide(&to, &wrong_type),
            Verdict::NotApplicable(_)
        ));
        let write = AccessRequest {
            operation: Operation::Update,
            ..req
        };
        assert!(matches!(
            SharingRule.decide(&to, &write),
            Verdict::NotApplicable(_)
        ));
        let insurer = principal("06130017", OrgKind::Insurer, Role::InsurerStaff);
        let checkup = AccessRequest::new(Operation::Read, "DocumentReference", Purpose::Insurer)
            .patient("p1")
            .labels(vec![(INSURER_LABEL_SYSTEM.into(), "06130017".into())]);
        assert!(matches!(
            SharingRule.decide(&insurer, &checkup),
            Verdict::Permit(_)
        ));
        assert!(matches!(
            SharingRule.search_scope(&insurer, "DocumentReference", Purpose::Insurer),
            ScopeGrant::Rules(_)
        ));
        assert!(matches!(
            SharingRule.search_scope(&insurer, "Observation", Purpose::Insurer),
            ScopeGrant::None(_)
        ));
    }
}
