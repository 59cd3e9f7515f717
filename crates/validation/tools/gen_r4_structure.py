#!/usr/bin/env python3
"""Generates crates/validation/data/r4-structure.json.gz, the built-in R4 structure
table the validator uses when no FHIR packages are installed.

Input: the HL7 FHIR R4 (4.0.1) core package `hl7.fhir.r4.core-4.0.1.tgz` (CC0),
unpacked (e.g. from ../shared/fhir-packages/current/). Output: a Bundle-like JSON of reduced
StructureDefinitions (snapshot elements with only the fields the validator reads)
and the ValueSets / CodeSystems that required bindings of those definitions use.

Usage: tar xzf hl7.fhir.r4.core-4.0.1.tgz -C /tmp/core &&
       python3 tools/gen_r4_structure.py /tmp/core/package data/r4-structure.json.gz
"""
import gzip, json, sys, os

src, out = sys.argv[1], sys.argv[2]

import glob
def resources(prefix):
    for f in sorted(glob.glob(os.path.join(src, prefix + "-*.json"))):
        with open(f) as fh:
            yield json.load(fh)

KEEP_EL = ["id", "path", "sliceName", "min", "max", "base", "type", "contentReference",
           "binding", "constraint", "slicing"]
sds = []
required_vs = set()
for r in resources("StructureDefinition"):
    if True:
        if r.get("derivation") != "specialization" and r.get("kind") != "logical" and r["url"] not in (
                "http://hl7.org/fhir/StructureDefinition/Element", "http://hl7.org/fhir/StructureDefinition/Resource", "http://hl7.org/fhir/StructureDefinition/Base"):
            continue
        if r.get("kind") == "logical":
            continue
        els = []
        for el in r["snapshot"]["element"]:
            x = {k: el[k] for k in KEEP_EL if k in el}
            if "base" in x:
                x["base"] = {"max": x["base"]["max"]}
            if "type" in x:
                x["type"] = [{k: t[k] for k in ("code", "profile", "targetProfile") if k in t} for t in x["type"]]
            if "binding" in x:
                b = x["binding"]
                if b.get("strength") in ("required", "extensible") and "valueSet" in b:
                    x["binding"] = {"strength": b["strength"], "valueSet": b["valueSet"]}
                    if b["strength"] == "required":
                        required_vs.add(b["valueSet"].split("|")[0])
                else:
                    del x["binding"]
            if "constraint" in x:
                x["constraint"] = [{k: c[k] for k in ("key", "severity", "human", "expression") if k in c}
                                   for c in x["constraint"]]
            for k, v in el.items():
                if k.startswith("fixed") or k.startswith("pattern"):
                    x[k] = v
            els.append(x)
        sd = {k: r[k] for k in ("resourceType", "url", "name", "type", "kind", "abstract", "derivation", "baseDefinition") if k in r}
        sd["snapshot"] = {"element": els}
        sds.append(sd)

vs_all = {}
cs_all = {}
for r in list(resources("ValueSet")) + list(resources("CodeSystem")):
    if r["resourceType"] == "ValueSet":
        vs_all[r["url"]] = r
    elif r["resourceType"] == "CodeSystem":
        cs_all[r["url"]] = r

def strip_concepts(cs):
    def walk(cs_list):
        res = []
        for c in cs_list:
            y = {"code": c["code"]}
            if "display" in c:
                y["display"] = c["display"]
            if "concept" in c:
                y["concept"] = walk(c["concept"])
            res.append(y)
        return res
    out = {k: cs[k] for k in ("resourceType", "url", "content") if k in cs}
    out["concept"] = walk(cs.get("concept", []))
    return out

vss, css = [], {}
seen = set()
todo = list(required_vs)
while todo:
    u = todo.pop()
    if u in seen or u not in vs_all:
        continue
    seen.add(u)
    vs = vs_all[u]
    keep = {k: vs[k] for k in ("resourceType", "url", "compose") if k in vs}
    vss.append(keep)
    for inc in vs.get("compose", {}).get("include", []) + vs.get("compose", {}).get("exclude", []):
        s = inc.get("system")
        if s and s in cs_all and s not in css:
            css[s] = strip_concepts(cs_all[s])
        for v in inc.get("valueSet", []):
            todo.append(v)

doc = {"note": "Reduced from HL7 FHIR R4 4.0.1 core definitions (CC0) by tools/gen_r4_structure.py",
       "structureDefinitions": sds, "valueSets": vss, "codeSystems": list(css.values())}
with gzip.open(out, "wt", compresslevel=9) as f:
    json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
print(len(sds), "StructureDefinitions,", len(vss), "ValueSets,", len(css), "CodeSystems")
