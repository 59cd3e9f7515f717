//! The access matrix: role × organisation kind × consent state × mode × category,
//! decided by the real policy (core rule + the service's consent, emergency and
//! disaster rules) and compared cell by cell with the specification
//! (`access_support::expected_read`). Reads are checked both as single-resource
//! decisions and as search scopes; writes of another organisation's record are
//! denied in every cell. A sample of cells runs over HTTP on both backends.

mod access_support;

use std::sync::Arc;

use access_support::*;
use chrono::{Duration, Utc};
use serde_json::json;
use tsunagi_eligibility::consent::{Category, Grant, GrantKind};
use tsunagi_eligibility::disaster::Declaration;
use tsunagi_eligibility::emergency::Session;
use tsunagi_eligibility::{Config, EligibilityService, ManualClock};
use tsunagi_policy::identity::{OrgKind, Principal, Role, role_allowed_for};
use tsunagi_policy::policy::{AccessRequest, Operation, Policy};
use tsunagi_server::ServiceModule;
use tsunagi_store::{Scope, ScopeRule};

const USER: &str = "u1";

fn setup(kind: OrgKind, consent: ConsentState, mode: Mode) -> (Policy, EligibilityService) {
    let now = "2026-11-21T03:00:00Z".parse().unwrap();
    let clock = Arc::new(ManualClock::new(now));
    let svc = EligibilityService::in_memory(Config::default(), clock);
    let sh = &svc.shared;
    let org = org_code(kind);
    let grant = |org: &str, cats: [bool; 3], start, end, kind| Grant {
        id: uuid::Uuid::new_v4().to_string(),
        patient: "p1".into(),
        org: org.into(),
        categories: Category::ALL
            .into_iter()
            .zip(cats)
            .filter(|(_, y)| *y)
            .map(|(c, _)| c)
            .collect(),
        start,
        end,
        kind,
        setting: "outpatient".into(),
    };
    match consent {
        ConsentState::None => {}
        ConsentState::Live(c) => sh.consent.insert(grant(
            org,
            c,
            now - Duration::hours(1),
            now + Duration::hours(23),
            GrantKind::Reception,
        )),
        ConsentState::Expired => sh.consent.insert(grant(
            org,
            [true; 3],
            now - Duration::hours(24) - Duration::seconds(1),
            now - Duration::seconds(1),
            GrantKind::Reception,
        )),
        ConsentState::OtherFacility => sh.consent.insert(grant(
            HOSP_B,
            [true; 3],
            now - Duration::hours(1),
            now + Duration::hours(23),
            GrantKind::Reception,
        )),
    }
    match mode {
        Mode::Normal => {}
        Mode::Emergency | Mode::EmergencyNoSecondFactor => sh.emergency.open(
            Session {
                id: "s1".into(),
                patient: "p1".into(),
                org: org.into(),
                user: USER.into(),
                until: now + Duration::hours(1),
            },
            now,
        ),
        Mode::Disaster | Mode::DisasterOutsideArea | Mode::DisasterOutsidePeriod => {
            let (prefs, start, end) = match mode {
                Mode::Disaster => (
                    vec!["13".to_string()],
                    now - Duration::hours(1),
                    now + Duration::days(3),
                ),
                Mode::DisasterOutsideArea => (
                    vec!["27".to_string()],
                    now - Duration::hours(1),
                    now + Duration::days(3),
                ),
                _ => (
                    vec!["13".to_string()],
                    now - Duration::days(3),
                    now - Duration::seconds(1),
                ),
            };
            sh.disaster.add(Declaration {
                id: "d1".into(),
                prefectures: prefs,
                start,
                end,
                declared_by: MINISTRY.into(),
            });
            sh.consent.insert(grant(
                org,
                [true; 3],
                start,
                end.max(now + Duration::seconds(1)),
                GrantKind::Disaster,
            ));
        }
    }
    let mut policy = Policy::new();
    for r in svc.access_rules() {
        policy = policy.with_rule(r);
    }
    (policy, svc)
}

fn principal(kind: OrgKind, role: Role, mode: Mode) -> Principal {
    let patient = (role == Role::Patient).then(|| "someone-else".to_string());
    Principal::new(
        org_code(kind),
        kind,
        vec![],
        role,
        Some(USER.into()),
        patient,
        mode != Mode::EmergencyNoSecondFactor,
    )
    .unwrap()
}

/// Whether a search scope admits type `rt` of patient p1 through a patient rule.
fn scope_admits(scope: &Scope, rt: &str) -> bool {
    match scope {
        Scope::Unrestricted => true,
        Scope::AnyOf(rules) => rules.iter().any(|r| rule_admits(r, rt)),
    }
}

/// Whether a rule admits an unlabelled resource of type `rt` of patient p1.
fn rule_admits(r: &ScopeRule, rt: &str) -> bool {
    match r {
        ScopeRule::Patient { id, types } => {
            id == "p1" && types.as_ref().is_none_or(|t| t.iter().any(|x| x == rt))
        }
        ScopeRule::Labeled { rule, filter } => filter.admits(&[]) && rule_admits(rule, rt),
        _ => false,
    }
}

#[test]
fn access_matrix() {
    let mut cells = 0;
    let mut allowed = 0;
    let mut failures = Vec::new();
    for consent in ConsentState::ALL {
        for mode in Mode::ALL {
            for &kind in OrgKind::ALL {
                let (policy, _svc) = setup(kind, consent, mode);
                for &role in Role::ALL {
                    if !role_allowed_for(kind, role) {
                        continue;
                    }
                    let p = principal(kind, role, mode);
                    for (rt, _) in TARGET_TYPES {
                        let want = expected_read(role, kind, consent, mode, rt);
                        for op in [Operation::Read, Operation::Vread, Operation::History] {
                            let req = AccessRequest::new(op, rt, mode.purpose())
                                .patient("p1")
                                .author(HOSP_B);
                            let got = policy.decide(&p, &req).is_permit();
                            if got != want {
                                failures.push(format!("{role}@{kind} {consent:?} {mode:?} {op} {rt}: want {want}, got {got} ({})", policy.decide(&p, &req).reason()));
                            }
                        }
                        let scope = policy.search_scope(&p, rt, mode.purpose());
                        let got = scope.as_ref().is_ok_and(|s| scope_admits(s, rt));
                        if got != want {
                            failures.push(format!("{role}@{kind} {consent:?} {mode:?} search {rt}: want {want}, got {got} ({scope:?})"));
                        }
                        // writes of another organisation's record: never
                        for op in [Operation::Update, Operation::Delete] {
                            let req = AccessRequest::new(op, rt, mode.purpose())
                                .patient("p1")
                                .author(HOSP_B);
                            if policy.decide(&p, &req).is_permit() {
                                failures.push(format!(
                                    "{role}@{kind} {consent:?} {mode:?} {op} {rt}: permitted"
                                ));
                            }
                        }
                        cells += 1;
                        allowed += want as usize;
                    }
                }
            }
        }
    }
    eprintln!(
        "access matrix: {cells} cells (role × org kind × consent state × mode × type), {allowed} allowed; each checked as read, vread, history, search scope, update and delete"
    );
    assert!(
        failures.is_empty(),
        "{} cells differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        cells > 1000 && allowed > 50,
        "{cells} cells, {allowed} allowed"
    );
}

/// The facility setting narrows every mode to drug-related types.
#[test]
fn hidden_clinical_history_in_every_mode() {
    for mode in [Mode::Normal, Mode::Emergency, Mode::Disaster] {
        let (policy, svc) = setup(
            OrgKind::Hospital,
            ConsentState::Live([true, true, true]),
            mode,
        );
        svc.shared.facility.set_hide_clinical(HOSP_A, true);
        let p = principal(OrgKind::Hospital, Role::Doctor, mode);
        for (rt, want) in [
            ("Condition", false),
            ("Observation", false),
            ("Composition", false),
            ("MedicationRequest", true),
            ("Coverage", true),
        ] {
            let req = AccessRequest::new(Operation::Read, rt, mode.purpose())
                .patient("p1")
                .author(HOSP_B);
            assert_eq!(policy.decide(&p, &req).is_permit(), want, "{mode:?} {rt}");
        }
    }
}

/// A grant ends exactly: permitted one second before its end, denied at and after it.
#[test]
fn grant_expiry_boundary() {
    let now: chrono::DateTime<Utc> = "2026-11-21T03:00:00Z".parse().unwrap();
    let clock = Arc::new(ManualClock::new(now));
    let svc = EligibilityService::in_memory(Config::default(), clock.clone());
    let end = now + Duration::hours(24);
    svc.shared.consent.insert(Grant {
        id: "g".into(),
        patient: "p1".into(),
        org: HOSP_A.into(),
        categories: vec![Category::A],
        start: now,
        end,
        kind: GrantKind::Reception,
        setting: "outpatient".into(),
    });
    let mut policy = Policy::new();
    for r in svc.access_rules() {
        policy = policy.with_rule(r);
    }
    let p = principal(OrgKind::Hospital, Role::Doctor, Mode::Normal);
    let req = AccessRequest::new(Operation::Read, "Condition", Mode::Normal.purpose())
        .patient("p1")
        .author(HOSP_B);
    for (t, want) in [
        (end - Duration::seconds(1), true),
        (end, false),
        (end + Duration::seconds(1), false),
        (now - Duration::seconds(1), false),
    ] {
        clock.set(t);
        assert_eq!(policy.decide(&p, &req).is_permit(), want, "at {t}");
    }
}

// ------------------------------------------------------------------ a sample over HTTP

both_backends!(matrix_sample_over_http);

async fn matrix_sample_over_http(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    s.seed_patient("p1", "山田", "花子", "1980-02-03", "東京都千代田区1-1");
    let card = s.card("p1");
    // consent state Live(B) at hospital A, by reception
    let clerk = s.token(HOSP_A, OrgKind::Hospital, Role::Clerk);
    assert_eq!(
        s.reception(&clerk, &card, [false, true, false], "outpatient")
            .await
            .status,
        200
    );
    let ids = [
        ("Patient", "p1"),
        ("Coverage", "p1-cov"),
        ("Condition", "p1-cond"),
        ("Observation", "p1-obs"),
        ("MedicationRequest", "p1-med"),
        ("Composition", "p1-doc"),
    ];
    let mut checked = 0;
    for (kind, role) in [
        (OrgKind::Hospital, Role::Doctor),
        (OrgKind::Hospital, Role::Pharmacist),
        (OrgKind::Hospital, Role::Nurse),
        (OrgKind::Hospital, Role::Clerk),
        (OrgKind::Clinic, Role::Doctor),
    ] {
        let t = s.token(org_code(kind), kind, role);
        for (rt, id) in ids {
            let want = expected_read(role, kind, ConsentState::Live([false, true, false]), Mode::Normal, rt)
                // the clinic holds no grant: consent state None for it
                && kind == OrgKind::Hospital;
            let r = s.get(&t, &format!("/fhir/{rt}/{id}")).await;
            assert_eq!(r.status == 200, want, "{role}@{kind} {rt}: {}", r.text);
            if !want {
                assert_eq!(r.status, 403, "{}", r.text);
            }
            checked += 1;
        }
    }
    // emergency cells: doctor with and without second factor
    let lookup = json!({"resourceType": "Parameters", "parameter": [
        {"name": "reason", "valueCode": "protect-life-or-body"},
        {"name": "insurerNumber", "valueString": INSURER}, {"name": "symbol", "valueString": "つなぎ"}, {"name": "number", "valueString": "p1"}]});
    let p2 = Principal::new(
        HOSP_A,
        OrgKind::Hospital,
        vec![],
        Role::Doctor,
        Some(USER.into()),
        None,
        true,
    )
    .unwrap();
    let dr = s.token_for(&p2);
    assert_eq!(
        s.post_as(&dr, Some("emergency"), "/fhir/$emergency-access", &lookup)
            .await
            .status,
        200
    );
    for (rt, id) in ids {
        let want = expected_read(
            Role::Doctor,
            OrgKind::Hospital,
            ConsentState::None,
            Mode::Emergency,
            rt,
        );
        assert_eq!(
            s.get_as(&dr, "emergency", &format!("/fhir/{rt}/{id}"))
                .await
                .status
                == 200,
            want,
            "emergency {rt}"
        );
        checked += 1;
    }
    eprintln!("matrix over HTTP: {checked} cells");
}
