//! Loading FHIR packages: npm-style `.tgz` files, unpacked package folders
//! (`<dir>/package/package.json`) and folders of loose conformance JSON.
//!
//! Only the conformance resources the validator uses are parsed
//! (StructureDefinition, ValueSet, CodeSystem); everything else in a package is
//! skipped by file name. Canonicals are indexed by `url` and by `url|version`.
//! Several packages may carry the same canonical (e.g. the eClinicalSummary
//! profiles in JP-CLINS, eReferral and eDischargeSummary): identical duplicates
//! are accepted silently; between differing ones the one with the later `date`
//! wins (first loaded on a tie), and the choice is recorded in [`Conformance::notes`].

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
}

/// Name and version of a loaded package.
#[derive(Debug, Clone, PartialEq)]
pub struct PackageInfo {
    pub name: String,
    pub version: String,
    pub source: PathBuf,
    pub resources: usize,
    /// StructureDefinitions without a snapshot (differential-only builds): they are
    /// loaded but cannot be validated against.
    pub without_snapshot: usize,
}

/// A conformance resource kept as its JSON text (parsed on demand: a parsed
/// `serde_json::Value` of the R4 core takes several hundred MB, the text a tenth).
pub(crate) struct Raw {
    bytes: Box<[u8]>,
    date: String,
    /// From the built-in R4 table: any package copy replaces it silently.
    builtin: bool,
}

impl Raw {
    pub(crate) fn parse(&self) -> Option<Value> {
        serde_json::from_slice(&self.bytes).ok()
    }
}

#[derive(serde::Deserialize)]
struct Head {
    #[serde(rename = "resourceType", default)]
    resource_type: String,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    date: Option<String>,
    #[serde(default)]
    snapshot: Option<serde::de::IgnoredAny>,
}

/// The conformance resources of all loaded packages.
#[derive(Default)]
pub struct Conformance {
    pub(crate) sds: HashMap<String, Arc<Raw>>,
    pub(crate) value_sets: HashMap<String, Arc<Raw>>,
    pub(crate) code_systems: HashMap<String, Arc<Raw>>,
    pub packages: Vec<PackageInfo>,
    /// Decisions taken while loading (differing duplicates).
    pub notes: Vec<String>,
    /// StructureDefinitions seen without a snapshot since the last package started.
    pending_without_snapshot: usize,
    loading_builtin: bool,
}

fn wanted(file_name: &str) -> bool {
    let base = file_name.rsplit('/').next().unwrap_or(file_name);
    if !base.ends_with(".json") || base == "package.json" || base.starts_with('.') {
        return false;
    }
    if base.starts_with("StructureDefinition-")
        || base.starts_with("ValueSet-")
        || base.starts_with("CodeSystem-")
    {
        return true;
    }
    // other `Type-id.json` files are examples or other conformance resources
    let looks_typed = base.split_once('-').is_some_and(|(t, _)| {
        t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
            && t.chars().all(|c| c.is_ascii_alphabetic())
    });
    !looks_typed
}

impl Conformance {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of StructureDefinitions (by url, without version keys).
    pub fn structure_definition_count(&self) -> usize {
        self.sds.keys().filter(|k| !k.contains('|')).count()
    }

    /// Adds one resource; returns true if it was a conformance resource kept.
    pub fn add_resource(&mut self, v: Value) -> bool {
        match serde_json::to_vec(&v) {
            Ok(b) => self.add_bytes(&b),
            Err(_) => false,
        }
    }

    /// Adds one resource given as JSON text.
    pub fn add_bytes(&mut self, bytes: &[u8]) -> bool {
        let Ok(h) = serde_json::from_slice::<Head>(bytes) else {
            return false;
        };
        let Some(url) = h.url else { return false };
        let rt = h.resource_type;
        if rt == "StructureDefinition" && h.snapshot.is_none() {
            self.pending_without_snapshot += 1;
        }
        let map = match rt.as_str() {
            "StructureDefinition" => &mut self.sds,
            "ValueSet" => &mut self.value_sets,
            "CodeSystem" => &mut self.code_systems,
            _ => return false,
        };
        let raw = Arc::new(Raw {
            bytes: bytes.to_vec().into_boxed_slice(),
            date: h.date.unwrap_or_default(),
            builtin: self.loading_builtin,
        });
        let replace = match map.get(&url) {
            None => true,
            Some(old) if old.builtin && !raw.builtin => true,
            Some(old) if old.bytes == raw.bytes => false,
            Some(old) => raw.date > old.date,
        };
        if let Some(old) = map.get(&url)
            && !old.builtin
            && old.bytes != raw.bytes
        {
            let used = if replace { &raw.date } else { &old.date };
            self.notes.push(format!(
                "{rt} {url}: differing copies in several packages; using the one dated {used}"
            ));
        }
        if let Some(ver) = &h.version {
            map.entry(format!("{url}|{ver}"))
                .or_insert_with(|| raw.clone());
        }
        if replace {
            map.insert(url, raw);
        }
        true
    }

    /// Loads a `.tgz` package, an unpacked package folder, a folder of loose JSON,
    /// or a folder holding several of those (e.g. `DATA_DIR/packages`).
    pub fn load_path(&mut self, path: &Path) -> Result<Vec<PackageInfo>, PackageError> {
        let io = |e| PackageError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.is_file() {
            return Ok(vec![self.load_tgz(path)?]);
        }
        if path.join("package").join("package.json").is_file()
            || path.join("package.json").is_file()
        {
            return Ok(vec![self.load_dir(path)?]);
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        let mut out = Vec::new();
        let mut loose = false;
        for p in entries {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tgz") || name.ends_with(".tar.gz") {
                out.push(self.load_tgz(&p)?);
            } else if p.is_dir() {
                out.extend(self.load_path(&p)?);
            } else if name.ends_with(".json") {
                loose = true;
            }
        }
        if loose {
            out.push(self.load_dir(path)?);
        }
        Ok(out)
    }

    /// Loads an npm-style package `.tgz`.
    pub fn load_tgz(&mut self, path: &Path) -> Result<PackageInfo, PackageError> {
        let io = |e| PackageError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let f = std::fs::File::open(path).map_err(io)?;
        let gz = flate2::read::GzDecoder::new(std::io::BufReader::with_capacity(1 << 20, f));
        let mut ar = tar::Archive::new(gz);
        let mut info = PackageInfo {
            name: String::new(),
            version: String::new(),
            source: path.to_path_buf(),
            resources: 0,
            without_snapshot: 0,
        };
        let entries = ar.entries().map_err(io)?;
        let mut buf = Vec::new();
        for entry in entries {
            let mut entry = entry.map_err(io)?;
            let name = entry.path().map_err(io)?.to_string_lossy().to_string();
            let is_manifest = name == "package/package.json";
            if !is_manifest && !wanted(&name) {
                continue;
            }
            buf.clear();
            entry.read_to_end(&mut buf).map_err(io)?;
            if is_manifest {
                let v: Value = serde_json::from_slice(&buf).map_err(|_| PackageError::Format {
                    path: path.to_path_buf(),
                    msg: "package/package.json is not JSON".into(),
                })?;
                info.name = v
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                info.version = v
                    .get("version")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
            } else if self.add_bytes(&buf) {
                info.resources += 1;
            }
        }
        if info.name.is_empty() {
            info.name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
        }
        info.without_snapshot = std::mem::take(&mut self.pending_without_snapshot);
        self.packages.push(info.clone());
        Ok(info)
    }

    /// Loads an unpacked package folder or a folder of loose conformance JSON.
    pub fn load_dir(&mut self, path: &Path) -> Result<PackageInfo, PackageError> {
        let io = |e| PackageError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let dir = if path.join("package").join("package.json").is_file() {
            path.join("package")
        } else {
            path.to_path_buf()
        };
        let mut info = PackageInfo {
            name: String::new(),
            version: String::new(),
            source: path.to_path_buf(),
            resources: 0,
            without_snapshot: 0,
        };
        if let Ok(b) = std::fs::read(dir.join("package.json"))
            && let Ok(v) = serde_json::from_slice::<Value>(&b)
        {
            info.name = v
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            info.version = v
                .get("version")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        for p in files {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            if !wanted(&name) || !p.is_file() {
                continue;
            }
            let b = std::fs::read(&p).map_err(io)?;
            if self.add_bytes(&b) {
                info.resources += 1;
            }
        }
        if info.name.is_empty() {
            info.name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
        }
        info.without_snapshot = std::mem::take(&mut self.pending_without_snapshot);
        self.packages.push(info.clone());
        Ok(info)
    }

    /// The built-in R4 structure table (reduced HL7 R4 core definitions, CC0).
    pub fn builtin_r4() -> Self {
        static DATA: &[u8] = include_bytes!("../data/r4-structure.json.gz");
        let mut s = String::new();
        let mut c = Self::new();
        if flate2::read::GzDecoder::new(DATA)
            .read_to_string(&mut s)
            .is_err()
        {
            return c;
        }
        let Ok(Value::Object(mut doc)) = serde_json::from_str::<Value>(&s) else {
            return c;
        };
        let mut n = 0;
        c.loading_builtin = true;
        for key in ["structureDefinitions", "valueSets", "codeSystems"] {
            if let Some(Value::Array(a)) = doc.remove(key) {
                for r in a {
                    if c.add_resource(r) {
                        n += 1;
                    }
                }
            }
        }
        c.packages.push(PackageInfo {
            name: "tsunagi.builtin.r4".into(),
            version: "4.0.1".into(),
            source: PathBuf::from("(built in)"),
            resources: n,
            without_snapshot: 0,
        });
        c.pending_without_snapshot = 0;
        c.loading_builtin = false;
        c
    }

    fn get(map: &HashMap<String, Arc<Raw>>, url: &str) -> Option<Value> {
        map.get(url)
            .or_else(|| map.get(url.split('|').next().unwrap_or(url)))
            .and_then(|r| r.parse())
    }
    /// A StructureDefinition by canonical (`url` or `url|version`), parsed.
    pub fn structure_definition(&self, url: &str) -> Option<Value> {
        Self::get(&self.sds, url)
    }
    pub fn value_set(&self, url: &str) -> Option<Value> {
        Self::get(&self.value_sets, url)
    }
    pub fn code_system(&self, url: &str) -> Option<Value> {
        Self::get(&self.code_systems, url)
    }
    pub fn has_code_system(&self, url: &str) -> bool {
        self.code_systems.contains_key(url)
    }
}
