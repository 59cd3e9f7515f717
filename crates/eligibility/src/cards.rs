//! Card certificates: the My Number card's user-authentication certificate
//! (利用者証明用電子証明書) and the smartphone certificate (スマホ用電子証明書),
//! and the card simulator behind `tsunagi card ...`.
//!
//! A card is an Ed25519 key pair plus a [`Certificate`] signed by the card
//! authority's key (`DATA_DIR/keys/card-ca-ed25519.pem`, standing in for J-LIS).
//! The platform keeps only the public certificate, as a `Basic` resource
//! (code [`CARD_CODE_SYSTEM`]`|card` or `|smartphone`, `subject` = the Patient, so
//! it sits in the patient's compartment) with a revocation flag. The private key
//! stays in the simulator's `card.json`. The My Number (個人番号) itself is never
//! needed nor stored: a certificate names the Patient resource id only.
//!
//! Rules: one person, at most one live smartphone certificate (a new one revokes
//! the previous); smartphone certificates are refused under age 15 and when the
//! person's card certificate is expired, revoked or absent.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Datelike, Duration, NaiveDate, SecondsFormat, Utc};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_policy::audit::AuditRecord;
use tsunagi_policy::identity::{OrgKind, Principal, Purpose, Role};
use tsunagi_store::{Scope, Store, WriteContext};

/// Code system of platform-kept certificates (`Basic.code`): `card`, `smartphone`.
pub const CARD_CODE_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/card-certificate";
/// Identifier system of certificate serial numbers (`Basic.identifier`).
pub const CARD_SERIAL_SYSTEM: &str =
    "https://tsunagi.dev/fhir/NamingSystem/card-certificate-serial";
/// Extension carrying the certificate JSON (base64) on the `Basic`.
pub const EXT_CERTIFICATE: &str = "https://tsunagi.dev/fhir/StructureDefinition/card-certificate";
/// Extension carrying the revocation flag on the `Basic`.
pub const EXT_REVOKED: &str = "https://tsunagi.dev/fhir/StructureDefinition/card-revoked";
/// Author organisation of the records the eligibility service itself keeps
/// (certificates, consent grants, declarations, settings). No user organisation
/// wrote them, so none may modify them through the REST API.
pub const SERVICE_ORG: &str = "eligibility-service";
/// Issuer name put in certificates.
pub const ISSUER: &str = "tsunagi-card-authority";
/// Smartphone certificates need this age (full years, Japan date).
pub const SMARTPHONE_MIN_AGE: u32 = 15;

/// Card or smartphone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CardKind {
    Card,
    Smartphone,
}

impl CardKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CardKind::Card => "card",
            CardKind::Smartphone => "smartphone",
        }
    }
}

/// A public certificate: who, which key, how long; signed by the card authority.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certificate {
    pub serial: String,
    pub kind: CardKind,
    /// Patient resource id of the holder.
    pub person: String,
    /// Ed25519 public key, base64 (32 bytes).
    pub public_key: String,
    pub not_before: String,
    pub not_after: String,
    pub issuer: String,
    /// Card authority's Ed25519 signature (base64) over the canonical JSON of
    /// every other field.
    #[serde(default)]
    pub signature: String,
}

impl Certificate {
    /// The bytes the authority signs: canonical JSON without `signature`.
    fn tbs(&self) -> Vec<u8> {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.remove("signature");
        }
        let mut out = String::new();
        tsunagi_store::audit::canonical_json(&v, &mut out);
        out.into_bytes()
    }

    pub fn not_before(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.not_before)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    pub fn not_after(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.not_after)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// Valid at `now`: not_before <= now < not_after.
    pub fn valid_at(&self, now: DateTime<Utc>) -> bool {
        matches!((self.not_before(), self.not_after()), (Some(a), Some(b)) if a <= now && now < b)
    }

    /// The certificate as sent in `$reception` / `/auth/card`: base64 of its JSON.
    pub fn encode(&self) -> String {
        B64.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn decode(b64: &str) -> Result<Certificate, String> {
        let bytes = B64
            .decode(b64.trim())
            .map_err(|_| "certificate is not valid base64".to_string())?;
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("certificate is not a card certificate: {e}"))
    }

    fn key(&self) -> Result<VerifyingKey, String> {
        let raw = B64
            .decode(&self.public_key)
            .map_err(|_| "certificate public key is not base64")?;
        let raw: [u8; 32] = raw
            .try_into()
            .map_err(|_| "certificate public key is not 32 bytes")?;
        VerifyingKey::from_bytes(&raw).map_err(|_| "certificate public key is invalid".into())
    }

    /// Id of the `Basic` the platform keeps it as.
    pub fn resource_id(&self) -> String {
        format!("card-{}", self.serial)
    }
}

/// What `card issue` writes: the certificate and the private key. Only the
/// simulator holds it; the platform never sees the private key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CardFile {
    pub certificate: Certificate,
    /// PKCS#8 PEM of the card's Ed25519 private key.
    pub private_key: String,
}

impl CardFile {
    fn signing_key(&self) -> Result<SigningKey, String> {
        SigningKey::from_pkcs8_pem(&self.private_key)
            .map_err(|e| format!("card private key unreadable: {e}"))
    }

    /// Signs a nonce (its UTF-8 bytes); base64 signature.
    pub fn sign(&self, nonce: &str) -> Result<String, String> {
        Ok(self.signer()?.sign(nonce))
    }

    /// The card's key, read once, for signing many nonces (load generators).
    pub fn signer(&self) -> Result<CardSigner, String> {
        Ok(CardSigner(self.signing_key()?))
    }
}

/// A card's private key ready to sign (see [`CardFile::signer`]).
pub struct CardSigner(SigningKey);

impl CardSigner {
    /// Signs a nonce (its UTF-8 bytes); base64 signature.
    pub fn sign(&self, nonce: &str) -> String {
        B64.encode(self.0.sign(nonce.as_bytes()).to_bytes())
    }
}

/// The card authority's key. The server holds the verifying half for checks; the
/// `card` tool also signs with it.
pub struct CardAuthority {
    signing: SigningKey,
}

/// Location of the authority key inside the data directory.
pub fn ca_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("card-ca-ed25519.pem")
}

impl CardAuthority {
    /// A throw-away authority (tests; [`crate::EligibilityService::new`]).
    pub fn ephemeral() -> Self {
        CardAuthority {
            signing: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// Loads `DIR/keys/card-ca-ed25519.pem`, creating it (0600) when absent.
    /// Creation is race-safe (the first hard link wins).
    pub fn load_or_create(data_dir: &Path) -> FhirResult<Self> {
        let path = ca_key_path(data_dir);
        let err = |e: &dyn std::fmt::Display| {
            FhirError::internal(format!("card authority key {}: {e}", path.display()))
        };
        let dir = path.parent().expect("key path has a parent");
        if !path.exists() {
            fs::create_dir_all(dir).map_err(|e| err(&e))?;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| err(&e))?;
            let tmp = dir.join(format!(".card-ca.{}.tmp", uuid::Uuid::new_v4()));
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| err(&e))?;
            f.write_all(pem.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| err(&e))?;
            let linked = fs::hard_link(&tmp, &path);
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(err(&e)),
            }
        }
        let pem = fs::read_to_string(&path).map_err(|e| err(&e))?;
        let signing = SigningKey::from_pkcs8_pem(&pem).map_err(|e| err(&e))?;
        Ok(CardAuthority { signing })
    }

    /// Signs a certificate (sets its `signature`).
    pub fn sign(&self, cert: &mut Certificate) {
        cert.signature = B64.encode(self.signing.sign(&cert.tbs()).to_bytes());
    }

    /// Whether the authority signed this certificate.
    pub fn signed(&self, cert: &Certificate) -> bool {
        let Ok(sig) = B64.decode(&cert.signature) else {
            return false;
        };
        let Ok(sig) = Signature::from_slice(&sig) else {
            return false;
        };
        self.signing
            .verifying_key()
            .verify(&cert.tbs(), &sig)
            .is_ok()
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Full years of age on `today` for a birth date.
pub fn age_on(birth: NaiveDate, today: NaiveDate) -> u32 {
    let mut age = today.year() - birth.year();
    if (today.month(), today.day()) < (birth.month(), birth.day()) {
        age -= 1;
    }
    age.max(0) as u32
}

/// The Japan calendar date of an instant.
pub fn jst_date(t: DateTime<Utc>) -> NaiveDate {
    (t + Duration::hours(9)).date_naive()
}

/// Certificates kept for a person (all, revoked included), with their revocation flag.
pub fn certificates_of(store: &dyn Store, person: &str) -> FhirResult<Vec<(Certificate, bool)>> {
    let q = query::parse(
        "Basic",
        &[
            ("subject".into(), format!("Patient/{person}")),
            (
                "code".into(),
                format!("{CARD_CODE_SYSTEM}|card,{CARD_CODE_SYSTEM}|smartphone"),
            ),
            ("_count".into(), "1000".into()),
        ],
    )?;
    let found = store.search(&q, &Scope::Unrestricted)?;
    Ok(found
        .matches
        .iter()
        .filter_map(|s| s.resource.as_ref().and_then(from_basic))
        .collect())
}

/// The certificate and revocation flag stored in a `Basic`.
pub fn from_basic(r: &Value) -> Option<(Certificate, bool)> {
    let mut cert = None;
    let mut revoked = false;
    for e in r.get("extension")?.as_array()? {
        match e.get("url").and_then(Value::as_str) {
            Some(EXT_CERTIFICATE) => {
                cert = e
                    .get("valueBase64Binary")
                    .and_then(Value::as_str)
                    .and_then(|b| Certificate::decode(b).ok())
            }
            Some(EXT_REVOKED) => {
                revoked = e.get("valueBoolean").and_then(Value::as_bool) == Some(true)
            }
            _ => {}
        }
    }
    Some((cert?, revoked))
}

fn to_basic(cert: &Certificate, revoked: bool) -> Value {
    json!({
        "resourceType": "Basic",
        "id": cert.resource_id(),
        "identifier": [{"system": CARD_SERIAL_SYSTEM, "value": cert.serial}],
        "code": {"coding": [{"system": CARD_CODE_SYSTEM, "code": cert.kind.as_str()}]},
        "subject": {"reference": format!("Patient/{}", cert.person)},
        "created": cert.not_before.get(..10).unwrap_or_default(),
        "extension": [
            {"url": EXT_CERTIFICATE, "valueBase64Binary": cert.encode()},
            {"url": EXT_REVOKED, "valueBoolean": revoked}
        ]
    })
}

/// The operator principal the `card` tool acts as in the audit trail.
fn tool_actor() -> Principal {
    Principal::new(
        "operator",
        OrgKind::Operator,
        vec![],
        Role::Operator,
        Some("card-tool".into()),
        None,
        false,
    )
    .expect("operator principal")
}

fn audit(action: &str, patient: &str, resources: Vec<String>, status: u16) -> Value {
    AuditRecord::new(
        &tool_actor(),
        Purpose::Operations,
        action,
        uuid::Uuid::new_v4().to_string(),
    )
    .with_patient(Some(patient.to_string()))
    .with_resources(resources)
    .success(status)
    .to_json()
}

/// Issues a card or smartphone certificate to `person` and registers its public
/// part (audited as `card-issue`). A smartphone certificate revokes the person's
/// previous one, and needs age 15 or over and a valid card certificate.
pub fn issue(
    store: &dyn Store,
    ca: &CardAuthority,
    person: &str,
    kind: CardKind,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    now: DateTime<Utc>,
) -> FhirResult<CardFile> {
    if not_after <= not_before {
        return Err(FhirError::bad_request(
            None,
            "the certificate's expiry must be after its start",
        ));
    }
    let patient = store
        .read("Patient", person)?
        .filter(|p| !p.deleted)
        .and_then(|p| p.resource)
        .ok_or_else(|| FhirError::not_found(format!("Patient/{person} does not exist")))?;
    let existing = certificates_of(store, person)?;
    let mut to_revoke = Vec::new();
    if kind == CardKind::Smartphone {
        let birth = patient
            .get("birthDate")
            .and_then(Value::as_str)
            .and_then(|b| NaiveDate::parse_from_str(b, "%Y-%m-%d").ok())
            .ok_or_else(|| {
                FhirError::unprocessable(
                    Some("Patient.birthDate"),
                    format!("Patient/{person} has no full birth date; a smartphone certificate needs the age"),
                )
            })?;
        let age = age_on(birth, jst_date(now));
        if age < SMARTPHONE_MIN_AGE {
            return Err(FhirError::unprocessable(
                None,
                format!(
                    "smartphone certificates are issued from age {SMARTPHONE_MIN_AGE}; Patient/{person} is {age}"
                ),
            ));
        }
        let cards: Vec<&Certificate> = existing
            .iter()
            .filter(|(c, _)| c.kind == CardKind::Card)
            .map(|(c, _)| c)
            .collect();
        if cards.is_empty() {
            return Err(FhirError::unprocessable(
                None,
                format!(
                    "Patient/{person} holds no card certificate; a smartphone certificate is issued from a valid card"
                ),
            ));
        }
        let valid = existing
            .iter()
            .any(|(c, revoked)| c.kind == CardKind::Card && !revoked && c.valid_at(now));
        if !valid {
            return Err(FhirError::unprocessable(
                None,
                format!(
                    "the card certificate of Patient/{person} has expired or is revoked; renew the card before registering a smartphone"
                ),
            ));
        }
        to_revoke = existing
            .into_iter()
            .filter(|(c, revoked)| c.kind == CardKind::Smartphone && !revoked)
            .map(|(c, _)| c)
            .collect();
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let mut cert = Certificate {
        serial: uuid::Uuid::new_v4().simple().to_string(),
        kind,
        person: person.to_string(),
        public_key: B64.encode(key.verifying_key().as_bytes()),
        not_before: rfc3339(not_before),
        not_after: rfc3339(not_after),
        issuer: ISSUER.into(),
        signature: String::new(),
    };
    ca.sign(&mut cert);
    let ctx = WriteContext {
        org: Some(SERVICE_ORG.into()),
        user: Some("card-tool".into()),
    };
    let mut tx = store.begin()?;
    let mut records = Vec::new();
    for old in &to_revoke {
        let (s, _) = tx.update("Basic", &old.resource_id(), to_basic(old, true), None, &ctx)?;
        records.push(audit(
            "card-revoke",
            person,
            vec![format!("Basic/{}/_history/{}", s.id, s.version)],
            200,
        ));
    }
    let s = tx.create("Basic", &cert.resource_id(), to_basic(&cert, false), &ctx)?;
    records.push(audit(
        "card-issue",
        person,
        vec![format!("Basic/{}/_history/{}", s.id, s.version)],
        201,
    ));
    tx.audit_append(&records)?;
    tx.commit()?;
    let private_key = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| FhirError::internal(format!("encoding the card key: {e}")))?
        .to_string();
    Ok(CardFile {
        certificate: cert,
        private_key,
    })
}

/// Revokes a certificate by serial (operator; audited as `card-revoke`).
pub fn revoke(store: &dyn Store, serial: &str) -> FhirResult<Certificate> {
    let id = format!("card-{serial}");
    let (cert, revoked) = store
        .read("Basic", &id)?
        .filter(|s| !s.deleted)
        .and_then(|s| s.resource)
        .as_ref()
        .and_then(from_basic)
        .ok_or_else(|| FhirError::not_found(format!("no certificate with serial {serial}")))?;
    if revoked {
        return Ok(cert);
    }
    let ctx = WriteContext {
        org: Some(SERVICE_ORG.into()),
        user: Some("card-tool".into()),
    };
    let mut tx = store.begin()?;
    let (s, _) = tx.update("Basic", &id, to_basic(&cert, true), None, &ctx)?;
    tx.audit_append(&[audit(
        "card-revoke",
        &cert.person,
        vec![format!("Basic/{}/_history/{}", s.id, s.version)],
        200,
    )])?;
    tx.commit()?;
    Ok(cert)
}

/// Why a presented certificate or signature was refused.
fn refused(msg: impl Into<String>) -> FhirError {
    FhirError::new(403, "security", None, msg.into())
}

/// Checks a presented certificate and its signature over `nonce` at `now`:
/// issued by the authority, within its validity, registered and not revoked,
/// and the signature made by its key. Returns the certificate.
pub fn verify_presented(
    store: &dyn Store,
    ca: &CardAuthority,
    certificate_b64: &str,
    signature_b64: &str,
    nonce: &str,
    now: DateTime<Utc>,
) -> FhirResult<Certificate> {
    let cert = Certificate::decode(certificate_b64).map_err(refused)?;
    if !ca.signed(&cert) {
        return Err(refused(
            "the certificate was not issued by the card authority (its signature does not verify)",
        ));
    }
    match (cert.not_before(), cert.not_after()) {
        (Some(nb), _) if now < nb => {
            return Err(refused(format!(
                "the certificate is not valid before {}",
                cert.not_before
            )));
        }
        (_, Some(na)) if now >= na => {
            return Err(refused(format!(
                "the certificate expired at {}",
                cert.not_after
            )));
        }
        (Some(_), Some(_)) => {}
        _ => return Err(refused("the certificate's validity period is unreadable")),
    }
    let kept = store
        .read("Basic", &cert.resource_id())?
        .filter(|s| !s.deleted)
        .and_then(|s| s.resource)
        .as_ref()
        .and_then(from_basic);
    match kept {
        None => {
            return Err(refused(
                "the certificate is not registered with the platform",
            ));
        }
        Some((k, _)) if k != cert => {
            return Err(refused(
                "the certificate does not match the one registered under its serial",
            ));
        }
        Some((_, true)) => return Err(refused("the certificate has been revoked")),
        Some(_) => {}
    }
    let key = cert.key().map_err(refused)?;
    let sig = B64
        .decode(signature_b64.trim())
        .ok()
        .and_then(|b| Signature::from_slice(&b).ok())
        .ok_or_else(|| refused("the signature is not a base64 Ed25519 signature"))?;
    key.verify(nonce.as_bytes(), &sig).map_err(|_| {
        refused("the signature over the nonce does not verify with the certificate's key")
    })?;
    Ok(cert)
}

/// Gives each listed person a card (valid 5 years) unless `DIR/cards/ID.card.json`
/// exists; writes the card files there. For the demo dataset. Returns how many
/// were issued.
pub fn issue_demo_cards(
    store: &dyn Store,
    data_dir: &Path,
    persons: &[String],
) -> FhirResult<usize> {
    let ca = CardAuthority::load_or_create(data_dir)?;
    let dir = data_dir.join("cards");
    fs::create_dir_all(&dir)
        .map_err(|e| FhirError::internal(format!("creating {}: {e}", dir.display())))?;
    let now = Utc::now();
    let mut n = 0;
    for p in persons {
        let path = dir.join(format!("{p}.card.json"));
        if path.exists() {
            continue;
        }
        let card = issue(
            store,
            &ca,
            p,
            CardKind::Card,
            now,
            now + Duration::days(5 * 365),
            now,
        )?;
        let text = serde_json::to_string_pretty(&card).unwrap_or_default();
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| FhirError::internal(format!("writing {}: {e}", path.display())))?;
        n += 1;
    }
    Ok(n)
}

// ------------------------------------------------------------------ CLI

/// `tsunagi card ...`
#[derive(Debug, clap::Args)]
pub struct CardArgs {
    #[command(subcommand)]
    pub command: CardCommand,
}

/// Where the platform's data lives (as for the other operator commands).
#[derive(Debug, Clone, clap::Args)]
pub struct CardDataArgs {
    /// Data directory (holds keys/card-ca-ed25519.pem and the embedded database).
    #[arg(long, env = "TSUNAGI_DATA_DIR")]
    pub data_dir: PathBuf,
    /// PostgreSQL URL; without it the embedded database in the data directory is used.
    #[arg(long, env = "TSUNAGI_DATABASE")]
    pub database: Option<String>,
}

impl CardDataArgs {
    fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        let cfg = tsunagi_server::ServerConfig {
            data_dir: self.data_dir.clone(),
            database: self.database.clone(),
            ..Default::default()
        };
        tsunagi_server::open_store(&cfg).map_err(|e| anyhow::anyhow!("opening the database: {e}"))
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum CardCommand {
    /// Issue a card (or smartphone) certificate to a person and write card.json (key + certificate).
    Issue {
        #[command(flatten)]
        data: CardDataArgs,
        /// Patient resource id of the holder.
        #[arg(long)]
        person: String,
        /// Where to write the card (private key and certificate).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "card")]
        kind: CardKind,
        /// Expiry (RFC 3339 instant or YYYY-MM-DD, JST midnight); default 5 years from now.
        #[arg(long)]
        not_after: Option<String>,
        /// Start of validity (RFC 3339 instant or YYYY-MM-DD); default now.
        #[arg(long)]
        not_before: Option<String>,
    },
    /// Sign a reception nonce with a card; prints {certificate, signature, nonce} as JSON.
    Sign {
        #[arg(long)]
        card: PathBuf,
        #[arg(long)]
        nonce: String,
        /// Print a whole `$reception` Parameters body instead (identity check face,
        /// consent to A, B and C, outpatient).
        #[arg(long)]
        parameters: bool,
    },
    /// Revoke a certificate by serial (operator).
    Revoke {
        #[command(flatten)]
        data: CardDataArgs,
        #[arg(long)]
        serial: String,
    },
}

fn parse_when(s: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .with_context(|| format!("'{s}' is neither an RFC 3339 instant nor YYYY-MM-DD"))?;
    Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc() - Duration::hours(9))
}

pub fn run_card(args: CardArgs) -> anyhow::Result<i32> {
    match args.command {
        CardCommand::Issue {
            data,
            person,
            out,
            kind,
            not_after,
            not_before,
        } => {
            let store = data.open()?;
            let ca = CardAuthority::load_or_create(&data.data_dir)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let now = Utc::now();
            let nb = match not_before {
                Some(s) => parse_when(&s)?,
                None => now,
            };
            let na = match not_after {
                Some(s) => parse_when(&s)?,
                None => now + Duration::days(5 * 365),
            };
            let card = match issue(&*store, &ca, &person, kind, nb, na, now) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("refused: {e}");
                    return Ok(1);
                }
            };
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            f.write_all(serde_json::to_string_pretty(&card)?.as_bytes())?;
            eprintln!(
                "issued {} certificate {} to Patient/{person}, valid until {}; written to {}",
                kind.as_str(),
                card.certificate.serial,
                card.certificate.not_after,
                out.display()
            );
            Ok(0)
        }
        CardCommand::Sign {
            card,
            nonce,
            parameters,
        } => {
            let text =
                fs::read_to_string(&card).with_context(|| format!("reading {}", card.display()))?;
            let card: CardFile = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a card file", card.display()))?;
            let signature = card.sign(&nonce).map_err(|e| anyhow::anyhow!(e))?;
            let body = if parameters {
                crate::reception::reception_parameters(
                    &card.certificate.encode(),
                    &signature,
                    &nonce,
                    "face",
                    [true, true, true],
                    "outpatient",
                )
            } else {
                json!({"certificate": card.certificate.encode(), "signature": signature, "nonce": nonce})
            };
            println!("{}", serde_json::to_string_pretty(&body)?);
            Ok(0)
        }
        CardCommand::Revoke { data, serial } => {
            let store = data.open()?;
            match revoke(&*store, &serial) {
                Ok(c) => {
                    eprintln!("revoked certificate {serial} of Patient/{}", c.person);
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("refused: {e}");
                    Ok(1)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_boundaries() {
        let b = NaiveDate::from_ymd_opt(2011, 11, 21).unwrap();
        assert_eq!(
            age_on(b, NaiveDate::from_ymd_opt(2026, 11, 20).unwrap()),
            14
        );
        assert_eq!(
            age_on(b, NaiveDate::from_ymd_opt(2026, 11, 21).unwrap()),
            15
        );
    }

    #[test]
    fn certificates_are_signed_and_tamper_evident() {
        let ca = CardAuthority::ephemeral();
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let mut c = Certificate {
            serial: "s1".into(),
            kind: CardKind::Card,
            person: "p1".into(),
            public_key: B64.encode(key.verifying_key().as_bytes()),
            not_before: "2026-01-01T00:00:00Z".into(),
            not_after: "2031-01-01T00:00:00Z".into(),
            issuer: ISSUER.into(),
            signature: String::new(),
        };
        ca.sign(&mut c);
        assert!(ca.signed(&c));
        let back = Certificate::decode(&c.encode()).unwrap();
        assert!(ca.signed(&back));
        let mut forged = c.clone();
        forged.person = "p2".into();
        assert!(!ca.signed(&forged));
        assert!(!CardAuthority::ephemeral().signed(&c));
    }
}
