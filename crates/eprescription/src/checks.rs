//! Duplicate-medication and contraindication checks (重複投薬等チェック).
//!
//! A draft (medications about to be prescribed or dispensed) is compared with
//! the patient's medications active on the day, from prescriptions and
//! dispensing results of every institution:
//! - **duplicate**: same ingredient (YJ code characters 1-7; brand and generic
//!   forms, and 一般名コード, alike);
//! - **same-efficacy**: different ingredient, same therapeutic class (the first
//!   [`CheckConfig::class_digits`] characters of the YJ code), when enabled;
//! - **contraindication** (併用禁忌): the pair is in the imported interactions table.
//!
//! Pure functions: what the alert may reveal is decided by the caller through
//! the policy (see `flow.rs`).

use chrono::{Duration, NaiveDate};
use serde_json::{Value, json};
use tsunagi_terminology::{Terminology, systems, yj};

use crate::model::Med;

/// Check settings.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// Medications that started more than this many days ago are not considered.
    pub lookback_days: i64,
    /// Raise same-efficacy warnings.
    pub same_efficacy: bool,
    /// Characters of the YJ code that make the therapeutic class (3 or 4).
    pub class_digits: usize,
    /// Days assumed when a line states no duration (topicals, as-needed).
    pub default_days: u32,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            lookback_days: 365,
            same_efficacy: true,
            class_digits: 4,
            default_days: 14,
        }
    }
}

/// Kind of alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlertKind {
    Duplicate,
    SameEfficacy,
    Contraindication,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Duplicate => "duplicate",
            AlertKind::SameEfficacy => "same-efficacy",
            AlertKind::Contraindication => "contraindication",
        }
    }
    fn v3(self) -> (&'static str, &'static str) {
        match self {
            AlertKind::Duplicate => ("DUPTHPY", "重複投薬"),
            AlertKind::SameEfficacy => ("DUPTHPY", "同効薬の重複"),
            AlertKind::Contraindication => ("DRG", "併用禁忌"),
        }
    }
}

/// One finding, before deciding what it may show.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub kind: AlertKind,
    /// Index of the draft line.
    pub draft: usize,
    /// The other medication (another draft line or an active medication).
    pub other: Med,
    /// Reason from the interactions table.
    pub reason: Option<String>,
}

/// The checked code of a CodeableConcept: YJ code or 一般名コード; a レセプト電算
/// code is mapped to its YJ code through the drug master, a HOT code (HOT9,
/// HOT13, HOT7) through the HOT code master. Returns (code, display); the code
/// is empty when the line cannot be checked (free text, or a code no loaded
/// master maps), which the caller reports rather than passing silently.
pub fn checked_code(cc: &Value, terms: &Terminology) -> (String, String) {
    let codings = cc
        .get("coding")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let text = cc.get("text").and_then(Value::as_str).unwrap_or("");
    let mut fallback = None;
    for c in codings {
        let sys = c.get("system").and_then(Value::as_str).unwrap_or("");
        let code = c.get("code").and_then(Value::as_str).unwrap_or("");
        let display = c
            .get("display")
            .and_then(Value::as_str)
            .unwrap_or(text)
            .to_string();
        if (systems::YJ.contains(&sys) || systems::GENERAL_NAME.contains(&sys))
            && yj::ingredient(code).is_some()
        {
            return (code.to_string(), display);
        }
        if fallback.is_some() {
            continue;
        }
        if systems::DRUG_RECEIPT.contains(&sys)
            && let Some(d) = terms.drug(code)
            && yj::ingredient(&d.yj_code).is_some()
        {
            fallback = Some((d.yj_code.clone(), d.name.clone()));
        } else if systems::HOT9.contains(&sys)
            || systems::HOT13.contains(&sys)
            // JP Core lists the claims-code OID under HOT9 as well; HOT9 codes start
            // with 1, claims codes with 6, so the two cannot be confused
            || systems::DRUG_RECEIPT.contains(&sys)
        {
            if let Some(h) = terms.hot(code) {
                fallback = Some((h.yj_code.clone(), display));
            }
        } else if systems::HOT7.contains(&sys)
            && let Some(h) = terms.hot7_yj(code)
        {
            fallback = Some((h.yj_code.clone(), display));
        }
    }
    fallback.unwrap_or_else(|| {
        let display = codings
            .first()
            .and_then(|c| c.get("display"))
            .and_then(Value::as_str)
            .unwrap_or(text);
        (String::new(), display.to_string())
    })
}

fn days_of(q: Option<&Value>) -> Option<u32> {
    let q = q?;
    let v = q.get("value").and_then(Value::as_f64)?;
    let unit = q
        .get("code")
        .or_else(|| q.get("unit"))
        .and_then(Value::as_str)
        .unwrap_or("d");
    let days = match unit {
        "wk" | "週" => v * 7.0,
        "mo" | "月" => v * 30.0,
        _ => v,
    };
    (days >= 1.0).then_some(days.round() as u32)
}

/// Days of supply of a MedicationRequest (per use).
pub fn request_days(mr: &Value, default_days: u32) -> u32 {
    days_of(mr.pointer("/dispenseRequest/expectedSupplyDuration"))
        .or_else(|| {
            mr.get("dosageInstruction")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .filter_map(|d| days_of(d.pointer("/timing/repeat/boundsDuration")))
                        .max()
                })
        })
        .unwrap_or(default_days)
}

/// Date part (JST as written) of a FHIR date or dateTime.
pub fn date_of(v: Option<&Value>) -> Option<NaiveDate> {
    let s = v?.as_str()?;
    NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d").ok()
}

/// The therapeutic class of a code.
fn class_of(code: &str, digits: usize) -> Option<&str> {
    yj::ingredient(code)?;
    code.get(..digits)
}

/// Compares the draft with the active medications. `today` is the day of the
/// check; lines of prescription `exclude_rx` (the one being dispensed) are not
/// compared with the draft.
pub fn find(
    draft: &[Med],
    active: &[Med],
    today: NaiveDate,
    cfg: &CheckConfig,
    terms: &Terminology,
    exclude_rx: Option<&str>,
) -> Vec<Finding> {
    let since = today - Duration::days(cfg.lookback_days);
    let others: Vec<&Med> = active
        .iter()
        .filter(|m| m.active_on(today) && m.start >= since)
        .filter(|m| exclude_rx.is_none() || m.rx.as_deref() != exclude_rx)
        .collect();
    let mut out: Vec<Finding> = Vec::new();
    let mut push = |f: Finding| {
        // one alert per draft line, kind and other prescription (a prescription
        // and its dispensing results describe the same medication)
        let key = |x: &Finding| {
            (
                x.kind,
                x.draft,
                x.other.rx.clone().unwrap_or_else(|| x.other.source.clone()),
                yj::ingredient(&x.other.code).map(str::to_string),
            )
        };
        if !out.iter().any(|o| key(o) == key(&f)) {
            out.push(f);
        }
    };
    for (i, d) in draft.iter().enumerate() {
        let Some(ing) = yj::ingredient(&d.code) else {
            continue;
        };
        let within = draft[..i].iter();
        for o in others.iter().copied().chain(within) {
            let Some(oing) = yj::ingredient(&o.code) else {
                continue;
            };
            let mut f = |kind, reason| {
                push(Finding {
                    kind,
                    draft: i,
                    other: o.clone(),
                    reason,
                })
            };
            if ing == oing {
                f(AlertKind::Duplicate, None);
            } else if cfg.same_efficacy
                && class_of(&d.code, cfg.class_digits) == class_of(&o.code, cfg.class_digits)
            {
                f(AlertKind::SameEfficacy, None);
            }
            if let Some(x) = terms.interaction(&d.code, &o.code) {
                f(AlertKind::Contraindication, Some(x.reason.clone()));
            }
        }
    }
    out
}

/// Counts per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub duplicate: u64,
    pub same_efficacy: u64,
    pub contraindication: u64,
}

pub fn tally(findings: &[Finding]) -> Tally {
    let mut t = Tally::default();
    for f in findings {
        match f.kind {
            AlertKind::Duplicate => t.duplicate += 1,
            AlertKind::SameEfficacy => t.same_efficacy += 1,
            AlertKind::Contraindication => t.contraindication += 1,
        }
    }
    t
}

/// A DetectedIssue saying that draft line `line` was not checked: it carries
/// no YJ code or 一般名コード and no loaded master maps its codes. The prescriber
/// or pharmacist must know, rather than read silence as "no duplicate".
pub fn render_unchecked(line: usize, d: &Med, today: NaiveDate) -> Value {
    json!({
        "resourceType": "DetectedIssue",
        "status": "preliminary",
        "code": {"coding": [
            {"system": crate::model::CODE_SYSTEM, "code": "unchecked", "display": "チェック対象外"},
        ]},
        "severity": "low",
        "identifiedDateTime": today.to_string(),
        "detail": format!(
            "チェック対象外: {} (line {}) has no YJ code or 一般名コード that a loaded master maps (HOT codes need the HOT code master: tsunagi masters import --kind hot); not checked for duplicates or contraindications",
            d.display,
            line + 1
        ),
        "extension": [{
            "url": "https://tsunagi.dev/fhir/StructureDefinition/eprescription-alert-draft",
            "valueCodeableConcept": {"text": d.display},
        }],
    })
}

/// Renders a finding as a DetectedIssue (not stored). With `disclose` it names
/// the other drug, institution (code and name) and date; without, it says only
/// that such a medication exists, as the national service does without consent.
pub fn render(
    f: &Finding,
    draft: &[Med],
    disclose: bool,
    org_name: Option<&str>,
    today: NaiveDate,
) -> Value {
    let d = &draft[f.draft];
    let (v3, ja) = f.kind.v3();
    let severity = match f.kind {
        AlertKind::Contraindication => "high",
        AlertKind::Duplicate => "moderate",
        AlertKind::SameEfficacy => "low",
    };
    let mut issue = json!({
        "resourceType": "DetectedIssue",
        "status": "preliminary",
        "code": {"coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": v3},
            {"system": crate::model::CODE_SYSTEM, "code": f.kind.as_str(), "display": ja},
        ]},
        "severity": severity,
        "identifiedDateTime": today.to_string(),
        "extension": [{
            "url": "https://tsunagi.dev/fhir/StructureDefinition/eprescription-alert-draft",
            "valueCodeableConcept": {"text": d.display, "coding": [{"code": d.code}]},
        }],
    });
    if disclose {
        let org = match org_name {
            Some(n) => format!("{} ({n})", f.other.org),
            None => f.other.org.clone(),
        };
        let mut detail = format!(
            "{ja}: {} と {} ({org}, {} から {} 日分)",
            d.display, f.other.display, f.other.start, f.other.days
        );
        if let Some(r) = &f.reason {
            detail.push_str(&format!(" — {r}"));
        }
        issue["detail"] = json!(detail);
        issue["implicated"] = json!([{"reference": f.other.source, "display": f.other.display}]);
        if let Some(ext) = issue["extension"].as_array_mut() {
            ext.push(json!({
                "url": "https://tsunagi.dev/fhir/StructureDefinition/eprescription-alert-other",
                "extension": [
                    {"url": "medication", "valueCodeableConcept": {"text": f.other.display, "coding": [{"code": f.other.code}]}},
                    {"url": "institution", "valueString": org},
                    {"url": "date", "valueDate": f.other.start.to_string()},
                ],
            }));
        }
    } else {
        issue["detail"] = json!(format!(
            "{ja}: {} について、他の医療機関等の薬剤との{}があります (患者の同意がないため詳細は表示できません)",
            d.display,
            match f.kind {
                AlertKind::Contraindication => "併用禁忌",
                _ => "重複",
            }
        ));
    }
    issue
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsunagi_terminology::Interaction;

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    fn med(code: &str, start: &str, days: u32, rx: Option<&str>) -> Med {
        Med {
            code: code.into(),
            display: code.into(),
            start: day(start),
            days,
            org: "1310123458".into(),
            source: format!("MedicationRequest/{code}"),
            rx: rx.map(str::to_string),
        }
    }

    fn terms() -> Terminology {
        let mut t = Terminology::default();
        t.set_interactions(vec![Interaction {
            code_a: "2171022".into(),
            code_b: "3332001F1ZZZ".into(),
            reason: "作用増強".into(),
        }]);
        t
    }

    #[test]
    fn kinds() {
        let cfg = CheckConfig::default();
        let t = terms();
        let today = day("2026-11-21");
        // famotidine generic code vs brand: duplicate; nizatidine (2325): same efficacy
        let active = vec![
            med("2325003B2029", "2026-11-15", 14, Some("rxA")),
            med("2325005F1020", "2026-11-20", 7, Some("rxB")),
            med("3332001F1028", "2026-11-01", 30, Some("rxC")),
        ];
        let draft = vec![
            med("2325003B2ZZZ", "2026-11-21", 7, None),
            med("2171022F1022", "2026-11-21", 7, None),
        ];
        let f = find(&draft, &active, today, &cfg, &t, None);
        let kinds: Vec<(AlertKind, usize)> = f.iter().map(|x| (x.kind, x.draft)).collect();
        assert!(kinds.contains(&(AlertKind::Duplicate, 0)), "{kinds:?}");
        assert!(kinds.contains(&(AlertKind::SameEfficacy, 0)), "{kinds:?}");
        assert!(
            kinds.contains(&(AlertKind::Contraindication, 1)),
            "{kinds:?}"
        );
        assert_eq!(
            tally(&f),
            Tally {
                duplicate: 1,
                same_efficacy: 1,
                contraindication: 1
            }
        );
        // switched off: no same-efficacy
        let off = CheckConfig {
            same_efficacy: false,
            ..CheckConfig::default()
        };
        assert_eq!(
            tally(&find(&draft, &active, today, &off, &t, None)).same_efficacy,
            0
        );
        // the prescription being dispensed is not compared with itself
        assert_eq!(
            tally(&find(&draft, &active, today, &cfg, &t, Some("rxA"))).duplicate,
            0
        );
    }

    #[test]
    fn active_by_start_and_days() {
        let cfg = CheckConfig::default();
        let t = terms();
        let draft = vec![med("2325003F1020", "2026-11-21", 7, None)];
        // ended yesterday (7 days from 11-14 = through 11-20)
        let ended = vec![med("2325003B2029", "2026-11-14", 7, None)];
        assert!(find(&draft, &ended, day("2026-11-21"), &cfg, &t, None).is_empty());
        // still running on its last day
        assert_eq!(
            find(&draft, &ended, day("2026-11-20"), &cfg, &t, None).len(),
            1
        );
        // starts in the future: not active yet
        let later = vec![med("2325003B2029", "2026-11-25", 7, None)];
        assert!(find(&draft, &later, day("2026-11-21"), &cfg, &t, None).is_empty());
        // older than the look-back window although still running
        let long = vec![med("2325003B2029", "2026-01-01", 400, None)];
        let short = CheckConfig {
            lookback_days: 90,
            ..CheckConfig::default()
        };
        assert!(find(&draft, &long, day("2026-11-21"), &short, &t, None).is_empty());
        assert_eq!(
            find(&draft, &long, day("2026-11-21"), &cfg, &t, None).len(),
            1
        );
    }

    #[test]
    fn within_the_draft_and_uncoded() {
        let cfg = CheckConfig::default();
        let t = terms();
        let draft = vec![
            med("2325003B2029", "2026-11-21", 7, None),
            med("2325003F1020", "2026-11-21", 7, None),
            med("", "2026-11-21", 7, None),
        ];
        let f = find(&draft, &[], day("2026-11-21"), &cfg, &t, None);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].kind, f[0].draft), (AlertKind::Duplicate, 1));
    }

    #[test]
    fn withheld_detail_names_nothing() {
        let cfg = CheckConfig::default();
        let t = terms();
        let active = vec![med("3332001F1028", "2026-11-01", 30, Some("rxC"))];
        let draft = vec![med("2171022F1022", "2026-11-21", 7, None)];
        let f = find(&draft, &active, day("2026-11-21"), &cfg, &t, None);
        let hidden = render(&f[0], &draft, false, None, day("2026-11-21")).to_string();
        assert!(!hidden.contains("3332001F1028") && !hidden.contains("1310123458"));
        assert!(!hidden.contains("作用増強"));
        let shown = render(&f[0], &draft, true, Some("病院"), day("2026-11-21")).to_string();
        assert!(shown.contains("3332001F1028") && shown.contains("1310123458"));
        assert!(shown.contains("作用増強"));
    }

    #[test]
    fn codes_and_days() {
        let t = terms();
        let mr = json!({
            "medicationCodeableConcept": {"coding": [
                {"system": "urn:oid:1.2.392.200119.4.403.1", "code": "103831601", "display": "x"},
                {"system": "urn:oid:1.2.392.100495.20.1.73", "code": "2233002F1280", "display": "カルボシステイン錠"}
            ]},
            "dispenseRequest": {"expectedSupplyDuration": {"value": 7, "code": "d"}}
        });
        assert_eq!(
            checked_code(&mr["medicationCodeableConcept"], &t).0,
            "2233002F1280"
        );
        assert_eq!(request_days(&mr, 14), 7);
        let hot_only = json!({"coding": [{"system": "urn:oid:1.2.392.200119.4.403.1", "code": "106062101", "display": "リンデロン"}]});
        assert_eq!(
            checked_code(&hot_only, &t),
            (String::new(), "リンデロン".into())
        );
        assert_eq!(request_days(&json!({}), 14), 14);
    }
}
