//! Recipients (受給者) of subsidy programmes, registered by municipalities.
//!
//! A recipient is a FHIR `Coverage` of the public-expense type, modelled as the
//! e-prescription IG's `JP_Coverage_ePrescriptionData_publicPayment`: type 8
//! (公費) in `urn:oid:1.2.392.100495.20.2.61`, `subscriberId` = 受給者番号, the payer
//! (`payor.identifier`, 公費負担者番号 in `urn:oid:1.2.392.100495.20.3.71`), the
//! validity period and the copayment rate (`costToBeneficiary`, copaypct). The
//! monthly ceiling, income category, paper-certificate wish and programme code are
//! PMH extensions. The id is derived from 公費負担者番号 + 受給者番号, so a
//! re-registration updates the same resource (a new version) and replaying a file
//! is harmless. The municipality is the author organisation: it alone may change
//! its recipients, and it sees exactly those ([`crate::access`]).
//!
//! Rows come from `POST /pmh/recipients` (JSON) or a file (CSV with a header row,
//! or NDJSON; `POST /pmh/recipient-files` and `tsunagi pmh import`):
//! - **incremental**: each row adds/changes (`action` add, change, or empty) or
//!   ends (`action` end, with `end`) one recipient;
//! - **full** (one programme): the file is the municipality's whole set for the
//!   programme; every current recipient missing from it ends the day before `asOf`.
//!
//! Rows are applied in batches, one transaction each, with the engine's parts
//! ([`WriteWork`]'s validation gate and the one policy; an audit record per row,
//! appended with the batch in the same transaction). A batch that fails in the store is rolled back and replayed
//! one row per transaction, so a row is never half-applied and one bad row never
//! stops the file. A person who cannot be matched exactly goes to the review list
//! ([`crate::matching`]); the row is then not applied.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::{Duration, NaiveDate};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tsunagi_fhir::extension::extension;
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_policy::audit::{AuditRecord, Outcome};
use tsunagi_policy::ids::{validate_public_payer_number, validate_recipient_number};
use tsunagi_policy::policy::{AccessRequest, Decision, Operation};
use tsunagi_server::engine::audit_record;
use tsunagi_server::engine::{WriteWork, blocking};
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::validate::{Validate, gate};
use tsunagi_server::{AppState, Ctx};
use tsunagi_store::{PreparedResource, Scope, Store, StoredResource, Transaction, WriteContext};

use crate::catalogue::{Catalogue, Kind, Programme};
use crate::matching::{Match, Matcher, PersonData};
use crate::{EXT_BASE, PMH_KIND_SYSTEM, Shared};

pub use tsunagi_eligibility::coverage::{INSURANCE_TYPE_SYSTEM, is_public_expense};
/// 公費負担者番号 system.
pub const PUBLIC_PAYER_SYSTEM: &str = "urn:oid:1.2.392.100495.20.3.71";
pub const PUBLIC_PAYMENT_PROFILE: &str = "http://jpfhir.jp/fhir/ePrescription/StructureDefinition/JP_Coverage_ePrescriptionData_publicPayment";
/// `公費負担者番号:受給者番号` identifier of a recipient.
pub const RECIPIENT_SYSTEM: &str = "https://tsunagi.dev/fhir/NamingSystem/pmh-recipient";
/// `municipality:programme:bucket` identifier: a full file enumerates its set by it.
pub const SET_SYSTEM: &str = "https://tsunagi.dev/fhir/NamingSystem/pmh-recipient-set";

/// Columns of a recipient row (CSV header names, JSON keys).
pub const FIELDS: &[&str] = &[
    "action",
    "payerNumber",
    "recipientNumber",
    "programme",
    "familyName",
    "givenName",
    "familyKana",
    "givenKana",
    "birthDate",
    "sex",
    "address",
    "start",
    "end",
    "monthlyCeiling",
    "incomeCategory",
    "paperCertificate",
];

pub fn ext(name: &str) -> String {
    format!("{EXT_BASE}{name}")
}

/// What a row asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Upsert,
    End,
}

/// One validated row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub action: Action,
    /// 公費負担者番号 (8 digits, check digit validated).
    pub payer_number: String,
    /// 受給者番号 (7 digits, check digit validated).
    pub recipient_number: String,
    pub programme: String,
    pub person: Option<PersonData>,
    pub start: Option<NaiveDate>,
    pub end: Option<NaiveDate>,
    pub monthly_ceiling: Option<u64>,
    /// 所得区分.
    pub income_category: Option<String>,
    /// Whether the person still wants a paper 受給者証.
    pub paper_certificate: bool,
}

/// A numbered input row (columns → values) or why it could not be read.
pub type RawRow = (u64, Result<BTreeMap<String, String>, RowError>);

/// A row's fault, naming the column.
#[derive(Debug, Clone, PartialEq)]
pub struct RowError {
    pub field: String,
    pub reason: String,
}

impl RowError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        RowError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

fn date(field: &str, s: &str) -> Result<NaiveDate, RowError> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| RowError::new(field, format!("'{s}' is not a date (YYYY-MM-DD)")))
}

impl Row {
    /// Validates a row against the catalogue, for the importing municipality.
    pub fn parse(
        m: &BTreeMap<String, String>,
        catalogue: &Catalogue,
        municipality: &str,
    ) -> Result<Row, RowError> {
        if let Some(k) = m.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(RowError::new(k, format!("unknown column '{k}'")));
        }
        let get = |k: &str| m.get(k).map(|s| s.trim()).unwrap_or("");
        let req = |k: &str| {
            let v = get(k);
            if v.is_empty() {
                Err(RowError::new(k, format!("{k} is required")))
            } else {
                Ok(v.to_string())
            }
        };
        let action = match get("action") {
            "" | "add" | "change" => Action::Upsert,
            "end" => Action::End,
            other => {
                return Err(RowError::new(
                    "action",
                    format!("action must be add, change or end, not '{other}'"),
                ));
            }
        };
        let payer_number = req("payerNumber")?;
        validate_public_payer_number(&payer_number)
            .map_err(|e| RowError::new("payerNumber", e.to_string()))?;
        let recipient_number = req("recipientNumber")?;
        validate_recipient_number(&recipient_number)
            .map_err(|e| RowError::new("recipientNumber", e.to_string()))?;
        let programme = req("programme")?;
        let p = catalogue.get(&programme).ok_or_else(|| {
            RowError::new(
                "programme",
                format!("no programme '{programme}' in the catalogue"),
            )
        })?;
        check_programme(&p, municipality).map_err(|r| RowError::new("programme", r))?;
        if payer_number[..2] != p.law_number {
            return Err(RowError::new(
                "payerNumber",
                format!(
                    "公費負担者番号 {payer_number} starts with 法別番号 {}, but programme {} has {}",
                    &payer_number[..2],
                    p.code,
                    p.law_number
                ),
            ));
        }
        let end = match get("end") {
            "" => None,
            s => Some(date("end", s)?),
        };
        if action == Action::End {
            if end.is_none() {
                return Err(RowError::new("end", "an end row gives the end date"));
            }
            return Ok(Row {
                action,
                payer_number,
                recipient_number,
                programme,
                person: None,
                start: None,
                end,
                monthly_ceiling: None,
                income_category: None,
                paper_certificate: false,
            });
        }
        let start = date("start", &req("start")?)?;
        if let Some(e) = end
            && e < start
        {
            return Err(RowError::new("end", "end is before start"));
        }
        let gender = match get("sex") {
            "male" | "M" | "1" => "male",
            "female" | "F" | "2" => "female",
            "other" => "other",
            "unknown" | "" => "unknown",
            other => {
                return Err(RowError::new(
                    "sex",
                    format!("sex must be male, female, other or unknown (or 1/2), not '{other}'"),
                ));
            }
        };
        let person = PersonData {
            family_name: get("familyName").to_string(),
            given_name: get("givenName").to_string(),
            family_kana: req("familyKana")?,
            given_kana: get("givenKana").to_string(),
            birth_date: date("birthDate", &req("birthDate")?)?,
            gender: gender.to_string(),
            address: get("address").to_string(),
        };
        let monthly_ceiling = match get("monthlyCeiling") {
            "" => None,
            s => Some(s.parse::<u64>().map_err(|_| {
                RowError::new("monthlyCeiling", format!("'{s}' is not an amount in yen"))
            })?),
        };
        let paper_certificate = match get("paperCertificate") {
            "" | "false" | "0" | "no" => false,
            "true" | "1" | "yes" => true,
            other => {
                return Err(RowError::new(
                    "paperCertificate",
                    format!("paperCertificate must be true or false, not '{other}'"),
                ));
            }
        };
        Ok(Row {
            action,
            payer_number,
            recipient_number,
            programme,
            person: Some(person),
            start: Some(start),
            end,
            monthly_ceiling,
            income_category: Some(get("incomeCategory").to_string()).filter(|s| !s.is_empty()),
            paper_certificate,
        })
    }

    pub fn key(&self) -> String {
        format!("{}:{}", self.payer_number, self.recipient_number)
    }

    /// The Coverage of this row for `patient`.
    pub fn coverage(&self, p: &Programme, municipality: &str, patient: &str) -> Value {
        let mut period = json!({});
        if let Some(s) = self.start {
            period["start"] = json!(s.to_string());
        }
        if let Some(e) = self.end {
            period["end"] = json!(e.to_string());
        }
        let mut exts = vec![
            json!({"url": ext("programme"), "valueString": p.code}),
            json!({"url": ext("municipality"), "valueString": municipality}),
            json!({"url": ext("ceiling-management"), "valueBoolean": p.ceiling_management}),
            json!({"url": ext("paper-certificate"), "valueBoolean": self.paper_certificate}),
        ];
        if let Some(c) = self.monthly_ceiling.or(p.monthly_ceiling_yen) {
            exts.push(json!({"url": ext("monthly-ceiling"), "valueMoney": {"value": c, "currency": "JPY"}}));
        }
        if let Some(i) = &self.income_category {
            exts.push(json!({"url": ext("income-category"), "valueString": i}));
        }
        json!({
            "resourceType": "Coverage",
            "id": recipient_id(&self.payer_number, &self.recipient_number),
            "meta": {"profile": [PUBLIC_PAYMENT_PROFILE]},
            "extension": exts,
            "identifier": [
                {"system": RECIPIENT_SYSTEM, "value": self.key()},
                {"system": SET_SYSTEM, "value": set_key(municipality, &p.code, &self.recipient_number)}
            ],
            "status": "active",
            "type": {"coding": [{"system": INSURANCE_TYPE_SYSTEM, "code": "8", "display": "公費"}]},
            "subscriberId": self.recipient_number,
            "beneficiary": {"reference": format!("Patient/{patient}")},
            "period": period,
            "payor": [{"type": "Organization", "identifier": {"system": PUBLIC_PAYER_SYSTEM, "value": self.payer_number}, "display": p.name}],
            "costToBeneficiary": [{
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-copay-type", "code": "copaypct", "display": "負担率"}]},
                "valueQuantity": {"value": p.copay_rate_percent, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}
            }]
        })
    }
}

/// A municipality may register recipients of statutory programmes (it implements
/// them) and of its own municipal programmes, not of another's.
pub fn check_programme(p: &Programme, municipality: &str) -> Result<(), String> {
    if p.kind == Kind::Municipal && p.municipality.as_deref() != Some(municipality) {
        return Err(format!(
            "programme {} belongs to municipality {}, not {municipality}",
            p.code,
            p.municipality.as_deref().unwrap_or("?")
        ));
    }
    Ok(())
}

/// Stable, opaque id of a recipient's Coverage.
pub fn recipient_id(payer: &str, recipient: &str) -> String {
    let h = Sha256::digest(format!("pmh-recipient|{payer}|{recipient}").as_bytes());
    let hex: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("pmh-{hex}")
}

/// Set identifier value: one of 100 buckets of a municipality's programme.
pub fn set_key(municipality: &str, programme: &str, recipient: &str) -> String {
    format!(
        "{municipality}:{programme}:{}",
        &recipient[..2.min(recipient.len())]
    )
}

/// Reads a string extension of a PMH Coverage.
pub fn ext_str<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    extension(c, &ext(name))?.get("valueString")?.as_str()
}

/// The monthly ceiling of a PMH Coverage, in yen.
pub fn ceiling_of(c: &Value) -> Option<u64> {
    extension(c, &ext("monthly-ceiling"))?
        .pointer("/valueMoney/value")?
        .as_u64()
}

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
    !stored.deleted && strip(old) == strip(new)
}

/// Import options.
#[derive(Debug, Clone)]
pub struct Options {
    pub full: bool,
    /// Programme of a full file (every row must be of it).
    pub programme: Option<String>,
    /// The day a full file describes; missing recipients end the day before.
    pub as_of: NaiveDate,
    /// Rows per transaction.
    pub batch: usize,
}

/// Counts and errors of an import.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub rows: u64,
    pub written: u64,
    pub unchanged: u64,
    pub ended: u64,
    /// Ended because missing from a full file.
    pub ended_missing: u64,
    pub review: u64,
    pub errors: Vec<(u64, RowError)>,
    /// Rows skipped by a resume.
    pub skipped: u64,
}

impl Report {
    pub fn to_json(&self, max_errors: usize) -> Value {
        json!({
            "rows": self.rows, "written": self.written, "unchanged": self.unchanged,
            "ended": self.ended, "endedMissing": self.ended_missing, "review": self.review,
            "failed": self.errors.len(), "skipped": self.skipped,
            "errors": self.errors.iter().take(max_errors).map(|(l, e)| json!({
                "row": l, "field": e.field, "element": format!("row[{l}].{}", e.field), "reason": e.reason
            })).collect::<Vec<_>>()
        })
    }
}

/// A Coverage to write: built by the writer, or prepared (and gated) by the
/// preparing thread.
enum Body {
    Value(Value),
    Prepared(PreparedResource),
}

enum Applied {
    Written,
    Unchanged,
    Ended,
    Review,
}

/// Validates a row of an import (the catalogue, the municipality, a full file's rules).
fn validate(
    catalogue: &Catalogue,
    municipality: &str,
    opts: &Options,
    m: &BTreeMap<String, String>,
) -> Result<Row, RowError> {
    let row = Row::parse(m, catalogue, municipality)?;
    if opts.full {
        if Some(&row.programme) != opts.programme.as_ref() {
            return Err(RowError::new(
                "programme",
                "every row of a full file is of the file's programme",
            ));
        }
        if row.action == Action::End {
            return Err(RowError::new(
                "action",
                "a full file lists current recipients; end rows belong in incremental files",
            ));
        }
    }
    Ok(row)
}

/// A validated row made ready outside the write transaction (by the preparing
/// thread of [`Importer::run`]): the person matched and, for a match, the
/// Coverage built, validated and prepared for the store (serialised, index
/// entries extracted), and compared with the recipient's stored version. The
/// writer still decides inside the transaction: an existing recipient keeps its
/// person, and the preparation is used only if the recipient is still as the
/// preparing thread saw it; otherwise the writer builds the row again itself.
pub struct Prepared {
    pub line: u64,
    pub row: Row,
    /// The recipient's Coverage id.
    id: String,
    /// The match of an upsert row's person (None for end rows).
    matched: Option<FhirResult<Match>>,
    /// The Coverage for the matched person, taken by the first attempt.
    coverage: Option<PreparedCoverage>,
}

/// A Coverage built for a matched person and prepared for the store. The body
/// itself stays with the preparing thread (freeing it on the writer cost the
/// writer 8 % of its time, measured).
struct PreparedCoverage {
    patient: String,
    /// The validation gate's verdict on the body.
    gate: FhirResult<()>,
    prepared: PreparedResource,
    /// The recipient as the preparing thread found it: None when absent (or
    /// deleted), else its version and whether the built body equals it.
    found: Option<(i64, bool)>,
}

impl Prepared {
    /// For a row already validated: matches its person and, for a match, builds
    /// its Coverage, runs the validation gate on it, prepares it for the store and
    /// compares it with the stored recipient.
    pub fn new(
        line: u64,
        row: Row,
        matcher: &mut Matcher,
        store: &dyn Store,
        validator: &dyn Validate,
        catalogue: &Catalogue,
        municipality: &str,
    ) -> Prepared {
        let id = recipient_id(&row.payer_number, &row.recipient_number);
        let matched = row.person.as_ref().map(|p| matcher.find(store, p));
        let coverage = match (&matched, catalogue.get(&row.programme)) {
            (Some(Ok(Match::Found(patient))), Some(programme)) => {
                let body = row.coverage(&programme, municipality, patient);
                let found = match store.read("Coverage", &id) {
                    Ok(Some(s)) if !s.deleted => Some(Some((s.version, same_content(&s, &body)))),
                    Ok(_) => Some(None),
                    Err(_) => None,
                };
                // a body the store refuses, or a failed read, is left to the writer
                match (found, PreparedResource::new("Coverage", &id, &body)) {
                    (Some(found), Ok(prepared)) => Some(PreparedCoverage {
                        patient: patient.clone(),
                        gate: gate(validator, &body).map(|_| ()),
                        prepared,
                        found,
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        Prepared {
            line,
            row,
            id,
            matched,
            coverage,
        }
    }
}

/// What the preparing thread hands the writer, in file order.
enum Item {
    Row(Box<Prepared>),
    Invalid(u64, RowError),
    /// A row before the resume point (its recipient id when valid, for a full file).
    Skipped(Option<String>),
}

/// Applies recipient rows for one municipality.
pub struct Importer<'a> {
    pub work: WriteWork,
    pub catalogue: &'a Catalogue,
    pub municipality: String,
    pub opts: Options,
    pub matcher: Matcher,
    /// Recipient ids seen (full files).
    pub seen: HashSet<String>,
    /// Audit records of the rows written in the open transaction.
    pending_audit: Vec<Value>,
    pub report: Report,
}

impl<'a> Importer<'a> {
    pub fn new(work: WriteWork, catalogue: &'a Catalogue, opts: Options) -> Self {
        Importer {
            municipality: work.ctx.principal.org.clone(),
            work,
            catalogue,
            opts,
            matcher: Matcher::default(),
            seen: HashSet::new(),
            pending_audit: Vec::new(),
            report: Report::default(),
        }
    }

    fn store(&self) -> Arc<dyn Store> {
        self.work.store.clone()
    }

    /// Applies one row inside `tx`.
    fn apply(&mut self, tx: &mut dyn Transaction, item: &mut Prepared) -> FhirResult<Applied> {
        let line = item.line;
        let row = &item.row;
        let id = item.id.clone();
        let current = tx.read("Coverage", &id)?.filter(|c| !c.deleted);
        if let Some(c) = &current
            && c.author_org.as_deref() != Some(self.municipality.as_str())
        {
            return Err(FhirError::forbidden(format!(
                "recipient {} is registered by another municipality",
                row.key()
            )));
        }
        let programme = self
            .catalogue
            .get(&row.programme)
            .ok_or_else(|| FhirError::invalid_element("programme", "unknown programme"))?;
        let (new, patient) = match row.action {
            Action::End => {
                let Some(c) = current.as_ref().and_then(|c| c.resource.clone()) else {
                    return Err(FhirError::not_found(format!(
                        "recipient {} is not registered; nothing to end",
                        row.key()
                    )));
                };
                let patient = c
                    .pointer("/beneficiary/reference")
                    .and_then(Value::as_str)
                    .and_then(|r| r.strip_prefix("Patient/"))
                    .unwrap_or("")
                    .to_string();
                let mut c = c;
                c["period"]["end"] = json!(row.end.map(|d| d.to_string()));
                (c, patient)
            }
            Action::Upsert => {
                let existing = current
                    .as_ref()
                    .and_then(|c| c.resource.as_ref())
                    .and_then(|c| c.pointer("/beneficiary/reference"))
                    .and_then(Value::as_str)
                    .and_then(|r| r.strip_prefix("Patient/"))
                    .map(str::to_string);
                let patient = match existing {
                    Some(p) => p,
                    None => {
                        let matched = match &item.matched {
                            Some(m) => m.clone()?,
                            None => {
                                let person =
                                    row.person.as_ref().expect("upsert rows name a person");
                                let store = self.store();
                                self.matcher.find(&*store, person)?
                            }
                        };
                        match matched {
                            Match::Found(p) => p,
                            other => {
                                self.send_to_review(tx, line, row, &other)?;
                                return Ok(Applied::Review);
                            }
                        }
                    }
                };
                // the preparation holds while the recipient is as it was seen
                let now = current.as_ref().map(|c| c.version);
                match item.coverage.take() {
                    Some(c) if c.patient == patient && c.found.map(|f| f.0) == now => {
                        if c.found.is_some_and(|f| f.1) {
                            return Ok(Applied::Unchanged);
                        }
                        c.gate?;
                        self.write(
                            tx,
                            &id,
                            Body::Prepared(c.prepared),
                            current.as_ref(),
                            patient,
                        )?;
                        return Ok(Applied::Written);
                    }
                    _ => (
                        row.coverage(&programme, &self.municipality, &patient),
                        patient,
                    ),
                }
            }
        };
        if let Some(c) = &current
            && same_content(c, &new)
        {
            return Ok(Applied::Unchanged);
        }
        self.write(tx, &id, Body::Value(new), current.as_ref(), patient)?;
        Ok(match row.action {
            Action::End => Applied::Ended,
            Action::Upsert => Applied::Written,
        })
    }

    /// The bulk write path: what [`WriteWork::update_in`] does (validation gate,
    /// the one policy, versioned write) without its second read, with the audit
    /// record queued to be appended with the batch, in the same transaction.
    /// A prepared body passed the gate on the preparing thread.
    fn write(
        &mut self,
        tx: &mut dyn Transaction,
        id: &str,
        new: Body,
        current: Option<&StoredResource>,
        patient: String,
    ) -> FhirResult<()> {
        let prepared = match new {
            Body::Prepared(p) => p,
            Body::Value(v) => {
                gate(&*self.work.validator, &v)?;
                PreparedResource::new("Coverage", id, &v)?
            }
        };
        let op = if current.is_some() {
            Operation::Update
        } else {
            Operation::Create
        };
        let mut req = AccessRequest::new(op, "Coverage", self.work.ctx.purpose).patient(&patient);
        req.author_org = current.and_then(|c| c.author_org.clone());
        if let Decision::Deny(d) = self.work.policy.decide(&self.work.ctx.principal, &req) {
            return Err(FhirError::forbidden(d.reason));
        }
        let wc = WriteContext {
            org: Some(self.work.ctx.principal.org.clone()),
            user: self.work.ctx.principal.user.clone(),
        };
        let w = tx.put(&prepared, None, &wc)?;
        let created = w.created;
        self.pending_audit.push(
            audit_record(
                &self.work.ctx,
                if created { Operation::Create } else { op },
                Some(patient),
                vec![format!("Coverage/{id}/_history/{}", w.version)],
                Outcome::Success,
                if created { 201 } else { 200 },
                None,
            )
            .to_json(),
        );
        Ok(())
    }

    /// Puts a row the matcher could not place on the review list.
    fn send_to_review(
        &mut self,
        tx: &mut dyn Transaction,
        line: u64,
        row: &Row,
        m: &Match,
    ) -> FhirResult<()> {
        let (reason, cands) = match m {
            Match::NotFound => ("not-found", vec![]),
            Match::Ambiguous(c) => ("ambiguous", c.clone()),
            Match::Found(_) => unreachable!(),
        };
        let person = row.person.as_ref().expect("upsert rows name a person");
        let rec = json!({
            "resourceType": "Basic",
            "code": {"coding": [{"system": PMH_KIND_SYSTEM, "code": "recipient-review"}]},
            "identifier": [{"system": ext("review-municipality"), "value": self.municipality},
                           {"system": RECIPIENT_SYSTEM, "value": row.key()}],
            "extension": [
                {"url": ext("review-status"), "valueCode": "open"},
                {"url": ext("review-reason"), "valueCode": reason},
                {"url": ext("review-row"), "valueString": serde_json::to_string(&row_to_map(row, person)).unwrap_or_default()},
                {"url": ext("review-candidates"), "valueString": cands.join(",")},
                {"url": ext("review-line"), "valueInteger": line}
            ]
        });
        let id = review_id(&self.municipality, &row.key());
        let wc = WriteContext {
            org: Some(self.municipality.clone()),
            user: self.work.ctx.principal.user.clone(),
        };
        let (s, _) = tx.update("Basic", &id, rec, None, &wc)?;
        let a = AuditRecord::new(
            &self.work.ctx.principal,
            self.work.ctx.purpose,
            "pmh-recipient-review",
            self.work.ctx.request_id.clone(),
        )
        .with_resources(vec![format!("Basic/{}/_history/{}", s.id, s.version)]);
        tx.audit_append(&[a.to_json()])?;
        Ok(())
    }

    fn count(&mut self, a: Applied) {
        match a {
            Applied::Written => self.report.written += 1,
            Applied::Unchanged => self.report.unchanged += 1,
            Applied::Ended => self.report.ended += 1,
            Applied::Review => self.report.review += 1,
        }
    }

    /// Applies a batch of prepared rows: one transaction, or, when it fails,
    /// one transaction per row so only the failing rows fail.
    pub fn apply_batch(&mut self, rows: &mut [Prepared]) -> FhirResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let store = self.store();
        let mut results = Vec::with_capacity(rows.len());
        self.pending_audit.clear();
        let batch_ok = (|| -> FhirResult<()> {
            let mut tx = store.begin()?;
            for item in rows.iter_mut() {
                results.push(self.apply(&mut *tx, item)?);
            }
            if !self.pending_audit.is_empty() {
                tx.audit_append(&self.pending_audit)?;
            }
            tx.commit()
        })();
        self.pending_audit.clear();
        match batch_ok {
            Ok(()) => {
                for a in results {
                    self.count(a);
                }
            }
            Err(_) => {
                for item in rows.iter_mut() {
                    let one = (|| -> FhirResult<Applied> {
                        let mut tx = store.begin()?;
                        let a = self.apply(&mut *tx, item)?;
                        if !self.pending_audit.is_empty() {
                            tx.audit_append(&self.pending_audit)?;
                        }
                        tx.commit()?;
                        Ok(a)
                    })();
                    self.pending_audit.clear();
                    match one {
                        Ok(a) => self.count(a),
                        Err(e) => self.report.errors.push((
                            item.line,
                            RowError::new(
                                e.issues
                                    .first()
                                    .and_then(|i| i.expression.clone())
                                    .as_deref()
                                    .unwrap_or("row"),
                                e.to_string(),
                            ),
                        )),
                    }
                }
            }
        }
        Ok(())
    }

    /// Feeds rows (line number, columns); `skip_until` lines are only remembered
    /// (resume). Calls `checkpoint(line)` after each committed batch.
    ///
    /// Two threads: one reads, validates and matches rows and builds their
    /// Coverage (reading persons through the store's readers), the calling
    /// thread writes batches in file order. Matching outside the write
    /// transaction changes nothing it decides: the writer reads each recipient
    /// inside the transaction, and a prepared match is used only for a
    /// recipient that does not exist yet.
    pub fn run(
        &mut self,
        rows: impl Iterator<Item = RawRow> + Send,
        skip_until: u64,
        mut checkpoint: impl FnMut(u64, &Report) -> FhirResult<()>,
    ) -> FhirResult<()> {
        let store = self.store();
        let validator = self.work.validator.clone();
        let catalogue = self.catalogue;
        let municipality = self.municipality.clone();
        let opts = self.opts.clone();
        let mut matcher = std::mem::take(&mut self.matcher);
        let mut batch: Vec<Prepared> = Vec::with_capacity(self.opts.batch);
        let mut last = 0;
        std::thread::scope(|scope| -> FhirResult<()> {
            let (send, recv) = std::sync::mpsc::sync_channel::<Vec<(u64, Item)>>(4);
            let preparer = scope.spawn(move || {
                let mut chunk = Vec::with_capacity(256);
                for (line, m) in rows {
                    let parsed = m.and_then(|m| validate(catalogue, &municipality, &opts, &m));
                    let item = match parsed {
                        Ok(r) if line <= skip_until => {
                            Item::Skipped(Some(recipient_id(&r.payer_number, &r.recipient_number)))
                        }
                        Err(_) if line <= skip_until => Item::Skipped(None),
                        Ok(r) => Item::Row(Box::new(Prepared::new(
                            line,
                            r,
                            &mut matcher,
                            &*store,
                            &*validator,
                            catalogue,
                            &municipality,
                        ))),
                        Err(e) => Item::Invalid(line, e),
                    };
                    chunk.push((line, item));
                    if chunk.len() >= 256 && send.send(std::mem::take(&mut chunk)).is_err() {
                        // the writer stopped (an error): stop reading
                        return matcher;
                    }
                }
                let _ = send.send(chunk);
                matcher
            });
            let written = (|| -> FhirResult<()> {
                for chunk in recv.iter() {
                    for (line, item) in chunk {
                        last = line;
                        match item {
                            Item::Skipped(id) => {
                                self.seen.extend(id);
                                self.report.skipped += 1;
                                continue;
                            }
                            Item::Invalid(line, e) => {
                                self.report.rows += 1;
                                self.report.errors.push((line, e));
                            }
                            Item::Row(p) => {
                                self.report.rows += 1;
                                self.seen.insert(p.id.clone());
                                batch.push(*p);
                            }
                        }
                        if batch.len() >= self.opts.batch {
                            self.apply_batch(&mut batch)?;
                            batch.clear();
                            checkpoint(line, &self.report)?;
                        }
                    }
                }
                Ok(())
            })();
            drop(recv);
            self.matcher = preparer
                .join()
                .map_err(|_| FhirError::internal("the row-preparing thread panicked"))?;
            written
        })?;
        self.apply_batch(&mut batch)?;
        checkpoint(last, &self.report)?;
        if self.opts.full {
            self.end_missing()?;
        }
        Ok(())
    }

    /// Ends every current recipient of the programme missing from a full file.
    fn end_missing(&mut self) -> FhirResult<()> {
        let programme = self.opts.programme.clone().unwrap_or_default();
        let end = self.opts.as_of - Duration::days(1);
        let store = self.store();
        for bucket in 0..100 {
            let value = format!("{}:{programme}:{bucket:02}", self.municipality);
            let mut offset = 0;
            let mut to_end: Vec<StoredResource> = Vec::new();
            loop {
                let q = query::parse(
                    "Coverage",
                    &[
                        ("identifier".into(), format!("{SET_SYSTEM}|{value}")),
                        ("_count".into(), "1000".into()),
                        ("_offset".into(), offset.to_string()),
                    ],
                )?;
                let found = store.search(&q, &Scope::Unrestricted)?;
                let n = found.matches.len();
                to_end.extend(found.matches.into_iter().filter(|s| {
                    !self.seen.contains(&s.id)
                        && s.author_org.as_deref() == Some(self.municipality.as_str())
                        && s.resource.as_ref().is_some_and(|c| {
                            c.pointer("/period/end")
                                .and_then(Value::as_str)
                                .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
                                .is_none_or(|d| d > end)
                        })
                }));
                if n < 1000 {
                    break;
                }
                offset += n;
            }
            for chunk in to_end.chunks(self.opts.batch.max(1)) {
                let mut tx = store.begin()?;
                for s in chunk {
                    let mut c = s.resource.clone().unwrap_or_default();
                    c["period"]["end"] = json!(end.to_string());
                    if let Err(d) = self.work.update_in(&mut *tx, "Coverage", &s.id, c, None)? {
                        return Err(FhirError::forbidden(d.reason));
                    }
                }
                tx.commit()?;
                self.report.ended_missing += chunk.len() as u64;
            }
        }
        Ok(())
    }
}

fn row_to_map(row: &Row, p: &PersonData) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("payerNumber".into(), row.payer_number.clone());
    m.insert("recipientNumber".into(), row.recipient_number.clone());
    m.insert("programme".into(), row.programme.clone());
    m.insert("familyName".into(), p.family_name.clone());
    m.insert("givenName".into(), p.given_name.clone());
    m.insert("familyKana".into(), p.family_kana.clone());
    m.insert("givenKana".into(), p.given_kana.clone());
    m.insert("birthDate".into(), p.birth_date.to_string());
    m.insert("sex".into(), p.gender.clone());
    m.insert("address".into(), p.address.clone());
    if let Some(s) = row.start {
        m.insert("start".into(), s.to_string());
    }
    if let Some(e) = row.end {
        m.insert("end".into(), e.to_string());
    }
    if let Some(c) = row.monthly_ceiling {
        m.insert("monthlyCeiling".into(), c.to_string());
    }
    if let Some(i) = &row.income_category {
        m.insert("incomeCategory".into(), i.clone());
    }
    m.insert("paperCertificate".into(), row.paper_certificate.to_string());
    m
}

fn review_id(municipality: &str, key: &str) -> String {
    let h = Sha256::digest(format!("pmh-review|{municipality}|{key}").as_bytes());
    let hex: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("pmh-review-{hex}")
}

// ------------------------------------------------------------------ files

/// Splits one CSV line (RFC 4180 quoting, no embedded newlines).
pub use tsunagi_eligibility::bulk::split_csv;

/// Rows of a CSV (header first) or NDJSON file, numbered from 1 (data rows).
pub fn read_rows(reader: impl BufRead, csv: bool) -> impl Iterator<Item = RawRow> {
    let mut header: Option<Vec<String>> = None;
    let mut n = 0u64;
    reader.lines().filter_map(move |line| {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                n += 1;
                return Some((
                    n,
                    Err(RowError::new("row", format!("unreadable line: {e}"))),
                ));
            }
        };
        let line = line.trim_end_matches('\r').trim_start_matches('\u{feff}');
        if line.trim().is_empty() {
            return None;
        }
        if csv && header.is_none() {
            header = Some(match split_csv(line) {
                Ok(h) => h.into_iter().map(|s| s.trim().to_string()).collect(),
                Err(_) => vec![],
            });
            return None;
        }
        n += 1;
        let row = if csv {
            let h = header.as_ref().expect("header read");
            split_csv(line)
                .map_err(|e| RowError::new("row", e))
                .and_then(|cols| {
                    if cols.len() != h.len() {
                        return Err(RowError::new(
                            "row",
                            format!("{} columns, the header has {}", cols.len(), h.len()),
                        ));
                    }
                    Ok(h.iter().cloned().zip(cols).collect())
                })
        } else {
            serde_json::from_str::<Value>(line)
                .map_err(|e| RowError::new("row", format!("not JSON: {e}")))
                .and_then(|v| object_to_map(&v))
        };
        Some((n, row))
    })
}

/// A flat JSON object as column → string.
pub fn object_to_map(v: &Value) -> Result<BTreeMap<String, String>, RowError> {
    let Some(o) = v.as_object() else {
        return Err(RowError::new("row", "a row is a JSON object"));
    };
    let mut m = BTreeMap::new();
    for (k, v) in o {
        let s = match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            _ => {
                return Err(RowError::new(
                    k,
                    format!("{k} must be a string, number or boolean"),
                ));
            }
        };
        m.insert(k.clone(), s);
    }
    Ok(m)
}

/// Files next to the input: `FILE.checkpoint` and `FILE.errors.csv`.
pub fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Imports a file (CLI): resumable with `resume`, errors to `FILE.errors.csv`.
pub fn import_file(
    work: WriteWork,
    catalogue: &Catalogue,
    path: &Path,
    opts: Options,
    resume: bool,
) -> anyhow::Result<Report> {
    use anyhow::Context;
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let csv = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let cp_path = sidecar(path, ".checkpoint");
    let skip = if resume {
        std::fs::read_to_string(&cp_path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    } else {
        0
    };
    let err_path = sidecar(path, ".errors.csv");
    let mut errf = std::fs::OpenOptions::new()
        .create(true)
        .append(resume)
        .write(true)
        .truncate(!resume)
        .open(&err_path)?;
    if !resume || skip == 0 {
        writeln!(errf, "row,field,element,reason")?;
    }
    let mut imp = Importer::new(work, catalogue, opts);
    let mut written_errors = 0usize;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    imp.run(read_rows(reader, csv), skip, |line, report| {
        for (l, e) in &report.errors[written_errors..] {
            let _ = writeln!(
                errf,
                "{l},{},row[{l}].{},\"{}\"",
                e.field,
                e.field,
                e.reason.replace('"', "\"\"")
            );
        }
        written_errors = report.errors.len();
        let _ = errf.flush();
        std::fs::write(&cp_path, line.to_string())
            .map_err(|e| FhirError::internal(format!("checkpoint: {e}")))
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(imp.report)
}

// ------------------------------------------------------------------ HTTP

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/pmh/recipients", post(register))
        .route("/pmh/recipient-files", post(upload))
        .route("/pmh/review", get(review_list))
        .route("/pmh/review/{id}/resolve", post(resolve))
}

fn options(shared: &Shared, q: &BTreeMap<String, String>) -> FhirResult<Options> {
    let full = match q.get("mode").map(String::as_str) {
        None | Some("incremental") => false,
        Some("full") => true,
        Some(o) => {
            return Err(FhirError::invalid_element(
                "mode",
                format!("mode is full or incremental, not '{o}'"),
            ));
        }
    };
    let programme = q.get("programme").cloned();
    if full && programme.is_none() {
        return Err(FhirError::invalid_element(
            "programme",
            "a full file names its programme",
        ));
    }
    let as_of = match q.get("asOf") {
        Some(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| FhirError::invalid_element("asOf", "asOf is a date (YYYY-MM-DD)"))?,
        None => shared.today(),
    };
    Ok(Options {
        full,
        programme,
        as_of,
        batch: 1000,
    })
}

async fn run_import(
    state: &AppState,
    shared: &Arc<Shared>,
    ctx: &Ctx,
    opts: Options,
    rows: Vec<RawRow>,
) -> ApiResult<Response> {
    crate::http::require_municipality(state, ctx, "recipient registration").await?;
    let work = WriteWork::new(&state.engine, ctx);
    let sh = shared.clone();
    let report = blocking(move || {
        let mut imp = Importer::new(work, &sh.catalogue, opts);
        imp.run(rows.into_iter(), 0, |_, _| Ok(()))?;
        Ok(imp.report)
    })
    .await?;
    let status = if report.errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    Ok(fhir_json(status, &report.to_json(1000)))
}

/// `POST /pmh/recipients?mode=incremental|full&programme=..` with
/// `{"recipients": [ {row}, ... ]}`.
async fn register(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Query(q): Query<BTreeMap<String, String>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    let opts = options(&shared, &q)?;
    let Some(items) = body.get("recipients").and_then(Value::as_array) else {
        return Err(FhirError::invalid_element("recipients", "recipients is a JSON array").into());
    };
    let rows = items
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64 + 1, object_to_map(v)))
        .collect();
    run_import(&state, &shared, &ctx, opts, rows).await
}

/// `POST /pmh/recipient-files?mode=..&programme=..&format=csv|ndjson` with the
/// file as the body.
async fn upload(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Query(q): Query<BTreeMap<String, String>>,
    Caller(ctx): Caller,
    body: Bytes,
) -> ApiResult<Response> {
    let opts = options(&shared, &q)?;
    let csv = q.get("format").map(String::as_str) != Some("ndjson");
    let rows: Vec<_> = read_rows(std::io::Cursor::new(body.to_vec()), csv).collect();
    run_import(&state, &shared, &ctx, opts, rows).await
}

/// `GET /pmh/review`: the municipality's open review items.
async fn review_list(State(state): State<AppState>, Caller(ctx): Caller) -> ApiResult<Response> {
    let m = crate::http::require_municipality(&state, &ctx, "recipient review list").await?;
    let store = state.engine.store.clone();
    let m2 = m.clone();
    let found = blocking(move || {
        let q = query::parse(
            "Basic",
            &[
                (
                    "identifier".into(),
                    format!("{}|{m2}", ext("review-municipality")),
                ),
                ("_count".into(), "1000".into()),
            ],
        )?;
        store.search(&q, &Scope::Unrestricted)
    })
    .await?;
    let items: Vec<Value> = found
        .matches
        .iter()
        .filter(|s| s.author_org.as_deref() == Some(m.as_str()))
        .filter_map(|s| s.resource.clone())
        .filter(|r| r.pointer("/extension/0/valueCode").and_then(Value::as_str) == Some("open"))
        .collect();
    crate::http::audit_action(
        &state,
        &ctx,
        "pmh-recipient-review-list",
        None,
        items
            .iter()
            .filter_map(|r| r.get("id").and_then(Value::as_str))
            .map(|i| format!("Basic/{i}"))
            .collect(),
    )
    .await?;
    Ok(fhir_json(
        StatusCode::OK,
        &tsunagi_fhir::bundle::searchset_of(items, None),
    ))
}

/// `POST /pmh/review/{id}/resolve` `{"patient": "Patient/x"}`: the municipality
/// decides who the person is; the row is applied and the item closed, in one
/// transaction.
async fn resolve(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    let m = crate::http::require_municipality(&state, &ctx, "recipient review").await?;
    let patient = crate::http::patient_id(&crate::http::required_str(&body, "patient")?);
    let work = WriteWork::new(&state.engine, &ctx);
    let sh = shared.clone();
    let written = blocking(move || {
        let store = work.store.clone();
        let mut tx = store.begin()?;
        let item = tx
            .read("Basic", &id)?
            .filter(|s| !s.deleted && s.author_org.as_deref() == Some(m.as_str()))
            .ok_or_else(|| FhirError::not_found(format!("no review item {id}")))?;
        let mut r = item.resource.clone().unwrap_or_default();
        let row_json = r
            .pointer("/extension/2/valueString")
            .and_then(Value::as_str)
            .unwrap_or("{}")
            .to_string();
        let map: BTreeMap<String, String> = serde_json::from_str(&row_json)
            .map_err(|e| FhirError::internal(format!("review row: {e}")))?;
        let row = Row::parse(&map, &sh.catalogue, &m)
            .map_err(|e| FhirError::invalid_element(&e.field, e.reason))?;
        tx.read("Patient", &patient)?
            .filter(|p| !p.deleted)
            .ok_or_else(|| {
                FhirError::invalid_element("patient", format!("Patient/{patient} does not exist"))
            })?;
        let programme = sh
            .catalogue
            .get(&row.programme)
            .ok_or_else(|| FhirError::invalid_element("programme", "unknown programme"))?;
        let cov = row.coverage(&programme, &m, &patient);
        let id2 = recipient_id(&row.payer_number, &row.recipient_number);
        let w = match work.update_in(&mut *tx, "Coverage", &id2, cov, None)? {
            Ok(w) => w,
            Err(d) => return Err(FhirError::forbidden(d.reason)),
        };
        r["extension"][0]["valueCode"] = json!("resolved");
        let wc = WriteContext {
            org: Some(m.clone()),
            user: work.ctx.principal.user.clone(),
        };
        tx.update("Basic", &id, r, None, &wc)?;
        tx.commit()?;
        Ok(w.stored)
    })
    .await?;
    Ok(fhir_json(
        StatusCode::OK,
        written.resource.as_ref().unwrap_or(&Value::Null),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::{builtin_statutory, demo_municipal};

    fn cat() -> Catalogue {
        let c = Catalogue::default();
        c.replace(builtin_statutory());
        c.replace(demo_municipal());
        c
    }

    fn row(over: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = [
            ("payerNumber", "54136015"),
            ("recipientNumber", "1234566"),
            ("programme", "54"),
            ("familyName", "山田"),
            ("givenName", "花子"),
            ("familyKana", "ヤマダ"),
            ("givenKana", "ハナコ"),
            ("birthDate", "1980-04-01"),
            ("sex", "female"),
            ("start", "2026-04-01"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in over {
            m.insert(k.to_string(), v.to_string());
        }
        m
    }

    #[test]
    fn check_digits_and_programme_rules() {
        let c = cat();
        let ok = Row::parse(&row(&[]), &c, "131016").unwrap();
        assert_eq!(ok.action, Action::Upsert);
        let e = Row::parse(&row(&[("payerNumber", "54136016")]), &c, "131016").unwrap_err();
        assert_eq!(e.field, "payerNumber");
        assert!(e.reason.contains("check digit"), "{}", e.reason);
        let e = Row::parse(&row(&[("recipientNumber", "1234567")]), &c, "131016").unwrap_err();
        assert_eq!(e.field, "recipientNumber");
        // law number of the payer must be the programme's
        let e = Row::parse(&row(&[("programme", "52")]), &c, "131016").unwrap_err();
        assert_eq!(e.field, "payerNumber");
        // another municipality's own programme
        let e = Row::parse(
            &row(&[("programme", "131016-88"), ("payerNumber", "88136015")]),
            &c,
            "131024",
        )
        .unwrap_err();
        assert_eq!(e.field, "programme");
        let e = Row::parse(&row(&[("action", "end")]), &c, "131016").unwrap_err();
        assert_eq!(e.field, "end");
        let e = Row::parse(&row(&[("colour", "red")]), &c, "131016").unwrap_err();
        assert_eq!(e.field, "colour");
    }

    #[test]
    fn coverage_has_public_expense_shape() {
        let c = cat();
        let r = Row::parse(&row(&[("monthlyCeiling", "5000")]), &c, "131016").unwrap();
        let p = c.get("54").unwrap();
        let cov = r.coverage(&p, "131016", "pt-1");
        assert!(is_public_expense(&cov));
        assert_eq!(cov["subscriberId"], "1234566");
        assert_eq!(cov["payor"][0]["identifier"]["value"], "54136015");
        assert_eq!(ceiling_of(&cov), Some(5000));
        assert_eq!(ext_str(&cov, "programme"), Some("54"));
        assert_eq!(cov["costToBeneficiary"][0]["valueQuantity"]["value"], 20);
    }

    #[test]
    fn csv_rows() {
        let data = "payerNumber,recipientNumber,programme,familyKana,birthDate,start\n54136015,1234566,54,ヤマダ,1980-04-01,2026-04-01\n\n54136015,\"1234566\",54\n";
        let rows: Vec<_> = read_rows(std::io::Cursor::new(data), true).collect();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].1.is_ok());
        assert!(rows[1].1.is_err());
    }
}
