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

/// A `Parameters` resource written as JSON text while it is built, so that a
/// stored resource goes in as its stored text ([`ParametersText::resource_text`])
/// instead of being parsed and serialised again. The bytes are those
/// `serde_json` writes for [`parameters`] of the same parameters.
#[derive(Debug)]
pub struct ParametersText {
    out: Vec<u8>,
    empty: bool,
}

impl Default for ParametersText {
    fn default() -> Self {
        ParametersText {
            out: br#"{"resourceType":"Parameters","parameter":["#.to_vec(),
            empty: true,
        }
    }
}

impl ParametersText {
    fn next(&mut self) {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
    }

    /// Appends a parameter given as a value.
    pub fn push(&mut self, parameter: &serde_json::Value) {
        self.next();
        // writing a Value (string keys only) into a Vec cannot fail
        let _ = serde_json::to_writer(&mut self.out, parameter);
    }

    /// Appends a parameter carrying a resource given as its JSON text. The
    /// text is a store's, written by `serde_json` (one JSON object), and goes
    /// in unchecked, as a read by id sends it.
    pub fn resource_text(&mut self, name: &str, text: &str) {
        self.next();
        self.out.extend_from_slice(br#"{"name":"#);
        let _ = serde_json::to_writer(&mut self.out, name);
        self.out.extend_from_slice(br#","resource":"#);
        self.out.extend_from_slice(text.as_bytes());
        self.out.push(b'}');
    }

    /// The finished resource's JSON text.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(b"]}");
        self.out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn parameters_text_is_the_parameters_bytes() {
        let resource = json!({"resourceType": "Coverage", "id": "c\"1", "note": "ア\n"});
        let text = serde_json::to_string(&resource).unwrap();
        let value = json!({"name": "status", "valueCode": "eligible"});
        let empty = super::ParametersText::default().finish();
        assert_eq!(
            empty,
            serde_json::to_vec(&super::parameters(Vec::new())).unwrap()
        );
        let mut p = super::ParametersText::default();
        p.push(&value);
        p.resource_text("sub\"sidy", &text);
        p.resource_text("coverage", &text);
        let want = super::parameters(vec![
            value,
            super::resource_parameter("sub\"sidy", resource.clone()),
            super::resource_parameter("coverage", resource),
        ]);
        let got = p.finish();
        assert_eq!(
            String::from_utf8(got).unwrap(),
            serde_json::to_string(&want).unwrap()
        );
    }

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
