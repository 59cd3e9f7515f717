//! The server's Ed25519 signing key and the bearer tokens it issues and verifies.
//!
//! Tokens are JWTs signed with EdDSA; verification accepts nothing else, so `none`,
//! HMAC and algorithm-confusion tokens fail. Tokens are secrets: nothing here logs them.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::jwk::{Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tsunagi_fhir::FhirError;

use crate::identity::{OrgKind, Principal, Role, role_allowed_for};

/// `iss` and `aud` of every token the server issues.
pub const ISSUER: &str = "tsunagi";
/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_SECS: i64 = 30;
/// `amr` value marking a second authentication factor (RFC 8176).
const AMR_MFA: &str = "mfa";

/// Location of the key inside the data directory.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("server-ed25519.pem")
}

/// The server's token signing key.
pub struct ServerKeys {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    public_jwk: Jwk,
    verified: VerifiedCache,
}

/// Tokens already verified, by the SHA-256 of the whole token (signature included),
/// with the validity window to check again on every use. A client sends the same
/// token for many requests; the signature check was an eighth of a read's CPU.
/// Only tokens that passed every check are cached, so an entry cannot be forged:
/// any change to the token changes its hash.
#[derive(Default)]
struct VerifiedCache(Mutex<HashMap<[u8; 32], CachedToken>>);

struct CachedToken {
    principal: Principal,
    /// Unix seconds; the same leeway applies as on first verification.
    not_before: i64,
    expires: i64,
}

/// Bound on cached tokens; on overflow expired ones go first, then all.
const VERIFIED_CACHE_MAX: usize = 65_536;

impl VerifiedCache {
    fn get(&self, key: &[u8; 32], t: i64) -> Option<Principal> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let c = map.get(key)?;
        (c.expires + LEEWAY_SECS > t && c.not_before <= t + LEEWAY_SECS)
            .then(|| c.principal.clone())
    }

    fn put(&self, key: [u8; 32], entry: CachedToken, t: i64) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= VERIFIED_CACHE_MAX {
            map.retain(|_, c| c.expires + LEEWAY_SECS > t);
            if map.len() >= VERIFIED_CACHE_MAX {
                map.clear();
            }
        }
        map.insert(key, entry);
    }
}

impl std::fmt::Debug for ServerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never print key material
        f.debug_struct("ServerKeys")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    org: String,
    org_kind: String,
    #[serde(default)]
    org_flags: Vec<String>,
    role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    patient: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    amr: Vec<String>,
    iat: i64,
    exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
    jti: String,
}

fn key_error(path: &Path, what: impl std::fmt::Display) -> FhirError {
    FhirError::internal(format!("server key {}: {what}", path.display()))
}

/// Validation that checks only the signature and algorithm; claims are checked by
/// the caller against an explicit `now` (testable, and one code path for leeway).
pub(crate) fn signature_only(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v
}

impl ServerKeys {
    /// Loads `DIR/keys/server-ed25519.pem`, creating it (mode 0600, directory 0700)
    /// when absent. Creation is race-safe: two processes starting at once end up
    /// with the same key. The key id is the RFC 7638 thumbprint of the public key.
    pub fn load_or_create(data_dir: &Path) -> Result<ServerKeys, FhirError> {
        let path = key_path(data_dir);
        let dir = path.parent().expect("key path has a parent");
        if !path.exists() {
            fs::create_dir_all(dir).map_err(|e| key_error(dir, e))?;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| key_error(&path, e))?;
            let tmp = dir.join(format!(".server-ed25519.{}.tmp", uuid::Uuid::new_v4()));
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| key_error(&tmp, e))?;
            f.write_all(pem.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| key_error(&tmp, e))?;
            // hard_link never replaces an existing file: whoever links first wins
            let linked = fs::hard_link(&tmp, &path);
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => tracing::info!(path = %path.display(), "created server signing key"),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(key_error(&path, e)),
            }
        }
        let mode = fs::metadata(&path)
            .map_err(|e| key_error(&path, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "server key is readable by others; chmod 600 it");
        }
        let pem = fs::read_to_string(&path).map_err(|e| key_error(&path, e))?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| key_error(&path, e))?;
        Self::from_signing_key(&key).map_err(|e| key_error(&path, e))
    }

    fn from_signing_key(key: &SigningKey) -> Result<ServerKeys, String> {
        let der = key.to_pkcs8_der().map_err(|e| e.to_string())?;
        let encoding = EncodingKey::from_ed_der(der.as_bytes());
        let decoding = DecodingKey::from_ed_der(key.verifying_key().as_bytes());
        // built by hand: jsonwebtoken's from_encoding_key expects PKCS#8 v1 DER only
        let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
        let mut public_jwk: Jwk = serde_json::from_value(
            json!({ "kty": "OKP", "crv": "Ed25519", "x": x, "alg": "EdDSA", "use": "sig" }),
        )
        .map_err(|e| e.to_string())?;
        let kid = public_jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| e.to_string())?;
        public_jwk.common.key_id = Some(kid.clone());
        Ok(ServerKeys {
            kid,
            encoding,
            decoding,
            public_jwk,
            verified: VerifiedCache::default(),
        })
    }

    /// Key id (`kid` header of issued tokens).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK Set, for publishing.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.public_jwk] })
    }

    /// Issues a token for `principal`, valid for `ttl` from now.
    pub fn issue(&self, principal: &Principal, ttl: Duration) -> Result<String, FhirError> {
        self.issue_at(principal, Utc::now(), ttl)
    }

    /// Issues a token as if the time were `now`. A fresh `jti` is generated;
    /// `principal.token_id` is ignored.
    pub fn issue_at(
        &self,
        principal: &Principal,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<String, FhirError> {
        let iat = now.timestamp();
        let claims = Claims {
            iss: ISSUER.into(),
            aud: ISSUER.into(),
            sub: principal.user.clone(),
            org: principal.org.clone(),
            org_kind: principal.org_kind.as_str().into(),
            org_flags: principal.org_flags.clone(),
            role: principal.role.as_str().into(),
            patient: principal.patient.clone(),
            amr: if principal.second_factor {
                vec![AMR_MFA.into()]
            } else {
                vec![]
            },
            iat,
            exp: iat + ttl.num_seconds(),
            nbf: None,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| FhirError::internal(format!("signing a token failed: {e}")))
    }

    /// Verifies a bearer token at time `now` and returns its principal, or a 401
    /// saying what is wrong (never echoing the token).
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<Principal, FhirError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let t = now.timestamp();
        if let Some(p) = self.verified.get(&key, t) {
            return Ok(p);
        }
        let (principal, not_before, expires) = self.verify_uncached(token, t)?;
        self.verified.put(
            key,
            CachedToken {
                principal: principal.clone(),
                not_before,
                expires,
            },
            t,
        );
        Ok(principal)
    }

    /// Every check of a token, at unix time `t`; returns the principal and the
    /// token's `nbf` (or `iat`) and `exp`.
    fn verify_uncached(&self, token: &str, t: i64) -> Result<(Principal, i64, i64), FhirError> {
        let unauthorized = |m: &str| FhirError::unauthorized(format!("bearer token rejected: {m}"));
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| unauthorized("not a well-formed JWT"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(unauthorized("algorithm must be EdDSA"));
        }
        if header.kid.as_deref().is_some_and(|k| k != self.kid) {
            return Err(unauthorized("signed by an unknown key"));
        }
        let data = jsonwebtoken::decode::<Claims>(
            token,
            &self.decoding,
            &signature_only(Algorithm::EdDSA),
        )
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                unauthorized("signature does not verify")
            }
            _ => unauthorized("malformed token or claims"),
        })?;
        let c = data.claims;
        if c.iss != ISSUER {
            return Err(unauthorized("wrong issuer"));
        }
        if c.aud != ISSUER {
            return Err(unauthorized("wrong audience"));
        }
        if c.exp + LEEWAY_SECS <= t {
            return Err(unauthorized("expired"));
        }
        if c.nbf.unwrap_or(c.iat) > t + LEEWAY_SECS {
            return Err(unauthorized("not yet valid"));
        }
        let org_kind: OrgKind = c
            .org_kind
            .parse()
            .map_err(|_| unauthorized("unknown org_kind"))?;
        let role: Role = c.role.parse().map_err(|_| unauthorized("unknown role"))?;
        if !role_allowed_for(org_kind, role) {
            return Err(unauthorized("role is not valid for the organisation kind"));
        }
        if role == Role::Patient && c.patient.is_none() {
            return Err(unauthorized("patient token without a patient id"));
        }
        let not_before = c.nbf.unwrap_or(c.iat);
        let principal = Principal {
            org: c.org,
            org_kind,
            org_flags: c.org_flags,
            role,
            user: c.sub,
            patient: c.patient,
            second_factor: c.amr.iter().any(|a| a == AMR_MFA),
            token_id: c.jti,
        };
        Ok((principal, not_before, c.exp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doctor() -> Principal {
        Principal {
            org: "1311234567".into(),
            org_kind: OrgKind::Hospital,
            org_flags: vec!["emergency-designated".into()],
            role: Role::Doctor,
            user: Some("dr-sato".into()),
            patient: None,
            second_factor: true,
            token_id: String::new(),
        }
    }

    #[test]
    fn key_is_created_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let a = ServerKeys::load_or_create(dir.path()).unwrap();
        let path = key_path(dir.path());
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = ServerKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(a.kid(), b.kid());
        // a token from the first instance verifies with the reloaded key
        let now = Utc::now();
        let t = a.issue_at(&doctor(), now, Duration::minutes(5)).unwrap();
        assert_eq!(b.verify(&t, now).unwrap().org, "1311234567");
        assert_eq!(a.jwks()["keys"][0]["kid"], a.kid());
        assert_eq!(a.jwks()["keys"][0]["crv"], "Ed25519");
        assert!(
            a.jwks()["keys"][0].get("d").is_none(),
            "private part published"
        );
    }

    #[test]
    fn round_trip_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let keys = ServerKeys::load_or_create(dir.path()).unwrap();
        let now = Utc::now();
        let t = keys.issue_at(&doctor(), now, Duration::minutes(5)).unwrap();
        let p = keys.verify(&t, now).unwrap();
        assert_eq!(p.role, Role::Doctor);
        assert_eq!(p.org_kind, OrgKind::Hospital);
        assert_eq!(p.user.as_deref(), Some("dr-sato"));
        assert!(p.second_factor);
        assert!(p.has_flag("emergency-designated"));
        assert_eq!(p.token_id.len(), 36);
        // within leeway, then expired
        assert!(
            keys.verify(&t, now + Duration::seconds(300 + LEEWAY_SECS - 1))
                .is_ok()
        );
        let e = keys
            .verify(&t, now + Duration::seconds(300 + LEEWAY_SECS))
            .unwrap_err();
        assert_eq!(e.status, 401);
        assert!(e.to_string().contains("expired"));
        // issued in the future
        let e = keys.verify(&t, now - Duration::minutes(2)).unwrap_err();
        assert!(e.to_string().contains("not yet valid"));
    }

    #[test]
    fn rejects_other_keys_none_and_hmac() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let k1 = ServerKeys::load_or_create(d1.path()).unwrap();
        let k2 = ServerKeys::load_or_create(d2.path()).unwrap();
        let now = Utc::now();
        let t = k1.issue_at(&doctor(), now, Duration::minutes(5)).unwrap();
        assert!(
            k2.verify(&t, now)
                .unwrap_err()
                .to_string()
                .contains("unknown key")
        );

        // same token re-signed by another key under our kid
        let parts: Vec<&str> = t.split('.').collect();
        let forged_sig = k2.issue_at(&doctor(), now, Duration::minutes(5)).unwrap();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            forged_sig.split('.').nth(2).unwrap()
        );
        assert!(
            k1.verify(&forged, now)
                .unwrap_err()
                .to_string()
                .contains("signature")
        );

        // tampered claims: role upgraded to operator, after the genuine token was
        // verified (and cached)
        assert_eq!(k1.verify(&t, now).unwrap().role, Role::Doctor);
        let mut claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["role"] = "operator".into();
        claims["org_kind"] = "operator".into();
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let tampered = format!("{}.{}.{}", parts[0], body, parts[2]);
        assert_eq!(k1.verify(&tampered, now).unwrap_err().status, 401);

        // alg none
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        assert_eq!(
            k1.verify(&format!("{none_header}.{}.", parts[1]), now)
                .unwrap_err()
                .status,
            401
        );

        // HS256 with the public key as the secret (algorithm confusion)
        let pubkey = k1.jwks()["keys"][0]["x"].as_str().unwrap().to_string();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(k1.kid().to_string());
        let hs = jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(pubkey.as_bytes()))
            .unwrap();
        let e = k1.verify(&hs, now).unwrap_err();
        assert!(e.to_string().contains("EdDSA"), "{e}");

        assert_eq!(k1.verify("garbage", now).unwrap_err().status, 401);
    }

    #[test]
    fn role_must_fit_org_kind() {
        let dir = tempfile::tempdir().unwrap();
        let keys = ServerKeys::load_or_create(dir.path()).unwrap();
        let now = Utc::now();
        let mut p = doctor();
        p.org_kind = OrgKind::Pharmacy;
        let t = keys.issue_at(&p, now, Duration::minutes(5)).unwrap();
        assert!(
            keys.verify(&t, now)
                .unwrap_err()
                .to_string()
                .contains("not valid")
        );
    }
}
