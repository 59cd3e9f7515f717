//! The rule PMH adds to the one policy ([`PmhRule`]):
//!
//! | who | may | when |
//! |---|---|---|
//! | municipality staff (at a municipality) | create; read, update, delete what their municipality wrote, among `Coverage` (recipients), `ImmunizationRecommendation` (vouchers), `RelatedPerson` (guardians of children) and `Questionnaire` (予診票 forms) | purpose operations |
//! | patient | create their own `QuestionnaireResponse` (the pre-vaccination questionnaire) | purpose patient-self |
//! | care-facility staff | read a patient's vouchers and questionnaire answers | purpose treatment, a live reception grant at the facility (the card is the voucher) |
//! | care-facility staff | create `ChargeItem` (copayment reports for ceiling management) | purpose treatment |
//!
//! Municipalities never get clinical data through this rule: it grants nothing
//! for any other type. What a municipality sees of vaccinations, certificates and
//! statistics is answered by PMH's own endpoints after their explicit checks.

use std::sync::Arc;

use tsunagi_eligibility::consent::GrantKind;
use tsunagi_policy::identity::{OrgKind, Principal, Purpose, Role};
use tsunagi_policy::policy::{AccessRequest, Operation, ScopeGrant, Verdict};
use tsunagi_store::ScopeRule;

use crate::Shared;

/// Personal types a municipality writes and reads (its own records only).
pub const MUNICIPAL_PERSONAL_TYPES: &[&str] =
    &["Coverage", "ImmunizationRecommendation", "RelatedPerson"];
/// Types facilities read at reception under a live grant.
pub const RECEPTION_TYPES: &[&str] = &["ImmunizationRecommendation", "QuestionnaireResponse"];

pub struct PmhRule(pub Arc<Shared>);

fn is_municipality(p: &Principal) -> bool {
    p.role == Role::MunicipalityStaff && p.org_kind == OrgKind::Municipality
}

fn is_facility_staff(p: &Principal) -> bool {
    p.org_kind.is_care_facility() && (p.role.is_clinical() || p.role == Role::Clerk)
}

impl PmhRule {
    /// Whether the facility holds a live reception grant for the patient.
    pub fn has_reception(&self, org: &str, patient: &str) -> bool {
        let Some(e) = &self.0.eligibility else {
            return false;
        };
        !e.consent
            .live(org, patient, GrantKind::Reception, self.0.now())
            .is_empty()
    }
}

/// Whether a facility holds a live reception grant for a patient (handlers).
pub fn has_reception(shared: &Shared, org: &str, patient: &str) -> bool {
    shared.eligibility.as_ref().is_some_and(|e| {
        !e.consent
            .live(org, patient, GrantKind::Reception, shared.now())
            .is_empty()
    })
}

impl tsunagi_policy::AccessRule for PmhRule {
    fn name(&self) -> &'static str {
        "pmh"
    }

    fn decide(&self, p: &Principal, req: &AccessRequest) -> Verdict {
        let rt = req.resource_type.as_str();
        let op = req.operation;
        if is_municipality(p) && req.purpose == Purpose::Operations {
            let municipal = MUNICIPAL_PERSONAL_TYPES.contains(&rt) || rt == "Questionnaire";
            if !municipal {
                return Verdict::NotApplicable(None);
            }
            let own = req.author_org.as_deref() == Some(p.org.as_str());
            return match op {
                Operation::Create => Verdict::Permit(format!("municipality registers {rt}")),
                Operation::Update | Operation::Delete if req.author_org.is_none() || own => {
                    Verdict::Permit(format!("municipality maintains its own {rt}"))
                }
                Operation::Read | Operation::Vread | Operation::History if own => {
                    Verdict::Permit(format!("municipality reads its own {rt}"))
                }
                _ => Verdict::NotApplicable(Some(format!(
                    "a municipality may access only the {rt} it registered"
                ))),
            };
        }
        if p.role == Role::Patient
            && rt == "QuestionnaireResponse"
            && op == Operation::Create
            && req.patient.is_some()
            && req.patient == p.patient
        {
            return Verdict::Permit("patient answers own pre-vaccination questionnaire".into());
        }
        if is_facility_staff(p) && req.purpose == Purpose::Treatment {
            if rt == "ChargeItem" && op == Operation::Create {
                return Verdict::Permit(
                    "facility reports a copayment for ceiling management".into(),
                );
            }
            if RECEPTION_TYPES.contains(&rt)
                && matches!(op, Operation::Read | Operation::Vread)
                && let Some(patient) = req.patient.as_deref()
                && self.has_reception(&p.org, patient)
            {
                return Verdict::Permit(format!(
                    "{rt} read at reception (the card is the voucher)"
                ));
            }
        }
        Verdict::NotApplicable(None)
    }

    fn search_scope(&self, p: &Principal, rt: &str, purpose: Purpose) -> ScopeGrant {
        if is_municipality(p)
            && purpose == Purpose::Operations
            && MUNICIPAL_PERSONAL_TYPES.contains(&rt)
        {
            return ScopeGrant::Rules(vec![ScopeRule::AuthoredBy {
                org: p.org.clone(),
                types: Some(
                    MUNICIPAL_PERSONAL_TYPES
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                ),
            }]);
        }
        if is_facility_staff(p)
            && purpose == Purpose::Treatment
            && RECEPTION_TYPES.contains(&rt)
            && let Some(e) = &self.0.eligibility
        {
            let rules: Vec<ScopeRule> = e
                .consent
                .live_for_org(&p.org, GrantKind::Reception, self.0.now())
                .into_iter()
                .map(|(patient, _)| ScopeRule::Patient {
                    id: patient,
                    types: Some(RECEPTION_TYPES.iter().map(|s| s.to_string()).collect()),
                })
                .collect();
            if !rules.is_empty() {
                return ScopeGrant::Rules(rules);
            }
        }
        ScopeGrant::None(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsunagi_policy::AccessRule;
    use tsunagi_policy::policy::Policy;

    fn shared() -> Arc<Shared> {
        let dir = tempfile::tempdir().unwrap();
        let store = tsunagi_store::sqlite::SqliteStore::open(&dir.path().join("t.db")).unwrap();
        // the rules under test never write; the directory outlives the test process
        std::mem::forget(dir);
        Arc::new(Shared::offline(Arc::new(store)))
    }

    fn principal(org: &str, kind: OrgKind, role: Role, patient: Option<&str>) -> Principal {
        Principal {
            org: org.into(),
            org_kind: kind,
            org_flags: vec![],
            role,
            user: Some("u".into()),
            patient: patient.map(str::to_string),
            second_factor: false,
            token_id: "t".into(),
        }
    }

    #[test]
    fn municipality_sees_only_own_registrations_and_no_clinical_data() {
        let policy = Policy::new().with_rule(Arc::new(PmhRule(shared())));
        let m = principal(
            "131016",
            OrgKind::Municipality,
            Role::MunicipalityStaff,
            None,
        );
        let req = |op, rt: &str, author: Option<&str>| {
            let mut r = AccessRequest::new(op, rt, Purpose::Operations).patient("p1");
            r.author_org = author.map(str::to_string);
            r
        };
        assert!(
            policy
                .decide(&m, &req(Operation::Create, "Coverage", None))
                .is_permit()
        );
        assert!(
            policy
                .decide(&m, &req(Operation::Read, "Coverage", Some("131016")))
                .is_permit()
        );
        assert!(
            !policy
                .decide(&m, &req(Operation::Read, "Coverage", Some("131024")))
                .is_permit()
        );
        assert!(
            !policy
                .decide(&m, &req(Operation::Update, "Coverage", Some("06130017")))
                .is_permit()
        );
        for clinical in [
            "Observation",
            "Condition",
            "Immunization",
            "MedicationRequest",
        ] {
            assert!(
                !policy
                    .decide(&m, &req(Operation::Read, clinical, Some("1310123458")))
                    .is_permit(),
                "{clinical}"
            );
            assert!(
                policy
                    .search_scope(&m, clinical, Purpose::Operations)
                    .is_err()
            );
        }
        let scope = PmhRule(shared()).search_scope(&m, "Coverage", Purpose::Operations);
        assert!(
            matches!(scope, ScopeGrant::Rules(r) if matches!(&r[0], ScopeRule::AuthoredBy { org, .. } if org == "131016"))
        );
    }

    #[test]
    fn patient_answers_only_own_questionnaire() {
        let rule = PmhRule(shared());
        let me = principal("patient", OrgKind::Patient, Role::Patient, Some("p1"));
        let r = AccessRequest::new(
            Operation::Create,
            "QuestionnaireResponse",
            Purpose::PatientSelf,
        );
        assert!(matches!(
            rule.decide(&me, &r.clone().patient("p1")),
            Verdict::Permit(_)
        ));
        assert!(matches!(
            rule.decide(&me, &r.patient("p2")),
            Verdict::NotApplicable(_)
        ));
    }
}
