//! Property tests: the parsers every request reaches never panic, whatever the input.

use proptest::prelude::*;
use serde_json::{Value, json};
use tsunagi_fhir::{datetime, index, query};

/// Arbitrary JSON, biased towards FHIR-looking shapes (known keys, references, dates).
fn arb_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("reference".to_string()),
        Just("subject".to_string()),
        Just("patient".to_string()),
        Just("coding".to_string()),
        Just("system".to_string()),
        Just("code".to_string()),
        Just("value".to_string()),
        Just("valueQuantity".to_string()),
        Just("effectiveDateTime".to_string()),
        Just("effectivePeriod".to_string()),
        Just("start".to_string()),
        Just("end".to_string()),
        Just("name".to_string()),
        Just("family".to_string()),
        Just("given".to_string()),
        Just("identifier".to_string()),
        Just("birthDate".to_string()),
        Just("id".to_string()),
        "[a-zA-Z]{1,12}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        "\\PC{0,24}".prop_map(Value::String),
        "(Patient|Group|Observation)/[a-z0-9-]{0,8}(/_history/[0-9]{1,3})?".prop_map(Value::String),
        "[0-9]{4}(-[0-9]{2}(-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\\.[0-9]{1,4})?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?"
            .prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

const TYPES: &[&str] = &[
    "Patient",
    "Observation",
    "Condition",
    "MedicationRequest",
    "Coverage",
    "Encounter",
    "Bundle",
    "Organization",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn index_extraction_never_panics(body in arb_json(), t in 0..TYPES.len()) {
        let rt = TYPES[t];
        let mut body = body;
        if let Value::Object(o) = &mut body {
            o.insert("resourceType".into(), json!(rt));
        }
        let entries = index::extract(rt, &body);
        let _ = index::compartment_patient(rt, &body);
        // a date entry is always an ordered range
        for e in entries {
            if let tsunagi_fhir::search::IndexValue::Date { lo, hi } = e.value {
                prop_assert!(lo <= hi);
            }
        }
    }

    #[test]
    fn query_parser_never_panics(
        pairs in prop::collection::vec(("(_?[a-z-]{1,12})(:[a-zA-Z]{1,8})?", "\\PC{0,30}"), 0..6),
        t in 0..TYPES.len(),
        lenient in any::<bool>(),
    ) {
        let pairs: Vec<(String, String)> = pairs;
        match query::parse_with(TYPES[t], &pairs, lenient) {
            Ok(p) => prop_assert!(p.query.count <= query::MAX_COUNT),
            Err(e) => prop_assert!(e.status == 400 && !e.issues.is_empty()),
        }
    }

    #[test]
    fn date_parser_never_panics_and_orders(s in "\\PC{0,40}") {
        if let Some((lo, hi)) = datetime::parse_range(&s) {
            prop_assert!(lo <= hi);
        }
    }

    #[test]
    fn well_formed_dates_parse(y in 1900i32..2100, m in 1u32..=12, d in 1u32..=28, h in 0u32..24, mi in 0u32..60) {
        let s = format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:00+09:00");
        let (lo, hi) = datetime::parse_range(&s).expect("valid dateTime parses");
        prop_assert_eq!(hi - lo, 999);
        let day = datetime::parse_range(&s[..10]).expect("valid date parses");
        prop_assert!(day.0 <= lo && hi <= day.1, "the instant lies within its day");
    }
}
