#!/usr/bin/env python3
"""Generate crates/fhir/data/r4-tables.json from the HL7 FHIR R4 core definitions.

The R4 definitions are CC0; the generated table is committed. Run:
    python3 tools/gen-r4-tables.py ../shared/fhir-packages/r4-core > crates/fhir/data/r4-tables.json

Search-parameter FHIRPath expressions are compiled into simple paths the Rust
indexer walks (no FHIRPath engine on the write path). A path is a list of steps;
each step is an element name, optionally with `as` (choice type), `ref` (target
resource type filter from `where(resolve() is X)`) or `eq` (a `where(f='v')` filter).
Expressions outside that subset are listed with `"paths": null` and are not indexed;
the CapabilityStatement does not advertise them.
"""
import gzip, json, re, sys, os

root = sys.argv[1]
load = lambda n: json.load(gzip.open(os.path.join(root, n)))
resources = load('profiles-resources.json.gz')
params = load('search-parameters.json.gz')

resource_types = []
choice = {}
compartment = {}
for e in resources['entry']:
    r = e['resource']
    if r['resourceType'] == 'StructureDefinition' and r.get('kind') == 'resource' and not r.get('abstract') and r.get('derivation') != 'constraint':
        resource_types.append(r['id'])
        for el in r['snapshot']['element']:
            p = el['path']
            if p.endswith('[x]'):
                choice[p[:-3]] = [t['code'] for t in el.get('type', [])]
    if r['resourceType'] == 'CompartmentDefinition' and r['code'] == 'Patient':
        for c in r['resource']:
            if c.get('param'):
                compartment[c['code']] = c['param']
resource_types.sort()

STEP = re.compile(r"""^([A-Za-z][A-Za-z0-9]*)
    (?:\.where\(resolve\(\)\s+is\s+([A-Za-z]+)\))?
    (?:\.where\(([a-zA-Z]+)\s*=\s*'([^']*)'\))?
    (?:\.as\(([A-Za-z]+)\))?$""", re.X)

def split_top(expr, sep='|'):
    out, depth, cur = [], 0, ''
    for ch in expr:
        if ch == '(':
            depth += 1
        elif ch == ')':
            depth -= 1
        if ch == sep and depth == 0:
            out.append(cur.strip()); cur = ''
        else:
            cur += ch
    out.append(cur.strip())
    return out

def split_dots(s):
    out, depth, cur = [], 0, ''
    for ch in s:
        if ch == '(':
            depth += 1
        elif ch == ')':
            depth -= 1
        if ch == '.' and depth == 0:
            out.append(cur); cur = ''
        else:
            cur += ch
    out.append(cur)
    # re-attach function calls to the step before them
    steps = []
    for part in out:
        if part.startswith(('where(', 'as(')) and steps:
            steps[-1] += '.' + part
        else:
            steps.append(part)
    return steps

def compile_one(expr):
    """Returns (resourceType, [steps]) or None."""
    m = re.fullmatch(r'\((.*) as ([A-Za-z]+)\)', expr.strip())
    cast = None
    if m:
        expr, cast = m.group(1).strip(), m.group(2)
    steps = split_dots(expr)
    rtype, rest = steps[0], steps[1:]
    if not re.fullmatch(r'[A-Z][A-Za-z]+', rtype):
        return None
    out = []
    for s in rest:
        m = STEP.match(s)
        if not m:
            return None
        name, ref, wf, wv, as_ = m.groups()
        step = {'name': name}
        if ref: step['ref'] = ref
        if wf: step['eq'] = [wf, wv]
        if as_: step['as'] = as_
        out.append(step)
    if cast:
        if not out:
            return None
        out[-1]['as'] = cast
    return rtype, out

table = []
for e in params['entry']:
    sp = e['resource']
    expr = sp.get('expression')
    entry = {'code': sp['code'], 'type': sp['type'], 'base': sp['base'], 'url': sp['url']}
    if sp.get('target'):
        entry['target'] = sp['target']
    paths = {}
    ok = expr is not None and sp['type'] not in ('composite', 'special')
    if ok:
        for alt in split_top(expr):
            c = compile_one(alt)
            if c is None:
                ok = False
                break
            rt, steps = c
            paths.setdefault(rt, []).append(steps)
    entry['paths'] = paths if ok else None
    if not ok:
        entry['expression'] = expr
    table.append(entry)

json.dump({'generatedFrom': 'HL7 FHIR R4 4.0.1 core definitions (CC0)',
           'resourceTypes': resource_types,
           'choiceElements': choice,
           'patientCompartment': compartment,
           'searchParameters': table}, sys.stdout, ensure_ascii=False, separators=(',', ':'))
