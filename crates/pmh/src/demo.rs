//! Demo data for the fixed demo dataset (docs/DEMO.md): the demo municipality
//! 131016 (千代田区) gets its own programmes, registers recipients for pt-01..pt-03
//! through the same importer as files (matching on the demo persons' names).
//! Idempotent: recipients are keyed by their numbers, so a second run writes nothing.

use std::sync::Arc;

use serde_json::{Value, json};
use tsunagi_fhir::FhirResult;
use tsunagi_policy::identity::{OrgKind, Principal, Purpose, Role};
use tsunagi_policy::policy::Policy;
use tsunagi_server::engine::WriteWork;
use tsunagi_server::{BasicValidator, Ctx};
use tsunagi_store::Store;

use crate::catalogue::{self, Catalogue};
use crate::recipients::{Importer, Options, RawRow};

pub const DEMO_MUNICIPALITY: &str = "131016";

/// Seeds the PMH demo data; returns a one-line summary.
pub fn seed(store: Arc<dyn Store>) -> FhirResult<String> {
    let cat = Catalogue::default();
    cat.replace(catalogue::builtin_statutory());
    cat.replace(catalogue::demo_municipal());
    let all = cat.all();
    catalogue::save(&*store, &all, None)?;
    let actor = Principal::new(
        DEMO_MUNICIPALITY,
        OrgKind::Municipality,
        vec![],
        Role::MunicipalityStaff,
        Some("demo".into()),
        None,
        false,
    )
    .map_err(|e| tsunagi_fhir::FhirError::internal(e.to_string()))?;
    let shared = Arc::new(crate::Shared::offline(store.clone()));
    let work = WriteWork {
        store: store.clone(),
        policy: Arc::new(Policy::new().with_rule(Arc::new(crate::access::PmhRule(shared)))),
        validator: Arc::new(BasicValidator),
        ctx: Ctx::new(actor, Some(Purpose::Operations)),
    };
    // (person, programme, 公費負担者番号, monthly ceiling)
    let mut rows: Vec<RawRow> = Vec::new();
    let people: Vec<(String, Value)> = ["pt-01", "pt-02", "pt-03"]
        .iter()
        .filter_map(|id| {
            store
                .read("Patient", id)
                .ok()
                .flatten()
                .and_then(|s| s.resource)
                .map(|r| (id.to_string(), r))
        })
        .collect();
    let payer = |law: &str| crate::cli::payer_number(law, 16);
    let plan: [(usize, &str, String, &str); 4] = [
        (0, "54", payer("54"), "10000"),
        (0, "131016-88", payer("88"), ""),
        (1, "52", payer("52"), "5000"),
        (2, "21", payer("21"), "5000"),
    ];
    for (n, (who, prog, payer, ceiling)) in plan.iter().enumerate() {
        let Some((_, p)) = people.get(*who) else {
            continue;
        };
        let name = |rep: &str, part: &str| -> String {
            p["name"]
                .as_array()
                .and_then(|ns| {
                    ns.iter().find(|x| {
                        x.pointer("/extension/0/valueCode").and_then(Value::as_str) == Some(rep)
                    })
                })
                .map(|x| {
                    if part == "family" {
                        x["family"].as_str().unwrap_or("").to_string()
                    } else {
                        x["given"][0].as_str().unwrap_or("").to_string()
                    }
                })
                .unwrap_or_default()
        };
        let rec_no = crate::cli::recipient_number(1000 + n as u64);
        let row = json!({
            "payerNumber": payer, "recipientNumber": rec_no, "programme": prog,
            "familyName": name("IDE", "family"), "givenName": name("IDE", "given"),
            "familyKana": name("SYL", "family"), "givenKana": name("SYL", "given"),
            "birthDate": p["birthDate"], "sex": p["gender"],
            "address": p.pointer("/address/0/text").cloned().unwrap_or(json!("")),
            "start": "2026-04-01", "monthlyCeiling": ceiling, "incomeCategory": "II"
        });
        rows.push((n as u64 + 1, crate::recipients::object_to_map(&row)));
    }
    let mut imp = Importer::new(
        work,
        &cat,
        Options {
            full: false,
            programme: None,
            as_of: tsunagi_eligibility::cards::jst_date(chrono::Utc::now()),
            batch: 100,
        },
    );
    imp.run(rows.into_iter(), 0, |_, _| Ok(()))?;
    let r = &imp.report;
    Ok(format!(
        "pmh: {} programmes, {} recipients written ({} unchanged, {} to review, {} failed)",
        all.len(),
        r.written,
        r.unchanged,
        r.review,
        r.errors.len()
    ))
}
