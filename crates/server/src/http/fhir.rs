//! FHIR REST handlers at `/fhir`.

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tsunagi_fhir::bundle::{self, Entry, HistoryEntry, Link, etag, parse_etag};
use tsunagi_fhir::datetime::{format_http_date, format_instant, parse_instant};
use tsunagi_fhir::search::Summary;
use tsunagi_fhir::{FhirError, Issue, operation_outcome, query};
use tsunagi_store::{HistoryQuery, StoredResource};

use super::extract::{Caller, FhirJson};
use super::{ApiResult, accepts_json, fhir_json, fhir_text};
use crate::capability::capability_statement;
use crate::engine::Written;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/fhir", axum::routing::post(transaction))
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/_history", get(system_history))
        .route("/fhir/{rtype}", get(search).post(create_or_type_op))
        .route("/fhir/{rtype}/_search", axum::routing::post(search_post))
        .route("/fhir/{rtype}/_history", get(type_history))
        .route(
            "/fhir/{rtype}/{id}",
            get(read).put(update).delete(delete).post(type_op),
        )
        .route("/fhir/{rtype}/{id}/_history", get(instance_history))
        .route("/fhir/{rtype}/{id}/_history/{vid}", get(vread))
        .route("/fhir/{rtype}/{id}/{op}", get(instance_op))
}

/// `Prefer: return=...`
#[derive(Clone, Copy, PartialEq)]
enum Return {
    Minimal,
    Representation,
    Outcome,
}

fn prefer_return(h: &HeaderMap) -> Return {
    let prefer = h.get("prefer").and_then(|v| v.to_str().ok()).unwrap_or("");
    for part in prefer.split([',', ';']) {
        match part.trim() {
            "return=minimal" => return Return::Minimal,
            "return=OperationOutcome" => return Return::Outcome,
            "return=representation" => return Return::Representation,
            _ => {}
        }
    }
    Return::Representation
}

fn prefer_lenient(h: &HeaderMap) -> bool {
    h.get("prefer")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.contains("handling=lenient"))
}

fn check_accept(h: &HeaderMap) -> ApiResult<()> {
    if accepts_json(h) {
        Ok(())
    } else {
        Err(FhirError::new(
            406,
            "not-supported",
            None,
            "Only application/fhir+json is produced",
        )
        .into())
    }
}

/// Response for one stored version: body, ETag, Last-Modified (and Location when created).
fn resource_response(
    state: &AppState,
    status: StatusCode,
    s: &StoredResource,
    ret: Return,
    location: bool,
) -> Response {
    // the stored resource is serialised in place: a read does not copy its tree
    let mut resp = match (ret, &s.resource) {
        (Return::Representation, Some(body)) => fhir_json(status, body),
        (Return::Outcome, _) => fhir_json(
            status,
            &operation_outcome(&[Issue::information(format!(
                "{}/{} version {} stored",
                s.resource_type, s.id, s.version
            ))]),
        ),
        (Return::Representation, None) | (Return::Minimal, _) => status.into_response(),
    };
    let h = resp.headers_mut();
    version_headers(h, s.version, &s.last_updated);
    if location
        && let Ok(v) = HeaderValue::from_str(&format!(
            "{}/{}/{}/_history/{}",
            state.engine.base_url, s.resource_type, s.id, s.version
        ))
    {
        h.insert(header::LOCATION, v);
    }
    resp
}

fn version_headers(h: &mut HeaderMap, version: i64, last_updated: &DateTime<Utc>) {
    if let Ok(v) = HeaderValue::from_str(&etag(version)) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format_http_date(last_updated)) {
        h.insert(header::LAST_MODIFIED, v);
    }
}

fn written(state: &AppState, w: Written, ret: Return) -> Response {
    let status = if w.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    resource_response(state, status, &w.stored, ret, w.created)
}

fn if_match(h: &HeaderMap) -> ApiResult<Option<i64>> {
    match h.get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().unwrap_or("");
            parse_etag(s).map(Some).ok_or_else(|| {
                FhirError::bad_request(
                    None,
                    format!("If-Match '{s}' is not a version ETag like W/\"3\""),
                )
                .into()
            })
        }
    }
}

async fn metadata(State(state): State<AppState>) -> Response {
    fhir_json(StatusCode::OK, &capability_statement(&state))
}

async fn read(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    Path((rtype, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_accept(&headers)?;
    if rtype == "CodeSystem" && (id == "$lookup" || id == "$validate-code") {
        return terminology_op(&state, &id, raw.as_deref());
    }
    if let Some(op) = id.strip_prefix('$') {
        return Err(FhirError::not_found(format!(
            "Operation ${op} is not supported on {rtype} with GET"
        ))
        .into());
    }
    // the stored text is the answer's body as it is: no parse, no re-serialisation
    let s = state.engine.read_text(&ctx, &rtype, &id).await?;
    let mut resp = fhir_text(StatusCode::OK, s.text.unwrap_or_default());
    version_headers(resp.headers_mut(), s.version, &s.last_updated);
    Ok(resp)
}

async fn vread(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    Path((rtype, id, vid)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let v: i64 = vid
        .parse()
        .map_err(|_| FhirError::not_found(format!("'{vid}' is not a version id")))?;
    let s = state.engine.vread(&ctx, &rtype, &id, v).await?;
    Ok(resource_response(
        &state,
        StatusCode::OK,
        &s,
        Return::Representation,
        false,
    ))
}

async fn create_or_type_op(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    Path(rtype): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if let Some(op) = rtype.strip_prefix('$') {
        return match op {
            "validate" => validate_op(&state, None, raw.as_deref(), body),
            _ => Err(FhirError::not_found(format!("Operation ${op} is not supported")).into()),
        };
    }
    let cond = headers
        .get("if-none-exist")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let w = state
        .engine
        .create(&ctx, &rtype, body, cond.as_deref())
        .await?;
    Ok(written(&state, w, prefer_return(&headers)))
}

/// `GET /fhir/CodeSystem/$lookup?system=&code=` and
/// `GET /fhir/CodeSystem/$validate-code?system=&code=[&display=]` against the imported
/// masters (drug, disease, modifier, JLAC10, J-FAGY). Code tables hold no personal
/// data, so any authenticated caller may ask and nothing is audited.
fn terminology_op(state: &AppState, op: &str, query: Option<&str>) -> ApiResult<Response> {
    let pairs = parse_pairs(query);
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let system = get("system")
        .ok_or_else(|| FhirError::bad_request(Some("system"), format!("{op} needs system")))?;
    let code = get("code")
        .ok_or_else(|| FhirError::bad_request(Some("code"), format!("{op} needs code")))?;
    let v = state.engine.validator.as_ref();
    let answer = if op == "$lookup" {
        v.lookup(system, code)
    } else {
        v.validate_code(system, code, get("display"))
    };
    match answer {
        None => Err(FhirError::new(
            404,
            "not-found",
            Some("system".into()),
            format!("No code master for '{system}' is imported (tsunagi masters import)"),
        )
        .into()),
        Some(Value::Null) => Err(FhirError::new(
            404,
            "code-invalid",
            Some("code".into()),
            format!("Code '{code}' is not in {system}"),
        )
        .into()),
        Some(p) => Ok(fhir_json(StatusCode::OK, &p)),
    }
}

/// `POST /fhir/{type}/$op`.
async fn type_op(
    State(state): State<AppState>,
    Caller(_ctx): Caller,
    Path((rtype, op)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    crate::engine::check_type(&rtype)?;
    match op.as_str() {
        "$validate" => validate_op(&state, Some(&rtype), raw.as_deref(), body),
        _ => Err(FhirError::not_found(format!(
            "Operation {op} is not supported on {rtype} with POST"
        ))
        .into()),
    }
}

/// `$validate`: the body is the resource, or a Parameters with `resource` (and
/// optionally `profile`); `?profile=` also names the profile. Always 200 with the
/// OperationOutcome when validation ran: the outcome, not the status, carries the verdict.
/// Nothing is read or stored, so nothing is audited.
fn validate_op(
    state: &AppState,
    rtype: Option<&str>,
    query: Option<&str>,
    body: Value,
) -> ApiResult<Response> {
    let (resource, mut profile) =
        if body.get("resourceType").and_then(Value::as_str) == Some("Parameters") {
            let params = body
                .get("parameter")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let resource = params
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some("resource"))
                .and_then(|p| p.get("resource").cloned())
                .ok_or_else(|| {
                    FhirError::bad_request(
                        Some("Parameters.parameter"),
                        "$validate with Parameters needs a 'resource' parameter",
                    )
                })?;
            let profile = params
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some("profile"))
                .and_then(|p| {
                    p.get("valueUri")
                        .or_else(|| p.get("valueCanonical"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                });
            (resource, profile)
        } else {
            (body, None)
        };
    if profile.is_none() {
        profile = parse_pairs(query)
            .into_iter()
            .find(|(k, _)| k == "profile")
            .map(|(_, v)| v);
    }
    crate::validate::check_shape(&resource, rtype)?;
    let issues = state
        .engine
        .validator
        .validate(&resource, profile.as_deref());
    Ok(fhir_json(StatusCode::OK, &operation_outcome(&issues)))
}

async fn update(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    let w = state
        .engine
        .update(&ctx, &rtype, &id, body, if_match(&headers)?)
        .await?;
    Ok(written(&state, w, prefer_return(&headers)))
}

async fn delete(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let deleted = state
        .engine
        .delete(&ctx, &rtype, &id, if_match(&headers)?)
        .await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Some(d) = deleted
        && let Ok(v) = HeaderValue::from_str(&etag(d.version))
    {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

async fn transaction(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    let out = state.engine.bundle(&ctx, body).await?;
    Ok(fhir_json(StatusCode::OK, &out))
}

fn parse_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

async fn search(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    Path(rtype): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_accept(&headers)?;
    run_search(&state, ctx, rtype, parse_pairs(raw.as_deref()), &headers).await
}

async fn search_post(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    Path(rtype): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !body.is_empty() && !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(FhirError::new(
            415,
            "not-supported",
            None,
            "POST _search takes application/x-www-form-urlencoded",
        )
        .into());
    }
    let mut pairs = parse_pairs(raw.as_deref());
    pairs.extend(form_urlencoded::parse(&body).into_owned());
    run_search(&state, ctx, rtype, pairs, &headers).await
}

async fn run_search(
    state: &AppState,
    ctx: crate::engine::Ctx,
    rtype: String,
    pairs: Vec<(String, String)>,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    crate::engine::check_type(&rtype)?;
    let parsed = query::parse_with(&rtype, &pairs, prefer_lenient(headers))?;
    let q = parsed.query;
    let (count, offset, summary) = (q.count, q.offset, q.summary);
    // A page of matches alone is sent as the stored texts, unparsed; includes
    // and counts go the parsed way.
    let found = if q.include.is_empty() && q.revinclude.is_empty() && summary != Summary::Count {
        Found::Texts(state.engine.search_text(&ctx, q).await?)
    } else {
        Found::Parsed(state.engine.search(&ctx, q).await?)
    };
    let total = match &found {
        Found::Texts(p) => p.total,
        Found::Parsed(r) => r.total,
    };
    let base = &state.engine.base_url;
    let link = |off: usize| {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs
            .iter()
            .filter(|(k, _)| k != "_offset" && k != "_count")
        {
            ser.append_pair(k, v);
        }
        ser.append_pair("_count", &count.to_string());
        ser.append_pair("_offset", &off.to_string());
        format!("{base}/{rtype}?{}", ser.finish())
    };
    let mut links = vec![Link {
        relation: "self",
        url: link(offset),
    }];
    if summary != Summary::Count && count > 0 {
        links.push(Link {
            relation: "first",
            url: link(0),
        });
        if (offset + count) < total as usize {
            links.push(Link {
                relation: "next",
                url: link(offset + count),
            });
        }
        if offset > 0 {
            links.push(Link {
                relation: "previous",
                url: link(offset.saturating_sub(count)),
            });
        }
    }
    let mut out = bundle::SearchsetText::new(Some(total), links);
    match found {
        Found::Texts(page) => {
            for t in &page.matches {
                let url = format!("{base}/{}/{}", t.resource_type, t.id);
                out.entry_text(&url, t.text.as_deref().unwrap_or("null"), Some("match"));
            }
        }
        Found::Parsed(result) => {
            for s in result.matches {
                out.entry(entry(base, s, "match"));
            }
            for s in result.included {
                out.entry(entry(base, s, "include"));
            }
        }
    }
    if !parsed.ignored.is_empty() {
        out.entry(Entry {
            full_url: format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            resource: operation_outcome(&[Issue::warning(
                "not-supported",
                None,
                format!(
                    "Ignored unsupported parameters: {}",
                    parsed.ignored.join(", ")
                ),
            )]),
            search_mode: Some("outcome"),
        });
    }
    Ok(fhir_text(StatusCode::OK, out.finish()))
}

/// What a REST search found: stored texts, or parsed resources (with includes).
enum Found {
    Texts(tsunagi_store::TextPage),
    Parsed(tsunagi_store::SearchResult),
}

fn entry(base: &str, s: StoredResource, mode: &'static str) -> Entry {
    Entry {
        full_url: format!("{base}/{}/{}", s.resource_type, s.id),
        resource: s.resource.unwrap_or(Value::Null),
        search_mode: Some(mode),
    }
}

#[derive(serde::Deserialize)]
struct HistoryParams {
    #[serde(rename = "_since")]
    since: Option<String>,
    #[serde(rename = "_count")]
    count: Option<usize>,
    #[serde(rename = "_offset")]
    offset: Option<usize>,
}

fn history_query(
    rt: Option<String>,
    id: Option<String>,
    raw: Option<&str>,
) -> ApiResult<HistoryQuery> {
    let mut hp = HistoryParams {
        since: None,
        count: None,
        offset: None,
    };
    for (k, v) in parse_pairs(raw) {
        match k.as_str() {
            "_since" => hp.since = Some(v),
            "_count" => {
                hp.count = Some(v.parse().map_err(|_| {
                    FhirError::bad_request(None, "_count must be a non-negative integer")
                })?)
            }
            "_offset" => {
                hp.offset = Some(v.parse().map_err(|_| {
                    FhirError::bad_request(None, "_offset must be a non-negative integer")
                })?)
            }
            "_format" => {}
            other => {
                return Err(FhirError::new(
                    400,
                    "not-supported",
                    None,
                    format!("History parameter '{other}' is not supported"),
                )
                .into());
            }
        }
    }
    let since = match &hp.since {
        Some(s) => Some(parse_instant(s).ok_or_else(|| {
            FhirError::bad_request(None, format!("_since '{s}' is not an instant"))
        })?),
        None => None,
    };
    Ok(HistoryQuery {
        resource_type: rt,
        id,
        since,
        count: hp
            .count
            .unwrap_or(query::DEFAULT_COUNT)
            .min(query::MAX_COUNT),
        offset: hp.offset.unwrap_or(0).min(query::MAX_OFFSET),
    })
}

async fn history_response(
    state: &AppState,
    ctx: crate::engine::Ctx,
    q: HistoryQuery,
) -> ApiResult<Response> {
    let versions = state.engine.history(&ctx, q).await?;
    let base = &state.engine.base_url;
    let entries = versions
        .into_iter()
        .map(|v| {
            let url = format!("{}/{}", v.resource_type, v.id);
            let (method, status) = if v.deleted {
                ("DELETE", "204 No Content")
            } else if v.version == 1 {
                ("POST", "201 Created")
            } else {
                ("PUT", "200 OK")
            };
            HistoryEntry {
                full_url: format!("{base}/{url}"),
                resource: v.resource,
                method,
                url: if method == "POST" {
                    v.resource_type.clone()
                } else {
                    url
                },
                status,
                last_modified: format_instant(&v.last_updated),
                etag: etag(v.version),
            }
        })
        .collect();
    Ok(fhir_json(StatusCode::OK, &bundle::history(vec![], entries)))
}

async fn instance_history(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    Path((rtype, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    let q = history_query(Some(rtype), Some(id), raw.as_deref())?;
    history_response(&state, ctx, q).await
}

async fn type_history(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    Path(rtype): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    let q = history_query(Some(rtype), None, raw.as_deref())?;
    history_response(&state, ctx, q).await
}

async fn system_history(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    let q = history_query(None, None, raw.as_deref())?;
    history_response(&state, ctx, q).await
}

async fn instance_op(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    Path((rtype, id, op)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    match (rtype.as_str(), op.as_str()) {
        ("Patient", "$everything") => {
            let mut count = query::DEFAULT_COUNT;
            let mut offset = 0;
            for (k, v) in parse_pairs(raw.as_deref()) {
                match k.as_str() {
                    "_count" => {
                        count = v
                            .parse::<usize>()
                            .map_err(|_| {
                                FhirError::bad_request(
                                    None,
                                    "_count must be a non-negative integer",
                                )
                            })?
                            .min(query::MAX_COUNT)
                    }
                    "_offset" => {
                        offset = v
                            .parse::<usize>()
                            .map_err(|_| {
                                FhirError::bad_request(
                                    None,
                                    "_offset must be a non-negative integer",
                                )
                            })?
                            .min(query::MAX_OFFSET)
                    }
                    other => {
                        return Err(FhirError::new(
                            400,
                            "not-supported",
                            None,
                            format!("$everything parameter '{other}' is not supported"),
                        )
                        .into());
                    }
                }
            }
            let result = state.engine.everything(&ctx, &id, count, offset).await?;
            let base = &state.engine.base_url;
            let mut links = vec![];
            if offset + count < result.total as usize {
                links.push(Link {
                    relation: "next",
                    url: format!(
                        "{base}/Patient/{id}/$everything?_count={count}&_offset={}",
                        offset + count
                    ),
                });
            }
            let entries = result
                .matches
                .into_iter()
                .map(|s| entry(base, s, "match"))
                .collect();
            Ok(fhir_json(
                StatusCode::OK,
                &bundle::searchset(Some(result.total), links, entries),
            ))
        }
        _ => {
            Err(FhirError::not_found(format!("Operation {op} is not supported on {rtype}")).into())
        }
    }
}
