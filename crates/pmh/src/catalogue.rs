//! The programme catalogue (公費負担医療・地方単独医療費助成の制度一覧) as data.
//!
//! A programme is keyed by `code`: the 法別番号 (law number, 2 digits) for statutory
//! programmes, `{municipality}-{lawNumber}` for a municipality's own programme.
//! Each carries its copayment rules: rate, default monthly ceiling and whether
//! ceiling management (上限額管理) applies. The catalogue is a JSON array,
//! imported with `PUT /pmh/programmes` or `tsunagi pmh programmes import FILE`;
//! operators maintain statutory programmes, a municipality its own. Each
//! programme is kept as a `Basic` record written by the service and held in
//! memory for the hot paths (recipient validation, ceilings).

use std::collections::BTreeMap;
use std::sync::RwLock;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_policy::audit::AuditRecord;
use tsunagi_policy::identity::Role;
use tsunagi_server::engine::blocking;
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::{AppState, Ctx};
use tsunagi_store::{Scope, Store, WriteContext};

use crate::{EXT_BASE, PMH_KIND_SYSTEM, PMH_ORG, Shared};

/// Statutory or municipal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// 公費負担医療 under a national law.
    Statutory,
    /// 地方単独医療費助成 of one municipality.
    Municipal,
}

/// One programme and its copayment rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Programme {
    pub code: String,
    /// 法別番号: the first two digits of every 公費負担者番号 of the programme.
    pub law_number: String,
    pub name: String,
    pub kind: Kind,
    /// 地方公共団体コード of the municipality owning a municipal programme.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub municipality: Option<String>,
    /// Patient's share in percent of the medical fee.
    pub copay_rate_percent: u32,
    /// Default monthly ceiling in yen (a recipient's own ceiling overrides it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_ceiling_yen: Option<u64>,
    /// Whether facilities report copayments for 上限額管理.
    pub ceiling_management: bool,
}

impl Programme {
    /// Checks one programme; errors name `programme[i].field`.
    pub fn check(&self, i: usize) -> FhirResult<()> {
        let at = |f: &str| format!("programme[{i}].{f}");
        if self.code.trim().is_empty() {
            return Err(FhirError::invalid_element(&at("code"), "code is required"));
        }
        if !(self.law_number.len() == 2 && self.law_number.bytes().all(|b| b.is_ascii_digit())) {
            return Err(FhirError::invalid_element(
                &at("lawNumber"),
                "法別番号 must be exactly two digits",
            ));
        }
        if self.copay_rate_percent > 100 {
            return Err(FhirError::invalid_element(
                &at("copayRatePercent"),
                "a rate is 0-100 percent",
            ));
        }
        match (self.kind, &self.municipality) {
            (Kind::Municipal, None) => {
                return Err(FhirError::invalid_element(
                    &at("municipality"),
                    "a municipal programme names its municipality",
                ));
            }
            (Kind::Municipal, Some(m)) => {
                tsunagi_policy::ids::validate_local_government_code(m)
                    .map_err(|e| FhirError::invalid_element(&at("municipality"), e.to_string()))?;
            }
            (Kind::Statutory, Some(_)) => {
                return Err(FhirError::invalid_element(
                    &at("municipality"),
                    "a statutory programme belongs to no municipality",
                ));
            }
            (Kind::Statutory, None) => {}
        }
        if self.ceiling_management && self.monthly_ceiling_yen.is_none() {
            // allowed: the ceiling then comes from each recipient
        }
        Ok(())
    }
}

/// The statutory programmes shipped with the crate (`data/programmes.json`).
pub fn builtin_statutory() -> Vec<Programme> {
    serde_json::from_str(include_str!("../data/programmes.json")).expect("valid built-in catalogue")
}

/// The demo municipality's own programmes (`data/demo-municipal-programmes.json`).
pub fn demo_municipal() -> Vec<Programme> {
    serde_json::from_str(include_str!("../data/demo-municipal-programmes.json"))
        .expect("valid demo catalogue")
}

/// Parses and checks a catalogue document (JSON array of programmes).
pub fn parse(doc: &Value) -> FhirResult<Vec<Programme>> {
    let Some(items) = doc.as_array() else {
        return Err(FhirError::invalid_element(
            "programme",
            "the catalogue is a JSON array of programmes",
        ));
    };
    let mut out = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let p: Programme = serde_json::from_value(it.clone())
            .map_err(|e| FhirError::invalid_element(&format!("programme[{i}]"), e.to_string()))?;
        p.check(i)?;
        if out.iter().any(|q: &Programme| q.code == p.code) {
            return Err(FhirError::invalid_element(
                &format!("programme[{i}].code"),
                format!("programme {} appears twice", p.code),
            ));
        }
        out.push(p);
    }
    Ok(out)
}

/// The in-memory catalogue.
#[derive(Default)]
pub struct Catalogue(RwLock<BTreeMap<String, Programme>>);

impl Catalogue {
    pub fn get(&self, code: &str) -> Option<Programme> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(code)
            .cloned()
    }
    pub fn all(&self) -> Vec<Programme> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
    /// Built-in statutory programmes whose code the catalogue lacks.
    pub fn missing_builtin(&self) -> Vec<Programme> {
        let m = self.0.read().unwrap_or_else(|e| e.into_inner());
        builtin_statutory()
            .into_iter()
            .filter(|p| !m.contains_key(&p.code))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).is_empty()
    }
    /// Adds or replaces these programmes.
    pub fn replace(&self, ps: Vec<Programme>) {
        let mut m = self.0.write().unwrap_or_else(|e| e.into_inner());
        for p in ps {
            m.insert(p.code.clone(), p);
        }
    }

    /// Loads every programme record from the store.
    pub fn load(&self, store: &dyn Store) -> FhirResult<()> {
        let mut offset = 0;
        loop {
            let q = query::parse(
                "Basic",
                &[
                    ("code".into(), format!("{PMH_KIND_SYSTEM}|programme")),
                    ("_count".into(), "500".into()),
                    ("_offset".into(), offset.to_string()),
                ],
            )?;
            let found = store.search(&q, &Scope::Unrestricted)?;
            let n = found.matches.len();
            let ps: Vec<Programme> = found
                .matches
                .iter()
                .filter_map(|s| s.resource.as_ref())
                .filter_map(from_record)
                .collect();
            self.replace(ps);
            if n < 500 {
                return Ok(());
            }
            offset += n;
        }
    }
}

fn record_id(code: &str) -> String {
    let safe: String = code
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("pmh-programme-{safe}")
}

fn to_record(p: &Programme) -> Value {
    json!({
        "resourceType": "Basic",
        "id": record_id(&p.code),
        "code": {"coding": [{"system": PMH_KIND_SYSTEM, "code": "programme"}]},
        "identifier": [{"system": format!("{EXT_BASE}programme"), "value": p.code}],
        "extension": [{
            "url": format!("{EXT_BASE}programme-definition"),
            "valueString": serde_json::to_string(p).unwrap_or_default()
        }]
    })
}

fn from_record(r: &Value) -> Option<Programme> {
    let s = r.pointer("/extension/0/valueString")?.as_str()?;
    serde_json::from_str(s).ok()
}

/// Writes programmes as the service, in one transaction with an audit record of
/// who changed the catalogue.
pub fn save(store: &dyn Store, ps: &[Programme], ctx: Option<&Ctx>) -> FhirResult<()> {
    let mut tx = store.begin()?;
    let wc = WriteContext {
        org: Some(PMH_ORG.into()),
        user: ctx.and_then(|c| c.principal.user.clone()),
    };
    let mut refs = Vec::new();
    for p in ps {
        let rec = to_record(p);
        let (s, _) = tx.update("Basic", &record_id(&p.code), rec, None, &wc)?;
        refs.push(format!("Basic/{}/_history/{}", s.id, s.version));
    }
    if let Some(ctx) = ctx {
        let rec = AuditRecord::new(
            &ctx.principal,
            ctx.purpose,
            "pmh-programmes",
            ctx.request_id.clone(),
        )
        .with_resources(refs);
        tx.audit_append(&[rec.to_json()])?;
    }
    tx.commit()
}

/// Whether the caller may maintain this programme: operators any, municipality
/// staff only their own municipal programmes.
pub fn may_edit(ctx: &Ctx, p: &Programme) -> Result<(), String> {
    match ctx.principal.role {
        Role::Operator => Ok(()),
        Role::MunicipalityStaff
            if p.kind == Kind::Municipal
                && p.municipality.as_deref() == Some(ctx.principal.org.as_str()) =>
        {
            Ok(())
        }
        Role::MunicipalityStaff => Err(format!(
            "municipality {} may maintain only its own municipal programmes, not {}",
            ctx.principal.org, p.code
        )),
        r => Err(format!("role {r} may not maintain the programme catalogue")),
    }
}

pub fn routes() -> Router<AppState> {
    Router::new().route("/pmh/programmes", get(list).put(import))
}

async fn list(
    Extension(shared): Extension<Arc<Shared>>,
    Caller(_ctx): Caller,
) -> ApiResult<Response> {
    let all = shared.catalogue.all();
    Ok(fhir_json(
        StatusCode::OK,
        &serde_json::to_value(all).unwrap_or_default(),
    ))
}

async fn import(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    let ps = parse(&body)?;
    for p in &ps {
        if let Err(reason) = may_edit(&ctx, p) {
            return Err(
                crate::http::deny(&state, &ctx, "programme catalogue", reason)
                    .await
                    .into(),
            );
        }
    }
    let store = state.engine.store.clone();
    let (p2, c2) = (ps.clone(), ctx.clone());
    blocking(move || save(&*store, &p2, Some(&c2))).await?;
    let n = ps.len();
    shared.catalogue.replace(ps);
    Ok(fhir_json(StatusCode::OK, &json!({"imported": n})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalogue_is_valid() {
        let ps = builtin_statutory();
        let doc = serde_json::to_value(&ps).unwrap();
        assert_eq!(parse(&doc).unwrap().len(), ps.len());
        assert!(
            ps.iter()
                .any(|p| p.law_number == "54" && p.ceiling_management)
        );
        let m = demo_municipal();
        assert!(parse(&serde_json::to_value(&m).unwrap()).is_ok());
    }

    #[test]
    fn rejects_bad_programmes() {
        let bad = json!([{"code": "x", "lawNumber": "5", "name": "n", "kind": "statutory",
            "copayRatePercent": 10, "ceilingManagement": false}]);
        let e = parse(&bad).unwrap_err();
        assert_eq!(
            e.issues[0].expression.as_deref(),
            Some("programme[0].lawNumber")
        );
        let bad = json!([{"code": "x", "lawNumber": "88", "name": "n", "kind": "municipal",
            "copayRatePercent": 10, "ceilingManagement": false}]);
        assert!(parse(&bad).is_err());
        let bad = json!([{"code": "x", "lawNumber": "88", "name": "n", "kind": "municipal",
            "municipality": "131016", "copayRatePercent": 101, "ceilingManagement": false}]);
        assert!(parse(&bad).is_err());
    }
}
