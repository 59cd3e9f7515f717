//! OperationOutcome and the error type every layer returns.
//!
//! An error carries the HTTP status it maps to, the FHIR issue code, an optional
//! FHIRPath expression naming the element at fault, and a message written for a
//! developer at an EHR vendor (English, one convention across the platform).

use serde_json::{Value, json};

/// Severity of an OperationOutcome issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Information,
    Warning,
    Error,
    Fatal,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Information => "information",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Fatal => "fatal",
        }
    }
}

/// One issue of an OperationOutcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub severity: Severity,
    /// FHIR `IssueType` code (invalid, structure, required, value, not-found, conflict, ...).
    pub code: &'static str,
    /// FHIRPath of the element at fault, when there is one.
    pub expression: Option<String>,
    pub message: String,
}

impl Issue {
    pub fn error(
        code: &'static str,
        expression: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Issue {
            severity: Severity::Error,
            code,
            expression,
            message: message.into(),
        }
    }
    pub fn warning(
        code: &'static str,
        expression: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Issue {
            severity: Severity::Warning,
            code,
            expression,
            message: message.into(),
        }
    }
    pub fn information(message: impl Into<String>) -> Self {
        Issue {
            severity: Severity::Information,
            code: "informational",
            expression: None,
            message: message.into(),
        }
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "severity": self.severity.as_str(),
            "code": self.code,
            "diagnostics": self.message,
        });
        if let Some(e) = &self.expression {
            v["expression"] = json!([e]);
        }
        v
    }
}

/// Builds an OperationOutcome resource from issues.
pub fn operation_outcome(issues: &[Issue]) -> Value {
    let issues: Vec<Value> = if issues.is_empty() {
        vec![Issue::information("All OK").to_json()]
    } else {
        issues.iter().map(Issue::to_json).collect()
    };
    json!({ "resourceType": "OperationOutcome", "issue": issues })
}

/// The error every layer returns; maps to one HTTP status and an OperationOutcome.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {}", .issues.first().map(|i| i.message.as_str()).unwrap_or(""))]
pub struct FhirError {
    pub status: u16,
    pub issues: Vec<Issue>,
}

impl FhirError {
    pub fn new(
        status: u16,
        code: &'static str,
        expression: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        FhirError {
            status,
            issues: vec![Issue::error(code, expression, message)],
        }
    }
    pub fn with_issues(status: u16, issues: Vec<Issue>) -> Self {
        FhirError { status, issues }
    }
    pub fn bad_request(expression: Option<&str>, message: impl Into<String>) -> Self {
        Self::new(400, "invalid", expression.map(str::to_string), message)
    }
    pub fn invalid_element(expression: &str, message: impl Into<String>) -> Self {
        Self::new(400, "invalid", Some(expression.to_string()), message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not-found", None, message)
    }
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "deleted", None, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, "conflict", None, message)
    }
    pub fn precondition_failed(message: impl Into<String>) -> Self {
        Self::new(412, "conflict", None, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, "login", None, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "forbidden", None, message)
    }
    pub fn unprocessable(expression: Option<&str>, message: impl Into<String>) -> Self {
        Self::new(422, "processing", expression.map(str::to_string), message)
    }
    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(400, "not-supported", None, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "exception", None, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "transient", None, message)
    }

    /// Prefixes every issue's expression with `prefix` (e.g. `Bundle.entry[3].resource`),
    /// so an error inside a Bundle names the entry it came from.
    pub fn within(mut self, prefix: &str) -> Self {
        for i in &mut self.issues {
            i.expression = Some(match i.expression.take() {
                Some(e) => {
                    // drop the resource type root of the inner path: "Patient.name" -> "<prefix>.name"
                    match e.split_once('.') {
                        Some((_, rest)) => format!("{prefix}.{rest}"),
                        None => prefix.to_string(),
                    }
                }
                None => prefix.to_string(),
            });
        }
        self
    }

    pub fn to_outcome(&self) -> Value {
        operation_outcome(&self.issues)
    }
}

pub type FhirResult<T> = Result<T, FhirError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_element() {
        let e = FhirError::invalid_element("Patient.birthDate", "not a date");
        let oo = e.to_outcome();
        assert_eq!(oo["issue"][0]["expression"][0], "Patient.birthDate");
        assert_eq!(oo["issue"][0]["severity"], "error");
        assert_eq!(e.status, 400);
    }

    #[test]
    fn within_rewrites_root() {
        let e =
            FhirError::invalid_element("Patient.birthDate", "x").within("Bundle.entry[2].resource");
        assert_eq!(
            e.issues[0].expression.as_deref(),
            Some("Bundle.entry[2].resource.birthDate")
        );
    }
}
