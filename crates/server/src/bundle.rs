//! `POST /fhir` with a `transaction` (all-or-nothing) or `batch` Bundle.
//!
//! A transaction runs in one store transaction: entries are processed in the FHIR
//! order (DELETE, POST, PUT, GET), `urn:uuid:` and other fullUrls of created
//! resources are rewritten to their new `Type/id` everywhere in the Bundle, and
//! any failure (invalid resource, denial, conflict) rolls everything back and
//! names the entry. A batch runs each entry on its own.

use serde_json::{Value, json};
use tsunagi_fhir::bundle::etag;
use tsunagi_fhir::datetime::format_instant;
use tsunagi_fhir::{FhirError, FhirResult, operation_outcome};

use crate::engine::{
    Ctx, Denied, Engine, MAX_BUNDLE_ENTRIES, ReferenceMap, WriteWork, blocking, check_type,
};
use crate::validate::{check_shape, is_valid_id};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    Delete,
    Post,
    Put,
    Get,
}

/// One entry, parsed.
struct Planned {
    index: usize,
    method: Method,
    resource_type: String,
    id: Option<String>,
    full_url: Option<String>,
    resource: Option<Value>,
    if_match: Option<i64>,
    if_none_exist: Option<String>,
}

fn entry_path(i: usize) -> String {
    format!("Bundle.entry[{i}]")
}

fn plan(bundle: &Value) -> FhirResult<(bool, Vec<Planned>)> {
    let (is_transaction, entries) = envelope(bundle)?;
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        out.push(plan_entry(i, e)?);
    }
    Ok((is_transaction, out))
}

/// Checks the Bundle itself (type, entry array, size): whether it is a transaction,
/// and its entries, not yet planned.
fn envelope(bundle: &Value) -> FhirResult<(bool, &[Value])> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(FhirError::bad_request(
            Some("resourceType"),
            "POST to the base URL takes a Bundle of type transaction or batch",
        ));
    }
    let is_transaction = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => true,
        Some("batch") => false,
        other => {
            return Err(FhirError::bad_request(
                Some("Bundle.type"),
                format!(
                    "Bundle.type must be 'transaction' or 'batch', not {}",
                    other.map(|s| format!("'{s}'")).unwrap_or("missing".into())
                ),
            ));
        }
    };
    let entries = match bundle.get("entry") {
        None => return Ok((is_transaction, &[])),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(FhirError::bad_request(
                Some("Bundle.entry"),
                "Bundle.entry must be an array",
            ));
        }
    };
    if entries.len() > MAX_BUNDLE_ENTRIES {
        return Err(FhirError::new(
            413,
            "too-costly",
            Some("Bundle.entry".into()),
            format!(
                "A Bundle may carry at most {MAX_BUNDLE_ENTRIES} entries; this one has {}",
                entries.len()
            ),
        ));
    }
    Ok((is_transaction, entries))
}

fn plan_entry(i: usize, e: &Value) -> FhirResult<Planned> {
    let at = entry_path(i);
    let req = e.get("request").ok_or_else(|| {
        FhirError::bad_request(
            Some(&format!("{at}.request")),
            "Every entry needs a request",
        )
    })?;
    let method = match req.get("method").and_then(Value::as_str) {
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("DELETE") => Method::Delete,
        Some("GET") => Method::Get,
        Some(m) => {
            return Err(FhirError::new(
                400,
                "not-supported",
                Some(format!("{at}.request.method")),
                format!("Method '{m}' is not supported in a Bundle"),
            ));
        }
        None => {
            return Err(FhirError::bad_request(
                Some(&format!("{at}.request.method")),
                "request.method is missing",
            ));
        }
    };
    let url = req.get("url").and_then(Value::as_str).ok_or_else(|| {
        FhirError::bad_request(Some(&format!("{at}.request.url")), "request.url is missing")
    })?;
    if url.contains('?') {
        return Err(FhirError::new(
            400,
            "not-supported",
            Some(format!("{at}.request.url")),
            "Conditional update, delete and search URLs are not supported inside Bundles; use ifNoneExist for conditional create",
        ));
    }
    let mut parts = url.trim_start_matches('/').split('/');
    let resource_type = parts.next().unwrap_or_default().to_string();
    let id = parts.next().map(str::to_string);
    if parts.next().is_some() {
        return Err(FhirError::new(
            400,
            "not-supported",
            Some(format!("{at}.request.url")),
            format!("Unsupported request URL '{url}'"),
        ));
    }
    check_type(&resource_type).map_err(|e| {
        FhirError::bad_request(
            Some(&format!("{at}.request.url")),
            e.issues[0].message.clone(),
        )
    })?;
    if let Some(id) = &id
        && !is_valid_id(id)
    {
        return Err(FhirError::bad_request(
            Some(&format!("{at}.request.url")),
            format!("'{id}' is not a valid id"),
        ));
    }
    match (method, &id) {
        (Method::Post, Some(_)) => {
            return Err(FhirError::bad_request(
                Some(&format!("{at}.request.url")),
                "POST takes a type URL, not an instance",
            ));
        }
        (Method::Put | Method::Delete | Method::Get, None) => {
            return Err(FhirError::bad_request(
                Some(&format!("{at}.request.url")),
                "This method needs an instance URL (Type/id)",
            ));
        }
        _ => {}
    }
    let resource = e.get("resource").cloned();
    if matches!(method, Method::Post | Method::Put) {
        let r = resource.as_ref().ok_or_else(|| {
            FhirError::bad_request(
                Some(&format!("{at}.resource")),
                "POST and PUT entries need a resource",
            )
        })?;
        check_shape(r, Some(&resource_type)).map_err(|e| e.within(&format!("{at}.resource")))?;
        if method == Method::Put {
            match r.get("id").and_then(Value::as_str) {
                Some(rid) if Some(rid) == id.as_deref() => {}
                _ => {
                    return Err(FhirError::bad_request(
                        Some(&format!("{at}.resource.id")),
                        "The resource id must equal the id in request.url",
                    ));
                }
            }
        }
    }
    let if_match = match req.get("ifMatch").and_then(Value::as_str) {
        Some(s) => Some(tsunagi_fhir::bundle::parse_etag(s).ok_or_else(|| {
            FhirError::bad_request(
                Some(&format!("{at}.request.ifMatch")),
                format!("'{s}' is not an ETag"),
            )
        })?),
        None => None,
    };
    Ok(Planned {
        index: i,
        method,
        resource_type,
        id,
        full_url: e.get("fullUrl").and_then(Value::as_str).map(str::to_string),
        resource,
        if_match,
        if_none_exist: req
            .get("ifNoneExist")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Rewrites every `reference` whose value is a key of `map`.
fn rewrite_references(v: &mut Value, map: &ReferenceMap) {
    match v {
        Value::Object(o) => {
            for (k, child) in o.iter_mut() {
                if k == "reference"
                    && let Value::String(s) = child
                {
                    if let Some(new) = map.get(s.as_str()) {
                        *s = new.clone();
                    }
                    continue;
                }
                rewrite_references(child, map);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| rewrite_references(c, map)),
        _ => {}
    }
}

fn response_entry(
    status: &str,
    stored: Option<&tsunagi_store::StoredResource>,
    include_resource: bool,
    base: &str,
) -> Value {
    let mut resp = json!({ "status": status });
    let mut entry = json!({});
    if let Some(s) = stored {
        resp["location"] = json!(format!(
            "{}/{}/_history/{}",
            s.resource_type, s.id, s.version
        ));
        resp["etag"] = json!(etag(s.version));
        resp["lastModified"] = json!(format_instant(&s.last_updated));
        entry["fullUrl"] = json!(format!("{base}/{}/{}", s.resource_type, s.id));
        if include_resource && let Some(r) = &s.resource {
            entry["resource"] = r.clone();
        }
    }
    entry["response"] = resp;
    entry
}

/// Checks a transaction or batch Bundle's shape without touching any data; returns
/// the number of entries. Used by the fuzz targets and for pre-flight checks.
pub fn check(bundle: &Value) -> FhirResult<usize> {
    plan(bundle).map(|(_, p)| p.len())
}

pub async fn process(engine: &Engine, ctx: &Ctx, bundle: Value) -> FhirResult<Value> {
    let base = engine.base_url.clone();
    let (is_transaction, entries) = envelope(&bundle)?;
    if is_transaction {
        let (_, planned) = plan(&bundle)?;
        transaction(engine, ctx, planned, &base).await
    } else {
        // each batch entry stands alone: a malformed one gets its own error response
        let planned = entries
            .iter()
            .enumerate()
            .map(|(i, e)| plan_entry(i, e))
            .collect();
        batch(engine, ctx, planned, &base).await
    }
}

async fn transaction(
    engine: &Engine,
    ctx: &Ctx,
    mut planned: Vec<Planned>,
    base: &str,
) -> FhirResult<Value> {
    let work = WriteWork::new(engine, ctx);
    let base_owned = base.to_string();
    let n = planned.len();
    let out = blocking(move || {
        let mut tx = work.store.begin()?;
        let mut responses: Vec<Option<Value>> = vec![None; n];
        // 1. conditional creates that match: the entry resolves to the existing resource
        let mut map = ReferenceMap::new();
        let mut existing = vec![None; n];
        for p in planned.iter().filter(|p| p.method == Method::Post) {
            if let Some(cond) = &p.if_none_exist {
                let at = entry_path(p.index);
                match work
                    .find_in(&mut *tx, &p.resource_type, cond)
                    .map_err(|e| e.within(&format!("{at}.request.ifNoneExist")))?
                {
                    Err(d) => return Ok(Err(d)),
                    Ok(Some(found)) => existing[p.index] = Some(found),
                    Ok(None) => {}
                }
            }
        }
        // 2. ids for the creates, and the fullUrl map
        let mut new_ids = vec![None; n];
        for p in &planned {
            let target = match (p.method, &existing[p.index]) {
                (Method::Post, Some(found)) => {
                    Some(format!("{}/{}", found.resource_type, found.id))
                }
                (Method::Post, None) => {
                    let id = uuid::Uuid::new_v4().to_string();
                    let t = format!("{}/{id}", p.resource_type);
                    new_ids[p.index] = Some(id);
                    Some(t)
                }
                (Method::Put, _) => Some(format!(
                    "{}/{}",
                    p.resource_type,
                    p.id.as_deref().unwrap_or_default()
                )),
                _ => None,
            };
            if let (Some(full), Some(t)) = (&p.full_url, target)
                && map.insert(full.clone(), t).is_some()
            {
                {
                    return Err(FhirError::bad_request(
                        Some(&format!("{}.fullUrl", entry_path(p.index))),
                        format!("fullUrl '{full}' appears twice"),
                    ));
                }
            }
        }
        for p in &mut planned {
            if let Some(r) = &mut p.resource {
                rewrite_references(r, &map);
            }
        }
        // 3. execute in FHIR order, keeping the original index for the response
        planned.sort_by_key(|p| (p.method, p.index));
        for p in planned {
            let at = entry_path(p.index);
            let rt = p.resource_type.as_str();
            let result = match p.method {
                Method::Delete => work
                    .delete_in(
                        &mut *tx,
                        rt,
                        p.id.as_deref().unwrap_or_default(),
                        p.if_match,
                    )
                    .map(|r| {
                        r.map(|d| {
                            response_entry(
                                "204 No Content",
                                d.as_ref().filter(|_| false),
                                false,
                                &base_owned,
                            )
                        })
                    }),
                Method::Post => match &existing[p.index] {
                    Some(found) => Ok(Ok(response_entry("200 OK", Some(found), true, &base_owned))),
                    None => {
                        let id = new_ids[p.index].clone().unwrap_or_default();
                        work.create_in(&mut *tx, rt, &id, p.resource.unwrap_or_default())
                            .map(|r| {
                                r.map(|w| {
                                    response_entry(
                                        "201 Created",
                                        Some(&w.stored),
                                        true,
                                        &base_owned,
                                    )
                                })
                            })
                    }
                },
                Method::Put => work
                    .update_in(
                        &mut *tx,
                        rt,
                        p.id.as_deref().unwrap_or_default(),
                        p.resource.unwrap_or_default(),
                        p.if_match,
                    )
                    .map(|r| {
                        r.map(|w| {
                            response_entry(
                                if w.created { "201 Created" } else { "200 OK" },
                                Some(&w.stored),
                                true,
                                &base_owned,
                            )
                        })
                    }),
                Method::Get => work
                    .read_in(&mut *tx, rt, p.id.as_deref().unwrap_or_default())
                    .map(|r| r.map(|s| response_entry("200 OK", Some(&s), true, &base_owned))),
            };
            match result.map_err(|e| e.within(&format!("{at}.resource")))? {
                Ok(entry) => responses[p.index] = Some(entry),
                Err(d) => return Ok(Err(d)),
            }
        }
        tx.commit()?;
        Ok(Ok(responses
            .into_iter()
            .map(|r| r.unwrap_or_default())
            .collect::<Vec<Value>>()))
    })
    .await?;
    let entries = match out {
        Ok(e) => e,
        Err(Denied {
            op,
            patient,
            resources,
            reason,
        }) => return Err(engine.deny(ctx, op, patient, resources, reason).await),
    };
    Ok(json!({ "resourceType": "Bundle", "type": "transaction-response", "entry": entries }))
}

async fn batch(
    engine: &Engine,
    ctx: &Ctx,
    planned: Vec<FhirResult<Planned>>,
    base: &str,
) -> FhirResult<Value> {
    let mut entries = Vec::with_capacity(planned.len());
    for p in planned {
        let p = match p {
            Ok(p) => p,
            Err(e) => {
                entries.push(error_entry(&e));
                continue;
            }
        };
        let id = p.id.clone().unwrap_or_default();
        let result = match p.method {
            Method::Post => engine
                .create(
                    ctx,
                    &p.resource_type,
                    p.resource.unwrap_or_default(),
                    p.if_none_exist.as_deref(),
                )
                .await
                .map(|w| {
                    response_entry(
                        if w.created { "201 Created" } else { "200 OK" },
                        Some(&w.stored),
                        true,
                        base,
                    )
                }),
            Method::Put => engine
                .update(
                    ctx,
                    &p.resource_type,
                    &id,
                    p.resource.unwrap_or_default(),
                    p.if_match,
                )
                .await
                .map(|w| {
                    response_entry(
                        if w.created { "201 Created" } else { "200 OK" },
                        Some(&w.stored),
                        true,
                        base,
                    )
                }),
            Method::Delete => engine
                .delete(ctx, &p.resource_type, &id, p.if_match)
                .await
                .map(|_| response_entry("204 No Content", None, false, base)),
            Method::Get => engine
                .read(ctx, &p.resource_type, &id)
                .await
                .map(|s| response_entry("200 OK", Some(&s), true, base)),
        };
        entries.push(match result {
            Ok(e) => e,
            Err(e) => error_entry(&e),
        });
    }
    Ok(json!({ "resourceType": "Bundle", "type": "batch-response", "entry": entries }))
}

/// A batch response entry for a failed entry.
fn error_entry(e: &FhirError) -> Value {
    json!({
        "response": {
            "status": format!("{} {}", e.status, status_text(e.status)),
            "outcome": operation_outcome(&e.issues),
        }
    })
}

pub fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        410 => "Gone",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_nested_references_only() {
        let mut v = json!({"subject": {"reference": "urn:uuid:1"}, "note": [{"text": "urn:uuid:1"}], "x": [{"reference": "urn:uuid:2"}]});
        let map: ReferenceMap = [("urn:uuid:1".to_string(), "Patient/a".to_string())]
            .into_iter()
            .collect();
        rewrite_references(&mut v, &map);
        assert_eq!(v["subject"]["reference"], "Patient/a");
        assert_eq!(v["note"][0]["text"], "urn:uuid:1");
        assert_eq!(v["x"][0]["reference"], "urn:uuid:2");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Planning never panics, and a refusal always names where in the Bundle.
        #[test]
        fn plan_never_panics(
            methods in proptest::collection::vec("(POST|PUT|GET|DELETE|PATCH|x)", 0..5),
            urls in proptest::collection::vec("[A-Za-z/$?=_.-]{0,20}", 0..5),
            kind in "(transaction|batch|collection)",
        ) {
            let entries: Vec<Value> = methods.iter().zip(urls.iter()).map(|(m, u)| json!({
                "fullUrl": format!("urn:uuid:{u}"),
                "request": {"method": m, "url": u},
                "resource": {"resourceType": u.split('/').next().unwrap_or(""), "id": u.split('/').nth(1).unwrap_or("x")}
            })).collect();
            let b = json!({"resourceType": "Bundle", "type": kind, "entry": entries});
            if let Err(e) = plan(&b) {
                proptest::prop_assert!(e.issues.iter().all(|i| i.expression.as_deref().is_some_and(|x| x.starts_with("Bundle"))));
            }
        }
    }

    #[test]
    fn plan_rejects_bad_entries_naming_them() {
        let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}},
            {"request": {"method": "PUT", "url": "Patient/x"}, "resource": {"resourceType": "Patient", "id": "y"}}
        ]});
        let e = plan(&b).err().unwrap();
        assert_eq!(
            e.issues[0].expression.as_deref(),
            Some("Bundle.entry[1].resource.id")
        );
        let b = json!({"resourceType": "Bundle", "type": "collection"});
        assert_eq!(
            plan(&b).err().unwrap().issues[0].expression.as_deref(),
            Some("Bundle.type")
        );
    }
}
