//! The validation gate every write passes. The server depends only on this trait;
//! the profile-driven validator (tsunagi-validation) implements it.

use serde_json::Value;
use tsunagi_fhir::{FhirError, FhirResult, Issue, Severity, model::model};

/// Checks a resource before it is stored. Issues of severity error (or fatal) reject it.
pub trait Validate: Send + Sync {
    fn validate(&self, resource: &Value, profile: Option<&str>) -> Vec<Issue>;

    /// `CodeSystem/$lookup` against the imported masters: a Parameters resource,
    /// or None when no master for `system` is loaded.
    fn lookup(&self, _system: &str, _code: &str) -> Option<Value> {
        None
    }

    /// `CodeSystem/$validate-code`: a Parameters resource, or None when no master
    /// for `system` is loaded.
    fn validate_code(&self, _system: &str, _code: &str, _display: Option<&str>) -> Option<Value> {
        None
    }
}

/// The profile-driven validator (installed packages, masters and the platform's
/// business rules) behind the gate.
impl Validate for tsunagi_validation::Validator {
    fn validate(&self, resource: &Value, profile: Option<&str>) -> Vec<Issue> {
        tsunagi_validation::Validator::validate(self, resource, profile)
    }

    fn lookup(&self, system: &str, code: &str) -> Option<Value> {
        let t = self.terminology()?;
        t.master_of(system)?;
        Some(match t.lookup(system, code) {
            Some(r) => r.to_parameters(),
            None => Value::Null,
        })
    }

    fn validate_code(&self, system: &str, code: &str, display: Option<&str>) -> Option<Value> {
        Some(
            self.terminology()?
                .validate_code(system, code, display)?
                .to_parameters(),
        )
    }
}

/// Structural checks that hold with or without packages: the body is a JSON object
/// naming a known resource type, and a present id has the FHIR id format.
pub struct BasicValidator;

impl Validate for BasicValidator {
    fn validate(&self, resource: &Value, _profile: Option<&str>) -> Vec<Issue> {
        let mut issues = Vec::new();
        if let Err(e) = check_shape(resource, None) {
            issues.extend(e.issues);
        }
        issues
    }
}

/// A valid FHIR id: 1-64 of `[A-Za-z0-9-.]`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Checks the envelope of a resource body: object, known `resourceType` (equal to
/// `expected_type` when given), well-formed `id`.
pub fn check_shape(resource: &Value, expected_type: Option<&str>) -> FhirResult<()> {
    let Some(obj) = resource.as_object() else {
        return Err(FhirError::bad_request(
            None,
            "The body must be a JSON object (a FHIR resource)",
        ));
    };
    let Some(rt) = obj.get("resourceType").and_then(Value::as_str) else {
        return Err(FhirError::bad_request(
            Some("resourceType"),
            "resourceType is missing or not a string",
        ));
    };
    if !model().is_resource_type(rt) {
        return Err(FhirError::bad_request(
            Some("resourceType"),
            format!("'{rt}' is not a FHIR R4 resource type"),
        ));
    }
    if let Some(expected) = expected_type
        && rt != expected
    {
        return Err(FhirError::bad_request(
            Some("resourceType"),
            format!("resourceType '{rt}' does not match the URL's type '{expected}'"),
        ));
    }
    match obj.get("id") {
        None => {}
        Some(Value::String(id)) if is_valid_id(id) => {}
        Some(_) => {
            return Err(FhirError::bad_request(
                Some(&format!("{rt}.id")),
                "id must be 1-64 characters of A-Z, a-z, 0-9, '-' and '.'",
            ));
        }
    }
    Ok(())
}

/// Runs a validator and turns error issues into a 422 naming every problem.
pub fn gate(validator: &dyn Validate, resource: &Value) -> FhirResult<Vec<Issue>> {
    let issues = validator.validate(resource, None);
    if issues.iter().any(|i| i.severity >= Severity::Error) {
        return Err(FhirError::with_issues(422, issues));
    }
    Ok(issues)
}
