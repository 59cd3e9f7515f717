//! The validation engine: walks an instance over the compiled snapshot of its
//! profile(s) and reports issues with FHIRPath locations.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};
use tsunagi_fhir::{Issue, Severity};

use crate::fhirpath::{self, Ctx, FpError, Item};
use crate::package::Conformance;
use crate::primitive;
use crate::structure::{Elem, Profile};

const CORE: &str = "http://hl7.org/fhir/StructureDefinition/";
const MAX_DEPTH: usize = 64;

/// Expanded codes of a ValueSet, as far as the loaded packages allow.
#[derive(Debug, Default)]
pub struct VsCodes {
    /// (system, code)
    pub codes: HashSet<(String, String)>,
    /// Systems included without an enumerable CodeSystem (external or filtered):
    /// codes from them cannot be checked here.
    pub open_systems: HashSet<String>,
    /// The ValueSet itself (or one it includes) could not be found.
    pub unresolved: bool,
}

impl VsCodes {
    fn has_code(&self, system: Option<&str>, code: &str) -> bool {
        match system {
            Some(s) => self.codes.contains(&(s.to_string(), code.to_string())),
            None => self.codes.iter().any(|(_, c)| c == code),
        }
    }
}

/// Something that knows code systems beyond the packages (the terminology masters).
pub trait CodeSource: Send + Sync {
    /// `Some(valid)` when the system is known, `None` when it is not.
    fn check_code(&self, system: &str, code: &str) -> Option<bool>;
    /// Human name of a known system, for messages.
    fn system_name(&self, system: &str) -> Option<String>;
}

type SliceIndexEntry = Option<Arc<SliceIndex>>;
/// An element of a (possibly other) profile, if any.
type ElemRef = Option<(Arc<Profile>, usize)>;

pub struct Engine {
    pub conf: Conformance,
    profiles: RwLock<HashMap<String, Option<Arc<Profile>>>>,
    value_sets: RwLock<HashMap<String, Arc<VsCodes>>>,
    code_systems: RwLock<HashMap<String, Option<Arc<Value>>>>,
    slice_index: RwLock<HashMap<(usize, usize), SliceIndexEntry>>,
    type_profiles: RwLock<HashMap<String, Option<Arc<Profile>>>>,
    /// Keyed by (profile, element, path pointer, path length): discriminator paths
    /// live inside the cached profiles, so their addresses are stable.
    elem_at_cache: RwLock<HashMap<(usize, usize, usize, usize), ElemRef>>,
    pub codes: Option<Arc<dyn CodeSource>>,
}

/// Precomputed slice matching for value/pattern discriminators: for each slice,
/// the expected primitive value of each discriminator path (`None` = the slice
/// does not constrain that path), or `None` when the slice needs the general
/// matcher (bindings, complex patterns).
pub struct SliceIndex {
    paths: Vec<String>,
    specs: Vec<Option<Vec<Option<String>>>>,
}

fn disc_values(v: &Value, paths: &[String]) -> Vec<Option<String>> {
    paths
        .iter()
        .map(|p| {
            let vals = json_path(v, p);
            match vals.as_slice() {
                [Value::String(s)] if p == "url" => Some(strip_version(s).to_string()),
                [Value::String(s)] => Some(s.clone()),
                [one @ (Value::Bool(_) | Value::Number(_))] => Some(one.to_string()),
                _ => None,
            }
        })
        .collect()
}

pub(crate) struct St<'a> {
    pub issues: Vec<Issue>,
    unsupported: HashSet<String>,
    bundle: Option<BundleIndex<'a>>,
    depth: usize,
    /// When only conformance matters (slice matching): stop at the first error.
    probe: bool,
    /// Containing resources (for `%rootResource` of contained resources).
    roots: Vec<&'a Value>,
    /// The next resource validated is a contained one.
    contained_next: bool,
    /// The next resource's explicit profiles are alternatives.
    any_of: bool,
}

impl St<'_> {
    pub fn new() -> Self {
        St {
            issues: Vec::new(),
            unsupported: HashSet::new(),
            bundle: None,
            depth: 0,
            probe: false,
            roots: Vec::new(),
            contained_next: false,
            any_of: false,
        }
    }
    fn err(&mut self, code: &'static str, path: &str, msg: String) {
        self.issues
            .push(Issue::error(code, Some(path.to_string()), msg));
    }
    fn warn(&mut self, code: &'static str, path: &str, msg: String) {
        self.issues
            .push(Issue::warning(code, Some(path.to_string()), msg));
    }
    fn has_error(&self) -> bool {
        self.issues.iter().any(|i| i.severity >= Severity::Error)
    }
}

struct BundleIndex<'a> {
    by_full_url: HashMap<&'a str, &'a Value>,
    by_type_id: HashMap<(String, String), &'a Value>,
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn strip_version(u: &str) -> &str {
    u.split('|').next().unwrap_or(u)
}

/// Pattern match: every property of `pattern` appears in `v` (arrays: each pattern
/// item matches some item of `v`).
pub fn pattern_matches(pattern: &Value, v: &Value) -> bool {
    match (pattern, v) {
        (Value::Object(p), Value::Object(m)) => p
            .iter()
            .all(|(k, pv)| m.get(k).is_some_and(|mv| pattern_matches(pv, mv))),
        (Value::Array(p), Value::Array(a)) => {
            p.iter().all(|pv| a.iter().any(|x| pattern_matches(pv, x)))
        }
        (Value::Array(p), x) if p.len() == 1 => pattern_matches(&p[0], x),
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

fn json_path<'v>(v: &'v Value, path: &str) -> Vec<&'v Value> {
    let mut cur = vec![v];
    if path == "$this" || path.is_empty() {
        return cur;
    }
    for seg in path.split('.') {
        let seg = seg.trim();
        let mut next = Vec::new();
        for c in cur {
            let Value::Object(m) = c else { continue };
            let found = m.get(seg).or_else(|| {
                m.iter()
                    .find(|(k, _)| {
                        k.strip_prefix(seg)
                            .is_some_and(|s| s.starts_with(|ch: char| ch.is_ascii_uppercase()))
                    })
                    .map(|(_, v)| v)
            });
            match found {
                Some(Value::Array(a)) => next.extend(a.iter()),
                Some(x) => next.push(x),
                None => {}
            }
        }
        cur = next;
    }
    cur
}

fn meta_profiles(res: &Value) -> Vec<String> {
    res.get("meta")
        .and_then(|m| m.get("profile"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl Engine {
    pub fn new(conf: Conformance) -> Self {
        Engine {
            conf,
            profiles: RwLock::new(HashMap::new()),
            value_sets: RwLock::new(HashMap::new()),
            code_systems: RwLock::new(HashMap::new()),
            slice_index: RwLock::new(HashMap::new()),
            type_profiles: RwLock::new(HashMap::new()),
            elem_at_cache: RwLock::new(HashMap::new()),
            codes: None,
        }
    }

    /// The compiled profile for a canonical (`url` or `url|version`).
    pub fn profile(&self, url: &str) -> Option<Arc<Profile>> {
        if let Some(p) = self
            .profiles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(url)
        {
            return p.clone();
        }
        let compiled = self
            .conf
            .structure_definition(url)
            .and_then(|sd| Profile::compile(&sd))
            .map(Arc::new);
        self.profiles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(url.to_string(), compiled.clone());
        compiled
    }

    fn code_system(&self, url: &str) -> Option<Arc<Value>> {
        if let Some(c) = self
            .code_systems
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(url)
        {
            return c.clone();
        }
        let c = self.conf.code_system(url).map(Arc::new);
        self.code_systems
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(url.to_string(), c.clone());
        c
    }

    fn type_profile(&self, code: &str) -> Option<Arc<Profile>> {
        if let Some(p) = self
            .type_profiles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(code)
        {
            return p.clone();
        }
        let p = if code.contains("://") {
            self.profile(code)
        } else {
            self.profile(&format!("{CORE}{code}"))
        };
        self.type_profiles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(code.to_string(), p.clone());
        p
    }

    /// Expands a ValueSet as far as the loaded CodeSystems allow.
    pub fn value_set(&self, url: &str) -> Arc<VsCodes> {
        if let Some(v) = self
            .value_sets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(url)
        {
            return v.clone();
        }
        let mut out = VsCodes::default();
        self.expand(url, &mut out, 0);
        let out = Arc::new(out);
        self.value_sets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(url.to_string(), out.clone());
        out
    }

    fn expand(&self, url: &str, out: &mut VsCodes, depth: usize) {
        if depth > 8 {
            return;
        }
        let Some(vs) = self.conf.value_set(url) else {
            out.unresolved = true;
            return;
        };
        if let Some(contains) = vs
            .get("expansion")
            .and_then(|e| e.get("contains"))
            .and_then(Value::as_array)
        {
            fn walk(a: &[Value], out: &mut VsCodes) {
                for c in a {
                    if let (Some(s), Some(k)) = (
                        c.get("system").and_then(Value::as_str),
                        c.get("code").and_then(Value::as_str),
                    ) {
                        out.codes.insert((s.to_string(), k.to_string()));
                    }
                    if let Some(x) = c.get("contains").and_then(Value::as_array) {
                        walk(x, out);
                    }
                }
            }
            walk(contains, out);
            return;
        }
        let Some(includes) = vs
            .get("compose")
            .and_then(|c| c.get("include"))
            .and_then(Value::as_array)
        else {
            out.unresolved = true;
            return;
        };
        for inc in includes {
            if let Some(vss) = inc.get("valueSet").and_then(Value::as_array) {
                for v in vss.iter().filter_map(Value::as_str) {
                    self.expand(v, out, depth + 1);
                }
            }
            let Some(system) = inc.get("system").and_then(Value::as_str) else {
                continue;
            };
            if let Some(concepts) = inc.get("concept").and_then(Value::as_array) {
                for c in concepts {
                    if let Some(code) = c.get("code").and_then(Value::as_str) {
                        out.codes.insert((system.to_string(), code.to_string()));
                    }
                }
                continue;
            }
            if let Some(filters) = inc.get("filter").and_then(Value::as_array) {
                if !self.expand_filter(system, filters, out) {
                    out.open_systems.insert(system.to_string());
                }
                continue;
            }
            match self.code_system(system) {
                Some(cs)
                    if cs
                        .get("content")
                        .and_then(Value::as_str)
                        .is_none_or(|c| c == "complete")
                        && cs
                            .get("concept")
                            .and_then(Value::as_array)
                            .is_some_and(|a| !a.is_empty()) =>
                {
                    fn walk(system: &str, a: &[Value], out: &mut VsCodes) {
                        for c in a {
                            if let Some(code) = c.get("code").and_then(Value::as_str) {
                                out.codes.insert((system.to_string(), code.to_string()));
                            }
                            if let Some(x) = c.get("concept").and_then(Value::as_array) {
                                walk(system, x, out);
                            }
                        }
                    }
                    walk(
                        system,
                        cs["concept"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                        out,
                    );
                }
                _ => {
                    out.open_systems.insert(system.to_string());
                }
            }
        }
    }

    /// `concept is-a X` / `descendent-of X` filters over a CodeSystem in the packages.
    fn expand_filter(&self, system: &str, filters: &[Value], out: &mut VsCodes) -> bool {
        let [f] = filters else { return false };
        let (Some("concept"), Some(op), Some(val)) = (
            f.get("property").and_then(Value::as_str),
            f.get("op").and_then(Value::as_str),
            f.get("value").and_then(Value::as_str),
        ) else {
            return false;
        };
        if op != "is-a" && op != "descendent-of" {
            return false;
        }
        let Some(cs) = self.code_system(system) else {
            return false;
        };
        fn find<'v>(a: &'v [Value], code: &str) -> Option<&'v Value> {
            for c in a {
                if c.get("code").and_then(Value::as_str) == Some(code) {
                    return Some(c);
                }
                if let Some(x) = c
                    .get("concept")
                    .and_then(Value::as_array)
                    .and_then(|k| find(k, code))
                {
                    return Some(x);
                }
            }
            None
        }
        fn all(system: &str, a: &[Value], out: &mut VsCodes) {
            for c in a {
                if let Some(code) = c.get("code").and_then(Value::as_str) {
                    out.codes.insert((system.to_string(), code.to_string()));
                }
                if let Some(x) = c.get("concept").and_then(Value::as_array) {
                    all(system, x, out);
                }
            }
        }
        let Some(node) = cs
            .get("concept")
            .and_then(Value::as_array)
            .and_then(|a| find(a, val))
        else {
            return false;
        };
        if op == "is-a" {
            out.codes.insert((system.to_string(), val.to_string()));
        }
        all(
            system,
            node.get("concept")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[]),
            out,
        );
        true
    }

    // ------------------------------------------------------------ entry points

    /// Validates a resource (a Bundle validates its entries too).
    pub fn validate(&self, res: &Value, profile: Option<&str>) -> Vec<Issue> {
        let mut st = St::new();
        let Some(obj) = res.as_object() else {
            st.err(
                "structure",
                "$this",
                format!(
                    "A FHIR resource must be a JSON object, found {}",
                    primitive::kind(res)
                ),
            );
            return st.issues;
        };
        let rt = obj
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("");
        if rt == "Bundle" {
            st.bundle = Some(self.index_bundle(res));
        }
        let explicit: Vec<String> = profile.map(|p| vec![p.to_string()]).unwrap_or_default();
        let root = if rt.is_empty() {
            "$this".to_string()
        } else {
            rt.to_string()
        };
        self.validate_resource(res, &root, &explicit, &mut st);
        if rt == "Bundle" {
            self.check_bundle_references(res, &mut st);
        } else {
            self.check_contained_references(res, &root, &mut st);
        }
        crate::rules::apply(self, res, &root, &mut st.issues);
        dedup(st.issues)
    }

    fn index_bundle<'a>(&self, b: &'a Value) -> BundleIndex<'a> {
        let mut idx = BundleIndex {
            by_full_url: HashMap::new(),
            by_type_id: HashMap::new(),
        };
        for e in b
            .get("entry")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let Some(r) = e.get("resource") else { continue };
            if let Some(fu) = e.get("fullUrl").and_then(Value::as_str) {
                idx.by_full_url.insert(fu, r);
            }
            if let (Some(t), Some(id)) = (
                r.get("resourceType").and_then(Value::as_str),
                r.get("id").and_then(Value::as_str),
            ) {
                idx.by_type_id.insert((t.to_string(), id.to_string()), r);
            }
        }
        idx
    }

    fn resolve<'a>(&self, reference: &str, st: &St<'a>) -> Option<&'a Value> {
        let b = st.bundle.as_ref()?;
        if let Some(r) = b.by_full_url.get(reference) {
            return Some(r);
        }
        let parts: Vec<&str> = reference.trim_end_matches('/').rsplitn(3, '/').collect();
        if parts.len() >= 2 {
            return b
                .by_type_id
                .get(&(parts[1].to_string(), parts[0].to_string()))
                .copied();
        }
        None
    }

    pub(crate) fn validate_resource<'a>(
        &self,
        res: &'a Value,
        path: &str,
        explicit: &[String],
        st: &mut St<'a>,
    ) {
        // flags set by the caller for this resource only
        let any_of = std::mem::take(&mut st.any_of);
        let contained = std::mem::take(&mut st.contained_next);
        if st.depth > MAX_DEPTH {
            st.err("structure", path, "Resources are nested too deeply".into());
            return;
        }
        let Some(obj) = res.as_object() else {
            st.err(
                "structure",
                path,
                format!(
                    "A resource must be a JSON object, found {}",
                    primitive::kind(res)
                ),
            );
            return;
        };
        let Some(rt) = obj.get("resourceType").and_then(Value::as_str) else {
            st.err(
                "structure",
                path,
                "The resource has no 'resourceType'".into(),
            );
            return;
        };
        let Some(base) = self.type_profile(rt).filter(|p| p.kind == "resource") else {
            st.err(
                "structure",
                path,
                format!("'{rt}' is not a FHIR R4 resource type"),
            );
            return;
        };
        let mut targets: Vec<Arc<Profile>> = Vec::new();
        let mut wanted: Vec<String> = explicit.to_vec();
        if explicit.is_empty() {
            wanted = meta_profiles(res);
        } else if any_of && explicit.len() > 1 {
            // element type lists several profiles: the resource must meet one of them
            let claimed: Vec<String> = meta_profiles(res)
                .iter()
                .map(|p| strip_version(p).to_string())
                .collect();
            let pick = explicit
                .iter()
                .find(|p| claimed.iter().any(|c| c == strip_version(p)))
                .or_else(|| explicit.iter().find(|p| self.conforms(res, p)))
                .unwrap_or(&explicit[0]);
            wanted = vec![pick.clone()];
        }
        for url in &wanted {
            match self.profile(url) {
                Some(p) if p.type_name == rt => {
                    if !targets.iter().any(|t| t.url == p.url) {
                        targets.push(p)
                    }
                }
                Some(p) => st.err(
                    "invalid",
                    path,
                    format!(
                        "Profile {} is for resource type {}, but this resource is a {rt}",
                        p.url, p.type_name
                    ),
                ),
                None => {
                    if !explicit.is_empty() {
                        st.err(
                            "not-found",
                            path,
                            format!(
                                "Profile {url} is not loaded (install the package that defines it)"
                            ),
                        );
                    } else {
                        st.warn(
                            "not-supported",
                            &format!("{path}.meta.profile"),
                            format!("Profile {url} is not loaded; the resource was checked against the base {rt} definition only"),
                        );
                    }
                }
            }
        }
        if targets.is_empty() {
            targets.push(base);
        }
        st.depth += 1;
        let pushed = !contained || st.roots.is_empty();
        if pushed {
            st.roots.push(res);
        }
        for p in targets {
            self.check_element_value(&p, 0, res, path, rt, res, st);
            if st.probe && st.has_error() {
                break;
            }
        }
        if pushed {
            st.roots.pop();
        }
        st.depth -= 1;
        check_dom3(res, path, st);
    }

    /// Checks the members of `obj` against the children of element `ei`.
    fn check_children<'a>(
        &self,
        prof: &Arc<Profile>,
        ei: usize,
        obj: &'a Map<String, Value>,
        path: &str,
        res: &'a Value,
        st: &mut St<'a>,
    ) {
        let mut elem = &prof.elems[ei];
        if let Some(cr) = &elem.content_ref
            && let Some(t) = prof.by_path(cr)
        {
            elem = &prof.elems[t];
        }
        let children = elem.children.clone();
        let mut known: Vec<&str> = Vec::with_capacity(obj.len() + 1);
        known.push("resourceType");
        for ci in children {
            let c = &prof.elems[ci];
            // (key, type code)
            let mut present: Vec<(&'a str, String)> = Vec::new();
            if c.is_choice() {
                let base = &c.name[..c.name.len() - 3];
                for k in obj.keys() {
                    let kk = k.strip_prefix('_').unwrap_or(k);
                    let Some(suffix) = kk.strip_prefix(base) else {
                        continue;
                    };
                    if !suffix.starts_with(|ch: char| ch.is_ascii_uppercase()) {
                        continue;
                    }
                    if k.starts_with('_') {
                        known.push(k.as_str());
                        continue;
                    }
                    let t = c.types.iter().find(|t| upper_first(&t.code) == suffix);
                    match t {
                        Some(t) => present.push((k.as_str(), t.code.clone())),
                        None => {
                            if self.type_profile(&lower_if_primitive(suffix)).is_some()
                                || self.type_profile(suffix).is_some()
                            {
                                let allowed: Vec<String> = c
                                    .types
                                    .iter()
                                    .map(|t| format!("{}{}", base, upper_first(&t.code)))
                                    .collect();
                                st.err(
                                    "structure",
                                    &format!("{path}.{k}"),
                                    format!(
                                        "Type {suffix} is not allowed for {}; allowed: {}",
                                        c.path,
                                        allowed.join(", ")
                                    ),
                                );
                            } else {
                                continue;
                            }
                        }
                    }
                    known.push(k.as_str());
                }
            } else {
                let tc = c
                    .types
                    .first()
                    .map(|t| t.code.clone())
                    .unwrap_or_else(|| "BackboneElement".into());
                if obj.contains_key(&c.name) {
                    present.push((
                        obj.get_key_value(&c.name)
                            .map(|(k, _)| k.as_str())
                            .unwrap_or(""),
                        tc.clone(),
                    ));
                    known.push(c.name.as_str());
                }
                let uv = if primitive::is_primitive(&tc) {
                    obj.get_key_value(format!("_{}", c.name).as_str())
                } else {
                    None
                };
                if let Some((k, uv)) = uv {
                    known.push(k.as_str());
                    self.check_primitive_ext(uv, &format!("{path}.{}", c.name), st);
                    if !obj.contains_key(&c.name) {
                        // extension-only primitive: counts for cardinality
                        let n = match uv {
                            Value::Array(a) => a.len() as u64,
                            _ => 1,
                        };
                        if let Some(max) = c.max
                            && n > max
                        {
                            st.err(
                                "structure",
                                &format!("{path}.{}", c.name),
                                format!("{} allows at most {max}, found {n}", c.path),
                            );
                        }
                        continue;
                    }
                }
            }
            // gather items
            let mut items: Vec<(&'a Value, String, String)> = Vec::new();
            for (k, tc) in &present {
                let v = &obj[*k];
                match v {
                    Value::Array(a) => {
                        if !c.array {
                            st.err(
                                "structure",
                                &format!("{path}.{k}"),
                                format!("{} is a single element, but an array was given", c.path),
                            );
                        }
                        if a.is_empty() {
                            st.err(
                                "structure",
                                &format!("{path}.{k}"),
                                "Arrays must not be empty (leave the element out instead)".into(),
                            );
                        }
                        let ext = if a.iter().any(Value::is_null) {
                            obj.get(&format!("_{k}")).and_then(Value::as_array)
                        } else {
                            None
                        };
                        for (i, x) in a.iter().enumerate() {
                            if x.is_null()
                                && ext.is_some_and(|e| e.get(i).is_some_and(|y| !y.is_null()))
                            {
                                continue; // value carried only by the extension array
                            }
                            items.push((x, tc.clone(), child_path(path, k, Some(i))));
                        }
                    }
                    x => {
                        if c.array {
                            st.err(
                                "structure",
                                &format!("{path}.{k}"),
                                format!("{} can repeat, so it must be a JSON array", c.path),
                            );
                        }
                        items.push((x, tc.clone(), child_path(path, k, None)));
                    }
                }
            }
            let n = items.len() as u64;
            let where_ = || child_path(path, c.name.trim_end_matches("[x]"), None);
            if n < c.min {
                st.err(
                    "required",
                    &where_(),
                    format!(
                        "{} is required: minimum cardinality {} but found {n} (profile {})",
                        c.path, c.min, prof.name
                    ),
                );
            }
            if let Some(max) = c.max
                && n > max
            {
                if max == 0 {
                    st.err(
                        "structure",
                        &where_(),
                        format!("{} is not allowed by profile {}", c.path, prof.name),
                    );
                } else {
                    st.err(
                        "structure",
                        &where_(),
                        format!(
                            "{} allows at most {max}, found {n} (profile {})",
                            c.path, prof.name
                        ),
                    );
                }
            }
            if c.slices.is_empty() {
                for (v, tc, p) in items {
                    self.check_element_value(prof, ci, v, &p, &tc, res, st);
                }
            } else {
                self.check_slices(prof, ci, items, &where_(), res, st);
            }
            if st.probe && st.has_error() {
                return;
            }
        }
        for k in obj.keys() {
            if !known.contains(&k.as_str()) {
                if k == "fhir_comments" {
                    continue;
                }
                let msg = if let Some(base) = k.strip_prefix('_') {
                    format!("Unknown element '{k}': no element '{base}' is defined here")
                } else {
                    format!(
                        "Unknown element '{k}' in {} (not defined in {})",
                        elem.path, prof.name
                    )
                };
                st.err("structure", &format!("{path}.{k}"), msg);
            }
        }
    }

    fn check_primitive_ext<'a>(&self, uv: &'a Value, path: &str, st: &mut St<'a>) {
        let check = |v: &'a Value, p: String, st: &mut St<'a>| match v {
            Value::Null => {}
            Value::Object(m) => {
                if let Some(el) = self.type_profile("Element") {
                    self.check_children(&el, 0, m, &p, v, st);
                }
            }
            other => st.err(
                "structure",
                &p,
                format!(
                    "The '_' companion of a primitive must be an object, found {}",
                    primitive::kind(other)
                ),
            ),
        };
        match uv {
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    check(x, format!("{path}[{i}]"), st);
                }
            }
            x => check(x, path.to_string(), st),
        }
    }

    /// Checks one value of element `ei` with type `tc`.
    #[allow(clippy::too_many_arguments)]
    fn check_element_value<'a>(
        &self,
        prof: &Arc<Profile>,
        ei: usize,
        v: &'a Value,
        path: &str,
        tc: &str,
        res: &'a Value,
        st: &mut St<'a>,
    ) {
        let e = &prof.elems[ei];
        if let Some(f) = &e.fixed
            && f != v
            && !(f.is_number() && v.is_number() && f.as_f64() == v.as_f64())
        {
            st.err(
                "value",
                path,
                format!(
                    "Value must be exactly {} (fixed by profile {}), found {}",
                    short(f),
                    prof.name,
                    short(v)
                ),
            );
        }
        if let Some(p) = &e.pattern
            && !pattern_matches(p, v)
        {
            st.err(
                "value",
                path,
                format!(
                    "Value must match the pattern {} (profile {}), found {}",
                    short(p),
                    prof.name,
                    short(v)
                ),
            );
        }
        if primitive::is_primitive(tc) {
            if let Some(msg) = primitive::check(tc, v) {
                st.err("value", path, format!("{} ({tc}) {msg}", e.path));
                return;
            }
            if let (Some(max), Some(s)) = (e.max_length, v.as_str())
                && s.chars().count() as u64 > max
            {
                st.err(
                    "too-long",
                    path,
                    format!(
                        "{} is limited to {max} characters, found {} (profile {})",
                        e.path,
                        s.chars().count(),
                        prof.name
                    ),
                );
            }
            if let Some(b) = &e.binding
                && tc == "code"
                && let Some(s) = v.as_str()
            {
                self.check_codes(b, &e.path, &[(None, s)], path, st);
            }
            self.check_constraints(prof, ei, v, tc, path, res, st);
            return;
        }
        let Some(obj) = v.as_object() else {
            st.err(
                "structure",
                path,
                format!(
                    "{} ({tc}) must be a JSON object, found {}",
                    e.path,
                    primitive::kind(v)
                ),
            );
            return;
        };
        if obj.is_empty() {
            st.err("structure", path, format!("{} must not be empty (ele-1: all FHIR elements must have a @value or children)", e.path));
            return;
        }
        let is_resource = tc == "Resource"
            || (self.type_profile(tc).is_some_and(|p| p.kind == "resource") && ei != 0);
        if is_resource {
            let profiles: Vec<String> = e
                .types
                .iter()
                .find(|t| t.code == tc)
                .map(|t| t.profiles.clone())
                .unwrap_or_default();
            st.contained_next = e.path.ends_with(".contained");
            st.any_of = true;
            self.validate_resource(v, path, &profiles, st);
            return;
        }
        let has_own_children = !e.children.is_empty() || (e.content_ref.is_some() && ei != 0);
        if has_own_children || ei == 0 {
            self.check_children(prof, ei, obj, path, res, st);
        } else if let Some(tp) = self.type_profile(tc) {
            self.check_children(&tp, 0, obj, path, res, st);
            self.check_constraints(&tp, 0, v, tc, path, res, st);
        } else if tc != "Element" && tc != "BackboneElement" {
            st.warn(
                "not-supported",
                path,
                format!(
                    "Type {tc} of {} is not known; its content was not checked",
                    e.path
                ),
            );
        }
        // profiles on the type (extensions, datatype profiles)
        if let Some(t) = e.types.iter().find(|t| t.code == tc)
            && !t.profiles.is_empty()
            && ei != 0
        {
            let mut checked = false;
            for pu in &t.profiles {
                if let Some(tp) = self.profile(pu) {
                    if !Arc::ptr_eq(&tp, prof) {
                        self.check_children(&tp, 0, obj, path, res, st);
                        self.check_constraints(&tp, 0, v, tc, path, res, st);
                    }
                    checked = true;
                    break;
                }
            }
            if !checked {
                st.warn(
                    "not-supported",
                    path,
                    format!(
                        "Profile {} of {} is not loaded; the element was checked against {tc} only",
                        t.profiles[0], e.path
                    ),
                );
            }
        }
        if tc == "Reference"
            && let Some(r) = obj.get("reference").and_then(Value::as_str)
        {
            self.check_reference_target(e, r, path, st);
        }
        if tc == "Extension" && ei != 0 && t_profiles_empty(e, tc) {
            self.check_extension_by_url(obj, path, res, st);
        }
        if tc == "Extension" {
            let has_ext = obj.get("extension").is_some();
            let has_val = obj.keys().any(|k| k.starts_with("value"));
            if has_ext == has_val {
                st.err(
                    "invariant",
                    path,
                    "ext-1: an extension must have either extensions or a value[x], not both"
                        .into(),
                );
            }
            if !obj.get("url").is_some_and(Value::is_string) {
                st.err("required", path, "An extension must have a 'url'".into());
            }
        }
        if let Some(b) = &e.binding {
            let codes: Vec<(Option<&str>, &str)> = match tc {
                "CodeableConcept" => obj
                    .get("coding")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|c| {
                                Some((
                                    c.get("system").and_then(Value::as_str),
                                    c.get("code").and_then(Value::as_str)?,
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                "Coding" => obj
                    .get("code")
                    .and_then(Value::as_str)
                    .map(|c| vec![(obj.get("system").and_then(Value::as_str), c)])
                    .unwrap_or_default(),
                _ => vec![],
            };
            if !codes.is_empty() {
                self.check_codes(b, &e.path, &codes, path, st);
            } else if tc == "CodeableConcept"
                && b.strength == "required"
                && obj.get("text").is_some()
                && obj.get("coding").is_none()
            {
                st.err("code-invalid", path, format!("{} has a required binding to {}: a coding is needed, text alone is not enough", e.path, b.value_set));
            }
        }
        self.check_constraints(prof, ei, v, tc, path, res, st);
    }

    /// A reference that resolves (contained, or an entry of the Bundle) must point
    /// at a resource type the element's `targetProfile`s allow.
    fn check_reference_target(&self, e: &Elem, reference: &str, path: &str, st: &mut St<'_>) {
        let Some(t) = e.types.iter().find(|t| t.code == "Reference") else {
            return;
        };
        if t.target_profiles.is_empty() {
            return;
        }
        let target = match reference.strip_prefix('#') {
            Some(id) if !id.is_empty() => st
                .roots
                .last()
                .and_then(|r| r.get("contained"))
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .find(|c| c.get("id").and_then(Value::as_str) == Some(id))
                }),
            Some(_) => None,
            None => self.resolve(reference, st),
        };
        let Some(rt) = target
            .and_then(|r| r.get("resourceType"))
            .and_then(Value::as_str)
        else {
            return;
        };
        let allowed: Vec<String> = t
            .target_profiles
            .iter()
            .filter_map(|u| match self.profile(u) {
                Some(p) => Some(p.type_name.clone()),
                None => strip_version(u).rsplit('/').next().map(str::to_string),
            })
            .collect();
        if !allowed.iter().any(|a| a == rt || a == "Resource") {
            st.err(
                "structure",
                &format!("{path}.reference"),
                format!(
                    "Reference '{reference}' points to a {rt}, but {} allows only {}",
                    e.path,
                    allowed.join(", ")
                ),
            );
        }
    }

    fn check_extension_by_url<'a>(
        &self,
        obj: &'a Map<String, Value>,
        path: &str,
        res: &'a Value,
        st: &mut St<'a>,
    ) {
        let Some(url) = obj.get("url").and_then(Value::as_str) else {
            return;
        };
        match self.profile(url) {
            Some(tp) if tp.type_name == "Extension" => {
                let v = res; // constraints of the extension definition use %resource
                self.check_children(&tp, 0, obj, path, v, st);
            }
            Some(_) => st.err(
                "structure",
                path,
                format!("{url} is not an extension definition"),
            ),
            None => {
                if !url.starts_with("http://hl7.org/fhir/StructureDefinition/")
                    || self.conf.structure_definition_count() > 1000
                {
                    st.warn("not-supported", path, format!("Extension {url} is not known (its definition is not loaded); its content was not checked"));
                }
            }
        }
    }

    fn check_codes(
        &self,
        b: &crate::structure::Binding,
        elem_path: &str,
        codes: &[(Option<&str>, &str)],
        path: &str,
        st: &mut St<'_>,
    ) {
        if b.strength != "required" && b.strength != "extensible" {
            return;
        }
        let vs = self.value_set(strip_version(&b.value_set));
        if vs.unresolved && vs.codes.is_empty() && vs.open_systems.is_empty() {
            if b.strength == "required" && !st.probe {
                st.warn("not-supported", path, format!("ValueSet {} (required binding of {elem_path}) is not loaded; the code was not checked", b.value_set));
            }
            return;
        }
        let mut unknown_systems = Vec::new();
        for (sys, code) in codes {
            if vs.has_code(*sys, code) {
                return;
            }
            if sys.is_none() && !vs.open_systems.is_empty() {
                // a bare code bound to a ValueSet drawn from external code systems
                unknown_systems.push(vs.open_systems.iter().next().cloned().unwrap_or_default());
                continue;
            }
            if let Some(s) = sys
                && vs.open_systems.contains(*s)
            {
                match self.codes.as_ref().and_then(|c| c.check_code(s, code)) {
                    Some(true) => return,
                    Some(false) => {}
                    None => {
                        unknown_systems.push(s.to_string());
                    }
                }
            }
        }
        if !unknown_systems.is_empty() {
            if !st.probe {
                st.issues.push(Issue {
                    severity: Severity::Information,
                    code: "not-supported",
                    expression: Some(path.to_string()),
                    message: format!("Code system {} is not available here; the binding of {elem_path} to {} was not checked", unknown_systems[0], b.value_set),
                });
            }
            return;
        }
        let shown: Vec<String> = codes
            .iter()
            .map(|(s, c)| format!("{}#{c}", s.unwrap_or("")))
            .collect();
        let msg = format!(
            "{} is not in ValueSet {} ({} binding of {elem_path})",
            shown.join(", "),
            b.value_set,
            b.strength
        );
        if b.strength == "required" {
            st.err("code-invalid", path, msg);
        } else if !st.probe {
            st.warn("code-invalid", path, msg);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_constraints<'a>(
        &self,
        prof: &Arc<Profile>,
        ei: usize,
        v: &'a Value,
        tc: &str,
        path: &str,
        res: &'a Value,
        st: &mut St<'a>,
    ) {
        let e = &prof.elems[ei];
        if e.constraints.is_empty() {
            return;
        }
        let hint: Option<&'a str> = None;
        let _ = tc;
        let ctx = Ctx {
            resource: res,
            root: st.roots.last().copied().unwrap_or(res),
            context: v,
        };
        let focus = [Item::Node(v, hint)];
        for c in &e.constraints {
            match &c.expr {
                Ok(expr) => match fhirpath::evaluate(expr, &ctx, &focus) {
                    Ok(r) => {
                        if !fhirpath::as_constraint_result(&r) {
                            let msg = format!(
                                "Constraint {} failed: {} [{}] (profile {})",
                                c.key, c.human, c.source, prof.name
                            );
                            if c.error {
                                st.err("invariant", path, msg);
                            } else if !st.probe {
                                st.warn("invariant", path, msg);
                            }
                        }
                    }
                    Err(err) => self.unsupported(c, &err, prof, path, st),
                },
                Err(err) => self.unsupported(c, err, prof, path, st),
            }
        }
    }

    fn unsupported(
        &self,
        c: &crate::structure::Constraint,
        err: &FpError,
        prof: &Profile,
        path: &str,
        st: &mut St<'_>,
    ) {
        if st.probe {
            return;
        }
        let key = format!("{}|{}", prof.url, c.key);
        if st.unsupported.insert(key) {
            st.warn(
                "not-supported",
                path,
                format!(
                    "Constraint {} ({}) of profile {} was not evaluated: {err}",
                    c.key, c.human, prof.name
                ),
            );
        }
    }

    // ------------------------------------------------------------ slicing

    fn check_slices<'a>(
        &self,
        prof: &Arc<Profile>,
        ci: usize,
        items: Vec<(&'a Value, String, String)>,
        where_: &str,
        res: &'a Value,
        st: &mut St<'a>,
    ) {
        let c = &prof.elems[ci];
        let slices = c.slices.clone();
        let mut counts = vec![0u64; slices.len()];
        let mut undetermined = 0u64;
        let closed = c.slicing.as_ref().is_some_and(|s| s.closed);
        let index = self.slice_index(prof, ci);
        for (v, tc, p) in items {
            let mut chosen = None;
            let mut unknown = false;
            let vals = index.as_ref().map(|ix| disc_values(v, &ix.paths));
            for (si, &s) in slices.iter().enumerate() {
                let fast = match (&index, &vals) {
                    (Some(ix), Some(vals)) => ix.specs[si].as_ref().map(|spec| {
                        spec.iter()
                            .zip(vals)
                            .all(|(e, a)| e.as_ref().is_none_or(|e| a.as_ref() == Some(e)))
                    }),
                    _ => None,
                };
                let m = match fast {
                    Some(b) => Some(b),
                    None => self.slice_matches(prof, ci, s, v, &tc, st),
                };
                match m {
                    Some(true) => {
                        chosen = Some((si, s));
                        break;
                    }
                    Some(false) => {}
                    None => unknown = true,
                }
            }
            match chosen {
                Some((si, s)) => {
                    counts[si] += 1;
                    self.check_element_value(prof, s, v, &p, &tc, res, st);
                }
                None => {
                    if unknown {
                        undetermined += 1;
                    } else if closed {
                        st.err("structure", &p, format!("This item matches none of the slices defined for {} and the slicing is closed (profile {})", c.path, prof.name));
                    }
                    self.check_element_value(prof, ci, v, &p, &tc, res, st);
                }
            }
        }
        for (si, &s) in slices.iter().enumerate() {
            let se = &prof.elems[s];
            let name = se.slice_name.clone().unwrap_or_default();
            if counts[si] < se.min {
                if undetermined > 0 {
                    if !st.probe {
                        st.warn(
                            "incomplete",
                            where_,
                            format!("Slice '{name}' of {} needs {} item(s); {} item(s) could not be matched to a slice here", c.path, se.min, undetermined),
                        );
                    }
                } else {
                    st.err(
                        "required",
                        where_,
                        format!("Slice '{name}' of {} requires at least {} item(s), found {} (profile {})", c.path, se.min, counts[si], prof.name),
                    );
                }
            }
            if let Some(max) = se.max
                && counts[si] > max
            {
                st.err(
                    "structure",
                    where_,
                    format!(
                        "Slice '{name}' of {} allows at most {max} item(s), found {} (profile {})",
                        c.path, counts[si], prof.name
                    ),
                );
            }
        }
    }

    fn slice_index(&self, prof: &Arc<Profile>, ci: usize) -> Option<Arc<SliceIndex>> {
        let key = (Arc::as_ptr(prof) as usize, ci);
        if let Some(x) = self
            .slice_index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return x.clone();
        }
        let built = self.build_slice_index(prof, ci).map(Arc::new);
        self.slice_index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, built.clone());
        built
    }

    fn build_slice_index(&self, prof: &Arc<Profile>, ci: usize) -> Option<SliceIndex> {
        let c = &prof.elems[ci];
        let discs = &c.slicing.as_ref()?.discriminators;
        if discs.is_empty()
            || discs
                .iter()
                .any(|d| d.kind != "value" && d.kind != "pattern")
        {
            return None;
        }
        let mut specs = Vec::with_capacity(c.slices.len());
        for &s in &c.slices {
            let se = &prof.elems[s];
            let mut spec = Vec::with_capacity(discs.len());
            let mut usable = true;
            for d in discs {
                if d.path == "url"
                    && let Some(pu) = se
                        .types
                        .iter()
                        .find(|t| t.code == "Extension")
                        .and_then(|t| t.profiles.first())
                {
                    spec.push(Some(strip_version(pu).to_string()));
                    continue;
                }
                let Some((p, i)) = self.elem_at(prof, s, &d.path) else {
                    usable = false;
                    break;
                };
                let el = &p.elems[i];
                match el.fixed.as_ref().or(el.pattern.as_ref()) {
                    Some(Value::String(x)) => spec.push(Some(x.clone())),
                    Some(x @ (Value::Bool(_) | Value::Number(_))) => spec.push(Some(x.to_string())),
                    Some(_) => usable = false,
                    None if el.binding.is_some() || !el.children.is_empty() => usable = false,
                    None => spec.push(None),
                }
                if !usable {
                    break;
                }
            }
            specs.push(usable.then_some(spec));
        }
        Some(SliceIndex {
            paths: discs.iter().map(|d| d.path.clone()).collect(),
            specs,
        })
    }

    /// Does `v` belong to slice `s`? `None` when it cannot be decided.
    fn slice_matches<'a>(
        &self,
        prof: &Arc<Profile>,
        ci: usize,
        s: usize,
        v: &'a Value,
        tc: &str,
        st: &St<'a>,
    ) -> Option<bool> {
        let c = &prof.elems[ci];
        let se = &prof.elems[s];
        let discs: &[crate::structure::Discriminator] = c
            .slicing
            .as_ref()
            .map(|x| x.discriminators.as_slice())
            .unwrap_or(&[]);
        if discs.is_empty() {
            // no discriminator: the item belongs to the slice if it conforms
            return Some(self.conforms_to_elem(prof, s, v, tc));
        }
        for d in discs {
            let ok = match d.kind.as_str() {
                "value" | "pattern" => self.disc_value(prof, s, v, &d.path)?,
                "type" => {
                    if d.path == "$this" {
                        se.types.iter().any(|t| t.code == tc)
                    } else {
                        let targets = json_path(v, &d.path);
                        let types = self
                            .elem_at(prof, s, &d.path)
                            .map(|(p, i)| {
                                p.elems[i]
                                    .types
                                    .iter()
                                    .map(|t| t.code.clone())
                                    .collect::<Vec<_>>()
                            })
                            .unwrap_or_default();
                        targets.iter().any(|t| {
                            t.get("resourceType")
                                .and_then(Value::as_str)
                                .is_some_and(|rt| types.iter().any(|x| x == rt))
                        })
                    }
                }
                "profile" => {
                    let (targets, profiles): (Vec<&'a Value>, Vec<String>) =
                        if d.path == "resolve()" || d.path.ends_with(".resolve()") {
                            let refs = json_path(
                                v,
                                d.path.trim_end_matches("resolve()").trim_end_matches('.'),
                            );
                            let mut t = Vec::new();
                            for r in refs {
                                let Some(s) = r.get("reference").and_then(Value::as_str) else {
                                    continue;
                                };
                                match self.resolve(s, st) {
                                    Some(x) => t.push(x),
                                    None => return None,
                                }
                            }
                            let profs = se
                                .types
                                .iter()
                                .flat_map(|t| t.target_profiles.clone())
                                .collect();
                            (t, profs)
                        } else {
                            let t = json_path(v, &d.path);
                            let profs = if d.path == "$this" {
                                se.types.iter().flat_map(|t| t.profiles.clone()).collect()
                            } else {
                                self.elem_at(prof, s, &d.path)
                                    .map(|(p, i)| {
                                        p.elems[i]
                                            .types
                                            .iter()
                                            .flat_map(|t| t.profiles.clone())
                                            .collect()
                                    })
                                    .unwrap_or_default()
                            };
                            (t, profs)
                        };
                    if profiles.is_empty() {
                        return None;
                    }
                    !targets.is_empty()
                        && targets
                            .iter()
                            .all(|t| profiles.iter().any(|p| self.conforms(t, p)))
                }
                "exists" => {
                    let exists = !json_path(v, &d.path).is_empty();
                    let want = self
                        .elem_at(prof, s, &d.path)
                        .map(|(p, i)| p.elems[i].min > 0)
                        .unwrap_or(true);
                    exists == want
                }
                _ => return None,
            };
            if !ok {
                return Some(false);
            }
        }
        Some(true)
    }

    fn disc_value(&self, prof: &Arc<Profile>, s: usize, v: &Value, path: &str) -> Option<bool> {
        let se = &prof.elems[s];
        // extension slices: `url` comes from the extension's profile
        if path == "url"
            && let Some(t) = se.types.iter().find(|t| t.code == "Extension")
            && let Some(pu) = t.profiles.first()
        {
            let url = v.get("url").and_then(Value::as_str);
            return Some(url.is_some_and(|u| strip_version(u) == strip_version(pu)));
        }
        let (p, i) = self.elem_at(prof, s, path)?;
        let el = &p.elems[i];
        let actual = json_path(v, path);
        if let Some(f) = &el.fixed {
            return Some(actual.contains(&f));
        }
        if let Some(pat) = &el.pattern {
            return Some(actual.iter().any(|a| pattern_matches(pat, a)));
        }
        // complex discriminator value: the fixed/pattern values of the descendants
        if let Some(r) = self.descendant_values_match(&p, i, &actual, 0) {
            return Some(r);
        }
        if let Some(b) = &el.binding {
            let vs = self.value_set(strip_version(&b.value_set));
            if vs.codes.is_empty() {
                return None;
            }
            return Some(actual.iter().any(|a| match a {
                Value::String(c) => vs.has_code(None, c),
                Value::Object(m) => {
                    let sys = m.get("system").and_then(Value::as_str);
                    let codes: Vec<&Value> = match m.get("coding").and_then(Value::as_array) {
                        Some(cs) => cs.iter().collect(),
                        None => vec![a],
                    };
                    codes.iter().any(|c| {
                        c.get("code").and_then(Value::as_str).is_some_and(|k| {
                            vs.has_code(c.get("system").and_then(Value::as_str).or(sys), k)
                        })
                    })
                }
                _ => false,
            }));
        }
        None
    }

    /// For a discriminator on a complex element without its own fixed/pattern:
    /// do the values carry every fixed/pattern value that the element's
    /// descendants define? `None` when no descendant defines one.
    fn descendant_values_match(
        &self,
        prof: &Arc<Profile>,
        ei: usize,
        actual: &[&Value],
        depth: usize,
    ) -> Option<bool> {
        if depth > 8 {
            return None;
        }
        let mut any = false;
        let mut all_ok = true;
        for &c in &prof.elems[ei].children {
            let ce = &prof.elems[c];
            let key = ce.name.trim_end_matches("[x]");
            let vals: Vec<&Value> = actual
                .iter()
                .filter_map(|a| a.get(key))
                .flat_map(|v| match v {
                    Value::Array(a) => a.iter().collect::<Vec<_>>(),
                    x => vec![x],
                })
                .collect();
            if let Some(f) = &ce.fixed {
                any = true;
                all_ok &= vals.contains(&f);
            } else if let Some(pt) = &ce.pattern {
                any = true;
                all_ok &= vals.iter().any(|v| pattern_matches(pt, v));
            } else if let Some(r) = self.descendant_values_match(prof, c, &vals, depth + 1) {
                any = true;
                all_ok &= r;
            }
        }
        any.then_some(all_ok)
    }

    /// The element reached from element `ei` by a dotted discriminator path (cached).
    fn elem_at(&self, prof: &Arc<Profile>, ei: usize, path: &str) -> Option<(Arc<Profile>, usize)> {
        let key = (
            Arc::as_ptr(prof) as usize,
            ei,
            path.as_ptr() as usize,
            path.len(),
        );
        if let Some(r) = self
            .elem_at_cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return r.clone();
        }
        let r = self.elem_at_uncached(prof, ei, path);
        self.elem_at_cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, r.clone());
        r
    }

    fn elem_at_uncached(
        &self,
        prof: &Arc<Profile>,
        ei: usize,
        path: &str,
    ) -> Option<(Arc<Profile>, usize)> {
        let mut cur = (prof.clone(), ei);
        if path == "$this" || path.is_empty() {
            return Some(cur);
        }
        for seg in path.split('.') {
            let seg = seg.trim();
            let seg = seg
                .strip_prefix("extension(")
                .map(|_| "extension")
                .unwrap_or(seg);
            let (p, i) = cur.clone();
            let e = &p.elems[i];
            let find = |p: &Arc<Profile>, i: usize| {
                p.elems[i]
                    .children
                    .iter()
                    .copied()
                    .find(|&c| p.elems[c].name == seg || p.elems[c].name == format!("{seg}[x]"))
            };
            if let Some(c) = find(&p, i) {
                cur = (p.clone(), c);
                continue;
            }
            if !e.children.is_empty() {
                return None;
            }
            // descend into the type (or its profile)
            let t = e.types.first()?;
            let tp = t
                .profiles
                .first()
                .and_then(|u| self.profile(u))
                .or_else(|| self.type_profile(&t.code))?;
            let c = find(&tp, 0)?;
            cur = (tp, c);
        }
        Some(cur)
    }

    fn conforms_to_elem(&self, prof: &Arc<Profile>, s: usize, v: &Value, tc: &str) -> bool {
        let mut sub = St::new();
        sub.probe = true;
        self.check_element_value(prof, s, v, "$this", tc, v, &mut sub);
        !sub.has_error()
    }

    /// Does resource `r` conform to profile `url`? Claimed profiles count.
    fn conforms(&self, r: &Value, url: &str) -> bool {
        let u = strip_version(url);
        if meta_profiles(r).iter().any(|p| strip_version(p) == u) {
            return true;
        }
        let Some(p) = self.profile(url) else {
            return false;
        };
        if r.get("resourceType").and_then(Value::as_str) != Some(p.type_name.as_str()) {
            return false;
        }
        let mut sub = St::new();
        sub.probe = true;
        self.check_element_value(&p, 0, r, "$this", &p.type_name, r, &mut sub);
        !sub.has_error()
    }

    // ------------------------------------------------------------ references

    fn check_bundle_references(&self, b: &Value, st: &mut St<'_>) {
        let btype = b.get("type").and_then(Value::as_str).unwrap_or("");
        let strict = !matches!(
            btype,
            "transaction"
                | "batch"
                | "searchset"
                | "history"
                | "transaction-response"
                | "batch-response"
        );
        let Some(entries) = b.get("entry").and_then(Value::as_array) else {
            return;
        };
        let mut full_urls = HashSet::new();
        for (i, e) in entries.iter().enumerate() {
            if let Some(fu) = e.get("fullUrl").and_then(Value::as_str)
                && !full_urls.insert(fu)
                && e.get("resource").is_some()
            {
                st.err(
                    "duplicate",
                    &format!("Bundle.entry[{i}].fullUrl"),
                    format!("fullUrl {fu} is used by more than one entry"),
                );
            }
        }
        for (i, e) in entries.iter().enumerate() {
            let Some(r) = e.get("resource") else { continue };
            let base = format!("Bundle.entry[{i}].resource");
            let full_url = e.get("fullUrl").and_then(Value::as_str).unwrap_or("");
            let mut refs = Vec::new();
            collect_refs(r, &base, &mut refs, 0);
            let contained: HashSet<&str> = r
                .get("contained")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.get("id").and_then(Value::as_str))
                        .collect()
                })
                .unwrap_or_default();
            for (p, reference) in refs {
                if let Some(id) = reference.strip_prefix('#') {
                    if !id.is_empty() && !contained.contains(id) {
                        st.err("not-found", &p, format!("Reference '{reference}' points to a contained resource that does not exist"));
                    }
                    continue;
                }
                if self.resolve(reference, st).is_some() {
                    continue;
                }
                // relative to the entry's fullUrl base
                if let Some(pos) = full_url.rfind('/').and_then(|p1| full_url[..p1].rfind('/'))
                    && !reference.contains(':')
                    && self
                        .resolve(&format!("{}/{reference}", &full_url[..pos]), st)
                        .is_some()
                {
                    continue;
                }
                let urn = reference.starts_with("urn:");
                if urn || strict {
                    st.err("not-found", &p, format!("Reference '{reference}' does not resolve to any entry of this Bundle (no entry has that fullUrl)"));
                }
            }
        }
    }

    fn check_contained_references(&self, r: &Value, root: &str, st: &mut St<'_>) {
        let contained: HashSet<&str> = r
            .get("contained")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.get("id").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default();
        let mut refs = Vec::new();
        collect_refs(r, root, &mut refs, 0);
        for (p, reference) in refs {
            if let Some(id) = reference.strip_prefix('#')
                && !id.is_empty()
                && !contained.contains(id)
            {
                st.err(
                    "not-found",
                    &p,
                    format!(
                        "Reference '{reference}' points to a contained resource that does not exist"
                    ),
                );
            }
        }
    }
}

/// dom-3 (native): every contained resource is referenced from elsewhere in the
/// resource (`#id`), or the resource refers to itself with `#`.
fn check_dom3(res: &Value, path: &str, st: &mut St<'_>) {
    let Some(contained) = res.get("contained").and_then(Value::as_array) else {
        return;
    };
    if contained.is_empty() {
        return;
    }
    let mut refs: HashSet<&str> = HashSet::new();
    fn walk<'v>(v: &'v Value, out: &mut HashSet<&'v str>, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        match v {
            Value::String(s) if s.starts_with('#') => {
                out.insert(s.as_str());
            }
            Value::Object(m) => m.values().for_each(|x| walk(x, out, depth + 1)),
            Value::Array(a) => a.iter().for_each(|x| walk(x, out, depth + 1)),
            _ => {}
        }
    }
    walk(res, &mut refs, 0);
    if refs.contains("#") {
        return;
    }
    for (i, c) in contained.iter().enumerate() {
        let Some(id) = c.get("id").and_then(Value::as_str) else {
            continue;
        };
        if !refs.contains(format!("#{id}").as_str()) {
            st.err(
                "invariant",
                &format!("{path}.contained[{i}]"),
                format!("dom-3: contained resource '{id}' is not referenced from the rest of the resource (contained resources must be referenced, e.g. '#{id}')"),
            );
        }
    }
}

/// `path.k` or `path.k[i]` without the formatting machinery (hot path).
fn child_path(path: &str, k: &str, i: Option<usize>) -> String {
    let mut s = String::with_capacity(path.len() + k.len() + 8);
    s.push_str(path);
    s.push('.');
    s.push_str(k);
    if let Some(mut i) = i {
        s.push('[');
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (i % 10) as u8;
            n += 1;
            i /= 10;
            if i == 0 {
                break;
            }
        }
        for d in digits[..n].iter().rev() {
            s.push(*d as char);
        }
        s.push(']');
    }
    s
}

fn t_profiles_empty(e: &Elem, tc: &str) -> bool {
    e.types
        .iter()
        .find(|t| t.code == tc)
        .is_none_or(|t| t.profiles.is_empty())
}

fn lower_if_primitive(s: &str) -> String {
    let l = {
        let mut c = s.chars();
        match c.next() {
            Some(f) => f.to_lowercase().collect::<String>() + c.as_str(),
            None => String::new(),
        }
    };
    if primitive::is_primitive(&l) {
        l
    } else {
        s.to_string()
    }
}

fn collect_refs<'v>(v: &'v Value, path: &str, out: &mut Vec<(String, &'v str)>, depth: usize) {
    let mut buf = path.to_string();
    collect_refs_buf(v, &mut buf, out, depth);
}

fn collect_refs_buf<'v>(
    v: &'v Value,
    path: &mut String,
    out: &mut Vec<(String, &'v str)>,
    depth: usize,
) {
    if depth > MAX_DEPTH {
        return;
    }
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("reference") {
                out.push((format!("{path}.reference"), r.as_str()));
            }
            for (k, x) in m {
                if (k == "contained" && depth > 0)
                    || k == "reference"
                    || !(x.is_object() || x.is_array())
                {
                    continue;
                }
                let len = path.len();
                path.push('.');
                path.push_str(k);
                collect_refs_buf(x, path, out, depth + 1);
                path.truncate(len);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                if !(x.is_object() || x.is_array()) {
                    continue;
                }
                let len = path.len();
                path.push('[');
                path.push_str(&i.to_string());
                path.push(']');
                collect_refs_buf(x, path, out, depth + 1);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}...", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

fn dedup(issues: Vec<Issue>) -> Vec<Issue> {
    let mut seen = HashSet::new();
    issues
        .into_iter()
        .filter(|i| {
            seen.insert((
                i.severity.as_str(),
                i.code,
                i.expression.clone(),
                i.message.clone(),
            ))
        })
        .collect()
}
