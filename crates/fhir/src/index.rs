//! Extraction of index values from a resource, driven by the compiled search paths
//! of [`crate::model`]. Runs on every write, so it walks JSON directly rather than
//! evaluating FHIRPath.

use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use crate::datetime::parse_range;
use crate::model::{SearchParam, Step, model};
use crate::search::{IndexEntry, IndexValue, ParamType};

/// Folds a string for the default (starts-with) string match: NFKC (so half-width
/// and full-width kana and Latin compare equal) and lowercase. Dakuten are kept:
/// `ガ` and `カ` are different letters, not accents.
pub fn normalize_string(s: &str) -> String {
    s.nfkc().flat_map(char::to_lowercase).collect()
}

/// Every index entry of a resource for all indexed search parameters of its type.
pub fn extract(resource_type: &str, resource: &Value) -> Vec<IndexEntry> {
    let mut out = Vec::new();
    for param in model().indexed_params(resource_type) {
        extract_param(resource_type, resource, param, &mut out);
    }
    out
}

/// Index entries of one parameter.
pub fn extract_param(
    resource_type: &str,
    resource: &Value,
    param: &SearchParam,
    out: &mut Vec<IndexEntry>,
) {
    let Some(paths) = &param.paths else { return };
    for path in paths {
        for v in walk(resource_type, resource, path) {
            to_index_values(param.param_type, v, &mut |value| {
                let entry = IndexEntry {
                    param: param.code.clone(),
                    value,
                };
                if !out.contains(&entry) {
                    out.push(entry);
                }
            });
        }
    }
}

/// The patient whose compartment the resource is in (the Patient's own id for a
/// Patient; otherwise the first `Patient/{id}` reference among the compartment
/// parameters, in the order the R4 CompartmentDefinition lists them). None for
/// resources in no patient's compartment.
pub fn compartment_patient(resource_type: &str, resource: &Value) -> Option<String> {
    if resource_type == "Patient" {
        return resource
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    let m = model();
    for code in m.patient_compartment_params(resource_type) {
        let Some(param) = m.search_param(resource_type, code) else {
            continue;
        };
        let Some(paths) = &param.paths else { continue };
        for path in paths {
            for v in walk(resource_type, resource, path) {
                if let Some((Some(t), id)) = v
                    .get("reference")
                    .and_then(Value::as_str)
                    .map(split_reference)
                    && t == "Patient"
                {
                    return Some(id);
                }
            }
        }
    }
    None
}

/// Whether resources of this type can belong to a patient's compartment.
pub fn is_personal_type(resource_type: &str) -> bool {
    resource_type == "Patient" || !model().patient_compartment_params(resource_type).is_empty()
}

/// Walks a compiled path from the resource root, flattening arrays.
fn walk<'a>(resource_type: &str, root: &'a Value, path: &[Step]) -> Vec<&'a Value> {
    let mut current = vec![root];
    let mut element_path = resource_type.to_string();
    for step in path {
        element_path.push('.');
        element_path.push_str(&step.name);
        let mut next = Vec::new();
        for v in current {
            let Some(obj) = v.as_object() else { continue };
            let mut push = |child: &'a Value| match child {
                Value::Array(items) => next.extend(items.iter()),
                other => next.push(other),
            };
            if let Some(t) = &step.as_type {
                if let Some(child) = obj.get(&format!("{}{}", step.name, upper_first(t))) {
                    push(child);
                } else if let Some(child) = obj.get(&step.name) {
                    push(child);
                }
            } else if let Some(child) = obj.get(&step.name) {
                push(child);
            } else if let Some(types) = model().choice_types(&element_path) {
                for t in types {
                    if let Some(child) = obj.get(&format!("{}{}", step.name, upper_first(t))) {
                        push(child);
                    }
                }
            }
        }
        if let Some(rt) = &step.ref_type {
            next.retain(|v| {
                v.get("reference")
                    .and_then(Value::as_str)
                    .map(split_reference)
                    .is_some_and(|(t, _)| t.as_deref() == Some(rt.as_str()))
            });
        }
        if let Some((field, want)) = &step.eq {
            next.retain(|v| v.get(field).and_then(Value::as_str) == Some(want.as_str()));
        }
        current = next;
    }
    current
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Splits a reference into (type, id): `Patient/1`, `Patient/1/_history/2`,
/// `https://host/fhir/Patient/1` give `(Some("Patient"), "1")`; anything else
/// (`urn:uuid:...`, `#contained`) keeps the whole string as id.
pub fn split_reference(reference: &str) -> (Option<String>, String) {
    let trimmed = match reference.find("/_history/") {
        Some(p) => &reference[..p],
        None => reference,
    };
    let mut parts = trimmed.rsplitn(3, '/');
    let id = parts.next();
    let rt = parts.next();
    if let (Some(id), Some(rt)) = (id, rt)
        && model().is_resource_type(rt)
        && !id.is_empty()
    {
        return (Some(rt.to_string()), id.to_string());
    }
    (None, reference.to_string())
}

fn to_index_values(ptype: ParamType, v: &Value, emit: &mut dyn FnMut(IndexValue)) {
    match ptype {
        ParamType::String => string_values(v, emit),
        ParamType::Token => token_values(v, emit),
        ParamType::Date => date_values(v, emit),
        ParamType::Reference => {
            if let Some(r) = v.get("reference").and_then(Value::as_str) {
                let (target_type, target_id) = split_reference(r);
                emit(IndexValue::Reference {
                    target_type,
                    target_id,
                });
            } else if let Some(s) = v.as_str() {
                // canonical references
                emit(IndexValue::Reference {
                    target_type: None,
                    target_id: s.to_string(),
                });
            }
        }
        ParamType::Number => {
            if let Some(n) = v.as_f64() {
                emit(IndexValue::Number { value: n });
            }
        }
        ParamType::Quantity => {
            if let Some(n) = v.get("value").and_then(Value::as_f64) {
                let code = v
                    .get("code")
                    .or_else(|| v.get("unit"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let system = v.get("system").and_then(Value::as_str).map(str::to_string);
                emit(IndexValue::Quantity {
                    value: n,
                    system,
                    code,
                });
            }
        }
        ParamType::Uri => {
            if let Some(s) = v.as_str() {
                emit(IndexValue::Uri(s.to_string()));
            }
        }
        ParamType::Composite | ParamType::Special => {}
    }
}

fn string_values(v: &Value, emit: &mut dyn FnMut(IndexValue)) {
    let mut one = |s: &str| {
        if !s.is_empty() {
            emit(IndexValue::String {
                norm: normalize_string(s),
                exact: s.to_string(),
            })
        }
    };
    match v {
        Value::String(s) => one(s),
        Value::Object(o) => {
            // HumanName, Address and similar: every textual part is searchable.
            for key in [
                "text",
                "family",
                "given",
                "prefix",
                "suffix",
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
            ] {
                match o.get(key) {
                    Some(Value::String(s)) => one(s),
                    Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).for_each(&mut one),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn token_values(v: &Value, emit: &mut dyn FnMut(IndexValue)) {
    let s = |o: &serde_json::Map<String, Value>, k: &str| {
        o.get(k).and_then(Value::as_str).map(str::to_string)
    };
    match v {
        Value::String(code) => emit(IndexValue::Token {
            system: None,
            code: code.clone(),
        }),
        Value::Bool(b) => emit(IndexValue::Token {
            system: None,
            code: b.to_string(),
        }),
        Value::Object(o) => {
            if let Some(Value::Array(codings)) = o.get("coding") {
                for c in codings.iter().filter_map(Value::as_object) {
                    if let Some(code) = s(c, "code") {
                        emit(IndexValue::Token {
                            system: s(c, "system"),
                            code,
                        });
                    }
                }
            } else if let Some(code) = s(o, "code") {
                emit(IndexValue::Token {
                    system: s(o, "system"),
                    code,
                });
            } else if let Some(value) = s(o, "value") {
                // Identifier and ContactPoint
                emit(IndexValue::Token {
                    system: s(o, "system"),
                    code: value,
                });
            }
        }
        _ => {}
    }
}

fn date_values(v: &Value, emit: &mut dyn FnMut(IndexValue)) {
    match v {
        Value::String(s) => {
            if let Some((lo, hi)) = parse_range(s) {
                emit(IndexValue::Date { lo, hi });
            }
        }
        Value::Object(o) => {
            // Period: an open end extends to infinity.
            let start = o
                .get("start")
                .and_then(Value::as_str)
                .and_then(parse_range)
                .map(|r| r.0);
            let end = o
                .get("end")
                .and_then(Value::as_str)
                .and_then(parse_range)
                .map(|r| r.1);
            if start.is_some() || end.is_some() {
                emit(IndexValue::Date {
                    lo: start.unwrap_or(i64::MIN),
                    hi: end.unwrap_or(i64::MAX),
                });
            } else if let Some(Value::Array(events)) = o.get("event") {
                // Timing
                for e in events.iter().filter_map(Value::as_str) {
                    if let Some((lo, hi)) = parse_range(e) {
                        emit(IndexValue::Date { lo, hi });
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entries(rt: &str, r: &Value, param: &str) -> Vec<IndexValue> {
        extract(rt, r)
            .into_iter()
            .filter(|e| e.param == param)
            .map(|e| e.value)
            .collect()
    }

    #[test]
    fn patient_identifiers_names_and_birthdate() {
        let p = json!({
            "resourceType": "Patient", "id": "p1",
            "identifier": [{"system": "urn:oid:1.2.392.100495.20.3.51.11234567890", "value": "00012345"}],
            "name": [{"family": "山田", "given": ["太郎"]}, {"family": "ﾔﾏﾀﾞ", "given": ["ﾀﾛｳ"]}],
            "gender": "male", "birthDate": "1970-04-01", "active": true
        });
        assert_eq!(
            entries("Patient", &p, "identifier"),
            vec![IndexValue::Token {
                system: Some("urn:oid:1.2.392.100495.20.3.51.11234567890".into()),
                code: "00012345".into()
            }]
        );
        let names = entries("Patient", &p, "name");
        assert!(names.contains(&IndexValue::String {
            norm: "山田".into(),
            exact: "山田".into()
        }));
        // half-width kana folds to full-width
        assert!(names.contains(&IndexValue::String {
            norm: "ヤマダ".into(),
            exact: "ﾔﾏﾀﾞ".into()
        }));
        assert_eq!(
            entries("Patient", &p, "gender"),
            vec![IndexValue::Token {
                system: None,
                code: "male".into()
            }]
        );
        assert_eq!(
            entries("Patient", &p, "active"),
            vec![IndexValue::Token {
                system: None,
                code: "true".into()
            }]
        );
        assert!(matches!(
            entries("Patient", &p, "birthdate")[0],
            IndexValue::Date { .. }
        ));
        assert_eq!(compartment_patient("Patient", &p).as_deref(), Some("p1"));
    }

    #[test]
    fn observation_choice_types_and_references() {
        let o = json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "urn:oid:1.2.392.200119.4.504", "code": "3F015000002327101"}]},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2024-05-01T09:00:00+09:00",
            "valueQuantity": {"value": 6.1, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}
        });
        assert_eq!(
            entries("Observation", &o, "patient"),
            vec![IndexValue::Reference {
                target_type: Some("Patient".into()),
                target_id: "p1".into()
            }]
        );
        assert_eq!(entries("Observation", &o, "subject").len(), 1);
        assert_eq!(entries("Observation", &o, "date").len(), 1);
        assert_eq!(
            entries("Observation", &o, "value-quantity"),
            vec![IndexValue::Quantity {
                value: 6.1,
                system: Some("http://unitsofmeasure.org".into()),
                code: Some("%".into())
            }]
        );
        assert_eq!(
            compartment_patient("Observation", &o).as_deref(),
            Some("p1")
        );
        // a Group subject is not a Patient reference
        let g = json!({"resourceType": "Observation", "subject": {"reference": "Group/g1"}});
        assert!(entries("Observation", &g, "patient").is_empty());
        assert_eq!(compartment_patient("Observation", &g), None);
    }

    #[test]
    fn periods_and_absolute_references() {
        let e = json!({"resourceType": "Encounter", "period": {"start": "2024-01-01"},
            "subject": {"reference": "https://example.org/fhir/Patient/p9/_history/3"}});
        assert_eq!(
            entries("Encounter", &e, "date"),
            vec![IndexValue::Date {
                lo: parse_range("2024-01-01").unwrap().0,
                hi: i64::MAX
            }]
        );
        assert_eq!(compartment_patient("Encounter", &e).as_deref(), Some("p9"));
        assert_eq!(
            split_reference("urn:uuid:abc"),
            (None, "urn:uuid:abc".to_string())
        );
        assert!(is_personal_type("Condition"));
        assert!(!is_personal_type("Organization"));
    }
}
