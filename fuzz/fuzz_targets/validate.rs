//! Fuzz target: any bytes that parse as JSON are validated; the validator must not
//! panic (a panic inside `validate` would be caught and turned into a `fatal`
//! issue, which this target treats as a crash too). Set TSUNAGI_FUZZ_PACKAGES to a
//! folder of FHIR packages to fuzz the profile-driven paths as well.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tsunagi_validation::Validator;

fn validator() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| match std::env::var_os("TSUNAGI_FUZZ_PACKAGES") {
        Some(p) => Validator::from_paths(&[p.into()], None).expect("packages load"),
        None => Validator::builtin(),
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let issues = validator().validate(&v, None);
        assert!(!issues.iter().any(|i| i.code == "exception"), "validator failure: {issues:?}");
    }
});
