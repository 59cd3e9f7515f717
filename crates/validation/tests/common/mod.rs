//! Shared test helpers: paths into ../shared and a validator with all packages.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tsunagi_validation::Validator;

pub fn shared(rel: &str) -> PathBuf {
    let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")).join(rel);
    assert!(
        p.exists(),
        "reference data missing: {} (tests read ../shared relative to the repository root)",
        p.display()
    );
    p
}

/// Imports the masters of ../shared into a fresh data directory.
pub fn data_dir_with_masters() -> PathBuf {
    use tsunagi_terminology::{MasterKind, import};
    let dir = std::env::temp_dir().join(format!("tsunagi-validation-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (f, k) in [
        ("masters/drug-master-y.csv", MasterKind::Drug),
        ("masters/disease-master-b.csv", MasterKind::Disease),
        ("masters/modifier-master-z.csv", MasterKind::Modifier),
        (
            "codesets/jp-clins-1.5.2/CodeSystem-jp-clins-codesystem-JLAC10-corelabo-cs.json",
            MasterKind::Jlac10,
        ),
        (
            "codesets/jp-clins-1.5.2/CodeSystem-jp-clins-codesystem-JLAC10-infectionlabo-cs.json",
            MasterKind::Jlac10,
        ),
        (
            "codesets/jfagy/JFAGY_J9FN_20250401_R01.csv",
            MasterKind::Jfagy,
        ),
    ] {
        let r = import(&shared(f), k, &dir).unwrap();
        assert!(r.errors.is_empty(), "{f}: {:?}", r.errors);
    }
    dir
}

/// All packages of ../shared/fhir-packages/current plus the imported masters.
pub fn full_validator() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| {
        let dir = data_dir_with_masters();
        let term = tsunagi_terminology::Terminology::open(&dir).unwrap();
        Validator::from_paths(&[shared("fhir-packages/current")], Some(term)).unwrap()
    })
}

/// The package set an example folder was published with (relative to fhir-packages/).
pub fn package_set_for(folder: &str) -> Vec<&'static str> {
    let core = "current/hl7.fhir.r4.core-4.0.1.tgz";
    match folder {
        "clinical-core" | "packages/jp-clins.r4-1.5.2" => vec![
            core,
            "variants/jp-core.r4-1.1.2-url.tgz",
            "jp-clins.r4-1.5.2.tgz",
        ],
        f if f.starts_with("ePrescriptionData") => vec![
            core,
            "jp-core.r4-1.1.2.tgz",
            "compiled/jp-ePrescriptionData.r4-1.0.0-snap.tgz",
        ],
        "packages/jp-clins.r4-0.9.7" => vec![core, "jp-core.r4-1.1.2.tgz", "jp-clins.r4-0.9.7.tgz"],
        "packages/jp-eChekupReport.r4" => vec![
            core,
            "variants/jp-core.r4-1.1.2-clins.tgz",
            "jp-clins.r4-0.9.7.tgz",
            "jp-eChekupReport.r4.tgz",
        ],
        "packages/jp-eReferral.r4" => vec![core, "jp-core.r4-1.1.2.tgz", "jp-eReferral.r4.tgz"],
        "packages/jp-eReferral-0.9.0-beta" => vec![
            core,
            "jp-core.r4-1.1.2.tgz",
            "variants/jp-eReferral-0.9.0-beta.tgz",
        ],
        _ => vec![core, "jp-core.r4-1.1.2.tgz"],
    }
}

/// A validator for one package set (cached), with the imported masters.
pub fn validator_for(set: &[&str]) -> std::sync::Arc<Validator> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Validator>>>> = OnceLock::new();
    static MASTERS: OnceLock<PathBuf> = OnceLock::new();
    let key = set.join("+");
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(v) = cache.lock().unwrap().get(&key) {
        return v.clone();
    }
    let dir = MASTERS.get_or_init(data_dir_with_masters);
    let term = tsunagi_terminology::Terminology::open(dir).unwrap();
    let paths: Vec<PathBuf> = set
        .iter()
        .map(|p| shared(&format!("fhir-packages/{p}")))
        .collect();
    let v = Arc::new(Validator::from_paths(&paths, Some(term)).unwrap());
    cache.lock().unwrap().insert(key, v.clone());
    v
}
