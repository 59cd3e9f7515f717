//! The query-string entry point of every search: URL-decoded pairs → typed query.
//! Must never panic; refusals are 400s.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(data).into_owned().collect();
    for rt in ["Patient", "Observation", "MedicationRequest"] {
        for lenient in [false, true] {
            if let Err(e) = tsunagi_fhir::query::parse_with(rt, &pairs, lenient) {
                assert_eq!(e.status, 400);
            }
        }
    }
});
