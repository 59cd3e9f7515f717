//! Practitioner signature keys: the HPKI signature (HPKI電子署名) is modelled as an
//! Ed25519 key the operator registers for a practitioner (the token's `user`).
//! A prescription or dispensing result may carry a signature over the compact
//! JSON (serde_json serialisation, members in the order sent) of what it signs;
//! a signature that does not verify is refused, and whether one is mandatory is
//! [`crate::Config::signature_required`].
//!
//! Keys are public data, kept as `Basic` records of the service (no patient).

use base64::Engine as _;
use chrono::NaiveDate;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use tsunagi_fhir::{FhirError, FhirResult};
use tsunagi_store::{Store, Transaction, WriteContext};

use crate::model::{SERVICE_ORG, from_basic, hash_id, to_basic};

/// A registered practitioner key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PractitionerKey {
    pub user: String,
    /// Raw 32-byte Ed25519 public key, base64.
    pub public_key: String,
    pub registered: NaiveDate,
}

pub fn key_id(user: &str) -> String {
    hash_id("hpki-", user)
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Parses a base64 raw Ed25519 public key.
pub fn parse_public_key(s: &str) -> Result<VerifyingKey, String> {
    let bytes = b64()
        .decode(s.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "an Ed25519 public key is 32 bytes".to_string())?;
    VerifyingKey::from_bytes(&arr).map_err(|e| format!("not an Ed25519 public key: {e}"))
}

/// Registers (or replaces) the key of `user`.
pub fn register(
    tx: &mut dyn Transaction,
    user: &str,
    public_key: &str,
    today: NaiveDate,
) -> FhirResult<()> {
    let k = PractitionerKey {
        user: user.to_string(),
        public_key: public_key.trim().to_string(),
        registered: today,
    };
    let id = key_id(user);
    let ctx = WriteContext {
        org: Some(SERVICE_ORG.into()),
        user: None,
    };
    tx.update(
        "Basic",
        &id,
        to_basic(&id, "practitioner-key", None, &k),
        None,
        &ctx,
    )?;
    Ok(())
}

/// Verifies `signature` (base64) by `user` over `message`. `element` names the
/// signature parameter for the OperationOutcome.
pub fn verify(
    store: &dyn Store,
    user: Option<&str>,
    message: &[u8],
    signature: &str,
    element: &str,
) -> FhirResult<()> {
    let refuse = |m: String| FhirError::invalid_element(element, m);
    let user = user.ok_or_else(|| {
        refuse("the token names no practitioner (user), so a signature cannot be verified".into())
    })?;
    let rec = store
        .read("Basic", &key_id(user))?
        .filter(|r| !r.deleted)
        .and_then(|r| r.resource)
        .ok_or_else(|| {
            refuse(format!(
                "no signature key is registered for practitioner {user}"
            ))
        })?;
    let k: PractitionerKey = from_basic(&rec)?;
    let vk = parse_public_key(&k.public_key).map_err(refuse)?;
    let sig_bytes = b64()
        .decode(signature.trim())
        .map_err(|_| refuse("the signature is not base64".into()))?;
    let sig = Signature::from_slice(&sig_bytes)
        .map_err(|_| refuse("the signature is not an Ed25519 signature (64 bytes)".into()))?;
    vk.verify(message, &sig).map_err(|_| {
        refuse(format!(
            "the signature does not verify with the key registered for practitioner {user}"
        ))
    })
}

/// Signs `message` (tests, demo, load generator).
pub fn sign(key: &ed25519_dalek::SigningKey, message: &[u8]) -> String {
    use ed25519_dalek::Signer;
    b64().encode(key.sign(message).to_bytes())
}

/// Base64 of a verifying key, as [`register`] takes it.
pub fn encode_public(key: &VerifyingKey) -> String {
    b64().encode(key.to_bytes())
}
