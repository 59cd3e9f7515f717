#!/usr/bin/env python3
"""Writes a synthetic NDJSON of JP-CLINS lab Observations and Conditions for the
validation benchmark. The templates are the official JP-CLINS examples read at run
time from ../shared (nothing is copied into the repository); ids, values and JLAC10
codes are varied.

Usage: python3 bench/validation/gen_ndjson.py [COUNT] [OUT]
       (defaults: 100000, /tmp/tsunagi-bench-clins.ndjson)
"""
import csv, json, os, random, sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared")
ex = os.path.join(root, "fixtures", "jp-examples", "clinical-core")
count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
out = sys.argv[2] if len(sys.argv) > 2 else "/tmp/tsunagi-bench-clins.ndjson"

def load(name):
    with open(os.path.join(ex, name), encoding="utf-8") as f:
        return json.load(f)

obs = [load(n) for n in ("Observation-Example-JP-Obs-LabResult-eCS-K.json", "Observation-Example-JP-Obs-LabResult-eCS-Alb.json",
                          "Observation-Example-JP-Obs-LabResult-eCS-eGFR.json")]
cond = [load(n) for n in ("Condition-Example-JP-Condition-eCS-01.json", "Condition-Example-JP-Condition-eCS-02.json")]
with open(os.path.join(root, "codesets", "jlac10-labo-items.csv"), encoding="utf-8") as f:
    core = [r for r in csv.DictReader(f) if r["codeset"] == "corelabo"]

rnd = random.Random(42)
with open(out, "w", encoding="utf-8") as w:
    for i in range(count):
        if i % 5 == 4:
            r = json.loads(json.dumps(rnd.choice(cond)))
            r["id"] = f"bench-cond-{i}"
        else:
            r = json.loads(json.dumps(rnd.choice(obs)))
            r["id"] = f"bench-obs-{i}"
            item = rnd.choice(core)
            for c in r["code"]["coding"]:
                if c["system"] == "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_CoreLabo_CS":
                    c["code"], c["display"] = item["jlac10_code"], item["display"]
                elif c["system"] == "http://medis.or.jp/CodeSystem/master-JLAC10-17digits":
                    c["code"], c["display"] = item["jlac10_code"], item["display"]
            if "valueQuantity" in r:
                r["valueQuantity"]["value"] = round(rnd.uniform(0.1, 300.0), 1)
        w.write(json.dumps(r, ensure_ascii=False) + "\n")
print(f"wrote {count} resources to {out}")
