//! The organisation registry: Organization resources carrying the platform's
//! organisation code as an identifier and the kind and flags as `type` codings.

use serde_json::{Value, json};
use tsunagi_fhir::search::{Criterion, SearchQuery, TokenMatch};
use tsunagi_policy::identity::OrgKind;
use tsunagi_store::{Scope, Store};

/// Code system of organisation kinds (hospital, clinic, ...).
pub const ORG_KIND_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/organization-kind";
/// Code system of organisation flags (emergency-designated, ...).
pub const ORG_FLAG_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/organization-flag";
/// 医療機関等コード: 10-digit medical institution / pharmacy code (JP Core IdSystem).
pub const MEDICAL_INSTITUTION_SYSTEM: &str =
    "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no";
/// 保険者番号: insurer number (JP Core OID).
pub const INSURER_SYSTEM: &str = "urn:oid:1.2.392.100495.20.3.61";
/// 地方公共団体コード: local government code (6 digits with check digit).
pub const LOCAL_GOVERNMENT_SYSTEM: &str =
    "https://tsunagi.dev/fhir/NamingSystem/local-government-code";
/// Codes of organisations with no national numbering (research organisations, the operator, ...).
pub const ORG_CODE_SYSTEM: &str = "https://tsunagi.dev/fhir/NamingSystem/organization-code";

/// The identifier system an organisation of this kind is numbered in.
pub fn code_system(kind: OrgKind) -> &'static str {
    match kind {
        OrgKind::Hospital | OrgKind::Clinic | OrgKind::DentalClinic | OrgKind::Pharmacy => {
            MEDICAL_INSTITUTION_SYSTEM
        }
        OrgKind::Insurer => INSURER_SYSTEM,
        OrgKind::Municipality | OrgKind::PublicHealthCentre => LOCAL_GOVERNMENT_SYSTEM,
        _ => ORG_CODE_SYSTEM,
    }
}

/// An Organization resource for the registry.
pub fn organization(id: &str, code: &str, kind: OrgKind, name: &str, flags: &[&str]) -> Value {
    let mut types = vec![json!({"coding": [{"system": ORG_KIND_SYSTEM, "code": kind.as_str()}]})];
    for f in flags {
        types.push(json!({"coding": [{"system": ORG_FLAG_SYSTEM, "code": f}]}));
    }
    json!({
        "resourceType": "Organization",
        "id": id,
        "active": true,
        "identifier": [{"system": code_system(kind), "value": code}],
        "type": types,
        "name": name,
    })
}

/// Kind and flags of the organisation registered under `code`, if any.
pub fn lookup(store: &dyn Store, code: &str) -> Option<(OrgKind, Vec<String>)> {
    let q = SearchQuery::new("Organization").with(
        "identifier",
        Criterion::Token {
            values: vec![TokenMatch {
                system: None,
                code: Some(code.to_string()),
            }],
            negate: false,
        },
    );
    let found = store.search(&q, &Scope::Unrestricted).ok()?;
    let org = found.matches.first()?.resource.as_ref()?;
    if org.get("active").and_then(Value::as_bool) == Some(false) {
        return None;
    }
    let mut kind = None;
    let mut flags = Vec::new();
    for t in org
        .get("type")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for c in t
            .get("coding")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let code = c.get("code").and_then(Value::as_str).unwrap_or_default();
            match c.get("system").and_then(Value::as_str) {
                Some(ORG_KIND_SYSTEM) => kind = code.parse::<OrgKind>().ok(),
                Some(ORG_FLAG_SYSTEM) => flags.push(code.to_string()),
                _ => {}
            }
        }
    }
    Some((kind?, flags))
}
