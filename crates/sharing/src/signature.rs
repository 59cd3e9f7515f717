//! Electronic signatures on documents (verified when present).
//!
//! Model: `Bundle.signature.data` is a base64 Ed25519 signature over the
//! canonical JSON (sorted keys, no whitespace; the audit log's canonical form)
//! of the Bundle without its `signature` element. The signer is named by
//! `Bundle.signature.who.identifier` = the SMART client id
//! ([`CLIENT_ID_SYSTEM`]) of a client key registered for the registering
//! institution; any of its non-revoked Ed25519 (OKP) keys may verify. A
//! signature that does not verify, or a signer not registered for the caller's
//! institution, rejects the document (422 at `Bundle.signature`).
//! (HPKI signatures with certificate chains are out of scope.)

use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde_json::Value;
use tsunagi_fhir::{FhirError, FhirResult};
use tsunagi_store::Store;

pub const CLIENT_ID_SYSTEM: &str = "https://tsunagi.dev/fhir/NamingSystem/client-id";

/// The bytes that are signed.
pub fn signing_input(bundle: &Value) -> Vec<u8> {
    let mut b = bundle.clone();
    if let Some(o) = b.as_object_mut() {
        o.remove("signature");
    }
    let mut s = String::new();
    tsunagi_store::audit::canonical_json(&b, &mut s);
    s.into_bytes()
}

fn bad(msg: impl Into<String>) -> FhirError {
    FhirError::unprocessable(Some("Bundle.signature"), msg)
}

/// Verifies `Bundle.signature` against the keys registered for `org`.
pub fn verify_bundle(store: &dyn Store, bundle: &Value, org: &str) -> FhirResult<()> {
    let sig = bundle.get("signature").ok_or_else(|| bad("no signature"))?;
    let client = sig
        .pointer("/who/identifier/value")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("signature.who.identifier (the signer's client id) is required"))?;
    let data = sig
        .get("data")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("signature.data is required"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| bad("signature.data is not base64"))?;
    let signature = Signature::from_slice(&bytes)
        .map_err(|_| bad("signature.data is not an Ed25519 signature"))?;
    let input = signing_input(bundle);
    let keys = store.client_keys(client)?;
    let mut any = false;
    for k in keys.iter().filter(|k| !k.revoked && k.org == org) {
        let Some(x) = k
            .jwk
            .get("x")
            .and_then(Value::as_str)
            .filter(|_| k.jwk.get("crv").and_then(Value::as_str) == Some("Ed25519"))
        else {
            continue;
        };
        any = true;
        let Ok(raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(x) else {
            continue;
        };
        let Ok(arr) = <[u8; 32]>::try_from(raw.as_slice()) else {
            continue;
        };
        if let Ok(vk) = VerifyingKey::from_bytes(&arr)
            && vk.verify(&input, &signature).is_ok()
        {
            return Ok(());
        }
    }
    if any {
        Err(bad(
            "the signature does not verify with the signer's registered keys",
        ))
    } else {
        Err(bad(format!(
            "signer '{client}' has no registered Ed25519 key for institution {org}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use serde_json::json;

    #[test]
    fn signature_over_canonical_json_without_the_signature() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let mut b = json!({"resourceType": "Bundle", "type": "document", "entry": []});
        let sig = key.sign(&signing_input(&b));
        b["signature"] =
            json!({"data": base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())});
        // the signature element itself is not signed
        assert_eq!(
            signing_input(&b),
            signing_input(&json!({"type": "document", "entry": [], "resourceType": "Bundle"}))
        );
        assert!(key.verifying_key().verify(&signing_input(&b), &sig).is_ok());
        b["type"] = json!("collection");
        assert!(
            key.verifying_key()
                .verify(&signing_input(&b), &sig)
                .is_err()
        );
    }
}
