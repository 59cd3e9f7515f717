//! OAuth 2.0 client credentials with a signed JWT assertion (`private_key_jwt`,
//! the SMART Backend Services pattern) for `POST /auth/token`.
//!
//! The client signs a short-lived JWT with `iss = sub = client_id` and
//! `aud = <token endpoint URL>` using a private key whose public JWK was registered
//! for its organisation ([`tsunagi_store::ClientKey`]). The server answers with a
//! bearer token from [`ServerKeys`] carrying the key's organisation, role and user.
//! What the token may do is decided by [`crate::policy::Policy`], not by OAuth scopes.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::{Value, json};
use tsunagi_store::{ClientKey, Store};

use crate::identity::{OrgKind, Principal, Role, role_allowed_for};
use crate::token::{LEEWAY_SECS, ServerKeys, signature_only};

/// `client_assertion_type` of RFC 7523.
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Lifetime of issued access tokens (SMART recommends at most 5 minutes).
pub const ACCESS_TOKEN_TTL_SECS: i64 = 300;
/// Furthest in the future an assertion's `exp` may lie.
pub const MAX_ASSERTION_LIFETIME_SECS: i64 = 300;
/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;

/// Looks up a registered organisation code: its kind and flags, None when unknown.
/// (The registry lives in the FHIR store as Organization resources.)
pub type OrgLookup<'a> = dyn Fn(&str) -> Option<(OrgKind, Vec<String>)> + 'a;

/// Successful token response (RFC 6749 §5.1).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenResponse {
    pub access_token: String,
    pub expires_in: i64,
    /// The scope the client asked for, echoed; access is decided by the policy module.
    pub scope: String,
}

impl TokenResponse {
    pub fn to_json(&self) -> Value {
        json!({
            "access_token": self.access_token,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "scope": self.scope,
        })
    }
}

/// Error response (RFC 6749 §5.2). Serve `to_json()` with `status` and
/// `Cache-Control: no-store`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}: {description}")]
pub struct OAuthError {
    pub status: u16,
    /// `invalid_request`, `invalid_client`, `unsupported_grant_type`, `server_error`, ...
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    fn new(status: u16, error: &'static str, description: impl Into<String>) -> Self {
        OAuthError {
            status,
            error,
            description: description.into(),
        }
    }
    fn invalid_request(d: impl Into<String>) -> Self {
        Self::new(400, "invalid_request", d)
    }
    fn invalid_client(d: impl Into<String>) -> Self {
        Self::new(401, "invalid_client", d)
    }

    pub fn to_json(&self) -> Value {
        json!({ "error": self.error, "error_description": self.description })
    }
}

/// Remembers assertion `jti`s until their `exp` (plus leeway) so none is accepted
/// twice. In memory and bounded: when full of unexpired entries, new assertions
/// are refused (fail closed) rather than forgetting old ones. Assertions live at
/// most [`MAX_ASSERTION_LIFETIME_SECS`], so a capacity of N sustains about
/// N / 330 exchanges per second.
pub struct ReplayCache {
    seen: Mutex<HashMap<(String, String), i64>>,
    capacity: usize,
}

impl Default for ReplayCache {
    fn default() -> Self {
        Self::new(100_000)
    }
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        ReplayCache {
            seen: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// Records `(client_id, jti)` valid until `exp`; errors when it was seen before.
    fn check_and_insert(
        &self,
        client_id: &str,
        jti: &str,
        exp: i64,
        now: i64,
    ) -> Result<(), OAuthError> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let key = (client_id.to_string(), jti.to_string());
        if let Some(&until) = seen.get(&key)
            && until >= now
        {
            return Err(OAuthError::invalid_client("assertion jti was already used"));
        }
        if seen.len() >= self.capacity {
            seen.retain(|_, until| *until >= now);
            if seen.len() >= self.capacity {
                return Err(OAuthError::new(
                    503,
                    "temporarily_unavailable",
                    "too many token requests; retry shortly",
                ));
            }
        }
        seen.insert(key, exp + LEEWAY_SECS);
        Ok(())
    }

    /// Entries currently held (expired ones included until the next purge).
    pub fn len(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Deserialize)]
struct AssertionClaims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Value>,
    exp: Option<i64>,
    nbf: Option<i64>,
    jti: Option<String>,
}

fn str_field<'a>(jwk: &'a Value, name: &str) -> Option<&'a str> {
    jwk.get(name).and_then(Value::as_str)
}

/// Algorithms a registered JWK may verify, and its decoding key. HMAC (`oct`) keys
/// and unsupported curves yield nothing.
fn jwk_verifier(jwk: &Value) -> Option<(Vec<Algorithm>, DecodingKey)> {
    use base64::Engine;
    let (mut algs, key) = match (str_field(jwk, "kty")?, str_field(jwk, "crv")) {
        ("RSA", _) => {
            let n = str_field(jwk, "n")?;
            let bits = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(n)
                .ok()?
                .len()
                * 8;
            if bits < MIN_RSA_BITS {
                return None;
            }
            (
                vec![Algorithm::RS384, Algorithm::RS256],
                DecodingKey::from_rsa_components(n, str_field(jwk, "e")?).ok()?,
            )
        }
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let alg = if crv == "P-256" {
                Algorithm::ES256
            } else {
                Algorithm::ES384
            };
            (
                vec![alg],
                DecodingKey::from_ec_components(str_field(jwk, "x")?, str_field(jwk, "y")?).ok()?,
            )
        }
        ("OKP", Some("Ed25519")) => (
            vec![Algorithm::EdDSA],
            DecodingKey::from_ed_components(str_field(jwk, "x")?).ok()?,
        ),
        _ => return None,
    };
    // a JWK that names its algorithm is bound to it
    if let Some(a) = str_field(jwk, "alg") {
        algs.retain(|x| format!("{x:?}") == a);
    }
    Some((algs, key))
}

/// Exchanges a `client_credentials` request authenticated by a signed JWT assertion
/// for an access token. `form` is the decoded `application/x-www-form-urlencoded`
/// body; `token_endpoint_url` the absolute URL the assertion's `aud` must name;
/// `org_lookup` returns the kind and flags of a registered organisation code.
pub fn exchange_client_assertion(
    store: &dyn Store,
    keys: &ServerKeys,
    form: &HashMap<String, String>,
    token_endpoint_url: &str,
    now: DateTime<Utc>,
    replay_cache: &ReplayCache,
    org_lookup: &OrgLookup,
) -> Result<TokenResponse, OAuthError> {
    let field = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());
    match field("grant_type") {
        None => return Err(OAuthError::invalid_request("grant_type is required")),
        Some("client_credentials") => {}
        Some(other) => {
            return Err(OAuthError::new(
                400,
                "unsupported_grant_type",
                format!("grant_type {other} is not supported; use client_credentials"),
            ));
        }
    }
    if field("client_assertion_type") != Some(JWT_BEARER_ASSERTION) {
        return Err(OAuthError::invalid_request(format!(
            "client_assertion_type must be {JWT_BEARER_ASSERTION}"
        )));
    }
    let assertion = field("client_assertion")
        .ok_or_else(|| OAuthError::invalid_request("client_assertion is required"))?;

    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| OAuthError::invalid_client("client_assertion is not a well-formed JWT"))?;
    if !matches!(
        header.alg,
        Algorithm::ES384
            | Algorithm::RS384
            | Algorithm::ES256
            | Algorithm::RS256
            | Algorithm::EdDSA
    ) {
        return Err(OAuthError::invalid_client(format!(
            "assertion algorithm {:?} is not accepted (use ES384, RS384, ES256, RS256 or EdDSA)",
            header.alg
        )));
    }
    // The issuer names the client and so selects the keys; the claims are trusted
    // only after the signature verifies with one of those keys.
    let unverified: AssertionClaims = jsonwebtoken::dangerous::insecure_decode_claims(assertion)
        .map_err(|_| OAuthError::invalid_client("client_assertion claims are malformed"))?;
    let client_id = unverified
        .iss
        .ok_or_else(|| OAuthError::invalid_client("client_assertion has no iss"))?;
    if let Some(cid) = field("client_id")
        && cid != client_id
    {
        return Err(OAuthError::invalid_client(
            "client_id does not match the assertion's iss",
        ));
    }

    let registered = store.client_keys(&client_id).map_err(|e| {
        tracing::error!(error = %e, "client key lookup failed");
        OAuthError::new(500, "server_error", "client key lookup failed")
    })?;
    if registered.is_empty() {
        return Err(OAuthError::invalid_client(format!(
            "unknown client {client_id}"
        )));
    }
    let candidates: Vec<&ClientKey> = registered
        .iter()
        .filter(|k| header.kid.as_deref().is_none_or(|kid| k.kid == kid))
        .collect();
    let live: Vec<&ClientKey> = candidates.iter().copied().filter(|k| !k.revoked).collect();
    if live.is_empty() {
        return Err(OAuthError::invalid_client(if candidates.is_empty() {
            "no registered key matches the assertion's kid".to_string()
        } else {
            "the client key has been revoked".to_string()
        }));
    }
    let mut verified: Option<(&ClientKey, AssertionClaims)> = None;
    for key in live {
        let Some((algs, decoding)) = jwk_verifier(&key.jwk) else {
            continue;
        };
        if !algs.contains(&header.alg) {
            continue;
        }
        if let Ok(data) = jsonwebtoken::decode::<AssertionClaims>(
            assertion,
            &decoding,
            &signature_only(header.alg),
        ) {
            verified = Some((key, data.claims));
            break;
        }
    }
    let (key, claims) = verified.ok_or_else(|| {
        OAuthError::invalid_client("assertion signature does not verify with any registered key")
    })?;

    if claims.sub.as_deref() != Some(client_id.as_str()) {
        return Err(OAuthError::invalid_client(
            "assertion sub must equal iss (the client id)",
        ));
    }
    let aud_ok = match &claims.aud {
        Some(Value::String(a)) => a == token_endpoint_url,
        Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(token_endpoint_url)),
        _ => false,
    };
    if !aud_ok {
        return Err(OAuthError::invalid_client(format!(
            "assertion aud must be {token_endpoint_url}"
        )));
    }
    let t = now.timestamp();
    let exp = claims
        .exp
        .ok_or_else(|| OAuthError::invalid_client("assertion has no exp"))?;
    if exp + LEEWAY_SECS <= t {
        return Err(OAuthError::invalid_client("assertion has expired"));
    }
    if exp > t + MAX_ASSERTION_LIFETIME_SECS + LEEWAY_SECS {
        return Err(OAuthError::invalid_client(
            "assertion exp may be at most 5 minutes ahead",
        ));
    }
    if claims.nbf.is_some_and(|nbf| nbf > t + LEEWAY_SECS) {
        return Err(OAuthError::invalid_client("assertion is not yet valid"));
    }
    let jti = claims
        .jti
        .as_deref()
        .filter(|j| !j.is_empty())
        .ok_or_else(|| OAuthError::invalid_client("assertion has no jti"))?;

    let role: Role = key.role.parse().map_err(|_| {
        OAuthError::invalid_client(format!("client key has unknown role {}", key.role))
    })?;
    if role == Role::Patient {
        return Err(OAuthError::invalid_client(
            "patients cannot use client credentials",
        ));
    }
    let (org_kind, org_flags) = org_lookup(&key.org).ok_or_else(|| {
        OAuthError::invalid_client(format!("organisation {} is not registered", key.org))
    })?;
    if !role_allowed_for(org_kind, role) {
        return Err(OAuthError::invalid_client(format!(
            "role {role} is not valid for organisation {} of kind {org_kind}",
            key.org
        )));
    }
    // last, so a rejected assertion does not burn its jti
    replay_cache.check_and_insert(&client_id, jti, exp, t)?;

    let principal = Principal {
        org: key.org.clone(),
        org_kind,
        org_flags,
        role,
        user: key.user.clone(),
        patient: None,
        second_factor: false,
        token_id: String::new(),
    };
    let access_token = keys
        .issue_at(&principal, now, Duration::seconds(ACCESS_TOKEN_TTL_SECS))
        .map_err(|_| OAuthError::new(500, "server_error", "could not sign the access token"))?;
    tracing::info!(client_id = %client_id, org = %key.org, role = %role, kid = %key.kid, "issued access token");
    Ok(TokenResponse {
        access_token,
        expires_in: ACCESS_TOKEN_TTL_SECS,
        scope: field("scope").unwrap_or("system/*.*").to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::FakeStore;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{EncodingKey, Header};
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use std::sync::OnceLock;

    const URL: &str = "https://tsunagi.example/auth/token";
    const ORG: &str = "1311234567";

    struct TestKey {
        alg: Algorithm,
        enc: EncodingKey,
        jwk: Value,
    }

    fn p384_key() -> TestKey {
        let sk = p384::SecretKey::random(&mut rand::rngs::OsRng);
        let pem = sk.to_pkcs8_pem(Default::default()).unwrap();
        let enc = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
        let jwk =
            serde_json::to_value(Jwk::from_encoding_key(&enc, Algorithm::ES384).unwrap()).unwrap();
        TestKey {
            alg: Algorithm::ES384,
            enc,
            jwk,
        }
    }

    fn rsa_key() -> &'static TestKey {
        static KEY: OnceLock<TestKey> = OnceLock::new();
        KEY.get_or_init(|| {
            let sk = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
            let pem = sk.to_pkcs1_pem(Default::default()).unwrap();
            let enc = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
            let mut jwk =
                serde_json::to_value(Jwk::from_encoding_key(&enc, Algorithm::RS384).unwrap())
                    .unwrap();
            jwk.as_object_mut().unwrap().remove("alg");
            TestKey {
                alg: Algorithm::RS384,
                enc,
                jwk,
            }
        })
    }

    fn ed_key() -> TestKey {
        let sk = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let enc = EncodingKey::from_ed_der(sk.to_pkcs8_der().unwrap().as_bytes());
        let x = URL_SAFE_NO_PAD.encode(sk.verifying_key().as_bytes());
        TestKey {
            alg: Algorithm::EdDSA,
            enc,
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
        }
    }

    fn register(store: &FakeStore, client_id: &str, kid: &str, key: &TestKey, revoked: bool) {
        store
            .put_client_key(&ClientKey {
                client_id: client_id.into(),
                org: ORG.into(),
                kid: kid.into(),
                role: "doctor".into(),
                user: Some("dr-sato".into()),
                jwk: key.jwk.clone(),
                created: Utc::now(),
                revoked,
            })
            .unwrap();
    }

    fn assertion(key: &TestKey, kid: Option<&str>, claims: Value) -> String {
        let mut h = Header::new(key.alg);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, &claims, &key.enc).unwrap()
    }

    fn claims(client: &str, now: DateTime<Utc>, jti: &str) -> Value {
        json!({"iss": client, "sub": client, "aud": URL, "exp": now.timestamp() + 240, "jti": jti})
    }

    fn form(assertion: &str) -> HashMap<String, String> {
        HashMap::from([
            ("grant_type".to_string(), "client_credentials".to_string()),
            (
                "client_assertion_type".to_string(),
                JWT_BEARER_ASSERTION.to_string(),
            ),
            ("client_assertion".to_string(), assertion.to_string()),
            ("scope".to_string(), "system/*.read".to_string()),
        ])
    }

    fn lookup(org: &str) -> Option<(OrgKind, Vec<String>)> {
        (org == ORG).then(|| (OrgKind::Hospital, vec!["emergency-designated".to_string()]))
    }

    struct Env {
        store: FakeStore,
        keys: ServerKeys,
        cache: ReplayCache,
        _dir: tempfile::TempDir,
    }

    fn env() -> Env {
        let dir = tempfile::tempdir().unwrap();
        Env {
            store: FakeStore::default(),
            keys: ServerKeys::load_or_create(dir.path()).unwrap(),
            cache: ReplayCache::new(100),
            _dir: dir,
        }
    }

    impl Env {
        fn exchange(&self, a: &str, now: DateTime<Utc>) -> Result<TokenResponse, OAuthError> {
            exchange_client_assertion(
                &self.store,
                &self.keys,
                &form(a),
                URL,
                now,
                &self.cache,
                &lookup,
            )
        }
    }

    #[test]
    fn happy_path_with_each_algorithm() {
        let e = env();
        let now = Utc::now();
        let ed = ed_key();
        let ec = p384_key();
        for (i, key) in [&ec, rsa_key(), &ed].into_iter().enumerate() {
            let client = format!("client-{i}");
            register(&e.store, &client, "k1", key, false);
            let kid = (i != 1).then_some("k1"); // RSA assertion without kid
            let res = e
                .exchange(&assertion(key, kid, claims(&client, now, "j1")), now)
                .unwrap();
            assert_eq!(res.expires_in, 300);
            assert_eq!(res.scope, "system/*.read");
            assert_eq!(res.to_json()["token_type"], "bearer");
            let p = e.keys.verify(&res.access_token, now).unwrap();
            assert_eq!(p.org, ORG);
            assert_eq!(p.role, Role::Doctor);
            assert_eq!(p.org_kind, OrgKind::Hospital);
            assert_eq!(p.user.as_deref(), Some("dr-sato"));
            assert!(p.has_flag("emergency-designated"));
            assert!(!p.second_factor);
        }
    }

    #[test]
    fn wrong_key_is_rejected() {
        let e = env();
        let now = Utc::now();
        register(&e.store, "c", "k1", &p384_key(), false);
        let other = p384_key();
        let err = e
            .exchange(&assertion(&other, Some("k1"), claims("c", now, "j")), now)
            .unwrap_err();
        assert_eq!((err.status, err.error), (401, "invalid_client"));
        assert!(
            err.description.contains("does not verify"),
            "{}",
            err.description
        );
        // an RSA-signed assertion against an EC key: algorithm does not fit the key
        let err = e
            .exchange(
                &assertion(rsa_key(), Some("k1"), claims("c", now, "j")),
                now,
            )
            .unwrap_err();
        assert_eq!(err.error, "invalid_client");
        // unknown kid
        let err = e
            .exchange(&assertion(&other, Some("k9"), claims("c", now, "j")), now)
            .unwrap_err();
        assert!(err.description.contains("kid"));
        // unknown client
        let err = e
            .exchange(&assertion(&other, None, claims("nobody", now, "j")), now)
            .unwrap_err();
        assert!(err.description.contains("unknown client"));
        assert_eq!(err.to_json()["error"], "invalid_client");
    }

    #[test]
    fn expiry_and_lifetime_limits() {
        let e = env();
        let now = Utc::now();
        let k = ed_key();
        register(&e.store, "c", "k1", &k, false);
        let mut c = claims("c", now, "j1");
        c["exp"] = json!(now.timestamp() - 60);
        let err = e.exchange(&assertion(&k, None, c), now).unwrap_err();
        assert!(err.description.contains("expired"));
        let mut c = claims("c", now, "j2");
        c["exp"] = json!(now.timestamp() + 3600);
        let err = e.exchange(&assertion(&k, None, c), now).unwrap_err();
        assert!(err.description.contains("at most 5 minutes"));
        let mut c = claims("c", now, "j3");
        c.as_object_mut().unwrap().remove("exp");
        assert!(e.exchange(&assertion(&k, None, c), now).is_err());
    }

    #[test]
    fn replayed_jti_is_rejected() {
        let e = env();
        let now = Utc::now();
        let k = ed_key();
        register(&e.store, "c", "k1", &k, false);
        let a = assertion(&k, Some("k1"), claims("c", now, "once"));
        assert!(e.exchange(&a, now).is_ok());
        let err = e.exchange(&a, now + Duration::seconds(10)).unwrap_err();
        assert!(err.description.contains("already used"));
        // a fresh jti is fine
        assert!(
            e.exchange(&assertion(&k, Some("k1"), claims("c", now, "twice")), now)
                .is_ok()
        );
        // a rejected assertion (wrong aud) does not burn its jti
        let mut c = claims("c", now, "later");
        c["aud"] = json!("https://elsewhere.example/token");
        let err = e.exchange(&assertion(&k, None, c), now).unwrap_err();
        assert!(err.description.contains("aud"));
        assert!(
            e.exchange(&assertion(&k, None, claims("c", now, "later")), now)
                .is_ok()
        );
        // no jti at all
        let mut c = claims("c", now, "x");
        c.as_object_mut().unwrap().remove("jti");
        assert!(
            e.exchange(&assertion(&k, None, c), now)
                .unwrap_err()
                .description
                .contains("jti")
        );
    }

    #[test]
    fn replay_cache_is_bounded_and_purges_expired() {
        let cache = ReplayCache::new(2);
        cache.check_and_insert("c", "a", 100, 50).unwrap();
        cache.check_and_insert("c", "b", 100, 50).unwrap();
        let full = cache.check_and_insert("c", "c", 100, 50).unwrap_err();
        assert_eq!(full.status, 503);
        // once the first two expired, they are purged to make room
        cache.check_and_insert("c", "c", 300, 200).unwrap();
        assert_eq!(cache.len(), 1);
        assert!(cache.check_and_insert("c", "c", 300, 210).is_err());
        // same jti from another client is a different assertion
        assert!(cache.check_and_insert("d", "c", 300, 210).is_ok());
    }

    #[test]
    fn audience_and_subject_are_checked() {
        let e = env();
        let now = Utc::now();
        let k = ed_key();
        register(&e.store, "c", "k1", &k, false);
        let mut c = claims("c", now, "j1");
        c["aud"] = json!(["https://other.example", URL]);
        assert!(e.exchange(&assertion(&k, None, c), now).is_ok());
        let mut c = claims("c", now, "j2");
        c["sub"] = json!("someone-else");
        assert!(
            e.exchange(&assertion(&k, None, c), now)
                .unwrap_err()
                .description
                .contains("sub")
        );
    }

    #[test]
    fn revoked_key_is_rejected() {
        let e = env();
        let now = Utc::now();
        let k = p384_key();
        register(&e.store, "c", "k1", &k, true);
        let err = e
            .exchange(&assertion(&k, Some("k1"), claims("c", now, "j")), now)
            .unwrap_err();
        assert!(err.description.contains("revoked"), "{}", err.description);
        // rotating in a new key works, the revoked one still fails
        let k2 = p384_key();
        register(&e.store, "c", "k2", &k2, false);
        assert!(
            e.exchange(&assertion(&k2, Some("k2"), claims("c", now, "j")), now)
                .is_ok()
        );
        assert!(
            e.exchange(&assertion(&k, None, claims("c", now, "j2")), now)
                .is_err()
        );
    }

    #[test]
    fn request_shape_errors() {
        let e = env();
        let now = Utc::now();
        let mut f = form("x.y.z");
        f.insert("grant_type".into(), "password".into());
        let err = exchange_client_assertion(&e.store, &e.keys, &f, URL, now, &e.cache, &lookup)
            .unwrap_err();
        assert_eq!((err.status, err.error), (400, "unsupported_grant_type"));
        let mut f = form("x.y.z");
        f.remove("client_assertion_type");
        let err = exchange_client_assertion(&e.store, &e.keys, &f, URL, now, &e.cache, &lookup)
            .unwrap_err();
        assert_eq!((err.status, err.error), (400, "invalid_request"));
        let err = e.exchange("not-a-jwt", now).unwrap_err();
        assert_eq!(err.error, "invalid_client");
        // HS256 assertions are refused outright
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims("c", now, "j"),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(
            e.exchange(&hs, now)
                .unwrap_err()
                .description
                .contains("not accepted")
        );
    }

    #[test]
    fn organisation_must_be_registered_and_fit_the_role() {
        let e = env();
        let now = Utc::now();
        let k = ed_key();
        register(&e.store, "c", "k1", &k, false);
        let a = assertion(&k, None, claims("c", now, "j1"));
        let pharmacy = |_: &str| Some((OrgKind::Pharmacy, vec![]));
        let err =
            exchange_client_assertion(&e.store, &e.keys, &form(&a), URL, now, &e.cache, &pharmacy)
                .unwrap_err();
        assert!(err.description.contains("not valid for organisation"));
        let none = |_: &str| None;
        let a = assertion(&k, None, claims("c", now, "j2"));
        let err =
            exchange_client_assertion(&e.store, &e.keys, &form(&a), URL, now, &e.cache, &none)
                .unwrap_err();
        assert!(err.description.contains("not registered"));
    }

    #[test]
    fn jwk_binding() {
        let ec = p384_key();
        let (algs, _) = jwk_verifier(&ec.jwk).unwrap();
        assert_eq!(algs, vec![Algorithm::ES384]);
        let (algs, _) = jwk_verifier(&rsa_key().jwk).unwrap();
        assert_eq!(algs, vec![Algorithm::RS384, Algorithm::RS256]);
        let mut bound = rsa_key().jwk.clone();
        bound["alg"] = json!("RS256");
        assert_eq!(jwk_verifier(&bound).unwrap().0, vec![Algorithm::RS256]);
        assert!(jwk_verifier(&json!({"kty": "oct", "k": "c2VjcmV0"})).is_none());
        let mut small = rsa_key().jwk.clone();
        small["n"] = json!(URL_SAFE_NO_PAD.encode([0xffu8; 128]));
        assert!(jwk_verifier(&small).is_none(), "1024-bit RSA accepted");
    }
}
