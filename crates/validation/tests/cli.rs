//! The CLI entry points the binary wires in: exit codes and side effects.

mod common;

use std::path::PathBuf;

use tsunagi_validation::cli::{
    PackagesArgs, PackagesCommand, ValidateArgs, run_packages, run_validate,
};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tsunagi-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn args(files: Vec<PathBuf>, packages: Vec<PathBuf>, data_dir: Option<PathBuf>) -> ValidateArgs {
    ValidateArgs {
        files,
        profile: None,
        packages,
        data_dir,
        summary: true,
    }
}

#[test]
fn validate_exit_codes() {
    let d = tmp("validate");
    let good = d.join("good.json");
    std::fs::write(&good, r#"{"resourceType":"Patient","gender":"male"}"#).unwrap();
    let bad = d.join("bad.json");
    std::fs::write(&bad, r#"{"resourceType":"Patient","gender":"man"}"#).unwrap();
    let nd = d.join("many.ndjson");
    std::fs::write(&nd, "{\"resourceType\":\"Patient\"}\n\n{\"resourceType\":\"Patient\",\"birthDate\":\"x\"}\nnot json\n").unwrap();
    assert_eq!(
        run_validate(args(vec![good.clone()], vec![], None)).unwrap(),
        0
    );
    assert_eq!(run_validate(args(vec![bad], vec![], None)).unwrap(), 1);
    assert_eq!(run_validate(args(vec![nd], vec![], None)).unwrap(), 1);
    assert!(run_validate(args(vec![d.join("missing.json")], vec![], None)).is_err());
}

#[test]
fn packages_install_then_validate_with_data_dir() {
    let d = tmp("packages");
    for p in [
        "current/hl7.fhir.r4.core-4.0.1.tgz",
        "variants/jp-core.r4-1.1.2-url.tgz",
        "jp-clins.r4-1.5.2.tgz",
    ] {
        let code = run_packages(PackagesArgs {
            command: PackagesCommand::Install {
                path: common::shared(&format!("fhir-packages/{p}")),
                data_dir: d.clone(),
            },
        })
        .unwrap();
        assert_eq!(code, 0);
    }
    assert_eq!(
        run_packages(PackagesArgs {
            command: PackagesCommand::List {
                data_dir: d.clone()
            }
        })
        .unwrap(),
        0
    );
    let v = tsunagi_validation::Validator::load(&d).unwrap();
    assert!(
        v.has_profile("http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Observation_LabResult_eCS")
    );
    let ex = common::shared(
        "fixtures/jp-examples/clinical-core/Observation-Example-JP-Obs-LabResult-eCS-K.json",
    );
    assert_eq!(run_validate(args(vec![ex], vec![], Some(d))).unwrap(), 0);
    // a file that is not a package is refused
    let junk = tmp("junk").join("x.tgz");
    std::fs::write(&junk, b"not a tarball").unwrap();
    assert!(
        run_packages(PackagesArgs {
            command: PackagesCommand::Install {
                path: junk,
                data_dir: tmp("junk2")
            }
        })
        .is_err()
    );
}

#[test]
fn differential_only_packages_are_flagged() {
    let d = tmp("diffonly");
    let info = tsunagi_validation::install_package(
        &common::shared("fhir-packages/variants/jp-core.r4-1.1.2-pkgValidation.tgz"),
        &d,
    )
    .unwrap();
    assert!(info.without_snapshot > 50, "{info:?}");
    let info = tsunagi_validation::install_package(
        &common::shared("fhir-packages/jp-core.r4-1.1.2.tgz"),
        &tmp("snap"),
    )
    .unwrap();
    assert_eq!(info.without_snapshot, 0, "{info:?}");
}

#[test]
fn duplicate_canonicals_across_packages_are_decided_and_noted() {
    let v =
        tsunagi_validation::Validator::from_paths(&[common::shared("fhir-packages/current")], None)
            .unwrap();
    // the eClinicalSummary profiles are in JP-CLINS, eReferral and eDischargeSummary
    assert!(v.has_profile("http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Patient_eCS"));
    // the built-in R4 table is replaced silently by the R4 core package
    assert!(
        !v.load_notes()
            .iter()
            .any(|n| n.contains("http://hl7.org/fhir/StructureDefinition/Patient:")),
        "{:?}",
        &v.load_notes()[..v.load_notes().len().min(5)]
    );
    eprintln!("{} duplicate decisions", v.load_notes().len());
}
