//! The extracts are plain Parquet with the documented schema: a second engine
//! (DuckDB, from Python) opens every file and agrees on rows, columns, types and
//! an aggregate. Fails (never skips) when DuckDB is missing, naming the install
//! command.

use std::process::Command;

use serde_json::{Value, json};
use tsunagi_research_primary::extract::{ExtractConfig, Extractor};
use tsunagi_research_primary::{LinkageKey, OptOutSnapshot};

#[test]
fn duckdb_opens_every_extract_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = LinkageKey::from_bytes([5; 32]);
    let cfg = ExtractConfig {
        dataset: "engine-check".into(),
        research_dir: dir.path().to_path_buf(),
    };
    let mut ex = Extractor::new(&cfg, &key, OptOutSnapshot::empty()).unwrap();
    for n in 0..50 {
        let person = format!("p{n}");
        ex.push(
            "Patient",
            &person,
            &json!({"resourceType": "Patient", "gender": "female", "birthDate": "1990-01-02"}),
        )
        .unwrap();
        for (code, v) in [("29463-7", 50.0 + n as f64), ("8480-6", 120.0)] {
            ex.push("Observation", &person, &json!({
                "resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "effectiveDateTime": "2026-04-01", "valueQuantity": {"value": v, "unit": "kg"}
            })).unwrap();
        }
        ex.push("Condition", &person, &json!({"resourceType": "Condition", "code": {"coding": [{"code": "E11"}]}, "recordedDate": "2026-01-05"})).unwrap();
    }
    let rep = ex.finish("test").unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/second_engine.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&rep.dir)
        .output()
        .expect("python3 must be installed to run the second-engine check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "second engine failed (exit {:?}): {stderr}\nIf DuckDB is missing: pip install duckdb",
        out.status.code()
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON from the script");
    assert!(v["engine"].as_str().unwrap().starts_with("duckdb"));
    assert_eq!(
        v["tables"]["observation"],
        json!({"rows": 100, "persons": 50})
    );
    assert_eq!(v["tables"]["patient"]["rows"], 50);
    assert_eq!(v["tables"]["medication_dispense"]["rows"], 0);
    assert_eq!(v["avg_by_code"]["29463-7"], 74.5);
    assert_eq!(v["avg_by_code"]["8480-6"], 120.0);
}
