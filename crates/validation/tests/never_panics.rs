//! The validator never panics, whatever the input: arbitrary JSON shaped like
//! FHIR (random keys from FHIR element names, random resource types, deep
//! nesting) and random mutations of official examples, against the built-in
//! validator and against the full JP package set. (Coverage-guided fuzzing:
//! fuzz/fuzz_targets/validate.rs.)

mod common;

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use tsunagi_fhir::Severity;
use tsunagi_validation::Validator;

const KEYS: &[&str] = &[
    "resourceType",
    "id",
    "meta",
    "profile",
    "extension",
    "url",
    "valueString",
    "valueQuantity",
    "valueIdentifier",
    "valueCodeableConcept",
    "value",
    "code",
    "coding",
    "system",
    "display",
    "text",
    "div",
    "status",
    "subject",
    "reference",
    "contained",
    "entry",
    "resource",
    "fullUrl",
    "type",
    "identifier",
    "name",
    "given",
    "family",
    "_given",
    "_status",
    "effectiveDateTime",
    "issued",
    "category",
    "component",
    "tag",
    "section",
    "modifierExtension",
    "telecom",
    "address",
    "birthDate",
    "gender",
    "medicationCodeableConcept",
    "dosageInstruction",
    "timing",
];
const TYPES: &[&str] = &[
    "Patient",
    "Observation",
    "Bundle",
    "Condition",
    "MedicationRequest",
    "Composition",
    "Encounter",
    "Nope",
    "",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-zA-Z0-9 :/#.|_-]{0,12}".prop_map(Value::String),
        prop::sample::select(TYPES).prop_map(|s| Value::String(s.to_string())),
        Just(json!("urn:uuid:00000000-0000-0000-0000-000000000000")),
        Just(json!("#")),
        Just(json!("2024-02-30T25:00:00+09:00")),
    ];
    leaf.prop_recursive(6, 96, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

fn resource() -> impl Strategy<Value = Value> {
    (prop::sample::select(TYPES), json_value()).prop_map(|(t, v)| {
        let mut m = match v {
            Value::Object(m) => m,
            other => {
                let mut m = Map::new();
                m.insert("extension".into(), other);
                m
            }
        };
        m.insert("resourceType".into(), json!(t));
        Value::Object(m)
    })
}

/// Replaces the node at a pseudo-random position with `with`.
fn mutate(v: &mut Value, mut pick: u64, with: &Value) -> bool {
    match v {
        Value::Object(m) => {
            let n = m.len() as u64;
            if n == 0 {
                return false;
            }
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = &keys[(pick % n) as usize];
            pick /= n.max(2);
            if pick.is_multiple_of(3)
                || !mutate(m.get_mut(k).unwrap_or(&mut Value::Null), pick, with)
            {
                m.insert(k.clone(), with.clone());
            }
            true
        }
        Value::Array(a) => {
            if a.is_empty() {
                return false;
            }
            let i = (pick % a.len() as u64) as usize;
            if pick.is_multiple_of(3) || !mutate(&mut a[i], pick / 3, with) {
                a[i] = with.clone();
            }
            true
        }
        _ => false,
    }
}

fn examples() -> Vec<Value> {
    let dir = common::shared("fixtures/jp-examples/clinical-core");
    let mut v: Vec<Value> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.ok()?.path()).ok()?).ok())
        .collect();
    v.sort_by_key(|x| x["id"].as_str().unwrap_or("").to_string());
    v
}

fn full() -> std::sync::Arc<Validator> {
    common::validator_for(&common::package_set_for("clinical-core"))
}

fn check(v: &Validator, r: &Value) {
    let issues = v.validate(r, None);
    assert!(
        !issues.iter().any(|i| i.severity == Severity::Fatal),
        "validator failure on {r}: {issues:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_json_never_panics(r in resource(), raw in json_value()) {
        let b = Validator::builtin();
        check(&b, &r);
        check(&b, &raw);
        check(&full(), &r);
    }

    #[test]
    fn mutated_examples_never_panic(idx in 0usize..1000, pick in any::<u64>(), with in json_value()) {
        let ex = examples();
        let mut r = ex[idx % ex.len()].clone();
        mutate(&mut r, pick, &with);
        check(&full(), &r);
    }
}

#[test]
fn deeply_nested_input_is_bounded() {
    // serde_json refuses input nested deeper than 128, so that is the deepest a
    // parsed request can be; build it from text as a client would send it
    let depth = 62;
    let mut text = String::new();
    for _ in 0..depth {
        text.push_str(r#"{"url":"x","extension":["#);
    }
    text.push_str(r#"{"url":"x","valueString":"y"}"#);
    for _ in 0..depth {
        text.push_str("]}");
    }
    let ext: Value = serde_json::from_str(&text).unwrap();
    let r = json!({"resourceType": "Patient", "extension": [ext]});
    check(&Validator::builtin(), &r);
    check(&full(), &r);
}
