//! The JSON entry point of every write: body bytes → JSON → shape check → index
//! extraction and compartment → Bundle planning. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    let _ = tsunagi_server::validate::check_shape(&v, None);
    if let Some(rt) = v.get("resourceType").and_then(Value::as_str) {
        if tsunagi_fhir::model::model().is_resource_type(rt) {
            let _ = tsunagi_fhir::index::extract(rt, &v);
            let _ = tsunagi_fhir::index::compartment_patient(rt, &v);
        }
    }
    let _ = tsunagi_server::bundle::check(&v);
});
