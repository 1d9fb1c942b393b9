// The engine's in-memory repository, made to store like a HAPI JPA server: versions 1, 2, 3; no new
// version for an unchanged update; 410 for a deleted resource; validation (codes included) and
// referential integrity on write; transactions all or nothing; Subscriptions told after commit.
import {
  OperationOutcomeError, badRequest, conflict, deepClone, gone, notFound, stringify, validateResource,
} from '@medplum/core';
import { MemoryRepository } from '@medplum/fhir-router';
import { Indexes, linksOf } from './indexes.mjs';
import { checkSubscription, matchAll } from './search.mjs';
import { codeIssues } from './terminology.mjs';

const tombstones = new WeakSet(); // the history entries that record a delete
const putCreated = new WeakSet(); // the versions a PUT created (their history entry says PUT, not POST)

// A resource as JSON with sorted keys, minus what the server sets: equal strings mean no change.
function content(resource) {
  const { versionId, lastUpdated, ...meta } = resource.meta ?? {};
  const sorted = (value) => {
    if (Array.isArray(value)) return value.map(sorted);
    if (!value || typeof value !== 'object') return value;
    return Object.fromEntries(Object.keys(value).sort().map((key) => [key, sorted(value[key])]));
  };
  return stringify(sorted({ ...resource, meta }));
}

export class TestRepository extends MemoryRepository {
  indexes = new Indexes();
  journal = undefined; // in a transaction: `Type/id` -> what it was before, to roll back and to check at commit
  upserts = new Set(); // `Type/id/_history/1` of the PUTs that created their resource (HAPI answers 201)
  baseUrl = ''; // this server's own base URL: absolute references on it are local references
  onCommit = () => {}; // told every new version once it is committed (Subscriptions)
  persist = undefined; // with DATA_FILE: the Journal (journal.mjs) every commit is appended to
  pending = []; // in a transaction: its journal lines, appended at commit

  // The engine's withTransaction only runs the callback. Here each touched resource is remembered
  // (journal) so a failure puts back just those: O(resources touched), not O(resources stored).
  async withTransaction(callback) {
    if (this.journal) return callback(this);
    this.journal = new Map();
    try {
      const result = await callback(this);
      this.checkAtCommit();
      this.persist?.append(this.pending);
      const changed = [...this.journal].map(([key, before]) => [this.current(key), before.resource])
        .filter(([now, before]) => now && now !== before).map(([now]) => now);
      this.journal = undefined;
      for (const resource of changed) this.onCommit(resource);
      return result;
    } catch (error) {
      this.rollback();
      throw error;
    } finally {
      this.journal = undefined;
      this.pending = [];
    }
  }

  remember(resourceType, id) {
    const key = `${resourceType}/${id}`;
    if (!this.journal || this.journal.has(key)) return;
    this.journal.set(key, { resource: this.current(key), versions: this.history.get(resourceType)?.get(id)?.length });
  }

  rollback() {
    for (const [key, { resource, versions }] of [...this.journal].reverse()) {
      const [resourceType, id] = key.split('/');
      this.indexes.remove(resourceType, id);
      if (resource) {
        this.resources.get(resourceType).set(id, resource);
        this.indexes.add(resource, this.baseUrl);
      } else {
        this.resources.get(resourceType)?.delete(id);
      }
      if (versions === undefined) this.history.get(resourceType)?.delete(id);
      else this.history.get(resourceType).get(id).length = versions;
    }
  }

  current(key) {
    const [resourceType, id] = key.split('/');
    return this.resources.get(resourceType)?.get(id);
  }

  // In a transaction, references are checked once every entry is written: an entry may refer to one
  // that comes later (an Observation created before the PUT of the response it is derived from).
  checkAtCommit() {
    for (const [key, before] of this.journal) {
      const resource = this.current(key);
      if (resource && resource !== before.resource) this.checkLinks(key, this.indexes.links.get(key));
      else if (!resource && before.resource) this.checkNotReferred(key);
    }
  }

  checkLinks(key, links) {
    const missing = links.find(({ target }) => target !== key && !this.current(target));
    if (missing) {
      throw new OperationOutcomeError(badRequest(
        `Resource ${missing.target} not found, specified in path: ${missing.path}`, missing.path));
    }
  }

  checkNotReferred(key) {
    const referrer = this.indexes.firstReferrer(key);
    if (referrer) {
      throw new OperationOutcomeError(conflict(`Unable to delete ${key} because at least one resource has a reference `
        + `to this resource. First reference found was resource ${referrer.source} in path ${referrer.path}`));
    }
  }

  validate(resource) {
    const tokens = {};
    const issues = validateResource(resource, { collect: { tokens } });
    issues.push(...codeIssues(tokens));
    if (issues.some((issue) => issue.severity === 'error')) {
      throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: issues });
    }
  }

  // Every write (create, update, patch, conditional create inside a transaction) ends here.
  createResourceSync(resource, options, update) {
    const { resourceType } = resource;
    const id = resource.id ?? this.generateId();
    const key = `${resourceType}/${id}`;
    const existing = this.current(key);
    if (!update && existing) throw new OperationOutcomeError(badRequest('Assigned ID is already in use'));
    let candidate = { ...resource, id };
    if (resourceType === 'Subscription') candidate = checkSubscription(candidate);
    this.validate(candidate);
    candidate = JSON.parse(stringify(candidate)); // as the engine stores it, so the comparison is fair
    if (existing && content(existing) === content(candidate)) return deepClone(existing); // HAPI: no new version
    if (!this.journal) this.checkLinks(key, linksOf(candidate, this.baseUrl));
    this.remember(resourceType, id);
    const versions = this.history.get(resourceType)?.get(id)?.length ?? 0;
    candidate.meta = { ...candidate.meta, versionId: String(versions + 1), lastUpdated: new Date().toISOString() };
    this.seeding = true; // the engine then keeps the versionId and lastUpdated given
    let saved;
    try {
      saved = super.createResourceSync(candidate, options, update);
    } finally {
      this.seeding = false;
    }
    const stored = this.current(key);
    if (update && !existing) {
      if (this.upserts.size > 1000) this.upserts.clear(); // left over by rolled-back transactions
      this.upserts.add(`${key}/_history/${saved.meta.versionId}`);
      putCreated.add(stored);
    }
    this.indexes.add(stored, this.baseUrl);
    this.record({ put: stored, viaPut: update && !existing });
    if (!this.journal) this.onCommit(stored);
    return saved;
  }

  async deleteResource(resourceType, id, options) {
    const key = `${resourceType}/${id}`;
    const existing = this.current(key);
    if (!existing || (options?.ifMatch && existing.meta.versionId !== options.ifMatch)) {
      return super.deleteResource(resourceType, id, options); // throws: 404, or 412 on a stale If-Match
    }
    if (!this.journal) this.checkNotReferred(key); // in a transaction: at commit, the referrer may go too
    this.remember(resourceType, id);
    await super.deleteResource(resourceType, id, options);
    const history = this.history.get(resourceType).get(id);
    const tombstone = { resourceType, id, meta: { versionId: String(history.length + 1),
      lastUpdated: new Date().toISOString() } };
    tombstones.add(tombstone);
    history.push(tombstone);
    this.indexes.remove(resourceType, id);
    this.record({ deleted: tombstone });
  }

  // A committed write for the journal (DATA_FILE); in a transaction, kept until it commits.
  record(entry) {
    if (!this.persist) return;
    if (this.journal) this.pending.push(JSON.stringify(entry));
    else this.persist.append([JSON.stringify(entry)]);
  }

  // One journal entry put back at start, as it was (same version and lastUpdated), without notifying anyone.
  restore({ put, viaPut, deleted }) {
    const resource = put ?? deleted;
    const { resourceType, id } = resource;
    if (!this.resources.has(resourceType)) this.resources.set(resourceType, new Map());
    if (!this.history.has(resourceType)) this.history.set(resourceType, new Map());
    const history = this.history.get(resourceType);
    if (!history.has(id)) history.set(id, []);
    history.get(id).push(resource);
    this.indexes.remove(resourceType, id);
    if (deleted) {
      tombstones.add(resource);
      this.resources.get(resourceType).delete(id);
      return;
    }
    if (viaPut) putCreated.add(resource);
    this.resources.get(resourceType).set(id, resource);
    this.indexes.add(resource, this.baseUrl);
  }

  async readResource(resourceType, id) {
    const resource = this.resources.get(resourceType)?.get(id);
    if (resource) return deepClone(resource);
    if (!this.history.get(resourceType)?.get(id)?.length) throw new OperationOutcomeError(notFound);
    throw new OperationOutcomeError({ ...gone, issue: [{ severity: 'error', code: 'deleted',
      details: { text: `Resource ${resourceType}/${id} is gone/deleted` } }] });
  }

  async readVersion(resourceType, id, versionId) {
    const version = this.history.get(resourceType)?.get(id)?.find((v) => v.meta.versionId === versionId);
    if (!version) throw new OperationOutcomeError(notFound);
    if (tombstones.has(version)) await this.readResource(resourceType, id); // 410
    return deepClone(version);
  }

  // HAPI's history: newest first, deletes included (no resource), each with what made it.
  async readHistory(resourceType, id) {
    const versions = this.history.get(resourceType)?.get(id);
    if (!versions?.length) throw new OperationOutcomeError(notFound);
    const url = `${resourceType}/${id}`;
    const entry = versions.map((version, i) => {
      const deleted = tombstones.has(version);
      const created = !deleted && (i === 0 || tombstones.has(versions[i - 1]));
      const method = deleted ? 'DELETE' : created && !putCreated.has(version) ? 'POST' : 'PUT';
      return {
        fullUrl: `${this.baseUrl}/${url}/_history/${version.meta.versionId}`,
        ...(deleted ? {} : { resource: version }),
        request: { method, url: method === 'POST' ? resourceType : url },
        response: { status: deleted ? '204 No Content' : created ? '201 Created' : '200 OK',
          etag: `W/"${version.meta.versionId}"`, lastModified: version.meta.lastUpdated },
      };
    }).reverse();
    return { resourceType: 'Bundle', type: 'history', total: entry.length, entry };
  }

  // The engine evaluates every filter on every stored resource of the type; search.mjs narrows first,
  // checks the parameters (unknown -> 400) and matches chains the engine cannot.
  searchSync(request) {
    const found = matchAll(this, request);
    const start = request.offset ?? 0;
    const page = request.count === undefined ? found.slice(start) : found.slice(start, start + request.count);
    return {
      resourceType: 'Bundle', type: 'searchset', total: found.length,
      entry: page.length ? page.map((resource) => ({ search: { mode: 'match' }, resource: deepClone(resource) })) : undefined,
    };
  }
}
