//! A StructureDefinition snapshot compiled into an element tree.

use std::collections::HashMap;

use serde_json::Value;

use crate::fhirpath::{self, Expr, FpError};

#[derive(Debug, Clone)]
pub struct TypeRef {
    pub code: String,
    pub profiles: Vec<String>,
    pub target_profiles: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Binding {
    pub strength: String,
    pub value_set: String,
}

#[derive(Debug)]
pub struct Constraint {
    pub key: String,
    pub error: bool,
    pub human: String,
    pub source: String,
    pub expr: Result<Expr, FpError>,
}

#[derive(Debug, Clone)]
pub struct Discriminator {
    pub kind: String,
    pub path: String,
}

#[derive(Debug, Clone)]
pub struct Slicing {
    pub discriminators: Vec<Discriminator>,
    pub closed: bool,
}

#[derive(Debug)]
pub struct Elem {
    pub id: String,
    pub path: String,
    /// Last path segment (`value[x]`, `coding`).
    pub name: String,
    pub slice_name: Option<String>,
    pub min: u64,
    pub max: Option<u64>,
    /// The base definition allows more than one (JSON array).
    pub array: bool,
    pub types: Vec<TypeRef>,
    pub content_ref: Option<String>,
    pub fixed: Option<Value>,
    pub pattern: Option<Value>,
    /// `ElementDefinition.maxLength` (characters) for string-like primitives.
    pub max_length: Option<u64>,
    pub binding: Option<Binding>,
    pub constraints: Vec<Constraint>,
    /// Keys of constraints implemented natively (see [`NATIVE_CONSTRAINTS`]).
    pub native_constraints: Vec<String>,
    pub slicing: Option<Slicing>,
    pub children: Vec<usize>,
    pub slices: Vec<usize>,
}

impl Elem {
    pub fn is_choice(&self) -> bool {
        self.name.ends_with("[x]")
    }
}

#[derive(Debug)]
pub struct Profile {
    pub url: String,
    pub name: String,
    pub type_name: String,
    pub kind: String,
    pub elems: Vec<Elem>,
}

fn parse_max(s: Option<&str>) -> Option<u64> {
    match s {
        None | Some("*") => None,
        Some(n) => n.parse().ok(),
    }
}

const FHIR_TYPE_EXT: &str = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type";

/// Core constraints the validator implements natively (cheaper and exact).
pub const NATIVE_CONSTRAINTS: &[&str] = &["ele-1", "ext-1", "dom-3"];

impl Profile {
    pub fn compile(sd: &Value) -> Option<Profile> {
        let url = sd.get("url")?.as_str()?.to_string();
        let type_name = sd
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let kind = sd
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = sd
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(&type_name)
            .to_string();
        let els = sd.get("snapshot")?.get("element")?.as_array()?;
        let mut elems: Vec<Elem> = Vec::with_capacity(els.len());
        let mut by_id: HashMap<String, usize> = HashMap::new();
        for el in els {
            let path = el
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let id = el
                .get("id")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| path.clone());
            let name = path.rsplit('.').next().unwrap_or(&path).to_string();
            let types = el
                .get("type")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|t| {
                            let code = t.get("code")?.as_str()?;
                            // FHIRPath system types in R4 snapshots (`http://hl7.org/fhirpath/System.String`)
                            // carry the FHIR type in the structuredefinition-fhir-type extension
                            let fhir_type = t
                                .get("extension")
                                .and_then(Value::as_array)
                                .and_then(|a| {
                                    a.iter().find(|x| {
                                        x.get("url").and_then(Value::as_str) == Some(FHIR_TYPE_EXT)
                                    })
                                })
                                .and_then(|x| x.get("valueUrl").or_else(|| x.get("valueUri")))
                                .and_then(Value::as_str);
                            let mut code = match fhir_type {
                                Some(ft) if code.starts_with("http://hl7.org/fhirpath/") => {
                                    ft.to_string()
                                }
                                _ => code.rsplit('.').next().unwrap_or(code).to_string(),
                            };
                            // R4 types Resource.id as string; its value is an id
                            if kind == "resource" && path == format!("{type_name}.id") {
                                code = "id".to_string();
                            }
                            let list = |k: &str| {
                                t.get(k)
                                    .and_then(Value::as_array)
                                    .map(|a| {
                                        a.iter()
                                            .filter_map(|x| x.as_str().map(str::to_string))
                                            .collect()
                                    })
                                    .unwrap_or_default()
                            };
                            Some(TypeRef {
                                code,
                                profiles: list("profile"),
                                target_profiles: list("targetProfile"),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut fixed = None;
            let mut pattern = None;
            if let Some(m) = el.as_object() {
                for (k, v) in m {
                    if k.starts_with("fixed") {
                        fixed = Some(v.clone());
                    } else if k.starts_with("pattern") {
                        pattern = Some(v.clone());
                    }
                }
            }
            let binding = el.get("binding").and_then(|b| {
                Some(Binding {
                    strength: b.get("strength")?.as_str()?.to_string(),
                    value_set: b.get("valueSet")?.as_str()?.to_string(),
                })
            });
            let native_constraints: Vec<String> = el
                .get("constraint")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.get("key").and_then(Value::as_str))
                        .filter(|k| NATIVE_CONSTRAINTS.contains(k))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            let constraints = el
                .get("constraint")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|c| {
                            let key = c.get("key")?.as_str()?.to_string();
                            if NATIVE_CONSTRAINTS.contains(&key.as_str()) {
                                return None;
                            }
                            let source = c
                                .get("expression")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string();
                            let expr = if source.is_empty() {
                                Err(FpError::Unsupported(
                                    "constraint without a FHIRPath expression".into(),
                                ))
                            } else {
                                fhirpath::parse(&source)
                            };
                            Some(Constraint {
                                key,
                                error: c.get("severity").and_then(Value::as_str) != Some("warning"),
                                human: c
                                    .get("human")
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_string(),
                                source,
                                expr,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let slicing = el.get("slicing").map(|s| Slicing {
                discriminators: s
                    .get("discriminator")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|d| {
                                Some(Discriminator {
                                    kind: d.get("type")?.as_str()?.to_string(),
                                    path: d.get("path")?.as_str()?.to_string(),
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                closed: s.get("rules").and_then(Value::as_str) == Some("closed"),
            });
            let max = parse_max(el.get("max").and_then(Value::as_str));
            let base_max = el
                .get("base")
                .and_then(|b| b.get("max"))
                .and_then(Value::as_str);
            let array = match base_max {
                Some(m) => m != "1" && m != "0",
                None => max != Some(1) && max != Some(0),
            };
            let e = Elem {
                id: id.clone(),
                path,
                name,
                slice_name: el
                    .get("sliceName")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                min: el.get("min").and_then(Value::as_u64).unwrap_or(0),
                max,
                array,
                types,
                content_ref: el
                    .get("contentReference")
                    .and_then(Value::as_str)
                    .map(|s| s.trim_start_matches('#').to_string()),
                fixed,
                pattern,
                max_length: el.get("maxLength").and_then(Value::as_u64),
                binding,
                constraints,
                native_constraints,
                slicing,
                children: vec![],
                slices: vec![],
            };
            let idx = elems.len();
            by_id.insert(id, idx);
            elems.push(e);
        }
        // link parents / slices
        for i in 1..elems.len() {
            let id = elems[i].id.clone();
            let (parent_id, last) = split_last(&id);
            if let Some((nm, slice)) = last.split_once(':') {
                // reslice `name:a/b` is a slice of `name:a`
                let plain = if parent_id.is_empty() {
                    nm.to_string()
                } else {
                    format!("{parent_id}.{nm}")
                };
                // `name:a/b` is a reslice of `name:a` when that slice exists; otherwise
                // the '/' is just part of the slice name (SUSHI allows it).
                let base = match slice.rsplit_once('/') {
                    Some((outer, _)) if by_id.contains_key(&format!("{plain}:{outer}")) => {
                        format!("{plain}:{outer}")
                    }
                    _ => plain,
                };
                if let Some(&b) = by_id.get(&base) {
                    elems[b].slices.push(i);
                }
                continue;
            }
            if let Some(&p) = by_id.get(parent_id) {
                elems[p].children.push(i);
            }
        }
        Some(Profile {
            url,
            name,
            type_name,
            kind,
            elems,
        })
    }

    /// Index of the element whose `path` is `path` (first, not a slice).
    pub fn by_path(&self, path: &str) -> Option<usize> {
        self.elems
            .iter()
            .position(|e| e.path == path && e.slice_name.is_none())
    }
}

/// Splits an element id at its last `.` that is not inside a slice name.
fn split_last(id: &str) -> (&str, &str) {
    // slice names may not contain '.', but may follow ':'; the last '.' before
    // the last segment separates parent and name.
    let bytes = id.as_bytes();
    let mut in_slice = false;
    let mut last_dot = None;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b':' => in_slice = true,
            b'.' => {
                in_slice = false;
                last_dot = Some(i);
            }
            _ => {}
        }
    }
    let _ = in_slice;
    match last_dot {
        Some(i) => (&id[..i], &id[i + 1..]),
        None => ("", id),
    }
}
