//! Operator tools: tokens, client keys, audit verification.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use tsunagi_policy::identity::{OrgKind, PATIENT_ORG, Principal, Role};
use tsunagi_policy::{ServerKeys, role_allowed_for};
use tsunagi_store::ClientKey;
use tsunagi_store::audit::{ProblemKind, scan_all, verify_chain_against};

use crate::options::DataArgs;

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Print a bearer token signed with the server's key in the data directory.
    Issue {
        #[command(flatten)]
        data: DataArgs,
        /// Organisation code (医療機関等コード, 保険者番号, 地方公共団体コード, ...), or `patient`.
        #[arg(long)]
        org: String,
        /// Role: doctor, dentist, pharmacist, nurse, clerk, insurer-staff, municipality-staff, patient, researcher, reviewer, operator, ministry.
        #[arg(long)]
        role: String,
        /// User id of the person acting.
        #[arg(long)]
        user: Option<String>,
        /// For role patient: the id of their Patient resource.
        #[arg(long)]
        patient: Option<String>,
        /// The user passed a second factor (TOTP).
        #[arg(long)]
        second_factor: bool,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
    },
}

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Register a client's public key (JWK file) for an organisation and role.
    Register {
        #[command(flatten)]
        data: DataArgs,
        /// Client id the client puts in iss/sub of its assertions.
        #[arg(long)]
        client_id: String,
        #[arg(long)]
        org: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        user: Option<String>,
        /// Public JWK (JSON file) with `kid`.
        #[arg(long)]
        jwk: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of the audit trail; exit 1 naming every altered, missing or reordered record.
    Verify {
        #[command(flatten)]
        data: DataArgs,
        /// Head recorded earlier outside the database, as SEQ:HASH (detects a truncated tail).
        #[arg(long)]
        expect_head: Option<String>,
    },
}

/// Kind and flags of a registered organisation, or an error naming the code.
fn org_kind(store: &dyn tsunagi_store::Store, org: &str) -> anyhow::Result<(OrgKind, Vec<String>)> {
    if org == PATIENT_ORG {
        return Ok((OrgKind::Patient, vec![]));
    }
    tsunagi_server::orgs::lookup(store, org).with_context(|| {
        format!(
            "organisation '{org}' is not registered (no active Organization with that identifier)"
        )
    })
}

pub fn token(c: TokenCommand) -> anyhow::Result<u8> {
    let TokenCommand::Issue {
        data,
        org,
        role,
        user,
        patient,
        second_factor,
        ttl,
    } = c;
    let (cfg, store) = data.open()?;
    let role: Role = role.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let (kind, flags) = org_kind(&*store, &org)?;
    if !role_allowed_for(kind, role) {
        bail!("role {role} cannot act for a {kind} organisation");
    }
    if role == Role::Patient {
        let Some(p) = &patient else {
            bail!("role patient needs --patient ID")
        };
        match store
            .read("Patient", p)
            .map_err(|e| anyhow::anyhow!("{e}"))?
        {
            Some(r) if !r.deleted => {}
            _ => bail!("Patient/{p} does not exist"),
        }
    } else if patient.is_some() {
        bail!("--patient is only for role patient");
    }
    let principal = Principal::new(&org, kind, flags, role, user, patient, second_factor)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let keys = ServerKeys::load_or_create(&cfg.data_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let token = keys
        .issue(&principal, chrono::Duration::seconds(ttl))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{token}");
    Ok(0)
}

pub fn client(c: ClientCommand) -> anyhow::Result<u8> {
    let ClientCommand::Register {
        data,
        client_id,
        org,
        role,
        user,
        jwk,
    } = c;
    let (_, store) = data.open()?;
    let role_parsed: Role = role.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let (kind, _) = org_kind(&*store, &org)?;
    if !role_allowed_for(kind, role_parsed) {
        bail!("role {role} cannot act for a {kind} organisation");
    }
    let text =
        std::fs::read_to_string(&jwk).with_context(|| format!("reading {}", jwk.display()))?;
    let jwk_value: serde_json::Value =
        serde_json::from_str(&text).context("the JWK file is not JSON")?;
    if jwk_value.get("d").is_some() {
        bail!("this JWK contains a private key ('d'); register the public key only");
    }
    let kid = jwk_value
        .get("kid")
        .and_then(|v| v.as_str())
        .context("the JWK needs a kid")?
        .to_string();
    store
        .put_client_key(&ClientKey {
            client_id: client_id.clone(),
            org,
            kid: kid.clone(),
            role,
            user,
            jwk: jwk_value,
            created: chrono::Utc::now(),
            revoked: false,
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("registered key {kid} for client {client_id}");
    Ok(0)
}

pub fn audit(c: AuditCommand) -> anyhow::Result<u8> {
    let AuditCommand::Verify { data, expect_head } = c;
    let (_, store) = data.open()?;
    let expected = match &expect_head {
        Some(s) => {
            let (seq, hash) = s.split_once(':').context("--expect-head takes SEQ:HASH")?;
            Some((
                seq.parse::<i64>().context("SEQ must be a number")?,
                hash.to_string(),
            ))
        }
        None => None,
    };
    let report = verify_chain_against(
        scan_all(&*store),
        expected.as_ref().map(|(s, h)| (*s, h.as_str())),
    );
    for p in &report.problems {
        let what = match &p.kind {
            ProblemKind::Altered => "altered: its content no longer matches its hash".to_string(),
            ProblemKind::Missing { count } => {
                format!("missing: {count} record(s) removed before it")
            }
            ProblemKind::Reordered { belongs_at } => {
                format!("reordered: this record belongs at seq {belongs_at}")
            }
            ProblemKind::BadLink => "bad link: does not chain to the record before it".to_string(),
            ProblemKind::Truncated { expected_seq } => {
                format!("truncated: the log ends before seq {expected_seq}")
            }
            ProblemKind::HeadMismatch => {
                "head mismatch: the anchored head hash differs".to_string()
            }
            ProblemKind::Unreadable => "unreadable".to_string(),
        };
        println!("seq {}: {what}", p.seq);
    }
    match &report.head {
        Some((seq, hash)) => println!("checked {} record(s); head {seq}:{hash}", report.checked),
        None => println!("checked 0 records; the audit trail is empty"),
    }
    if report.ok() {
        println!("audit trail OK");
        Ok(0)
    } else {
        println!("audit trail FAILED: {} problem(s)", report.problems.len());
        Ok(1)
    }
}
