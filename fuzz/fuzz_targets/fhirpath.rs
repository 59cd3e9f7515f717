//! Fuzz target: arbitrary FHIRPath text is parsed and evaluated on a fixed
//! resource; neither may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use tsunagi_validation::fhirpath::{Ctx, Item, evaluate, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else { return };
    let r = json!({"resourceType": "Patient", "id": "p", "name": [{"given": ["A", "B"], "family": "F"}],
        "extension": [{"url": "u", "valueIdentifier": {"value": "1311234567"}}], "contained": [{"resourceType": "Organization", "id": "o"}]});
    if let Ok(e) = parse(src) {
        let ctx = Ctx { resource: &r, root: &r, context: &r };
        let _ = evaluate(&e, &ctx, &[Item::Node(&r, None)]);
    }
});
