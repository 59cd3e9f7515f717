//! The research side's own audit trail: an append-only JSON-lines file, each line
//! hash-chained to the previous one (SHA-256 over the previous hash and the
//! canonical record), like the platform's. It lives in the research data
//! directory because the research side has no access to the primary database;
//! `tsunagi-research audit verify` names the first altered or missing line.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::Utc;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub struct AuditLog {
    path: PathBuf,
    state: Mutex<(u64, String, File)>,
}

fn hash(prev: &str, seq: u64, record: &Value) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(seq.to_be_bytes());
    h.update(serde_json::to_vec(record).unwrap_or_default());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl AuditLog {
    pub fn open(path: &Path) -> anyhow::Result<AuditLog> {
        let (seq, head) = if path.exists() {
            verify(path)?
        } else {
            (0, GENESIS.to_string())
        };
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            state: Mutex::new((seq, head, file)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record (`time` is added) and syncs it before returning.
    pub fn append(&self, mut record: Value) -> anyhow::Result<u64> {
        record["time"] = json!(Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        let mut st = self
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("audit lock poisoned"))?;
        let seq = st.0 + 1;
        let h = hash(&st.1, seq, &record);
        let line = json!({"seq": seq, "prev": st.1, "hash": h, "record": record});
        let mut bytes = serde_json::to_vec(&line)?;
        bytes.push(b'\n');
        st.2.write_all(&bytes)?;
        st.2.sync_data()?;
        st.0 = seq;
        st.1 = h;
        Ok(seq)
    }

    /// Records matching `pred`, oldest first.
    pub fn records(&self, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Vec<Value>> {
        let _guard = self
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("audit lock poisoned"))?;
        let mut out = Vec::new();
        for line in BufReader::new(File::open(&self.path)?).lines() {
            let v: Value = serde_json::from_str(&line?)?;
            if pred(&v["record"]) {
                out.push(v);
            }
        }
        Ok(out)
    }
}

/// Checks the whole chain; returns (last seq, head hash) or names the bad line.
pub fn verify(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut prev = GENESIS.to_string();
    let mut seq = 0u64;
    for (i, line) in BufReader::new(File::open(path)?).lines().enumerate() {
        let line = line?;
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("line {}: not JSON: {e}", i + 1))?;
        let s = v["seq"].as_u64().unwrap_or(0);
        if s != seq + 1 {
            anyhow::bail!(
                "line {}: seq {s} follows {seq} (missing or reordered)",
                i + 1
            );
        }
        if v["prev"].as_str() != Some(prev.as_str()) {
            anyhow::bail!("line {}: prev hash does not match seq {seq}", i + 1);
        }
        let h = hash(&prev, s, &v["record"]);
        if v["hash"].as_str() != Some(h.as_str()) {
            anyhow::bail!("line {}: record seq {s} was altered", i + 1);
        }
        prev = h;
        seq = s;
    }
    Ok((seq, prev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_detects_alteration() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&p).unwrap();
        log.append(json!({"action": "a"})).unwrap();
        log.append(json!({"action": "b"})).unwrap();
        drop(log);
        let log = AuditLog::open(&p).unwrap();
        assert_eq!(log.append(json!({"action": "c"})).unwrap(), 3);
        assert_eq!(verify(&p).unwrap().0, 3);
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"b\"", "\"x\"");
        std::fs::write(&p, text).unwrap();
        let e = verify(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("altered"), "{e}");
    }
}
