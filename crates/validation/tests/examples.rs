//! Acceptance: every official example in ../shared/fixtures/jp-examples validates
//! as its README status says. Valid examples: no error. Intentional error examples:
//! at least one error whose expression names the offending element.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tsunagi_fhir::Severity;

/// Published examples that disagree with the profiles of the package they were
/// published with (see docs/VALIDATION.md, "Official examples"): (folder prefix,
/// the error texts they are allowed to produce). Every error of such a file must
/// contain one of the texts; anything else fails the test.
const KNOWN_DEFECTS: &[(&str, &[&str])] = &[
    // e-prescription examples (draft 0.1.0 era) against the profiles compiled from the same
    // FSH: usage-code system `...2.2.20` fixed vs `...2.2.20.20` used; JP Core 1.1.2
    // extensions typed valueCoding vs valueIdentifier used (examples follow the JP Core
    // draft); `checkQualification-DoctorLicenseExists` tests the system
    // `practitioner_certificate_category` (underscore) while the examples use the
    // hyphenated system; the hand-written source JSON puts single objects where arrays are
    // required.
    (
        "ePrescriptionData/",
        &[
            "found \"urn:oid:1.2.392.200250.2.2.20.20\"",
            "Type Identifier is not allowed",
            "Organization.extension.value[x] is required",
            "Slice 'medicalInstitutionCode' of Organization.identifier",
            "checkQualification-DoctorLicenseExists",
            "must be a JSON array",
        ],
    ),
    // eCheckupReport 1.1.3 examples: JP_Patient_eCS of jp-clins 0.9.7 requires address.city/state.
    (
        "packages/jp-eChekupReport.r4/",
        &[
            "Patient.address.city is required",
            "Patient.address.state is required",
        ],
    ),
    // eReferral 0.9.0-beta: extension valueIdentifier where JP Core 1.1.2 defines valueCoding.
    (
        "packages/jp-eReferral-0.9.0-beta/",
        &["Type Identifier is not allowed"],
    ),
];

fn known_defect(rel: &str, messages: &[&str]) -> bool {
    KNOWN_DEFECTS.iter().any(|(prefix, texts)| {
        rel.starts_with(prefix) && messages.iter().all(|m| texts.iter().any(|t| m.contains(t)))
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Valid,
    Invalid,
    /// The README marks the expected outcome as doubtful.
    Doubtful,
}

/// file path (relative to jp-examples) -> expectation, from the README tables.
fn statuses(root: &Path) -> HashMap<String, Expect> {
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut folder = String::new();
    let mut out = HashMap::new();
    for line in readme.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            folder = h
                .split_whitespace()
                .next()
                .unwrap_or("")
                .trim_end_matches('/')
                .to_string();
            continue;
        }
        let cells: Vec<&str> = line.split(" | ").collect();
        if cells.len() < 4 || !cells[0].starts_with("| `") {
            continue;
        }
        let file = cells[0].trim_start_matches("| `").trim_end_matches('`');
        if !file.ends_with(".json") {
            continue;
        }
        let status = cells[3];
        let e = if status.contains("doubtful") {
            Expect::Doubtful
        } else if status.contains("invalid") {
            Expect::Invalid
        } else {
            Expect::Valid
        };
        out.insert(format!("{folder}/{file}"), e);
    }
    out
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
}

#[test]
fn official_examples_validate_as_documented() {
    let root = common::shared("fixtures/jp-examples");
    let status = statuses(&root);
    let mut all = Vec::new();
    files(&root, &mut all);
    all.sort();
    assert!(
        all.len() >= 190,
        "expected the ~192 examples, found {}",
        all.len()
    );
    let (mut ok, mut failures) = (0, Vec::new());
    let mut doubtful = Vec::new();
    let mut defects = Vec::new();
    for f in &all {
        let rel = f
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let expect = *status
            .get(&rel)
            .unwrap_or_else(|| panic!("{rel} is not listed in the README"));
        let res: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        let folder = rel.rsplit_once('/').map(|(f, _)| f).unwrap_or("");
        let v = common::validator_for(&common::package_set_for(folder));
        let issues = v.validate(&res, None);
        let errors: Vec<_> = issues
            .iter()
            .filter(|i| i.severity >= Severity::Error)
            .collect();
        if std::env::var_os("TSUNAGI_SHOW_WARNINGS").is_some() {
            for i in issues.iter().filter(|i| i.severity < Severity::Error) {
                eprintln!(
                    "W {rel}: {} {}: {}",
                    i.code,
                    i.expression.as_deref().unwrap_or("-"),
                    i.message
                );
            }
        }
        match expect {
            Expect::Valid if errors.is_empty() => ok += 1,
            Expect::Valid
                if known_defect(
                    &rel,
                    &errors
                        .iter()
                        .map(|i| i.message.as_str())
                        .collect::<Vec<_>>(),
                ) =>
            {
                defects.push(rel.clone());
            }
            Expect::Valid => failures.push(format!(
                "{rel}: expected valid, got {} error(s):\n{}",
                errors.len(),
                errors
                    .iter()
                    .map(|i| format!(
                        "    {} {}: {}",
                        i.code,
                        i.expression.as_deref().unwrap_or("-"),
                        i.message
                    ))
                    .collect::<Vec<_>>()
                    .join("\n")
            )),
            Expect::Invalid => {
                if errors
                    .iter()
                    .any(|i| i.expression.as_deref().is_some_and(|e| e.contains('.')))
                {
                    ok += 1;
                } else {
                    failures.push(format!("{rel}: intentional error example, but no error naming an element: {issues:?}"));
                }
            }
            Expect::Doubtful => doubtful.push(format!(
                "{rel}: {} error(s) {:?}",
                errors.len(),
                errors.iter().map(|i| &i.message).collect::<Vec<_>>()
            )),
        }
    }
    eprintln!(
        "examples: {ok} as expected, {} known example defects, {} not as expected, {} doubtful",
        defects.len(),
        failures.len(),
        doubtful.len()
    );
    for d in &doubtful {
        eprintln!("doubtful: {d}");
    }
    assert!(
        failures.is_empty(),
        "{} example(s) did not validate as documented:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Not an acceptance criterion: how the examples fare against `current/` (the newest
/// package of every IG together) instead of the build each was published with.
/// Run with `cargo test -p tsunagi-validation --test examples -- --ignored --nocapture`.
#[test]
#[ignore]
fn report_examples_against_current_set() {
    let root = common::shared("fixtures/jp-examples");
    let status = statuses(&root);
    let v = common::validator_for(&["current"]);
    let mut all = Vec::new();
    files(&root, &mut all);
    all.sort();
    let mut by_folder: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for f in &all {
        let rel = f
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let folder = rel
            .rsplit_once('/')
            .map(|(f, _)| f.to_string())
            .unwrap_or_default();
        if status.get(&rel) != Some(&Expect::Valid) {
            continue;
        }
        let res: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        let ok = !v
            .validate(&res, None)
            .iter()
            .any(|i| i.severity >= Severity::Error);
        let e = by_folder.entry(folder).or_default();
        e.0 += ok as usize;
        e.1 += 1;
    }
    for (f, (ok, n)) in by_folder {
        eprintln!("current set: {f}: {ok}/{n} valid examples without errors");
    }
}

/// Every invariant of the current Japanese package set (and R4 core) can be run by
/// the FHIRPath subset evaluator; none is left as "not evaluated".
#[test]
fn invariants_of_the_loaded_profiles_are_all_evaluable() {
    let v = common::validator_for(&["current"]);
    let c = v.constraint_coverage();
    eprintln!(
        "invariants: {} total, {} native, {} not evaluable",
        c.total,
        c.native,
        c.unsupported.len()
    );
    for u in &c.unsupported {
        eprintln!("  {u:?}");
    }
    assert!(c.total > 1000, "{c:?}");
    assert!(c.unsupported.is_empty(), "{:#?}", c.unsupported);
}
