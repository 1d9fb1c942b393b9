// Searching like HAPI: unknown parameters refused (400), chains resolved over every target type,
// pages of `_count` (default 20, at most 200, as the HAPI JPA starter) with absolute `self`/`next`
// links, and the history of a resource newest first, paged the same way.
//
// Paging follows HAPI's `_getpages`: the first page keeps the ids of every match (in order), later
// pages are cut from that list, so following `next` gives each match exactly once even while others write.
import { randomUUID } from 'node:crypto';
import {
  OperationOutcomeError, allOk, badRequest, businessRule, deepClone, evalFhirPath, getSearchParameter,
  getSearchParameters, gone, isResourceType, notFound, matchesSearchRequest, parseSearchRequest, splitSearchOnComma,
} from '@medplum/core';
import { getExtraEntries } from '@medplum/fhir-router';
import { localTarget } from './indexes.mjs';

export const DEFAULT_PAGE = 20;
export const MAX_PAGE = 200;
const KEPT_SEARCHES = 500; // searches whose later pages can still be asked for (oldest dropped first)

const isChain = (filter) => filter.code.includes('.') && !filter.code.startsWith('_has:');

function unknownParameter(resourceType, code) {
  const valid = Object.keys(getSearchParameters(resourceType) ?? {}).sort().join(', ');
  return new OperationOutcomeError(badRequest(`Unknown search parameter "${code}" for resource type `
    + `"${resourceType}". Valid search parameters for this search are: [${valid}]`));
}

// `subject.name`, `subject:Patient.name`, `subject.organization.name`: a reference parameter, then a
// parameter of one of its target types.
function checkChain(resourceType, code) {
  const dot = code.indexOf('.');
  const [reference, explicitType] = code.slice(0, dot).split(':');
  const param = getSearchParameter(resourceType, reference);
  if (param?.type !== 'reference') throw unknownParameter(resourceType, code.slice(0, dot));
  const rest = code.slice(dot + 1);
  const targets = explicitType ? [explicitType] : param.target ?? [];
  const fits = (type) => {
    try {
      checkCode(type, rest);
      return true;
    } catch {
      return false;
    }
  };
  if (!targets.some(fits)) {
    throw new OperationOutcomeError(badRequest(`Unknown search parameter "${rest}" in the chain "${code}": `
      + `not a parameter of ${targets.join(', ') || 'any target'}`));
  }
}

function checkCode(resourceType, key) {
  if (key.startsWith('_has:')) return;
  const code = key.split(':')[0];
  if (key.includes('.')) checkChain(resourceType, key);
  else if (!getSearchParameter(resourceType, code)) throw unknownParameter(resourceType, code);
}

// The engine turns an unknown parameter into a filter nothing matches: HAPI answers 400.
export function checkSearchRequest({ resourceType, filters, sortRules }) {
  if (!isResourceType(resourceType)) return;
  for (const { code } of filters ?? []) checkCode(resourceType, code);
  for (const { code } of sortRules ?? []) {
    if (!getSearchParameter(resourceType, code)) {
      throw new OperationOutcomeError(badRequest(`Unknown _sort parameter value "${code}" for resource type "${resourceType}"`));
    }
  }
}

// Does `resource` hold a reference, through the chain's reference parameter, to a resource matching the rest?
function matchesChain(repo, resource, { code, value }) {
  const dot = code.indexOf('.');
  const [reference, explicitType] = code.slice(0, dot).split(':');
  const param = getSearchParameter(resource.resourceType, reference);
  const targets = explicitType ? [explicitType] : param.target ?? [];
  for (const ref of evalFhirPath(param.expression, resource)) {
    const key = localTarget(ref?.reference, repo.baseUrl);
    const type = key?.split('/')[0];
    if (!key || !targets.includes(type) || !getSearchParameter(type, code.slice(dot + 1).split(/[.:]/)[0])) continue;
    const target = repo.current(key);
    if (target && matchesRequest(repo, target, parseSearchRequest(type, { [code.slice(dot + 1)]: value }))) return true;
  }
  return false;
}

export function matchesRequest(repo, resource, request) {
  const plain = { resourceType: request.resourceType, filters: request.filters?.filter((f) => !isChain(f)) };
  return matchesSearchRequest(resource, plain)
    && (request.filters ?? []).filter(isChain).every((chain) => matchesChain(repo, resource, chain));
}

// The stored resources an `_id`, identifier or `_tag` filter allows (indexed), or every one of the type.
function candidates(repo, all, resourceType, filters) {
  for (const { code, operator, value } of filters ?? []) {
    if (operator !== 'eq') continue;
    const values = splitSearchOnComma(value);
    if (code === '_id') return values.map((id) => all.get(id)).filter(Boolean);
    if ((code === 'identifier' || code === '_tag') && values.every((v) => /^[^|\\]+\|[^|\\]+$/.test(v))) {
      return [...new Set(repo.indexes.idsWithToken(resourceType, values))].map((id) => all.get(id)).filter(Boolean);
    }
  }
  return all.values();
}

// Every stored resource matching the request, sorted by its `_sort` (stable: ties keep store order).
export function matchAll(repo, request) {
  checkSearchRequest(request);
  const all = repo.resources.get(request.resourceType);
  if (!all) return [];
  const found = [];
  for (const resource of candidates(repo, all, request.resourceType, request.filters)) {
    if (matchesRequest(repo, resource, request)) found.push(resource);
  }
  if (!request.sortRules?.length) return found;
  const keys = (resource) => request.sortRules.map(({ code }) => JSON.stringify(
    evalFhirPath(getSearchParameter(request.resourceType, code).expression, resource)));
  const keyed = found.map((resource) => ({ resource, keys: keys(resource) }));
  keyed.sort((a, b) => {
    for (const [i, { descending }] of request.sortRules.entries()) {
      if (a.keys[i] !== b.keys[i]) return (a.keys[i] < b.keys[i] ? -1 : 1) * (descending ? -1 : 1);
    }
    return 0;
  });
  return keyed.map(({ resource }) => resource);
}

// HAPI's Subscription checks (422), and `requested` rest-hooks made `active`.
export function checkSubscription(subscription) {
  const { status, criteria, channel } = subscription;
  if (status !== 'requested' && status !== 'active') return subscription;
  let request;
  try {
    request = parseSearchRequest(criteria ?? '');
    if (!isResourceType(request.resourceType)) throw new Error(`unknown resource type "${request.resourceType}"`);
    checkSearchRequest(request);
  } catch (error) {
    const reason = error instanceof OperationOutcomeError ? error.outcome.issue[0].details.text : error.message;
    throw new OperationOutcomeError(businessRule('subscription', `Invalid Subscription.criteria "${criteria}": ${reason}`));
  }
  if (channel?.type === 'rest-hook' && !channel.endpoint) {
    throw new OperationOutcomeError(businessRule('subscription', 'Rest-hook Subscriptions must have Subscription.channel.endpoint'));
  }
  return status === 'requested' && channel?.type === 'rest-hook' ? { ...subscription, status: 'active' } : subscription;
}

// ---- paging ---------------------------------------------------------------------------------------

const kept = new Map(); // search id -> { type, items, render }

function pageSize(count) {
  const n = Number.parseInt(count, 10);
  return Number.isInteger(n) && n > 0 ? Math.min(n, MAX_PAGE) : DEFAULT_PAGE;
}

function queryString(query) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query ?? {})) for (const v of [].concat(value ?? [])) params.append(key, v);
  const text = params.toString();
  return text ? `?${text}` : '';
}

async function pageOf(repo, search, offset, size, self) {
  const entry = await search.render(search.items.slice(offset, offset + size));
  const link = [{ relation: 'self', url: self }];
  const hasNext = offset + size < search.items.length;
  if (hasNext || offset > 0) {
    if (!search.id) {
      search.id = randomUUID();
      kept.set(search.id, search);
      if (kept.size > KEPT_SEARCHES) kept.delete(kept.keys().next().value);
    }
    const at = (start) => `${repo.baseUrl}?_getpages=${search.id}&_getpagesoffset=${start}&_count=${size}`
      + `&_bundletype=${search.type}`;
    if (hasNext) link.push({ relation: 'next', url: at(offset + size) });
    if (offset > 0) link.push({ relation: 'previous', url: at(Math.max(0, offset - size)) });
  }
  return { resourceType: 'Bundle', type: search.type, total: search.items.length, link, ...(entry.length ? { entry } : {}) };
}

// GET [type]?... (and POST [type]/_search, and the same inside a batch)
export async function searchType(req, repo) {
  const { resourceType } = req.params;
  if (!isResourceType(resourceType)) {
    return [{ ...notFound, issue: [{ severity: 'error', code: 'not-found', details: { text: `Unknown resource type "${resourceType}"` } }] }];
  }
  const request = parseSearchRequest(resourceType, req.query);
  const self = `${repo.baseUrl}/${resourceType}${queryString(req.query)}`;
  const found = matchAll(repo, request);
  if (request.count === 0) { // _summary=count
    return [allOk, { resourceType: 'Bundle', type: 'searchset', total: found.length, link: [{ relation: 'self', url: self }] }];
  }
  const fullUrl = (type, id) => `${repo.baseUrl}/${type}/${id}`;
  const search = {
    type: 'searchset',
    items: found.map((resource) => resource.id),
    render: async (ids) => {
      const resources = ids.map((id) => repo.current(`${resourceType}/${id}`)).filter(Boolean).map(deepClone);
      const entries = resources.map((resource) => ({ fullUrl: fullUrl(resourceType, resource.id), resource, search: { mode: 'match' } }));
      if (request.include || request.revInclude) await getExtraEntries(repo, request, resources, entries, { fullUrl });
      return entries;
    },
  };
  return [allOk, await pageOf(repo, search, Math.max(0, request.offset || 0), pageSize(request.count), self)];
}

// POST [type]/_search with a form body
export async function searchByPost(req, repo) {
  return searchType({ ...req, query: { ...req.query, ...req.body } }, repo);
}

// GET [type]/[id]/_history
export async function historyInstance(req, repo) {
  const { resourceType, id } = req.params;
  const bundle = await repo.readHistory(resourceType, id);
  const search = {
    type: 'history',
    items: bundle.entry,
    render: async (entries) => entries.map((e) => (e.resource ? { ...e, resource: deepClone(e.resource) } : e)),
  };
  const self = `${repo.baseUrl}/${resourceType}/${id}/_history${queryString(req.query)}`;
  return [allOk, await pageOf(repo, search, 0, pageSize(req.query?._count), self)];
}

// GET ?_getpages=...: a later page of a kept search; anything else goes to the engine's system search.
export function systemSearch(engineHandler) {
  return async (req, repo, router, options) => {
    const id = [].concat(req.query?._getpages ?? [])[0];
    if (!id) return engineHandler(req, repo, router, options);
    const search = kept.get(id);
    if (!search) {
      return [{ ...gone, issue: [{ severity: 'error', code: 'not-found',
        details: { text: `Search ID "${id}" does not exist and may have expired` } }] }];
    }
    const offset = Math.max(0, Number.parseInt(req.query._getpagesoffset, 10) || 0);
    return [allOk, await pageOf(repo, search, offset, pageSize(req.query._count), `${repo.baseUrl}${queryString(req.query)}`)];
  };
}
