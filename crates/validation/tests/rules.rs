//! Negative tests: one instance per rule kind, each breaking exactly that rule,
//! starting from a valid official example (JP-CLINS lab Observation, potassium).

mod common;

use serde_json::{Value, json};
use tsunagi_fhir::{Issue, Severity};
use tsunagi_validation::Validator;

fn validator() -> std::sync::Arc<Validator> {
    common::validator_for(&common::package_set_for("clinical-core"))
}

fn example(name: &str) -> Value {
    let p = common::shared(&format!("fixtures/jp-examples/clinical-core/{name}"));
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn lab() -> Value {
    example("Observation-Example-JP-Obs-LabResult-eCS-K.json")
}

fn errors(v: &Value) -> Vec<Issue> {
    validator()
        .validate(v, None)
        .into_iter()
        .filter(|i| i.severity >= Severity::Error)
        .collect()
}

/// Exactly the expected error: at least one error at `expr` whose message contains
/// `text`, and no error elsewhere.
#[track_caller]
fn assert_only_error(v: &Value, expr: &str, text: &str) {
    let errs = errors(v);
    assert!(
        errs.iter()
            .any(|i| i.expression.as_deref() == Some(expr) && i.message.contains(text)),
        "expected an error at {expr} containing {text:?}, got {errs:#?}"
    );
    let others: Vec<_> = errs
        .iter()
        .filter(|i| i.expression.as_deref() != Some(expr))
        .collect();
    assert!(others.is_empty(), "unexpected other errors: {others:#?}");
}

#[test]
fn the_base_example_is_valid() {
    assert!(errors(&lab()).is_empty(), "{:#?}", errors(&lab()));
}

#[test]
fn cardinality_missing_required_element() {
    let mut v = lab();
    v.as_object_mut().unwrap().remove("status");
    assert_only_error(&v, "Observation.status", "minimum cardinality 1");
}

#[test]
fn cardinality_too_many() {
    let mut v = lab();
    v["category"]
        .as_array_mut()
        .unwrap()
        .push(json!({"text": "extra"}));
    v["category"]
        .as_array_mut()
        .unwrap()
        .push(json!({"text": "extra2"}));
    let errs = errors(&v);
    assert!(
        errs.iter()
            .any(|i| i.expression.as_deref() == Some("Observation.category")
                && i.message.contains("at most")),
        "{errs:#?}"
    );
}

#[test]
fn data_type_wrong_json_kind() {
    let mut v = lab();
    v["subject"] = json!("Patient/1");
    assert_only_error(&v, "Observation.subject", "must be a JSON object");
}

#[test]
fn choice_type_not_allowed() {
    let mut v = lab();
    let q = v.as_object_mut().unwrap().remove("valueQuantity").unwrap();
    let _ = q;
    v["valuePeriod"] = json!({"start": "2021-07-05"});
    assert_only_error(&v, "Observation.valuePeriod", "Type Period is not allowed");
}

#[test]
fn primitive_date_time_format() {
    let mut v = lab();
    v["effectiveDateTime"] = json!("2021-13-05");
    assert_only_error(&v, "Observation.effectiveDateTime", "not a valid dateTime");
}

#[test]
fn primitive_instant_format() {
    let mut v = lab();
    v["issued"] = json!("2021-07-05");
    assert_only_error(&v, "Observation.issued", "not a valid instant");
}

#[test]
fn primitive_id_format() {
    let mut v = lab();
    v["id"] = json!("not an id!");
    assert_only_error(&v, "Observation.id", "not a valid id");
}

#[test]
fn primitive_code_format() {
    let mut v = lab();
    v["language"] = json!("ja  JP");
    let errs = errors(&v);
    assert!(
        errs.iter()
            .any(|i| i.expression.as_deref() == Some("Observation.language")
                && i.message.contains("not a valid code")),
        "{errs:#?}"
    );
}

#[test]
fn fixed_value() {
    let mut v = lab();
    // the unCoded slice (system + display) fixes code 99999999999999999
    v["code"]["coding"].as_array_mut().unwrap().push(json!({
        "system": "http://jpfhir.jp/fhir/clins/CodeSystem/JP_CLINS_ObsLabResult_Uncoded_CS",
        "code": "123",
        "display": "未標準化コード項目(JLAC)"
    }));
    assert_only_error(
        &v,
        "Observation.code.coding[3].code",
        "must be exactly \"99999999999999999\"",
    );
}

#[test]
fn pattern_value() {
    let mut v = lab();
    // meta.tag is sliced (closed) by code; the `lts` slice's system has a pattern
    v["meta"]["tag"] = json!([{"system": "http://example.org/other", "code": "LTS"}]);
    let errs = errors(&v);
    assert!(
        errs.iter().any(
            |i| i.expression.as_deref() == Some("Observation.meta.tag[0].system")
                && i.message.contains("must match the pattern")
        ),
        "{errs:#?}"
    );
    // the only other finding is the tag's required binding, on the same tag
    assert!(
        errs.iter().all(|i| i
            .expression
            .as_deref()
            .is_some_and(|e| e.starts_with("Observation.meta.tag[0]"))),
        "{errs:#?}"
    );
}

#[test]
fn required_binding() {
    let mut v = lab();
    v["status"] = json!("done");
    assert_only_error(&v, "Observation.status", "is not in ValueSet");
}

#[test]
fn extensible_binding_is_a_warning() {
    let mut v = lab();
    v["interpretation"] = json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "NOPE"}]}]);
    let issues = validator().validate(&v, None);
    assert!(
        !issues.iter().any(|i| i.severity >= Severity::Error),
        "{issues:#?}"
    );
    assert!(
        issues.iter().any(|i| i.severity == Severity::Warning
            && i.expression.as_deref() == Some("Observation.interpretation[0]")
            && i.message.contains("extensible")),
        "{issues:#?}"
    );
}

#[test]
fn slicing_closed_rejects_unknown_slice() {
    let mut v = lab();
    v["meta"]["tag"] = json!([{"system": "http://jpfhir.jp/fhir/clins/CodeSystem/JP_ehrshrs_indication", "code": "OTHER"}]);
    assert_only_error(&v, "Observation.meta.tag[0]", "matches none of the slices");
}

#[test]
fn slicing_slice_cardinality() {
    let mut v = lab();
    // two codings in the unCoded slice (max 1)
    for _ in 0..2 {
        v["code"]["coding"].as_array_mut().unwrap().push(json!({
            "system": "http://jpfhir.jp/fhir/clins/CodeSystem/JP_CLINS_ObsLabResult_Uncoded_CS",
            "code": "99999999999999999",
            "display": "未標準化コード項目(JLAC)"
        }));
    }
    let errs = errors(&v);
    assert!(
        errs.iter().any(
            |i| i.expression.as_deref() == Some("Observation.code.coding")
                && i.message.contains("Slice 'unCoded'")
        ),
        "{errs:#?}"
    );
}

#[test]
fn slicing_required_slice_missing() {
    let mut v = lab();
    v["category"] = json!([{"coding": [{"system": "http://jpfhir.jp/fhir/core/CodeSystem/JP_SimpleObservationCategory_CS", "code": "vital-signs"}]}]);
    let errs = errors(&v);
    assert!(
        errs.iter()
            .any(|i| i.expression.as_deref() == Some("Observation.category")
                && i.message.contains("Slice 'laboratory'")),
        "{errs:#?}"
    );
}

#[test]
fn extension_by_url_checks_its_definition() {
    let mut v = lab();
    // JP_eCS_Department is a CodeableConcept extension
    v["extension"][1] = json!({"url": "http://jpfhir.jp/fhir/eCS/Extension/StructureDefinition/JP_eCS_Department", "valueString": "循環器科"});
    let errs = errors(&v);
    assert!(
        errs.iter()
            .any(|i| i.expression.as_deref() == Some("Observation.extension[1].valueString")),
        "{errs:#?}"
    );
}

#[test]
fn unknown_extension_is_a_warning() {
    let mut v = lab();
    v["extension"]
        .as_array_mut()
        .unwrap()
        .push(json!({"url": "http://example.org/unknown-ext", "valueString": "x"}));
    let issues = validator().validate(&v, None);
    assert!(
        !issues.iter().any(|i| i.severity >= Severity::Error),
        "{issues:#?}"
    );
    assert!(
        issues.iter().any(
            |i| i.expression.as_deref() == Some("Observation.extension[2]")
                && i.message.contains("not known")
        ),
        "{issues:#?}"
    );
}

#[test]
fn unknown_element() {
    let mut v = lab();
    v["colour"] = json!("red");
    assert_only_error(&v, "Observation.colour", "Unknown element 'colour'");
}

#[test]
fn invariant_from_the_profile() {
    let mut v = lab();
    // obs-6: dataAbsentReason SHALL only be present if value[x] is not present
    v["dataAbsentReason"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown"}]});
    assert_only_error(&v, "Observation", "obs-6");
}

#[test]
fn contained_reference_to_nothing() {
    let mut v = lab();
    v["performer"] = json!([{"reference": "#nobody"}]);
    let errs = errors(&v);
    assert!(
        errs.iter().any(
            |i| i.expression.as_deref() == Some("Observation.performer[0].reference")
                && i.message.contains("does not exist")
        ),
        "{errs:#?}"
    );
}

#[test]
fn bundle_reference_to_nothing() {
    let mut b = example("Bundle-Bundle-CLINS-Observations-Example-01.json");
    assert!(errors(&b).is_empty(), "{:#?}", errors(&b));
    let entries = b["entry"].as_array_mut().unwrap();
    let i = entries
        .iter()
        .position(|e| e["resource"]["resourceType"] == "Observation")
        .unwrap();
    entries[i]["resource"]["subject"] =
        json!({"reference": "urn:uuid:00000000-0000-0000-0000-000000000000"});
    let errs = errors(&b);
    let expr = format!("Bundle.entry[{i}].resource.subject.reference");
    assert!(
        errs.iter()
            .any(|e| e.expression.as_deref() == Some(expr.as_str())
                && e.message.contains("does not resolve")),
        "{errs:#?}"
    );
}

#[test]
fn master_code_general_name_code() {
    let v = example("MedicationRequest-ErrorExample-JP-MedReq-PO-SID-28days.json");
    let errs = errors(&v);
    assert!(
        errs.iter().any(|i| i.message.contains("2124030F2ZZZ")
            && i.expression.as_deref().is_some_and(
                |e| e.starts_with("MedicationRequest.medicationCodeableConcept.coding")
            )),
        "{errs:#?}"
    );
    let ok = example("MedicationRequest-Example-JP-MedReq-PO-SID-28days.json");
    assert!(errors(&ok).is_empty(), "{:#?}", errors(&ok));
}

#[test]
fn unsupported_invariant_is_a_warning_not_a_pass() {
    // a profile whose invariant uses memberOf(), which the evaluator does not implement
    let mut conf = tsunagi_validation::Conformance::builtin_r4();
    let mut sd = conf
        .structure_definition("http://hl7.org/fhir/StructureDefinition/Patient")
        .unwrap();
    sd["url"] = json!("http://example.org/StructureDefinition/test-patient");
    sd["derivation"] = json!("constraint");
    sd["snapshot"]["element"][0]["constraint"] = json!([{"key": "t-1", "severity": "error", "human": "gender from a value set", "expression": "gender.memberOf('http://example.org/vs')"}]);
    conf.add_resource(sd);
    let v = Validator::from_parts(conf, None);
    let issues = v.validate(
        &json!({"resourceType": "Patient", "gender": "male"}),
        Some("http://example.org/StructureDefinition/test-patient"),
    );
    assert!(
        issues.iter().any(|i| i.severity == Severity::Warning
            && i.message.contains("t-1")
            && i.message.contains("not evaluated")),
        "{issues:#?}"
    );
}

#[test]
fn builtin_checks_structure_without_packages() {
    let v = Validator::builtin();
    let ok = v.validate(
        &json!({"resourceType": "Patient", "gender": "male", "birthDate": "1970-01-01"}),
        None,
    );
    assert!(!ok.iter().any(|i| i.severity >= Severity::Error), "{ok:#?}");
    let issues = v.validate(
        &json!({"resourceType": "Patient", "gender": "man", "birthDate": "1970-13-01", "foo": 1}),
        None,
    );
    let exprs: Vec<_> = issues
        .iter()
        .filter(|i| i.severity >= Severity::Error)
        .filter_map(|i| i.expression.clone())
        .collect();
    assert!(exprs.contains(&"Patient.gender".to_string()), "{issues:#?}");
    assert!(
        exprs.contains(&"Patient.birthDate".to_string()),
        "{issues:#?}"
    );
    assert!(exprs.contains(&"Patient.foo".to_string()), "{issues:#?}");
    let issues = v.validate(&json!({"resourceType": "NotAType"}), None);
    assert!(
        issues.iter().any(|i| i.severity >= Severity::Error),
        "{issues:#?}"
    );
}

#[test]
fn max_length() {
    let mut conf = tsunagi_validation::Conformance::builtin_r4();
    let mut sd = conf
        .structure_definition("http://hl7.org/fhir/StructureDefinition/Patient")
        .unwrap();
    sd["url"] = json!("http://example.org/StructureDefinition/short-gender");
    sd["derivation"] = json!("constraint");
    for e in sd["snapshot"]["element"].as_array_mut().unwrap() {
        if e["path"] == "Patient.gender" {
            e["maxLength"] = json!(4);
        }
    }
    conf.add_resource(sd);
    let v = Validator::from_parts(conf, None);
    let p = Some("http://example.org/StructureDefinition/short-gender");
    assert!(!tsunagi_validation::has_errors(&v.validate(
        &json!({"resourceType": "Patient", "gender": "male"}),
        p
    )));
    let issues = v.validate(&json!({"resourceType": "Patient", "gender": "female"}), p);
    assert!(
        issues.iter().any(|i| i.severity == Severity::Error
            && i.expression.as_deref() == Some("Patient.gender")
            && i.message.contains("limited to 4")),
        "{issues:#?}"
    );
}

#[test]
fn reference_target_type() {
    let mut v = lab();
    // encounter must reference an Encounter; point it at the contained Practitioner
    v["encounter"] = json!({"reference": "#Example-Contained-JP-Practitioner-minimun-D002"});
    let errs = errors(&v);
    assert!(
        errs.iter().any(
            |i| i.expression.as_deref() == Some("Observation.encounter.reference")
                && i.message.contains("points to a Practitioner")
        ),
        "{errs:#?}"
    );
}
