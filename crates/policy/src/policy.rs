//! The single policy module: every request is decided here, deny by default.
//!
//! A [`Policy`] is an ordered list of [`AccessRule`]s, the [`CoreRule`] first.
//! Later features (consent, emergency access, disaster mode) add rules with
//! [`Policy::with_rule`] without touching the core. Combination:
//!
//! 1. any rule that **forbids** wins (hard prohibitions: wrong purpose for the
//!    role, modifying another organisation's record, ...);
//! 2. otherwise the first rule that **permits** decides;
//! 3. otherwise the request is denied with the first reason a rule gave for not
//!    permitting (the core's, normally), or a generic one.
//!
//! Searches work the same way on scopes: every rule may contribute [`ScopeRule`]s
//! (the consent rule adds `ScopeRule::Patient { id, types }` for consented patients);
//! the search runs under their union, and an empty union is a denial.
//!
//! The store applies the scope to `_include`/`_revinclude` rows too; `AuthoredBy`
//! carries the role's type restriction so a clerk's `_revinclude` cannot pull in
//! clinical resources of their organisation.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use tsunagi_fhir::FhirError;
use tsunagi_fhir::model::model;
use tsunagi_store::{LabelFilter, Scope, ScopeRule};

use crate::identity::{OrgKind, Principal, Purpose, Role, role_allowed_for};

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Read,
    Vread,
    Search,
    History,
    Create,
    Update,
    Delete,
    /// `Patient/$everything`.
    Everything,
    AuditQuery,
    Import,
    Admin,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Vread => "vread",
            Operation::Search => "search",
            Operation::History => "history",
            Operation::Create => "create",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Everything => "everything",
            Operation::AuditQuery => "audit-query",
            Operation::Import => "import",
            Operation::Admin => "admin",
        }
    }

    /// Operations that only read.
    pub fn is_read(self) -> bool {
        matches!(
            self,
            Operation::Read
                | Operation::Vread
                | Operation::Search
                | Operation::History
                | Operation::Everything
        )
    }

    /// Create, update and delete.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Operation::Create | Operation::Update | Operation::Delete
        )
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRequest {
    pub operation: Operation,
    /// Resource type targeted (empty for system operations: audit-query, import, admin).
    pub resource_type: String,
    /// Compartment owner of the target (`tsunagi_fhir::index::compartment_patient`
    /// of the current version, or of the new content on create), when known.
    /// For `Patient` resources, the Patient's own id.
    pub patient: Option<String>,
    /// Organisation that wrote the current version (None on create and on
    /// update-as-create of an absent resource).
    pub author_org: Option<String>,
    pub purpose: Purpose,
    /// `(system, code)` of the target's `meta.security` labels (current version),
    /// for rules that decide by the information a resource carries.
    pub labels: Vec<(String, String)>,
}

impl AccessRequest {
    pub fn new(operation: Operation, resource_type: &str, purpose: Purpose) -> Self {
        AccessRequest {
            operation,
            resource_type: resource_type.to_string(),
            patient: None,
            author_org: None,
            purpose,
            labels: Vec::new(),
        }
    }
    pub fn labels(mut self, labels: Vec<(String, String)>) -> Self {
        self.labels = labels;
        self
    }
    /// Whether the target carries the label `system|code`.
    pub fn has_label(&self, system: &str, code: &str) -> bool {
        self.labels.iter().any(|(s, c)| s == system && c == code)
    }
    pub fn patient(mut self, id: impl Into<String>) -> Self {
        self.patient = Some(id.into());
        self
    }
    pub fn author(mut self, org: impl Into<String>) -> Self {
        self.author_org = Some(org.into());
        self
    }
}

/// Code system of the platform's patient-visibility label (`meta.security`).
pub const PATIENT_VISIBILITY_SYSTEM: &str =
    "https://tsunagi.dev/fhir/CodeSystem/patient-visibility";
/// Label code: the resource is never shown to the patient (referral letters,
/// discharge summaries, entries not yet disclosed to the patient).
pub const WITHHELD: &str = "withheld";

/// The patient's own compartment without what is withheld from them.
pub fn patient_own_scope(patient: &str) -> ScopeRule {
    ScopeRule::Labeled {
        rule: Box::new(ScopeRule::Patient {
            id: patient.to_string(),
            types: None,
        }),
        filter: LabelFilter {
            system: PATIENT_VISIBILITY_SYSTEM.to_string(),
            allow: None,
            deny: vec![WITHHELD.to_string()],
            unlabelled: true,
        },
    }
}

/// Whether a resource type holds personal data: `Patient` itself and every type in
/// the Patient compartment.
pub fn is_personal(resource_type: &str) -> bool {
    resource_type == "Patient" || !model().patient_compartment_params(resource_type).is_empty()
}

/// A permitted request.
#[derive(Debug, Clone, PartialEq)]
pub struct Permit {
    pub purpose: Purpose,
    /// Name of the rule that permitted.
    pub rule: &'static str,
    /// Human-readable reason, for the audit trail.
    pub reason: String,
}

/// A denied request. `reason` becomes the 403 OperationOutcome text and the audit
/// record's reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub purpose: Purpose,
    /// Name of the rule that denied ("default" when no rule permitted and none said why).
    pub rule: &'static str,
    pub reason: String,
}

impl Denial {
    pub fn to_error(&self) -> FhirError {
        FhirError::forbidden(self.reason.clone())
    }
}

impl From<Denial> for FhirError {
    fn from(d: Denial) -> FhirError {
        d.to_error()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Permit(Permit),
    Deny(Denial),
}

impl Decision {
    pub fn is_permit(&self) -> bool {
        matches!(self, Decision::Permit(_))
    }
    pub fn purpose(&self) -> Purpose {
        match self {
            Decision::Permit(p) => p.purpose,
            Decision::Deny(d) => d.purpose,
        }
    }
    pub fn reason(&self) -> &str {
        match self {
            Decision::Permit(p) => &p.reason,
            Decision::Deny(d) => &d.reason,
        }
    }
    /// `Ok(permit)` or the 403 error.
    pub fn into_result(self) -> Result<Permit, FhirError> {
        match self {
            Decision::Permit(p) => Ok(p),
            Decision::Deny(d) => Err(d.to_error()),
        }
    }
}

/// One rule's verdict on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allows the request (unless another rule forbids it).
    Permit(String),
    /// Hard prohibition: no other rule can override it.
    Forbid(String),
    /// This rule does not allow it; the reason explains why, in case no rule does.
    NotApplicable(Option<String>),
}

/// One rule's contribution to a search.
#[derive(Debug, Clone, PartialEq)]
pub enum ScopeGrant {
    /// Rows admitted by these scope rules become visible.
    Rules(Vec<ScopeRule>),
    /// Hard prohibition of the search.
    Forbid(String),
    /// Nothing granted; optional reason.
    None(Option<String>),
}

/// A policy rule. Rules are consulted in order; see the module docs for how their
/// verdicts combine.
pub trait AccessRule: Send + Sync {
    /// Short stable name (recorded with decisions).
    fn name(&self) -> &'static str;
    /// Verdict on a single request.
    fn decide(&self, principal: &Principal, request: &AccessRequest) -> Verdict;
    /// Scope rules granted to a search of `resource_type` under `purpose`.
    fn search_scope(
        &self,
        principal: &Principal,
        resource_type: &str,
        purpose: Purpose,
    ) -> ScopeGrant;
}

/// The policy: the core rule followed by extension rules.
#[derive(Clone)]
pub struct Policy {
    rules: Vec<Arc<dyn AccessRule>>,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy {
    /// The core rules only.
    pub fn new() -> Self {
        Policy {
            rules: vec![Arc::new(CoreRule)],
        }
    }

    /// Appends an extension rule (consent, emergency, disaster, ...).
    pub fn with_rule(mut self, rule: Arc<dyn AccessRule>) -> Self {
        self.rules.push(rule);
        self
    }

    /// Decides a request. Deny by default.
    /// A search is permitted exactly when [`Policy::search_scope`] yields a scope.
    pub fn decide(&self, principal: &Principal, request: &AccessRequest) -> Decision {
        let purpose = request.purpose;
        if request.operation == Operation::Search {
            return match self.search_scope(principal, &request.resource_type, purpose) {
                Ok(_) => Decision::Permit(Permit {
                    purpose,
                    rule: "scope",
                    reason: format!(
                        "search of {} runs within the caller's scope",
                        request.resource_type
                    ),
                }),
                Err(d) => Decision::Deny(d),
            };
        }
        let mut permit: Option<Permit> = None;
        let mut hint: Option<(&'static str, String)> = None;
        for rule in &self.rules {
            match rule.decide(principal, request) {
                Verdict::Forbid(reason) => {
                    return Decision::Deny(Denial {
                        purpose,
                        rule: rule.name(),
                        reason,
                    });
                }
                Verdict::Permit(reason) => {
                    permit.get_or_insert(Permit {
                        purpose,
                        rule: rule.name(),
                        reason,
                    });
                }
                Verdict::NotApplicable(Some(reason)) => {
                    hint.get_or_insert((rule.name(), reason));
                }
                Verdict::NotApplicable(None) => {}
            }
        }
        match permit {
            Some(p) => Decision::Permit(p),
            None => Decision::Deny(default_denial(
                principal,
                request.operation.as_str(),
                &request.resource_type,
                purpose,
                hint,
            )),
        }
    }

    /// Scope a search of `resource_type` runs under, or why it may not run.
    pub fn search_scope(
        &self,
        principal: &Principal,
        resource_type: &str,
        purpose: Purpose,
    ) -> Result<Scope, Denial> {
        let mut rules: Vec<ScopeRule> = Vec::new();
        // a set beside the list: a facility's consents give thousands of rules
        let mut seen: HashSet<ScopeRule> = HashSet::new();
        let mut hint: Option<(&'static str, String)> = None;
        for rule in &self.rules {
            match rule.search_scope(principal, resource_type, purpose) {
                ScopeGrant::Forbid(reason) => {
                    return Err(Denial {
                        purpose,
                        rule: rule.name(),
                        reason,
                    });
                }
                ScopeGrant::Rules(granted) => {
                    for r in granted {
                        if seen.insert(r.clone()) {
                            rules.push(r);
                        }
                    }
                }
                ScopeGrant::None(Some(reason)) => {
                    hint.get_or_insert((rule.name(), reason));
                }
                ScopeGrant::None(None) => {}
            }
        }
        if rules.is_empty() {
            Err(default_denial(
                principal,
                "search",
                resource_type,
                purpose,
                hint,
            ))
        } else {
            Ok(Scope::AnyOf(rules))
        }
    }
}

fn default_denial(
    principal: &Principal,
    operation: &str,
    resource_type: &str,
    purpose: Purpose,
    hint: Option<(&'static str, String)>,
) -> Denial {
    match hint {
        Some((rule, reason)) => Denial {
            purpose,
            rule,
            reason,
        },
        None => Denial {
            purpose,
            rule: "default",
            reason: format!(
                "no policy rule allows role {} to {operation} {} for purpose {purpose}",
                principal.role,
                if resource_type.is_empty() {
                    "here"
                } else {
                    resource_type
                },
            ),
        },
    }
}

/// Non-personal types that care-facility clinical staff may maintain themselves.
/// (Organization is not among them: the organisation registry is the operator's.)
pub const STAFF_MAINTAINED_TYPES: &[&str] = &[
    "Practitioner",
    "PractitionerRole",
    "Location",
    "Medication",
    "Device",
];
/// Personal types a clerk may handle.
pub const CLERK_TYPES: &[&str] = &["Patient", "Coverage", "Encounter", "Appointment"];
/// Personal types insurer staff may handle.
pub const INSURER_TYPES: &[&str] = &["Patient", "Coverage"];

/// The core rules of the platform (before consent, emergency and disaster):
///
/// - the role must be valid for the organisation kind and the purpose allowed
///   for the role ([`Role::allowed_purposes`]), else forbidden;
/// - audit-query, import and admin: operators only;
/// - non-personal resources: anyone authenticated reads and searches; operators
///   write; clinical staff at care facilities also write [`STAFF_MAINTAINED_TYPES`]
///   (update/delete only of what their organisation wrote);
/// - personal resources (Patient and the Patient compartment):
///   - patient: read-only, own compartment only (search scope `Patient{id: self}`);
///   - doctor, dentist, pharmacist, nurse: create; read, update and delete what
///     their organisation wrote (search scope `AuthoredBy(own org)`); modifying
///     another organisation's resource is forbidden;
///   - clerk: the same, limited to [`CLERK_TYPES`], purpose treatment;
///   - insurer-staff: the same, limited to [`INSURER_TYPES`], purpose insurer;
///   - operator, researcher, reviewer, municipality-staff, ministry: nothing.
/// - history without a target instance (type or system level) of personal types
///   is refused: the store's history is not scope-filtered.
///
/// Searches always include `NonPersonal` so that `_include`d reference data shows.
pub struct CoreRule;

impl CoreRule {
    /// The personal types a role may touch at all in the core, None meaning all.
    fn personal_types(role: Role) -> Option<&'static [&'static str]> {
        match role {
            Role::Clerk => Some(CLERK_TYPES),
            Role::InsurerStaff => Some(INSURER_TYPES),
            _ => None,
        }
    }

    /// Roles that handle personal data of their own organisation's authoring.
    fn own_org_writer(principal: &Principal) -> bool {
        (principal.role.is_clinical() || principal.role == Role::Clerk)
            && principal.org_kind.is_care_facility()
            || principal.role == Role::InsurerStaff && principal.org_kind == OrgKind::Insurer
    }

    fn preconditions(principal: &Principal, purpose: Purpose) -> Option<String> {
        if !role_allowed_for(principal.org_kind, principal.role) {
            return Some(format!(
                "role {} is not valid for an organisation of kind {}",
                principal.role, principal.org_kind
            ));
        }
        if !principal.role.allowed_purposes().contains(&purpose) {
            let allowed: Vec<&str> = principal
                .role
                .allowed_purposes()
                .iter()
                .map(|p| p.as_str())
                .collect();
            return Some(format!(
                "role {} may not act for purpose {purpose} (allowed: {})",
                principal.role,
                allowed.join(", ")
            ));
        }
        None
    }

    fn decide_personal(principal: &Principal, req: &AccessRequest) -> Verdict {
        let op = req.operation;
        let rt = req.resource_type.as_str();
        if op == Operation::History && req.patient.is_none() && req.author_org.is_none() {
            return Verdict::NotApplicable(Some(format!(
                "type- and system-level history of {rt} is not available for personal data; use search"
            )));
        }
        if principal.role == Role::Patient {
            let Some(me) = principal.patient.as_deref() else {
                return Verdict::Forbid("patient token carries no patient id".into());
            };
            if req.patient.as_deref() != Some(me) {
                return Verdict::NotApplicable(Some(
                    "patients may access only their own records".into(),
                ));
            }
            if !op.is_read() {
                return Verdict::NotApplicable(Some(
                    "patients have read-only access to their records".into(),
                ));
            }
            if req.has_label(PATIENT_VISIBILITY_SYSTEM, WITHHELD) {
                return Verdict::Forbid(format!("this {rt} is not disclosed to the patient"));
            }
            return Verdict::Permit(format!("patient reads own {rt}"));
        }
        if !Self::own_org_writer(principal) {
            return Verdict::NotApplicable(Some(format!(
                "role {} has no access to personal data ({rt})",
                principal.role
            )));
        }
        if let Some(types) = Self::personal_types(principal.role)
            && !types.contains(&rt)
        {
            return Verdict::NotApplicable(Some(format!(
                "role {} may access only {} among personal data",
                principal.role,
                types.join(", ")
            )));
        }
        let own = principal.org.as_str();
        match (op, req.author_org.as_deref()) {
            (Operation::Create, _) => Verdict::Permit(format!(
                "{} creates {rt} for own organisation",
                principal.role
            )),
            // update-as-create, or delete of nothing
            (Operation::Update | Operation::Delete, None) => {
                Verdict::Permit(format!("{} {op}s absent {rt}", principal.role))
            }
            (Operation::Update | Operation::Delete, Some(a)) if a == own => Verdict::Permit(
                format!("{} {op}s {rt} written by own organisation", principal.role),
            ),
            (Operation::Update | Operation::Delete, Some(_)) => Verdict::Forbid(format!(
                "{rt} was written by another organisation; only that organisation may {op} it"
            )),
            // $everything returns only what the caller's search scope admits
            (Operation::Everything, _) if principal.role.is_clinical() => Verdict::Permit(format!(
                "{} reads the compartment within own organisation's records",
                principal.role
            )),
            (Operation::Everything, _) => Verdict::NotApplicable(Some(format!(
                "role {} may not use $everything",
                principal.role
            ))),
            (_, Some(a)) if a == own => Verdict::Permit(format!(
                "{} reads {rt} written by own organisation",
                principal.role
            )),
            (_, _) => Verdict::NotApplicable(Some(format!(
                "{rt} was written by another organisation; reading it requires the patient's consent"
            ))),
        }
    }

    fn decide_non_personal(principal: &Principal, req: &AccessRequest) -> Verdict {
        let op = req.operation;
        let rt = req.resource_type.as_str();
        if op.is_read() {
            return Verdict::Permit(format!("{rt} holds no personal data"));
        }
        if principal.role == Role::Operator {
            return Verdict::Permit(format!("operator maintains {rt}"));
        }
        if principal.role.is_clinical()
            && principal.org_kind.is_care_facility()
            && STAFF_MAINTAINED_TYPES.contains(&rt)
        {
            return match (op, req.author_org.as_deref()) {
                (Operation::Create, _) | (_, None) => {
                    Verdict::Permit(format!("care staff maintain {rt}"))
                }
                (_, Some(a)) if a == principal.org => {
                    Verdict::Permit(format!("care staff maintain own organisation's {rt}"))
                }
                (_, Some(_)) => Verdict::Forbid(format!(
                    "{rt} was written by another organisation; only that organisation may {op} it"
                )),
            };
        }
        Verdict::NotApplicable(Some(format!("writing {rt} is reserved for operators")))
    }
}

impl AccessRule for CoreRule {
    fn name(&self) -> &'static str {
        "core"
    }

    fn decide(&self, principal: &Principal, req: &AccessRequest) -> Verdict {
        if let Some(reason) = Self::preconditions(principal, req.purpose) {
            return Verdict::Forbid(reason);
        }
        match req.operation {
            Operation::AuditQuery | Operation::Import | Operation::Admin => {
                if principal.role == Role::Operator {
                    Verdict::Permit(format!("operator performs {}", req.operation))
                } else {
                    Verdict::NotApplicable(Some(format!(
                        "{} is reserved for operators",
                        req.operation
                    )))
                }
            }
            _ if req.resource_type.is_empty() => {
                Verdict::NotApplicable(Some("no resource type given".into()))
            }
            // a search is allowed when it gets a scope; the scope does the filtering
            Operation::Search => {
                match self.search_scope(principal, &req.resource_type, req.purpose) {
                    ScopeGrant::Rules(_) => Verdict::Permit(format!(
                        "search of {} runs within the caller's scope",
                        req.resource_type
                    )),
                    ScopeGrant::Forbid(reason) => Verdict::Forbid(reason),
                    ScopeGrant::None(reason) => Verdict::NotApplicable(reason),
                }
            }
            _ if is_personal(&req.resource_type) => Self::decide_personal(principal, req),
            _ => Self::decide_non_personal(principal, req),
        }
    }

    fn search_scope(
        &self,
        principal: &Principal,
        resource_type: &str,
        purpose: Purpose,
    ) -> ScopeGrant {
        if let Some(reason) = Self::preconditions(principal, purpose) {
            return ScopeGrant::Forbid(reason);
        }
        if !is_personal(resource_type) {
            return ScopeGrant::Rules(vec![ScopeRule::NonPersonal]);
        }
        if principal.role == Role::Patient {
            return match &principal.patient {
                Some(me) => ScopeGrant::Rules(vec![patient_own_scope(me), ScopeRule::NonPersonal]),
                None => ScopeGrant::Forbid("patient token carries no patient id".into()),
            };
        }
        if !Self::own_org_writer(principal) {
            return ScopeGrant::None(Some(format!(
                "role {} has no access to personal data ({resource_type})",
                principal.role
            )));
        }
        if let Some(types) = Self::personal_types(principal.role)
            && !types.contains(&resource_type)
        {
            return ScopeGrant::None(Some(format!(
                "role {} may access only {} among personal data",
                principal.role,
                types.join(", ")
            )));
        }
        ScopeGrant::Rules(vec![
            ScopeRule::AuthoredBy {
                org: principal.org.clone(),
                types: Self::personal_types(principal.role)
                    .map(|t| t.iter().map(|s| s.to_string()).collect()),
            },
            ScopeRule::NonPersonal,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PATIENT_ORG;
    use Operation::*;

    const OWN: &str = "1310000001";
    const OTHER: &str = "1310000002";

    fn principal(kind: OrgKind, role: Role) -> Principal {
        Principal {
            org: if kind == OrgKind::Patient {
                PATIENT_ORG.into()
            } else {
                OWN.into()
            },
            org_kind: kind,
            org_flags: vec![],
            role,
            user: Some("u1".into()),
            patient: (role == Role::Patient).then(|| "p1".to_string()),
            second_factor: false,
            token_id: "t".into(),
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Author {
        Own,
        Other,
        None,
    }

    /// (role, org kind, operation, resource type, author, patient of target, expected permit)
    type Row = (
        Role,
        OrgKind,
        Operation,
        &'static str,
        Author,
        Option<&'static str>,
        bool,
    );

    fn check(rows: &[Row]) {
        let policy = Policy::new();
        for &(role, kind, op, rt, author, patient, expected) in rows {
            let p = principal(kind, role);
            let mut req = AccessRequest::new(op, rt, role.default_purpose());
            req.patient = patient.map(str::to_string);
            req.author_org = match author {
                Author::Own => Some(p.org.clone()),
                Author::Other => Some(OTHER.into()),
                Author::None => None,
            };
            let d = policy.decide(&p, &req);
            assert_eq!(
                d.is_permit(),
                expected,
                "{role} at {kind} {op} {rt} author={author:?} patient={patient:?}: {}",
                d.reason()
            );
            assert!(!d.reason().is_empty());
        }
    }

    use Author::{None as Absent, Other, Own};
    use OrgKind as K;
    use Role as R;

    #[test]
    #[rustfmt::skip]
    fn non_personal_resources() {
        check(&[
            // anyone reads reference data
            (R::Patient, K::Patient, Read, "Organization", Other, None, true),
            (R::Researcher, K::ResearchOrganisation, Search, "Practitioner", Other, None, true),
            (R::InsurerStaff, K::Insurer, Read, "Medication", Other, None, true),
            (R::Clerk, K::Clinic, History, "Location", Other, None, true),
            // operators write anything non-personal
            (R::Operator, K::Operator, Create, "Organization", Absent, None, true),
            (R::Operator, K::Operator, Update, "CodeSystem", Other, None, true),
            (R::Operator, K::Operator, Delete, "Organization", Other, None, true),
            // care staff maintain practitioners etc., but not the org registry
            (R::Doctor, K::Hospital, Create, "Practitioner", Absent, None, true),
            (R::Pharmacist, K::Pharmacy, Update, "Medication", Own, None, true),
            (R::Nurse, K::Clinic, Delete, "Location", Own, None, true),
            (R::Doctor, K::Hospital, Update, "Practitioner", Other, None, false),
            (R::Doctor, K::Hospital, Create, "Organization", Absent, None, false),
            (R::Doctor, K::Hospital, Update, "CodeSystem", Own, None, false),
            (R::Clerk, K::Hospital, Create, "Practitioner", Absent, None, false),
            (R::InsurerStaff, K::Insurer, Create, "Practitioner", Absent, None, false),
            (R::Patient, K::Patient, Create, "Practitioner", Absent, None, false),
        ]);
    }

    #[test]
    #[rustfmt::skip]
    fn personal_resources_clinical_staff() {
        check(&[
            (R::Doctor, K::Hospital, Create, "Observation", Absent, Some("p1"), true),
            (R::Doctor, K::Hospital, Read, "Observation", Own, Some("p1"), true),
            (R::Doctor, K::Clinic, Vread, "Condition", Own, Some("p1"), true),
            (R::Doctor, K::Hospital, History, "Observation", Own, Some("p1"), true),
            (R::Doctor, K::Hospital, Read, "Observation", Other, Some("p1"), false),
            (R::Doctor, K::Hospital, Update, "Observation", Own, Some("p1"), true),
            (R::Doctor, K::Hospital, Update, "Observation", Other, Some("p1"), false),
            (R::Doctor, K::Hospital, Update, "Observation", Absent, Some("p1"), true),
            (R::Doctor, K::Hospital, Delete, "Observation", Own, Some("p1"), true),
            (R::Doctor, K::Hospital, Delete, "Observation", Other, Some("p1"), false),
            (R::Doctor, K::Hospital, Everything, "Patient", Other, Some("p1"), true),
            (R::Dentist, K::DentalClinic, Create, "Procedure", Absent, Some("p1"), true),
            (R::Pharmacist, K::Pharmacy, Create, "MedicationDispense", Absent, Some("p1"), true),
            (R::Pharmacist, K::Pharmacy, Read, "MedicationRequest", Other, Some("p1"), false),
            (R::Nurse, K::Hospital, Update, "Patient", Own, Some("p1"), true),
            // type-level history of personal data is not scope-filtered: refused
            (R::Doctor, K::Hospital, History, "Observation", Absent, None, false),
            // searches are allowed when a scope exists; the scope filters rows
            (R::Doctor, K::Hospital, Search, "Observation", Absent, None, true),
            (R::Nurse, K::Clinic, Search, "Patient", Absent, None, true),
        ]);
    }

    #[test]
    #[rustfmt::skip]
    fn personal_resources_clerk_and_insurer() {
        check(&[
            (R::Clerk, K::Hospital, Create, "Patient", Absent, Some("p1"), true),
            (R::Clerk, K::Clinic, Update, "Coverage", Own, Some("p1"), true),
            (R::Clerk, K::Pharmacy, Read, "Encounter", Own, Some("p1"), true),
            (R::Clerk, K::Hospital, Read, "Appointment", Other, Some("p1"), false),
            (R::Clerk, K::Hospital, Read, "Observation", Own, Some("p1"), false),
            (R::Clerk, K::Hospital, Create, "Observation", Absent, Some("p1"), false),
            (R::Clerk, K::Hospital, Everything, "Patient", Own, Some("p1"), false),
            (R::Clerk, K::Hospital, Search, "Encounter", Absent, None, true),
            (R::Clerk, K::Hospital, Search, "Observation", Absent, None, false),
            (R::InsurerStaff, K::Insurer, Search, "Condition", Absent, None, false),
            (R::InsurerStaff, K::Insurer, Create, "Coverage", Absent, Some("p1"), true),
            (R::InsurerStaff, K::Insurer, Read, "Patient", Own, Some("p1"), true),
            (R::InsurerStaff, K::Insurer, Update, "Coverage", Other, Some("p1"), false),
            (R::InsurerStaff, K::Insurer, Read, "Coverage", Other, Some("p1"), false),
            (R::InsurerStaff, K::Insurer, Read, "Condition", Own, Some("p1"), false),
        ]);
    }

    #[test]
    #[rustfmt::skip]
    fn personal_resources_patients_and_others() {
        check(&[
            (R::Patient, K::Patient, Read, "Observation", Other, Some("p1"), true),
            (R::Patient, K::Patient, Everything, "Patient", Other, Some("p1"), true),
            (R::Patient, K::Patient, History, "Patient", Other, Some("p1"), true),
            (R::Patient, K::Patient, Read, "Observation", Other, Some("p2"), false),
            (R::Patient, K::Patient, Read, "Observation", Other, None, false),
            (R::Patient, K::Patient, Update, "Patient", Other, Some("p1"), false),
            (R::Patient, K::Patient, Create, "Observation", Absent, Some("p1"), false),
            (R::Patient, K::Patient, Search, "Observation", Absent, None, true),
            (R::Operator, K::Operator, Read, "Observation", Other, Some("p1"), false),
            (R::Operator, K::Operator, Search, "Observation", Absent, None, false),
            (R::Researcher, K::ResearchOrganisation, Search, "Patient", Absent, None, false),
            (R::Operator, K::Operator, Create, "Patient", Absent, Some("p1"), false),
            (R::Researcher, K::ResearchOrganisation, Read, "Observation", Own, Some("p1"), false),
            (R::Reviewer, K::Operator, Read, "Patient", Own, Some("p1"), false),
            (R::Ministry, K::Ministry, Read, "Patient", Own, Some("p1"), false),
            (R::MunicipalityStaff, K::Municipality, Create, "Patient", Absent, Some("p1"), false),
        ]);
    }

    #[test]
    #[rustfmt::skip]
    fn system_operations() {
        check(&[
            (R::Operator, K::Operator, AuditQuery, "", Absent, None, true),
            (R::Operator, K::Operator, Admin, "", Absent, None, true),
            (R::Operator, K::Operator, Import, "", Absent, None, true),
            (R::Reviewer, K::Operator, AuditQuery, "", Absent, None, false),
            (R::Doctor, K::Hospital, AuditQuery, "", Absent, None, false),
            (R::Patient, K::Patient, AuditQuery, "", Absent, None, false),
            (R::Ministry, K::Ministry, Admin, "", Absent, None, false),
        ]);
    }

    #[test]
    fn wrong_org_kind_or_purpose_is_forbidden() {
        let policy = Policy::new();
        // doctor claimed at a pharmacy
        let p = principal(K::Pharmacy, R::Doctor);
        let d = policy.decide(
            &p,
            &AccessRequest::new(Read, "Organization", Purpose::Treatment),
        );
        assert!(!d.is_permit());
        assert!(
            d.reason()
                .contains("not valid for an organisation of kind pharmacy"),
            "{}",
            d.reason()
        );
        // purpose not allowed for the role
        let p = principal(K::Insurer, R::InsurerStaff);
        let d = policy.decide(
            &p,
            &AccessRequest::new(Read, "Coverage", Purpose::Treatment).author(OWN),
        );
        assert!(
            d.reason().contains("may not act for purpose treatment"),
            "{}",
            d.reason()
        );
        assert_eq!(d.purpose(), Purpose::Treatment);
        let err = d.into_result().unwrap_err();
        assert_eq!(err.status, 403);
        // a clerk may not claim emergency
        let p = principal(K::Hospital, R::Clerk);
        assert!(
            !policy
                .decide(
                    &p,
                    &AccessRequest::new(Read, "Patient", Purpose::Emergency).author(OWN)
                )
                .is_permit()
        );
        // a doctor may read own records under emergency purpose too
        let p = principal(K::Hospital, R::Doctor);
        assert!(
            policy
                .decide(
                    &p,
                    &AccessRequest::new(Read, "Patient", Purpose::Emergency).author(OWN)
                )
                .is_permit()
        );
    }

    #[test]
    fn denial_reasons_are_specific() {
        let policy = Policy::new();
        let p = principal(K::Hospital, R::Doctor);
        let d = policy.decide(
            &p,
            &AccessRequest::new(Update, "Observation", Purpose::Treatment).author(OTHER),
        );
        assert_eq!(
            d.reason(),
            "Observation was written by another organisation; only that organisation may update it"
        );
        let d = policy.decide(
            &p,
            &AccessRequest::new(Read, "Observation", Purpose::Treatment).author(OTHER),
        );
        assert!(d.reason().contains("requires the patient's consent"));
        let Decision::Deny(den) = d else { panic!() };
        assert_eq!(den.rule, "core");
        let p = principal(K::Operator, R::Operator);
        let d = policy.decide(
            &p,
            &AccessRequest::new(Read, "Observation", Purpose::Operations).author(OTHER),
        );
        assert_eq!(
            d.reason(),
            "role operator has no access to personal data (Observation)"
        );
    }

    #[test]
    fn search_scopes() {
        let policy = Policy::new();
        let own = ScopeRule::AuthoredBy {
            org: OWN.into(),
            types: None,
        };
        let doctor = principal(K::Hospital, R::Doctor);
        assert_eq!(
            policy.search_scope(&doctor, "Observation", Purpose::Treatment),
            Ok(Scope::AnyOf(vec![own.clone(), ScopeRule::NonPersonal]))
        );
        assert_eq!(
            policy.search_scope(&doctor, "Practitioner", Purpose::Treatment),
            Ok(Scope::AnyOf(vec![ScopeRule::NonPersonal]))
        );
        // a clerk's own-organisation scope carries the clerk's types, so includes
        // cannot pull in clinical resources
        let clerk = principal(K::Clinic, R::Clerk);
        assert_eq!(
            policy.search_scope(&clerk, "Patient", Purpose::Treatment),
            Ok(Scope::AnyOf(vec![
                ScopeRule::AuthoredBy {
                    org: OWN.into(),
                    types: Some(CLERK_TYPES.iter().map(|t| t.to_string()).collect())
                },
                ScopeRule::NonPersonal
            ]))
        );
        let patient = principal(K::Patient, R::Patient);
        assert_eq!(
            policy.search_scope(&patient, "Observation", Purpose::PatientSelf),
            Ok(Scope::AnyOf(vec![
                patient_own_scope("p1"),
                ScopeRule::NonPersonal
            ]))
        );
        // what is withheld from the patient is refused on a direct read too
        let withheld = AccessRequest::new(Read, "DocumentReference", Purpose::PatientSelf)
            .patient("p1")
            .labels(vec![(PATIENT_VISIBILITY_SYSTEM.into(), WITHHELD.into())]);
        assert!(!policy.decide(&patient, &withheld).is_permit());
        let shown =
            AccessRequest::new(Read, "DocumentReference", Purpose::PatientSelf).patient("p1");
        assert!(policy.decide(&patient, &shown).is_permit());
        let clerk = principal(K::Clinic, R::Clerk);
        assert!(
            policy
                .search_scope(&clerk, "Coverage", Purpose::Treatment)
                .is_ok()
        );
        let e = policy
            .search_scope(&clerk, "Observation", Purpose::Treatment)
            .unwrap_err();
        assert!(
            e.reason
                .contains("only Patient, Coverage, Encounter, Appointment"),
            "{}",
            e.reason
        );
        let insurer = principal(K::Insurer, R::InsurerStaff);
        assert!(
            policy
                .search_scope(&insurer, "Coverage", Purpose::Insurer)
                .is_ok()
        );
        assert!(
            policy
                .search_scope(&insurer, "Condition", Purpose::Insurer)
                .is_err()
        );
        assert!(
            policy
                .search_scope(&insurer, "Coverage", Purpose::Treatment)
                .is_err()
        );
        let op = principal(K::Operator, R::Operator);
        assert!(
            policy
                .search_scope(&op, "Patient", Purpose::Operations)
                .is_err()
        );
        assert_eq!(
            policy.search_scope(&op, "Organization", Purpose::Operations),
            Ok(Scope::AnyOf(vec![ScopeRule::NonPersonal]))
        );
        let researcher = principal(K::ResearchOrganisation, R::Researcher);
        assert_eq!(
            policy
                .search_scope(&researcher, "Observation", Purpose::Research)
                .unwrap_err()
                .to_error()
                .status,
            403
        );
    }

    #[test]
    fn personal_classification() {
        assert!(is_personal("Patient"));
        assert!(is_personal("Observation"));
        assert!(is_personal("Coverage"));
        assert!(!is_personal("Organization"));
        assert!(!is_personal("Practitioner"));
        assert!(!is_personal("CodeSystem"));
    }

    /// Sweeps every valid role/org-kind pair, operation and purpose for invariants
    /// the core must keep whatever the table above says.
    #[test]
    fn invariants_over_all_combinations() {
        let policy = Policy::new();
        let ops = [
            Read, Vread, Search, History, Create, Update, Delete, Everything, AuditQuery, Import,
            Admin,
        ];
        for &kind in K::ALL {
            for &role in R::ALL {
                if !role_allowed_for(kind, role) {
                    continue;
                }
                let p = principal(kind, role);
                for &op in &ops {
                    for &purpose in Purpose::ALL {
                        let base = AccessRequest::new(op, "Observation", purpose).patient("p2");
                        let allowed_purpose = role.allowed_purposes().contains(&purpose);
                        // another organisation's personal record of someone else
                        let d = policy.decide(&p, &base.clone().author(OTHER));
                        if matches!(op, Update | Delete) || !allowed_purpose {
                            assert!(
                                !d.is_permit(),
                                "{role}@{kind} {op} {purpose}: {}",
                                d.reason()
                            );
                        }
                        if matches!(op, Read | Vread | History) {
                            assert!(
                                !d.is_permit(),
                                "{role}@{kind} {op} other org's record: {}",
                                d.reason()
                            );
                        }
                        // system operations: operators only
                        if matches!(op, AuditQuery | Import | Admin) {
                            let d = policy.decide(&p, &AccessRequest::new(op, "", purpose));
                            assert_eq!(
                                d.is_permit(),
                                role == R::Operator && allowed_purpose,
                                "{role} {op}"
                            );
                        }
                        // a wrong purpose never yields a search scope
                        if !allowed_purpose {
                            assert!(policy.search_scope(&p, "Organization", purpose).is_err());
                        }
                    }
                }
            }
        }
    }

    /// A stand-in for the consent rule of a later issue: lets treating staff read
    /// everything of consented patients, adding a patient scope to searches.
    struct ConsentStub {
        consented: &'static str,
    }

    impl AccessRule for ConsentStub {
        fn name(&self) -> &'static str {
            "consent"
        }
        fn decide(&self, p: &Principal, req: &AccessRequest) -> Verdict {
            if p.role.is_clinical()
                && req.operation.is_read()
                && req.patient.as_deref() == Some(self.consented)
            {
                Verdict::Permit("patient consented".into())
            } else {
                Verdict::NotApplicable(None)
            }
        }
        fn search_scope(&self, p: &Principal, _rt: &str, _purpose: Purpose) -> ScopeGrant {
            if p.role.is_clinical() {
                ScopeGrant::Rules(vec![ScopeRule::Patient {
                    id: self.consented.into(),
                    types: None,
                }])
            } else {
                ScopeGrant::None(None)
            }
        }
    }

    #[test]
    fn extension_rules_add_permits_but_cannot_override_forbids() {
        let policy = Policy::new().with_rule(Arc::new(ConsentStub { consented: "p1" }));
        let doctor = principal(K::Hospital, R::Doctor);
        // another org's record of a consented patient: now readable
        let d = policy.decide(
            &doctor,
            &AccessRequest::new(Read, "Observation", Purpose::Treatment)
                .author(OTHER)
                .patient("p1"),
        );
        let Decision::Permit(permit) = d else {
            panic!("{d:?}")
        };
        assert_eq!(permit.rule, "consent");
        // a non-consented patient: still the core's reason
        let d = policy.decide(
            &doctor,
            &AccessRequest::new(Read, "Observation", Purpose::Treatment)
                .author(OTHER)
                .patient("p2"),
        );
        assert!(d.reason().contains("consent"));
        // modifying another org's record stays forbidden even for consented patients
        let stub_all = Policy::new().with_rule(Arc::new(PermitAll));
        let d = stub_all.decide(
            &doctor,
            &AccessRequest::new(Update, "Observation", Purpose::Treatment)
                .author(OTHER)
                .patient("p1"),
        );
        assert!(!d.is_permit());
        // wrong purpose stays forbidden
        let d = stub_all.decide(
            &doctor,
            &AccessRequest::new(Read, "Observation", Purpose::Research).patient("p1"),
        );
        assert!(!d.is_permit());
        // a rule granting only a search scope makes the search permitted
        let clerk = principal(K::Hospital, R::Clerk);
        let with_all = Policy::new().with_rule(Arc::new(PermitAll));
        assert!(
            !Policy::new()
                .decide(
                    &clerk,
                    &AccessRequest::new(Search, "Observation", Purpose::Treatment)
                )
                .is_permit()
        );
        assert!(
            with_all
                .decide(
                    &clerk,
                    &AccessRequest::new(Search, "Observation", Purpose::Treatment)
                )
                .is_permit()
        );
        // searches get the union of scopes
        assert_eq!(
            policy.search_scope(&doctor, "Observation", Purpose::Treatment),
            Ok(Scope::AnyOf(vec![
                ScopeRule::AuthoredBy {
                    org: OWN.into(),
                    types: None
                },
                ScopeRule::NonPersonal,
                ScopeRule::Patient {
                    id: "p1".into(),
                    types: None
                }
            ]))
        );
    }

    struct PermitAll;
    impl AccessRule for PermitAll {
        fn name(&self) -> &'static str {
            "permit-all"
        }
        fn decide(&self, _: &Principal, _: &AccessRequest) -> Verdict {
            Verdict::Permit("test".into())
        }
        fn search_scope(&self, _: &Principal, _: &str, _: Purpose) -> ScopeGrant {
            ScopeGrant::Rules(vec![ScopeRule::NonPersonal])
        }
    }
}
