//! Accounts of the research side. The research side is a separate process with
//! no access to the primary database or its token key, so it keeps its own
//! accounts: bearer tokens stored as SHA-256 hashes with the user, organisation
//! and role (researcher, reviewer, checker, operator).

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Analyst of a research organisation: applies, queries.
    Researcher,
    /// Member of the review board (審査委員会).
    Reviewer,
    /// Output checker (出力チェック): releases or rejects outputs.
    Checker,
    /// Operator of the research platform: audit, catalogue.
    Operator,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        serde_json::from_value(serde_json::Value::String(s.into()))
            .map_err(|_| format!("unknown role '{s}' (researcher, reviewer, checker, operator)"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub user: String,
    pub org: String,
    pub role: Role,
    /// Hex SHA-256 of the token; the token itself is never stored.
    pub token_sha256: String,
}

pub struct Accounts {
    path: PathBuf,
    list: RwLock<Vec<Account>>,
}

fn digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Accounts {
    pub fn open(data_dir: &Path) -> anyhow::Result<Accounts> {
        let path = data_dir.join("accounts.json");
        let list = if path.exists() {
            serde_json::from_slice(&std::fs::read(&path)?)?
        } else {
            Vec::new()
        };
        Ok(Accounts {
            path,
            list: RwLock::new(list),
        })
    }

    /// Adds an account and returns its new bearer token (shown once).
    pub fn add(&self, user: &str, org: &str, role: Role) -> anyhow::Result<String> {
        let mut raw = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let token: String = format!(
            "rs_{}",
            raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let mut list = self.list.write().map_err(|_| anyhow::anyhow!("poisoned"))?;
        list.push(Account {
            user: user.into(),
            org: org.into(),
            role,
            token_sha256: digest(&token),
        });
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&*list)?)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(token)
    }

    pub fn verify(&self, token: &str) -> Option<Account> {
        let d = digest(token);
        self.list
            .read()
            .ok()?
            .iter()
            .find(|a| a.token_sha256 == d)
            .cloned()
    }
}
