//! Eligibility checks that showed a municipality's subsidies (資格確認の件数),
//! for the municipality's statistics of use.
//!
//! The eligibility service tells PMH of every answer at reception (`$reception`,
//! `$eligibility`) that showed subsidies ([`tsunagi_eligibility::SubsidyObserver`]);
//! each answer counts once for every municipality whose subsidy it showed, and
//! once per programme shown. Counts are kept in memory per municipality and
//! month (JST) and persisted as one `Basic` per municipality and month, written
//! by the service, at most every [`FLUSH_SECS`] (after a crash they may lag the
//! audit trail, which records every answer, by that interval). No person is
//! named in them.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use tsunagi_fhir::FhirResult;
use tsunagi_fhir::extension::{extension, extensions};
use tsunagi_store::{Store, WriteContext};

use crate::recipients::{ext, ext_str};
use crate::{PMH_KIND_SYSTEM, PMH_ORG};

pub const FLUSH_SECS: u64 = 5;
/// `Basic.code` of a month's counts.
const KIND: &str = "eligibility-checks";

/// One municipality's checks in one month.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonthChecks {
    /// Answers that showed at least one of the municipality's subsidies.
    pub checks: u64,
    /// Answers per programme (法別番号 or municipal programme code) shown.
    pub by_programme: BTreeMap<String, u64>,
}

type Key = (String, String);

#[derive(Default)]
struct Counts {
    months: BTreeMap<Key, MonthChecks>,
    /// Changed since the last flush.
    dirty: BTreeSet<Key>,
}

/// The top-level extensions of a shown subsidy, read from its text without
/// building the rest of the Coverage.
#[derive(Debug, Default, Deserialize)]
struct Extensions<'a> {
    #[serde(borrow, default)]
    extension: Vec<Extension<'a>>,
}

#[derive(Debug, Deserialize)]
struct Extension<'a> {
    #[serde(borrow, default)]
    url: Option<Cow<'a, str>>,
    #[serde(rename = "valueString", borrow, default)]
    value_string: Option<Cow<'a, str>>,
}

impl Extensions<'_> {
    /// `valueString` of the first extension `url`.
    fn string(&self, url: &str) -> Option<&str> {
        self.extension
            .iter()
            .find(|e| e.url.as_deref() == Some(url))?
            .value_string
            .as_deref()
    }
}

/// The counters, keyed by (municipality, `YYYY-MM`).
pub struct CheckCounters {
    store: Arc<dyn Store>,
    counts: Mutex<Counts>,
    last_flush: Mutex<Option<Instant>>,
    flushing: Mutex<()>,
}

fn record_id(municipality: &str, month: &str) -> String {
    format!("pmh-checks-{municipality}-{month}")
}

fn to_record(municipality: &str, month: &str, m: &MonthChecks) -> Value {
    let mut exts = vec![
        json!({"url": ext("municipality"), "valueString": municipality}),
        json!({"url": ext("month"), "valueString": month}),
        json!({"url": ext("checks"), "valueInteger": m.checks}),
    ];
    for (p, n) in &m.by_programme {
        exts.push(json!({"url": ext("programme-checks"), "extension": [
            {"url": "programme", "valueString": p},
            {"url": "checks", "valueInteger": n},
        ]}));
    }
    json!({
        "resourceType": "Basic",
        "id": record_id(municipality, month),
        "code": {"coding": [{"system": PMH_KIND_SYSTEM, "code": KIND}]},
        "extension": exts,
    })
}

fn ext_int(r: &Value, url: &str) -> u64 {
    extension(r, url)
        .and_then(|e| e.get("valueInteger"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn from_record(r: &Value) -> Option<(String, String, MonthChecks)> {
    let municipality = ext_str(r, "municipality")?.to_string();
    let month = ext_str(r, "month")?.to_string();
    let mut m = MonthChecks {
        checks: ext_int(r, &ext("checks")),
        ..MonthChecks::default()
    };
    let url = ext("programme-checks");
    for e in extensions(r, &url) {
        let p = extension(e, "programme")?.get("valueString")?.as_str()?;
        m.by_programme.insert(p.to_string(), ext_int(e, "checks"));
    }
    Some((municipality, month, m))
}

impl CheckCounters {
    /// The counters over `store`, with what it holds already.
    pub fn load(store: Arc<dyn Store>) -> FhirResult<CheckCounters> {
        let mut months = BTreeMap::new();
        let found = crate::http::search_all(
            &*store,
            "Basic",
            &[("code", format!("{PMH_KIND_SYSTEM}|{KIND}"))],
        )?;
        // only the service's own records count
        for s in found
            .iter()
            .filter(|s| s.author_org.as_deref() == Some(PMH_ORG))
        {
            if let Some((mu, mo, m)) = s.resource.as_ref().and_then(from_record) {
                months.insert((mu, mo), m);
            }
        }
        let c = CheckCounters::empty(store);
        c.counts.lock().unwrap_or_else(|e| e.into_inner()).months = months;
        Ok(c)
    }

    /// Counters starting from nothing (not what the store holds).
    pub fn empty(store: Arc<dyn Store>) -> CheckCounters {
        CheckCounters {
            store,
            counts: Mutex::new(Counts::default()),
            last_flush: Mutex::new(None),
            flushing: Mutex::new(()),
        }
    }

    /// Counts one answer that showed `subsidies` (Coverage JSON texts) at `at`.
    pub fn count(&self, at: DateTime<Utc>, subsidies: &[&str]) {
        let month = tsunagi_eligibility::cards::jst_date(at)
            .format("%Y-%m")
            .to_string();
        let read: Vec<Extensions> = subsidies
            .iter()
            .map(|t| serde_json::from_str(t).unwrap_or_default())
            .collect();
        let (municipality, programme) = (ext("municipality"), ext("programme"));
        // programmes shown, per municipality (a programme counts once per answer)
        let mut shown: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for c in &read {
            if let Some(m) = c.string(&municipality) {
                let e = shown.entry(m).or_default();
                if let Some(p) = c.string(&programme) {
                    e.insert(p);
                }
            }
        }
        let mut g = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for (m, programmes) in shown {
            let key = (m.to_string(), month.clone());
            g.dirty.insert(key.clone());
            let e = g.months.entry(key).or_default();
            e.checks += 1;
            for p in programmes {
                *e.by_programme.entry(p.to_string()).or_default() += 1;
            }
        }
    }

    /// One municipality's counts of a month (`YYYY-MM`).
    pub fn month(&self, municipality: &str, month: &str) -> MonthChecks {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .months
            .get(&(municipality.to_string(), month.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// True when a flush is due (and marks it started).
    fn flush_due(&self) -> bool {
        let mut g = self.last_flush.lock().unwrap_or_else(|e| e.into_inner());
        match *g {
            Some(t) if t.elapsed().as_secs() < FLUSH_SECS => false,
            _ => {
                *g = Some(Instant::now());
                true
            }
        }
    }

    /// Writes the months counted since the last flush in one transaction
    /// (blocking); on failure they stay due for the next one.
    pub fn flush(&self) -> FhirResult<()> {
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot: Vec<(Key, MonthChecks)> = {
            let mut g = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let keys = std::mem::take(&mut g.dirty);
            keys.into_iter()
                .filter_map(|k| g.months.get(&k).cloned().map(|m| (k, m)))
                .collect()
        };
        if snapshot.is_empty() {
            return Ok(());
        }
        let written = (|| {
            let wc = WriteContext {
                org: Some(PMH_ORG.into()),
                user: None,
            };
            let mut tx = self.store.begin()?;
            for ((mu, mo), m) in &snapshot {
                tx.update("Basic", &record_id(mu, mo), to_record(mu, mo, m), None, &wc)?;
            }
            tx.commit()
        })();
        if written.is_err() {
            let mut g = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            g.dirty.extend(snapshot.into_iter().map(|(k, _)| k));
        }
        written
    }
}

/// What the eligibility service calls: counts, and persists when due on the
/// blocking pool (never on the answer's path).
pub struct Observer(pub Arc<CheckCounters>);

impl tsunagi_eligibility::SubsidyObserver for Observer {
    fn shown(&self, at: DateTime<Utc>, subsidies: &[&str]) {
        self.0.count(at, subsidies);
        if self.0.flush_due()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let c = self.0.clone();
            rt.spawn_blocking(move || {
                if let Err(e) = c.flush() {
                    tracing::warn!(error = %e, "PMH check counters not persisted; retried at the next flush");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subsidy's text as the eligibility service passes it: other
    /// extensions (money, nested) before the two the counters read.
    fn subsidy(municipality: &str, programme: &str) -> String {
        json!({"resourceType": "Coverage", "extension": [
            {"url": ext("monthly-ceiling"), "valueMoney": {"value": 5000, "currency": "JPY"}},
            {"url": ext("nested"), "extension": [{"url": "municipality", "valueString": "999999"}]},
            {"url": ext("municipality"), "valueString": municipality},
            {"url": ext("programme"), "valueString": programme}],
            "period": {"start": "2026-04-01"}})
        .to_string()
    }

    #[test]
    fn counts_per_municipality_month_and_programme_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(tsunagi_store::sqlite::SqliteStore::open(&dir.path().join("t.db")).unwrap());
        let c = CheckCounters::load(store.clone()).unwrap();
        let (a54, a88, b54) = (
            subsidy("131016", "54"),
            subsidy("131016", "131016-88"),
            subsidy("131024", "54"),
        );
        // 15:00 UTC on 30 November is 1 December in Japan
        let dec: DateTime<Utc> = "2026-11-30T15:00:00Z".parse().unwrap();
        let nov: DateTime<Utc> = "2026-11-30T14:59:59Z".parse().unwrap();
        c.count(dec, &[&a54, &a88, &b54]);
        c.count(dec, &[&a54, &a54]);
        // a text that is not a Coverage's counts for no municipality
        c.count(nov, &[&a88, "[1]", "{\"extension\": 5}"]);
        let d = c.month("131016", "2026-12");
        assert_eq!(d.checks, 2);
        assert_eq!(d.by_programme.get("54"), Some(&2));
        assert_eq!(d.by_programme.get("131016-88"), Some(&1));
        assert_eq!(c.month("131024", "2026-12").checks, 1);
        assert_eq!(c.month("131016", "2026-11").checks, 1);
        assert_eq!(c.month("131024", "2026-11"), MonthChecks::default());
        c.flush().unwrap();
        // counted after the flush: due at the next one
        c.count(nov, &[&b54]);
        c.flush().unwrap();
        let again = CheckCounters::load(store).unwrap();
        for (m, mo) in [
            ("131016", "2026-12"),
            ("131016", "2026-11"),
            ("131024", "2026-12"),
            ("131024", "2026-11"),
        ] {
            assert_eq!(again.month(m, mo), c.month(m, mo), "{m} {mo}");
        }
        assert_eq!(again.month("131024", "2026-11").checks, 1);
    }
}
