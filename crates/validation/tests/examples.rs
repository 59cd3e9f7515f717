//! Acceptance: every official example in ../shared/fixtures/jp-examples validates
//! as its README status says. Valid examples: no error. Intentional error examples:
//! at least one error whose expression names the offending element.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tsunagi_fhir::Severity;

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
            folder = h.split_whitespace().next().unwrap_or("").trim_end_matches('/').to_string();
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
    assert!(all.len() >= 190, "expected the ~192 examples, found {}", all.len());
    let (mut ok, mut failures) = (0, Vec::new());
    let mut doubtful = Vec::new();
    for f in &all {
        let rel = f.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
        let expect = *status.get(&rel).unwrap_or_else(|| panic!("{rel} is not listed in the README"));
        let res: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        let folder = rel.rsplit_once('/').map(|(f, _)| f).unwrap_or("");
        let v = common::validator_for(&common::package_set_for(folder));
        let issues = v.validate(&res, None);
        let errors: Vec<_> = issues.iter().filter(|i| i.severity >= Severity::Error).collect();
        match expect {
            Expect::Valid if errors.is_empty() => ok += 1,
            Expect::Valid => failures.push(format!(
                "{rel}: expected valid, got {} error(s):\n{}",
                errors.len(),
                errors.iter().map(|i| format!("    {} {}: {}", i.code, i.expression.as_deref().unwrap_or("-"), i.message)).collect::<Vec<_>>().join("\n")
            )),
            Expect::Invalid => {
                if errors.iter().any(|i| i.expression.as_deref().is_some_and(|e| e.contains('.'))) {
                    ok += 1;
                } else {
                    failures.push(format!("{rel}: intentional error example, but no error naming an element: {issues:?}"));
                }
            }
            Expect::Doubtful => doubtful.push(format!("{rel}: {} error(s) {:?}", errors.len(), errors.iter().map(|i| &i.message).collect::<Vec<_>>())),
        }
    }
    eprintln!("examples: {ok} as expected, {} not, {} doubtful", failures.len(), doubtful.len());
    for d in &doubtful {
        eprintln!("doubtful: {d}");
    }
    assert!(failures.is_empty(), "{} example(s) did not validate as documented:\n{}", failures.len(), failures.join("\n"));
}
