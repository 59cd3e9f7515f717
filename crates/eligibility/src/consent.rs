//! Consent grants (同意) given at the card reader, and the consent access rule.
//!
//! A grant says: this patient lets this facility see these categories of their
//! data until this time. It is kept as a FHIR `Consent` (written by the service,
//! audited) and mirrored in an in-memory index [`Grants`] that the access rules
//! read on every decision; the index is loaded from the store when the service
//! opens and updated after every commit.
//!
//! Categories follow the reader's consent screen ([`Category`]); which resource
//! types each one opens is [`Category::types`]. Patient and Coverage (eligibility)
//! are visible with any live grant, whatever categories were chosen.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tsunagi_fhir::{FhirResult, query};
use tsunagi_policy::identity::{Principal, Purpose, Role};
use tsunagi_policy::policy::{AccessRequest, Operation, ScopeGrant, Verdict};
use tsunagi_server::orgs::MEDICAL_INSTITUTION_SYSTEM;
use tsunagi_store::{LabelFilter, Scope, ScopeRule, Store};

use crate::Shared;

/// Code system of the consent categories (`Consent.provision.code`): `A`, `B`, `C`.
pub const CATEGORY_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/consent-category";
/// Code system of the grant kind (`Consent.category`): `reception` (card reader) or
/// `disaster` (災害時モード lookup).
pub const GRANT_KIND_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/consent-grant-kind";
/// Code system of the care setting (`Consent.category`): `outpatient`, `inpatient`.
pub const SETTING_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/care-setting";

/// Security-label code (in [`CATEGORY_SYSTEM`], `meta.security`) of documents no
/// consent category opens: referral letters and discharge summaries, read only
/// by their addressee (and their author).
pub const ADDRESSEE_ONLY: &str = "addressee";

/// Category labels (`meta.security` codings of [`CATEGORY_SYSTEM`]) of a target.
fn category_labels(labels: &[(String, String)]) -> Vec<&str> {
    labels
        .iter()
        .filter(|(s, _)| s == CATEGORY_SYSTEM)
        .map(|(_, c)| c.as_str())
        .collect()
}

/// Whether a reader with these grant categories may read a resource of type
/// `rt` with these labels. A resource the sharing service labelled with its
/// category (an infection Observation is `A`, a lab one `B`) is judged by its
/// label; an unlabelled one by its type ([`readable_types`]).
pub fn categories_admit(
    qualified: bool,
    categories: &[Category],
    hide_clinical: bool,
    rt: &str,
    labels: &[(String, String)],
) -> bool {
    let mine = category_labels(labels);
    if mine.is_empty() {
        return readable_types(qualified, categories, hide_clinical)
            .iter()
            .any(|t| t == rt);
    }
    qualified
        && (!hide_clinical || MEDICATION_TYPES.contains(&rt))
        && mine
            .iter()
            .any(|c| categories.iter().any(|k| k.as_str() == *c))
}

/// Scope rules for one patient under grants with these categories, the SQL
/// twin of [`categories_admit`]: unlabelled resources of the readable types, and
/// resources labelled with a granted category.
pub fn category_scope(
    patient: &str,
    qualified: bool,
    categories: &[Category],
    hide_clinical: bool,
) -> Vec<ScopeRule> {
    let types = readable_types(qualified, categories, hide_clinical);
    let mut rules = vec![ScopeRule::Labeled {
        rule: Box::new(ScopeRule::Patient {
            id: patient.to_string(),
            types: Some(types),
        }),
        filter: LabelFilter {
            system: CATEGORY_SYSTEM.to_string(),
            allow: Some(Vec::new()),
            deny: Vec::new(),
            unlabelled: true,
        },
    }];
    if qualified && !categories.is_empty() {
        rules.push(ScopeRule::Labeled {
            rule: Box::new(ScopeRule::Patient {
                id: patient.to_string(),
                types: hide_clinical
                    .then(|| MEDICATION_TYPES.iter().map(|t| t.to_string()).collect()),
            }),
            filter: LabelFilter {
                system: CATEGORY_SYSTEM.to_string(),
                allow: Some(categories.iter().map(|c| c.as_str().to_string()).collect()),
                deny: Vec::new(),
                unlabelled: false,
            },
        });
    }
    rules
}

/// Whether any rule of [`category_scope`] can admit type `rt`.
pub fn category_scope_covers(
    qualified: bool,
    categories: &[Category],
    hide_clinical: bool,
    rt: &str,
) -> bool {
    readable_types(qualified, categories, hide_clinical)
        .iter()
        .any(|t| t == rt)
        || qualified && !categories.is_empty() && (!hide_clinical || MEDICATION_TYPES.contains(&rt))
}

/// Eligibility data: visible to any staff of a facility holding a live grant.
pub const ELIGIBILITY_TYPES: &[&str] = &["Patient", "Coverage"];
/// Drug-related types: what a facility that hides clinical history still shows.
pub const MEDICATION_TYPES: &[&str] = &[
    "MedicationRequest",
    "MedicationDispense",
    "MedicationStatement",
    "MedicationAdministration",
];

/// A consent category of the card reader's screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// (A) diagnoses, surgery, infections (傷病名・手術・感染症).
    A,
    /// (B) clinical, medication, allergies, lab (診療・薬剤・アレルギー・検査).
    B,
    /// (C) health-checkup results (健診結果).
    C,
}

impl Category {
    pub const ALL: [Category; 3] = [Category::A, Category::B, Category::C];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::A => "A",
            Category::B => "B",
            Category::C => "C",
        }
    }

    pub fn parse(s: &str) -> Option<Category> {
        match s {
            "A" => Some(Category::A),
            "B" => Some(Category::B),
            "C" => Some(Category::C),
            _ => None,
        }
    }

    /// Resource types the category opens. Categories are decided by resource
    /// type: an infection test Observation is B (lab), not A, until the sharing
    /// service tags resources finely; checkup results are C as documents
    /// (Composition, DocumentReference), while DiagnosticReport is B.
    pub fn types(self) -> &'static [&'static str] {
        match self {
            Category::A => &["Condition", "Procedure"],
            Category::B => &[
                "Observation",
                "AllergyIntolerance",
                "MedicationRequest",
                "MedicationDispense",
                "MedicationStatement",
                "MedicationAdministration",
                "Immunization",
                "Encounter",
                "DiagnosticReport",
                "ServiceRequest",
                "Specimen",
                "ImagingStudy",
            ],
            Category::C => &["Composition", "DocumentReference"],
        }
    }

    /// The category a resource type belongs to (None for eligibility and others).
    pub fn of_type(rt: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.types().contains(&rt))
    }
}

/// Why a grant exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantKind {
    /// Consent given at the card reader (purpose treatment).
    Reception,
    /// Recorded by a facility in disaster mode (purpose disaster).
    Disaster,
}

impl GrantKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::Reception => "reception",
            GrantKind::Disaster => "disaster",
        }
    }
}

/// One live consent grant.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// Id of the `Consent` resource.
    pub id: String,
    pub patient: String,
    /// 医療機関等コード of the facility.
    pub org: String,
    pub categories: Vec<Category>,
    pub start: DateTime<Utc>,
    /// Exclusive end: live while `now < end`.
    pub end: DateTime<Utc>,
    pub kind: GrantKind,
    /// `outpatient` or `inpatient` (`disaster` for disaster grants).
    pub setting: String,
}

impl Grant {
    pub fn live_at(&self, now: DateTime<Utc>) -> bool {
        self.start <= now && now < self.end
    }

    /// The Consent resource of the grant.
    pub fn to_resource(&self, status: &str) -> Value {
        let fmt = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let (purpose_system, purpose_code) = match self.kind {
            GrantKind::Reception => (
                "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                "TREAT",
            ),
            GrantKind::Disaster => (
                "https://tsunagi.dev/fhir/CodeSystem/purpose-of-use",
                "disaster",
            ),
        };
        json!({
            "resourceType": "Consent",
            "id": self.id,
            "status": status,
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
            "category": [
                {"coding": [{"system": GRANT_KIND_SYSTEM, "code": self.kind.as_str()}]},
                {"coding": [{"system": SETTING_SYSTEM, "code": self.setting}]}
            ],
            "patient": {"reference": format!("Patient/{}", self.patient)},
            "dateTime": fmt(&self.start),
            "organization": [{"identifier": {"system": MEDICAL_INSTITUTION_SYSTEM, "value": self.org}}],
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
            "provision": {
                "type": "permit",
                "period": {"start": fmt(&self.start), "end": fmt(&self.end)},
                "actor": [{
                    "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]},
                    "reference": {"identifier": {"system": MEDICAL_INSTITUTION_SYSTEM, "value": self.org}}
                }],
                "purpose": [{"system": purpose_system, "code": purpose_code}],
                "code": self.categories.iter().map(|c| json!({"coding": [{"system": CATEGORY_SYSTEM, "code": c.as_str()}]})).collect::<Vec<_>>()
            }
        })
    }

    /// Reads a grant back from a Consent written by [`Grant::to_resource`].
    pub fn from_resource(r: &Value) -> Option<Grant> {
        let codes = |v: &Value, system: &str| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .flat_map(|cc| {
                    cc.get("coding")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                })
                .filter(|c| c.get("system").and_then(Value::as_str) == Some(system))
                .filter_map(|c| c.get("code").and_then(Value::as_str).map(str::to_string))
                .collect()
        };
        let kind = match codes(r.get("category")?, GRANT_KIND_SYSTEM)
            .first()?
            .as_str()
        {
            "reception" => GrantKind::Reception,
            "disaster" => GrantKind::Disaster,
            _ => return None,
        };
        let setting = codes(r.get("category")?, SETTING_SYSTEM)
            .into_iter()
            .next()
            .unwrap_or_default();
        let patient = r
            .pointer("/patient/reference")?
            .as_str()?
            .strip_prefix("Patient/")?
            .to_string();
        let org = r
            .pointer("/organization/0/identifier/value")?
            .as_str()?
            .to_string();
        let t = |p: &str| {
            r.pointer(p)
                .and_then(Value::as_str)
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|t| t.with_timezone(&Utc))
        };
        let categories = codes(
            r.pointer("/provision/code").unwrap_or(&Value::Null),
            CATEGORY_SYSTEM,
        )
        .iter()
        .filter_map(|c| Category::parse(c))
        .collect();
        Some(Grant {
            id: r.get("id")?.as_str()?.to_string(),
            patient,
            org,
            categories,
            start: t("/provision/period/start")?,
            end: t("/provision/period/end")?,
            kind,
            setting,
        })
    }
}

/// Live consent grants: facility → patient → grants.
#[derive(Default)]
pub struct Grants {
    by_org: RwLock<HashMap<String, HashMap<String, Vec<Grant>>>>,
}

impl Grants {
    /// Loads active, unexpired grants from the store.
    pub fn load(&self, store: &dyn Store, now: DateTime<Utc>) -> FhirResult<()> {
        let mut offset = 0;
        loop {
            let mut q = query::parse(
                "Consent",
                &[
                    ("status".into(), "active".into()),
                    ("_count".into(), "1000".into()),
                    ("_sort".into(), "_id".into()),
                ],
            )?;
            q.offset = offset;
            let page = store.search(&q, &Scope::Unrestricted)?;
            let n = page.matches.len();
            for s in &page.matches {
                if let Some(g) = s.resource.as_ref().and_then(Grant::from_resource)
                    && g.end > now
                {
                    self.insert(g);
                }
            }
            if n < 1000 {
                return Ok(());
            }
            offset += n;
        }
    }

    pub fn insert(&self, g: Grant) {
        let mut m = self.by_org.write().unwrap_or_else(|e| e.into_inner());
        let list = m
            .entry(g.org.clone())
            .or_default()
            .entry(g.patient.clone())
            .or_default();
        // drop this pair's grants that ended before the new one starts
        list.retain(|x| x.id != g.id && x.end > g.start);
        list.push(g);
    }

    /// Removes a grant (revoked or superseded); returns it.
    pub fn remove(&self, org: &str, patient: &str, id: &str) -> Option<Grant> {
        let mut m = self.by_org.write().unwrap_or_else(|e| e.into_inner());
        let list = m.get_mut(org)?.get_mut(patient)?;
        let pos = list.iter().position(|g| g.id == id)?;
        Some(list.remove(pos))
    }

    /// Grants of `kind` of (facility, patient) live at `now`.
    pub fn live(
        &self,
        org: &str,
        patient: &str,
        kind: GrantKind,
        now: DateTime<Utc>,
    ) -> Vec<Grant> {
        let m = self.by_org.read().unwrap_or_else(|e| e.into_inner());
        m.get(org)
            .and_then(|p| p.get(patient))
            .map(|l| {
                l.iter()
                    .filter(|g| g.kind == kind && g.live_at(now))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every grant of `kind` of a facility live at `now`, by patient.
    pub fn live_for_org(
        &self,
        org: &str,
        kind: GrantKind,
        now: DateTime<Utc>,
    ) -> Vec<(String, Vec<Category>)> {
        let m = self.by_org.read().unwrap_or_else(|e| e.into_inner());
        let Some(patients) = m.get(org) else {
            return Vec::new();
        };
        let mut out: Vec<(String, Vec<Category>)> = patients
            .iter()
            .filter_map(|(p, l)| {
                let mut cats: Vec<Category> = l
                    .iter()
                    .filter(|g| g.kind == kind && g.live_at(now))
                    .flat_map(|g| g.categories.iter().copied())
                    .collect();
                if !l.iter().any(|g| g.kind == kind && g.live_at(now)) {
                    return None;
                }
                cats.sort();
                cats.dedup();
                Some((p.clone(), cats))
            })
            .collect();
        out.sort();
        out
    }
}

/// The types a member of staff may read under grants with these categories.
/// Qualified staff get eligibility plus the categories' types (only the
/// drug-related ones where the facility hides clinical history); others get
/// eligibility only.
pub fn readable_types(
    qualified: bool,
    categories: &[Category],
    hide_clinical: bool,
) -> Vec<String> {
    let mut types: Vec<String> = ELIGIBILITY_TYPES.iter().map(|t| t.to_string()).collect();
    if qualified {
        for c in categories {
            for t in c.types() {
                if hide_clinical && !MEDICATION_TYPES.contains(t) {
                    continue;
                }
                if !types.iter().any(|x| x == t) {
                    types.push(t.to_string());
                }
            }
        }
    }
    types
}

/// Whether the role reads clinical data under grants (configurable).
pub fn qualified(shared: &Shared, role: Role) -> bool {
    shared.config.qualified_roles.contains(&role)
}

/// Permits reading a consented patient's data at the granted facility:
/// purpose treatment, staff of the care facility named in a live grant; qualified
/// staff ([`crate::Config::qualified_roles`]) read the granted categories, other
/// staff (clerks, nurses) the eligibility data only. Never writes.
pub struct ConsentRule(pub Arc<Shared>);

impl ConsentRule {
    fn types_for(&self, p: &Principal, cats: &[Category]) -> Vec<String> {
        readable_types(
            qualified(&self.0, p.role),
            cats,
            self.0.facility.hides_clinical(&p.org),
        )
    }
}

impl tsunagi_policy::AccessRule for ConsentRule {
    fn name(&self) -> &'static str {
        "consent"
    }

    fn decide(&self, p: &Principal, req: &AccessRequest) -> Verdict {
        if req.purpose != Purpose::Treatment
            || !p.org_kind.is_care_facility()
            || !req.operation.is_read()
            || req.operation == Operation::Search
        {
            return Verdict::NotApplicable(None);
        }
        let Some(patient) = req.patient.as_deref() else {
            return Verdict::NotApplicable(None);
        };
        let now = self.0.now();
        let live = self
            .0
            .consent
            .live(&p.org, patient, GrantKind::Reception, now);
        if live.is_empty() {
            return Verdict::NotApplicable(Some(format!(
                "the patient has given this facility no live consent (card reception) to read {}",
                req.resource_type
            )));
        }
        let mut cats: Vec<Category> = live.iter().flat_map(|g| g.categories.clone()).collect();
        cats.sort();
        cats.dedup();
        let types = self.types_for(p, &cats);
        if categories_admit(
            qualified(&self.0, p.role),
            &cats,
            self.0.facility.hides_clinical(&p.org),
            &req.resource_type,
            &req.labels,
        ) {
            let until = live.iter().map(|g| g.end).max().unwrap_or(now);
            Verdict::Permit(format!(
                "patient consented at reception (categories {}) until {}",
                cats.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(""),
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ))
        } else {
            Verdict::NotApplicable(Some(format!(
                "the patient's consent at this facility does not cover {} for role {} (readable: {})",
                req.resource_type,
                p.role,
                types.join(", ")
            )))
        }
    }

    fn search_scope(&self, p: &Principal, rt: &str, purpose: Purpose) -> ScopeGrant {
        if purpose != Purpose::Treatment || !p.org_kind.is_care_facility() {
            return ScopeGrant::None(None);
        }
        let now = self.0.now();
        let rules: Vec<ScopeRule> = self
            .0
            .consent
            .live_for_org(&p.org, GrantKind::Reception, now)
            .into_iter()
            .filter(|(_, cats)| {
                category_scope_covers(
                    qualified(&self.0, p.role),
                    cats,
                    self.0.facility.hides_clinical(&p.org),
                    rt,
                )
            })
            .flat_map(|(patient, cats)| {
                category_scope(
                    &patient,
                    qualified(&self.0, p.role),
                    &cats,
                    self.0.facility.hides_clinical(&p.org),
                )
            })
            .collect();
        if rules.is_empty() {
            ScopeGrant::None(None)
        } else {
            ScopeGrant::Rules(rules)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_round_trips_through_consent() {
        let g = Grant {
            id: "c1".into(),
            patient: "p1".into(),
            org: "1310123458".into(),
            categories: vec![Category::A, Category::C],
            start: "2026-11-21T00:00:00Z".parse().unwrap(),
            end: "2026-11-22T00:00:00Z".parse().unwrap(),
            kind: GrantKind::Reception,
            setting: "outpatient".into(),
        };
        assert_eq!(Grant::from_resource(&g.to_resource("active")), Some(g));
    }

    #[test]
    fn hidden_clinical_history_leaves_drugs() {
        let t = readable_types(true, &[Category::A, Category::B], true);
        assert!(t.contains(&"MedicationRequest".to_string()));
        assert!(!t.contains(&"Condition".to_string()));
        assert!(!t.contains(&"Observation".to_string()));
        assert_eq!(
            readable_types(false, &Category::ALL, false),
            ["Patient", "Coverage"]
        );
    }
}
