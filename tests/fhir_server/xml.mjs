// FHIR XML in and out, as HAPI speaks it, with the `fhir` package (FHIR.js): the engine itself only knows JSON.
import fhirPackage from 'fhir';

const fhir = new fhirPackage.Fhir();

export const isXmlType = (mediaType) => /xml/i.test(mediaType ?? '');

export function fromXml(text) {
  const json = fhir.xmlToJson(text);
  const resource = typeof json === 'string' ? JSON.parse(json) : json;
  if (!resource?.resourceType) throw new Error('not a FHIR resource');
  return resource;
}

export const toXml = (resource) => fhir.jsonToXml(JSON.stringify(resource));

// Whether the answer should be XML: `_format` first (as HAPI), then the Accept header by its q-values.
export function wantsXml(format, accept) {
  if (format) return isXmlType(format);
  let best = { q: 0, xml: false };
  for (const part of (accept ?? '').split(',')) {
    const [type, ...params] = part.trim().split(';');
    if (!/json|xml/i.test(type)) continue;
    const q = Number(params.map((p) => p.trim()).find((p) => p.startsWith('q='))?.slice(2) ?? 1);
    if (q > best.q) best = { q, xml: isXmlType(type) };
  }
  return best.xml;
}
