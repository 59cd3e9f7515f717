//! Retention (保存期間): physical deletion of what the service stores, on time.
//!
//! Chosen reading of each rule (periods count from the registration time the
//! service recorded, extension `registered`, on the service clock; an entry is
//! kept while `now < registered + period` and deleted from `now >= registered +
//! period`; months and years are calendar months, clamped to the month's end):
//!
//! | what | kept |
//! |---|---|
//! | referral letter, discharge summary (not received) | 6 months |
//! | referral letter, discharge summary (received) | until `received + 7 days` (configurable), or the 6 months if that ends first |
//! | checkup report | 5 years |
//! | diagnoses, allergies, infections | 5 years |
//! | lab results | 1 year, or among the latest 3 of the same item (JLAC10 code) of the patient, whichever keeps more |
//! | prescriptions | 100 days, or among the latest 3 of the patient, whichever keeps more |
//! | entries flagged LTS (長期保存) | never deleted |
//!
//! "Latest" orders by the clinical date (effective date / authoredOn), then by
//! registration time. A document is deleted with its stored body. Withdrawn
//! (entered-in-error) entries follow the same rules. Every deletion removes all
//! versions and index rows (`Transaction::purge`) and appends an audit record
//! `retention-purge` in the same transaction.

use std::collections::HashMap;

use chrono::{DateTime, Months, Utc};
use serde_json::{Value, json};
use tsunagi_fhir::{FhirResult, query};
use tsunagi_store::{Scope, Store};

use crate::kinds::*;

/// Retention periods.
#[derive(Debug, Clone)]
pub struct Rules {
    pub referral_months: u32,
    pub referral_after_receipt_days: i64,
    pub checkup_years: u32,
    pub clinical_years: u32,
    pub lab_years: u32,
    pub prescription_days: i64,
    /// "the latest 3" of lab items and prescriptions.
    pub keep_latest: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            referral_months: 6,
            referral_after_receipt_days: 7,
            checkup_years: 5,
            clinical_years: 5,
            lab_years: 1,
            prescription_days: 100,
            keep_latest: 3,
        }
    }
}

fn plus_months(t: DateTime<Utc>, m: u32) -> DateTime<Utc> {
    t.checked_add_months(Months::new(m))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// One stored entry as retention sees it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub rt: String,
    pub id: String,
    pub kind: Kind,
    pub patient: String,
    pub registered: DateTime<Utc>,
    pub received: Option<DateTime<Utc>>,
    pub lts: bool,
    /// Group for "latest N" (lab item / prescriptions of the patient).
    pub group: String,
    /// Clinical date (ISO text) then registration, for ordering.
    pub date: String,
    /// Body of a document (purged with it).
    pub body: Option<(String, String)>,
}

impl Entry {
    pub fn from_resource(rt: &str, r: &Value, author: Option<&str>) -> Option<Entry> {
        let kind = kind_of(r)?;
        let registered = instant_ext(r, REGISTERED_EXT)?;
        let patient = tsunagi_fhir::index::compartment_patient(rt, r)?;
        let group = match kind {
            Kind::Lab => format!("{patient}|{}", lab_item(r)),
            Kind::Prescription => patient.clone(),
            _ => String::new(),
        };
        let body = match (
            rt,
            author,
            r.pointer("/masterIdentifier/value").and_then(Value::as_str),
        ) {
            ("DocumentReference", Some(a), Some(local)) => {
                Some(("Basic".to_string(), entry_id("body", a, "Basic", local)))
            }
            _ => None,
        };
        Some(Entry {
            rt: rt.to_string(),
            id: r.get("id")?.as_str()?.to_string(),
            kind,
            patient,
            registered,
            received: instant_ext(r, RECEIVED_EXT),
            lts: has_tag(r, INDICATION_SYSTEM, LTS),
            group,
            date: clinical_date(rt, r).unwrap_or_default(),
            body,
        })
    }
}

/// When an entry stops being kept by its period (None: never, by this rule).
pub fn expiry(rules: &Rules, e: &Entry) -> Option<DateTime<Utc>> {
    if e.lts {
        return None;
    }
    Some(match e.kind {
        Kind::Referral | Kind::DischargeSummary => {
            let by_age = plus_months(e.registered, rules.referral_months);
            match e.received {
                Some(r) => {
                    by_age.min(r + chrono::Duration::days(rules.referral_after_receipt_days))
                }
                None => by_age,
            }
        }
        Kind::Checkup => plus_months(e.registered, 12 * rules.checkup_years),
        Kind::Diagnosis | Kind::DrugAllergy | Kind::OtherAllergy | Kind::Infection => {
            plus_months(e.registered, 12 * rules.clinical_years)
        }
        Kind::Lab => plus_months(e.registered, 12 * rules.lab_years),
        Kind::Prescription => e.registered + chrono::Duration::days(rules.prescription_days),
        // bodies go with their document; notifications are not the service's to expire
        Kind::DocumentBody | Kind::Notification => return None,
    })
}

/// The entries to delete at `now`.
pub fn doomed(rules: &Rules, entries: &[Entry], now: DateTime<Utc>) -> Vec<Entry> {
    let mut by_group: HashMap<&str, Vec<&Entry>> = HashMap::new();
    for e in entries {
        if matches!(e.kind, Kind::Lab | Kind::Prescription) {
            by_group.entry(&e.group).or_default().push(e);
        }
    }
    let mut protected: std::collections::HashSet<(&str, &str)> = Default::default();
    for list in by_group.values_mut() {
        list.sort_by(|a, b| b.date.cmp(&a.date).then(b.registered.cmp(&a.registered)));
        for e in list.iter().take(rules.keep_latest) {
            protected.insert((&e.rt, &e.id));
        }
    }
    entries
        .iter()
        .filter(|e| !protected.contains(&(e.rt.as_str(), e.id.as_str())))
        .filter(|e| expiry(rules, e).is_some_and(|t| now >= t))
        .cloned()
        .collect()
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    pub examined: usize,
    pub purged: usize,
    pub ids: Vec<String>,
}

/// Types the service stores entries of.
pub const TYPES: [&str; 5] = [
    "Condition",
    "AllergyIntolerance",
    "Observation",
    "MedicationRequest",
    "DocumentReference",
];

/// Every entry the service registered (a full scan, paged by id).
pub fn scan(store: &dyn Store) -> FhirResult<Vec<Entry>> {
    let mut out = Vec::new();
    for rt in TYPES {
        let mut offset = 0;
        loop {
            let mut q = query::parse(
                rt,
                &[
                    ("_count".into(), "1000".into()),
                    ("_sort".into(), "_id".into()),
                ],
            )?;
            q.offset = offset;
            let page = store.search(&q, &Scope::Unrestricted)?;
            let n = page.matches.len();
            for m in page.matches {
                if let Some(r) = &m.resource
                    && let Some(e) = Entry::from_resource(rt, r, m.author_org.as_deref())
                {
                    out.push(e);
                }
            }
            if n < 1000 {
                break;
            }
            offset += n;
        }
    }
    Ok(out)
}

/// Runs the retention rules at `now`: purges what is due, one transaction per
/// entry (with its body and its audit record).
pub fn run(store: &dyn Store, rules: &Rules, now: DateTime<Utc>) -> FhirResult<Report> {
    let entries = scan(store)?;
    let due = doomed(rules, &entries, now);
    let mut report = Report {
        examined: entries.len(),
        ..Default::default()
    };
    for e in due {
        let mut tx = store.begin()?;
        let mut resources = Vec::new();
        if tx.purge(&e.rt, &e.id)?.is_some() {
            resources.push(format!("{}/{}", e.rt, e.id));
        }
        if let Some((brt, bid)) = &e.body
            && tx.purge(brt, bid)?.is_some()
        {
            resources.push(format!("{brt}/{bid}"));
        }
        if resources.is_empty() {
            continue;
        }
        tx.audit_append(&[json!({
            "time": fmt_instant(Utc::now()),
            "org": crate::SERVICE_ORG,
            "role": "system",
            "purpose": "operations",
            "action": "retention-purge",
            "patient": e.patient,
            "resources": resources,
            "outcome": "success",
            "status": 200,
            "reason": format!("{} retention period ended (registered {})", e.kind.as_str(), fmt_instant(e.registered)),
            "serviceTime": fmt_instant(now),
        })])?;
        tx.commit()?;
        report.purged += 1;
        report.ids.push(format!("{}/{}", e.rt, e.id));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn entry(kind: Kind, registered: &str) -> Entry {
        Entry {
            rt: "Condition".into(),
            id: format!("{}-{registered}", kind.as_str()),
            kind,
            patient: "p1".into(),
            registered: t(registered),
            received: None,
            lts: false,
            group: "g".into(),
            date: registered.into(),
            body: None,
        }
    }

    fn kept(rules: &Rules, e: &Entry, now: &str) -> bool {
        doomed(rules, std::slice::from_ref(e), t(now)).is_empty()
    }

    #[test]
    fn five_year_rules_boundaries() {
        let r = Rules::default();
        for k in [
            Kind::Diagnosis,
            Kind::DrugAllergy,
            Kind::OtherAllergy,
            Kind::Infection,
            Kind::Checkup,
        ] {
            let e = entry(k, "2021-11-21T10:00:00Z");
            assert!(
                kept(&r, &e, "2026-11-21T09:59:59Z"),
                "{k:?} one second before"
            );
            assert!(
                !kept(&r, &e, "2026-11-21T10:00:00Z"),
                "{k:?} at the boundary"
            );
            let mut lts = e.clone();
            lts.lts = true;
            assert!(kept(&r, &lts, "2099-01-01T00:00:00Z"), "{k:?} LTS");
        }
    }

    #[test]
    fn referral_rules_boundaries() {
        let r = Rules::default();
        let mut e = entry(Kind::Referral, "2026-05-31T00:00:00Z");
        // six calendar months, clamped to the month's end
        assert!(kept(&r, &e, "2026-11-29T23:59:59Z"));
        assert!(!kept(&r, &e, "2026-11-30T00:00:00Z"));
        let mut lts = e.clone();
        lts.lts = true;
        assert!(kept(&r, &lts, "2030-01-01T00:00:00Z"));
        e.received = Some(t("2026-06-01T12:00:00Z"));
        assert!(kept(&r, &e, "2026-06-08T11:59:59Z"));
        assert!(!kept(&r, &e, "2026-06-08T12:00:00Z"));
    }

    #[test]
    fn lab_keeps_one_year_or_latest_three() {
        let r = Rules::default();
        let old: Vec<Entry> = (1..=5)
            .map(|i| {
                let mut e = entry(Kind::Lab, &format!("2024-0{i}-01T00:00:00Z"));
                e.rt = "Observation".into();
                e
            })
            .collect();
        // all older than a year: the latest three stay
        let d = doomed(&r, &old, t("2026-11-21T00:00:00Z"));
        assert_eq!(
            d.iter().map(|e| e.date.as_str()).collect::<Vec<_>>(),
            ["2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z"]
        );
        // one year boundaries of the 5th and 4th latest
        assert!(doomed(&r, &old, t("2024-12-31T23:59:59Z")).is_empty());
        assert_eq!(doomed(&r, &old, t("2025-01-01T00:00:00Z")).len(), 1);
        assert_eq!(doomed(&r, &old, t("2025-01-31T23:59:59Z")).len(), 1);
        assert_eq!(doomed(&r, &old, t("2025-02-01T00:00:00Z")).len(), 2);
        // another item's entries do not count
        let mut other = old[0].clone();
        other.group = "h".into();
        other.id = "x".into();
        assert!(doomed(&r, &[other], t("2030-01-01T00:00:00Z")).is_empty());
    }

    #[test]
    fn prescriptions_keep_100_days_or_latest_three() {
        let r = Rules::default();
        let list: Vec<Entry> = ["2026-01-01", "2026-02-01", "2026-03-01", "2026-08-01"]
            .iter()
            .map(|d| entry(Kind::Prescription, &format!("{d}T00:00:00Z")))
            .collect();
        // 2026-01-01 is 4th latest; its 100 days end 2026-04-11
        assert!(doomed(&r, &list, t("2026-04-10T23:59:59Z")).is_empty());
        let d = doomed(&r, &list, t("2026-04-11T00:00:00Z"));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].date, "2026-01-01T00:00:00Z");
        // the newest is within 100 days, so the latest three plus it are kept
        assert_eq!(doomed(&r, &list, t("2026-11-08T23:59:59Z")).len(), 1);
    }
}
