//! Extraction of index values from a resource, driven by the compiled search paths.

use serde_json::Value;

use crate::search::IndexEntry;

/// Every index entry of a resource for all indexed search parameters of its type.
pub fn extract(resource_type: &str, resource: &Value) -> Vec<IndexEntry> {
    let _ = (resource_type, resource);
    Vec::new()
}

/// The patient whose compartment the resource is in (the Patient's own id for a
/// Patient; otherwise the first `Patient/{id}` reference among the compartment
/// parameters). None for resources in no patient's compartment.
pub fn compartment_patient(resource_type: &str, resource: &Value) -> Option<String> {
    let _ = (resource_type, resource);
    None
}
