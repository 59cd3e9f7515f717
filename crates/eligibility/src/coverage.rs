//! Coverage registration by insurers (資格情報の登録): one person, a coverage history.
//!
//! # Person model
//! The platform never stores the My Number (個人番号). Each insurer identifies a
//! person by an opaque *linkage id* sent with every registration: a stand-in for
//! the 機関別符号 that the intermediary server (情報提供ネットワークシステム) gives each
//! institution for the same person. The platform person is a `Patient` with
//! identifier [`PERSON_LINK_SYSTEM`] = linkage id, name (kanji and kana, JP Core
//! iso21090-EN-representation IDE/SYL), gender, birth date and address. Its id is
//! derived from the linkage id ([`person_id`]), so a registration finds the person
//! with one primary-key read or creates it.
//!
//! The person record is maintained by the insurer that currently covers the person:
//! its current version is authored by the last insurer whose *current* registration
//! wrote it, so that insurer (and no other) sees it through the core policy
//! (`AuthoredBy`). A registration by another insurer takes the record over; the
//! linkage id is the insurer's proof that the person is its member. An insurer
//! registering an already *ended* coverage (資格喪失) does not take the record over.
//! Coverage records stay authored by their insurer: insurer A keeps seeing its
//! ended coverage, insurer B its new one; `Coverage?beneficiary=Patient/ID` (as the
//! platform) is the person's coverage history.
//!
//! # Coverage content (JP Core JP_Coverage)
//! - `identifier` `http://jpfhir.jp/fhir/ccs/Idsysmem/JP_Insurance_member` =
//!   `保険者番号:記号:番号:枝番` (the `$eligibility` key; the Coverage id is derived from it);
//! - extensions `JP_Coverage_InsuredPersonSymbol` (記号), `…Number` (番号), `…SubNumber` (枝番);
//! - `payor[0].identifier` = 保険者番号 (check digit validated), `subscriberId` = 番号,
//!   `dependent` = 枝番 (exactly two digits);
//! - `relationship`: 本人 (被保険者, `self`) or 家族 (被扶養者, `other`), coded in the
//!   被保険者区分 code system `urn:oid:1.2.392.100495.20.2.62` (1/2) and HL7 subscriber-relationship;
//! - `costToBeneficiary[0]`: 負担割合 as `copaypct` percentage (10, 20 or 30);
//! - `period.start` = 資格取得日, `period.end` = 資格喪失日;
//! - extension [`LIMIT_CATEGORY_EXT`]: 高額療養費 限度額適用区分, see [`LimitCategory`].

use std::borrow::Cow;
use std::collections::BTreeMap;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use chrono::NaiveDate;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tsunagi_fhir::search::SearchQuery;
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_policy::audit::AuditRecord;
use tsunagi_policy::identity::{OrgKind, Principal, Purpose, Role};
use tsunagi_policy::ids::validate_insurer_number;
use tsunagi_policy::policy::{AccessRequest, Decision, Operation, Policy};
use tsunagi_server::engine::blocking;
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::orgs::INSURER_SYSTEM;
use tsunagi_server::validate::gate;
use tsunagi_server::{AppState, Validate};
use tsunagi_store::{Scope, Store, StoredResource, StoredText, Transaction, WriteContext};

/// Identifier system of the platform person's linkage id (stand-in for 機関別符号).
pub const PERSON_LINK_SYSTEM: &str = "https://tsunagi.dev/fhir/NamingSystem/person-link";
/// JP Core: 保険者番号:記号:番号:枝番 as one Coverage identifier.
pub const INSURANCE_MEMBER_SYSTEM: &str = "http://jpfhir.jp/fhir/ccs/Idsysmem/JP_Insurance_member";
pub const SYMBOL_EXT: &str =
    "http://jpfhir.jp/fhir/core/Extension/StructureDefinition/JP_Coverage_InsuredPersonSymbol";
pub const NUMBER_EXT: &str =
    "http://jpfhir.jp/fhir/core/Extension/StructureDefinition/JP_Coverage_InsuredPersonNumber";
pub const SUBNUMBER_EXT: &str =
    "http://jpfhir.jp/fhir/core/Extension/StructureDefinition/JP_Coverage_InsuredPersonSubNumber";
/// 高額療養費 限度額適用区分 (no JP Core element exists for it).
pub const LIMIT_CATEGORY_EXT: &str =
    "https://tsunagi.dev/fhir/StructureDefinition/high-cost-limit-category";
pub const LIMIT_CATEGORY_SYSTEM: &str =
    "https://tsunagi.dev/fhir/CodeSystem/high-cost-limit-category";
/// 被保険者区分コード (1 被保険者, 2 被扶養者).
pub const INSURED_CATEGORY_SYSTEM: &str = "urn:oid:1.2.392.100495.20.2.62";
const NAME_REPRESENTATION: &str =
    "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation";

/// 高額療養費 限度額適用区分: the categories printed on the 限度額適用認定証 and
/// returned by オンライン資格確認 (健康保険法施行令 第42条). Under 70: ア–オ; 70 and over:
/// 現役並みⅢ/Ⅱ/Ⅰ, 一般, 低所得Ⅱ, 低所得Ⅰ. Wire codes are ASCII.
pub const LIMIT_CATEGORIES: &[(&str, &str)] = &[
    ("a", "ア（標準報酬月額83万円以上）"),
    ("i", "イ（標準報酬月額53万〜79万円）"),
    ("u", "ウ（標準報酬月額28万〜50万円）"),
    ("e", "エ（標準報酬月額26万円以下）"),
    ("o", "オ（住民税非課税）"),
    ("gen3", "現役並みⅢ"),
    ("gen2", "現役並みⅡ"),
    ("gen1", "現役並みⅠ"),
    ("ippan", "一般"),
    ("low2", "低所得Ⅱ"),
    ("low1", "低所得Ⅰ"),
];

/// A limit category code (see [`LIMIT_CATEGORIES`]); Japanese labels are accepted too.
pub struct LimitCategory;

impl LimitCategory {
    /// (code, display) for a code or a Japanese label (ア, 現役並みⅢ, 一般, 低所得Ⅰ, ...).
    pub fn parse(s: &str) -> Option<(&'static str, &'static str)> {
        let s = s.trim();
        let alias = match s {
            "ア" => "a",
            "イ" => "i",
            "ウ" => "u",
            "エ" => "e",
            "オ" => "o",
            "現役並みⅢ" | "現役並み3" => "gen3",
            "現役並みⅡ" | "現役並み2" => "gen2",
            "現役並みⅠ" | "現役並み1" => "gen1",
            "一般" => "ippan",
            "低所得Ⅱ" | "低所得2" => "low2",
            "低所得Ⅰ" | "低所得1" => "low1",
            other => other,
        };
        LIMIT_CATEGORIES.iter().find(|(c, _)| *c == alias).copied()
    }
}

/// The input fields of a registration, in CSV column order. The same names are the
/// keys of an NDJSON line and the parameter names of `$register-coverage`.
pub const FIELDS: &[&str] = &[
    "linkageId",
    "insurerNumber",
    "symbol",
    "number",
    "branch",
    "relationship",
    "copayPercent",
    "start",
    "end",
    "limitCategory",
    "status",
    "familyName",
    "givenName",
    "familyNameKana",
    "givenNameKana",
    "gender",
    "birthDate",
    "postalCode",
    "address",
];

/// FHIR element each input field lands in (for error reports).
pub fn element_of(field: &str) -> &'static str {
    match field {
        "linkageId" => "Patient.identifier[0].value",
        "insurerNumber" => "Coverage.payor[0].identifier.value",
        "symbol" => "Coverage.extension:insuredPersonSymbol.valueString",
        "number" => "Coverage.subscriberId",
        "branch" => "Coverage.dependent",
        "relationship" => "Coverage.relationship",
        "copayPercent" => "Coverage.costToBeneficiary[0].valueQuantity.value",
        "start" => "Coverage.period.start",
        "end" => "Coverage.period.end",
        "limitCategory" => "Coverage.extension:highCostLimitCategory.valueCoding",
        "status" => "Coverage.status",
        "familyName" => "Patient.name[0].family",
        "givenName" => "Patient.name[0].given[0]",
        "familyNameKana" => "Patient.name[1].family",
        "givenNameKana" => "Patient.name[1].given[0]",
        "gender" => "Patient.gender",
        "birthDate" => "Patient.birthDate",
        "postalCode" => "Patient.address[0].postalCode",
        "address" => "Patient.address[0].text",
        _ => "Parameters.parameter",
    }
}

/// A rejected input field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub element: String,
    pub reason: String,
}

impl FieldError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.to_string(),
            element: element_of(field).to_string(),
            reason: reason.into(),
        }
    }
    pub fn to_fhir(&self) -> FhirError {
        FhirError::invalid_element(&self.element, format!("{}: {}", self.field, self.reason))
    }
}

/// 本人 or 家族.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relationship {
    /// 本人 (被保険者).
    Insured,
    /// 家族 (被扶養者).
    Dependent,
}

/// One validated registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub linkage_id: String,
    pub insurer_number: String,
    /// 記号 (may be empty: some insurers issue none).
    pub symbol: String,
    /// 番号.
    pub number: String,
    /// 枝番, two digits.
    pub branch: String,
    pub relationship: Relationship,
    /// 負担割合 in percent.
    pub copay_percent: u32,
    /// 資格取得日.
    pub start: NaiveDate,
    /// 資格喪失日.
    pub end: Option<NaiveDate>,
    pub limit_category: Option<(&'static str, &'static str)>,
    pub cancelled: bool,
    pub family_name: String,
    pub given_name: String,
    pub family_name_kana: String,
    pub given_name_kana: String,
    pub gender: String,
    pub birth_date: NaiveDate,
    pub postal_code: Option<String>,
    pub address: Option<String>,
}

/// `保険者番号:記号:番号:枝番`.
pub fn member_key(insurer: &str, symbol: &str, number: &str, branch: &str) -> String {
    let (insurer, symbol, number, branch) = (
        fold_width(insurer),
        fold_width(symbol),
        fold_width(number),
        fold_width(branch),
    );
    format!("{insurer}:{symbol}:{number}:{branch}")
}

/// Full-width ASCII (全角英数字, U+FF01–U+FF5E) and the ideographic space folded
/// to their half-width forms: 記号 and 番号 reach the platform both ways (a card
/// prints `６７８９０`, a receipt system sends `67890`) and are one member.
/// Kanji and kana in a 記号 are kept as they are.
pub fn fold_width(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            '\u{3000}' => ' ',
            c => c,
        })
        .collect()
}

fn hashed_id(prefix: &str, kind: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update([0u8]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

/// Id of the platform person for a linkage id (a one-way hash: the id reveals nothing).
pub fn person_id(linkage_id: &str) -> String {
    hashed_id("person-", "person-link", linkage_id)
}

/// Id of the registered Coverage for a member key ([`member_key`]).
pub fn coverage_id(member_key: &str) -> String {
    hashed_id("cov-", "insurance-member", member_key)
}

fn parse_date(field: &str, s: &str) -> Result<NaiveDate, FieldError> {
    NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        .map_err(|_| FieldError::new(field, format!("'{s}' is not a date (YYYY-MM-DD)")))
}

impl Registration {
    /// Validates the fields of one record (CSV row, NDJSON object, Parameters). All
    /// errors are returned, each naming its field and FHIR element.
    pub fn from_fields(
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Registration, Vec<FieldError>> {
        let mut errs = Vec::new();
        let val = |f: &str| get(f).map(|s| s.trim().to_string()).unwrap_or_default();
        let required = |f: &str, errs: &mut Vec<FieldError>| {
            let v = val(f);
            if v.is_empty() {
                errs.push(FieldError::new(f, "is required"));
            }
            v
        };
        let linkage_id = required("linkageId", &mut errs);
        if linkage_id.chars().count() > 128 {
            errs.push(FieldError::new(
                "linkageId",
                "is longer than 128 characters",
            ));
        }
        let insurer_number = required("insurerNumber", &mut errs);
        if !insurer_number.is_empty()
            && let Err(e) = validate_insurer_number(&insurer_number)
        {
            errs.push(FieldError::new("insurerNumber", e.to_string()));
        }
        let symbol = val("symbol");
        if symbol.contains(':') {
            errs.push(FieldError::new("symbol", "must not contain ':'"));
        }
        let number = required("number", &mut errs);
        if number.contains(':') {
            errs.push(FieldError::new("number", "must not contain ':'"));
        }
        let branch = required("branch", &mut errs);
        let two_digits = branch.len() == 2 && branch.bytes().all(|b| b.is_ascii_digit());
        if !branch.is_empty() && !two_digits {
            errs.push(FieldError::new(
                "branch",
                format!("枝番 must be exactly two digits (00-99), got '{branch}'"),
            ));
        }
        let relationship = match val("relationship").as_str() {
            "self" | "本人" | "1" => Relationship::Insured,
            "family" | "家族" | "2" => Relationship::Dependent,
            other => {
                errs.push(FieldError::new(
                    "relationship",
                    format!("must be self (本人) or family (家族), got '{other}'"),
                ));
                Relationship::Insured
            }
        };
        let copay_percent = match val("copayPercent").parse::<u32>() {
            Ok(p @ (10 | 20 | 30)) => p,
            _ => {
                errs.push(FieldError::new(
                    "copayPercent",
                    format!(
                        "負担割合 must be 10, 20 or 30, got '{}'",
                        val("copayPercent")
                    ),
                ));
                0
            }
        };
        let start = match required("start", &mut errs) {
            s if s.is_empty() => None,
            s => parse_date("start", &s).map_err(|e| errs.push(e)).ok(),
        };
        let end = match val("end") {
            s if s.is_empty() => None,
            s => parse_date("end", &s).map_err(|e| errs.push(e)).ok(),
        };
        if let (Some(s), Some(e)) = (start, end)
            && e < s
        {
            errs.push(FieldError::new(
                "end",
                format!("資格喪失日 {e} is before 資格取得日 {s}"),
            ));
        }
        let limit_category = match val("limitCategory") {
            s if s.is_empty() => None,
            s => match LimitCategory::parse(&s) {
                Some(c) => Some(c),
                None => {
                    errs.push(FieldError::new(
                        "limitCategory",
                        format!(
                            "unknown 限度額適用区分 '{s}' (expected one of: {})",
                            LIMIT_CATEGORIES
                                .iter()
                                .map(|c| c.0)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                    None
                }
            },
        };
        let cancelled = match val("status").as_str() {
            "" | "active" => false,
            "cancelled" => true,
            other => {
                errs.push(FieldError::new(
                    "status",
                    format!("must be active or cancelled, got '{other}'"),
                ));
                false
            }
        };
        let family_name = required("familyName", &mut errs);
        let given_name = required("givenName", &mut errs);
        let family_name_kana = required("familyNameKana", &mut errs);
        let given_name_kana = required("givenNameKana", &mut errs);
        let gender = val("gender");
        if !matches!(gender.as_str(), "male" | "female" | "other" | "unknown") {
            errs.push(FieldError::new(
                "gender",
                format!("must be male, female, other or unknown, got '{gender}'"),
            ));
        }
        let birth_date = match required("birthDate", &mut errs) {
            s if s.is_empty() => None,
            s => parse_date("birthDate", &s).map_err(|e| errs.push(e)).ok(),
        };
        let postal_code = Some(val("postalCode")).filter(|s| !s.is_empty());
        if let Some(p) = &postal_code {
            let ok = p.len() == 8
                && p.as_bytes()[3] == b'-'
                && p.bytes()
                    .enumerate()
                    .all(|(i, b)| i == 3 || b.is_ascii_digit());
            if !ok {
                errs.push(FieldError::new(
                    "postalCode",
                    format!("must be NNN-NNNN, got '{p}'"),
                ));
            }
        }
        let address = Some(val("address")).filter(|s| !s.is_empty());
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Registration {
            linkage_id,
            insurer_number,
            symbol,
            number,
            branch,
            relationship,
            copay_percent,
            start: start.expect("checked"),
            end,
            limit_category,
            cancelled,
            family_name,
            given_name,
            family_name_kana,
            given_name_kana,
            gender,
            birth_date: birth_date.expect("checked"),
            postal_code,
            address,
        })
    }

    /// From a FHIR Parameters resource (`valueString`, `valueCode`, `valueDate`,
    /// `valueInteger` parts named as in [`FIELDS`]).
    pub fn from_parameters(body: &Value) -> Result<Registration, Vec<FieldError>> {
        if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
            return Err(vec![FieldError {
                field: "resourceType".into(),
                element: "Parameters".into(),
                reason: "the body must be a Parameters resource".into(),
            }]);
        }
        let map = parameters_map(body);
        Self::from_fields(&|f| map.get(f).cloned())
    }

    /// From a flat JSON object (an NDJSON line); numbers are accepted for numeric fields.
    pub fn from_object(obj: &Value) -> Result<Registration, Vec<FieldError>> {
        Self::from_fields(&|f| match obj.get(f) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
    }

    pub fn member_key(&self) -> String {
        member_key(
            &self.insurer_number,
            &self.symbol,
            &self.number,
            &self.branch,
        )
    }

    /// Whether the coverage has ended (資格喪失日 before `today`) or was cancelled.
    pub fn is_ended(&self, today: NaiveDate) -> bool {
        self.cancelled || self.end.is_some_and(|e| e < today)
    }

    /// The platform person resource (without id/meta).
    pub fn patient(&self, id: &str) -> Value {
        let mut p = json!({
            "resourceType": "Patient",
            "id": id,
            "identifier": [{"system": PERSON_LINK_SYSTEM, "value": self.linkage_id}],
            "name": [
                {"extension": [{"url": NAME_REPRESENTATION, "valueCode": "IDE"}], "use": "official",
                 "text": format!("{} {}", self.family_name, self.given_name), "family": self.family_name, "given": [self.given_name]},
                {"extension": [{"url": NAME_REPRESENTATION, "valueCode": "SYL"}], "use": "official",
                 "text": format!("{} {}", self.family_name_kana, self.given_name_kana), "family": self.family_name_kana, "given": [self.given_name_kana]}
            ],
            "gender": self.gender,
            "birthDate": self.birth_date.to_string(),
        });
        if self.address.is_some() || self.postal_code.is_some() {
            let mut a = json!({"use": "home", "country": "JP"});
            if let Some(t) = &self.address {
                a["text"] = json!(t);
            }
            if let Some(pc) = &self.postal_code {
                a["postalCode"] = json!(pc);
            }
            p["address"] = json!([a]);
        }
        p
    }

    /// The Coverage resource (without meta).
    pub fn coverage(&self, id: &str, person: &str) -> Value {
        let (cat_code, cat_display, hl7) = match self.relationship {
            Relationship::Insured => ("1", "被保険者", "self"),
            Relationship::Dependent => ("2", "被扶養者", "other"),
        };
        let mut ext = vec![
            json!({"url": SYMBOL_EXT, "valueString": self.symbol}),
            json!({"url": NUMBER_EXT, "valueString": self.number}),
            json!({"url": SUBNUMBER_EXT, "valueString": self.branch}),
        ];
        if self.symbol.is_empty() {
            ext.remove(0);
        }
        if let Some((code, display)) = self.limit_category {
            ext.push(json!({"url": LIMIT_CATEGORY_EXT, "valueCoding": {"system": LIMIT_CATEGORY_SYSTEM, "code": code, "display": display}}));
        }
        let mut period = json!({"start": self.start.to_string()});
        if let Some(e) = self.end {
            period["end"] = json!(e.to_string());
        }
        json!({
            "resourceType": "Coverage",
            "id": id,
            "extension": ext,
            "identifier": [{"system": INSURANCE_MEMBER_SYSTEM, "value": self.member_key()}],
            "status": if self.cancelled { "cancelled" } else { "active" },
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EHCPOL"}]},
            "subscriberId": self.number,
            "beneficiary": {"reference": format!("Patient/{person}")},
            "dependent": self.branch,
            "relationship": {"coding": [
                {"system": INSURED_CATEGORY_SYSTEM, "code": cat_code, "display": cat_display},
                {"system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship", "code": hl7}
            ]},
            "period": period,
            "payor": [{"identifier": {"system": INSURER_SYSTEM, "value": self.insurer_number}}],
            "costToBeneficiary": [{
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-copay-type", "code": "copaypct"}]},
                "valueQuantity": {"value": self.copay_percent, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}
            }]
        })
    }
}

/// `name -> value` of a Parameters resource's primitive parts.
pub fn parameters_map(body: &Value) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for p in body
        .get("parameter")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(name) = p.get("name").and_then(Value::as_str) else {
            continue;
        };
        let value = p.as_object().and_then(|o| {
            o.iter()
                .find(|(k, _)| k.starts_with("value"))
                .map(|(_, v)| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
        });
        if let Some(v) = value {
            map.insert(name.to_string(), v);
        }
    }
    map
}

/// Today in Japan (JST, UTC+9).
pub fn today_jst() -> NaiveDate {
    (chrono::Utc::now() + chrono::Duration::hours(9)).date_naive()
}

/// Why a registration was not written.
#[derive(Debug)]
pub enum RegisterError {
    /// Input fields rejected (400).
    Invalid(Vec<FieldError>),
    /// The policy denied a write (403); audited by the caller.
    Denied {
        patient: Option<String>,
        resources: Vec<String>,
        reason: String,
    },
    /// Storage failure.
    Store(FhirError),
}

impl From<FhirError> for RegisterError {
    fn from(e: FhirError) -> Self {
        RegisterError::Store(e)
    }
}

/// Result of one registration.
#[derive(Debug, Clone)]
pub struct Registered {
    pub patient: StoredResource,
    pub coverage: StoredResource,
    pub coverage_created: bool,
    pub patient_created: bool,
}

/// What [`register_in`] needs: who registers, the policy, optionally the validator.
pub struct Registrar<'a> {
    pub principal: &'a Principal,
    pub policy: &'a Policy,
    pub validator: Option<&'a dyn Validate>,
    pub request_id: String,
    pub today: NaiveDate,
}

/// Content equality ignoring `meta` (so an unchanged re-registration writes nothing).
fn same_content(stored: &StoredResource, new: &Value) -> bool {
    let Some(old) = stored.resource.as_ref() else {
        return false;
    };
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("meta");
        }
        v
    };
    strip(old) == strip(new)
}

impl Registrar<'_> {
    fn decide(
        &self,
        op: Operation,
        rt: &str,
        patient: &str,
        author: Option<String>,
        target: String,
    ) -> Result<(), RegisterError> {
        let mut req = AccessRequest::new(op, rt, Purpose::Insurer);
        req.patient = Some(patient.to_string());
        req.author_org = author;
        match self.policy.decide(self.principal, &req) {
            Decision::Permit(_) => Ok(()),
            Decision::Deny(d) => Err(RegisterError::Denied {
                patient: Some(patient.to_string()),
                resources: vec![target],
                reason: d.reason,
            }),
        }
    }

    fn gate(&self, resource: &Value) -> Result<(), RegisterError> {
        if let Some(v) = self.validator {
            gate(v, resource)?;
        }
        Ok(())
    }

    /// Registers one person + coverage inside `tx`, with one audit record (purpose
    /// insurer). Writes nothing on error; the caller commits.
    pub fn register_in(
        &self,
        tx: &mut dyn Transaction,
        reg: &Registration,
    ) -> Result<Registered, RegisterError> {
        let own = self.principal.org.as_str();
        if reg.insurer_number != own {
            return Err(RegisterError::Denied {
                patient: None,
                resources: vec!["Coverage".into()],
                reason: format!(
                    "organisation {own} may register coverage only under its own 保険者番号, not {}",
                    reg.insurer_number
                ),
            });
        }
        let wctx = WriteContext {
            org: Some(own.to_string()),
            user: self.principal.user.clone(),
        };
        let pid = person_id(&reg.linkage_id);
        let new_patient = reg.patient(&pid);
        let current = tx.read("Patient", &pid)?.filter(|p| !p.deleted);
        let mut written = Vec::new();
        let (patient, patient_created) = match current {
            None => {
                self.decide(Operation::Create, "Patient", &pid, None, "Patient".into())?;
                self.gate(&new_patient)?;
                let s = tx.update("Patient", &pid, new_patient, None, &wctx)?.0;
                written.push(s.reference());
                (s, true)
            }
            Some(cur) => {
                let ours = cur.author_org.as_deref() == Some(own);
                let takeover = !ours && !reg.is_ended(self.today);
                if (ours && !same_content(&cur, &new_patient)) || takeover {
                    // Taking over the person record is authorised as a create: the
                    // linkage id shows the person is this insurer's member.
                    let (op, author) = if ours {
                        (Operation::Update, cur.author_org.clone())
                    } else {
                        (Operation::Create, None)
                    };
                    self.decide(op, "Patient", &pid, author, cur.reference())?;
                    self.gate(&new_patient)?;
                    let s = tx.update("Patient", &pid, new_patient, None, &wctx)?.0;
                    written.push(s.reference());
                    (s, false)
                } else {
                    (cur, false)
                }
            }
        };
        let cid = coverage_id(&reg.member_key());
        let new_cov = reg.coverage(&cid, &pid);
        let cur_cov = tx.read("Coverage", &cid)?.filter(|c| !c.deleted);
        let (coverage, coverage_created) = match cur_cov {
            Some(c) if same_content(&c, &new_cov) && c.author_org.as_deref() == Some(own) => {
                (c, false)
            }
            Some(c) => {
                self.decide(
                    Operation::Update,
                    "Coverage",
                    &pid,
                    c.author_org.clone(),
                    c.reference(),
                )?;
                // moving a coverage to another person needs the right to write for them too
                self.gate(&new_cov)?;
                let s = tx.update("Coverage", &cid, new_cov, None, &wctx)?.0;
                written.push(s.reference());
                (s, false)
            }
            None => {
                self.decide(Operation::Create, "Coverage", &pid, None, "Coverage".into())?;
                self.gate(&new_cov)?;
                let s = tx.update("Coverage", &cid, new_cov, None, &wctx)?.0;
                written.push(s.reference());
                (s, true)
            }
        };
        let resources = if written.is_empty() {
            vec![patient.reference(), coverage.reference()]
        } else {
            written
        };
        let rec = AuditRecord::new(
            self.principal,
            Purpose::Insurer,
            "register-coverage",
            self.request_id.clone(),
        )
        .with_patient(Some(pid))
        .with_resources(resources)
        .success(if coverage_created { 201 } else { 200 });
        tx.audit_append(&[rec.to_json()])?;
        Ok(Registered {
            patient,
            coverage,
            coverage_created,
            patient_created,
        })
    }
}

/// Whether a principal may register coverage at all (insurer staff of an insurer).
pub fn check_registrar(p: &Principal) -> Result<(), String> {
    if p.role != Role::InsurerStaff || p.org_kind != OrgKind::Insurer {
        return Err(format!(
            "only insurer staff may register coverage (caller is {} at a {})",
            p.role, p.org_kind
        ));
    }
    Ok(())
}

pub fn routes() -> Router<AppState> {
    Router::new().route("/fhir/$register-coverage", post(register_coverage))
}

/// `POST /fhir/$register-coverage`: one registration (Parameters, fields as in
/// [`FIELDS`]). Answers 201 (new coverage) or 200 with a Parameters holding the
/// `coverage` and `patient` resources.
async fn register_coverage(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    let engine = &state.engine;
    if let Err(reason) = check_registrar(&ctx.principal) {
        return Err(engine
            .deny(
                &ctx,
                Operation::Create,
                None,
                vec!["Coverage".into()],
                reason,
            )
            .await
            .into());
    }
    let reg = Registration::from_parameters(&body).map_err(|errs| {
        FhirError::with_issues(400, errs.iter().flat_map(|e| e.to_fhir().issues).collect())
    })?;
    if reg.insurer_number != ctx.principal.org {
        let reason = format!(
            "organisation {} may register coverage only under its own 保険者番号, not {}",
            ctx.principal.org, reg.insurer_number
        );
        return Err(engine
            .deny(
                &ctx,
                Operation::Create,
                None,
                vec!["Coverage".into()],
                reason,
            )
            .await
            .into());
    }
    let (store, policy, validator) = (
        engine.store.clone(),
        engine.policy.clone(),
        engine.validator.clone(),
    );
    let c2 = ctx.clone();
    let out = blocking(move || {
        let registrar = Registrar {
            principal: &c2.principal,
            policy: &policy,
            validator: Some(&*validator),
            request_id: c2.request_id.clone(),
            today: today_jst(),
        };
        let mut tx = store.begin()?;
        match registrar.register_in(&mut *tx, &reg) {
            Ok(r) => {
                tx.commit()?;
                Ok(Ok(r))
            }
            Err(RegisterError::Store(e)) => Err(e),
            Err(e) => Ok(Err(e)),
        }
    })
    .await?;
    match out {
        Ok(r) => {
            let named = |name: &str, r: Option<Value>| {
                tsunagi_fhir::resource_parameter(name, r.unwrap_or(Value::Null))
            };
            let body = tsunagi_fhir::parameters(vec![
                named("coverage", r.coverage.resource),
                named("patient", r.patient.resource),
                json!({"name": "coverageCreated", "valueBoolean": r.coverage_created}),
                json!({"name": "patientCreated", "valueBoolean": r.patient_created}),
            ]);
            let status = if r.coverage_created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(fhir_json(status, &body))
        }
        Err(RegisterError::Denied {
            patient,
            resources,
            reason,
        }) => Err(engine
            .deny(&ctx, Operation::Create, patient, resources, reason)
            .await
            .into()),
        Err(RegisterError::Invalid(errs)) => Err(FhirError::with_issues(
            400,
            errs.iter().flat_map(|e| e.to_fhir().issues).collect(),
        )
        .into()),
        Err(RegisterError::Store(e)) => Err(e.into()),
    }
}

/// The search for every Coverage of a person (any insurer).
pub fn person_coverage_query(person_id: &str) -> FhirResult<SearchQuery> {
    query::parse(
        "Coverage",
        &[
            ("beneficiary".to_string(), format!("Patient/{person_id}")),
            ("_count".to_string(), "100".to_string()),
        ],
    )
}

/// The coverages in force on `on` (status active, period containing the day).
pub fn keep_current(found: Vec<StoredResource>, on: NaiveDate) -> Vec<Value> {
    found
        .into_iter()
        .filter_map(|s| s.resource)
        .filter(|c| coverage_state(c, on) == CoverageState::Current)
        .collect()
}

/// Current coverage of a person on a date, read as the platform (no scope):
/// callers decide access and audit. `$reception` reads the same through the engine.
pub fn current_coverage(
    store: &dyn Store,
    person_id: &str,
    on: NaiveDate,
) -> FhirResult<Vec<Value>> {
    let found = store.search(&person_coverage_query(person_id)?, &Scope::Unrestricted)?;
    Ok(keep_current(found.matches, on))
}

/// 保険種別コード system of the e-prescription IG; code `8` is 公費 (public expense).
pub const INSURANCE_TYPE_SYSTEM: &str = "urn:oid:1.2.392.100495.20.2.61";

/// Whether a Coverage is a public-expense subsidy (公費負担医療 or 地方単独医療費助成,
/// type `8` as `JP_Coverage_ePrescriptionData_publicPayment` models it), as
/// registered by municipalities through PMH.
pub fn is_public_expense(c: &Value) -> bool {
    CoverageFacts::of(c).is_public_expense()
}

/// The public-expense Coverage of a person in force on `on`, as stored (the
/// texts go into answers unparsed), read as the platform (callers decide
/// access and audit), in a stable order (by id).
pub fn current_subsidies(
    store: &dyn Store,
    person_id: &str,
    on: NaiveDate,
) -> FhirResult<Vec<StoredText>> {
    let found = store.search_text(&person_coverage_query(person_id)?, &Scope::Unrestricted)?;
    let mut subsidies: Vec<StoredText> = found
        .matches
        .into_iter()
        .filter(|s| {
            s.text
                .as_deref()
                .and_then(CoverageFacts::parse)
                .is_some_and(|c| c.is_public_expense() && c.state(on) == CoverageState::Current)
        })
        .collect();
    subsidies.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(subsidies)
}

/// Where a Coverage stands on a date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoverageState {
    Current,
    Cancelled,
    NotStarted(String),
    Ended(String),
}

pub fn coverage_state(c: &Value, on: NaiveDate) -> CoverageState {
    CoverageFacts::of(c).state(on)
}

/// What eligibility decisions read of a Coverage: status, type, period and
/// beneficiary, taken from a stored text without building the rest of the
/// resource (an answer with subsidies judges a dozen Coverage texts), or from
/// a parsed body. A Coverage whose members have other JSON types than FHIR
/// gives them has no facts: it is never current and never a subsidy.
#[derive(Debug, Default, Deserialize)]
pub struct CoverageFacts<'a> {
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow, default)]
    kind: Option<Codeable<'a>>,
    #[serde(borrow, default)]
    period: Option<Period<'a>>,
    #[serde(borrow, default)]
    beneficiary: Option<Reference<'a>>,
}

#[derive(Debug, Default, Deserialize)]
struct Codeable<'a> {
    #[serde(borrow, default)]
    coding: Vec<Coding<'a>>,
}

#[derive(Debug, Default, Deserialize)]
struct Coding<'a> {
    #[serde(borrow, default)]
    system: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
struct Period<'a> {
    #[serde(borrow, default)]
    start: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    end: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
struct Reference<'a> {
    #[serde(borrow, default)]
    reference: Option<Cow<'a, str>>,
}

impl<'a> CoverageFacts<'a> {
    /// The facts of a stored text; None when it has none (see above).
    pub fn parse(text: &'a str) -> Option<CoverageFacts<'a>> {
        serde_json::from_str(text).ok()
    }

    /// The facts of a parsed Coverage (none, see above, when malformed).
    pub fn of(c: &'a Value) -> CoverageFacts<'a> {
        CoverageFacts::deserialize(c).unwrap_or_default()
    }

    /// The Patient id `beneficiary` refers to.
    pub fn beneficiary(&self) -> Option<&str> {
        self.beneficiary
            .as_ref()?
            .reference
            .as_deref()?
            .strip_prefix("Patient/")
    }

    /// `period.end`, as written.
    pub fn end(&self) -> Option<&str> {
        self.period.as_ref()?.end.as_deref()
    }

    /// See [`is_public_expense`].
    pub fn is_public_expense(&self) -> bool {
        self.kind.as_ref().is_some_and(|k| {
            k.coding.iter().any(|x| {
                x.system.as_deref() == Some(INSURANCE_TYPE_SYSTEM) && x.code.as_deref() == Some("8")
            })
        })
    }

    /// Where the Coverage stands on `on`.
    pub fn state(&self, on: NaiveDate) -> CoverageState {
        if self.status.as_deref() != Some("active") {
            return CoverageState::Cancelled;
        }
        let day = |s: Option<&Cow<'a, str>>| {
            s.map(|s| {
                (
                    s.to_string(),
                    s.get(..10)
                        .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok()),
                )
            })
        };
        let period = self.period.as_ref();
        if let Some((s, Some(d))) = day(period.and_then(|p| p.start.as_ref()))
            && d > on
        {
            return CoverageState::NotStarted(s);
        }
        if let Some((s, Some(d))) = day(period.and_then(|p| p.end.as_ref()))
            && d < on
        {
            return CoverageState::Ended(s);
        }
        CoverageState::Current
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn member_key_folds_full_width_ascii_only() {
        assert_eq!(
            super::member_key("06130017", "１２３４５", "６７８９０", "０１"),
            "06130017:12345:67890:01"
        );
        // kanji in a 記号 stay; the ideographic space becomes a space
        assert_eq!(
            super::member_key("06130017", "東京　Ａ", "1", "00"),
            "06130017:東京 A:1:00"
        );
    }

    use super::*;

    fn fields(over: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = [
            ("linkageId", "L1"),
            ("insurerNumber", "06130017"),
            ("symbol", "12-34"),
            ("number", "5678"),
            ("branch", "00"),
            ("relationship", "self"),
            ("copayPercent", "30"),
            ("start", "2024-04-01"),
            ("familyName", "山田"),
            ("givenName", "太郎"),
            ("familyNameKana", "ヤマダ"),
            ("givenNameKana", "タロウ"),
            ("gender", "male"),
            ("birthDate", "1980-01-02"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in over {
            m.insert(k.to_string(), v.to_string());
        }
        m
    }

    #[test]
    fn parses_and_rejects() {
        let m = fields(&[]);
        let r = Registration::from_fields(&|f| m.get(f).cloned());
        assert!(r.is_ok(), "{r:?}");
        let m = fields(&[
            ("insurerNumber", "06130010"),
            ("branch", "0"),
            ("limitCategory", "カ"),
        ]);
        let errs = Registration::from_fields(&|f| m.get(f).cloned()).unwrap_err();
        let els: Vec<&str> = errs.iter().map(|e| e.element.as_str()).collect();
        assert!(
            els.contains(&"Coverage.payor[0].identifier.value"),
            "{errs:?}"
        );
        assert!(els.contains(&"Coverage.dependent"));
        assert!(els.contains(&"Coverage.extension:highCostLimitCategory.valueCoding"));
        assert_eq!(LimitCategory::parse("現役並みⅢ").unwrap().0, "gen3");
        assert_eq!(LimitCategory::parse("ア").unwrap().0, "a");
    }

    #[test]
    fn ids_are_stable_and_opaque() {
        assert_eq!(person_id("x"), person_id("x"));
        assert_ne!(person_id("x"), person_id("y"));
        assert!(!person_id("secret-link").contains("secret"));
        assert!(coverage_id("a:b:c:00").len() <= 64);
    }

    #[test]
    fn states() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        let c = json!({"status": "active", "period": {"start": "2024-04-01", "end": "2025-03-31"}});
        assert_eq!(coverage_state(&c, d("2024-05-01")), CoverageState::Current);
        assert_eq!(
            coverage_state(&c, d("2025-04-01")),
            CoverageState::Ended("2025-03-31".into())
        );
        assert!(matches!(
            coverage_state(&c, d("2024-01-01")),
            CoverageState::NotStarted(_)
        ));
    }

    #[test]
    fn facts_of_a_text_are_the_facts_of_its_value() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        let c = json!({"resourceType": "Coverage", "status": "active",
            "extension": [{"url": "x", "valueString": "a \" b"}],
            "type": {"coding": [{"system": "other", "code": "8"}, {"system": INSURANCE_TYPE_SYSTEM, "code": "8"}]},
            "beneficiary": {"reference": "Patient/pé"},
            "period": {"start": "2024-04-01", "end": "2025-03-31T00:00:00+09:00"}});
        // an escaped character, as another writer may store it
        let text = c.to_string().replace("pé", "p\\u00e9");
        assert!(text.contains(r"Patient/p\u00e9"));
        let (t, v) = (CoverageFacts::parse(&text).unwrap(), CoverageFacts::of(&c));
        for f in [&t, &v] {
            assert!(f.is_public_expense());
            assert_eq!(f.beneficiary(), Some("pé"));
            assert_eq!(f.end(), Some("2025-03-31T00:00:00+09:00"));
            assert_eq!(f.state(d("2024-05-01")), CoverageState::Current);
            assert_eq!(
                f.state(d("2025-04-01")),
                CoverageState::Ended("2025-03-31T00:00:00+09:00".into())
            );
            assert_eq!(
                f.state(d("2024-03-31")),
                CoverageState::NotStarted("2024-04-01".into())
            );
        }
        // members of the wrong JSON type: no facts, so never current, never a subsidy
        let bad = json!({"status": "active", "period": {"start": 20240401}, "type": {"coding": [{"system": INSURANCE_TYPE_SYSTEM, "code": "8"}]}});
        assert!(CoverageFacts::parse(&bad.to_string()).is_none());
        assert_eq!(
            coverage_state(&bad, d("2024-05-01")),
            CoverageState::Cancelled
        );
        assert!(!is_public_expense(&bad));
        assert!(CoverageFacts::parse("\"active\"").is_none());
        let cancelled = json!({"status": "cancelled"}).to_string();
        assert_eq!(
            CoverageFacts::parse(&cancelled)
                .unwrap()
                .state(d("2024-05-01")),
            CoverageState::Cancelled
        );
    }

    #[test]
    fn public_expense_is_type_8_of_the_insurance_type_system() {
        let sub = json!({"type": {"coding": [{"system": INSURANCE_TYPE_SYSTEM, "code": "8"}]}});
        assert!(is_public_expense(&sub));
        let other = json!({"type": {"coding": [{"system": INSURANCE_TYPE_SYSTEM, "code": "1"}]}});
        assert!(!is_public_expense(&other));
        let v3 = json!({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "8"}]}});
        assert!(!is_public_expense(&v3));
    }
}
