//! Counters for the operator's monthly statistics: checks run (by stage),
//! duplicate, same-efficacy and contraindication alerts, prescriptions and
//! dispensing results registered.
//!
//! Counted in memory and persisted as one `Basic` record per month (no patient)
//! at most every [`FLUSH_SECS`] and on request; every check is also an audit
//! record (action `erx-check`, counts in its reason), which stays the
//! authoritative trail: after a crash the persisted counters may lag it by up
//! to the flush interval.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tsunagi_fhir::FhirResult;
use tsunagi_fhir::search::SearchQuery;
use tsunagi_store::{Scope, Store, WriteContext};

use crate::checks::Tally;
use crate::model::{SERVICE_ORG, from_basic, to_basic};

pub const FLUSH_SECS: u64 = 5;

/// One month's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Month {
    pub month: String,
    pub checks: u64,
    /// Checks by stage: precheck, reception, provisional.
    pub checks_by_stage: BTreeMap<String, u64>,
    pub duplicate_alerts: u64,
    pub same_efficacy_alerts: u64,
    pub contraindication_alerts: u64,
    pub prescriptions: u64,
    pub dispensing_results: u64,
    pub paper_dispensing_results: u64,
}

#[derive(Default)]
pub struct Counters {
    months: Mutex<BTreeMap<String, Month>>,
    last_flush: Mutex<Option<Instant>>,
    flushing: Mutex<()>,
}

fn month_id(month: &str) -> String {
    format!("erx-stats-{month}")
}

impl Counters {
    fn with(&self, month: &str, f: impl FnOnce(&mut Month)) {
        let mut g = self.months.lock().unwrap_or_else(|e| e.into_inner());
        let m = g.entry(month.to_string()).or_insert_with(|| Month {
            month: month.to_string(),
            ..Month::default()
        });
        f(m);
    }

    pub fn check(&self, month: &str, stage: &str, t: Tally) {
        self.with(month, |m| {
            m.checks += 1;
            *m.checks_by_stage.entry(stage.to_string()).or_default() += 1;
            m.duplicate_alerts += t.duplicate;
            m.same_efficacy_alerts += t.same_efficacy;
            m.contraindication_alerts += t.contraindication;
        });
    }

    pub fn prescription(&self, month: &str) {
        self.with(month, |m| m.prescriptions += 1);
    }

    pub fn dispensing(&self, month: &str, n: u64, paper: bool) {
        self.with(month, |m| {
            if paper {
                m.paper_dispensing_results += n
            } else {
                m.dispensing_results += n
            }
        });
    }

    pub fn month(&self, month: &str) -> Month {
        self.months
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(month)
            .cloned()
            .unwrap_or_else(|| Month {
                month: month.to_string(),
                ..Month::default()
            })
    }

    /// Loads the persisted months.
    pub fn load(&self, store: &dyn Store) -> FhirResult<()> {
        let q = tsunagi_fhir::query::parse(
            "Basic",
            &[
                (
                    "code".into(),
                    format!("{}|statistics", crate::model::CODE_SYSTEM),
                ),
                ("_count".into(), "1000".into()),
            ],
        )
        .unwrap_or_else(|_| SearchQuery::new("Basic"));
        let found = store.search(&q, &Scope::Unrestricted)?;
        let mut g = self.months.lock().unwrap_or_else(|e| e.into_inner());
        for r in found.matches.iter().filter_map(|r| r.resource.as_ref()) {
            if let Ok(m) = from_basic::<Month>(r) {
                g.insert(m.month.clone(), m);
            }
        }
        Ok(())
    }

    /// True when a flush is due (and marks it started).
    pub fn flush_due(&self) -> bool {
        let mut g = self.last_flush.lock().unwrap_or_else(|e| e.into_inner());
        match *g {
            Some(t) if t.elapsed().as_secs() < FLUSH_SECS => false,
            _ => {
                *g = Some(Instant::now());
                true
            }
        }
    }

    /// Writes every month's counts (blocking).
    pub fn flush(&self, store: &dyn Store) -> FhirResult<()> {
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot: Vec<Month> = self
            .months
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let ctx = WriteContext {
            org: Some(SERVICE_ORG.into()),
            user: None,
        };
        let mut tx = store.begin()?;
        for m in snapshot {
            let id = month_id(&m.month);
            tx.update(
                "Basic",
                &id,
                to_basic(&id, "statistics", None, &m),
                None,
                &ctx,
            )?;
        }
        tx.commit()
    }
}
