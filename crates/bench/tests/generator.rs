//! Smoke test of the synthetic data generator: deterministic, 20 resources per
//! patient, valid shapes and realistic sizes.

use tsunagi_bench::synth::{RESOURCES_PER_PATIENT, Synth};

fn render(s: &Synth, patients: u64) -> String {
    let mut out = String::new();
    for n in 0..patients {
        for r in s.patient(n) {
            out.push_str(&serde_json::to_string(&r).unwrap());
            out.push('\n');
        }
    }
    out
}

#[test]
fn deterministic_counts_and_sizes() {
    let a = render(&Synth::new(42, 4), 25);
    let b = render(&Synth::new(42, 4), 25);
    assert_eq!(a, b, "same seed, same data");
    assert_ne!(
        a,
        render(&Synth::new(43, 4), 25),
        "another seed, other data"
    );
    let lines: Vec<&str> = a.lines().collect();
    assert_eq!(lines.len(), 25 * RESOURCES_PER_PATIENT);
    let mut types = std::collections::BTreeMap::new();
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        tsunagi_server::validate::check_shape(&v, None).unwrap();
        *types
            .entry(v["resourceType"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(types["Patient"], 25);
    assert_eq!(types["Observation"], 250);
    assert_eq!(types["Encounter"], 75);
    let avg = a.len() / lines.len();
    assert!(
        (400..2000).contains(&avg),
        "average resource size {avg} bytes"
    );
    let bundle = Synth::new(42, 4).transaction(3);
    assert_eq!(
        bundle["entry"].as_array().unwrap().len(),
        RESOURCES_PER_PATIENT
    );
}
