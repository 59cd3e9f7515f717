//! The linkage service (連結): the only component holding the pseudonym key.
//!
//! A pseudonym is HMAC-SHA256(key, "pid" ‖ dataset ‖ person id), so the same person
//! gets unrelated pseudonyms in different datasets and nobody without the key can
//! compute or reverse one. For an approved project that needs several datasets,
//! the linkage service writes a join table (link first, then process): per person,
//! the pseudonym in each dataset and a project-specific link id.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The secret key of the linkage service. Kept in its own file (mode 0600) that
/// the research side is never given; never logged (no Debug).
pub struct LinkageKey {
    key: [u8; 32],
}

impl LinkageKey {
    /// Loads the key file, or creates one with 32 random bytes (hex).
    pub fn load_or_create(path: &Path) -> anyhow::Result<LinkageKey> {
        if path.exists() {
            return Self::load(path);
        }
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(path)
            .with_context(|| format!("creating linkage key {}", path.display()))?;
        f.write_all(hex(&key).as_bytes())?;
        f.sync_all()?;
        Ok(LinkageKey { key })
    }

    pub fn load(path: &Path) -> anyhow::Result<LinkageKey> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading linkage key {}", path.display()))?;
        let text = text.trim();
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("linkage key {} is not 64 hex digits", path.display());
        }
        let mut key = [0u8; 32];
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)?;
        }
        Ok(LinkageKey { key })
    }

    /// A key from bytes (tests and benchmarks).
    pub fn from_bytes(key: [u8; 32]) -> LinkageKey {
        LinkageKey { key }
    }

    fn mac(&self, parts: &[&str]) -> String {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for p in parts {
            // Length-prefixed, so ("ab","c") and ("a","bc") differ.
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p.as_bytes());
        }
        let out = m.finalize().into_bytes();
        hex(&out[..16])
    }

    /// The person's pseudonym in `dataset` (32 hex digits = 128 bits).
    pub fn pseudonym(&self, dataset: &str, person: &str) -> String {
        self.mac(&["pid", dataset, person])
    }

    /// The person's link id in an approved `project` (same for every dataset).
    pub fn link_id(&self, project: &str, person: &str) -> String {
        self.mac(&["link", project, person])
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_per_dataset_and_keyed() {
        let k1 = LinkageKey::from_bytes([1; 32]);
        let k2 = LinkageKey::from_bytes([2; 32]);
        assert_eq!(k1.pseudonym("d1", "pt-01"), k1.pseudonym("d1", "pt-01"));
        assert_ne!(k1.pseudonym("d1", "pt-01"), k1.pseudonym("d2", "pt-01"));
        assert_ne!(k1.pseudonym("d1", "pt-01"), k2.pseudonym("d1", "pt-01"));
        assert_ne!(k1.pseudonym("d1", "pt-01"), k1.link_id("d1", "pt-01"));
        assert_eq!(k1.pseudonym("d1", "pt-01").len(), 32);
        assert!(!k1.pseudonym("d1", "pt-01").contains("pt-01"));
    }

    #[test]
    fn key_file_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("linkage.key");
        let a = LinkageKey::load_or_create(&p).unwrap();
        let b = LinkageKey::load_or_create(&p).unwrap();
        assert_eq!(a.pseudonym("d", "x"), b.pseudonym("d", "x"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0);
        }
        std::fs::write(&p, "zz").unwrap();
        assert!(LinkageKey::load(&p).is_err());
    }
}
