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
//!
//! **Incremental runs.** Every entry carries its registration hour as a tag
//! (and a received letter its receipt hour), indexed as `_tag`. A run reads
//! only the hours whose period may have ended since the last run (recorded in
//! `Basic/sharing-retention-state`), plus the lab and prescription groups that
//! got a new entry since then (a newer entry can end the "latest 3" protection
//! of an older one); so its cost follows what became due, not what is stored.
//! The first run, and `tsunagi retention run --full`, read everything in keyset
//! pages instead.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Duration, Months, Timelike, Utc};
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

/// How long an entry is kept from its registration (or a letter from its receipt).
#[derive(Debug, Clone, Copy)]
enum Period {
    /// Calendar months, clamped to the month's end.
    Months(u32),
    Days(i64),
}

impl Period {
    /// The end of the period begun at `t`.
    fn after(self, t: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Period::Months(m) => t
                .checked_add_months(Months::new(m))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            Period::Days(d) => t + Duration::days(d),
        }
    }

    /// The start of the period that ends at `t`, give or take the clamping
    /// of calendar months (at most three days).
    fn before(self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Period::Months(m) => t.checked_sub_months(Months::new(m)),
            Period::Days(d) => Some(t - Duration::days(d)),
        }
    }
}

/// The retention period of a kind counted from registration (None: not
/// expired by these rules; bodies go with their document, notifications are
/// not the service's to expire).
fn period(rules: &Rules, kind: Kind) -> Option<Period> {
    Some(match kind {
        Kind::Referral | Kind::DischargeSummary => Period::Months(rules.referral_months),
        Kind::Checkup => Period::Months(12 * rules.checkup_years),
        Kind::Diagnosis | Kind::DrugAllergy | Kind::OtherAllergy | Kind::Infection => {
            Period::Months(12 * rules.clinical_years)
        }
        Kind::Lab => Period::Months(12 * rules.lab_years),
        Kind::Prescription => Period::Days(rules.prescription_days),
        Kind::DocumentBody | Kind::Notification => return None,
    })
}

/// The period a received letter is kept after its receipt.
fn after_receipt(rules: &Rules) -> Period {
    Period::Days(rules.referral_after_receipt_days)
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
    let by_age = period(rules, e.kind)?.after(e.registered);
    Some(match (e.kind, e.received) {
        (Kind::Referral | Kind::DischargeSummary, Some(r)) => {
            by_age.min(after_receipt(rules).after(r))
        }
        _ => by_age,
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
    /// `full` (every entry read) or `incremental` (only what may have become
    /// due since the last run).
    pub mode: &'static str,
    pub examined: usize,
    pub purged: usize,
    pub ids: Vec<String>,
}

/// The store type of each kind retention applies to.
const KINDS_BY_TYPE: [(&str, &[Kind]); 5] = [
    ("Condition", &[Kind::Diagnosis]),
    (
        "AllergyIntolerance",
        &[Kind::DrugAllergy, Kind::OtherAllergy],
    ),
    ("Observation", &[Kind::Infection, Kind::Lab]),
    ("MedicationRequest", &[Kind::Prescription]),
    (
        "DocumentReference",
        &[Kind::Referral, Kind::DischargeSummary, Kind::Checkup],
    ),
];

const PAGE: usize = 1000;
/// Hours of registrations read by one query: few queries for a run after a
/// long pause, and a bounded result however busy the hours were.
const HOURS_PER_QUERY: usize = 6;

/// Calls `f` with each keyset page of a type's entries (entries purged while
/// scanning simply do not come back).
fn scan_type(
    store: &dyn Store,
    rt: &str,
    mut f: impl FnMut(Vec<Entry>) -> FhirResult<()>,
) -> FhirResult<()> {
    let mut after: Option<String> = None;
    loop {
        let page = store.scan(rt, after.as_deref(), PAGE)?;
        let n = page.len();
        after = page.last().map(|m| m.id.clone());
        f(entries_of(rt, &page))?;
        if n < PAGE {
            return Ok(());
        }
    }
}

/// The hours of registration — or of receipt, when `received` — in which an
/// entry of `kind` may have its period end in `(last, now]`, oldest first.
/// Exact per hour: within an hour the period's end moves with the
/// registration time, so an hour is listed when its first instant is due by
/// `now` and its last was not yet due at `last`. Across hours it need not
/// (six months after 30 and 31 May both end on 30 November), so every hour of
/// a candidate range is tested rather than searched.
fn due_hours(
    rules: &Rules,
    kind: Kind,
    received: bool,
    last: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Vec<DateTime<Utc>> {
    // an entry registered (a letter received) at `t` is due at `p.after(t)`;
    // (LTS keeps it forever and a receipt ends it sooner: judged per entry)
    let Some(p) = (if received {
        Some(after_receipt(rules))
    } else {
        period(rules, kind)
    }) else {
        return Vec::new();
    };
    let (Some(from), Some(to)) = (p.before(last), p.before(now)) else {
        return Vec::new();
    };
    let hour = Duration::hours(1);
    let mut out = Vec::new();
    let mut h = floor_hour(from - Duration::days(4));
    while h <= to + Duration::days(4) {
        let first_due_by_now = p.after(h) <= now;
        let last_not_due_before = p.after(h + hour - Duration::milliseconds(1)) > last;
        if first_due_by_now && last_not_due_before {
            out.push(h);
        }
        h += hour;
    }
    out
}

/// One run's work: what it examined, purged, and which "latest N" groups it
/// has already judged.
struct Run<'a> {
    store: &'a dyn Store,
    rules: &'a Rules,
    now: DateTime<Utc>,
    dry_run: bool,
    groups_done: HashSet<String>,
    gone: HashSet<(String, String)>,
    report: Report,
}

impl Run<'_> {
    /// Judges candidate entries. A one-period kind is judged alone; a "latest
    /// N" kind (lab, prescriptions) by its whole group, once per run, when the
    /// entry's own period has ended or when `new_in_group` (a newer entry can
    /// end the protection of older ones).
    fn examine(&mut self, entries: Vec<Entry>, new_in_group: bool) -> FhirResult<()> {
        for e in entries {
            self.report.examined += 1;
            let ended = expiry(self.rules, &e).is_some_and(|t| self.now >= t);
            if matches!(e.kind, Kind::Lab | Kind::Prescription) {
                if (ended || new_in_group) && self.groups_done.insert(e.group.clone()) {
                    let members = group_members(self.store, &e, self.rules.keep_latest)?;
                    for d in doomed(self.rules, &members, self.now) {
                        self.purge(&d)?;
                    }
                }
            } else if ended {
                self.purge(&e)?;
            }
        }
        Ok(())
    }

    /// Deletes one entry (and a document's body) with its audit record, in
    /// one transaction; a dry run only reports it.
    fn purge(&mut self, e: &Entry) -> FhirResult<()> {
        if !self.gone.insert((e.rt.clone(), e.id.clone())) {
            return Ok(());
        }
        if self.dry_run {
            self.report.purged += 1;
            self.report.ids.push(format!("{}/{}", e.rt, e.id));
            return Ok(());
        }
        let mut tx = self.store.begin()?;
        let mut resources = Vec::new();
        if tx.purge(&e.rt, &e.id)?.is_some() {
            resources.push(format!("{}/{}", e.rt, e.id));
        }
        if let Some((brt, bid)) = &e.body
            && tx.purge(brt, bid)?.is_some()
        {
            resources.push(format!("{brt}/{bid}"));
        }
        // purged by a concurrent run
        if resources.is_empty() {
            return Ok(());
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
            "serviceTime": fmt_instant(self.now),
        })])?;
        tx.commit()?;
        self.report.purged += 1;
        self.report.ids.push(format!("{}/{}", e.rt, e.id));
        Ok(())
    }

    /// Every entry of every type, judged one keyset page at a time.
    fn full(&mut self) -> FhirResult<()> {
        self.report.mode = "full";
        for (rt, _) in KINDS_BY_TYPE {
            let store = self.store;
            scan_type(store, rt, |page| self.examine(page, false))?;
        }
        Ok(())
    }

    /// Entries tagged in `system` with one of `hours`, up to
    /// [`HOURS_PER_QUERY`] hours per query: their ids in one query, then the
    /// entries by id, one page at a time, so the cost is linear in the hours'
    /// entries whatever is kept or purged.
    fn by_hours(
        &mut self,
        rt: &str,
        system: &str,
        hours: &BTreeSet<DateTime<Utc>>,
    ) -> FhirResult<()> {
        let codes: Vec<String> = hours
            .iter()
            .map(|h| format!("{system}|{}", hour_code(*h)))
            .collect();
        let batches = codes.chunks(HOURS_PER_QUERY).map(|c| c.join(","));
        for values in batches {
            // the ids first (no bodies), then the entries in pages by id: what
            // this run purges never shifts a page
            let mut q = query::parse(
                rt,
                &[("_tag".into(), values), ("_sort".into(), "_id".into())],
            )?;
            q.count = usize::MAX / 2;
            let ids = self.store.search_ids(&q, &Scope::Unrestricted)?;
            for chunk in ids.chunks(PAGE) {
                let mut q = tsunagi_fhir::search::SearchQuery::new(rt)
                    .with("_id", tsunagi_fhir::search::Criterion::Id(chunk.to_vec()));
                q.count = PAGE;
                let page = self.store.search(&q, &Scope::Unrestricted)?;
                self.examine(entries_of(rt, &page.matches), false)?;
            }
        }
        Ok(())
    }

    /// Only what may have become due in `(last, now]`: entries registered (or
    /// received) in the hours whose period ends in that interval, and the
    /// "latest N" groups of the lab results and prescriptions the store wrote
    /// since `written_mark` (a newer entry can end an older one's protection).
    fn incremental(&mut self, last: DateTime<Utc>, written_mark: DateTime<Utc>) -> FhirResult<()> {
        self.report.mode = "incremental";
        for (rt, kinds) in KINDS_BY_TYPE {
            let due: BTreeSet<DateTime<Utc>> = kinds
                .iter()
                .flat_map(|k| due_hours(self.rules, *k, false, last, self.now))
                .collect();
            self.by_hours(rt, REGISTERED_HOUR_SYSTEM, &due)?;
        }
        let received: BTreeSet<DateTime<Utc>> =
            due_hours(self.rules, Kind::Referral, true, last, self.now)
                .into_iter()
                .collect();
        self.by_hours("DocumentReference", RECEIVED_HOUR_SYSTEM, &received)?;
        for rt in ["Observation", "MedicationRequest"] {
            self.written_since(rt, written_mark)?;
        }
        Ok(())
    }

    /// Entries of `rt` the store wrote at or after `since` (its own clock),
    /// in `_lastUpdated` keyset pages (the type's last-updated index, so each
    /// page costs the same however many there are): their "latest N" groups
    /// are judged again.
    fn written_since(&mut self, rt: &str, since: DateTime<Utc>) -> FhirResult<()> {
        let mut cursor = since;
        // rows at exactly `cursor` already read (writes of one millisecond)
        let mut at_cursor = 0;
        loop {
            let mut q = query::parse(
                rt,
                &[
                    ("_lastUpdated".into(), format!("ge{}", fmt_instant(cursor))),
                    ("_sort".into(), "_lastUpdated,_id".into()),
                    ("_count".into(), PAGE.to_string()),
                ],
            )?;
            q.offset = at_cursor;
            let page = self.store.search(&q, &Scope::Unrestricted)?;
            let n = page.matches.len();
            if let Some(newest) = page.matches.last().map(|m| m.last_updated) {
                let ties = page
                    .matches
                    .iter()
                    .filter(|m| m.last_updated == newest)
                    .count();
                at_cursor = if newest == cursor {
                    at_cursor + n
                } else {
                    ties
                };
                cursor = newest;
            }
            self.examine(entries_of(rt, &page.matches), true)?;
            if n < PAGE {
                return Ok(());
            }
        }
    }
}

/// The start of the hour of `t`.
fn floor_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_minute(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(t)
}

fn entries_of(rt: &str, matches: &[tsunagi_store::StoredResource]) -> Vec<Entry> {
    matches
        .iter()
        .filter_map(|m| Entry::from_resource(rt, m.resource.as_ref()?, m.author_org.as_deref()))
        .collect()
}

/// Every entry of the group of a lab result (same patient and item) or a
/// prescription (same patient).
/// None are returned when the group cannot hold more than `keep` entries (a
/// count, no bodies read): then every one of them is protected.
fn group_members(store: &dyn Store, e: &Entry, keep: usize) -> FhirResult<Vec<Entry>> {
    let mut params = vec![("patient".to_string(), format!("Patient/{}", e.patient))];
    if e.kind == Kind::Lab
        && let Some((_, item)) = e.group.split_once('|')
    {
        params.push(("code".into(), item.to_string()));
    }
    let mut count = params.clone();
    count.push(("_summary".into(), "count".into()));
    if store
        .search(&query::parse(&e.rt, &count)?, &Scope::Unrestricted)?
        .total
        <= keep as u64
    {
        return Ok(Vec::new());
    }
    params.push(("_count".into(), PAGE.to_string()));
    params.push(("_sort".into(), "_id".into()));
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let mut q = query::parse(&e.rt, &params)?;
        q.offset = offset;
        let page = store.search(&q, &Scope::Unrestricted)?;
        let n = page.matches.len();
        out.extend(page.matches.iter().filter_map(|m| {
            Entry::from_resource(&e.rt, m.resource.as_ref()?, m.author_org.as_deref())
                .filter(|x| x.kind == e.kind && x.group == e.group)
        }));
        if n < PAGE {
            return Ok(out);
        }
        offset += n;
    }
}

/// Id of the `Basic` holding the instant the last run evaluated.
const STATE_ID: &str = "sharing-retention-state";

/// Where the last run got to: the service time it evaluated, and the store
/// time before which every write it could see was written.
struct State {
    last: DateTime<Utc>,
    written_mark: DateTime<Utc>,
}

fn last_run(store: &dyn Store) -> FhirResult<Option<State>> {
    let r = store
        .read("Basic", STATE_ID)?
        .filter(|s| !s.deleted && s.author_org.as_deref() == Some(crate::SERVICE_ORG))
        .and_then(|s| s.resource);
    Ok(r.and_then(|r| {
        let last = instant_ext(&r, LAST_RUN_EXT)?;
        Some(State {
            last,
            written_mark: instant_ext(&r, WRITTEN_MARK_EXT).unwrap_or(last),
        })
    }))
}

const LAST_RUN_EXT: &str = "https://tsunagi.dev/fhir/StructureDefinition/retention-last-run";
const WRITTEN_MARK_EXT: &str =
    "https://tsunagi.dev/fhir/StructureDefinition/retention-written-mark";
/// Writes that were in flight when a run started may carry an earlier
/// `lastUpdated` than its start: the next run reads back this far.
const IN_FLIGHT_MARGIN_MINUTES: i64 = 5;

fn save_last_run(store: &dyn Store, state: &State) -> FhirResult<()> {
    let mut tx = store.begin()?;
    tx.update(
        "Basic",
        STATE_ID,
        json!({"resourceType": "Basic", "id": STATE_ID,
            "code": {"coding": [{"system": KIND_SYSTEM, "code": "retention-state"}]},
            "extension": [{"url": LAST_RUN_EXT, "valueInstant": fmt_instant(state.last)},
                {"url": WRITTEN_MARK_EXT, "valueInstant": fmt_instant(state.written_mark)}]}),
        None,
        &tsunagi_store::WriteContext {
            org: Some(crate::SERVICE_ORG.into()),
            user: None,
        },
    )?;
    tx.commit()
}

/// How a run chooses what to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Incremental after a recorded run, full before the first.
    Auto,
    /// Read every entry (after an upgrade from entries without hour tags, or to
    /// check the incremental runs).
    Full,
}

/// Runs the retention rules at `now`: purges what is due, one transaction per
/// entry (with its body and its audit record), and records `now` as the last
/// run (never moving it back). The first run reads everything; later ones
/// only what may have become due since the one before.
pub fn run(store: &dyn Store, rules: &Rules, now: DateTime<Utc>) -> FhirResult<Report> {
    run_with(store, rules, now, Mode::Auto, false)
}

/// [`run`] with a chosen mode; a dry run deletes nothing and records nothing.
pub fn run_with(
    store: &dyn Store,
    rules: &Rules,
    now: DateTime<Utc>,
    mode: Mode,
    dry_run: bool,
) -> FhirResult<Report> {
    let state = last_run(store)?;
    let written_mark = Utc::now() - Duration::minutes(IN_FLIGHT_MARGIN_MINUTES);
    let mut r = Run {
        store,
        rules,
        now,
        dry_run,
        groups_done: HashSet::new(),
        gone: HashSet::new(),
        report: Report::default(),
    };
    match (mode, &state) {
        (Mode::Auto, Some(s)) if s.last <= now => r.incremental(s.last, s.written_mark)?,
        _ => r.full()?,
    }
    if !dry_run && state.as_ref().is_none_or(|s| now > s.last) {
        save_last_run(
            store,
            &State {
                last: now,
                written_mark,
            },
        )?;
    }
    Ok(r.report)
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

    /// A deterministic pseudo-random sequence (xorshift).
    fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut x = seed;
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        }
    }

    #[test]
    fn due_hours_hold_every_entry_that_became_due_and_no_other() {
        let r = Rules::default();
        let mut next = rng(0x9E37_79B9_7F4A_7C15);
        let base = t("2024-01-31T10:30:00Z");
        let kinds = [
            Kind::Diagnosis,
            Kind::Lab,
            Kind::Prescription,
            Kind::Referral,
            Kind::Checkup,
        ];
        for _ in 0..3000 {
            let kind = kinds[next(5) as usize];
            let received = kind == Kind::Referral && next(2) == 0;
            let at = base + Duration::milliseconds(next(3 * 366 * 86_400_000) as i64);
            let due = if received {
                at + Duration::days(r.referral_after_receipt_days)
            } else {
                let mut e = entry(kind, "2024-01-01T00:00:00Z");
                e.registered = at;
                expiry(&r, &e).unwrap()
            };
            // an interval that holds the moment it became due (often exactly at an end)
            let last = match next(3) {
                0 => due - Duration::milliseconds(1),
                _ => due - Duration::milliseconds(1 + next(10 * 86_400_000) as i64),
            };
            let now = match next(3) {
                0 => due,
                _ => due + Duration::milliseconds(next(10 * 86_400_000) as i64),
            };
            let hours = due_hours(&r, kind, received, last, now);
            assert!(
                hours.contains(&floor_hour(at)),
                "{kind:?} received={received} at {at} due {due} not in ({last}, {now}]"
            );
            // few hours beyond the interval's own (calendar months clamp at month ends)
            let span = (now - last).num_hours() + 2;
            assert!(
                hours.len() as i64 <= span + 4 * 24,
                "{} hours for {span}",
                hours.len()
            );
            // an interval that ended before it became due, or began after, leaves it out
            let early = due_hours(
                &r,
                kind,
                received,
                last - Duration::days(30),
                due - Duration::hours(2),
            );
            if due - floor_hour(at) >= Duration::hours(2)
                && expiry_in_hour_all_after(&r, kind, received, at, due - Duration::hours(2))
            {
                assert!(
                    !early.contains(&floor_hour(at)),
                    "{kind:?} listed before due"
                );
            }
            let late = due_hours(
                &r,
                kind,
                received,
                floor_hour(at) + Duration::hours(1) + (due - at) + Duration::days(5),
                now + Duration::days(30),
            );
            assert!(
                !late.contains(&floor_hour(at)),
                "{kind:?} listed after it was due"
            );
        }
    }

    /// Whether every registration in the hour of `at` is due only after `t`.
    fn expiry_in_hour_all_after(
        r: &Rules,
        kind: Kind,
        received: bool,
        at: DateTime<Utc>,
        t: DateTime<Utc>,
    ) -> bool {
        let start = floor_hour(at);
        if received {
            return start + Duration::days(r.referral_after_receipt_days) > t;
        }
        let mut e = entry(kind, "2024-01-01T00:00:00Z");
        e.registered = start;
        expiry(r, &e).is_some_and(|x| x > t)
    }
}
