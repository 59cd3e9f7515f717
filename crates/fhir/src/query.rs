//! Parsing FHIR search URL parameters into a validated [`SearchQuery`].
use crate::FhirResult;
use crate::search::SearchQuery;

/// Page size when `_count` is absent.
pub const DEFAULT_COUNT: usize = 50;
/// Largest `_count` honoured.
pub const MAX_COUNT: usize = 1000;

pub fn parse(resource_type: &str, params: &[(String, String)]) -> FhirResult<SearchQuery> {
    let _ = params;
    Ok(SearchQuery::new(resource_type))
}
