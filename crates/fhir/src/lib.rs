//! tsunagi-fhir: the FHIR R4 core every other crate stands on.
//!
//! - [`model`]: the R4 resource types, choice elements, Patient compartment and
//!   search parameters, from a table generated from the HL7 R4 definitions.
//! - [`outcome`]: [`FhirError`] and OperationOutcome.
//! - [`search`] / [`query`]: the typed search model and the parser from URL parameters.
//! - [`index`]: extraction of index values from a resource for its search parameters.
//! - [`datetime`]: FHIR date/dateTime/instant parsing into ranges.
//! - [`bundle`]: Bundle construction helpers.
//! - [`extension`]: finding extensions by URL.

pub mod bundle;
pub mod datetime;
pub mod extension;
pub mod index;
pub mod model;
pub mod outcome;
pub mod query;
pub mod search;

pub use outcome::{FhirError, FhirResult, Issue, Severity, operation_outcome};

/// Media type of FHIR JSON.
pub const FHIR_JSON: &str = "application/fhir+json";

/// A JSON object of `members` in their order, the values moved in. `json!` is no
/// use for resources: it serialises every value it is given into a new tree, a
/// deep copy of the whole resource (measured: a fifth of an eligibility answer's
/// CPU, with ten subsidies in it).
pub fn object<const N: usize>(members: [(&str, serde_json::Value); N]) -> serde_json::Value {
    serde_json::Value::Object(
        members
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// A `Parameters.parameter` carrying a resource (moved in, see [`object`]).
pub fn resource_parameter(name: &str, resource: serde_json::Value) -> serde_json::Value {
    object([("name", name.into()), ("resource", resource)])
}

/// A `Parameters` resource of `parameter` (moved in, see [`object`]).
pub fn parameters(parameter: Vec<serde_json::Value>) -> serde_json::Value {
    object([
        ("resourceType", "Parameters".into()),
        ("parameter", serde_json::Value::Array(parameter)),
    ])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn object_keeps_its_members_in_order() {
        let resource = json!({"resourceType": "Coverage", "id": "c1", "status": "active"});
        let o = super::object([("name", json!("subsidy")), ("resource", resource.clone())]);
        assert_eq!(o, json!({"name": "subsidy", "resource": resource}));
        // the answer's bytes: members in the order given, not sorted
        assert_eq!(
            serde_json::to_string(&super::object([("z", json!(1)), ("a", json!(2))])).unwrap(),
            r#"{"z":1,"a":2}"#
        );
    }
}
