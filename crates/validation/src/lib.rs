//! tsunagi-validation: validation of FHIR R4 resources against the Japanese
//! profiles (JP Core, JP-CLINS, e-prescription, health-checkup report, ...) and
//! the platform's business rules.
//!
//! - [`Validator::builtin`]: no packages; the R4 structure of every resource and
//!   datatype (from a table generated from the HL7 R4 core definitions, CC0),
//!   required bindings to core ValueSets, core invariants, and the business rules.
//! - [`Validator::load`]: the packages installed under `DATA_DIR/packages/` (see
//!   [`install_package`]) plus the terminology masters under `DATA_DIR/terminology/`.
//! - [`Validator::validate`]: a resource (a Bundle with all its entries) against its
//!   `meta.profile` or a named profile; returns issues with FHIRPath expressions.
//!
//! What is checked, and what is not, is listed in docs/VALIDATION.md.

pub mod cli;
mod engine;
pub mod fhirpath;
pub mod package;
mod primitive;
pub mod rules;
mod structure;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tsunagi_fhir::{Issue, Severity};
use tsunagi_terminology::Terminology;

pub use engine::CodeSource;
pub use package::{Conformance, PackageError, PackageInfo};

/// The validator. Cheap to share (`Send + Sync`); compiled profiles and expanded
/// ValueSets are cached inside.
pub struct Validator {
    engine: engine::Engine,
    terminology: Option<Arc<Terminology>>,
}

struct TermSource(Arc<Terminology>);

impl CodeSource for TermSource {
    fn check_code(&self, system: &str, code: &str) -> Option<bool> {
        let r = self.0.validate_code(system, code, None)?;
        // YJ codes: the claims master lags behind; unknown is not an error
        Some(r.result || !Terminology::strict_system(system))
    }
    fn system_name(&self, system: &str) -> Option<String> {
        self.0.master_name(system)
    }
}

/// Directory holding installed packages.
pub fn packages_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("packages")
}

/// Copies a package (`.tgz` or unpacked folder) into `DATA_DIR/packages/` after
/// checking that it loads; returns what it holds.
pub fn install_package(src: &Path, data_dir: &Path) -> anyhow::Result<PackageInfo> {
    let mut c = Conformance::new();
    let infos = c.load_path(src)?;
    let info = infos
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("{}: no package found", src.display()))?;
    if info.resources == 0 {
        anyhow::bail!(
            "{}: no StructureDefinition, ValueSet or CodeSystem inside",
            src.display()
        );
    }
    let dir = packages_dir(data_dir);
    std::fs::create_dir_all(&dir)?;
    let name = src.file_name().ok_or_else(|| anyhow::anyhow!("bad path"))?;
    let dest = dir.join(name);
    if src.is_file() {
        std::fs::copy(src, &dest)?;
    } else {
        copy_dir(src, &dest)?;
    }
    Ok(info)
}

fn copy_dir(src: &Path, dest: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dest)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &dest.join(e.file_name()))?;
        } else {
            std::fs::copy(&p, dest.join(e.file_name()))?;
        }
    }
    Ok(())
}

impl Validator {
    /// No packages: built-in R4 structure table and the business rules.
    pub fn builtin() -> Validator {
        Validator {
            engine: engine::Engine::new(Conformance::builtin_r4()),
            terminology: None,
        }
    }

    /// Packages under `DATA_DIR/packages/` and masters under `DATA_DIR/terminology/`.
    /// Without an R4 core package, the built-in R4 table supplies the base types.
    pub fn load(data_dir: &Path) -> anyhow::Result<Validator> {
        let mut conf = Conformance::builtin_r4();
        let pdir = packages_dir(data_dir);
        if pdir.is_dir() {
            conf.load_path(&pdir)?;
        }
        let term = Terminology::open(data_dir)?;
        Ok(Self::from_parts(conf, Some(term)))
    }

    /// Loads packages from explicit paths (files or folders), plus optional masters.
    pub fn from_paths(
        paths: &[PathBuf],
        terminology: Option<Terminology>,
    ) -> anyhow::Result<Validator> {
        let mut conf = Conformance::builtin_r4();
        for p in paths {
            conf.load_path(p)?;
        }
        Ok(Self::from_parts(conf, terminology))
    }

    pub fn from_parts(conf: Conformance, terminology: Option<Terminology>) -> Validator {
        let mut engine = engine::Engine::new(conf);
        let terminology = terminology.filter(|t| !t.loaded().is_empty()).map(Arc::new);
        if let Some(t) = &terminology {
            engine.codes = Some(Arc::new(TermSource(t.clone())));
        }
        Validator {
            engine,
            terminology,
        }
    }

    /// The loaded packages.
    pub fn packages(&self) -> &[PackageInfo] {
        &self.engine.conf.packages
    }

    /// Notes from loading (differing duplicate canonicals and which copy was used).
    pub fn load_notes(&self) -> &[String] {
        &self.engine.conf.notes
    }

    pub fn terminology(&self) -> Option<&Terminology> {
        self.terminology.as_deref()
    }

    /// Compiles every loaded StructureDefinition and counts its invariants.
    pub fn constraint_coverage(&self) -> ConstraintCoverage {
        let mut c = ConstraintCoverage::default();
        let mut urls: Vec<&String> = self
            .engine
            .conf
            .sds
            .keys()
            .filter(|k| !k.contains('|'))
            .collect();
        urls.sort();
        for url in urls {
            let Some(sd) = self.engine.conf.structure_definition(url) else {
                continue;
            };
            let Some(p) = structure::Profile::compile(&sd) else {
                continue;
            };
            let mut seen = std::collections::HashSet::new();
            for e in &p.elems {
                for k in &e.native_constraints {
                    if seen.insert(k.clone()) {
                        c.total += 1;
                        c.native += 1;
                    }
                }
                for k in &e.constraints {
                    if seen.insert(k.key.clone()) {
                        c.total += 1;
                        if let Err(err) = &k.expr {
                            c.unsupported
                                .push((url.clone(), k.key.clone(), err.to_string()));
                        }
                    }
                }
            }
        }
        c
    }

    /// Is a profile (canonical, optionally `|version`) loaded?
    pub fn has_profile(&self, url: &str) -> bool {
        self.engine.profile(url).is_some()
    }

    /// Validates `resource` against `profile`, or else its `meta.profile`, or else
    /// the base definition of its type. Issues carry FHIRPath expressions; any
    /// issue of severity error (or fatal) means the resource must be rejected.
    /// Never panics.
    pub fn validate(&self, resource: &Value, profile: Option<&str>) -> Vec<Issue> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.engine.validate(resource, profile)
        })) {
            Ok(v) => v,
            Err(_) => vec![Issue {
                severity: Severity::Fatal,
                code: "exception",
                expression: None,
                message: "Internal validator failure on this input (please report it)".into(),
            }],
        }
    }

    /// The `$validate` response for `resource`.
    pub fn validate_to_outcome(&self, resource: &Value, profile: Option<&str>) -> Value {
        tsunagi_fhir::operation_outcome(&self.validate(resource, profile))
    }
}

/// Which invariants of the loaded profiles the FHIRPath evaluator can run.
#[derive(Debug, Clone, Default)]
pub struct ConstraintCoverage {
    /// Distinct (profile, key) invariants in the loaded StructureDefinitions.
    pub total: usize,
    /// Invariants implemented natively (ele-1, ext-1, dom-3).
    pub native: usize,
    /// (profile url, key, reason) of invariants that are reported as warnings
    /// because the evaluator cannot run them.
    pub unsupported: Vec<(String, String, String)>,
}

/// True when any issue is an error or fatal.
pub fn has_errors(issues: &[Issue]) -> bool {
    issues.iter().any(|i| i.severity >= Severity::Error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn validator_is_send_sync() {
        assert_send_sync::<Validator>();
    }
}
