//! The CapabilityStatement: generated from what the server actually does, so it
//! tells the truth (only indexed search parameters, only implemented interactions).

use serde_json::{Value, json};
use tsunagi_fhir::model::model;

use crate::state::AppState;

pub fn capability_statement(state: &AppState) -> Value {
    let m = model();
    let mut resources = Vec::new();
    for rt in m.resource_types() {
        let mut params: Vec<Value> = m
            .indexed_params(rt)
            .map(|p| json!({"name": p.code, "definition": p.url, "type": p.param_type.as_str()}))
            .collect();
        params.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        params.insert(0, json!({"name": "_lastUpdated", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated", "type": "date"}));
        params.insert(0, json!({"name": "_id", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "type": "token"}));
        let interactions: Vec<Value> = [
            "read",
            "vread",
            "update",
            "delete",
            "history-instance",
            "history-type",
            "create",
            "search-type",
        ]
        .iter()
        .map(|c| json!({"code": c}))
        .collect();
        let includes: Vec<String> = m
            .indexed_params(rt)
            .filter(|p| p.param_type == tsunagi_fhir::search::ParamType::Reference)
            .map(|p| format!("{rt}:{}", p.code))
            .collect();
        let mut r = json!({
            "type": rt,
            "versioning": "versioned",
            "readHistory": true,
            "updateCreate": true,
            "conditionalCreate": true,
            "conditionalUpdate": false,
            "conditionalDelete": "not-supported",
            "interaction": interactions,
            "searchParam": params,
            "searchInclude": includes,
        });
        let mut ops = Vec::new();
        if rt == "Patient" {
            ops.push(json!({"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}));
        }
        if rt == "CodeSystem" {
            ops.push(json!({"name": "lookup", "definition": "http://hl7.org/fhir/OperationDefinition/CodeSystem-lookup"}));
            ops.push(json!({"name": "validate-code", "definition": "http://hl7.org/fhir/OperationDefinition/CodeSystem-validate-code"}));
        }
        ops.push(json!({"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}));
        for s in state.services.iter() {
            for op in s.operations() {
                if op.resource_type == Some(rt.as_str()) {
                    ops.push(json!({"name": op.name, "definition": format!("{}/OperationDefinition/{}", state.engine.base_url, op.name), "documentation": op.documentation}));
                }
            }
        }
        if !ops.is_empty() {
            r["operation"] = Value::Array(ops);
        }
        resources.push(r);
    }
    let system_ops: Vec<Value> = state
        .services
        .iter()
        .flat_map(|s| s.operations())
        .filter(|op| op.resource_type.is_none())
        .map(|op| json!({"name": op.name, "definition": format!("{}/OperationDefinition/{}", state.engine.base_url, op.name), "documentation": op.documentation}))
        .collect();
    let token_url = format!(
        "{}/auth/token",
        state.engine.base_url.trim_end_matches("/fhir")
    );
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-21",
        "kind": "instance",
        "software": {"name": "Tsunagi", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Tsunagi national medical information platform", "url": state.engine.base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [{
            "mode": "server",
            "security": {
                "cors": false,
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
                "description": "OAuth2 client credentials with private_key_jwt (SMART Backend Services); every request is decided by the platform policy and audited",
                "extension": [{"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris", "extension": [{"url": "token", "valueUri": token_url}]}]
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
            "operation": system_ops,
        }]
    })
}
